//! `wgmesh dataplane`: the userspace WireGuard device, a long-lived process
//! that owns a TUN device and a UDP socket and serves the standard UAPI socket.
//!
//! - [`device`]: the sans-IO core (peers, Noise sessions, cryptokey routing, timers).
//! - [`allowed_ips`]: longest-prefix match.
//! - [`runtime`]: the data thread (TUN, UDP, batching and offloads).
//! - [`uapi`]: the UAPI socket server.

pub mod allowed_ips;
pub mod device;
pub mod runtime;
pub mod uapi;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};

pub use runtime::Options;

/// Where the UAPI sockets of every WireGuard implementation live.
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error(transparent)]
    Uapi(#[from] uapi::UapiError),
    #[error("cannot set up the data plane: {0}")]
    Setup(#[from] std::io::Error),
}

/// Runs the device in the foreground until SIGTERM or SIGINT (Ok), or until
/// its TUN device is deleted under it (an error naming the interface, so the
/// process exits non-zero and its supervisor restarts it). The TUN device
/// disappears with the process; the UAPI socket file is removed either way.
pub fn run(opts: Options, uapi_dir: PathBuf) -> Result<(), Error> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    // The socket first: a name already served by another daemon must fail
    // before we touch its TUN device.
    let socket = uapi::UapiSocket::bind(&uapi_dir, &opts.interface)?;
    let (tx, rx) = mpsc::channel();
    let (wake_rx, wake_tx) = UnixStream::pair()?;
    wake_tx.set_nonblocking(true)?;
    let interface = opts.interface.clone();
    let mut rt = runtime::Runtime::new(opts, wake_rx, rx, stop)?;
    tracing::info!(%interface, socket = %socket.path().display(), "serving UAPI");
    let socket = Arc::new(socket);
    let server = socket.clone();
    std::thread::Builder::new()
        .name("uapi".into())
        .spawn(move || server.serve(tx, wake_tx))?;
    let result = rt.run();
    // On failure the caller reports the error (`wgmesh dataplane` prints it).
    if result.is_ok() {
        tracing::info!(%interface, "stopping");
    }
    // The listener thread still holds a reference; remove the file ourselves,
    // also on failure, so the agent sees at once that no device serves it.
    let _ = std::fs::remove_file(socket.path());
    result.map_err(Error::from)
}

#[cfg(test)]
mod tests;

#[cfg(all(test, feature = "mock-time"))]
mod timer_tests;
