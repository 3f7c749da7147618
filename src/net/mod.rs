//! Links, routes and MTU through rtnetlink: the part of the data path that is
//! not WireGuard itself (shared/DESIGN.md, "Data path").
//!
//! Every operation reads first and writes only the difference, so an agent
//! that reconciles every few seconds makes no netlink writes in steady state.
//!
//! Fail closed: each cluster pod CIDR gets a route in the main table to the
//! WireGuard interface. Traffic to a pod on a node that has no valid peer then
//! enters WireGuard, finds no peer whose allowed IPs cover it and is dropped,
//! instead of following the default route out of the underlay in plaintext.
//! The kernel flushes a device's routes when the device goes down or
//! disappears (the userspace data plane exits and its TUN device with it), so
//! each CIDR also gets a backstop, `blackhole <cidr> metric 4096`
//! ([`BACKSTOP_METRIC`]), which belongs to no device and stays: while the
//! interface is gone, cluster traffic is dropped locally (EINVAL to the
//! sender) rather than leaked. The agent still calls [`Net::ensure_link_up`]
//! and then [`Net::ensure_routes`] on every reconcile, not only at start, to
//! put the device route back.
//!
//! Ownership: wgmesh marks the routes it creates with [`ROUTE_PROTOCOL`] and
//! never deletes or modifies a route of any other protocol; see
//! [`Net::ensure_routes`].

mod link;
mod masq;
pub(crate) mod netlink;
mod policy;
mod routes;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use routes::RouteEntry;

pub use link::{
    check_interface_name, ensure_wireguard_link, InvalidInterfaceName, INTERFACE_NAME_RULE,
};
pub use masq::{ensure_masquerade, MasqChange, MasqSpec, MASQ_TABLE};
pub use policy::{
    Bypass, PolicyChanges, PolicyRule, PolicySpec, Protected, RouteView, RuleSelector, RuleView,
    DEFAULT_POLICY_PRIORITY, DEFAULT_POLICY_TABLE,
};

/// The route protocol (`rtm_protocol`, `ip route … proto N`) that marks the
/// routes wgmesh created: 87, 0x57, ASCII `W`.
///
/// The kernel only interprets values up to `RTPROT_STATIC` (4); the rest are
/// labels for whoever installed the route. 87 is in none of the lists that
/// matter: Linux's `include/uapi/linux/rtnetlink.h` (which assigns 0–4, 8–18,
/// 42, 99, 186–189 and 192), iproute2's `rt_protos`, nor the values other
/// Kubernetes networking is known to use (Calico's Felix labels its routes 80;
/// kube-router and routing daemons use the assigned ones). `ip route show
/// proto 87` lists exactly wgmesh's routes; operators may name it with a line
/// `87 wgmesh` in `/etc/iproute2/rt_protos.d/wgmesh.conf`.
pub const ROUTE_PROTOCOL: u8 = 87;

/// The metric of the backstop, `blackhole <cidr> metric 4096 proto 87`, that
/// sits under every cluster CIDR's device route.
///
/// Among routes to the same prefix the kernel uses the one with the lowest
/// metric, so the backstop must be higher than the device route's (0 on
/// IPv4, 1024 on IPv6: the kernel's defaults, which wgmesh leaves in place):
/// lower, and it would drop all cluster traffic even with the interface up;
/// equal, and it would be the same slot, which holds one route. 4096 is
/// above both defaults and above the small metrics that DHCP clients and
/// routing daemons use, and says nothing else: it only ever matters once the
/// device route is gone.
pub const BACKSTOP_METRIC: u32 = 4096;

/// What WireGuard adds to every packet in the worst case: an outer IPv6
/// header (40), UDP (8) and the data message header and tag (16 + 16).
pub const WIREGUARD_OVERHEAD: u16 = 80;

