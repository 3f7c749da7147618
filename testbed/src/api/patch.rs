//! The three PATCH flavours clients send, applied to an object's JSON.
//!
//! Merge patch (RFC 7386) and JSON patch (RFC 6902) come from the `json-patch` crate.
//! Strategic merge patch is the merge patch plus the list strategies Node and Event
//! declare in Kubernetes' Go types: `status.conditions` and `status.addresses` merge by
//! `type`, `metadata.ownerReferences` by `uid`, `metadata.finalizers` and `spec.podCIDRs`
//! are merged as sets; every other list is replaced whole. The directives `$patch`
//! (`replace`, `delete`, `merge`), `$deleteFromPrimitiveList/<field>`, `$retainKeys` and
//! `$setElementOrder/<field>` are understood (the last one is accepted and ignored:
//! order is not significant for these lists).

use serde_json::{Map, Value};

use super::status::ApiError;

/// How a PATCH body is interpreted, from its Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Json,
    Strategic,
}

impl PatchKind {
    /// The patch kind for a Content-Type, or the 415 the apiserver would answer.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "server-side apply is not implemented by the wgmesh test API; use a merge, JSON or strategic merge patch",
                ))
            }
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }
}

/// Applies `body` (the raw request body) to `doc`.
pub fn apply(doc: &mut Value, kind: PatchKind, body: &[u8]) -> Result<(), ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    match kind {
        PatchKind::Merge => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            json_patch::merge(doc, &patch);
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}")))?;
            json_patch::patch(doc, &ops.0).map_err(|e| {
                ApiError::unprocessable(format!("the JSON patch could not be applied: {e}"))
            })
        }
        PatchKind::Strategic => {
            let Value::Object(patch) = patch else {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            };
            strategic_merge_object(doc, &patch, "")
        }
    }
}

/// How a list at a given path is merged by a strategic merge patch.
enum ListStrategy {
    Replace,
    /// Elements are objects identified by this key.
    MergeByKey(&'static str),
    /// Elements are scalars; the result is the union.
    Set,
}

fn list_strategy(path: &str) -> ListStrategy {
    match path {
        "status.conditions" | "status.addresses" => ListStrategy::MergeByKey("type"),
        "metadata.ownerReferences" => ListStrategy::MergeByKey("uid"),
        "metadata.finalizers" | "spec.podCIDRs" => ListStrategy::Set,
        _ => ListStrategy::Replace,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn strategic_merge_object(
    doc: &mut Value,
    patch: &Map<String, Value>,
    path: &str,
) -> Result<(), ApiError> {
    if let Some(directive) = patch.get("$patch") {
        match directive.as_str() {
            Some("replace") => {
                let mut replaced = patch.clone();
                replaced.remove("$patch");
                *doc = Value::Object(replaced);
                return Ok(());
            }
            Some("delete") => {
                *doc = Value::Null;
                return Ok(());
            }
            Some("merge") => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid $patch directive at {path}: {directive}"
                )))
            }
        }
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let mut retain: Option<Vec<String>> = None;
    for (key, value) in patch {
        if key == "$patch" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if key == "$retainKeys" {
            let keys = value
                .as_array()
                .ok_or_else(|| ApiError::bad_request("$retainKeys must be a list of strings"))?;
            retain = Some(
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect(),
            );
            continue;
        }
        let Some(obj) = doc.as_object_mut() else {
            continue;
        };
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value.as_array().ok_or_else(|| {
                ApiError::bad_request("$deleteFromPrimitiveList must carry a list")
            })?;
            if let Some(Value::Array(list)) = obj.get_mut(field) {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        let child_path = join(path, key);
        match value {
            Value::Null => {
                obj.remove(key);
            }
            Value::Object(child) => {
                let slot = obj.entry(key.clone()).or_insert(Value::Null);
                strategic_merge_object(slot, child, &child_path)?;
                if slot.is_null() {
                    obj.remove(key);
                }
            }
            Value::Array(items) => {
                let slot = obj.entry(key.clone()).or_insert(Value::Null);
                merge_list(slot, items, &child_path)?;
            }
            scalar => {
                obj.insert(key.clone(), scalar.clone());
            }
        }
    }
    if let (Some(keep), Some(obj)) = (retain, doc.as_object_mut()) {
        obj.retain(|k, _| keep.contains(k));
    }
    Ok(())
}

fn merge_list(slot: &mut Value, items: &[Value], path: &str) -> Result<(), ApiError> {
    let replace_directive = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let strategy = list_strategy(path);
    if replace_directive || matches!(strategy, ListStrategy::Replace) {
        *slot = Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return Ok(());
    }
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    let Value::Array(current) = slot else {
        return Ok(());
    };
    match strategy {
        ListStrategy::Set => {
            for item in items {
                if !current.contains(item) {
                    current.push(item.clone());
                }
            }
        }
        ListStrategy::MergeByKey(merge_key) => {
            for item in items {
                let Value::Object(fields) = item else {
                    return Err(ApiError::bad_request(format!(
                        "list {path} merges by {merge_key}: its elements must be objects"
                    )));
                };
                let Some(id) = fields.get(merge_key) else {
                    return Err(ApiError::bad_request(format!(
                        "map: {item} does not contain declared merge key: {merge_key}"
                    )));
                };
                let pos = current.iter().position(|c| c.get(merge_key) == Some(id));
                let delete = fields.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        current.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic_merge_object(&mut current[i], fields, path)?,
                    (None, false) => {
                        let mut fresh = Value::Object(Map::new());
                        strategic_merge_object(&mut fresh, fields, path)?;
                        current.push(fresh);
                    }
                }
            }
        }
        ListStrategy::Replace => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(kind: PatchKind, doc: Value, patch: Value) -> Result<Value, ApiError> {
        let mut doc = doc;
        apply(&mut doc, kind, patch.to_string().as_bytes())?;
        Ok(doc)
    }

    #[test]
    fn merge_patch_null_deletes() {
        let doc = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        let out = run(
            PatchKind::Merge,
            doc,
            json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}})
        );
    }

    #[test]
    fn json_patch_failure_is_422() {
        let doc = json!({"metadata": {}});
        let err = run(
            PatchKind::Json,
            doc,
            json!([{"op": "remove", "path": "/metadata/annotations/x"}]),
        )
        .unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let doc = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "MemoryPressure", "status": "False"}
        ]}, "spec": {"taints": [{"key": "a", "effect": "NoSchedule"}]}});
        let out = run(
            PatchKind::Strategic,
            doc,
            json!({
                "status": {"conditions": [{"type": "Ready", "status": "True"},
                                           {"type": "MemoryPressure", "$patch": "delete"}]},
                "spec": {"taints": [{"key": "b", "effect": "NoSchedule"}]},
                "metadata": {"finalizers": ["x"], "$setElementOrder/finalizers": ["x"]}
            }),
        )
        .unwrap();
        assert_eq!(
            out["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}])
        );
        assert_eq!(
            out["spec"]["taints"],
            json!([{"key": "b", "effect": "NoSchedule"}])
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["x"]));
    }

    #[test]
    fn strategic_primitive_list_delete() {
        let doc = json!({"metadata": {"finalizers": ["a", "b"]}});
        let out = run(
            PatchKind::Strategic,
            doc,
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn apply_patch_is_refused() {
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml")
                .unwrap_err()
                .code,
            415
        );
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchKind::Merge
        );
    }
}
