//! An in-memory [`Backend`]: a device that is only a peer table. For tests of
//! everything above the seam (the agent), and for dry runs.
//!
//! It models the wgmesh extensions (extra identity, successors, promotes) as
//! the data plane applies them, and by default claims both capabilities;
//! [`MemoryBackend::with_capabilities`] makes it stand in for a kernel or
//! foreign UAPI device instead, which then ignores every extension change
//! (as [`super::restrict`] does for those backends).

use std::sync::{Arc, Mutex};

use super::{restrict, Backend, Capabilities, ChangeSet, DeviceState, Result};
use crate::mesh::apply;

/// A shared in-memory device; clones see the same state.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    inner: Arc<Mutex<Inner>>,
    caps: Capabilities,
}

#[derive(Debug, Default)]
struct Inner {
    state: DeviceState,
    applies: usize,
    last: Option<ChangeSet>,
    stats: Vec<super::PeerStats>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::with_capabilities(Capabilities::WGMESH)
    }
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// A device that supports only what `caps` says.
    pub fn with_capabilities(caps: Capabilities) -> Self {
        Self {
            inner: Arc::default(),
            caps,
        }
    }

    /// How many non-empty change sets were applied.
    pub fn applies(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.applies)
    }

    /// The last non-empty change set, as the device received it (after
    /// [`super::restrict`]).
    pub fn last_change_set(&self) -> Option<ChangeSet> {
        self.inner.lock().ok().and_then(|i| i.last.clone())
    }

    /// Records a completed handshake, as a real device would report it:
    /// how tests give the rotation driver its evidence.
    pub fn add_session(&self, session: super::SessionInfo) {
        if let Ok(mut i) = self.inner.lock() {
            i.state
                .sessions
                .retain(|s| (s.local, s.remote) != (session.local, session.remote));
            i.state.sessions.push(session);
        }
    }

    /// What [`Backend::peer_stats`] reports from now on (handshake times and
    /// counters, as a real device would show them).
    pub fn set_peer_stats(&self, stats: Vec<super::PeerStats>) {
        if let Ok(mut i) = self.inner.lock() {
            i.stats = stats;
        }
    }

    pub fn snapshot(&self) -> DeviceState {
        self.inner
            .lock()
            .map(|i| i.state.clone())
            .unwrap_or_default()
    }
}

impl Backend for MemoryBackend {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn state(&mut self) -> Result<DeviceState> {
        Ok(self.snapshot())
    }

    fn peer_stats(&mut self) -> Result<Vec<super::PeerStats>> {
        Ok(self
            .inner
            .lock()
            .map(|i| i.stats.clone())
            .unwrap_or_default())
    }

    fn apply(&mut self, changes: &ChangeSet) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let changes = restrict(changes, self.caps);
        if let Ok(mut inner) = self.inner.lock() {
            let active = changes
                .private_key
                .as_ref()
                .map(|k| k.public_key())
                .or(inner.state.public_key);
            if let Some(k) = &changes.private_key {
                inner.state.public_key = Some(k.public_key());
            }
            if let Some(extra) = &changes.extra_identity {
                inner.state.extra_identity = extra.as_ref().map(|(k, r)| (k.public_key(), *r));
            }
            // As on the data plane: an extra identity equal to the active
            // key is no extra identity.
            if inner.state.extra_identity.map(|(k, _)| k) == active {
                inner.state.extra_identity = None;
            }
            if let Some(p) = changes.listen_port {
                inner.state.listen_port = p;
            }
            if let Some(mark) = changes.fwmark {
                inner.state.fwmark = mark;
            }
            inner.state.peers = apply(&inner.state.peers, &changes.peers);
            inner.applies += 1;
            inner.last = Some(changes);
        }
        Ok(())
    }
}
