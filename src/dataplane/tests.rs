//! In-memory data plane tests: devices wired together without sockets.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Instant, SystemTime};

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
    let mut a = Device::new(Instant::now());
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
    let mut b = Device::new(Instant::now());
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
        if let UdpOutcome::Tunnel { len } = to.dev.on_datagram(
            SystemTime::now(),
            from.addr,
            &datagram,
            &mut out,
            &mut to.wire,
        ) {
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
fn an_inner_packet_shorter_than_its_header_is_dropped_not_written() {
    let (mut a, mut b) = pair();
    let ok = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"ok");
    send(&mut a, &ok);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 1);
    // An authenticated peer's packet whose IPv4 total length says 0:
    // boringtun would hand over an empty packet, which must not reach a TUN
    // write (a batch holding it fails as a whole).
    for claimed in [0u16, 19] {
        let mut short = ipv4_packet([10, 0, 1, 5].into(), [10, 0, 2, 7].into(), b"short");
        short[2..4].copy_from_slice(&claimed.to_be_bytes());
        send(&mut a, &short);
        pump(&mut a, &mut b);
    }
    assert_eq!(b.wire.tun.len(), 1, "a headerless packet reached the TUN");
    assert_eq!(b.dev.counters().drops.get(&Drop::Malformed), Some(&2));
    // The session survives: the next good packet goes through.
    send(&mut a, &ok);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.len(), 2);
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
        let got = b
            .dev
            .on_datagram(SystemTime::now(), a.addr, &datagram, &mut out, &mut b.wire);
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
        b.dev
            .on_datagram(SystemTime::now(), a.addr, &init, &mut out, &mut b.wire),
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
        let got = b
            .dev
            .on_datagram(SystemTime::now(), src, &init, &mut out, &mut b.wire);
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
    let mut fresh = Device::new(Instant::now());
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
    b.dev.tick(Instant::now(), &mut b.wire);
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
    b.dev.tick(Instant::now(), &mut b.wire);
    assert!(b.wire.udp.iter().all(|(_, d)| d[0] != 1));
}

// --- key rotation: dual identity (O4) and the fall-back (O1) ------------------

use super::device::ExtraRole;

/// Packets lost in one round, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Lost {
    a_to_b: usize,
    b_to_a: usize,
}

/// Panics if any datagram queued on either wire carries `marker` in clear.
fn assert_no_plaintext(a: &Node, b: &Node, marker: &[u8]) {
    for (_, d) in a.wire.udp.iter().chain(b.wire.udp.iter()) {
        assert!(
            !d.windows(marker.len()).any(|w| w == marker),
            "plaintext on the wire"
        );
        assert!(matches!(d.first(), Some(1..=4)), "not a WireGuard message");
    }
}

/// One round of traffic: a packet each way, the timers on both sides, and
/// every datagram delivered; returns what did not arrive.
fn round(a: &mut Node, b: &mut Node, n: usize) -> Lost {
    let to_b = format!("rotation a->b #{n:05}");
    let to_a = format!("rotation b->a #{n:05}");
    let pa = ipv4_packet(a.dev_addr(), [10, 0, 2, 7].into(), to_b.as_bytes());
    let pb = ipv4_packet([10, 0, 2, 7].into(), a.dev_addr(), to_a.as_bytes());
    send(a, &pa);
    send(b, &pb);
    for marker in [&to_b, &to_a] {
        assert_no_plaintext(a, b, marker.as_bytes());
    }
    pump(a, b);
    a.dev.tick(Instant::now(), &mut a.wire);
    b.dev.tick(Instant::now(), &mut b.wire);
    for marker in [&to_b, &to_a] {
        assert_no_plaintext(a, b, marker.as_bytes());
    }
    pump(a, b);
    let got_b = b.wire.tun.drain(..).filter(|p| *p == pa).count();
    let got_a = a.wire.tun.drain(..).filter(|p| *p == pb).count();
    Lost {
        a_to_b: 1 - got_b.min(1),
        b_to_a: 1 - got_a.min(1),
    }
}

