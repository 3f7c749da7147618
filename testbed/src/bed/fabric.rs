//! The `bgp-fabric` drill (real control plane only: the grant is a
//! MeshRoute): route sync's BGP mode end to end. A fabric router (BIRD 2,
//! AS 64600, in `wgtb-<id>-fabric` on the underlay at 192.0.2.250) announces
//! a site prefix behind it (203.0.113.0/24, host 203.0.113.1) and hostile
//! ones: another node's pod CIDR, a /25 inside it, a default route, a prefix
//! no grant allows. Node n1's agent is restarted with `--bgp` (it starts its
//! own BIRD, AS 64512); a MeshRoute lets n1 learn 203.0.113.0/24.
//!
//! Asserted, on each side's own state: the fabric's RIB holds n1's pod CIDR
//! with next hop n1; n1 publishes exactly the granted prefix; n3's device has
//! it on n1's peer and nothing hostile anywhere; n3's pod pings the host
//! behind the fabric; the fabric withdraws the prefix and it leaves n3's
//! device. Printed: the time to each of those. n1's agent goes back to its
//! original command afterwards (its BIRD stopped, its table flushed).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::drill::Body;
use super::state::NodeRecord;
use super::sys;
use super::topology::{Testbed, BRIDGE};
use super::{Error, Result};

const FABRIC_ADDR: &str = "192.0.2.250";
const FABRIC_AS: u32 = 64600;
const NODE_AS: u32 = 64512;
const SITE: &str = "203.0.113.0/24";
const SITE_HOST: &str = "203.0.113.1";
const UNGRANTED: &str = "198.51.100.0/24";
const GRANT: &str = "testbed-fabric";
const MESHROUTES: &str = "/apis/wgmesh.dev/v1alpha1/meshroutes";

pub fn bgp_fabric(tb: &mut Testbed) -> Result<Body> {
    if tb.state.control_plane.is_none() {
        return Err(Error::Other(
            "bgp-fabric needs `up --control-plane real` (the grant is a MeshRoute)".into(),
        ));
    }
    use testkit::prereq::{missing, Need};
    if let Some(why) = missing(&[Need::Tool("bird"), Need::Tool("birdc")]) {
        return Err(Error::Other(format!(
            "bgp-fabric: {why} (Debian package bird2)"
        )));
    }
    let nodes = tb.state.nodes.clone();
    if nodes.len() < 3 || nodes[2].pods.is_empty() {
        return Err(Error::Other(
            "bgp-fabric needs 3 nodes, the third with a pod (up --nodes 3 --pods 1)".into(),
        ));
    }
    let (gw, victim, client) = (&nodes[0], &nodes[1], &nodes[2]);
    let agent = format!("{}-agent", gw.name);
    let original = tb
        .process(&agent)
        .map(|p| p.argv.clone())
        .ok_or_else(|| Error::Other(format!("no process {agent}")))?;
    let dir = tb.state.dir.join("bgp");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
    let fabric = match build_fabric(tb) {
        Ok(f) => f,
        Err(e) => {
            super::topology::delete_netns(&format!("{}fabric", tb.state.prefix()));
            return Err(e);
        }
    };
    let result = run(tb, gw, victim, client, &fabric, &dir, &agent, &original);

    // Whatever happened: n1 back to its own command, its BIRD and table gone.
    let _ = tb.restart_with_argv(&agent, original);
    let _ = sys::run(&[
        "birdc",
        "-s",
        &dir.join("n1.ctl").display().to_string(),
        "down",
    ]);
    let _ = sys::ip(&gw.ns, &["route", "flush", "table", "187"]);
    let _ = sys::ip(&gw.ns, &["-6", "route", "flush", "table", "187"]);
    let _ = tb.api(
        "DELETE",
        &format!("{MESHROUTES}/{GRANT}"),
        "application/json",
        &Value::Null,
    );
    let _ = tb.signal_process("fabric-bird", testkit::Signal::KILL);
    super::topology::delete_netns(&fabric);
    result
}

