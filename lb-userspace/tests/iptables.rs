//! Tier 3 for the iptables dataplane: a desired state programmed with `IptablesDataplane`
//! inside the test bed's node namespace (every iptables command runs there through
//! `ip netns exec`; nothing touches the root namespace's tables), and real TCP and UDP traffic
//! from the client namespace. Run once per iptables back end: nf_tables and legacy.
//!
//! Needs root, so `#[ignore]`d for plain `cargo test`:
//! `cargo test -p lb-userspace --test iptables -- --ignored --test-threads=1`.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;

use lb_userspace::dataplane::iptables::{Backend, Config, IptablesDataplane};
use lb_userspace::dataplane::Dataplane;
use lb_userspace::model::{DesiredState, External, Protocol, ServicePort};
use lb_userspace::testbed::manifest::{TCP_PORT, TCP_TARGET, UDP_PORT, UDP_TARGET, VIP, VIP6};
use lb_userspace::testbed::require_root;
use lb_userspace::testbed::servers::{
    backend_name, tcp_name, udp_name, BackendServers, TcpSession, CLIENT_TIMEOUT,
};
use lb_userspace::testbed::state::{
    backend_names, count_answers, dual_stack_endpoints, fe, iptables_saved, spn,
};
use lb_userspace::testbed::topology::{
    backend_ip, backend_node_ip, Topology, CLIENT_IP, NODE_IP, NODE_IP6, SERVICE_CIDR,
};

/// A ClusterIP without endpoints.
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 11];
const NODE_PORT: u16 = 30080;

/// `web` (TCP, dual-stack ClusterIP and an IPv4 NodePort), `dns` (UDP) over `backends`, and
/// `empty` (TCP and UDP) without endpoints.
fn desired(backends: &[usize]) -> DesiredState {
    let eps = |port| dual_stack_endpoints(backends, port);
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
            frontends: [fe(VIP, UDP_PORT, Protocol::Udp)].into(),
            endpoints: eps(UDP_TARGET),
            ..Default::default()
        },
    );
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let port = if protocol == Protocol::Tcp {
            TCP_PORT
        } else {
            UDP_PORT
        };
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

/// The dataplane, its commands run in the node namespace.
fn dataplane(topo: &Topology, backend: Backend) -> IptablesDataplane {
    let ns = topo.node.name().to_string();
    let mut config = Config::new(backend);
    config.command = Arc::new(move |program| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, program]);
        cmd
    });
    IptablesDataplane::new(config)
}

