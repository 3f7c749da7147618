//! `wgmesh-testbed`: will run N wgmesh nodes with pods in network namespaces on one
//! Linux host. Only the package exists so far; the commands (`up`, `check`, `down`,
//! `demo`, ...) arrive with the testbed issue. Until then every invocation says so and
//! exits non-zero, so no script can mistake it for a working testbed.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wants_help = args.is_empty() || args.iter().any(|a| a == "--help" || a == "-h");
    let text = format!(
        "wgmesh-testbed {} (wgmesh {})\n\n\
         The network-namespace testbed is not built yet: `up`, `check`, `down`, `demo`\n\
         and the Node API arrive with the testbed issue. Nothing was started.\n",
        env!("CARGO_PKG_VERSION"),
        wgmesh::VERSION
    );
    if wants_help {
        print!("{text}");
    } else {
        eprint!("{text}");
    }
    ExitCode::from(2)
}
