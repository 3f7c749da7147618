//! Traffic for checks and drills: probe matrices (ICMP via `ping`, TCP via an echo
//! server of our own), and UDP flows with sequence numbers that count loss and time
//! outages. Sockets are opened on threads of this process that entered the sending
//! or receiving namespace, so nothing outlives the command and nothing needs a
//! helper binary.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sys;
use super::{Error, Result};

/// One side of a probe matrix: a name, the namespace it runs in (rows) or the
/// address it is reached at (columns), and the node it belongs to (a cell whose row
/// and column share a node is not tested: that traffic never leaves the node).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub node: String,
    /// Rows: the namespace. Columns: the target (`ip` or `ip:port`).
    pub at: String,
}

/// A probe matrix: `cells[row][col]` is `None` when not tested, `Some(None)` for a
/// failed probe, `Some(Some(ms))` for an answer after `ms` milliseconds.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub title: String,
    pub rows: Vec<Endpoint>,
    pub cols: Vec<Endpoint>,
    pub cells: Vec<Vec<Option<Option<f64>>>>,
    /// Unix seconds the probes ran between (a window of the capture).
    pub window: (f64, f64),
}

impl Matrix {
    pub fn failures(&self) -> usize {
        self.cells
            .iter()
            .flatten()
            .filter(|c| matches!(c, Some(None)))
            .count()
    }

    pub fn tested(&self) -> usize {
        self.cells.iter().flatten().filter(|c| c.is_some()).count()
    }

    pub fn passed(&self) -> usize {
        self.tested() - self.failures()
    }

    /// Rows = from, columns = to.
    pub fn render(&self) -> String {
        let w = self
            .rows
            .iter()
            .chain(&self.cols)
            .map(|p| p.name.len())
            .max()
            .unwrap_or(4)
            .max(10);
        let mut out = format!("{}\n{:w$}", self.title, "from\\to");
        for c in &self.cols {
            out.push_str(&format!(" {:>w$}", c.name));
        }
        out.push('\n');
        for (i, r) in self.rows.iter().enumerate() {
            out.push_str(&format!("{:w$}", r.name));
            for cell in &self.cells[i] {
                let text = match cell {
                    None => "·".to_string(),
                    Some(Some(ms)) => format!("✓ {ms:.2}ms"),
                    Some(None) => "✗".to_string(),
                };
                out.push_str(&format!(" {text:>w$}"));
            }
            out.push('\n');
        }
        out
    }
}

/// How a probe reaches its target.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// `ping`, 2 echo requests; one reply is a pass.
    Icmp,
    /// A TCP connection to a [`EchoServer`], one line echoed back.
    Tcp,
}

/// Probes every row → column pair on different nodes, 64 at a time in parallel.
pub fn probe_matrix(
    title: impl Into<String>,
    rows: Vec<Endpoint>,
    cols: Vec<Endpoint>,
    probe: Probe,
) -> Result<Matrix> {
    let mut jobs = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        for (j, c) in cols.iter().enumerate() {
            if r.node != c.node {
                jobs.push((i, j));
            }
        }
    }
    let t0 = super::topology::unix_now();
    let mut cells = vec![vec![None; cols.len()]; rows.len()];
    for chunk in jobs.chunks(64) {
        if sys::interrupted() {
            return Err(Error::Interrupted);
        }
        let handles: Vec<_> = chunk
            .iter()
            .map(|&(i, j)| {
                let ns = rows[i].at.clone();
                let target = cols[j].at.clone();
                std::thread::spawn(move || {
                    let r = match probe {
                        Probe::Icmp => ping(&ns, &target),
                        Probe::Tcp => target.parse().ok().and_then(|t| tcp_probe(&ns, t)),
                    };
                    (i, j, r)
                })
            })
            .collect();
        for h in handles {
            if let Ok((i, j, r)) = h.join() {
                cells[i][j] = Some(r);
            }
        }
    }
    Ok(Matrix {
        title: title.into(),
        rows,
        cols,
        cells,
        window: (t0, super::topology::unix_now()),
    })
}

