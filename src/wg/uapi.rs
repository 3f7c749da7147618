//! [`Backend`] over the cross-platform UAPI socket: works with wgmesh's data
//! plane, wireguard-go and boringtun-cli alike. A change set is one `set=1`
//! request, so the device applies all of it or (with wgmesh's data plane)
//! none of it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proto::{self, PeerUpdate, SetRequest};
use super::{Backend, ChangeSet, DeviceState, PeerStats, Result, WgError};
use crate::mesh::{PeerChange, PeerConfig};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A UAPI socket, e.g. `/var/run/wireguard/wgmesh0.sock`.
#[derive(Debug, Clone)]
pub struct UapiBackend {
    path: PathBuf,
}

impl UapiBackend {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The socket of `interface` in `dir`.
    pub fn for_interface(dir: &Path, interface: &str) -> Self {
        Self::new(dir.join(format!("{interface}.sock")))
    }

    fn get(&self) -> Result<proto::DeviceSnapshot> {
        let text = self.exchange(proto::format_get_request())?;
        proto::parse_get_response(&text).map_err(|source| WgError::Protocol {
            path: self.path.display().to_string(),
            source,
        })
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
        let mut buf = [0u8; 8192];
        while proto::message_len(&out).is_none() {
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
        Ok(DeviceState {
            public_key: snap.private_key.as_ref().map(|k| k.public_key()),
            listen_port: snap.listen_port,
            peers: snap
                .peers
                .into_iter()
                .map(|p| {
                    let mut c = PeerConfig {
                        public_key: p.public_key,
                        endpoint: p.endpoint,
                        allowed_ips: p.allowed_ips,
                        persistent_keepalive: Some(p.persistent_keepalive_interval),
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
        let request = set_request(changes);
        let text = self.exchange(&proto::format_set(&request))?;
        proto::parse_errno_response(&text).map_err(|source| WgError::Protocol {
            path: self.path.display().to_string(),
            source,
        })
    }
}

/// The `set=1` request for a change set.
pub fn set_request(changes: &ChangeSet) -> SetRequest {
    SetRequest {
        private_key: changes.private_key.clone().map(Some),
        listen_port: changes.listen_port,
        fwmark: None,
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
            u
        }
        PeerChange::Update {
            public_key,
            endpoint,
            allowed_ips,
            persistent_keepalive,
        } => {
            let mut u = PeerUpdate::new(*public_key);
            u.update_only = true;
            u.endpoint = *endpoint;
            u.persistent_keepalive_interval = persistent_keepalive.map(|k| k.unwrap_or(0));
            if let Some(ips) = allowed_ips {
                u.replace_allowed_ips = true;
                u.allowed_ips = ips.clone();
            }
            u
        }
    }
}
