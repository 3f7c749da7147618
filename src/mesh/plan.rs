//! Records + local config -> peers, routes and exclusions.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{
    normalize_ips, normalize_keepalive, overlaps, DesiredPeer, Excluded, Exclusion, MeshConfig,
    PeerConfig, Plan, Route,
};
use crate::keys::PublicKey;
use crate::node::{NodeRecord, Rejected};

/// Why an admitted node's `next-public-key` is not its peer's successor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SuccessorConflict {
    /// A device never holds its own key as a peer's (the kernel would even
    /// remove the peer at the switch).
    #[error("it is this node's own public key")]
    LocalKey,
    /// This node's own staged key: once activated it would be its own peer.
    #[error("it is this node's own next public key")]
    LocalNextKey,
    /// Another Node's active key: accepting it would let that node speak for
    /// this one.
    #[error("it is the public key of node {node}")]
    KeyOfNode { node: String },
    /// Two nodes stage the same key: neither gets it (fail closed).
    #[error("node {node} announces the same next public key")]
    NextKeyOfNode { node: String },
}

/// An admitted node whose `next-public-key` was left out, for a log line of
/// the form `node X: next-public-key K ignored: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuccessorIgnored {
    pub node: String,
    pub next_public_key: PublicKey,
    pub reason: SuccessorConflict,
}

