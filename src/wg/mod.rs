//! The WireGuard backend seam: one trait, [`Backend`], through which the agent
//! reads a device's state and applies a change set, whatever implements the
//! device. Today: [`uapi::UapiBackend`], which drives any implementation that
//! serves the cross-platform UAPI socket (wgmesh's own data plane,
//! wireguard-go, boringtun-cli). The kernel backend (generic netlink) comes
//! behind the same trait.
//!
//! [`reconcile`] is the pure step in between: desired peers (from the
//! planner) against the device's state → the minimal [`ChangeSet`]; an empty
//! change set means the agent writes nothing.

pub mod kernel;
pub mod memory;
pub mod proto;
pub mod uapi;

use crate::keys::{PrivateKey, PublicKey};
use crate::mesh::{diff, PeerChange, PeerConfig};

pub type Result<T, E = WgError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("cannot reach the WireGuard device at {path}: {source} (is the data plane running?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {path} failed: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the device at {path} answered: {source}")]
    Protocol {
        path: String,
        #[source]
        source: proto::ProtoError,
    },
}

/// What the agent needs to know of a device.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub peers: Vec<PeerConfig>,
}

/// Changes to apply in one transaction.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerChange>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none() && self.listen_port.is_none() && self.peers.is_empty()
    }
}

/// Live counters of one peer, for metrics and `wgmesh status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    pub endpoint: Option<std::net::SocketAddr>,
    pub last_handshake: Option<std::time::SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Anything that holds WireGuard peers.
pub trait Backend: Send {
    /// A short name for logs ("uapi /var/run/wireguard/wgmesh0.sock").
    fn describe(&self) -> String;
    fn state(&mut self) -> Result<DeviceState>;
    fn apply(&mut self, changes: &ChangeSet) -> Result<()>;
    /// Handshake times and transfer counters; empty where the backend has none.
    fn peer_stats(&mut self) -> Result<Vec<PeerStats>> {
        Ok(Vec::new())
    }
}

/// The local side the device must have.
#[derive(Debug, Clone)]
pub struct LocalDevice<'a> {
    pub private_key: &'a PrivateKey,
    pub listen_port: u16,
}

/// What to change so that `state` matches `local` and `desired`. Pure.
pub fn reconcile(
    state: &DeviceState,
    local: &LocalDevice<'_>,
    desired: &[PeerConfig],
) -> ChangeSet {
    let key_ok = state.public_key == Some(local.private_key.public_key());
    ChangeSet {
        private_key: (!key_ok).then(|| local.private_key.clone()),
        listen_port: (state.listen_port != local.listen_port).then_some(local.listen_port),
        peers: diff(&state.peers, desired),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerConfig {
        PeerConfig {
            public_key: PrivateKey::from_bytes([n; 32]).unwrap().public_key(),
            endpoint: Some(format!("192.0.2.{n}:51820").parse().unwrap()),
            allowed_ips: vec![format!("10.244.{n}.0/24").parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    #[test]
    fn a_device_in_the_desired_state_needs_nothing() {
        let key = PrivateKey::generate();
        let desired = vec![peer(1), peer(2)];
        let state = DeviceState {
            public_key: Some(key.public_key()),
            listen_port: 51820,
            peers: desired.clone(),
        };
        let local = LocalDevice {
            private_key: &key,
            listen_port: 51820,
        };
        assert!(reconcile(&state, &local, &desired).is_empty());
    }

    #[test]
    fn a_fresh_device_gets_key_port_and_peers() {
        let key = PrivateKey::generate();
        let desired = vec![peer(1)];
        let local = LocalDevice {
            private_key: &key,
            listen_port: 51820,
        };
        let c = reconcile(&DeviceState::default(), &local, &desired);
        assert_eq!(
            c.private_key.map(|k| k.public_key()),
            Some(key.public_key())
        );
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.peers, vec![PeerChange::Add(peer(1))]);
    }
}
