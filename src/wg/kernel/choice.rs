//! Which backend the agent drives: `--backend auto|kernel|uapi`, the probe
//! for kernel WireGuard behind `auto`, and the pure rule ([`decide`]) that
//! turns what was found into a choice and the sentence the agent logs.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::transport::GenlConn;
use super::{device_label, KernelBackend, KernelError, FAMILY_NAME};
use crate::wg::uapi::UapiBackend;
use crate::wg::{Backend, Result, WgError};

/// Which WireGuard implementation the agent drives (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    /// Kernel WireGuard when the host has it, else the userspace data plane.
    #[default]
    Auto,
    /// Kernel WireGuard; fail if the host lacks it.
    Kernel,
    /// A UAPI socket: wgmesh's userspace data plane, wireguard-go, boringtun-cli.
    Uapi,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Kernel => "kernel",
            BackendKind::Uapi => "uapi",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "kernel" => Ok(BackendKind::Kernel),
            "uapi" => Ok(BackendKind::Uapi),
            other => Err(format!(
                "unknown backend {other:?} (expected auto, kernel or uapi)"
            )),
        }
    }
}

/// A backend ready for the agent: the same type as `agent::SharedBackend`.
pub type SelectedBackend = Arc<Mutex<dyn Backend>>;

/// Whether this host (network namespace) has kernel WireGuard: the
/// `wireguard` generic netlink family resolves. Resolving it also makes the
/// kernel load the module if it is available but not loaded yet.
pub async fn kernel_available() -> bool {
    probe_kernel().await.is_ok()
}

/// The backend for `kind`, and a sentence saying which one and why, for the
/// agent to log. `auto`:
/// - the UAPI backend when a UAPI socket for `interface` already exists in
///   `uapi_dir` (a userspace data plane serves the interface; creating a
///   kernel link of the same name would fail or fight it);
/// - else kernel WireGuard when the generic netlink family resolves and the
///   `wireguard` link exists or could be created;
/// - else the UAPI backend over `<uapi_dir>/<interface>.sock`.
///
/// `kernel` fails when kernel WireGuard is unavailable or the link cannot be
/// created; `uapi` never fails (the socket may appear later: the data plane
/// can start after the agent).
pub async fn select_backend(
    kind: BackendKind,
    interface: &str,
    uapi_dir: &Path,
) -> Result<(SelectedBackend, String)> {
    select(kind, interface, uapi_dir, LinkPolicy::Create).await
}

/// [`select_backend`]'s rule for a reader (`wgmesh status`, `wgmesh graph`):
/// the same choice from the same facts, except that the kernel link is never
/// created: only an existing kernel WireGuard link counts as usable. A
/// command that only looks must not leave an interface behind, nor take the
/// name from a data plane that is about to start.
pub async fn select_reader(
    kind: BackendKind,
    interface: &str,
    uapi_dir: &Path,
) -> Result<(SelectedBackend, String)> {
    select(kind, interface, uapi_dir, LinkPolicy::Existing).await
}

/// Whether selecting a kernel backend may create its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkPolicy {
    Create,
    Existing,
}

async fn select(
    kind: BackendKind,
    interface: &str,
    uapi_dir: &Path,
    policy: LinkPolicy,
) -> Result<(SelectedBackend, String)> {
    let socket = uapi_dir.join(format!("{interface}.sock"));
    let uapi = || -> SelectedBackend {
        Arc::new(Mutex::new(UapiBackend::for_interface(uapi_dir, interface)))
    };
    let socket_exists = kind == BackendKind::Auto && socket.exists();
    let probe = match kind {
        BackendKind::Uapi => Err(String::new()),
        _ if socket_exists => Err(String::new()),
        _ => probe_kernel().await,
    };
    // Kernel WireGuard resolves: make sure the link exists and answers a
    // WG_CMD_GET_DEVICE before choosing it (the name may be taken by another
    // kind of interface, or the agent may lack CAP_NET_ADMIN).
    let mut checked = match (&probe, kind) {
        (Ok(_), BackendKind::Auto | BackendKind::Kernel) => {
            let name = interface.to_owned();
            Some(
                tokio::task::spawn_blocking(move || check_kernel_device(&name, policy))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
            )
        }
        _ => None,
    };
    let link = checked.as_ref().map(|r| {
        r.as_ref()
            .map(|(_, created)| *created)
            .map_err(Clone::clone)
    });
    match decide(kind, interface, &socket, socket_exists, probe, link) {
        Decision::Kernel { reason } => {
            let backend = match checked.take() {
                Some(Ok((backend, _))) => backend,
                _ => KernelBackend::new(interface),
            };
            let backend: SelectedBackend = Arc::new(Mutex::new(backend));
            Ok((backend, reason))
        }
        Decision::Uapi { reason } => Ok((uapi(), reason)),
        Decision::Refuse { reason } => Err(WgError::Io {
            path: device_label(interface),
            source: io::Error::new(io::ErrorKind::Unsupported, reason),
        }),
    }
}

