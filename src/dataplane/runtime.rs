//! The I/O edge of the data plane: one thread that owns the TUN device, the UDP
//! socket and the [`Device`], driven by `epoll(7)`.
//!
//! Why one thread: on a 2-core node the tunnel shares the CPU with the workload,
//! and a second crypto thread per direction would need a lock around every
//! peer's Noise state (boringtun's `Tunn` takes `&mut self` for both
//! directions). Instead every syscall moves a batch: TUN reads come in as
//! TSO super-packets split into up to 64 segments (IFF_VNET_HDR), encrypted
//! datagrams leave as one `sendmsg` per destination with UDP GSO, datagrams
//! arrive through `recvmmsg` with UDP GRO, and decrypted TCP segments are
//! coalesced into one TUN write (GRO). No lock is ever held: the UAPI thread
//! talks to this one through a channel.

use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use rustix::event::{epoll, Timespec};
use rustix::net::sockopt;
use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::device::{Device, PeerSettings, Sink, TunOutcome, UdpOutcome, DATA_OVERHEAD, TICK};
use crate::uapi::{self, DeviceSnapshot, PeerSnapshot, SetRequest, SnapshotSession};

/// What the UAPI thread asks of the data thread.
pub enum Control {
    Get(SyncSender<DeviceSnapshot>),
    /// Answers with an errno (0 = applied).
    Set(SetRequest, SyncSender<i32>),
}

