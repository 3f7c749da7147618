//! Wire compatibility of wgmesh's userspace data plane (`wgmesh dataplane`)
//! with the reference implementations, over real TUN devices, UDP and routes in
//! network namespaces (shared/DESIGN.md, testing ladder step 3). Needs root.
//!
//! Each case builds namespaces A and B joined by a veth pair (MTU 1500, an
//! IPv4 or IPv6 underlay), runs one implementation in each, configures both
//! with `wg set` (no persistent keepalive, so nothing is sent until the test
//! sends), and checks:
//! - only the chosen initiator (A or B) has its peer's endpoint, so only it
//!   can start the handshake; the responder learns the initiator's endpoint
//!   from it. No handshake before the first packet, except that a wgmesh
//!   initiator starts one with a new peer at once (by design: after a data
//!   plane restart that replaces the session the other side still holds);
//! - ping over the tunnel both ways, IPv4 and IPv6, and full-size packets with
//!   DF set (tunnel MTU 1420 = 1500 - 80);
//! - a 20 MiB TCP transfer each way on each family, every byte verified;
//! - `wg show IFACE dump` on both sides: the peer's public key, a recent
//!   latest-handshake and transfer counters covering the traffic;
//! - SIGTERM stops each daemon, which removes its UAPI socket and its TUN device.
//!
//! `control_*` cases pair wireguard-go with boringtun-cli: they prove the
//! harness and must keep passing whatever happens to wgmesh.
//! `wgmesh_dataplane::*` cases put wgmesh on one side; their failure message
//! carries both daemons' logs.
//!
//! Prerequisites: root, ip, wg, ping, timeout, bash, wireguard-go, boringtun-cli,
//! /dev/net/tun and network namespaces. When one is missing a case prints a
//! SKIP line naming it and passes, unless CI=true, where it fails.
//!
//! Hygiene (DESIGN.md): namespaces are wgrt-<pid>-<n>-a|b, interfaces
//! wr<hexpid>x<n>..., unique per process and case, so cases could run in
//! parallel; they run one at a time anyway (two reference daemons and a 20 MiB
//! transfer per case are plenty for a small CI machine). Dropping a case's
//! `Pair` (also while unwinding from a failed assertion) stops its daemons and
//! deletes its namespaces. If the process dies without unwinding (Ctrl-C,
//! SIGKILL), the daemons get the same Ctrl-C, and a guardian started from
//! scripts/netns-lib.sh outside our process group deletes the namespaces;
//! leftovers of dead runs are also reaped when the next run starts.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, Once, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---- the cases ----------------------------------------------------------

/// Harness guard: two reference implementations, A initiates, IPv4 underlay.
#[test]
fn control_wireguard_go_vs_boringtun_a_initiates_v4_underlay() {
    run_case(
        "control_wireguard_go_vs_boringtun_a_initiates_v4_underlay",
        Case::new(Impl::WireguardGo, Impl::Boringtun, Side::A, Family::V4),
    );
}

/// Harness guard: two reference implementations, B initiates, IPv6 underlay.
#[test]
fn control_wireguard_go_vs_boringtun_b_initiates_v6_underlay() {
    run_case(
        "control_wireguard_go_vs_boringtun_b_initiates_v6_underlay",
        Case::new(Impl::WireguardGo, Impl::Boringtun, Side::B, Family::V6),
    );
}

/// Cases that need wgmesh's data plane; wgmesh always runs in namespace A.
mod wgmesh_dataplane {
    use super::{run_case, Case, Family, Impl, Side};

    #[test]
    fn vs_wireguard_go_a_initiates_v4_underlay() {
        run_case(
            "wgmesh_dataplane::vs_wireguard_go_a_initiates_v4_underlay",
            Case::new(Impl::Wgmesh, Impl::WireguardGo, Side::A, Family::V4),
        );
    }

