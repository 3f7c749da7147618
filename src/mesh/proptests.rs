//! Property tests over generated node sets and peer sets.
//!
//! Node sets draw from a deliberately small space (six keys, eight /22–/24
//! slots per family, four creation times) so that duplicate keys, overlapping and
//! identical CIDRs, equal ages and missing ages all happen often.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use jiff::Timestamp;
use proptest::prelude::*;

use super::tests::{key, net, rejected};
use super::*;
use crate::node::{NodeRecord, Rejected};

type Entry = Result<NodeRecord, Rejected>;

const LOCAL: &str = "n0";

fn cidr() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        6 => (0u8..8, 22u8..=24).prop_map(|(slot, len)| {
            IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(10, 0, slot, 0), len).trunc())
        }),
        3 => (0u16..8, 62u8..=64).prop_map(|(slot, len)| {
            let addr = Ipv6Addr::new(0xfd00, 0, 0, slot, 0, 0, 0, 0);
            IpNet::V6(Ipv6Net::new_assert(addr, len).trunc())
        }),
        // Outside the cluster CIDRs.
        1 => Just(net("192.168.0.0/24")),
    ]
}

/// Node addresses from a small pool, so that two nodes (or a node and the local
/// one) often list the same; 10.0.9.x lies inside the cluster CIDR.
fn node_ips() -> impl Strategy<Value = Vec<IpAddr>> {
    let ip = prop_oneof![
        6 => (1u8..8).prop_map(|h| IpAddr::from([198, 51, 100, h])),
        2 => (1u16..4).prop_map(|h| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, h])),
        1 => (1u8..3).prop_map(|h| IpAddr::from([10, 0, 9, h])),
    ];
    prop::collection::vec(ip, 0..3).prop_map(|mut ips| {
        ips.sort_unstable();
        ips.dedup();
        ips
    })
}

fn endpoint() -> impl Strategy<Value = SocketAddr> {
    // Few enough that two admitted nodes often share one.
    (1u8..8, 51820u16..51822).prop_map(|(host, port)| SocketAddr::from(([192, 0, 2, host], port)))
}

/// One Node entry; the name is assigned by position afterwards.
fn entry() -> impl Strategy<Value = Entry> {
    let record = (
        1u8..=6,
        prop::collection::vec(cidr(), 1..=2),
        prop::option::of(0i64..4),
        endpoint(),
        prop::option::of(1u16..3),
        node_ips(),
    )
        .prop_map(
            |(k, mut pod_cidrs, created, endpoint, keepalive, node_ips)| {
                pod_cidrs.sort_unstable();
                pod_cidrs.dedup();
                Ok(NodeRecord {
                    name: String::new(),
                    created: created.map(|s| Timestamp::from_second(s).unwrap()),
                    public_key: key(k),
                    key_generation: 1,
                    key_created: None,
                    next_public_key: None,
                    endpoint,
                    endpoint_forced: false,
                    pod_cidrs,
                    persistent_keepalive: keepalive,
                    node_ips,
                    audit_head: None,
                })
            },
        );
    let invalid = (prop::option::of(0i64..4), node_ips()).prop_map(|(created, node_ips)| {
        let mut rejected = rejected("", created.map(|s| Timestamp::from_second(s).unwrap()));
        rejected.node_ips = node_ips;
        Err(rejected)
    });
    prop_oneof![9 => record, 1 => invalid]
}

/// Entries named `n0`, `n1`, ...; `n0` is the local node, but when `local` is
/// false the config names a node that is not in the list. The config sometimes
/// carries the key store's key and the agent's endpoint, which may differ from
/// the local entry's.
fn node_set() -> impl Strategy<Value = (MeshConfig, Vec<Entry>)> {
    (
        prop::collection::vec(entry(), 0..14),
        any::<bool>(),
        prop::option::of(1u8..=6),
        prop::option::of(endpoint()),
    )
        .prop_map(|(mut entries, local, store_key, agent_endpoint)| {
            for (i, entry) in entries.iter_mut().enumerate() {
                let name = format!("n{i}");
                match entry {
                    Ok(record) => record.name = name,
                    Err(rejected) => rejected.node = name,
                }
            }
            let cfg = MeshConfig {
                local_node: if local { LOCAL } else { "absent" }.to_owned(),
                interface: "wgmesh0".to_owned(),
                cluster_cidrs: vec![net("10.0.0.0/16"), net("fd00::/48")],
                default_keepalive: Some(25),
                local_public_key: store_key.map(key),
                local_endpoint: agent_endpoint,
                handshakes: Default::default(),
            };
            (cfg, entries)
        })
}

