//! The wgmesh testbed as a library: the pieces the `wgmesh-testbed` binary and the
//! integration tests share.
//!
//! - [`api`]: an in-memory Kubernetes API server for Nodes and Events, for tests only.
//! - [`bed`]: the network-namespace testbed (topology, state file, cleanup, checks).
//! - [`control_plane`]: a real etcd + kube-apiserver + kube-controller-manager for
//!   the tests and `up --control-plane real`.

pub mod api;
pub mod bed;
pub mod control_plane;
