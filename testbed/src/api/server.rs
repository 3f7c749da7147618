//! HTTP/1.1 front end: the accept loop, the router, and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::discovery;
use super::events::EventApi;
use super::patch::PatchKind;
use super::selector::{FieldSelector, LabelSelector};
use super::status::{success_status, ApiError};
use super::store::{
    check_type_meta, decode, Change, ChangeKind, DeleteOutcome, Preconditions, Store, Subresource,
    WriteOpts,
};
use super::table::{self, IncludeObject, TABLE_CONTENT_TYPE};
use super::WriteRecord;

pub type Body = BoxBody<Bytes, Infallible>;

/// Request bodies above this are refused (the apiserver's limit is 3 MiB too).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// Watches without `timeoutSeconds` end after this long (the apiserver picks 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// State shared by the accept loop, every request and the handle.
pub struct Shared {
    pub store: Mutex<Store>,
    /// Bumped after every change; watch streams wait on it.
    pub changes: watch::Sender<u64>,
    /// Bumped by `compact()`: every open watch ends, as after an apiserver restart.
    pub epoch: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    pub bookmark_interval: Duration,
    pub addr: SocketAddr,
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves consistent data (every operation checks
        // before it mutates), so a poisoned lock is still usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the watch streams.
    pub fn notify(&self) {
        let rv = self.store().resource_version();
        self.changes.send_replace(rv);
    }
}

/// Accepts connections until shutdown, then lets open requests finish (watches end on
/// the same signal) for up to five seconds.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    let shutdown = shared.shutdown.subscribe();
                    connections.spawn(serve_connection(stream, peer, shared, shutdown));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        connections.abort_all();
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Resolves once shutdown is signalled (the guard `wait_for` returns is not `Send`, so
/// it must not live in the caller's future).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A parsed request as the route handlers see it.
struct Req {
    method: Method,
    query: HashMap<String, String>,
    content_type: String,
    accept: Option<String>,
    body: Bytes,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> Option<bool> {
        self.q(key).map(|v| v == "true" || v == "1")
    }

    fn opts(&self) -> WriteOpts {
        WriteOpts {
            dry_run: self.q("dryRun") == Some("All"),
            strict: self.q("fieldValidation") == Some("Strict"),
        }
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        let mime = self
            .content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(mime.is_empty() || mime == "application/json" || mime == "*/*") {
            return Err(ApiError::unsupported_media_type(&mime));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding request body: {e}")))
    }

    fn patch_kind(&self) -> Result<PatchKind, ApiError> {
        PatchKind::from_content_type(&self.content_type)
    }

    fn table(&self) -> bool {
        table::wants_table(self.accept.as_deref())
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(CONTENT_TYPE).unwrap_or_default();
    let accept = header(ACCEPT);
    let user_agent = header(USER_AGENT);
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let is_write = matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && (path.starts_with("/api/") || path.starts_with("/apis/"));

    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let err = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    format!("the request body is larger than {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            };
            return error_response(&err);
        }
    };
    let request = Req {
        method: method.clone(),
        query,
        content_type,
        accept,
        body,
    };
    let response = route(&shared, &path, &request).unwrap_or_else(|e| error_response(&e));
    let status = response.status().as_u16();
    tracing::debug!(%method, path = %path_and_query, status, "request");
    if is_write {
        shared.store().record_write(WriteRecord {
            method: method.to_string(),
            path: path_and_query,
            user_agent,
            status,
        });
        shared.notify();
    }
    response
}

fn route(shared: &Arc<Shared>, path: &str, req: &Req) -> Result<Response<Body>, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    const EV1: &str = "events.k8s.io";
    match segs.as_slice() {
        ["version"] => get_only(req, discovery::version),
        // Not Kubernetes: lets a testbed outside this process read the write counter
        // (the steady-state check: zero writes while nothing changes).
        ["testbed", "writes"] => get_only(
            req,
            || serde_json::json!({ "count": shared.store().write_count() }),
        ),
        ["healthz"] | ["livez"] | ["readyz"] => {
            get_only(req, || Value::Null)?;
            Ok(text_response(StatusCode::OK, "ok"))
        }
        ["api"] => get_only(req, || discovery::api_versions(shared.addr)),
        ["api", "v1"] => get_only(req, discovery::core_v1_resources),
        ["apis"] => get_only(req, discovery::api_groups),
        ["openapi", "v3"] => get_only(req, discovery::openapi_v3_root),
        ["openapi", "v3", rest @ ..] => {
            let doc =
                discovery::openapi_v3_group(&rest.join("/")).ok_or_else(ApiError::no_route)?;
            get_only(req, || doc)
        }
        ["api", "v1", "pods"] => pods_stub(shared, req),
        ["api", "v1", "namespaces", _, "pods"] => pods_stub(shared, req),
        ["apis", EV1] => get_only(req, discovery::events_group),
        ["apis", EV1, "v1"] => get_only(req, discovery::events_v1_resources),
        ["api", "v1", "nodes"] => nodes_collection(shared, req, None),
        ["api", "v1", "watch", "nodes"] => nodes_collection(shared, req, Some(None)),
        ["api", "v1", "watch", "nodes", name] => nodes_collection(shared, req, Some(Some(name))),
        ["api", "v1", "nodes", name] => node_item(shared, req, name, Subresource::Main),
        ["api", "v1", "nodes", name, "status"] => node_item(shared, req, name, Subresource::Status),
        ["api", "v1", "events"] => events_collection(shared, req, None, EventApi::Core),
        ["api", "v1", "namespaces", ns, "events"] => {
            events_collection(shared, req, Some(ns), EventApi::Core)
        }
        ["api", "v1", "namespaces", ns, "events", name] => {
            event_item(shared, req, ns, name, EventApi::Core)
        }
        ["apis", EV1, "v1", "events"] => events_collection(shared, req, None, EventApi::EventsV1),
        ["apis", EV1, "v1", "namespaces", ns, "events"] => {
            events_collection(shared, req, Some(ns), EventApi::EventsV1)
        }
        ["apis", EV1, "v1", "namespaces", ns, "events", name] => {
            event_item(shared, req, ns, name, EventApi::EventsV1)
        }
        _ => Err(ApiError::no_route()),
    }
}

fn get_only(req: &Req, body: impl FnOnce() -> Value) -> Result<Response<Body>, ApiError> {
    if req.method != Method::GET {
        return Err(ApiError::method_not_allowed(req.method.as_str()));
    }
    Ok(json_response(StatusCode::OK, &body()))
}

// ---- nodes ---------------------------------------------------------------------------

const NODE_FIELDS: &[&str] = &["metadata.name", "metadata.namespace", "spec.unschedulable"];

struct NodeFilter {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl NodeFilter {
    fn from_req(req: &Req, name: Option<&str>) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))?;
        let mut field_text = req.q("fieldSelector").unwrap_or("").to_string();
        if let Some(name) = name {
            if !field_text.is_empty() {
                field_text.push(',');
            }
            field_text.push_str(&format!("metadata.name={name}"));
        }
        let fields = FieldSelector::parse(&field_text, NODE_FIELDS, "Node")?;
        Ok(Self { labels, fields })
    }

