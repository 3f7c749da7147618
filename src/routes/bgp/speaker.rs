//! The agent's side of BGP mode (`wgmesh agent --bgp`): what to announce and
//! import, from the pass's route sync result, and keeping BIRD running with
//! that config.
//!
//! Per pass the agent:
//! 1. reads what BIRD learned ([`Speaker::learned`], table N over rtnetlink)
//!    and validates it as this node's own advertisement (the same validator
//!    every peer applies to it);
//! 2. renders the config ([`Speaker::config`]): this node's pod CIDRs and
//!    static gateway prefixes announced, an import prefix list of exactly
//!    the `MeshRoute` `learn` grants that name this node, and installs it
//!    ([`Speaker::apply`]), starting BIRD when its control socket does not
//!    answer (with recovery when table N already holds its routes, so a
//!    restart withdraws nothing) and reloading it when the file changed.
//!
//! BIRD runs as its own process (in its own session, so an agent restart
//! leaves it and its sessions alone); the agent finds it again by its
//! control socket.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::IpNet;

use super::config::{self, BgpConfig, ImportRule, Mesh, MeshSession, Neighbor, Password};
use super::engine::{self, Bird, BirdRoute, ProtocolStatus, Reconfigured, Spawn};
use super::table::{self, LearnedRoute, TableReader};
use crate::routes::{Advertised, Grant};

pub type Result<T, E = SpeakerError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("BGP config: {0}")]
    Config(#[from] config::ConfigError),
    #[error("BIRD: {0}")]
    Engine(#[from] engine::EngineError),
    #[error("reading BIRD's kernel table: {0}")]
    Table(#[from] table::TableError),
    #[error("--bgp-password-file {path}: {source}")]
    Password {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--bgp needs {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("cannot create {path} for BIRD's config, socket or log: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `--bgp-neighbor ADDR=AS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborSpec {
    pub address: IpAddr,
    pub remote_as: u32,
}

impl std::str::FromStr for NeighborSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (addr, asn) = s
            .trim()
            .rsplit_once('=')
            .ok_or_else(|| format!("{s:?}: expected ADDRESS=AS, e.g. 192.0.2.254=64600"))?;
        let address = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let remote_as =
            asn.parse().ok().filter(|a| *a != 0).ok_or_else(|| {
                format!("{s:?}: {asn:?} is not an AS number from 1 to 4294967295")
            })?;
        Ok(NeighborSpec { address, remote_as })
    }
}

/// `wgmesh agent --bgp …`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub local_as: u32,
    /// `None`: the node's first IPv4 address (InternalIP or endpoint).
    pub router_id: Option<Ipv4Addr>,
    pub neighbors: Vec<NeighborSpec>,
    /// A file holding the TCP-MD5 key of every session (read at start).
    pub password_file: Option<PathBuf>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub table: u32,
    pub max_prefixes: u32,
    /// Start BIRD when its control socket does not answer.
    pub spawn: bool,
    /// BIRD's stderr, when the agent starts it.
    pub log_file: Option<PathBuf>,
    /// The iBGP mesh between the nodes (`--bgp-mesh`).
    pub mesh: Option<MeshSettings>,
}

/// `--bgp-mesh [--bgp-route-reflectors N,...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshSettings {
    /// Empty: a full mesh. Else the nodes that reflect routes: each has a
    /// session with every node, every other node with them only.
    pub reflectors: BTreeSet<String>,
    /// The WireGuard interface (the tunnel addresses live on it).
    pub interface: String,
}

/// Another node as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshNode {
    pub name: String,
    /// Its tunnel addresses (pod gateway addresses), at most one per family.
    pub tunnel: Vec<IpAddr>,
}

/// BGP mode's state across passes.
pub struct Speaker {
    settings: Settings,
    bird: Bird,
    password: Option<Password>,
    /// The BIRD this agent started, reaped when it exits.
    child: Option<std::process::Child>,
    /// Mesh protocol name -> node, of the config last applied.
    mesh_protocols: BTreeMap<String, String>,
}

