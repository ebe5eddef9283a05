//! Unprivileged tests of the whole dataplane: the rules against golden files, and the
//! portals on loopback (the iptables programs replaced by a recorder, so nothing is
//! redirected: the tests connect to the portals' ports directly).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::dataplane::fixtures::{check_golden, fe};
use crate::dataplane::iptables::{Backend, Config as IptablesConfig};
use crate::model::{Endpoint, ServicePort, ServicePortName};
use crate::testbed::TempDir;

// ------------------------------------------------------------------------------------------
// Rules.

/// One family's rules for a case, each portal on a made-up port (40000 and up, in key
/// order), as the agent would program them.
fn render(desired: &DesiredState, family: IpFamily) -> String {
    let wanted = portal::portals(desired, &[IpFamily::V4, IpFamily::V6]);
    let ports: BTreeMap<&PortalKey, u16> = wanted.keys().zip(40000..).collect();
    rules::generate(family, &wanted, |k| ports[k]).render()
}

#[test]
fn generated_rules_match_golden_files() {
    check_golden("src/dataplane/userspace/testdata", render);
}

// ------------------------------------------------------------------------------------------
// Portals on loopback.

/// A dataplane whose iptables programs only append their arguments and input to `log`.
fn recording_dataplane(log: &Path) -> UserspaceDataplane {
    let log = log.to_owned();
    let mut iptables = IptablesConfig::new(Backend::system());
    iptables.families = vec![IpFamily::V4];
    iptables.command = Arc::new(move |program| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo "$0 $*" >> "$LOG"; cat >> "$LOG""#, program])
            .env("LOG", &log);
        cmd
    });
    UserspaceDataplane::new(Config::new(iptables))
}

fn spn(name: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "ns".into(),
        name: name.into(),
        port: String::new(),
        protocol,
    }
}

/// `web` (TCP) and `dns` (UDP) over `endpoints`, and `other` (TCP) over the first one.
fn desired(endpoints: &[SocketAddr]) -> DesiredState {
    let eps = |list: &[SocketAddr]| {
        list.iter()
            .map(|a| Endpoint {
                addr: a.ip(),
                port: a.port(),
            })
            .collect()
    };
    let mut services = BTreeMap::new();
    for (name, protocol, vip, list) in [
        ("web", Protocol::Tcp, "10.96.0.1", endpoints),
        ("dns", Protocol::Udp, "10.96.0.2", endpoints),
        ("other", Protocol::Tcp, "10.96.0.3", &endpoints[..1]),
    ] {
        services.insert(
            spn(name, protocol),
            ServicePort {
                frontends: [fe(vip, 80, protocol)].into(),
                endpoints: eps(list),
                ..Default::default()
            },
        );
    }
    DesiredState {
        services,
        ..Default::default()
    }
}

/// A TCP server on loopback that greets with `name` and echoes lines.
async fn server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                w.write_all(format!("{name}\n").as_bytes()).await.unwrap();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = w.write_all(format!("{name}: {line}\n").as_bytes()).await;
                }
            });
        }
    });
    addr
}

/// A session through a portal: connected, greeted.
struct Session {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
    name: String,
}

impl Session {
    async fn open(port: u16) -> std::io::Result<Session> {
        let s = TcpStream::connect(("127.0.0.1", port)).await?;
        let (r, write) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let name = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .map_err(|_| std::io::Error::other("no greeting"))??
            .ok_or_else(|| std::io::Error::other("closed before the greeting"))?;
        Ok(Session { lines, write, name })
    }

    async fn echo(&mut self, line: &str) -> std::io::Result<String> {
        self.write.write_all(format!("{line}\n").as_bytes()).await?;
        self.lines
            .next_line()
            .await?
            .ok_or_else(|| std::io::Error::other("closed"))
    }
}

