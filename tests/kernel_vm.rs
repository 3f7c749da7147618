//! The kernel backend (`wgmesh::wg::kernel`) against real kernel WireGuard,
//! each case in fresh network namespaces: the VM tier of the testing ladder
//! (shared/DESIGN.md, step 5). The development and CI host has no WireGuard
//! module, so `scripts/test-vm` boots a Debian kernel under qemu (virtme-ng,
//! on a copy-on-write view of this host's filesystem) and runs this binary
//! inside it with `WGMESH_KERNEL_TESTS=1`.
//!
//! What runs:
//! - the device created through our rtnetlink code, key and port set, peers
//!   added, updated (endpoint, keepalive, allowed IPs replaced) and removed,
//!   allowed IPs appended across continuation messages; the fwmark set,
//!   kept across peer and key writes, and cleared through the seam, and one
//!   set by an operator left alone where the seam asks for none; every state
//!   read back equals the plan, so the next reconcile writes nothing;
//! - errors from the kernel and from our own checks mapped to `WgError` with
//!   the `KernelError` and errno underneath (missing link, port in use, a
//!   link of another kind, a bad name);
//! - 1,000 peers with 7,000 allowed IPs through the chunked messages, read
//!   back identically (and counted independently with `wg show dump`);
//! - interop kernel ↔ `wgmesh dataplane` (the userspace device, a process in
//!   the other namespace), with either side initiating: ping both ways (also
//!   full-size with DF) and a byte-checked TCP transfer each way, then
//!   `wgmesh status`/`graph --backend auto` reading both devices;
//! - `--backend auto` choosing the kernel and saying why, in
//!   `select_backend`, `select_reader` and the log of `wgmesh agent --once`;
//! - the key-rotation hand-over on a kernel peer (option O1): the peer
//!   switches K1→K2 while it pings this node every 10 ms, this node applies
//!   the diff (add K2, remove K1, forced handshake: one request), and the gap
//!   is printed next to the same hand-over written by `wg set` without the
//!   forced handshake. Figures are printed, never asserted on time (software
//!   emulation: not a performance figure).
//!
//! Without `WGMESH_KERNEL_TESTS=1` (a plain `cargo test` on the host) every
//! case prints a `SKIP` line naming scripts/test-vm and returns; with it, a
//! missing prerequisite (root, iproute2, wg, ping, the wireguard module) fails
//! the case, whatever CI says.
//!
//! Hygiene (DESIGN.md): namespaces are `wgkv-<pid>-<case>-<side>`, links and
//! UAPI sockets carry the pid too; dropping a case's guards (also while
//! unwinding from a failed assertion) stops its processes and deletes its
//! namespaces, and namespaces of dead runs are reaped when the next starts.
//! Traffic goes only between the case's own namespaces.

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Once};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use wgmesh::keys::{PrivateKey, PublicKey};
use wgmesh::mesh::{PeerChange, PeerConfig};
use wgmesh::net::NetError;
use wgmesh::wg::kernel::{
    kernel_available, select_backend, select_reader, set_messages, BackendKind, KernelBackend,
    KernelError, SAFE_MESSAGE_BYTES,
};
use wgmesh::wg::uapi::UapiBackend;
use wgmesh::wg::{reconcile, Backend, Capabilities, ChangeSet, LocalDevice, WgError};

const ENABLE: &str = "WGMESH_KERNEL_TESTS";
const PREFIX: &str = "wgkv-";
const PORT: u16 = 51820;
const UNDERLAY_MTU: u32 = 1500;
const TUNNEL_MTU: u32 = UNDERLAY_MTU - 80;
const TRANSFER_BYTES: usize = 4 << 20;

// ---- the cases ------------------------------------------------------------

