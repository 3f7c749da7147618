//! Policy routing for the traffic the main table cannot send into WireGuard,
//! and detection of routes and rules that would let cluster traffic (or an
//! extra prefix carried through the mesh) bypass it (shared/DESIGN.md, "Data
//! path").
//!
//! The main table routes destinations. That is enough for pod → remote pod
//! (the cluster CIDR routes of [`super::Net::ensure_routes`]), but not for
//! pod → remote *node* address: the node addresses are also the underlay
//! endpoints, so the main table must keep sending them out of the underlay,
//! where the WireGuard UDP itself goes. What tells the two apart is the
//! source, which only an `ip rule` can look at:
//!
//! - a table of our own ([`DEFAULT_POLICY_TABLE`]) holds, per remote node
//!   address, `<ip>/32 dev <wg> proto 87` and its backstop `blackhole <ip>/32
//!   metric 4096 proto 87` (the same pair, for the same reason, as the main
//!   table's cluster routes: the kernel flushes the device route with the
//!   device, the blackhole stays);
//! - `from <local pod cidr> lookup <table>` per local pod CIDR, at
//!   [`DEFAULT_POLICY_PRIORITY`], ahead of `main` (32766). Destinations the
//!   table does not hold fall through to the next rule, so only pod traffic
//!   to node addresses changes path. The WireGuard UDP comes from the node
//!   address and matches no such rule.
//!
//! With host encryption a catch-all, `lookup <table>` for every source, at
//! `priority + 2` puts node → node host traffic into the tunnel too. Two
//! kinds of traffic must not go there, or the mesh locks itself out; rules
//! at `priority + 1` send them to `main` first:
//!
//! - WireGuard's own UDP: `ipproto udp sport <listen port> lookup main`;
//! - the agent's API traffic: `to <ip> ipproto tcp dport <port> lookup main`
//!   per API server address.
//!
//! The pod CIDR rules stay at `priority`, ahead of the exemptions, in both
//! modes: a pod that happens to use the WireGuard port as its source port
//! is still pod traffic, and switching modes never touches the pod path.
//! (The catch-all also could not share the pod rules' priority: the
//! kernel's duplicate check ignores selectors the new rule leaves unset, so
//! it takes `from all lookup T pref P` for a copy of `from X lookup T pref
//! P` and answers EEXIST.)
//!
//! Those selectors (FRA_IP_PROTO, FRA_SPORT_RANGE, FRA_DPORT_RANGE) and the
//! rule protocol (FRA_PROTOCOL) are Linux 4.17. On an older kernel the
//! selectors would be dropped silently and the exemption would become
//! `lookup main` for everything, so host encryption is refused there
//! ([`NetError::HostEncryptionUnsupported`]); the kernel's lack of
//! FRA_PROTOCOL in its rule dump is how that is told.
//!
//! Reverse-path filtering keeps working: once a rule with port selectors
//! exists the kernel dissects ports for rule lookups, and the reverse lookup
//! of `rp_filter` swaps them, so a peer's WireGuard UDP (destination port =
//! our listen port) validates against `main` and the underlay; pod replies
//! that a remote node sends through the tunnel validate against our table
//! and the WireGuard interface.
//!
//! Ownership: routes of [`ROUTE_PROTOCOL`] in our table, and rules of that
//! protocol at our three priorities (`priority` to `priority + 2`). Nothing
//! else is ever deleted or modified: other tables, other protocols, other
//! priorities. (So after a change of the configured table or priority, the
//! old table's routes and rules are left behind; they are inert once nothing
//! points at them, and `ip route flush table N proto 87` / `ip rule del
//! pref N` remove them.)
//!
//! The pure half — [`plan_rules`], [`find_bypasses`] and the parsing of
//! dumped messages — does no I/O; the `impl Net` at the end reads, plans and
//! writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType, RouteVia,
};
use rtnetlink::packet_route::rule::{
    RuleAction, RuleAttribute, RuleFlags, RuleMessage, RulePortRange,
};
use rtnetlink::packet_route::{AddressFamily, IpProtocol};
use rtnetlink::IpVersion;

use super::routes::{self, Device, RouteEntry};
use super::{
    errno, protocol_name, ClusterRoute, Net, NetError, Result, RouteChanges, RouteKind,
    ROUTE_PROTOCOL,
};

/// The default number of wgmesh's routing table: the WireGuard port, which
/// wg-quick uses for its table too (a host running both would need one of
/// them configured away; the planner reports foreign routes there as
/// conflicts and leaves them alone).
pub const DEFAULT_POLICY_TABLE: u32 = 51820;

/// The default priority of wgmesh's `from <pod cidr> lookup <table>` rules;
/// host encryption adds rules at the next two. Well before `main` (32766), after
/// `local` (0), and clear of the values other software is known to use
/// (Cilium 9/10/100, Calico 99/100, wg-quick and Tailscale 5210-5270 and
/// 32764-32765 — 5210 is Tailscale's first; only a host running both would
/// have to move one).
pub const DEFAULT_POLICY_PRIORITY: u32 = 5210;

/// What [`Net::ensure_policy`] makes true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// The WireGuard interface. It may be missing or down: then only the
    /// backstops and the rules are ensured (fail closed before the device
    /// exists), and the device routes follow on a later call.
    pub interface: String,
    /// Our routing table: 1–4294967295 except 253 (default), 254 (main) and
    /// 255 (local).
    pub table: u32,
    /// The priority of the `from <pod cidr> lookup <table>` rules; host
    /// encryption's exemptions use `priority + 1` and its catch-all
    /// `priority + 2`. 1–32763 (all three before `main` at 32766).
    pub priority: u32,
    /// The local node's pod CIDRs: the sources of `from <cidr> lookup
    /// <table>`.
    pub local_pod_cidrs: Vec<IpNet>,
    /// Every other node's addresses: a host route into the interface each.
    pub remote_node_ips: Vec<IpAddr>,
    /// This node's own addresses: the preferred source (per family) of the
    /// table's routes, so that host traffic through the tunnel keeps the
    /// node address (the interface itself carries the pod gateway address,
    /// which the kernel would pick otherwise).
    pub local_node_ips: Vec<IpAddr>,
    /// Node ↔ node host traffic through the tunnel too (`lookup <table>`
    /// for every source), with the exemptions below.
    pub encrypt_host: bool,
    /// WireGuard's UDP port, exempt with host encryption (must not be 0
    /// then).
    pub listen_port: u16,
    /// API server addresses, exempt (TCP to the address and port) with host
    /// encryption.
    pub exempt: Vec<SocketAddr>,
    /// BGP mode: the kernel table BIRD delivers learned routes to. Traffic
    /// arriving from the mesh (`iif <interface>`) looks it up first
    /// (`priority + 1`), so a gateway forwards its peers' traffic to the
    /// fabric's prefixes; with no route there the lookup falls through.
    pub learned_table: Option<u32>,
}

impl PolicySpec {
    /// A spec with the default table and priority and nothing to route: as
    /// given to [`Net::ensure_policy`], it removes everything of ours.
    pub fn new(interface: impl Into<String>) -> PolicySpec {
        PolicySpec {
            interface: interface.into(),
            table: DEFAULT_POLICY_TABLE,
            priority: DEFAULT_POLICY_PRIORITY,
            local_pod_cidrs: Vec::new(),
            remote_node_ips: Vec::new(),
            local_node_ips: Vec::new(),
            encrypt_host: false,
            listen_port: 51820,
            exempt: Vec::new(),
            learned_table: None,
        }
    }

    /// The rules this spec wants, in the order they are added: pod CIDR
    /// rules, then host encryption's exemptions, then its catch-all.
    pub fn rules(&self) -> Vec<PolicyRule> {
        let mut families = BTreeSet::new();
        families.extend(self.remote_node_ips.iter().map(|a| a.is_ipv6()));
        families.extend(self.local_pod_cidrs.iter().map(|c| c.addr().is_ipv6()));
        let mut rules = BTreeSet::new();
        let rule = |v6, selector, priority, table| PolicyRule {
            v6,
            priority,
            selector,
            table,
        };
        let main = u32::from(RouteHeader::RT_TABLE_MAIN);
        for cidr in &self.local_pod_cidrs {
            let from = RuleSelector::From(cidr.trunc());
            rules.insert(rule(from.v6(), from, self.priority, self.table));
        }
        if self.encrypt_host {
            for &v6 in &families {
                rules.insert(rule(
                    v6,
                    RuleSelector::WireGuardUdp(self.listen_port),
                    self.priority + 1,
                    main,
                ));
                rules.insert(rule(v6, RuleSelector::All, self.priority + 2, self.table));
            }
            for &api in &self.exempt {
                if families.contains(&api.is_ipv6()) {
                    let api = RuleSelector::Api(api);
                    rules.insert(rule(api.v6(), api, self.priority + 1, main));
                }
            }
        }
        if let Some(table) = self.learned_table {
            for v6 in [false, true] {
                rules.insert(rule(
                    v6,
                    RuleSelector::Iif(self.interface.clone()),
                    self.priority + 1,
                    table,
                ));
            }
        }
        rules.into_iter().collect()
    }

