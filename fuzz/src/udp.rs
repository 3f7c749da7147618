//! `udp_receive`: a device under attack on its UDP socket.
//!
//! Every input builds a fresh device B (fixed keys, two peers A and C with fixed
//! keys and overlapping allowed IPs), optionally brings up real sessions with
//! in-memory honest peers (boringtun `Tunn`s with A's and C's keys), then runs a
//! little program of operations read from the input: raw datagrams, captured
//! valid messages (fresh, replayed or mutated), data the honest peers encrypt
//! with attacker-chosen plaintext, TUN packets B sends, delivery of B's replies,
//! timer ticks and configuration changes. Datagrams arrive from a handful of
//! source addresses (the peers' own, attackers', an IPv4-mapped one).
//!
//! Everything that makes a run differ from the next (receiver indices, ephemeral
//! keys, cookie secrets, timestamps) is random inside the device and boringtun;
//! the harness learns indices from the traffic instead of assuming them, so
//! whether a message is accepted depends only on the input. (Only [`Op::Tick`]
//! reads the clock through the device's timers; no assertion does.)
//!
//! Invariants checked after every datagram B receives:
//! - `UdpOutcome::Tunnel { len }`: `len <= out.len()`; the datagram is a data
//!   message whose authenticated part one of the honest peers produced (no
//!   forgery); the packet is IPv4 or IPv6 and, when the plaintext is known, is
//!   what the peer encrypted; and its source address belongs to that peer by
//!   longest-prefix match over the allowed IPs B was given (an independent model
//!   of cryptokey routing, updated by the configuration operations);
//! - a completed handshake (the counter) or a changed endpoint (roaming) only
//!   follows an authenticated message: an initiation answered with a handshake
//!   response, a response answered with a keepalive, or a data message a peer
//!   produced; never a cookie reply and never anything B answered with a cookie;
//! - every datagram B hands to the sink is a well-formed WireGuard message.
//!
//! Input: one header byte, then operations until the input or the budget ends.
//! Header bits: 0-1 scenario (0 no session, 1 A initiated, 2 B initiated to A,
//! 3 A and C initiated), 2 B also holds a second identity that C talks to (key
//! rotation), 3 pre-shared key with A, 4 persistent keepalive with A, 5-6 spare
//! room in the output buffer beyond the datagram's length (0, 1, 64, 4096),
//! 7 B starts without A's endpoint. Operations are one byte, low nibble the
//! kind, high nibble the source address (an index into [`SOURCES`]), followed
//! by the kind's arguments; see [`Op`], and the encoder of the seeds in
//! `src/seeds.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use blake2::digest::consts::U16;
use blake2::digest::{Digest, Mac};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use wgmesh::dataplane::device::{
    unmap, Device, PeerSettings, Sink, TunOutcome, UdpOutcome, DATA_OVERHEAD, MAX_CONTROL_LEN,
};
use wgmesh::keys::{PresharedKey, PrivateKey, PublicKey};

/// Operation kinds (low nibble of an operation byte; 10-15 do nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// `[flags] [len u16le] [bytes]`: a datagram as given, after [`fixups`].
    Raw = 0,
    /// `[which] [flags] [edit] [pos u16le] [n] [n bytes]`: a captured message
    /// (see [`Template`]), edited (0 none, 1 xor, 2 overwrite, 3 truncate at
    /// pos, 4 insert), then [`fixups`].
    Template = 1,
    /// `[flags] [len u16le] [bytes]`: A (flags bit 0 clear) or C encrypts the
    /// bytes in its session (or, without one, queues them and sends an
    /// initiation). Bit 1 patches IP length fields, bit 2 wraps the bytes in a
    /// fresh IP header whose source is `[src]` (one more byte, an index into
    /// [`SOURCES_INNER`]).
    Encrypt = 2,
    /// Delivers what B sent to the peers it was addressed to, and their
    /// answers back to B, a few rounds.
    Pump = 3,
    /// `[flags] [len u16le] [bytes]`: B's TUN device reads a packet. Flags bit 0
    /// gives it an IPv4 header towards A (bit 1 clear) or C.
    Tun = 4,
    /// B's timers run.
    Tick = 5,
    /// `[flags] [addr 16] [prefix]`: flags bit 0 peer (A/C), bit 1 IPv6, bits
    /// 2-3: 0/1 add, 2 remove, 3 replace all of the peer's allowed IPs.
    Allow = 6,
    /// `[which]`: 0/1 toggles the pre-shared key of A/C on both sides (B
    /// rebuilds its sessions), 2 removes C, 3 adds C back with its initial
    /// allowed IPs.
    Peer = 7,
    /// `[which]`: B's identities become `[B]`, `[B, B2]`, `[B2, B]` or none.
    Identities = 8,
    /// `[n]`: the last datagram B received arrives `n` more times, from the
    /// same source (floods and replays in a few bytes).
    Repeat = 9,
}

