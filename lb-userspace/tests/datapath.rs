//! Datapath fixtures: the real eBPF program, loaded into the running kernel, fed crafted
//! frames through BPF_PROG_TEST_RUN. Each case states the input frame, the expected tc action
//! and counter, and what the output must be; the maps hold one desired state for the file.
//! Every output frame's checksums are verified with etherparse, an implementation independent
//! of both the datapath and the packet builder.
//!
//! Needs root; run through `cargo xtask test` (which passes `--ignored`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard, OnceLock,
    },
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{Icmpv4Header, Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};
use lb_common::{proto, stats, CtKey};
use lb_userspace::{
    dataplane::{
        ebpf::{monotonic_ns, EbpfDataplane, LoadOptions},
        Dataplane,
    },
    model::{
        Algorithm, DesiredState, Endpoint, External, Frontend, Protocol, ServicePort,
        ServicePortName,
    },
    testbed::packet::{patch_ipv4, tcp, Frame, CLIENT_MAC, L4, NODE_MAC},
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A frontend whose service has no endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 99, 9);
const DNS_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 11, 2);
/// Frontends of services with ClientIP affinity: for 3 hours, and for 1 second.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const BRIEF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// Frontend of a service using Maglev.
const MAGLEV_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
/// Frontend of a UDP service with several backends.
const SPREAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
/// The node's address: NodePorts 30080 (policy Cluster), 30081 (Local, backend 1 is local)
/// and 30082 (Local, no local backend).
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// ClusterIP of the NodePort service.
const NODEPORT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 16);

/// The IPv6 fixtures: the same behaviours through the same program, on IPv6 services.
#[path = "datapath/ipv6.rs"]
mod ipv6;

/// Load options with a small connection-tracking table, so tests that fill it stay quick.
fn small_tables() -> LoadOptions {
    LoadOptions {
        capacities: vec![("CONNTRACK", 4096)],
        ..LoadOptions::default()
    }
}

fn backends(n: u8) -> BTreeSet<Endpoint> {
    (1..=n)
        .map(|i| Endpoint {
            addr: Ipv4Addr::new(10, 0, 10 + i, 2).into(),
            port: 8080,
        })
        .collect()
}

fn service_port(
    name: &str,
    port: &str,
    protocol: Protocol,
    vip: Ipv4Addr,
    vport: u16,
    endpoints: BTreeSet<Endpoint>,
) -> (ServicePortName, ServicePort) {
    (
        ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
            protocol,
        },
        ServicePort {
            frontends: [Frontend {
                addr: vip.into(),
                port: vport,
                protocol,
            }]
            .into(),
            endpoints,
            ..ServicePort::default()
        },
    )
}

/// The backend sets of the fixture's services; `desired` turns them into the maps' state.
#[derive(Clone)]
struct Backends {
    /// web: TCP 80 -> 8080 (and UDP 53 -> one backend, 5353).
    web: BTreeSet<Endpoint>,
    /// sticky: TCP 80, ClientIP affinity for 3 hours.
    sticky: BTreeSet<Endpoint>,
    /// maglev: TCP 80 by Maglev.
    maglev: BTreeSet<Endpoint>,
    /// spread: UDP 53 over several backends.
    spread: BTreeSet<Endpoint>,
}

impl Default for Backends {
    fn default() -> Backends {
        Backends {
            web: backends(3),
            sticky: backends(3),
            maglev: maglev_backends(10),
            spread: backends(3),
        }
    }
}

/// Backends 10.0.20.1.. 10.0.20.n, port 8080, for the Maglev service.
fn maglev_backends(n: u8) -> BTreeSet<Endpoint> {
    (1..=n)
        .map(|i| Endpoint {
            addr: Ipv4Addr::new(10, 0, 20, i).into(),
            port: 8080,
        })
        .collect()
}

/// The fixture's services: web, sticky and maglev as in `Backends`, empty (TCP 80 and UDP 53
/// without endpoints), brief (ClientIP affinity for 1 second) and spread.
fn desired(b: &Backends) -> DesiredState {
    let dns = [Endpoint {
        addr: DNS_BACKEND.into(),
        port: 5353,
    }];
    let with = |(name, mut port): (ServicePortName, ServicePort), affinity, algorithm| {
        port.affinity_timeout_s = affinity;
        port.algorithm = algorithm;
        (name, port)
    };
    let sticky = service_port(
        "sticky",
        "",
        Protocol::Tcp,
        STICKY_VIP,
        80,
        b.sticky.clone(),
    );
    let brief = service_port("brief", "", Protocol::Tcp, BRIEF_VIP, 80, backends(3));
    let maglev = service_port(
        "maglev",
        "",
        Protocol::Tcp,
        MAGLEV_VIP,
        80,
        b.maglev.clone(),
    );
    DesiredState {
        services: [
            service_port("web", "http", Protocol::Tcp, VIP, 80, b.web.clone()),
            service_port("web", "dns", Protocol::Udp, VIP, 53, dns.into()),
            service_port("empty", "", Protocol::Tcp, EMPTY_VIP, 80, BTreeSet::new()),
            service_port(
                "empty",
                "udp",
                Protocol::Udp,
                EMPTY_VIP,
                53,
                BTreeSet::new(),
            ),
            with(sticky, Some(10_800), None),
            with(brief, Some(1), None),
            with(maglev, None, Some(Algorithm::Maglev)),
            service_port(
                "spread",
                "",
                Protocol::Udp,
                SPREAD_VIP,
                53,
                b.spread.clone(),
            ),
            node_port("nodeport", NODEPORT_VIP, 30080, false, &[]),
            node_port("local", Ipv4Addr::new(10, 96, 0, 17), 30081, true, &[1]),
            node_port("nolocal", Ipv4Addr::new(10, 96, 0, 18), 30082, true, &[]),
            ranged_load_balancer(),
            host_network_service(),
        ]
        .into_iter()
        .chain(ipv6::services())
        .collect(),
        node_addrs: [NODE_IP.into(), ipv6::NODE_IP6.into()].into(),
        ..DesiredState::default()
    }
}

/// A NodePort service (30083, ClusterIP 10.96.0.20) whose one endpoint is a process on the
/// node itself (hostNetwork), at `NODE_IP`:9090.
fn host_network_service() -> (ServicePortName, ServicePort) {
    let endpoint = Endpoint {
        addr: NODE_IP.into(),
        port: 9090,
    };
    let vip = Ipv4Addr::new(10, 96, 0, 20);
    let (name, mut port) = service_port("hostnet", "", Protocol::Tcp, vip, 80, [endpoint].into());
    let frontend = Frontend {
        addr: NODE_IP.into(),
        port: 30083,
        protocol: Protocol::Tcp,
    };
    let external = External {
        snat_addr: NODE_IP.into(),
        load_balancer: false,
    };
    port.external_frontends = [(frontend, external)].into();
    (name, port)
}

/// A LoadBalancer IP accepting only 10.0.1.0/25 (CLIENT is in it, 10.0.1.200 is not), over
/// `backends(3)`.
const RANGED_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

fn ranged_load_balancer() -> (ServicePortName, ServicePort) {
    let vip = Ipv4Addr::new(10, 96, 0, 19);
    let (name, mut port) = service_port("ranged", "", Protocol::Tcp, vip, 80, backends(3));
    let frontend = Frontend {
        addr: RANGED_LB_IP.into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let external = External {
        snat_addr: NODE_IP.into(),
        load_balancer: true,
    };
    port.external_frontends = [(frontend, external)].into();
    port.source_ranges = [(Ipv4Addr::new(10, 0, 1, 0).into(), 25)].into();
    (name, port)
}

/// A TCP NodePort service on `NODE_IP` over `backends(3)`, with policy Local when `local`,
/// backends `local_backends` (1-based) being this node's.
fn node_port(
    name: &str,
    vip: Ipv4Addr,
    node_port: u16,
    local: bool,
    local_backends: &[usize],
) -> (ServicePortName, ServicePort) {
    let (name, mut port) = service_port(name, "", Protocol::Tcp, vip, 80, backends(3));
    let frontend = Frontend {
        addr: NODE_IP.into(),
        port: node_port,
        protocol: Protocol::Tcp,
    };
    let external = External {
        snat_addr: NODE_IP.into(),
        load_balancer: false,
    };
    port.external_frontends = [(frontend, external)].into();
    port.external_local = local;
    let all: Vec<Endpoint> = port.endpoints.iter().copied().collect();
    port.local_endpoints = local_backends.iter().map(|i| all[i - 1]).collect();
    (name, port)
}

/// The loaded datapath, shared by the cases in this file (one load).
struct Fixture {
    dp: EbpfDataplane,
}

fn fixture() -> MutexGuard<'static, Fixture> {
    static F: OnceLock<Result<Mutex<Fixture>, String>> = OnceLock::new();
    /// Whether a test already showed why the load failed.
    static SHOWN: AtomicBool = AtomicBool::new(false);
    let f = F.get_or_init(|| {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "datapath fixtures need root to load BPF programs: run `cargo xtask test` as root"
        );
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lbt-{}-fixtures", std::process::id()));
        let _ = EbpfDataplane::remove_pins(&pin_dir);
        let loaded = EbpfDataplane::load_with(&pin_dir, &small_tables());
        // The maps live as long as the loaded program holds them; the pins are not needed
        // (statics are never dropped, so nothing else would remove them).
        EbpfDataplane::remove_pins(&pin_dir).expect("removing the fixture's pins");
        // A rejected program's verifier log can run to thousands of lines: kept to show it
        // once, not in every test.
        let mut dp = loaded.map_err(|e| format!("loading the datapath failed: {e}"))?;
        dp.apply(&desired(&Backends::default()))
            .expect("programming the maps");
        report_verified_instructions(&dp);
        Ok(Mutex::new(Fixture { dp }))
    });
    match f {
        Ok(f) => f.lock().unwrap_or_else(|e| e.into_inner()),
        Err(e) if !SHOWN.swap(true, Ordering::Relaxed) => panic!("{e}"),
        Err(_) => panic!("the datapath did not load: the first test that failed shows why"),
    }
}

