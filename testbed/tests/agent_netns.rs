//! Two nodes build a working encrypted tunnel from Node objects alone: each node
//! is a network namespace running the real `wgmesh dataplane` and `wgmesh agent`
//! processes, with a pod namespace behind it; the Kubernetes API is the
//! testbed's, listening on the underlay bridge. A third node with an invalid
//! key is left out (with Events) while the first two keep working.
//!
//! Needs root, /dev/net/tun and iproute2; without them it prints SKIP, except
//! under CI=true where a missing prerequisite fails it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use wgmesh_testbed::api::{ApiServer, ApiServerConfig, ApiServerHandle};

/// Everything the test created; torn down on drop (also on panic).
struct World {
    tag: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    dir: tempfile::TempDir,
    stop_api: Option<tokio::sync::oneshot::Sender<()>>,
    api_thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        // SIGTERM to all first, so they wind down side by side.
        for (_, c) in &self.children {
            testkit::process::signal(c.id(), testkit::Signal::TERM);
        }
        for (_, c) in &mut self.children {
            testkit::process::stop(c, Duration::from_secs(3));
        }
        if let Some(tx) = self.stop_api.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.api_thread.take() {
            let _ = t.join();
        }
        for ns in self.namespaces.iter().rev() {
            testkit::netns::del(ns);
        }
        // Keep the daemons' logs when the test failed, or when asked to.
        if std::thread::panicking() || std::env::var_os("WGMESH_KEEP_LOGS").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

fn sh(args: &[&str]) {
    testkit::cmd::run(args).unwrap_or_else(|e| panic!("{e}"));
}

/// The wgmesh binary (`WGMESH_BIN`, or built now: it belongs to another package).
fn wgmesh_bin() -> PathBuf {
    testkit::cmd::workspace_bin("wgmesh", "wgmesh", "WGMESH_BIN").unwrap_or_else(|e| panic!("{e}"))
}

impl World {
    fn new() -> Option<Self> {
        use testkit::prereq::{missing, Need};
        if let Some(why) = missing(&[Need::Root, Need::Tun, Need::Tool("ip"), Need::Tool("ping")]) {
            testkit::prereq::skip_or_fail("agent_netns", &why);
            return None;
        }
        Some(Self {
            tag: format!("{:x}", std::process::id() % 0xffff),
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            stop_api: None,
            api_thread: None,
        })
    }