/// Captured messages a [`Op::Template`] starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Template {
    /// A fresh handshake initiation from A (A forgets the previous one).
    InitA = 0,
    InitC = 1,
    /// An initiation from M, a key B does not know.
    InitStranger = 2,
    /// A data message from A (an initiation if A has no session yet).
    DataA = 3,
    KeepaliveA = 4,
    DataC = 5,
    /// The last datagram B sent (reflected back at it).
    LastFromB = 6,
    /// A's last initiation again (replay).
    LastInitA = 7,
    /// A's last data message again (replay).
    LastDataA = 8,
}
const TEMPLATES: u8 = 9;

/// Fixups, in a flags byte of [`Op::Raw`] and [`Op::Template`]. Bits 0/1: the
/// receiver index becomes B's current index for A/C (learnt from the
/// traffic). Bits 2/3: MAC1 is recomputed for B's first/second identity (it
/// is keyed by a public key: any attacker can). Bit 4: the message type
/// becomes `1 + (flags >> 5 & 3)`, reserved bytes zero.
pub mod fixups {
    pub const INDEX_A: u8 = 1;
    pub const INDEX_C: u8 = 2;
    pub const MAC1_B: u8 = 4;
    pub const MAC1_B2: u8 = 8;
    pub const SET_TYPE: u8 = 16;
}

/// The fixed keys: B is the device under test, B2 its second identity; A and
/// C its peers, M a stranger.
pub const KEY_B: [u8; 32] = [0xb0; 32];
pub const KEY_B2: [u8; 32] = [0xb2; 32];
pub const KEY_A: [u8; 32] = [0xa0; 32];
pub const KEY_C: [u8; 32] = [0xc0; 32];
pub const KEY_M: [u8; 32] = [0xd0; 32];
pub const PSK: [u8; 32] = [0x55; 32];

/// Where each party sends from.
pub const ADDR_B: SocketAddr = v4sock([192, 0, 2, 2], 51820);
pub const ADDR_A: SocketAddr = v4sock([192, 0, 2, 1], 51820);
pub const ADDR_C: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3),
    51820,
    0,
    0,
));
pub const ADDR_M: SocketAddr = v4sock([198, 51, 100, 13], 51820);

/// Outer source addresses, chosen by an operation's high nibble (mod 8).
pub const SOURCES: [SocketAddr; 8] = [
    ADDR_A,
    ADDR_C,
    v4sock([203, 0, 113, 66], 6666),
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 1),
        6666,
        0,
        0,
    )),
    // A's address as a dual-stack socket reports it.
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0201),
        51820,
        0,
        0,
    )),
    v4sock([0, 0, 0, 0], 0),
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
        51820,
        0,
        2,
    )),
    v4sock([192, 0, 2, 1], 1),
];

/// Inner source addresses for [`Op::Encrypt`] bit 2: each peer's own, the
/// other peer's, B's, outside everyone's, a mapped one.
pub const SOURCES_INNER: [IpAddr; 10] = [
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 200)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 3, 5)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 2, 7)),
    IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 5)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 5)),
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0105)),
    IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
    IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
];

/// B's address inside the tunnel (packets to it come from A and C).
const INNER_B: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 7);

/// A's allowed IPs on B; C's. C's /25 is inside A's /24: longest prefix wins.
const ALLOWED_A: [&str; 2] = ["10.0.1.0/24", "fd00:1::/64"];
const ALLOWED_C: [&str; 3] = ["10.0.3.0/24", "10.0.1.128/25", "fd00:3::/64"];

const MAX_OPS: usize = 192;
const MAX_DATAGRAMS: usize = 1024;
const PUMP_ROUNDS: usize = 4;
const BUF_LEN: usize = 65_535 + DATA_OVERHEAD + 16;

const fn v4sock(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::V4(std::net::SocketAddrV4::new(
        Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        port,
    ))
}

/// Inputs run and datagrams the device received in them, over the process.
static INPUTS: AtomicU64 = AtomicU64::new(0);
static DATAGRAMS: AtomicU64 = AtomicU64::new(0);
/// Every this many inputs, a `udp_receive stats:` line on stderr (the fuzz
/// log), which `scripts/fuzz` reads: the fuzzer's throughput in datagrams,
/// not only in executions.
const STATS_EVERY: u64 = 1000;

/// Runs one input. Panics (the fuzzer's crash) when an invariant fails.
pub fn run(data: &[u8]) {
    let delivered = run_input(data);
    let inputs = INPUTS.fetch_add(1, Ordering::Relaxed) + 1;
    let datagrams = DATAGRAMS.fetch_add(delivered as u64, Ordering::Relaxed) + delivered as u64;
    if inputs % STATS_EVERY == 0 {
        eprintln!(
            "udp_receive stats: {inputs} inputs, {datagrams} datagrams received by the device"
        );
    }
}