#[test]
fn the_kernel_device_is_created_configured_and_read_back_through_netlink() {
    const CASE: &str = "device";
    if !requested(CASE) {
        return;
    }
    let ns = Netns::create(CASE, "n");
    let ifc = name("k", 1);
    let dir = tempfile::tempdir().unwrap();
    let uapi_dir = dir.path().to_path_buf();
    let shown = ns.clone_name();
    ns.block_on(async move {
        let (backend, reason) = select_backend(BackendKind::Kernel, &ifc, &uapi_dir)
            .await
            .expect("kernel backend");
        eprintln!("select_backend(kernel): {reason}");
        assert!(
            reason.starts_with(
                "backend kernel requested: using kernel WireGuard (generic netlink family 'wireguard' id "
            ) && reason.ends_with(&format!("; created wireguard link {ifc})")),
            "{reason}"
        );
        let mut b = backend.lock().unwrap();
        assert_eq!(b.describe(), format!("kernel {ifc} (generic netlink)"));
        let details = ip(&shown, &format!("-d link show {ifc}"));
        assert!(details.contains("wireguard"), "{details}");

        // A fresh device: no key, no peers.
        let fresh = b.state().unwrap();
        assert_eq!(fresh.public_key, None);
        assert!(fresh.peers.is_empty());

        // Key and port.
        let key = PrivateKey::generate();
        let local = LocalDevice {
            private_key: &key,
            listen_port: PORT,
            fwmark: None,
            extra: None,
        };
        let caps = b.capabilities();
        assert_eq!(caps, Capabilities::default(), "no wgmesh extension on a kernel device");
        b.apply(&reconcile(&fresh, &local, &[], caps)).unwrap();
        let state = b.state().unwrap();
        assert_eq!(state.public_key, Some(key.public_key()));
        assert_eq!(state.listen_port, PORT);
        assert_eq!(wg(&shown, &[&ifc, "public-key"]).trim(), key.public_key().to_base64());
        assert_eq!(wg(&shown, &[&ifc, "listen-port"]).trim(), PORT.to_string());

        // The fwmark through our seam (WGDEVICE_A_FWMARK): a change of its
        // own, read back by us and by `wg`. Every reconcile below asks for it
        // too, so each `assert_converged` checks it survived the peer writes.
        let local = LocalDevice {
            fwmark: Some(0x2a),
            ..local
        };
        let changes = reconcile(&state, &local, &[], caps);
        assert_eq!(changes.fwmark, Some(0x2a), "{changes:?}");
        assert!(changes.peers.is_empty() && changes.private_key.is_none() && changes.listen_port.is_none());
        b.apply(&changes).unwrap();
        let state = b.state().unwrap();
        assert_eq!(state.fwmark, 0x2a);
        assert_eq!(wg(&shown, &[&ifc, "fwmark"]).trim(), "0x2a");

        // Peers added: an IPv4 endpoint with keepalive, an IPv6 endpoint,
        // none at all (the device learns it from a handshake).
        let p1 = peer(1, Some("192.0.2.1:51820"), Some(25), &["10.1.0.0/24", "fd00:1::/64"]);
        let p2 = peer(2, Some("[2001:db8::2]:51820"), None, &["10.2.0.0/24"]);
        let p3 = peer(3, None, None, &["10.3.0.0/24", "10.3.1.0/24"]);
        let desired = vec![p1.clone(), p2.clone(), p3.clone()];
        let changes = reconcile(&state, &local, &desired, caps);
        assert_eq!(changes.peers.len(), 3, "{changes:?}");
        assert!(changes.peers.iter().all(|c| matches!(c, PeerChange::Add(_))));
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &local, &desired);
        // The forced handshake's keepalive was set back to off.
        assert_eq!(state.peers.iter().find(|p| p.public_key == p2.public_key).unwrap().persistent_keepalive, None);
        let keepalive = wg(&shown, &[&ifc, "persistent-keepalive"]);
        assert!(keepalive.contains(&format!("{}\t25", p1.public_key.to_base64())), "{keepalive}");
        assert!(keepalive.contains(&format!("{}\toff", p2.public_key.to_base64())), "{keepalive}");
        assert!(keepalive.contains(&format!("{}\toff", p3.public_key.to_base64())), "{keepalive}");

        // Updated: p1's endpoint and keepalive, p2's allowed IPs replaced.
        let p1b = peer(1, Some("192.0.2.11:51821"), None, &["10.1.0.0/24", "fd00:1::/64"]);
        let p2b = peer(2, Some("[2001:db8::2]:51820"), None, &["10.22.0.0/24", "fd00:22::/64"]);
        let desired = vec![p1b.clone(), p2b.clone(), p3.clone()];
        let changes = reconcile(&state, &local, &desired, caps);
        assert_eq!(changes.peers.len(), 2, "{changes:?}");
        assert!(changes.peers.iter().all(|c| matches!(c, PeerChange::Update { .. })));
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &local, &desired);
        let allowed = wg(&shown, &[&ifc, "allowed-ips"]);
        let p2_line = line_of(&allowed, &p2.public_key);
        assert!(p2_line.contains("10.22.0.0/24") && p2_line.contains("fd00:22::/64"), "{p2_line}");
        assert!(!p2_line.contains("10.2.0.0/24"), "replaced, not added: {p2_line}");

        // Removed: p3.
        let desired = vec![p1b.clone(), p2b.clone()];
        let changes = reconcile(&state, &local, &desired, caps);
        assert_eq!(changes.peers, vec![PeerChange::Remove(p3.public_key)]);
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &local, &desired);
        assert_eq!(wg(&shown, &[&ifc, "peers"]).lines().count(), 2);

        // Appended: 300 allowed IPs need several messages; only the first
        // chunk replaces, the continuations add to it.
        let many: Vec<String> = (0..300).map(|i| format!("10.50.{}.{}/32", i / 200, i % 200)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let p4 = peer(4, Some("192.0.2.4:51820"), Some(25), &many);
        let desired = vec![p1b.clone(), p2b.clone(), p4.clone()];
        let changes = reconcile(&state, &local, &desired, caps);
        let messages = set_messages(&ifc, &changes, SAFE_MESSAGE_BYTES);
        assert!(messages.len() >= 2, "300 allowed IPs fit one message? {messages:?}");
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &local, &desired);
        let allowed = wg(&shown, &[&ifc, "allowed-ips"]);
        assert_eq!(line_of(&allowed, &p4.public_key).split_whitespace().count(), 1 + 300);
        eprintln!(
            "300 allowed IPs on one peer: {} messages, read back {} (appended across continuations)",
            messages.len(),
            state.peers.iter().find(|p| p.public_key == p4.public_key).unwrap().allowed_ips.len()
        );
        // ... and replaced again by a short list.
        let p4b = peer(4, Some("192.0.2.4:51820"), Some(25), &["10.50.9.0/24"]);
        let desired = vec![p1b.clone(), p2b.clone(), p4b];
        b.apply(&reconcile(&state, &local, &desired, caps)).unwrap();
        let state = assert_converged(&mut *b, &local, &desired);

        // A new key for the device itself.
        let key2 = PrivateKey::generate();
        let local2 = LocalDevice {
            private_key: &key2,
            ..local.clone()
        };
        let changes = reconcile(&state, &local2, &desired, caps);
        assert!(changes.private_key.is_some() && changes.peers.is_empty());
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &local2, &desired);
        assert_eq!(state.fwmark, 0x2a);
        assert_eq!(wg(&shown, &[&ifc, "fwmark"]).trim(), "0x2a", "our fwmark survived the peer and key writes");

        // Cleared through the seam (0 = off) ...
        let cleared = LocalDevice {
            fwmark: Some(0),
            ..local2.clone()
        };
        let changes = reconcile(&state, &cleared, &desired, caps);
        assert_eq!(changes.fwmark, Some(0), "{changes:?}");
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &cleared, &desired);
        assert_eq!(state.fwmark, 0);
        assert_eq!(wg(&shown, &[&ifc, "fwmark"]).trim(), "off");
        // ... and one an operator sets is left alone where we ask for none
        // (`fwmark: None`, the agent's setting), across a peer update.
        wg_set(&shown, &[&ifc, "fwmark", "0x2b"]);
        let unmanaged = LocalDevice {
            fwmark: None,
            ..local2.clone()
        };
        let desired = vec![p1b.clone(), p2b.clone()];
        let changes = reconcile(&b.state().unwrap(), &unmanaged, &desired, caps);
        assert!(changes.fwmark.is_none() && changes.peers.len() == 1, "{changes:?}");
        b.apply(&changes).unwrap();
        let state = assert_converged(&mut *b, &unmanaged, &desired);
        assert_eq!(state.fwmark, 0x2b);
        assert_eq!(wg(&shown, &[&ifc, "fwmark"]).trim(), "0x2b", "the operator's fwmark survived");
        eprintln!("ok: key, port, fwmark set/kept/cleared through the seam, add/update/remove, replace/append, an operator's fwmark kept on {ifc}");
    });
}

