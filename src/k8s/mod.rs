//! Kubernetes access: the client, this node's annotation publisher, and
//! Events. Nodes are read only through a `watcher`/reflector (see
//! `crate::agent`); writes are a merge patch of this node's own `wgmesh.dev/`
//! annotations, made only when a value differs, and Events.

use std::path::Path;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};

use crate::node::{merge_patch, LocalAnnotations};

pub type Result<T, E = K8sError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("cannot load the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure the Kubernetes client (no --kubeconfig, no in-cluster service account, no ~/.kube/config): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// A client from `kubeconfig`, else in-cluster config, else `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                K8sError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|source| K8sError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Writes this node's annotations and raises Events on Nodes.
#[derive(Clone)]
pub struct Publisher {
    api: Api<Node>,
    recorder: Recorder,
    node: String,
}

impl Publisher {
    pub fn new(client: Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "wgmesh-agent".into(),
            instance: Some(node.to_string()),
        };
        Self {
            api: Api::all(client.clone()),
            recorder: Recorder::new(client, reporter),
            node: node.to_string(),
        }
    }

    /// Patches this node's annotations when they differ from `desired`;
    /// returns whether it wrote.
    pub async fn publish(&self, current: &Node, desired: &LocalAnnotations) -> Result<bool> {
        let Some(patch) = merge_patch(current, desired) else {
            return Ok(false);
        };
        self.api
            .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(true)
    }

    /// Raises an Event on `node`.
    pub async fn event(
        &self,
        node: &Node,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<()> {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            // The API caps an Event note at 1 KiB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        self.recorder.publish(&event, &node.object_ref(&())).await?;
        Ok(())
    }
}
