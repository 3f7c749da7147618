use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use proptest::prelude::*;

use super::*;
use crate::keys::PrivateKey;

const NAME: &str = "node-a";

fn key(seed: u8) -> PublicKey {
    PrivateKey::from_base64(&STANDARD.encode([seed; 32]))
        .unwrap()
        .public_key()
}

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn node_of(annotations: &[(&str, &str)], pod_cidrs: &[&str]) -> Node {
    let annotations = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    node_with(
        annotations,
        pod_cidrs.iter().map(|c| c.to_string()).collect(),
    )
}

fn node_with(annotations: BTreeMap<String, String>, pod_cidrs: Vec<String>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(NAME.to_owned()),
            creation_timestamp: Some(Time(ts("2026-01-02T03:04:05Z"))),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(pod_cidrs),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

fn cfg() -> ValidationConfig {
    ValidationConfig {
        cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
    }
}

fn local() -> LocalAnnotations {
    LocalAnnotations {
        public_key: key(1),
        key_generation: 3,
        key_created: ts("2026-11-21T11:36:24Z"),
        next_public_key: Some(key(2)),
        endpoint: "192.0.2.10:51820".parse().unwrap(),
        pod_cidrs: vec![net("fd00:10:244:1::/64"), net("10.244.1.0/24")],
        audit_head: Some(head(7)),
        last_rotation: Some("2026-11-21T11:36:24Z all-confirmed".into()),
        learned_prefixes: vec![net("203.0.113.0/24"), net("198.51.100.0/24")],
    }
}

fn head(seq: u64) -> AuditHead {
    format!("{seq}:{}", "ab".repeat(32)).parse().unwrap()
}

/// A node whose annotations are all valid, with `overrides` replacing or
/// adding values and `removed` keys left out.
fn valid_node(overrides: &[(&str, &str)], removed: &[&str]) -> Node {
    let mut annotations = encode(&local());
    annotations.insert(ann::PERSISTENT_KEEPALIVE.to_owned(), "25".to_owned());
    for (k, v) in overrides {
        annotations.insert(k.to_string(), v.to_string());
    }
    for k in removed {
        annotations.remove(*k);
    }
    node_with(
        annotations,
        vec!["10.244.1.0/24".to_owned(), "fd00:10:244:1::/64".to_owned()],
    )
}

/// Sets `status.addresses` to these (type, address) pairs.
fn with_addresses(mut node: Node, addresses: &[(&str, &str)]) -> Node {
    let addresses = addresses
        .iter()
        .map(|(type_, address)| NodeAddress {
            type_: type_.to_string(),
            address: address.to_string(),
        })
        .collect();
    node.status = Some(NodeStatus {
        addresses: Some(addresses),
        ..NodeStatus::default()
    });
    node
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn rejected(node: &Node) -> Rejected {
    decode(node, &cfg()).expect_err("node should be rejected")
}

/// Asserts that the node is rejected with exactly one error, on `field`,
/// and returns its reason.
fn only_error(node: &Node, field: &str) -> Reason {
    let rejected = rejected(node);
    assert_eq!(rejected.errors.len(), 1, "{rejected}");
    assert_eq!(rejected.errors[0].field, field, "{rejected}");
    assert!(rejected.to_string().contains(field));
    rejected.errors[0].reason.clone()
}

#[test]
fn valid_node_decodes_every_field() {
    let record = decode(&valid_node(&[], &[]), &cfg()).unwrap();
    assert_eq!(
        record,
        NodeRecord {
            name: NAME.to_owned(),
            created: Some(ts("2026-01-02T03:04:05Z")),
            public_key: key(1),
            key_generation: 3,
            key_created: Some(ts("2026-11-21T11:36:24Z")),
            next_public_key: Some(key(2)),
            endpoint: "192.0.2.10:51820".parse().unwrap(),
            endpoint_forced: false,
            pod_cidrs: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
            persistent_keepalive: Some(25),
            node_ips: vec![],
            audit_head: Some(head(7)),
        }
    );
}

#[test]
fn a_bad_audit_head_is_ignored_with_a_reason_not_rejected() {
    let hash = "ab".repeat(32);
    for bad in [
        "7".to_owned(),
        "x:abab".to_owned(),
        format!("0:{hash}"),
        format!("07:{hash}"),
        format!("+7:{hash}"),
        format!("7:{}", hash.to_uppercase()),
        format!("7:{}", &hash[2..]),
        format!("7:{hash}:1"),
    ] {
        let node = valid_node(&[(ann::AUDIT_HEAD, &bad)], &[]);
        let record = decode(&node, &cfg()).expect("the peer is kept");
        assert_eq!(record.audit_head, None, "{bad}");
        let error = audit_head(&node).unwrap_err();
        assert_eq!(error.field, ann::AUDIT_HEAD);
        assert!(matches!(error.reason, Reason::BadAuditHead(_)), "{bad}");
        assert!(error.to_string().contains("audit head"), "{error}");
        // The inventory reads it the same way, and says why.
        let fields = key_fields(&node);
        assert_eq!(fields.audit_head, None);
        assert_eq!(fields.errors.len(), 1, "{bad}");
    }
    let absent = valid_node(&[], &[ann::AUDIT_HEAD]);
    assert_eq!(audit_head(&absent), Ok(None));
    assert_eq!(decode(&absent, &cfg()).unwrap().audit_head, None);
    // Surrounding whitespace, like every annotation.
    let spaced = valid_node(&[(ann::AUDIT_HEAD, &format!(" {}\n", head(3)))], &[]);
    assert_eq!(audit_head(&spaced), Ok(Some(head(3))));
}

#[test]
fn a_rejected_node_still_yields_its_audit_head_and_key_fields() {
    let node = valid_node(&[(ann::ENDPOINT, "garbage")], &[]);
    assert!(decode(&node, &cfg()).is_err());
    assert_eq!(audit_head(&node), Ok(Some(head(7))));
    let fields = key_fields(&node);
    assert_eq!(fields.name, NAME);
    assert_eq!(fields.public_key, Some(key(1)));
    assert_eq!(fields.key_generation, Some(3));
    assert_eq!(fields.next_public_key, Some(key(2)));
    assert!(fields.errors.is_empty(), "{:?}", fields.errors);

    let bare = valid_node(&[(ann::KEY_CREATED, "soon")], &[ann::PUBLIC_KEY]);
    let fields = key_fields(&bare);
    let problems: Vec<&str> = fields.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(problems, [ann::PUBLIC_KEY, ann::KEY_CREATED]);
    assert_eq!(fields.errors[0].reason, Reason::Missing);
}

#[test]
fn node_ips_are_the_usable_internal_ips_outside_the_cluster() {
    let node = with_addresses(
        valid_node(&[], &[]),
        &[
            ("Hostname", "node-a"),
            ("ExternalIP", "203.0.113.9"),
            ("InternalIP", "2001:db8::7"),
            ("InternalIP", "192.0.2.7"),
            ("InternalIP", " 10.1.2.3\n"),
            ("InternalIP", "192.0.2.7"),
            ("InternalIP", "::ffff:192.0.2.8"),
            // Unparsable: skipped, never a reason to reject the Node.
            ("InternalIP", "not-an-ip"),
            ("InternalIP", "10.1.2.4/24"),
            ("InternalIP", "fe80::1%eth0"),
            ("InternalIP", ""),
            // Cannot name this node from elsewhere.
            ("InternalIP", "127.0.0.1"),
            ("InternalIP", "::1"),
            ("InternalIP", "::ffff:127.0.0.1"),
            ("InternalIP", "169.254.3.4"),
            ("InternalIP", "fe80::1"),
            ("InternalIP", "224.0.0.1"),
            ("InternalIP", "ff02::1"),
            ("InternalIP", "0.0.0.0"),
            ("InternalIP", "::"),
            ("InternalIP", "255.255.255.255"),
            // Inside the cluster pod CIDRs.
            ("InternalIP", "10.244.3.4"),
            ("InternalIP", "fd00:10:244::5"),
        ],
    );
    let record = decode(&node, &cfg()).unwrap();
    assert_eq!(
        record.node_ips,
        [
            ip("10.1.2.3"),
            ip("192.0.2.7"),
            ip("192.0.2.8"),
            ip("2001:db8::7"),
        ]
    );
    assert_eq!(node_ips(&node, &cfg()), record.node_ips);

    let everything = ValidationConfig {
        cluster_cidrs: vec![net("0.0.0.0/0")],
    };
    assert_eq!(
        node_ips(&node, &everything),
        [ip("2001:db8::7"), ip("fd00:10:244::5")]
    );
    let none = with_addresses(valid_node(&[], &[]), &[]);
    assert!(decode(&none, &cfg()).unwrap().node_ips.is_empty());
}

#[test]
fn a_rejected_node_keeps_its_node_ips() {
    let node = with_addresses(
        valid_node(&[(ann::PUBLIC_KEY, "garbage")], &[ann::ENDPOINT]),
        &[("InternalIP", "192.0.2.7"), ("InternalIP", "127.0.0.1")],
    );
    let rejected = rejected(&node);
    assert_eq!(rejected.errors.len(), 2, "{rejected}");
    assert_eq!(rejected.node_ips, [ip("192.0.2.7")]);
}

#[test]
fn optional_fields_default() {
    let node = valid_node(
        &[],
        &[
            ann::KEY_GENERATION,
            ann::KEY_CREATED,
            ann::NEXT_PUBLIC_KEY,
            ann::PERSISTENT_KEEPALIVE,
            ann::POD_CIDRS,
        ],
    );
    let record = decode(&node, &cfg()).unwrap();
    assert_eq!(record.key_generation, 0);
    assert_eq!(record.key_created, None);
    assert_eq!(record.next_public_key, None);
    assert_eq!(record.persistent_keepalive, None);
    assert_eq!(record.pod_cidrs.len(), 2);

    let off = valid_node(&[(ann::PERSISTENT_KEEPALIVE, "0")], &[]);
    assert_eq!(decode(&off, &cfg()).unwrap().persistent_keepalive, None);
}

#[test]
fn encode_writes_the_documented_text() {
    let mut local = local();
    local.key_created = ts("2026-11-21T11:36:24.987654321Z");
    local.pod_cidrs.push(net("10.244.1.7/24"));
    let map = encode(&local);
    assert_eq!(map[ann::KEY_CREATED], "2026-11-21T11:36:24Z");
    assert_eq!(map[ann::KEY_GENERATION], "3");
    assert_eq!(map[ann::ENDPOINT], "192.0.2.10:51820");
    assert_eq!(map[ann::POD_CIDRS], "10.244.1.0/24,fd00:10:244:1::/64");
    assert_eq!(map[ann::PUBLIC_KEY].len(), 44);
    assert_eq!(map[ann::AUDIT_HEAD], format!("7:{}", "ab".repeat(32)));
    assert_eq!(map[ann::LEARNED_PREFIXES], "198.51.100.0/24,203.0.113.0/24");
    assert!(map.keys().all(|k| ann::AGENT_OWNED.contains(&k.as_str())));

    local.next_public_key = None;
    local.pod_cidrs.clear();
    local.audit_head = None;
    local.learned_prefixes.clear();
    let map = encode(&local);
    assert!(!map.contains_key(ann::LEARNED_PREFIXES));
    assert!(!map.contains_key(ann::NEXT_PUBLIC_KEY));
    assert!(!map.contains_key(ann::POD_CIDRS));
    assert!(!map.contains_key(ann::AUDIT_HEAD));
}

#[test]
fn round_trip_encode_decode() {
    let local = local();
    let record = decode(&node_with(encode(&local), vec![]), &cfg()).unwrap();
    assert_eq!(record.public_key, local.public_key);
    assert_eq!(record.key_generation, local.key_generation);
    assert_eq!(record.key_created, Some(local.key_created));
    assert_eq!(record.next_public_key, local.next_public_key);
    assert_eq!(record.endpoint, local.endpoint);
    assert!(!record.endpoint_forced);
    assert_eq!(record.pod_cidrs, canonical_set(local.pod_cidrs));
    assert_eq!(record.audit_head, local.audit_head);
}

#[test]
fn missing_required_annotations() {
    let reason = only_error(&valid_node(&[], &[ann::PUBLIC_KEY]), ann::PUBLIC_KEY);
    assert_eq!(reason, Reason::Missing);
    let reason = only_error(&valid_node(&[], &[ann::ENDPOINT]), ann::ENDPOINT);
    assert_eq!(reason, Reason::Missing);
}

#[test]
fn missing_name() {
    let mut node = valid_node(&[], &[]);
    node.metadata.name = None;
    assert_eq!(only_error(&node, METADATA_NAME), Reason::NoName);
    assert_eq!(rejected(&node).node, "");
}

#[test]
fn bad_base64_key() {
    let node = valid_node(&[(ann::PUBLIC_KEY, "not base64!")], &[]);
    let reason = only_error(&node, ann::PUBLIC_KEY);
    assert!(
        matches!(reason, Reason::BadKey(KeyError::Base64(_))),
        "{reason}"
    );
}

#[test]
fn wrong_length_keys() {
    for len in [31, 33] {
        let text = STANDARD.encode(vec![7u8; len]);
        let node = valid_node(&[(ann::PUBLIC_KEY, &text)], &[]);
        let reason = only_error(&node, ann::PUBLIC_KEY);
        assert_eq!(reason, Reason::BadKey(KeyError::Length(len)));
        assert!(reason.to_string().contains("32 bytes"), "{reason}");
    }
}

#[test]
fn all_zero_and_low_order_keys() {
    let zero = STANDARD.encode([0u8; 32]);
    let node = valid_node(&[(ann::NEXT_PUBLIC_KEY, &zero)], &[]);
    let reason = only_error(&node, ann::NEXT_PUBLIC_KEY);
    assert_eq!(reason, Reason::BadKey(KeyError::AllZero));

    // u = 1: a point of order 4 on the curve.
    let mut one = [0u8; 32];
    one[0] = 1;
    let node = valid_node(&[(ann::PUBLIC_KEY, &STANDARD.encode(one))], &[]);
    let reason = only_error(&node, ann::PUBLIC_KEY);
    assert_eq!(reason, Reason::BadKey(KeyError::LowOrder));
    assert!(reason.to_string().contains("low-order"));
}

#[test]
fn next_key_must_differ() {
    let current = key(1).to_base64();
    let node = valid_node(&[(ann::NEXT_PUBLIC_KEY, &current)], &[]);
    assert_eq!(
        only_error(&node, ann::NEXT_PUBLIC_KEY),
        Reason::NextKeyIsCurrent
    );
}

#[test]
fn non_integer_generation() {
    for bad in ["three", "-1", "+1", "1.5", "", "18446744073709551616"] {
        let node = valid_node(&[(ann::KEY_GENERATION, bad)], &[]);
        let reason = only_error(&node, ann::KEY_GENERATION);
        assert!(matches!(reason, Reason::NotAnInteger { .. }), "{bad}");
    }
    let node = valid_node(&[(ann::KEY_GENERATION, " 18446744073709551615\n")], &[]);
    assert_eq!(decode(&node, &cfg()).unwrap().key_generation, u64::MAX);
}

#[test]
fn bad_timestamps() {
    for bad in [
        "yesterday",
        "2026-11-21",
        "2026-11-21T11:36:24",
        "20261121T113624Z",
        "2026-11-21T11:36:24+01",
        "2026-11-21T11:36:24Z[UTC]",
        "2026-13-21T11:36:24Z",
        "2026-11-21T11:36:24.Z",
    ] {
        let node = valid_node(&[(ann::KEY_CREATED, bad)], &[]);
        let reason = only_error(&node, ann::KEY_CREATED);
        assert!(matches!(reason, Reason::BadTimestamp { .. }), "{bad}");
        assert!(reason.to_string().contains("RFC 3339"));
    }
    for (good, want) in [
        ("2026-11-21T12:36:24+01:00", "2026-11-21T11:36:24Z"),
        ("2026-11-21t11:36:24.5z", "2026-11-21T11:36:24.5Z"),
        ("2026-11-21 11:36:24Z", "2026-11-21T11:36:24Z"),
    ] {
        let node = valid_node(&[(ann::KEY_CREATED, good)], &[]);
        assert_eq!(decode(&node, &cfg()).unwrap().key_created, Some(ts(want)));
    }
}

#[test]
fn unparsable_cidr() {
    for bad in [
        "10.244.1.0",
        "10.244.1.0/33",
        "banana/8",
        "010.244.1.0/24",
        "::/-1",
    ] {
        let node = valid_node(&[(ann::POD_CIDRS, bad)], &[]);
        let reason = only_error(&node, ann::POD_CIDRS);
        assert!(matches!(reason, Reason::BadCidr { .. }), "{bad}: {reason}");
    }
}

#[test]
fn empty_list_entry() {
    let node = valid_node(
        &[(ann::POD_CIDRS, "10.244.1.0/24,,fd00:10:244:1::/64")],
        &[],
    );
    assert_eq!(only_error(&node, ann::POD_CIDRS), Reason::EmptyListEntry);
}

#[test]
fn host_bits_are_non_canonical() {
    let node = valid_node(&[(ann::POD_CIDRS, "10.244.1.1/24")], &[]);
    let reason = only_error(&node, ann::POD_CIDRS);
    assert_eq!(
        reason,
        Reason::NonCanonicalCidr {
            given: "10.244.1.1/24".to_owned(),
            canonical: net("10.244.1.0/24"),
        }
    );
    assert!(reason.to_string().contains("write it as 10.244.1.0/24"));

    // The brief's example, on a node without spec.podCIDRs.
    let node = node_of(&[(ann::POD_CIDRS, "10.1.0.1/24")], &[]);
    let errors = decode(&node, &cfg()).unwrap_err().errors;
    let error = errors.iter().find(|e| e.field == ann::POD_CIDRS).unwrap();
    assert!(error.to_string().contains("10.1.0.0/24"), "{error}");
}

#[test]
fn upper_case_ipv6_is_non_canonical() {
    let node = valid_node(&[(ann::POD_CIDRS, "FD00:10:244:1::/64")], &[]);
    let reason = only_error(&node, ann::POD_CIDRS);
    assert!(
        reason.to_string().contains("fd00:10:244:1::/64"),
        "{reason}"
    );

    let node = node_of(&[(ann::POD_CIDRS, "2001:DB8::/32")], &[]);
    let errors = decode(&node, &cfg()).unwrap_err().errors;
    assert!(errors.contains(&NodeError {
        field: ann::POD_CIDRS.to_owned(),
        reason: Reason::NonCanonicalCidr {
            given: "2001:DB8::/32".to_owned(),
            canonical: net("2001:db8::/32"),
        },
    }));
}

#[test]
fn bad_spec_pod_cidr_names_the_spec_field() {
    let mut node = valid_node(&[], &[]);
    node.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.1.0/24".into(), "x".into()]);
    let reason = only_error(&node, SPEC_POD_CIDRS);
    assert!(matches!(reason, Reason::BadCidr { .. }));
}

#[test]
fn legacy_spec_pod_cidr_is_used_when_plural_is_empty() {
    let mut node = valid_node(&[(ann::POD_CIDRS, "10.244.1.0/25")], &[]);
    let spec = node.spec.as_mut().unwrap();
    spec.pod_cidrs = None;
    spec.pod_cidr = Some("10.244.1.0/24".into());
    assert_eq!(
        decode(&node, &cfg()).unwrap().pod_cidrs,
        vec![net("10.244.1.0/24")]
    );
    node.spec.as_mut().unwrap().pod_cidr = Some("10.244.1.1/24".into());
    let reason = only_error(&node, SPEC_POD_CIDR);
    assert!(matches!(reason, Reason::NonCanonicalCidr { .. }));
}

#[test]
fn spec_pod_cidrs_are_authoritative() {
    // A narrower claim is fine; the peer still gets the whole allocation.
    let node = valid_node(&[(ann::POD_CIDRS, "10.244.1.128/25")], &[]);
    let record = decode(&node, &cfg()).unwrap();
    assert_eq!(
        record.pod_cidrs,
        vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")]
    );

    let node = valid_node(&[(ann::POD_CIDRS, "10.244.1.0/24,10.244.2.0/24")], &[]);
    let reason = only_error(&node, ann::POD_CIDRS);
    assert_eq!(
        reason,
        Reason::CidrOutsidePodCidrs {
            cidr: net("10.244.2.0/24"),
            allowed: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
        }
    );
    assert!(reason.to_string().contains("spec.podCIDRs"));
}

#[test]
fn without_spec_claims_must_lie_in_cluster_cidr() {
    let good = node_of(
        &[
            (ann::PUBLIC_KEY, key(1).to_base64().as_str()),
            (ann::ENDPOINT, "192.0.2.10:51820"),
            (
                ann::POD_CIDRS,
                "10.244.9.0/24, fd00:10:244:9::/64 ,10.244.9.0/24",
            ),
        ],
        &[],
    );
    let record = decode(&good, &cfg()).unwrap();
    assert_eq!(
        record.pod_cidrs,
        vec![net("10.244.9.0/24"), net("fd00:10:244:9::/64")]
    );

    let bad = node_of(
        &[
            (ann::PUBLIC_KEY, key(1).to_base64().as_str()),
            (ann::ENDPOINT, "192.0.2.10:51820"),
            (ann::POD_CIDRS, "10.245.0.0/24"),
        ],
        &[],
    );
    let reason = only_error(&bad, ann::POD_CIDRS);
    assert_eq!(
        reason,
        Reason::CidrOutsideClusterCidr {
            cidr: net("10.245.0.0/24"),
            cluster: cfg().cluster_cidrs,
        }
    );
    assert!(reason.to_string().contains("10.244.0.0/16"));

    let unconfigured = decode(&bad, &ValidationConfig::default()).unwrap_err();
    assert!(unconfigured.errors[0]
        .to_string()
        .contains("no cluster pod CIDR"));
}

#[test]
fn no_pod_cidrs_at_all() {
    let base = [
        (ann::PUBLIC_KEY, key(1).to_base64()),
        (ann::ENDPOINT, "192.0.2.10:51820".to_owned()),
    ];
    let pairs: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let rejected = decode(&node_of(&pairs, &[]), &cfg()).unwrap_err();
    assert_eq!(rejected.errors.len(), 1);
    assert_eq!(rejected.errors[0].field, ann::POD_CIDRS);
    assert_eq!(rejected.errors[0].reason, Reason::NoPodCidrs);
    // Published key and endpoint but nothing to route: a real problem.
    assert!(!rejected.not_ready());

    let mut empty = pairs.clone();
    empty.push((ann::POD_CIDRS, " "));
    assert_eq!(
        only_error(&node_of(&empty, &[]), ann::POD_CIDRS),
        Reason::NoPodCidrs
    );
}

#[test]
fn endpoint_port_zero() {
    let node = valid_node(&[(ann::ENDPOINT, "192.0.2.10:0")], &[]);
    assert_eq!(only_error(&node, ann::ENDPOINT), Reason::PortZero);
}

#[test]
fn host_name_endpoint_is_rejected() {
    let node = valid_node(&[(ann::ENDPOINT, "example.com:51820")], &[]);
    let reason = only_error(&node, ann::ENDPOINT);
    assert!(matches!(reason, Reason::BadEndpoint { .. }));
    assert!(reason.to_string().contains("host names are not allowed"));
}

#[test]
fn ipv6_endpoints() {
    let node = valid_node(&[(ann::ENDPOINT, "[2001:db8::1]:51820")], &[]);
    assert_eq!(
        decode(&node, &cfg()).unwrap().endpoint,
        "[2001:db8::1]:51820".parse().unwrap()
    );
    for bad in ["::1:51820", "[2001:DB8::1]:51820", "192.0.2.10:051820"] {
        let node = valid_node(&[(ann::ENDPOINT, bad)], &[]);
        let reason = only_error(&node, ann::ENDPOINT);
        assert!(
            matches!(
                reason,
                Reason::NonCanonicalEndpoint { .. } | Reason::BadEndpoint { .. }
            ),
            "{bad}: {reason}"
        );
    }
    let node = valid_node(&[(ann::ENDPOINT, "[2001:DB8::1]:51820")], &[]);
    assert!(only_error(&node, ann::ENDPOINT)
        .to_string()
        .contains("write it as [2001:db8::1]:51820"));
}

#[test]
fn unusable_endpoints() {
    // (endpoint, a word the reason must name)
    let cases = [
        ("0.0.0.0:51820", "unspecified"),
        ("[::]:51820", "unspecified"),
        ("[::ffff:0.0.0.0]:51820", "unspecified"),
        ("0.1.2.3:51820", "this network"),
        ("127.0.0.1:51820", "loopback"),
        ("127.255.0.9:51820", "loopback"),
        ("[::1]:51820", "loopback"),
        ("[::ffff:127.0.0.1]:51820", "loopback"),
        ("224.0.0.1:51820", "multicast"),
        ("239.255.255.250:51820", "multicast"),
        ("[ff02::1]:51820", "multicast"),
        ("[ff0e::1]:51820", "multicast"),
        ("[::ffff:224.0.0.5]:51820", "multicast"),
        ("255.255.255.255:51820", "broadcast"),
        ("[::ffff:255.255.255.255]:51820", "broadcast"),
        ("169.254.0.1:51820", "link-local"),
        ("169.254.169.254:51820", "link-local"),
        ("[fe80::1]:51820", "link-local"),
        ("[febf:ffff::1]:51820", "link-local"),
        ("[::ffff:169.254.1.1]:51820", "link-local"),
        ("[fe80::1%2]:51820", "zone index"),
    ];
    for (bad, word) in cases {
        for field in [ann::ENDPOINT, ann::FORCE_ENDPOINT] {
            let node = valid_node(&[(field, bad)], &[]);
            let reason = only_error(&node, field);
            let Reason::UnusableEndpoint { endpoint, why } = &reason else {
                panic!("{field}={bad}: {reason}");
            };
            assert_eq!(*endpoint, bad.parse::<SocketAddr>().unwrap());
            assert!(why.contains(word), "{bad}: {why}");
            // Every reason ends with the fix, naming where the value comes from.
            assert!(why.contains("force-endpoint"), "{bad}: {why}");
            assert!(why.contains("--endpoint"), "{bad}: {why}");
            assert!(reason.to_string().contains(bad.trim_end_matches(":51820")));
        }
    }
}

#[test]
fn ipv4_mapped_endpoints_must_be_written_as_ipv4() {
    for field in [ann::ENDPOINT, ann::FORCE_ENDPOINT] {
        let node = valid_node(&[(field, "[::ffff:192.0.2.1]:51820")], &[]);
        let reason = only_error(&node, field);
        assert_eq!(
            reason,
            Reason::NonCanonicalEndpoint {
                given: "[::ffff:192.0.2.1]:51820".to_owned(),
                canonical: "192.0.2.1:51820".parse().unwrap(),
            }
        );
        assert!(reason.to_string().contains("write it as 192.0.2.1:51820"));
    }
}

#[test]
fn endpoints_next_to_the_unusable_ranges_are_fine() {
    for good in [
        "1.0.0.1:51820",
        "126.255.255.255:51820",
        "128.0.0.1:51820",
        "169.253.255.255:51820",
        "169.255.0.1:51820",
        "223.255.255.255:51820",
        "255.255.255.254:51820",
        "10.0.0.1:51820",
        "192.168.1.1:51820",
        "100.64.0.1:51820",
        "[::2]:51820",
        "[fec0::1]:51820",
        "[fe7f::1]:51820",
        "[fd00::1]:51820",
        "[2001:db8::1]:51820",
    ] {
        let addr: SocketAddr = good.parse().unwrap();
        assert_eq!(unusable_endpoint(&addr), None, "{good}");
        let node = valid_node(&[(ann::ENDPOINT, good)], &[]);
        assert_eq!(decode(&node, &cfg()).map(|r| r.endpoint), Ok(addr));
    }
}

#[test]
fn bad_keepalive() {
    for bad in ["65536", "-1", "25s", ""] {
        let node = valid_node(&[(ann::PERSISTENT_KEEPALIVE, bad)], &[]);
        let reason = only_error(&node, ann::PERSISTENT_KEEPALIVE);
        assert!(matches!(reason, Reason::BadKeepalive { .. }), "{bad}");
    }
}

#[test]
fn oversized_values_are_not_parsed() {
    let huge = "A".repeat(5000);
    for field in [ann::PUBLIC_KEY, ann::POD_CIDRS, ann::FORCE_ENDPOINT] {
        let node = valid_node(&[(field, &huge)], &[]);
        assert_eq!(only_error(&node, field), Reason::Oversized { len: 5000 });
    }
    let exactly = format!("{}25", "0".repeat(MAX_VALUE_LEN - 2));
    let node = valid_node(&[(ann::PERSISTENT_KEEPALIVE, &exactly)], &[]);
    assert_eq!(
        decode(&node, &cfg()).unwrap().persistent_keepalive,
        Some(25)
    );
}

#[test]
fn other_tools_annotations_are_ignored() {
    let huge = "x".repeat(100_000);
    let node = valid_node(
        &[
            ("kubectl.kubernetes.io/last-applied-configuration", &huge),
            ("wgmesh.dev/some-future-key", "whatever"),
        ],
        &[],
    );
    assert!(decode(&node, &cfg()).is_ok());
}

#[test]
fn echoed_input_is_shortened() {
    let long = "x".repeat(1000);
    let node = valid_node(&[(ann::ENDPOINT, &long)], &[]);
    assert!(only_error(&node, ann::ENDPOINT).to_string().len() < 400);
}

#[test]
fn all_problems_are_reported_in_order() {
    let mut node = valid_node(
        &[
            (ann::PUBLIC_KEY, "short"),
            (ann::KEY_GENERATION, "x"),
            (ann::KEY_CREATED, "y"),
            (ann::ENDPOINT, "example.com:1"),
            (ann::PERSISTENT_KEEPALIVE, "-5"),
            (ann::POD_CIDRS, "10.244.1.1/24,,10.9.0.0/16"),
        ],
        &[],
    );
    node.metadata.name = None;
    let rejected = rejected(&node);
    let fields: Vec<&str> = rejected.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            METADATA_NAME,
            ann::PUBLIC_KEY,
            ann::KEY_GENERATION,
            ann::KEY_CREATED,
            ann::ENDPOINT,
            ann::PERSISTENT_KEEPALIVE,
            ann::POD_CIDRS,
            ann::POD_CIDRS,
            ann::POD_CIDRS,
        ]
    );
    assert!(matches!(
        rejected.errors[8].reason,
        Reason::CidrOutsidePodCidrs { .. }
    ));
    assert_eq!(rejected.created, Some(ts("2026-01-02T03:04:05Z")));
    assert!(!rejected.not_ready());
    assert_eq!(rejected, self::rejected(&node), "stable across decodes");
}

