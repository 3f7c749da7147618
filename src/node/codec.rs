//! The codec between a Node's `wgmesh.dev/` annotations and a [`NodeRecord`].
//!
//! Every agent decodes every Node, and a Node's annotations can be written by
//! anyone with `patch nodes`: a bug, an operator's typo or an attacker. So
//! [`decode`] trusts nothing, never panics, and reports *every* problem of a Node
//! at once (an operator fixing one field per Event round trip would take ages).
//! [`encode`] and [`merge_patch`] are the other direction: what the agent writes
//! on its own Node, and only when a value actually changed.
//!
//! Text rules, the same for every field:
//! - surrounding ASCII whitespace of a value is ignored (YAML block scalars and
//!   hand-typed `kubectl annotate` commands add it), but inside a value the text
//!   must be canonical: the form the agent itself writes, so that every node reads
//!   the same value the same way and no two spellings of one value exist;
//! - `pod-cidrs` is a list separated by single commas; whitespace around each
//!   entry is ignored, an empty entry is an error, and the agent writes no spaces;
//! - integers are plain decimal digits (no sign), timestamps RFC 3339, endpoints
//!   `ip:port` / `[ipv6]:port` exactly as Rust's `SocketAddr` prints them, CIDRs
//!   with no host bits, as `ipnet` prints them (lower-case hex, no leading zeros).
//!
//! Unknown `wgmesh.dev/` keys are ignored, so that a newer agent can add keys
//! during a rolling upgrade without older agents rejecting its Node.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Map, Value};

use super::annotations::{self as ann, MAX_VALUE_LEN};
use super::NodeRecord;
use crate::keys::audit::{AuditHead, AuditHeadError};
use crate::keys::{KeyError, PublicKey};

/// Field name used in errors about the Node's own pod CIDR allocation.
pub const SPEC_POD_CIDRS: &str = "spec.podCIDRs";
/// Field name used when only the legacy single-valued `spec.podCIDR` is set.
pub const SPEC_POD_CIDR: &str = "spec.podCIDR";
/// Field name used when the Node has no name.
pub const METADATA_NAME: &str = "metadata.name";

/// Cluster-wide settings that validation needs beyond the Node itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationConfig {
    /// The cluster's pod CIDRs (one per family). Consulted only for Nodes whose
    /// `spec.podCIDRs` is empty (clusters where the controller manager does not
    /// allocate node CIDRs): then the node's own `pod-cidrs` claim is all there
    /// is, and it must at least stay inside the cluster's pod range, or a node
    /// could attract traffic for arbitrary addresses (the host network, other
    /// clusters) into its tunnel.
    pub cluster_cidrs: Vec<IpNet>,
}

/// Why one field of a Node was rejected. The text is meant for cluster
/// operators (it ends up in Kubernetes Events and logs) and says how to fix the
/// value where there is a fix. Echoed input is shortened and escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// A required annotation is absent.
    #[error(
        "required but not set; the wgmesh agent on that node publishes it at startup, \
         so unless the node has only just joined, check that the agent runs there"
    )]
    Missing,
    /// The object has no `metadata.name`.
    #[error(
        "the Node has no name; Nodes from the API server always have one, so whatever \
         built this object has a bug"
    )]
    NoName,
    /// The value is longer than [`MAX_VALUE_LEN`] bytes; it was not parsed.
    #[error(
        "value is {len} bytes, over the {}-byte limit for a wgmesh annotation; \
         no valid value is that long, so it was not parsed: correct or remove it",
        MAX_VALUE_LEN
    )]
    Oversized { len: usize },
    /// A public key that cannot be used (bad base64, not 32 bytes, all-zero,
    /// low-order point).
    #[error("not a usable WireGuard public key: {0}")]
    BadKey(KeyError),
    /// `next-public-key` repeats `public-key`.
    #[error(
        "equals wgmesh.dev/public-key; a staged rotation must announce a different key \
         (remove this annotation if no rotation is in progress)"
    )]
    NextKeyIsCurrent,
    /// Not a plain decimal `u64`.
    #[error(
        "{given:?} is not a whole number; write plain decimal digits from 0 to {}",
        u64::MAX
    )]
    NotAnInteger { given: String },
    /// Not an RFC 3339 timestamp.
    #[error("{given:?} is not an RFC 3339 time; write it like 2026-11-21T11:36:24Z")]
    BadTimestamp { given: String },
    /// A CIDR that does not parse.
    #[error(
        "{given:?} is not a CIDR; write address/prefix-length, \
         e.g. 10.244.1.0/24 or fd00:10:244:1::/64"
    )]
    BadCidr { given: String },
    /// An empty entry in the comma-separated `pod-cidrs` list.
    #[error(
        "has an empty entry (a doubled, leading or trailing comma); separate CIDRs with \
         single commas, e.g. 10.244.1.0/24,fd00:10:244:1::/64"
    )]
    EmptyListEntry,
    /// A CIDR with host bits set or not in canonical text form.
    #[error(
        "{given:?} is not in canonical form; write it as {canonical} (network address \
         without host bits, lower-case, no leading zeros) so every node reads it alike"
    )]
    NonCanonicalCidr { given: String, canonical: IpNet },
    /// A claimed CIDR not inside any of the Node's `spec.podCIDRs`.
    #[error(
        "{cidr} lies outside the node's spec.podCIDRs ({}); a node may only claim \
         addresses the cluster allocated to it, so remove it from the annotation",
        join(.allowed)
    )]
    CidrOutsidePodCidrs { cidr: IpNet, allowed: Vec<IpNet> },
    /// A claimed CIDR not inside the cluster CIDR (Node without `spec.podCIDRs`).
    #[error("{}", outside_cluster(.cidr, .cluster))]
    CidrOutsideClusterCidr { cidr: IpNet, cluster: Vec<IpNet> },
    /// Nothing to route to the node: no `spec.podCIDRs` and no claim.
    #[error(
        "the node has no spec.podCIDRs and claims no pod CIDRs here, so no pod address \
         could be routed to it; let the cluster allocate node CIDRs \
         (kube-controller-manager --allocate-node-cidrs) or check that the wgmesh agent \
         on that node publishes its pod CIDRs"
    )]
    NoPodCidrs,
    /// An endpoint that does not parse as an IP socket address.
    #[error(
        "{given:?} is not an endpoint; write ip:port, or [ipv6]:port for IPv6 (host names \
         are not allowed: each peer would resolve them on its own and might reach \
         different hosts)"
    )]
    BadEndpoint { given: String },
    /// An endpoint that parses but is not written the canonical way.
    #[error("{given:?} is not in canonical form; write it as {canonical}")]
    NonCanonicalEndpoint {
        given: String,
        canonical: SocketAddr,
    },
    /// Port 0 in an endpoint.
    #[error("port 0 cannot receive traffic; use the node's WireGuard UDP port (51820 by default)")]
    PortZero,
    /// An endpoint address no peer can send to.
    #[error("{endpoint} cannot be a peer endpoint: {why}")]
    UnusableEndpoint {
        endpoint: SocketAddr,
        why: &'static str,
    },
    /// An `audit-head` that does not parse. Never a reason to reject a Node:
    /// the head is evidence for the audit trail, not part of the mesh.
    #[error("not a usable audit head: {0}; the agent on that node writes it, so check that node's agent version and its audit log (`wgmesh keys audit verify`)")]
    BadAuditHead(AuditHeadError),
    /// Not an integer in 0..=65535.
    #[error(
        "{given:?} is not a keepalive interval; write whole seconds from 0 (off) to 65535, \
         e.g. 25"
    )]
    BadKeepalive { given: String },
}

/// One rejected field of a Node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct NodeError {
    /// The full annotation name (`wgmesh.dev/pod-cidrs`) or the object field
    /// (`spec.podCIDRs`, `metadata.name`), so that the message says exactly
    /// what to edit.
    pub field: String,
    pub reason: Reason,
}

/// A Node that gets no peer, with every reason why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `metadata.name` (empty when the Node has none).
    pub node: String,
    /// `metadata.creationTimestamp`, so callers can tell a node that is still
    /// starting from one that has been broken for a while.
    pub created: Option<Timestamp>,
    /// Never empty. In a stable order: `metadata.name`, then the fields in the
    /// order `public-key`, `key-generation`, `key-created`, `next-public-key`,
    /// `force-endpoint` or `endpoint`, `persistent-keepalive`, `spec.podCIDRs`,
    /// `pod-cidrs`, and list entries in their written order — so that repeated
    /// decodes of the same Node produce identical messages (and Events dedupe).
    pub errors: Vec<NodeError>,
    /// The node's usable `InternalIP`s, as in [`NodeRecord::node_ips`]. Kept on
    /// a rejected Node too: it gets no peer, but traffic to its addresses must
    /// still be routed into the tunnel (and dropped there by cryptokey routing)
    /// rather than leave in plaintext.
    pub node_ips: Vec<IpAddr>,
}

