//! The agent against the testbed's Kubernetes API (a real HTTP server that
//! kube-rs talks to) with an in-memory WireGuard device: what it publishes,
//! what it programs, which Events it raises, and that a resync writes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use serde_json::json;
use wgmesh::agent::{Agent, AgentConfig};
use wgmesh::keys::PrivateKey;
use wgmesh::wg::memory::MemoryBackend;
use wgmesh_testbed::api::{ApiServer, ApiServerConfig, ApiServerHandle};

struct Cluster {
    server: ApiServerHandle,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    store: std::path::PathBuf,
}

async fn cluster() -> Cluster {
    let server = ApiServer::start(ApiServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
    let store = dir.path().join("store");
    Cluster {
        server,
        kubeconfig,
        store,
        _dir: dir,
    }
}

/// A Node with an InternalIP, its pod CIDR from the server's IPAM.
fn add_node(server: &ApiServerHandle, name: &str, ip: &str) -> Node {
    server.create_named_node(name).unwrap();
    server
        .merge_patch_node_status(
            name,
            &json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
        )
        .unwrap()
}

/// Publishes a remote node's wgmesh annotations as its own agent would.
fn annotate(server: &ApiServerHandle, name: &str, key: &str, endpoint: &str) {
    let node = server.node(name).unwrap();
    let cidrs = node.spec.unwrap().pod_cidrs.unwrap().join(",");
    server
        .merge_patch_node(
            name,
            &json!({"metadata": {"annotations": {
                "wgmesh.dev/public-key": key,
                "wgmesh.dev/endpoint": endpoint,
                "wgmesh.dev/pod-cidrs": cidrs,
                "wgmesh.dev/key-generation": "1",
            }}}),
        )
        .unwrap();
}

fn config(c: &Cluster, node: &str) -> AgentConfig {
    AgentConfig {
        node_name: node.into(),
        store: c.store.clone(),
        interface: "wgmesh0".into(),
        uapi_dir: "/nonexistent".into(),
        listen_port: 51820,
        endpoint: None,
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
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
        cni_dir: Some(c.store.with_file_name("cni")),
        cni_overwrite: false,
    }
}

async fn agent(c: &Cluster, node: &str, device: &MemoryBackend) -> Agent {
    let client = wgmesh::k8s::client(Some(&c.kubeconfig)).await.unwrap();
    Agent::with_backend(
        config(c, node),
        client,
        Arc::new(std::sync::Mutex::new(device.clone())),
    )
    .await
    .unwrap()
}

fn nodes(server: &ApiServerHandle) -> Vec<Arc<Node>> {
    server.nodes().into_iter().map(Arc::new).collect()
}

fn annotation(server: &ApiServerHandle, node: &str, key: &str) -> Option<String> {
    server
        .node(node)?
        .metadata
        .annotations?
        .get(&format!("wgmesh.dev/{key}"))
        .cloned()
}

#[tokio::test]
async fn publishes_once_and_a_resync_writes_nothing() {
    let c = cluster().await;
    add_node(&c.server, "node-a", "192.0.2.1");
    let device = MemoryBackend::new();
    let mut a = agent(&c, "node-a", &device).await;

    let first = a.pass(&nodes(&c.server)).await.unwrap();
    assert!(first.published, "{first:?}");
    assert_eq!(first.events, 1, "one KeyPublished event: {first:?}");
    let store = wgmesh::keys::store::Store::open(&c.store).unwrap();
    let key = store.state().active.public_key;
    assert_eq!(
        annotation(&c.server, "node-a", "public-key"),
        Some(key.to_base64())
    );
    assert_eq!(
        annotation(&c.server, "node-a", "endpoint").as_deref(),
        Some("192.0.2.1:51820")
    );
    assert_eq!(
        annotation(&c.server, "node-a", "pod-cidrs").as_deref(),
        Some("10.244.0.0/24")
    );
    assert_eq!(
        annotation(&c.server, "node-a", "key-generation").as_deref(),
        Some("1")
    );
    assert_eq!(device.snapshot().public_key, Some(key));
    assert_eq!(device.snapshot().listen_port, 51820);
    let published = c
        .server
        .events()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("KeyPublished"))
        .count();
    assert_eq!(published, 1);

    // Steady state: nothing to the API, nothing to the device.
    let writes = c.server.write_count();
    let applies = device.applies();
    for _ in 0..3 {
        let again = a.pass(&nodes(&c.server)).await.unwrap();
        assert!(!again.wrote(), "a resync wrote: {again:?}");
    }
    assert_eq!(c.server.write_count(), writes, "API writes in steady state");
    assert_eq!(device.applies(), applies, "device writes in steady state");

    // The CNI config for this node's pods, with the tunnel MTU.
    let conflist =
        std::fs::read_to_string(c.store.with_file_name("cni").join("10-wgmesh.conflist")).unwrap();
    assert!(
        conflist.contains("10.244.0.0/24") && conflist.contains("1420"),
        "{conflist}"
    );

    // A restarted agent adopts the same key and the device as it is: no flap.
    let mut restarted = agent(&c, "node-a", &device).await;
    let report = restarted.pass(&nodes(&c.server)).await.unwrap();
    assert!(
        !report.published && report.device_changes == 0,
        "{report:?}"
    );
}