/// One input; how many datagrams the device received.
fn run_input(data: &[u8]) -> usize {
    let mut input = Input(data);
    let Some(header) = input.u8() else {
        return 0;
    };
    let mut h = Harness::new(header);
    h.scenario(header & 3);
    let mut ops = 0;
    while ops < MAX_OPS && h.datagrams < MAX_DATAGRAMS {
        let Some(op) = input.u8() else {
            break;
        };
        ops += 1;
        let src = SOURCES[usize::from(op >> 4) % SOURCES.len()];
        match op & 0x0f {
            0 => {
                let flags = input.u8().unwrap_or(0);
                let mut d = input.chunk();
                h.fixup(&mut d, flags);
                h.deliver(src, &d);
            }
            1 => h.template(src, &mut input),
            2 => h.encrypt(src, &mut input),
            3 => h.pump(),
            4 => h.tun(&mut input),
            5 => {
                let mut sink = Outbox::default();
                h.dev.tick(Instant::now(), &mut sink);
                h.sent(sink);
            }
            6 => h.allow(&mut input),
            7 => h.peer_op(input.u8().unwrap_or(0)),
            8 => h.identities(input.u8().unwrap_or(0)),
            9 => {
                if let Some((src, d)) = h.last.take() {
                    for _ in 0..input.u8().unwrap_or(0) {
                        h.deliver(src, &d);
                    }
                    h.last = Some((src, d));
                }
            }
            _ => {}
        }
    }
    h.datagrams
}

/// Reads the input front to back; short reads return what is left.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8().unwrap_or(0), self.u8().unwrap_or(0)])
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }

    /// A `[len u16le] [bytes]` chunk.
    fn chunk(&mut self) -> Vec<u8> {
        let n = usize::from(self.u16());
        self.bytes(n)
    }
}

#[derive(Default)]
struct Outbox(Vec<(SocketAddr, Vec<u8>)>);

