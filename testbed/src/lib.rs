//! The wgmesh testbed as a library: the pieces the `wgmesh-testbed` binary and the
//! integration tests share.
//!
//! - [`api`]: an in-memory Kubernetes API server for Nodes and Events, for tests only.
//! - [`bed`]: the network-namespace testbed (topology, state file, cleanup, checks).

pub mod api;
pub mod bed;
