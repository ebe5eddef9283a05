//! The health-check node ports (`spec.healthCheckNodePort`) of LoadBalancer services with
//! externalTrafficPolicy Local, as kube-proxy serves them
//! (pkg/proxy/healthcheck/service_health.go).
//!
//! A cloud load balancer probes the port on every node and sends the service's traffic only
//! to the nodes that answer 200: those with a ready endpoint of the service (the datapath
//! drops external traffic to the others) and an agent keeping the datapath current.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use hyper::header::HeaderValue;
use hyper::StatusCode;
use log::info;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::task::JoinHandle;

use super::{json, serve, Listening, ProxierHealth};
use crate::model::HealthCheck;

/// Connections a health-check listener queues before accepting them. Probes are few.
const BACKLOG: i32 = 128;

/// Serves every health-check node port of the desired state; [`sync`](Self::sync) after
/// every apply opens, updates and closes them.
#[derive(Debug)]
pub struct ServiceHealthServers {
    health: ProxierHealth,
    /// The addresses each port listens on; `None`: every address of the node.
    addrs: Option<Vec<IpAddr>>,
    servers: BTreeMap<u16, PortServer>,
}

/// One health-check port: the listeners on its addresses and what they answer.
#[derive(Debug)]
struct PortServer {
    check: Arc<Mutex<HealthCheck>>,
    listeners: Vec<(Listening, JoinHandle<()>)>,
}

impl Drop for PortServer {
    /// Frees the port before returning (the listeners close here, not when their tasks are
    /// next polled) and ends the connections still open on it.
    fn drop(&mut self) {
        for (listening, task) in &self.listeners {
            listening.close();
            task.abort();
        }
    }
}

/// A health-check node port that could not be opened. It is tried again at the next sync.
#[derive(Debug, thiserror::Error)]
#[error("cannot open health-check node port {port} of service {namespace}/{name} on {addr}: {source}; load balancers probing it will take this node for unhealthy; retrying at the next sync")]
pub struct BindError {
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// The ports a sync could not open; the others are served.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct SyncError(pub Vec<BindError>);

impl ServiceHealthServers {
    /// Health-check ports on every address of the node, as kube-proxy without
    /// `--nodeport-addresses`. Each port is one dual-stack socket on `[::]` (IPv4 clients
    /// reach it as v4-mapped addresses): the one Go's listener opens for kube-proxy, serving
    /// both families with one bind, so one family's port cannot be taken while the other's
    /// is open. On a kernel without IPv6, `0.0.0.0`.
    ///
    /// `health` is reported in every answer (`serviceProxyHealthy`), and a sick agent
    /// answers 503 on every port.
    pub fn new(health: ProxierHealth) -> ServiceHealthServers {
        ServiceHealthServers {
            health,
            addrs: None,
            servers: BTreeMap::new(),
        }
    }

    /// Health-check ports on `addrs` only, a listener on each (kube-proxy with
    /// `--nodeport-addresses`).
    pub fn on_addresses(health: ProxierHealth, addrs: Vec<IpAddr>) -> ServiceHealthServers {
        ServiceHealthServers {
            health,
            addrs: Some(addrs),
            servers: BTreeMap::new(),
        }
    }

