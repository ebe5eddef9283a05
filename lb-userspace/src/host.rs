//! What the agent learns from the host it runs on: the node's name and addresses, the
//! interfaces of its default routes, and whether its ephemeral ports collide with source NAT.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use log::warn;

/// Says so when the node's own sockets may pick ports the datapath allocates for source NAT:
/// a reply to such a socket would be taken for a NATed flow's and sent to a client.
pub fn warn_if_ephemeral_ports_overlap_snat() {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let high: Option<u16> = range.split_whitespace().nth(1).and_then(|h| h.parse().ok());
    let reserved =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    if high.is_some_and(|h| h >= lb_common::snat::PORT_MIN) && !snat_ports_reserved(&reserved) {
        warn!(
            "net.ipv4.ip_local_port_range is {:?}: it reaches into the ports used for source NAT ({}-65535); lower its upper end below {}, or reserve them with net.ipv4.ip_local_reserved_ports",
            range.trim(),
            lb_common::snat::PORT_MIN,
            lb_common::snat::PORT_MIN
        );
    }
}

/// True when `reserved` (`ip_local_reserved_ports`: `a,b-c,...`) covers every SNAT port.
fn snat_ports_reserved(reserved: &str) -> bool {
    let ranges: Vec<(u16, u16)> = reserved
        .trim()
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    (lb_common::snat::PORT_MIN..=u16::MAX).all(|p| ranges.iter().any(|&(a, b)| a <= p && p <= b))
}

/// `$NODE_NAME` (what a DaemonSet passes from `spec.nodeName`), else the host name.
pub fn node_name_from_environment() -> Option<String> {
    if let Ok(name) = std::env::var("NODE_NAME") {
        if !name.is_empty() {
            return Some(name);
        }
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

/// The addresses of this network namespace's interfaces that are up where a NodePort can be
/// reached from outside: IPv4 ones except loopback and link-local, then IPv6 ones of global
/// scope that are usable (see `global_ipv6_addresses`). Within a family, those of the
/// interface its default route leaves by come first: the first is the source-NAT address for
/// externalIP and LoadBalancer flows, and a bridge's (docker0, cni0) would not be routable
/// from other nodes.
pub fn node_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let (v4, up) = ipv4_addresses()?;
    let default6 = default_route6_interface();
    let mut v6: Vec<(bool, Ipv6Addr)> = match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(table) => global_ipv6_addresses(&table)
            .into_iter()
            .filter(|(_, iface)| up.contains(iface))
            .map(|(addr, iface)| (default6.as_deref() != Some(&*iface), addr))
            .collect(),
        // No IPv6 in this kernel (or namespace): IPv4 only.
        Err(_) => Vec::new(),
    };
    v6.sort_by_key(|a| a.0);
    v6.dedup_by_key(|a| a.1);
    let v4 = v4.into_iter().map(IpAddr::V4);
    Ok(v4.chain(v6.into_iter().map(|a| IpAddr::V6(a.1))).collect())
}

/// The global-scope IPv6 addresses in `table` (`/proc/net/if_inet6`: address, ifindex, prefix
/// length, scope, flags, interface name, in hex), each with its interface: not loopback,
/// link-local or site-local, and not tentative (duplicate address detection is still
/// running), failed DAD, or deprecated (about to go).
fn global_ipv6_addresses(table: &str) -> Vec<(Ipv6Addr, String)> {
    // `include/net/ipv6.h` and `include/uapi/linux/if_addr.h`.
    const SCOPE_GLOBAL: u32 = 0x00;
    const IFA_F_DADFAILED: u32 = 0x08;
    const IFA_F_DEPRECATED: u32 = 0x20;
    const IFA_F_TENTATIVE: u32 = 0x40;
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = Ipv6Addr::from(u128::from_str_radix(f.first()?, 16).ok()?);
            let scope = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
            let unusable = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE;
            let usable = scope == SCOPE_GLOBAL
                && flags & unusable == 0
                && !addr.is_loopback()
                && !addr.is_unicast_link_local();
            let iface = f.get(5)?.to_string();
            usable.then_some((addr, iface))
        })
        .collect()
}