impl Sink for Outbox {
    fn send_udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.0.push((dst, datagram.to_vec()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    A,
    C,
    M,
}

/// An honest remote party, with the boringtun session state a real peer has.
struct Remote {
    who: Who,
    secret: [u8; 32],
    addr: SocketAddr,
    /// Its own index (boringtun puts it in the top 24 bits of the wire index).
    index: u32,
    /// The B identity it talks to.
    target: [u8; 32],
    psk: Option<[u8; 32]>,
    /// Created when first needed (a Diffie-Hellman each).
    tunn: Option<Tunn>,
    last_init: Vec<u8>,
    last_data: Vec<u8>,
}

impl Remote {
    fn tunn(&mut self) -> &mut Tunn {
        let (secret, target, psk, index) = (self.secret, self.target, self.psk, self.index);
        self.tunn.get_or_insert_with(|| {
            Tunn::new(
                x25519::StaticSecret::from(secret),
                x25519::PublicKey::from(target),
                psk,
                None,
                index,
                None,
            )
        })
    }
}

/// A data message an honest peer produced: who, its authenticated bytes (all
/// but the type and the receiver index, which no AEAD covers), and the
/// plaintext if the harness chose it.
struct Produced {
    who: Who,
    auth: Vec<u8>,
    plaintext: Option<Vec<u8>>,
}

/// B's view before a datagram, for the authentication invariant.
struct Before {
    handshakes: u64,
    endpoints: Vec<(PublicKey, Option<SocketAddr>)>,
}

struct Harness {
    dev: Device,
    remotes: [Remote; 3],
    /// B's peers' settings as configured (allowed IPs live in `model`).
    keepalive_a: u16,
    endpoint_a: Option<SocketAddr>,
    c_present: bool,
    /// Cryptokey routing as B should do it: (prefix, owner).
    model: Vec<(IpNet, Who)>,
    produced: Vec<Produced>,
    /// What B sent and nobody has received yet.
    pending: Vec<(SocketAddr, Vec<u8>)>,
    last_from_b: Vec<u8>,
    /// The last datagram B received, for [`Op::Repeat`].
    last: Option<(SocketAddr, Vec<u8>)>,
    /// B's wire receiver index for A's and C's current sessions.
    b_index: [Option<u32>; 2],
    slack: usize,
    datagrams: usize,
    /// The remotes' `decapsulate` output, allocated once per input (a fresh
    /// one per delivered datagram was fresh pages under ASan's quarantine).
    buf: Vec<u8>,
}

impl Harness {
    fn new(header: u8) -> Self {
        let rotation = header & 4 != 0;
        let psk_a = (header & 8 != 0).then_some(PSK);
        let keepalive_a = if header & 16 != 0 { 25 } else { 0 };
        let slack = [0, 1, 64, 4096][usize::from(header >> 5 & 3)];
        let endpoint_a = (header & 128 == 0).then_some(ADDR_A);
        let b_pub = *public(KEY_B).as_bytes();
        let b2_pub = *public(KEY_B2).as_bytes();
        let mut dev = Device::new(Instant::now());
        let mut identities = vec![private(KEY_B)];
        if rotation {
            identities.push(private(KEY_B2));
        }
        dev.set_identities(identities);
        let remote = |who, secret, addr, index, target| Remote {
            who,
            secret,
            addr,
            index,
            target,
            psk: None,
            tunn: None,
            last_init: Vec::new(),
            last_data: Vec::new(),
        };
        let mut h = Self {
            dev,
            remotes: [
                Remote {
                    psk: psk_a,
                    ..remote(Who::A, KEY_A, ADDR_A, 0x0a_0a0a, b_pub)
                },
                remote(
                    Who::C,
                    KEY_C,
                    ADDR_C,
                    0x0c_0c0c,
                    if rotation { b2_pub } else { b_pub },
                ),
                remote(Who::M, KEY_M, ADDR_M, 0x0d_0d0d, b_pub),
            ],
            keepalive_a,
            endpoint_a,
            c_present: false,
            model: Vec::new(),
            produced: Vec::new(),
            pending: Vec::new(),
            last_from_b: Vec::new(),
            last: None,
            b_index: [None; 2],
            slack,
            datagrams: 0,
            buf: Vec::new(),
        };
        h.upsert(Who::A, ALLOWED_A.iter().map(|n| net(n)).collect(), true);
        h.upsert(Who::C, ALLOWED_C.iter().map(|n| net(n)).collect(), true);
        h
    }

    fn scenario(&mut self, scenario: u8) {
        match scenario {
            1 | 3 => {
                let p = ipv4(Ipv4Addr::new(10, 0, 1, 5), INNER_B, b"setup from A");
                self.encrypt_as(Who::A, ADDR_A, p);
                if scenario == 3 {
                    let p = ipv4(Ipv4Addr::new(10, 0, 3, 5), INNER_B, b"setup from C");
                    self.encrypt_as(Who::C, ADDR_C, p);
                }
                self.pump();
            }
            2 => {
                let p = ipv4(INNER_B, Ipv4Addr::new(10, 0, 1, 5), b"setup from B");
                self.tun_packet(&p);
                self.pump();
            }
            _ => {}
        }
    }

    fn remote(&mut self, who: Who) -> &mut Remote {
        match who {
            Who::A => &mut self.remotes[0],
            Who::C => &mut self.remotes[1],
            Who::M => &mut self.remotes[2],
        }
    }

    /// B's settings for a peer, with the given allowed IPs.
    fn settings(&self, who: Who, allowed_ips: Vec<IpNet>) -> PeerSettings {
        let r = match who {
            Who::A => &self.remotes[0],
            Who::C => &self.remotes[1],
            Who::M => &self.remotes[2],
        };
        PeerSettings {
            public_key: public(r.secret),
            preshared_key: r.psk.map(PresharedKey::from_bytes),
            endpoint: if who == Who::A { self.endpoint_a } else { None },
            persistent_keepalive: if who == Who::A { self.keepalive_a } else { 0 },
            allowed_ips,
        }
    }

    /// `Device::upsert_peer`, mirrored in the model.
    fn upsert(&mut self, who: Who, nets: Vec<IpNet>, replace: bool) {
        if who == Who::C {
            self.c_present = true;
        }
        if replace {
            self.model.retain(|(_, w)| *w != who);
        }
        for n in &nets {
            let n = n.trunc();
            self.model.retain(|(m, _)| *m != n);
            self.model.push((n, who));
        }
        let settings = self.settings(who, nets);
        self.dev.upsert_peer(settings, replace);
    }

    /// The owner of an address by longest-prefix match over the model.
    fn owner(&self, addr: IpAddr) -> Option<Who> {
        self.model
            .iter()
            .filter(|(n, _)| n.contains(&addr))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, w)| *w)
    }

    /// Applies the fixups in `flags` to a datagram.
    fn fixup(&self, d: &mut [u8], flags: u8) {
        if flags & fixups::SET_TYPE != 0 && d.len() >= 4 {
            d[..4].copy_from_slice(&[1 + (flags >> 5 & 3), 0, 0, 0]);
        }
        for (bit, index) in [(fixups::INDEX_A, 0), (fixups::INDEX_C, 1)] {
            if flags & bit == 0 {
                continue;
            }
            let Some(idx) = self.b_index[index] else {
                continue;
            };
            let at = if msg_type(d) == Some(2) { 8 } else { 4 };
            if d.len() >= at + 4 {
                d[at..at + 4].copy_from_slice(&idx.to_le_bytes());
            }
        }
        for (bit, key) in [(fixups::MAC1_B, KEY_B), (fixups::MAC1_B2, KEY_B2)] {
            if flags & bit != 0 && matches!((msg_type(d), d.len()), (Some(1), 148) | (Some(2), 92))
            {
                set_mac1(d, public(key).as_bytes());
            }
        }
    }

