//! What BIRD learned, as the kernel holds it: the routes of one kernel
//! table (BIRD's kernel protocols export BGP routes there and nowhere
//! else), dumped over rtnetlink.
//!
//! The dump asks for every route of a family and filters here: without
//! strict checking the kernel ignores a table filter in a dump request, and
//! a table id above 255 only exists in the `RTA_TABLE` attribute (the
//! header's byte then says `RT_TABLE_UNSPEC`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType, RouteVia,
};
use rtnetlink::packet_route::AddressFamily;

pub type Result<T, E = TableError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("reading the routes: {0}")]
    Net(#[source] Box<crate::net::NetError>),
}

/// The protocol number BIRD's kernel routes carry (`RTPROT_BIRD`,
/// "proto bird" in `ip route`).
pub const RTPROT_BIRD: u8 = 12;

/// One route BIRD delivered to the table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LearnedRoute {
    pub prefix: IpNet,
    /// The gateway (`RTA_GATEWAY`, or `RTA_VIA` for an IPv4 route over an
    /// IPv6 next hop). `None` for a route with no gateway or with several
    /// (multipath): wgmesh carries a prefix over exactly one peer, so such
    /// a route names no next hop it could use.
    pub next_hop: Option<IpAddr>,
    /// The route's protocol: [`RTPROT_BIRD`] for BIRD's; anything else was
    /// put into the table by someone else.
    pub protocol: u8,
}

