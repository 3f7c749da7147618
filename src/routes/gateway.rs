//! Which gateway holds each extra prefix on this node's device.
//!
//! A prefix belongs to exactly one peer (WireGuard has no ECMP), so failover
//! moves it. The winner is the best-priority candidate that is healthy — its
//! Node Ready, and its session with this node alive ([`Liveness`]). When the
//! winner goes unhealthy the prefix moves at once to the next healthy
//! candidate; a better candidate that comes back takes the prefix back only
//! after it has been healthy for the grant's failback time, so a flapping
//! gateway does not pull the prefix to and fro. No healthy candidate: the
//! prefix stays on the last winner, whose peer drops or carries it — the
//! route into the tunnel stays either way (fail closed).
//!
//! Pure: every call takes `now`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// The persistent keepalive a gateway sets toward every peer, so that each
/// node hears from each of its gateways at least this often, even on an idle
/// session. Only the gateway side sends it: kernel WireGuard and
/// wireguard-go push a peer's keepalive timer back on every packet received
/// from it, so two sides at equal intervals can silence each other, and the
/// side judging liveness would then see nothing move. (A node that is a
/// gateway and also a client of another gateway sends it too; two gateways
/// on kernel devices can then still silence one of them toward the other.)
pub const GATEWAY_KEEPALIVE: u16 = 1;
/// A session that received nothing for this long is dead: four keepalives
/// missed, plus slack for a pass that runs late.
pub const DEAD_AFTER: Duration = Duration::from_secs(4 * GATEWAY_KEEPALIVE as u64 + 1);
/// WireGuard's REJECT_AFTER_TIME: a session older than this carries nothing.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// One candidate of one prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Candidate {
    pub priority: u16,
    pub node: String,
}

/// The current holder of a prefix and why, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// `None`: no candidate was ever healthy.
    pub active: Option<String>,
    /// Whether the active one is healthy right now.
    pub healthy: bool,
}

/// The chooser's memory across passes.
#[derive(Debug, Default)]
pub struct Chooser {
    active: BTreeMap<IpNet, String>,
    /// Since when each (prefix, node) has been healthy without a break.
    healthy_since: BTreeMap<(IpNet, String), Instant>,
    failovers: u64,
}

impl Chooser {
    /// Chooses the holder of `prefix` among `candidates` (any order);
    /// `healthy(node)` says whether a node is fit to carry it now.
    pub fn choose(
        &mut self,
        now: Instant,
        prefix: IpNet,
        candidates: &[Candidate],
        failback: Duration,
        healthy: impl Fn(&str) -> bool,
    ) -> Choice {
        let mut sorted = candidates.to_vec();
        sorted.sort();
        // Nodes no longer candidates lose their history: one re-added later
        // must be healthy for the failback time again before it counts.
        self.healthy_since
            .retain(|(p, n), _| *p != prefix || sorted.iter().any(|c| &c.node == n));
        for c in &sorted {
            let key = (prefix, c.node.clone());
            if healthy(&c.node) {
                self.healthy_since.entry(key).or_insert(now);
            } else {
                self.healthy_since.remove(&key);
            }
        }
        let rank = |node: &str| sorted.iter().position(|c| c.node == node);
        let current = self
            .active
            .get(&prefix)
            .filter(|n| rank(n).is_some())
            .cloned();
        let current_healthy = current.as_deref().is_some_and(&healthy);
        let best = sorted.iter().find(|c| healthy(&c.node));
        let next = match (current, best) {
            (cur, None) => cur,
            (Some(cur), Some(_)) if current_healthy => {
                // Failback: the best candidate ranked above the current one
                // that has been healthy for the failback time (a flapping
                // better one does not hold back a settled one below it).
                let settled = sorted.iter().take_while(|c| c.node != cur).find(|c| {
                    self.healthy_since
                        .get(&(prefix, c.node.clone()))
                        .is_some_and(|since| now.saturating_duration_since(*since) >= failback)
                });
                Some(settled.map_or(cur, |c| c.node.clone()))
            }
            (_, Some(best)) => Some(best.node.clone()),
        };
        match &next {
            Some(n) => {
                if let Some(old) = self.active.insert(prefix, n.clone()) {
                    if &old != n {
                        self.failovers += 1;
                    }
                }
            }
            None => {
                self.active.remove(&prefix);
            }
        }
        Choice {
            healthy: next.as_deref().is_some_and(&healthy),
            active: next,
        }
    }

    /// Whether this chooser has decided `prefix` before (since start).
    pub fn knows(&self, prefix: &IpNet) -> bool {
        self.active.contains_key(prefix)
    }

