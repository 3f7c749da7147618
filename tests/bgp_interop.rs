//! BGP mode against real routers: our BIRD, started with the config
//! `wgmesh::routes::bgp` renders, peers with a fabric router under test —
//! BIRD 2, FRR (bgpd + zebra) and GoBGP — each in its own pair of network
//! namespaces ("node": us, "fabric": them) joined by one veth pair with
//! IPv4 and IPv6 addresses. One session per family; the IPv4 one carries a
//! TCP-MD5 password.
//!
//! Every claim about what we announce is checked in the fabric's own RIB,
//! and every claim about what we learn in the node's kernel table N, read
//! with our `TableReader`:
//!
//! 1. both sessions Established (their view);
//! 2. our pod CIDRs in their RIB with our address as next hop;
//! 3. their granted prefixes in table N via their address, not in main;
//!    ungranted ones (including 0.0.0.0/0 and ::/0) nowhere;
//! 4. graceful restart: our BIRD SIGKILLed and restarted (`-R`): their RIB
//!    keeps our prefixes while our session is down, table N keeps the
//!    learned routes throughout;
//! 5. withdraw: gone from table N;
//! 6. max prefixes: 10,001 granted /32s against a cap of 100 disable our
//!    IPv4 session; none
//!    of them stays in table N; IPv6 is untouched.
//!
//! Each engine prints one line of timings (never asserted).
//!
//! Prerequisites: root, `ip`, `bird` + `birdc`, and the engine (`vtysh` and
//! /usr/lib/frr/{zebra,bgpd} with an `frr` user; `gobgpd` + `gobgp`). A
//! missing one fails under CI=true and prints a SKIP line otherwise.
//!
//! Hygiene: namespaces are `wgbg-<pid>-<engine>-{n,f}`, the veth is created
//! inside them, files live in a temp dir; a `Lab` guard stops every process
//! it started and deletes both namespaces on success and on panic, and
//! namespaces of dead runs are reaped when the next run starts.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs;
use std::io::Read as _;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::Value;
use wgmesh::routes::bgp::{
    render, BgpConfig, Bird, EngineError, ImportRule, LearnedRoute, Neighbor, Password,
    Reconfigured, SessionState, Spawn, TableReader, MAIN_TABLE, RTPROT_BIRD,
};

const PREFIX: &str = "wgbg-";
const TABLE: u32 = 187;
const OUR_AS: u32 = 64512;
const THEIR_AS: u32 = 64513;
const OUR4: &str = "10.201.0.1";
const THEIR4: &str = "10.201.0.2";
const OUR6: &str = "fd00:201::1";
const THEIR6: &str = "fd00:201::2";
const POD4: &str = "10.244.1.0/24";
const POD6: &str = "fd00:244:1::/64";
const GRANTED4: &str = "198.51.100.0/24";
const GRANTED6: &str = "2001:db8:100::/48";
const UNGRANTED: [&str; 4] = ["203.0.113.0/24", "0.0.0.0/0", "2001:db8:200::/48", "::/0"];
/// Granted down to /32: where the flood for the prefix cap comes from
/// (room for 16,384 /32s).
const FLOOD_RANGE: &str = "10.202.0.0/18";
const CAP: u32 = 100;
const MD5_KEY: &str = "wgmesh-lab-md5";
/// Our IPv4 session's BIRD protocol name (neighbor "fabric4").
const OUR_V4_PROTOCOL: &str = "bgp_fabric4";

/// Bounds on every wait.
const ESTABLISH: Duration = Duration::from_secs(30);
const CONVERGE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

// ---- the cases --------------------------------------------------------------

#[test]
fn bird_fabric() {
    run_engine(Engine::Bird);
}

#[test]
fn frr_fabric() {
    run_engine(Engine::Frr);
}

#[test]
fn gobgp_fabric() {
    run_engine(Engine::Gobgp);
}

/// Configs the renderer produces parse with the installed BIRD (`bird -p`,
/// through `Bird::install`), which also writes them 0600 and only when they
/// change. No root needed: nothing is started.
#[test]
fn rendered_configs_parse() {
    use testkit::prereq::{missing, Need};
    if let Some(what) = missing(&[Need::Tool("bird")]) {
        testkit::prereq::skip_or_fail("rendered_configs_parse", &what);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let bird = Bird::new(dir.path().join("bird.conf"), dir.path().join("bird.ctl"));
    let mut variants = vec![our_config()];
    let mut c = our_config();
    c.graceful_restart = false;
    c.max_prefixes = None;
    c.timers.hold = 0;
    c.neighbors[1].multihop = true;
    c.neighbors[1].remote_as = OUR_AS;
    c.neighbors[1].local_address = None;
    variants.push(c);
    let mut c = our_config();
    c.import.clear();
    c.export.clear();
    variants.push(c);
    let mut c = BgpConfig::new(OUR4.parse().unwrap(), OUR_AS, 1000);
    c.neighbors = our_config().neighbors;
    variants.push(c);
    // The iBGP mesh: a reflector's sessions (clients and another
    // reflector, both families), then a mesh-only node with no fabric.
    let session =
        |node: &str, address: &str, local: &str, client: bool, import: Vec<ImportRule>| {
            wgmesh::routes::bgp::MeshSession {
                node: node.into(),
                address: address.parse().unwrap(),
                local_address: local.parse().unwrap(),
                client,
                import,
                // A client sends its own routes only; the other reflector
                // any learner's, and every path both ways.
                own_routes_only: client,
                max_prefixes: Some(if client { 100 } else { 400 }),
                add_paths_rx: !client,
                add_paths_tx: true,
            }
        };
    let mut c = our_config();
    c.mesh = Some(wgmesh::routes::bgp::Mesh {
        interface: "wgmesh0".into(),
        sessions: vec![
            session(
                "n1",
                "10.244.1.1",
                "10.244.2.1",
                true,
                vec![ImportRule::exact("203.0.113.0/24".parse().unwrap())],
            ),
            session("n1", "fd00:244:1::1", "fd00:244:2::1", true, Vec::new()),
            session("rr-2.rack-b", "10.244.3.1", "10.244.2.1", false, Vec::new()),
        ],
        next_hops: vec!["10.244.4.1".parse().unwrap()],
    });
    variants.push(c.clone());
    c.neighbors.clear();
    variants.push(c);
    for (i, config) in variants.iter().enumerate() {
        let text = render(config).expect("render");
        assert!(bird
            .install(&text)
            .unwrap_or_else(|e| panic!("variant {i}: {e}\n{text}")));
        assert!(!bird.install(&text).unwrap(), "unchanged text rewritten");
        let mode = fs::metadata(&bird.config).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "variant {i}");
    }
    // BIRD's own complaint, with its line, and the old file left alone.
    let before = fs::read_to_string(&bird.config).unwrap();
    match bird.install("router id 10.0.0.1;\nprotocol bogus {}\n") {
        Err(EngineError::Parse { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected a parse error, got {other:?}"),
    }
    assert_eq!(fs::read_to_string(&bird.config).unwrap(), before);
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".wgmesh-bird-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

// ---- one engine's run --------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Bird,
    Frr,
    Gobgp,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Bird => "bird",
            Engine::Frr => "frr",
            Engine::Gobgp => "gobgp",
        }
    }

    /// How many granted /32s the fabric floods us with, each engine in one
    /// step: BIRD static routes and one reload, FRR one vtysh call, GoBGP
    /// one `gobgp mrt inject` of an MRT file ([`mrt_ipv4`]).
    fn flood(self) -> u32 {
        10_001
    }

    fn missing(self) -> Vec<String> {
        let mut missing = Vec::new();
        if !testkit::prereq::is_root() {
            missing.push("root".to_owned());
        }
        for c in ["ip", "bird", "birdc"] {
            if testkit::prereq::which(c).is_none() {
                missing.push(c.to_owned());
            }
        }
        match self {
            Engine::Bird => {}
            Engine::Frr => {
                if testkit::prereq::which("vtysh").is_none() {
                    missing.push("vtysh".to_owned());
                }
                for d in [FRR_ZEBRA, FRR_BGPD] {
                    if !Path::new(d).is_file() {
                        missing.push(d.to_owned());
                    }
                }
                let frr_user = Command::new("id")
                    .arg("frr")
                    .output()
                    .is_ok_and(|o| o.status.success());
                if !frr_user {
                    missing.push("user frr".to_owned());
                }
            }
            Engine::Gobgp => {
                for c in ["gobgpd", "gobgp"] {
                    if testkit::prereq::which(c).is_none() {
                        missing.push(c.to_owned());
                    }
                }
            }
        }
        missing
    }
}

