//! The process side of BGP mode: BIRD's config file, its control socket
//! (through `birdc`), and starting BIRD for an agent or a test that runs it
//! itself.
//!
//! Every call is blocking and bounded by [`Bird::timeout`] (a subprocess
//! that overruns it is killed); from async code, call them in
//! `tokio::task::spawn_blocking`. `birdc` runs with `-v`, so every reply
//! line carries BIRD's numeric reply code, which is what is parsed (the
//! text is for people).

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} did not finish within {timeout:?} and was killed")]
    Timeout { command: String, timeout: Duration },
    #[error("{command} failed ({status}): {output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
    #[error("BIRD's control socket {socket} does not answer: {message}")]
    Unreachable { socket: PathBuf, message: String },
    /// BIRD refused the config file; it keeps running with the previous one.
    #[error("BIRD config {file}:{line}:{column}: {message}")]
    Parse {
        file: String,
        line: u32,
        column: u32,
        message: String,
    },
    /// A reply code BIRD documents as an error (8xxx run-time, 9xxx parse
    /// of the command), or one we do not expect for the command.
    #[error("BIRD answered {command} with {code}: {message}")]
    Bird {
        command: String,
        code: u16,
        message: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("BIRD exited during startup ({status}): {output}")]
    Exited { status: String, output: String },
    #[error("BIRD did not open its control socket {socket} within {timeout:?}")]
    NotReady { socket: PathBuf, timeout: Duration },
}

/// How long a `birdc` or `bird -p` call may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One BIRD instance: its config file and control socket, and the programs
/// that drive it.
#[derive(Debug, Clone)]
pub struct Bird {
    /// The file BIRD reads (`bird -c`); `configure` re-reads it.
    pub config: PathBuf,
    /// The control socket (`bird -s`, `birdc -s`).
    pub socket: PathBuf,
    /// `bird`, found on PATH unless set.
    pub bird: PathBuf,
    /// `birdc`, found on PATH unless set.
    pub birdc: PathBuf,
    /// The bound on every subprocess call.
    pub timeout: Duration,
}

/// What `configure` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconfigured {
    /// Applied (`0003 Reconfigured`).
    Done,
    /// Accepted; protocols are still being restarted (`0004`), or it is
    /// queued behind such a reconfiguration (`0005`).
    InProgress,
    /// The file was the same as the running config (`0019`).
    Unchanged,
}

/// How to start BIRD ([`Bird::spawn`]).
#[derive(Debug, Clone, Default)]
pub struct Spawn {
    /// `-P`: where BIRD writes its pid.
    pub pid_file: Option<PathBuf>,
    /// `-R`: graceful restart recovery. BIRD then keeps the kernel table as
    /// it is until its BGP sessions have converged (at most `graceful
    /// restart wait`) instead of flushing the routes a previous BIRD left
    /// there on its first sync. Pass it when table N already holds routes
    /// of ours (a restart), not on a clean boot, where it only delays the
    /// first routes by up to that wait if a neighbor is down.
    pub recovery: bool,
    /// Run inside this network namespace (`ip netns exec NAME`, which execs
    /// BIRD in place: the child's pid is BIRD's).
    pub netns: Option<String>,
    /// BIRD's stderr goes here (appended); otherwise nowhere. A failed
    /// start reports its tail either way.
    pub log_file: Option<PathBuf>,
    /// How long to wait for the control socket to answer; 0 means
    /// [`Bird::timeout`].
    pub ready_timeout: Duration,
    /// Start BIRD in a process group of its own, so a signal to the
    /// starter's group (a supervisor stopping the agent) does not reach it:
    /// the agent can restart without touching the BGP sessions.
    pub detach: bool,
}

