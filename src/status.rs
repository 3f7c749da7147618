//! `wgmesh status` and `wgmesh graph`: this node's mesh as `wg show` would
//! print it, but per node. Built from the device's live counters and the Node
//! objects (decoded and planned exactly as the agent does), so it works while
//! the agent is down — when it is most needed. Pure: the CLI fetches, reading
//! the device through the backend the agent's own rule picks
//! ([`crate::wg::kernel::select_reader`]: kernel WireGuard or a UAPI socket,
//! never creating a link), and passes its description in.

use std::fmt::Write as _;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use crate::mesh::{self, MeshConfig};
use crate::node::{self, ValidationConfig};
use crate::routes::bgp::engine::SessionState;
use crate::telemetry::{self, PassState, PeerState, PeerView, RejectedView};
use crate::wg::PeerStats;

/// Everything `wgmesh status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub node: String,
    /// The device read and how (`Backend::describe`, e.g. "kernel wgmesh0
    /// (generic netlink)" or "uapi /var/run/wireguard/wgmesh0.sock").
    pub device: String,
    pub peers: Vec<PeerView>,
    /// Nodes that get no peer, with the reason.
    pub rejected: Vec<RejectedView>,
    /// Peers on the device that no Node accounts for (or every peer, when the
    /// API could not be read).
    pub unknown: Vec<PeerView>,
    /// Extra prefixes (route sync), from the MeshRoutes and the device.
    pub routes: Vec<RouteView>,
    /// BGP sessions (`--bgp`), from BIRD's control socket; empty when it
    /// has none (BGP not in use).
    pub bgp: Vec<SessionView>,
}

/// One BGP session as `wgmesh status` shows it (a BIRD `bgp` protocol).
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    /// BIRD's protocol name (the agent names them after the neighbor).
    pub name: String,
    /// RFC 4271 state (`established`, `active`, ...) or `down` when the
    /// protocol is (disabled, or shut by its prefix cap).
    pub state: SessionState,
    /// Unix seconds of the last state change.
    pub since: Option<u64>,
    /// BIRD's last error or why the session is down; empty when none.
    pub info: String,
}

/// One extra prefix as `wgmesh status` shows it: the grant's gateways, and
/// which of them this node's device sends the prefix to right now.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    pub prefix: ipnet::IpNet,
    /// The MeshRoute.
    pub grant: String,
    /// `node (priority)`, best first.
    pub candidates: Vec<String>,
    /// The node whose peer holds the prefix on this device.
    pub active: Option<String>,
    /// This node is one of the gateways (it routes the prefix out itself).
    pub local_gateway: bool,
    /// Why no agent carries this grant, when it is refused.
    pub refused: Option<String>,
}

impl Status {
    /// Adds the BGP sessions among BIRD's protocols.
    pub fn add_sessions(&mut self, protocols: &[crate::routes::bgp::engine::ProtocolStatus]) {
        self.bgp = protocols
            .iter()
            .filter_map(|p| {
                Some(SessionView {
                    name: p.name.clone(),
                    state: p.session?,
                    since: p.since,
                    info: p.info.clone(),
                })
            })
            .collect();
    }

