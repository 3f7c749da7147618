//! The one validator between every route source and the device.
//!
//! A prefix reaches a peer's allowed IPs only through [`Validator::check`]:
//! - it must not be a default route, touch a cluster CIDR (pod CIDRs come from
//!   the API and always win) or cover any node's address or endpoint (the
//!   tunnel's own UDP would be routed into the tunnel);
//! - a static grant's prefix is the admin's word; only one grant per prefix
//!   (the older one);
//! - a learned prefix must lie inside a grant whose `learn.nodes` names the
//!   advertising node and be no more specific than its `maxLength`, or lie
//!   inside the advertiser's own pod CIDRs; never another node's pod CIDR or
//!   anything inside it;
//! - the next hop must be the advertising node itself (no third-party next
//!   hops);
//! - a session gets at most [`Validator::cap`] prefixes; beyond it the whole
//!   session's set is refused, not a lucky subset.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::grant::Grant;
use crate::mesh::overlaps;

/// Default per-session prefix cap.
pub const DEFAULT_CAP: usize = 1000;

/// Ranges no grant may touch: the host's own (loopback, "this network"),
/// link-local (a 169.254/16 grant would send every node's cloud-metadata
/// requests, credentials included, to the gateway), multicast and broadcast.
const SPECIAL_USE: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
    ("::/8", "loopback and unspecified"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Why a prefix was refused, worded for an Event or a log line of the form
/// `prefix P from S rejected: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("it is a default route, which no grant may carry")]
    DefaultRoute,
    #[error("it overlaps {range}, {what}, which never leaves a host through a gateway")]
    SpecialUse { range: IpNet, what: &'static str },
    #[error("it overlaps cluster CIDR {cidr}: pod CIDRs come from the API and always win")]
    ClusterCidr { cidr: IpNet },
    #[error("it overlaps pod CIDR {cidr} of node {owner}")]
    PodCidrOfOtherNode { cidr: IpNet, owner: String },
    #[error(
        "it covers node address {ip}: the tunnel's own packets would be routed into the tunnel"
    )]
    CoversNodeAddress { ip: IpAddr },
    #[error("MeshRoute {kept} (older) already grants this prefix")]
    DuplicateGrant { kept: String },
    #[error("no MeshRoute lets node {node} advertise it (spec.learn.nodes)")]
    NotGranted { node: String },
    #[error("it is more specific than /{max_length}, the longest MeshRoute {grant} accepts")]
    TooSpecific { grant: String, max_length: u8 },
    #[error("its next hop is {next_hop}, not the advertising node {node}")]
    ThirdPartyNextHop { next_hop: String, node: String },
    #[error("session {session} advertised {count} prefixes, over the cap of {cap}; all refused")]
    OverCap {
        session: String,
        count: usize,
        cap: usize,
    },
}

impl Rejection {
    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::DefaultRoute => "default-route",
            Rejection::SpecialUse { .. } => "special-use",
            Rejection::ClusterCidr { .. } => "cluster-cidr",
            Rejection::PodCidrOfOtherNode { .. } => "pod-cidr-of-other-node",
            Rejection::CoversNodeAddress { .. } => "covers-node-address",
            Rejection::DuplicateGrant { .. } => "duplicate-grant",
            Rejection::NotGranted { .. } => "not-granted",
            Rejection::TooSpecific { .. } => "too-specific",
            Rejection::ThirdPartyNextHop { .. } => "third-party-next-hop",
            Rejection::OverCap { .. } => "over-cap",
        }
    }
}

/// A prefix one node learned and advertises (over BGP, published on its
/// Node), before validation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Advertised {
    pub prefix: IpNet,
    /// The node that advertises it (the session's far end).
    pub node: String,
    /// The node its next hop resolves to, `None` when the next hop is no
    /// node's (a third party).
    pub next_hop_node: Option<String>,
}

/// One session's validated prefixes: accepted (with the grant that admits
/// each) and refused (with the reason).
pub type Learned<'g> = (Vec<(Advertised, &'g Grant)>, Vec<(Advertised, Rejection)>);

