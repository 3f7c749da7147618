//! `wgmesh dataplane` through its UAPI socket, as `wg` and the agent use it: a
//! real process with a real TUN device in a private network namespace.
//!
//! Needs root, /dev/net/tun and `ip`; without them the test prints SKIP, except
//! under CI=true where a missing prerequisite fails it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Everything one test started; removed on drop, also when the test panics.
struct Fixture {
    netns: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for c in &mut self.children {
            testkit::process::stop(c, Duration::from_secs(3));
        }
        testkit::netns::del(&self.netns);
    }
}

/// What is missing for these tests to run here, if anything.
fn prerequisites() -> Result<(), String> {
    use testkit::prereq::{missing, Need};
    match missing(&[Need::Root, Need::Tun, Need::Tool("ip")]) {
        Some(what) => Err(what),
        None => Ok(()),
    }
}

/// Returns None (after printing SKIP) when the test cannot run here.
fn setup(tag: &str) -> Option<Fixture> {
    if let Err(missing) = prerequisites() {
        testkit::prereq::skip_or_fail(&format!("dataplane_uapi::{tag}"), &missing);
        return None;
    }
    let netns = format!("wgmu{}{tag}", std::process::id());
    testkit::netns::add(&netns).unwrap_or_else(|e| panic!("{e}"));
    Some(Fixture {
        netns,
        dir: tempfile::tempdir().unwrap(),
        children: Vec::new(),
    })
}

impl Fixture {
    /// Starts a data plane for `iface` and waits for its socket.
    fn start(&mut self, iface: &str) -> PathBuf {
        let dir = self.dir.path().to_owned();
        self.start_in(iface, &dir)
    }