    /// Adds the extra prefixes: each MeshRoute object (as JSON) checked by
    /// the agent's own rules against `nodes`, and the node holding it found
    /// among `device` (the device's peers with their allowed IPs).
    pub fn add_routes(
        &mut self,
        cluster_cidrs: &[ipnet::IpNet],
        nodes: &[Node],
        grants: &[serde_json::Value],
        device: &[mesh::PeerConfig],
    ) {
        let vcfg = ValidationConfig {
            cluster_cidrs: cluster_cidrs.to_vec(),
        };
        let mut pod_cidrs = std::collections::BTreeMap::new();
        let mut node_ips = Vec::new();
        let mut keys = std::collections::HashMap::new();
        for n in nodes {
            match node::decode(n, &vcfg) {
                Ok(r) => {
                    node_ips.extend(r.node_ips.iter().map(|ip| ip.to_canonical()));
                    node_ips.push(r.endpoint.ip().to_canonical());
                    keys.insert(r.public_key, r.name.clone());
                    pod_cidrs.insert(r.name, r.pod_cidrs);
                }
                Err(r) => node_ips.extend(r.node_ips.iter().map(|ip| ip.to_canonical())),
            }
        }
        let validator = crate::routes::Validator::new(cluster_cidrs.to_vec(), pod_cidrs, node_ips);
        let mut decoded = Vec::new();
        for g in grants {
            match crate::routes::grant::decode(g) {
                Ok(g) => decoded.push(g),
                Err(e) => self.routes.push(RouteView {
                    prefix: g["spec"]["prefix"]
                        .as_str()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_else(|| {
                            ipnet::IpNet::from(std::net::IpAddr::from([0, 0, 0, 0]))
                        }),
                    grant: e.name.clone(),
                    candidates: Vec::new(),
                    active: None,
                    local_gateway: false,
                    refused: Some(e.to_string()),
                }),
            }
        }
        let (kept, refused) = validator.grants(&decoded);
        for (g, reason) in refused {
            self.routes.push(RouteView {
                prefix: g.prefix,
                grant: g.name.clone(),
                candidates: Vec::new(),
                active: None,
                local_gateway: false,
                refused: Some(reason.to_string()),
            });
        }
        for g in kept {
            let holder = device
                .iter()
                .find(|p| p.allowed_ips.contains(&g.prefix))
                .map(|p| {
                    keys.get(&p.public_key)
                        .cloned()
                        .unwrap_or_else(|| p.public_key.to_base64())
                });
            let mut candidates: Vec<String> = g
                .gateways
                .iter()
                .map(|gw| format!("{} ({})", gw.node, gw.priority))
                .collect();
            if let Some(l) = &g.learn {
                candidates.extend(l.nodes.iter().map(|n| format!("{n} (bgp, {})", l.priority)));
            }
            self.routes.push(RouteView {
                prefix: g.prefix,
                grant: g.name.clone(),
                candidates,
                active: holder,
                // A static gateway, or a node that may learn the prefix over
                // BGP: either routes it out itself.
                local_gateway: g.gateways.iter().any(|gw| gw.node == self.node)
                    || g.learn
                        .as_ref()
                        .is_some_and(|l| l.nodes.contains(&self.node)),
                refused: None,
            });
        }
        self.routes
            .sort_by(|a, b| (a.prefix, &a.grant).cmp(&(b.prefix, &b.grant)));
    }
}

/// Joins the Nodes (possibly none, if the API was unreachable) with the
/// device's peers; `device` says which device was read.
pub fn build(
    local_node: &str,
    device: &str,
    cluster_cidrs: &[ipnet::IpNet],
    nodes: &[Node],
    stats: &[PeerStats],
    now: SystemTime,
) -> Status {
    let vcfg = ValidationConfig {
        cluster_cidrs: cluster_cidrs.to_vec(),
    };
    let decoded: Vec<_> = nodes.iter().map(|n| node::decode(n, &vcfg)).collect();
    let plan = mesh::plan(
        &MeshConfig {
            local_node: local_node.to_string(),
            interface: String::new(),
            cluster_cidrs: cluster_cidrs.to_vec(),
            default_keepalive: None,
            local_public_key: None,
            local_endpoint: None,
            handshakes: Default::default(),
        },
        &decoded,
    );
    let pass = PassState::from_plan(&plan, 0, None);
    let peers = telemetry::peer_views(&pass, stats, now);
    let unknown_pass = PassState {
        peers: stats
            .iter()
            .filter(|s| {
                !plan
                    .peers
                    .iter()
                    .any(|p| p.config.public_key == s.public_key)
            })
            .map(|s| (s.public_key, "?".to_string(), Vec::new()))
            .collect(),
        ..PassState::default()
    };
    Status {
        node: local_node.to_string(),
        device: device.to_string(),
        peers,
        rejected: pass.rejected.clone(),
        unknown: telemetry::peer_views(&unknown_pass, stats, now),
        routes: Vec::new(),
        bgp: Vec::new(),
    }
}