#[test]
fn force_endpoint_wins() {
    // Even over a broken published endpoint: that is what it is for.
    let node = valid_node(
        &[
            (ann::FORCE_ENDPOINT, "[2001:db8::7]:4500"),
            (ann::ENDPOINT, "garbage"),
        ],
        &[],
    );
    let record = decode(&node, &cfg()).unwrap();
    assert_eq!(record.endpoint, "[2001:db8::7]:4500".parse().unwrap());
    assert!(record.endpoint_forced);

    let node = valid_node(
        &[(ann::FORCE_ENDPOINT, "203.0.113.1:51820")],
        &[ann::ENDPOINT],
    );
    assert!(decode(&node, &cfg()).unwrap().endpoint_forced);

    let node = valid_node(&[(ann::FORCE_ENDPOINT, "host:1")], &[]);
    let reason = only_error(&node, ann::FORCE_ENDPOINT);
    assert!(matches!(reason, Reason::BadEndpoint { .. }));
}

#[test]
fn not_ready_only_for_unpublished_identity() {
    let fresh = node_of(&[], &[]);
    let rejected = decode(&fresh, &cfg()).unwrap_err();
    assert_eq!(rejected.errors.len(), 3, "{rejected}");
    assert!(rejected.not_ready());

    let with_spec = node_of(&[], &["10.244.1.0/24"]);
    assert!(decode(&with_spec, &cfg()).unwrap_err().not_ready());

    let key_only = valid_node(&[], &[ann::PUBLIC_KEY]);
    assert!(decode(&key_only, &cfg()).unwrap_err().not_ready());

    let also_broken = valid_node(&[(ann::KEY_GENERATION, "x")], &[ann::PUBLIC_KEY]);
    assert!(!decode(&also_broken, &cfg()).unwrap_err().not_ready());

    let bad_key = valid_node(&[(ann::PUBLIC_KEY, "x")], &[]);
    assert!(!decode(&bad_key, &cfg()).unwrap_err().not_ready());
}

