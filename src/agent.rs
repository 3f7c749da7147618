//! `wgmesh agent`: the reconcile loop that turns Node objects into a working
//! encrypted mesh on one node.
//!
//! Each pass: read every Node from the reflector's cache, publish this node's
//! annotations if a value changed, decode and plan, raise an Event for each
//! newly rejected Node, diff the plan against the device's actual peers and
//! apply only the difference in one transaction, then make sure the link is up
//! with its MTU and the fail-closed routes exist. A pass that finds everything
//! in place writes nothing: not to the API, not to the device, not to netlink.
//!
//! On SIGTERM the agent just exits: annotations, device and routes stay, so a
//! rolling update never drops the node from anyone's mesh. When the API server
//! is unreachable the watcher retries with backoff and the device keeps the
//! last mesh it was given.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::k8s::{K8sError, Publisher};
use crate::keys::store::{Attribution, Store, StoreError};
use crate::keys::PrivateKey;
use crate::mesh::{self, MeshConfig, PeerChange, Plan};
use crate::net::Net;
use crate::node::{self, annotations, LocalAnnotations, ValidationConfig};
use crate::telemetry::{self, PassState, Telemetry};
use crate::wg::kernel::{select_backend, BackendKind};
use crate::wg::{self, Backend, LocalDevice};

/// The tunnel MTU when the underlay's is unknown: 1500 − 80.
const DEFAULT_MTU: u16 = 1420;

