//! `drill`: fault drills, each with the underlay capture on, each printing its figure
//! and PASS/FAIL. A drill passes only when its own criterion holds, the capture saw
//! no plaintext during it, the capture is complete (tcpdump dropped nothing), and the
//! mesh is whole again afterwards. A drill that cannot run fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::capture::Capture;
use super::check::{self, Outcome};
use super::state::{NodeBackend, NodeRecord};
use super::sys;
use super::topology::{unix_now, NodeOptions, Testbed, RESYNC_SECONDS, WG_PORT};
use super::traffic::{self, FlowResult, FlowSpec, Flows, Probe};
use super::{Error, Result};

/// Every drill, in the order `drill` runs them.
pub const DRILLS: &[(&str, &str)] = &[
    (
        "bad-annotations",
        "a Node per kind of value the codec rejects: no peer, one Warning Event per agent, rest of the mesh untouched",
    ),
    (
        "agent-kill",
        "SIGKILL a node's agent under 1,000 pps pod traffic (divided by the time scale), restart it: no loss",
    ),
    (
        "dataplane-restart",
        "SIGKILL a node's dataplane, restart it (a kernel node: delete its WireGuard link, the agent re-creates it): traffic dropped (not leaked) meanwhile, back within seconds",
    ),
    (
        "revoke",
        "`wgmesh keys revoke` on a running node: the old key leaves every device within seconds",
    ),
    (
        "boot-without-dataplane",
        "a new (userspace) node's agent runs before its dataplane: its pods' traffic is dropped, not leaked; then it converges",
    ),
    (
        "api-outage",
        "the API server stopped for 60 s: traffic keeps flowing; afterwards a new node converges",
    ),
    (
        "cidr-overlap",
        "newer Nodes claiming pod CIDRs that overlap an older node's: no peer anywhere, one Warning Event per agent, the older node keeps its peers and traffic",
    ),
    (
        HOSTILE_TOKEN,
        "(real control plane only) one node's agent token used against another: every request outside the policy refused, its own claims of the other's CIDR and key ignored by every peer, no loss",
    ),
    (
        GATEWAY_FAILOVER,
        "(real control plane only) a site subnet behind two gateway nodes (MeshRoute): the active gateway dies, the prefix moves to the other one and back after the failback time; hostile grants change no device",
    ),
    (
        BGP_FABRIC,
        "(real control plane only) node n1 in BGP mode with a fabric router (BIRD): its pod CIDR in the fabric's RIB, the granted site prefix on n1's peer everywhere and reachable from a pod, 4 hostile announcements refused, a withdraw leaves every device",
    ),
];

/// The drill that needs a real control plane (the in-memory API enforces no
/// RBAC or admission policy): left out of a full run on the embedded API, with a
/// line saying so; asked for by name there, it fails.
pub const HOSTILE_TOKEN: &str = "hostile-token";
/// Also real control plane only: the in-memory API serves no MeshRoute.
pub const GATEWAY_FAILOVER: &str = "gateway-failover";
pub const BGP_FABRIC: &str = "bgp-fabric";
/// The drills a full run leaves out on the embedded API.
const REAL_ONLY: &[&str] = &[HOSTILE_TOKEN, GATEWAY_FAILOVER, BGP_FABRIC];

/// Traffic of the agent-kill drill: two flows of 500 datagrams a second.
pub const AGENT_KILL_PPS: u32 = 500;
/// A dataplane restart must be repaired within this (link and socket events, not
/// the resync timer, whose period is [`RESYNC_SECONDS`]), times [`time_scale`].
const DATAPLANE_RECOVERY_BASE_S: f64 = 5.0;
/// A key revoked on a running node must leave every device within this.
const REVOKE_BASE_S: f64 = 10.0;
/// A node added after a fault must be a peer everywhere within this.
const CONVERGE_BASE_S: f64 = 15.0;
fn scaled(base: f64) -> f64 {
    base * time_scale().unwrap_or(1.0)
}

/// A drill's traffic rate on this machine: `base` datagrams a second divided
/// by [`time_scale`] (a machine that runs the testbed N times slower gets
/// 1/N of the traffic, so its receivers and tcpdump keep up), at least 10.
/// Every drill prints the rate it used.
pub fn drill_pps(base: u32) -> u32 {
    ((f64::from(base) / time_scale().unwrap_or(1.0)).ceil() as u32).max(10)
}

pub use super::topology::{time_scale, TIME_SCALE_ENV};

pub fn dataplane_recovery_max_s() -> f64 {
    scaled(DATAPLANE_RECOVERY_BASE_S)
}
pub fn revoke_max_s() -> f64 {
    scaled(REVOKE_BASE_S)
}
pub fn converge_max_s() -> f64 {
    scaled(CONVERGE_BASE_S)
}
/// How long the API server is stopped.
pub const API_OUTAGE_S: u64 = 60;

/// A drill's outcome.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: &'static str,
    pub ok: bool,
    pub figure: String,
    pub plaintext: u64,
    pub secs: f64,
}

/// What a drill's body found.
pub(super) struct Body {
    pub ok: bool,
    pub figure: String,
    /// Named windows (Unix seconds) whose plaintext is printed on its own.
    pub phases: Vec<(String, f64, f64)>,
}

