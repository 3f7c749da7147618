//! `meta.k8s.io/v1` Tables: kubectl asks for them (`Accept: ...;as=Table;v=v1;g=meta.k8s.io`)
//! and prints their columns, so `kubectl get nodes [-o wide]` and `kubectl get events`
//! show the same columns as against a real cluster. Wide columns have priority 1.

use k8s_openapi::api::core::v1::{Event as CoreEvent, Node};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::{json, Value};

/// What each row carries in `object` (`?includeObject=`; the apiserver's default is
/// `Metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("None") => Self::None,
            Some("Object") => Self::Object,
            _ => Self::Metadata,
        }
    }
}

pub const TABLE_CONTENT_TYPE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

/// True when the Accept header asks for a v1 Table first (before plain JSON).
pub fn wants_table(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let mime = parts.next().unwrap_or("");
        let params: Vec<&str> = parts.collect();
        if mime != "application/json" && mime != "*/*" {
            continue;
        }
        let is_table = params.contains(&"as=Table")
            && params.contains(&"g=meta.k8s.io")
            && params.contains(&"v=v1");
        if is_table {
            return true;
        }
        if !params.iter().any(|p| p.starts_with("as=")) {
            // Plain JSON is preferred over any Table listed after it.
            return false;
        }
    }
    false
}

fn column(name: &str, format: &str, description: &str, priority: u8) -> Value {
    json!({
        "name": name,
        "type": "string",
        "format": format,
        "description": description,
        "priority": priority,
    })
}

fn row<T: Serialize>(cells: Vec<Value>, object: &T, include: IncludeObject) -> Value {
    let mut row = json!({ "cells": cells });
    let full = serde_json::to_value(object).unwrap_or(Value::Null);
    match include {
        IncludeObject::None => {}
        IncludeObject::Object => row["object"] = full,
        IncludeObject::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": full.get("metadata").cloned().unwrap_or_else(|| json!({})),
            })
        }
    }
    row
}

fn table(columns: Vec<Value>, rows: Vec<Value>, resource_version: u64) -> Value {
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": resource_version.to_string() },
        "columnDefinitions": columns,
        "rows": rows,
    })
}

pub fn node_table(nodes: &[Node], resource_version: u64, include: IncludeObject) -> Value {
    let columns = vec![
        column("Name", "name", "Name must be unique within a namespace.", 0),
        column("Status", "", "The status of the node", 0),
        column("Roles", "", "The roles of the node", 0),
        column("Age", "", "CreationTimestamp is a timestamp representing the server time when this object was created.", 0),
        column("Version", "", "Kubelet Version reported by the node.", 0),
        column("Internal-IP", "", "List of internal IPs (if any) reported by the node", 1),
        column("External-IP", "", "List of external IPs (if any) reported by the node", 1),
        column("OS-Image", "", "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).", 1),
        column("Kernel-Version", "", "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).", 1),
        column("Container-Runtime", "", "Container runtime version reported by the node through runtime remote API (e.g. containerd://1.4.2).", 1),
    ];
    let now = Timestamp::now();
    let rows = nodes
        .iter()
        .map(|n| row(node_cells(n, now), n, include))
        .collect();
    table(columns, rows, resource_version)
}

fn node_cells(node: &Node, now: Timestamp) -> Vec<Value> {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str());
    let mut state = match ready {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        state.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<String> = node
        .metadata
        .labels
        .iter()
        .flatten()
        .filter_map(|(k, v)| {
            if let Some(role) = k.strip_prefix("node-role.kubernetes.io/") {
                (!role.is_empty()).then(|| role.to_string())
            } else if k == "kubernetes.io/role" && !v.is_empty() {
                Some(v.clone())
            } else {
                None
            }
        })
        .collect();
    roles.sort();
    roles.dedup();
    let roles = if roles.is_empty() {
        "<none>".to_string()
    } else {
        roles.join(",")
    };
    let age = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| human_age(now, t.0))
        .unwrap_or_else(|| "<unknown>".into());
    let info = status.and_then(|s| s.node_info.as_ref());
    let address = |kind: &str| {
        status
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == kind))
            .map(|a| a.address.clone())
            .unwrap_or_else(|| "<none>".into())
    };
    let or_unknown = |v: Option<&String>| {
        v.filter(|s| !s.is_empty())
            .cloned()
            .unwrap_or_else(|| "<unknown>".into())
    };
    vec![
        json!(node.metadata.name.clone().unwrap_or_default()),
        json!(state),
        json!(roles),
        json!(age),
        json!(info.map(|i| i.kubelet_version.clone()).unwrap_or_default()),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        json!(or_unknown(info.map(|i| &i.os_image))),
        json!(or_unknown(info.map(|i| &i.kernel_version))),
        json!(or_unknown(info.map(|i| &i.container_runtime_version))),
    ]
}

