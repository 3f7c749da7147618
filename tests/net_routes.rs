//! `wgmesh::net` against a real kernel: links, MTU and the fail-closed cluster
//! routes (the device route and its blackhole backstop), each case inside a
//! private network namespace. Needs root.
//!
//! The async code runs on a thread that first `setns`es into the case's
//! namespace and then builds its own current-thread tokio runtime, so the
//! rtnetlink socket `Net::connect` opens belongs to that namespace; the rest of
//! the test process (and the host's routes) is never touched. Results are
//! checked independently with `ip -n NS -N -j …`, and the "no write in steady
//! state" claims with `ip monitor` between two marker events.
//!
//! Prerequisites: root, `ip` (iproute2) and network namespaces. When one is
//! missing a case prints a SKIP line and passes, unless CI=true, where it fails.
//! Links are `dummy` where the kernel has it, else a veth pair.
//!
//! Hygiene (DESIGN.md): namespaces are `wgnr-<pid>-<case>`; dropping a case's
//! `Netns` (also while unwinding from a failed assertion) deletes it, and
//! namespaces of dead runs (Ctrl-C, SIGKILL) are reaped when the next run starts.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Once};
use std::thread;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;
use wgmesh::net::{
    ensure_masquerade, Bypass, ClusterRoute, MasqChange, MasqSpec, Net, NetError, PolicySpec,
    Protected, RouteConflict, BACKSTOP_METRIC, ROUTE_PROTOCOL,
};

const WG: &str = "wgm0";
const OTHER: &str = "other0";
/// The underlay of the fail-closed case, holding the default routes.
const UNDERLAY: &str = "up0";
const OUR_PROTO: &str = "87";

// ---- the cases ------------------------------------------------------------

#[test]
fn link_is_brought_up_with_its_mtu_once() {
    let Some(ns) = Netns::create("link") else {
        return;
    };
    let link = ns.add_link(WG);
    ns.run(|ns| async move {
        let net = Net::connect().expect("connect");
        assert_eq!(net.link_index("nonexistent0").await.unwrap(), None);
        assert!(matches!(
            net.ensure_link_up("nonexistent0", 1420).await,
            Err(NetError::LinkNotFound { .. })
        ));
        let index = net.link_index(WG).await.unwrap().expect("link exists");

        let first = net.ensure_link_up(WG, 1420).await.unwrap();
        assert_eq!(first.index, index);
        assert_eq!(first.mtu_changed_from, Some(Some(1500)));
        assert!(first.brought_up);
        let shown = ns.link(WG);
        assert_eq!(shown["mtu"], 1420, "{shown}");
        assert!(has_flag(&shown, "UP"), "{shown}");

        let second = net.ensure_link_up(WG, 1420).await.unwrap();
        assert!(second.is_empty(), "{second:?}");

        // Only what differs: the MTU, not IFF_UP.
        let third = net.ensure_link_up(WG, 1380).await.unwrap();
        assert_eq!(third.mtu_changed_from, Some(Some(1420)));
        assert!(!third.brought_up);
        assert_eq!(ns.link(WG)["mtu"], 1380);

        // Only IFF_UP, not the MTU.
        ns.ip(&format!("link set {WG} down"));
        let fourth = net.ensure_link_up(WG, 1380).await.unwrap();
        assert_eq!(fourth.mtu_changed_from, None);
        assert!(fourth.brought_up);
        assert!(has_flag(&ns.link(WG), "UP"));
    });
    eprintln!("ok link_is_brought_up_with_its_mtu_once ({link} link)");
}

