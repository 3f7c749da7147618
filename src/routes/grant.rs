//! The `MeshRoute` resource (group `wgmesh.dev`, version `v1alpha1`,
//! cluster-scoped): an admin's grant of one extra prefix, either carried to
//! named gateway nodes (`gateways`) or learned over BGP from named nodes
//! (`learn`). Agents only read it (RBAC get/list/watch); no node can grant
//! itself a prefix.
//!
//! [`decode`] trusts the object no more than a Node: the API server checks the
//! CRD's schema, but an older CRD version, a schema edited by hand or the
//! testbed's own API may let anything through, so every field is checked
//! again and every problem is named at once.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use jiff::Timestamp;
use serde_json::Value;

/// The API group, version and plural of the resource.
pub const GROUP: &str = "wgmesh.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "MeshRoute";
pub const PLURAL: &str = "meshroutes";

/// How long the better gateway must be healthy before it takes its prefix
/// back, unless the grant says otherwise: long enough that a gateway whose
/// session flaps does not pull the prefix back and forth.
pub const DEFAULT_FAILBACK: Duration = Duration::from_secs(30);
/// At most this many gateways per grant (every agent evaluates them all on
/// every pass).
pub const MAX_GATEWAYS: usize = 16;
/// At most this many nodes in `learn.nodes`.
pub const MAX_LEARN_NODES: usize = 256;

/// One gateway of a static grant. Lower `priority` wins; equal priorities go
/// to the node name that sorts first, so every agent picks the same one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gateway {
    pub priority: u16,
    pub node: String,
}

/// Permission to learn prefixes inside [`Grant::prefix`] over BGP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learn {
    /// Only these nodes may advertise; empty means none (a grant must name
    /// who may use it).
    pub nodes: BTreeSet<String>,
    /// The longest prefix length accepted inside the grant (RFC 7454's "too
    /// specific"); at least the grant's own length.
    pub max_length: u8,
    /// The priority a learning node has as gateway of what it learned.
    pub priority: u16,
}

/// A decoded, valid `MeshRoute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `metadata.name`.
    pub name: String,
    pub created: Option<Timestamp>,
    /// Canonical (no host bits).
    pub prefix: IpNet,
    /// Sorted by (priority, node); node names unique.
    pub gateways: Vec<Gateway>,
    pub learn: Option<Learn>,
    pub failback: Duration,
}

/// One problem with one field of a `MeshRoute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The JSON path, e.g. `spec.gateways[1].priority`.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// A `MeshRoute` that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MeshRoute {name}: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Invalid {
    pub name: String,
    pub errors: Vec<FieldError>,
}

