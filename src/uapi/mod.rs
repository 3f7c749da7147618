//! The WireGuard cross-platform UAPI text protocol (`get=1` / `set=1` on
//! `/var/run/wireguard/<iface>.sock`), both directions, with no I/O.
//!
//! wgmesh speaks it on both sides: the dataplane *serves* it (so that `wg show`
//! and `wg set` work on our userspace device) and the agent *drives* any UAPI
//! implementation with it (our dataplane, wireguard-go, boringtun-cli). One codec
//! for both sides means the two cannot drift apart, and the round-trip tests pin
//! them to each other.
//!
//! | side   | request                    | response                                  |
//! |--------|----------------------------|-------------------------------------------|
//! | server | [`parse_request`]          | [`format_get`], [`format_errno`]          |
//! | client | [`format_get_request`], [`format_set`] | [`parse_get_response`], [`parse_errno_response`] |
//!
//! [`message_len`] frames one message (request or response) in a byte stream.
//!
//! # Whose behaviour this follows
//! The spec page (<https://www.wireguard.com/xplatform/>) leaves details open, so
//! the server side mirrors wireguard-go's `device/uapi.go` (the implementation
//! `wg` is tested against) and the client side mirrors wireguard-tools'
//! `src/ipc-uapi.h` (what `wg` itself sends and accepts):
//! - `errno` values are wireguard-go's negative Linux errno numbers; see
//!   [`errno`] for the table and [`ProtoError::errno`] for which error gets which.
//! - Hex keys are accepted in either case (Go's `hex.DecodeString` and `wg`'s
//!   `key_from_hex` both are case-insensitive) and always written lowercase.
//! - Numbers are plain ASCII digits; leading zeros are fine, signs are not
//!   (Go's `strconv.ParseUint(v, 10, n)`).
//! - Request lines may end in `\r\n` (Go's `bufio.ScanLines` drops one `\r`), and
//!   a request line longer than 65535 bytes is an I/O error (`bufio.Scanner`'s
//!   64 KiB token limit) — but the operation line must be exactly `get=1\n` or
//!   `set=1\n`. Responses are read strictly, as `wg` does: `\n` only.
//! - Endpoints are `ip:port` or `[ipv6]:port` (Go's `netip.ParseAddrPort`): no
//!   host names, brackets only and always around IPv6. A zone is accepted only
//!   as a numeric scope id (`[fe80::1%3]:51820`): turning an interface name into
//!   an index is I/O, which this module does not do.
//! - Allowed IPs follow Go's `netip.ParsePrefix` (no zone, no leading zeros or
//!   sign in the prefix length) and a leading `-` removes one prefix (wireguard-go
//!   since 2025-05, paired with `wg set ... allowed-ips -10.0.0.0/24`).
//!
//! # Where this is stricter than wireguard-go, on purpose
//! - wireguard-go applies a `set` line by line and stops at the first bad line,
//!   leaving the lines before it applied. [`parse_request`] validates the whole
//!   message first, so a server built on it applies all or nothing; the `errno`
//!   it answers is the one wireguard-go would have answered for the same input.
//! - A `set` that ends without its blank line is rejected ([`ProtoError::Unterminated`]):
//!   wireguard-go treats end-of-stream as end-of-message, which would apply a
//!   truncated write (say, `replace_peers=true` without the peers that follow).
//!
//! # Allowed IPs are canonical everywhere
//! `wg set ... allowed-ips 10.0.0.1/24` sends the prefix as typed. wireguard-go
//! and the kernel clear the host bits when they insert it into the allowed-IPs
//! trie, so `get` reports `10.0.0.0/24`. This codec clears host bits at every
//! boundary — parsing requests and responses and formatting both — so a
//! reconcile diff between desired peers and `get` output never sees two
//! spellings of one prefix, and a server built on it cannot store a
//! non-canonical prefix by mistake.
//!
//! # Secrets
//! Private and pre-shared keys travel as hex on this protocol. They never appear
//! in `Debug` output (the key types redact themselves) or in a [`ProtoError`]
//! (errors name the field and the line, never the value). Formatted messages
//! that carry secrets are returned as [`Zeroizing`] strings sized up front, so
//! the buffer is never reallocated (which would leave an unwiped copy behind)
//! and is wiped when dropped.

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::keys::{PresharedKey, PrivateKey, PublicKey};

/// The `errno=N` values a UAPI server answers, exactly as wireguard-go writes
/// them on Linux: the negated Linux errno (its `ipc/uapi_unix.go` constants are
/// `-int64(unix.EXXX)`). On macOS and the BSDs wireguard-go negates *that* OS's
/// numbers, so `EPROTO` and `EADDRINUSE` differ there; wgmesh runs on Linux.
///
/// `wg set` turns the number back into its exit status with `errno = -ret`, so a
/// server must send these negative values for `wg` to print the right message.
pub mod errno {
    /// Success.
    pub const OK: i32 = 0;
    /// Mirrors `ipc.IpcErrorIO` (`-EIO`): reading or writing the socket failed,
    /// and a request line over 64 KiB (Go's `bufio.ErrTooLong`).
    pub const IO: i32 = -5;
    /// Mirrors `ipc.IpcErrorInvalid` (`-EINVAL`): unknown or misplaced key, bad
    /// value, trailing byte after `get=1\n`.
    pub const INVALID: i32 = -22;
    /// Mirrors `ipc.IpcErrorUnknown` (`-55`, `ENOANO`): any other failure.
    pub const UNKNOWN: i32 = -55;
    /// Mirrors `ipc.IpcErrorProtocol` (`-EPROTO`): a line without `=`.
    pub const PROTOCOL: i32 = -71;
    /// Mirrors `ipc.IpcErrorPortInUse` (`-EADDRINUSE`): binding `listen_port` or
    /// setting `fwmark` failed. Never produced by parsing; for the server's apply
    /// step.
    pub const PORT_IN_USE: i32 = -98;
}

/// The longest request line (without its `\n`, with any `\r`) wireguard-go reads:
/// `bufio.Scanner` fails with `ErrTooLong` once a line and its newline do not fit
/// in 64 KiB. No valid line comes anywhere near it; the I/O layer can use it to
/// bound how much it buffers while looking for a line end.
pub const MAX_LINE_LEN: usize = 64 * 1024 - 1;

