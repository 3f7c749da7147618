//! Building and tearing down a testbed: the underlay, nodes, pods and processes.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::{json, Value};

use super::state::{
    list_ids, state_root, BackendMode, LinkRecord, NodeBackend, NodeRecord, PodRecord,
    ProcessRecord, State, NETNS_PREFIX,
};
use super::sys::{self, ip, netns_exec};
use super::{Error, Result};
use crate::control_plane;

/// The underlay: TEST-NET-1 and the IPv6 documentation prefix, only ever inside the
/// testbed's own namespaces.
const UNDERLAY_V4_NET: &str = "192.0.2";
const UNDERLAY_V6_NET: &str = "2001:db8:77::";
pub const BRIDGE: &str = "br0";
/// br0's fixed, locally administered MAC address. A Linux bridge without one takes
/// the lowest MAC among its ports, so it changed whenever a later node's veth
/// joined, and nodes that had cached the old one could not reach the API server
/// (on the bridge) until ARP timed out: 55 s convergence stalls at 12 nodes.
pub const BRIDGE_MAC: &str = "02:77:67:74:62:fe";
/// The underlay host's addresses (the API server, and the nodes' default route:
/// the "outside" of the cluster). Not a node address.
pub const UNDERLAY_HOST_V4: &str = "192.0.2.254";
pub const UNDERLAY_HOST_V6: &str = "2001:db8:77::fe";
/// `--resync-seconds` every agent gets.
pub const RESYNC_SECONDS: u64 = 10;
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
/// The dataplane's (default) UDP port on every node.
pub const WG_PORT: u16 = 51820;

/// How to build a testbed.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    pub pods: usize,
    pub dual_stack: bool,
    /// The `wgmesh` binary.
    pub wgmesh: PathBuf,
    /// The `wgmesh-testbed` binary (runs the API server as `api`).
    pub testbed_bin: PathBuf,
    /// Pass `--encrypt-host-traffic` to every agent.
    pub encrypt_host_traffic: bool,
    /// Pass `--masquerade <this>` to every agent (`None`: the agent's default).
    pub masquerade: Option<bool>,
    /// Nodes without spec.podCIDRs: the API allocates none, the testbed picks each
    /// node's CIDRs ([`testbed_pod_cidrs`]) and passes them as `--pod-cidrs`.
    pub no_spec_pod_cidrs: bool,
    /// Run a real control plane (etcd, kube-apiserver, kube-controller-manager)
    /// from the binaries in this directory (`scripts/kube-bins` prints it) instead
    /// of the in-memory API.
    pub real_control_plane: Option<PathBuf>,
    /// Userspace dataplanes, kernel WireGuard, or both ([`BackendMode::Mixed`]).
    pub backend: BackendMode,
}

/// The real control plane's ports, on the underlay namespace (its own network
/// stack, so fixed ports cannot clash with the host's).
const APISERVER_PORT: u16 = 6443;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// The agent flags and values that give the testbed short rotation timings (the
/// defaults are minutes): passed to every agent when the `wgmesh` binary has them.
pub const ROTATION_TIMINGS: &[(&str, &str)] = &[
    ("--rotation-confirm-deadline", "30s"),
    ("--rotation-grace", "10s"),
    ("--rotation-stagger", "5s"),
];

/// How to add one node.
#[derive(Debug, Clone, Copy)]
pub struct NodeOptions {
    pub pods: usize,
    /// Start the node's dataplane. Without it only the agent starts (a node booting
    /// before its device exists); `restart <node>-dataplane` starts it later. Only
    /// for userspace nodes (a kernel node has no dataplane process).
    pub dataplane: bool,
    /// The node's WireGuard; `None`: what the testbed's `--backend` gives its index.
    pub backend: Option<NodeBackend>,
}

/// A testbed being built or used: its state plus the binaries.
pub struct Testbed {
    pub state: State,
    pub wgmesh: PathBuf,
    pub testbed_bin: PathBuf,
    started: Instant,
    pub quiet: bool,
}

impl Testbed {
    /// Opens a recorded testbed.
    pub fn open(state: State, wgmesh: PathBuf, testbed_bin: PathBuf) -> Self {
        Self {
            state,
            wgmesh,
            testbed_bin,
            started: Instant::now(),
            quiet: false,
        }
    }