#[test]
fn cluster_routes_are_ours_and_foreign_routes_are_never_touched() {
    let Some(ns) = Netns::create("routes") else {
        return;
    };
    let link = ns.add_link(WG);
    ns.add_link(OTHER);
    ns.ip(&format!("link set {OTHER} up"));
    ns.ip("link set lo up");
    // Foreign routes: one to a prefix we never want, one at a prefix we do.
    ns.ip(&format!("route add 192.0.2.0/24 dev {OTHER} proto static"));
    ns.ip(&format!(
        "-6 route add 2001:db8:1::/48 dev {OTHER} proto static"
    ));
    ns.ip(&format!("route add 10.98.0.0/16 dev {OTHER} proto static"));
    let foreign_before = ns.foreign_routes();

    ns.run(|ns| async move {
        let net = Net::connect().expect("connect");
        let v4: IpNet = "10.99.0.0/16".parse().unwrap();
        let v6: IpNet = "fd00:99::/48".parse().unwrap();
        let contested: IpNet = "10.98.0.0/16".parse().unwrap();
        let other_index = net.link_index(OTHER).await.unwrap();

        // The kernel refuses routes through a down device: a clear error.
        // The backstops went in before it, so the CIDRs are closed already.
        let wanted = [v4, v6, contested];
        let err = net.ensure_routes(Some(WG), &wanted, &[]).await.unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "adding route {v4} dev {WG} proto {ROUTE_PROTOCOL}"
            )),
            "{err}"
        );
        ns.assert_ours_exactly(&[], &[v4, v6]);
        net.ensure_link_up(WG, 1420).await.unwrap();

        let changes = net.ensure_routes(Some(WG), &wanted, &[]).await.unwrap();
        assert_eq!(
            changes.added,
            vec![ClusterRoute::device(v4), ClusterRoute::device(v6)]
        );
        assert!(changes.replaced.is_empty() && changes.removed.is_empty());
        let conflict = RouteConflict {
            destination: contested,
            protocol: 4,
            interface_index: other_index,
        };
        assert_eq!(changes.conflicts, vec![conflict.clone()]);
        assert_eq!(
            changes.to_string(),
            "added 2, replaced 0, removed 0, conflicts 1"
        );
        ns.assert_ours(&[v4, v6]);
        ns.assert_survived(&foreign_before);

        // Steady state: same answer, and not one route message in the kernel.
        let monitor = Monitor::start(&ns);
        let again = net.ensure_routes(Some(WG), &wanted, &[]).await.unwrap();
        let again_link = net.ensure_link_up(WG, 1420).await.unwrap();
        let written = monitor.ours_between_markers(&ns);
        assert!(again.is_empty(), "{again:?}");
        assert!(again_link.is_empty(), "{again_link:?}");
        assert_eq!(again.conflicts, vec![conflict.clone()]);
        assert!(written.is_empty(), "steady state wrote: {written:?}");
        ns.assert_ours(&[v4, v6]);

        // The detector does see writes: a route of ours deleted behind our
        // back is put back, and that shows.
        ns.ip(&format!("route del {v4} dev {WG} proto {OUR_PROTO}"));
        let monitor = Monitor::start(&ns);
        let healed = net.ensure_routes(Some(WG), &wanted, &[]).await.unwrap();
        let written = monitor.ours_between_markers(&ns);
        assert_eq!(healed.added, vec![ClusterRoute::device(v4)]);
        assert_eq!(written.len(), 1, "{written:?}");
        assert!(
            written[0].starts_with(&format!("{v4} dev {WG}")),
            "{written:?}"
        );
        ns.assert_ours(&[v4, v6]);
        // So is a backstop, alone.
        ns.ip(&format!(
            "-6 route del blackhole {v6} metric {BACKSTOP_METRIC} proto {OUR_PROTO}"
        ));
        let monitor = Monitor::start(&ns);
        let healed = net.ensure_routes(Some(WG), &wanted, &[]).await.unwrap();
        let written = monitor.ours_between_markers(&ns);
        assert_eq!(healed.added, vec![ClusterRoute::backstop(v6)]);
        assert_eq!(written.len(), 1, "{written:?}");
        assert!(is_backstop_line(&written[0], v6), "{written:?}");
        ns.assert_ours(&[v4, v6]);

        // A CIDR leaves the wanted set: only our two routes go.
        let changes = net
            .ensure_routes(Some(WG), &[v6, contested], &[])
            .await
            .unwrap();
        assert_eq!(
            changes.removed,
            vec![ClusterRoute::device(v4), ClusterRoute::backstop(v4)]
        );
        assert!(changes.added.is_empty() && changes.replaced.is_empty());
        assert_eq!(changes.conflicts, vec![conflict]);
        ns.assert_ours(&[v6]);
        ns.assert_survived(&foreign_before);

        // A route of ours pointing elsewhere is replaced in place.
        let moved: IpNet = "10.97.0.0/16".parse().unwrap();
        ns.ip(&format!(
            "route add {moved} dev {OTHER} proto {OUR_PROTO} scope link"
        ));
        let changes = net
            .ensure_routes(Some(WG), &[v6, moved], &[])
            .await
            .unwrap();
        assert_eq!(changes.replaced, vec![ClusterRoute::device(moved)]);
        assert_eq!(changes.added, vec![ClusterRoute::backstop(moved)]);
        assert!(changes.removed.is_empty());
        ns.assert_ours(&[moved, v6]);

        // Nothing wanted: all of ours go, backstops last, every foreign
        // route stays.
        let changes = net.ensure_routes(Some(WG), &[], &[]).await.unwrap();
        assert_eq!(
            changes.removed,
            vec![
                ClusterRoute::device(moved),
                ClusterRoute::device(v6),
                ClusterRoute::backstop(moved),
                ClusterRoute::backstop(v6),
            ]
        );
        assert!(changes.conflicts.is_empty());
        ns.assert_ours(&[]);
        ns.assert_survived(&foreign_before);
        let changes = net.ensure_routes(Some(WG), &[], &[]).await.unwrap();
        assert!(changes.is_empty(), "{changes:?}");

        // No such interface: the backstop alone goes in, and the caller is told.
        let changes = net
            .ensure_routes(Some("nonexistent0"), &[v4], &[])
            .await
            .unwrap();
        assert!(changes.interface_missing, "{changes:?}");
        assert_eq!(changes.added, vec![ClusterRoute::backstop(v4)]);
        net.ensure_routes(Some(WG), &[], &[]).await.unwrap();
    });
    eprintln!("ok cluster_routes_are_ours_and_foreign_routes_are_never_touched ({link} links)");
}

