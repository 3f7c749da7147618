//! `wgmesh-testbed`: runs N wgmesh nodes with pods in network namespaces on one Linux
//! host, with the real `wgmesh dataplane` and `wgmesh agent` processes and a test
//! Kubernetes API, and proves the mesh works (`check`, `demo`). For tests and demos
//! only; real clusters use `manifests/`. The hidden `api` command runs only the test
//! Kubernetes API (used by `up` and by tests).

mod cli;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use wgmesh_testbed::api::{ApiServer, ApiServerConfig, IpamConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("api") {
        return run_api(ApiArgs::parse_from(
            std::iter::once("wgmesh-testbed api".to_string()).chain(args.into_iter().skip(1)),
        ));
    }
    cli::main()
}

/// Runs only the testbed's in-memory Kubernetes API (Nodes, Events, discovery) in the
/// foreground, for tests. Prints the server URL as the first line of stdout, then logs
/// to stderr until SIGINT or SIGTERM. Plain HTTP, no authentication: never expose it.
#[derive(Debug, Parser)]
#[command(name = "wgmesh-testbed api", version)]
struct ApiArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "WGMESH_TESTBED_API_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Write a kubeconfig for the server here.
    #[arg(long, env = "WGMESH_TESTBED_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// Server URL to put in the kubeconfig instead of the listen address (e.g. a veth
    /// address agents in network namespaces can reach when listening on 0.0.0.0).
    #[arg(long, env = "WGMESH_TESTBED_KUBECONFIG_SERVER")]
    kubeconfig_server: Option<String>,

    /// Cluster pod CIDRs Node pod CIDRs are allocated from, at most one per family,
    /// comma-separated (the controller-manager's --cluster-cidr). Empty disables IPAM.
    #[arg(
        long,
        env = "WGMESH_TESTBED_CLUSTER_CIDR",
        default_value = "10.244.0.0/16",
        value_delimiter = ','
    )]
    cluster_cidr: Vec<String>,

    /// Allocate spec.podCIDRs to new Nodes (the controller-manager's
    /// --allocate-node-cidrs). `false`: Nodes are created without spec.podCIDRs, as in
    /// clusters without node IPAM, and each node claims its CIDRs itself (the
    /// wgmesh.dev/pod-cidrs annotation).
    #[arg(
        long,
        env = "WGMESH_TESTBED_ALLOCATE_NODE_CIDRS",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    allocate_node_cidrs: bool,

    /// Prefix length of each Node's IPv4 pod CIDR.
    #[arg(
        long,
        env = "WGMESH_TESTBED_NODE_CIDR_MASK_SIZE_IPV4",
        default_value_t = 24
    )]
    node_cidr_mask_size_ipv4: u8,

    /// Prefix length of each Node's IPv6 pod CIDR.
    #[arg(
        long,
        env = "WGMESH_TESTBED_NODE_CIDR_MASK_SIZE_IPV6",
        default_value_t = 64
    )]
    node_cidr_mask_size_ipv6: u8,

    /// Node changes kept for watches to resume from; older resourceVersions get 410 Gone.
    #[arg(long, env = "WGMESH_TESTBED_API_HISTORY", default_value_t = 1000)]
    history_limit: usize,

    /// Seconds between watch bookmarks (for watches that ask for them).
    #[arg(long, env = "WGMESH_TESTBED_API_BOOKMARK_SECONDS", default_value_t = 5)]
    bookmark_interval: u64,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WGMESH_TESTBED_LOG", default_value = "info")]
    log: String,
}

fn run_api(args: ApiArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut cluster_cidrs = Vec::new();
    // No cluster CIDR: the allocator hands out nothing (see IpamConfig).
    let allocate: &[String] = if args.allocate_node_cidrs {
        &args.cluster_cidr
    } else {
        &[]
    };
    for text in allocate.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match text.parse() {
            Ok(net) => cluster_cidrs.push(net),
            Err(e) => {
                eprintln!("wgmesh-testbed api: --cluster-cidr {text}: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let config = ApiServerConfig {
        listen: args.listen,
        ipam: IpamConfig {
            cluster_cidrs,
            node_mask_v4: args.node_cidr_mask_size_ipv4,
            node_mask_v6: args.node_cidr_mask_size_ipv6,
        },
        history_limit: args.history_limit,
        bookmark_interval: Duration::from_secs(args.bookmark_interval.max(1)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wgmesh-testbed api: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = match ApiServer::start(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("wgmesh-testbed api: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(path) = &args.kubeconfig {
            let written = match &args.kubeconfig_server {
                Some(url) => server.write_kubeconfig_with_server(path, url),
                None => server.write_kubeconfig(path),
            };
            if let Err(e) = written {
                eprintln!("wgmesh-testbed api: {e}");
                return ExitCode::FAILURE;
            }
        }
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{}", server.url())
            .and_then(|_| out.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
        drop(out);
        wait_for_signal().await;
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
