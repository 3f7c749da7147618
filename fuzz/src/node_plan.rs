//! `node_plan`: Node objects anyone with `patch nodes` can shape, through
//! [`node::decode`] and [`mesh::plan`].
//!
//! Every input builds up to eight Nodes. Each field is either taken from a
//! small pool of values (valid keys, endpoints, CIDRs and node addresses that
//! collide on purpose, so that the planner's conflict rules run), a pool value
//! mutated (whitespace, case, leading zeros, truncation), arbitrary bytes, or an
//! oversized value. The Nodes are decoded with one [`ValidationConfig`] and the
//! results planned with one [`MeshConfig`], both chosen by the header.
//!
//! Invariants, beyond "never panics":
//! - decode: a rejection has at least one error, and every error names a field
//!   a user can edit (a `wgmesh.dev/` annotation, `spec.podCIDRs`,
//!   `spec.podCIDR` or `metadata.name`) and says so first in its message; an
//!   accepted record keeps the Node's name and holds canonical, sorted pod
//!   CIDRs; decoding is deterministic;
//! - plan: no two peers share a public key, an allowed IP (no prefix of one
//!   overlaps a prefix of another) or an endpoint; no peer has the local key
//!   (the key store's, else the local record's) or is the local node; every
//!   peer's allowed IPs lie inside what its Node claims (its pod CIDRs, or a
//!   host route for one of its node addresses) and its key is the Node's; every
//!   remote name ends up exactly once in peers or exclusions; a successor is
//!   never the local key nor another peer's key;
//! - the plan is the same for the Nodes in reverse order, rotated, and with an
//!   entry repeated verbatim.
//!
//! Input (every read past the end gives 0, so any prefix is a valid input):
//! `[flags] [local name]`, then per Node
//! `[name] [created] [mask lo] [mask hi] [value]... [spec] [cidr]... [n addrs] [addr]...`.
//! Flags bits 0-2: Nodes - 1; bit 3: the key store's key is given
//! ([`MeshConfig::local_public_key`]); bit 4: the local endpoint is given;
//! bits 5-6: cluster CIDRs (0 v4 + v6, 1 v4, 2 none, 3 v6); bit 7: validation
//! uses no cluster CIDRs. The mask selects which of [`ANNOTATIONS`] the Node
//! carries; each present one reads a [`Reader::value`].

use std::net::SocketAddr;
use std::sync::OnceLock;

use ipnet::IpNet;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use wgmesh::keys::{PrivateKey, PublicKey};
use wgmesh::mesh::{self, Exclusion, MeshConfig, Plan};
use wgmesh::node::{
    self, annotations as ann, NodeRecord, Rejected, ValidationConfig, METADATA_NAME, SPEC_POD_CIDR,
    SPEC_POD_CIDRS,
};

/// The annotations a mask can set, in mask-bit order. The last one is unknown
/// to the codec (it must be ignored, never rejected).
pub const ANNOTATIONS: [&str; 11] = [
    ann::PUBLIC_KEY,
    ann::KEY_GENERATION,
    ann::KEY_CREATED,
    ann::NEXT_PUBLIC_KEY,
    ann::ENDPOINT,
    ann::POD_CIDRS,
    ann::AUDIT_HEAD,
    ann::FORCE_ENDPOINT,
    ann::PERSISTENT_KEEPALIVE,
    ann::ROTATE_REQUESTED,
    "wgmesh.dev/from-the-future",
];

