//! `wgmesh keys`: the key store's command line (init, show, rotate, revoke,
//! audit, inventory, evidence). The store, the audit log and the evidence
//! bundle do the work (`crate::keys`); this module words their results for
//! operators and auditors.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};

use crate::k8s::K8sError;
use crate::keys::audit::{self, AuditRecord, EventKind, VerifyError};
use crate::keys::evidence::{self, Bundle, EvidenceError, Policy};
use crate::keys::rotation::KeyMeta;
use crate::keys::store::{Attribution, Store, StoreError, RECOVERY_ACTOR};

pub type Result<T, E = CommandError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Evidence(#[from] EvidenceError),
    #[error(transparent)]
    Kubernetes(#[from] K8sError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] io::Error),
    #[error("the Kubernetes API did not answer within 10 s")]
    ListTimeout(#[source] tokio::time::error::Elapsed),
    #[error("cannot list Nodes")]
    List(#[source] kube::Error),
    #[error("{}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no staged key after staging")]
    NoStagedKey,
    #[error("cannot read the host name; pass --node-name (or NODE_NAME)")]
    Hostname(#[source] io::Error),
    #[error("the host name is empty; pass --node-name (or NODE_NAME)")]
    EmptyHostname,
    /// Writing the report (stdout or stderr) failed.
    #[error(transparent)]
    Output(#[from] io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// How `keys inventory` prints its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InventoryFormat {
    Text,
    Json,
    Csv,
}

/// The step flags of `keys rotate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steps {
    pub stage: bool,
    pub activate: bool,
    pub destroy_old: bool,
    pub all: bool,
    pub abort: bool,
}

impl Steps {
    /// False when no step was asked for: a usage error ([`ROTATE_NEEDS_A_STEP`]).
    pub fn any(&self) -> bool {
        self.stage || self.activate || self.destroy_old || self.all || self.abort
    }
}

pub const ROTATE_NEEDS_A_STEP: &str = "error: `wgmesh keys rotate` needs a step flag: \
--stage (generate the next key and publish it for peers to pre-accept), then \
--activate (switch to it once peers have it), then --destroy-old (destroy the \
previous key once no peer needs it). Peers must pre-accept the next key before \
this node switches to it, or traffic to this node stops until every peer learns \
the new key; running the three steps at once gives them no chance to. On a \
standalone host without peers, pass --all-steps (WGMESH_ROTATE_ALL_STEPS=true). \
To abandon a staged rotation instead, pass --abort.";

/// `keys init`: creates the store for `node` (default: the host name).
pub fn init(
    dir: &Path,
    node: Option<String>,
    if_missing: bool,
    who: &Attribution,
    out: &mut dyn Write,
) -> Result<()> {
    let node = match node {
        Some(n) => n,
        None => hostname()?,
    };
    match Store::init(dir, &node, who) {
        Ok(store) => {
            let a = &store.state().active;
            writeln!(
                out,
                "initialized {} for node {node}: public key {} (fingerprint {}, generation {})",
                dir.display(),
                a.public_key,
                a.fingerprint,
                a.generation
            )?;
        }
        Err(StoreError::AlreadyInitialized { .. }) if if_missing => {
            let store = Store::open(dir)?;
            writeln!(
                out,
                "{} already holds a key store (active fingerprint {}); nothing changed",
                dir.display(),
                store.state().active.fingerprint
            )?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// `keys show`: the store's keys, as text or JSON.
pub fn show(dir: &Path, json: bool, out: &mut dyn Write) -> Result<()> {
    let store = Store::open(dir)?;
    let now = Timestamp::now();
    let state = store.state();
    let key_json = |k: &KeyMeta| {
        json!({
            "public_key": k.public_key,
            "fingerprint": k.fingerprint,
            "generation": k.generation,
            "created": k.created,
            "age_seconds": age_seconds(k.created, now),
        })
    };
    if json {
        let value = json!({
            "node": store.node(),
            "store": store.dir(),
            "phase": state.phase(),
            "active": key_json(&state.active),
            "staged": state.staged.as_ref().map(key_json),
            "previous": state.previous.as_ref().map(key_json),
            "orphaned_key_files": store.orphans(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    writeln!(out, "node:        {}", store.node())?;
    writeln!(out, "store:       {}", store.dir().display())?;
    writeln!(out, "phase:       {}", state.phase())?;
    let roles = [
        ("active", Some(&state.active)),
        ("staged", state.staged.as_ref()),
        ("previous", state.previous.as_ref()),
    ];
    for (role, key) in roles {
        match key {
            None => writeln!(out, "{role} key:{:>pad$}(none)", "", pad = 9 - role.len())?,
            Some(k) => {
                writeln!(out, "{role} key:")?;
                writeln!(out, "  public key:  {}", k.public_key)?;
                writeln!(out, "  fingerprint: {}", k.fingerprint)?;
                writeln!(out, "  generation:  {}", k.generation)?;
                writeln!(
                    out,
                    "  created:     {} ({} ago)",
                    k.created,
                    crate::text::duration(age_seconds(k.created, now).unsigned_abs())
                )?;
            }
        }
    }
    for orphan in store.orphans() {
        writeln!(
            out,
            "warning: orphaned key file {} (left by an interrupted operation; the next key operation destroys it)",
            orphan.display()
        )?;
    }
    Ok(())
}

/// `keys rotate`: the requested steps, in the order stage, abort, activate,
/// destroy-old. The caller rejects an empty `steps` first (before the store is
/// touched).
pub fn rotate(dir: &Path, steps: Steps, who: &Attribution, out: &mut dyn Write) -> Result<()> {
    let mut store = Store::open(dir)?;
    if steps.stage || steps.all {
        store.stage(who)?;
        let k = store
            .state()
            .staged
            .as_ref()
            .ok_or(CommandError::NoStagedKey)?;
        writeln!(out, "staged generation {} (fingerprint {}, public key {}); peers must pre-accept it before `--activate`", k.generation, k.fingerprint, k.public_key)?;
    }
    if steps.abort {
        let staged = store.state().staged.clone();
        store.abort_staged(who)?;
        if let Some(k) = staged {
            writeln!(out, "aborted the staged rotation: generation {} (fingerprint {}) withdrawn and destroyed; the active key is unchanged", k.generation, k.fingerprint)?;
        }
    }
    if steps.activate || steps.all {
        // By hand, peer confirmations are not tracked: the record says so by
        // carrying no `unconfirmed` list.
        store.activate(None, who)?;
        let k = &store.state().active;
        writeln!(out, "activated generation {} (fingerprint {}); the previous key is kept until `--destroy-old`", k.generation, k.fingerprint)?;
    }
    if steps.destroy_old || steps.all {
        let old = store.state().previous.clone();
        store.destroy_old(who)?;
        if let Some(k) = old {
            writeln!(
                out,
                "grace period ended; destroyed generation {} (fingerprint {})",
                k.generation, k.fingerprint
            )?;
        }
    }
    Ok(())
}

/// `keys revoke`: destroys every key held and starts a new generation.
pub fn revoke(dir: &Path, who: &Attribution, out: &mut dyn Write) -> Result<()> {
    let mut store = Store::open(dir)?;
    let held: Vec<KeyMeta> = store.state().keys().cloned().collect();
    store.revoke(who)?;
    for k in held {
        writeln!(
            out,
            "revoked and destroyed generation {} (fingerprint {})",
            k.generation, k.fingerprint
        )?;
    }
    let k = &store.state().active;
    writeln!(
        out,
        "active now: generation {} (fingerprint {}, public key {})",
        k.generation, k.fingerprint, k.public_key
    )?;
    Ok(())
}

/// `keys inventory`: every Node's key, from the API.
pub fn inventory(
    kubeconfig: Option<&Path>,
    max_key_age: u64,
    format: InventoryFormat,
    out: &mut dyn Write,
) -> Result<()> {
    let nodes = list_nodes(kubeconfig)?;
    let policy = Policy { max_key_age };
    let now = Timestamp::now();
    let rows = evidence::inventory(&nodes, &policy, now);
    match format {
        InventoryFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&evidence::inventory_json(&rows, &policy, now))?
        )?,
        InventoryFormat::Csv => write!(out, "{}", evidence::inventory_csv(&rows))?,
        InventoryFormat::Text => {
            write!(out, "{}", evidence::inventory_text(&rows, &policy))?;
            let s = evidence::summary(&rows);
            writeln!(
                out,
                "{} nodes: {} ok, {} OVERDUE (max key age {}), {} age unknown, {} without a key, {} invalid",
                s["nodes"],
                s["ok"],
                s["overdue"],
                evidence::format_duration(policy.max_key_age),
                s["age_unknown"],
                s["no_key"],
                s["invalid"]
            )?;
        }
    }
    Ok(())
}

/// `keys audit verify`; true when the log (and every witness) verified.
pub fn audit_verify(
    dir: &Path,
    json: bool,
    witnesses: &[PathBuf],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    require_store(dir)?;
    let v = verification(dir, witnesses)?;
    if json {
        writeln!(out, "{}", v.json)?;
    } else {
        for line in &v.out {
            writeln!(out, "{line}")?;
        }
    }
    for line in &v.err {
        writeln!(err, "{line}")?;
    }
    Ok(v.ok)
}

/// `keys audit show`: the records as a table or JSON lines, up to the first
/// bad line; true when the whole log verified.
pub fn audit_show(
    dir: &Path,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    require_store(dir)?;
    let (records, error) = match Store::verify_audit(dir)? {
        Ok(v) => (v.records, None),
        Err(e) => (readable_prefix(dir, &e), Some(e)),
    };
    if json {
        for r in &records {
            writeln!(out, "{}", r.to_line().map_err(StoreError::AuditEncode)?)?;
        }
    } else {
        write!(out, "{}", audit_table(&records))?;
    }
    match error {
        None => Ok(true),
        Some(e) => {
            writeln!(
                err,
                "audit log FAILED verification: {e}; records from that line on are not shown"
            )?;
            Ok(false)
        }
    }
}

/// `wgmesh keys evidence`: see its `--help`. Reads the store without opening
/// it (no lock, no recovery append), so producing evidence changes nothing.
/// True when the bundle is complete and the log verified.
pub fn evidence_bundle(
    dir: &Path,
    bundle_dir: &Path,
    witnesses: &[PathBuf],
    kubeconfig: Option<&Path>,
    max_key_age: u64,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool> {
    let now = Timestamp::now();
    let policy = Policy { max_key_age };
    let mut bundle = Bundle::create(bundle_dir)?;
    bundle.add("policy.json", &pretty(&policy.to_json())?)?;

    // This node's log, exactly as stored, and its verification.
    let log_path = dir.join("audit.jsonl");
    let mut verified_ok = None;
    let mut node = Store::node_of(dir).unwrap_or(None);
    let mut log_head = None;
    if log_path.exists() {
        let log = std::fs::read(&log_path).map_err(|source| CommandError::Read {
            path: log_path.clone(),
            source,
        })?;
        bundle.add("audit.jsonl", &log)?;
        match std::fs::read(dir.join("audit.head")) {
            Ok(head) => bundle.add("audit.head", &head)?,
            Err(e) => bundle.missing(
                "audit.head",
                format!(
                    "{}: {e}; without it a cut at the end of the log cannot be ruled out",
                    dir.join("audit.head").display()
                ),
            ),
        }
        match std::fs::read(dir.join("state.json")) {
            Ok(state) => bundle.add("state.json", &state)?,
            Err(e) => bundle.missing(
                "state.json",
                format!("{}: {e}", dir.join("state.json").display()),
            ),
        }
        let v = verification(dir, witnesses)?;
        bundle.add("verification.json", &pretty(&v.json)?)?;
        bundle.add("verification.txt", v.text().as_bytes())?;
        verified_ok = Some(v.ok);
        node = node.or(v.node.clone());
        log_head = v.published_head.clone();
    } else {
        let why = format!(
            "no audit log at {}: run this on the node, or pass --store",
            log_path.display()
        );
        bundle.missing("audit.jsonl", why.clone());
        bundle.missing("verification.json", format!("nothing to verify: {why}"));
    }

    // The witnesses' logs, so the auditor can run the verification again.
    for (i, path) in witnesses.iter().enumerate() {
        let slot = format!("witnesses/{}", i + 1);
        match evidence::load_log(path) {
            Ok(w) => {
                let name = format!(
                    "{slot}-{}",
                    w.node.as_deref().unwrap_or("unknown").replace('/', "_")
                );
                bundle.add(&format!("{name}/audit.jsonl"), &w.log)?;
                if let Some(head) = &w.head_file {
                    bundle.add(&format!("{name}/audit.head"), head)?;
                }
            }
            Err(e) => bundle.missing(&slot, format!("witness {}: {e}", path.display())),
        }
    }

    // The inventory, from the API.
    let mut inventory_about = Value::Null;
    match list_nodes(kubeconfig) {
        Ok(nodes) => {
            let rows = evidence::inventory(&nodes, &policy, now);
            bundle.add(
                "inventory.json",
                &pretty(&evidence::inventory_json(&rows, &policy, now))?,
            )?;
            bundle.add("inventory.csv", evidence::inventory_csv(&rows).as_bytes())?;
            let own = node
                .as_deref()
                .and_then(|n| rows.iter().find(|r| r.node == n));
            let published = own.and_then(|r| r.audit_head).map(|h| h.to_head());
            inventory_about = json!({
                "summary": evidence::summary(&rows),
                // Whether this node's Node publishes the head of the log in this
                // bundle (false briefly after a key event, until the agent writes it).
                "published_head": published,
                "published_head_matches_log": match (&published, &log_head) {
                    (Some(p), Some(l)) => json!(p == l),
                    _ => Value::Null,
                },
            });
        }
        Err(e) => {
            let why = format!("cannot read Nodes from the API: {}", chain(&e));
            bundle.missing("inventory.json", why.clone());
            bundle.missing("inventory.csv", why);
        }
    }

    let files = bundle.files().len();
    let missing: Vec<(String, String)> = bundle
        .missing_parts()
        .iter()
        .map(|m| (m.name.clone(), m.why.clone()))
        .collect();
    let about = json!({
        "node": node,
        "store": dir,
        "policy": {"max_key_age": evidence::format_duration(policy.max_key_age)},
        "verification_ok": verified_ok,
        "inventory": inventory_about,
        "witnesses": witnesses,
    });
    let digest = bundle.finish(now, about)?;
    writeln!(
        out,
        "evidence bundle written to {}: {files} files and {}; its sha256 is {digest} (record it somewhere this host cannot write)",
        bundle_dir.display(),
        evidence::MANIFEST
    )?;
    for (name, why) in &missing {
        writeln!(
            err,
            "warning: the bundle is incomplete: {name} is missing: {why}"
        )?;
    }
    if verified_ok == Some(false) {
        writeln!(
            err,
            "warning: the audit log FAILED verification; see verification.txt in the bundle"
        )?;
    }
    Ok(missing.is_empty() && verified_ok == Some(true))
}

/// Who acts when `--actor` is not given: `cli:<user>` from SUDO_USER, USER or
/// LOGNAME, else `cli:uid=<uid>`.
pub fn default_actor() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
    match user {
        Some(u) => format!("cli:{u}"),
        None => {
            let uid = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("Uid:"))
                        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
                })
                .unwrap_or_else(|| "unknown".into());
            format!("cli:uid={uid}")
        }
    }
}

/// The error and its causes, as anyhow's `{:#}` writes them.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

fn hostname() -> Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(CommandError::Hostname)?;
    let name = name.trim();
    if name.is_empty() {
        return Err(CommandError::EmptyHostname);
    }
    Ok(name.to_string())
}

/// `audit` commands read a store without opening it, so they check for one
/// themselves: either file is enough (a store whose state.json was lost still
/// has a log worth reading).
fn require_store(dir: &Path) -> Result<()> {
    if !dir.join("state.json").exists() && !dir.join("audit.jsonl").exists() {
        return Err(StoreError::NotInitialized {
            dir: dir.to_path_buf(),
        }
        .into());
    }
    Ok(())
}

/// Every Node, from the API (10 s timeout).
fn list_nodes(kubeconfig: Option<&Path>) -> Result<Vec<Node>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CommandError::Runtime)?;
    rt.block_on(async {
        let client = crate::k8s::client(kubeconfig).await?;
        let api: kube::Api<Node> = kube::Api::all(client);
        let list = tokio::time::timeout(Duration::from_secs(10), api.list(&Default::default()))
            .await
            .map_err(CommandError::ListTimeout)?
            .map_err(CommandError::List)?;
        Ok(list.items)
    })
}

fn pretty(value: &Value) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    Ok(text)
}

/// What `audit verify` found: the lines it prints and its JSON.
struct Verification {
    ok: bool,
    json: Value,
    /// stdout lines (text output).
    out: Vec<String>,
    /// stderr lines (failures and warnings), for either output.
    err: Vec<String>,
    node: Option<String>,
    /// The head this log would publish (`audit::published_head`).
    published_head: Option<audit::Head>,
}

impl Verification {
    /// The whole result as text, for a bundle.
    fn text(&self) -> String {
        let mut text = String::new();
        for line in self.out.iter().chain(&self.err) {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// Verifies the store's log: its chain and anchor, and, with witnesses, the
/// heads other nodes recorded of it. Reads only.
fn verification(dir: &Path, witnesses: &[PathBuf]) -> Result<Verification> {
    let result = Store::verify_audit(dir)?;
    let mut out = Vec::new();
    let mut err = Vec::new();
    // Records written ahead of a commit that never happened, not yet recorded
    // as aborted: the chain is intact, but the log's last operation did not
    // take effect, and the reader must know. Verifying the log must not depend
    // on state.json being readable.
    let uncommitted = Store::uncommitted(dir).unwrap_or_else(|e| {
        err.push(format!(
            "warning: cannot tell whether the log's last operation was committed: {e}"
        ));
        None
    });
    let records = match &result {
        Ok(v) => v.records.clone(),
        Err(e) => readable_prefix(dir, e),
    };
    let aborted: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| r.event == EventKind::Aborted)
        .collect();
    let seqs = |recovery: bool| -> Vec<u64> {
        aborted
            .iter()
            .filter(|r| (r.actor == RECOVERY_ACTOR) == recovery)
            .map(|r| r.seq)
            .collect()
    };
    let (interrupted, abandoned) = (seqs(true), seqs(false));
    let pending = uncommitted.as_ref().map(|u| {
        json!({
            "operation": u.operation(),
            "first_seq": u.first_seq(),
            "last_seq": u.last_seq(),
        })
    });
    let mut json = match &result {
        Ok(v) => json!({
            "ok": true,
            "records": v.records.len(),
            "head": v.head,
            "published_head": audit::published_head(&v.records),
            "aborted_records": aborted.iter().map(|r| r.seq).collect::<Vec<_>>(),
            "uncommitted": pending,
        }),
        Err(e) => json!({
            "ok": false,
            "line": e.line,
            "problem": e.problem,
            "uncommitted": pending,
        }),
    };
    match &result {
        Ok(v) => out.push(format!(
            "audit log OK: {} records, chain intact, head seq {} hash {}\n(keep the head hash somewhere this host cannot write to prove later that history was not rewritten)",
            v.records.len(),
            v.head.seq,
            v.head.hash
        )),
        Err(e) => err.push(format!("audit log FAILED verification: {e}")),
    }
    let list = |seqs: &[u64]| {
        seqs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !interrupted.is_empty() {
        out.push(format!(
            "aborted operations recorded: seq {} (each names records that were logged but never committed; `wgmesh keys audit show` lists them)",
            list(&interrupted)
        ));
    }
    if !abandoned.is_empty() {
        out.push(format!(
            "abandoned rotations recorded: seq {} (a staged key withdrawn and destroyed; each record names who and why)",
            list(&abandoned)
        ));
    }
    if let Some(u) = &uncommitted {
        err.push(format!(
            "warning: the log's last operation, {}, is not reflected in state.json: it was interrupted before its commit and did not take effect; the next key operation or store open (agent start, `wgmesh keys show`) records it as aborted",
            u.describe()
        ));
    }
    let node = records
        .first()
        .map(|r| r.node.clone())
        .or_else(|| Store::node_of(dir).ok().flatten());
    let mut ok = result.is_ok();
    if !witnesses.is_empty() {
        let (witness_ok, witness_json) =
            check_witnesses(node.as_deref(), &records, witnesses, &mut out, &mut err);
        ok &= witness_ok;
        json["chain_ok"] = json!(result.is_ok());
        json["ok"] = json!(ok);
        json["witnesses"] = witness_json;
    }
    Ok(Verification {
        ok,
        json,
        out,
        err,
        node,
        published_head: result
            .as_ref()
            .ok()
            .and_then(|v| audit::published_head(&v.records)),
    })
}

/// The witness half of `verification`: true when every witness log could be
/// used and none contradicts `records`.
fn check_witnesses(
    node: Option<&str>,
    records: &[AuditRecord],
    witnesses: &[PathBuf],
    out: &mut Vec<String>,
    err: &mut Vec<String>,
) -> (bool, Value) {
    let mut unusable = Vec::new();
    let mut loaded = Vec::new();
    for path in witnesses {
        match evidence::load_log(path) {
            Ok(w) => {
                if let Err(e) = &w.verified {
                    unusable.push(json!({"witness": path, "problem": format!("its own log does not verify ({e}); only its records before that line were used")}));
                } else if w.head_path.is_none() {
                    err.push(format!("warning: witness {}: no audit.head beside its log, so only its chain was checked (a cut at its end cannot be ruled out)", path.display()));
                }
                loaded.push(w);
            }
            Err(e) => unusable.push(json!({"witness": path, "problem": e.to_string()})),
        }
    }
    for u in &unusable {
        err.push(format!(
            "witness {} cannot be relied on: {}",
            u["witness"].as_str().unwrap_or("?"),
            u["problem"].as_str().unwrap_or("?")
        ));
    }
    let Some(node) = node else {
        err.push("audit log FAILED verification against witnesses: the log is empty and the store names no node, so no witnessed head can be checked".into());
        return (
            false,
            json!({"ok": false, "problem": "the log's node is unknown", "unusable": unusable}),
        );
    };
    let logs: Vec<&[AuditRecord]> = loaded.iter().map(|w| w.records.as_slice()).collect();
    let report = audit::verify_against_witnesses(node, records, &logs);
    for finding in &report.problems {
        err.push(format!(
            "audit log FAILED verification against witnesses: {finding}"
        ));
    }
    if report.checked == 0 {
        err.push(format!(
            "warning: no witness log holds a head of {node}: nothing was checked against witnesses"
        ));
    } else if report.ok() {
        out.push(format!(
            "witnesses OK: {} heads of {node} recorded by {} match this log; every record up to seq {} is pinned by a witness",
            report.checked,
            report.witnesses.join(", "),
            report.pinned_up_to
        ));
    }
    let problems: Vec<Value> = report
        .problems
        .iter()
        .map(|f| {
            let (kind, detail) = match &f.problem {
                audit::WitnessProblem::Missing { log_ends_at } => {
                    ("missing", json!({"log_ends_at": log_ends_at}))
                }
                audit::WitnessProblem::Differs { found } => ("differs", json!({"found": found})),
            };
            json!({
                "seq": f.head.seq,
                "hash": f.head.hash,
                "witness": f.witness,
                "witness_seq": f.witness_seq,
                "witnessed_at": f.witnessed_at,
                "problem": kind,
                "detail": detail,
                "message": f.to_string(),
            })
        })
        .collect();
    let ok = report.ok() && unusable.is_empty();
    (
        ok,
        json!({
            "ok": ok,
            "node": node,
            "witnesses": report.witnesses,
            "checked": report.checked,
            "pinned_up_to": report.pinned_up_to,
            "problems": problems,
            "unusable": unusable,
        }),
    )
}

/// The records before the first bad line, for showing a broken log. An
/// unreadable log has none (the verification already named why).
fn readable_prefix(dir: &Path, err: &VerifyError) -> Vec<AuditRecord> {
    let log = std::fs::read(dir.join("audit.jsonl")).unwrap_or_default();
    audit::readable_prefix(&log, err)
}

fn audit_table(records: &[AuditRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.seq.to_string(),
                r.time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                r.event.to_string(),
                r.generation.to_string(),
                r.old_fingerprint.map_or("-".into(), |f| f.to_string()),
                r.new_fingerprint.map_or("-".into(), |f| f.to_string()),
                r.actor.clone(),
                r.peer.clone().unwrap_or_else(|| "-".into()),
                r.reason.clone(),
            ]
        })
        .collect();
    let header = [
        "SEQ",
        "TIME (UTC)",
        "EVENT",
        "GEN",
        "OLD",
        "NEW",
        "ACTOR",
        "PEER",
        "REASON",
    ];
    crate::text::table(&header, &rows)
}

fn age_seconds(created: Timestamp, now: Timestamp) -> i64 {
    now.as_second().saturating_sub(created.as_second()).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Attribution {
        Attribution {
            actor: "cli:test".into(),
            reason: "test".into(),
        }
    }

    #[test]
    fn show_reports_each_role_and_staged_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let mut out = Vec::new();
        init(&dir, Some("node-a".into()), false, &who(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("initialized "), "{text}");
        assert!(text.contains("for node node-a"), "{text}");

        let mut out = Vec::new();
        show(&dir, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("node:        node-a\n"), "{text}");
        assert!(text.contains("staged key:   (none)\n"), "{text}");
        assert!(text.contains("previous key: (none)\n"), "{text}");

        let steps = Steps {
            stage: true,
            ..Steps::default()
        };
        let mut out = Vec::new();
        rotate(&dir, steps, &who(), &mut out).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with("staged generation 2 "));
        let mut out = Vec::new();
        show(&dir, true, &mut out).unwrap();
        let value: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["staged"]["generation"], 2);
        assert_eq!(value["previous"], Value::Null);
    }

    #[test]
    fn audit_commands_need_a_store() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let e = audit_show(tmp.path(), false, &mut out, &mut err).unwrap_err();
        assert!(matches!(
            e,
            CommandError::Store(StoreError::NotInitialized { .. })
        ));
        assert!(out.is_empty() && err.is_empty());
    }

    #[test]
    fn verify_counts_records_and_show_lists_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        init(dir, Some("node-a".into()), false, &who(), &mut Vec::new()).unwrap();
        let steps = Steps {
            all: true,
            ..Steps::default()
        };
        rotate(dir, steps, &who(), &mut Vec::new()).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(audit_verify(dir, true, &[], &mut out, &mut err).unwrap());
        let value: Value = serde_json::from_slice(&out).unwrap();
        let records = value["records"].as_u64().unwrap();
        assert!(records >= 4, "{value}");

        let (mut out, mut err) = (Vec::new(), Vec::new());
        assert!(audit_show(dir, false, &mut out, &mut err).unwrap());
        let table = String::from_utf8(out).unwrap();
        // A header line plus one line per record.
        assert_eq!(table.lines().count() as u64, records + 1, "{table}");
        assert!(table.starts_with("SEQ"), "{table}");
    }

    #[test]
    fn chain_joins_every_cause() {
        let e = CommandError::Read {
            path: "/x".into(),
            source: io::Error::other("gone"),
        };
        assert_eq!(chain(&e), "/x: gone");
    }
}