#[test]
fn surrounding_whitespace_is_tolerated() {
    let key = format!("  {}\n", key(1).to_base64());
    let node = valid_node(
        &[
            (ann::PUBLIC_KEY, &key),
            (ann::ENDPOINT, " 192.0.2.10:51820\n"),
            (ann::PERSISTENT_KEEPALIVE, "25\n"),
        ],
        &[],
    );
    assert!(decode(&node, &cfg()).is_ok());
    let inner = valid_node(&[(ann::ENDPOINT, "192.0.2.10: 51820")], &[]);
    assert!(decode(&inner, &cfg()).is_err());
}

#[test]
fn merge_patch_is_none_in_steady_state() {
    let node = valid_node(&[(ann::FORCE_ENDPOINT, "203.0.113.1:1")], &[]);
    assert_eq!(merge_patch(&node, &local()), None);
}

#[test]
fn merge_patch_contains_only_changed_keys() {
    let node = valid_node(&[("example.com/other", "keep")], &[]);
    let mut desired = local();
    desired.endpoint = "192.0.2.11:51820".parse().unwrap();
    desired.key_generation = 4;
    let patch = merge_patch(&node, &desired).unwrap();
    assert_eq!(
        patch,
        serde_json::json!({"metadata": {"annotations": {
            "wgmesh.dev/endpoint": "192.0.2.11:51820",
            "wgmesh.dev/key-generation": "4",
        }}})
    );

    let mut bare = node.clone();
    bare.metadata.annotations = None;
    let patch = merge_patch(&bare, &desired).unwrap();
    // Every agent-owned key local() sets (all of them).
    assert_eq!(
        patch["metadata"]["annotations"].as_object().unwrap().len(),
        9
    );

    // A new head is one key; a head withdrawn is removed with null.
    let mut moved = local();
    moved.audit_head = Some(head(8));
    let patch = merge_patch(&node, &moved).unwrap();
    assert_eq!(
        patch,
        serde_json::json!({"metadata": {"annotations": {
            "wgmesh.dev/audit-head": format!("8:{}", "ab".repeat(32)),
        }}})
    );
    moved.audit_head = None;
    let patch = merge_patch(&node, &moved).unwrap();
    assert_eq!(
        patch["metadata"]["annotations"][ann::AUDIT_HEAD],
        Value::Null
    );
}

