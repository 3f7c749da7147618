//! Unit tests: one per planner rule, then the diff and its device model.

use std::net::SocketAddr;

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
    }
}

fn config(local: &str) -> MeshConfig {
    MeshConfig {
        local_node: local.to_owned(),
        interface: "wgmesh0".to_owned(),
        cluster_cidrs: nets(&["10.0.0.0/8", "fd00::/48"]),
        default_keepalive: None,
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
                },
            },
            DesiredPeer {
                node: "c".into(),
                config: PeerConfig {
                    public_key: key(3),
                    endpoint: Some(endpoint(3)),
                    allowed_ips: nets(&["10.0.2.0/24"]),
                    persistent_keepalive: Some(25),
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

// --- diff and apply ---------------------------------------------------------

fn peer(k: u8, ep: Option<u8>, ips: &[&str], keepalive: Option<u16>) -> PeerConfig {
    PeerConfig {
        public_key: key(k),
        endpoint: ep.map(endpoint),
        allowed_ips: nets(ips),
        persistent_keepalive: keepalive,
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
fn removals_then_updates_then_adds_each_by_key() {
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
            PeerChange::Remove(key(9)),
            PeerChange::Update {
                public_key: key(3),
                endpoint: None,
                allowed_ips: Some(nets(&["10.0.3.0/25"])),
                persistent_keepalive: Some(Some(15)),
            },
            PeerChange::Update {
                public_key: key(5),
                endpoint: Some(endpoint(50)),
                allowed_ips: None,
                persistent_keepalive: None,
            },
            PeerChange::Add(peer(1, None, &["10.0.1.0/24"], None)),
            PeerChange::Add(peer(2, Some(2), &["10.0.9.0/24"], None)),
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