    fn matches(&self, node: &Node) -> bool {
        self.labels.matches(node.metadata.labels.as_ref())
            && self.fields.matches(|field| match field {
                "metadata.name" => node.metadata.name.clone().unwrap_or_default(),
                "spec.unschedulable" => node
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false)
                    .to_string(),
                _ => String::new(),
            })
    }
}

/// `watch_path`: `Some(name?)` for the legacy `/api/v1/watch/nodes[/NAME]` paths.
fn nodes_collection(
    shared: &Arc<Shared>,
    req: &Req,
    watch_path: Option<Option<&str>>,
) -> Result<Response<Body>, ApiError> {
    match req.method {
        Method::GET => {
            let filter = NodeFilter::from_req(req, watch_path.flatten())?;
            if watch_path.is_some() || req.flag("watch") == Some(true) {
                start_watch(shared, req, filter)
            } else {
                list_nodes(shared, req, &filter)
            }
        }
        Method::POST if watch_path.is_none() => {
            let body = req.json_body()?;
            check_type_meta(&body, "v1", "Node")?;
            let node: Node = decode(body, req.opts().strict)?;
            let created = shared.store().create_node(node, req.opts())?;
            Ok(object_response(StatusCode::CREATED, &created))
        }
        _ => Err(ApiError::method_not_allowed(req.method.as_str())),
    }
}

