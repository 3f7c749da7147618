//! The userspace WireGuard device, sans I/O: peers, cryptokey routing, Noise
//! sessions (boringtun's `Tunn`), timers and counters. Buffers in, instructions
//! out; the I/O layer (`super::runtime`) owns the TUN device and UDP socket and
//! in-memory tests wire two devices together directly.
//!
//! Sessions are keyed by local identity: every peer holds one `Tunn` per local
//! static key the device has (today one; during a key rotation the next key
//! joins), each with its own receiver-index range, so a handshake addressed to
//! either key is accepted and its session lives beside the other's.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::IpNet;

use super::allowed_ips::AllowedIps;
use crate::keys::{PresharedKey, PrivateKey, PublicKey};

/// Handshake initiations per second the device answers before it demands
/// cookies (boringtun's device uses the same figure). Each initiation is
/// checked twice (once to find its peer, once inside `Tunn`), so cookies start
/// at half this rate.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard data overhead: 16 header + 16 tag (padding comes on top).
pub const DATA_OVERHEAD: usize = 32;
/// The largest message a device writes for a control packet (initiation).
pub const MAX_CONTROL_LEN: usize = 148;
/// WireGuard message type of a handshake initiation.
const HANDSHAKE_INIT_TYPE: u32 = 1;
/// WireGuard message type of a cookie reply.
const COOKIE_REPLY_TYPE: u32 = 3;
/// How often [`Device::tick`] wants to run.
pub const TICK: Duration = Duration::from_millis(250);

/// Receives what the device wants sent when the caller did not provide a
/// single output slot: handshake messages, cookies, keepalives, and packets
/// that were queued while a handshake was in progress.
pub trait Sink {
    fn send_udp(&mut self, dst: SocketAddr, datagram: &[u8]);
}

/// The result of the MAC1 / rate-limit check.
enum Verified<'a> {
    Packet(Packet<'a>),
    /// A cookie reply of this length is in the caller's buffer.
    Cookie(usize),
    Drop(Drop),
}

/// What decapsulation produced, detached from the buffers it borrowed.
#[derive(Clone, Copy)]
enum Step {
    Done,
    Reply(usize),
    Tunnel(IpAddr, usize),
    Drop(Drop),
}

/// Why a packet was dropped. Every drop is counted, none is fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// TUN packet that is not IPv4/IPv6 or too short to route.
    NotIp,
    /// No peer's allowed IPs contain the destination (cryptokey routing).
    NoRoute,
    /// The peer has no endpoint yet.
    NoEndpoint,
    /// No private key is configured.
    NoIdentity,
    /// Datagram of no WireGuard message type or size (garbage, truncated).
    Malformed,
    /// Receiver index that belongs to no session.
    UnknownIndex,
    /// Handshake from a public key that is not a peer, or that fails to decrypt.
    BadHandshake,
    /// MAC, AEAD tag, timestamp or key failure.
    Unauthenticated,
    /// A counter that was already seen, or too old (replay window).
    Replay,
    /// Decrypted packet whose source address is not in the sender's allowed IPs.
    BadSource,
    /// Handshake traffic dropped under load (a cookie reply was sent instead).
    UnderLoad,
    /// Anything else boringtun reports.
    Other,
}

/// Device-wide counters, readable any time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub drops: HashMap<Drop, u64>,
    pub cookies_sent: u64,
    pub handshakes_completed: u64,
}

/// The outcome of one TUN packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunOutcome {
    /// `out[..len]` is a datagram for `dst`.
    Send {
        dst: SocketAddr,
        len: usize,
    },
    /// No session yet: the packet is queued and a handshake was handed to the sink.
    Queued,
    Dropped(Drop),
}

/// The outcome of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpOutcome {
    /// `out[..len]` is a decrypted IP packet for the TUN device.
    Tunnel {
        len: usize,
    },
    /// Consumed (handshake, cookie, keepalive); replies went to the sink.
    Consumed,
    Dropped(Drop),
}