#[test]
fn cluster_traffic_fails_closed_when_the_interface_goes_away() {
    let Some(ns) = Netns::create("failclosed") else {
        return;
    };
    ns.ip("link set lo up");
    // An underlay with a default route per family: without routes of ours,
    // cluster traffic would leave through it in plaintext.
    ns.ip(&format!(
        "link add {UNDERLAY} type veth peer name {UNDERLAY}p"
    ));
    ns.ip(&format!("link set {UNDERLAY}p up"));
    ns.ip(&format!("link set {UNDERLAY} up"));
    ns.ip(&format!("addr add 192.0.2.1/24 dev {UNDERLAY}"));
    ns.ip(&format!("route add default via 192.0.2.2 dev {UNDERLAY}"));
    ns.ip(&format!("-6 addr add 2001:db8::1/64 dev {UNDERLAY} nodad"));
    ns.ip(&format!(
        "-6 route add default via 2001:db8::2 dev {UNDERLAY}"
    ));
    let link = ns.add_link(WG);

    ns.run(|ns| async move {
        let net = Net::connect().expect("connect");
        let v4: IpNet = "10.99.0.0/16".parse().unwrap();
        let v6: IpNet = "fd00:99::/48".parse().unwrap();
        let pods = ["10.99.3.4", "fd00:99::3:4"];
        for pod in pods {
            ns.assert_leaves_through(pod, UNDERLAY);
        }

        net.ensure_link_up(WG, 1420).await.unwrap();
        let changes = net.ensure_routes(Some(WG), &[v4, v6], &[]).await.unwrap();
        assert_eq!(
            changes.added,
            vec![
                ClusterRoute::backstop(v4),
                ClusterRoute::backstop(v6),
                ClusterRoute::device(v4),
                ClusterRoute::device(v6),
            ]
        );
        assert_eq!(
            changes.to_string(),
            "added 4 (2 backstops), replaced 0, removed 0, conflicts 0"
        );
        ns.assert_ours(&[v4, v6]);
        for pod in pods {
            ns.assert_leaves_through(pod, WG);
        }

        // The data plane exits and its TUN device vanishes: the kernel
        // takes the device routes with it, the backstops stay, and cluster
        // traffic is dropped here instead of taking the default route.
        ns.ip(&format!("link del {WG}"));
        ns.assert_ours_exactly(&[], &[v4, v6]);
        for pod in pods {
            ns.assert_dropped(pod);
        }
        let gone = net.ensure_routes(Some(WG), &[v4, v6], &[]).await.unwrap();
        assert!(gone.interface_missing && gone.is_empty(), "{gone:?}");
        ns.assert_ours_exactly(&[], &[v4, v6]);

        // A new device (a new index): the device routes come back, the
        // backstops are neither duplicated nor rewritten.
        ns.add_link(WG);
        net.ensure_link_up(WG, 1420).await.unwrap();
        let monitor = Monitor::start(&ns);
        let changes = net.ensure_routes(Some(WG), &[v4, v6], &[]).await.unwrap();
        let written = monitor.ours_between_markers(&ns);
        assert_eq!(
            changes.added,
            vec![ClusterRoute::device(v4), ClusterRoute::device(v6)]
        );
        assert!(changes.replaced.is_empty() && changes.removed.is_empty());
        assert_eq!(written.len(), 2, "{written:?}");
        assert!(
            [v4, v6]
                .iter()
                .all(|&cidr| written.iter().all(|l| !is_backstop_line(l, cidr))),
            "{written:?}"
        );
        ns.assert_ours(&[v4, v6]);
        for pod in pods {
            ns.assert_leaves_through(pod, WG);
        }

        // The device merely going down flushes its routes just the same.
        ns.ip(&format!("link set {WG} down"));
        ns.assert_ours_exactly(&[], &[v4, v6]);
        for pod in pods {
            ns.assert_dropped(pod);
        }
        net.ensure_link_up(WG, 1420).await.unwrap();
        let changes = net.ensure_routes(Some(WG), &[v4, v6], &[]).await.unwrap();
        assert_eq!(
            changes.added,
            vec![ClusterRoute::device(v4), ClusterRoute::device(v6)]
        );
        ns.assert_ours(&[v4, v6]);

        // Steady state again.
        let monitor = Monitor::start(&ns);
        let again = net.ensure_routes(Some(WG), &[v4, v6], &[]).await.unwrap();
        let written = monitor.ours_between_markers(&ns);
        assert!(again.is_empty(), "{again:?}");
        assert!(written.is_empty(), "steady state wrote: {written:?}");
    });
    eprintln!("ok cluster_traffic_fails_closed_when_the_interface_goes_away ({link} link)");
}

#[test]
fn underlay_mtu_follows_the_route() {
    let Some(ns) = Netns::create("mtu") else {
        return;
    };
    ns.add_link("up0");
    ns.ip("link set lo up");
    ns.ip("link set up0 mtu 1400 up");
    ns.ip("addr add 10.50.0.1/24 dev up0");
    ns.ip("-6 addr add fd00:50::1/64 dev up0 nodad");
    ns.ip("route add 10.60.0.0/16 via 10.50.0.2 dev up0 mtu 1300");
    ns.run(|_| async move {
        let net = Net::connect().expect("connect");
        assert_eq!(net.underlay_mtu(ip("10.50.0.2")).await.unwrap(), 1400);
        assert_eq!(net.underlay_mtu(ip("fd00:50::2")).await.unwrap(), 1400);
        // The route's own mtu metric is lower than the link's.
        assert_eq!(net.underlay_mtu(ip("10.60.1.1")).await.unwrap(), 1300);
        // Loopback's 65536 saturates.
        assert_eq!(net.underlay_mtu(ip("127.0.0.1")).await.unwrap(), u16::MAX);
        // No default route in the namespace.
        let err = net.underlay_mtu(ip("198.51.100.7")).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("looking up the route towards 198.51.100.7"),
            "{err}"
        );

        let addrs = net.interface_addresses().await.unwrap();
        let up0: Vec<_> = addrs.iter().filter(|a| a.interface == "up0").collect();
        assert!(
            up0.iter()
                .any(|a| a.address == "10.50.0.1".parse::<IpAddr>().unwrap()
                    && a.prefix_len == 24
                    && a.interface_up
                    && a.scope == 0),
            "{addrs:?}"
        );
        assert!(
            up0.iter()
                .any(|a| a.address == "fd00:50::1".parse::<IpAddr>().unwrap()),
            "{addrs:?}"
        );
        assert!(addrs
            .iter()
            .any(|a| a.interface == "lo" && a.address.is_loopback()));
    });
}

