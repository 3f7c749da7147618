//! The agent against a Kubernetes API with an in-memory WireGuard device:
//! what it publishes, what it programs, which Events it raises, and that a
//! resync writes nothing. Every test runs twice with the same body:
//! `embedded::NAME` against the testbed's in-memory API (a real HTTP server
//! that kube-rs talks to) and `real::NAME` against a real kube-apiserver with
//! etcd and kube-controller-manager's node IPAM, manifests/ applied, the agent
//! on the ServiceAccount token its DaemonSet pod would get (see
//! tests/common). The real ones need WGMESH_KUBE_BINS and kubectl; without
//! them they print SKIP (and fail with CI=true).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::Cluster;
use serde_json::json;
use wgmesh::agent::Agent;
use wgmesh::keys::PrivateKey;
use wgmesh::wg::memory::MemoryBackend;

/// Each test body as `embedded::NAME` and `real::NAME` (a control plane of
/// its own per real test: ~5 s to start, and no test sees another's Nodes).
macro_rules! on_both_servers {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    super::$test(crate::common::Cluster::embedded().await).await
                }
            )*
        }
        mod real {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $test() {
                    let test = concat!("real::", stringify!($test));
                    if let Some(c) = crate::common::Cluster::real(test).await {
                        super::$test(c).await
                    }
                }
            )*
        }
    };
}

on_both_servers!(
    publishes_once_and_a_resync_writes_nothing,
    a_bad_peer_is_rejected_with_an_event_and_the_others_are_programmed,
    the_endpoint_comes_from_force_endpoint_and_never_from_virtualbox_nat,
    the_agent_rotates_its_key_on_request_confirmed_by_handshakes,
    an_extra_prefix_follows_its_healthy_gateway_and_hostile_grants_change_nothing,
);

/// A Node with an InternalIP and its pod CIDR from the server's IPAM.
fn add_node(c: &Cluster, name: &str, ip: &str) {
    c.create_node(name);
    c.merge_patch_node_status(
        name,
        &json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
    );
}

/// Publishes a remote node's wgmesh annotations as its own agent would.
fn annotate(c: &Cluster, name: &str, key: &str, endpoint: &str) {
    let cidrs = c.pod_cidrs(name).join(",");
    c.merge_patch_node(
        name,
        &json!({"metadata": {"annotations": {
            "wgmesh.dev/public-key": key,
            "wgmesh.dev/endpoint": endpoint,
            "wgmesh.dev/pod-cidrs": cidrs,
            "wgmesh.dev/key-generation": "1",
        }}}),
    );
}

/// The one pod CIDR IPAM gave `node`.
fn pod_cidr(c: &Cluster, node: &str) -> String {
    let cidrs = c.pod_cidrs(node);
    assert_eq!(cidrs.len(), 1, "{node}'s spec.podCIDRs: {cidrs:?}");
    cidrs[0].clone()
}

async fn publishes_once_and_a_resync_writes_nothing(c: Cluster) {
    add_node(&c, "node-a", "192.0.2.1");
    let device = MemoryBackend::new();
    let mut a = c.agent("node-a", &device).await;

    let first = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(first.published, "{first:?}");
    assert_eq!(first.events, 1, "one KeyPublished event: {first:?}");
    let store = wgmesh::keys::store::Store::open(&c.store).unwrap();
    let key = store.state().active.public_key;
    assert_eq!(c.annotation("node-a", "public-key"), Some(key.to_base64()));
    assert_eq!(
        c.annotation("node-a", "endpoint").as_deref(),
        Some("192.0.2.1:51820")
    );
    let cidr = pod_cidr(&c, "node-a");
    assert_eq!(c.annotation("node-a", "pod-cidrs"), Some(cidr.clone()));
    assert_eq!(
        c.annotation("node-a", "key-generation").as_deref(),
        Some("1")
    );
    assert_eq!(device.snapshot().public_key, Some(key));
    assert_eq!(device.snapshot().listen_port, 51820);
    let published = c.events_with_reason("KeyPublished");
    assert_eq!(published.len(), 1, "{published:?}");

    // Steady state: nothing to the API, nothing to the device.
    let writes = c.agent_writes("node-a");
    assert!(
        writes >= 2,
        "the annotation patch and the Event are counted as writes: {writes}"
    );
    let applies = device.applies();
    for _ in 0..3 {
        let again = a.pass(&c.pass_nodes()).await.unwrap();
        assert!(!again.wrote(), "a resync wrote: {again:?}");
    }
    assert_eq!(
        c.agent_writes("node-a"),
        writes,
        "API writes in steady state"
    );
    assert_eq!(device.applies(), applies, "device writes in steady state");

    // The CNI config for this node's pods, with the tunnel MTU.
    let conflist =
        std::fs::read_to_string(c.store.with_file_name("cni").join("10-wgmesh.conflist")).unwrap();
    assert!(
        conflist.contains(cidr.as_str()) && conflist.contains("1420"),
        "{cidr}: {conflist}"
    );

    // A restarted agent adopts the same key and the device as it is: no flap.
    let mut restarted = c.agent("node-a", &device).await;
    let report = restarted.pass(&c.pass_nodes()).await.unwrap();
    assert!(
        !report.published && report.device_changes == 0,
        "{report:?}"
    );
}

