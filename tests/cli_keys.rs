//! The `wgmesh keys` command line end to end, against a store in a temp dir:
//! init, show, rotation steps, abort, revoke, `audit verify` catching each kind
//! of tampering with the right line number and a rewritten history through a
//! witness's log, and `inventory` and `evidence` against a mock API server.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use wgmesh::keys::audit::{AuditRecord, GENESIS_HASH};
use wgmesh::keys::store::{Attribution, Store};

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
        "WGMESH_ROTATE_ABORT",
        "WGMESH_WITNESS",
        "WGMESH_MAX_KEY_AGE",
        "WGMESH_EVIDENCE_OUT",
        "KUBECONFIG",
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
        "--abort",
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
    for step in ["--stage", "--activate", "--destroy-old", "--abort"] {
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

fn agent() -> Attribution {
    Attribution {
        actor: "agent".into(),
        reason: "saw the Node's audit head change".into(),
    }
}

/// Rewrites one record's reason and recomputes the whole chain and the
/// anchor: what root on the node could do so that plain verify passes.
fn rewrite_consistently(store: &Path, seq: u64, reason: &str) {
    let mut prev = GENESIS_HASH.to_string();
    let mut text = String::new();
    let mut last = None;
    for line in log_lines(store) {
        let mut r: AuditRecord = serde_json::from_str(&line).unwrap();
        if r.seq == seq {
            r.reason = reason.into();
        }
        r.prev_hash = prev;
        r.hash = r.body_hash().unwrap();
        prev = r.hash.clone();
        text.push_str(&r.to_line().unwrap());
        text.push('\n');
        last = Some(r.head());
    }
    fs::write(store.join("audit.jsonl"), text).unwrap();
    let head = serde_json::to_string(&last.unwrap()).unwrap();
    fs::write(store.join("audit.head"), format!("{head}\n")).unwrap();
}

/// Node A rotated; node B's agent witnessed A's head after the activation.
fn witnessed_pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(&a, &["init", "--node-name", "node-a"]);
    ok(&b, &["init", "--node-name", "node-b"]);
    ok(&a, &["rotate", "--stage", "--reason", "Q4 rotation"]);
    ok(&a, &["rotate", "--activate", "--reason", "Q4 rotation"]);
    let head = Store::open(&a).unwrap().audit_head().unwrap();
    let mut witness = Store::open(&b).unwrap();
    assert!(witness.record_peer_head("node-a", &head, &agent()).unwrap());
    ok(&a, &["rotate", "--destroy-old", "--reason", "Q4 rotation"]);
    (tmp, a, b)
}