    fn template(&mut self, src: SocketAddr, input: &mut Input<'_>) {
        let which = input.u8().unwrap_or(0) % TEMPLATES;
        let flags = input.u8().unwrap_or(0);
        let edit = input.u8().unwrap_or(0);
        let pos = usize::from(input.u16());
        let n = usize::from(input.u8().unwrap_or(0));
        let bytes = input.bytes(n);
        let mut d = match which {
            0 => self.init(Who::A),
            1 => self.init(Who::C),
            2 => self.init(Who::M),
            3 | 5 => {
                let (who, from) = if which == 3 {
                    (Who::A, Ipv4Addr::new(10, 0, 1, 5))
                } else {
                    (Who::C, Ipv4Addr::new(10, 0, 3, 5))
                };
                self.seal(who, ipv4(from, INNER_B, b"template"))
            }
            4 => self.seal(Who::A, Vec::new()),
            6 => self.last_from_b.clone(),
            7 => self.remotes[0].last_init.clone(),
            _ => self.remotes[0].last_data.clone(),
        };
        let pos = pos.min(d.len());
        match edit % 5 {
            1 => {
                for (b, x) in d[pos..].iter_mut().zip(&bytes) {
                    *b ^= x;
                }
            }
            2 => {
                for (b, x) in d[pos..].iter_mut().zip(&bytes) {
                    *b = *x;
                }
            }
            3 => d.truncate(pos),
            4 => {
                d.splice(pos..pos, bytes);
            }
            _ => {}
        }
        self.fixup(&mut d, flags);
        self.deliver(src, &d);
    }

