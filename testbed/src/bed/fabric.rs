//! The `bgp-fabric` drill (real control plane only: the grant is a
//! MeshRoute): route sync's BGP mode end to end. A fabric router (BIRD 2,
//! AS 64600, in `wgtb-<id>-fabric` on the underlay at 192.0.2.250) announces
//! a site prefix behind it (203.0.113.0/24, host 203.0.113.1) and hostile
//! ones: another node's pod CIDR, a /25 inside it, a default route, a prefix
//! no grant allows. Node n1's agent is restarted with `--bgp` (it starts its
//! own BIRD, AS 64512); a MeshRoute lets n1 learn 203.0.113.0/24.
//!
//! Node n3's agent is restarted with `--bgp --bgp-mesh` and no fabric
//! neighbor, n1's with `--bgp-mesh` too: an iBGP session between their pod
//! gateway addresses, inside the tunnel.
//!
//! Asserted, on each side's own state: the fabric's RIB holds n1's pod CIDR
//! with next hop n1; n1 publishes exactly the granted prefix; n3's device has
//! it on n1's peer and nothing hostile anywhere; n3's pod pings the host
//! behind the fabric. The mesh: n3's BIRD has its session with n1
//! Established and holds the prefix with n1's tunnel address as next hop.
//! Then, with the API server stopped (SIGSTOP, so no Node can change), the
//! fabric withdraws the prefix and it leaves n3's device, announces it again
//! and it comes back on n1's peer, and n3's pod pings the host again: only
//! the mesh could have told n3. With the API server back, the fabric
//! withdraws it once more and it leaves n3's device. Printed: the time to
//! each of those. n1's and n3's agents go back to their original commands
//! afterwards (their BIRDs stopped, their tables flushed).

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
    let argv_of = |tb: &Testbed, agent: &str| {
        tb.process(agent)
            .map(|p| p.argv.clone())
            .ok_or_else(|| Error::Other(format!("no process {agent}")))
    };
    let agent = format!("{}-agent", gw.name);
    let original = argv_of(tb, &agent)?;
    let client_agent = format!("{}-agent", client.name);
    let client_original = argv_of(tb, &client_agent)?;
    let dir = tb.state.dir.join("bgp");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
    let fabric = match build_fabric(tb) {
        Ok(f) => f,
        Err(e) => {
            super::topology::delete_netns(&format!("{}fabric", tb.state.prefix()));
            return Err(e);
        }
    };
    let agents = Agents {
        gw: (agent.clone(), original.clone()),
        client: (client_agent.clone(), client_original.clone()),
    };
    let result = run(tb, gw, victim, client, &fabric, &dir, &agents);

    // Whatever happened: n1 and n3 back to their own commands, their BIRDs
    // and tables gone.
    for (name, argv, node) in [
        (agent, original, gw),
        (client_agent, client_original, client),
    ] {
        let _ = tb.restart_with_argv(&name, argv);
        let _ = sys::run(&[
            "birdc",
            "-s",
            &dir.join(format!("{}.ctl", node.name)).display().to_string(),
            "down",
        ]);
        let _ = sys::ip(&node.ns, &["route", "flush", "table", "187"]);
        let _ = sys::ip(&node.ns, &["-6", "route", "flush", "table", "187"]);
    }
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

/// The two agents the drill restarts in BGP mode: (process name, original
/// command line).
struct Agents {
    gw: (String, Vec<String>),
    client: (String, Vec<String>),
}

/// The command line of `node`'s agent in BGP mode, its BIRD's files in `dir`.
fn bgp_argv(
    original: &[String],
    dir: &std::path::Path,
    node: &str,
    extra: &[String],
) -> Vec<String> {
    let mut argv = original.to_vec();
    argv.extend([
        "--bgp".to_string(),
        "--bgp-local-as".into(),
        NODE_AS.to_string(),
    ]);
    argv.extend(extra.iter().cloned());
    for (flag, file) in [
        ("--bgp-config", format!("{node}.conf")),
        ("--bgp-socket", format!("{node}.ctl")),
        ("--bgp-log", format!("{node}-bird.log")),
    ] {
        argv.extend([flag.to_string(), dir.join(file).display().to_string()]);
    }
    argv
}

