//! Device peers vs desired peers -> the fewest changes, and a model of applying
//! them.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;

use ipnet::IpNet;

use super::{is_canonical, normalize_ips, normalize_keepalive, overlaps, PeerConfig};
use crate::keys::PublicKey;

/// One change to a WireGuard device's peer set; peers are named by public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Create the peer (its `allowed_ips` canonical; a `None` endpoint leaves the
    /// device to learn one from the peer's first handshake).
    Add(PeerConfig),
    Remove(PublicKey),
    /// Change only the fields that are `Some`; at least one always is.
    Update {
        public_key: PublicKey,
        /// `Some` = set this endpoint.
        endpoint: Option<SocketAddr>,
        /// `Some` = replace the allowed IPs with exactly these (canonical).
        allowed_ips: Option<Vec<IpNet>>,
        /// `Some` = set the keepalive; `Some(None)` turns it off.
        persistent_keepalive: Option<Option<u16>>,
        /// `Some` = set the successor key; `Some(None)` clears it.
        successor: Option<Option<PublicKey>>,
    },
    /// Rename the device's peer `from` to its successor `to.public_key`,
    /// keeping every session (those made with the successor become the
    /// peer's own), then give it `to`'s fields as [`PeerChange::Add`] would.
    /// Only for devices with successor support; see [`diff`].
    Promote {
        from: PublicKey,
        to: PeerConfig,
    },
}

