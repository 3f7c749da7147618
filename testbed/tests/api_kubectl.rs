//! kubectl against the test Kubernetes API: get (plain and wide), annotate, describe,
//! create, delete. Needs `kubectl` on PATH (Debian: `kubernetes-client`); without it
//! the test is skipped, except under CI=true where that is a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Config, Resource};
use serde_json::json;
use wgmesh_testbed::api::{ApiServer, ApiServerConfig};

/// Whether kubectl can run; `None` means skip.
fn kubectl_available() -> Option<()> {
    match Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    {
        Ok(out) if out.status.success() => Some(()),
        result => {
            let why = match result {
                Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "kubectl is required under CI=true (apt-get install kubernetes-client): {why}"
                );
            }
            eprintln!(
                "SKIP: kubectl not available ({why}); install kubernetes-client to run this test"
            );
            None
        }
    }
}

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
}

impl Kubectl {
    /// Runs kubectl (off the async runtime, which is serving the API), returning stdout;
    /// panics with stderr when it fails.
    async fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.try_run(args, stdin).await;
        match out {
            Ok(stdout) => stdout,
            Err(stderr) => panic!("kubectl {args:?} failed: {stderr}"),
        }
    }

    async fn try_run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            });
        let stdin = stdin.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = cmd.spawn().map_err(|e| e.to_string())?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
            }
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() {
                Ok(stdout)
            } else {
                Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

async fn client_for(path: &Path) -> Client {
    let kc = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_get_annotate_describe_delete() {
    if kubectl_available().is_none() {
        return;
    }
    let server = ApiServer::start(ApiServerConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubectl = Kubectl {
        kubeconfig: dir.path().join("kubeconfig"),
        cache: dir.path().join("cache"),
    };
    server.write_kubeconfig(&kubectl.kubeconfig).unwrap();

    let mut node = Node::default();
    node.metadata.name = Some("node-a".into());
    node.metadata.labels =
        Some([("node-role.kubernetes.io/worker".to_string(), String::new())].into());
    server.create_node(node).unwrap();
    server
        .merge_patch_node_status(
            "node-a",
            &json!({"status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "192.168.77.2"}],
                "nodeInfo": {
                    "kubeletVersion": "v1.37.0", "osImage": "Debian GNU/Linux 13 (trixie)",
                    "kernelVersion": "6.12.0", "containerRuntimeVersion": "none://",
                    "architecture": "amd64", "bootID": "", "kubeProxyVersion": "",
                    "machineID": "", "operatingSystem": "linux", "systemUUID": ""
                }
            }}),
        )
        .unwrap();
    server.create_named_node("node-b").unwrap();

    let out = kubectl.run(&["get", "nodes"], None).await;
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("STATUS") && header.contains("ROLES"),
        "{out}"
    );
    let a = out.lines().find(|l| l.starts_with("node-a")).unwrap();
    assert!(
        a.contains("Ready") && a.contains("worker") && a.contains("v1.37.0"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("node-b") && l.contains("Unknown")),
        "{out}"
    );

    let wide = kubectl.run(&["get", "nodes", "-o", "wide"], None).await;
    assert!(
        wide.contains("INTERNAL-IP") && wide.contains("KERNEL-VERSION"),
        "{wide}"
    );
    assert!(
        wide.contains("192.168.77.2") && wide.contains("6.12.0"),
        "{wide}"
    );

    let out = kubectl
        .run(
            &[
                "annotate",
                "node",
                "node-a",
                "wgmesh.dev/force-endpoint=192.168.77.2:51820",
            ],
            None,
        )
        .await;
    assert!(out.contains("node/node-a annotated"), "{out}");
    let annotations = server.node("node-a").unwrap().metadata.annotations.unwrap();
    assert_eq!(
        annotations["wgmesh.dev/force-endpoint"],
        "192.168.77.2:51820"
    );
    let out = kubectl
        .run(
            &[
                "get",
                "node",
                "node-a",
                "-o",
                "jsonpath={.metadata.annotations.wgmesh\\.dev/force-endpoint}",
            ],
            None,
        )
        .await;
    assert_eq!(out, "192.168.77.2:51820");
    kubectl
        .run(
            &["annotate", "node", "node-a", "wgmesh.dev/force-endpoint-"],
            None,
        )
        .await;
    let node_a = server.node("node-a").unwrap();
    assert!(!node_a
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key("wgmesh.dev/force-endpoint"));

    // Events an agent raises show in `kubectl describe node` and `kubectl get events`.
    let client = client_for(&kubectl.kubeconfig).await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "wgmesh".into(),
            instance: Some("node-b".into()),
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidEndpoint".into(),
        note: Some("wgmesh.dev/endpoint is not ip:port".into()),
        action: "ValidateNode".into(),
        secondary: None,
    };
    let node_a = server.node("node-a").unwrap();
    recorder
        .publish(&event, &node_a.object_ref(&()))
        .await
        .unwrap();
    let described = kubectl.run(&["describe", "node", "node-a"], None).await;
    assert!(described.contains("InvalidEndpoint"), "{described}");
    assert!(
        described.contains("wgmesh.dev/endpoint is not ip:port"),
        "{described}"
    );
    let events = kubectl.run(&["get", "events", "-A"], None).await;
    assert!(
        events.contains("InvalidEndpoint") && events.contains("node/node-a"),
        "{events}"
    );

    // create -f goes through kubectl's validation (it checks /openapi/v3 for
    // server-side field validation).
    let manifest = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-c\n";
    let out = kubectl.run(&["create", "-f", "-"], Some(manifest)).await;
    assert!(out.contains("node/node-c created"), "{out}");
    let bogus = "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-d\nspec:\n  bogus: 1\n";
    let err = kubectl
        .try_run(&["create", "-f", "-"], Some(bogus))
        .await
        .unwrap_err();
    assert!(err.contains("unknown field \"spec.bogus\""), "{err}");

    let out = kubectl.run(&["delete", "node", "node-a"], None).await;
    assert!(out.contains("node \"node-a\" deleted"), "{out}");
    assert!(server.node("node-a").is_none());
    let out = kubectl.run(&["get", "nodes", "-o", "name"], None).await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["node/node-b", "node/node-c"]
    );

    // Plain kube Api still agrees with what kubectl did.
    let nodes: Api<Node> = Api::all(client);
    assert!(nodes.get_opt("node-a").await.unwrap().is_none());
    nodes
        .create(&PostParams::default(), &{
            let mut n = Node::default();
            n.metadata.name = Some("node-e".into());
            n
        })
        .await
        .unwrap();
    let version = kubectl.run(&["version", "-o", "json"], None).await;
    assert!(version.contains("serverVersion"), "{version}");
    server.shutdown().await;
}
