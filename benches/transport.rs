//! The data plane's per-packet work without any I/O: one [`Device`] seals
//! packets for its peer (`on_tun_packet`: allowed-IPs lookup, the peer's
//! session, ChaCha20-Poly1305 through boringtun) and the peer's device opens
//! them (`on_datagram`: session lookup, replay window, decryption, the
//! allowed-IPs check of the inner source). Throughput is per byte of inner
//! packet, so criterion's GiB/s is the ceiling one core reaches before any
//! TUN or UDP system call, and its inverse is the crypto's share of a
//! daemon's CPU seconds per GB (`scripts/bench-dataplane` prints the whole).
//!
//! Run: `cargo bench --bench transport` (or `scripts/bench`).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ipnet::IpNet;
use wgmesh::dataplane::device::{Device, PeerSettings, Sink, TunOutcome, UdpOutcome};
use wgmesh::keys::PrivateKey;

/// Room for the WireGuard header, the tag and padding.
const OVERHEAD: usize = 64;
/// Datagrams opened per measured batch: each is fresh (the replay window
/// refuses a second copy), so they are sealed in the batch's set-up.
const BATCH: usize = 256;

#[derive(Default)]
struct Wire(VecDeque<(SocketAddr, Vec<u8>)>);

impl Sink for Wire {
    fn send_udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.0.push_back((dst, datagram.to_vec()));
    }
}

struct Pair {
    a: Device,
    b: Device,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    wire_a: Wire,
    wire_b: Wire,
}

fn net(s: &str) -> IpNet {
    s.parse().expect("a valid prefix")
}

fn packet(len: usize) -> Vec<u8> {
    let len = len.max(20);
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&Ipv4Addr::new(10, 0, 1, 5).octets());
    p[16..20].copy_from_slice(&Ipv4Addr::new(10, 0, 2, 7).octets());
    p
}

/// Two devices with an established session from A to B.
fn pair() -> Pair {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (pa, pb) = (ka.public_key(), kb.public_key());
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().expect("an address");
    let b_addr: SocketAddr = "192.0.2.2:51820".parse().expect("an address");
    let mut a = Device::new(Instant::now());
    a.set_identities(vec![ka]);
    a.upsert_peer(
        PeerSettings {
            public_key: pb,
            preshared_key: None,
            endpoint: Some(b_addr),
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.2.0/24")],
        },
        true,
    );
    let mut b = Device::new(Instant::now());
    b.set_identities(vec![kb]);
    b.upsert_peer(
        PeerSettings {
            public_key: pa,
            preshared_key: None,
            endpoint: Some(a_addr),
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.1.0/24")],
        },
        true,
    );
    let mut p = Pair {
        a,
        b,
        a_addr,
        b_addr,
        wire_a: Wire::default(),
        wire_b: Wire::default(),
    };
    // The first packet starts the handshake; pump until both sides are quiet.
    let first = packet(100);
    let mut out = vec![0u8; first.len() + OVERHEAD + 148];
    p.a.on_tun_packet(&first, &mut out, &mut p.wire_a);
    loop {
        let mut moved = 0;
        while let Some((_, d)) = p.wire_a.0.pop_front() {
            let mut out = vec![0u8; d.len() + OVERHEAD];
            p.b.on_datagram(SystemTime::now(), p.a_addr, &d, &mut out, &mut p.wire_b);
            moved += 1;
        }
        while let Some((_, d)) = p.wire_b.0.pop_front() {
            let mut out = vec![0u8; d.len() + OVERHEAD];
            p.a.on_datagram(SystemTime::now(), p.b_addr, &d, &mut out, &mut p.wire_a);
            moved += 1;
        }
        if moved == 0 {
            break;
        }
    }
    p
}

fn seal(a: &mut Device, wire: &mut Wire, inner: &[u8], out: &mut [u8]) -> usize {
    match a.on_tun_packet(inner, out, wire) {
        TunOutcome::Send { len, .. } => len,
        other => panic!("no session after the handshake: {other:?}"),
    }
}

fn transport(c: &mut Criterion) {
    let mut group = c.benchmark_group("transport");
    for len in [64usize, 1420] {
        let inner = packet(len);
        let mut p = pair();
        let Pair {
            a,
            b,
            a_addr,
            wire_a,
            wire_b,
            ..
        } = &mut p;
        let from = *a_addr;
        let mut out = vec![0u8; len + OVERHEAD];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("seal", len), &inner, |bench, inner| {
            bench.iter(|| seal(a, wire_a, inner, &mut out))
        });
        group.throughput(Throughput::Bytes((len * BATCH) as u64));
        group.bench_with_input(BenchmarkId::new("open", len), &inner, |bench, inner| {
            bench.iter_batched(
                || {
                    (0..BATCH)
                        .map(|_| {
                            let mut d = vec![0u8; inner.len() + OVERHEAD];
                            let n = seal(a, wire_a, inner, &mut d);
                            d.truncate(n);
                            d
                        })
                        .collect::<Vec<_>>()
                },
                |datagrams| {
                    let mut plain = vec![0u8; len + OVERHEAD];
                    for d in &datagrams {
                        match b.on_datagram(SystemTime::now(), from, d, &mut plain, wire_b) {
                            UdpOutcome::Tunnel { len: n } => assert_eq!(n, len),
                            other => panic!("B refused a fresh datagram: {other:?}"),
                        }
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, transport);
criterion_main!(benches);
