//! The decision and its application to a plan, in memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::json;

use super::*;
use crate::keys::PrivateKey;
use crate::mesh::{DesiredPeer, PeerConfig};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn validator() -> Validator {
    Validator::new(
        vec![net("10.244.0.0/16")],
        [
            ("n1".to_string(), vec![net("10.244.1.0/24")]),
            ("n2".to_string(), vec![net("10.244.2.0/24")]),
            ("n3".to_string(), vec![net("10.244.3.0/24")]),
        ]
        .into(),
        vec![
            "172.18.0.1".parse().unwrap(),
            "172.18.0.2".parse().unwrap(),
            "172.18.0.3".parse().unwrap(),
        ],
    )
}

fn site_grant() -> Grant {
    grant::decode(&json!({
        "metadata": {"name": "site-a"},
        "spec": {"prefix": "192.0.2.0/24", "failbackSeconds": 10,
                 "gateways": [{"node": "n1", "priority": 10}, {"node": "n2", "priority": 20}]},
    }))
    .unwrap()
}

fn plan() -> Plan {
    let peer = |node: &str, cidr: &str| DesiredPeer {
        node: node.into(),
        config: PeerConfig {
            public_key: PrivateKey::generate().public_key(),
            endpoint: None,
            allowed_ips: vec![net(cidr)],
            persistent_keepalive: Some(25),
            successor: None,
        },
    };
    Plan {
        local: None,
        peers: vec![peer("n1", "10.244.1.0/24"), peer("n2", "10.244.2.0/24")],
        routes: vec![Route {
            destination: net("10.244.0.0/16"),
            interface: "wgmesh0".into(),
        }],
        excluded: Vec::new(),
        node_routes: Vec::new(),
        local_node_ips: Vec::new(),
        ignored_successors: Vec::new(),
    }
}