/// Settings of one peer as the UAPI sets them.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 = off.
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
}

/// One peer as the UAPI reports it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The userspace WireGuard device.
pub struct Device {
    /// Local static keys; `[0]` is the active one that initiates.
    identities: Vec<Identity>,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<PublicKey, usize>,
    /// Receiver index >> 8 → (peer slot, session slot).
    by_index: HashMap<u32, (usize, usize)>,
    routes: AllowedIps<usize>,
    next_index: u32,
    last_rate_reset: Instant,
    counters: Counters,
}

struct Identity {
    private: PrivateKey,
    public: PublicKey,
    /// Checks MAC1 (keyed by this identity's public key) and hands out cookies
    /// under load; shared by every session of this identity.
    limiter: Arc<RateLimiter>,
}

struct Peer {
    settings: PeerSettings,
    /// One per identity, same order.
    sessions: Vec<Session>,
    rx_bytes: u64,
    tx_bytes: u64,
    last_handshake: Option<SystemTime>,
    /// Send a handshake initiation on the next tick, without waiting for
    /// traffic. Set for a new peer: after a data plane restart the other
    /// side still holds a session this device forgot, keeps encrypting into
    /// it, and would only notice after 15 s without replies (keepalive +
    /// rekey timeout); an initiation from here replaces it at once.
    handshake_due: bool,
}

struct Session {
    index: u32,
    tunn: Tunn,
}

impl Default for Device {
    fn default() -> Self {
        Self::new()
    }
}

impl Device {
    pub fn new() -> Self {
        Self {
            identities: Vec::new(),
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIps::new(),
            // Start somewhere unpredictable so indices do not collide across restarts.
            next_index: u32::from_le_bytes(
                PresharedKey::generate().as_bytes()[..4]
                    .try_into()
                    .unwrap_or([1, 0, 0, 0]),
            ) & 0x00ff_ffff,
            last_rate_reset: Instant::now(),
            counters: Counters::default(),
        }
    }

    /// The active private key.
    pub fn private_key(&self) -> Option<&PrivateKey> {
        self.identities.first().map(|i| &i.private)
    }

