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
//! tcpdump writes a pcap file (`-w`, `-U`: each packet flushed as it is
//! captured) and nothing else: the checks read the packets' own headers, not
//! tcpdump's text. On `-i any` the link type is LINUX_SLL2, whose header names the
//! interface each frame was seen on; each packet keeps the capture's time stamp
//! (Unix seconds), so one capture can be split into windows: per traffic class
//! in `check`, per phase in a drill. The file opens in `tcpdump -r` or Wireshark.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket, TransportSlice};
use ipnet::IpNet;
use pcap_file::pcap::PcapReader;
use pcap_file::{DataLink, TsResolution};

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
    /// Unix seconds, from the pcap record.
    pub t: f64,
    pub kind: Kind,
    /// A one-line summary in tcpdump's style (time, interface, addresses, protocol).
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
    /// The first few plaintext packets, summarised.
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
    /// Starts tcpdump writing every inbound frame on every interface of the
    /// underlay namespace to a pcap file, flushed per packet (`-U`), with no
    /// kernel-side batching (`--immediate-mode`) and a 256-byte snapshot: enough
    /// for the headers and for the packet an ICMP error quotes.
    pub fn start(tb: &mut Testbed, label: &str) -> Result<Self> {
        let file = tb.state.dir.join(format!("underlay-{label}.pcap"));
        let _ = std::fs::remove_file(&file);
        let u = tb.state.underlay_ns.clone();
        // Drop a previous capture's record, if it was left (one capture at a time).
        tb.state.processes.retain(|p| p.name != "capture");
        let mut argv: Vec<String> = [
            "tcpdump",
            "-i",
            "any",
            "-Q",
            "in",
            "-n",
            "-U",
            "-s",
            "256",
            "-B",
            "8192",
            "--immediate-mode",
            "-w",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.push(file.display().to_string());
        let pid = tb.spawn("capture", &u, &argv, None)?;
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
        let pcap = std::fs::read(&self.file)
            .map_err(|e| Error::io(format!("{}", self.file.display()), e))?;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let links = sys::ip(&tb.state.underlay_ns, &["-o", "link", "show"])?;
        let classifier = Classifier::of(tb);
        let packets = classifier
            .parse(&pcap, &interface_names(&links))
            .map_err(|e| Error::Other(format!("{}: {e}", self.file.display())))?;
        Ok(Captured {
            file: self.file,
            packets,
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

/// LINKTYPE_LINUX_SLL2's header (tcpdump.org/linktypes/LINKTYPE_LINUX_SLL2.html):
/// protocol (2 bytes), reserved (2), interface index (4), ARPHRD type (2), packet
/// type (1), address length (1), address (8).
const SLL2_LEN: usize = 20;

/// What the classification needs from one IP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Headers {
    src: IpAddr,
    dst: IpAddr,
    l4: L4,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum L4 {
    Udp(u16, u16),
    Tcp(u16, u16),
    Icmp {
        v6: bool,
        kind: u8,
        /// The packet an ICMP error quotes (type 3/11/12 for v4, 1–4 for v6).
        quoted: Option<Box<Headers>>,
    },
    Other(u8),
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

    /// Reads a LINUX_SLL2 pcap (tcpdump `-i any -w`) and classifies every IP
    /// packet; non-IP frames (ARP) are skipped, and so are frames seen on the
    /// bridge itself: a frame for the underlay host shows on its bridge port and
    /// again on the bridge, and counts once. `names` maps interface indices to
    /// names (for the summaries and to know the bridge).
    pub fn parse(
        &self,
        pcap: &[u8],
        names: &HashMap<u32, String>,
    ) -> std::result::Result<Vec<Packet>, String> {
        let mut reader = PcapReader::new(pcap).map_err(|e| format!("not a pcap file ({e})"))?;
        let link = reader.header().datalink;
        if link != DataLink::LINUX_SLL2 {
            return Err(format!(
                "link type {link:?}, expected LINUX_SLL2 (tcpdump -i any on libpcap >= 1.10)"
            ));
        }
        // Records are read raw: pcap-file 2's checked reader refuses a record
        // whose original length exceeds the snapshot length, which is every
        // packet the 256-byte snapshot cut.
        let frac = match reader.header().ts_resolution {
            TsResolution::MicroSecond => 1e-6,
            TsResolution::NanoSecond => 1e-9,
        };
        let mut out = Vec::new();
        let mut n = 0usize;
        while let Some(record) = reader.next_raw_packet() {
            n += 1;
            let record = record.map_err(|e| format!("record {n}: {e}"))?;
            let data = &record.data[..];
            if data.len() < SLL2_LEN {
                return Err(format!(
                    "record {n}: {} bytes, shorter than a LINUX_SLL2 header",
                    data.len()
                ));
            }
            let protocol = u16::from_be_bytes([data[0], data[1]]);
            let ifindex = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
            let ifname = names
                .get(&ifindex)
                .cloned()
                .unwrap_or_else(|| format!("if{ifindex}"));
            if ifname == super::topology::BRIDGE {
                continue;
            }
            let Some(headers) = headers(EtherType(protocol), &data[SLL2_LEN..]) else {
                continue;
            };
            let t = f64::from(record.ts_sec) + f64::from(record.ts_frac) * frac;
            out.push(Packet {
                t,
                kind: self.kind(&headers),
                line: format!("{t:.6} {ifname} {}", headers.summary()),
            });
        }
        Ok(out)
    }

    fn is_pod(&self, ip: IpAddr) -> bool {
        self.pod_nets.iter().any(|c| c.contains(&ip))
    }

    fn kind(&self, h: &Headers) -> Kind {
        let wg = |l4: &L4| matches!(*l4, L4::Udp(s, d) if s == WG_PORT || d == WG_PORT);
        let (wireguard, quoted_pod) = match &h.l4 {
            L4::Icmp {
                quoted: Some(q), ..
            } => (wg(&q.l4), self.is_pod(q.src) || self.is_pod(q.dst)),
            l4 => (wg(l4), false),
        };
        let pod = self.is_pod(h.src) || self.is_pod(h.dst) || quoted_pod;
        // IPv6 neighbour discovery and router messages (the IPv6 form of ARP).
        let ndp = matches!(h.l4, L4::Icmp { v6: true, kind, .. } if (133..=137).contains(&kind));
        if pod {
            // A pod address outside WireGuard, or WireGuard with a pod address
            // outside (which cannot be ours): plaintext either way.
            Kind::PodPlaintext
        } else if wireguard {
            Kind::WireGuard
        } else if self.host_encryption && !ndp && is_node_address(h.src) && is_node_address(h.dst) {
            Kind::HostPlaintext
        } else {
            Kind::Other
        }
    }
}

/// The IP and transport headers of a frame's payload (laxly: a snapshot may
/// cut the payload, and an ICMP error quotes only the start of a packet).
fn headers(ether_type: EtherType, payload: &[u8]) -> Option<Headers> {
    let sliced = LaxSlicedPacket::from_ether_type(ether_type, payload);
    ip_headers(&sliced)
}

fn ip_headers(p: &LaxSlicedPacket<'_>) -> Option<Headers> {
    let (src, dst, proto) = match p.net.as_ref()? {
        LaxNetSlice::Ipv4(ip) => {
            let h = ip.header();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                ip.payload_ip_number(),
            )
        }
        LaxNetSlice::Ipv6(ip) => {
            let h = ip.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                ip.payload().ip_number,
            )
        }
        LaxNetSlice::Arp(_) => return None,
    };
    let l4 = match &p.transport {
        Some(TransportSlice::Udp(u)) => L4::Udp(u.source_port(), u.destination_port()),
        Some(TransportSlice::Tcp(t)) => L4::Tcp(t.source_port(), t.destination_port()),
        Some(TransportSlice::Icmpv4(i)) => {
            let kind = i.type_u8();
            let error = matches!(kind, 3 | 11 | 12);
            L4::Icmp {
                v6: false,
                kind,
                quoted: error.then(|| quoted(i.payload())).flatten(),
            }
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let kind = i.type_u8();
            let error = (1..=4).contains(&kind);
            L4::Icmp {
                v6: true,
                kind,
                quoted: error.then(|| quoted(i.payload())).flatten(),
            }
        }
        _ => L4::Other(proto.0),
    };
    Some(Headers { src, dst, l4 })
}

/// The packet an ICMP error carries after its header.
fn quoted(payload: &[u8]) -> Option<Box<Headers>> {
    let inner = LaxSlicedPacket::from_ip(payload).ok()?;
    ip_headers(&inner).map(Box::new)
}

impl Headers {
    /// `IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP`, in tcpdump's style.
    fn summary(&self) -> String {
        let ip = if self.src.is_ipv6() { "IP6" } else { "IP" };
        let (s, d) = (self.src, self.dst);
        match &self.l4 {
            L4::Udp(sp, dp) => format!("{ip} {s}.{sp} > {d}.{dp}: UDP"),
            L4::Tcp(sp, dp) => format!("{ip} {s}.{sp} > {d}.{dp}: TCP"),
            L4::Icmp { v6, kind, quoted } => {
                let name = match (v6, kind) {
                    (false, 0) | (true, 129) => "echo reply".to_string(),
                    (false, 8) | (true, 128) => "echo request".to_string(),
                    (true, 135) => "neighbor solicitation".to_string(),
                    (true, 136) => "neighbor advertisement".to_string(),
                    (_, k) => format!("type {k}"),
                };
                let icmp = if *v6 { "ICMP6" } else { "ICMP" };
                match quoted {
                    Some(q) => format!("{ip} {s} > {d}: {icmp} {name}, quoting {}", q.summary()),
                    None => format!("{ip} {s} > {d}: {icmp} {name}"),
                }
            }
            L4::Other(p) => format!("{ip} {s} > {d}: protocol {p}"),
        }
    }
}

/// Interface index → name, from `ip -o link show` ("12: v-n1@if11: <...").
fn interface_names(ip_o_link: &str) -> HashMap<u32, String> {
    ip_o_link
        .lines()
        .filter_map(|l| {
            let mut f = l.split(": ");
            let index = f.next()?.trim().parse().ok()?;
            let name = f.next()?.split('@').next()?.trim().to_string();
            Some((index, name))
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, PacketBuilder};
    use pcap_file::pcap::{PcapHeader, PcapWriter, RawPcapPacket};

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

    const V_N1: u32 = 3;
    const V_N2: u32 = 4;
    const BR0: u32 = 2;

    fn names() -> HashMap<u32, String> {
        interface_names(
            "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN\\    link/loopback\n\
             2: br0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\\    link/ether\n\
             3: v-n1@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 master br0 state UP\\    link/ether\n\
             4: v-n2@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 master br0 state UP\\    link/ether\n",
        )
    }

    fn v4(s: &str) -> [u8; 4] {
        s.parse::<std::net::Ipv4Addr>().unwrap().octets()
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }

    /// One frame as `tcpdump -i any` records it: a LINUX_SLL2 header, then the packet.
    fn frame(ifindex: u32, ether_type: u16, packet: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(SLL2_LEN + packet.len());
        f.extend_from_slice(&ether_type.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&ifindex.to_be_bytes());
        f.extend_from_slice(&1u16.to_be_bytes()); // ARPHRD_ETHER
        f.push(0); // PACKET_HOST
        f.push(6);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0, 0]);
        f.extend_from_slice(packet);
        f
    }

    fn build(b: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        b(&mut v);
        v
    }

    /// A pcap of (seconds, ifindex, ether type, packet), as tcpdump -w writes it.
    fn pcap(frames: &[(f64, u32, u16, Vec<u8>)]) -> Vec<u8> {
        let header = PcapHeader {
            datalink: DataLink::LINUX_SLL2,
            snaplen: 256,
            ..Default::default()
        };
        let mut w = PcapWriter::with_header(Vec::new(), header).unwrap();
        for (t, ifindex, et, p) in frames {
            let mut data = frame(*ifindex, *et, p);
            let orig = data.len() as u32;
            data.truncate(256);
            w.write_raw_packet(&RawPcapPacket {
                ts_sec: t.trunc() as u32,
                ts_frac: (t.fract() * 1e6).round() as u32,
                incl_len: data.len() as u32,
                orig_len: orig,
                data: data.into(),
            })
            .unwrap();
        }
        w.into_writer()
    }

    /// An IPv4 echo request.
    fn echo4(s: &str, d: &str) -> Vec<u8> {
        build(|v| {
            PacketBuilder::ipv4(v4(s), v4(d), 64)
                .icmpv4_echo_request(1, 1)
                .write(v, &[0; 56])
                .unwrap()
        })
    }

    /// An IPv4 UDP datagram of `len` payload bytes.
    fn udp4(s: &str, sp: u16, d: &str, dp: u16, len: usize) -> Vec<u8> {
        build(|v| {
            PacketBuilder::ipv4(v4(s), v4(d), 64)
                .udp(sp, dp)
                .write(v, &vec![0; len])
                .unwrap()
        })
    }

    /// An IPv4 TCP segment without payload.
    fn tcp4(s: &str, sp: u16, d: &str, dp: u16) -> Vec<u8> {
        build(|v| {
            PacketBuilder::ipv4(v4(s), v4(d), 64)
                .tcp(sp, dp, 1, 64240)
                .write(v, &[])
                .unwrap()
        })
    }

    /// What each packet of a capture was, host encryption off.
    fn kinds(file: &[u8]) -> Vec<Kind> {
        classifier(false)
            .parse(file, &names())
            .unwrap()
            .iter()
            .map(|p| p.kind)
            .collect()
    }

    const IPV4: u16 = 0x0800;
    const IPV6: u16 = 0x86dd;
    const ARP: u16 = 0x0806;

    /// The same traffic the text parser's test had, now as real packets.
    fn sample() -> Vec<u8> {
        let wg = vec![0u8; 128];
        // The ICMP error a dead device's host sends back about a WireGuard
        // datagram: it quotes the datagram's IP and UDP headers.
        let quoted = udp4("192.0.2.1", WG_PORT, "192.0.2.2", WG_PORT, 128);
        let unreachable = build(|v| {
            PacketBuilder::ipv4(v4("192.0.2.2"), v4("192.0.2.1"), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::Port,
                ))
                .write(v, &quoted[..28])
                .unwrap()
        });
        let frames = vec![
            (
                1000.000000,
                V_N1,
                IPV4,
                udp4("192.0.2.1", WG_PORT, "192.0.2.2", WG_PORT, 128),
            ),
            (
                1000.000001,
                V_N2,
                IPV6,
                build(|v| {
                    PacketBuilder::ipv6(v6("2001:db8:77::2"), v6("2001:db8:77::1"), 64)
                        .udp(WG_PORT, WG_PORT)
                        .write(v, &wg)
                        .unwrap()
                }),
            ),
            (1000.000002, V_N1, IPV4, echo4("10.244.0.2", "10.244.1.2")),
            (
                1000.000003,
                V_N1,
                IPV6,
                build(|v| {
                    PacketBuilder::ipv6(v6("fd00:10:244::2"), v6("fd00:10:244:1::2"), 64)
                        .icmpv6_echo_request(1, 1)
                        .write(v, &[0; 56])
                        .unwrap()
                }),
            ),
            (1000.000004, V_N1, ARP, vec![0; 28]),
            (
                1000.000005,
                V_N1,
                IPV4,
                tcp4("192.0.2.1", 40000, "192.0.2.254", 6443),
            ),
            (1000.000006, V_N1, IPV4, echo4("192.0.2.1", "192.0.2.2")),
            (1000.000007, V_N2, IPV4, unreachable),
            (
                1000.000008,
                V_N1,
                IPV6,
                build(|v| {
                    PacketBuilder::ipv6(v6("2001:db8:77::1"), v6("2001:db8:77::2"), 255)
                        .icmpv6(Icmpv6Type::NeighborSolicitation)
                        .write(v, &[0; 20])
                        .unwrap()
                }),
            ),
            (
                1000.000009,
                V_N1,
                IPV4,
                tcp4("192.0.2.1", 5001, "192.0.2.2", 44000),
            ),
            (1000.000010, V_N1, IPV4, echo4("10.244.0.1", "10.244.1.2")),
            // Seen again on the bridge: not counted twice.
            (1000.000011, BR0, IPV4, echo4("10.244.0.1", "192.0.2.254")),
        ];
        pcap(&frames)
    }

    fn captured(host_encryption: bool) -> Captured {
        Captured {
            file: PathBuf::new(),
            packets: classifier(host_encryption)
                .parse(&sample(), &names())
                .unwrap(),
            dropped: Some(0),
        }
    }

    #[test]
    fn pod_addresses_are_plaintext_whatever_the_mode() {
        let c = captured(false).counts(None);
        assert_eq!(c.total, 10, "ARP and the bridge's copy are not counted");
        assert_eq!(c.wireguard, 3, "2 datagrams + the ICMP error about one");
        assert_eq!(c.pod_plaintext, 3, "pod, pod v6, and the gateway source");
        assert_eq!(c.host_plaintext, 0, "host encryption is off");
        assert_eq!(
            c.wireguard_sample[0],
            "1000.000000 v-n1 IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP"
        );
        assert_eq!(
            c.wireguard_sample[2],
            "1000.000007 v-n2 IP 192.0.2.2 > 192.0.2.1: ICMP type 3, \
             quoting IP 192.0.2.1.51820 > 192.0.2.2.51820: UDP"
        );
        assert_eq!(
            c.plaintext_sample[0],
            "1000.000002 v-n1 IP 10.244.0.2 > 10.244.1.2: ICMP echo request"
        );
    }

    #[test]
    fn host_traffic_is_plaintext_only_with_host_encryption() {
        let c = captured(true).counts(None);
        // The ping and the TCP segment between two nodes; not the API traffic to
        // .254, not neighbour discovery, not the ICMP error about WireGuard.
        assert_eq!(c.host_plaintext, 2);
        assert_eq!(c.pod_plaintext, 3);
    }

    /// The gateway-failover site's addresses never belong on the underlay
    /// outside WireGuard (a leak of pod-to-site traffic around the tunnel);
    /// the bgp-fabric site behind the fabric router on the underlay does.
    #[test]
    fn the_site_prefix_is_plaintext_and_the_fabric_site_is_not() {
        let file = pcap(&[
            (1.0, V_N1, IPV4, echo4("10.244.2.2", "198.18.0.10")),
            (1.1, V_N1, IPV4, echo4("192.0.2.1", "198.18.0.10")),
            (1.2, V_N1, IPV4, echo4("192.0.2.1", "203.0.113.1")),
        ]);
        let kinds = kinds(&file);
        assert_eq!(
            kinds,
            [Kind::PodPlaintext, Kind::PodPlaintext, Kind::Other],
            "pod -> site, masqueraded node -> site, node -> fabric site"
        );
    }

    /// WireGuard's port with a pod address outside is not ours, and an ICMP
    /// error quoting a pod packet puts that packet's headers on the wire.
    #[test]
    fn wireguard_lookalikes_with_pod_addresses_are_plaintext() {
        let pod_udp = udp4("10.244.0.2", WG_PORT, "192.0.2.2", WG_PORT, 32);
        let error = build(|v| {
            PacketBuilder::ipv6(v6("2001:db8:77::2"), v6("2001:db8:77::1"), 64)
                .icmpv6(Icmpv6Type::DestinationUnreachable(
                    icmpv6::DestUnreachableCode::Port,
                ))
                .write(
                    v,
                    &build(|q| {
                        PacketBuilder::ipv6(v6("fd00:10:244::2"), v6("2001:db8:77::2"), 64)
                            .udp(40000, WG_PORT)
                            .write(q, &[0; 8])
                            .unwrap()
                    }),
                )
                .unwrap()
        });
        let file = pcap(&[(2.0, V_N1, IPV4, pod_udp), (2.1, V_N2, IPV6, error)]);
        let kinds = kinds(&file);
        assert_eq!(kinds, [Kind::PodPlaintext, Kind::PodPlaintext]);
    }

    /// A snapshot cuts big packets; their headers still classify.
    #[test]
    fn truncated_packets_still_classify() {
        let big = udp4("10.244.0.2", 5000, "10.244.1.2", 5001, 1400);
        let file = pcap(&[(3.0, V_N1, IPV4, big)]);
        let p = classifier(false).parse(&file, &names()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].kind, Kind::PodPlaintext);
    }

    #[test]
    fn windows_select_by_time_stamp() {
        let cap = captured(false);
        let c = cap.counts(Some((1000.0000015, 1000.0000035)));
        assert_eq!(c.total, 2);
        assert_eq!(c.pod_plaintext, 2);
        assert!(cap.complete());
    }

    #[test]
    fn what_is_not_a_cooked_capture_is_an_error_that_says_so() {
        let err = classifier(false).parse(b"1000.0 v-n1 In IP", &names());
        assert!(err.unwrap_err().starts_with("not a pcap file"));
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            ..Default::default()
        };
        let eth = PcapWriter::with_header(Vec::new(), header)
            .unwrap()
            .into_writer();
        let err = classifier(false).parse(&eth, &names()).unwrap_err();
        assert!(err.contains("expected LINUX_SLL2"), "{err}");
        // A record cut short (tcpdump killed mid-write) is named, not skipped.
        let mut cut = sample();
        cut.truncate(cut.len() - 10);
        let err = classifier(false).parse(&cut, &names()).unwrap_err();
        assert!(err.starts_with("record 12"), "{err}");
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
