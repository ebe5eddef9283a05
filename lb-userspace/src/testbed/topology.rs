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

use std::net::Ipv4Addr;

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
/// Most backends a topology can have (10.0.(10+i).0/24 must stay within 10.0.255.0).
pub const MAX_BACKENDS: usize = 245;

/// One namespace at the end of a veth pair whose other end is in the node namespace.
#[derive(Debug)]
pub struct Host {
    /// The host's namespace.
    pub ns: NetNs,
    /// The host's address on its `eth0`.
    pub addr: Ipv4Addr,
    /// The node's address on the same link (the host's next hop).
    pub node_addr: Ipv4Addr,
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
        node.sysctl("net.ipv4.ip_forward", "1")?;
        for conf in ["all", "default"] {
            node.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        let client = link(
            &node,
            "client",
            "to-client",
            Ipv4Addr::new(10, 0, 1, 2),
            Ipv4Addr::new(10, 0, 1, 1),
        )?;
        client
            .ns
            .ip(&["route", "add", SERVICE_CIDR, "via", "10.0.1.1"])?;
        let mut backends = Vec::with_capacity(n_backends);
        for i in 1..=n_backends {
            let third = 10 + i as u8;
            let host = link(
                &node,
                &format!("backend{i}"),
                &format!("to-backend{i}"),
                Ipv4Addr::new(10, 0, third, 2),
                Ipv4Addr::new(10, 0, third, 1),
            )?;
            host.ns.ip(&[
                "route",
                "add",
                CLIENT_SUBNET,
                "via",
                &host.node_addr.to_string(),
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

/// Creates namespace `tag`, a veth pair `node_iface` (in `node`) <-> `eth0` (in the new
/// namespace), addresses both /24 ends and brings them up. No routes beyond the connected one.
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
    node.ip(&["link", "set", node_iface, "up"])?;
    node.sysctl(&format!("net.ipv4.conf.{node_iface}.rp_filter"), "0")?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(Host {
        ns,
        addr,
        node_addr,
        node_iface: node_iface.to_owned(),
    })
}
