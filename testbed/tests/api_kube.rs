//! The test Kubernetes API against the real kube-rs client: watcher, patches, status,
//! Events through `kube_runtime::events::Recorder`, IPAM, errors, write counting.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, NodeSpec};
use k8s_openapi::api::events::v1::Event as EventsV1;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Config, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use wgmesh_testbed::api::{ApiServer, ApiServerConfig, ApiServerHandle, EventApi, IpamConfig};

const WAIT: Duration = Duration::from_secs(10);

struct Bed {
    server: ApiServerHandle,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn start(config: ApiServerConfig) -> Bed {
    let server = ApiServer::start(config).await.expect("server starts");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    // The way an agent gets its client from --kubeconfig.
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube config from kubeconfig");
    let client = Client::try_from(config).expect("client");
    Bed {
        server,
        client,
        _dir: dir,
    }
}

async fn default_bed() -> Bed {
    start(ApiServerConfig::default()).await
}

fn node(name: &str) -> Node {
    let mut n = Node::default();
    n.metadata.name = Some(name.into());
    n
}

fn api_code(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Forwards a watcher's items into a channel so the test can take them one by one.
fn spawn_watcher(
    api: Api<Node>,
    config: watcher::Config,
) -> mpsc::UnboundedReceiver<Result<watcher::Event<Node>, watcher::Error>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = watcher(api, config).boxed();
        while let Some(item) = stream.next().await {
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for a watch event")
        .expect("watcher ended")
}

/// Takes watcher items until `InitDone`, returning the names listed.
async fn until_init_done(
    rx: &mut mpsc::UnboundedReceiver<Result<watcher::Event<Node>, watcher::Error>>,
) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        match next(rx).await {
            Ok(watcher::Event::Init) => names.clear(),
            Ok(watcher::Event::InitApply(n)) => names.push(n.name_any()),
            Ok(watcher::Event::InitDone) => return names,
            other => panic!("unexpected item during the initial list: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_sees_create_patch_delete_in_order() {
    let bed = default_bed().await;
    bed.server.create_node(node("existing")).unwrap();
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let mut rx = spawn_watcher(nodes.clone(), watcher::Config::default());
    assert_eq!(until_init_done(&mut rx).await, vec!["existing".to_string()]);

    let created = nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let created_rv: u64 = created.resource_version().unwrap().parse().unwrap();
    assert!(created.uid().is_some());
    assert!(created.creation_timestamp().is_some());
    let patch = json!({"metadata": {"annotations": {"wgmesh.dev/public-key": "k1"}}});
    nodes
        .patch("n1", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();

    match next(&mut rx).await.unwrap() {
        watcher::Event::Apply(n) => {
            assert_eq!(n.name_any(), "n1");
            assert_eq!(n.resource_version().unwrap(), created_rv.to_string());
        }
        other => panic!("expected Apply(n1), got {other:?}"),
    }
    match next(&mut rx).await.unwrap() {
        watcher::Event::Apply(n) => {
            assert_eq!(n.annotations().get("wgmesh.dev/public-key").unwrap(), "k1");
            let rv: u64 = n.resource_version().unwrap().parse().unwrap();
            assert!(rv > created_rv);
        }
        other => panic!("expected Apply(n1 patched), got {other:?}"),
    }
    match next(&mut rx).await.unwrap() {
        watcher::Event::Delete(n) => assert_eq!(n.name_any(), "n1"),
        other => panic!("expected Delete(n1), got {other:?}"),
    }
    bed.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_list_watcher_gets_initial_events() {
    let bed = default_bed().await;
    bed.server.create_node(node("a")).unwrap();
    bed.server.create_node(node("b")).unwrap();
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let mut rx = spawn_watcher(nodes, watcher::Config::default().streaming_lists());
    let mut listed = until_init_done(&mut rx).await;
    listed.sort();
    assert_eq!(listed, vec!["a".to_string(), "b".to_string()]);
    bed.server.create_node(node("c")).unwrap();
    match next(&mut rx).await.unwrap() {
        watcher::Event::Apply(n) => assert_eq!(n.name_any(), "c"),
        other => panic!("expected Apply(c), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_expired_version_gets_410_event() {
    let bed = start(ApiServerConfig {
        history_limit: 2,
        ..ApiServerConfig::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let rv = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    for name in ["a", "b", "c"] {
        nodes
            .create(&PostParams::default(), &node(name))
            .await
            .unwrap();
    }
    // The HTTP answer is 200 and the 410 arrives as an ERROR event, as from a real
    // apiserver (kube's watcher only relists on that form).
    let mut stream = nodes
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.unwrap().is_none(),
        "stream ends after the error"
    );

    // Still inside the history: the watch replays what happened since.
    let list = nodes.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    nodes
        .create(&PostParams::default(), &node("d"))
        .await
        .unwrap();
    let mut stream = nodes
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(n)) => assert_eq!(n.name_any(), "d"),
        other => panic!("expected ADDED d, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_recovers_from_410_by_relisting() {
    let bed = default_bed().await;
    bed.server.create_node(node("a")).unwrap();
    let nodes: Api<Node> = Api::all(bed.client.clone());
    // No bookmarks, so the watcher resumes from the last object it saw.
    let mut rx = spawn_watcher(nodes, watcher::Config::default().disable_bookmarks());
    assert_eq!(until_init_done(&mut rx).await, vec!["a".to_string()]);

    // Compaction plus restart: the open watch ends, the watcher resumes from its last
    // resourceVersion, which is now too old. (It may or may not see b before that.)
    bed.server.create_node(node("b")).unwrap();
    bed.server.compact();
    let mut saw_410 = false;
    loop {
        match next(&mut rx).await {
            Err(watcher::Error::WatchError(status)) => {
                assert_eq!(status.code, 410);
                saw_410 = true;
            }
            Ok(watcher::Event::Apply(n)) if n.name_any() == "b" && !saw_410 => {}
            Ok(watcher::Event::Init) => break,
            other => panic!("expected a 410 then a relist, got {other:?}"),
        }
    }
    assert!(saw_410);
    let mut listed = Vec::new();
    loop {
        match next(&mut rx).await.unwrap() {
            watcher::Event::InitApply(n) => listed.push(n.name_any()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(listed, vec!["a".to_string(), "b".to_string()]);
    bed.server.create_node(node("c")).unwrap();
    match next(&mut rx).await.unwrap() {
        watcher::Event::Apply(n) => assert_eq!(n.name_any(), "c"),
        other => panic!("expected Apply(c) after the relist, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bookmarks_and_watch_timeout() {
    let bed = start(ApiServerConfig {
        bookmark_interval: Duration::from_millis(100),
        ..ApiServerConfig::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let rv = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let started = std::time::Instant::now();
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let mut bookmarks = 0;
    while let Some(ev) = tokio::time::timeout(WAIT, stream.try_next())
        .await
        .expect("the watch ends on its own")
        .unwrap()
    {
        match ev {
            WatchEvent::Bookmark(b) => {
                assert_eq!(b.metadata.resource_version, rv);
                bookmarks += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(bookmarks >= 2, "got {bookmarks} bookmarks");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900), "ended after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn label_selected_watch_sees_nodes_enter_and_leave() {
    let bed = default_bed().await;
    bed.server.create_node(node("a")).unwrap();
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let mut rx = spawn_watcher(nodes.clone(), watcher::Config::default().labels("mesh=on"));
    assert!(until_init_done(&mut rx).await.is_empty());
    let on = json!({"metadata": {"labels": {"mesh": "on"}}});
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&on))
        .await
        .unwrap();
    match next(&mut rx).await.unwrap() {
        watcher::Event::Apply(n) => assert_eq!(n.name_any(), "a"),
        other => panic!("expected a to enter, got {other:?}"),
    }
    let off = json!({"metadata": {"labels": {"mesh": null}}});
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&off))
        .await
        .unwrap();
    match next(&mut rx).await.unwrap() {
        watcher::Event::Delete(n) => assert_eq!(n.name_any(), "a"),
        other => panic!("expected a to leave, got {other:?}"),
    }
    let listed = nodes
        .list(&ListParams::default().fields("metadata.name=a"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let err = nodes
        .list(&ListParams::default().fields("spec.nothing=1"))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn paginated_list_is_consistent() {
    let bed = default_bed().await;
    for i in 0..5 {
        bed.server.create_node(node(&format!("n{i}"))).unwrap();
    }
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let first = nodes.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().unwrap();
    let second = nodes
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<String> = second.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, vec!["n2", "n3", "n4"]);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    // A change in between makes the token stale: 410, and the client relists.
    bed.server.create_node(node("late")).unwrap();
    let err = nodes
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 410);
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_patch_annotations_and_null_deletes() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    let pp = PatchParams::default();
    let set = json!({"metadata": {"annotations": {"wgmesh.dev/endpoint": "10.0.0.1:51820", "wgmesh.dev/key-generation": "1"}}});
    let n = nodes.patch("a", &pp, &Patch::Merge(&set)).await.unwrap();
    assert_eq!(n.annotations().len(), 2);
    let rv_after_set = n.resource_version().unwrap();

    // Setting what is already there is not a change: same resourceVersion.
    let again = nodes.patch("a", &pp, &Patch::Merge(&set)).await.unwrap();
    assert_eq!(again.resource_version().unwrap(), rv_after_set);

    let delete = json!({"metadata": {"annotations": {"wgmesh.dev/key-generation": null}}});
    let n = nodes.patch("a", &pp, &Patch::Merge(&delete)).await.unwrap();
    assert_eq!(
        n.annotations().keys().collect::<Vec<_>>(),
        vec!["wgmesh.dev/endpoint"]
    );
    assert_ne!(n.resource_version().unwrap(), rv_after_set);

    // Strategic merge patches on metadata behave the same.
    let smp = json!({"metadata": {"annotations": {"x": "y"}}});
    let n = nodes
        .patch("a", &pp, &Patch::Strategic(&smp))
        .await
        .unwrap();
    assert_eq!(n.annotations().get("x").unwrap(), "y");

    // Optimistic concurrency: a stale resourceVersion in the patch is a 409.
    let stale = json!({"metadata": {"resourceVersion": rv_after_set, "annotations": {"z": "1"}}});
    let err = nodes
        .patch("a", &pp, &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 409);

    // Invalid annotation keys are refused like a real apiserver does.
    let bad = json!({"metadata": {"annotations": {"not a key": "1"}}});
    let err = nodes
        .patch("a", &pp, &Patch::Merge(&bad))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 422);

    let err = nodes
        .patch("missing", &pp, &Patch::Merge(&set))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_patch_applies_and_failures_are_422() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "add", "path": "/metadata/annotations", "value": {}},
        {"op": "add", "path": "/metadata/annotations/wgmesh.dev~1public-key", "value": "k"},
        {"op": "test", "path": "/metadata/name", "value": "a"},
    ]))
    .unwrap();
    let n = nodes
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap();
    assert_eq!(n.annotations().get("wgmesh.dev/public-key").unwrap(), "k");

    let failing: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/name", "value": "b"},
    ]))
    .unwrap();
    let err = nodes
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(failing))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert_eq!(s.reason, "Invalid");
            assert!(!s.message.is_empty());
        }
        other => panic!("expected 422, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_subresource_is_separate_from_spec() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    let ready = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ok"}],
        "addresses": [{"type": "InternalIP", "address": "192.168.50.2"}]
    }, "spec": {"unschedulable": true}});
    let n = nodes
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    let status = n.status.clone().unwrap();
    assert_eq!(status.conditions.unwrap()[0].status, "True");
    // Spec changes through /status are dropped.
    assert_eq!(n.spec.as_ref().and_then(|s| s.unschedulable), None);
    let fetched = nodes.get_status("a").await.unwrap();
    assert_eq!(
        fetched.status.unwrap().addresses.unwrap()[0].address,
        "192.168.50.2"
    );