#[test]
fn merge_patch_removes_next_key_with_null() {
    let node = valid_node(&[], &[]);
    let mut desired = local();
    desired.public_key = key(2);
    desired.next_public_key = None;
    desired.key_generation = 4;
    let patch = merge_patch(&node, &desired).unwrap();
    let annotations = patch["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(annotations[ann::NEXT_PUBLIC_KEY], Value::Null);
    assert_eq!(annotations[ann::PUBLIC_KEY], key(2).to_base64());
    assert_eq!(annotations.len(), 3);
    assert!(!annotations.contains_key(ann::PERSISTENT_KEEPALIVE));
}

fn arb_key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>()
        .prop_filter("all-zero private key", |b| *b != [0u8; 32])
        .prop_map(|b| {
            PrivateKey::from_base64(&STANDARD.encode(b))
                .unwrap()
                .public_key()
        })
}

fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
    let v4 = (any::<[u8; 4]>(), 1..=u16::MAX)
        .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port)));
    let v6 = (any::<[u8; 16]>(), 1..=u16::MAX)
        .prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0)));
    prop_oneof![v4, v6]
        .prop_filter("usable", |a| unusable_endpoint(a).is_none())
        .prop_filter("canonical", |a| a.ip().to_canonical() == a.ip())
}

fn arb_cidr() -> impl Strategy<Value = IpNet> {
    let v4 = (any::<[u8; 4]>(), 0u8..=32)
        .prop_map(|(ip, len)| IpNet::new(Ipv4Addr::from(ip).into(), len).unwrap());
    let v6 = (any::<[u8; 16]>(), 0u8..=128)
        .prop_map(|(ip, len)| IpNet::new(Ipv6Addr::from(ip).into(), len).unwrap());
    prop_oneof![v4, v6]
}

