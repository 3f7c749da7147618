//! `wgmesh agent`: the reconcile loop that turns Node objects into a working
//! encrypted mesh on one node.
//!
//! The order of a pass is the order of what matters when something is broken:
//!
//! 1. the key store, re-read when it changed on disk (a `wgmesh keys revoke`
//!    or rotate step takes effect at once, and a destroyed key is never
//!    written to the device again);
//! 2. the plan: a pure function of every Node and the local config;
//! 3. the data path: the device's peers (a diff), then the link, the pod
//!    gateway address, the fail-closed cluster routes, the policy routes for
//!    node addresses and the egress masquerade. A failure in one step does
//!    not skip the next: the routes are repaired even while the device is
//!    gone, and their blackhole backstops keep traffic dropped meanwhile;
//! 4. the CNI config, only once the routes close the cluster CIDRs;
//! 5. the API side, best effort: this node's annotations, then Events. An
//!    RBAC denial, a 429 or an admission rejection is logged and retried
//!    within seconds; it never stops the data path from being repaired.
//!
//! A pass that finds everything in place writes nothing: not to the API, not
//! to the device, not to netlink.
//!
//! Before the API is reachable at all the agent writes the backstops (a
//! blackhole per cluster CIDR), so a booting node never sends pod traffic in
//! plaintext; `--backstops-only` does only that, for an init container.
//! Between passes a half-second watch notices a re-created interface, a
//! restarted data plane (a new UAPI socket) and key store changes, and runs a
//! pass at once instead of waiting for the resync.
//!
//! On SIGTERM the agent just exits: annotations, device and routes stay, so a
//! rolling update never drops the node from anyone's mesh. When the API server
//! is unreachable the watcher retries with backoff and the device keeps the
//! last mesh it was given.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::Notify;

use crate::k8s::{K8sError, Publisher};
use crate::keys::rotation::Phase;
use crate::keys::schedule::{self, Handshake, Step};
use crate::keys::store::{Attribution, RotationProgress, Store, StoreError};
use crate::keys::{PrivateKey, PublicKey};
use crate::mesh::{self, MeshConfig, PeerChange, Plan};
use crate::net::{ensure_masquerade, MasqSpec, Net, PolicySpec, Protected};
use crate::node::{self, annotations, LocalAnnotations, ValidationConfig};
use crate::routes::bgp::speaker::Speaker;
use crate::routes::{self, Grant, Router};
use crate::telemetry::{self, PassState, Telemetry};
use crate::wg::kernel::{select_backend, BackendKind};
use crate::wg::{self, Backend, Capabilities, ExtraRole, LocalDevice};

/// The tunnel MTU when the underlay's is unknown: 1500 − 80.
const DEFAULT_MTU: u16 = 1420;

/// The VirtualBox NAT address every Vagrant VM has: never a usable endpoint.
const VIRTUALBOX_NAT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 2, 15));

/// How often the agent looks for a re-created interface, a new UAPI socket
/// or a changed key store between passes.
const WATCH_TICK: Duration = Duration::from_millis(500);

/// The first retry after a failed pass or API write, doubled up to
/// [`RETRY_MAX`] while failures last.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(16);

/// How often an agent in BGP mode reads BIRD's table between passes.
const BGP_TICK: Duration = Duration::from_secs(2);

/// The longest the agent waits, in the middle of a pass, to publish a key it
/// has just switched its device to ([`Agent::publish_switched_key`]).
const EARLY_PUBLISH_MAX: Duration = Duration::from_secs(2);