#[test]
fn a_rewritten_history_passes_plain_verify_but_fails_against_a_witness() {
    let (_tmp, a, b) = witnessed_pair();
    let b_arg = b.to_str().unwrap();
    let out = ok(&a, &["audit", "verify", "--witness", b_arg]);
    assert!(
        out.contains("witnesses OK: 1 heads of node-a recorded by node-b"),
        "{out}"
    );
    assert!(out.contains("up to seq 4"), "{out}");
    // B's log shows the witness record.
    let table = ok(&b, &["audit", "show"]);
    assert!(
        table.contains("peer-head") && table.contains("node-a"),
        "{table}"
    );

    rewrite_consistently(&a, 3, "routine check");
    let plain = wgmesh(&a, &["audit", "verify"]);
    assert!(plain.status.success(), "the rewrite is self-consistent");

    let out = wgmesh(&a, &["audit", "verify", "--witness", b_arg]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAILED verification against witnesses: seq 4: node-b recorded"),
        "{err}"
    );
    assert!(err.contains("rewritten"), "{err}");
    let json = wgmesh(
        &a,
        &["audit", "verify", "--output", "json", "--witness", b_arg],
    );
    assert_eq!(json.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["chain_ok"], true);
    assert_eq!(v["witnesses"]["problems"][0]["seq"], 4);
    assert_eq!(v["witnesses"]["problems"][0]["witness"], "node-b");
    assert_eq!(v["witnesses"]["problems"][0]["problem"], "differs");

    // A witness given as its .jsonl file works the same (its .head is beside
    // it only as audit.head, so only its chain is checked, with a warning).
    let file = b.join("audit.jsonl");
    let out = wgmesh(
        &a,
        &["audit", "verify", "--witness", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    // An unreadable witness never passes silently.
    let out = wgmesh(&a, &["audit", "verify", "--witness", "/nonexistent/wgmesh"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be relied on"));
}

#[test]
fn a_witness_without_heads_of_this_node_is_a_warning_not_a_pass_in_disguise() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, c) = (tmp.path().join("a"), tmp.path().join("c"));
    ok(&a, &["init", "--node-name", "node-a"]);
    ok(&c, &["init", "--node-name", "node-c"]);
    let out = wgmesh(&a, &["audit", "verify", "--witness", c.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was checked against witnesses"));
}

#[test]
fn rotate_abort_withdraws_the_staged_key() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path();
    ok(s, &["init", "--node-name", "node-a"]);
    let out = wgmesh(s, &["rotate", "--abort", "--reason", "freeze"]);
    assert_eq!(out.status.code(), Some(1), "nothing staged");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--stage"));
    ok(s, &["rotate", "--stage", "--reason", "Q4"]);
    let out = ok(s, &["rotate", "--abort", "--reason", "change freeze"]);
    assert!(out.contains("withdrawn and destroyed"), "{out}");
    assert!(!s.join("key-2.key").exists());
    let show: serde_json::Value =
        serde_json::from_str(&ok(s, &["show", "--output", "json"])).unwrap();
    assert_eq!(show["phase"], "idle");
    assert_eq!(show["active"]["generation"], 1);
    let verify = ok(s, &["audit", "verify"]);
    assert!(
        verify.contains("abandoned rotations recorded: seq 4"),
        "{verify}"
    );
    assert!(!verify.contains("aborted operations recorded"), "{verify}");
    let last: serde_json::Value = serde_json::from_str(log_lines(s).last().unwrap()).unwrap();
    assert_eq!(last["event"], "destroyed");
    // An empty reason is refused for every key operation.
    let out = wgmesh(s, &["revoke", "--reason", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reason"));
}

#[test]
fn destroy_old_records_the_end_of_the_grace_period() {
    let tmp = populated();
    let events: Vec<String> = log_lines(tmp.path())
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["event"].to_string())
        .collect();
    let at = events.iter().position(|e| e == "\"grace-ended\"").unwrap();
    assert_eq!(events[at - 1], "\"activated\"");
    assert_eq!(events[at + 1], "\"destroyed\"");
}

/// A mock API server answering every request with `nodes` as a NodeList.
/// Returns a kubeconfig pointing at it.
fn mock_api(dir: &Path, nodes: serde_json::Value) -> PathBuf {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "NodeList",
        "metadata": {"resourceVersion": "1"},
        "items": nodes,
    })
    .to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    kubeconfig(dir, &format!("http://127.0.0.1:{port}"))
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    path
}

/// A Node as the agent on `store` would publish it (key, generation, created,
/// audit head), created `age_days` ago.
fn published_node(name: &str, store: &Path, key_created: &str) -> serde_json::Value {
    let store = Store::open(store).unwrap();
    let active = &store.state().active;
    serde_json::json!({
        "metadata": {"name": name, "annotations": {
            "wgmesh.dev/public-key": active.public_key.to_base64(),
            "wgmesh.dev/key-generation": active.generation.to_string(),
            "wgmesh.dev/key-created": key_created,
            "wgmesh.dev/audit-head": store.audit_head().unwrap().to_string(),
        }},
    })
}

#[test]
fn inventory_reads_the_nodes_in_text_json_and_csv() {
    let (tmp, a, b) = witnessed_pair();
    let nodes = serde_json::json!([
        published_node("node-b", &b, "2020-01-01T00:00:00Z"),
        published_node("node-a", &a, "2999-01-01T00:00:00Z"),
        {"metadata": {"name": "node-z"}},
    ]);
    let kc = mock_api(tmp.path(), nodes);
    let kc = kc.to_str().unwrap();
    let text = ok(&a, &["inventory", "--kubeconfig", kc]);
    assert!(
        text.contains("node-b") && text.contains("OVERDUE"),
        "{text}"
    );
    assert!(
        text.contains("3 nodes: 1 ok, 1 OVERDUE (max key age 90d)"),
        "{text}"
    );
    assert!(text.contains("no-key"), "{text}");

    let json: serde_json::Value = serde_json::from_str(&ok(
        &a,
        &[
            "inventory",
            "--kubeconfig",
            kc,
            "--output",
            "json",
            "--max-key-age",
            "12h",
        ],
    ))
    .unwrap();
    assert_eq!(json["policy"]["max_key_age_seconds"], 43_200);
    assert_eq!(json["nodes"][0]["node"], "node-a");
    assert_eq!(json["nodes"][0]["generation"], 2);
    let head = Store::open(&a).unwrap().audit_head().unwrap();
    assert_eq!(json["nodes"][0]["audit_head"]["seq"], head.seq);
    assert_eq!(json["nodes"][1]["status"], "overdue");

    let csv = ok(&a, &["inventory", "--kubeconfig", kc, "--output", "csv"]);
    assert!(csv.starts_with("node,status,overdue,fingerprint,"), "{csv}");
    assert_eq!(csv.lines().count(), 4);

    let bad = wgmesh(
        &a,
        &["inventory", "--kubeconfig", kc, "--max-key-age", "ninety"],
    );
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn evidence_writes_a_verifiable_bundle() {
    let (tmp, a, b) = witnessed_pair();
    let nodes = serde_json::json!([
        published_node("node-a", &a, "2026-01-01T00:00:00Z"),
        published_node("node-b", &b, "2026-01-01T00:00:00Z"),
    ]);
    let kc = mock_api(tmp.path(), nodes);
    let out_dir = tmp.path().join("bundle");
    let stdout = ok(
        &a,
        &[
            "evidence",
            "--out",
            out_dir.to_str().unwrap(),
            "--witness",
            b.to_str().unwrap(),
            "--kubeconfig",
            kc.to_str().unwrap(),
        ],
    );
    assert!(stdout.contains("evidence bundle written"), "{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], true, "{manifest}");
    assert_eq!(manifest["about"]["node"], "node-a");
    assert_eq!(manifest["about"]["verification_ok"], true);
    assert_eq!(
        manifest["about"]["inventory"]["published_head_matches_log"],
        true
    );
    let names: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    for want in [
        "policy.json",
        "audit.jsonl",
        "audit.head",
        "verification.json",
        "inventory.json",
        "inventory.csv",
        "witnesses/1-node-b/audit.jsonl",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // Every digest matches the file, as `sha256sum -c` would check.
    for f in manifest["files"].as_array().unwrap() {
        let data = fs::read(out_dir.join(f["name"].as_str().unwrap())).unwrap();
        use sha2::Digest as _;
        assert_eq!(f["sha256"], wgmesh::text::hex(&sha2::Sha256::digest(&data)));
    }
    assert_eq!(
        fs::read(out_dir.join("audit.jsonl")).unwrap(),
        fs::read(a.join("audit.jsonl")).unwrap()
    );
    let v: serde_json::Value =
        serde_json::from_slice(&fs::read(out_dir.join("verification.json")).unwrap()).unwrap();
    assert_eq!(v["witnesses"]["checked"], 1);
    // The bundle itself can be verified again, its witnesses included.
    let again = ok(
        &out_dir,
        &[
            "audit",
            "verify",
            "--witness",
            out_dir.join("witnesses/1-node-b").to_str().unwrap(),
        ],
    );
    assert!(again.contains("witnesses OK"), "{again}");
    // The bundle holds no private key.
    for name in &names {
        let text = fs::read_to_string(out_dir.join(name)).unwrap_or_default();
        let secret = fs::read_to_string(a.join("key-2.key")).unwrap();
        assert!(!text.contains(secret.trim()), "{name}");
    }
}

#[test]
fn evidence_without_api_access_says_what_is_missing() {
    let tmp = populated();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let kc = kubeconfig(tmp.path(), &format!("http://127.0.0.1:{port}"));
    let out_dir = tmp.path().join("bundle");
    let out = wgmesh(
        tmp.path(),
        &[
            "evidence",
            "--out",
            out_dir.to_str().unwrap(),
            "--kubeconfig",
            kc.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "an incomplete bundle is not a success"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("inventory.json is missing: cannot read Nodes"),
        "{err}"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out_dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["complete"], false);
    let missing: Vec<&str> = manifest["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(missing, ["inventory.json", "inventory.csv"]);
    assert!(out_dir.join("audit.jsonl").exists() && out_dir.join("verification.json").exists());
    // Never into a directory that already holds something.
    let again = wgmesh(
        tmp.path(),
        &[
            "evidence",
            "--out",
            out_dir.to_str().unwrap(),
            "--kubeconfig",
            kc.to_str().unwrap(),
        ],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
}