/// Computes the peers and routes this node should have from every Node's record.
///
/// Rules, in the order they are applied to each remote node:
/// 1. A node that failed validation is excluded with its errors.
/// 2. A node announcing the local node's public key (the key store's, see
///    [`MeshConfig::local_public_key`]), claiming a pod CIDR outside the cluster
///    CIDRs, overlapping the local node's pod CIDRs, or announcing the local
///    node's endpoint is excluded: the local node always keeps what is its own.
/// 3. Conflicts between remote nodes (one public key on two nodes; pod CIDRs where
///    one contains the other; one endpoint, address and port, on two nodes) go to
///    the older Node — except a public key this device has a handshake with from
///    one claimant's announced endpoint, which that claimant keeps
///    ([`MeshConfig::handshakes`]): nodes are admitted greedily in order of `created` (oldest
///    first, a missing timestamp counting as newest), ties broken by name, and a
///    node that conflicts with an already admitted one is excluded. An excluded
///    node never excludes anyone else, so a newcomer cannot knock out an
///    established node by claiming its CIDRs, key or endpoint.
/// 4. An admitted node's peer also allows a host route for each of its
///    [`NodeRecord::node_ips`], so that a reply from the node's own address (a
///    hostNetwork pod answering a pod) passes cryptokey routing. An address the
///    local node holds, that lies in a cluster CIDR or the local pod CIDRs, or
///    that an older admitted node already got, is left out of this peer's
///    allowed IPs; that costs the node nothing else (it is still admitted).
///
/// "Older wins" is decided from data every agent sees identically, so every agent
/// not itself party to a conflict excludes the same node. (The two parties each
/// keep their own key and CIDRs by rule 2, so each drops the other: neither gets
/// a tunnel to the node it conflicts with, which is the fail-closed outcome.)
///
/// A pod CIDR outside every cluster CIDR would get no route into the tunnel, so
/// with no cluster CIDRs configured every node with pod CIDRs is excluded rather
/// than reached in plaintext.
///
/// 5. An admitted node's `next-public-key` becomes its peer's
///    [`PeerConfig::successor`] unless it is the local node's key or next key,
///    or any other Node's (valid record's) key or next key; then it is left out
///    and listed in [`Plan::ignored_successors`], and the node stays a peer
///    under its current key.
///
/// [`Plan::node_routes`] lists the node addresses of every remote entry, whatever
/// happened to it, because a node without a peer is exactly the one whose
/// addresses must still be routed into the tunnel and dropped there.
///
/// The output depends only on the *set* of entries, not their order. An entry
/// repeated verbatim counts once; a name appearing with different contents is
/// excluded as [`Exclusion::AmbiguousName`] (fail closed), or, for the local
/// node, leaves [`Plan::local`] empty.
///
/// Runs in O(n log n): keys, endpoints and node addresses go through hash maps
/// and CIDR conflicts through an ordered map of the (disjoint) address ranges
/// admitted so far.
pub fn plan(cfg: &MeshConfig, nodes: &[Result<NodeRecord, Rejected>]) -> Plan {
    let mut local = None;
    let mut excluded = Vec::new();
    let mut candidates: Vec<&NodeRecord> = Vec::with_capacity(nodes.len());
    let mut local_node_ips: Vec<IpAddr> = Vec::new();
    let mut remote_node_ips: Vec<IpAddr> = Vec::new();

    // Group entries by name. The map's iteration order does not reach the output:
    // candidates are sorted by age and exclusions by name below, both total
    // orders once names are unique. (Hashing is cheaper here than sorting by
    // name, which is most of the string comparing a plan would otherwise do.)
    let mut by_name: HashMap<&str, Group<'_>> = HashMap::with_capacity(nodes.len());
    for entry in nodes {
        let name = entry_name(entry);
        // Every entry's addresses, even a contradicting one's: they only ever
        // widen what is routed into the tunnel (remote) or kept from peers
        // (local), which is the fail-closed direction either way.
        let ips = entry_node_ips(entry).iter().map(|ip| ip.to_canonical());
        if name == cfg.local_node {
            local_node_ips.extend(ips);
        } else {
            remote_node_ips.extend(ips);
        }
        by_name
            .entry(name)
            .and_modify(|group| {
                group.entries += 1;
                group.consistent &= group.first == entry;
            })
            .or_insert(Group {
                first: entry,
                entries: 1,
                consistent: true,
            });
    }
    for (name, group) in by_name {
        if name == cfg.local_node {
            // The local node is never a peer and never listed as excluded: an
            // invalid own record (e.g. annotations not yet published) is the
            // agent's own business, not a peer problem.
            if group.consistent {
                local = group.first.as_ref().ok().cloned();
            }
            continue;
        }
        match group.first {
            _ if !group.consistent => excluded.push(Excluded {
                node: name.to_owned(),
                reason: Exclusion::AmbiguousName {
                    entries: group.entries,
                },
            }),
            Ok(record) => candidates.push(record),
            Err(rejected) => excluded.push(Excluded {
                node: name.to_owned(),
                reason: Exclusion::Invalid(rejected.clone()),
            }),
        }
    }

    candidates.sort_unstable_by(|a, b| age_order(a, b));
    local_node_ips.sort_unstable();
    local_node_ips.dedup();

    let routes = routes(cfg);
    let cluster: Vec<IpNet> = routes.iter().map(|r| r.destination).collect();
    let mut admission = Admission {
        local_name: &cfg.local_node,
        // The key store's key, not the API cache's copy of it, when the agent
        // has one (see `MeshConfig::local_public_key`).
        local_key: cfg
            .local_public_key
            .or(local.as_ref().map(|r: &NodeRecord| r.public_key)),
        local_endpoint: cfg.local_endpoint.or(local.as_ref().map(|r| r.endpoint)),
        local_cidrs: local.as_ref().map_or(&[][..], |r| &r.pod_cidrs[..]),
        local_ips: &local_node_ips,
        cluster: &cluster,
        keys: HashMap::with_capacity(candidates.len()),
        endpoints: HashMap::with_capacity(candidates.len()),
        claims: Claims::default(),
        node_ips: HashMap::new(),
        key_owners: HashMap::new(),
    };
    admission.key_owners = proven_key_owners(cfg, &candidates);
    let node_routes = admission.node_routes(remote_node_ips);
    let successors = Successors::new(nodes, &cfg.local_node, admission.local_key, local.as_ref());
    let mut ignored_successors = Vec::new();
    let mut peers = Vec::with_capacity(candidates.len());
    for record in candidates {
        let mut allowed_ips = record.pod_cidrs.clone();
        normalize_ips(&mut allowed_ips);
        match admission.check(record, &allowed_ips) {
            Err(reason) => excluded.push(Excluded {
                node: record.name.clone(),
                reason,
            }),
            Ok(()) => {
                admission.admit(record, &allowed_ips);
                allowed_ips.extend(admission.claim_node_ips(record));
                normalize_ips(&mut allowed_ips);
                let successor = record.next_public_key.and_then(|next| {
                    match successors.conflict(&record.name, next) {
                        None => Some(next),
                        Some(reason) => {
                            ignored_successors.push(SuccessorIgnored {
                                node: record.name.clone(),
                                next_public_key: next,
                                reason,
                            });
                            None
                        }
                    }
                });
                peers.push(DesiredPeer {
                    node: record.name.clone(),
                    config: PeerConfig {
                        public_key: record.public_key,
                        endpoint: Some(record.endpoint),
                        allowed_ips,
                        persistent_keepalive: normalize_keepalive(
                            record.persistent_keepalive.or(cfg.default_keepalive),
                        ),
                        successor,
                    },
                });
            }
        }
    }

    peers.sort_unstable_by_key(|p| p.config.public_key);
    excluded.sort_unstable_by(|a, b| a.node.cmp(&b.node));
    ignored_successors.sort_unstable_by(|a, b| a.node.cmp(&b.node));
    Plan {
        ignored_successors,
        local,
        peers,
        routes,
        excluded,
        node_routes,
        local_node_ips,
    }
}