impl Bird {
    pub fn new(config: impl Into<PathBuf>, socket: impl Into<PathBuf>) -> Bird {
        Bird {
            config: config.into(),
            socket: socket.into(),
            bird: PathBuf::from("bird"),
            birdc: PathBuf::from("birdc"),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Makes [`Bird::config`] hold `text`: written to a temporary file of
    /// mode 0600 in the same directory (the text may hold TCP-MD5 keys),
    /// checked by `bird -p` (so a file BIRD cannot parse never replaces a
    /// good one, and a restart of BIRD never meets it), then renamed over
    /// the old file. Returns false, writing nothing, when the file already
    /// holds exactly `text`. Does not reconfigure: call
    /// [`Bird::configure`] after a `true`.
    pub fn install(&self, text: &str) -> Result<bool> {
        if fs::read(&self.config).is_ok_and(|old| old == text.as_bytes()) {
            return Ok(false);
        }
        let dir = match self.config.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let write_err = |source| EngineError::Write {
            path: self.config.clone(),
            source,
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".wgmesh-bird-")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(write_err)?;
        tmp.write_all(text.as_bytes()).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        let check = self.run(
            Command::new(&self.bird).arg("-p").arg("-c").arg(tmp.path()),
            "bird -p",
        )?;
        if !check.success {
            let out = check.combined();
            return Err(parse_error(&out).unwrap_or(EngineError::Failed {
                command: "bird -p".into(),
                status: check.status,
                output: out,
            }));
        }
        tmp.persist(&self.config).map_err(|e| write_err(e.error))?;
        // The rename is durable once the directory is synced.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(true)
    }

    /// `birdc configure`: BIRD re-reads [`Bird::config`]. A file it cannot
    /// parse is [`EngineError::Parse`] (with the line and column BIRD
    /// names), and BIRD keeps the previous config.
    pub fn configure(&self) -> Result<Reconfigured> {
        let reply = self.birdc(&["configure"])?;
        if let Some(e) = reply.iter().find_map(|l| parse_error(&l.text)) {
            return Err(e);
        }
        for line in &reply {
            match line.code {
                3 => return Ok(Reconfigured::Done),
                4 | 5 => return Ok(Reconfigured::InProgress),
                19 => return Ok(Reconfigured::Unchanged),
                _ => {}
            }
        }
        Err(unexpected("configure", &reply))
    }

    /// `birdc show protocols`: every protocol's state.
    pub fn protocols(&self) -> Result<Vec<ProtocolStatus>> {
        Ok(parse_protocols(&self.show(&["show", "protocols"])?))
    }

    /// A `show` command's reply; an error reply (code 8000 and up) is an
    /// error.
    fn show(&self, args: &[&str]) -> Result<Vec<ReplyLine>> {
        let reply = self.birdc(args)?;
        if let Some(l) = reply.iter().find(|l| l.code >= 8000) {
            return Err(EngineError::Bird {
                command: args[..args.len().min(2)].join(" "),
                code: l.code,
                message: l.text.clone(),
            });
        }
        Ok(reply)
    }

    /// `birdc show route all where proto ~ "mesh*"`: every route the iBGP
    /// mesh sessions imported ([`super::config::MESH_PREFIX`],
    /// [`super::config::MESH6_PREFIX`]), best or not, with its BGP next hop.
    pub fn mesh_routes(&self) -> Result<Vec<BirdRoute>> {
        let pattern = "\"mesh*\"";
        let reply = self.show(&["show", "route", "all", "where", "proto", "~", pattern])?;
        Ok(parse_routes(&reply))
    }

    pub fn sessions(&self) -> Result<Vec<ProtocolStatus>> {
        Ok(self
            .protocols()?
            .into_iter()
            .filter(|p| p.session.is_some())
            .collect())
    }

    /// `birdc enable NAME`: brings back a protocol that was disabled, e.g.
    /// by its import limit. (If the neighbor still sends too much, the limit
    /// disables it again.)
    pub fn enable(&self, protocol: &str) -> Result<()> {
        check_symbol(protocol)?;
        let reply = self.birdc(&["enable", protocol])?;
        // 0011 "NAME: enabled", 0012 "NAME: already enabled".
        if reply.iter().any(|l| matches!(l.code, 11 | 12)) {
            Ok(())
        } else {
            Err(unexpected("enable", &reply))
        }
    }

    /// `birdc down`: BIRD shuts down cleanly (with `persist`, table N keeps
    /// its routes).
    pub fn shutdown(&self) -> Result<()> {
        let reply = self.birdc(&["down"])?;
        // 0007 "Shutdown requested".
        if reply.iter().any(|l| l.code == 7) {
            Ok(())
        } else {
            Err(unexpected("down", &reply))
        }
    }

    /// Whether something answers on the control socket.
    pub fn is_up(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    /// Starts `bird -f -c CONFIG -s SOCKET [-P PID] [-R]` as a child in the
    /// foreground (`-f`: the child is BIRD itself, so it can be signalled
    /// and waited for), and waits until its control socket answers. A stale
    /// socket file of a BIRD that died is removed first; a live one is an
    /// error rather than a second BIRD on the same socket.
    pub fn spawn(&self, opts: &Spawn) -> Result<Child> {
        if self.socket.exists() {
            if self.is_up() {
                return Err(EngineError::Failed {
                    command: "bird".into(),
                    status: "not started".into(),
                    output: format!("a BIRD already answers on {}", self.socket.display()),
                });
            }
            let _ = fs::remove_file(&self.socket);
        }
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bird);
                c
            }
            None => Command::new(&self.bird),
        };
        cmd.arg("-f")
            .arg("-c")
            .arg(&self.config)
            .arg("-s")
            .arg(&self.socket);
        if let Some(pid) = &opts.pid_file {
            cmd.arg("-P").arg(pid);
        }
        if opts.recovery {
            cmd.arg("-R");
        }
        if opts.detach {
            use std::os::unix::process::CommandExt as _;
            cmd.process_group(0);
        }
        // Without a log file, stderr goes to a temporary file that only a
        // failed start reads: a pipe nobody drains would block BIRD.
        let (log, log_path, _tmp) = match &opts.log_file {
            Some(p) => {
                let f = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| EngineError::Write {
                        path: p.clone(),
                        source,
                    })?;
                (f, p.clone(), None)
            }
            None => {
                let t = tempfile::NamedTempFile::new().map_err(|source| EngineError::Write {
                    path: std::env::temp_dir(),
                    source,
                })?;
                let f = t.reopen().map_err(|source| EngineError::Write {
                    path: t.path().to_path_buf(),
                    source,
                })?;
                (f, t.path().to_path_buf(), Some(t))
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| EngineError::Spawn {
                program: self.bird.display().to_string(),
                source,
            })?;
        let timeout = if opts.ready_timeout.is_zero() {
            self.timeout
        } else {
            opts.ready_timeout
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let output = fs::read_to_string(&log_path).unwrap_or_default();
                let lines: Vec<&str> = output.lines().collect();
                let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
                return Err(parse_error(&output).unwrap_or(EngineError::Exited {
                    status: status.to_string(),
                    output: tail,
                }));
            }
            if self.is_up() {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EngineError::NotReady {
                    socket: self.socket.clone(),
                    timeout,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `birdc -v -s SOCKET ARGS...`, bounded, as reply lines.
    fn birdc(&self, args: &[&str]) -> Result<Vec<ReplyLine>> {
        let command = args.join(" ");
        let out = self.run(
            Command::new(&self.birdc)
                .arg("-v")
                .arg("-s")
                .arg(&self.socket)
                .args(args),
            &format!("birdc {command}"),
        )?;
        let text = out.combined();
        if text.contains("Unable to connect to server control socket") {
            return Err(EngineError::Unreachable {
                socket: self.socket.clone(),
                message: text.trim().to_owned(),
            });
        }
        let reply = parse_reply(&out.stdout);
        // birdc exits 1 after an error reply, which the codes say better.
        if reply.is_empty() && !out.success {
            return Err(EngineError::Failed {
                command: format!("birdc {command}"),
                status: out.status,
                output: text,
            });
        }
        Ok(reply)
    }

    fn run(&self, cmd: &mut Command, name: &str) -> Result<Output> {
        run_bounded(cmd, name, self.timeout)
    }
}

struct Output {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl Output {
    fn combined(&self) -> String {
        let mut s = self.stdout.trim().to_owned();
        if !self.stderr.trim().is_empty() {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(self.stderr.trim());
        }
        s
    }
}

/// Runs `cmd` with its output read on threads (so a full pipe never stalls
/// it) and kills it if it has not exited within `timeout`.
fn run_bounded(cmd: &mut Command, name: &str, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| EngineError::Spawn {
            program: name.to_owned(),
            source,
        })?;
    let reader = |pipe: Option<Box<dyn io::Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EngineError::Timeout {
                    command: name.to_owned(),
                    timeout,
                });
            }
        }
    };
    Ok(Output {
        success: status.success(),
        status: status.to_string(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// One line of a `birdc -v` reply: `CODE TEXT`, `CODE-TEXT` (more lines of
/// the same reply follow) or ` TEXT` (continues the previous code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyLine {
    pub code: u16,
    pub text: String,
}

/// Parses `birdc -v` output. The greeting (`0001 BIRD x.y ready.`) is
/// dropped; continuation lines take the code of the line they continue.
pub fn parse_reply(output: &str) -> Vec<ReplyLine> {
    let mut out = Vec::new();
    let mut last = None;
    for line in output.lines() {
        let b = line.as_bytes();
        let coded = b.len() >= 4
            && b[..4].iter().all(u8::is_ascii_digit)
            && matches!(b.get(4), None | Some(b' ' | b'-'));
        let (code, text) = if coded {
            // Four ASCII digits always parse.
            (
                line[..4].parse::<u16>().unwrap_or(0),
                line.get(5..).unwrap_or(""),
            )
        } else if let (Some(rest), Some(code)) = (line.strip_prefix(' '), last) {
            (code, rest)
        } else {
            continue;
        };
        last = Some(code);
        // 0001 is the greeting; 0000 ends some replies.
        if code > 1 {
            out.push(ReplyLine {
                code,
                text: text.to_owned(),
            });
        }
    }
    out
}

/// BIRD's report of a config it cannot parse, `FILE:LINE:COL MESSAGE`
/// (reply 8002, or `bird -p`'s stderr, which may prefix it with
/// `bird: `).
fn parse_error(text: &str) -> Option<EngineError> {
    for line in text.lines() {
        let line = line.trim();
        let line = line
            .strip_prefix("8002 ")
            .or_else(|| line.strip_prefix("8002-"))
            .unwrap_or(line);
        let line = line.strip_prefix("bird: ").unwrap_or(line);
        let Some((location, message)) = line.split_once(' ') else {
            continue;
        };
        let mut parts = location.rsplitn(3, ':');
        let (Some(column), Some(lineno), Some(file)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let (Ok(column), Ok(lineno)) = (column.parse(), lineno.parse()) {
            if file.is_empty() {
                continue;
            }
            return Some(EngineError::Parse {
                file: file.to_owned(),
                line: lineno,
                column,
                message: message.to_owned(),
            });
        }
    }
    None
}

fn unexpected(command: &str, reply: &[ReplyLine]) -> EngineError {
    let (code, message) = reply
        .iter()
        .find(|l| l.code >= 8000)
        .or(reply.last())
        .map_or((0, "empty reply".to_owned()), |l| (l.code, l.text.clone()));
    EngineError::Bird {
        command: command.to_owned(),
        code,
        message,
    }
}

/// Protocol names go onto birdc's command line: only what the renderer
/// produces (or BIRD's own `name1` style) passes.
fn check_symbol(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(EngineError::Bird {
            command: "enable".into(),
            code: 0,
            message: format!("{name:?} is not a BIRD protocol name"),
        })
    }
}

/// One route of `show route all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BirdRoute {
    pub prefix: ipnet::IpNet,
    /// The protocol that imported it (`mesh_n1`).
    pub protocol: String,
    /// Its `BGP.next_hop` (the first address: an IPv6 one may be followed
    /// by a link-local one); `None` for a route without one.
    pub next_hop: Option<std::net::IpAddr>,
}

/// Parses the reply lines of `show route all`: a route line (code 1007)
/// starts with its prefix, or, for another route to the same prefix, with
/// its type (`unicast [proto ...]`); its attributes follow (codes 1008,
/// 1012), `BGP.next_hop: ADDR` among them. Table headers and next-hop lines
/// (`via ... on ...`, `dev ...`) are skipped.
pub fn parse_routes(reply: &[ReplyLine]) -> Vec<BirdRoute> {
    let mut out: Vec<BirdRoute> = Vec::new();
    let mut net: Option<ipnet::IpNet> = None;
    for line in reply {
        let text = line.text.trim();
        if line.code == 1012 {
            if let (Some(hop), Some(last)) = (text.strip_prefix("BGP.next_hop:"), out.last_mut()) {
                last.next_hop = hop.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            continue;
        }
        if line.code != 1007 {
            continue;
        }
        let mut words = text.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if let Ok(p) = first.parse::<ipnet::IpNet>() {
            net = Some(p);
        } else if !matches!(
            first,
            "unicast" | "blackhole" | "unreachable" | "prohibited"
        ) {
            // "Table master4:", "via 10.0.0.1 on eth0", "dev wgmesh0".
            continue;
        }
        let (Some(prefix), Some(open)) = (net, text.find('[')) else {
            continue;
        };
        let protocol: String = text[open + 1..]
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != ']')
            .collect();
        if !protocol.is_empty() {
            out.push(BirdRoute {
                prefix,
                protocol,
                next_hop: None,
            });
        }
    }
    out
}

/// A protocol's state as `show protocols` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoState {
    Up,
    Start,
    Stop,
    Down,
    Flush,
    Other,
}

