//! wgmesh: a Kubernetes node agent that encrypts pod traffic between nodes with a
//! full mesh of WireGuard tunnels.
//!
//! The pure core lives in [`keys`], [`node`] and [`mesh`]: no I/O beyond the key
//! store's own files, everything tested in memory. See `../shared/DESIGN.md` and
//! `docs/architecture.md` for the process model.

// Every system call goes through a safe wrapper (rustix, socket2, tun-rs,
// quinn-udp); the crate itself has no unsafe code.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cni;
pub mod commands;
pub mod dataplane;
pub mod k8s;
pub mod keys;
pub mod mesh;
pub mod net;
pub mod node;
pub mod routes;
pub mod status;
pub mod telemetry;
pub mod text;
pub mod uapi;
pub mod wg;

/// The annotation prefix wgmesh owns on Node objects.
pub const ANNOTATION_PREFIX: &str = "wgmesh.dev/";

/// The version string printed by `wgmesh version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
