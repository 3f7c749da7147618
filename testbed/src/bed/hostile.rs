//! The `hostile-token` drill (real control plane only): node A's agent credential
//! — the ServiceAccount token bound to a Pod on A, what a compromised agent on A
//! holds — used against node B. What the API server must refuse (B's key, CIDR or
//! endpoint, any Node's spec, creating or deleting Nodes) is tried and must be
//! refused with B's Node unchanged; what the policy must allow A (its own
//! agent-owned annotations) is used to claim B's pod CIDR and B's public key,
//! which every peer's validator must ignore. Throughout, B's peer entry on every
//! device stays as it was and B's traffic with a third node loses nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::drill::{mesh_consistent, pair, pod_flows, print_flows, unix_of, Body};
use super::state::NodeRecord;
use super::sys;
use super::topology::Testbed;
use super::traffic::{FlowResult, Flows};
use super::{Error, Result};
use crate::control_plane::{self, Admin};

/// A device's entry for one peer: its endpoint and sorted allowed IPs.
type Entry = (Option<String>, Vec<String>);
/// Each device's peers: key → entry, by node.
type PeerView = BTreeMap<String, BTreeMap<String, Entry>>;

fn peer_view(tb: &Testbed) -> PeerView {
    tb.state
        .nodes
        .iter()
        .map(|n| {
            let peers = tb
                .peers(n)
                .unwrap_or_default()
                .into_iter()
                .map(|p| {
                    let mut ips = p.allowed_ips.clone();
                    ips.sort();
                    (p.public_key_b64(), (p.endpoint.clone(), ips))
                })
                .collect();
            (n.name.clone(), peers)
        })
        .collect()
}

/// The entries every other device has for `victim`'s key.
fn victim_entries(view: &PeerView, victim_key: &str) -> BTreeMap<String, Option<Entry>> {
    view.iter()
        .map(|(node, peers)| (node.clone(), peers.get(victim_key).cloned()))
        .collect()
}