/// The table `wgmesh status` prints.
pub fn table(status: &Status, now: SystemTime) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for p in status.peers.iter().chain(&status.unknown) {
        rows.push(vec![
            p.node.clone(),
            p.endpoint.map_or("-".into(), |e| e.to_string()),
            if p.allowed_ips.is_empty() {
                "-".into()
            } else {
                p.allowed_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            ago(p.last_handshake, now),
            format!("{} / {}", bytes(p.rx_bytes), bytes(p.tx_bytes)),
            p.fingerprint.to_string(),
            p.state.as_str().to_string(),
        ]);
    }
    for r in &status.rejected {
        let mut row = vec![r.node.clone()];
        row.extend(std::iter::repeat_n("-".to_string(), 5));
        row.push(format!("rejected: {}", r.reason));
        rows.push(row);
    }
    let header = [
        "NODE",
        "ENDPOINT",
        "ALLOWED IPS",
        "LAST HANDSHAKE",
        "RX / TX",
        "KEY",
        "STATE",
    ];
    let mut out = format!(
        "node {} — {} peers — {}\n{}",
        status.node,
        status.peers.len(),
        status.device,
        crate::text::table(&header, &rows)
    );
    if !status.routes.is_empty() {
        let rows: Vec<Vec<String>> = status
            .routes
            .iter()
            .map(|r| {
                let here = match (&r.refused, r.local_gateway, &r.active) {
                    (Some(why), _, _) => format!("refused: {why}"),
                    (None, true, _) => "this node is a gateway".into(),
                    (None, false, Some(a)) => format!("via {a}"),
                    (None, false, None) => {
                        "no gateway on the device (dropped in the tunnel)".into()
                    }
                };
                vec![
                    r.prefix.to_string(),
                    r.grant.clone(),
                    if r.candidates.is_empty() {
                        "-".into()
                    } else {
                        r.candidates.join(", ")
                    },
                    here,
                ]
            })
            .collect();
        out.push_str(&format!(
            "\nextra prefixes — {}\n{}",
            status.routes.len(),
            crate::text::table(
                &["PREFIX", "MESHROUTE", "GATEWAYS (PRIORITY)", "HERE"],
                &rows
            )
        ));
    }
    if !status.bgp.is_empty() {
        let rows: Vec<Vec<String>> = status
            .bgp
            .iter()
            .map(|b| {
                vec![
                    b.name.clone(),
                    b.state.as_str().to_string(),
                    ago(b.since, now),
                    if b.info.is_empty() {
                        "-".into()
                    } else {
                        b.info.clone()
                    },
                ]
            })
            .collect();
        let up = status
            .bgp
            .iter()
            .filter(|b| b.state == SessionState::Established)
            .count();
        out.push_str(&format!(
            "\nBGP sessions — {up} of {} established\n{}",
            status.bgp.len(),
            crate::text::table(&["SESSION", "STATE", "SINCE", "INFO"], &rows)
        ));
    }
    out
}

/// Graphviz DOT of this node's view of the mesh: an edge per peer, solid green
/// when healthy, dashed orange when stale, dotted grey when it never shook
/// hands; rejected Nodes as red boxes with the reason.
pub fn dot(status: &Status) -> String {
    let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = format!(
        "digraph wgmesh {{\n  // device: {}\n  rankdir=LR;\n  node [shape=ellipse];\n",
        status.device.replace('\n', " ")
    );
    let _ = writeln!(out, "  \"{}\" [style=bold];", q(&status.node));
    for p in status.peers.iter().chain(&status.unknown) {
        let (color, style) = match p.state {
            PeerState::Healthy => ("darkgreen", "solid"),
            PeerState::Stale => ("orange", "dashed"),
            PeerState::Never => ("grey", "dotted"),
        };
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\" [color={color}, style={style}, label=\"{}\"];",
            q(&status.node),
            q(&p.node),
            p.state.as_str()
        );
    }
    for r in &status.rejected {
        let _ = writeln!(
            out,
            "  \"{}\" [shape=box, color=red, label=\"{}\\nrejected: {}\"];",
            q(&r.node),
            q(&r.node),
            q(&r.kind)
        );
    }
    for r in status.routes.iter().filter(|r| r.refused.is_none()) {
        let _ = writeln!(
            out,
            "  \"{}\" [shape=note, label=\"{}\\n{}\"];",
            r.prefix,
            r.prefix,
            q(&r.grant)
        );
        let via = if r.local_gateway {
            Some(status.node.as_str())
        } else {
            r.active.as_deref()
        };
        if let Some(via) = via {
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [color=blue, label=\"gateway\"];",
                q(via),
                r.prefix
            );
        }
    }
    for b in &status.bgp {
        let color = if b.state == SessionState::Established {
            "darkgreen"
        } else {
            "red"
        };
        let _ = writeln!(
            out,
            "  \"bgp {}\" [shape=hexagon, label=\"BGP {}\"];\n  \"{}\" -> \"bgp {}\" [color={color}, style=dashed, label=\"{}\"];",
            q(&b.name),
            q(&b.name),
            q(&status.node),
            q(&b.name),
            b.state.as_str()
        );
    }
    out.push_str("}\n");
    out
}

