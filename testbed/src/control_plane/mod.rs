//! A real Kubernetes control plane for the tests and the testbed: etcd,
//! kube-apiserver and kube-controller-manager, as `scripts/kube-bins` builds them,
//! with TLS, ServiceAccount tokens, RBAC and the admission policy of
//! `manifests/` enforced by the real server — where the in-memory API
//! ([`crate::api`]) can only pretend.
//!
//! This module plans and talks; it does not own processes. [`Spec`] writes the
//! files (PKI, token file, audit policy, kubeconfigs) and gives each component's
//! command line; the caller spawns them — the testbed through its state file (so
//! `down` stops them after a crash), the tests through [`local::Local`], which
//! stops them on drop. [`Admin`] is the administrator's HTTPS client (a static
//! bearer token in `system:masters`: the testbed's own calls are a person's, not
//! an agent's). [`agent_kubeconfig`] gives an agent what a DaemonSet pod gets: a
//! ServiceAccount token bound to a Pod on its Node, so the token carries the
//! node-name claim the admission policy reads. [`agent_writes`] counts the
//! agents' write requests in the API server's audit log (the "no writes at rest"
//! measure on a real server).

pub mod client;
pub mod local;
mod pki;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub use client::Admin;

/// Where `scripts/kube-bins` put the binaries: the environment variable the
/// tests and the testbed read.
pub const KUBE_BINS_ENV: &str = "WGMESH_KUBE_BINS";
/// The agent's namespace and ServiceAccount, as in manifests/01-rbac.yaml.
pub const AGENT_NAMESPACE: &str = "wgmesh";
pub const AGENT_SERVICE_ACCOUNT: &str = "wgmesh-agent";
/// The audit log's user extra that carries a bound token's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Service ClusterIPs: required by kube-apiserver, unused by wgmesh; outside
/// every cluster CIDR the testbed and the tests use.
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// How long an agent's token lives (the API server's default cap is far above).
const AGENT_TOKEN_SECONDS: u64 = 48 * 3600;

/// What can go wrong planning, starting or talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "no control-plane binaries: set {KUBE_BINS_ENV} to the directory `scripts/kube-bins` \
         prints (it builds kube-apiserver, kube-controller-manager and etcd once per machine)"
    )]
    NoBins,
    #[error("{0} is not an executable file (rerun scripts/kube-bins)")]
    MissingBinary(PathBuf),
    #[error("{method} {path}: HTTP {status}: {body}")]
    Http {
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The HTTP status, when the API server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// For a 403: who refused the request and the server's message.
    pub fn forbidden(&self) -> Option<(Refuser, String)> {
        let Self::Http {
            status: 403, body, ..
        } = self
        else {
            return None;
        };
        let msg = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.clone());
        let by = if msg.contains("ValidatingAdmissionPolicy") {
            Refuser::AdmissionPolicy
        } else {
            Refuser::Rbac
        };
        Some((by, msg))
    }
}

/// What refused a request with 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuser {
    Rbac,
    AdmissionPolicy,
}

impl std::fmt::Display for Refuser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Self::Rbac => "RBAC",
            Self::AdmissionPolicy => "admission policy",
        })
    }
}

/// The binaries `scripts/kube-bins` builds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bins {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    /// The same release's kubectl (the machine's own may be years older).
    pub kubectl: PathBuf,
}

impl Bins {
    /// The binaries in `dir`, each checked to be an executable file.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let bins = Self {
            etcd: dir.join("etcd"),
            apiserver: dir.join("kube-apiserver"),
            controller_manager: dir.join("kube-controller-manager"),
            kubectl: dir.join("kubectl"),
        };
        for b in [
            &bins.etcd,
            &bins.apiserver,
            &bins.controller_manager,
            &bins.kubectl,
        ] {
            let exec = std::fs::metadata(b)
                .map(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
                .unwrap_or(false);
            if !exec {
                return Err(Error::MissingBinary(b.clone()));
            }
        }
        Ok(bins)
    }

    /// The binaries in `$WGMESH_KUBE_BINS`; [`Error::NoBins`] when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var_os(KUBE_BINS_ENV) {
            Some(d) if !d.is_empty() => Self::in_dir(Path::new(&d)),
            _ => Err(Error::NoBins),
        }
    }
}

/// One control plane: where its files live and where it listens.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    pub bins: Bins,
    /// Its files: PKI, tokens, kubeconfigs, audit log, etcd's data.
    pub dir: PathBuf,
    /// The API server's address (and its certificate's IP SAN).
    pub address: IpAddr,
    pub apiserver_port: u16,
    /// etcd's client and peer ports, on 127.0.0.1 of the same network namespace.
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    pub cluster_cidrs: Vec<String>,
    /// Run kube-controller-manager's node IPAM (`spec.podCIDRs` from the real
    /// allocator); without it Nodes carry no pod CIDR unless created with one.
    pub allocate_node_cidrs: bool,
}

