//! The pure half of route reconciliation: what the main table holds, what
//! wgmesh wants, and the smallest set of writes between the two. No I/O, so
//! the ownership rules (never touch a route of another protocol) are tested
//! in memory; [`super::Net::ensure_routes`] only reads, calls [`plan`] and
//! executes.
//!
//! Every wanted CIDR gets two routes of ours, each in its own "slot" (the
//! kernel keys routes by destination, tos and metric, so a replace or an
//! exclusive add only ever meets the route in the same slot):
//!
//! - the device route, `<cidr> dev <interface>`, in the kernel's default
//!   slot (tos 0, metric 0 on IPv4, 1024 on IPv6);
//! - the backstop, `blackhole <cidr> metric 4096`
//!   ([`BACKSTOP_METRIC`]), which carries no device and so outlives the
//!   interface.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;

use super::{ClusterRoute, RouteConflict, RouteKind, BACKSTOP_METRIC, ROUTE_PROTOCOL};

/// The metric the kernel gives an IPv6 route added without one
/// (`IP6_RT_PRIO_USER`). IPv4 routes default to 0, which the kernel does not
/// even report.
const IPV6_DEFAULT_METRIC: u32 = 1024;

// The backstop must lose to the device route in both families.
const _: () = assert!(BACKSTOP_METRIC > IPV6_DEFAULT_METRIC);

/// One route of the main table, reduced to what the planner needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteEntry {
    pub destination: IpNet,
    pub protocol: u8,
    pub kind: RouteType,
    pub scope: RouteScope,
    pub tos: u8,
    pub oif: Option<u32>,
    pub priority: Option<u32>,
    /// `src`: the preferred source address for locally originated packets.
    pub prefsrc: Option<IpAddr>,
    /// A gateway, a via, multipath next hops, a nexthop object or an
    /// encapsulation: anything that makes the route more than "dev X".
    pub indirect: bool,
}

impl RouteEntry {
    /// Reads a dumped route; `None` for routes outside the main table or of a
    /// family other than IPv4/IPv6, which wgmesh never looks at.
    pub fn from_message(msg: &RouteMessage) -> Option<RouteEntry> {
        let header = &msg.header;
        let mut table = u32::from(header.table);
        let mut destination = None;
        let mut oif = None;
        let mut priority = None;
        let mut prefsrc = None;
        let mut indirect = false;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                    destination = Some(IpAddr::V4(*a))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                    destination = Some(IpAddr::V6(*a))
                }
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Priority(p) => priority = Some(*p),
                RouteAttribute::PrefSource(RouteAddress::Inet(a)) => prefsrc = Some(IpAddr::V4(*a)),
                RouteAttribute::PrefSource(RouteAddress::Inet6(a)) => {
                    prefsrc = Some(IpAddr::V6(*a))
                }
                RouteAttribute::Gateway(_)
                | RouteAttribute::Via(_)
                | RouteAttribute::MultiPath(_)
                | RouteAttribute::NhId(_)
                | RouteAttribute::Encap(_) => indirect = true,
                _ => {}
            }
        }
        if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
            return None;
        }
        // No RTA_DST means the default route of the family.
        let address = match (header.address_family, destination) {
            (AddressFamily::Inet, Some(a @ IpAddr::V4(_)))
            | (AddressFamily::Inet6, Some(a @ IpAddr::V6(_))) => a,
            (AddressFamily::Inet, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (AddressFamily::Inet6, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => return None,
        };
        Some(RouteEntry {
            destination: IpNet::new(address, header.destination_prefix_length).ok()?,
            protocol: header.protocol.into(),
            kind: header.kind,
            scope: header.scope,
            tos: header.tos,
            oif,
            priority,
            prefsrc,
            indirect,
        })
    }

    pub fn is_ours(&self) -> bool {
        self.protocol == ROUTE_PROTOCOL
    }

    /// Whether this is exactly the route [`add_message`] creates for its
    /// destination, `kind` and `device`, as the kernel reports it back.
    /// Anything else of ours at a wanted destination gets replaced or deleted.
    fn is_exactly(&self, kind: RouteKind, device: &Device) -> bool {
        let v4 = self.destination.addr().is_ipv4();
        let shape = match kind {
            RouteKind::Device => {
                self.oif == Some(device.oif)
                    && self.prefsrc == device.prefsrc_for(&self.destination)
                    && self.kind == RouteType::Unicast
                    // The kernel always reports IPv6 routes as scope universe.
                    && (!v4 || self.scope == RouteScope::Link)
            }
            // No device to compare: IPv4 reports none, IPv6 reports the
            // loopback it hangs every reject route on.
            RouteKind::Backstop => {
                self.kind == RouteType::BlackHole && self.scope == RouteScope::Universe
            }
        };
        self.is_ours() && !self.indirect && self.in_slot(kind) && shape
    }

    /// Whether a replace of `kind`'s route for this destination would hit
    /// this one: the kernel keys routes by (destination, tos, metric).
    fn in_slot(&self, kind: RouteKind) -> bool {
        let v4 = self.destination.addr().is_ipv4();
        // IPv4 does not report a metric of 0.
        let metric = self
            .priority
            .unwrap_or(if v4 { 0 } else { IPV6_DEFAULT_METRIC });
        self.tos == 0 && metric == slot_metric(kind, v4)
    }

    /// What this route of ours is reported as when it goes: a backstop if it
    /// sat in the backstop's slot, else a device route (including leftovers
    /// of any other shape).
    pub fn role(&self) -> RouteKind {
        if self.in_slot(RouteKind::Backstop) {
            RouteKind::Backstop
        } else {
            RouteKind::Device
        }
    }
}