    #[test]
    fn vs_wireguard_go_b_initiates_v6_underlay() {
        run_case(
            "wgmesh_dataplane::vs_wireguard_go_b_initiates_v6_underlay",
            Case::new(Impl::Wgmesh, Impl::WireguardGo, Side::B, Family::V6),
        );
    }

    #[test]
    fn vs_boringtun_a_initiates_v6_underlay() {
        run_case(
            "wgmesh_dataplane::vs_boringtun_a_initiates_v6_underlay",
            Case::new(Impl::Wgmesh, Impl::Boringtun, Side::A, Family::V6),
        );
    }

    #[test]
    fn vs_boringtun_b_initiates_v4_underlay() {
        run_case(
            "wgmesh_dataplane::vs_boringtun_b_initiates_v4_underlay",
            Case::new(Impl::Wgmesh, Impl::Boringtun, Side::B, Family::V4),
        );
    }
}

// ---- constants and case description -------------------------------------

const UAPI_DIR: &str = "/var/run/wireguard";
const NETNS_LIB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns-lib.sh");
const LISTEN_PORT: u16 = 51820;
const UNDERLAY_MTU: u32 = 1500;
/// IPv6 (40) + UDP (8) + WireGuard data header and tag (32) = 80.
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 80;
const TRANSFER_BYTES: usize = 20 * 1024 * 1024;
const START_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for any helper command (ip, wg, ping), run under timeout(1).
const COMMAND_TIMEOUT_SECS: u32 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    Wgmesh,
    WireguardGo,
    Boringtun,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::Wgmesh => "wgmesh dataplane",
            Impl::WireguardGo => "wireguard-go",
            Impl::Boringtun => "boringtun-cli",
        }
    }

    /// boringtun-cli 0.7 reports `last_handshake_time_sec` as the handshake's
    /// age rather than a Unix time (cloudflare/boringtun#447), so `wg` shows
    /// it as 1970. The others must report a Unix time.
    fn handshake_is_age(self) -> bool {
        self == Impl::Boringtun
    }

    /// The daemon, in the foreground, run inside `ns` by `ip netns exec` (which
    /// execs, so the child is the daemon itself).
    fn command(self, ns: &str, iface: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        match self {
            Impl::Wgmesh => {
                c.arg(env!("CARGO_BIN_EXE_wgmesh"))
                    .args(["dataplane", "--interface", iface])
                    .env("RUST_LOG", "debug")
                    .env("RUST_BACKTRACE", "1");
            }
            Impl::WireguardGo => {
                c.args(["wireguard-go", "-f", iface])
                    .env("WG_PROCESS_FOREGROUND", "1")
                    .env("LOG_LEVEL", "verbose");
            }
            Impl::Boringtun => {
                c.arg(boringtun_bin().unwrap_or_else(|| PathBuf::from("boringtun-cli")))
                    .args(["--foreground", "--disable-drop-privileges"])
                    .args(["--threads", "1", "--verbosity", "debug", iface])
                    .env("NO_COLOR", "1");
            }
        }
        c
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    /// The node's index in a `Pair`.
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    a: Impl,
    b: Impl,
    initiator: Side,
    underlay: Family,
}

impl Case {
    fn new(a: Impl, b: Impl, initiator: Side, underlay: Family) -> Self {
        Case {
            a,
            b,
            initiator,
            underlay,
        }
    }
}

// ---- running a case ------------------------------------------------------

/// Cases run one at a time (see the module docs); a failed case poisons the
/// lock, which is fine: its `Pair` has been torn down by then.
static SERIAL: Mutex<()> = Mutex::new(());