    fn netns(&mut self, role: &str) -> String {
        let name = format!("wgag-{}-{role}", self.tag);
        testkit::netns::add(&name).unwrap_or_else(|e| panic!("{e}"));
        self.namespaces.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Starts the API server inside `ns` (its listening socket belongs there).
    fn start_api(&mut self, ns: &str, listen: &str) -> ApiServerHandle {
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ns = ns.to_string();
        let listen: std::net::SocketAddr = listen.parse().unwrap();
        let thread = std::thread::spawn(move || {
            testkit::netns::enter(&ns).unwrap_or_else(|e| panic!("{e}"));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let config = ApiServerConfig {
                    listen,
                    ..Default::default()
                };
                let server = ApiServer::start(config).await.unwrap();
                tx.send(server).unwrap_or_else(|_| panic!("test gone"));
                let _ = stop_rx.await;
            });
        });
        self.stop_api = Some(stop_tx);
        self.api_thread = Some(thread);
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    fn spawn(&mut self, name: &str, ns: &str, args: &[&str]) {
        let log = File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .env("WGMESH_LOG", "wgmesh=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push((name.to_string(), child));
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {name} (last 40 lines)\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn wait_for(&self, what: &str, secs: u64, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out after {secs} s waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Peers a device reports through its UAPI socket.
fn device_peers(sock: &Path) -> Vec<String> {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"get=1\n\n").is_err() {
        return Vec::new();
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter_map(|l| l.strip_prefix("public_key="))
        .map(str::to_string)
        .collect()
}

#[test]
fn two_nodes_build_a_tunnel_from_node_objects_and_a_bad_third_is_left_out() {
    let Some(mut w) = World::new() else { return };
    let bin = wgmesh_bin();
    let bin = bin.to_str().unwrap().to_string();

    // Underlay: a bridge in its own namespace, the API server on it.
    let u = w.netns("u");
    sh(&["ip", "-n", &u, "link", "add", "br0", "type", "bridge"]);
    sh(&[
        "ip",
        "-n",
        &u,
        "addr",
        "add",
        "192.0.2.254/24",
        "dev",
        "br0",
    ]);
    sh(&["ip", "-n", &u, "link", "set", "br0", "up"]);
    let api = w.start_api(&u, "192.0.2.254:0");
    let url = format!("http://192.0.2.254:{}", api.local_addr().port());
    let kubeconfig = w.dir.path().join("kubeconfig");
    api.write_kubeconfig_with_server(&kubeconfig, &url).unwrap();
    let uapi_dir = w.dir.path().join("uapi");

    let mut pod_ips = Vec::new();
    for (i, name) in ["n1", "n2"].iter().enumerate() {
        let ip = format!("192.0.2.{}", i + 1);
        let ns = w.netns(name);
        let (veth_u, veth_n) = (format!("u{}{i}", w.tag), "eth0".to_string());
        sh(&[
            "ip", "link", "add", &veth_u, "netns", &u, "type", "veth", "peer", "name", &veth_n,
            "netns", &ns,
        ]);
        sh(&[
            "ip", "-n", &u, "link", "set", &veth_u, "master", "br0", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);

        // The Node, with its pod CIDR from the API's IPAM and its InternalIP.
        api.create_named_node(name).unwrap();
        let node = api
            .merge_patch_node_status(
                name,
                &json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}}),
            )
            .unwrap();
        let cidr: ipnet::Ipv4Net = node.spec.unwrap().pod_cidrs.unwrap()[0].parse().unwrap();
        let gw = cidr.hosts().next().unwrap();
        let pod_ip = cidr.hosts().nth(1).unwrap();

        // One pod behind the node, the shape the CNI config produces.
        let pod = w.netns(&format!("{name}p"));
        sh(&[
            "ip", "link", "add", "gw0", "netns", &ns, "type", "veth", "peer", "name", "eth0",
            "netns", &pod,
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{gw}/{}", cidr.prefix_len()),
            "dev",
            "gw0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "gw0", "up"]);
        sh(&[
            "ip",
            "-n",
            &pod,
            "addr",
            "add",
            &format!("{pod_ip}/{}", cidr.prefix_len()),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &pod, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &pod,
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ]);
        pod_ips.push((pod, pod_ip));

        let iface = format!("wgag{}{i}", w.tag);
        let store = w.dir.path().join(format!("store-{name}"));
        let uapi = uapi_dir.to_str().unwrap().to_string();
        w.spawn(
            &format!("{name}-dataplane"),
            &ns,
            &[
                &bin,
                "dataplane",
                "--interface",
                &iface,
                "--uapi-dir",
                &uapi,
            ],
        );
        let sock = uapi_dir.join(format!("{iface}.sock"));
        w.wait_for(&format!("{name}'s UAPI socket"), 10, || sock.exists());
        w.spawn(
            &format!("{name}-agent"),
            &ns,
            &[
                &bin,
                "agent",
                "--node-name",
                name,
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "--interface",
                &iface,
                "--uapi-dir",
                &uapi,
                "--cluster-cidrs",
                "10.244.0.0/16",
                "--resync-seconds",
                "2",
            ],
        );
    }

    // A third node whose key is garbage: no peer anywhere, a Warning Event.
    api.create_named_node("n3").unwrap();
    api.merge_patch_node(
        "n3",
        &json!({"metadata": {"annotations": {
            "wgmesh.dev/public-key": "garbage",
            "wgmesh.dev/endpoint": "192.0.2.3:51820"
        }}}),
    )
    .unwrap();

    let socks: Vec<PathBuf> = (0..2)
        .map(|i| uapi_dir.join(format!("wgag{}{i}.sock", w.tag)))
        .collect();
    w.wait_for("both devices to have exactly one peer", 30, || {
        socks.iter().all(|s| device_peers(s).len() == 1)
    });

    // Pod to pod, both ways, through the tunnel.
    for (from, to) in [(0, 1), (1, 0)] {
        let (ns, _) = &pod_ips[from];
        let target = pod_ips[to].1.to_string();
        let ok = Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", &target,
            ])
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "pod {from} cannot reach pod {to}: {}\n{}",
            String::from_utf8_lossy(&ok.stdout),
            w.logs()
        );
    }

    // `wgmesh status` names the peer and shows the rejected node; `graph` draws it.
    let ns_of = |role: &str| {
        w.namespaces
            .iter()
            .find(|n| n.ends_with(&format!("-{role}")))
            .cloned()
            .unwrap()
    };
    let n2 = ns_of("n2");
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &n2,
            &bin,
            "status",
            "--node-name",
            "n2",
            "--output",
            "json",
        ])
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--interface", &format!("wgag{}1", w.tag)])
        .args([
            "--uapi-dir",
            uapi_dir.to_str().unwrap(),
            "--cluster-cidrs",
            "10.244.0.0/16",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stderr = String::from_utf8_lossy(&status.stderr).to_string();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["peers"][0]["node"], "n1", "{status}\n{stderr}");
    assert_eq!(status["peers"][0]["state"], "healthy", "{status}");
    assert!(
        status["peers"][0]["rx_bytes"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert_eq!(status["rejected"][0]["node"], "n3", "{status}");
    let graph = Command::new("ip")
        .args(["netns", "exec", &n2, &bin, "graph", "--node-name", "n2"])
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--interface", &format!("wgag{}1", w.tag)])
        .args([
            "--uapi-dir",
            uapi_dir.to_str().unwrap(),
            "--cluster-cidrs",
            "10.244.0.0/16",
        ])
        .output()
        .unwrap();
    let graph = String::from_utf8_lossy(&graph.stdout);
    assert!(
        graph.contains("\"n2\" -> \"n1\" [color=darkgreen"),
        "{graph}"
    );

    // The agent's /metrics and /readyz, from inside its node.
    let scrape = |path: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &n2, "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/9586; printf 'GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3"
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // HTTP/1.1 as Prometheus and the kubelet speak it (hyper answers a
    // 1.0 request in 1.0).
    let ready = scrape("/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200"),
        "agent not ready: {ready}"
    );
    let metrics = scrape("/metrics");
    for want in [
        "wgmesh_peers{state=\"healthy\"} 1",
        "wgmesh_peer_last_handshake_seconds{peer=\"n1\"}",
        "wgmesh_peer_receive_bytes_total{peer=\"n1\"}",
        "wgmesh_rejected_nodes{reason=\"invalid wgmesh.dev/public-key\"} 1",
        "wgmesh_key_generation 1",
        "wgmesh_reconcile_duration_seconds_count",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }

    // Fail closed: the cluster CIDR routes into the tunnel, put there by the agent.
    let routes = Command::new("ip")
        .args(["-n", &w.namespaces[1], "route", "show", "10.244.0.0/16"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains("wgag"),
        "no cluster route into the tunnel: {routes}"
    );

    // The bad node was reported by both agents.
    w.wait_for("PeerRejected events about n3 from both agents", 10, || {
        api.events()
            .iter()
            .filter(|e| {
                e.reason.as_deref() == Some("PeerRejected")
                    && e.regarding.name.as_deref() == Some("n3")
            })
            .count()
            >= 2
    });

    // Steady state: no API writes while nothing changes.
    std::thread::sleep(Duration::from_secs(3));
    let before = api.write_count();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        api.write_count(),
        before,
        "API writes in steady state\n{}",
        w.logs()
    );

    // `--once` on a configured node: one pass that finds everything in place.
    let before = api.write_count();
    let n1 = w.namespaces[1].clone();
    let once = Command::new("ip")
        .args([
            "netns",
            "exec",
            &n1,
            &bin,
            "agent",
            "--once",
            "--node-name",
            "n1",
        ])
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--store", w.dir.path().join("store-n1").to_str().unwrap()])
        .args(["--interface", &format!("wgag{}0", w.tag)])
        .args([
            "--uapi-dir",
            uapi_dir.to_str().unwrap(),
            "--cluster-cidrs",
            "10.244.0.0/16",
        ])
        .args(["--no-cni", "--metrics-listen", "off"])
        .output()
        .unwrap();
    assert!(
        once.status.success(),
        "agent --once failed: {}",
        String::from_utf8_lossy(&once.stderr)
    );
    // A new process reports the known bad node once more (an Event); it must
    // not patch any Node.
    let writes = api.writes();
    let node_writes: Vec<_> = writes[before as usize..]
        .iter()
        .filter(|w| !w.path.contains("/events"))
        .collect();
    assert!(
        node_writes.is_empty(),
        "--once on a configured node wrote: {node_writes:?}"
    );

    // SIGTERM: the agent exits and leaves device, routes and annotations alone.
    let pid = w
        .children
        .iter()
        .find(|(n, _)| n == "n1-agent")
        .map(|(_, c)| c.id())
        .unwrap();
    testkit::process::signal(pid, testkit::Signal::TERM);
    let idx = w
        .children
        .iter()
        .position(|(n, _)| n == "n1-agent")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = w.children[idx].1.try_wait() {
            assert!(
                status.success(),
                "agent exited with {status} on SIGTERM\n{}",
                w.logs()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent ignored SIGTERM\n{}",
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let routes = Command::new("ip")
        .args(["-n", &n1, "route", "show", "10.244.0.0/16"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains("wgag"),
        "route removed on SIGTERM"
    );
    assert_eq!(device_peers(&socks[0]).len(), 1, "peers removed on SIGTERM");
    assert!(api
        .node("n1")
        .and_then(|n| n.metadata.annotations)
        .is_some_and(|a| a.contains_key("wgmesh.dev/public-key")));
    w.children.retain(|(n, _)| n != "n1-agent");

    // The API server goes away: the agents keep running and the mesh keeps working.
    if let Some(stop) = w.stop_api.take() {
        let _ = stop.send(());
    }
    if let Some(t) = w.api_thread.take() {
        t.join().unwrap();
    }
    std::thread::sleep(Duration::from_secs(4));
    for (name, child) in &mut w.children {
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "{name} exited when the API server went away"
        );
    }
    let (ns, _) = &pod_ips[0];
    let target = pod_ips[1].1.to_string();
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "2", "-W", "2", &target])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "mesh broke without the API server\n{}",
        w.logs()
    );
}
