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
    #[error("Kubernetes API: {what} got no answer within {} s (is the API server reachable and responsive?)", WRITE_TIMEOUT.as_secs())]
    Timeout { what: &'static str },
}

/// How long one write to the API may take in all. The client has no read
/// timeout (a watch is a long poll), so without this a write to an API
/// server that accepted the connection but stopped answering would hang the
/// agent's pass for good.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn bounded<T>(
    what: &'static str,
    write: impl std::future::Future<Output = std::result::Result<T, kube::Error>>,
) -> Result<T> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(K8sError::Timeout { what }),
    }
}

/// A client from `kubeconfig`, else in-cluster config, else `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    Ok(Client::try_from(config(kubeconfig).await?)?)
}

/// The API server's socket addresses, resolved from `config`'s URL (the
/// agent exempts them from host encryption). Empty when the host does not
/// resolve.
pub async fn server_addrs(config: &kube::Config) -> Vec<std::net::SocketAddr> {
    let url = &config.cluster_url;
    let Some(host) = url.host() else {
        return Vec::new();
    };
    let port = url.port_u16().unwrap_or(match url.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    // `[::1]` in a URL: strip the brackets for the resolver.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => {
            let mut v: Vec<_> = addrs.collect();
            v.sort();
            v.dedup();
            v
        }
        Err(e) => {
            tracing::warn!(%url, error = %e, "cannot resolve the API server's address");
            Vec::new()
        }
    }
}

/// The configuration [`client`] uses.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config> {
    let mut config = match kubeconfig {
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
    // kube's default is 30 s: with an unreachable API server (a stale ARP
    // entry, a moved VIP) every write would hang that long before the agent
    // could log it and retry. A connect on a healthy cluster takes
    // milliseconds.
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    Ok(config)
}

/// How long a connection to the API server may take to open.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The API server rejects (422) an Event whose note exceeds 1 KiB, counted in
/// bytes of UTF-8, not characters.
pub const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// Marks a note that [`event_note`] cut short.
const ELLIPSIS: &str = "…";

/// `note` as it can be sent: unchanged when it fits in
/// [`EVENT_NOTE_MAX_BYTES`], else cut on a character boundary and ended with
/// an ellipsis, the whole at most that many bytes. A note quotes annotation
/// values, which anyone who can edit a Node controls, so multibyte text must
/// never make it too long.
pub fn event_note(mut note: String) -> String {
    if note.len() <= EVENT_NOTE_MAX_BYTES {
        return note;
    }
    let mut end = EVENT_NOTE_MAX_BYTES - ELLIPSIS.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push_str(ELLIPSIS);
    note
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
        bounded(
            "patching this node's annotations",
            self.api
                .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch)),
        )
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
            note: Some(event_note(note)),
            action: action.into(),
            secondary: None,
        };
        bounded(
            "raising an Event",
            self.recorder.publish(&event, &node.object_ref(&())),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_note_is_unchanged() {
        for note in ["", "peer rejected", &"é".repeat(512), &"x".repeat(1024)] {
            assert_eq!(event_note(note.to_string()), note);
        }
    }

    #[test]
    fn a_long_multibyte_note_is_cut_to_1024_bytes_on_a_char_boundary() {
        // 1000 characters of 2, 3 and 4 bytes each: under the old cut at 1000
        // characters, every one of these exceeded the API's 1024 bytes.
        for unit in ["é", "日", "🦀", "a日🦀é"] {
            let note = format!("invalid wgmesh.dev/endpoint {:?}", unit.repeat(1000));
            let cut = event_note(note.clone());
            assert!(cut.len() <= EVENT_NOTE_MAX_BYTES, "{unit}: {}", cut.len());
            assert!(cut.len() > EVENT_NOTE_MAX_BYTES - 8, "{unit}: cut too much");
            assert!(cut.ends_with(ELLIPSIS), "{unit}");
            let kept = cut.strip_suffix(ELLIPSIS).unwrap_or_default();
            assert!(note.starts_with(kept), "{unit}: a prefix of the note");
        }
    }

    #[test]
    fn one_byte_over_is_cut() {
        let cut = event_note("x".repeat(1025));
        assert_eq!(cut.len(), EVENT_NOTE_MAX_BYTES);
        assert_eq!(cut, format!("{}…", "x".repeat(1021)));
    }
}