fn run_case(name: &str, case: Case) {
    let missing = missing_prerequisites(&[case.a, case.b]);
    if !missing.is_empty() {
        let what = missing.join(", ");
        testkit::prereq::skip_or_fail(name, &what);
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    reap_and_guard_once();

    let mut pair = Pair::new(case);
    let result = pair.setup().and_then(|()| pair.check());
    if let Err(e) = result {
        // The report reads the logs before the pair is dropped (and torn down).
        panic!("{}", pair.report(name, &e));
    }
    let _ = writeln!(
        io::stderr(),
        "ok {name}: {} (A) <-> {} (B), {:?} initiated, {:?} underlay",
        case.a.name(),
        case.b.name(),
        case.initiator,
        case.underlay
    );
}

struct Node {
    side: Side,
    imp: Impl,
    ns: String,
    iface: String,
    veth: String,
    underlay: IpAddr,
    tun4: Ipv4Addr,
    tun6: Ipv6Addr,
    log: PathBuf,
    daemon: Option<Child>,
    /// Set when the daemon has been reaped: how it ended.
    exit: Option<String>,
    public_key: String,
}

impl Node {
    fn socket(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.iface))
    }

    fn label(&self) -> String {
        format!("{:?} ({} in {})", self.side, self.imp.name(), self.ns)
    }

    /// Starts the daemon and waits for its interface and UAPI socket.
    fn start(&mut self) -> Result<(), String> {
        let _ = fs::remove_file(self.socket());
        let log = File::create(&self.log).map_err(|e| format!("log file: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let child = self
            .imp
            .command(&self.ns, &self.iface)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: cannot start {}: {e}", self.label(), self.imp.name()))?;
        self.daemon = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.exit = Some(status.to_string());
                self.daemon = None;
                return Err(format!(
                    "{}: the daemon exited ({status}) before serving {}",
                    self.label(),
                    self.socket().display()
                ));
            }
            let link = run(&["ip", "-n", &self.ns, "link", "show", &self.iface]).is_ok();
            if link && self.socket().exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: no interface {} and socket {} after {START_TIMEOUT:?}",
                    self.label(),
                    self.iface,
                    self.socket().display()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits; SIGKILL after STOP_TIMEOUT. Err if the daemon
    /// needed SIGKILL. Idempotent.
    fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        testkit::process::signal(child.id(), testkit::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status.to_string());
                    return Ok(());
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.exit = Some("killed with SIGKILL".into());
                    return Err(format!(
                        "{}: still running {STOP_TIMEOUT:?} after SIGTERM",
                        self.label()
                    ));
                }
            }
        }
    }

    fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["ip", "netns", "exec", &self.ns];
        full.extend_from_slice(args);
        run(&full)
    }
}

