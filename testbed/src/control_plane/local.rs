//! A control plane on this host's loopback for the integration tests: etcd,
//! kube-apiserver and (optionally) kube-controller-manager as child processes,
//! each logging to a file in its directory, stopped when [`Local`] is dropped
//! (a panicking test too).

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Admin, Bins, Error, Result, Spec};

/// A running control plane.
pub struct Local {
    pub spec: Spec,
    admin: Admin,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

/// A port free on 127.0.0.1 now (another process may take it before we use it;
/// a test control plane accepts that race).
fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("pick a free port on 127.0.0.1", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("pick a free port on 127.0.0.1", e))
}

fn spawn(argv: &[String], log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log)
        .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| Error::io(format!("start {}", argv[0]), e))
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last lines of a component's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

impl Local {
    /// Starts etcd and kube-apiserver (and the controller-manager's node IPAM
    /// when `cluster_cidrs` is not empty) on 127.0.0.1, in a temporary directory,
    /// then applies manifests/ (namespace, RBAC, admission policy) and waits until
    /// the policy is enforced.
    pub fn start(bins: Bins, cluster_cidrs: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wgmesh-control-plane-")
            .tempdir()
            .map_err(|e| Error::io("create a temporary directory", e))?;
        let spec = Spec {
            bins,
            dir: dir.path().to_path_buf(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            apiserver_port: free_port()?,
            etcd_client_port: free_port()?,
            etcd_peer_port: free_port()?,
            cluster_cidrs: cluster_cidrs.iter().map(|c| c.to_string()).collect(),
            allocate_node_cidrs: !cluster_cidrs.is_empty(),
        };
        spec.prepare()?;
        let admin = spec.admin(None)?;
        let mut cp = Self {
            spec,
            admin,
            etcd: None,
            apiserver: None,
            controller_manager: None,
            _dir: Some(dir),
        };
        cp.etcd = Some(spawn(&cp.spec.etcd_argv(), &cp.log("etcd"))?);
        cp.start_apiserver()?;
        super::bootstrap(&cp.spec, &cp.admin, None, &manifests_dir())?;
        if cp.spec.allocate_node_cidrs {
            cp.controller_manager = Some(spawn(
                &cp.spec.controller_manager_argv(),
                &cp.log("controller-manager"),
            )?);
        }
        Ok(cp)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.spec.dir.join(format!("{name}.log"))
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let log = self.log("kube-apiserver");
        self.apiserver = Some(spawn(&self.spec.apiserver_argv(), &log)?);
        let mut children = [
            (&mut self.etcd, "etcd"),
            (&mut self.apiserver, "kube-apiserver"),
        ];
        super::wait_ready(&self.admin, Duration::from_secs(120), || {
            for (c, name) in children.iter_mut() {
                if let Some(child) = c.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(Error::Other(format!(
                            "{name} exited ({status}) while starting; its log ends:\n{}",
                            log_tail(&self.spec.dir.join(format!("{name}.log")))
                        )));
                    }
                }
            }
            Ok(())
        })
    }

    /// Stops kube-apiserver and starts it again (etcd keeps the data): watches
    /// break, and a resumed watch from before the restart may be answered 410 Gone.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        stop(&mut self.apiserver);
        self.start_apiserver()
    }

    /// Stops kube-apiserver (an API outage) until [`Self::start_apiserver_again`].
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver);
    }

    pub fn start_apiserver_again(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            return Ok(());
        }
        self.start_apiserver()
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The kubeconfig an agent on `node` uses (a token bound to a Pod on it).
    pub fn agent_kubeconfig(&self, node: &str, path: &Path) -> Result<()> {
        super::agent_kubeconfig(&self.spec, &self.admin, node, path)
    }

    /// Writes by agents so far (only `node`'s when given), from the audit log.
    pub fn agent_writes(&self, node: Option<&str>) -> Result<u64> {
        super::agent_writes(&self.spec.audit_log(), node)
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        stop(&mut self.controller_manager);
        stop(&mut self.apiserver);
        stop(&mut self.etcd);
    }
}

/// manifests/ of this source tree.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

static SHARED: std::sync::OnceLock<std::result::Result<Local, String>> = std::sync::OnceLock::new();

/// Stops the shared control plane's processes and removes its directory when
/// the test binary exits (statics are never dropped).
extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(cp)) = SHARED.get() {
        for c in [&cp.controller_manager, &cp.apiserver, &cp.etcd]
            .into_iter()
            .flatten()
        {
            // A child this process started and has not reaped, so the pid
            // cannot have been reused.
            testkit::process::signal(c.id(), testkit::Signal::KILL);
        }
        let _ = std::fs::remove_dir_all(&cp.spec.dir);
    }
}

/// One control plane for every test of a test binary (started by the first that
/// asks, with node IPAM over `cluster_cidrs`), stopped when the binary exits:
/// tests that need their own restarts start a [`Local`] of their own. The error
/// (`Error::NoBins` and the like, as text) is the same for every caller.
pub fn shared(cluster_cidrs: &[&str]) -> std::result::Result<&'static Local, String> {
    SHARED
        .get_or_init(|| {
            let bins = Bins::from_env().map_err(|e| e.to_string())?;
            let cp = Local::start(bins, cluster_cidrs).map_err(|e| e.to_string())?;
            // SAFETY: registers a plain extern "C" function with no arguments.
            unsafe { libc::atexit(stop_shared_at_exit) };
            Ok(cp)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// etcd's v3 JSON gateway (plain HTTP on its client port): what a test needs to
/// push the API server's watch history out of reach.
impl Local {
    /// etcd's current revision (the newest resourceVersion any object has).
    pub fn etcd_revision(&self) -> Result<i64> {
        // The range's answer carries the store's revision in its header,
        // whatever the key; "/" matches nothing the API server writes.
        let answer = self.etcd_post("/v3/kv/range", &serde_json::json!({"key": "Lw=="}))?;
        answer["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| Error::Other(format!("etcd's range answer has no revision: {answer}")))
    }

    /// Compacts etcd's history up to its current revision, which it returns:
    /// a watch from any older resourceVersion can only be answered 410 Gone
    /// once the API server no longer holds those changes in its watch cache
    /// (after [`Self::restart_apiserver`]).
    pub fn compact_etcd(&self) -> Result<i64> {
        let revision = self.etcd_revision()?;
        // int64 fields are strings in the gateway's JSON; physical: the answer
        // comes once the old revisions are gone from the backend.
        self.etcd_post(
            "/v3/kv/compaction",
            &serde_json::json!({"revision": revision.to_string(), "physical": true}),
        )?;
        Ok(revision)
    }

    /// One HTTP/1.0 POST to etcd's gateway (the answer ends with the connection).
    fn etcd_post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        use std::io::{Read, Write};
        let addr = (Ipv4Addr::LOCALHOST, self.spec.etcd_client_port);
        let what = || format!("POST {path} to etcd on 127.0.0.1:{}", addr.1);
        let exchange = || -> std::io::Result<String> {
            let mut tcp = std::net::TcpStream::connect(addr)?;
            tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
            let body = body.to_string();
            write!(
                tcp,
                "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            tcp.flush()?;
            let mut answer = String::new();
            tcp.read_to_string(&mut answer)?;
            Ok(answer)
        };
        let answer = exchange().map_err(|e| Error::io(what(), e))?;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head.split_whitespace().nth(1).unwrap_or_default();
        if status != "200" {
            return Err(Error::Other(format!("{}: {head}\n{body}", what())));
        }
        serde_json::from_str(body)
            .map_err(|e| Error::Other(format!("{}: not JSON ({e}): {body}", what())))
    }
}
