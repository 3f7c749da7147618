//! The WireGuard backend seam: one trait, [`Backend`], through which the agent
//! reads a device's state and applies a change set, whatever implements the
//! device. Three implementations:
//! - [`uapi::UapiBackend`] drives any implementation that serves the
//!   cross-platform UAPI socket (wgmesh's own data plane, wireguard-go,
//!   boringtun-cli);
//! - [`kernel::KernelBackend`] drives kernel WireGuard over rtnetlink and the
//!   WireGuard generic netlink family; [`kernel::select_backend`] picks one of
//!   the two by `--backend` (`auto`: a UAPI socket that serves the interface,
//!   else kernel WireGuard where the host has it, else the UAPI socket);
//! - [`memory::MemoryBackend`], an in-memory device for tests.
//!
//! [`reconcile`] is the pure step in between: desired peers (from the
//! planner) against the device's state → the minimal [`ChangeSet`]; an empty
//! change set means the agent writes nothing.
//!
//! # Key rotation
//! Two mechanisms, chosen by [`Backend::capabilities`] (see
//! docs/dataplane.md and the rotation notes):
//! - **Dual identity + successors** (wgmesh's own data plane, option O4): the
//!   rotating node holds its next key as an extra local identity
//!   ([`LocalDevice::extra`], [`ExtraRole`]); each peer's device pre-accepts
//!   it as the successor of the current key ([`PeerConfig::successor`]) and
//!   later renames the peer to it ([`PeerChange::Promote`]), keeping every
//!   session.
//! - **Everything else** (kernel, wireguard-go, boringtun-cli; option O1):
//!   no extension ever reaches the device. A node's key change is an add of
//!   the new key with the allowed IPs, then the removal of the old key, in
//!   one change set, so the prefixes move atomically ([`crate::mesh::diff`]).

pub mod kernel;
pub mod memory;
pub mod uapi;

use std::time::SystemTime;

use crate::keys::{PrivateKey, PublicKey};
use crate::mesh::{diff, PeerChange, PeerConfig};

pub use crate::uapi::ExtraRole;

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
        source: crate::uapi::ProtoError,
    },
}

/// What the agent needs to know of a device.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    /// The mark (`SO_MARK`) on the device's UDP packets; 0 is none.
    pub fwmark: u32,
    pub peers: Vec<PeerConfig>,
    /// The extra local identity (public half) and its role; always `None` on
    /// a backend without [`Capabilities::dual_identity`].
    pub extra_identity: Option<(PublicKey, ExtraRole)>,
    /// Every established, still valid session; empty where the backend
    /// cannot tell (kernel, foreign UAPI).
    pub sessions: Vec<SessionInfo>,
}

/// One established session of a device: the cryptographic evidence that a
/// handshake under a given pair of static keys completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// The device's peer entry the session belongs to.
    pub peer: PublicKey,
    /// The local identity it runs under (the active key or the extra one).
    pub local: PublicKey,
    /// The remote static key it was made with: `peer`, or that peer's
    /// successor (or, after a promote, its predecessor).
    pub remote: PublicKey,
    /// When its (latest) handshake completed.
    pub established: SystemTime,
}

/// What a backend's device can do beyond standard WireGuard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// An extra local identity ([`ChangeSet::extra_identity`]).
    pub dual_identity: bool,
    /// Successor keys on peers and [`PeerChange::Promote`].
    pub successors: bool,
}

impl Capabilities {
    /// wgmesh's own data plane.
    pub const WGMESH: Capabilities = Capabilities {
        dual_identity: true,
        successors: true,
    };
}

/// Changes to apply in one transaction.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    pub private_key: Option<PrivateKey>,
    /// `Some(None)` clears the extra identity. Applied together with
    /// `private_key`, so activating a staged key (active and extra swap)
    /// keeps the sessions of both.
    pub extra_identity: Option<Option<(PrivateKey, ExtraRole)>>,
    pub listen_port: Option<u16>,
    /// `Some(0)` clears the fwmark.
    pub fwmark: Option<u32>,
    pub peers: Vec<PeerChange>,
}

