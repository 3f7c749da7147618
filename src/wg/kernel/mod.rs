//! [`Backend`] for kernel WireGuard: the link is a `wireguard` rtnetlink
//! link, its configuration goes over the `wireguard` generic netlink family
//! (`WG_CMD_GET_DEVICE`, `WG_CMD_SET_DEVICE`).
//!
//! Split by job, one file each:
//! - here: [`KernelBackend`] (the [`Backend`] over the pieces below) and
//!   [`KernelError`];
//! - `messages`, pure and tested in memory: a change set as
//!   `WG_CMD_SET_DEVICE` messages split to size ([`set_messages`]), and a
//!   `WG_CMD_GET_DEVICE` dump read back ([`device_state`], [`peer_stats`]);
//! - `transport`: the generic netlink socket with the family resolved, one
//!   request and its replies over `crate::net::netlink` (a loop of our
//!   own, not netlink-proto: that module says why);
//! - `choice`: `--backend auto|kernel|uapi` ([`select_backend`],
//!   [`select_reader`]).
//!
//! The link itself (`ip link add … type wireguard`) is created with the
//! other link code, by [`crate::net::ensure_wireguard_link`], and its name
//! checked by the project's one rule, [`crate::net::check_interface_name`].
//!
//! Everything runs over blocking netlink sockets: [`Backend`] is a
//! synchronous trait that the agent calls from `spawn_blocking`, and every
//! request here is a short exchange with the kernel itself, which always
//! answers.
//!
//! A change set does not fit one netlink message once the mesh is large: the
//! kernel takes one device per `WG_CMD_SET_DEVICE` message, and a message
//! must stay well under what the socket buffers accept. [`set_messages`]
//! splits a change set into as many messages as needed, each at most
//! `max_bytes` long: the private key, listen port and fwmark ride in the
//! first, peers follow in order, and a peer whose allowed IPs overflow a
//! message continues in the next one. Only a peer's first chunk carries
//! `WGPEER_F_REPLACE_ALLOWEDIPS`, so the continuation chunks add to what
//! the first one set instead of replacing it. Unlike the UAPI backend, the
//! messages are applied one by one: if the kernel refuses message k, the
//! messages before it stay applied, and the next reconcile pass (which reads
//! the device again) finishes the job.

mod choice;
mod messages;
mod transport;

use std::fmt;
use std::io;

use netlink_packet_wireguard::WireguardMessage;

use super::{Backend, ChangeSet, DeviceState, PeerStats, Result, WgError};
use messages::{get_request, parse_wireguard, scrub};
use transport::GenlConn;

pub use choice::{kernel_available, select_backend, select_reader, BackendKind, SelectedBackend};
pub use messages::{
    device_state, peer_stats, set_messages, SetMessage, FORCE_HANDSHAKE_KEEPALIVE,
    SAFE_MESSAGE_BYTES,
};

/// The generic netlink family of kernel WireGuard.
pub const FAMILY_NAME: &str = "wireguard";

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

    /// Creates the `wireguard` link if there is no interface of that name
    /// ([`crate::net::ensure_wireguard_link`]); true if it created it.
    pub fn ensure_link(&self) -> Result<bool> {
        crate::net::ensure_wireguard_link(&self.interface)
            .map_err(|e| self.error(KernelError::Link(e)))
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
                .map_err(KernelError::netlink("WG_CMD_GET_DEVICE", &interface))?;
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
            conn.request(&bytes, seq).map_err(KernelError::netlink(
                &format!("WG_CMD_SET_DEVICE message {} of {total}", i + 1),
                &interface,
            ))?;
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
    /// Creating the link, or a name the kernel would refuse.
    #[error(transparent)]
    Link(#[from] crate::net::NetError),
    #[error("{0}")]
    Task(String),
}

impl KernelError {
    /// The kernel's errno, when the kernel refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Socket { source, .. }
            | KernelError::Family { source }
            | KernelError::Netlink { source, .. } => source.raw_os_error(),
            KernelError::Link(e) => e.errno(),
            _ => None,
        }
    }

    /// The error of operation `op` on `interface` that the kernel (or the
    /// socket) answered with `source`.
    fn netlink(op: &str, interface: &str) -> impl FnOnce(io::Error) -> KernelError {
        let (op, interface) = (op.to_owned(), interface.to_owned());
        move |source| KernelError::Netlink {
            op,
            interface,
            source,
        }
    }
}

fn device_label(interface: &str) -> String {
    format!("kernel WireGuard device {interface} (generic netlink)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_send() {
        fn is_send<T: Send>() {}
        is_send::<KernelBackend>();
    }

    #[test]
    fn a_refused_request_names_the_operation_and_keeps_the_errno() {
        let refused = io::Error::from_raw_os_error(libc::ENODEV);
        let e = KernelError::netlink("WG_CMD_GET_DEVICE", "wgmesh0")(refused);
        assert_eq!(e.errno(), Some(libc::ENODEV));
        assert!(
            e.to_string().starts_with("WG_CMD_GET_DEVICE on wgmesh0: "),
            "{e}"
        );
        let e = KernelError::Link(crate::net::NetError::CreateLink {
            interface: "wgmesh0".into(),
            source: io::Error::from_raw_os_error(libc::EPERM),
        });
        assert_eq!(e.errno(), Some(libc::EPERM));
        assert!(
            e.to_string()
                .starts_with("creating wireguard link wgmesh0: "),
            "{e}"
        );
    }
}