/// Prints, per program, how many instructions the kernel's verifier processed, so growth is
/// visible from run to run and kernel to kernel. `cargo xtask test` collects these lines (one
/// per program: `NAME: N instructions verified, ... on kernel K`) from tier 2 and from the
/// Debian 6.1 VM tier and compares them in its summary.
fn report_verified_instructions(dp: &EbpfDataplane) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut loaded = 0;
    for (name, info) in dp.program_infos() {
        match info {
            Ok(info) => {
                loaded += 1;
                println!(
                    "{name}: {} instructions verified, {} translated bytes, on kernel {}",
                    info.verified_instruction_count()
                        .map_or("?".into(), |n| n.to_string()),
                    info.size_translated().map_or("?".into(), |n| n.to_string()),
                    kernel.trim()
                );
            }
            Err(aya::programs::ProgramError::NotLoaded) => {
                println!("{name}: not loaded by the fixture, so not verified here")
            }
            Err(e) => panic!("reading {name}'s program info: {e}"),
        }
    }
    assert!(loaded > 0, "the fixture loaded no program");
}

struct Run {
    action: u32,
    out: Vec<u8>,
    /// Counter deltas (packets) by reason over this run.
    counted: Vec<u64>,
}

impl Fixture {
    fn counters(&self) -> Vec<u64> {
        let counters = self.dp.counters().expect("reading the counters");
        counters.iter().map(|c| c.packets).collect()
    }

    /// Runs the tc ingress program on `frame`.
    fn run(&mut self, frame: &[u8]) -> Run {
        self.run_on(Program::Ingress, frame)
    }

    /// Runs the tc egress program on `frame`.
    fn run_egress(&mut self, frame: &[u8]) -> Run {
        self.run_on(Program::Egress, frame)
    }

    /// Runs the XDP program on `frame`.
    fn run_xdp(&mut self, frame: &[u8]) -> Run {
        self.run_on(Program::Xdp, frame)
    }

    fn run_on(&mut self, program: Program, frame: &[u8]) -> Run {
        let before = self.counters();
        let mut out = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let res = match program {
            Program::Ingress => self.dp.program().expect("program").test_run(options),
            Program::Egress => self.dp.egress_program().expect("program").test_run(options),
            Program::Xdp => self.dp.xdp_program().expect("program").test_run(options),
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        let after = self.counters();
        Run {
            action: res.return_value,
            out,
            counted: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        }
    }
}

/// Which of the datapath's packet programs a fixture runs.
enum Program {
    Ingress,
    Egress,
    Xdp,
}

impl Run {
    /// Asserts exactly one packet was counted, under `reason`.
    fn counted_as(&self, reason: u32) -> &Self {
        let mut want = vec![0u64; stats::REASONS as usize];
        want[reason as usize] = 1;
        assert_eq!(
            self.counted,
            want,
            "expected one packet counted as {}",
            stats::NAMES[reason as usize]
        );
        self
    }