impl Rejected {
    /// True when the only thing wrong is that the node's agent has not
    /// published its identity yet: `public-key` and/or `endpoint` missing
    /// (and, on clusters without `spec.podCIDRs`, no pod CIDRs claimed yet).
    /// Every new node goes through this state for a few seconds, so raising an
    /// Event for it would only be noise. A node that has published something
    /// but not all of it is a real problem and does not count.
    pub fn not_ready(&self) -> bool {
        let unpublished = |e: &NodeError| {
            e.reason == Reason::Missing && (e.field == ann::PUBLIC_KEY || e.field == ann::ENDPOINT)
        };
        self.errors.iter().any(unpublished)
            && self
                .errors
                .iter()
                .all(|e| unpublished(e) || e.reason == Reason::NoPodCidrs)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node {:?} rejected: ", self.node)?;
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejected {}

/// What the agent publishes about itself on its own Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAnnotations {
    pub public_key: PublicKey,
    pub key_generation: u64,
    /// Written with second precision; sub-second digits are dropped.
    pub key_created: Timestamp,
    /// `Some` only while a rotation is staged.
    pub next_public_key: Option<PublicKey>,
    pub endpoint: SocketAddr,
    /// Informational; written canonical, sorted and deduplicated, and left out
    /// entirely when empty.
    pub pod_cidrs: Vec<IpNet>,
    /// The store's published audit head (`Store::audit_head`); `None` removes
    /// the annotation (a node whose log does not verify vouches for nothing).
    pub audit_head: Option<AuditHead>,
    /// The last activation's time and result ([`ann::LAST_ROTATION`]);
    /// `None` leaves the annotation out.
    pub last_rotation: Option<String>,
    /// Prefixes learned over BGP and accepted ([`ann::LEARNED_PREFIXES`]);
    /// written canonical, sorted, deduplicated; left out when empty.
    pub learned_prefixes: Vec<IpNet>,
}

/// Decodes and validates one Node. See the module docs for the text rules.
///
/// - `public-key` is required; `key-generation` (default 0), `key-created` and
///   `next-public-key` (which must differ from `public-key`) are optional.
/// - `endpoint` is required unless `force-endpoint` is present; when it is,
///   `endpoint` is neither required nor validated, because the override exists
///   to rescue nodes whose published endpoint is wrong.
/// - Pod CIDRs: when `spec.podCIDRs` (or, failing that, `spec.podCIDR`) is set
///   it is authoritative and every CIDR in the `pod-cidrs` annotation must lie
///   inside it; otherwise the annotation is used and must lie inside
///   [`ValidationConfig::cluster_cidrs`]; with neither, the node is rejected.
///   Overlap with other nodes' claims is the planner's business (it needs all
///   Nodes), not this function's.
/// - `persistent-keepalive` is optional seconds; 0 means off.
/// - Any value over [`MAX_VALUE_LEN`] bytes is rejected before it is parsed.
pub fn decode(node: &Node, cfg: &ValidationConfig) -> Result<NodeRecord, Rejected> {
    let mut d = Decoder {
        annotations: node.metadata.annotations.as_ref(),
        errors: Vec::new(),
    };

    let name = node.metadata.name.clone().filter(|n| !n.is_empty());
    if name.is_none() {
        d.error(METADATA_NAME, Reason::NoName);
    }
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);

    let public_key = d.required(ann::PUBLIC_KEY, parse_key);
    let key_generation = d.optional(ann::KEY_GENERATION, parse_u64).unwrap_or(0);
    let key_created = d.optional(ann::KEY_CREATED, parse_timestamp);
    let mut next_public_key = d.optional(ann::NEXT_PUBLIC_KEY, parse_key);
    if next_public_key.is_some() && next_public_key == public_key {
        d.error(ann::NEXT_PUBLIC_KEY, Reason::NextKeyIsCurrent);
        next_public_key = None;
    }

    let (endpoint, endpoint_forced) = match d.raw(ann::FORCE_ENDPOINT) {
        Raw::Absent => (d.required(ann::ENDPOINT, parse_endpoint), false),
        Raw::Oversized => (None, true),
        Raw::Present(text) => (d.parse(ann::FORCE_ENDPOINT, text, parse_endpoint), true),
    };

    let persistent_keepalive = d
        .optional(ann::PERSISTENT_KEEPALIVE, parse_keepalive)
        .filter(|&seconds| seconds != 0);

    let pod_cidrs = d.pod_cidrs(node, cfg);
    let node_ips = node_ips(node, cfg);
    // Not through `d`: a bad head is ignored, never a reason to reject.
    let audit_head = audit_head(node).ok().flatten();

    match (name, public_key, endpoint) {
        (Some(name), Some(public_key), Some(endpoint)) if d.errors.is_empty() => Ok(NodeRecord {
            name,
            created,
            public_key,
            key_generation,
            key_created,
            next_public_key,
            endpoint,
            endpoint_forced,
            pod_cidrs,
            persistent_keepalive,
            node_ips,
            audit_head,
        }),
        (name, _, _) => {
            // Every `None` above was recorded as an error, so `errors` is not
            // empty here; the debug assertion guards that invariant in tests.
            debug_assert!(!d.errors.is_empty());
            Err(Rejected {
                node: name.unwrap_or_default(),
                created,
                errors: d.errors,
                node_ips,
            })
        }
    }
}

/// The node's published audit head (`wgmesh.dev/audit-head`), for the agent to
/// witness with `Store::record_peer_head`. `Ok(None)` when absent.
///
/// Separate from [`decode`] on purpose: a bad head is ignored for the mesh (the
/// Node keeps its peer; [`NodeRecord::audit_head`] is then `None`) and this
/// error is what the agent logs instead. It also answers for a Node that
/// [`decode`] rejects, whose history is worth witnessing all the same.
pub fn audit_head(node: &Node) -> Result<Option<AuditHead>, NodeError> {
    let mut d = Decoder {
        annotations: node.metadata.annotations.as_ref(),
        errors: Vec::new(),
    };
    let head = d.optional(ann::AUDIT_HEAD, parse_audit_head);
    match d.errors.pop() {
        Some(error) => Err(error),
        None => Ok(head),
    }
}

/// The key annotations of a Node, each decoded on its own: what a key
/// inventory needs, with no opinion on the rest of the Node (a Node whose
/// endpoint is broken still has a key whose age matters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFields {
    /// `metadata.name` (empty when the Node has none).
    pub name: String,
    pub public_key: Option<PublicKey>,
    pub key_generation: Option<u64>,
    pub key_created: Option<Timestamp>,
    pub next_public_key: Option<PublicKey>,
    pub audit_head: Option<AuditHead>,
    /// Every key annotation that is present but unusable, plus `public-key`
    /// as [`Reason::Missing`] when absent; in the order of the fields above.
    pub errors: Vec<NodeError>,
}

/// Decodes [`KeyFields`] with the same text rules as [`decode`].
pub fn key_fields(node: &Node) -> KeyFields {
    let mut d = Decoder {
        annotations: node.metadata.annotations.as_ref(),
        errors: Vec::new(),
    };
    let public_key = d.required(ann::PUBLIC_KEY, parse_key);
    let key_generation = d.optional(ann::KEY_GENERATION, parse_u64);
    let key_created = d.optional(ann::KEY_CREATED, parse_timestamp);
    let mut next_public_key = d.optional(ann::NEXT_PUBLIC_KEY, parse_key);
    if next_public_key.is_some() && next_public_key == public_key {
        d.error(ann::NEXT_PUBLIC_KEY, Reason::NextKeyIsCurrent);
        next_public_key = None;
    }
    let audit_head = d.optional(ann::AUDIT_HEAD, parse_audit_head);
    KeyFields {
        name: node.metadata.name.clone().unwrap_or_default(),
        public_key,
        key_generation,
        key_created,
        next_public_key,
        audit_head,
        errors: d.errors,
    }
}

/// The node's own addresses from `status.addresses` entries of type
/// `InternalIP`, as [`NodeRecord::node_ips`] holds them. These are written by
/// the kubelet, not by people, and never make a Node invalid: an entry that
/// does not parse as an IP address is skipped, and so is one that cannot name
/// this node from elsewhere (loopback, link-local, multicast, unspecified,
/// broadcast) or that lies inside a cluster pod CIDR (there it would compete
/// with pod routes and other peers' allowed IPs). IPv4-mapped IPv6 addresses
/// are turned into IPv4, the form packets carry. Sorted, deduplicated.
pub fn node_ips(node: &Node, cfg: &ValidationConfig) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or(&[])
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| trim(&a.address).parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .filter(|ip| unusable_address(*ip).is_none())
        .filter(|ip| !cfg.cluster_cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// The agent-owned annotations describing `local`, in the exact text [`decode`]
/// accepts: keys in base64, the timestamp as RFC 3339 UTC with second precision
/// (`2026-11-21T11:36:24Z`), the endpoint as `SocketAddr` prints it, CIDRs
/// truncated to their network, sorted, deduplicated and joined by `,` with no
/// spaces, the audit head as `<seq>:<hash>`. `next-public-key` and
/// `audit-head` are absent when `None`, `pod-cidrs` when empty.
///
/// Timestamps before year 0 have no RFC 3339 form and would not decode; a key
/// is never created then.
pub fn encode(local: &LocalAnnotations) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert(ann::PUBLIC_KEY.to_owned(), local.public_key.to_base64());
    out.insert(
        ann::KEY_GENERATION.to_owned(),
        local.key_generation.to_string(),
    );
    // Precision 0 makes jiff print whole seconds (truncating), with `Z`.
    out.insert(
        ann::KEY_CREATED.to_owned(),
        format!("{:.0}", local.key_created),
    );
    if let Some(next) = &local.next_public_key {
        out.insert(ann::NEXT_PUBLIC_KEY.to_owned(), next.to_base64());
    }
    out.insert(ann::ENDPOINT.to_owned(), local.endpoint.to_string());
    let cidrs = canonical_set(local.pod_cidrs.iter().map(IpNet::trunc));
    if !cidrs.is_empty() {
        let text: Vec<String> = cidrs.iter().map(IpNet::to_string).collect();
        out.insert(ann::POD_CIDRS.to_owned(), text.join(","));
    }
    if let Some(last) = &local.last_rotation {
        out.insert(ann::LAST_ROTATION.to_owned(), last.clone());
    }
    let learned = canonical_set(local.learned_prefixes.iter().map(IpNet::trunc));
    if !learned.is_empty() {
        let text: Vec<String> = learned.iter().map(IpNet::to_string).collect();
        out.insert(ann::LEARNED_PREFIXES.to_owned(), text.join(","));
    }
    if let Some(head) = &local.audit_head {
        out.insert(ann::AUDIT_HEAD.to_owned(), head.to_string());
    }
    out
}