/// The WireGuard interface MTU for an underlay MTU ("underlay MTU − 80").
pub const fn tunnel_mtu(underlay: u16) -> u16 {
    underlay.saturating_sub(WIREGUARD_OVERHEAD)
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open an rtnetlink socket: {source}")]
    Connect {
        #[source]
        source: std::io::Error,
    },
    #[error("Net::connect needs a tokio runtime to run the rtnetlink connection on")]
    NoRuntime,
    #[error(transparent)]
    InvalidName(#[from] InvalidInterfaceName),
    #[error("creating wireguard link {interface}: {source}")]
    CreateLink {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interface {name} does not exist")]
    LinkNotFound { name: String },
    #[error("{op} interface {name}: {source}")]
    Link {
        op: String,
        name: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{op} route {destination} dev {interface} proto {ROUTE_PROTOCOL}: {source}")]
    Route {
        op: &'static str,
        destination: IpNet,
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error(
        "{op} route blackhole {destination} metric {BACKSTOP_METRIC} proto {ROUTE_PROTOCOL}: {source}"
    )]
    Backstop {
        op: &'static str,
        destination: IpNet,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("listing the {family} routes of the main table: {source}")]
    RouteDump {
        family: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("looking up the route towards {towards}: {source}")]
    RouteGet {
        towards: IpAddr,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("the kernel's route towards {towards} has no output interface")]
    NoRouteTowards { towards: IpAddr },
    #[error(
        "reading interface #{index} (the route towards {towards} leaves through it): {source}"
    )]
    UnderlayLink {
        towards: IpAddr,
        index: u32,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("adding address {address} to {interface}: {source}")]
    AddressAdd {
        address: IpNet,
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("listing interface addresses: {source}")]
    AddressDump {
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("invalid policy routing configuration: {reason}")]
    InvalidPolicy { reason: String },
    #[error("{op} route {route} table {table} proto {ROUTE_PROTOCOL}: {source}")]
    PolicyRoute {
        op: &'static str,
        route: String,
        table: u32,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{op} rule {rule}: {source}")]
    Rule {
        op: &'static str,
        rule: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("listing the {family} rules: {source}")]
    RuleDump {
        family: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error(
        "host encryption needs Linux 4.17 or later: this kernel keeps no rule protocol, \
         so it would also drop the ipproto/sport/dport selectors that exempt WireGuard \
         and API traffic"
    )]
    HostEncryptionUnsupported,
    #[error("nft (nftables) not found: install nftables or pass --masquerade false")]
    NftMissing,
    #[error("running nft to {op}: {source}")]
    NftSpawn {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nft failed to {op}: {stderr}")]
    Nft { op: &'static str, stderr: String },
    #[error("nft's output for {op} is not what wgmesh understands: {reason}")]
    NftOutput { op: &'static str, reason: String },
}

impl NetError {
    /// The kernel's errno when the kernel refused the request (e.g.
    /// `libc::ENETDOWN` for a route through a down interface).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Link { source, .. }
            | NetError::Route { source, .. }
            | NetError::Backstop { source, .. }
            | NetError::RouteDump { source, .. }
            | NetError::RouteGet { source, .. }
            | NetError::UnderlayLink { source, .. }
            | NetError::AddressAdd { source, .. }
            | NetError::AddressDump { source }
            | NetError::PolicyRoute { source, .. }
            | NetError::Rule { source, .. }
            | NetError::RuleDump { source, .. } => errno(source),
            NetError::Connect { source }
            | NetError::CreateLink { source, .. }
            | NetError::NftSpawn { source, .. } => source.raw_os_error(),
            NetError::NoRuntime
            | NetError::InvalidName(_)
            | NetError::LinkNotFound { .. }
            | NetError::NoRouteTowards { .. }
            | NetError::InvalidPolicy { .. }
            | NetError::HostEncryptionUnsupported
            | NetError::NftMissing
            | NetError::Nft { .. }
            | NetError::NftOutput { .. } => None,
        }
    }
}

/// What [`Net::ensure_link_up`] changed; empty when nothing differed (and
/// then nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkChange {
    /// The interface's index, read on the way.
    pub index: u32,
    /// `Some(previous)` when the MTU was set; the previous value is `None`
    /// only if the kernel did not report one.
    pub mtu_changed_from: Option<Option<u32>>,
    /// The interface was down and has been brought up.
    pub brought_up: bool,
}

impl LinkChange {
    pub fn is_empty(&self) -> bool {
        self.mtu_changed_from.is_none() && !self.brought_up
    }
}

/// Which of its two routes per cluster CIDR wgmesh means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// `<cidr> dev <interface> proto 87` at the kernel's default metric:
    /// cluster traffic goes into WireGuard.
    Device,
    /// `blackhole <cidr> metric 4096 proto 87`: drops cluster traffic while
    /// the device route is missing (see [`BACKSTOP_METRIC`]).
    Backstop,
}

/// One route of ours: a cluster CIDR and which of its two routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterRoute {
    pub destination: IpNet,
    pub kind: RouteKind,
}

