//! The agent's Node watch and its writes through what a real kube-apiserver
//! does to clients and the in-memory API only models: a restart (every watch
//! breaks, the watch cache is rebuilt from etcd) and a 410 Gone (the watch's
//! resourceVersion compacted out of etcd's history). The watch is built
//! exactly as `wgmesh::agent::run` builds it (`reflector(watcher(..,
//! Config::default())).default_backoff().touched_objects()`), with the
//! ServiceAccount token a DaemonSet pod of the agent gets.
//!
//! Needs WGMESH_KUBE_BINS and kubectl; without them each test prints SKIP
//! (and fails with CI=true). Every wait is bounded: a timeout fails with what
//! did not happen.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_for, Cluster};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use wgmesh::wg::memory::MemoryBackend;
use wgmesh_testbed::control_plane::{self, local::Local};

/// The watcher's backoff tops out at 30 s (kube-runtime's DefaultBackoff), so
/// one retry after an outage may take that long: twice it, and the API
/// server's own start, bound a resync.
const RESYNC: Duration = Duration::from_secs(90);
const SYNC: Duration = Duration::from_secs(30);

/// The agent's watch on Nodes, running in a task: its reflector store, and
/// every error the stream yielded (the agent logs and counts them).
struct Watch {
    store: Store<Node>,
    errors: Arc<Mutex<Vec<watcher::Error>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(client: kube::Client) -> Self {
        let api: Api<Node> = Api::all(client);
        let (store, writer) = reflector::store::<Node>();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let task = tokio::spawn(async move {
            // As in wgmesh::agent::run.
            let stream = reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff()
                .touched_objects();
            futures_util::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if let Err(e) = item {
                    eprintln!("watch error: {e}");
                    seen.lock().unwrap().push(e);
                }
            }
        });
        Self {
            store,
            errors,
            task,
        }
    }

    async fn synced(&self) {
        tokio::time::timeout(SYNC, self.store.wait_until_ready())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the reflector did not finish its first list within {} s",
                    SYNC.as_secs()
                )
            })
            .unwrap();
    }

    fn has(&self, name: &str) -> bool {
        self.store
            .state()
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(name))
    }

    async fn wait_has(&self, name: &str, timeout: Duration, why: &str) {
        wait_for(
            &format!("Node {name} in the agent's reflector store ({why})"),
            timeout,
            || self.has(name).then_some(()),
        )
        .await;
        assert!(!self.task.is_finished(), "the watch stream ended");
    }

    /// The 410 Gone answers the watch received so far.
    fn gone(&self) -> usize {
        self.errors
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, watcher::Error::WatchError(s) if s.code == 410))
            .count()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Creates a Node as the administrator.
fn create_node(cp: &Local, name: &str) {
    control_plane::create_node(cp.admin(), name, &json!({})).unwrap();
}

/// The agent's client on `node` (a token bound to a Pod there), connecting
/// to `server` instead of the API server when given.
async fn agent_client(cp: &Local, node: &str, server: Option<SocketAddr>) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    cp.agent_kubeconfig(node, &path).unwrap();
    let mut config = wgmesh::k8s::config(Some(&path)).await.unwrap();
    if let Some(addr) = server {
        // The serving certificate names 127.0.0.1, whatever the port.
        config.cluster_url = format!("https://{addr}").parse().unwrap();
    }
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_watch_carries_on_through_an_apiserver_restart() {
    let test = "the_agents_watch_carries_on_through_an_apiserver_restart";
    let Some(mut cp) = common::local(test).await else {
        return;
    };
    create_node(&cp, "w1");
    let watch = Watch::start(agent_client(&cp, "w1", None).await);
    watch.synced().await;
    assert!(watch.has("w1"), "the first list has w1");

    tokio::task::block_in_place(|| cp.restart_apiserver()).unwrap();
    create_node(&cp, "w2");
    watch
        .wait_has("w2", RESYNC, "created after kube-apiserver restarted")
        .await;
    assert!(watch.has("w1"), "w1 is still in the store");
    let errors = watch.errors.lock().unwrap().len();
    println!(
        "through the restart the watch saw {errors} error(s), {} of them 410 Gone",
        watch.gone()
    );
}