/// The VirtualBox NAT address every Vagrant VM has: never a usable endpoint.
const VIRTUALBOX_NAT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 2, 15));

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub store: PathBuf,
    pub interface: String,
    pub uapi_dir: PathBuf,
    pub listen_port: u16,
    /// Overrides every other endpoint source.
    pub endpoint: Option<SocketAddr>,
    pub cluster_cidrs: Vec<IpNet>,
    /// `None`: underlay MTU − 80.
    pub mtu: Option<u16>,
    pub persistent_keepalive: Option<u16>,
    /// Program the link (up, MTU) and the fail-closed routes.
    pub manage_network: bool,
    /// How long to wait for more Node events before a pass (coalescing bursts).
    pub debounce: Duration,
    /// Re-check the device this often even without Node events (drift).
    pub resync: Duration,
    /// Where to serve /metrics, /healthz and /readyz; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Kernel WireGuard, the UAPI socket, or whichever is available.
    pub backend: BackendKind,
    /// Where to write the CNI conflist; `None`: do not write one.
    pub cni_dir: Option<PathBuf>,
    /// Replace a conflist of the same name that wgmesh did not write.
    pub cni_overwrite: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    K8s(#[from] K8sError),
    #[error(transparent)]
    Device(#[from] wg::WgError),
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("this node ({0}) has no Node object; is --node-name (NODE_NAME) right?")]
    NoOwnNode(String),
    #[error("no endpoint for this node: pass --endpoint, set the wgmesh.dev/force-endpoint annotation, or give the Node an InternalIP")]
    NoEndpoint,
    #[error("the Node watch ended")]
    WatchEnded,
    #[error("CNI config: {0}")]
    Cni(#[from] crate::cni::CniError),
    #[error("internal: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// What one pass did, for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub published: bool,
    pub events: usize,
    pub peers: usize,
    pub excluded: usize,
    pub device_changes: usize,
    pub link_changed: bool,
    pub routes_changed: usize,
    pub cni_written: bool,
}

impl PassReport {
    /// Whether the pass wrote anything anywhere.
    pub fn wrote(&self) -> bool {
        self.published
            || self.events > 0
            || self.device_changes > 0
            || self.link_changed
            || self.routes_changed > 0
            || self.cni_written
    }
}

/// The device, shared with the blocking task that talks to it.
pub type SharedBackend = Arc<std::sync::Mutex<dyn Backend>>;

/// The agent's state across passes.
pub struct Agent {
    cfg: AgentConfig,
    store: Store,
    publisher: Publisher,
    backend: SharedBackend,
    net: Option<Arc<Net>>,
    /// (node, reason) already reported, so an Event is raised once per problem.
    reported: HashMap<String, String>,
    last_endpoint: Option<SocketAddr>,
    last_mtu: Option<u16>,
    announced_key: bool,
    telemetry: Telemetry,
    warned_foreign_cni: bool,
}

impl Agent {
    /// Opens (or creates) the key store and connects to the device (over its
    /// UAPI socket) and netlink.
    pub async fn new(cfg: AgentConfig, client: Client) -> Result<Self> {
        let (backend, reason) = select_backend(cfg.backend, &cfg.interface, &cfg.uapi_dir).await?;
        tracing::info!(%reason, "backend selected");
        Self::with_backend(cfg, client, backend).await
    }

    /// As [`Agent::new`], with any backend (tests use the in-memory one).
    pub async fn with_backend(
        cfg: AgentConfig,
        client: Client,
        backend: SharedBackend,
    ) -> Result<Self> {
        let store = match Store::open(&cfg.store) {
            Ok(s) => s,
            Err(StoreError::NotInitialized { .. }) => {
                let who = Attribution {
                    actor: "agent".into(),
                    reason: "first start of the agent on this node".into(),
                };
                let s = Store::init(&cfg.store, &cfg.node_name, &who)?;
                tracing::info!(store = %cfg.store.display(), fingerprint = %s.state().active.fingerprint, "generated this node's key");
                s
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(
            node = %cfg.node_name,
            fingerprint = %store.state().active.fingerprint,
            generation = store.state().active.generation,
            phase = %store.state().phase(),
            "key store open"
        );
        let net = if cfg.manage_network {
            Some(Arc::new(Net::connect()?))
        } else {
            None
        };
        let described = backend.lock().map(|b| b.describe()).unwrap_or_default();
        tracing::info!(backend = %described, "WireGuard backend");
        Ok(Self {
            publisher: Publisher::new(client, &cfg.node_name),
            cfg,
            store,
            backend,
            net,
            reported: HashMap::new(),
            last_endpoint: None,
            last_mtu: None,
            announced_key: false,
            telemetry: Telemetry::new(),
            warned_foreign_cni: false,
        })
    }

    /// The agent's metrics and health.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// The device, for live statistics.
    pub fn backend(&self) -> SharedBackend {
        self.backend.clone()
    }

    /// One reconcile pass over `nodes` (every Node in the cluster).
    pub async fn pass(&mut self, nodes: &[Arc<Node>]) -> Result<PassReport> {
        let started = std::time::Instant::now();
        let result = self.pass_inner(nodes).await;
        self.telemetry
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Err(AgentError::Device(_)) => self.telemetry.set_device_ok(false),
            Err(AgentError::K8s(_)) => {
                self.telemetry.api_errors.inc();
            }
            _ => {}
        }
        result
    }

    async fn pass_inner(&mut self, nodes: &[Arc<Node>]) -> Result<PassReport> {
        let mut report = PassReport::default();
        let own = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.cfg.node_name.as_str()))
            .ok_or_else(|| AgentError::NoOwnNode(self.cfg.node_name.clone()))?;

        // 1. This node's annotations.
        let private = self.store.active_private()?;
        let endpoint = self.endpoint(own)?;
        let state = self.store.state().clone();
        let desired = LocalAnnotations {
            public_key: state.active.public_key,
            key_generation: state.active.generation,
            key_created: state.active.created,
            next_public_key: state.staged.as_ref().map(|k| k.public_key),
            endpoint,
            pod_cidrs: own_pod_cidrs(own),
        };
        let published_key = own
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::PUBLIC_KEY))
            .cloned();
        if self.publisher.publish(own, &desired).await? {
            report.published = true;
            tracing::info!(node = %self.cfg.node_name, "published annotations");
        }
        if published_key.as_deref() != Some(desired.public_key.to_base64().as_str())
            && !self.announced_key
        {
            let note = format!(
                "wgmesh published public key {} (fingerprint {}, generation {})",
                desired.public_key, state.active.fingerprint, state.active.generation
            );
            self.publisher
                .event(own, false, "KeyPublished", "Publish", note)
                .await?;
            self.announced_key = true;
            report.events += 1;
        }

        // 2. Plan.
        let vcfg = ValidationConfig {
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
        };
        let decoded: Vec<_> = nodes.iter().map(|n| node::decode(n, &vcfg)).collect();
        let mcfg = MeshConfig {
            local_node: self.cfg.node_name.clone(),
            interface: self.cfg.interface.clone(),
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            default_keepalive: self.cfg.persistent_keepalive,
        };
        let plan = mesh::plan(&mcfg, &decoded);
        report.peers = plan.peers.len();
        report.excluded = plan.excluded.len();
        report.events += self.report_exclusions(&plan, nodes).await?;

        self.telemetry.set_pass(PassState::from_plan(
            &plan,
            state.active.generation,
            Some(state.active.created),
        ));

        // 3. The device.
        report.device_changes = self.program_device(&private, &plan).await?;
        self.telemetry.set_device_ok(true);

        // 4. Link and routes.
        let mtu = match (self.cfg.mtu, self.net.clone()) {
            (Some(m), _) => m,
            (None, Some(net)) => self.tunnel_mtu(&net, endpoint, &plan).await,
            (None, None) => DEFAULT_MTU,
        };
        if let Some(net) = self.net.clone() {
            // The routes are attempted even when the link step fails (the data
            // plane not running yet): their blackhole backstops go in first and
            // keep cluster traffic from leaving in plaintext meanwhile.
            let link = net.ensure_link_up(&self.cfg.interface, mtu).await;
            if let Ok(l) = &link {
                if !l.is_empty() {
                    tracing::info!(interface = %self.cfg.interface, mtu, "link set up");
                    report.link_changed = true;
                }
            }
            let routes: Vec<IpNet> = plan.routes.iter().map(|r| r.destination).collect();
            let changes = net.ensure_routes(&self.cfg.interface, &routes).await;
            link?;
            let changes = changes?;
            if !changes.is_empty() {
                tracing::info!(interface = %self.cfg.interface, %changes, "routes updated");
            }
            report.routes_changed =
                changes.added.len() + changes.replaced.len() + changes.removed.len();
            for conflict in &changes.conflicts {
                tracing::warn!(route = %conflict, "a route not created by wgmesh covers a cluster CIDR; left alone, traffic may bypass the tunnel");
            }
        }

        // 5. The CNI config for this node's pods.
        if let Some(dir) = self.cfg.cni_dir.clone() {
            report.cni_written = self.write_cni(&dir, own, mtu)?;
        }
        Ok(report)
    }

    /// Writes the conflist for this node's pod CIDRs and the tunnel MTU; a
    /// file wgmesh did not write is left alone (with one warning) unless
    /// `cni_overwrite`.
    fn write_cni(&mut self, dir: &std::path::Path, own: &Node, mtu: u16) -> Result<bool> {
        let cidrs = own_pod_cidrs(own);
        if cidrs.is_empty() {
            return Ok(false);
        }
        let content = crate::cni::conflist(&crate::cni::CniConfig {
            pod_cidrs: cidrs,
            mtu,
            portmap: true,
        })?;
        let outcome = crate::cni::write_conflist(
            dir,
            crate::cni::DEFAULT_FILE_NAME,
            &content,
            self.cfg.cni_overwrite,
        )?;
        match outcome {
            crate::cni::Outcome::ForeignKept if !self.warned_foreign_cni => {
                tracing::warn!(dir = %dir.display(), file = crate::cni::DEFAULT_FILE_NAME, "a CNI config wgmesh did not write is there; left alone (--cni-overwrite replaces it)");
                self.warned_foreign_cni = true;
            }
            o if o.wrote() => {
                tracing::info!(dir = %dir.display(), outcome = ?o, mtu, "CNI config written");
            }
            _ => {}
        }
        Ok(outcome.wrote())
    }

    /// Underlay MTU − 80. The underlay is the interface holding this node's
    /// endpoint address; when the endpoint is not local (NAT, a forced public
    /// address), the route towards the first peer; else the safe 1420.
    async fn tunnel_mtu(&mut self, net: &Net, endpoint: SocketAddr, plan: &Plan) -> u16 {
        let local = net.mtu_of_address(endpoint.ip()).await.ok().flatten();
        let underlay = match local {
            Some(m) => Some(m),
            None => match plan.peers.first() {
                Some(p) => net
                    .underlay_mtu(p.config.endpoint.map_or(endpoint.ip(), |e| e.ip()))
                    .await
                    .ok(),
                None => None,
            },
        };
        let mtu = underlay.map_or(DEFAULT_MTU, crate::net::tunnel_mtu);
        if self.last_mtu != Some(mtu) {
            tracing::info!(mtu, underlay = ?underlay, "tunnel MTU chosen");
            self.last_mtu = Some(mtu);
        }
        mtu
    }

    async fn program_device(&mut self, private: &PrivateKey, plan: &Plan) -> Result<usize> {
        let desired = plan.peer_configs();
        let backend = self.backend.clone();
        let key = private.clone();
        let port = self.cfg.listen_port;
        let changes = tokio::task::spawn_blocking(move || -> wg::Result<wg::ChangeSet> {
            // A poisoned lock only means an earlier pass panicked mid-call;
            // the device itself is the source of truth, so carry on.
            let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
            let state = backend.state()?;
            let local = LocalDevice {
                private_key: &key,
                listen_port: port,
            };
            let changes = wg::reconcile(&state, &local, &desired);
            backend.apply(&changes)?;
            Ok(changes)
        })
        .await??;
        if changes.is_empty() {
            return Ok(0);
        }
        let (mut add, mut remove, mut update) = (0, 0, 0);
        for c in &changes.peers {
            match c {
                PeerChange::Add(_) => add += 1,
                PeerChange::Remove(_) => remove += 1,
                PeerChange::Update { .. } => update += 1,
            }
        }
        tracing::info!(
            added = add,
            removed = remove,
            updated = update,
            key_set = changes.private_key.is_some(),
            listen_port = ?changes.listen_port,
            "device updated"
        );
        Ok(changes.peers.len()
            + usize::from(changes.private_key.is_some())
            + usize::from(changes.listen_port.is_some()))
    }

    /// Logs and raises one Event per rejected Node and reason; a Node that is
    /// merely not ready yet (no key published) is only logged at debug.
    async fn report_exclusions(&mut self, plan: &Plan, nodes: &[Arc<Node>]) -> Result<usize> {
        let by_name: BTreeMap<&str, &Arc<Node>> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n)))
            .collect();
        let mut still: HashMap<String, String> = HashMap::new();
        let mut raised = 0;
        for ex in &plan.excluded {
            let reason = ex.reason.to_string();
            still.insert(ex.node.clone(), reason.clone());
            if self.reported.get(&ex.node) == Some(&reason) {
                continue;
            }
            if let mesh::Exclusion::Invalid(rejected) = &ex.reason {
                if rejected.not_ready() {
                    tracing::debug!(node = %ex.node, %reason, "node has not published its key yet");
                    continue;
                }
            }
            tracing::warn!(node = %ex.node, %reason, "node rejected: no peer");
            if let Some(node) = by_name.get(ex.node.as_str()) {
                let note = format!("rejected by wgmesh on {}: {reason}", self.cfg.node_name);
                self.publisher
                    .event(node, true, "PeerRejected", "Validate", note)
                    .await?;
                raised += 1;
            }
        }
        self.reported = still;
        Ok(raised)
    }

    /// `--endpoint`, else `force-endpoint`, else the first InternalIP (never
    /// VirtualBox's NAT address), at the listen port.
    fn endpoint(&mut self, own: &Node) -> Result<SocketAddr> {
        let (addr, source) = if let Some(e) = self.cfg.endpoint {
            (e, "--endpoint")
        } else if let Some(e) = own
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::FORCE_ENDPOINT))
            .and_then(|v| v.trim().parse::<SocketAddr>().ok())
        {
            (e, "force-endpoint annotation")
        } else {
            let ip = internal_ips(own)
                .into_iter()
                .find(|ip| *ip != VIRTUALBOX_NAT)
                .ok_or(AgentError::NoEndpoint)?;
            (SocketAddr::new(ip, self.cfg.listen_port), "Node InternalIP")
        };
        if self.last_endpoint != Some(addr) {
            tracing::info!(endpoint = %addr, source, "endpoint chosen");
            self.last_endpoint = Some(addr);
        }
        Ok(addr)
    }
}