    pub fn public_key(&self) -> Option<PublicKey> {
        self.identities.first().map(|i| i.public)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Sets the local identities: `keys[0]` is active; further keys are only
    /// accepted for incoming handshakes (rotation). An empty list removes the
    /// identity (the device then drops everything). Existing sessions are reset
    /// when the active key changes, as in every WireGuard implementation.
    pub fn set_identities(&mut self, keys: Vec<PrivateKey>) {
        let new: Vec<PublicKey> = keys.iter().map(PrivateKey::public_key).collect();
        let old: Vec<PublicKey> = self.identities.iter().map(|i| i.public).collect();
        if new == old {
            return;
        }
        self.identities = keys
            .into_iter()
            .map(|private| {
                let public = private.public_key();
                Identity {
                    limiter: Arc::new(RateLimiter::new(
                        &x25519_dalek::PublicKey::from(*public.as_bytes()),
                        HANDSHAKE_RATE_LIMIT,
                    )),
                    public,
                    private,
                }
            })
            .collect();
        // A peer with our own public key cannot exist (WireGuard removes it).
        if let Some(me) = self.public_key() {
            self.remove_peer(&me);
        }
        for slot in 0..self.peers.len() {
            self.rebuild_sessions(slot);
        }
    }

    /// Adds a peer or updates one; returns true if it was new. Allowed IPs are
    /// replaced when `replace_allowed_ips`, else added to.
    pub fn upsert_peer(&mut self, settings: PeerSettings, replace_allowed_ips: bool) -> bool {
        if Some(settings.public_key) == self.public_key() {
            return false;
        }
        let (slot, new) = match self.by_key.get(&settings.public_key) {
            Some(&slot) => (slot, false),
            None => {
                let slot = self
                    .peers
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or(self.peers.len());
                let peer = Peer {
                    settings: PeerSettings {
                        allowed_ips: Vec::new(),
                        ..settings.clone()
                    },
                    sessions: Vec::new(),
                    rx_bytes: 0,
                    tx_bytes: 0,
                    last_handshake: None,
                    handshake_due: true,
                };
                if slot == self.peers.len() {
                    self.peers.push(Some(peer));
                } else {
                    self.peers[slot] = Some(peer);
                }
                self.by_key.insert(settings.public_key, slot);
                (slot, true)
            }
        };
        let mut rebuild = new;
        if let Some(peer) = self.peers[slot].as_mut() {
            let psk_changed = peer.settings.preshared_key != settings.preshared_key;
            let keepalive_changed =
                peer.settings.persistent_keepalive != settings.persistent_keepalive;
            rebuild |= psk_changed || keepalive_changed;
            peer.settings.preshared_key = settings.preshared_key;
            peer.settings.persistent_keepalive = settings.persistent_keepalive;
            if settings.endpoint.is_some() {
                peer.settings.endpoint = settings.endpoint;
            }
        }
        if replace_allowed_ips {
            self.routes.remove_value(&slot);
            if let Some(peer) = self.peers[slot].as_mut() {
                peer.settings.allowed_ips.clear();
            }
        }
        for net in settings.allowed_ips {
            let net = net.trunc();
            if let Some(previous) = self.routes.insert(net, slot) {
                if previous != slot {
                    if let Some(other) = self.peers[previous].as_mut() {
                        other.settings.allowed_ips.retain(|n| *n != net);
                    }
                }
            }
            if let Some(peer) = self.peers[slot].as_mut() {
                if !peer.settings.allowed_ips.contains(&net) {
                    peer.settings.allowed_ips.push(net);
                }
            }
        }
        if rebuild {
            self.rebuild_sessions(slot);
        }
        new
    }

    /// Removes a peer by public key; returns whether it existed.
    pub fn remove_peer(&mut self, key: &PublicKey) -> bool {
        let Some(slot) = self.by_key.remove(key) else {
            return false;
        };
        self.routes.remove_value(&slot);
        if let Some(peer) = self.peers[slot].take() {
            for s in &peer.sessions {
                self.by_index.remove(&s.index);
            }
        }
        true
    }

    /// A peer's current settings.
    pub fn peer_settings(&self, key: &PublicKey) -> Option<PeerSettings> {
        let slot = *self.by_key.get(key)?;
        self.peers[slot].as_ref().map(|p| p.settings.clone())
    }

    /// Removes one allowed IP from a peer (only if that peer holds it).
    pub fn remove_allowed_ip(&mut self, key: &PublicKey, net: IpNet) {
        let Some(&slot) = self.by_key.get(key) else {
            return;
        };
        let net = net.trunc();
        if self.routes.lookup(net.network()) == Some(&slot) {
            if let Some(owner) = self.routes.remove(net) {
                if owner != slot {
                    self.routes.insert(net, owner);
                }
            }
        }
        if let Some(peer) = self.peers[slot].as_mut() {
            peer.settings.allowed_ips.retain(|n| *n != net);
        }
    }

    pub fn remove_all_peers(&mut self) {
        let keys: Vec<PublicKey> = self.by_key.keys().copied().collect();
        for key in keys {
            self.remove_peer(&key);
        }
    }

    pub fn peer_count(&self) -> usize {
        self.by_key.len()
    }

    /// Every peer's state, sorted by public key.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut out: Vec<PeerStatus> = self
            .peers
            .iter()
            .flatten()
            .map(|p| {
                let mut allowed_ips = p.settings.allowed_ips.clone();
                allowed_ips.sort();
                PeerStatus {
                    public_key: p.settings.public_key,
                    preshared_key: p.settings.preshared_key.clone(),
                    endpoint: p.settings.endpoint,
                    persistent_keepalive: p.settings.persistent_keepalive,
                    allowed_ips,
                    last_handshake: p.last_handshake,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                }
            })
            .collect();
        out.sort_by_key(|p| p.public_key);
        out
    }