/// For each public key that more than one candidate announces: the one claimant
/// this device's handshake with that key came from, if exactly one did — judged
/// first by the Node's addresses (`status.addresses`, which the kubelet writes
/// and an agent's token cannot), then by the announced endpoint (which a copier
/// can copy too). Several claimants or none: no owner, and older wins.
fn proven_key_owners<'a>(
    cfg: &MeshConfig,
    candidates: &[&'a NodeRecord],
) -> HashMap<PublicKey, &'a str> {
    let mut owners = HashMap::new();
    if cfg.handshakes.is_empty() {
        return owners;
    }
    let mut by_key: HashMap<PublicKey, Vec<&'a NodeRecord>> = HashMap::new();
    for r in candidates {
        by_key.entry(r.public_key).or_default().push(r);
    }
    for (key, claimants) in by_key {
        if claimants.len() < 2 {
            continue;
        }
        let Some(seen) = cfg.handshakes.get(&key) else {
            continue;
        };
        let by_address = |r: &&&NodeRecord| {
            r.node_ips
                .iter()
                .any(|ip| ip.to_canonical() == seen.ip().to_canonical())
        };
        let by_endpoint = |r: &&&NodeRecord| r.endpoint == *seen;
        for proven in [
            claimants.iter().filter(by_address).collect::<Vec<_>>(),
            claimants.iter().filter(by_endpoint).collect(),
        ] {
            match proven[..] {
                [one] => {
                    owners.insert(key, one.name.as_str());
                    break;
                }
                [] => continue,
                _ => break,
            }
        }
    }
    owners
}

/// One route per cluster CIDR, all into the WireGuard interface, rather than one
/// per peer. This is what makes the mesh fail closed: traffic for a node that has
/// no (valid) peer still enters the interface, finds no peer whose allowed IPs
/// match, and is dropped by WireGuard's cryptokey routing instead of following the
/// default route out in plaintext. The local node's own pod CIDR is more specific
/// (the CNI's route) and is unaffected.
fn routes(cfg: &MeshConfig) -> Vec<Route> {
    let mut cidrs = cfg.cluster_cidrs.clone();
    normalize_ips(&mut cidrs);
    cidrs
        .into_iter()
        .map(|destination| Route {
            destination,
            interface: cfg.interface.clone(),
        })
        .collect()
}

fn entry_name(entry: &Result<NodeRecord, Rejected>) -> &str {
    match entry {
        Ok(record) => &record.name,
        Err(rejected) => &rejected.node,
    }
}

fn entry_node_ips(entry: &Result<NodeRecord, Rejected>) -> &[IpAddr] {
    match entry {
        Ok(record) => &record.node_ips,
        Err(rejected) => &rejected.node_ips,
    }
}

/// Who holds which key, for the successor rule: every valid record's active
/// and next key, whatever happened to the record in admission (a key an
/// excluded node claims is still not one to accept for somebody else).
struct Successors<'a> {
    local_key: Option<PublicKey>,
    local_next: Option<PublicKey>,
    keys: HashMap<PublicKey, BTreeSet<&'a str>>,
    next_keys: HashMap<PublicKey, BTreeSet<&'a str>>,
}

impl<'a> Successors<'a> {
    fn new(
        nodes: &'a [Result<NodeRecord, Rejected>],
        local_name: &str,
        local_key: Option<PublicKey>,
        local: Option<&NodeRecord>,
    ) -> Self {
        let mut keys: HashMap<PublicKey, BTreeSet<&str>> = HashMap::new();
        let mut next_keys: HashMap<PublicKey, BTreeSet<&str>> = HashMap::new();
        for record in nodes.iter().flatten() {
            if record.name == local_name {
                continue;
            }
            keys.entry(record.public_key)
                .or_default()
                .insert(&record.name);
            if let Some(next) = record.next_public_key {
                next_keys.entry(next).or_default().insert(&record.name);
            }
        }
        Self {
            local_key,
            local_next: local.and_then(|r| r.next_public_key),
            keys,
            next_keys,
        }
    }

