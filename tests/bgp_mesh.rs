//! The iBGP mesh with a route reflector, on real BIRDs: every config is the
//! one `wgmesh::routes::bgp` renders, every claim is read back from BIRD
//! (`Bird::mesh_routes`, the parser the agent uses) or from the kernel.
//!
//! Four network namespaces on one bridge (in a fifth): a fabric router `f`
//! (BIRD, AS 64600) and three nodes of AS 64512, configured exactly as the
//! agent configures them (`Speaker::config` with `--bgp-mesh
//! --bgp-route-reflectors rr`): `a` and `rr` both learn the granted prefix
//! from the fabric (two gateways of one prefix, one of them the
//! reflector), `c` has no fabric session and hears only through `rr`. On
//! the nodes the bridge port plays the part of `wgmesh0` (the sessions' and
//! next hops' interface); the tunnel itself is not what is under test here
//! (the `bgp-fabric` drill runs the mesh through it).
//!
//! Checked:
//! 1. `a` and `rr` learn the granted prefix into their table 187, not the
//!    ungranted one;
//! 2. `rr` holds `a`'s path with `a`'s address as next hop (`next hop self
//!    ebgp`), and sends `c` both paths (ADD-PATH): its own, next hop `rr`,
//!    and `a`'s unchanged, next hop `a`; the agent's `mesh_view` at `c`
//!    names both `a` and `rr` as learners;
//! 3. mesh routes stay out of the kernel: `c`'s table 187 is empty, `rr`'s
//!    holds only its own fabric route;
//! 4. the fabric withdraws: gone from `c`.
//!
//! Prerequisites: root, `ip`, `bird` and `birdc` (Debian: bird2); missing,
//! the test fails under CI=true and prints a SKIP line otherwise. The lab
//! guard stops every BIRD and deletes every namespace, on panic too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Child;
use std::thread;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use wgmesh::routes::bgp::speaker::{mesh_view, MeshNode, MeshSettings, Settings, Speaker};
use wgmesh::routes::bgp::{mesh_protocol_names, render, BgpConfig, Bird, Spawn, TableReader};
use wgmesh::routes::Grant;

const NODE_AS: u32 = 64512;
const FABRIC_AS: u32 = 64600;
const GRANTED: &str = "198.51.100.0/24";
const UNGRANTED: &str = "203.0.113.0/24";
const IFACE: &str = "m0";
const WAIT: Duration = Duration::from_secs(40);

/// name, address on the bridge.
const HOSTS: [(&str, &str); 4] = [
    ("f", "10.203.0.250"),
    ("a", "10.203.0.1"),
    ("rr", "10.203.0.2"),
    ("c", "10.203.0.3"),
];

struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
    birds: Vec<Child>,
    namespaces: Vec<String>,
}

impl Lab {
    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    fn bird(&self, host: &str) -> Bird {
        Bird::new(
            self.dir.path().join(format!("{host}.conf")),
            self.dir.path().join(format!("{host}.ctl")),
        )
    }

    fn new() -> Lab {
        let prefix = format!("wgbm-{}-", std::process::id());
        let mut lab = Lab {
            dir: tempfile::tempdir().expect("tempdir"),
            prefix,
            birds: Vec::new(),
            namespaces: Vec::new(),
        };
        let hub = lab.ns("hub");
        let all: Vec<String> = std::iter::once(hub.clone())
            .chain(HOSTS.iter().map(|(h, _)| lab.ns(h)))
            .collect();
        for ns in all {
            testkit::netns::add(&ns).expect("ip netns add");
            lab.namespaces.push(ns);
        }
        ip(&hub, "link add br0 type bridge");
        ip(&hub, "link set br0 up");
        for (host, addr) in HOSTS {
            let ns = lab.ns(host);
            // Created inside the namespaces: no name ever exists on the host.
            ip(
                &hub,
                &format!("link add p-{host} type veth peer name {IFACE} netns {ns}"),
            );
            ip(&hub, &format!("link set p-{host} master br0 up"));
            ip(&ns, "link set lo up");
            ip(&ns, &format!("addr add {addr}/24 dev {IFACE}"));
            ip(&ns, &format!("link set {IFACE} up"));
        }
        lab
    }

    fn start(&mut self, host: &str, text: &str) {
        let bird = self.bird(host);
        bird.install(text)
            .unwrap_or_else(|e| panic!("{host}'s config: {e}\n{text}"));
        let child = bird
            .spawn(&Spawn {
                pid_file: None,
                recovery: false,
                netns: Some(self.ns(host)),
                log_file: Some(self.dir.path().join(format!("{host}.log"))),
                ready_timeout: Duration::from_secs(10),
                detach: false,
            })
            .unwrap_or_else(|e| panic!("start {host}'s BIRD: {e}"));
        self.birds.push(child);
    }