#[test]
fn policy_routes_pod_and_host_traffic_to_nodes_into_the_tunnel() {
    let Some(ns) = Netns::create("policy") else {
        return;
    };
    ns.ip("link set lo up");
    // The underlay, on which the remote node 192.0.2.2 / 2001:db8::2 is
    // on-link: without policy routing, everything to it leaves here.
    ns.ip(&format!(
        "link add {UNDERLAY} type veth peer name {UNDERLAY}p"
    ));
    ns.ip(&format!("link set {UNDERLAY}p up"));
    ns.ip(&format!("link set {UNDERLAY} up"));
    ns.ip(&format!("addr add 192.0.2.1/24 dev {UNDERLAY}"));
    ns.ip(&format!("-6 addr add 2001:db8::1/64 dev {UNDERLAY} nodad"));
    // The local pods' gateway address, as a source to look up from.
    ns.add_link("pod0");
    ns.ip("link set pod0 up");
    ns.ip("addr add 10.99.1.1/24 dev pod0");
    ns.ip("-6 addr add fd00:99:0:1::1/64 dev pod0 nodad");
    // Someone else's rule at our priority and route in our table.
    ns.ip("rule add from 10.99.200.0/24 lookup 51820 pref 5210 proto static");
    ns.ip(&format!(
        "route add 198.51.100.0/24 dev {UNDERLAY} table 51820 proto static"
    ));

    ns.run(|ns| async move {
        let net = Net::connect().expect("connect");
        let mut spec = PolicySpec {
            local_pod_cidrs: vec![net4("10.99.1.0/24"), net4("fd00:99:0:1::/64")],
            remote_node_ips: vec![ip("192.0.2.2"), ip("2001:db8::2")],
            exempt: vec!["192.0.2.2:6443".parse().unwrap()],
            ..PolicySpec::new(WG)
        };
        let (pod4, pod6) = ("10.99.1.1", "fd00:99:0:1::1");
        let (node4, node6) = ("192.0.2.2", "2001:db8::2");
        ns.assert_route_get(&format!("{node4} from {pod4}"), UNDERLAY);
        ns.assert_route_get(&format!("{node6} from {pod6}"), UNDERLAY);

        // At agent start, before any device: backstops and rules only, and
        // pod → node traffic is dropped rather than sent in plaintext.
        let changes = net.ensure_policy(&spec).await.unwrap();
        assert!(changes.interface_missing, "{changes:?}");
        assert_eq!(
            changes.routes.added,
            vec![
                ClusterRoute::backstop(net4("192.0.2.2/32")),
                ClusterRoute::backstop(net4("2001:db8::2/128")),
            ]
        );
        assert_eq!(changes.rules_added, spec.rules());
        ns.assert_dropped_from(pod4, node4);
        ns.assert_dropped_from(pod6, node6);
        // Host traffic keeps its path without host encryption.
        ns.assert_route_get(node4, UNDERLAY);
        let rules = ns.rules();
        assert!(
            rules.iter().any(|r| r["priority"] == 5210
                && r["src"] == "10.99.1.0"
                && r["srclen"] == 24
                && r["table"] == "51820"
                && r["protocol"] == OUR_PROTO),
            "{rules:?}"
        );

        // The device appears: the device routes follow.
        ns.add_link(WG);
        net.ensure_link_up(WG, 1420).await.unwrap();
        let changes = net.ensure_policy(&spec).await.unwrap();
        assert!(!changes.interface_missing);
        assert_eq!(
            changes.routes.added,
            vec![
                ClusterRoute::device(net4("192.0.2.2/32")),
                ClusterRoute::device(net4("2001:db8::2/128")),
            ]
        );
        assert!(changes.rules_added.is_empty() && changes.rules_removed.is_empty());
        ns.assert_route_get(&format!("{node4} from {pod4}"), WG);
        ns.assert_route_get(&format!("{node6} from {pod6}"), WG);
        ns.assert_route_get(node4, UNDERLAY);

        // Steady state: nothing written.
        let monitor = Monitor::start(&ns);
        let again = net.ensure_policy(&spec).await.unwrap();
        let written = monitor.ours_between_markers(&ns);
        assert!(again.is_empty(), "{again:?}");
        assert!(written.is_empty(), "steady state wrote: {written:?}");

        // The interface goes away: the backstops keep pod → node closed.
        ns.ip(&format!("link del {WG}"));
        ns.assert_dropped_from(pod4, node4);
        ns.assert_dropped_from(pod6, node6);
        ns.add_link(WG);
        net.ensure_link_up(WG, 1420).await.unwrap();
        let changes = net.ensure_policy(&spec).await.unwrap();
        assert_eq!(changes.routes.added.len(), 2, "{changes:?}");

        // Host encryption: every source, with WireGuard's UDP and the API
        // exempt; the pod CIDR rules stay ahead of the exemptions.
        spec.encrypt_host = true;
        let changes = net.ensure_policy(&spec).await.unwrap();
        assert_eq!(changes.rules_added.len(), 5, "{changes:?}");
        assert!(changes.rules_removed.is_empty(), "{changes:?}");
        ns.assert_route_get(node4, WG);
        ns.assert_route_get(node6, WG);
        ns.assert_route_get(&format!("{node4} from {pod4}"), WG);
        ns.assert_route_get(&format!("{node4} ipproto udp sport 51820"), UNDERLAY);
        ns.assert_route_get(&format!("{node6} ipproto udp sport 51820"), UNDERLAY);
        ns.assert_route_get(&format!("{node4} ipproto tcp dport 6443"), UNDERLAY);
        ns.assert_route_get(&format!("{node4} ipproto tcp dport 22"), WG);
        // Traffic elsewhere still takes the main table.
        ns.assert_route_get("192.0.2.77", UNDERLAY);
        let again = net.ensure_policy(&spec).await.unwrap();
        assert!(again.is_empty(), "{again:?}");

        // And back.
        spec.encrypt_host = false;
        let changes = net.ensure_policy(&spec).await.unwrap();
        assert_eq!(
            (changes.rules_added.len(), changes.rules_removed.len()),
            (0, 5)
        );
        ns.assert_route_get(node4, UNDERLAY);

        // Nothing wanted: all of ours goes, nothing of anyone else's.
        let changes = net.ensure_policy(&PolicySpec::new(WG)).await.unwrap();
        assert_eq!(changes.routes.removed.len(), 4, "{changes:?}");
        assert_eq!(changes.rules_removed.len(), 2, "{changes:?}");
        assert!(ns.rules().iter().all(|r| r["protocol"] != OUR_PROTO));
        assert!(ns
            .rules()
            .iter()
            .any(|r| r["src"] == "10.99.200.0" && r["priority"] == 5210));
        let table = ns.json("route show table 51820");
        assert_eq!(table.len(), 1, "{table:?}");
        assert_eq!(table[0]["dst"], "198.51.100.0/24");
        assert!(net
            .ensure_policy(&PolicySpec::new(WG))
            .await
            .unwrap()
            .is_empty());

        let err = net
            .ensure_policy(&PolicySpec {
                table: 254,
                ..PolicySpec::new(WG)
            })
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::InvalidPolicy { .. }), "{err}");
    });
}