fn port_of(dp: &UserspaceDataplane, name: &str) -> u16 {
    dp.portal_ports()
        .into_iter()
        .find(|(k, _)| k.service.name == name)
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("no portal for {name}"))
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_portals_keep_their_sockets_and_removed_ones_close() {
    let dir = TempDir::new("userspace-unit").unwrap();
    let log: PathBuf = dir.path().join("iptables.log");
    let mut dp = recording_dataplane(&log);
    let (a, b) = (server("a").await, server("b").await);

    let report = dp.apply(&desired(&[a, b])).unwrap();
    assert_eq!(
        (report.service_ports, report.backends),
        (3, 2),
        "{report:?}"
    );
    let first = log_text(&log);
    assert!(
        first.contains("iptables-restore --noflush --wait")
            && first.contains("-j REDIRECT --to-ports")
            && first.contains("-C PREROUTING"),
        "the first apply writes every chain and checks the jumps:\n{first}"
    );
    let ports = dp.portal_ports();
    let web = port_of(&dp, "web");
    let mut session = Session::open(web).await.unwrap();
    // Endpoints go in address order, so which one comes first depends on the ports.
    let (stays, stays_name) = if session.name == "a" {
        (b, "b")
    } else {
        (a, "a")
    };
    assert_eq!(
        Session::open(web).await.unwrap().name,
        stays_name,
        "round robin"
    );

    // The same state again: nothing runs, nothing moves.
    std::fs::remove_file(&log).unwrap();
    let report = dp.apply(&desired(&[a, b])).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");
    assert_eq!(log_text(&log), "", "an unchanged state ran iptables");

    // The session's endpoint goes: the portals stay on their ports, the session goes on,
    // new connections reach the other; the rules do not change (same ports), so none run.
    dp.apply(&desired(&[stays])).unwrap();
    assert_eq!(dp.portal_ports(), ports, "a portal moved");
    let still = session.echo("still").await.unwrap();
    assert_eq!(still, format!("{}: still", session.name));
    for _ in 0..3 {
        assert_eq!(Session::open(web).await.unwrap().name, stays_name);
    }
    assert_eq!(log_text(&log), "");

    // `web` goes: its listener closes (refused), its session still goes on, `other` stays.
    let mut state = desired(&[stays]);
    state.services.remove(&spn("web", Protocol::Tcp));
    let report = dp.apply(&state).unwrap();
    assert_eq!(report.deletes, 1, "{report:?}");
    // The listener closes when its task next runs: soon, not necessarily before this (a
    // connection that reaches its backlog meanwhile is reset when it closes).
    let mut refused = false;
    for _ in 0..50 {
        let attempt = TcpStream::connect(("127.0.0.1", web)).await;
        if attempt.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused) {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "the removed portal still accepts connections after 1 s"
    );
    let after = session.echo("after").await.unwrap();
    assert_eq!(after, format!("{}: after", session.name));
    assert_eq!(
        port_of(&dp, "other"),
        ports
            .iter()
            .find(|(k, _)| k.service.name == "other")
            .unwrap()
            .1
            .to_owned()
    );
    assert!(
        log_text(&log).contains("10.96.0.3"),
        "the rules were rewritten"
    );

    // Cleanup closes everything, the session too, and deletes the chains.
    dp.cleanup().unwrap();
    assert!(dp.portal_ports().is_empty());
    let closed = tokio::time::timeout(Duration::from_secs(5), session.echo("gone")).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the session outlived cleanup: {closed:?}"
    );
    let cleanup = log_text(&log);
    assert!(
        cleanup.contains("-D PREROUTING") && cleanup.contains("-X LBA-PORTALS-CONTAINER"),
        "{cleanup}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_retries_past_a_closed_endpoint() {
    let dir = TempDir::new("userspace-unit").unwrap();
    let mut dp = recording_dataplane(&dir.path().join("iptables.log"));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let open = server("open").await;
    dp.apply(&desired(&[closed, open])).unwrap();
    let web = port_of(&dp, "web");
    for _ in 0..4 {
        assert_eq!(Session::open(web).await.unwrap().name, "open");
    }
    // `other` has only the closed endpoint: four attempts, then a reset.
    let err = Session::open(port_of(&dp, "other")).await.err();
    assert!(
        err.is_some(),
        "a portal without a reachable endpoint answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_portals_relay_answers_from_the_address_asked() {
    let dir = TempDir::new("userspace-unit").unwrap();
    let mut dp = recording_dataplane(&dir.path().join("iptables.log"));
    let backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let (n, peer) = backend.recv_from(&mut buf).await.unwrap();
            let answer = [b"dns: ", &buf[..n]].concat();
            backend.send_to(&answer, peer).await.unwrap();
        }
    });
    dp.apply(&desired(&[backend_addr])).unwrap();
    let port = port_of(&dp, "dns");
    // 127.0.0.2: not the address the kernel would answer from on its own.
    let portal = SocketAddr::new(IpAddr::from([127, 0, 0, 2]), port);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(portal).await.unwrap();
    client.send(b"query").await.unwrap();
    let mut buf = [0u8; 1500];
    let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    assert_eq!(&buf[..n], b"dns: query");
}

#[test]
fn apply_outside_a_runtime_says_so() {
    let dir = TempDir::new("userspace-unit").unwrap();
    let mut dp = recording_dataplane(&dir.path().join("iptables.log"));
    let err = dp.apply(&desired(&[SocketAddr::from(([127, 0, 0, 1], 1))]));
    assert!(err.unwrap_err().to_string().contains("tokio runtime"));
    assert!(dp.needs_retry());
}