    /// Takes `node` as the current holder of `prefix` when nothing is known
    /// about it yet: what the device says after an agent restart, so a
    /// restarted agent neither moves a prefix back to a gateway it had
    /// failed over from nor skips the failback damping.
    pub fn seed(&mut self, prefix: IpNet, node: &str) {
        self.active.entry(prefix).or_insert_with(|| node.to_owned());
    }

    /// Forgets prefixes no longer granted.
    pub fn retain(&mut self, keep: impl Fn(&IpNet) -> bool) {
        self.active.retain(|p, _| keep(p));
        self.healthy_since.retain(|(p, _), _| keep(p));
    }

    /// How many times a prefix moved from one gateway to another.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }
}

/// Whether each node's session is alive, from the device's counters: a
/// session is alive while its last handshake is younger than
/// [`SESSION_LIFETIME`] and its receive counter moved within
/// [`DEAD_AFTER`] (the gateway's keepalives make it move on an idle but live
/// session). Keyed by node, not by key: when a node's key rotates, its new
/// peer's counter (starting again) counts as movement, not as a new,
/// unknown session.
#[derive(Debug, Default)]
pub struct Liveness {
    seen: BTreeMap<String, (u64, Instant)>,
}

impl Liveness {
    /// Records one reading of a peer; `handshake_age` is `None` when the
    /// device never completed a handshake with it.
    pub fn observe(
        &mut self,
        now: Instant,
        node: &str,
        rx_bytes: u64,
        handshake_age: Option<Duration>,
    ) {
        if handshake_age.is_none() {
            self.seen.remove(node);
            return;
        }
        match self.seen.get_mut(node) {
            Some((rx, _)) if *rx == rx_bytes => {}
            Some(entry) => *entry = (rx_bytes, now),
            // First reading (an agent that just started): alive for now, and
            // judged from here.
            None => {
                self.seen.insert(node.to_owned(), (rx_bytes, now));
            }
        }
        if handshake_age.is_some_and(|age| age >= SESSION_LIFETIME) {
            // Stale session: mark it as long silent.
            if let Some(entry) = self.seen.get_mut(node) {
                entry.1 = now.checked_sub(DEAD_AFTER).unwrap_or(entry.1);
            }
        }
    }