    /// Kernel table `table` in `host`'s namespace: (prefix, gateway).
    fn table(&self, host: &str, table: u32) -> Vec<(IpNet, Option<IpAddr>)> {
        testkit::netns::in_netns(&self.ns(host), move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // The rtnetlink connection runs on the runtime.
            rt.block_on(async { TableReader::connect()?.routes(table).await })
                .map_err(std::io::Error::other)
        })
        .unwrap_or_else(|e| panic!("table {table} in {host}'s namespace: {e}"))
        .into_iter()
        .map(|r| (r.prefix, r.next_hop))
        .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.birds {
            testkit::process::stop(c, Duration::from_secs(3));
        }
        for ns in &self.namespaces {
            for pid in testkit::netns::pids(ns) {
                testkit::process::signal(pid, testkit::Signal::KILL);
            }
            testkit::netns::del(ns);
        }
    }
}

fn ip(ns: &str, args: &str) {
    testkit::netns::ip_in(ns, args).unwrap_or_else(|e| panic!("ip -n {ns} {args}: {e}"));
}

fn addr(host: &str) -> IpAddr {
    HOSTS
        .iter()
        .find(|(h, _)| *h == host)
        .map(|(_, a)| a.parse().expect("address"))
        .expect("host")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

/// `host`'s BIRD config as its agent would render it with `--bgp
/// --bgp-local-as 64512 [--bgp-neighbor f=64600] --bgp-mesh
/// --bgp-route-reflectors rr`, the bridge port as the mesh interface.
fn node_config(lab: &Lab, host: &str, fabric: bool, grants: &[&Grant]) -> BgpConfig {
    let speaker = Speaker::new(Settings {
        local_as: NODE_AS,
        router_id: None,
        neighbors: if fabric {
            vec![format!("{}={FABRIC_AS}", addr("f"))
                .parse()
                .expect("neighbor")]
        } else {
            Vec::new()
        },
        password_file: None,
        config: lab.dir.path().join(format!("{host}.conf")),
        socket: lab.dir.path().join(format!("{host}.ctl")),
        table: 187,
        max_prefixes: 100,
        spawn: false,
        log_file: None,
        mesh: Some(MeshSettings {
            reflectors: ["rr".to_string()].into(),
            interface: IFACE.into(),
        }),
    })
    .expect("speaker");
    let others: Vec<MeshNode> = ["a", "rr", "c"]
        .into_iter()
        .filter(|h| *h != host)
        .map(|h| MeshNode {
            name: h.into(),
            tunnel: vec![addr(h)],
        })
        .collect();
    speaker
        .config(host, &[addr(host)], &[], grants, &[addr(host)], &others)
        .unwrap_or_else(|e| panic!("{host}'s config: {e}"))
}

fn fabric_config(with_granted: bool) -> String {
    let mut routes = format!("  route {UNGRANTED} blackhole;\n");
    if with_granted {
        routes.push_str(&format!("  route {GRANTED} blackhole;\n"));
    }
    let session = |name: &str, peer: IpAddr| {
        format!(
            "protocol bgp {name} {{\n  local {f} as {FABRIC_AS};\n  neighbor {peer} as {NODE_AS};\n  direct;\n  \
             hold time 9; keepalive time 3; connect retry time 2; error wait time 1,5;\n  \
             ipv4 {{ import none; export where proto = \"site\"; }};\n}}\n",
            f = addr("f"),
        )
    };
    format!(
        "router id {f};\nprotocol device {{}}\nprotocol static site {{\n  ipv4;\n{routes}}}\n{}{}",
        session("to_a", addr("a")),
        session("to_rr", addr("rr")),
        f = addr("f"),
    )
}

/// `host`'s mesh routes as (prefix, protocol, next hop).
fn mesh_routes(lab: &Lab, host: &str) -> Vec<(IpNet, String, Option<IpAddr>)> {
    lab.bird(host)
        .mesh_routes()
        .unwrap_or_else(|e| panic!("{host}'s mesh routes: {e}"))
        .into_iter()
        .map(|r| (r.prefix, r.protocol, r.next_hop))
        .collect()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < WAIT, "not within {WAIT:?}: {what}");
        thread::sleep(Duration::from_millis(100));
    }
    t0.elapsed()
}