/// The metric of `kind`'s slot: the kernel's default for the device route
/// (we send none), [`BACKSTOP_METRIC`] for the backstop.
fn slot_metric(kind: RouteKind, v4: bool) -> u32 {
    match kind {
        RouteKind::Device if v4 => 0,
        RouteKind::Device => IPV6_DEFAULT_METRIC,
        RouteKind::Backstop => BACKSTOP_METRIC,
    }
}

/// The writes that take the main table from what it holds to what wgmesh
/// wants. Empty when everything is in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoutePlan {
    /// Wanted routes whose slot is empty: add ours (exclusive create).
    /// Backstops come first, so a destination is closed before anything else
    /// is written.
    pub add: Vec<ClusterRoute>,
    /// Wanted routes whose slot holds only a stale route of ours (another
    /// interface, scope, type…): replace it atomically, so there is no
    /// instant in which the destination falls through to the default route.
    /// Backstops first.
    pub replace: Vec<ClusterRoute>,
    /// Routes of ours to delete: no longer wanted, or superfluous next to
    /// the right one. Every one has `protocol == ROUTE_PROTOCOL`. Backstop
    /// slots come last, so a destination that is going away drops traffic
    /// until its last route is gone rather than leaking it.
    pub delete: Vec<RouteEntry>,
    /// Foreign routes at wanted destinations; wgmesh writes nothing there.
    pub conflicts: Vec<RouteConflict>,
}

impl RoutePlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.delete.is_empty()
    }
}

/// Where the device routes point: the interface and, per family, the
/// preferred source for packets the node itself sends into the tunnel (an
/// address inside the node's own pod CIDR, so the remote peer's cryptokey
/// routing accepts it and the reply comes back through the tunnel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    pub oif: u32,
    pub prefsrc: Vec<IpAddr>,
}

impl Device {
    /// The preferred source for `destination`'s family, if any.
    pub fn prefsrc_for(&self, destination: &IpNet) -> Option<IpAddr> {
        self.prefsrc
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == destination.addr().is_ipv4())
    }
}