/// What validation needs to know about the cluster.
#[derive(Debug, Clone, Default)]
pub struct Validator {
    pub cluster_cidrs: Vec<IpNet>,
    /// Every Node's `spec.podCIDRs` (or accepted claim), by node name.
    pub pod_cidrs: BTreeMap<String, Vec<IpNet>>,
    /// Every node address and endpoint address in the cluster.
    pub node_ips: Vec<IpAddr>,
    /// Per-session cap ([`DEFAULT_CAP`] when built with [`Validator::new`]).
    pub cap: usize,
}

impl Validator {
    pub fn new(
        cluster_cidrs: Vec<IpNet>,
        pod_cidrs: BTreeMap<String, Vec<IpNet>>,
        node_ips: Vec<IpAddr>,
    ) -> Self {
        Self {
            cluster_cidrs,
            pod_cidrs,
            node_ips,
            cap: DEFAULT_CAP,
        }
    }

    /// The rules every prefix meets, whatever its source.
    fn common(&self, prefix: &IpNet, advertiser: Option<&str>) -> Result<(), Rejection> {
        if prefix.prefix_len() == 0 {
            return Err(Rejection::DefaultRoute);
        }
        if let Some((range, what)) = SPECIAL_USE.iter().find_map(|(r, what)| {
            let range: IpNet = r.parse().ok()?;
            overlaps(&range, prefix).then_some((range, *what))
        }) {
            return Err(Rejection::SpecialUse { range, what });
        }
        if let Some(ip) = self.node_ips.iter().find(|ip| prefix.contains(*ip)) {
            return Err(Rejection::CoversNodeAddress { ip: *ip });
        }
        for (owner, cidrs) in &self.pod_cidrs {
            if let Some(cidr) = cidrs.iter().find(|c| overlaps(c, prefix)) {
                // A node's own pod CIDR, advertised by itself, is merely
                // redundant; the caller drops it without a rejection.
                if Some(owner.as_str()) != advertiser {
                    return Err(Rejection::PodCidrOfOtherNode {
                        cidr: *cidr,
                        owner: owner.clone(),
                    });
                }
            }
        }
        if let Some(cidr) = self.cluster_cidrs.iter().find(|c| overlaps(c, prefix)) {
            if advertiser.is_none() {
                return Err(Rejection::ClusterCidr { cidr: *cidr });
            }
        }
        Ok(())
    }

