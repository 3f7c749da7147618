//! The server's state: Nodes, Events, the global resourceVersion, the bounded change
//! history watches replay from, IPAM and the log of write requests.
//!
//! Everything is behind one mutex that is never held across an await, so every
//! operation (including read-modify-write patches) is atomic, like an etcd transaction.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, NodeSpec, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::events::{self, EventApi};
use super::ipam::IpamConfig;
use super::patch::{self, PatchKind};
use super::status::ApiError;
use super::{RecordedEvent, WriteRecord};

/// What happened to a Node at one resourceVersion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One entry of the watch history.
#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub kind: ChangeKind,
    pub object: Arc<Node>,
    /// The object before a modification, so filtered watches can turn a change that
    /// enters or leaves the selector into ADDED or DELETED as the apiserver does.
    pub previous: Option<Arc<Node>>,
}

/// Which endpoint an update arrived through: the strategies differ in what they keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    /// `/nodes/NAME`: status changes are discarded.
    Main,
    /// `/nodes/NAME/status`: spec changes are discarded.
    Status,
}

/// DeleteOptions preconditions.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// Query options every write takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOpts {
    /// `dryRun=All`: validate and answer, store nothing.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields are an error (otherwise dropped).
    pub strict: bool,
}

pub enum DeleteOutcome {
    /// Gone now; carries the last state.
    Deleted(Node),
    /// Finalizers hold it: `deletionTimestamp` is set and it stays until they are removed.
    Pending(Node),
}

pub struct Store {
    rv: u64,
    nodes: BTreeMap<String, Node>,
    history: VecDeque<Change>,
    history_limit: usize,
    /// Watches must start at a resourceVersion >= this; older ones get 410 Gone.
    compacted: u64,
    /// resourceVersion of the latest Node change (for list continue tokens).
    last_node_change: u64,
    events: BTreeMap<(String, String), CoreEvent>,
    event_apis: BTreeMap<(String, String), EventApi>,
    ipam: IpamConfig,
    writes: Vec<WriteRecord>,
    write_count: u64,
    ids: Ids,
}

/// Source of UIDs and generated name suffixes (unique per server, not secret).
struct Ids {
    serial: u64,
    hasher: std::collections::hash_map::RandomState,
}

impl Ids {
    fn random_u64(&mut self) -> u64 {
        self.serial += 1;
        let mut h = self.hasher.build_hasher();
        h.write_u64(self.serial);
        h.write_i128(Timestamp::now().as_nanosecond());
        h.finish()
    }

    fn new_uid(&mut self) -> String {
        let a = self.random_u64();
        let b = self.random_u64();
        // Shaped like a version 4 UUID.
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }
}

const NODE_RESOURCE: &str = "nodes";
const EVENT_RESOURCE: &str = "events";

impl Store {
    pub fn new(ipam: IpamConfig, history_limit: usize) -> Self {
        // Start well above 0: "0" means "any version" in list and watch requests.
        // Versions before the start never existed, so they count as compacted.
        const FIRST_RV: u64 = 100;
        Self {
            rv: FIRST_RV,
            nodes: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: FIRST_RV,
            last_node_change: 0,
            events: BTreeMap::new(),
            event_apis: BTreeMap::new(),
            ipam,
            writes: Vec::new(),
            write_count: 0,
            ids: Ids {
                serial: 0,
                hasher: std::collections::hash_map::RandomState::new(),
            },
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    // ---- write log -------------------------------------------------------------------

    pub fn record_write(&mut self, record: WriteRecord) {
        self.write_count += 1;
        // Bounded so a long-running testbed does not grow without limit; the count is exact.
        if self.writes.len() >= 10_000 {
            self.writes.remove(0);
        }
        self.writes.push(record);
    }

    pub fn write_count(&self) -> u64 {
        self.write_count
    }

    pub fn writes(&self) -> Vec<WriteRecord> {
        self.writes.clone()
    }

    // ---- nodes -----------------------------------------------------------------------

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.values().cloned().collect()
    }

    pub fn get_node(&self, name: &str) -> Result<Node, ApiError> {
        self.nodes
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(NODE_RESOURCE, name))
    }