/// A node set, and the same set shuffled with some entries repeated verbatim.
fn node_set_and_permutation() -> impl Strategy<Value = (MeshConfig, Vec<Entry>, Vec<Entry>)> {
    node_set().prop_flat_map(|(cfg, entries)| {
        let n = entries.len();
        let repeats = prop::collection::vec(0..n.max(1), 0..3);
        (Just(cfg), Just(entries.clone()), Just(entries), repeats).prop_flat_map(
            |(cfg, original, mut permuted, repeats)| {
                for i in repeats {
                    if let Some(entry) = original.get(i) {
                        permuted.push(entry.clone());
                    }
                }
                (Just(cfg), Just(original), Just(permuted).prop_shuffle())
            },
        )
    })
}

/// Device-style peers: keys from a small range (repeats possible), endpoints
/// sometimes missing, allowed IPs in any order with host bits, keepalive 0.
fn device_peers() -> impl Strategy<Value = Vec<PeerConfig>> {
    let ip = prop_oneof![
        (0u8..6, 0u8..4, 23u8..=25).prop_map(|(c, d, len)| {
            IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(10, 0, c, d), len))
        }),
        (0u16..4, 63u8..=64).prop_map(|(slot, len)| {
            IpNet::V6(Ipv6Net::new_assert(
                Ipv6Addr::new(0xfd00, 0, 0, slot, 0, 0, 0, 1),
                len,
            ))
        }),
    ];
    let peer = (
        1u8..=8,
        prop::option::of(endpoint()),
        prop::collection::vec(ip, 0..4),
        prop::option::of(0u16..3),
    )
        .prop_map(
            |(k, endpoint, allowed_ips, persistent_keepalive)| PeerConfig {
                public_key: key(k),
                endpoint,
                allowed_ips,
                persistent_keepalive,
                successor: None,
            },
        );
    prop::collection::vec(peer, 0..8)
}

/// What a plan could want: unique keys, sorted, canonical, no CIDR on two peers.
fn desired_peers(endpoints: bool) -> impl Strategy<Value = Vec<PeerConfig>> {
    device_peers().prop_map(move |peers| {
        let mut by_key = BTreeMap::new();
        for mut peer in peers {
            peer.normalize();
            by_key.entry(peer.public_key).or_insert(peer);
        }
        let mut taken = HashSet::new();
        by_key
            .into_values()
            .map(|mut peer| {
                peer.allowed_ips.retain(|ip| taken.insert(*ip));
                if endpoints && peer.endpoint.is_none() {
                    peer.endpoint = Some(SocketAddr::from(([198, 51, 100, 1], 51820)));
                }
                peer
            })
            .collect()
    })
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    super::overlaps(a, b)
}