#[test]
fn kernel_errors_reach_our_error_type_with_their_errno() {
    const CASE: &str = "errors";
    if !requested(CASE) {
        return;
    }
    let ns = Netns::create(CASE, "n");
    let shown = ns.clone_name();
    let other = name("d", 1);
    ns.add_plain_link(&other);
    ns.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate();
        let some_changes = ChangeSet {
            private_key: Some(key.clone()),
            listen_port: Some(PORT),
            fwmark: None,
            ..ChangeSet::default()
        };

        // A missing link: the kernel's ENODEV, with the operation named.
        let missing = name("m", 1);
        let err = KernelBackend::new(&missing).apply(&some_changes).unwrap_err();
        let kernel = kernel_error(&err);
        assert_eq!(kernel.errno(), Some(libc::ENODEV), "{err}");
        assert!(
            err.to_string().starts_with(&format!("talking to kernel WireGuard device {missing} (generic netlink) failed: WG_CMD_SET_DEVICE message 1 of 1 on {missing}: ")),
            "{err}"
        );
        eprintln!("missing link: {err}");
        // Reading a missing link creates it (the agent's first pass).
        let state = KernelBackend::new(&missing).state().unwrap();
        assert!(state.peers.is_empty());
        assert!(ip(&shown, &format!("-d link show {missing}")).contains("wireguard"));

        // A link of another kind: EOPNOTSUPP from the kernel; `kernel`
        // refuses and `auto` falls back, both saying why.
        let err = KernelBackend::new(&other).state().unwrap_err();
        assert_eq!(kernel_error(&err).errno(), Some(libc::EOPNOTSUPP), "{err}");
        let Err(err) = select_backend(BackendKind::Kernel, &other, dir.path()).await else {
            panic!("kernel backend on a non-WireGuard link");
        };
        assert!(err.to_string().contains(&format!("interface {other} exists but is not a kernel WireGuard device")), "{err}");
        let (_, reason) = select_backend(BackendKind::Auto, &other, dir.path()).await.unwrap();
        assert!(reason.starts_with("kernel WireGuard present but unusable (interface"), "{reason}");
        eprintln!("another kind of link: {err}\n  auto: {reason}");

        // The port in use: the kernel's EADDRINUSE when the device is up.
        let busy = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        ip(&shown, &format!("link set {missing} up"));
        let mut b = KernelBackend::new(&missing);
        let err = b
            .apply(&ChangeSet {
                listen_port: Some(busy_port),
                ..ChangeSet::default()
            })
            .unwrap_err();
        assert_eq!(kernel_error(&err).errno(), Some(libc::EADDRINUSE), "{err}");
        eprintln!("port in use: {err}");
        // The backend reconnects after a failure and works again.
        b.apply(&some_changes).unwrap();
        assert_eq!(b.state().unwrap().listen_port, PORT);

        // Names the kernel would refuse, refused before any request.
        for bad in ["bad/name", "much-too-long-nm", ""] {
            let err = KernelBackend::new(bad).ensure_link().unwrap_err();
            assert!(matches!(kernel_error(&err), KernelError::Link(NetError::InvalidName(_))), "{err}");
            eprintln!("name {bad:?}: {err}");
        }
        let Err(err) = select_backend(BackendKind::Kernel, "much-too-long-nm", dir.path()).await else {
            panic!("a 16-byte name was accepted");
        };
        assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
    });
}

#[test]
fn a_thousand_peers_with_seven_thousand_allowed_ips_round_trip() {
    const CASE: &str = "thousand";
    if !requested(CASE) {
        return;
    }
    let ns = Netns::create(CASE, "n");
    let shown = ns.clone_name();
    let ifc = name("k", 2);
    ns.block_on(async move {
        let mut b = KernelBackend::new(&ifc);
        assert!(b.ensure_link().unwrap(), "created");
        let key = PrivateKey::generate();
        let local = LocalDevice {
            private_key: &key,
            listen_port: PORT,
            fwmark: None,
            extra: None,
        };
        let desired: Vec<PeerConfig> = (0..1000u32)
            .map(|i| {
                let (hi, lo) = (100 + i / 256, i % 256);
                let mut ips: Vec<String> =
                    (0..5).map(|j| format!("10.{hi}.{lo}.{}/28", j * 16)).collect();
                ips.push(format!("fd00:{i:x}::/64"));
                ips.push(format!("fd01:{i:x}:1::/96"));
                let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
                let ep = format!("192.0.2.{}:{}", 1 + i % 250, 50000 + i);
                let keepalive = (i % 3 == 0).then_some(25);
                PeerConfig {
                    public_key: PrivateKey::generate().public_key(),
                    ..peer(0, Some(&ep), keepalive, &ips)
                }
            })
            .collect();
        let allowed: usize = desired.iter().map(|p| p.allowed_ips.len()).sum();
        assert_eq!(allowed, 7000);

        let state = b.state().unwrap();
        let changes = reconcile(&state, &local, &desired, Capabilities::default());
        let messages = set_messages(&ifc, &changes, SAFE_MESSAGE_BYTES);
        let largest = messages.iter().map(|m| m.len()).max().unwrap();
        assert!(largest <= SAFE_MESSAGE_BYTES);
        let started = Instant::now();
        b.apply(&changes).unwrap();
        let applied = started.elapsed();
        let started = Instant::now();
        let back = b.state().unwrap();
        let read = started.elapsed();

        let mut want = desired.clone();
        for p in &mut want {
            p.normalize();
        }
        want.sort_by_key(|p| p.public_key);
        let mut got = back.peers.clone();
        got.sort_by_key(|p| p.public_key);
        assert_eq!(got.len(), 1000);
        assert!(got == want, "the device's peers differ from the plan");
        assert!(reconcile(&back, &local, &desired, Capabilities::default()).is_empty());
        // Independently, with wireguard-tools.
        let dump = wg(&shown, &[&ifc, "dump"]);
        let lines: Vec<&str> = dump.lines().collect();
        assert_eq!(lines.len(), 1 + 1000, "interface line + one per peer");
        let counted: usize = lines[1..]
            .iter()
            .map(|l| l.split('\t').nth(3).unwrap().split(',').count())
            .sum();
        assert_eq!(counted, 7000);
        println!(
            "1,000 peers / 7,000 allowed IPs: {} WG_CMD_SET_DEVICE messages (largest {} bytes, limit {}), \
             applied in {} ms, read back in {} ms: identical ({} peers, {} allowed IPs by wg show dump) \
             [software-emulated VM: not a performance figure]",
            messages.len(),
            largest,
            SAFE_MESSAGE_BYTES,
            applied.as_millis(),
            read.as_millis(),
            lines.len() - 1,
            counted
        );

        // And all removed in one change set.
        let changes = reconcile(&back, &local, &[], Capabilities::default());
        assert_eq!(changes.peers.len(), 1000);
        let count = set_messages(&ifc, &changes, SAFE_MESSAGE_BYTES).len();
        b.apply(&changes).unwrap();
        assert!(b.state().unwrap().peers.is_empty());
        assert_eq!(wg(&shown, &[&ifc, "peers"]).trim(), "");
        println!("1,000 peers removed: {count} messages");
    });
}