    // Status changes through the main resource are dropped.
    let sneaky = json!({"status": {"addresses": []}, "spec": {"unschedulable": true}});
    let n = nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert_eq!(n.status.unwrap().addresses.unwrap().len(), 1);
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));

    // PUT on /status.
    let mut current = nodes.get("a").await.unwrap();
    current
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    let replaced = nodes
        .replace_status("a", &PostParams::default(), &current)
        .await
        .unwrap();
    assert_eq!(
        replaced.status.unwrap().conditions.unwrap()[0].status,
        "False"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn recorder_events_are_stored_and_listed() {
    let bed = default_bed().await;
    let node = bed.server.create_node(node("node-a")).unwrap();
    let reference = node.object_ref(&());
    let recorder = Recorder::new(
        bed.client.clone(),
        Reporter {
            controller: "wgmesh".into(),
            instance: Some("node-b".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidPublicKey".into(),
        note: Some("wgmesh.dev/public-key does not decode to 32 bytes".into()),
        action: "ValidateNode".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    // A repeat within the recorder's cache window becomes a merge patch with a series.
    recorder.publish(&event, &reference).await.unwrap();

    let events = bed.server.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.api, EventApi::EventsV1);
    assert_eq!(e.namespace, "default");
    assert_eq!(e.reason.as_deref(), Some("InvalidPublicKey"));
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.regarding.name.as_deref(), Some("node-a"));
    assert_eq!(e.regarding.kind.as_deref(), Some("Node"));
    assert_eq!(e.reporting_controller.as_deref(), Some("wgmesh"));
    assert_eq!(e.count, 2);

    // Visible through both groups, like on a cluster.
    let core: Api<CoreEvent> = Api::all(bed.client.clone());
    let listed = core
        .list(&ListParams::default().fields("involvedObject.kind=Node,involvedObject.name=node-a"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].message.as_deref(),
        Some("wgmesh.dev/public-key does not decode to 32 bytes")
    );
    let v1: Api<EventsV1> = Api::namespaced(bed.client.clone(), "default");
    let listed = v1.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        listed.items[0].reporting_controller.as_deref(),
        Some("wgmesh")
    );

    // A core/v1 Event posted directly is stored too.
    let core_ns: Api<CoreEvent> = Api::namespaced(bed.client.clone(), "kube-system");
    let mut direct = CoreEvent {
        involved_object: reference.clone(),
        reason: Some("Test".into()),
        message: Some("hello".into()),
        type_: Some("Normal".into()),
        ..CoreEvent::default()
    };
    direct.metadata.generate_name = Some("node-a.".into());
    core_ns
        .create(&PostParams::default(), &direct)
        .await
        .unwrap();
    assert_eq!(bed.server.events().len(), 2);

    // events.k8s.io validation: an Event without the required fields is refused.
    let incomplete = EventsV1 {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("x".into()),
            ..Default::default()
        },
        ..EventsV1::default()
    };
    let err = v1
        .create(&PostParams::default(), &incomplete)
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 422);
}