/// Runs the agent: one pass (`once`) or the watch loop until SIGTERM/SIGINT.
pub async fn run(cfg: AgentConfig, client: Client, once: bool) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let debounce = cfg.debounce;
    let resync = cfg.resync;
    let metrics_listen = cfg.metrics_listen;
    let mut agent = Agent::new(cfg, client).await?;
    if once {
        let nodes: Vec<Arc<Node>> = api
            .list(&Default::default())
            .await
            .map_err(K8sError::from)?
            .items
            .into_iter()
            .map(Arc::new)
            .collect();
        let report = agent.pass(&nodes).await?;
        tracing::info!(?report, "single pass done");
        return Ok(());
    }

    let telemetry = agent.telemetry().clone();
    if let Some(listen) = metrics_listen {
        let backend = agent.backend();
        let t = telemetry.clone();
        let refresh = move || {
            let stats = backend
                .lock()
                .map(|mut b| b.peer_stats().unwrap_or_default())
                .unwrap_or_default();
            t.set_live(telemetry::peer_views(
                &t.pass(),
                &stats,
                std::time::SystemTime::now(),
            ));
        };
        let t = telemetry.clone();
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve(listen, t, refresh).await {
                tracing::error!(%listen, error = %e, "metrics server stopped");
            }
        });
    }
    let (reader, writer) = reflector::store::<Node>();
    let changed = Arc::new(Notify::new());
    let notify = changed.clone();
    let watch_errors = telemetry.api_errors.clone();
    let watch = tokio::spawn(async move {
        let stream = reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => notify.notify_one(),
                // The backoff retries; the device keeps the last mesh meanwhile.
                Err(e) => {
                    watch_errors.inc();
                    tracing::warn!(error = %e, "Node watch failed; retrying with backoff, the mesh stays as it is")
                }
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;
    tokio::select! {
        r = reader.wait_until_ready() => { if r.is_err() { return Err(AgentError::WatchEnded); } }
        _ = term.recv() => return Ok(()),
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    tracing::info!("Node cache synced; reconciling");
    telemetry.set_synced(true);
    loop {
        let nodes = reader.state();
        match agent.pass(&nodes).await {
            Ok(report) if report.wrote() => tracing::info!(?report, "pass"),
            Ok(report) => tracing::debug!(?report, "pass: nothing to change"),
            Err(e) => {
                tracing::warn!(error = %e, "pass failed; retrying on the next change or resync")
            }
        }
        tokio::select! {
            _ = changed.notified() => {
                // Coalesce a burst of events into one pass.
                tokio::time::sleep(debounce).await;
            }
            _ = tokio::time::sleep(resync) => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if watch.is_finished() {
            return Err(AgentError::WatchEnded);
        }
    }
    tracing::info!("stopping; annotations, device and routes are left in place");
    Ok(())
}

fn own_pod_cidrs(own: &Node) -> Vec<IpNet> {
    let spec = own.spec.as_ref();
    let mut cidrs: Vec<IpNet> = spec
        .and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default()
        .iter()
        .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
        .filter_map(|c| c.parse::<IpNet>().ok())
        .map(|n| n.trunc())
        .collect();
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

fn internal_ips(own: &Node) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = own
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    // IPv4 first: the common underlay, and stable across dual-stack ordering.
    ips.sort_by_key(|ip| !ip.is_ipv4());
    ips
}