#[test]
fn interop_kernel_initiates_with_the_userspace_dataplane() {
    interop("interop-k", Initiator::Kernel);
}

#[test]
fn interop_userspace_dataplane_initiates_with_the_kernel() {
    interop("interop-u", Initiator::Dataplane);
}

#[test]
fn auto_picks_the_kernel_and_says_why() {
    const CASE: &str = "auto";
    if !requested(CASE) {
        return;
    }
    let ns = Netns::create(CASE, "n");
    let shown = ns.clone_name();
    let ifc = name("k", 3);
    let dir = tempfile::tempdir().unwrap();
    let uapi_dir = dir.path().to_path_buf();
    ns.block_on({
        let ifc = ifc.clone();
        async move {
            // A reader never creates the link.
            let (backend, reason) = select_reader(BackendKind::Auto, &ifc, &uapi_dir)
                .await
                .unwrap();
            assert!(backend.lock().unwrap().describe().starts_with("uapi "));
            assert!(
                reason.contains(&format!("there is no interface {ifc}")),
                "{reason}"
            );
            assert!(!link_exists(&shown, &ifc), "select_reader created {ifc}");
            eprintln!("select_reader(auto), no link: {reason}");

            let (backend, reason) = select_backend(BackendKind::Auto, &ifc, &uapi_dir)
                .await
                .unwrap();
            eprintln!("select_backend(auto): {reason}");
            assert_eq!(
                backend.lock().unwrap().describe(),
                format!("kernel {ifc} (generic netlink)")
            );
            assert!(
                reason.starts_with(
                    "kernel WireGuard available (generic netlink family 'wireguard' id "
                ) && reason.ends_with(&format!("; created wireguard link {ifc}): using it")),
                "{reason}"
            );
            let (_, reason) = select_backend(BackendKind::Auto, &ifc, &uapi_dir)
                .await
                .unwrap();
            assert!(
                reason.ends_with(&format!("; wireguard link {ifc} exists): using it")),
                "{reason}"
            );
            let (backend, reason) = select_reader(BackendKind::Auto, &ifc, &uapi_dir)
                .await
                .unwrap();
            assert!(
                backend.lock().unwrap().describe().starts_with("kernel "),
                "{reason}"
            );

            // A UAPI socket for the name wins: a data plane serves it.
            let sock = uapi_dir.join(format!("{ifc}.sock"));
            let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            let (backend, reason) = select_backend(BackendKind::Auto, &ifc, &uapi_dir)
                .await
                .unwrap();
            assert!(backend.lock().unwrap().describe().starts_with("uapi "));
            assert!(reason.contains("already serves"), "{reason}");
        }
    });

    // The agent itself logs the choice and why.
    let agent_ifc = name("k", 4);
    let store = dir.path().join("store");
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let empty = dir.path().join("uapi");
    fs::create_dir_all(&empty).unwrap();
    let out = ns.exec_timeout(
        60,
        &[
            env!("CARGO_BIN_EXE_wgmesh"),
            "agent",
            "--once",
            "--backend",
            "auto",
            "--interface",
            &agent_ifc,
            "--uapi-dir",
            empty.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--node-name",
            "n1",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--cluster-cidrs",
            "10.244.0.0/16",
            "--no-network",
            "--no-cni",
            "--metrics-listen",
            "off",
        ],
    );
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = log
        .lines()
        .find(|l| l.contains("backend selected"))
        .unwrap_or_else(|| panic!("no 'backend selected' line in the agent's log:\n{log}"));
    assert!(
        line.contains("kernel WireGuard available")
            && line.contains(&format!("created wireguard link {agent_ifc}")),
        "{line}"
    );
    assert!(link_exists(&ns.name, &agent_ifc));
    eprintln!("wgmesh agent --once --backend auto logged: {}", line.trim());
}

