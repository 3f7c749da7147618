//! The pure planner: validated Node records plus local configuration in, the
//! WireGuard peers and routes this node should have out; and the minimal diff
//! between what a device has and what the plan wants.
//!
//! No I/O and no clock: [`plan`], [`diff`] and [`apply`] are plain functions of
//! their arguments, so the agent can log a plan before applying it, tests need no
//! device, and agents looking at the same Nodes agree on every conflict they are
//! not party to.
//!
//! The safety property everything here serves: pod traffic to another node either
//! goes through that node's WireGuard peer or is dropped; it never leaves in
//! plaintext and never reaches a node that merely *claims* someone else's pod
//! CIDRs or key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::keys::PublicKey;
use crate::node::{NodeRecord, Rejected};

mod diff;
mod plan;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use diff::{apply, diff, keep_roamed_endpoints, PeerChange};
pub use plan::plan;
pub use plan::{SuccessorConflict, SuccessorIgnored};

/// What the local agent knows that the Node objects do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    /// `metadata.name` of the Node this agent runs on; that Node is never a peer.
    pub local_node: String,
    /// The WireGuard interface the cluster routes point at (`wgmesh0`).
    pub interface: String,
    /// The whole cluster pod CIDR, normally one per address family. Every peer's
    /// pod CIDRs must lie inside one of these (otherwise no route would send their
    /// traffic into the tunnel), and each gets one route to [`Self::interface`].
    pub cluster_cidrs: Vec<IpNet>,
    /// Keepalive for peers whose Node sets no `persistent-keepalive`; `None` or
    /// `Some(0)` is off.
    pub default_keepalive: Option<u16>,
    /// This node's active public key as the key store holds it. When `Some`, it
    /// is what remote nodes are checked against ([`Exclusion::SameKeyAsLocal`]),
    /// not the `public-key` annotation on the local Node: that is only the API
    /// cache's copy, which may be stale or (if someone copied another node's
    /// value onto it) name another node's key, and planning from it would drop
    /// that node's peer until the agent's own re-publish comes back. `None`
    /// falls back to the annotation (tools that only read Nodes).
    pub local_public_key: Option<PublicKey>,
    /// The endpoint this node's agent publishes (its `--endpoint`,
    /// `force-endpoint` or InternalIP choice), for the same reason as
    /// [`Self::local_public_key`]; `None` falls back to the local record's.
    pub local_endpoint: Option<SocketAddr>,
    /// Peers this device has completed a handshake with, and the endpoint the
    /// device has for each: proof that whoever is at that endpoint holds the
    /// key's private half. It decides a public key that two Nodes announce: the
    /// one announcing that endpoint keeps the key, whatever the Nodes' ages — so
    /// a Node that copies another's public key onto itself (its agent's token
    /// may write its own `public-key`) never takes that node's peer. Empty, or
    /// no claimant proven: the older Node keeps it, as for every other conflict.
    /// The agent fills it only when a key is contested.
    pub handshakes: BTreeMap<PublicKey, SocketAddr>,
}