impl ClusterRoute {
    pub fn device(destination: IpNet) -> ClusterRoute {
        ClusterRoute {
            destination,
            kind: RouteKind::Device,
        }
    }

    pub fn backstop(destination: IpNet) -> ClusterRoute {
        ClusterRoute {
            destination,
            kind: RouteKind::Backstop,
        }
    }
}

impl fmt::Display for ClusterRoute {
    /// `10.244.0.0/16` or `blackhole 10.244.0.0/16 metric 4096`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Device => write!(f, "{}", self.destination),
            RouteKind::Backstop => {
                write!(f, "blackhole {} metric {BACKSTOP_METRIC}", self.destination)
            }
        }
    }
}

/// What [`Net::ensure_routes`] did, for the agent's logs and metrics. Each
/// list holds device routes and backstops alike, one entry per route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChanges {
    /// Routes created.
    pub added: Vec<ClusterRoute>,
    /// Routes of ours that were not what they should be (another interface,
    /// scope or type) and were replaced in place, atomically.
    pub replaced: Vec<ClusterRoute>,
    /// Routes of ours deleted: no longer wanted, or a leftover beside the
    /// right one. A route that sat in the backstop's metric slot is reported
    /// as a backstop, anything else as a device route.
    pub removed: Vec<ClusterRoute>,
    /// Foreign routes (another protocol) at a wanted destination. wgmesh
    /// writes nothing at such a destination; someone has to resolve it.
    /// Reported on every call for as long as the conflict lasts.
    pub conflicts: Vec<RouteConflict>,
    /// The interface was not given or does not exist: only the backstops
    /// were planned.
    pub interface_missing: bool,
}

impl RouteChanges {
    /// No netlink write happened.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.replaced.is_empty() && self.removed.is_empty()
    }
}

impl fmt::Display for RouteChanges {
    /// `added 4 (2 backstops), replaced 1, removed 0, conflicts 1`: counts
    /// of routes, naming how many of them are backstops when any are.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn count(routes: &[ClusterRoute]) -> String {
            let backstops = routes
                .iter()
                .filter(|r| r.kind == RouteKind::Backstop)
                .count();
            match backstops {
                0 => routes.len().to_string(),
                1 => format!("{} (1 backstop)", routes.len()),
                n => format!("{} ({n} backstops)", routes.len()),
            }
        }
        write!(
            f,
            "added {}, replaced {}, removed {}, conflicts {}",
            count(&self.added),
            count(&self.replaced),
            count(&self.removed),
            self.conflicts.len()
        )
    }
}

/// A route wgmesh did not create, to a destination it wants to route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConflict {
    pub destination: IpNet,
    /// The foreign route's protocol (4 = static, 2 = kernel, 186 = bgp…).
    pub protocol: u8,
    /// Its output interface, if it has a single one.
    pub interface_index: Option<u32>,
}

impl fmt::Display for RouteConflict {
    /// `10.244.0.0/16 proto static ifindex 3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} proto {}",
            self.destination,
            protocol_name(self.protocol)
        )?;
        if let Some(index) = self.interface_index {
            write!(f, " ifindex {index}")?;
        }
        Ok(())
    }
}

/// An address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub interface: String,
    pub index: u32,
    pub interface_up: bool,
    pub address: IpAddr,
    pub prefix_len: u8,
    /// `ifa_scope`: 0 universe, 200 site, 253 link, 254 host.
    pub scope: u8,
}