fn list_nodes(
    shared: &Arc<Shared>,
    req: &Req,
    filter: &NodeFilter,
) -> Result<Response<Body>, ApiError> {
    let store = shared.store();
    let current = store.resource_version();
    if req.q("resourceVersionMatch") == Some("Exact") {
        let wanted = req.q("resourceVersion").unwrap_or("");
        if wanted != current.to_string() {
            return Err(ApiError::gone(format!(
                "too old resource version: {wanted} ({current}): this test API only serves the current state"
            )));
        }
    }
    // Continue tokens are "<snapshot rv>/<last name>"; a page is only served while no
    // Node changed since the snapshot, so a paginated list is always consistent.
    let (snapshot, after) = match req.q("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, name) = token
                .split_once('/')
                .and_then(|(rv, name)| Some((rv.parse::<u64>().ok()?, name.to_string())))
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if !store.nodes_unchanged_since(rv) {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some(name))
        }
        None => (current, None),
    };
    let mut items: Vec<Node> = store
        .nodes()
        .into_iter()
        .filter(|n| filter.matches(n))
        .filter(|n| {
            after
                .as_deref()
                .is_none_or(|a| n.metadata.name.as_deref().unwrap_or("") > a)
        })
        .collect();
    drop(store);
    let limit = req
        .q("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut continue_token = None;
    let mut remaining = 0;
    if let Some(limit) = limit {
        if items.len() > limit {
            remaining = items.len() - limit;
            items.truncate(limit);
            let last = items
                .last()
                .and_then(|n| n.metadata.name.clone())
                .unwrap_or_default();
            continue_token = Some(format!("{snapshot}/{last}"));
        }
    }
    if req.table() {
        let include = IncludeObject::parse(req.q("includeObject"));
        let mut t = table::node_table(&items, snapshot, include);
        if let Some(token) = continue_token {
            t["metadata"]["continue"] = json!(token);
        }
        return Ok(table_response(&t));
    }
    let mut meta = json!({ "resourceVersion": snapshot.to_string() });
    if let Some(token) = continue_token {
        meta["continue"] = json!(token);
        meta["remainingItemCount"] = json!(remaining);
    }
    let list = json!({
        "kind": "NodeList",
        "apiVersion": "v1",
        "metadata": meta,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

fn node_item(
    shared: &Arc<Shared>,
    req: &Req,
    name: &str,
    sub: Subresource,
) -> Result<Response<Body>, ApiError> {
    let opts = req.opts();
    let node = match req.method {
        Method::GET => {
            let node = shared.store().get_node(name)?;
            if req.table() {
                let rv = shared.store().resource_version();
                let t = table::node_table(
                    std::slice::from_ref(&node),
                    rv,
                    IncludeObject::parse(req.q("includeObject")),
                );
                return Ok(table_response(&t));
            }
            node
        }
        Method::PUT => {
            let body = req.json_body()?;
            check_type_meta(&body, "v1", "Node")?;
            let node: Node = decode(body, opts.strict)?;
            shared.store().update_node(name, node, sub, opts)?
        }
        Method::PATCH => {
            let kind = req.patch_kind()?;
            shared
                .store()
                .patch_node(name, kind, &req.body, sub, opts)?
        }
        Method::DELETE if sub == Subresource::Main => {
            let (pre, body_dry_run) = delete_options(&req.body)?;
            let opts = WriteOpts {
                dry_run: opts.dry_run || body_dry_run,
                ..opts
            };
            let outcome = shared.store().delete_node(name, &pre, opts)?;
            return Ok(match outcome {
                DeleteOutcome::Deleted(gone) => json_response(
                    StatusCode::OK,
                    &success_status("nodes", name, gone.metadata.uid.as_deref()),
                ),
                DeleteOutcome::Pending(node) => object_response(StatusCode::OK, &node),
            });
        }
        _ => return Err(ApiError::method_not_allowed(req.method.as_str())),
    };
    Ok(object_response(StatusCode::OK, &node))
}

/// Preconditions and dryRun from a DeleteOptions body (which may be empty).
fn delete_options(body: &[u8]) -> Result<(Preconditions, bool), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((Preconditions::default(), false));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?;
    let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
    let pre = Preconditions {
        uid: text("/preconditions/uid"),
        resource_version: text("/preconditions/resourceVersion"),
    };
    let dry_run = v
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x == "All"));
    Ok((pre, dry_run))
}

