//! When a node rotates its static key, and which step of a rotation comes
//! next: the pure half of the agent's rotation driver. No I/O and no clock:
//! every decision is a function of [`Inputs`] (the store's keys, what the
//! audit log already records, the handshakes the device reports, `now`), so
//! each path — schedule, manual trigger, confirmation, deadline, grace — is
//! tested in memory.
//!
//! A rotation of node A from key K1 to K2:
//!
//! 1. **Stage** when K1 is older than the policy's maximum age (minus this
//!    node's jitter, so a cluster installed in one go does not rotate at
//!    once) or an operator asked for it. A publishes `next-public-key`; its
//!    device holds K2 as a second identity and peers pre-accept it.
//! 2. **Confirm** each peer on cryptographic evidence only: a handshake
//!    between K2 and that peer's current key, completed after K2 was staged
//!    (the device reports it; only the holder of the peer's private key can
//!    complete one). Never on a timer.
//! 3. **Activate** when every current peer confirmed, or at the confirmation
//!    deadline anyway, recording who had not. On a device that cannot hold
//!    two identities (kernel WireGuard) there is nothing to confirm before:
//!    A switches first and peers follow when they see the new key.
//! 4. **End the grace period** after `grace` (in-flight sessions under K1
//!    are still decrypted meanwhile), then destroy K1.

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::Timestamp;

use super::rotation::{KeyMeta, Phase};
use super::PublicKey;

/// The rotation policy of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Rotate a key older than this (the cryptoperiod). `None`: never on a
    /// schedule (manual triggers still work).
    pub max_age: Option<Duration>,
    /// Up to this much earlier than `max_age`, by a per-node amount derived
    /// from the node name, so nodes keyed at the same time spread out.
    pub jitter: Duration,
    /// How long a staged key waits for every peer's confirmation before it
    /// is activated anyway.
    pub confirm_deadline: Duration,
    /// How long the previous key is kept after activation.
    pub grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(90 * 24 * 3600)),
            jitter: Duration::from_secs(24 * 3600),
            confirm_deadline: Duration::from_secs(10 * 60),
            // WireGuard's REJECT_AFTER_TIME: no session established under the
            // old key outlives this.
            grace: Duration::from_secs(180),
        }
    }
}

/// One completed handshake the device reports: between one of this node's
/// identities (`local`) and a peer's key (`remote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub local: PublicKey,
    pub remote: PublicKey,
    pub at: Timestamp,
}

/// A current peer: its node name and active public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub public_key: PublicKey,
}

/// Everything a decision depends on.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub now: Timestamp,
    pub node: &'a str,
    pub phase: Phase,
    pub active: &'a KeyMeta,
    /// Phase `Staged`: the next key; its `created` is when it was staged.
    pub staged: Option<&'a KeyMeta>,
    /// Phase `Activated`: when the activation happened (from the audit log).
    pub activated_at: Option<Timestamp>,
    /// An operator's request (`wgmesh.dev/rotate-requested` on the Node):
    /// honoured once, when it is newer than the active key.
    pub requested: Option<Timestamp>,
    pub peers: &'a [Peer],
    /// Peers whose confirmation of the staged key is already in the log.
    pub confirmed: &'a BTreeSet<String>,
    pub handshakes: &'a [Handshake],
    /// The device can hold the active and the next key at once.
    pub dual_identity: bool,
}

/// The next step, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Generate and stage the next key.
    Stage { reason: String },
    /// Record these peers' confirmations, each with its proof.
    Confirm(Vec<(String, String)>),
    /// Make the staged key active; `unconfirmed` names the peers that had
    /// not confirmed (empty: all had).
    Activate {
        unconfirmed: Vec<String>,
        reason: String,
    },
    /// The grace period is over: destroy the previous key.
    EndGrace { reason: String },
}

