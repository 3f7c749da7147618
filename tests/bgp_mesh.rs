//! The iBGP mesh with a route reflector, on real BIRDs: every config is the
//! one `wgmesh::routes::bgp` renders, every claim is read back from BIRD
//! (`Bird::mesh_routes`, the parser the agent uses) or from the kernel.
//!
//! Four network namespaces on one bridge (in a fifth): a fabric router `f`
//! (BIRD, AS 64600) and three nodes of AS 64512: `a` learns from the fabric,
//! `rr` reflects, `c` is a client that only hears through `rr`. On the
//! nodes the bridge port plays the part of `wgmesh0` (the sessions' and
//! next hops' interface); the tunnel itself is not what is under test here
//! (the `bgp-fabric` drill runs the mesh through it).
//!
//! Checked:
//! 1. `a` learns the granted prefix from the fabric into its table 187,
//!    and not the ungranted one;
//! 2. `rr` holds it from `a` with `a`'s address as next hop (`next hop self
//!    ebgp`), and reflects it to `c` unchanged: `c` holds it from `rr`, next
//!    hop still `a`, and the agent's `mesh_view` names `a` as the learner;
//! 3. mesh routes stay out of the kernel: `rr`'s and `c`'s table 187 are
//!    empty;
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
use wgmesh::routes::bgp::speaker::{mesh_view, MeshSettings};
use wgmesh::routes::bgp::{
    mesh_protocol_names, render, BgpConfig, Bird, ImportRule, Mesh, MeshSession, Neighbor, Spawn,
    TableReader,
};

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

    /// Kernel table `table` in `host`'s namespace.
    fn table(&self, host: &str, table: u32) -> Vec<IpNet> {
        let ns = self.ns(host);
        thread::spawn(move || {
            testkit::netns::enter(&ns).expect("enter namespace");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                TableReader::connect()
                    .expect("rtnetlink")
                    .routes(table)
                    .await
                    .expect("dump table")
            })
        })
        .join()
        .expect("table thread")
        .into_iter()
        .map(|r| r.prefix)
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

fn session(node: &str, local: &str, client: bool, import: &[&str]) -> MeshSession {
    MeshSession {
        node: node.into(),
        address: addr(node),
        local_address: addr(local),
        client,
        import: import.iter().map(|p| ImportRule::exact(net(p))).collect(),
    }
}

fn node_config(host: &str, sessions: Vec<MeshSession>) -> BgpConfig {
    let IpAddr::V4(router_id) = addr(host) else {
        unreachable!("IPv4 lab")
    };
    let mut c = BgpConfig::new(router_id, NODE_AS, 187);
    c.mesh = Some(Mesh {
        interface: IFACE.into(),
        sessions,
        next_hops: ["a", "rr", "c"]
            .into_iter()
            .filter(|h| *h != host)
            .map(addr)
            .collect(),
    });
    c
}

fn fabric_config(with_granted: bool) -> String {
    let mut routes = format!("  route {UNGRANTED} blackhole;\n");
    if with_granted {
        routes.push_str(&format!("  route {GRANTED} blackhole;\n"));
    }
    format!(
        "router id {f};\nprotocol device {{}}\nprotocol static site {{\n  ipv4;\n{routes}}}\n\
         protocol bgp to_a {{\n  local {f} as {FABRIC_AS};\n  neighbor {a} as {NODE_AS};\n  direct;\n  \
         hold time 9; keepalive time 3; connect retry time 2; error wait time 1,5;\n  \
         ipv4 {{ import none; export where proto = \"site\"; }};\n}}\n",
        f = addr("f"),
        a = addr("a"),
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
fn a_reflector_carries_a_learners_route_with_its_next_hop() {
    use testkit::prereq::{missing, Need};
    if let Some(what) = missing(&[
        Need::Root,
        Need::Tool("ip"),
        Need::Tool("bird"),
        Need::Tool("birdc"),
    ]) {
        testkit::prereq::skip_or_fail(
            "a_reflector_carries_a_learners_route_with_its_next_hop",
            &what,
        );
        return;
    }
    let mut lab = Lab::new();

    // a: the fabric session, and the mesh with the reflector only.
    let mut a = node_config("a", vec![session("rr", "a", false, &[GRANTED])]);
    a.neighbors = vec![Neighbor {
        name: "fabric".into(),
        address: addr("f"),
        remote_as: FABRIC_AS,
        local_address: None,
        password: None,
        multihop: false,
    }];
    a.import = vec![ImportRule::exact(net(GRANTED))];
    // rr: both others are its clients; c may learn nothing itself.
    let rr = node_config(
        "rr",
        vec![
            session("a", "rr", true, &[GRANTED]),
            session("c", "rr", true, &[]),
        ],
    );
    // c: the reflector only, which may carry every node's grants.
    let c = node_config("c", vec![session("rr", "c", false, &[GRANTED])]);
    lab.start("f", &fabric_config(true));
    for (host, config) in [("a", &a), ("rr", &rr), ("c", &c)] {
        let text = render(config).unwrap_or_else(|e| panic!("{host}: {e}"));
        lab.start(host, &text);
    }

    let learned = wait_for("a's table 187 holds the granted prefix", || {
        lab.table("a", 187).contains(&net(GRANTED))
    });
    assert!(!lab.table("a", 187).contains(&net(UNGRANTED)));
    let rr_proto = &mesh_protocol_names(&c.mesh.as_ref().expect("mesh").sessions)[0];
    let reflected = wait_for("c holds the prefix from rr, next hop a", || {
        mesh_routes(&lab, "c").contains(&(net(GRANTED), rr_proto.clone(), Some(addr("a"))))
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
    for host in ["rr", "c"] {
        assert!(
            lab.table(host, 187).is_empty(),
            "{host}'s table 187 holds mesh routes: {:?}",
            lab.table(host, 187)
        );
    }

    // What c's agent makes of it: a's advertisement, with a as the hop.
    let settings = MeshSettings {
        reflectors: ["rr".to_string()].into(),
        interface: IFACE.into(),
    };
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
    let view = mesh_view(
        &routes,
        &protocols,
        &established,
        &settings.reflectors,
        "c",
        owner,
    );
    assert!(
        view.covers_all,
        "c's session with rr is up: {established:?}"
    );
    let from_a = &view.by_node["a"];
    assert_eq!(from_a.len(), 1);
    assert_eq!(from_a[0].prefix, net(GRANTED));
    assert_eq!(from_a[0].next_hop_node.as_deref(), Some("a"));

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
        "bgp mesh with a reflector: a learned the prefix {:.2} s after start, c had it through rr {:.2} s later (next hop a), a withdraw reached c in {:.2} s",
        learned.as_secs_f64(),
        reflected.as_secs_f64(),
        withdrawn.as_secs_f64()
    );
}