async fn a_bad_peer_is_rejected_with_an_event_and_the_others_are_programmed(c: Cluster) {
    add_node(&c, "node-a", "192.0.2.1");
    add_node(&c, "node-b", "192.0.2.2");
    add_node(&c, "node-c", "192.0.2.3");
    let kb = PrivateKey::generate().public_key();
    annotate(&c, "node-b", &kb.to_base64(), "192.0.2.2:51820");
    annotate(&c, "node-c", "not-a-wireguard-key", "192.0.2.3:51820");
    let device = MemoryBackend::new();
    let mut a = c.agent("node-a", &device).await;

    let report = a.pass(&c.pass_nodes()).await.unwrap();
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
            pod_cidr(&c, "node-b").parse().unwrap(),
            "192.0.2.2/32".parse().unwrap()
        ]
    );

    let rejected = c.events_with_reason("PeerRejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].regarding.as_deref(), Some("node-c"));
    assert_eq!(rejected[0].type_.as_deref(), Some("Warning"));
    let note = rejected[0].note.clone().unwrap_or_default();
    assert!(note.contains("wgmesh.dev/public-key"), "{note}");

    // The same problem is not reported twice.
    a.pass(&c.pass_nodes()).await.unwrap();
    let again = c.events_with_reason("PeerRejected");
    assert_eq!(again.len(), 1, "{again:?}");

    // A fixed node joins; a deleted node's peer goes away.
    let kc = PrivateKey::generate().public_key();
    annotate(&c, "node-c", &kc.to_base64(), "192.0.2.3:51820");
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(device.snapshot().peers.len(), 2);
    c.delete_node("node-b");
    let report = a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(report.device_changes, 1, "{report:?}");
    let peers = device.snapshot().peers;
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].public_key, kc);
}