fn name(entry: &Entry) -> &str {
    match entry {
        Ok(record) => &record.name,
        Err(rejected) => &rejected.node,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_address_is_allowed_to_two_peers_or_to_a_peer_and_the_local_node(
        (cfg, entries) in node_set()
    ) {
        let plan = plan(&cfg, &entries);
        let local_cidrs = plan.local.as_ref().map_or(&[][..], |r| &r.pod_cidrs[..]);
        for (i, a) in plan.peers.iter().enumerate() {
            let record = entries
                .iter()
                .flatten()
                .find(|r| r.name == a.node)
                .expect("a peer comes from a valid entry");
            for cidr in &a.config.allowed_ips {
                // Either one of its pod CIDRs (inside the cluster) or a host
                // route for one of its own node addresses (outside it).
                if record.node_ips.iter().any(|ip| IpNet::from(*ip) == *cidr) {
                    prop_assert!(!cfg.cluster_cidrs.iter().any(|c| c.contains(cidr)));
                    prop_assert!(!plan.local_node_ips.contains(&cidr.addr()));
                    prop_assert!(plan.node_routes.contains(cidr));
                } else {
                    prop_assert!(
                        cfg.cluster_cidrs.iter().any(|c| c.contains(cidr)),
                        "{cidr} of {} outside the cluster", a.node
                    );
                }
                prop_assert!(!local_cidrs.iter().any(|l| overlaps(l, cidr)));
                for b in &plan.peers[i + 1..] {
                    prop_assert!(
                        !b.config.allowed_ips.iter().any(|other| overlaps(cidr, other)),
                        "{} and {} both get {cidr}", a.node, b.node
                    );
                }
            }
        }
        let keys: Vec<_> = plan.peers.iter().map(|p| p.config.public_key).collect();
        prop_assert!(keys.windows(2).all(|w| w[0] < w[1]), "peers not sorted by unique key");
        let local_key = cfg.local_public_key.or(plan.local.as_ref().map(|r| r.public_key));
        prop_assert!(local_key.is_none_or(|k| !keys.contains(&k)));

        let mut endpoints: Vec<_> = plan.peers.iter().filter_map(|p| p.config.endpoint).collect();
        let local_endpoint = cfg.local_endpoint.or(plan.local.as_ref().map(|r| r.endpoint));
        prop_assert!(local_endpoint.is_none_or(|e| !endpoints.contains(&e)));
        endpoints.sort_unstable();
        prop_assert!(endpoints.windows(2).all(|w| w[0] != w[1]), "two peers share an endpoint");
    }

    /// Every remote entry's node addresses are routed into the tunnel, whatever
    /// became of the entry, and nothing else is.
    #[test]
    fn node_routes_cover_every_remote_node_address((cfg, entries) in node_set()) {
        let plan = plan(&cfg, &entries);
        let ips = |entry: &Entry| match entry {
            Ok(r) => r.node_ips.clone(),
            Err(r) => r.node_ips.clone(),
        };
        let mut local: Vec<IpAddr> = entries
            .iter()
            .filter(|e| name(e) == cfg.local_node)
            .flat_map(ips)
            .collect();
        local.sort_unstable();
        local.dedup();
        prop_assert_eq!(&plan.local_node_ips, &local);
        let local_endpoint = cfg.local_endpoint.or(plan.local.as_ref().map(|r| r.endpoint));
        let local_cidrs = plan.local.as_ref().map_or(&[][..], |r| &r.pod_cidrs[..]);
        let expected: BTreeSet<IpNet> = entries
            .iter()
            .filter(|e| name(e) != cfg.local_node)
            .flat_map(ips)
            .filter(|ip| !local.contains(ip))
            .filter(|ip| local_endpoint.is_none_or(|e| e.ip() != *ip))
            .filter(|ip| !cfg.cluster_cidrs.iter().chain(local_cidrs).any(|c| c.contains(ip)))
            .map(IpNet::from)
            .collect();
        prop_assert_eq!(plan.node_routes.clone(), expected.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn plan_ignores_input_order_and_verbatim_repeats(
        (cfg, original, permuted) in node_set_and_permutation()
    ) {
        prop_assert_eq!(plan(&cfg, &original), plan(&cfg, &permuted));
    }

    #[test]
    fn every_node_is_local_or_a_peer_or_excluded_exactly_once((cfg, entries) in node_set()) {
        let plan = plan(&cfg, &entries);
        let mut seen = BTreeSet::new();
        for name in plan
            .peers
            .iter()
            .map(|p| &p.node)
            .chain(plan.excluded.iter().map(|e| &e.node))
        {
            prop_assert!(name != &cfg.local_node, "local node {name} planned");
            prop_assert!(seen.insert(name.clone()), "{name} listed twice");
        }
        let remote: BTreeSet<String> = entries
            .iter()
            .map(|e| name(e).to_owned())
            .filter(|n| n != &cfg.local_node)
            .collect();
        prop_assert_eq!(seen, remote);
        let local_entry = entries.iter().find(|e| name(e) == cfg.local_node);
        prop_assert_eq!(
            plan.local.as_ref(),
            local_entry.and_then(|e| e.as_ref().ok())
        );
        let names: Vec<&String> = plan.excluded.iter().map(|e| &e.node).collect();
        prop_assert!(names.windows(2).all(|w| w[0] < w[1]), "excluded not sorted");
        for excluded in &plan.excluded {
            prop_assert!(!excluded.reason.to_string().is_empty());
        }
    }

    #[test]
    fn diff_of_a_peer_set_with_itself_is_empty(peers in device_peers()) {
        prop_assert_eq!(diff(&peers, &peers), vec![]);
    }

    #[test]
    fn no_update_is_empty(current in device_peers(), desired in device_peers()) {
        for change in diff(&current, &desired) {
            if let PeerChange::Update { endpoint, allowed_ips, persistent_keepalive, .. } = change {
                prop_assert!(
                    endpoint.is_some() || allowed_ips.is_some() || persistent_keepalive.is_some()
                );
            }
        }
    }

    /// With every desired endpoint set, applying the diff reaches `desired`
    /// exactly. (A desired endpoint of `None` means "keep what the device has",
    /// so then the device's endpoint survives; see the next property.)
    #[test]
    fn applying_the_diff_reaches_the_desired_set(
        current in device_peers(),
        desired in desired_peers(true),
    ) {
        prop_assert_eq!(apply(&current, &diff(&current, &desired)), desired);
    }

    #[test]
    fn applying_the_diff_keeps_device_endpoints_where_desired_has_none(
        current in device_peers(),
        desired in desired_peers(false),
    ) {
        let after = apply(&current, &diff(&current, &desired));
        prop_assert_eq!(diff(&after, &desired), vec![]);
        prop_assert_eq!(after.len(), desired.len());
        for (got, want) in after.iter().zip(&desired) {
            let device = current.iter().find(|p| p.public_key == want.public_key);
            let expected_endpoint = want.endpoint.or(device.and_then(|p| p.endpoint));
            prop_assert_eq!(got.endpoint, expected_endpoint);
            prop_assert_eq!(&got.allowed_ips, &want.allowed_ips);
        }
    }

    #[test]
    fn roamed_endpoints_are_kept_exactly_while_the_published_one_is_unchanged(
        current in device_peers(),
        desired in desired_peers(false),
        previous in prop::option::of(prop::collection::hash_map(
            (1u8..=8).prop_map(key),
            endpoint(),
            0..8,
        )),
    ) {
        let mut rewritten = desired.clone();
        let memory = keep_roamed_endpoints(&current, &mut rewritten, previous.as_ref());
        let published: HashMap<PublicKey, SocketAddr> = desired
            .iter()
            .filter_map(|p| p.endpoint.map(|e| (p.public_key, e)))
            .collect();
        prop_assert_eq!(memory, published);

        let after = apply(&current, &diff(&current, &rewritten));
        prop_assert_eq!(after.len(), desired.len());
        for (got, want) in after.iter().zip(&desired) {
            prop_assert_eq!(got.public_key, want.public_key);
            let device = current
                .iter()
                .find(|p| p.public_key == want.public_key)
                .and_then(|p| p.endpoint);
            let unchanged = previous
                .as_ref()
                .is_none_or(|p| p.get(&want.public_key) == want.endpoint.as_ref());
            let expected = match (want.endpoint, device) {
                (None, device) => device,
                (Some(_), Some(device)) if unchanged => Some(device),
                (Some(published), _) => Some(published),
            };
            prop_assert_eq!(got.endpoint, expected);
            prop_assert_eq!(&got.allowed_ips, &want.allowed_ips);
        }
    }

    #[test]
    fn a_plan_diffed_against_itself_applied_is_stable((cfg, entries) in node_set()) {
        let desired = plan(&cfg, &entries).peer_configs();
        prop_assert_eq!(diff(&[], &desired).len(), desired.len());
        prop_assert_eq!(apply(&[], &diff(&[], &desired)), desired.clone());
        prop_assert_eq!(diff(&desired, &desired), vec![]);
    }
}

/// Guards the generator rather than the planner: the properties above only mean
/// something if generated node sets actually contain every kind of conflict.
#[test]
fn generated_node_sets_hit_every_rule() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let mut seen = BTreeMap::<&str, usize>::new();
    let strategy = node_set();
    for _ in 0..512 {
        let (cfg, entries) = strategy.new_tree(&mut runner).unwrap().current();
        let plan = plan(&cfg, &entries);
        *seen.entry("peer").or_default() += usize::from(!plan.peers.is_empty());
        *seen.entry("local").or_default() += usize::from(plan.local.is_some());
        let node_ip_routes = plan
            .peers
            .iter()
            .flat_map(|p| &p.config.allowed_ips)
            .filter(|c| plan.node_routes.contains(c))
            .count();
        *seen.entry("node ip allowed").or_default() += usize::from(node_ip_routes > 0);
        // An admitted node listed an address its peer did not get: held by the
        // local node or an older peer, or inside the cluster CIDR.
        let withheld = plan.peers.iter().any(|p| {
            entries
                .iter()
                .flatten()
                .filter(|r| r.name == p.node)
                .any(|r| {
                    r.node_ips
                        .iter()
                        .any(|ip| !p.config.allowed_ips.contains(&IpNet::from(*ip)))
                })
        });
        *seen.entry("node ip withheld").or_default() += usize::from(withheld);
        for excluded in &plan.excluded {
            let kind = match excluded.reason {
                Exclusion::Invalid(_) => "invalid",
                Exclusion::AmbiguousName { .. } => "ambiguous",
                Exclusion::SameKeyAsLocal => "same key as local",
                Exclusion::SameEndpointAsLocal { .. } => "same endpoint as local",
                Exclusion::EndpointConflict { .. } => "endpoint conflict",
                Exclusion::OutsideClusterCidrs { .. } => "outside cluster",
                Exclusion::OverlapsLocal { .. } => "overlaps local",
                Exclusion::DuplicateKey { .. } => "duplicate key",
                Exclusion::CidrOverlap { .. } => "cidr overlap",
            };
            *seen.entry(kind).or_default() += 1;
        }
    }
    for kind in [
        "peer",
        "local",
        "invalid",
        "same key as local",
        "outside cluster",
        "overlaps local",
        "duplicate key",
        "cidr overlap",
        "same endpoint as local",
        "endpoint conflict",
        "node ip allowed",
        "node ip withheld",
    ] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) >= 20,
            "{kind}: {seen:?}"
        );
    }
}
