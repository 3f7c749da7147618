//! [`Backend`] for kernel WireGuard: the link is a `wireguard` rtnetlink
//! link, its configuration goes over the `wireguard` generic netlink family
//! (`WG_CMD_GET_DEVICE`, `WG_CMD_SET_DEVICE`).
//!
//! Both run over blocking netlink sockets: [`Backend`] is a synchronous
//! trait that the agent calls from `spawn_blocking`, and every request here
//! is a short exchange with the kernel itself, which always answers.
//!
//! A change set does not fit one netlink message once the mesh is large: the
//! kernel takes one device per `WG_CMD_SET_DEVICE` message, and a message
//! must stay well under what the socket buffers accept. [`set_messages`]
//! (pure) splits a change set into as many messages as needed, each at most
//! `max_bytes` long: the private key and listen port ride in the first,
//! peers follow in order, and a peer whose allowed IPs overflow a message
//! continues in the next one. Only a peer's first chunk carries
//! `WGPEER_F_REPLACE_ALLOWEDIPS`, so the continuation chunks add to what
//! the first one set instead of replacing it. Unlike the UAPI backend, the
//! messages are applied one by one: if the kernel refuses message k, the
//! messages before it stay applied, and the next reconcile pass (which reads
//! the device again) finishes the job.
//!
//! [`select_backend`] picks this backend or the UAPI one for
//! `--backend auto|kernel|uapi`.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::num::NonZeroI32;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use rtnetlink::packet_core::{
    Emitable, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
use rtnetlink::sys::{Socket, SocketAddr};
use zeroize::{Zeroize, Zeroizing};

use super::uapi::UapiBackend;
use super::{restrict, Backend, Capabilities, ChangeSet, DeviceState, PeerStats, Result, WgError};
use crate::keys::PublicKey;
use crate::mesh::{PeerChange, PeerConfig};

/// The largest `WG_CMD_SET_DEVICE` message [`KernelBackend`] sends, netlink
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

/// The generic netlink family of kernel WireGuard.
pub const FAMILY_NAME: &str = "wireguard";

/// Which WireGuard implementation the agent drives (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    /// Kernel WireGuard when the host has it, else the userspace data plane.
    #[default]
    Auto,
    /// Kernel WireGuard; fail if the host lacks it.
    Kernel,
    /// A UAPI socket: wgmesh's userspace data plane, wireguard-go, boringtun-cli.
    Uapi,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Kernel => "kernel",
            BackendKind::Uapi => "uapi",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "kernel" => Ok(BackendKind::Kernel),
            "uapi" => Ok(BackendKind::Uapi),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, kernel or uapi)"
            )),
        }
    }
}

/// A backend ready for the agent: the same type as `agent::SharedBackend`.
pub type SelectedBackend = Arc<Mutex<dyn Backend>>;

/// Whether this host (network namespace) has kernel WireGuard: the
/// `wireguard` generic netlink family resolves. Resolving it also makes the
/// kernel load the module if it is available but not loaded yet.
pub async fn kernel_available() -> bool {
    probe_kernel().await.is_ok()
}

/// The backend for `kind`, and a sentence saying which one and why, for the
/// agent to log. `auto`:
/// - the UAPI backend when a UAPI socket for `interface` already exists in
///   `uapi_dir` (a userspace data plane serves the interface; creating a
///   kernel link of the same name would fail or fight it);
/// - else kernel WireGuard when the generic netlink family resolves and the
///   `wireguard` link exists or could be created;
/// - else the UAPI backend over `<uapi_dir>/<interface>.sock`.
///
/// `kernel` fails when kernel WireGuard is unavailable or the link cannot be
/// created; `uapi` never fails (the socket may appear later: the data plane
/// can start after the agent).
pub async fn select_backend(
    kind: BackendKind,
    interface: &str,
    uapi_dir: &Path,
) -> Result<(SelectedBackend, String)> {
    select(kind, interface, uapi_dir, LinkPolicy::Create).await
}

/// [`select_backend`]'s rule for a reader (`wgmesh status`, `wgmesh graph`):
/// the same choice from the same facts, except that the kernel link is never
/// created: only an existing kernel WireGuard link counts as usable. A
/// command that only looks must not leave an interface behind, nor take the
/// name from a data plane that is about to start.
pub async fn select_reader(
    kind: BackendKind,
    interface: &str,
    uapi_dir: &Path,
) -> Result<(SelectedBackend, String)> {
    select(kind, interface, uapi_dir, LinkPolicy::Existing).await
}

/// Whether selecting a kernel backend may create its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkPolicy {
    Create,
    Existing,
}

async fn select(
    kind: BackendKind,
    interface: &str,
    uapi_dir: &Path,
    policy: LinkPolicy,
) -> Result<(SelectedBackend, String)> {
    let socket = uapi_dir.join(format!("{interface}.sock"));
    let uapi = || -> SelectedBackend {
        Arc::new(Mutex::new(UapiBackend::for_interface(uapi_dir, interface)))
    };
    let socket_exists = kind == BackendKind::Auto && socket.exists();
    let probe = match kind {
        BackendKind::Uapi => Err(String::new()),
        _ if socket_exists => Err(String::new()),
        _ => probe_kernel().await,
    };
    // Kernel WireGuard resolves: make sure the link exists and answers a
    // WG_CMD_GET_DEVICE before choosing it (the name may be taken by another
    // kind of interface, or the agent may lack CAP_NET_ADMIN).
    let mut checked = match (&probe, kind) {
        (Ok(_), BackendKind::Auto | BackendKind::Kernel) => {
            let name = interface.to_owned();
            Some(
                tokio::task::spawn_blocking(move || check_kernel_device(&name, policy))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
            )
        }
        _ => None,
    };
    let link = checked.as_ref().map(|r| {
        r.as_ref()
            .map(|(_, created)| *created)
            .map_err(Clone::clone)
    });
    match decide(kind, interface, &socket, socket_exists, probe, link) {
        Decision::Kernel { reason } => {
            let backend = match checked.take() {
                Some(Ok((backend, _))) => backend,
                _ => KernelBackend::new(interface),
            };
            let backend: SelectedBackend = Arc::new(Mutex::new(backend));
            Ok((backend, reason))
        }
        Decision::Uapi { reason } => Ok((uapi(), reason)),
        Decision::Refuse { reason } => Err(WgError::Io {
            path: device_label(interface),
            source: io::Error::new(io::ErrorKind::Unsupported, reason),
        }),
    }
}

