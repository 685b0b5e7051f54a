//! The address a server listening on every interface registers, when it is not told one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface, as the system lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// The interface's name (`eth0`).
    pub interface: String,
    /// Whether the interface is up.
    pub up: bool,
    /// Whether it is a loopback interface.
    pub loopback: bool,
    /// The address.
    pub ip: IpAddr,
}

/// The address other hosts most likely reach this one at, from `addrs`: of the interfaces
/// that are up and not loopback, the first private IPv4 address (10/8, 172.16/12,
/// 192.168/16, 100.64/10), else the first other IPv4 address that is not link-local, else
/// (only when `ipv6` allows it: a server on `[::]`, not on 0.0.0.0) the first IPv6 address
/// that is neither link-local nor loopback. go-zero and Kratos pick an address the same way
/// when a server listens on every interface.
///
/// ```
/// use mesh_registry::{InterfaceAddr, pick_host_ip};
///
/// let addr = |interface: &str, ip: &str| InterfaceAddr {
///     interface: interface.into(),
///     up: true,
///     loopback: interface == "lo",
///     ip: ip.parse().expect("an address"),
/// };
/// let addrs = [addr("lo", "127.0.0.1"), addr("docker0", "203.0.113.1"), addr("eth0", "10.0.0.7")];
/// assert_eq!(pick_host_ip(&addrs, false), Some("10.0.0.7".parse().expect("an address")));
/// ```
pub fn pick_host_ip(addrs: &[InterfaceAddr], ipv6: bool) -> Option<IpAddr> {
    let usable = || addrs.iter().filter(|a| a.up && !a.loopback && !a.ip.is_loopback() && !a.ip.is_unspecified());
    let v4 = || {
        usable().filter_map(|a| match a.ip {
            IpAddr::V4(v4) if !v4.is_link_local() && !v4.is_broadcast() => Some(v4),
            _ => None,
        })
    };
    if let Some(private) = v4().find(is_private_v4) {
        return Some(IpAddr::V4(private));
    }
    if let Some(other) = v4().next() {
        return Some(IpAddr::V4(other));
    }
    if !ipv6 {
        return None;
    }
    usable().find_map(|a| match a.ip {
        IpAddr::V6(v6) if !is_link_local_v6(v6) => Some(IpAddr::V6(v6)),
        _ => None,
    })
}

fn is_private_v4(ip: &Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    // RFC 1918, and the shared (carrier-grade NAT) space Kubernetes networks often use.
    ip.is_private() || (a == 100 && (64..128).contains(&b))
}

fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    (ip.segments()[0] & 0xffc0) == 0xfe80
}

/// This host's interface addresses; empty where they cannot be read.
pub fn interface_addrs() -> Vec<InterfaceAddr> {
    #[cfg(unix)]
    {
        use nix::net::if_::InterfaceFlags;
        let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
        addrs
            .filter_map(|a| {
                let storage = a.address?;
                let ip = match (storage.as_sockaddr_in(), storage.as_sockaddr_in6()) {
                    (Some(v4), _) => IpAddr::V4(v4.ip()),
                    (_, Some(v6)) => IpAddr::V6(v6.ip()),
                    _ => return None,
                };
                Some(InterfaceAddr {
                    interface: a.interface_name,
                    up: a.flags.contains(InterfaceFlags::IFF_UP),
                    loopback: a.flags.contains(InterfaceFlags::IFF_LOOPBACK),
                    ip,
                })
            })
            .collect()
    }
    #[cfg(not(unix))]
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, up: bool, ip: &str) -> InterfaceAddr {
        InterfaceAddr { interface: interface.into(), up, loopback: interface == "lo", ip: ip.parse().expect("ip") }
    }

    #[test]
    fn private_ipv4_first_then_other_ipv4_then_global_ipv6_and_never_loopback_link_local_or_down() {
        let pick = |addrs: &[InterfaceAddr]| pick_host_ip(addrs, true).map(|ip| ip.to_string());
        assert_eq!(pick(&[addr("lo", true, "127.0.0.1"), addr("lo", true, "::1")]), None);
        assert_eq!(pick(&[addr("eth0", true, "fe80::1"), addr("eth1", true, "169.254.3.4")]), None);
        assert_eq!(pick(&[addr("eth0", false, "10.1.2.3")]), None, "a down interface");
        assert_eq!(
            pick(&[addr("eth0", true, "fd00::2"), addr("eth0", true, "192.0.2.2")]).as_deref(),
            Some("192.0.2.2")
        );
        assert_eq!(
            pick(&[addr("eth0", true, "203.0.113.9"), addr("eth1", true, "172.20.0.5")]).as_deref(),
            Some("172.20.0.5")
        );
        assert_eq!(
            pick(&[addr("eth0", true, "203.0.113.9"), addr("eth1", true, "100.64.1.1")]).as_deref(),
            Some("100.64.1.1")
        );
        assert_eq!(
            pick(&[addr("eth0", true, "fe80::2"), addr("eth0", true, "2001:db8::5")]).as_deref(),
            Some("2001:db8::5")
        );
        // A server on 0.0.0.0 cannot be reached at an IPv6 address.
        assert_eq!(pick_host_ip(&[addr("tap0", true, "fd02::9")], false), None);
    }
}
