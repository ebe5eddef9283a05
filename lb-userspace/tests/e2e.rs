//! Tier 3: end to end in network namespaces, with real sockets and the real agent.
//!
//! Each test builds its own topology (client, node, backends; see `testbed::topology`),
//! starts name-answering servers in the backends, writes a Service and its EndpointSlice into a
//! fresh manifest directory and runs `lb-agent` on the node's interfaces. Everything is torn
//! down by guards, also when an assertion fails; the agent's log is printed then.
//!
//! These need root and a BPF-capable kernel, so they are `#[ignore]`d for plain `cargo test`;
//! `cargo xtask test` runs them with `--ignored --test-threads=1`.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use lb_userspace::testbed::agent::{Agent, SyncInfo};
use lb_userspace::testbed::bed::{self, FIRST_SYNC, MANIFEST, RESYNC};
use lb_userspace::testbed::manifest::{
    demo as demo_manifest, demo6, demo_dual, TCP_PORT, TCP_TARGET, UDP_PORT, UDP_TARGET, VIP, VIP6,
};
use lb_userspace::testbed::servers::{
    assert_every_backend, backend_name, tally, tcp_name, udp_exchange, udp_name, BackendServers,
    TcpSession, CLIENT_TIMEOUT,
};
use lb_userspace::testbed::topology::{
    backend_ip6, Topology, CLIENT_IP6, NODE_IP, NODE_IP6, NODE_NAME,
};
use lb_userspace::testbed::{require_root, unique_bpffs_dir, TempDir};

fn tcp_vip() -> SocketAddr {
    SocketAddr::from((VIP, TCP_PORT))
}

/// Service `demo` with the given backends (see `testbed::manifest::demo`).
fn manifest(backends: &[usize]) -> String {
    demo_manifest(backends, None)
}

fn require_root_or_panic() {
    if let Err(e) = require_root() {
        panic!("{e}: these tests must not pass silently without it");
    }
}

/// One test's world (`testbed::bed::Bed`), with what these tests ask of it.
struct Bed(bed::Bed);

impl std::ops::Deref for Bed {
    type Target = bed::Bed;
    fn deref(&self) -> &bed::Bed {
        &self.0
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut bed::Bed {
        &mut self.0
    }
}

impl Bed {
    /// Builds the topology with `n_backends`, writes `initial` as the manifest and starts the
    /// agent, waiting for its first sync.
    fn start(n_backends: usize, initial: &str) -> Bed {
        Bed::start_with(n_backends, initial, &[])
    }

    /// As `start`, with more agent arguments.
    fn start_with(n_backends: usize, initial: &str, agent_args: &[&str]) -> Bed {
        let binary = Path::new(env!("CARGO_BIN_EXE_lb-agent"));
        match bed::Bed::start("e2e", n_backends, initial, binary, agent_args) {
            Ok(b) => Bed(b),
            Err(e) => panic!("{e}: these tests must not pass silently without it"),
        }
    }

