//! IPv6 datapath fixtures: the behaviours of the IPv4 ones, on IPv6 services, through the same
//! programs. Every output frame is checked with `verify6`, which recomputes its TCP, UDP or
//! ICMPv6 checksum over the IPv6 pseudo-header with arithmetic of its own (checked against
//! etherparse in the test bed's unit tests), independent of both the datapath and the builder.

use super::*;
use lb_userspace::testbed::packet::{
    fragments6, icmp6, proto6, reassemble6, verify6, Ext6, Frame6, Ipv6View,
};

pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 2);
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0x99, 0, 0, 0, 0, 9);
/// web6: TCP 80 over `backends6(3)`:8080, UDP 53 over `DNS_BACKEND6`:5353.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// empty6: TCP 80 and UDP 53 without endpoints.
const EMPTY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x11);
/// sticky6: TCP 80, ClientIP affinity for 3 hours.
const STICKY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x12);
/// nodeport6's ClusterIP; its NodePort is 30090 on `NODE_IP6`, policy Cluster.
const NODEPORT_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x16);
/// ranged6's LoadBalancer IP, accepting only fd00:0:1::/64 (`CLIENT6` is in it).
const RANGED_LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
const DNS_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0x11, 0, 0, 0, 0, 2);
/// maglev6: TCP 80 over `maglev_backends6()` by Maglev.
const MAGLEV_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x14);
/// NodePorts on `NODE_IP6`, policy Local: 30091 (backend 1 is local), 30092 (none is), and
/// 30093, whose one endpoint is a process on the node (hostNetwork, `NODE_IP6`:9090).
const LOCAL_PORT6: u16 = 30091;
const NO_LOCAL_PORT6: u16 = 30092;
const HOST_NETWORK_PORT6: u16 = 30093;

/// Ten backends fd00:0:20::1 .. fd00:0:20::a, port 8080, for maglev6.
fn maglev_backends6() -> BTreeSet<Endpoint> {
    (1..=10)
        .map(|i| Endpoint {
            addr: Ipv6Addr::new(0xfd00, 0, 0x20, 0, 0, 0, 0, i).into(),
            port: 8080,
        })
        .collect()
}

/// A TCP NodePort service on `NODE_IP6` with ClusterIP `vip`, over `endpoints`, with
/// externalTrafficPolicy Local when `local` is given (the endpoints that are this node's).
fn node_port6(
    name: &str,
    vip: Ipv6Addr,
    node_port: u16,
    endpoints: BTreeSet<Endpoint>,
    local: Option<BTreeSet<Endpoint>>,
) -> (ServicePortName, ServicePort) {
    let (name, mut port) = port6(name, "", Protocol::Tcp, vip, 80, endpoints);
    port.external_frontends = [(
        Frontend {
            addr: NODE_IP6.into(),
            port: node_port,
            protocol: Protocol::Tcp,
        },
        External {
            snat_addr: NODE_IP6.into(),
            load_balancer: false,
        },
    )]
    .into();
    if let Some(local) = local {
        port.external_local = true;
        port.local_endpoints = local;
    }
    (name, port)
}

/// Backends fd00:0:11::2, fd00:0:12::2, ... port 8080.
fn backends6(n: u16) -> BTreeSet<Endpoint> {
    (1..=n)
        .map(|i| Endpoint {
            addr: Ipv6Addr::new(0xfd00, 0, 0x10 + i, 0, 0, 0, 0, 2).into(),
            port: 8080,
        })
        .collect()
}

fn is_backend6(addr: Ipv6Addr) -> bool {
    backends6(3).iter().any(|e| e.addr == addr)
}

/// MAC of IPv6 neighbour `addr` in the routed namespace.
pub fn neighbour_mac6(addr: Ipv6Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0xbb, o[12], o[13], o[14], o[15]]
}

fn port6(
    name: &str,
    port: &str,
    protocol: Protocol,
    vip: Ipv6Addr,
    vport: u16,
    endpoints: BTreeSet<Endpoint>,
) -> (ServicePortName, ServicePort) {
    let (name, mut sp) = service_port(
        name,
        port,
        protocol,
        Ipv4Addr::UNSPECIFIED,
        vport,
        endpoints,
    );
    sp.frontends = [Frontend {
        addr: vip.into(),
        port: vport,
        protocol,
    }]
    .into();
    (name, sp)
}