    /// A fresh initiation from a remote.
    fn init(&mut self, who: Who) -> Vec<u8> {
        let mut buf = [0u8; MAX_CONTROL_LEN];
        let r = self.remote(who);
        let d = match r.tunn().format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => Vec::new(),
        };
        r.last_init.clone_from(&d);
        d
    }

    /// What a remote's `encapsulate` sends for `plaintext`: a data message in
    /// its session, or (without one) an initiation while the packet waits.
    fn seal(&mut self, who: Who, plaintext: Vec<u8>) -> Vec<u8> {
        let mut buf = vec![0u8; plaintext.len() + DATA_OVERHEAD + MAX_CONTROL_LEN];
        let r = self.remote(who);
        let d = match r.tunn().encapsulate(&plaintext, &mut buf) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => Vec::new(),
        };
        match msg_type(&d) {
            Some(1) => r.last_init.clone_from(&d),
            Some(4) => r.last_data.clone_from(&d),
            _ => {}
        }
        if msg_type(&d) == Some(4) {
            self.produced(who, &d, Some(plaintext));
        }
        d
    }

    fn produced(&mut self, who: Who, d: &[u8], plaintext: Option<Vec<u8>>) {
        if msg_type(d) == Some(4) && d.len() >= 16 {
            if who != Who::M {
                let slot = usize::from(who == Who::C);
                self.b_index[slot] = Some(u32::from_le_bytes([d[4], d[5], d[6], d[7]]));
            }
            self.produced.push(Produced {
                who,
                auth: d[8..].to_vec(),
                plaintext,
            });
        }
    }

    fn encrypt(&mut self, src: SocketAddr, input: &mut Input<'_>) {
        let flags = input.u8().unwrap_or(0);
        let source = (flags & 4 != 0)
            .then(|| SOURCES_INNER[usize::from(input.u8().unwrap_or(0)) % SOURCES_INNER.len()]);
        let mut p = input.chunk();
        if let Some(source) = source {
            p = ip_packet(source, &p);
        }
        if flags & 2 != 0 {
            fix_lengths(&mut p);
        }
        let who = if flags & 1 == 0 { Who::A } else { Who::C };
        self.encrypt_as(who, src, p);
    }

    fn encrypt_as(&mut self, who: Who, src: SocketAddr, plaintext: Vec<u8>) {
        let d = self.seal(who, plaintext);
        if !d.is_empty() {
            self.deliver(src, &d);
        }
    }

    fn tun(&mut self, input: &mut Input<'_>) {
        let flags = input.u8().unwrap_or(0);
        let mut p = input.chunk();
        if flags & 1 != 0 {
            let dst = if flags & 2 == 0 {
                Ipv4Addr::new(10, 0, 1, 9)
            } else {
                Ipv4Addr::new(10, 0, 3, 9)
            };
            p = ipv4(INNER_B, dst, &p);
        }
        self.tun_packet(&p);
    }

    /// B's TUN device reads `packet`; what B sends joins `pending`.
    fn tun_packet(&mut self, packet: &[u8]) {
        let mut out = vec![0u8; (packet.len() + DATA_OVERHEAD + 16).max(MAX_CONTROL_LEN)];
        let mut sink = Outbox::default();
        let outcome = self.dev.on_tun_packet(packet, &mut out, &mut sink);
        if let TunOutcome::Send { dst, len } = outcome {
            assert!(
                len <= out.len(),
                "TunOutcome::Send len {len} > out {}",
                out.len()
            );
            let d = &out[..len];
            assert_eq!(
                msg_type(d),
                Some(4),
                "B sent a TUN packet as a non-data message"
            );
            assert!(
                len >= packet.len() + DATA_OVERHEAD,
                "data message shorter than its packet"
            );
            sink.0.push((dst, d.to_vec()));
        }
        self.sent(sink);
    }

    /// Checks and queues what B handed to its sink.
    fn sent(&mut self, sink: Outbox) {
        for (dst, d) in &sink.0 {
            let ok = match msg_type(d) {
                Some(1) => d.len() == 148,
                Some(2) => d.len() == 92,
                Some(3) => d.len() == 64,
                Some(4) => d.len() >= 32,
                _ => false,
            };
            assert!(
                ok,
                "B sent a malformed datagram of {} bytes to {dst}: {d:02x?}",
                d.len()
            );
        }
        for (dst, d) in &sink.0 {
            // B's own index for a peer, from the initiations B addresses to it.
            if msg_type(d) == Some(1) {
                for (slot, r) in self.remotes[..2].iter().enumerate() {
                    if r.addr == unmap(*dst) {
                        self.b_index[slot] = Some(u32::from_le_bytes([d[4], d[5], d[6], d[7]]));
                    }
                }
            }
        }
        if let Some((_, d)) = sink.0.last() {
            self.last_from_b.clone_from(d);
        }
        self.pending.extend(sink.0);
    }

    /// Delivers B's pending datagrams to whichever remote lives at their
    /// destination (others went to an attacker, who only keeps a copy), and
    /// the remotes' answers back to B.
    fn pump(&mut self) {
        for _ in 0..PUMP_ROUNDS {
            let pending = std::mem::take(&mut self.pending);
            if pending.is_empty() {
                return;
            }
            for (dst, d) in pending {
                let Some(i) = self.remotes.iter().position(|r| r.addr == unmap(dst)) else {
                    continue;
                };
                let (who, addr) = (self.remotes[i].who, self.remotes[i].addr);
                let mut replies = Vec::new();
                self.buf.resize(BUF_LEN, 0);
                let buf = &mut self.buf;
                let tunn = self.remotes[i].tunn();
                let mut datagram: &[u8] = &d;
                // boringtun's contract: after WriteToNetwork, call again with an
                // empty datagram until Done (this flushes queued packets).
                for _ in 0..300 {
                    match tunn.decapsulate(Some(ADDR_B.ip()), datagram, buf) {
                        TunnResult::WriteToNetwork(reply) => replies.push(reply.to_vec()),
                        _ => break,
                    }
                    datagram = &[];
                }
                for reply in replies {
                    // A keepalive is the only thing the harness knows the
                    // plaintext of; flushed packets were queued earlier.
                    let plaintext = (reply.len() == DATA_OVERHEAD).then(Vec::new);
                    self.produced(who, &reply, plaintext);
                    if msg_type(&reply) == Some(1) {
                        self.remote(who).last_init.clone_from(&reply);
                    }
                    self.deliver(addr, &reply);
                }
            }
        }
    }

    fn allow(&mut self, input: &mut Input<'_>) {
        let flags = input.u8().unwrap_or(0);
        let addr = input.bytes(16);
        let prefix = input.u8().unwrap_or(0);
        let mut octets = [0u8; 16];
        octets[..addr.len()].copy_from_slice(&addr);
        let n = if flags & 2 == 0 {
            let ip = Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]);
            IpNet::new(IpAddr::V4(ip), prefix % 33)
        } else {
            IpNet::new(IpAddr::V6(Ipv6Addr::from(octets)), prefix % 129)
        };
        let Ok(n) = n else {
            return;
        };
        let who = if flags & 1 == 0 { Who::A } else { Who::C };
        if who == Who::C && !self.c_present {
            return;
        }
        match flags >> 2 & 3 {
            2 => {
                let n = n.trunc();
                let key = public(self.remote(who).secret);
                self.dev.remove_allowed_ip(&key, n);
                self.model.retain(|(m, w)| !(*m == n && *w == who));
            }
            3 => self.upsert(who, vec![n], true),
            _ => self.upsert(who, vec![n], false),
        }
    }

    fn peer_op(&mut self, which: u8) {
        match which % 4 {
            w @ (0 | 1) => {
                let who = if w == 0 { Who::A } else { Who::C };
                if who == Who::C && !self.c_present {
                    return;
                }
                let r = self.remote(who);
                r.psk = match r.psk {
                    Some(_) => None,
                    None => Some(PSK),
                };
                // The remote is reconfigured too: a new Tunn, no sessions.
                r.tunn = None;
                self.b_index[usize::from(who == Who::C)] = None;
                self.upsert(who, Vec::new(), false);
            }
            2 => {
                self.dev.remove_peer(&public(KEY_C));
                self.model.retain(|(_, w)| *w != Who::C);
                self.c_present = false;
                self.b_index[1] = None;
            }
            _ => self.upsert(Who::C, ALLOWED_C.iter().map(|n| net(n)).collect(), true),
        }
    }

    fn identities(&mut self, which: u8) {
        let keys = match which % 4 {
            0 => vec![private(KEY_B)],
            1 => vec![private(KEY_B), private(KEY_B2)],
            2 => vec![private(KEY_B2), private(KEY_B)],
            _ => Vec::new(),
        };
        self.dev.set_identities(keys);
    }

    fn before(&self) -> Before {
        Before {
            handshakes: self.dev.counters().handshakes_completed,
            endpoints: self
                .dev
                .peers()
                .into_iter()
                .map(|p| (p.public_key, p.endpoint))
                .collect(),
        }
    }

    /// One datagram from `src` into B, with every invariant checked.
    fn deliver(&mut self, src: SocketAddr, d: &[u8]) {
        if self.datagrams >= MAX_DATAGRAMS {
            return;
        }
        self.datagrams += 1;
        self.last = Some((src, d.to_vec()));
        let before = self.before();
        let mut out = vec![0u8; d.len() + self.slack];
        let mut sink = Outbox::default();
        let outcome = self.dev.on_datagram(SystemTime::UNIX_EPOCH, src, d, &mut out, &mut sink);
        if trace() {
            eprintln!(
                "{src} -> B: type {:?}, {} bytes: {outcome:?}; B answers {:?}",
                msg_type(d),
                d.len(),
                sink.0
                    .iter()
                    .map(|(dst, r)| (msg_type(r), r.len(), *dst))
                    .collect::<Vec<_>>()
            );
        }
        if let UdpOutcome::Tunnel { len } = outcome {
            self.check_tunnel(d, &out, len);
        }
        self.check_authenticated(src, d, outcome, &before, &sink);
        // Learn B's index for a peer from its handshake responses, which are
        // addressed to the initiator's index.
        for (_, reply) in &sink.0 {
            if msg_type(reply) == Some(2) && reply.len() == 92 {
                let sender = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
                let receiver = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
                for (slot, r) in self.remotes[..2].iter().enumerate() {
                    if receiver >> 8 == r.index {
                        self.b_index[slot] = Some(sender);
                    }
                }
            }
        }
        self.sent(sink);
    }

    fn check_tunnel(&self, d: &[u8], out: &[u8], len: usize) {
        assert!(
            len <= out.len(),
            "UdpOutcome::Tunnel len {len} > out {}",
            out.len()
        );
        assert_eq!(
            msg_type(d),
            Some(4),
            "a non-data message produced a TUN packet"
        );
        let packet = &out[..len];
        let Some(producer) = self.produced.iter().rev().find(|p| p.auth == d[8..]) else {
            panic!("B decrypted a data message no peer produced: {d:02x?}");
        };
        if let Some(plaintext) = &producer.plaintext {
            assert!(
                plaintext.starts_with(packet),
                "the TUN packet is not what {:?} encrypted",
                producer.who
            );
        }
        let Some(source) = inner_source(packet) else {
            panic!("a TUN packet that is not IPv4/IPv6: {packet:02x?}");
        };
        assert_eq!(
            self.owner(source),
            Some(producer.who),
            "packet from {:?} with inner source {source} reached the TUN device \
             (allowed IPs: {:?})",
            producer.who,
            self.model
        );
    }

    /// Handshakes and roaming follow only authenticated messages.
    fn check_authenticated(
        &self,
        src: SocketAddr,
        d: &[u8],
        outcome: UdpOutcome,
        before: &Before,
        sink: &Outbox,
    ) {
        let handshakes = self.dev.counters().handshakes_completed - before.handshakes;
        let moved: Vec<PublicKey> = self
            .dev
            .peers()
            .into_iter()
            .filter(|p| {
                before
                    .endpoints
                    .iter()
                    .any(|(k, e)| *k == p.public_key && *e != p.endpoint)
            })
            .map(|p| p.public_key)
            .collect();
        if handshakes == 0 && moved.is_empty() {
            return;
        }
        let reply = sink.0.first().map(|(_, r)| r.as_slice()).unwrap_or(&[]);
        let what = format!(
            "{} message of {} bytes from {src} ({outcome:?}, answered with a type {:?} \
             message of {} bytes, {handshakes} handshake(s) counted, endpoint moved for {moved:?})",
            msg_type(d).map_or("a malformed".to_string(), |t| format!("a type {t}")),
            d.len(),
            msg_type(reply),
            reply.len(),
        );
        let authenticated = match msg_type(d) {
            // An initiation is proven by the response B derives from it; a
            // response by the keepalive B then encrypts in the new session.
            Some(1) => msg_type(reply) == Some(2),
            Some(2) => msg_type(reply) == Some(4),
            Some(4) => handshakes == 0 && self.produced.iter().any(|p| p.auth == d[8..]),
            _ => false,
        };
        assert!(
            authenticated && !matches!(outcome, UdpOutcome::Dropped(_)),
            "unauthenticated state change: {what}"
        );
        for key in moved {
            let now = self.dev.peer_settings(&key).and_then(|s| s.endpoint);
            assert_eq!(
                now,
                Some(unmap(src)),
                "endpoint moved elsewhere than the source: {what}"
            );
        }
    }
}