    /// True when no Node changed after `rv` (a continue token from `rv` is still exact).
    pub fn nodes_unchanged_since(&self, rv: u64) -> bool {
        self.last_node_change <= rv
    }

    pub fn create_node(&mut self, node: Node, opts: WriteOpts) -> Result<Node, ApiError> {
        let mut node = node;
        let nodes = &self.nodes;
        let name = resolve_name(&mut node.metadata, |n| nodes.contains_key(n), &mut self.ids);
        if name.is_empty() {
            return Err(ApiError::invalid(
                "Node",
                NODE_RESOURCE,
                "",
                &["metadata.name: Required value: name or generateName is required".into()],
            ));
        }
        if self.nodes.contains_key(&name) {
            return Err(ApiError::already_exists(NODE_RESOURCE, &name));
        }
        let meta = &mut node.metadata;
        meta.namespace = None;
        meta.uid = Some(self.ids.new_uid());
        meta.creation_timestamp = Some(Time(now_seconds()));
        meta.resource_version = None;
        meta.deletion_timestamp = None;
        meta.deletion_grace_period_seconds = None;
        meta.generation = None;
        meta.managed_fields = None;
        default_pod_cidrs(&mut node);
        let causes = validate_node(&node, None);
        if !causes.is_empty() {
            return Err(ApiError::invalid("Node", NODE_RESOURCE, &name, &causes));
        }
        let needs_cidrs = node
            .spec
            .as_ref()
            .is_none_or(|s| s.pod_cidrs.as_ref().is_none_or(Vec::is_empty));
        let mut cidr_unavailable = false;
        if needs_cidrs && !self.ipam.cluster_cidrs.is_empty() {
            match self.ipam.allocate(&self.used_pod_cidrs()) {
                Some(cidrs) => {
                    let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
                    let spec = node.spec.get_or_insert_with(NodeSpec::default);
                    spec.pod_cidr = cidrs.first().cloned();
                    spec.pod_cidrs = Some(cidrs);
                }
                None => cidr_unavailable = true,
            }
        }
        let mut node = canonical(&node)?;
        if opts.dry_run {
            return Ok(node);
        }
        let rv = self.bump();
        node.metadata.resource_version = Some(rv.to_string());
        self.nodes.insert(name.clone(), node.clone());
        self.push_change(rv, ChangeKind::Added, &node, None);
        if cidr_unavailable {
            tracing::warn!(node = %name, "no free pod CIDR left in the cluster CIDRs");
            self.controller_event(
                &node,
                "CIDRNotAvailable",
                &format!("Node {name} status is now: CIDRNotAvailable"),
            );
        }
        Ok(node)
    }