/// Settings fixed at start.
#[derive(Debug, Clone)]
pub struct Options {
    pub interface: String,
    pub mtu: u16,
    /// Use TUN offloads (IFF_VNET_HDR, TSO/GRO) when the kernel has them.
    pub offload: bool,
    /// Requested UDP socket buffer size in bytes (send and receive).
    pub udp_buffer: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create TUN device {interface}: {source} (needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    Tun {
        interface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the UDP socket on port {port}: {source}")]
    Udp {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("TUN device {interface} went away; exiting so the supervisor restarts the data plane ({detail})")]
    TunGone { interface: String, detail: String },
    #[error("data plane I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Largest datagram we handle: a maximal IP packet plus WireGuard overhead.
const MAX_DATAGRAM: usize = 65_535;
/// UDP GRO hands us up to 64 KiB per receive slot.
const RX_SLOTS: usize = 32;
const GSO_MAX_SEGMENTS: usize = 64;
/// TUN reads per wake-up. A read is one TSO super-packet (up to 64 segments)
/// or one small packet; 64 small packets fill a GSO batch.
const TUN_READS: usize = 64;
/// Segments encrypted per wake-up before the loop turns to the UDP side, the
/// timer and the UAPI: eight full GSO batches (about 720 KiB at MTU 1420,
/// under a millisecond of crypto), the bound the loop had when it counted
/// eight reads of TSO super-packets (256 gave a few percent less single-stream
/// TCP in two paired runs, within this machine's noise).
const TUN_SEGMENT_BUDGET: usize = 512;
/// The kernel refuses a UDP GSO send whose total exceeds one maximal UDP
/// datagram (64 KiB less headers).
const GSO_MAX_BYTES: usize = 65_000;
/// Headroom in TUN write buffers for the virtio-net header.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// The data thread's state.
pub struct Runtime {
    opts: Options,
    tun: SyncDevice,
    udp: Udp,
    device: Device,
    wake: UnixStream,
    /// The TUN device, the UDP socket, the wake-up stream and the timer,
    /// registered once (level-triggered): a wake-up costs no re-registration,
    /// unlike `poll(2)`, which queued on and unhooked from every fd each call.
    epoll: rustix::fd::OwnedFd,
    /// A timerfd firing every [`TICK`]: the device's timers.
    timer: rustix::fd::OwnedFd,
    control: Receiver<Control>,
    stop: Arc<AtomicBool>,
    fwmark: u32,
    // Buffers, allocated once.
    tun_in: Vec<u8>,
    tun_segments: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    tun_out: Vec<Vec<u8>>,
    gro: GROTable,
    rx: [Vec<u8>; RX_SLOTS],
    rx_meta: [RecvMeta; RX_SLOTS],
    gso: Gso,
    control_out: ControlSink,
}

struct Udp {
    socket: UdpSocket,
    state: UdpSocketState,
    port: u16,
    /// Dual-stack IPv6 socket (IPv4 peers appear as mapped addresses).
    v6: bool,
}

/// Datagrams the device wants sent outside the data batches (handshakes,
/// cookies, keepalives), sent one by one after each batch.
#[derive(Default)]
struct ControlSink {
    queue: Vec<(SocketAddr, Vec<u8>)>,
}

impl Sink for ControlSink {
    fn send_udp(&mut self, dst: SocketAddr, datagram: &[u8]) {
        self.queue.push((dst, datagram.to_vec()));
    }
}

/// One pending UDP GSO send: equal-size segments for one destination, the last
/// one possibly shorter.
struct Gso {
    buf: Vec<u8>,
    used: usize,
    dst: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
    max_segments: usize,
    /// A datagram written after the batch that did not fit it.
    pending: Option<(SocketAddr, usize)>,
}

impl Runtime {
    /// Opens the TUN device and a UDP socket on an ephemeral port (the UAPI
    /// sets the real one).
    pub fn new(
        opts: Options,
        wake: UnixStream,
        control: Receiver<Control>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, RuntimeError> {
        let tun = open_tun(&opts)?;
        let udp = Udp::bind(0, opts.udp_buffer)?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(io::Error::from)?;
        let timer = rustix::time::timerfd_create(
            rustix::time::TimerfdClockId::Monotonic,
            rustix::time::TimerfdFlags::CLOEXEC | rustix::time::TimerfdFlags::NONBLOCK,
        )
        .map_err(io::Error::from)?;
        for (fd, token) in [
            (rustix::fd::AsFd::as_fd(&timer), Token::Timer),
            (rustix::fd::AsFd::as_fd(&tun), Token::Tun),
            (rustix::fd::AsFd::as_fd(&udp.socket), Token::Udp),
            (rustix::fd::AsFd::as_fd(&wake), Token::Wake),
        ] {
            watch(&epoll, fd, token)?;
        }
        let max_segments = udp.gso_segments();
        let seg_cap = usize::from(opts.mtu) + DATA_OVERHEAD + 16;
        tracing::info!(
            interface = %opts.interface,
            mtu = opts.mtu,
            tun_offload = tun.tcp_gso(),
            udp_gso_segments = max_segments,
            udp_gro_segments = udp.state.gro_segments(),
            "data plane ready"
        );
        Ok(Self {
            tun_in: vec![0u8; VIRTIO_NET_HDR_LEN + MAX_DATAGRAM],
            tun_segments: vec![vec![0u8; MAX_DATAGRAM]; IDEAL_BATCH_SIZE],
            tun_sizes: vec![0; IDEAL_BATCH_SIZE],
            tun_out: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(TUN_OFFSET + MAX_DATAGRAM))
                .collect(),
            gro: GROTable::default(),
            rx: std::array::from_fn(|_| vec![0u8; MAX_DATAGRAM]),
            rx_meta: [RecvMeta::default(); RX_SLOTS],
            gso: Gso {
                buf: vec![0u8; seg_cap * (max_segments + 1) + MAX_DATAGRAM],
                used: 0,
                dst: None,
                segment: 0,
                count: 0,
                closed: false,
                max_segments,
                pending: None,
            },
            control_out: ControlSink::default(),
            opts,
            tun,
            udp,
            device: Device::new(Instant::now()),
            wake,
            epoll,
            timer,
            control,
            stop,
            fwmark: 0,
        })
    }

    /// Runs until `stop` is set, or fails when the TUN device is deleted
    /// ([`RuntimeError::TunGone`]).
    pub fn run(&mut self) -> Result<(), RuntimeError> {
        self.tun.set_nonblocking(true)?;
        self.wake.set_nonblocking(true)?;
        // The device's clock: a periodic timer in the epoll set, so a wait
        // arms no timeout and the loop itself reads no clock per wake-up (a
        // UDP batch reads the wall clock once, for handshake times).
        let tick = Timespec::try_from(TICK).map_err(|_| io::Error::other("TICK out of range"))?;
        rustix::time::timerfd_settime(
            &self.timer,
            rustix::time::TimerfdTimerFlags::empty(),
            &rustix::time::Itimerspec {
                it_interval: tick,
                it_value: tick,
            },
        )
        .map_err(io::Error::from)?;
        while !self.stop.load(Ordering::Relaxed) {
            let mut events = [epoll::Event {
                flags: epoll::EventFlags::empty(),
                data: epoll::EventData::new_u64(0),
            }; 4];
            let n = match epoll::wait(&self.epoll, &mut events[..], None) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            };
            let (mut tun, mut udp, mut wake, mut timer) = (None, false, false, false);
            for event in &events[..n] {
                let flags = event.flags;
                match Token::from_u64(event.data.u64()) {
                    Some(Token::Tun) => tun = Some(flags),
                    Some(Token::Udp) => udp = true,
                    Some(Token::Wake) => wake = true,
                    Some(Token::Timer) => timer = true,
                    None => {}
                }
            }
            // A deleted TUN device (`ip link del`) leaves our fd detached: epoll
            // reports EPOLLERR at once and every read fails with EBADFD, so
            // without this check the loop would spin. The device cannot come
            // back on this fd; exiting lets the supervisor start a fresh one.
            // (Only the TUN's error bits are fatal: EPOLLERR on the UDP socket
            // is a queued ICMP error that the next receive consumes.)
            if let Some(flags) = tun {
                if flags.intersects(epoll::EventFlags::ERR | epoll::EventFlags::HUP) {
                    return Err(self.tun_gone(event_flags(flags)));
                }
            }
            if wake {
                self.drain_control();
            }
            if udp {
                self.udp_batches()?;
            }
            if tun.is_some() {
                self.tun_batches()?;
            }
            if timer {
                // The expiry count; missed ticks are not replayed (a tick
                // acts on the time it is given, not on how many passed).
                let mut expirations = [0u8; 8];
                let _ = rustix::io::read(&self.timer, &mut expirations);
                self.device.tick(Instant::now(), &mut self.control_out);
                self.flush_control();
            }
        }
        let c = self.device.counters();
        let mut drops: Vec<String> = c.drops.iter().map(|(k, v)| format!("{k:?}={v}")).collect();
        drops.sort();
        tracing::info!(
            handshakes = c.handshakes_completed,
            cookies_sent = c.cookies_sent,
            drops = %drops.join(" "),
            "data plane counters at exit"
        );
        Ok(())
    }

    /// TUN → encrypt → UDP. Up to [`TUN_READS`] reads or
    /// [`TUN_SEGMENT_BUDGET`] segments per wake-up, then yield to the other
    /// direction so neither starves. Encrypted datagrams gather
    /// in one GSO batch across the reads (a small packet is one read of its
    /// own, so a send per read would be a syscall per packet); the batch goes
    /// out when it is full, when the next datagram cannot join it, or when the
    /// TUN has nothing more to read.
    fn tun_batches(&mut self) -> Result<(), RuntimeError> {
        let mut segments = 0;
        for _ in 0..TUN_READS {
            if segments >= TUN_SEGMENT_BUDGET {
                break;
            }
            let n = match self.tun.recv_multiple(
                &mut self.tun_in,
                &mut self.tun_segments,
                &mut self.tun_sizes,
                0,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if tun_is_dead(&e) => {
                    self.flush_gso();
                    return Err(self.tun_gone(e.to_string()));
                }
                Err(e) => {
                    // A malformed offload packet must not kill the device.
                    tracing::debug!(error = %e, "TUN read dropped");
                    continue;
                }
            };
            segments += n;
            for i in 0..n {
                let packet = &self.tun_segments[i][..self.tun_sizes[i]];
                let slot = self.gso.slot();
                match self
                    .device
                    .on_tun_packet(packet, slot, &mut self.control_out)
                {
                    TunOutcome::Send { dst, len } => {
                        if let Some(flush) = self.gso.push(dst, len) {
                            self.send_batch(flush);
                        }
                    }
                    TunOutcome::Queued | TunOutcome::Dropped(_) => {}
                }
            }
            // Handshakes first: a packet queued behind one waits for it.
            self.flush_control();
        }
        self.flush_gso();
        Ok(())
    }

    /// Sends the pending GSO batch, if any.
    fn flush_gso(&mut self) {
        if let Some(flush) = self.gso.take() {
            self.send_batch(flush);
        }
    }

    /// Sends one GSO batch and starts the next with what did not fit it.
    fn send_batch(&mut self, flush: Flush) {
        let contents = &self.gso.buf[..flush.len];
        send_gso(&self.udp, contents, flush.dst, flush.segment);
        if flush.len > flush.segment {
            // quinn-udp turns segmentation off when a GSO send fails with EIO
            // or EINVAL (a device or an IPsec policy without UDP GSO) and
            // reports the send as done: that batch was refused, so it goes out
            // again one datagram at a time, and every later batch is a single
            // datagram.
            let allowed = self.udp.gso_segments();
            if allowed < self.gso.max_segments {
                tracing::warn!(
                    segments = allowed,
                    "UDP segmentation offload refused by the kernel; sending datagrams one by one"
                );
                self.gso.max_segments = allowed;
                for datagram in contents.chunks(flush.segment) {
                    send_gso(&self.udp, datagram, flush.dst, datagram.len());
                }
            }
        }
        self.gso.finish_flush(flush.len);
    }

    /// UDP → decrypt → TUN, coalescing TCP segments into GRO writes.
    fn udp_batches(&mut self) -> Result<(), RuntimeError> {
        for _ in 0..8 {
            let received = self.udp.state.recv(
                UdpSockRef::from(&self.udp.socket),
                &mut self.rx.each_mut().map(|b| IoSliceMut::new(b)),
                &mut self.rx_meta,
            );
            let msgs = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive error");
                    break;
                }
            };
            // One clock read per batch: the time a handshake in it completed.
            let now = SystemTime::now();
            let mut k = 0;
            for m in 0..msgs {
                let meta = self.rx_meta[m];
                let stride = if meta.stride == 0 {
                    meta.len
                } else {
                    meta.stride
                };
                let data = &self.rx[m][..meta.len];
                for datagram in data.chunks(stride.max(1)) {
                    if k == self.tun_out.len() {
                        write_tun(&self.tun, &mut self.gro, &mut self.tun_out[..k]);
                        k = 0;
                    }
                    // Sized, not cleared: decryption overwrites what it
                    // keeps, so only growth past the last packet is zeroed.
                    let out = &mut self.tun_out[k];
                    out.resize(TUN_OFFSET + datagram.len(), 0);
                    if let UdpOutcome::Tunnel { len } = self.device.on_datagram(
                        now,
                        meta.addr,
                        datagram,
                        &mut out[TUN_OFFSET..],
                        &mut self.control_out,
                    ) {
                        out.truncate(TUN_OFFSET + len);
                        k += 1;
                    }
                }
            }
            if k > 0 {
                write_tun(&self.tun, &mut self.gro, &mut self.tun_out[..k]);
            }
            self.flush_control();
            // Fewer messages than slots: the socket's queue ran dry, so a
            // further receive would only return EAGAIN (one syscall per wake-up
            // saved; anything arriving meanwhile wakes epoll again, it is
            // level-triggered).
            if msgs < RX_SLOTS.min(quinn_udp::BATCH_SIZE) {
                break;
            }
        }
        Ok(())
    }