// ---- watch ---------------------------------------------------------------------------

enum WatchStart {
    /// Synthetic ADDED events for the current state first; with `end_bookmark`, then a
    /// BOOKMARK annotated `k8s.io/initial-events-end` (streaming lists).
    Initial { end_bookmark: bool },
    /// Changes after this resourceVersion.
    From(u64),
}

struct WatchSpec {
    start: WatchStart,
    bookmarks: bool,
    timeout: Duration,
    table: Option<IncludeObject>,
    filter: NodeFilter,
}

fn start_watch(
    shared: &Arc<Shared>,
    req: &Req,
    filter: NodeFilter,
) -> Result<Response<Body>, ApiError> {
    let rv = req.q("resourceVersion").filter(|r| !r.is_empty());
    let send_initial = req.flag("sendInitialEvents");
    let start = match (rv, send_initial) {
        (_, Some(true)) => {
            if req.flag("allowWatchBookmarks") != Some(true) {
                return Err(ApiError::unprocessable(
                    "sendInitialEvents: Forbidden: sendInitialEvents requires setting allowWatchBookmarks=true",
                ));
            }
            WatchStart::Initial { end_bookmark: true }
        }
        (None | Some("0"), Some(false)) => WatchStart::From(shared.store().resource_version()),
        (None | Some("0"), None) => WatchStart::Initial {
            end_bookmark: false,
        },
        (Some(rv), _) => WatchStart::From(rv.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion: Invalid value: \"{rv}\": invalid resource version"
            ))
        })?),
    };
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let table = req
        .table()
        .then(|| IncludeObject::parse(req.q("includeObject")));
    let spec = WatchSpec {
        start,
        bookmarks: req.flag("allowWatchBookmarks") == Some(true),
        timeout,
        table,
        filter,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(run_watch(shared.clone(), tx, spec));
    let content_type = if table.is_some() {
        TABLE_CONTENT_TYPE
    } else {
        "application/json"
    };
    let mut response = Response::new(ChannelBody { rx }.boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

async fn run_watch(shared: Arc<Shared>, tx: mpsc::Sender<Bytes>, spec: WatchSpec) {
    let deadline = Instant::now() + spec.timeout;
    let mut changes = shared.changes.subscribe();
    let mut epoch = shared.epoch.subscribe();
    epoch.borrow_and_update();
    let mut shutdown = shared.shutdown.subscribe();
    changes.borrow_and_update();

    let render = |kind: &str, node: &Node| -> Bytes {
        let object = match spec.table {
            Some(include) => {
                let rv = node
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                table::node_table(std::slice::from_ref(node), rv, include)
            }
            None => serde_json::to_value(node).unwrap_or(Value::Null),
        };
        line(&json!({ "type": kind, "object": object }))
    };

    let (mut pos, initial) = {
        let store = shared.store();
        match spec.start {
            WatchStart::Initial { end_bookmark } => {
                let lines: Vec<Bytes> = store
                    .nodes()
                    .iter()
                    .filter(|n| spec.filter.matches(n))
                    .map(|n| render("ADDED", n))
                    .collect();
                let rv = store.resource_version();
                let mut lines = lines;
                if end_bookmark {
                    lines.push(bookmark(rv, true));
                }
                (rv, lines)
            }
            WatchStart::From(rv) => match store.check_watch_start(rv) {
                Ok(()) => (rv, Vec::new()),
                Err(e) => (rv, vec![error_line(&e)]),
            },
        }
    };
    let failed_start = matches!(spec.start, WatchStart::From(_)) && !initial.is_empty();
    for l in initial {
        if tx.send(l).await.is_err() {
            return;
        }
    }
    if failed_start {
        return;
    }

    let mut bookmark_timer = tokio::time::interval_at(
        Instant::now() + shared.bookmark_interval,
        shared.bookmark_interval,
    );
    bookmark_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        changes.borrow_and_update();
        let batch = shared.store().changes_since(pos);
        match batch {
            Err(e) => {
                let _ = tx.send(error_line(&e)).await;
                return;
            }
            Ok((list, rv)) => {
                for change in &list {
                    if let Some((kind, node)) = filter_change(change, &spec.filter) {
                        if tx.send(render(kind, node)).await.is_err() {
                            return;
                        }
                    }
                }
                pos = rv;
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = bookmark_timer.tick(), if spec.bookmarks => {
                if tx.send(bookmark(pos, false)).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = epoch.changed() => return,
            _ = stopped(&mut shutdown) => return,
            _ = tx.closed() => return,
        }
    }
}

/// What a filtered watch reports for a change: a Node entering the selection is ADDED,
/// one leaving it is DELETED, as the apiserver's watch cache does.
fn filter_change<'a>(change: &'a Change, filter: &NodeFilter) -> Option<(&'static str, &'a Node)> {
    let now = filter.matches(&change.object);
    let before = change.previous.as_deref().map(|p| filter.matches(p));
    let kind = match change.kind {
        ChangeKind::Added => now.then_some(ChangeKind::Added)?,
        ChangeKind::Deleted => (before.unwrap_or(now)).then_some(ChangeKind::Deleted)?,
        ChangeKind::Modified => match (before.unwrap_or(now), now) {
            (true, true) => ChangeKind::Modified,
            (false, true) => ChangeKind::Added,
            (true, false) => ChangeKind::Deleted,
            (false, false) => return None,
        },
    };
    Some((kind.as_str(), &change.object))
}

fn bookmark(rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    line(&json!({
        "type": "BOOKMARK",
        "object": { "kind": "Node", "apiVersion": "v1", "metadata": metadata },
    }))
}

fn error_line(e: &ApiError) -> Bytes {
    line(&json!({ "type": "ERROR", "object": e.to_status() }))
}

fn line(v: &Value) -> Bytes {
    let mut buf = serde_json::to_vec(v).unwrap_or_default();
    buf.push(b'\n');
    Bytes::from(buf)
}

/// A response body fed by a channel: one frame per watch event, ended when the sender
/// is dropped. Dropping the body (client gone) closes the channel, which the watch task
/// notices.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Pods are not served, but `kubectl describe node` lists the Pods on the Node and fails
/// when that list does; an always-empty list keeps it working.
fn pods_stub(shared: &Arc<Shared>, req: &Req) -> Result<Response<Body>, ApiError> {
    let rv = shared.store().resource_version();
    get_only(req, || {
        json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": rv.to_string() },
            "items": [],
        })
    })
}

