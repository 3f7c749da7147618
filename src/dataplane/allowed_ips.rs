//! Cryptokey routing table: longest-prefix match from an IP address to a peer.
//!
//! One hash map per prefix length that is in use, probed from the longest to the
//! shortest: a lookup costs one hash probe per distinct prefix length present
//! (a mesh typically has one or two), independent of the number of peers.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Maps CIDRs to values; an address resolves to the value of the most specific
/// CIDR containing it. Inserting a CIDR that is already present replaces its
/// value (WireGuard semantics: an allowed IP moves to the peer that claims it
/// last).
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: Family<T>,
    v6: Family<T>,
}

#[derive(Debug, Clone)]
struct Family<T> {
    /// (prefix length, masked address bits -> value), longest prefix first.
    levels: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Family { levels: Vec::new() },
            v6: Family { levels: Vec::new() },
        }
    }
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net` (host bits are ignored) for `value`; returns the value it
    /// displaced, if any.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        let (family, bits, len) = self.split_mut(net);
        let idx = match family.levels.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(i) => i,
            Err(i) => {
                family.levels.insert(i, (len, HashMap::new()));
                i
            }
        };
        family.levels[idx].1.insert(bits, value)
    }

    /// Removes exactly `net`; returns its value.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        let (family, bits, len) = self.split_mut(net);
        let idx = family.levels.iter().position(|(l, _)| *l == len)?;
        let old = family.levels[idx].1.remove(&bits);
        if family.levels[idx].1.is_empty() {
            family.levels.remove(idx);
        }
        old
    }

    /// Removes every entry whose value is `value`.
    pub fn remove_value(&mut self, value: &T) {
        for family in [&mut self.v4, &mut self.v6] {
            for (_, map) in &mut family.levels {
                map.retain(|_, v| v != value);
            }
            family.levels.retain(|(_, m)| !m.is_empty());
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        let (family, bits, width) = match addr {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a)), 32u8),
            IpAddr::V6(a) => (&self.v6, u128::from(a), 128u8),
        };
        family
            .levels
            .iter()
            .find_map(|(len, map)| map.get(&mask(bits, *len, width)))
    }

    /// Every (CIDR, value), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        let v4 = self.v4.levels.iter().flat_map(|(len, map)| {
            map.iter().filter_map(move |(bits, v)| {
                let addr = std::net::Ipv4Addr::from(u32::try_from(*bits).ok()?);
                Some((IpNet::V4(ipnet::Ipv4Net::new(addr, *len).ok()?), v))
            })
        });
        let v6 = self.v6.levels.iter().flat_map(|(len, map)| {
            map.iter().filter_map(move |(bits, v)| {
                let addr = std::net::Ipv6Addr::from(*bits);
                Some((IpNet::V6(ipnet::Ipv6Net::new(addr, *len).ok()?), v))
            })
        });
        v4.chain(v6)
    }

    fn split_mut(&mut self, net: IpNet) -> (&mut Family<T>, u128, u8) {
        match net {
            IpNet::V4(n) => (
                &mut self.v4,
                mask(u128::from(u32::from(n.addr())), n.prefix_len(), 32),
                n.prefix_len(),
            ),
            IpNet::V6(n) => (
                &mut self.v6,
                mask(u128::from(n.addr()), n.prefix_len(), 128),
                n.prefix_len(),
            ),
        }
    }
}

/// Keeps the top `len` bits of a `width`-bit address.
fn mask(bits: u128, len: u8, width: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let keep = u32::from(width.min(128).saturating_sub(len.min(width)));
    bits & (u128::MAX.checked_shl(keep).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.0/24"), 3);
        t.insert(net("0.0.0.0/0"), 0);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&3));
        assert_eq!(t.lookup(ip("10.1.3.3")), Some(&2));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&1));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&0));
        assert_eq!(t.lookup(ip("::1")), None);
    }

    #[test]
    fn ipv6_and_host_routes() {
        let mut t = AllowedIps::new();
        t.insert(net("fd00::/8"), 'a');
        t.insert(net("fd00::5/128"), 'b');
        assert_eq!(t.lookup(ip("fd00::5")), Some(&'b'));
        assert_eq!(t.lookup(ip("fd00::6")), Some(&'a'));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        t.insert(net("::/0"), 'z');
        assert_eq!(t.lookup(ip("fe80::1")), Some(&'z'));
    }

    #[test]
    fn host_bits_are_ignored_and_reinsert_moves_the_prefix() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("10.0.0.7/24"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.200")), Some(&2));
        assert_eq!(t.iter().count(), 1);
        assert_eq!(t.iter().next().unwrap().0, net("10.0.0.0/24"));
    }

    #[test]
    fn remove_and_remove_value() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/24"), 1);
        t.insert(net("10.0.1.0/24"), 1);
        t.insert(net("10.0.2.0/24"), 2);
        assert_eq!(t.remove(net("10.0.0.0/24")), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
        t.remove_value(&1);
        assert_eq!(t.lookup(ip("10.0.1.1")), None);
        assert_eq!(t.lookup(ip("10.0.2.1")), Some(&2));
        assert_eq!(t.iter().count(), 1);
    }
}