/// "never", or how long ago a Unix time was.
fn ago(last: Option<u64>, now: SystemTime) -> String {
    let Some(t) = last else {
        return "never".into();
    };
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", crate::text::duration(now.saturating_sub(t)))
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn node(name: &str, key: Option<String>, cidr: &str, ep: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        let mut a = BTreeMap::new();
        if let Some(k) = key {
            a.insert("wgmesh.dev/public-key".to_string(), k);
        }
        a.insert("wgmesh.dev/endpoint".to_string(), ep.to_string());
        a.insert("wgmesh.dev/pod-cidrs".to_string(), cidr.to_string());
        n.metadata.annotations = Some(a);
        n
    }

    #[test]
    fn status_names_peers_and_shows_rejections_and_unknown_device_peers() {
        let now = SystemTime::now();
        let (kb, kc, kx) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let nodes = vec![
            node(
                "a",
                Some(PrivateKey::generate().public_key().to_base64()),
                "10.244.0.0/24",
                "192.0.2.1:51820",
            ),
            node(
                "b",
                Some(kb.to_base64()),
                "10.244.1.0/24",
                "192.0.2.2:51820",
            ),
            node(
                "c",
                Some(kc.to_base64()),
                "10.244.2.0/24",
                "192.0.2.3:51820",
            ),
            node(
                "d",
                Some("garbage".into()),
                "10.244.3.0/24",
                "192.0.2.4:51820",
            ),
        ];
        let stats = vec![
            PeerStats {
                public_key: kb,
                endpoint: Some("192.0.2.2:51820".parse().unwrap()),
                last_handshake: Some(now - Duration::from_secs(7)),
                rx_bytes: 2048,
                tx_bytes: 4096,
            },
            PeerStats {
                public_key: kx,
                endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            },
        ];
        let s = build(
            "a",
            "kernel wgmesh0 (generic netlink)",
            &["10.244.0.0/16".parse().unwrap()],
            &nodes,
            &stats,
            now,
        );
        assert_eq!(s.peers.len(), 2);
        assert_eq!(s.peers[0].node, "b");
        assert_eq!(s.peers[0].state, PeerState::Healthy);
        assert_eq!(s.peers[1].state, PeerState::Never);
        assert_eq!(s.rejected.len(), 1);
        assert_eq!(s.unknown.len(), 1);
        let t = table(&s, now);
        assert!(t.contains("7s ago"), "{t}");
        assert!(t.contains("2.0 KiB / 4.0 KiB"), "{t}");
        assert!(t.contains("rejected: "), "{t}");
        assert!(t.contains(&kb.fingerprint().to_string()), "{t}");
        assert!(
            t.starts_with("node a — 2 peers — kernel wgmesh0 (generic netlink)\n"),
            "{t}"
        );
        let g = dot(&s);
        assert!(
            g.contains("\"a\" -> \"b\" [color=darkgreen, style=solid"),
            "{g}"
        );
        assert!(
            g.contains("\"a\" -> \"c\" [color=grey, style=dotted"),
            "{g}"
        );
        assert!(g.contains("\"d\" [shape=box, color=red"), "{g}");
        assert!(g.starts_with("digraph wgmesh {") && g.ends_with("}\n"));
        assert!(
            g.contains("  // device: kernel wgmesh0 (generic netlink)\n"),
            "{g}"
        );

        // Extra prefixes: the device says who holds each.
        let mut s = s;
        let grants = [
            serde_json::json!({"metadata": {"name": "site"}, "spec": {"prefix": "198.18.0.0/24",
                "gateways": [{"node": "b", "priority": 10}, {"node": "c", "priority": 20}]}}),
            serde_json::json!({"metadata": {"name": "bad"}, "spec": {"prefix": "10.244.0.0/20",
                "gateways": [{"node": "b"}]}}),
            // This node may learn it over BGP: it routes it out itself.
            serde_json::json!({"metadata": {"name": "fabric"}, "spec": {"prefix": "203.0.113.0/24",
                "learn": {"nodes": ["a"], "maxLength": 24}}}),
        ];
        let device = vec![mesh::PeerConfig {
            public_key: kb,
            endpoint: None,
            allowed_ips: vec![
                "10.244.1.0/24".parse().unwrap(),
                "198.18.0.0/24".parse().unwrap(),
            ],
            persistent_keepalive: None,
            successor: None,
        }];
        s.add_routes(
            &["10.244.0.0/16".parse().unwrap()],
            &nodes,
            &grants,
            &device,
        );
        assert_eq!(s.routes.len(), 3);
        let t = table(&s, now);
        assert!(t.contains("extra prefixes — 3"), "{t}");
        let fabric = t.lines().find(|l| l.contains("203.0.113.0/24")).unwrap();
        assert!(fabric.contains("this node is a gateway"), "{t}");
        assert!(fabric.contains("a (bgp, "), "{t}");
        assert!(t.contains("b (10), c (20)"), "{t}");
        assert!(t.contains("via b"), "{t}");
        assert!(t.contains("refused: it overlaps pod CIDR"), "{t}");
        let g = dot(&s);
        assert!(g.contains("\"b\" -> \"198.18.0.0/24\" [color=blue"), "{g}");
    }

    #[test]
    fn without_the_api_every_device_peer_is_unknown() {
        let now = SystemTime::now();
        let k = PrivateKey::generate().public_key();
        let stats = vec![PeerStats {
            public_key: k,
            endpoint: None,
            last_handshake: Some(now - Duration::from_secs(400)),
            rx_bytes: 1,
            tx_bytes: 1,
        }];
        let s = build(
            "a",
            "uapi /var/run/wireguard/wgmesh0.sock",
            &[],
            &[],
            &stats,
            now,
        );
        assert!(s.peers.is_empty());
        assert_eq!(s.unknown.len(), 1);
        assert_eq!(s.unknown[0].state, PeerState::Stale);
        assert!(table(&s, now).contains("6m 40s ago"));
    }

    /// BIRD's `show protocols` as the engine parses it: the BGP rows become
    /// sessions (the kernel and static protocols do not), with BIRD's reason
    /// for a session that is down.
    #[test]
    fn bgp_sessions_come_from_birds_protocols() {
        use crate::routes::bgp::engine::{parse_protocols, parse_reply};
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_100);
        let reply = parse_reply(
            "0001 BIRD 2.0.12 ready.\n\
             2002-Name       Proto      Table      State  Since         Info\n\
             1002-kernel4    Kernel     master4    up     1800000000    \n\
             \x20    fabric4    BGP        ---        up     1800000040    Established   \n\
             \x20    fabric6    BGP        ---        start  1800000090    Active        Socket: Connection refused\n\
             \x20    spine4     BGP        ---        down   1800000000    Automatic shutdown: Route limit exceeded\n\
             0000 \n",
        );
        let mut s = build("a", "uapi x", &[], &[], &[], now);
        s.add_sessions(&parse_protocols(&reply));
        let states: Vec<(&str, &str)> = s
            .bgp
            .iter()
            .map(|b| (b.name.as_str(), b.state.as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("fabric4", "established"),
                ("fabric6", "active"),
                ("spine4", "down")
            ]
        );
        let t = table(&s, now);
        assert!(t.contains("BGP sessions — 1 of 3 established"), "{t}");
        assert!(t.contains("1m 0s ago"), "{t}");
        assert!(t.contains("Socket: Connection refused"), "{t}");
        assert!(
            t.contains("Automatic shutdown: Route limit exceeded"),
            "{t}"
        );
        let g = dot(&s);
        assert!(
            g.contains("\"a\" -> \"bgp fabric4\" [color=darkgreen"),
            "{g}"
        );
        assert!(g.contains("\"a\" -> \"bgp spine4\" [color=red"), "{g}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["bgp"][1]["info"], "Socket: Connection refused");
    }
}
