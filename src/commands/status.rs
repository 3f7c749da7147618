//! `wgmesh status` and `wgmesh graph`: what the device holds, next to what
//! the API says (Nodes, MeshRoutes) and BIRD's BGP sessions, as one [`Status`] for the table, the JSON
//! and the graph.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::status::Status;
use crate::wg::kernel::BackendKind;

/// Where `status` reads from (the flags of `wgmesh status`).
#[derive(Debug, Clone)]
pub struct Source {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub interface: String,
    pub uapi_dir: PathBuf,
    pub backend: BackendKind,
    pub cluster_cidrs: Vec<IpNet>,
    /// BIRD's control socket (`wgmesh agent --bgp-socket`).
    pub bgp_socket: PathBuf,
}

/// How long each API list may take before status goes on without it.
const API_WAIT: Duration = Duration::from_secs(10);

/// The device's live peers plus the Nodes and MeshRoutes (if the API
/// answers; if not, a warning goes to `warn` and peers are shown by key). The
/// device is found by the agent's rule for `--backend` (kernel WireGuard or a
/// UAPI socket), except that status never creates a link.
pub fn gather(src: &Source, warn: &mut dyn Write) -> Result<Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let flag = format!("--backend {}", src.backend);
    let (backend, reason) = rt
        .block_on(crate::wg::kernel::select_reader(
            src.backend,
            &src.interface,
            &src.uapi_dir,
        ))
        .context(flag.clone())?;
    let (device, stats, peers) = {
        let mut backend = backend
            .lock()
            .map_err(|_| anyhow::anyhow!("the backend lock is poisoned"))?;
        let stats = backend
            .peer_stats()
            .with_context(|| format!("{flag}: {reason}"))?;
        let peers = backend
            .state()
            .with_context(|| format!("{flag}: {reason}"))?
            .peers;
        (backend.describe(), stats, peers)
    };
    let (nodes, grants) = match rt.block_on(read_api(src.kubeconfig.as_deref(), warn)) {
        Ok(n) => n,
        Err(e) => {
            let _ = writeln!(
                warn,
                "warning: cannot read Nodes ({e:#}); peers are shown by key only"
            );
            (Vec::new(), Vec::new())
        }
    };
    let cidrs: Vec<IpNet> = src.cluster_cidrs.iter().map(IpNet::trunc).collect();
    let mut status = crate::status::build(
        &src.node_name,
        &device,
        &cidrs,
        &nodes,
        &stats,
        SystemTime::now(),
    );
    status.add_routes(&cidrs, &nodes, &grants, &peers);
    // BGP is optional: no socket means it is not in use here, which is not
    // worth a warning; a socket that does not answer is.
    if src.bgp_socket.exists() {
        let bird = crate::routes::bgp::engine::Bird::new(PathBuf::new(), &src.bgp_socket);
        match bird.protocols() {
            Ok(protocols) => status.add_sessions(&protocols),
            Err(e) => {
                let _ = writeln!(
                    warn,
                    "warning: cannot read BGP sessions from {} ({e}); they are not shown",
                    src.bgp_socket.display()
                );
            }
        }
    }
    Ok(status)
}

/// The Nodes (an error when they cannot be listed) and the MeshRoute grants
/// (empty, with a warning, when they cannot; empty when the CRD is absent).
async fn read_api(
    kubeconfig: Option<&Path>,
    warn: &mut dyn Write,
) -> Result<(Vec<Node>, Vec<serde_json::Value>)> {
    let client = crate::k8s::client(kubeconfig).await?;
    let api: kube::Api<Node> = kube::Api::all(client.clone());
    let list = tokio::time::timeout(API_WAIT, api.list(&Default::default()))
        .await
        .context("the Kubernetes API did not answer within 10 s")??;
    let routes: kube::Api<kube::core::DynamicObject> =
        kube::Api::all_with(client, &crate::agent::meshroute_resource());
    let grants = match tokio::time::timeout(API_WAIT, routes.list(&Default::default())).await {
        Ok(Ok(l)) => l
            .items
            .iter()
            .filter_map(|o| serde_json::to_value(o).ok())
            .collect(),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => Vec::new(),
        Ok(Err(e)) => {
            let _ = writeln!(
                warn,
                "warning: cannot read MeshRoutes ({e}); extra prefixes are not shown"
            );
            Vec::new()
        }
        Err(_) => {
            let _ = writeln!(
                warn,
                "warning: MeshRoutes not listed within 10 s; extra prefixes are not shown"
            );
            Vec::new()
        }
    };
    Ok((list.items, grants))
}