/// A BGP session's FSM state (RFC 4271 names, as BIRD prints them), plus
/// `Down` for a session whose protocol is down (disabled, or shut by its
/// import limit): no FSM runs then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
    Close,
    Down,
}

impl SessionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Idle => "idle",
            SessionState::Connect => "connect",
            SessionState::Active => "active",
            SessionState::OpenSent => "opensent",
            SessionState::OpenConfirm => "openconfirm",
            SessionState::Established => "established",
            SessionState::Close => "close",
            SessionState::Down => "down",
        }
    }

    fn from_bird(word: &str) -> Option<SessionState> {
        Some(match word {
            "Idle" => SessionState::Idle,
            "Connect" => SessionState::Connect,
            "Active" => SessionState::Active,
            "OpenSent" => SessionState::OpenSent,
            "OpenConfirm" => SessionState::OpenConfirm,
            "Established" => SessionState::Established,
            "Close" => SessionState::Close,
            _ => return None,
        })
    }
}

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolStatus {
    pub name: String,
    /// BIRD's protocol type: `BGP`, `Kernel`, `Static`, `Device`, ...
    pub kind: String,
    pub table: String,
    pub state: ProtoState,
    /// Unix seconds of the last state change, when the config's
    /// `timeformat protocol "%s"` is in force (ours sets it).
    pub since: Option<u64>,
    /// BGP protocols only.
    pub session: Option<SessionState>,
    /// The rest of the info column: the last error or why the protocol is
    /// down (`Socket: Connection refused`, `Automatic shutdown: Route limit
    /// exceeded`, `Received: ...`). Empty when there is none.
    pub info: String,
}