#[test]
fn a_key_rotation_hand_over_on_a_kernel_peer() {
    const CASE: &str = "rotate";
    if !requested(CASE) {
        return;
    }
    let a = Netns::create(CASE, "a");
    let b = Netns::create(CASE, "b");
    let (ua, ub) = ("192.168.78.1", "192.168.78.2");
    let (ta, tb) = ("10.78.0.1", "10.78.0.2");
    veth(&a, ua, &b, ub, 2);
    let (ia, ib) = (name("k", 5), name("k", 6));
    let (ka, kb1, kb2, kb3) = (
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
        PrivateKey::generate(),
    );
    let peer_a = peer_with(
        ka.public_key(),
        Some(&format!("{ua}:{PORT}")),
        &[&format!("{ta}/32")],
    );
    let peer_b = |k: &PrivateKey| {
        peer_with(
            k.public_key(),
            Some(&format!("{ub}:{PORT}")),
            &[&format!("{tb}/32")],
        )
    };

    // Both kernel devices, A's peer is B under K1.
    for (ns, ifc, key, peer, addr) in [
        (&a, &ia, &ka, peer_b(&kb1), ta),
        (&b, &ib, &kb1, peer_a.clone(), tb),
    ] {
        let (ifc2, key, peer) = (ifc.clone(), key.clone(), peer.clone());
        ns.within(move || {
            let mut dev = KernelBackend::new(&ifc2);
            dev.ensure_link().unwrap();
            dev.apply(&ChangeSet {
                private_key: Some(key),
                listen_port: Some(PORT),
                peers: vec![PeerChange::Add(peer)],
                ..ChangeSet::default()
            })
            .unwrap();
        });
        tunnel_up(ns, ifc, addr);
    }
    ping_until_up(&b, ta);

    let runs = [
        (
            "wgmesh diff: add K2 + remove K1 + forced handshake",
            &kb1,
            &kb2,
        ),
        (
            "control, wg set: add + remove, no forced handshake",
            &kb2,
            &kb3,
        ),
    ];
    for (i, (label, old, new)) in runs.into_iter().enumerate() {
        // B pings A every 10 ms: B is the node that rotates and switches
        // first; its packets wait for a session under its new key.
        let flow = b.spawn(&["ping", "-D", "-n", "-i", "0.01", "-w", "9", ta]);
        thread::sleep(Duration::from_millis(2000));
        let (ib2, new_key) = (ib.clone(), new.clone());
        let switched = b.within(move || {
            KernelBackend::new(&ib2)
                .apply(&ChangeSet {
                    private_key: Some(new_key),
                    ..ChangeSet::default()
                })
                .unwrap();
            Instant::now()
        });
        let followed = if i == 0 {
            // A follows with the diff of its device against the new plan.
            let (ia2, ka2, old_pub, new_peer) =
                (ia.clone(), ka.clone(), old.public_key(), peer_b(new));
            a.within(move || {
                let mut dev = KernelBackend::new(&ia2);
                let state = dev.state().unwrap();
                let local = LocalDevice {
                    private_key: &ka2,
                    listen_port: PORT,
                    fwmark: None,
                    extra: None,
                };
                let changes = reconcile(
                    &state,
                    &local,
                    std::slice::from_ref(&new_peer),
                    Capabilities::default(),
                );
                assert_eq!(
                    changes.peers,
                    vec![
                        PeerChange::Add(new_peer.clone()),
                        PeerChange::Remove(old_pub)
                    ],
                    "add the new key, then remove the old one"
                );
                let messages = set_messages(&ia2, &changes, SAFE_MESSAGE_BYTES);
                assert_eq!(messages.len(), 1, "one request");
                assert_eq!(
                    messages[0].peer_count(),
                    3,
                    "add, remove, keepalive restored"
                );
                dev.apply(&changes).unwrap();
                Instant::now()
            })
        } else {
            // The same hand-over as `wg set` writes it: no keepalive trick.
            let out = a.exec_timeout(
                30,
                &[
                    "wg",
                    "set",
                    &ia,
                    "peer",
                    &new.public_key().to_base64(),
                    "endpoint",
                    &format!("{ub}:{PORT}"),
                    "allowed-ips",
                    &format!("{tb}/32"),
                    "peer",
                    &old.public_key().to_base64(),
                    "remove",
                ],
            );
            assert!(
                out.status.success(),
                "wg set: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Instant::now()
        };
        let out = flow.wait_output(30);
        let stats = ping_stats(&String::from_utf8_lossy(&out.stdout));
        let peers = wg(&a.name, &[&ia, "latest-handshakes"]);
        assert!(peers.contains(&new.public_key().to_base64()), "{peers}");
        assert_eq!(peers.lines().count(), 1, "only the new key: {peers}");
        let figure = format!(
            "key rotation hand-over on a kernel peer ({run_name}): peer followed {} ms after the switch; \
             ping every 10 ms from the rotating node: {} sent, {} received, {} lost, longest gap {} ms \
             [software-emulated VM]",
            followed.saturating_duration_since(switched).as_millis(),
            stats.transmitted,
            stats.received,
            stats.transmitted - stats.received,
            stats.longest_gap_ms,
            run_name = label
        );
        println!("{figure}");
        // Not a timing assertion: each hand-over ends with traffic flowing.
        ping_until_up(&b, ta);
    }
}

// ---- interop ---------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Initiator {
    Kernel,
    Dataplane,
}