/// Plans the main table: per wanted CIDR, a device route of ours to
/// `device` and a backstop of ours; with no device, the backstops alone.
///
/// Ownership is by protocol number alone: a route whose protocol is not
/// [`ROUTE_PROTOCOL`] is never deleted or replaced. A destination that
/// already has a foreign route — of any type, at any metric — is hands-off
/// entirely (neither route of ours is added, replaced or deleted there) and
/// reported instead:
///
/// - in the device slot, a replace could hit the foreign route on IPv4;
/// - at a lower metric it takes the traffic past WireGuard while it exists;
/// - between the two of ours it takes the traffic whenever the device route
///   is gone, which is the plaintext fallback the backstop exists to stop;
/// - even above the backstop it is someone else's claim on the cluster
///   CIDR, and routes added beside it would only compete with whoever put it
///   there.
///
/// Only an operator can tell which of these is intended, so the metric does
/// not matter: every foreign route at a wanted prefix is a conflict.
pub(crate) fn plan(
    existing: &[RouteEntry],
    wanted: &[IpNet],
    device: Option<&Device>,
) -> RoutePlan {
    // The kernel rejects host bits in a destination; compare canonical forms.
    let wanted: BTreeSet<IpNet> = wanted.iter().map(IpNet::trunc).collect();
    let mut plan = RoutePlan::default();
    // A backstop's shape does not depend on the device.
    let no_device = Device::default();

    for &destination in &wanted {
        let at = || {
            existing
                .iter()
                .filter(move |r| r.destination == destination)
        };
        let foreign: Vec<&RouteEntry> = at().filter(|r| !r.is_ours()).collect();
        if !foreign.is_empty() {
            plan.conflicts
                .extend(foreign.into_iter().map(|r| RouteConflict {
                    destination,
                    protocol: r.protocol,
                    interface_index: r.oif,
                }));
            continue;
        }
        let ours: Vec<&RouteEntry> = at().collect();
        // Per route of ours here: kept, or left to a replace of its slot.
        let mut spared = vec![false; ours.len()];
        for kind in [RouteKind::Backstop, RouteKind::Device] {
            let route = ClusterRoute { destination, kind };
            let device = match (kind, device) {
                (RouteKind::Device, None) => {
                    // No interface (yet): only the backstop can go in, and a
                    // device route of ours there is dead already; leave it
                    // to the pass that has the interface.
                    for (i, r) in ours.iter().enumerate() {
                        spared[i] |= r.in_slot(kind);
                    }
                    continue;
                }
                (_, Some(d)) => d,
                (RouteKind::Backstop, None) => &no_device,
            };
            if let Some(keep) = ours.iter().position(|r| r.is_exactly(kind, device)) {
                // Anything else of ours in its slot is superfluous.
                spared[keep] = true;
            } else if ours.iter().any(|r| r.in_slot(kind)) {
                // The replace overwrites one route of the slot. (Should
                // there be several, the rest go on the next call, once one
                // of them is exactly right.)
                plan.replace.push(route);
                for (i, r) in ours.iter().enumerate() {
                    spared[i] |= r.in_slot(kind);
                }
            } else {
                plan.add.push(route);
            }
        }
        plan.delete.extend(
            ours.iter()
                .zip(&spared)
                .filter(|&(_, &spared)| !spared)
                .map(|(r, _)| (*r).clone()),
        );
    }

    plan.delete.extend(
        existing
            .iter()
            .filter(|r| r.is_ours() && !wanted.contains(&r.destination))
            .cloned(),
    );
    // Stable sorts: destinations keep their order within each group.
    plan.add.sort_by_key(|r| r.kind != RouteKind::Backstop);
    plan.replace.sort_by_key(|r| r.kind != RouteKind::Backstop);
    plan.delete.sort_by_key(|r| r.role() == RouteKind::Backstop);
    plan
}

/// The route wgmesh owns for `route`, main table, our protocol:
///
/// - [`RouteKind::Device`]: unicast, `dev oif`, scope link (IPv4; the kernel
///   has no scope for IPv6 routes), the kernel's default metric;
/// - [`RouteKind::Backstop`]: blackhole, no device, scope universe, metric
///   [`BACKSTOP_METRIC`]. (`oif` is not used.)
pub(crate) fn add_message(route: ClusterRoute, device: &Device) -> RouteMessage {
    let ClusterRoute { destination, kind } = route;
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = family(&destination);
    h.destination_prefix_length = destination.prefix_len();
    h.table = RouteHeader::RT_TABLE_MAIN;
    h.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    msg.attributes
        .push(RouteAttribute::Destination(destination.addr().into()));
    match kind {
        RouteKind::Device => {
            h.kind = RouteType::Unicast;
            h.scope = match destination {
                IpNet::V4(_) => RouteScope::Link,
                IpNet::V6(_) => RouteScope::Universe,
            };
            msg.attributes.push(RouteAttribute::Oif(device.oif));
            if let Some(src) = device.prefsrc_for(&destination) {
                msg.attributes.push(RouteAttribute::PrefSource(src.into()));
            }
        }
        RouteKind::Backstop => {
            h.kind = RouteType::BlackHole;
            h.scope = RouteScope::Universe;
            msg.attributes
                .push(RouteAttribute::Priority(BACKSTOP_METRIC));
        }
    }
    msg
}

