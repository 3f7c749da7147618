//! `check`: a traffic matrix over every traffic class with a capture on the underlay
//! during it, quiet-time API writes, and convergence times, each a named pass/fail
//! with the figures that prove it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::capture::{Capture, Captured};
use super::sys;
use super::topology::{Testbed, RESYNC_SECONDS, UNDERLAY_HOST_V4, UNDERLAY_HOST_V6};
use super::traffic::{probe_matrix, EchoServer, Endpoint, Matrix, Probe};
use super::{Error, Result};

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Outcome {
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// The TCP port of the echo servers `check` runs in every node (hostNetwork) and pod
/// namespace.
pub const ECHO_PORT: u16 = 7070;

/// One traffic class, probed as a matrix.
pub struct ClassRun {
    pub name: String,
    /// What it stands for, printed above the matrix.
    pub what: String,
    pub matrix: Matrix,
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

/// Pods as matrix rows (their namespace) or columns (their address of one family).
pub fn pod_rows(tb: &Testbed) -> Vec<Endpoint> {
    tb.state
        .pods()
        .map(|(n, p)| Endpoint {
            name: p.name.clone(),
            node: n.name.clone(),
            at: p.ns.clone(),
        })
        .collect()
}

pub fn pod_cols(tb: &Testbed, v6: bool, port: Option<u16>) -> Vec<Endpoint> {
    tb.state
        .pods()
        .filter_map(|(n, p)| {
            let ip = p.ips.iter().find(|a| a.is_ipv6() == v6)?;
            Some(Endpoint {
                name: p.name.clone(),
                node: n.name.clone(),
                at: target(*ip, port),
            })
        })
        .collect()
}

pub fn node_rows(tb: &Testbed) -> Vec<Endpoint> {
    tb.state
        .nodes
        .iter()
        .map(|n| Endpoint {
            name: n.name.clone(),
            node: n.name.clone(),
            at: n.ns.clone(),
        })
        .collect()
}

pub fn node_cols(tb: &Testbed, v6: bool, port: Option<u16>) -> Vec<Endpoint> {
    tb.state
        .nodes
        .iter()
        .filter_map(|n| {
            let ip = n.underlay.iter().find(|a| a.is_ipv6() == v6)?;
            Some(Endpoint {
                name: n.name.clone(),
                node: n.name.clone(),
                at: target(*ip, port),
            })
        })
        .collect()
}

fn target(ip: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => SocketAddr::new(ip, p).to_string(),
        None => ip.to_string(),
    }
}

/// Runs every traffic class of the testbed's mode, one after the other (so a
/// capture can tell them apart by time), with TCP echo servers in every node and
/// pod namespace for the TCP classes.
pub fn traffic_classes(tb: &Testbed) -> Result<Vec<ClassRun>> {
    let mut servers = Vec::new();
    let any: SocketAddr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), ECHO_PORT);
    for n in &tb.state.nodes {
        servers.push(EchoServer::start(&n.ns, any)?);
        for p in &n.pods {
            servers.push(EchoServer::start(&p.ns, any)?);
        }
    }
    let mut families = vec![false];
    if tb.state.dual_stack {
        families.push(true);
    }
    let mut runs = Vec::new();
    let mut class = |name: String, what: &str, rows, cols, probe| -> Result<()> {
        let title = format!("{name}: {what}");
        let matrix = probe_matrix(title, rows, cols, probe)?;
        runs.push(ClassRun {
            name,
            what: what.to_string(),
            matrix,
        });
        Ok(())
    };
    for &v6 in &families {
        let f = family(v6);
        class(
            format!("pod-pod-{f}"),
            "every pod pings every pod on every other node (ICMP)",
            pod_rows(tb),
            pod_cols(tb, v6, None),
            Probe::Icmp,
        )?;
        class(
            format!("pod-node-{f}"),
            "every pod pings every other node's underlay address (ICMP)",
            pod_rows(tb),
            node_cols(tb, v6, None),
            Probe::Icmp,
        )?;
        class(
            format!("node-pod-{f}"),
            "every node (host network namespace) pings every pod on every other node (ICMP)",
            node_rows(tb),
            pod_cols(tb, v6, None),
            Probe::Icmp,
        )?;
        class(
            format!("pod-hostnet-tcp-{f}"),
            &format!("every pod opens a TCP connection to a listener in every other node's host network namespace (a hostNetwork pod), port {ECHO_PORT}"),
            pod_rows(tb),
            node_cols(tb, v6, Some(ECHO_PORT)),
            Probe::Tcp,
        )?;
        class(
            format!("hostnet-pod-tcp-{f}"),
            &format!("every node's host network namespace (a hostNetwork pod) opens a TCP connection to a listener in every pod on every other node, port {ECHO_PORT}"),
            node_rows(tb),
            pod_cols(tb, v6, Some(ECHO_PORT)),
            Probe::Tcp,
        )?;
        if tb.state.encrypt_host_traffic {
            class(
                format!("node-node-{f}"),
                "host encryption on: every node pings every other node (ICMP)",
                node_rows(tb),
                node_cols(tb, v6, None),
                Probe::Icmp,
            )?;
            class(
                format!("node-node-tcp-{f}"),
                &format!("host encryption on: every node opens a TCP connection to a listener in every other node, port {ECHO_PORT}"),
                node_rows(tb),
                node_cols(tb, v6, Some(ECHO_PORT)),
                Probe::Tcp,
            )?;
        }
        if tb.state.masquerade != Some(false) {
            let host = if v6 {
                UNDERLAY_HOST_V6
            } else {
                UNDERLAY_HOST_V4
            };
            class(
                format!("pod-outside-{f}"),
                &format!("masquerade on: every pod pings {host}, a host outside the cluster (the underlay host): must be answered, with the node's address as source"),
                pod_rows(tb),
                vec![Endpoint {
                    name: "outside".into(),
                    node: String::new(),
                    at: host.into(),
                }],
                Probe::Icmp,
            )?;
        }
    }
    drop(servers);
    Ok(runs)
}

