//! One cluster seam for the agent's tests: the same test body runs against the
//! testbed's in-memory API ([`ApiServer`]) and against a real control plane
//! (etcd + kube-apiserver + kube-controller-manager's node IPAM, with
//! manifests/ applied: [`Local`]), so what the agent does through kube-rs is
//! checked against the server it is written for, not only against our model
//! of it.
//!
//! The administrator's operations (create, patch, delete a Node) go straight
//! to the store on the in-memory API and through the administrator's HTTPS
//! client on the real one; the agent always talks HTTP through kube-rs, on
//! the real server with the ServiceAccount token a DaemonSet pod on its Node
//! gets. A real test without WGMESH_KUBE_BINS prints SKIP (counted apart by
//! scripts/test), except with CI=true, where it fails.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use serde_json::{json, Value};
use wgmesh::agent::{Agent, AgentConfig};
use wgmesh::wg::memory::MemoryBackend;
use wgmesh_testbed::api::{ApiServer, ApiServerConfig, ApiServerHandle};
use wgmesh_testbed::control_plane::{self, local::Local, Bins};

/// The cluster CIDR of both servers (the in-memory IPAM's default).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// How long kube-controller-manager may take to give a new Node its pod CIDR.
const IPAM_WAIT: Duration = Duration::from_secs(30);

/// A cluster to run an agent against, with a directory for its files.
pub struct Cluster {
    api: Api,
    dir: tempfile::TempDir,
    /// The agent's key store.
    pub store: PathBuf,
}

enum Api {
    Embedded {
        server: ApiServerHandle,
        kubeconfig: PathBuf,
    },
    Real(Box<Local>),
}

/// An Event as a test asserts on it, whichever group and server it came from.
#[derive(Debug, Clone)]
pub struct Ev {
    pub reason: Option<String>,
    /// `Normal` or `Warning`.
    pub type_: Option<String>,
    /// The name of the object it is about.
    pub regarding: Option<String>,
    /// `note` (events.k8s.io/v1) or `message` (core/v1).
    pub note: Option<String>,
}

impl Cluster {
    /// The testbed's in-memory API on a free loopback port.
    pub async fn embedded() -> Self {
        let server = ApiServer::start(ApiServerConfig::default()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).unwrap();
        Self::new(Api::Embedded { server, kubeconfig }, dir)
    }

    /// A real control plane of its own, or `None` (after printing SKIP) when
    /// its prerequisites are missing.
    pub async fn real(test: &str) -> Option<Self> {
        let local = local(test).await?;
        Some(Self::new(
            Api::Real(Box::new(local)),
            tempfile::tempdir().unwrap(),
        ))
    }

    fn new(api: Api, dir: tempfile::TempDir) -> Self {
        let store = dir.path().join("store");
        Self { api, dir, store }
    }

    pub fn is_real(&self) -> bool {
        matches!(self.api, Api::Real(_))
    }

    /// The real control plane, for what only it can do (restarts, etcd).
    pub fn local(&mut self) -> Option<&mut Local> {
        match &mut self.api {
            Api::Real(l) => Some(l),
            Api::Embedded { .. } => None,
        }
    }