/// The figures printed per engine.
#[derive(Debug, Default)]
struct Timings {
    /// IPv4, IPv6.
    established: (Duration, Duration),
    learned: Duration,
    withdrawn: Duration,
    relearned: Duration,
    gr: Vec<Restart>,
    cap_teardown: Duration,
    cap_transient_max: usize,
    reenabled: Duration,
}

/// One SIGKILL-and-restart of our BIRD.
#[derive(Debug)]
struct Restart {
    /// The fabric was in its own startup window (FRR sets the Restart State
    /// bit then, and BIRD does not wait for its End-of-RIB).
    peer_restarting: bool,
    peer_saw_us_down: Duration,
    reestablished: Duration,
    /// How long table N lacked learned routes around the restart (0: never).
    table_gap: Duration,
}

fn run_engine(engine: Engine) {
    let test = format!("{}_fabric", engine.name());
    let missing = engine.missing();
    if !missing.is_empty() {
        testkit::prereq::skip_or_fail(&test, &missing.join(", "));
        return;
    }
    reap_stale_once();
    let mut lab = Lab::new(engine).unwrap_or_else(|e| panic!("{test}: lab setup: {e}"));
    let fabric: Box<dyn Fabric> = match engine {
        Engine::Bird => Box::new(BirdFabric::start(&mut lab).expect("start BIRD fabric")),
        Engine::Frr => Box::new(FrrFabric::start(&mut lab).expect("start FRR fabric")),
        Engine::Gobgp => Box::new(GobgpFabric::start(&mut lab).expect("start GoBGP fabric")),
    };
    let fabric = fabric.as_ref();
    let mut initial: Vec<IpNet> = vec![net(GRANTED4), net(GRANTED6)];
    initial.extend(UNGRANTED.iter().map(|p| net(p)));
    fabric.announce(&initial).expect("initial announcements");

    let mut t = Timings::default();
    let ours = lab.our_bird();
    let text = render(&our_config()).expect("render our config");
    assert!(ours.install(&text).expect("install our config"));
    let started = Instant::now();
    lab.start_ours(false).expect("start our BIRD");

    // 1. Established, as the fabric sees it (each family's time from the
    // start of our BIRD, like the learn time).
    let (mut up4, mut up6) = (None, None);
    wait(ESTABLISH, || {
        if up4.is_none() && fabric.established(ip(OUR4)) {
            up4 = Some(started.elapsed());
        }
        if up6.is_none() && fabric.established(ip(OUR6)) {
            up6 = Some(started.elapsed());
        }
        up4.is_some() && up6.is_some()
    })
    .unwrap_or_else(|| {
        panic!(
            "{test}: not Established within {ESTABLISH:?}: their v4 {}, v6 {}; ours {:?}",
            fabric.describe(ip(OUR4)),
            fabric.describe(ip(OUR6)),
            ours.sessions()
        )
    });
    t.established = (up4.unwrap_or_default(), up6.unwrap_or_default());
    let sessions = ours.sessions().expect("show protocols");
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert!(sessions.iter().all(|s| s.is_established()), "{sessions:?}");

    // 2. Our pod CIDRs in their RIB, next hop = us.
    wait_ours_in_their_rib(&test, fabric);

    // 3. Their granted prefixes in table N, nothing else.
    let want = vec![learned(GRANTED4, THEIR4), learned(GRANTED6, THEIR6)];
    wait(CONVERGE, || lab.table(TABLE) == want).unwrap_or_else(|| {
        panic!(
            "{test}: table {TABLE} is {:?}, want {want:?}",
            lab.table(TABLE)
        )
    });
    t.learned = started.elapsed();
    // The ungranted routes did arrive, and were filtered: BIRD counts them.
    let filtered = wait(CONVERGE, || {
        import_filtered(&ours, OUR_V4_PROTOCOL) >= 2 && import_filtered(&ours, "bgp_fabric6") >= 2
    });
    assert!(
        filtered.is_some(),
        "{test}: BIRD did not filter the ungranted routes: {}",
        birdc(&ours, &["show", "protocols", "all", OUR_V4_PROTOCOL])
    );
    assert_eq!(
        lab.table(TABLE),
        want,
        "{test}: an ungranted prefix reached table {TABLE}"
    );
    let main = lab.table(MAIN_TABLE);
    assert!(
        main.iter().all(|r| r.protocol != RTPROT_BIRD
            && r.prefix != net(GRANTED4)
            && r.prefix != net(GRANTED6)),
        "{test}: BIRD touched the main table: {main:?}"
    );

    // 4. Withdraw, then announce again.
    let withdrawn = Instant::now();
    fabric
        .withdraw(&[net(GRANTED4), net(GRANTED6)])
        .expect("withdraw");
    wait(CONVERGE, || lab.table(TABLE).is_empty()).unwrap_or_else(|| {
        panic!(
            "{test}: still in table {TABLE} after the withdraw: {:?}",
            lab.table(TABLE)
        )
    });
    t.withdrawn = withdrawn.elapsed();
    let relearn = Instant::now();
    fabric
        .announce(&[net(GRANTED4), net(GRANTED6)])
        .expect("announce again");
    wait(CONVERGE, || lab.table(TABLE) == want)
        .unwrap_or_else(|| panic!("{test}: not back in table {TABLE}: {:?}", lab.table(TABLE)));
    t.relearned = relearn.elapsed();

    // 5. Graceful restart. A fabric that is itself in its startup window
    // (FRR, for its first 120 s) gets one restart that only measures the
    // gap; the asserted one comes once the window is over.
    if let Some(until) = fabric.restarting_until() {
        if Instant::now() < until {
            t.gr.push(restart_ours(&test, &mut lab, fabric, &want, true));
        }
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            left <= Duration::from_secs(130),
            "{test}: startup window {left:?}"
        );
        thread::sleep(left);
    }
    t.gr.push(restart_ours(&test, &mut lab, fabric, &want, false));

    // 6. Max prefixes: far more than the cap, every one granted.
    let flood: Vec<IpNet> = (1..=engine.flood())
        .map(|i| net(&format!("10.202.{}.{}/32", i / 256, i % 256)))
        .collect();
    let flooded = Instant::now();
    fabric.announce(&flood).expect("announce the flood");
    let in_range = |lab: &Lab| {
        lab.table(TABLE)
            .iter()
            .filter(|r| net(FLOOD_RANGE).contains(&r.prefix))
            .count()
    };
    let mut transient = 0;
    let disabled = wait(CONVERGE, || {
        transient = transient.max(in_range(&lab));
        ours.sessions().is_ok_and(|s| {
            s.iter().any(|p| {
                p.name == OUR_V4_PROTOCOL
                    && p.session == Some(SessionState::Down)
                    && p.info.contains("limit")
            })
        })
    });
    assert!(
        disabled.is_some(),
        "{test}: our v4 session was not disabled by the cap: {:?}",
        ours.sessions()
    );
    t.cap_teardown = flooded.elapsed();
    wait(CONVERGE, || {
        transient = transient.max(in_range(&lab));
        in_range(&lab) == 0 && !fabric.established(ip(OUR4))
    })
    .unwrap_or_else(|| {
        panic!(
            "{test}: after the cap: {} routes of {FLOOD_RANGE} in table {TABLE}, their v4 session {}",
            in_range(&lab),
            fabric.describe(ip(OUR4))
        )
    });
    t.cap_transient_max = transient;
    // Everything learned on the session went with it, and it stays down
    // (action disable: no automatic restart); the IPv6 session never
    // noticed.
    assert_eq!(lab.table(TABLE), vec![learned(GRANTED6, THEIR6)]);
    thread::sleep(Duration::from_secs(3));
    assert_eq!(in_range(&lab), 0);
    assert!(
        !fabric.established(ip(OUR4)),
        "{}",
        fabric.describe(ip(OUR4))
    );
    assert!(
        fabric.established(ip(OUR6)),
        "{}",
        fabric.describe(ip(OUR6))
    );
    assert!(fabric.rib_next_hops(net(POD6)).contains(&ip(OUR6)));
    let cap_state = fabric.describe(ip(OUR4));

    // 7. Back from the cap: the flood withdrawn, `birdc enable` brings the
    // session up again with the granted prefix.
    fabric.withdraw(&flood).expect("withdraw the flood");
    ours.enable(OUR_V4_PROTOCOL).expect("birdc enable");
    let reenabled = Instant::now();
    wait(ESTABLISH, || {
        fabric.established(ip(OUR4)) && lab.table(TABLE) == want
    })
    .unwrap_or_else(|| {
        panic!(
            "{test}: v4 not back after enable: {}; table {:?}",
            fabric.describe(ip(OUR4)),
            lab.table(TABLE)
        )
    });
    t.reenabled = reenabled.elapsed();

    // 8. A clean shutdown (`birdc down`) leaves table N as it is (`persist`).
    ours.shutdown().expect("birdc down");
    let exited = wait(Duration::from_secs(10), || lab.ours_exited());
    assert!(
        exited.is_some(),
        "{test}: BIRD did not exit after birdc down"
    );
    assert_eq!(
        lab.table(TABLE),
        want,
        "{test}: table {TABLE} after a clean shutdown"
    );

    let gr: Vec<String> = t
        .gr
        .iter()
        .map(|r| {
            format!(
                "{}peer saw us down {:.2}s after SIGKILL, re-established {:.2}s after restart, table gap {:.2}s",
                if r.peer_restarting { "(peer in its startup window) " } else { "" },
                r.peer_saw_us_down.as_secs_f64(),
                r.reestablished.as_secs_f64(),
                r.table_gap.as_secs_f64()
            )
        })
        .collect();
    println!(
        "bgp_interop {:<5}: established v4 {:.2}s v6 {:.2}s, learned {:.2}s (from BIRD start); withdrawn {:.2}s, \
         re-learned {:.2}s; GR: {}; cap {CAP}: {} routes -> v4 session disabled in {:.2}s, \
         at most {} of them seen in table {TABLE}, then 0 (their v4 session: {}); \
         re-enabled {:.2}s",
        engine.name(),
        t.established.0.as_secs_f64(),
        t.established.1.as_secs_f64(),
        t.learned.as_secs_f64(),
        t.withdrawn.as_secs_f64(),
        t.relearned.as_secs_f64(),
        gr.join("; "),
        engine.flood(),
        t.cap_teardown.as_secs_f64(),
        t.cap_transient_max,
        cap_state,
        t.reenabled.as_secs_f64(),
    );
}