    fn conflict(&self, node: &str, next: PublicKey) -> Option<SuccessorConflict> {
        if self.local_key == Some(next) {
            return Some(SuccessorConflict::LocalKey);
        }
        if self.local_next == Some(next) {
            return Some(SuccessorConflict::LocalNextKey);
        }
        let other = |names: Option<&BTreeSet<&str>>| {
            names.and_then(|n| {
                n.iter()
                    .find(|name| **name != node)
                    .map(|s| (*s).to_owned())
            })
        };
        if let Some(node) = other(self.keys.get(&next)) {
            return Some(SuccessorConflict::KeyOfNode { node });
        }
        if let Some(node) = other(self.next_keys.get(&next)) {
            return Some(SuccessorConflict::NextKeyOfNode { node });
        }
        None
    }
}

/// All the entries that share one name.
struct Group<'a> {
    first: &'a Result<NodeRecord, Rejected>,
    entries: usize,
    /// Whether every entry equals the first.
    consistent: bool,
}

/// Oldest first; a Node without a creation time counts as the newest (it cannot
/// prove it was first); equal times fall back to the name, which is unique.
fn age_order(a: &NodeRecord, b: &NodeRecord) -> Ordering {
    (a.created.is_none(), a.created, &a.name).cmp(&(b.created.is_none(), b.created, &b.name))
}

/// The state of greedy admission: what the local node holds and what the remote
/// nodes admitted so far hold.
struct Admission<'a> {
    local_name: &'a str,
    local_key: Option<PublicKey>,
    local_endpoint: Option<SocketAddr>,
    local_cidrs: &'a [IpNet],
    /// Sorted.
    local_ips: &'a [IpAddr],
    cluster: &'a [IpNet],
    keys: HashMap<PublicKey, &'a str>,
    endpoints: HashMap<SocketAddr, &'a str>,
    claims: Claims<'a>,
    /// Node addresses given to admitted peers so far, and to whom.
    node_ips: HashMap<IpAddr, &'a str>,
    /// Public keys several candidates announce where exactly one of them is
    /// proven by a handshake ([`MeshConfig::handshakes`]): that one's name.
    key_owners: HashMap<PublicKey, &'a str>,
}

impl<'a> Admission<'a> {
    /// Why this node, with these (canonical, sorted) pod CIDRs, may not be
    /// admitted now, if it may not. Checks about the node alone and the local node
    /// come before conflicts with other remote nodes.
    fn check(&self, record: &NodeRecord, cidrs: &[IpNet]) -> Result<(), Exclusion> {
        if self.local_key == Some(record.public_key) {
            return Err(Exclusion::SameKeyAsLocal);
        }
        if let Some(cidr) = cidrs
            .iter()
            .find(|c| !self.cluster.iter().any(|cluster| cluster.contains(*c)))
        {
            return Err(Exclusion::OutsideClusterCidrs { cidr: *cidr });
        }
        if let Some(cidr) = cidrs
            .iter()
            .find(|c| self.local_cidrs.iter().any(|l| overlaps(l, c)))
        {
            return Err(Exclusion::OverlapsLocal { cidr: *cidr });
        }
        if self.local_endpoint == Some(record.endpoint) {
            return Err(Exclusion::SameEndpointAsLocal {
                endpoint: record.endpoint,
                local: self.local_name.to_owned(),
            });
        }
        if let Some(owner) = self.key_owners.get(&record.public_key) {
            if *owner != record.name {
                return Err(Exclusion::DuplicateKey {
                    kept: (*owner).to_owned(),
                });
            }
        }
        if let Some(kept) = self.keys.get(&record.public_key) {
            return Err(Exclusion::DuplicateKey {
                kept: (*kept).to_owned(),
            });
        }
        for cidr in cidrs {
            if let Some(claim) = self.claims.overlapping(cidr) {
                return Err(Exclusion::CidrOverlap {
                    cidr: *cidr,
                    kept: claim.node.to_owned(),
                    kept_cidr: claim.cidr,
                });
            }
        }
        if let Some(with) = self.endpoints.get(&record.endpoint) {
            return Err(Exclusion::EndpointConflict {
                endpoint: record.endpoint,
                with: (*with).to_owned(),
            });
        }
        Ok(())
    }

