//! Device peers vs desired peers -> the fewest changes, and a model of applying
//! them.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use ipnet::IpNet;

use super::{is_canonical, normalize_ips, normalize_keepalive, PeerConfig};
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
    },
}

/// The changes that turn the device's peers (`current`) into `desired`, and
/// nothing for a peer that already matches, so an unchanged plan writes nothing.
///
/// Order: removals, then updates, then adds, each sorted by public key. Removing
/// first releases allowed IPs that an updated or new peer may take over (on a real
/// device an allowed IP belongs to one peer, and giving it to another silently
/// moves it). The order is a pure function of the inputs, so logs and tests are
/// stable.
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

    removes.extend(updates);
    removes.extend(adds);
    removes
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
            ),
            PeerChange::Remove(key) => device.remove(key),
            PeerChange::Update {
                public_key,
                endpoint,
                allowed_ips,
                persistent_keepalive,
            } => device.set(
                *public_key,
                *endpoint,
                allowed_ips.as_deref(),
                *persistent_keepalive,
            ),
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
    if endpoint.is_none() && allowed_ips.is_none() && persistent_keepalive.is_none() {
        return None;
    }
    Some(PeerChange::Update {
        public_key: want.public_key,
        endpoint,
        allowed_ips,
        persistent_keepalive,
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
    ) {
        let peer = self.peers.entry(key).or_insert_with(|| PeerConfig {
            public_key: key,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        });
        if endpoint.is_some() {
            peer.endpoint = endpoint;
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