/// Creates the link if missing (when `policy` allows) and reads the device
/// once: the backend that did it (its socket open) and whether the link was
/// created, or why kernel WireGuard cannot drive `interface`.
fn check_kernel_device(
    interface: &str,
    policy: LinkPolicy,
) -> std::result::Result<(KernelBackend, bool), String> {
    let created = match policy {
        LinkPolicy::Create => ensure_wireguard_link(interface).map_err(|e| e.to_string())?,
        LinkPolicy::Existing => {
            validate_name(interface).map_err(|e| e.to_string())?;
            false
        }
    };
    let mut backend = KernelBackend::new(interface);
    match backend.get_device() {
        Ok(_) => Ok((backend, created)),
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Err(format!(
            "interface {interface} exists but is not a kernel WireGuard device"
        )),
        Err(e) if e.errno() == Some(libc::ENODEV) && policy == LinkPolicy::Existing => {
            Err(format!("there is no interface {interface}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Kernel WireGuard device `interface`, configured over generic netlink.
pub struct KernelBackend {
    interface: String,
    max_bytes: usize,
    conn: Option<GenlConn>,
    seq: u32,
}

impl KernelBackend {
    /// No I/O: the socket opens (and the family resolves) on first use, and
    /// again after any netlink failure, since a reloaded module registers
    /// the family under a new id.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            max_bytes: SAFE_MESSAGE_BYTES,
            conn: None,
            seq: 0,
        }
    }

    /// Creates the `wireguard` link if there is no interface of that name;
    /// true if it created it. The link starts down; the agent's
    /// `Net::ensure_link_up` sets its MTU and brings it up.
    pub fn ensure_link(&self) -> Result<bool> {
        ensure_wireguard_link(&self.interface).map_err(|e| self.error(e))
    }

    fn error(&self, e: KernelError) -> WgError {
        WgError::Io {
            path: device_label(&self.interface),
            source: io::Error::other(e),
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn conn(&mut self) -> std::result::Result<&mut GenlConn, KernelError> {
        if self.conn.is_none() {
            self.conn = Some(GenlConn::open()?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| KernelError::Task("generic netlink connection lost".into()))
    }

    /// One `WG_CMD_GET_DEVICE` dump, its private key (if any) already
    /// wiped and replaced by the public key.
    fn dump(&mut self) -> std::result::Result<Vec<WireguardMessage>, KernelError> {
        // A dump that the kernel flags as interrupted (the peer list changed
        // under it) is read again, as `wg` does.
        for _ in 0..5 {
            let seq = self.next_seq();
            let interface = self.interface.clone();
            let conn = self.conn()?;
            let request = get_request(&interface, conn.family, seq);
            let replies = conn
                .request(&request, seq)
                .map_err(|e| e.at("WG_CMD_GET_DEVICE", &interface))?;
            if replies.interrupted {
                continue;
            }
            let mut messages = Vec::with_capacity(replies.messages.len());
            for m in &replies.messages {
                let mut message = parse_wireguard(m).map_err(|detail| KernelError::Decode {
                    op: "WG_CMD_GET_DEVICE",
                    interface: interface.clone(),
                    detail,
                })?;
                scrub(&mut message);
                messages.push(message);
            }
            return Ok(messages);
        }
        Err(KernelError::Netlink {
            op: "WG_CMD_GET_DEVICE".into(),
            interface: self.interface.clone(),
            source: io::Error::new(
                io::ErrorKind::Interrupted,
                "the dump was interrupted 5 times in a row",
            ),
        })
    }

    fn get_device(&mut self) -> std::result::Result<DeviceState, KernelError> {
        let messages = self.dump()?;
        device_state(messages).map_err(|detail| KernelError::Decode {
            op: "WG_CMD_GET_DEVICE",
            interface: self.interface.clone(),
            detail,
        })
    }

    fn set_device(&mut self, changes: &ChangeSet) -> std::result::Result<(), KernelError> {
        let messages = set_messages(&self.interface, changes, self.max_bytes);
        let total = messages.len();
        for (i, message) in messages.iter().enumerate() {
            let seq = self.next_seq();
            let interface = self.interface.clone();
            let conn = self.conn()?;
            let bytes = message.to_bytes(conn.family, seq);
            conn.request(&bytes, seq).map_err(|e| {
                e.at(
                    &format!("WG_CMD_SET_DEVICE message {} of {total}", i + 1),
                    &interface,
                )
            })?;
        }
        Ok(())
    }
}

impl fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBackend")
            .field("interface", &self.interface)
            .field("max_bytes", &self.max_bytes)
            .field("family", &self.conn.as_ref().map(|c| c.family))
            .finish()
    }
}

impl Backend for KernelBackend {
    fn describe(&self) -> String {
        format!("kernel {} (generic netlink)", self.interface)
    }

    fn state(&mut self) -> Result<DeviceState> {
        match self.get_device() {
            Ok(state) => Ok(state),
            // The link is gone (or was never created): create it, then read
            // the fresh device, so the agent's first pass programs it.
            Err(e) if e.errno() == Some(libc::ENODEV) => {
                self.ensure_link()?;
                self.get_device().map_err(|e| {
                    self.conn = None;
                    self.error(e)
                })
            }
            Err(e) => {
                self.conn = None;
                Err(self.error(e))
            }
        }
    }

    fn apply(&mut self, changes: &ChangeSet) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.set_device(changes).map_err(|e| {
            self.conn = None;
            self.error(e)
        })
    }

    fn peer_stats(&mut self) -> Result<Vec<PeerStats>> {
        let messages = self.dump().map_err(|e| {
            self.conn = None;
            self.error(e)
        })?;
        peer_stats(&messages).map_err(|detail| {
            self.error(KernelError::Decode {
                op: "WG_CMD_GET_DEVICE",
                interface: self.interface.clone(),
                detail,
            })
        })
    }
}

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
/// - The first message carries the private key and listen port, if any.
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
fn scrub(message: &mut WireguardMessage) {
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

// ---------------------------------------------------------------------------
// Errors

/// What went wrong below [`WgError`]; carried as the source of a
/// `WgError::Io` whose path names the kernel device.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open a {protocol} netlink socket: {source}")]
    Socket {
        protocol: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("generic netlink family '{FAMILY_NAME}' not found (no WireGuard kernel module)")]
    FamilyNotFound,
    #[error("resolving generic netlink family '{FAMILY_NAME}': {source}")]
    Family {
        #[source]
        source: io::Error,
    },
    #[error("{op} on {interface}: {source}")]
    Netlink {
        op: String,
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} on {interface}: malformed reply: {detail}")]
    Decode {
        op: &'static str,
        interface: String,
        detail: String,
    },
    #[error("creating wireguard link {interface}: {source}")]
    CreateLink {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{0}")]
    Task(String),
}

impl KernelError {
    /// The kernel's errno, when the kernel refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Socket { source, .. }
            | KernelError::Family { source }
            | KernelError::Netlink { source, .. }
            | KernelError::CreateLink { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A failed exchange before it is given its operation and interface.
#[derive(Debug)]
enum Exchange {
    Io(io::Error),
    Decode(String),
}

impl Exchange {
    fn at(self, op: &str, interface: &str) -> KernelError {
        match self {
            Exchange::Io(source) => KernelError::Netlink {
                op: op.to_owned(),
                interface: interface.to_owned(),
                source,
            },
            Exchange::Decode(detail) => KernelError::Netlink {
                op: op.to_owned(),
                interface: interface.to_owned(),
                source: io::Error::new(io::ErrorKind::InvalidData, detail),
            },
        }
    }

    fn errno(&self) -> Option<i32> {
        match self {
            Exchange::Io(e) => e.raw_os_error(),
            Exchange::Decode(_) => None,
        }
    }
}

fn device_label(interface: &str) -> String {
    format!("kernel WireGuard device {interface} (generic netlink)")
}

// ---------------------------------------------------------------------------
// Backend selection

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Kernel { reason: String },
    Uapi { reason: String },
    Refuse { reason: String },
}

/// The choice of [`select_backend`], from what it found. Pure.
/// `probe`: the family id, or why kernel WireGuard is unavailable.
/// `link`: whether the kernel link exists/was created (`Ok(created)`), when
/// it was tried.
fn decide(
    kind: BackendKind,
    interface: &str,
    socket: &Path,
    socket_exists: bool,
    probe: std::result::Result<u16, String>,
    link: Option<std::result::Result<bool, String>>,
) -> Decision {
    let sock = socket.display();
    let link_note = |created: bool| {
        if created {
            format!("created wireguard link {interface}")
        } else {
            format!("wireguard link {interface} exists")
        }
    };
    match kind {
        BackendKind::Uapi => Decision::Uapi {
            reason: format!("backend uapi requested: using the UAPI socket {sock}"),
        },
        BackendKind::Kernel => match (probe, link) {
            (Ok(id), Some(Ok(created))) => Decision::Kernel {
                reason: format!(
                    "backend kernel requested: using kernel WireGuard (generic netlink family '{FAMILY_NAME}' id {id}; {})",
                    link_note(created)
                ),
            },
            (Ok(_), Some(Err(why))) => Decision::Refuse {
                reason: format!("backend kernel requested, but {why}"),
            },
            (Ok(_), None) => Decision::Refuse {
                reason: format!("backend kernel requested, but link {interface} was not checked"),
            },
            (Err(why), _) => Decision::Refuse {
                reason: format!("backend kernel requested, but kernel WireGuard is unavailable ({why})"),
            },
        },
        BackendKind::Auto if socket_exists => Decision::Uapi {
            reason: format!(
                "a userspace data plane already serves {interface} at {sock}: using it"
            ),
        },
        BackendKind::Auto => match (probe, link) {
            (Ok(id), Some(Ok(created))) => Decision::Kernel {
                reason: format!(
                    "kernel WireGuard available (generic netlink family '{FAMILY_NAME}' id {id}; {}): using it",
                    link_note(created)
                ),
            },
            (Ok(_), Some(Err(why))) => Decision::Uapi {
                reason: format!(
                    "kernel WireGuard present but unusable ({why}): using the userspace data plane over {sock}"
                ),
            },
            (Ok(_), None) => Decision::Uapi {
                reason: format!(
                    "kernel WireGuard link {interface} not checked: using the userspace data plane over {sock}"
                ),
            },
            (Err(why), _) => Decision::Uapi {
                reason: format!(
                    "kernel WireGuard unavailable ({why}): using the userspace data plane over {sock}"
                ),
            },
        },
    }
}

/// The family id, or why kernel WireGuard is unavailable (for the reason).
async fn probe_kernel() -> std::result::Result<u16, String> {
    let result = tokio::task::spawn_blocking(|| GenlConn::open().map(|c| c.family))
        .await
        .unwrap_or_else(|e| Err(KernelError::Task(e.to_string())));
    result.map_err(|e| {
        if Path::new("/sys/module/wireguard").exists() {
            e.to_string()
        } else {
            format!("{e}; /sys/module/wireguard absent")
        }
    })
}

// ---------------------------------------------------------------------------
// Message building

const HEADERS_LEN: usize = 16 + 4; // nlmsghdr + genlmsghdr
const IFNAMSIZ: usize = 16;

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

fn get_request(interface: &str, family: u16, seq: u32) -> Vec<u8> {
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
fn emit_genl(
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

fn parse_wireguard(bytes: &[u8]) -> std::result::Result<WireguardMessage, String> {
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

// ---------------------------------------------------------------------------
// Netlink I/O

/// A generic netlink socket with the `wireguard` family resolved.
struct GenlConn {
    socket: Socket,
    family: u16,
}

/// The replies to one request: the full bytes of each non-control message.
#[derive(Default)]
struct Replies {
    messages: Vec<Zeroizing<Vec<u8>>>,
    interrupted: bool,
}

impl GenlConn {
    fn open() -> std::result::Result<GenlConn, KernelError> {
        let socket = open_socket(NETLINK_GENERIC, "generic")?;
        let mut conn = GenlConn { socket, family: 0 };
        let family = conn.resolve()?;
        conn.family = family;
        Ok(conn)
    }

    fn resolve(&mut self) -> std::result::Result<u16, KernelError> {
        const SEQ: u32 = 1;
        let mut genl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.to_owned())],
        });
        genl.finalize();
        let mut message = NetlinkMessage::from(genl);
        message.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        message.header.sequence_number = SEQ;
        message.finalize();
        let mut buf = vec![0u8; message.buffer_len()];
        message.serialize(&mut buf);
        let replies = match self.request(&buf, SEQ) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(libc::ENOENT) => return Err(KernelError::FamilyNotFound),
            Err(Exchange::Io(source)) => return Err(KernelError::Family { source }),
            Err(Exchange::Decode(d)) => {
                return Err(KernelError::Family {
                    source: io::Error::new(io::ErrorKind::InvalidData, d),
                })
            }
        };
        for bytes in &replies.messages {
            let Ok(reply) = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(bytes) else {
                continue;
            };
            if let NetlinkPayload::InnerMessage(genl) = reply.payload {
                for nla in genl.payload.nlas {
                    if let GenlCtrlAttrs::FamilyId(id) = nla {
                        return Ok(id);
                    }
                }
            }
        }
        Err(KernelError::FamilyNotFound)
    }

    fn request(&mut self, bytes: &[u8], seq: u32) -> std::result::Result<Replies, Exchange> {
        exchange(&self.socket, bytes, seq)
    }
}

fn open_socket(protocol: isize, name: &'static str) -> std::result::Result<Socket, KernelError> {
    let err = |source| KernelError::Socket {
        protocol: name,
        source,
    };
    let mut socket = Socket::new(protocol).map_err(err)?;
    socket.bind_auto().map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    // Error replies without a copy of the request (which may hold a key).
    socket.set_cap_ack(true).map_err(err)?;
    Ok(socket)
}

/// Sends `bytes` and reads replies with sequence number `seq` until the
/// ACK (a request) or `NLMSG_DONE` (a dump).
fn exchange(socket: &Socket, bytes: &[u8], seq: u32) -> std::result::Result<Replies, Exchange> {
    let sent = socket.send(bytes, 0).map_err(Exchange::Io)?;
    if sent != bytes.len() {
        return Err(Exchange::Io(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", bytes.len()),
        )));
    }
    let mut replies = Replies::default();
    loop {
        let datagram = recv_datagram(socket).map_err(Exchange::Io)?;
        if scan_datagram(&datagram, seq, &mut replies)? {
            return Ok(replies);
        }
    }
}

/// One whole datagram, however large (peek its length first).
fn recv_datagram(socket: &Socket) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut probe: Vec<u8> = Vec::with_capacity(64);
    let len = socket.recv(&mut probe, libc::MSG_PEEK | libc::MSG_TRUNC)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(len.max(64)));
    socket.recv(&mut *buf, 0)?;
    Ok(buf)
}