    fn rewrite(&mut self, contents: String) -> SyncInfo {
        self.0.rewrite(&contents).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `f` in the client namespace (its sockets are the client's).
    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0
            .in_client(f)
            .expect("running in the client namespace")
    }

    /// `n` TCP connections to the VIP from the client, each returning who answered.
    fn tcp_names(&self, n: usize) -> Vec<io::Result<String>> {
        self.in_client(move || {
            (0..n)
                .map(|_| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                .collect()
        })
    }
}

/// The test bed alone, without the agent: namespaces, addressing, forwarding on the node,
/// servers and clients, and teardown.
#[test]
#[ignore = "needs root: run through `cargo xtask test`"]
fn testbed_backends_reachable_directly() {
    require_root_or_panic();
    let topo = Topology::build(1).expect("building the topology");
    let servers = BackendServers::start(&topo, TCP_TARGET, UDP_TARGET).expect("servers");
    let names: Vec<String> = [&topo.node, &topo.client.ns, &topo.backend(1).ns]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    println!(
        "namespaces: {names:?}, node interfaces: {:?}",
        topo.node_ifaces()
    );

    // Nothing routes anywhere but inside the topology.
    for ns in [&topo.node, &topo.client.ns, &topo.backend(1).ns] {
        let routes = ns.ip(&["route", "show"]).expect("ip route");
        assert!(
            !routes.contains("default"),
            "{} has a default route:\n{routes}",
            ns.name()
        );
    }
    // The sysctl helper writes the namespace's own value.
    assert_eq!(topo.node.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        topo.client.ns.read_sysctl("net.ipv4.ip_forward").unwrap(),
        "0"
    );
    assert_eq!(
        topo.node
            .read_sysctl("net.ipv4.conf.to-backend1.rp_filter")
            .unwrap(),
        "0"
    );

    // The client routes only the service CIDR; reach the backend itself through the node.
    topo.client
        .ns
        .ip(&["route", "add", "10.0.11.0/24", "via", "10.0.1.1"])
        .expect("temporary route to backend 1");
    let backend: SocketAddr = "10.0.11.2:8080".parse().unwrap();
    let (greeting, echo, udp) = topo
        .client
        .ns
        .run(move || {
            let mut session = TcpSession::connect(backend, CLIENT_TIMEOUT)?;
            let echo = session.echo("ping")?;
            let udp = udp_exchange(
                SocketAddr::from(([10, 0, 11, 2], UDP_TARGET)),
                b"hi",
                CLIENT_TIMEOUT,
            )?;
            io::Result::Ok((session.name().to_owned(), echo, udp))
        })
        .expect("running in the client namespace")
        .expect("reaching backend 1 directly");
    println!("TCP greeting {greeting:?}, echo {echo:?}, UDP {udp:?}");
    assert_eq!(greeting, "backend-1");
    assert_eq!(echo, "backend-1: ping");
    assert_eq!(udp, "backend-1: hi");
    assert_eq!(servers.tcp[0].accepted(), 1);
    assert_eq!(servers.udp[0].answered(), 1);

    // A closed port answers quickly: RST for TCP, ICMP port unreachable for UDP.
    let (tcp_closed, udp_closed) = topo
        .client
        .ns
        .run(|| {
            (
                tcp_name("10.0.11.2:9".parse().unwrap(), CLIENT_TIMEOUT),
                udp_name("10.0.11.2:9".parse().unwrap(), CLIENT_TIMEOUT),
            )
        })
        .unwrap();
    assert_eq!(
        tcp_closed.unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
    assert_eq!(
        udp_closed.unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );

    drop(servers);
    drop(topo);
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in &names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} survived the topology's drop"
        );
    }
}

/// How many `lb_ingress` programs are attached (tcx) at ingress of `iface` in `ns`.
fn lb_programs_attached(ns: &lb_userspace::testbed::netns::NetNs, iface: &str) -> usize {
    use aya::programs::{SchedClassifier, TcAttachType};
    let iface = iface.to_owned();
    let programs = ns
        .run(move || SchedClassifier::query_tcx(&iface, TcAttachType::Ingress))
        .expect("running in the node namespace")
        .unwrap_or_else(|e| {
            panic!(
                "querying tcx attachments failed ({e}); this check needs a kernel with tcx (6.6+)"
            )
        })
        .1;
    programs
        .iter()
        .filter(|p| p.name_as_str() == Some("lb_ingress"))
        .count()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn sigterm_detaches_and_pins_stay_unless_cleanup_is_given() {
    let mut bed = Bed::start(2, &manifest(&[1, 2]));
    // Through the wrapper's field: its agent is stopped while its topology is in use.
    let node = &bed.0.topo.node;
    assert_eq!(
        lb_programs_attached(node, "to-client"),
        1,
        "attached while running"
    );
    let pins = bed.agent.bpffs_dir().to_owned();
    let status = bed.0.agent.stop().expect("stopping the agent");
    assert!(
        status.success(),
        "agent exit status {status:?}\n{}",
        bed.agent.log()
    );
    assert_eq!(
        lb_programs_attached(node, "to-client"),
        0,
        "detached after SIGTERM"
    );
    assert!(!pins.exists(), "--cleanup removes {}", pins.display());

    // Without --cleanup the maps stay pinned, and the next run adopts them.
    let keep = unique_bpffs_dir().expect("bpffs");
    let ifaces = bed.topo.node_ifaces();
    let binary = Path::new(env!("CARGO_BIN_EXE_lb-agent"));
    let start = || {
        let mut a = Agent::start_keeping_pins(node, &bed.manifests, &ifaces, &keep, binary)
            .expect("starting lb-agent");
        a.wait_synced(1, FIRST_SYNC)
            .unwrap_or_else(|e| panic!("{e}"));
        a
    };
    let mut first = start();
    assert!(first.stop().expect("stop").success());
    assert_eq!(
        lb_programs_attached(node, "to-client"),
        0,
        "detached after SIGTERM"
    );
    for map in [
        "SERVICES",
        "BACKEND_SLOTS",
        "BACKENDS",
        "VIPS",
        "CONNTRACK",
        "STATS",
    ] {
        assert!(
            keep.join(map).exists(),
            "{map} stays pinned without --cleanup"
        );
    }
    // `first` still owns `keep`: forget its guard's directory removal until the end.
    let second = start();
    assert!(
        second.log().contains("adopting pinned maps"),
        "the restarted agent adopts the pinned maps:\n{}",
        second.log()
    );
    bed.agent = second;
    let answers = tally("TCP after a restart", bed.tcp_names(40));
    assert_every_backend("TCP after a restart", &answers, &[1, 2]);
    drop(first);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_bad_manifest_is_named_and_everything_else_keeps_working() {
    let mut bed = Bed::start(3, &manifest(&[1, 2, 3]));
    let wait_for_log = |agent: &Agent, needle: &str| {
        let deadline = Instant::now() + RESYNC;
        while !agent.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the agent never logged {needle:?}:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // A second file with an object that does not convert: named by file and object.
    let broken = "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  ports:\n  - port: not-a-number\n";
    TempDir::write_atomic(&bed.manifests, "broken.yaml", broken).expect("writing");
    wait_for_log(&bed.agent, "broken.yaml");
    let log = bed.agent.log();
    let line = log.lines().find(|l| l.contains("broken.yaml")).unwrap();
    assert!(
        line.contains("default/broken"),
        "the error names the object: {line}"
    );
    println!("agent reported: {line}");
    let counts = tally("TCP beside a broken manifest", bed.tcp_names(60));
    assert_every_backend("TCP beside a broken manifest", &counts, &[1, 2, 3]);

    // The good file still takes edits while the broken one is there.
    bed.rewrite(manifest(&[2]));
    let counts = tally("TCP after an edit", bed.tcp_names(20));
    assert_every_backend("TCP after an edit", &counts, &[2]);

    // Half-written YAML in the service's own file: the last good objects keep serving.
    TempDir::write_atomic(
        &bed.manifests,
        MANIFEST,
        "apiVersion: v1\nkind: [unclosed\n",
    )
    .expect("writing");
    wait_for_log(&bed.agent, "keeping");
    let counts = tally("TCP while its manifest is broken", bed.tcp_names(20));
    assert_every_backend("TCP while its manifest is broken", &counts, &[2]);
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn rst_is_valid_when_the_egress_completes_checksums() {
    // With checksum offload off on the node's client-facing veth, the kernel completes the
    // checksum of a CHECKSUM_PARTIAL skb (a local socket's segment) as it leaves. The RST the
    // datapath builds from such a SYN must still be valid after that.
    let bed = Bed::start(1, &manifest(&[]));
    bed.topo
        .node
        .exec("ethtool", &["-K", "to-client", "tx", "off"])
        .expect("ethtool (installed by `cargo xtask setup`)");
    let started = Instant::now();
    let tcp = bed.in_client(|| tcp_name(tcp_vip(), CLIENT_TIMEOUT));
    let took = started.elapsed();
    match tcp {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("want connection refused, got {other:?} after {took:?}"),
    }
    assert!(took < Duration::from_secs(1), "the RST took {took:?}");
}

/// An externalIP and a LoadBalancer ingress IP of the `external` service; the client routes
/// both (documentation ranges) to the node.
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

/// Service `external` (LoadBalancer: NodePort 30080, externalIP, ingress IP; policy Cluster;
/// `source_ranges` as its loadBalancerSourceRanges) and service `local` (NodePort 30081,
/// policy Local) over backends 1-3, of which only backend 1 runs on this node.
fn external_manifest(source_ranges: &str) -> String {
    let mut yaml = String::new();
    for (name, cluster_ip, node_port, extra) in [
        (
            "external",
            "10.96.0.20",
            30080,
            format!(
                "  type: LoadBalancer\n  externalIPs: [\"{EXTERNAL_IP}\"]\n  \
                 loadBalancerSourceRanges: [{source_ranges}]\n"
            ),
        ),
        (
            "local",
            "10.96.0.21",
            30081,
            "  type: NodePort\n  externalTrafficPolicy: Local\n".to_owned(),
        ),
    ] {
        yaml.push_str(&format!(
            "\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
{extra}  clusterIP: {cluster_ip}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: {TCP_TARGET}, nodePort: {node_port}}}]
"
        ));
        if name == "external" {
            yaml.push_str(&format!(
                "status: {{loadBalancer: {{ingress: [{{ip: \"{LB_IP}\"}}]}}}}\n"
            ));
        }
        yaml.push_str(&format!(
            "\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {TCP_TARGET}}}]
endpoints:
  - {{addresses: [\"10.0.11.2\"], nodeName: {NODE_NAME}}}
  - {{addresses: [\"10.0.12.2\"], nodeName: elsewhere}}
  - {{addresses: [\"10.0.13.2\"], nodeName: elsewhere}}
---
"
        ));
    }
    yaml
}

/// `n` connections from the client to `addr`, each returning who answered and the address
/// that backend saw the connection come from.
fn names_and_peers(bed: &Bed, addr: SocketAddr, n: usize) -> Vec<(String, std::net::IpAddr)> {
    bed.in_client(move || {
        (0..n)
            .map(|i| {
                let mut s = TcpSession::connect(addr, CLIENT_TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
                let peer = s
                    .peer_seen()
                    .unwrap_or_else(|e| panic!("asking {addr}: {e}"));
                (s.name().to_owned(), peer)
            })
            .collect()
    })
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn node_port_external_ip_and_load_balancer_ip_reach_backends_from_outside() {
    let node_ip = NODE_IP.to_string();
    let mut bed = Bed::start_with(3, &external_manifest(""), &["--node-ip", &node_ip]);
    for addr in [EXTERNAL_IP, LB_IP] {
        bed.topo
            .client
            .ns
            .ip(&["route", "add", &addr.to_string(), "via", &node_ip])
            .expect("client route");
    }

    // Policy Cluster: every backend, and each sees the node (SNAT), so replies come back
    // through it whatever the backend's routing.
    for frontend in [
        SocketAddr::from((NODE_IP, 30080)),
        SocketAddr::from((EXTERNAL_IP, 80)),
        SocketAddr::from((LB_IP, 80)),
    ] {
        let answers = names_and_peers(&bed, frontend, 30);
        let counts = tally(
            &format!("{frontend}"),
            answers.iter().map(|(n, _)| Ok(n.clone())).collect(),
        );
        assert_every_backend(&format!("{frontend}"), &counts, &[1, 2, 3]);
        for (name, peer) in &answers {
            assert_eq!(peer.to_string(), node_ip, "{frontend}: {name} saw the node");
        }
    }

    // Policy Local: only the local backend, and it sees the real client.
    let frontend = SocketAddr::from((NODE_IP, 30081));
    for (name, peer) in names_and_peers(&bed, frontend, 15) {
        assert_eq!(name, backend_name(1), "{frontend}: only the local backend");
        assert_eq!(
            peer.to_string(),
            "10.0.1.2",
            "{frontend}: client address kept"
        );
    }

    // loadBalancerSourceRanges that leave the client out close the LoadBalancer IP to it,
    // and only that: the externalIP and the NodePort stay open.
    bed.rewrite(external_manifest("\"192.0.2.0/24\""));
    let lb = SocketAddr::from((LB_IP, 80));
    let refused = bed.in_client(|| TcpSession::connect(lb, Duration::from_secs(1)).map(|_| ()));
    assert!(
        refused.is_err(),
        "the LoadBalancer IP must not answer a client outside its ranges; the maps:\n{}",
        bed.agent.dump().unwrap_or_else(|e| e.to_string())
    );
    for open in [
        SocketAddr::from((EXTERNAL_IP, 80)),
        SocketAddr::from((NODE_IP, 30080)),
    ] {
        assert_eq!(names_and_peers(&bed, open, 3).len(), 3, "{open} stays open");
    }
    bed.rewrite(external_manifest("\"10.0.1.0/24\""));
    assert_eq!(
        names_and_peers(&bed, lb, 3).len(),
        3,
        "a listed client gets in"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_backend_reaching_its_own_service_gets_answers_through_hairpin_nat() {
    let bed = Bed::start(3, &manifest(&[1, 2, 3]));
    let backend = bed.topo.backend(1);
    let hairpin = Ipv4Addr::from(lb_common::snat::HAIRPIN_ADDR).to_string();
    // Pods route everything through the node; the testbed's backends only know the client
    // subnet. Give them what pods reaching each other and services need (still nothing that
    // leads out of the namespaces: the node has no route out).
    for b in &bed.topo.backends {
        for dest in ["10.0.0.0/16", "10.96.0.0/12", hairpin.as_str()] {
            b.ns.ip(&["route", "add", dest, "via", &b.node_addr.to_string()])
                .expect("backend route");
        }
    }
    let answers: Vec<(String, std::net::IpAddr)> = backend
        .ns
        .run(|| {
            (0..30)
                .map(|i| {
                    let mut s = TcpSession::connect(tcp_vip(), CLIENT_TIMEOUT)
                        .unwrap_or_else(|e| panic!("connection {i} from backend 1: {e}"));
                    (s.name().to_owned(), s.peer_seen().expect("peer"))
                })
                .collect()
        })
        .expect("running in backend 1");
    let own: Vec<_> = answers
        .iter()
        .filter(|(n, _)| *n == backend_name(1))
        .collect();
    println!(
        "hairpin: {} of {} connections came back to backend 1 itself",
        own.len(),
        answers.len()
    );
    assert!(
        !own.is_empty(),
        "30 random choices of 3 never picked backend 1: {answers:?}"
    );
    for (_, peer) in own {
        assert_eq!(peer.to_string(), hairpin, "a hairpin flow is source-NATed");
    }
    for (name, peer) in answers.iter().filter(|(n, _)| *n != backend_name(1)) {
        assert_eq!(
            peer.to_string(),
            backend.addr.to_string(),
            "{name} saw backend 1 itself"
        );
    }
}

/// One backend behind `manifest`'s ClusterIP `vip`:`TCP_PORT`, and the node's side of the
/// backend link narrower than both ends think: the backend advertises an MSS for 1500 bytes,
/// the node cannot forward more than 1400, and tells the client so ("fragmentation needed",
/// IPv6's "packet too big") about client -> backend, which only helps once translated to
/// client -> VIP. A 20 kB echo must come back.
fn assert_path_mtu_discovery_works(manifest: &str, vip: std::net::IpAddr) {
    let bed = Bed::start(1, manifest);
    bed.topo
        .node
        .ip(&[
            "link",
            "set",
            &bed.topo.backend(1).node_iface,
            "mtu",
            "1400",
        ])
        .expect("narrowing the node's backend link");
    let line = "x".repeat(20_000);
    let vip = SocketAddr::from((vip, TCP_PORT));
    let echoed = bed.in_client(|| {
        let mut s = TcpSession::connect(vip, CLIENT_TIMEOUT)?;
        s.echo(&line)
    });
    let echoed = echoed.unwrap_or_else(|e| {
        panic!("20 kB through a 1400-byte link did not come back ({e}): PMTU discovery failed")
    });
    assert_eq!(echoed, format!("{}: {line}", backend_name(1)));
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn path_mtu_discovery_works_through_a_cluster_ip() {
    assert_path_mtu_discovery_works(&manifest(&[1]), VIP.into());
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_path_mtu_discovery_works_through_a_cluster_ip() {
    // IPv6 routers never fragment, and the node's "packet too big" leaves through egress.
    assert_path_mtu_discovery_works(&demo6(&[1], None), VIP6.into());
}

/// Three backends behind `manifest`'s ClusterIP `vip`:`UDP_PORT`: 4000-byte datagrams (the
/// client's kernel sends three fragments, and the backend's answer, its name and the payload,
/// comes back in three too) cross whole, both ways.
fn assert_fragmented_udp_crosses(manifest: &str, vip: std::net::IpAddr) {
    let bed = Bed::start(3, manifest);
    let payload = vec![b'f'; 4000];
    let vip = SocketAddr::from((vip, UDP_PORT));
    let answers: Vec<io::Result<String>> = bed.in_client(|| {
        (0..10)
            .map(|_| udp_exchange(vip, &payload, CLIENT_TIMEOUT))
            .collect()
    });
    for answer in answers {
        let answer = answer.unwrap_or_else(|e| panic!("a fragmented datagram got no answer: {e}"));
        let (name, echoed) = answer.split_once(": ").expect("`<name>: <payload>`");
        assert!(name.starts_with("backend-"), "answered by {name}");
        assert_eq!(echoed.len(), payload.len(), "the whole datagram came back");
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn fragmented_udp_datagrams_cross_a_cluster_ip_both_ways() {
    assert_fragmented_udp_crosses(&manifest(&[1, 2, 3]), VIP.into());
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_fragmented_udp_datagrams_cross_a_cluster_ip_both_ways() {
    assert_fragmented_udp_crosses(&demo6(&[1, 2, 3], None), VIP6.into());
}

/// The packet count of counter `name` in an `lb-agent dump`.
fn dumped_counter(dump: &str, name: &str) -> u64 {
    dump.lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn xdp_carries_node_port_traffic_and_a_failed_attach_falls_back_to_tc() {
    let node_ip = NODE_IP.to_string();
    // Every node interface as an XDP interface, as NICs would be (backends on other nodes
    // behind them), and `lo`, which has no native XDP: the agent must say so and carry on.
    let mut args = vec!["--node-ip", &node_ip, "--xdp-iface", "lo"];
    let topo_ifaces = ["to-client", "to-backend1", "to-backend2", "to-backend3"];
    for iface in &topo_ifaces {
        args.extend(["--xdp-iface", iface]);
    }
    let bed = Bed::start_with(3, &external_manifest(""), &args);
    let log = bed.agent.log();
    for iface in &topo_ifaces {
        let attached = format!("attached lb_xdp (native XDP) to {iface}");
        assert!(log.contains(&attached), "{log}");
    }
    assert!(log.contains("XDP fast path unavailable on lo"), "{log}");
    // What a NIC on the far end of each link would do, which veths need told: deliver
    // complete checksums (a veth peer leaves them to offload, which an XDP redirect cannot
    // finish) and take redirected frames (a veth does with NAPI on, i.e. GRO).
    let hosts = std::iter::once(&bed.topo.client).chain(&bed.topo.backends);
    for host in hosts {
        for setting in [["tx", "off"], ["gro", "on"]] {
            let ok = host
                .ns
                .command("ethtool")
                .args(["-K", "eth0"])
                .args(setting)
                .status()
                .expect("ethtool");
            assert!(
                ok.success(),
                "ethtool -K eth0 {setting:?} in {}",
                host.ns.name()
            );
        }
    }

    for (frontend, backends, peer) in [
        (
            SocketAddr::from((NODE_IP, 30080)),
            &[1, 2, 3][..],
            node_ip.as_str(),
        ),
        (SocketAddr::from((NODE_IP, 30081)), &[1][..], "10.0.1.2"),
    ] {
        let answers = names_and_peers(&bed, frontend, 30);
        let counts = tally(
            &format!("{frontend} over XDP"),
            answers.iter().map(|(n, _)| Ok(n.clone())).collect(),
        );
        assert_every_backend(&format!("{frontend}"), &counts, backends);
        for (name, seen) in &answers {
            assert_eq!(seen.to_string(), peer, "{frontend}: {name} saw");
        }
    }
    let dump = bed.agent.dump().expect("dump");
    let (new_flows, tracked) = (
        dumped_counter(&dump, "xlate_xdp_new_flow"),
        dumped_counter(&dump, "xlate_xdp_tracked"),
    );
    println!("XDP: {new_flows} of 60 new flows, {tracked} tracked packets");
    // A flow whose next hop is not resolved yet is started by XDP and left to tc
    // (`bpf_redirect_neigh`), which counts it as tracked: at most the first to each backend.
    assert!(
        (54..=60).contains(&new_flows),
        "the new flows went through XDP:\n{dump}"
    );
    assert!(tracked > 0, "their later packets too:\n{dump}");
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn a_host_network_backend_answers_through_its_node_port_and_cluster_ip() {
    let node_ip = NODE_IP.to_string();
    // A hostNetwork pod: a server in the node's own namespace, at a node address.
    let manifest = format!(
        "\
apiVersion: v1
kind: Service
metadata: {{name: hostnet, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 9090, nodePort: 30090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: hostnet-1, namespace: default, labels: {{kubernetes.io/service-name: hostnet}}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 9090}}]
endpoints:
  - {{addresses: [\"{node_ip}\"], nodeName: {NODE_NAME}}}
"
    );
    let bed = Bed::start_with(1, &manifest, &["--node-ip", &node_ip]);
    let _server = lb_userspace::testbed::servers::TcpServer::start(
        &bed.topo.node,
        SocketAddr::from((NODE_IP, 9090)),
        "host",
    )
    .expect("a server in the node namespace");
    for frontend in [
        SocketAddr::from((NODE_IP, 30090)),
        SocketAddr::from(([10, 96, 0, 30], 80)),
    ] {
        for (name, peer) in names_and_peers(&bed, frontend, 10) {
            assert_eq!(name, "host", "{frontend}");
            assert_eq!(peer.to_string(), "10.0.1.2", "{frontend}: no source NAT");
        }
    }
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_and_dual_stack_cluster_ips_reach_every_backend() {
    let bed = Bed::start(3, &demo_dual(&[1, 2, 3], None));
    let tcp6 = SocketAddr::from((VIP6, TCP_PORT));
    let udp6 = SocketAddr::from((VIP6, UDP_PORT));
    let answers = bed.in_client(move || {
        (0..150)
            .map(|_| tcp_name(tcp6, CLIENT_TIMEOUT))
            .collect::<Vec<_>>()
    });
    assert_every_backend(
        "TCP over IPv6",
        &tally("TCP over IPv6", answers),
        &[1, 2, 3],
    );
    let answers = bed.in_client(move || {
        (0..150)
            .map(|_| udp_name(udp6, CLIENT_TIMEOUT))
            .collect::<Vec<_>>()
    });
    assert_every_backend(
        "UDP over IPv6",
        &tally("UDP over IPv6", answers),
        &[1, 2, 3],
    );
    // The same service's IPv4 ClusterIP, from its own EndpointSlice.
    let tcp = tally("TCP over IPv4", bed.tcp_names(90));
    assert_every_backend("TCP over IPv4", &tcp, &[1, 2, 3]);
    // Each family's backend saw the client's own address of that family.
    let (_, peer) = names_and_peers(&bed, tcp6, 1).remove(0);
    assert_eq!(peer, std::net::IpAddr::from(CLIENT_IP6));
}

/// An IPv6-only NodePort service (30090, ClusterIP fd00:10:96::20) over the three backends.
fn node_port6_manifest() -> String {
    let endpoints: String = (1..=3)
        .map(|i| format!("  - {{addresses: [\"{}\"]}}\n", backend_ip6(i)))
        .collect();
    format!(
        "\
apiVersion: v1
kind: Service
metadata: {{name: web6, namespace: default}}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIP: fd00:10:96::20
  clusterIPs: [\"fd00:10:96::20\"]
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: {TCP_TARGET}, nodePort: 30090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web6-1, namespace: default, labels: {{kubernetes.io/service-name: web6}}}}
addressType: IPv6
ports: [{{name: http, protocol: TCP, port: {TCP_TARGET}}}]
endpoints:
{endpoints}"
    )
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn ipv6_node_port_reaches_every_backend_source_nated_to_the_node() {
    let (node_ip, node_ip6) = (NODE_IP.to_string(), NODE_IP6.to_string());
    let bed = Bed::start_with(
        3,
        &node_port6_manifest(),
        &["--node-ip", &node_ip, "--node-ip", &node_ip6],
    );
    let frontend = SocketAddr::from((NODE_IP6, 30090));
    let answers = names_and_peers(&bed, frontend, 30);
    let counts = tally(
        "IPv6 NodePort",
        answers.iter().map(|(n, _)| Ok(n.clone())).collect(),
    );
    assert_every_backend("IPv6 NodePort", &counts, &[1, 2, 3]);
    for (name, peer) in &answers {
        assert_eq!(peer.to_string(), node_ip6, "{name} saw the node (SNAT)");
    }
}

/// The health-check node port of [`health_checked_manifest`].
const HEALTH_CHECK_PORT: u16 = 32100;

/// How an endpoint of [`health_checked_manifest`] stands.
#[derive(Clone, Copy)]
enum Standing {
    Ready,
    /// Being deleted but still serving: used only when nothing is ready.
    Terminating,
}

/// A LoadBalancer service with externalTrafficPolicy `policy` and a health-check node port
/// (NodePort 30090), with `endpoints`: (backend, node it runs on, standing). Its slice carries
/// the trigger-time annotation the EndpointSlice controller writes, set to now.
fn health_checked_manifest(policy: &str, endpoints: &[(usize, &str, Standing)]) -> String {
    use lb_userspace::testbed::topology::backend_ip;
    let endpoints: String = endpoints
        .iter()
        .map(|&(i, node, standing)| {
            let conditions = match standing {
                Standing::Ready => "{ready: true, serving: true, terminating: false}",
                Standing::Terminating => "{ready: false, serving: true, terminating: true}",
            };
            format!(
                "  - {{addresses: [\"{}\"], nodeName: {node}, conditions: {conditions}}}\n",
                backend_ip(i)
            )
        })
        .collect();
    let now = k8s_openapi::jiff::Timestamp::now();
    format!(
        "\
apiVersion: v1
kind: Service
metadata: {{name: checked, namespace: default}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: {policy}
  healthCheckNodePort: {HEALTH_CHECK_PORT}
  clusterIP: 10.96.0.40
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: {TCP_TARGET}, nodePort: 30090}}]
status: {{loadBalancer: {{ingress: [{{ip: \"{LB_IP}\"}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: checked-1
  namespace: default
  labels: {{kubernetes.io/service-name: checked}}
  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{now}\"}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: {TCP_TARGET}}}]
endpoints:
{endpoints}"
    )
}

/// What the health-check node port answers the client: status, the local endpoint count in
/// the body, and the weight header kube-proxy sends.
fn health_check(bed: &Bed) -> io::Result<(u16, u64, String)> {
    use lb_userspace::testbed::http;
    let addr = SocketAddr::from((NODE_IP, HEALTH_CHECK_PORT));
    let answer = bed.in_client(move || http::get(addr, "/", CLIENT_TIMEOUT))?;
    let body = answer.json();
    assert_eq!(
        body["service"],
        serde_json::json!({"namespace": "default", "name": "checked"}),
        "{body}"
    );
    let count = body["localEndpoints"]
        .as_u64()
        .unwrap_or_else(|| panic!("no localEndpoints in {body}"));
    let weight = answer
        .header("X-Load-Balancing-Endpoint-Weight")
        .unwrap_or_default()
        .to_owned();
    assert_eq!(weight, count.to_string(), "weight header and body agree");
    Ok((answer.status, count, weight))
}

/// A metric's value on the metrics page: the sum of every sample whose name and labels start
/// with `series` (e.g. `lbagent_datapath_packets_total{verdict="xlate",reason="xlate_new_flow"`).
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run through `cargo xtask test`"]
fn health_check_node_ports_follow_local_endpoints_and_metrics_show_the_work() {
    use lb_userspace::testbed::http;
    use Standing::{Ready, Terminating};
    let node_ip = NODE_IP.to_string();
    let mut bed = Bed::start_with(
        3,
        &health_checked_manifest("Local", &[(1, NODE_NAME, Ready), (2, "elsewhere", Ready)]),
        &[
            "--node-ip",
            &node_ip,
            "--metrics-bind-address",
            "0.0.0.0:10249",
        ],
    );
    let (status, count, _) = health_check(&bed).expect("asking the health-check node port");
    assert_eq!((status, count), (200, 1), "one local endpoint");

    bed.rewrite(health_checked_manifest(
        "Local",
        &[
            (1, NODE_NAME, Ready),
            (3, NODE_NAME, Ready),
            (2, "elsewhere", Ready),
        ],
    ));
    let (status, count, _) = health_check(&bed).unwrap();
    assert_eq!((status, count), (200, 2), "two local endpoints");

    // The local endpoint terminates while another node's is ready: the node must leave the
    // load balancer (503, count 0: terminating endpoints do not count), while the flows that
    // still arrive keep being served by the terminating endpoint, as kube-proxy does.
    bed.rewrite(health_checked_manifest(
        "Local",
        &[(1, NODE_NAME, Terminating), (2, "elsewhere", Ready)],
    ));
    let (status, count, _) = health_check(&bed).unwrap();
    assert_eq!(
        (status, count),
        (503, 0),
        "only a terminating local endpoint"
    );
    let node_port = SocketAddr::from((NODE_IP, 30090));
    for (name, peer) in names_and_peers(&bed, node_port, 5) {
        assert_eq!(
            name,
            backend_name(1),
            "the terminating local endpoint serves"
        );
        assert_eq!(peer.to_string(), "10.0.1.2", "client address kept (Local)");
    }

    bed.rewrite(health_checked_manifest("Local", &[(2, "elsewhere", Ready)]));
    let (status, count, _) = health_check(&bed).unwrap();
    assert_eq!((status, count), (503, 0), "no local endpoint");

    // Policy Cluster needs no health check: the port closes.
    bed.rewrite(health_checked_manifest(
        "Cluster",
        &[(2, "elsewhere", Ready)],
    ));
    match health_check(&bed) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!("the health-check port of a Cluster-policy service: {other:?}"),
    }

    // The proxy's own health, on kube-proxy's port.
    for path in ["/healthz", "/livez"] {
        let addr = SocketAddr::from((NODE_IP, 10256));
        let answer = bed
            .in_client(move || http::get(addr, path, CLIENT_TIMEOUT))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        assert!(
            answer.body.contains("lastUpdated"),
            "{path}: {}",
            answer.body
        );
    }

    // Metrics: syncs, programming latency from the slices' trigger times, and the datapath's
    // counters (the connections above were new flows to an external frontend).
    let addr = SocketAddr::from((NODE_IP, 10249));
    let page = bed
        .in_client(move || http::get(addr, "/metrics", CLIENT_TIMEOUT))
        .expect("scraping the metrics");
    assert_eq!(page.status, 200);
    let page = page.body;
    let syncs = metric(&page, "lbagent_sync_proxy_rules_duration_seconds_count");
    assert!(syncs >= 5.0, "five applies at least, got {syncs}:\n{page}");
    let programmed = metric(&page, "lbagent_network_programming_duration_seconds_count");
    assert!(
        programmed >= 4.0,
        "each rewrite's trigger time observed, got {programmed}:\n{page}"
    );
    let new_flows = metric(
        &page,
        "lbagent_datapath_packets_total{verdict=\"xlate\",reason=\"xlate_new_flow\"",
    );
    assert!(
        new_flows >= 5.0,
        "new flows counted, got {new_flows}:\n{page}"
    );
    assert!(
        metric(&page, "lbagent_service_ports") >= 1.0,
        "service ports gauge:\n{page}"
    );
}