/// What [`Speaker::apply`] did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The config file changed (and BIRD was reloaded or started with it).
    pub changed: bool,
    /// BIRD was started by this call.
    pub started: bool,
    /// Every BGP session and its state.
    pub sessions: Vec<ProtocolStatus>,
}

impl Speaker {
    pub fn new(settings: Settings) -> Result<Speaker> {
        if settings.local_as == 0 {
            return Err(SpeakerError::Missing(
                "--bgp-local-as (this node's AS number)",
            ));
        }
        if settings.mesh.is_some() {
            if let Some(n) = settings
                .neighbors
                .iter()
                .find(|n| n.remote_as == settings.local_as)
            {
                return Err(SpeakerError::Conflict(format!(
                    "--bgp-neighbor {}={}: an iBGP fabric neighbor (AS {} is this node's, --bgp-local-as) does not work with --bgp-mesh: what it sends is iBGP-learned, which the mesh does not pass on; give the fabric a different AS",
                    n.address, n.remote_as, settings.local_as
                )));
            }
        }
        if settings.neighbors.is_empty() && settings.mesh.is_none() {
            return Err(SpeakerError::Missing(
                "at least one --bgp-neighbor ADDRESS=AS (a fabric router), or --bgp-mesh",
            ));
        }
        let password = match &settings.password_file {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SpeakerError::Password {
                        path: path.clone(),
                        source,
                    })?;
                Some(Password::new(text.trim_end_matches(['\n', '\r'])))
            }
        };
        // The config, socket and log directories (normally /run/wgmesh),
        // private: the config may hold the TCP-MD5 key.
        for path in [
            Some(&settings.config),
            Some(&settings.socket),
            settings.log_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                use std::os::unix::fs::DirBuilderExt as _;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| SpeakerError::Dir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
        }
        let bird = Bird::new(&settings.config, &settings.socket);
        Ok(Speaker {
            settings,
            bird,
            password,
            child: None,
            mesh_protocols: BTreeMap::new(),
        })
    }

    /// The `--bgp-route-reflectors` that name no node `known` accepts (a
    /// typo leaves every other node without a session).
    pub fn unknown_reflectors(&self, known: impl Fn(&str) -> bool) -> Vec<String> {
        self.settings
            .mesh
            .iter()
            .flat_map(|m| m.reflectors.iter())
            .filter(|r| !known(r))
            .cloned()
            .collect()
    }

    /// What reads the mesh's sessions and routes from BIRD
    /// ([`MeshReader::read`], a blocking call); `None` without
    /// `--bgp-mesh`.
    pub fn mesh_reader(&self) -> Option<MeshReader> {
        let mesh = self.settings.mesh.as_ref()?;
        Some(MeshReader {
            bird: self.bird.clone(),
            protocols: self.mesh_protocols.clone(),
            reflectors: mesh.reflectors.clone(),
        })
    }

    pub fn table(&self) -> u32 {
        self.settings.table
    }

    /// The routes BIRD put into table N.
    pub async fn learned(&self) -> Result<Vec<LearnedRoute>> {
        Ok(TableReader::connect()?
            .bird_routes(self.settings.table)
            .await?)
    }

    /// The config for this pass. `node_ips`: this node's own addresses (the
    /// router ID's fallback); `export`: its pod CIDRs and the prefixes it
    /// is a static gateway for; `grants`: the valid MeshRoutes (their
    /// `learn` parts naming `node` become the import list); with
    /// `--bgp-mesh`, `tunnel`: this node's tunnel addresses and `others`:
    /// every other admitted node's.
    pub fn config(
        &self,
        node: &str,
        node_ips: &[IpAddr],
        export: &[IpNet],
        grants: &[&Grant],
        tunnel: &[IpAddr],
        others: &[MeshNode],
    ) -> Result<BgpConfig> {
        let router_id = self
            .settings
            .router_id
            .or_else(|| {
                node_ips.iter().find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
            })
            .ok_or(SpeakerError::Missing(
                "--bgp-router-id: this node has no IPv4 address to use as its BGP identifier",
            ))?;
        let mut c = BgpConfig::new(router_id, self.settings.local_as, self.settings.table);
        c.max_prefixes = Some(self.settings.max_prefixes);
        c.neighbors = self
            .settings
            .neighbors
            .iter()
            .map(|n| Neighbor {
                name: n.address.to_string().replace(':', "-"),
                address: n.address,
                remote_as: n.remote_as,
                local_address: None,
                password: self.password.clone(),
                multihop: false,
            })
            .collect();
        let mut export: Vec<IpNet> = export.iter().map(IpNet::trunc).collect();
        export.sort_unstable();
        export.dedup();
        c.export = export;
        c.import = learn_rules(grants, |nodes| nodes.contains(node));
        if let Some(mesh) = &self.settings.mesh {
            c.mesh = Some(mesh_config(
                mesh,
                node,
                tunnel,
                others,
                grants,
                c.max_prefixes,
            ));
        }
        Ok(c)
    }

    /// Makes BIRD run `config`: installs the file (only when it changed),
    /// starts BIRD if its control socket does not answer (and
    /// [`Settings::spawn`]), else reloads it after a change; then reads the
    /// sessions. Blocking (subprocesses, each bounded).
    pub fn apply(&mut self, config: &BgpConfig, table_has_routes: bool) -> Result<Applied> {
        let text = config::render(config)?;
        let mut applied = Applied {
            changed: self.bird.install(&text)?,
            ..Applied::default()
        };
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::warn!(%status, "the BIRD this agent started exited; starting it again");
                self.child = None;
            }
        }
        if !self.bird.is_up() {
            if !self.settings.spawn {
                return Err(SpeakerError::Engine(engine::EngineError::Failed {
                    command: "birdc".into(),
                    status: "no answer".into(),
                    output: format!(
                        "no BIRD answers on {} (start it, or drop --bgp-no-spawn)",
                        self.settings.socket.display()
                    ),
                }));
            }
            let child = self.bird.spawn(&Spawn {
                pid_file: None,
                // Routes of an earlier BIRD in the table: a restart, keep
                // them until the sessions converge.
                recovery: table_has_routes,
                netns: None,
                log_file: self.settings.log_file.clone(),
                ready_timeout: std::time::Duration::ZERO,
                detach: true,
            })?;
            // BIRD outlives the agent (its own process group); while the
            // agent runs it is reaped by the next apply if it exits.
            self.child = Some(child);
            applied.started = true;
        } else if applied.changed {
            match self.bird.configure()? {
                Reconfigured::Done | Reconfigured::InProgress | Reconfigured::Unchanged => {}
            }
        }
        self.mesh_protocols = config
            .mesh
            .as_ref()
            .map(|m| {
                config::mesh_protocol_names(&m.sessions)
                    .into_iter()
                    .zip(m.sessions.iter().map(|s| s.node.clone()))
                    .collect()
            })
            .unwrap_or_default();
        applied.sessions = self.bird.sessions()?;
        Ok(applied)
    }
}

