//! What a Node object says about its WireGuard identity: [`NodeRecord`], and the
//! codec between it and the `wgmesh.dev/` annotations (see `codec`).
//!
//! Pure: works on k8s-openapi `Node` values, no API access. A Node whose
//! annotations fail validation yields a [`Rejected`] value naming the annotation
//! and the reason; it never panics.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use jiff::Timestamp;

use crate::keys::audit::AuditHead;
use crate::keys::PublicKey;

mod cache;
mod codec;

pub use cache::DecodeCache;
pub use codec::*;

/// Annotation keys (full names, including the `wgmesh.dev/` prefix).
pub mod annotations {
    pub const PUBLIC_KEY: &str = "wgmesh.dev/public-key";
    pub const KEY_GENERATION: &str = "wgmesh.dev/key-generation";
    pub const KEY_CREATED: &str = "wgmesh.dev/key-created";
    pub const NEXT_PUBLIC_KEY: &str = "wgmesh.dev/next-public-key";
    pub const ENDPOINT: &str = "wgmesh.dev/endpoint";
    pub const POD_CIDRS: &str = "wgmesh.dev/pod-cidrs";
    /// `<seq>:<sha256 hex>` of the node's audit log head (see
    /// `keys::audit::AuditHead`): what the other nodes witness. Informational
    /// for the mesh: a bad value never costs the node its peer.
    pub const AUDIT_HEAD: &str = "wgmesh.dev/audit-head";
    /// `<RFC 3339 time> <result>` of the node's last key activation:
    /// `all-confirmed`, or `unconfirmed=<n>` peers at the deadline or on a
    /// single-identity device. Informational (for `wgmesh keys inventory`);
    /// never validated by peers.
    pub const LAST_ROTATION: &str = "wgmesh.dev/last-rotation";
    /// Route sync's BGP mode: the prefixes this node learned from the
    /// fabric and its own validator accepted, comma-separated, canonical,
    /// sorted. Other agents accept each only inside a `MeshRoute` whose
    /// `learn.nodes` names this node (`crate::routes`); a bad entry costs
    /// the node nothing else.
    pub const LEARNED_PREFIXES: &str = "wgmesh.dev/learned-prefixes";
    /// Set by people, never by the agent: overrides `endpoint`.
    pub const FORCE_ENDPOINT: &str = "wgmesh.dev/force-endpoint";
    /// Set by people, never by the agent: seconds, 0 = off.
    pub const PERSISTENT_KEEPALIVE: &str = "wgmesh.dev/persistent-keepalive";
    /// Set by people, never by the agent: an RFC 3339 UTC time. The node's
    /// agent stages a key rotation once this is newer than its active key
    /// (after its share of `--rotation-stagger`, so annotating every Node at
    /// once rotates them one after another).
    pub const ROTATE_REQUESTED: &str = "wgmesh.dev/rotate-requested";

    /// The keys the agent writes on its own Node (and may remove).
    pub const AGENT_OWNED: &[&str] = &[
        PUBLIC_KEY,
        KEY_GENERATION,
        KEY_CREATED,
        NEXT_PUBLIC_KEY,
        ENDPOINT,
        POD_CIDRS,
        AUDIT_HEAD,
        LAST_ROTATION,
        LEARNED_PREFIXES,
    ];

    /// No annotation value may be longer than this (bytes).
    pub const MAX_VALUE_LEN: usize = 4096;
}

/// One remote (or the local) node's WireGuard identity, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.creationTimestamp`; the planner's conflict rule is "older Node
    /// wins" (ties broken by name). `None` sorts as newest.
    pub created: Option<Timestamp>,
    /// The active static public key (`public-key`).
    pub public_key: PublicKey,
    /// `key-generation`; 0 when the annotation is absent.
    pub key_generation: u64,
    /// `key-created`, when present.
    pub key_created: Option<Timestamp>,
    /// `next-public-key`: present only while a rotation is staged.
    pub next_public_key: Option<PublicKey>,
    /// Where peers send: `force-endpoint` if set, else `endpoint`.
    pub endpoint: SocketAddr,
    /// True when `endpoint` came from `force-endpoint`.
    pub endpoint_forced: bool,
    /// The pod CIDRs this node's peer is allowed: `spec.podCIDRs` when set (the
    /// annotation must then lie inside them), else the validated annotation.
    /// Canonical (no host bits), sorted, deduplicated.
    pub pod_cidrs: Vec<IpNet>,
    /// `persistent-keepalive` in seconds; `None` when absent or 0.
    pub persistent_keepalive: Option<u16>,
    /// The node's own addresses (`status.addresses` of type `InternalIP`) that
    /// can name it: unicast only, none inside a cluster pod CIDR; IPv4-mapped
    /// IPv6 written as IPv4. Sorted, deduplicated. See [`node_ips`].
    pub node_ips: Vec<IpAddr>,
    /// `audit-head`: the node's published audit head, for witnessing. `None`
    /// when absent *or unusable*: a bad head never costs the node its peer
    /// (it is evidence, not mesh configuration); [`audit_head`] gives the
    /// reason to log.
    pub audit_head: Option<AuditHead>,
}