    fn validate(&self) -> Result<()> {
        let reason = if matches!(self.table, 0 | 253..=255) {
            Some(format!(
                "table {} is reserved (0 unspec, 253 default, 254 main, 255 local)",
                self.table
            ))
        } else if !(1..=32763).contains(&self.priority) {
            Some(format!(
                "rule priority {} is outside 1-32763 (it and the two after it must come before main at 32766)",
                self.priority
            ))
        } else if self.encrypt_host && self.listen_port == 0 {
            Some("host encryption needs a fixed WireGuard listen port to exempt".to_owned())
        } else {
            self.learned_table
                .filter(|t| matches!(t, 0 | 253..=255) || *t == self.table)
                .map(|t| {
                    format!(
                        "BGP table {t} is reserved or is wgmesh's own policy table {}",
                        self.table
                    )
                })
        };
        match reason {
            Some(reason) => Err(NetError::InvalidPolicy { reason }),
            None => Ok(super::check_interface_name(&self.interface)?),
        }
    }
}

/// One rule wgmesh wants, always `lookup`, always protocol 87.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    // Field order is the sort order: exemptions before the rules they
    // exempt from, so a caller adding in order never has a gap.
    pub priority: u32,
    pub v6: bool,
    pub selector: RuleSelector,
    pub table: u32,
}

/// What a [`PolicyRule`] matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleSelector {
    /// `from <cidr>`: the local pods.
    From(IpNet),
    /// Every source (host encryption).
    All,
    /// `ipproto udp sport <port>`: WireGuard's own UDP.
    WireGuardUdp(u16),
    /// `to <ip> ipproto tcp dport <port>`: the agent's API traffic.
    Api(SocketAddr),
    /// `iif <interface>`: traffic arriving from the mesh (BGP mode).
    Iif(String),
}

impl RuleSelector {
    fn v6(&self) -> bool {
        match self {
            RuleSelector::From(c) => c.addr().is_ipv6(),
            RuleSelector::Api(a) => a.is_ipv6(),
            RuleSelector::All | RuleSelector::WireGuardUdp(_) | RuleSelector::Iif(_) => false,
        }
    }
}

impl fmt::Display for PolicyRule {
    /// `ip rule` syntax: `5210: from 10.244.1.0/24 lookup 51820 proto 87`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        RuleView::from(self).fmt(f)
    }
}

/// A rule as the kernel reports it, in the terms `ip rule` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleView {
    pub v6: bool,
    pub priority: u32,
    /// `None`: from all.
    pub source: Option<IpNet>,
    pub destination: Option<IpNet>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    /// (mark, mask)
    pub fwmark: Option<(u32, u32)>,
    pub ip_proto: Option<u8>,
    pub sport: Option<(u16, u16)>,
    pub dport: Option<(u16, u16)>,
    /// `not`.
    pub invert: bool,
    /// `None` when the action is not a table lookup.
    pub table: Option<u32>,
    /// FRA_PROTOCOL; `None` on kernels before 4.17, which do not keep it.
    pub protocol: Option<u8>,
    /// `suppress_prefixlength N`.
    pub suppress_prefixlen: Option<u32>,
    /// Any selector not modelled above (uid range, tos, l3mdev, tunnel id,
    /// suppress_ifgroup…), or an action other than lookup: never exactly a
    /// rule of ours.
    pub other: bool,
}

impl From<&PolicyRule> for RuleView {
    fn from(rule: &PolicyRule) -> RuleView {
        let mut view = RuleView {
            v6: rule.v6,
            priority: rule.priority,
            source: None,
            destination: None,
            iif: None,
            oif: None,
            fwmark: None,
            ip_proto: None,
            sport: None,
            dport: None,
            invert: false,
            table: Some(rule.table),
            protocol: Some(ROUTE_PROTOCOL),
            suppress_prefixlen: None,
            other: false,
        };
        match &rule.selector {
            RuleSelector::From(cidr) => view.source = Some(*cidr),
            RuleSelector::All => {}
            RuleSelector::WireGuardUdp(port) => {
                view.ip_proto = Some(libc::IPPROTO_UDP as u8);
                view.sport = Some((*port, *port));
            }
            RuleSelector::Iif(name) => view.iif = Some(name.clone()),
            RuleSelector::Api(api) => {
                view.destination = Some(IpNet::from(api.ip()));
                view.ip_proto = Some(libc::IPPROTO_TCP as u8);
                view.dport = Some((api.port(), api.port()));
            }
        }
        view
    }
}

impl fmt::Display for RuleView {
    /// `ip rule` syntax; an address-less IPv6 rule says `from ::/0`, so the
    /// family shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.priority)?;
        if self.invert {
            write!(f, " not")?;
        }
        match (self.source, self.v6) {
            (Some(s), _) => write!(f, " from {}", host_or_net(s))?,
            (None, false) => write!(f, " from all")?,
            (None, true) => write!(f, " from ::/0")?,
        }
        if let Some(d) = self.destination {
            write!(f, " to {}", host_or_net(d))?;
        }
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        if let Some(oif) = &self.oif {
            write!(f, " oif {oif}")?;
        }
        if let Some((mark, mask)) = self.fwmark {
            write!(f, " fwmark {mark:#x}/{mask:#x}")?;
        }
        if let Some(p) = self.ip_proto {
            match i32::from(p) {
                libc::IPPROTO_TCP => write!(f, " ipproto tcp")?,
                libc::IPPROTO_UDP => write!(f, " ipproto udp")?,
                _ => write!(f, " ipproto {p}")?,
            }
        }
        for (word, range) in [("sport", self.sport), ("dport", self.dport)] {
            match range {
                Some((a, b)) if a == b => write!(f, " {word} {a}")?,
                Some((a, b)) => write!(f, " {word} {a}-{b}")?,
                None => {}
            }
        }
        match self.table {
            Some(t) => write!(f, " lookup {}", table_name(t))?,
            None => write!(f, " (no lookup)")?,
        }
        if let Some(n) = self.suppress_prefixlen {
            write!(f, " suppress_prefixlength {n}")?;
        }
        // iproute2 shows no protocol for 0 (unspec), which `ip rule add`
        // without `proto` gives.
        if let Some(p) = self.protocol.filter(|&p| p != 0) {
            write!(f, " proto {}", protocol_name(p))?;
        }
        Ok(())
    }
}

/// What [`Net::ensure_policy`] did; empty when nothing differed (and then
/// nothing was written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    /// Our table's routes: the device route and backstop per remote node
    /// address (a /32 or /128 each). `conflicts` names foreign routes in our
    /// table at those addresses, which are left alone.
    pub routes: RouteChanges,
    pub rules_added: Vec<PolicyRule>,
    /// Rules of ours no longer wanted (or duplicates), as they were.
    pub rules_removed: Vec<RuleView>,
    /// The interface was missing or down, so no device route was written
    /// (the backstops and rules were): node addresses are dropped, not
    /// leaked, until a later call with the interface up.
    pub interface_missing: bool,
}

impl PolicyChanges {
    /// No netlink write happened.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.rules_added.is_empty() && self.rules_removed.is_empty()
    }
}

impl fmt::Display for PolicyChanges {
    /// `routes: added 2 (1 backstop), …; rules: added 1, removed 0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "routes: {}; rules: added {}, removed {}",
            self.routes,
            self.rules_added.len(),
            self.rules_removed.len()
        )?;
        if self.interface_missing {
            write!(f, "; interface missing or down: backstops only")?;
        }
        Ok(())
    }
}

/// A destination whose traffic must go through the WireGuard interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protected {
    /// A cluster pod CIDR (`--cluster-cidrs`).
    ClusterCidr(IpNet),
    /// An extra prefix (a `MeshRoute` grant) that this node reaches through
    /// a remote gateway's peer, or holds in the tunnel while no gateway is
    /// healthy. A prefix this node is a gateway for is not protected here:
    /// it leaves through the node's own LAN.
    ExtraPrefix(IpNet),
}