fn rounds(a: &mut Node, b: &mut Node, from: usize, count: usize) -> Lost {
    let mut lost = Lost::default();
    for n in from..from + count {
        let l = round(a, b, n);
        lost.a_to_b += l.a_to_b;
        lost.b_to_a += l.b_to_a;
    }
    lost
}

/// A pair with a session up: A spoke first, so B knows where A is.
fn connected_pair() -> (Node, Node) {
    let (mut a, mut b) = pair();
    let hello = ipv4_packet(a.dev_addr(), [10, 0, 2, 7].into(), b"hello");
    send(&mut a, &hello);
    pump(&mut a, &mut b);
    assert_eq!(b.wire.tun.pop_front(), Some(hello));
    (a, b)
}

fn has_session(node: &Node, local: PublicKey, remote: PublicKey) -> bool {
    node.dev
        .sessions()
        .iter()
        .any(|s| s.local == local && s.remote == remote)
}

#[test]
fn a_full_rotation_with_a_dual_capable_peer_loses_no_packet() {
    let (mut a, mut x) = connected_pair();
    let k1 = a.dev.private_key().unwrap().clone();
    let (p1, k2) = (k1.public_key(), PrivateKey::generate());
    let p2 = k2.public_key();
    let px = x.key;
    let mut total = Lost::default();
    let mut add = |l: Lost| {
        total.a_to_b += l.a_to_b;
        total.b_to_a += l.b_to_a;
    };
    add(rounds(&mut a, &mut x, 0, 3));
    assert!(has_session(&a, p1, px) && has_session(&x, px, p1));

    // Stage: A holds K2 as its next identity; X pre-accepts K2 for A.
    a.dev
        .set_local_keys(Some(k1.clone()), Some((k2.clone(), ExtraRole::Next)));
    assert_eq!(a.dev.extra_identity(), Some((p2, ExtraRole::Next)));
    assert!(x.dev.set_successor(&p1, Some(p2)));
    assert_eq!(x.dev.successor(&p1), Some(p2));
    // A's probe under K2 completes: the confirmation, on A's side, is a
    // session whose local key is K2.
    add(rounds(&mut a, &mut x, 3, 2));
    assert!(has_session(&a, p2, px), "{:?}", a.dev.sessions());
    assert!(has_session(&x, px, p2), "{:?}", x.dev.sessions());
    add(rounds(&mut a, &mut x, 5, 3));

    // Activate: K2 active, K1 kept as the previous identity.
    a.dev
        .set_local_keys(Some(k2.clone()), Some((k1.clone(), ExtraRole::Previous)));
    assert_eq!(a.dev.public_key(), Some(p2));
    assert_eq!(a.dev.extra_identity(), Some((p1, ExtraRole::Previous)));
    assert!(has_session(&a, p2, px) && has_session(&a, p1, px));
    add(rounds(&mut a, &mut x, 8, 3));

    // X follows A's published key: promote K1 -> K2, sessions kept.
    assert_eq!(x.dev.promote_successor(&p1), Some(p2));
    let peers = x.dev.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, p2);
    assert_eq!(peers[0].successor, None);
    assert!(x.dev.peer_settings(&p1).is_none());
    assert!(has_session(&x, px, p2));
    add(rounds(&mut a, &mut x, 11, 3));

    // Grace period over: A forgets K1.
    a.dev.set_local_keys(Some(k2.clone()), None);
    assert_eq!(a.dev.extra_identity(), None);
    assert!(!has_session(&a, p1, px));
    add(rounds(&mut a, &mut x, 14, 5));

    assert_eq!(total, Lost::default(), "packets lost during the rotation");
    assert!(has_session(&a, p2, px) && has_session(&x, px, p2));
    // Nothing X received was refused on the way.
    for why in [Drop::UnknownIndex, Drop::BadSource, Drop::Unauthenticated] {
        assert_eq!(x.dev.counters().drops.get(&why), None, "{why:?}");
        assert_eq!(a.dev.counters().drops.get(&why), None, "{why:?}");
    }
}