impl ProtocolStatus {
    pub fn is_established(&self) -> bool {
        self.session == Some(SessionState::Established)
    }
}

/// Parses the reply lines of `show protocols` (code 1002 rows; the 2002
/// header is skipped).
pub fn parse_protocols(reply: &[ReplyLine]) -> Vec<ProtocolStatus> {
    reply
        .iter()
        .filter(|l| l.code == 1002)
        .filter_map(|l| parse_protocol_row(&l.text))
        .collect()
}

fn parse_protocol_row(row: &str) -> Option<ProtocolStatus> {
    // Name Proto Table State Since Info...: the first five never contain
    // spaces (our names cannot, and "since" is one token in our timeformat;
    // with BIRD's default format of a protocol older than a day it is
    // "date time", which the numeric check below leaves unread).
    let mut rest = row.trim_start();
    let mut fields = Vec::with_capacity(5);
    for _ in 0..5 {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            break;
        }
        fields.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    let [name, kind, table, state, since] = fields[..] else {
        return None;
    };
    let info = rest.trim_end();
    let state = match state {
        "up" => ProtoState::Up,
        "start" => ProtoState::Start,
        "stop" => ProtoState::Stop,
        "down" => ProtoState::Down,
        "flush" => ProtoState::Flush,
        _ => ProtoState::Other,
    };
    let (session, info) = if kind == "BGP" {
        let (first, tail) = info.split_once(char::is_whitespace).unwrap_or((info, ""));
        match SessionState::from_bird(first) {
            Some(s) if state != ProtoState::Down => (Some(s), tail.trim()),
            _ if state == ProtoState::Down => (Some(SessionState::Down), info),
            // A state BIRD may add later: not established, whatever it is.
            _ => (Some(SessionState::Idle), info),
        }
    } else {
        (None, info)
    };
    Some(ProtocolStatus {
        name: name.to_owned(),
        kind: kind.to_owned(),
        table: table.to_owned(),
        state,
        since: since.parse().ok(),
        session,
        info: info.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `birdc -v show route all where proto ~ "mesh_*"` from BIRD 2.0.12,
    /// with a second route to the first prefix and an IPv6 one added.
    const ROUTES: &str = "0001 BIRD 2.0.12 ready.
1007-Table master4:
     203.0.113.0/24       unicast [mesh_n1 17:28:38.973] * (90/?) [i]
     \tvia 10.244.1.1 on wgmesh0
1008-\tType: BGP univ
1012-\tBGP.origin: IGP
     \tBGP.as_path: 64600
     \tBGP.next_hop: 10.244.1.1
     \tBGP.local_pref: 100
1007-                     unicast [mesh_n2 17:28:39.001 from 10.244.2.1] (90/?) [i]
     \tdev wgmesh0
1008-\tType: BGP univ
1012-\tBGP.origin: IGP
     \tBGP.next_hop: 10.244.9.1
1007-
     Table master6:
     2001:db8:5::/48      unreachable [mesh6_n1 17:28:40.000] * (90/-) [i]
1008-\tType: BGP univ
1012-\tBGP.next_hop: fd00:244:1::1 fe80::1
0000 
";

    #[test]
    fn parses_show_route_all() {
        let routes = parse_routes(&parse_reply(ROUTES));
        let got: Vec<(String, &str, Option<String>)> = routes
            .iter()
            .map(|r| {
                (
                    r.prefix.to_string(),
                    r.protocol.as_str(),
                    r.next_hop.map(|a| a.to_string()),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "203.0.113.0/24".into(),
                    "mesh_n1",
                    Some("10.244.1.1".into())
                ),
                (
                    "203.0.113.0/24".into(),
                    "mesh_n2",
                    Some("10.244.9.1".into())
                ),
                (
                    "2001:db8:5::/48".into(),
                    "mesh6_n1",
                    Some("fd00:244:1::1".into())
                ),
            ]
        );
        assert!(parse_routes(&parse_reply("0001 BIRD 2.0.12 ready.\n0000 \n")).is_empty());
    }

    const PROTOCOLS: &str = "0001 BIRD 2.0.12 ready.
2002-Name       Proto      Table      State  Since         Info
1002-device1    Device     ---        up     1796195059    
     wgm_export4 Static     master4    up     1796195059    
     wgm_kernel4 Kernel     master4    up     1796195059    
     bgp_fabric4 BGP        ---        up     1796195060    Established   
     bgp_fabric6 BGP        ---        start  1796195068    Active        Socket: Connection refused
     bgp_tor2   BGP        ---        down   1796195078    Automatic shutdown: Route limit exceeded
     bgp_tor3   BGP        ---        start  1796195078    Connect
0000 
";

    #[test]
    fn parses_show_protocols() {
        let reply = parse_reply(PROTOCOLS);
        assert_eq!(reply[0].code, 2002);
        let p = parse_protocols(&reply);
        assert_eq!(p.len(), 7);
        assert_eq!(p[0].name, "device1");
        assert_eq!(p[0].kind, "Device");
        assert_eq!(p[0].session, None);
        assert_eq!(p[0].since, Some(1796195059));
        assert_eq!(p[1].table, "master4");
        let b = &p[3];
        assert_eq!(b.name, "bgp_fabric4");
        assert!(b.is_established());
        assert_eq!(b.state, ProtoState::Up);
        assert_eq!(b.info, "");
        let b = &p[4];
        assert_eq!(b.session, Some(SessionState::Active));
        assert_eq!(b.state, ProtoState::Start);
        assert_eq!(b.info, "Socket: Connection refused");
        let b = &p[5];
        assert_eq!(b.session, Some(SessionState::Down));
        assert_eq!(b.info, "Automatic shutdown: Route limit exceeded");
        assert_eq!(p[6].session, Some(SessionState::Connect));
        assert_eq!(SessionState::OpenConfirm.as_str(), "openconfirm");
    }

    #[test]
    fn default_timeformat_is_not_misread() {
        let reply =
            parse_reply("1002-bgp1       BGP        ---        up     07:03:56.943  Established\n");
        let p = parse_protocols(&reply);
        assert_eq!(p[0].since, None);
        assert!(p[0].is_established());
    }

    #[test]
    fn parses_configure_replies() {
        let ok = parse_reply(
            "0001 BIRD 2.0.12 ready.\n0002-Reading configuration from /x/b.conf\n0003 Reconfigured\n",
        );
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok[1],
            ReplyLine {
                code: 3,
                text: "Reconfigured".into()
            }
        );
        let bad = parse_reply(
            "0001 BIRD 2.0.12 ready.\n0002-Reading configuration from /x/b.conf\n8002 /x/b.conf:4:1 syntax error, unexpected CF_SYM_UNDEFINED\n",
        );
        let e = bad.iter().find_map(|l| parse_error(&l.text)).unwrap();
        match e {
            EngineError::Parse {
                file,
                line,
                column,
                message,
            } => {
                assert_eq!(file, "/x/b.conf");
                assert_eq!((line, column), (4, 1));
                assert_eq!(message, "syntax error, unexpected CF_SYM_UNDEFINED");
            }
            other => panic!("{other}"),
        }
        // `bird -p` reports on stderr.
        assert!(matches!(
            parse_error("bird: /tmp/.wgmesh-bird-x:12:5 Unknown character\n"),
            Some(EngineError::Parse {
                line: 12,
                column: 5,
                ..
            })
        ));
        assert!(parse_error("Reading configuration from /x/b.conf").is_none());
        assert!(parse_error("Socket: 10.0.0.1:179 refused").is_none());
    }

    #[test]
    fn symbols_for_the_command_line() {
        assert!(check_symbol("bgp_tor_1").is_ok());
        assert!(check_symbol("_x").is_ok());
        for bad in ["", "1a", "a b", "a;down", "a\"", &"a".repeat(65)] {
            assert!(check_symbol(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bounded_run_kills_overruns() {
        let e = run_bounded(
            Command::new("sleep").arg("5"),
            "sleep",
            Duration::from_millis(100),
        );
        assert!(matches!(e, Err(EngineError::Timeout { .. })));
        let out = run_bounded(
            Command::new("echo").arg("hi"),
            "echo",
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(out.success);
        assert_eq!(out.stdout, "hi\n");
    }
}
