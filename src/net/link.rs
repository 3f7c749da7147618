//! The one interface-name rule of the project, and the link operation that
//! runs without a tokio runtime: creating the kernel WireGuard link.
//!
//! Every place that takes an interface name checks it here, so a bad
//! `--interface` (or a bad name in a spec built in code) is refused before
//! any request with the same words everywhere: the CLI's parser (the error
//! names the flag), the rtnetlink link, route and policy code, the
//! masquerade, and the kernel WireGuard backend.

use rtnetlink::packet_core::{NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::protocols::NETLINK_ROUTE;

use super::{netlink, NetError, Result};

/// The rule [`check_interface_name`] applies, in words, for error messages
/// and `--help`.
pub const INTERFACE_NAME_RULE: &str =
    "1 to 15 bytes, not \".\" or \"..\", and no '/', ':', NUL or whitespace";

/// An interface name the kernel would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid interface name {name:?}: {reason} (an interface name is {INTERFACE_NAME_RULE})")]
pub struct InvalidInterfaceName {
    pub name: String,
    /// What is wrong with it: "empty", "longer than 15 bytes", ...
    pub reason: &'static str,
}

/// Whether the kernel would take `name` as a device name: its
/// `dev_valid_name` (`net/core/dev.c`) checked here, so a bad configuration
/// gets a clear error rather than EINVAL (or ENODEV from a lookup that
/// silently truncated the name). The kernel counts bytes: at most
/// `IFNAMSIZ - 1` = 15, and its `isspace` is ASCII whitespace (with VT) plus
/// byte 0xA0.
pub fn check_interface_name(name: &str) -> std::result::Result<(), InvalidInterfaceName> {
    const IFNAMSIZ: usize = 16;
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= IFNAMSIZ {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved")
    } else if name.bytes().any(|b| {
        matches!(
            b,
            b'/' | b':' | 0 | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0
        )
    }) {
        Some("contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(InvalidInterfaceName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Creates the kernel WireGuard link `interface` (`ip link add <interface>
/// type wireguard`) unless an interface of that name exists; true if it
/// created it. The link starts down; [`super::Net::ensure_link_up`] sets its
/// MTU and brings it up. Blocking (the kernel backend calls it from a
/// synchronous [`crate::wg::Backend`] method): the message is rtnetlink's
/// own `LinkWireguard` builder, sent over `net::netlink::request`. Fails when
/// the host has no WireGuard module ("Unknown device type", EOPNOTSUPP) or
/// the caller lacks CAP_NET_ADMIN.
pub fn ensure_wireguard_link(interface: &str) -> Result<bool> {
    check_interface_name(interface)?;
    let socket = netlink::open(NETLINK_ROUTE).map_err(|source| NetError::Connect { source })?;
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewLink(
        rtnetlink::LinkWireguard::new(interface).build(),
    ));
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    message.header.sequence_number = 1;
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    match netlink::request(&socket, &buf, 1) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(source) => Err(NetError::CreateLink {
            interface: interface.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernel() {
        assert!(check_interface_name("wgmesh0").is_ok());
        assert!(check_interface_name("fifteen-chars-x").is_ok());
        assert!(check_interface_name("wg.0-a_b").is_ok());
        for (bad, reason) in [
            ("", "empty"),
            ("sixteen-chars-xx", "longer than 15 bytes"),
            // 8 characters, 16 bytes: the kernel counts bytes.
            ("éééééééé", "longer than 15 bytes"),
            (".", "reserved"),
            ("..", "reserved"),
            ("a/b", "contains"),
            ("a:b", "contains"),
            ("a b", "contains"),
            ("a\tb", "contains"),
            ("a\u{b}b", "contains"),
            ("a\0b", "contains"),
        ] {
            let err = check_interface_name(bad).unwrap_err();
            assert!(err.reason.starts_with(reason), "{bad:?}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("invalid interface name {bad:?}: {reason}"))
                    && text.ends_with(&format!("(an interface name is {INTERFACE_NAME_RULE})")),
                "{text}"
            );
        }
    }
}
