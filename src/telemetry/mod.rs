//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` for the agent,
//! and the per-peer view shared with `wgmesh status`.
//!
//! Metrics that mirror the device (handshake ages, transfer counters) are read
//! live from the device at scrape time, so they are never older than the
//! scrape; the rest is updated by each reconcile pass.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use crate::keys::{Fingerprint, PublicKey};
use crate::wg::PeerStats;

/// A handshake older than this (WireGuard's REJECT_AFTER_TIME) means no
/// session is usable right now: the peer is "stale". An idle peer without
/// persistent keepalive goes stale by design and handshakes again on demand.
pub const STALE_AFTER: Duration = Duration::from_secs(180);

/// The health of one peer, from its last handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    Healthy,
    Stale,
    Never,
}

impl PeerState {
    pub fn of(last_handshake: Option<SystemTime>, now: SystemTime) -> Self {
        match last_handshake {
            None => PeerState::Never,
            Some(t) if now.duration_since(t).unwrap_or_default() < STALE_AFTER => {
                PeerState::Healthy
            }
            Some(_) => PeerState::Stale,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Healthy => "healthy",
            PeerState::Stale => "stale",
            PeerState::Never => "never",
        }
    }
}

/// One peer as `wgmesh status` and the metrics show it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub node: String,
    pub public_key: PublicKey,
    pub fingerprint: Fingerprint,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub state: PeerState,
}

/// A Node that got no peer.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedView {
    pub node: String,
    /// Bounded label (`invalid wgmesh.dev/public-key`, `cidr-overlap`, ...).
    pub kind: String,
    pub reason: String,
}

/// What the last pass knew.
#[derive(Debug, Clone, Default)]
pub struct PassState {
    /// Public key → (node, allowed IPs) of every desired peer.
    pub peers: Vec<(PublicKey, String, Vec<IpNet>)>,
    pub rejected: Vec<RejectedView>,
    pub key_generation: u64,
    pub key_created: Option<jiff::Timestamp>,
    /// The key rotation phase: idle, staged or activated.
    pub rotation_phase: String,
    /// Peers that have not confirmed the staged (or newly active) key.
    pub unconfirmed_peers: usize,
    /// Route sync: every extra prefix, its gateways and what was refused.
    pub routes: crate::routes::Outcome,
    /// How often a prefix moved from one gateway to another since start.
    pub route_failovers: u64,
}

impl PassState {
    /// What a plan says, for metrics and `wgmesh status`.
    pub fn from_plan(
        plan: &crate::mesh::Plan,
        key_generation: u64,
        key_created: Option<jiff::Timestamp>,
    ) -> Self {
        Self {
            peers: plan
                .peers
                .iter()
                .map(|p| {
                    (
                        p.config.public_key,
                        p.node.clone(),
                        p.config.allowed_ips.clone(),
                    )
                })
                .collect(),
            rejected: plan
                .excluded
                .iter()
                .map(|e| RejectedView {
                    node: e.node.clone(),
                    kind: e.reason.kind(),
                    reason: e.reason.to_string(),
                })
                .collect(),
            key_generation,
            key_created,
            rotation_phase: "idle".into(),
            unconfirmed_peers: 0,
            routes: Default::default(),
            route_failovers: 0,
        }
    }
}

