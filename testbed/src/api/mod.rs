//! The testbed's Kubernetes API: an in-memory HTTP server implementing the part of the
//! API that wgmesh agents and people use for Nodes, so real clients (kube-rs
//! `watcher`/`reflector`, `kube_runtime::events::Recorder`, kubectl) run against it on
//! one host. It is for tests only: plain HTTP, no authentication, nothing persisted.
//! Real clusters use `manifests/`.
//!
//! What it serves:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/events.k8s.io[/v1]`,
//!   and a schema-less `/openapi/v3` that only tells kubectl the server validates
//!   fields itself (so `kubectl create/apply` work; `/openapi/v2` answers 404 and
//!   `kubectl explain` does not work);
//! - Nodes: list (label and field selectors, `limit`/`continue`), watch (resume from a
//!   resourceVersion, 410 Gone as an ERROR event when it left the bounded history,
//!   bookmarks, `timeoutSeconds`, `sendInitialEvents` streaming lists), get, create,
//!   replace, delete (finalizers and preconditions honoured), merge / JSON /
//!   strategic-merge patches, and the `status` subresource;
//! - Events in core/v1 and events.k8s.io/v1 (create, get, list, patch, replace,
//!   delete), stored once and visible through both groups;
//! - node IPAM: a created Node without `spec.podCIDRs` gets the next free subnet of each
//!   cluster CIDR, like kube-controller-manager's range allocator;
//! - kubectl Tables, so `kubectl get nodes -o wide` prints the usual columns.
//! - outside Kubernetes: `GET /testbed/writes` answers `{"count": N}`, the write
//!   counter below, for a testbed that runs the server as a separate process.
//!
//! Every change takes the next global resourceVersion. Writes that change nothing (a
//! patch that sets what is already there) take none and emit no watch event, as on a
//! real apiserver; they are still counted by [`ApiServerHandle::write_count`], which
//! counts write *requests*, so a test can prove an agent sends none while nothing
//! changes.

mod discovery;
mod events;
mod ipam;
mod patch;
mod selector;
mod server;
mod status;
mod store;
mod table;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, ObjectReference};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use events::EventApi;
pub use ipam::IpamConfig;
pub use status::ApiError;

use server::Shared;
use store::{DeleteOutcome, Preconditions, Store, Subresource, WriteOpts};

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Where to listen; port 0 picks a free one. Agents in network namespaces reach the
    /// server through a veth address, so this may be any local address.
    pub listen: SocketAddr,
    /// Node pod-CIDR allocation (default: `10.244.0.0/16`, /24 per node).
    pub ipam: IpamConfig,
    /// How many Node changes are kept for watches to resume from; a watch from an older
    /// resourceVersion gets 410 Gone.
    pub history_limit: usize,
    /// How often watches that asked for bookmarks (`allowWatchBookmarks=true`) get one.
    /// The apiserver sends one about every minute; shorter keeps tests quick.
    pub bookmark_interval: Duration,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ipam: IpamConfig::default(),
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One write request the server received (POST, PUT, PATCH or DELETE under `/api` or
/// `/apis`), whatever its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub user_agent: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
}

/// An Event as stored, with the fields tests usually assert on pulled out.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    /// The group it was created through (`v1` or `events.k8s.io/v1`).
    pub api: EventApi,
    pub namespace: String,
    pub name: String,
    /// `Normal` or `Warning`.
    pub type_: Option<String>,
    pub reason: Option<String>,
    pub action: Option<String>,
    /// `note` in events.k8s.io/v1, `message` in core/v1.
    pub message: Option<String>,
    /// The object the Event is about (`regarding` / `involvedObject`).
    pub regarding: ObjectReference,
    /// `reportingController` / `reportingComponent`.
    pub reporting_controller: Option<String>,
    pub reporting_instance: Option<String>,
    /// How many times it occurred (series count, else the deprecated count, else 1).
    pub count: i32,
    /// The whole object in core/v1 form.
    pub event: CoreEvent,
}

impl RecordedEvent {
    fn from_core(event: CoreEvent, api: EventApi) -> Self {
        let count = event
            .series
            .as_ref()
            .and_then(|s| s.count)
            .or(event.count)
            .unwrap_or(1);
        Self {
            api,
            namespace: event.metadata.namespace.clone().unwrap_or_default(),
            name: event.metadata.name.clone().unwrap_or_default(),
            type_: event.type_.clone(),
            reason: event.reason.clone(),
            action: event.action.clone(),
            message: event.message.clone(),
            regarding: event.involved_object.clone(),
            reporting_controller: event.reporting_component.clone(),
            reporting_instance: event.reporting_instance.clone(),
            count,
            event,
        }
    }
}

/// Starts servers.
pub struct ApiServer;

