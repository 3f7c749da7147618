//! What the `wgmesh` subcommands do once their arguments are parsed: the
//! binary (`main.rs`) parses, calls one function here and turns its result
//! into an exit code. Each function writes its report to the `out` and `err`
//! writers it is given (stdout and stderr in the binary), so the formatting is
//! testable without running a process.

pub mod keys;
pub mod status;
