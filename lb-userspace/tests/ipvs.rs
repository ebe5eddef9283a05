//! Tier 4 for the IPVS dataplane: a desired state programmed with `IpvsDataplane` inside the
//! test bed's node namespace (its netlink socket and sysctls there, its `ip`, `iptables` and
//! `modprobe` run there through `ip netns exec`; the namespace's IPVS table, interfaces and
//! rules go with it, also when the test fails), and real TCP and UDP traffic from the client
//! namespace and from a backend. Nothing leaves the namespaces (see `testbed::topology`).
//!
//! Needs root and a kernel with IPVS (this host's has none: `cargo xtask test` runs it in the
//! Debian 6.1 VM of tier 4). Without IPVS it fails, saying so; it never passes silently.
//! `cargo test -p lb-userspace --test ipvs -- --ignored --test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;

use lb_userspace::dataplane::ipvs::genl::Socket;
use lb_userspace::dataplane::ipvs::messages::{Ipvs, Op};
use lb_userspace::dataplane::ipvs::table::{render, ServiceKey, Table};
use lb_userspace::dataplane::ipvs::{self, dummy, kernel, Config, IpvsDataplane};
use lb_userspace::dataplane::Dataplane;
use lb_userspace::model::{DesiredState, Endpoint, External, Protocol, ServicePort};
use lb_userspace::testbed::manifest::{TCP_PORT, TCP_TARGET, UDP_PORT, UDP_TARGET, VIP, VIP6};
use lb_userspace::testbed::netns::NetNs;
use lb_userspace::testbed::require_root;
use lb_userspace::testbed::servers::{
    backend_name, tcp_name, udp_name, BackendServers, TcpSession, CLIENT_TIMEOUT,
};
use lb_userspace::testbed::state::{backend_names, count_answers, dual_stack_endpoints, fe, spn};
use lb_userspace::testbed::topology::{
    backend_ip, backend_node_ip, Topology, CLIENT_IP, NODE_IP, NODE_IP6, SERVICE_CIDR,
};

/// A ClusterIP without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// A ClusterIP with ClientIP affinity.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// A ClusterIP whose only endpoint is backend 1 (for hairpin from backend 1).
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const NODE_PORT: u16 = 30080;

/// `web` (TCP, dual-stack ClusterIP and an IPv4 NodePort) and `dns` (UDP) over `backends`;
/// `sticky` (ClientIP affinity) over all three; `self` over backend 1 alone; `empty` (TCP
/// and UDP) without endpoints.
fn desired(backends: &[usize]) -> DesiredState {
    let node = IpAddr::from(NODE_IP);
    let mut services = BTreeMap::new();
    services.insert(
        spn("web", Protocol::Tcp),
        ServicePort {
            frontends: [
                fe(VIP, TCP_PORT, Protocol::Tcp),
                fe(VIP6, TCP_PORT, Protocol::Tcp),
            ]
            .into(),
            external_frontends: [(
                fe(node, NODE_PORT, Protocol::Tcp),
                External {
                    snat_addr: node,
                    load_balancer: false,
                },
            )]
            .into(),
            endpoints: dual_stack_endpoints(backends, TCP_TARGET),
            ..Default::default()
        },
    );
    services.insert(
        spn("dns", Protocol::Udp),
        ServicePort {
            frontends: [fe(VIP, UDP_PORT, Protocol::Udp)].into(),
            endpoints: dual_stack_endpoints(backends, UDP_TARGET),
            ..Default::default()
        },
    );
    services.insert(
        spn("sticky", Protocol::Tcp),
        ServicePort {
            frontends: [fe(STICKY_VIP, TCP_PORT, Protocol::Tcp)].into(),
            endpoints: dual_stack_endpoints(&[1, 2, 3], TCP_TARGET),
            affinity_timeout_s: Some(60),
            ..Default::default()
        },
    );
    services.insert(
        spn("self", Protocol::Tcp),
        ServicePort {
            frontends: [fe(SELF_VIP, TCP_PORT, Protocol::Tcp)].into(),
            endpoints: dual_stack_endpoints(&[1], TCP_TARGET),
            ..Default::default()
        },
    );
    for (protocol, port) in [(Protocol::Tcp, TCP_PORT), (Protocol::Udp, UDP_PORT)] {
        services.insert(
            spn("empty", protocol),
            ServicePort {
                frontends: [fe(EMPTY_VIP, port, protocol)].into(),
                ..Default::default()
            },
        );
    }
    DesiredState {
        services,
        node_addrs: [node, NODE_IP6.into()].into(),
        health_checks: BTreeMap::new(),
    }
}

