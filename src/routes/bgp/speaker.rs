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

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::IpNet;

use super::config::{self, BgpConfig, ImportRule, Neighbor, Password};
use super::engine::{self, Bird, ProtocolStatus, Reconfigured, Spawn};
use super::table::{self, LearnedRoute, TableReader};
use crate::routes::Grant;

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
}

/// BGP mode's state across passes.
pub struct Speaker {
    settings: Settings,
    bird: Bird,
    password: Option<Password>,
    /// The BIRD this agent started, reaped when it exits.
    child: Option<std::process::Child>,
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
        if settings.neighbors.is_empty() {
            return Err(SpeakerError::Missing(
                "at least one --bgp-neighbor ADDRESS=AS (a fabric router)",
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
    /// `learn` parts naming `node` become the import list).
    pub fn config(
        &self,
        node: &str,
        node_ips: &[IpAddr],
        export: &[IpNet],
        grants: &[&Grant],
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
        let mut import: Vec<ImportRule> = grants
            .iter()
            .filter_map(|g| {
                let learn = g.learn.as_ref()?;
                learn.nodes.contains(node).then_some(ImportRule {
                    prefix: g.prefix,
                    max_len: learn.max_length,
                })
            })
            .collect();
        import.sort_by_key(|r| (r.prefix, r.max_len));
        import.dedup();
        c.import = import;
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
        applied.sessions = self.bird.sessions()?;
        Ok(applied)
    }
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
        let e = s.config("n1", &[], &[], &refs).unwrap_err();
        assert!(e.to_string().contains("--bgp-router-id"), "{e}");
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
}
