//! The parity suite: one set of end-to-end scenarios, run against every mode (`--mode ebpf`,
//! `iptables`, `ipvs`, `userspace`), each in its own topology of network namespaces with the
//! real agent and real sockets (see `testbed::bed`).
//!
//! Where a mode cannot do what the others do, its [`Expect`] says so and the scenario checks
//! what that mode does instead, printing it: nothing is skipped. The README's mode-by-feature
//! table is this suite's summary.
//!
//! Each test is `<mode>::<scenario>`. Tier 3 runs every mode but `ipvs` on the host (whose
//! kernel has no IPVS); tier 4 runs `ipvs::` in the Debian 6.1 VM. A mode that cannot start
//! fails its tests, loudly.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use lb_userspace::testbed::bed::{self, MANIFEST};
use lb_userspace::testbed::manifest::{
    demo_node_port, TCP_NODE_PORT, TCP_PORT, UDP_NODE_PORT, UDP_PORT, VIP,
};
use lb_userspace::testbed::servers::{
    assert_every_backend, tally, tcp_name, udp_exchange, udp_name, TcpSession, CLIENT_TIMEOUT,
};
use lb_userspace::testbed::topology::{backend_ip, CLIENT_IP, NODE_IP, SERVICE_CIDR};

/// What a mode does where the modes differ.
#[derive(Clone, Copy, Debug)]
struct Expect {
    mode: &'static str,
    /// A backend reached through a ClusterIP sees the client's own address. Not so when the
    /// agent itself opens the connection to the backend (userspace).
    keeps_client_address: bool,
    /// ClientIP affinity ends `timeoutSeconds` after the client's last new connection. IPVS
    /// instead keeps its persistence template while any connection it placed is still in
    /// its connection table, and a closed TCP connection stays there in TIME_WAIT for two
    /// minutes: affinity outlives the timeout by that much (kube-proxy's IPVS mode alike).
    affinity_expires_at_timeout: bool,
}

const EBPF: Expect = Expect {
    mode: "ebpf",
    keeps_client_address: true,
    affinity_expires_at_timeout: true,
};
const IPTABLES: Expect = Expect {
    mode: "iptables",
    keeps_client_address: true,
    affinity_expires_at_timeout: true,
};
const IPVS: Expect = Expect {
    mode: "ipvs",
    keeps_client_address: true,
    affinity_expires_at_timeout: false,
};
const USERSPACE: Expect = Expect {
    mode: "userspace",
    keeps_client_address: false,
    affinity_expires_at_timeout: true,
};

fn tcp_vip() -> SocketAddr {
    SocketAddr::from((VIP, TCP_PORT))
}

fn udp_vip() -> SocketAddr {
    SocketAddr::from((VIP, UDP_PORT))
}

/// The service: ClusterIP `VIP` and NodePorts, TCP and UDP, over the given backends.
fn manifest(backends: &[usize]) -> String {
    demo_node_port(backends, None)
}

/// One scenario's world, with the agent running `expect.mode`.
struct Bed {
    bed: bed::Bed,
    expect: Expect,
}

impl Bed {
    fn start(expect: Expect, n_backends: usize, initial: &str) -> Bed {
        let binary = Path::new(env!("CARGO_BIN_EXE_lb-agent"));
        let node_ip = NODE_IP.to_string();
        let args = ["--mode", expect.mode, "--node-ip", &node_ip];
        let bed = bed::Bed::start(expect.mode, n_backends, initial, binary, &args)
            .unwrap_or_else(|e| panic!("{e}: the {} mode must not pass silently", expect.mode));
        // A real node has a default route; without one, traffic to a ClusterIP no mode
        // translates would die at the node's routing decision, before the filter table's
        // REJECT. Backend 1 stands in for the next hop (it does not forward).
        bed.topo
            .node
            .ip(&[
                "route",
                "add",
                SERVICE_CIDR,
                "via",
                &backend_ip(1).to_string(),
            ])
            .expect("service range route on the node");
        let log = std::fs::read_to_string(bed.agent.log_path()).expect("the agent's log");
        let running = format!("running the {} dataplane", expect.mode);
        assert!(
            log.contains(&running),
            "the agent did not log {running:?}:\n{log}"
        );
        println!("{running}");
        Bed { bed, expect }
    }

