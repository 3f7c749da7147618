//! Route sync: extra prefixes behind nodes, carried by the mesh.
//!
//! Sources: admin-owned `MeshRoute` grants ([`grant`]) naming a prefix and
//! its gateway nodes, and, with `--bgp`, prefixes a node learned from the
//! fabric ([`bgp`]) inside a grant that lets that node learn them. Every
//! source goes through the one [`validate::Validator`]; the winner of each
//! prefix is chosen by [`gateway::Chooser`]; [`Router::apply`] puts the
//! result into a [`Plan`]: the prefix on the winner's peer (allowed IPs),
//! a route into the tunnel, and keepalives on candidate sessions so their
//! liveness can be seen.
//!
//! The mesh's own pod CIDRs are never touched here: they come from the API,
//! always win, and no grant or advertisement may overlap them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::mesh::{normalize_ips, Plan, Route};

pub mod gateway;
pub mod grant;
pub mod validate;

pub use gateway::{Candidate, Chooser, Liveness};
pub use grant::{Grant, Invalid};
pub use validate::{Advertised, Rejection, Validator};

/// Where a prefix came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A `MeshRoute`'s `gateways`.
    Static,
    /// Learned over BGP by the candidates, inside a `MeshRoute`'s `learn`.
    Learned,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Learned => "bgp",
        }
    }
}

/// One extra prefix as this node sees it, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixState {
    pub prefix: IpNet,
    /// The `MeshRoute` that grants it.
    pub grant: String,
    pub source: Source,
    /// Sorted by (priority, node).
    pub candidates: Vec<Candidate>,
    /// The node whose peer carries it here; `None` when this node is a
    /// gateway itself or no candidate was ever healthy.
    pub active: Option<String>,
    pub healthy: bool,
    /// This node is one of the gateways: it routes the prefix out itself.
    pub local_gateway: bool,
}

/// Something refused on the way to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The grant's name or the advertising node's.
    pub from: String,
    pub prefix: IpNet,
    pub reason: Rejection,
}

/// One pass's route sync result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Sorted by prefix.
    pub prefixes: Vec<PrefixState>,
    pub refused: Vec<Refused>,
    /// Prefixes routed into the tunnel on no peer (dropped): carried
    /// before, not now (the agent decides; see `agent::Agent`).
    pub held: Vec<IpNet>,
}

impl Outcome {
    /// Whether the agent must keep sampling liveness (a remote gateway
    /// could fail at any time).
    pub fn needs_probing(&self) -> bool {
        // (Held prefixes need no probing: nothing can carry them.)
        self.prefixes.iter().any(|p| !p.local_gateway)
    }

    /// Nodes that are candidates of any prefix.
    pub fn candidate_nodes(&self) -> BTreeSet<&str> {
        self.prefixes
            .iter()
            .flat_map(|p| p.candidates.iter().map(|c| c.node.as_str()))
            .collect()
    }

