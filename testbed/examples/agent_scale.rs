//! Control-plane scale benchmark: one real `wgmesh agent` against N Nodes in
//! the testbed's in-memory Kubernetes API, driving a real `wgmesh dataplane`.
//! Run by `scripts/bench-control-plane`, which builds it and starts it inside a
//! network namespace of its own: the data plane's TUN device and UDP port live
//! there, the API listens on that namespace's loopback, and the Nodes'
//! endpoints are addresses of 198.18.0.0/15 (RFC 2544's benchmarking range),
//! which the script routes as local inside the namespace (`ip route add local
//! ... dev lo`): peers' endpoints may not be loopback addresses, and no packet
//! to one can leave the namespace (the data plane's handshake initiations to
//! new peers, and their retries, are the only packets: no peer has traffic
//! or a keepalive).
//!
//! For each N it starts `wgmesh-testbed api`, creates N Nodes (the agent's own
//! plus N − 1 remote ones with a fresh x25519 key, an endpoint and a /24 pod
//! CIDR each, in spec.podCIDRs), starts `wgmesh dataplane` and
//! `wgmesh agent --backend uapi --no-network`, and measures:
//! - the initial sync: agent start to N − 1 peers on the device;
//! - per Node change (alternately a new Node and a changed endpoint
//!   annotation, each --spacing-ms after the one before reached the device,
//!   by default just over the agent's --debounce-ms, so that each change is
//!   a lone one), the time from the API write to the device showing it, read
//!   by polling the device's UAPI `get` (the poll's own duration bounds the
//!   resolution and is printed);
//! - the agent's CPU seconds (utime + stime) per change, VmRSS and VmHWM;
//! - the API's write counter (`GET /testbed/writes`) and the agent's CPU over
//!   a quiet window longer than its resync interval.
//!
//! Figures only: nothing here asserts a time. Every wait is bounded and every
//! child process is stopped when its size is done, on error too.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use wgmesh::keys::{PrivateKey, PublicKey};
use wgmesh::wg::uapi::UapiBackend;
use wgmesh::wg::{Backend, DeviceState};