/// How often a node in the middle of a key rotation re-checks its progress.
const ROTATION_TICK: Duration = Duration::from_secs(1);

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
    /// This node's pod CIDRs when its Node has no `spec.podCIDRs`.
    pub pod_cidrs: Vec<IpNet>,
    /// `None`: underlay MTU − 80.
    pub mtu: Option<u16>,
    pub persistent_keepalive: Option<u16>,
    /// Program the link (up, MTU) and the fail-closed routes.
    pub manage_network: bool,
    /// Node-to-node host traffic through the tunnel too.
    pub encrypt_host_traffic: bool,
    /// Masquerade pod egress to outside the cluster (nftables).
    pub masquerade: bool,
    /// The routing table and `ip rule` priority for node-address routes.
    pub route_table: u32,
    pub rule_priority: u32,
    /// The API server's addresses: exempt from host encryption.
    pub api_servers: Vec<SocketAddr>,
    /// The least time between the end of a pass and a pass that Node events
    /// ask for (a lone change goes at once; a burst is coalesced).
    pub debounce: Duration,
    /// Re-check the device this often even without Node events (drift).
    pub resync: Duration,
    /// Where to serve /metrics, /healthz and /readyz; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Kernel WireGuard, the UAPI socket, or whichever is available.
    pub backend: BackendKind,
    /// Where to write the CNI conflist; `None`: do not write one.
    pub cni_dir: Option<PathBuf>,
    /// When to rotate the static key and how long each step may take.
    pub rotation: schedule::Policy,
    /// The window over which nodes spread a rotation requested on all of
    /// them at once.
    pub rotation_stagger: Duration,
    /// Replace a conflist of the same name that wgmesh did not write.
    pub cni_overwrite: bool,
    /// Route sync's BGP mode (`--bgp`): BIRD configured by the agent.
    pub bgp: Option<crate::routes::bgp::speaker::Settings>,
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
    #[error(
        "this node's endpoint {endpoint} (from {origin}) would be rejected by every peer: {reason}"
    )]
    BadEndpoint {
        endpoint: SocketAddr,
        origin: &'static str,
        reason: node::Reason,
    },
    #[error("the Node watch ended")]
    WatchEnded,
    #[error(transparent)]
    Bgp(#[from] crate::routes::bgp::speaker::SpeakerError),
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
    /// The key store changed on disk since the last pass and was re-read.
    pub store_reloaded: bool,
    /// A write to the API (annotations or an Event) failed; the data path
    /// was programmed anyway and the write is retried within seconds.
    pub api_failed: bool,
    /// A key rotation is in progress (staged or in its grace period).
    pub rotating: bool,
    /// Some extra prefix has a remote gateway whose liveness must be
    /// sampled ([`routes::PROBE_INTERVAL`]).
    pub probing_routes: bool,
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

/// What the device step learnt, for the rotation driver.
#[derive(Debug, Clone, Default)]
pub struct DeviceView {
    pub caps: Capabilities,
    pub handshakes: Vec<Handshake>,
    /// When `handshakes` was read. The rotation driver decides on this
    /// instant, not on the end of the pass: evidence and clock from one
    /// snapshot, so a slow pass cannot end a grace period on evidence read
    /// before the peers followed (which lost every confirmation of a
    /// kernel node's rotation on the VM tier).
    pub read_at: jiff::Timestamp,
}

fn to_timestamp(t: std::time::SystemTime) -> jiff::Timestamp {
    jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH)
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
    /// The bypasses last reported in an Event, and those the last check
    /// found (to be reported in the API step).
    reported_bypasses: Vec<String>,
    pending_bypasses: Option<Vec<String>>,
    /// The audit head last recorded per other node (`None`: its annotation
    /// is bad, already logged).
    witnessed: HashMap<String, Option<crate::keys::audit::AuditHead>>,
    /// Last pass's decoded Nodes: a pass decodes only the Nodes that changed.
    decode_cache: node::DecodeCache,
    /// Each peer's endpoint as the previous pass published it, so that a
    /// peer that roamed (NAT rebinding) keeps its new address until its Node
    /// publishes a different one.
    last_endpoints: HashMap<PublicKey, SocketAddr>,
    last_endpoint: Option<SocketAddr>,
    last_mtu: Option<u16>,
    announced_key: Option<PublicKey>,
    /// The public key of the private key the last successful device step
    /// programmed (`None` before the first): a change is a key switch.
    device_key: Option<PublicKey>,
    telemetry: Telemetry,
    warned_foreign_cni: bool,
    /// The valid `MeshRoute` grants (route sync), as last set by
    /// [`Agent::set_route_objects`].
    grants: Vec<Grant>,
    /// Invalid `MeshRoute`s and refused prefixes already logged, so each is
    /// reported once per problem.
    reported_routes: HashMap<String, String>,
    router: Router,
    /// The last pass's route sync result (for the masquerade step).
    route_outcome: routes::Outcome,
    /// BGP mode, when on; taken out while a blocking apply runs.
    speaker: Option<Speaker>,
    /// Whether BIRD's kernel table held routes at the last read (a BIRD
    /// started then recovers instead of flushing them).
    learned_table_has_routes: bool,
    /// The grants that passed validation this pass (BGP's import list).
    kept_grants: Vec<Grant>,
    /// This node's own learned routes at the last successful table read,
    /// used while the table cannot be read (rather than withdrawing them).
    last_learned: Vec<routes::Advertised>,
    /// `--bgp-mesh`: every other admitted node's tunnel addresses, from
    /// this pass's route step (the mesh sessions' far ends).
    mesh_nodes: Vec<crate::routes::bgp::speaker::MeshNode>,
    /// Every prefix a MeshRoute object names, valid or not.
    grant_prefixes: std::collections::BTreeSet<IpNet>,
    /// Whether the grants are known (the MeshRoute cache synced, or the
    /// resource not served and nothing carried).
    routes_known: bool,
    /// Extra prefixes routed into the tunnel (carried or held): at start,
    /// whatever routes of ours an earlier run left outside the cluster CIDRs.
    carried: std::collections::BTreeSet<IpNet>,
    /// The device was read once for who holds each prefix (after a start).
    routes_seeded: bool,
    /// Device peer key -> node, kept one pass so a rotating node's old
    /// peer still counts as that node.
    key_nodes: HashMap<PublicKey, String>,
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
        let cfg_bgp = cfg.bgp.clone();
        // Extra prefixes an earlier run routed into the tunnel: held until
        // the grants are known (see `route_sync`).
        let carried = match &net {
            Some(net) => match net.our_destinations().await {
                Ok(ours) => ours
                    .into_iter()
                    .filter(|d| !cfg.cluster_cidrs.iter().any(|c| c == d))
                    .collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read this node's routes; extra prefixes of an earlier run are not held");
                    Default::default()
                }
            },
            None => Default::default(),
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
            reported_bypasses: Vec::new(),
            pending_bypasses: None,
            witnessed: HashMap::new(),
            decode_cache: node::DecodeCache::new(),
            last_endpoints: HashMap::new(),
            last_endpoint: None,
            last_mtu: None,
            announced_key: None,
            device_key: None,
            telemetry: Telemetry::new(),
            warned_foreign_cni: false,
            grants: Vec::new(),
            reported_routes: HashMap::new(),
            router: Router::default(),
            route_outcome: routes::Outcome::default(),
            speaker: match cfg_bgp {
                Some(s) => Some(Speaker::new(s)?),
                None => None,
            },
            learned_table_has_routes: false,
            kept_grants: Vec::new(),
            last_learned: Vec::new(),
            mesh_nodes: Vec::new(),
            grant_prefixes: Default::default(),
            routes_known: false,
            carried,
            routes_seeded: false,
            key_nodes: HashMap::new(),
        })
    }

    /// The `MeshRoute` objects (route sync grants) the next pass uses: the
    /// valid ones are kept, each invalid one is logged once, naming every
    /// field at fault (and carries nothing).
    pub fn set_route_objects(&mut self, objects: &[serde_json::Value]) {
        let mut grants = Vec::with_capacity(objects.len());
        self.routes_known = true;
        self.grant_prefixes = objects
            .iter()
            .filter_map(|o| o["spec"]["prefix"].as_str()?.trim().parse::<IpNet>().ok())
            .map(|p| p.trunc())
            .collect();
        for object in objects {
            match routes::grant::decode(object) {
                Ok(g) => grants.push(g),
                Err(e) => {
                    let key = format!("meshroute/{}", e.name);
                    let text = e.to_string();
                    if self.reported_routes.get(&key) != Some(&text) {
                        tracing::warn!(error = %text, "MeshRoute ignored");
                        self.reported_routes.insert(key, text);
                    }
                }
            }
        }
        self.grants = grants;
    }

    /// The grants cannot be known now (the MeshRoute cache has not synced):
    /// extra prefixes carried so far are held (see `route_sync`) and the
    /// last grants stay.
    pub fn set_routes_unknown(&mut self) {
        self.routes_known = false;
    }

    /// Whether extra prefixes are routed into the tunnel (carried or held).
    pub fn carries_extra_prefixes(&self) -> bool {
        !self.carried.is_empty()
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
        if let Err(AgentError::K8s(_)) = &result {
            self.telemetry.api_errors.inc();
        }
        result
    }

    async fn pass_inner(&mut self, nodes: &[Arc<Node>]) -> Result<PassReport> {
        let mut report = PassReport {
            store_reloaded: self.reload_store()?,
            ..PassReport::default()
        };
        let own = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.cfg.node_name.as_str()))
            .ok_or_else(|| AgentError::NoOwnNode(self.cfg.node_name.clone()))?;

        // 1. What this node is: its key (from the store, never from the API
        //    cache), endpoint and pod CIDRs.
        let private = self.store.active_private()?;
        let endpoint = self.endpoint(own)?;
        let state = self.store.state().clone();
        let own_cidrs = self.own_pod_cidrs(own);
        // Read and verified once per pass: the log grows with every witnessed
        // head, and three steps below need what it says.
        let progress = self.store.rotation_progress();
        if let Err(e) = &progress {
            tracing::warn!(error = %e, "cannot read the rotation's progress from the audit log; no rotation step this pass");
        }
        let progress = progress.ok();
        let mut desired = LocalAnnotations {
            public_key: state.active.public_key,
            key_generation: state.active.generation,
            key_created: state.active.created,
            next_public_key: state.staged.as_ref().map(|k| k.public_key),
            endpoint,
            pod_cidrs: own_cidrs.clone(),
            // A log that does not verify publishes no head (the annotation
            // goes), rather than a head nobody can check.
            audit_head: self.store.audit_head().ok(),
            last_rotation: progress
                .as_ref()
                .and_then(|p| p.last_activation.clone())
                .map(|(at, unconfirmed)| {
                    let result = match unconfirmed.as_deref() {
                        Some([]) => "all-confirmed".to_string(),
                        Some(list) => format!("unconfirmed={}", list.len()),
                        None => "untracked".to_string(),
                    };
                    format!("{at:.0} {result}")
                }),
            // Filled in by route sync below.
            learned_prefixes: Vec::new(),
        };

        // 2. Plan.
        let vcfg = ValidationConfig {
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
        };
        let decoded = self.decode_cache.decode_all(nodes, &vcfg);
        let mut mcfg = MeshConfig {
            local_node: self.cfg.node_name.clone(),
            interface: self.cfg.interface.clone(),
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            default_keepalive: self.cfg.persistent_keepalive,
            local_public_key: Some(state.active.public_key),
            local_endpoint: Some(endpoint),
            handshakes: Default::default(),
        };
        let mut plan = mesh::plan(&mcfg, &decoded);
        if plan
            .excluded
            .iter()
            .any(|e| matches!(e.reason, mesh::Exclusion::DuplicateKey { .. }))
        {
            // A contested key: the device's handshakes say who holds it (one
            // more device read, only while some Node announces another's key).
            mcfg.handshakes = self.device_handshakes().await;
            plan = mesh::plan(&mcfg, &decoded);
        }
        // Route sync: extra prefixes onto their gateways' peers.
        let outcome = self.route_sync(nodes, &decoded, &plan).await;
        desired.learned_prefixes = outcome
            .prefixes
            .iter()
            .filter(|p| p.source == routes::Source::Learned && p.local_gateway)
            .map(|p| p.prefix)
            .collect();
        Router::apply(&outcome, &mut plan);
        report.probing_routes = outcome.needs_probing();
        self.route_outcome = outcome;
        report.peers = plan.peers.len();
        report.excluded = plan.excluded.len();
        let mut pass_state =
            PassState::from_plan(&plan, state.active.generation, Some(state.active.created));
        pass_state.rotation_phase = state.phase().to_string();
        pass_state.routes = self.route_outcome.clone();
        pass_state.route_failovers = self.router.chooser.failovers();
        if state.phase() != Phase::Idle {
            if let Some(progress) = &progress {
                pass_state.unconfirmed_peers = plan
                    .peers
                    .iter()
                    .filter(|p| !progress.confirmed.contains(&p.node))
                    .count();
            }
        }
        self.telemetry.set_pass(pass_state);

        // 3. The data path. Each step runs whatever the one before did.
        let extra = match state.phase() {
            Phase::Staged => self.store.staged_private()?.map(|k| (k, ExtraRole::Next)),
            Phase::Activated => self
                .store
                .previous_private()?
                .map(|k| (k, ExtraRole::Previous)),
            Phase::Idle => None,
        };
        let device = self.program_device(&private, extra, &plan).await;
        let view = match &device {
            Ok((n, view)) => {
                report.device_changes = *n;
                Some(view.clone())
            }
            Err(e) => {
                tracing::warn!(error = %e, "device not configured; routes and backstops are still repaired");
                None
            }
        };
        self.telemetry.set_device_ok(device.is_ok());
        if device.is_ok() {
            let switched = self
                .device_key
                .is_some_and(|k| k != state.active.public_key);
            self.device_key = Some(state.active.public_key);
            if switched {
                self.publish_switched_key(own, &desired, &mut report).await;
            }
        }
        let device = device.map(|_| ());
        let mtu = match (self.cfg.mtu, self.net.clone()) {
            (Some(m), _) => m,
            (None, Some(net)) => self.tunnel_mtu(&net, endpoint, &plan).await,
            (None, None) => DEFAULT_MTU,
        };
        let network = match self.net.clone() {
            Some(net) => {
                let r = self
                    .program_network(&net, mtu, &plan, &own_cidrs, &mut report)
                    .await;
                self.telemetry.set_routes_ok(r.is_ok());
                r
            }
            None => Ok(()),
        };

        // BGP mode: BIRD announces this node's pod CIDRs and gateway
        // prefixes and imports what the grants let it learn.
        if self.speaker.is_some() {
            self.bgp_step(&own_cidrs, &plan).await;
        }

        // The key rotation's next step, on the device's evidence.
        if let Some(view) = &view {
            report.rotating = match &progress {
                Some(progress) => self.drive_rotation(own, &plan, view, progress),
                None => state.phase() != Phase::Idle,
            };
        }

        // 4. The CNI config: pods only start once their traffic is closed.
        let cni = match (&network, self.cfg.cni_dir.clone()) {
            (Ok(()), Some(dir)) => self.write_cni(&dir, &own_cidrs, mtu).map(|w| {
                report.cni_written = w;
            }),
            _ => Ok(()),
        };

        // Witness every other node's audit head in this node's own log, so
        // a node that later rewrites its history is contradicted here.
        self.witness_heads(nodes);

        // 5. The API side, best effort.
        match self.publisher.publish(own, &desired).await {
            Ok(true) => {
                report.published = true;
                tracing::info!(node = %self.cfg.node_name, "published annotations");
            }
            Ok(false) => {}
            Err(e) => {
                report.api_failed = true;
                self.telemetry.api_errors.inc();
                tracing::warn!(error = %e, "publishing this node's annotations failed; the data path is programmed anyway, retrying shortly");
            }
        }
        if self.announced_key != Some(desired.public_key) && !report.api_failed {
            let note = format!(
                "wgmesh published public key {} (fingerprint {}, generation {})",
                desired.public_key, state.active.fingerprint, state.active.generation
            );
            match self
                .publisher
                .event(own, false, "KeyPublished", "Publish", note)
                .await
            {
                Ok(()) => {
                    self.announced_key = Some(desired.public_key);
                    report.events += 1;
                }
                Err(e) => self.event_failed(&mut report, "KeyPublished", &e),
            }
        }
        report.events += self.report_exclusions(&plan, nodes, &mut report).await;
        if let Some(found) = self.pending_bypasses.take() {
            if found != self.reported_bypasses {
                let sent = if found.is_empty() {
                    true
                } else {
                    let note = format!(
                        "traffic to the cluster CIDRs can bypass the WireGuard tunnel on {}: {}",
                        self.cfg.node_name,
                        found.join("; ")
                    );
                    match self
                        .publisher
                        .event(own, true, "RouteBypass", "CheckRoutes", note)
                        .await
                    {
                        Ok(()) => {
                            report.events += 1;
                            true
                        }
                        Err(e) => {
                            self.event_failed(&mut report, "RouteBypass", &e);
                            false
                        }
                    }
                };
                if sent {
                    self.reported_bypasses = found;
                }
            }
        }

        device?;
        network?;
        cni?;
        Ok(report)
    }

    /// Re-reads the key store when `state.json` changed on disk (a revoke or
    /// a rotate step through the CLI); returns whether it did.
    fn reload_store(&mut self) -> Result<bool> {
        let before = self.store.state().active.public_key;
        if !self.store.reload_if_changed()? {
            return Ok(false);
        }
        let after = self.store.state();
        if after.active.public_key != before {
            tracing::warn!(
                fingerprint = %after.active.fingerprint,
                generation = after.active.generation,
                phase = %after.phase(),
                "the key store changed on disk: a new active key; the device gets it in this pass"
            );
        } else {
            tracing::info!(phase = %after.phase(), "key store re-read");
        }
        Ok(true)
    }

    /// The link (up, MTU), the pod gateway address on it, the cluster
    /// routes with that address as their source, then the checks for routes
    /// that bypass the tunnel. Every step is attempted; the first error is
    /// returned.
    async fn program_network(
        &mut self,
        net: &Net,
        mtu: u16,
        plan: &Plan,
        own_cidrs: &[IpNet],
        report: &mut PassReport,
    ) -> Result<()> {
        let iface = self.cfg.interface.clone();
        let link = net.ensure_link_up(&iface, mtu).await;
        if let Ok(l) = &link {
            if !l.is_empty() {
                tracing::info!(interface = %iface, mtu, "link set up");
                report.link_changed = true;
            }
        }
        // Host-originated packets into the tunnel (hostNetwork pods, the
        // kubelet, the API server calling a webhook) take the pod gateway
        // address as their source: the remote peer accepts it (it is inside
        // this node's allowed IPs) and the reply comes back through the
        // tunnel. It goes on the WireGuard interface itself, so it exists
        // before the first pod (and its CNI bridge) does.
        let gateways: Vec<IpNet> = own_cidrs.iter().filter_map(gateway_host).collect();
        let addresses = match &link {
            Ok(_) => net.ensure_addresses(&iface, &gateways).await,
            Err(_) => Ok(Vec::new()),
        };
        let prefsrc: Vec<IpAddr> = match &addresses {
            Ok(added) => {
                if !added.is_empty() {
                    tracing::info!(interface = %iface, addresses = ?added, "pod gateway address added");
                    report.link_changed = true;
                }
                gateways.iter().map(IpNet::addr).collect()
            }
            Err(_) => Vec::new(),
        };
        let routes: Vec<IpNet> = plan.routes.iter().map(|r| r.destination).collect();
        let changes = net.ensure_routes(Some(&iface), &routes, &prefsrc).await;
        if let Ok(changes) = &changes {
            if !changes.is_empty() {
                tracing::info!(interface = %iface, %changes, "routes updated");
            }
            report.routes_changed =
                changes.added.len() + changes.replaced.len() + changes.removed.len();
            for conflict in &changes.conflicts {
                tracing::warn!(route = %conflict, "a route not created by wgmesh covers a cluster CIDR; left alone, traffic may bypass the tunnel");
            }
        }

        // Pod → other nodes' addresses (and, with host encryption, host →
        // host) through the tunnel: every remote Node's addresses, valid or
        // not, so a rejected node's are dropped in the tunnel.
        let local_ips: Vec<IpAddr> = match net.interface_addresses().await {
            Ok(have) => plan
                .local_node_ips
                .iter()
                .copied()
                .filter(|ip| have.iter().any(|a| a.address == *ip))
                .collect(),
            Err(_) => Vec::new(),
        };
        let spec = PolicySpec {
            interface: iface.clone(),
            table: self.cfg.route_table,
            priority: self.cfg.rule_priority,
            local_pod_cidrs: own_cidrs.to_vec(),
            remote_node_ips: plan.node_routes.iter().map(IpNet::addr).collect(),
            local_node_ips: local_ips,
            encrypt_host: self.cfg.encrypt_host_traffic,
            listen_port: self.cfg.listen_port,
            exempt: self.cfg.api_servers.clone(),
            learned_table: self.speaker.as_ref().map(Speaker::table),
        };
        let policy = net.ensure_policy(&spec).await;
        if let Ok(p) = &policy {
            if !p.is_empty() {
                tracing::info!(table = spec.table, changes = %p, "node-address routes and rules updated");
                report.routes_changed += 1;
            }
            for conflict in &p.routes.conflicts {
                tracing::warn!(route = %conflict, table = spec.table, "a route not created by wgmesh sits in wgmesh's table; left alone");
            }
        }

        // Pod egress to outside the cluster, masqueraded (or our table
        // removed when turned off).
        let masq = MasqSpec {
            enabled: self.cfg.masquerade && !own_cidrs.is_empty(),
            interface: iface.clone(),
            local_pod_cidrs: own_cidrs.to_vec(),
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            node_ips: plan
                .local_node_ips
                .iter()
                .copied()
                .chain(plan.node_routes.iter().map(IpNet::addr))
                .collect(),
            // Every valid grant's prefix: what this node is a gateway for
            // (static, or learned inside a grant) is among them.
            extra_prefixes: self.kept_grants.iter().map(|g| g.prefix).collect(),
        };
        let masq = tokio::task::spawn_blocking(move || ensure_masquerade(&masq)).await?;
        if let Ok(change) = &masq {
            if change.is_changed() {
                tracing::info!(
                    ?change,
                    table = crate::net::MASQ_TABLE,
                    "egress masquerade updated"
                );
                report.routes_changed += 1;
            }
        }

        // Someone else's routes or rules that take cluster traffic (or an
        // extra prefix carried by a remote gateway) around the tunnel: not
        // ready, counted, logged and raised as an Event.
        let protected: Vec<Protected> = self
            .cfg
            .cluster_cidrs
            .iter()
            .map(|c| Protected::ClusterCidr(*c))
            .chain(
                self.route_outcome
                    .tunnel_prefixes()
                    .into_iter()
                    .map(Protected::ExtraPrefix),
            )
            .collect();
        match net.bypasses(&iface, &protected, own_cidrs).await {
            Ok(found) => {
                let found: Vec<String> = found.iter().map(ToString::to_string).collect();
                if found != self.reported_bypasses {
                    for b in &found {
                        tracing::warn!(bypass = %b, "a route or rule not created by wgmesh lets traffic meant for the tunnel bypass it");
                    }
                }
                self.telemetry.set_bypasses(found.clone());
                self.pending_bypasses = Some(found);
            }
            Err(e) => tracing::warn!(error = %e, "cannot check for routes that bypass the tunnel"),
        }

        link?;
        addresses?;
        changes?;
        policy?;
        masq?;
        Ok(())
    }

    /// Publishes the annotations right after the device switched to a new
    /// active key, ahead of the routes, policy, masquerade and CNI steps.
    /// A device holding one identity (kernel WireGuard) answers only to the
    /// new key from now on, and its peers follow only once they see it on
    /// the Node: every second before this write is a second of traffic
    /// from this node dropped by every peer (on a loaded machine the rest
    /// of a pass takes seconds). Bounded by [`EARLY_PUBLISH_MAX`] so the
    /// API side never holds up the data path; the pass's own publish
    /// retries whatever did not get through.
    async fn publish_switched_key(
        &mut self,
        own: &Node,
        desired: &LocalAnnotations,
        report: &mut PassReport,
    ) {
        match tokio::time::timeout(EARLY_PUBLISH_MAX, self.publisher.publish(own, desired)).await
        {
            Ok(Ok(wrote)) => {
                report.published |= wrote;
                if wrote {
                    tracing::info!(node = %self.cfg.node_name, public_key = %desired.public_key, "published the new key right after switching the device to it");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "publishing the new key after the switch failed; retried at the end of the pass")
            }
            Err(_) => tracing::warn!(
                "publishing the new key after the switch took over {} s; retried at the end of the pass",
                EARLY_PUBLISH_MAX.as_secs()
            ),
        }
    }

    /// Runs the rotation driver ([`schedule::next_step`]) and applies its
    /// step to the store; the next pass (the store's change wakes it) puts
    /// the result on the device and the Node. Returns whether a rotation is
    /// in progress (the loop then re-checks every second, for
    /// confirmations and deadlines).
    fn drive_rotation(
        &mut self,
        own: &Node,
        plan: &Plan,
        view: &DeviceView,
        progress: &RotationProgress,
    ) -> bool {
        let state = self.store.state().clone();
        let requested = own
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::ROTATE_REQUESTED))
            .and_then(|v| v.trim().parse::<jiff::Timestamp>().ok())
            .and_then(|t| {
                // A cluster-wide request (every Node annotated at once) is
                // staggered: each node waits its own share of the window.
                let wait = schedule::jitter_for(&self.cfg.node_name, self.cfg.rotation_stagger);
                t.checked_add(jiff::SignedDuration::try_from(wait).ok()?)
                    .ok()
            });
        let peers: Vec<schedule::Peer> = plan
            .peers
            .iter()
            .map(|p| schedule::Peer {
                node: p.node.clone(),
                public_key: p.config.public_key,
            })
            .collect();
        let inputs = schedule::Inputs {
            now: view.read_at,
            node: &self.cfg.node_name,
            phase: state.phase(),
            active: &state.active,
            staged: state.staged.as_ref(),
            activated_at: progress.activated_at,
            requested,
            peers: &peers,
            confirmed: &progress.confirmed,
            handshakes: &view.handshakes,
            dual_identity: view.caps.dual_identity,
        };
        let Some(step) = schedule::next_step(&self.cfg.rotation, &inputs) else {
            // A request whose staggered start is still ahead counts as in
            // progress, so the loop wakes for it rather than at the resync.
            let pending = requested.is_some_and(|r| r > state.active.created && r > inputs.now);
            return state.phase() != Phase::Idle || pending;
        };
        let who = |reason: &str| Attribution {
            actor: "agent".into(),
            reason: reason.to_owned(),
        };
        let result = match &step {
            Step::Stage { reason } => self.store.stage(&who(reason)),
            Step::Confirm(proofs) => proofs.iter().try_for_each(|(peer, proof)| {
                self.store
                    .record_peer_confirmed(peer, proof, &who("peer confirmed the key"))
            }),
            Step::Activate {
                unconfirmed,
                reason,
            } => self.store.activate(Some(unconfirmed), &who(reason)),
            Step::EndGrace { reason } => self.store.destroy_old(&who(reason)),
        };
        if let (Ok(()), Step::Activate { unconfirmed, .. }) = (&result, &step) {
            let outcome = if unconfirmed.is_empty() {
                "all-confirmed"
            } else if view.caps.dual_identity {
                "deadline"
            } else {
                "single-identity"
            };
            self.telemetry
                .rotations
                .get_or_create(&crate::telemetry::ResultLabel {
                    result: outcome.into(),
                })
                .inc();
        }
        match result {
            Ok(()) => tracing::info!(?step, "key rotation step done"),
            Err(e) => tracing::warn!(?step, error = %e, "key rotation step failed; retrying"),
        }
        true
    }

    /// Records each other Node's `wgmesh.dev/audit-head` when it changed
    /// since this agent last recorded it. Best effort: a failure is logged
    /// and retried on the next pass; a bad annotation is logged once.
    fn witness_heads(&mut self, nodes: &[Arc<Node>]) {
        let who = Attribution {
            actor: "agent".into(),
            reason: "audit head published on the peer's Node".into(),
        };
        for n in nodes {
            let Some(name) = n.metadata.name.as_deref() else {
                continue;
            };
            if name == self.cfg.node_name {
                continue;
            }
            let head = match node::audit_head(n) {
                Ok(Some(h)) => h,
                Ok(None) => continue,
                Err(e) => {
                    if self.witnessed.get(name) != Some(&None) {
                        tracing::warn!(node = name, error = %e, "not witnessing this node's audit head");
                        self.witnessed.insert(name.to_owned(), None);
                    }
                    continue;
                }
            };
            if self.witnessed.get(name) == Some(&Some(head)) {
                continue;
            }
            match self.store.record_peer_head(name, &head, &who) {
                Ok(recorded) => {
                    if recorded {
                        tracing::info!(node = name, %head, "witnessed the node's audit head");
                    }
                    self.witnessed.insert(name.to_owned(), Some(head));
                }
                Err(e) => {
                    tracing::warn!(node = name, error = %e, "cannot record the node's audit head; retrying on the next pass")
                }
            }
        }
    }

    fn event_failed(&self, report: &mut PassReport, reason: &str, e: &K8sError) {
        report.api_failed = true;
        self.telemetry.api_errors.inc();
        tracing::warn!(event = reason, error = %e, "raising an Event failed; retrying shortly");
    }

    /// Writes the conflist for this node's pod CIDRs and the tunnel MTU; a
    /// file wgmesh did not write is left alone (with one warning) unless
    /// `cni_overwrite`.
    fn write_cni(&mut self, dir: &Path, own_cidrs: &[IpNet], mtu: u16) -> Result<bool> {
        let cidrs = own_cidrs.to_vec();
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

    /// Validates the grants against the Nodes, samples the liveness of the
    /// candidates' sessions and picks each prefix's gateway. Without grants,
    /// BGP or held prefixes: nothing (and no device read).
    ///
    /// A prefix this node carried before and carries no more while a
    /// MeshRoute still names it (its grant now refused or invalid), or while
    /// the grants are not known (the MeshRoute cache not synced, the
    /// resource not served after being), is *held*: routed into the tunnel
    /// on no peer, so its traffic is dropped rather than sent out by the
    /// default route. Only deleting the MeshRoute lets it go.
    async fn route_sync(
        &mut self,
        nodes: &[Arc<Node>],
        decoded: &[std::result::Result<node::NodeRecord, node::Rejected>],
        plan: &Plan,
    ) -> routes::Outcome {
        if self.grants.is_empty()
            && self.speaker.is_none()
            && (self.carried.is_empty() || (self.routes_known && self.grant_prefixes.is_empty()))
        {
            self.router.chooser.retain(|_| false);
            self.kept_grants.clear();
            self.carried.clear();
            return routes::Outcome::default();
        }
        let now = std::time::Instant::now();
        let wall = std::time::SystemTime::now();

        // Which node each device peer is: its current or staged key, or the
        // key it had last pass (a rotating node's old peer until promoted).
        let mut key_nodes: HashMap<PublicKey, String> = std::mem::take(&mut self.key_nodes);
        for p in &plan.peers {
            key_nodes.insert(p.config.public_key, p.node.clone());
            if let Some(next) = p.config.successor {
                key_nodes.insert(next, p.node.clone());
            }
        }
        let backend = self.backend.clone();
        // Once the grants are known: which prefixes to look for.
        let seed = !self.routes_seeded && self.routes_known;
        let read = tokio::task::spawn_blocking(move || {
            let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
            let state = if seed { backend.state().ok() } else { None };
            (backend.peer_stats(), state)
        })
        .await;
        let mut device_endpoints = Vec::new();
        match read {
            Ok((Ok(stats), state)) => {
                for p in &stats {
                    let Some(node) = key_nodes.get(&p.public_key) else {
                        continue;
                    };
                    let age = p
                        .last_handshake
                        .map(|t| wall.duration_since(t).unwrap_or_default());
                    self.router.liveness.observe(now, node, p.rx_bytes, age);
                    device_endpoints.extend(p.endpoint.map(|e| e.ip().to_canonical()));
                }
                let on_device: std::collections::BTreeSet<&str> = stats
                    .iter()
                    .filter_map(|p| key_nodes.get(&p.public_key).map(String::as_str))
                    .collect();
                self.router.liveness.retain(|n| on_device.contains(n));
                if let Some(state) = state {
                    // After a restart: who holds each prefix now.
                    for peer in &state.peers {
                        let Some(node) = key_nodes.get(&peer.public_key) else {
                            continue;
                        };
                        for ip in &peer.allowed_ips {
                            if self.grant_prefixes.contains(ip) {
                                self.router.chooser.seed(*ip, node);
                            }
                        }
                    }
                    self.routes_seeded = true;
                }
            }
            // A failed read leaves the last readings; after DEAD_AFTER
            // without one every gateway counts as dead, which keeps each
            // prefix on its current holder.
            Ok((Err(e), _)) => {
                tracing::warn!(error = %e, "cannot read the device's counters for gateway liveness")
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the device's counters for gateway liveness failed")
            }
        }
        key_nodes.retain(|_, n| plan.peers.iter().any(|p| &p.node == n));
        self.key_nodes = key_nodes;

        let mut pod_cidrs = BTreeMap::new();
        let mut node_ips = device_endpoints;
        for record in decoded.iter().flatten() {
            pod_cidrs.insert(record.name.clone(), record.pod_cidrs.clone());
            node_ips.extend(record.node_ips.iter().map(|ip| ip.to_canonical()));
            node_ips.push(record.endpoint.ip().to_canonical());
        }
        // The mesh's far ends and who owns a next hop: admitted nodes only.
        let admitted: Vec<(&String, &Vec<IpNet>)> = pod_cidrs
            .iter()
            .filter(|(n, _)| plan.peers.iter().any(|p| &p.node == *n))
            .collect();
        self.mesh_nodes = admitted
            .iter()
            .map(|(n, cidrs)| crate::routes::bgp::speaker::MeshNode {
                name: (*n).clone(),
                tunnel: tunnel_addresses(cidrs),
            })
            .collect();
        // A mesh next hop is a node's tunnel address exactly (this node's
        // too, so a route of ours reflected back is recognised).
        let hop_owners: Vec<(IpAddr, String)> = self
            .mesh_nodes
            .iter()
            .map(|m| (m.name.clone(), m.tunnel.clone()))
            .chain(
                pod_cidrs
                    .get(&self.cfg.node_name)
                    .map(|own| (self.cfg.node_name.clone(), tunnel_addresses(own))),
            )
            .flat_map(|(n, tunnel)| tunnel.into_iter().map(move |a| (a, n.clone())))
            .collect();
        for rejected in decoded.iter().filter_map(|r| r.as_ref().err()) {
            node_ips.extend(rejected.node_ips.iter().map(|ip| ip.to_canonical()));
        }
        // The API server too: its traffic must never depend on a gateway.
        node_ips.extend(self.cfg.api_servers.iter().map(|a| a.ip().to_canonical()));
        node_ips.sort_unstable();
        node_ips.dedup();
        let validator = routes::Validator::new(self.cfg.cluster_cidrs.clone(), pod_cidrs, node_ips);
        let ready: HashMap<&str, bool> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, node_ready(n))))
            .collect();
        // Learned (BGP) prefixes: every other node's published ones, and
        // this node's own straight from BIRD's table.
        let mut learned: BTreeMap<String, Vec<routes::Advertised>> = BTreeMap::new();
        for n in nodes {
            let Some(name) = n.metadata.name.as_deref() else {
                continue;
            };
            if name == self.cfg.node_name {
                continue;
            }
            let Some(text) = n
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotations::LEARNED_PREFIXES))
            else {
                continue;
            };
            let (adverts, bad) = routes::learned_from_annotation(name, text);
            if !bad.is_empty() {
                let key = format!("learned/{name}");
                let text = bad.join(", ");
                if self.reported_routes.get(&key) != Some(&text) {
                    tracing::warn!(node = name, entries = %text, "wgmesh.dev/learned-prefixes entries that are not canonical CIDRs ignored");
                    self.reported_routes.insert(key, text);
                }
            }
            learned.insert(name.to_owned(), adverts);
        }
        if let Some(speaker) = &self.speaker {
            match speaker.learned().await {
                Ok(table) => {
                    self.learned_table_has_routes = !table.is_empty();
                    let own = &self.cfg.node_name;
                    self.last_learned = table
                        .into_iter()
                        .map(|r| routes::Advertised {
                            prefix: r.prefix,
                            node: own.clone(),
                            // Learned from the fabric: this node is the
                            // hop its peers send to.
                            next_hop_node: Some(own.clone()),
                        })
                        .collect();
                }
                // Unread: what the last read said stands (withdrawing it
                // would cut the peers off from a fabric that is still there).
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read BIRD's learned routes; keeping the last ones read")
                }
            }
            learned.insert(self.cfg.node_name.clone(), self.last_learned.clone());
        }
        // The iBGP mesh: what a node's established session says it learned
        // replaces what its Node says (which an API outage freezes).
        if let Some(reader) = self.speaker.as_ref().and_then(Speaker::mesh_reader) {
            let own = self.cfg.node_name.clone();
            let read = tokio::task::spawn_blocking(move || {
                reader.read(&own, |a| {
                    hop_owners
                        .iter()
                        .find(|(t, _)| *t == a)
                        .map(|(_, n)| n.clone())
                })
            })
            .await;
            match read {
                Ok(Ok(view)) => view.apply_to(&mut learned, &self.cfg.node_name),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the BGP mesh's routes; the Nodes' learned-prefixes stand")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the BGP mesh's routes failed; the Nodes' learned-prefixes stand")
                }
            }
        }
        self.kept_grants = validator
            .grants(&self.grants)
            .0
            .into_iter()
            .cloned()
            .collect();
        let alive: HashMap<String, bool> = plan
            .peers
            .iter()
            .map(|p| {
                let ok = ready.get(p.node.as_str()).copied().unwrap_or(false)
                    && self.router.liveness.alive(now, &p.node);
                (p.node.clone(), ok)
            })
            .collect();
        let before = self.router.chooser.failovers();
        let mut outcome = self.router.decide(
            now,
            &self.cfg.node_name,
            &validator,
            &self.grants,
            &learned,
            |n| alive.get(n).copied().unwrap_or(false),
        );
        if self.router.chooser.failovers() != before {
            for p in &outcome.prefixes {
                tracing::info!(prefix = %p.prefix, grant = %p.grant, active = ?p.active, healthy = p.healthy, "extra prefix gateway");
            }
        }
        for r in &outcome.refused {
            let key = format!("refused/{}/{}", r.from, r.prefix);
            let text = r.reason.to_string();
            if self.reported_routes.get(&key) != Some(&text) {
                tracing::warn!(from = %r.from, prefix = %r.prefix, reason = %text, "extra prefix refused");
                self.reported_routes.insert(key, text);
            }
        }
        // Held: carried before, not now, and still named by a MeshRoute (or
        // the grants unknown).
        let carried_now: std::collections::BTreeSet<IpNet> = outcome
            .prefixes
            .iter()
            .filter(|p| !p.local_gateway)
            .map(|p| p.prefix)
            .collect();
        outcome.held = self
            .carried
            .iter()
            .filter(|p| !carried_now.contains(p))
            .filter(|p| !self.routes_known || self.grant_prefixes.contains(p))
            .copied()
            .collect();
        for p in &outcome.held {
            let key = format!("held/{p}");
            if !self.reported_routes.contains_key(&key) {
                tracing::warn!(prefix = %p, routes_known = self.routes_known, "extra prefix held: routed into the tunnel on no peer (dropped) until its MeshRoute is deleted or carried again");
                self.reported_routes.insert(key, String::new());
            }
        }
        self.reported_routes.retain(|k, _| {
            !k.starts_with("held/") || outcome.held.iter().any(|p| *k == format!("held/{p}"))
        });
        self.carried = carried_now
            .into_iter()
            .chain(outcome.held.iter().copied())
            .collect();
        outcome
    }

    /// Renders BIRD's config from this pass and makes BIRD run it (started
    /// when its control socket does not answer); failures are logged and
    /// counted, never stop the pass.
    async fn bgp_step(&mut self, own_cidrs: &[IpNet], plan: &Plan) {
        let Some(mut speaker) = self.speaker.take() else {
            return;
        };
        let mut export = own_cidrs.to_vec();
        export.extend(
            self.route_outcome
                .prefixes
                .iter()
                .filter(|p| p.local_gateway && p.source == routes::Source::Static)
                .map(|p| p.prefix),
        );
        let grants: Vec<&Grant> = self.kept_grants.iter().collect();
        let tunnel: Vec<IpAddr> = tunnel_addresses(own_cidrs);
        let unknown = speaker.unknown_reflectors(|r| {
            r == self.cfg.node_name || self.mesh_nodes.iter().any(|m| m.name == r)
        });
        let text = unknown.join(", ");
        if self.reported_routes.get("mesh/reflectors") != Some(&text) {
            if !unknown.is_empty() {
                tracing::warn!(reflectors = %text, "--bgp-route-reflectors names nodes that are not in the mesh (no admitted Node of that name): the nodes that are not reflectors have no session through them");
            }
            self.reported_routes.insert("mesh/reflectors".into(), text);
        }
        let config = speaker.config(
            &self.cfg.node_name,
            &plan.local_node_ips,
            &export,
            &grants,
            &tunnel,
            &self.mesh_nodes,
        );
        let recovery = self.learned_table_has_routes;
        let result = match config {
            Err(e) => {
                self.speaker = Some(speaker);
                Err(e)
            }
            Ok(config) => {
                let done = tokio::task::spawn_blocking(move || {
                    let r = speaker.apply(&config, recovery);
                    (speaker, r)
                })
                .await;
                match done {
                    Ok((speaker, r)) => {
                        self.speaker = Some(speaker);
                        r
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the BGP step panicked; BGP mode is off until the agent restarts");
                        return;
                    }
                }
            }
        };
        match result {
            Ok(applied) => {
                if applied.started {
                    tracing::info!(recovery, "BIRD started");
                } else if applied.changed {
                    tracing::info!("BIRD reconfigured");
                }
                self.telemetry.set_bgp_sessions(
                    applied
                        .sessions
                        .iter()
                        .map(|s| {
                            (
                                s.name.clone(),
                                s.session.map_or("down", |st| st.as_str()).to_string(),
                            )
                        })
                        .collect(),
                );
            }
            Err(e) => tracing::warn!(error = %e, "BGP: BIRD not configured this pass"),
        }
    }

    /// Each peer this device has completed a handshake with, and the endpoint the
    /// device has for it ([`MeshConfig::handshakes`]). A device that cannot be read
    /// gives none: then the older-wins rule decides a contested key.
    async fn device_handshakes(&self) -> std::collections::BTreeMap<PublicKey, SocketAddr> {
        let backend = self.backend.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
            backend.peer_stats()
        })
        .await;
        match read {
            Ok(Ok(stats)) => stats
                .into_iter()
                .filter_map(|p| {
                    p.last_handshake?;
                    Some((p.public_key, p.endpoint?))
                })
                .collect(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the device's handshakes; a contested key goes to the older Node");
                Default::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the device's handshakes failed; a contested key goes to the older Node");
                Default::default()
            }
        }
    }

    async fn program_device(
        &mut self,
        private: &PrivateKey,
        extra: Option<(PrivateKey, ExtraRole)>,
        plan: &Plan,
    ) -> Result<(usize, DeviceView)> {
        let desired = plan.peer_configs();
        let backend = self.backend.clone();
        let key = private.clone();
        let port = self.cfg.listen_port;
        // After a restart the agent has no memory of what it published: the
        // published endpoints win once (a Node that moved while the agent was
        // down must not keep a stale address); from then on a peer that
        // roamed keeps its new address until its Node publishes another.
        let previous = std::mem::take(&mut self.last_endpoints);
        type Done = (wg::ChangeSet, HashMap<PublicKey, SocketAddr>, DeviceView);
        let (changes, published, view) =
            tokio::task::spawn_blocking(move || -> wg::Result<Done> {
                // A poisoned lock only means an earlier pass panicked mid-call;
                // the device itself is the source of truth, so carry on.
                let mut backend = backend.lock().unwrap_or_else(|p| p.into_inner());
                let state = backend.state()?;
                let caps = backend.capabilities();
                let mut desired = desired;
                let published =
                    mesh::keep_roamed_endpoints(&state.peers, &mut desired, Some(&previous));
                let local = LocalDevice {
                    private_key: &key,
                    listen_port: port,
                    fwmark: None,
                    extra: extra.as_ref().map(|(k, role)| (k, *role)),
                };
                let changes = wg::reconcile(&state, &local, &desired, caps);
                backend.apply(&changes)?;
                // The rotation driver's evidence: every established session
                // (which local key with which remote key, since when); a
                // device that cannot tell reports each peer's last handshake,
                // which is under its one (active) key.
                let handshakes = if caps.dual_identity {
                    state
                        .sessions
                        .iter()
                        .map(|s| Handshake {
                            local: s.local,
                            remote: s.remote,
                            at: to_timestamp(s.established),
                        })
                        .collect()
                } else {
                    backend
                        .peer_stats()
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|p| {
                            Some(Handshake {
                                local: key.public_key(),
                                remote: p.public_key,
                                at: to_timestamp(p.last_handshake?),
                            })
                        })
                        .collect()
                };
                let view = DeviceView {
                    caps,
                    handshakes,
                    read_at: jiff::Timestamp::now(),
                };
                Ok((changes, published, view))
            })
            .await??;
        // Only once applied: an endpoint that never reached the device must
        // not count as set.
        self.last_endpoints = published;
        if changes.is_empty() {
            return Ok((0, view));
        }
        let (mut add, mut remove, mut update) = (0, 0, 0);
        for c in &changes.peers {
            match c {
                PeerChange::Add(_) => add += 1,
                PeerChange::Remove(_) => remove += 1,
                PeerChange::Update { .. } | PeerChange::Promote { .. } => update += 1,
            }
        }
        tracing::info!(
            added = add,
            removed = remove,
            updated = update,
            key_set = changes.private_key.is_some(),
            extra_identity = ?changes.extra_identity.as_ref().map(|e| e.as_ref().map(|(_, role)| *role)),
            listen_port = ?changes.listen_port,
            "device updated"
        );
        let n = changes.peers.len()
            + usize::from(changes.private_key.is_some())
            + usize::from(changes.extra_identity.is_some())
            + usize::from(changes.listen_port.is_some());
        Ok((n, view))
    }

    /// Logs and raises one Event per rejected Node and reason; a Node that is
    /// merely not ready yet (no key published) is only logged at debug.
    async fn report_exclusions(
        &mut self,
        plan: &Plan,
        nodes: &[Arc<Node>],
        report: &mut PassReport,
    ) -> usize {
        let by_name: BTreeMap<&str, &Arc<Node>> = nodes
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n)))
            .collect();
        let mut still: HashMap<String, String> = HashMap::new();
        let mut raised = 0;
        for ex in &plan.excluded {
            let reason = ex.reason.to_string();
            if self.reported.get(&ex.node) == Some(&reason) {
                still.insert(ex.node.clone(), reason);
                continue;
            }
            if let mesh::Exclusion::Invalid(rejected) = &ex.reason {
                if rejected.not_ready() {
                    tracing::debug!(node = %ex.node, %reason, "node has not published its key yet");
                    still.insert(ex.node.clone(), reason);
                    continue;
                }
            }
            tracing::warn!(node = %ex.node, %reason, "node rejected: no peer");
            let Some(node) = by_name.get(ex.node.as_str()) else {
                continue;
            };
            let note = format!("rejected by wgmesh on {}: {reason}", self.cfg.node_name);
            match self
                .publisher
                .event(node, true, "PeerRejected", "Validate", note)
                .await
            {
                Ok(()) => {
                    raised += 1;
                    still.insert(ex.node.clone(), reason);
                }
                // Not remembered as reported: the next pass tries again.
                Err(e) => self.event_failed(report, "PeerRejected", &e),
            }
        }
        self.reported = still;
        raised
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
        node::check_endpoint(&addr).map_err(|reason| AgentError::BadEndpoint {
            endpoint: addr,
            origin: source,
            reason,
        })?;
        if self.last_endpoint != Some(addr) {
            tracing::info!(endpoint = %addr, source, "endpoint chosen");
            self.last_endpoint = Some(addr);
        }
        Ok(addr)
    }
}

