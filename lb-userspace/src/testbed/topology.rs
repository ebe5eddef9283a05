//! A node, a client and `n` backends, each in its own network namespace, wired like a tiny
//! cluster node:
//!
//! ```text
//!  client ns                 node ns (ip_forward=1, rp_filter=0)          backend ns i
//!  eth0 10.0.1.2/24 ──veth── to-client 10.0.1.1
//!                            to-backend<i> 10.0.(10+i).1 ──veth── eth0 10.0.(10+i).2/24
//! ```
//! The client routes only the service CIDR (10.96.0.0/12) to the node; each backend routes
//! only the client subnet back to the node; the node has just its connected subnets. Nothing
//! has a default route, so no packet can leave the namespaces. The agent attaches to the
//! node-side interfaces ([`Topology::node_ifaces`]).
//!
//! Every link is dual-stack. The IPv6 plan mirrors the IPv4 one digit for digit in a ULA
//! prefix: 10.0.X.Y/24 is fd00:10:0:X::Y/64 (X written as the same digits, so 10.0.11.2 is
//! fd00:10:0:11::2), the service CIDR is fd00:10:96::/112, and the routes are the same as
//! for IPv4. Addresses are added `nodad`, so they are usable at once; router advertisements
//! are ignored everywhere and the node forwards IPv6 (`net.ipv6.conf.all.forwarding=1`).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::netns::NetNs;
use super::{Error, Result};

/// The service CIDR the client routes to the node (ClusterIPs live here).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The node's name, as EndpointSlices name it (`nodeName`) and the agent is told.
pub const NODE_NAME: &str = "node";
/// The node's address on the client's link: where the client reaches NodePorts.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The client's subnet.
pub const CLIENT_SUBNET: &str = "10.0.1.0/24";
/// The IPv6 service CIDR the client routes to the node.
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
/// The node's IPv6 address on the client's link.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0x1, 0, 0, 0, 0x1);
/// The client's addresses.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0x1, 0, 0, 0, 0x2);
/// The client's IPv6 subnet.
pub const CLIENT_SUBNET6: &str = "fd00:10:0:1::/64";
/// Most backends a topology can have (10.0.(10+i).0/24 must stay within 10.0.255.0).
pub const MAX_BACKENDS: usize = 245;

/// The IPv6 address mirroring `v4` (10.0.X.Y -> fd00:10:0:X::Y, X and Y read as the same
/// digits in hexadecimal).
pub fn mirror6(v4: Ipv4Addr) -> Ipv6Addr {
    let digits = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits");
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, digits(a), digits(b), digits(c), 0, 0, 0, digits(d))
}

/// Backend `i`'s (1-based) address, 10.0.(10+i).2.
pub fn backend_ip(i: usize) -> Ipv4Addr {
    assert!((1..=MAX_BACKENDS).contains(&i), "backend {i} out of range");
    Ipv4Addr::new(10, 0, 10 + i as u8, 2)
}

/// Backend `i`'s (1-based) IPv6 address, fd00:10:0:(10+i)::2.
pub fn backend_ip6(i: usize) -> Ipv6Addr {
    mirror6(backend_ip(i))
}

/// The node's address on backend `i`'s link, 10.0.(10+i).1.
pub fn backend_node_ip(i: usize) -> Ipv4Addr {
    let [a, b, c, _] = backend_ip(i).octets();
    Ipv4Addr::new(a, b, c, 1)
}

/// The node's IPv6 address on backend `i`'s link, fd00:10:0:(10+i)::1.
pub fn backend_node_ip6(i: usize) -> Ipv6Addr {
    mirror6(backend_node_ip(i))
}

/// One namespace at the end of a veth pair whose other end is in the node namespace.
#[derive(Debug)]
pub struct Host {
    /// The host's namespace.
    pub ns: NetNs,
    /// The host's address on its `eth0`.
    pub addr: Ipv4Addr,
    /// The node's address on the same link (the host's next hop).
    pub node_addr: Ipv4Addr,
    /// The host's IPv6 address on its `eth0` (see [`mirror6`]).
    pub addr6: Ipv6Addr,
    /// The node's IPv6 address on the same link.
    pub node_addr6: Ipv6Addr,
    /// The node-side interface of the link (what the agent attaches to).
    pub node_iface: String,
}

/// The whole topology. Drop deletes every namespace (backends and client first, then node);
/// the veth pairs go with them.
#[derive(Debug)]
pub struct Topology {
    /// Backend `i` (1-based) is `backends[i - 1]`.
    pub backends: Vec<Host>,
    pub client: Host,
    pub node: NetNs,
}

