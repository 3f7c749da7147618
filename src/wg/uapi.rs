//! [`Backend`] over the cross-platform UAPI socket: works with wgmesh's data
//! plane, wireguard-go and boringtun-cli alike. A change set is one `set=1`
//! request, so the device applies all of it or (with wgmesh's data plane)
//! none of it.
//!
//! wgmesh's data plane answers `get` with `wgmesh_version=` (and the other
//! `wgmesh_` keys of docs/dataplane.md); no other implementation does, which
//! is how [`Backend::capabilities`] tells them apart. Until a `get` has shown
//! the key, and for every device that never shows it, no `wgmesh_` key is
//! ever written to the socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    restrict, Backend, Capabilities, ChangeSet, DeviceState, PeerStats, Result, SessionInfo,
    WgError,
};
use crate::mesh::{PeerChange, PeerConfig};
use crate::uapi::{self, PeerUpdate, SetRequest};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A UAPI socket, e.g. `/var/run/wireguard/wgmesh0.sock`.
#[derive(Debug, Clone)]
pub struct UapiBackend {
    path: PathBuf,
    /// What the last successful `get` showed; none before the first.
    caps: Capabilities,
}

impl UapiBackend {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            caps: Capabilities::default(),
        }
    }

    /// The socket of `interface` in `dir`.
    pub fn for_interface(dir: &Path, interface: &str) -> Self {
        Self::new(dir.join(format!("{interface}.sock")))
    }

    fn get(&mut self) -> Result<uapi::DeviceSnapshot> {
        let text = self.exchange(uapi::format_get_request())?;
        let snap = uapi::parse_get_response(&text).map_err(|source| WgError::Protocol {
            path: self.path.display().to_string(),
            source,
        })?;
        // Re-learnt at every get: another implementation may have taken the
        // socket over since.
        self.caps = if snap.wgmesh_version.is_some() {
            Capabilities::WGMESH
        } else {
            Capabilities::default()
        };
        Ok(snap)
    }

    fn exchange(&self, request: &str) -> Result<String> {
        let path = self.path.display().to_string();
        let io = |source| WgError::Io {
            path: path.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.path).map_err(|source| WgError::Connect {
            path: path.clone(),
            source,
        })?;
        s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        s.write_all(request.as_bytes()).map_err(io)?;
        let mut out = Vec::new();
        // A `get` of thousands of peers is megabytes: few reads, each byte
        // framed once.
        let mut buf = vec![0u8; 64 * 1024];
        let mut framer = uapi::Framer::default();
        while framer.message_len(&out).is_none() {
            let n = s.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).map_err(|e| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.utf8_error(),
            ))
        })
    }
}

impl Backend for UapiBackend {
    fn describe(&self) -> String {
        format!("uapi {}", self.path.display())
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn peer_stats(&mut self) -> Result<Vec<PeerStats>> {
        let snap = self.get()?;
        Ok(snap
            .peers
            .into_iter()
            .map(|p| PeerStats {
                public_key: p.public_key,
                endpoint: p.endpoint,
                last_handshake: p
                    .last_handshake
                    .map(|(s, ns)| std::time::UNIX_EPOCH + std::time::Duration::new(s, ns)),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            })
            .collect())
    }

    fn state(&mut self) -> Result<DeviceState> {
        let snap = self.get()?;
        let mut sessions = Vec::new();
        for p in &snap.peers {
            for s in &p.sessions {
                let (secs, nsecs) = s.established;
                sessions.push(SessionInfo {
                    peer: p.public_key,
                    local: s.local,
                    remote: s.remote,
                    established: std::time::UNIX_EPOCH + std::time::Duration::new(secs, nsecs),
                });
            }
        }
        Ok(DeviceState {
            public_key: snap.private_key.as_ref().map(|k| k.public_key()),
            listen_port: snap.listen_port,
            fwmark: snap.fwmark,
            extra_identity: snap.extra_identity,
            sessions,
            peers: snap
                .peers
                .into_iter()
                .map(|p| {
                    let mut c = PeerConfig {
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips,
                        persistent_keepalive: Some(p.persistent_keepalive_interval),
                        successor: p.successor,
                    };
                    c.normalize();
                    c
                })
                .collect(),
        })
    }

    fn apply(&mut self, changes: &ChangeSet) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let request = set_request(changes, self.caps);
        let text = self.exchange(&uapi::format_set(&request))?;
        uapi::parse_errno_response(&text).map_err(|source| WgError::Protocol {
            path: self.path.display().to_string(),
            source,
        })
    }
}

/// The `set=1` request for a change set, on a device with `caps`: whatever
/// `caps` does not allow is left out (see [`restrict`]), so a foreign
/// implementation never sees a `wgmesh_` key. Sections keep the change set's
/// order: a hand-over's add section comes before its remove section.
pub fn set_request(changes: &ChangeSet, caps: Capabilities) -> SetRequest {
    let changes = restrict(changes, caps);
    SetRequest {
        private_key: changes.private_key.clone().map(Some),
        extra_identity: changes.extra_identity.clone(),
        listen_port: changes.listen_port,
        fwmark: changes.fwmark,
        replace_peers: false,
        peers: changes.peers.iter().map(peer_update).collect(),
    }
}

fn peer_update(change: &PeerChange) -> PeerUpdate {
    match change {
        PeerChange::Remove(key) => PeerUpdate::remove(*key),
        PeerChange::Add(p) => {
            let mut u = PeerUpdate::new(p.public_key);
            u.endpoint = p.endpoint;
            u.persistent_keepalive_interval = Some(p.persistent_keepalive.unwrap_or(0));
            u.replace_allowed_ips = true;
            u.allowed_ips = p.allowed_ips.clone();
            u.successor = p.successor.map(Some);
            u
        }
        PeerChange::Update {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
            successor,
        } => {
            let mut u = PeerUpdate::new(*public_key);
            u.update_only = true;
            u.endpoint = *endpoint;
            u.persistent_keepalive_interval = persistent_keepalive.map(|k| k.unwrap_or(0));
            if let Some(ips) = allowed_ips {
                u.replace_allowed_ips = true;
                u.allowed_ips = ips.clone();
            }
            u.successor = *successor;
            u
        }
        // One section: the rename first, then `to`'s fields on the renamed
        // peer (update-only, so a peer that is already gone is not recreated
        // under the old key).
        PeerChange::Promote { from, to } => {
            let mut u = PeerUpdate::new(*from);
            u.update_only = true;
            u.promote_successor = true;
            u.endpoint = to.endpoint;
            u.persistent_keepalive_interval = Some(to.persistent_keepalive.unwrap_or(0));
            u.replace_allowed_ips = true;
            u.allowed_ips = to.allowed_ips.clone();
            // Only a new successor: an empty value would also drop the
            // sessions the promote keeps under the old key.
            u.successor = to.successor.map(Some);
            u
        }
    }
}
