//! Servers that answer with their name, and the clients that ask them, for checking where the
//! load balancer sent a flow.
//!
//! - TCP: on accept the server writes `<name>\n`, then echoes every line the client sends as
//!   `<name>: <line>\n` until the client closes, so a connection can be held open across agent
//!   syncs and asked again later which backend serves it. The line `peer` is answered with
//!   `<name>: peer <address>`: where the server saw the connection come from (SNAT shows).
//! - UDP: every datagram is answered with `<name>` (empty payload) or `<name>: <payload>`.
//!
//! Servers create their sockets inside a namespace with [`NetNs::run`] and serve them from
//! ordinary threads; they stop and join on drop. The client functions create sockets in the
//! caller's current namespace: call them inside `client.ns.run(|| ...)`. Their timeouts are
//! short, so a broken datapath fails a test within seconds.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::NetNs;
use super::topology::Topology;
use super::{io_err, Result};

/// Default client timeout for connecting and for each answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

/// A server thread: what both servers share. Counts what it served, stops and joins on drop.
#[derive(Debug)]
struct ServerThread {
    addr: SocketAddr,
    name: String,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Runs `serve(name, stop flag, served counter)` on a thread named `<kind>-<name>`.
    fn spawn(
        kind: &str,
        addr: SocketAddr,
        name: &str,
        serve: impl FnOnce(String, Arc<AtomicBool>, Arc<AtomicU64>) + Send + 'static,
    ) -> Result<ServerThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, served, name) = (stop.clone(), served.clone(), name.to_owned());
            std::thread::Builder::new()
                .name(format!("{kind}-{name}"))
                .spawn(move || serve(name, stop, served))
                .map_err(io_err("spawning a server thread"))?
        };
        Ok(ServerThread {
            addr,
            name: name.to_owned(),
            served,
            stop,
            thread: Some(thread),
        })
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP name-and-echo server; stops on drop.
#[derive(Debug)]
pub struct TcpServer(ServerThread);

impl TcpServer {
    /// Listens on `addr` inside `ns` and answers as `name`.
    pub fn start(ns: &NetNs, addr: SocketAddr, name: &str) -> Result<TcpServer> {
        let listener = ns
            .run(move || TcpListener::bind(addr))?
            .map_err(io_err(format!("binding TCP {addr} in {}", ns.name())))?;
        ServerThread::spawn("tcp", addr, name, move |name, stop, accepted| {
            accept_loop(listener, &name, stop, &accepted)
        })
        .map(TcpServer)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.0.served()
    }
}

/// Waits up to `timeout` for `fd` to become readable; false on timeout.
fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) > 0 }
}