/// An rtnetlink connection of the network namespace the calling thread was
/// in when [`Net::connect`] ran.
pub struct Net {
    handle: rtnetlink::Handle,
}

impl Net {
    /// Opens the socket and spawns its connection task on the current tokio
    /// runtime. The task ends when the last handle (this `Net`) is dropped.
    pub fn connect() -> Result<Net> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetError::Connect { source })?;
        runtime.spawn(connection);
        Ok(Net { handle })
    }

    /// The MTU of the interface that holds `addr` (the node's own underlay
    /// address), `None` if no interface has it. Asking the route towards our
    /// own address would answer with the loopback's MTU.
    pub async fn mtu_of_address(&self, addr: IpAddr) -> Result<Option<u16>> {
        let Some(found) = self
            .interface_addresses()
            .await?
            .into_iter()
            .find(|a| a.address == addr)
        else {
            return Ok(None);
        };
        let Some(link) = self.link_by_name(&found.interface).await? else {
            return Ok(None);
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(u16::try_from(*m).unwrap_or(u16::MAX)),
            _ => None,
        }))
    }

    /// The index of interface `name`, `None` if there is no such interface.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.link_by_name(name).await?.map(|l| l.header.index))
    }

    /// Sets interface `name`'s MTU and IFF_UP, each only if it differs, in
    /// one message; writes nothing when both are already right.
    pub async fn ensure_link_up(&self, name: &str, mtu: u16) -> Result<LinkChange> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: name.to_owned(),
            })?;
        let current_mtu = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        let change = LinkChange {
            index: link.header.index,
            mtu_changed_from: (current_mtu != Some(u32::from(mtu))).then_some(current_mtu),
            brought_up: !link.header.flags.contains(LinkFlags::Up),
        };
        if change.is_empty() {
            return Ok(change);
        }

        let mut msg = LinkUnspec::new_with_index(change.index);
        let mut op = Vec::new();
        if change.mtu_changed_from.is_some() {
            msg = msg.mtu(u32::from(mtu));
            op.push(format!("setting MTU {mtu}"));
        }
        if change.brought_up {
            msg = msg.up();
            op.push("bringing up".to_owned());
        }
        let op = op.join(" and ");
        self.handle
            .link()
            .change(msg.build())
            .execute()
            .await
            .map_err(|source| NetError::Link {
                op: op.clone(),
                name: name.to_owned(),
                source: Box::new(source),
            })?;
        tracing::debug!(interface = name, "{op}");
        Ok(change)
    }

    /// The MTU of the path the kernel would use to reach `towards` (`ip route
    /// get`): the route's own `mtu` metric if it has one and it is lower,
    /// else the output interface's MTU. Values above 65535 (loopback's 65536)
    /// saturate.
    pub async fn underlay_mtu(&self, towards: IpAddr) -> Result<u16> {
        let mut query = RouteMessage::default();
        query.header.address_family = match towards {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        query.header.destination_prefix_length = if towards.is_ipv4() { 32 } else { 128 };
        query
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(towards)));
        // A request with a destination is a lookup, not a dump.
        let found = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|source| NetError::RouteGet {
                towards,
                source: Box::new(source),
            })?;

        let mut oif = None;
        let mut route_mtu = None;
        for attr in found.iter().flat_map(|r| &r.attributes) {
            match attr {
                RouteAttribute::Oif(i) => oif = oif.or(Some(*i)),
                RouteAttribute::Metrics(metrics) => {
                    for m in metrics {
                        if let RouteMetric::Mtu(mtu) = m {
                            route_mtu = Some(*mtu).filter(|&m| m > 0);
                        }
                    }
                }
                _ => {}
            }
        }
        let index = oif.ok_or(NetError::NoRouteTowards { towards })?;
        let links = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|source| NetError::UnderlayLink {
                towards,
                index,
                source: Box::new(source),
            })?;
        let link_mtu = links
            .iter()
            .flat_map(|l| &l.attributes)
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            });
        let mtu = match (route_mtu, link_mtu) {
            (Some(r), Some(l)) => r.min(l),
            (Some(m), None) | (None, Some(m)) => m,
            (None, None) => return Err(NetError::NoRouteTowards { towards }),
        };
        Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
    }

    /// Adds each of `addresses` (host addresses: `/32`, `/128`) to
    /// interface `name` unless it is there; returns the ones added. Other
    /// addresses on the interface are left alone. The agent puts the node's
    /// pod gateway address here so the device routes can carry it as their
    /// preferred source before any pod (and so the CNI bridge) exists.
    pub async fn ensure_addresses(&self, name: &str, addresses: &[IpNet]) -> Result<Vec<IpNet>> {
        let index = self
            .link_index(name)
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                name: name.to_owned(),
            })?;
        let have: Vec<(IpAddr, u8)> = self
            .interface_addresses()
            .await?
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| (a.address, a.prefix_len))
            .collect();
        let mut added = Vec::new();
        for net in addresses {
            if have.contains(&(net.addr(), net.prefix_len())) {
                continue;
            }
            self.handle
                .address()
                .add(index, net.addr(), net.prefix_len())
                .execute()
                .await
                .map_err(|source| NetError::AddressAdd {
                    address: *net,
                    interface: name.to_owned(),
                    source: Box::new(source),
                })?;
            added.push(*net);
        }
        Ok(added)
    }

    /// Every address on every interface, for picking the node's endpoint.
    pub async fn interface_addresses(&self) -> Result<Vec<InterfaceAddress>> {
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
        let addresses = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(|source| NetError::AddressDump {
                source: Box::new(source),
            })?;
        Ok(addresses
            .iter()
            .filter_map(|a| interface_address(a, &links))
            .collect())
    }

    /// Makes the main table hold exactly two routes of ours per CIDR in
    /// `cidrs` (IPv4 and/or IPv6; host bits are ignored), both protocol
    /// [`ROUTE_PROTOCOL`]:
    ///
    /// - the device route: unicast, scope link, `dev interface`, the
    ///   kernel's default metric;
    /// - the backstop: `blackhole`, metric [`BACKSTOP_METRIC`], no device,
    ///   so it survives the interface and drops cluster traffic while the
    ///   device route is gone.
    ///
    /// The rules:
    ///
    /// - a missing route is added (backstops first);
    /// - a route of ours in a wanted route's metric slot that is not that
    ///   route (another interface, scope, type) is replaced in place
    ///   (atomic, so the destination never falls through meanwhile);
    /// - routes of ours to destinations no longer wanted, and leftovers
    ///   beside the right ones, are deleted (backstops last);
    /// - a route of another protocol is never deleted or modified. If one
    ///   exists at a wanted destination, whatever its metric, that
    ///   destination is left entirely alone and reported in
    ///   [`RouteChanges::conflicts`].
    ///
    /// Reads both families' main table once and writes nothing when all is
    /// in place. The interface must be up (the kernel refuses routes through
    /// a down device, and flushes them when it goes down); the backstops are
    /// written before the device routes, so they are in place even when the
    /// device route then fails. Stops at the first failed write; the next
    /// call picks up from whatever was applied.
    ///
    /// `interface: None` (the agent starting, before any device exists), or
    /// an interface that does not exist (yet): only the backstops are
    /// written, and [`RouteChanges::interface_missing`] says so. `prefsrc`
    /// gives, per family, the source address the device routes carry.
    pub async fn ensure_routes(
        &self,
        interface: Option<&str>,
        cidrs: &[IpNet],
        prefsrc: &[IpAddr],
    ) -> Result<RouteChanges> {
        let oif = match interface {
            Some(name) => self.link_index(name).await?,
            None => None,
        };
        let device = oif.map(|oif| routes::Device {
            oif,
            prefsrc: prefsrc.to_vec(),
        });
        let interface = interface.unwrap_or("-");
        let existing = self.main_table().await?;
        let plan = routes::plan(&existing, cidrs, device.as_ref());
        let oif = device.unwrap_or_default();
        let route_error = |op, route: ClusterRoute| {
            move |source| match route.kind {
                RouteKind::Device => NetError::Route {
                    op,
                    destination: route.destination,
                    interface: interface.to_owned(),
                    source: Box::new(source),
                },
                RouteKind::Backstop => NetError::Backstop {
                    op,
                    destination: route.destination,
                    source: Box::new(source),
                },
            }
        };
        let mut changes = RouteChanges {
            conflicts: plan.conflicts.clone(),
            interface_missing: oif.oif == 0,
            ..RouteChanges::default()
        };
        if plan.is_empty() {
            return Ok(changes);
        }

        for route in plan.add {
            self.handle
                .route()
                .add(routes::add_message(route, &oif))
                .execute()
                .await
                .map_err(route_error("adding", route))?;
            tracing::debug!(%route, interface, "added route");
            changes.added.push(route);
        }
        for route in plan.replace {
            self.handle
                .route()
                .add(routes::add_message(route, &oif))
                .replace()
                .execute()
                .await
                .map_err(route_error("replacing", route))?;
            tracing::debug!(%route, interface, "replaced route");
            changes.replaced.push(route);
        }
        for entry in plan.delete {
            let route = ClusterRoute {
                destination: entry.destination,
                kind: entry.role(),
            };
            match self
                .handle
                .route()
                .del(routes::delete_message(&entry))
                .execute()
                .await
            {
                Ok(()) => {}
                // Gone already (its device went away, or someone removed it
                // after our dump): the outcome we wanted.
                Err(e) if errno(&e) == Some(libc::ESRCH) => continue,
                Err(e) => return Err(route_error("deleting", route)(e)),
            }
            tracing::debug!(%route, "deleted route");
            changes.removed.push(route);
        }
        Ok(changes)
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        check_interface_name(name)?;
        let request = self.handle.link().get().match_name(name).execute();
        match request.try_collect::<Vec<_>>().await {
            Ok(links) => Ok(links.into_iter().next()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(NetError::Link {
                op: "reading".to_owned(),
                name: name.to_owned(),
                source: Box::new(source),
            }),
        }
    }

    /// The destinations of wgmesh's own routes (protocol 87) in the main
    /// table: what an earlier run programmed (cluster CIDRs and extra
    /// prefixes), sorted and deduplicated.
    pub async fn our_destinations(&self) -> Result<Vec<IpNet>> {
        let mut out: Vec<IpNet> = self
            .main_table()
            .await?
            .into_iter()
            .filter(RouteEntry::is_ours)
            .map(|r| r.destination)
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The main table's IPv4 and IPv6 routes.
    async fn main_table(&self) -> Result<Vec<RouteEntry>> {
        Ok(self
            .route_messages()
            .await?
            .iter()
            .filter_map(RouteEntry::from_message)
            .collect())
    }

    /// Every IPv4 and IPv6 route of every table, as the kernel sends them.
    /// (Without strict checking, which rtnetlink does not enable, the kernel
    /// ignores a table filter in a dump request and sends them all anyway.)
    pub(crate) async fn route_messages(&self) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        let dumps = [
            (
                "IPv4",
                AddressFamily::Inet,
                RouteMessageBuilder::<Ipv4Addr>::new().build(),
            ),
            (
                "IPv6",
                AddressFamily::Inet6,
                RouteMessageBuilder::<Ipv6Addr>::new().build(),
            ),
        ];
        for (family, af, query) in dumps {
            match self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect::<Vec<_>>()
                .await
            {
                // Filter on the family: a kernel without IPv6 answers an
                // AF_INET6 dump with every family's routes.
                Ok(msgs) => out.extend(msgs.into_iter().filter(|m| m.header.address_family == af)),
                Err(e) if af == AddressFamily::Inet6 && errno(&e) == Some(libc::EAFNOSUPPORT) => {}
                Err(source) => {
                    return Err(NetError::RouteDump {
                        family,
                        source: Box::new(source),
                    })
                }
            }
        }
        Ok(out)
    }
}