    fn admit(&mut self, record: &'a NodeRecord, cidrs: &[IpNet]) {
        let node = record.name.as_str();
        self.keys.insert(record.public_key, node);
        self.endpoints.insert(record.endpoint, node);
        // A node may list a CIDR inside another of its own; only the wider one is
        // recorded, to keep the claims disjoint. In sorted order everything a CIDR
        // contains follows it directly, so comparing with the last one kept is
        // enough.
        let mut kept: Option<&IpNet> = None;
        for cidr in cidrs {
            if kept.is_some_and(|wider| wider.contains(cidr)) {
                continue;
            }
            self.claims.insert(node, *cidr);
            kept = Some(cidr);
        }
    }

    /// The host routes of an admitted node's addresses that it may have: not
    /// reserved (see [`Self::reserved`]) and not given to an older node
    /// already. A device gives an allowed IP to one peer only, so without this
    /// rule the newer node would silently take the address over.
    fn claim_node_ips(&mut self, record: &'a NodeRecord) -> Vec<IpNet> {
        let mut routes = Vec::new();
        for ip in record.node_ips.iter().map(|ip| ip.to_canonical()) {
            if self.reserved(ip) {
                continue;
            }
            let owner = *self.node_ips.entry(ip).or_insert(record.name.as_str());
            if owner == record.name {
                routes.push(IpNet::from(ip));
            }
        }
        routes
    }

    /// Host routes for the remote nodes' addresses (canonical), sorted and
    /// deduplicated, minus the reserved ones.
    fn node_routes(&self, mut remote: Vec<IpAddr>) -> Vec<IpNet> {
        remote.sort_unstable();
        remote.dedup();
        // `IpAddr` and host `IpNet`s order alike (family, then address), so the
        // result stays sorted.
        remote
            .into_iter()
            .filter(|ip| !self.reserved(*ip))
            .map(IpNet::from)
            .collect()
    }

    /// True for an address no remote node may have as a node address: the
    /// local node's own (its addresses, its endpoint's), and anything inside a
    /// cluster or local pod CIDR, which pod CIDR routing owns (a host route
    /// there would pull one pod's traffic away from where it lives). Decoding
    /// drops cluster-CIDR addresses already; this also covers records built
    /// another way and a local pod CIDR outside the cluster CIDRs.
    fn reserved(&self, ip: IpAddr) -> bool {
        self.local_ips.binary_search(&ip).is_ok()
            || self
                .local_endpoint
                .is_some_and(|e| e.ip().to_canonical() == ip)
            || self.cluster.iter().any(|c| c.contains(&ip))
            || self.local_cidrs.iter().any(|c| c.contains(&ip))
    }
}

/// Admitted pod CIDRs as address ranges keyed by (family, first address).
///
/// Admitted ranges are pairwise disjoint (that is what admission enforces), so
/// one ordered lookup replaces a scan: if any admitted range overlaps a new range
/// `[first, last]`, then the admitted range with the greatest start `<= last`
/// does (any range starting inside the new one would come after a range covering
/// `first`, and two admitted ranges cannot overlap), and it overlaps exactly
/// when it reaches `first`.
#[derive(Default)]
struct Claims<'a> {
    by_start: BTreeMap<(bool, u128), Claim<'a>>,
}

struct Claim<'a> {
    last: u128,
    cidr: IpNet,
    node: &'a str,
}

impl<'a> Claims<'a> {
    fn overlapping(&self, cidr: &IpNet) -> Option<&Claim<'a>> {
        let (v6, first, last) = span(cidr);
        let (&(family, _), claim) = self.by_start.range(..=(v6, last)).next_back()?;
        (family == v6 && claim.last >= first).then_some(claim)
    }

    fn insert(&mut self, node: &'a str, cidr: IpNet) {
        let (v6, first, last) = span(&cidr);
        self.by_start
            .insert((v6, first), Claim { last, cidr, node });
    }
}

/// (is IPv6, first address, last address) of a CIDR.
fn span(cidr: &IpNet) -> (bool, u128, u128) {
    match cidr {
        IpNet::V4(net) => (
            false,
            u128::from(u32::from(net.network())),
            u128::from(u32::from(net.broadcast())),
        ),
        IpNet::V6(net) => (true, u128::from(net.network()), u128::from(net.broadcast())),
    }
}
