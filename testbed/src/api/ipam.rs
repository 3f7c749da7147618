//! Node pod-CIDR allocation, as kube-controller-manager's range allocator does it with
//! `--allocate-node-cidrs --cluster-cidr=... --node-cidr-mask-size-ipv4/ipv6`.
//!
//! One subnet per configured cluster CIDR (at most one per family, in the configured
//! order, which makes the first one the node's primary `spec.podCIDR`). A subnet is free
//! when it overlaps no pod CIDR of any stored Node, so CIDRs come back when a Node is
//! deleted and CIDRs a creator chose itself are never handed out twice. Unlike the real
//! controller, allocation happens inside the create, so no client ever sees a
//! controller-managed Node without `spec.podCIDRs`.

use ipnet::IpNet;

/// The allocator's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    /// Cluster pod CIDRs (`--cluster-cidr`); empty disables allocation.
    pub cluster_cidrs: Vec<IpNet>,
    /// Prefix length of each node's IPv4 pod CIDR (controller-manager default 24).
    pub node_mask_v4: u8,
    /// Prefix length of each node's IPv6 pod CIDR (controller-manager default 64).
    pub node_mask_v6: u8,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: vec![IpNet::V4(ipnet::Ipv4Net::new_assert(
                std::net::Ipv4Addr::new(10, 244, 0, 0),
                16,
            ))],
            node_mask_v4: 24,
            node_mask_v6: 64,
        }
    }
}

impl IpamConfig {
    /// Checks the shape the controller-manager insists on: at most one CIDR per family,
    /// canonical, and node masks no shorter than the cluster prefix.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster_cidrs.len() > 2 {
            return Err("at most two cluster CIDRs (one per family) are allowed".into());
        }
        let v4 = self
            .cluster_cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V4(_)))
            .count();
        if v4 > 1 || self.cluster_cidrs.len() - v4 > 1 {
            return Err("at most one cluster CIDR per address family is allowed".into());
        }
        for cidr in &self.cluster_cidrs {
            if cidr.trunc() != *cidr {
                return Err(format!(
                    "cluster CIDR {cidr} has host bits set (use {})",
                    cidr.trunc()
                ));
            }
            let mask = self.mask_for(cidr);
            if mask < cidr.prefix_len() || mask > cidr.max_prefix_len() {
                return Err(format!(
                    "node CIDR mask /{mask} does not fit inside cluster CIDR {cidr}"
                ));
            }
        }
        Ok(())
    }

    fn mask_for(&self, cidr: &IpNet) -> u8 {
        match cidr {
            IpNet::V4(_) => self.node_mask_v4,
            IpNet::V6(_) => self.node_mask_v6,
        }
    }

    /// The next free subnet of every cluster CIDR, or `None` when one family is exhausted
    /// (the controller then allocates nothing and raises `CIDRNotAvailable`).
    /// `used` is every pod CIDR already on a Node.
    pub fn allocate(&self, used: &[IpNet]) -> Option<Vec<IpNet>> {
        let mut out = Vec::with_capacity(self.cluster_cidrs.len());
        for cidr in &self.cluster_cidrs {
            let subnets = cidr.subnets(self.mask_for(cidr)).ok()?;
            let mut free = None;
            for candidate in subnets {
                if !used.iter().any(|u| overlaps(u, &candidate)) {
                    free = Some(candidate);
                    break;
                }
            }
            out.push(free?);
        }
        Some(out)
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_lowest_free_subnets_per_family() {
        let cfg = IpamConfig {
            cluster_cidrs: vec![net("10.244.0.0/16"), net("fd00:10:244::/56")],
            ..IpamConfig::default()
        };
        cfg.validate().unwrap();
        let first = cfg.allocate(&[]).unwrap();
        assert_eq!(first, vec![net("10.244.0.0/24"), net("fd00:10:244::/64")]);
        let used = vec![
            net("10.244.0.0/24"),
            net("fd00:10:244::/64"),
            net("10.244.1.0/24"),
        ];
        assert_eq!(
            cfg.allocate(&used).unwrap(),
            vec![net("10.244.2.0/24"), net("fd00:10:244:1::/64")]
        );
    }

    #[test]
    fn exhaustion_allocates_nothing() {
        let cfg = IpamConfig {
            cluster_cidrs: vec![net("10.0.0.0/23")],
            ..IpamConfig::default()
        };
        let used = vec![net("10.0.0.0/24"), net("10.0.1.0/24")];
        assert_eq!(cfg.allocate(&used), None);
    }

    #[test]
    fn rejects_bad_configs() {
        let two_v4 = IpamConfig {
            cluster_cidrs: vec![net("10.0.0.0/16"), net("10.1.0.0/16")],
            ..IpamConfig::default()
        };
        assert!(two_v4.validate().is_err());
        let host_bits = IpamConfig {
            cluster_cidrs: vec![net("10.0.0.1/16")],
            ..IpamConfig::default()
        };
        assert!(host_bits.validate().is_err());
        let small = IpamConfig {
            cluster_cidrs: vec![net("10.0.0.0/25")],
            ..IpamConfig::default()
        };
        assert!(small.validate().is_err());
    }
}