/// The only WireGuard protocol version there is; `protocol_version` must be it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Result alias for this module.
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// What a UAPI `get` reports about a device. The server builds one from its state
/// and formats it with [`format_get`]; the client gets one from
/// [`parse_get_response`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// `None` while the device has no key (wireguard-go omits the line then).
    pub private_key: Option<PrivateKey>,
    /// The bound UDP port; 0 = not bound (the line is omitted then).
    pub listen_port: u16,
    /// The socket mark; 0 = none (the line is omitted then).
    pub fwmark: u32,
    pub peers: Vec<PeerSnapshot>,
    /// `wgmesh_version`: set by wgmesh's own data plane, `None` from every
    /// other implementation. When `None`, [`format_get`] writes no extension
    /// key at all (the output is byte for byte wireguard-go's).
    pub wgmesh_version: Option<u32>,
    /// `wgmesh_extra_public_key` + `wgmesh_extra_role`: the device's second
    /// local identity during a key rotation. Only its public key travels.
    pub extra_identity: Option<(PublicKey, ExtraRole)>,
}

/// The role of a device's extra local identity during a key rotation (see
/// docs/dataplane.md, "Key rotation extensions").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtraRole {
    /// The staged next key: accepted, and probed towards every peer.
    Next,
    /// The key just replaced: accepted and answered, never initiating.
    Previous,
}

impl ExtraRole {
    /// The UAPI spelling: `next` or `previous`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtraRole::Next => "next",
            ExtraRole::Previous => "previous",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "next" => Some(ExtraRole::Next),
            "previous" => Some(ExtraRole::Previous),
            _ => None,
        }
    }
}

impl fmt::Display for ExtraRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The wgmesh extension version [`DeviceSnapshot::wgmesh_version`] carries.
pub const WGMESH_VERSION: u32 = 1;

/// One established session in a `get` (`wgmesh_session=` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSession {
    /// The local identity the session runs under.
    pub local: PublicKey,
    /// The remote static key it was made with (the peer's key or its
    /// successor / predecessor).
    pub remote: PublicKey,
    /// Unix time `(seconds, nanoseconds)` the handshake completed.
    pub established: (u64, u32),
}

/// One peer in a [`DeviceSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub public_key: PublicKey,
    /// `None` = no pre-shared key; on the wire that is all-zero hex, which is also
    /// what Noise uses when there is none.
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 = off.
    pub persistent_keepalive_interval: u16,
    /// Written and read with host bits cleared (see the module docs).
    pub allowed_ips: Vec<IpNet>,
    /// Unix time `(seconds, nanoseconds)` of the last completed handshake; `None`
    /// = never. On the wire "never" is `0` and `0`, so `Some((0, 0))` reads back
    /// as `None`.
    pub last_handshake: Option<(u64, u32)>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Always [`PROTOCOL_VERSION`] today; read back as sent, 1 if the server
    /// omits it (every implementation that does speaks version 1).
    pub protocol_version: u32,
    /// `wgmesh_successor_public_key`: a key accepted as this same peer.
    pub successor: Option<PublicKey>,
    /// `wgmesh_session` lines: the peer's established sessions.
    pub sessions: Vec<SnapshotSession>,
}

/// A parsed request, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    Set(SetRequest),
}

/// A `set=1` request: a change to apply, not a full configuration. `None` /
/// `false` fields leave the device as it is.
///
/// A server applies it in this order, which reproduces what wireguard-go does
/// when it executes the same lines one by one: the device fields, then
/// `replace_peers`, then each [`PeerUpdate`] in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `Some(None)` removes the key (all-zero hex on the wire).
    pub private_key: Option<Option<PrivateKey>>,
    /// `wgmesh_extra_private_key` + `wgmesh_extra_role`: `Some(None)` clears
    /// the extra identity (an empty or all-zero key). A server applies it
    /// together with [`SetRequest::private_key`], as one change of the local
    /// identities, so a key that moves between the two slots keeps its
    /// sessions.
    pub extra_identity: Option<Option<(PrivateKey, ExtraRole)>>,
    /// `Some(0)` asks for a random port.
    pub listen_port: Option<u16>,
    /// `Some(0)` clears the mark.
    pub fwmark: Option<u32>,
    /// Remove every peer before applying [`SetRequest::peers`].
    pub replace_peers: bool,
    /// In message order. The same public key may appear more than once; each
    /// entry applies on top of the previous one, as in wireguard-go.
    pub peers: Vec<PeerUpdate>,
}

/// Changes to one peer within a [`SetRequest`].
///
/// [`parse_request`] reduces a peer's lines to their net effect, the form a
/// server can apply without replaying lines:
/// - a repeated key keeps its last value;
/// - `remove=true` anywhere in the section makes it a pure removal: every other
///   field is cleared (wireguard-go removes the peer and ignores what follows; what
///   preceded it dies with the peer);
/// - `replace_allowed_ips=true` drops the `allowed_ip` lines before it, and of
///   several lines for one prefix the last one decides whether it is added or
///   removed, so [`PeerUpdate::allowed_ips`] and
///   [`PeerUpdate::remove_allowed_ips`] never share a prefix and never repeat one.
///
/// A server applies: `replace_allowed_ips`, then the removals, then the
/// additions. (One corner of wireguard-go's line-by-line execution is not kept:
/// adding a prefix that another peer owns and removing it again in the same
/// section leaves it with nobody there, and with the other peer here.)
///
/// A server should, like wireguard-go, ignore an update whose public key is the
/// device's own public key; that needs the device's state, so it is not a parse
/// error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: PublicKey,
    /// Remove the peer (if present). Every other field is then unset.
    pub remove: bool,
    /// Change the peer only if it exists; never create it.
    pub update_only: bool,
    /// `Some(None)` removes the pre-shared key (all-zero hex on the wire).
    pub preshared_key: Option<Option<PresharedKey>>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns persistent keepalive off.
    pub persistent_keepalive_interval: Option<u16>,
    /// Remove all of the peer's allowed IPs before the changes below.
    pub replace_allowed_ips: bool,
    /// Prefixes to add (`allowed_ip=` lines), host bits cleared.
    pub allowed_ips: Vec<IpNet>,
    /// Prefixes to remove from this peer (`allowed_ip=-` lines), host bits
    /// cleared. Not in the original spec; wireguard-go accepts it since 2025-05,
    /// older versions answer [`errno::INVALID`].
    pub remove_allowed_ips: Vec<IpNet>,
    /// Only ever `Some(PROTOCOL_VERSION)` from the parser; any other value is
    /// rejected on the wire.
    pub protocol_version: Option<u32>,
    /// `wgmesh_successor_public_key`: `Some(None)` clears it (empty or
    /// all-zero value), which also drops what a promote left of the old key.
    pub successor: Option<Option<PublicKey>>,
    /// `wgmesh_promote_successor=true`: rename the peer to its successor
    /// first; the section's other fields then apply to the renamed peer.
    pub promote_successor: bool,
}

