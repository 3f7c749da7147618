//! In-memory data plane tests: devices wired together without sockets.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use super::device::{Device, Drop, PeerSettings, Sink, TunOutcome, UdpOutcome};
use crate::keys::{PrivateKey, PublicKey};

/// Collects what a device emits.
#[derive(Default)]
pub(crate) struct Wire {
    pub udp: VecDeque<(SocketAddr, Vec<u8>)>,
    pub tun: VecDeque<Vec<u8>>,
}

impl Sink for Wire {
    fn send_udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.udp.push_back((dst, datagram.to_vec()));
    }
}

pub(crate) struct Node {
    pub dev: Device,
    pub wire: Wire,
    pub addr: SocketAddr,
    pub key: PublicKey,
}

impl Node {
    /// An address inside this node's pod CIDR (10.0.1.0/24 for A, 10.0.2.0/24 for B).
    pub fn dev_addr(&self) -> Ipv4Addr {
        if self.addr.is_ipv4() {
            Ipv4Addr::new(10, 0, 1, 5)
        } else {
            Ipv4Addr::new(10, 0, 2, 7)
        }
    }
}

pub(crate) fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(payload);
    p
}

pub(crate) fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload.len()];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..].copy_from_slice(payload);
    p
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Two devices that know each other: A owns 10.0.1.0/24 + fd00:1::/64, B owns
/// 10.0.2.0/24 + fd00:2::/64.
pub(crate) fn pair() -> (Node, Node) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (pa, pb) = (ka.public_key(), kb.public_key());
    let (aa, ab): (SocketAddr, SocketAddr) = (
        "192.0.2.1:51820".parse().unwrap(),
        "[2001:db8::2]:51820".parse().unwrap(),
    );
    let mut a = Device::new();
    a.set_identities(vec![ka]);
    a.upsert_peer(
        PeerSettings {
            public_key: pb,
            preshared_key: None,
            endpoint: Some(ab),
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.2.0/24"), net("fd00:2::/64")],
        },
        true,
    );
    let mut b = Device::new();
    b.set_identities(vec![kb]);
    // B does not know A's endpoint: it learns it from the handshake.
    b.upsert_peer(
        PeerSettings {
            public_key: pa,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.1.0/24"), net("fd00:1::/64")],
        },
        true,
    );
    (
        Node {
            dev: a,
            wire: Wire::default(),
            addr: aa,
            key: pa,
        },
        Node {
            dev: b,
            wire: Wire::default(),
            addr: ab,
            key: pb,
        },
    )
}

/// Sends `packet` into `from`'s TUN device; returns the datagram if it went
/// straight out.
pub(crate) fn send(from: &mut Node, packet: &[u8]) -> TunOutcome {
    let mut out = vec![0u8; packet.len() + 64 + 148];
    let outcome = from.dev.on_tun_packet(packet, &mut out, &mut from.wire);
    if let TunOutcome::Send { dst, len } = outcome {
        from.wire.udp.push_back((dst, out[..len].to_vec()));
    }
    outcome
}

/// Delivers every queued datagram between the two nodes until both are quiet.
/// Decrypted packets land in each node's `wire.tun`.
pub(crate) fn pump(a: &mut Node, b: &mut Node) -> usize {
    let mut delivered = 0;
    loop {
        let moved = deliver(a, b) + deliver(b, a);
        if moved == 0 {
            return delivered;
        }
        delivered += moved;
    }
}

/// Delivers `from`'s queued datagrams to `to`.
fn deliver(from: &mut Node, to: &mut Node) -> usize {
    let mut n = 0;
    while let Some((dst, datagram)) = from.wire.udp.pop_front() {
        assert_eq!(dst, to.addr, "sent to the wrong endpoint");
        let mut out = vec![0u8; datagram.len() + 64];
        if let UdpOutcome::Tunnel { len } =
            to.dev
                .on_datagram(from.addr, &datagram, &mut out, &mut to.wire)
        {
            to.wire.tun.push_back(out[..len].to_vec());
        }
        n += 1;
    }
    n
}

#[test]
fn handshake_then_data_both_ways_v4_and_v6() {
    let (mut a, mut b) = pair();
    let p1 = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"hello");
    assert_eq!(send(&mut a, &p1), TunOutcome::Queued);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.pop_front().as_deref(), Some(&p1[..]));

    // B learnt A's endpoint from the handshake and can answer.
    let p2 = ipv6_packet(
        "fd00:2::7".parse().unwrap(),
        "fd00:1::5".parse().unwrap(),
        b"back",
    );
    assert!(matches!(send(&mut b, &p2), TunOutcome::Send { .. }));
    pump(&mut a, &mut b);
    assert_eq!(a.wire.tun.pop_front().as_deref(), Some(&p2[..]));

    for (node, peer) in [(&a, b.key), (&b, a.key)] {
        let status = node.dev.peers();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].public_key, peer);
        assert!(status[0].last_handshake.is_some());
        assert!(status[0].rx_bytes > 0 && status[0].tx_bytes > 0);
    }
    assert_eq!(b.dev.peers()[0].endpoint, Some(a.addr));
}

