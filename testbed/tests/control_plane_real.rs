//! manifests/01-rbac.yaml and 02-admission-policy.yaml enforced by a real
//! kube-apiserver (etcd + kube-apiserver + kube-controller-manager, as
//! `scripts/kube-bins` builds them): what node n1's agent may do with the
//! token its DaemonSet pod would get — a ServiceAccount token bound to a Pod on
//! n1 — asked with `kubectl auth can-i` and then tried with real requests, and
//! that the denied ones change nothing.
//!
//! Needs WGMESH_KUBE_BINS (scripts/test sets it); without it it prints SKIP,
//! except under CI=true, where it fails.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use wgmesh_testbed::control_plane::{self, local, Admin, Error, Refuser};

const POLICY: Refuser = Refuser::AdmissionPolicy;
const RBAC: Refuser = Refuser::Rbac;

const CLUSTER_CIDRS: &[&str] = &["10.244.0.0/16"];

fn control_plane(test: &str) -> Option<&'static local::Local> {
    match local::shared(CLUSTER_CIDRS) {
        Ok(cp) => Some(cp),
        Err(missing) => {
            testkit::prereq::skip_or_fail(test, &missing);
            None
        }
    }
}

/// A Node the administrator creates, with annotations as its agent would have
/// published them, and its pod CIDR from the real node IPAM.
fn node(admin: &Admin, name: &str, key: &str) -> Value {
    control_plane::create_node(
        admin,
        name,
        &json!({"wgmesh.dev/test": "control-plane-real"}),
    )
    .unwrap();
    admin
        .request(
            "PATCH",
            &format!("/api/v1/nodes/{name}"),
            "application/merge-patch+json",
            &json!({"metadata": {"annotations": {
                "wgmesh.dev/public-key": key,
                "wgmesh.dev/key-generation": "1",
                "wgmesh.dev/endpoint": "192.0.2.10:51820",
                "other.example/owner": "someone",
            }}}),
        )
        .unwrap();
    // The controller-manager's node IPAM sets spec.podCIDRs shortly after.
    for _ in 0..200 {
        let n = get_node(admin, name);
        if n["spec"]["podCIDRs"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("kube-controller-manager gave {name} no spec.podCIDRs in 20 s");
}

fn get_node(admin: &Admin, name: &str) -> Value {
    admin
        .request(
            "GET",
            &format!("/api/v1/nodes/{name}"),
            "application/json",
            &Value::Null,
        )
        .unwrap()
}

/// `kubectl auth can-i` (the server's release) with this kubeconfig: "yes" or "no".
fn can_i(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(kubectl)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["auth", "can-i"])
        .args(args)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?}: {answer:?} / {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer
}

fn patch(c: &Admin, node: &str, body: Value) -> Result<Value, Error> {
    c.request(
        "PATCH",
        &format!("/api/v1/nodes/{node}"),
        "application/merge-patch+json",
        &body,
    )
}

/// The denial's message, which must come from `who`.
fn denied(r: Result<Value, Error>, who: Refuser, what: &str) -> String {
    match r {
        Err(e) => match e.forbidden() {
            Some((by, msg)) => {
                assert_eq!(by, who, "{what}: denied by {by}, want {who}: {msg}");
                msg
            }
            None => panic!("{what}: want 403 from {who}, got {e}"),
        },
        Ok(v) => panic!("{what}: ALLOWED (want 403 from {who}): {v}"),
    }
}

#[test]
fn an_agent_token_may_only_patch_its_own_nodes_agent_annotations() {
    let Some(cp) = control_plane("an_agent_token_may_only_patch_its_own_nodes_agent_annotations")
    else {
        return;
    };
    let admin = cp.admin();
    let dir = tempfile::tempdir().unwrap();
    let k1 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE=";
    let k2 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAI=";
    node(admin, "sec-n1", k1);
    node(admin, "sec-n2", k2);
    let kc1 = dir.path().join("n1.kubeconfig");
    cp.agent_kubeconfig("sec-n1", &kc1).unwrap();
    let t1 = control_plane::agent_token(admin, "sec-n1").unwrap();
    let n1 = admin.with_token(&t1);

    // What RBAC grants, as kubectl asks the server (SelfSubjectAccessReview).
    let matrix: &[(&[&str], &str)] = &[
        (&["get", "nodes"], "yes"),
        (&["list", "nodes"], "yes"),
        (&["watch", "nodes"], "yes"),
        (&["patch", "nodes"], "yes"),
        (&["update", "nodes"], "no"),
        (&["create", "nodes"], "no"),
        (&["delete", "nodes"], "no"),
        (&["patch", "nodes", "--subresource=status"], "no"),
        (&["create", "events.events.k8s.io", "-n", "default"], "yes"),
        (&["patch", "events.events.k8s.io", "-n", "default"], "yes"),
        (&["create", "events", "-n", "default"], "no"),
        (&["get", "secrets", "-n", "wgmesh"], "no"),
        (&["list", "secrets", "--all-namespaces"], "no"),
        (&["get", "pods", "-n", "wgmesh"], "no"),
        (&["create", "pods", "-n", "wgmesh"], "no"),
        (&["create", "serviceaccounts/token", "-n", "wgmesh"], "no"),
        (&["get", "configmaps", "-n", "kube-system"], "no"),
        (&["patch", "validatingadmissionpolicies"], "no"),
        (&["get", "meshroutes.wgmesh.dev"], "yes"),
        (&["list", "meshroutes.wgmesh.dev"], "yes"),
        (&["watch", "meshroutes.wgmesh.dev"], "yes"),
        (&["create", "meshroutes.wgmesh.dev"], "no"),
        (&["patch", "meshroutes.wgmesh.dev"], "no"),
        (&["delete", "meshroutes.wgmesh.dev"], "no"),
        (&["*", "*"], "no"),
    ];
    println!("kubectl auth can-i, as node sec-n1's agent (token bound to a Pod on sec-n1):");
    let mut wrong = Vec::new();
    for (args, want) in matrix {
        let got = can_i(&cp.spec.bins.kubectl, &kc1, args);
        println!("  {:<55} {got}", args.join(" "));
        if got != *want {
            wrong.push(format!("{}: {got}, want {want}", args.join(" ")));
        }
    }
    assert!(wrong.is_empty(), "can-i matrix: {wrong:?}");

    // Real requests: denied ones name their reason and change nothing.
    let before1 = get_node(admin, "sec-n1");
    let before2 = get_node(admin, "sec-n2");
    let hostile: Vec<(&str, Refuser, Result<Value, Error>)> = vec![
        (
            "publish n1's key as n2's",
            POLICY,
            patch(
                &n1,
                "sec-n2",
                json!({"metadata": {"annotations": {"wgmesh.dev/public-key": k1}}}),
            ),
        ),
        (
            "claim n1's pod CIDR on n2",
            POLICY,
            patch(
                &n1,
                "sec-n2",
                json!({"metadata": {"annotations": {
                "wgmesh.dev/pod-cidrs": before1["spec"]["podCIDRs"][0]}}}),
            ),
        ),
        (
            "label n1",
            POLICY,
            patch(
                &n1,
                "sec-n1",
                json!({"metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}}}),
            ),
        ),
        (
            "taint n1",
            POLICY,
            patch(
                &n1,
                "sec-n1",
                json!({"spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}}),
            ),
        ),
        (
            "cordon n1",
            POLICY,
            patch(&n1, "sec-n1", json!({"spec": {"unschedulable": true}})),
        ),
        (
            "change another tool's annotation on n1",
            POLICY,
            patch(
                &n1,
                "sec-n1",
                json!({"metadata": {"annotations": {"other.example/owner": "me"}}}),
            ),
        ),
        (
            "set force-endpoint (a person's key) on n1",
            POLICY,
            patch(
                &n1,
                "sec-n1",
                json!({"metadata": {"annotations": {"wgmesh.dev/force-endpoint": "203.0.113.1:51820"}}}),
            ),
        ),
        (
            "set rotate-requested (a person's key) on n1",
            POLICY,
            patch(
                &n1,
                "sec-n1",
                json!({"metadata": {"annotations": {"wgmesh.dev/rotate-requested": "2030-01-01T00:00:00Z"}}}),
            ),
        ),
        (
            "write n1's status",
            RBAC,
            n1.request(
                "PATCH",
                "/api/v1/nodes/sec-n1/status",
                "application/merge-patch+json",
                &json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
        ),
        (
            "delete n2",
            RBAC,
            n1.request(
                "DELETE",
                "/api/v1/nodes/sec-n2",
                "application/json",
                &Value::Null,
            ),
        ),
        (
            "create a Node",
            RBAC,
            n1.request(
                "POST",
                "/api/v1/nodes",
                "application/json",
                &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "sec-rogue"}}),
            ),
        ),
        (
            "read Secrets",
            RBAC,
            n1.request(
                "GET",
                "/api/v1/namespaces/wgmesh/secrets",
                "application/json",
                &Value::Null,
            ),
        ),
        (
            "read Pods",
            RBAC,
            n1.request("GET", "/api/v1/pods", "application/json", &Value::Null),
        ),
        (
            "grant itself a prefix (create a MeshRoute)",
            RBAC,
            n1.request(
                "POST",
                "/apis/wgmesh.dev/v1alpha1/meshroutes",
                "application/json",
                &json!({"apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
                        "metadata": {"name": "sec-rogue"},
                        "spec": {"prefix": "198.51.100.0/24", "gateways": [{"node": "sec-n1"}]}}),
            ),
        ),
    ];
    println!("requests as sec-n1's agent:");
    for (what, who, r) in hostile {
        let msg = denied(r, who, what);
        // The policy's own message (the rule that denied), else the server's.
        let msg = msg
            .split_once("denied request: ")
            .map_or(msg.as_str(), |(_, m)| m);
        println!(
            "  DENIED ({who:<16}) {what}: {}",
            msg.chars().take(150).collect::<String>()
        );
    }
    let after1 = get_node(admin, "sec-n1");
    let after2 = get_node(admin, "sec-n2");
    assert_eq!(
        before1["metadata"]["resourceVersion"], after1["metadata"]["resourceVersion"],
        "a denied request changed sec-n1"
    );
    assert_eq!(
        before2["metadata"]["resourceVersion"], after2["metadata"]["resourceVersion"],
        "a denied request changed sec-n2"
    );

    // What the agent does is allowed: its own keys on its own Node, and Events.
    let allowed = patch(
        &n1,
        "sec-n1",
        json!({"metadata": {"annotations": {
            "wgmesh.dev/public-key": k2.replace("AI=", "AM="),
            "wgmesh.dev/next-public-key": null,
            "wgmesh.dev/audit-head": "3:00",
        }}}),
    )
    .unwrap();
    assert_eq!(
        allowed["metadata"]["annotations"]["wgmesh.dev/audit-head"], "3:00",
        "the agent's own annotation was not written"
    );
    println!("  ALLOWED patch of sec-n1's wgmesh.dev/public-key, next-public-key, audit-head");
    let event = n1
        .request(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            "application/json",
            &json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"generateName": "sec-n1-"},
                "eventTime": "2026-01-01T00:00:00.000000Z",
                "reportingController": "wgmesh.dev/agent", "reportingInstance": "sec-n1",
                "action": "Reconcile", "reason": "KeyPublished", "type": "Normal",
                "note": "test", "regarding": {"kind": "Node", "name": "sec-n1", "apiVersion": "v1"}}),
        )
        .unwrap();
    assert!(event["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n.starts_with("sec-n1-")));
    println!("  ALLOWED create of an events.k8s.io Event");

    // MeshRoutes: the CRD's schema refuses what no agent would carry, and
    // the agent reads what an admin granted.
    let meshroutes = "/apis/wgmesh.dev/v1alpha1/meshroutes";
    let grant = |name: &str, prefix: &str| {
        json!({"apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
               "metadata": {"name": name},
               "spec": {"prefix": prefix, "gateways": [{"node": "sec-n1", "priority": 10}]}})
    };
    for (name, prefix, why) in [
        ("sec-hostbits", "198.51.100.1/24", "without host bits"),
        ("sec-default", "0.0.0.0/0", "default route"),
        ("sec-garbage", "not-a-cidr", "without host bits"),
        ("sec-metadata", "169.254.0.0/16", "global unicast"),
    ] {
        let (status, body) = admin
            .raw(
                "POST",
                meshroutes,
                "application/json",
                &grant(name, prefix).to_string(),
            )
            .unwrap();
        assert_eq!(status, 422, "{prefix}: {body}");
        assert!(body.contains(why), "{prefix}: {body}");
        println!("  REFUSED (422, CRD schema) MeshRoute {prefix}: {why}");
    }
    let bad_node = json!({"apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
        "metadata": {"name": "sec-badnode"},
        "spec": {"prefix": "198.51.100.0/24", "gateways": [{"node": "Not_A_Node"}]}});
    let (status, body) = admin
        .raw(
            "POST",
            meshroutes,
            "application/json",
            &bad_node.to_string(),
        )
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("spec.gateways[0].node"), "{body}");
    println!("  REFUSED (422, CRD schema) MeshRoute gateway \"Not_A_Node\": not an RFC 1123 name");
    admin
        .request(
            "POST",
            meshroutes,
            "application/json",
            &grant("sec-site", "198.51.100.0/24"),
        )
        .unwrap();
    let listed = n1
        .request("GET", meshroutes, "application/json", &Value::Null)
        .unwrap();
    let names: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert!(names.contains(&"sec-site"), "{listed}");
    let decoded = wgmesh::routes::grant::decode(
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == "sec-site")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded.gateways[0].node, "sec-n1");
    assert_eq!(
        decoded.failback,
        std::time::Duration::from_secs(30),
        "the schema's default"
    );
    println!("  ALLOWED list of MeshRoutes; the agent's decoder reads the admin's grant");

    // A token that is not bound to a Pod carries no node: even its "own" Node is
    // refused. A bound token dies with its Pod.
    let unbound = admin
        .request(
            "POST",
            "/api/v1/namespaces/wgmesh/serviceaccounts/wgmesh-agent/token",
            "application/json",
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600}}),
        )
        .unwrap()["status"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let msg = denied(
        patch(
            &admin.with_token(&unbound),
            "sec-n1",
            json!({"metadata": {"annotations": {"wgmesh.dev/audit-head": "4:00"}}}),
        ),
        POLICY,
        "an unbound token patching sec-n1",
    );
    println!("  DENIED (policy) an unbound ServiceAccount token patching sec-n1: {msg}");
    admin
        .request(
            "DELETE",
            &format!(
                "/api/v1/namespaces/wgmesh/pods/{}?gracePeriodSeconds=0",
                control_plane::agent_pod_name("sec-n1")
            ),
            "application/json",
            &Value::Null,
        )
        .unwrap();
    let mut status = 0;
    for _ in 0..100 {
        status = match n1.raw("GET", "/api/v1/nodes/sec-n1", "application/json", "") {
            Ok((s, _)) => s,
            Err(e) => panic!("{e}"),
        };
        if status == 401 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        status, 401,
        "a token bound to a deleted Pod still authenticates"
    );
    println!("  REFUSED (401) sec-n1's token once its Pod is deleted");
}