    /// Replaces a Node with `proposed` (from PUT or a patched copy) under the endpoint's
    /// strategy, optimistic concurrency and validation. An update that changes nothing
    /// is not a write: no new resourceVersion, no watch event, as on a real apiserver.
    pub fn update_node(
        &mut self,
        name: &str,
        proposed: Node,
        sub: Subresource,
        opts: WriteOpts,
    ) -> Result<Node, ApiError> {
        let old = self.get_node(name)?;
        let mut new = proposed;
        let proposed_name = new.metadata.name.clone().unwrap_or_default();
        if proposed_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({proposed_name}) does not match the name on the URL ({name})"
            )));
        }
        let old_uid = old.metadata.uid.as_deref().unwrap_or("");
        if let Some(uid) = new.metadata.uid.as_deref().filter(|u| !u.is_empty()) {
            if uid != old_uid {
                return Err(ApiError::conflict(
                    NODE_RESOURCE,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
                    ),
                ));
            }
        }
        if let Some(rv) = new
            .metadata
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty())
        {
            if Some(rv) != old.metadata.resource_version.as_deref() {
                return Err(ApiError::conflict(NODE_RESOURCE, name, MODIFIED_CONFLICT));
            }
        }
        {
            let meta = &mut new.metadata;
            meta.namespace = None;
            meta.uid = old.metadata.uid.clone();
            meta.creation_timestamp = old.metadata.creation_timestamp.clone();
            meta.deletion_timestamp = old.metadata.deletion_timestamp.clone();
            meta.deletion_grace_period_seconds = old.metadata.deletion_grace_period_seconds;
            meta.generation = old.metadata.generation;
            meta.managed_fields = old.metadata.managed_fields.clone();
            meta.resource_version = old.metadata.resource_version.clone();
        }
        match sub {
            Subresource::Main => new.status = old.status.clone(),
            Subresource::Status => new.spec = old.spec.clone(),
        }
        default_pod_cidrs(&mut new);
        let causes = validate_node(&new, Some(&old));
        if !causes.is_empty() {
            return Err(ApiError::invalid("Node", NODE_RESOURCE, name, &causes));
        }
        let mut new = canonical(&new)?;
        if same_json(&new, &old)? {
            return Ok(old);
        }
        let finalized = new.metadata.deletion_timestamp.is_some()
            && new.metadata.finalizers.as_ref().is_none_or(Vec::is_empty);
        if opts.dry_run {
            return Ok(new);
        }
        let rv = self.bump();
        new.metadata.resource_version = Some(rv.to_string());
        let previous = Arc::new(old);
        if finalized {
            self.nodes.remove(name);
            self.push_change(rv, ChangeKind::Deleted, &new, Some(previous));
        } else {
            self.nodes.insert(name.to_string(), new.clone());
            self.push_change(rv, ChangeKind::Modified, &new, Some(previous));
        }
        Ok(new)
    }

    /// Applies a PATCH body to the current object and stores the result, atomically.
    pub fn patch_node(
        &mut self,
        name: &str,
        kind: PatchKind,
        body: &[u8],
        sub: Subresource,
        opts: WriteOpts,
    ) -> Result<Node, ApiError> {
        let current = self.get_node(name)?;
        let mut doc = serde_json::to_value(&current).map_err(internal)?;
        patch::apply(&mut doc, kind, body)?;
        let proposed: Node = decode(doc, opts.strict).map_err(|e| {
            ApiError::unprocessable(format!(
                "the patched Node \"{name}\" is not a valid Node: {}",
                e.message
            ))
        })?;
        self.update_node(name, proposed, sub, opts)
    }

    pub fn delete_node(
        &mut self,
        name: &str,
        pre: &Preconditions,
        opts: WriteOpts,
    ) -> Result<DeleteOutcome, ApiError> {
        let old = self.get_node(name)?;
        let old_uid = old.metadata.uid.as_deref().unwrap_or("");
        if let Some(uid) = pre.uid.as_deref().filter(|u| *u != old_uid) {
            return Err(ApiError::conflict(
                NODE_RESOURCE,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
                ),
            ));
        }
        let old_rv = old.metadata.resource_version.as_deref().unwrap_or("");
        if let Some(rv) = pre.resource_version.as_deref().filter(|r| *r != old_rv) {
            return Err(ApiError::conflict(
                NODE_RESOURCE,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {old_rv}"
                ),
            ));
        }
        let has_finalizers = old
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if old.metadata.deletion_timestamp.is_some() || opts.dry_run {
                return Ok(DeleteOutcome::Pending(old));
            }
            let mut new = old.clone();
            new.metadata.deletion_timestamp = Some(Time(now_seconds()));
            new.metadata.deletion_grace_period_seconds = Some(0);
            let rv = self.bump();
            new.metadata.resource_version = Some(rv.to_string());
            self.nodes.insert(name.to_string(), new.clone());
            self.push_change(rv, ChangeKind::Modified, &new, Some(Arc::new(old)));
            return Ok(DeleteOutcome::Pending(new));
        }
        if opts.dry_run {
            return Ok(DeleteOutcome::Deleted(old));
        }
        let rv = self.bump();
        let mut gone = old.clone();
        gone.metadata.resource_version = Some(rv.to_string());
        self.nodes.remove(name);
        self.push_change(rv, ChangeKind::Deleted, &gone, Some(Arc::new(old)));
        Ok(DeleteOutcome::Deleted(gone))
    }

    /// Every Node change after `since`, plus the resourceVersion they bring the watcher
    /// up to; `Err` (410 Gone) when part of that range has left the history.
    pub fn changes_since(&self, since: u64) -> Result<(Vec<Change>, u64), ApiError> {
        self.check_watch_start(since)?;
        let start = self.history.partition_point(|c| c.rv <= since);
        Ok((self.history.range(start..).cloned().collect(), self.rv))
    }

    /// Whether a watch may start at `rv`.
    pub fn check_watch_start(&self, rv: u64) -> Result<(), ApiError> {
        if rv < self.compacted {
            Err(ApiError::gone(format!(
                "too old resource version: {rv} ({})",
                self.compacted
            )))
        } else {
            Ok(())
        }
    }

    /// Drops the whole history and reserves a new resourceVersion, so every version
    /// handed out so far is too old to watch from (like an etcd compaction followed by
    /// an apiserver restart; the caller also ends the open watches).
    pub fn compact(&mut self) {
        self.bump();
        self.compacted = self.rv;
        self.history.clear();
    }

    fn push_change(&mut self, rv: u64, kind: ChangeKind, node: &Node, previous: Option<Arc<Node>>) {
        self.last_node_change = rv;
        self.history.push_back(Change {
            rv,
            kind,
            object: Arc::new(node.clone()),
            previous,
        });
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
    }

    fn used_pod_cidrs(&self) -> Vec<IpNet> {
        self.nodes
            .values()
            .filter_map(|n| n.spec.as_ref()?.pod_cidrs.as_ref())
            .flatten()
            .filter_map(|c| c.parse().ok())
            .collect()
    }

    // ---- events ----------------------------------------------------------------------

    pub fn create_event(
        &mut self,
        namespace: &str,
        api: EventApi,
        body: Value,
        opts: WriteOpts,
    ) -> Result<Value, ApiError> {
        let mut event = decode_event(api, body, opts.strict)?;
        check_namespace(&event.metadata, namespace)?;
        let events = &self.events;
        let name = resolve_name(
            &mut event.metadata,
            |n| events.contains_key(&(namespace.to_string(), n.to_string())),
            &mut self.ids,
        );
        if name.is_empty() {
            return Err(ApiError::invalid(
                "Event",
                EVENT_RESOURCE,
                "",
                &["metadata.name: Required value: name or generateName is required".into()],
            ));
        }
        let key = (namespace.to_string(), name.clone());
        if self.events.contains_key(&key) {
            return Err(ApiError::already_exists(EVENT_RESOURCE, &name));
        }
        let causes = match api {
            EventApi::EventsV1 => events::validate_events_v1(&events::to_events_v1(&event)),
            EventApi::Core => events::validate_core(&event),
        };
        if !causes.is_empty() {
            return Err(ApiError::invalid("Event", EVENT_RESOURCE, &name, &causes));
        }
        let meta = &mut event.metadata;
        meta.namespace = Some(namespace.to_string());
        meta.uid = Some(self.ids.new_uid());
        meta.creation_timestamp = Some(Time(now_seconds()));
        meta.generation = None;
        meta.managed_fields = None;
        meta.resource_version = None;
        let mut event = canonical(&event)?;
        if opts.dry_run {
            return encode_event(api, &event);
        }
        event.metadata.resource_version = Some(self.bump().to_string());
        self.events.insert(key.clone(), event.clone());
        self.event_apis.insert(key, api);
        encode_event(api, &event)
    }

    pub fn get_event(&self, namespace: &str, name: &str, api: EventApi) -> Result<Value, ApiError> {
        let event = self
            .events
            .get(&(namespace.to_string(), name.to_string()))
            .ok_or_else(|| ApiError::not_found(EVENT_RESOURCE, name))?;
        encode_event(api, event)
    }

    /// Events of one namespace (or all), in the core/v1 form.
    pub fn list_events(&self, namespace: Option<&str>) -> Vec<CoreEvent> {
        self.events
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn recorded_events(&self) -> Vec<RecordedEvent> {
        self.events
            .iter()
            .map(|(key, e)| {
                RecordedEvent::from_core(
                    e.clone(),
                    self.event_apis.get(key).copied().unwrap_or(EventApi::Core),
                )
            })
            .collect()
    }

    pub fn patch_event(
        &mut self,
        namespace: &str,
        name: &str,
        api: EventApi,
        kind: PatchKind,
        body: &[u8],
        opts: WriteOpts,
    ) -> Result<Value, ApiError> {
        let mut doc = self.get_event(namespace, name, api)?;
        patch::apply(&mut doc, kind, body)?;
        self.replace_event(namespace, name, api, doc, opts)
            .map_err(|e| {
                if e.code == 400 {
                    ApiError::unprocessable(e.message)
                } else {
                    e
                }
            })
    }

    pub fn replace_event(
        &mut self,
        namespace: &str,
        name: &str,
        api: EventApi,
        body: Value,
        opts: WriteOpts,
    ) -> Result<Value, ApiError> {
        let key = (namespace.to_string(), name.to_string());
        let old = self
            .events
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(EVENT_RESOURCE, name))?;
        let mut new = decode_event(api, body, opts.strict)?;
        check_namespace(&new.metadata, namespace)?;
        if new.metadata.name.as_deref() != Some(name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                new.metadata.name.as_deref().unwrap_or("")
            )));
        }
        if let Some(rv) = new
            .metadata
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty())
        {
            if Some(rv) != old.metadata.resource_version.as_deref() {
                return Err(ApiError::conflict(EVENT_RESOURCE, name, MODIFIED_CONFLICT));
            }
        }
        let meta = &mut new.metadata;
        meta.namespace = Some(namespace.to_string());
        meta.uid = old.metadata.uid.clone();
        meta.creation_timestamp = old.metadata.creation_timestamp.clone();
        meta.resource_version = old.metadata.resource_version.clone();
        let causes = events::validate_core(&new);
        if !causes.is_empty() {
            return Err(ApiError::invalid("Event", EVENT_RESOURCE, name, &causes));
        }
        let mut new = canonical(&new)?;
        if same_json(&new, &old)? || opts.dry_run {
            return encode_event(api, &new);
        }
        new.metadata.resource_version = Some(self.bump().to_string());
        self.events.insert(key, new.clone());
        encode_event(api, &new)
    }

    pub fn delete_event(
        &mut self,
        namespace: &str,
        name: &str,
        opts: WriteOpts,
    ) -> Result<CoreEvent, ApiError> {
        let key = (namespace.to_string(), name.to_string());
        let old = self
            .events
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(EVENT_RESOURCE, name))?;
        if !opts.dry_run {
            self.bump();
            self.events.remove(&key);
            self.event_apis.remove(&key);
        }
        Ok(old)
    }

    /// An Event raised by the server itself, the way a controller would (core/v1,
    /// namespace `default`, since Nodes are cluster-scoped).
    fn controller_event(&mut self, node: &Node, reason: &str, message: &str) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let now = Timestamp::now();
        let event_name = format!("{name}.{:x}", now.as_nanosecond());
        let rv = self.bump();
        let event = CoreEvent {
            metadata: ObjectMeta {
                name: Some(event_name.clone()),
                namespace: Some("default".into()),
                uid: Some(self.ids.new_uid()),
                creation_timestamp: Some(Time(now_seconds())),
                resource_version: Some(rv.to_string()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                uid: node.metadata.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(Time(now_seconds())),
            last_timestamp: Some(Time(now_seconds())),
            reporting_component: Some("cidrAllocator".into()),
            reporting_instance: Some("wgmesh-testbed".into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("cidrAllocator".into()),
                host: None,
            }),
            ..CoreEvent::default()
        };
        let Ok(event) = canonical(&event) else {
            return;
        };
        let key = ("default".to_string(), event_name);
        self.events.insert(key.clone(), event);
        self.event_apis.insert(key, EventApi::Core);
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }
}

