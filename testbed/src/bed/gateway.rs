//! The `gateway-failover` drill (real control plane only: the in-memory API
//! serves no MeshRoute): an on-prem "site" subnet behind two gateway nodes,
//! granted by a MeshRoute with priorities. A pod on a third node sends a
//! steady UDP flow to a host in the site; the active gateway dies (agent and
//! dataplane SIGKILLed); the prefix must move to the other gateway's peer on
//! the sender's device and the flow resume; the gateway comes back and, after
//! the grant's failback time, takes the prefix back. Printed: the time to
//! fail over and back, and the datagrams lost in each phase. Hostile grants
//! (a default route, a cluster CIDR) must leave every device unchanged.
//!
//! The site: namespace `wgtb-<id>-site` holding bridge `lan0` (198.18.0.10/24,
//! RFC 2544's benchmarking range, outside the underlay and the cluster), and
//! one veth per gateway (`lan-site` in the node, 198.18.0.<index>/24). The
//! gateways masquerade what they route into the site (the agent's gateway
//! rule), so the site host needs no route back to the cluster.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::drill::{print_flows, unix_of, Body};
use super::state::{NodeBackend, NodeRecord};
use super::sys;
use super::topology::Testbed;
use super::traffic::{FlowSpec, Flows};
use super::{Error, Result};

pub const SITE_PREFIX: &str = "198.18.0.0/24";
const SITE_HOST: &str = "198.18.0.10";
const GRANT: &str = "testbed-site";
const FAILBACK_S: u64 = 10;
const PPS: u32 = 100;
/// How long the gateway stays dead: long enough to see the failover.
const DEAD_S: u64 = 15;
const MESHROUTES: &str = "/apis/wgmesh.dev/v1alpha1/meshroutes";

pub fn gateway_failover(tb: &mut Testbed) -> Result<Body> {
    if tb.state.control_plane.is_none() {
        return Err(Error::Other(
            "gateway-failover needs `up --control-plane real` (the in-memory API serves no MeshRoute)"
                .into(),
        ));
    }
    let nodes = tb.state.nodes.clone();
    if nodes.len() < 3 || nodes[2].pods.is_empty() {
        return Err(Error::Other(
            "gateway-failover needs 3 nodes, the third with a pod (up --nodes 3 --pods 1)".into(),
        ));
    }
    let (primary, backup, client) = (&nodes[0], &nodes[1], &nodes[2]);
    let site = build_site(tb, &[primary, backup])?;
    let result = run(tb, primary, backup, client, &site);
    // Whatever happened: the grant goes, then the site.
    let _ = tb.api(
        "DELETE",
        &format!("{MESHROUTES}/{GRANT}"),
        "application/json",
        &Value::Null,
    );
    for name in ["testbed-hostile-pods", "testbed-hostile-underlay"] {
        let _ = tb.api(
            "DELETE",
            &format!("{MESHROUTES}/{name}"),
            "application/json",
            &Value::Null,
        );
    }
    super::topology::delete_netns(&site);
    result
}