    fn untouched(&self, input: &[u8]) -> &Self {
        assert_eq!(self.action, TC_ACT_OK, "action");
        assert_eq!(self.out, input, "frame must leave byte for byte unchanged");
        self
    }
}

/// The parsed output, after checking its IPv4 and L4 checksums independently.
struct Out {
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    sport: u16,
    dport: u16,
    l4_payload: Vec<u8>,
}

fn verified(frame: &[u8]) -> Out {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else {
        panic!("output is not IPv4")
    };
    let h = ip.header();
    let ip_header = h.to_header();
    assert_eq!(
        ip_header.calc_header_checksum(),
        h.header_checksum(),
        "IPv4 header checksum"
    );
    let (saddr, daddr) = (h.source_addr(), h.destination_addr());
    match p.transport.expect("transport header") {
        TransportSlice::Tcp(t) => {
            let want = t
                .to_header()
                .calc_checksum_ipv4(&ip_header, t.payload())
                .expect("tcp checksum");
            assert_eq!(t.checksum(), want, "TCP checksum");
            Out {
                saddr,
                daddr,
                sport: t.source_port(),
                dport: t.destination_port(),
                l4_payload: t.payload().to_vec(),
            }
        }
        TransportSlice::Udp(u) => {
            if u.checksum() != 0 {
                let want = u
                    .to_header()
                    .calc_checksum_ipv4(&ip_header, u.payload())
                    .expect("udp checksum");
                assert_eq!(u.checksum(), want, "UDP checksum");
            }
            Out {
                saddr,
                daddr,
                sport: u.source_port(),
                dport: u.destination_port(),
                l4_payload: u.payload().to_vec(),
            }
        }
        TransportSlice::Icmpv4(i) => {
            let hdr = Icmpv4Header::from_slice(i.slice()).expect("icmp").0;
            assert_eq!(
                hdr.checksum,
                hdr.icmp_type.calc_checksum(i.payload()),
                "ICMP checksum"
            );
            Out {
                saddr,
                daddr,
                sport: 0,
                dport: 0,
                l4_payload: i.payload().to_vec(),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// An IPv4 endpoint's address (these fixtures are IPv4 only).
fn ipv4(addr: IpAddr) -> Ipv4Addr {
    match addr {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a} in an IPv4 fixture"),
    }
}

fn is_web_backend(addr: Ipv4Addr) -> bool {
    backends(3).iter().any(|e| e.addr == addr)
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn syn_to_vip_is_translated_and_reply_is_reversed() {
    let mut f = fixture();
    let syn = Frame::tcp(CLIENT, 40001, VIP, 80, tcp::SYN)
        .payload(b"hello")
        .build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(run.action, TC_ACT_OK);
    let out = verified(&run.out);
    assert_eq!((out.saddr, out.sport), (CLIENT, 40001), "source untouched");
    assert!(
        is_web_backend(out.daddr),
        "destination {} is a backend",
        out.daddr
    );
    assert_eq!(out.dport, 8080);
    assert_eq!(out.l4_payload, b"hello");
    assert_eq!(run.out[..14], syn[..14], "ethernet header untouched");
    assert_eq!(run.out.len(), syn.len());
    let backend = out.daddr;

    // The backend's SYN-ACK is rewritten back to come from the VIP.
    let synack = Frame::new(
        backend,
        CLIENT,
        L4::Tcp {
            sport: 8080,
            dport: 40001,
            seq: 7,
            ack: 1001,
            flags: tcp::SYN | tcp::ACK,
        },
    )
    .build();
    let run = f.run(&synack);
    run.counted_as(stats::XLATE_REPLY);
    let out = verified(&run.out);
    assert_eq!(
        (out.saddr, out.sport),
        (VIP, 80),
        "reply comes from the VIP"
    );
    assert_eq!((out.daddr, out.dport), (CLIENT, 40001));

    // Later packets of the flow stick to the same backend.
    for _ in 0..20 {
        let ack = Frame::tcp(CLIENT, 40001, VIP, 80, tcp::ACK).build();
        let run = f.run(&ack);
        run.counted_as(stats::XLATE_FORWARD);
        assert_eq!(verified(&run.out).daddr, backend);
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn new_flows_spread_over_every_backend() {
    let mut f = fixture();
    let mut seen = BTreeMap::new();
    for sport in 41000..41200 {
        let run = f.run(&Frame::tcp(CLIENT, sport, VIP, 80, tcp::SYN).build());
        *seen.entry(verified(&run.out).daddr).or_insert(0) += 1;
    }
    println!("200 new flows: {seen:?}");
    assert_eq!(seen.len(), 3, "all three backends chosen: {seen:?}");
    for (b, n) in &seen {
        assert!(*n > 30, "backend {b} got only {n} of 200 flows");
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn established_flow_keeps_its_backend_when_the_backend_set_changes() {
    let mut f = fixture();
    let run = f.run(&Frame::tcp(CLIENT, 42000, VIP, 80, tcp::SYN).build());
    let backend = verified(&run.out).daddr;

    // Remove that backend from the service.
    let remaining: BTreeSet<Endpoint> = backends(3)
        .into_iter()
        .filter(|e| e.addr != backend)
        .collect();
    f.dp.apply(&desired(&Backends {
        web: remaining.clone(),
        ..Default::default()
    }))
    .expect("apply");
    let run = f.run(
        &Frame::tcp(CLIENT, 42000, VIP, 80, tcp::ACK)
            .payload(b"more")
            .build(),
    );
    run.counted_as(stats::XLATE_FORWARD);
    assert_eq!(
        verified(&run.out).daddr,
        backend,
        "established flow stays put"
    );

    // New flows avoid it.
    for sport in 42001..42101 {
        let run = f.run(&Frame::tcp(CLIENT, sport, VIP, 80, tcp::SYN).build());
        let d = verified(&run.out).daddr;
        assert!(
            remaining.iter().any(|e| e.addr == d),
            "new flow went to removed backend {d}"
        );
    }
    f.dp.apply(&desired(&Backends::default())).expect("restore");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn closed_tuple_reused_by_a_new_syn_chooses_afresh() {
    let mut f = fixture();
    let (backend, _) = new_flow(&mut f, CLIENT, 43000, VIP);
    f.run(&Frame::tcp(CLIENT, 43000, VIP, 80, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    // Half-closed: a SYN does not move the flow.
    f.run(&Frame::tcp(CLIENT, 43000, VIP, 80, tcp::SYN).build())
        .counted_as(stats::XLATE_FORWARD);
    f.run(&Frame::tcp(backend, 8080, CLIENT, 43000, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_REPLY);
    // Only backend 1 remains: a new SYN on the closed tuple must go there, whichever backend
    // the closed connection used.
    let only = backends(1);
    f.dp.apply(&desired(&Backends {
        web: only.clone(),
        ..Default::default()
    }))
    .expect("apply");
    let run = f.run(&Frame::tcp(CLIENT, 43000, VIP, 80, tcp::SYN).build());
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(verified(&run.out).daddr, only.first().unwrap().addr);
    f.dp.apply(&desired(&Backends::default())).expect("restore");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn udp_is_translated_and_a_zero_checksum_stays_zero() {
    let mut f = fixture();
    let dgram = Frame::udp(CLIENT, 44000, VIP, 53).payload(b"query").build();
    let run = f.run(&dgram);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let out = verified(&run.out);
    assert_eq!((out.daddr, out.dport), (DNS_BACKEND, 5353));
    assert_ne!(run.out[40..42], [0, 0], "computed checksum kept");

    let mut no_sum = Frame::udp(CLIENT, 44001, VIP, 53).payload(b"query");
    no_sum.l4 = L4::Udp {
        sport: 44001,
        dport: 53,
        zero_checksum: true,
    };
    let run = f.run(&no_sum.build());
    run.counted_as(stats::XLATE_NEW_FLOW);
    verified(&run.out);
    assert_eq!(
        run.out[40..42],
        [0, 0],
        "UDP checksum 0 means none and must stay 0"
    );

    let reply = Frame::udp(DNS_BACKEND, 5353, CLIENT, 44000)
        .payload(b"answer")
        .build();
    let run = f.run(&reply);
    run.counted_as(stats::XLATE_REPLY);
    let out = verified(&run.out);
    assert_eq!((out.saddr, out.sport), (VIP, 53));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ip_options_are_kept_and_the_ports_behind_them_translated() {
    let mut f = fixture();
    // Record-route option (type 7, length 7, pointer 4) plus padding.
    let frame = Frame {
        ip_options: vec![7, 7, 4, 0, 0, 0, 0],
        ..Frame::tcp(CLIENT, 45000, VIP, 80, tcp::SYN).payload(b"opt")
    }
    .build();
    let run = f.run(&frame);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let out = verified(&run.out);
    assert!(is_web_backend(out.daddr));
    assert_eq!(out.dport, 8080);
    assert_eq!(run.out[34..42], frame[34..42], "options unchanged");
    assert_eq!(out.l4_payload, b"opt");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn traffic_not_for_a_service_passes_untouched() {
    let mut f = fixture();
    let echo = L4::Raw {
        proto: proto::ICMP,
        bytes: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "tcp to a non-service address",
            Frame::tcp(CLIENT, 46000, OTHER, 80, tcp::SYN).build(),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "tcp to the VIP on another port",
            Frame::tcp(CLIENT, 46000, VIP, 81, tcp::SYN).build(),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "udp to the VIP's tcp port",
            Frame::udp(CLIENT, 46000, VIP, 80).build(),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "icmp echo to the VIP",
            Frame::new(CLIENT, VIP, echo).build(),
            stats::PASS_OTHER,
        ),
        (
            "first fragment to a non-service address",
            Frame {
                frag_off: 0x2000,
                ..Frame::udp(CLIENT, 46000, OTHER, 53)
            }
            .build(),
            stats::PASS_NOT_SERVICE,
        ),
        (
            "later fragment to a node address that serves NodePorts (the host's own traffic)",
            Frame {
                frag_off: 0x0010,
                ip_id: 0x7778,
                ..Frame::new(
                    CLIENT,
                    NODE_IP,
                    L4::Raw {
                        proto: proto::UDP,
                        bytes: vec![0xab; 16],
                    },
                )
            }
            .build(),
            stats::PASS_OTHER,
        ),
        (
            "later fragment to a non-service address",
            Frame {
                frag_off: 0x0010,
                ..Frame::new(
                    CLIENT,
                    OTHER,
                    L4::Raw {
                        proto: proto::UDP,
                        bytes: vec![0xab; 16],
                    },
                )
            }
            .build(),
            stats::PASS_OTHER,
        ),
        ("arp", arp_frame(), stats::PASS_NOT_IP),
        (
            "ipv6 without an upper-layer header",
            ipv6_frame(),
            stats::PASS_OTHER,
        ),
        (
            "truncated tcp to a non-service address",
            truncate_l4(Frame::tcp(CLIENT, 46000, OTHER, 80, tcp::SYN).build(), 10),
            stats::PASS_NOT_SERVICE,
        ),
    ];
    for (what, frame, reason) in cases {
        println!("case: {what}");
        f.run(&frame).untouched(&frame).counted_as(reason);
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn malformed_ipv4_is_left_to_the_kernel_untouched() {
    let mut f = fixture();
    let good = Frame::tcp(CLIENT, 47000, VIP, 80, tcp::SYN).build();
    let patched = |off: usize, bytes: &[u8]| {
        let mut f = good.clone();
        patch_ipv4(&mut f, off, bytes);
        f
    };
    // A frame with an IPv4 ethertype but less than a whole IPv4 header cannot be fed through
    // BPF_PROG_TEST_RUN: the kernel refuses it (EINVAL, measured on 6.18 for lengths 14-33).
    // The datapath's bounds check passes such frames on untouched, like the cases below.
    let cases = [
        ("ihl below 5", patched(0, &[0x44])),
        ("version 6 in an ipv4 ethertype", patched(0, &[0x65])),
        (
            "total length beyond the frame",
            patched(2, &2000u16.to_be_bytes()),
        ),
        (
            "total length shorter than the header",
            patched(2, &10u16.to_be_bytes()),
        ),
    ];
    for (what, frame) in cases {
        println!("case: {what}");
        f.run(&frame)
            .untouched(&frame)
            .counted_as(stats::PASS_MALFORMED_IP);
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn unparseable_packets_for_a_service_are_dropped_not_misdirected() {
    let mut f = fixture();
    let mut bad_doff = Frame::tcp(CLIENT, 48000, VIP, 80, tcp::SYN).build();
    bad_doff[14 + 20 + 12] = 3 << 4;
    let mut udp_len_too_long = Frame::udp(CLIENT, 48000, VIP, 53).build();
    udp_len_too_long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&100u16.to_be_bytes());
    let later_fragment = L4::Raw {
        proto: proto::UDP,
        bytes: vec![0xab; 16],
    };
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "later fragment to the VIP whose first fragment was never seen",
            Frame {
                frag_off: 0x0010,
                // An id no other case's datagram uses: the fixture is shared.
                ip_id: 0x7777,
                ..Frame::new(CLIENT, VIP, later_fragment)
            }
            .build(),
            stats::DROP_FRAGMENT,
        ),
        (
            "tcp header cut short",
            truncate_l4(Frame::tcp(CLIENT, 48000, VIP, 80, tcp::SYN).build(), 10),
            stats::DROP_MALFORMED_L4,
        ),
        (
            "tcp data offset below 5",
            bad_doff,
            stats::DROP_MALFORMED_L4,
        ),
        (
            "udp header cut short",
            truncate_l4(Frame::udp(CLIENT, 48000, VIP, 53).build(), 4),
            stats::DROP_MALFORMED_L4,
        ),
        (
            "udp length beyond the datagram",
            udp_len_too_long,
            stats::DROP_MALFORMED_L4,
        ),
    ];
    for (what, frame, reason) in cases {
        println!("case: {what}");
        let run = f.run(&frame);
        assert_eq!(run.action, TC_ACT_SHOT, "{what}");
        run.counted_as(reason);
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn tcp_to_a_service_without_backends_is_answered_with_rst() {
    let mut f = fixture();
    // (case, flags, payload, expected seq, ack, flags); the input has seq 1000, ack 5555.
    let cases = [
        (
            "syn",
            tcp::SYN,
            &b""[..],
            0u32,
            1001u32,
            tcp::RST | tcp::ACK,
        ),
        (
            "data without ack",
            tcp::PSH,
            &b"abcd"[..],
            0,
            1004,
            tcp::RST | tcp::ACK,
        ),
        (
            "fin without ack",
            tcp::FIN,
            &b""[..],
            0,
            1001,
            tcp::RST | tcp::ACK,
        ),
        ("ack", tcp::ACK, &b"xy"[..], 5555, 0, tcp::RST),
    ];
    for (what, flags, payload, seq, ack, rst_flags) in cases {
        println!("case: {what}");
        let mut frame = Frame::tcp(CLIENT, 49000, EMPTY_VIP, 80, flags).payload(payload);
        frame.l4 = L4::Tcp {
            sport: 49000,
            dport: 80,
            seq: 1000,
            ack: 5555,
            flags,
        };
        let run = f.run(&frame.build());
        run.counted_as(stats::REJECT_TCP_RST);
        assert_eq!(run.action, TC_ACT_REDIRECT);
        let out = verified(&run.out);
        assert_eq!((out.saddr, out.sport), (EMPTY_VIP, 80));
        assert_eq!((out.daddr, out.dport), (CLIENT, 49000));
        assert_eq!(run.out[0..6], CLIENT_MAC, "sent back to the client's MAC");
        assert_eq!(run.out[6..12], NODE_MAC);
        assert_eq!(run.out.len(), 54, "no payload");
        let t = &run.out[34..54];
        assert_eq!(u32::from_be_bytes(t[4..8].try_into().unwrap()), seq, "seq");
        assert_eq!(u32::from_be_bytes(t[8..12].try_into().unwrap()), ack, "ack");
        assert_eq!(t[13], rst_flags, "flags");
    }
    // Never answer an RST.
    let rst = Frame::tcp(CLIENT, 49001, EMPTY_VIP, 80, tcp::RST).build();
    let run = f.run(&rst);
    assert_eq!(run.action, TC_ACT_SHOT);
    run.counted_as(stats::DROP_NO_BACKEND);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn udp_to_a_service_without_backends_gets_port_unreachable() {
    let mut f = fixture();
    let long = b"a much longer payload than the quote keeps, so it gets trimmed";
    for payload in [&b""[..], &long[..]] {
        let input = Frame::udp(CLIENT, 50000, EMPTY_VIP, 53)
            .payload(payload)
            .build();
        let run = f.run(&input);
        run.counted_as(stats::REJECT_ICMP_UNREACH);
        assert_eq!(run.action, TC_ACT_REDIRECT);
        let out = verified(&run.out);
        assert_eq!((out.saddr, out.daddr), (EMPTY_VIP, CLIENT));
        let p = SlicedPacket::from_ethernet(&run.out).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = p.transport else {
            panic!("not icmp")
        };
        assert!(matches!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
        ));
        assert_eq!(
            icmp.payload(),
            &input[14..14 + 28],
            "quotes the original IPv4 + UDP headers"
        );
    }
    // UDP with IP options cannot be quoted in 28 bytes: dropped and counted.
    let with_opts = Frame {
        ip_options: vec![1, 1, 1, 1],
        ..Frame::udp(CLIENT, 50001, EMPTY_VIP, 53)
    }
    .build();
    let run = f.run(&with_opts);
    assert_eq!(run.action, TC_ACT_SHOT);
    run.counted_as(stats::DROP_NO_BACKEND);
}

/// The backend a new TCP flow from `client`:`sport` to `vip`:80 is sent to, and how it was
/// counted.
fn new_flow(f: &mut Fixture, client: Ipv4Addr, sport: u16, vip: Ipv4Addr) -> (Ipv4Addr, u32) {
    let run = f.run(&Frame::tcp(client, sport, vip, 80, tcp::SYN).build());
    let reason = run
        .counted
        .iter()
        .position(|n| *n == 1)
        .expect("one counter") as u32;
    (verified(&run.out).daddr, reason)
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let mut f = fixture();
    let client = Ipv4Addr::new(10, 0, 1, 50);
    let (first, reason) = new_flow(&mut f, client, 51000, STICKY_VIP);
    assert_eq!(reason, stats::XLATE_NEW_FLOW, "the first flow chooses");
    for sport in 51001..51030 {
        let (b, reason) = new_flow(&mut f, client, sport, STICKY_VIP);
        assert_eq!(
            b, first,
            "new connection {sport} left the remembered backend"
        );
        assert_eq!(reason, stats::XLATE_NEW_FLOW_AFFINITY);
    }
    // Other clients are not bound by it: over 30 clients more than one backend is used.
    let others: BTreeSet<Ipv4Addr> = (60..90)
        .map(|i| new_flow(&mut f, Ipv4Addr::new(10, 0, 1, i), 51000, STICKY_VIP).0)
        .collect();
    assert!(others.len() > 1, "30 clients all went to {others:?}");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn affinity_to_a_removed_backend_is_forgotten() {
    let mut f = fixture();
    let client = Ipv4Addr::new(10, 0, 1, 51);
    let (first, _) = new_flow(&mut f, client, 52000, STICKY_VIP);
    let remaining: BTreeSet<Endpoint> = backends(3)
        .into_iter()
        .filter(|e| e.addr != first)
        .collect();
    f.dp.apply(&desired(&Backends {
        sticky: remaining.clone(),
        ..Default::default()
    }))
    .expect("apply");
    let (second, reason) = new_flow(&mut f, client, 52001, STICKY_VIP);
    assert_ne!(second, first, "affinity must not outlive membership");
    assert_eq!(reason, stats::XLATE_NEW_FLOW);
    for sport in 52002..52012 {
        assert_eq!(
            new_flow(&mut f, client, sport, STICKY_VIP).0,
            second,
            "sticks to the new one"
        );
    }
    // The backend coming back does not reclaim the client: its affinity is to `second` now.
    f.dp.apply(&desired(&Backends::default())).expect("restore");
    assert_eq!(new_flow(&mut f, client, 52012, STICKY_VIP).0, second);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn affinity_expires_after_its_timeout() {
    let mut f = fixture();
    let clients: Vec<Ipv4Addr> = (100..130).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
    let first: Vec<Ipv4Addr> = clients
        .iter()
        .map(|c| new_flow(&mut f, *c, 53000, BRIEF_VIP).0)
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1300));
    // After the 1 s timeout every client chooses afresh: a third of them keep their backend
    // by chance, so over 30 clients some must move (all staying: p = 3^-30).
    let mut moved = 0;
    for (c, before) in clients.iter().zip(&first) {
        let (now, reason) = new_flow(&mut f, *c, 53001, BRIEF_VIP);
        assert_eq!(
            reason,
            stats::XLATE_NEW_FLOW,
            "expired affinity is not used"
        );
        moved += usize::from(now != *before);
    }
    println!("after expiry {moved} of 30 clients moved to another backend");
    assert!(moved > 0);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn maglev_maps_a_flow_by_its_tuple_and_removing_one_of_ten_backends_moves_few() {
    let mut f = fixture();
    // 2000 flows: SYN (choose), RST (close), so that a later SYN on the same tuple chooses
    // again, by the table, without the old connection's state.
    let tuples: Vec<(Ipv4Addr, u16)> = (0..2000u16)
        .map(|i| {
            (
                Ipv4Addr::new(10, 0, 2 + (i / 250) as u8, (i % 250) as u8 + 1),
                54000 + i,
            )
        })
        .collect();
    let choose = |f: &mut Fixture, (client, sport): (Ipv4Addr, u16)| {
        let (b, reason) = new_flow(f, client, sport, MAGLEV_VIP);
        assert_eq!(reason, stats::XLATE_NEW_FLOW);
        f.run(&Frame::tcp(client, sport, MAGLEV_VIP, 80, tcp::RST).build())
            .counted_as(stats::XLATE_FORWARD);
        b
    };
    let before: Vec<Ipv4Addr> = tuples.iter().map(|t| choose(&mut f, *t)).collect();
    // Stateless: choosing again gives the same backend for every flow.
    let again: Vec<Ipv4Addr> = tuples.iter().map(|t| choose(&mut f, *t)).collect();
    assert_eq!(before, again, "a tuple maps to the same backend every time");
    let used: BTreeSet<Ipv4Addr> = before.iter().copied().collect();
    assert_eq!(used.len(), 10, "all ten backends used");

    // Remove one of the ten.
    let removed = Ipv4Addr::new(10, 0, 20, 1);
    let nine = maglev_backends(10)
        .into_iter()
        .filter(|e| e.addr != removed)
        .collect();
    f.dp.apply(&desired(&Backends {
        maglev: nine,
        ..Default::default()
    }))
    .expect("apply");
    let after: Vec<Ipv4Addr> = tuples.iter().map(|t| choose(&mut f, *t)).collect();
    f.dp.apply(&desired(&Backends::default())).expect("restore");

    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, removed, "a flow went to the removed backend");
        moved += usize::from(b != a);
    }
    let on_removed = before.iter().filter(|b| **b == removed).count();
    let moved_needlessly = moved - on_removed;
    println!(
        "maglev, 1 of 10 backends removed: {moved} of 2000 flows moved ({:.1}%), {on_removed} had to, {moved_needlessly} others did",
        moved as f64 / 20.0
    );
    // Random selection would move ~90% of them; Maglev about 10% plus a little.
    assert!(
        moved_needlessly * 100 < 2000 * 3,
        "{moved_needlessly} flows moved needlessly"
    );
}

impl Fixture {
    /// Makes the conntrack entry of `key` look last used `age_ns` ago.
    fn age(&mut self, key: &CtKey, age_ns: u64) {
        let mut ct = self.dp.conntrack().expect("conntrack map");
        let mut e = ct.get(key, 0).expect("entry to age");
        e.last_seen_ns = monotonic_ns().wrapping_sub(age_ns);
        ct.insert(key, e, 0).expect("aging the entry");
    }
}

fn tuple(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: saddr.octets(),
        daddr: daddr.octets(),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn expired_entries_are_replaced_unless_the_other_direction_is_live() {
    use lb_common::conntrack::{
        CLOSING_LIFETIME_NS, ESTABLISHED_LIFETIME_NS, HALF_CLOSED_LIFETIME_NS, NON_TCP_LIFETIME_NS,
    };
    const SEC: u64 = 1_000_000_000;
    let mut f = fixture();
    let (backend, _) = new_flow(&mut f, CLIENT, 55000, VIP);
    f.run(&Frame::tcp(CLIENT, 55000, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    let forward = tuple(CLIENT, 55000, VIP, 80, proto::TCP);
    let reverse = tuple(backend, 8080, CLIENT, 55000, proto::TCP);

    // Only the client side idle past its lifetime: the backend side is live, the flow stays.
    f.age(&forward, ESTABLISHED_LIFETIME_NS + SEC);
    f.run(&Frame::tcp(CLIENT, 55000, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);

    // Both sides idle past it: the entry is stale; a reply is no longer translated and the
    // client's next packet starts a new flow.
    f.age(&forward, ESTABLISHED_LIFETIME_NS + SEC);
    f.age(&reverse, ESTABLISHED_LIFETIME_NS + SEC);
    let reply = Frame::tcp(backend, 8080, CLIENT, 55000, tcp::ACK).build();
    f.run(&reply)
        .untouched(&reply)
        .counted_as(stats::PASS_NOT_SERVICE);
    f.run(&Frame::tcp(CLIENT, 55000, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_NEW_FLOW);

    // A connection closed both ways goes after 10 seconds, not 6 hours.
    let (backend, _) = new_flow(&mut f, CLIENT, 55001, VIP);
    f.run(&Frame::tcp(CLIENT, 55001, VIP, 80, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    f.run(&Frame::tcp(backend, 8080, CLIENT, 55001, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_REPLY);
    let forward = tuple(CLIENT, 55001, VIP, 80, proto::TCP);
    let reverse = tuple(backend, 8080, CLIENT, 55001, proto::TCP);
    f.age(&forward, CLOSING_LIFETIME_NS - SEC);
    f.age(&reverse, CLOSING_LIFETIME_NS - SEC);
    f.run(&Frame::tcp(CLIENT, 55001, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    f.age(&forward, CLOSING_LIFETIME_NS + SEC);
    f.age(&reverse, CLOSING_LIFETIME_NS + SEC);
    f.run(&Frame::tcp(CLIENT, 55001, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_NEW_FLOW);

    // Half-closed (the client sent FIN, the backend is still sending): kept two minutes.
    let (backend, _) = new_flow(&mut f, CLIENT, 55003, VIP);
    f.run(&Frame::tcp(CLIENT, 55003, VIP, 80, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    let forward = tuple(CLIENT, 55003, VIP, 80, proto::TCP);
    let reverse = tuple(backend, 8080, CLIENT, 55003, proto::TCP);
    f.age(&forward, 60 * SEC);
    f.age(&reverse, 60 * SEC);
    let data = Frame::tcp(backend, 8080, CLIENT, 55003, tcp::ACK)
        .payload(b"late")
        .build();
    f.run(&data).counted_as(stats::XLATE_REPLY);
    // Then the flow is over: the agent's collection deletes it (the datapath itself judges
    // an entry by its own direction's state, which here is still established).
    f.age(&forward, HALF_CLOSED_LIFETIME_NS + SEC);
    f.age(&reverse, HALF_CLOSED_LIFETIME_NS + SEC);
    f.dp.collect_garbage().expect("garbage collection");
    f.run(&data).counted_as(stats::PASS_NOT_SERVICE);

    // UDP lives a minute.
    f.run(&Frame::udp(CLIENT, 55002, VIP, 53).build())
        .counted_as(stats::XLATE_NEW_FLOW);
    let forward = tuple(CLIENT, 55002, VIP, 53, proto::UDP);
    let reverse = tuple(DNS_BACKEND, 5353, CLIENT, 55002, proto::UDP);
    f.age(&forward, NON_TCP_LIFETIME_NS + SEC);
    f.age(&reverse, NON_TCP_LIFETIME_NS + SEC);
    f.run(&Frame::udp(CLIENT, 55002, VIP, 53).build())
        .counted_as(stats::XLATE_NEW_FLOW);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn garbage_collection_deletes_finished_flows_and_keeps_live_ones() {
    use lb_common::conntrack::CLOSING_LIFETIME_NS;
    const SEC: u64 = 1_000_000_000;
    let mut f = fixture();
    let (closed_backend, _) = new_flow(&mut f, CLIENT, 55100, VIP);
    f.run(&Frame::tcp(CLIENT, 55100, VIP, 80, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    f.run(&Frame::tcp(closed_backend, 8080, CLIENT, 55100, tcp::FIN | tcp::ACK).build())
        .counted_as(stats::XLATE_REPLY);
    let (live_backend, _) = new_flow(&mut f, CLIENT, 55101, VIP);
    let closed = [
        tuple(CLIENT, 55100, VIP, 80, proto::TCP),
        tuple(closed_backend, 8080, CLIENT, 55100, proto::TCP),
    ];
    let live = [
        tuple(CLIENT, 55101, VIP, 80, proto::TCP),
        tuple(live_backend, 8080, CLIENT, 55101, proto::TCP),
    ];
    for key in closed.iter().chain(&live) {
        f.age(key, CLOSING_LIFETIME_NS + SEC);
    }

    // A flow stamped just after the collector read its clock (another CPU) is fresh.
    let (ahead_backend, _) = new_flow(&mut f, CLIENT, 55102, VIP);
    let ahead = [
        tuple(CLIENT, 55102, VIP, 80, proto::TCP),
        tuple(ahead_backend, 8080, CLIENT, 55102, proto::TCP),
    ];
    for key in &ahead {
        let mut ct = f.dp.conntrack().expect("conntrack map");
        let mut e = ct.get(key, 0).expect("entry");
        e.last_seen_ns = monotonic_ns() + 1_000_000_000;
        ct.insert(key, e, 0).expect("stamping ahead");
    }

    // A closed source-NATed flow keeps its port for a minute (the backend's TIME_WAIT).
    let mut routed = vec![CLIENT];
    routed.extend(backends(3).iter().map(|e| ipv4(e.addr)));
    let net = RoutedNetns::enter(&routed);
    let run = f.run(&Frame::tcp(CLIENT, 55103, NODE_IP, 30080, tcp::SYN).build());
    let snat = verified(&run.out);
    f.run(&Frame::tcp(CLIENT, 55103, NODE_IP, 30080, tcp::RST).build());
    drop(net);
    let held = [
        tuple(CLIENT, 55103, NODE_IP, 30080, proto::TCP),
        tuple(snat.daddr, 8080, NODE_IP, snat.sport, proto::TCP),
    ];
    for key in &held {
        f.age(key, CLOSING_LIFETIME_NS + SEC);
    }

    let deleted = f.dp.collect_garbage().expect("garbage collection");
    assert!(deleted >= 2, "deleted {deleted}");
    let ct = f.dp.conntrack().expect("conntrack map");
    for key in &closed {
        assert!(ct.get(key, 0).is_err(), "closed flow's {key:?} deleted");
    }
    for key in live.iter().chain(&ahead) {
        assert!(ct.get(key, 0).is_ok(), "live flow's {key:?} kept");
    }
    for key in &held {
        assert!(ct.get(key, 0).is_ok(), "SNAT port of {key:?} still held");
    }
    for key in &held {
        f.age(key, lb_common::snat::HOLD_NS + SEC);
    }
    f.dp.collect_garbage().expect("garbage collection");
    let ct = f.dp.conntrack().expect("conntrack map");
    for key in &held {
        assert!(
            ct.get(key, 0).is_err(),
            "SNAT port of {key:?} freed after the hold"
        );
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_udp_flow_leaves_a_removed_backend_at_once_while_tcp_stays() {
    let mut f = fixture();
    // A client with a fixed source port (DNS resolvers do this), and a TCP connection.
    let dgram = Frame::udp(CLIENT, 56000, SPREAD_VIP, 53)
        .payload(b"q")
        .build();
    let run = f.run(&dgram);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let udp_backend = verified(&run.out).daddr;
    let (tcp_backend, _) = new_flow(&mut f, CLIENT, 56000, VIP);

    let without = |b: Ipv4Addr| -> BTreeSet<Endpoint> {
        backends(3).into_iter().filter(|e| e.addr != b).collect()
    };
    f.dp.apply(&desired(&Backends {
        spread: without(udp_backend),
        web: without(tcp_backend),
        ..Default::default()
    }))
    .expect("apply");

    let run = f.run(&dgram);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let moved_to = verified(&run.out).daddr;
    assert_ne!(
        moved_to, udp_backend,
        "the UDP flow must leave the removed backend"
    );
    f.run(&dgram).counted_as(stats::XLATE_FORWARD);
    assert_eq!(
        verified(&f.run(&dgram).out).daddr,
        moved_to,
        "and stay on the new one"
    );

    let run = f.run(&Frame::tcp(CLIENT, 56000, VIP, 80, tcp::ACK).build());
    run.counted_as(stats::XLATE_FORWARD);
    assert_eq!(
        verified(&run.out).daddr,
        tcp_backend,
        "an open TCP connection keeps its backend"
    );
    f.dp.apply(&desired(&Backends::default())).expect("restore");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_new_flow_clashing_with_a_live_one_on_the_backend_side_is_refused() {
    let mut f = fixture();
    // web and sticky both lead to backend 1 port 8080 only.
    f.dp.apply(&desired(&Backends {
        web: backends(1),
        sticky: backends(1),
        ..Default::default()
    }))
    .expect("apply");
    let (b, _) = new_flow(&mut f, CLIENT, 57000, VIP);
    // The same client port to the other frontend would share the backend-side tuple.
    let run = f.run(&Frame::tcp(CLIENT, 57000, STICKY_VIP, 80, tcp::SYN).build());
    assert_eq!(run.action, TC_ACT_SHOT);
    run.counted_as(stats::DROP_CT_CLASH);
    // The live flow's replies still come from its own frontend.
    let run = f.run(&Frame::tcp(b, 8080, CLIENT, 57000, tcp::SYN | tcp::ACK).build());
    run.counted_as(stats::XLATE_REPLY);
    assert_eq!(verified(&run.out).saddr, VIP);
    // Once the live flow is gone, the retry goes through.
    let gone = lb_common::conntrack::ESTABLISHED_LIFETIME_NS + 1_000_000_000;
    f.age(&tuple(CLIENT, 57000, VIP, 80, proto::TCP), gone);
    f.age(&tuple(b, 8080, CLIENT, 57000, proto::TCP), gone);
    let (_, reason) = new_flow(&mut f, CLIENT, 57000, STICKY_VIP);
    // (sticky has ClientIP affinity: the refused attempt's choice may be reused.)
    assert!(
        [stats::XLATE_NEW_FLOW, stats::XLATE_NEW_FLOW_AFFINITY].contains(&reason),
        "counted as {}",
        stats::NAMES[reason as usize]
    );
    f.dp.apply(&desired(&Backends::default())).expect("restore");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_syn_after_the_backend_reset_the_connection_chooses_afresh() {
    let mut f = fixture();
    let (b, _) = new_flow(&mut f, CLIENT, 58000, VIP);
    f.run(&Frame::tcp(CLIENT, 58000, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    // The backend resets; only the reverse entry sees it.
    f.run(&Frame::tcp(b, 8080, CLIENT, 58000, tcp::RST).build())
        .counted_as(stats::XLATE_REPLY);
    let (_, reason) = new_flow(&mut f, CLIENT, 58000, VIP);
    assert_eq!(
        reason,
        stats::XLATE_NEW_FLOW,
        "the SYN starts a new connection"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn the_rst_for_a_segment_awaiting_its_checksum_carries_the_seed() {
    use lb_common::checksum::{fold, pseudo_header, sum_bytes};
    let mut f = fixture();
    // What a local socket's SYN looks like before checksum offload: the field holds the
    // folded pseudo-header sum.
    let mut syn = Frame::tcp(CLIENT, 59000, EMPTY_VIP, 80, tcp::SYN).build();
    let seed_in = !fold(pseudo_header(
        CLIENT.octets(),
        EMPTY_VIP.octets(),
        proto::TCP,
        20,
    ));
    syn[34 + 16..34 + 18].copy_from_slice(&seed_in.to_be_bytes());
    let run = f.run(&syn);
    run.counted_as(stats::REJECT_TCP_RST);
    let mut out = run.out.clone();
    let seed_out = !fold(pseudo_header(
        EMPTY_VIP.octets(),
        CLIENT.octets(),
        proto::TCP,
        20,
    ));
    assert_eq!(
        u16::from_be_bytes([out[50], out[51]]),
        seed_out,
        "the RST carries the seed"
    );
    // Completing it as skb_checksum_help does gives a valid segment.
    let done = fold(sum_bytes(0, &out[34..54]));
    out[50..52].copy_from_slice(&done.to_be_bytes());
    verified(&out);
}

fn truncate_l4(mut frame: Vec<u8>, keep: usize) -> Vec<u8> {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame.truncate(14 + ihl + keep);
    let tot = (ihl + keep) as u16;
    patch_ipv4(&mut frame, 2, &tot.to_be_bytes());
    frame
}

fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&CLIENT.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&VIP.octets());
    f
}

fn ipv6_frame() -> Vec<u8> {
    let mut f = NODE_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, 59, 64]); // no next header
    f.extend_from_slice(&[0xfd; 32]);
    f
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn pinned_maps_of_another_layout_are_replaced_and_the_rest_adopted() {
    use aya::maps::{HashMap, Map, MapData, MapInfo};
    use lb_common::{CtEntry, CtKey};

    let dir = PathBuf::from(format!("/sys/fs/bpf/lbt-{}-layout", std::process::id()));
    let _ = EbpfDataplane::remove_pins(&dir);
    std::fs::create_dir_all(&dir).expect("pin dir");
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool (installed by `cargo xtask setup`)");
        assert!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // An older agent's STATS (one reason fewer) and a CONNTRACK of today's layout with a flow.
    let stats = dir.join("STATS");
    let conntrack = dir.join("CONNTRACK");
    bpftool(&[
        "map",
        "create",
        stats.to_str().unwrap(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "15",
        "name",
        "STATS",
    ]);
    bpftool(&[
        "map",
        "create",
        conntrack.to_str().unwrap(),
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        &std::mem::size_of::<CtEntry>().to_string(),
        "entries",
        "4096",
        "name",
        "CONNTRACK",
    ]);
    let flow = CtKey {
        saddr: [10, 0, 1, 9],
        daddr: [10, 96, 0, 10],
        sport_be: 1u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: proto::TCP,
        _pad: [0; 3],
    };
    let entry = CtEntry {
        backend_id: 7,
        nat_addr: [10, 0, 11, 2],
        nat_port_be: 8080u16.to_be(),
        ..Default::default()
    };
    {
        let map = Map::from_map_data(MapData::from_pin(&conntrack).unwrap()).unwrap();
        let mut ct: HashMap<_, CtKey, CtEntry> = map.try_into().unwrap();
        ct.insert(flow, entry, 0).unwrap();
    }

    let dp = EbpfDataplane::load_with(&dir, &small_tables()).expect("load");
    let stats_now = MapInfo::from_pin(&stats).expect("STATS pinned again");
    assert_eq!(
        stats_now.max_entries(),
        stats::REASONS,
        "STATS recreated with today's layout"
    );
    let map = Map::from_map_data(MapData::from_pin(&conntrack).unwrap()).unwrap();
    let ct: HashMap<_, CtKey, CtEntry> = map.try_into().unwrap();
    assert_eq!(ct.get(&flow, 0).expect("the tracked flow survived"), entry);
    drop(dp);
    EbpfDataplane::remove_pins(&dir).expect("cleanup");
}

/// Runs the calling test thread in a network namespace of its own, set up so the datapath's
/// FIB lookups give known answers: a veth `lbr0` (10.0.0.1/8, forwarding on) with neighbour
/// entries for the client and the web backends. Dropping the guard returns the thread to its
/// namespace. BPF_PROG_TEST_RUN runs the program in the caller's namespace, and a redirect in
/// a test run only sets the verdict: nothing is transmitted.
struct RoutedNetns {
    original: std::fs::File,
    lbr0_mac: [u8; 6],
}

/// MAC of neighbour `addr` in the routed namespace.
fn neighbour_mac(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0xaa, o[0], o[1], o[2], o[3]]
}

impl RoutedNetns {
    fn enter(with_neighbours: &[Ipv4Addr]) -> RoutedNetns {
        RoutedNetns::enter_dual(with_neighbours, &[])
    }

    /// As `enter`, with IPv6 neighbours too (lbr0 also has `fd00::1/16`, forwarding on).
    fn enter_dual(with_neighbours: &[Ipv4Addr], with_neighbours6: &[Ipv6Addr]) -> RoutedNetns {
        let original = std::fs::File::open("/proc/thread-self/ns/net").expect("current netns");
        // SAFETY: unshare affects only this thread's network namespace.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET)"
        );
        let mut guard = RoutedNetns {
            original,
            lbr0_mac: [0; 6],
        };
        // Children inherit this thread's namespace.
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&[
            "link", "add", "lbr0", "type", "veth", "peer", "name", "lbr1",
        ]);
        ip(&["addr", "add", "10.0.0.1/8", "dev", "lbr0"]);
        ip(&["link", "set", "lo", "up"]);
        ip(&["link", "set", "lbr1", "up"]);
        ip(&["link", "set", "lbr0", "up"]);
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("ipv6 forwarding");
        ip(&["addr", "add", "fd00::1/16", "dev", "lbr0", "nodad"]);
        let v4 = with_neighbours
            .iter()
            .map(|a| (IpAddr::from(*a), neighbour_mac(*a)));
        let v6 = with_neighbours6
            .iter()
            .map(|a| (IpAddr::from(*a), ipv6::neighbour_mac6(*a)));
        for (addr, mac) in v4.chain(v6) {
            let mac = mac
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            ip(&[
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                "lbr0",
                "nud",
                "permanent",
            ]);
        }
        // Not from /sys/class/net: sysfs shows the namespace it was mounted in.
        let out = std::process::Command::new("ip")
            .args(["-br", "link", "show", "lbr0"])
            .output()
            .expect("ip");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let mac = line
            .split_whitespace()
            .nth(2)
            .expect("lbr0's MAC in `ip -br link`");
        for (b, hex) in guard.lbr0_mac.iter_mut().zip(mac.split(':')) {
            *b = u8::from_str_radix(hex, 16).expect("mac");
        }
        guard
    }
}

impl Drop for RoutedNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns to the namespace this thread came from, by an fd we own.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 && !std::thread::panicking() {
            panic!(
                "returning to the original netns: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The output was routed by the datapath: redirected, addressed to `next_hop`'s MAC from
/// lbr0's, with the TTL (IPv6: hop limit) one lower than the test frames' 64.
fn assert_routed(run: &Run, net: &RoutedNetns, next_hop: impl Into<IpAddr>) {
    let (mac, ttl_off) = match next_hop.into() {
        IpAddr::V4(a) => (neighbour_mac(a), 14 + 8),
        IpAddr::V6(a) => (ipv6::neighbour_mac6(a), 14 + 7),
    };
    assert_eq!(run.action, TC_ACT_REDIRECT, "routed packets are redirected");
    assert_eq!(run.out[0..6], mac, "destination MAC");
    assert_eq!(run.out[6..12], net.lbr0_mac, "source MAC");
    assert_eq!(run.out[ttl_off], 63, "TTL or hop limit decremented");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn node_port_flows_are_source_nated_to_the_node_and_routed_both_ways() {
    let mut f = fixture();
    let mut all = vec![CLIENT];
    all.extend(backends(3).iter().map(|e| ipv4(e.addr)));
    let net = RoutedNetns::enter(&all);

    let syn = Frame::tcp(CLIENT, 40100, NODE_IP, 30080, tcp::SYN).build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let out = verified(&run.out);
    assert!(is_web_backend(out.daddr), "to a backend: {}", out.daddr);
    assert_eq!(out.dport, 8080);
    assert_eq!(out.saddr, NODE_IP, "source-NATed to the node");
    assert!(
        out.sport >= lb_common::snat::PORT_MIN,
        "SNAT port {} in range",
        out.sport
    );
    assert_routed(&run, &net, out.daddr);

    let reply = Frame::tcp(out.daddr, 8080, NODE_IP, out.sport, tcp::SYN | tcp::ACK).build();
    let run = f.run(&reply);
    run.counted_as(stats::XLATE_REPLY);
    let back = verified(&run.out);
    assert_eq!(
        (back.saddr, back.sport),
        (NODE_IP, 30080),
        "from the NodePort"
    );
    assert_eq!((back.daddr, back.dport), (CLIENT, 40100), "to the client");
    assert_routed(&run, &net, CLIENT);

    // The same service's ClusterIP keeps the client's address and is left to the stack.
    let syn = Frame::tcp(CLIENT, 40101, NODEPORT_VIP, 80, tcp::SYN).build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(run.action, TC_ACT_OK);
    assert_eq!(verified(&run.out).saddr, CLIENT);

    // Two flows from one client port get two SNAT ports of their own.
    let other = Frame::tcp(Ipv4Addr::new(10, 0, 1, 3), 40100, NODE_IP, 30080, tcp::SYN).build();
    let second = verified(&f.run(&other).out);
    if second.daddr == out.daddr {
        assert_ne!(second.sport, out.sport, "one backend, two flows, two ports");
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn local_policy_keeps_the_client_address_and_uses_only_local_backends() {
    let mut f = fixture();
    let mut all = vec![CLIENT];
    all.extend(backends(3).iter().map(|e| ipv4(e.addr)));
    let net = RoutedNetns::enter(&all);
    let local_backend = Ipv4Addr::new(10, 0, 11, 2);
    for sport in 40200..40220 {
        let run = f.run(&Frame::tcp(CLIENT, sport, NODE_IP, 30081, tcp::SYN).build());
        run.counted_as(stats::XLATE_NEW_FLOW);
        let out = verified(&run.out);
        assert_eq!(
            (out.saddr, out.sport),
            (CLIENT, sport),
            "client address kept"
        );
        assert_eq!(out.daddr, local_backend, "only the local backend");
        assert_routed(&run, &net, local_backend);
    }
    // Endpoints elsewhere, none here: dropped, as kube-proxy does, not rejected.
    let run = f.run(&Frame::tcp(CLIENT, 40300, NODE_IP, 30082, tcp::SYN).build());
    run.counted_as(stats::DROP_NO_LOCAL_BACKEND);
    assert_eq!(run.action, TC_ACT_SHOT);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_backend_reaching_itself_through_its_service_is_source_nated_to_the_hairpin_address() {
    let mut f = fixture();
    let hairpin = Ipv4Addr::from(lb_common::snat::HAIRPIN_ADDR);
    // The dns port has one backend, DNS_BACKEND: asking it through the VIP is a hairpin.
    let net = RoutedNetns::enter(&[DNS_BACKEND]);
    let query = Frame::udp(DNS_BACKEND, 40400, VIP, 53)
        .payload(b"q")
        .build();
    let run = f.run(&query);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let out = verified(&run.out);
    assert_eq!((out.daddr, out.dport), (DNS_BACKEND, 5353));
    assert_eq!(
        out.saddr, hairpin,
        "source-NATed, so the answer comes back here"
    );
    assert!(out.sport >= lb_common::snat::PORT_MIN);
    assert_routed(&run, &net, DNS_BACKEND);

    let answer = Frame::udp(DNS_BACKEND, 5353, hairpin, out.sport)
        .payload(b"a")
        .build();
    let run = f.run(&answer);
    run.counted_as(stats::XLATE_REPLY);
    let back = verified(&run.out);
    assert_eq!((back.saddr, back.sport), (VIP, 53), "from the service");
    assert_eq!(
        (back.daddr, back.dport),
        (DNS_BACKEND, 40400),
        "to the asking backend"
    );
    assert_routed(&run, &net, DNS_BACKEND);
}

/// A "fragmentation needed" (MTU 1400) from `from` to `to`, quoting the IPv4 packet in
/// `frame` (its header and 8 bytes of payload, as routers quote).
fn frag_needed(from: Ipv4Addr, to: Ipv4Addr, frame: &[u8]) -> Vec<u8> {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let quoted = &frame[14..14 + ihl + 8];
    Frame::icmp_error(from, to, 3, 4, [0, 0, 0x05, 0x78], quoted).build()
}

/// The quoted packet of an ICMP error, after checking its IPv4 header checksum.
struct Quote {
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    sport: u16,
    dport: u16,
}

fn quoted(icmp_payload: &[u8]) -> Quote {
    let (h, rest) = etherparse::Ipv4Header::from_slice(icmp_payload).expect("quoted IPv4");
    assert_eq!(
        h.calc_header_checksum(),
        h.header_checksum,
        "quoted header checksum"
    );
    Quote {
        saddr: h.source.into(),
        daddr: h.destination.into(),
        sport: u16::from_be_bytes([rest[0], rest[1]]),
        dport: u16::from_be_bytes([rest[2], rest[3]]),
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let mut f = fixture();
    let router = Ipv4Addr::new(10, 0, 99, 1);
    let (backend, _) = new_flow(&mut f, CLIENT, 40500, VIP);
    // What the backend side saw of the client's packet, and of the backend's reply.
    let sent = Frame::tcp(CLIENT, 40500, backend, 8080, tcp::ACK).build();
    let reply = Frame::tcp(VIP, 80, CLIENT, 40500, tcp::ACK).build();

    // From a router between node and backend, to the client: must quote client -> VIP.
    let run = f.run(&frag_needed(router, CLIENT, &sent));
    run.counted_as(stats::XLATE_ICMP_ERROR);
    let out = verified(&run.out);
    assert_eq!((out.saddr, out.daddr), (router, CLIENT));
    let q = quoted(&out.l4_payload);
    assert_eq!(
        (q.saddr, q.sport, q.daddr, q.dport),
        (CLIENT, 40500, VIP, 80)
    );

    // From a router between client and node, to the VIP: must reach the backend quoting its
    // own reply.
    let run = f.run(&frag_needed(router, VIP, &reply));
    run.counted_as(stats::XLATE_ICMP_ERROR);
    let out = verified(&run.out);
    assert_eq!(out.daddr, backend, "the error goes to the backend");
    let q = quoted(&out.l4_payload);
    assert_eq!(
        (q.saddr, q.sport, q.daddr, q.dport),
        (backend, 8080, CLIENT, 40500)
    );

    // The node's own error, leaving through egress, is translated the same way.
    let before = f.counters();
    let error = frag_needed(NODE_IP, CLIENT, &sent);
    let Run { action, out, .. } = f.run_egress(&error);
    assert_eq!(action, TC_ACT_OK);
    let q = quoted(&verified(&out).l4_payload);
    assert_eq!((q.daddr, q.dport), (VIP, 80));
    let after = f.counters();
    assert_eq!(
        after[stats::XLATE_ICMP_ERROR as usize] - before[stats::XLATE_ICMP_ERROR as usize],
        1
    );

    // Errors about anything else pass untouched.
    let stranger = Frame::tcp(CLIENT, 40501, OTHER, 8080, tcp::ACK).build();
    let error = frag_needed(router, CLIENT, &stranger);
    f.run(&error)
        .untouched(&error)
        .counted_as(stats::PASS_OTHER);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn icmp_errors_about_source_nated_flows_reach_the_real_client() {
    let mut f = fixture();
    let mut all = vec![CLIENT];
    all.extend(backends(3).iter().map(|e| ipv4(e.addr)));
    let _net = RoutedNetns::enter(&all);
    let run = f.run(&Frame::tcp(CLIENT, 40600, NODE_IP, 30080, tcp::SYN).build());
    let out = verified(&run.out);
    // A router between node and backend complains to the node about node:port -> backend.
    let sent = Frame::tcp(NODE_IP, out.sport, out.daddr, 8080, tcp::ACK).build();
    let run = f.run(&frag_needed(Ipv4Addr::new(10, 0, 99, 1), NODE_IP, &sent));
    run.counted_as(stats::XLATE_ICMP_ERROR);
    let icmp = verified(&run.out);
    assert_eq!(
        icmp.daddr, CLIENT,
        "to the real client, not the SNAT address"
    );
    let q = quoted(&icmp.l4_payload);
    assert_eq!(
        (q.saddr, q.sport, q.daddr, q.dport),
        (CLIENT, 40600, NODE_IP, 30080)
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn load_balancer_source_ranges_admit_only_listed_clients() {
    let mut f = fixture();
    let mut all = vec![CLIENT];
    all.extend(backends(3).iter().map(|e| ipv4(e.addr)));
    let _net = RoutedNetns::enter(&all);
    let run = f.run(&Frame::tcp(CLIENT, 40700, RANGED_LB_IP, 80, tcp::SYN).build());
    run.counted_as(stats::XLATE_NEW_FLOW);
    let outsider = Ipv4Addr::new(10, 0, 1, 200);
    let run = f.run(&Frame::tcp(outsider, 40700, RANGED_LB_IP, 80, tcp::SYN).build());
    run.counted_as(stats::DROP_SOURCE_RANGE);
    assert_eq!(run.action, TC_ACT_SHOT);
    // The service's ClusterIP is not a LoadBalancer frontend: open to everyone.
    let run =
        f.run(&Frame::tcp(outsider, 40701, Ipv4Addr::new(10, 96, 0, 19), 80, tcp::SYN).build());
    run.counted_as(stats::XLATE_NEW_FLOW);
}

/// Splits a built frame's IPv4 datagram in two fragments, the first carrying `first_len`
/// bytes of the IP payload (a multiple of 8), both with valid header checksums.
fn fragments(frame: &[u8], first_len: usize) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_len % 8, 0);
    let ihl = (frame[14] & 0x0f) as usize * 4;
    let (head, payload) = frame.split_at(14 + ihl);
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut f = head.to_vec();
        f.extend_from_slice(data);
        let tot_len = (ihl + data.len()) as u16;
        let frag_off = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        patch_ipv4(&mut f, 2, &tot_len.to_be_bytes());
        patch_ipv4(&mut f, 6, &frag_off.to_be_bytes());
        f
    };
    (
        piece(&payload[..first_len], 0, true),
        piece(&payload[first_len..], first_len, false),
    )
}

/// Reassembles two translated fragments and checks the datagram's UDP checksum over the new
/// addresses; returns (source, destination, source port, destination port).
fn reassembled_udp(first: &[u8], later: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    let ihl = (first[14] & 0x0f) as usize * 4;
    let (ip1, ip2) = (&first[14..14 + ihl], &later[14..14 + ihl]);
    for ip in [ip1, ip2] {
        assert!(
            lb_common::checksum::verifies(0, ip),
            "fragment header checksum"
        );
    }
    assert_eq!(
        ip1[12..20],
        ip2[12..20],
        "both fragments carry the same addresses"
    );
    let mut udp = first[14 + ihl..].to_vec();
    udp.extend_from_slice(&later[14 + ihl..]);
    let (saddr, daddr) = (
        <[u8; 4]>::try_from(&ip1[12..16]).unwrap(),
        <[u8; 4]>::try_from(&ip1[16..20]).unwrap(),
    );
    let sum = lb_common::checksum::pseudo_header(saddr, daddr, proto::UDP, udp.len() as u16);
    assert!(
        lb_common::checksum::verifies(sum, &udp),
        "reassembled UDP checksum"
    );
    (
        saddr.into(),
        daddr.into(),
        u16::from_be_bytes([udp[0], udp[1]]),
        u16::from_be_bytes([udp[2], udp[3]]),
    )
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn fragmented_datagrams_are_translated_whole_in_both_directions() {
    let mut f = fixture();
    let query = Frame::udp(CLIENT, 41000, VIP, 53)
        .payload(&[7u8; 100])
        .build();
    let (first, later) = fragments(&query, 56);
    let run = f.run(&first);
    run.counted_as(stats::XLATE_NEW_FLOW);
    let first_out = run.out.clone();
    let run = f.run(&later);
    run.counted_as(stats::XLATE_FRAGMENT);
    assert_eq!(run.action, TC_ACT_OK);
    assert_eq!(
        reassembled_udp(&first_out, &run.out),
        (CLIENT, DNS_BACKEND, 41000, 5353),
        "the whole datagram reaches the backend, its checksum intact"
    );

    // The backend's fragmented answer comes back from the VIP.
    let answer = Frame::udp(DNS_BACKEND, 5353, CLIENT, 41000)
        .payload(&[9u8; 100])
        .build();
    let (first, later) = fragments(&answer, 56);
    let run = f.run(&first);
    run.counted_as(stats::XLATE_REPLY);
    let first_out = run.out.clone();
    let run = f.run(&later);
    run.counted_as(stats::XLATE_FRAGMENT);
    assert_eq!(
        reassembled_udp(&first_out, &run.out),
        (VIP, CLIENT, 53, 41000)
    );
}

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn xdp_translates_and_redirects_node_port_flows_and_leaves_the_rest_to_tc() {
    let mut f = fixture();
    let mut all = vec![CLIENT];
    all.extend(backends(3).iter().map(|e| ipv4(e.addr)));
    let net = RoutedNetns::enter(&all);

    // lbr0 does not run the XDP program: a flow routed out of it is left to tc, untouched.
    let syn = Frame::tcp(CLIENT, 40805, NODE_IP, 30080, tcp::SYN).build();
    let run = f.run_xdp(&syn);
    assert_eq!((run.action, &run.out), (XDP_PASS, &syn));
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_FORWARD);

    // SAFETY: a NUL-terminated name.
    let lbr0 = unsafe { libc::if_nametoindex(c"lbr0".as_ptr()) };
    f.dp.add_xdp_target(lbr0).expect("lbr0 as an XDP target");
    let syn = Frame::tcp(CLIENT, 40800, NODE_IP, 30080, tcp::SYN).build();
    let run = f.run_xdp(&syn);
    run.counted_as(stats::XLATE_XDP_NEW_FLOW);
    assert_eq!(run.action, XDP_REDIRECT);
    let out = verified(&run.out);
    assert!(is_web_backend(out.daddr));
    assert_eq!(
        (out.saddr, out.dport),
        (NODE_IP, 8080),
        "source-NATed, to the target port"
    );
    assert_eq!(run.out[0..6], neighbour_mac(out.daddr), "destination MAC");
    assert_eq!(run.out[6..12], net.lbr0_mac, "source MAC");
    assert_eq!(run.out[14 + 8], 63, "TTL decremented");
    let first = (out.daddr, out.sport);

    // The flow's next packet takes the same way; the tc program would translate it alike.
    let ack = Frame::tcp(CLIENT, 40800, NODE_IP, 30080, tcp::ACK)
        .payload(b"hello")
        .build();
    let run = f.run_xdp(&ack);
    run.counted_as(stats::XLATE_XDP_TRACKED);
    let out = verified(&run.out);
    assert_eq!(
        (out.daddr, out.sport),
        first,
        "same backend, same SNAT port"
    );
    assert_eq!(out.l4_payload, b"hello");

    // Not the fast path's business: passed untouched and uncounted, for tc.
    let zero = vec![0u64; stats::REASONS as usize];
    for (what, frame) in [
        (
            "a ClusterIP flow",
            Frame::tcp(CLIENT, 40801, NODEPORT_VIP, 80, tcp::SYN).build(),
        ),
        (
            "a frontend without backends (tc answers it)",
            Frame::tcp(CLIENT, 40802, EMPTY_VIP, 80, tcp::SYN).build(),
        ),
        (
            "not a service",
            Frame::tcp(CLIENT, 40803, OTHER, 80, tcp::SYN).build(),
        ),
        ("not IPv4", arp_frame()),
    ] {
        let run = f.run_xdp(&frame);
        assert_eq!(run.action, XDP_PASS, "{what}");
        assert_eq!(run.out, frame, "{what}: untouched");
        assert_eq!(run.counted, zero, "{what}: counted by tc, not here");
    }
    drop(net);

    // Without a resolved next hop (a namespace with no neighbour entries) the packet passes
    // untouched, and the flow the XDP program started is tracked for tc to translate.
    let _bare = RoutedNetns::enter(&[]);
    let syn = Frame::tcp(CLIENT, 40804, NODE_IP, 30080, tcp::SYN).build();
    let run = f.run_xdp(&syn);
    assert_eq!((run.action, &run.out), (XDP_PASS, &syn));
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_FORWARD);
    assert_eq!(
        run.action, TC_ACT_REDIRECT,
        "tc resolves the neighbour itself"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_host_network_backend_gets_its_flows_delivered_locally_and_its_replies_translated_at_egress() {
    let mut f = fixture();
    let syn = Frame::tcp(CLIENT, 40900, NODE_IP, 30083, tcp::SYN).build();
    let run = f.run(&syn);
    run.counted_as(stats::XLATE_NEW_FLOW);
    assert_eq!(run.action, TC_ACT_OK, "delivered by the stack, not routed");
    let out = verified(&run.out);
    assert_eq!((out.saddr, out.sport), (CLIENT, 40900), "no source NAT");
    assert_eq!((out.daddr, out.dport), (NODE_IP, 9090));

    // The local process answers; its segment leaves through egress.
    let reply = Frame::tcp(NODE_IP, 9090, CLIENT, 40900, tcp::SYN | tcp::ACK).build();
    let before = f.counters();
    let Run { action, out, .. } = f.run_egress(&reply);
    assert_eq!(action, TC_ACT_OK);
    let back = verified(&out);
    assert_eq!(
        (back.saddr, back.sport),
        (NODE_IP, 30083),
        "from the NodePort"
    );
    assert_eq!((back.daddr, back.dport), (CLIENT, 40900));
    let after = f.counters();
    let replies = after[stats::XLATE_REPLY as usize] - before[stats::XLATE_REPLY as usize];
    assert_eq!(replies, 1);

    // Other traffic of the same local process (no tracked flow) leaves untouched.
    let other = Frame::tcp(NODE_IP, 9090, OTHER, 41000, tcp::ACK).build();
    f.run_egress(&other).untouched(&other);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn garbage_collection_keeps_a_new_flow_on_a_reused_tuple_apart_from_the_old_ones_leftover() {
    use lb_common::conntrack::CLOSING_LIFETIME_NS;
    const SEC: u64 = 1_000_000_000;
    let mut f = fixture();
    let (old_backend, _) = new_flow(&mut f, CLIENT, 43100, VIP);
    f.run(&Frame::tcp(old_backend, 8080, CLIENT, 43100, tcp::RST).build())
        .counted_as(stats::XLATE_REPLY);
    // The tuple is reused and, the old backend gone, lands elsewhere: the old reverse entry is
    // left behind, naming the new flow's forward entry as its partner.
    let others: BTreeSet<Endpoint> = backends(3)
        .into_iter()
        .filter(|e| e.addr != old_backend)
        .collect();
    f.dp.apply(&desired(&Backends {
        web: others,
        ..Default::default()
    }))
    .expect("apply");
    let (new_backend, reason) = new_flow(&mut f, CLIENT, 43100, VIP);
    assert_eq!(reason, stats::XLATE_NEW_FLOW);
    assert_ne!(new_backend, old_backend);
    f.run(&Frame::tcp(CLIENT, 43100, VIP, 80, tcp::ACK).build())
        .counted_as(stats::XLATE_FORWARD);
    f.dp.apply(&desired(&Backends::default())).expect("restore");

    let orphan = tuple(old_backend, 8080, CLIENT, 43100, proto::TCP);
    let live = [
        tuple(CLIENT, 43100, VIP, 80, proto::TCP),
        tuple(new_backend, 8080, CLIENT, 43100, proto::TCP),
    ];
    for key in live.iter().chain([&orphan]) {
        f.age(key, CLOSING_LIFETIME_NS + SEC);
    }
    f.dp.collect_garbage().expect("garbage collection");
    let ct = f.dp.conntrack().expect("conntrack map");
    assert!(
        ct.get(&orphan, 0).is_err(),
        "the reset flow's leftover goes"
    );
    for key in &live {
        assert!(
            ct.get(key, 0).is_ok(),
            "the new, established flow's {key:?} stays"
        );
    }
}