#[tokio::test]
async fn a_bad_peer_is_rejected_with_an_event_and_the_others_are_programmed() {
    let c = cluster().await;
    add_node(&c.server, "node-a", "192.0.2.1");
    add_node(&c.server, "node-b", "192.0.2.2");
    add_node(&c.server, "node-c", "192.0.2.3");
    let kb = PrivateKey::generate().public_key();
    annotate(&c.server, "node-b", &kb.to_base64(), "192.0.2.2:51820");
    annotate(
        &c.server,
        "node-c",
        "not-a-wireguard-key",
        "192.0.2.3:51820",
    );
    let device = MemoryBackend::new();
    let mut a = agent(&c, "node-a", &device).await;

    let report = a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(report.peers, 1, "{report:?}");
    let peers = device.snapshot().peers;
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, kb);
    assert_eq!(
        peers[0].endpoint,
        Some("192.0.2.2:51820".parse::<SocketAddr>().unwrap())
    );
    // Its pod CIDR and its node address: a reply from the node itself (a
    // hostNetwork service answering a pod) is accepted through the tunnel.
    assert_eq!(
        peers[0].allowed_ips,
        vec![
            "10.244.1.0/24".parse().unwrap(),
            "192.0.2.2/32".parse().unwrap()
        ]
    );

    let rejected: Vec<_> = c
        .server
        .events()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("PeerRejected"))
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].regarding.name.as_deref(), Some("node-c"));
    assert_eq!(rejected[0].type_.as_deref(), Some("Warning"));
    let note = rejected[0].message.clone().unwrap_or_default();
    assert!(note.contains("wgmesh.dev/public-key"), "{note}");

    // The same problem is not reported twice.
    a.pass(&nodes(&c.server)).await.unwrap();
    let again = c
        .server
        .events()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("PeerRejected"))
        .count();
    assert_eq!(again, 1);

    // A fixed node joins; a deleted node's peer goes away.
    let kc = PrivateKey::generate().public_key();
    annotate(&c.server, "node-c", &kc.to_base64(), "192.0.2.3:51820");
    a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(device.snapshot().peers.len(), 2);
    c.server.delete_node("node-b").unwrap();
    let report = a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(report.device_changes, 1, "{report:?}");
    let peers = device.snapshot().peers;
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, kc);
}