impl Topology {
    /// Builds the node, the client and `n_backends` backends.
    pub fn build(n_backends: usize) -> Result<Topology> {
        if n_backends > MAX_BACKENDS {
            return Err(Error::Invalid(format!(
                "{n_backends} backends requested, at most {MAX_BACKENDS} fit the addressing plan"
            )));
        }
        let node = NetNs::new("node")?;
        ipv6_quiet(&node)?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // Also sets it on every interface created later (it sets `default` too).
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for conf in ["all", "default"] {
            node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        let client = link(&node, "client", "to-client", CLIENT_IP, NODE_IP)?;
        client
            .ns
            .ip(&["route", "add", SERVICE_CIDR, "via", &NODE_IP.to_string()])?;
        client.ns.ip(&[
            "-6",
            "route",
            "add",
            SERVICE_CIDR6,
            "via",
            &NODE_IP6.to_string(),
        ])?;
        let mut backends = Vec::with_capacity(n_backends);
        for i in 1..=n_backends {
            let host = link(
                &node,
                &format!("backend{i}"),
                &format!("to-backend{i}"),
                backend_ip(i),
                backend_node_ip(i),
            )?;
            host.ns.ip(&[
                "route",
                "add",
                CLIENT_SUBNET,
                "via",
                &host.node_addr.to_string(),
            ])?;
            host.ns.ip(&[
                "-6",
                "route",
                "add",
                CLIENT_SUBNET6,
                "via",
                &host.node_addr6.to_string(),
            ])?;
            backends.push(host);
        }
        Ok(Topology {
            backends,
            client,
            node,
        })
    }

    /// Backend `i`, 1-based as in the addressing plan. Panics when out of range.
    pub fn backend(&self, i: usize) -> &Host {
        assert!(
            (1..=self.backends.len()).contains(&i),
            "backend {i} out of 1..={}",
            self.backends.len()
        );
        &self.backends[i - 1]
    }

    /// The node-side interfaces to attach the datapath to: the client-facing one first, then
    /// one per backend in order.
    pub fn node_ifaces(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|h| h.node_iface.clone())
            .collect()
    }
}

/// Makes IPv6 in `ns` predictable: no router advertisements taken (no address or route
/// appears from outside the plan) and no duplicate address detection, also for the
/// link-local addresses of interfaces created afterwards, so every address works at once.
fn ipv6_quiet(ns: &NetNs) -> Result<()> {
    for conf in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{conf}.accept_ra"), "0")?;
        ns.sysctl(&format!("net.ipv6.conf.{conf}.accept_dad"), "0")?;
    }
    Ok(())
}