/// The bearer token in an agent's kubeconfig.
fn token_of(kubeconfig: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(kubeconfig)
        .map_err(|e| Error::io(format!("read {}", kubeconfig.display()), e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Other(format!("{}: {e}", kubeconfig.display())))?;
    v["users"][0]["user"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Other(format!("{} holds no token", kubeconfig.display())))
}

fn node(tb: &Testbed, name: &str) -> Result<Value> {
    tb.api(
        "GET",
        &format!("/api/v1/nodes/{name}"),
        "application/json",
        &Value::Null,
    )
}

/// One request that must be refused with 403 (printed with who refused it).
fn must_deny(c: &Admin, what: &str, method: &str, path: &str, body: &Value) -> bool {
    let ctype = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    match c.request(method, path, ctype, body) {
        Err(e) if e.forbidden().is_some() => {
            let by = e
                .forbidden()
                .map(|(by, _)| by.to_string())
                .unwrap_or_default();
            println!("    DENIED by {by}: {what}");
            true
        }
        Err(e) => {
            println!("    NOT DENIED as expected: {what}: {e}");
            false
        }
        Ok(_) => {
            println!("    ALLOWED (must be denied): {what}");
            false
        }
    }
}

pub(super) fn hostile_token(tb: &mut Testbed) -> Result<Body> {
    let Some(spec) = tb.state.control_plane.clone() else {
        return Err(Error::Other(
            "hostile-token needs `up --control-plane real`: the in-memory API enforces \
             no RBAC and no admission policy"
                .into(),
        ));
    };
    // pair(): (the second node, the first); the attacker is the older node, so an
    // "older node wins" rule cannot hand it the victim's key or CIDR.
    let (victim, attacker) = pair(tb)?;
    let third: NodeRecord = tb
        .state
        .nodes
        .iter()
        .find(|n| n.name != victim.name && n.name != attacker.name && !n.pods.is_empty())
        .cloned()
        .ok_or_else(|| Error::Other("hostile-token needs 3 nodes with a pod each".into()))?;
    mesh_consistent(tb)
        .map_err(|e| Error::Other(format!("mesh not whole before the drill: {e}")))?;
    let token = token_of(&tb.state.agent_kubeconfig(&attacker.name))?;
    let admin = spec
        .admin(Some(&tb.state.underlay_ns))
        .map_err(|e| Error::Other(e.to_string()))?;
    let hostile = admin.with_token(&token);
    let (a, v) = (&attacker.name, &victim.name);
    let victim_before = node(tb, v)?;
    let attacker_node = node(tb, a)?;
    let victim_key = victim_before["metadata"]["annotations"]["wgmesh.dev/public-key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let victim_cidr = victim_before["spec"]["podCIDRs"][0].clone();
    let attacker_cidr = attacker_node["spec"]["podCIDRs"][0].clone();
    let view_before = peer_view(tb);
    let entries_before = victim_entries(&view_before, &victim_key);
    println!(
        "  attacker: {a}'s agent token (bound to Pod {}/{}); victim: {v} (key {victim_key}, pod CIDR {victim_cidr}); traffic {v} <-> {}",
        control_plane::AGENT_NAMESPACE,
        control_plane::agent_pod_name(a),
        third.name
    );

    let secs = 14.0;
    let flows = Flows::start(pod_flows(&victim, &third, 200, secs, 42000)?)?;
    let t_start = Instant::now();

    println!("  requests the API server must refuse:");
    let fresh = wgmesh::keys::PrivateKey::generate()
        .public_key()
        .to_base64();
    let node_path = |n: &str| format!("/api/v1/nodes/{n}");
    let annotate = |k: &str, val: Value| json!({"metadata": {"annotations": {k: val}}});
    let attempts: Vec<(String, &str, String, Value)> = vec![
        (
            format!("replace {v}'s public key"),
            "PATCH",
            node_path(v),
            annotate("wgmesh.dev/public-key", json!(fresh)),
        ),
        (
            format!("remove {v}'s public key"),
            "PATCH",
            node_path(v),
            annotate("wgmesh.dev/public-key", Value::Null),
        ),
        (
            format!("claim {a}'s pod CIDR on {v}"),
            "PATCH",
            node_path(v),
            annotate("wgmesh.dev/pod-cidrs", attacker_cidr.clone()),
        ),
        (
            format!("point {v}'s endpoint at {a}"),
            "PATCH",
            node_path(v),
            annotate(
                "wgmesh.dev/endpoint",
                json!(format!("{}:51820", attacker.underlay[0])),
            ),
        ),
        (
            format!("force {v}'s endpoint (a person's key)"),
            "PATCH",
            node_path(v),
            annotate(
                "wgmesh.dev/force-endpoint",
                json!(format!("{}:51820", attacker.underlay[0])),
            ),
        ),
        (
            format!("set {a}'s spec.podCIDRs to {v}'s"),
            "PATCH",
            node_path(a),
            json!({"spec": {"podCIDRs": [victim_cidr.clone()]}}),
        ),
        (
            format!("create a Node claiming {v}'s pod CIDR"),
            "POST",
            "/api/v1/nodes".into(),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("hostile-{}", tb.state.id)},
                "spec": {"podCIDRs": [victim_cidr.clone()]}}),
        ),
        (
            format!("delete {v}'s Node"),
            "DELETE",
            node_path(v),
            Value::Null,
        ),
        (
            format!("mark {v} NotReady"),
            "PATCH",
            format!("{}/status", node_path(v)),
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ),
    ];
    let mut refused = 0;
    for (what, method, path, body) in &attempts {
        if path.ends_with(&format!("/nodes/{a}")) && body.get("spec").is_some() {
            // spec.podCIDRs cannot change once set: the API server keeps the old
            // value (the patch is a no-op, so the policy has nothing to deny).
            let before = node(tb, a)?;
            let r = hostile.request(method, path, "application/merge-patch+json", body);
            let after = node(tb, a)?;
            let kept = before["spec"] == after["spec"];
            match r {
                Ok(_) if kept => {
                    println!("    NO EFFECT (the API server keeps spec.podCIDRs once set): {what}");
                    refused += 1;
                }
                Err(control_plane::Error::Http { status: 403, .. }) if kept => {
                    println!("    DENIED: {what}");
                    refused += 1;
                }
                _ => println!("    TOOK EFFECT (must not): {what}: {}", after["spec"]),
            }
            continue;
        }
        if must_deny(&hostile, what, method, path, body) {
            refused += 1;
        }
    }
    let victim_after = node(tb, v)?;
    let victim_unchanged =
        victim_before["metadata"]["resourceVersion"] == victim_after["metadata"]["resourceVersion"];
    println!(
        "  {refused} of {} refused; {v}'s Node {}",
        attempts.len(),
        if victim_unchanged {
            "unchanged (same resourceVersion)"
        } else {
            "CHANGED"
        }
    );

    // What the policy allows the attacker: its own agent-owned annotations. It
    // uses them to claim the victim's CIDR, then the victim's key.
    println!("  what the policy lets {a} write (its own wgmesh.dev/ keys), used against {v}:");
    let claims = [
        (
            format!("{a} claims {v}'s pod CIDR {victim_cidr} in its own wgmesh.dev/pod-cidrs"),
            annotate("wgmesh.dev/pod-cidrs", victim_cidr.clone()),
        ),
        (
            format!("{a} publishes {v}'s public key as its own"),
            annotate("wgmesh.dev/public-key", json!(victim_key)),
        ),
    ];
    let mut held = true;
    let mut claim_notes = Vec::new();
    for (what, body) in &claims {
        let r = hostile.request("PATCH", &node_path(a), "application/merge-patch+json", body);
        match r {
            Ok(_) => println!("    allowed: {what}"),
            Err(e) => {
                println!("    refused: {what}: {e}");
                continue;
            }
        }
        // Watch the victim's entries for 3 s (several passes of every agent).
        let until = Instant::now() + Duration::from_secs(3);
        let mut changed_on = None;
        while Instant::now() < until {
            let now = victim_entries(&peer_view(tb), &victim_key);
            if now != entries_before {
                changed_on = Some(
                    now.iter()
                        .filter(|(n, e)| entries_before.get(*n) != Some(e))
                        .map(|(n, e)| format!("{n}: {e:?}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                );
                break;
            }
            sys::sleep(Duration::from_millis(100))?;
        }
        match changed_on {
            None => {
                println!("      {v}'s peer entry unchanged on every device");
                claim_notes.push("ignored".to_string());
            }
            Some(d) => {
                held = false;
                println!("      {v}'s peer entry CHANGED: {d}");
                claim_notes.push(format!("CHANGED {v}'s entry"));
            }
        }
    }
    let t_claims = Instant::now();
    let results = flows.finish(Duration::from_secs(1));
    print_flows(&results);
    let sent: u64 = results.iter().map(|r| r.sent.len() as u64).sum();
    let lost: u64 = results.iter().map(FlowResult::lost).sum();

    // The attacker's own agent puts its true annotations back (it publishes what
    // its store and Node say, whenever its Node differs).
    let t_heal = Instant::now();
    let healed = tb
        .wait_for(
            &format!("{a}'s agent to republish its own annotations and the mesh to be whole"),
            Duration::from_secs(30),
            || mesh_consistent(tb).is_ok(),
        )
        .is_ok();
    println!(
        "  {a}'s agent restored its annotations; mesh whole {:.1} s after the last claim{}",
        t_heal.elapsed().as_secs_f64(),
        if healed { "" } else { " — NOT within 30 s" }
    );
    let ok =
        refused == attempts.len() && victim_unchanged && held && sent > 0 && lost == 0 && healed;
    Ok(Body {
        ok,
        figure: format!(
            "{refused} of {} hostile requests with {a}'s token refused, {v}'s Node unchanged; \
             {a}'s own claims of {v}'s CIDR and key: {}; {v} <-> {} lost {lost} of {sent} datagrams",
            attempts.len(),
            claim_notes.join(", "),
            third.name
        ),
        phases: vec![("hostile requests and claims".into(), unix_of(t_start), unix_of(t_claims))],
    })
}