#[test]
fn a_peer_that_never_pre_accepts_drops_the_probes_then_falls_back_to_the_hand_over() {
    let (mut a, mut x) = connected_pair();
    let k1 = a.dev.private_key().unwrap().clone();
    let (p1, k2) = (k1.public_key(), PrivateKey::generate());
    let p2 = k2.public_key();
    let px = x.key;
    assert_eq!(rounds(&mut a, &mut x, 0, 3), Lost::default());

    a.dev
        .set_local_keys(Some(k1.clone()), Some((k2.clone(), ExtraRole::Next)));
    assert_eq!(rounds(&mut a, &mut x, 3, 4), Lost::default());
    // The probe reached X, which does not know K2: dropped, no session, so
    // no confirmation. One probe in four ticks: a handshake in progress is
    // only retried by boringtun's REKEY_TIMEOUT (5 s) timer.
    assert_eq!(x.dev.counters().drops.get(&Drop::BadHandshake), Some(&1));
    assert!(!has_session(&a, p2, px));

    // Activation anyway (deadline): A keeps reaching X over the K1 session
    // of its previous identity, X keeps reaching A there too.
    a.dev
        .set_local_keys(Some(k2.clone()), Some((k1.clone(), ExtraRole::Previous)));
    assert_eq!(rounds(&mut a, &mut x, 7, 3), Lost::default());
    // The active identity's handshake towards X is the probe's, still in
    // progress: no extra initiation (rate limit), retried by its timer.
    assert_eq!(x.dev.counters().drops.get(&Drop::BadHandshake), Some(&1));

    // X sees A's new key and hands over (option O1): the new key with the
    // allowed IPs first, then the old key removed.
    let mut settings = x.dev.peer_settings(&p1).unwrap();
    settings.public_key = p2;
    x.dev.upsert_peer(settings, true);
    assert!(x.dev.remove_peer(&p1));
    // Packets A still sends on the K1 session until X's first K2 handshake
    // (about one one-way delay) are lost; X's own packets wait in its queue.
    let lost = rounds(&mut a, &mut x, 10, 2);
    assert!(lost.a_to_b <= 1, "{lost:?}");
    assert_eq!(lost.b_to_a, 0);
    assert_eq!(rounds(&mut a, &mut x, 12, 5), Lost::default());
    assert!(has_session(&a, p2, px) && has_session(&x, px, p2));
}

#[test]
fn a_previous_identity_never_initiates_and_a_successor_is_only_answered() {
    let (mut a, mut x) = pair();
    let k1 = a.dev.private_key().unwrap().clone();
    let k2 = PrivateKey::generate();
    // A only ever accepts K2 (previous role): no probe leaves A.
    a.dev
        .set_local_keys(Some(k1.clone()), Some((k2.clone(), ExtraRole::Previous)));
    a.dev.tick(Instant::now(), &mut a.wire);
    let inits = a.wire.udp.iter().filter(|(_, d)| d[0] == 1).count();
    // Exactly one: the active identity's first-tick initiation to a new peer.
    assert_eq!(inits, 1);
    pump(&mut a, &mut x);
    for _ in 0..3 {
        a.dev.tick(Instant::now(), &mut a.wire);
    }
    assert!(a.wire.udp.iter().all(|(_, d)| d[0] != 1));

    // X pre-accepts a successor of A's key, but never initiates towards it.
    let p1 = k1.public_key();
    assert!(x
        .dev
        .set_successor(&p1, Some(PrivateKey::generate().public_key())));
    for _ in 0..3 {
        x.dev.tick(Instant::now(), &mut x.wire);
    }
    assert!(x.wire.udp.iter().all(|(_, d)| d[0] != 1));
    // A successor may not be a local key, another peer or taken twice.
    assert!(!x.dev.set_successor(&p1, Some(x.key)));
    assert!(!x.dev.set_successor(&p1, Some(p1)));
}