/// Why a message could not be parsed, or what the other side answered.
///
/// Errors name the field and the 1-based line of the message (the `get=1` /
/// `set=1` line is line 1), never a value: values can be private keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    // --- requests (server side) ---
    /// The first line is not `get=1` or `set=1`. wireguard-go answers nothing
    /// and closes the connection; see [`ProtoError::closes_connection`].
    #[error("not a UAPI operation: the first line must be get=1 or set=1")]
    UnknownOperation,
    /// `get=1\n` followed by something other than the blank line.
    #[error("get=1 must be followed by an empty line and nothing else")]
    TrailingGet,
    /// The message ends before its terminating empty line.
    #[error("the message ends before its terminating empty line")]
    Unterminated,
    /// Bytes follow the terminating empty line; [`message_len`] frames one message.
    #[error("data follows the message's terminating empty line")]
    TrailingData,
    #[error("line {line}: no '=' between key and value")]
    MissingSeparator { line: usize },
    #[error("line {line}: longer than {MAX_LINE_LEN} bytes")]
    LineTooLong { line: usize },
    /// A key no UAPI version has. `key` is the key text only if it looks like a
    /// key name (lowercase letters and `_`, at most 32 of them), so that a
    /// secret pasted in the wrong place is not echoed.
    #[error("line {line}: unknown key {key}")]
    UnknownKey { line: usize, key: String },
    /// A peer key (`endpoint`, `allowed_ip`, ...) before the first `public_key`.
    #[error("line {line}: {key} is a peer key, but no public_key line precedes it")]
    PeerKeyOutsidePeer { line: usize, key: &'static str },
    /// A device key (`private_key`, `listen_port`, ...) after the first `public_key`.
    #[error("line {line}: {key} is a device key and must come before the first public_key")]
    DeviceKeyInPeer { line: usize, key: &'static str },
    #[error("line {line}: {key} is not 64 hex digits")]
    BadKey { line: usize, key: &'static str },
    #[error("line {line}: {key} is not a decimal number in range")]
    BadNumber { line: usize, key: &'static str },
    /// Flags (`replace_peers`, `remove`, ...) accept only `true`.
    #[error("line {line}: {key} accepts only the value true")]
    BadFlag { line: usize, key: &'static str },
    #[error("line {line}: endpoint is not ip:port or [ipv6]:port")]
    BadEndpoint { line: usize },
    #[error("line {line}: allowed_ip is not an address/prefix-length")]
    BadAllowedIp { line: usize },
    #[error("line {line}: protocol_version must be {PROTOCOL_VERSION}")]
    BadProtocolVersion { line: usize },
    /// `wgmesh_extra_role` is not `next` or `previous`.
    #[error("line {line}: wgmesh_extra_role must be next or previous")]
    BadExtraRole { line: usize },
    /// A non-zero `wgmesh_extra_private_key` without `wgmesh_extra_role`, or
    /// a role without a key.
    #[error("wgmesh_extra_private_key and wgmesh_extra_role must be set together")]
    ExtraIdentityIncomplete,

    // --- responses (client side) ---
    /// A known key of a response has a value that does not parse.
    #[error("response line {line}: {key} has a malformed value")]
    BadResponse { line: usize, key: &'static str },
    /// The response has no `errno=` line.
    #[error("the response has no errno line")]
    MissingErrno,
    /// The server answered a non-zero `errno`.
    #[error("the WireGuard UAPI server answered errno={errno}{}", describe_errno(*errno))]
    Remote { errno: i32 },
}

impl ProtoError {
    /// The number a server writes as `errno=N` for this error: what wireguard-go
    /// answers for the same input. For client-side errors: [`errno::PROTOCOL`],
    /// the code `wg` reports for a response it cannot read, or the server's own
    /// number for [`ProtoError::Remote`].
    pub fn errno(&self) -> i32 {
        match self {
            // IpcHandle never answers these (it drops the connection); EPROTO
            // is what `wg` reports when the answer does not come.
            Self::UnknownOperation => errno::PROTOCOL,
            // IpcHandle: "trailing character in UAPI get" -> IpcErrorInvalid.
            Self::TrailingGet => errno::INVALID,
            // Our own framing rules; a protocol violation, not a bad value.
            Self::Unterminated | Self::TrailingData => errno::PROTOCOL,
            // IpcSetOperation: "failed to parse line" -> IpcErrorProtocol.
            Self::MissingSeparator { .. } => errno::PROTOCOL,
            // scanner.Err() (bufio.ErrTooLong) -> IpcErrorIO.
            Self::LineTooLong { .. } => errno::IO,
            // handleDeviceLine / handlePeerLine / handlePublicKeyLine: every
            // unknown key, misplaced key and unparsable value -> IpcErrorInvalid.
            Self::UnknownKey { .. }
            | Self::PeerKeyOutsidePeer { .. }
            | Self::DeviceKeyInPeer { .. }
            | Self::BadKey { .. }
            | Self::BadNumber { .. }
            | Self::BadFlag { .. }
            | Self::BadEndpoint { .. }
            | Self::BadAllowedIp { .. }
            | Self::BadProtocolVersion { .. }
            | Self::BadExtraRole { .. }
            | Self::ExtraIdentityIncomplete => errno::INVALID,
            // wireguard-tools' userspace_get_device: any unreadable reply -> -EPROTO.
            Self::BadResponse { .. } | Self::MissingErrno => errno::PROTOCOL,
            Self::Remote { errno } => *errno,
        }
    }

    /// Whether a server should close the connection without answering, as
    /// wireguard-go does for an unknown operation: after one, the stream is not
    /// UAPI and resynchronising on it would be guesswork.
    pub fn closes_connection(&self) -> bool {
        matches!(self, Self::UnknownOperation)
    }
}

/// Length in bytes of the first complete message at the start of `buf`, or
/// `None` if more bytes are needed. Works for requests and responses: a message
/// ends at its first empty line (`\n` or `\r\n`), except `get=1\n`, after which
/// wireguard-go reads exactly one more byte (which must be `\n`). A first line
/// that is empty is a message of its own (an unknown operation).
pub fn message_len(buf: &[u8]) -> Option<usize> {
    Framer::default().message_len(buf)
}

/// [`message_len`] for a buffer that grows as a socket is read: it remembers
/// the line it stopped at, so framing a message of n bytes read in chunks
/// scans each byte once (a `get` of 5,000 peers is over a megabyte, which a
/// scan from the start at every read went through about a hundred times).
/// Use one per connection, on a buffer that only grows at its end except
/// that, after a `Some(len)`, the caller removes those `len` bytes from its
/// front (the framer starts over then).
#[derive(Debug, Clone, Default)]
pub struct Framer {
    /// Where the line not yet seen complete begins.
    line_start: usize,
    /// Complete lines before it.
    lines: usize,
}

impl Framer {
    /// As [`message_len`] on all of `buf`.
    pub fn message_len(&mut self, buf: &[u8]) -> Option<usize> {
        loop {
            let start = self.line_start;
            let offset = buf.get(start..)?.iter().position(|&b| b == b'\n')?;
            let line = &buf[start..start + offset];
            let end = start + offset + 1;
            if self.lines == 0 {
                if line.is_empty() {
                    *self = Self::default();
                    return Some(end);
                }
                if line == b"get=1" {
                    // Not consumed: the next call looks at this line again.
                    let len = (buf.len() > end).then_some(end + 1);
                    if len.is_some() {
                        *self = Self::default();
                    }
                    return len;
                }
            } else if line.is_empty() || line == b"\r" {
                *self = Self::default();
                return Some(end);
            }
            self.lines += 1;
            self.line_start = end;
        }
    }
}

/// Parses one complete request (as framed by [`message_len`]), validating all of
/// it before returning anything. On error the server answers
/// `format_errno(err.errno())` (or closes, see [`ProtoError::closes_connection`])
/// and applies nothing.
pub fn parse_request(text: &str) -> Result<Request> {
    parse_request_bytes(text.as_bytes())
}

/// [`parse_request`] on raw socket bytes. Bytes that are not UTF-8 fail whatever
/// key or value they are in, as they do in wireguard-go.
pub fn parse_request_bytes(msg: &[u8]) -> Result<Request> {
    let Some(nl) = msg.iter().position(|&b| b == b'\n') else {
        return Err(ProtoError::Unterminated);
    };
    let (op, rest) = (&msg[..nl], &msg[nl + 1..]);
    match op {
        b"get=1" => match rest {
            b"\n" => Ok(Request::Get),
            [] => Err(ProtoError::Unterminated),
            [b'\n', ..] => Err(ProtoError::TrailingData),
            _ => Err(ProtoError::TrailingGet),
        },
        b"set=1" => parse_set_body(rest).map(Request::Set),
        _ => Err(ProtoError::UnknownOperation),
    }
}

/// The request that asks a server for its state.
pub fn format_get_request() -> &'static str {
    "get=1\n\n"
}

/// Formats a `set=1` request, blank line included, in the line order `wg` uses.
///
/// `update_only` and `protocol_version`, which `wg` never sends, come right
/// after `public_key`: wireguard-go executes lines as it reads them, so an
/// `update_only` after `allowed_ip` lines would first create the peer, move the
/// prefixes to it (away from whichever peer had them) and only then delete it,
/// and a `protocol_version` it rejects should be rejected before anything about
/// the peer changed. A removed peer is sent as `public_key` + `remove=true` only.
/// Allowed IPs are sent with host bits cleared.
pub fn format_set(request: &SetRequest) -> Zeroizing<String> {
    let bound = SET_DEVICE_BOUND
        + request
            .peers
            .iter()
            .map(|p| {
                PEER_BOUND + ALLOWED_IP_BOUND * (p.allowed_ips.len() + p.remove_allowed_ips.len())
            })
            .sum::<usize>();
    let mut out = Zeroizing::new(String::with_capacity(bound));
    out.push_str("set=1\n");
    match &request.private_key {
        Some(Some(key)) => push_line(&mut out, "private_key", key.to_hex().as_str()),
        Some(None) => push_line(&mut out, "private_key", ZERO_KEY_HEX),
        None => {}
    }
    match &request.extra_identity {
        Some(Some((key, role))) => {
            push_line(&mut out, "wgmesh_extra_private_key", key.to_hex().as_str());
            push_line(&mut out, "wgmesh_extra_role", role);
        }
        Some(None) => push_line(&mut out, "wgmesh_extra_private_key", ""),
        None => {}
    }
    if let Some(port) = request.listen_port {
        push_line(&mut out, "listen_port", port);
    }
    if let Some(mark) = request.fwmark {
        push_line(&mut out, "fwmark", mark);
    }
    if request.replace_peers {
        push_line(&mut out, "replace_peers", "true");
    }
    for peer in &request.peers {
        push_line(&mut out, "public_key", peer.public_key.to_hex());
        if peer.remove {
            push_line(&mut out, "remove", "true");
            continue;
        }
        if peer.update_only {
            push_line(&mut out, "update_only", "true");
        }
        // Before any field: they apply to the renamed peer.
        if peer.promote_successor {
            push_line(&mut out, "wgmesh_promote_successor", "true");
        }
        if let Some(version) = peer.protocol_version {
            push_line(&mut out, "protocol_version", version);
        }
        match &peer.preshared_key {
            Some(Some(key)) => push_line(&mut out, "preshared_key", key.to_hex().as_str()),
            Some(None) => push_line(&mut out, "preshared_key", ZERO_KEY_HEX),
            None => {}
        }
        if let Some(endpoint) = peer.endpoint {
            push_line(&mut out, "endpoint", endpoint);
        }
        if let Some(interval) = peer.persistent_keepalive_interval {
            push_line(&mut out, "persistent_keepalive_interval", interval);
        }
        if peer.replace_allowed_ips {
            push_line(&mut out, "replace_allowed_ips", "true");
        }
        for net in &peer.remove_allowed_ips {
            push_line(&mut out, "allowed_ip", format_args!("-{}", net.trunc()));
        }
        for net in &peer.allowed_ips {
            push_line(&mut out, "allowed_ip", net.trunc());
        }
        match &peer.successor {
            Some(Some(key)) => push_line(&mut out, "wgmesh_successor_public_key", key.to_hex()),
            Some(None) => push_line(&mut out, "wgmesh_successor_public_key", ""),
            None => {}
        }
    }
    out.push('\n');
    out
}

/// Formats a server's answer to `get=1`: the device and its peers in
/// wireguard-go's `IpcGetOperation` order, then `errno=0` and the blank line.
///
/// Per wireguard-go: `private_key`, `listen_port` and `fwmark` only when set;
/// per peer `public_key`, `preshared_key` (always, all-zero when there is none),
/// `protocol_version`, `endpoint` (when known), `last_handshake_time_sec`,
/// `last_handshake_time_nsec`, `tx_bytes`, `rx_bytes`,
/// `persistent_keepalive_interval`, then one `allowed_ip` per prefix (host bits
/// cleared). Peers come in the snapshot's order (wireguard-go's is its map's).
///
/// The private key is written as the snapshot holds it; wireguard-go clamps a
/// key when it is set and so reports the clamped form. Both denote the same key.
///
/// wgmesh extension keys (docs/dataplane.md) are written only when the
/// snapshot has [`DeviceSnapshot::wgmesh_version`]: `wgmesh_version` and the
/// extra identity after `fwmark`, and per peer, after its `allowed_ip` lines,
/// `wgmesh_successor_public_key` and one `wgmesh_session` per established
/// session. `wg` (wireguard-tools' `ipc-uapi.h`) and wgctrl-go skip keys they
/// do not know, so `wg show` and `wg showconf` read this output unchanged.
pub fn format_get(snapshot: &DeviceSnapshot) -> Zeroizing<String> {
    let bound = GET_DEVICE_BOUND
        + snapshot
            .peers
            .iter()
            .map(|p| {
                PEER_BOUND
                    + ALLOWED_IP_BOUND * p.allowed_ips.len()
                    + SESSION_BOUND * p.sessions.len()
            })
            .sum::<usize>();
    let mut out = Zeroizing::new(String::with_capacity(bound));
    if let Some(key) = &snapshot.private_key {
        push_line(&mut out, "private_key", key.to_hex().as_str());
    }
    if snapshot.listen_port != 0 {
        push_line(&mut out, "listen_port", snapshot.listen_port);
    }
    if snapshot.fwmark != 0 {
        push_line(&mut out, "fwmark", snapshot.fwmark);
    }
    let extensions = snapshot.wgmesh_version.is_some();
    if let Some(version) = snapshot.wgmesh_version {
        push_line(&mut out, "wgmesh_version", version);
        if let Some((key, role)) = &snapshot.extra_identity {
            push_line(&mut out, "wgmesh_extra_public_key", key.to_hex());
            push_line(&mut out, "wgmesh_extra_role", role);
        }
    }
    for peer in &snapshot.peers {
        push_line(&mut out, "public_key", peer.public_key.to_hex());
        match &peer.preshared_key {
            Some(key) => push_line(&mut out, "preshared_key", key.to_hex().as_str()),
            None => push_line(&mut out, "preshared_key", ZERO_KEY_HEX),
        }
        push_line(&mut out, "protocol_version", peer.protocol_version);
        if let Some(endpoint) = peer.endpoint {
            push_line(&mut out, "endpoint", endpoint);
        }
        let (secs, nsecs) = peer.last_handshake.unwrap_or((0, 0));
        push_line(&mut out, "last_handshake_time_sec", secs);
        push_line(&mut out, "last_handshake_time_nsec", nsecs);
        push_line(&mut out, "tx_bytes", peer.tx_bytes);
        push_line(&mut out, "rx_bytes", peer.rx_bytes);
        push_line(
            &mut out,
            "persistent_keepalive_interval",
            peer.persistent_keepalive_interval,
        );
        for net in &peer.allowed_ips {
            push_line(&mut out, "allowed_ip", net.trunc());
        }
        if extensions {
            if let Some(key) = &peer.successor {
                push_line(&mut out, "wgmesh_successor_public_key", key.to_hex());
            }
            for s in &peer.sessions {
                let (secs, nsecs) = s.established;
                push_line(
                    &mut out,
                    "wgmesh_session",
                    format_args!("{},{},{secs},{nsecs}", s.local.to_hex(), s.remote.to_hex()),
                );
            }
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// A server's answer to a `set=1` (or to a failed `get=1`): `errno=N` and the
/// blank line.
pub fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// Parses a server's answer to `get=1` (one message, blank line included).
///
/// Read like `wg` reads it: keys it does not know, and device keys after the
/// first peer, are ignored (so a server may add namespaced extension keys), but
/// a known key with a bad value fails the whole response. A non-zero `errno` is
/// returned as [`ProtoError::Remote`] whatever else the response holds.
pub fn parse_get_response(text: &str) -> Result<DeviceSnapshot> {
    let lines = response_lines(text)?;
    let status = response_errno(&lines)?;
    if status != errno::OK {
        return Err(ProtoError::Remote { errno: status });
    }
    let mut device = DeviceSnapshot::default();
    let (mut extra_key, mut extra_role) = (None, None);
    for &(line, key, value) in &lines {
        let bad = |key: &'static str| ProtoError::BadResponse { line, key };
        let Some(peer) = device.peers.last_mut() else {
            match key {
                "private_key" => {
                    let bytes = parse_hex_key(value).ok_or(bad("private_key"))?;
                    device.private_key = if is_zero(&bytes) {
                        None
                    } else {
                        Some(
                            PrivateKey::from_bytes(*bytes)
                                .ok()
                                .ok_or(bad("private_key"))?,
                        )
                    };
                }
                "listen_port" => {
                    device.listen_port = parse_decimal(value, u16::MAX.into())
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or(bad("listen_port"))?;
                }
                "fwmark" => {
                    device.fwmark = parse_decimal(value, u32::MAX.into())
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or(bad("fwmark"))?;
                }
                "public_key" => device.peers.push(parse_snapshot_peer(line, value)?),
                "wgmesh_version" => {
                    device.wgmesh_version = Some(
                        parse_decimal(value, u32::MAX.into())
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or(bad("wgmesh_version"))?,
                    );
                }
                "wgmesh_extra_public_key" => {
                    let bytes = parse_hex_key(value).ok_or(bad("wgmesh_extra_public_key"))?;
                    extra_key = Some(PublicKey::from_bytes(*bytes));
                }
                "wgmesh_extra_role" => {
                    extra_role = Some(ExtraRole::parse(value).ok_or(bad("wgmesh_extra_role"))?);
                }
                _ => {}
            }
            continue;
        };
        match key {
            "public_key" => device.peers.push(parse_snapshot_peer(line, value)?),
            "preshared_key" => {
                let bytes = parse_hex_key(value).ok_or(bad("preshared_key"))?;
                peer.preshared_key = if is_zero(&bytes) {
                    None
                } else {
                    Some(PresharedKey::from_bytes(*bytes))
                };
            }
            "protocol_version" => {
                peer.protocol_version = parse_decimal(value, u32::MAX.into())
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(bad("protocol_version"))?;
            }
            "endpoint" => peer.endpoint = Some(parse_endpoint(value).ok_or(bad("endpoint"))?),
            "last_handshake_time_sec" => {
                let secs = parse_decimal(value, u64::MAX).ok_or(bad("last_handshake_time_sec"))?;
                let nsecs = peer.last_handshake.map_or(0, |(_, n)| n);
                peer.last_handshake = Some((secs, nsecs));
            }
            "last_handshake_time_nsec" => {
                let nsecs = parse_decimal(value, 999_999_999)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(bad("last_handshake_time_nsec"))?;
                let secs = peer.last_handshake.map_or(0, |(s, _)| s);
                peer.last_handshake = Some((secs, nsecs));
            }
            "tx_bytes" => peer.tx_bytes = parse_decimal(value, u64::MAX).ok_or(bad("tx_bytes"))?,
            "rx_bytes" => peer.rx_bytes = parse_decimal(value, u64::MAX).ok_or(bad("rx_bytes"))?,
            "persistent_keepalive_interval" => {
                peer.persistent_keepalive_interval = parse_decimal(value, u16::MAX.into())
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or(bad("persistent_keepalive_interval"))?;
            }
            "allowed_ip" => peer
                .allowed_ips
                .push(parse_prefix(value).ok_or(bad("allowed_ip"))?),
            "wgmesh_successor_public_key" => {
                let bytes = parse_hex_key(value).ok_or(bad("wgmesh_successor_public_key"))?;
                peer.successor = Some(PublicKey::from_bytes(*bytes));
            }
            "wgmesh_session" => peer
                .sessions
                .push(parse_session(value).ok_or(bad("wgmesh_session"))?),
            _ => {}
        }
    }
    device.extra_identity = match (extra_key, extra_role) {
        (Some(key), Some(role)) => Some((key, role)),
        _ => None,
    };
    for peer in &mut device.peers {
        if peer.last_handshake == Some((0, 0)) {
            peer.last_handshake = None;
        }
    }
    Ok(device)
}

/// Parses a server's answer to `set=1`: `Ok(())` for `errno=0`,
/// [`ProtoError::Remote`] for any other number. Other keys are ignored, as `wg`
/// ignores them.
pub fn parse_errno_response(text: &str) -> Result<()> {
    let lines = response_lines(text)?;
    match response_errno(&lines)? {
        errno::OK => Ok(()),
        errno => Err(ProtoError::Remote { errno }),
    }
}

impl PeerSnapshot {
    /// A peer with nothing but its key: no traffic, no handshake, protocol 1.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: 0,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            protocol_version: PROTOCOL_VERSION,
            successor: None,
            sessions: Vec::new(),
        }
    }
}

impl PeerUpdate {
    /// An update that creates the peer if needed and changes nothing else.
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
            remove_allowed_ips: Vec::new(),
            protocol_version: None,
            successor: None,
            promote_successor: false,
        }
    }

    /// An update that removes the peer.
    pub fn remove(public_key: PublicKey) -> Self {
        Self {
            remove: true,
            ..Self::new(public_key)
        }
    }
}

const KEY_LEN: usize = 32;
const ZERO_KEY_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";

// Upper bounds on formatted sizes, so output buffers holding secrets are
// allocated once. Longest lines: `private_key=` + 64 hex + `\n` = 77; an
// endpoint is at most `[` + 45 (IPv6 with embedded IPv4) + `%` + 10 + `]:` +
// 5 = 64 characters; a prefix `-` + 45 + `/128`. The per-peer figure covers
// every peer line of either message with room to spare (`get`: 434 bytes).
// The extensions add at most: `wgmesh_version=` + 10 digits, the extra
// identity (`wgmesh_extra_private_key=` + 64 hex = 90, role 27) and per peer
// the successor (93) and promote (30) lines; a `wgmesh_session=` line is 15 +
// 64 + 1 + 64 + 1 + 20 + 1 + 9 + 1 = 176.
const GET_DEVICE_BOUND: usize = 384;
const SET_DEVICE_BOUND: usize = 384;
const PEER_BOUND: usize = 768;
const ALLOWED_IP_BOUND: usize = 64;
const SESSION_BOUND: usize = 192;

const DEVICE_KEYS: &[&str] = &[
    "private_key",
    "listen_port",
    "fwmark",
    "replace_peers",
    "wgmesh_extra_private_key",
    "wgmesh_extra_role",
];
const PEER_KEYS: &[&str] = &[
    "wgmesh_successor_public_key",
    "wgmesh_promote_successor",
    "update_only",
    "remove",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
];

fn push_line(out: &mut String, key: &str, value: impl fmt::Display) {
    // Writing into a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

fn describe_errno(errno: i32) -> &'static str {
    match errno {
        errno::IO => " (EIO: I/O error)",
        errno::INVALID => " (EINVAL: invalid key or value)",
        errno::UNKNOWN => " (unknown error)",
        errno::PROTOCOL => " (EPROTO: protocol error)",
        errno::PORT_IN_USE => " (EADDRINUSE: listen port in use or fwmark not settable)",
        _ => "",
    }
}

/// Accumulates one peer's lines and reduces them to a [`PeerUpdate`].
struct PeerBuilder {
    update: PeerUpdate,
    /// `(prefix, add)` in line order, since the last `replace_allowed_ips`.
    allowed_ip_ops: Vec<(IpNet, bool)>,
}

impl PeerBuilder {
    fn finish(self) -> PeerUpdate {
        let Self {
            mut update,
            allowed_ip_ops,
        } = self;
        if update.remove {
            return PeerUpdate::remove(update.public_key);
        }
        // The last operation on a prefix wins; keep each at its last position.
        let mut seen = HashSet::with_capacity(allowed_ip_ops.len());
        let mut last_ops: Vec<(IpNet, bool)> = allowed_ip_ops
            .into_iter()
            .rev()
            .filter(|(net, _)| seen.insert(*net))
            .collect();
        last_ops.reverse();
        for (net, add) in last_ops {
            if add {
                update.allowed_ips.push(net);
            } else {
                update.remove_allowed_ips.push(net);
            }
        }
        update
    }
}

/// The extra-identity lines of a `set`, paired up when the message ends.
#[derive(Default)]
struct ExtraLines {
    /// `Some(None)`: cleared (empty or all-zero).
    key: Option<Option<PrivateKey>>,
    role: Option<ExtraRole>,
}

impl ExtraLines {
    fn finish(self) -> Result<Option<Option<(PrivateKey, ExtraRole)>>> {
        match (self.key, self.role) {
            (None, None) => Ok(None),
            (Some(None), _) => Ok(Some(None)),
            (Some(Some(key)), Some(role)) => Ok(Some(Some((key, role)))),
            (Some(Some(_)), None) | (None, Some(_)) => Err(ProtoError::ExtraIdentityIncomplete),
        }
    }
}

fn parse_set_body(mut rest: &[u8]) -> Result<SetRequest> {
    let mut request = SetRequest::default();
    let mut extra = ExtraLines::default();
    let mut peer: Option<PeerBuilder> = None;
    let mut line = 1;
    loop {
        line += 1;
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return Err(if rest.len() > MAX_LINE_LEN {
                ProtoError::LineTooLong { line }
            } else {
                ProtoError::Unterminated
            });
        };
        let raw = &rest[..nl];
        rest = &rest[nl + 1..];
        if raw.len() > MAX_LINE_LEN {
            return Err(ProtoError::LineTooLong { line });
        }
        let text = raw.strip_suffix(b"\r").unwrap_or(raw);
        if text.is_empty() {
            if !rest.is_empty() {
                return Err(ProtoError::TrailingData);
            }
            request.peers.extend(peer.map(PeerBuilder::finish));
            request.extra_identity = extra.finish()?;
            return Ok(request);
        }
        let Some(eq) = text.iter().position(|&b| b == b'=') else {
            return Err(ProtoError::MissingSeparator { line });
        };
        // Non-UTF-8 bytes become U+FFFD, which no key or value parser accepts.
        let key = String::from_utf8_lossy(&text[..eq]);
        let value = String::from_utf8_lossy(&text[eq + 1..]);
        if key == "public_key" {
            let bytes = parse_hex_key(&value).ok_or(ProtoError::BadKey {
                line,
                key: "public_key",
            })?;
            request.peers.extend(peer.take().map(PeerBuilder::finish));
            peer = Some(PeerBuilder {
                update: PeerUpdate::new(PublicKey::from_bytes(*bytes)),
                allowed_ip_ops: Vec::new(),
            });
            continue;
        }
        match &mut peer {
            None => device_line(&mut request, &mut extra, line, &key, &value)?,
            Some(peer) => peer_line(peer, line, &key, &value)?,
        }
    }
}

fn device_line(
    request: &mut SetRequest,
    extra: &mut ExtraLines,
    line: usize,
    key: &str,
    value: &str,
) -> Result<()> {
    match key {
        "wgmesh_extra_private_key" => {
            let bad = ProtoError::BadKey {
                line,
                key: "wgmesh_extra_private_key",
            };
            extra.key = Some(if value.is_empty() {
                None
            } else {
                let bytes = parse_hex_key(value).ok_or(bad.clone())?;
                if is_zero(&bytes) {
                    None
                } else {
                    Some(PrivateKey::from_bytes(*bytes).ok().ok_or(bad)?)
                }
            });
        }
        "wgmesh_extra_role" => {
            extra.role = Some(ExtraRole::parse(value).ok_or(ProtoError::BadExtraRole { line })?);
        }
        "private_key" => {
            let bad = ProtoError::BadKey {
                line,
                key: "private_key",
            };
            let bytes = parse_hex_key(value).ok_or(bad.clone())?;
            request.private_key = Some(if is_zero(&bytes) {
                None
            } else {
                Some(PrivateKey::from_bytes(*bytes).ok().ok_or(bad)?)
            });
        }
        "listen_port" => {
            request.listen_port = Some(
                parse_decimal(value, u16::MAX.into())
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or(ProtoError::BadNumber {
                        line,
                        key: "listen_port",
                    })?,
            );
        }
        "fwmark" => {
            request.fwmark = Some(
                parse_decimal(value, u32::MAX.into())
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or(ProtoError::BadNumber {
                        line,
                        key: "fwmark",
                    })?,
            );
        }
        "replace_peers" => {
            request.replace_peers = parse_flag(value, line, "replace_peers")?;
        }
        _ => {
            return Err(match PEER_KEYS.iter().find(|k| **k == key) {
                Some(key) => ProtoError::PeerKeyOutsidePeer { line, key },
                None => unknown_key(line, key),
            })
        }
    }
    Ok(())
}

fn peer_line(peer: &mut PeerBuilder, line: usize, key: &str, value: &str) -> Result<()> {
    let update = &mut peer.update;
    match key {
        "update_only" => update.update_only = parse_flag(value, line, "update_only")?,
        "remove" => update.remove = parse_flag(value, line, "remove")?,
        "preshared_key" => {
            let bad = ProtoError::BadKey {
                line,
                key: "preshared_key",
            };
            let bytes = parse_hex_key(value).ok_or(bad.clone())?;
            update.preshared_key = Some(if is_zero(&bytes) {
                None
            } else {
                Some(PresharedKey::from_bytes(*bytes))
            });
        }
        "endpoint" => {
            update.endpoint = Some(parse_endpoint(value).ok_or(ProtoError::BadEndpoint { line })?);
        }
        "persistent_keepalive_interval" => {
            update.persistent_keepalive_interval = Some(
                parse_decimal(value, u16::MAX.into())
                    .and_then(|n| u16::try_from(n).ok())
                    .ok_or(ProtoError::BadNumber {
                        line,
                        key: "persistent_keepalive_interval",
                    })?,
            );
        }
        "replace_allowed_ips" => {
            update.replace_allowed_ips = parse_flag(value, line, "replace_allowed_ips")?;
            peer.allowed_ip_ops.clear();
        }
        "allowed_ip" => {
            let (add, text) = match value.strip_prefix('-') {
                Some(text) => (false, text),
                None => (true, value),
            };
            let net = parse_prefix(text).ok_or(ProtoError::BadAllowedIp { line })?;
            peer.allowed_ip_ops.push((net, add));
        }
        "wgmesh_successor_public_key" => {
            update.successor = Some(if value.is_empty() {
                None
            } else {
                let bytes = parse_hex_key(value).ok_or(ProtoError::BadKey {
                    line,
                    key: "wgmesh_successor_public_key",
                })?;
                (!is_zero(&bytes)).then(|| PublicKey::from_bytes(*bytes))
            });
        }
        "wgmesh_promote_successor" => {
            update.promote_successor = parse_flag(value, line, "wgmesh_promote_successor")?;
        }
        "protocol_version" => {
            // wireguard-go compares the text with "1": no leading zeros.
            if value != "1" {
                return Err(ProtoError::BadProtocolVersion { line });
            }
            update.protocol_version = Some(PROTOCOL_VERSION);
        }
        _ => {
            return Err(match DEVICE_KEYS.iter().find(|k| **k == key) {
                Some(key) => ProtoError::DeviceKeyInPeer { line, key },
                None => unknown_key(line, key),
            })
        }
    }
    Ok(())
}

fn unknown_key(line: usize, key: &str) -> ProtoError {
    let shown = if !key.is_empty()
        && key.len() <= 32
        && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        format!("{key:?}")
    } else {
        format!("(not shown: {} bytes)", key.len())
    };
    ProtoError::UnknownKey { line, key: shown }
}

/// wireguard-go accepts only the exact text `true` for flags; `false` is an error
/// (leave the line out instead).
fn parse_flag(value: &str, line: usize, key: &'static str) -> Result<bool> {
    if value == "true" {
        Ok(true)
    } else {
        Err(ProtoError::BadFlag { line, key })
    }
}

/// Splits a response into `(line number, key, value)` up to its blank line.
fn response_lines(text: &str) -> Result<Vec<(usize, &str, &str)>> {
    let mut lines = Vec::new();
    let mut rest = text;
    let mut line = 0;
    loop {
        line += 1;
        let Some((current, tail)) = rest.split_once('\n') else {
            return Err(ProtoError::Unterminated);
        };
        rest = tail;
        if current.is_empty() {
            if !rest.is_empty() {
                return Err(ProtoError::TrailingData);
            }
            return Ok(lines);
        }
        let Some((key, value)) = current.split_once('=') else {
            return Err(ProtoError::MissingSeparator { line });
        };
        lines.push((line, key, value));
    }
}

/// The response's status: the last `errno=` line, an optionally negative decimal.
fn response_errno(lines: &[(usize, &str, &str)]) -> Result<i32> {
    let mut status = None;
    for &(line, key, value) in lines {
        if key == "errno" {
            let bad = ProtoError::BadResponse { line, key: "errno" };
            let parsed = match value.strip_prefix('-') {
                Some(digits) => parse_decimal(digits, 1 << 31)
                    .and_then(|n| i64::try_from(n).ok())
                    .and_then(|n| i32::try_from(-n).ok()),
                None => parse_decimal(value, i32::MAX as u64).and_then(|n| i32::try_from(n).ok()),
            };
            status = Some(parsed.ok_or(bad)?);
        }
    }
    status.ok_or(ProtoError::MissingErrno)
}

fn parse_snapshot_peer(line: usize, value: &str) -> Result<PeerSnapshot> {
    let bytes = parse_hex_key(value).ok_or(ProtoError::BadResponse {
        line,
        key: "public_key",
    })?;
    Ok(PeerSnapshot::new(PublicKey::from_bytes(*bytes)))
}

/// `<local hex>,<remote hex>,<unix seconds>,<nanoseconds>`.
fn parse_session(value: &str) -> Option<SnapshotSession> {
    let mut parts = value.split(',');
    let local = PublicKey::from_bytes(*parse_hex_key(parts.next()?)?);
    let remote = PublicKey::from_bytes(*parse_hex_key(parts.next()?)?);
    let secs = parse_decimal(parts.next()?, u64::MAX)?;
    let nsecs = u32::try_from(parse_decimal(parts.next()?, 999_999_999)?).ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(SnapshotSession {
        local,
        remote,
        established: (secs, nsecs),
    })
}

/// Exactly 64 hex digits, either case (Go's `hex.DecodeString`).
fn parse_hex_key(text: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let digits = text.as_bytes();
    if digits.len() != 2 * KEY_LEN {
        return None;
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn is_zero(bytes: &[u8; KEY_LEN]) -> bool {
    bytes.iter().fold(0u8, |acc, b| acc | b) == 0
}

/// Go's `strconv.ParseUint(text, 10, _)`: one or more ASCII digits (leading zeros
/// allowed, no sign, no `_`), at most `max`.
fn parse_decimal(text: &str, max: u64) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    text.bytes()
        .try_fold(0u64, |acc, b| {
            let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
            acc.checked_mul(10)?.checked_add(u64::from(digit))
        })
        .filter(|n| *n <= max)
}

/// Go's `netip.ParseAddrPort`, less named zones: `a.b.c.d:port` or
/// `[v6]:port` / `[v6%scope-id]:port`, split at the last colon.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (host, port) = text.rsplit_once(':')?;
    let port = u16::try_from(parse_decimal(port, u16::MAX.into())?).ok()?;
    match host.strip_prefix('[') {
        Some(inner) => {
            let inner = inner.strip_suffix(']')?;
            let (addr, scope_id) = match inner.split_once('%') {
                Some((addr, zone)) => (
                    addr,
                    u32::try_from(parse_decimal(zone, u32::MAX.into())?).ok()?,
                ),
                None => (inner, 0),
            };
            let addr: Ipv6Addr = addr.parse().ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(addr, port, 0, scope_id)))
        }
        None => {
            let addr: Ipv4Addr = host.parse().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(addr, port)))
        }
    }
}

/// Go's `netip.ParsePrefix` (Go 1.22+): address, `/`, a prefix length without
/// sign or leading zero, no zone; returned with host bits cleared.
fn parse_prefix(text: &str) -> Option<IpNet> {
    let (addr, bits) = text.rsplit_once('/')?;
    if bits.len() > 1 && bits.starts_with('0') {
        return None;
    }
    let bits = u8::try_from(parse_decimal(bits, 128)?).ok()?;
    let addr: IpAddr = addr.parse().ok()?;
    IpNet::new(addr, bits).ok().map(|net| net.trunc())
}

#[cfg(test)]
mod tests;
