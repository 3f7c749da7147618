//! Running a command to completion.

use std::io;
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