    fn rewrite(&mut self, contents: String) {
        let info = self
            .bed
            .rewrite(&contents)
            .unwrap_or_else(|e| panic!("{e}"));
        println!("agent synced: {info:?}");
    }

    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.bed
            .in_client(f)
            .expect("running in the client namespace")
    }

    fn tcp_names(&self, addr: SocketAddr, n: usize) -> Vec<io::Result<String>> {
        self.in_client(move || (0..n).map(|_| tcp_name(addr, CLIENT_TIMEOUT)).collect())
    }

    fn udp_names(&self, addr: SocketAddr, n: usize) -> Vec<io::Result<String>> {
        self.in_client(move || (0..n).map(|_| udp_name(addr, CLIENT_TIMEOUT)).collect())
    }

    /// Who answered a connection to `addr`, and the address it saw the client at.
    fn name_and_peer(&self, addr: SocketAddr) -> (String, IpAddr) {
        self.in_client(move || {
            let mut s = TcpSession::connect(addr, CLIENT_TIMEOUT)
                .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
            let peer = s
                .peer_seen()
                .unwrap_or_else(|e| panic!("asking {addr}: {e}"));
            (s.name().to_owned(), peer)
        })
    }
}

fn cluster_ip_tcp_and_udp_reach_every_backend(expect: Expect) {
    let bed = Bed::start(expect, 3, &manifest(&[1, 2, 3]));
    let tcp = tally("TCP", bed.tcp_names(tcp_vip(), 150));
    assert_every_backend("TCP", &tcp, &[1, 2, 3]);
    let udp = tally("UDP", bed.udp_names(udp_vip(), 150));
    assert_every_backend("UDP", &udp, &[1, 2, 3]);

    let (name, peer) = bed.name_and_peer(tcp_vip());
    if bed.expect.keeps_client_address {
        assert_eq!(peer, IpAddr::from(CLIENT_IP), "{name} saw the client");
    } else {
        assert_ne!(
            peer,
            IpAddr::from(CLIENT_IP),
            "{name} cannot see the client"
        );
        println!(
            "{}: the backend sees {peer}, not the client {CLIENT_IP}: this mode does not keep client addresses",
            bed.expect.mode
        );
    }
}

fn node_port_reaches_every_backend_from_outside(expect: Expect) {
    let bed = Bed::start(expect, 3, &manifest(&[1, 2, 3]));
    let tcp_node_port = SocketAddr::from((NODE_IP, TCP_NODE_PORT));
    let udp_node_port = SocketAddr::from((NODE_IP, UDP_NODE_PORT));
    let tcp = tally("TCP NodePort", bed.tcp_names(tcp_node_port, 150));
    assert_every_backend("TCP NodePort", &tcp, &[1, 2, 3]);
    let udp = tally("UDP NodePort", bed.udp_names(udp_node_port, 150));
    assert_every_backend("UDP NodePort", &udp, &[1, 2, 3]);
    // externalTrafficPolicy Cluster: every mode sends the flow on from the node's address,
    // so the reply comes back through it whatever the backend's routes.
    let (name, peer) = bed.name_and_peer(tcp_node_port);
    assert_ne!(
        peer,
        IpAddr::from(CLIENT_IP),
        "{name} saw the node, not the client"
    );
}

fn client_ip_affinity_holds_and_expires(expect: Expect) {
    const TIMEOUT_S: u64 = 2;
    let sticky = demo_node_port(&[1, 2, 3], Some(TIMEOUT_S));
    let bed = Bed::start(expect, 3, &sticky);
    let answers = tally("TCP with ClientIP affinity", bed.tcp_names(tcp_vip(), 15));
    assert_eq!(
        answers.len(),
        1,
        "15 connections in a row, one backend: {answers:?}"
    );
    let held = answers.keys().next().unwrap().clone();

    if !bed.expect.affinity_expires_at_timeout {
        // Past the timeout, the closed connections still hold the client to its backend.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 300));
            let now = bed
                .in_client(|| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                .expect("a connection after the timeout");
            assert_eq!(
                now, held,
                "affinity moved although closed connections remain"
            );
        }
        println!(
            "{}: affinity outlives its {TIMEOUT_S}s timeout while the client's closed connections stay in the connection table (TIME_WAIT, 2 minutes)",
            bed.expect.mode
        );
        return;
    }

    // Each wait outlasts the timeout, so the next connection chooses afresh; it stays on the
    // same backend by chance a third of the time, so a handful of rounds must see a change.
    let mut history = vec![held.clone()];
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 300));
        let now = bed
            .in_client(|| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
            .expect("a connection after the timeout");
        history.push(now.clone());
        if now != held {
            println!("after the {TIMEOUT_S}s timeout: {history:?}");
            return;
        }
    }
    panic!("affinity never expired: {history:?}");
}