    fn tun_gone(&self, detail: String) -> RuntimeError {
        RuntimeError::TunGone {
            interface: self.opts.interface.clone(),
            detail,
        }
    }

    fn flush_control(&mut self) {
        for (dst, datagram) in self.control_out.queue.drain(..) {
            send_gso(&self.udp, &datagram, dst, datagram.len());
        }
    }

    fn drain_control(&mut self) {
        let mut byte = [0u8; 64];
        while matches!(io::Read::read(&mut &self.wake, &mut byte), Ok(n) if n > 0) {}
        loop {
            match self.control.try_recv() {
                Ok(Control::Get(reply)) => {
                    let _ = reply.send(self.snapshot());
                }
                Ok(Control::Set(req, reply)) => {
                    let _ = reply.send(self.apply(req));
                }
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.stop.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    fn snapshot(&self) -> DeviceSnapshot {
        let unix = |t: std::time::SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).ok()?;
            Some((d.as_secs(), d.subsec_nanos()))
        };
        // Sorted by peer, as `peers()` is: each peer takes its run from the
        // front (a scan of every session per peer was quadratic in a mesh
        // where every peer has one).
        let sessions = self.device.sessions();
        let mut sessions = sessions.as_slice();
        DeviceSnapshot {
            private_key: self.device.private_key().cloned(),
            listen_port: self.udp.port,
            fwmark: self.fwmark,
            wgmesh_version: Some(uapi::WGMESH_VERSION),
            extra_identity: self.device.extra_identity(),
            peers: self
                .device
                .peers()
                .into_iter()
                .map(|p| {
                    let mut s = PeerSnapshot::new(p.public_key);
                    s.successor = p.successor;
                    s.sessions = take_run(&mut sessions, &p.public_key)
                        .iter()
                        .filter_map(|x| {
                            Some(SnapshotSession {
                                local: x.local,
                                remote: x.remote,
                                established: unix(x.established)?,
                            })
                        })
                        .collect();
                    s.preshared_key = p.preshared_key;
                    s.endpoint = p.endpoint;
                    s.persistent_keepalive_interval = p.persistent_keepalive;
                    s.allowed_ips = p.allowed_ips;
                    s.last_handshake = p.last_handshake.and_then(|t| {
                        let d = t.duration_since(UNIX_EPOCH).ok()?;
                        Some((d.as_secs(), d.subsec_nanos()))
                    });
                    s.rx_bytes = p.rx_bytes;
                    s.tx_bytes = p.tx_bytes;
                    s
                })
                .collect(),
        }
    }

    /// The extra identity as it is, private half included (the device keeps
    /// it across a `set` that does not mention it).
    fn current_extra(&self) -> Option<(crate::keys::PrivateKey, uapi::ExtraRole)> {
        self.device.extra_identity_key()
    }

    /// Applies a parsed `set`: everything that can fail (binding the port, the
    /// fwmark) happens first, so a failure leaves the device unchanged.
    fn apply(&mut self, req: SetRequest) -> i32 {
        if let Some(port) = req.listen_port {
            if port != self.udp.port || port == 0 {
                let udp = match Udp::bind(port, self.opts.udp_buffer) {
                    Ok(udp) => udp,
                    Err(e) => {
                        tracing::warn!(port, error = %e, "cannot change the listen port");
                        return uapi::errno::PORT_IN_USE;
                    }
                };
                if let Err(e) = watch(
                    &self.epoll,
                    rustix::fd::AsFd::as_fd(&udp.socket),
                    Token::Udp,
                ) {
                    // The old socket stays, registered and listening.
                    tracing::warn!(port, error = %e, "cannot watch the new UDP socket; keeping the old port");
                    return uapi::errno::IO;
                }
                // The new socket's own offload limit (no batch is pending:
                // control requests run between batches).
                self.gso.max_segments = udp.gso_segments();
                if self.fwmark != 0 {
                    let _ = set_mark(&udp.socket, self.fwmark);
                }
                tracing::info!(port = udp.port, "listening");
                self.udp = udp;
            }
        }
        if let Some(mark) = req.fwmark {
            if let Err(e) = set_mark(&self.udp.socket, mark) {
                tracing::warn!(mark, error = %e, "cannot set fwmark");
                return uapi::errno::IO;
            }
            self.fwmark = mark;
        }
        // The active key and the extra identity change together, so a key
        // moving between the two slots (activation) keeps its sessions.
        if req.private_key.is_some() || req.extra_identity.is_some() {
            let active = match req.private_key {
                Some(key) => key,
                None => self.device.private_key().cloned(),
            };
            let extra = match req.extra_identity {
                Some(extra) => extra,
                None => self.current_extra(),
            };
            self.device.set_local_keys(active, extra);
        }
        if req.replace_peers {
            self.device.remove_all_peers();
        }
        for mut update in req.peers {
            if update.remove {
                self.device.remove_peer(&update.public_key);
                continue;
            }
            if update.promote_successor {
                match self.device.promote_successor(&update.public_key) {
                    // The rest of the section applies to the renamed peer.
                    Some(to) => update.public_key = to,
                    None => {
                        tracing::debug!(peer = %update.public_key, "promote: no such peer or no successor");
                        continue;
                    }
                }
            }
            let existing = self.device.peer_settings(&update.public_key);
            if update.update_only && existing.is_none() {
                continue;
            }
            let base = existing.unwrap_or(PeerSettings {
                public_key: update.public_key,
                preshared_key: None,
                endpoint: None,
                persistent_keepalive: 0,
                allowed_ips: Vec::new(),
            });
            let settings = PeerSettings {
                public_key: update.public_key,
                preshared_key: match update.preshared_key {
                    None => base.preshared_key,
                    Some(k) => k,
                },
                endpoint: update.endpoint.or(base.endpoint),
                persistent_keepalive: update
                    .persistent_keepalive_interval
                    .unwrap_or(base.persistent_keepalive),
                allowed_ips: update.allowed_ips,
            };
            self.device
                .upsert_peer(settings, update.replace_allowed_ips);
            for net in update.remove_allowed_ips {
                self.device.remove_allowed_ip(&update.public_key, net);
            }
            if let Some(successor) = update.successor {
                if !self.device.set_successor(&update.public_key, successor) {
                    // Like a peer with the device's own key: ignored, not an
                    // error (the request was valid; the device state refuses).
                    tracing::warn!(peer = %update.public_key, "successor refused: it is a local key, a peer or another peer's successor");
                }
            }
        }
        0
    }
}

impl Gso {
    /// Where the next datagram is to be encrypted.
    fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Accounts for a datagram just written at `slot()`. Returns a batch to send
    /// first when the new datagram cannot join the current one (it is then moved
    /// to the front once the batch is sent: see `finish_flush`).
    fn push(&mut self, dst: SocketAddr, len: usize) -> Option<Flush> {
        let joins = self.count > 0
            && self.dst == Some(dst)
            && !self.closed
            && len <= self.segment
            && self.count < self.max_segments
            && self.used + len <= GSO_MAX_BYTES;
        if self.count == 0 || joins {
            if self.count == 0 {
                self.dst = Some(dst);
                self.segment = len;
            }
            self.closed = len < self.segment;
            self.used += len;
            self.count += 1;
            return None;
        }
        // Send what came before; the new datagram stays pending.
        let flush = Flush {
            dst: self.dst.unwrap_or(dst),
            segment: self.segment,
            len: self.used,
        };
        self.pending = Some((dst, len));
        Some(flush)
    }

