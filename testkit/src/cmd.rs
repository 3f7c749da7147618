//! Running a command to completion.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A command that could not be started or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

/// Runs `args[0]` with the rest as its arguments; its stdout on success, else
/// the command line and its stderr. An empty `args` is a spawn error.
pub fn run(args: &[&str]) -> Result<String, CmdError> {
    let Some((program, rest)) = args.split_first() else {
        return Err(CmdError::Spawn {
            program: String::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty command line"),
        });
    };
    let out = Command::new(program)
        .args(rest)
        .output()
        .map_err(|source| CmdError::Spawn {
            program: (*program).to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CmdError::Failed {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Binary `bin` of package `package` of this workspace, for the tests of
/// another package (Cargo names only a package's own binaries in
/// `CARGO_BIN_EXE_*`): the path in environment variable `env_override` if it
/// is set, else built now (`cargo build -p PACKAGE --bin BIN`, quick when it is
/// up to date) into the profile directory of the running test executable.
pub fn workspace_bin(package: &str, bin: &str, env_override: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_override) {
        return Ok(p.into());
    }
    // testkit/ sits at the workspace root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("testkit has no parent directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build -p {package} --bin {bin}` failed ({status}); or set {env_override}"
        ));
    }
    // target/<profile>/deps/<test> -> target/<profile>/<bin>
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(bin))
        .ok_or_else(|| format!("{} is not under target/<profile>/deps", exe.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_on_success_and_stderr_on_failure() {
        assert_eq!(run(&["sh", "-c", "echo hi"]).unwrap(), "hi\n");
        let err = run(&["sh", "-c", "echo bad >&2; exit 3"]).unwrap_err();
        assert_eq!(err.to_string(), "`sh -c echo bad >&2; exit 3` failed: bad");
        let err = run(&["/nonexistent/tool"]).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot run /nonexistent/tool: "));
        assert!(run(&[]).is_err());
    }
}