const NAMES: [&str; 5] = ["node-a", "node-b", "node-c", "node-d", "node-e"];
const ENDPOINTS: [&str; 8] = [
    "192.0.2.1:51820",
    "192.0.2.2:51820",
    "192.0.2.1:51821",
    "[2001:db8::1]:51820",
    "[::ffff:192.0.2.2]:51820",
    "10.244.1.1:51820",
    "127.0.0.1:51820",
    "192.0.2.3:0",
];
const CIDRS: [&str; 8] = [
    "10.244.0.0/24",
    "10.244.1.0/24",
    "10.244.0.0/23",
    "10.244.1.128/25",
    "fd00:10:244::/64",
    "fd00:10:244:1::/64",
    "10.245.0.0/24",
    "10.244.2.1/24",
];
const NODE_IPS: [&str; 8] = [
    "192.0.2.1",
    "192.0.2.2",
    "192.0.2.9",
    "2001:db8::1",
    "::ffff:192.0.2.3",
    "10.244.1.5",
    "127.0.0.1",
    "fe80::1",
];
const TIMES: [&str; 4] = [
    "2026-01-01T00:00:00Z",
    "2026-11-21T11:36:24Z",
    "1970-01-01T00:00:00Z",
    "2026-01-01T00:00:00.5+01:00",
];
const INTEGERS: [&str; 5] = ["0", "1", "25", "65535", "18446744073709551616"];
const HEADS: [&str; 3] = [
    "3:0000000000000000000000000000000000000000000000000000000000000000",
    "0:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "7:abc",
];

/// Runs one input; panics when an invariant fails.
pub fn run(data: &[u8]) {
    let mut r = Reader { data, pos: 0 };
    let flags = r.byte();
    let local_name = NAMES[usize::from(r.byte()) % NAMES.len()];
    let cluster: Vec<IpNet> = match flags >> 5 & 3 {
        0 => vec![net("10.244.0.0/16"), net("fd00:10:244::/48")],
        1 => vec![net("10.244.0.0/16")],
        2 => vec![],
        _ => vec![net("fd00:10:244::/48")],
    };
    let validation = ValidationConfig {
        cluster_cidrs: if flags & 0x80 != 0 {
            vec![]
        } else {
            cluster.clone()
        },
    };
    let cfg = MeshConfig {
        local_node: local_name.to_owned(),
        interface: "wgmesh0".to_owned(),
        cluster_cidrs: cluster,
        default_keepalive: None,
        local_public_key: (flags & 0x08 != 0).then(|| keys()[0]),
        local_endpoint: (flags & 0x10 != 0).then(|| endpoint(ENDPOINTS[0])),
        handshakes: Default::default(),
    };

    let count = usize::from(flags & 7) + 1;
    let nodes: Vec<Node> = (0..count).map(|_| r.node()).collect();
    let entries: Vec<Result<NodeRecord, Rejected>> = nodes
        .iter()
        .map(|n| {
            let decoded = node::decode(n, &validation);
            check_decode(n, &decoded);
            assert_eq!(
                node::decode(n, &validation),
                decoded,
                "decode is not deterministic"
            );
            decoded
        })
        .collect();

    let plan = mesh::plan(&cfg, &entries);
    check_plan(&cfg, &entries, &plan);

    let mut reversed = entries.clone();
    reversed.reverse();
    assert_eq!(
        mesh::plan(&cfg, &reversed),
        plan,
        "plan depends on input order"
    );
    let mut rotated = entries.clone();
    rotated.rotate_left(1);
    assert_eq!(
        mesh::plan(&cfg, &rotated),
        plan,
        "plan depends on input order"
    );
    let mut repeated = entries.clone();
    repeated.push(entries[entries.len() - 1].clone());
    assert_eq!(
        without_entry_counts(mesh::plan(&cfg, &repeated)),
        without_entry_counts(plan),
        "an entry repeated verbatim changed the plan"
    );
}

/// The plan with [`Exclusion::AmbiguousName`]'s count zeroed: the planner
/// counts every entry of an ambiguous name, verbatim repeats included (only
/// the wording of the exclusion changes; who is excluded does not).
fn without_entry_counts(mut plan: Plan) -> Plan {
    for e in &mut plan.excluded {
        if let Exclusion::AmbiguousName { entries } = &mut e.reason {
            *entries = 0;
        }
    }
    plan
}