fn run(
    tb: &mut Testbed,
    primary: &NodeRecord,
    backup: &NodeRecord,
    client: &NodeRecord,
    site: &str,
) -> Result<Body> {
    let grant = json!({
        "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
        "metadata": {"name": GRANT},
        "spec": {"prefix": SITE_PREFIX, "failbackSeconds": FAILBACK_S, "gateways": [
            {"node": primary.name, "priority": 10}, {"node": backup.name, "priority": 20}]},
    });
    tb.api("POST", MESHROUTES, "application/json", &grant)?;
    println!(
        "  MeshRoute {GRANT}: {SITE_PREFIX} via {} (priority 10), {} (priority 20), failback {FAILBACK_S} s",
        primary.name, backup.name
    );
    let t = Instant::now();
    wait_holder(tb, client, primary, Duration::from_secs(30))?;
    println!(
        "  {:.2} s: {}'s device carries {SITE_PREFIX} on {}'s peer",
        t.elapsed().as_secs_f64(),
        client.name,
        primary.name
    );

    let mut ok = true;
    let mut notes = Vec::new();
    // The hostile grants: one the API server's schema refuses, two it
    // accepts and every agent's validator must refuse.
    let default = json!({
        "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
        "metadata": {"name": "testbed-hostile-default"},
        "spec": {"prefix": "0.0.0.0/0", "gateways": [{"node": primary.name}]},
    });
    match tb.api("POST", MESHROUTES, "application/json", &default) {
        Err(e) => println!(
            "  0.0.0.0/0 refused by the API server: {}",
            first_line(&e.to_string())
        ),
        Ok(_) => {
            ok = false;
            notes.push("the API server accepted a default-route MeshRoute".to_string());
        }
    }
    let before = allowed_ips(tb);
    for (name, prefix) in [
        ("testbed-hostile-pods", "10.244.0.0/17"),
        ("testbed-hostile-underlay", "192.0.2.0/25"),
    ] {
        let g = json!({
            "apiVersion": "wgmesh.dev/v1alpha1", "kind": "MeshRoute",
            "metadata": {"name": name},
            "spec": {"prefix": prefix, "gateways": [{"node": primary.name}]},
        });
        tb.api("POST", MESHROUTES, "application/json", &g)?;
    }
    // Three resyncs' worth of passes (every Node event and MeshRoute event
    // also runs one).
    sys::sleep(Duration::from_secs(3))?;
    let after = allowed_ips(tb);
    if before == after {
        println!(
            "  10.244.0.0/17 (cluster) and 192.0.2.0/25 (underlay) granted: every device unchanged"
        );
    } else {
        ok = false;
        notes.push("a hostile MeshRoute changed a device".into());
    }

    if let Some(reply) =
        super::traffic::ping_until(&client.pods[0].ns, SITE_HOST, Duration::from_secs(10))
    {
        println!(
            "  ping {} -> {SITE_HOST} (site host): answered after {reply:.2} s",
            client.pods[0].name
        );
    } else {
        ok = false;
        notes.push(format!("{} cannot reach {SITE_HOST}", client.pods[0].name));
    }

    let secs = 3 + DEAD_S + FAILBACK_S + 12;
    let host: IpAddr = SITE_HOST
        .parse()
        .map_err(|_| Error::Other("bad site host".into()))?;
    let flows = Flows::start(vec![FlowSpec {
        label: format!("{} -> site {SITE_HOST}", client.pods[0].name),
        from_ns: client.pods[0].ns.clone(),
        to_ns: site.to_string(),
        to: SocketAddr::new(host, 43000),
        pps: PPS,
        duration: Duration::from_secs(secs),
    }])?;
    let t0 = flows.started;
    sys::sleep(Duration::from_secs(3))?;
    let t_kill = Instant::now();
    let kernel = primary.backend == NodeBackend::Kernel;
    tb.signal_process(&format!("{}-agent", primary.name), testkit::Signal::KILL)?;
    if kernel {
        // A kernel node's WireGuard outlives its agent: delete the link too.
        sys::ip(&primary.ns, &["link", "del", &primary.iface])?;
    } else {
        tb.signal_process(
            &format!("{}-dataplane", primary.name),
            testkit::Signal::KILL,
        )?;
    }
    println!(
        "  {:.2} s: SIGKILL {g}-agent and {} (the active gateway)",
        (t_kill - t0).as_secs_f64(),
        if kernel {
            format!("delete its kernel link {}", primary.iface)
        } else {
            format!("{}-dataplane", primary.name)
        },
        g = primary.name
    );
    let moved =
        wait_holder(tb, client, backup, Duration::from_secs(DEAD_S)).map(|_| Instant::now());
    match &moved {
        Ok(t) => println!(
            "  {:.2} s: failover: {SITE_PREFIX} on {}'s peer, {:.2} s after the kill",
            (*t - t0).as_secs_f64(),
            backup.name,
            (*t - t_kill).as_secs_f64()
        ),
        Err(e) => {
            ok = false;
            notes.push(format!("no failover: {e}"));
        }
    }
    let restart_at = t_kill + Duration::from_secs(DEAD_S);
    sys::sleep(restart_at.saturating_duration_since(Instant::now()))?;
    let t_restart = Instant::now();
    if !kernel {
        tb.restart_process(&format!("{}-dataplane", primary.name))?;
    }
    tb.restart_process(&format!("{}-agent", primary.name))?;
    println!(
        "  {:.2} s: {} restarted",
        (t_restart - t0).as_secs_f64(),
        primary.name
    );
    let back = wait_holder(tb, client, primary, Duration::from_secs(FAILBACK_S + 20))
        .map(|_| Instant::now());
    match &back {
        Ok(t) => println!(
            "  {:.2} s: failback: {SITE_PREFIX} on {}'s peer again, {:.2} s after the restart (failback time {FAILBACK_S} s)",
            (*t - t0).as_secs_f64(),
            primary.name,
            (*t - t_restart).as_secs_f64()
        ),
        Err(e) => {
            ok = false;
            notes.push(format!("no failback: {e}"));
        }
    }
    let results = flows.finish(Duration::from_secs(1));
    print_flows(&results);
    let r = &results[0];
    let (got_fail, sent_fail) = r.delivered_between(t_kill, *moved.as_ref().unwrap_or(&t_restart));
    let after_failover = moved
        .as_ref()
        .ok()
        .map(|t| r.delivered_between(*t + Duration::from_secs(1), t_restart));
    let failback_window = back.as_ref().ok().map(|t| {
        r.delivered_between(
            t.checked_sub(Duration::from_secs(1)).unwrap_or(*t),
            *t + Duration::from_secs(2),
        )
    });
    println!("  during the failover: {got_fail} of {sent_fail} datagrams arrived");
    if let Some((got, sent)) = after_failover {
        println!("  after the failover, before the restart: {got} of {sent} arrived");
        if got == 0 {
            ok = false;
            notes.push("nothing arrived through the backup gateway".into());
        }
    }
    if let Some((got, sent)) = failback_window {
        println!("  around the failback (1 s before to 2 s after): {got} of {sent} arrived");
    }
    let lost: u64 = r.lost();
    let figure = format!(
        "failover {} s after the gateway died ({} of {} lost meanwhile), failback {} s after it came back ({FAILBACK_S} s damping), {lost} of {} datagrams lost in all at {PPS} pps{}",
        moved
            .as_ref()
            .map_or("never".into(), |t| format!("{:.1}", (*t - t_kill).as_secs_f64())),
        sent_fail - got_fail,
        sent_fail,
        back
            .as_ref()
            .map_or("never".into(), |t| format!("{:.1}", (*t - t_restart).as_secs_f64())),
        r.sent.len(),
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        }
    );
    Ok(Body {
        ok: ok && r.sent.len() as u64 > lost,
        figure,
        phases: vec![("gateway dead".into(), unix_of(t_kill), unix_of(t_restart))],
    })
}