/// The JSON merge patch (`{"metadata":{"annotations":{...}}}`) that brings the
/// agent-owned annotations of `current` to `desired`, or `None` when they
/// already match, so that the agent writes nothing in steady state (every Node
/// write wakes every watcher in the cluster).
///
/// Only keys in [`ann::AGENT_OWNED`] are compared; a key that is present but
/// should be absent (`next-public-key` after a rotation completes) is set to
/// `null`, which deletes it under merge-patch semantics. `force-endpoint`,
/// `persistent-keepalive` and annotations of other tools are never touched.
pub fn merge_patch(current: &Node, desired: &LocalAnnotations) -> Option<Value> {
    let want = encode(desired);
    let have = current.metadata.annotations.as_ref();
    let mut changes = Map::new();
    for &key in ann::AGENT_OWNED {
        let wanted = want.get(key);
        if wanted != have.and_then(|a| a.get(key)) {
            let value = wanted.map_or(Value::Null, |v| Value::String(v.clone()));
            changes.insert(key.to_owned(), value);
        }
    }
    if changes.is_empty() {
        return None;
    }
    let mut metadata = Map::new();
    metadata.insert("annotations".to_owned(), Value::Object(changes));
    let mut patch = Map::new();
    patch.insert("metadata".to_owned(), Value::Object(metadata));
    Some(Value::Object(patch))
}

/// How much of an offending value an error message echoes.
const ECHO_CHARS: usize = 64;

/// An annotation value as looked up, before parsing.
enum Raw<'a> {
    Absent,
    /// Over the size limit; already reported.
    Oversized,
    /// Present, surrounding ASCII whitespace removed.
    Present(&'a str),
}

/// Collects errors while decoding one Node.
struct Decoder<'a> {
    annotations: Option<&'a BTreeMap<String, String>>,
    errors: Vec<NodeError>,
}

impl<'a> Decoder<'a> {
    fn error(&mut self, field: &str, reason: Reason) {
        self.errors.push(NodeError {
            field: field.to_owned(),
            reason,
        });
    }

    /// Looks up `key`, enforcing the size limit before anything parses it.
    fn raw(&mut self, key: &str) -> Raw<'a> {
        match self.annotations.and_then(|a| a.get(key)) {
            None => Raw::Absent,
            Some(value) if value.len() > MAX_VALUE_LEN => {
                self.error(key, Reason::Oversized { len: value.len() });
                Raw::Oversized
            }
            Some(value) => Raw::Present(trim(value)),
        }
    }

    fn parse<T>(
        &mut self,
        key: &str,
        text: &str,
        parser: fn(&str) -> Result<T, Reason>,
    ) -> Option<T> {
        parser(text).map_err(|reason| self.error(key, reason)).ok()
    }

    fn optional<T>(&mut self, key: &str, parser: fn(&str) -> Result<T, Reason>) -> Option<T> {
        match self.raw(key) {
            Raw::Absent | Raw::Oversized => None,
            Raw::Present(text) => self.parse(key, text, parser),
        }
    }

    fn required<T>(&mut self, key: &str, parser: fn(&str) -> Result<T, Reason>) -> Option<T> {
        match self.raw(key) {
            Raw::Absent => {
                self.error(key, Reason::Missing);
                None
            }
            Raw::Oversized => None,
            Raw::Present(text) => self.parse(key, text, parser),
        }
    }

    /// Applies the authority rule between `spec.podCIDRs` and the
    /// `pod-cidrs` annotation; returns the CIDRs the node's peer may use.
    fn pod_cidrs(&mut self, node: &Node, cfg: &ValidationConfig) -> Vec<IpNet> {
        let spec = node.spec.as_ref();
        let plural = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or(&[]);
        let singular = spec
            .and_then(|s| s.pod_cidr.as_deref())
            .filter(|c| !c.is_empty());
        let (spec_field, spec_items): (&str, Vec<&str>) = match singular {
            // `spec.podCIDR` predates dual-stack; `spec.podCIDRs` supersedes
            // it (and repeats it as its first entry) whenever it is set.
            Some(single) if plural.is_empty() => (SPEC_POD_CIDR, vec![single]),
            _ => (SPEC_POD_CIDRS, plural.iter().map(String::as_str).collect()),
        };
        let before = self.errors.len();
        let mut allocated = Vec::new();
        for item in &spec_items {
            if let Some(net) = self.parse(spec_field, item, parse_cidr) {
                allocated.push(net);
            }
        }
        let allocated = canonical_set(allocated);
        let spec_was_bad = self.errors.len() > before;

        let before = self.errors.len();
        let claimed = match self.raw(ann::POD_CIDRS) {
            Raw::Absent | Raw::Oversized => Vec::new(),
            Raw::Present(text) => self.cidr_list(text),
        };
        let claim_was_bad = self.errors.len() > before;

        if !spec_items.is_empty() {
            // A claim may well lie inside the entry that did not parse; that
            // entry is reported already, and guessing would only add noise.
            if !spec_was_bad {
                for cidr in claimed {
                    if !allocated.iter().any(|a| a.contains(&cidr)) {
                        let allowed = allocated.clone();
                        self.error(
                            ann::POD_CIDRS,
                            Reason::CidrOutsidePodCidrs { cidr, allowed },
                        );
                    }
                }
            }
            return allocated;
        }
        if claimed.is_empty() && !claim_was_bad {
            self.error(ann::POD_CIDRS, Reason::NoPodCidrs);
        }
        for &cidr in &claimed {
            if !cfg.cluster_cidrs.iter().any(|c| c.contains(&cidr)) {
                let cluster = cfg.cluster_cidrs.clone();
                self.error(
                    ann::POD_CIDRS,
                    Reason::CidrOutsideClusterCidr { cidr, cluster },
                );
            }
        }
        canonical_set(claimed)
    }

    /// Parses the `pod-cidrs` list, reporting each bad entry. An empty (or
    /// all-whitespace) value claims nothing, the same as an absent one.
    fn cidr_list(&mut self, text: &str) -> Vec<IpNet> {
        let mut out = Vec::new();
        if text.is_empty() {
            return out;
        }
        for item in text.split(',').map(trim) {
            if item.is_empty() {
                self.error(ann::POD_CIDRS, Reason::EmptyListEntry);
            } else if let Some(net) = self.parse(ann::POD_CIDRS, item, parse_cidr) {
                out.push(net);
            }
        }
        out
    }
}

fn trim(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_ascii_whitespace())
}

