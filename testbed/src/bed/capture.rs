//! The underlay capture: a tcpdump on every port of the underlay bridge, and the rules
//! that say which packets on that wire are plaintext.
//!
//! Plaintext is:
//! - any IP packet whose source or destination is in a cluster CIDR (a pod address or
//!   a node's pod gateway address) and that is not WireGuard UDP: pod addresses
//!   never belong on the underlay, whatever the traffic class;
//! - the same for the `gateway-failover` drill's site prefix
//!   ([`super::gateway::SITE_PREFIX`]): the site hangs off its gateways' own
//!   LAN veths, so its addresses reach the underlay only inside WireGuard (pod
//!   to site traffic is carried through the mesh to the active gateway). The
//!   `bgp-fabric` drill's site is not in this set: it sits behind the fabric
//!   router on the underlay, where the gateway node routes it in the clear
//!   by design;
//! - with host encryption on (`up --encrypt-host-traffic`), also any IP packet
//!   between two node addresses that is not WireGuard UDP (to or from the WireGuard
//!   port), not an ICMP error about WireGuard UDP (a dead device's "port
//!   unreachable", which carries nothing but WireGuard's own header) and not IPv6
//!   neighbour discovery (the IPv6 form of ARP).
//!
//! Packets carry tcpdump's `-tt` time stamp (Unix seconds), so one capture can be
//! split into windows: per traffic class in `check`, per phase in a drill.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::sys;
use super::topology::{Testbed, WG_PORT};
use super::{Error, Result};

/// A running tcpdump on every port of the underlay bridge (inside the underlay
/// namespace, inbound direction only, so each frame is counted once).
pub struct Capture {
    pub file: PathBuf,
    log: PathBuf,
    pid: u32,
}

/// What a packet on the underlay was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// UDP to or from the WireGuard port (and ICMP errors about it).
    WireGuard,
    /// A pod (or pod gateway) address, or one of the site prefix, on the wire.
    PodPlaintext,
    /// Host traffic between two node addresses while host encryption is on.
    HostPlaintext,
    /// Anything else (API traffic, pod egress masqueraded to a non-node address,
    /// node-to-node host traffic with host encryption off, neighbour discovery).
    Other,
}

/// One IP packet the capture saw.
#[derive(Debug, Clone)]
pub struct Packet {
    /// Unix seconds (tcpdump `-tt`); 0 when the line had none.
    pub t: f64,
    pub kind: Kind,
    pub line: String,
}

/// A stopped capture: every IP packet, classified, and whether the capture is
/// complete (tcpdump dropped nothing).
#[derive(Debug, Clone)]
pub struct Captured {
    pub file: PathBuf,
    pub packets: Vec<Packet>,
    /// tcpdump's "packets dropped by kernel"; `None` if it did not say.
    pub dropped: Option<u64>,
}

/// Counts over a window of a capture.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub total: u64,
    pub wireguard: u64,
    pub pod_plaintext: u64,
    pub host_plaintext: u64,
    /// The first few plaintext packets, as tcpdump printed them.
    pub plaintext_sample: Vec<String>,
    /// A few WireGuard datagrams.
    pub wireguard_sample: Vec<String>,
}

impl Counts {
    pub fn plaintext(&self) -> u64 {
        self.pod_plaintext + self.host_plaintext
    }

    /// `N packets, W WireGuard, P plaintext (pod p, host h)`.
    pub fn summary(&self) -> String {
        format!(
            "{} packets, {} WireGuard, {} plaintext ({} with a pod address, {} node-to-node host)",
            self.total,
            self.wireguard,
            self.plaintext(),
            self.pod_plaintext,
            self.host_plaintext
        )
    }
}

impl Captured {
    /// Whether the capture can prove anything: tcpdump reported its drop count and
    /// dropped nothing.
    pub fn complete(&self) -> bool {
        self.dropped == Some(0)
    }