/// Creates the link if missing (when `policy` allows) and reads the device
/// once: the backend that did it (its socket open) and whether the link was
/// created, or why kernel WireGuard cannot drive `interface`.
fn check_kernel_device(
    interface: &str,
    policy: LinkPolicy,
) -> std::result::Result<(KernelBackend, bool), String> {
    let created = match policy {
        LinkPolicy::Create => {
            crate::net::ensure_wireguard_link(interface).map_err(|e| e.to_string())?
        }
        LinkPolicy::Existing => {
            crate::net::check_interface_name(interface).map_err(|e| e.to_string())?;
            false
        }
    };
    let mut backend = KernelBackend::new(interface);
    match backend.get_device() {
        Ok(_) => Ok((backend, created)),
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Err(format!(
            "interface {interface} exists but is not a kernel WireGuard device"
        )),
        Err(e) if e.errno() == Some(libc::ENODEV) && policy == LinkPolicy::Existing => {
            Err(format!("there is no interface {interface}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Kernel { reason: String },
    Uapi { reason: String },
    Refuse { reason: String },
}

/// The choice of [`select_backend`], from what it found. Pure.
/// `probe`: the family id, or why kernel WireGuard is unavailable.
/// `link`: whether the kernel link exists/was created (`Ok(created)`), when
/// it was tried.
fn decide(
    kind: BackendKind,
    interface: &str,
    socket: &Path,
    socket_exists: bool,
    probe: std::result::Result<u16, String>,
    link: Option<std::result::Result<bool, String>>,
) -> Decision {
    let sock = socket.display();
    let link_note = |created: bool| {
        if created {
            format!("created wireguard link {interface}")
        } else {
            format!("wireguard link {interface} exists")
        }
    };
    match kind {
        BackendKind::Uapi => Decision::Uapi {
            reason: format!("backend uapi requested: using the UAPI socket {sock}"),
        },
        BackendKind::Kernel => match (probe, link) {
            (Ok(id), Some(Ok(created))) => Decision::Kernel {
                reason: format!(
                    "backend kernel requested: using kernel WireGuard (generic netlink family '{FAMILY_NAME}' id {id}; {})",
                    link_note(created)
                ),
            },
            (Ok(_), Some(Err(why))) => Decision::Refuse {
                reason: format!("backend kernel requested, but {why}"),
            },
            (Ok(_), None) => Decision::Refuse {
                reason: format!("backend kernel requested, but link {interface} was not checked"),
            },
            (Err(why), _) => Decision::Refuse {
                reason: format!("backend kernel requested, but kernel WireGuard is unavailable ({why})"),
            },
        },
        BackendKind::Auto if socket_exists => Decision::Uapi {
            reason: format!(
                "a userspace data plane already serves {interface} at {sock}: using it"
            ),
        },
        BackendKind::Auto => match (probe, link) {
            (Ok(id), Some(Ok(created))) => Decision::Kernel {
                reason: format!(
                    "kernel WireGuard available (generic netlink family '{FAMILY_NAME}' id {id}; {}): using it",
                    link_note(created)
                ),
            },
            (Ok(_), Some(Err(why))) => Decision::Uapi {
                reason: format!(
                    "kernel WireGuard present but unusable ({why}): using the userspace data plane over {sock}"
                ),
            },
            (Ok(_), None) => Decision::Uapi {
                reason: format!(
                    "kernel WireGuard link {interface} not checked: using the userspace data plane over {sock}"
                ),
            },
            (Err(why), _) => Decision::Uapi {
                reason: format!(
                    "kernel WireGuard unavailable ({why}): using the userspace data plane over {sock}"
                ),
            },
        },
    }
}

/// The family id, or why kernel WireGuard is unavailable (for the reason).
async fn probe_kernel() -> std::result::Result<u16, String> {
    let result = tokio::task::spawn_blocking(|| GenlConn::open().map(|c| c.family))
        .await
        .unwrap_or_else(|e| Err(KernelError::Task(e.to_string())));
    result.map_err(|e| {
        if Path::new("/sys/module/wireguard").exists() {
            e.to_string()
        } else {
            format!("{e}; /sys/module/wireguard absent")
        }
    })
}

#[cfg(test)]
#[path = "choice_tests.rs"]
mod tests;
