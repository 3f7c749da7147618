//! The testbed end to end through its binary: `up --nodes 3 --pods 1`, `check`,
//! `drill --only bad-annotations`, `down`, then nothing of it is left; and the same
//! without spec.podCIDRs (`up --no-spec-pod-cidrs`, `check`, `drill --only
//! cidr-overlap`); and an `up` interrupted half-way cleans up after itself.
//! The tests run one at a time (two testbeds at once on a small machine
//! would make their timings each other's). Needs root,
//! /dev/net/tun, iproute2, ping and tcpdump; without them it prints SKIP, except
//! under CI=true where it fails.

use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wgmesh-testbed");

/// One testbed at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// False (after a SKIP line; a failure under CI=true) when `test` cannot run here.
fn may_run(test: &str) -> bool {
    use testkit::prereq::{missing, Need};
    let needs = [
        Need::Root,
        Need::Tun,
        Need::Tool("ip"),
        Need::Tool("ping"),
        Need::Tool("tcpdump"),
    ];
    match missing(&needs) {
        None => true,
        Some(why) => {
            testkit::prereq::skip_or_fail(test, &why);
            false
        }
    }
}

/// The wgmesh binary (`WGMESH_BIN`, or built now: it belongs to another package).
fn wgmesh_bin() -> PathBuf {
    testkit::cmd::workspace_bin("wgmesh", "wgmesh", "WGMESH_BIN").unwrap_or_else(|e| panic!("{e}"))
}

/// The lock that runs testbeds one at a time and a fresh state root; `None`
/// (after a SKIP line, or a failure under CI=true) when `test` cannot run.
/// Bound as `(_serial, guard)`, the guard's `down --all` runs before the lock
/// is released.
fn begin(test: &str) -> Option<(std::sync::MutexGuard<'static, ()>, Guard)> {
    if !may_run(test) {
        return None;
    }
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((
        serial,
        Guard {
            state_root: tempfile::tempdir().unwrap(),
            wgmesh: wgmesh_bin(),
        },
    ))
}

/// Runs `down --all` in the test's own state root whatever happens.
struct Guard {
    state_root: tempfile::TempDir,
    wgmesh: PathBuf,
}

impl Guard {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(BIN)
            .args(args)
            .env("WGMESH_TESTBED_STATE_DIR", self.state_root.path())
            .env("WGMESH_BIN", &self.wgmesh)
            .env_remove("WGMESH_TESTBED_ID")
            .output()
            .expect("wgmesh-testbed runs");
        eprintln!(
            "$ wgmesh-testbed {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.run(&["down", "--all"]);
    }
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn up_check_down_leaves_nothing_behind() {
    let Some((_serial, guard)) = begin("testbed_cli") else {
        return;
    };
    let up = guard.run(&["up", "--nodes", "3", "--pods", "1"]);
    assert!(up.status.success(), "up failed");
    let ids: Vec<String> = std::fs::read_dir(guard.state_root.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert_eq!(ids.len(), 1, "one testbed expected: {ids:?}");
    let prefix = format!("wgtb-{}-", ids[0]);
    // underlay + 3 nodes + 3 pods
    assert_eq!(namespaces_with(&prefix).len(), 7);

    let check = guard.run(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "check failed:\n{text}");
    assert!(text.contains("PASS capture-ciphertext-only"), "{text}");
    for class in [
        "pod-pod-ipv4",
        "pod-node-ipv4",
        "node-pod-ipv4",
        "pod-hostnet-tcp-ipv4",
        "hostnet-pod-tcp-ipv4",
    ] {
        assert!(
            text.contains(&format!("PASS class {class}")),
            "{class}:\n{text}"
        );
    }

    // The cheapest drill (about 25 s): one bad Node per rejected kind of value.
    let drill = guard.run(&["drill", "--only", "bad-annotations"]);
    let text = String::from_utf8_lossy(&drill.stdout);
    assert!(drill.status.success(), "drill failed:\n{text}");
    assert!(text.contains("PASS drill bad-annotations"), "{text}");

    let down = guard.run(&["down"]);
    assert!(down.status.success(), "down failed");
    assert!(
        namespaces_with(&prefix).is_empty(),
        "namespaces left: {:?}",
        namespaces_with(&prefix)
    );
    assert!(!guard.state_root.path().join(&ids[0]).exists());
    // Idempotent.
    assert!(guard.run(&["down", "--id", &ids[0]]).status.success());
}

#[test]
fn without_spec_pod_cidrs_check_passes_and_the_older_node_wins_an_overlap() {
    let Some((_serial, guard)) = begin("testbed_cli no-spec-pod-cidrs") else {
        return;
    };
    let up = guard.run(&["up", "--nodes", "3", "--pods", "1", "--no-spec-pod-cidrs"]);
    assert!(up.status.success(), "up failed");
    let status = guard.run(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("no spec.podCIDRs"), "{text}");
    assert!(text.contains("pod CIDRs 10.244.1.0/24"), "{text}");

    let check = guard.run(&["check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "check failed:\n{text}");
    assert!(text.contains("PASS class pod-pod-ipv4"), "{text}");

    let drill = guard.run(&["drill", "--only", "cidr-overlap"]);
    let text = String::from_utf8_lossy(&drill.stdout);
    assert!(drill.status.success(), "drill failed:\n{text}");
    assert!(text.contains("PASS drill cidr-overlap"), "{text}");
    assert!(guard.run(&["down"]).status.success(), "down failed");
}

/// Ctrl-C in the middle of `up` (after its second node started): `up` stops,
/// says so, exits 130 and removes what it built, processes and namespaces.
#[test]
fn an_interrupted_up_cleans_up_after_itself() {
    use std::io::{BufRead, BufReader};
    let Some((_serial, guard)) = begin("testbed_cli interrupted up") else {
        return;
    };
    let mut child = Command::new(BIN)
        .args(["up", "--nodes", "3", "--pods", "1"])
        .env("WGMESH_TESTBED_STATE_DIR", guard.state_root.path())
        .env("WGMESH_BIN", &guard.wgmesh)
        .env_remove("WGMESH_TESTBED_ID")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wgmesh-testbed runs");
    let stdout = child.stdout.take().unwrap();
    let mut id = None;
    let mut seen = Vec::new();
    let mut signalled = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        seen.push(line.clone());
        // "[  0.0s] testbed 3f2a (state /…/state.json)"
        if let Some(rest) = line.split("] testbed ").nth(1) {
            id = rest.split_whitespace().next().map(str::to_string);
        }
        // Reading on to the end: a closed pipe would fail up's own output.
        if line.contains("] node n2:") && !signalled {
            testkit::process::signal(child.id(), testkit::Signal::INT);
            signalled = true;
        }
    }
    assert!(signalled, "up never started n2");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}\n{stderr}", seen.join("\n"));
    let id = id.expect("up printed its testbed id");
    assert_eq!(
        out.status.code(),
        Some(130),
        "exit status of an interrupted up"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(
        stderr.contains(&format!("cleaning up testbed {id}")),
        "{stderr}"
    );
    let prefix = format!("wgtb-{id}-");
    assert!(
        namespaces_with(&prefix).is_empty(),
        "namespaces left: {:?}",
        namespaces_with(&prefix)
    );
    assert!(!guard.state_root.path().join(&id).exists());
}