#[test]
fn routes_and_rules_that_bypass_the_tunnel_are_reported() {
    let Some(ns) = Netns::create("bypass") else {
        return;
    };
    ns.ip("link set lo up");
    for link in [WG, OTHER, "pod0"] {
        ns.add_link(link);
        ns.ip(&format!("link set {link} up"));
    }
    ns.ip("addr add 10.99.1.1/24 dev pod0");
    ns.ip("-6 addr add fd00:99:0:1::1/64 dev pod0 nodad");
    ns.ip(&format!(
        "route add 10.99.0.0/16 dev {WG} proto {OUR_PROTO}"
    ));
    ns.ip(&format!(
        "-6 route add fd00:99::/48 dev {WG} proto {OUR_PROTO}"
    ));
    // Legitimate: this node's own pods, and a foreign route into wgm0.
    ns.ip("route add 10.99.1.128/25 dev pod0 proto static");
    ns.ip(&format!("route add 10.99.9.0/24 dev {WG} proto static"));

    ns.run(|ns| async move {
        let net = Net::connect().expect("connect");
        let cluster = [
            Protected::ClusterCidr(net4("10.99.0.0/16")),
            Protected::ClusterCidr(net4("fd00:99::/48")),
        ];
        let local = [net4("10.99.1.0/24"), net4("fd00:99:0:1::/64")];
        // Our own policy table and rules are no bypass either.
        // With BGP mode's `iif <wg> lookup <learned table>` rules too, which
        // read back as exactly ours (a second call changes nothing).
        let spec = PolicySpec {
            local_pod_cidrs: local.to_vec(),
            remote_node_ips: vec![ip("192.0.2.2")],
            learned_table: Some(187),
            ..PolicySpec::new(WG)
        };
        net.ensure_policy(&spec).await.unwrap();
        assert!(net.ensure_policy(&spec).await.unwrap().is_empty());
        let rules = ns.ip("rule show");
        assert!(
            rules.contains(&format!("iif {WG} lookup 187 proto 87")),
            "{rules}"
        );
        let found = net.bypasses(WG, &cluster, &local).await.unwrap();
        assert!(found.is_empty(), "{found:?}");

        ns.ip(&format!("route add 10.99.7.0/24 dev {OTHER} proto static"));
        ns.ip(&format!(
            "-6 route add fd00:99:0:7::/64 dev {OTHER} proto static"
        ));
        ns.ip("rule add to 10.99.8.0/24 lookup 100 pref 1000");
        ns.ip("rule add from all lookup 200 pref 1100");
        ns.ip(&format!(
            "route add default dev {OTHER} table 200 proto static"
        ));
        let found = net.bypasses(WG, &cluster, &local).await.unwrap();
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 4, "{shown:#?}");
        assert!(
            matches!(&found[0], Bypass::MainTable { route, .. }
                if route.to_string() == "10.99.7.0/24 dev other0 proto static table main"),
            "{shown:#?}"
        );
        assert!(
            matches!(&found[1], Bypass::Rule { rule, .. }
                if rule.to_string() == "1000: from all to 10.99.8.0/24 lookup 100"),
            "{shown:#?}"
        );
        assert!(
            matches!(&found[2], Bypass::OtherTable { route, rule_priority: 1100, .. }
                if route.to_string() == "default dev other0 proto static table 200"),
            "{shown:#?}"
        );
        assert!(
            matches!(&found[3], Bypass::MainTable { route, protected, .. }
                if route.destination == net4("fd00:99:0:7::/64")
                    && *protected == Protected::ClusterCidr(net4("fd00:99::/48"))),
            "{shown:#?}"
        );
        // Reading is all it does.
        assert_eq!(net.bypasses(WG, &cluster, &local).await.unwrap(), found);

        // An extra prefix carried through the mesh (a remote gateway's) is
        // protected the same way: a foreign route inside it, and table 200's
        // default route before main, both take its traffic around the tunnel.
        ns.ip(&format!(
            "route add 192.168.77.0/25 dev {OTHER} proto static"
        ));
        let extra = Protected::ExtraPrefix(net4("192.168.77.0/24"));
        let mut with_extra = cluster.to_vec();
        with_extra.push(extra);
        let found = net.bypasses(WG, &with_extra, &local).await.unwrap();
        let shown: Vec<String> = found
            .iter()
            .filter(|b| b.protected() == extra)
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            shown,
            [
                "route `192.168.77.0/25 dev other0 proto static table main` in the main table \
                 is inside extra prefix 192.168.77.0/24 and does not go through the WireGuard \
                 interface",
                "route `default dev other0 proto static table 200` overlaps extra prefix \
                 192.168.77.0/24 outside the WireGuard interface, and rule 1100 consults its \
                 table before main",
            ]
        );
        assert_eq!(found.len(), 6, "{found:#?}");
        // Without it (this node is the prefix's gateway) the LAN route is fine.
        assert_eq!(net.bypasses(WG, &cluster, &local).await.unwrap().len(), 4);
    });
}