/// The two nodes of a case and everything they own; dropping it tears it all
/// down.
struct Pair {
    case: Case,
    nodes: [Node; 2],
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Pair {
    fn new(case: Case) -> Self {
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
        let dir = tempfile::Builder::new()
            .prefix("wgmesh-netns-interop.")
            .tempdir()
            .expect("temp dir");
        let underlay = |last: u16| match case.underlay {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, last as u8)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, last)),
        };
        let node = |side: Side, imp: Impl, last: u16| {
            let s = if side == Side::A { "a" } else { "b" };
            let iface = format!("wr{pid:x}x{seq}{s}");
            Node {
                side,
                imp,
                ns: format!("wgrt-{pid}-{seq}-{s}"),
                veth: format!("wr{pid:x}x{seq}v{s}"),
                log: dir.path().join(format!("{iface}.log")),
                iface,
                underlay: underlay(last),
                tun4: Ipv4Addr::new(10, 99, 0, last as u8),
                tun6: Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, last),
                daemon: None,
                exit: None,
                public_key: String::new(),
            }
        };
        Pair {
            case,
            nodes: [node(Side::A, case.a, 1), node(Side::B, case.b, 2)],
            namespaces: Vec::new(),
            dir,
        }
    }

    /// Namespaces, veth, daemons, keys, `wg set`, addresses. No traffic.
    fn setup(&mut self) -> Result<(), String> {
        for i in 0..2 {
            let ns = self.nodes[i].ns.clone();
            cmd(&format!("ip netns add {ns}"))?;
            self.namespaces.push(ns.clone());
            cmd(&format!("ip -n {ns} link set lo up"))?;
        }
        let [a, b] = &self.nodes;
        cmd(&format!(
            "ip link add {} netns {} mtu {UNDERLAY_MTU} type veth peer name {} netns {} mtu {UNDERLAY_MTU}",
            a.veth, a.ns, b.veth, b.ns
        ))?;
        for n in &self.nodes {
            let plen = if n.underlay.is_ipv4() { 24 } else { 64 };
            // nodad: no "tentative" IPv6 address the daemons could not send from.
            cmd(&format!(
                "ip -n {} addr add {}/{plen} dev {} nodad",
                n.ns, n.underlay, n.veth
            ))?;
            cmd(&format!("ip -n {} link set {} up", n.ns, n.veth))?;
        }
        for n in &mut self.nodes {
            n.start()?;
        }
        let mut keys = Vec::new();
        for n in &mut self.nodes {
            let path = self.dir.path().join(format!("{}.key", n.iface));
            let private = cmd("wg genkey")?;
            write_private(&path, &private)
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            n.public_key = run_stdin(&["wg", "pubkey"], &private)?.trim().to_string();
            keys.push(path);
        }
        let initiator = self.case.initiator.index();
        for (i, key) in keys.iter().enumerate() {
            let (me, peer) = (&self.nodes[i], &self.nodes[1 - i]);
            let endpoint = SocketAddr::new(peer.underlay, LISTEN_PORT).to_string();
            let allowed = format!("{}/32,{}/128", peer.tun4, peer.tun6);
            let key = key.to_string_lossy();
            let port = LISTEN_PORT.to_string();
            let mut args = vec![
                "wg",
                "set",
                &me.iface,
                "private-key",
                &key,
                "listen-port",
                &port,
                "peer",
                &peer.public_key,
                "allowed-ips",
                &allowed,
            ];
            // Only the initiator knows where its peer is: the responder
            // cannot start a handshake and learns the initiator's endpoint
            // from its first packet, as a roaming peer's.
            if i == initiator {
                args.extend(["endpoint", &endpoint]);
            }
            me.exec(&args)?;
        }
        for n in &self.nodes {
            let (ns, ifc) = (&n.ns, &n.iface);
            cmd(&format!("ip -n {ns} link set {ifc} mtu {TUNNEL_MTU}"))?;
            cmd(&format!("ip -n {ns} addr add {}/24 dev {ifc}", n.tun4))?;
            cmd(&format!(
                "ip -n {ns} addr add {}/64 dev {ifc} nodad",
                n.tun6
            ))?;
            cmd(&format!("ip -n {ns} link set {ifc} up"))?;
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        let i = self.case.initiator.index();
        let r = 1 - i;
        for n in &self.nodes {
            let peer = peer_line(n)?;
            // A wgmesh initiator starts a handshake with a new peer at once,
            // by design (a restarted data plane replaces the session its peer
            // still holds), so both ends may have one already; the others
            // wait for the first packet, and then neither end may.
            let unprompted = self.nodes[i].imp == Impl::Wgmesh;
            if peer.latest_handshake != 0 && !unprompted {
                return Err(format!(
                    "{}: latest handshake {} before any traffic was sent",
                    n.label(),
                    peer.latest_handshake
                ));
            }
        }
        let (ini, res) = (&self.nodes[i], &self.nodes[r]);
        // The initiator's first ping is the first packet into either tunnel.
        ping(ini, IpAddr::V4(res.tun4), None)?;
        ping(res, IpAddr::V4(ini.tun4), None)?;
        ping(ini, IpAddr::V6(res.tun6), None)?;
        ping(res, IpAddr::V6(ini.tun6), None)?;
        // Largest packets the tunnel MTU allows, DF set: 1420 bytes of IP.
        ping(ini, IpAddr::V4(res.tun4), Some(TUNNEL_MTU - 28))?;
        ping(res, IpAddr::V6(ini.tun6), Some(TUNNEL_MTU - 48))?;

        tcp_transfer(ini, res, IpAddr::V4(res.tun4))?;
        tcp_transfer(res, ini, IpAddr::V4(ini.tun4))?;
        tcp_transfer(ini, res, IpAddr::V6(res.tun6))?;
        tcp_transfer(res, ini, IpAddr::V6(ini.tun6))?;

        let now = unix_now();
        // Each side sent and received 2 x TRANSFER_BYTES of TCP payload.
        let min_bytes = 2 * TRANSFER_BYTES as u64;
        for (n, other) in [(ini, res), (res, ini)] {
            let peer = peer_line(n)?;
            if peer.public_key != other.public_key {
                return Err(format!(
                    "{}: wg dump shows peer {}, expected {}",
                    n.label(),
                    peer.public_key,
                    other.public_key
                ));
            }
            if n.imp.handshake_is_age() {
                // Can't tell "0 s ago" from "never"; the counters below can.
                if peer.latest_handshake > 60 {
                    return Err(format!(
                        "{}: handshake age {} s, expected under a minute",
                        n.label(),
                        peer.latest_handshake
                    ));
                }
            } else if peer.latest_handshake == 0
                || peer.latest_handshake + 60 < now
                || peer.latest_handshake > now + 5
            {
                return Err(format!(
                    "{}: latest handshake {} is not a Unix time within the last minute (now {now})",
                    n.label(),
                    peer.latest_handshake
                ));
            }
            if peer.rx_bytes < min_bytes || peer.tx_bytes < min_bytes {
                return Err(format!(
                    "{}: transfer rx {} tx {} bytes, expected at least {min_bytes} each way",
                    n.label(),
                    peer.rx_bytes,
                    peer.tx_bytes
                ));
            }
        }

        for n in &mut self.nodes {
            n.stop()?;
            if n.socket().exists() {
                return Err(format!(
                    "{}: {} still exists after SIGTERM",
                    n.label(),
                    n.socket().display()
                ));
            }
            if run(&["ip", "-n", &n.ns, "link", "show", &n.iface]).is_ok() {
                return Err(format!(
                    "{}: interface {} still exists after the daemon exited",
                    n.label(),
                    n.iface
                ));
            }
        }
        Ok(())
    }

    /// The failure message: what failed, then each daemon's state and log.
    fn report(&mut self, name: &str, error: &str) -> String {
        // Keep the logs (and the throwaway keys) of a failed case.
        self.dir.disable_cleanup(true);
        let mut out = format!(
            "{name} FAILED: {error}\n(A: {} in {}, B: {} in {}, {:?} initiates, {:?} underlay)\n",
            self.case.a.name(),
            self.nodes[0].ns,
            self.case.b.name(),
            self.nodes[1].ns,
            self.case.initiator,
            self.case.underlay
        );
        for n in &mut self.nodes {
            let state = match (&mut n.daemon, &n.exit) {
                (Some(c), _) => match c.try_wait() {
                    Ok(Some(status)) => format!("exited: {status}"),
                    _ => format!("running, pid {}", c.id()),
                },
                (None, Some(exit)) => format!("ended: {exit}"),
                (None, None) => "not started".into(),
            };
            let log = fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            out.push_str(&format!(
                "\n----- {} [{state}], log {} (kept; last {} of {} lines) -----\n{}\n",
                n.label(),
                n.log.display(),
                tail.len(),
                lines.len(),
                strip_ansi(&tail.join("\n"))
            ));
        }
        out.push_str("----- end of logs -----\n");
        out
    }

    fn teardown(&mut self) {
        for n in &mut self.nodes {
            let _ = n.stop();
        }
        for ns in self.namespaces.drain(..) {
            // Anything still inside (a helper that outlived its timeout) goes too.
            for pid in testkit::netns::pids(&ns) {
                testkit::process::signal(pid, testkit::Signal::KILL);
            }
            testkit::netns::del(&ns);
        }
        for n in &self.nodes {
            let _ = fs::remove_file(n.socket());
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.teardown();
    }
}

// ---- checks ----------------------------------------------------------------

struct PeerLine {
    public_key: String,
    latest_handshake: u64,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// `wg show IFACE dump`: line 1 is the interface, then one line per peer:
/// public-key preshared-key endpoint allowed-ips latest-handshake rx tx keepalive.
fn peer_line(n: &Node) -> Result<PeerLine, String> {
    let dump = n.exec(&["wg", "show", &n.iface, "dump"])?;
    let peers: Vec<&str> = dump.lines().skip(1).collect();
    let [line] = peers[..] else {
        return Err(format!(
            "{}: expected one peer in wg dump:\n{dump}",
            n.label()
        ));
    };
    let f: Vec<&str> = line.split('\t').collect();
    let num = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{}: bad field {i} in wg dump line {line:?}", n.label()))
    };
    Ok(PeerLine {
        public_key: f[0].to_string(),
        latest_handshake: num(4)?,
        rx_bytes: num(5)?,
        tx_bytes: num(6)?,
    })
}

/// Three echo replies within 10 s (the first request may wait for the
/// handshake). With `size`, DF is set and the payload is `size` bytes.
fn ping(from: &Node, to: IpAddr, size: Option<u32>) -> Result<(), String> {
    let to = to.to_string();
    let size_s = size.map(|s| s.to_string());
    let mut args = vec!["ping", "-n", "-c", "3", "-i", "0.2", "-w", "10"];
    if let Some(s) = &size_s {
        args.extend_from_slice(&["-M", "do", "-s", s]);
    }
    args.push(&to);
    from.exec(&args).map(drop).map_err(|e| {
        let what = size_s
            .as_ref()
            .map_or(String::new(), |s| format!(" ({s}-byte payload, DF)"));
        format!("ping {to}{what} from {} failed: {e}", from.label())
    })
}

/// TRANSFER_BYTES of a seeded pseudo-random stream from `from` to `dst` (an
/// address of `to`), every byte checked by the receiver.
fn tcp_transfer(from: &Node, to: &Node, dst: IpAddr) -> Result<(), String> {
    let what = format!("TCP {} -> {dst} ({TRANSFER_BYTES} bytes)", from.label());
    let seed =
        0x9e37_79b9_7f4a_7c15 ^ u64::from(from.side == Side::A) ^ (u64::from(dst.is_ipv6()) << 1);
    let (port_tx, port_rx) = mpsc::channel();
    let receiver = in_netns(&to.ns, move || -> io::Result<(usize, Option<usize>)> {
        let listener = TcpListener::bind(SocketAddr::new(dst, 0))?;
        let _ = port_tx.send(listener.local_addr()?.port());
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut expected = Pattern::new(seed);
        let (mut buf, mut want) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        let (mut total, mut first_bad) = (0usize, None);
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok((total, first_bad));
            }
            expected.fill(&mut want[..n]);
            if first_bad.is_none() {
                if let Some(k) = (0..n).find(|&k| buf[k] != want[k]) {
                    first_bad = Some(total + k);
                }
            }
            total += n;
        }
    });
    let port = match port_rx.recv_timeout(IO_TIMEOUT) {
        Ok(p) => p,
        Err(_) => {
            let why = join(receiver).err().unwrap_or_default();
            return Err(format!("{what}: receiver did not start: {why}"));
        }
    };
    let sender = in_netns(&from.ns, move || -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::new(dst, port), IO_TIMEOUT)?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut pattern = Pattern::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = TRANSFER_BYTES;
        while left > 0 {
            let n = left.min(buf.len());
            pattern.fill(&mut buf[..n]);
            stream.write_all(&buf[..n])?;
            left -= n;
        }
        stream.shutdown(Shutdown::Write)
    });
    let sent = join(sender);
    // If the sender failed, the receiver sees EOF or a reset, or times out.
    let received = join(receiver);
    sent.map_err(|e| format!("{what}: sender: {e}"))?;
    match received.map_err(|e| format!("{what}: receiver: {e}"))? {
        (n, _) if n != TRANSFER_BYTES => Err(format!("{what}: received {n} bytes")),
        (_, Some(at)) => Err(format!("{what}: data differs from byte {at} on")),
        _ => Ok(()),
    }
}

