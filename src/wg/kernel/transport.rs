//! The generic netlink connection under the kernel backend: a blocking
//! socket with the `wireguard` family resolved by name, and one request with
//! its replies over `crate::net::netlink` (whose comment says why that is
//! a loop of our own rather than netlink-proto: the messages carry the
//! private key).

use std::io;

use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::sys::protocols::NETLINK_GENERIC;
use rtnetlink::sys::Socket;

use super::{KernelError, FAMILY_NAME};
use crate::net::netlink::{self, Replies};

/// A generic netlink socket with the `wireguard` family resolved.
pub(super) struct GenlConn {
    socket: Socket,
    pub(super) family: u16,
}

impl GenlConn {
    pub(super) fn open() -> Result<GenlConn, KernelError> {
        let socket = netlink::open(NETLINK_GENERIC).map_err(|source| KernelError::Socket {
            protocol: "generic",
            source,
        })?;
        let mut conn = GenlConn { socket, family: 0 };
        conn.family = conn.resolve()?;
        Ok(conn)
    }

    /// Sends one request (`bytes`, sequence number `seq`) to the kernel;
    /// its replies, or the kernel's errno as an [`io::Error`].
    pub(super) fn request(&mut self, bytes: &[u8], seq: u32) -> io::Result<Replies> {
        netlink::request(&self.socket, bytes, seq)
    }

    /// `CTRL_CMD_GETFAMILY` for [`FAMILY_NAME`]: the id the kernel gave the
    /// family when the module registered it.
    fn resolve(&mut self) -> Result<u16, KernelError> {
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
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Err(KernelError::FamilyNotFound)
            }
            Err(source) => return Err(KernelError::Family { source }),
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
}