/// A delete that can only match `route`, and only because it is ours: the
/// kernel compares the protocol, type, tos, metric and device we send
/// (scope "nowhere" means any scope), so a foreign route at the same
/// destination is safe even if the dump raced with someone else's change.
pub(crate) fn delete_message(route: &RouteEntry) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = family(&route.destination);
    h.destination_prefix_length = route.destination.prefix_len();
    h.tos = route.tos;
    h.table = RouteHeader::RT_TABLE_MAIN;
    h.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    h.kind = route.kind;
    h.scope = RouteScope::NoWhere;
    msg.attributes
        .push(RouteAttribute::Destination(route.destination.addr().into()));
    if let Some(oif) = route.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(priority) = route.priority {
        msg.attributes.push(RouteAttribute::Priority(priority));
    }
    msg
}

fn family(net: &IpNet) -> AddressFamily {
    match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device `oif` with no preferred source.
    fn d(oif: u32) -> Device {
        Device {
            oif,
            prefsrc: Vec::new(),
        }
    }

    fn plan(existing: &[RouteEntry], wanted: &[IpNet], oif: u32) -> RoutePlan {
        super::plan(existing, wanted, Some(&d(oif)))
    }

    fn add_message(route: ClusterRoute, oif: u32) -> RouteMessage {
        super::add_message(route, &d(oif))
    }

    const WG: u32 = 7;
    const OTHER: u32 = 3;
    /// The loopback, which IPv6 reports as the device of reject routes.
    const LO: u32 = 1;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn dev(dst: &str) -> ClusterRoute {
        ClusterRoute::device(net(dst))
    }

    fn bk(dst: &str) -> ClusterRoute {
        ClusterRoute::backstop(net(dst))
    }

    /// Our device route as the kernel reports it back.
    fn ours(dst: &str, oif: u32) -> RouteEntry {
        RouteEntry::from_message(&dumped(add_message(dev(dst), oif))).unwrap()
    }

    /// Our backstop as the kernel reports it back.
    fn backstop(dst: &str) -> RouteEntry {
        RouteEntry::from_message(&dumped(add_message(bk(dst), WG))).unwrap()
    }

    /// Both routes of ours for `dst`, device route to `oif`.
    fn both(dst: &str, oif: u32) -> [RouteEntry; 2] {
        [ours(dst, oif), backstop(dst)]
    }

    fn foreign(dst: &str, protocol: u8, oif: u32) -> RouteEntry {
        RouteEntry {
            protocol,
            ..ours(dst, oif)
        }
    }

    /// What a dump adds to a route we sent: IPv6 gets the default metric if
    /// it had none, scope universe, and the loopback as the device of a
    /// blackhole; IPv4 keeps no metric attribute of 0.
    fn dumped(mut msg: RouteMessage) -> RouteMessage {
        if msg.header.address_family == AddressFamily::Inet6 {
            let has_metric = msg
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Priority(_)));
            if !has_metric {
                msg.attributes
                    .push(RouteAttribute::Priority(IPV6_DEFAULT_METRIC));
            }
            if msg.header.kind == RouteType::BlackHole {
                msg.attributes.push(RouteAttribute::Oif(LO));
            }
            msg.header.scope = RouteScope::Universe;
        }
        msg.attributes.push(RouteAttribute::Table(254));
        msg
    }

    fn with_metric(mut r: RouteEntry, metric: u32) -> RouteEntry {
        r.priority = Some(metric);
        r
    }

    #[test]
    fn backstop_metric_is_above_every_default_slot() {
        for v4 in [true, false] {
            assert!(slot_metric(RouteKind::Backstop, v4) > slot_metric(RouteKind::Device, v4));
        }
    }

    #[test]
    fn adds_missing_routes_per_family_backstops_first() {
        let p = plan(&[], &[net("10.244.0.0/16"), net("fd00:244::/48")], WG);
        assert_eq!(
            p.add,
            vec![
                bk("10.244.0.0/16"),
                bk("fd00:244::/48"),
                dev("10.244.0.0/16"),
                dev("fd00:244::/48"),
            ]
        );
        assert!(p.replace.is_empty() && p.delete.is_empty() && p.conflicts.is_empty());
    }

    #[test]
    fn nothing_to_do_when_in_place() {
        let mut existing = vec![
            foreign("0.0.0.0/0", 4, OTHER),
            foreign("192.168.1.0/24", 2, OTHER),
        ];
        existing.extend(both("10.244.0.0/16", WG));
        existing.extend(both("fd00:244::/48", WG));
        let p = plan(&existing, &[net("10.244.0.0/16"), net("fd00:244::/48")], WG);
        assert!(p.is_empty(), "{p:?}");
        assert!(p.conflicts.is_empty());
    }

    #[test]
    fn the_planner_recognises_what_the_kernel_reports() {
        let v6 = backstop("fd00::/48");
        assert_eq!(v6.oif, Some(LO));
        assert_eq!(v6.priority, Some(BACKSTOP_METRIC));
        assert!(v6.is_exactly(RouteKind::Backstop, &d(WG)));
        assert!(!v6.is_exactly(RouteKind::Device, &d(WG)));
        assert_eq!(v6.role(), RouteKind::Backstop);
        let v4 = backstop("10.244.0.0/16");
        assert_eq!(v4.oif, None);
        assert!(v4.is_exactly(RouteKind::Backstop, &d(WG)));
        let device = ours("10.244.0.0/16", WG);
        assert!(device.is_exactly(RouteKind::Device, &d(WG)));
        assert!(!device.is_exactly(RouteKind::Backstop, &d(WG)));
        assert_eq!(device.role(), RouteKind::Device);
    }

    #[test]
    fn host_bits_and_duplicates_are_canonicalised() {
        let existing = both("10.244.0.0/16", WG);
        let p = plan(&existing, &[net("10.244.3.4/16"), net("10.244.0.0/16")], WG);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_missing_half_is_added_alone() {
        // The interface went away: the kernel flushed the device route, the
        // backstop stayed. The device route comes back (to the new index),
        // the backstop is not duplicated.
        let existing = [backstop("10.244.0.0/16"), backstop("fd00::/48")];
        let p = plan(&existing, &[net("10.244.0.0/16"), net("fd00::/48")], WG + 1);
        assert_eq!(p.add, vec![dev("10.244.0.0/16"), dev("fd00::/48")]);
        assert!(p.replace.is_empty() && p.delete.is_empty(), "{p:?}");
        // An upgrade from a version without backstops.
        let existing = [ours("10.244.0.0/16", WG), ours("fd00::/48", WG)];
        let p = plan(&existing, &[net("10.244.0.0/16"), net("fd00::/48")], WG);
        assert_eq!(p.add, vec![bk("10.244.0.0/16"), bk("fd00::/48")]);
        assert!(p.replace.is_empty() && p.delete.is_empty(), "{p:?}");
    }

    #[test]
    fn our_route_to_another_interface_is_replaced() {
        let mut existing = vec![ours("10.244.0.0/16", OTHER), ours("fd00::/48", OTHER)];
        existing.extend([backstop("10.244.0.0/16"), backstop("fd00::/48")]);
        let p = plan(&existing, &[net("10.244.0.0/16"), net("fd00::/48")], WG);
        assert_eq!(p.replace, vec![dev("10.244.0.0/16"), dev("fd00::/48")]);
        assert!(p.add.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn our_route_with_wrong_scope_or_type_is_replaced() {
        let mut scope = ours("10.244.0.0/16", WG);
        scope.scope = RouteScope::Universe;
        let mut blackhole = ours("10.245.0.0/16", WG);
        blackhole.kind = RouteType::BlackHole;
        blackhole.oif = None;
        let p = plan(
            &[scope, blackhole],
            &[net("10.244.0.0/16"), net("10.245.0.0/16")],
            WG,
        );
        // A blackhole in the device route's slot is no backstop.
        assert_eq!(p.replace, vec![dev("10.244.0.0/16"), dev("10.245.0.0/16")]);
        assert_eq!(p.add, vec![bk("10.244.0.0/16"), bk("10.245.0.0/16")]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn our_stale_backstop_is_replaced_in_its_slot() {
        // A unicast route of ours at the backstop's metric…
        let unicast = with_metric(ours("10.244.0.0/16", OTHER), BACKSTOP_METRIC);
        // …a blackhole of ours there with another scope…
        let mut scope = backstop("10.245.0.0/16");
        scope.scope = RouteScope::Link;
        // …and an IPv6 prohibit route there.
        let mut prohibit = backstop("fd00::/48");
        prohibit.kind = RouteType::Prohibit;
        let mut existing = vec![unicast, scope, prohibit];
        existing.extend(["10.244.0.0/16", "10.245.0.0/16", "fd00::/48"].map(|d| ours(d, WG)));
        let wanted = [net("10.244.0.0/16"), net("10.245.0.0/16"), net("fd00::/48")];
        let p = plan(&existing, &wanted, WG);
        assert_eq!(
            p.replace,
            vec![bk("10.244.0.0/16"), bk("10.245.0.0/16"), bk("fd00::/48")]
        );
        assert!(p.add.is_empty() && p.delete.is_empty(), "{p:?}");
    }

    #[test]
    fn our_blackhole_at_another_metric_is_no_backstop() {
        let low = with_metric(backstop("10.244.0.0/16"), 100);
        let existing = [ours("10.244.0.0/16", WG), low.clone()];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert_eq!(p.add, vec![bk("10.244.0.0/16")]);
        assert_eq!(p.delete, vec![low]);
        assert!(p.replace.is_empty());
    }

    #[test]
    fn ours_in_another_metric_slot_is_deleted_beside_the_replace() {
        let other_metric = with_metric(ours("10.244.0.0/16", OTHER), 50);
        let existing = [other_metric.clone(), backstop("10.244.0.0/16")];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        // Nothing of ours in the default slot: the device route is added.
        assert_eq!(p.add, vec![dev("10.244.0.0/16")]);
        assert_eq!(p.delete, vec![other_metric.clone()]);

        let existing = [
            other_metric.clone(),
            ours("10.244.0.0/16", OTHER),
            backstop("10.244.0.0/16"),
        ];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert_eq!(p.replace, vec![dev("10.244.0.0/16")]);
        assert_eq!(p.delete, vec![other_metric]);
        assert!(p.add.is_empty());
    }

    #[test]
    fn superfluous_ours_beside_the_right_one_is_deleted() {
        let extra = with_metric(ours("10.244.0.0/16", OTHER), 50);
        let mut existing = vec![extra.clone()];
        existing.extend(both("10.244.0.0/16", WG));
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert!(p.add.is_empty() && p.replace.is_empty());
        assert_eq!(p.delete, vec![extra]);
        // A second route of ours in the backstop's slot, beside the backstop.
        let extra = with_metric(ours("10.244.0.0/16", OTHER), BACKSTOP_METRIC);
        let mut existing = vec![extra.clone()];
        existing.extend(both("10.244.0.0/16", WG));
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert!(p.add.is_empty() && p.replace.is_empty());
        assert_eq!(p.delete, vec![extra]);
    }

    #[test]
    fn unwanted_ours_is_deleted_backstops_last_foreign_never() {
        let mut existing = vec![
            foreign("10.96.0.0/12", 4, WG),
            foreign("fd01::/48", 3, WG),
            foreign("10.0.0.0/8", 186, OTHER),
            // Someone's own blackhole is theirs.
            RouteEntry {
                protocol: 4,
                ..backstop("10.1.0.0/16")
            },
        ];
        existing.extend(both("10.244.0.0/16", WG));
        existing.extend(both("fd00::/48", WG));
        let p = plan(&existing, &[net("fd00::/48")], WG);
        assert_eq!(
            p.delete,
            vec![ours("10.244.0.0/16", WG), backstop("10.244.0.0/16")]
        );
        assert!(p.add.is_empty() && p.replace.is_empty() && p.conflicts.is_empty());
        // With nothing wanted, all of ours go and only ours; every device
        // route before any backstop, so nothing leaks in between.
        let p = plan(&existing, &[], WG);
        assert_eq!(
            p.delete,
            vec![
                ours("10.244.0.0/16", WG),
                ours("fd00::/48", WG),
                backstop("10.244.0.0/16"),
                backstop("fd00::/48"),
            ]
        );
        assert!(p.delete.iter().all(RouteEntry::is_ours));
    }

    #[test]
    fn foreign_route_at_a_wanted_destination_is_a_conflict_and_hands_off() {
        // Alone: we do not add beside it.
        let existing = [foreign("10.244.0.0/16", 4, OTHER)];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(
            p.conflicts,
            vec![RouteConflict {
                destination: net("10.244.0.0/16"),
                protocol: 4,
                interface_index: Some(OTHER),
            }]
        );
        // Beside stale routes of ours: no replace (on IPv4 it could hit the
        // foreign route), no backstop, no delete.
        let existing = [
            ours("10.244.0.0/16", OTHER),
            with_metric(backstop("10.244.0.0/16"), 100),
            foreign("10.244.0.0/16", 4, OTHER),
        ];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.conflicts.len(), 1);
        // Same prefix length but another network is no conflict.
        let existing = [foreign("10.245.0.0/16", 4, OTHER)];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert_eq!(p.add, vec![bk("10.244.0.0/16"), dev("10.244.0.0/16")]);
        assert!(p.conflicts.is_empty());
    }

    #[test]
    fn foreign_route_at_any_metric_is_a_conflict() {
        for metric in [10, 2048, BACKSTOP_METRIC, 10_000] {
            for dst in ["10.244.0.0/16", "fd00::/48"] {
                let mut existing = vec![with_metric(foreign(dst, 16, OTHER), metric)];
                existing.extend(both(dst, WG));
                let p = plan(&existing, &[net(dst)], WG);
                assert!(p.is_empty(), "metric {metric}: {p:?}");
                assert_eq!(p.conflicts.len(), 1, "metric {metric}");
            }
        }
        // A foreign blackhole (someone else's backstop) too, and ours is
        // not added beside it.
        let theirs = RouteEntry {
            protocol: 4,
            ..backstop("10.244.0.0/16")
        };
        let p = plan(&[theirs], &[net("10.244.0.0/16")], WG);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(
            p.conflicts,
            vec![RouteConflict {
                destination: net("10.244.0.0/16"),
                protocol: 4,
                interface_index: None,
            }]
        );
    }

    #[test]
    fn parses_default_route_and_skips_other_tables() {
        let mut default = RouteMessage::default();
        default.header.address_family = AddressFamily::Inet;
        default.header.table = RouteHeader::RT_TABLE_MAIN;
        default.header.protocol = RouteProtocol::Dhcp;
        default.header.kind = RouteType::Unicast;
        default
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                192, 0, 2, 1,
            ))));
        default.attributes.push(RouteAttribute::Oif(2));
        let e = RouteEntry::from_message(&default).unwrap();
        assert_eq!(e.destination, net("0.0.0.0/0"));
        assert_eq!(e.protocol, 16);
        assert!(e.indirect && !e.is_ours());

        let mut local = add_message(dev("10.1.2.3/32"), 1);
        local.header.table = 255;
        assert!(RouteEntry::from_message(&local).is_none());
        let mut high_table = add_message(dev("10.1.2.3/32"), 1);
        high_table.header.table = 252; // RT_TABLE_COMPAT: the id is in RTA_TABLE
        high_table.attributes.push(RouteAttribute::Table(1000));
        assert!(RouteEntry::from_message(&high_table).is_none());
    }

    #[test]
    fn messages_carry_our_protocol() {
        let add = add_message(dev("10.244.0.0/16"), WG);
        assert_eq!(u8::from(add.header.protocol), ROUTE_PROTOCOL);
        assert_eq!(add.header.kind, RouteType::Unicast);
        assert_eq!(add.header.scope, RouteScope::Link);
        assert_eq!(add.header.destination_prefix_length, 16);
        assert!(add.attributes.contains(&RouteAttribute::Oif(WG)));
        let add6 = add_message(dev("fd00::/48"), WG);
        assert_eq!(add6.header.address_family, AddressFamily::Inet6);
        assert_eq!(add6.header.scope, RouteScope::Universe);

        let del = delete_message(&ours("fd00::/48", WG));
        assert_eq!(u8::from(del.header.protocol), ROUTE_PROTOCOL);
        assert_eq!(del.header.scope, RouteScope::NoWhere);
        assert!(del
            .attributes
            .contains(&RouteAttribute::Priority(IPV6_DEFAULT_METRIC)));
        assert!(del.attributes.contains(&RouteAttribute::Oif(WG)));
    }

    #[test]
    fn backstop_messages_are_blackholes_without_a_device() {
        for dst in ["10.244.0.0/16", "fd00::/48"] {
            let add = add_message(bk(dst), WG);
            assert_eq!(u8::from(add.header.protocol), ROUTE_PROTOCOL);
            assert_eq!(add.header.kind, RouteType::BlackHole);
            assert_eq!(add.header.scope, RouteScope::Universe);
            assert_eq!(add.header.table, RouteHeader::RT_TABLE_MAIN);
            assert!(add
                .attributes
                .contains(&RouteAttribute::Priority(BACKSTOP_METRIC)));
            assert!(
                !add.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(_))),
                "{add:?}"
            );

            // The delete names the type and metric, so it cannot hit the
            // device route at the same destination.
            let del = delete_message(&backstop(dst));
            assert_eq!(u8::from(del.header.protocol), ROUTE_PROTOCOL);
            assert_eq!(del.header.kind, RouteType::BlackHole);
            assert!(del
                .attributes
                .contains(&RouteAttribute::Priority(BACKSTOP_METRIC)));
        }
    }
}