    /// Routes one IP packet read from the TUN device: cryptokey routing by
    /// destination, then encryption into `out` (which must hold
    /// `packet.len() + DATA_OVERHEAD + 16`, and at least `MAX_CONTROL_LEN`).
    pub fn on_tun_packet(
        &mut self,
        packet: &[u8],
        out: &mut [u8],
        sink: &mut impl Sink,
    ) -> TunOutcome {
        let Some(dst) = Tunn::dst_address(packet) else {
            return self.drop_tun(Drop::NotIp);
        };
        let Some(&slot) = self.routes.lookup(dst) else {
            return self.drop_tun(Drop::NoRoute);
        };
        let Some(peer) = self.peers[slot].as_mut() else {
            return self.drop_tun(Drop::NoRoute);
        };
        let Some(session) = peer.sessions.first_mut() else {
            return self.drop_tun(Drop::NoIdentity);
        };
        let Some(endpoint) = peer.settings.endpoint else {
            return self.drop_tun(Drop::NoEndpoint);
        };
        match session.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                let len = datagram.len();
                peer.tx_bytes += len as u64;
                // The message type word tells a queued packet's handshake
                // initiation from a data datagram, without parsing on the
                // data path.
                if out.get(..4) == Some(&HANDSHAKE_INIT_TYPE.to_le_bytes()[..]) {
                    // No session: the packet was queued and this is the
                    // initiation that will bring one up.
                    sink.send_udp(endpoint, &out[..len]);
                    return TunOutcome::Queued;
                }
                TunOutcome::Send { dst: endpoint, len }
            }
            TunnResult::Done => TunOutcome::Queued,
            TunnResult::Err(e) => self.drop_tun(classify(&e)),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                self.drop_tun(Drop::Other)
            }
        }
    }

    /// Handles one datagram from the UDP socket. A decrypted packet lands in
    /// `out` (which must be at least as long as `datagram`); replies go to the sink.
    pub fn on_datagram(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        sink: &mut impl Sink,
    ) -> UdpOutcome {
        let src = unmap(src);
        if self.identities.is_empty() {
            return self.drop_udp(Drop::NoIdentity);
        }
        let mut cookie = [0u8; 64];
        let packet = match self.verify(src.ip(), datagram, &mut cookie) {
            Verified::Packet(p) => p,
            Verified::Cookie(len) => {
                self.counters.cookies_sent += 1;
                sink.send_udp(src, &cookie[..len]);
                return UdpOutcome::Consumed;
            }
            Verified::Drop(why) => return self.drop_udp(why),
        };
        let (slot, session, is_handshake) = match &packet {
            Packet::HandshakeInit(init) => match self.find_initiator(init) {
                Some((slot, session)) => (slot, session, true),
                None => return self.drop_udp(Drop::BadHandshake),
            },
            Packet::HandshakeResponse(p) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&(slot, session)) => (slot, session, true),
                None => return self.drop_udp(Drop::UnknownIndex),
            },
            Packet::PacketCookieReply(p) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&(slot, session)) => (slot, session, false),
                None => return self.drop_udp(Drop::UnknownIndex),
            },
            Packet::PacketData(p) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(&(slot, session)) => (slot, session, false),
                None => return self.drop_udp(Drop::UnknownIndex),
            },
        };
        let is_init = matches!(packet, Packet::HandshakeInit(_));
        let is_cookie = matches!(packet, Packet::PacketCookieReply(_));
        let step = match self.peers[slot]
            .as_mut()
            .and_then(|p| p.sessions.get_mut(session))
        {
            None => Step::Drop(Drop::UnknownIndex),
            Some(sess) => match sess.tunn.decapsulate(Some(src.ip()), datagram, out) {
                TunnResult::Done => Step::Done,
                TunnResult::WriteToNetwork(reply) => Step::Reply(reply.len()),
                TunnResult::WriteToTunnelV4(p, a) => Step::Tunnel(IpAddr::V4(a), p.len()),
                TunnResult::WriteToTunnelV6(p, a) => Step::Tunnel(IpAddr::V6(a), p.len()),
                TunnResult::Err(e) => Step::Drop(classify(&e)),
            },
        };
        // boringtun checks the rate limit again inside `decapsulate`; if the
        // limit is crossed between our check and its, it answers an
        // unauthenticated message with a cookie reply. That proves nothing
        // about the sender: no roaming, no handshake, no queue flush.
        if let Step::Reply(len) = step {
            if out.get(..4) == Some(&COOKIE_REPLY_TYPE.to_le_bytes()[..]) {
                self.counters.cookies_sent += 1;
                sink.send_udp(src, &out[..len]);
                return UdpOutcome::Consumed;
            }
        }
        let outcome = match step {
            Step::Drop(why) => return self.drop_udp(why),
            Step::Tunnel(inner_src, len) => {
                // Cryptokey routing on receive: the inner source must be one
                // of the sender's allowed IPs.
                if self.routes.lookup(inner_src) != Some(&slot) {
                    return self.drop_udp(Drop::BadSource);
                }
                UdpOutcome::Tunnel { len }
            }
            Step::Done | Step::Reply(_) => UdpOutcome::Consumed,
        };
        let Some(peer) = self.peers[slot].as_mut() else {
            return outcome;
        };
        peer.rx_bytes += datagram.len() as u64;
        if is_cookie {
            // A cookie reply proves little about its source: no roaming.
            return outcome;
        }
        // Authenticated: learn the endpoint (roaming).
        peer.settings.endpoint = Some(src);
        let established = match step {
            Step::Reply(_) => is_handshake,
            Step::Done => is_handshake && !is_init,
            _ => false,
        };
        if established {
            peer.last_handshake = Some(SystemTime::now());
            self.counters.handshakes_completed += 1;
        }
        if let Step::Reply(len) = step {
            peer.tx_bytes += len as u64;
            sink.send_udp(src, &out[..len]);
            // Packets that waited for this session go out now.
            self.flush_queue(slot, session, sink);
        }
        outcome
    }

    /// Runs the timers: handshake retries, rekeys, keepalives, expiry. Call
    /// every [`TICK`].
    pub fn tick(&mut self, sink: &mut impl Sink) {
        if self.last_rate_reset.elapsed() >= Duration::from_secs(1) {
            for id in &self.identities {
                id.limiter.reset_count();
            }
            self.last_rate_reset = Instant::now();
        }
        let mut buf = [0u8; MAX_CONTROL_LEN + DATA_OVERHEAD];
        for peer in self.peers.iter_mut().flatten() {
            let endpoint = peer.settings.endpoint;
            // A peer that completed a handshake meanwhile (it initiated)
            // needs none from here.
            peer.handshake_due &= peer.last_handshake.is_none();
            if let (true, Some(dst), Some(s)) =
                (peer.handshake_due, endpoint, peer.sessions.first_mut())
            {
                peer.handshake_due = false;
                if let TunnResult::WriteToNetwork(datagram) =
                    s.tunn.format_handshake_initiation(&mut buf, false)
                {
                    peer.tx_bytes += datagram.len() as u64;
                    sink.send_udp(dst, datagram);
                }
            }
            for s in &mut peer.sessions {
                if let TunnResult::WriteToNetwork(datagram) = s.tunn.update_timers(&mut buf) {
                    if let Some(dst) = endpoint {
                        peer.tx_bytes += datagram.len() as u64;
                        sink.send_udp(dst, datagram);
                    }
                }
            }
        }
    }

    fn flush_queue(&mut self, slot: usize, session: usize, sink: &mut impl Sink) {
        let Some(peer) = self.peers[slot].as_mut() else {
            return;
        };
        let Some(endpoint) = peer.settings.endpoint else {
            return;
        };
        let Some(sess) = peer.sessions.get_mut(session) else {
            return;
        };
        let mut buf = vec![0u8; 65_535 + DATA_OVERHEAD + 16];
        while let TunnResult::WriteToNetwork(datagram) = sess.tunn.decapsulate(None, &[], &mut buf)
        {
            peer.tx_bytes += datagram.len() as u64;
            sink.send_udp(endpoint, datagram);
        }
    }

    /// Checks MAC1 against each local identity in turn (a handshake is keyed to
    /// the identity it is addressed to) and applies the rate limit: under load,
    /// a handshake without a valid cookie MAC gets a cookie reply instead.
    fn verify<'a>(&self, src: IpAddr, datagram: &'a [u8], cookie: &mut [u8; 64]) -> Verified<'a> {
        let mut result = Verified::Drop(Drop::Unauthenticated);
        for id in &self.identities {
            let mut reply = [0u8; 64];
            match id.limiter.verify_packet(Some(src), datagram, &mut reply) {
                Ok(p) => return Verified::Packet(p),
                Err(TunnResult::WriteToNetwork(c)) => {
                    let len = c.len().min(cookie.len());
                    cookie[..len].copy_from_slice(&c[..len]);
                    return Verified::Cookie(len);
                }
                Err(TunnResult::Err(WireGuardError::InvalidMac)) => {}
                Err(TunnResult::Err(e)) => return Verified::Drop(classify(&e)),
                Err(_) => result = Verified::Drop(Drop::Other),
            }
        }
        result
    }

    /// Which peer (and which local identity) a handshake initiation is for.
    fn find_initiator(&self, init: &boringtun::noise::HandshakeInit<'_>) -> Option<(usize, usize)> {
        for (i, id) in self.identities.iter().enumerate() {
            let public = x25519_dalek::PublicKey::from(*id.public.as_bytes());
            if let Ok(half) = parse_handshake_anon(id.private.as_x25519(), &public, init) {
                let key = PublicKey::from_bytes(half.peer_static_public);
                return self.by_key.get(&key).map(|&slot| (slot, i));
            }
        }
        None
    }

    fn rebuild_sessions(&mut self, slot: usize) {
        let Some(peer) = self.peers[slot].as_mut() else {
            return;
        };
        for s in peer.sessions.drain(..) {
            self.by_index.remove(&s.index);
        }
        let keepalive = match peer.settings.persistent_keepalive {
            0 => None,
            n => Some(n),
        };
        for id in &self.identities {
            let index = loop {
                let candidate = self.next_index & 0x00ff_ffff;
                self.next_index = self.next_index.wrapping_add(1);
                if !self.by_index.contains_key(&candidate) {
                    break candidate;
                }
            };
            let tunn = Tunn::new(
                id.private.as_x25519().clone(),
                x25519_dalek::PublicKey::from(*peer.settings.public_key.as_bytes()),
                peer.settings.preshared_key.as_ref().map(|k| *k.as_bytes()),
                keepalive,
                index,
                Some(id.limiter.clone()),
            );
            self.by_index.insert(index, (slot, peer.sessions.len()));
            peer.sessions.push(Session { index, tunn });
        }
    }

    fn drop_tun(&mut self, why: Drop) -> TunOutcome {
        *self.counters.drops.entry(why).or_default() += 1;
        TunOutcome::Dropped(why)
    }

    fn drop_udp(&mut self, why: Drop) -> UdpOutcome {
        *self.counters.drops.entry(why).or_default() += 1;
        UdpOutcome::Dropped(why)
    }
}

/// IPv4-mapped IPv6 socket addresses (from a dual-stack socket) as plain IPv4.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn classify(e: &WireGuardError) -> Drop {
    match e {
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => Drop::Replay,
        WireGuardError::InvalidMac
        | WireGuardError::InvalidAeadTag
        | WireGuardError::WrongKey
        | WireGuardError::InvalidTai64nTimestamp
        | WireGuardError::WrongTai64nTimestamp => Drop::Unauthenticated,
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => Drop::UnknownIndex,
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType
        | WireGuardError::UnexpectedPacket => Drop::Malformed,
        WireGuardError::UnderLoad => Drop::UnderLoad,
        _ => Drop::Other,
    }
}