/// Reads `msg` as a route of kernel table `table`. `None` for another
/// table, a family other than IPv4/IPv6, or a type other than unicast:
/// BIRD exports an unresolvable BGP route as `unreachable`, which is
/// nothing to forward to, and blackhole/prohibit routes are someone
/// else's.
pub fn learned_route(msg: &RouteMessage, table: u32) -> Option<LearnedRoute> {
    let header = &msg.header;
    let mut in_table = u32::from(header.table);
    let mut destination = None;
    let mut gateway = None;
    let mut multipath = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => in_table = *t,
            RouteAttribute::Destination(a) => destination = address(a),
            RouteAttribute::Gateway(a) => gateway = address(a),
            RouteAttribute::Via(v) => gateway = via(v),
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            _ => {}
        }
    }
    if in_table != table || header.kind != RouteType::Unicast {
        return None;
    }
    if let Some(hops) = multipath {
        gateway = match hops.as_slice() {
            [one] => one.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(a) => address(a),
                RouteAttribute::Via(v) => via(v),
                _ => None,
            }),
            _ => None,
        };
    }
    // No RTA_DST: the family's default route.
    let addr = match (header.address_family, destination) {
        (AddressFamily::Inet, Some(a @ IpAddr::V4(_)))
        | (AddressFamily::Inet6, Some(a @ IpAddr::V6(_))) => a,
        (AddressFamily::Inet, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (AddressFamily::Inet6, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    Some(LearnedRoute {
        prefix: IpNet::new(addr, header.destination_prefix_length).ok()?,
        next_hop: gateway,
        protocol: header.protocol.into(),
    })
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn via(v: &RouteVia) -> Option<IpAddr> {
    match v {
        RouteVia::Inet(a) => Some(IpAddr::V4(*a)),
        RouteVia::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// BIRD's table as the kernel holds it, read through the one route dump of
/// [`crate::net::Net`] (both families, every table).
pub struct TableReader {
    net: crate::net::Net,
}

impl TableReader {
    /// An rtnetlink connection of the network namespace the calling thread
    /// is in, on the current tokio runtime.
    pub fn connect() -> Result<TableReader> {
        Ok(TableReader {
            net: crate::net::Net::connect().map_err(|e| TableError::Net(Box::new(e)))?,
        })
    }

    /// Every unicast IPv4 and IPv6 route of kernel table `table` (see
    /// [`learned_route`]), sorted. A kernel without IPv6 yields the IPv4
    /// routes alone.
    pub async fn routes(&self, table: u32) -> Result<Vec<LearnedRoute>> {
        let msgs = self
            .net
            .route_messages()
            .await
            .map_err(|e| TableError::Net(Box::new(e)))?;
        let mut out: Vec<LearnedRoute> = msgs
            .iter()
            .filter_map(|m| learned_route(m, table))
            .collect();
        out.sort();
        Ok(out)
    }

    /// The routes of `table` that BIRD put there ([`RTPROT_BIRD`]).
    pub async fn bird_routes(&self, table: u32) -> Result<Vec<LearnedRoute>> {
        let mut routes = self.routes(table).await?;
        routes.retain(|r| r.protocol == RTPROT_BIRD);
        Ok(routes)
    }
}

/// The main table's id, for checking that nothing learned leaked there.
pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::route::{RouteNextHop, RouteProtocol};

    fn msg(family: AddressFamily, len: u8, table: u32, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        m.header.destination_prefix_length = len;
        m.header.kind = RouteType::Unicast;
        m.header.protocol = RouteProtocol::Bird;
        // The header byte holds ids up to 255; above that it is UNSPEC and
        // only RTA_TABLE knows.
        m.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        m.attributes = attrs;
        m.attributes.push(RouteAttribute::Table(table));
        m
    }

    fn v4(s: &str) -> RouteAddress {
        RouteAddress::Inet(s.parse().unwrap())
    }

    fn v6(s: &str) -> RouteAddress {
        RouteAddress::Inet6(s.parse().unwrap())
    }

    #[test]
    fn reads_ipv4_and_ipv6_routes() {
        let m = msg(
            AddressFamily::Inet,
            24,
            187,
            vec![
                RouteAttribute::Destination(v4("198.51.100.0")),
                RouteAttribute::Gateway(v4("10.0.0.2")),
            ],
        );
        assert_eq!(
            learned_route(&m, 187),
            Some(LearnedRoute {
                prefix: "198.51.100.0/24".parse().unwrap(),
                next_hop: Some("10.0.0.2".parse().unwrap()),
                protocol: RTPROT_BIRD,
            })
        );
        assert_eq!(learned_route(&m, 254), None);
        let m = msg(
            AddressFamily::Inet6,
            48,
            187,
            vec![
                RouteAttribute::Destination(v6("2001:db8:100::")),
                RouteAttribute::Gateway(v6("fd00::2")),
            ],
        );
        let r = learned_route(&m, 187).unwrap();
        assert_eq!(r.prefix, "2001:db8:100::/48".parse::<IpNet>().unwrap());
        assert_eq!(r.next_hop, Some("fd00::2".parse().unwrap()));
    }

    #[test]
    fn tables_above_255_come_from_the_attribute() {
        let m = msg(
            AddressFamily::Inet,
            24,
            1000,
            vec![RouteAttribute::Destination(v4("198.51.100.0"))],
        );
        assert_eq!(m.header.table, RouteHeader::RT_TABLE_UNSPEC);
        assert!(learned_route(&m, 1000).is_some());
        assert!(learned_route(&m, 1000 % 256).is_none());
        // A header byte alone (old kernels, ids below 256) is enough too.
        let mut m = msg(AddressFamily::Inet, 24, 187, vec![]);
        m.attributes.clear();
        assert_eq!(
            learned_route(&m, 187).map(|r| r.prefix),
            Some("0.0.0.0/24".parse().unwrap())
        );
    }

    #[test]
    fn default_routes_have_no_destination() {
        let m = msg(
            AddressFamily::Inet6,
            0,
            187,
            vec![RouteAttribute::Gateway(v6("fd00::2"))],
        );
        assert_eq!(
            learned_route(&m, 187).unwrap().prefix,
            "::/0".parse::<IpNet>().unwrap()
        );
        let m = msg(AddressFamily::Inet, 0, 187, vec![]);
        assert_eq!(
            learned_route(&m, 187).unwrap().prefix,
            "0.0.0.0/0".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn only_unicast_routes() {
        for kind in [
            RouteType::Unreachable,
            RouteType::BlackHole,
            RouteType::Prohibit,
        ] {
            let mut m = msg(
                AddressFamily::Inet,
                24,
                187,
                vec![RouteAttribute::Destination(v4("198.51.100.0"))],
            );
            m.header.kind = kind;
            assert_eq!(learned_route(&m, 187), None);
        }
    }

    #[test]
    fn via_and_multipath_next_hops() {
        let m = msg(
            AddressFamily::Inet,
            24,
            187,
            vec![
                RouteAttribute::Destination(v4("198.51.100.0")),
                RouteAttribute::Via(RouteVia::Inet6("fd00::2".parse().unwrap())),
            ],
        );
        assert_eq!(
            learned_route(&m, 187).unwrap().next_hop,
            Some("fd00::2".parse().unwrap())
        );
        let hop = |gw: &str| {
            let mut h = RouteNextHop::default();
            h.attributes = vec![RouteAttribute::Gateway(v4(gw))];
            h
        };
        let one = msg(
            AddressFamily::Inet,
            24,
            187,
            vec![RouteAttribute::MultiPath(vec![hop("10.0.0.2")])],
        );
        assert_eq!(
            learned_route(&one, 187).unwrap().next_hop,
            Some("10.0.0.2".parse().unwrap())
        );
        let two = msg(
            AddressFamily::Inet,
            24,
            187,
            vec![RouteAttribute::MultiPath(vec![
                hop("10.0.0.2"),
                hop("10.0.0.3"),
            ])],
        );
        assert_eq!(learned_route(&two, 187).unwrap().next_hop, None);
    }

    #[test]
    fn protocol_is_reported() {
        let mut m = msg(AddressFamily::Inet, 24, 187, vec![]);
        m.header.protocol = RouteProtocol::Static;
        assert_eq!(learned_route(&m, 187).unwrap().protocol, 4);
    }
}