fn wait_ours_in_their_rib(test: &str, fabric: &dyn Fabric) {
    wait(CONVERGE, || {
        fabric.rib_next_hops(net(POD4)).contains(&ip(OUR4))
            && fabric.rib_next_hops(net(POD6)).contains(&ip(OUR6))
    })
    .unwrap_or_else(|| {
        panic!(
            "{test}: our prefixes not in their RIB: {POD4} {:?}, {POD6} {:?}",
            fabric.rib_next_hops(net(POD4)),
            fabric.rib_next_hops(net(POD6))
        )
    });
}

/// SIGKILLs our BIRD and starts it again with `-R`. Asserted every time:
/// while it is down, their session is down and their RIB still holds our
/// prefixes (GR helper), and table N still holds `want`; afterwards the
/// sessions and our prefixes are back. Unless `peer_restarting`, table N
/// must hold `want` at every poll from the kill until recovery has ended.
fn restart_ours(
    test: &str,
    lab: &mut Lab,
    fabric: &dyn Fabric,
    want: &[LearnedRoute],
    peer_restarting: bool,
) -> Restart {
    let ours = lab.our_bird();
    let killed = Instant::now();
    lab.kill_ours();
    let mut table = Watch::new(want);
    let down = wait(CONVERGE, || {
        table.check(lab, "while BIRD was down");
        !fabric.established(ip(OUR4)) && !fabric.established(ip(OUR6))
    });
    let peer_saw_us_down = killed.elapsed();
    assert!(
        down.is_some(),
        "{test}: the fabric never noticed our BIRD was killed: {}",
        fabric.describe(ip(OUR4))
    );
    // Their session is down and they still hold our prefixes: GR helper.
    let held4 = fabric.rib_next_hops(net(POD4));
    let held6 = fabric.rib_next_hops(net(POD6));
    assert!(
        held4.contains(&ip(OUR4)) && held6.contains(&ip(OUR6)),
        "{test}: their RIB dropped our prefixes while we were down: {held4:?} {held6:?}"
    );
    thread::sleep(Duration::from_secs(1));
    table.check(lab, "one second after the kill");
    assert!(
        table.lost.is_empty(),
        "{test}: table {TABLE} lost learned routes while BIRD was down: {:?}",
        table.lost
    );
    assert!(fabric.rib_next_hops(net(POD4)).contains(&ip(OUR4)));

    let restarted = Instant::now();
    lab.start_ours(true).expect("restart our BIRD with -R");
    let back = wait(ESTABLISH, || {
        table.check(lab, "during recovery");
        fabric.established(ip(OUR4)) && fabric.established(ip(OUR6))
    });
    let reestablished = restarted.elapsed();
    assert!(
        back.is_some(),
        "{test}: not Established again after the restart: {}",
        fabric.describe(ip(OUR4))
    );
    // Recovery ends once the sessions have converged (End-of-RIB); then
    // BIRD syncs the kernel table for real, which must leave the re-learned
    // routes in place.
    let recovered = wait(Duration::from_secs(130), || {
        table.check(lab, "until recovery ended");
        !birdc(&ours, &["show", "status"]).contains("recovery")
    });
    assert!(
        recovered.is_some(),
        "{test}: graceful restart recovery never ended"
    );
    let settled = wait(CONVERGE, || {
        table.check(lab, "after recovery");
        lab.table(TABLE) == want
    });
    assert!(
        settled.is_some(),
        "{test}: table {TABLE} after the restart: {:?}",
        lab.table(TABLE)
    );
    for _ in 0..10 {
        table.check(lab, "after recovery");
        thread::sleep(POLL);
    }
    if !peer_restarting {
        assert!(
            table.lost.is_empty(),
            "{test}: table {TABLE} lost learned routes around the restart: {:?}",
            table.lost
        );
    }
    wait_ours_in_their_rib(test, fabric);
    Restart {
        peer_restarting,
        peer_saw_us_down,
        reestablished,
        table_gap: table.gap(),
    }
}

