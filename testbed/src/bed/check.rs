//! `check`: the ping matrix, the underlay capture, convergence times and quiet-time
//! API writes, each a named pass/fail with the figures that prove it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::sys;
use super::topology::{Testbed, WG_PORT};
use super::{Error, Result};

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// A ping matrix: `rtt_ms[from][to]` is `None` for a failed ping, and the diagonal
/// block of a node's own pods is not tested (that traffic never leaves the node).
pub struct Matrix {
    pub family: &'static str,
    pub pods: Vec<(String, String, IpAddr)>,
    pub rtt_ms: Vec<Vec<Option<Option<f64>>>>,
}

impl Matrix {
    pub fn failures(&self) -> usize {
        self.rtt_ms
            .iter()
            .flatten()
            .filter(|c| matches!(c, Some(None)))
            .count()
    }

    pub fn tested(&self) -> usize {
        self.rtt_ms.iter().flatten().filter(|c| c.is_some()).count()
    }

    /// Rows = from, columns = to.
    pub fn render(&self) -> String {
        let w = self
            .pods
            .iter()
            .map(|p| p.0.len())
            .max()
            .unwrap_or(4)
            .max(10);
        let mut out = format!("{:w$}", format!("{} from\\to", self.family));
        for (name, _, _) in &self.pods {
            out.push_str(&format!(" {name:>w$}"));
        }
        out.push('\n');
        for (i, (name, _, _)) in self.pods.iter().enumerate() {
            out.push_str(&format!("{name:w$}"));
            for cell in &self.rtt_ms[i] {
                let text = match cell {
                    None => "·".to_string(),
                    Some(Some(ms)) => format!("✓ {ms:.2}ms"),
                    Some(None) => "✗".to_string(),
                };
                out.push_str(&format!(" {text:>w$}"));
            }
            out.push('\n');
        }
        out
    }
}

/// Every pod pings every pod on every other node (in parallel, 2 echo requests each;
/// one reply is a pass).
pub fn ping_matrix(tb: &Testbed, v6: bool) -> Result<Matrix> {
    let pods: Vec<(String, String, IpAddr)> = tb
        .state
        .pods()
        .filter_map(|(n, p)| {
            let ip = p.ips.iter().find(|a| a.is_ipv6() == v6)?;
            Some((p.name.clone(), n.name.clone(), *ip))
        })
        .collect();
    let mut jobs = Vec::new();
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in pods.iter().enumerate() {
            if from.1 != to.1 {
                jobs.push((i, j));
            }
        }
    }
    let mut rtt = vec![vec![None; pods.len()]; pods.len()];
    for chunk in jobs.chunks(64) {
        if sys::interrupted() {
            return Err(Error::Interrupted);
        }
        let handles: Vec<_> = chunk
            .iter()
            .map(|&(i, j)| {
                let ns = tb
                    .state
                    .pods()
                    .find(|(_, p)| p.name == pods[i].0)
                    .map(|(_, p)| p.ns.clone())
                    .unwrap_or_default();
                let target = pods[j].2.to_string();
                std::thread::spawn(move || (i, j, ping(&ns, &target)))
            })
            .collect();
        for h in handles {
            if let Ok((i, j, r)) = h.join() {
                rtt[i][j] = Some(r);
            }
        }
    }
    Ok(Matrix {
        family: if v6 { "IPv6" } else { "IPv4" },
        pods,
        rtt_ms: rtt,
    })
}

fn ping(ns: &str, target: &str) -> Option<f64> {
    let out = sys::netns_exec(
        ns,
        &[
            "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2", target,
        ],
    )
    .ok()?;
    // rtt min/avg/max/mdev = 0.050/0.061/0.072/0.011 ms
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim();
    nums.split('/').nth(1)?.trim().parse().ok()
}

/// A tcpdump on every port of the underlay bridge (inside the underlay namespace,
/// inbound direction only, so each frame is counted once).
pub struct Capture {
    pub file: PathBuf,
    pid: u32,
}

/// What the capture saw.
#[derive(Debug, Clone)]
pub struct CaptureCounts {
    pub total: u64,
    /// UDP datagrams to a WireGuard port.
    pub wireguard: u64,
    /// IP packets on the underlay whose source or destination is a pod address.
    pub plaintext: u64,
    /// A few of the WireGuard datagrams, as tcpdump prints them.
    pub sample: Vec<String>,
}

