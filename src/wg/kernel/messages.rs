//! The kernel's WireGuard generic netlink messages, built and read with no
//! I/O: a change set as `WG_CMD_SET_DEVICE` messages split to size
//! ([`set_messages`]), the `WG_CMD_GET_DEVICE` request, and a dump's replies
//! as the agent's [`DeviceState`] and [`PeerStats`]. Tested in memory
//! (`messages_tests.rs`), byte for byte where the layout matters.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use rtnetlink::packet_core::{
    Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use zeroize::{Zeroize, Zeroizing};

use crate::keys::PublicKey;
use crate::mesh::{PeerChange, PeerConfig};
use crate::wg::{restrict, Capabilities, ChangeSet, DeviceState, PeerStats};

/// The largest `WG_CMD_SET_DEVICE` message [`super::KernelBackend`] sends, netlink
/// header included: one page, what wireguard-tools' `wg` sizes its netlink
/// buffers to on 4 KiB-page machines. Any size the kernel would accept works
/// as well; a page is safe everywhere and costs one syscall per ~20 peers.
pub const SAFE_MESSAGE_BYTES: usize = 4096;

/// The keepalive interval a new peer that wants none is created with, and
/// set back to 0 at the end of the same request. The kernel sends a
/// keepalive at once when a peer's interval goes from 0 to non-zero
/// (`set_peer` in `netlink.c`), and with no session yet that keepalive is a
/// handshake initiation: so the new key of a node that rotated (rotation
/// notes, option O1) handshakes immediately instead of leaving the rotating
/// node waiting for its own 5 s retry while this side is idle. 25 s is what
/// is left if the restore were lost (the next pass fixes it).
pub const FORCE_HANDSHAKE_KEEPALIVE: u16 = 25;

/// One `WG_CMD_SET_DEVICE` message, typed. `Debug` never shows the private
/// key, and the key bytes are wiped when the message is dropped.
pub struct SetMessage(WireguardMessage);

impl SetMessage {
    /// Its length on the wire, netlink and generic netlink headers included.
    pub fn len(&self) -> usize {
        HEADERS_LEN + self.0.buffer_len()
    }

    /// Never true: every message names its device.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// How many peer entries (first chunks and continuations) it carries.
    pub fn peer_count(&self) -> usize {
        self.peers().map_or(0, <[WireguardPeer]>::len)
    }

    /// The request as sent: `NLM_F_REQUEST | NLM_F_ACK` to `family`.
    pub fn to_bytes(&self, family: u16, seq: u32) -> Zeroizing<Vec<u8>> {
        let mut buf = Zeroizing::new(vec![0u8; self.len()]);
        emit_genl(
            &mut buf,
            family,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            self.0.cmd,
            &self.0,
        );
        buf
    }

    fn peers(&self) -> Option<&[WireguardPeer]> {
        self.0.attributes.iter().find_map(|a| match a {
            WireguardAttribute::Peers(p) => Some(p.as_slice()),
            _ => None,
        })
    }
}

impl fmt::Debug for SetMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SetMessage");
        for a in &self.0.attributes {
            match a {
                WireguardAttribute::IfName(n) => d.field("interface", n),
                WireguardAttribute::PrivateKey(_) => d.field("private_key", &"<redacted>"),
                WireguardAttribute::ListenPort(p) => d.field("listen_port", p),
                WireguardAttribute::Fwmark(m) => d.field("fwmark", m),
                _ => d.field("peers", &self.peer_count()),
            };
        }
        d.field("bytes", &self.len()).finish()
    }
}

impl Drop for SetMessage {
    fn drop(&mut self) {
        for a in &mut self.0.attributes {
            if let WireguardAttribute::PrivateKey(k) = a {
                k.zeroize();
            }
        }
    }
}

