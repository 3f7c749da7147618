//! The UAPI server: the standard WireGuard cross-platform socket
//! (`<dir>/<interface>.sock`), so `wg show`, `wg showconf` and `wg set` work on
//! the device and the agent drives it like any other implementation.
//!
//! Requests are parsed by the shared codec ([`crate::uapi`]) and handed to the data thread over a
//! channel; the data thread answers between batches. Only root can connect: the
//! socket is created 0600 (under umask 077), as wireguard-go does.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use super::runtime::Control;
use crate::uapi::{self, Request};

/// How long a client may take to send its request, and the data thread to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error(
        "{path} is in use by a running WireGuard process; stop it or pick another interface name"
    )]
    InUse { path: PathBuf },
    #[error("cannot create the UAPI socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A bound UAPI socket; removes its file when dropped.
pub struct UapiSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl UapiSocket {
    pub fn bind(dir: &Path, interface: &str) -> Result<Self, UapiError> {
        let path = dir.join(format!("{interface}.sock"));
        let bind_err = |source| UapiError::Bind {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(bind_err)?;
        if path.exists() {
            if UnixStream::connect(&path).is_ok() {
                return Err(UapiError::InUse { path });
            }
            // A stale socket from a process that died.
            fs::remove_file(&path).map_err(bind_err)?;
        }
        // The socket is born 0600 (no window in which others could connect).
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        let listener = UnixListener::bind(&path);
        rustix::process::umask(old);
        let listener = listener.map_err(bind_err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(Self { path, listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients one at a time until the data thread goes away.
    pub fn serve(&self, control: Sender<Control>, wake: UnixStream) {
        for conn in self.listener.incoming() {
            let Ok(conn) = conn else { continue };
            if let Err(e) = handle(conn, &control, &wake) {
                tracing::debug!(error = %e, "UAPI connection ended");
            }
        }
    }
}

impl Drop for UapiSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn handle(mut conn: UnixStream, control: &Sender<Control>, wake: &UnixStream) -> io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut framer = uapi::Framer::default();
    loop {
        // One connection may carry several requests.
        while let Some(len) = framer.message_len(&buf) {
            let msg: Vec<u8> = buf.drain(..len).collect();
            let reply = match uapi::parse_request_bytes(&msg) {
                Ok(Request::Get) => {
                    let (tx, rx) = mpsc::sync_channel(1);
                    ask(control, wake, Control::Get(tx))?;
                    let snap = rx
                        .recv_timeout(TIMEOUT)
                        .map_err(|_| io::Error::other("data thread did not answer"))?;
                    uapi::format_get(&snap).as_bytes().to_vec()
                }
                Ok(Request::Set(req)) => {
                    let (tx, rx) = mpsc::sync_channel(1);
                    ask(control, wake, Control::Set(req, tx))?;
                    let errno = rx
                        .recv_timeout(TIMEOUT)
                        .map_err(|_| io::Error::other("data thread did not answer"))?;
                    uapi::format_errno(errno).into_bytes()
                }
                Err(e) if e.closes_connection() => return Ok(()),
                Err(e) => {
                    tracing::debug!(error = %e, "invalid UAPI request");
                    uapi::format_errno(e.errno()).into_bytes()
                }
            };
            conn.write_all(&reply)?;
        }
        if buf.len() > uapi::MAX_LINE_LEN * 64 {
            conn.write_all(uapi::format_errno(uapi::errno::IO).as_bytes())?;
            return Ok(());
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn ask(control: &Sender<Control>, mut wake: &UnixStream, msg: Control) -> io::Result<()> {
    control
        .send(msg)
        .map_err(|_| io::Error::other("data thread stopped"))?;
    match wake.write(&[1]) {
        Ok(_) => Ok(()),
        // The wake pipe is full: the data thread has a wake-up pending anyway.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}