    /// Counts of the packets time-stamped in `[from, to)` (Unix seconds), or of all.
    pub fn counts(&self, window: Option<(f64, f64)>) -> Counts {
        let mut c = Counts::default();
        for p in &self.packets {
            if let Some((from, to)) = window {
                if p.t < from || p.t >= to {
                    continue;
                }
            }
            c.total += 1;
            match p.kind {
                Kind::WireGuard => {
                    c.wireguard += 1;
                    if c.wireguard_sample.len() < 3 {
                        c.wireguard_sample.push(p.line.clone());
                    }
                }
                Kind::PodPlaintext | Kind::HostPlaintext => {
                    if p.kind == Kind::PodPlaintext {
                        c.pod_plaintext += 1;
                    } else {
                        c.host_plaintext += 1;
                    }
                    if c.plaintext_sample.len() < 5 {
                        c.plaintext_sample.push(p.line.clone());
                    }
                }
                Kind::Other => {}
            }
        }
        c
    }

    /// "complete (0 dropped)" or why not.
    pub fn completeness(&self) -> String {
        match self.dropped {
            Some(0) => "complete (tcpdump dropped 0)".into(),
            Some(n) => format!("INCOMPLETE: tcpdump dropped {n} packet(s)"),
            None => "INCOMPLETE: tcpdump reported no drop count".into(),
        }
    }
}

impl Capture {
    /// Starts tcpdump printing one line per packet (`-l`, line-buffered, `-n`, `-tt`
    /// Unix time stamps) to a file. Text rather than a pcap file: reading the pcap
    /// back proved unreliable here (tcpdump reported packets "received by filter"
    /// but wrote none), and the lines are all the checks need.
    pub fn start(tb: &mut Testbed, label: &str) -> Result<Self> {
        let file = tb.state.dir.join(format!("underlay-{label}.txt"));
        let _ = std::fs::remove_file(&file);
        let u = tb.state.underlay_ns.clone();
        // Drop a previous capture's record, if it was left (one capture at a time).
        tb.state.processes.retain(|p| p.name != "capture");
        let argv: Vec<String> = [
            "tcpdump",
            "-i",
            "any",
            "-Q",
            "in",
            "-n",
            "-tt",
            "-l",
            "-s",
            "256",
            "-B",
            "8192",
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
            if !testkit::process::alive(pid, None) || Instant::now() > deadline {
                return Err(Error::Other(format!(
                    "tcpdump did not start: {}",
                    text.trim()
                )));
            }
            sys::sleep(Duration::from_millis(50))?;
        }
        Ok(Self { file, log, pid })
    }

    /// Stops tcpdump and classifies what it saw.
    pub fn stop(self, tb: &mut Testbed) -> Result<Captured> {
        // Let the last packets reach the file before stopping.
        std::thread::sleep(Duration::from_millis(500));
        // SIGTERM, not SIGINT: a shell's background jobs ignore SIGINT, and so would tcpdump.
        testkit::process::signal(self.pid, testkit::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while testkit::process::alive(self.pid, None) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if testkit::process::alive(self.pid, None) {
            testkit::process::signal(self.pid, testkit::Signal::KILL);
        }
        tb.state.processes.retain(|p| p.name != "capture");
        tb.state.save()?;
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| Error::io(format!("{}", self.file.display()), e))?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let classifier = Classifier::of(tb);
        Ok(Captured {
            file: self.file,
            packets: classifier.parse(&text),
            dropped: dropped_by_kernel(&log),
        })
    }
}

/// The rules of the module docs, for one testbed.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// The cluster CIDRs and the gateway-failover site prefix.
    pub pod_nets: Vec<IpNet>,
    pub host_encryption: bool,
}

impl Classifier {
    pub fn of(tb: &Testbed) -> Self {
        Self {
            pod_nets: tb
                .state
                .cluster_cidrs
                .iter()
                .map(String::as_str)
                .chain([super::gateway::SITE_PREFIX])
                .filter_map(|c| c.parse().ok())
                .collect(),
            host_encryption: tb.state.encrypt_host_traffic,
        }
    }

    /// Parses tcpdump `-n` (optionally `-tt`) lines; non-IP lines (ARP) are skipped.
    pub fn parse(&self, text: &str) -> Vec<Packet> {
        text.lines().filter_map(|l| self.classify(l)).collect()
    }