#[test]
fn pod_egress_is_masqueraded_except_towards_the_cluster_and_nodes() {
    if Command::new("nft").arg("--version").output().is_err() {
        skip("masquerade", "nft (Debian package nftables)");
        return;
    }
    let (Some(node), Some(pod), Some(outside)) = (
        Netns::create("masq-node"),
        Netns::create("masq-pod"),
        Netns::create("masq-out"),
    ) else {
        return;
    };
    for ns in [&node, &pod, &outside] {
        ns.ip("link set lo up");
    }
    // pod (10.99.1.2) ── node (10.99.1.1 | 203.0.113.1) ── outside (203.0.113.2)
    node.ip(&format!(
        "link add pod1 type veth peer name eth0 netns {}",
        pod.name
    ));
    node.ip(&format!(
        "link add up0 type veth peer name up0 netns {}",
        outside.name
    ));
    for (ns, link, v4, v6) in [
        (&node, "pod1", "10.99.1.1/24", "fd00:99:0:1::1/64"),
        (&pod, "eth0", "10.99.1.2/24", "fd00:99:0:1::2/64"),
        (&node, "up0", "203.0.113.1/24", "2001:db8:113::1/64"),
        (&outside, "up0", "203.0.113.2/24", "2001:db8:113::2/64"),
    ] {
        ns.ip(&format!("link set {link} up"));
        ns.ip(&format!("addr add {v4} dev {link}"));
        ns.ip(&format!("-6 addr add {v6} dev {link} nodad"));
    }
    pod.ip("route add default via 10.99.1.1");
    pod.ip("-6 route add default via fd00:99:0:1::1");
    // Behind "outside" also sit a remote pod and another node's address,
    // reached here by plain routes (in a cluster: through the tunnel).
    outside.add_link("stub0");
    outside.ip("link set stub0 up");
    for a in ["10.99.5.5/32", "198.51.100.7/32"] {
        outside.ip(&format!("addr add {a} dev stub0"));
    }
    outside.ip("-6 addr add fd00:99:0:5::5/128 dev stub0 nodad");
    outside.ip("route add 10.99.0.0/16 via 203.0.113.1");
    outside.ip("-6 route add fd00:99::/48 via 2001:db8:113::1");
    for a in ["10.99.5.0/24", "198.51.100.7/32"] {
        node.ip(&format!("route add {a} via 203.0.113.2"));
    }
    node.ip("-6 route add fd00:99:0:5::/64 via 2001:db8:113::2");
    node.add_link(WG);
    node.ip(&format!("link set {WG} up"));
    for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
        node.exec(&["sysctl", "-qw", key]);
    }
    // Someone else's table, which must survive everything.
    node.exec(&["nft", "add table inet other"]);
    node.exec(&[
        "nft",
        "add chain inet other c { type filter hook postrouting priority 0; }",
    ]);

    // The namespaces themselves stay alive (and are deleted) with this
    // frame; the body gets names.
    let (pod_ns, out_ns) = (pod.ns.clone(), outside.ns.clone());
    node.run(move |node| async move {
        let mut spec = MasqSpec {
            enabled: true,
            interface: WG.to_owned(),
            local_pod_cidrs: vec![net4("10.99.1.0/24"), net4("fd00:99:0:1::/64")],
            cluster_cidrs: vec![net4("10.99.0.0/16"), net4("fd00:99::/48")],
            node_ips: vec![ip("203.0.113.1"), ip("198.51.100.7")],
            extra_prefixes: vec![],
        };
        let rx = [out_ns.udp("0.0.0.0:4000"), out_ns.udp("[::]:4006")];
        let seen = |to: &str| seen_source(&pod_ns, &rx, to);
        // The path works, unmasqueraded.
        assert_eq!(seen("203.0.113.2"), ip("10.99.1.2"));

        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Written);
        assert_eq!(seen("203.0.113.2"), ip("203.0.113.1"));
        assert_eq!(seen("2001:db8:113::2"), ip("2001:db8:113::1"));
        // Towards the cluster and the nodes, the pod address stays.
        assert_eq!(seen("10.99.5.5"), ip("10.99.1.2"));
        assert_eq!(seen("198.51.100.7"), ip("10.99.1.2"));
        assert_eq!(seen("fd00:99:0:5::5"), ip("fd00:99:0:1::2"));
        let listing = node.exec(&["nft", "list table inet wgmesh"]);
        assert!(
            listing.contains(&format!("oifname != \"{WG}\" masquerade")),
            "{listing}"
        );

        // Steady state: nothing written (the table keeps its handle).
        let handle = table_handle(&node);
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Unchanged);
        assert_eq!(table_handle(&node), handle);

        // Tampered with: put back.
        node.exec(&["nft", "flush chain inet wgmesh postrouting"]);
        assert_eq!(seen("203.0.113.2"), ip("10.99.1.2"));
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Written);
        assert_eq!(seen("203.0.113.2"), ip("203.0.113.1"));

        // The set of cluster destinations changes.
        spec.cluster_cidrs = vec![net4("10.99.0.0/20"), net4("fd00:99::/48")];
        spec.node_ips.retain(|a| *a != ip("198.51.100.7"));
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Written);
        assert_eq!(seen("198.51.100.7"), ip("203.0.113.1"));
        assert_eq!(seen("10.99.5.5"), ip("10.99.1.2"));
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Unchanged);

        // What leaves the mesh for an extra prefix (a route-sync
        // gateway's forwarding) is masqueraded on every node, whatever it
        // is a gateway for; the rules read back equal (steady state).
        spec.extra_prefixes = vec![net4("192.0.2.0/24"), net4("2001:db8:2::/48")];
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Written);
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Unchanged);
        let listing = node.exec(&["nft", "list table inet wgmesh"]);
        assert!(
            listing.contains(&format!(
                "iifname \"{WG}\" ip daddr @extra4 ip daddr != @keep4 oifname != \"{WG}\" masquerade"
            )),
            "{listing}"
        );
        spec.extra_prefixes.clear();
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Written);

        // Disabled: our table goes, the other one stays.
        spec.enabled = false;
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Deleted);
        assert_eq!(ensure_masquerade(&spec).unwrap(), MasqChange::Unchanged);
        let tables = node.exec(&["nft", "list tables"]);
        assert!(
            !tables.contains("wgmesh") && tables.contains("inet other"),
            "{tables}"
        );
        assert_eq!(seen("203.0.113.2"), ip("10.99.1.2"));
    });
}

// ---- the namespace --------------------------------------------------------

/// A network namespace that exists from `create` until drop; derefs to the
/// [`Ns`] the case body gets.
struct Netns {
    ns: Ns,
}

/// A namespace by name: what the body of a case uses to look with `ip`.
#[derive(Clone)]
struct Ns {
    name: String,
}

impl std::ops::Deref for Netns {
    type Target = Ns;
    fn deref(&self) -> &Ns {
        &self.ns
    }
}

impl Netns {
    /// `None` (after a SKIP line) when the prerequisites are missing; panics
    /// instead when CI=true.
    fn create(case: &str) -> Option<Netns> {
        use testkit::prereq::Need;
        if let Some(missing) = testkit::prereq::missing(&[Need::Root, Need::Tool("ip")]) {
            return skip(case, &missing);
        }
        reap_stale_once();
        let name = format!("{PREFIX}{}-{case}", std::process::id());
        if let Err(e) = testkit::netns::add(&name) {
            return skip(case, &format!("network namespaces ({e})"));
        }
        Some(Netns { ns: Ns { name } })
    }