/// `WGMESH_FUZZ_TRACE=1` prints every datagram B receives (to see what an
/// input does: run the target binary on it, or `cargo test` a seed).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("WGMESH_FUZZ_TRACE").is_some())
}

/// The message type of a WireGuard datagram (`None` if too short or the
/// reserved bytes are set).
pub fn msg_type(d: &[u8]) -> Option<u8> {
    match d {
        [t @ 1..=4, 0, 0, 0, ..] => Some(*t),
        _ => None,
    }
}

/// Recomputes MAC1 of a handshake message for the receiver's public key.
pub fn set_mac1(d: &mut [u8], receiver: &[u8; 32]) {
    let mut h = blake2::Blake2s256::new();
    h.update(b"mac1----");
    h.update(receiver);
    let key = h.finalize();
    let at = d.len() - 32;
    let Ok(mut mac) = blake2::Blake2sMac::<U16>::new_from_slice(&key) else {
        return;
    };
    mac.update(&d[..at]);
    d[at..at + 16].copy_from_slice(&mac.finalize().into_bytes());
}

fn inner_source(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]))),
        6 if p.len() >= 40 => {
            let octets: [u8; 16] = p[8..24].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// An IPv4 packet (UDP, no checksum) with `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    fix_lengths(&mut p);
    p
}