fn run(backend: Backend) {
    if let Err(e) = require_root() {
        panic!("{e}: this test must not pass silently without it");
    }
    let topo = Topology::build(3).expect("building the topology");
    let _servers = BackendServers::start(&topo, TCP_TARGET, UDP_TARGET).expect("servers");
    // A real node has a default route; this one would otherwise have no route for the
    // service range at all, and traffic to a ClusterIP without endpoints would die at the
    // routing decision before the filter table's REJECT could answer it. Backend 1 stands in
    // for the next hop (it drops what it gets: it does not forward).
    topo.node
        .ip(&[
            "route",
            "add",
            SERVICE_CIDR,
            "via",
            &backend_ip(1).to_string(),
        ])
        .expect("service range route on the node");
    let mut dp = dataplane(&topo, backend.clone());

    let report = dp.apply(&desired(&[1, 2, 3])).expect("first apply");
    println!("{} back end, first apply: {report:?}", backend.name);
    let rules = iptables_saved(&topo.node, &backend);
    assert!(rules.contains(":LBA-SERVICES"), "{rules}");
    assert!(
        rules.contains("-j LBA-SERVICES"),
        "jump rules missing:\n{rules}"
    );

    // ClusterIP, TCP (both families) and UDP: every backend answers, the client's address
    // is kept.
    let every = backend_names(&[1, 2, 3]);
    for (what, answers) in [
        (
            "TCP",
            topo.client.ns.run(|| {
                (0..24)
                    .map(|_| tcp_name(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
                    .collect::<Vec<_>>()
            }),
        ),
        (
            "TCP over IPv6",
            topo.client.ns.run(|| {
                (0..24)
                    .map(|_| tcp_name(SocketAddr::from((VIP6, TCP_PORT)), CLIENT_TIMEOUT))
                    .collect::<Vec<_>>()
            }),
        ),
        (
            "UDP",
            topo.client.ns.run(|| {
                (0..24)
                    .map(|_| udp_name(SocketAddr::from((VIP, UDP_PORT)), CLIENT_TIMEOUT))
                    .collect::<Vec<_>>()
            }),
        ),
    ] {
        let counts = count_answers(answers.expect("client"));
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

    // Without endpoints: refused at once (REJECT), for TCP (ICMP port unreachable turns into
    // ECONNREFUSED) and UDP (the same ICMP, on the connected socket).
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
    let mut reached = std::collections::BTreeSet::new();
    for s in sessions {
        let (name, peer) = s.expect("NodePort session");
        let i: usize = name.trim_start_matches("backend-").parse().unwrap();
        assert_eq!(
            peer,
            IpAddr::from(backend_node_ip(i)),
            "{name} saw {peer}: not masqueraded"
        );
        reached.insert(name);
    }
    assert!(reached.len() > 1, "the NodePort reached only {reached:?}");

    // An established connection survives its backend's removal (conntrack keeps the DNAT);
    // new connections avoid it. The incremental apply rewrites only what changed.
    let mut session = topo
        .client
        .ns
        .run(|| TcpSession::connect(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
        .unwrap()
        .expect("long-lived session");
    let gone: usize = session
        .name()
        .trim_start_matches("backend-")
        .parse()
        .unwrap();
    let left: Vec<usize> = [1, 2, 3].into_iter().filter(|&i| i != gone).collect();
    let report = dp.apply(&desired(&left)).expect("incremental apply");
    println!("removed backend {gone}: {report:?}");
    assert!(report.deletes > 0 && report.writes > 0, "{report:?}");
    let answer = session
        .echo("still there")
        .expect("the established connection was cut");
    assert_eq!(answer, format!("{}: still there", backend_name(gone)));
    let counts = count_answers(
        topo.client
            .ns
            .run(|| {
                (0..24)
                    .map(|_| tcp_name(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
                    .collect::<Vec<_>>()
            })
            .unwrap(),
    );
    assert_eq!(
        counts.keys().cloned().collect::<Vec<_>>(),
        backend_names(&left),
        "{counts:?}"
    );

    // An apply with nothing new writes nothing; a full resync rewrites everything.
    let report = dp.apply(&desired(&left)).expect("idempotent apply");
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");
    dp.full_resync();
    let report = dp.apply(&desired(&left)).expect("full resync");
    assert!(report.writes > 10, "{report:?}");
    assert!(!dp.needs_retry());

    // Rules someone else removed (a flushed chain, a deleted jump rule) come back with the
    // next full resync; until then the ClusterIP is dead.
    let jump = [
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "lb-agent service portals",
        "-j",
        "LBA-SERVICES",
    ];
    for args in [&["-t", "nat", "-F", "LBA-SERVICES"][..], &jump[..]] {
        topo.node
            .exec(&backend.iptables, args)
            .expect("tampering with the rules");
    }
    let broken = topo
        .client
        .ns
        .run(|| tcp_name(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
        .unwrap();
    assert!(broken.is_err(), "the tampering did not take: {broken:?}");
    dp.full_resync();
    dp.apply(&desired(&left))
        .expect("full resync after tampering");
    let counts = count_answers(
        topo.client
            .ns
            .run(|| {
                (0..6)
                    .map(|_| tcp_name(SocketAddr::from((VIP, TCP_PORT)), CLIENT_TIMEOUT))
                    .collect::<Vec<_>>()
            })
            .unwrap(),
    );
    assert!(
        counts.keys().all(|k| k.starts_with("backend-")),
        "after the resync: {counts:?}"
    );

    // Full resyncs insert a jump rule only where it is missing: one of each, per family.
    let rules = iptables_saved(&topo.node, &backend);
    let jumps = rules
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING") && l.contains("-j LBA-SERVICES"))
        .count();
    assert_eq!(
        jumps, 2,
        "one PREROUTING jump per family expected:\n{rules}"
    );

    // Cleanup leaves no chain and no jump of ours, in either family.
    dp.cleanup().expect("cleanup");
    let rules = iptables_saved(&topo.node, &backend);
    assert!(!rules.contains("LBA-"), "left behind:\n{rules}");
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn iptables_dataplane_nft() {
    run(Backend::nft());
}

#[test]
#[ignore = "needs root: run with --ignored"]
fn iptables_dataplane_legacy() {
    run(Backend::legacy());
}