#[test]
fn cryptokey_routing_drops_unroutable_and_spoofed_packets() {
    let (mut a, mut b) = pair();
    // No peer for this destination: dropped, never sent.
    let stray = ipv4_packet([10, 0, 1, 5].into(), [10, 9, 9, 9].into(), b"x");
    assert_eq!(send(&mut a, &stray), TunOutcome::Dropped(Drop::NoRoute));
    assert!(a.wire.udp.is_empty());
    assert_eq!(
        send(&mut a, b"\x00garbage"),
        TunOutcome::Dropped(Drop::NotIp)
    );

    // Establish, then have A send a packet whose inner source B does not allow.
    let ok = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"ok");
    send(&mut a, &ok);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 1);
    let spoofed = ipv4_packet([10, 0, 2, 99].into(), [10, 0, 2, 7].into(), b"spoof");
    send(&mut a, &spoofed);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 1, "spoofed packet must not reach the TUN");
    assert_eq!(b.dev.counters().drops.get(&Drop::BadSource), Some(&1));
}

#[test]
fn longest_prefix_picks_the_peer() {
    let (mut a, _b) = pair();
    let other = PrivateKey::generate().public_key();
    a.dev.upsert_peer(
        PeerSettings {
            public_key: other,
            preshared_key: None,
            endpoint: Some("192.0.2.9:51820".parse().unwrap()),
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.2.128/25")],
        },
        false,
    );
    send(
        &mut a,
        &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 200].into(), b"x"),
    );
    assert_eq!(
        a.wire.udp.back().unwrap().0,
        "192.0.2.9:51820".parse().unwrap()
    );
    send(
        &mut a,
        &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 100].into(), b"x"),
    );
    assert_eq!(
        a.wire.udp.back().unwrap().0,
        "[2001:db8::2]:51820".parse().unwrap()
    );
}

#[test]
fn bad_datagrams_are_dropped_and_counted_and_the_session_survives() {
    let (mut a, mut b) = pair();
    let p = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"first");
    send(&mut a, &p);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 1);

    // Capture one valid data datagram to replay it.
    let p2 = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"second");
    let TunOutcome::Send { len, .. } = ({
        let mut out = vec![0u8; 256];
        let o = a.dev.on_tun_packet(&p2, &mut out, &mut a.wire);
        if let TunOutcome::Send { len, .. } = o {
            a.wire.udp.push_back((b.addr, out[..len].to_vec()));
        }
        o
    }) else {
        panic!("expected a data datagram");
    };
    let valid = a.wire.udp.back().unwrap().1.clone();
    assert_eq!(valid.len(), len);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 2);

    let mut out = vec![0u8; 70_000];
    let mut truncated = valid.clone();
    truncated.truncate(20);
    let mut wrong_index = valid.clone();
    wrong_index[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    // A datagram B has not seen yet, with one bit flipped.
    let p_fresh = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"fresh");
    let mut fresh = vec![0u8; 256];
    let TunOutcome::Send { len: fresh_len, .. } =
        a.dev.on_tun_packet(&p_fresh, &mut fresh, &mut a.wire)
    else {
        panic!("expected a data datagram");
    };
    let mut flipped = fresh[..fresh_len].to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let cases: Vec<(Vec<u8>, Drop)> = vec![
        (vec![], Drop::Malformed),
        (b"garbage that is not wireguard".to_vec(), Drop::Malformed),
        (vec![0xff; 65_000], Drop::Malformed),
        (truncated, Drop::Malformed),
        (valid.clone(), Drop::Replay),
        (wrong_index, Drop::UnknownIndex),
        (flipped, Drop::Unauthenticated),
    ];
    for (datagram, expect) in cases {
        let got = b.dev.on_datagram(a.addr, &datagram, &mut out, &mut b.wire);
        assert_eq!(
            got,
            UdpOutcome::Dropped(expect),
            "datagram of {} bytes",
            datagram.len()
        );
    }
    assert_eq!(b.wire.tun.len(), 2, "nothing bad reached the TUN");

    // The session still works.
    let p3 = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"third");
    send(&mut a, &p3);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.back().map(Vec::as_slice), Some(&p3[..]));
}

#[test]
fn unknown_peers_handshake_is_refused() {
    let (mut a, mut b) = pair();
    b.dev.remove_peer(&a.key);
    send(
        &mut a,
        &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"x"),
    );
    let (_, init) = a.wire.udp.pop_front().unwrap();
    let mut out = vec![0u8; 256];
    assert_eq!(
        b.dev.on_datagram(a.addr, &init, &mut out, &mut b.wire),
        UdpOutcome::Dropped(Drop::BadHandshake)
    );
    assert!(b.wire.udp.is_empty());
}

