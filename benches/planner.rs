//! What one reconcile costs in the pure core: `plan` over every Node, then
//! `diff` against the peers of the previous plan, when exactly one node's
//! endpoint changed (the common event in a steady cluster).
//!
//! `cargo bench --bench planner -- --warm-up-time 1 --measurement-time 3`
//! prints `plan+diff/100`, `plan+diff/1000` and `plan+diff/5000`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ipnet::{IpNet, Ipv4Net};
use jiff::Timestamp;
use wgmesh::keys::PublicKey;
use wgmesh::mesh::{diff, plan, MeshConfig, PeerChange};
use wgmesh::node::{NodeRecord, Rejected};

const SIZES: [usize; 3] = [100, 1_000, 5_000];

fn plan_and_diff(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan+diff");
    for n in SIZES {
        let cfg = config();
        let mut nodes = cluster(n);
        let previous = plan(&cfg, &nodes).peer_configs();
        move_one_endpoint(&mut nodes, n / 2);

        // Not timed: the scenario really is "one peer's endpoint changed".
        let changes = diff(&previous, &plan(&cfg, &nodes).peer_configs());
        assert_eq!(previous.len(), n - 1);
        assert!(
            matches!(
                changes.as_slice(),
                [PeerChange::Update {
                    endpoint: Some(_),
                    allowed_ips: None,
                    persistent_keepalive: None,
                    ..
                }]
            ),
            "{changes:?}"
        );

        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &nodes, |b, nodes| {
            b.iter(|| {
                let desired = plan(&cfg, black_box(nodes)).peer_configs();
                diff(black_box(&previous), &desired)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, plan_and_diff);
criterion_main!(benches);

fn config() -> MeshConfig {
    MeshConfig {
        local_node: node_name(0),
        interface: "wgmesh0".to_owned(),
        cluster_cidrs: vec![IpNet::V4(Ipv4Net::new_assert(
            Ipv4Addr::new(10, 0, 0, 0),
            8,
        ))],
        default_keepalive: Some(25),
        local_public_key: None,
        local_endpoint: None,
        handshakes: Default::default(),
    }
}

/// `n` valid Nodes (the local one included; `n` < 65,536) with distinct keys and
/// one /24 each out of 10.0.0.0/8, in a scrambled but fixed order, as a reflector's store
/// would hand them over.
fn cluster(n: usize) -> Vec<Result<NodeRecord, Rejected>> {
    let mut nodes: Vec<Result<NodeRecord, Rejected>> = (0..n).map(|i| Ok(node(i))).collect();
    nodes.sort_by_key(|entry| entry.as_ref().map(|r| r.public_key).ok());
    nodes
}

fn node(i: usize) -> NodeRecord {
    let index = u32::try_from(i).unwrap_or(u32::MAX);
    let [_, _, hi, lo] = index.to_be_bytes();
    NodeRecord {
        name: node_name(i),
        created: Some(Timestamp::from_second(1_700_000_000 + i64::from(index)).unwrap()),
        public_key: key(index),
        key_generation: 1,
        key_created: None,
        audit_head: None,
        next_public_key: None,
        endpoint: SocketAddr::from(([172, 16, hi, lo], 51820)),
        endpoint_forced: false,
        pod_cidrs: vec![IpNet::V4(Ipv4Net::new_assert(
            Ipv4Addr::new(10, hi, lo, 0),
            24,
        ))],
        persistent_keepalive: None,
        node_ips: Vec::new(),
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

/// A distinct, deterministic, well-spread key per index (splitmix64 output, with
/// the index itself in the last four bytes so no two can collide). The planner
/// never checks that a key is a curve point, so no real derivation is needed.
fn key(index: u32) -> PublicKey {
    let mut bytes = [0u8; 32];
    let mut state = u64::from(index);
    for chunk in bytes[..28].chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let len = chunk.len();
        chunk.copy_from_slice(&z.to_le_bytes()[..len]);
    }
    bytes[28..].copy_from_slice(&index.to_be_bytes());
    PublicKey::from_bytes(bytes)
}

fn move_one_endpoint(nodes: &mut [Result<NodeRecord, Rejected>], i: usize) {
    let name = node_name(i);
    for record in nodes.iter_mut().flatten() {
        if record.name == name {
            record.endpoint.set_port(51821);
        }
    }
}
