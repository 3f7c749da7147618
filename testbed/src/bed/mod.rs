//! The network-namespace testbed: N nodes with pods on one Linux host, each node
//! running the real `wgmesh dataplane` and `wgmesh agent` processes against the
//! testbed's Kubernetes API, on an underlay bridge of its own.
//!
//! Everything a testbed creates is named with the prefix `wgtb-<id>-` and recorded in
//! its state file *before* it is created ([`state`]), so [`teardown`] removes it all
//! after a failure, a Ctrl-C or a `kill -9` of the process that was building it.

pub mod capture;
pub mod check;
pub mod drill;
mod fabric;
mod gateway;
mod hostile;
pub mod rotate;
pub mod state;
pub mod sys;
pub mod topology;
pub mod traffic;

pub use state::{State, StateError};
pub use topology::{teardown, NodeOptions, Options, Testbed};

/// What can go wrong while building, checking or tearing down a testbed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Command(#[from] testkit::CmdError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("interrupted")]
    Interrupted,
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