/// Runs `f` on a new thread that has joined network namespace `ns` (setns
/// switches the calling thread only; sockets keep the namespace they were
/// created in).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> thread::JoinHandle<io::Result<T>> {
    let ns = ns.to_owned();
    thread::spawn(move || {
        testkit::netns::enter(&ns)?;
        f()
    })
}

fn join<T>(h: thread::JoinHandle<io::Result<T>>) -> Result<T, String> {
    match h.join() {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("thread panicked".into()),
    }
}

/// xorshift64: a reproducible byte stream both ends can generate.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

// ---- prerequisites, hygiene, helpers ------------------------------------

fn missing_prerequisites(impls: &[Impl]) -> Vec<String> {
    let mut missing = Vec::new();
    if !testkit::prereq::is_root() {
        missing.push("root".to_string());
    }
    for cmd in ["ip", "wg", "ping", "timeout", "bash"] {
        if testkit::prereq::which(cmd).is_none() {
            missing.push(cmd.to_string());
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".into());
    }
    if !Path::new("/proc/self/ns/net").exists() {
        missing.push("network namespace support".into());
    }
    for imp in impls {
        let present = match imp {
            Impl::Wgmesh => Path::new(env!("CARGO_BIN_EXE_wgmesh")).exists(),
            Impl::WireguardGo => testkit::prereq::which("wireguard-go").is_some(),
            Impl::Boringtun => boringtun_bin().is_some(),
        };
        if !present {
            let hint = match imp {
                Impl::Boringtun => "boringtun-cli (cargo install boringtun-cli --locked)",
                Impl::WireguardGo => "wireguard-go (apt-get install wireguard-go)",
                Impl::Wgmesh => "the wgmesh binary",
            };
            if !missing.iter().any(|m| m == hint) {
                missing.push(hint.into());
            }
        }
    }
    missing
}

static INIT: Once = Once::new();

/// Once per process: reap what dead runs left behind, then start the guardian
/// that reaps this run's namespaces if the process dies without unwinding.
fn reap_and_guard_once() {
    INIT.call_once(|| {
        let _ = Command::new("bash")
            .args([
                "-c",
                r#"source "$1" && nl_reap_stale"#,
                "nl-reap",
                NETNS_LIB,
            ])
            .status();
        if testkit::prereq::which("setsid").is_some() {
            // setsid: outside our process group, so the Ctrl-C that ends us
            // does not end the guardian.
            let _ = Command::new("setsid")
                .args([
                    "bash",
                    "-c",
                    r#"source "$1" && nl_guard "$2""#,
                    "nl-guard",
                    NETNS_LIB,
                ])
                .arg(std::process::id().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
        }
    });
}

/// `run` for a command line without quoting (split on whitespace).
fn cmd(line: &str) -> Result<String, String> {
    run(&line.split_whitespace().collect::<Vec<_>>())
}

/// Runs a command under timeout(1); Ok(stdout) on success, Err with the
/// command, status and output otherwise.
fn run(args: &[&str]) -> Result<String, String> {
    run_stdin(args, "")
}

fn run_stdin(args: &[&str], input: &str) -> Result<String, String> {
    let mut child = Command::new("timeout")
        .args(["-k", "5", &COMMAND_TIMEOUT_SECS.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{}`: {e}", args.join(" ")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("`{}`: {e}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`{}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn write_private(path: &Path, key: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(key.as_bytes())
}

/// boringtun-cli from PATH or cargo's bin dir (where `cargo install` puts it).
fn boringtun_bin() -> Option<PathBuf> {
    testkit::prereq::which("boringtun-cli").or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        Some(cargo_home.join("bin/boringtun-cli")).filter(|p| p.is_file())
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Removes terminal colour sequences (boringtun-cli colours its log).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