#[tokio::test(flavor = "multi_thread")]
async fn ipam_fills_pod_cidrs() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let mut cidrs = Vec::new();
    for name in ["a", "b", "c"] {
        let n = nodes
            .create(&PostParams::default(), &node(name))
            .await
            .unwrap();
        let spec = n.spec.unwrap();
        assert_eq!(
            spec.pod_cidr.as_ref(),
            spec.pod_cidrs.as_ref().unwrap().first()
        );
        cidrs.push(spec.pod_cidr.unwrap());
    }
    assert_eq!(
        cidrs,
        vec!["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"]
    );
    // Deleting a node frees its range for the next one.
    nodes.delete("b", &DeleteParams::default()).await.unwrap();
    let d = nodes
        .create(&PostParams::default(), &node("d"))
        .await
        .unwrap();
    assert_eq!(d.spec.unwrap().pod_cidr.as_deref(), Some("10.244.1.0/24"));
    // A node that brings its own CIDRs keeps them, and they are not handed out again.
    let mut own = node("own");
    own.spec = Some(NodeSpec {
        pod_cidrs: Some(vec!["10.244.3.0/24".into()]),
        ..NodeSpec::default()
    });
    let own = nodes.create(&PostParams::default(), &own).await.unwrap();
    assert_eq!(own.spec.unwrap().pod_cidr.as_deref(), Some("10.244.3.0/24"));
    let e = nodes
        .create(&PostParams::default(), &node("e"))
        .await
        .unwrap();
    assert_eq!(e.spec.unwrap().pod_cidr.as_deref(), Some("10.244.4.0/24"));
    // Once set, pod CIDRs are immutable.
    let change = json!({"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}});
    let err = nodes
        .patch("e", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 422);
}

#[tokio::test(flavor = "multi_thread")]
async fn ipam_dual_stack_and_exhaustion() {
    let bed = start(ApiServerConfig {
        ipam: IpamConfig {
            cluster_cidrs: vec![
                "10.20.0.0/23".parse().unwrap(),
                "fd00:20::/63".parse().unwrap(),
            ],
            ..IpamConfig::default()
        },
        ..ApiServerConfig::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let a = nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    assert_eq!(
        a.spec.unwrap().pod_cidrs.unwrap(),
        vec!["10.20.0.0/24".to_string(), "fd00:20::/64".to_string()]
    );
    let b = nodes
        .create(&PostParams::default(), &node("b"))
        .await
        .unwrap();
    assert_eq!(
        b.spec.unwrap().pod_cidrs.unwrap(),
        vec!["10.20.1.0/24".to_string(), "fd00:20:0:1::/64".to_string()]
    );
    // Exhausted: the Node is created without CIDRs and a CIDRNotAvailable Event says why.
    let c = nodes
        .create(&PostParams::default(), &node("c"))
        .await
        .unwrap();
    assert!(c.spec.and_then(|s| s.pod_cidrs).is_none());
    let events = bed.server.events();
    assert!(events
        .iter()
        .any(|e| e.reason.as_deref() == Some("CIDRNotAvailable")
            && e.regarding.name.as_deref() == Some("c")));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_kubernetes_status_objects() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    match nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap_err()
    {
        kube::Error::Api(s) => {
            assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists"));
            assert_eq!(s.message, "nodes \"a\" already exists");
        }
        other => panic!("{other:?}"),
    }
    match nodes.get("nope").await.unwrap_err() {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("{other:?}"),
    }
    assert!(nodes.get_opt("nope").await.unwrap().is_none());
    let err = nodes
        .create(&PostParams::default(), &node("Not_A_Name"))
        .await
        .unwrap_err();
    assert_eq!(api_code(err), 422);
    let version = bed.client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn finalizers_delay_deletion() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    let mut n = node("a");
    n.metadata.finalizers = Some(vec!["wgmesh.dev/cleanup".into()]);
    nodes.create(&PostParams::default(), &n).await.unwrap();
    let pending = nodes.delete("a", &DeleteParams::default()).await.unwrap();
    assert!(pending.is_left(), "a Node held by a finalizer is returned");
    assert!(nodes
        .get("a")
        .await
        .unwrap()
        .metadata
        .deletion_timestamp
        .is_some());
    let release = json!({"metadata": {"finalizers": null}});
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    assert!(nodes.get_opt("a").await.unwrap().is_none());
    nodes
        .create(&PostParams::default(), &node("b"))
        .await
        .unwrap();
    let gone = nodes.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(
        gone.is_right(),
        "an immediate delete answers a Success Status"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn write_count_counts_requests_not_handle_calls() {
    let bed = default_bed().await;
    let nodes: Api<Node> = Api::all(bed.client.clone());
    bed.server.create_node(node("a")).unwrap();
    assert_eq!(bed.server.write_count(), 0);
    nodes.list(&ListParams::default()).await.unwrap();
    nodes.get("a").await.unwrap();
    assert_eq!(bed.server.write_count(), 0, "reads are not writes");
    let p = json!({"metadata": {"annotations": {"k": "v"}}});
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    let rv = bed.server.resource_version();
    // A no-op patch is still a write request, though it changes nothing.
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .unwrap();
    assert_eq!(bed.server.resource_version(), rv);
    let _ = nodes.delete("missing", &DeleteParams::default()).await;
    assert_eq!(bed.server.write_count(), 3);
    let writes = bed.server.writes();
    assert_eq!(writes[0].method, "PATCH");
    assert_eq!(writes[2].status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_address_is_configurable() {
    let server = ApiServer::start(ApiServerConfig {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..ApiServerConfig::default()
    })
    .await
    .unwrap();
    assert!(server.local_addr().ip().is_unspecified());
    assert!(server.url().starts_with("http://127.0.0.1:"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kc");
    let url = format!("http://127.0.0.1:{}", server.local_addr().port());
    server.write_kubeconfig_with_server(&path, &url).unwrap();
    let kc = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string(), format!("{url}/"));
    let client = Client::try_from(config).unwrap();
    let nodes: Api<Node> = Api::all(client);
    assert!(nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());
    server.shutdown().await;
}

/// The hidden `api` command runs the same server as a process (how agent tests use it).
#[tokio::test(flavor = "multi_thread")]
async fn api_command_serves_and_writes_kubeconfig() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let kc_path = dir.path().join("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wgmesh-testbed"))
        .args(["api", "--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kc_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    })
    .await
    .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let kc = Kubeconfig::read_from(&kc_path).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(Client::try_from(config).unwrap());
    let n = nodes
        .create(&PostParams::default(), &node("p"))
        .await
        .unwrap();
    assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.0.0/24"));
    // SIGTERM ends it cleanly.
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