/// The `learn` grants naming `node` as import rules, sorted.
fn learn_rules(
    grants: &[&Grant],
    mut names: impl FnMut(&BTreeSet<String>) -> bool,
) -> Vec<ImportRule> {
    let mut rules: Vec<ImportRule> = grants
        .iter()
        .filter_map(|g| {
            let learn = g.learn.as_ref()?;
            names(&learn.nodes).then_some(ImportRule {
                prefix: g.prefix,
                max_len: learn.max_length,
            })
        })
        .collect();
    rules.sort_by_key(|r| (r.prefix, r.max_len));
    rules.dedup();
    rules
}

/// The mesh sessions of `node`: with every other node (full mesh), or, with
/// route reflectors, a reflector's with every node (the non-reflectors its
/// clients) and a non-reflector's with the reflectors. One per family both
/// ends have a tunnel address of.
///
/// From a non-reflector only its own `learn` grants are imported, with its
/// own address as next hop, and at most `max_prefixes`. From a reflector
/// every node's grants, any learner's next hop, and `max_prefixes` for
/// each node of the mesh (it carries everyone's). A reflector sends every
/// path of a prefix (ADD-PATH) to its clients and the other reflectors,
/// which receive them all: without it, of two learners of one prefix only
/// the reflector's best would reach the clients, and the mesh's word would
/// then drop the other as a gateway.
pub fn mesh_config(
    mesh: &MeshSettings,
    node: &str,
    tunnel: &[IpAddr],
    others: &[MeshNode],
    grants: &[&Grant],
    max_prefixes: Option<u32>,
) -> Mesh {
    let reflectors = &mesh.reflectors;
    let full = reflectors.is_empty();
    let i_reflect = reflectors.contains(node);
    let every = learn_rules(grants, |_| true);
    let mut others: Vec<&MeshNode> = others.iter().filter(|o| o.name != node).collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    let nodes = u32::try_from(others.len() + 1).unwrap_or(u32::MAX);
    let mut sessions = Vec::new();
    for o in &others {
        let is_reflector = reflectors.contains(&o.name);
        if !(full || i_reflect || is_reflector) {
            continue;
        }
        for local in tunnel {
            let Some(address) = o.tunnel.iter().find(|a| a.is_ipv4() == local.is_ipv4()) else {
                continue;
            };
            sessions.push(MeshSession {
                node: o.name.clone(),
                address: *address,
                local_address: *local,
                client: i_reflect && !is_reflector,
                import: if is_reflector {
                    every.clone()
                } else {
                    learn_rules(grants, |nodes| nodes.contains(&o.name))
                },
                own_routes_only: !is_reflector,
                max_prefixes: if is_reflector {
                    max_prefixes.map(|m| m.saturating_mul(nodes))
                } else {
                    max_prefixes
                },
                add_paths_rx: is_reflector,
                add_paths_tx: i_reflect,
            });
        }
    }
    Mesh {
        interface: mesh.interface.clone(),
        sessions,
        next_hops: others
            .iter()
            .flat_map(|o| o.tunnel.iter().copied())
            .collect(),
    }
}