fn check_decode(n: &Node, decoded: &Result<NodeRecord, Rejected>) {
    match decoded {
        Err(rejected) => {
            assert!(!rejected.errors.is_empty(), "a rejection without errors");
            for e in &rejected.errors {
                let known = ANNOTATIONS.contains(&e.field.as_str())
                    || [SPEC_POD_CIDRS, SPEC_POD_CIDR, METADATA_NAME].contains(&e.field.as_str());
                assert!(known, "error names no editable field: {e:?}");
                assert!(
                    e.to_string().starts_with(&format!("{}: ", e.field)),
                    "message does not name its field first: {e}"
                );
            }
            let name = n.metadata.name.clone().unwrap_or_default();
            assert_eq!(rejected.node, name, "rejection names another node");
        }
        Ok(record) => {
            assert_eq!(Some(&record.name), n.metadata.name.as_ref());
            assert!(
                record.pod_cidrs.iter().all(|c| c.trunc() == *c)
                    && record.pod_cidrs.windows(2).all(|w| w[0] < w[1]),
                "pod CIDRs not canonical: {:?}",
                record.pod_cidrs
            );
            assert!(!record.pod_cidrs.is_empty(), "a record without pod CIDRs");
        }
    }
}

fn check_plan(cfg: &MeshConfig, entries: &[Result<NodeRecord, Rejected>], plan: &Plan) {
    let local_key = cfg
        .local_public_key
        .or(plan.local.as_ref().map(|r| r.public_key));
    let peers = &plan.peers;
    for (i, p) in peers.iter().enumerate() {
        let c = &p.config;
        assert_ne!(p.node, cfg.local_node, "the local node is a peer");
        assert_ne!(
            Some(c.public_key),
            local_key,
            "{} has the local key",
            p.node
        );
        for q in &peers[i + 1..] {
            let d = &q.config;
            assert_ne!(
                c.public_key, d.public_key,
                "{} and {} share a key",
                p.node, q.node
            );
            assert!(
                c.endpoint.is_none() || c.endpoint != d.endpoint,
                "{} and {} share an endpoint",
                p.node,
                q.node
            );
            for a in &c.allowed_ips {
                for b in &d.allowed_ips {
                    assert!(
                        !a.contains(b) && !b.contains(a),
                        "{} ({a}) and {} ({b}) share allowed IPs",
                        p.node,
                        q.node
                    );
                }
            }
        }
        if let Some(next) = c.successor {
            assert_ne!(
                Some(next),
                local_key,
                "{}'s successor is the local key",
                p.node
            );
            assert!(
                peers.iter().all(|q| q.config.public_key != next),
                "{}'s successor is a peer's key",
                p.node
            );
        }
        // The record the peer stands for: names are unique among peers, and an
        // ambiguous name is excluded, so every entry by this name is equal.
        let record = entries
            .iter()
            .flatten()
            .find(|r| r.name == p.node)
            .unwrap_or_else(|| panic!("peer {} has no valid record", p.node));
        assert_eq!(
            c.public_key, record.public_key,
            "{}'s key is not its own",
            p.node
        );
        for ip in &c.allowed_ips {
            let claimed = record.pod_cidrs.iter().any(|cidr| cidr.contains(ip))
                || record
                    .node_ips
                    .iter()
                    .any(|a| IpNet::from(a.to_canonical()) == *ip);
            assert!(claimed, "{} allows {ip}, which it does not claim", p.node);
        }
    }

    let mut remote: Vec<&str> = entries
        .iter()
        .map(|e| match e {
            Ok(r) => r.name.as_str(),
            Err(r) => r.node.as_str(),
        })
        .filter(|n| *n != cfg.local_node)
        .collect();
    remote.sort_unstable();
    remote.dedup();
    let mut planned: Vec<&str> = peers
        .iter()
        .map(|p| p.node.as_str())
        .chain(plan.excluded.iter().map(|e| e.node.as_str()))
        .collect();
    planned.sort_unstable();
    assert_eq!(
        planned, remote,
        "every remote node is a peer or excluded, once"
    );
}

/// The pool's public keys, from fixed private keys (x25519 is too slow to run
/// per input).
fn keys() -> &'static [PublicKey; 4] {
    static KEYS: OnceLock<[PublicKey; 4]> = OnceLock::new();
    KEYS.get_or_init(|| {
        [1u8, 2, 3, 4].map(|b| match PrivateKey::from_bytes([b; 32]) {
            Ok(k) => k.public_key(),
            Err(e) => panic!("fixed private key {b}: {e}"),
        })
    })
}