    /// Static grants: each valid grant is kept, others are returned with the
    /// reason; two grants of one prefix go to the older (then by name).
    pub fn grants<'g>(&self, grants: &'g [Grant]) -> (Vec<&'g Grant>, Vec<(&'g Grant, Rejection)>) {
        let mut sorted: Vec<&Grant> = grants.iter().collect();
        sorted.sort_by(|a, b| {
            (a.created.is_none(), a.created, &a.name).cmp(&(
                b.created.is_none(),
                b.created,
                &b.name,
            ))
        });
        let mut kept: BTreeMap<IpNet, &Grant> = BTreeMap::new();
        let mut rejected = Vec::new();
        for g in sorted {
            if let Err(r) = self.common(&g.prefix, None) {
                rejected.push((g, r));
            } else if let Some(older) = kept.get(&g.prefix) {
                rejected.push((
                    g,
                    Rejection::DuplicateGrant {
                        kept: older.name.clone(),
                    },
                ));
            } else {
                kept.insert(g.prefix, g);
            }
        }
        (kept.into_values().collect(), rejected)
    }

    /// One session's learned prefixes (one node's, from one source): the
    /// accepted ones with the grant that admits each (`None` for a prefix
    /// inside the node's own pod CIDRs, which needs no grant but also adds
    /// nothing), and the refused ones with the reason.
    pub fn learned<'g>(
        &self,
        session: &str,
        grants: &[&'g Grant],
        adverts: &[Advertised],
    ) -> Learned<'g> {
        if adverts.len() > self.cap {
            let r = Rejection::OverCap {
                session: session.to_owned(),
                count: adverts.len(),
                cap: self.cap,
            };
            return (
                Vec::new(),
                adverts.iter().map(|a| (a.clone(), r.clone())).collect(),
            );
        }
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for a in adverts {
            match self.learned_one(grants, a) {
                Ok(Some(g)) => accepted.push((a.clone(), g)),
                Ok(None) => {}
                Err(r) => rejected.push((a.clone(), r)),
            }
        }
        (accepted, rejected)
    }

    fn learned_one<'g>(
        &self,
        grants: &[&'g Grant],
        a: &Advertised,
    ) -> Result<Option<&'g Grant>, Rejection> {
        if a.next_hop_node.as_deref() != Some(a.node.as_str()) {
            return Err(Rejection::ThirdPartyNextHop {
                next_hop: a
                    .next_hop_node
                    .clone()
                    .unwrap_or_else(|| "no node's address".into()),
                node: a.node.clone(),
            });
        }
        self.common(&a.prefix, Some(&a.node))?;
        let own = self
            .pod_cidrs
            .get(&a.node)
            .is_some_and(|c| c.iter().any(|c| c.contains(&a.prefix)));
        if own {
            return Ok(None);
        }
        if let Some(cidr) = self.cluster_cidrs.iter().find(|c| overlaps(c, &a.prefix)) {
            return Err(Rejection::ClusterCidr { cidr: *cidr });
        }
        // The most specific grant that covers the prefix and names the node
        // decides (a narrower grant can be stricter than a wide one).
        let mut covering: Vec<&&Grant> = grants
            .iter()
            .filter(|g| g.prefix.contains(&a.prefix))
            .filter(|g| g.learn.as_ref().is_some_and(|l| l.nodes.contains(&a.node)))
            .collect();
        covering.sort_by_key(|g| std::cmp::Reverse(g.prefix.prefix_len()));
        let Some(grant) = covering.first() else {
            return Err(Rejection::NotGranted {
                node: a.node.clone(),
            });
        };
        let max_length = grant.learn.as_ref().map_or(0, |l| l.max_length);
        if a.prefix.prefix_len() > max_length {
            return Err(Rejection::TooSpecific {
                grant: grant.name.clone(),
                max_length,
            });
        }
        Ok(Some(grant))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::grant::{Gateway, Learn};
    use std::time::Duration;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn validator() -> Validator {
        Validator::new(
            vec![net("10.244.0.0/16")],
            [
                ("n1".to_string(), vec![net("10.244.1.0/24")]),
                ("n2".to_string(), vec![net("10.244.2.0/24")]),
            ]
            .into(),
            vec!["172.18.0.1".parse().unwrap(), "172.18.0.2".parse().unwrap()],
        )
    }

    fn grant(name: &str, prefix: &str, learn: Option<(&[&str], u8)>) -> Grant {
        Grant {
            name: name.into(),
            created: None,
            prefix: net(prefix),
            gateways: vec![Gateway {
                priority: 10,
                node: "n1".into(),
            }],
            learn: learn.map(|(nodes, max_length)| Learn {
                nodes: nodes.iter().map(|n| n.to_string()).collect(),
                max_length,
                priority: 100,
            }),
            failback: Duration::from_secs(30),
        }
    }

    fn advert(prefix: &str, node: &str) -> Advertised {
        Advertised {
            prefix: net(prefix),
            node: node.into(),
            next_hop_node: Some(node.into()),
        }
    }

    #[test]
    fn static_grants_keep_off_pod_cidrs_node_addresses_and_default() {
        let v = validator();
        let grants = [
            grant("ok", "192.0.2.0/24", None),
            grant("default", "0.0.0.0/0", None),
            grant("cluster", "10.0.0.0/8", None),
            grant("inside-pods", "10.244.1.128/25", None),
            grant("underlay", "172.18.0.0/24", None),
        ];
        let (kept, rejected) = v.grants(&grants);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].name, "ok");
        let kinds: Vec<_> = rejected
            .iter()
            .map(|(g, r)| (g.name.as_str(), r.kind()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("cluster", "pod-cidr-of-other-node"),
                ("default", "default-route"),
                ("inside-pods", "pod-cidr-of-other-node"),
                ("underlay", "covers-node-address"),
            ]
        );
    }

    #[test]
    fn special_use_ranges_are_refused() {
        let v = validator();
        for p in [
            "169.254.169.254/32",
            "127.0.0.0/8",
            "224.0.0.0/24",
            "fe80::/64",
            "ff02::/16",
            "0.0.0.0/8",
        ] {
            let g = [grant("x", p, None)];
            let (kept, bad) = v.grants(&g);
            assert!(kept.is_empty(), "{p}");
            assert_eq!(bad[0].1.kind(), "special-use", "{p}");
        }
    }

    #[test]
    fn the_older_grant_keeps_a_prefix() {
        let mut a = grant("b-newer", "192.0.2.0/24", None);
        a.created = Some("2026-02-01T00:00:00Z".parse().unwrap());
        let mut b = grant("a-older", "192.0.2.0/24", None);
        b.created = Some("2026-01-01T00:00:00Z".parse().unwrap());
        let grants = [a, b];
        let (kept, rejected) = validator().grants(&grants);
        assert_eq!(kept[0].name, "a-older");
        assert_eq!(
            rejected[0].1,
            Rejection::DuplicateGrant {
                kept: "a-older".into()
            }
        );
    }

    #[test]
    fn learned_prefixes_need_a_grant_naming_the_node() {
        let v = validator();
        let grants = [grant("fabric", "198.51.100.0/22", Some((&["n1"], 24)))];
        let grants: Vec<&Grant> = grants.iter().collect();
        let adverts = [
            advert("198.51.100.0/24", "n1"),
            advert("198.51.100.0/25", "n1"),
            advert("203.0.113.0/24", "n1"),
            advert("10.244.2.0/24", "n1"),
            advert("10.244.2.0/25", "n1"),
            advert("10.244.1.0/25", "n1"),
            advert("0.0.0.0/0", "n1"),
            advert("172.18.0.0/16", "n1"),
        ];
        let (ok, bad) = v.learned("n1", &grants, &adverts);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].0.prefix, net("198.51.100.0/24"));
        let kinds: Vec<_> = bad
            .iter()
            .map(|(a, r)| (a.prefix.to_string(), r.kind()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("198.51.100.0/25".to_string(), "too-specific"),
                ("203.0.113.0/24".to_string(), "not-granted"),
                ("10.244.2.0/24".to_string(), "pod-cidr-of-other-node"),
                ("10.244.2.0/25".to_string(), "pod-cidr-of-other-node"),
                ("0.0.0.0/0".to_string(), "default-route"),
                ("172.18.0.0/16".to_string(), "covers-node-address"),
            ]
        );
        // n2 is not named by the grant.
        let (ok, bad) = v.learned("n2", &grants, &[advert("198.51.100.0/24", "n2")]);
        assert!(ok.is_empty());
        assert_eq!(bad[0].1.kind(), "not-granted");
    }

    #[test]
    fn next_hop_must_be_the_advertiser_and_the_cap_refuses_all() {
        let mut v = validator();
        let grants = [grant("fabric", "198.51.100.0/22", Some((&["n1"], 32)))];
        let grants: Vec<&Grant> = grants.iter().collect();
        let mut third = advert("198.51.100.0/24", "n1");
        third.next_hop_node = Some("n2".into());
        let (_, bad) = v.learned("n1", &grants, &[third]);
        assert_eq!(bad[0].1.kind(), "third-party-next-hop");

        v.cap = 3;
        let many: Vec<_> = (0..4)
            .map(|i| advert(&format!("198.51.100.{i}/32"), "n1"))
            .collect();
        let (ok, bad) = v.learned("n1", &grants, &many);
        assert!(ok.is_empty());
        assert_eq!(bad.len(), 4);
        assert!(bad.iter().all(|(_, r)| r.kind() == "over-cap"));
        let (ok, _) = v.learned("n1", &grants, &many[..3]);
        assert_eq!(ok.len(), 3);
    }
}
