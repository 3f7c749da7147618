//! The `wgmesh` binary: parses the command line and runs the command. All logic
//! lives in the library; this file formats its results.

mod cli;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use jiff::Timestamp;
use serde_json::json;
use wgmesh::keys::audit::{self, AuditRecord, EventKind, VerifyError};
use wgmesh::keys::evidence::{self, Bundle, Policy};
use wgmesh::keys::rotation::KeyMeta;
use wgmesh::keys::store::{Attribution, Store, StoreError, RECOVERY_ACTOR};

use cli::{
    AuditCommand, Cli, Command, InventoryOutput, InventorySource, KeysArgs, KeysCommand, Output,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, skipping a cause whose text the message before it
/// already contains (our error types name their cause in their message).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Version { output } => {
            if output == Output::Json {
                println!("{}", json!({ "version": wgmesh::VERSION }));
            } else {
                println!("wgmesh {}", wgmesh::VERSION);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(args) => keys(args),
        Command::Agent(args) => {
            let cfg = wgmesh::agent::AgentConfig {
                node_name: args.node_name,
                store: args.store,
                interface: args.interface,
                uapi_dir: args.uapi_dir,
                listen_port: args.listen_port,
                endpoint: args.endpoint,
                cluster_cidrs: args.cluster_cidrs.iter().map(|c| c.trunc()).collect(),
                pod_cidrs: args.pod_cidrs.iter().map(|c| c.trunc()).collect(),
                encrypt_host_traffic: args.encrypt_host_traffic,
                masquerade: args.masquerade,
                route_table: args.route_table,
                rule_priority: args.rule_priority,
                api_servers: Vec::new(),
                rotation: wgmesh::keys::schedule::Policy {
                    max_age: args.key_max_age.0,
                    jitter: args.rotation_jitter,
                    confirm_deadline: args.rotation_confirm_deadline,
                    grace: args.rotation_grace,
                },
                rotation_stagger: args.rotation_stagger,
                mtu: args.mtu,
                persistent_keepalive: (args.persistent_keepalive > 0)
                    .then_some(args.persistent_keepalive),
                manage_network: !args.no_network,
                debounce: std::time::Duration::from_millis(args.debounce_ms),
                resync: std::time::Duration::from_secs(args.resync_seconds.max(1)),
                backend: args.backend,
                cni_dir: (!args.no_cni).then(|| args.cni_dir.clone()),
                cni_overwrite: args.cni_overwrite,
                metrics_listen: match args.metrics_listen.as_str() {
                    "off" | "" => None,
                    addr => Some(addr.parse().with_context(|| {
                        format!("--metrics-listen {addr:?}: expected ip:port or \"off\"")
                    })?),
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let mut cfg = cfg;
                if args.backstops_only {
                    wgmesh::agent::write_backstops(&cfg).await?;
                    return anyhow::Ok(());
                }
                let config = wgmesh::k8s::config(args.kubeconfig.as_deref()).await?;
                cfg.api_servers = wgmesh::k8s::server_addrs(&config).await;
                let client = kube::Client::try_from(config)?;
                wgmesh::agent::run(cfg, client, args.once).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let status = gather_status(&args)?;
            if args.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!(
                    "{}",
                    wgmesh::status::table(&status, std::time::SystemTime::now())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Graph(args) => {
            print!("{}", wgmesh::status::dot(&gather_status(&args)?));
            Ok(ExitCode::SUCCESS)
        }
        Command::Dataplane(args) => {
            if args.interface.is_empty() || args.interface.len() > 15 {
                anyhow::bail!(
                    "--interface {:?}: an interface name is 1 to 15 characters",
                    args.interface
                );
            }
            let opts = wgmesh::dataplane::Options {
                interface: args.interface,
                mtu: args.mtu,
                offload: !args.no_offload,
                udp_buffer: args.udp_buffer,
            };
            wgmesh::dataplane::run(opts, args.uapi_dir)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn keys(args: KeysArgs) -> Result<ExitCode> {
    let actor = args.actor.clone().unwrap_or_else(default_actor);
    let who = |reason: &str| Attribution {
        actor: actor.clone(),
        reason: reason.to_string(),
    };
    let dir = args.store.as_path();
    match args.command {
        KeysCommand::Init {
            node_name,
            if_missing,
            reason,
        } => {
            let node = match node_name {
                Some(n) => n,
                None => hostname()?,
            };
            match Store::init(dir, &node, &who(&reason)) {
                Ok(store) => {
                    let a = &store.state().active;
                    println!(
                        "initialized {} for node {node}: public key {} (fingerprint {}, generation {})",
                        dir.display(),
                        a.public_key,
                        a.fingerprint,
                        a.generation
                    );
                }
                Err(StoreError::AlreadyInitialized { .. }) if if_missing => {
                    let store = Store::open(dir)?;
                    println!(
                        "{} already holds a key store (active fingerprint {}); nothing changed",
                        dir.display(),
                        store.state().active.fingerprint
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        KeysCommand::Show { output } => show(&Store::open(dir)?, output)?,
        KeysCommand::Rotate {
            stage,
            activate,
            destroy_old,
            all_steps: all,
            abort,
            reason,
        } => {
            if !(stage || activate || destroy_old || all || abort) {
                // A usage error, before the store is touched: the three steps at
                // once switch keys before any peer has pre-accepted the next one.
                eprintln!("{ROTATE_NEEDS_A_STEP}");
                return Ok(ExitCode::from(2));
            }
            let mut store = Store::open(dir)?;
            let who = who(&reason);
            if stage || all {
                store.stage(&who)?;
                let k = store
                    .state()
                    .staged
                    .as_ref()
                    .context("no staged key after staging")?;
                println!("staged generation {} (fingerprint {}, public key {}); peers must pre-accept it before `--activate`", k.generation, k.fingerprint, k.public_key);
            }
            if abort {
                let staged = store.state().staged.clone();
                store.abort_staged(&who)?;
                if let Some(k) = staged {
                    println!("aborted the staged rotation: generation {} (fingerprint {}) withdrawn and destroyed; the active key is unchanged", k.generation, k.fingerprint);
                }
            }
            if activate || all {
                // By hand, peer confirmations are not tracked: the record says
                // so by carrying no `unconfirmed` list.
                store.activate(None, &who)?;
                let k = &store.state().active;
                println!("activated generation {} (fingerprint {}); the previous key is kept until `--destroy-old`", k.generation, k.fingerprint);
            }
            if destroy_old || all {
                let old = store.state().previous.clone();
                store.destroy_old(&who)?;
                if let Some(k) = old {
                    println!(
                        "grace period ended; destroyed generation {} (fingerprint {})",
                        k.generation, k.fingerprint
                    );
                }
            }
        }
        KeysCommand::Revoke { reason } => {
            let mut store = Store::open(dir)?;
            let held: Vec<KeyMeta> = store.state().keys().cloned().collect();
            store.revoke(&who(&reason))?;
            for k in held {
                println!(
                    "revoked and destroyed generation {} (fingerprint {})",
                    k.generation, k.fingerprint
                );
            }
            let k = &store.state().active;
            println!(
                "active now: generation {} (fingerprint {}, public key {})",
                k.generation, k.fingerprint, k.public_key
            );
        }
        KeysCommand::Audit { command } => return audit(dir, command),
        KeysCommand::Inventory { source, output } => {
            let nodes = list_nodes(source.kubeconfig.as_deref())?;
            let policy = Policy {
                max_key_age: source.max_key_age,
            };
            let now = Timestamp::now();
            let rows = evidence::inventory(&nodes, &policy, now);
            match output {
                InventoryOutput::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&evidence::inventory_json(&rows, &policy, now))?
                ),
                InventoryOutput::Csv => print!("{}", evidence::inventory_csv(&rows)),
                InventoryOutput::Text => {
                    print!("{}", evidence::inventory_text(&rows, &policy));
                    let s = evidence::summary(&rows);
                    println!(
                        "{} nodes: {} ok, {} OVERDUE (max key age {}), {} age unknown, {} without a key, {} invalid",
                        s["nodes"],
                        s["ok"],
                        s["overdue"],
                        evidence::format_duration(policy.max_key_age),
                        s["age_unknown"],
                        s["no_key"],
                        s["invalid"]
                    );
                }
            }
        }
        KeysCommand::Evidence {
            out,
            witness,
            source,
        } => return evidence_bundle(dir, &out, &witness, &source),
    }
    Ok(ExitCode::SUCCESS)
}

/// Every Node, from the API (10 s timeout).
fn list_nodes(
    kubeconfig: Option<&std::path::Path>,
) -> Result<Vec<k8s_openapi::api::core::v1::Node>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let client = wgmesh::k8s::client(kubeconfig).await?;
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        let list = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            api.list(&Default::default()),
        )
        .await
        .context("the Kubernetes API did not answer within 10 s")?
        .context("cannot list Nodes")?;
        anyhow::Ok(list.items)
    })
}

/// `wgmesh keys evidence`: see its `--help`. Reads the store without opening
/// it (no lock, no recovery append), so producing evidence changes nothing.
fn evidence_bundle(
    dir: &std::path::Path,
    out: &std::path::Path,
    witnesses: &[std::path::PathBuf],
    source: &InventorySource,
) -> Result<ExitCode> {
    let now = Timestamp::now();
    let policy = Policy {
        max_key_age: source.max_key_age,
    };
    let mut bundle = Bundle::create(out)?;
    bundle.add("policy.json", &pretty(&policy.to_json())?)?;

    // This node's log, exactly as stored, and its verification.
    let log_path = dir.join("audit.jsonl");
    let mut verified_ok = None;
    let mut node = Store::node_of(dir).unwrap_or(None);
    let mut log_head = None;
    if log_path.exists() {
        let log = std::fs::read(&log_path).with_context(|| log_path.display().to_string())?;
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
    let mut inventory_about = serde_json::Value::Null;
    match list_nodes(source.kubeconfig.as_deref()) {
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
                    _ => serde_json::Value::Null,
                },
            });
        }
        Err(e) => {
            let why = format!("cannot read Nodes from the API: {e:#}");
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
    println!(
        "evidence bundle written to {}: {files} files and {}; its sha256 is {digest} (record it somewhere this host cannot write)",
        out.display(),
        evidence::MANIFEST
    );
    for (name, why) in &missing {
        eprintln!("warning: the bundle is incomplete: {name} is missing: {why}");
    }
    if verified_ok == Some(false) {
        eprintln!("warning: the audit log FAILED verification; see verification.txt in the bundle");
    }
    Ok(if missing.is_empty() && verified_ok == Some(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn pretty(value: &serde_json::Value) -> Result<Vec<u8>> {
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    Ok(text)
}

const ROTATE_NEEDS_A_STEP: &str = "error: `wgmesh keys rotate` needs a step flag: \
--stage (generate the next key and publish it for peers to pre-accept), then \
--activate (switch to it once peers have it), then --destroy-old (destroy the \
previous key once no peer needs it). Peers must pre-accept the next key before \
this node switches to it, or traffic to this node stops until every peer learns \
the new key; running the three steps at once gives them no chance to. On a \
standalone host without peers, pass --all-steps (WGMESH_ROTATE_ALL_STEPS=true). \
To abandon a staged rotation instead, pass --abort.";

/// The device's live peers plus the Nodes (if the API answers).
fn gather_status(args: &cli::StatusArgs) -> Result<wgmesh::status::Status> {
    use wgmesh::wg::Backend as _;
    let mut backend = wgmesh::wg::uapi::UapiBackend::for_interface(&args.uapi_dir, &args.interface);
    let stats = backend.peer_stats()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let nodes = rt.block_on(async {
        let client = wgmesh::k8s::client(args.kubeconfig.as_deref()).await?;
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
        let list = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            api.list(&Default::default()),
        )
        .await
        .context("the Kubernetes API did not answer within 10 s")??;
        anyhow::Ok(list.items)
    });
    let nodes = match nodes {
        Ok(n) => n,
        Err(e) => {
            eprintln!("warning: cannot read Nodes ({e:#}); peers are shown by key only");
            Vec::new()
        }
    };
    let cidrs: Vec<ipnet::IpNet> = args.cluster_cidrs.iter().map(|c| c.trunc()).collect();
    Ok(wgmesh::status::build(
        &args.node_name,
        &cidrs,
        &nodes,
        &stats,
        std::time::SystemTime::now(),
    ))
}

fn show(store: &Store, output: Output) -> Result<()> {
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
    if output == Output::Json {
        let value = json!({
            "node": store.node(),
            "store": store.dir(),
            "phase": state.phase(),
            "active": key_json(&state.active),
            "staged": state.staged.as_ref().map(key_json),
            "previous": state.previous.as_ref().map(key_json),
            "orphaned_key_files": store.orphans(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
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
                    wgmesh::text::duration(age_seconds(k.created, now).unsigned_abs())
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

fn audit(dir: &std::path::Path, command: AuditCommand) -> Result<ExitCode> {
    if !dir.join("state.json").exists() && !dir.join("audit.jsonl").exists() {
        return Err(StoreError::NotInitialized {
            dir: dir.to_path_buf(),
        }
        .into());
    }
    match command {
        AuditCommand::Verify { output, witness } => {
            let v = verification(dir, &witness)?;
            if output == Output::Json {
                println!("{}", v.json);
            } else {
                for line in &v.out {
                    println!("{line}");
                }
            }
            for line in &v.err {
                eprintln!("{line}");
            }
            Ok(if v.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Show { output } => {
            let result = Store::verify_audit(dir)?;
            let (records, error) = match result {
                Ok(v) => (v.records, None),
                Err(e) => (readable_prefix(dir, &e)?, Some(e)),
            };
            if output == Output::Json {
                let mut out = std::io::stdout().lock();
                for r in &records {
                    writeln!(out, "{}", r.to_line())?;
                }
            } else {
                print_table(&records)?;
            }
            match error {
                None => Ok(ExitCode::SUCCESS),
                Some(e) => {
                    eprintln!("audit log FAILED verification: {e}; records from that line on are not shown");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// What `audit verify` found: the lines it prints and its JSON.
struct Verification {
    ok: bool,
    json: serde_json::Value,
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
fn verification(dir: &std::path::Path, witnesses: &[std::path::PathBuf]) -> Result<Verification> {
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
    let log = std::fs::read(dir.join("audit.jsonl")).unwrap_or_default();
    let records = match &result {
        Ok(v) => v.records.clone(),
        Err(e) => audit::readable_prefix(&log, e),
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
    witnesses: &[std::path::PathBuf],
    out: &mut Vec<String>,
    err: &mut Vec<String>,
) -> (bool, serde_json::Value) {
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
    let problems: Vec<serde_json::Value> = report
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

/// The records before the first bad line, for showing a broken log.
fn readable_prefix(dir: &std::path::Path, err: &VerifyError) -> Result<Vec<AuditRecord>> {
    let log = std::fs::read(dir.join("audit.jsonl")).unwrap_or_default();
    Ok(audit::readable_prefix(&log, err))
}

fn print_table(records: &[AuditRecord]) -> Result<()> {
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
    write!(
        std::io::stdout().lock(),
        "{}",
        wgmesh::text::table(&header, &rows)
    )?;
    Ok(())
}

fn age_seconds(created: Timestamp, now: Timestamp) -> i64 {
    now.as_second().saturating_sub(created.as_second()).max(0)
}

fn default_actor() -> String {
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

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("cannot read the host name; pass --node-name (or NODE_NAME)")?;
    let name = name.trim();
    anyhow::ensure!(
        !name.is_empty(),
        "the host name is empty; pass --node-name (or NODE_NAME)"
    );
    Ok(name.to_string())
}