/// The component names, as the testbed records their processes.
pub const ETCD: &str = "etcd";
pub const APISERVER: &str = "api";
pub const CONTROLLER_MANAGER: &str = "controller-manager";

impl Spec {
    pub fn url(&self) -> String {
        format!("https://{}", self.apiserver_addr())
    }

    pub fn apiserver_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.apiserver_port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.path("ca.crt")
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.path("admin.kubeconfig")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.path("audit.log")
    }
    fn admin_token_path(&self) -> PathBuf {
        self.path("admin.token")
    }

    /// Writes every file the components read: a CA and the API server's serving
    /// certificate, the ServiceAccount signing key, the static token file (the
    /// administrator and the controller-manager), the audit policy and the
    /// kubeconfigs. Private keys and tokens are 0600. Idempotent only in the
    /// sense that it replaces them all.
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(self.path("etcd"))
            .map_err(|e| Error::io(format!("create {}", self.dir.display()), e))?;
        let pki = pki::Pki::generate(self.address)?;
        write_file(&self.ca_path(), pki.ca_pem.as_bytes(), 0o644)?;
        write_file(
            &self.path("apiserver.crt"),
            pki.serving_cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(
            &self.path("apiserver.key"),
            pki.serving_key_pem.as_bytes(),
            0o600,
        )?;
        write_file(&self.path("sa.key"), pki.sa_key_pem.as_bytes(), 0o600)?;
        write_file(&self.path("sa.pub"), pki.sa_public_pem.as_bytes(), 0o644)?;
        let admin = pki::random_token()?;
        let kcm = pki::random_token()?;
        // token,user,uid,"group,..."
        let tokens = zeroize::Zeroizing::new(format!(
            "{},wgmesh-testbed-admin,wgmesh-testbed-admin,\"system:masters\"\n\
             {},system:kube-controller-manager,system:kube-controller-manager,\"system:masters\"\n",
            admin.as_str(),
            kcm.as_str()
        ));
        write_file(&self.path("tokens.csv"), tokens.as_bytes(), 0o600)?;
        write_file(&self.admin_token_path(), admin.as_bytes(), 0o600)?;
        write_file(
            &self.path("audit-policy.yaml"),
            AUDIT_POLICY.as_bytes(),
            0o644,
        )?;
        write_kubeconfig(
            &self.admin_kubeconfig(),
            &self.url(),
            &pki.ca_pem,
            &admin,
            "admin",
        )?;
        write_kubeconfig(
            &self.path("controller-manager.kubeconfig"),
            &self.url(),
            &pki.ca_pem,
            &kcm,
            "controller-manager",
        )?;
        Ok(())
    }

    /// etcd on 127.0.0.1: one member, no fsync (a test store).
    pub fn etcd_argv(&self) -> Vec<String> {
        let client = format!("http://127.0.0.1:{}", self.etcd_client_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        vec![
            self.bins.etcd.display().to_string(),
            "--name=wgmesh".into(),
            format!("--data-dir={}", self.path("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=wgmesh={peer}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ]
    }

    pub fn apiserver_argv(&self) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            self.bins.apiserver.display().to_string(),
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_client_port),
            format!("--bind-address={}", self.address),
            format!("--advertise-address={}", self.address),
            format!("--secure-port={}", self.apiserver_port),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=RBAC".into(),
            format!("--audit-policy-file={}", p("audit-policy.yaml")),
            format!("--audit-log-path={}", p("audit.log")),
            "--audit-log-format=json".into(),
            "--audit-log-mode=blocking".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]
    }

    /// Only the node IPAM controller: no node lifecycle controller (there is no
    /// kubelet to heartbeat), no leader election (one instance, and its lease
    /// writes would be writes at rest).
    pub fn controller_manager_argv(&self) -> Vec<String> {
        let v4 = self.cluster_cidrs.iter().any(|c| !c.contains(':'));
        let v6 = self.cluster_cidrs.iter().any(|c| c.contains(':'));
        let mut argv = vec![
            self.bins.controller_manager.display().to_string(),
            format!(
                "--kubeconfig={}",
                self.path("controller-manager.kubeconfig").display()
            ),
            "--controllers=nodeipam".into(),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", self.cluster_cidrs.join(",")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ];
        if v4 {
            argv.push("--node-cidr-mask-size-ipv4=24".into());
        }
        if v6 {
            argv.push("--node-cidr-mask-size-ipv6=64".into());
        }
        argv
    }

    /// The administrator's client (from inside `netns` when given).
    pub fn admin(&self, netns: Option<&str>) -> Result<Admin> {
        let token = std::fs::read_to_string(self.admin_token_path())
            .map_err(|e| Error::io(format!("read {}", self.admin_token_path().display()), e))?;
        let ca = std::fs::read(self.ca_path())
            .map_err(|e| Error::io(format!("read {}", self.ca_path().display()), e))?;
        Admin::new(self.apiserver_addr(), netns, &ca, token.trim())
    }
}

/// Writes `data` to `path` atomically with `mode` (a temporary file in the same
/// directory, then a rename).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let what = || format!("write {}", path.display());
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut f = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(what(), e))?;
    f.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(what(), e))?;
    f.write_all(data).map_err(|e| Error::io(what(), e))?;
    f.persist(path).map_err(|e| Error::io(what(), e.error))?;
    Ok(())
}