fn key_texts() -> &'static [String; 6] {
    static TEXTS: OnceLock<[String; 6]> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let k = keys();
        [
            k[0].to_base64(),
            k[1].to_base64(),
            k[2].to_base64(),
            k[3].to_base64(),
            // All zero: a low-order point, which decode must reject.
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
            // Not 32 bytes.
            "AAAA".to_owned(),
        ]
    })
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("pool CIDR {s}: {e}"))
}

fn endpoint(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("pool endpoint {s}: {e}"))
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// `[len] [len bytes]`, as text (invalid UTF-8 replaced: annotation values
    /// are strings by the time the API server hands them out).
    fn text(&mut self) -> String {
        let len = usize::from(self.byte());
        let start = self.pos.min(self.data.len());
        let end = (start + len).min(self.data.len());
        self.pos += len;
        String::from_utf8_lossy(&self.data[start..end]).into_owned()
    }

    fn node(&mut self) -> Node {
        let name_sel = self.byte();
        let name = match name_sel {
            0xff => None,
            0xfe => Some(String::new()),
            0xfd => Some(self.text()),
            b => Some(NAMES[usize::from(b) % NAMES.len()].to_owned()),
        };
        // Few distinct times, so that ties (broken by name) happen.
        let created = match self.byte() {
            0 => None,
            b => Timestamp::from_second(i64::from(b % 8) * 1000)
                .ok()
                .map(Time),
        };
        let mask = u16::from_le_bytes([self.byte(), self.byte()]);
        let annotations = ANNOTATIONS
            .iter()
            .enumerate()
            .filter(|(i, _)| mask >> i & 1 != 0)
            .map(|(_, key)| (key.to_string(), self.value(key)))
            .collect();

        let spec = self.byte();
        let pod_cidrs: Vec<String> = (0..spec & 3).map(|_| self.cidr()).collect();
        let legacy = (spec & 4 != 0).then(|| self.cidr());
        let addresses: Vec<NodeAddress> = (0..self.byte() & 3)
            .map(|_| {
                let type_ = match self.byte() & 3 {
                    1 => "ExternalIP",
                    2 => "Hostname",
                    _ => "InternalIP",
                };
                let b = self.byte();
                let address = if b & 0x80 != 0 {
                    self.text()
                } else {
                    NODE_IPS[usize::from(b) % NODE_IPS.len()].to_owned()
                };
                NodeAddress {
                    address,
                    type_: type_.to_owned(),
                }
            })
            .collect();

        Node {
            metadata: ObjectMeta {
                name,
                creation_timestamp: created,
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: (spec & 8 == 0).then_some(pod_cidrs),
                pod_cidr: legacy,
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(addresses),
                ..NodeStatus::default()
            }),
        }
    }

    fn cidr(&mut self) -> String {
        let b = self.byte();
        if b & 0x80 != 0 {
            self.text()
        } else {
            CIDRS[usize::from(b) % CIDRS.len()].to_owned()
        }
    }

    /// `[sel]`: low 6 bits index the key's pool, top 2 bits the mode: 0 the
    /// pool value, 1 the pool value mutated (`[how]` follows), 2 arbitrary
    /// text, 3 the pool value padded past the size limit.
    fn value(&mut self, key: &str) -> String {
        let sel = self.byte();
        let i = usize::from(sel & 0x3f);
        let pick = |pool: &[&str]| pool[i % pool.len()].to_owned();
        let pooled = match key {
            ann::PUBLIC_KEY | ann::NEXT_PUBLIC_KEY => {
                let texts = key_texts();
                texts[i % texts.len()].clone()
            }
            ann::ENDPOINT | ann::FORCE_ENDPOINT => pick(&ENDPOINTS),
            // One or two CIDRs from the 6 bits.
            ann::POD_CIDRS => match i >> 3 {
                0 => CIDRS[i & 7].to_owned(),
                j => format!("{},{}", CIDRS[i & 7], CIDRS[j & 7]),
            },
            ann::KEY_CREATED | ann::ROTATE_REQUESTED => pick(&TIMES),
            ann::AUDIT_HEAD => pick(&HEADS),
            _ => pick(&INTEGERS),
        };
        match sel >> 6 {
            0 => pooled,
            1 => mutate(pooled, self.byte()),
            2 => self.text(),
            _ => format!("{pooled}{}", " 0".repeat(ann::MAX_VALUE_LEN)),
        }
    }
}