/// One agent against N Nodes: change-to-device latency, CPU, memory and API
/// writes at rest (see the file's doc comment; run through
/// scripts/bench-control-plane)
#[derive(Debug, Parser)]
struct Args {
    /// Node counts to measure, comma-separated (the agent's own Node included)
    #[arg(
        long,
        env = "WGMESH_SCALE_NODES",
        value_delimiter = ',',
        default_value = "100,1000,5000"
    )]
    nodes: Vec<usize>,
    /// Node changes per size (alternately a new Node and a changed endpoint)
    #[arg(long, env = "WGMESH_SCALE_CHANGES", default_value_t = 20)]
    changes: usize,
    /// The agent's --resync-seconds
    #[arg(long, env = "WGMESH_SCALE_RESYNC_SECONDS", default_value_t = 10)]
    resync_seconds: u64,
    /// Length of the quiet window (seconds) that API writes are counted over;
    /// must be longer than --resync-seconds
    #[arg(long, env = "WGMESH_SCALE_REST_SECONDS", default_value_t = 15)]
    rest_seconds: u64,
    /// The agent's --debounce-ms (its default is 200)
    #[arg(long, env = "WGMESH_SCALE_DEBOUNCE_MS", default_value_t = 200)]
    debounce_ms: u64,
    /// Pause (milliseconds) before each change once the one before reached
    /// the device; by default --debounce-ms + 100, so each change finds the
    /// agent quiet and is measured as a lone change (a change within
    /// --debounce-ms of the agent's last pass waits out the rest of it: that
    /// is the agent's burst pacing, measured with a smaller value)
    #[arg(long, env = "WGMESH_SCALE_SPACING_MS")]
    spacing_ms: Option<u64>,
    /// Longest wait for any one step (a change to reach the device, the
    /// initial sync, a process to start), seconds
    #[arg(long, env = "WGMESH_SCALE_STEP_TIMEOUT", default_value_t = 180)]
    step_timeout: u64,
    /// The wgmesh binary
    #[arg(long, env = "WGMESH_BIN")]
    wgmesh_bin: PathBuf,
    /// The wgmesh-testbed binary
    #[arg(long, env = "WGMESH_TESTBED_BIN")]
    testbed_bin: PathBuf,
    /// Scratch directory (kubeconfigs, key stores, UAPI sockets, logs)
    #[arg(long, env = "WGMESH_SCALE_DIR")]
    dir: PathBuf,
    /// Name of the data plane's interface (unique on the host)
    #[arg(long, env = "WGMESH_SCALE_INTERFACE", default_value = "wgscale0")]
    interface: String,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Setup(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} (pid {pid}) exited; last lines of {log}:\n{tail}")]
    Died {
        what: String,
        pid: u32,
        log: String,
        tail: String,
    },
    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("WireGuard device: {0}")]
    Device(#[from] wgmesh::wg::WgError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    K8s(#[from] wgmesh::k8s::K8sError),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// The pod CIDRs the API allocates from, one /24 per Node.
const CLUSTER_CIDR: &str = "10.64.0.0/10";
const PORT: u16 = 51820;
const LOCAL: &str = "node-0";

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args).await {
        eprintln!("agent_scale: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Result<()> {
    if args.rest_seconds <= args.resync_seconds {
        return Err(Error::Setup(format!(
            "--rest-seconds ({}) must be longer than --resync-seconds ({})",
            args.rest_seconds, args.resync_seconds
        )));
    }
    // 10.64.0.0/10 holds 16,384 /24s.
    if args.nodes.iter().any(|&n| !(2..=15_000).contains(&n)) || args.changes > 1000 {
        return Err(Error::Setup(
            "--nodes must each be 2..15000 and --changes at most 1000".into(),
        ));
    }
    let mut rows = Vec::new();
    for &n in &args.nodes {
        eprintln!("[agent_scale] {n} nodes");
        let row = measure(args, n).await?;
        eprintln!("[agent_scale] {n} nodes: {}", row.line());
        rows.push(row);
    }
    println!();
    println!("{}", Row::heading());
    for row in &rows {
        println!("{}", row.line());
    }
    Ok(())
}

/// One size's figures.
struct Row {
    nodes: usize,
    peers: usize,
    create_s: f64,
    initial_sync_s: f64,
    latencies_ms: Vec<f64>,
    poll_ms: f64,
    cpu_ms_per_change: f64,
    vm_rss_mib: f64,
    vm_hwm_mib: f64,
    rest_s: u64,
    rest_writes: u64,
    rest_cpu_s: f64,
}

impl Row {
    fn heading() -> String {
        format!(
            "{:>6} {:>6} {:>9} {:>9} {:>10} {:>8} {:>8} {:>7} {:>9} {:>8} {:>8} {:>12} {:>10}",
            "nodes",
            "peers",
            "create s",
            "sync s",
            "change ms",
            "p99 ms",
            "max ms",
            "poll ms",
            "CPU ms/ch",
            "RSS MiB",
            "HWM MiB",
            "rest writes",
            "rest CPU s"
        )
    }

    fn line(&self) -> String {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(f64::total_cmp);
        format!(
            "{:>6} {:>6} {:>9.2} {:>9.2} {:>10.1} {:>8.1} {:>8.1} {:>7.1} {:>9.1} {:>8.1} {:>8.1} {:>12} {:>10.2}",
            self.nodes,
            self.peers,
            self.create_s,
            self.initial_sync_s,
            median(&sorted),
            nearest_rank(&sorted, 0.99),
            sorted.last().copied().unwrap_or(f64::NAN),
            self.poll_ms,
            self.cpu_ms_per_change,
            self.vm_rss_mib,
            self.vm_hwm_mib,
            format!("{} in {}s", self.rest_writes, self.rest_s),
            self.rest_cpu_s
        )
    }
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The endpoint of node `i` (0 is the agent's own): 198.18.0.1 on, inside
/// 198.18.0.0/15, which the namespace routes to itself.
fn endpoint(i: usize, port: u16) -> SocketAddr {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 1));
    SocketAddr::from((Ipv4Addr::from(base + i as u32), port))
}

/// The pod CIDR of node `i`: the `i`-th /24 of [`CLUSTER_CIDR`]. Set on the
/// Node by the harness: the API's IPAM scans every Node per allocation, which
/// at thousands of Nodes would dominate the set-up.
fn pod_cidr(i: usize) -> String {
    let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + ((i as u32) << 8));
    format!("{net}/24")
}