/// A kubeconfig with a bearer token and the cluster's CA, 0600.
fn write_kubeconfig(path: &Path, url: &str, ca_pem: &str, token: &str, user: &str) -> Result<()> {
    use base64::Engine as _;
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "wgmesh", "cluster": {"server": url,
            "certificate-authority-data": b64(ca_pem.as_bytes())}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "wgmesh", "user": user}}],
        "current-context": user,
    });
    // JSON is YAML: kubectl and kube-rs read it as a kubeconfig.
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::Other(e.to_string()))?;
    write_file(path, text.as_bytes(), 0o600)
}

/// Only the agents' writes are recorded (what "no writes at rest" counts), at
/// Metadata level (no bodies: the log never holds a key or a token).
const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
";

/// Waits until the API server answers `/readyz` with 200.
pub fn wait_ready(
    admin: &Admin,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        let last = match admin.raw("GET", "/readyz", "application/json", "") {
            Ok((200, _)) => return Ok(()),
            Ok((s, body)) => format!("HTTP {s}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("kube-apiserver /readyz (last answer: {last})"),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Applies manifests/00-namespace.yaml, 01-rbac.yaml, 02-admission-policy.yaml and
/// 05-meshroute-crd.yaml
/// with kubectl (from inside `netns` when given), then waits until the admission
/// policy is enforced: a throwaway Node's bound token is refused a label change.
pub fn bootstrap(spec: &Spec, admin: &Admin, netns: Option<&str>, manifests: &Path) -> Result<()> {
    let mut kubectl: Vec<String> = Vec::new();
    if let Some(ns) = netns {
        kubectl.extend(["ip", "netns", "exec", ns].map(String::from));
    }
    kubectl.extend([
        spec.bins.kubectl.display().to_string(),
        format!("--kubeconfig={}", spec.admin_kubeconfig().display()),
    ]);
    let mut apply = kubectl.clone();
    apply.push("apply".into());
    for f in [
        "00-namespace.yaml",
        "01-rbac.yaml",
        "02-admission-policy.yaml",
        "05-meshroute-crd.yaml",
    ] {
        apply.push("-f".into());
        apply.push(manifests.join(f).display().to_string());
    }
    run(&apply)?;
    // Agents ask once at start whether MeshRoutes are served: the CRD must
    // be established before any agent runs.
    let mut wait = kubectl;
    wait.extend(
        [
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/meshroutes.wgmesh.dev",
        ]
        .map(String::from),
    );
    run(&wait)?;
    wait_policy_enforced(admin, Duration::from_secs(60))
}

/// Runs a command; its stderr in the error.
pub fn run(argv: &[String]) -> Result<String> {
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| Error::io(format!("run {}", argv[0]), e))?;
    if !out.status.success() {
        return Err(Error::Other(format!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const PROBE_NODE: &str = "wgmesh-policy-probe";

/// The policy and its binding take effect asynchronously after they are created:
/// probe with a real bound token until a label change is denied by the policy
/// (not by RBAC), then remove the probe.
fn wait_policy_enforced(admin: &Admin, timeout: Duration) -> Result<()> {
    create_node(admin, PROBE_NODE, &json!({}))?;
    let result = (|| {
        let token = agent_token(admin, PROBE_NODE)?;
        let agent = admin.with_token(&token);
        let deadline = Instant::now() + timeout;
        loop {
            let r = agent.request(
                "PATCH",
                &format!("/api/v1/nodes/{PROBE_NODE}"),
                "application/merge-patch+json",
                &json!({"metadata": {"labels": {"probe": "x"}}}),
            );
            match r {
                Err(Error::Http { status: 403, body, .. }) if body.contains("ValidatingAdmissionPolicy") => return Ok(()),
                Ok(_) => {
                    // Allowed: the policy is not in force yet; undo and retry.
                    admin.request(
                        "PATCH",
                        &format!("/api/v1/nodes/{PROBE_NODE}"),
                        "application/merge-patch+json",
                        &json!({"metadata": {"labels": {"probe": null}}}),
                    )?;
                }
                Err(Error::Http { status: 403, body, .. }) => {
                    return Err(Error::Other(format!(
                        "the agent's token is refused a Node patch by RBAC, not by the admission policy: {body}"
                    )))
                }
                Err(e) => return Err(e),
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "the admission policy to deny a probe patch".into(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    })();
    let _ = admin.request(
        "DELETE",
        &format!(
            "/api/v1/namespaces/{AGENT_NAMESPACE}/pods/{}",
            agent_pod_name(PROBE_NODE)
        ),
        "application/json",
        &Value::Null,
    );
    let _ = admin.request(
        "DELETE",
        &format!("/api/v1/nodes/{PROBE_NODE}"),
        "application/json",
        &Value::Null,
    );
    result
}

/// Creates a Node (labels as given); returns it.
pub fn create_node(admin: &Admin, name: &str, labels: &Value) -> Result<Value> {
    admin.request(
        "POST",
        "/api/v1/nodes",
        "application/json",
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}),
    )
}

pub fn agent_pod_name(node: &str) -> String {
    format!("wgmesh-agent-{node}")
}

/// What a DaemonSet pod of the agent on `node` gets: a Pod object bound to the
/// Node (Pending forever: no kubelet), and a ServiceAccount token bound to that
/// Pod, which the API server stamps with the Node's name and uid. Returns the token.
pub fn agent_token(admin: &Admin, node: &str) -> Result<String> {
    let pod_name = agent_pod_name(node);
    let pods = format!("/api/v1/namespaces/{AGENT_NAMESPACE}/pods");
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "labels": {"app.kubernetes.io/name": "wgmesh"}},
        "spec": {"nodeName": node, "serviceAccountName": AGENT_SERVICE_ACCOUNT,
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "agent", "image": "wgmesh.invalid/agent:testbed"}]}});
    let pod = match admin.request("POST", &pods, "application/json", &pod) {
        Err(e) if e.status() == Some(409) => admin.request(
            "GET",
            &format!("{pods}/{pod_name}"),
            "application/json",
            &Value::Null,
        )?,
        r => r?,
    };
    let uid = pod["metadata"]["uid"]
        .as_str()
        .ok_or_else(|| Error::Other(format!("pod {pod_name} has no uid")))?;
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": AGENT_TOKEN_SECONDS,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": uid}}});
    let answer = admin.request(
        "POST",
        &format!(
            "/api/v1/namespaces/{AGENT_NAMESPACE}/serviceaccounts/{AGENT_SERVICE_ACCOUNT}/token"
        ),
        "application/json",
        &req,
    )?;
    answer["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Other(format!("the TokenRequest for {node} returned no token")))
}