impl Protected {
    pub fn prefix(&self) -> IpNet {
        match *self {
            Protected::ClusterCidr(n) | Protected::ExtraPrefix(n) => n,
        }
    }
}

impl fmt::Display for Protected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protected::ClusterCidr(n) => write!(f, "cluster CIDR {n}"),
            Protected::ExtraPrefix(n) => write!(f, "extra prefix {n}"),
        }
    }
}

/// A route or rule wgmesh did not create that makes traffic to a
/// [`Protected`] destination bypass the WireGuard interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bypass {
    /// A main-table route inside a protected prefix (more specific than, or
    /// equal to, our route), not into the interface and not inside a local
    /// pod CIDR: it wins over our route by longest prefix (or metric).
    MainTable {
        route: RouteView,
        protected: Protected,
    },
    /// A route in another table that a rule consults before `main`,
    /// overlapping a protected prefix (inside it or covering it, like a
    /// default route): that table answers first.
    OtherTable {
        route: RouteView,
        protected: Protected,
        /// The priority of the first rule that sends traffic there.
        rule_priority: u32,
    },
    /// A rule before `main` whose destination selector overlaps a protected
    /// prefix and sends it to another table (whatever that table holds now).
    Rule {
        rule: RuleView,
        protected: Protected,
    },
}

impl Bypass {
    pub fn protected(&self) -> Protected {
        match self {
            Bypass::MainTable { protected, .. }
            | Bypass::OtherTable { protected, .. }
            | Bypass::Rule { protected, .. } => *protected,
        }
    }
}

impl fmt::Display for Bypass {
    /// Names the route or rule in `ip route` / `ip rule` syntax and why it
    /// matters, for a log line or an Event.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bypass::MainTable { route, protected } => write!(
                f,
                "route `{route}` in the main table is inside {protected} \
                 and does not go through the WireGuard interface"
            ),
            Bypass::OtherTable {
                route,
                protected,
                rule_priority,
            } => write!(
                f,
                "route `{route}` overlaps {protected} outside the WireGuard \
                 interface, and rule {rule_priority} consults its table before main"
            ),
            Bypass::Rule { rule, protected } => write!(
                f,
                "rule `{rule}` sends destinations in {protected} to another \
                 table before main"
            ),
        }
    }
}

/// A route as `ip route` shows it (only unicast routes are ever reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub table: u32,
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    /// The output interface's name, or `if#N` if it has none we know.
    pub interface: Option<String>,
    pub protocol: u8,
    pub metric: Option<u32>,
    /// Several next hops (`nexthop via … nexthop via …`), none shown.
    pub multipath: bool,
}

impl fmt::Display for RouteView {
    /// `10.244.7.0/24 via 192.0.2.9 dev eth1 proto static metric 10 table 200`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.prefix_len() == 0 {
            write!(f, "default")?;
        } else {
            write!(f, "{}", host_or_net(self.destination))?;
        }
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.interface {
            write!(f, " dev {dev}")?;
        }
        if self.multipath {
            write!(f, " nexthop …")?;
        }
        write!(f, " proto {}", protocol_name(self.protocol))?;
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        write!(f, " table {}", table_name(self.table))
    }
}

// ---- the pure half ----------------------------------------------------------

/// One dumped rule: what it means, and the message itself (a delete sends
/// it back, as `ip rule flush` does, so it matches exactly that rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleEntry {
    pub view: RuleView,
    pub message: RuleMessage,
}

impl RuleEntry {
    pub fn from_message(msg: &RuleMessage) -> Option<RuleEntry> {
        let h = &msg.header;
        let v6 = match h.family {
            AddressFamily::Inet => false,
            AddressFamily::Inet6 => true,
            _ => return None,
        };
        let mut view = RuleView {
            v6,
            priority: 0,
            source: None,
            destination: None,
            iif: None,
            oif: None,
            fwmark: None,
            ip_proto: None,
            sport: None,
            dport: None,
            invert: h.flags.contains(RuleFlags::Invert),
            table: None,
            protocol: None,
            suppress_prefixlen: None,
            other: h.tos != 0,
        };
        let mut table = u32::from(h.table);
        let mut mark = None;
        let mut mask = u32::MAX;
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => view.priority = *p,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Source(a) => view.source = IpNet::new(*a, h.src_len).ok(),
                RuleAttribute::Destination(a) => view.destination = IpNet::new(*a, h.dst_len).ok(),
                RuleAttribute::Iifname(n) => view.iif = Some(n.clone()),
                RuleAttribute::Oifname(n) => view.oif = Some(n.clone()),
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = *m,
                RuleAttribute::Protocol(p) => view.protocol = Some(u8::from(*p)),
                RuleAttribute::IpProtocol(p) => view.ip_proto = Some(u8::from(*p)),
                RuleAttribute::SourcePortRange(r) => view.sport = Some((r.start, r.end)),
                RuleAttribute::DestinationPortRange(r) => view.dport = Some((r.start, r.end)),
                // The kernel reports "unset" as -1.
                RuleAttribute::SuppressPrefixLen(n) => {
                    view.suppress_prefixlen = Some(*n).filter(|&n| n != u32::MAX)
                }
                RuleAttribute::SuppressIfGroup(g) if *g == u32::MAX => {}
                RuleAttribute::L3MDev(false) => {}
                RuleAttribute::Goto(_)
                | RuleAttribute::Realm(_)
                | RuleAttribute::TunId(_)
                | RuleAttribute::SuppressIfGroup(_)
                | RuleAttribute::L3MDev(true)
                | RuleAttribute::UidRange(_) => view.other = true,
                _ => {}
            }
        }
        // A fwmark rule with mark 0 and no mask is still a selector; the
        // kernel reports the mask whenever the mark is set.
        view.fwmark = mark.filter(|&m| m != 0 || mask != 0).map(|m| (m, mask));
        if h.action == RuleAction::ToTable {
            view.table = Some(table);
        } else {
            view.other = true;
        }
        Some(RuleEntry {
            view,
            message: msg.clone(),
        })
    }

    fn is_exactly(&self, rule: &PolicyRule) -> bool {
        let v = &self.view;
        let want = RuleView::from(rule);
        // A kernel without FRA_PROTOCOL keeps none; see plan_rules.
        v.protocol.is_none_or(|p| p == ROUTE_PROTOCOL)
            && RuleView {
                protocol: want.protocol,
                ..v.clone()
            } == want
    }

    /// Ours to delete: our protocol at one of our priorities. A rule without
    /// any protocol (kernel before 4.17) is never deleted: nothing tells
    /// whose it is.
    fn is_ours(&self, priorities: [u32; 3]) -> bool {
        self.view.protocol == Some(ROUTE_PROTOCOL) && priorities.contains(&self.view.priority)
    }

    /// Whether this rule has no selector: it applies to all traffic.
    fn matches_everything(&self) -> bool {
        let v = &self.view;
        v.source.is_none_or(|s| s.prefix_len() == 0)
            && v.destination.is_none_or(|d| d.prefix_len() == 0)
            && v.iif.is_none()
            && v.oif.is_none()
            && v.fwmark.is_none()
            && v.ip_proto.is_none()
            && v.sport.is_none()
            && v.dport.is_none()
            && !v.invert
            && !v.other
    }
}

/// The rule writes between what exists and what `spec` wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RulePlan {
    /// Ascending priority: exemptions before the catch-all they exempt from.
    pub add: Vec<PolicyRule>,
    /// Descending priority: the catch-all goes before its exemptions.
    pub delete: Vec<RuleEntry>,
}

/// Plans the rules: every wanted rule not there exactly is added; every
/// rule of ours (protocol 87, at `priority` to `priority + 2`) that is not
/// wanted, or is a second copy of a wanted one, is deleted. Rules are never
/// modified in place (the kernel has no atomic rule replace); adds go
/// before deletes, so a rule that changes shape never leaves a gap.
///
/// On a kernel without FRA_PROTOCOL (before 4.17) a rule we added comes
/// back with no protocol; it still counts as ours when it is exactly a
/// wanted rule (so it is not added twice), but is never deleted.
pub(crate) fn plan_rules(existing: &[RuleEntry], wanted: &[PolicyRule], priority: u32) -> RulePlan {
    let priorities = [priority, priority + 1, priority + 2];
    let mut kept = vec![false; existing.len()];
    let mut plan = RulePlan::default();
    let wanted: BTreeSet<&PolicyRule> = wanted.iter().collect();
    for rule in &wanted {
        match existing
            .iter()
            .enumerate()
            .find(|(i, e)| !kept[*i] && e.is_exactly(rule))
        {
            Some((i, _)) => kept[i] = true,
            None => plan.add.push((*rule).clone()),
        }
    }
    plan.delete = existing
        .iter()
        .zip(&kept)
        .filter(|(e, kept)| !**kept && e.is_ours(priorities))
        .map(|(e, _)| e.clone())
        .collect();
    plan.add.sort();
    plan.delete
        .sort_by_key(|e| std::cmp::Reverse(e.view.priority));
    plan
}