/// Table N polled around a restart: every poll that did not show `want`,
/// and for how long in all.
struct Watch<'a> {
    want: &'a [LearnedRoute],
    lost: Vec<String>,
    gap: Duration,
    gap_start: Option<Instant>,
}

impl<'a> Watch<'a> {
    fn new(want: &'a [LearnedRoute]) -> Self {
        Watch {
            want,
            lost: Vec::new(),
            gap: Duration::ZERO,
            gap_start: None,
        }
    }

    fn check(&mut self, lab: &Lab, when: &str) {
        let now = lab.table(TABLE);
        if now == self.want {
            if let Some(s) = self.gap_start.take() {
                self.gap += s.elapsed();
            }
        } else {
            self.gap_start.get_or_insert_with(Instant::now);
            self.lost.push(format!("{when}: {now:?}"));
        }
    }

    fn gap(&self) -> Duration {
        self.gap + self.gap_start.map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// Our side's config: two neighbors (one per family), the pod CIDRs out,
/// the granted prefixes in.
fn our_config() -> BgpConfig {
    let mut c = BgpConfig::new(OUR4.parse().unwrap(), OUR_AS, TABLE);
    c.neighbors = vec![
        Neighbor {
            name: "fabric4".into(),
            address: ip(THEIR4),
            remote_as: THEIR_AS,
            local_address: Some(ip(OUR4)),
            password: Some(Password::new(MD5_KEY)),
            multihop: false,
        },
        Neighbor {
            name: "fabric6".into(),
            address: ip(THEIR6),
            remote_as: THEIR_AS,
            local_address: Some(ip(OUR6)),
            password: None,
            multihop: false,
        },
    ];
    c.export = vec![net(POD4), net(POD6)];
    c.import = vec![
        ImportRule::exact(net(GRANTED4)),
        ImportRule::exact(net(GRANTED6)),
        ImportRule {
            prefix: net(FLOOD_RANGE),
            max_len: 32,
        },
    ];
    c.max_prefixes = Some(CAP);
    c
}

/// The "filtered" figure of a channel's import update stats in `show
/// protocols all NAME` ("Import updates: received rejected filtered ignored
/// accepted").
fn import_filtered(bird: &Bird, protocol: &str) -> u64 {
    let out = birdc(bird, &["show", "protocols", "all", protocol]);
    out.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("Import updates:")?;
            rest.split_whitespace().nth(2)?.parse().ok()
        })
        .unwrap_or(0)
}

fn birdc(bird: &Bird, args: &[&str]) -> String {
    let mut cmd = Command::new("birdc");
    cmd.arg("-s").arg(&bird.socket).args(args);
    run(&mut cmd).unwrap_or_else(|e| e)
}

// ---- the lab -------------------------------------------------------------------

/// Two namespaces, one veth, a temp dir and the processes started in them;
/// dropping it tears everything down.
struct Lab {
    engine: Engine,
    node: String,
    fabric: String,
    dir: tempfile::TempDir,
    ours: Option<Child>,
    theirs: Vec<(String, Child)>,
    namespaces: Vec<String>,
}