/// The IPv6 services of the fixture (`desired` adds them to the IPv4 ones).
pub fn services() -> Vec<(ServicePortName, ServicePort)> {
    let dns = [Endpoint {
        addr: DNS_BACKEND6.into(),
        port: 5353,
    }];
    let (sticky_name, mut sticky) =
        port6("sticky6", "", Protocol::Tcp, STICKY_VIP6, 80, backends6(3));
    sticky.affinity_timeout_s = Some(10_800);
    let (np_name, np) = node_port6("nodeport6", NODEPORT_VIP6, 30090, backends6(3), None);
    let (maglev_name, mut maglev) = port6(
        "maglev6",
        "",
        Protocol::Tcp,
        MAGLEV_VIP6,
        80,
        maglev_backends6(),
    );
    maglev.algorithm = Some(Algorithm::Maglev);
    let vip = |last| Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, last);
    let host = [Endpoint {
        addr: NODE_IP6.into(),
        port: 9090,
    }];
    let (ranged_name, mut ranged) = port6(
        "ranged6",
        "",
        Protocol::Tcp,
        Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x19),
        80,
        backends6(3),
    );
    ranged.external_frontends = [(
        Frontend {
            addr: RANGED_LB_IP6.into(),
            port: 80,
            protocol: Protocol::Tcp,
        },
        External {
            snat_addr: NODE_IP6.into(),
            load_balancer: true,
        },
    )]
    .into();
    ranged.source_ranges = [(Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 0).into(), 64)].into();
    vec![
        port6("web6", "http", Protocol::Tcp, VIP6, 80, backends6(3)),
        port6("web6", "dns", Protocol::Udp, VIP6, 53, dns.into()),
        port6("empty6", "", Protocol::Tcp, EMPTY_VIP6, 80, BTreeSet::new()),
        port6(
            "empty6",
            "udp",
            Protocol::Udp,
            EMPTY_VIP6,
            53,
            BTreeSet::new(),
        ),
        (sticky_name, sticky),
        (np_name, np),
        (ranged_name, ranged),
        (maglev_name, maglev),
        node_port6(
            "local6",
            vip(0x17),
            LOCAL_PORT6,
            backends6(3),
            Some(backends6(1)),
        ),
        node_port6(
            "nolocal6",
            vip(0x18),
            NO_LOCAL_PORT6,
            backends6(3),
            Some(BTreeSet::new()),
        ),
        node_port6("hostnet6", vip(0x20), HOST_NETWORK_PORT6, host.into(), None),
    ]
}

/// The output frame, its checksum verified.
struct Out6 {
    saddr: Ipv6Addr,
    daddr: Ipv6Addr,
    sport: u16,
    dport: u16,
    hop_limit: u8,
    l4_payload: Vec<u8>,
}

fn verified6(frame: &[u8]) -> Out6 {
    let v = verify6(frame).unwrap_or_else(|e| panic!("output frame: {e}"));
    let (sport, dport) = v.ports().unwrap_or((0, 0));
    Out6 {
        saddr: v.saddr,
        daddr: v.daddr,
        sport,
        dport,
        hop_limit: v.hop_limit,
        l4_payload: v.l4_payload().to_vec(),
    }
}

