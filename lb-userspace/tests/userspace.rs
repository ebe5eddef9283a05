//! Tier 3 for the userspace dataplane: `UserspaceDataplane` applied inside the test bed's node
//! namespace (its portals are sockets of this process, opened on threads that entered the
//! namespace; its iptables programs run there too), and real TCP and UDP traffic from the
//! client namespace and from the node itself. Run once per iptables back end: nf_tables and
//! legacy.
//!
//! Needs root, so `#[ignore]`d for plain `cargo test`:
//! `cargo test -p lb-userspace --test userspace -- --ignored --test-threads=1`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use lb_userspace::dataplane::iptables::{self, Backend};
use lb_userspace::dataplane::userspace::{Config, UserspaceDataplane};
use lb_userspace::dataplane::{ApplyReport, Dataplane};
use lb_userspace::model::{DesiredState, Endpoint, External, Protocol, ServicePort};
use lb_userspace::testbed::manifest::{TCP_PORT, TCP_TARGET, UDP_PORT, UDP_TARGET, VIP, VIP6};
use lb_userspace::testbed::require_root;
use lb_userspace::testbed::servers::{
    backend_name, tcp_name, udp_name, BackendServers, TcpSession, CLIENT_TIMEOUT,
};
use lb_userspace::testbed::state::{count_answers, ep, fe, iptables_saved, spn};
use lb_userspace::testbed::topology::{
    backend_ip, backend_ip6, backend_node_ip, Topology, NODE_IP, NODE_IP6, SERVICE_CIDR,
};

/// A ClusterIP without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// A ClusterIP with ClientIP affinity.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// A ClusterIP whose first endpoint's port is closed.
const RETRY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const NODE_PORT: u16 = 30080;
/// A port nothing listens on in the backends.
const CLOSED_PORT: u16 = 9;

/// `web` (TCP, dual-stack ClusterIP and an IPv4 NodePort) and `dns` (UDP, dual-stack) over
/// `backends`; `sticky` (TCP, ClientIP affinity) over every backend; `retry` (TCP) over
/// backend 1's closed port and backend 2; `empty` (TCP and UDP) without endpoints.
fn desired(backends: &[usize]) -> DesiredState {
    let eps = |port| -> BTreeSet<Endpoint> {
        backends
            .iter()
            .flat_map(|&i| [ep(backend_ip(i), port), ep(backend_ip6(i), port)])
            .collect()
    };
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
            endpoints: eps(TCP_TARGET),
            ..Default::default()
        },
    );
    services.insert(
        spn("dns", Protocol::Udp),
        ServicePort {
            frontends: [
                fe(VIP, UDP_PORT, Protocol::Udp),
                fe(VIP6, UDP_PORT, Protocol::Udp),
            ]
            .into(),
            endpoints: eps(UDP_TARGET),
            ..Default::default()
        },
    );
    services.insert(
        spn("sticky", Protocol::Tcp),
        ServicePort {
            frontends: [fe(STICKY_VIP, TCP_PORT, Protocol::Tcp)].into(),
            endpoints: (1..=3).map(|i| ep(backend_ip(i), TCP_TARGET)).collect(),
            affinity_timeout_s: Some(10_800),
            ..Default::default()
        },
    );
    services.insert(
        spn("retry", Protocol::Tcp),
        ServicePort {
            frontends: [fe(RETRY_VIP, TCP_PORT, Protocol::Tcp)].into(),
            endpoints: [
                ep(backend_ip(1), CLOSED_PORT),
                ep(backend_ip(2), TCP_TARGET),
            ]
            .into(),
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

/// The dataplane with its programs run in the node namespace, and the runtime its portals
/// run on (every thread of it in the node namespace too).
struct Node<'a> {
    topo: &'a Topology,
    runtime: tokio::runtime::Runtime,
    dp: UserspaceDataplane,
}

impl Node<'_> {
    fn new(topo: &Topology, backend: Backend) -> Node<'_> {
        let mut config = iptables::Config::new(backend);
        let commands = topo.node.commands();
        config.command = Arc::new(move |program| commands(program.as_ref()));
        Node {
            topo,
            runtime: topo.node.tokio_runtime().expect("node runtime"),
            dp: UserspaceDataplane::new(Config::new(config)),
        }
    }

    /// Applies `desired` as the agent's owner task would: inside the runtime, on a thread in
    /// the node namespace (the portals bind there).
    fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let (runtime, dp) = (&self.runtime, &mut self.dp);
        self.topo
            .node
            .run(|| {
                let _entered = runtime.enter();
                dp.apply(desired)
            })
            .expect("entering the node namespace")
            .expect("apply")
    }

    fn cleanup(&mut self) {
        let (runtime, dp) = (&self.runtime, &mut self.dp);
        self.topo
            .node
            .run(|| {
                let _entered = runtime.enter();
                dp.cleanup()
            })
            .expect("entering the node namespace")
            .expect("cleanup");
    }
}