fn node_object(
    name: &str,
    key: Option<&PublicKey>,
    endpoint: SocketAddr,
    pod_cidr: &str,
) -> Result<Node> {
    let mut annotations = serde_json::Map::new();
    if let Some(key) = key {
        annotations.insert("wgmesh.dev/public-key".into(), key.to_base64().into());
        annotations.insert("wgmesh.dev/key-generation".into(), "1".into());
        annotations.insert("wgmesh.dev/endpoint".into(), endpoint.to_string().into());
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": endpoint.ip().to_string()}]},
    }))
    .map_err(|e| Error::Setup(format!("building Node {name}: {e}")))
}

async fn measure(args: &Args, n: usize) -> Result<Row> {
    let dir = args.dir.join(format!("n{n}"));
    std::fs::create_dir_all(&dir)?;
    let step = Duration::from_secs(args.step_timeout);
    let kubeconfig = dir.join("kubeconfig");
    let uapi_dir = dir.join("uapi");

    // The API. Its first stdout line is its URL; then it only logs (stderr).
    let mut api = Proc::spawn(
        "wgmesh-testbed api",
        Command::new(&args.testbed_bin)
            .args(["api", "--listen", "127.0.0.1:0", "--log", "warn"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--cluster-cidr", CLUSTER_CIDR])
            .args(["--node-cidr-mask-size-ipv4", "24"]),
        &dir.join("api.log"),
        true,
    )?;
    let url = api.first_line(step)?;
    eprintln!("[agent_scale]   API at {url}");
    let client = wgmesh::k8s::client(Some(&kubeconfig)).await?;
    let nodes: Api<Node> = Api::all(client.clone());

    // N Nodes: ours (the agent publishes its own annotations) and N - 1 peers.
    let started = Instant::now();
    let local_endpoint = endpoint(0, PORT);
    let local = node_object(LOCAL, None, local_endpoint, &pod_cidr(0))?;
    nodes.create(&PostParams::default(), &local).await?;
    let mut keys = Vec::with_capacity(n - 1);
    let mut objects = Vec::with_capacity(n - 1);
    for i in 0..n - 1 {
        let key = PrivateKey::generate().public_key();
        objects.push(node_object(
            &format!("node-{}", i + 1),
            Some(&key),
            endpoint(i + 1, PORT),
            &pod_cidr(i + 1),
        )?);
        keys.push(key);
    }
    let creating = stream::iter(objects)
        .map(|node| {
            let nodes = nodes.clone();
            async move { nodes.create(&PostParams::default(), &node).await }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>();
    tokio::time::timeout(step, creating)
        .await
        .map_err(|_| Error::Timeout(step, format!("creating {n} Nodes")))??;
    let create_s = started.elapsed().as_secs_f64();

    let mut dataplane = Proc::spawn(
        "wgmesh dataplane",
        Command::new(&args.wgmesh_bin)
            .arg("dataplane")
            .args(["--interface", &args.interface])
            .arg("--uapi-dir")
            .arg(&uapi_dir)
            .args(["--log", "warn"]),
        &dir.join("dataplane.log"),
        false,
    )?;
    let sock = uapi_dir.join(format!("{}.sock", args.interface));
    wait_for(step, "the data plane's UAPI socket", || {
        dataplane.check()?;
        Ok(sock.exists())
    })
    .await?;
    let mut device = UapiBackend::new(&sock);

    let started = Instant::now();
    let mut agent = Proc::spawn(
        "wgmesh agent",
        Command::new(&args.wgmesh_bin)
            .arg("agent")
            .args(["--node-name", LOCAL])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--store")
            .arg(dir.join("store"))
            .args(["--interface", &args.interface])
            .arg("--uapi-dir")
            .arg(&uapi_dir)
            .args(["--backend", "uapi", "--no-network", "--no-cni"])
            .args(["--masquerade", "false", "--metrics-listen", "off"])
            .args(["--key-max-age", "off", "--log", "warn"])
            .args(["--endpoint", &local_endpoint.to_string()])
            .args(["--listen-port", &PORT.to_string()])
            .args(["--cluster-cidrs", CLUSTER_CIDR])
            .args(["--resync-seconds", &args.resync_seconds.to_string()])
            .args(["--debounce-ms", &args.debounce_ms.to_string()]),
        &dir.join("agent.log"),
        false,
    )?;
    let want = n - 1;
    let mut polls = Polls::default();
    let peers = wait_device(&mut device, &mut polls, &mut agent, step, |s| {
        s.peers.len() >= want && s.public_key.is_some()
    })
    .await
    .map_err(|e| context(e, &format!("initial sync to {want} peers")))?
    .peers
    .len();
    let initial_sync_s = started.elapsed().as_secs_f64();
    eprintln!("[agent_scale]   initial sync: {peers} peers in {initial_sync_s:.2}s");

    // Let the agent's first passes (publishing its own Node) settle.
    tokio::time::sleep(Duration::from_millis(args.debounce_ms * 2 + 500)).await;
    let mut polls = Polls::default();
    let cpu0 = cpu_seconds(agent.pid())?;
    let mut latencies_ms = Vec::with_capacity(args.changes);
    let spacing = Duration::from_millis(args.spacing_ms.unwrap_or(args.debounce_ms + 100));
    for c in 0..args.changes {
        if c > 0 {
            tokio::time::sleep(spacing).await;
        }
        let (what, t0, expect_key, expect_ep);
        if c % 2 == 0 {
            // A new Node joins.
            let key = PrivateKey::generate().public_key();
            let ep = endpoint(n + c, PORT);
            let node = node_object(&format!("node-new-{c}"), Some(&key), ep, &pod_cidr(n + c))?;
            t0 = Instant::now();
            nodes.create(&PostParams::default(), &node).await?;
            (what, expect_key, expect_ep) = ("new Node", key, ep);
        } else {
            // An existing Node's published endpoint changes.
            let i = (c * 7919) % (n - 1);
            let ep = endpoint(i + 1, PORT + 1 + c as u16);
            let patch =
                json!({"metadata": {"annotations": {"wgmesh.dev/endpoint": ep.to_string()}}});
            t0 = Instant::now();
            nodes
                .patch(
                    &format!("node-{}", i + 1),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            (what, expect_key, expect_ep) = ("endpoint change", keys[i], ep);
        }
        wait_device(&mut device, &mut polls, &mut agent, step, |s| {
            s.peers
                .iter()
                .any(|p| p.public_key == expect_key && p.endpoint == Some(expect_ep))
        })
        .await
        .map_err(|e| context(e, &format!("change {c} ({what})")))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        eprintln!("[agent_scale]   change {c:>2} ({what}): {ms:.1} ms");
        latencies_ms.push(ms);
    }
    let cpu_ms_per_change = (cpu_seconds(agent.pid())? - cpu0) * 1e3 / args.changes.max(1) as f64;
    let (vm_rss_mib, vm_hwm_mib) = memory_mib(agent.pid())?;

    // Quiet: nothing changes for longer than a resync; count the API writes.
    tokio::time::sleep(Duration::from_millis(args.debounce_ms * 2 + 500)).await;
    let writes0 = api_writes(&client).await?;
    let cpu0 = cpu_seconds(agent.pid())?;
    eprintln!(
        "[agent_scale]   quiet for {}s (resync every {}s)",
        args.rest_seconds, args.resync_seconds
    );
    tokio::time::sleep(Duration::from_secs(args.rest_seconds)).await;
    agent.check()?;
    let rest_writes = api_writes(&client).await? - writes0;
    let rest_cpu_s = cpu_seconds(agent.pid())? - cpu0;

    agent.stop();
    dataplane.stop();
    api.stop();
    Ok(Row {
        nodes: n,
        peers,
        create_s,
        initial_sync_s,
        latencies_ms,
        poll_ms: polls.mean_ms(),
        cpu_ms_per_change,
        vm_rss_mib,
        vm_hwm_mib,
        rest_s: args.rest_seconds,
        rest_writes,
        rest_cpu_s,
    })
}

fn context(e: Error, what: &str) -> Error {
    match e {
        Error::Timeout(d, _) => Error::Timeout(d, what.to_owned()),
        other => other,
    }
}

/// How long the device's `get` answers took (the latency figures' resolution).
#[derive(Default)]
struct Polls {
    count: u32,
    total: Duration,
}

impl Polls {
    fn mean_ms(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        self.total.as_secs_f64() * 1e3 / f64::from(self.count)
    }
}

/// Polls the device until `done` holds; the agent must stay alive meanwhile.
/// The UAPI server answers one client at a time and a `get` of thousands of
/// peers takes a while, so polls are spaced by at least their own duration:
/// the harness holds the socket at most half the time the agent may want it.
async fn wait_device(
    device: &mut UapiBackend,
    polls: &mut Polls,
    agent: &mut Proc,
    timeout: Duration,
    done: impl Fn(&DeviceState) -> bool,
) -> Result<DeviceState> {
    let deadline = Instant::now() + timeout;
    loop {
        agent.check()?;
        let t = Instant::now();
        // A blocking socket exchange; this harness has nothing else to run
        // meanwhile.
        let state = tokio::task::block_in_place(|| device.state())?;
        let took = t.elapsed();
        polls.count += 1;
        polls.total += took;
        if done(&state) {
            return Ok(state);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(timeout, String::new()));
        }
        tokio::time::sleep(took.max(Duration::from_millis(2))).await;
    }
}

async fn wait_for(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready()? {
        if Instant::now() >= deadline {
            return Err(Error::Timeout(timeout, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `GET /testbed/writes`: the API's count of write requests so far.
async fn api_writes(client: &Client) -> Result<u64> {
    let request = hyper::Request::get("/testbed/writes")
        .body(Vec::new())
        .map_err(|e| Error::Setup(format!("building the request: {e}")))?;
    let text = client.request_text(request).await?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("count")?.as_u64())
        .ok_or_else(|| Error::Setup(format!("unexpected /testbed/writes answer: {text}")))
}

/// utime + stime of a process, in seconds (all its threads).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // Fields 14 and 15 of stat(5); here 0-based after the name, so 11 and 12.
    match (tick(11), tick(12)) {
        (Some(u), Some(s)) => Ok((u + s) / clock_ticks()),
        _ => Err(Error::Setup(format!("cannot parse /proc/{pid}/stat"))),
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// VmRSS and VmHWM of a process, MiB.
fn memory_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        _ => Err(Error::Setup(format!(
            "no VmRSS/VmHWM in /proc/{pid}/status"
        ))),
    }
}

/// A child process with its log file; stopped (SIGTERM, then SIGKILL after
/// 5 s) when dropped, so an error anywhere leaves nothing running.
struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout, unless `pipe_stdout`) to `log`.
    fn spawn(what: &str, cmd: &mut Command, log: &Path, pipe_stdout: bool) -> Result<Self> {
        let spawn_err = |source| Error::Spawn {
            what: what.to_owned(),
            source,
        };
        let file = File::create(log).map_err(spawn_err)?;
        let stdout = if pipe_stdout {
            Stdio::piped()
        } else {
            Stdio::from(file.try_clone().map_err(spawn_err)?)
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .map_err(spawn_err)?;
        Ok(Self {
            what: what.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the process and its log's tail if it has exited.
    fn check(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(_) => Err(Error::Died {
                what: self.what.clone(),
                pid: self.child.id(),
                log: self.log.display().to_string(),
                tail: tail(&self.log, 20),
            }),
        }
    }

    /// The first line the process prints on stdout, within `timeout`.
    fn first_line(&mut self, timeout: Duration) -> Result<String> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| Error::Setup(format!("{}: stdout not piped", self.what)))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let mut reader = BufReader::new(stdout);
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep draining so the process never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(line)) if !line.trim().is_empty() => Ok(line.trim().to_owned()),
            Ok(_) => {
                self.check()?;
                Err(Error::Setup(format!("{} printed no URL", self.what)))
            }
            Err(_) => {
                self.check()?;
                Err(Error::Timeout(
                    timeout,
                    format!("{} to print its URL", self.what),
                ))
            }
        }
    }

    fn stop(&mut self) {
        testkit::process::stop(&mut self.child, Duration::from_secs(5));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