/// What to do now; `None` when nothing is due.
pub fn next_step(policy: &Policy, i: &Inputs<'_>) -> Option<Step> {
    match i.phase {
        Phase::Idle => stage_due(policy, i).map(|reason| Step::Stage { reason }),
        Phase::Staged => {
            let staged = i.staged?;
            let proofs = new_confirmations(i, staged, staged.created);
            if !proofs.is_empty() {
                return Some(Step::Confirm(proofs));
            }
            let unconfirmed: Vec<String> = i
                .peers
                .iter()
                .filter(|p| !i.confirmed.contains(&p.node))
                .map(|p| p.node.clone())
                .collect();
            if unconfirmed.is_empty() {
                return Some(Step::Activate {
                    unconfirmed,
                    reason: format!("every peer ({}) confirmed the next key", i.peers.len()),
                });
            }
            if !i.dual_identity {
                return Some(Step::Activate {
                    unconfirmed,
                    reason: "this device holds one identity (kernel WireGuard or another \
                             implementation): the node switches first and peers follow when \
                             they see the new key"
                        .into(),
                });
            }
            let waited = since(i.now, staged.created);
            (waited >= policy.confirm_deadline).then(|| Step::Activate {
                reason: format!(
                    "confirmation deadline ({}) passed with {} of {} peers unconfirmed",
                    crate::text::duration(policy.confirm_deadline.as_secs()),
                    unconfirmed.len(),
                    i.peers.len()
                ),
                unconfirmed,
            })
        }
        Phase::Activated => {
            let at = i.activated_at?;
            // A peer that had not confirmed before the switch (or any peer,
            // on a single-identity device) is confirmed by its first
            // handshake with the new active key: the evidence that it
            // followed.
            let proofs = new_confirmations(i, i.active, at);
            if !proofs.is_empty() {
                return Some(Step::Confirm(proofs));
            }
            (since(i.now, at) >= policy.grace).then(|| Step::EndGrace {
                reason: format!(
                    "grace period ({}) after activation ended",
                    crate::text::duration(policy.grace.as_secs())
                ),
            })
        }
    }
}

/// This node's share of the jitter: a stable fraction of `policy.jitter`
/// from the node name (FNV-1a), so restarts do not move it.
pub fn jitter_for(node: &str, jitter: Duration) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let secs = jitter.as_secs();
    if secs == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs(h % secs)
}

/// When the active key is due on the schedule (`None`: no schedule).
pub fn due_at(policy: &Policy, node: &str, active: &KeyMeta) -> Option<Timestamp> {
    let max = policy.max_age?;
    let early = jitter_for(node, policy.jitter.min(max / 2));
    let after = max.saturating_sub(early);
    let span = jiff::SignedDuration::try_from(after).ok()?;
    active.created.checked_add(span).ok()
}

fn stage_due(policy: &Policy, i: &Inputs<'_>) -> Option<String> {
    if let Some(req) = i.requested {
        if req > i.active.created && req <= i.now {
            return Some(format!(
                "rotation requested at {req:.0} (wgmesh.dev/rotate-requested)"
            ));
        }
    }
    let due = due_at(policy, i.node, i.active)?;
    (i.now >= due).then(|| {
        format!(
            "key generation {} reached its maximum age ({}, due {due:.0})",
            i.active.generation,
            policy
                .max_age
                .map(|d| crate::text::duration(d.as_secs()))
                .unwrap_or_default()
        )
    })
}

/// Proofs for peers not yet confirmed: a handshake between `key` (the
/// staged key, or the active one after activation) and the peer's current
/// key, completed at or after `after`.
fn new_confirmations(i: &Inputs<'_>, key: &KeyMeta, after: Timestamp) -> Vec<(String, String)> {
    let staged = key;
    i.peers
        .iter()
        .filter(|p| !i.confirmed.contains(&p.node))
        .filter_map(|p| {
            let h = i
                .handshakes
                .iter()
                .filter(|h| h.local == staged.public_key && h.remote == p.public_key)
                .filter(|h| h.at >= after)
                .max_by_key(|h| h.at)?;
            Some((
                p.node.clone(),
                format!(
                    "handshake between this node's key {} (generation {}) and {}'s key {} completed at {:.0}",
                    staged.fingerprint,
                    staged.generation,
                    p.node,
                    p.public_key.fingerprint(),
                    h.at
                ),
            ))
        })
        .collect()
}