/// Joins the plan's peers with the device's live counters.
pub fn peer_views(pass: &PassState, stats: &[PeerStats], now: SystemTime) -> Vec<PeerView> {
    let mut out: Vec<PeerView> = pass
        .peers
        .iter()
        .map(|(key, node, allowed)| {
            let s = stats.iter().find(|s| s.public_key == *key);
            let last = s.and_then(|s| s.last_handshake);
            PeerView {
                node: node.clone(),
                public_key: *key,
                fingerprint: key.fingerprint(),
                endpoint: s.and_then(|s| s.endpoint),
                allowed_ips: allowed.clone(),
                last_handshake: last
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
                rx_bytes: s.map_or(0, |s| s.rx_bytes),
                tx_bytes: s.map_or(0, |s| s.tx_bytes),
                state: PeerState::of(last, now),
            }
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// The agent's metrics and health.
#[derive(Clone)]
pub struct Telemetry {
    registry: Arc<Registry>,
    pub reconcile_seconds: Histogram,
    pub api_errors: Counter,
    pass: Arc<Mutex<PassState>>,
    live: Arc<Mutex<Vec<PeerView>>>,
    synced: Arc<AtomicBool>,
    device_ok: Arc<AtomicBool>,
    routes_ok: Arc<AtomicBool>,
    /// Routes and rules that let cluster (or mesh-carried extra-prefix) traffic bypass the tunnel, in
    /// `ip route`/`ip rule` syntax.
    bypasses: Arc<Mutex<Vec<String>>>,
    pub route_bypasses: Gauge,
    /// Activations by result: the last rotation's outcome is the counter
    /// that moved last.
    pub rotations: Family<ResultLabel, Counter>,
    /// BGP mode: each BIRD session and its state, as of the last pass.
    bgp_sessions: Arc<Mutex<Vec<(String, String)>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Debug)]
struct MeshCollector {
    pass: Arc<Mutex<PassState>>,
    live: Arc<Mutex<Vec<PeerView>>>,
    bgp_sessions: Arc<Mutex<Vec<(String, String)>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabel {
    session: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

impl prometheus_client::collector::Collector for MeshCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peers = self.live.lock().map(|p| p.clone()).unwrap_or_default();
        let pass = self.pass.lock().map(|p| p.clone()).unwrap_or_default();
        let now = SystemTime::now();

        let mut family = encoder.encode_descriptor(
            "wgmesh_peers",
            "Peers on the device, by handshake state (healthy: handshake in the last 180 s)",
            None,
            MetricType::Gauge,
        )?;
        for state in [PeerState::Healthy, PeerState::Stale, PeerState::Never] {
            let n = peers.iter().filter(|p| p.state == state).count() as i64;
            let label = StateLabel {
                state: state.as_str().into(),
            };
            ConstGauge::new(n).encode(family.encode_family(&label)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "wgmesh_peer_last_handshake",
            "Seconds since the last handshake with each peer (absent: never)",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for p in &peers {
            if let Some(t) = p.last_handshake {
                let age = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_sub(t);
                let label = PeerLabel {
                    peer: p.node.clone(),
                };
                ConstGauge::new(age as i64).encode(family.encode_family(&label)?)?;
            }
        }

        for (name, help, rx) in [
            (
                "wgmesh_peer_receive",
                "Bytes received from each peer (on the wire)",
                true,
            ),
            (
                "wgmesh_peer_transmit",
                "Bytes sent to each peer (on the wire)",
                false,
            ),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
            for p in &peers {
                let label = PeerLabel {
                    peer: p.node.clone(),
                };
                let v = if rx { p.rx_bytes } else { p.tx_bytes };
                ConstCounter::new(v).encode(family.encode_family(&label)?)?;
            }
        }

        if let Some(created) = pass.key_created {
            let age = jiff::Timestamp::now()
                .as_second()
                .saturating_sub(created.as_second())
                .max(0);
            ConstGauge::new(age).encode(encoder.encode_descriptor(
                "wgmesh_key_age",
                "Age of this node's active static key",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?)?;
        }
        ConstGauge::new(pass.key_generation as i64).encode(encoder.encode_descriptor(
            "wgmesh_key_generation",
            "Generation of this node's active static key (+1 per rotation)",
            None,
            MetricType::Gauge,
        )?)?;

        let mut family = encoder.encode_descriptor(
            "wgmesh_rotation_phase",
            "1 for the key rotation phase this node is in (idle, staged, activated)",
            None,
            MetricType::Gauge,
        )?;
        for phase in ["idle", "staged", "activated"] {
            let label = StateLabel {
                state: phase.into(),
            };
            let on = i64::from(
                pass.rotation_phase == phase || (pass.rotation_phase.is_empty() && phase == "idle"),
            );
            ConstGauge::new(on).encode(family.encode_family(&label)?)?;
        }
        ConstGauge::new(pass.unconfirmed_peers as i64).encode(encoder.encode_descriptor(
            "wgmesh_rotation_unconfirmed_peers",
            "Peers that have not yet confirmed this node's staged or newly active key",
            None,
            MetricType::Gauge,
        )?)?;

        let mut family = encoder.encode_descriptor(
            "wgmesh_rejected_nodes",
            "Nodes that got no peer, by reason",
            None,
            MetricType::Gauge,
        )?;
        let mut kinds: Vec<&str> = pass.rejected.iter().map(|r| r.kind.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            let n = pass.rejected.iter().filter(|r| r.kind == kind).count() as i64;
            let label = ReasonLabel {
                reason: kind.to_string(),
            };
            ConstGauge::new(n).encode(family.encode_family(&label)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "wgmesh_extra_prefixes",
            "Extra prefixes (route sync) this node carries, by source (static: MeshRoute gateways, bgp: learned) and role (remote: on a gateway's peer, local: this node is a gateway)",
            None,
            MetricType::Gauge,
        )?;
        for source in [
            crate::routes::Source::Static,
            crate::routes::Source::Learned,
        ] {
            for local in [false, true] {
                let n = pass
                    .routes
                    .prefixes
                    .iter()
                    .filter(|p| p.source == source && p.local_gateway == local)
                    .count() as i64;
                let label = RouteLabel {
                    source: source.as_str().into(),
                    role: if local { "local" } else { "remote" }.into(),
                };
                ConstGauge::new(n).encode(family.encode_family(&label)?)?;
            }
        }
        let unhealthy = pass
            .routes
            .prefixes
            .iter()
            .filter(|p| !p.local_gateway && !p.healthy)
            .count() as i64;
        ConstGauge::new(unhealthy).encode(encoder.encode_descriptor(
            "wgmesh_extra_prefixes_without_gateway",
            "Extra prefixes whose gateways are all down (their traffic is dropped in the tunnel)",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(pass.routes.held.len() as i64).encode(encoder.encode_descriptor(
            "wgmesh_extra_prefixes_held",
            "Extra prefixes carried before whose MeshRoute is now refused or invalid, or unknown: routed into the tunnel on no peer (dropped) until the MeshRoute is deleted",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(pass.route_failovers).encode(encoder.encode_descriptor(
            "wgmesh_route_failovers",
            "Times an extra prefix moved from one gateway's peer to another's",
            None,
            MetricType::Counter,
        )?)?;
        let sessions = self
            .bgp_sessions
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        if !sessions.is_empty() {
            let mut family = encoder.encode_descriptor(
                "wgmesh_bgp_session_established",
                "BGP mode: 1 for each BIRD session that is Established, 0 otherwise (label state: its BGP state)",
                None,
                MetricType::Gauge,
            )?;
            for (session, state) in &sessions {
                let label = SessionLabel {
                    session: session.clone(),
                    state: state.clone(),
                };
                ConstGauge::new(i64::from(state == "established"))
                    .encode(family.encode_family(&label)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "wgmesh_routes_refused",
            "Prefixes the route validator refused in the last pass, by reason",
            None,
            MetricType::Gauge,
        )?;
        let mut kinds: Vec<&str> = pass
            .routes
            .refused
            .iter()
            .map(|r| r.reason.kind())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            let n = pass
                .routes
                .refused
                .iter()
                .filter(|r| r.reason.kind() == kind)
                .count() as i64;
            let label = ReasonLabel {
                reason: kind.to_string(),
            };
            ConstGauge::new(n).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    source: String,
    role: String,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconcile_seconds = Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register_with_unit(
            "wgmesh_reconcile_duration",
            "Duration of one reconcile pass",
            Unit::Seconds,
            reconcile_seconds.clone(),
        );
        let rotations = Family::<ResultLabel, Counter>::default();
        registry.register(
            "wgmesh_rotations",
            "Key rotations this agent activated, by result (all-confirmed, deadline, single-identity)",
            rotations.clone(),
        );
        let api_errors = Counter::default();
        registry.register(
            "wgmesh_api_errors",
            "Kubernetes API errors (watch failures and failed writes)",
            api_errors.clone(),
        );
        let route_bypasses = Gauge::default();
        registry.register(
            "wgmesh_route_bypasses",
            "Routes or rules not created by wgmesh that let cluster or extra-prefix traffic bypass the tunnel",
            route_bypasses.clone(),
        );
        let pass = Arc::new(Mutex::new(PassState::default()));
        let live = Arc::new(Mutex::new(Vec::new()));
        let bgp_sessions = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(MeshCollector {
            pass: pass.clone(),
            live: live.clone(),
            bgp_sessions: bgp_sessions.clone(),
        }));
        Self {
            registry: Arc::new(registry),
            reconcile_seconds,
            api_errors,
            pass,
            live,
            synced: Arc::new(AtomicBool::new(false)),
            device_ok: Arc::new(AtomicBool::new(false)),
            // Until a pass says otherwise: with --no-network nobody checks.
            routes_ok: Arc::new(AtomicBool::new(true)),
            bypasses: Arc::new(Mutex::new(Vec::new())),
            route_bypasses,
            rotations,
            bgp_sessions,
        }
    }

    /// BGP mode: each session's name and state (`SessionState::as_str`).
    pub fn set_bgp_sessions(&self, sessions: Vec<(String, String)>) {
        if let Ok(mut s) = self.bgp_sessions.lock() {
            *s = sessions;
        }
    }

    /// Whether the last pass put the link, addresses and routes in place.
    pub fn set_routes_ok(&self, v: bool) {
        self.routes_ok.store(v, Ordering::Relaxed);
    }

    /// The bypasses the last pass found (empty: none).
    pub fn set_bypasses(&self, found: Vec<String>) {
        self.route_bypasses.set(found.len() as i64);
        if let Ok(mut b) = self.bypasses.lock() {
            *b = found;
        }
    }

    /// Why the node is not ready, one line per reason; empty when ready.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.synced.load(Ordering::Relaxed) {
            why.push("the Node cache has not synced with the API server yet".to_string());
        }
        if !self.device_ok.load(Ordering::Relaxed) {
            why.push("the WireGuard device is not configured (is the data plane running?)".into());
        }
        if !self.routes_ok.load(Ordering::Relaxed) {
            why.push("the interface, its addresses or the cluster routes are not in place".into());
        }
        if let Ok(b) = self.bypasses.lock() {
            why.extend(
                b.iter()
                    .map(|r| format!("traffic can bypass the tunnel: {r}")),
            );
        }
        why
    }

    pub fn set_pass(&self, pass: PassState) {
        if let Ok(mut p) = self.pass.lock() {
            *p = pass;
        }
    }

    pub fn pass(&self) -> PassState {
        self.pass.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn set_live(&self, views: Vec<PeerView>) {
        if let Ok(mut l) = self.live.lock() {
            *l = views;
        }
    }

    pub fn set_synced(&self, v: bool) {
        self.synced.store(v, Ordering::Relaxed);
    }

    pub fn set_device_ok(&self, v: bool) {
        self.device_ok.store(v, Ordering::Relaxed);
    }

    /// Ready = the Node cache is synced with the API, the last pass
    /// configured the device and the routes, and nothing routes cluster
    /// traffic around the tunnel.
    pub fn ready(&self) -> bool {
        self.not_ready_reasons().is_empty()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
/// `refresh` runs before each `/metrics` render (it reads the device).
pub async fn serve<F>(listen: SocketAddr, telemetry: Telemetry, refresh: F) -> std::io::Result<()>
where
    F: Fn() + Clone + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    loop {
        let (conn, _) = listener.accept().await?;
        let telemetry = telemetry.clone();
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let telemetry = telemetry.clone();
                let refresh = refresh.clone();
                async move { Ok::<_, Infallible>(respond(&req, &telemetry, refresh).await) }
            });
            // One request per connection (scrapers and kubelet probes open a
            // fresh one each time, and nothing here is worth holding a socket
            // for), and a client gets 5 s to send its request head, so a
            // stalled or hostile client on the node cannot pile up tasks.
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false)
                .serve_connection(TokioIo::new(conn), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "telemetry connection");
            }
        });
    }
}

async fn respond<F>(
    req: &Request<Incoming>,
    telemetry: &Telemetry,
    refresh: F,
) -> Response<Full<Bytes>>
where
    F: Fn() + Send + 'static,
{
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // `refresh` reads the device, which blocks (UAPI socket, netlink).
            let _ = tokio::task::spawn_blocking(refresh).await;
            (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                telemetry.render(),
            )
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => match telemetry.not_ready_reasons() {
            why if why.is_empty() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            why => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready:\n{}\n", why.join("\n")),
            ),
        },
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn metrics_follow_prometheus_naming_and_carry_the_mesh() {
        let t = Telemetry::new();
        let k1 = PrivateKey::generate().public_key();
        let k2 = PrivateKey::generate().public_key();
        t.set_pass(PassState {
            peers: vec![
                (k1, "node-b".into(), vec!["10.244.1.0/24".parse().unwrap()]),
                (k2, "node-c".into(), vec!["10.244.2.0/24".parse().unwrap()]),
            ],
            rejected: vec![RejectedView {
                node: "node-d".into(),
                kind: "invalid wgmesh.dev/public-key".into(),
                reason: "bad".into(),
            }],
            key_generation: 3,
            key_created: Some(jiff::Timestamp::now()),
            rotation_phase: "staged".into(),
            unconfirmed_peers: 1,
            routes: crate::routes::Outcome {
                prefixes: vec![crate::routes::PrefixState {
                    prefix: "192.0.2.0/24".parse().unwrap(),
                    grant: "site-a".into(),
                    source: crate::routes::Source::Static,
                    candidates: Vec::new(),
                    active: Some("node-b".into()),
                    healthy: false,
                    local_gateway: false,
                }],
                refused: vec![crate::routes::Refused {
                    from: "site-b".into(),
                    prefix: "0.0.0.0/0".parse().unwrap(),
                    reason: crate::routes::Rejection::DefaultRoute,
                }],
                held: vec!["198.18.1.0/24".parse().unwrap()],
            },
            route_failovers: 2,
        });
        let now = SystemTime::now();
        let stats = vec![PeerStats {
            public_key: k1,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            last_handshake: Some(now - Duration::from_secs(5)),
            rx_bytes: 1000,
            tx_bytes: 2000,
        }];
        t.set_live(peer_views(&t.pass(), &stats, now));
        t.reconcile_seconds.observe(0.002);
        t.api_errors.inc();
        t.rotations
            .get_or_create(&ResultLabel {
                result: "all-confirmed".into(),
            })
            .inc();
        t.set_bypasses(vec!["10.244.9.0/24 via 192.0.2.9 proto static".into()]);
        let text = t.render();
        for want in [
            "wgmesh_peers{state=\"healthy\"} 1",
            "wgmesh_peers{state=\"never\"} 1",
            "wgmesh_peers{state=\"stale\"} 0",
            "wgmesh_peer_last_handshake_seconds{peer=\"node-b\"} 5",
            "wgmesh_peer_receive_bytes_total{peer=\"node-b\"} 1000",
            "wgmesh_peer_transmit_bytes_total{peer=\"node-b\"} 2000",
            "wgmesh_peer_receive_bytes_total{peer=\"node-c\"} 0",
            "wgmesh_key_generation 3",
            "wgmesh_key_age_seconds 0",
            "wgmesh_rejected_nodes{reason=\"invalid wgmesh.dev/public-key\"} 1",
            "wgmesh_reconcile_duration_seconds_count 1",
            "wgmesh_api_errors_total 1",
            "wgmesh_rotation_phase{state=\"staged\"} 1",
            "wgmesh_rotation_phase{state=\"idle\"} 0",
            "wgmesh_rotation_unconfirmed_peers 1",
            "wgmesh_rotations_total{result=\"all-confirmed\"} 1",
            "wgmesh_route_bypasses 1",
            "wgmesh_extra_prefixes{source=\"static\",role=\"remote\"} 1",
            "wgmesh_extra_prefixes{source=\"bgp\",role=\"local\"} 0",
            "wgmesh_extra_prefixes_without_gateway 1",
            "wgmesh_route_failovers_total 2",
            "wgmesh_extra_prefixes_held 1",
            "wgmesh_routes_refused{reason=\"default-route\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("node-c\"} 5"),
            "no handshake age for a peer that never shook hands"
        );
    }

    #[test]
    fn peer_state_from_handshake_age() {
        let now = SystemTime::now();
        assert_eq!(PeerState::of(None, now), PeerState::Never);
        assert_eq!(
            PeerState::of(Some(now - Duration::from_secs(10)), now),
            PeerState::Healthy
        );
        assert_eq!(
            PeerState::of(Some(now - Duration::from_secs(200)), now),
            PeerState::Stale
        );
    }

    #[tokio::test]
    async fn health_endpoints_answer() {
        let t = Telemetry::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = tokio::spawn(serve(addr, t.clone(), || {}));
        let request = |method: &'static str, path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                        .await
                        .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("server did not start");
        };
        let get = |path: &'static str| request("GET", path);
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        t.set_synced(true);
        t.set_device_ok(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get("/metrics").await;
        assert!(metrics.contains("wgmesh_key_generation"), "{metrics}");
        assert!(get("/metrics?name=x")
            .await
            .contains("wgmesh_key_generation"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        let post = request("POST", "/metrics").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.ends_with("only GET\n"), "{post}");
        // The server closes each connection after its response (the reads
        // above end), and says how long the body is.
        let ready = get("/readyz").await;
        assert!(
            ready.to_ascii_lowercase().contains("content-length: 6\r\n"),
            "{ready}"
        );
        server.abort();
    }
}