fn run(
    tb: &mut Testbed,
    gw: &NodeRecord,
    victim: &NodeRecord,
    client: &NodeRecord,
    fabric: &str,
    dir: &std::path::Path,
    agents: &Agents,
) -> Result<Body> {
    let (agent, original) = (&agents.gw.0, &agents.gw.1);
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
    let argv = bgp_argv(
        original,
        dir,
        &gw.name,
        &[
            "--bgp-neighbor".into(),
            format!("{FABRIC_ADDR}={FABRIC_AS}"),
            "--bgp-mesh".into(),
        ],
    );
    let t0 = Instant::now();
    tb.restart_with_argv(agent, argv.clone())?;
    let client_argv = bgp_argv(&agents.client.1, dir, &client.name, &["--bgp-mesh".into()]);
    tb.restart_with_argv(&agents.client.0, client_argv)?;
    println!(
        "  MeshRoute {GRANT}: {} may learn {SITE} (maxLength 24); {agent} restarted with --bgp --bgp-local-as {NODE_AS} --bgp-neighbor {FABRIC_ADDR}={FABRIC_AS} --bgp-mesh, {} with --bgp --bgp-local-as {NODE_AS} --bgp-mesh (no fabric session)",
        gw.name, agents.client.0
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

    // The mesh: n3 hears the prefix from n1 over iBGP inside the tunnel.
    let gw_key = tb.node_public_key(&gw.name);
    let gw_tunnel = gw_cidr
        .parse()
        .ok()
        .and_then(|c| wgmesh::agent::tunnel_addresses(&[c]).into_iter().next())
        .ok_or_else(|| Error::Other(format!("pod CIDR {gw_cidr:?} has no tunnel address")))?;
    let client_ctl = dir.join(format!("{}.ctl", client.name));
    let mesh_up = step(
        &format!(
            "{}'s iBGP session with {} ({gw_tunnel}, inside the tunnel) is Established",
            client.name, gw.name
        ),
        Duration::from_secs(40),
        &mut || {
            birdc(&client_ctl, "show protocols")
                .lines()
                .any(|l| l.trim_start().starts_with("mesh_") && l.contains("Established"))
        },
    );
    let mesh_route = step(
        &format!(
            "{}'s BIRD holds {SITE} from the mesh, next hop {gw_tunnel}",
            client.name
        ),
        Duration::from_secs(20),
        &mut || {
            let r = birdc(&client_ctl, "show route all where proto ~ \"mesh*\"");
            r.contains(SITE) && r.contains(&format!("BGP.next_hop: {gw_tunnel}"))
        },
    );
    if mesh_up.is_none() || mesh_route.is_none() {
        ok = false;
        notes.push("the iBGP mesh did not carry the prefix".into());
    }

    // The API server away: only the mesh can tell n3 what changed.
    let api = super::drill::api_pid(tb)?;
    testkit::process::signal(api, testkit::Signal::STOP);
    let resume = super::drill::Resume(api);
    println!("  API server (pid {api}) stopped (SIGSTOP): no Node can change now");
    let reconfigure = |with_site: bool| -> Result<Instant> {
        std::fs::write(&fabric_conf, announce(with_site))
            .map_err(|e| Error::io(format!("{}", fabric_conf.display()), e))?;
        let t = Instant::now();
        birdc(&fabric_ctl, "configure");
        Ok(t)
    };
    let t_out = reconfigure(false)?;
    let out_gone = step(
        &format!(
            "API server stopped, withdrawn at the fabric: {SITE} gone from {}'s device",
            client.name
        ),
        Duration::from_secs(30),
        &mut || holder(tb, client, SITE).is_none(),
    )
    .map(|_| t_out.elapsed().as_secs_f64());
    let t_back = reconfigure(true)?;
    let out_back = step(
        &format!(
            "API server stopped, announced again: {SITE} back on {}'s peer at {}",
            gw.name, client.name
        ),
        Duration::from_secs(30),
        &mut || gw_key.is_some() && holder(tb, client, SITE) == gw_key,
    )
    .map(|_| t_back.elapsed().as_secs_f64());
    let out_ping =
        super::traffic::ping_until(&client.pods[0].ns, SITE_HOST, Duration::from_secs(10));
    match out_ping {
        Some(secs) => println!(
            "  ping {} -> {SITE_HOST} with the API server stopped: answered after {secs:.2} s",
            client.pods[0].name
        ),
        None => println!(
            "  FAILED: ping {} -> {SITE_HOST} with the API server stopped",
            client.pods[0].name
        ),
    }
    drop(resume);
    println!("  API server continued (SIGCONT)");
    if out_gone.is_none() || out_back.is_none() || out_ping.is_none() {
        ok = false;
        notes.push("routing did not follow the fabric while the API server was away".into());
    }

    // Withdraw at the fabric.
    let t_withdraw = reconfigure(false)?;
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
    let secs = |t: Option<f64>| t.map_or("never".into(), |s| format!("{s:.2} s"));
    let figure = format!(
        "session up {}, {gw_cidr} in the fabric's RIB {}, {SITE} on {}'s peer at {} {}, withdrawn from it {} after the fabric's withdraw; 4 hostile announcements refused; iBGP mesh session up {}; with the API server stopped a withdraw reached {}'s device in {} and a new announcement in {}{}",
        fmt_s(established),
        fmt_s(in_rib),
        gw.name,
        client.name,
        fmt_s(on_peer),
        secs(withdraw_s),
        fmt_s(mesh_up),
        client.name,
        secs(out_gone),
        secs(out_back),
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