/// Writes the kubeconfig an agent on `node` uses (its bound token, 0600).
pub fn agent_kubeconfig(spec: &Spec, admin: &Admin, node: &str, path: &Path) -> Result<()> {
    let token = agent_token(admin, node)?;
    let ca = std::fs::read_to_string(spec.ca_path())
        .map_err(|e| Error::io(format!("read {}", spec.ca_path().display()), e))?;
    write_kubeconfig(path, &spec.url(), &ca, &token, node)
}

/// Write requests by agents (ServiceAccount tokens) in the audit log; only those
/// whose token is bound to `node` when given. Counts requests, allowed or not.
pub fn agent_writes(audit_log: &Path, node: Option<&str>) -> Result<u64> {
    let text = match std::fs::read_to_string(audit_log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("read {}", audit_log.display()), e)),
    };
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let ev: Value = serde_json::from_str(line)
            .map_err(|e| Error::Other(format!("{}: bad audit line: {e}", audit_log.display())))?;
        if ev["stage"] != "ResponseComplete" {
            continue;
        }
        let by_agent = ev["user"]["username"]
            .as_str()
            .is_some_and(|u| u.starts_with("system:serviceaccount:"));
        let on_node = match node {
            None => true,
            Some(want) => ev["user"]["extra"][NODE_NAME_EXTRA] == json!([want]),
        };
        if by_agent && on_node {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_writes_counts_completed_agent_writes_per_node() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let ev = |stage: &str, user: &str, node: &str| {
            json!({"stage": stage, "verb": "patch", "user": {"username": user,
                "extra": {NODE_NAME_EXTRA: [node]}}})
            .to_string()
        };
        let sa = "system:serviceaccount:wgmesh:wgmesh-agent";
        let lines = [
            ev("ResponseComplete", sa, "n1"),
            ev("ResponseStarted", sa, "n1"),
            ev("ResponseComplete", sa, "n2"),
            ev("ResponseComplete", "wgmesh-testbed-admin", "n1"),
        ];
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        assert_eq!(agent_writes(&log, None).unwrap(), 2);
        assert_eq!(agent_writes(&log, Some("n1")).unwrap(), 1);
        assert_eq!(agent_writes(&log, Some("n3")).unwrap(), 0);
        assert_eq!(agent_writes(&dir.path().join("none"), None).unwrap(), 0);
    }
}