#[tokio::test]
async fn the_endpoint_comes_from_force_endpoint_and_never_from_virtualbox_nat() {
    let c = cluster().await;
    add_node(&c.server, "node-a", "10.0.2.15");
    c.server
        .merge_patch_node_status(
            "node-a",
            &json!({"status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.2.15"},
                {"type": "InternalIP", "address": "192.168.56.11"}
            ]}}),
        )
        .unwrap();
    let device = MemoryBackend::new();
    let mut a = agent(&c, "node-a", &device).await;
    a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(
        annotation(&c.server, "node-a", "endpoint").as_deref(),
        Some("192.168.56.11:51820")
    );
    c.server
        .merge_patch_node(
            "node-a",
            &json!({"metadata": {"annotations": {"wgmesh.dev/force-endpoint": "198.51.100.7:40000"}}}),
        )
        .unwrap();
    a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(
        annotation(&c.server, "node-a", "endpoint").as_deref(),
        Some("198.51.100.7:40000")
    );
}

/// A whole key rotation driven by the agent against the API and an
/// in-memory device: requested by annotation, staged (the device holds the
/// next key as its second identity, the Node shows next-public-key),
/// confirmed only once the device reports a handshake under the new key,
/// activated, the old key kept for the grace period and destroyed; an agent
/// restart in the middle picks up where the log says it was; a peer that
/// joins mid-rotation and never confirms is named at the deadline.
#[tokio::test]
async fn the_agent_rotates_its_key_on_request_confirmed_by_handshakes() {
    use wgmesh::keys::audit::EventKind;
    use wgmesh::keys::rotation::Phase;
    use wgmesh::keys::store::Store;
    use wgmesh::wg::{ExtraRole, SessionInfo};

    let c = cluster().await;
    add_node(&c.server, "node-a", "192.0.2.1");
    add_node(&c.server, "node-b", "192.0.2.2");
    let kb = PrivateKey::generate().public_key();
    annotate(&c.server, "node-b", &kb.to_base64(), "192.0.2.2:51820");
    let device = MemoryBackend::new();
    let mut cfg = config(&c, "node-a");
    cfg.rotation.confirm_deadline = Duration::from_secs(3600);
    cfg.rotation.grace = Duration::from_secs(0);
    let client = wgmesh::k8s::client(Some(&c.kubeconfig)).await.unwrap();
    let backend: wgmesh::agent::SharedBackend = Arc::new(std::sync::Mutex::new(device.clone()));
    let mut a = Agent::with_backend(cfg.clone(), client.clone(), backend.clone())
        .await
        .unwrap();
    a.pass(&nodes(&c.server)).await.unwrap();
    let k1 = Store::open(&c.store).unwrap().state().active.clone();

    // Nothing is due: the key is new and nobody asked.
    let report = a.pass(&nodes(&c.server)).await.unwrap();
    assert!(!report.rotating, "{report:?}");
    assert_eq!(Store::open(&c.store).unwrap().state().phase(), Phase::Idle);

    // An operator asks; the next pass stages, the one after programs it.
    // (A request counts once it is newer than the key, in whole seconds.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let asked = k8s_openapi::jiff::Timestamp::now();
    c.server
        .merge_patch_node(
            "node-a",
            &json!({"metadata": {"annotations": {
                "wgmesh.dev/rotate-requested": format!("{asked:.0}"),
            }}}),
        )
        .unwrap();
    let mut staged = None;
    for _ in 0..3 {
        a.pass(&nodes(&c.server)).await.unwrap();
        staged = Store::open(&c.store).unwrap().state().staged.clone();
        if staged.is_some() {
            break;
        }
    }
    let k2 = staged.expect("staged on request");
    a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(
        device.snapshot().extra_identity,
        Some((k2.public_key, ExtraRole::Next)),
        "the device holds the next key as its second identity"
    );
    assert_eq!(device.snapshot().public_key, Some(k1.public_key));
    assert_eq!(
        annotation(&c.server, "node-a", "next-public-key"),
        Some(k2.public_key.to_base64())
    );

    // No evidence, no confirmation: passes change nothing.
    for _ in 0..2 {
        let r = a.pass(&nodes(&c.server)).await.unwrap();
        assert!(r.rotating);
    }
    assert_eq!(
        Store::open(&c.store).unwrap().state().phase(),
        Phase::Staged
    );

    // A restarted agent carries on from the store and the log.
    let mut a = Agent::with_backend(cfg.clone(), client.clone(), backend.clone())
        .await
        .unwrap();
    // node-b completes a handshake with the next key.
    device.add_session(SessionInfo {
        peer: kb,
        local: k2.public_key,
        remote: kb,
        established: std::time::SystemTime::now(),
    });
    for _ in 0..4 {
        a.pass(&nodes(&c.server)).await.unwrap();
    }
    let store = Store::open(&c.store).unwrap();
    let records = Store::verify_audit(&c.store).unwrap().unwrap().records;
    let confirmed: Vec<_> = records
        .iter()
        .filter(|r| r.event == EventKind::PeerConfirmed)
        .collect();
    assert_eq!(confirmed.len(), 1, "{records:#?}");
    assert_eq!(confirmed[0].peer.as_deref(), Some("node-b"));
    assert!(
        confirmed[0]
            .proof
            .as_deref()
            .is_some_and(|p| p.contains("handshake") && p.contains(&k2.fingerprint.to_string())),
        "{:?}",
        confirmed[0].proof
    );
    let activated = records
        .iter()
        .find(|r| r.event == EventKind::Activated)
        .expect("activated");
    assert_eq!(activated.unconfirmed.as_deref(), Some(&[][..]));
    // Grace 0: the old key went in the same run of passes.
    assert_eq!(store.state().active.public_key, k2.public_key);
    assert_eq!(store.state().phase(), Phase::Idle, "old key destroyed");
    assert!(records
        .iter()
        .any(|r| r.event == EventKind::Destroyed && r.old_fingerprint == Some(k1.fingerprint)));
    a.pass(&nodes(&c.server)).await.unwrap();
    assert_eq!(device.snapshot().public_key, Some(k2.public_key));
    assert_eq!(device.snapshot().extra_identity, None);
    assert_eq!(
        annotation(&c.server, "node-a", "public-key"),
        Some(k2.public_key.to_base64())
    );
    assert_eq!(annotation(&c.server, "node-a", "next-public-key"), None);
    assert_eq!(
        annotation(&c.server, "node-a", "key-generation").as_deref(),
        Some("2")
    );

    // A second rotation, with a peer that joins mid-way and never confirms:
    // at the deadline the key is activated anyway and the peer is named.
    cfg.rotation.confirm_deadline = Duration::from_secs(0);
    let mut a = Agent::with_backend(cfg, client, backend).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.server
        .merge_patch_node(
            "node-a",
            &json!({"metadata": {"annotations": {
                "wgmesh.dev/rotate-requested": format!("{:.0}", k8s_openapi::jiff::Timestamp::now()),
            }}}),
        )
        .unwrap();
    add_node(&c.server, "node-c", "192.0.2.3");
    let kc = PrivateKey::generate().public_key();
    annotate(&c.server, "node-c", &kc.to_base64(), "192.0.2.3:51820");
    for _ in 0..6 {
        a.pass(&nodes(&c.server)).await.unwrap();
    }
    let records = Store::verify_audit(&c.store).unwrap().unwrap().records;
    let last = records
        .iter()
        .rev()
        .find(|r| r.event == EventKind::Activated)
        .unwrap();
    assert_eq!(last.generation, 3);
    let unconfirmed = last.unconfirmed.clone().unwrap_or_default();
    assert!(
        unconfirmed.contains(&"node-b".to_string()) && unconfirmed.contains(&"node-c".to_string()),
        "{unconfirmed:?}"
    );
    assert!(last.reason.contains("deadline"), "{}", last.reason);
}