/// `n` TCP connections (or UDP exchanges) to `addr` from the client namespace: who answered.
fn from_client(topo: &Topology, n: usize, udp: bool, addr: SocketAddr) -> BTreeMap<String, usize> {
    let answers = topo
        .client
        .ns
        .run(|| {
            (0..n)
                .map(|_| {
                    if udp {
                        udp_name(addr, CLIENT_TIMEOUT)
                    } else {
                        tcp_name(addr, CLIENT_TIMEOUT)
                    }
                })
                .collect()
        })
        .expect("client namespace");
    count_answers(answers)
}

fn each(backends: &[usize], n: usize) -> BTreeMap<String, usize> {
    backends.iter().map(|&i| (backend_name(i), n)).collect()
}

/// Asserts `counts` came from `backends` in turn: the same number each for TCP. UDP comes
/// close: a client socket that happens to get the port of an earlier one whose association
/// is still alive is that client again, and keeps its backend.
fn round_robin(what: &str, udp: bool, counts: &BTreeMap<String, usize>, backends: &[usize]) {
    let total: usize = counts.values().sum();
    let even = each(backends, total / backends.len());
    if udp {
        assert!(
            counts.keys().eq(even.keys())
                && counts.values().all(|&n| n + 2 >= total / backends.len()),
            "{what}: {counts:?}"
        );
    } else {
        assert_eq!(*counts, even, "{what}");
    }
}