/// The message that adds (or deletes) `rule`.
pub(crate) fn rule_message(rule: &PolicyRule) -> RuleMessage {
    let view = RuleView::from(rule);
    let mut msg = RuleMessage::default();
    let h = &mut msg.header;
    h.family = if rule.v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    h.action = RuleAction::ToTable;
    // Tables above 255 only fit FRA_TABLE, which wins; the header says
    // RT_TABLE_COMPAT (252) then, as iproute2 does.
    h.table = u8::try_from(rule.table).unwrap_or(252);
    let a = &mut msg.attributes;
    a.push(RuleAttribute::Priority(rule.priority));
    a.push(RuleAttribute::Table(rule.table));
    a.push(RuleAttribute::Protocol(ROUTE_PROTOCOL.into()));
    if let Some(src) = view.source {
        h.src_len = src.prefix_len();
        a.push(RuleAttribute::Source(src.addr()));
    }
    if let Some(dst) = view.destination {
        h.dst_len = dst.prefix_len();
        a.push(RuleAttribute::Destination(dst.addr()));
    }
    if let Some(p) = view.ip_proto {
        a.push(RuleAttribute::IpProtocol(IpProtocol::from(p)));
    }
    if let Some(iif) = &view.iif {
        a.push(RuleAttribute::Iifname(iif.clone()));
    }
    if let Some((start, end)) = view.sport {
        a.push(RuleAttribute::SourcePortRange(RulePortRange { start, end }));
    }
    if let Some((start, end)) = view.dport {
        a.push(RuleAttribute::DestinationPortRange(RulePortRange {
            start,
            end,
        }));
    }
    msg
}

/// One dumped route of any table, for the policy table and for bypass
/// detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AnyRoute {
    pub table: u32,
    pub destination: IpNet,
    pub protocol: u8,
    pub kind: RouteType,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub metric: Option<u32>,
    pub multipath: bool,
    pub message: RouteMessage,
}

impl AnyRoute {
    pub fn from_message(msg: &RouteMessage) -> Option<AnyRoute> {
        let h = &msg.header;
        let mut table = u32::from(h.table);
        let mut destination = None;
        let mut route = AnyRoute {
            table: 0,
            destination: IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            protocol: h.protocol.into(),
            kind: h.kind,
            oif: None,
            gateway: None,
            metric: None,
            multipath: false,
            message: msg.clone(),
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                    destination = Some(IpAddr::V4(*a))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                    destination = Some(IpAddr::V6(*a))
                }
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Priority(p) => route.metric = Some(*p),
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                    route.gateway = Some(IpAddr::V4(*a))
                }
                RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                    route.gateway = Some(IpAddr::V6(*a))
                }
                RouteAttribute::Via(RouteVia::Inet(a)) => route.gateway = Some(IpAddr::V4(*a)),
                RouteAttribute::Via(RouteVia::Inet6(a)) => route.gateway = Some(IpAddr::V6(*a)),
                RouteAttribute::MultiPath(_) | RouteAttribute::NhId(_) => route.multipath = true,
                _ => {}
            }
        }
        let address = match (h.address_family, destination) {
            (AddressFamily::Inet, Some(a @ IpAddr::V4(_)))
            | (AddressFamily::Inet6, Some(a @ IpAddr::V6(_))) => a,
            (AddressFamily::Inet, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (AddressFamily::Inet6, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => return None,
        };
        route.table = table;
        route.destination = IpNet::new(address, h.destination_prefix_length).ok()?;
        Some(route)
    }

    /// This route as the main-table planner of `routes.rs` reads it: the
    /// same message with the table rewritten, so that one planner (slots,
    /// shapes, backstops, conflicts) serves both tables.
    fn as_main_entry(&self) -> Option<RouteEntry> {
        let mut msg = self.message.clone();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::Table(_)));
        RouteEntry::from_message(&msg)
    }

    fn view(&self, names: &BTreeMap<u32, String>) -> RouteView {
        RouteView {
            table: self.table,
            destination: self.destination,
            gateway: self.gateway,
            interface: self
                .oif
                .map(|i| names.get(&i).cloned().unwrap_or_else(|| format!("if#{i}"))),
            protocol: self.protocol,
            metric: self.metric,
            multipath: self.multipath,
        }
    }
}

/// Moves a main-table message of `routes.rs` into `table`.
fn in_table(mut msg: RouteMessage, table: u32) -> RouteMessage {
    msg.header.table = u8::try_from(table).unwrap_or(252);
    msg.attributes.push(RouteAttribute::Table(table));
    msg
}

/// The host route of a node address (/32 or /128).
fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The routes and rules wgmesh did not create that let traffic to a
/// [`Protected`] prefix (a cluster CIDR, an extra prefix carried through the
/// mesh) bypass interface `oif` (`None`: the interface does not exist, so
/// nothing goes through it). Routes of ours (protocol 87) and rules of ours
/// are never reported; nor are routes inside `local_pod_cidrs` (this node's
/// own pods are reached locally, not through the tunnel), nor blackhole,
/// unreachable or prohibit routes (they drop, which is failing closed).
///
/// "Before main", per protected prefix: before the first rule that looks up
/// `main` for all traffic, where `suppress_prefixlength N` counts only when
/// the prefix is longer than N (our route is then not suppressed; this
/// is what makes wg-quick's `lookup main suppress_prefixlength 0` harmless).
pub(crate) fn find_bypasses(
    routes: &[AnyRoute],
    rules: &[RuleEntry],
    oif: Option<u32>,
    protected: &[Protected],
    local_pod_cidrs: &[IpNet],
    names: &BTreeMap<u32, String>,
) -> Vec<Bypass> {
    let main = u32::from(RouteHeader::RT_TABLE_MAIN);
    let local_table = 255;
    // One entry per prefix; a prefix that is both (an extra prefix inside a
    // cluster CIDR) is reported as the cluster CIDR it is.
    let mut by_prefix: BTreeMap<IpNet, Protected> = BTreeMap::new();
    for p in protected {
        let net = p.prefix().trunc();
        let p = match p {
            Protected::ClusterCidr(_) => Protected::ClusterCidr(net),
            Protected::ExtraPrefix(_) => Protected::ExtraPrefix(net),
        };
        by_prefix
            .entry(net)
            .and_modify(|e| *e = (*e).min(p))
            .or_insert(p);
    }
    let is_local = |n: &IpNet| local_pod_cidrs.iter().any(|l| l.contains(n));
    let bypassing = |r: &&AnyRoute| {
        r.protocol != ROUTE_PROTOCOL
            && r.kind == RouteType::Unicast
            && (r.oif != oif || oif.is_none() || r.multipath)
            && !is_local(&r.destination)
    };
    let mut found = Vec::new();
    for (&c, &protected) in &by_prefix {
        let v6 = c.addr().is_ipv6();
        for r in routes
            .iter()
            .filter(|r| r.table == main && c.contains(&r.destination))
            .filter(bypassing)
        {
            found.push(Bypass::MainTable {
                route: r.view(names),
                protected,
            });
        }

        let main_at = rules
            .iter()
            .filter(|e| e.view.v6 == v6 && e.view.table == Some(main) && e.matches_everything())
            .filter(|e| {
                e.view
                    .suppress_prefixlen
                    .is_none_or(|n| u32::from(c.prefix_len()) > n)
            })
            .map(|e| e.view.priority)
            .min()
            .unwrap_or(u32::MAX);
        let mut reported = BTreeSet::new();
        let mut earlier: Vec<&RuleEntry> = rules
            .iter()
            .filter(|e| e.view.v6 == v6 && e.view.priority < main_at)
            .filter(|e| e.view.protocol != Some(ROUTE_PROTOCOL))
            .filter(|e| e.view.table.is_some_and(|t| t != main && t != local_table))
            .collect();
        earlier.sort_by_key(|e| e.view.priority);
        for rule in earlier {
            let Some(table) = rule.view.table else {
                continue;
            };
            let dst = rule.view.destination;
            if dst.is_some_and(|d| overlap(&d, &c) && !is_local(&d)) {
                found.push(Bypass::Rule {
                    rule: rule.view.clone(),
                    protected,
                });
            }
            for (i, r) in routes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.table == table && overlap(&r.destination, &c))
                .filter(|(_, r)| dst.is_none_or(|d| overlap(&d, &r.destination)))
                .filter(|(_, r)| bypassing(r))
            {
                if reported.insert(i) {
                    found.push(Bypass::OtherTable {
                        route: r.view(names),
                        protected,
                        rule_priority: rule.view.priority,
                    });
                }
            }
        }
    }
    found
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