fn interop(case: &str, initiator: Initiator) {
    if !requested(case) {
        return;
    }
    let a = Netns::create(case, "a");
    let b = Netns::create(case, "b");
    let n = if initiator == Initiator::Kernel {
        10
    } else {
        20
    };
    let (ua, ub) = ("192.168.77.1", "192.168.77.2");
    let (ta, tb) = ("10.77.0.1", "10.77.0.2");
    veth(&a, ua, &b, ub, n);
    let (ia, ib) = (name("k", n), name("u", n));
    let dir = tempfile::tempdir().unwrap();
    let uapi_dir = dir.path().join("uapi");
    fs::create_dir_all(&uapi_dir).unwrap();

    // B: the userspace data plane, a process in namespace B.
    let dataplane = b.spawn_logged(
        &[
            env!("CARGO_BIN_EXE_wgmesh"),
            "dataplane",
            "--interface",
            &ib,
            "--uapi-dir",
            uapi_dir.to_str().unwrap(),
        ],
        &dir.path().join("dataplane.log"),
    );
    let sock = uapi_dir.join(format!("{ib}.sock"));
    wait_for(&sock, Duration::from_secs(60), &dataplane);

    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let endpoint_of_b = (initiator == Initiator::Kernel).then(|| format!("{ub}:{PORT}"));
    let endpoint_of_a = (initiator == Initiator::Dataplane).then(|| format!("{ua}:{PORT}"));
    // Links up first, so the add's forced handshake goes out at once.
    a.within({
        let ia = ia.clone();
        move || KernelBackend::new(&ia).ensure_link().unwrap()
    });
    tunnel_up(&a, &ia, ta);
    tunnel_up(&b, &ib, tb);
    let mut user = UapiBackend::for_interface(&uapi_dir, &ib);
    let user_changes = ChangeSet {
        private_key: Some(kb.clone()),
        listen_port: Some(PORT),
        peers: vec![PeerChange::Add(peer_with(
            ka.public_key(),
            endpoint_of_a.as_deref(),
            &[&format!("{ta}/32")],
        ))],
        ..ChangeSet::default()
    };
    let kernel_changes = ChangeSet {
        private_key: Some(ka.clone()),
        listen_port: Some(PORT),
        peers: vec![PeerChange::Add(peer_with(
            kb.public_key(),
            endpoint_of_b.as_deref(),
            &[&format!("{tb}/32")],
        ))],
        ..ChangeSet::default()
    };
    let configure_kernel = || {
        a.within({
            let (ia, changes) = (ia.clone(), kernel_changes.clone());
            move || KernelBackend::new(&ia).apply(&changes).unwrap()
        })
    };
    // The responder first, so the initiator's first handshake is answered.
    if initiator == Initiator::Kernel {
        apply_uapi(&mut user, &user_changes, &dataplane);
        configure_kernel();
    } else {
        configure_kernel();
        apply_uapi(&mut user, &user_changes, &dataplane);
    }

    // The initiator's side sends first.
    let started = Instant::now();
    match initiator {
        Initiator::Kernel => ping_until_up(&a, tb),
        Initiator::Dataplane => ping_until_up(&b, ta),
    }
    let first = started.elapsed();
    // The responder learnt the initiator's endpoint from its handshake.
    match initiator {
        Initiator::Kernel => {
            let stats = user.peer_stats().unwrap();
            assert_eq!(
                stats[0].endpoint,
                Some(format!("{ua}:{PORT}").parse().unwrap()),
                "{stats:?}"
            );
        }
        Initiator::Dataplane => {
            let shown = wg(&a.name, &[&ia, "endpoints"]);
            assert!(shown.contains(&format!("{ub}:{PORT}")), "{shown}");
        }
    }

    let mut figures = vec![format!("first reply after {} ms", first.as_millis())];
    for (from, to, label) in [(&a, tb, "kernel→userspace"), (&b, ta, "userspace→kernel")] {
        let s = ping(from, to, 20, None);
        assert_eq!(s.received, 20, "{label} ping: {s:?}\n{}", dataplane.log());
        // Full size with DF: 1420 - 20 (IPv4) - 8 (ICMP).
        let big = ping(from, to, 5, Some(TUNNEL_MTU as usize - 28));
        assert_eq!(
            big.received,
            5,
            "{label} full-size ping: {big:?}\n{}",
            dataplane.log()
        );
        figures.push(format!(
            "ping {label} 20/20 and 5/5 at {} bytes DF",
            TUNNEL_MTU
        ));
    }
    for (server_ns, server_ip, client_ns, label) in [
        (&b, tb, &a, "kernel→userspace"),
        (&a, ta, &b, "userspace→kernel"),
    ] {
        let took = transfer(server_ns, server_ip, client_ns, TRANSFER_BYTES);
        figures.push(format!(
            "TCP {label} {} MiB byte-checked in {} ms",
            TRANSFER_BYTES >> 20,
            took.as_millis()
        ));
    }
    // Counters on both devices cover the traffic.
    let kstats = a.within({
        let ia = ia.clone();
        move || KernelBackend::new(&ia).peer_stats().unwrap()
    });
    let ustats = user.peer_stats().unwrap();
    for (side, stats) in [("kernel", &kstats), ("userspace", &ustats)] {
        assert_eq!(stats.len(), 1, "{side}: {stats:?}");
        let s = &stats[0];
        assert!(
            s.last_handshake.is_some_and(|t| t <= SystemTime::now()),
            "{side}: {s:?}"
        );
        assert!(
            s.rx_bytes as usize > TRANSFER_BYTES && s.tx_bytes as usize > TRANSFER_BYTES,
            "{side}: {s:?}"
        );
    }

    // `wgmesh status` and `graph` with the agent's default (auto) read both.
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let status = |ns: &Netns, ifc: &str, sub: &str| -> String {
        let out = ns.exec_timeout(
            60,
            &[
                env!("CARGO_BIN_EXE_wgmesh"),
                sub,
                "--node-name",
                "n1",
                "--interface",
                ifc,
                "--uapi-dir",
                uapi_dir.to_str().unwrap(),
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "wgmesh {sub} in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ks = status(&a, &ia, "status");
    assert!(
        ks.starts_with(&format!(
            "node n1 — 0 peers — kernel {ia} (generic netlink)\n"
        )),
        "{ks}"
    );
    assert!(
        ks.contains(&kb.public_key().fingerprint().to_string()),
        "{ks}"
    );
    assert!(ks.contains(&format!("{ub}:{PORT}")), "{ks}");
    let us = status(&b, &ib, "status");
    assert!(
        us.starts_with(&format!("node n1 — 0 peers — uapi {}\n", sock.display())),
        "{us}"
    );
    assert!(
        us.contains(&ka.public_key().fingerprint().to_string()),
        "{us}"
    );
    let graph = status(&a, &ia, "graph");
    assert!(
        graph.contains(&format!("// device: kernel {ia} (generic netlink)")),
        "{graph}"
    );
    assert!(graph.contains("color=darkgreen"), "a healthy edge: {graph}");
    print!("wgmesh status in the kernel namespace:\n{ks}");

    println!(
        "interop kernel ↔ wgmesh dataplane, {} initiates: {} [software-emulated VM: times are not performance figures]",
        match initiator {
            Initiator::Kernel => "kernel",
            Initiator::Dataplane => "userspace dataplane",
        },
        figures.join("; ")
    );
    drop(dataplane);
}

/// Applies `changes` over the UAPI socket. A debug-build data plane under
/// software emulation may take longer than the client's 5 s read timeout to
/// answer a `set` that adds a peer (it initiates the handshake first); the
/// request was written, so wait until the device answers and check it took.
fn apply_uapi(user: &mut UapiBackend, changes: &ChangeSet, dataplane: &Daemon) {
    let err = match user.apply(changes) {
        Ok(()) => return,
        Err(e) => e,
    };
    let slow = matches!(&err, WgError::Io { source, .. }
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
    assert!(slow, "{err}\n{}", dataplane.log());
    eprintln!("note: {err}: the data plane is slow to answer (debug build, emulated CPU); reading its state");
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        match user.state() {
            Ok(state) => break state,
            Err(e) if Instant::now() < deadline => {
                eprintln!("  still waiting: {e}");
                thread::sleep(Duration::from_secs(1));
            }
            Err(e) => panic!("{e}\n{}", dataplane.log()),
        }
    };
    let want_key = changes.private_key.as_ref().map(PrivateKey::public_key);
    assert!(
        want_key.is_none() || state.public_key == want_key,
        "{state:?}"
    );
    for change in &changes.peers {
        if let PeerChange::Add(p) = change {
            assert!(
                state.peers.iter().any(|q| q.public_key == p.public_key),
                "{state:?}"
            );
        }
    }
}

/// A byte-checked TCP transfer of `bytes` from `client_ns` to a listener at
/// `server_ip` in `server_ns`; how long it took.
fn transfer(server_ns: &Netns, server_ip: &str, client_ns: &Netns, bytes: usize) -> Duration {
    let addr: SocketAddr = format!("{server_ip}:5001").parse().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = server_ns.spawn_thread(move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        ready_tx.send(()).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut offset = 0usize;
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            for (i, byte) in buf[..n].iter().enumerate() {
                assert_eq!(*byte, pattern(offset + i), "byte {} differs", offset + i);
            }
            offset += n;
        }
        offset
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("listener up");
    let started = Instant::now();
    client_ns.within(move || {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        conn.set_write_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let data: Vec<u8> = (0..bytes).map(pattern).collect();
        conn.write_all(&data).unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let received = server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert_eq!(received, bytes, "bytes received");
    started.elapsed()
}

/// A position-dependent byte stream: a reordered or dropped segment shows.
fn pattern(i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i >> 16) as u8
}

// ---- gate -------------------------------------------------------------------

/// Whether the case runs: only with WGMESH_KERNEL_TESTS=1 (after a SKIP line
/// otherwise); when asked, a missing prerequisite fails it.
fn requested(case: &str) -> bool {
    if std::env::var(ENABLE).as_deref() != Ok("1") {
        // Straight to fd 2: libtest captures eprintln! of passing tests.
        let _ = writeln!(
            io::stderr(),
            "SKIP kernel_vm {case}: kernel WireGuard cases run in the VM tier, scripts/test-vm \
             (which sets {ENABLE}=1 inside a guest with the wireguard module)"
        );
        return false;
    }
    if let Some(missing) = missing_prerequisite() {
        panic!("{case}: {ENABLE}=1 but {missing}");
    }
    reap_stale_once();
    true
}

fn missing_prerequisite() -> Option<String> {
    if !testkit::prereq::is_root() {
        return Some("not root".into());
    }
    for tool in [["ip", "-V"], ["wg", "--version"], ["ping", "-V"]] {
        if Command::new(tool[0]).arg(tool[1]).output().is_err() {
            return Some(format!("{} is not installed", tool[0]));
        }
    }
    if !Path::new("/sys/module/wireguard").exists() {
        let _ = Command::new("modprobe").arg("wireguard").status();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if !rt.block_on(kernel_available()) {
        return Some("kernel WireGuard is unavailable (modprobe wireguard failed?)".into());
    }
    None
}

// ---- namespaces, processes -------------------------------------------------

/// A network namespace of this process; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(case: &str, side: &str) -> Netns {
        let name = format!("{PREFIX}{}-{case}-{side}", std::process::id());
        testkit::netns::add(&name).unwrap_or_else(|e| panic!("{e}"));
        let ns = Netns { name };
        ip(&ns.name, "link set lo up");
        ns
    }

    fn clone_name(&self) -> String {
        self.name.clone()
    }

    /// A link that is not WireGuard: dummy if the kernel has it, else veth.
    fn add_plain_link(&self, ifc: &str) {
        if testkit::netns::ip_in(&self.name, &format!("link add {ifc} type dummy")).is_err() {
            ip(
                &self.name,
                &format!("link add {ifc} type veth peer name {ifc}p"),
            );
        }
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens belong to it).
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_thread(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let name = self.name.clone();
        thread::spawn(move || {
            testkit::netns::enter(&name).unwrap_or_else(|e| panic!("{e}"));
            f()
        })
    }

    /// `body` on a current-thread runtime inside the namespace, bounded.
    fn block_on<Fut: Future<Output = ()> + Send + 'static>(&self, body: Fut) {
        self.within(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(600), body)
                        .await
                        .expect("case timed out")
                })
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs to completion under timeout(1).
    fn exec_timeout(&self, secs: u32, args: &[&str]) -> Output {
        let mut c = Command::new("timeout");
        c.args([
            "-k",
            "5",
            &secs.to_string(),
            "ip",
            "netns",
            "exec",
            &self.name,
        ])
        .args(args)
        .stdin(Stdio::null());
        c.output().expect("run timeout")
    }

    fn spawn(&self, args: &[&str]) -> Daemon {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        Daemon {
            child: Some(child),
            log: None,
        }
    }

    fn spawn_logged(&self, args: &[&str], log: &Path) -> Daemon {
        let file = File::create(log).unwrap();
        let child = self
            .command(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"));
        Daemon {
            child: Some(child),
            log: Some(log.to_path_buf()),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        testkit::netns::del(&self.name);
    }
}

/// A process started by a case: SIGTERM, then SIGKILL, on drop.
struct Daemon {
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl Daemon {
    fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|l| format!("--- log ---\n{l}"))
            .unwrap_or_default()
    }

    /// Waits for it to exit by itself (at most `secs`, then kills it).
    fn wait_output(mut self, secs: u64) -> Output {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            testkit::process::stop(&mut child, Duration::from_secs(5));
        }
    }
}

fn reap_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = fs::read_dir("/run/netns") else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
                testkit::netns::del(&name);
            }
        }
    });
}