impl Lab {
    fn new(engine: Engine) -> Result<Lab, String> {
        let base = format!("{PREFIX}{}-{}", std::process::id(), engine.name());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{base}-"))
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        // FRR drops to user frr: it must reach its files.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod: {e}"))?;
        let mut lab = Lab {
            engine,
            node: format!("{base}-n"),
            fabric: format!("{base}-f"),
            dir,
            ours: None,
            theirs: Vec::new(),
            namespaces: Vec::new(),
        };
        for ns in [lab.node.clone(), lab.fabric.clone()] {
            if testkit::netns::path(&ns).exists() {
                testkit::netns::del(&ns);
            }
            testkit::netns::add(&ns).map_err(|e| e.to_string())?;
            lab.namespaces.push(ns);
        }
        // Created inside the namespaces: the names never exist on the host.
        let out = Command::new("ip")
            .args([
                "link",
                "add",
                "n0",
                "netns",
                &lab.node,
                "type",
                "veth",
                "peer",
                "name",
                "f0",
                "netns",
                &lab.fabric,
            ])
            .output()
            .map_err(|e| format!("ip link add: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip link add veth: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        for (ns, link, v4, v6) in [
            (&lab.node, "n0", OUR4, OUR6),
            (&lab.fabric, "f0", THEIR4, THEIR6),
        ] {
            testkit::netns::ip_in(ns, "link set lo up").map_err(|e| e.to_string())?;
            testkit::netns::ip_in(ns, &format!("addr add {v4}/24 dev {link}"))
                .map_err(|e| e.to_string())?;
            // nodad: usable at once, not after duplicate address detection.
            testkit::netns::ip_in(ns, &format!("addr add {v6}/64 dev {link} nodad"))
                .map_err(|e| e.to_string())?;
            testkit::netns::ip_in(ns, &format!("link set {link} up")).map_err(|e| e.to_string())?;
        }
        Ok(lab)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn our_bird(&self) -> Bird {
        Bird::new(self.path("ours.conf"), self.path("ours.ctl"))
    }

    fn start_ours(&mut self, recovery: bool) -> Result<(), EngineError> {
        let child = self.our_bird().spawn(&Spawn {
            pid_file: Some(self.path("ours.pid")),
            recovery,
            netns: Some(self.node.clone()),
            log_file: Some(self.path("ours.log")),
            ready_timeout: Duration::from_secs(10),
            detach: false,
        })?;
        self.ours = Some(child);
        Ok(())
    }

    /// Whether our BIRD has exited (after `birdc down`).
    fn ours_exited(&mut self) -> bool {
        self.ours
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// SIGKILL: no chance to withdraw, flush or say goodbye.
    fn kill_ours(&mut self) {
        if let Some(mut c) = self.ours.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a fabric process inside the fabric namespace, output to a
    /// log file in the lab dir.
    fn spawn_theirs(&mut self, name: &str, args: &[&str]) -> Result<(), String> {
        let log = fs::File::create(self.path(&format!("{name}.log")))
            .map_err(|e| format!("{name} log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.fabric])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {name}: {e}"))?;
        self.theirs.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails if a fabric process has exited, with its log.
    fn check_theirs(&mut self) -> Result<(), String> {
        for (name, child) in &mut self.theirs {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                    .unwrap_or_default();
                return Err(format!("{name} exited ({status}): {log}"));
            }
        }
        Ok(())
    }

    /// The routes of kernel table `table` in the node namespace, read by
    /// our TableReader on a thread inside it.
    fn table(&self, table: u32) -> Vec<LearnedRoute> {
        let ns = self.node.clone();
        thread::spawn(move || {
            testkit::netns::enter(&ns).expect("enter the node namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                TableReader::connect()
                    .expect("rtnetlink")
                    .routes(table)
                    .await
                    .expect("dump routes")
            })
        })
        .join()
        .expect("table reader thread")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_ours();
        for (_, child) in self.theirs.iter_mut().rev() {
            testkit::process::stop(child, Duration::from_secs(3));
        }
        // Anything still running in our namespaces was started by this lab
        // (a daemon's helper child): end it by pid before the namespace goes.
        for ns in &self.namespaces {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse() {
                        testkit::process::signal(pid, testkit::Signal::KILL);
                    }
                }
            }
            testkit::netns::del(ns);
        }
        let _ = self.engine;
    }
}

static REAP: Once = Once::new();

/// Deletes the namespaces (and ends the processes in them) of earlier runs
/// whose process is gone.
fn reap_stale_once() {
    REAP.call_once(|| {
        let Ok(dir) = fs::read_dir("/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(p) = p.parse() {
                        testkit::process::signal(p, testkit::Signal::KILL);
                    }
                }
            }
            testkit::netns::del(&name);
        }
    });
}

// ---- the fabric routers ------------------------------------------------------------

/// What the test asks of the router under test; every answer is its own
/// view.
trait Fabric {
    /// Whether its session with `peer` (our address) is Established.
    fn established(&self, peer: IpAddr) -> bool;
    /// The next hops of the paths it holds for `prefix` learned over BGP.
    fn rib_next_hops(&self, prefix: IpNet) -> Vec<IpAddr>;
    fn announce(&self, prefixes: &[IpNet]) -> Result<(), String>;
    fn withdraw(&self, prefixes: &[IpNet]) -> Result<(), String>;
    /// Its session with `peer`, for messages.
    fn describe(&self, peer: IpAddr) -> String;
    /// Until when it announces the Restart State bit in its OPENs (as
    /// restarted itself), if ever.
    fn restarting_until(&self) -> Option<Instant> {
        None
    }
}

// BIRD: static routes in its config, rewritten and reloaded per change.
struct BirdFabric {
    bird: Bird,
    routes: RefCell<BTreeSet<IpNet>>,
}

impl BirdFabric {
    fn start(lab: &mut Lab) -> Result<BirdFabric, String> {
        let bird = Bird::new(lab.path("fabric.conf"), lab.path("fabric.ctl"));
        let f = BirdFabric {
            bird,
            routes: RefCell::new(BTreeSet::new()),
        };
        f.bird.install(&f.config()).map_err(|e| e.to_string())?;
        let child = f
            .bird
            .spawn(&Spawn {
                pid_file: Some(lab.path("fabric.pid")),
                recovery: false,
                netns: Some(lab.fabric.clone()),
                log_file: Some(lab.path("fabric.log")),
                ready_timeout: Duration::from_secs(10),
                detach: false,
            })
            .map_err(|e| e.to_string())?;
        lab.theirs.push(("bird".into(), child));
        // configure's error path against the live BIRD: a file it cannot
        // parse is reported with BIRD's line, and the running config stays.
        fs::write(&f.bird.config, "router id 10.0.0.9;\nprotocol bogus {}\n")
            .map_err(|e| e.to_string())?;
        match f.bird.configure() {
            Err(EngineError::Parse { line: 2, .. }) => {}
            other => return Err(format!("configure of a broken file: {other:?}")),
        }
        f.reload()?;
        Ok(f)
    }