    /// Takes the whole pending batch.
    fn take(&mut self) -> Option<Flush> {
        (self.count > 0).then(|| Flush {
            dst: self.dst.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            segment: self.segment,
            len: self.used,
        })
    }

    /// After a flush of `sent` bytes: starts a new batch with the datagram that
    /// did not fit, if any.
    fn finish_flush(&mut self, sent: usize) {
        match self.pending.take() {
            Some((dst, len)) => {
                self.buf.copy_within(sent..sent + len, 0);
                self.used = len;
                self.count = 1;
                self.dst = Some(dst);
                self.segment = len;
                self.closed = false;
            }
            None => {
                self.used = 0;
                self.count = 0;
                self.dst = None;
                self.closed = false;
            }
        }
    }
}

struct Flush {
    dst: SocketAddr,
    segment: usize,
    len: usize,
}

impl Udp {
    fn bind(port: u16, buffer: usize) -> Result<Self, RuntimeError> {
        let err = |source| RuntimeError::Udp { port, source };
        // Dual stack when the host has IPv6; plain IPv4 otherwise.
        let (socket, v6) = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) {
            Ok(s) => {
                s.set_only_v6(false).map_err(err)?;
                let addr = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
                s.bind(&addr.into()).map_err(err)?;
                (s, true)
            }
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
                s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
                    .map_err(err)?;
                (s, false)
            }
        };
        // A receive buffer too small for a burst is where userspace tunnels
        // lose packets; as root (CAP_NET_ADMIN), SO_RCVBUFFORCE/SO_SNDBUFFORCE
        // take it past net.core.rmem_max/wmem_max.
        if sockopt::set_socket_recv_buffer_size_force(&socket, buffer).is_err() {
            let _ = socket.set_recv_buffer_size(buffer);
        }
        if sockopt::set_socket_send_buffer_size_force(&socket, buffer).is_err() {
            let _ = socket.set_send_buffer_size(buffer);
        }
        socket.set_nonblocking(true).map_err(err)?;
        let socket: UdpSocket = socket.into();
        let state = UdpSocketState::new(UdpSockRef::from(&socket)).map_err(err)?;
        let port = socket.local_addr().map_err(err)?.port();
        Ok(Self {
            socket,
            state,
            port,
            v6,
        })
    }

    /// Datagrams one GSO send may carry on this socket now (1: no GSO).
    fn gso_segments(&self) -> usize {
        self.state.max_gso_segments().clamp(1, GSO_MAX_SEGMENTS)
    }

    fn target(&self, dst: SocketAddr) -> SocketAddr {
        match (self.v6, dst) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => dst,
        }
    }
}