/// A packet from `src` to B with `payload`, in `src`'s family.
fn ip_packet(src: IpAddr, payload: &[u8]) -> Vec<u8> {
    match src {
        IpAddr::V4(a) => ipv4(a, INNER_B, payload),
        IpAddr::V6(a) => {
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            p[6] = 17;
            p[7] = 64;
            p[8..24].copy_from_slice(&a.octets());
            p[24..40].copy_from_slice(&Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 7).octets());
            p.extend_from_slice(payload);
            fix_lengths(&mut p);
            p
        }
    }
}

/// Makes the IP length field match the packet (truncated to 16 bits).
fn fix_lengths(p: &mut [u8]) {
    let len = p.len();
    match p.first().map(|b| b >> 4) {
        Some(4) if len >= 20 => p[2..4].copy_from_slice(&(len as u16).to_be_bytes()),
        Some(6) if len >= 40 => p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes()),
        _ => {}
    }
}

fn private(bytes: [u8; 32]) -> PrivateKey {
    // The fixed keys are not all-zero, the only bytes from_bytes refuses.
    PrivateKey::from_bytes(bytes).unwrap_or_else(|_| PrivateKey::generate())
}

/// The public key of a fixed secret, computed once per process (a scalar
/// multiplication costs more than most inputs).
fn public(secret: [u8; 32]) -> PublicKey {
    static PUBLICS: OnceLock<Vec<([u8; 32], PublicKey)>> = OnceLock::new();
    let table = PUBLICS.get_or_init(|| {
        [KEY_B, KEY_B2, KEY_A, KEY_C, KEY_M]
            .into_iter()
            .map(|k| (k, private(k).public_key()))
            .collect()
    });
    match table.iter().find(|(k, _)| *k == secret) {
        Some((_, p)) => *p,
        None => private(secret).public_key(),
    }
}

fn net(text: &str) -> IpNet {
    text.parse()
        .unwrap_or_else(|_| IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
}