impl Capture {
    /// Starts tcpdump printing one line per packet (`-l`, line-buffered, `-n`)
    /// to a file. Text rather than a pcap file: reading the pcap back proved
    /// unreliable here (tcpdump reported packets "received by filter" but
    /// wrote none), and the lines are all the check needs.
    pub fn start(tb: &mut Testbed) -> Result<Self> {
        let file = tb.state.dir.join("underlay.txt");
        let _ = std::fs::remove_file(&file);
        let u = tb.state.underlay_ns.clone();
        let argv: Vec<String> = [
            "tcpdump",
            "-i",
            "any",
            "-Q",
            "in",
            "-n",
            "-l",
            "--immediate-mode",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pid = tb.spawn("capture", &u, &argv, Some(&file))?;
        let log = tb.state.dir.join("logs").join("capture.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("listening on") {
                break;
            }
            if !sys::alive(pid, None) || Instant::now() > deadline {
                return Err(Error::Other(format!(
                    "tcpdump did not start: {}",
                    text.trim()
                )));
            }
            sys::sleep(Duration::from_millis(50))?;
        }
        Ok(Self { file, pid })
    }

    pub fn stop(self, tb: &mut Testbed) -> Result<CaptureCounts> {
        // Let the last packets reach the file before stopping.
        std::thread::sleep(Duration::from_millis(500));
        // SIGTERM, not SIGINT: a shell's background jobs ignore SIGINT, and so would tcpdump.
        sys::signal(self.pid as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while sys::alive(self.pid, None) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if sys::alive(self.pid, None) {
            sys::signal(self.pid as i32, libc::SIGKILL);
        }
        tb.state.processes.retain(|p| p.name != "capture");
        tb.state.save()?;
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| Error::io(format!("{}", self.file.display()), e))?;
        let cidrs: Vec<ipnet::IpNet> = tb
            .state
            .cluster_cidrs
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        Ok(count_capture(&text, &cidrs))
    }
}

/// Counts tcpdump `-n` lines: all IP packets, UDP datagrams to the WireGuard
/// port, and packets whose source or destination is a pod address (which
/// must never appear on the underlay: they would be plaintext).
pub fn count_capture(text: &str, pod_cidrs: &[ipnet::IpNet]) -> CaptureCounts {
    let mut counts = CaptureCounts {
        total: 0,
        wireguard: 0,
        plaintext: 0,
        sample: Vec::new(),
    };
    for line in text.lines() {
        // "... IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP, length 128"
        // "... IP6 fd00::1.51820 > fd00::2.51820: UDP, length 128"
        let Some(rest) = line
            .split_once(" IP ")
            .or_else(|| line.split_once(" IP6 "))
            .map(|(_, r)| r)
        else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(src), Some(">"), Some(dst)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        counts.total += 1;
        let dst = dst.trim_end_matches(':');
        let (src_ip, _) = split_port(src);
        let (dst_ip, dst_port) = split_port(dst);
        let is_pod = |ip: Option<std::net::IpAddr>| {
            ip.is_some_and(|ip| pod_cidrs.iter().any(|c| c.contains(&ip)))
        };
        if is_pod(src_ip) || is_pod(dst_ip) {
            counts.plaintext += 1;
        } else if rest.contains(": UDP") && dst_port == Some(WG_PORT) {
            counts.wireguard += 1;
            if counts.sample.len() < 3 {
                counts.sample.push(rest.to_string());
            }
        }
    }
    counts
}

/// `192.0.2.1.51820` / `fd00::1.51820` → (address, port); `10.0.0.1` → (address, None).
fn split_port(token: &str) -> (Option<std::net::IpAddr>, Option<u16>) {
    if let Ok(ip) = token.parse() {
        return (Some(ip), None);
    }
    match token.rsplit_once('.') {
        Some((ip, port)) => (ip.parse().ok(), port.parse().ok()),
        None => (None, None),
    }
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
            sys::uapi_peers(&tb.sock(n))
                .is_some_and(|ps| ps.iter().any(|p| p.public_key_b64() == key))
        });
        let complete = sys::uapi_peers(&tb.sock(&new)).is_some_and(|ps| ps.len() == others.len());
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
            sys::uapi_peers(&tb.sock(n))
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

