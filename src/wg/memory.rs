//! An in-memory [`Backend`]: a device that is only a peer table. For tests of
//! everything above the seam (the agent), and for dry runs.

use std::sync::{Arc, Mutex};

use super::{Backend, ChangeSet, DeviceState, Result};
use crate::mesh::apply;

/// A shared in-memory device; clones see the same state.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    state: DeviceState,
    applies: usize,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many non-empty change sets were applied.
    pub fn applies(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.applies)
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

    fn state(&mut self) -> Result<DeviceState> {
        Ok(self.snapshot())
    }

    fn apply(&mut self, changes: &ChangeSet) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Ok(mut inner) = self.inner.lock() {
            if let Some(k) = &changes.private_key {
                inner.state.public_key = Some(k.public_key());
            }
            if let Some(p) = changes.listen_port {
                inner.state.listen_port = p;
            }
            inner.state.peers = apply(&inner.state.peers, &changes.peers);
            inner.applies += 1;
        }
        Ok(())
    }
}
