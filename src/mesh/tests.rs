//! Unit tests: one per planner rule, then the diff and its device model.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use jiff::Timestamp;

use super::*;
use crate::keys::PublicKey;
use crate::node::{annotations, NodeError, NodeRecord, Reason, Rejected};

pub(super) fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

pub(super) fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn nets(texts: &[&str]) -> Vec<IpNet> {
    texts.iter().map(|t| net(t)).collect()
}

fn endpoint(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, n], 51820))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn ips(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().map(|t| ip(t)).collect()
}

fn with_ips(mut record: NodeRecord, addresses: &[&str]) -> NodeRecord {
    record.node_ips = ips(addresses);
    record
}

fn ts(seconds: i64) -> Timestamp {
    Timestamp::from_second(seconds).unwrap()
}

/// A valid record: key `[k; 32]`, endpoint 192.0.2.k:51820.
fn node(name: &str, created: Option<i64>, k: u8, cidrs: &[&str]) -> NodeRecord {
    NodeRecord {
        name: name.to_owned(),
        created: created.map(ts),
        public_key: key(k),
        key_generation: 1,
        key_created: None,
        next_public_key: None,
        endpoint: endpoint(k),
        endpoint_forced: false,
        pod_cidrs: nets(cidrs),
        persistent_keepalive: None,
        node_ips: Vec::new(),
        audit_head: None,
    }
}

/// A Node whose agent has not published its key and endpoint yet.
pub(super) fn rejected(name: &str, created: Option<Timestamp>) -> Rejected {
    let missing = |field: &str| NodeError {
        field: field.to_owned(),
        reason: Reason::Missing,
    };
    Rejected {
        node: name.to_owned(),
        created,
        errors: vec![
            missing(annotations::PUBLIC_KEY),
            missing(annotations::ENDPOINT),
        ],
        node_ips: Vec::new(),
    }
}

fn config(local: &str) -> MeshConfig {
    MeshConfig {
        local_node: local.to_owned(),
        interface: "wgmesh0".to_owned(),
        cluster_cidrs: nets(&["10.0.0.0/8", "fd00::/48"]),
        default_keepalive: None,
        local_public_key: None,
        local_endpoint: None,
        handshakes: Default::default(),
    }
}

fn ok(records: Vec<NodeRecord>) -> Vec<Result<NodeRecord, Rejected>> {
    records.into_iter().map(Ok).collect()
}

fn peer_names(plan: &Plan) -> Vec<&str> {
    let mut names: Vec<&str> = plan.peers.iter().map(|p| p.node.as_str()).collect();
    names.sort_unstable();
    names
}

fn reason<'p>(plan: &'p Plan, name: &str) -> &'p Exclusion {
    &plan
        .excluded
        .iter()
        .find(|e| e.node == name)
        .unwrap_or_else(|| panic!("{name} not excluded in {plan:#?}"))
        .reason
}

// --- plan -------------------------------------------------------------------

#[test]
fn local_node_is_never_a_peer() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("me", Some(1), 1, &["10.0.0.0/24"]),
            node("b", Some(2), 2, &["10.0.1.0/24"]),
            node("c", Some(3), 3, &["10.0.2.0/24", "fd00:0:0:2::/64"]),
        ]),
    );
    assert_eq!(plan.local.as_ref().map(|r| r.name.as_str()), Some("me"));
    assert_eq!(peer_names(&plan), ["b", "c"]);
    assert!(plan.excluded.is_empty());
}

#[test]
fn peer_config_comes_from_the_record() {
    let mut cfg = config("me");
    cfg.default_keepalive = Some(25);
    let mut b = node("b", Some(2), 2, &["10.0.1.0/24", "fd00:0:0:1::/64"]);
    b.persistent_keepalive = Some(10);
    let c = node("c", Some(3), 3, &["10.0.2.0/24"]);
    let plan = plan(&cfg, &ok(vec![b, c]));
    assert_eq!(
        plan.peers,
        vec![
            DesiredPeer {
                node: "b".into(),
                config: PeerConfig {
                    public_key: key(2),
                    endpoint: Some(endpoint(2)),
                    allowed_ips: nets(&["10.0.1.0/24", "fd00:0:0:1::/64"]),
                    persistent_keepalive: Some(10),
                    successor: None,
                },
            },
            DesiredPeer {
                node: "c".into(),
                config: PeerConfig {
                    public_key: key(3),
                    endpoint: Some(endpoint(3)),
                    allowed_ips: nets(&["10.0.2.0/24"]),
                    persistent_keepalive: Some(25),
                    successor: None,
                },
            },
        ]
    );
}

#[test]
fn a_default_keepalive_of_zero_is_off() {
    let mut cfg = config("me");
    cfg.default_keepalive = Some(0);
    let plan = plan(&cfg, &ok(vec![node("b", Some(2), 2, &["10.0.1.0/24"])]));
    assert_eq!(plan.peers[0].config.persistent_keepalive, None);
}

#[test]
fn invalid_nodes_are_excluded_with_their_errors() {
    let bad = rejected("bad", Some(ts(1)));
    let errors = bad.errors.clone();
    let plan = plan(
        &config("me"),
        &[Err(bad), Ok(node("b", Some(2), 2, &["10.0.1.0/24"]))],
    );
    assert_eq!(peer_names(&plan), ["b"]);
    let Exclusion::Invalid(carried) = reason(&plan, "bad") else {
        panic!("{plan:#?}")
    };
    assert_eq!(carried.errors, errors);
    let text = reason(&plan, "bad").to_string();
    for error in &errors {
        assert!(text.contains(&error.to_string()), "{text}");
    }
}

#[test]
fn a_node_with_the_local_key_is_excluded_even_when_older() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("me", Some(10), 1, &["10.0.0.0/24"]),
            node("old", Some(1), 1, &["10.0.1.0/24"]),
        ]),
    );
    assert!(plan.peers.is_empty());
    assert_eq!(reason(&plan, "old"), &Exclusion::SameKeyAsLocal);
}