/// Runs every check, printing as it goes; returns the outcomes.
pub fn run(tb: &mut Testbed) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    let n = tb.state.nodes.len();
    println!(
        "== waiting for a full mesh ({n} nodes, {} peer(s) each)",
        n.saturating_sub(1)
    );
    tb.wait_mesh(Duration::from_secs(60))?;

    println!("\n== (a) ping matrix, (b) capture on the underlay bridge during it");
    let capture = Capture::start(tb)?;
    let mut matrices = vec![ping_matrix(tb, false)?];
    if tb.state.dual_stack {
        matrices.push(ping_matrix(tb, true)?);
    }
    let counts = capture.stop(tb)?;
    for m in &matrices {
        println!("{}", m.render());
        let f = m.failures();
        outcomes.push(Outcome {
            name: if m.family == "IPv4" {
                "ping-matrix-ipv4"
            } else {
                "ping-matrix-ipv6"
            },
            ok: f == 0 && m.tested() > 0,
            detail: format!(
                "{} of {} cross-node pod pairs answered",
                m.tested() - f,
                m.tested()
            ),
        });
    }
    println!(
        "capture ({}): {} packets; UDP to WireGuard port {WG_PORT}: {}; plaintext packets from/to pod CIDRs ({}): {}",
        counts_file(tb),
        counts.total,
        counts.wireguard,
        tb.state.cluster_cidrs.join(", "),
        counts.plaintext
    );
    for s in &counts.sample {
        println!("  e.g. {s}");
    }
    outcomes.push(Outcome {
        name: "capture-ciphertext-only",
        ok: counts.wireguard > 0 && counts.plaintext == 0,
        detail: format!(
            "{} WireGuard datagrams, {} plaintext pod packets on the underlay",
            counts.wireguard, counts.plaintext
        ),
    });

    println!("\n== (d) API writes while nothing changes (5 s)");
    sys::sleep(Duration::from_secs(1))?;
    let (before, after) = quiet_writes(tb, 5)?;
    println!("write requests: {before} before, {after} after");
    outcomes.push(Outcome {
        name: "quiet-no-writes",
        ok: before == after,
        detail: format!("{} write request(s) in 5 s of quiet", after - before),
    });

    println!("\n== (c) convergence: add a node, then remove it (UAPI polled every 50 ms)");
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
            outcomes.push(Outcome {
                name: "convergence",
                ok: true,
                detail: format!(
                    "add {:.3} s after the key was published, remove {:.3} s",
                    c.add_s, c.remove_s
                ),
            });
        }
        Err(Error::Interrupted) => return Err(Error::Interrupted),
        Err(e) => outcomes.push(Outcome {
            name: "convergence",
            ok: false,
            detail: e.to_string(),
        }),
    }
    Ok(outcomes)
}

fn counts_file(tb: &Testbed) -> String {
    tb.state.dir.join("underlay.txt").display().to_string()
}

#[cfg(test)]
mod capture_tests {
    use super::*;

    #[test]
    fn counts_wireguard_and_plaintext_lines() {
        let cidrs: Vec<ipnet::IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:10:244::/56".parse().unwrap(),
        ];
        let text = "\
12:00:00.000000 u0 In  IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP, length 128
12:00:00.000001 u1 In  IP6 fd00:99::2.51820 > fd00:99::1.51820: UDP, length 128
12:00:00.000002 u0 In  IP 10.244.0.2 > 10.244.1.2: ICMP echo request, id 1, seq 1, length 64
12:00:00.000003 u0 In  IP6 fd00:10:244::2 > fd00:10:244:1::2: ICMP6, echo request, id 1, seq 1, length 64
12:00:00.000004 u0 In  ARP, Request who-has 192.0.2.2 tell 192.0.2.1, length 28
12:00:00.000005 u0 In  IP 192.0.2.1.40000 > 192.0.2.254.6443: Flags [S], seq 1, length 0
";
        let c = count_capture(text, &cidrs);
        assert_eq!(c.total, 5);
        assert_eq!(c.wireguard, 2);
        assert_eq!(c.plaintext, 2);
        assert_eq!(c.sample.len(), 2);
    }
}