    /// Prints a progress line (`[  1.2s] ...`).
    pub fn say(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            println!(
                "[{:5.1}s] {}",
                self.started.elapsed().as_secs_f64(),
                msg.as_ref()
            );
        }
    }

    /// Creates the state directory and file of a new testbed, then builds it. On an
    /// error or a signal the caller should [`teardown`] (the state file says what).
    pub fn create(opts: &Options) -> Result<Self> {
        let root = state_root();
        std::fs::create_dir_all(&root).map_err(|e| Error::io(format!("{}", root.display()), e))?;
        let existing = testkit::netns::list();
        let mut seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        let id = loop {
            let id = format!("{:04x}", seed & 0xffff);
            let prefix = format!("{NETNS_PREFIX}{id}-");
            if !root.join(&id).exists() && !existing.iter().any(|n| n.starts_with(&prefix)) {
                break id;
            }
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                >> 7;
        };
        let dir = root.join(&id);
        std::fs::create_dir_all(dir.join("logs"))
            .and_then(|_| std::fs::create_dir_all(dir.join("uapi")))
            .and_then(|_| std::fs::create_dir_all(dir.join("keys")))
            .and_then(|_| super::state::write_owner(&id, &dir))
            .map_err(|e| Error::io(format!("{}", dir.display()), e))?;
        let mut cluster_cidrs = vec![CLUSTER_CIDR_V4.to_string()];
        if opts.dual_stack {
            cluster_cidrs.push(CLUSTER_CIDR_V6.to_string());
        }
        let control_plane = match &opts.real_control_plane {
            Some(bins) => Some(control_plane::Spec {
                bins: control_plane::Bins::in_dir(bins).map_err(|e| Error::Other(e.to_string()))?,
                dir: dir.join("control-plane"),
                address: UNDERLAY_HOST_V4.parse().expect("valid"),
                apiserver_port: APISERVER_PORT,
                etcd_client_port: ETCD_CLIENT_PORT,
                etcd_peer_port: ETCD_PEER_PORT,
                cluster_cidrs: cluster_cidrs.clone(),
                allocate_node_cidrs: !opts.no_spec_pod_cidrs,
            }),
            None => None,
        };
        let kubeconfig = match &control_plane {
            Some(cp) => cp.admin_kubeconfig(),
            None => dir.join("kubeconfig"),
        };
        let state = State {
            id: id.clone(),
            dir: dir.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            phase: "building".into(),
            dual_stack: opts.dual_stack,
            pods_per_node: opts.pods,
            cluster_cidrs,
            underlay_ns: format!("{NETNS_PREFIX}{id}-u"),
            api_url: None,
            kubeconfig,
            uapi_dir: dir.join("uapi"),
            files: vec![dir.clone()],
            next_node: 1,
            encrypt_host_traffic: opts.encrypt_host_traffic,
            masquerade: opts.masquerade,
            no_spec_pod_cidrs: opts.no_spec_pod_cidrs,
            control_plane,
            backend: opts.backend,
            ..Default::default()
        };
        state.save()?;
        Ok(Self::open(
            state,
            opts.wgmesh.clone(),
            opts.testbed_bin.clone(),
        ))
    }

    /// Builds the underlay, the API server and `nodes` nodes, then waits for the mesh.
    pub fn up(&mut self, nodes: usize) -> Result<()> {
        self.say(format!(
            "testbed {} (state {})",
            self.state.id,
            self.state.path().display()
        ));
        self.probe_agent_flags()?;
        self.underlay()?;
        self.start_api()?;
        for _ in 0..nodes {
            self.add_node(self.state.pods_per_node)?;
        }
        let secs = self.wait_mesh(Duration::from_secs_f64(60.0 * time_scale()?))?;
        self.state.phase = "running".into();
        self.state.save()?;
        self.say(format!(
            "mesh ready: every device has {} peer(s) ({secs:.1} s after the last node started)",
            self.state.nodes.len().saturating_sub(1)
        ));
        Ok(())
    }

    /// Fails early, naming the flag, when the `wgmesh` binary lacks an agent flag this
    /// testbed was asked to pass (rather than agents exiting on a usage error and
    /// `up` timing out).
    fn probe_agent_flags(&mut self) -> Result<()> {
        let mut want = Vec::new();
        if self.state.encrypt_host_traffic {
            want.push("--encrypt-host-traffic");
        }
        if self.state.masquerade.is_some() {
            want.push("--masquerade");
        }
        if self.state.no_spec_pod_cidrs {
            want.push("--pod-cidrs");
        }
        let wg = self.wgmesh.display().to_string();
        let help = sys::run(&[&wg, "agent", "--help"])?;
        // Rotation timings are passed when the binary has them; `rotate` fails,
        // naming the flags, when it had not.
        let mut rotation = Vec::new();
        let mut missing = Vec::new();
        for (flag, value) in ROTATION_TIMINGS {
            if help_has_flag(&help, flag) {
                rotation.extend([flag.to_string(), value.to_string()]);
            } else {
                missing.push(*flag);
            }
        }
        if missing.is_empty() {
            self.say(format!(
                "agents get short rotation timings: {}",
                rotation.join(" ")
            ));
        } else {
            self.say(format!(
                "{wg} has no `agent {}`: agents run with the default rotation timings \
                 (`rotate` will fail until the binary has them)",
                missing.join("`, `")
            ));
        }
        self.state.rotation_flags = rotation;
        self.state.save()?;
        for flag in want {
            if !help_has_flag(&help, flag) {
                return Err(Error::Other(format!(
                    "{wg} has no `agent {flag}` (see `wgmesh agent --help`); \
                     build a wgmesh that has it or leave the option out"
                )));
            }
        }
        Ok(())
    }

    fn check_interrupt(&self) -> Result<()> {
        if sys::interrupted() {
            return Err(Error::Interrupted);
        }
        Ok(())
    }

    pub(super) fn add_netns(&mut self, name: &str) -> Result<()> {
        self.check_interrupt()?;
        self.state.namespaces.push(name.to_string());
        self.state.save()?;
        testkit::netns::add(name)?;
        ip(name, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    pub(super) fn record_link(
        &mut self,
        ns: &str,
        name: &str,
        kind: &str,
        peer: Option<(&str, &str)>,
    ) -> Result<()> {
        self.check_interrupt()?;
        self.state.links.push(LinkRecord {
            ns: ns.into(),
            name: name.into(),
            kind: kind.into(),
            peer_ns: peer.map(|p| p.0.to_string()),
            peer: peer.map(|p| p.1.to_string()),
        });
        Ok(self.state.save()?)
    }

    fn underlay(&mut self) -> Result<()> {
        let u = self.state.underlay_ns.clone();
        self.add_netns(&u)?;
        self.record_link(&u, BRIDGE, "bridge", None)?;
        // The MAC is set at creation (addr_assign_type "set"), so the bridge never
        // adopts a port's MAC.
        ip(
            &u,
            &[
                "link", "add", "name", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
            ],
        )?;
        ip(
            &u,
            &[
                "addr",
                "add",
                &format!("{UNDERLAY_V4_NET}.254/24"),
                "dev",
                BRIDGE,
            ],
        )?;
        if self.state.dual_stack {
            ip(
                &u,
                &[
                    "addr",
                    "add",
                    &format!("{UNDERLAY_V6_NET}fe/64"),
                    "dev",
                    BRIDGE,
                    "nodad",
                ],
            )?;
        }
        ip(&u, &["link", "set", BRIDGE, "up"])?;
        self.say(format!(
            "underlay: namespace {u}, bridge {BRIDGE} {UNDERLAY_V4_NET}.254/24, MAC {BRIDGE_MAC} (fixed)"
        ));
        Ok(())
    }

    /// Starts a process inside `ns` in its own process group (so a Ctrl-C in the
    /// terminal reaches only the testbed command, which then cleans up), recorded
    /// before it is spawned.
    pub fn spawn(
        &mut self,
        name: &str,
        ns: &str,
        argv: &[String],
        stdout: Option<&Path>,
    ) -> Result<u32> {
        self.record_process(name, ns, argv)?;
        self.start_recorded(name, stdout, false)
    }

    /// Records a process without starting it (`restart NAME` starts it later).
    pub fn record_process(&mut self, name: &str, ns: &str, argv: &[String]) -> Result<()> {
        self.check_interrupt()?;
        let log = self.state.dir.join("logs").join(format!("{name}.log"));
        self.state.processes.push(ProcessRecord {
            name: name.into(),
            ns: ns.into(),
            argv: argv.to_vec(),
            log,
            pid: None,
            start_time: None,
        });
        Ok(self.state.save()?)
    }

    /// A recorded process (the latest of that name).
    pub fn process(&self, name: &str) -> Option<&ProcessRecord> {
        self.state.processes.iter().rev().find(|p| p.name == name)
    }

    /// Whether a recorded process runs (and is still the one that was started).
    pub fn process_alive(&self, name: &str) -> bool {
        self.process(name)
            .and_then(|p| Some((p.pid?, p.start_time)))
            .is_some_and(|(pid, st)| testkit::process::alive(pid, st))
    }

    /// Sends `sig` to a recorded process if it runs; with SIGKILL, waits (up to 5 s)
    /// until it is gone. Returns whether it was running.
    pub fn signal_process(&self, name: &str, sig: testkit::Signal) -> Result<bool> {
        let p = self.process(name).ok_or_else(|| {
            Error::Other(format!("no process {name} in testbed {}", self.state.id))
        })?;
        let Some(pid) = p
            .pid
            .filter(|&pid| testkit::process::alive(pid, p.start_time))
        else {
            return Ok(false);
        };
        testkit::process::signal(pid, sig);
        if sig == testkit::Signal::KILL {
            let start = p.start_time;
            self.wait_for(
                &format!("{name} (pid {pid}) to die"),
                Duration::from_secs(5),
                || !testkit::process::alive(pid, start),
            )?;
        }
        Ok(true)
    }

    /// SIGKILLs a recorded process if it runs, then starts it again exactly as it was
    /// started (argv, namespace), appending to its log. Also starts a process that was
    /// recorded but never started (`add-node --no-dataplane`).
    pub fn restart_process(&mut self, name: &str) -> Result<u32> {
        if name == "api" || name == "capture" {
            return Err(Error::Other(format!(
                "{name} cannot be restarted: the API keeps every object in memory and \
                 listens on a port chosen at start, and a capture belongs to one check \
                 (the api-outage drill stops the API with SIGSTOP instead)"
            )));
        }
        self.signal_process(name, testkit::Signal::KILL)?;
        self.start_recorded(name, None, true)
    }

    /// Changes a recorded process's command and restarts it with it (a drill
    /// turning an option on for one node, and back).
    pub fn restart_with_argv(&mut self, name: &str, argv: Vec<String>) -> Result<u32> {
        let p = self
            .state
            .processes
            .iter_mut()
            .rev()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                Error::Other(format!("no process {name} in testbed {}", self.state.id))
            })?;
        p.argv = argv;
        self.state.save()?;
        self.restart_process(name)
    }

    /// Starts the latest recorded process called `name`.
    fn start_recorded(&mut self, name: &str, stdout: Option<&Path>, append: bool) -> Result<u32> {
        self.check_interrupt()?;
        let p = self.process(name).cloned().ok_or_else(|| {
            Error::Other(format!("no process {name} in testbed {}", self.state.id))
        })?;
        let log = &p.log;
        let mut err = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(log)
            .map_err(|e| Error::io(format!("{}", log.display()), e))?;
        if append {
            use std::io::Write;
            let _ = writeln!(
                err,
                "--- wgmesh-testbed: (re)starting {name} at unix time {:.3}",
                unix_now()
            );
        }
        let out = match stdout {
            Some(p) => {
                Stdio::from(File::create(p).map_err(|e| Error::io(format!("{}", p.display()), e))?)
            }
            None => Stdio::from(err.try_clone().map_err(|e| Error::io("log", e))?),
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &p.ns])
            .args(&p.argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {name}"), e))?;
        let pid = child.id();
        // Not waited for: it outlives this command; `down` stops it. Forget the Child
        // so no zombie bookkeeping keeps it.
        std::mem::forget(child);
        let start = testkit::process::start_time(pid);
        if let Some(p) = self
            .state
            .processes
            .iter_mut()
            .rev()
            .find(|p| p.name == name)
        {
            p.pid = Some(pid);
            p.start_time = start;
        }
        self.state.save()?;
        Ok(pid)
    }

    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut ok: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !ok() {
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: what.into(),
                    secs: timeout.as_secs(),
                });
            }
            sys::sleep(Duration::from_millis(50))?;
        }
        Ok(())
    }

    fn start_api(&mut self) -> Result<()> {
        if let Some(spec) = self.state.control_plane.clone() {
            return self.start_real_control_plane(&spec);
        }
        let u = self.state.underlay_ns.clone();
        let url_file = self.state.dir.join("api.url");
        let argv: Vec<String> = vec![
            self.testbed_bin.display().to_string(),
            "api".into(),
            "--listen".into(),
            format!("{UNDERLAY_V4_NET}.254:0"),
            "--kubeconfig".into(),
            self.state.kubeconfig.display().to_string(),
            "--cluster-cidr".into(),
            self.state.cluster_cidrs.join(","),
            "--allocate-node-cidrs".into(),
            (!self.state.no_spec_pod_cidrs).to_string(),
        ];
        self.spawn("api", &u, &argv, Some(&url_file))?;
        let mut url = String::new();
        self.wait_for("the API server", Duration::from_secs(10), || {
            url = std::fs::read_to_string(&url_file).unwrap_or_default();
            url.ends_with('\n')
        })?;
        self.state.api_url = Some(url.trim().to_string());
        self.state.save()?;
        self.say(format!(
            "API server {} (in {u}), kubeconfig {}",
            url.trim(),
            self.state.kubeconfig.display()
        ));
        Ok(())
    }

    /// etcd, then kube-apiserver (recorded as `api`, so the drills' SIGSTOP finds
    /// it), manifests/ applied with kubectl and the admission policy seen enforced,
    /// then the controller-manager's node IPAM: all inside the underlay namespace.
    fn start_real_control_plane(&mut self, spec: &control_plane::Spec) -> Result<()> {
        let cp = |e: control_plane::Error| Error::Other(format!("real control plane: {e}"));
        let u = self.state.underlay_ns.clone();
        let t0 = Instant::now();
        spec.prepare().map_err(cp)?;
        self.state.files.push(spec.dir.clone());
        self.spawn(control_plane::ETCD, &u, &spec.etcd_argv(), None)?;
        self.spawn(control_plane::APISERVER, &u, &spec.apiserver_argv(), None)?;
        let admin = spec.admin(Some(&u)).map_err(cp)?;
        control_plane::wait_ready(&admin, Duration::from_secs(120), || {
            for name in [control_plane::ETCD, control_plane::APISERVER] {
                if !self.process_alive(name) {
                    return Err(control_plane::Error::Other(format!(
                        "{name} exited while starting (log: {})",
                        self.state
                            .dir
                            .join("logs")
                            .join(format!("{name}.log"))
                            .display()
                    )));
                }
            }
            Ok(())
        })
        .map_err(cp)?;
        self.say(format!(
            "kube-apiserver {} ready ({:.1} s), etcd on 127.0.0.1:{} (in {u})",
            spec.url(),
            t0.elapsed().as_secs_f64(),
            spec.etcd_client_port
        ));
        let manifests = control_plane::local::manifests_dir();
        control_plane::bootstrap(spec, &admin, Some(&u), &manifests).map_err(cp)?;
        self.say(format!(
            "applied {}/00-namespace.yaml, 01-rbac.yaml, 02-admission-policy.yaml, 05-meshroute-crd.yaml with kubectl; \
             the policy denies a bound token's label change",
            manifests.display()
        ));
        if spec.allocate_node_cidrs {
            self.spawn(
                control_plane::CONTROLLER_MANAGER,
                &u,
                &spec.controller_manager_argv(),
                None,
            )?;
            self.say("kube-controller-manager: node IPAM (--allocate-node-cidrs) only");
        }
        std::fs::create_dir_all(self.state.dir.join("kubeconfigs"))
            .map_err(|e| Error::io("create kubeconfigs/", e))?;
        self.state.api_url = Some(spec.url());
        self.state.save()?;
        self.say(format!(
            "real control plane up in {:.1} s; admin kubeconfig {}",
            t0.elapsed().as_secs_f64(),
            self.state.kubeconfig.display()
        ));
        Ok(())
    }

    /// The API server's address.
    pub fn api_addr(&self) -> Result<SocketAddr> {
        let url = self
            .state
            .api_url
            .as_deref()
            .ok_or_else(|| Error::Other("the API server was never started".into()))?;
        url.trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .map_err(|_| Error::Other(format!("bad API URL {url}")))
    }

    /// One request to the API server (from inside the underlay namespace).
    pub fn api(&self, method: &str, path: &str, ctype: &str, body: &Value) -> Result<Value> {
        if let Some(spec) = &self.state.control_plane {
            return spec
                .admin(Some(&self.state.underlay_ns))
                .and_then(|a| a.request(method, path, ctype, body))
                .map_err(|e| Error::Other(e.to_string()));
        }
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, text) = sys::http(
            &self.state.underlay_ns,
            self.api_addr()?,
            method,
            path,
            ctype,
            &body,
        )?;
        if !(200..300).contains(&status) {
            return Err(Error::Other(format!(
                "{method} {path}: HTTP {status}: {text}"
            )));
        }
        serde_json::from_str(&text).map_err(|e| Error::Other(format!("{method} {path}: {e}")))
    }

    /// The API server's write-request counter: on a real control plane, the
    /// agents' write requests in its audit log (the testbed's own writes are a
    /// person's and not counted there).
    pub fn api_write_count(&self) -> Result<u64> {
        if let Some(spec) = &self.state.control_plane {
            return control_plane::agent_writes(&spec.audit_log(), None)
                .map_err(|e| Error::Other(e.to_string()));
        }
        let v = self.api("GET", "/testbed/writes", "application/json", &Value::Null)?;
        v["count"]
            .as_u64()
            .ok_or_else(|| Error::Other(format!("bad /testbed/writes answer {v}")))
    }

    /// Creates a Node object as a kubelet would; returns it as the API has it once
    /// node IPAM (if any) gave it `spec.podCIDRs`. The in-memory API allocates in
    /// the create itself; kube-controller-manager a moment after, so on a real
    /// control plane this waits (up to 30 s) for a Node created without them.
    pub fn create_node_object(&self, node: &Value) -> Result<Value> {
        let created = self.api("POST", "/api/v1/nodes", "application/json", node)?;
        let real_ipam = self
            .state
            .control_plane
            .as_ref()
            .is_some_and(|cp| cp.allocate_node_cidrs);
        if !real_ipam || !pod_cidrs_of(&created).is_empty() {
            return Ok(created);
        }
        let name = created["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let path = format!("/api/v1/nodes/{name}");
        let mut node = created;
        self.wait_for(
            &format!("kube-controller-manager to allocate {name}'s pod CIDRs"),
            Duration::from_secs(30),
            || {
                if let Ok(n) = self.api("GET", &path, "application/json", &Value::Null) {
                    node = n;
                }
                !pod_cidrs_of(&node).is_empty()
            },
        )?;
        Ok(node)
    }

    /// The `wgmesh.dev/public-key` a Node carries, if any.
    pub fn node_public_key(&self, name: &str) -> Option<String> {
        let v = self
            .api(
                "GET",
                &format!("/api/v1/nodes/{name}"),
                "application/json",
                &Value::Null,
            )
            .ok()?;
        v["metadata"]["annotations"]["wgmesh.dev/public-key"]
            .as_str()
            .map(str::to_string)
    }

    /// Adds one node with `pods` pods and both processes; see [`Self::add_node_with`].
    pub fn add_node(&mut self, pods: usize) -> Result<String> {
        self.add_node_with(NodeOptions {
            pods,
            dataplane: true,
            backend: None,
        })
    }

    /// Adds one node: namespaces and links, the Node object (its pod CIDRs come from
    /// the API's IPAM), then its dataplane (unless `opts.dataplane` is false: then it
    /// is only recorded, for `restart`) and agent. Returns its name.
    pub fn add_node_with(&mut self, opts: NodeOptions) -> Result<String> {
        let pods = opts.pods;
        let index = self.state.next_node;
        if index > 250 {
            return Err(Error::Other("at most 250 nodes per testbed".into()));
        }
        let backend = opts
            .backend
            .unwrap_or_else(|| self.state.backend.for_node(index));
        if backend == NodeBackend::Kernel && !opts.dataplane {
            return Err(Error::Other(format!(
                "n{index} would run kernel WireGuard, which has no dataplane process to \
                 start later: add it as a userspace node (add-node --backend uapi --no-dataplane)"
            )));
        }
        self.state.next_node += 1;
        let name = format!("n{index}");
        let prefix = self.state.prefix();
        let ns = format!("{prefix}{name}");
        let u = self.state.underlay_ns.clone();
        let dual = self.state.dual_stack;
        self.add_netns(&ns)?;

        // Underlay link: v-<name> on the bridge, eth0 in the node.
        let uplink = format!("v-{name}");
        self.record_link(&u, &uplink, "veth", Some((&ns, "eth0")))?;
        ip(
            &u,
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip(&u, &["link", "set", &uplink, "master", BRIDGE, "up"])?;
        let v4: IpAddr = format!("{UNDERLAY_V4_NET}.{index}").parse().expect("valid");
        let mut underlay = vec![v4];
        ip(&ns, &["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        if dual {
            let v6: IpAddr = format!("{UNDERLAY_V6_NET}{index:x}")
                .parse()
                .expect("valid");
            ip(
                &ns,
                &["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"],
            )?;
            underlay.push(v6);
        }
        ip(&ns, &["link", "set", "eth0", "up"])?;
        // A default route to the underlay host, as every real node has one: whatever
        // the tunnel does not catch leaves there, where the capture sees it (and the
        // underlay namespace, which forwards nothing, drops it).
        ip(&ns, &["route", "add", "default", "via", UNDERLAY_HOST_V4])?;
        if dual {
            ip(
                &ns,
                &["-6", "route", "add", "default", "via", UNDERLAY_HOST_V6],
            )?;
        }
        netns_exec(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if dual {
            netns_exec(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        }

        // The Node object, as a kubelet and the controller-manager would make it.
        let created = self.create_node_object(&json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                "labels": {"kubernetes.io/hostname": name, "wgmesh.dev/testbed": self.state.id}}}))?;
        let spec_cidrs = pod_cidrs_of(&created);
        let pod_cidrs = if self.state.no_spec_pod_cidrs {
            if !spec_cidrs.is_empty() {
                return Err(Error::Other(format!(
                    "the API gave {name} spec.podCIDRs {} although it runs with --allocate-node-cidrs false",
                    spec_cidrs.join(",")
                )));
            }
            testbed_pod_cidrs(index, dual)
        } else {
            spec_cidrs
        };
        if pod_cidrs.is_empty() {
            return Err(Error::Other(format!("the API gave {name} no pod CIDR")));
        }
        let addresses: Vec<Value> = underlay
            .iter()
            .map(|a| json!({"type": "InternalIP", "address": a.to_string()}))
            .chain(std::iter::once(
                json!({"type": "Hostname", "address": name}),
            ))
            .collect();
        self.api(
            "PATCH",
            &format!("/api/v1/nodes/{name}/status"),
            "application/merge-patch+json",
            &json!({"status": {"addresses": addresses, "conditions": [{"type": "Ready",
                "status": "True", "reason": "KubeletReady", "message": "wgmesh testbed node"}]}}),
        )?;
        if let Some(spec) = &self.state.control_plane {
            // What the DaemonSet pod on this node would get: a token bound to a Pod
            // on the Node, never the administrator's credential.
            let admin = spec
                .admin(Some(&u))
                .map_err(|e| Error::Other(e.to_string()))?;
            control_plane::agent_kubeconfig(
                spec,
                &admin,
                &name,
                &self.state.agent_kubeconfig(&name),
            )
            .map_err(|e| Error::Other(format!("{name}'s agent credential: {e}")))?;
        }
        let iface = format!("wgmesh-{name}");
        let store = self.state.dir.join("keys").join(&name);
        self.state.nodes.push(NodeRecord {
            name: name.clone(),
            ns: ns.clone(),
            index,
            underlay: underlay.clone(),
            iface: iface.clone(),
            store: store.clone(),
            pod_cidrs: pod_cidrs.clone(),
            pods: Vec::new(),
            backend,
        });
        self.state.save()?;

        // Pods behind a bridge with the gateway address, the shape the bridge CNI
        // plugin produces.
        let nets: Vec<IpNet> = pod_cidrs.iter().filter_map(|c| c.parse().ok()).collect();
        self.record_link(&ns, "cni0", "bridge", None)?;
        ip(&ns, &["link", "add", "cni0", "type", "bridge"])?;
        for net in &nets {
            let gw = nth_host(net, 1);
            let mut args = vec!["addr", "add"];
            let a = format!("{gw}/{}", net.prefix_len());
            args.extend([a.as_str(), "dev", "cni0"]);
            if gw.is_ipv6() {
                args.push("nodad");
            }
            ip(&ns, &args)?;
        }
        ip(&ns, &["link", "set", "cni0", "up"])?;
        for j in 1..=pods {
            let pod = format!("{name}-p{j}");
            let pod_ns = format!("{prefix}{pod}");
            self.add_netns(&pod_ns)?;
            let veth = format!("vp{j}");
            self.record_link(&ns, &veth, "veth", Some((&pod_ns, "eth0")))?;
            ip(
                &ns,
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
                ],
            )?;
            ip(&ns, &["link", "set", &veth, "master", "cni0", "up"])?;
            let mut ips = Vec::new();
            for net in &nets {
                let addr = nth_host(net, j as u32 + 1);
                let a = format!("{addr}/{}", net.prefix_len());
                let mut args = vec!["addr", "add", a.as_str(), "dev", "eth0"];
                if addr.is_ipv6() {
                    args.push("nodad");
                }
                ip(&pod_ns, &args)?;
                ips.push(addr);
            }
            ip(&pod_ns, &["link", "set", "eth0", "up"])?;
            for net in &nets {
                let gw = nth_host(net, 1).to_string();
                let fam = if net.addr().is_ipv6() { "-6" } else { "-4" };
                sys::run(&[
                    "ip", "-n", &pod_ns, fam, "route", "add", "default", "via", &gw,
                ])?;
            }
            if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == name) {
                n.pods.push(PodRecord {
                    name: pod,
                    ns: pod_ns,
                    ips,
                });
            }
            self.state.save()?;
        }

        // The real processes, through the real CLI.
        let uapi = self.state.uapi_dir.display().to_string();
        let wg = self.wgmesh.display().to_string();
        let argv: Vec<String> = [
            wg.as_str(),
            "dataplane",
            "--interface",
            &iface,
            "--uapi-dir",
            &uapi,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if backend == NodeBackend::Kernel {
            // No dataplane process: the agent creates the kernel link itself.
        } else if opts.dataplane {
            self.spawn(&format!("{name}-dataplane"), &ns, &argv, None)?;
            let sock = self.state.uapi_dir.join(format!("{iface}.sock"));
            self.wait_for(
                &format!("{name}'s UAPI socket"),
                Duration::from_secs_f64(10.0 * time_scale()?),
                || sock.exists(),
            )?;
        } else {
            self.record_process(&format!("{name}-dataplane"), &ns, &argv)?;
        }
        let cni = self.state.dir.join("cni").join(&name).display().to_string();
        let argv: Vec<String> = [
            wg.as_str(),
            "agent",
            "--node-name",
            &name,
            "--kubeconfig",
            &self.state.agent_kubeconfig(&name).display().to_string(),
            "--store",
            &store.display().to_string(),
            "--interface",
            &iface,
            "--uapi-dir",
            &uapi,
            "--cluster-cidrs",
            &self.state.cluster_cidrs.join(","),
            "--resync-seconds",
            &RESYNC_SECONDS.to_string(),
            // Each node's CNI config in the state dir: the host's
            // /etc/cni/net.d is shared by every namespace and not ours.
            "--cni-dir",
            &cni,
            // The backend is fixed, never probed: on a userspace node `auto`
            // could pick kernel WireGuard (creating the interface itself when it
            // probes before the dataplane has bound its socket), as the
            // DaemonSets pin it.
            "--backend",
            backend.name(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut argv = argv;
        if self.state.encrypt_host_traffic {
            argv.push("--encrypt-host-traffic".into());
        }
        if let Some(m) = self.state.masquerade {
            argv.extend(["--masquerade".to_string(), m.to_string()]);
        }
        if self.state.no_spec_pod_cidrs {
            argv.extend(["--pod-cidrs".to_string(), pod_cidrs.join(",")]);
        }
        argv.extend(self.state.rotation_flags.iter().cloned());
        self.spawn(&format!("{name}-agent"), &ns, &argv, None)?;
        let addrs: Vec<String> = underlay.iter().map(|a| a.to_string()).collect();
        self.say(format!(
            "node {name}: underlay {}, pod CIDRs {}, {pods} pod(s), {} on {iface}",
            addrs.join(" "),
            pod_cidrs.join(" "),
            if backend == NodeBackend::Kernel {
                "kernel WireGuard, agent only".to_string()
            } else if opts.dataplane {
                "dataplane + agent".to_string()
            } else {
                format!("agent only (start the dataplane with `restart {name}-dataplane`)")
            }
        ));
        Ok(name)
    }

    /// Path of a node's UAPI socket.
    pub fn sock(&self, node: &NodeRecord) -> PathBuf {
        self.state.uapi_dir.join(format!("{}.sock", node.iface))
    }

    /// A node's WireGuard device as it reports itself: over its UAPI socket
    /// (userspace) or `wg show dump` in its namespace (kernel); `None` when there
    /// is no device to ask.
    pub fn device(&self, node: &NodeRecord) -> Option<sys::WgDevice> {
        match node.backend {
            NodeBackend::Uapi => sys::uapi_device(&self.sock(node)),
            NodeBackend::Kernel => sys::kernel_device(&node.ns, &node.iface),
        }
    }

    /// A node's peers ([`Self::device`]).
    pub fn peers(&self, node: &NodeRecord) -> Option<Vec<sys::WgPeer>> {
        self.device(node).map(|d| d.peers)
    }

    /// Waits until every device has one peer per other node; returns the seconds waited.
    pub fn wait_mesh(&self, timeout: Duration) -> Result<f64> {
        let t0 = Instant::now();
        let want = self.state.nodes.len().saturating_sub(1);
        self.wait_for(
            "every device to have a peer per other node",
            timeout,
            || {
                self.state
                    .nodes
                    .iter()
                    .all(|n| self.peers(n).is_some_and(|p| p.len() == want))
            },
        )?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Deletes a node's Node object (the agents then drop its peer). Its namespaces
    /// and processes stay until [`Self::destroy_node`].
    pub fn delete_node_object(&self, name: &str) -> Result<()> {
        self.api(
            "DELETE",
            &format!("/api/v1/nodes/{name}"),
            "application/json",
            &Value::Null,
        )?;
        Ok(())
    }

    /// Stops a node's processes and removes its namespaces and records.
    pub fn destroy_node(&mut self, name: &str) -> Result<()> {
        let Some(node) = self.state.node(name).cloned() else {
            return Err(Error::Other(format!(
                "no node {name} in testbed {}",
                self.state.id
            )));
        };
        let procs: Vec<ProcessRecord> = self
            .state
            .processes
            .iter()
            .filter(|p| p.name.starts_with(&format!("{name}-")))
            .cloned()
            .collect();
        stop_processes(&procs);
        let mut nss: Vec<String> = node.pods.iter().map(|p| p.ns.clone()).collect();
        nss.push(node.ns.clone());
        for ns in &nss {
            delete_netns(ns);
        }
        let _ = std::fs::remove_dir_all(&node.store);
        self.state
            .processes
            .retain(|p| !p.name.starts_with(&format!("{name}-")));
        self.state.namespaces.retain(|n| !nss.contains(n));
        self.state.links.retain(|l| {
            !nss.contains(&l.ns) && l.peer_ns.as_ref().is_none_or(|p| !nss.contains(p))
        });
        self.state.nodes.retain(|n| n.name != name);
        self.state.save()?;
        Ok(())
    }
}

/// The pod CIDRs the testbed gives node `n<index>` when Nodes have no
/// spec.podCIDRs: what the API's IPAM would have allocated to the index-th node
/// (10.244.<index-1>.0/24, fd00:10:244:<index-1>::/64), never reused in one testbed.
/// A Node's `spec.podCIDRs` (empty when it has none).
pub fn pod_cidrs_of(node: &Value) -> Vec<String> {
    node["spec"]["podCIDRs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn testbed_pod_cidrs(index: u32, dual_stack: bool) -> Vec<String> {
    let i = index.saturating_sub(1);
    let mut out = vec![format!("10.244.{i}.0/24")];
    if dual_stack {
        out.push(format!("fd00:10:244:{i:x}::/64"));
    }
    out
}

/// The environment variable that stretches the drills' time limits on a slow
/// machine (the VM tier's software-emulated guest runs the same binaries
/// several times slower): a factor from 1 to 10, printed with every run.
pub const TIME_SCALE_ENV: &str = "WGMESH_TESTBED_TIME_SCALE";

/// The factor [`TIME_SCALE_ENV`] gives (1 when unset); an unusable value is an
/// error naming the variable and the range.
pub fn time_scale() -> Result<f64> {
    match std::env::var(TIME_SCALE_ENV) {
        Err(_) => Ok(1.0),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(f) if (1.0..=10.0).contains(&f) => Ok(f),
            _ => Err(Error::Other(format!(
                "{TIME_SCALE_ENV}={v:?}: give a factor from 1 to 10 (how much slower than a \
                 normal host this machine runs the testbed), or unset it"
            ))),
        },
    }
}

/// `up --backend kernel|mixed` needs kernel WireGuard on this host: fails early,
/// naming the way out, instead of agents failing one by one.
pub fn kernel_wireguard_available(mode: BackendMode) -> Result<()> {
    if mode == BackendMode::Uapi || Path::new("/sys/module/wireguard").exists() {
        return Ok(());
    }
    match sys::run(&["modprobe", "wireguard"]) {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::Other(format!(
            "--backend {} needs kernel WireGuard, and this kernel has none ({e}); \
             run it in the VM tier (scripts/test-vm boots a kernel that has it) or use \
             --backend uapi",
            mode.name()
        ))),
    }
}

/// Whether `--help` text lists `flag` as an option (not merely as a prefix of a
/// longer one, e.g. `--pod-cidrs` in `--pod-cidrs-foo`).
pub fn help_has_flag(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(i, _)| {
        let next = help[i + flag.len()..].chars().next();
        let prev = help[..i].chars().next_back();
        !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-')
            && !matches!(prev, Some(c) if c.is_ascii_alphanumeric() || c == '-')
    })
}

/// Seconds since the Unix epoch, as a float (the clock of the capture's pcap time stamps).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The `n`th address of a network (1 = the first after the network address).
pub fn nth_host(net: &IpNet, n: u32) -> IpAddr {
    match net {
        IpNet::V4(n4) => IpAddr::V4((u32::from(n4.network()) + n).into()),
        IpNet::V6(n6) => IpAddr::V6((u128::from(n6.network()) + u128::from(n)).into()),
    }
}

/// Stops processes: SIGTERM to the ones still alive (and still the process that
/// was started: the start time must match), up to 3 s, then SIGKILL.
pub fn stop_processes(procs: &[ProcessRecord]) {
    let live = |p: &ProcessRecord| {
        p.pid
            .filter(|&pid| testkit::process::alive(pid, p.start_time))
    };
    for p in procs.iter().rev() {
        if let Some(pid) = live(p) {
            testkit::process::signal(pid, testkit::Signal::TERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && procs.iter().any(|p| live(p).is_some()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in procs {
        if let Some(pid) = live(p) {
            testkit::process::signal(pid, testkit::Signal::KILL);
        }
    }
}

/// Kills whatever still runs in a namespace, then deletes it. Quiet if it is gone.
pub fn delete_netns(ns: &str) {
    if !testkit::netns::list().iter().any(|n| n == ns) {
        return;
    }
    for pid in testkit::netns::pids(ns) {
        testkit::process::signal(pid, testkit::Signal::KILL);
    }
    testkit::netns::del(ns);
}

/// Removes everything of testbed `id` that may exist: its recorded processes, every
/// namespace with its prefix (recorded or not, and whatever runs in them), and its
/// state directory. Safe to run on a half-built testbed and to run twice. Returns
/// what it removed, for the caller to print.
pub fn teardown(id: &str) -> Vec<String> {
    let mut done = Vec::new();
    let dir = state_root().join(id);
    let state = State::load(&dir).ok();
    if let Some(s) = &state {
        let live = s
            .processes
            .iter()
            .filter(|p| {
                p.pid
                    .is_some_and(|pid| testkit::process::alive(pid, p.start_time))
            })
            .count();
        stop_processes(&s.processes);
        if live > 0 {
            done.push(format!("stopped {live} process(es)"));
        }
    }
    let prefix = format!("{NETNS_PREFIX}{id}-");
    let mut nss: Vec<String> = state
        .as_ref()
        .map(|s| s.namespaces.clone())
        .unwrap_or_default();
    for n in testkit::netns::list() {
        if n.starts_with(&prefix) && !nss.contains(&n) {
            nss.push(n);
        }
    }
    // Pods first, the underlay last.
    let mut removed = 0;
    for ns in nss.iter().rev() {
        if testkit::netns::list().iter().any(|n| n == ns) {
            delete_netns(ns);
            removed += 1;
        }
    }
    if removed > 0 {
        done.push(format!("deleted {removed} namespace(s) {prefix}*"));
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        done.push(format!("removed {}", dir.display()));
    }
    super::state::remove_owner(id);
    done
}

/// Every testbed id of this state root that left a trace (a state
/// directory or a namespace), and, apart, the ids whose namespaces belong to
/// a testbed of another state root (left alone: `down` there removes them).
pub fn all_ids() -> (Vec<String>, Vec<String>) {
    let mut ids = list_ids();
    let mut elsewhere: Vec<String> = Vec::new();
    let root = state_root();
    for n in testkit::netns::list() {
        if let Some(rest) = n.strip_prefix(NETNS_PREFIX) {
            if let Some((id, _)) = rest.split_once('-') {
                if ids.iter().chain(&elsewhere).any(|i| i == id) {
                    continue;
                }
                let owner = super::state::owner(id);
                if super::state::owned_elsewhere(id, &root, owner.as_deref()) {
                    elsewhere.push(id.to_string());
                } else {
                    ids.push(id.to_string());
                }
            }
        }
    }
    (ids, elsewhere)
}
