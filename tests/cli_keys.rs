//! The `wgmesh keys` command line end to end, against a store in a temp dir:
//! init, show, rotation steps, revoke, and `audit verify` catching each kind of
//! tampering with the right line number.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn wgmesh(store: &Path, args: &[&str]) -> Output {
    wgmesh_env(store, args, &[])
}

fn wgmesh_env(store: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgmesh"));
    cmd.arg("keys")
        .args(args)
        .env("WGMESH_STORE", store)
        .env("WGMESH_ACTOR", "cli:tester")
        .env_remove("WGMESH_OUTPUT")
        .env_remove("WGMESH_REASON");
    for var in [
        "WGMESH_ROTATE_STAGE",
        "WGMESH_ROTATE_ACTIVATE",
        "WGMESH_ROTATE_DESTROY_OLD",
        "WGMESH_ROTATE_ALL_STEPS",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run wgmesh")
}

fn ok(store: &Path, args: &[&str]) -> String {
    let out = wgmesh(store, args);
    assert!(
        out.status.success(),
        "wgmesh keys {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A store whose log has several records: init, a full rotation, a revoke.
fn populated() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    ok(tmp.path(), &["init", "--node-name", "node-a"]);
    ok(
        tmp.path(),
        &["rotate", "--stage", "--reason", "Q4 rotation"],
    );
    ok(
        tmp.path(),
        &["rotate", "--activate", "--reason", "Q4 rotation"],
    );
    ok(
        tmp.path(),
        &["rotate", "--destroy-old", "--reason", "Q4 rotation"],
    );
    ok(tmp.path(), &["revoke", "--reason", "drill"]);
    tmp
}

fn log_lines(store: &Path) -> Vec<String> {
    fs::read_to_string(store.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(store: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(store.join("audit.jsonl"), text).unwrap();
}

/// Runs `audit verify` and returns the line number it names.
fn failing_line(store: &Path) -> usize {
    let out = wgmesh(store, &["audit", "verify", "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "verify must exit 1");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let text = wgmesh(store, &["audit", "verify"]);
    let stderr = String::from_utf8_lossy(&text.stderr);
    let line = v["line"].as_u64().unwrap() as usize;
    assert!(stderr.contains(&format!("line {line}:")), "{stderr}");
    line
}

#[test]
fn keys_lifecycle_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let s = store.as_path();
    let out = ok(s, &["init", "--node-name", "node-a"]);
    assert!(out.contains("generation 1"), "{out}");
    assert_eq!(fs::metadata(s).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(
        fs::metadata(s.join("key-1.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // init again fails unless --if-missing.
    assert_eq!(wgmesh(s, &["init"]).status.code(), Some(1));
    ok(s, &["init", "--if-missing"]);

    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["node"], "node-a");
    assert_eq!(show["phase"], "idle");
    assert_eq!(show["active"]["generation"], 1);
    assert_eq!(show["active"]["public_key"].as_str().unwrap().len(), 44);
    assert_eq!(show["active"]["fingerprint"].as_str().unwrap().len(), 16);
    assert!(show["active"]["age_seconds"].as_i64().unwrap() >= 0);
    let secret = fs::read_to_string(s.join("key-1.key")).unwrap();
    let text = ok(s, &["show"]);
    assert!(
        text.contains("fingerprint:") && text.contains("generation:  1"),
        "{text}"
    );
    assert!(
        !text.contains(secret.trim()),
        "the private key must never be printed"
    );

    // Out-of-order step is refused with the next step named.
    let out = wgmesh(s, &["rotate", "--activate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stage"));

    ok(s, &["rotate", "--stage"]);
    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["phase"], "staged");
    assert_eq!(show["staged"]["generation"], 2);
    // Two step flags at once are a usage error.
    assert_eq!(
        wgmesh(s, &["rotate", "--stage", "--activate"])
            .status
            .code(),
        Some(2)
    );

    // --all-steps refuses while a rotation is staged; then run the full cycle.
    assert_eq!(wgmesh(s, &["rotate", "--all-steps"]).status.code(), Some(1));
    ok(s, &["rotate", "--activate"]);
    ok(s, &["rotate", "--destroy-old"]);
    ok(s, &["rotate", "--all-steps"]);
    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["active"]["generation"], 3);
    assert_eq!(show["phase"], "idle");

    // revoke demands a reason.
    assert_eq!(wgmesh(s, &["revoke"]).status.code(), Some(2));
    ok(s, &["revoke", "--reason", "key leaked in a support bundle"]);

    let verify = ok(s, &["audit", "verify"]);
    assert!(verify.contains("audit log OK"), "{verify}");
    let table = ok(s, &["audit", "show"]);
    for word in [
        "SEQ",
        "generated",
        "staged",
        "activated",
        "destroyed",
        "revoked",
        "cli:tester",
        "key leaked",
    ] {
        assert!(table.contains(word), "{word} missing from\n{table}");
    }
    let json = ok(s, &["audit", "show", "--output", "json"]);
    assert_eq!(json.lines().count(), log_lines(s).len());
    assert!(!json.contains(secret.trim()));
}

#[test]
fn audit_verify_names_the_line_of_each_kind_of_tampering() {
    let base = populated();
    let orig = log_lines(base.path());
    let n = orig.len();
    assert!(n >= 8, "need a long enough log, have {n}");
    let fresh = || {
        let tmp = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(base.path()).unwrap() {
            let entry = entry.unwrap();
            let dest = tmp.path().join(entry.file_name());
            fs::copy(entry.path(), &dest).unwrap();
        }
        tmp
    };

    // Edit: change the reason on line 4.
    let t = fresh();
    let mut l = orig.clone();
    l[3] = l[3].replace("Q4 rotation", "Q3 rotation");
    assert_ne!(l[3], orig[3]);
    write_lines(t.path(), &l);
    assert_eq!(failing_line(t.path()), 4);

    // Delete line 5.
    let t = fresh();
    let mut l = orig.clone();
    l.remove(4);
    write_lines(t.path(), &l);
    assert_eq!(failing_line(t.path()), 5);

    // Insert a copy of line 2 before line 6.
    let t = fresh();
    let mut l = orig.clone();
    l.insert(5, orig[1].clone());
    write_lines(t.path(), &l);
    assert_eq!(failing_line(t.path()), 6);

    // Reorder: swap lines 3 and 4.
    let t = fresh();
    let mut l = orig.clone();
    l.swap(2, 3);
    write_lines(t.path(), &l);
    assert_eq!(failing_line(t.path()), 3);

    // Cut: the last line truncated in the middle.
    let t = fresh();
    let mut l = orig.clone();
    l[n - 1].truncate(50);
    write_lines(t.path(), &l);
    assert_eq!(failing_line(t.path()), n);

    // Cut: the last two lines removed (the head anchor catches it).
    let t = fresh();
    write_lines(t.path(), &orig[..n - 2]);
    assert_eq!(failing_line(t.path()), n - 1);

    // A broken log blocks further key operations, and `show` still prints the
    // good prefix but exits 1.
    let t = fresh();
    let mut l = orig.clone();
    l[3] = l[3].replace("Q4 rotation", "Q3 rotation");
    write_lines(t.path(), &l);
    assert_eq!(
        wgmesh(t.path(), &["rotate", "--stage"]).status.code(),
        Some(1)
    );
    let out = wgmesh(t.path(), &["audit", "show"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1 + 3);
}

#[test]
fn a_0644_key_is_refused() {
    let tmp = populated();
    let state: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tmp.path().join("state.json")).unwrap()).unwrap();
    let generation = state["active"]["generation"].as_u64().unwrap();
    let key = tmp.path().join(format!("key-{generation}.key"));
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = wgmesh(tmp.path(), &["show"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn a_missing_store_says_how_to_create_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = wgmesh(&tmp.path().join("nope"), &["show"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wgmesh keys init"));
}

#[test]
fn rotate_without_a_step_is_refused_and_names_the_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path();
    ok(s, &["init", "--node-name", "node-a"]);
    let before = fs::read(s.join("audit.jsonl")).unwrap();
    let out = wgmesh(s, &["rotate", "--reason", "Q4"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    for word in [
        "--stage",
        "--activate",
        "--destroy-old",
        "pre-accept",
        "--all-steps",
        "WGMESH_ROTATE_ALL_STEPS",
    ] {
        assert!(err.contains(word), "{word} missing from: {err}");
    }
    assert_eq!(
        fs::read(s.join("audit.jsonl")).unwrap(),
        before,
        "nothing written"
    );
    assert!(!s.join("key-2.key").exists());

    // --all-steps is exclusive with each step flag.
    for step in ["--stage", "--activate", "--destroy-old"] {
        let out = wgmesh(s, &["rotate", "--all-steps", step]);
        assert_eq!(out.status.code(), Some(2), "--all-steps {step}");
    }

    // The explicit flag, and its environment variable, run all three steps.
    let out = ok(s, &["rotate", "--all-steps"]);
    assert!(out.contains("staged") && out.contains("destroyed"), "{out}");
    let out = wgmesh_env(s, &["rotate"], &[("WGMESH_ROTATE_ALL_STEPS", "true")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["active"]["generation"], 3);
    assert_eq!(show["phase"], "idle");
}

#[test]
fn an_operation_logged_but_never_committed_is_reported_then_recorded_as_aborted() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path();
    ok(s, &["init", "--node-name", "node-a"]);
    // The crash window, constructed: `--stage` wrote its key file and its
    // audit records (write-ahead), then "crashed" before committing
    // state.json, which therefore still holds the state from before it.
    let committed = fs::read(s.join("state.json")).unwrap();
    ok(s, &["rotate", "--stage"]);
    fs::write(s.join("state.json"), &committed).unwrap();

    // verify: the chain is intact, but the uncommitted operation is shown.
    let out = wgmesh(s, &["audit", "verify"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rotate --stage") && err.contains("seq 2..3"),
        "{err}"
    );
    assert!(err.contains("not reflected in state.json"), "{err}");
    let json = wgmesh(s, &["audit", "verify", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["uncommitted"]["operation"], "rotate --stage");
    assert_eq!(v["uncommitted"]["first_seq"], 2);
    assert_eq!(v["aborted_records"], serde_json::json!([]));

    // Opening the store records the abort; the orphaned key is reported.
    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["phase"], "idle");
    assert_eq!(show["orphaned_key_files"].as_array().unwrap().len(), 1);
    let last: serde_json::Value = serde_json::from_str(log_lines(s).last().unwrap()).unwrap();
    assert_eq!(last["event"], "aborted");
    assert_eq!(last["seq"], 4);
    assert_eq!(last["actor"], "wgmesh:recovery");

    let out = wgmesh(s, &["audit", "verify"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("audit log OK: 4 records"), "{stdout}");
    assert!(
        stdout.contains("aborted operations recorded: seq 4"),
        "{stdout}"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = ok(s, &["audit", "show"]);
    assert!(table.contains("aborted"), "{table}");

    // The retry stages a fresh generation and destroys the orphan.
    ok(s, &["rotate", "--stage"]);
    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["staged"]["generation"], 3);
    assert_eq!(show["orphaned_key_files"], serde_json::json!([]));
    assert!(!s.join("key-2.key").exists());
}