    fn config(&self) -> String {
        let routes = self.routes.borrow();
        let statics = |v4: bool| {
            routes
                .iter()
                .filter(|r| r.addr().is_ipv4() == v4)
                .map(|r| format!("  route {r} blackhole;\n"))
                .collect::<String>()
        };
        // Timers short on this side too, so it retries soon after our
        // restart; graceful restart left at BIRD's default, "aware": the
        // helper role is what is tested.
        let session = |name: &str,
                       local: &str,
                       peer: &str,
                       family: &str,
                       export: &str,
                       password: &str| {
            format!(
                "protocol bgp {name} {{\n  local {local} as {THEIR_AS};\n  neighbor {peer} as {OUR_AS};\n  \
                 hold time 9; keepalive time 3; connect delay time 1; connect retry time 2; error wait time 1,5;\n  \
                 {password}\n  {family} {{ import all; export where proto = \"{export}\"; }};\n}}\n"
            )
        };
        format!(
            "router id {THEIR4};\ntimeformat protocol \"%s\";\nprotocol device {{}}\n\
             protocol static f4 {{\n  ipv4;\n{}}}\nprotocol static f6 {{\n  ipv6;\n{}}}\n{}{}",
            statics(true),
            statics(false),
            session(
                "n4",
                THEIR4,
                OUR4,
                "ipv4",
                "f4",
                &format!("password \"{MD5_KEY}\";")
            ),
            session("n6", THEIR6, OUR6, "ipv6", "f6", ""),
        )
    }

    fn reload(&self) -> Result<(), String> {
        self.bird
            .install(&self.config())
            .map_err(|e| e.to_string())?;
        match self.bird.configure().map_err(|e| e.to_string())? {
            Reconfigured::Done | Reconfigured::InProgress | Reconfigured::Unchanged => Ok(()),
        }
    }

    fn protocol(peer: IpAddr) -> &'static str {
        if peer.is_ipv4() {
            "n4"
        } else {
            "n6"
        }
    }
}

impl Fabric for BirdFabric {
    fn established(&self, peer: IpAddr) -> bool {
        self.bird.protocols().is_ok_and(|ps| {
            ps.iter()
                .any(|p| p.name == Self::protocol(peer) && p.is_established())
        })
    }

    fn rib_next_hops(&self, prefix: IpNet) -> Vec<IpAddr> {
        let out = birdc(&self.bird, &["show", "route", &prefix.to_string(), "all"]);
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("BGP.next_hop:"))
            .flat_map(|hops| hops.split_whitespace().filter_map(|h| h.parse().ok()))
            .collect()
    }

    fn announce(&self, prefixes: &[IpNet]) -> Result<(), String> {
        self.routes.borrow_mut().extend(prefixes.iter().copied());
        self.reload()
    }

    fn withdraw(&self, prefixes: &[IpNet]) -> Result<(), String> {
        self.routes.borrow_mut().retain(|r| !prefixes.contains(r));
        self.reload()
    }

    fn describe(&self, peer: IpAddr) -> String {
        match self.bird.protocols() {
            Ok(ps) => ps
                .into_iter()
                .find(|p| p.name == Self::protocol(peer))
                .map_or("no such protocol".into(), |p| {
                    format!("{:?} {}", p.session, p.info)
                }),
            Err(e) => e.to_string(),
        }
    }
}

const FRR_ZEBRA: &str = "/usr/lib/frr/zebra";
const FRR_BGPD: &str = "/usr/lib/frr/bgpd";

// FRR: zebra and bgpd in the fabric namespace with their vty sockets in the
// lab dir (--vty_socket; vtysh is pointed at the same dir), no TCP vty.
struct FrrFabric {
    vty: PathBuf,
    started: Instant,
}