/// The changes that turn the device's peers (`current`) into `desired`, and
/// nothing for a peer that already matches, so an unchanged plan writes nothing.
///
/// Order, each group sorted by public key: removals of peers whose allowed IPs
/// nobody takes over, then updates, then promotes, then adds, then the
/// *hand-over* removals: peers whose allowed IPs (some of them) an updated,
/// promoted or added peer takes. A device moves an allowed IP to whichever
/// peer is given it (one owner per prefix), so adding the new owner first
/// moves the prefixes atomically and removing the old peer afterwards takes
/// nothing the new one has; removing first would leave the prefixes without
/// a peer in between. That is how a node's key change reaches a device
/// without successor support (kernel, wireguard-go, boringtun-cli; option O1
/// of the rotation notes): the new key with the allowed IPs, then the old key
/// removed, in one change set. The order is a pure function of the inputs, so
/// logs and tests are stable.
///
/// A device peer that is no longer desired but whose `successor` is a desired
/// key the device does not have as a peer becomes one
/// [`PeerChange::Promote`] instead of a remove and an add: the device keeps
/// the sessions its successor already made (option O4).
///
/// `current` may list allowed IPs in any order and with host bits (devices report
/// them however they like); both sides are normalised before comparing. A desired
/// endpoint of `None` means "no opinion" and never causes an update: the device
/// may have learnt the peer's address by roaming. Keys are expected to be unique
/// on each side; if one repeats, its first occurrence is used.
pub fn diff(current: &[PeerConfig], desired: &[PeerConfig]) -> Vec<PeerChange> {
    let current = by_key(current);
    let desired = by_key(desired);

    let mut removes = Vec::new();
    let mut updates = Vec::new();
    let mut adds = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        let order = match (current.get(i), desired.get(j)) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(have), Some(want)) => have.public_key.cmp(&want.public_key),
        };
        match order {
            Ordering::Less => {
                removes.push(PeerChange::Remove(current[i].public_key));
                i += 1;
            }
            Ordering::Greater => {
                adds.push(PeerChange::Add(normalized(desired[j])));
                j += 1;
            }
            Ordering::Equal => {
                if let Some(update) = update(current[i], desired[j]) {
                    updates.push(update);
                }
                i += 1;
                j += 1;
            }
        }
    }

    // Promotes: a removed peer whose successor is being added.
    let mut promotes = Vec::new();
    if current.iter().any(|p| p.successor.is_some()) {
        let mut added: HashMap<PublicKey, usize> = HashMap::new();
        for (i, change) in adds.iter().enumerate() {
            if let PeerChange::Add(p) = change {
                added.insert(p.public_key, i);
            }
        }
        let mut promoted_adds = HashSet::new();
        let mut promoted_removes = HashSet::new();
        for change in &removes {
            let PeerChange::Remove(from) = change else {
                continue;
            };
            let Some(successor) = current
                .binary_search_by_key(from, |p| p.public_key)
                .ok()
                .and_then(|i| current[i].successor)
            else {
                continue;
            };
            let Some(&i) = added.get(&successor) else {
                continue;
            };
            if !promoted_adds.insert(i) {
                continue;
            }
            promoted_removes.insert(*from);
            if let PeerChange::Add(to) = &adds[i] {
                promotes.push(PeerChange::Promote {
                    from: *from,
                    to: to.clone(),
                });
            }
        }
        removes.retain(|c| !matches!(c, PeerChange::Remove(k) if promoted_removes.contains(k)));
        let mut i = 0;
        adds.retain(|_| {
            i += 1;
            !promoted_adds.contains(&(i - 1))
        });
        promotes.sort_by_key(|c| match c {
            PeerChange::Promote { to, .. } => to.public_key,
            _ => PublicKey::from_bytes([0; 32]),
        });
    }

    // Hand-overs: a removed peer whose allowed IPs someone else takes goes last.
    let taken: Vec<&IpNet> = updates
        .iter()
        .chain(&promotes)
        .chain(&adds)
        .flat_map(|c| match c {
            PeerChange::Add(p) | PeerChange::Promote { to: p, .. } => p.allowed_ips.iter(),
            PeerChange::Update {
                allowed_ips: Some(ips),
                ..
            } => ips.iter(),
            _ => (&[] as &[IpNet]).iter(),
        })
        .collect();
    let (late, early): (Vec<PeerChange>, Vec<PeerChange>) = if taken.is_empty() {
        (Vec::new(), removes)
    } else {
        removes.into_iter().partition(|c| {
            let PeerChange::Remove(key) = c else {
                return false;
            };
            current
                .binary_search_by_key(key, |p| p.public_key)
                .is_ok_and(|i| {
                    current[i]
                        .allowed_ips
                        .iter()
                        .any(|have| taken.iter().any(|t| overlaps(have, t)))
                })
        })
    };

    // An update that gains an allowed IP goes before the ones that only
    // lose some: a prefix moving between peers (route sync's failover) is
    // then taken over by the new peer (which moves it, atomically, on every
    // device) before the old peer's update drops it, never on no peer in
    // between on a device that applies one update at a time.
    let gains = |c: &PeerChange| match c {
        PeerChange::Update {
            public_key,
            allowed_ips: Some(ips),
            ..
        } => current
            .binary_search_by_key(public_key, |p| p.public_key)
            .is_ok_and(|i| ips.iter().any(|ip| !current[i].allowed_ips.contains(ip))),
        _ => false,
    };
    let (mut updates, losing): (Vec<PeerChange>, Vec<PeerChange>) =
        updates.into_iter().partition(|c| gains(c));
    updates.extend(losing);
    let mut out = early;
    out.extend(updates);
    out.extend(promotes);
    out.extend(adds);
    out.extend(late);
    out
}