/// A TCP relay to the API server that a test can cut: while it is cut, every
/// relayed connection is closed and new ones are closed at once, so the
/// watcher is kept away from the server (and from the changes made on it)
/// while the administrator still reaches it directly.
struct Relay {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = watch::channel(true).0;
        let state = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let mut rx = state.subscribe();
                if !*rx.borrow() {
                    continue; // dropped: closed at once
                }
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = rx.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open, task }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn reopen(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_from_a_compacted_resource_version_is_gone_and_relists() {
    let test = "a_watch_from_a_compacted_resource_version_is_gone_and_relists";
    let Some(mut cp) = common::local(test).await else {
        return;
    };
    create_node(&cp, "g1");
    let relay = Relay::start(cp.admin().addr()).await;
    let watch = Watch::start(agent_client(&cp, "g1", Some(relay.addr)).await);
    watch.synced().await;
    assert!(watch.has("g1"), "the first list has g1");
    let seen_rv: i64 = watch
        .store
        .state()
        .iter()
        .filter_map(|n| n.metadata.resource_version.as_deref()?.parse().ok())
        .max()
        .expect("g1 has a resourceVersion");

    // Out of the watcher's sight: a new Node, etcd compacted past everything
    // the watcher has seen, and a new watch cache. (The new cache alone
    // starts after g2 and refuses the old resourceVersion; with etcd
    // compacted, a watch served from etcd instead is refused too.)
    relay.cut();
    create_node(&cp, "g2");
    let compacted = cp.compact_etcd().unwrap();
    assert!(
        compacted > seen_rv,
        "etcd compacted at {compacted}, not past the watcher's {seen_rv}"
    );
    tokio::task::block_in_place(|| cp.restart_apiserver()).unwrap();
    assert!(!watch.has("g2"), "the watcher saw g2 through a cut relay");
    let gone_before = watch.gone();
    relay.reopen();

    // The resumed watch is refused with 410 Gone, and the watcher relists.
    wait_for(
        "a 410 Gone answer to the watch resumed from a compacted resourceVersion",
        RESYNC,
        || (watch.gone() > gone_before).then_some(()),
    )
    .await;
    watch
        .wait_has(
            "g2",
            RESYNC,
            "created while the watcher was away; only a relist shows it",
        )
        .await;
    assert!(watch.has("g1"), "g1 is still in the store");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_publishes_through_an_apiserver_restart_and_outage() {
    let test = "the_agent_publishes_through_an_apiserver_restart_and_outage";
    let Some(mut c) = Cluster::real(test).await else {
        return;
    };
    c.create_node("node-a");
    c.merge_patch_node_status(
        "node-a",
        &json!({"status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}),
    );
    let device = MemoryBackend::new();
    let mut a = c.agent("node-a", &device).await;
    let first = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(first.published && !first.api_failed, "{first:?}");
    let writes = c.agent_writes("node-a");

    // A restart: the client's connections die; nothing changed, so nothing
    // is written.
    let local = c.local().unwrap();
    tokio::task::block_in_place(|| local.restart_apiserver()).unwrap();
    let after = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(!after.wrote() && !after.api_failed, "{after:?}");
    assert_eq!(c.agent_writes("node-a"), writes, "writes after a restart");

    // A change after the restart is published on the next pass.
    c.merge_patch_node(
        "node-a",
        &json!({"metadata": {"annotations": {"wgmesh.dev/force-endpoint": "198.51.100.7:40000"}}}),
    );
    let changed = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(changed.published && !changed.api_failed, "{changed:?}");
    assert_eq!(
        c.annotation("node-a", "endpoint").as_deref(),
        Some("198.51.100.7:40000")
    );
    let writes = c.agent_writes("node-a");

    // An outage: the pass programs the device anyway and reports the failed
    // write; once the server is back the next pass publishes what was due.
    let mut nodes = c.pass_nodes();
    let annotations = Arc::make_mut(&mut nodes[0])
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(
        "wgmesh.dev/force-endpoint".into(),
        "198.51.100.8:40000".into(),
    );
    c.local().unwrap().stop_apiserver();
    let down = a.pass(&nodes).await.unwrap();
    assert!(down.api_failed && !down.published, "{down:?}");
    tokio::task::block_in_place(|| c.local().unwrap().start_apiserver_again()).unwrap();
    c.merge_patch_node(
        "node-a",
        &json!({"metadata": {"annotations": {"wgmesh.dev/force-endpoint": "198.51.100.8:40000"}}}),
    );
    let back = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(back.published && !back.api_failed, "{back:?}");
    assert_eq!(
        c.annotation("node-a", "endpoint").as_deref(),
        Some("198.51.100.8:40000")
    );
    assert_eq!(
        c.agent_writes("node-a"),
        writes + 1,
        "one patch after the outage"
    );
    let steady = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(!steady.wrote(), "{steady:?}");
}