/// Creates namespace `tag`, a veth pair `node_iface` (in `node`) <-> `eth0` (in the new
/// namespace), addresses both ends (/24 and the mirrored /64) and brings them up. No routes
/// beyond the connected ones.
fn link(
    node: &NetNs,
    tag: &str,
    node_iface: &str,
    addr: Ipv4Addr,
    node_addr: Ipv4Addr,
) -> Result<Host> {
    debug_assert!(
        node_iface.len() <= 15,
        "interface names are limited to 15 bytes"
    );
    let ns = NetNs::new(tag)?;
    ipv6_quiet(&ns)?;
    let (addr6, node_addr6) = (mirror6(addr), mirror6(node_addr));
    // Created in the node namespace with the peer placed straight into `ns`, so each end has
    // a short fixed name (`eth0` on the host side).
    node.ip(&[
        "link",
        "add",
        node_iface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    node.ip(&["addr", "add", &format!("{node_addr}/24"), "dev", node_iface])?;
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{node_addr6}/64"),
        "dev",
        node_iface,
        "nodad",
    ])?;
    node.ip(&["link", "set", node_iface, "up"])?;
    node.sysctl(&format!("net.ipv4.conf.{node_iface}.rp_filter"), "0")?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{addr6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(Host {
        ns,
        addr,
        node_addr,
        addr6,
        node_addr6,
        node_iface: node_iface.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::process::Command;

    use super::*;
    use crate::testbed::netns::check_output;
    use crate::testbed::servers::{
        tcp_name, udp_exchange, BackendServers, TcpServer, TcpSession, CLIENT_TIMEOUT,
    };

    #[test]
    fn the_ipv6_plan_mirrors_the_ipv4_one() {
        assert_eq!(mirror6(NODE_IP), NODE_IP6);
        assert_eq!(mirror6(CLIENT_IP), CLIENT_IP6);
        assert_eq!(backend_ip6(1).to_string(), "fd00:10:0:11::2");
        assert_eq!(backend_node_ip6(1).to_string(), "fd00:10:0:11::1");
        assert_eq!(
            backend_ip6(MAX_BACKENDS).to_string(),
            "fd00:10:0:255::2",
            "the last backend's subnet still reads like its IPv4 one"
        );
        assert_eq!(backend_node_ip(3), Ipv4Addr::new(10, 0, 13, 1));
        assert_eq!(
            CLIENT_SUBNET6,
            format!("{}/64", mirror6(Ipv4Addr::new(10, 0, 1, 0)))
        );
    }

    #[test]
    #[ignore = "needs root (network namespaces): cargo test -p lb-userspace --lib -- --ignored topology"]
    fn ipv6_carries_traffic_between_client_and_backends_through_the_node() {
        let topo = Topology::build(2).expect("topology");
        let namespaces: Vec<String> = [&topo.node, &topo.client.ns]
            .into_iter()
            .chain(topo.backends.iter().map(|b| &b.ns))
            .map(|ns| ns.name().to_owned())
            .collect();
        let sysctl = |ns: &NetNs, key: &str| ns.read_sysctl(key).expect(key);
        assert_eq!(sysctl(&topo.node, "net.ipv6.conf.all.forwarding"), "1");
        assert_eq!(
            sysctl(&topo.node, "net.ipv6.conf.to-backend2.forwarding"),
            "1",
            "interfaces created after the sysctl forward too"
        );
        assert_eq!(sysctl(&topo.client.ns, "net.ipv6.conf.all.forwarding"), "0");
        assert_eq!(sysctl(&topo.client.ns, "net.ipv6.conf.eth0.accept_ra"), "0");
        for ns in [&topo.node, &topo.client.ns, &topo.backend(1).ns] {
            let routes = ns.ip(&["-6", "route", "show"]).expect("ip -6 route");
            assert!(!routes.contains("default"), "{}:\n{routes}", ns.name());
            let addrs = ns.ip(&["-6", "addr", "show"]).expect("ip -6 addr");
            assert!(!addrs.contains("tentative"), "{}:\n{addrs}", ns.name());
        }
        assert_eq!(topo.backend(2).addr6, backend_ip6(2));
        assert_eq!(topo.client.node_addr6, NODE_IP6);

        let servers = BackendServers::start(&topo, 8080, 5353).expect("servers");
        let (b1, b2) = (backend_ip6(1), backend_ip6(2));
        // The client routes only the service CIDRs; give it backend 1's subnet, not backend 2's.
        let subnet1 = format!("{}/64", mirror6(Ipv4Addr::new(10, 0, 11, 0)));
        topo.client
            .ns
            .ip(&["-6", "route", "add", &subnet1, "via", &NODE_IP6.to_string()])
            .expect("client route to backend 1");
        let (peer, udp, unrouted) = topo
            .client
            .ns
            .run(move || {
                let mut s = TcpSession::connect(SocketAddr::new(b1.into(), 8080), CLIENT_TIMEOUT)?;
                assert_eq!(s.name(), "backend-1");
                let peer = s.peer_seen()?;
                let udp = udp_exchange(SocketAddr::new(b1.into(), 5353), b"hi", CLIENT_TIMEOUT)?;
                let unrouted = tcp_name(SocketAddr::new(b2.into(), 8080), CLIENT_TIMEOUT);
                std::io::Result::Ok((peer, udp, unrouted))
            })
            .expect("client thread")
            .expect("client reaches backend 1 over IPv6");
        assert_eq!(peer, IpAddr::from(CLIENT_IP6), "routed, not translated");
        assert_eq!(udp, "backend-1: hi");
        assert!(unrouted.is_err(), "backend 2 is not routed from the client");
        assert_eq!(servers.tcp6[0].accepted(), 1);
        assert_eq!(servers.udp6[0].answered(), 1);
        assert_eq!(
            servers.tcp[0].accepted(),
            0,
            "IPv4 listeners count IPv4 only"
        );

        // The other way: backend 1 reaches the client's subnet through the node (backend 2
        // would too, but the client has no route back to it).
        let client_server = TcpServer::start(
            &topo.client.ns,
            SocketAddr::new(CLIENT_IP6.into(), 9000),
            "client",
        )
        .expect("client server");
        let to_client = SocketAddr::new(CLIENT_IP6.into(), 9000);
        let name = topo
            .backend(1)
            .ns
            .run(move || tcp_name(to_client, CLIENT_TIMEOUT))
            .expect("backend thread")
            .expect("backend 1 reaches the client over IPv6");
        assert_eq!(name, "client");

        drop((client_server, servers, topo));
        let left = check_output(Command::new("ip").args(["netns", "list"])).unwrap();
        for ns in namespaces {
            assert!(!left.contains(&ns), "{ns} left behind:\n{left}");
        }
    }
}
