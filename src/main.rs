//! The `wgmesh` binary: parses the command line and runs the command. All logic
//! lives in the library; this file formats its results.

mod cli;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use jiff::Timestamp;
use serde_json::json;
use wgmesh::keys::audit::{AuditRecord, EventKind, VerifyError};
use wgmesh::keys::rotation::KeyMeta;
use wgmesh::keys::store::{Attribution, Store, StoreError};

use cli::{AuditCommand, Cli, Command, KeysArgs, KeysCommand, Output};

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
            reason,
        } => {
            if !(stage || activate || destroy_old || all) {
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
            if activate || all {
                store.activate(&who)?;
                let k = &store.state().active;
                println!("activated generation {} (fingerprint {}); the previous key is kept until `--destroy-old`", k.generation, k.fingerprint);
            }
            if destroy_old || all {
                let old = store.state().previous.clone();
                store.destroy_old(&who)?;
                if let Some(k) = old {
                    println!(
                        "destroyed generation {} (fingerprint {})",
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
    }
    Ok(ExitCode::SUCCESS)
}

const ROTATE_NEEDS_A_STEP: &str = "error: `wgmesh keys rotate` needs a step flag: \
--stage (generate the next key and publish it for peers to pre-accept), then \
--activate (switch to it once peers have it), then --destroy-old (destroy the \
previous key once no peer needs it). Peers must pre-accept the next key before \
this node switches to it, or traffic to this node stops until every peer learns \
the new key; running the three steps at once gives them no chance to. On a \
standalone host without peers, pass --all-steps (WGMESH_ROTATE_ALL_STEPS=true).";

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
    let result = Store::verify_audit(dir)?;
    match command {
        AuditCommand::Verify { output } => {
            let ok = result.is_ok();
            // Records written ahead of a commit that never happened, not yet
            // recorded as aborted: the chain is intact, but the log's last
            // operation did not take effect, and the reader must know.
            // Verifying the log must not depend on state.json being readable.
            let uncommitted = Store::uncommitted(dir).unwrap_or_else(|e| {
                eprintln!(
                    "warning: cannot tell whether the log's last operation was committed: {e}"
                );
                None
            });
            let aborted: Vec<u64> = result.as_ref().map_or_else(
                |_| Vec::new(),
                |v| {
                    v.records
                        .iter()
                        .filter(|r| r.event == EventKind::Aborted)
                        .map(|r| r.seq)
                        .collect()
                },
            );
            if output == Output::Json {
                let pending = uncommitted.as_ref().map(|u| {
                    json!({
                        "operation": u.operation(),
                        "first_seq": u.first_seq(),
                        "last_seq": u.last_seq(),
                    })
                });
                let value = match &result {
                    Ok(v) => json!({
                        "ok": true,
                        "records": v.records.len(),
                        "head": v.head,
                        "aborted_records": aborted,
                        "uncommitted": pending,
                    }),
                    Err(e) => json!({
                        "ok": false,
                        "line": e.line,
                        "problem": e.problem,
                        "uncommitted": pending,
                    }),
                };
                println!("{value}");
            } else {
                match &result {
                    Ok(v) => println!(
                        "audit log OK: {} records, chain intact, head seq {} hash {}\n(keep the head hash somewhere this host cannot write to prove later that history was not rewritten)",
                        v.records.len(),
                        v.head.seq,
                        v.head.hash
                    ),
                    Err(e) => eprintln!("audit log FAILED verification: {e}"),
                }
                if !aborted.is_empty() {
                    let seqs: Vec<String> = aborted.iter().map(u64::to_string).collect();
                    println!(
                        "aborted operations recorded: seq {} (each names records that were logged but never committed; `wgmesh keys audit show` lists them)",
                        seqs.join(", ")
                    );
                }
            }
            if let Some(u) = &uncommitted {
                eprintln!(
                    "warning: the log's last operation, {}, is not reflected in state.json: it was interrupted before its commit and did not take effect; the next key operation or store open (agent start, `wgmesh keys show`) records it as aborted",
                    u.describe()
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Show { output } => {
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

/// The records before the first bad line, for showing a broken log.
fn readable_prefix(dir: &std::path::Path, err: &VerifyError) -> Result<Vec<AuditRecord>> {
    let path = dir.join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    Ok(text
        .lines()
        .take(err.line.saturating_sub(1))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
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