impl ApiServer {
    /// Binds `config.listen` and serves on the current tokio runtime until
    /// [`ApiServerHandle::shutdown`] (or the handle is dropped).
    pub async fn start(config: ApiServerConfig) -> Result<ApiServerHandle> {
        config.ipam.validate().map_err(Error::Config)?;
        if config.bookmark_interval.is_zero() {
            return Err(Error::Config("bookmark interval must be positive".into()));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let store = Store::new(config.ipam.clone(), config.history_limit);
        let shared = Arc::new(Shared {
            changes: watch::channel(store.resource_version()).0,
            store: std::sync::Mutex::new(store),
            epoch: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            bookmark_interval: config.bookmark_interval,
            addr,
        });
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        tracing::info!(url = %url_for(addr), "test Kubernetes API listening");
        Ok(ApiServerHandle {
            shared,
            addr,
            task: Some(task),
        })
    }
}

/// A running server. Dropping it stops the server (without waiting); prefer
/// [`ApiServerHandle::shutdown`]. The methods act on the store directly: they are not
/// API requests and are not counted by [`ApiServerHandle::write_count`], but their
/// changes reach watches like any other.
pub struct ApiServerHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl ApiServerHandle {
    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR:PORT` (a wildcard listen address is given as the loopback one).
    pub fn url(&self) -> String {
        url_for(self.addr)
    }

    /// A kubeconfig whose current context points at [`Self::url`].
    pub fn kubeconfig(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// Writes [`Self::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<()> {
        write_kubeconfig_file(path.as_ref(), &self.url())
    }

    /// Writes a kubeconfig pointing at `server_url` instead, for clients that reach the
    /// server another way (e.g. through a veth address when listening on 0.0.0.0).
    pub fn write_kubeconfig_with_server(
        &self,
        path: impl AsRef<Path>,
        server_url: &str,
    ) -> Result<()> {
        write_kubeconfig_file(path.as_ref(), server_url)
    }

    /// Creates a Node as `POST /api/v1/nodes` would (uid, timestamps, IPAM, validation).
    pub fn create_node(&self, node: Node) -> Result<Node> {
        let out = self.shared.store().create_node(node, WriteOpts::default());
        self.shared.notify();
        Ok(out?)
    }

    /// A Node with just a name, created like [`Self::create_node`].
    pub fn create_named_node(&self, name: &str) -> Result<Node> {
        let mut node = Node::default();
        node.metadata.name = Some(name.to_string());
        self.create_node(node)
    }

    /// Applies a JSON merge patch to a Node (`PATCH /api/v1/nodes/NAME`: status changes
    /// are ignored there; see [`Self::merge_patch_node_status`]).
    pub fn merge_patch_node(&self, name: &str, patch: &serde_json::Value) -> Result<Node> {
        self.patch(name, patch, Subresource::Main)
    }

    /// Applies a JSON merge patch through the `status` subresource (spec changes are
    /// ignored), e.g. to set the Ready condition or addresses as a kubelet would.
    pub fn merge_patch_node_status(&self, name: &str, patch: &serde_json::Value) -> Result<Node> {
        self.patch(name, patch, Subresource::Status)
    }

    fn patch(&self, name: &str, patch: &serde_json::Value, sub: Subresource) -> Result<Node> {
        let body = patch.to_string();
        let out = self.shared.store().patch_node(
            name,
            patch::PatchKind::Merge,
            body.as_bytes(),
            sub,
            WriteOpts::default(),
        );
        self.shared.notify();
        Ok(out?)
    }

    /// Deletes a Node. With finalizers it only gets a deletionTimestamp (returned).
    pub fn delete_node(&self, name: &str) -> Result<Node> {
        let out =
            self.shared
                .store()
                .delete_node(name, &Preconditions::default(), WriteOpts::default());
        self.shared.notify();
        Ok(match out? {
            DeleteOutcome::Deleted(n) | DeleteOutcome::Pending(n) => n,
        })
    }

    /// One Node, if it exists.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.shared.store().get_node(name).ok()
    }

    /// All Nodes, by name.
    pub fn nodes(&self) -> Vec<Node> {
        self.shared.store().nodes()
    }

    /// All Events (both groups), by namespace and name.
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.shared.store().recorded_events()
    }

    /// Write requests received so far: POST, PUT, PATCH and DELETE under `/api` and
    /// `/apis`, successful or not, no-op or not.
    pub fn write_count(&self) -> u64 {
        self.shared.store().write_count()
    }

    /// The most recent write requests (up to 10 000), oldest first.
    pub fn writes(&self) -> Vec<WriteRecord> {
        self.shared.store().writes()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Simulates an etcd compaction followed by an apiserver restart: the watch history
    /// is dropped, every resourceVersion handed out so far becomes too old (a watch from
    /// it gets 410 Gone), and every open watch stream ends. Watchers must relist.
    pub fn compact(&self) {
        self.shared.store().compact();
        self.shared.epoch.send_modify(|e| *e += 1);
        self.shared.notify();
    }

    /// Stops accepting, ends every watch, and waits (up to 5 s) for open requests.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

fn url_for(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A kubeconfig with one cluster (`server_url`, plain HTTP), one user without
/// credentials and a current context joining them (namespace `default`). kube-rs
/// (`Kubeconfig::read_from`, `Config::from_custom_kubeconfig`) and kubectl read it.
pub fn kubeconfig_yaml(server_url: &str) -> String {
    format!(
        "# wgmesh-testbed: test Kubernetes API (plain HTTP, no authentication)\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: wgmesh-testbed\n  \
           cluster:\n    \
             server: {server_url}\n\
         users:\n\
         - name: wgmesh-testbed\n  \
           user: {{}}\n\
         contexts:\n\
         - name: wgmesh-testbed\n  \
           context:\n    \
             cluster: wgmesh-testbed\n    \
             user: wgmesh-testbed\n    \
             namespace: default\n\
         current-context: wgmesh-testbed\n\
         preferences: {{}}\n"
    )
}

fn write_kubeconfig_file(path: &Path, server_url: &str) -> Result<()> {
    std::fs::write(path, kubeconfig_yaml(server_url)).map_err(|source| Error::Write {
        path: path.to_path_buf(),
        source,
    })
}