/// A new TCP flow from `client`:`sport` to `vip`:80; its backend and the counted reason.
fn new_flow6(f: &mut Fixture, client: Ipv6Addr, sport: u16, vip: Ipv6Addr) -> (Ipv6Addr, u32) {
    let run = f.run(&Frame6::tcp(client, sport, vip, 80, tcp::SYN).build());
    let reason = run
        .counted
        .iter()
        .position(|n| *n == 1)
        .expect("one counter") as u32;
    (verified6(&run.out).daddr, reason)
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_syn_to_vip_is_translated_and_reply_is_reversed() {
    let mut f = fixture();
    let syn = Frame6::tcp(CLIENT6, 40001, VIP6, 80, tcp::SYN)
        .payload(b"hello")
        .build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(run.action, TC_ACT_OK);
    let out = verified6(&run.out);
    assert_eq!((out.saddr, out.sport), (CLIENT6, 40001), "source untouched");
    assert!(
        is_backend6(out.daddr),
        "destination {} is a backend",
        out.daddr
    );
    assert_eq!(out.dport, 8080);
    assert_eq!(out.l4_payload, b"hello");
    assert_eq!(out.hop_limit, 64, "left to the stack, which decrements it");
    assert_eq!(run.out.len(), syn.len());
    let backend = out.daddr;

    let synack = Frame6::tcp(backend, 8080, CLIENT6, 40001, tcp::SYN | tcp::ACK).build();
    let run = f.run(&synack);
    run.counted_as(stats::XLATE_REPLY);
    let out = verified6(&run.out);
    assert_eq!(
        (out.saddr, out.sport),
        (VIP6, 80),
        "reply comes from the VIP"
    );
    assert_eq!((out.daddr, out.dport), (CLIENT6, 40001));

    for _ in 0..20 {
        let run = f.run(&Frame6::tcp(CLIENT6, 40001, VIP6, 80, tcp::ACK).build());
        run.counted_as(stats::XLATE_FORWARD);
        assert_eq!(
            verified6(&run.out).daddr,
            backend,
            "the flow keeps its backend"
        );
    }

    // New flows use every backend.
    let mut seen = BTreeMap::new();
    for sport in 41000..41150 {
        let (backend, _) = new_flow6(&mut f, CLIENT6, sport, VIP6);
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "all three backends chosen: {seen:?}");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_udp_behind_extension_headers_is_translated_and_they_are_kept() {
    let mut f = fixture();
    let query = Frame6::udp(CLIENT6, 42000, VIP6, 53)
        .ext(Ext6::HopByHop(vec![]))
        .ext(Ext6::DestOpts(vec![]))
        .payload(b"query")
        .build();
    let run = f.run(&query);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let v = verify6(&run.out).expect("output frame");
    assert_eq!(
        v.ext,
        [0, 60],
        "hop-by-hop and destination options kept, in order"
    );
    assert_eq!((v.saddr, v.daddr), (CLIENT6, DNS_BACKEND6));
    assert_eq!(v.ports(), Some((42000, 5353)));

    let answer = Frame6::udp(DNS_BACKEND6, 5353, CLIENT6, 42000)
        .payload(b"answer")
        .build();
    let run = f.run(&answer);
    run.counted_as(stats::XLATE_REPLY);
    let out = verified6(&run.out);
    assert_eq!(
        (out.saddr, out.sport, out.daddr, out.dport),
        (VIP6, 53, CLIENT6, 42000)
    );
    assert_eq!(out.l4_payload, b"answer");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_traffic_not_for_a_service_passes_and_unparseable_service_traffic_is_dropped() {
    let mut f = fixture();
    let neighbour_solicitation = Frame6::new(
        CLIENT6,
        VIP6,
        L4::Icmp {
            icmp_type: 135,
            code: 0,
            rest: [0; 4],
        },
    )
    .payload(&VIP6.octets())
    .build();
    let echo = Frame6::new(
        CLIENT6,
        VIP6,
        L4::Icmp {
            icmp_type: icmp6::ECHO_REQUEST,
            code: 0,
            rest: [0, 1, 0, 1],
        },
    )
    .build();
    let cases = [
        (
            "tcp to a non-service address",
            Frame6::tcp(CLIENT6, 46000, OTHER6, 80, tcp::SYN).build(),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "tcp to the VIP on another port",
            Frame6::tcp(CLIENT6, 46000, VIP6, 81, tcp::SYN).build(),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "neighbour solicitation",
            neighbour_solicitation,
            stats::PASS_OTHER,
        ),
        ("echo request to the VIP", echo, stats::PASS_OTHER),
    ];
    for (what, frame, reason) in cases {
        println!("case: {what}");
        f.run(&frame).untouched(&frame).counted_as(reason);
    }

    // Five extension headers: more than the parser walks, so the ports are unknown. For a
    // service they are dropped rather than let through untranslated; otherwise passed.
    let long_chain = |daddr| {
        let mut frame = Frame6::tcp(CLIENT6, 46001, daddr, 80, tcp::SYN);
        for _ in 0..5 {
            frame = frame.ext(Ext6::DestOpts(vec![]));
        }
        frame.build()
    };
    let run = f.run(&long_chain(VIP6));
    run.counted_as(stats::DROP_MALFORMED_L4);
    assert_eq!(run.action, TC_ACT_SHOT);
    let other = long_chain(OTHER6);
    f.run(&other)
        .untouched(&other)
        .counted_as(stats::PASS_NOT_SERVICE);

    // A later fragment for the VIP whose first fragment was never seen: dropped.
    let datagram = Frame6::udp(CLIENT6, 46002, VIP6, 53)
        .payload(&[1; 64])
        .build();
    let (_, later) = fragments6(&datagram, 32, 0x1234);
    f.run(&later).counted_as(stats::DROP_FRAGMENT);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_services_without_backends_answer_with_rst_and_port_unreachable() {
    let mut f = fixture();
    let syn = Frame6::tcp(CLIENT6, 43000, EMPTY_VIP6, 80, tcp::SYN)
        .payload(b"abc")
        .build();
    let run = f.run(&syn);
    run.counted_as(stats::REJECT_TCP_RST);
    assert_eq!(run.action, TC_ACT_REDIRECT, "sent back out");
    assert_eq!(run.out[0..6], syn[6..12], "to the sender's MAC");
    let v = verify6(&run.out).expect("RST");
    assert_eq!((v.saddr, v.daddr), (EMPTY_VIP6, CLIENT6));
    assert_eq!(v.ports(), Some((80, 43000)));
    let flags = v.l4[13];
    assert_eq!(flags, tcp::RST | tcp::ACK);
    let ack = u32::from_be_bytes([v.l4[8], v.l4[9], v.l4[10], v.l4[11]]);
    assert_eq!(ack, 1000 + 3 + 1, "acknowledges the SYN and its payload");

    let query = Frame6::udp(CLIENT6, 43001, EMPTY_VIP6, 53)
        .payload(b"q")
        .build();
    let run = f.run(&query);
    run.counted_as(stats::REJECT_ICMP_UNREACH);
    let v = verify6(&run.out).expect("ICMPv6 error");
    assert_eq!((v.saddr, v.daddr, v.proto), (EMPTY_VIP6, CLIENT6, 58));
    assert_eq!(
        (v.l4[0], v.l4[1]),
        (icmp6::DEST_UNREACHABLE, icmp6::PORT_UNREACHABLE)
    );
    let quoted = Ipv6View::packet(v.l4_payload()).expect("quoted packet");
    assert_eq!((quoted.saddr, quoted.daddr), (CLIENT6, EMPTY_VIP6));
    assert_eq!(quoted.ports(), Some((43001, 53)));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_client_ip_affinity_keeps_a_client_on_one_backend() {
    let mut f = fixture();
    let client = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 0, 0x50);
    let (first, reason) = new_flow6(&mut f, client, 44000, STICKY_VIP6);
    assert_eq!(reason, stats::XLATE_NEW_FLOW);
    for sport in 44001..44016 {
        let (backend, reason) = new_flow6(&mut f, client, sport, STICKY_VIP6);
        assert_eq!(reason, stats::XLATE_NEW_FLOW_AFFINITY);
        assert_eq!(
            backend, first,
            "connection from port {sport} kept its backend"
        );
    }
    // Other clients spread.
    let mut seen = BTreeSet::new();
    for i in 0..60u16 {
        let other = Ipv6Addr::new(0xfd00, 0, 1, 0, 0, 0, 1, i);
        seen.insert(new_flow6(&mut f, other, 44100, STICKY_VIP6).0);
    }
    assert_eq!(seen.len(), 3, "clients spread over every backend: {seen:?}");
}

fn routed_neighbours() -> Vec<Ipv6Addr> {
    let mut all = vec![CLIENT6];
    all.extend(backends6(3).iter().map(|e| match e.addr {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => panic!("{a} among IPv6 backends"),
    }));
    all
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_node_port_flows_are_source_nated_to_the_node_and_routed_both_ways() {
    let mut f = fixture();
    let net = RoutedNetns::enter_dual(&[], &routed_neighbours());
    let syn = Frame6::tcp(CLIENT6, 40100, NODE_IP6, 30090, tcp::SYN).build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let out = verified6(&run.out);
    assert!(is_backend6(out.daddr), "to a backend: {}", out.daddr);
    assert_eq!(out.dport, 8080);
    assert_eq!(out.saddr, NODE_IP6, "source-NATed to the node");
    assert!(
        out.sport >= lb_common::snat::PORT_MIN,
        "SNAT port {}",
        out.sport
    );
    assert_routed(&run, &net, out.daddr);

    let reply = Frame6::tcp(out.daddr, 8080, NODE_IP6, out.sport, tcp::SYN | tcp::ACK).build();
    let run = f.run(&reply);
    run.counted_as(stats::XLATE_REPLY);
    let back = verified6(&run.out);
    assert_eq!(
        (back.saddr, back.sport),
        (NODE_IP6, 30090),
        "from the NodePort"
    );
    assert_eq!((back.daddr, back.dport), (CLIENT6, 40100), "to the client");
    assert_routed(&run, &net, CLIENT6);

    // The XDP fast path takes the next flow when lbr0 is an XDP target.
    // SAFETY: a NUL-terminated name.
    let lbr0 = unsafe { libc::if_nametoindex(c"lbr0".as_ptr()) };
    f.dp.add_xdp_target(lbr0).expect("lbr0 as an XDP target");
    let syn = Frame6::tcp(CLIENT6, 40101, NODE_IP6, 30090, tcp::SYN)
        .payload(b"x")
        .build();
    let run = f.run_xdp(&syn);
    run.counted_as(stats::XLATE_XDP_NEW_FLOW);
    assert_eq!(run.action, XDP_REDIRECT);
    let out = verified6(&run.out);
    assert!(is_backend6(out.daddr));
    assert_eq!((out.saddr, out.dport), (NODE_IP6, 8080));
    assert_eq!(run.out[14 + 7], 63, "hop limit decremented");
    let run = f.run_xdp(&Frame6::tcp(CLIENT6, 40101, NODE_IP6, 30090, tcp::ACK).build());
    run.counted_as(stats::XLATE_XDP_TRACKED);
    assert_eq!(verified6(&run.out).daddr, out.daddr, "same backend");
    // The IPv4 XDP fixture starts from a datapath with no target.
    f.dp.remove_xdp_target(lbr0).expect("removing lbr0");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_packet_too_big_about_a_translated_flow_is_translated_back() {
    let mut f = fixture();
    let router = Ipv6Addr::new(0xfd00, 0, 0x99, 0, 0, 0, 0, 1);
    let (backend, _) = new_flow6(&mut f, CLIENT6, 40500, VIP6);
    let sent = Frame6::tcp(CLIENT6, 40500, backend, 8080, tcp::ACK)
        .payload(&[0; 200])
        .build();

    // From a router between node and backend, to the client: must quote client -> VIP.
    let error = Frame6::packet_too_big(router, CLIENT6, 1280, &sent).build();
    let run = f.run(&error);
    run.counted_as(stats::XLATE_ICMP_ERROR);
    let v = verify6(&run.out).expect("ICMPv6 error, checksum over the new addresses");
    assert_eq!((v.saddr, v.daddr), (router, CLIENT6));
    assert_eq!(v.l4[0], icmp6::PACKET_TOO_BIG);
    assert_eq!(
        u32::from_be_bytes([v.l4[4], v.l4[5], v.l4[6], v.l4[7]]),
        1280,
        "MTU kept"
    );
    let q = Ipv6View::packet(v.l4_payload()).expect("quoted packet");
    assert_eq!(
        (q.saddr, q.daddr, q.ports()),
        (CLIENT6, VIP6, Some((40500, 80)))
    );

    // From a router between client and node, about the VIP's reply: reaches the backend.
    let reply = Frame6::tcp(VIP6, 80, CLIENT6, 40500, tcp::ACK).build();
    let error = Frame6::time_exceeded(router, VIP6, icmp6::HOP_LIMIT_EXCEEDED, &reply).build();
    let run = f.run(&error);
    run.counted_as(stats::XLATE_ICMP_ERROR);
    let v = verify6(&run.out).expect("ICMPv6 error");
    assert_eq!(v.daddr, backend, "the error goes to the backend");
    let q = Ipv6View::packet(v.l4_payload()).expect("quoted packet");
    assert_eq!(
        (q.saddr, q.daddr, q.ports()),
        (backend, CLIENT6, Some((8080, 40500)))
    );

    // The node's own error leaving through egress is translated too.
    let error = Frame6::packet_too_big(NODE_IP6, CLIENT6, 1400, &sent).build();
    let run = f.run_egress(&error);
    run.counted_as(stats::XLATE_ICMP_ERROR);
    let v = verify6(&run.out).expect("ICMPv6 error");
    let q = Ipv6View::packet(v.l4_payload()).expect("quoted packet");
    assert_eq!((q.daddr, q.ports()), (VIP6, Some((40500, 80))));

    // Errors about anything else pass untouched.
    let stranger = Frame6::tcp(CLIENT6, 40501, OTHER6, 8080, tcp::ACK).build();
    let error = Frame6::packet_too_big(router, CLIENT6, 1280, &stranger).build();
    f.run(&error)
        .untouched(&error)
        .counted_as(stats::PASS_OTHER);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_fragmented_datagrams_are_translated_whole_in_both_directions() {
    let mut f = fixture();
    let query = Frame6::udp(CLIENT6, 41000, VIP6, 53)
        .payload(&[7u8; 100])
        .build();
    let (first, later) = fragments6(&query, 56, 0xabcd);
    let run = f.run(&first);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let first_out = run.out.clone();
    let run = f.run(&later);
    run.counted_as(stats::XLATE_FRAGMENT);
    let whole = reassemble6(&first_out, &run.out).expect("the fragments reassemble");
    let out = verified6(&whole);
    assert_eq!(
        (out.saddr, out.daddr, out.sport, out.dport),
        (CLIENT6, DNS_BACKEND6, 41000, 5353),
        "the whole datagram reaches the backend, its checksum intact"
    );
    assert_eq!(out.l4_payload, [7u8; 100]);

    let answer = Frame6::udp(DNS_BACKEND6, 5353, CLIENT6, 41000)
        .payload(&[9u8; 100])
        .build();
    let (first, later) = fragments6(&answer, 56, 0xabce);
    let run = f.run(&first);
    run.counted_as(stats::XLATE_REPLY);
    let first_out = run.out.clone();
    let run = f.run(&later);
    run.counted_as(stats::XLATE_FRAGMENT);
    let out = verified6(&reassemble6(&first_out, &run.out).expect("reassembles"));
    assert_eq!(
        (out.saddr, out.daddr, out.sport, out.dport),
        (VIP6, CLIENT6, 53, 41000)
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_load_balancer_source_ranges_admit_only_listed_clients() {
    let mut f = fixture();
    let _net = RoutedNetns::enter_dual(&[], &routed_neighbours());
    let run = f.run(&Frame6::tcp(CLIENT6, 40700, RANGED_LB_IP6, 80, tcp::SYN).build());
    run.counted_as(stats::XLATE_NEW_FLOW);
    let outsider = Ipv6Addr::new(0xfd00, 0, 2, 0, 0, 0, 0, 2);
    let run = f.run(&Frame6::tcp(outsider, 40700, RANGED_LB_IP6, 80, tcp::SYN).build());
    run.counted_as(stats::DROP_SOURCE_RANGE);
    assert_eq!(run.action, TC_ACT_SHOT);
    // The service's ClusterIP is not a LoadBalancer frontend: open to everyone.
    let ranged_cluster_ip = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x19);
    let run = f.run(&Frame6::tcp(outsider, 40701, ranged_cluster_ip, 80, tcp::SYN).build());
    run.counted_as(stats::XLATE_NEW_FLOW);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_a_backend_reaching_itself_is_source_nated_to_the_hairpin_address() {
    let mut f = fixture();
    let hairpin = Ipv6Addr::from(lb_common::snat::HAIRPIN_ADDR6);
    // The dns port has one backend: asking it through the VIP is a hairpin.
    let net = RoutedNetns::enter_dual(&[], &[DNS_BACKEND6]);
    let query = Frame6::udp(DNS_BACKEND6, 40400, VIP6, 53)
        .payload(b"q")
        .build();
    let run = f.run(&query);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let out = verified6(&run.out);
    assert_eq!((out.daddr, out.dport), (DNS_BACKEND6, 5353));
    assert_eq!(
        out.saddr, hairpin,
        "source-NATed, so the answer comes back here"
    );
    assert!(out.sport >= lb_common::snat::PORT_MIN);
    assert_routed(&run, &net, DNS_BACKEND6);

    let answer = Frame6::udp(DNS_BACKEND6, 5353, hairpin, out.sport)
        .payload(b"a")
        .build();
    let run = f.run(&answer);
    run.counted_as(stats::XLATE_REPLY);
    let back = verified6(&run.out);
    assert_eq!((back.saddr, back.sport), (VIP6, 53), "from the service");
    assert_eq!(
        (back.daddr, back.dport),
        (DNS_BACKEND6, 40400),
        "to the asking backend"
    );
    assert_routed(&run, &net, DNS_BACKEND6);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_local_policy_keeps_the_client_address_and_uses_only_local_backends() {
    let mut f = fixture();
    let net = RoutedNetns::enter_dual(&[], &routed_neighbours());
    let local_backend = Ipv6Addr::new(0xfd00, 0, 0x11, 0, 0, 0, 0, 2);
    for sport in 40200..40215 {
        let syn = Frame6::tcp(CLIENT6, sport, NODE_IP6, LOCAL_PORT6, tcp::SYN).build();
        let run = f.run(&syn);
        run.counted_as(stats::XLATE_NEW_FLOW);
        let out = verified6(&run.out);
        assert_eq!(
            (out.saddr, out.sport),
            (CLIENT6, sport),
            "client address kept"
        );
        assert_eq!(out.daddr, local_backend, "only the local backend");
        assert_routed(&run, &net, local_backend);
    }
    let run = f.run(&Frame6::tcp(CLIENT6, 40300, NODE_IP6, NO_LOCAL_PORT6, tcp::SYN).build());
    run.counted_as(stats::DROP_NO_LOCAL_BACKEND);
    assert_eq!(run.action, TC_ACT_SHOT);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_host_network_backend_gets_its_flows_locally_and_its_replies_translated_at_egress() {
    let mut f = fixture();
    let syn = Frame6::tcp(CLIENT6, 40900, NODE_IP6, HOST_NETWORK_PORT6, tcp::SYN).build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(run.action, TC_ACT_OK, "delivered by the stack, not routed");
    let out = verified6(&run.out);
    assert_eq!((out.saddr, out.sport), (CLIENT6, 40900), "no source NAT");
    assert_eq!((out.daddr, out.dport), (NODE_IP6, 9090));

    let reply = Frame6::tcp(NODE_IP6, 9090, CLIENT6, 40900, tcp::SYN | tcp::ACK).build();
    let run = f.run_egress(&reply);
    run.counted_as(stats::XLATE_REPLY);
    assert_eq!(run.action, TC_ACT_OK);
    let back = verified6(&run.out);
    assert_eq!(
        (back.saddr, back.sport),
        (NODE_IP6, HOST_NETWORK_PORT6),
        "from the NodePort"
    );
    assert_eq!((back.daddr, back.dport), (CLIENT6, 40900));

    // Other traffic of the same process (no tracked flow) leaves untouched and uncounted.
    let other = Frame6::tcp(NODE_IP6, 9090, OTHER6, 41000, tcp::ACK).build();
    let run = f.run_egress(&other);
    run.untouched(&other);
    assert!(
        run.counted.iter().all(|n| *n == 0),
        "egress counts only what it translates"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_maglev_maps_a_flow_by_its_whole_tuple() {
    let mut f = fixture();
    // Clients differing in one 32-bit word of the address each, so the whole address must be
    // hashed for every group to spread.
    let tuples: Vec<(Ipv6Addr, u16)> = (0..400u16)
        .map(|i| {
            let mut seg = [0xfd00, 0, 1, 0, 0, 0, 0, 2];
            seg[usize::from(i % 4) * 2 + 1] = 0x100 + i;
            (Ipv6Addr::from(seg), 54000)
        })
        .collect();
    let choose = |f: &mut Fixture, (client, sport): (Ipv6Addr, u16)| {
        let (b, reason) = new_flow6(f, client, sport, MAGLEV_VIP6);
        assert_eq!(reason, stats::XLATE_NEW_FLOW);
        f.run(&Frame6::tcp(client, sport, MAGLEV_VIP6, 80, tcp::RST).build())
            .counted_as(stats::XLATE_FORWARD);
        b
    };
    let first: Vec<Ipv6Addr> = tuples.iter().map(|t| choose(&mut f, *t)).collect();
    let again: Vec<Ipv6Addr> = tuples.iter().map(|t| choose(&mut f, *t)).collect();
    assert_eq!(first, again, "a tuple maps to the same backend every time");
    for word in 0..4 {
        let used: BTreeSet<Ipv6Addr> = first.iter().skip(word).step_by(4).copied().collect();
        assert!(
            used.len() >= 8,
            "clients differing in address word {word} spread over only {} backends",
            used.len()
        );
    }
}

/// `frame` (an IPv6 frame as built, without extension headers) with the raw extension
/// headers `exts` ((type, bytes) in order; each one's first byte, its next header, is filled
/// in) inserted before the L4 header. The L4 checksum stays valid: the pseudo-header's length
/// is the upper layer's, whatever precedes it.
fn with_raw_ext(frame: &[u8], exts: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let (head, l4) = frame.split_at(14 + 40);
    let mut out = head.to_vec();
    let l4_type = out[14 + 6];
    out[14 + 6] = exts[0].0;
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut h = bytes.clone();
        h[0] = exts.get(i + 1).map_or(l4_type, |e| e.0);
        out.extend_from_slice(&h);
    }
    out.extend_from_slice(l4);
    let payload_len = (out.len() - 14 - 40) as u16;
    out[14 + 4..14 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// The UDP ports and addresses of an output frame, its UDP checksum checked by etherparse
/// (whose IPv6 parser walks authentication headers too).
fn udp6_checked(frame: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        panic!("output is not IPv6")
    };
    let h = ip.header().to_header();
    let Some(TransportSlice::Udp(u)) = p.transport else {
        panic!("no UDP header found")
    };
    let want = u
        .to_header()
        .calc_checksum_ipv6(&h, u.payload())
        .expect("udp checksum");
    assert_eq!(u.checksum(), want, "UDP checksum");
    (
        h.source.into(),
        u.source_port(),
        h.destination.into(),
        u.destination_port(),
    )
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_extension_headers_of_every_length_rule_are_stepped_over() {
    let mut f = fixture();
    // A 16-byte hop-by-hop header (length in 8-byte units, less one: 1) and a 24-byte
    // authentication header (length in 4-byte units, less two: 4): each sized by its own rule.
    let mut hop = vec![0u8, 1, 1, 12];
    hop.resize(16, 0);
    let mut auth = vec![0u8, 4];
    auth.resize(24, 0xa5);
    let query = Frame6::udp(CLIENT6, 42100, VIP6, 53)
        .payload(b"query")
        .build();
    let frame = with_raw_ext(
        &query,
        &[(proto6::HOP_BY_HOP, hop), (proto6::AUTH, auth.clone())],
    );
    let run = f.run(&frame);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(udp6_checked(&run.out), (CLIENT6, 42100, DNS_BACKEND6, 5353));
    assert_eq!(
        run.out[14 + 40 + 16..14 + 40 + 40],
        frame[14 + 40 + 16..14 + 40 + 40],
        "the headers are kept as they were"
    );

    // The authentication header first, then a destination options header.
    let dest = vec![0u8, 0, 1, 4, 0, 0, 0, 0];
    let frame = with_raw_ext(&query, &[(proto6::AUTH, auth), (proto6::DEST_OPTS, dest)]);
    let frame = {
        // Another client port: a new flow.
        let mut f2 = frame;
        let l4 = 14 + 40 + 24 + 8;
        f2[l4..l4 + 2].copy_from_slice(&42101u16.to_be_bytes());
        // The port is in the checksum: one's-complement adjust it by the change.
        let old = u16::from_be_bytes([f2[l4 + 6], f2[l4 + 7]]);
        let new =
            lb_common::checksum::replace(old, &42100u16.to_be_bytes(), &42101u16.to_be_bytes());
        f2[l4 + 6..l4 + 8].copy_from_slice(&new.to_be_bytes());
        f2
    };
    let run = f.run(&frame);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(udp6_checked(&run.out), (CLIENT6, 42101, DNS_BACKEND6, 5353));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_packets_not_safely_translatable_are_dropped_for_services_and_passed_otherwise() {
    let mut f = fixture();
    // A routing header with segments left: the VIP is not the final destination, and the L4
    // checksum covers the final one. Not translated; for a service, dropped.
    let routing = |segments_left: u8| {
        let mut h = vec![0u8, 2, 0, segments_left, 0, 0, 0, 0];
        h.extend_from_slice(&OTHER6.octets());
        h
    };
    let syn = Frame6::tcp(CLIENT6, 46100, VIP6, 80, tcp::SYN).build();
    let run = f.run(&with_raw_ext(&syn, &[(proto6::ROUTING, routing(1))]));
    run.counted_as(stats::DROP_MALFORMED_L4);
    // Segments left 0: the VIP is the final destination; translated.
    let run = f.run(&with_raw_ext(&syn, &[(proto6::ROUTING, routing(0))]));
    run.counted_as(stats::XLATE_NEW_FLOW);

    // A later fragment whose fragmentable part began with destination options: behind its
    // fragment header is data, never parsed as headers. Its ports are unknown: for a
    // service, dropped.
    let datagram = Frame6::udp(CLIENT6, 46101, VIP6, 53)
        .ext(Ext6::DestOpts(vec![]))
        .payload(&[3; 64])
        .build();
    let (_, later) = fragments6(&datagram, 32, 0x4321);
    f.run(&later).counted_as(stats::DROP_FRAGMENT);

    // No answer to a multicast source.
    let query = Frame6::udp(
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        46102,
        EMPTY_VIP6,
        53,
    )
    .build();
    let run = f.run(&query);
    run.counted_as(stats::DROP_NO_BACKEND);
    assert_eq!(run.action, TC_ACT_SHOT);
}