fn run(backend: Backend) {
    if let Err(e) = require_root() {
        panic!("{e}: this test must not pass silently without it");
    }
    let topo = Topology::build(3).expect("building the topology");
    let _servers = BackendServers::start(&topo, TCP_TARGET, UDP_TARGET).expect("servers");
    // The node's own connections to a ClusterIP need a route to it before the OUTPUT chain
    // redirects them, and traffic to a ClusterIP without endpoints needs one to reach the
    // filter table's REJECT in FORWARD. A real node has a default route; backend 1 stands in
    // for the next hop (it does not forward).
    topo.node
        .ip(&[
            "route",
            "add",
            SERVICE_CIDR,
            "via",
            &backend_ip(1).to_string(),
        ])
        .expect("service range route on the node");
    let mut node = Node::new(&topo, backend.clone());

    let report = node.apply(&desired(&[1, 2, 3]));
    println!("{} back end, first apply: {report:?}", backend.name);
    let rules = iptables_saved(&topo.node, &backend);
    for want in [
        "-j LBA-PORTALS-CONTAINER",
        "-j LBA-PORTALS-HOST",
        "-j LBA-NODEPORT-CONTAINER",
        "-j LBA-PORTALS-FILTER",
        "-j REDIRECT --to-ports",
    ] {
        assert!(rules.contains(want), "{want} missing:\n{rules}");
    }
    let ports = node.dp.portal_ports();
    assert_eq!(ports.len(), 8, "{ports:?}");
    let tcp_ports: Vec<u16> = ports
        .iter()
        .filter(|(k, _)| k.service.protocol == Protocol::Tcp)
        .map(|(_, p)| *p)
        .collect();
    assert!(
        !wait_closed(&topo, &tcp_ports),
        "the TCP portals do not listen on the node's loopback"
    );

    // ClusterIP, TCP and UDP, both families: round robin.
    let started = Instant::now();
    for (what, udp, addr) in [
        ("TCP", false, SocketAddr::from((VIP, TCP_PORT))),
        ("TCP over IPv6", false, SocketAddr::from((VIP6, TCP_PORT))),
        ("UDP", true, SocketAddr::from((VIP, UDP_PORT))),
        ("UDP over IPv6", true, SocketAddr::from((VIP6, UDP_PORT))),
    ] {
        round_robin(what, udp, &from_client(&topo, 24, udp, addr), &[1, 2, 3]);
    }
    println!(
        "96 ClusterIP connections and exchanges through the portals: {:?}",
        started.elapsed()
    );

    // The known limitation: a backend sees the node's address, never the client's.
    let mut session = topo
        .client
        .ns
        .run(|| TcpSession::connect(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
        .unwrap()
        .expect("ClusterIP session");
    let seen = session.peer_seen().expect("peer");
    let i: usize = session
        .name()
        .trim_start_matches("backend-")
        .parse()
        .unwrap();
    assert_eq!(
        seen,
        IpAddr::from(backend_node_ip(i)),
        "source not the node's"
    );

    // The node's own traffic (LBA-PORTALS-HOST), TCP and UDP: UDP answers must leave from
    // the loopback address the redirect chose, or the client drops them.
    let (tcp, udp) = topo
        .node
        .run(|| {
            let tcp: Vec<_> = (0..6)
                .map(|_| tcp_name(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
                .collect();
            let udp: Vec<_> = (0..6)
                .map(|_| udp_name(SocketAddr::from((VIP, UDP_PORT)), CLIENT_TIMEOUT))
                .collect();
            (count_answers(tcp), count_answers(udp))
        })
        .unwrap();
    round_robin("TCP from the node", false, &tcp, &[1, 2, 3]);
    round_robin("UDP from the node", true, &udp, &[1, 2, 3]);

    // NodePort, from the client.
    let counts = from_client(&topo, 6, false, SocketAddr::from((NODE_IP, NODE_PORT)));
    assert_eq!(counts, each(&[1, 2, 3], 2), "NodePort");

    // Affinity: every connection of the client goes to one backend.
    let counts = from_client(&topo, 12, false, SocketAddr::from((STICKY_VIP, TCP_PORT)));
    assert_eq!(counts.len(), 1, "affinity did not hold: {counts:?}");
    assert!(
        counts.keys().all(|k| k.starts_with("backend-")),
        "{counts:?}"
    );

    // No endpoints: refused at once, TCP and UDP.
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

    // A closed endpoint port: every connection still reaches backend 2. Each first tries
    // backend 1's closed port (next in turn again once the retry moved past it), is refused,
    // and goes on to backend 2.
    let started = Instant::now();
    let counts = from_client(&topo, 6, false, SocketAddr::from((RETRY_VIP, TCP_PORT)));
    assert_eq!(counts, each(&[2], 6), "retry");
    println!(
        "6 connections past a closed endpoint: {:?}",
        started.elapsed()
    );

    // The session's backend goes: the session goes on, the portals keep their ports, new
    // connections avoid it.
    let gone = i;
    let left: Vec<usize> = [1, 2, 3].into_iter().filter(|&b| b != gone).collect();
    let report = node.apply(&desired(&left));
    println!("removed backend {gone}: {report:?}");
    assert_eq!(node.dp.portal_ports(), ports, "a portal moved");
    let answer = session
        .echo("still there")
        .expect("the established connection was cut");
    assert_eq!(answer, format!("{}: still there", backend_name(gone)));
    let counts = from_client(&topo, 6, false, SocketAddr::from((VIP, TCP_PORT)));
    assert_eq!(counts, each(&left, 3), "after the removal");

    // Nothing new: nothing written. A full resync rewrites every chain.
    let report = node.apply(&desired(&left));
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");

    // Rules someone else removed come back with the next full resync.
    topo.node
        .exec(
            &backend.iptables,
            &["-t", "nat", "-F", "LBA-PORTALS-CONTAINER"],
        )
        .expect("tampering with the rules");
    let broken = from_client(&topo, 1, false, SocketAddr::from((VIP, TCP_PORT)));
    assert!(
        broken.keys().all(|k| k.starts_with("error")),
        "the tampering did not take: {broken:?}"
    );
    assert!(node.dp.full_resync());
    let report = node.apply(&desired(&left));
    assert_eq!(report.writes, 10, "5 chains in each family: {report:?}");
    let counts = from_client(&topo, 4, false, SocketAddr::from((VIP, TCP_PORT)));
    assert_eq!(counts, each(&left, 2), "after the resync");
    let rules = iptables_saved(&topo.node, &backend);
    let jumps = rules
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING") && l.contains("-j LBA-PORTALS-CONTAINER"))
        .count();
    assert_eq!(jumps, 2, "one PREROUTING jump per family:\n{rules}");

    // Cleanup: no rule of ours left, the portals closed, the session cut.
    node.cleanup();
    let rules = iptables_saved(&topo.node, &backend);
    assert!(!rules.contains("LBA-"), "left behind:\n{rules}");
    let closed = session.echo("gone?");
    assert!(closed.is_err(), "the session outlived cleanup: {closed:?}");
    assert!(
        wait_closed(&topo, &tcp_ports),
        "TCP portals still listen after cleanup: {ports:?}"
    );
}

/// Whether every one of `ports` refuses connections on the node's loopback within a second
/// (a portal's listener closes when its task next runs, just after cleanup returns).
fn wait_closed(topo: &Topology, ports: &[u16]) -> bool {
    topo.node
        .run(|| {
            (0..50).any(|_| {
                let all_refused = ports.iter().all(|&port| {
                    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    std::net::TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT).is_err()
                });
                if !all_refused {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                all_refused
            })
        })
        .expect("node namespace")
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn userspace_dataplane_nft() {
    run(Backend::nft());
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn userspace_dataplane_legacy() {
    run(Backend::legacy());
}