fn allowed(plan: &Plan, node: &str) -> Vec<String> {
    let peer = plan.peers.iter().find(|p| p.node == node).unwrap();
    peer.config
        .allowed_ips
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn the_prefix_moves_with_its_gateway_and_its_route_stays() {
    let mut router = Router::default();
    let grants = [site_grant()];
    let none = BTreeMap::new();
    let t0 = Instant::now();

    let out = router.decide(t0, "n3", &validator(), &grants, &none, |_| true);
    assert!(out.refused.is_empty());
    assert_eq!(out.prefixes[0].active.as_deref(), Some("n1"));
    assert!(out.needs_probing());
    let mut p = plan();
    Router::apply(&out, &mut p);
    assert_eq!(allowed(&p, "n1"), ["10.244.1.0/24", "192.0.2.0/24"]);
    assert_eq!(allowed(&p, "n2"), ["10.244.2.0/24"]);
    assert!(p
        .routes
        .iter()
        .any(|r| r.destination == net("192.0.2.0/24")));
    // A client keeps its keepalives: only gateways send the short one.
    assert!(p
        .peers
        .iter()
        .all(|p| p.config.persistent_keepalive == Some(25)));

    // n1 dies: n2 carries it.
    let out = router.decide(
        t0 + Duration::from_secs(1),
        "n3",
        &validator(),
        &grants,
        &none,
        |n| n != "n1",
    );
    let mut p = plan();
    Router::apply(&out, &mut p);
    assert_eq!(allowed(&p, "n1"), ["10.244.1.0/24"]);
    assert_eq!(allowed(&p, "n2"), ["10.244.2.0/24", "192.0.2.0/24"]);

    // Both dead: the last winner keeps it, the route into the tunnel stays.
    let out = router.decide(
        t0 + Duration::from_secs(2),
        "n3",
        &validator(),
        &grants,
        &none,
        |_| false,
    );
    assert_eq!(out.prefixes[0].active.as_deref(), Some("n2"));
    assert!(!out.prefixes[0].healthy);
    let mut p = plan();
    Router::apply(&out, &mut p);
    assert!(p
        .routes
        .iter()
        .any(|r| r.destination == net("192.0.2.0/24")));
    assert_eq!(router.chooser.failovers(), 1);
}

#[test]
fn a_gateway_routes_its_prefix_itself() {
    let mut router = Router::default();
    let out = router.decide(
        Instant::now(),
        "n1",
        &validator(),
        &[site_grant()],
        &BTreeMap::new(),
        |_| true,
    );
    assert!(out.prefixes[0].local_gateway);
    assert_eq!(local_prefixes(&out), [net("192.0.2.0/24")]);
    // It leaves through this node's LAN: not a prefix the bypass check guards.
    assert!(out.tunnel_prefixes().is_empty());
    assert!(!out.needs_probing());
    let mut p = plan();
    p.peers.retain(|p| p.node != "n1");
    Router::apply(&out, &mut p);
    assert_eq!(allowed(&p, "n2"), ["10.244.2.0/24"]);
    assert_eq!(
        p.routes.len(),
        1,
        "no route into the tunnel for its own prefix"
    );
    // Its peers must hear from it often enough to judge it alive.
    assert_eq!(
        p.peers[0].config.persistent_keepalive,
        Some(gateway::GATEWAY_KEEPALIVE)
    );
}

#[test]
fn learned_prefixes_only_inside_a_learn_grant_and_hostile_ones_leave_the_plan_unchanged() {
    let learn = grant::decode(&json!({
        "metadata": {"name": "fabric"},
        "spec": {"prefix": "198.51.100.0/22", "learn": {"nodes": ["n1", "n2"], "maxLength": 24}},
    }))
    .unwrap();
    let ad = |prefix: &str, node: &str| Advertised {
        prefix: net(prefix),
        node: node.into(),
        next_hop_node: Some(node.into()),
    };
    let mut learned = BTreeMap::new();
    learned.insert("n1".to_string(), vec![ad("198.51.100.0/24", "n1")]);
    learned.insert(
        "n2".to_string(),
        vec![
            ad("198.51.100.0/24", "n2"),
            ad("10.244.1.0/24", "n2"),
            ad("0.0.0.0/0", "n2"),
        ],
    );
    let mut router = Router::default();
    let out = router.decide(
        Instant::now(),
        "n3",
        &validator(),
        std::slice::from_ref(&learn),
        &learned,
        |_| true,
    );
    assert_eq!(out.prefixes.len(), 1);
    assert_eq!(out.prefixes[0].source, Source::Learned);
    let names: Vec<_> = out.prefixes[0]
        .candidates
        .iter()
        .map(|c| c.node.as_str())
        .collect();
    assert_eq!(names, ["n1", "n2"]);
    let refused: Vec<_> = out
        .refused
        .iter()
        .map(|r| (r.from.as_str(), r.reason.kind()))
        .collect();
    assert_eq!(
        refused,
        [("n2", "pod-cidr-of-other-node"), ("n2", "default-route")]
    );

    // Only hostile announcements: the plan is what it was.
    let mut hostile = BTreeMap::new();
    let mut flood: Vec<_> = (0..10_001u32)
        .map(|i| {
            ad(
                &format!("198.51.{}.{}/32", 100 + i / 256 % 4, i % 256),
                "n2",
            )
        })
        .collect();
    flood.push(ad("10.244.1.128/25", "n2"));
    hostile.insert("n2".to_string(), flood);
    let out = router.decide(
        Instant::now(),
        "n3",
        &validator(),
        &[learn],
        &hostile,
        |_| true,
    );
    assert!(out.prefixes.is_empty());
    assert_eq!(out.refused.len(), 10_002);
    let mut p = plan();
    let before = p.clone();
    Router::apply(&out, &mut p);
    assert_eq!(p, before);
}

#[test]
fn a_learned_prefixes_annotation_drops_only_its_bad_entries() {
    let (ok, bad) =
        learned_from_annotation("n1", "198.51.100.0/24, 203.0.113.1/24,x,,2001:db8::/48");
    let nets: Vec<String> = ok.iter().map(|a| a.prefix.to_string()).collect();
    assert_eq!(nets, ["198.51.100.0/24", "2001:db8::/48"]);
    assert!(ok
        .iter()
        .all(|a| a.node == "n1" && a.next_hop_node.as_deref() == Some("n1")));
    assert_eq!(bad, ["\"203.0.113.1/24\"", "\"x\""]);
    let huge = vec!["198.51.100.0/32"; 5000].join(",");
    assert_eq!(
        learned_from_annotation("n1", &huge).0.len(),
        validate::DEFAULT_CAP + 1
    );
}

#[test]
fn a_held_prefix_is_routed_into_the_tunnel_on_no_peer() {
    let out = Outcome {
        held: vec![net("198.18.0.0/24")],
        ..Outcome::default()
    };
    let mut p = plan();
    let before = p.peers.clone();
    Router::apply(&out, &mut p);
    assert_eq!(p.peers, before);
    assert!(p
        .routes
        .iter()
        .any(|r| r.destination == net("198.18.0.0/24") && r.interface == "wgmesh0"));
    // Held in the tunnel, so guarded against bypasses like a carried one.
    assert_eq!(out.tunnel_prefixes(), [net("198.18.0.0/24")]);
}

/// What the bypass check guards: every prefix a remote gateway carries (or
/// would carry, healthy or not), never one this node is a gateway for.
#[test]
fn tunnel_prefixes_are_those_of_remote_gateways_and_the_held() {
    let mut router = Router::default();
    let out = router.decide(
        Instant::now(),
        "n3",
        &validator(),
        &[site_grant()],
        &BTreeMap::new(),
        |_| false,
    );
    assert!(!out.prefixes[0].local_gateway);
    assert_eq!(out.tunnel_prefixes(), [net("192.0.2.0/24")]);
    assert!(local_prefixes(&out).is_empty());
}

/// Prefixes this node is a gateway for.
fn local_prefixes(out: &Outcome) -> Vec<IpNet> {
    out.prefixes
        .iter()
        .filter(|p| p.local_gateway)
        .map(|p| p.prefix)
        .collect()
}