/// Prints each class's matrix with the plaintext the capture saw during it; one
/// outcome per class (every pair answered, no plaintext in its window) and one for
/// the whole capture.
pub fn report_classes(
    tb: &Testbed,
    runs: &[ClassRun],
    captured: &Captured,
    outcomes: &mut Vec<Outcome>,
) {
    for r in runs {
        println!("{}", r.matrix.render());
        let c = captured.counts(Some(r.matrix.window));
        println!("  capture during {}: {}", r.name, c.summary());
        for l in &c.plaintext_sample {
            println!("    plaintext: {l}");
        }
        println!();
        let m = &r.matrix;
        outcomes.push(Outcome::new(
            format!("class {}", r.name),
            m.tested() > 0 && m.failures() == 0 && c.plaintext() == 0,
            format!(
                "{}/{} answered, {} plaintext packet(s)",
                m.passed(),
                m.tested(),
                c.plaintext()
            ),
        ));
    }
    let all = captured.counts(None);
    println!(
        "capture ({}): {}; {}",
        captured.file.display(),
        all.summary(),
        captured.completeness()
    );
    println!(
        "  plaintext = a pod or pod gateway address ({}) on the underlay{}",
        tb.state.cluster_cidrs.join(", "),
        if tb.state.encrypt_host_traffic {
            ", or non-WireGuard IP between two node addresses (host encryption is on)"
        } else {
            " (host encryption off: node-to-node host traffic is not counted)"
        }
    );
    for s in &all.wireguard_sample {
        println!("  e.g. {s}");
    }
    for s in &all.plaintext_sample {
        println!("  plaintext: {s}");
    }
    outcomes.push(Outcome::new(
        "capture-ciphertext-only",
        all.wireguard > 0 && all.plaintext() == 0 && captured.complete(),
        format!(
            "{} WireGuard datagrams, {} plaintext packets on the underlay; {}",
            all.wireguard,
            all.plaintext(),
            captured.completeness()
        ),
    ));
}

/// Convergence figures of one add-node / remove-node round.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub node: String,
    /// add-node: namespaces, Node object, processes started.
    pub setup_s: f64,
    /// From its agent's start until its key is on its Node.
    pub publish_s: f64,
    /// From the key's publication until every other device has the peer and the new
    /// device has a peer per other node.
    pub add_s: f64,
    /// From `remove-node`'s Node deletion until no device has the peer.
    pub remove_s: f64,
}