impl FrrFabric {
    fn start(lab: &mut Lab) -> Result<FrrFabric, String> {
        let dir = lab.path("frr");
        fs::create_dir(&dir).map_err(|e| e.to_string())?;
        // The daemons run as user frr and create their sockets and pid files
        // here.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).map_err(|e| e.to_string())?;
        let file = |name: &str, text: &str| -> Result<String, String> {
            let p = dir.join(name);
            fs::write(&p, text).map_err(|e| e.to_string())?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                .map_err(|e| e.to_string())?;
            Ok(p.display().to_string())
        };
        let zebra_conf = file("zebra.conf", "hostname fabric\n")?;
        let bgpd_conf = file(
            "bgpd.conf",
            &format!(
                "hostname fabric\n\
                 router bgp {THEIR_AS}\n \
                 bgp router-id {THEIR4}\n \
                 no bgp default ipv4-unicast\n \
                 no bgp ebgp-requires-policy\n \
                 no bgp network import-check\n \
                 bgp graceful-restart\n \
                 neighbor {OUR4} remote-as {OUR_AS}\n \
                 neighbor {OUR4} password {MD5_KEY}\n \
                 neighbor {OUR4} timers 3 9\n \
                 neighbor {OUR4} timers connect 2\n \
                 neighbor {OUR6} remote-as {OUR_AS}\n \
                 neighbor {OUR6} timers 3 9\n \
                 neighbor {OUR6} timers connect 2\n \
                 address-family ipv4 unicast\n  \
                 neighbor {OUR4} activate\n \
                 exit-address-family\n \
                 address-family ipv6 unicast\n  \
                 neighbor {OUR6} activate\n \
                 exit-address-family\n"
            ),
        )?;
        let d = dir.display().to_string();
        let zserv = format!("{d}/zserv.api");
        let common = |conf: &str, pid: &str, log: &str| {
            vec![
                "-f".to_owned(),
                conf.to_owned(),
                "-i".to_owned(),
                format!("{d}/{pid}"),
                "-z".to_owned(),
                zserv.clone(),
                "--vty_socket".to_owned(),
                d.clone(),
                "-P".to_owned(),
                "0".to_owned(),
                "-u".to_owned(),
                "frr".to_owned(),
                "-g".to_owned(),
                "frr".to_owned(),
                "--log".to_owned(),
                format!("file:{d}/{log}"),
            ]
        };
        let mut zebra = vec![FRR_ZEBRA.to_owned()];
        zebra.extend(common(&zebra_conf, "zebra.pid", "zebra.log"));
        lab.spawn_theirs(
            "zebra",
            &zebra.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        wait(Duration::from_secs(10), || Path::new(&zserv).exists())
            .ok_or_else(|| format!("zebra never opened {zserv}: {:?}", lab.check_theirs()))?;
        let mut bgpd = vec![FRR_BGPD.to_owned()];
        bgpd.extend(common(&bgpd_conf, "bgpd.pid", "bgpd.log"));
        lab.spawn_theirs("bgpd", &bgpd.iter().map(String::as_str).collect::<Vec<_>>())?;
        let f = FrrFabric {
            vty: dir,
            started: Instant::now(),
        };
        wait(Duration::from_secs(10), || {
            f.vtysh(&["show bgp summary"]).is_ok()
        })
        .ok_or_else(|| format!("bgpd never answered vtysh: {:?}", lab.check_theirs()))?;
        Ok(f)
    }

    fn vtysh(&self, commands: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("vtysh");
        cmd.arg("--vty_socket").arg(&self.vty);
        for c in commands {
            cmd.arg("-c").arg(c);
        }
        run(&mut cmd)
    }

    fn json(&self, command: &str) -> Value {
        self.vtysh(&[command])
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    fn networks(&self, prefixes: &[IpNet], no: bool) -> Result<(), String> {
        for v4 in [true, false] {
            let mine: Vec<String> = prefixes
                .iter()
                .filter(|p| p.addr().is_ipv4() == v4)
                .map(|p| format!("{}network {p}", if no { "no " } else { "" }))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let af = format!(
                "address-family {} unicast",
                if v4 { "ipv4" } else { "ipv6" }
            );
            let router = format!("router bgp {THEIR_AS}");
            let mut cmds = vec!["configure terminal", router.as_str(), af.as_str()];
            cmds.extend(mine.iter().map(String::as_str));
            let out = self.vtysh(&cmds)?;
            if out.contains('%') {
                return Err(format!("vtysh: {out}"));
            }
        }
        Ok(())
    }
}

/// FRR 8.4 sets the Restart State (R) bit in every OPEN while its startup
/// timer runs: the BGP instance's default restart time, 120 s, from its
/// creation, in helper and restarting mode alike (bgpd.c `bgp_create`,
/// bgp_open.c). BIRD does not wait for End-of-RIB from such a peer, so its
/// recovery ends at Established and its first kernel sync runs before the
/// peer's routes arrive.
const FRR_STARTUP_WINDOW: Duration = Duration::from_secs(120);

impl Fabric for FrrFabric {
    fn restarting_until(&self) -> Option<Instant> {
        // A margin for the timer starting a little after our spawn.
        Some(self.started + FRR_STARTUP_WINDOW + Duration::from_secs(3))
    }

    fn established(&self, peer: IpAddr) -> bool {
        let v = self.json(&format!("show bgp neighbors {peer} json"));
        v[peer.to_string()]["bgpState"] == "Established"
    }

    fn rib_next_hops(&self, prefix: IpNet) -> Vec<IpAddr> {
        let af = if prefix.addr().is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        let v = self.json(&format!("show bgp {af} unicast json"));
        let Some(paths) = v["routes"][prefix.to_string()].as_array() else {
            return Vec::new();
        };
        paths
            .iter()
            // Locally originated paths have no peer.
            .filter(|p| {
                p["peerId"]
                    .as_str()
                    .is_some_and(|id| id.parse::<IpAddr>().is_ok())
            })
            .flat_map(|p| p["nexthops"].as_array().cloned().unwrap_or_default())
            .filter_map(|h| h["ip"].as_str()?.parse().ok())
            .collect()
    }

    fn announce(&self, prefixes: &[IpNet]) -> Result<(), String> {
        self.networks(prefixes, false)
    }

    fn withdraw(&self, prefixes: &[IpNet]) -> Result<(), String> {
        self.networks(prefixes, true)
    }

    fn describe(&self, peer: IpAddr) -> String {
        let v = self.json(&format!("show bgp neighbors {peer} json"));
        let n = &v[peer.to_string()];
        format!(
            "{} (last reset: {}; notification: {})",
            n["bgpState"].as_str().unwrap_or("?"),
            n["lastResetDueTo"].as_str().unwrap_or("-"),
            n["lastNotificationReason"].as_str().unwrap_or("-")
        )
    }
}

// GoBGP: routes through its CLI's `global rib add/del`, gRPC on a port of
// the fabric namespace's loopback; a flood (more than BULK prefixes) as one
// `gobgp mrt inject global` of an MRT file, withdrawn with `global rib del
// all` and the rest announced again.
struct GobgpFabric {
    ns: String,
    port: String,
    dir: PathBuf,
    announced: RefCell<BTreeSet<IpNet>>,
}

/// More prefixes than this at once go through an MRT file.
const GOBGP_BULK: usize = 50;

/// An MRT TABLE_DUMP_V2 file (RFC 6396) with one RIB entry per IPv4 prefix
/// of `prefixes` (others are skipped): origin IGP, AS path `THEIR_AS`, next
/// hop `THEIR4`, from one peer (the fabric itself). What `gobgp mrt inject
/// global FILE` reads.
fn mrt_ipv4(prefixes: &[IpNet]) -> Vec<u8> {
    const TABLE_DUMP_V2: u16 = 13;
    const PEER_INDEX_TABLE: u16 = 1;
    const RIB_IPV4_UNICAST: u16 = 2;
    let mut out = Vec::new();
    let mut record = |subtype: u16, body: &[u8]| {
        out.extend(0u32.to_be_bytes());
        out.extend(TABLE_DUMP_V2.to_be_bytes());
        out.extend(subtype.to_be_bytes());
        out.extend(
            u32::try_from(body.len())
                .expect("record length")
                .to_be_bytes(),
        );
        out.extend(body);
    };
    let their: std::net::Ipv4Addr = THEIR4.parse().expect("THEIR4");
    // Collector ID, empty view name, one peer: type A (4-octet AS) + IPv4.
    let mut b = Vec::new();
    b.extend(their.octets());
    b.extend(0u16.to_be_bytes());
    b.extend(1u16.to_be_bytes());
    b.push(0x02);
    b.extend(their.octets());
    b.extend(their.octets());
    b.extend(THEIR_AS.to_be_bytes());
    record(PEER_INDEX_TABLE, &b);
    // ORIGIN IGP; AS_PATH one AS_SEQUENCE of one 4-octet AS; NEXT_HOP.
    let mut attrs = vec![0x40, 1, 1, 0, 0x40, 2, 6, 2, 1];
    attrs.extend(THEIR_AS.to_be_bytes());
    attrs.extend([0x40, 3, 4]);
    attrs.extend(their.octets());
    for (seq, p) in prefixes.iter().enumerate() {
        let IpNet::V4(p4) = p else { continue };
        let mut b = Vec::new();
        b.extend(u32::try_from(seq).expect("sequence").to_be_bytes());
        b.push(p4.prefix_len());
        b.extend(&p4.network().octets()[..usize::from(p4.prefix_len()).div_ceil(8)]);
        b.extend(1u16.to_be_bytes()); // one entry
        b.extend(0u16.to_be_bytes()); // peer index
        b.extend(0u32.to_be_bytes()); // originated time
        b.extend(
            u16::try_from(attrs.len())
                .expect("attributes")
                .to_be_bytes(),
        );
        b.extend(&attrs);
        record(RIB_IPV4_UNICAST, &b);
    }
    out
}

const GOBGP_API_PORT: u16 = 50151;

impl GobgpFabric {
    fn start(lab: &mut Lab) -> Result<GobgpFabric, String> {
        let neighbor = |peer: &str, afi: &str, password: &str| {
            format!(
                "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{peer}\"\n    peer-as = {OUR_AS}\n{password}\
                 \n  [neighbors.timers.config]\n    hold-time = 9\n    keepalive-interval = 3\n    connect-retry = 2\n\
                 \n  [neighbors.graceful-restart.config]\n    enabled = true\n    restart-time = 120\n\
                 \n  [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"{afi}\"\n\
                 \n    [neighbors.afi-safis.mp-graceful-restart.config]\n      enabled = true\n"
            )
        };
        let conf = format!(
            "[global.config]\n  as = {THEIR_AS}\n  router-id = \"{THEIR4}\"\n  port = 179\n\n{}\n{}",
            neighbor(OUR4, "ipv4-unicast", &format!("    auth-password = \"{MD5_KEY}\"\n")),
            neighbor(OUR6, "ipv6-unicast", ""),
        );
        let path = lab.path("gobgpd.toml");
        fs::write(&path, conf).map_err(|e| e.to_string())?;
        let port = GOBGP_API_PORT.to_string();
        let api = format!("127.0.0.1:{port}");
        let p = path.display().to_string();
        lab.spawn_theirs(
            "gobgpd",
            &[
                "gobgpd",
                "-f",
                &p,
                "--api-hosts",
                &api,
                "--pprof-disable",
                "-p",
            ],
        )?;
        let f = GobgpFabric {
            ns: lab.fabric.clone(),
            port,
            dir: lab.dir.path().to_path_buf(),
            announced: RefCell::new(BTreeSet::new()),
        };
        wait(Duration::from_secs(10), || f.gobgp(&["global"]).is_ok())
            .ok_or_else(|| format!("gobgpd never answered: {:?}", lab.check_theirs()))?;
        Ok(f)
    }

    fn gobgp(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "gobgp", "-p", &self.port])
            .args(args);
        run(&mut cmd)
    }