/// `<tag><pid hex>x<n>`: unique per process and case, at most 15 bytes.
fn name(tag: &str, n: u32) -> String {
    let s = format!("{tag}{:x}x{n}", std::process::id());
    assert!(s.len() <= 15, "{s}");
    s
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(ns: &str, args: &str) -> String {
    testkit::netns::ip_in(ns, args).unwrap_or_else(|e| panic!("{e}"))
}

fn link_exists(ns: &str, ifc: &str) -> bool {
    testkit::netns::ip_in(ns, &format!("link show {ifc}")).is_ok()
}

/// `wg show ARGS` in `ns`.
fn wg(ns: &str, args: &[&str]) -> String {
    let mut all = vec!["ip", "netns", "exec", ns, "wg", "show"];
    all.extend_from_slice(args);
    run(&all)
}

fn wg_set(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", ns, "wg", "set"];
    all.extend_from_slice(args);
    run(&all);
}

/// The line of `wg show IFACE <field>` output for `key`.
fn line_of(shown: &str, key: &PublicKey) -> String {
    let key = key.to_base64();
    shown
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("no line for {key} in:\n{shown}"))
        .to_owned()
}

/// A veth pair between `a` and `b` with underlay addresses (/24).
fn veth(a: &Netns, ua: &str, b: &Netns, ub: &str, n: u32) {
    let (va, vb) = (name("va", n), name("vb", n));
    run(&[
        "ip",
        "link",
        "add",
        &va,
        "netns",
        &a.name,
        "mtu",
        &UNDERLAY_MTU.to_string(),
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        &b.name,
        "mtu",
        &UNDERLAY_MTU.to_string(),
    ]);
    for (ns, v, addr) in [(a, &va, ua), (b, &vb, ub)] {
        ip(&ns.name, &format!("addr add {addr}/24 dev {v}"));
        ip(&ns.name, &format!("link set {v} up"));
    }
}