/// The dataplane's configuration for namespace `ns`: its programs run there through
/// `ip netns exec`, its netlink socket and sysctls are opened there.
fn config(ns: &NetNs) -> Config {
    let name = ns.name().to_string();
    Config {
        command: Arc::new(move |program| {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &name, program]);
            cmd
        }),
        netns: Some(ns.path()),
        ..Config::default()
    }
}

/// An IPVS client of its own in `ns`, as another program on the node would have.
fn ipvs_in(ns: &NetNs) -> Ipvs {
    let socket = kernel::in_netns(Some(&ns.path()), Socket::open)
        .expect("entering the namespace")
        .expect("netlink socket");
    Ipvs::new(socket).expect("family lookup").expect("IPVS")
}

/// `n` TCP connections from the client to `to`, by answering server.
fn tcp_from_client(topo: &Topology, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    count_answers(
        topo.client
            .ns
            .run(|| (0..n).map(|_| tcp_name(to, CLIENT_TIMEOUT)).collect())
            .unwrap(),
    )
}

fn backend_number(name: &str) -> usize {
    name.trim_start_matches("backend-").parse().unwrap()
}

fn web_key() -> ServiceKey {
    ServiceKey {
        addr: VIP.into(),
        protocol: Protocol::Tcp,
        port: TCP_PORT,
    }
}

fn shown(table: &Table) -> String {
    render(table, &BTreeMap::new())
}