const MODIFIED_CONFLICT: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// The object's name, generating one from `generateName` when needed ("" when neither).
fn resolve_name(meta: &mut ObjectMeta, taken: impl Fn(&str) -> bool, ids: &mut Ids) -> String {
    if let Some(name) = meta.name.as_deref().filter(|n| !n.is_empty()) {
        return name.to_string();
    }
    let Some(prefix) = meta.generate_name.clone().filter(|p| !p.is_empty()) else {
        return String::new();
    };
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    loop {
        let mut r = ids.random_u64();
        let mut suffix = String::with_capacity(5);
        for _ in 0..5 {
            suffix.push(char::from(ALPHABET[(r % ALPHABET.len() as u64) as usize]));
            r /= ALPHABET.len() as u64;
        }
        let name = format!("{prefix}{suffix}");
        if !taken(&name) {
            meta.name = Some(name.clone());
            return name;
        }
    }
}

fn internal(e: serde_json::Error) -> ApiError {
    ApiError::new(500, "InternalError", format!("encoding failed: {e}"))
}

/// Timestamps with the one-second precision `metav1.Time` has on the wire, so an object
/// read back and written unchanged compares equal to the stored one.
fn now_seconds() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// The object as it will look after a JSON round trip (timestamps truncated, defaults
/// dropped), so comparisons and no-op detection work on what clients see.
fn canonical<T: Serialize + DeserializeOwned>(t: &T) -> Result<T, ApiError> {
    let v = serde_json::to_value(t).map_err(internal)?;
    serde_json::from_value(v).map_err(internal)
}