/// The positive errno of a netlink error answer.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn protocol_name(protocol: u8) -> String {
    match RouteProtocol::from(protocol) {
        RouteProtocol::Other(n) => n.to_string(),
        named => named.to_string(),
    }
}

fn interface_address(msg: &AddressMessage, links: &[LinkMessage]) -> Option<InterfaceAddress> {
    // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on a
    // point-to-point link and only the address where there is no IFA_LOCAL.
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    let index = msg.header.index;
    let link = links.iter().find(|l| l.header.index == index);
    Some(InterfaceAddress {
        interface: link
            .and_then(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
            })
            .unwrap_or_default(),
        index,
        interface_up: link.is_some_and(|l| l.header.flags.contains(LinkFlags::Up)),
        address: local.or(address)?,
        prefix_len: msg.header.prefix_len,
        scope: msg.header.scope.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_mtu_is_underlay_minus_80() {
        assert_eq!(tunnel_mtu(1500), 1420);
        assert_eq!(tunnel_mtu(9001), 8921);
        assert_eq!(tunnel_mtu(40), 0);
    }

    #[test]
    fn errors_name_the_operation_and_object() {
        let e = NetError::Route {
            op: "adding",
            destination: "10.244.0.0/16".parse().unwrap(),
            interface: "wgmesh0".into(),
            source: Box::new(rtnetlink::Error::RequestFailed),
        };
        let s = e.to_string();
        assert!(
            s.starts_with("adding route 10.244.0.0/16 dev wgmesh0 proto 87"),
            "{s}"
        );
        let e = NetError::Backstop {
            op: "deleting",
            destination: "fd00::/48".parse().unwrap(),
            source: Box::new(rtnetlink::Error::RequestFailed),
        };
        let s = e.to_string();
        assert!(
            s.starts_with("deleting route blackhole fd00::/48 metric 4096 proto 87"),
            "{s}"
        );
        let e = NetError::Link {
            op: "setting MTU 1420 and bringing up".into(),
            name: "wgmesh0".into(),
            source: Box::new(rtnetlink::Error::RequestFailed),
        };
        assert!(e
            .to_string()
            .starts_with("setting MTU 1420 and bringing up interface wgmesh0"));
    }

    #[test]
    fn changes_display_counts_and_conflicts_name_protocols() {
        let c = RouteConflict {
            destination: "10.244.0.0/16".parse().unwrap(),
            protocol: 4,
            interface_index: Some(3),
        };
        assert_eq!(c.to_string(), "10.244.0.0/16 proto static ifindex 3");
        let c = RouteConflict {
            protocol: 200,
            interface_index: None,
            ..c
        };
        assert_eq!(c.to_string(), "10.244.0.0/16 proto 200");
        let v4: IpNet = "10.244.0.0/16".parse().unwrap();
        let v6: IpNet = "fd00::/48".parse().unwrap();
        let changes = RouteChanges {
            added: vec![ClusterRoute::device(v4)],
            conflicts: vec![c],
            ..Default::default()
        };
        assert_eq!(
            changes.to_string(),
            "added 1, replaced 0, removed 0, conflicts 1"
        );
        assert!(!changes.is_empty());
        let changes = RouteChanges {
            added: vec![
                ClusterRoute::backstop(v4),
                ClusterRoute::backstop(v6),
                ClusterRoute::device(v4),
                ClusterRoute::device(v6),
            ],
            replaced: vec![ClusterRoute::device(v4)],
            removed: vec![ClusterRoute::device(v6), ClusterRoute::backstop(v6)],
            conflicts: vec![],
            interface_missing: false,
        };
        assert_eq!(
            changes.to_string(),
            "added 4 (2 backstops), replaced 1, removed 2 (1 backstop), conflicts 0"
        );
        assert_eq!(ClusterRoute::device(v4).to_string(), "10.244.0.0/16");
        assert_eq!(
            ClusterRoute::backstop(v6).to_string(),
            "blackhole fd00::/48 metric 4096"
        );
        let backstops_only = RouteChanges {
            added: vec![ClusterRoute::backstop(v4)],
            ..Default::default()
        };
        assert!(!backstops_only.is_empty());
    }

    #[test]
    fn connect_needs_a_runtime() {
        assert!(matches!(Net::connect(), Err(NetError::NoRuntime)));
    }
}