/// The `WG_CMD_SET_DEVICE` messages that apply `changes` to `interface`,
/// each at most `max_bytes` long (netlink header included), in order. Pure.
///
/// - The first message carries the private key, listen port and fwmark, if any.
/// - Peers follow in the change set's order ([`crate::mesh::diff`]'s: a
///   hand-over's new key, with the allowed IPs, comes before the removal of
///   the old one, so the kernel moves each prefix to the new peer atomically).
/// - wgmesh extensions have no kernel equivalent and are left out
///   ([`restrict`]): no extra identity, no successor, and a promote becomes
///   the add of the new key followed by the removal of the old one.
/// - Every added peer whose keepalive is off is created with
///   [`FORCE_HANDSHAKE_KEEPALIVE`] and set back to 0 by an update-only entry
///   at the very end, so it initiates a handshake at once.
/// - Add: public key, `WGPEER_F_REPLACE_ALLOWEDIPS`, endpoint if known,
///   keepalive (0 = off), allowed IPs. Remove: public key,
///   `WGPEER_F_REMOVE_ME`. Update: public key, `WGPEER_F_UPDATE_ONLY`, and
///   only what changed; `WGPEER_F_REPLACE_ALLOWEDIPS` only when the allowed
///   IPs changed.
/// - A peer whose entry does not fit in what is left of a message starts a
///   new one; its allowed IPs fill messages as they fit and continue in the
///   next with the public key and its flags minus
///   `WGPEER_F_REPLACE_ALLOWEDIPS` (so the first chunk replaces, the rest
///   add; an update stays update-only).
///
/// A `max_bytes` too small for even one peer entry with one allowed IP is
/// exceeded rather than looped on: every message carries at least one.
/// An empty change set yields no message.
pub fn set_messages(interface: &str, changes: &ChangeSet, max_bytes: usize) -> Vec<SetMessage> {
    let changes = &restrict(changes, Capabilities::default());
    let mut s = Splitter::new(interface, max_bytes);
    if let Some(key) = &changes.private_key {
        let bytes = Zeroizing::new(key.as_x25519().to_bytes());
        s.push_device_attr(WireguardAttribute::PrivateKey(*bytes));
    }
    if let Some(port) = changes.listen_port {
        s.push_device_attr(WireguardAttribute::ListenPort(port));
    }
    if let Some(mark) = changes.fwmark {
        s.push_device_attr(WireguardAttribute::Fwmark(mark));
    }
    let mut restore = Vec::new();
    for change in &changes.peers {
        let (mut head, flags, ips) = peer_entry(change);
        if let PeerChange::Add(p) = change {
            if p.persistent_keepalive.unwrap_or(0) == 0 {
                for attr in &mut head {
                    if let WireguardPeerAttribute::PersistentKeepalive(k) = attr {
                        *k = FORCE_HANDSHAKE_KEEPALIVE;
                    }
                }
                restore.push(p.public_key);
            }
        }
        s.push_peer(head, flags, ips);
    }
    for key in restore {
        s.push_peer(
            vec![
                WireguardPeerAttribute::PublicKey(*key.as_bytes()),
                WireguardPeerAttribute::PersistentKeepalive(0),
            ],
            WireguardPeerFlags::UpdateOnly,
            Vec::new(),
        );
    }
    s.finish()
}

