//! The UDP portal: one association per client (address and the local address it reached),
//! each with its own socket connected to the endpoint the balancer chose; the endpoint's
//! answers go back to the client from the portal's socket, from the address the client's
//! datagrams arrived at (`pktinfo.rs`). An association ends after [`Config::udp_idle_timeout`]
//! without a datagram either way, or when its endpoint refuses (ICMP port unreachable): the
//! client's next datagram then opens a new one, to the next endpoint.
//!
//! Unlike TCP connections, associations end with their portal: its task owns them.
//!
//! [`Config::udp_idle_timeout`]: super::Config::udp_idle_timeout

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::balancer::{self, Shared};
use super::pktinfo;

/// The largest datagram relayed (UDP's payload limit).
const MAX_DATAGRAM: usize = 65_535;
/// Client datagrams queued for one association; more are dropped, as a full socket buffer
/// would, rather than holding up every other client.
const QUEUE: usize = 64;

/// A client, as the portal tells clients apart: its address, and the local address its
/// datagrams arrived at (where the answers must come from).
type Client = (SocketAddr, IpAddr);

struct Association {
    to_endpoint: mpsc::Sender<Vec<u8>>,
    task: AbortHandle,
}

/// Serves `socket` (pktinfo enabled) until the task is aborted, which ends every association.
pub async fn serve(socket: UdpSocket, balancer: Shared, name: String, idle: Duration) {
    let socket = Arc::new(socket);
    let mut associations: HashMap<Client, Association> = HashMap::new();
    let mut tasks: JoinSet<Client> = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = pktinfo::recv(&socket, &mut buf) => {
                let d = match received {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("{name}: receiving a datagram failed: {e}");
                        continue;
                    }
                };
                let client = (d.from, d.to);
                let live = associations.get(&client).is_some_and(|a| !a.task.is_finished());
                if !live {
                    match associate(&socket, &balancer, client, idle, &mut tasks).await {
                        Ok(a) => {
                            associations.insert(client, a);
                        }
                        Err(e) => {
                            warn!("{name}: {}: {e}", d.from);
                            continue;
                        }
                    }
                }
                // Full: dropped, as a full socket buffer would.
                let _ = associations[&client].to_endpoint.try_send(buf[..d.len].to_vec());
            }
            Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(client) = ended {
                    if associations.get(&client).is_some_and(|a| a.task.is_finished()) {
                        associations.remove(&client);
                    }
                }
            }
        }
    }
}

/// Opens an association for `client` to the endpoint the balancer gives.
async fn associate(
    socket: &Arc<UdpSocket>,
    balancer: &Shared,
    client: Client,
    idle: Duration,
    tasks: &mut JoinSet<Client>,
) -> io::Result<Association> {
    let endpoint = balancer::pick(balancer, client.0.ip(), false).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "the service has no endpoints",
        )
    })?;
    let any: IpAddr = match endpoint {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let upstream = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    upstream.connect(endpoint).await?;
    debug!("{} -> {endpoint}: new association", client.0);
    let (tx, rx) = mpsc::channel(QUEUE);
    let task = tasks.spawn(relay(upstream, rx, socket.clone(), client, idle));
    Ok(Association {
        to_endpoint: tx,
        task,
    })
}

/// Moves datagrams between one client and its endpoint until `idle` passes without any, or
/// the endpoint refuses. Returns the client, for the portal to forget it.
async fn relay(
    upstream: UdpSocket,
    mut from_client: mpsc::Receiver<Vec<u8>>,
    portal: Arc<UdpSocket>,
    client: Client,
    idle: Duration,
) -> Client {
    let (client_addr, local) = client;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let deadline = tokio::time::sleep(idle);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            datagram = from_client.recv() => {
                let Some(datagram) = datagram else { break };
                if let Err(e) = upstream.send(&datagram).await {
                    debug!("{client_addr}: sending to the endpoint failed: {e}");
                    break;
                }
            }
            answer = upstream.recv(&mut buf) => {
                match answer {
                    Ok(n) => {
                        if let Err(e) = pktinfo::send(&portal, &buf[..n], client_addr, local).await {
                            debug!("{client_addr}: answering from {local} failed: {e}");
                        }
                    }
                    // ICMP port unreachable from the endpoint, typically.
                    Err(e) => {
                        debug!("{client_addr}: the endpoint failed: {e}");
                        break;
                    }
                }
            }
            () = &mut deadline => break,
        }
        deadline.as_mut().reset(Instant::now() + idle);
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::userspace::balancer::Balancer;
    use std::sync::Mutex;

    /// A UDP server on loopback answering `<name>: <payload>`.
    async fn echo(name: &'static str) -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let (n, peer) = s.recv_from(&mut buf).await.unwrap();
                let answer = [name.as_bytes(), b": ", &buf[..n]].concat();
                s.send_to(&answer, peer).await.unwrap();
            }
        });
        addr
    }

    async fn exchange(client: &UdpSocket, payload: &[u8]) -> String {
        client.send(payload).await.unwrap();
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn clients_keep_their_endpoint_until_idle() {
        let (a, b) = (echo("a").await, echo("b").await);
        let balancer: Shared = Arc::new(Mutex::new(Balancer::new(vec![a, b], None)));
        let portal = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        pktinfo::enable(&portal, false).unwrap();
        let portal_addr = SocketAddr::from(([127, 0, 0, 1], portal.local_addr().unwrap().port()));
        let idle = Duration::from_millis(300);
        let task = tokio::spawn(serve(portal, balancer, "test".into(), idle));

        let c1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c1.connect(portal_addr).await.unwrap();
        let c2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c2.connect(portal_addr).await.unwrap();
        // One association per client: c1 stays on a, c2 on b, round robin across clients.
        for i in 0..3 {
            assert_eq!(
                exchange(&c1, format!("{i}").as_bytes()).await,
                format!("a: {i}")
            );
            assert_eq!(exchange(&c2, b"x").await, "b: x");
        }
        // Idle past the timeout: c1's next datagram opens a new association (the next
        // endpoint in turn: a).
        tokio::time::sleep(idle * 2).await;
        assert_eq!(exchange(&c2, b"y").await, "a: y");
        assert_eq!(exchange(&c1, b"z").await, "b: z");
        task.abort();
    }
}