    fn json(&self, args: &[&str]) -> Value {
        self.gobgp(args)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    fn neighbor(&self, peer: IpAddr) -> Value {
        let all = self.json(&["neighbor", "-j"]);
        all.as_array()
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n["conf"]["neighbor_address"] == peer.to_string().as_str())
                    .cloned()
            })
            .unwrap_or(Value::Null)
    }

    fn rib(&self, prefixes: &[IpNet], verb: &str) -> Result<(), String> {
        for p in prefixes {
            let afi = if p.addr().is_ipv4() { "ipv4" } else { "ipv6" };
            self.gobgp(&["global", "rib", verb, "-a", afi, &p.to_string()])?;
        }
        Ok(())
    }
}

/// GoBGP's `session_state` for ESTABLISHED (its API enum).
const GOBGP_ESTABLISHED: u64 = 6;

impl Fabric for GobgpFabric {
    fn established(&self, peer: IpAddr) -> bool {
        self.neighbor(peer)["state"]["session_state"].as_u64() == Some(GOBGP_ESTABLISHED)
    }

    fn rib_next_hops(&self, prefix: IpNet) -> Vec<IpAddr> {
        let afi = if prefix.addr().is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        let v = self.json(&["global", "rib", "-a", afi, "-j"]);
        let Some(paths) = v[prefix.to_string()].as_array() else {
            return Vec::new();
        };
        paths
            .iter()
            // Learned paths name the neighbor; locally added ones do not.
            .filter(|p| p["neighbor-ip"].is_string())
            .flat_map(|p| p["attrs"].as_array().cloned().unwrap_or_default())
            // NEXT_HOP (3) for IPv4, MP_REACH_NLRI (14) for IPv6.
            .filter(|a| a["type"] == 3 || a["type"] == 14)
            .filter_map(|a| a["nexthop"].as_str()?.parse().ok())
            .collect()
    }

    fn announce(&self, prefixes: &[IpNet]) -> Result<(), String> {
        self.announced.borrow_mut().extend(prefixes.iter().copied());
        if prefixes.len() <= GOBGP_BULK || prefixes.iter().any(|p| p.addr().is_ipv6()) {
            return self.rib(prefixes, "add");
        }
        // GoBGP 3.10's CLI exits before the tail of its stream is taken
        // (seen: the last 632 of 10,001 lost, in file order; all of a short
        // remainder under load), so what GoBGP's RIB lacks is sent again: as
        // another MRT file while it is many, one by one when few.
        let path = self.dir.join("flood.mrt");
        let file = path.display().to_string();
        let mut missing: Vec<IpNet> = prefixes.to_vec();
        for round in 0..=20 {
            if missing.is_empty() {
                return Ok(());
            }
            if round == 20 {
                break;
            }
            if missing.len() > GOBGP_BULK {
                fs::write(&path, mrt_ipv4(&missing))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                self.gobgp(&["mrt", "inject", "global", &file])?;
                thread::sleep(Duration::from_millis(200));
            } else {
                self.rib(&missing, "add")?;
            }
            let rib = self.json(&["global", "rib", "-a", "ipv4", "-j"]);
            missing.retain(|p| rib.get(p.to_string()).is_none());
        }
        Err(format!(
            "gobgp mrt inject: {} of {} still missing from GoBGP's RIB after 20 rounds",
            missing.len(),
            prefixes.len()
        ))
    }

    fn withdraw(&self, prefixes: &[IpNet]) -> Result<(), String> {
        if prefixes.len() <= GOBGP_BULK || prefixes.iter().any(|p| p.addr().is_ipv6()) {
            self.announced
                .borrow_mut()
                .retain(|p| !prefixes.contains(p));
            return self.rib(prefixes, "del");
        }
        // Every IPv4 route goes, then what is left is announced again.
        let gone: BTreeSet<IpNet> = prefixes.iter().copied().collect();
        self.announced.borrow_mut().retain(|p| !gone.contains(p));
        self.gobgp(&["global", "rib", "-a", "ipv4", "del", "all"])?;
        let keep: Vec<IpNet> = self
            .announced
            .borrow()
            .iter()
            .filter(|p| p.addr().is_ipv4())
            .copied()
            .collect();
        self.rib(&keep, "add")
    }

    fn describe(&self, peer: IpAddr) -> String {
        let n = self.neighbor(peer);
        format!(
            "session_state {} (6 = established)",
            n["state"]["session_state"]
        )
    }
}

// ---- helpers --------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn learned(prefix: &str, next_hop: &str) -> LearnedRoute {
    LearnedRoute {
        prefix: net(prefix),
        next_hop: Some(ip(next_hop)),
        protocol: RTPROT_BIRD,
    }
}

/// Polls `f` every [`POLL`] until it holds, at most `timeout`; the time it
/// took, or None.
fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Runs `cmd`, killed after 20 s; Ok(stdout) on success, else Err with the
/// command and its output.
fn run(cmd: &mut Command) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: timed out"));
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("{what}: {status}: {stdout}{stderr}"))
    }
}