fn accept_loop(listener: TcpListener, name: &str, stop: Arc<AtomicBool>, accepted: &AtomicU64) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd(), POLL) {
            continue;
        }
        let Ok((stream, _peer)) = listener.accept() else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        handlers.retain(|h| !h.is_finished());
        let (conn_name, stop) = (name.to_owned(), stop.clone());
        match std::thread::Builder::new()
            .name(format!("conn-{name}"))
            .spawn(move || serve_connection(stream, &conn_name, &stop))
        {
            Ok(h) => handlers.push(h),
            Err(e) => eprintln!("testbed: {name}: cannot spawn a connection thread: {e}"),
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn serve_connection(mut stream: TcpStream, name: &str, stop: &AtomicBool) {
    if stream.set_read_timeout(Some(POLL)).is_err()
        || stream.write_all(format!("{name}\n").as_bytes()).is_err()
    {
        return;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let mut answer = format!("{name}: ").into_bytes();
                    match stream.peer_addr() {
                        Ok(peer) if line == b"peer\n" => {
                            answer.extend_from_slice(format!("peer {}\n", peer.ip()).as_bytes())
                        }
                        _ => answer.extend_from_slice(&line),
                    }
                    if stream.write_all(&answer).is_err() {
                        return;
                    }
                }
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A UDP name server; stops on drop.
#[derive(Debug)]
pub struct UdpServer(ServerThread);

impl UdpServer {
    /// Binds `addr` inside `ns` and answers as `name`.
    pub fn start(ns: &NetNs, addr: SocketAddr, name: &str) -> Result<UdpServer> {
        let socket = ns
            .run(move || UdpSocket::bind(addr))?
            .map_err(io_err(format!("binding UDP {addr} in {}", ns.name())))?;
        socket
            .set_read_timeout(Some(POLL))
            .map_err(io_err("setting a socket timeout"))?;
        ServerThread::spawn("udp", addr, name, move |name, stop, answered| {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let mut answer = name.clone().into_bytes();
                if n > 0 {
                    answer.extend_from_slice(b": ");
                    answer.extend_from_slice(&buf[..n]);
                }
                if socket.send_to(&answer, peer).is_ok() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .map(UdpServer)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Datagrams answered so far.
    pub fn answered(&self) -> u64 {
        self.0.served()
    }
}

/// A TCP and a UDP server in every backend of a topology, named `backend-<i>`, listening on
/// the backend's IPv4 address, and another pair with the same name on its IPv6 address.
/// Separate listeners rather than one on `[::]` keep each bound to the backend's own
/// address, and keep the IPv4 counters counting IPv4 only.
#[derive(Debug)]
pub struct BackendServers {
    pub tcp: Vec<TcpServer>,
    pub udp: Vec<UdpServer>,
    /// On the backends' IPv6 addresses (`Host::addr6`), in the same order.
    pub tcp6: Vec<TcpServer>,
    pub udp6: Vec<UdpServer>,
}

impl BackendServers {
    /// Starts them on `tcp_port` and `udp_port` of every backend.
    pub fn start(topology: &Topology, tcp_port: u16, udp_port: u16) -> Result<BackendServers> {
        let mut servers = BackendServers {
            tcp: Vec::new(),
            udp: Vec::new(),
            tcp6: Vec::new(),
            udp6: Vec::new(),
        };
        for (i, host) in topology.backends.iter().enumerate() {
            let name = backend_name(i + 1);
            for (ip, tcp, udp) in [
                (host.addr.into(), &mut servers.tcp, &mut servers.udp),
                (host.addr6.into(), &mut servers.tcp6, &mut servers.udp6),
            ] {
                tcp.push(TcpServer::start(
                    &host.ns,
                    SocketAddr::new(ip, tcp_port),
                    &name,
                )?);
                udp.push(UdpServer::start(
                    &host.ns,
                    SocketAddr::new(ip, udp_port),
                    &name,
                )?);
            }
        }
        Ok(servers)
    }
}

/// Counts answers per backend, panicking with the first error if any request failed.
pub fn tally(what: &str, answers: Vec<io::Result<String>>) -> BTreeMap<String, usize> {
    let total = answers.len();
    let mut counts = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        match answer {
            Ok(name) => *counts.entry(name).or_insert(0) += 1,
            Err(e) => failures.push(format!("#{i}: {e}")),
        }
    }
    println!("{what}: {total} requests, distribution {counts:?}");
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} requests failed, first ones: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    counts
}

/// Asserts that exactly `backends` answered (each at least once).
pub fn assert_every_backend(what: &str, counts: &BTreeMap<String, usize>, backends: &[usize]) {
    let expected: Vec<String> = backends.iter().map(|&i| backend_name(i)).collect();
    for name in &expected {
        assert!(
            counts.contains_key(name),
            "{what}: {name} never answered ({counts:?})"
        );
    }
    for name in counts.keys() {
        assert!(
            expected.contains(name),
            "{what}: {name} answered but is not a backend of the service ({counts:?})"
        );
    }
}

/// The name servers of backend `i` (1-based) answer with.
pub fn backend_name(i: usize) -> String {
    format!("backend-{i}")
}

/// An open TCP connection to a name server.
#[derive(Debug)]
pub struct TcpSession {
    stream: TcpStream,
    pending: Vec<u8>,
    name: String,
}

impl TcpSession {
    /// Connects (in the calling thread's namespace) and reads the server's greeting. Each step
    /// is bounded by `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpSession> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut session = TcpSession {
            stream,
            pending: Vec::new(),
            name: String::new(),
        };
        session.name = session.read_line()?;
        Ok(session)
    }

    /// The name the server greeted with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the server sees this connection come from.
    pub fn peer_seen(&mut self) -> io::Result<std::net::IpAddr> {
        let answer = self.echo("peer")?;
        let addr = answer.rsplit(' ').next().unwrap_or_default();
        addr.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a peer answer: {answer:?}"),
            )
        })
    }

    /// Sends `line` and returns the server's answer line without its newline, e.g.
    /// `backend-2: ping`.
    pub fn echo(&mut self, line: &str) -> io::Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        self.read_line()
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection before a full line",
                    ))
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer from the server in time",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Connects to `addr`, returns the name the server greets with, and closes.
pub fn tcp_name(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    TcpSession::connect(addr, timeout).map(|s| s.name)
}

/// Sends `payload` in one datagram from a fresh connected socket (of `addr`'s family) and
/// returns the whole answer. An ICMP or ICMPv6 port unreachable in reply surfaces as
/// `ErrorKind::ConnectionRefused`.
pub fn udp_exchange(addr: SocketAddr, payload: &[u8], timeout: Duration) -> io::Result<String> {
    let any: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(payload)?;
    let mut buf = [0u8; 65536];
    match socket.recv(&mut buf) {
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if is_timeout(&e) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no UDP answer in time",
        )),
        Err(e) => Err(e),
    }
}

/// Sends an empty datagram to `addr` and returns the answering server's name.
pub fn udp_name(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    udp_exchange(addr, b"", timeout)
}