#[cfg(test)]
mod device_tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn dumped(msg: RouteMessage) -> RouteEntry {
        let mut msg = msg;
        msg.attributes.push(RouteAttribute::Table(254));
        RouteEntry::from_message(&msg).unwrap()
    }

    fn wg(src: &str) -> Device {
        Device {
            oif: 7,
            prefsrc: vec![src.parse().unwrap()],
        }
    }

    #[test]
    fn without_an_interface_only_backstops_are_planned() {
        let p = plan(&[], &[net("10.244.0.0/16"), net("fd00::/48")], None);
        assert_eq!(
            p.add,
            vec![
                ClusterRoute::backstop(net("10.244.0.0/16")),
                ClusterRoute::backstop(net("fd00::/48"))
            ]
        );
        assert!(p.replace.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn without_an_interface_a_dead_device_route_is_left_for_later() {
        let dev = dumped(add_message(
            ClusterRoute::device(net("10.244.0.0/16")),
            &wg("10.244.1.1"),
        ));
        let p = plan(&[dev], &[net("10.244.0.0/16")], None);
        assert_eq!(p.add, vec![ClusterRoute::backstop(net("10.244.0.0/16"))]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn the_preferred_source_is_part_of_the_device_route() {
        let device = wg("10.244.1.1");
        let route = ClusterRoute::device(net("10.244.0.0/16"));
        let entry = dumped(add_message(route, &device));
        assert_eq!(entry.prefsrc, Some("10.244.1.1".parse().unwrap()));
        let backstop = dumped(add_message(
            ClusterRoute::backstop(net("10.244.0.0/16")),
            &device,
        ));
        let existing = [entry.clone(), backstop.clone()];
        assert!(plan(&existing, &[net("10.244.0.0/16")], Some(&device)).is_empty());
        // A new source (the pod CIDR changed) replaces the route in place.
        let p = plan(&existing, &[net("10.244.0.0/16")], Some(&wg("10.244.2.1")));
        assert_eq!(p.replace, vec![route]);
        // An IPv4 source is never put on an IPv6 route.
        let v6 = dumped(add_message(ClusterRoute::device(net("fd00::/48")), &device));
        assert_eq!(v6.prefsrc, None);
    }
}