fn a_service_without_endpoints_rejects(expect: Expect) {
    let bed = Bed::start(expect, 1, &manifest(&[]));
    for (what, addr) in [
        ("ClusterIP", tcp_vip()),
        ("NodePort", SocketAddr::from((NODE_IP, TCP_NODE_PORT))),
    ] {
        let started = Instant::now();
        let tcp = bed.in_client(|| tcp_name(addr, CLIENT_TIMEOUT));
        let took = started.elapsed();
        match tcp {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => panic!(
                "TCP to the {what} of a service without endpoints: want connection refused, got {other:?} after {took:?}"
            ),
        }
        assert!(
            took < Duration::from_secs(1),
            "{what}: the refusal took {took:?}"
        );
    }
    let udp = bed.in_client(|| udp_exchange(udp_vip(), b"anyone?", CLIENT_TIMEOUT));
    match udp {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        other => panic!(
            "UDP to a service without endpoints: want ICMP port unreachable (ConnectionRefused), got {other:?}"
        ),
    }
}

fn removing_an_endpoint_keeps_its_established_connection(expect: Expect) {
    let mut bed = Bed::start(expect, 3, &manifest(&[1, 2, 3]));
    let mut session = bed
        .in_client(|| TcpSession::connect(tcp_vip(), CLIENT_TIMEOUT))
        .expect("a long-lived connection to the VIP");
    let pinned = session.name().to_owned();
    let pinned_index: usize = pinned
        .strip_prefix("backend-")
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("unexpected greeting {pinned:?}"));
    assert_eq!(
        session.echo("before").expect("echo"),
        format!("{pinned}: before")
    );

    let remaining: Vec<usize> = (1..=3).filter(|&i| i != pinned_index).collect();
    bed.rewrite(manifest(&remaining));
    assert_eq!(
        session
            .echo("ping")
            .expect("the open connection must survive its endpoint's removal"),
        format!("{pinned}: ping")
    );
    let after = tally("TCP after removal", bed.tcp_names(tcp_vip(), 60));
    assert!(
        !after.contains_key(&pinned),
        "new connections reached the removed {pinned}: {after:?}"
    );
    assert_every_backend("TCP after removal", &after, &remaining);
    assert_eq!(
        session.echo("still there").expect("echo at the end"),
        format!("{pinned}: still there")
    );
}

fn a_manifest_edit_takes_effect_live(expect: Expect) {
    let mut bed = Bed::start(expect, 3, &manifest(&[1]));
    let one = tally("TCP, backend 1 only", bed.tcp_names(tcp_vip(), 20));
    assert_every_backend("TCP, backend 1 only", &one, &[1]);

    bed.rewrite(manifest(&[1, 2, 3]));
    let all = tally("TCP, backends 1-3", bed.tcp_names(tcp_vip(), 90));
    assert_every_backend("TCP, backends 1-3", &all, &[1, 2, 3]);

    // Deleted, the service is gone: neither its ClusterIP nor its NodePort reaches a backend.
    let info = bed
        .bed
        .resync(|dir| std::fs::remove_file(dir.join(MANIFEST)).expect("deleting the manifest"))
        .unwrap_or_else(|e| panic!("{e}"));
    println!("agent synced: {info:?}");
    for addr in [tcp_vip(), SocketAddr::from((NODE_IP, TCP_NODE_PORT))] {
        let gone = bed.in_client(|| tcp_name(addr, CLIENT_TIMEOUT));
        assert!(
            gone.is_err(),
            "{addr} of the deleted service answered: {gone:?}"
        );
        println!("{addr} after deletion: {:?}", gone.unwrap_err());
    }
}

/// One module per mode, each with every scenario.
macro_rules! parity {
    ($($module:ident => $expect:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[test]
            #[ignore = "needs root: run through `cargo xtask test`"]
            fn cluster_ip_tcp_and_udp_reach_every_backend() {
                super::cluster_ip_tcp_and_udp_reach_every_backend($expect);
            }

            #[test]
            #[ignore = "needs root: run through `cargo xtask test`"]
            fn node_port_reaches_every_backend_from_outside() {
                super::node_port_reaches_every_backend_from_outside($expect);
            }

            #[test]
            #[ignore = "needs root: run through `cargo xtask test`"]
            fn client_ip_affinity_holds_and_expires() {
                super::client_ip_affinity_holds_and_expires($expect);
            }

            #[test]
            #[ignore = "needs root: run through `cargo xtask test`"]
            fn a_service_without_endpoints_rejects() {
                super::a_service_without_endpoints_rejects($expect);
            }

            #[test]
            #[ignore = "needs root: run through `cargo xtask test`"]
            fn removing_an_endpoint_keeps_its_established_connection() {
                super::removing_an_endpoint_keeps_its_established_connection($expect);
            }

            #[test]
            #[ignore = "needs root: run through `cargo xtask test`"]
            fn a_manifest_edit_takes_effect_live() {
                super::a_manifest_edit_takes_effect_live($expect);
            }
        }
    )*};
}

