//! The testbed's own host plumbing: `ip` in a namespace, the UAPI socket, a
//! minimal HTTP client that runs inside a namespace, and the Ctrl-C flag.
//! Namespaces, processes and running a command in general are `testkit`'s,
//! shared with the root tests.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Error, Result};

/// Runs a command to completion; its stdout on success.
pub fn run(args: &[&str]) -> Result<String> {
    Ok(testkit::cmd::run(args)?)
}

/// `ip -n NS ARGS...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "-n", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// `ip netns exec NS ARGS...`
pub fn netns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// One HTTP/1.0 request from inside `ns` (HTTP/1.0 so the answer is never chunked
/// and ends with the connection). Returns the status and the body.
pub fn http(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<(u16, String)> {
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: wgmesh-testbed\r\n\
         Accept: application/json\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let text = testkit::netns::in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
    .map_err(|e| Error::io(format!("{method} {path} on {addr}"), e))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Other(format!("bad HTTP answer to {method} {path}: {head}")))?;
    Ok((status, body.to_string()))
}

/// A peer as a device reports it (over UAPI, or `wg show dump` for a kernel link).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key_hex: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub last_handshake_sec: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl WgPeer {
    /// The key in the base64 form Node annotations and `wg` use.
    pub fn public_key_b64(&self) -> String {
        hex_to_b64(&self.public_key_hex)
    }
}

/// The device's peers, or `None` when its UAPI socket does not answer.
pub fn uapi_peers(sock: &Path) -> Option<Vec<WgPeer>> {
    uapi_device(sock).map(|d| d.peers)
}

/// A WireGuard device as it reports itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgDevice {
    /// The public half of the device's private key (base64), if it has one.
    pub public_key: Option<String>,
    pub peers: Vec<WgPeer>,
}

/// The device's own public key (derived from the private key it reports) and peers,
/// or `None` when its UAPI socket does not answer.
pub fn uapi_device(sock: &Path) -> Option<WgDevice> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"get=1\n\n").ok()?;
    let mut text = String::new();
    // The answer ends with an empty line after errno=; read until then or EOF.
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                if text.contains("errno=") && text.ends_with("\n\n") {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if !text.contains("errno=0") {
        return None;
    }
    let mut peers: Vec<WgPeer> = Vec::new();
    let mut public_key = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k == "private_key" && peers.is_empty() {
            public_key = public_of_private_hex(v);
            continue;
        }
        if k == "public_key" {
            peers.push(WgPeer {
                public_key_hex: v.to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(p) = peers.last_mut() else { continue };
        match k {
            "endpoint" => p.endpoint = Some(v.to_string()),
            "allowed_ip" => p.allowed_ips.push(v.to_string()),
            "last_handshake_time_sec" => p.last_handshake_sec = v.parse().unwrap_or(0),
            "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
            "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Some(WgDevice { public_key, peers })
}

/// A kernel WireGuard link in namespace `ns`, read with `wg show IFACE dump` (an
/// independent reader: wireguard-tools, not our netlink code), or `None` when
/// there is no such link. The dump's first line carries the private key: only
/// the public key is kept and the output buffer is wiped.
pub fn kernel_device(ns: &str, iface: &str) -> Option<WgDevice> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "wg", "show", iface, "dump"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let mut stdout = zeroize::Zeroizing::new(out.stdout);
    if !out.status.success() {
        return None;
    }
    let parsed = std::str::from_utf8(&stdout).ok().and_then(parse_wg_dump);
    zeroize::Zeroize::zeroize(&mut *stdout);
    parsed
}

/// Parses `wg show IFACE dump`: the interface line (private key, public key,
/// port, fwmark), then one line per peer (public key, preshared key, endpoint,
/// allowed IPs, latest handshake, rx, tx, keepalive), tab-separated.
fn parse_wg_dump(text: &str) -> Option<WgDevice> {
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next()?.split('\t').collect();
    let public_key = head
        .get(1)
        .filter(|k| **k != "(none)")
        .map(|k| k.to_string());
    let mut peers = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 8 {
            return None;
        }
        peers.push(WgPeer {
            public_key_hex: b64_to_hex(f[0])?,
            endpoint: (f[2] != "(none)").then(|| f[2].to_string()),
            allowed_ips: f[3]
                .split(',')
                .filter(|a| !a.is_empty() && *a != "(none)")
                .map(str::to_string)
                .collect(),
            last_handshake_sec: f[4].parse().ok()?,
            rx_bytes: f[5].parse().ok()?,
            tx_bytes: f[6].parse().ok()?,
        });
    }
    Some(WgDevice { public_key, peers })
}

/// The base64 public key of a hex private key. Only the public half leaves this
/// function (the key type zeroizes its copy; the local buffer is cleared).
fn public_of_private_hex(hex: &str) -> Option<String> {
    if hex.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    let mut ok = true;
    for (i, b) in bytes.iter_mut().enumerate() {
        match hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            Some(v) => *b = v,
            None => ok = false,
        }
    }
    let key = ok
        .then(|| wgmesh::keys::PrivateKey::from_bytes(bytes).ok())
        .flatten();
    bytes.fill(0);
    Some(key?.public_key().to_base64())
}

fn hex_to_b64(hex: &str) -> String {
    base64(&hex::decode(hex).unwrap_or_default())
}

/// Standard base64 with padding (what Node annotations and `wg` use for keys).
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Hex of a standard base64 string (a WireGuard key as `wg` prints it).
fn b64_to_hex(b64: &str) -> Option<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .map(hex::encode)
}

