//! A blocking HTTPS client for the control plane: one HTTP/1.0 request per TLS
//! connection (so the answer is never chunked and ends with the connection),
//! the server verified against the control plane's own CA, a bearer token, and
//! optionally from inside a network namespace (the testbed's API server listens
//! on its underlay). rustls does the TLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use zeroize::Zeroizing;

use super::{Error, Result};

/// A client with one identity (the administrator's, or an agent's token).
#[derive(Clone)]
pub struct Admin {
    addr: SocketAddr,
    netns: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    token: Arc<Zeroizing<String>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("addr", &self.addr)
            .field("netns", &self.netns)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Admin {
    /// A client of the API server at `addr` whose certificate `ca_pem` signed.
    pub fn new(addr: SocketAddr, netns: Option<&str>, ca_pem: &[u8], token: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| Error::Other(format!("the control plane's CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Other(format!("the control plane's CA: {e}")))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Other(format!("TLS set-up: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            addr,
            netns: netns.map(str::to_string),
            tls: Arc::new(tls),
            token: Arc::new(Zeroizing::new(token.to_string())),
        })
    }

    /// The same server, another identity (an agent's token).
    pub fn with_token(&self, token: &str) -> Self {
        Self {
            token: Arc::new(Zeroizing::new(token.to_string())),
            ..self.clone()
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// One request; the status and the body, whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> Result<(u16, String)> {
        let req = Zeroizing::new(format!(
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: wgmesh-testbed\r\n\
             Authorization: Bearer {}\r\nAccept: application/json\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.token.as_str(),
            body.len()
        ));
        let (addr, tls) = (self.addr, self.tls.clone());
        let exchange = move || -> std::io::Result<Vec<u8>> {
            let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
            let name = ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(tls, name).map_err(std::io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(req.as_bytes())?;
            s.flush()?;
            let mut buf = Vec::new();
            match s.read_to_end(&mut buf) {
                Ok(_) => Ok(buf),
                // A server that closes without close_notify after a complete answer.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {
                    Ok(buf)
                }
                Err(e) => Err(e),
            }
        };
        let what = || format!("{method} {path} on https://{}", self.addr);
        let buf = match &self.netns {
            Some(ns) => testkit::netns::in_netns(ns, exchange),
            None => exchange(),
        }
        .map_err(|e| Error::io(what(), e))?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::Other(format!("{}: bad HTTP answer: {head}", what())))?;
        Ok((status, body.to_string()))
    }

    /// One request with a JSON body (none when `body` is null); the answer as
    /// JSON, or [`Error::Http`] for a status outside 2xx.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &Value,
    ) -> Result<Value> {
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, answer) = self.raw(method, path, content_type, &text)?;
        if !(200..300).contains(&status) {
            return Err(Error::Http {
                method: method.into(),
                path: path.into(),
                status,
                body: answer.trim().to_string(),
            });
        }
        serde_json::from_str(&answer)
            .map_err(|e| Error::Other(format!("{method} {path}: not JSON ({e}): {answer}")))
    }
}