/// Parses `--only a,b`; `None` runs every drill (but [`HOSTILE_TOKEN`] only on a
/// real control plane, `real`).
pub fn select(only: Option<&str>, real: bool) -> Result<Vec<&'static str>> {
    let Some(only) = only else {
        if !real {
            println!(
                "(drills {} not run: they need `up --control-plane real`; \
                 the in-memory API enforces no RBAC or admission policy and serves no MeshRoute)",
                REAL_ONLY.join(", ")
            );
        }
        return Ok(DRILLS
            .iter()
            .map(|d| d.0)
            .filter(|d| real || !REAL_ONLY.contains(d))
            .collect());
    };
    let mut out = Vec::new();
    for name in only.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match DRILLS.iter().find(|d| d.0 == name) {
            Some(d) => out.push(d.0),
            None => {
                return Err(Error::Other(format!(
                    "no drill {name:?}; drills: {}",
                    DRILLS.iter().map(|d| d.0).collect::<Vec<_>>().join(", ")
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Other("--only names no drill".into()));
    }
    Ok(out)
}

/// Runs the drills, printing as it goes; returns one report per drill.
pub fn run(tb: &mut Testbed, names: &[&'static str]) -> Result<Vec<Report>> {
    let scale = time_scale()?;
    if scale != 1.0 {
        println!(
            "time limits x{scale} ({TIME_SCALE_ENV}): recovery {:.1} s, revoke {:.1} s, convergence {:.1} s; \
             traffic rates divided by {scale} (agent-kill {} pps a flow)",
            dataplane_recovery_max_s(),
            revoke_max_s(),
            converge_max_s(),
            drill_pps(AGENT_KILL_PPS)
        );
    }
    println!(
        "== drills on testbed {} ({} nodes; host encryption {}): {}",
        tb.state.id,
        tb.state.nodes.len(),
        if tb.state.encrypt_host_traffic {
            "on"
        } else {
            "off"
        },
        names.join(", ")
    );
    let t = Instant::now();
    if let Err(e) = tb.wait_mesh(Duration::from_secs(60)) {
        println!("the mesh is not whole before the drills: {e}");
    }
    println!("full mesh after {:.2} s", t.elapsed().as_secs_f64());
    let mut reports = Vec::new();
    for &name in names {
        if sys::interrupted() {
            return Err(Error::Interrupted);
        }
        let what = DRILLS
            .iter()
            .find(|d| d.0 == name)
            .map(|d| d.1)
            .unwrap_or("");
        println!("\n== drill {name}: {what}");
        warm_sessions(tb)?;
        let r = run_one(tb, name)?;
        println!(
            "{} drill {name}: {} (plaintext {}; {:.1} s)",
            if r.ok { "PASS" } else { "FAIL" },
            r.figure,
            r.plaintext,
            r.secs
        );
        reports.push(r);
    }
    Ok(reports)
}

/// Gives every pair of nodes a fresh WireGuard session, one side initiating,
/// before a drill starts its traffic. After three idle minutes a session has
/// expired (WireGuard's REJECT_AFTER_TIME, 180 s); when traffic then starts
/// both ways at once, both ends initiate, the handshakes cross, and kernel
/// WireGuard resolves that only by retrying after REKEY_TIMEOUT (5 s) — a
/// cold start of the protocol, not the fault a drill is about. Prints any
/// pair that needed more than a second.
fn warm_sessions(tb: &Testbed) -> Result<()> {
    let nodes: Vec<&NodeRecord> = tb
        .state
        .nodes
        .iter()
        .filter(|n| !n.pods.is_empty())
        .collect();
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            let Some(target) = b.pods[0].ips.first() else {
                continue;
            };
            match traffic::ping_until(&a.pods[0].ns, &target.to_string(), Duration::from_secs(15)) {
                Some(s) if s > 1.0 => println!(
                    "  warm-up: {} -> {} answered after {s:.1} s (a new session)",
                    a.pods[0].name, b.pods[0].name
                ),
                Some(_) => {}
                None => println!(
                    "  warm-up: {} -> {} did not answer within 15 s",
                    a.pods[0].name, b.pods[0].name
                ),
            }
            if sys::interrupted() {
                return Err(Error::Interrupted);
            }
        }
    }
    Ok(())
}

fn run_one(tb: &mut Testbed, name: &'static str) -> Result<Report> {
    let started = Instant::now();
    let capture = Capture::start(tb, &format!("drill-{name}"))?;
    let t0 = unix_now();
    let body = match name {
        "agent-kill" => agent_kill(tb),
        "dataplane-restart" => dataplane_restart(tb),
        "api-outage" => api_outage(tb),
        "boot-without-dataplane" => boot_without_dataplane(tb),
        "revoke" => revoke(tb),
        "bad-annotations" => bad_annotations(tb),
        "cidr-overlap" => cidr_overlap(tb),
        HOSTILE_TOKEN => super::hostile::hostile_token(tb),
        GATEWAY_FAILOVER => super::gateway::gateway_failover(tb),
        BGP_FABRIC => super::fabric::bgp_fabric(tb),
        _ => Err(Error::Other(format!("no drill {name}"))),
    };
    let t1 = unix_now();
    let captured = capture.stop(tb)?;
    let body = match body {
        Ok(b) => b,
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        Err(e) => Body {
            ok: false,
            figure: format!("could not run: {e}"),
            phases: Vec::new(),
        },
    };
    for (label, from, to) in &body.phases {
        let c = captured.counts(Some((*from, *to)));
        println!("  capture, {label} ({:.1} s): {}", to - from, c.summary());
    }
    let all = captured.counts(Some((t0, t1 + 1.0)));
    println!(
        "  capture, whole drill: {}; {} ({})",
        all.summary(),
        captured.completeness(),
        captured.file.display()
    );
    for l in &all.plaintext_sample {
        println!("    plaintext: {l}");
    }
    // Whatever happened, leave a whole mesh for the next drill.
    let whole = restore(tb);
    let mut ok = body.ok && all.plaintext() == 0 && captured.complete();
    let mut figure = body.figure;
    if let Err(e) = whole {
        ok = false;
        figure.push_str(&format!("; the mesh was not whole afterwards: {e}"));
    }
    Ok(Report {
        name,
        ok,
        figure,
        plaintext: all.plaintext(),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// Restarts any agent or dataplane of a recorded node that is not running (a
/// kernel node has no dataplane process), then waits until every device has
/// exactly the published keys of the other nodes.
fn restore(tb: &mut Testbed) -> Result<()> {
    let names: Vec<String> = tb
        .state
        .nodes
        .iter()
        .flat_map(|n| [format!("{}-dataplane", n.name), format!("{}-agent", n.name)])
        .filter(|p| tb.process(p).is_some())
        .collect();
    for p in names {
        if !tb.process_alive(&p) {
            println!("  restore: {p} is not running; starting it");
            tb.restart_process(&p)?;
        }
    }
    let t = Instant::now();
    let deadline = t + Duration::from_secs(60);
    loop {
        match mesh_consistent(tb) {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() > deadline => {
                return Err(Error::Other(format!("after 60 s: {why}")))
            }
            Err(_) => sys::sleep(Duration::from_millis(100))?,
        }
    }
}

/// Every node's device has the node's published key and exactly one peer per other
/// node, with that node's published key. `Err` says what differs.
pub fn mesh_consistent(tb: &Testbed) -> std::result::Result<(), String> {
    let keys = published_keys(tb).map_err(|e| e.to_string())?;
    for n in &tb.state.nodes {
        let Some(want_own) = keys.get(&n.name) else {
            return Err(format!("{} has no published key", n.name));
        };
        let Some(dev) = tb.device(n) else {
            return Err(format!("{}'s device does not answer", n.name));
        };
        if dev.public_key.as_ref() != Some(want_own) {
            return Err(format!(
                "{}'s device has key {:?}, its Node {want_own}",
                n.name, dev.public_key
            ));
        }
        let have: BTreeSet<String> = dev.peers.iter().map(|p| p.public_key_b64()).collect();
        let want: BTreeSet<String> = tb
            .state
            .nodes
            .iter()
            .filter(|o| o.name != n.name)
            .filter_map(|o| keys.get(&o.name).cloned())
            .collect();
        if have != want {
            return Err(format!(
                "{}'s device has {} peer(s), {} of them the other nodes' published keys ({} wanted)",
                n.name,
                have.len(),
                have.intersection(&want).count(),
                want.len()
            ));
        }
    }
    Ok(())
}

/// Each recorded node's `wgmesh.dev/public-key`.
fn published_keys(tb: &Testbed) -> Result<BTreeMap<String, String>> {
    let list = tb.api("GET", "/api/v1/nodes", "application/json", &Value::Null)?;
    let mut out = BTreeMap::new();
    for n in list["items"].as_array().cloned().unwrap_or_default() {
        let name = n["metadata"]["name"].as_str().unwrap_or("").to_string();
        if let Some(k) = n["metadata"]["annotations"]["wgmesh.dev/public-key"].as_str() {
            out.insert(name, k.to_string());
        }
    }
    Ok(out)
}

/// Every device's peer keys, by node.
fn peer_sets(tb: &Testbed) -> BTreeMap<String, Option<BTreeSet<String>>> {
    tb.state
        .nodes
        .iter()
        .map(|n| {
            let set = tb
                .peers(n)
                .map(|ps| ps.iter().map(|p| p.public_key_b64()).collect());
            (n.name.clone(), set)
        })
        .collect()
}

/// The drill's target node (the second, so the first stays the "older" node) and a
/// peer node, both with a pod.
pub(super) fn pair(tb: &Testbed) -> Result<(NodeRecord, NodeRecord)> {
    let with_pods: Vec<&NodeRecord> = tb
        .state
        .nodes
        .iter()
        .filter(|n| !n.pods.is_empty())
        .collect();
    if with_pods.len() < 2 {
        return Err(Error::Other(
            "drills need at least 2 nodes with a pod each (up --nodes 2 --pods 1)".into(),
        ));
    }
    Ok((with_pods[1].clone(), with_pods[0].clone()))
}

fn v4_of(addrs: &[std::net::IpAddr]) -> Result<std::net::IpAddr> {
    addrs
        .iter()
        .copied()
        .find(|a| a.is_ipv4())
        .ok_or_else(|| Error::Other("no IPv4 address".into()))
}

/// Two flows between a pod on `x` and a pod on `y`, `pps` each way.
pub(super) fn pod_flows(
    x: &NodeRecord,
    y: &NodeRecord,
    pps: u32,
    secs: f64,
    port: u16,
) -> Result<Vec<FlowSpec>> {
    let (a, b) = (&x.pods[0], &y.pods[0]);
    let (ia, ib) = (v4_of(&a.ips)?, v4_of(&b.ips)?);
    Ok(vec![
        FlowSpec {
            label: format!("{} -> {}", a.name, b.name),
            from_ns: a.ns.clone(),
            to_ns: b.ns.clone(),
            to: SocketAddr::new(ib, port),
            pps,
            duration: Duration::from_secs_f64(secs),
        },
        FlowSpec {
            label: format!("{} -> {}", b.name, a.name),
            from_ns: b.ns.clone(),
            to_ns: a.ns.clone(),
            to: SocketAddr::new(ia, port + 1),
            pps,
            duration: Duration::from_secs_f64(secs),
        },
    ])
}

pub(super) fn print_flows(results: &[FlowResult]) {
    for r in results {
        println!("  {}", r.summary());
    }
}

fn at(t0: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(t0).as_secs_f64()
}

/// Unix seconds of an `Instant` (for capture windows).
pub(super) fn unix_of(t: Instant) -> f64 {
    let now = Instant::now();
    if t <= now {
        unix_now() - (now - t).as_secs_f64()
    } else {
        unix_now() + (t - now).as_secs_f64()
    }
}

// ---- agent-kill ----------------------------------------------------------------------

fn agent_kill(tb: &mut Testbed) -> Result<Body> {
    let (x, y) = pair(tb)?;
    let agent = format!("{}-agent", x.name);
    let secs = 10.0;
    let pps = drill_pps(AGENT_KILL_PPS);
    let flows = Flows::start(pod_flows(&x, &y, pps, secs, 41000)?)?;
    let t0 = flows.started;
    sys::sleep(Duration::from_secs(2))?;
    let t_kill = Instant::now();
    if !tb.signal_process(&agent, testkit::Signal::KILL)? {
        return Err(Error::Other(format!("{agent} was not running")));
    }
    println!("  {:.2} s: SIGKILL {agent}", at(t0, t_kill));
    sys::sleep(Duration::from_secs(2))?;
    let t_restart = Instant::now();
    let pid = tb.restart_process(&agent)?;
    println!(
        "  {:.2} s: {agent} restarted as it was started (pid {pid})",
        at(t0, t_restart)
    );
    let results = flows.finish(Duration::from_secs(1));
    print_flows(&results);
    let sent: u64 = results.iter().map(|r| r.sent.len() as u64).sum();
    let lost: u64 = results.iter().map(FlowResult::lost).sum();
    let outage = results
        .iter()
        .map(FlowResult::longest_outage)
        .max()
        .unwrap_or_default();
    let alive = tb.process_alive(&agent);
    println!(
        "  {agent} {} after the flows",
        if alive { "runs" } else { "is NOT running" }
    );
    Ok(Body {
        ok: sent > 0 && lost == 0 && alive,
        figure: format!(
            "lost {lost} of {sent} datagrams ({:.2} %) at {} pps while {agent} was killed and restarted; longest outage {:.0} ms",
            if sent == 0 { 0.0 } else { 100.0 * lost as f64 / sent as f64 },
            2 * pps,
            outage.as_secs_f64() * 1000.0
        ),
        phases: vec![(
            "agent dead".into(),
            unix_of(t_kill),
            unix_of(t_restart),
        )],
    })
}

// ---- dataplane-restart ---------------------------------------------------------------

fn dataplane_restart(tb: &mut Testbed) -> Result<Body> {
    let (x, y) = pair(tb)?;
    if x.backend == NodeBackend::Kernel {
        return kernel_link_delete(tb, &x, &y);
    }
    let dp = format!("{}-dataplane", x.name);
    let secs = restart_flow_secs()?;
    let flows = Flows::start(pod_flows(&x, &y, drill_pps(200), secs, 42000)?)?;
    let t0 = flows.started;
    sys::sleep(Duration::from_secs(2))?;
    let t_kill = Instant::now();
    if !tb.signal_process(&dp, testkit::Signal::KILL)? {
        return Err(Error::Other(format!("{dp} was not running")));
    }
    println!("  {:.2} s: SIGKILL {dp}", at(t0, t_kill));
    // The gap: no device at all; traffic through the node must be dropped.
    sys::sleep(Duration::from_secs(1))?;
    let t_restart = Instant::now();
    tb.restart_process(&dp)?;
    let sock = tb.sock(&x);
    let answered = tb
        .wait_for(
            &format!("{dp}'s UAPI socket"),
            Duration::from_secs(10),
            || sys::uapi_peers(&sock).is_some(),
        )
        .map(|_| Instant::now());
    println!(
        "  {:.2} s: {dp} restarted; its UAPI socket answered {}",
        at(t0, t_restart),
        match &answered {
            Ok(t) => format!("{:.2} s later", at(t_restart, *t)),
            Err(e) => format!("never: {e}"),
        }
    );
    let results = flows.finish(Duration::from_secs(1));
    let back = flowing_again(&results, t_kill, t_restart, "the dataplane was dead");
    let recovery = back.map(|b| at(t_restart, b));
    let ok = recovery.is_some_and(|s| s <= dataplane_recovery_max_s());
    let end = back.unwrap_or_else(Instant::now);
    Ok(Body {
        ok,
        figure: match recovery {
            Some(s) => format!(
                "pod traffic through {} flowed both ways again {s:.2} s after the dataplane restarted (limit {:.1} s)",
                x.name,
                dataplane_recovery_max_s()
            ),
            None => format!(
                "pod traffic through {} did not flow both ways again within {:.0} s of the restart",
                x.name,
                secs - at(t0, t_restart)
            ),
        },
        phases: vec![
            ("dataplane dead".into(), unix_of(t_kill), unix_of(t_restart)),
            ("restart until traffic flowed".into(), unix_of(t_restart), unix_of(end)),
        ],
    })
}

/// How long dataplane-restart's flows run: 16 s, times the time scale, so a
/// recovery within the (scaled) limit is always seen.
fn restart_flow_secs() -> Result<f64> {
    Ok(16.0 * time_scale()?)
}

/// Prints the flows and, per flow, what was delivered of what was sent between
/// `dead` and `back` (while `what`); returns when every flow had delivered a
/// datagram sent after `back` (`None`: some flow never did).
fn flowing_again(
    results: &[FlowResult],
    dead: Instant,
    back: Instant,
    what: &str,
) -> Option<Instant> {
    print_flows(results);
    let mut flowing = Some(back);
    for r in results {
        let (got, sent) = r.delivered_between(dead, back);
        println!(
            "  {}: {got} of {sent} datagrams sent while {what} arrived",
            r.label
        );
        flowing = match (flowing, r.first_arrival_sent_after(back)) {
            (Some(b), Some(t)) => Some(b.max(t)),
            _ => None,
        };
    }
    flowing
}

/// `dataplane-restart` on a kernel node, which has no dataplane process: its
/// WireGuard link is deleted (what a crashed module reload or an operator's
/// `ip link del` does); the agent must notice and re-create and re-program it,
/// and the node's pod traffic must be dropped, not leaked, meanwhile.
fn kernel_link_delete(tb: &mut Testbed, x: &NodeRecord, y: &NodeRecord) -> Result<Body> {
    let flows = Flows::start(pod_flows(
        x,
        y,
        drill_pps(200),
        restart_flow_secs()?,
        42000,
    )?)?;
    let t0 = flows.started;
    sys::sleep(Duration::from_secs(2))?;
    let t_kill = Instant::now();
    sys::ip(&x.ns, &["link", "del", &x.iface])?;
    println!(
        "  {:.2} s: deleted {}'s kernel link {}",
        at(t0, t_kill),
        x.name,
        x.iface
    );
    let want = tb.state.nodes.len().saturating_sub(1);
    let back = tb
        .wait_for(
            &format!(
                "{}'s agent to re-create {} with every peer",
                x.name, x.iface
            ),
            Duration::from_secs(10),
            || tb.peers(x).is_some_and(|p| p.len() == want),
        )
        .map(|_| Instant::now());
    let t_back = *back.as_ref().unwrap_or(&Instant::now());
    println!(
        "  {}",
        match &back {
            Ok(t) => format!(
                "{:.2} s: {} is back with {want} peer(s), {:.2} s after the delete",
                at(t0, *t),
                x.iface,
                at(t_kill, *t)
            ),
            Err(e) => format!("{} not back: {e}", x.iface),
        }
    );
    let results = flows.finish(Duration::from_secs(1));
    let flowing = flowing_again(&results, t_kill, t_back, "the link was gone");
    let recovery = flowing.map(|b| at(t_kill, b));
    let ok = back.is_ok() && recovery.is_some_and(|s| s <= dataplane_recovery_max_s());
    let end = flowing.unwrap_or_else(Instant::now);
    Ok(Body {
        ok,
        figure: match recovery {
            Some(s) => format!(
                "kernel node {}: pod traffic flowed both ways again {s:.2} s after its link was deleted (limit {:.1} s)",
                x.name,
                dataplane_recovery_max_s()
            ),
            None => format!(
                "kernel node {}: pod traffic did not flow both ways again after its link was deleted",
                x.name
            ),
        },
        phases: vec![
            ("link gone".into(), unix_of(t_kill), unix_of(t_back)),
            ("link back until traffic flowed".into(), unix_of(t_back), unix_of(end)),
        ],
    })
}

// ---- api-outage ----------------------------------------------------------------------

/// SIGCONTs the API server when dropped, so no path leaves it stopped.
pub(super) struct Resume(pub(super) u32);

/// The running API server's pid.
pub(super) fn api_pid(tb: &Testbed) -> Result<u32> {
    tb.process("api")
        .and_then(|p| {
            p.pid
                .filter(|&pid| testkit::process::alive(pid, p.start_time))
        })
        .ok_or_else(|| Error::Other("the API server is not running".into()))
}

impl Drop for Resume {
    fn drop(&mut self) {
        testkit::process::signal(self.0, testkit::Signal::CONT);
    }
}

fn api_outage(tb: &mut Testbed) -> Result<Body> {
    // The testbed API keeps its objects in memory: a restart would lose every Node,
    // so the outage is SIGSTOP / SIGCONT (connections hang, as with a partitioned or
    // overloaded control plane).
    let api = api_pid(tb)?;
    let nodes: Vec<NodeRecord> = tb
        .state
        .nodes
        .iter()
        .filter(|n| !n.pods.is_empty())
        .cloned()
        .collect();
    if nodes.len() < 2 {
        return Err(Error::Other("api-outage needs 2 nodes with a pod".into()));
    }
    // A ring of flows: each node's first pod to the next node's, 1,000 pps in
    // all (divided by the time scale).
    let pps = drill_pps((1000 / nodes.len() as u32).max(20));
    let secs = API_OUTAGE_S as f64 + 6.0;
    let mut specs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let m = &nodes[(i + 1) % nodes.len()];
        let (a, b) = (&n.pods[0], &m.pods[0]);
        specs.push(FlowSpec {
            label: format!("{} -> {}", a.name, b.name),
            from_ns: a.ns.clone(),
            to_ns: b.ns.clone(),
            to: SocketAddr::new(v4_of(&b.ips)?, 43000 + i as u16),
            pps,
            duration: Duration::from_secs_f64(secs),
        });
    }
    let flows = Flows::start(specs)?;
    let t0 = flows.started;
    sys::sleep(Duration::from_secs(2))?;
    let t_stop = Instant::now();
    testkit::process::signal(api, testkit::Signal::STOP);
    let resume = Resume(api);
    println!(
        "  {:.2} s: API server (pid {api}) stopped (SIGSTOP) for {API_OUTAGE_S} s; {} flows of {pps} pps around the ring",
        at(t0, t_stop),
        nodes.len()
    );
    let slept = sys::sleep(Duration::from_secs(API_OUTAGE_S));
    let t_cont = Instant::now();
    drop(resume);
    slept?;
    println!("  {:.2} s: API server continued (SIGCONT)", at(t0, t_cont));
    let results = flows.finish(Duration::from_secs(1));
    print_flows(&results);
    let (mut got, mut sent) = (0, 0);
    for r in &results {
        let (g, s) = r.delivered_between(t_stop, t_cont);
        got += g;
        sent += s;
    }
    let lost = sent - got;
    println!("  during the outage: {got} of {sent} datagrams arrived ({lost} lost)");
    let dead: Vec<String> = tb
        .state
        .processes
        .iter()
        .filter(|p| p.name.ends_with("-agent") || p.name.ends_with("-dataplane"))
        .filter(|p| {
            !p.pid
                .is_some_and(|pid| testkit::process::alive(pid, p.start_time))
        })
        .map(|p| p.name.clone())
        .collect();
    if !dead.is_empty() {
        println!("  not running after the outage: {}", dead.join(", "));
    }
    println!("  adding a node now that the API is back");
    let t_add = Instant::now();
    let conv = check::convergence(tb, 1);
    let t_end = Instant::now();
    let (conv_ok, conv_text) = match &conv {
        Ok(c) => {
            let total = c.publish_s + c.add_s;
            println!(
                "  {}: set up in {:.2} s, key on its Node {:.2} s after its agent started, a peer everywhere {:.2} s after that; removed in {:.2} s",
                c.node, c.setup_s, c.publish_s, c.add_s, c.remove_s
            );
            (
                total <= converge_max_s(),
                format!(
                    "a node added {:.1} s after the API returned converged {total:.2} s after its agent started ({:.2} s from add-node; limit {:.1} s)",
                    at(t_cont, t_add),
                    total + c.setup_s,
                    converge_max_s()
                ),
            )
        }
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        Err(e) => (false, format!("a new node did not converge: {e}")),
    };
    Ok(Body {
        ok: sent > 0 && lost == 0 && conv_ok && dead.is_empty(),
        figure: format!(
            "{lost} of {sent} datagrams lost during {API_OUTAGE_S} s without the API; {conv_text}"
        ),
        phases: vec![
            ("API stopped".into(), unix_of(t_stop), unix_of(t_cont)),
            ("API back, new node".into(), unix_of(t_cont), unix_of(t_end)),
        ],
    })
}

// ---- boot-without-dataplane ----------------------------------------------------------

fn boot_without_dataplane(tb: &mut Testbed) -> Result<Body> {
    let (_, y) = pair(tb)?;
    let expected = format!("n{}", tb.state.next_node);
    // Userspace whatever the testbed's backend: only a userspace node has a
    // device process that can start after its agent.
    let name = match tb.add_node_with(NodeOptions {
        pods: 1,
        dataplane: false,
        backend: Some(NodeBackend::Uapi),
    }) {
        Ok(n) => n,
        Err(e) => {
            // Remove whatever part of it was built.
            let _ = tb.delete_node_object(&expected);
            if tb.state.node(&expected).is_some() {
                let _ = tb.destroy_node(&expected);
            }
            return Err(e);
        }
    };
    let result = boot_body(tb, &name, &y);
    // Always remove the extra node.
    let _ = tb.delete_node_object(&name);
    let removed = tb.destroy_node(&name);
    let body = result?;
    removed?;
    Ok(body)
}

fn boot_body(tb: &mut Testbed, name: &str, y: &NodeRecord) -> Result<Body> {
    let n = tb
        .state
        .node(name)
        .cloned()
        .ok_or_else(|| Error::Other(format!("{name} vanished")))?;
    let t_agent = Instant::now();
    // The agent writes its blackhole backstops first of all, before it talks to
    // the API or looks for a device (in a cluster the DaemonSet's init container
    // has written them before any pod runs): traffic starts once they are there,
    // however long the agent takes to start (seconds on an emulated VM).
    let backstops: Vec<String> = tb
        .state
        .cluster_cidrs
        .iter()
        .map(|c| format!("blackhole {c}"))
        .collect();
    tb.wait_for(
        &format!("{name}'s agent to write its blackhole backstops"),
        Duration::from_secs(30),
        || {
            let v4 = sys::ip(&n.ns, &["route", "show", "proto", "87"]).unwrap_or_default();
            let v6 = sys::ip(&n.ns, &["-6", "route", "show", "proto", "87"]).unwrap_or_default();
            backstops
                .iter()
                .all(|b| v4.contains(b.as_str()) || v6.contains(b.as_str()))
        },
    )?;
    println!(
        "  {name}: its agent wrote the backstops {:.2} s after it started",
        t_agent.elapsed().as_secs_f64()
    );
    // Then give it time to do whatever else it does without a device.
    sys::sleep(Duration::from_secs(2))?;
    let p = &n.pods[0];
    let b = &y.pods[0];
    let y_addr = v4_of(&y.underlay)?.to_string();
    let b_addr = v4_of(&b.ips)?.to_string();
    println!(
        "  {name}: agent running, no dataplane; {} sends to {} ({b_addr}) and {} ({y_addr}), {name} to {b_addr}",
        p.name, b.name, y.name
    );
    let t_a = Instant::now();
    let y_ip = v4_of(&y.underlay)?;
    let flows = Flows::start(
        vec![
            FlowSpec {
                label: format!("{} -> {}", p.name, b.name),
                from_ns: p.ns.clone(),
                to_ns: b.ns.clone(),
                to: SocketAddr::new(v4_of(&b.ips)?, 44000),
                pps: drill_pps(200),
                duration: Duration::from_secs(6),
            },
            FlowSpec {
                label: format!("{} -> {} (node address)", p.name, y.name),
                from_ns: p.ns.clone(),
                to_ns: y.ns.clone(),
                to: SocketAddr::new(v4_of(&y.underlay)?, 44001),
                pps: drill_pps(200),
                duration: Duration::from_secs(6),
            },
            FlowSpec {
                label: format!("{} (host) -> {}", name, b.name),
                from_ns: n.ns.clone(),
                to_ns: b.ns.clone(),
                to: SocketAddr::new(v4_of(&b.ips)?, 44002),
                pps: drill_pps(200),
                duration: Duration::from_secs(6),
            },
        ]
        .into_iter()
        .chain(tb.state.encrypt_host_traffic.then(|| FlowSpec {
            label: format!("{} (host) -> {} (host, host encryption on)", name, y.name),
            from_ns: n.ns.clone(),
            to_ns: y.ns.clone(),
            to: SocketAddr::new(y_ip, 44003),
            pps: drill_pps(200),
            duration: Duration::from_secs(6),
        }))
        .collect(),
    )?;
    let pings = [
        (p.ns.clone(), b_addr.clone()),
        (p.ns.clone(), y_addr.clone()),
        (n.ns.clone(), b_addr.clone()),
    ];
    let answered: Vec<bool> = pings
        .iter()
        .map(|(ns, t)| {
            let (ns, t) = (ns.clone(), t.clone());
            std::thread::spawn(move || {
                sys::netns_exec(
                    &ns,
                    &["ping", "-n", "-q", "-c", "10", "-i", "0.3", "-W", "1", &t],
                )
                .is_ok()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .collect();
    let results = flows.finish(Duration::from_millis(500));
    let t_b = Instant::now();
    print_flows(&results);
    let delivered: u64 = results.iter().map(FlowResult::received_count).sum();
    println!(
        "  while {name} had no dataplane: {delivered} datagram(s) delivered, pings answered: {}",
        pings
            .iter()
            .zip(&answered)
            .map(|((_, t), a)| format!("{t} {}", if *a { "yes" } else { "no" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let routes = sys::ip(&n.ns, &["route", "show", "table", "all"]).unwrap_or_default();
    println!("  {name}'s routes without a device:");
    for l in routes.lines().filter(|l| !l.contains("table local")) {
        println!("    {l}");
    }
    let t_start = Instant::now();
    tb.restart_process(&format!("{name}-dataplane"))?;
    println!(
        "  {:.2} s after its agent: {name}-dataplane started",
        at(t_agent, t_start)
    );
    let deadline = t_start + Duration::from_secs(30);
    let mut converged = None;
    while Instant::now() < deadline {
        if mesh_consistent(tb).is_ok() && traffic::ping(&p.ns, &b_addr).is_some() {
            converged = Some(at(t_start, Instant::now()));
            break;
        }
        sys::sleep(Duration::from_millis(100))?;
    }
    let t_end = Instant::now();
    let ok = converged.is_some_and(|s| s <= converge_max_s()) && delivered == 0;
    Ok(Body {
        ok,
        figure: match converged {
            Some(s) => format!(
                "{delivered} datagram(s) got through before the dataplane; it converged {s:.2} s after its dataplane started (limit {:.1} s)",
                converge_max_s()
            ),
            None => format!(
                "{delivered} datagram(s) got through before the dataplane; not converged 30 s after its dataplane started: {}",
                mesh_consistent(tb).err().unwrap_or_else(|| "no pod traffic".into())
            ),
        },
        phases: vec![
            ("no dataplane, traffic".into(), unix_of(t_a), unix_of(t_b)),
            ("dataplane started until converged".into(), unix_of(t_start), unix_of(t_end)),
        ],
    })
}

// ---- revoke --------------------------------------------------------------------------

fn revoke(tb: &mut Testbed) -> Result<Body> {
    let (x, y) = pair(tb)?;
    mesh_consistent(tb).map_err(|e| Error::Other(format!("mesh not whole before revoke: {e}")))?;
    let keys = published_keys(tb)?;
    let old = keys
        .get(&x.name)
        .cloned()
        .ok_or_else(|| Error::Other(format!("{} has no key", x.name)))?;
    println!("  {}'s key before: {old}", x.name);
    let wg = tb.wgmesh.display().to_string();
    let store = x.store.display().to_string();
    let t0 = Instant::now();
    let out = sys::netns_exec(
        &x.ns,
        &[
            "env",
            "WGMESH_ACTOR=testbed:drill",
            &wg,
            "keys",
            "revoke",
            "--store",
            &store,
            "--reason",
            "wgmesh-testbed revoke drill",
        ],
    )?;
    println!(
        "  $ wgmesh keys revoke --store {store} --reason ... ({:.2} s)",
        t0.elapsed().as_secs_f64()
    );
    for l in out.lines() {
        println!("    {l}");
    }
    let others: Vec<NodeRecord> = tb
        .state
        .nodes
        .iter()
        .filter(|n| n.name != x.name)
        .cloned()
        .collect();
    let limit = Duration::from_secs_f64(revoke_max_s().max(converge_max_s()) + 5.0);
    let (mut own_gone, mut peers_gone, mut new_everywhere, mut traffic) = (None, None, None, None);
    let (a, b) = (&x.pods[0], &y.pods[0]);
    let (ia, ib) = (v4_of(&a.ips)?.to_string(), v4_of(&b.ips)?.to_string());
    while t0.elapsed() < limit {
        let now = t0.elapsed().as_secs_f64();
        let dev = tb.device(&x);
        if own_gone.is_none()
            && dev
                .as_ref()
                .is_some_and(|d| d.public_key.as_ref().is_some_and(|k| *k != old))
        {
            own_gone = Some(now);
        }
        if peers_gone.is_none()
            && others.iter().all(|n| {
                tb.peers(n)
                    .is_some_and(|ps| ps.iter().all(|p| p.public_key_b64() != old))
            })
        {
            peers_gone = Some(now);
        }
        if new_everywhere.is_none() {
            if let Some(new) = dev.and_then(|d| d.public_key).filter(|k| *k != old) {
                if others.iter().all(|n| {
                    tb.peers(n)
                        .is_some_and(|ps| ps.iter().any(|p| p.public_key_b64() == new))
                }) {
                    new_everywhere = Some(now);
                }
            }
        }
        if new_everywhere.is_some()
            && traffic.is_none()
            && traffic::ping(&a.ns, &ib).is_some()
            && traffic::ping(&b.ns, &ia).is_some()
        {
            traffic = Some(t0.elapsed().as_secs_f64());
        }
        if own_gone.is_some() && peers_gone.is_some() && traffic.is_some() {
            break;
        }
        sys::sleep(Duration::from_millis(50))?;
    }
    let show = |v: Option<f64>| {
        v.map(|s| format!("{s:.2} s"))
            .unwrap_or_else(|| format!("not within {:.0} s", limit.as_secs_f64()))
    };
    println!(
        "  old key gone from {}'s device: {}",
        x.name,
        show(own_gone)
    );
    println!(
        "  old key gone from every peer's device: {}",
        show(peers_gone)
    );
    println!("  new key on every peer's device: {}", show(new_everywhere));
    println!(
        "  {} <-> {} traffic again: {}",
        a.name,
        b.name,
        show(traffic)
    );
    let ok = own_gone.is_some_and(|s| s <= revoke_max_s())
        && peers_gone.is_some_and(|s| s <= revoke_max_s())
        && traffic.is_some_and(|s| s <= converge_max_s());
    if !ok {
        // Leave a working node for the next drill: a restarted agent loads the store.
        println!(
            "  restarting {}-agent so the next drill finds the new key in use",
            x.name
        );
        tb.restart_process(&format!("{}-agent", x.name))?;
    }
    Ok(Body {
        ok,
        figure: format!(
            "old key gone from {}'s device after {}, from every peer after {}; traffic restored after {} (limits {:.1} s, {:.1} s, {:.1} s)",
            x.name,
            show(own_gone),
            show(peers_gone),
            show(traffic),
            revoke_max_s(),
            revoke_max_s(),
            converge_max_s()
        ),
        phases: Vec::new(),
    })
}

// ---- bad-annotations -----------------------------------------------------------------

/// One kind of value the codec (or the planner, for cross-node rules) rejects.
struct BadCase {
    name: &'static str,
    /// What the value is, for the table.
    what: &'static str,
    /// Annotations to set over a valid base (value `None` removes the key).
    set: Vec<(&'static str, String)>,
}

fn bad_cases(tb: &Testbed) -> Result<Vec<BadCase>> {
    let b64 = |b: &[u8]| sys::base64(b);
    let first = tb
        .state
        .nodes
        .first()
        .ok_or_else(|| Error::Other("no nodes".into()))?;
    let first_key = tb
        .node_public_key(&first.name)
        .ok_or_else(|| Error::Other(format!("{} has no key", first.name)))?;
    let first_endpoint = SocketAddr::new(v4_of(&first.underlay)?, WG_PORT).to_string();
    let mut low = [0u8; 32];
    low[0] = 1;
    let euro = "€".repeat(1300);
    Ok(vec![
        BadCase {
            name: "bad-key",
            what: "public-key not base64",
            set: vec![("public-key", "not a key!".into())],
        },
        BadCase {
            name: "short-key",
            what: "public-key of 16 bytes",
            set: vec![("public-key", b64(&[7u8; 16]))],
        },
        BadCase {
            name: "zero-key",
            what: "public-key all zero",
            set: vec![("public-key", b64(&[0u8; 32]))],
        },
        BadCase {
            name: "low-order-key",
            what: "public-key a low-order point",
            set: vec![("public-key", b64(&low))],
        },
        BadCase {
            name: "next-key-is-current",
            what: "next-public-key = public-key",
            set: vec![("next-public-key", "=PUBLIC".into())],
        },
        BadCase {
            name: "oversized",
            what: "endpoint of 5,000 bytes",
            set: vec![("endpoint", "1".repeat(5000))],
        },
        BadCase {
            name: "long-multibyte",
            what: "every field 1,300 × '€' (3,900 bytes each)",
            set: [
                "public-key",
                "key-generation",
                "key-created",
                "endpoint",
                "persistent-keepalive",
                "pod-cidrs",
            ]
            .into_iter()
            .map(|k| (k, euro.clone()))
            .collect(),
        },
        BadCase {
            name: "bad-cidr",
            what: "pod-cidrs not a CIDR",
            set: vec![("pod-cidrs", "10.244.x.0/24".into())],
        },
        BadCase {
            name: "empty-cidr-entry",
            what: "pod-cidrs with an empty entry",
            set: vec![("pod-cidrs", "=SPEC,".into())],
        },
        BadCase {
            name: "non-canonical-cidr",
            what: "pod-cidrs with host bits set",
            set: vec![("pod-cidrs", "=SPEC-HOSTBITS".into())],
        },
        BadCase {
            name: "cidr-outside-spec",
            what: "pod-cidrs outside spec.podCIDRs / cluster",
            set: vec![("pod-cidrs", "=OUTSIDE".into())],
        },
        BadCase {
            name: "bad-endpoint",
            what: "endpoint not ip:port",
            set: vec![("endpoint", "node.example:51820".into())],
        },
        BadCase {
            name: "non-canonical-endpoint",
            what: "endpoint 192.0.2.241:051820",
            set: vec![("endpoint", "192.0.2.241:051820".into())],
        },
        BadCase {
            name: "port-zero",
            what: "endpoint port 0",
            set: vec![("endpoint", "192.0.2.242:0".into())],
        },
        BadCase {
            name: "loopback-endpoint",
            what: "endpoint 127.0.0.1:51820",
            set: vec![("endpoint", "127.0.0.1:51820".into())],
        },
        BadCase {
            name: "link-local-endpoint",
            what: "endpoint 169.254.7.7:51820",
            set: vec![("endpoint", "169.254.7.7:51820".into())],
        },
        BadCase {
            name: "multicast-endpoint",
            what: "endpoint 224.0.0.251:51820",
            set: vec![("endpoint", "224.0.0.251:51820".into())],
        },
        BadCase {
            name: "unspecified-endpoint",
            what: "endpoint 0.0.0.0:51820",
            set: vec![("endpoint", "0.0.0.0:51820".into())],
        },
        BadCase {
            name: "other-nodes-endpoint",
            what: "endpoint of another node",
            set: vec![("endpoint", first_endpoint)],
        },
        BadCase {
            name: "duplicate-key",
            what: "public-key of another node",
            set: vec![("public-key", first_key)],
        },
        BadCase {
            name: "bad-keepalive",
            what: "persistent-keepalive 70000",
            set: vec![("persistent-keepalive", "70000".into())],
        },
        BadCase {
            name: "bad-generation",
            what: "key-generation -1",
            set: vec![("key-generation", "-1".into())],
        },
        BadCase {
            name: "bad-timestamp",
            what: "key-created \"yesterday\"",
            set: vec![("key-created", "yesterday".into())],
        },
    ])
}

/// One Event (core/v1 view) as the drill reads it.
struct SeenEvent {
    type_: String,
    regarding: String,
    /// `reportingInstance` (the agent's node), else `source.host`.
    instance: String,
    /// `series.count`, else `count`, at least 1.
    occurrences: u64,
    reason: String,
    message: String,
}

/// Every Event in the API.
fn list_events(tb: &Testbed) -> Result<Vec<SeenEvent>> {
    let v = tb.api("GET", "/api/v1/events", "application/json", &Value::Null)?;
    Ok(v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            SeenEvent {
                type_: s(&e["type"]),
                regarding: s(&e["involvedObject"]["name"]),
                instance: e["reportingInstance"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .or_else(|| e["source"]["host"].as_str())
                    .unwrap_or("")
                    .to_string(),
                occurrences: e["series"]["count"]
                    .as_u64()
                    .or_else(|| e["count"].as_u64())
                    .unwrap_or(1)
                    .max(1),
                reason: s(&e["reason"]),
                message: s(&e["message"]),
            }
        })
        .collect())
}

fn bad_annotations(tb: &mut Testbed) -> Result<Body> {
    mesh_consistent(tb)
        .map_err(|e| Error::Other(format!("mesh not whole before the drill: {e}")))?;
    let agents: Vec<String> = tb.state.nodes.iter().map(|n| n.name.clone()).collect();
    let before = peer_sets(tb);
    let cases = bad_cases(tb)?;
    let tag = format!("{:04x}", (unix_now() as u64) & 0xffff);
    let mut created: Vec<String> = Vec::new();
    let result = bad_body(tb, &cases, &tag, &agents, &before, &mut created);
    for name in &created {
        let _ = tb.delete_node_object(name);
    }
    result
}

fn bad_body(
    tb: &mut Testbed,
    cases: &[BadCase],
    tag: &str,
    agents: &[String],
    before: &BTreeMap<String, Option<BTreeSet<String>>>,
    created: &mut Vec<String>,
) -> Result<Body> {
    let t_create = Instant::now();
    for (i, c) in cases.iter().enumerate() {
        let name = format!("bad-{tag}-{}", c.name);
        // The Node first (the API's IPAM gives it spec.podCIDRs), as a kubelet would.
        let node = tb.create_node_object(&json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                "labels": {"wgmesh.dev/testbed": tb.state.id, "wgmesh.dev/drill": "bad-annotations"}}}))?;
        created.push(name.clone());
        let mut spec = super::topology::pod_cidrs_of(&node);
        // Without spec.podCIDRs (up --no-spec-pod-cidrs) a Node claims its CIDRs
        // with the annotation alone: each bad Node gets a free one of its own, so
        // its only fault is the value under test; "outside" is then outside the
        // cluster CIDRs (the bound of a claim in that mode).
        let outside = if tb.state.no_spec_pod_cidrs {
            spec = vec![format!("10.244.{}.0/24", 200 + i)];
            "10.245.0.0/24"
        } else {
            "10.244.255.0/24"
        };
        let spec_v4 = spec
            .iter()
            .find(|c| !c.contains(':'))
            .cloned()
            .unwrap_or_default();
        let hostbits = spec_v4.replacen(".0/", ".1/", 1);
        let key = wgmesh::keys::PrivateKey::generate()
            .public_key()
            .to_base64();
        let mut ann: BTreeMap<&str, String> = BTreeMap::from([
            ("public-key", key.clone()),
            ("key-generation", "1".into()),
            ("key-created", "2025-01-01T00:00:00Z".into()),
            ("endpoint", format!("192.0.2.{}:{WG_PORT}", 200 + i % 40)),
            ("pod-cidrs", spec.join(",")),
        ]);
        for (k, v) in &c.set {
            let v = match v.as_str() {
                "=PUBLIC" => key.clone(),
                "=SPEC," => format!("{},", spec.join(",")),
                "=SPEC-HOSTBITS" => hostbits.clone(),
                "=OUTSIDE" => outside.to_string(),
                _ => v.clone(),
            };
            ann.insert(k, v);
        }
        let annotations: serde_json::Map<String, Value> = ann
            .into_iter()
            .map(|(k, v)| (format!("wgmesh.dev/{k}"), Value::String(v)))
            .collect();
        tb.api(
            "PATCH",
            &format!("/api/v1/nodes/{name}"),
            "application/merge-patch+json",
            &json!({"metadata": {"annotations": annotations}}),
        )?;
    }
    println!(
        "  created {} Nodes bad-{tag}-* (no namespace behind them), one per rejected kind of value",
        cases.len()
    );
    // The mesh must keep reacting with them present: a real node joins and leaves.
    sys::sleep(Duration::from_secs(2))?;
    println!("  adding a real node while they exist");
    let conv = check::convergence(tb, 1);
    let (conv_ok, conv_text) = match &conv {
        Ok(c) => {
            let total = c.publish_s + c.add_s;
            (
                total <= converge_max_s(),
                format!(
                    "a node added meanwhile converged in {total:.2} s and left in {:.2} s",
                    c.remove_s
                ),
            )
        }
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        Err(e) => (
            false,
            format!("a node added meanwhile did not converge: {e}"),
        ),
    };
    println!("  {conv_text}");
    // Over two resyncs, so an agent that re-raises its Events on every pass shows.
    let watch = Duration::from_secs(2 * RESYNC_SECONDS + 2);
    let left = watch.saturating_sub(t_create.elapsed());
    println!(
        "  watching Events for {:.0} s more (over 2 resyncs since creation)",
        left.as_secs_f64()
    );
    sys::sleep(left)?;
    let after = peer_sets(tb);
    let unchanged = after == *before;
    let matrix = traffic::probe_matrix(
        "pod-pod-ipv4 with the bad Nodes present",
        check::pod_rows(tb),
        check::pod_cols(tb, false, None),
        Probe::Icmp,
    )?;
    println!("{}", matrix.render());
    let events = list_events(tb)?;
    // (bad node, agent) -> (Warning objects, occurrences), and one message per case.
    let mut table: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut sample: BTreeMap<String, String> = BTreeMap::new();
    let mut normal = 0;
    for ev in &events {
        if !created.contains(&ev.regarding) {
            continue;
        }
        if ev.type_ != "Warning" {
            normal += 1;
            continue;
        }
        let e = table
            .entry((ev.regarding.clone(), ev.instance.clone()))
            .or_default();
        e.0 += 1;
        e.1 += ev.occurrences;
        sample
            .entry(ev.regarding.clone())
            .or_insert_with(|| format!("{}: {}", ev.reason, ev.message));
    }
    let w = agents.iter().map(|a| a.len()).max().unwrap_or(2).max(3);
    let mut header = format!("  {:24} {:44}", "case", "value");
    for a in agents {
        header.push_str(&format!(" {a:>w$}"));
    }
    println!("{header}   (Warning Events per agent; occurrences in brackets when over 1)");
    let mut exact = 0;
    for c in cases {
        let name = format!("bad-{tag}-{}", c.name);
        let mut line = format!("  {:24} {:44}", c.name, c.what);
        let mut all_one = true;
        for a in agents {
            let (objs, occ) = table
                .get(&(name.clone(), a.clone()))
                .copied()
                .unwrap_or((0, 0));
            all_one &= objs == 1 && occ == 1;
            let cell = if occ > objs {
                format!("{objs}({occ})")
            } else {
                objs.to_string()
            };
            line.push_str(&format!(" {cell:>w$}"));
        }
        if all_one {
            exact += 1;
        }
        println!("{line}  {}", if all_one { "ok" } else { "WRONG" });
    }
    for c in cases {
        let name = format!("bad-{tag}-{}", c.name);
        let msg = sample
            .get(&name)
            .map(String::as_str)
            .unwrap_or("(no Event)");
        let short: String = msg.chars().take(150).collect();
        println!("  {:24} {short}", c.name);
    }
    if normal > 0 {
        println!("  ({normal} Normal Event(s) about the bad Nodes, not counted)");
    }
    let changed: Vec<&String> = before
        .iter()
        .filter(|(n, s)| after.get(*n) != Some(*s))
        .map(|(n, _)| n)
        .collect();
    println!(
        "  peer sets: {}",
        if unchanged {
            "unchanged on every device".to_string()
        } else {
            format!(
                "CHANGED on {}",
                changed
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let ok = unchanged
        && matrix.failures() == 0
        && matrix.tested() > 0
        && exact == cases.len()
        && conv_ok;
    Ok(Body {
        ok,
        figure: format!(
            "{exact} of {} bad Nodes got exactly one Warning Event from each of {} agents; peer sets {}; ping matrix {}/{}; {conv_text}",
            cases.len(),
            agents.len(),
            if unchanged { "unchanged" } else { "CHANGED" },
            matrix.passed(),
            matrix.tested()
        ),
        phases: Vec::new(),
    })
}

// ---- cidr-overlap ---------------------------------------------------------------------

/// One Node the cidr-overlap drill creates: its name, what it claims, whether the
/// claim must be rejected, and its key.
struct Claim {
    case: &'static str,
    name: String,
    cidr: String,
    rejected: bool,
    key: String,
}

/// Newer Nodes (no namespace behind them) claim pod CIDRs overlapping the oldest
/// node's: the same CIDR, one inside it, one covering it (and its neighbour's). With
/// `up --no-spec-pod-cidrs` the claim is the `wgmesh.dev/pod-cidrs` annotation alone
/// (what `--pod-cidrs` publishes); otherwise the Node's spec.podCIDRs (set at
/// creation, so the API's IPAM allocates nothing) and the annotation agree. A control
/// Node claims a free CIDR and must become a peer everywhere.
fn cidr_overlap(tb: &mut Testbed) -> Result<Body> {
    mesh_consistent(tb)
        .map_err(|e| Error::Other(format!("mesh not whole before the drill: {e}")))?;
    let (x, older) = pair(tb)?;
    let older_cidr = older
        .pod_cidrs
        .iter()
        .find(|c| !c.contains(':'))
        .cloned()
        .ok_or_else(|| Error::Other(format!("{} has no IPv4 pod CIDR", older.name)))?;
    let net: ipnet::Ipv4Net = older_cidr
        .parse()
        .map_err(|_| Error::Other(format!("bad CIDR {older_cidr}")))?;
    let inside = ipnet::Ipv4Net::new(
        (u32::from(net.network()) + (1 << (32 - net.prefix_len() - 1))).into(),
        net.prefix_len() + 1,
    )
    .map_err(|e| Error::Other(e.to_string()))?;
    let covering = ipnet::Ipv4Net::new(net.network(), net.prefix_len() - 1)
        .map_err(|e| Error::Other(e.to_string()))?
        .trunc();
    let agents: Vec<String> = tb.state.nodes.iter().map(|n| n.name.clone()).collect();
    let before = peer_sets(tb);
    let tag = format!("{:04x}", (unix_now() as u64) & 0xffff);
    let mut claims: Vec<Claim> = [
        ("same", older_cidr.clone(), true),
        ("inside", inside.to_string(), true),
        ("covering", covering.to_string(), true),
        ("control-free", "10.244.250.0/24".to_string(), false),
    ]
    .into_iter()
    .map(|(case, cidr, rejected)| Claim {
        case,
        name: format!("overlap-{tag}-{case}"),
        cidr,
        rejected,
        key: wgmesh::keys::PrivateKey::generate()
            .public_key()
            .to_base64(),
    })
    .collect();
    // Traffic between the older node and another one for the whole drill: the older
    // node must keep its peers (and its pods their traffic).
    // (As long as the drill can take: the wait for the first Events, then two
    // resyncs; stopped when it ends.)
    let secs = converge_max_s() + 2.0 * RESYNC_SECONDS as f64 + 8.0;
    let flows = Flows::start(pod_flows(&x, &older, drill_pps(250), secs, 46000)?)?;
    let mut created = Vec::new();
    let result = overlap_body(tb, &mut claims, &older, &agents, &before, &mut created);
    flows.stop_sending();
    let results = flows.finish(Duration::from_secs(1));
    for name in &created {
        let _ = tb.delete_node_object(name);
    }
    let mut body = result?;
    print_flows(&results);
    let sent: u64 = results.iter().map(|r| r.sent.len() as u64).sum();
    let lost: u64 = results.iter().map(FlowResult::lost).sum();
    body.ok &= sent > 0 && lost == 0;
    body.figure.push_str(&format!(
        "; {} <-> {} traffic lost {lost} of {sent} datagrams",
        x.name, older.name
    ));
    Ok(body)
}

/// The Warning Events about the drill's Nodes: (Node, agent) → (Event
/// objects, occurrences), and one message of each.
#[allow(clippy::type_complexity)]
fn claim_warnings(
    tb: &Testbed,
    created: &[String],
) -> Result<(
    BTreeMap<(String, String), (u64, u64)>,
    BTreeMap<String, String>,
)> {
    let mut warnings: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut sample: BTreeMap<String, String> = BTreeMap::new();
    for ev in &list_events(tb)? {
        if ev.type_ != "Warning" || !created.contains(&ev.regarding) {
            continue;
        }
        let e = warnings
            .entry((ev.regarding.clone(), ev.instance.clone()))
            .or_default();
        e.0 += 1;
        e.1 += ev.occurrences;
        sample
            .entry(format!("{} {}", ev.regarding, ev.instance))
            .or_insert_with(|| format!("{}: {}", ev.reason, ev.message));
    }
    Ok((warnings, sample))
}

fn overlap_body(
    tb: &mut Testbed,
    claims: &mut [Claim],
    older: &NodeRecord,
    agents: &[String],
    before: &BTreeMap<String, Option<BTreeSet<String>>>,
    created: &mut Vec<String>,
) -> Result<Body> {
    let no_spec = tb.state.no_spec_pod_cidrs;
    let t_create = Instant::now();
    for (i, c) in claims.iter().enumerate() {
        let mut node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": c.name,
            "labels": {"wgmesh.dev/testbed": tb.state.id, "wgmesh.dev/drill": "cidr-overlap"}}});
        if !no_spec {
            node["spec"] = json!({"podCIDR": c.cidr, "podCIDRs": [c.cidr]});
        }
        let made = tb.api("POST", "/api/v1/nodes", "application/json", &node)?;
        created.push(c.name.clone());
        let spec = made["spec"]["podCIDRs"].clone();
        let want_spec = if no_spec {
            Value::Null
        } else {
            json!([c.cidr])
        };
        if spec != want_spec {
            return Err(Error::Other(format!(
                "the API gave {} spec.podCIDRs {spec}, not {want_spec}",
                c.name
            )));
        }
        tb.api(
            "PATCH",
            &format!("/api/v1/nodes/{}", c.name),
            "application/merge-patch+json",
            &json!({"metadata": {"annotations": {
                "wgmesh.dev/public-key": c.key,
                "wgmesh.dev/key-generation": "1",
                "wgmesh.dev/key-created": "2025-01-01T00:00:00Z",
                "wgmesh.dev/endpoint": format!("192.0.2.{}:{WG_PORT}", 230 + i),
                "wgmesh.dev/pod-cidrs": c.cidr,
            }}}),
        )?;
    }
    println!(
        "  created {} Nodes (newer than every real node, no namespace behind them), claiming {}: {}",
        claims.len(),
        if no_spec {
            "with the wgmesh.dev/pod-cidrs annotation only (no spec.podCIDRs)"
        } else {
            "in spec.podCIDRs and the annotation"
        },
        claims
            .iter()
            .map(|c| format!("{} {}", c.case, c.cidr))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  the older node: {} with {}",
        older.name,
        older.pod_cidrs.join(",")
    );
    // First every agent's verdict on every claim (an Event for each rejected
    // one, a peer for the free one), up to the convergence limit; then two
    // resyncs more, so an agent that re-raises its Events on every pass shows.
    let limit = Duration::from_secs_f64(converge_max_s());
    let verdicts_in = loop {
        let (warnings, _) = claim_warnings(tb, created)?;
        let all = claims.iter().all(|c| {
            agents.iter().all(|a| {
                if c.rejected {
                    warnings.contains_key(&(c.name.clone(), a.clone()))
                } else {
                    tb.state
                        .nodes
                        .iter()
                        .find(|n| n.name == *a)
                        .and_then(|n| tb.peers(n))
                        .is_some_and(|ps| ps.iter().any(|p| p.public_key_b64() == c.key))
                }
            })
        });
        if all || t_create.elapsed() > limit {
            break all.then(|| t_create.elapsed());
        }
        sys::sleep(Duration::from_millis(500))?;
    };
    let watch = Duration::from_secs(2 * RESYNC_SECONDS + 2);
    println!(
        "  every agent's verdict on every claim: {}; watching devices and Events {:.0} s more (over 2 resyncs)",
        match verdicts_in {
            Some(t) => format!("after {:.2} s", t.as_secs_f64()),
            None => format!("NOT all within {:.0} s", limit.as_secs_f64()),
        },
        watch.as_secs_f64()
    );
    sys::sleep(watch)?;
    let (warnings, sample) = claim_warnings(tb, created)?;
    let devices: BTreeMap<String, Option<Vec<sys::WgPeer>>> = tb
        .state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), tb.peers(n)))
        .collect();
    let w = agents.iter().map(|a| a.len()).max().unwrap_or(2).max(7);
    let mut header = format!("  {:14} {:18} {:8}", "case", "claim", "expect");
    for a in agents {
        header.push_str(&format!(" {a:>w$}"));
    }
    println!("{header}   (cells: Warning Events from that agent / has it as a peer)");
    let mut good = 0;
    for c in claims.iter() {
        let mut line = format!(
            "  {:14} {:18} {:8}",
            c.case,
            c.cidr,
            if c.rejected { "rejected" } else { "peer" }
        );
        let mut ok = true;
        for a in agents {
            let (objs, occ) = warnings
                .get(&(c.name.clone(), a.clone()))
                .copied()
                .unwrap_or((0, 0));
            let peer = devices
                .get(a)
                .and_then(|d| d.as_ref())
                .and_then(|ps| ps.iter().find(|p| p.public_key_b64() == c.key));
            let has_cidr = peer.is_some_and(|p| p.allowed_ips.contains(&c.cidr));
            ok &= if c.rejected {
                objs == 1 && occ == 1 && peer.is_none()
            } else {
                objs == 0 && has_cidr
            };
            let cell = format!(
                "{}{}/{}",
                objs,
                if occ > objs {
                    format!("({occ})")
                } else {
                    String::new()
                },
                if peer.is_some() { "peer" } else { "-" }
            );
            line.push_str(&format!(" {cell:>w$}"));
        }
        if ok {
            good += 1;
        }
        println!("{line}  {}", if ok { "ok" } else { "WRONG" });
    }
    for (k, msg) in &sample {
        let short: String = msg.chars().take(160).collect();
        println!("  {k}: {short}");
    }
    // The real nodes' peers: every device still has exactly the peers it had
    // (plus the control Node's).
    let control: BTreeSet<String> = claims
        .iter()
        .filter(|c| !c.rejected)
        .map(|c| c.key.clone())
        .collect();
    let mut kept = true;
    for (n, set) in before {
        let now: Option<BTreeSet<String>> = devices.get(n).and_then(|d| d.as_ref()).map(|ps| {
            ps.iter()
                .map(|p| p.public_key_b64())
                .filter(|k| !control.contains(k))
                .collect()
        });
        if now != *set {
            kept = false;
            println!("  {n}'s peers CHANGED: {set:?} -> {now:?}");
        }
    }
    let older_peers = devices
        .get(&older.name)
        .and_then(|d| d.as_ref())
        .map_or(0, |ps| {
            ps.iter()
                .filter(|p| !control.contains(&p.public_key_b64()))
                .count()
        });
    println!(
        "  {} keeps {older_peers} peer(s); real nodes' peer sets {}",
        older.name,
        if kept {
            "unchanged on every device"
        } else {
            "CHANGED"
        }
    );
    Ok(Body {
        ok: good == claims.len() && kept,
        figure: format!(
            "{good} of {} claims as expected ({} overlapping: no peer anywhere, 1 Warning Event from each of {} agents; 1 free claim a peer everywhere); {} kept its {older_peers} peer(s), peer sets {}",
            claims.len(),
            claims.iter().filter(|c| c.rejected).count(),
            agents.len(),
            older.name,
            if kept { "unchanged" } else { "CHANGED" }
        ),
        phases: Vec::new(),
    })
}

/// One line per drill, for the closing table.
pub fn table(reports: &[Report]) -> String {
    let mut out = format!(
        "  {:24} {:6} {:>8} {:>9}  figure\n",
        "drill", "result", "seconds", "plaintext"
    );
    for r in reports {
        out.push_str(&format!(
            "  {:24} {:6} {:>8.1} {:>9}  {}\n",
            r.name,
            if r.ok { "PASS" } else { "FAIL" },
            r.secs,
            r.plaintext,
            r.figure
        ));
    }
    out
}

/// Outcomes in `check`'s form (for a shared summary).
pub fn outcomes(reports: &[Report]) -> Vec<Outcome> {
    reports
        .iter()
        .map(|r| Outcome::new(format!("drill {}", r.name), r.ok, r.figure.clone()))
        .collect()
}