/// The near misses a hand-edited value has.
fn mutate(mut s: String, how: u8) -> String {
    match how % 8 {
        0 => format!(" \t{s}\n"),
        1 => s.to_uppercase(),
        2 => {
            s.pop();
            s
        }
        3 => format!("0{s}"),
        4 => s.replace(':', ":0"),
        5 => format!("{s},"),
        6 => s.replace(',', " , "),
        _ => {
            s.insert(s.len() / 2, char::from(how));
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool is what it claims to be: valid values decode, so that inputs
    /// reach the planner's conflict rules and not only the codec's errors.
    #[test]
    fn pool_values_build_a_mesh() {
        // Three nodes, all from the pool, no conflicts: node-a (local) and two
        // peers. Flags: 3 nodes, v4 + v6 cluster CIDRs.
        let data = crate::node_plan::seeds::mesh_of_three();
        run(&data);
        let mut r = Reader {
            data: &data,
            pos: 2,
        };
        let validation = ValidationConfig {
            cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/48")],
        };
        let decoded: Vec<_> = (0..3)
            .map(|_| node::decode(&r.node(), &validation))
            .collect();
        assert!(decoded.iter().all(Result::is_ok), "{decoded:?}");
        let cfg = MeshConfig {
            local_node: "node-a".into(),
            interface: "wgmesh0".into(),
            cluster_cidrs: validation.cluster_cidrs.clone(),
            default_keepalive: None,
            local_public_key: None,
            local_endpoint: None,
            handshakes: Default::default(),
        };
        let plan = mesh::plan(&cfg, &decoded);
        assert_eq!(plan.peers.len(), 2, "{plan:?}");
        assert!(plan.excluded.is_empty(), "{:?}", plan.excluded);
    }
}

/// Encoders of the seed inputs (`src/seeds.rs` writes them to disk).
pub mod seeds {
    /// Mask bits: public-key, endpoint, pod-cidrs.
    const MINIMAL: u16 = 1 | 1 << 4 | 1 << 5;

    /// One Node: pool name, created, annotations (each a pool index, mode 0,
    /// in mask-bit order), no spec.podCIDRs, one InternalIP.
    fn node(name: u8, created: u8, mask: u16, values: &[u8], addr: u8) -> Vec<u8> {
        let mut v = vec![name, created];
        v.extend(mask.to_le_bytes());
        v.extend(values);
        v.extend([0, 1, 0, addr]);
        v
    }

    /// node-a (local), node-b, node-c: distinct keys, endpoints and CIDRs.
    pub fn mesh_of_three() -> Vec<u8> {
        let mut v = vec![2, 0];
        v.extend(node(0, 1, MINIMAL, &[0, 0, 0], 0));
        v.extend(node(1, 2, MINIMAL, &[1, 1, 1], 1));
        v.extend(node(2, 3, MINIMAL, &[2, 3, 4], 2));
        v
    }

    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        let every = (1u16 << super::ANNOTATIONS.len()) - 1;
        vec![
            ("mesh_of_three", mesh_of_three()),
            (
                // node-b and node-c claim the same key, CIDR and endpoint;
                // the older one keeps them.
                "conflicts",
                {
                    let mut v = vec![2 | 0x08 | 0x10, 0];
                    v.extend(node(0, 1, MINIMAL, &[0, 0, 0], 0));
                    v.extend(node(1, 5, MINIMAL, &[1, 1, 1], 1));
                    v.extend(node(2, 3, MINIMAL, &[1, 1, 1], 2));
                    v
                },
            ),
            (
                // Every annotation, a staged rotation onto another node's key.
                "every_annotation",
                {
                    let mut v = vec![1, 0];
                    v.extend(node(0, 1, every, &[0, 1, 0, 2, 0, 0, 0, 0, 2, 1, 0], 0));
                    v.extend(node(1, 2, every, &[1, 2, 1, 0, 1, 1, 1, 1, 2, 1, 0], 1));
                    v
                },
            ),
        ]
    }
}