#[allow(clippy::too_many_arguments)]
fn run(
    tb: &mut Testbed,
    gw: &NodeRecord,
    victim: &NodeRecord,
    client: &NodeRecord,
    fabric: &str,
    dir: &std::path::Path,
    agent: &str,
    original: &[String],
) -> Result<Body> {
    let victim_cidr = victim
        .pod_cidrs
        .iter()
        .find(|c| !c.contains(':'))
        .cloned()
        .ok_or_else(|| Error::Other(format!("{} has no IPv4 pod CIDR", victim.name)))?;
    let inside_victim = format!("{}/25", victim_cidr.split('/').next().unwrap_or_default());
    let gw_cidr = gw
        .pod_cidrs
        .iter()
        .find(|c| !c.contains(':'))
        .cloned()
        .ok_or_else(|| Error::Other(format!("{} has no IPv4 pod CIDR", gw.name)))?;
    let gw_ip = gw
        .underlay
        .iter()
        .find(|a| a.is_ipv4())
        .map(ToString::to_string)
        .ok_or_else(|| Error::Other(format!("{} has no IPv4 underlay address", gw.name)))?;

    // The fabric router.
    let fabric_conf = dir.join("fabric.conf");
    let fabric_ctl = dir.join("fabric.ctl");
    let announce = |with_site: bool| {
        let mut routes = vec![
            victim_cidr.clone(),
            inside_victim.clone(),
            "0.0.0.0/0".to_string(),
            UNGRANTED.to_string(),
        ];
        if with_site {
            routes.push(SITE.to_string());
        }
        let statics: String = routes
            .iter()
            .map(|r| format!("  route {r} blackhole;\n"))
            .collect();
        format!(
            "router id {FABRIC_ADDR};\nprotocol device {{}}\n\
             protocol static site4 {{\n  ipv4;\n{statics}}}\n\
             protocol bgp {0} {{\n  local {FABRIC_ADDR} as {FABRIC_AS};\n  neighbor {gw_ip} as {NODE_AS};\n  \
             direct;\n  hold time 9; keepalive time 3; connect retry time 2; error wait time 1,5;\n  graceful restart on;\n  \
             ipv4 {{ import all; export where proto = \"site4\"; }};\n}}\n",
            "to_n1"
        )
    };
    std::fs::write(&fabric_conf, announce(true))
        .map_err(|e| Error::io(format!("{}", fabric_conf.display()), e))?;
    tb.spawn(
        "fabric-bird",
        fabric,
        &[
            "bird".into(),
            "-f".into(),
            "-c".into(),
            fabric_conf.display().to_string(),
            "-s".into(),
            fabric_ctl.display().to_string(),
        ],
        None,
    )?;
    println!(
        "  fabric: namespace {fabric}, BIRD AS {FABRIC_AS} at {FABRIC_ADDR}; announces {SITE} (host {SITE_HOST}) and, hostile, {victim_cidr} ({}'s pod CIDR), {inside_victim}, 0.0.0.0/0, {UNGRANTED} (no grant)",
        victim.name
    );

    // The grant, then n1's agent in BGP mode.
    let grant = json!({
        "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
        "metadata": {"name": GRANT},
        "spec": {"prefix": SITE, "learn": {"nodes": [gw.name], "maxLength": 24}},
    });
    tb.api("POST", MESHROUTES, "application/json", &grant)?;
    let mut argv = original.to_vec();
    argv.extend([
        "--bgp".to_string(),
        "--bgp-local-as".into(),
        NODE_AS.to_string(),
        "--bgp-neighbor".into(),
        format!("{FABRIC_ADDR}={FABRIC_AS}"),
        "--bgp-config".into(),
        dir.join("n1.conf").display().to_string(),
        "--bgp-socket".into(),
        dir.join("n1.ctl").display().to_string(),
        "--bgp-log".into(),
        dir.join("n1-bird.log").display().to_string(),
    ]);
    let t0 = Instant::now();
    tb.restart_with_argv(agent, argv.clone())?;
    println!(
        "  MeshRoute {GRANT}: {} may learn {SITE} (maxLength 24); {agent} restarted with --bgp --bgp-local-as {NODE_AS} --bgp-neighbor {FABRIC_ADDR}={FABRIC_AS}",
        gw.name
    );

    let mut ok = true;
    let mut notes: Vec<String> = Vec::new();
    let step = |what: &str, timeout: Duration, check: &mut dyn FnMut() -> bool| -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            if check() {
                let s = t0.elapsed().as_secs_f64();
                println!("  {s:6.2} s: {what}");
                return Some(s);
            }
            if Instant::now() > deadline {
                println!("  FAILED within {} s: {what}", timeout.as_secs());
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let birdc = |sock: &std::path::Path, cmd: &str| -> String {
        sys::run(&["birdc", "-s", &sock.display().to_string(), cmd]).unwrap_or_default()
    };
    let established = step(
        "the fabric's session with n1 is Established",
        Duration::from_secs(40),
        &mut || birdc(&fabric_ctl, "show protocols to_n1").contains("Established"),
    );
    let in_rib = step(
        &format!(
            "the fabric's RIB holds {gw_cidr} via {gw_ip} ({}'s pod CIDR)",
            gw.name
        ),
        Duration::from_secs(20),
        &mut || {
            let r = birdc(&fabric_ctl, &format!("show route for {gw_cidr} all"));
            r.contains(&gw_cidr) && r.contains(&format!("via {gw_ip}"))
        },
    );
    let published = step(
        &format!(
            "{}'s Node publishes wgmesh.dev/learned-prefixes = {SITE}",
            gw.name
        ),
        Duration::from_secs(20),
        &mut || learned_annotation(tb, &gw.name).as_deref() == Some(SITE),
    );
    let on_peer = step(
        &format!(
            "{}'s device carries {SITE} on {}'s peer",
            client.name, gw.name
        ),
        Duration::from_secs(20),
        &mut || holder(tb, client, SITE).as_deref() == tb.node_public_key(&gw.name).as_deref(),
    );
    if [established, in_rib, published, on_peer]
        .iter()
        .any(Option::is_none)
    {
        ok = false;
        notes.push("the learned prefix did not reach the mesh".into());
    }
    // What an operator on n1 sees: `wgmesh status` with the agent's flags.
    match status_json(&gw.ns, &argv) {
        Ok(status) => {
            let sessions: Vec<String> = status["bgp"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{} {}",
                        b["name"].as_str().unwrap_or("?"),
                        b["state"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            let site_here = status["routes"].as_array().into_iter().flatten().any(|r| {
                r["prefix"] == SITE && r["local_gateway"] == true && r["refused"].is_null()
            });
            println!(
                "  wgmesh status on {}: BGP sessions: {}; {SITE} {}",
                gw.name,
                if sessions.is_empty() {
                    "none".to_string()
                } else {
                    sessions.join(", ")
                },
                if site_here {
                    "learned here (this node is a gateway)"
                } else {
                    "NOT shown as learned here"
                }
            );
            if !sessions.iter().any(|s| s.ends_with(" established")) || !site_here {
                ok = false;
                notes.push("wgmesh status does not show the session and the learned prefix".into());
            }
        }
        Err(e) => {
            ok = false;
            notes.push(format!("wgmesh status failed: {e}"));
        }
    }
    let table = sys::ip(&gw.ns, &["route", "show", "table", "187"]).unwrap_or_default();
    println!(
        "  {}'s table 187 (BIRD's, import filter = the grant): {}",
        gw.name,
        table.lines().collect::<Vec<_>>().join("; ")
    );
    for hostile in [
        victim_cidr.as_str(),
        inside_victim.as_str(),
        "0.0.0.0/0",
        UNGRANTED,
    ] {
        let in_table = table.lines().any(|l| {
            l.split_whitespace().next()
                == Some(if hostile == "0.0.0.0/0" {
                    "default"
                } else {
                    hostile
                })
        });
        // On the advertiser's peer anywhere (n2's own pod CIDR is rightly
        // on n2's peer).
        let gw_key = tb.node_public_key(&gw.name);
        let on_device = tb
            .state
            .nodes
            .iter()
            .any(|n| gw_key.is_some() && holder(tb, n, hostile) == gw_key);
        if in_table || on_device {
            ok = false;
            notes.push(format!("hostile {hostile} accepted"));
        }
    }
    if ok {
        println!(
            "  hostile {victim_cidr}, {inside_victim}, 0.0.0.0/0, {UNGRANTED}: in no table 187 and on no device"
        );
    }
    match super::traffic::ping_until(&client.pods[0].ns, SITE_HOST, Duration::from_secs(10)) {
        Some(secs) => println!(
            "  ping {} -> {SITE_HOST} (behind the fabric, through {}): answered after {secs:.2} s",
            client.pods[0].name, gw.name
        ),
        None => {
            ok = false;
            notes.push(format!("{} cannot reach {SITE_HOST}", client.pods[0].name));
        }
    }

    // Withdraw at the fabric.
    std::fs::write(&fabric_conf, announce(false))
        .map_err(|e| Error::io(format!("{}", fabric_conf.display()), e))?;
    let t_withdraw = Instant::now();
    birdc(&fabric_ctl, "configure");
    let gone = step(
        &format!(
            "withdrawn at the fabric: {SITE} gone from {}'s device",
            client.name
        ),
        Duration::from_secs(30),
        &mut || holder(tb, client, SITE).is_none(),
    );
    let withdraw_s = gone.map(|_| t_withdraw.elapsed().as_secs_f64());
    if gone.is_none() {
        ok = false;
        notes.push("the withdrawn prefix stayed".into());
    }
    let figure = format!(
        "session up {}, {gw_cidr} in the fabric's RIB {}, {SITE} on {}'s peer at {} {}, withdrawn from it {} after the fabric's withdraw; 4 hostile announcements refused{}",
        fmt_s(established),
        fmt_s(in_rib),
        gw.name,
        client.name,
        fmt_s(on_peer),
        withdraw_s.map_or("never".into(), |s| format!("{s:.2} s")),
        if notes.is_empty() { String::new() } else { format!("; {}", notes.join("; ")) }
    );
    Ok(Body {
        ok,
        figure,
        phases: Vec::new(),
    })
}

fn fmt_s(t: Option<f64>) -> String {
    t.map_or("never".into(), |s| format!("after {s:.2} s"))
}

/// `wgmesh status --output json` as an operator runs it on a node: in its
/// namespace, with the agent's own flags for the node, the API, the device,
/// the cluster CIDRs and BIRD's socket.
fn status_json(ns: &str, agent_argv: &[String]) -> Result<Value> {
    const SHARED: [&str; 7] = [
        "--node-name",
        "--kubeconfig",
        "--interface",
        "--uapi-dir",
        "--cluster-cidrs",
        "--backend",
        "--bgp-socket",
    ];
    let wgmesh = agent_argv
        .first()
        .ok_or_else(|| Error::Other("the agent's command line is empty".into()))?;
    let mut args: Vec<&str> = vec![wgmesh, "status"];
    for pair in agent_argv.windows(2) {
        if SHARED.contains(&pair[0].as_str()) {
            args.extend([pair[0].as_str(), pair[1].as_str()]);
        }
    }
    args.extend(["--output", "json"]);
    let out = sys::netns_exec(ns, &args)?;
    serde_json::from_str(&out)
        .map_err(|e| Error::Other(format!("wgmesh status --output json: {e}: {out}")))
}

/// The fabric namespace, on the underlay bridge.
fn build_fabric(tb: &mut Testbed) -> Result<String> {
    let fabric = format!("{}fabric", tb.state.prefix());
    let u = tb.state.underlay_ns.clone();
    tb.add_netns(&fabric)?;
    tb.record_link(&u, "fabric", "veth", Some((&fabric, "fab0")))?;
    sys::ip(
        &u,
        &[
            "link", "add", "fabric", "type", "veth", "peer", "name", "fab0", "netns", &fabric,
        ],
    )?;
    sys::ip(&u, &["link", "set", "fabric", "master", BRIDGE, "up"])?;
    sys::ip(
        &fabric,
        &["addr", "add", &format!("{FABRIC_ADDR}/24"), "dev", "fab0"],
    )?;
    sys::ip(&fabric, &["link", "set", "fab0", "up"])?;
    // The host behind the router: an address on its loopback (no dummy
    // link type needed from the kernel).
    sys::ip(
        &fabric,
        &["addr", "add", &format!("{SITE_HOST}/32"), "dev", "lo"],
    )?;
    Ok(fabric)
}

/// Which key holds `prefix` on `node`'s device.
fn holder(tb: &Testbed, node: &NodeRecord, prefix: &str) -> Option<String> {
    tb.peers(node)?
        .into_iter()
        .find(|p| p.allowed_ips.iter().any(|a| a == prefix))
        .map(|p| p.public_key_b64())
}

fn learned_annotation(tb: &Testbed, node: &str) -> Option<String> {
    let n = tb
        .api(
            "GET",
            &format!("/api/v1/nodes/{node}"),
            "application/json",
            &Value::Null,
        )
        .ok()?;
    n["metadata"]["annotations"]["wgmesh.dev/learned-prefixes"]
        .as_str()
        .map(str::to_owned)
}