/// A `WG_CMD_GET_DEVICE` reply (all the messages of one dump, in order) as
/// the agent sees it: peers normalised like the UAPI backend's. A peer that
/// the kernel split across messages (its public key repeated at the start of
/// the next one) is merged back into one.
pub fn device_state(messages: Vec<WireguardMessage>) -> std::result::Result<DeviceState, String> {
    let mut state = DeviceState::default();
    let mut peers: Vec<PeerConfig> = Vec::new();
    for mut message in messages {
        for attr in &mut message.attributes {
            match attr {
                WireguardAttribute::PublicKey(k) => {
                    state.public_key = Some(PublicKey::from_bytes(*k));
                }
                WireguardAttribute::PrivateKey(k) => {
                    // Only the public key is needed; never keep the secret.
                    if state.public_key.is_none() {
                        let bytes = Zeroizing::new(*k);
                        if let Ok(private) = crate::keys::PrivateKey::from_bytes(*bytes) {
                            state.public_key = Some(private.public_key());
                        }
                    }
                    k.zeroize();
                }
                WireguardAttribute::ListenPort(p) => state.listen_port = *p,
                WireguardAttribute::Fwmark(m) => state.fwmark = *m,
                WireguardAttribute::Peers(list) => {
                    for peer in list.iter() {
                        let parsed = peer_config(peer)?;
                        match peers.last_mut() {
                            Some(last) if last.public_key == parsed.public_key => {
                                last.allowed_ips.extend(parsed.allowed_ips);
                            }
                            _ => peers.push(parsed),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for p in &mut peers {
        p.normalize();
    }
    state.peers = peers;
    Ok(state)
}

/// Handshake times and transfer counters from a `WG_CMD_GET_DEVICE` dump,
/// one entry per peer (a peer split across messages counted once).
pub fn peer_stats(messages: &[WireguardMessage]) -> std::result::Result<Vec<PeerStats>, String> {
    let mut out: Vec<PeerStats> = Vec::new();
    for message in messages {
        for attr in &message.attributes {
            let WireguardAttribute::Peers(list) = attr else {
                continue;
            };
            for peer in list.iter() {
                let mut stats = PeerStats {
                    public_key: PublicKey::from_bytes([0; 32]),
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                };
                let mut key = None;
                for a in peer.iter() {
                    match a {
                        WireguardPeerAttribute::PublicKey(k) => {
                            key = Some(PublicKey::from_bytes(*k))
                        }
                        WireguardPeerAttribute::Endpoint(e) => stats.endpoint = Some(*e),
                        WireguardPeerAttribute::LastHandshake(t) => {
                            stats.last_handshake = handshake_time(t.seconds, t.nano_seconds);
                        }
                        WireguardPeerAttribute::RxBytes(n) => stats.rx_bytes = *n,
                        WireguardPeerAttribute::TxBytes(n) => stats.tx_bytes = *n,
                        _ => {}
                    }
                }
                stats.public_key = key.ok_or("a peer without WGPEER_A_PUBLIC_KEY")?;
                // A continuation repeats only the key (and allowed IPs).
                if out.last().map(|l| l.public_key) != Some(stats.public_key) {
                    out.push(stats);
                }
            }
        }
    }
    Ok(out)
}

/// `None` for the kernel's "never" (0.0).
fn handshake_time(seconds: i64, nanos: i64) -> Option<SystemTime> {
    let seconds = u64::try_from(seconds).ok()?;
    let nanos = u32::try_from(nanos).ok()?;
    if seconds == 0 && nanos == 0 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// Wipes a dumped private key, keeping (or deriving) the public key.
pub(super) fn scrub(message: &mut WireguardMessage) {
    let mut derived = None;
    let has_public = message
        .attributes
        .iter()
        .any(|a| matches!(a, WireguardAttribute::PublicKey(_)));
    for attr in &mut message.attributes {
        if let WireguardAttribute::PrivateKey(k) = attr {
            if !has_public {
                let bytes = Zeroizing::new(*k);
                derived = crate::keys::PrivateKey::from_bytes(*bytes)
                    .ok()
                    .map(|p| p.public_key());
            }
            k.zeroize();
        }
    }
    message
        .attributes
        .retain(|a| !matches!(a, WireguardAttribute::PrivateKey(_)));
    if let Some(public) = derived {
        message
            .attributes
            .push(WireguardAttribute::PublicKey(*public.as_bytes()));
    }
}

pub(super) const HEADERS_LEN: usize = 16 + 4; // nlmsghdr + genlmsghdr

/// The first chunk of a peer: attributes without allowed IPs, its flags, and
/// its allowed IPs.
fn peer_entry(
    change: &PeerChange,
) -> (Vec<WireguardPeerAttribute>, WireguardPeerFlags, Vec<IpNet>) {
    match change {
        PeerChange::Remove(key) => (
            vec![WireguardPeerAttribute::PublicKey(*key.as_bytes())],
            WireguardPeerFlags::RemoveMe,
            Vec::new(),
        ),
        PeerChange::Add(p) => {
            let mut head = vec![WireguardPeerAttribute::PublicKey(*p.public_key.as_bytes())];
            if let Some(e) = p.endpoint {
                head.push(WireguardPeerAttribute::Endpoint(e));
            }
            head.push(WireguardPeerAttribute::PersistentKeepalive(
                p.persistent_keepalive.unwrap_or(0),
            ));
            (
                head,
                WireguardPeerFlags::ReplaceAllowedIps,
                p.allowed_ips.clone(),
            )
        }
        PeerChange::Update {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
            successor: _,
        } => {
            let mut head = vec![WireguardPeerAttribute::PublicKey(*public_key.as_bytes())];
            if let Some(e) = endpoint {
                head.push(WireguardPeerAttribute::Endpoint(*e));
            }
            if let Some(k) = persistent_keepalive {
                head.push(WireguardPeerAttribute::PersistentKeepalive(k.unwrap_or(0)));
            }
            let mut flags = WireguardPeerFlags::UpdateOnly;
            if allowed_ips.is_some() {
                flags |= WireguardPeerFlags::ReplaceAllowedIps;
            }
            (head, flags, allowed_ips.clone().unwrap_or_default())
        }
        // `set_messages` turns promotes into an add and a remove first.
        PeerChange::Promote { to, .. } => peer_entry(&PeerChange::Add(to.clone())),
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// Netlink attribute header (4) + payload padded to 4.
fn nla_len(payload: usize) -> usize {
    4 + payload.div_ceil(4) * 4
}

struct Splitter<'a> {
    interface: &'a str,
    max: usize,
    done: Vec<SetMessage>,
    /// Device attributes of the message being built (`IfName` first).
    attrs: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    /// Its length so far, counting the `WGDEVICE_A_PEERS` header even while
    /// it has no peer (4 bytes of slack at worst).
    len: usize,
}

impl<'a> Splitter<'a> {
    fn new(interface: &'a str, max: usize) -> Self {
        let mut s = Self {
            interface,
            max,
            done: Vec::new(),
            attrs: Vec::new(),
            peers: Vec::new(),
            len: 0,
        };
        s.reset();
        s
    }

    fn reset(&mut self) {
        self.attrs = vec![WireguardAttribute::IfName(self.interface.to_owned())];
        self.peers = Vec::new();
        self.len = HEADERS_LEN + self.attrs.as_slice().buffer_len() + nla_len(0);
    }

    fn has_content(&self) -> bool {
        self.attrs.len() > 1 || !self.peers.is_empty()
    }

    fn push_device_attr(&mut self, attr: WireguardAttribute) {
        self.len += attr.buffer_len();
        self.attrs.push(attr);
    }

    fn flush(&mut self) {
        if !self.has_content() {
            return;
        }
        let mut attributes = std::mem::take(&mut self.attrs);
        let peers = std::mem::take(&mut self.peers);
        if !peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(peers));
        }
        self.done.push(SetMessage(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        }));
        self.reset();
    }

    fn push_peer(
        &mut self,
        mut head: Vec<WireguardPeerAttribute>,
        flags: WireguardPeerFlags,
        ips: Vec<IpNet>,
    ) {
        // The continuation of a peer: its key and its flags minus "replace".
        let key = head
            .iter()
            .find(|a| matches!(a, WireguardPeerAttribute::PublicKey(_)))
            .cloned();
        let mut cont_flags = flags;
        cont_flags.remove(WireguardPeerFlags::ReplaceAllowedIps);
        head.insert(1.min(head.len()), WireguardPeerAttribute::Flags(flags));

        let ips: Vec<WireguardAllowedIp> = ips.iter().map(allowed_ip).collect();
        let mut next = 0;
        loop {
            let head_len = nla_len(head.as_slice().buffer_len());
            let first_ip = ips.get(next).map_or(0, |ip| nla_len(0) + ip.buffer_len());
            if self.len + head_len + first_ip > self.max && self.has_content() {
                self.flush();
            }
            // Here the entry fits, or the message is empty and takes it
            // anyway (one allowed IP at least, so the loop ends).
            let mut used = self.len + head_len;
            let mut chunk = Vec::new();
            while let Some(ip) = ips.get(next) {
                let cost = ip.buffer_len() + if chunk.is_empty() { nla_len(0) } else { 0 };
                if !chunk.is_empty() && used + cost > self.max {
                    break;
                }
                used += cost;
                chunk.push(ip.clone());
                next += 1;
            }
            let mut peer = std::mem::take(&mut head);
            if !chunk.is_empty() {
                peer.push(WireguardPeerAttribute::AllowedIps(chunk));
            }
            self.len = used;
            self.peers.push(WireguardPeer(peer));
            if next >= ips.len() {
                return;
            }
            self.flush();
            head = key.iter().cloned().collect();
            if !cont_flags.is_empty() {
                head.push(WireguardPeerAttribute::Flags(cont_flags));
            }
        }
    }

    fn finish(mut self) -> Vec<SetMessage> {
        self.flush();
        self.done
    }
}

pub(super) fn get_request(interface: &str, family: u16, seq: u32) -> Vec<u8> {
    let message = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfName(interface.to_owned())],
    };
    let mut buf = vec![0u8; HEADERS_LEN + message.buffer_len()];
    emit_genl(
        &mut buf,
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        message.cmd,
        &message,
    );
    buf
}

/// Writes nlmsghdr + genlmsghdr + `payload` into `buf` (exactly sized). The
/// payload is emitted in place, never cloned: it may hold a private key.
pub(super) fn emit_genl(
    buf: &mut [u8],
    family: u16,
    flags: u16,
    seq: u32,
    cmd: WireguardCmd,
    payload: &WireguardMessage,
) {
    let mut header = NetlinkHeader::default();
    header.length = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    header.message_type = family;
    header.flags = flags;
    header.sequence_number = seq;
    header.emit(&mut buf[..16]);
    GenlHeader {
        cmd: cmd.into(),
        version: payload.version(),
    }
    .emit(&mut buf[16..HEADERS_LEN]);
    payload.emit(&mut buf[HEADERS_LEN..]);
}

pub(super) fn parse_wireguard(bytes: &[u8]) -> std::result::Result<WireguardMessage, String> {
    let message = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(bytes)
        .map_err(|e| e.to_string())?;
    match message.payload {
        NetlinkPayload::InnerMessage(genl) => Ok(genl.payload),
        _ => Err("expected a WireGuard message".into()),
    }
}

fn peer_config(peer: &WireguardPeer) -> std::result::Result<PeerConfig, String> {
    let mut key = None;
    let mut config = PeerConfig {
        public_key: PublicKey::from_bytes([0; 32]),
        endpoint: None,
        allowed_ips: Vec::new(),
        persistent_keepalive: None,
        successor: None,
    };
    for attr in peer.iter() {
        match attr {
            WireguardPeerAttribute::PublicKey(k) => key = Some(PublicKey::from_bytes(*k)),
            WireguardPeerAttribute::Endpoint(e) => config.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                config.persistent_keepalive = Some(*k);
            }
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    config.allowed_ips.push(ip_net(ip)?);
                }
            }
            _ => {}
        }
    }
    config.public_key = key.ok_or("a peer without WGPEER_A_PUBLIC_KEY")?;
    Ok(config)
}

fn ip_net(ip: &WireguardAllowedIp) -> std::result::Result<IpNet, String> {
    let mut addr = None;
    let mut cidr = None;
    for a in ip.iter() {
        match a {
            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(*a),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    match (addr, cidr) {
        (Some(a), Some(c)) => IpNet::new(a, c).map_err(|e| format!("allowed IP {a}/{c}: {e}")),
        _ => Err("an allowed IP without address or mask".into()),
    }
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