/// Reads the mesh's routes from BIRD; see [`Speaker::mesh_reader`].
#[derive(Debug, Clone)]
pub struct MeshReader {
    bird: Bird,
    /// Mesh protocol -> node, of the config BIRD runs.
    protocols: BTreeMap<String, String>,
    reflectors: BTreeSet<String>,
}

/// What the mesh says other nodes learned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshView {
    /// Per advertising node.
    pub by_node: BTreeMap<String, Vec<Advertised>>,
    /// (node, IPv4?) whose session of that family with this one is
    /// Established: for them the mesh's word replaces their Node's
    /// annotation in that family (nothing heard is nothing learned).
    pub sessions_up: BTreeSet<(String, bool)>,
    /// Families (IPv4?) in which a session with a route reflector is
    /// Established: there the mesh's word stands for every node.
    pub covers_all: BTreeSet<bool>,
}

impl MeshView {
    /// Whether the mesh speaks for `node`'s prefixes of a family.
    pub fn covers(&self, node: &str, v4: bool) -> bool {
        self.covers_all.contains(&v4) || self.sessions_up.contains(&(node.to_owned(), v4))
    }

    /// Puts the mesh's word into `learned` (advertisements per node, from
    /// the Nodes' annotations), per family: where the mesh speaks for a
    /// node's family, what it heard replaces what the annotation said;
    /// elsewhere the annotation stands. `own`'s entry is left alone.
    pub fn apply_to(&self, learned: &mut BTreeMap<String, Vec<Advertised>>, own: &str) {
        let nodes: BTreeSet<String> = learned
            .keys()
            .chain(self.by_node.keys())
            .chain(self.sessions_up.iter().map(|(n, _)| n))
            .filter(|n| *n != own)
            .cloned()
            .collect();
        for n in nodes {
            let covered = |a: &Advertised| self.covers(&n, a.prefix.addr().is_ipv4());
            let mut adverts = learned.remove(&n).unwrap_or_default();
            adverts.retain(|a| !covered(a));
            adverts.extend(
                self.by_node
                    .get(&n)
                    .into_iter()
                    .flatten()
                    .filter(|a| covered(a))
                    .cloned(),
            );
            if !adverts.is_empty() {
                learned.insert(n, adverts);
            }
        }
    }
}

