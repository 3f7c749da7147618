//! Records + local config -> peers, routes and exclusions.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;

use super::{
    normalize_ips, normalize_keepalive, overlaps, DesiredPeer, Excluded, Exclusion, MeshConfig,
    PeerConfig, Plan, Route,
};
use crate::keys::PublicKey;
use crate::node::{NodeRecord, Rejected};

/// Computes the peers and routes this node should have from every Node's record.
///
/// Rules, in the order they are applied to each remote node:
/// 1. A node that failed validation is excluded with its errors.
/// 2. A node announcing the local node's public key, claiming a pod CIDR outside
///    the cluster CIDRs, or overlapping the local node's pod CIDRs is excluded:
///    the local node always keeps what is its own.
/// 3. Conflicts between remote nodes (one public key on two nodes; pod CIDRs where
///    one contains the other) go to the older Node: nodes are admitted greedily in
///    order of `created` (oldest first, a missing timestamp counting as newest),
///    ties broken by name, and a node that conflicts with an already admitted one
///    is excluded. An excluded node never excludes anyone else, so a newcomer
///    cannot knock out an established node by claiming its CIDRs or key.
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
/// The output depends only on the *set* of entries, not their order. An entry
/// repeated verbatim counts once; a name appearing with different contents is
/// excluded as [`Exclusion::AmbiguousName`] (fail closed), or, for the local
/// node, leaves [`Plan::local`] empty.
///
/// Runs in O(n log n): keys go through a hash map and CIDR conflicts through an
/// ordered map of the (disjoint) address ranges admitted so far.
pub fn plan(cfg: &MeshConfig, nodes: &[Result<NodeRecord, Rejected>]) -> Plan {
    let mut local = None;
    let mut excluded = Vec::new();
    let mut candidates: Vec<&NodeRecord> = Vec::with_capacity(nodes.len());

    // Group entries by name. The map's iteration order does not reach the output:
    // candidates are sorted by age and exclusions by name below, both total
    // orders once names are unique. (Hashing is cheaper here than sorting by
    // name, which is most of the string comparing a plan would otherwise do.)
    let mut by_name: HashMap<&str, Group<'_>> = HashMap::with_capacity(nodes.len());
    for entry in nodes {
        by_name
            .entry(entry_name(entry))
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

    let routes = routes(cfg);
    let cluster: Vec<IpNet> = routes.iter().map(|r| r.destination).collect();
    let mut admission = Admission {
        local_key: local.as_ref().map(|r: &NodeRecord| r.public_key),
        local_cidrs: local.as_ref().map_or(&[][..], |r| &r.pod_cidrs[..]),
        cluster: &cluster,
        keys: HashMap::with_capacity(candidates.len()),
        claims: Claims::default(),
    };
    let mut peers = Vec::with_capacity(candidates.len());
    for record in candidates {
        let mut allowed_ips = record.pod_cidrs.clone();
        normalize_ips(&mut allowed_ips);
        match admission.check(record.public_key, &allowed_ips) {
            Err(reason) => excluded.push(Excluded {
                node: record.name.clone(),
                reason,
            }),
            Ok(()) => {
                admission.admit(&record.name, record.public_key, &allowed_ips);
                peers.push(DesiredPeer {
                    node: record.name.clone(),
                    config: PeerConfig {
                        public_key: record.public_key,
                        endpoint: Some(record.endpoint),
                        allowed_ips,
                        persistent_keepalive: normalize_keepalive(
                            record.persistent_keepalive.or(cfg.default_keepalive),
                        ),
                    },
                });
            }
        }
    }

    peers.sort_unstable_by_key(|p| p.config.public_key);
    excluded.sort_unstable_by(|a, b| a.node.cmp(&b.node));
    Plan {
        local,
        peers,
        routes,
        excluded,
    }
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
    local_key: Option<PublicKey>,
    local_cidrs: &'a [IpNet],
    cluster: &'a [IpNet],
    keys: HashMap<PublicKey, &'a str>,
    claims: Claims<'a>,
}

impl<'a> Admission<'a> {
    /// Why a node with this key and these (canonical, sorted) CIDRs may not be
    /// admitted now, if it may not. Checks about the node alone and the local node
    /// come before conflicts with other remote nodes.
    fn check(&self, key: PublicKey, cidrs: &[IpNet]) -> Result<(), Exclusion> {
        if self.local_key == Some(key) {
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
        if let Some(kept) = self.keys.get(&key) {
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
        Ok(())
    }

    fn admit(&mut self, node: &'a str, key: PublicKey, cidrs: &[IpNet]) {
        self.keys.insert(key, node);
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
