//! The rule for a missing prerequisite (root, /dev/net/tun, a tool on PATH):
//! under `CI=true` (or `CI=1`) the test fails, because a CI run that skipped
//! it proves nothing; elsewhere it prints one `SKIP <name>: <why>` line, which
//! `scripts/test` counts as skipped (never as passed), and returns.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// True when running under CI (`CI=true` or `CI=1`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Applies the rule for test `name`, which cannot run because of `why`:
/// panics under CI, else prints the SKIP line. The caller returns afterwards.
pub fn skip_or_fail(name: &str, why: &str) {
    if ci() {
        panic!("{name}: CI=true and a prerequisite is missing: {why}");
    }
    // Straight to fd 2: libtest captures eprintln! of passing tests, and the
    // line must reach scripts/test's summary.
    let _ = writeln!(io::stderr(), "SKIP {name}: {why} (with CI=true this fails)");
}

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `cmd` on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// One thing a test or the testbed needs from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need<'a> {
    Root,
    /// /dev/net/tun (the userspace data plane's TUN devices).
    Tun,
    /// A program on PATH.
    Tool(&'a str),
}

/// The first of `needs` this host lacks, worded for a SKIP line or an error
/// ("not root", "/dev/net/tun is missing", "`tcpdump` is not on PATH").
pub fn missing(needs: &[Need<'_>]) -> Option<String> {
    needs.iter().find_map(|need| match *need {
        Need::Root if !is_root() => Some("not root".to_string()),
        Need::Tun if !Path::new("/dev/net/tun").exists() => {
            Some("/dev/net/tun is missing".to_string())
        }
        Need::Tool(tool) if which(tool).is_none() => Some(format!("`{tool}` is not on PATH")),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_names_the_first_gap() {
        assert_eq!(missing(&[Need::Tool("sh")]), None);
        assert_eq!(
            missing(&[Need::Tool("sh"), Need::Tool("no-such-tool-wgmesh")]).as_deref(),
            Some("`no-such-tool-wgmesh` is not on PATH")
        );
        assert!(which("sh").is_some_and(|p| p.is_absolute()));
        assert_eq!(missing(&[Need::Root]).is_none(), is_root());
    }
}
