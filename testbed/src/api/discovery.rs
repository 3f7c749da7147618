//! Discovery documents: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/events.k8s.io[/v1]`.
//!
//! Answered as plain `application/json`: kubectl asks for aggregated discovery
//! (`as=APIGroupDiscoveryList`) first, and falls back to these legacy documents when the
//! response's Content-Type says they are what it got.

use std::net::SocketAddr;

use serde_json::{json, Value};

/// The Kubernetes version this server claims to be: the k8s-openapi `latest` feature
/// (v1_37) the types come from.
pub const KUBE_MINOR: &str = "37";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBE_MINOR,
        "gitVersion": format!("v1.{KUBE_MINOR}.0+wgmesh-testbed"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none (wgmesh test API, Rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, go_arch()),
    })
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn api_versions(addr: SocketAddr) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            { "clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string() }
        ],
    })
}

pub fn core_v1_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {
                "name": "events",
                "singularName": "event",
                "namespaced": true,
                "kind": "Event",
                "verbs": ["create", "delete", "get", "list", "patch", "update"],
                "shortNames": ["ev"],
            },
            {
                "name": "nodes",
                "singularName": "node",
                "namespaced": false,
                "kind": "Node",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": ["no"],
            },
            {
                "name": "nodes/status",
                "singularName": "",
                "namespaced": false,
                "kind": "Node",
                "verbs": ["get", "patch", "update"],
            },
        ],
    })
}

fn events_group_version() -> Value {
    json!({ "groupVersion": "events.k8s.io/v1", "version": "v1" })
}

pub fn events_group() -> Value {
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "events.k8s.io",
        "versions": [events_group_version()],
        "preferredVersion": events_group_version(),
    })
}

pub fn api_groups() -> Value {
    let mut group = events_group();
    if let Some(obj) = group.as_object_mut() {
        obj.remove("kind");
        obj.remove("apiVersion");
    }
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [group] })
}

pub fn events_v1_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "events.k8s.io/v1",
        "resources": [
            {
                "name": "events",
                "singularName": "event",
                "namespaced": true,
                "kind": "Event",
                "verbs": ["create", "delete", "get", "list", "patch", "update"],
                "shortNames": ["ev"],
            },
        ],
    })
}

/// Changes whenever the documents below change (clients cache by it).
const OPENAPI_HASH: &str = "wgmesh-testbed-1";

/// `/openapi/v3`: the index of per-group-version documents.
pub fn openapi_v3_root() -> Value {
    let entry =
        |gv: &str| json!({ "serverRelativeURL": format!("/openapi/v3/{gv}?hash={OPENAPI_HASH}") });
    json!({
        "paths": {
            "api/v1": entry("api/v1"),
            "apis/events.k8s.io/v1": entry("apis/events.k8s.io/v1"),
        }
    })
}

/// A deliberately small OpenAPI v3 document: only the PATCH operations with their
/// group-version-kind and the `fieldValidation` query parameter. That is what kubectl
/// looks for to decide that the server validates fields itself (`fieldValidation=Strict`,
/// which this server implements), so `kubectl create/apply` work without schemas.
/// There are no schemas: `kubectl explain` does not work against this server.
pub fn openapi_v3_group(group_version: &str) -> Option<Value> {
    let (group, version, items): (&str, &str, Vec<(&str, &str)>) = match group_version {
        "api/v1" => (
            "",
            "v1",
            vec![
                ("/api/v1/nodes/{name}", "Node"),
                ("/api/v1/nodes/{name}/status", "Node"),
                ("/api/v1/namespaces/{namespace}/events/{name}", "Event"),
            ],
        ),
        "apis/events.k8s.io/v1" => (
            "events.k8s.io",
            "v1",
            vec![(
                "/apis/events.k8s.io/v1/namespaces/{namespace}/events/{name}",
                "Event",
            )],
        ),
        _ => return None,
    };
    let mut paths = serde_json::Map::new();
    for (path, kind) in items {
        paths.insert(
            path.to_string(),
            json!({
                "patch": {
                    "x-kubernetes-group-version-kind": { "group": group, "version": version, "kind": kind },
                    "parameters": [
                        { "name": "dryRun", "in": "query", "schema": { "type": "string" } },
                        { "name": "fieldManager", "in": "query", "schema": { "type": "string" } },
                        { "name": "fieldValidation", "in": "query", "schema": { "type": "string" } },
                    ],
                    "responses": { "200": { "description": "OK" } },
                }
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": { "title": "Kubernetes (wgmesh test API)", "version": format!("v1.{KUBE_MINOR}.0") },
        "paths": paths,
        "components": {},
    }))
}