    pub fn alive(&self, now: Instant, node: &str) -> bool {
        self.seen
            .get(node)
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) < DEAD_AFTER)
    }

    /// Forgets nodes no longer on the device.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn c(priority: u16, node: &str) -> Candidate {
        Candidate {
            priority,
            node: node.into(),
        }
    }

    #[test]
    fn fails_over_at_once_and_back_only_after_failback() {
        let prefix: IpNet = "192.0.2.0/24".parse().unwrap();
        let cands = [c(20, "n2"), c(10, "n1")];
        let fb = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut ch = Chooser::default();
        let up = |down: &'static [&str]| move |n: &str| !down.contains(&n);

        assert_eq!(
            ch.choose(t0, prefix, &cands, fb, up(&[])).active.as_deref(),
            Some("n1")
        );
        // n1 dies: n2 at once.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            ch.choose(t1, prefix, &cands, fb, up(&["n1"]))
                .active
                .as_deref(),
            Some("n2")
        );
        // n1 back: n2 keeps it for the failback time.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(
            ch.choose(t2, prefix, &cands, fb, up(&[])).active.as_deref(),
            Some("n2")
        );
        let t3 = t2 + Duration::from_secs(29);
        assert_eq!(
            ch.choose(t3, prefix, &cands, fb, up(&[])).active.as_deref(),
            Some("n2")
        );
        // A flap restarts n1's clock.
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(
            ch.choose(t4, prefix, &cands, fb, up(&["n1"]))
                .active
                .as_deref(),
            Some("n2")
        );
        let t5 = t4 + Duration::from_secs(20);
        assert_eq!(
            ch.choose(t5, prefix, &cands, fb, up(&[])).active.as_deref(),
            Some("n2")
        );
        let t6 = t5 + Duration::from_secs(30);
        assert_eq!(
            ch.choose(t6, prefix, &cands, fb, up(&[])).active.as_deref(),
            Some("n1")
        );
        assert_eq!(ch.failovers(), 2);
    }

    #[test]
    fn no_healthy_candidate_keeps_the_last_winner() {
        let prefix: IpNet = "192.0.2.0/24".parse().unwrap();
        let cands = [c(10, "n1"), c(20, "n2")];
        let t0 = Instant::now();
        let mut ch = Chooser::default();
        assert_eq!(
            ch.choose(t0, prefix, &cands, Duration::ZERO, |_| false)
                .active,
            None
        );
        ch.choose(t0, prefix, &cands, Duration::ZERO, |_| true);
        let choice = ch.choose(t0, prefix, &cands, Duration::ZERO, |_| false);
        assert_eq!(choice.active.as_deref(), Some("n1"));
        assert!(!choice.healthy);
        // A candidate removed from the grant loses the prefix.
        let choice = ch.choose(t0, prefix, &cands[1..], Duration::ZERO, |n| n == "n2");
        assert_eq!(choice.active.as_deref(), Some("n2"));
    }

    #[test]
    fn every_agent_picks_the_same_among_equals() {
        let prefix: IpNet = "192.0.2.0/24".parse().unwrap();
        let t0 = Instant::now();
        let mut winners = BTreeSet::new();
        for order in [[c(10, "b"), c(10, "a")], [c(10, "a"), c(10, "b")]] {
            let mut ch = Chooser::default();
            winners.insert(
                ch.choose(t0, prefix, &order, Duration::ZERO, |_| true)
                    .active,
            );
        }
        assert_eq!(winners.len(), 1);
    }

    #[test]
    fn liveness_needs_the_counter_to_move() {
        let key = "n1";
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.observe(t0, key, 100, Some(Duration::from_secs(1)));
        assert!(l.alive(t0, key));
        let t1 = t0 + DEAD_AFTER - Duration::from_secs(1);
        l.observe(t1, key, 100, Some(Duration::from_secs(10)));
        assert!(l.alive(t1, key));
        let t2 = t0 + DEAD_AFTER;
        l.observe(t2, key, 100, Some(Duration::from_secs(20)));
        assert!(!l.alive(t2, key));
        l.observe(t2, key, 164, Some(Duration::from_secs(20)));
        assert!(l.alive(t2, key));
        // A session past its lifetime is dead whatever the counter says.
        let t3 = t2 + Duration::from_secs(1);
        l.observe(t3, key, 200, Some(SESSION_LIFETIME));
        assert!(!l.alive(t3, key));
        // No handshake at all: dead.
        l.observe(t3, key, 300, None);
        assert!(!l.alive(t3, key));
    }

    #[test]
    fn a_re_added_candidate_waits_the_failback_time_again() {
        let prefix: IpNet = "192.0.2.0/24".parse().unwrap();
        let fb = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut ch = Chooser::default();
        let both = [c(10, "n1"), c(20, "n2")];
        ch.choose(t0, prefix, &both, fb, |n| n == "n2");
        // n1 healthy (and would be settled by t0 + 40) but removed meanwhile.
        ch.choose(t0 + Duration::from_secs(1), prefix, &both, fb, |_| true);
        ch.choose(t0 + Duration::from_secs(2), prefix, &both[1..], fb, |_| {
            true
        });
        let t = t0 + Duration::from_secs(40);
        assert_eq!(
            ch.choose(t, prefix, &both, fb, |_| true).active.as_deref(),
            Some("n2")
        );
        let t = t + fb;
        assert_eq!(
            ch.choose(t, prefix, &both, fb, |_| true).active.as_deref(),
            Some("n1")
        );
    }

    #[test]
    fn a_settled_candidate_takes_over_even_while_a_better_one_flaps() {
        let prefix: IpNet = "192.0.2.0/24".parse().unwrap();
        let fb = Duration::from_secs(10);
        let cands = [c(10, "n1"), c(20, "n2"), c(30, "n3")];
        let t0 = Instant::now();
        let mut ch = Chooser::default();
        ch.choose(t0, prefix, &cands, fb, |n| n == "n3");
        // n2 comes back for good, n1 flaps every second.
        for i in 1..=20u64 {
            let n1_up = i % 2 == 0;
            ch.choose(t0 + Duration::from_secs(i), prefix, &cands, fb, |n| {
                n == "n3" || n == "n2" || (n == "n1" && n1_up)
            });
        }
        assert_eq!(
            ch.choose(t0 + Duration::from_secs(21), prefix, &cands, fb, |n| n
                != "n1")
                .active
                .as_deref(),
            Some("n2")
        );
    }

    #[test]
    fn a_seeded_holder_is_kept_without_skipping_the_damping() {
        let prefix: IpNet = "192.0.2.0/24".parse().unwrap();
        let cands = [c(10, "n1"), c(20, "n2")];
        let t0 = Instant::now();
        let mut ch = Chooser::default();
        assert!(!ch.knows(&prefix));
        // After a restart the device says n2 holds it (n1 had died).
        ch.seed(prefix, "n2");
        assert_eq!(
            ch.choose(t0, prefix, &cands, Duration::from_secs(30), |_| true)
                .active
                .as_deref(),
            Some("n2")
        );
        assert_eq!(ch.failovers(), 0);
        ch.seed(prefix, "n1");
        assert_eq!(
            ch.choose(t0, prefix, &cands, Duration::from_secs(30), |_| true)
                .active
                .as_deref(),
            Some("n2"),
            "a seed never overrides a decision"
        );
    }
}