/// The IPv4 addresses `node_addresses` describes, and the names of the interfaces that are up.
fn ipv4_addresses() -> anyhow::Result<(Vec<Ipv4Addr>, Vec<String>)> {
    let default_iface = default_route_interface();
    let mut addrs: Vec<(bool, Ipv4Addr)> = Vec::new();
    let mut up_ifaces: Vec<String> = Vec::new();
    let mut ifaddrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once below.
    if unsafe { libc::getifaddrs(&mut ifaddrs) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing the node's addresses");
    }
    let mut cur = ifaddrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        if up {
            // SAFETY: getifaddrs gives every entry a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
            if !up_ifaces.iter().any(|n| *n == name) {
                up_ifaces.push(name.into_owned());
            }
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its real type.
        if !up
            || ifa.ifa_addr.is_null()
            || unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET
        {
            continue;
        }
        // SAFETY: AF_INET addresses are sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        // SAFETY: getifaddrs gives every entry a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        let on_default_route = default_iface.as_deref() == Some(&*name);
        if !addr.is_loopback() && !addr.is_link_local() && !addrs.iter().any(|a| a.1 == addr) {
            addrs.push((!on_default_route, addr));
        }
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifaddrs) };
    // Stable: otherwise in interface order.
    addrs.sort_by_key(|a| a.0);
    Ok((addrs.into_iter().map(|a| a.1).collect(), up_ifaces))
}

/// The interface of the IPv6 default route, from /proc/net/ipv6_route.
fn default_route6_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/ipv6_route").ok()?;
    default_route6_in(&table)
}

/// The interface of the IPv6 default route in `table` (`/proc/net/ipv6_route`).
fn default_route6_in(table: &str) -> Option<String> {
    // Columns: destination, its prefix length, source, its prefix length, next hop, metric,
    // refcount, use count, flags, interface; all hex. A default route has destination ::/0;
    // unreachable routes (RTF_REJECT, on lo) do not count; the lowest metric wins.
    const RTF_REJECT: u32 = 0x0200;
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = f.first()?.bytes().all(|b| b == b'0') && *f.get(1)? == "00";
            let metric = u32::from_str_radix(f.get(5)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            let iface = f.get(9)?.to_string();
            (default && flags & RTF_REJECT == 0).then_some((metric, iface))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// The interface of the IPv4 default route, from /proc/net/route.
fn default_route_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; a default route
    // has destination and mask 0 (a VPN's 0.0.0.0/1 does not count); the lowest metric wins.
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000");
            let metric: u32 = f.get(6)?.parse().ok()?;
            default.then(|| (metric, f[0].to_owned()))
        })
        .min()
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ipv6_addresses_are_global_and_usable() {
        let table = "\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
20010db8000000000000000000000003 04 40 00 c0     eth0
20010db8000000000000000000000004 04 40 00 20     eth0
20010db8000000000000000000000005 05 40 00 80     eth1
";
        let got = global_ipv6_addresses(table);
        assert_eq!(
            got,
            [
                ("fd00::2".parse().unwrap(), "eth0".to_owned()),
                ("2001:db8::5".parse().unwrap(), "eth1".to_owned()),
            ],
            "not loopback, link-local, tentative (0x40) or deprecated (0x20)"
        );
    }

    #[test]
    fn the_ipv6_default_route_is_found() {
        let table = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000100 00000002 00000000 00000003     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(default_route6_in(table).as_deref(), Some("eth1"));
        assert_eq!(default_route6_in(""), None);
    }

    #[test]
    fn reserved_ports_must_cover_the_whole_snat_range() {
        assert!(snat_ports_reserved("61000-65535\n"));
        assert!(snat_ports_reserved("8080,60000-63000,63001-65535"));
        assert!(!snat_ports_reserved(""));
        assert!(!snat_ports_reserved("61000-65534"));
        assert!(!snat_ports_reserved("30000-32767"));
    }
}