/// The site namespace, its bridge and one veth per gateway.
fn build_site(tb: &mut Testbed, gateways: &[&NodeRecord]) -> Result<String> {
    let site = format!("{}site", tb.state.prefix());
    tb.add_netns(&site)?;
    sys::ip(&site, &["link", "add", "lan0", "type", "bridge"])?;
    sys::ip(
        &site,
        &["addr", "add", &format!("{SITE_HOST}/24"), "dev", "lan0"],
    )?;
    sys::ip(&site, &["link", "set", "lan0", "up"])?;
    for gw in gateways {
        let port = format!("gw{}", gw.index);
        tb.record_link(&gw.ns, "lan-site", "veth", Some((&site, &port)))?;
        sys::ip(
            &gw.ns,
            &[
                "link", "add", "lan-site", "type", "veth", "peer", "name", &port, "netns", &site,
            ],
        )?;
        sys::ip(
            &gw.ns,
            &[
                "addr",
                "add",
                &format!("198.18.0.{}/24", gw.index),
                "dev",
                "lan-site",
            ],
        )?;
        sys::ip(&gw.ns, &["link", "set", "lan-site", "up"])?;
        sys::ip(&site, &["link", "set", &port, "master", "lan0", "up"])?;
    }
    println!(
        "  site: namespace {site}, bridge lan0 {SITE_HOST}/24, behind {}",
        gateways
            .iter()
            .map(|g| format!("{} (198.18.0.{})", g.name, g.index))
            .collect::<Vec<_>>()
            .join(" and ")
    );
    Ok(site)
}

/// Waits until `client`'s device has the site prefix on `holder`'s peer.
fn wait_holder(
    tb: &Testbed,
    client: &NodeRecord,
    holder: &NodeRecord,
    timeout: Duration,
) -> Result<()> {
    tb.wait_for(
        &format!("{SITE_PREFIX} on {}'s peer at {}", holder.name, client.name),
        timeout,
        || {
            let Some(key) = tb.node_public_key(&holder.name) else {
                return false;
            };
            tb.peers(client).is_some_and(|peers| {
                peers.iter().any(|p| {
                    p.public_key_b64() == key && p.allowed_ips.iter().any(|a| a == SITE_PREFIX)
                })
            })
        },
    )
}

/// Every device's peers' allowed IPs, sorted.
fn allowed_ips(tb: &Testbed) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for n in &tb.state.nodes {
        for p in tb.peers(n).unwrap_or_default() {
            let mut ips = p.allowed_ips.clone();
            ips.sort();
            out.push((n.name.clone(), p.public_key_b64(), ips));
        }
    }
    out.sort();
    out
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(200).collect()
}