    /// Runs `body` on a thread inside the namespace, on its own runtime;
    /// a panic in it fails the case (and drops `self` on the way out).
    fn run<F, Fut>(&self, body: F)
    where
        F: FnOnce(Ns) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let ns = self.ns.clone();
        let result = thread::spawn(move || {
            // Only this thread moves; sockets it opens belong to the netns.
            testkit::netns::enter(&ns.name).unwrap_or_else(|e| panic!("setns {}: {e}", ns.name));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(60), body(ns))
                    .await
                    .expect("case timed out")
            });
        })
        .join();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Ns {
    /// Creates `name` down with MTU 1500: a dummy if the kernel has the
    /// driver, else a veth pair whose peer (`<name>p`) is up. Returns which.
    fn add_link(&self, name: &str) -> &'static str {
        if self
            .try_ip(&format!("link add {name} mtu 1500 type dummy"))
            .is_ok()
        {
            return "dummy";
        }
        self.ip(&format!(
            "link add {name} mtu 1500 type veth peer name {name}p"
        ));
        self.ip(&format!("link set {name}p up"));
        "veth"
    }

    fn try_ip(&self, args: &str) -> Result<String, testkit::CmdError> {
        testkit::netns::ip_in(&self.name, args)
    }

    fn ip(&self, args: &str) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn json(&self, args: &str) -> Vec<Value> {
        let out = self.ip(&format!("-N -j {args}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args}: {e}: {out}"))
    }

    fn link(&self, name: &str) -> Value {
        self.json(&format!("link show {name}")).remove(0)
    }

    /// The main table, both families.
    fn routes(&self) -> Vec<Value> {
        let mut all = self.json("-4 route show table main");
        all.extend(self.json("-6 route show table main"));
        all
    }

    /// Every route not of our protocol, as (dst, dev, protocol), sorted.
    fn foreign_routes(&self) -> Vec<(String, String, String)> {
        let mut foreign: Vec<_> = self
            .routes()
            .iter()
            .filter(|r| r["protocol"] != OUR_PROTO)
            .map(|r| (s(&r["dst"]), s(&r["dev"]), s(&r["protocol"])))
            .collect();
        foreign.sort();
        foreign
    }

    /// Every route of `before` is still there, unchanged. (Bringing links up
    /// adds kernel routes such as fe80::/64, hence not equality.)
    fn assert_survived(&self, before: &[(String, String, String)]) {
        let now = self.foreign_routes();
        let gone: Vec<_> = before.iter().filter(|r| !now.contains(r)).collect();
        assert!(
            gone.is_empty(),
            "foreign routes gone or changed: {gone:?}; now: {now:?}"
        );
    }

    /// Our routes are exactly the device route and the backstop of each
    /// CIDR in `expected`.
    fn assert_ours(&self, expected: &[IpNet]) {
        self.assert_ours_exactly(expected, expected);
    }

    /// Our routes are exactly a device route per CIDR in `device` (`dev
    /// wgm0`, unicast, scope link on IPv4, the default metric) and a backstop
    /// per CIDR in `backstop` (blackhole, metric 4096; on IPv6 the kernel
    /// shows it on `lo`).
    fn assert_ours_exactly(&self, device: &[IpNet], backstop: &[IpNet]) {
        let routes = self.routes();
        let ours: Vec<&Value> = routes
            .iter()
            .filter(|r| r["protocol"] == OUR_PROTO)
            .collect();
        // With -N, iproute2 shows the type by number (RTN_BLACKHOLE = 6).
        let (blackholes, devices): (Vec<&Value>, Vec<&Value>) = ours
            .iter()
            .partition(|r| r["type"] == "blackhole" || r["type"] == "6");
        let sorted = |routes: &[&Value]| {
            let mut dsts: Vec<String> = routes.iter().map(|r| s(&r["dst"])).collect();
            dsts.sort();
            dsts
        };
        let want = |nets: &[IpNet]| {
            let mut want: Vec<String> = nets.iter().map(IpNet::to_string).collect();
            want.sort();
            want
        };
        assert_eq!(sorted(&devices), want(device), "our routes: {ours:?}");
        assert_eq!(sorted(&blackholes), want(backstop), "our routes: {ours:?}");
        for r in devices {
            let v6 = s(&r["dst"]).contains(':');
            assert_eq!(r["dev"], WG, "{r}");
            assert!(r.get("gateway").is_none() && r.get("type").is_none(), "{r}");
            if v6 {
                assert_eq!(r["metric"], 1024, "{r}");
            } else {
                assert_eq!(r["scope"], "253", "scope link: {r}");
                assert!(r.get("metric").is_none(), "{r}");
            }
        }
        for r in blackholes {
            let v6 = s(&r["dst"]).contains(':');
            assert_eq!(r["metric"], BACKSTOP_METRIC, "{r}");
            assert!(r.get("gateway").is_none(), "{r}");
            if v6 {
                assert_eq!(r["dev"], "lo", "{r}");
            } else {
                assert!(r.get("dev").is_none() && r.get("scope").is_none(), "{r}");
            }
        }
    }

    /// `ip route get addr` answers with a route out of `dev`.
    fn assert_leaves_through(&self, addr: &str, dev: &str) {
        let out = self
            .try_ip(&format!("route get {addr}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains(&format!(" dev {dev} ")), "{addr}: {out}");
    }

    /// Traffic to `addr` is dropped here: the lookup ends at a blackhole
    /// (iproute2 prints it, or the kernel answers EINVAL, depending on the
    /// version), and a datagram to it is refused at `sendto` instead of
    /// leaving. Must run on the namespace's thread (the socket is opened
    /// in the calling thread's namespace).
    fn assert_dropped(&self, addr: &str) {
        match self.try_ip(&format!("route get {addr}")) {
            Ok(out) => assert!(out.starts_with("blackhole"), "{addr} is routed: {out}"),
            Err(e) => assert!(e.to_string().contains("Invalid argument"), "{addr}: {e}"),
        }
        let ip: IpAddr = addr.parse().unwrap();
        let any: SocketAddr = if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .unwrap();
        let socket = UdpSocket::bind(any).expect("bind");
        let err = socket
            .send_to(b"plaintext?", (ip, 9))
            .expect_err("a datagram to a cluster address was sent");
        assert!(
            matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENETUNREACH)),
            "{addr}: {err}"
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        testkit::netns::del(&self.name);
    }
}

const PREFIX: &str = "wgnr-";