fn arb_local() -> impl Strategy<Value = LocalAnnotations> {
    (
        arb_key(),
        any::<u64>(),
        // Year 0 through 9999: the range RFC 3339 can write.
        -62_167_219_200i64..=253_402_300_799,
        proptest::option::of(arb_key()),
        arb_endpoint(),
        proptest::collection::vec(arb_cidr(), 1..5),
        proptest::option::of((1..=u64::MAX, any::<[u8; 32]>())),
    )
        .prop_filter("next key differs", |(k, _, _, n, _, _, _)| Some(*k) != *n)
        .prop_map(
            |(public_key, key_generation, secs, next, endpoint, cidrs, head)| LocalAnnotations {
                public_key,
                key_generation,
                key_created: Timestamp::from_second(secs).unwrap(),
                next_public_key: next,
                endpoint,
                pod_cidrs: cidrs,
                audit_head: head.map(|(seq, hash)| AuditHead { seq, hash }),
                last_rotation: None,
                learned_prefixes: Vec::new(),
            },
        )
}

/// Values that get past the first checks sometimes: fragments of valid
/// syntax, arbitrary unicode, and values around and beyond the size limit.
fn arb_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fA-F:.\\[\\]/%, +-]{0,40}",
        "[0-9TZz:. +-]{0,30}",
        "[A-Za-z0-9+/=]{40,48}",
        (0usize..3, "\\PC{1,3}").prop_map(|(i, s)| s.repeat(MAX_VALUE_LEN - 1 + i)),
        proptest::collection::vec(any::<char>(), 4000..6000).prop_map(|c| c.into_iter().collect()),
    ]
}