fn host_or_net(n: IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn table_name(t: u32) -> String {
    match t {
        253 => "default".to_owned(),
        254 => "main".to_owned(),
        255 => "local".to_owned(),
        n => n.to_string(),
    }
}

// ---- the executor -----------------------------------------------------------

impl Net {
    /// Makes the policy routing of `spec` true (see the module docs): in our
    /// table, per remote node address, a device route into the interface and
    /// a blackhole backstop (both protocol 87); the rules of
    /// [`PolicySpec::rules`]. Stale routes of ours in our table and stale
    /// rules of ours at our three priorities are removed; foreign routes in our
    /// table at a wanted address are reported as conflicts and left alone
    /// (neither route of ours goes there), and nothing else is looked at.
    ///
    /// Works without the interface: when it is missing or down, only the
    /// backstops and the rules are ensured (pod → node traffic is dropped,
    /// not leaked), and [`PolicyChanges::interface_missing`] says so.
    ///
    /// Order, so that no moment leaks: backstops, device routes, rules added
    /// (exemptions first), rules deleted (catch-all first), routes deleted
    /// (backstops last). Writes nothing when everything is in place; stops
    /// at the first failed write, and the next call picks up from there.
    pub async fn ensure_policy(&self, spec: &PolicySpec) -> Result<PolicyChanges> {
        spec.validate()?;
        let link = self.link_by_name(&spec.interface).await?;
        let oif = link
            .filter(|l| {
                l.header
                    .flags
                    .contains(rtnetlink::packet_route::link::LinkFlags::Up)
            })
            .map(|l| l.header.index);
        let rules = self.rule_dump().await?;
        if spec.encrypt_host && !rules.is_empty() && rules.iter().all(|r| r.view.protocol.is_none())
        {
            return Err(NetError::HostEncryptionUnsupported);
        }
        let routes = self.route_dump().await?;

        let entries: Vec<RouteEntry> = routes
            .iter()
            .filter(|r| r.table == spec.table)
            .filter_map(AnyRoute::as_main_entry)
            .collect();
        let wanted: Vec<IpNet> = spec.remote_node_ips.iter().copied().map(host).collect();
        // What goes into this table is pod traffic (forwarded: its source
        // is a pod address already) or, with host encryption, node traffic,
        // which is meant to carry the node address.
        let prefsrc: Vec<IpAddr> = [true, false]
            .into_iter()
            .filter_map(|v4| {
                spec.local_node_ips
                    .iter()
                    .copied()
                    .find(|a| a.is_ipv4() == v4)
            })
            .collect();
        let device = oif.map(|oif| Device { oif, prefsrc });
        // Without a usable interface the planner plans the backstops alone.
        let route_plan = routes::plan(&entries, &wanted, device.as_ref());
        let rule_plan = plan_rules(&rules, &spec.rules(), spec.priority);

        let mut changes = PolicyChanges {
            routes: RouteChanges {
                conflicts: route_plan.conflicts.clone(),
                ..RouteChanges::default()
            },
            interface_missing: oif.is_none(),
            ..PolicyChanges::default()
        };
        let table = spec.table;
        let route_error = |op: &'static str, route: ClusterRoute| {
            let shown = match route.kind {
                RouteKind::Device => format!("{} dev {}", route.destination, spec.interface),
                RouteKind::Backstop => route.to_string(),
            };
            move |source| NetError::PolicyRoute {
                op,
                route: shown,
                table,
                source: Box::new(source),
            }
        };

        for (route, replace) in route_plan
            .add
            .iter()
            .map(|r| (*r, false))
            .chain(route_plan.replace.iter().map(|r| (*r, true)))
        {
            let msg = in_table(
                routes::add_message(route, device.as_ref().unwrap_or(&Device::default())),
                table,
            );
            let request = self.handle.route().add(msg);
            let result = if replace {
                request.replace().execute().await
            } else {
                request.execute().await
            };
            result.map_err(route_error(
                if replace { "replacing" } else { "adding" },
                route,
            ))?;
            tracing::debug!(%route, table, "policy route written");
            if replace {
                changes.routes.replaced.push(route);
            } else {
                changes.routes.added.push(route);
            }
        }
        for rule in rule_plan.add {
            let mut request = self.handle.rule().add();
            *request.message_mut() = rule_message(&rule);
            request.execute().await.map_err(|source| NetError::Rule {
                op: "adding",
                rule: rule.to_string(),
                source: Box::new(source),
            })?;
            tracing::debug!(%rule, "added rule");
            changes.rules_added.push(rule);
        }
        for entry in rule_plan.delete {
            match self
                .handle
                .rule()
                .del(entry.message.clone())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ENOENT) => continue,
                Err(source) => {
                    return Err(NetError::Rule {
                        op: "deleting",
                        rule: entry.view.to_string(),
                        source: Box::new(source),
                    })
                }
            }
            tracing::debug!(rule = %entry.view, "deleted rule");
            changes.rules_removed.push(entry.view);
        }
        for entry in route_plan.delete {
            let route = ClusterRoute {
                destination: entry.destination,
                kind: entry.role(),
            };
            let msg = in_table(routes::delete_message(&entry), table);
            match self.handle.route().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(libc::ESRCH) => continue,
                Err(e) => return Err(route_error("deleting", route)(e)),
            }
            tracing::debug!(%route, table, "deleted policy route");
            changes.routes.removed.push(route);
        }
        Ok(changes)
    }

    /// The routes and rules not created by wgmesh that make traffic to a
    /// `protected` prefix bypass `interface` (see [`Bypass`]); routes inside
    /// `local_pod_cidrs` (this node's pods) are legitimate and not reported.
    /// Reads only. An interface that does not exist is no error: then every
    /// foreign route inside a protected prefix bypasses it.
    pub async fn bypasses(
        &self,
        interface: &str,
        protected: &[Protected],
        local_pod_cidrs: &[IpNet],
    ) -> Result<Vec<Bypass>> {
        let oif = self.link_index(interface).await?;
        let rules = self.rule_dump().await?;
        let routes = self.route_dump().await?;
        let names = self.link_names().await?;
        Ok(find_bypasses(
            &routes,
            &rules,
            oif,
            protected,
            local_pod_cidrs,
            &names,
        ))
    }

    /// Every IPv4 and IPv6 rule.
    async fn rule_dump(&self) -> Result<Vec<RuleEntry>> {
        let mut entries = Vec::new();
        for (family, version) in [("IPv4", IpVersion::V4), ("IPv6", IpVersion::V6)] {
            match self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect::<Vec<_>>()
                .await
            {
                Ok(msgs) => entries.extend(msgs.iter().filter_map(RuleEntry::from_message)),
                Err(e) if family == "IPv6" && errno(&e) == Some(libc::EAFNOSUPPORT) => {}
                Err(source) => {
                    return Err(NetError::RuleDump {
                        family,
                        source: Box::new(source),
                    })
                }
            }
        }
        Ok(entries)
    }

    /// Every IPv4 and IPv6 route of every table.
    async fn route_dump(&self) -> Result<Vec<AnyRoute>> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter_map(AnyRoute::from_message)
            .collect())
    }

    async fn link_names(&self) -> Result<BTreeMap<u32, String>> {
        let links = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|source| NetError::AddressDump {
                source: Box::new(source),
            })?;
        Ok(links
            .iter()
            .filter_map(|l| {
                l.attributes.iter().find_map(|a| match a {
                    rtnetlink::packet_route::link::LinkAttribute::IfName(n) => {
                        Some((l.header.index, n.clone()))
                    }
                    _ => None,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::RouteProtocol;

    const TABLE: u32 = DEFAULT_POLICY_TABLE;
    const PRIO: u32 = DEFAULT_POLICY_PRIORITY;
    const WG: u32 = 7;
    const OTHER: u32 = 3;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn spec() -> PolicySpec {
        PolicySpec {
            local_pod_cidrs: vec![net("10.244.1.0/24"), net("fd00:244:0:1::/64")],
            remote_node_ips: vec!["192.0.2.2".parse().unwrap(), "2001:db8::2".parse().unwrap()],
            exempt: vec!["192.0.2.10:6443".parse().unwrap()],
            ..PolicySpec::new("wgmesh0")
        }
    }

    /// A rule as the kernel dumps it back: what we sent plus the
    /// attributes it always reports.
    fn dumped(mut msg: RuleMessage) -> RuleEntry {
        msg.attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        RuleEntry::from_message(&msg).unwrap()
    }

    fn ours(rule: &PolicyRule) -> RuleEntry {
        dumped(rule_message(rule))
    }

    /// `ip rule add` of someone else: protocol `proto` (0 = none given).
    fn foreign(rule: &PolicyRule, proto: u8) -> RuleEntry {
        let mut msg = rule_message(rule);
        for a in &mut msg.attributes {
            if let RuleAttribute::Protocol(p) = a {
                *p = RouteProtocol::from(proto);
            }
        }
        dumped(msg)
    }

    fn from(cidr: &str, priority: u32, table: u32) -> PolicyRule {
        let cidr = net(cidr);
        PolicyRule {
            priority,
            v6: cidr.addr().is_ipv6(),
            selector: RuleSelector::From(cidr),
            table,
        }
    }

    /// The kernel's three default rules of a family.
    fn defaults(v6: bool) -> Vec<RuleEntry> {
        let mut all = Vec::new();
        for (priority, table) in [(0, 255), (32766, 254), (32767, 253)] {
            let mut msg = RuleMessage::default();
            msg.header.family = if v6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            msg.header.action = RuleAction::ToTable;
            msg.header.table = table as u8;
            msg.attributes.push(RuleAttribute::Table(table));
            msg.attributes.push(RuleAttribute::Priority(priority));
            msg.attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Kernel));
            all.push(dumped(msg));
        }
        all
    }

    #[test]
    fn pod_mode_wants_one_rule_per_local_pod_cidr() {
        let rules = spec().rules();
        assert_eq!(
            rules,
            vec![
                from("10.244.1.0/24", PRIO, TABLE),
                from("fd00:244:0:1::/64", PRIO, TABLE)
            ]
        );
        assert_eq!(
            rules[0].to_string(),
            "5210: from 10.244.1.0/24 lookup 51820 proto 87"
        );
        // Host bits are dropped, as the kernel would refuse them.
        let s = PolicySpec {
            local_pod_cidrs: vec![net("10.244.1.7/24")],
            ..spec()
        };
        assert_eq!(s.rules(), vec![from("10.244.1.0/24", PRIO, TABLE)]);
    }

    #[test]
    fn bgp_mode_looks_up_the_learned_table_for_mesh_traffic_and_reads_back_as_ours() {
        let s = PolicySpec {
            learned_table: Some(187),
            ..spec()
        };
        let rules = s.rules();
        let iif: Vec<&PolicyRule> = rules
            .iter()
            .filter(|r| matches!(r.selector, RuleSelector::Iif(_)))
            .collect();
        assert_eq!(iif.len(), 2, "one per family");
        for r in iif {
            assert_eq!((r.priority, r.table), (PRIO + 1, 187));
            let back = dumped(rule_message(r));
            assert_eq!(back.view.iif.as_deref(), Some("wgmesh0"));
            assert!(back.is_exactly(r), "{back:?}");
        }
        for (bad, why) in [(Some(254), "reserved"), (Some(TABLE), "own policy table")] {
            let e = PolicySpec {
                learned_table: bad,
                ..spec()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn host_mode_wants_a_catch_all_per_family_behind_its_exemptions() {
        let s = PolicySpec {
            encrypt_host: true,
            ..spec()
        };
        let shown: Vec<String> = s.rules().iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "5210: from 10.244.1.0/24 lookup 51820 proto 87",
                "5210: from fd00:244:0:1::/64 lookup 51820 proto 87",
                "5211: from all ipproto udp sport 51820 lookup main proto 87",
                "5211: from all to 192.0.2.10 ipproto tcp dport 6443 lookup main proto 87",
                "5211: from ::/0 ipproto udp sport 51820 lookup main proto 87",
                "5212: from all lookup 51820 proto 87",
                "5212: from ::/0 lookup 51820 proto 87",
            ]
        );
        // Only families the node routes get rules; an IPv6 API address
        // without IPv6 nodes or pods gets no exemption.
        let s = PolicySpec {
            encrypt_host: true,
            local_pod_cidrs: vec![net("10.244.1.0/24")],
            remote_node_ips: vec!["192.0.2.2".parse().unwrap()],
            exempt: vec!["[2001:db8::10]:6443".parse().unwrap()],
            ..spec()
        };
        assert_eq!(s.rules().len(), 3, "{:?}", s.rules());
    }

    #[test]
    fn a_spec_is_validated() {
        for (bad, word) in [
            (
                PolicySpec {
                    table: 254,
                    ..spec()
                },
                "reserved",
            ),
            (PolicySpec { table: 0, ..spec() }, "reserved"),
            (
                PolicySpec {
                    priority: 0,
                    ..spec()
                },
                "1-32763",
            ),
            (
                PolicySpec {
                    priority: 32764,
                    ..spec()
                },
                "1-32763",
            ),
            (
                PolicySpec {
                    encrypt_host: true,
                    listen_port: 0,
                    ..spec()
                },
                "listen port",
            ),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(err.to_string().contains(word), "{err}");
        }
        assert!(matches!(
            PolicySpec::new("a/b").validate(),
            Err(NetError::InvalidName(_))
        ));
        assert!(spec().validate().is_ok());
    }

    #[test]
    fn rule_messages_carry_selectors_table_and_protocol() {
        let api = PolicyRule {
            priority: PRIO - 1,
            v6: false,
            selector: RuleSelector::Api("192.0.2.10:6443".parse().unwrap()),
            table: 254,
        };
        let m = rule_message(&api);
        assert_eq!(m.header.action, RuleAction::ToTable);
        assert_eq!(m.header.table, 254);
        assert_eq!(m.header.dst_len, 32);
        for want in [
            RuleAttribute::Priority(PRIO - 1),
            RuleAttribute::Protocol(RouteProtocol::from(ROUTE_PROTOCOL)),
            RuleAttribute::IpProtocol(IpProtocol::Tcp),
            RuleAttribute::DestinationPortRange(RulePortRange {
                start: 6443,
                end: 6443,
            }),
            RuleAttribute::Destination("192.0.2.10".parse().unwrap()),
        ] {
            assert!(m.attributes.contains(&want), "{want:?} in {m:?}");
        }
        // Tables above 255 only fit the attribute.
        let m = rule_message(&from("fd00::/64", PRIO, TABLE));
        assert_eq!(m.header.table, 252);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert_eq!(m.header.src_len, 64);
        assert!(m.attributes.contains(&RuleAttribute::Table(TABLE)));
        let wg = rule_message(&PolicyRule {
            priority: PRIO - 1,
            v6: false,
            selector: RuleSelector::WireGuardUdp(51820),
            table: 254,
        });
        assert!(wg
            .attributes
            .contains(&RuleAttribute::SourcePortRange(RulePortRange {
                start: 51820,
                end: 51820
            })));
        assert!(wg
            .attributes
            .contains(&RuleAttribute::IpProtocol(IpProtocol::Udp)));
    }

    #[test]
    fn rules_are_added_when_missing_and_left_alone_when_in_place() {
        let wanted = spec().rules();
        let mut existing = defaults(false);
        existing.extend(defaults(true));
        let p = plan_rules(&existing, &wanted, PRIO);
        assert_eq!(p.add, wanted);
        assert!(p.delete.is_empty());
        existing.extend(wanted.iter().map(ours));
        let p = plan_rules(&existing, &wanted, PRIO);
        assert_eq!(p, RulePlan::default());
    }

    #[test]
    fn stale_rules_of_ours_go_foreign_ones_never() {
        let wanted = vec![from("10.244.1.0/24", PRIO, TABLE)];
        let stale = ours(&from("10.244.7.0/24", PRIO, TABLE));
        let stale_exemption = ours(&PolicyRule {
            priority: PRIO + 1,
            v6: true,
            selector: RuleSelector::WireGuardUdp(51820),
            table: 254,
        });
        let duplicate = ours(&wanted[0]);
        let untouchable = [
            // Someone else's, at our priority, even the very rule we want.
            foreign(&from("10.244.9.0/24", PRIO, TABLE), 4),
            foreign(&wanted[0], 0),
            // Our protocol, another priority.
            ours(&from("10.244.7.0/24", PRIO + 3, TABLE)),
            ours(&from("10.244.7.0/24", PRIO - 1, TABLE)),
        ];
        let mut existing = defaults(false);
        existing.extend(untouchable.iter().cloned());
        existing.extend([
            stale_exemption.clone(),
            ours(&wanted[0]),
            stale.clone(),
            duplicate.clone(),
        ]);
        let p = plan_rules(&existing, &wanted, PRIO);
        assert!(p.add.is_empty(), "{p:?}");
        // Highest priority number first.
        assert_eq!(p.delete, vec![stale_exemption, stale, duplicate]);
        assert!(p.delete.iter().all(|e| e.view.protocol == Some(87)));
    }

    #[test]
    fn switching_to_host_mode_adds_exemptions_before_the_catch_all() {
        let pods = spec().rules();
        let host = PolicySpec {
            encrypt_host: true,
            ..spec()
        }
        .rules();
        let existing: Vec<RuleEntry> = pods.iter().map(ours).collect();
        let p = plan_rules(&existing, &host, PRIO);
        // The pod rules stay; exemptions go in before the catch-alls.
        let prios: Vec<u32> = p.add.iter().map(|r| r.priority).collect();
        assert_eq!(prios, [PRIO + 1, PRIO + 1, PRIO + 1, PRIO + 2, PRIO + 2]);
        assert!(p.delete.is_empty(), "{p:?}");
        // And back: the catch-alls go before their exemptions.
        let existing: Vec<RuleEntry> = host.iter().map(ours).collect();
        let p = plan_rules(&existing, &pods, PRIO);
        assert!(p.add.is_empty(), "{p:?}");
        let prios: Vec<u32> = p.delete.iter().map(|e| e.view.priority).collect();
        assert_eq!(prios, [PRIO + 2, PRIO + 2, PRIO + 1, PRIO + 1, PRIO + 1]);
    }

    #[test]
    fn a_kernel_without_rule_protocols_is_not_asked_twice_and_never_loses_a_rule() {
        let wanted = vec![from("10.244.1.0/24", PRIO, TABLE)];
        let strip = |mut e: RuleEntry| {
            e.message
                .attributes
                .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
            RuleEntry::from_message(&e.message).unwrap()
        };
        let existing = [
            strip(ours(&wanted[0])),
            strip(ours(&from("10.244.7.0/24", PRIO, TABLE))),
        ];
        assert_eq!(existing[0].view.protocol, None);
        let p = plan_rules(&existing, &wanted, PRIO);
        assert_eq!(p, RulePlan::default());
    }

    #[test]
    fn a_rule_with_an_extra_selector_is_not_ours_exactly() {
        let wanted = vec![from("10.244.1.0/24", PRIO, TABLE)];
        let mut msg = rule_message(&wanted[0]);
        msg.attributes.push(RuleAttribute::Iifname("eth0".into()));
        let widened = dumped(msg);
        let mut msg = rule_message(&wanted[0]);
        msg.header.flags = RuleFlags::Invert;
        let inverted = dumped(msg);
        let p = plan_rules(&[widened.clone(), inverted.clone()], &wanted, PRIO);
        assert_eq!(p.add, wanted);
        assert_eq!(p.delete, vec![widened, inverted]);
    }

    /// A dumped route in `table`.
    fn route(dst: &str, table: u32, proto: u8, oif: Option<u32>) -> AnyRoute {
        let dst = net(dst);
        let mut msg = RouteMessage::default();
        msg.header.address_family = if dst.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        msg.header.destination_prefix_length = dst.prefix_len();
        msg.header.table = u8::try_from(table).unwrap_or(252);
        msg.header.protocol = RouteProtocol::from(proto);
        msg.header.kind = RouteType::Unicast;
        msg.attributes.push(RouteAttribute::Table(table));
        if dst.prefix_len() > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(dst.addr().into()));
        }
        if let Some(i) = oif {
            msg.attributes.push(RouteAttribute::Oif(i));
        }
        AnyRoute::from_message(&msg).unwrap()
    }

    fn names() -> BTreeMap<u32, String> {
        [(WG, "wgmesh0".to_owned()), (OTHER, "eth1".to_owned())].into()
    }

    fn bypasses(routes: &[AnyRoute], rules: &[RuleEntry]) -> Vec<Bypass> {
        find_bypasses(
            routes,
            rules,
            Some(WG),
            &[
                Protected::ClusterCidr(net("10.244.0.0/16")),
                Protected::ClusterCidr(net("fd00:244::/48")),
            ],
            &[net("10.244.1.0/24")],
            &names(),
        )
    }

    fn lookup(priority: u32, table: u32, to: Option<&str>, v6: bool) -> RuleEntry {
        let mut msg = RuleMessage::default();
        msg.header.family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.action = RuleAction::ToTable;
        msg.attributes.push(RuleAttribute::Table(table));
        msg.attributes.push(RuleAttribute::Priority(priority));
        msg.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Boot));
        if let Some(to) = to {
            let to = net(to);
            msg.header.dst_len = to.prefix_len();
            msg.attributes.push(RuleAttribute::Destination(to.addr()));
        }
        dumped(msg)
    }

    #[test]
    fn a_more_specific_foreign_route_in_main_bypasses() {
        let mut rules = defaults(false);
        rules.extend(defaults(true));
        let routes = [
            route("10.244.7.0/24", 254, 4, Some(OTHER)),
            route("fd00:244:0:5::/64", 254, 186, Some(OTHER)),
            // Not bypasses: ours, into the interface, this node's pods,
            // less specific, outside, a blackhole.
            route("10.244.0.0/16", 254, 87, Some(WG)),
            route("10.244.8.0/24", 254, 4, Some(WG)),
            route("10.244.1.0/24", 254, 2, Some(OTHER)),
            route("10.244.1.5/32", 254, 4, Some(OTHER)),
            route("10.0.0.0/8", 254, 4, Some(OTHER)),
            route("0.0.0.0/0", 254, 16, Some(OTHER)),
            route("192.168.0.0/24", 254, 2, Some(OTHER)),
            {
                let mut b = route("10.244.9.0/24", 254, 4, None);
                b.kind = RouteType::BlackHole;
                b
            },
        ];
        let found = bypasses(&routes, &rules);
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "route `10.244.7.0/24 dev eth1 proto static table main` in the main table is \
                 inside cluster CIDR 10.244.0.0/16 and does not go through the WireGuard interface",
                "route `fd00:244:0:5::/64 dev eth1 proto bgp table main` in the main table is \
                 inside cluster CIDR fd00:244::/48 and does not go through the WireGuard interface",
            ]
        );
        assert_eq!(
            found[0].protected(),
            Protected::ClusterCidr(net("10.244.0.0/16"))
        );
        // Without the interface, even a route "into" it is a bypass.
        let found = find_bypasses(
            &routes,
            &rules,
            None,
            &[Protected::ClusterCidr(net("10.244.0.0/16"))],
            &[net("10.244.1.0/24")],
            &names(),
        );
        assert_eq!(found.len(), 2, "{found:?}");
    }

    /// An extra prefix carried through a remote gateway is protected like a
    /// cluster CIDR (issue #12 F5): a foreign route inside it, or a table
    /// consulted before main that covers it, sends its traffic around the
    /// tunnel in plaintext. The caller leaves out prefixes this node is a
    /// gateway for (they leave through its LAN).
    #[test]
    fn an_extra_prefix_through_the_mesh_is_protected_like_a_cluster_cidr() {
        let mut rules = defaults(false);
        rules.push(lookup(100, 100, None, false));
        let routes = [
            // Foreign: more specific than our route, out of eth1.
            route("192.168.50.0/25", 254, 4, Some(OTHER)),
            // Ours (protocol 87, into the interface), the default route (less
            // specific, in main), and an unrelated LAN route: fine.
            route("192.168.50.0/24", 254, 87, Some(WG)),
            route("0.0.0.0/0", 254, 16, Some(OTHER)),
            route("192.168.60.0/24", 254, 2, Some(OTHER)),
            // Table 100, consulted before main, covers it.
            route("0.0.0.0/0", 100, 4, Some(OTHER)),
        ];
        let protected = [
            Protected::ClusterCidr(net("10.244.0.0/16")),
            Protected::ExtraPrefix(net("192.168.50.0/24")),
        ];
        let found = find_bypasses(
            &routes,
            &rules,
            Some(WG),
            &protected,
            &[net("10.244.1.0/24")],
            &names(),
        );
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                // The default route in table 100 also covers the cluster CIDR.
                "route `default dev eth1 proto static table 100` overlaps cluster CIDR \
                 10.244.0.0/16 outside the WireGuard interface, and rule 100 consults its \
                 table before main",
                "route `192.168.50.0/25 dev eth1 proto static table main` in the main table \
                 is inside extra prefix 192.168.50.0/24 and does not go through the WireGuard \
                 interface",
                "route `default dev eth1 proto static table 100` overlaps extra prefix \
                 192.168.50.0/24 outside the WireGuard interface, and rule 100 consults its \
                 table before main",
            ],
        );
        assert_eq!(
            found[1].protected(),
            Protected::ExtraPrefix(net("192.168.50.0/24"))
        );
        // Without the extra prefix (this node is its gateway) only the
        // cluster CIDR's bypass remains.
        let found = find_bypasses(
            &routes,
            &rules,
            Some(WG),
            &protected[..1],
            &[net("10.244.1.0/24")],
            &names(),
        );
        assert_eq!(found.len(), 1, "{found:?}");
    }

    /// A prefix listed both ways (an extra prefix equal to a cluster CIDR,
    /// or one given twice, unmasked) is checked and reported once, as the
    /// cluster CIDR.
    #[test]
    fn a_prefix_listed_twice_is_checked_once_as_the_cluster_cidr() {
        let rules = defaults(false);
        let routes = [route("10.244.7.0/24", 254, 4, Some(OTHER))];
        let found = find_bypasses(
            &routes,
            &rules,
            Some(WG),
            &[
                Protected::ExtraPrefix(net("10.244.0.0/16")),
                Protected::ClusterCidr(net("10.244.3.4/16")),
                Protected::ExtraPrefix(net("10.244.0.0/16")),
            ],
            &[],
            &names(),
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].protected(),
            Protected::ClusterCidr(net("10.244.0.0/16"))
        );
    }

    #[test]
    fn another_table_before_main_bypasses_and_after_main_does_not() {
        let mut rules = defaults(false);
        rules.push(lookup(100, 100, None, false));
        rules.push(lookup(32767, 300, None, false));
        rules.push(lookup(40000, 400, None, false));
        let routes = [
            route("0.0.0.0/0", 100, 4, Some(OTHER)),
            route("10.244.3.0/24", 100, 4, Some(OTHER)),
            // Inside our own pods, and into the interface: fine.
            route("10.244.1.0/24", 100, 4, Some(OTHER)),
            route("10.244.4.0/24", 100, 4, Some(WG)),
            // Unrelated.
            route("192.168.0.0/16", 100, 4, Some(OTHER)),
            // Consulted only after main.
            route("10.244.5.0/24", 300, 4, Some(OTHER)),
            route("10.244.6.0/24", 400, 4, Some(OTHER)),
        ];
        let found = bypasses(&routes, &rules);
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "route `default dev eth1 proto static table 100` overlaps cluster CIDR \
                 10.244.0.0/16 outside the WireGuard interface, and rule 100 consults its table \
                 before main",
                "route `10.244.3.0/24 dev eth1 proto static table 100` overlaps cluster CIDR \
                 10.244.0.0/16 outside the WireGuard interface, and rule 100 consults its table \
                 before main",
            ]
        );
    }

    #[test]
    fn a_rule_sending_cluster_destinations_elsewhere_bypasses() {
        let mut rules = defaults(false);
        rules.extend(defaults(true));
        rules.push(lookup(1000, 100, Some("10.244.8.0/24"), false));
        rules.push(lookup(1001, 100, Some("fd00:244::/40"), true));
        // Towards this node's pods, or outside the cluster: fine.
        rules.push(lookup(1002, 100, Some("10.244.1.0/25"), false));
        rules.push(lookup(1003, 100, Some("192.168.0.0/16"), false));
        // A route the dst selector cannot reach is no bypass.
        let routes = [route("10.244.9.0/24", 100, 4, Some(OTHER))];
        let found = bypasses(&routes, &rules);
        let shown: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "rule `1000: from all to 10.244.8.0/24 lookup 100 proto boot` sends destinations \
                 in cluster CIDR 10.244.0.0/16 to another table before main",
                "rule `1001: from ::/0 to fd00:244::/40 lookup 100 proto boot` sends destinations \
                 in cluster CIDR fd00:244::/48 to another table before main",
            ]
        );
    }

    #[test]
    fn wg_quick_style_suppress_rules_and_our_own_are_harmless() {
        // wg-quick: `lookup main suppress_prefixlength 0` then `not fwmark
        // 0xca6c lookup 51820` (default dev wg0), both before main.
        let mut rules = defaults(false);
        let mut suppress = RuleMessage::default();
        suppress.header.family = AddressFamily::Inet;
        suppress.header.action = RuleAction::ToTable;
        suppress.attributes.push(RuleAttribute::Table(254));
        suppress.attributes.push(RuleAttribute::Priority(32764));
        suppress
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Boot));
        suppress
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(0));
        rules.push(RuleEntry::from_message(&suppress).unwrap());
        let mut fwmark = rule_message(&PolicyRule {
            priority: 32765,
            v6: false,
            selector: RuleSelector::All,
            table: 51820,
        });
        fwmark.header.flags = RuleFlags::Invert;
        fwmark.attributes.push(RuleAttribute::FwMark(0xca6c));
        fwmark
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        rules.push(dumped(fwmark));
        // Ours, pointing at our table with a node address in it.
        rules.push(ours(&from("10.244.1.0/24", PRIO, TABLE)));
        let routes = [
            route("0.0.0.0/0", 51820, 4, Some(OTHER)),
            route("192.0.2.2/32", TABLE, 87, Some(WG)),
        ];
        assert_eq!(bypasses(&routes, &rules), vec![]);
        // A suppress_prefixlength of 16 would suppress our /16: then the
        // fwmark table does bypass.
        let mut suppress16 = suppress.clone();
        for a in &mut suppress16.attributes {
            if let RuleAttribute::SuppressPrefixLen(n) = a {
                *n = 16;
            }
        }
        rules[3] = RuleEntry::from_message(&suppress16).unwrap();
        let found = bypasses(&routes, &rules);
        assert!(
            matches!(
                found.as_slice(),
                [Bypass::OtherTable {
                    rule_priority: 32765,
                    ..
                }]
            ),
            "{found:?}"
        );
    }

    #[test]
    fn policy_table_routes_read_like_main_table_routes() {
        // The planner of routes.rs reads our table's routes once the table
        // is rewritten: a device route and a backstop of ours come back as
        // exactly what was written, so a second pass plans nothing.
        let device = Device {
            oif: WG,
            prefsrc: Vec::new(),
        };
        let wanted = [net("192.0.2.2/32"), net("2001:db8::2/128")];
        let mut msgs = Vec::new();
        for dst in wanted {
            for route in [ClusterRoute::device(dst), ClusterRoute::backstop(dst)] {
                msgs.push(in_table(routes::add_message(route, &device), TABLE));
            }
        }
        for m in &msgs {
            assert!(m.attributes.contains(&RouteAttribute::Table(TABLE)));
            assert_eq!(m.header.table, 252);
            let parsed = AnyRoute::from_message(m).unwrap();
            assert_eq!(parsed.table, TABLE);
        }
        // (IPv6 routes come back with the default metric; add it as the
        // kernel would.)
        let entries: Vec<RouteEntry> = msgs
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if m.header.address_family == AddressFamily::Inet6
                    && !m
                        .attributes
                        .iter()
                        .any(|a| matches!(a, RouteAttribute::Priority(_)))
                {
                    m.attributes.push(RouteAttribute::Priority(1024));
                }
                AnyRoute::from_message(&m).unwrap().as_main_entry().unwrap()
            })
            .collect();
        let plan = routes::plan(&entries, &wanted, Some(&device));
        assert!(plan.is_empty(), "{plan:?}");
        // Without the device, nothing is planned for the device routes.
        let plan = routes::plan(&[], &wanted, None);
        assert!(plan.add.iter().all(|r| r.kind == RouteKind::Backstop));
        assert_eq!(plan.add.len(), 2);
    }

    #[test]
    fn changes_display() {
        let c = PolicyChanges {
            rules_added: vec![from("10.244.1.0/24", PRIO, TABLE)],
            interface_missing: true,
            ..Default::default()
        };
        assert!(!c.is_empty());
        assert_eq!(
            c.to_string(),
            "routes: added 0, replaced 0, removed 0, conflicts 0; rules: added 1, removed 0; \
             interface missing or down: backstops only"
        );
        assert!(PolicyChanges::default().is_empty());
    }
}
