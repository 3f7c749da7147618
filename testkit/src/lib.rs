//! What wgmesh's root tests and its testbed share, in one place: the rule for
//! a missing prerequisite ([`prereq`]), network namespaces ([`netns`]),
//! processes ([`process`]) and running a command ([`cmd`]).
//!
//! Users: the namespace and VM tests under `tests/` and `testbed/tests/`,
//! and the testbed itself (`testbed/src/bed/sys.rs` keeps only what is the
//! testbed's own: its HTTP client, UAPI reads and the Ctrl-C flag). Nothing
//! here knows about WireGuard or Kubernetes.
//!
//! No `unsafe`: setns, geteuid and kill go through rustix.

#![forbid(unsafe_code)]

pub mod cmd;
pub mod netns;
pub mod prereq;
pub mod process;

pub use cmd::CmdError;
pub use process::Signal;
