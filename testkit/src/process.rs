//! Processes a test or the testbed started: signals, a bounded stop, and
//! telling a live process from a recycled pid.

use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

/// Sends `sig` to `pid`, a process the caller started (or one inside a
/// namespace it created). Errors (ESRCH: it exited already; a pid that does
/// not fit) are ignored: every caller is a best-effort stop or fault.
pub fn signal(pid: u32, sig: Signal) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process(pid, sig);
}

/// SIGTERM, then up to `timeout` for `child` to exit, then SIGKILL (and
/// reaped either way). True when it exited on SIGTERM (or had already).
pub fn stop(child: &mut Child, timeout: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    signal(child.id(), Signal::TERM);
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

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), if alive.
pub fn start_time(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields restart after its ')'.
    let rest = text.get(text.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is alive, not a zombie, and (given `start`) still the process
/// that started at that time rather than a later one with a recycled pid.
pub fn alive(pid: u32, start: Option<u64>) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = text
        .rfind(')')
        .and_then(|i| text.get(i + 2..))
        .and_then(|s| s.chars().next())
        .unwrap_or('?');
    state != 'Z' && (start.is_none() || start_time(pid) == start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn stop_ends_a_child_and_alive_follows_it() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let start = start_time(child.id());
        assert!(start.is_some());
        assert!(alive(child.id(), start));
        assert!(
            !alive(child.id(), start.map(|s| s + 1)),
            "another start time"
        );
        assert!(
            stop(&mut child, Duration::from_secs(5)),
            "sleep ends on SIGTERM"
        );
        assert!(!alive(child.id(), start));
        assert!(
            stop(&mut child, Duration::from_secs(5)),
            "stopping twice is fine"
        );
    }

    #[test]
    fn stop_kills_what_ignores_sigterm() {
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        // Wait until SIGTERM is ignored (SigIgn bit 15 in /proc/PID/status):
        // a SIGTERM before that would end it and prove nothing.
        let ignores_term = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("SigIgn:"))?;
                    u64::from_str_radix(line["SigIgn:".len()..].trim(), 16).ok()
                })
                .is_some_and(|mask| mask & (1 << 14) != 0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ignores_term(child.id()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(ignores_term(child.id()), "the shell never ignored SIGTERM");
        assert!(!stop(&mut child, Duration::from_millis(300)));
        assert!(child.try_wait().unwrap().is_some(), "reaped after SIGKILL");
    }
}