impl ChangeSet {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.extra_identity.is_none()
            && self.listen_port.is_none()
            && self.fwmark.is_none()
            && self.peers.is_empty()
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
    /// What the device supports beyond standard WireGuard. None by default
    /// (kernel, wireguard-go, boringtun-cli); the UAPI backend learns it
    /// from the device's `get` answer, so it is known after the first
    /// successful [`Backend::state`].
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// The local side the device must have.
#[derive(Debug, Clone)]
pub struct LocalDevice<'a> {
    pub private_key: &'a PrivateKey,
    pub listen_port: u16,
    /// The fwmark the device must have (`Some(0)`: none). `None` leaves
    /// the device's own alone, so one that an operator set (`wg set …
    /// fwmark`, for policy routing of the tunnel's UDP) survives every
    /// reconcile; the agent has no fwmark setting and passes `None`.
    pub fwmark: Option<u32>,
    /// The extra identity during a rotation: the staged next key
    /// ([`ExtraRole::Next`]) or, after activation, the old one
    /// ([`ExtraRole::Previous`]). Ignored on a backend without
    /// [`Capabilities::dual_identity`].
    pub extra: Option<(&'a PrivateKey, ExtraRole)>,
}

/// What to change so that `state` matches `local` and `desired`. Pure.
///
/// Extension changes (the extra identity, successors, promotes) appear only
/// when `caps` allows them: without [`Capabilities::dual_identity`] the extra
/// identity is left out, and without [`Capabilities::successors`] every
/// successor is stripped from both sides before the diff, so a node's key
/// change comes out as [`crate::mesh::diff`]'s hand-over (add the new key, then
/// remove the old one).
pub fn reconcile(
    state: &DeviceState,
    local: &LocalDevice<'_>,
    desired: &[PeerConfig],
    caps: Capabilities,
) -> ChangeSet {
    let key_ok = state.public_key == Some(local.private_key.public_key());
    let extra_identity = if caps.dual_identity {
        // An extra equal to the active key means none (the device drops it).
        let want = local
            .extra
            .filter(|(k, _)| k.public_key() != local.private_key.public_key());
        let want_public = want.map(|(k, role)| (k.public_key(), role));
        (state.extra_identity != want_public).then(|| want.map(|(k, role)| (k.clone(), role)))
    } else {
        None
    };
    let peers = if caps.successors {
        diff(&state.peers, desired)
    } else {
        diff(
            &without_successors(&state.peers),
            &without_successors(desired),
        )
    };
    ChangeSet {
        private_key: (!key_ok).then(|| local.private_key.clone()),
        extra_identity,
        listen_port: (state.listen_port != local.listen_port).then_some(local.listen_port),
        fwmark: local.fwmark.filter(|mark| *mark != state.fwmark),
        peers,
    }
}

/// Removes what `caps` does not allow from a change set: the defence in depth
/// every backend applies before writing, so a hand-built change set cannot
/// send a wgmesh-only key to a device that does not know it. A promote
/// becomes the hand-over it replaces (add the new key, remove the old one).
pub fn restrict(changes: &ChangeSet, caps: Capabilities) -> ChangeSet {
    let mut out = changes.clone();
    if !caps.dual_identity {
        out.extra_identity = None;
    }
    if !caps.successors {
        let mut peers = Vec::with_capacity(out.peers.len());
        let mut removes = Vec::new();
        for change in out.peers {
            match change {
                PeerChange::Promote { from, mut to } => {
                    to.successor = None;
                    peers.push(PeerChange::Add(to));
                    removes.push(PeerChange::Remove(from));
                }
                PeerChange::Add(mut p) => {
                    p.successor = None;
                    peers.push(PeerChange::Add(p));
                }
                PeerChange::Update {
                    public_key,
                    endpoint,
                    allowed_ips,
                    persistent_keepalive,
                    successor: _,
                } => {
                    if endpoint.is_some() || allowed_ips.is_some() || persistent_keepalive.is_some()
                    {
                        peers.push(PeerChange::Update {
                            public_key,
                            endpoint,
                            allowed_ips,
                            persistent_keepalive,
                            successor: None,
                        });
                    }
                }
                remove @ PeerChange::Remove(_) => peers.push(remove),
            }
        }
        peers.extend(removes);
        out.peers = peers;
    }
    out
}

fn without_successors(peers: &[PeerConfig]) -> Vec<PeerConfig> {
    peers
        .iter()
        .map(|p| PeerConfig {
            successor: None,
            ..p.clone()
        })
        .collect()
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
            successor: None,
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
            ..DeviceState::default()
        };
        let local = LocalDevice {
            private_key: &key,
            listen_port: 51820,
            fwmark: None,
            extra: None,
        };
        assert!(reconcile(&state, &local, &desired, Capabilities::WGMESH).is_empty());
    }

    #[test]
    fn a_fresh_device_gets_key_port_and_peers() {
        let key = PrivateKey::generate();
        let desired = vec![peer(1)];
        let local = LocalDevice {
            private_key: &key,
            listen_port: 51820,
            fwmark: None,
            extra: None,
        };
        let c = reconcile(
            &DeviceState::default(),
            &local,
            &desired,
            Capabilities::WGMESH,
        );
        assert_eq!(
            c.private_key.map(|k| k.public_key()),
            Some(key.public_key())
        );
        assert_eq!(c.listen_port, Some(51820));
        assert_eq!(c.peers, vec![PeerChange::Add(peer(1))]);
    }

    /// The fwmark is written only when the local side asks for one that
    /// differs; `None` leaves the device's own (an operator's) alone.
    #[test]
    fn the_fwmark_is_managed_only_when_asked() {
        let key = PrivateKey::generate();
        let state = DeviceState {
            public_key: Some(key.public_key()),
            listen_port: 51820,
            fwmark: 0x2a,
            peers: vec![peer(1)],
            ..DeviceState::default()
        };
        let local = |fwmark| LocalDevice {
            private_key: &key,
            listen_port: 51820,
            fwmark,
            extra: None,
        };
        let caps = Capabilities::default();
        assert!(reconcile(&state, &local(None), &[peer(1)], caps).is_empty());
        assert!(reconcile(&state, &local(Some(0x2a)), &[peer(1)], caps).is_empty());
        for mark in [7, 0] {
            let c = reconcile(&state, &local(Some(mark)), &[peer(1)], caps);
            assert_eq!(c.fwmark, Some(mark));
            assert!(!c.is_empty() && c.peers.is_empty() && c.listen_port.is_none());
            // Standard WireGuard: no capability strips it.
            assert_eq!(restrict(&c, caps).fwmark, Some(mark));
        }
        let mut backend = memory::MemoryBackend::new();
        let c = reconcile(&backend.state().unwrap(), &local(Some(9)), &[peer(1)], caps);
        backend.apply(&c).unwrap();
        assert_eq!(backend.state().unwrap().fwmark, 9);
        let c = reconcile(&backend.state().unwrap(), &local(None), &[], caps);
        backend.apply(&c).unwrap();
        assert_eq!(
            backend.state().unwrap().fwmark,
            9,
            "kept across a peer removal"
        );
    }

    fn rotating(mut p: PeerConfig, successor: u8) -> PeerConfig {
        p.successor = Some(
            PrivateKey::from_bytes([successor; 32])
                .unwrap()
                .public_key(),
        );
        p
    }

    #[test]
    fn without_capabilities_no_extension_reaches_the_change_set() {
        let (key, next) = (PrivateKey::generate(), PrivateKey::generate());
        let state = DeviceState {
            public_key: Some(key.public_key()),
            listen_port: 51820,
            peers: vec![peer(1)],
            ..DeviceState::default()
        };
        let local = LocalDevice {
            private_key: &key,
            listen_port: 51820,
            fwmark: None,
            extra: Some((&next, ExtraRole::Next)),
        };
        let desired = vec![rotating(peer(1), 9)];
        let none = reconcile(&state, &local, &desired, Capabilities::default());
        assert!(none.is_empty(), "{none:?}");
        let full = reconcile(&state, &local, &desired, Capabilities::WGMESH);
        assert_eq!(
            full.extra_identity
                .as_ref()
                .map(|e| e.as_ref().map(|(k, r)| (k.public_key(), *r))),
            Some(Some((next.public_key(), ExtraRole::Next)))
        );
        assert_eq!(full.peers.len(), 1);
        assert!(matches!(
            full.peers[0],
            PeerChange::Update {
                successor: Some(Some(_)),
                ..
            }
        ));
        // And a hand-built change set is restricted as well.
        let r = restrict(&full, Capabilities::default());
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn activation_swaps_both_slots_in_one_change_set() {
        let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
        let state = DeviceState {
            public_key: Some(k1.public_key()),
            listen_port: 51820,
            extra_identity: Some((k2.public_key(), ExtraRole::Next)),
            ..DeviceState::default()
        };
        let local = LocalDevice {
            private_key: &k2,
            listen_port: 51820,
            fwmark: None,
            extra: Some((&k1, ExtraRole::Previous)),
        };
        let c = reconcile(&state, &local, &[], Capabilities::WGMESH);
        assert_eq!(c.private_key.map(|k| k.public_key()), Some(k2.public_key()));
        assert!(matches!(
            c.extra_identity,
            Some(Some((ref k, ExtraRole::Previous))) if k.public_key() == k1.public_key()
        ));
        // Grace over: only the extra identity is cleared.
        let after = DeviceState {
            public_key: Some(k2.public_key()),
            listen_port: 51820,
            extra_identity: Some((k1.public_key(), ExtraRole::Previous)),
            ..DeviceState::default()
        };
        let local = LocalDevice {
            extra: None,
            ..local
        };
        let c = reconcile(&after, &local, &[], Capabilities::WGMESH);
        assert!(c.private_key.is_none() && c.peers.is_empty());
        assert!(matches!(c.extra_identity, Some(None)));
    }

    #[test]
    fn a_key_change_is_a_promote_with_successors_and_a_hand_over_without() {
        let key = PrivateKey::generate();
        let local = LocalDevice {
            private_key: &key,
            listen_port: 51820,
            fwmark: None,
            extra: None,
        };
        let mut new = peer(9);
        new.allowed_ips = peer(1).allowed_ips;
        let staged = DeviceState {
            public_key: Some(key.public_key()),
            listen_port: 51820,
            peers: vec![rotating(peer(1), 9)],
            ..DeviceState::default()
        };
        let c = reconcile(&staged, &local, &[new.clone()], Capabilities::WGMESH);
        assert_eq!(
            c.peers,
            vec![PeerChange::Promote {
                from: peer(1).public_key,
                to: new.clone()
            }]
        );
        // Kernel / foreign UAPI: the successor never existed there; the new
        // key comes first with the allowed IPs, then the old key goes.
        let c = reconcile(&staged, &local, &[new.clone()], Capabilities::default());
        assert_eq!(
            c.peers,
            vec![
                PeerChange::Add(new.clone()),
                PeerChange::Remove(peer(1).public_key)
            ]
        );
        // A promote forced onto such a backend becomes the same hand-over.
        let promote = ChangeSet {
            peers: vec![PeerChange::Promote {
                from: peer(1).public_key,
                to: rotating(new.clone(), 3),
            }],
            ..ChangeSet::default()
        };
        assert_eq!(
            restrict(&promote, Capabilities::default()).peers,
            vec![PeerChange::Add(new), PeerChange::Remove(peer(1).public_key)]
        );
    }

    #[test]
    fn the_memory_backend_models_the_extensions_or_ignores_them() {
        let (k1, k2) = (PrivateKey::generate(), PrivateKey::generate());
        for caps in [Capabilities::WGMESH, Capabilities::default()] {
            let mut backend = memory::MemoryBackend::with_capabilities(caps);
            assert_eq!(backend.capabilities(), caps);
            let local = LocalDevice {
                private_key: &k1,
                listen_port: 51820,
                fwmark: None,
                extra: Some((&k2, ExtraRole::Next)),
            };
            let desired = vec![rotating(peer(1), 9)];
            let c = reconcile(&backend.state().unwrap(), &local, &desired, caps);
            backend.apply(&c).unwrap();
            let state = backend.state().unwrap();
            let resync = reconcile(&state, &local, &desired, caps);
            assert!(resync.is_empty(), "{caps:?}: {resync:?}");
            if caps.dual_identity {
                assert_eq!(
                    state.extra_identity,
                    Some((k2.public_key(), ExtraRole::Next))
                );
                assert_eq!(state.peers[0].successor, desired[0].successor);
            } else {
                assert_eq!(state.extra_identity, None);
                assert_eq!(state.peers[0].successor, None);
            }
        }
        assert_eq!(
            memory::MemoryBackend::new().capabilities(),
            Capabilities::WGMESH
        );
    }
}