// ---- events --------------------------------------------------------------------------

const EVENT_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "reportingComponent",
    "source",
    "type",
];

fn event_field(e: &CoreEvent, field: &str) -> String {
    let o = &e.involved_object;
    let v = match field.split_once('.') {
        Some(("metadata", "name")) => e.metadata.name.clone(),
        Some(("metadata", "namespace")) => e.metadata.namespace.clone(),
        Some((_, "kind")) => o.kind.clone(),
        Some((_, "namespace")) => o.namespace.clone(),
        Some((_, "name")) => o.name.clone(),
        Some((_, "uid")) => o.uid.clone(),
        Some((_, "apiVersion")) => o.api_version.clone(),
        Some((_, "resourceVersion")) => o.resource_version.clone(),
        Some((_, "fieldPath")) => o.field_path.clone(),
        _ => match field {
            "reason" => e.reason.clone(),
            "reportingController" | "reportingComponent" => e.reporting_component.clone(),
            "source" => e.source.as_ref().and_then(|s| s.component.clone()),
            "type" => e.type_.clone(),
            _ => None,
        },
    };
    v.unwrap_or_default()
}

fn events_collection(
    shared: &Arc<Shared>,
    req: &Req,
    namespace: Option<&str>,
    api: EventApi,
) -> Result<Response<Body>, ApiError> {
    match (&req.method, namespace) {
        (&Method::GET, _) => {
            if req.flag("watch") == Some(true) {
                return Err(ApiError::method_not_allowed(
                    "GET ?watch (watching Events is not implemented by the wgmesh test API)",
                ));
            }
            let labels = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))?;
            let fields =
                FieldSelector::parse(req.q("fieldSelector").unwrap_or(""), EVENT_FIELDS, "Event")?;
            let store = shared.store();
            let rv = store.resource_version();
            let events: Vec<CoreEvent> = store
                .list_events(namespace)
                .into_iter()
                .filter(|e| labels.matches(e.metadata.labels.as_ref()))
                .filter(|e| fields.matches(|f| event_field(e, f)))
                .collect();
            drop(store);
            if req.table() {
                let include = IncludeObject::parse(req.q("includeObject"));
                return Ok(table_response(&table::event_table(&events, rv, include)));
            }
            let items: Vec<Value> = events
                .iter()
                .map(|e| match api {
                    EventApi::Core => serde_json::to_value(e),
                    EventApi::EventsV1 => serde_json::to_value(super::events::to_events_v1(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))?;
            let list = json!({
                "kind": "EventList",
                "apiVersion": api.api_version(),
                "metadata": { "resourceVersion": rv.to_string() },
                "items": items,
            });
            Ok(json_response(StatusCode::OK, &list))
        }
        (&Method::POST, Some(ns)) => {
            let body = req.json_body()?;
            let created = shared.store().create_event(ns, api, body, req.opts())?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        _ => Err(ApiError::method_not_allowed(req.method.as_str())),
    }
}

fn event_item(
    shared: &Arc<Shared>,
    req: &Req,
    namespace: &str,
    name: &str,
    api: EventApi,
) -> Result<Response<Body>, ApiError> {
    let opts = req.opts();
    let value = match req.method {
        Method::GET => shared.store().get_event(namespace, name, api)?,
        Method::PUT => {
            let body = req.json_body()?;
            shared
                .store()
                .replace_event(namespace, name, api, body, opts)?
        }
        Method::PATCH => {
            let kind = req.patch_kind()?;
            shared
                .store()
                .patch_event(namespace, name, api, kind, &req.body, opts)?
        }
        Method::DELETE => {
            let (_, body_dry_run) = delete_options(&req.body)?;
            let opts = WriteOpts {
                dry_run: opts.dry_run || body_dry_run,
                ..opts
            };
            let gone = shared.store().delete_event(namespace, name, opts)?;
            success_status("events", name, gone.metadata.uid.as_deref())
        }
        _ => return Err(ApiError::method_not_allowed(req.method.as_str())),
    };
    Ok(json_response(StatusCode::OK, &value))
}

// ---- responses -----------------------------------------------------------------------

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn object_response<T: serde::Serialize>(status: StatusCode, obj: &T) -> Response<Body> {
    match serde_json::to_value(obj) {
        Ok(v) => json_response(status, &v),
        Err(e) => error_response(&ApiError::new(500, "InternalError", e.to_string())),
    }
}

fn table_response(v: &Value) -> Response<Body> {
    let mut r = json_response(StatusCode::OK, v);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TABLE_CONTENT_TYPE));
    r
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &e.to_status())
}