async fn the_endpoint_comes_from_force_endpoint_and_never_from_virtualbox_nat(c: Cluster) {
    add_node(&c, "node-a", "10.0.2.15");
    c.merge_patch_node_status(
        "node-a",
        &json!({"status": {"addresses": [
            {"type": "InternalIP", "address": "10.0.2.15"},
            {"type": "InternalIP", "address": "192.168.56.11"}
        ]}}),
    );
    let device = MemoryBackend::new();
    let mut a = c.agent("node-a", &device).await;
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(
        c.annotation("node-a", "endpoint").as_deref(),
        Some("192.168.56.11:51820")
    );
    c.merge_patch_node(
        "node-a",
        &json!({"metadata": {"annotations": {"wgmesh.dev/force-endpoint": "198.51.100.7:40000"}}}),
    );
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(
        c.annotation("node-a", "endpoint").as_deref(),
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
async fn the_agent_rotates_its_key_on_request_confirmed_by_handshakes(c: Cluster) {
    use wgmesh::keys::audit::EventKind;
    use wgmesh::keys::rotation::Phase;
    use wgmesh::keys::store::Store;
    use wgmesh::wg::{ExtraRole, SessionInfo};

    add_node(&c, "node-a", "192.0.2.1");
    add_node(&c, "node-b", "192.0.2.2");
    let kb = PrivateKey::generate().public_key();
    annotate(&c, "node-b", &kb.to_base64(), "192.0.2.2:51820");
    let device = MemoryBackend::new();
    let mut cfg = c.config("node-a");
    cfg.rotation.confirm_deadline = Duration::from_secs(3600);
    cfg.rotation.grace = Duration::from_secs(0);
    let client = c.agent_client("node-a").await;
    let backend: wgmesh::agent::SharedBackend = Arc::new(std::sync::Mutex::new(device.clone()));
    let mut a = Agent::with_backend(cfg.clone(), client.clone(), backend.clone())
        .await
        .unwrap();
    a.pass(&c.pass_nodes()).await.unwrap();
    let k1 = Store::open(&c.store).unwrap().state().active.clone();

    // Nothing is due: the key is new and nobody asked.
    let report = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(!report.rotating, "{report:?}");
    assert_eq!(Store::open(&c.store).unwrap().state().phase(), Phase::Idle);

    // An operator asks; the next pass stages, the one after programs it.
    // (A request counts once it is newer than the key, in whole seconds.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let asked = k8s_openapi::jiff::Timestamp::now();
    c.merge_patch_node(
        "node-a",
        &json!({"metadata": {"annotations": {
            "wgmesh.dev/rotate-requested": format!("{asked:.0}"),
        }}}),
    );
    let mut staged = None;
    for _ in 0..3 {
        a.pass(&c.pass_nodes()).await.unwrap();
        staged = Store::open(&c.store).unwrap().state().staged.clone();
        if staged.is_some() {
            break;
        }
    }
    let k2 = staged.expect("staged on request");
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(
        device.snapshot().extra_identity,
        Some((k2.public_key, ExtraRole::Next)),
        "the device holds the next key as its second identity"
    );
    assert_eq!(device.snapshot().public_key, Some(k1.public_key));
    assert_eq!(
        c.annotation("node-a", "next-public-key"),
        Some(k2.public_key.to_base64())
    );

    // No evidence, no confirmation: passes change nothing.
    for _ in 0..2 {
        let r = a.pass(&c.pass_nodes()).await.unwrap();
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
        a.pass(&c.pass_nodes()).await.unwrap();
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
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(device.snapshot().public_key, Some(k2.public_key));
    assert_eq!(device.snapshot().extra_identity, None);
    assert_eq!(
        c.annotation("node-a", "public-key"),
        Some(k2.public_key.to_base64())
    );
    assert_eq!(c.annotation("node-a", "next-public-key"), None);
    assert_eq!(
        c.annotation("node-a", "key-generation").as_deref(),
        Some("2")
    );

    // A second rotation, with a peer that joins mid-way and never confirms:
    // at the deadline the key is activated anyway and the peer is named.
    cfg.rotation.confirm_deadline = Duration::from_secs(0);
    let mut a = Agent::with_backend(cfg, client, backend).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.merge_patch_node(
        "node-a",
        &json!({"metadata": {"annotations": {
            "wgmesh.dev/rotate-requested": format!("{:.0}", k8s_openapi::jiff::Timestamp::now()),
        }}}),
    );
    add_node(&c, "node-c", "192.0.2.3");
    let kc = PrivateKey::generate().public_key();
    annotate(&c, "node-c", &kc.to_base64(), "192.0.2.3:51820");
    for _ in 0..6 {
        a.pass(&c.pass_nodes()).await.unwrap();
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

/// Route sync: a MeshRoute's prefix on the best healthy gateway's peer, moved
/// when that gateway's Node goes NotReady and back when it returns (failback
/// 0 s here; the damping and the session liveness are unit-tested in
/// src/routes), and a grant of the cluster CIDR refused with the device
/// unchanged.
async fn an_extra_prefix_follows_its_healthy_gateway_and_hostile_grants_change_nothing(c: Cluster) {
    use wgmesh::wg::PeerStats;
    for (name, ip) in [
        ("node-a", "192.0.2.1"),
        ("node-b", "192.0.2.2"),
        ("node-c", "192.0.2.3"),
    ] {
        add_node(&c, name, ip);
        c.merge_patch_node_status(
            name,
            &json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}),
        );
    }
    let (kb, kc) = (
        PrivateKey::generate().public_key(),
        PrivateKey::generate().public_key(),
    );
    annotate(&c, "node-b", &kb.to_base64(), "192.0.2.2:51820");
    annotate(&c, "node-c", &kc.to_base64(), "192.0.2.3:51820");
    let device = MemoryBackend::new();
    let stats = |rx: u64| {
        vec![
            PeerStats {
                public_key: kb,
                endpoint: None,
                last_handshake: Some(std::time::SystemTime::now()),
                rx_bytes: rx,
                tx_bytes: 0,
            },
            PeerStats {
                public_key: kc,
                endpoint: None,
                last_handshake: Some(std::time::SystemTime::now()),
                rx_bytes: rx,
                tx_bytes: 0,
            },
        ]
    };
    device.set_peer_stats(stats(100));
    let mut a = c.agent("node-a", &device).await;
    let site = json!({"metadata": {"name": "site"}, "spec": {"prefix": "198.18.0.0/24", "failbackSeconds": 0,
        "gateways": [{"node": "node-b", "priority": 10}, {"node": "node-c", "priority": 20}]}});
    a.set_route_objects(std::slice::from_ref(&site));
    let holder = |device: &MemoryBackend| {
        let peers = device.snapshot().peers;
        let with: Vec<_> = peers
            .iter()
            .filter(|p| p.allowed_ips.contains(&"198.18.0.0/24".parse().unwrap()))
            .map(|p| p.public_key)
            .collect();
        assert!(with.len() <= 1, "a prefix on two peers: {peers:?}");
        with.first().copied()
    };
    let report = a.pass(&c.pass_nodes()).await.unwrap();
    assert!(report.probing_routes, "{report:?}");
    assert_eq!(holder(&device), Some(kb), "the best gateway holds it");
    // node-a is a client: only gateways send the short keepalive.
    for p in device.snapshot().peers {
        assert_eq!(p.persistent_keepalive, None);
    }

    // node-b goes NotReady: node-c at once.
    c.merge_patch_node_status(
        "node-b",
        &json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "NodeStatusUnknown"}]}}),
    );
    device.set_peer_stats(stats(200));
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(
        holder(&device),
        Some(kc),
        "failover to the next healthy gateway"
    );

    // Back: failback (no damping here).
    c.merge_patch_node_status(
        "node-b",
        &json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}),
    );
    device.set_peer_stats(stats(300));
    a.pass(&c.pass_nodes()).await.unwrap();
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(holder(&device), Some(kb), "failback");

    // A hostile grant inside the cluster CIDR: refused, nothing changes.
    let before = device.snapshot().peers;
    let hostile = json!({"metadata": {"name": "steal"}, "spec": {"prefix": "10.244.0.0/16",
        "gateways": [{"node": "node-c"}]}});
    a.set_route_objects(&[site, hostile]);
    device.set_peer_stats(stats(400));
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(
        device.snapshot().peers,
        before,
        "a hostile grant changed the device"
    );
    let metrics = a.telemetry().render();
    assert!(
        metrics.contains("wgmesh_routes_refused{reason=\"pod-cidr-of-other-node\"} 1"),
        "{metrics}"
    );

    // The grant edited into something invalid: the prefix is held (on no
    // peer, still routed into the tunnel), not dropped to the default route.
    let broken = json!({"metadata": {"name": "site"}, "spec": {"prefix": "198.18.0.0/24",
        "gateways": [{"node": "Not_A_Node"}]}});
    a.set_route_objects(std::slice::from_ref(&broken));
    device.set_peer_stats(stats(500));
    a.pass(&c.pass_nodes()).await.unwrap();
    assert_eq!(holder(&device), None, "an invalid grant carries nothing");
    assert!(
        a.telemetry()
            .render()
            .contains("wgmesh_extra_prefixes_held 1"),
        "{}",
        a.telemetry().render()
    );
    // Deleted: let go.
    a.set_route_objects(&[]);
    a.pass(&c.pass_nodes()).await.unwrap();
    assert!(a
        .telemetry()
        .render()
        .contains("wgmesh_extra_prefixes_held 0"));
}