fn same_json<T: Serialize>(a: &T, b: &T) -> Result<bool, ApiError> {
    Ok(serde_json::to_value(a).map_err(internal)? == serde_json::to_value(b).map_err(internal)?)
}

/// The apiserver's defaulting: `podCIDR` and `podCIDRs[0]` mirror each other.
fn default_pod_cidrs(node: &mut Node) {
    let Some(spec) = node.spec.as_mut() else {
        return;
    };
    let single = spec.pod_cidr.clone().filter(|c| !c.is_empty());
    let list_empty = spec.pod_cidrs.as_ref().is_none_or(Vec::is_empty);
    match (single, list_empty) {
        (Some(c), true) => spec.pod_cidrs = Some(vec![c]),
        (None, false) => spec.pod_cidr = spec.pod_cidrs.as_ref().and_then(|l| l.first().cloned()),
        _ => {}
    }
}

/// Node validation: names, label and annotation syntax, pod CIDRs, and on update the
/// immutability of pod CIDRs once set.
pub fn validate_node(node: &Node, old: Option<&Node>) -> Vec<String> {
    let mut causes = Vec::new();
    let name = node.metadata.name.as_deref().unwrap_or("");
    if !is_dns_subdomain(name) {
        causes.push(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    if let Some(labels) = &node.metadata.labels {
        for (k, v) in labels {
            if let Err(why) = check_qualified_name(k) {
                causes.push(format!("metadata.labels: Invalid value: \"{k}\": {why}"));
            }
            if !is_label_value(v) {
                causes.push(format!(
                    "metadata.labels: Invalid value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)"
                ));
            }
        }
    }
    if let Some(annotations) = &node.metadata.annotations {
        let mut total = 0;
        for (k, v) in annotations {
            total += k.len() + v.len();
            if let Err(why) = check_qualified_name(&k.to_ascii_lowercase()) {
                causes.push(format!(
                    "metadata.annotations: Invalid value: \"{k}\": {why}"
                ));
            }
        }
        if total > 256 * 1024 {
            causes.push(format!(
                "metadata.annotations: Too long: must have at most 262144 bytes (has {total})"
            ));
        }
    }
    let cidrs = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidrs.clone())
        .unwrap_or_default();
    if cidrs.len() > 2 {
        causes.push("spec.podCIDRs: Too many: may have at most 2 items (one per family)".into());
    }
    let mut families = Vec::new();
    for (i, c) in cidrs.iter().enumerate() {
        match c.parse::<IpNet>() {
            Ok(net) => {
                let v4 = matches!(net, IpNet::V4(_));
                if families.contains(&v4) {
                    causes.push(format!(
                        "spec.podCIDRs: Invalid value: {cidrs:?}: may specify no more than one CIDR for each IP family"
                    ));
                }
                families.push(v4);
            }
            Err(_) => causes.push(format!(
                "spec.podCIDRs[{i}]: Invalid value: \"{c}\": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
            )),
        }
    }
    if let Some(spec) = &node.spec {
        if let (Some(single), Some(first)) = (spec.pod_cidr.as_ref(), cidrs.first()) {
            if single != first {
                causes.push(format!(
                    "spec.podCIDRs[0]: Invalid value: \"{first}\": must match spec.podCIDR \"{single}\""
                ));
            }
        }
    }
    if let Some(old) = old {
        let old_cidrs = old
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidrs.clone())
            .unwrap_or_default();
        if !old_cidrs.is_empty() && old_cidrs != cidrs {
            causes.push(
                "spec.podCIDRs: Forbidden: node updates may not change podCIDR except from \"\" to valid"
                    .into(),
            );
        }
    }
    causes
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_label_value(v: &str) -> bool {
    v.is_empty() || is_qualified_name_part(v)
}

fn is_qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// A label or annotation key: `[prefix/]name`, prefix a DNS subdomain.
fn check_qualified_name(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if !is_dns_subdomain(prefix) {
            return Err("prefix part must be a lowercase RFC 1123 subdomain");
        }
    }
    if !is_qualified_name_part(name) {
        return Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)");
    }
    Ok(())
}

