//! Tier 3, socket-level load balancing: processes in the node's own network namespace reach
//! services through the agent's cgroup programs (connect4, sendmsg4, recvmsg4,
//! getpeername4, and their IPv6 twins), and processes of every other namespace are left to the tc path.
//!
//! The test-bed node has no route for the service CIDR, so a connection from the node to a
//! ClusterIP works only if the socket programs rewrote its address before routing, and the
//! client namespace has no route to the backends, so a client connection works only if they
//! left it alone. Each test builds its own topology and agent; guards tear everything down,
//! also when an assertion fails.
//!
//! They need root, bpffs, cgroup v2 and Linux 5.18+, so they are `#[ignore]`d for plain
//! `cargo test`; `cargo xtask test` runs them with `--ignored --test-threads=1`. Missing
//! pieces fail the test with a message, never a silent pass.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lb_common::sock::stats as sock_stats;
use lb_common::stats;
use lb_userspace::dataplane::ebpf::{inspect, socket_lb};
use lb_userspace::testbed::bed;
use lb_userspace::testbed::manifest::{
    demo as demo_manifest, demo_dual, TCP_PORT, UDP_PORT, VIP, VIP6,
};
use lb_userspace::testbed::netns::NetNs;
use lb_userspace::testbed::servers::{backend_name, tcp_name, udp_name, CLIENT_TIMEOUT};
use lb_userspace::testbed::{require_root, unique_name};

/// What the agent logs when the socket programs are attached, and when they are not.
const SOCKET_LB_ON: &str = "socket-level load balancing on";
const SOCKET_LB_OFF: &str = "socket-level load balancing off";

fn tcp_vip() -> SocketAddr {
    SocketAddr::from((VIP, TCP_PORT))
}

fn udp_vip() -> SocketAddr {
    SocketAddr::from((VIP, UDP_PORT))
}

/// Service `demo` with the given backends and affinity (see `testbed::manifest::demo`).
fn manifest(backends: &[usize], affinity_s: Option<u32>) -> String {
    demo_manifest(backends, affinity_s.map(u64::from))
}

/// Fails loudly unless this machine can run these tests at all.
fn require_everything() {
    if let Err(e) = require_root() {
        panic!("{e}: these tests must not pass silently without it");
    }
    if let Err(e) = socket_lb::cgroup2_root() {
        panic!("socket-level load balancing cannot be tested here: {e}");
    }
    if let Err(e) = socket_lb::netns_cookie() {
        panic!("SO_NETNS_COOKIE failed ({e}): socket-level load balancing needs Linux {}+, this kernel is too old to test it", socket_lb::MIN_KERNEL);
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
    /// Topology with `n` backends, `initial` as the manifest, and the agent started with
    /// `extra` arguments; expects the socket programs attached unless `--no-socket-lb` is
    /// among them (or `--cgroup`, which the caller checks).
    fn start(n: usize, initial: &str, extra: &[&str]) -> Bed {
        require_everything();
        let binary = Path::new(env!("CARGO_BIN_EXE_lb-agent"));
        let bed =
            bed::Bed::start("sock", n, initial, binary, extra).unwrap_or_else(|e| panic!("{e}"));
        let log = bed.agent.log();
        let want = if extra.contains(&"--no-socket-lb") {
            SOCKET_LB_OFF
        } else {
            SOCKET_LB_ON
        };
        let line = log.lines().find(|l| l.contains(want)).unwrap_or_else(|| {
            panic!("the agent never logged {want:?} (socket programs not attached?):\n{log}")
        });
        println!("agent: {line}");
        Bed(bed)
    }

    fn rewrite(&mut self, contents: String) {
        self.0.rewrite(&contents).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `f` on a thread inside the node namespace: its sockets are the node's.
    fn in_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0.in_node(f).expect("running in the node namespace")
    }

    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0
            .in_client(f)
            .expect("running in the client namespace")
    }

    /// The pinned maps as the kernel holds them.
    fn snapshot(&self) -> inspect::Snapshot {
        inspect::read(self.agent.bpffs_dir()).expect("reading the pinned maps")
    }
}