#[test]
#[ignore = "needs root and IPVS: run with --ignored (cargo xtask test runs it in the 6.1 VM)"]
fn ipvs_dataplane_serves_real_traffic() {
    if let Err(e) = require_root() {
        panic!("{e}: this test must not pass silently without it");
    }
    let topo = Topology::build(3).expect("building the topology");
    let config = config(&topo.node);
    if let Err(e) = ipvs::probe(&config) {
        panic!("IPVS IS NOT AVAILABLE, so the IPVS dataplane cannot be tested here: {e}");
    }
    let _servers = BackendServers::start(&topo, TCP_TARGET, UDP_TARGET).expect("servers");
    // Backend 1 reaches the services through the node, for the hairpin case.
    topo.backend(1)
        .ns
        .ip(&[
            "route",
            "add",
            SERVICE_CIDR,
            "via",
            &backend_node_ip(1).to_string(),
        ])
        .expect("service route on backend 1");
    let mut dp = IpvsDataplane::new(config.clone());

    let report = dp.apply(&desired(&[1, 2, 3])).expect("first apply");
    println!("first apply: {report:?}");
    let kernel = dp.kernel_services().expect("reading the IPVS table");
    println!("{}", shown(&kernel));
    assert_eq!(kernel.len(), 8, "web (3), dns, sticky, self, empty (2)");
    assert_eq!(
        topo.node
            .read_sysctl("net.ipv4.vs.conntrack")
            .expect("sysctl"),
        "1"
    );

    // ClusterIP, TCP over both families and UDP: every backend answers.
    let every = backend_names(&[1, 2, 3]);
    let udp = count_answers(
        topo.client
            .ns
            .run(|| {
                (0..24)
                    .map(|_| udp_name(SocketAddr::from((VIP, UDP_PORT)), CLIENT_TIMEOUT))
                    .collect()
            })
            .unwrap(),
    );
    for (what, counts) in [
        (
            "TCP",
            tcp_from_client(&topo, SocketAddr::from((VIP, TCP_PORT)), 24),
        ),
        (
            "TCP over IPv6",
            tcp_from_client(&topo, SocketAddr::from((VIP6, TCP_PORT)), 24),
        ),
        ("UDP", udp),
    ] {
        assert_eq!(
            counts.keys().cloned().collect::<Vec<_>>(),
            every,
            "{what}: {counts:?}"
        );
    }
    let seen = topo
        .client
        .ns
        .run(|| TcpSession::connect(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT)?.peer_seen())
        .unwrap()
        .expect("ClusterIP session");
    assert_eq!(
        seen,
        IpAddr::from(CLIENT_IP),
        "a ClusterIP keeps the client's address"
    );

    // Without endpoints: IPVS answers with ICMP port unreachable, for TCP and UDP alike.
    let (tcp, udp) = topo
        .client
        .ns
        .run(|| {
            (
                tcp_name(SocketAddr::from((EMPTY_VIP, TCP_PORT)), CLIENT_TIMEOUT),
                udp_name(SocketAddr::from((EMPTY_VIP, UDP_PORT)), CLIENT_TIMEOUT),
            )
        })
        .unwrap();
    for (what, r) in [("TCP", tcp), ("UDP", udp)] {
        let e = r.expect_err("a service without endpoints answered");
        assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionRefused,
            "{what} without endpoints: {e}"
        );
    }

    // NodePort (policy Cluster): masqueraded, so the backend sees the node's address on its
    // own link.
    let sessions = topo
        .client
        .ns
        .run(|| {
            (0..12)
                .map(|_| {
                    let mut s = TcpSession::connect(
                        SocketAddr::from((NODE_IP, NODE_PORT)),
                        CLIENT_TIMEOUT,
                    )?;
                    let peer = s.peer_seen()?;
                    Ok::<_, io::Error>((s.name().to_string(), peer))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut reached = BTreeSet::new();
    for s in sessions {
        let (name, peer) = s.expect("NodePort session");
        let i = backend_number(&name);
        assert_eq!(
            peer,
            IpAddr::from(backend_node_ip(i)),
            "{name} saw {peer}: not masqueraded"
        );
        reached.insert(name);
    }
    assert!(reached.len() > 1, "the NodePort reached only {reached:?}");

    // Affinity: every connection of the client goes to the same backend.
    let sticky = tcp_from_client(&topo, SocketAddr::from((STICKY_VIP, TCP_PORT)), 12);
    assert_eq!(sticky.len(), 1, "affinity did not hold: {sticky:?}");
    assert!(
        sticky.keys().all(|k| k.starts_with("backend-")),
        "{sticky:?}"
    );

    // Hairpin: backend 1 reaching itself through a ClusterIP is masqueraded (else its own
    // answer would go straight back to itself, bypassing IPVS, and the connection would hang).
    let hairpin = topo
        .backend(1)
        .ns
        .run(|| {
            let mut s =
                TcpSession::connect(SocketAddr::from((SELF_VIP, TCP_PORT)), CLIENT_TIMEOUT)?;
            Ok::<_, io::Error>((s.name().to_string(), s.peer_seen()?))
        })
        .unwrap()
        .expect("hairpin session");
    assert_eq!(
        hairpin,
        (backend_name(1), IpAddr::from(backend_node_ip(1))),
        "hairpin connection not masqueraded to the node"
    );

    // An established connection survives its backend's removal (the real server drains at
    // weight 0); new connections avoid it. The incremental apply touches only that.
    let mut session = topo
        .client
        .ns
        .run(|| TcpSession::connect(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
        .unwrap()
        .expect("long-lived session");
    let gone = backend_number(session.name());
    let left: Vec<usize> = [1, 2, 3].into_iter().filter(|&i| i != gone).collect();
    let report = dp.apply(&desired(&left)).expect("incremental apply");
    println!("removed backend {gone}: {report:?}");
    let answer = session
        .echo("still there")
        .expect("the established connection was cut");
    assert_eq!(answer, format!("{}: still there", backend_name(gone)));
    // web: drained at its IPv4 and IPv6 ClusterIPs and its NodePort (3 weight changes);
    // dns: deleted (UDP, 1); the hairpin chain rewritten in both families (2: dns's UDP
    // endpoints of the backend are gone).
    assert_eq!((report.writes, report.deletes), (5, 1), "{report:?}");
    let counts = tcp_from_client(&topo, SocketAddr::from((VIP, TCP_PORT)), 24);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        backend_names(&left),
        "{counts:?}"
    );
    let kernel = dp.kernel_services().expect("IPVS table");
    let weights = &kernel[&web_key()].dests;
    let gone_ep = Endpoint {
        addr: backend_ip(gone).into(),
        port: TCP_TARGET,
    };
    assert_eq!(
        weights.get(&gone_ep),
        Some(&0),
        "the removed backend should be draining:\n{}",
        shown(&kernel)
    );
    drop(session);

    // An apply with nothing new writes nothing.
    let report = dp.apply(&desired(&left)).expect("idempotent apply");
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");

    // A virtual service someone deleted comes back with the next full resync; until then
    // the ClusterIP refuses (its address is still local, nothing listens on it).
    ipvs_in(&topo.node)
        .apply(&Op::DelService(web_key()))
        .expect("deleting the web service behind the dataplane's back");
    let broken = topo
        .client
        .ns
        .run(|| tcp_name(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
        .unwrap();
    assert!(broken.is_err(), "the deletion did not take: {broken:?}");
    assert!(dp.full_resync());
    let report = dp.apply(&desired(&left)).expect("full resync");
    println!("full resync: {report:?}");
    assert!(!dp.needs_retry());
    let counts = tcp_from_client(&topo, SocketAddr::from((VIP, TCP_PORT)), 12);
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        backend_names(&left),
        "after the resync: {counts:?}"
    );

    // Another program's virtual service at a node address, outside the NodePort range, is
    // not ours: neither a full sync nor cleanup touches it.
    let foreign = ServiceKey {
        addr: NODE_IP.into(),
        protocol: Protocol::Tcp,
        port: 9999,
    };
    let mut other = ipvs_in(&topo.node);
    other
        .apply(&Op::AddService(
            foreign,
            lb_userspace::dataplane::ipvs::table::ServiceAttrs {
                scheduler: "rr".into(),
                persistence_s: None,
            },
        ))
        .expect("another program's service");
    dp.full_resync();
    dp.apply(&desired(&left))
        .expect("full sync beside a foreign service");

    // Cleanup leaves nothing of ours: no virtual service, no interface, no chain.
    dp.cleanup().expect("cleanup");
    let left_services: Vec<ServiceKey> = other
        .services()
        .expect("listing")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        left_services,
        vec![foreign],
        "cleanup left or took too much"
    );
    let links = topo.node.ip(&["-o", "link", "show"]).expect("ip link");
    assert!(!links.contains(dummy::NAME), "{links}");
    let rules: String = ["iptables-save", "ip6tables-save"]
        .iter()
        .map(|save| topo.node.exec(save, &[]).expect("iptables-save"))
        .collect();
    assert!(!rules.contains("LBA-"), "left behind:\n{rules}");
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn removing_leftovers_where_there_are_none_is_a_no_op() {
    if let Err(e) = require_root() {
        panic!("{e}: this test must not pass silently without it");
    }
    // A fresh namespace: nothing of IPVS mode in it, whether or not the kernel has IPVS
    // (on a kernel without it, this is the "no IPVS" path other modes take at start).
    let ns = NetNs::new("leftovers").expect("namespace");
    let config = config(&ns);
    let node: BTreeSet<IpAddr> = [IpAddr::from(NODE_IP)].into();
    ipvs::remove_leftovers(&config, &node).expect("removing nothing");
    let links = ns.ip(&["-o", "link", "show"]).expect("ip link");
    assert!(!links.contains(dummy::NAME), "{links}");
}