/// One peer as a WireGuard device sees it: what `wg show` reports and `wg set`
/// accepts, with nothing Kubernetes-specific in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// `None` in a desired peer means "no opinion": the device keeps whatever
    /// endpoint it has (possibly learnt by roaming). `None` in a device's state
    /// means it has none yet.
    pub endpoint: Option<SocketAddr>,
    /// Canonical (no host bits), sorted and deduplicated in everything this module
    /// produces; device state may come in any order, see [`PeerConfig::normalize`].
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` is off. `Some(0)` also means off on every device and is
    /// normalised to `None`.
    pub persistent_keepalive: Option<u16>,
    /// A key the device accepts as this same peer (same allowed IPs, same
    /// endpoint handling): the node's staged `next-public-key` during a key
    /// rotation. Only devices with successor support hold one (a wgmesh
    /// extension); `wg::reconcile` strips it for every other device.
    pub successor: Option<PublicKey>,
}

impl PeerConfig {
    /// Brings a peer as a device reported it into the form this module produces:
    /// allowed IPs truncated to their network, sorted and deduplicated, and a
    /// keepalive of 0 spelled `None`. [`diff`] does this itself; backends may call
    /// it to compare or display device state.
    pub fn normalize(&mut self) {
        normalize_ips(&mut self.allowed_ips);
        self.persistent_keepalive = normalize_keepalive(self.persistent_keepalive);
    }
}

/// A remote node admitted to the mesh, and the peer that represents it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// The Node's `metadata.name`, for logs, Events and `wgmesh status`.
    pub node: String,
    pub config: PeerConfig,
}

/// A route the host needs: `destination` via `interface`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub destination: IpNet,
    pub interface: String,
}

/// Why a remote node gets no peer, worded for a cluster operator reading an Event
/// or a log line of the form `node X excluded: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exclusion {
    /// Its `wgmesh.dev/` annotations (or `spec.podCIDRs`) failed validation.
    #[error("its wgmesh.dev/ annotations failed validation: {}", describe_errors(.0))]
    Invalid(Rejected),
    /// The same Node name appears more than once in the input with different
    /// contents. No entry can be trusted over the other, so none is used (a
    /// reflector keyed by name never produces this; it is here so that the output
    /// does not depend on input order).
    #[error(
        "it appears {entries} times in the node list with different contents, so none is trusted"
    )]
    AmbiguousName { entries: usize },
    /// It announces this node's own public key: a device cannot have itself as a
    /// peer, and the local node always keeps its own key.
    #[error("it announces this node's own WireGuard public key")]
    SameKeyAsLocal,
    /// Its endpoint is the local node's: a peer there would aim every handshake
    /// for it back at this node. The local node always keeps its own endpoint.
    #[error(
        "its endpoint {endpoint} is the endpoint of {local}, the node this agent runs on, \
         which keeps it whatever the ages; correct whichever of the two is wrong"
    )]
    SameEndpointAsLocal {
        endpoint: SocketAddr,
        /// The local node's name.
        local: String,
    },
    /// One of its pod CIDRs is outside every cluster CIDR: the cluster routes would
    /// not send that traffic into the tunnel, so it would leave unencrypted.
    #[error(
        "its pod CIDR {cidr} is outside the cluster CIDRs, so its traffic would bypass the tunnel"
    )]
    OutsideClusterCidrs { cidr: IpNet },
    /// One of its pod CIDRs overlaps the local node's pod CIDRs. The local node
    /// always keeps its own CIDRs, whatever the ages.
    #[error("its pod CIDR {cidr} overlaps this node's own pod CIDRs")]
    OverlapsLocal { cidr: IpNet },
    /// An older Node already holds its public key.
    #[error("its public key is already used by older node {kept}, which keeps it")]
    DuplicateKey {
        /// The older node that keeps the key.
        kept: String,
    },
    /// One of its pod CIDRs overlaps (contains or lies inside) a CIDR of an older
    /// admitted Node.
    #[error(
        "its pod CIDR {cidr} overlaps pod CIDR {kept_cidr} of older node {kept}, which keeps it"
    )]
    CidrOverlap {
        cidr: IpNet,
        kept: String,
        kept_cidr: IpNet,
    },
    /// Its endpoint (address and port) is already the endpoint of an older
    /// admitted Node. Only one host can receive there, so the peer would send
    /// this node's handshakes and traffic to the other one (a typo, a copied
    /// `force-endpoint`, or a node aiming its peers at a third node).
    #[error(
        "its endpoint {endpoint} is already the endpoint of older node {with}, which keeps it; \
         correct whichever of the two is wrong"
    )]
    EndpointConflict {
        endpoint: SocketAddr,
        /// The older node that keeps the endpoint.
        with: String,
    },
}