/// Walks the netlink messages of one datagram; true when the exchange is
/// over. Messages of other sequence numbers (late replies to an earlier,
/// failed exchange) are skipped.
fn scan_datagram(
    datagram: &[u8],
    seq: u32,
    replies: &mut Replies,
) -> std::result::Result<bool, Exchange> {
    let mut offset = 0;
    while offset < datagram.len() {
        let buf = NetlinkBuffer::new_checked(&datagram[offset..])
            .map_err(|e| Exchange::Decode(e.to_string()))?;
        let len = buf.length() as usize;
        let message = &datagram[offset..offset + len];
        offset += len.div_ceil(4) * 4;
        if buf.sequence_number() != seq {
            continue;
        }
        if buf.flags() & NLM_F_DUMP_INTR != 0 {
            replies.interrupted = true;
        }
        match buf.message_type() {
            NLMSG_NOOP => {}
            NLMSG_OVERRUN => {
                return Err(Exchange::Io(io::Error::other("netlink overrun")));
            }
            NLMSG_ERROR => {
                let err = ErrorBuffer::new_checked(buf.payload())
                    .map_err(|e| Exchange::Decode(e.to_string()))?;
                return match err.code() {
                    None => Ok(true),
                    Some(code) => Err(Exchange::Io(errno_error(code))),
                };
            }
            NLMSG_DONE => {
                // A dump may end with a negative errno in NLMSG_DONE.
                let payload = buf.payload();
                let code = payload
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(i32::from_ne_bytes)
                    .and_then(NonZeroI32::new);
                return match code {
                    Some(code) => Err(Exchange::Io(errno_error(code))),
                    None => Ok(true),
                };
            }
            // A dump's parts, or a plain reply (whose ACK follows).
            _ => replies.messages.push(Zeroizing::new(message.to_vec())),
        }
    }
    Ok(false)
}

