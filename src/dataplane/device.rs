//! The userspace WireGuard device, sans I/O: peers, cryptokey routing, Noise
//! sessions (boringtun's `Tunn`), timers and counters. Buffers in, instructions
//! out; the I/O layer (`super::runtime`) owns the TUN device and UDP socket and
//! in-memory tests wire two devices together directly.
//!
//! Sessions are keyed by (local identity, remote key): every peer holds one
//! `Tunn` per local static key the device has (one; during a key rotation the
//! extra identity joins) and per key the peer may speak with (its own; during
//! the peer's rotation its successor, and after a promote its predecessor),
//! each with its own receiver-index range. A handshake under any of them is
//! accepted and its session lives beside the others; packets leave on the
//! newest valid one. See docs/dataplane.md, "Key rotation extensions".

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
pub use crate::uapi::ExtraRole;
use crate::wg::SessionInfo;

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
    pub successor: Option<PublicKey>,
}

/// The userspace WireGuard device.
pub struct Device {
    /// Local static keys; `[0]` is the active one that initiates, an optional
    /// `[1]` is the extra identity of a key rotation.
    identities: Vec<Identity>,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<PublicKey, usize>,
    /// Successor key → the slot of the peer that accepts it.
    by_successor: HashMap<PublicKey, usize>,
    /// Receiver index >> 8 → (peer slot, session slot).
    by_index: HashMap<u32, (usize, usize)>,
    routes: AllowedIps<usize>,
    next_index: u32,
    /// Orders completed handshakes across all sessions ("most recent").
    handshake_seq: u64,
    last_rate_reset: Instant,
    counters: Counters,
}

/// What a local identity may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `[0]`: initiates normal traffic.
    Active,
    /// Staged next key: accepted, and probed towards every peer.
    Next,
    /// Replaced key (grace period), or an extra key from
    /// [`Device::set_identities`]: accepted and answered, never initiating.
    Previous,
}

struct Identity {
    private: PrivateKey,
    public: PublicKey,
    role: Role,
    /// Checks MAC1 (keyed by this identity's public key) and hands out cookies
    /// under load; shared by every session of this identity.
    limiter: Arc<RateLimiter>,
}

struct Peer {
    settings: PeerSettings,
    /// One per (local identity, remote key): identities in device order,
    /// remote keys in the order of [`Peer::remotes`].
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
    /// A key accepted as this same peer (the peer's staged next key).
    successor: Option<PublicKey>,
    /// The key this peer had before a promote, while sessions made with it
    /// may still carry packets; dropped once none is valid.
    predecessor: Option<PublicKey>,
}

struct Session {
    index: u32,
    tunn: Tunn,
    local: PublicKey,
    remote: PublicKey,
    /// The latest completed handshake on this `Tunn`: its order among all
    /// the device's handshakes, and the wall-clock time.
    established: Option<(u64, SystemTime)>,
}

impl Session {
    /// Established and still holding a usable keypair (boringtun drops a
    /// session REJECT_AFTER_TIME after its handshake).
    fn is_valid(&self) -> bool {
        self.established.is_some() && self.tunn.time_since_last_handshake().is_some()
    }
}

impl Peer {
    /// The remote static keys this peer has sessions for: its own, then its
    /// successor and predecessor.
    fn remotes(&self) -> Vec<PublicKey> {
        let mut out = vec![self.settings.public_key];
        for k in [self.successor, self.predecessor].into_iter().flatten() {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }

    fn session_of(&self, local: PublicKey, remote: PublicKey) -> Option<usize> {
        self.sessions
            .iter()
            .position(|s| s.local == local && s.remote == remote)
    }

    /// The session to send on: the most recently established valid one,
    /// whatever its identity or remote key, so a switch of keys on either
    /// side loses nothing; without one, `fallback` (the active identity's
    /// session with the peer's own key, which queues and initiates).
    fn send_session(&self, fallback: Option<usize>) -> Option<usize> {
        self.sessions
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_valid())
            .max_by_key(|(_, s)| s.established.map(|(seq, _)| seq))
            .map(|(i, _)| i)
            .or(fallback)
    }
}

