//! [`DecodeCache`]: every Node decoded once per change rather than once per pass.
//!
//! [`decode`] validates each key as an x25519 point (a scalar multiplication),
//! and every pass decodes every Node: at 5,000 Nodes that was three quarters
//! of a pass's CPU, spent on Nodes that had not changed. [`decode`] is a pure
//! function of the Node and the [`ValidationConfig`], so a Node equal to the
//! one decoded last pass has the same result, and the cache hands that back.
//! "Equal" is the whole object, not its resourceVersion: the reflector keeps
//! an unchanged Node as the same `Arc` (a pointer comparison), and a Node that
//! is a new object with the same content (a relist) is compared field by
//! field, which costs far less than the decode. Nothing is trusted that the
//! decode itself would not see.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

use super::{decode, NodeRecord, Rejected, ValidationConfig};

/// What one pass decoded, by Node name, for the next pass to reuse.
#[derive(Debug, Default)]
pub struct DecodeCache {
    cfg: Option<ValidationConfig>,
    entries: HashMap<String, (Arc<Node>, Result<NodeRecord, Rejected>)>,
    decoded: usize,
}

impl DecodeCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// `decode(node, cfg)` for every Node, in order: what [`decode`] would
    /// return, reusing last call's result for each Node that has not changed.
    /// Only the Nodes of this call are kept: a Node that went is forgotten.
    pub fn decode_all(
        &mut self,
        nodes: &[Arc<Node>],
        cfg: &ValidationConfig,
    ) -> Vec<Result<NodeRecord, Rejected>> {
        if self.cfg.as_ref() != Some(cfg) {
            self.entries.clear();
            self.cfg = Some(cfg.clone());
        }
        let mut previous = std::mem::take(&mut self.entries);
        self.entries.reserve(nodes.len());
        self.decoded = 0;
        let mut out = Vec::with_capacity(nodes.len());
        for node in nodes {
            // A Node without a name is rejected by the decode, and has no key
            // to be found by next pass.
            let Some(name) = node.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
                self.decoded += 1;
                out.push(decode(node, cfg));
                continue;
            };
            let kept = previous
                .remove(name)
                .filter(|(seen, _)| Arc::ptr_eq(seen, node) || **seen == **node);
            let result = match kept {
                Some((_, result)) => result,
                None => {
                    self.decoded += 1;
                    decode(node, cfg)
                }
            };
            out.push(result.clone());
            self.entries.insert(name.to_owned(), (node.clone(), result));
        }
        out
    }

    /// How many Nodes the last [`DecodeCache::decode_all`] decoded (rather
    /// than reused).
    pub fn decoded(&self) -> usize {
        self.decoded
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::keys::PrivateKey;
    use crate::node::annotations as ann;

    fn node(name: &str, seed: u8, endpoint: &str) -> Arc<Node> {
        let key = PrivateKey::from_base64(&STANDARD.encode([seed; 32]))
            .unwrap()
            .public_key();
        let annotations: BTreeMap<String, String> = [
            (ann::PUBLIC_KEY, key.to_base64()),
            (ann::ENDPOINT, endpoint.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(vec![format!("10.244.{seed}.0/24")]),
                ..NodeSpec::default()
            }),
            status: None,
        })
    }

    fn cfg() -> ValidationConfig {
        ValidationConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        }
    }

    fn fresh(nodes: &[Arc<Node>], cfg: &ValidationConfig) -> Vec<Result<NodeRecord, Rejected>> {
        nodes.iter().map(|n| decode(n, cfg)).collect()
    }

    #[test]
    fn an_unchanged_node_is_not_decoded_again() {
        let nodes = vec![
            node("a", 1, "192.0.2.1:51820"),
            node("b", 2, "192.0.2.2:51820"),
        ];
        let mut cache = DecodeCache::new();
        assert_eq!(cache.decode_all(&nodes, &cfg()), fresh(&nodes, &cfg()));
        assert_eq!(cache.decoded(), 2);
        assert_eq!(cache.decode_all(&nodes, &cfg()), fresh(&nodes, &cfg()));
        assert_eq!(cache.decoded(), 0);
        // A new object with the same content (a relist) is reused too.
        let relisted: Vec<_> = nodes.iter().map(|n| Arc::new((**n).clone())).collect();
        assert_eq!(cache.decode_all(&relisted, &cfg()), fresh(&nodes, &cfg()));
        assert_eq!(cache.decoded(), 0);
    }

    #[test]
    fn a_changed_node_is_decoded_and_only_it() {
        let mut nodes = vec![
            node("a", 1, "192.0.2.1:51820"),
            node("b", 2, "192.0.2.2:51820"),
        ];
        let mut cache = DecodeCache::new();
        cache.decode_all(&nodes, &cfg());
        nodes[1] = node("b", 2, "192.0.2.9:51820");
        let got = cache.decode_all(&nodes, &cfg());
        assert_eq!(got, fresh(&nodes, &cfg()));
        assert_eq!(cache.decoded(), 1);
        assert_eq!(
            got[1].as_ref().unwrap().endpoint,
            "192.0.2.9:51820".parse().unwrap()
        );
        // A change that makes the Node invalid is seen as well.
        nodes[0] = node("a", 1, "not an endpoint");
        let got = cache.decode_all(&nodes, &cfg());
        assert!(got[0].is_err());
        assert_eq!(got, fresh(&nodes, &cfg()));
    }

    #[test]
    fn another_config_decodes_everything_again() {
        let nodes = vec![node("a", 1, "192.0.2.1:51820")];
        let mut cache = DecodeCache::new();
        cache.decode_all(&nodes, &cfg());
        let narrow = ValidationConfig {
            cluster_cidrs: vec!["10.245.0.0/16".parse().unwrap()],
        };
        assert_eq!(cache.decode_all(&nodes, &narrow), fresh(&nodes, &narrow));
        assert_eq!(cache.decoded(), 1);
    }

    #[test]
    fn a_node_that_went_is_forgotten_and_a_returning_one_decoded() {
        let a = node("a", 1, "192.0.2.1:51820");
        let b = node("b", 2, "192.0.2.2:51820");
        let mut cache = DecodeCache::new();
        cache.decode_all(&[a.clone(), b.clone()], &cfg());
        cache.decode_all(std::slice::from_ref(&a), &cfg());
        assert_eq!(cache.entries.len(), 1);
        // The same name back with other content: decoded, never the old result.
        let b2 = node("b", 3, "192.0.2.3:51820");
        let got = cache.decode_all(&[a, b2.clone()], &cfg());
        assert_eq!(cache.decoded(), 1);
        assert_eq!(got[1], decode(&b2, &cfg()));
    }

    #[test]
    fn nameless_and_duplicate_names_decode_as_the_decode_does() {
        let mut nameless = (*node("x", 4, "192.0.2.4:51820")).clone();
        nameless.metadata.name = None;
        let nodes = vec![
            Arc::new(nameless),
            node("a", 1, "192.0.2.1:51820"),
            node("a", 5, "192.0.2.5:51820"),
        ];
        let mut cache = DecodeCache::new();
        for _ in 0..2 {
            assert_eq!(cache.decode_all(&nodes, &cfg()), fresh(&nodes, &cfg()));
        }
    }
}