/// The family of a mesh protocol, by its name ([`config::MESH6_PREFIX`]).
fn protocol_is_v4(protocol: &str) -> bool {
    !protocol.starts_with(config::MESH6_PREFIX)
}

impl MeshReader {
    /// `owner(addr)`: the node whose tunnel address a next hop is. Reads
    /// the sessions' states and the routes now (two `birdc` calls,
    /// blocking and bounded), so a session that just went down speaks for
    /// no one.
    pub fn read(&self, own: &str, owner: impl Fn(IpAddr) -> Option<String>) -> Result<MeshView> {
        let established: BTreeSet<String> = self
            .bird
            .sessions()?
            .into_iter()
            .filter(ProtocolStatus::is_established)
            .map(|s| s.name)
            .collect();
        let routes = self.bird.mesh_routes()?;
        Ok(mesh_view(
            &routes,
            &self.protocols,
            &established,
            &self.reflectors,
            own,
            owner,
        ))
    }
}

/// The pure half of [`MeshReader::read`]. A route from a reflector's
/// session is the advertisement of the node its next hop belongs to (the
/// learner, reflected); any other session's is its own node's, with the
/// next hop's owner as the hop, which the validator requires to be that
/// node. Routes of sessions not established, of protocols not in the
/// config BIRD runs, and whose next hop is this node's own, are left out.
pub fn mesh_view(
    routes: &[BirdRoute],
    protocols: &BTreeMap<String, String>,
    established: &BTreeSet<String>,
    reflectors: &BTreeSet<String>,
    own: &str,
    owner: impl Fn(IpAddr) -> Option<String>,
) -> MeshView {
    let mut view = MeshView::default();
    for (proto, node) in protocols {
        if established.contains(proto) {
            let v4 = protocol_is_v4(proto);
            view.sessions_up.insert((node.clone(), v4));
            if reflectors.contains(node) {
                view.covers_all.insert(v4);
            }
        }
    }
    for r in routes {
        let Some(session) = protocols.get(&r.protocol) else {
            continue;
        };
        if !established.contains(&r.protocol) {
            continue;
        }
        let hop = r.next_hop.and_then(&owner);
        if hop.as_deref() == Some(own) {
            continue;
        }
        let node = match &hop {
            Some(h) if reflectors.contains(session) => h.clone(),
            _ => session.clone(),
        };
        view.by_node
            .entry(node.clone())
            .or_default()
            .push(Advertised {
                prefix: r.prefix,
                node,
                next_hop_node: hop,
            });
    }
    for adverts in view.by_node.values_mut() {
        adverts.sort_by(|a, b| (a.prefix, &a.next_hop_node).cmp(&(b.prefix, &b.next_hop_node)));
        adverts.dedup();
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> Settings {
        Settings {
            local_as: 64512,
            router_id: None,
            neighbors: vec!["192.0.2.254=64600".parse().unwrap()],
            password_file: None,
            config: std::env::temp_dir().join("wgmesh-speaker-test/bird.conf"),
            socket: std::env::temp_dir().join("wgmesh-speaker-test/bird.ctl"),
            table: 187,
            max_prefixes: 100,
            spawn: false,
            log_file: None,
            mesh: None,
        }
    }

    #[test]
    fn neighbor_flags_name_what_is_wrong() {
        let n: NeighborSpec = "2001:db8::fe=64600".parse().unwrap();
        assert_eq!(n.remote_as, 64600);
        for (bad, says) in [
            ("192.0.2.254", "ADDRESS=AS"),
            ("nohost=1", "not an IP address"),
            ("192.0.2.254=0", "AS number"),
            ("192.0.2.254=x", "AS number"),
        ] {
            let e = bad.parse::<NeighborSpec>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_import_list_is_exactly_the_learn_grants_naming_this_node() {
        let s = Speaker::new(settings()).unwrap();
        let grant = |name: &str, prefix: &str, nodes: &[&str]| {
            crate::routes::grant::decode(&json!({"metadata": {"name": name}, "spec": {
                "prefix": prefix, "learn": {"nodes": nodes, "maxLength": 26}}}))
            .unwrap()
        };
        let gs = [
            grant("a", "198.51.100.0/24", &["n1"]),
            grant("b", "203.0.113.0/24", &["n2"]),
        ];
        let refs: Vec<&Grant> = gs.iter().collect();
        let c = s
            .config(
                "n1",
                &["2001:db8::1".parse().unwrap(), "192.0.2.1".parse().unwrap()],
                &["10.244.1.0/24".parse().unwrap()],
                &refs,
                &[],
                &[],
            )
            .unwrap();
        assert_eq!(c.router_id, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(c.import.len(), 1);
        assert_eq!(
            c.import[0].prefix,
            "198.51.100.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(c.import[0].max_len, 26);
        assert_eq!(c.export, ["10.244.1.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(c.neighbors[0].name, "192.0.2.254");
        config::validate(&c).unwrap();
        // No IPv4 address and no --bgp-router-id: an error naming the flag.
        let e = s.config("n1", &[], &[], &refs, &[], &[]).unwrap_err();
        assert!(e.to_string().contains("--bgp-router-id"), "{e}");
    }

    #[test]
    fn an_ibgp_fabric_neighbor_with_the_mesh_is_refused() {
        let mut s = settings();
        s.neighbors = vec!["192.0.2.254=64512".parse().unwrap()];
        assert!(Speaker::new(s.clone()).is_ok());
        s.mesh = Some(MeshSettings::default());
        let e = Speaker::new(s).err().unwrap().to_string();
        assert!(
            e.contains("--bgp-neighbor 192.0.2.254=64512") && e.contains("--bgp-mesh"),
            "{e}"
        );
    }

    #[test]
    fn bgp_without_as_or_neighbors_is_refused_by_name() {
        let mut s = settings();
        s.local_as = 0;
        assert!(Speaker::new(s)
            .err()
            .unwrap()
            .to_string()
            .contains("--bgp-local-as"));
        let mut s = settings();
        s.neighbors.clear();
        assert!(Speaker::new(s)
            .err()
            .unwrap()
            .to_string()
            .contains("--bgp-neighbor"));
    }

    fn learn_grant(name: &str, prefix: &str, nodes: &[&str]) -> Grant {
        crate::routes::grant::decode(&json!({"metadata": {"name": name}, "spec": {
            "prefix": prefix, "learn": {"nodes": nodes, "maxLength": 24}}}))
        .unwrap()
    }

    fn mesh_node(name: &str, v4: &str, v6: Option<&str>) -> MeshNode {
        let mut tunnel = vec![v4.parse().unwrap()];
        tunnel.extend(v6.map(|a| a.parse::<IpAddr>().unwrap()));
        MeshNode {
            name: name.into(),
            tunnel,
        }
    }

    #[test]
    fn the_mesh_is_full_or_goes_through_the_reflectors() {
        let gs = [
            learn_grant("a", "203.0.113.0/24", &["n1"]),
            learn_grant("b", "198.51.100.0/24", &["n3"]),
        ];
        let grants: Vec<&Grant> = gs.iter().collect();
        let others = [
            mesh_node("n1", "10.244.1.1", Some("fd00:244:1::1")),
            mesh_node("n3", "10.244.3.1", None),
            mesh_node("n4", "10.244.4.1", None),
        ];
        let own: Vec<IpAddr> = vec![
            "10.244.2.1".parse().unwrap(),
            "fd00:244:2::1".parse().unwrap(),
        ];
        let mut settings = MeshSettings {
            reflectors: BTreeSet::new(),
            interface: "wgmesh0".into(),
        };
        // Full mesh: a session per node and shared family, importing only
        // what that node may learn.
        let m = mesh_config(&settings, "n2", &own, &others, &grants, Some(100));
        let peers: Vec<(&str, String, bool)> = m
            .sessions
            .iter()
            .map(|s| (s.node.as_str(), s.address.to_string(), s.client))
            .collect();
        assert_eq!(
            peers,
            [
                ("n1", "10.244.1.1".to_string(), false),
                ("n1", "fd00:244:1::1".to_string(), false),
                ("n3", "10.244.3.1".to_string(), false),
                ("n4", "10.244.4.1".to_string(), false),
            ]
        );
        assert_eq!(m.sessions[0].local_address.to_string(), "10.244.2.1");
        assert_eq!(
            m.sessions[0].import,
            [ImportRule::exact("203.0.113.0/24".parse().unwrap())]
        );
        assert!(m.sessions[3].import.is_empty());
        assert!(m.sessions.iter().all(|s| s.own_routes_only
            && s.max_prefixes == Some(100)
            && !s.add_paths_rx
            && !s.add_paths_tx));
        assert_eq!(m.next_hops.len(), 4);
        // n2 reflects: every node is its client.
        settings.reflectors = ["n2".to_string(), "n4".to_string()].into();
        let m = mesh_config(&settings, "n2", &own, &others, &grants, Some(100));
        let clients: Vec<(&str, bool)> = m
            .sessions
            .iter()
            .map(|s| (s.node.as_str(), s.client))
            .collect();
        assert_eq!(
            clients,
            [("n1", true), ("n1", true), ("n3", true), ("n4", false)]
        );
        // From the other reflector every node's grants are imported, any
        // learner's next hop, room for every node's routes, every path.
        let r = &m.sessions[3];
        assert_eq!(r.import.len(), 2);
        assert!(!r.own_routes_only && r.add_paths_rx && r.add_paths_tx);
        assert_eq!(r.max_prefixes, Some(400));
        // To its clients it sends every path; they send only their own.
        assert!(m.sessions[0].add_paths_tx && !m.sessions[0].add_paths_rx);
        assert!(m.sessions[0].own_routes_only);
        // n3 is no reflector: sessions with the reflectors only.
        let m = mesh_config(&settings, "n3", &own[..1], &others, &grants, Some(100));
        let with: Vec<&str> = m.sessions.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(with, ["n4"]);
        assert!(m.sessions[0].add_paths_rx && !m.sessions[0].add_paths_tx);
        config::validate(&BgpConfig {
            mesh: Some(m),
            ..BgpConfig::new("192.0.2.1".parse().unwrap(), 64512, 187)
        })
        .unwrap();
    }

    #[test]
    fn the_mesh_view_names_the_learner_and_covers_only_live_sessions() {
        let route = |proto: &str, prefix: &str, hop: &str| BirdRoute {
            prefix: prefix.parse().unwrap(),
            protocol: proto.into(),
            next_hop: Some(hop.parse().unwrap()),
        };
        let owner = |a: IpAddr| {
            let s = a.to_string();
            ["n1", "n2", "n3", "n4"]
                .into_iter()
                .find(|n| s == format!("10.244.{}.1", &n[1..]))
                .map(String::from)
        };
        let protocols: BTreeMap<String, String> =
            [("mesh_n1", "n1"), ("mesh_n3", "n3"), ("mesh_n4", "n4")]
                .into_iter()
                .map(|(p, n)| (p.to_string(), n.to_string()))
                .collect();
        let routes = [
            route("mesh_n1", "203.0.113.0/24", "10.244.1.1"),
            // n3 claims a next hop of n1's: kept as n3's, hop n1 (refused later).
            route("mesh_n3", "198.51.100.0/24", "10.244.1.1"),
            // Reflected by n4: n1's route, heard from n4.
            route("mesh_n4", "192.0.2.0/24", "10.244.1.1"),
            // Our own route reflected back: ignored.
            route("mesh_n4", "192.0.2.128/25", "10.244.2.1"),
            route("bgp_fabric", "10.0.0.0/8", "10.244.1.1"),
        ];
        let established: BTreeSet<String> =
            ["mesh_n1", "mesh_n3", "mesh_n4"].map(String::from).into();
        let none = BTreeSet::new();
        let v = mesh_view(&routes, &protocols, &established, &none, "n2", owner);
        assert!(v.covers("n1", true) && v.covers("n3", true) && !v.covers("n5", true));
        assert!(!v.covers("n1", false) && v.covers_all.is_empty());
        assert_eq!(v.by_node["n1"].len(), 1);
        assert_eq!(v.by_node["n3"][0].next_hop_node.as_deref(), Some("n1"));
        // Without reflectors, n4's session carries n4's routes: the reflected one is n4's, hop n1.
        assert_eq!(v.by_node["n4"][0].next_hop_node.as_deref(), Some("n1"));
        let reflectors: BTreeSet<String> = ["n4".to_string()].into();
        let v = mesh_view(&routes, &protocols, &established, &reflectors, "n2", owner);
        assert!(v.covers("n5", true) && !v.covers("n5", false));
        let n1: Vec<String> = v.by_node["n1"]
            .iter()
            .map(|a| a.prefix.to_string())
            .collect();
        assert_eq!(n1, ["192.0.2.0/24", "203.0.113.0/24"]);
        assert!(!v.by_node.contains_key("n4"));
        // A session that is down covers nothing and brings nothing.
        let only_n1: BTreeSet<String> = ["mesh_n1".to_string()].into();
        let v = mesh_view(&routes, &protocols, &only_n1, &reflectors, "n2", owner);
        assert!(v.covers_all.is_empty() && !v.covers("n3", true));
        assert_eq!(v.by_node.keys().collect::<Vec<_>>(), ["n1"]);

        // Applied to the annotations: n1's IPv4 is the mesh's word, its
        // IPv6 and n3's (session down) stay as the Nodes say.
        let advert = |node: &str, prefix: &str| Advertised {
            prefix: prefix.parse().unwrap(),
            node: node.into(),
            next_hop_node: Some(node.into()),
        };
        let mut learned: BTreeMap<String, Vec<Advertised>> = [
            (
                "n1",
                vec![advert("n1", "198.18.0.0/24"), advert("n1", "2001:db8::/48")],
            ),
            ("n3", vec![advert("n3", "198.18.1.0/24")]),
            ("n2", vec![advert("n2", "198.18.2.0/24")]),
        ]
        .into_iter()
        .map(|(n, a)| (n.to_string(), a))
        .collect();
        v.apply_to(&mut learned, "n2");
        let prefixes =
            |n: &str| -> Vec<String> { learned[n].iter().map(|a| a.prefix.to_string()).collect() };
        assert_eq!(prefixes("n1"), ["2001:db8::/48", "203.0.113.0/24"]);
        assert_eq!(prefixes("n3"), ["198.18.1.0/24"]);
        assert_eq!(prefixes("n2"), ["198.18.2.0/24"]);
    }
}