fn arb_key_name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(ann::AGENT_OWNED).prop_map(str::to_owned),
        Just(ann::FORCE_ENDPOINT.to_owned()),
        Just(ann::PERSISTENT_KEEPALIVE.to_owned()),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decode_never_panics(
        annotations in proptest::collection::btree_map(arb_key_name(), arb_value(), 0..10),
        spec in proptest::collection::vec(arb_value(), 0..3),
        legacy in proptest::option::of(arb_value()),
        cluster in proptest::collection::vec(arb_cidr(), 0..3),
    ) {
        let mut node = node_with(annotations, spec);
        if let Some(spec) = node.spec.as_mut() {
            spec.pod_cidr = legacy;
        }
        let cfg = ValidationConfig { cluster_cidrs: cluster };
        if let Err(rejected) = decode(&node, &cfg) {
            prop_assert!(!rejected.errors.is_empty());
            let _ = rejected.to_string();
            let _ = rejected.not_ready();
        }
    }

    #[test]
    fn node_ips_are_usable_sorted_unique_and_outside_the_cluster(
        addresses in proptest::collection::vec(
            (
                prop_oneof![Just("InternalIP"), Just("ExternalIP")],
                prop_oneof![
                    any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
                    any::<[u8; 16]>().prop_map(|b| Ipv6Addr::from(b).to_string()),
                    any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_ipv6_mapped().to_string()),
                    any::<String>(),
                ],
            ),
            0..8,
        ),
        cluster in proptest::collection::vec(arb_cidr(), 0..3),
    ) {
        let pairs: Vec<(&str, &str)> =
            addresses.iter().map(|(t, a)| (*t, a.as_str())).collect();
        let node = with_addresses(valid_node(&[], &[]), &pairs);
        let cfg = ValidationConfig { cluster_cidrs: cluster };
        let ips = node_ips(&node, &cfg);
        prop_assert!(ips.windows(2).all(|w| w[0] < w[1]), "{ips:?}");
        for ip in &ips {
            prop_assert_eq!(ip.to_canonical(), *ip);
            prop_assert!(unusable_address(*ip).is_none(), "{ip}");
            prop_assert!(!cfg.cluster_cidrs.iter().any(|c| c.contains(ip)), "{ip}");
            let listed = addresses.iter().any(|(t, a)| {
                *t == "InternalIP" && a.parse::<IpAddr>().is_ok_and(|p| p.to_canonical() == *ip)
            });
            prop_assert!(listed, "{ip} was not an InternalIP");
        }
    }

    #[test]
    fn encode_then_decode_reproduces_local(local in arb_local(), use_spec in any::<bool>()) {
        let expected = canonical_set(local.pod_cidrs.iter().map(IpNet::trunc));
        let spec = if use_spec {
            expected.iter().map(IpNet::to_string).collect()
        } else {
            Vec::new()
        };
        let everything = ValidationConfig {
            cluster_cidrs: vec![net("0.0.0.0/0"), net("::/0")],
        };
        let node = node_with(encode(&local), spec);
        let record = decode(&node, &everything).map_err(|r| TestCaseError::fail(r.to_string()))?;
        prop_assert_eq!(record.public_key, local.public_key);
        prop_assert_eq!(record.key_generation, local.key_generation);
        prop_assert_eq!(record.key_created, Some(local.key_created));
        prop_assert_eq!(record.next_public_key, local.next_public_key);
        prop_assert_eq!(record.endpoint, local.endpoint);
        prop_assert!(!record.endpoint_forced);
        prop_assert_eq!(record.pod_cidrs, expected);
        prop_assert_eq!(record.audit_head, local.audit_head);
        prop_assert_eq!(merge_patch(&node, &local), None);
    }
}
