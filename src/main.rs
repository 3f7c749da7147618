//! The `wgmesh` binary: parses the command line and dispatches to the library
//! (`wgmesh::commands` for `keys`, `status` and `graph`; `wgmesh::agent`,
//! `wgmesh::dataplane`), turning results into exit codes. No logic of a
//! command lives here.

mod cli;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use serde_json::json;
use wgmesh::commands::keys;
use wgmesh::keys::store::Attribution;

use cli::{AuditCommand, Cli, Command, InventoryOutput, KeysArgs, KeysCommand, Output};

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
            if args.bgp_mesh && !args.bgp {
                anyhow::bail!(
                    "--bgp-mesh needs --bgp (and --bgp-local-as, the same on every node)"
                );
            }
            if !args.bgp_route_reflectors.is_empty() && !args.bgp_mesh {
                anyhow::bail!("--bgp-route-reflectors needs --bgp-mesh: reflectors are part of the iBGP mesh between the nodes");
            }
            let wg_interface = args.interface.clone();
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
                bgp: args.bgp.then(|| wgmesh::routes::bgp::speaker::Settings {
                    local_as: args.bgp_local_as,
                    router_id: args.bgp_router_id,
                    neighbors: args.bgp_neighbor.clone(),
                    password_file: args.bgp_password_file.clone(),
                    config: args.bgp_config.clone(),
                    socket: args.bgp_socket.clone(),
                    table: args.bgp_table,
                    max_prefixes: args.bgp_max_prefixes,
                    spawn: !args.bgp_no_spawn,
                    log_file: Some(args.bgp_log.clone()),
                    mesh: args
                        .bgp_mesh
                        .then(|| wgmesh::routes::bgp::speaker::MeshSettings {
                            reflectors: args
                                .bgp_route_reflectors
                                .iter()
                                .map(|n| n.trim().to_owned())
                                .filter(|n| !n.is_empty())
                                .collect(),
                            interface: wg_interface.clone(),
                        }),
                }),
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
    let who = |reason: String| Attribution {
        actor: args.actor.clone().unwrap_or_else(keys::default_actor),
        reason,
    };
    let dir = args.store.as_path();
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let ok = match args.command {
        KeysCommand::Init {
            node_name,
            if_missing,
            reason,
        } => keys::init(dir, node_name, if_missing, &who(reason), &mut out).map(|()| true),
        KeysCommand::Show { output } => {
            keys::show(dir, output == Output::Json, &mut out).map(|()| true)
        }
        KeysCommand::Rotate {
            stage,
            activate,
            destroy_old,
            all_steps: all,
            abort,
            reason,
        } => {
            let steps = keys::Steps {
                stage,
                activate,
                destroy_old,
                all,
                abort,
            };
            if !steps.any() {
                // A usage error, before the store is touched: the three steps at
                // once switch keys before any peer has pre-accepted the next one.
                eprintln!("{}", keys::ROTATE_NEEDS_A_STEP);
                return Ok(ExitCode::from(2));
            }
            keys::rotate(dir, steps, &who(reason), &mut out).map(|()| true)
        }
        KeysCommand::Revoke { reason } => keys::revoke(dir, &who(reason), &mut out).map(|()| true),
        KeysCommand::Audit {
            command: AuditCommand::Verify { output, witness },
        } => keys::audit_verify(dir, output == Output::Json, &witness, &mut out, &mut err),
        KeysCommand::Audit {
            command: AuditCommand::Show { output },
        } => keys::audit_show(dir, output == Output::Json, &mut out, &mut err),
        KeysCommand::Inventory { source, output } => {
            let format = match output {
                InventoryOutput::Text => keys::InventoryFormat::Text,
                InventoryOutput::Json => keys::InventoryFormat::Json,
                InventoryOutput::Csv => keys::InventoryFormat::Csv,
            };
            keys::inventory(
                source.kubeconfig.as_deref(),
                source.max_key_age,
                format,
                &mut out,
            )
            .map(|()| true)
        }
        KeysCommand::Evidence {
            out: bundle,
            witness,
            source,
        } => keys::evidence_bundle(
            dir,
            &bundle,
            &witness,
            source.kubeconfig.as_deref(),
            source.max_key_age,
            &mut out,
            &mut err,
        ),
    }?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `status` and `graph`: the flags, handed to [`wgmesh::commands::status`].
fn gather_status(args: &cli::StatusArgs) -> Result<wgmesh::status::Status> {
    let src = wgmesh::commands::status::Source {
        node_name: args.node_name.clone(),
        kubeconfig: args.kubeconfig.clone(),
        interface: args.interface.clone(),
        uapi_dir: args.uapi_dir.clone(),
        backend: args.backend,
        cluster_cidrs: args.cluster_cidrs.clone(),
        bgp_socket: args.bgp_socket.clone(),
    };
    wgmesh::commands::status::gather(&src, &mut std::io::stderr().lock())
}