/// Keeps endpoints the device learnt by roaming, unless the published one moved.
///
/// WireGuard moves a peer's endpoint to the source address of every
/// authenticated packet from it, which is how a peer behind NAT stays reachable
/// when its mapping changes. The planner always asks for the *published*
/// endpoint, so without this step every pass would yank a roamed peer back to an
/// address that may no longer reach it. For each desired peer with an endpoint:
///
/// - the device has no such peer, or the peer has no endpoint: the published
///   endpoint stays (a brand-new peer starts where its Node says);
/// - the published endpoint equals what the last pass published for that key
///   (`previous`): the device's current endpoint is desired instead, so the diff
///   leaves it alone;
/// - the published endpoint is different from last pass's, or the key was not
///   published last pass: the published one stays, so a node that really moved
///   (or whose `force-endpoint` an operator just set) is followed at once;
/// - `previous` is `None` (the first pass after the agent started, with no
///   memory): the device's endpoint is kept. An agent restart must not undo
///   roaming on a device that outlived it. The cost: a published endpoint that
///   changed while the agent was down is not applied until it changes again or
///   the peer sends from its new address (which the device then roams to; a
///   persistent keepalive on the peer's side makes that happen by itself).
///
/// A desired endpoint of `None` ("no opinion") is left as it is.
///
/// Returns what to pass as `previous` next time: the published endpoint of
/// every desired peer that has one. Commit it only once the changes built from
/// this pass's `desired` were applied: remembering an endpoint that never
/// reached the device would make the next pass take it as already set, and
/// keep the old one.
pub fn keep_roamed_endpoints(
    current: &[PeerConfig],
    desired: &mut [PeerConfig],
    previous: Option<&HashMap<PublicKey, SocketAddr>>,
) -> HashMap<PublicKey, SocketAddr> {
    let mut device: HashMap<PublicKey, Option<SocketAddr>> = HashMap::with_capacity(current.len());
    for peer in current {
        // First occurrence wins, as in `diff`.
        device.entry(peer.public_key).or_insert(peer.endpoint);
    }
    // A peer about to be promoted to its successor keeps its roamed endpoint
    // too: the successor is the same node.
    for peer in current {
        if let Some(successor) = peer.successor {
            device.entry(successor).or_insert(peer.endpoint);
        }
    }
    let mut published = HashMap::with_capacity(desired.len());
    for peer in desired.iter_mut() {
        let Some(want) = peer.endpoint else {
            continue;
        };
        published.insert(peer.public_key, want);
        let Some(&Some(have)) = device.get(&peer.public_key) else {
            continue;
        };
        let unchanged = previous.is_none_or(|p| p.get(&peer.public_key) == Some(&want));
        if unchanged {
            peer.endpoint = Some(have);
        }
    }
    published
}

/// Applies `changes` to `current` the way a WireGuard device would, without one:
/// for tests and the in-memory backend.
///
/// Device semantics modelled: an allowed IP given to one peer is taken away from
/// any other peer that had exactly that CIDR; `Update` of an unknown peer creates
/// it (as a UAPI `set` does); `Add` of a known peer overwrites its fields (keeping
/// its endpoint when the new one is `None`); `Remove` of an unknown peer does
/// nothing. The result is sorted by public key and normalised. `current` is taken
/// as given, even in a state no device could hold (one CIDR on two peers); only
/// the changes move CIDRs.
pub fn apply(current: &[PeerConfig], changes: &[PeerChange]) -> Vec<PeerConfig> {
    let mut device = Device::default();
    for peer in by_key(current) {
        let peer = normalized(peer);
        for ip in &peer.allowed_ips {
            device.owners.insert(*ip, peer.public_key);
        }
        device.peers.insert(peer.public_key, peer);
    }
    for change in changes {
        match change {
            PeerChange::Add(peer) => device.set(
                peer.public_key,
                peer.endpoint,
                Some(&peer.allowed_ips),
                Some(peer.persistent_keepalive),
                Some(peer.successor),
            ),
            PeerChange::Remove(key) => device.remove(key),
            PeerChange::Update {
                public_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
                successor,
            } => device.set(
                *public_key,
                *endpoint,
                allowed_ips.as_deref(),
                *persistent_keepalive,
                *successor,
            ),
            PeerChange::Promote { from, to } => {
                if device.promote(from, to.public_key) {
                    device.set(
                        to.public_key,
                        to.endpoint,
                        Some(&to.allowed_ips),
                        Some(to.persistent_keepalive),
                        Some(to.successor),
                    );
                }
            }
        }
    }
    device.peers.into_values().collect()
}

/// The update that turns `have` into `want`, if they differ.
fn update(have: &PeerConfig, want: &PeerConfig) -> Option<PeerChange> {
    let endpoint = want.endpoint.filter(|e| have.endpoint != Some(*e));
    let want_ips = canonical(&want.allowed_ips);
    let allowed_ips = (canonical(&have.allowed_ips) != want_ips).then(|| want_ips.into_owned());
    let want_keepalive = normalize_keepalive(want.persistent_keepalive);
    let persistent_keepalive = (normalize_keepalive(have.persistent_keepalive) != want_keepalive)
        .then_some(want_keepalive);
    let successor = (have.successor != want.successor).then_some(want.successor);
    if endpoint.is_none()
        && allowed_ips.is_none()
        && persistent_keepalive.is_none()
        && successor.is_none()
    {
        return None;
    }
    Some(PeerChange::Update {
        public_key: want.public_key,
        endpoint,
        allowed_ips,
        persistent_keepalive,
        successor,
    })
}