/// tc counter `reason` and socket counter `sock_reason` of a snapshot.
fn tc(s: &inspect::Snapshot, reason: u32) -> u64 {
    s.counters[reason as usize].packets
}

fn sock(s: &inspect::Snapshot, reason: u32) -> u64 {
    s.sock_counters[reason as usize]
}

/// Counts answers per backend, failing on the first error.
fn tally(what: &str, answers: Vec<io::Result<String>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let total = answers.len();
    for (i, a) in answers.into_iter().enumerate() {
        match a {
            Ok(name) => *counts.entry(name).or_insert(0) += 1,
            Err(e) => panic!("{what}: request #{i} of {total} failed: {e}"),
        }
    }
    println!("{what}: {total} requests, distribution {counts:?}");
    counts
}

fn assert_backends(what: &str, counts: &BTreeMap<String, usize>, backends: &[usize]) {
    let want: Vec<String> = backends.iter().map(|&i| backend_name(i)).collect();
    let got: Vec<String> = counts.keys().cloned().collect();
    assert_eq!(got, want, "{what}: which backends answered");
}

/// An unconnected UDP exchange: `sendto` the VIP, `recvfrom` the answer. Returns the answer
/// and the address `recvfrom` reported.
fn udp_sendto(socket: &UdpSocket, payload: &[u8]) -> io::Result<(String, SocketAddr)> {
    socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    socket.send_to(payload, udp_vip())?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// A TCP connection from a separate process in `ns`: bash's /dev/tcp reads the greeting line.
fn tcp_name_from_process(cmd: &mut Command) -> String {
    let mut child = cmd
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/{VIP}/{TCP_PORT} && head -n1 <&3"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bash");
    let deadline = Instant::now() + CLIENT_TIMEOUT * 2;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for bash") {
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .expect("reading bash's output");
            let mut err = String::new();
            let _ = io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            assert!(status.success(), "bash /dev/tcp failed ({status}): {err}");
            return line.trim().to_owned();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bash /dev/tcp did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn node_tcp_reaches_every_backend_without_packet_translation() {
    let bed = Bed::start(3, &manifest(&[1, 2, 3], None), &[]);
    let before = bed.snapshot();
    let counts = tally(
        "TCP from the node",
        bed.in_node(|| {
            (0..45)
                .map(|_| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                .collect()
        }),
    );
    assert_backends("TCP from the node", &counts, &[1, 2, 3]);

    // getpeername shows the frontend the socket connected to, not the backend.
    let (peer, local) = bed.in_node(|| {
        let s = TcpStream::connect_timeout(&tcp_vip(), CLIENT_TIMEOUT).expect("connecting");
        (s.peer_addr().unwrap(), s.local_addr().unwrap())
    });
    println!("TCP socket: local {local}, peer {peer}");
    assert_eq!(peer, tcp_vip(), "getpeername() after connect() to the VIP");
    let node_addrs: Vec<_> = bed.topo.backends.iter().map(|b| b.node_addr).collect();
    assert!(
        matches!(local.ip(), std::net::IpAddr::V4(a) if node_addrs.contains(&a)),
        "the route to the backend chose the source: {local}, node addresses {node_addrs:?}"
    );

    // A separate process in the node namespace, not a thread of this one.
    let name = tcp_name_from_process(&mut bed.topo.node.command("bash"));
    println!("bash in the node namespace reached {name}");
    assert!(name.starts_with("backend-"), "greeting {name:?}");

    let after = bed.snapshot();
    let xlated = sock(&after, sock_stats::CONNECT_XLATE) - sock(&before, sock_stats::CONNECT_XLATE);
    assert_eq!(xlated, 47, "connect() calls translated by lb_connect4");
    assert!(
        sock(&after, sock_stats::REVNAT) > sock(&before, sock_stats::REVNAT),
        "getpeername() was answered from SOCK_REVNAT"
    );
    // Socket-level: the tc program never translated a packet of these connections.
    for reason in [
        stats::XLATE_NEW_FLOW,
        stats::XLATE_FORWARD,
        stats::XLATE_REPLY,
    ] {
        assert_eq!(
            tc(&after, reason),
            tc(&before, reason),
            "tc counter {} moved",
            stats::NAMES[reason as usize]
        );
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn node_udp_replies_come_from_the_vip() {
    let bed = Bed::start(3, &manifest(&[1, 2, 3], None), &[]);
    let before = bed.snapshot();

    // Unconnected sockets: sendto the VIP, recvfrom must name the VIP (recvmsg4), not the
    // backend that answered. One fresh socket per exchange, so the backends vary.
    let answers = bed.in_node(|| {
        (0..45)
            .map(|_| {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                udp_sendto(&socket, b"")
            })
            .collect::<Vec<_>>()
    });
    let mut names = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        let (name, from) = a.unwrap_or_else(|e| panic!("UDP exchange #{i} failed: {e}"));
        assert_eq!(from, udp_vip(), "recvfrom() source of {name:?}");
        names.push(Ok(name));
    }
    let counts = tally("unconnected UDP from the node", names);
    assert_backends("unconnected UDP from the node", &counts, &[1, 2, 3]);

    // One unconnected socket keeps its backend from datagram to datagram.
    let one = bed.in_node(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("binding");
        (0..10)
            .map(|i| udp_sendto(&socket, format!("n{i}").as_bytes()))
            .collect::<Vec<_>>()
    });
    let mut seen = BTreeMap::new();
    for a in one {
        let (answer, from) = a.expect("UDP exchange on one socket");
        assert_eq!(from, udp_vip());
        let backend = answer.split(':').next().unwrap().to_owned();
        *seen.entry(backend).or_insert(0) += 1;
    }
    println!("one unconnected socket, 10 datagrams: {seen:?}");
    assert_eq!(seen.len(), 1, "one socket, one backend: {seen:?}");

    // Connected UDP: the backend is chosen at connect(); the peer reads as the VIP.
    let (answer, peer) = bed.in_node(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(udp_vip()).expect("connect() to the VIP");
        socket.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        socket.send(b"hi").expect("send");
        let mut buf = [0u8; 256];
        let n = socket
            .recv(&mut buf)
            .expect("an answer on the connected socket");
        (
            String::from_utf8_lossy(&buf[..n]).into_owned(),
            socket.peer_addr().unwrap(),
        )
    });
    println!("connected UDP: {answer:?} from peer {peer}");
    assert!(answer.ends_with(": hi"), "{answer:?}");
    assert_eq!(peer, udp_vip());
    let connected = tally(
        "connected UDP from the node",
        bed.in_node(|| {
            (0..30)
                .map(|_| udp_name(udp_vip(), CLIENT_TIMEOUT))
                .collect()
        }),
    );
    assert_backends("connected UDP from the node", &connected, &[1, 2, 3]);

    let after = bed.snapshot();
    assert_eq!(
        sock(&after, sock_stats::SENDMSG_XLATE) - sock(&before, sock_stats::SENDMSG_XLATE),
        55,
        "sendmsg() calls translated by lb_sendmsg4"
    );
    assert!(
        sock(&after, sock_stats::REVNAT) - sock(&before, sock_stats::REVNAT) >= 55,
        "recvmsg() sources rewritten by lb_recvmsg4"
    );
    println!("socket reverse entries: {}", after.sock_revnat);
    assert_eq!(
        tc(&after, stats::XLATE_NEW_FLOW),
        tc(&before, stats::XLATE_NEW_FLOW)
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn node_calls_to_a_service_without_endpoints_fail_at_once() {
    let bed = Bed::start(1, &manifest(&[], None), &[]);
    let started = Instant::now();
    let (tcp, udp_connect, udp_sendto) = bed.in_node(|| {
        let tcp = TcpStream::connect_timeout(&tcp_vip(), CLIENT_TIMEOUT).map(|_| ());
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let udp_connect = socket.connect(udp_vip());
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        let udp_sendto = socket.send_to(b"anyone?", udp_vip()).map(|_| ());
        (tcp, udp_connect, udp_sendto)
    });
    let took = started.elapsed();
    println!("TCP connect: {tcp:?}; UDP connect: {udp_connect:?}; UDP sendto: {udp_sendto:?}; all in {took:?}");
    for (what, r) in [
        ("TCP connect()", tcp),
        ("UDP connect()", udp_connect),
        ("UDP sendto()", udp_sendto),
    ] {
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
            other => {
                panic!("{what} to a service without endpoints: want ECONNREFUSED, got {other:?}")
            }
        }
    }
    assert!(took < Duration::from_millis(500), "failing took {took:?}");
    assert_eq!(sock(&bed.snapshot(), sock_stats::REJECT_NO_BACKEND), 3);
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn node_affinity_holds_follows_membership_and_expires() {
    const TIMEOUT_S: u32 = 2;
    let mut bed = Bed::start(3, &manifest(&[1, 2, 3], Some(TIMEOUT_S)), &[]);
    let tcp_names = |bed: &Bed, n: usize| {
        bed.in_node(move || {
            (0..n)
                .map(|_| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                .collect()
        })
    };
    let first = tally("TCP from the node with affinity", tcp_names(&bed, 15));
    assert_eq!(first.len(), 1, "15 connections, one backend: {first:?}");
    let held = first.keys().next().unwrap().clone();
    let reused = sock(&bed.snapshot(), sock_stats::AFFINITY_REUSED);
    assert_eq!(
        reused, 14,
        "all but the first reused the remembered backend"
    );

    // The remembered backend leaves the service: the next connection chooses among the rest
    // and sticks to its new choice.
    let held_index: usize = held.trim_start_matches("backend-").parse().unwrap();
    let rest: Vec<usize> = (1..=3).filter(|&i| i != held_index).collect();
    bed.rewrite(manifest(&rest, Some(TIMEOUT_S)));
    let moved = tally("after the backend left", tcp_names(&bed, 10));
    assert_eq!(moved.len(), 1, "one new backend: {moved:?}");
    assert!(!moved.contains_key(&held), "reached the removed {held}");
    let now_held = moved.keys().next().unwrap().clone();

    // Past the timeout the choice is made afresh: with two backends, a handful of rounds must
    // see the other one.
    let mut history = vec![now_held.clone()];
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(TIMEOUT_S as u64 * 1000 + 300));
        let now = bed
            .in_node(|| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
            .expect("a connection after the timeout");
        history.push(now.clone());
        if now != now_held {
            println!("after the {TIMEOUT_S}s timeout: {history:?}");
            return;
        }
    }
    panic!("affinity never expired: {history:?}");
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn other_namespaces_are_left_to_the_tc_path() {
    let bed = Bed::start(3, &manifest(&[1, 2, 3], None), &[]);
    let before = bed.snapshot();
    // The client routes only the service CIDR: had the cgroup programs rewritten these
    // connections to backend addresses, they would fail with ENETUNREACH.
    let tcp = tally(
        "TCP from the client namespace",
        bed.in_client(|| {
            (0..30)
                .map(|_| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                .collect()
        }),
    );
    assert_backends("TCP from the client namespace", &tcp, &[1, 2, 3]);
    let udp = tally(
        "UDP from the client namespace",
        bed.in_client(|| {
            (0..30)
                .map(|_| udp_name(udp_vip(), CLIENT_TIMEOUT))
                .collect()
        }),
    );
    assert_backends("UDP from the client namespace", &udp, &[1, 2, 3]);
    let after = bed.snapshot();
    let tc_new = tc(&after, stats::XLATE_NEW_FLOW) - tc(&before, stats::XLATE_NEW_FLOW);
    assert_eq!(
        tc_new, 60,
        "every client flow was translated by the tc program"
    );
    for reason in [
        sock_stats::CONNECT_XLATE,
        sock_stats::SENDMSG_XLATE,
        sock_stats::AFFINITY_REUSED,
        sock_stats::REVNAT,
    ] {
        assert_eq!(
            sock(&after, reason),
            sock(&before, reason),
            "socket counter {} moved for another namespace's sockets",
            sock_stats::NAMES[reason as usize]
        );
    }
    let other = sock(&after, sock_stats::OTHER_NETNS) - sock(&before, sock_stats::OTHER_NETNS);
    assert!(
        other >= 60,
        "the programs saw the client's connect() calls and left them alone ({other} counted)"
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn without_socket_lb_the_node_has_no_way_to_the_vip() {
    let bed = Bed::start(2, &manifest(&[1, 2], None), &["--no-socket-lb"]);
    // Proof that the node's own connections above went through the socket programs: without
    // them the node has no route for the service CIDR.
    let r = bed.in_node(|| TcpStream::connect_timeout(&tcp_vip(), CLIENT_TIMEOUT).map(|_| ()));
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => {}
        other => panic!("TCP from the node without socket LB: want ENETUNREACH, got {other:?}"),
    }
    let client = tally(
        "TCP from the client, no socket LB",
        bed.in_client(|| {
            (0..20)
                .map(|_| tcp_name(tcp_vip(), CLIENT_TIMEOUT))
                .collect()
        }),
    );
    assert_backends("TCP from the client, no socket LB", &client, &[1, 2]);
    assert!(
        bed.snapshot().sock_counters.iter().all(|n| *n == 0),
        "no socket program ran"
    );
}

/// A cgroup v2 directory for one test, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new() -> Cgroup {
        let root = socket_lb::cgroup2_root().expect("cgroup2 mount");
        let path = root.join(unique_name("sock"));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Cgroup(path)
    }

    /// `bash` in namespace `ns`, moved into this cgroup before it execs.
    fn bash_in(&self, ns: &NetNs) -> Command {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(
            self.0
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let mut cmd = ns.command("bash");
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec;
        // `procs` was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The children have been reaped; the kernel may take a moment to let go.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("could not remove cgroup {}", self.0.display());
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn cgroup_option_limits_balancing_to_that_subtree() {
    require_everything();
    let cgroup = Cgroup::new();
    let path = cgroup.0.to_str().unwrap().to_owned();
    let bed = Bed::start(2, &manifest(&[1, 2], None), &["--cgroup", &path]);
    assert!(
        bed.agent
            .log()
            .contains(&format!("attached to cgroup {path}")),
        "the agent names the cgroup it attached to:\n{}",
        bed.agent.log()
    );
    // This test process is not in that cgroup: its node sockets are not balanced.
    let outside =
        bed.in_node(|| TcpStream::connect_timeout(&tcp_vip(), CLIENT_TIMEOUT).map(|_| ()));
    match outside {
        Err(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => {}
        other => panic!("TCP from outside the cgroup: want ENETUNREACH, got {other:?}"),
    }
    // A process inside it is.
    let name = tcp_name_from_process(&mut cgroup.bash_in(&bed.topo.node));
    println!("bash inside {path} reached {name}");
    assert!(name.starts_with("backend-"), "greeting {name:?}");

    // The programs are bpf_links of the agent: they go when it stops.
    let attached = || {
        let out = Command::new("bpftool")
            .args(["cgroup", "show", &path])
            .output()
            .expect("bpftool (installed by `cargo xtask setup`)");
        assert!(out.status.success(), "bpftool cgroup show {path} failed");
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        socket_lb::PROGRAMS
            .iter()
            .filter(|p| out.contains(*p))
            .count()
    };
    assert_eq!(
        attached(),
        socket_lb::PROGRAMS.len(),
        "every socket program attached while running"
    );
    let mut bed = bed;
    assert!(bed.agent.stop().expect("stopping the agent").success());
    assert_eq!(attached(), 0, "detached once the agent stopped");
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn node_connections_to_a_local_policy_node_port_use_every_endpoint() {
    // externalTrafficPolicy Local, and no endpoint on this node: external clients are dropped
    // here, but the node's own connections go to the endpoints elsewhere, as with kube-proxy.
    let manifest = "\
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.40
  ports: [{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30400}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, protocol: TCP, port: 8080}]
endpoints:
  - {addresses: [\"10.0.11.2\"], nodeName: elsewhere}
  - {addresses: [\"10.0.12.2\"], nodeName: elsewhere}
";
    let bed = Bed::start(2, manifest, &["--node-ip", "10.0.1.1"]);
    let node_port = SocketAddr::from(([10, 0, 1, 1], 30400));
    let counts = tally(
        "TCP from the node to its own Local-policy NodePort",
        bed.in_node(|| {
            (0..20)
                .map(|_| tcp_name(node_port, CLIENT_TIMEOUT))
                .collect()
        }),
    );
    assert_backends("the node's own connections", &counts, &[1, 2]);
}

#[test]
#[ignore = "needs root, cgroup v2 and Linux 5.18+: run through `cargo xtask test`"]
fn node_ipv6_tcp_and_udp_reach_every_backend_through_the_socket_programs() {
    let bed = Bed::start(3, &demo_dual(&[1, 2, 3], None), &[]);
    let before = bed.snapshot();
    let tcp6 = SocketAddr::from((VIP6, TCP_PORT));
    let udp6 = SocketAddr::from((VIP6, UDP_PORT));
    let counts = tally(
        "TCP over IPv6 from the node",
        bed.in_node(|| (0..30).map(|_| tcp_name(tcp6, CLIENT_TIMEOUT)).collect()),
    );
    assert_backends("TCP over IPv6 from the node", &counts, &[1, 2, 3]);
    let peer = bed.in_node(|| {
        let s = TcpStream::connect_timeout(&tcp6, CLIENT_TIMEOUT).expect("connecting");
        s.peer_addr().unwrap()
    });
    assert_eq!(peer, tcp6, "getpeername() after connect() to the IPv6 VIP");

    let answers = bed.in_node(|| {
        (0..30)
            .map(|_| {
                let socket = UdpSocket::bind("[::]:0")?;
                socket.set_read_timeout(Some(CLIENT_TIMEOUT))?;
                socket.send_to(b"", udp6)?;
                let mut buf = [0u8; 2048];
                let (n, from) = socket.recv_from(&mut buf)?;
                Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
            })
            .collect::<Vec<io::Result<(String, SocketAddr)>>>()
    });
    let mut names = Vec::new();
    for (i, a) in answers.into_iter().enumerate() {
        let (name, from) = a.unwrap_or_else(|e| panic!("UDP exchange #{i} failed: {e}"));
        assert_eq!(from, udp6, "recvfrom() source of {name:?}");
        names.push(Ok(name));
    }
    let counts = tally("unconnected UDP over IPv6 from the node", names);
    assert_backends(
        "unconnected UDP over IPv6 from the node",
        &counts,
        &[1, 2, 3],
    );

    let after = bed.snapshot();
    assert_eq!(
        sock(&after, sock_stats::CONNECT_XLATE) - sock(&before, sock_stats::CONNECT_XLATE),
        31,
        "connect() calls translated by lb_connect6"
    );
    assert!(
        sock(&after, sock_stats::SENDMSG_XLATE) - sock(&before, sock_stats::SENDMSG_XLATE) >= 30,
        "sendmsg() calls translated by lb_sendmsg6"
    );
    assert_eq!(
        tc(&after, stats::XLATE_NEW_FLOW),
        tc(&before, stats::XLATE_NEW_FLOW),
        "no packet translated"
    );
}
