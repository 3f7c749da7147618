//! One netlink request over a blocking socket, and its replies: the parts
//! of a dump up to `NLMSG_DONE`, or a request's ACK; a refusal as the
//! kernel's errno. Used where a synchronous caller needs netlink without a
//! tokio runtime: the kernel WireGuard backend (generic netlink, from the
//! agent's `spawn_blocking`) and [`super::ensure_wireguard_link`] (rtnetlink).
//!
//! Why a loop of our own and not netlink-proto (the connection under
//! rtnetlink, and under the `genetlink` crate) for the WireGuard family,
//! whose messages are built and parsed with the rust-netlink packet crates
//! all the same: a `WG_CMD_SET_DEVICE` request and a `WG_CMD_GET_DEVICE`
//! dump carry the device's private key, and netlink-proto 0.14 logs every
//! message it sends or receives with `{:?}` at trace level (`codecs.rs`),
//! and the raw bytes of one it cannot decode at error level, through the
//! `log` facade that our tracing subscriber forwards; netlink-packet-
//! wireguard's derived `Debug` prints the key bytes. Its buffers are not
//! wiped either. Here every buffer that may hold a key is [`Zeroizing`],
//! nothing is logged, and error replies come without a copy of the request
//! (`NETLINK_CAP_ACK`). It is also synchronous, as [`crate::wg::Backend`]
//! is, where netlink-proto needs a runtime per call; and `genetlink` 0.3
//! would bring a second netlink-proto (0.13) beside rtnetlink's 0.14.

use std::io;
use std::num::NonZeroI32;

use rtnetlink::packet_core::{
    ErrorBuffer, NetlinkBuffer, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_DUMP_INTR,
};
use rtnetlink::sys::{Socket, SocketAddr};
use zeroize::Zeroizing;

/// The replies to one request: the full bytes of each message that is not
/// netlink's own (`NLMSG_*`), wiped when dropped.
#[derive(Default)]
pub(crate) struct Replies {
    pub(crate) messages: Vec<Zeroizing<Vec<u8>>>,
    /// A dump part came flagged `NLM_F_DUMP_INTR`: what it lists changed
    /// during the dump, which should be read again.
    pub(crate) interrupted: bool,
}

/// A socket of netlink `protocol` (`NETLINK_ROUTE`, `NETLINK_GENERIC`),
/// bound and connected to the kernel, in the calling thread's network
/// namespace.
pub(crate) fn open(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Error replies without a copy of the request (which may hold a key).
    socket.set_cap_ack(true)?;
    Ok(socket)
}

/// Sends `bytes` (one request whose sequence number is `seq`) and reads the
/// replies with that sequence number until the ACK (a request) or
/// `NLMSG_DONE` (a dump). The kernel's refusal is an [`io::Error`] with its
/// errno ([`io::Error::raw_os_error`]); a reply that does not parse is
/// [`io::ErrorKind::InvalidData`].
pub(crate) fn request(socket: &Socket, bytes: &[u8], seq: u32) -> io::Result<Replies> {
    let sent = socket.send(bytes, 0)?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", bytes.len()),
        ));
    }
    let mut replies = Replies::default();
    loop {
        let datagram = recv_datagram(socket)?;
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
fn scan_datagram(datagram: &[u8], seq: u32, replies: &mut Replies) -> io::Result<bool> {
    let invalid =
        |e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let mut offset = 0;
    while offset < datagram.len() {
        let buf = NetlinkBuffer::new_checked(&datagram[offset..]).map_err(|e| invalid(&e))?;
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
            NLMSG_OVERRUN => return Err(io::Error::other("netlink overrun")),
            NLMSG_ERROR => {
                let err = ErrorBuffer::new_checked(buf.payload()).map_err(|e| invalid(&e))?;
                return match err.code() {
                    None => Ok(true),
                    Some(code) => Err(errno_error(code)),
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
                    Some(code) => Err(errno_error(code)),
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

#[cfg(test)]
mod tests {
    use rtnetlink::packet_core::NLM_F_MULTIPART;

    use super::*;

    /// A netlink message as the kernel lays it out: nlmsghdr (length, type,
    /// flags, sequence number, port 0), the payload, padding to 4.
    fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = 16 + payload.len();
        let mut m = Vec::with_capacity(len.div_ceil(4) * 4);
        m.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(len.div_ceil(4) * 4, 0);
        m
    }

    /// A generic netlink family's dump part: genlmsghdr and one attribute.
    fn part(flags: u16, seq: u32, value: u8) -> Vec<u8> {
        message(0x1d, flags, seq, &[3, 1, 0, 0, 5, 0, 6, 0, value])
    }

    /// `NLMSG_ERROR` with `code` (0: an ACK) and the request's header.
    fn error(seq: u32, code: i32) -> Vec<u8> {
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]);
        message(NLMSG_ERROR, 0, seq, &payload)
    }

    /// A dump's parts are collected up to `NLMSG_DONE`, a stale reply to an
    /// earlier request skipped; a `DONE` with an errno is the kernel's error.
    #[test]
    fn a_dump_is_collected_until_done() {
        let seq = 42;
        let (first, second) = (part(NLM_F_MULTIPART, seq, 1), part(NLM_F_MULTIPART, seq, 2));
        let datagram = [first.clone(), second.clone()].concat();
        let stale = part(NLM_F_MULTIPART, seq - 1, 3);
        let done = message(NLMSG_DONE, NLM_F_MULTIPART, seq, &[0; 4]);

        let mut replies = Replies::default();
        assert!(!scan_datagram(&stale, seq, &mut replies).unwrap());
        assert!(!scan_datagram(&datagram, seq, &mut replies).unwrap());
        assert!(scan_datagram(&done, seq, &mut replies).unwrap());
        assert!(!replies.interrupted);
        let got: Vec<&[u8]> = replies.messages.iter().map(|m| m.as_slice()).collect();
        // Each message as sent, without the padding after the last one.
        assert_eq!(got, vec![&first[..25], &second[..25]]);

        let failed = message(
            NLMSG_DONE,
            NLM_F_MULTIPART,
            seq,
            &(-libc::EINTR).to_ne_bytes(),
        );
        let err = scan_datagram(&failed, seq, &mut Replies::default()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
    }

    #[test]
    fn kernel_errors_acks_and_interrupted_dumps() {
        // NLMSG_ERROR with -ENODEV: the kernel's errno.
        let err = scan_datagram(&error(5, -libc::ENODEV), 5, &mut Replies::default()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));

        // An ACK ends a request.
        assert!(scan_datagram(&error(5, 0), 5, &mut Replies::default()).unwrap());

        // A dump part flagged NLM_F_DUMP_INTR marks the dump for a retry.
        let mut replies = Replies::default();
        let buf = part(NLM_F_MULTIPART | NLM_F_DUMP_INTR, 5, 1);
        assert!(!scan_datagram(&buf, 5, &mut replies).unwrap());
        assert!(replies.interrupted);

        // A truncated datagram is invalid data, not a panic.
        let err = scan_datagram(&buf[..10], 5, &mut Replies::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