/// How long a probe waits for its answer: `base` seconds times the time
/// scale (a machine that runs the testbed N times slower answers N times later).
fn probe_wait(base: f64) -> Duration {
    Duration::from_secs_f64(base * super::topology::time_scale().unwrap_or(1.0))
}

/// One `ping` from `ns`: the average RTT in ms, `None` when nothing answered
/// (two echo requests, each answer awaited 2 s times the time scale).
pub fn ping(ns: &str, target: &str) -> Option<f64> {
    let wait = probe_wait(2.0).as_secs().max(1).to_string();
    let out = sys::netns_exec(
        ns,
        &[
            "ping", "-n", "-q", "-c", "2", "-i", "0.2", "-W", &wait, target,
        ],
    )
    .ok()?;
    // rtt min/avg/max/mdev = 0.050/0.061/0.072/0.011 ms
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim();
    nums.split('/').nth(1)?.trim().parse().ok()
}

/// Pings until one answers or `timeout` passes; the seconds it took.
pub fn ping_until(ns: &str, target: &str, timeout: Duration) -> Option<f64> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout && !sys::interrupted() {
        let ok = sys::netns_exec(ns, &["ping", "-n", "-q", "-c", "1", "-W", "1", target]).is_ok();
        if ok {
            return Some(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// One TCP round trip from `ns`: connect, send a line, read it back (3 s
/// budget each, times the time scale).
pub fn tcp_probe(ns: &str, target: SocketAddr) -> Option<f64> {
    let t0 = Instant::now();
    let token = format!("wgmesh-testbed probe {target} {:?}\n", t0);
    let wait = probe_wait(3.0);
    testkit::netns::in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&target, wait)?;
        s.set_read_timeout(Some(wait))?;
        s.write_all(token.as_bytes())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        while !buf.ends_with(b"\n") {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if buf == token.as_bytes() {
            Ok(Some(t0.elapsed().as_secs_f64() * 1000.0))
        } else {
            Ok(None)
        }
    })
    .ok()
    .flatten()
}

/// A TCP echo server in a namespace (one line per connection, echoed back), on a
/// thread of this process. Stops when dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &str, bind: SocketAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let ns2 = ns.to_string();
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            let listener = testkit::netns::enter(&ns2)
                .and_then(|_| TcpListener::bind(bind))
                .and_then(|l| l.set_nonblocking(true).map(|_| l));
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                            let mut buf = Vec::new();
                            let mut chunk = [0u8; 256];
                            while !buf.ends_with(b"\n") && buf.len() < 4096 {
                                match s.read(&mut chunk) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                            let _ = s.write_all(&buf);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Self {
                addr: bind,
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => Err(Error::io(format!("TCP echo server on {bind} in {ns}"), e)),
            Err(_) => Err(Error::Other(format!(
                "TCP echo server on {bind} in {ns} did not start"
            ))),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A one-way UDP flow: `pps` datagrams a second from `from_ns` to `to` (received in
/// `to_ns`), each carrying a flow id and a sequence number.
#[derive(Debug, Clone)]
pub struct FlowSpec {
    pub label: String,
    pub from_ns: String,
    pub to_ns: String,
    pub to: SocketAddr,
    pub pps: u32,
    pub duration: Duration,
}

/// What one flow did.
#[derive(Debug, Clone)]
pub struct FlowResult {
    pub label: String,
    pub interval: Duration,
    /// When each datagram was sent (a failed send is recorded too: the kernel
    /// refused it, e.g. a blackhole route, and it counts as lost).
    pub sent: Vec<Instant>,
    /// When each was first received, by sequence number.
    pub received: Vec<Option<Instant>>,
    /// Sends the kernel refused (EINVAL/ENETUNREACH from a blackhole or no route).
    pub send_errors: u64,
    /// Datagrams the receiving namespace's UDP sockets dropped for a full
    /// receive buffer while the flow ran (`RcvbufErrors` of its
    /// /proc/net/snmp; shared by every socket there): loss on a starved
    /// receiver, after the mesh delivered the packet.
    pub rcvbuf_errors: u64,
}

impl FlowResult {
    pub fn lost(&self) -> u64 {
        self.received
            .iter()
            .take(self.sent.len())
            .filter(|r| r.is_none())
            .count() as u64
    }

    pub fn received_count(&self) -> u64 {
        self.received.iter().filter(|r| r.is_some()).count() as u64
    }

    /// The longest run of lost datagrams, as time (first lost sent → next received
    /// sent).
    pub fn longest_outage(&self) -> Duration {
        let mut best = Duration::ZERO;
        let mut start: Option<Instant> = None;
        for (i, s) in self.sent.iter().enumerate() {
            let got = self.received.get(i).copied().flatten().is_some();
            match (got, start) {
                (false, None) => start = Some(*s),
                (true, Some(st)) => {
                    best = best.max(s.saturating_duration_since(st));
                    start = None;
                }
                _ => {}
            }
        }
        if let (Some(st), Some(last)) = (start, self.sent.last()) {
            best = best.max(last.saturating_duration_since(st) + self.interval);
        }
        best
    }

    /// The first datagram sent at or after `t` that arrived: when it arrived.
    pub fn first_arrival_sent_after(&self, t: Instant) -> Option<Instant> {
        self.sent
            .iter()
            .zip(&self.received)
            .filter(|(s, _)| **s >= t)
            .find_map(|(_, r)| *r)
    }

    /// Datagrams sent in `[from, to)` that arrived, and how many were sent.
    pub fn delivered_between(&self, from: Instant, to: Instant) -> (u64, u64) {
        let mut sent = 0;
        let mut got = 0;
        for (s, r) in self.sent.iter().zip(&self.received) {
            if *s >= from && *s < to {
                sent += 1;
                if r.is_some() {
                    got += 1;
                }
            }
        }
        (got, sent)
    }

    /// `label: sent S, received R, lost L (x %), longest outage T ms`.
    pub fn summary(&self) -> String {
        let sent = self.sent.len() as u64;
        let lost = self.lost();
        format!(
            "{}: sent {sent}, received {}, lost {lost} ({:.2} %), longest outage {:.0} ms{}{}",
            self.label,
            self.received_count(),
            if sent == 0 {
                0.0
            } else {
                100.0 * lost as f64 / sent as f64
            },
            self.longest_outage().as_secs_f64() * 1000.0,
            if self.send_errors > 0 {
                format!(", {} sends refused by the kernel", self.send_errors)
            } else {
                String::new()
            },
            if self.rcvbuf_errors > 0 {
                format!(
                    ", {} dropped by the receiving namespace's full UDP receive buffers",
                    self.rcvbuf_errors
                )
            } else {
                String::new()
            }
        )
    }
}

/// Flows running on threads of this process.
pub struct Flows {
    pub started: Instant,
    senders: Vec<JoinHandle<(Vec<Instant>, u64)>>,
    receivers: Vec<(JoinHandle<()>, Arrivals, Arc<AtomicU64>)>,
    specs: Vec<FlowSpec>,
    stop: Arc<AtomicBool>,
    /// Senders stop at their next datagram (receivers keep going until `finish`).
    stop_send: Arc<AtomicBool>,
}

const MAGIC: u32 = 0x7767_7462; // "wgtb"

/// A receiver's arrival times, by sequence number.
type Arrivals = Arc<Mutex<Vec<Option<Instant>>>>;

/// A flow receiver's socket buffer: 8 s of a 1,000 pps flow even at a
/// datagram's full kernel cost (about 1 KiB each), so a receiver thread
/// starved for a while (an emulated machine, a loaded host) loses nothing
/// the mesh delivered.
const RECEIVE_BUFFER: usize = 8 << 20;

/// `Udp: ... RcvbufErrors` of the calling thread's network namespace.
fn udp_rcvbuf_errors() -> Option<u64> {
    rcvbuf_errors_of(&std::fs::read_to_string("/proc/thread-self/net/snmp").ok()?)
}

/// `RcvbufErrors` from the text of /proc/net/snmp (a `Udp:` names line, then
/// its values line).
fn rcvbuf_errors_of(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next()?, udp.next()?);
    let col = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(col)?.parse().ok()
}

impl Flows {
    /// Binds every receiver, then starts every sender.
    pub fn start(specs: Vec<FlowSpec>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        for (id, spec) in specs.iter().enumerate() {
            let total = (spec.pps as f64 * spec.duration.as_secs_f64()).ceil() as usize + 1;
            let arrivals = Arc::new(Mutex::new(vec![None; total]));
            let (tx, rx) = mpsc::channel();
            let ns = spec.to_ns.clone();
            let bind = SocketAddr::new(
                if spec.to.is_ipv4() {
                    std::net::Ipv4Addr::UNSPECIFIED.into()
                } else {
                    std::net::Ipv6Addr::UNSPECIFIED.into()
                },
                spec.to.port(),
            );
            let a2 = arrivals.clone();
            let stop2 = stop.clone();
            let overflows = Arc::new(AtomicU64::new(0));
            let overflows2 = overflows.clone();
            let h = std::thread::spawn(move || {
                let sock = testkit::netns::enter(&ns)
                    .and_then(|_| UdpSocket::bind(bind))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_millis(50)))?;
                        use rustix::net::sockopt;
                        if sockopt::set_socket_recv_buffer_size_force(&s, RECEIVE_BUFFER).is_err() {
                            sockopt::set_socket_recv_buffer_size(&s, RECEIVE_BUFFER)?;
                        }
                        Ok(s)
                    });
                let sock = match sock {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let baseline = udp_rcvbuf_errors();
                let mut buf = [0u8; 64];
                while !stop2.load(Ordering::SeqCst) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        let now = Instant::now();
                        if n < 16 {
                            continue;
                        }
                        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        let flow = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                        let mut seq = [0u8; 8];
                        seq.copy_from_slice(&buf[8..16]);
                        let seq = u64::from_be_bytes(seq) as usize;
                        if magic != MAGIC || flow as usize != id {
                            continue;
                        }
                        if let Ok(mut a) = a2.lock() {
                            if let Some(slot) = a.get_mut(seq) {
                                slot.get_or_insert(now);
                            }
                        }
                    }
                }
                if let (Some(before), Some(after)) = (baseline, udp_rcvbuf_errors()) {
                    overflows2.store(after.saturating_sub(before), Ordering::SeqCst);
                }
            });
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => receivers.push((h, arrivals, overflows)),
                Ok(Err(e)) => {
                    stop.store(true, Ordering::SeqCst);
                    return Err(Error::io(
                        format!("UDP receiver {bind} in {}", spec.to_ns),
                        e,
                    ));
                }
                Err(_) => {
                    stop.store(true, Ordering::SeqCst);
                    return Err(Error::Other(format!(
                        "UDP receiver {bind} in {} did not start",
                        spec.to_ns
                    )));
                }
            }
        }
        let started = Instant::now();
        let stop_send = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        for (id, spec) in specs.iter().enumerate() {
            let spec = spec.clone();
            let stop2 = stop.clone();
            let stop_send2 = stop_send.clone();
            senders.push(std::thread::spawn(move || {
                let mut sent = Vec::new();
                let mut errors = 0u64;
                let sock = testkit::netns::enter(&spec.from_ns).and_then(|_| {
                    UdpSocket::bind(SocketAddr::new(
                        if spec.to.is_ipv4() {
                            std::net::Ipv4Addr::UNSPECIFIED.into()
                        } else {
                            std::net::Ipv6Addr::UNSPECIFIED.into()
                        },
                        0,
                    ))
                });
                let Ok(sock) = sock else {
                    return (sent, errors);
                };
                let interval = Duration::from_secs_f64(1.0 / f64::from(spec.pps.max(1)));
                let total = (spec.pps as f64 * spec.duration.as_secs_f64()).ceil() as u64;
                for seq in 0..total {
                    if stop2.load(Ordering::SeqCst) || stop_send2.load(Ordering::SeqCst) {
                        break;
                    }
                    let due = started + interval.mul_f64(seq as f64);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let mut msg = [0u8; 16];
                    msg[..4].copy_from_slice(&MAGIC.to_be_bytes());
                    msg[4..8].copy_from_slice(&(id as u32).to_be_bytes());
                    msg[8..16].copy_from_slice(&seq.to_be_bytes());
                    sent.push(Instant::now());
                    if sock.send_to(&msg, spec.to).is_err() {
                        errors += 1;
                    }
                }
                (sent, errors)
            }));
        }
        Ok(Self {
            started,
            senders,
            receivers,
            specs,
            stop,
            stop_send,
        })
    }

    /// Ends every flow before its duration: senders stop at their next datagram;
    /// [`Self::finish`] then collects what was sent (what was not sent is not lost).
    pub fn stop_sending(&self) {
        self.stop_send.store(true, Ordering::SeqCst);
    }

    /// Waits for every sender to finish, gives the last datagrams `grace` to arrive,
    /// stops the receivers.
    pub fn finish(mut self, grace: Duration) -> Vec<FlowResult> {
        let sent: Vec<(Vec<Instant>, u64)> = std::mem::take(&mut self.senders)
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect();
        std::thread::sleep(grace);
        self.stop.store(true, Ordering::SeqCst);
        let mut out = Vec::new();
        let receivers = std::mem::take(&mut self.receivers);
        for ((spec, (sent, errors)), (h, arrivals, overflows)) in
            self.specs.iter().zip(sent).zip(receivers)
        {
            let _ = h.join();
            let received = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
            out.push(FlowResult {
                label: spec.label.clone(),
                interval: Duration::from_secs_f64(1.0 / f64::from(spec.pps.max(1))),
                sent,
                received,
                send_errors: errors,
                rcvbuf_errors: overflows.load(Ordering::SeqCst),
            });
        }
        out
    }
}