#[test]
fn a_handshake_flood_triggers_cookies_and_established_sessions_keep_working() {
    let (mut a, mut b) = pair();
    let p = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"before");
    send(&mut a, &p);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 1);

    // An attacker replays fresh initiations from many sources.
    let (mut c, _) = pair();
    let mut out = vec![0u8; 512];
    let mut cookies = 0;
    for i in 0..400u32 {
        c.dev.remove_all_peers();
        c.dev.upsert_peer(
            PeerSettings {
                public_key: b.key,
                preshared_key: None,
                endpoint: Some(b.addr),
                persistent_keepalive: 0,
                allowed_ips: vec![net("10.0.2.0/24")],
            },
            true,
        );
        send(
            &mut c,
            &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"x"),
        );
        let (_, init) = c.wire.udp.pop_front().unwrap();
        c.wire.udp.clear();
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 40000);
        b.wire.udp.clear();
        let got = b.dev.on_datagram(src, &init, &mut out, &mut b.wire);
        if got == UdpOutcome::Consumed && b.wire.udp.front().is_some_and(|(_, d)| d.len() == 64) {
            cookies += 1;
        }
    }
    assert!(cookies > 0, "no cookie replies under a flood");
    assert!(b.dev.counters().cookies_sent > 0);

    b.wire.udp.clear();
    let p2 = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"during");
    send(&mut a, &p2);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.back().map(Vec::as_slice), Some(&p2[..]));
}

#[test]
fn roaming_updates_the_endpoint() {
    let (mut a, mut b) = pair();
    send(
        &mut a,
        &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"x"),
    );
    pump(&mut a, &mut b);
    let (src, dst) = (a.dev_addr(), b.dev_addr());
    a.addr = "192.0.2.77:1234".parse().unwrap();
    send(&mut a, &ipv4_packet(src, dst, b"y"));
    pump(&mut a, &mut b);
    assert_eq!(b.dev.peers()[0].endpoint, Some(a.addr));
}

#[test]
fn allowed_ips_move_between_peers_and_removal_frees_them() {
    let (mut a, _b) = pair();
    let other = PrivateKey::generate().public_key();
    a.dev.upsert_peer(
        PeerSettings {
            public_key: other,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.2.0/24")],
        },
        false,
    );
    let peers = a.dev.peers();
    let find = |k: PublicKey| peers.iter().find(|p| p.public_key == k).unwrap().clone();
    assert_eq!(find(other).allowed_ips, vec![net("10.0.2.0/24")]);
    assert_eq!(find(_b.key).allowed_ips, vec![net("fd00:2::/64")]);
    assert!(a.dev.remove_peer(&other));
    assert_eq!(
        send(
            &mut a,
            &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 1].into(), b"x")
        ),
        TunOutcome::Dropped(Drop::NoRoute)
    );
}

#[test]
fn a_second_local_identity_accepts_handshakes_beside_the_first() {
    // B holds two identities (as during a rotation). A peer that only knows the
    // second key can still handshake, and the first key's peer keeps working.
    let (mut a, mut b) = pair();
    let b_first = b.dev.private_key().unwrap().clone();
    let next = PrivateKey::generate();
    b.dev.set_identities(vec![b_first, next.clone()]);
    send(
        &mut a,
        &ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"old key"),
    );
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 1);

    let (mut c, _) = pair();
    c.dev.remove_all_peers();
    c.dev.upsert_peer(
        PeerSettings {
            public_key: next.public_key(),
            preshared_key: None,
            endpoint: Some(b.addr),
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.2.0/24")],
        },
        true,
    );
    // B knows C as its peer A's key? No: give B a peer for C.
    b.dev.upsert_peer(
        PeerSettings {
            public_key: c.key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.3.0/24")],
        },
        true,
    );
    c.addr = "192.0.2.3:51820".parse().unwrap();
    send(
        &mut c,
        &ipv4_packet([10, 0, 3, 5].into(), [10, 0, 2, 7].into(), b"new key"),
    );
    pump(&mut c, &mut b);
    assert_eq!(b.wire.tun.len(), 2);
    assert_eq!(&b.wire.tun[1][20..], b"new key");
}

#[test]
fn a_restarted_device_replaces_the_session_its_peer_still_holds() {
    let (mut a, mut b) = pair();
    let p = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"one");
    send(&mut a, &p);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.pop_front().as_deref(), Some(&p[..]));

    // B restarts: same key, no sessions; the agent programs its peer again.
    let kb = b.dev.private_key().unwrap().clone();
    let mut fresh = Device::new();
    fresh.set_identities(vec![kb]);
    fresh.upsert_peer(
        PeerSettings {
            public_key: a.key,
            preshared_key: None,
            endpoint: Some(a.addr),
            persistent_keepalive: 0,
            allowed_ips: vec![net("10.0.1.0/24")],
        },
        true,
    );
    b.dev = fresh;
    // Without traffic, B's first tick initiates; A answers and replaces the
    // session it held with the old B.
    b.dev.tick(&mut b.wire);
    let (_, first) = b
        .wire
        .udp
        .front()
        .cloned()
        .expect("an initiation on the first tick");
    assert_eq!(first[0], 1, "handshake initiation");
    pump(&mut a, &mut b);
    let p = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"two");
    assert!(matches!(send(&mut a, &p), TunOutcome::Send { .. }));
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.pop_front().as_deref(), Some(&p[..]));
    // Once a session exists, later ticks send no further initiations.
    b.dev.tick(&mut b.wire);
    assert!(b.wire.udp.iter().all(|(_, d)| d[0] != 1));
}