/// Decodes one `MeshRoute` object (the whole object as JSON).
pub fn decode(object: &Value) -> Result<Grant, Invalid> {
    let mut errors = Vec::new();
    let mut err = |field: &str, problem: String| {
        errors.push(FieldError {
            field: field.to_owned(),
            problem,
        })
    };
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or_default().to_owned();
    if name.is_empty() {
        err("metadata.name", "missing".into());
    }
    let created = meta["creationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<Timestamp>().ok());
    let spec = &object["spec"];
    if !spec.is_object() {
        err(
            "spec",
            "missing: a MeshRoute needs spec.prefix and spec.gateways or spec.learn".into(),
        );
    }

    let prefix = match spec["prefix"].as_str() {
        None => {
            err("spec.prefix", "missing: a CIDR such as 192.0.2.0/24".into());
            None
        }
        Some(text) => match text.trim().parse::<IpNet>() {
            Err(_) => {
                err(
                    "spec.prefix",
                    format!(
                        "{} is not a CIDR (write it like 192.0.2.0/24 or 2001:db8::/48)",
                        shorten(text)
                    ),
                );
                None
            }
            Ok(net) if net.trunc() != net => {
                err(
                    "spec.prefix",
                    format!("{net} has host bits set; write {}", net.trunc()),
                );
                None
            }
            Ok(net) => Some(net),
        },
    };

    let mut gateways = Vec::new();
    match &spec["gateways"] {
        Value::Null => {}
        Value::Array(list) => {
            if list.len() > MAX_GATEWAYS {
                err(
                    "spec.gateways",
                    format!("{} entries; at most {MAX_GATEWAYS}", list.len()),
                );
            }
            let mut seen = BTreeSet::new();
            for (i, g) in list.iter().enumerate().take(MAX_GATEWAYS) {
                let at = format!("spec.gateways[{i}]");
                let node = g["node"].as_str().unwrap_or_default();
                if !valid_node_name(node) {
                    err(
                        &format!("{at}.node"),
                        format!("{} is not a Node name (lower-case RFC 1123)", shorten(node)),
                    );
                    continue;
                }
                let priority = match &g["priority"] {
                    Value::Null => 100,
                    p => match p.as_u64().and_then(|p| u16::try_from(p).ok()) {
                        Some(p) => p,
                        None => {
                            err(
                                &format!("{at}.priority"),
                                format!(
                                    "{} is not an integer from 0 to 65535",
                                    shorten(&p.to_string())
                                ),
                            );
                            continue;
                        }
                    },
                };
                if !seen.insert(node.to_owned()) {
                    err(&format!("{at}.node"), format!("{node} is listed twice"));
                    continue;
                }
                gateways.push(Gateway {
                    priority,
                    node: node.to_owned(),
                });
            }
        }
        other => err("spec.gateways", format!("{} is not a list", kind(other))),
    }
    gateways.sort();

    let learn = match &spec["learn"] {
        Value::Null => None,
        Value::Object(l) => {
            let mut nodes = BTreeSet::new();
            match l.get("nodes") {
                Some(Value::Array(list)) => {
                    if list.len() > MAX_LEARN_NODES {
                        err(
                            "spec.learn.nodes",
                            format!("{} entries; at most {MAX_LEARN_NODES}", list.len()),
                        );
                    }
                    for (i, n) in list.iter().enumerate().take(MAX_LEARN_NODES) {
                        match n.as_str().filter(|n| valid_node_name(n)) {
                            Some(n) => {
                                nodes.insert(n.to_owned());
                            }
                            None => err(
                                &format!("spec.learn.nodes[{i}]"),
                                format!(
                                    "{} is not a Node name (lower-case RFC 1123)",
                                    shorten(&n.to_string())
                                ),
                            ),
                        }
                    }
                    if list.is_empty() {
                        err(
                            "spec.learn.nodes",
                            "empty: name the nodes that may advertise inside this prefix".into(),
                        );
                    }
                }
                _ => err(
                    "spec.learn.nodes",
                    "missing: a list of the nodes that may advertise inside this prefix".into(),
                ),
            }
            let max_bits = prefix.map_or(128, |p| p.max_prefix_len());
            let max_length = match l.get("maxLength") {
                None | Some(Value::Null) => prefix.map_or(0, |p| p.prefix_len()),
                Some(v) => match v.as_u64().and_then(|v| u8::try_from(v).ok()) {
                    Some(m) if m <= max_bits && prefix.is_none_or(|p| m >= p.prefix_len()) => m,
                    _ => {
                        err(
                            "spec.learn.maxLength",
                            format!(
                                "{} must be an integer from the prefix's own length to {max_bits}",
                                shorten(&v.to_string())
                            ),
                        );
                        0
                    }
                },
            };
            let priority = match l.get("priority") {
                None | Some(Value::Null) => 100,
                Some(v) => match v.as_u64().and_then(|v| u16::try_from(v).ok()) {
                    Some(p) => p,
                    None => {
                        err(
                            "spec.learn.priority",
                            format!(
                                "{} is not an integer from 0 to 65535",
                                shorten(&v.to_string())
                            ),
                        );
                        100
                    }
                },
            };
            Some(Learn {
                nodes,
                max_length,
                priority,
            })
        }
        other => {
            err("spec.learn", format!("{} is not an object", kind(other)));
            None
        }
    };
    if spec["gateways"].as_array().is_some_and(|l| l.is_empty()) {
        err(
            "spec.gateways",
            "empty: list at least one gateway node, or leave it out and use spec.learn".into(),
        );
    } else if gateways.is_empty() && learn.is_none() && spec["gateways"].is_null() {
        err(
            "spec.gateways",
            "missing: a MeshRoute needs spec.gateways (static) or spec.learn (BGP)".into(),
        );
    }

    let failback = match &spec["failbackSeconds"] {
        Value::Null => DEFAULT_FAILBACK,
        v => match v.as_u64().filter(|s| *s <= 86_400) {
            Some(s) => Duration::from_secs(s),
            None => {
                err(
                    "spec.failbackSeconds",
                    format!(
                        "{} is not an integer from 0 to 86400",
                        shorten(&v.to_string())
                    ),
                );
                DEFAULT_FAILBACK
            }
        },
    };

    match prefix {
        Some(prefix) if errors.is_empty() => Ok(Grant {
            name,
            created,
            prefix,
            gateways,
            learn,
            failback,
        }),
        _ => Err(Invalid { name, errors }),
    }
}

/// RFC 1123 subdomain, as Kubernetes requires of Node names.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Echoed input, bounded and escaped (it ends up in logs and Events).
fn shorten(text: &str) -> String {
    let short: String = text.chars().take(64).collect();
    format!("{short:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(spec: Value) -> Value {
        json!({"metadata": {"name": "site-a", "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": spec})
    }

    #[test]
    fn static_grant_sorted_by_priority_then_name() {
        let g = decode(&obj(json!({
            "prefix": "192.0.2.0/24",
            "gateways": [{"node": "n2", "priority": 20}, {"node": "n1", "priority": 10}, {"node": "n0", "priority": 20}],
        })))
        .unwrap();
        assert_eq!(g.prefix, "192.0.2.0/24".parse::<IpNet>().unwrap());
        let order: Vec<_> = g.gateways.iter().map(|g| g.node.as_str()).collect();
        assert_eq!(order, ["n1", "n0", "n2"]);
        assert_eq!(g.failback, DEFAULT_FAILBACK);
        assert!(g.learn.is_none());
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let e = decode(&obj(json!({
            "prefix": "192.0.2.1/24",
            "gateways": [{"node": "N1"}, {"node": "n2", "priority": 70000}, {"node": "n3"}, {"node": "n3"}],
            "failbackSeconds": -1,
        })))
        .unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.prefix",
                "spec.gateways[0].node",
                "spec.gateways[1].priority",
                "spec.gateways[3].node",
                "spec.failbackSeconds"
            ]
        );
        assert!(e.to_string().contains("write 192.0.2.0/24"), "{e}");
    }

    #[test]
    fn learn_needs_nodes_and_a_sane_max_length() {
        let g = decode(&obj(json!({
            "prefix": "198.51.100.0/22",
            "learn": {"nodes": ["n1"], "maxLength": 24},
        })))
        .unwrap();
        let learn = g.learn.unwrap();
        assert_eq!(learn.max_length, 24);
        assert!(learn.nodes.contains("n1"));
        for bad in [
            json!({"nodes": []}),
            json!({"nodes": ["n1"], "maxLength": 21}),
            json!({"nodes": ["n1"], "maxLength": 33}),
            json!({}),
        ] {
            let e = decode(&obj(json!({"prefix": "198.51.100.0/22", "learn": bad}))).unwrap_err();
            assert!(
                e.errors.iter().all(|e| e.field.starts_with("spec.learn")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_grant_must_say_what_it_is_for() {
        let e = decode(&obj(json!({"prefix": "192.0.2.0/24"}))).unwrap_err();
        assert_eq!(e.errors[0].field, "spec.gateways");
        let e = decode(&json!({"metadata": {}})).unwrap_err();
        let fields: Vec<_> = e.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["metadata.name", "spec", "spec.prefix", "spec.gateways"]
        );
    }

    #[test]
    fn an_empty_gateway_list_is_an_error_not_a_silent_no_op() {
        let e = decode(&obj(json!({"prefix": "192.0.2.0/24", "gateways": []}))).unwrap_err();
        assert_eq!(e.errors[0].field, "spec.gateways");
        assert!(e.errors[0].problem.starts_with("empty"), "{e}");
    }

    #[test]
    fn hostile_text_is_bounded_and_escaped() {
        let long = format!("\"}}{}", "x".repeat(10_000));
        let e = decode(&obj(json!({"prefix": long, "gateways": [{"node": "n1"}]}))).unwrap_err();
        assert!(e.to_string().len() < 300, "{e}");
        let big = json!({"x": "y".repeat(10_000)});
        let e = decode(&obj(json!({"prefix": "192.0.2.0/24", "failbackSeconds": big,
            "gateways": [{"node": "n1", "priority": big}], "learn": {"nodes": [big], "maxLength": big, "priority": big}}))).unwrap_err();
        assert!(e.to_string().len() < 1000, "{}", e.to_string().len());
    }
}