fn skip(case: &str, missing: &str) -> Option<Netns> {
    testkit::prereq::skip_or_fail(&format!("net_routes {case}"), missing);
    None
}

/// Deletes namespaces of earlier runs whose process is gone.
fn reap_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                testkit::netns::del(&name);
            }
        }
    });
}

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// Whether an `ip -N monitor route` line is about the backstop of `cidr`
/// (with -N the type shows as a number: `6 fd00:99::/48 dev lo proto 87
/// metric 4096`).
fn is_backstop_line(line: &str, cidr: IpNet) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let dst = cidr.to_string();
    words.iter().position(|w| *w == dst).is_some_and(|i| {
        i > 0
            && matches!(words[i - 1], "blackhole" | "6")
            && line.contains(&format!(" metric {BACKSTOP_METRIC}"))
    })
}

fn has_flag(link: &Value, flag: &str) -> bool {
    link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == flag))
}

// ---- watching for writes --------------------------------------------------

/// `ip monitor route` in the namespace. Everything the code under test writes
/// between two marker events (blackhole routes in 198.18.0.0/15 we add
/// ourselves) shows up
/// between the markers, so "nothing of ours between them" proves no write,
/// without sleeping.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    fn start(ns: &Ns) -> Monitor {
        let mut child = Command::new("ip")
            .args(["-n", &ns.name, "-N", "monitor", "route", "rule"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip monitor");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let monitor = Monitor { child, lines };
        // The monitor is listening once it has seen the first marker; keep
        // adding markers until one shows up (the first may precede it).
        for _ in 0..50 {
            let marker = monitor.mark(ns);
            if monitor
                .wait_for(&marker, Duration::from_millis(200))
                .is_some()
            {
                return monitor;
            }
        }
        panic!("ip monitor saw none of its markers");
    }

    fn mark(&self, ns: &Ns) -> String {
        // Unique in the process, so a second monitor in a case cannot clash.
        static MARKERS: AtomicU32 = AtomicU32::new(1);
        let n = MARKERS.fetch_add(1, Ordering::Relaxed);
        let marker = format!("198.18.{}.{}", (n >> 8) & 0xff, n & 0xff);
        ns.ip(&format!("route add blackhole {marker}/32 proto static"));
        marker
    }

    /// The lines seen before `marker`, or `None` on timeout.
    fn wait_for(&self, marker: &str, timeout: Duration) -> Option<Vec<String>> {
        let mut before = Vec::new();
        loop {
            let line = self.lines.recv_timeout(timeout).ok()?;
            if line.contains(&format!("{marker} ")) {
                return Some(before);
            }
            before.push(line);
        }
    }

    /// Ends the window: the route messages of our protocol since `start`.
    /// (Not every line: IPv6 address autoconfiguration adds fe80 routes
    /// whenever it pleases. Links are not watched: the kernel announces no
    /// event for a no-op link change, so silence would prove nothing.)
    fn ours_between_markers(&self, ns: &Ns) -> Vec<String> {
        let marker = self.mark(ns);
        let seen = self
            .wait_for(&marker, Duration::from_secs(10))
            .expect("closing marker");
        seen.into_iter()
            .filter(|l| l.contains(&format!("proto {OUR_PROTO}")))
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- policy routing and masquerade helpers ---------------------------------

fn net4(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The source address `rx` (bound in "outside": IPv4 port 4000, IPv6 port
/// 4006) sees on a datagram the pod sends to `to`, from a fresh socket each
/// time (a new conntrack entry, so the NAT decision is made anew).
fn seen_source(pod: &Ns, rx: &[UdpSocket; 2], to: &str) -> IpAddr {
    let to = ip(to);
    let (any, port, rx) = if to.is_ipv4() {
        ("0.0.0.0", 4000, &rx[0])
    } else {
        ("[::]", 4006, &rx[1])
    };
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = pod.udp(&format!("{any}:0"));
    let probe = format!("from {}", tx.local_addr().unwrap());
    tx.send_to(probe.as_bytes(), (to, port)).expect("send");
    let mut buf = [0; 64];
    loop {
        let (n, from) = rx.recv_from(&mut buf).expect("datagram arrives");
        // Only this probe's datagram counts.
        if buf[..n] == *probe.as_bytes() {
            return from.ip();
        }
    }
}

fn table_handle(node: &Ns) -> Value {
    let out = node.exec(&["nft", "-j", "list", "table", "inet", "wgmesh"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|o| o.get("table").map(|t| t["handle"].clone()))
        .unwrap()
}

impl Ns {
    /// Runs `f` on a thread inside this namespace; sockets it opens belong
    /// to the namespace for good.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        thread::spawn(move || {
            testkit::netns::enter(&name).unwrap_or_else(|e| panic!("setns {name}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    fn udp(&self, bind: &str) -> UdpSocket {
        let bind: SocketAddr = bind.parse().unwrap();
        self.within(move || UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}")))
    }

    /// `ip netns exec NS args…`, its stdout; panics on failure.
    fn exec(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Both families' rules.
    fn rules(&self) -> Vec<Value> {
        let mut all = self.json("-4 rule show");
        all.extend(self.json("-6 rule show"));
        all
    }

    /// `ip route get <query>` leaves through `dev`.
    fn assert_route_get(&self, query: &str, dev: &str) {
        let out = self
            .try_ip(&format!("route get {query}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.contains(&format!(" dev {dev} ")), "{query}: {out}");
    }

    /// Like [`Ns::assert_dropped`], from the local address `src`.
    fn assert_dropped_from(&self, src: &str, addr: &str) {
        match self.try_ip(&format!("route get {addr} from {src}")) {
            Ok(out) => assert!(out.starts_with("blackhole"), "{addr} is routed: {out}"),
            Err(e) => assert!(e.to_string().contains("Invalid argument"), "{addr}: {e}"),
        }
        let socket = UdpSocket::bind((ip(src), 0)).expect("bind");
        let err = socket
            .send_to(b"plaintext?", (ip(addr), 9))
            .expect_err("a datagram to a node address was sent");
        assert!(
            matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENETUNREACH)),
            "{addr}: {err}"
        );
    }
}
