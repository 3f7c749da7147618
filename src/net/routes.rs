//! The pure half of route reconciliation: what the main table holds, what
//! wgmesh wants, and the smallest set of writes between the two. No I/O, so
//! the ownership rules (never touch a route of another protocol) are tested
//! in memory; [`super::Net::ensure_routes`] only reads, calls [`plan`] and
//! executes.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;

use super::{RouteConflict, ROUTE_PROTOCOL};

/// The metric the kernel gives an IPv6 route added without one
/// (`IP6_RT_PRIO_USER`). IPv4 routes default to 0, which the kernel does not
/// even report.
const IPV6_DEFAULT_METRIC: u32 = 1024;

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
            indirect,
        })
    }

    pub fn is_ours(&self) -> bool {
        self.protocol == ROUTE_PROTOCOL
    }

    /// Whether this is exactly the route [`add_message`] creates for its
    /// destination and `oif`, as the kernel reports it back. Anything else of
    /// ours at a wanted destination gets replaced.
    fn is_exactly(&self, oif: u32) -> bool {
        let v4 = self.destination.addr().is_ipv4();
        self.is_ours()
            && self.oif == Some(oif)
            && !self.indirect
            && self.kind == RouteType::Unicast
            && self.tos == 0
            && self.in_default_slot()
            // The kernel always reports IPv6 routes as scope universe.
            && (!v4 || self.scope == RouteScope::Link)
    }

    /// Whether a replace of the default route for this destination would hit
    /// this one: the kernel keys routes by (destination, tos, metric).
    fn in_default_slot(&self) -> bool {
        let default = if self.destination.addr().is_ipv4() {
            0
        } else {
            IPV6_DEFAULT_METRIC
        };
        self.tos == 0 && self.priority.unwrap_or(default) == default
    }
}

/// The writes that take the main table from what it holds to what wgmesh
/// wants. Empty when everything is in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoutePlan {
    /// Wanted destinations with no route at all: add ours (exclusive create).
    pub add: Vec<IpNet>,
    /// Wanted destinations where only a stale route of ours exists (another
    /// interface, scope, type…): replace it atomically, so there is no
    /// instant in which the destination falls through to the default route.
    pub replace: Vec<IpNet>,
    /// Routes of ours to delete: no longer wanted, or superfluous next to
    /// the right one. Every one has `protocol == ROUTE_PROTOCOL`.
    pub delete: Vec<RouteEntry>,
    /// Foreign routes at wanted destinations; wgmesh writes nothing there.
    pub conflicts: Vec<RouteConflict>,
}

impl RoutePlan {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.replace.is_empty() && self.delete.is_empty()
    }
}

/// Plans the main table: one route of ours per wanted CIDR, to `oif`.
///
/// Ownership is by protocol number alone: a route whose protocol is not
/// [`ROUTE_PROTOCOL`] is never deleted or replaced. A destination that
/// already has a foreign route is hands-off entirely — even our own route
/// there is left as it is — because on IPv4 a replace could hit the foreign
/// route (same destination, tos and metric), and adding a second route there
/// would only compete with whoever put it there. It is reported instead.
pub(crate) fn plan(existing: &[RouteEntry], wanted: &[IpNet], oif: u32) -> RoutePlan {
    // The kernel rejects host bits in a destination; compare canonical forms.
    let wanted: BTreeSet<IpNet> = wanted.iter().map(IpNet::trunc).collect();
    let mut plan = RoutePlan::default();

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
        if let Some(keep) = ours.iter().position(|r| r.is_exactly(oif)) {
            plan.delete.extend(
                ours.iter()
                    .enumerate()
                    .filter(|&(i, _)| i != keep)
                    .map(|(_, r)| (*r).clone()),
            );
        } else if ours.is_empty() {
            plan.add.push(destination);
        } else {
            plan.replace.push(destination);
            // The replace lands in the default slot; ours in other slots
            // would otherwise linger beside it.
            plan.delete.extend(
                ours.iter()
                    .filter(|r| !r.in_default_slot())
                    .map(|r| (*r).clone()),
            );
        }
    }

    plan.delete.extend(
        existing
            .iter()
            .filter(|r| r.is_ours() && !wanted.contains(&r.destination))
            .cloned(),
    );
    plan
}

