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
#[path = "codec_tests.rs"]
mod tests;