    fn classify(&self, line: &str) -> Option<Packet> {
        // "1717000000.123456 v-n1 In  IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP, length 128"
        // "... IP6 2001:db8:77::1.51820 > 2001:db8:77::2.51820: UDP, length 128"
        // With `-i any` the second field is the interface: a frame for the underlay
        // host shows on its bridge port and again on the bridge; count it once.
        if line.split_whitespace().nth(1) == Some(super::topology::BRIDGE) {
            return None;
        }
        let rest = line
            .split_once(" IP ")
            .or_else(|| line.split_once(" IP6 "))
            .map(|(_, r)| r)?;
        let mut parts = rest.split_whitespace();
        let (Some(src), Some(">"), Some(dst)) = (parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let t = line
            .split_whitespace()
            .next()
            .and_then(|w| w.parse::<f64>().ok())
            .unwrap_or(0.0);
        let dst = dst.trim_end_matches(':');
        let (src_ip, src_port) = split_port(src);
        let (dst_ip, dst_port) = split_port(dst);
        let payload = rest.split_once(": ").map(|(_, p)| p).unwrap_or("");
        let udp = payload.starts_with("UDP") || payload.contains(" UDP,");
        let wg_port = Some(WG_PORT);
        let wireguard = udp && (src_port == wg_port || dst_port == wg_port);
        // An ICMP error quoting a WireGuard datagram: "ICMP 192.0.2.2 udp port 51820
        // unreachable", "ICMP6, destination unreachable, unreachable port,
        // 2001:db8:77::2 udp port 51820".
        let about_wireguard = payload.starts_with("ICMP")
            && payload.contains(&format!("udp port {WG_PORT}"))
            && !payload.contains("echo");
        let ndp = payload.starts_with("ICMP6, neighbor")
            || payload.starts_with("ICMP6, router")
            || payload.starts_with("ICMP6, redirect");
        let is_pod =
            |ip: Option<IpAddr>| ip.is_some_and(|ip| self.pod_nets.iter().any(|c| c.contains(&ip)));
        let kind = if wireguard || about_wireguard {
            if is_pod(src_ip) || is_pod(dst_ip) {
                // WireGuard with a pod address outside cannot be ours: plaintext.
                Kind::PodPlaintext
            } else {
                Kind::WireGuard
            }
        } else if is_pod(src_ip) || is_pod(dst_ip) {
            Kind::PodPlaintext
        } else if self.host_encryption
            && !ndp
            && src_ip.is_some_and(is_node_address)
            && dst_ip.is_some_and(is_node_address)
        {
            Kind::HostPlaintext
        } else {
            Kind::Other
        };
        Some(Packet {
            t,
            kind,
            line: line.to_string(),
        })
    }
}

/// A node's underlay address: 192.0.2.1–250 or 2001:db8:77::1–fa (the underlay
/// host, .254 / ::fe, is not a node). Covers nodes removed since.
pub fn is_node_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[..3] == [192, 0, 2] && (1..=250).contains(&o[3])
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[..4] == [0x2001, 0xdb8, 0x77, 0] && s[4..7] == [0, 0, 0] && (1..=0xfa).contains(&s[7])
        }
    }
}