fn send_gso(udp: &Udp, contents: &[u8], dst: SocketAddr, segment: usize) {
    if contents.is_empty() {
        return;
    }
    let transmit = Transmit {
        destination: udp.target(dst),
        ecn: None,
        contents,
        segment_size: (contents.len() > segment).then_some(segment),
        src_ip: None,
    };
    // A full socket buffer drops like a full NIC queue would: WireGuard and
    // TCP above it recover.
    if let Err(e) = udp.state.try_send(UdpSockRef::from(&udp.socket), &transmit) {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::debug!(error = %e, %dst, "UDP send failed");
        }
    }
}

fn write_tun(tun: &SyncDevice, gro: &mut GROTable, bufs: &mut [Vec<u8>]) {
    if let Err(e) = tun.send_multiple(gro, bufs, TUN_OFFSET) {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::debug!(error = %e, "TUN write failed");
        }
    }
}

fn open_tun(opts: &Options) -> Result<SyncDevice, RuntimeError> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(&opts.interface)
            .mtu(opts.mtu)
            .offload(offload)
            .build_sync()
    };
    let err = |source| RuntimeError::Tun {
        interface: opts.interface.clone(),
        source,
    };
    if opts.offload {
        match build(true) {
            Ok(t) => return Ok(t),
            Err(e) => {
                tracing::warn!(error = %e, "TUN offloads unavailable; using plain reads and writes")
            }
        }
    }
    build(false).map_err(err)
}