#[test]
fn a_reflector_carries_every_learners_path_with_its_next_hop() {
    use testkit::prereq::{missing, Need};
    if let Some(what) = missing(&[
        Need::Root,
        Need::Tool("ip"),
        Need::Tool("bird"),
        Need::Tool("birdc"),
    ]) {
        testkit::prereq::skip_or_fail(
            "a_reflector_carries_every_learners_path_with_its_next_hop",
            &what,
        );
        return;
    }
    let mut lab = Lab::new();
    let grant: Grant = wgmesh::routes::grant::decode(&serde_json::json!({
        "metadata": {"name": "site"},
        "spec": {"prefix": GRANTED, "learn": {"nodes": ["a", "rr"], "maxLength": 24}},
    }))
    .expect("grant");
    let grants = [&grant];
    let configs = [
        ("a", node_config(&lab, "a", true, &grants)),
        ("rr", node_config(&lab, "rr", true, &grants)),
        ("c", node_config(&lab, "c", false, &grants)),
    ];
    // The roles the agent chose.
    let sessions = |host: &str| -> Vec<(String, bool)> {
        let c = &configs.iter().find(|(h, _)| *h == host).expect("host").1;
        c.mesh
            .as_ref()
            .expect("mesh")
            .sessions
            .iter()
            .map(|s| (s.node.clone(), s.client))
            .collect()
    };
    assert_eq!(sessions("a"), [("rr".to_string(), false)]);
    assert_eq!(
        sessions("rr"),
        [("a".to_string(), true), ("c".to_string(), true)]
    );
    assert_eq!(sessions("c"), [("rr".to_string(), false)]);
    lab.start("f", &fabric_config(true));
    for (host, config) in &configs {
        let text = render(config).unwrap_or_else(|e| panic!("{host}: {e}"));
        lab.start(host, &text);
    }

    let f = addr("f");
    let learned = wait_for("a's and rr's table 187 hold the granted prefix", || {
        ["a", "rr"]
            .iter()
            .all(|h| lab.table(h, 187) == [(net(GRANTED), Some(f))])
    });
    let c_config = &configs[2].1;
    let rr_proto = &mesh_protocol_names(&c_config.mesh.as_ref().expect("mesh").sessions)[0];
    let reflected = wait_for("c holds both paths from rr: next hop a and rr", || {
        let routes = mesh_routes(&lab, "c");
        ["a", "rr"]
            .iter()
            .all(|h| routes.contains(&(net(GRANTED), rr_proto.clone(), Some(addr(h)))))
    });
    assert!(
        mesh_routes(&lab, "rr")
            .iter()
            .any(|(p, proto, hop)| *p == net(GRANTED)
                && proto == "mesh_a"
                && *hop == Some(addr("a"))),
        "rr: {:?}",
        mesh_routes(&lab, "rr")
    );
    assert!(
        !mesh_routes(&lab, "c")
            .iter()
            .any(|(p, ..)| *p == net(UNGRANTED)),
        "the ungranted prefix reached c"
    );
    assert!(
        lab.table("c", 187).is_empty(),
        "c's table 187 holds mesh routes: {:?}",
        lab.table("c", 187)
    );
    // rr's holds its own fabric route only (best: preference 100 over 90).
    assert_eq!(lab.table("rr", 187), [(net(GRANTED), Some(f))]);

    // What c's agent makes of it: both learners' advertisements.
    let reflectors: BTreeSet<String> = ["rr".to_string()].into();
    let protocols: BTreeMap<String, String> = [(rr_proto.clone(), "rr".to_string())].into();
    let established: BTreeSet<String> = lab
        .bird("c")
        .sessions()
        .expect("c's sessions")
        .into_iter()
        .filter(|s| s.is_established())
        .map(|s| s.name)
        .collect();
    let routes = lab.bird("c").mesh_routes().expect("c's mesh routes");
    let owner = |a: IpAddr| {
        HOSTS
            .iter()
            .find(|(_, x)| x.parse::<IpAddr>().ok() == Some(a))
            .map(|(h, _)| h.to_string())
    };
    let view = mesh_view(&routes, &protocols, &established, &reflectors, "c", owner);
    assert!(
        view.covers("a", true) && view.covers("rr", true),
        "c's session with rr is up: {established:?}"
    );
    for h in ["a", "rr"] {
        let from = &view.by_node[h];
        assert_eq!(from.len(), 1, "{h}: {from:?}");
        assert_eq!(from[0].prefix, net(GRANTED));
        assert_eq!(from[0].next_hop_node.as_deref(), Some(h));
    }

    // The fabric withdraws: gone from c.
    let fabric = lab.bird("f");
    fabric
        .install(&fabric_config(false))
        .expect("fabric config");
    fabric.configure().expect("fabric reload");
    let withdrawn = wait_for("the withdraw reaches c", || {
        !mesh_routes(&lab, "c")
            .iter()
            .any(|(p, ..)| *p == net(GRANTED))
    });
    println!(
        "bgp mesh with a reflector: a and rr learned the prefix {:.2} s after start, c had both paths through rr {:.2} s later (next hops a and rr), a withdraw reached c in {:.2} s",
        learned.as_secs_f64(),
        reflected.as_secs_f64(),
        withdrawn.as_secs_f64()
    );
}