#[test]
fn a_node_overlapping_the_local_cidrs_is_excluded_even_when_older() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("me", Some(10), 1, &["10.0.1.0/24"]),
            node("wider", Some(1), 2, &["10.0.0.0/16"]),
            node("inside", Some(2), 3, &["10.0.1.128/25"]),
            node("beside", Some(3), 4, &["10.1.0.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["beside"]);
    assert_eq!(
        reason(&plan, "wider"),
        &Exclusion::OverlapsLocal {
            cidr: net("10.0.0.0/16")
        }
    );
    assert_eq!(
        reason(&plan, "inside"),
        &Exclusion::OverlapsLocal {
            cidr: net("10.0.1.128/25")
        }
    );
}

#[test]
fn duplicate_key_goes_to_the_older_node() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("a-newer", Some(20), 7, &["10.0.1.0/24"]),
            node("z-older", Some(10), 7, &["10.0.2.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["z-older"]);
    assert_eq!(
        reason(&plan, "a-newer"),
        &Exclusion::DuplicateKey {
            kept: "z-older".into()
        }
    );
}

/// An older Node that copies a newer Node's public key onto itself (its agent
/// may write its own `public-key`) does not take that node's peer where the
/// device has a handshake with the key from the newer node's endpoint; with no
/// such proof (a fresh device), or with a handshake from neither claimant, older
/// wins as before.
#[test]
fn a_copied_key_stays_with_the_node_the_device_has_a_handshake_from() {
    let victim = node("victim", Some(20), 7, &["10.0.1.0/24"]);
    let mut copier = node("copier", Some(10), 9, &["10.0.2.0/24"]);
    copier.public_key = victim.public_key;
    let nodes = ok(vec![victim.clone(), copier.clone()]);

    let mut cfg = config("me");
    cfg.handshakes.insert(victim.public_key, victim.endpoint);
    let proven = plan(&cfg, &nodes);
    assert_eq!(peer_names(&proven), ["victim"]);
    assert_eq!(
        reason(&proven, "copier"),
        &Exclusion::DuplicateKey {
            kept: "victim".into()
        }
    );
    let peer = &proven.peers[0].config;
    assert_eq!(peer.allowed_ips, nets(&["10.0.1.0/24"]));
    assert_eq!(peer.endpoint, Some(victim.endpoint));

    for handshakes in [None, Some(endpoint(200))] {
        let mut cfg = config("me");
        if let Some(e) = handshakes {
            cfg.handshakes.insert(victim.public_key, e);
        }
        let unproven = plan(&cfg, &nodes);
        assert_eq!(peer_names(&unproven), ["copier"], "{handshakes:?}");
    }

    // The copier copies the endpoint too: the Node addresses (the kubelet's,
    // which no agent token can write) still tell them apart.
    copier.endpoint = victim.endpoint;
    let mut cfg = config("me");
    cfg.handshakes.insert(victim.public_key, victim.endpoint);
    let victim = with_ips(victim, &["192.0.2.7"]);
    let copier = with_ips(copier, &["192.0.2.9"]);
    let by_address = plan(&cfg, &ok(vec![victim.clone(), copier.clone()]));
    assert_eq!(peer_names(&by_address), ["victim"]);
    // Without addresses, both claim the proven endpoint: no proof; older wins.
    let (mut victim, mut copier) = (victim, copier);
    victim.node_ips.clear();
    copier.node_ips.clear();
    let both = plan(&cfg, &ok(vec![victim, copier]));
    assert_eq!(peer_names(&both), ["copier"]);
}

#[test]
fn a_node_without_creation_time_counts_as_newest() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("a-unknown", None, 7, &["10.0.1.0/24"]),
            node("z-dated", Some(i64::from(i32::MAX)), 7, &["10.0.2.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["z-dated"]);
    assert_eq!(
        reason(&plan, "a-unknown"),
        &Exclusion::DuplicateKey {
            kept: "z-dated".into()
        }
    );
}

#[test]
fn equal_ages_fall_back_to_the_name() {
    for created in [Some(5), None] {
        let plan = plan(
            &config("me"),
            &ok(vec![
                node("b", created, 7, &["10.0.2.0/24"]),
                node("a", created, 7, &["10.0.1.0/24"]),
            ]),
        );
        assert_eq!(peer_names(&plan), ["a"]);
        assert_eq!(
            reason(&plan, "b"),
            &Exclusion::DuplicateKey { kept: "a".into() }
        );
    }
}

#[test]
fn overlapping_cidrs_go_to_the_older_node_either_way_round() {
    // The newer node's CIDR contains the older one's...
    let plan1 = plan(
        &config("me"),
        &ok(vec![
            node("old", Some(1), 2, &["10.0.1.0/24"]),
            node("new", Some(2), 3, &["10.0.0.0/16"]),
        ]),
    );
    assert_eq!(peer_names(&plan1), ["old"]);
    assert_eq!(
        reason(&plan1, "new"),
        &Exclusion::CidrOverlap {
            cidr: net("10.0.0.0/16"),
            kept: "old".into(),
            kept_cidr: net("10.0.1.0/24"),
        }
    );
    // ...or lies inside it...
    let plan2 = plan(
        &config("me"),
        &ok(vec![
            node("old", Some(1), 2, &["10.0.0.0/16"]),
            node("new", Some(2), 3, &["10.0.255.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan2), ["old"]);
    assert_eq!(
        reason(&plan2, "new"),
        &Exclusion::CidrOverlap {
            cidr: net("10.0.255.0/24"),
            kept: "old".into(),
            kept_cidr: net("10.0.0.0/16"),
        }
    );
    // ...or is the same, with a missing creation time counting as newest.
    let plan3 = plan(
        &config("me"),
        &ok(vec![
            node("a", None, 2, &["10.0.1.0/24"]),
            node("b", Some(9), 3, &["10.0.1.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan3), ["b"]);
}

#[test]
fn an_excluded_node_does_not_exclude_others() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("first", Some(1), 2, &["10.0.0.0/24"]),
            // Overlaps `first`: excluded.
            node("second", Some(2), 3, &["10.0.0.0/23"]),
            // Overlaps only `second` (10.0.1.0/24 is inside 10.0.0.0/23), and
            // shares its key: admitted, because `second` was not.
            node("third", Some(3), 3, &["10.0.1.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["first", "third"]);
    assert!(matches!(
        reason(&plan, "second"),
        Exclusion::CidrOverlap { .. }
    ));
}

#[test]
fn a_node_may_list_nested_cidrs_of_its_own() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("a", Some(1), 2, &["10.0.0.0/16", "10.0.1.0/24"]),
            node("b", Some(2), 3, &["10.0.2.0/24"]),
            node("c", Some(3), 4, &["10.1.0.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["a", "c"]);
    assert_eq!(
        reason(&plan, "b"),
        &Exclusion::CidrOverlap {
            cidr: net("10.0.2.0/24"),
            kept: "a".into(),
            kept_cidr: net("10.0.0.0/16"),
        }
    );
}

#[test]
fn families_never_overlap_even_with_equal_numbers() {
    // ::a00:0/120 has the same numeric range as 10.0.0.0/24.
    let mut cfg = config("me");
    cfg.cluster_cidrs = nets(&["10.0.0.0/8", "::/96"]);
    let plan = plan(
        &cfg,
        &ok(vec![
            node("v4", Some(1), 2, &["10.0.0.0/24"]),
            node("v6", Some(2), 3, &["::a00:0/120"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["v4", "v6"]);
}

#[test]
fn a_cidr_outside_the_cluster_cidrs_is_excluded() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("a", Some(1), 2, &["10.0.1.0/24", "192.168.0.0/24"]),
            node("b", Some(2), 3, &["fd01::/64"]),
            node("c", Some(3), 4, &["10.0.2.0/24"]),
        ]),
    );
    assert_eq!(peer_names(&plan), ["c"]);
    assert_eq!(
        reason(&plan, "a"),
        &Exclusion::OutsideClusterCidrs {
            cidr: net("192.168.0.0/24")
        }
    );
    assert_eq!(
        reason(&plan, "b"),
        &Exclusion::OutsideClusterCidrs {
            cidr: net("fd01::/64")
        }
    );
}

#[test]
fn planning_works_without_the_local_node() {
    let plan = plan(
        &config("me"),
        &ok(vec![
            node("b", Some(2), 2, &["10.0.1.0/24"]),
            node("c", Some(3), 3, &["10.0.2.0/24"]),
        ]),
    );
    assert_eq!(plan.local, None);
    assert_eq!(peer_names(&plan), ["b", "c"]);
    assert_eq!(plan.routes.len(), 2);
}

#[test]
fn an_invalid_local_node_is_neither_local_nor_excluded() {
    let plan = plan(
        &config("me"),
        &[
            Err(rejected("me", None)),
            Ok(node("b", Some(2), 2, &["10.0.1.0/24"])),
        ],
    );
    assert_eq!(plan.local, None);
    assert_eq!(peer_names(&plan), ["b"]);
    assert!(plan.excluded.is_empty());
}

#[test]
fn one_route_per_cluster_cidr_into_the_interface() {
    let mut cfg = config("me");
    cfg.interface = "wgtest0".into();
    cfg.cluster_cidrs = nets(&["fd00::1/48", "10.1.2.3/8", "10.0.0.0/8"]);
    let plan = plan(&cfg, &[]);
    assert_eq!(
        plan.routes,
        vec![
            Route {
                destination: net("10.0.0.0/8"),
                interface: "wgtest0".into()
            },
            Route {
                destination: net("fd00::/48"),
                interface: "wgtest0".into()
            },
        ]
    );
}

#[test]
fn output_is_sorted_and_independent_of_input_order() {
    let mut nodes = ok(vec![
        node("me", Some(5), 1, &["10.0.0.0/24"]),
        node("n1", Some(4), 9, &["10.0.1.0/24"]),
        node("n2", Some(3), 8, &["10.0.2.0/24"]),
        node("n3", None, 9, &["10.0.3.0/24"]),
        node("n4", Some(1), 7, &["10.0.2.0/23"]),
        node("n5", Some(2), 6, &["10.0.0.0/25"]),
        node("n6", Some(6), 5, &["10.0.5.0/24"]),
    ]);
    nodes.push(Err(rejected("n0", Some(ts(0)))));
    let expected = plan(&config("me"), &nodes);
    let keys: Vec<PublicKey> = expected.peers.iter().map(|p| p.config.public_key).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]));
    let names: Vec<&str> = expected.excluded.iter().map(|e| e.node.as_str()).collect();
    assert_eq!(names, ["n0", "n2", "n3", "n5"]);
    for rotation in 1..nodes.len() {
        nodes.rotate_left(1);
        assert_eq!(plan(&config("me"), &nodes), expected, "rotation {rotation}");
        nodes.reverse();
        assert_eq!(plan(&config("me"), &nodes), expected, "reversed {rotation}");
    }
}

#[test]
fn a_repeated_entry_counts_once_and_a_contradicting_one_excludes() {
    let b = node("b", Some(2), 2, &["10.0.1.0/24"]);
    let c = node("c", Some(3), 3, &["10.0.2.0/24"]);
    let once = plan(&config("me"), &ok(vec![b.clone(), c.clone()]));
    let twice = plan(&config("me"), &ok(vec![b.clone(), c.clone(), b.clone()]));
    assert_eq!(once, twice);

    let mut b2 = b.clone();
    b2.endpoint = endpoint(99);
    let plan = plan(&config("me"), &ok(vec![b, c, b2]));
    assert_eq!(peer_names(&plan), ["c"]);
    assert_eq!(reason(&plan, "b"), &Exclusion::AmbiguousName { entries: 2 });
}

#[test]
fn a_contradicting_local_entry_leaves_local_empty() {
    let me = node("me", Some(1), 1, &["10.0.0.0/24"]);
    let plan = plan(
        &config("me"),
        &[
            Ok(me.clone()),
            Err(rejected("me", me.created)),
            Ok(node("b", Some(2), 1, &["10.0.1.0/24"])),
        ],
    );
    assert_eq!(plan.local, None);
    assert!(plan.excluded.is_empty());
    assert_eq!(peer_names(&plan), ["b"]);
}

#[test]
fn exclusion_reasons_name_the_other_node() {
    let dup = Exclusion::DuplicateKey {
        kept: "node-a".into(),
    };
    assert!(dup.to_string().contains("node-a"), "{dup}");
    let overlap = Exclusion::CidrOverlap {
        cidr: net("10.0.0.0/16"),
        kept: "node-a".into(),
        kept_cidr: net("10.0.1.0/24"),
    };
    let text = overlap.to_string();
    for part in ["node-a", "10.0.0.0/16", "10.0.1.0/24"] {
        assert!(text.contains(part), "{text}");
    }
    let local = Exclusion::OverlapsLocal {
        cidr: net("10.0.0.0/16"),
    };
    assert!(local.to_string().contains("10.0.0.0/16"));
}

#[test]
fn an_endpoint_already_used_by_an_older_node_is_excluded() {
    let mut old = node("z-old", Some(1), 2, &["10.0.1.0/24"]);
    let mut new = node("a-new", Some(2), 3, &["10.0.2.0/24"]);
    let mut undated = node("m-undated", None, 4, &["10.0.3.0/24"]);
    let shared = SocketAddr::from(([192, 0, 2, 50], 51820));
    old.endpoint = shared;
    new.endpoint = shared;
    undated.endpoint = shared;
    // The same address on another port is another socket: no conflict.
    let mut other_port = node("other-port", Some(3), 5, &["10.0.4.0/24"]);
    other_port.endpoint = SocketAddr::from(([192, 0, 2, 50], 51821));
    for nodes in [
        vec![
            old.clone(),
            new.clone(),
            undated.clone(),
            other_port.clone(),
        ],
        vec![
            other_port.clone(),
            undated.clone(),
            new.clone(),
            old.clone(),
        ],
    ] {
        let plan = plan(&config("me"), &ok(nodes));
        assert_eq!(peer_names(&plan), ["other-port", "z-old"]);
        for loser in ["a-new", "m-undated"] {
            assert_eq!(
                reason(&plan, loser),
                &Exclusion::EndpointConflict {
                    endpoint: shared,
                    with: "z-old".into(),
                }
            );
        }
    }
}

#[test]
fn an_excluded_node_does_not_hold_its_endpoint() {
    let first = node("first", Some(1), 2, &["10.0.0.0/24"]);
    // Excluded for its CIDR, so its endpoint is not taken...
    let mut second = node("second", Some(2), 3, &["10.0.0.0/23"]);
    second.endpoint = endpoint(9);
    // ...and a newer node may use it.
    let mut third = node("third", Some(3), 4, &["10.0.2.0/24"]);
    third.endpoint = endpoint(9);
    let plan = plan(&config("me"), &ok(vec![first, second, third]));
    assert_eq!(peer_names(&plan), ["first", "third"]);
    assert!(matches!(
        reason(&plan, "second"),
        Exclusion::CidrOverlap { .. }
    ));
}

#[test]
fn the_local_endpoint_is_never_a_peer_endpoint_even_for_an_older_node() {
    let me = node("me", Some(10), 1, &["10.0.0.0/24"]);
    let mut old = node("old", Some(1), 2, &["10.0.1.0/24"]);
    old.endpoint = me.endpoint;
    let plan = plan(&config("me"), &ok(vec![me.clone(), old]));
    assert!(plan.peers.is_empty());
    assert_eq!(
        reason(&plan, "old"),
        &Exclusion::SameEndpointAsLocal {
            endpoint: me.endpoint,
            local: "me".into(),
        }
    );
}

#[test]
fn the_agents_own_endpoint_wins_over_the_cached_annotation() {
    // The API cache still shows this node's previous endpoint, which another
    // node has legitimately taken over; the agent knows its current one.
    let now_mine = SocketAddr::from(([192, 0, 2, 77], 51820));
    let me = node("me", Some(10), 1, &["10.0.0.0/24"]);
    let mut took_over = node("b", Some(2), 2, &["10.0.1.0/24"]);
    took_over.endpoint = me.endpoint;
    let mut hostile = node("c", Some(3), 3, &["10.0.2.0/24"]);
    hostile.endpoint = now_mine;
    let mut cfg = config("me");
    cfg.local_endpoint = Some(now_mine);
    let plan = plan(&cfg, &ok(vec![me, took_over, hostile]));
    assert_eq!(peer_names(&plan), ["b"]);
    assert_eq!(
        reason(&plan, "c"),
        &Exclusion::SameEndpointAsLocal {
            endpoint: now_mine,
            local: "me".into(),
        }
    );
}

#[test]
fn the_key_stores_key_wins_over_the_cached_annotation() {
    // The local Node's annotation (API cache) shows node b's key: stale, or
    // copied there by someone. The key store says this node's key is key(1).
    let mut stale_me = node("me", Some(10), 2, &["10.0.0.0/24"]);
    stale_me.endpoint = endpoint(1);
    let b = node("b", Some(1), 2, &["10.0.1.0/24"]);
    let c = node("c", Some(3), 3, &["10.0.2.0/24"]);
    let mut cfg = config("me");
    cfg.local_public_key = Some(key(1));
    let plan1 = plan(&cfg, &ok(vec![stale_me.clone(), b.clone(), c.clone()]));
    assert_eq!(peer_names(&plan1), ["b", "c"]);
    assert!(plan1.excluded.is_empty(), "{plan1:#?}");

    // A node announcing the store's key is the one excluded, whatever the
    // annotation says.
    let mine = node("d", Some(0), 1, &["10.0.3.0/24"]);
    let plan2 = plan(&cfg, &ok(vec![stale_me.clone(), b.clone(), mine]));
    assert_eq!(peer_names(&plan2), ["b"]);
    assert_eq!(reason(&plan2, "d"), &Exclusion::SameKeyAsLocal);

    // Without the store's key the annotation is all there is (`wgmesh status`).
    let plan3 = plan(&config("me"), &ok(vec![stale_me, b, c]));
    assert_eq!(reason(&plan3, "b"), &Exclusion::SameKeyAsLocal);
}

#[test]
fn node_addresses_become_host_routes_of_their_peer() {
    let b = with_ips(
        node("b", Some(2), 2, &["10.0.1.0/24", "fd00:0:0:1::/64"]),
        &["2001:db8::2", "198.51.100.2", "198.51.100.12"],
    );
    let plan = plan(&config("me"), &ok(vec![b]));
    assert_eq!(
        plan.peers[0].config.allowed_ips,
        nets(&[
            "10.0.1.0/24",
            "198.51.100.2/32",
            "198.51.100.12/32",
            "2001:db8::2/128",
            "fd00:0:0:1::/64",
        ])
    );
    assert_eq!(
        plan.node_routes,
        nets(&["198.51.100.2/32", "198.51.100.12/32", "2001:db8::2/128"])
    );
}

#[test]
fn a_node_address_held_by_an_older_node_or_the_local_node_is_withheld() {
    let me = with_ips(node("me", Some(10), 1, &["10.0.0.0/24"]), &["198.51.100.1"]);
    let old = with_ips(
        node("old", Some(1), 2, &["10.0.1.0/24"]),
        &["198.51.100.2", "198.51.100.5"],
    );
    let new = with_ips(
        node("new", Some(2), 3, &["10.0.2.0/24"]),
        // Another node's, this node's, this node's endpoint address, inside
        // the cluster CIDR, and its own.
        &[
            "198.51.100.5",
            "198.51.100.1",
            "192.0.2.1",
            "10.0.0.7",
            "10.0.9.9",
            "198.51.100.3",
        ],
    );
    for nodes in [
        vec![me.clone(), old.clone(), new.clone()],
        vec![new.clone(), old.clone(), me.clone()],
    ] {
        let plan = plan(&config("me"), &ok(nodes));
        // Withheld addresses cost the node nothing else.
        assert_eq!(peer_names(&plan), ["new", "old"]);
        assert!(plan.excluded.is_empty());
        let allowed = |name: &str| {
            &plan
                .peers
                .iter()
                .find(|p| p.node == name)
                .unwrap()
                .config
                .allowed_ips
        };
        assert_eq!(
            allowed("old"),
            &nets(&["10.0.1.0/24", "198.51.100.2/32", "198.51.100.5/32"])
        );
        assert_eq!(allowed("new"), &nets(&["10.0.2.0/24", "198.51.100.3/32"]));
        assert_eq!(plan.local_node_ips, ips(&["198.51.100.1"]));
        // Still routed into the tunnel, except the local node's own addresses
        // and pod addresses.
        assert_eq!(
            plan.node_routes,
            nets(&["198.51.100.2/32", "198.51.100.3/32", "198.51.100.5/32"])
        );
    }
}

#[test]
fn an_invalid_local_node_still_keeps_its_addresses_from_peers() {
    let mut me = rejected("me", None);
    me.node_ips = ips(&["198.51.100.1"]);
    let b = with_ips(
        node("b", Some(2), 2, &["10.0.1.0/24"]),
        &["198.51.100.1", "198.51.100.2"],
    );
    let plan = plan(&config("me"), &[Err(me), Ok(b)]);
    assert_eq!(plan.local, None);
    assert_eq!(plan.local_node_ips, ips(&["198.51.100.1"]));
    assert_eq!(
        plan.peers[0].config.allowed_ips,
        nets(&["10.0.1.0/24", "198.51.100.2/32"])
    );
    assert_eq!(plan.node_routes, nets(&["198.51.100.2/32"]));
}

#[test]
fn node_routes_cover_excluded_invalid_and_ambiguous_nodes() {
    let admitted = with_ips(node("a", Some(1), 2, &["10.0.1.0/24"]), &["198.51.100.1"]);
    let overlapping = with_ips(
        node("b", Some(2), 3, &["10.0.1.0/24"]),
        &["198.51.100.2", "198.51.100.1"],
    );
    let mut invalid = rejected("c", None);
    invalid.node_ips = ips(&["2001:db8::3"]);
    let ambiguous1 = with_ips(node("d", Some(4), 5, &["10.0.4.0/24"]), &["198.51.100.4"]);
    let ambiguous2 = with_ips(node("d", Some(4), 6, &["10.0.5.0/24"]), &["198.51.100.5"]);
    let plan = plan(
        &config("me"),
        &[
            Ok(admitted),
            Ok(overlapping),
            Err(invalid),
            Ok(ambiguous1),
            Ok(ambiguous2),
        ],
    );
    assert_eq!(peer_names(&plan), ["a"]);
    assert_eq!(plan.excluded.len(), 3);
    assert_eq!(
        plan.node_routes,
        nets(&[
            "198.51.100.1/32",
            "198.51.100.2/32",
            "198.51.100.4/32",
            "198.51.100.5/32",
            "2001:db8::3/128",
        ])
    );
    assert!(plan.local_node_ips.is_empty());
}

#[test]
fn new_exclusion_reasons_name_the_other_node_and_the_winner() {
    let conflict = Exclusion::EndpointConflict {
        endpoint: endpoint(7),
        with: "node-a".into(),
    };
    let text = conflict.to_string();
    for part in ["192.0.2.7:51820", "older node node-a", "keeps it"] {
        assert!(text.contains(part), "{text}");
    }
    assert_eq!(conflict.kind(), "endpoint-conflict");
    let local = Exclusion::SameEndpointAsLocal {
        endpoint: endpoint(7),
        local: "node-me".into(),
    };
    let text = local.to_string();
    for part in ["192.0.2.7:51820", "node-me", "keeps it"] {
        assert!(text.contains(part), "{text}");
    }
    assert_eq!(local.kind(), "same-endpoint-as-local");
}

// --- diff and apply ---------------------------------------------------------

fn peer(k: u8, ep: Option<u8>, ips: &[&str], keepalive: Option<u16>) -> PeerConfig {
    PeerConfig {
        public_key: key(k),
        endpoint: ep.map(endpoint),
        allowed_ips: nets(ips),
        persistent_keepalive: keepalive,
        successor: None,
    }
}

#[test]
fn no_changes_for_equal_peer_sets_even_when_the_device_lists_differently() {
    let desired = vec![
        peer(1, Some(1), &["10.0.1.0/24", "fd00:0:0:1::/64"], Some(25)),
        peer(2, Some(2), &["10.0.2.0/24"], None),
    ];
    let current = vec![
        peer(2, Some(2), &["10.0.2.7/24", "10.0.2.0/24"], Some(0)),
        peer(1, Some(1), &["fd00:0:0:1::/64", "10.0.1.0/24"], Some(25)),
    ];
    assert_eq!(diff(&current, &desired), vec![]);
    assert_eq!(diff(&desired, &desired), vec![]);
}

#[test]
fn removals_then_updates_then_adds_then_hand_overs_each_by_key() {
    let current = vec![
        peer(5, Some(5), &["10.0.5.0/24"], None),
        peer(3, Some(3), &["10.0.3.0/24"], None),
        peer(4, Some(4), &["10.0.4.0/24"], None),
        peer(9, Some(9), &["10.0.9.0/24"], None),
        peer(8, Some(8), &["10.0.8.0/24"], None),
    ];
    let desired = vec![
        peer(2, Some(2), &["10.0.9.0/24"], None),
        peer(1, None, &["10.0.1.0/24"], None),
        peer(4, Some(4), &["10.0.4.0/24"], None),
        peer(5, Some(50), &["10.0.5.0/24"], None),
        peer(3, Some(3), &["10.0.3.0/25"], Some(15)),
    ];
    assert_eq!(
        diff(&current, &desired),
        vec![
            PeerChange::Remove(key(8)),
            PeerChange::Update {
                public_key: key(3),
                endpoint: None,
                allowed_ips: Some(nets(&["10.0.3.0/25"])),
                persistent_keepalive: Some(Some(15)),
                successor: None,
            },
            PeerChange::Update {
                public_key: key(5),
                endpoint: Some(endpoint(50)),
                allowed_ips: None,
                persistent_keepalive: None,
                successor: None,
            },
            PeerChange::Add(peer(1, None, &["10.0.1.0/24"], None)),
            PeerChange::Add(peer(2, Some(2), &["10.0.9.0/24"], None)),
            // 9's CIDR goes to 2: removed only once 2 holds it.
            PeerChange::Remove(key(9)),
        ]
    );
}

#[test]
fn a_desired_endpoint_of_none_never_updates() {
    let current = vec![peer(1, Some(7), &["10.0.1.0/24"], None)];
    let desired = vec![peer(1, None, &["10.0.1.0/24"], None)];
    assert_eq!(diff(&current, &desired), vec![]);
    let fresh = vec![peer(1, None, &["10.0.1.0/24"], None)];
    assert_eq!(diff(&fresh, &desired), vec![]);
}

#[test]
fn turning_keepalive_off_is_an_update() {
    let current = vec![peer(1, Some(1), &["10.0.1.0/24"], Some(25))];
    let desired = vec![peer(1, Some(1), &["10.0.1.0/24"], Some(0))];
    assert_eq!(
        diff(&current, &desired),
        vec![PeerChange::Update {
            public_key: key(1),
            endpoint: None,
            allowed_ips: None,
            persistent_keepalive: Some(None),
            successor: None,
        }]
    );
}

#[test]
fn adds_are_normalised() {
    let desired = vec![peer(1, Some(1), &["10.0.2.0/24", "10.0.1.9/24"], Some(0))];
    assert_eq!(
        diff(&[], &desired),
        vec![PeerChange::Add(peer(
            1,
            Some(1),
            &["10.0.1.0/24", "10.0.2.0/24"],
            None
        ))]
    );
}

#[test]
fn apply_moves_an_allowed_ip_like_a_device() {
    let current = vec![
        peer(1, Some(1), &["10.0.1.0/24", "10.0.9.0/24"], None),
        peer(2, Some(2), &["10.0.2.0/24"], None),
    ];
    let after = apply(
        &current,
        &[PeerChange::Update {
            public_key: key(2),
            endpoint: None,
            allowed_ips: Some(nets(&["10.0.2.0/24", "10.0.9.0/24"])),
            persistent_keepalive: None,
            successor: None,
        }],
    );
    assert_eq!(
        after,
        vec![
            peer(1, Some(1), &["10.0.1.0/24"], None),
            peer(2, Some(2), &["10.0.2.0/24", "10.0.9.0/24"], None),
        ]
    );
}

#[test]
fn apply_update_creates_remove_of_unknown_is_a_no_op_add_keeps_endpoint() {
    let current = vec![peer(1, Some(1), &["10.0.1.0/24"], None)];
    let after = apply(
        &current,
        &[
            PeerChange::Remove(key(7)),
            PeerChange::Update {
                public_key: key(3),
                endpoint: Some(endpoint(3)),
                allowed_ips: None,
                persistent_keepalive: None,
                successor: None,
            },
            PeerChange::Add(peer(1, None, &["10.0.4.0/24"], Some(5))),
        ],
    );
    assert_eq!(
        after,
        vec![
            peer(1, Some(1), &["10.0.4.0/24"], Some(5)),
            peer(3, Some(3), &[], None),
        ]
    );
}

#[test]
fn apply_of_a_diff_reaches_the_desired_set() {
    let current = vec![
        peer(5, Some(5), &["10.0.5.0/24"], None),
        peer(3, Some(3), &["10.0.3.0/24"], Some(25)),
        peer(9, Some(9), &["10.0.9.0/24"], None),
    ];
    let desired = vec![
        peer(2, Some(2), &["10.0.9.0/24"], None),
        peer(3, Some(33), &["10.0.5.0/24"], None),
        peer(5, Some(5), &["10.0.3.0/24"], None),
    ];
    assert_eq!(apply(&current, &diff(&current, &desired)), desired);
}

// --- clusters without spec.podCIDRs -------------------------------------------

/// A Node as the API serves it on a cluster that does not allocate node CIDRs:
/// empty `spec.podCIDRs`, the claim only in the `pod-cidrs` annotation.
fn unallocated_node(
    name: &str,
    created: i64,
    seed: u8,
    claim: &str,
) -> k8s_openapi::api::core::v1::Node {
    use k8s_openapi::api::core::v1::{Node, NodeSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    let key = crate::keys::PrivateKey::from_bytes([seed; 32])
        .unwrap()
        .public_key();
    let annotations = [
        (annotations::PUBLIC_KEY, key.to_base64()),
        (annotations::ENDPOINT, format!("192.0.2.{seed}:51820")),
        (annotations::POD_CIDRS, claim.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            creation_timestamp: Some(Time(ts(created))),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(Vec::new()),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

#[test]
fn without_spec_pod_cidrs_claims_decode_and_the_older_claim_wins() {
    let vcfg = crate::node::ValidationConfig {
        cluster_cidrs: nets(&["10.0.0.0/8", "fd00::/48"]),
    };
    let nodes = [
        unallocated_node("me", 5, 1, "10.0.0.0/24"),
        unallocated_node("z-old", 1, 2, "10.0.1.0/24,fd00:0:0:1::/64"),
        // Overlaps z-old's claim (contains it): newer, so excluded.
        unallocated_node("a-new", 2, 3, "10.0.0.0/16"),
        // Identical to z-old's v6 claim.
        unallocated_node("b-newer", 3, 4, "10.0.4.0/24,fd00:0:0:1::/64"),
        unallocated_node("c-fine", 4, 5, "10.0.5.0/24"),
    ];
    let decoded: Vec<_> = nodes
        .iter()
        .map(|n| crate::node::decode(n, &vcfg))
        .collect();
    for entry in &decoded {
        assert!(entry.is_ok(), "{entry:?}");
    }
    assert_eq!(
        decoded[1].as_ref().unwrap().pod_cidrs,
        nets(&["10.0.1.0/24", "fd00:0:0:1::/64"])
    );

    let mut cfg = config("me");
    cfg.local_endpoint = Some(endpoint(1));
    let mesh = plan(&cfg, &decoded);
    assert_eq!(peer_names(&mesh), ["c-fine", "z-old"]);
    // a-new's /16 also contains the local node's 10.0.0.0/24: the local node
    // always keeps its own, before any age comparison.
    assert_eq!(
        reason(&mesh, "a-new"),
        &Exclusion::OverlapsLocal {
            cidr: net("10.0.0.0/16")
        }
    );
    let newer = reason(&mesh, "b-newer");
    assert_eq!(
        newer,
        &Exclusion::CidrOverlap {
            cidr: net("fd00:0:0:1::/64"),
            kept: "z-old".into(),
            kept_cidr: net("fd00:0:0:1::/64"),
        }
    );
    assert!(newer.to_string().contains("older node z-old"), "{newer}");

    // And between two remote nodes only, the older one wins either way round.
    let two = [
        unallocated_node("p-new", 9, 6, "10.0.8.0/22"),
        unallocated_node("q-old", 8, 7, "10.0.9.0/24"),
    ];
    let decoded: Vec<_> = two.iter().map(|n| crate::node::decode(n, &vcfg)).collect();
    let pair = plan(&config("me"), &decoded);
    assert_eq!(peer_names(&pair), ["q-old"]);
    assert_eq!(
        reason(&pair, "p-new"),
        &Exclusion::CidrOverlap {
            cidr: net("10.0.8.0/22"),
            kept: "q-old".into(),
            kept_cidr: net("10.0.9.0/24"),
        }
    );
}

// --- roamed endpoints ---------------------------------------------------------

fn published(pairs: &[(u8, u8)]) -> HashMap<PublicKey, SocketAddr> {
    pairs.iter().map(|&(k, e)| (key(k), endpoint(e))).collect()
}

#[test]
fn a_roamed_endpoint_is_kept_while_the_published_one_is_unchanged() {
    // The device roamed peer 1 from 192.0.2.1 to 192.0.2.91 (NAT rebinding).
    let device = vec![peer(1, Some(91), &["10.0.1.0/24"], None)];
    let mut desired = vec![peer(1, Some(1), &["10.0.1.0/24"], None)];
    let memory = keep_roamed_endpoints(&device, &mut desired, Some(&published(&[(1, 1)])));
    assert_eq!(desired, vec![peer(1, Some(91), &["10.0.1.0/24"], None)]);
    assert_eq!(diff(&device, &desired), vec![]);
    // What is remembered is the published endpoint, not the roamed one.
    assert_eq!(memory, published(&[(1, 1)]));
}

#[test]
fn a_changed_published_endpoint_is_set() {
    let device = vec![peer(1, Some(91), &["10.0.1.0/24"], None)];
    let mut desired = vec![peer(1, Some(2), &["10.0.1.0/24"], None)];
    let memory = keep_roamed_endpoints(&device, &mut desired, Some(&published(&[(1, 1)])));
    assert_eq!(desired[0].endpoint, Some(endpoint(2)));
    assert_eq!(
        diff(&device, &desired),
        vec![PeerChange::Update {
            public_key: key(1),
            endpoint: Some(endpoint(2)),
            allowed_ips: None,
            persistent_keepalive: None,
            successor: None,
        }]
    );
    assert_eq!(memory, published(&[(1, 2)]));
}

#[test]
fn a_key_not_published_last_pass_gets_its_published_endpoint() {
    // On the device already (e.g. left from before it was excluded), but new
    // to the plan: nothing says its device endpoint is one it roamed to.
    let device = vec![peer(1, Some(91), &["10.0.1.0/24"], None)];
    let mut desired = vec![peer(1, Some(1), &["10.0.1.0/24"], None)];
    keep_roamed_endpoints(&device, &mut desired, Some(&HashMap::new()));
    assert_eq!(desired[0].endpoint, Some(endpoint(1)));
}

#[test]
fn a_new_peer_or_one_without_an_endpoint_gets_the_published_one() {
    let device = vec![peer(2, None, &["10.0.2.0/24"], None)];
    let mut desired = vec![
        peer(1, Some(1), &["10.0.1.0/24"], None),
        peer(2, Some(2), &["10.0.2.0/24"], None),
    ];
    let before = desired.clone();
    for previous in [None, Some(published(&[(1, 1), (2, 2)]))] {
        let mut rewritten = before.clone();
        keep_roamed_endpoints(&device, &mut rewritten, previous.as_ref());
        assert_eq!(rewritten, before);
    }
    keep_roamed_endpoints(&device, &mut desired, None);
    assert_eq!(
        diff(&device, &desired),
        vec![
            PeerChange::Update {
                public_key: key(2),
                endpoint: Some(endpoint(2)),
                allowed_ips: None,
                persistent_keepalive: None,
                successor: None,
            },
            PeerChange::Add(peer(1, Some(1), &["10.0.1.0/24"], None)),
        ]
    );
}

#[test]
fn the_first_pass_after_a_restart_keeps_the_device_endpoint() {
    let device = vec![peer(1, Some(91), &["10.0.1.0/24"], None)];
    let mut desired = vec![peer(1, Some(1), &["10.0.1.0/24"], None)];
    let memory = keep_roamed_endpoints(&device, &mut desired, None);
    assert_eq!(desired[0].endpoint, Some(endpoint(91)));
    assert_eq!(memory, published(&[(1, 1)]));
}

#[test]
fn no_opinion_stays_no_opinion_and_is_not_remembered() {
    let device = vec![peer(1, Some(91), &["10.0.1.0/24"], None)];
    let mut desired = vec![peer(1, None, &["10.0.1.0/24"], None)];
    let memory = keep_roamed_endpoints(&device, &mut desired, Some(&published(&[(1, 1)])));
    assert_eq!(desired[0].endpoint, None);
    assert!(memory.is_empty());
}

#[test]
fn roaming_over_several_passes() {
    let want = |e: u8| vec![peer(1, Some(e), &["10.0.1.0/24"], None)];
    let mut device: Vec<PeerConfig> = Vec::new();
    let mut memory: Option<HashMap<PublicKey, SocketAddr>> = None;
    let mut pass = |device: &mut Vec<PeerConfig>, published: u8| {
        let mut desired = want(published);
        let next = keep_roamed_endpoints(device, &mut desired, memory.as_ref());
        *device = apply(device, &diff(device, &desired));
        memory = Some(next);
    };

    pass(&mut device, 1);
    assert_eq!(device[0].endpoint, Some(endpoint(1)));
    // The peer's NAT mapping changes; the device follows its packets.
    device[0].endpoint = Some(endpoint(91));
    pass(&mut device, 1);
    pass(&mut device, 1);
    assert_eq!(device[0].endpoint, Some(endpoint(91)), "not yanked back");
    // The node publishes a new endpoint: followed at once, and then kept.
    pass(&mut device, 2);
    assert_eq!(device[0].endpoint, Some(endpoint(2)));
    device[0].endpoint = Some(endpoint(92));
    pass(&mut device, 2);
    assert_eq!(device[0].endpoint, Some(endpoint(92)));
}

// --- key rotation: successors, promotes, hand-overs ---------------------------

fn successor_of<'p>(plan: &'p Plan, name: &str) -> Option<&'p PublicKey> {
    plan.peers
        .iter()
        .find(|p| p.node == name)
        .unwrap_or_else(|| panic!("{name} is not a peer"))
        .config
        .successor
        .as_ref()
}

#[test]
fn a_staged_next_key_becomes_the_successor() {
    let mut b = node("b", Some(2), 2, &["10.0.1.0/24"]);
    b.next_public_key = Some(key(20));
    let plan = plan(
        &config("me"),
        &ok(vec![node("me", Some(1), 1, &["10.0.0.0/24"]), b]),
    );
    assert_eq!(successor_of(&plan, "b"), Some(&key(20)));
    assert!(plan.ignored_successors.is_empty());
}

#[test]
fn a_conflicting_next_key_is_ignored_and_the_node_stays_a_peer() {
    let mut me = node("me", Some(1), 1, &["10.0.0.0/24"]);
    me.next_public_key = Some(key(11));
    let mut own = node("own", Some(2), 2, &["10.0.1.0/24"]);
    own.next_public_key = Some(key(1));
    let mut own_next = node("own-next", Some(3), 3, &["10.0.2.0/24"]);
    own_next.next_public_key = Some(key(11));
    let mut theirs = node("theirs", Some(4), 4, &["10.0.3.0/24"]);
    theirs.next_public_key = Some(key(2));
    let mut twin_a = node("twin-a", Some(5), 5, &["10.0.4.0/24"]);
    twin_a.next_public_key = Some(key(50));
    let mut twin_b = node("twin-b", Some(6), 6, &["10.0.5.0/24"]);
    twin_b.next_public_key = Some(key(50));
    let plan = plan(
        &config("me"),
        &ok(vec![me, own, own_next, theirs, twin_a, twin_b]),
    );
    assert_eq!(
        peer_names(&plan),
        ["own", "own-next", "theirs", "twin-a", "twin-b"]
    );
    for name in ["own", "own-next", "theirs", "twin-a", "twin-b"] {
        assert_eq!(successor_of(&plan, name), None, "{name}");
    }
    let reasons: Vec<(&str, &SuccessorConflict)> = plan
        .ignored_successors
        .iter()
        .map(|i| (i.node.as_str(), &i.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("own", &SuccessorConflict::LocalKey),
            ("own-next", &SuccessorConflict::LocalNextKey),
            (
                "theirs",
                &SuccessorConflict::KeyOfNode { node: "own".into() }
            ),
            (
                "twin-a",
                &SuccessorConflict::NextKeyOfNode {
                    node: "twin-b".into()
                }
            ),
            (
                "twin-b",
                &SuccessorConflict::NextKeyOfNode {
                    node: "twin-a".into()
                }
            ),
        ]
    );
    assert_eq!(
        plan.ignored_successors[2].reason.to_string(),
        "it is the public key of node own"
    );
}

fn with_successor(mut p: PeerConfig, k: u8) -> PeerConfig {
    p.successor = Some(key(k));
    p
}

#[test]
fn staging_a_successor_is_an_update_and_withdrawing_it_too() {
    let plain = vec![peer(1, Some(1), &["10.0.1.0/24"], None)];
    let staged = vec![with_successor(peer(1, Some(1), &["10.0.1.0/24"], None), 2)];
    let update = |successor| PeerChange::Update {
        public_key: key(1),
        endpoint: None,
        allowed_ips: None,
        persistent_keepalive: None,
        successor: Some(successor),
    };
    assert_eq!(diff(&plain, &staged), vec![update(Some(key(2)))]);
    assert_eq!(diff(&staged, &plain), vec![update(None)]);
    assert_eq!(diff(&staged, &staged), vec![]);
}

#[test]
fn a_key_change_onto_a_staged_successor_is_one_promote() {
    // The device pre-accepted 2 as 1's successor; the node's Node now
    // announces 2 as its key.
    let current = vec![
        with_successor(peer(1, Some(1), &["10.0.1.0/24"], Some(25)), 2),
        peer(3, Some(3), &["10.0.3.0/24"], None),
    ];
    let desired = vec![
        peer(2, Some(1), &["10.0.1.0/24"], Some(25)),
        peer(3, Some(3), &["10.0.3.0/24"], None),
    ];
    let changes = diff(&current, &desired);
    assert_eq!(
        changes,
        vec![PeerChange::Promote {
            from: key(1),
            to: desired[0].clone(),
        }]
    );
    assert_eq!(apply(&current, &changes), desired);
}

#[test]
fn a_key_change_without_successor_adds_the_new_key_before_removing_the_old() {
    // Option O1: the new key takes the allowed IPs (they move atomically),
    // and only then does the old key go; an unrelated removal stays first.
    let current = vec![
        peer(1, Some(1), &["10.0.1.0/24", "fd00:0:0:1::/64"], None),
        peer(7, Some(7), &["10.0.7.0/24"], None),
    ];
    let desired = vec![peer(2, Some(1), &["10.0.1.0/24", "fd00:0:0:1::/64"], None)];
    let changes = diff(&current, &desired);
    assert_eq!(
        changes,
        vec![
            PeerChange::Remove(key(7)),
            PeerChange::Add(desired[0].clone()),
            PeerChange::Remove(key(1)),
        ]
    );
    assert_eq!(apply(&current, &changes), desired);
    // A removal first would have left the prefixes without an owner; the
    // device model shows the add alone already moved them.
    let after_add = apply(&current, &changes[..2]);
    let old = after_add.iter().find(|p| p.public_key == key(1)).unwrap();
    assert!(old.allowed_ips.is_empty(), "{after_add:?}");
}

#[test]
fn a_successor_follows_its_roamed_endpoint_into_the_promote() {
    let current = vec![with_successor(peer(1, Some(9), &["10.0.1.0/24"], None), 2)];
    let mut desired = vec![peer(2, Some(1), &["10.0.1.0/24"], None)];
    let previous: HashMap<PublicKey, SocketAddr> = [(key(1), endpoint(1))].into();
    keep_roamed_endpoints(&current, &mut desired, Some(&previous));
    // Key 2 was never published before: the published endpoint stays.
    assert_eq!(desired[0].endpoint, Some(endpoint(1)));
    keep_roamed_endpoints(&current, &mut desired, None);
    assert_eq!(desired[0].endpoint, Some(endpoint(9)));
}

#[test]
fn a_prefix_moving_between_peers_is_taken_before_it_is_given_up() {
    // Route sync's failover: 198.18.0.0/24 from peer 1 to peer 2. Peer 1
    // sorts first, yet peer 2's update (which gains it) goes first, so a
    // device applying one update at a time never has it on no peer.
    let current = vec![
        peer(1, Some(1), &["10.0.1.0/24", "198.18.0.0/24"], None),
        peer(2, Some(2), &["10.0.2.0/24"], None),
    ];
    let desired = vec![
        peer(1, Some(1), &["10.0.1.0/24"], None),
        peer(2, Some(2), &["10.0.2.0/24", "198.18.0.0/24"], None),
    ];
    let keys: Vec<PublicKey> = diff(&current, &desired)
        .iter()
        .map(|c| match c {
            PeerChange::Update { public_key, .. } => *public_key,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(keys, [key(2), key(1)]);
}