/// Adds a node, times until every device has its peer; removes it, times until the
/// peer is gone everywhere. Devices are polled over UAPI every 50 ms.
pub fn convergence(tb: &mut Testbed, pods: usize) -> Result<Convergence> {
    let t0 = Instant::now();
    let name = tb.add_node(pods)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let t_started = Instant::now();
    let deadline = t_started + Duration::from_secs(60);
    let others: Vec<_> = tb
        .state
        .nodes
        .iter()
        .filter(|n| n.name != name)
        .cloned()
        .collect();
    let new = tb
        .state
        .node(&name)
        .cloned()
        .ok_or_else(|| Error::Other("the new node vanished".into()))?;
    let (key, t_key) = loop {
        if let Some(k) = tb.node_public_key(&name) {
            break (k, Instant::now());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("{name}'s key on its Node"),
                secs: 60,
            });
        }
        sys::sleep(Duration::from_millis(50))?;
    };
    loop {
        let everywhere = others.iter().all(|n| {
            tb.peers(n)
                .is_some_and(|ps| ps.iter().any(|p| p.public_key_b64() == key))
        });
        let complete = tb.peers(&new).is_some_and(|ps| ps.len() == others.len());
        if everywhere && complete {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("every device to have {name} as a peer"),
                secs: 60,
            });
        }
        sys::sleep(Duration::from_millis(50))?;
    }
    let add_s = t_key.elapsed().as_secs_f64();
    let publish_s = (t_key - t_started).as_secs_f64();

    let t1 = Instant::now();
    tb.delete_node_object(&name)?;
    let deadline = t1 + Duration::from_secs(60);
    loop {
        let gone = others.iter().all(|n| {
            tb.peers(n)
                .is_some_and(|ps| ps.iter().all(|p| p.public_key_b64() != key))
        });
        if gone {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("{name}'s peer to disappear"),
                secs: 60,
            });
        }
        sys::sleep(Duration::from_millis(50))?;
    }
    let remove_s = t1.elapsed().as_secs_f64();
    tb.destroy_node(&name)?;
    Ok(Convergence {
        node: name,
        setup_s,
        publish_s,
        add_s,
        remove_s,
    })
}

/// API write requests during `secs` seconds in which nothing changes.
pub fn quiet_writes(tb: &Testbed, secs: u64) -> Result<(u64, u64)> {
    let before = tb.api_write_count()?;
    sys::sleep(Duration::from_secs(secs))?;
    Ok((before, tb.api_write_count()?))
}

/// How long `check` watches for API writes: longer than two agent resyncs, so a
/// resync that writes cannot hide between them.
pub const QUIET_SECONDS: u64 = 2 * RESYNC_SECONDS + 5;

/// Runs every check, printing as it goes; returns the outcomes.
pub fn run(tb: &mut Testbed) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    let n = tb.state.nodes.len();
    println!(
        "== waiting for a full mesh ({n} nodes, {} peer(s) each)",
        n.saturating_sub(1)
    );
    let t0 = Instant::now();
    tb.wait_mesh(Duration::from_secs(60))?;
    println!("full mesh after {:.2} s", t0.elapsed().as_secs_f64());

    println!(
        "\n== (a) traffic matrix over every class, (b) capture on the underlay bridge during it (host encryption {}, masquerade {})",
        if tb.state.encrypt_host_traffic { "on" } else { "off" },
        match tb.state.masquerade {
            Some(false) => "off",
            _ => "on",
        }
    );
    let capture = Capture::start(tb, "check")?;
    let runs = traffic_classes(tb);
    let captured = capture.stop(tb)?;
    let runs = runs?;
    report_classes(tb, &runs, &captured, &mut outcomes);
    let _ = std::fs::copy(&captured.file, tb.state.dir.join("underlay.pcap"));

    println!("\n== (d) API writes while nothing changes ({QUIET_SECONDS} s: over 2 resyncs of {RESYNC_SECONDS} s)");
    sys::sleep(Duration::from_secs(1))?;
    let (before, after) = quiet_writes(tb, QUIET_SECONDS)?;
    println!("write requests: {before} before, {after} after");
    outcomes.push(Outcome::new(
        "quiet-no-writes",
        before == after,
        format!(
            "{} write request(s) in {QUIET_SECONDS} s of quiet",
            after - before
        ),
    ));

    println!(
        "\n== (c) convergence with {n} nodes: add a node, then remove it (devices polled every 50 ms)"
    );
    match convergence(tb, tb.state.pods_per_node.min(1)) {
        Ok(c) => {
            println!(
                "add-node {}: set up in {:.2} s; its key was on its Node {:.2} s after its agent started; \
                 every device had the peer {:.3} s after that ({:.2} s from add-node)",
                c.node,
                c.setup_s,
                c.publish_s,
                c.add_s,
                c.setup_s + c.publish_s + c.add_s
            );
            println!("remove-node {}: the peer was gone from every device {:.3} s after the Node was deleted", c.node, c.remove_s);
            outcomes.push(Outcome::new(
                "convergence",
                true,
                format!(
                    "{} nodes + 1: add {:.3} s after the key was published, remove {:.3} s",
                    n, c.add_s, c.remove_s
                ),
            ));
        }
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        Err(e) => outcomes.push(Outcome::new("convergence", false, e.to_string())),
    }
    Ok(outcomes)
}