parity!(ebpf => EBPF, iptables => IPTABLES, ipvs => IPVS, userspace => USERSPACE);

/// How the agent chooses its mode, and what a change of mode leaves behind.
mod choosing_a_mode {
    use std::path::PathBuf;

    use lb_userspace::testbed::agent::{Agent, Launch};
    use lb_userspace::testbed::bed::FIRST_SYNC;
    use lb_userspace::testbed::manifest::{TCP_TARGET, UDP_TARGET};
    use lb_userspace::testbed::servers::BackendServers;
    use lb_userspace::testbed::topology::Topology;
    use lb_userspace::testbed::{require_root, unique_bpffs_dir, TempDir};

    use super::*;

    /// A topology with servers and a manifest directory, for agents started one after another.
    struct World {
        topo: Topology,
        _servers: BackendServers,
        manifests: PathBuf,
        bpffs: PathBuf,
        _dir: TempDir,
    }

    impl World {
        fn new() -> World {
            require_root().unwrap_or_else(|e| panic!("{e}: must not pass silently"));
            let dir = TempDir::new("modes").expect("temporary directory");
            let manifests = dir.path().join("manifests");
            std::fs::create_dir(&manifests).expect("manifest directory");
            TempDir::write_atomic(&manifests, MANIFEST, &manifest(&[1, 2])).expect("manifest");
            let topo = Topology::build(2).expect("topology");
            let servers = BackendServers::start(&topo, TCP_TARGET, UDP_TARGET).expect("servers");
            World {
                topo,
                _servers: servers,
                manifests,
                bpffs: unique_bpffs_dir().expect("bpffs"),
                _dir: dir,
            }
        }

        /// Starts an agent and waits for its first sync.
        fn agent(&self, launch: Launch) -> Agent {
            let binary = Path::new(env!("CARGO_BIN_EXE_lb-agent"));
            let ifaces = self.topo.node_ifaces();
            let mut agent = Agent::spawn(
                &self.topo.node,
                &self.manifests,
                &ifaces,
                &self.bpffs,
                binary,
                &launch,
            )
            .expect("starting lb-agent");
            agent
                .wait_synced(1, FIRST_SYNC)
                .unwrap_or_else(|e| panic!("{e}"));
            agent
        }

        fn assert_served(&self, what: &str) {
            let names = self
                .topo
                .client
                .ns
                .run(|| {
                    (0..30)
                        .map(|_| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                        .collect()
                })
                .expect("client namespace");
            assert_every_backend(what, &tally(what, names), &[1, 2]);
        }

        /// The node's `LBA-` rules and chains, in both iptables back ends.
        fn our_rules(&self) -> Vec<String> {
            let mut found = Vec::new();
            for save in ["iptables-nft-save", "iptables-legacy-save"] {
                let out = self.topo.node.exec(save, &[]).unwrap_or_default();
                found.extend(
                    out.lines()
                        .filter(|l| l.contains("LBA-"))
                        .map(|l| format!("{save}: {l}")),
                );
            }
            found
        }
    }

    fn wait_for(what: &str, agent: &Agent, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + bed::RESYNC;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} never happened:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    #[ignore = "needs root: run through `cargo xtask test`"]
    fn auto_takes_ebpf_where_bpf_programs_load() {
        let world = World::new();
        let agent = world.agent(Launch {
            args: &["--mode", "auto"],
            ..Launch::default()
        });
        let log = agent.log();
        assert!(
            log.contains("auto: chose the ebpf mode, the preferred one")
                && log.contains("running the ebpf dataplane"),
            "{log}"
        );
        world.assert_served("auto on a BPF-capable node");
    }

    #[test]
    #[ignore = "needs root: run through `cargo xtask test`"]
    fn auto_falls_back_when_bpf_is_denied_and_says_why() {
        let world = World::new();
        // Root without the capabilities BPF needs, as a locked-down node would run it.
        let agent = world.agent(Launch {
            args: &["--mode", "auto"],
            wrapper: &[
                "setpriv",
                "--bounding-set",
                "-bpf,-sys_admin,-perfmon",
                "--",
            ],
            ..Launch::default()
        });
        let log = agent.log();
        assert!(
            log.contains("auto: the ebpf mode cannot run here: BPF programs and maps:"),
            "the log must say why eBPF was passed over:\n{log}"
        );
        let chosen = ["ipvs", "iptables"]
            .into_iter()
            .find(|m| log.contains(&format!("running the {m} dataplane")))
            .unwrap_or_else(|| panic!("neither ipvs nor iptables was chosen:\n{log}"));
        if chosen == "iptables" {
            assert!(
                log.contains("auto: the ipvs mode cannot run here: IPVS:"),
                "ipvs passed over without a reason:\n{log}"
            );
        }
        println!("without CAP_BPF and CAP_SYS_ADMIN, auto chose {chosen}");
        world.assert_served(&format!("auto fallen back to {chosen}"));
    }

