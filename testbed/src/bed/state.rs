//! The state file: `<state root>/<id>/state.json`, rewritten (atomically) before each
//! namespace, link, process or file is created, so `down` knows everything that may
//! exist even when the process that was building the testbed died half-way.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where testbeds keep their state unless `WGMESH_TESTBED_STATE_DIR` says otherwise.
pub const DEFAULT_STATE_ROOT: &str = "/run/wgmesh-testbed";
/// Every namespace of every testbed starts with this.
pub const NETNS_PREFIX: &str = "wgtb-";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a testbed state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no testbed is running (state root {0})")]
    NoneRunning(PathBuf),
    #[error("{n} testbeds are running ({ids}): choose one with --id or WGMESH_TESTBED_ID")]
    Ambiguous { n: usize, ids: String },
    #[error("no testbed with id {id} (no {path})")]
    NotFound { id: String, path: PathBuf },
}

/// Where each testbed, whatever its state root, records which state
/// directory owns it (`<id>`: the directory's path), so that `down --all`
/// under one state root leaves alone the testbeds of another (a test's
/// temporary root, a second user's) while still reaping orphans: namespaces
/// whose owner directory is gone.
pub const OWNERS_DIR: &str = "/run/wgmesh-testbed-owners";

/// Records that `dir` (a state directory) owns testbed `id`.
pub fn write_owner(id: &str, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(OWNERS_DIR)?;
    let dir = std::path::absolute(dir)?;
    std::fs::write(
        Path::new(OWNERS_DIR).join(id),
        dir.as_os_str().as_encoded_bytes(),
    )
}

/// The state directory that owns testbed `id`, if one was recorded.
pub fn owner(id: &str) -> Option<PathBuf> {
    let bytes = std::fs::read(Path::new(OWNERS_DIR).join(id)).ok()?;
    String::from_utf8(bytes).ok().map(PathBuf::from)
}

/// Forgets the owner of testbed `id` (its teardown).
pub fn remove_owner(id: &str) {
    let _ = std::fs::remove_file(Path::new(OWNERS_DIR).join(id));
}

/// Whether testbed `id`, seen only by its namespaces from state root `root`,
/// belongs to another state root whose directory for it still exists.
pub fn owned_elsewhere(id: &str, root: &Path, owner: Option<&Path>) -> bool {
    let here = std::path::absolute(root.join(id)).unwrap_or_else(|_| root.join(id));
    owner.is_some_and(|o| o != here && o.exists())
}

/// The state root: `WGMESH_TESTBED_STATE_DIR` or [`DEFAULT_STATE_ROOT`].
pub fn state_root() -> PathBuf {
    std::env::var_os("WGMESH_TESTBED_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT))
}

/// One testbed, as recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    /// The testbed's directory: state file, logs, UAPI sockets, key stores, kubeconfig.
    pub dir: PathBuf,
    /// Unix seconds.
    pub created: u64,
    /// `building` while `up` runs, `running` once the mesh is ready.
    pub phase: String,
    pub dual_stack: bool,
    pub pods_per_node: usize,
    pub cluster_cidrs: Vec<String>,
    pub underlay_ns: String,
    /// The API server's URL (reachable from inside the testbed's namespaces only).
    pub api_url: Option<String>,
    pub kubeconfig: PathBuf,
    pub uapi_dir: PathBuf,
    /// Every namespace, in creation order (recorded before `ip netns add`).
    pub namespaces: Vec<String>,
    /// Every link (veth pairs and bridges), recorded before creation. They live in
    /// the namespaces above and go with them; listed so a person can see what exists.
    pub links: Vec<LinkRecord>,
    /// Every process started (recorded before spawning, pid filled in after).
    pub processes: Vec<ProcessRecord>,
    /// Files and directories created outside `dir` (none so far) and inside it.
    pub files: Vec<PathBuf>,
    pub nodes: Vec<NodeRecord>,
    /// Index the next added node gets (node names are `n<index>`).
    pub next_node: u32,
    /// `up --encrypt-host-traffic`: every agent got `--encrypt-host-traffic`, so
    /// node-to-node host traffic must cross the underlay encrypted too (the capture
    /// then also counts non-WireGuard packets between node addresses as plaintext).
    #[serde(default)]
    pub encrypt_host_traffic: bool,
    /// `up --masquerade true|false`, passed to every agent; `None`: not passed (the
    /// agent's default, on).
    #[serde(default)]
    pub masquerade: Option<bool>,
    /// `up --no-spec-pod-cidrs`: the API allocates no spec.podCIDRs; the testbed
    /// picks each node's pod CIDRs ([`NodeRecord::pod_cidrs`]) and passes them to its
    /// agent as `--pod-cidrs`, which publishes them as `wgmesh.dev/pod-cidrs`.
    #[serde(default)]
    pub no_spec_pod_cidrs: bool,
    /// The short rotation timings passed to every agent (`--rotation-confirm-deadline
    /// 30s` ...), when the `wgmesh` binary had those flags at `up`; empty when it had
    /// none of them (then `rotate` fails, naming the missing flags).
    #[serde(default)]
    pub rotation_flags: Vec<String>,
    /// `up --control-plane real`: etcd, kube-apiserver and kube-controller-manager
    /// (their files under `dir`/control-plane) instead of the in-memory API; each
    /// agent then has a kubeconfig of its own ([`Self::agent_kubeconfig`]).
    #[serde(default)]
    pub control_plane: Option<crate::control_plane::Spec>,
    /// `up --backend`: which WireGuard every node added runs (also for nodes
    /// added later with `add-node`).
    #[serde(default)]
    pub backend: BackendMode,
}