/// Dropped without [`Flows::finish`] (an error path): every thread stops.
impl Drop for Flows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.senders.drain(..) {
            let _ = h.join();
        }
        for (h, _, _) in self.receivers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_buffer_errors_read_from_the_udp_lines_of_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            Udp: 10 0 3 9 21 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            UdpLite: 0 0 0 0 7 0\n";
        assert_eq!(rcvbuf_errors_of(snmp), Some(21));
        assert_eq!(rcvbuf_errors_of("Ip: Forwarding\nIp: 1\n"), None);
        // This thread's own namespace has the counter.
        assert!(udp_rcvbuf_errors().is_some());
    }

    #[test]
    fn outage_and_recovery_from_sequence_numbers() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        let sent: Vec<Instant> = (0..10).map(|i| t0 + ms * i).collect();
        let received: Vec<Option<Instant>> = (0..10)
            .map(|i| (!(3..7).contains(&i)).then(|| t0 + ms * i + ms))
            .collect();
        let f = FlowResult {
            label: "f".into(),
            interval: ms,
            sent,
            received,
            send_errors: 0,
            rcvbuf_errors: 0,
        };
        assert_eq!(f.lost(), 4);
        assert_eq!(f.longest_outage(), ms * 4);
        assert_eq!(f.first_arrival_sent_after(t0 + ms * 4), Some(t0 + ms * 8));
        assert_eq!(f.delivered_between(t0, t0 + ms * 5), (3, 5));
    }
}