fn since(now: Timestamp, then: Timestamp) -> Duration {
    Duration::from_secs(now.as_second().saturating_sub(then.as_second()).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn meta(generation: u64, created: &str) -> KeyMeta {
        KeyMeta::new(generation, created.parse().unwrap(), key())
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        Policy {
            max_age: Some(Duration::from_secs(90 * 86400)),
            jitter: Duration::ZERO,
            confirm_deadline: Duration::from_secs(600),
            grace: Duration::from_secs(180),
        }
    }

    struct World {
        active: KeyMeta,
        staged: Option<KeyMeta>,
        peers: Vec<Peer>,
        confirmed: BTreeSet<String>,
        handshakes: Vec<Handshake>,
    }

    impl World {
        fn new() -> Self {
            Self {
                active: meta(1, "2026-01-01T00:00:00Z"),
                staged: None,
                peers: vec![
                    Peer {
                        node: "b".into(),
                        public_key: key(),
                    },
                    Peer {
                        node: "c".into(),
                        public_key: key(),
                    },
                ],
                confirmed: BTreeSet::new(),
                handshakes: Vec::new(),
            }
        }

        fn inputs(&self, now: &str, phase: Phase) -> Inputs<'_> {
            Inputs {
                now: t(now),
                node: "a",
                phase,
                active: &self.active,
                staged: self.staged.as_ref(),
                activated_at: None,
                requested: None,
                peers: &self.peers,
                confirmed: &self.confirmed,
                handshakes: &self.handshakes,
                dual_identity: true,
            }
        }
    }

    #[test]
    fn a_young_key_is_left_alone_and_an_old_one_is_staged() {
        let w = World::new();
        assert_eq!(
            next_step(&policy(), &w.inputs("2026-03-01T00:00:00Z", Phase::Idle)),
            None
        );
        match next_step(&policy(), &w.inputs("2026-04-02T00:00:00Z", Phase::Idle)) {
            Some(Step::Stage { reason }) => assert!(reason.contains("maximum age"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let never = Policy {
            max_age: None,
            ..policy()
        };
        assert_eq!(
            next_step(&never, &w.inputs("2030-01-01T00:00:00Z", Phase::Idle)),
            None
        );
    }

    #[test]
    fn a_request_newer_than_the_key_stages_once() {
        let w = World::new();
        let mut i = w.inputs("2026-01-05T00:00:00Z", Phase::Idle);
        i.requested = Some(t("2026-01-04T00:00:00Z"));
        assert!(matches!(next_step(&policy(), &i), Some(Step::Stage { .. })));
        // A request older than the active key was already served.
        i.requested = Some(t("2025-12-31T00:00:00Z"));
        assert_eq!(next_step(&policy(), &i), None);
    }

    #[test]
    fn jitter_is_stable_per_node_and_within_bounds() {
        let j = Duration::from_secs(86400);
        assert_eq!(jitter_for("node-1", j), jitter_for("node-1", j));
        let spread: BTreeSet<u64> = (0..50)
            .map(|n| jitter_for(&format!("node-{n}"), j).as_secs())
            .collect();
        assert!(spread.len() > 40, "nodes spread out: {spread:?}");
        assert!(spread.iter().all(|s| *s < 86400));
        assert_eq!(jitter_for("x", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn peers_confirm_only_on_a_handshake_under_the_next_key_after_staging() {
        let mut w = World::new();
        w.staged = Some(meta(2, "2026-04-01T00:00:00Z"));
        let next = w.staged.as_ref().unwrap().public_key;
        let (b, c) = (w.peers[0].public_key, w.peers[1].public_key);
        // Under the old key, or before staging: no proof.
        w.handshakes = vec![
            Handshake {
                local: w.active.public_key,
                remote: b,
                at: t("2026-04-01T00:01:00Z"),
            },
            Handshake {
                local: next,
                remote: c,
                at: t("2026-03-31T23:59:00Z"),
            },
        ];
        assert_eq!(
            next_step(&policy(), &w.inputs("2026-04-01T00:02:00Z", Phase::Staged)),
            None
        );
        w.handshakes.push(Handshake {
            local: next,
            remote: b,
            at: t("2026-04-01T00:01:30Z"),
        });
        match next_step(&policy(), &w.inputs("2026-04-01T00:02:00Z", Phase::Staged)) {
            Some(Step::Confirm(proofs)) => {
                assert_eq!(proofs.len(), 1);
                assert_eq!(proofs[0].0, "b");
                assert!(proofs[0].1.contains("completed at 2026-04-01T00:01:30Z"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn activation_waits_for_every_peer_or_the_deadline() {
        let mut w = World::new();
        w.staged = Some(meta(2, "2026-04-01T00:00:00Z"));
        w.confirmed.insert("b".into());
        assert_eq!(
            next_step(&policy(), &w.inputs("2026-04-01T00:05:00Z", Phase::Staged)),
            None
        );
        match next_step(&policy(), &w.inputs("2026-04-01T00:10:00Z", Phase::Staged)) {
            Some(Step::Activate {
                unconfirmed,
                reason,
            }) => {
                assert_eq!(unconfirmed, vec!["c".to_string()]);
                assert!(reason.contains("deadline"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        w.confirmed.insert("c".into());
        assert!(matches!(
            next_step(&policy(), &w.inputs("2026-04-01T00:05:00Z", Phase::Staged)),
            Some(Step::Activate { unconfirmed, .. }) if unconfirmed.is_empty()
        ));
    }

    #[test]
    fn a_single_identity_device_switches_first() {
        let mut w = World::new();
        w.staged = Some(meta(2, "2026-04-01T00:00:00Z"));
        let mut i = w.inputs("2026-04-01T00:00:01Z", Phase::Staged);
        i.dual_identity = false;
        match next_step(&policy(), &i) {
            Some(Step::Activate { unconfirmed, .. }) => assert_eq!(unconfirmed.len(), 2),
            other => panic!("{other:?}"),
        }
        w.staged = None;
    }

    #[test]
    fn after_activation_a_peer_is_confirmed_by_its_first_handshake_with_the_new_key() {
        let mut w = World::new();
        let b = w.peers[0].public_key;
        w.confirmed.insert("c".into());
        w.handshakes = vec![
            // Before the activation: no proof of following.
            Handshake {
                local: w.active.public_key,
                remote: b,
                at: t("2026-04-01T00:00:00Z"),
            },
        ];
        let mut i = w.inputs("2026-04-01T00:01:00Z", Phase::Activated);
        i.activated_at = Some(t("2026-04-01T00:00:30Z"));
        assert_eq!(next_step(&policy(), &i), None);
        w.handshakes.push(Handshake {
            local: w.active.public_key,
            remote: b,
            at: t("2026-04-01T00:00:40Z"),
        });
        let mut i = w.inputs("2026-04-01T00:01:00Z", Phase::Activated);
        i.activated_at = Some(t("2026-04-01T00:00:30Z"));
        match next_step(&policy(), &i) {
            Some(Step::Confirm(p)) => assert_eq!(p[0].0, "b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_grace_period_ends_after_grace() {
        let w = World::new();
        let mut i = w.inputs("2026-04-01T00:02:00Z", Phase::Activated);
        i.activated_at = Some(t("2026-04-01T00:00:00Z"));
        assert_eq!(next_step(&policy(), &i), None);
        i.now = t("2026-04-01T00:03:00Z");
        assert!(matches!(
            next_step(&policy(), &i),
            Some(Step::EndGrace { .. })
        ));
        // Unknown activation time (a log without it): wait, never guess.
        i.activated_at = None;
        assert_eq!(next_step(&policy(), &i), None);
    }
}