    #[test]
    #[ignore = "needs root: run through `cargo xtask test`"]
    fn switching_modes_removes_what_the_previous_mode_left() {
        let world = World::new();
        // eBPF, stopped without --cleanup: its maps stay pinned.
        let mut ebpf = world.agent(Launch {
            cleanup: false,
            ..Launch::default()
        });
        assert!(ebpf.stop().expect("stopping").success());
        assert!(
            world.bpffs.join("SERVICES").exists(),
            "pins stay without --cleanup"
        );

        // iptables removes them once it serves, and leaves its rules when stopped alike.
        let mut iptables = world.agent(Launch {
            cleanup: false,
            args: &["--mode", "iptables"],
            ..Launch::default()
        });
        wait_for("removing the eBPF pins", &iptables, || {
            !world.bpffs.join("SERVICES").exists()
        });
        world.assert_served("iptables after ebpf");
        assert!(iptables.stop().expect("stopping").success());
        assert!(
            !world.our_rules().is_empty(),
            "rules stay without --cleanup"
        );

        // userspace: the iptables mode's chains go before its first sync, its own come.
        let mut proxy = world.agent(Launch {
            cleanup: false,
            args: &["--mode", "userspace"],
            ..Launch::default()
        });
        let rules = world.our_rules();
        let chain = |name: &str| rules.iter().any(|r| r.contains(&format!(":{name} ")));
        assert!(
            !chain("LBA-SERVICES") && chain("LBA-PORTALS-CONTAINER"),
            "only the userspace mode's chains: {rules:#?}"
        );
        world.assert_served("userspace after iptables");
        assert!(proxy.stop().expect("stopping").success());

        // eBPF again: the userspace rules go, in both back ends.
        let ebpf_again = world.agent(Launch::default());
        wait_for("removing the iptables rules", &ebpf_again, || {
            world.our_rules().is_empty()
        });
        world.assert_served("ebpf after iptables");
        drop(ebpf_again);
        drop(proxy);
        drop(iptables);
        drop(ebpf);
    }

    /// Needs a kernel with IPVS: runs in tier 4's VM (`ipvs::` in its name).
    mod ipvs {
        use super::*;

        /// The virtual services in the node namespace's IPVS table, one line each.
        fn virtual_services(world: &World) -> Vec<String> {
            let table = world
                .topo
                .node
                .exec("cat", &["/proc/net/ip_vs"])
                .expect("reading /proc/net/ip_vs");
            table
                .lines()
                .filter(|l| l.starts_with("TCP") || l.starts_with("UDP"))
                .map(String::from)
                .collect()
        }

        fn has_dummy(world: &World) -> bool {
            world.topo.node.ip(&["link", "show", "lba-ipvs0"]).is_ok()
        }

        #[test]
        #[ignore = "needs root and IPVS: run through `cargo xtask test` (tier 4)"]
        fn leaving_ipvs_removes_its_services_interface_and_rules() {
            let world = World::new();
            let mut ipvs = world.agent(Launch {
                cleanup: false,
                args: &["--mode", "ipvs"],
                ..Launch::default()
            });
            world.assert_served("ipvs");
            assert!(ipvs.stop().expect("stopping").success());
            assert!(
                !virtual_services(&world).is_empty() && has_dummy(&world),
                "without --cleanup the virtual services and lba-ipvs0 stay"
            );
            assert!(world.our_rules().iter().any(|r| r.contains("LBA-IPVS-")));

            let iptables = world.agent(Launch {
                args: &["--mode", "iptables"],
                ..Launch::default()
            });
            assert_eq!(virtual_services(&world), Vec::<String>::new());
            assert!(!has_dummy(&world), "lba-ipvs0 is gone");
            let rules = world.our_rules();
            assert!(
                !rules.iter().any(|r| r.contains("LBA-IPVS-")),
                "the IPVS mode's chains are gone: {rules:#?}"
            );
            world.assert_served("iptables after ipvs");
            drop(iptables);
            drop(ipvs);
        }
    }
}