    /// Creates a Node with just a name and returns it once it has its pod
    /// CIDRs (the in-memory IPAM sets them at creation; on the real server
    /// kube-controller-manager does shortly after).
    pub fn create_node(&self, name: &str) -> Node {
        match &self.api {
            Api::Embedded { server, .. } => server.create_named_node(name).unwrap(),
            Api::Real(l) => {
                control_plane::create_node(l.admin(), name, &json!({})).unwrap();
                let deadline = Instant::now() + IPAM_WAIT;
                loop {
                    let node = self.node(name).expect("the Node just created");
                    if node
                        .spec
                        .as_ref()
                        .and_then(|s| s.pod_cidrs.as_ref())
                        .is_some_and(|c| !c.is_empty())
                    {
                        return node;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "kube-controller-manager's node IPAM gave {name} no spec.podCIDRs within {} s",
                        IPAM_WAIT.as_secs()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// A JSON merge patch of a Node, as the administrator (status ignored).
    pub fn merge_patch_node(&self, name: &str, patch: &Value) -> Node {
        match &self.api {
            Api::Embedded { server, .. } => server.merge_patch_node(name, patch).unwrap(),
            Api::Real(l) => admin_patch(l, &format!("/api/v1/nodes/{name}"), patch),
        }
    }

    /// A JSON merge patch of a Node's status subresource, as a kubelet would.
    pub fn merge_patch_node_status(&self, name: &str, patch: &Value) -> Node {
        match &self.api {
            Api::Embedded { server, .. } => server.merge_patch_node_status(name, patch).unwrap(),
            Api::Real(l) => admin_patch(l, &format!("/api/v1/nodes/{name}/status"), patch),
        }
    }

    pub fn delete_node(&self, name: &str) {
        match &self.api {
            Api::Embedded { server, .. } => {
                server.delete_node(name).unwrap();
            }
            Api::Real(l) => {
                l.admin()
                    .request(
                        "DELETE",
                        &format!("/api/v1/nodes/{name}"),
                        "application/json",
                        &Value::Null,
                    )
                    .unwrap();
            }
        }
    }

    /// One Node, if it exists.
    pub fn node(&self, name: &str) -> Option<Node> {
        match &self.api {
            Api::Embedded { server, .. } => server.node(name),
            Api::Real(l) => {
                let r = l.admin().request(
                    "GET",
                    &format!("/api/v1/nodes/{name}"),
                    "application/json",
                    &Value::Null,
                );
                match r {
                    Err(e) if e.status() == Some(404) => None,
                    r => Some(serde_json::from_value(r.unwrap()).unwrap()),
                }
            }
        }
    }

    /// Every Node.
    pub fn nodes(&self) -> Vec<Node> {
        match &self.api {
            Api::Embedded { server, .. } => server.nodes(),
            Api::Real(l) => items(l, "/api/v1/nodes")
                .into_iter()
                .map(|n| serde_json::from_value(n).unwrap())
                .collect(),
        }
    }

    /// Every Node, as [`Agent::pass`] takes them.
    pub fn pass_nodes(&self) -> Vec<Arc<Node>> {
        self.nodes().into_iter().map(Arc::new).collect()
    }

    /// A Node's `spec.podCIDRs`, as the API has them.
    pub fn pod_cidrs(&self, name: &str) -> Vec<String> {
        self.node(name)
            .and_then(|n| n.spec?.pod_cidrs)
            .unwrap_or_default()
    }

    /// One of a Node's `wgmesh.dev/` annotations.
    pub fn annotation(&self, node: &str, key: &str) -> Option<String> {
        self.node(node)?
            .metadata
            .annotations?
            .get(&format!("wgmesh.dev/{key}"))
            .cloned()
    }

    /// Every Event, both groups on the in-memory API; events.k8s.io/v1 (the
    /// group kube-runtime's Recorder writes) on the real one.
    pub fn events(&self) -> Vec<Ev> {
        match &self.api {
            Api::Embedded { server, .. } => server
                .events()
                .into_iter()
                .map(|e| Ev {
                    reason: e.reason,
                    type_: e.type_,
                    regarding: e.regarding.name,
                    note: e.message,
                })
                .collect(),
            Api::Real(l) => items(l, "/apis/events.k8s.io/v1/events")
                .into_iter()
                .map(|e| {
                    let s = |v: &Value| v.as_str().map(str::to_string);
                    Ev {
                        reason: s(&e["reason"]),
                        type_: s(&e["type"]),
                        regarding: s(&e["regarding"]["name"]),
                        note: s(&e["note"]),
                    }
                })
                .collect(),
        }
    }

    /// The Events with this reason.
    pub fn events_with_reason(&self, reason: &str) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    /// Write requests by the agent on `node` so far: every write request the
    /// in-memory API received (only agents talk HTTP to it here); on the real
    /// server, the audit log's writes with a token bound to `node`.
    pub fn agent_writes(&self, node: &str) -> u64 {
        match &self.api {
            Api::Embedded { server, .. } => server.write_count(),
            Api::Real(l) => l.agent_writes(Some(node)).unwrap(),
        }
    }

    /// The kubeconfig an agent on `node` uses: the in-memory API's (no
    /// authentication), or a fresh ServiceAccount token bound to a Pod on
    /// `node` (what its DaemonSet pod would mount).
    pub fn agent_kubeconfig(&self, node: &str) -> PathBuf {
        match &self.api {
            Api::Embedded { kubeconfig, .. } => kubeconfig.clone(),
            Api::Real(l) => {
                let path = self.dir.path().join(format!("{node}.kubeconfig"));
                l.agent_kubeconfig(node, &path).unwrap();
                path
            }
        }
    }

    /// The kube-rs client of the agent on `node`.
    pub async fn agent_client(&self, node: &str) -> kube::Client {
        wgmesh::k8s::client(Some(&self.agent_kubeconfig(node)))
            .await
            .unwrap()
    }

    /// The agent's configuration on `node`: no network management, the
    /// in-memory device, CNI config next to the key store.
    pub fn config(&self, node: &str) -> AgentConfig {
        config(&self.store, node)
    }

    /// An agent on `node` with `device` as its WireGuard backend.
    pub async fn agent(&self, node: &str, device: &MemoryBackend) -> Agent {
        Agent::with_backend(
            self.config(node),
            self.agent_client(node).await,
            Arc::new(std::sync::Mutex::new(device.clone())),
        )
        .await
        .unwrap()
    }
}

/// The agent's configuration on `node` with its key store at `store`.
pub fn config(store: &Path, node: &str) -> AgentConfig {
    AgentConfig {
        node_name: node.into(),
        store: store.to_path_buf(),
        interface: "wgmesh0".into(),
        uapi_dir: "/nonexistent".into(),
        listen_port: 51820,
        endpoint: None,
        cluster_cidrs: vec![CLUSTER_CIDR.parse().unwrap()],
        pod_cidrs: Vec::new(),
        encrypt_host_traffic: false,
        masquerade: false,
        route_table: 51820,
        rule_priority: 5210,
        api_servers: Vec::new(),
        rotation: wgmesh::keys::schedule::Policy::default(),
        rotation_stagger: Duration::from_secs(0),
        mtu: None,
        persistent_keepalive: None,
        manage_network: false,
        debounce: Duration::from_millis(10),
        resync: Duration::from_secs(60),
        metrics_listen: None,
        backend: wgmesh::wg::kernel::BackendKind::Uapi,
        cni_dir: Some(store.with_file_name("cni")),
        cni_overwrite: false,
        bgp: None,
    }
}

fn admin_patch(l: &Local, path: &str, patch: &Value) -> Node {
    let node = l
        .admin()
        .request("PATCH", path, "application/merge-patch+json", patch)
        .unwrap();
    serde_json::from_value(node).unwrap()
}

fn items(l: &Local, path: &str) -> Vec<Value> {
    let list = l
        .admin()
        .request("GET", path, "application/json", &Value::Null)
        .unwrap();
    match list["items"].as_array() {
        Some(items) => items.clone(),
        None => panic!("GET {path}: no items: {list}"),
    }
}

/// A real control plane of its own on 127.0.0.1 (started off the async
/// runtime), or `None` after [`testkit::prereq::skip_or_fail`] when WGMESH_KUBE_BINS is
/// missing. A control plane that does not start fails the test.
pub async fn local(test: &str) -> Option<Local> {
    let bins = match Bins::from_env() {
        Ok(bins) => bins,
        Err(e) => {
            testkit::prereq::skip_or_fail(test, &e.to_string());
            return None;
        }
    };
    let started = Instant::now();
    let local = tokio::task::spawn_blocking(move || Local::start(bins, &[CLUSTER_CIDR]))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{test}: the real control plane did not start: {e}"));
    eprintln!(
        "{test}: real control plane up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Some(local)
}

/// Polls `check` until it gives a value, for at most `timeout`; a timeout
/// fails the test with `what` did not happen.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {} s: {what}",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
