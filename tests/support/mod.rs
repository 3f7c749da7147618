//! What the root network-namespace tests share (`mod support;` in
//! tests/net_routes.rs, tests/netns_interop.rs, tests/dataplane_uapi.rs):
//! the prerequisite rule, namespaces, entering one, and stopping processes.
//!
//! The rule for a missing prerequisite (root, `ip`, /dev/net/tun, a peer
//! implementation): under `CI=true` (or `CI=1`) the test fails, because a CI
//! run that skipped it proves nothing; elsewhere it prints one `SKIP <name>:
//! missing <what>` line, which `scripts/test` counts as skipped, and returns.

// Each test crate that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

// Not every including test crate signals (see the allow above).
#[allow(unused_imports)]
pub use libc::{SIGKILL, SIGTERM};

/// True when running under CI (`CI=true` or `CI=1`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Applies the prerequisite rule for test `name` missing `missing`: panics
/// under CI, else prints the SKIP line. The caller returns afterwards.
pub fn skip_or_fail(name: &str, missing: &str) {
    if ci() {
        panic!("{name}: CI=true and network-namespace prerequisites are missing: {missing}");
    }
    // Straight to fd 2: libtest captures eprintln! of passing tests, and the
    // line must reach scripts/test's summary.
    let _ = writeln!(
        io::stderr(),
        "SKIP {name}: missing {missing} (with CI=true this fails)"
    );
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether iproute2's `ip` runs.
pub fn has_ip() -> bool {
    Command::new("ip").arg("-V").output().is_ok()
}

/// `cmd` on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// Sends `sig` to `pid`, a process this test started (or one inside a
/// namespace it created). An error (ESRCH: it exited already) is ignored.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGTERM, then up to `timeout` for `child` to exit, then SIGKILL. True when
/// it exited on SIGTERM (or had already).
pub fn stop(child: &mut Child, timeout: Duration) -> bool {
    signal(child.id(), SIGTERM);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// `ip netns add name`; Err with iproute2's complaint.
pub fn netns_add(name: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "add", name])
        .output()
        .map_err(|e| format!("ip netns add {name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip netns del name`, best effort (cleanup paths call it).
pub fn netns_del(name: &str) {
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// `ip -n ns <args>` (split on whitespace): Ok(stdout), or Err naming the
/// command and iproute2's complaint.
pub fn ip_in(ns: &str, args: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("ip -n {ns} {args}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip -n {ns} {args}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The file `ip netns add` creates for `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Moves the calling thread (only it: sockets keep the namespace they were
/// created in) into the network namespace `name`.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let path = netns_path(name);
    let file = File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    // SAFETY: the fd is an open namespace file that outlives the call; setns
    // affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