/// Shortens and keeps a value for echoing in an error message: messages end
/// up in Events and logs, which should not carry kilobytes of garbage.
fn echo(text: &str) -> String {
    match text.char_indices().nth(ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn join(nets: &[IpNet]) -> String {
    let text: Vec<String> = nets.iter().map(IpNet::to_string).collect();
    text.join(", ")
}

fn outside_cluster(cidr: &IpNet, cluster: &[IpNet]) -> String {
    if cluster.is_empty() {
        format!(
            "{cidr} cannot be accepted: the node has no spec.podCIDRs and this agent has no \
             cluster pod CIDR configured to check it against; configure the cluster pod \
             CIDR on the wgmesh agents"
        )
    } else {
        format!(
            "{cidr} lies outside the cluster pod CIDR ({}); without spec.podCIDRs a node may \
             only claim addresses inside it, so correct the annotation (or the agents' \
             cluster CIDR setting)",
            join(cluster)
        )
    }
}

/// Sorted and deduplicated.
fn canonical_set(nets: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = nets.into_iter().collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn parse_key(text: &str) -> Result<PublicKey, Reason> {
    PublicKey::from_base64(text).map_err(Reason::BadKey)
}

fn parse_audit_head(text: &str) -> Result<AuditHead, Reason> {
    text.parse().map_err(Reason::BadAuditHead)
}

/// Plain decimal digits only: `str::parse` would also take a leading `+`.
fn parse_u64(text: &str) -> Result<u64, Reason> {
    let bad = || Reason::NotAnInteger { given: echo(text) };
    if !all_digits(text) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

fn parse_keepalive(text: &str) -> Result<u16, Reason> {
    let bad = || Reason::BadKeepalive { given: echo(text) };
    if !all_digits(text) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

fn all_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 3339 `date-time`. jiff alone would also take other ISO 8601 and
/// Temporal forms (basic format, bracketed zone names, `+01` offsets), so the
/// shape is checked here first and jiff only checks the values (month 13, …).
fn parse_timestamp(text: &str) -> Result<Timestamp, Reason> {
    let bad = || Reason::BadTimestamp { given: echo(text) };
    if !is_rfc3339_shape(text.as_bytes()) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

/// `YYYY-MM-DD(T|t| )hh:mm:ss[.frac](Z|z|±hh:mm)`; RFC 3339 allows the
/// lower-case and space variants (section 5.6 and its note).
fn is_rfc3339_shape(b: &[u8]) -> bool {
    let digits = |range: std::ops::Range<usize>| {
        b.get(range)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    let date_time = digits(0..4)
        && at(4, b"-")
        && digits(5..7)
        && at(7, b"-")
        && digits(8..10)
        && at(10, b"Tt ")
        && digits(11..13)
        && at(13, b":")
        && digits(14..16)
        && at(16, b":")
        && digits(17..19);
    if !date_time {
        return false;
    }
    let mut i = 19;
    if at(i, b".") {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i..) {
        Some(b"Z" | b"z") => true,
        Some(rest) => {
            rest.len() == 6
                && matches!(rest[0], b'+' | b'-')
                && digits(i + 1..i + 3)
                && rest[3] == b':'
                && digits(i + 4..i + 6)
        }
        None => false,
    }
}

/// Whether `addr` is an endpoint every peer would accept: the checks
/// [`decode`] applies to `wgmesh.dev/endpoint`, for the agent to run on its
/// own choice before publishing it.
pub fn check_endpoint(addr: &SocketAddr) -> Result<(), Reason> {
    parse_endpoint(&addr.to_string()).map(|_| ())
}

fn parse_endpoint(text: &str) -> Result<SocketAddr, Reason> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| Reason::BadEndpoint { given: echo(text) })?;
    if addr.port() == 0 {
        return Err(Reason::PortZero);
    }
    if let Some(why) = unusable_endpoint(&addr) {
        return Err(Reason::UnusableEndpoint {
            endpoint: addr,
            why,
        });
    }
    // An IPv4-mapped IPv6 endpoint is the IPv4 one spelt differently; one
    // spelling per value keeps the planner's endpoint-conflict check (which
    // compares addresses) from being dodged by the other spelling.
    let canonical = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    if canonical != addr || addr.to_string() != text {
        return Err(Reason::NonCanonicalEndpoint {
            given: echo(text),
            canonical,
        });
    }
    Ok(addr)
}

/// The advice every endpoint problem ends with: where the value comes from.
/// (A macro, not a const, so that `concat!` can build `&'static str`s.)
macro_rules! endpoint_fix {
    () => {
        "; publish an address of that node that the other nodes can reach (its \
         underlay address): correct wgmesh.dev/force-endpoint if it is set, else the \
         agent's --endpoint or the Node InternalIP the agent defaults to"
    };
}

/// Addresses that parse but cannot name one remote host. Each answer says what
/// is wrong and how to fix it.
fn unusable_endpoint(addr: &SocketAddr) -> Option<&'static str> {
    if let SocketAddr::V6(v6) = addr {
        if v6.scope_id() != 0 {
            return Some(concat!(
                "it carries an IPv6 zone index (%…), which names an interface on the node \
                 that wrote it and means nothing on its peers",
                endpoint_fix!()
            ));
        }
    }
    // `::ffff:127.0.0.1` is 127.0.0.1 in disguise, and so on: a socket sends to
    // an IPv4-mapped address as to the IPv4 one.
    unusable_address(addr.ip().to_canonical())
}

/// Why an address cannot name one remote node, if it cannot: shared by
/// endpoints and by node addresses (which only skip such entries). Expects an
/// address already passed through `to_canonical`.
fn unusable_address(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some(concat!(
            "the unspecified address means \"this host\" to every peer, so each would \
             send to itself",
            endpoint_fix!()
        ));
    }
    if ip.is_loopback() {
        return Some(concat!(
            "a loopback address reaches only the host that sends to it, so every peer \
             would send this node's handshakes to itself",
            endpoint_fix!()
        ));
    }
    if ip.is_multicast() {
        return Some(concat!(
            "a multicast address names a group of hosts, not one node",
            endpoint_fix!()
        ));
    }
    let link_local = match ip {
        IpAddr::V4(v4) => {
            if v4.is_broadcast() {
                return Some(concat!(
                    "the broadcast address names every host on a link, not one node",
                    endpoint_fix!()
                ));
            }
            // 0.0.0.0/8 other than 0.0.0.0 itself: "this network", a source
            // address only (RFC 1122 3.2.1.3), which no packet can be sent to.
            if v4.octets()[0] == 0 {
                return Some(concat!(
                    "addresses in 0.0.0.0/8 mean \"this network\" and cannot be sent to",
                    endpoint_fix!()
                ));
            }
            v4.is_link_local()
        }
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if link_local {
        return Some(concat!(
            "a link-local address (169.254.0.0/16, fe80::/10) is only meaningful on one \
             link and, without a zone, on no interface in particular",
            endpoint_fix!()
        ));
    }
    None
}

/// A CIDR, strictly: `address/prefix-length` with an address std accepts
/// (which, unlike `ipnet`'s parser, refuses IPv4 octets with leading zeros,
/// ambiguous because some tools read them as octal), then canonical.
fn parse_cidr(text: &str) -> Result<IpNet, Reason> {
    let bad = || Reason::BadCidr { given: echo(text) };
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    if !all_digits(len) {
        return Err(bad());
    }
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = IpNet::new(addr, len).map_err(|_| bad())?;
    let canonical = net.trunc();
    if canonical != net || canonical.to_string() != text {
        return Err(Reason::NonCanonicalCidr {
            given: echo(text),
            canonical,
        });
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use proptest::prelude::*;

    use super::*;
    use crate::keys::PrivateKey;

    const NAME: &str = "node-a";

    fn key(seed: u8) -> PublicKey {
        PrivateKey::from_base64(&STANDARD.encode([seed; 32]))
            .unwrap()
            .public_key()
    }

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn node_of(annotations: &[(&str, &str)], pod_cidrs: &[&str]) -> Node {
        let annotations = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        node_with(
            annotations,
            pod_cidrs.iter().map(|c| c.to_string()).collect(),
        )
    }

    fn node_with(annotations: BTreeMap<String, String>, pod_cidrs: Vec<String>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(NAME.to_owned()),
                creation_timestamp: Some(Time(ts("2026-01-02T03:04:05Z"))),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(pod_cidrs),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn cfg() -> ValidationConfig {
        ValidationConfig {
            cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
        }
    }

    fn local() -> LocalAnnotations {
        LocalAnnotations {
            public_key: key(1),
            key_generation: 3,
            key_created: ts("2026-11-21T11:36:24Z"),
            next_public_key: Some(key(2)),
            endpoint: "192.0.2.10:51820".parse().unwrap(),
            pod_cidrs: vec![net("fd00:10:244:1::/64"), net("10.244.1.0/24")],
            audit_head: Some(head(7)),
            last_rotation: Some("2026-11-21T11:36:24Z all-confirmed".into()),
            learned_prefixes: vec![net("203.0.113.0/24"), net("198.51.100.0/24")],
        }
    }

    fn head(seq: u64) -> AuditHead {
        format!("{seq}:{}", "ab".repeat(32)).parse().unwrap()
    }

    /// A node whose annotations are all valid, with `overrides` replacing or
    /// adding values and `removed` keys left out.
    fn valid_node(overrides: &[(&str, &str)], removed: &[&str]) -> Node {
        let mut annotations = encode(&local());
        annotations.insert(ann::PERSISTENT_KEEPALIVE.to_owned(), "25".to_owned());
        for (k, v) in overrides {
            annotations.insert(k.to_string(), v.to_string());
        }
        for k in removed {
            annotations.remove(*k);
        }
        node_with(
            annotations,
            vec!["10.244.1.0/24".to_owned(), "fd00:10:244:1::/64".to_owned()],
        )
    }

    /// Sets `status.addresses` to these (type, address) pairs.
    fn with_addresses(mut node: Node, addresses: &[(&str, &str)]) -> Node {
        let addresses = addresses
            .iter()
            .map(|(type_, address)| NodeAddress {
                type_: type_.to_string(),
                address: address.to_string(),
            })
            .collect();
        node.status = Some(NodeStatus {
            addresses: Some(addresses),
            ..NodeStatus::default()
        });
        node
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn rejected(node: &Node) -> Rejected {
        decode(node, &cfg()).expect_err("node should be rejected")
    }

    /// Asserts that the node is rejected with exactly one error, on `field`,
    /// and returns its reason.
    fn only_error(node: &Node, field: &str) -> Reason {
        let rejected = rejected(node);
        assert_eq!(rejected.errors.len(), 1, "{rejected}");
        assert_eq!(rejected.errors[0].field, field, "{rejected}");
        assert!(rejected.to_string().contains(field));
        rejected.errors[0].reason.clone()
    }

    #[test]
    fn valid_node_decodes_every_field() {
        let record = decode(&valid_node(&[], &[]), &cfg()).unwrap();
        assert_eq!(
            record,
            NodeRecord {
                name: NAME.to_owned(),
                created: Some(ts("2026-01-02T03:04:05Z")),
                public_key: key(1),
                key_generation: 3,
                key_created: Some(ts("2026-11-21T11:36:24Z")),
                next_public_key: Some(key(2)),
                endpoint: "192.0.2.10:51820".parse().unwrap(),
                endpoint_forced: false,
                pod_cidrs: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
                persistent_keepalive: Some(25),
                node_ips: vec![],
                audit_head: Some(head(7)),
            }
        );
    }

    #[test]
    fn a_bad_audit_head_is_ignored_with_a_reason_not_rejected() {
        let hash = "ab".repeat(32);
        for bad in [
            "7".to_owned(),
            "x:abab".to_owned(),
            format!("0:{hash}"),
            format!("07:{hash}"),
            format!("+7:{hash}"),
            format!("7:{}", hash.to_uppercase()),
            format!("7:{}", &hash[2..]),
            format!("7:{hash}:1"),
        ] {
            let node = valid_node(&[(ann::AUDIT_HEAD, &bad)], &[]);
            let record = decode(&node, &cfg()).expect("the peer is kept");
            assert_eq!(record.audit_head, None, "{bad}");
            let error = audit_head(&node).unwrap_err();
            assert_eq!(error.field, ann::AUDIT_HEAD);
            assert!(matches!(error.reason, Reason::BadAuditHead(_)), "{bad}");
            assert!(error.to_string().contains("audit head"), "{error}");
            // The inventory reads it the same way, and says why.
            let fields = key_fields(&node);
            assert_eq!(fields.audit_head, None);
            assert_eq!(fields.errors.len(), 1, "{bad}");
        }
        let absent = valid_node(&[], &[ann::AUDIT_HEAD]);
        assert_eq!(audit_head(&absent), Ok(None));
        assert_eq!(decode(&absent, &cfg()).unwrap().audit_head, None);
        // Surrounding whitespace, like every annotation.
        let spaced = valid_node(&[(ann::AUDIT_HEAD, &format!(" {}\n", head(3)))], &[]);
        assert_eq!(audit_head(&spaced), Ok(Some(head(3))));
    }

    #[test]
    fn a_rejected_node_still_yields_its_audit_head_and_key_fields() {
        let node = valid_node(&[(ann::ENDPOINT, "garbage")], &[]);
        assert!(decode(&node, &cfg()).is_err());
        assert_eq!(audit_head(&node), Ok(Some(head(7))));
        let fields = key_fields(&node);
        assert_eq!(fields.name, NAME);
        assert_eq!(fields.public_key, Some(key(1)));
        assert_eq!(fields.key_generation, Some(3));
        assert_eq!(fields.next_public_key, Some(key(2)));
        assert!(fields.errors.is_empty(), "{:?}", fields.errors);

        let bare = valid_node(&[(ann::KEY_CREATED, "soon")], &[ann::PUBLIC_KEY]);
        let fields = key_fields(&bare);
        let problems: Vec<&str> = fields.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(problems, [ann::PUBLIC_KEY, ann::KEY_CREATED]);
        assert_eq!(fields.errors[0].reason, Reason::Missing);
    }

    #[test]
    fn node_ips_are_the_usable_internal_ips_outside_the_cluster() {
        let node = with_addresses(
            valid_node(&[], &[]),
            &[
                ("Hostname", "node-a"),
                ("ExternalIP", "203.0.113.9"),
                ("InternalIP", "2001:db8::7"),
                ("InternalIP", "192.0.2.7"),
                ("InternalIP", " 10.1.2.3\n"),
                ("InternalIP", "192.0.2.7"),
                ("InternalIP", "::ffff:192.0.2.8"),
                // Unparsable: skipped, never a reason to reject the Node.
                ("InternalIP", "not-an-ip"),
                ("InternalIP", "10.1.2.4/24"),
                ("InternalIP", "fe80::1%eth0"),
                ("InternalIP", ""),
                // Cannot name this node from elsewhere.
                ("InternalIP", "127.0.0.1"),
                ("InternalIP", "::1"),
                ("InternalIP", "::ffff:127.0.0.1"),
                ("InternalIP", "169.254.3.4"),
                ("InternalIP", "fe80::1"),
                ("InternalIP", "224.0.0.1"),
                ("InternalIP", "ff02::1"),
                ("InternalIP", "0.0.0.0"),
                ("InternalIP", "::"),
                ("InternalIP", "255.255.255.255"),
                // Inside the cluster pod CIDRs.
                ("InternalIP", "10.244.3.4"),
                ("InternalIP", "fd00:10:244::5"),
            ],
        );
        let record = decode(&node, &cfg()).unwrap();
        assert_eq!(
            record.node_ips,
            [
                ip("10.1.2.3"),
                ip("192.0.2.7"),
                ip("192.0.2.8"),
                ip("2001:db8::7"),
            ]
        );
        assert_eq!(node_ips(&node, &cfg()), record.node_ips);

        let everything = ValidationConfig {
            cluster_cidrs: vec![net("0.0.0.0/0")],
        };
        assert_eq!(
            node_ips(&node, &everything),
            [ip("2001:db8::7"), ip("fd00:10:244::5")]
        );
        let none = with_addresses(valid_node(&[], &[]), &[]);
        assert!(decode(&none, &cfg()).unwrap().node_ips.is_empty());
    }

    #[test]
    fn a_rejected_node_keeps_its_node_ips() {
        let node = with_addresses(
            valid_node(&[(ann::PUBLIC_KEY, "garbage")], &[ann::ENDPOINT]),
            &[("InternalIP", "192.0.2.7"), ("InternalIP", "127.0.0.1")],
        );
        let rejected = rejected(&node);
        assert_eq!(rejected.errors.len(), 2, "{rejected}");
        assert_eq!(rejected.node_ips, [ip("192.0.2.7")]);
    }

    #[test]
    fn optional_fields_default() {
        let node = valid_node(
            &[],
            &[
                ann::KEY_GENERATION,
                ann::KEY_CREATED,
                ann::NEXT_PUBLIC_KEY,
                ann::PERSISTENT_KEEPALIVE,
                ann::POD_CIDRS,
            ],
        );
        let record = decode(&node, &cfg()).unwrap();
        assert_eq!(record.key_generation, 0);
        assert_eq!(record.key_created, None);
        assert_eq!(record.next_public_key, None);
        assert_eq!(record.persistent_keepalive, None);
        assert_eq!(record.pod_cidrs.len(), 2);

        let off = valid_node(&[(ann::PERSISTENT_KEEPALIVE, "0")], &[]);
        assert_eq!(decode(&off, &cfg()).unwrap().persistent_keepalive, None);
    }

    #[test]
    fn encode_writes_the_documented_text() {
        let mut local = local();
        local.key_created = ts("2026-11-21T11:36:24.987654321Z");
        local.pod_cidrs.push(net("10.244.1.7/24"));
        let map = encode(&local);
        assert_eq!(map[ann::KEY_CREATED], "2026-11-21T11:36:24Z");
        assert_eq!(map[ann::KEY_GENERATION], "3");
        assert_eq!(map[ann::ENDPOINT], "192.0.2.10:51820");
        assert_eq!(map[ann::POD_CIDRS], "10.244.1.0/24,fd00:10:244:1::/64");
        assert_eq!(map[ann::PUBLIC_KEY].len(), 44);
        assert_eq!(map[ann::AUDIT_HEAD], format!("7:{}", "ab".repeat(32)));
        assert_eq!(map[ann::LEARNED_PREFIXES], "198.51.100.0/24,203.0.113.0/24");
        assert!(map.keys().all(|k| ann::AGENT_OWNED.contains(&k.as_str())));

        local.next_public_key = None;
        local.pod_cidrs.clear();
        local.audit_head = None;
        local.learned_prefixes.clear();
        let map = encode(&local);
        assert!(!map.contains_key(ann::LEARNED_PREFIXES));
        assert!(!map.contains_key(ann::NEXT_PUBLIC_KEY));
        assert!(!map.contains_key(ann::POD_CIDRS));
        assert!(!map.contains_key(ann::AUDIT_HEAD));
    }

    #[test]
    fn round_trip_encode_decode() {
        let local = local();
        let record = decode(&node_with(encode(&local), vec![]), &cfg()).unwrap();
        assert_eq!(record.public_key, local.public_key);
        assert_eq!(record.key_generation, local.key_generation);
        assert_eq!(record.key_created, Some(local.key_created));
        assert_eq!(record.next_public_key, local.next_public_key);
        assert_eq!(record.endpoint, local.endpoint);
        assert!(!record.endpoint_forced);
        assert_eq!(record.pod_cidrs, canonical_set(local.pod_cidrs));
        assert_eq!(record.audit_head, local.audit_head);
    }

    #[test]
    fn missing_required_annotations() {
        let reason = only_error(&valid_node(&[], &[ann::PUBLIC_KEY]), ann::PUBLIC_KEY);
        assert_eq!(reason, Reason::Missing);
        let reason = only_error(&valid_node(&[], &[ann::ENDPOINT]), ann::ENDPOINT);
        assert_eq!(reason, Reason::Missing);
    }

    #[test]
    fn missing_name() {
        let mut node = valid_node(&[], &[]);
        node.metadata.name = None;
        assert_eq!(only_error(&node, METADATA_NAME), Reason::NoName);
        assert_eq!(rejected(&node).node, "");
    }

    #[test]
    fn bad_base64_key() {
        let node = valid_node(&[(ann::PUBLIC_KEY, "not base64!")], &[]);
        let reason = only_error(&node, ann::PUBLIC_KEY);
        assert!(
            matches!(reason, Reason::BadKey(KeyError::Base64(_))),
            "{reason}"
        );
    }

    #[test]
    fn wrong_length_keys() {
        for len in [31, 33] {
            let text = STANDARD.encode(vec![7u8; len]);
            let node = valid_node(&[(ann::PUBLIC_KEY, &text)], &[]);
            let reason = only_error(&node, ann::PUBLIC_KEY);
            assert_eq!(reason, Reason::BadKey(KeyError::Length(len)));
            assert!(reason.to_string().contains("32 bytes"), "{reason}");
        }
    }

    #[test]
    fn all_zero_and_low_order_keys() {
        let zero = STANDARD.encode([0u8; 32]);
        let node = valid_node(&[(ann::NEXT_PUBLIC_KEY, &zero)], &[]);
        let reason = only_error(&node, ann::NEXT_PUBLIC_KEY);
        assert_eq!(reason, Reason::BadKey(KeyError::AllZero));

        // u = 1: a point of order 4 on the curve.
        let mut one = [0u8; 32];
        one[0] = 1;
        let node = valid_node(&[(ann::PUBLIC_KEY, &STANDARD.encode(one))], &[]);
        let reason = only_error(&node, ann::PUBLIC_KEY);
        assert_eq!(reason, Reason::BadKey(KeyError::LowOrder));
        assert!(reason.to_string().contains("low-order"));
    }

    #[test]
    fn next_key_must_differ() {
        let current = key(1).to_base64();
        let node = valid_node(&[(ann::NEXT_PUBLIC_KEY, &current)], &[]);
        assert_eq!(
            only_error(&node, ann::NEXT_PUBLIC_KEY),
            Reason::NextKeyIsCurrent
        );
    }

    #[test]
    fn non_integer_generation() {
        for bad in ["three", "-1", "+1", "1.5", "", "18446744073709551616"] {
            let node = valid_node(&[(ann::KEY_GENERATION, bad)], &[]);
            let reason = only_error(&node, ann::KEY_GENERATION);
            assert!(matches!(reason, Reason::NotAnInteger { .. }), "{bad}");
        }
        let node = valid_node(&[(ann::KEY_GENERATION, " 18446744073709551615\n")], &[]);
        assert_eq!(decode(&node, &cfg()).unwrap().key_generation, u64::MAX);
    }

    #[test]
    fn bad_timestamps() {
        for bad in [
            "yesterday",
            "2026-11-21",
            "2026-11-21T11:36:24",
            "20261121T113624Z",
            "2026-11-21T11:36:24+01",
            "2026-11-21T11:36:24Z[UTC]",
            "2026-13-21T11:36:24Z",
            "2026-11-21T11:36:24.Z",
        ] {
            let node = valid_node(&[(ann::KEY_CREATED, bad)], &[]);
            let reason = only_error(&node, ann::KEY_CREATED);
            assert!(matches!(reason, Reason::BadTimestamp { .. }), "{bad}");
            assert!(reason.to_string().contains("RFC 3339"));
        }
        for (good, want) in [
            ("2026-11-21T12:36:24+01:00", "2026-11-21T11:36:24Z"),
            ("2026-11-21t11:36:24.5z", "2026-11-21T11:36:24.5Z"),
            ("2026-11-21 11:36:24Z", "2026-11-21T11:36:24Z"),
        ] {
            let node = valid_node(&[(ann::KEY_CREATED, good)], &[]);
            assert_eq!(decode(&node, &cfg()).unwrap().key_created, Some(ts(want)));
        }
    }

    #[test]
    fn unparsable_cidr() {
        for bad in [
            "10.244.1.0",
            "10.244.1.0/33",
            "banana/8",
            "010.244.1.0/24",
            "::/-1",
        ] {
            let node = valid_node(&[(ann::POD_CIDRS, bad)], &[]);
            let reason = only_error(&node, ann::POD_CIDRS);
            assert!(matches!(reason, Reason::BadCidr { .. }), "{bad}: {reason}");
        }
    }

    #[test]
    fn empty_list_entry() {
        let node = valid_node(
            &[(ann::POD_CIDRS, "10.244.1.0/24,,fd00:10:244:1::/64")],
            &[],
        );
        assert_eq!(only_error(&node, ann::POD_CIDRS), Reason::EmptyListEntry);
    }

    #[test]
    fn host_bits_are_non_canonical() {
        let node = valid_node(&[(ann::POD_CIDRS, "10.244.1.1/24")], &[]);
        let reason = only_error(&node, ann::POD_CIDRS);
        assert_eq!(
            reason,
            Reason::NonCanonicalCidr {
                given: "10.244.1.1/24".to_owned(),
                canonical: net("10.244.1.0/24"),
            }
        );
        assert!(reason.to_string().contains("write it as 10.244.1.0/24"));

        // The brief's example, on a node without spec.podCIDRs.
        let node = node_of(&[(ann::POD_CIDRS, "10.1.0.1/24")], &[]);
        let errors = decode(&node, &cfg()).unwrap_err().errors;
        let error = errors.iter().find(|e| e.field == ann::POD_CIDRS).unwrap();
        assert!(error.to_string().contains("10.1.0.0/24"), "{error}");
    }

    #[test]
    fn upper_case_ipv6_is_non_canonical() {
        let node = valid_node(&[(ann::POD_CIDRS, "FD00:10:244:1::/64")], &[]);
        let reason = only_error(&node, ann::POD_CIDRS);
        assert!(
            reason.to_string().contains("fd00:10:244:1::/64"),
            "{reason}"
        );

        let node = node_of(&[(ann::POD_CIDRS, "2001:DB8::/32")], &[]);
        let errors = decode(&node, &cfg()).unwrap_err().errors;
        assert!(errors.contains(&NodeError {
            field: ann::POD_CIDRS.to_owned(),
            reason: Reason::NonCanonicalCidr {
                given: "2001:DB8::/32".to_owned(),
                canonical: net("2001:db8::/32"),
            },
        }));
    }

    #[test]
    fn bad_spec_pod_cidr_names_the_spec_field() {
        let mut node = valid_node(&[], &[]);
        node.spec.as_mut().unwrap().pod_cidrs = Some(vec!["10.244.1.0/24".into(), "x".into()]);
        let reason = only_error(&node, SPEC_POD_CIDRS);
        assert!(matches!(reason, Reason::BadCidr { .. }));
    }

    #[test]
    fn legacy_spec_pod_cidr_is_used_when_plural_is_empty() {
        let mut node = valid_node(&[(ann::POD_CIDRS, "10.244.1.0/25")], &[]);
        let spec = node.spec.as_mut().unwrap();
        spec.pod_cidrs = None;
        spec.pod_cidr = Some("10.244.1.0/24".into());
        assert_eq!(
            decode(&node, &cfg()).unwrap().pod_cidrs,
            vec![net("10.244.1.0/24")]
        );
        node.spec.as_mut().unwrap().pod_cidr = Some("10.244.1.1/24".into());
        let reason = only_error(&node, SPEC_POD_CIDR);
        assert!(matches!(reason, Reason::NonCanonicalCidr { .. }));
    }

    #[test]
    fn spec_pod_cidrs_are_authoritative() {
        // A narrower claim is fine; the peer still gets the whole allocation.
        let node = valid_node(&[(ann::POD_CIDRS, "10.244.1.128/25")], &[]);
        let record = decode(&node, &cfg()).unwrap();
        assert_eq!(
            record.pod_cidrs,
            vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")]
        );

        let node = valid_node(&[(ann::POD_CIDRS, "10.244.1.0/24,10.244.2.0/24")], &[]);
        let reason = only_error(&node, ann::POD_CIDRS);
        assert_eq!(
            reason,
            Reason::CidrOutsidePodCidrs {
                cidr: net("10.244.2.0/24"),
                allowed: vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")],
            }
        );
        assert!(reason.to_string().contains("spec.podCIDRs"));
    }

    #[test]
    fn without_spec_claims_must_lie_in_cluster_cidr() {
        let good = node_of(
            &[
                (ann::PUBLIC_KEY, key(1).to_base64().as_str()),
                (ann::ENDPOINT, "192.0.2.10:51820"),
                (
                    ann::POD_CIDRS,
                    "10.244.9.0/24, fd00:10:244:9::/64 ,10.244.9.0/24",
                ),
            ],
            &[],
        );
        let record = decode(&good, &cfg()).unwrap();
        assert_eq!(
            record.pod_cidrs,
            vec![net("10.244.9.0/24"), net("fd00:10:244:9::/64")]
        );

        let bad = node_of(
            &[
                (ann::PUBLIC_KEY, key(1).to_base64().as_str()),
                (ann::ENDPOINT, "192.0.2.10:51820"),
                (ann::POD_CIDRS, "10.245.0.0/24"),
            ],
            &[],
        );
        let reason = only_error(&bad, ann::POD_CIDRS);
        assert_eq!(
            reason,
            Reason::CidrOutsideClusterCidr {
                cidr: net("10.245.0.0/24"),
                cluster: cfg().cluster_cidrs,
            }
        );
        assert!(reason.to_string().contains("10.244.0.0/16"));

        let unconfigured = decode(&bad, &ValidationConfig::default()).unwrap_err();
        assert!(unconfigured.errors[0]
            .to_string()
            .contains("no cluster pod CIDR"));
    }

    #[test]
    fn no_pod_cidrs_at_all() {
        let base = [
            (ann::PUBLIC_KEY, key(1).to_base64()),
            (ann::ENDPOINT, "192.0.2.10:51820".to_owned()),
        ];
        let pairs: Vec<(&str, &str)> = base.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let rejected = decode(&node_of(&pairs, &[]), &cfg()).unwrap_err();
        assert_eq!(rejected.errors.len(), 1);
        assert_eq!(rejected.errors[0].field, ann::POD_CIDRS);
        assert_eq!(rejected.errors[0].reason, Reason::NoPodCidrs);
        // Published key and endpoint but nothing to route: a real problem.
        assert!(!rejected.not_ready());

        let mut empty = pairs.clone();
        empty.push((ann::POD_CIDRS, " "));
        assert_eq!(
            only_error(&node_of(&empty, &[]), ann::POD_CIDRS),
            Reason::NoPodCidrs
        );
    }

    #[test]
    fn endpoint_port_zero() {
        let node = valid_node(&[(ann::ENDPOINT, "192.0.2.10:0")], &[]);
        assert_eq!(only_error(&node, ann::ENDPOINT), Reason::PortZero);
    }

    #[test]
    fn host_name_endpoint_is_rejected() {
        let node = valid_node(&[(ann::ENDPOINT, "example.com:51820")], &[]);
        let reason = only_error(&node, ann::ENDPOINT);
        assert!(matches!(reason, Reason::BadEndpoint { .. }));
        assert!(reason.to_string().contains("host names are not allowed"));
    }

    #[test]
    fn ipv6_endpoints() {
        let node = valid_node(&[(ann::ENDPOINT, "[2001:db8::1]:51820")], &[]);
        assert_eq!(
            decode(&node, &cfg()).unwrap().endpoint,
            "[2001:db8::1]:51820".parse().unwrap()
        );
        for bad in ["::1:51820", "[2001:DB8::1]:51820", "192.0.2.10:051820"] {
            let node = valid_node(&[(ann::ENDPOINT, bad)], &[]);
            let reason = only_error(&node, ann::ENDPOINT);
            assert!(
                matches!(
                    reason,
                    Reason::NonCanonicalEndpoint { .. } | Reason::BadEndpoint { .. }
                ),
                "{bad}: {reason}"
            );
        }
        let node = valid_node(&[(ann::ENDPOINT, "[2001:DB8::1]:51820")], &[]);
        assert!(only_error(&node, ann::ENDPOINT)
            .to_string()
            .contains("write it as [2001:db8::1]:51820"));
    }

    #[test]
    fn unusable_endpoints() {
        // (endpoint, a word the reason must name)
        let cases = [
            ("0.0.0.0:51820", "unspecified"),
            ("[::]:51820", "unspecified"),
            ("[::ffff:0.0.0.0]:51820", "unspecified"),
            ("0.1.2.3:51820", "this network"),
            ("127.0.0.1:51820", "loopback"),
            ("127.255.0.9:51820", "loopback"),
            ("[::1]:51820", "loopback"),
            ("[::ffff:127.0.0.1]:51820", "loopback"),
            ("224.0.0.1:51820", "multicast"),
            ("239.255.255.250:51820", "multicast"),
            ("[ff02::1]:51820", "multicast"),
            ("[ff0e::1]:51820", "multicast"),
            ("[::ffff:224.0.0.5]:51820", "multicast"),
            ("255.255.255.255:51820", "broadcast"),
            ("[::ffff:255.255.255.255]:51820", "broadcast"),
            ("169.254.0.1:51820", "link-local"),
            ("169.254.169.254:51820", "link-local"),
            ("[fe80::1]:51820", "link-local"),
            ("[febf:ffff::1]:51820", "link-local"),
            ("[::ffff:169.254.1.1]:51820", "link-local"),
            ("[fe80::1%2]:51820", "zone index"),
        ];
        for (bad, word) in cases {
            for field in [ann::ENDPOINT, ann::FORCE_ENDPOINT] {
                let node = valid_node(&[(field, bad)], &[]);
                let reason = only_error(&node, field);
                let Reason::UnusableEndpoint { endpoint, why } = &reason else {
                    panic!("{field}={bad}: {reason}");
                };
                assert_eq!(*endpoint, bad.parse::<SocketAddr>().unwrap());
                assert!(why.contains(word), "{bad}: {why}");
                // Every reason ends with the fix, naming where the value comes from.
                assert!(why.contains("force-endpoint"), "{bad}: {why}");
                assert!(why.contains("--endpoint"), "{bad}: {why}");
                assert!(reason.to_string().contains(bad.trim_end_matches(":51820")));
            }
        }
    }

    #[test]
    fn ipv4_mapped_endpoints_must_be_written_as_ipv4() {
        for field in [ann::ENDPOINT, ann::FORCE_ENDPOINT] {
            let node = valid_node(&[(field, "[::ffff:192.0.2.1]:51820")], &[]);
            let reason = only_error(&node, field);
            assert_eq!(
                reason,
                Reason::NonCanonicalEndpoint {
                    given: "[::ffff:192.0.2.1]:51820".to_owned(),
                    canonical: "192.0.2.1:51820".parse().unwrap(),
                }
            );
            assert!(reason.to_string().contains("write it as 192.0.2.1:51820"));
        }
    }

    #[test]
    fn endpoints_next_to_the_unusable_ranges_are_fine() {
        for good in [
            "1.0.0.1:51820",
            "126.255.255.255:51820",
            "128.0.0.1:51820",
            "169.253.255.255:51820",
            "169.255.0.1:51820",
            "223.255.255.255:51820",
            "255.255.255.254:51820",
            "10.0.0.1:51820",
            "192.168.1.1:51820",
            "100.64.0.1:51820",
            "[::2]:51820",
            "[fec0::1]:51820",
            "[fe7f::1]:51820",
            "[fd00::1]:51820",
            "[2001:db8::1]:51820",
        ] {
            let addr: SocketAddr = good.parse().unwrap();
            assert_eq!(unusable_endpoint(&addr), None, "{good}");
            let node = valid_node(&[(ann::ENDPOINT, good)], &[]);
            assert_eq!(decode(&node, &cfg()).map(|r| r.endpoint), Ok(addr));
        }
    }

    #[test]
    fn bad_keepalive() {
        for bad in ["65536", "-1", "25s", ""] {
            let node = valid_node(&[(ann::PERSISTENT_KEEPALIVE, bad)], &[]);
            let reason = only_error(&node, ann::PERSISTENT_KEEPALIVE);
            assert!(matches!(reason, Reason::BadKeepalive { .. }), "{bad}");
        }
    }

    #[test]
    fn oversized_values_are_not_parsed() {
        let huge = "A".repeat(5000);
        for field in [ann::PUBLIC_KEY, ann::POD_CIDRS, ann::FORCE_ENDPOINT] {
            let node = valid_node(&[(field, &huge)], &[]);
            assert_eq!(only_error(&node, field), Reason::Oversized { len: 5000 });
        }
        let exactly = format!("{}25", "0".repeat(MAX_VALUE_LEN - 2));
        let node = valid_node(&[(ann::PERSISTENT_KEEPALIVE, &exactly)], &[]);
        assert_eq!(
            decode(&node, &cfg()).unwrap().persistent_keepalive,
            Some(25)
        );
    }

    #[test]
    fn other_tools_annotations_are_ignored() {
        let huge = "x".repeat(100_000);
        let node = valid_node(
            &[
                ("kubectl.kubernetes.io/last-applied-configuration", &huge),
                ("wgmesh.dev/some-future-key", "whatever"),
            ],
            &[],
        );
        assert!(decode(&node, &cfg()).is_ok());
    }

    #[test]
    fn echoed_input_is_shortened() {
        let long = "x".repeat(1000);
        let node = valid_node(&[(ann::ENDPOINT, &long)], &[]);
        assert!(only_error(&node, ann::ENDPOINT).to_string().len() < 400);
    }

    #[test]
    fn all_problems_are_reported_in_order() {
        let mut node = valid_node(
            &[
                (ann::PUBLIC_KEY, "short"),
                (ann::KEY_GENERATION, "x"),
                (ann::KEY_CREATED, "y"),
                (ann::ENDPOINT, "example.com:1"),
                (ann::PERSISTENT_KEEPALIVE, "-5"),
                (ann::POD_CIDRS, "10.244.1.1/24,,10.9.0.0/16"),
            ],
            &[],
        );
        node.metadata.name = None;
        let rejected = rejected(&node);
        let fields: Vec<&str> = rejected.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                METADATA_NAME,
                ann::PUBLIC_KEY,
                ann::KEY_GENERATION,
                ann::KEY_CREATED,
                ann::ENDPOINT,
                ann::PERSISTENT_KEEPALIVE,
                ann::POD_CIDRS,
                ann::POD_CIDRS,
                ann::POD_CIDRS,
            ]
        );
        assert!(matches!(
            rejected.errors[8].reason,
            Reason::CidrOutsidePodCidrs { .. }
        ));
        assert_eq!(rejected.created, Some(ts("2026-01-02T03:04:05Z")));
        assert!(!rejected.not_ready());
        assert_eq!(rejected, self::rejected(&node), "stable across decodes");
    }

    #[test]
    fn force_endpoint_wins() {
        // Even over a broken published endpoint: that is what it is for.
        let node = valid_node(
            &[
                (ann::FORCE_ENDPOINT, "[2001:db8::7]:4500"),
                (ann::ENDPOINT, "garbage"),
            ],
            &[],
        );
        let record = decode(&node, &cfg()).unwrap();
        assert_eq!(record.endpoint, "[2001:db8::7]:4500".parse().unwrap());
        assert!(record.endpoint_forced);

        let node = valid_node(
            &[(ann::FORCE_ENDPOINT, "203.0.113.1:51820")],
            &[ann::ENDPOINT],
        );
        assert!(decode(&node, &cfg()).unwrap().endpoint_forced);

        let node = valid_node(&[(ann::FORCE_ENDPOINT, "host:1")], &[]);
        let reason = only_error(&node, ann::FORCE_ENDPOINT);
        assert!(matches!(reason, Reason::BadEndpoint { .. }));
    }

    #[test]
    fn not_ready_only_for_unpublished_identity() {
        let fresh = node_of(&[], &[]);
        let rejected = decode(&fresh, &cfg()).unwrap_err();
        assert_eq!(rejected.errors.len(), 3, "{rejected}");
        assert!(rejected.not_ready());

        let with_spec = node_of(&[], &["10.244.1.0/24"]);
        assert!(decode(&with_spec, &cfg()).unwrap_err().not_ready());

        let key_only = valid_node(&[], &[ann::PUBLIC_KEY]);
        assert!(decode(&key_only, &cfg()).unwrap_err().not_ready());

        let also_broken = valid_node(&[(ann::KEY_GENERATION, "x")], &[ann::PUBLIC_KEY]);
        assert!(!decode(&also_broken, &cfg()).unwrap_err().not_ready());

        let bad_key = valid_node(&[(ann::PUBLIC_KEY, "x")], &[]);
        assert!(!decode(&bad_key, &cfg()).unwrap_err().not_ready());
    }

    #[test]
    fn surrounding_whitespace_is_tolerated() {
        let key = format!("  {}\n", key(1).to_base64());
        let node = valid_node(
            &[
                (ann::PUBLIC_KEY, &key),
                (ann::ENDPOINT, " 192.0.2.10:51820\n"),
                (ann::PERSISTENT_KEEPALIVE, "25\n"),
            ],
            &[],
        );
        assert!(decode(&node, &cfg()).is_ok());
        let inner = valid_node(&[(ann::ENDPOINT, "192.0.2.10: 51820")], &[]);
        assert!(decode(&inner, &cfg()).is_err());
    }

    #[test]
    fn merge_patch_is_none_in_steady_state() {
        let node = valid_node(&[(ann::FORCE_ENDPOINT, "203.0.113.1:1")], &[]);
        assert_eq!(merge_patch(&node, &local()), None);
    }

    #[test]
    fn merge_patch_contains_only_changed_keys() {
        let node = valid_node(&[("example.com/other", "keep")], &[]);
        let mut desired = local();
        desired.endpoint = "192.0.2.11:51820".parse().unwrap();
        desired.key_generation = 4;
        let patch = merge_patch(&node, &desired).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({"metadata": {"annotations": {
                "wgmesh.dev/endpoint": "192.0.2.11:51820",
                "wgmesh.dev/key-generation": "4",
            }}})
        );

        let mut bare = node.clone();
        bare.metadata.annotations = None;
        let patch = merge_patch(&bare, &desired).unwrap();
        // Every agent-owned key local() sets (all of them).
        assert_eq!(
            patch["metadata"]["annotations"].as_object().unwrap().len(),
            9
        );

        // A new head is one key; a head withdrawn is removed with null.
        let mut moved = local();
        moved.audit_head = Some(head(8));
        let patch = merge_patch(&node, &moved).unwrap();
        assert_eq!(
            patch,
            serde_json::json!({"metadata": {"annotations": {
                "wgmesh.dev/audit-head": format!("8:{}", "ab".repeat(32)),
            }}})
        );
        moved.audit_head = None;
        let patch = merge_patch(&node, &moved).unwrap();
        assert_eq!(
            patch["metadata"]["annotations"][ann::AUDIT_HEAD],
            Value::Null
        );
    }

    #[test]
    fn merge_patch_removes_next_key_with_null() {
        let node = valid_node(&[], &[]);
        let mut desired = local();
        desired.public_key = key(2);
        desired.next_public_key = None;
        desired.key_generation = 4;
        let patch = merge_patch(&node, &desired).unwrap();
        let annotations = patch["metadata"]["annotations"].as_object().unwrap();
        assert_eq!(annotations[ann::NEXT_PUBLIC_KEY], Value::Null);
        assert_eq!(annotations[ann::PUBLIC_KEY], key(2).to_base64());
        assert_eq!(annotations.len(), 3);
        assert!(!annotations.contains_key(ann::PERSISTENT_KEEPALIVE));
    }

    fn arb_key() -> impl Strategy<Value = PublicKey> {
        any::<[u8; 32]>()
            .prop_filter("all-zero private key", |b| *b != [0u8; 32])
            .prop_map(|b| {
                PrivateKey::from_base64(&STANDARD.encode(b))
                    .unwrap()
                    .public_key()
            })
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        let v4 = (any::<[u8; 4]>(), 1..=u16::MAX)
            .prop_map(|(ip, port)| SocketAddr::from((Ipv4Addr::from(ip), port)));
        let v6 = (any::<[u8; 16]>(), 1..=u16::MAX).prop_map(|(ip, port)| {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0))
        });
        prop_oneof![v4, v6]
            .prop_filter("usable", |a| unusable_endpoint(a).is_none())
            .prop_filter("canonical", |a| a.ip().to_canonical() == a.ip())
    }

    fn arb_cidr() -> impl Strategy<Value = IpNet> {
        let v4 = (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(ip, len)| IpNet::new(Ipv4Addr::from(ip).into(), len).unwrap());
        let v6 = (any::<[u8; 16]>(), 0u8..=128)
            .prop_map(|(ip, len)| IpNet::new(Ipv6Addr::from(ip).into(), len).unwrap());
        prop_oneof![v4, v6]
    }

    fn arb_local() -> impl Strategy<Value = LocalAnnotations> {
        (
            arb_key(),
            any::<u64>(),
            // Year 0 through 9999: the range RFC 3339 can write.
            -62_167_219_200i64..=253_402_300_799,
            proptest::option::of(arb_key()),
            arb_endpoint(),
            proptest::collection::vec(arb_cidr(), 1..5),
            proptest::option::of((1..=u64::MAX, any::<[u8; 32]>())),
        )
            .prop_filter("next key differs", |(k, _, _, n, _, _, _)| Some(*k) != *n)
            .prop_map(
                |(public_key, key_generation, secs, next, endpoint, cidrs, head)| {
                    LocalAnnotations {
                        public_key,
                        key_generation,
                        key_created: Timestamp::from_second(secs).unwrap(),
                        next_public_key: next,
                        endpoint,
                        pod_cidrs: cidrs,
                        audit_head: head.map(|(seq, hash)| AuditHead { seq, hash }),
                        last_rotation: None,
                        learned_prefixes: Vec::new(),
                    }
                },
            )
    }

    /// Values that get past the first checks sometimes: fragments of valid
    /// syntax, arbitrary unicode, and values around and beyond the size limit.
    fn arb_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[0-9a-fA-F:.\\[\\]/%, +-]{0,40}",
            "[0-9TZz:. +-]{0,30}",
            "[A-Za-z0-9+/=]{40,48}",
            (0usize..3, "\\PC{1,3}").prop_map(|(i, s)| s.repeat(MAX_VALUE_LEN - 1 + i)),
            proptest::collection::vec(any::<char>(), 4000..6000)
                .prop_map(|c| c.into_iter().collect()),
        ]
    }

    fn arb_key_name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(ann::AGENT_OWNED).prop_map(str::to_owned),
            Just(ann::FORCE_ENDPOINT.to_owned()),
            Just(ann::PERSISTENT_KEEPALIVE.to_owned()),
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decode_never_panics(
            annotations in proptest::collection::btree_map(arb_key_name(), arb_value(), 0..10),
            spec in proptest::collection::vec(arb_value(), 0..3),
            legacy in proptest::option::of(arb_value()),
            cluster in proptest::collection::vec(arb_cidr(), 0..3),
        ) {
            let mut node = node_with(annotations, spec);
            if let Some(spec) = node.spec.as_mut() {
                spec.pod_cidr = legacy;
            }
            let cfg = ValidationConfig { cluster_cidrs: cluster };
            if let Err(rejected) = decode(&node, &cfg) {
                prop_assert!(!rejected.errors.is_empty());
                let _ = rejected.to_string();
                let _ = rejected.not_ready();
            }
        }

        #[test]
        fn node_ips_are_usable_sorted_unique_and_outside_the_cluster(
            addresses in proptest::collection::vec(
                (
                    prop_oneof![Just("InternalIP"), Just("ExternalIP")],
                    prop_oneof![
                        any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
                        any::<[u8; 16]>().prop_map(|b| Ipv6Addr::from(b).to_string()),
                        any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_ipv6_mapped().to_string()),
                        any::<String>(),
                    ],
                ),
                0..8,
            ),
            cluster in proptest::collection::vec(arb_cidr(), 0..3),
        ) {
            let pairs: Vec<(&str, &str)> =
                addresses.iter().map(|(t, a)| (*t, a.as_str())).collect();
            let node = with_addresses(valid_node(&[], &[]), &pairs);
            let cfg = ValidationConfig { cluster_cidrs: cluster };
            let ips = node_ips(&node, &cfg);
            prop_assert!(ips.windows(2).all(|w| w[0] < w[1]), "{ips:?}");
            for ip in &ips {
                prop_assert_eq!(ip.to_canonical(), *ip);
                prop_assert!(unusable_address(*ip).is_none(), "{ip}");
                prop_assert!(!cfg.cluster_cidrs.iter().any(|c| c.contains(ip)), "{ip}");
                let listed = addresses.iter().any(|(t, a)| {
                    *t == "InternalIP" && a.parse::<IpAddr>().is_ok_and(|p| p.to_canonical() == *ip)
                });
                prop_assert!(listed, "{ip} was not an InternalIP");
            }
        }

        #[test]
        fn encode_then_decode_reproduces_local(local in arb_local(), use_spec in any::<bool>()) {
            let expected = canonical_set(local.pod_cidrs.iter().map(IpNet::trunc));
            let spec = if use_spec {
                expected.iter().map(IpNet::to_string).collect()
            } else {
                Vec::new()
            };
            let everything = ValidationConfig {
                cluster_cidrs: vec![net("0.0.0.0/0"), net("::/0")],
            };
            let node = node_with(encode(&local), spec);
            let record = decode(&node, &everything).map_err(|r| TestCaseError::fail(r.to_string()))?;
            prop_assert_eq!(record.public_key, local.public_key);
            prop_assert_eq!(record.key_generation, local.key_generation);
            prop_assert_eq!(record.key_created, Some(local.key_created));
            prop_assert_eq!(record.next_public_key, local.next_public_key);
            prop_assert_eq!(record.endpoint, local.endpoint);
            prop_assert!(!record.endpoint_forced);
            prop_assert_eq!(record.pod_cidrs, expected);
            prop_assert_eq!(record.audit_head, local.audit_head);
            prop_assert_eq!(merge_patch(&node, &local), None);
        }
    }
}