fn check_namespace(meta: &ObjectMeta, namespace: &str) -> Result<(), ApiError> {
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(()),
    }
}

fn decode_event(api: EventApi, body: Value, strict: bool) -> Result<CoreEvent, ApiError> {
    check_type_meta(&body, api.api_version(), "Event")?;
    match api {
        EventApi::Core => decode(body, strict),
        EventApi::EventsV1 => decode(body, strict).map(events::from_events_v1),
    }
}

/// Decodes a request object. Fields the type does not have are dropped, or with
/// `strict` (`fieldValidation=Strict`) refused with the apiserver's 400.
pub fn decode<T: Serialize + DeserializeOwned>(body: Value, strict: bool) -> Result<T, ApiError> {
    let decoded: T = serde_json::from_value(body.clone())
        .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))?;
    if strict {
        let mut unknown = Vec::new();
        let round_trip = serde_json::to_value(&decoded).map_err(internal)?;
        unknown_fields(&body, &round_trip, "", &mut unknown);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                list.join(", ")
            )));
        }
    }
    Ok(decoded)
}

/// Paths present (and not null) in `input` but absent after decoding.
fn unknown_fields(input: &Value, decoded: &Value, prefix: &str, out: &mut Vec<String>) {
    match (input, decoded) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match b.get(k) {
                    Some(d) => unknown_fields(v, d, &path, out),
                    None if v.is_null() => {}
                    None => out.push(path),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn encode_event(api: EventApi, event: &CoreEvent) -> Result<Value, ApiError> {
    match api {
        EventApi::Core => serde_json::to_value(event),
        EventApi::EventsV1 => serde_json::to_value(events::to_events_v1(event)),
    }
    .map_err(internal)
}

/// Rejects a body whose apiVersion/kind name another type (both may be absent).
pub fn check_type_meta(body: &Value, api_version: &str, kind: &str) -> Result<(), ApiError> {
    if let Some(v) = body.get("apiVersion").and_then(Value::as_str) {
        if v != api_version {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    if let Some(k) = body.get("kind").and_then(Value::as_str) {
        if k != kind {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({kind})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    #[test]
    fn create_allocates_and_bumps() {
        let mut s = Store::new(IpamConfig::default(), 10);
        let a = s.create_node(node("a"), WriteOpts::default()).unwrap();
        let b = s.create_node(node("b"), WriteOpts::default()).unwrap();
        assert_eq!(
            a.spec.as_ref().unwrap().pod_cidrs,
            Some(vec!["10.244.0.0/24".to_string()])
        );
        assert_eq!(
            b.spec.as_ref().unwrap().pod_cidr.as_deref(),
            Some("10.244.1.0/24")
        );
        assert!(a.metadata.resource_version < b.metadata.resource_version);
        assert_eq!(
            s.create_node(node("a"), WriteOpts::default())
                .unwrap_err()
                .code,
            409
        );
    }

    #[test]
    fn noop_patch_is_not_a_change() {
        let mut s = Store::new(IpamConfig::default(), 10);
        s.create_node(node("a"), WriteOpts::default()).unwrap();
        let rv = s.resource_version();
        let body = br#"{"metadata":{"annotations":{"k":"v"}}}"#;
        s.patch_node(
            "a",
            PatchKind::Merge,
            body,
            Subresource::Main,
            WriteOpts::default(),
        )
        .unwrap();
        assert_eq!(s.resource_version(), rv + 1);
        s.patch_node(
            "a",
            PatchKind::Merge,
            body,
            Subresource::Main,
            WriteOpts::default(),
        )
        .unwrap();
        assert_eq!(s.resource_version(), rv + 1);
    }

    #[test]
    fn pod_cidrs_are_immutable_once_set() {
        let mut s = Store::new(IpamConfig::default(), 10);
        s.create_node(node("a"), WriteOpts::default()).unwrap();
        let err = s
            .patch_node(
                "a",
                PatchKind::Merge,
                br#"{"spec":{"podCIDR":"10.9.0.0/24","podCIDRs":["10.9.0.0/24"]}}"#,
                Subresource::Main,
                WriteOpts::default(),
            )
            .unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Store::new(IpamConfig::default(), 2);
        let first = s.resource_version();
        for n in ["a", "b", "c"] {
            s.create_node(node(n), WriteOpts::default()).unwrap();
        }
        assert_eq!(s.changes_since(first).unwrap_err().code, 410);
        let (changes, _) = s.changes_since(first + 1).unwrap();
        assert_eq!(changes.len(), 2);
    }

    #[test]
    fn finalizers_hold_deletion() {
        let mut s = Store::new(IpamConfig::default(), 10);
        let mut n = node("a");
        n.metadata.finalizers = Some(vec!["x/y".into()]);
        s.create_node(n, WriteOpts::default()).unwrap();
        let out = s
            .delete_node("a", &Preconditions::default(), WriteOpts::default())
            .unwrap();
        assert!(matches!(out, DeleteOutcome::Pending(_)));
        assert!(s
            .get_node("a")
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some());
        s.patch_node(
            "a",
            PatchKind::Merge,
            br#"{"metadata":{"finalizers":null}}"#,
            Subresource::Main,
            WriteOpts::default(),
        )
        .unwrap();
        assert_eq!(s.get_node("a").unwrap_err().code, 404);
    }
}