/// References sorted by key, first occurrence of each key kept.
fn by_key(peers: &[PeerConfig]) -> Vec<&PeerConfig> {
    let mut sorted: Vec<&PeerConfig> = peers.iter().collect();
    // Stable, so "first occurrence" means first in the caller's order.
    sorted.sort_by_key(|p| p.public_key);
    sorted.dedup_by_key(|p| p.public_key);
    sorted
}

/// The canonical form of a list of allowed IPs, borrowing when it already is.
fn canonical(ips: &[IpNet]) -> Cow<'_, [IpNet]> {
    if is_canonical(ips) {
        Cow::Borrowed(ips)
    } else {
        let mut owned = ips.to_vec();
        normalize_ips(&mut owned);
        Cow::Owned(owned)
    }
}

fn normalized(peer: &PeerConfig) -> PeerConfig {
    let mut peer = peer.clone();
    peer.normalize();
    peer
}

/// The peer table of a device, plus who owns each allowed IP.
#[derive(Default)]
struct Device {
    peers: BTreeMap<PublicKey, PeerConfig>,
    owners: HashMap<IpNet, PublicKey>,
}

impl Device {
    /// A UAPI-style `set` of one peer: creates it if needed, then changes the
    /// fields given (`endpoint` only when `Some`).
    fn set(
        &mut self,
        key: PublicKey,
        endpoint: Option<SocketAddr>,
        allowed_ips: Option<&[IpNet]>,
        keepalive: Option<Option<u16>>,
        successor: Option<Option<PublicKey>>,
    ) {
        let peer = self.peers.entry(key).or_insert_with(|| PeerConfig {
            public_key: key,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
            successor: None,
        });
        if endpoint.is_some() {
            peer.endpoint = endpoint;
        }
        if let Some(successor) = successor {
            peer.successor = successor;
        }
        if let Some(keepalive) = keepalive {
            peer.persistent_keepalive = normalize_keepalive(keepalive);
        }
        if let Some(ips) = allowed_ips {
            self.replace_allowed_ips(key, canonical(ips).into_owned());
        }
    }

    fn replace_allowed_ips(&mut self, key: PublicKey, ips: Vec<IpNet>) {
        let old = match self.peers.get_mut(&key) {
            Some(peer) => std::mem::take(&mut peer.allowed_ips),
            None => return,
        };
        for ip in &old {
            if self.owners.get(ip) == Some(&key) {
                self.owners.remove(ip);
            }
        }
        for ip in &ips {
            if let Some(previous) = self.owners.insert(*ip, key) {
                if previous != key {
                    if let Some(other) = self.peers.get_mut(&previous) {
                        other.allowed_ips.retain(|have| have != ip);
                    }
                }
            }
        }
        if let Some(peer) = self.peers.get_mut(&key) {
            peer.allowed_ips = ips;
        }
    }

    /// Renames `from` to `to` if `to` is its successor and not a peer
    /// already (what the data plane does); the peer keeps its allowed IPs.
    fn promote(&mut self, from: &PublicKey, to: PublicKey) -> bool {
        let eligible = self
            .peers
            .get(from)
            .is_some_and(|p| p.successor == Some(to))
            && !self.peers.contains_key(&to);
        if !eligible {
            return false;
        }
        let Some(mut peer) = self.peers.remove(from) else {
            return false;
        };
        peer.public_key = to;
        peer.successor = None;
        for ip in &peer.allowed_ips {
            self.owners.insert(*ip, to);
        }
        self.peers.insert(to, peer);
        true
    }

    fn remove(&mut self, key: &PublicKey) {
        if let Some(peer) = self.peers.remove(key) {
            for ip in &peer.allowed_ips {
                if self.owners.get(ip) == Some(key) {
                    self.owners.remove(ip);
                }
            }
        }
    }
}