/// The route wgmesh owns for `destination`: main table, unicast, `dev oif`,
/// scope link (IPv4; the kernel has no scope for IPv6 routes), our protocol,
/// the kernel's default metric.
pub(crate) fn add_message(destination: IpNet, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let h = &mut msg.header;
    h.address_family = family(&destination);
    h.destination_prefix_length = destination.prefix_len();
    h.table = RouteHeader::RT_TABLE_MAIN;
    h.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    h.kind = RouteType::Unicast;
    h.scope = match destination {
        IpNet::V4(_) => RouteScope::Link,
        IpNet::V6(_) => RouteScope::Universe,
    };
    msg.attributes
        .push(RouteAttribute::Destination(destination.addr().into()));
    msg.attributes.push(RouteAttribute::Oif(oif));
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

    const WG: u32 = 7;
    const OTHER: u32 = 3;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Our route as the kernel reports it back.
    fn ours(dst: &str, oif: u32) -> RouteEntry {
        RouteEntry::from_message(&dumped(add_message(net(dst), oif))).unwrap()
    }

    fn foreign(dst: &str, protocol: u8, oif: u32) -> RouteEntry {
        RouteEntry {
            protocol,
            ..ours(dst, oif)
        }
    }

    /// What a dump adds to a route we sent: IPv6 gets the default metric
    /// and scope universe; IPv4 keeps no metric attribute.
    fn dumped(mut msg: RouteMessage) -> RouteMessage {
        if msg.header.address_family == AddressFamily::Inet6 {
            msg.attributes
                .push(RouteAttribute::Priority(IPV6_DEFAULT_METRIC));
            msg.header.scope = RouteScope::Universe;
        }
        msg.attributes.push(RouteAttribute::Table(254));
        msg
    }

    #[test]
    fn adds_missing_routes_per_family() {
        let p = plan(&[], &[net("10.244.0.0/16"), net("fd00:244::/48")], WG);
        assert_eq!(p.add, vec![net("10.244.0.0/16"), net("fd00:244::/48")]);
        assert!(p.replace.is_empty() && p.delete.is_empty() && p.conflicts.is_empty());
    }

    #[test]
    fn nothing_to_do_when_in_place() {
        let existing = [
            ours("10.244.0.0/16", WG),
            ours("fd00:244::/48", WG),
            foreign("0.0.0.0/0", 4, OTHER),
            foreign("192.168.1.0/24", 2, OTHER),
        ];
        let p = plan(&existing, &[net("10.244.0.0/16"), net("fd00:244::/48")], WG);
        assert!(p.is_empty(), "{p:?}");
        assert!(p.conflicts.is_empty());
    }

    #[test]
    fn host_bits_and_duplicates_are_canonicalised() {
        let existing = [ours("10.244.0.0/16", WG)];
        let p = plan(&existing, &[net("10.244.3.4/16"), net("10.244.0.0/16")], WG);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn our_route_to_another_interface_is_replaced() {
        let existing = [ours("10.244.0.0/16", OTHER), ours("fd00::/48", OTHER)];
        let p = plan(&existing, &[net("10.244.0.0/16"), net("fd00::/48")], WG);
        assert_eq!(p.replace, vec![net("10.244.0.0/16"), net("fd00::/48")]);
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
        assert_eq!(p.replace, vec![net("10.244.0.0/16"), net("10.245.0.0/16")]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn ours_in_another_metric_slot_is_deleted_beside_the_replace() {
        let mut other_metric = ours("10.244.0.0/16", OTHER);
        other_metric.priority = Some(50);
        let p = plan(
            std::slice::from_ref(&other_metric),
            &[net("10.244.0.0/16")],
            WG,
        );
        assert_eq!(p.replace, vec![net("10.244.0.0/16")]);
        assert_eq!(p.delete, vec![other_metric]);
    }

    #[test]
    fn superfluous_ours_beside_the_right_one_is_deleted() {
        let mut extra = ours("10.244.0.0/16", OTHER);
        extra.priority = Some(50);
        let existing = [extra.clone(), ours("10.244.0.0/16", WG)];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert!(p.add.is_empty() && p.replace.is_empty());
        assert_eq!(p.delete, vec![extra]);
    }

    #[test]
    fn unwanted_ours_is_deleted_foreign_never() {
        let existing = [
            ours("10.244.0.0/16", WG),
            ours("fd00::/48", WG),
            foreign("10.96.0.0/12", 4, WG),
            foreign("fd01::/48", 3, WG),
            foreign("10.0.0.0/8", 186, OTHER),
        ];
        let p = plan(&existing, &[net("fd00::/48")], WG);
        assert_eq!(p.delete, vec![ours("10.244.0.0/16", WG)]);
        assert!(p.add.is_empty() && p.replace.is_empty() && p.conflicts.is_empty());
        // With nothing wanted, all of ours go and only ours.
        let p = plan(&existing, &[], WG);
        assert_eq!(
            p.delete,
            vec![ours("10.244.0.0/16", WG), ours("fd00::/48", WG)]
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
        // Beside a stale route of ours: no replace either (on IPv4 it could
        // hit the foreign route).
        let existing = [
            ours("10.244.0.0/16", OTHER),
            foreign("10.244.0.0/16", 4, OTHER),
        ];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(p.conflicts.len(), 1);
        // Same prefix length but another network is no conflict.
        let existing = [foreign("10.245.0.0/16", 4, OTHER)];
        let p = plan(&existing, &[net("10.244.0.0/16")], WG);
        assert_eq!(p.add, vec![net("10.244.0.0/16")]);
        assert!(p.conflicts.is_empty());
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

        let mut local = add_message(net("10.1.2.3/32"), 1);
        local.header.table = 255;
        assert!(RouteEntry::from_message(&local).is_none());
        let mut high_table = add_message(net("10.1.2.3/32"), 1);
        high_table.header.table = 252; // RT_TABLE_COMPAT: the id is in RTA_TABLE
        high_table.attributes.push(RouteAttribute::Table(1000));
        assert!(RouteEntry::from_message(&high_table).is_none());
    }

    #[test]
    fn messages_carry_our_protocol() {
        let add = add_message(net("10.244.0.0/16"), WG);
        assert_eq!(u8::from(add.header.protocol), ROUTE_PROTOCOL);
        assert_eq!(add.header.scope, RouteScope::Link);
        assert_eq!(add.header.destination_prefix_length, 16);
        let add6 = add_message(net("fd00::/48"), WG);
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
}