/// Writes the fail-closed backstops (a blackhole per cluster CIDR) without
/// the device or the API: what the agent does first of all, and all that
/// `--backstops-only` does.
pub async fn write_backstops(cfg: &AgentConfig) -> Result<()> {
    if !cfg.manage_network {
        return Ok(());
    }
    let net = Net::connect()?;
    // Routes of ours beyond the cluster CIDRs are extra prefixes (route
    // sync) an earlier run programmed: kept, with their backstops, until the
    // first pass knows the grants. Dropping them here would send their
    // traffic out by the default route meanwhile.
    let mut keep = cfg.cluster_cidrs.clone();
    keep.extend(net.our_destinations().await?);
    keep.sort_unstable();
    keep.dedup();
    let changes = net.ensure_routes(None, &keep, &[]).await?;
    if changes.is_empty() {
        tracing::info!(cidrs = ?cfg.cluster_cidrs, "backstops in place");
    } else {
        tracing::info!(cidrs = ?cfg.cluster_cidrs, %changes, "backstops written: cluster traffic is dropped until the tunnel is up");
    }
    for conflict in &changes.conflicts {
        tracing::warn!(route = %conflict, "a route not created by wgmesh covers a cluster CIDR; no backstop there");
    }
    Ok(())
}

/// Runs the agent: one pass (`once`) or the watch loop until SIGTERM/SIGINT.
pub async fn run(cfg: AgentConfig, client: Client, once: bool) -> Result<()> {
    // Before anything that needs the API server or the device.
    write_backstops(&cfg).await?;
    let api: Api<Node> = Api::all(client.clone());
    let route_client = client.clone();
    let bgp = cfg.bgp.is_some();
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
        // The grants too, or a single pass would take their prefixes off.
        let routes: Api<kube::core::DynamicObject> =
            Api::all_with(route_client, &meshroute_resource());
        match routes.list(&Default::default()).await {
            Ok(list) => {
                let objects: Vec<serde_json::Value> = list
                    .items
                    .iter()
                    .filter_map(|o| serde_json::to_value(o).ok())
                    .collect();
                agent.set_route_objects(&objects);
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(K8sError::from(e).into()),
        }
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
    let watch = tokio::spawn(reflect(
        api,
        writer,
        notify,
        watch_errors,
        "Node watch failed; retrying with backoff, the mesh stays as it is",
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;
    let routes = watch_routes(route_client, changed.clone(), telemetry.api_errors.clone());
    tokio::select! {
        r = reader.wait_until_ready() => { if r.is_err() { return Err(AgentError::WatchEnded); } }
        _ = term.recv() => return Ok(()),
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    // A moment for the MeshRoute cache, usually synced by now; without it
    // the first pass holds what an earlier run carried, and the next pass
    // (its sync wakes one) carries it again.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let ready = routes.store.lock().ok().and_then(|s| s.clone());
            match ready {
                Some(store) => {
                    let _ = store.wait_until_ready().await;
                    return;
                }
                None if routes.not_served.load(std::sync::atomic::Ordering::Relaxed) => return,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    tracing::info!("Node cache synced; reconciling");
    telemetry.set_synced(true);
    let mut retry = RETRY_MIN;
    let mut seen = agent.local_stamp().await;
    loop {
        let nodes = reader.state();
        // After a failure the next pass comes soon (and sooner than the
        // resync): a 429 or an outage must not leave the mesh stale.
        let mut rotating = false;
        let mut probing = false;
        routes.feed(&mut agent);
        let pass = agent.pass(&nodes).await;
        let pass_ended = tokio::time::Instant::now();
        let again = match pass {
            Ok(report) if report.api_failed => {
                probing = report.probing_routes;
                rotating = report.rotating;
                tracing::info!(?report, "pass done but an API write failed");
                Some(retry)
            }
            Ok(report) if report.wrote() => {
                probing = report.probing_routes;
                rotating = report.rotating;
                tracing::info!(?report, "pass");
                None
            }
            Ok(report) => {
                probing = report.probing_routes;
                rotating = report.rotating;
                tracing::debug!(?report, "pass: nothing to change");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?retry, "pass failed; retrying");
                Some(retry)
            }
        };
        retry = match again {
            Some(r) => (r * 2).min(RETRY_MAX),
            None => RETRY_MIN,
        };
        let mut wait = again.unwrap_or(resync).min(resync);
        if rotating {
            // Confirmations appear on the device without any event, and the
            // deadlines pass: look again every second until the rotation ends.
            wait = wait.min(ROTATION_TICK);
        }
        if probing {
            // A remote gateway can die without any event: sample its
            // session's counters often enough to move its prefixes soon.
            wait = wait.min(routes::PROBE_INTERVAL);
        }
        if bgp {
            // What BIRD learns or loses reaches its kernel table without any
            // event the agent sees: look at it this often.
            wait = wait.min(BGP_TICK);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut tick = tokio::time::interval(WATCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = changed.notified() => {
                    tokio::time::sleep(change_delay(pass_ended.elapsed(), debounce)).await;
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tick.tick() => {
                    let now = agent.local_stamp().await;
                    if now != seen {
                        tracing::info!(before = ?seen, after = ?now, "the interface, the data plane's socket or the key store changed; reconciling now");
                        break;
                    }
                }
                _ = term.recv() => {
                    tracing::info!("stopping; annotations, device and routes are left in place");
                    return Ok(());
                }
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("stopping; annotations, device and routes are left in place");
                    return Ok(());
                }
            }
        }
        if watch.is_finished() {
            return Err(AgentError::WatchEnded);
        }
        seen = agent.local_stamp().await;
    }
}

/// The `MeshRoute` resource for kube's dynamic API.
pub fn meshroute_resource() -> kube::core::ApiResource {
    kube::core::ApiResource {
        group: routes::grant::GROUP.into(),
        version: routes::grant::VERSION.into(),
        api_version: format!("{}/{}", routes::grant::GROUP, routes::grant::VERSION),
        kind: routes::grant::KIND.into(),
        plural: routes::grant::PLURAL.into(),
    }
}

/// The MeshRoute side input of the loop: whether the resource is served,
/// and its cache once it is. Never blocks a pass (DESIGN: nothing on the API
/// side may stop the data path from being repaired): until the cache has
/// synced the grants count as unknown, and extra prefixes carried so far are
/// held (see `Agent::route_sync`).
#[derive(Clone, Default)]
struct RouteSource {
    /// `Some` once served (the reflector runs).
    store: Arc<std::sync::Mutex<Option<reflector::Store<kube::core::DynamicObject>>>>,
    /// The resource answered 404 at the last probe.
    not_served: Arc<std::sync::atomic::AtomicBool>,
}

/// How often an agent asks again whether MeshRoutes are served while they
/// are not (the CRD applied after the DaemonSet, or later).
const ROUTES_PROBE: Duration = Duration::from_secs(30);

impl RouteSource {
    /// Hands the agent what is known: the objects when the cache is synced,
    /// none when the resource is not served, else "unknown".
    fn feed(&self, agent: &mut Agent) {
        let store = self.store.lock().ok().and_then(|s| s.clone());
        match store {
            Some(store) if store.wait_until_ready().now_or_never().is_some() => {
                let objects: Vec<serde_json::Value> = store
                    .state()
                    .iter()
                    .filter_map(|o| serde_json::to_value(o.as_ref()).ok())
                    .collect();
                agent.set_route_objects(&objects);
            }
            Some(_) => agent.set_routes_unknown(),
            // Not served means no grants only when nothing is carried: a 404
            // from an API server whose CRD cache is not synced yet (after its
            // restart) must not release prefixes that are still granted.
            None if self.not_served.load(std::sync::atomic::Ordering::Relaxed)
                && !agent.carries_extra_prefixes() =>
            {
                agent.set_route_objects(&[]);
            }
            None => agent.set_routes_unknown(),
        }
    }
}

/// Starts the task that asks whether MeshRoutes are served (its CRD,
/// manifests/05-meshroute-crd.yaml, installed) and then runs their
/// reflector. Asked every [`ROUTES_PROBE`] while not served, with backoff
/// while the API does not answer.
fn watch_routes(
    client: Client,
    changed: Arc<Notify>,
    errors: prometheus_client::metrics::counter::Counter,
) -> RouteSource {
    let source = RouteSource::default();
    let out = source.clone();
    tokio::spawn(async move {
        let resource = meshroute_resource();
        let api: Api<kube::core::DynamicObject> = Api::all_with(client, &resource);
        let mut wait = RETRY_MIN;
        let mut said_not_served = false;
        loop {
            let probe = tokio::time::timeout(
                crate::k8s::WRITE_TIMEOUT,
                api.list(&kube::api::ListParams::default().limit(1)),
            )
            .await;
            match probe {
                Ok(Ok(_)) => break,
                Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
                    if !said_not_served {
                        tracing::info!("the MeshRoute resource is not served (manifests/05-meshroute-crd.yaml not applied): no extra prefixes; asking again every 30 s");
                        said_not_served = true;
                    }
                    source
                        .not_served
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    changed.notify_one();
                    tokio::time::sleep(ROUTES_PROBE).await;
                    continue;
                }
                Ok(Err(e)) => {
                    errors.inc();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot ask whether MeshRoutes are served (RBAC: manifests/01-rbac.yaml grants get/list/watch); extra prefixes carried so far are held");
                }
                Err(_) => {
                    errors.inc();
                    tracing::warn!(retry_in = ?wait, "asking whether MeshRoutes are served timed out; extra prefixes carried so far are held");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
        let writer = reflector::store::Writer::<kube::core::DynamicObject>::new(resource.clone());
        if let Ok(mut s) = source.store.lock() {
            *s = Some(writer.as_reader());
        }
        source
            .not_served
            .store(false, std::sync::atomic::Ordering::Relaxed);
        reflect(
            api,
            writer,
            changed,
            errors,
            "MeshRoute watch failed; retrying with backoff, extra prefixes stay as they are",
        )
        .await;
    });
    out
}

/// Runs a reflector into `writer`: every change wakes a pass; a failure is
/// counted and logged as `failed`, and the backoff retries while the cache
/// (and so the device) keeps what it holds. Returns when the watch ends.
async fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    errors: prometheus_client::metrics::counter::Counter,
    failed: &'static str,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    futures::pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(_) => changed.notify_one(),
            Err(e) => {
                errors.inc();
                tracing::warn!(error = %e, "{failed}")
            }
        }
    }
}

/// The node-local things whose change calls for a pass at once: the
/// interface's index (re-created), the UAPI socket file (a restarted data
/// plane), and the key store's state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStamp {
    link: Option<u32>,
    socket: Option<FileStamp>,
    store: Option<FileStamp>,
}

impl Agent {
    /// Reads the [`LocalStamp`] (a netlink dump of one link and two stats).
    pub async fn local_stamp(&self) -> LocalStamp {
        let link = match &self.net {
            Some(net) => net.link_index(&self.cfg.interface).await.ok().flatten(),
            None => None,
        };
        LocalStamp {
            link,
            socket: FileStamp::of(
                &self
                    .cfg
                    .uapi_dir
                    .join(format!("{}.sock", self.cfg.interface)),
            ),
            store: FileStamp::of(&state_file(&self.cfg.store)),
        }
    }

    /// `spec.podCIDRs` (with `spec.podCIDR`) when the Node has them; else
    /// `--pod-cidrs`; else whatever `wgmesh.dev/pod-cidrs` already says (set
    /// by a person or another IPAM), so the agent's patch never removes it.
    fn own_pod_cidrs(&self, own: &Node) -> Vec<IpNet> {
        let from_spec = own_pod_cidrs(own);
        if !from_spec.is_empty() {
            return from_spec;
        }
        let mut cidrs: Vec<IpNet> = if !self.cfg.pod_cidrs.is_empty() {
            self.cfg.pod_cidrs.clone()
        } else {
            own.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotations::POD_CIDRS))
                .map(|v| {
                    v.split(',')
                        .filter_map(|c| c.trim().parse::<IpNet>().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        cidrs.iter_mut().for_each(|c| *c = c.trunc());
        cidrs.sort();
        cidrs.dedup();
        cidrs
    }
}

/// A cheap sign that a file changed: a rename onto the path (how every
/// store write lands) changes the inode, an in-place write the length or
/// mtime. Only a trigger: the store itself compares content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// How long a pass that a Node event asks for waits, `since` the last pass
/// ended: a change after a quiet spell goes at once (one Node change is one
/// watch event, and waiting for more would only delay it); an event within
/// `debounce` of the last pass (the rest of a burst, or the echo of this
/// node's own publish) waits until `debounce` has passed, so a burst is still
/// coalesced into one pass per `debounce` at most.
fn change_delay(since: Duration, debounce: Duration) -> Duration {
    debounce.saturating_sub(since)
}

fn state_file(store: &Path) -> PathBuf {
    store.join(crate::keys::store::STATE_FILE)
}

/// A node's tunnel addresses: the pod gateway address of its first pod
/// CIDR of each family (the address on its WireGuard interface), where its
/// iBGP mesh sessions run.
pub fn tunnel_addresses(cidrs: &[IpNet]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for gw in cidrs.iter().filter_map(gateway_host) {
        if !out.iter().any(|a| a.is_ipv4() == gw.addr().is_ipv4()) {
            out.push(gw.addr());
        }
    }
    out
}

/// The pod gateway of `cidr` (its first host address, as the bridge CNI
/// plugin assigns it) as a host prefix.
fn gateway_host(cidr: &IpNet) -> Option<IpNet> {
    let net = cidr.trunc();
    let addr = match net.network() {
        IpAddr::V4(a) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(a).checked_add(1)?)),
        IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a).checked_add(1)?)),
    };
    if !net.contains(&addr) || net.prefix_len() >= net.max_prefix_len() - 1 {
        return None;
    }
    IpNet::new(addr, net.max_prefix_len()).ok()
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

/// The Node's `Ready` condition is `True` (a missing condition is not ready:
/// a gateway must be known alive to carry a prefix).
fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_after_a_quiet_spell_goes_at_once_and_a_burst_is_spaced() {
        let debounce = Duration::from_millis(200);
        assert_eq!(
            change_delay(Duration::from_secs(5), debounce),
            Duration::ZERO
        );
        assert_eq!(change_delay(debounce, debounce), Duration::ZERO);
        assert_eq!(
            change_delay(Duration::from_millis(50), debounce),
            Duration::from_millis(150)
        );
        assert_eq!(change_delay(Duration::ZERO, debounce), debounce);
        assert_eq!(change_delay(Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }
}