fn errno_error(code: NonZeroI32) -> io::Error {
    io::Error::from_raw_os_error(code.get().saturating_abs())
}

/// Creates the `wireguard` link `interface` unless an interface of that
/// name exists; true if created. The message is rtnetlink's own
/// `LinkWireguard` builder, sent over a blocking socket.
fn ensure_wireguard_link(interface: &str) -> std::result::Result<bool, KernelError> {
    validate_name(interface)?;
    let socket = open_socket(NETLINK_ROUTE, "route")?;
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewLink(
        rtnetlink::LinkWireguard::new(interface).build(),
    ));
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    message.header.sequence_number = 1;
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    match exchange(&socket, &buf, 1) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
        Err(Exchange::Io(source)) => Err(KernelError::CreateLink {
            interface: interface.to_owned(),
            source,
        }),
        Err(Exchange::Decode(d)) => Err(KernelError::CreateLink {
            interface: interface.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, d),
        }),
    }
}

fn validate_name(name: &str) -> std::result::Result<(), KernelError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KernelError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::SocketAddr;

    use rtnetlink::packet_core::NLM_F_MULTIPART;

    use super::*;
    use crate::keys::PrivateKey;

    const FAMILY: u16 = 0x1d;

    fn pk(i: u32) -> PublicKey {
        let mut b = [0x42u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        PublicKey::from_bytes(b)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn peer(i: u32, ips: Vec<IpNet>) -> PeerConfig {
        PeerConfig {
            public_key: pk(i),
            endpoint: Some(SocketAddr::from(([192, 0, 2, (i % 250) as u8 + 1], 51820))),
            allowed_ips: ips,
            persistent_keepalive: Some(25),
            successor: None,
        }
    }

    /// Parses the bytes as the kernel would see them.
    fn parse(bytes: &[u8]) -> (NetlinkHeader, GenlHeader, WireguardMessage) {
        let m = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(bytes).unwrap();
        let header = m.header;
        match m.payload {
            NetlinkPayload::InnerMessage(g) => (header, g.header, g.payload),
            other => panic!("not a WireGuard message: {other:?}"),
        }
    }

    fn peers_of(m: &WireguardMessage) -> Vec<WireguardPeer> {
        m.attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::Peers(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn key_of(p: &WireguardPeer) -> PublicKey {
        p.iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::PublicKey(k) => Some(PublicKey::from_bytes(*k)),
                _ => None,
            })
            .expect("every peer entry names its key")
    }

    fn flags_of(p: &WireguardPeer) -> WireguardPeerFlags {
        p.iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or(WireguardPeerFlags::empty())
    }

    fn ips_of(p: &WireguardPeer) -> Vec<IpNet> {
        p.iter()
            .filter_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(ips) => Some(ips),
                _ => None,
            })
            .flatten()
            .map(|ip| ip_net(ip).unwrap())
            .collect()
    }

    #[test]
    fn a_small_change_set_is_one_message_with_the_right_bytes() {
        let key = PrivateKey::from_bytes([7u8; 32]).unwrap();
        let key_bytes = key.as_x25519().to_bytes();
        let added = PeerConfig {
            public_key: pk(4),
            endpoint: Some("[2001:db8::4]:51820".parse().unwrap()),
            allowed_ips: vec![net("10.244.4.0/24"), net("fd00:4::/64")],
            persistent_keepalive: Some(25),
            successor: None,
        };
        let changes = ChangeSet {
            private_key: Some(key.clone()),
            listen_port: Some(51820),
            peers: vec![
                PeerChange::Remove(pk(1)),
                PeerChange::Update {
                    public_key: pk(2),
                    endpoint: Some("192.0.2.2:51821".parse().unwrap()),
                    allowed_ips: None,
                    persistent_keepalive: Some(None),
                    successor: None,
                },
                PeerChange::Update {
                    public_key: pk(3),
                    endpoint: None,
                    allowed_ips: Some(vec![net("10.244.3.0/24")]),
                    persistent_keepalive: None,
                    successor: None,
                },
                PeerChange::Add(added),
            ],
            extra_identity: None,
        };
        let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
        assert_eq!(messages.len(), 1);
        let bytes = messages[0].to_bytes(FAMILY, 7);
        assert_eq!(bytes.len(), messages[0].len());

        // nlmsghdr: length, type = the resolved family, REQUEST|ACK, seq.
        assert_eq!(&bytes[0..4], &(bytes.len() as u32).to_ne_bytes());
        assert_eq!(&bytes[4..6], &FAMILY.to_ne_bytes());
        assert_eq!(&bytes[6..8], &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        assert_eq!(&bytes[8..12], &7u32.to_ne_bytes());
        // genlmsghdr: WG_CMD_SET_DEVICE (1), WG_GENL_VERSION (1).
        assert_eq!(&bytes[16..20], &[1, 1, 0, 0]);
        // WGDEVICE_A_IFNAME (2): "wgmesh0\0", 4 + 8 bytes.
        assert_eq!(&bytes[20..24], &[12, 0, 2, 0]);
        assert_eq!(&bytes[24..32], b"wgmesh0\0");
        // WGDEVICE_A_PRIVATE_KEY (3): the 32 key bytes.
        assert_eq!(&bytes[32..36], &[36, 0, 3, 0]);
        assert_eq!(&bytes[36..68], &key_bytes);
        // WGDEVICE_A_LISTEN_PORT (6): 51820, host order, padded.
        assert_eq!(&bytes[68..72], &[6, 0, 6, 0]);
        assert_eq!(&bytes[72..74], &51820u16.to_ne_bytes());
        // WGDEVICE_A_PEERS (8 | NLA_F_NESTED).
        assert_eq!(&bytes[78..80], &(8u16 | 0x8000).to_ne_bytes());

        let (header, genl, m) = parse(&bytes);
        assert_eq!(header.message_type, FAMILY);
        assert_eq!(genl.cmd, 1);
        assert_eq!(m.cmd, WireguardCmd::SetDevice);
        assert_eq!(
            m.attributes[0],
            WireguardAttribute::IfName("wgmesh0".into())
        );
        assert_eq!(m.attributes[1], WireguardAttribute::PrivateKey(key_bytes));
        assert_eq!(m.attributes[2], WireguardAttribute::ListenPort(51820));

        let peers = peers_of(&m);
        assert_eq!(peers.len(), 4);
        use WireguardPeerAttribute as A;
        use WireguardPeerFlags as F;
        assert_eq!(
            peers[0].0,
            vec![A::PublicKey(*pk(1).as_bytes()), A::Flags(F::RemoveMe)]
        );
        assert_eq!(
            peers[1].0,
            vec![
                A::PublicKey(*pk(2).as_bytes()),
                A::Flags(F::UpdateOnly),
                A::Endpoint("192.0.2.2:51821".parse().unwrap()),
                A::PersistentKeepalive(0),
            ]
        );
        assert_eq!(flags_of(&peers[2]), F::UpdateOnly | F::ReplaceAllowedIps);
        assert_eq!(ips_of(&peers[2]), vec![net("10.244.3.0/24")]);
        assert_eq!(
            peers[3].0,
            vec![
                A::PublicKey(*pk(4).as_bytes()),
                A::Flags(F::ReplaceAllowedIps),
                A::Endpoint("[2001:db8::4]:51820".parse().unwrap()),
                A::PersistentKeepalive(25),
                A::AllowedIps(vec![
                    WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                        WireguardAllowedIpAttr::IpAddr("10.244.4.0".parse().unwrap()),
                        WireguardAllowedIpAttr::Cidr(24),
                    ]),
                    WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv6),
                        WireguardAllowedIpAttr::IpAddr("fd00:4::".parse().unwrap()),
                        WireguardAllowedIpAttr::Cidr(64),
                    ]),
                ]),
            ]
        );
        // The allowed IPs on the wire: AF_INET = 2 then 10.244.4.0, cidr 24.
        let v4 = [
            6, 0, 1, 0, 2, 0, 0, 0, 8, 0, 2, 0, 10, 244, 4, 0, 5, 0, 3, 0, 24,
        ];
        assert!(bytes.windows(v4.len()).any(|w| w == v4));
    }

    #[test]
    fn a_thousand_peers_span_several_messages_each_under_the_limit() {
        let key = PrivateKey::generate();
        let mut want: BTreeMap<PublicKey, BTreeSet<IpNet>> = BTreeMap::new();
        let mut peers = Vec::new();
        for i in 0..1000u32 {
            let (a, b) = ((i / 250) as u8, (i % 250) as u8);
            let mut ips = vec![
                net(&format!("10.{a}.{b}.0/24")),
                net(&format!("172.16.{a}.{b}/32")),
                net(&format!("fd00:{a}:{b}::/64")),
                net(&format!("fd01:{a}:{b}::1/128")),
            ];
            // Every 100th peer has far more than a message holds.
            if i % 100 == 0 {
                ips.extend(
                    (0..300u32).map(|j| net(&format!("100.{a}.{b}.{}/32", j % 256)).trunc()),
                );
                ips.extend((0..44u32).map(|j| net(&format!("fd02:{i:x}:{j:x}::/48"))));
            }
            ips.sort();
            ips.dedup();
            want.insert(pk(i), ips.iter().copied().collect());
            peers.push(PeerChange::Add(peer(i, ips)));
        }
        let changes = ChangeSet {
            private_key: Some(key.clone()),
            listen_port: Some(51820),
            peers,
            extra_identity: None,
        };
        let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
        eprintln!(
            "1,000 peers ({} allowed IPs) -> {} messages of at most {SAFE_MESSAGE_BYTES} bytes (largest {})",
            want.values().map(BTreeSet::len).sum::<usize>(),
            messages.len(),
            messages.iter().map(SetMessage::len).max().unwrap()
        );
        assert!(messages.len() > 10, "{} messages", messages.len());

        let mut seen_first: BTreeSet<PublicKey> = BTreeSet::new();
        let mut got: BTreeMap<PublicKey, Vec<IpNet>> = BTreeMap::new();
        let mut order: Vec<PublicKey> = Vec::new();
        for (n, message) in messages.iter().enumerate() {
            let bytes = message.to_bytes(FAMILY, n as u32 + 1);
            assert!(
                bytes.len() <= SAFE_MESSAGE_BYTES,
                "message {n}: {} bytes",
                bytes.len()
            );
            assert_eq!(bytes.len(), message.len());
            let (_, _, m) = parse(&bytes);
            assert_eq!(
                m.attributes[0],
                WireguardAttribute::IfName("wgmesh0".into())
            );
            let has_key = m
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::PrivateKey(_)));
            assert_eq!(has_key, n == 0, "the key rides in the first message only");
            for p in peers_of(&m) {
                let k = key_of(&p);
                let flags = flags_of(&p);
                if seen_first.insert(k) {
                    assert_eq!(
                        flags,
                        WireguardPeerFlags::ReplaceAllowedIps,
                        "first chunk of {k}"
                    );
                    order.push(k);
                } else {
                    assert_eq!(flags, WireguardPeerFlags::empty(), "continuation of {k}");
                    assert_eq!(order.last(), Some(&k), "a peer's chunks are consecutive");
                    assert!(
                        p.iter().all(|a| matches!(
                            a,
                            WireguardPeerAttribute::PublicKey(_)
                                | WireguardPeerAttribute::AllowedIps(_)
                        )),
                        "a continuation carries only key and allowed IPs"
                    );
                }
                got.entry(k).or_default().extend(ips_of(&p));
            }
        }
        assert_eq!(order.len(), 1000);
        assert_eq!(
            order,
            (0..1000).map(pk).collect::<Vec<_>>(),
            "peer order kept"
        );
        for (k, ips) in &got {
            let unique: BTreeSet<IpNet> = ips.iter().copied().collect();
            assert_eq!(unique.len(), ips.len(), "an allowed IP of {k} sent twice");
            assert_eq!(&unique, &want[k], "allowed IPs of {k}");
        }
        assert_eq!(got.len(), want.len());
        // The big peers did get split.
        let chunks = messages
            .iter()
            .flat_map(|m| peers_of(&m.0))
            .filter(|p| key_of(p) == pk(500))
            .count();
        assert!(chunks >= 2, "peer 500 in {chunks} chunk(s)");
    }

    #[test]
    fn removal_and_update_only_flags_and_split_updates() {
        let many: Vec<IpNet> = (0..400u32)
            .map(|j| net(&format!("10.{}.{}.0/24", j / 256, j % 256)))
            .collect();
        let changes = ChangeSet {
            peers: vec![
                PeerChange::Remove(pk(1)),
                PeerChange::Update {
                    public_key: pk(2),
                    endpoint: None,
                    allowed_ips: None,
                    persistent_keepalive: Some(Some(10)),
                    successor: None,
                },
                PeerChange::Update {
                    public_key: pk(3),
                    endpoint: None,
                    allowed_ips: Some(many.clone()),
                    persistent_keepalive: None,
                    successor: None,
                },
                PeerChange::Update {
                    public_key: pk(4),
                    endpoint: None,
                    allowed_ips: Some(Vec::new()),
                    persistent_keepalive: None,
                    successor: None,
                },
            ],
            ..ChangeSet::default()
        };
        let messages = set_messages("wgmesh0", &changes, 2048);
        assert!(messages.len() >= 3);
        let entries: Vec<WireguardPeer> = messages
            .iter()
            .flat_map(|m| {
                assert!(m.len() <= 2048);
                peers_of(&parse(&m.to_bytes(FAMILY, 1)).2)
            })
            .collect();
        use WireguardPeerFlags as F;
        assert_eq!(key_of(&entries[0]), pk(1));
        assert_eq!(flags_of(&entries[0]), F::RemoveMe);
        assert!(ips_of(&entries[0]).is_empty());
        assert_eq!(entries[0].len(), 2, "a removal is key and flag only");

        assert_eq!(flags_of(&entries[1]), F::UpdateOnly);
        assert!(entries[1].contains(&WireguardPeerAttribute::PersistentKeepalive(10)));

        let p3: Vec<&WireguardPeer> = entries.iter().filter(|p| key_of(p) == pk(3)).collect();
        assert!(p3.len() >= 2);
        assert_eq!(flags_of(p3[0]), F::UpdateOnly | F::ReplaceAllowedIps);
        for c in &p3[1..] {
            assert_eq!(flags_of(c), F::UpdateOnly, "an update stays update-only");
        }
        let sent: Vec<IpNet> = p3.iter().flat_map(|p| ips_of(p)).collect();
        assert_eq!(sent, many);

        // Replacing with nothing: the flag alone clears the peer's IPs.
        let p4 = entries.iter().find(|p| key_of(p) == pk(4)).unwrap();
        assert_eq!(flags_of(p4), F::UpdateOnly | F::ReplaceAllowedIps);
        assert!(ips_of(p4).is_empty());
    }

    #[test]
    fn nothing_to_change_is_no_message_and_a_key_alone_is_one() {
        assert!(set_messages("wgmesh0", &ChangeSet::default(), SAFE_MESSAGE_BYTES).is_empty());
        let changes = ChangeSet {
            private_key: Some(PrivateKey::generate()),
            ..ChangeSet::default()
        };
        let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].peer_count(), 0);
        assert_eq!(messages[0].len(), 20 + 12 + 36);
    }

    #[test]
    fn a_limit_too_small_still_makes_progress() {
        let changes = ChangeSet {
            peers: (0..5)
                .map(|i| {
                    PeerChange::Add(peer(
                        i,
                        vec![net(&format!("10.0.{i}.0/24")), net("fd00::/64")],
                    ))
                })
                .collect(),
            ..ChangeSet::default()
        };
        let messages = set_messages("wgmesh0", &changes, 1);
        let ips: usize = messages
            .iter()
            .flat_map(|m| peers_of(&m.0))
            .map(|p| ips_of(&p).len())
            .sum();
        assert_eq!(ips, 10);
        assert_eq!(messages.len(), 10, "one allowed IP per message");
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let key = PrivateKey::from_bytes([0xab; 32]).unwrap();
        let changes = ChangeSet {
            private_key: Some(key),
            listen_port: Some(51820),
            peers: vec![PeerChange::Remove(pk(1))],
            extra_identity: None,
        };
        let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
        let text = format!("{messages:?}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(!text.contains("171"), "{text}"); // 0xab
        assert!(!text.to_lowercase().contains("abab"), "{text}");
    }

    /// A `WG_CMD_GET_DEVICE` dump as the kernel sends it: two multipart
    /// messages (peer 2's allowed IPs continue in the second) and DONE.
    #[test]
    fn a_get_device_dump_parses_into_device_state() {
        let private = PrivateKey::from_bytes([9u8; 32]).unwrap();
        let ip = |s: &str| allowed_ip(&net(s));
        use WireguardPeerAttribute as A;
        let first = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfIndex(12),
                WireguardAttribute::IfName("wgmesh0".into()),
                WireguardAttribute::PrivateKey(private.as_x25519().to_bytes()),
                WireguardAttribute::PublicKey(*private.public_key().as_bytes()),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Fwmark(0),
                WireguardAttribute::Peers(vec![
                    WireguardPeer(vec![
                        A::PublicKey(*pk(1).as_bytes()),
                        A::PresharedKey([0; 32]),
                        A::Endpoint("192.0.2.1:51820".parse().unwrap()),
                        A::PersistentKeepalive(0),
                        A::LastHandshake(Default::default()),
                        A::RxBytes(10),
                        A::TxBytes(20),
                        A::AllowedIps(vec![ip("10.244.1.0/24")]),
                        A::ProtocolVersion(1),
                    ]),
                    WireguardPeer(vec![
                        A::PublicKey(*pk(2).as_bytes()),
                        A::Endpoint("[2001:db8::2]:51820".parse().unwrap()),
                        A::PersistentKeepalive(25),
                        A::LastHandshake(netlink_packet_wireguard::WireguardTimeSpec {
                            seconds: 1_700_000_000,
                            nano_seconds: 5,
                        }),
                        A::RxBytes(1),
                        A::TxBytes(2),
                        A::AllowedIps(vec![ip("fd00:2::/64"), ip("10.244.2.0/24")]),
                    ]),
                ]),
            ],
        };
        let second = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfIndex(12),
                WireguardAttribute::IfName("wgmesh0".into()),
                WireguardAttribute::Peers(vec![
                    WireguardPeer(vec![
                        A::PublicKey(*pk(2).as_bytes()),
                        A::AllowedIps(vec![ip("10.245.2.0/24")]),
                    ]),
                    WireguardPeer(vec![
                        A::PublicKey(*pk(3).as_bytes()),
                        A::PersistentKeepalive(0),
                    ]),
                ]),
            ],
        };
        let seq = 42;
        let mut datagram = Vec::new();
        for m in [&first, &second] {
            let mut buf = vec![0u8; HEADERS_LEN + m.buffer_len()];
            emit_genl(&mut buf, FAMILY, NLM_F_MULTIPART, seq, m.cmd, m);
            datagram.extend_from_slice(&buf);
        }
        // A stale reply to an earlier request is skipped.
        let mut stale = vec![0u8; HEADERS_LEN + second.buffer_len()];
        emit_genl(
            &mut stale,
            FAMILY,
            NLM_F_MULTIPART,
            seq - 1,
            second.cmd,
            &second,
        );
        let mut done = vec![20, 0, 0, 0, 3, 0, 2, 0];
        done.extend_from_slice(&seq.to_ne_bytes());
        done.extend_from_slice(&[0; 8]);

        let mut replies = Replies::default();
        assert!(!scan_datagram(&stale, seq, &mut replies).unwrap());
        assert!(!scan_datagram(&datagram, seq, &mut replies).unwrap());
        assert!(scan_datagram(&done, seq, &mut replies).unwrap());
        assert!(!replies.interrupted);
        assert_eq!(replies.messages.len(), 2);
        let messages: Vec<WireguardMessage> = replies
            .messages
            .iter()
            .map(|m| parse_wireguard(m).unwrap())
            .collect();
        let stats = peer_stats(&messages).unwrap();
        assert_eq!(stats.len(), 3, "peer 2's continuation is not a peer");
        assert_eq!(
            (stats[0].public_key, stats[0].rx_bytes, stats[0].tx_bytes),
            (pk(1), 10, 20)
        );
        assert_eq!(stats[0].last_handshake, None, "0.0 means never");
        assert_eq!(
            stats[1].last_handshake,
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(
            stats[1].endpoint,
            Some("[2001:db8::2]:51820".parse().unwrap())
        );
        assert_eq!((stats[2].public_key, stats[2].endpoint), (pk(3), None));

        // What `dump` keeps of the key: the public half only.
        let mut scrubbed = messages[0].clone();
        scrubbed
            .attributes
            .retain(|a| !matches!(a, WireguardAttribute::PublicKey(_)));
        scrub(&mut scrubbed);
        assert!(!scrubbed
            .attributes
            .iter()
            .any(|a| matches!(a, WireguardAttribute::PrivateKey(_))));
        assert!(scrubbed.attributes.contains(&WireguardAttribute::PublicKey(
            *private.public_key().as_bytes()
        )));

        let state = device_state(messages).unwrap();
        assert_eq!(state.public_key, Some(private.public_key()));
        assert_eq!(state.listen_port, 51820);
        assert_eq!(
            state.peers,
            vec![
                PeerConfig {
                    public_key: pk(1),
                    endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                    allowed_ips: vec![net("10.244.1.0/24")],
                    persistent_keepalive: None,
                    successor: None,
                },
                PeerConfig {
                    public_key: pk(2),
                    endpoint: Some("[2001:db8::2]:51820".parse().unwrap()),
                    allowed_ips: vec![
                        net("10.244.2.0/24"),
                        net("10.245.2.0/24"),
                        net("fd00:2::/64")
                    ],
                    persistent_keepalive: Some(25),
                    successor: None,
                },
                PeerConfig {
                    public_key: pk(3),
                    endpoint: None,
                    allowed_ips: vec![],
                    persistent_keepalive: None,
                    successor: None,
                },
            ]
        );
    }

    #[test]
    fn kernel_errors_and_interrupted_dumps_are_reported() {
        // NLMSG_ERROR with -ENODEV.
        let mut nack = vec![36, 0, 0, 0, 2, 0, 0, 0];
        nack.extend_from_slice(&5u32.to_ne_bytes());
        nack.extend_from_slice(&[0; 4]);
        nack.extend_from_slice(&(-libc::ENODEV).to_ne_bytes());
        nack.extend_from_slice(&[0; 16]);
        let mut replies = Replies::default();
        let err = scan_datagram(&nack, 5, &mut replies).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENODEV));
        let e = err.at("WG_CMD_GET_DEVICE", "wgmesh0");
        assert_eq!(e.errno(), Some(libc::ENODEV));
        assert!(
            e.to_string().starts_with("WG_CMD_GET_DEVICE on wgmesh0: "),
            "{e}"
        );

        // An ACK ends a request.
        let mut ack = nack.clone();
        ack[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert!(scan_datagram(&ack, 5, &mut Replies::default()).unwrap());

        // A dump part flagged NLM_F_DUMP_INTR marks the dump for a retry.
        let m = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::ListenPort(1)],
        };
        let mut buf = vec![0u8; HEADERS_LEN + m.buffer_len()];
        emit_genl(
            &mut buf,
            FAMILY,
            NLM_F_MULTIPART | NLM_F_DUMP_INTR,
            5,
            m.cmd,
            &m,
        );
        let mut replies = Replies::default();
        assert!(!scan_datagram(&buf, 5, &mut replies).unwrap());
        assert!(replies.interrupted);
    }

    #[test]
    fn the_selection_rule() {
        let sock = Path::new("/var/run/wireguard/wgmesh0.sock");
        let unavailable = || Err("generic netlink family 'wireguard' not found".to_owned());
        let d = decide(
            BackendKind::Auto,
            "wgmesh0",
            sock,
            false,
            unavailable(),
            None,
        );
        assert_eq!(
            d,
            Decision::Uapi {
                reason:
                    "kernel WireGuard unavailable (generic netlink family 'wireguard' not found): \
                         using the userspace data plane over /var/run/wireguard/wgmesh0.sock"
                        .into()
            }
        );
        let d = decide(
            BackendKind::Auto,
            "wgmesh0",
            sock,
            false,
            Ok(29),
            Some(Ok(true)),
        );
        assert!(
            matches!(d, Decision::Kernel { ref reason } if reason.contains("id 29") && reason.contains("created wireguard link wgmesh0")),
            "{d:?}"
        );
        let d = decide(
            BackendKind::Auto,
            "wgmesh0",
            sock,
            false,
            Ok(29),
            Some(Err("EPERM".into())),
        );
        assert!(
            matches!(d, Decision::Uapi { ref reason } if reason.contains("unusable (EPERM)")),
            "{d:?}"
        );
        let d = decide(
            BackendKind::Auto,
            "wgmesh0",
            sock,
            true,
            Ok(29),
            Some(Ok(false)),
        );
        assert!(
            matches!(d, Decision::Uapi { ref reason } if reason.contains("already serves")),
            "{d:?}"
        );
        let d = decide(
            BackendKind::Kernel,
            "wgmesh0",
            sock,
            false,
            unavailable(),
            None,
        );
        assert!(
            matches!(d, Decision::Refuse { ref reason } if reason.contains("unavailable")),
            "{d:?}"
        );
        let d = decide(
            BackendKind::Kernel,
            "wgmesh0",
            sock,
            false,
            Ok(29),
            Some(Ok(false)),
        );
        assert!(
            matches!(d, Decision::Kernel { ref reason } if reason.contains("link wgmesh0 exists")),
            "{d:?}"
        );
        let d = decide(
            BackendKind::Uapi,
            "wgmesh0",
            sock,
            false,
            Ok(29),
            Some(Ok(false)),
        );
        assert!(matches!(d, Decision::Uapi { .. }), "{d:?}");
        for k in [BackendKind::Auto, BackendKind::Kernel, BackendKind::Uapi] {
            assert_eq!(k.to_string().parse::<BackendKind>(), Ok(k));
        }
    }

    /// This development machine has no WireGuard module (`ip link add type
    /// wireguard` fails with "Unknown device type"): `auto` must pick the
    /// userspace data plane here and say why.
    #[tokio::test]
    async fn auto_falls_back_to_uapi_without_kernel_wireguard() {
        if kernel_available().await {
            // A host with the module: `auto` would create a link in the
            // host's namespace, which a unit test must not do. The branch is
            // covered by `the_selection_rule`.
            eprintln!("kernel WireGuard is available on this host: fallback not exercised");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (backend, reason) = select_backend(BackendKind::Auto, "wgmesh0", dir.path())
            .await
            .unwrap();
        eprintln!("auto: {reason}");
        let sock = dir.path().join("wgmesh0.sock");
        let described = backend.lock().unwrap().describe();
        assert_eq!(described, format!("uapi {}", sock.display()));
        assert!(
            reason.starts_with("kernel WireGuard unavailable (")
                && reason.contains(&format!(
                    "): using the userspace data plane over {}",
                    sock.display()
                )),
            "{reason}"
        );
        assert!(
            reason.contains("wireguard") || reason.contains("netlink"),
            "{reason}"
        );

        // `kernel` refuses, naming why; the backend itself fails cleanly.
        let Err(e) = select_backend(BackendKind::Kernel, "wgmesh0", dir.path()).await else {
            panic!("kernel backend selected without kernel WireGuard");
        };
        assert!(
            e.to_string().contains("kernel WireGuard is unavailable"),
            "{e}"
        );
        let e = KernelBackend::new("wgmesh0").state().unwrap_err();
        eprintln!("kernel backend here: {e}");
        assert!(
            e.to_string().contains("kernel WireGuard device wgmesh0"),
            "{e}"
        );

        // `uapi` is what it says.
        let (backend, reason) = select_backend(BackendKind::Uapi, "wgmesh0", dir.path())
            .await
            .unwrap();
        assert!(backend.lock().unwrap().describe().starts_with("uapi "));
        assert!(reason.starts_with("backend uapi requested"), "{reason}");

        // The reader (`wgmesh status`) follows the same rule.
        let (backend, reason) = select_reader(BackendKind::Auto, "wgmesh0", dir.path())
            .await
            .unwrap();
        assert_eq!(
            backend.lock().unwrap().describe(),
            format!("uapi {}", sock.display())
        );
        assert!(
            reason.starts_with("kernel WireGuard unavailable ("),
            "{reason}"
        );
        let Err(e) = select_reader(BackendKind::Kernel, "wgmesh0", dir.path()).await else {
            panic!("kernel reader selected without kernel WireGuard");
        };
        assert!(
            e.to_string().contains("kernel WireGuard is unavailable"),
            "{e}"
        );
    }

    /// The peer table as the kernel's `set_peer` changes it, message by
    /// message: remove, update-only, replace, then add allowed IPs (taking
    /// them from whichever peer held them).
    fn kernel_model(current: &[PeerConfig], messages: &[SetMessage]) -> Vec<PeerConfig> {
        let mut peers: BTreeMap<PublicKey, PeerConfig> =
            current.iter().map(|p| (p.public_key, p.clone())).collect();
        for message in messages {
            let (_, _, m) = parse(&message.to_bytes(FAMILY, 1));
            for entry in peers_of(&m) {
                let key = key_of(&entry);
                let flags = flags_of(&entry);
                if flags.contains(WireguardPeerFlags::RemoveMe) {
                    peers.remove(&key);
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(slot) = peers.entry(key) {
                    if flags.contains(WireguardPeerFlags::UpdateOnly) {
                        continue;
                    }
                    slot.insert(PeerConfig {
                        public_key: key,
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        persistent_keepalive: None,
                        successor: None,
                    });
                }
                if flags.contains(WireguardPeerFlags::ReplaceAllowedIps) {
                    peers.get_mut(&key).unwrap().allowed_ips.clear();
                }
                for a in entry.iter() {
                    let peer = peers.get_mut(&key).unwrap();
                    match a {
                        WireguardPeerAttribute::Endpoint(e) => peer.endpoint = Some(*e),
                        WireguardPeerAttribute::PersistentKeepalive(k) => {
                            peer.persistent_keepalive = Some(*k)
                        }
                        _ => {}
                    }
                }
                for ip in ips_of(&entry) {
                    for other in peers.values_mut() {
                        other.allowed_ips.retain(|have| *have != ip);
                    }
                    peers.get_mut(&key).unwrap().allowed_ips.push(ip);
                }
            }
        }
        let mut out: Vec<PeerConfig> = peers.into_values().collect();
        for p in &mut out {
            p.normalize();
        }
        out
    }

    /// Split or not, the messages leave the kernel where the planner's own
    /// model of a change set leaves the device.
    #[test]
    fn split_messages_reach_the_planned_state() {
        let ips = |i: u32, n: u32| -> Vec<IpNet> {
            (0..n)
                .map(|j| net(&format!("10.{i}.{j}.0/24")))
                .chain([net(&format!("fd00:{i:x}::/64"))])
                .collect()
        };
        let current: Vec<PeerConfig> = (0..40).map(|i| peer(i, ips(i, 3))).collect();
        let mut desired: Vec<PeerConfig> = Vec::new();
        for i in 0..40u32 {
            let mut p = peer(i, ips(i, 3));
            match i % 5 {
                0 => continue, // removed
                1 => p.endpoint = Some(SocketAddr::from(([198, 51, 100, i as u8], 4000))),
                2 => p.allowed_ips = ips(i, 40), // grows past a message
                3 => p.persistent_keepalive = None,
                _ => {}
            }
            desired.push(p);
        }
        // A removed peer's CIDRs move to a new one; more new peers follow.
        desired.push(peer(1000, ips(0, 3)));
        desired.extend((1001..1030).map(|i| peer(i, ips(i - 900, 20))));
        for p in &mut desired {
            p.normalize();
        }
        desired.sort_by_key(|p| p.public_key);

        let changes = ChangeSet {
            peers: crate::mesh::diff(&current, &desired),
            ..ChangeSet::default()
        };
        let want = crate::mesh::apply(&current, &changes.peers);
        assert_eq!(want, desired);
        for max in [300, 512, 1024, SAFE_MESSAGE_BYTES, usize::MAX] {
            let messages = set_messages("wgmesh0", &changes, max);
            assert!(messages.iter().all(|m| m.len() <= max));
            assert_eq!(kernel_model(&current, &messages), want, "max_bytes {max}");
        }
    }

    #[test]
    fn the_backend_is_send() {
        fn is_send<T: Send>() {}
        is_send::<KernelBackend>();
    }

    #[test]
    fn a_key_change_is_one_request_new_key_first_with_a_forced_handshake() {
        // Peer 1's node rotated to key 9: add 9 with the allowed IPs (kernel
        // moves each prefix atomically), then remove 1, then take the
        // forcing keepalive off 9 again. A promote (from a change set built
        // for a dual-capable device) comes out the same way.
        let ips = vec![net("10.244.1.0/24"), net("fd00:1::/64")];
        let new = PeerConfig {
            successor: Some(pk(5)),
            persistent_keepalive: None,
            ..peer(9, ips.clone())
        };
        for peers in [
            vec![PeerChange::Add(new.clone()), PeerChange::Remove(pk(1))],
            vec![PeerChange::Promote {
                from: pk(1),
                to: new.clone(),
            }],
        ] {
            let changes = ChangeSet {
                peers,
                extra_identity: Some(None),
                ..ChangeSet::default()
            };
            let messages = set_messages("wgmesh0", &changes, SAFE_MESSAGE_BYTES);
            assert_eq!(messages.len(), 1);
            let (_, _, m) = parse(&messages[0].to_bytes(FAMILY, 1));
            let got = peers_of(&m);
            let keys: Vec<PublicKey> = got.iter().map(key_of).collect();
            assert_eq!(keys, vec![pk(9), pk(1), pk(9)]);
            assert!(flags_of(&got[0]).contains(WireguardPeerFlags::ReplaceAllowedIps));
            assert_eq!(ips_of(&got[0]), ips);
            assert!(flags_of(&got[1]).contains(WireguardPeerFlags::RemoveMe));
            assert!(flags_of(&got[2]).contains(WireguardPeerFlags::UpdateOnly));
            let keepalive = |p: &WireguardPeer| {
                p.iter().find_map(|a| match a {
                    WireguardPeerAttribute::PersistentKeepalive(k) => Some(*k),
                    _ => None,
                })
            };
            assert_eq!(keepalive(&got[0]), Some(FORCE_HANDSHAKE_KEEPALIVE));
            assert_eq!(keepalive(&got[2]), Some(0));
        }
    }
}