impl Exclusion {
    /// A short, bounded label for metrics: the variant, or for an invalid
    /// Node the first annotation (or field) that failed.
    pub fn kind(&self) -> String {
        match self {
            Exclusion::Invalid(r) => match r.errors.first() {
                Some(e) => format!("invalid {}", e.field),
                None => "invalid".into(),
            },
            Exclusion::AmbiguousName { .. } => "ambiguous-name".into(),
            Exclusion::SameKeyAsLocal => "same-key-as-local".into(),
            Exclusion::SameEndpointAsLocal { .. } => "same-endpoint-as-local".into(),
            Exclusion::OutsideClusterCidrs { .. } => "outside-cluster-cidrs".into(),
            Exclusion::OverlapsLocal { .. } => "overlaps-local".into(),
            Exclusion::DuplicateKey { .. } => "duplicate-key".into(),
            Exclusion::CidrOverlap { .. } => "cidr-overlap".into(),
            Exclusion::EndpointConflict { .. } => "endpoint-conflict".into(),
        }
    }
}

/// A remote node that gets no peer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    pub node: String,
    pub reason: Exclusion,
}

/// Everything the agent should make true on this node, from one set of Nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The local node's own record, when it is present and valid. `None` does not
    /// stop planning; it only means the checks against the local key and CIDRs
    /// could not run.
    pub local: Option<NodeRecord>,
    /// One per admitted remote node, sorted by public key.
    pub peers: Vec<DesiredPeer>,
    /// One per cluster CIDR, sorted by destination.
    pub routes: Vec<Route>,
    /// Every remote node that gets no peer, sorted by node name. The local node
    /// never appears here, even when its own record is invalid.
    pub excluded: Vec<Excluded>,
    /// A host route (/32, /128) for every node address of every remote Node in
    /// the input, admitted, excluded or invalid alike, minus the local node's
    /// own addresses (and its endpoint's) and anything inside a cluster or local
    /// pod CIDR; sorted, deduplicated. The agent routes these into the
    /// tunnel so that pod traffic to a node address is either encrypted to the
    /// peer whose allowed IPs hold it or dropped by cryptokey routing, never
    /// sent in plaintext because that node has no (valid) peer right now.
    ///
    /// These addresses are normally the remote nodes' WireGuard endpoints too:
    /// whatever routes them into the tunnel must exempt the tunnel's own UDP.
    pub node_routes: Vec<IpNet>,
    /// The local node's own node addresses (see [`NodeRecord::node_ips`]), from
    /// every entry with the local name, valid or not; sorted, deduplicated.
    pub local_node_ips: Vec<IpAddr>,
    /// Admitted nodes whose `next-public-key` was not made their peer's
    /// successor, and why (the node stays a peer under its current key; its
    /// rotation falls back to the hand-over when it activates). Sorted by
    /// node name.
    pub ignored_successors: Vec<SuccessorIgnored>,
}

impl Plan {
    /// The device-level view of [`Self::peers`], ready for [`diff`].
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers.iter().map(|p| p.config.clone()).collect()
    }
}

fn describe_errors(rejected: &Rejected) -> String {
    let parts: Vec<String> = rejected.errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// Truncates, sorts and deduplicates in place, without touching a list that is
/// already canonical (the common case: every list this module builds).
pub(crate) fn normalize_ips(ips: &mut Vec<IpNet>) {
    if !is_canonical(ips) {
        for ip in ips.iter_mut() {
            *ip = ip.trunc();
        }
        ips.sort_unstable();
        ips.dedup();
    }
}

fn is_canonical(ips: &[IpNet]) -> bool {
    ips.iter().all(|ip| ip.trunc() == *ip) && ips.windows(2).all(|w| w[0] < w[1])
}

fn normalize_keepalive(keepalive: Option<u16>) -> Option<u16> {
    keepalive.filter(|&seconds| seconds != 0)
}

/// True when one CIDR contains the other (for prefixes that is the only way two
/// can share an address). Different families never overlap.
pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}