    /// Prefixes this node sends into the tunnel: those a remote gateway
    /// carries (or would, once one is healthy) and the held ones. Their
    /// traffic must never leave any other way (the bypass check).
    pub fn tunnel_prefixes(&self) -> Vec<IpNet> {
        let mut out: Vec<IpNet> = self
            .prefixes
            .iter()
            .filter(|p| !p.local_gateway)
            .map(|p| p.prefix)
            .chain(self.held.iter().copied())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// The route sync state an agent keeps across passes.
#[derive(Debug, Default)]
pub struct Router {
    pub chooser: Chooser,
    pub liveness: Liveness,
}

impl Router {
    /// Validates every source and picks each prefix's gateway.
    ///
    /// `learned` maps an advertising node to what it advertises (already
    /// resolved next hops); `healthy(node)` is the Node-Ready-and-session-alive
    /// test.
    pub fn decide(
        &mut self,
        now: Instant,
        local_node: &str,
        validator: &Validator,
        grants: &[Grant],
        learned: &BTreeMap<String, Vec<Advertised>>,
        healthy: impl Fn(&str) -> bool,
    ) -> Outcome {
        let mut out = Outcome::default();
        let (kept, rejected) = validator.grants(grants);
        for (g, reason) in rejected {
            out.refused.push(Refused {
                from: g.name.clone(),
                prefix: g.prefix,
                reason,
            });
        }

        // prefix -> (grant, source, candidates, failback)
        let mut wanted: BTreeMap<IpNet, (&Grant, Source, Vec<Candidate>)> = BTreeMap::new();
        for g in &kept {
            if g.gateways.is_empty() {
                continue;
            }
            let cands = g
                .gateways
                .iter()
                .map(|gw| Candidate {
                    priority: gw.priority,
                    node: gw.node.clone(),
                })
                .collect();
            wanted.insert(g.prefix, (g, Source::Static, cands));
        }
        for (node, adverts) in learned {
            let (ok, bad) = validator.learned(node, &kept, adverts);
            for (a, reason) in bad {
                out.refused.push(Refused {
                    from: a.node,
                    prefix: a.prefix,
                    reason,
                });
            }
            for (a, g) in ok {
                // A static grant of exactly this prefix already names its
                // gateways: learning it adds nothing.
                let entry = wanted
                    .entry(a.prefix)
                    .or_insert_with(|| (g, Source::Learned, Vec::new()));
                if entry.1 != Source::Learned {
                    continue;
                }
                let priority = g.learn.as_ref().map_or(100, |l| l.priority);
                entry.2.push(Candidate {
                    priority,
                    node: a.node.clone(),
                });
            }
        }

        self.chooser.retain(|p| wanted.contains_key(p));
        for (prefix, (g, source, mut candidates)) in wanted {
            candidates.sort();
            candidates.dedup();
            let local_gateway = candidates.iter().any(|c| c.node == local_node);
            let (active, healthy_now) = if local_gateway {
                (None, true)
            } else {
                let choice = self
                    .chooser
                    .choose(now, prefix, &candidates, g.failback, &healthy);
                (choice.active, choice.healthy)
            };
            out.prefixes.push(PrefixState {
                prefix,
                grant: g.name.clone(),
                source,
                candidates,
                active,
                healthy: healthy_now,
                local_gateway,
            });
        }
        out
    }

    /// Puts `outcome` into `plan`: each remote-gateway prefix on its active
    /// node's peer and routed into the plan's interface (the route stays when
    /// no candidate is alive, so the prefix is dropped by cryptokey routing
    /// rather than sent elsewhere), each held prefix routed there on no
    /// peer, and, on a gateway, a keepalive of at most
    /// [`gateway::GATEWAY_KEEPALIVE`] toward every peer so that each of them
    /// sees the gateway's session alive (see there why only the gateway).
    pub fn apply(outcome: &Outcome, plan: &mut Plan) {
        let Some(interface) = plan.routes.first().map(|r| r.interface.clone()) else {
            // No cluster route, no interface to route into: nothing carried.
            return;
        };
        if outcome.prefixes.iter().any(|p| p.local_gateway) {
            for peer in &mut plan.peers {
                let k = &mut peer.config.persistent_keepalive;
                *k = Some(k.map_or(gateway::GATEWAY_KEEPALIVE, |k| {
                    k.min(gateway::GATEWAY_KEEPALIVE)
                }));
            }
        }
        for p in outcome.prefixes.iter().filter(|p| !p.local_gateway) {
            if let Some(active) = &p.active {
                if let Some(peer) = plan.peers.iter_mut().find(|peer| &peer.node == active) {
                    peer.config.allowed_ips.push(p.prefix);
                    normalize_ips(&mut peer.config.allowed_ips);
                }
            }
            plan.routes.push(Route {
                destination: p.prefix,
                interface: interface.clone(),
            });
        }
        for held in &outcome.held {
            plan.routes.push(Route {
                destination: *held,
                interface: interface.clone(),
            });
        }
        plan.routes.sort();
        plan.routes.dedup();
    }
}

/// How often the agent samples liveness while some prefix has remote
/// gateways: a third of [`gateway::DEAD_AFTER`], so a dead gateway is seen
/// within about that time.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests;

pub mod bgp;

/// A Node's `wgmesh.dev/learned-prefixes` as advertisements of `node`, and
/// the entries that are not canonical CIDRs (each named, for a log line; a
/// bad entry drops only itself). At most [`validate::DEFAULT_CAP`] + 1
/// entries are read: more is refused as a whole by the validator anyway.
pub fn learned_from_annotation(node: &str, text: &str) -> (Vec<Advertised>, Vec<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for entry in text
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .take(validate::DEFAULT_CAP + 1)
    {
        match entry.parse::<IpNet>() {
            Ok(net) if net.trunc() == net => out.push(Advertised {
                prefix: net,
                node: node.to_owned(),
                next_hop_node: Some(node.to_owned()),
            }),
            _ => bad.push(format!("{:?}", entry.chars().take(64).collect::<String>())),
        }
    }
    (out, bad)
}