/// Set by SIGINT, SIGTERM or SIGHUP once [`install_interrupt_handler`] ran.
static INTERRUPTED: std::sync::LazyLock<Arc<AtomicBool>> =
    std::sync::LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// From now on SIGINT, SIGTERM and SIGHUP only set a flag ([`interrupted`]); long
/// operations check it and clean up. (signal-hook's flag handler: a store to
/// an atomic, which is async-signal-safe.)
pub fn install_interrupt_handler() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&INTERRUPTED)) {
            eprintln!(
                "warning: cannot catch signal {sig} ({e}); an interrupted run may leave its namespaces to `down`"
            );
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps, failing with [`Error::Interrupted`] as soon as a signal arrived.
pub fn sleep(d: Duration) -> Result<()> {
    let end = std::time::Instant::now() + d;
    loop {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        let now = std::time::Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_keys_become_base64() {
        assert_eq!(
            super::hex_to_b64(&"00".repeat(32)),
            format!("{}=", "A".repeat(43))
        );
        assert_eq!(super::hex_to_b64("666f6f"), "Zm9v");
        assert_eq!(super::hex_to_b64("666f"), "Zm8=");
        for hex in ["666f6f", "666f", "66", &"ab".repeat(32)] {
            assert_eq!(
                super::b64_to_hex(&super::hex_to_b64(hex)).as_deref(),
                Some(hex)
            );
        }
    }

    #[test]
    fn wg_dump_is_parsed_without_the_private_key() {
        let key = super::hex_to_b64(&"ab".repeat(32));
        let text = format!(
            "PRIVATE\t{key}\t51820\toff\n\
             {key}\t(none)\t192.0.2.2:51820\t10.244.1.0/24,fd00::/64\t1700000000\t10\t20\toff\n\
             {key}\t(none)\t(none)\t(none)\t0\t0\t0\t25\n"
        );
        let dev = super::parse_wg_dump(&text).expect("parses");
        assert_eq!(dev.public_key.as_deref(), Some(key.as_str()));
        assert_eq!(dev.peers.len(), 2);
        assert_eq!(dev.peers[0].public_key_b64(), key);
        assert_eq!(dev.peers[0].endpoint.as_deref(), Some("192.0.2.2:51820"));
        assert_eq!(dev.peers[0].allowed_ips, ["10.244.1.0/24", "fd00::/64"]);
        assert_eq!(
            (
                dev.peers[0].last_handshake_sec,
                dev.peers[0].rx_bytes,
                dev.peers[0].tx_bytes
            ),
            (1_700_000_000, 10, 20)
        );
        assert!(dev.peers[1].endpoint.is_none() && dev.peers[1].allowed_ips.is_empty());
        assert!(!format!("{dev:?}").contains("PRIVATE"));
        assert!(super::parse_wg_dump("PRIVATE\tk\t1\toff\nshort line\n").is_none());
    }
}