/// `up --backend`: the WireGuard implementation of the testbed's nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendMode {
    /// `wgmesh dataplane` (userspace, a TUN device and a UAPI socket) beside each
    /// agent, which runs with `--backend uapi`.
    #[default]
    Uapi,
    /// Kernel WireGuard: the agent alone with `--backend kernel` (it creates
    /// the link); needs a kernel with the `wireguard` module.
    Kernel,
    /// Odd-numbered nodes kernel, even-numbered userspace: a cluster mid-migration.
    Mixed,
}

impl BackendMode {
    /// The backend node number `index` gets.
    pub fn for_node(self, index: u32) -> NodeBackend {
        match self {
            Self::Uapi => NodeBackend::Uapi,
            Self::Kernel => NodeBackend::Kernel,
            Self::Mixed if index % 2 == 1 => NodeBackend::Kernel,
            Self::Mixed => NodeBackend::Uapi,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Uapi => "uapi",
            Self::Kernel => "kernel",
            Self::Mixed => "mixed",
        }
    }
}

/// The WireGuard one node runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeBackend {
    /// `wgmesh dataplane` (the process `<node>-dataplane`), read over UAPI.
    #[default]
    Uapi,
    /// A kernel WireGuard link the agent created, read with `wg show dump` in the
    /// node's namespace.
    Kernel,
}

impl NodeBackend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Uapi => "uapi",
            Self::Kernel => "kernel",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkRecord {
    pub ns: String,
    pub name: String,
    pub kind: String,
    pub peer_ns: Option<String>,
    pub peer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// e.g. `n1-agent`, `api`, `capture`.
    pub name: String,
    pub ns: String,
    pub argv: Vec<String>,
    pub log: PathBuf,
    pub pid: Option<u32>,
    /// Field 22 of /proc/PID/stat, so a recycled pid is never signalled.
    pub start_time: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub ns: String,
    pub index: u32,
    pub underlay: Vec<IpAddr>,
    /// The WireGuard interface (also the UAPI socket's name).
    pub iface: String,
    pub store: PathBuf,
    pub pod_cidrs: Vec<String>,
    pub pods: Vec<PodRecord>,
    /// Userspace dataplane or kernel WireGuard (older state files: userspace).
    #[serde(default)]
    pub backend: NodeBackend,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub name: String,
    pub ns: String,
    pub ips: Vec<IpAddr>,
}

impl State {
    /// The kubeconfig node `name`'s agent uses: its own bound ServiceAccount token on
    /// a real control plane, the testbed's (single) kubeconfig on the in-memory API.
    pub fn agent_kubeconfig(&self, name: &str) -> PathBuf {
        if self.control_plane.is_some() {
            self.dir.join("kubeconfigs").join(name)
        } else {
            self.kubeconfig.clone()
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Writes the state file atomically (temp file + rename).
    pub fn save(&self) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("state serializes");
        std::fs::write(&tmp, text + "\n")
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Write { path, source })
    }

    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// The prefix of all this testbed's namespace names.
    pub fn prefix(&self) -> String {
        format!("{NETNS_PREFIX}{}-", self.id)
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pods(&self) -> impl Iterator<Item = (&NodeRecord, &PodRecord)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n, p)))
    }
}

/// Ids of the testbeds with a directory under the state root.
pub fn list_ids() -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(state_root())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// The testbed `id` names, or the only one there is.
pub fn resolve(id: Option<&str>) -> Result<State, StateError> {
    let root = state_root();
    let id = match id {
        Some(id) => id.to_string(),
        None => {
            let ids = list_ids();
            match ids.len() {
                0 => return Err(StateError::NoneRunning(root)),
                1 => ids[0].clone(),
                n => {
                    return Err(StateError::Ambiguous {
                        n,
                        ids: ids.join(", "),
                    })
                }
            }
        }
    };
    let dir = root.join(&id);
    if !dir.join("state.json").exists() {
        return Err(StateError::NotFound {
            id,
            path: dir.join("state.json"),
        });
    }
    State::load(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `down --all` under one state root reaps an orphan (no owner, or an
    /// owner directory that is gone) and its own testbeds, never a live
    /// testbed of another root.
    #[test]
    fn a_testbed_is_owned_elsewhere_only_by_an_existing_other_directory() {
        let here = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let theirs = other.path().join("ab12");
        std::fs::create_dir(&theirs).unwrap();
        assert!(owned_elsewhere("ab12", here.path(), Some(&theirs)));
        // Ours, by the same path.
        let ours = here.path().join("ab12");
        assert!(!owned_elsewhere("ab12", here.path(), Some(&ours)));
        // Orphans: no owner recorded, or its directory is gone.
        assert!(!owned_elsewhere("ab12", here.path(), None));
        let gone = other.path().join("cd34");
        assert!(!owned_elsewhere("cd34", here.path(), Some(&gone)));
    }
}