/// The tunnel address (/24) and MTU on `ifc`, and the link up.
fn tunnel_up(ns: &Netns, ifc: &str, addr: &str) {
    ip(&ns.name, &format!("link set {ifc} mtu {TUNNEL_MTU}"));
    ip(&ns.name, &format!("addr add {addr}/24 dev {ifc}"));
    ip(&ns.name, &format!("link set {ifc} up"));
}

fn wait_for(path: &Path, limit: Duration, daemon: &Daemon) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared\n{}",
            path.display(),
            daemon.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Debug, Default)]
struct PingStats {
    transmitted: u32,
    received: u32,
    longest_gap_ms: u64,
}

/// Pings `to` from `from` `count` times (payload `size`, DF set).
fn ping(from: &Netns, to: &str, count: u32, size: Option<usize>) -> PingStats {
    let mut args = vec![
        "ping".to_string(),
        "-D".into(),
        "-n".into(),
        "-c".into(),
        count.to_string(),
        "-i".into(),
        "0.05".into(),
        "-W".into(),
        "3".into(),
    ];
    if let Some(size) = size {
        args.extend(["-M".into(), "do".into(), "-s".into(), size.to_string()]);
    }
    args.push(to.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = from.exec_timeout(60, &args);
    ping_stats(&String::from_utf8_lossy(&out.stdout))
}

/// Single pings until one is answered (the handshake done), at most 60.
fn ping_until_up(from: &Netns, to: &str) {
    for _ in 0..60 {
        let out = from.exec_timeout(10, &["ping", "-n", "-c", "1", "-W", "1", to]);
        if out.status.success() {
            return;
        }
    }
    panic!("{to} never answered from {}", from.name);
}

/// Counts and the longest silence between two replies of `ping -D` output.
fn ping_stats(out: &str) -> PingStats {
    let mut stats = PingStats::default();
    let mut last: Option<f64> = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix('[') {
            if let (Some((ts, _)), true) = (rest.split_once(']'), line.contains("icmp_seq=")) {
                if let Ok(t) = ts.parse::<f64>() {
                    if let Some(prev) = last {
                        let gap = ((t - prev) * 1000.0).round() as u64;
                        stats.longest_gap_ms = stats.longest_gap_ms.max(gap);
                    }
                    last = Some(t);
                }
            }
        }
        if line.contains("packets transmitted") {
            let nums: Vec<u32> = line
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            if nums.len() >= 2 {
                stats.transmitted = nums[0];
                stats.received = nums[1];
            }
        }
    }
    stats
}

fn unreachable_kubeconfig(dir: &Path) -> PathBuf {
    // Nothing listens on port 1 of the namespace's loopback: the API is
    // "unreachable" at once, as on a node whose API server is down.
    let path = dir.join("kubeconfig");
    fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n\
         users:\n- name: u\n  user:\n    token: none\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n",
    )
    .unwrap();
    path
}

// ---- peers and errors --------------------------------------------------------

fn peer(n: u8, endpoint: Option<&str>, keepalive: Option<u16>, ips: &[&str]) -> PeerConfig {
    let mut p = peer_with(
        PrivateKey::from_bytes([n.max(1); 32]).unwrap().public_key(),
        endpoint,
        ips,
    );
    p.persistent_keepalive = keepalive;
    p
}

fn peer_with(key: PublicKey, endpoint: Option<&str>, ips: &[&str]) -> PeerConfig {
    let mut allowed_ips: Vec<IpNet> = ips.iter().map(|s| s.parse().unwrap()).collect();
    allowed_ips.sort();
    PeerConfig {
        public_key: key,
        endpoint: endpoint.map(|e| e.parse().unwrap()),
        allowed_ips,
        persistent_keepalive: None,
        successor: None,
    }
}

/// Reads the device: its peers are `desired` exactly, and nothing is left
/// to write. Returns the state.
fn assert_converged(
    b: &mut dyn Backend,
    local: &LocalDevice<'_>,
    desired: &[PeerConfig],
) -> wgmesh::wg::DeviceState {
    let state = b.state().unwrap();
    let mut want = desired.to_vec();
    for p in &mut want {
        p.normalize();
    }
    want.sort_by_key(|p| p.public_key);
    let mut got = state.peers.clone();
    got.sort_by_key(|p| p.public_key);
    assert_eq!(got, want, "device peers");
    let left = reconcile(&state, local, desired, Capabilities::default());
    assert!(left.is_empty(), "still to write: {left:?}");
    state
}

/// The `KernelError` under a backend's `WgError`.
fn kernel_error(err: &WgError) -> &KernelError {
    match err {
        WgError::Io { source, .. } => source
            .get_ref()
            .and_then(|e| e.downcast_ref::<KernelError>())
            .unwrap_or_else(|| panic!("not a KernelError: {err}")),
        other => panic!("not WgError::Io: {other}"),
    }
}
