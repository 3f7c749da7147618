//! The netlink socket under the kernel backend: a blocking socket per
//! protocol, the `wireguard` generic netlink family resolved by name, one
//! request and its replies (a dump's parts up to `NLMSG_DONE`, or the ACK),
//! and the `wireguard` link created over rtnetlink.

use std::io;
use std::num::NonZeroI32;

use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use rtnetlink::packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLMSG_DONE, NLMSG_ERROR,
    NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::{NETLINK_GENERIC, NETLINK_ROUTE};
use rtnetlink::sys::{Socket, SocketAddr};
use zeroize::Zeroizing;

use super::{KernelError, FAMILY_NAME};

/// A generic netlink socket with the `wireguard` family resolved.
pub(super) struct GenlConn {
    socket: Socket,
    pub(super) family: u16,
}

/// The replies to one request: the full bytes of each non-control message.
#[derive(Default)]
pub(super) struct Replies {
    pub(super) messages: Vec<Zeroizing<Vec<u8>>>,
    pub(super) interrupted: bool,
}

impl GenlConn {
    pub(super) fn open() -> std::result::Result<GenlConn, KernelError> {
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

    pub(super) fn request(
        &mut self,
        bytes: &[u8],
        seq: u32,
    ) -> std::result::Result<Replies, Exchange> {
        exchange(&self.socket, bytes, seq)
    }
}

pub(super) fn open_socket(
    protocol: isize,
    name: &'static str,
) -> std::result::Result<Socket, KernelError> {
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
pub(super) fn exchange(
    socket: &Socket,
    bytes: &[u8],
    seq: u32,
) -> std::result::Result<Replies, Exchange> {
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
pub(super) fn ensure_wireguard_link(interface: &str) -> std::result::Result<bool, KernelError> {
    crate::net::check_interface_name(interface)?;
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

/// A failed exchange before it is given its operation and interface.
#[derive(Debug)]
pub(super) enum Exchange {
    Io(io::Error),
    Decode(String),
}

impl Exchange {
    pub(super) fn at(self, op: &str, interface: &str) -> KernelError {
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

#[cfg(test)]
mod tests {
    use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};
    use rtnetlink::packet_core::{Emitable, NLM_F_MULTIPART};

    use super::super::messages::{emit_genl, HEADERS_LEN};
    use super::*;

    const FAMILY: u16 = 0x1d;

    fn part(port: u16, flags: u16, seq: u32) -> Vec<u8> {
        let m = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::ListenPort(port)],
        };
        let mut buf = vec![0u8; HEADERS_LEN + m.buffer_len()];
        emit_genl(&mut buf, FAMILY, flags, seq, m.cmd, &m);
        buf
    }

    /// A dump's parts are collected up to `NLMSG_DONE`; a stale reply to an
    /// earlier request is skipped.
    #[test]
    fn a_dump_is_collected_until_done() {
        let seq = 42;
        let (first, second) = (part(1, NLM_F_MULTIPART, seq), part(2, NLM_F_MULTIPART, seq));
        let datagram = [first.clone(), second.clone()].concat();
        let stale = part(3, NLM_F_MULTIPART, seq - 1);
        let mut done = vec![20, 0, 0, 0, 3, 0, 2, 0];
        done.extend_from_slice(&seq.to_ne_bytes());
        done.extend_from_slice(&[0; 8]);

        let mut replies = Replies::default();
        assert!(!scan_datagram(&stale, seq, &mut replies).unwrap());
        assert!(!scan_datagram(&datagram, seq, &mut replies).unwrap());
        assert!(scan_datagram(&done, seq, &mut replies).unwrap());
        assert!(!replies.interrupted);
        let got: Vec<&[u8]> = replies.messages.iter().map(|m| m.as_slice()).collect();
        assert_eq!(got, vec![first.as_slice(), second.as_slice()]);
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
        let buf = part(1, NLM_F_MULTIPART | NLM_F_DUMP_INTR, 5);
        let mut replies = Replies::default();
        assert!(!scan_datagram(&buf, 5, &mut replies).unwrap());
        assert!(replies.interrupted);
    }
}