pub fn event_table(events: &[CoreEvent], resource_version: u64, include: IncludeObject) -> Value {
    let columns = vec![
        column("Last Seen", "", "Time when this Event was last seen", 0),
        column("Type", "", "Type of this event (Normal, Warning), new types could be added in the future.", 0),
        column("Reason", "", "This should be a short, machine understandable string that gives the reason for this event being generated.", 0),
        column("Object", "", "The object this Event is about.", 0),
        column("Subobject", "", "The field of the object this Event is about.", 1),
        column("Source", "", "The component reporting this event.", 1),
        column("Message", "", "A human-readable description of the status of this operation.", 0),
        column("First Seen", "", "The time at which the event was first recorded.", 1),
        column("Count", "", "The number of times this event has occurred.", 1),
        column("Name", "name", "Name must be unique within a namespace.", 1),
    ];
    let now = Timestamp::now();
    let rows = events
        .iter()
        .map(|e| row(event_cells(e, now), e, include))
        .collect();
    table(columns, rows, resource_version)
}

fn event_cells(e: &CoreEvent, now: Timestamp) -> Vec<Value> {
    let last = e
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0));
    let first = e
        .first_timestamp
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.event_time.as_ref().map(|t| t.0));
    let age = |t: Option<Timestamp>| {
        t.map(|t| human_age(now, t))
            .unwrap_or_else(|| "<unknown>".into())
    };
    let obj = &e.involved_object;
    let object = format!(
        "{}/{}",
        obj.kind.as_deref().unwrap_or("").to_ascii_lowercase(),
        obj.name.as_deref().unwrap_or("")
    );
    let source = e
        .source
        .as_ref()
        .and_then(|s| s.component.clone())
        .or_else(|| e.reporting_component.clone())
        .unwrap_or_default();
    let count = e
        .series
        .as_ref()
        .and_then(|s| s.count)
        .or(e.count)
        .unwrap_or(1);
    vec![
        json!(age(last)),
        json!(e.type_.clone().unwrap_or_default()),
        json!(e.reason.clone().unwrap_or_default()),
        json!(object),
        json!(obj.field_path.clone().unwrap_or_default()),
        json!(source),
        json!(e.message.clone().unwrap_or_default()),
        json!(age(first)),
        json!(count.to_string()),
        json!(e.metadata.name.clone().unwrap_or_default()),
    ]
}

/// kubectl's compact age ("45s", "3m10s", "2h5m", "3d4h", "400d").
pub fn human_age(now: Timestamp, then: Timestamp) -> String {
    let secs = now.as_second() - then.as_second();
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (mins, hours, days) = (secs / 60, secs / 3600, secs / 86_400);
    let with_rest = |major: i64, unit: &str, minor: i64, minor_unit: &str| {
        if minor == 0 {
            format!("{major}{unit}")
        } else {
            format!("{major}{unit}{minor}{minor_unit}")
        }
    };
    match secs {
        s if s < 120 => format!("{s}s"),
        _ if mins < 10 => with_rest(mins, "m", secs % 60, "s"),
        _ if mins < 180 => format!("{mins}m"),
        _ if hours < 8 => with_rest(hours, "h", mins % 60, "m"),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 24 * 8 => with_rest(days, "d", hours % 24, "h"),
        _ if days < 365 * 2 => format!("{days}d"),
        _ if days < 365 * 8 => with_rest(days / 365, "y", days % 365, "d"),
        _ => format!("{}y", days / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        let t0 = Timestamp::from_second(1_000_000).unwrap();
        let at = |s: i64| human_age(Timestamp::from_second(1_000_000 + s).unwrap(), t0);
        assert_eq!(at(5), "5s");
        assert_eq!(at(119), "119s");
        assert_eq!(at(190), "3m10s");
        assert_eq!(at(600), "10m");
        assert_eq!(at(3 * 3600 + 300), "3h5m");
        assert_eq!(at(30 * 3600), "30h");
        assert_eq!(at(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(at(400 * 86_400), "400d");
    }

    #[test]
    fn accept_negotiation() {
        assert!(wants_table(Some(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        )));
        assert!(!wants_table(Some("application/json")));
        assert!(!wants_table(None));
        assert!(!wants_table(Some(
            "application/json, application/json;as=Table;v=v1;g=meta.k8s.io"
        )));
    }
}