/// "3 packets dropped by kernel" in tcpdump's closing statistics.
fn dropped_by_kernel(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.contains("dropped by kernel"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
}

/// `192.0.2.1.51820` / `fd00::1.51820` → (address, port); `10.0.0.1` → (address, None).
fn split_port(token: &str) -> (Option<IpAddr>, Option<u16>) {
    if let Ok(ip) = token.parse() {
        return (Some(ip), None);
    }
    match token.rsplit_once('.') {
        Some((ip, port)) => (ip.parse().ok(), port.parse().ok()),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier(host_encryption: bool) -> Classifier {
        Classifier {
            pod_nets: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
                super::super::gateway::SITE_PREFIX.parse().unwrap(),
            ],
            host_encryption,
        }
    }

    const TEXT: &str = "\
1717000000.000000 v-n1 In  IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP, length 128
1717000000.000001 v-n2 In  IP6 2001:db8:77::2.51820 > 2001:db8:77::1.51820: UDP, length 128
1717000000.000002 v-n1 In  IP 10.244.0.2 > 10.244.1.2: ICMP echo request, id 1, seq 1, length 64
1717000000.000003 v-n1 In  IP6 fd00:10:244::2 > fd00:10:244:1::2: ICMP6, echo request, id 1, seq 1, length 64
1717000000.000004 v-n1 In  ARP, Request who-has 192.0.2.2 tell 192.0.2.1, length 28
1717000000.000005 v-n1 In  IP 192.0.2.1.40000 > 192.0.2.254.6443: Flags [S], seq 1, length 0
1717000000.000006 v-n1 In  IP 192.0.2.1 > 192.0.2.2: ICMP echo request, id 7, seq 1, length 64
1717000000.000007 v-n2 In  IP 192.0.2.2 > 192.0.2.1: ICMP 192.0.2.2 udp port 51820 unreachable, length 156
1717000000.000008 v-n1 In  IP6 2001:db8:77::1 > 2001:db8:77::2: ICMP6, neighbor solicitation, who has 2001:db8:77::2, length 32
1717000000.000009 v-n1 In  IP 192.0.2.1.5001 > 192.0.2.2.44000: Flags [S.], seq 1, length 0
1717000000.000010 v-n1 In  IP 10.244.0.1 > 10.244.1.2: ICMP echo request, id 2, seq 1, length 64
1717000000.000011 br0   In  IP 10.244.0.1 > 192.0.2.254: ICMP echo request, id 3, seq 1, length 64
";

    #[test]
    fn pod_addresses_are_plaintext_whatever_the_mode() {
        let p = classifier(false).parse(TEXT);
        let c = Captured {
            file: PathBuf::new(),
            packets: p,
            dropped: Some(0),
        }
        .counts(None);
        assert_eq!(c.total, 10);
        assert_eq!(c.wireguard, 3, "2 datagrams + the ICMP error about one");
        assert_eq!(c.pod_plaintext, 3, "pod, pod v6, and the gateway source");
        assert_eq!(c.host_plaintext, 0, "host encryption is off");
        assert_eq!(c.wireguard_sample.len(), 3);
    }

    /// The gateway-failover site's addresses never belong on the underlay
    /// outside WireGuard (a leak of pod-to-site traffic around the tunnel);
    /// the bgp-fabric site behind the fabric router on the underlay does.
    #[test]
    fn the_site_prefix_is_plaintext_and_the_fabric_site_is_not() {
        let text = "\
1717000001.000000 v-n1 In  IP 10.244.2.2 > 198.18.0.10: ICMP echo request, id 1, seq 1, length 64
1717000001.000001 v-n1 In  IP 192.0.2.1 > 198.18.0.10: ICMP echo request, id 1, seq 2, length 64
1717000001.000002 v-n1 In  IP 192.0.2.1 > 203.0.113.1: ICMP echo request, id 1, seq 3, length 64
";
        let kinds: Vec<Kind> = classifier(false)
            .parse(text)
            .iter()
            .map(|p| p.kind)
            .collect();
        assert_eq!(
            kinds,
            [Kind::PodPlaintext, Kind::PodPlaintext, Kind::Other],
            "pod -> site, masqueraded node -> site, node -> fabric site"
        );
    }

    #[test]
    fn host_traffic_is_plaintext_only_with_host_encryption() {
        let c = Captured {
            file: PathBuf::new(),
            packets: classifier(true).parse(TEXT),
            dropped: Some(0),
        }
        .counts(None);
        // The ping and the TCP segment between two nodes; not the API traffic to
        // .254, not neighbour discovery, not the ICMP error about WireGuard.
        assert_eq!(c.host_plaintext, 2);
        assert_eq!(c.pod_plaintext, 3);
    }

    #[test]
    fn windows_select_by_time_stamp() {
        let cap = Captured {
            file: PathBuf::new(),
            packets: classifier(false).parse(TEXT),
            dropped: Some(0),
        };
        let c = cap.counts(Some((1717000000.0000015, 1717000000.0000035)));
        assert_eq!(c.total, 2);
        assert_eq!(c.pod_plaintext, 2);
        assert!(cap.complete());
    }

    #[test]
    fn drop_counts_come_from_tcpdump_statistics() {
        let log = "listening on any\n12 packets captured\n12 packets received by filter\n3 packets dropped by kernel\n";
        assert_eq!(dropped_by_kernel(log), Some(3));
        assert_eq!(dropped_by_kernel("listening on any\n"), None);
    }

    #[test]
    fn node_addresses() {
        assert!(is_node_address("192.0.2.1".parse().unwrap()));
        assert!(is_node_address("2001:db8:77::c".parse().unwrap()));
        assert!(!is_node_address("192.0.2.254".parse().unwrap()));
        assert!(!is_node_address("2001:db8:77::fe".parse().unwrap()));
        assert!(!is_node_address("10.244.0.1".parse().unwrap()));
    }
}