    /// As [`Fixture::start`], with the socket in `uapi_dir`.
    fn start_in(&mut self, iface: &str, uapi_dir: &Path) -> PathBuf {
        let log = std::fs::File::create(self.dir.path().join(format!("{iface}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(env!("CARGO_BIN_EXE_wgmesh"))
            .args(["dataplane", "--interface", iface, "--uapi-dir"])
            .arg(uapi_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        let sock = uapi_dir.join(format!("{iface}.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "no UAPI socket after 10 s; log:\n{}",
                std::fs::read_to_string(self.dir.path().join(format!("{iface}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sock
    }
}

fn uapi(sock: &Path, request: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\n\n") {
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

fn get(sock: &Path) -> String {
    uapi(sock, "get=1\n\n")
}

const KEY_A: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
const PEER: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
const PEER2: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";

#[test]
fn set_get_and_errors_like_wireguard_go() {
    let Some(mut fx) = setup("a") else { return };
    let sock = fx.start("wgmua0");

    // The socket is root-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let fresh = get(&sock);
    assert!(fresh.contains("listen_port="), "{fresh}");
    assert!(fresh.ends_with("errno=0\n\n"), "{fresh}");

    let set = format!(
        "set=1\nprivate_key={KEY_A}\nlisten_port=41111\npublic_key={PEER}\n\
         endpoint=192.0.2.9:51820\npersistent_keepalive_interval=25\n\
         allowed_ip=10.9.0.0/24\nallowed_ip=fd09::/64\n\n"
    );
    assert_eq!(uapi(&sock, &set), "errno=0\n\n");
    let state = get(&sock);
    for want in [
        &format!("private_key={KEY_A}\n"),
        "listen_port=41111\n",
        &format!("public_key={PEER}\n"),
        "endpoint=192.0.2.9:51820\n",
        "persistent_keepalive_interval=25\n",
        "allowed_ip=10.9.0.0/24\n",
        "allowed_ip=fd09::/64\n",
        "last_handshake_time_sec=0\n",
        "protocol_version=1\n",
    ] {
        assert!(state.contains(want), "missing {want:?} in\n{state}");
    }

    // An invalid set answers EINVAL and changes nothing, even the valid lines
    // before the bad one.
    let bad = format!("set=1\nlisten_port=42222\npublic_key={PEER2}\nallowed_ip=10.8.0.0/33\n\n");
    assert_eq!(uapi(&sock, &bad), "errno=-22\n\n");
    let unknown = "set=1\nlisten_port=42222\nbogus_key=1\n\n";
    assert_eq!(uapi(&sock, unknown), "errno=-22\n\n");
    assert_eq!(
        get(&sock),
        state,
        "a rejected set must leave the device unchanged"
    );

    // Removal by public key, replace_peers, and the all-zero private key.
    let more = format!("set=1\npublic_key={PEER2}\nallowed_ip=10.8.0.0/24\n\n");
    assert_eq!(uapi(&sock, &more), "errno=0\n\n");
    assert!(get(&sock).contains(PEER2));
    let remove = format!("set=1\npublic_key={PEER2}\nremove=true\n\n");
    assert_eq!(uapi(&sock, &remove), "errno=0\n\n");
    let after = get(&sock);
    assert!(!after.contains(PEER2) && after.contains(PEER), "{after}");
    let zero = "0".repeat(64);
    let clear = format!("set=1\nprivate_key={zero}\nreplace_peers=true\n\n");
    assert_eq!(uapi(&sock, &clear), "errno=0\n\n");
    let empty = get(&sock);
    assert!(
        !empty.contains("private_key=") && !empty.contains("public_key="),
        "{empty}"
    );
}

#[test]
fn a_port_in_use_answers_eaddrinuse_and_keeps_the_old_port() {
    let Some(mut fx) = setup("b") else { return };
    let one = fx.start("wgmub0");
    let two = fx.start("wgmub1");
    assert_eq!(uapi(&one, "set=1\nlisten_port=43333\n\n"), "errno=0\n\n");
    assert_eq!(uapi(&two, "set=1\nlisten_port=43334\n\n"), "errno=0\n\n");
    let set = format!("set=1\nprivate_key={KEY_A}\nlisten_port=43333\n\n");
    assert_eq!(uapi(&two, &set), "errno=-98\n\n");
    let state = get(&two);
    assert!(state.contains("listen_port=43334\n"), "{state}");
    assert!(!state.contains("private_key="), "nothing applied: {state}");
}

#[test]
fn a_second_daemon_cannot_take_a_live_socket() {
    let Some(mut fx) = setup("c") else { return };
    fx.start("wgmuc0");
    let out = Command::new("ip")
        .args(["netns", "exec", &fx.netns])
        .arg(env!("CARGO_BIN_EXE_wgmesh"))
        .args(["dataplane", "--interface", "wgmuc0", "--uapi-dir"])
        .arg(fx.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
}

/// The agent's backend seam against the real device: apply a reconcile, read
/// back, and a second reconcile is empty (a resync writes nothing); the
/// fwmark set, kept and cleared through it.
#[test]
fn the_uapi_backend_reconciles_and_a_resync_writes_nothing() {
    use wgmesh::keys::PrivateKey;
    use wgmesh::mesh::PeerConfig;
    use wgmesh::wg::uapi::UapiBackend;
    use wgmesh::wg::{reconcile, Backend, LocalDevice};

    let Some(mut fx) = setup("d") else { return };
    let sock = fx.start("wgmud0");
    let mut backend = UapiBackend::new(&sock);
    let key = PrivateKey::generate();
    let local = LocalDevice {
        private_key: &key,
        listen_port: 44444,
        fwmark: None,
        extra: None,
    };
    let peer = |n: u8, ka: Option<u16>| {
        let mut p = PeerConfig {
            public_key: PrivateKey::from_bytes([n; 32]).unwrap().public_key(),
            endpoint: Some(format!("192.0.2.{n}:51820").parse().unwrap()),
            allowed_ips: vec![
                format!("10.244.{n}.0/24").parse().unwrap(),
                format!("fd00:{n}::/64").parse().unwrap(),
            ],
            persistent_keepalive: ka,
            successor: None,
        };
        p.normalize();
        p
    };
    let desired = vec![peer(1, None), peer(2, Some(25)), peer(3, None)];
    // What a reconcile pass against the device would write now.
    let plan = |backend: &mut UapiBackend, local: &LocalDevice<'_>, desired: &[PeerConfig]| {
        reconcile(
            &backend.state().unwrap(),
            local,
            desired,
            backend.capabilities(),
        )
    };

    let changes = plan(&mut backend, &local, &desired);
    assert!(!changes.is_empty());
    backend.apply(&changes).unwrap();
    let state = backend.state().unwrap();
    assert_eq!(state.public_key, Some(key.public_key()));
    assert_eq!(state.listen_port, 44444);
    let mut got = state.peers.clone();
    got.sort_by_key(|p| p.public_key);
    let mut want = desired.clone();
    want.sort_by_key(|p| p.public_key);
    assert_eq!(got, want);
    for _ in 0..3 {
        let again = plan(&mut backend, &local, &desired);
        assert!(again.is_empty(), "resync wants to write: {again:?}");
    }

    // A node leaves, another changes CIDR: only those two change.
    let mut next = vec![peer(1, None), peer(2, Some(25))];
    next[0].allowed_ips = vec!["10.244.9.0/24".parse().unwrap()];
    let changes = plan(&mut backend, &local, &next);
    assert_eq!(changes.peers.len(), 2, "{changes:?}");
    backend.apply(&changes).unwrap();
    assert!(plan(&mut backend, &local, &next).is_empty());

    // The fwmark through the seam (`fwmark=`): set, read back, kept by a
    // peer update that does not mention it, cleared with 0.
    let marked = LocalDevice {
        fwmark: Some(0x2a),
        ..local.clone()
    };
    let changes = plan(&mut backend, &marked, &next);
    assert_eq!(changes.fwmark, Some(0x2a), "{changes:?}");
    assert!(changes.peers.is_empty() && changes.listen_port.is_none());
    backend.apply(&changes).unwrap();
    assert_eq!(backend.state().unwrap().fwmark, 0x2a);
    assert!(get(&sock).contains("\nfwmark=42\n"), "{}", get(&sock));
    let moved = vec![peer(1, Some(5)), peer(2, Some(25))];
    let changes = plan(&mut backend, &local, &moved);
    assert!(
        changes.fwmark.is_none() && changes.peers.len() == 1,
        "{changes:?}"
    );
    backend.apply(&changes).unwrap();
    assert_eq!(
        backend.state().unwrap().fwmark,
        0x2a,
        "kept across a peer update"
    );
    assert!(plan(&mut backend, &marked, &moved).is_empty());
    let cleared = LocalDevice {
        fwmark: Some(0),
        ..local.clone()
    };
    let changes = plan(&mut backend, &cleared, &moved);
    assert_eq!(changes.fwmark, Some(0));
    backend.apply(&changes).unwrap();
    assert_eq!(backend.state().unwrap().fwmark, 0);
    assert!(!get(&sock).contains("fwmark="), "{}", get(&sock));
}

#[test]
fn a_deleted_tun_makes_the_dataplane_exit_non_zero_and_remove_its_socket() {
    let Some(mut fx) = setup("g") else { return };
    let iface = "wgmug0";
    let sock = fx.start(iface);
    assert!(get(&sock).ends_with("errno=0\n\n"));

    let ok = Command::new("ip")
        .args(["-n", &fx.netns, "link", "del", iface])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip link del {iface} failed");

    // It used to spin on EBADFD for ever; now it exits within a poll round.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = fx.children[0].try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the data plane still runs 5 s after its TUN was deleted"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(fx.dir.path().join(format!("{iface}.log"))).unwrap();
    assert_eq!(status.code(), Some(1), "exit status {status}; log:\n{log}");
    assert!(
        log.contains(&format!(
            "TUN device {iface} went away; exiting so the supervisor restarts the data plane"
        )),
        "{log}"
    );
    assert!(!sock.exists(), "the UAPI socket file must be removed");
}

/// The rotation extensions through the socket, and `wg` (wireguard-tools,
/// which only looks in /var/run/wireguard) reading a device that reports
/// them: its `get` parser skips keys it does not know.
#[test]
fn rotation_extensions_over_uapi_and_wg_show_reads_them() {
    use wgmesh::keys::PrivateKey;
    use wgmesh::wg::uapi::UapiBackend;
    use wgmesh::wg::{Backend, Capabilities, ExtraRole};

    let Some(mut fx) = setup("r") else { return };
    let wg = Command::new("wg").arg("--version").output();
    if wg.is_err() {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "`wg` (wireguard-tools) missing under CI"
        );
        eprintln!(
            "SKIP dataplane_uapi::rotation_extensions_over_uapi_and_wg_show_reads_them: no wg"
        );
        return;
    }
    // Unique per run: the directory is shared with every WireGuard daemon.
    let iface = format!("wgmr{}", std::process::id() % 100_000);
    let sock = fx.start_in(&iface, Path::new("/var/run/wireguard"));

    let next = PrivateKey::generate();
    let successor = PrivateKey::generate().public_key();
    let set = format!(
        "set=1\nprivate_key={KEY_A}\nwgmesh_extra_private_key={}\nwgmesh_extra_role=next\n\
         listen_port=41113\npublic_key={PEER}\nendpoint=192.0.2.9:51820\n\
         allowed_ip=10.9.0.0/24\nwgmesh_successor_public_key={}\n\n",
        next.to_hex().as_str(),
        successor.to_hex()
    );
    assert_eq!(uapi(&sock, &set), "errno=0\n\n");
    let state = get(&sock);
    for want in [
        "wgmesh_version=1\n".to_owned(),
        format!("wgmesh_extra_public_key={}\n", next.public_key().to_hex()),
        "wgmesh_extra_role=next\n".to_owned(),
        format!("wgmesh_successor_public_key={}\n", successor.to_hex()),
    ] {
        assert!(state.contains(&want), "missing {want:?} in\n{state}");
    }
    assert!(
        !state.contains(next.to_hex().as_str()),
        "the extra private key leaked"
    );

    let mut backend = UapiBackend::new(&sock);
    assert_eq!(backend.capabilities(), Capabilities::default());
    let seen = backend.state().unwrap();
    assert_eq!(backend.capabilities(), Capabilities::WGMESH);
    assert_eq!(
        seen.extra_identity,
        Some((next.public_key(), ExtraRole::Next))
    );
    assert_eq!(seen.peers[0].successor, Some(successor));

    for args in [
        vec!["show", iface.as_str()],
        vec!["show", iface.as_str(), "dump"],
        vec!["showconf", iface.as_str()],
    ] {
        let out = Command::new("wg").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "wg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("41113"), "wg {args:?}:\n{text}");
        assert!(text.contains("10.9.0.0/24"), "wg {args:?}:\n{text}");
    }

    // Promote: the peer is renamed to its successor, allowed IPs kept.
    let promote = format!("set=1\npublic_key={PEER}\nwgmesh_promote_successor=true\n\n");
    assert_eq!(uapi(&sock, &promote), "errno=0\n\n");
    let after = get(&sock);
    assert!(
        after.contains(&format!("public_key={}\n", successor.to_hex())),
        "{after}"
    );
    assert!(!after.contains(&format!("public_key={PEER}\n")), "{after}");
    assert!(after.contains("allowed_ip=10.9.0.0/24\n"), "{after}");
    // Clearing the extra identity.
    assert_eq!(
        uapi(&sock, "set=1\nwgmesh_extra_private_key=\n\n"),
        "errno=0\n\n"
    );
    assert!(!get(&sock).contains("wgmesh_extra_public_key="));
}