fn set_mark(socket: &UdpSocket, mark: u32) -> io::Result<()> {
    socket2::SockRef::from(socket).set_mark(mark)
}

/// A TUN read error that no later read recovers from: the device was
/// deleted (EBADFD, the fd is detached), is going away (ENODEV), or the fd
/// broke (EIO). Anything else (a malformed offload packet) drops one read.
fn tun_is_dead(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::ENODEV) | Some(libc::EIO)
    )
}

/// The error bits of an epoll event, for the exit message.
fn event_flags(flags: epoll::EventFlags) -> String {
    let names = [
        (epoll::EventFlags::ERR, "EPOLLERR"),
        (epoll::EventFlags::HUP, "EPOLLHUP"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| flags.contains(*bit))
        .map(|(_, name)| *name)
        .collect();
    format!("epoll reported {} on it", set.join("|"))
}

/// Which of the data thread's descriptors an epoll event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Tun = 0,
    Udp = 1,
    Wake = 2,
    Timer = 3,
}

impl Token {
    fn from_u64(v: u64) -> Option<Self> {
        [Self::Tun, Self::Udp, Self::Wake, Self::Timer]
            .into_iter()
            .find(|t| *t as u64 == v)
    }
}

/// Registers `fd` for input, level-triggered: what a batch leaves unread
/// wakes the next `epoll_wait` at once.
fn watch(
    epoll: &rustix::fd::OwnedFd,
    fd: rustix::fd::BorrowedFd<'_>,
    token: Token,
) -> io::Result<()> {
    epoll::add(
        epoll,
        fd,
        epoll::EventData::new_u64(token as u64),
        epoll::EventFlags::IN,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_detached_or_broken_tun_is_fatal() {
        for errno in [libc::EBADFD, libc::ENODEV, libc::EIO] {
            assert!(tun_is_dead(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EAGAIN, libc::EINTR, libc::EINVAL, libc::EMSGSIZE] {
            assert!(
                !tun_is_dead(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!tun_is_dead(&io::Error::other("short virtio header")));
    }

    #[test]
    fn the_exit_message_names_the_interface_and_the_cause() {
        let e = RuntimeError::TunGone {
            interface: "wgmesh0".into(),
            detail: event_flags(epoll::EventFlags::ERR | epoll::EventFlags::HUP),
        };
        assert_eq!(
            e.to_string(),
            "TUN device wgmesh0 went away; exiting so the supervisor restarts the data plane (epoll reported EPOLLERR|EPOLLHUP on it)"
        );
    }
}

/// The sessions of `peer` at the front of `sessions` (sorted by peer, and
/// asked for peers in ascending order), which then starts after them; the
/// sessions of lower keys, whose peers were not asked for, are skipped.
fn take_run<'a>(
    sessions: &mut &'a [crate::wg::SessionInfo],
    peer: &crate::keys::PublicKey,
) -> &'a [crate::wg::SessionInfo] {
    let skip = sessions.iter().take_while(|x| x.peer < *peer).count();
    let rest = &sessions[skip..];
    let run = rest.iter().take_while(|x| x.peer == *peer).count();
    let (mine, after) = rest.split_at(run);
    *sessions = after;
    mine
}

#[cfg(test)]
mod snapshot_tests {
    use super::take_run;
    use crate::keys::PublicKey;
    use crate::wg::SessionInfo;

    fn session(peer: u8, local: u8) -> SessionInfo {
        SessionInfo {
            peer: PublicKey::from_bytes([peer; 32]),
            local: PublicKey::from_bytes([local; 32]),
            remote: PublicKey::from_bytes([peer; 32]),
            established: std::time::UNIX_EPOCH,
        }
    }

    #[test]
    fn each_peer_gets_exactly_its_own_sessions() {
        let all = vec![session(1, 9), session(2, 8), session(2, 9), session(4, 9)];
        let mut rest = all.as_slice();
        let key = |n: u8| PublicKey::from_bytes([n; 32]);
        // Peer 1 is not asked for: its session is skipped, never given to 2.
        assert_eq!(take_run(&mut rest, &key(2)), &all[1..3]);
        assert!(take_run(&mut rest, &key(3)).is_empty());
        assert_eq!(take_run(&mut rest, &key(4)), &all[3..]);
        assert!(take_run(&mut rest, &key(5)).is_empty());
        assert!(rest.is_empty());
    }
}