    /// Makes the served ports those of `desired`: closes the ports it no longer has (they
    /// are free when this returns), updates the answers of the ports it keeps (in place:
    /// a load balancer's probe connection is not cut), and opens the new ones. A port
    /// that cannot be opened (in use, say) is reported and tried again at the next sync;
    /// the others are served all the same.
    ///
    /// Must be called inside a Tokio runtime: each listener is served by a task of its own.
    pub fn sync(&mut self, desired: &BTreeMap<u16, HealthCheck>) -> Result<(), SyncError> {
        self.servers.retain(|port, _| {
            let keep = desired.contains_key(port);
            if !keep {
                info!("closing health-check node port {port}");
            }
            keep
        });
        let mut failed = Vec::new();
        for (&port, check) in desired {
            if let Some(server) = self.servers.get(&port) {
                *server.check.lock().unwrap_or_else(PoisonError::into_inner) = check.clone();
                continue;
            }
            match self.open(port, check) {
                Ok(server) => {
                    info!(
                        "serving health-check node port {port} for service {}/{}",
                        check.namespace, check.name
                    );
                    self.servers.insert(port, server);
                }
                Err(e) => failed.push(e),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(SyncError(failed))
        }
    }

    /// Listens on `port` on every address, or on none: a port open on some addresses only
    /// would pass probes on those and fail them on the others.
    fn open(&self, port: u16, check: &HealthCheck) -> Result<PortServer, BindError> {
        let mut server = PortServer {
            check: Arc::new(Mutex::new(check.clone())),
            listeners: Vec::new(),
        };
        let addrs = match &self.addrs {
            Some(addrs) => addrs.clone(),
            None => vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        };
        for ip in addrs {
            let addr = SocketAddr::new(ip, port);
            let listener = bind(addr, self.addrs.is_none()).map_err(|source| BindError {
                namespace: check.namespace.clone(),
                name: check.name.clone(),
                port,
                addr,
                source,
            })?;
            // Dropping `server` on an error above closes what was opened.
            let listening = Listening::new(listener);
            let task = tokio::spawn(serve(
                listening.clone(),
                answer(server.check.clone(), self.health.clone()),
            ));
            server.listeners.push((listening, task));
        }
        Ok(server)
    }
}

/// Binds `addr`. With `wildcard`, `[::]` is dual-stack, and falls back to `0.0.0.0` where
/// the kernel has no IPv6.
fn bind(addr: SocketAddr, wildcard: bool) -> io::Result<tokio::net::TcpListener> {
    let socket = match Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)) {
        Err(e) if wildcard && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            return bind(
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()),
                false,
            );
        }
        socket => socket?,
    };
    if addr.is_ipv6() {
        // Explicit, not left to net.ipv6.bindv6only: only the wildcard takes IPv4 too.
        socket.set_only_v6(!wildcard)?;
    }
    // Lets a port be opened again at once after it was closed, while connections it
    // served are still in TIME_WAIT (as Go and Tokio listeners do).
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// kube-proxy's answer body, in its field order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: Service<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct Service<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// Answers every request, whatever its method and path, as kube-proxy does: 200 while the
/// service has a ready endpoint on this node and the agent is healthy, 503 otherwise.
fn answer(
    check: Arc<Mutex<HealthCheck>>,
    health: ProxierHealth,
) -> impl Fn(&hyper::Request<hyper::body::Incoming>) -> hyper::Response<super::Body> + Send + Sync {
    move |_request| {
        let check = check.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let healthy = health.is_healthy();
        let status = if check.local_endpoints > 0 && healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = Body {
            service: Service {
                namespace: &check.namespace,
                name: &check.name,
            },
            local_endpoints: check.local_endpoints,
            service_proxy_healthy: healthy,
        };
        let mut response = json(status, &body);
        // Load balancers that weigh nodes (GCE's, for one) read this: the node's share of
        // the service's endpoints.
        response.headers_mut().insert(
            "x-load-balancing-endpoint-weight",
            HeaderValue::from(check.local_endpoints),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::testing::{exchange, get, request, FakeClock};
    use std::time::Duration;

    /// `N` distinct ports, each free on both loopback addresses (held until all are found,
    /// so the kernel cannot hand out one twice).
    fn free_ports<const N: usize>() -> [u16; N] {
        let mut held = Vec::new();
        while held.len() < N {
            let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = v4.local_addr().unwrap().port();
            if let Ok(v6) = std::net::TcpListener::bind(("::1", port)) {
                held.push((port, v4, v6));
            }
        }
        std::array::from_fn(|i| held[i].0)
    }

    const LOOPBACK: [IpAddr; 2] = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];

    fn check(name: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: "shop".to_string(),
            name: name.to_string(),
            local_endpoints,
        }
    }

    fn on(ip: IpAddr, port: u16) -> SocketAddr {
        SocketAddr::new(ip, port)
    }

    #[tokio::test]
    async fn answers_with_the_local_endpoint_count_on_both_families() {
        let clock = FakeClock::new();
        let health = clock.health(Duration::from_secs(60));
        let mut servers = ServiceHealthServers::on_addresses(health.clone(), LOOPBACK.to_vec());
        let [web, db] = free_ports();
        servers
            .sync(&BTreeMap::from([
                (web, check("web", 3)),
                (db, check("db", 0)),
            ]))
            .unwrap();

        for ip in LOOPBACK {
            let reply = get(on(ip, web), "/anything/at/all").await;
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.header("content-type"), Some("application/json"));
            assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("3"));
            assert_eq!(
                reply.json(),
                serde_json::json!({
                    "service": {"namespace": "shop", "name": "web"},
                    "localEndpoints": 3,
                    "serviceProxyHealthy": true,
                })
            );
            // kube-proxy's field order, for readers who diff the two.
            assert!(
                reply.body.starts_with(
                    r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":3,"#
                ),
                "{}",
                reply.body
            );

            let reply = get(on(ip, db), "/").await;
            assert_eq!(reply.status, 503, "no local endpoint: {reply:?}");
            assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("0"));
            assert_eq!(reply.json()["localEndpoints"], 0);
        }

        // A sick agent fails every port, even with endpoints.
        health.queued();
        clock.advance(Duration::from_secs(60));
        let reply = get(on(LOOPBACK[0], web), "/healthz").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["serviceProxyHealthy"], false);
        assert_eq!(reply.json()["localEndpoints"], 3);
        health.updated();
        assert_eq!(get(on(LOOPBACK[0], web), "/").await.status, 200);
    }

    #[tokio::test]
    async fn counts_change_in_place_and_removed_ports_are_released() {
        let health = ProxierHealth::new(Duration::from_secs(60));
        let mut servers = ServiceHealthServers::on_addresses(health, LOOPBACK.to_vec());
        let [web, db] = free_ports();
        servers
            .sync(&BTreeMap::from([
                (web, check("web", 1)),
                (db, check("db", 2)),
            ]))
            .unwrap();
        assert_eq!(get(on(LOOPBACK[0], web), "/").await.status, 200);

        // A probe's kept-alive connection survives the update, and sees the new count.
        let mut probe = tokio::net::TcpStream::connect(on(LOOPBACK[1], web))
            .await
            .unwrap();
        let first = keep_alive_get(&mut probe).await;
        assert!(first.contains("\"localEndpoints\":1"), "{first}");
        servers
            .sync(&BTreeMap::from([
                (web, check("web", 0)),
                (db, check("db", 2)),
            ]))
            .unwrap();
        let second = keep_alive_get(&mut probe).await;
        assert!(second.starts_with("HTTP/1.1 503"), "{second}");
        assert!(second.contains("\"localEndpoints\":0"), "{second}");

        // Removing `db` frees its port on both addresses by the time sync returns.
        servers
            .sync(&BTreeMap::from([(web, check("web", 4))]))
            .unwrap();
        for ip in LOOPBACK {
            std::net::TcpListener::bind(on(ip, db))
                .unwrap_or_else(|e| panic!("{} is still taken: {e}", on(ip, db)));
        }
        assert!(
            request(on(LOOPBACK[0], db), "GET", "/").await.is_err(),
            "nothing listens on the removed port"
        );
        assert_eq!(get(on(LOOPBACK[1], web), "/").await.status, 200);

        // Dropping the servers closes the rest.
        drop(servers);
        std::net::TcpListener::bind(on(LOOPBACK[0], web)).unwrap();
    }

    /// One GET on a kept-alive connection: the answer's head and body.
    async fn keep_alive_get(stream: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        // The body is a JSON object ending in "}\n": read until it has come.
        while !answer.ends_with(b"}\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {:?}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_and_retried_while_the_others_serve() {
        let health = ProxierHealth::new(Duration::from_secs(60));
        let mut servers = ServiceHealthServers::on_addresses(health, LOOPBACK.to_vec());
        let [web, taken] = free_ports();
        // Taken on the second address only: the first must not be left open either.
        let squatter = std::net::TcpListener::bind(on(LOOPBACK[1], taken)).unwrap();
        let desired = BTreeMap::from([(web, check("web", 1)), (taken, check("cart", 2))]);

        let err = servers.sync(&desired).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        let failure = &err.0[0];
        assert_eq!(
            (failure.namespace.as_str(), failure.name.as_str()),
            ("shop", "cart")
        );
        assert_eq!(failure.addr, on(LOOPBACK[1], taken));
        assert_eq!(failure.source.kind(), io::ErrorKind::AddrInUse);
        let message = err.to_string();
        assert!(
            message.contains("shop/cart") && message.contains(&taken.to_string()),
            "{message}"
        );
        assert_eq!(get(on(LOOPBACK[0], web), "/").await.status, 200);
        std::net::TcpListener::bind(on(LOOPBACK[0], taken))
            .expect("the half-opened port was closed again");

        // Freed: the next sync opens it.
        drop(squatter);
        servers.sync(&desired).unwrap();
        let reply = get(on(LOOPBACK[1], taken), "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["service"]["name"], "cart");
    }

    #[tokio::test]
    async fn garbage_requests_do_not_bring_a_port_down() {
        let health = ProxierHealth::new(Duration::from_secs(60));
        let mut servers = ServiceHealthServers::on_addresses(health, LOOPBACK.to_vec());
        let [port] = free_ports();
        servers
            .sync(&BTreeMap::from([(port, check("web", 1))]))
            .unwrap();
        let addr = on(LOOPBACK[0], port);
        let garbage = exchange(addr, b"\xff\xfe NOT HTTP\r\n\r\n").await.unwrap();
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
        // Any method, any path, as kube-proxy.
        assert_eq!(request(addr, "DELETE", "/%zz").await.unwrap().status, 200);
        assert_eq!(get(addr, "/").await.status, 200);
    }
}