impl Device {
    /// An empty device; `now` starts its handshake rate-limit window. The
    /// device never reads a clock: every call that needs the time is given
    /// it, so tests drive its timers with any clock they like.
    pub fn new(now: Instant) -> Self {
        Self {
            identities: Vec::new(),
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_successor: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIps::new(),
            // Start somewhere unpredictable so indices do not collide across restarts.
            next_index: u32::from_le_bytes(
                PresharedKey::generate().as_bytes()[..4]
                    .try_into()
                    .unwrap_or([1, 0, 0, 0]),
            ) & 0x00ff_ffff,
            handshake_seq: 0,
            last_rate_reset: now,
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

    /// The extra identity's public key and role, if the device has one.
    pub fn extra_identity(&self) -> Option<(PublicKey, ExtraRole)> {
        let id = self.identities.get(1)?;
        Some((
            id.public,
            match id.role {
                Role::Next => ExtraRole::Next,
                Role::Active | Role::Previous => ExtraRole::Previous,
            },
        ))
    }

    /// The extra identity's private key and role (for the runtime, which
    /// re-applies it with a new active key).
    pub fn extra_identity_key(&self) -> Option<(PrivateKey, ExtraRole)> {
        let (_, role) = self.extra_identity()?;
        Some((self.identities.get(1)?.private.clone(), role))
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Sets the local identities: `keys[0]` is active; further keys are only
    /// accepted for incoming handshakes (and answered, never initiating). An
    /// empty list removes the identity (the device then drops everything).
    /// Sessions of a key that stays an identity are kept; those of a key that
    /// goes are dropped.
    pub fn set_identities(&mut self, keys: Vec<PrivateKey>) {
        let mut roles = Vec::with_capacity(keys.len());
        for (i, key) in keys.into_iter().enumerate() {
            roles.push((key, if i == 0 { Role::Active } else { Role::Previous }));
        }
        self.install_identities(roles);
    }

    /// Sets the active key and the optional extra identity of a key
    /// rotation in one step (the UAPI's `private_key` and
    /// `wgmesh_extra_private_key` together). Every session of a key that
    /// stays local, in either slot, is kept: staging K2 (`extra = (K2,
    /// Next)`), then activating it (`active = K2, extra = (K1, Previous)`),
    /// then ending the grace period (`extra = None`) never drops a session
    /// still in use. An extra key equal to the active one is ignored; no
    /// active key removes both.
    pub fn set_local_keys(
        &mut self,
        active: Option<PrivateKey>,
        extra: Option<(PrivateKey, ExtraRole)>,
    ) {
        let Some(active) = active else {
            self.install_identities(Vec::new());
            return;
        };
        let active_public = active.public_key();
        let mut keys = vec![(active, Role::Active)];
        if let Some((key, role)) = extra {
            if key.public_key() != active_public {
                let role = match role {
                    ExtraRole::Next => Role::Next,
                    ExtraRole::Previous => Role::Previous,
                };
                keys.push((key, role));
            }
        }
        self.install_identities(keys);
    }

    fn install_identities(&mut self, keys: Vec<(PrivateKey, Role)>) {
        let same = keys.len() == self.identities.len()
            && keys
                .iter()
                .zip(&self.identities)
                .all(|((k, r), id)| k.public_key() == id.public && *r == id.role);
        if same {
            return;
        }
        let mut old: Vec<Identity> = std::mem::take(&mut self.identities);
        self.identities = keys
            .into_iter()
            .map(|(private, role)| {
                let public = private.public_key();
                // A key that stays keeps its limiter: its sessions share it.
                let limiter = match old.iter().position(|id| id.public == public) {
                    Some(i) => old.swap_remove(i).limiter,
                    None => Arc::new(RateLimiter::new(
                        &x25519_dalek::PublicKey::from(*public.as_bytes()),
                        HANDSHAKE_RATE_LIMIT,
                    )),
                };
                Identity {
                    private,
                    public,
                    role,
                    limiter,
                }
            })
            .collect();
        // A peer (or successor) with one of our own public keys cannot exist:
        // WireGuard removes it, and a staged key of ours must never become
        // somebody's peer.
        let locals: Vec<PublicKey> = self.identities.iter().map(|i| i.public).collect();
        for me in &locals {
            self.remove_peer(me);
            if let Some(slot) = self.by_successor.remove(me) {
                if let Some(peer) = self.peers[slot].as_mut() {
                    peer.successor = None;
                }
            }
        }
        for slot in 0..self.peers.len() {
            self.sync_sessions(slot, false);
        }
    }

    /// Adds a peer or updates one; returns true if it was new. Allowed IPs are
    /// replaced when `replace_allowed_ips`, else added to. A key that is one
    /// of the device's own is refused; a key that was another peer's
    /// successor stops being that (an explicit peer wins).
    pub fn upsert_peer(&mut self, settings: PeerSettings, replace_allowed_ips: bool) -> bool {
        if self
            .identities
            .iter()
            .any(|i| i.public == settings.public_key)
        {
            return false;
        }
        if let Some(other) = self.by_successor.remove(&settings.public_key) {
            if let Some(peer) = self.peers[other].as_mut() {
                peer.successor = None;
            }
            self.sync_sessions(other, false);
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
                    successor: None,
                    predecessor: None,
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
            if let Some(successor) = peer.successor {
                self.by_successor.remove(&successor);
            }
        }
        true
    }

    /// Sets (or with `None` clears) the successor of peer `key`: a static key
    /// whose handshakes are accepted as this same peer (same allowed IPs, same
    /// endpoint handling), each with a session of its own beside the peer's.
    /// This device never initiates towards a successor; it answers, and sends
    /// on whichever session is newest. Clearing also drops what a promote
    /// kept of the old key. Returns false (and changes nothing) when there is
    /// no such peer, or the successor is one of the device's own keys,
    /// another peer's key or another peer's successor.
    pub fn set_successor(&mut self, key: &PublicKey, successor: Option<PublicKey>) -> bool {
        let Some(&slot) = self.by_key.get(key) else {
            return false;
        };
        if let Some(k) = successor {
            let taken = self.identities.iter().any(|i| i.public == k)
                || self.by_key.contains_key(&k)
                || self.by_successor.get(&k).is_some_and(|&s| s != slot);
            if taken {
                return false;
            }
        }
        let Some(peer) = self.peers[slot].as_mut() else {
            return false;
        };
        if peer.successor == successor && (successor.is_some() || peer.predecessor.is_none()) {
            return true;
        }
        if let Some(old) = peer.successor.take() {
            self.by_successor.remove(&old);
        }
        match successor {
            Some(k) => {
                if peer.predecessor == Some(k) {
                    peer.predecessor = None;
                }
                peer.successor = Some(k);
                self.by_successor.insert(k, slot);
            }
            None => peer.predecessor = None,
        }
        self.sync_sessions(slot, false);
        true
    }

    /// Renames peer `key` to its successor, keeping every session: those made
    /// with the successor become the peer's own (it initiates and rekeys
    /// them), those made with the old key stay usable, receive and send, until
    /// they expire or the successor is cleared. Returns the new key, or `None`
    /// (nothing changed) when the peer does not exist or has no successor.
    pub fn promote_successor(&mut self, key: &PublicKey) -> Option<PublicKey> {
        let slot = *self.by_key.get(key)?;
        let peer = self.peers[slot].as_mut()?;
        let to = peer.successor?;
        self.by_successor.remove(&to);
        self.by_key.remove(key);
        self.by_key.insert(to, slot);
        peer.settings.public_key = to;
        peer.successor = None;
        peer.predecessor = Some(*key);
        // The session list already holds (identity, new key) and (identity,
        // old key) pairs; nothing to rebuild, so no handshake state is lost.
        peer.handshake_due = false;
        Some(to)
    }

    /// The successor of peer `key`, if any.
    pub fn successor(&self, key: &PublicKey) -> Option<PublicKey> {
        let slot = *self.by_key.get(key)?;
        self.peers[slot].as_ref()?.successor
    }

    /// Every established, still valid session, by peer then identity then
    /// remote key. A session with `local` = a staged key is that peer's
    /// cryptographic confirmation of the key.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut out = Vec::new();
        for peer in self.peers.iter().flatten() {
            for s in &peer.sessions {
                if let (true, Some((_, at))) = (s.is_valid(), s.established) {
                    out.push(SessionInfo {
                        peer: peer.settings.public_key,
                        local: s.local,
                        remote: s.remote,
                        established: at,
                    });
                }
            }
        }
        out.sort_by_key(|s| (s.peer, s.local, s.remote));
        out
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
                    successor: p.successor,
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
        let active = self.identities.first().map(|i| i.public);
        let Some(peer) = self.peers[slot].as_mut() else {
            return self.drop_tun(Drop::NoRoute);
        };
        let primary = active.and_then(|me| peer.session_of(me, peer.settings.public_key));
        let Some(session) = peer
            .send_session(primary)
            .and_then(|i| peer.sessions.get_mut(i))
        else {
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

    /// Handles one datagram from the UDP socket, received at wall-clock time
    /// `now` (what a completed handshake records, as the UAPI reports it). A
    /// decrypted packet lands in `out` (which must be at least as long as
    /// `datagram`); replies go to the sink.
    pub fn on_datagram(
        &mut self,
        now: SystemTime,
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
                // boringtun cuts the packet at its IP length field: a field
                // shorter than the header (0, say) leaves no packet, and a
                // TUN write batch holding one fails as a whole.
                let header = if inner_src.is_ipv4() { 20 } else { 40 };
                if len < header {
                    return self.drop_udp(Drop::Malformed);
                }
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
            peer.last_handshake = Some(now);
            self.handshake_seq += 1;
            if let Some(sess) = peer.sessions.get_mut(session) {
                sess.established = Some((self.handshake_seq, now));
            }
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

    /// Runs the timers: handshake retries, rekeys, keepalives, expiry, and
    /// the key-rotation probes. Call every [`TICK`].
    ///
    /// Who may initiate: the active identity and a staged ([`ExtraRole::Next`])
    /// one, and only towards a peer's own key. A previous identity, a
    /// successor and a predecessor only answer; their timers' initiations are
    /// dropped here, so an old key is never kept alive from this side.
    ///
    /// Probes: towards every peer with an endpoint and no valid session under
    /// it, the staged identity starts a handshake; so does the active one
    /// while the peer is being reached under another identity (after an
    /// activation, towards a peer that has not switched yet). boringtun does
    /// not restart a handshake that is in progress and retries one every
    /// REKEY_TIMEOUT (5 s), so a probe costs at most one initiation per peer
    /// per 5 s; a peer that does not know the key drops it.
    /// `now` is the monotonic time of this tick (the handshake rate limit's
    /// one-second window); boringtun's own timers read their clock inside
    /// `Tunn` (mocked in tests with the `mock-time` feature).
    pub fn tick(&mut self, now: Instant, sink: &mut impl Sink) {
        if now.saturating_duration_since(self.last_rate_reset) >= Duration::from_secs(1) {
            for id in &self.identities {
                id.limiter.reset_count();
            }
            self.last_rate_reset = now;
        }
        let roles: Vec<(PublicKey, Role)> =
            self.identities.iter().map(|i| (i.public, i.role)).collect();
        let active = roles.first().map(|(k, _)| *k);
        let next = roles
            .iter()
            .find(|(_, r)| *r == Role::Next)
            .map(|(k, _)| *k);
        let may_initiate = |s: &Session, own: PublicKey| {
            s.remote == own
                && roles
                    .iter()
                    .any(|(k, r)| *k == s.local && matches!(r, Role::Active | Role::Next))
        };
        let mut stale_predecessors = Vec::new();
        let mut buf = [0u8; MAX_CONTROL_LEN + DATA_OVERHEAD];
        for (slot, peer) in self.peers.iter_mut().enumerate() {
            let Some(peer) = peer.as_mut() else { continue };
            let endpoint = peer.settings.endpoint;
            let own = peer.settings.public_key;
            let primary = active.and_then(|me| peer.session_of(me, own));
            // A peer that completed a handshake meanwhile (it initiated)
            // needs none from here.
            peer.handshake_due &= peer.last_handshake.is_none();
            let mut initiate = Vec::new();
            if let (true, Some(i)) = (peer.handshake_due, primary) {
                peer.handshake_due = false;
                initiate.push(i);
            }
            if let Some(i) = next.and_then(|k| peer.session_of(k, own)) {
                if !peer.sessions[i].is_valid() {
                    initiate.push(i);
                }
            }
            if let Some(i) = primary {
                let elsewhere = peer
                    .sessions
                    .iter()
                    .any(|s| s.local != peer.sessions[i].local && s.is_valid());
                if elsewhere && !peer.sessions[i].is_valid() {
                    initiate.push(i);
                }
            }
            if let Some(dst) = endpoint {
                initiate.dedup();
                for i in initiate {
                    let s = &mut peer.sessions[i];
                    // Not forced: a handshake already in progress is left
                    // to boringtun's own retry timer (the rate limit above).
                    if let TunnResult::WriteToNetwork(datagram) =
                        s.tunn.format_handshake_initiation(&mut buf, false)
                    {
                        peer.tx_bytes += datagram.len() as u64;
                        sink.send_udp(dst, datagram);
                    }
                }
            }
            for s in &mut peer.sessions {
                let allowed = may_initiate(s, own);
                if let TunnResult::WriteToNetwork(datagram) = s.tunn.update_timers(&mut buf) {
                    let is_init = datagram.get(..4) == Some(&HANDSHAKE_INIT_TYPE.to_le_bytes()[..]);
                    if let (Some(dst), true) = (endpoint, allowed || !is_init) {
                        peer.tx_bytes += datagram.len() as u64;
                        sink.send_udp(dst, datagram);
                    }
                }
            }
            if let Some(old) = peer.predecessor {
                if !peer
                    .sessions
                    .iter()
                    .any(|s| s.remote == old && s.is_valid())
                {
                    stale_predecessors.push(slot);
                }
            }
        }
        for slot in stale_predecessors {
            if let Some(peer) = self.peers[slot].as_mut() {
                peer.predecessor = None;
            }
            self.sync_sessions(slot, false);
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
        for id in &self.identities {
            let public = x25519_dalek::PublicKey::from(*id.public.as_bytes());
            if let Ok(half) = parse_handshake_anon(id.private.as_x25519(), &public, init) {
                let key = PublicKey::from_bytes(half.peer_static_public);
                // The peer's own key, or the successor it pre-announced.
                let slot = *self.by_key.get(&key).or(self.by_successor.get(&key))?;
                let session = self.peers[slot].as_ref()?.session_of(id.public, key)?;
                return Some((slot, session));
            }
        }
        None
    }

    fn rebuild_sessions(&mut self, slot: usize) {
        self.sync_sessions(slot, true);
    }

    /// Makes peer `slot` hold exactly one session per (local identity,
    /// remote key), keeping the existing ones unless `rebuild` (a changed
    /// pre-shared key or keepalive, which `Tunn` cannot take in place).
    fn sync_sessions(&mut self, slot: usize, rebuild: bool) {
        let Some(peer) = self.peers[slot].as_mut() else {
            return;
        };
        let remotes = peer.remotes();
        let mut old = std::mem::take(&mut peer.sessions);
        if rebuild {
            for s in old.drain(..) {
                self.by_index.remove(&s.index);
            }
        }
        let keepalive = match peer.settings.persistent_keepalive {
            0 => None,
            n => Some(n),
        };
        let mut sessions = Vec::with_capacity(self.identities.len() * remotes.len());
        for id in &self.identities {
            for remote in &remotes {
                if let Some(i) = old
                    .iter()
                    .position(|s| s.local == id.public && s.remote == *remote)
                {
                    sessions.push(old.swap_remove(i));
                    continue;
                }
                let index = loop {
                    let candidate = self.next_index & 0x00ff_ffff;
                    self.next_index = self.next_index.wrapping_add(1);
                    if !self.by_index.contains_key(&candidate) {
                        break candidate;
                    }
                };
                // Reserve it now, so the next one cannot take it.
                self.by_index.insert(index, (slot, usize::MAX));
                let tunn = Tunn::new(
                    id.private.as_x25519().clone(),
                    x25519_dalek::PublicKey::from(*remote.as_bytes()),
                    peer.settings.preshared_key.as_ref().map(|k| *k.as_bytes()),
                    keepalive,
                    index,
                    Some(id.limiter.clone()),
                );
                sessions.push(Session {
                    index,
                    tunn,
                    local: id.public,
                    remote: *remote,
                    established: None,
                });
            }
        }
        for s in old {
            self.by_index.remove(&s.index);
        }
        for (i, s) in sessions.iter().enumerate() {
            self.by_index.insert(s.index, (slot, i));
        }
        peer.sessions = sessions;
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
