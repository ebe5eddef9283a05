//! What the agent serves over HTTP for operating it, as kube-proxy does:
//! - [`health`]: `/healthz` and `/livez`, whether the agent keeps the datapath up to date
//!   (kube-proxy's `--healthz-bind-address`, port 10256);
//! - [`service_health`]: the health-check node ports of LoadBalancer services with
//!   externalTrafficPolicy Local, which tell load balancers whether this node has endpoints;
//! - [`metrics`]: Prometheus metrics at `/metrics` (kube-proxy's `--metrics-bind-address`,
//!   port 10249).
//!
//! The servers are HTTP/1.1 on hyper 1 (the stack kube-rs uses too). Each runs until its
//! future is dropped or its listener closed; the caller binds the listener ([`listen`]), so
//! a port in use is an error at startup rather than a server that never answers.

pub mod health;
pub mod metrics;
pub mod service_health;

pub use health::{serve_proxier_health, ProxierHealth};
pub use metrics::{serve_metrics, Metrics};
pub use service_health::ServiceHealthServers;

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// kube-proxy's health port (`--healthz-bind-address` 0.0.0.0:10256): load balancers and
/// probes written for kube-proxy look here.
pub const DEFAULT_HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's metrics port (`--metrics-bind-address` 127.0.0.1:10249).
pub const DEFAULT_METRICS_PORT: u16 = 10249;

/// How long a client may take to send a request's headers before its connection is closed,
/// so idle or trickling connections cannot pile up (hyper's default is 30 s, the same).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A listener that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for {what} on {addr}: {source}; is another kube-proxy or lb-agent running there? choose another address or port")]
pub struct ListenError {
    /// What the listener was for ("health checks (/healthz, /livez)", "metrics").
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Binds a listener for one of the servers here, with an error that names what it was for.
pub async fn listen(addr: SocketAddr, what: &'static str) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { what, addr, source })
}

/// The body of every answer: small and complete, so never streamed.
pub(crate) type Body = Full<Bytes>;

/// A listener that its owner can close while a server task is accepting on it: closing drops
/// the socket at once, so the port is free when `close` returns, not whenever the runtime
/// gets round to dropping an aborted task.
#[derive(Clone, Debug)]
pub(crate) struct Listening(Arc<Mutex<Option<TcpListener>>>);

impl Listening {
    pub(crate) fn new(listener: TcpListener) -> Listening {
        Listening(Arc::new(Mutex::new(Some(listener))))
    }

    /// The next connection, or `None` once closed.
    async fn accept(&self) -> Option<io::Result<(TcpStream, SocketAddr)>> {
        // The lock is held only inside one poll, never across an await.
        poll_fn(|cx| {
            let slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(listener) => listener.poll_accept(cx).map(Some),
                None => Poll::Ready(None),
            }
        })
        .await
    }

    /// Closes the socket. The server task returns at its next accept; the caller aborts it
    /// to end the connections it still serves.
    pub(crate) fn close(&self) {
        drop(self.0.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// Serves HTTP/1.1 on `listening` until it is closed, answering every request with
/// `handler`. Each connection is a task of its own, owned by this future: dropping it (or
/// aborting the task running it) closes them all.
pub(crate) async fn serve<H>(listening: Listening, handler: H)
where
    H: Fn(&Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let mut connections = JoinSet::new();
    // Accept errors (out of file descriptors, say) are mostly passing: wait and try again,
    // backing off from 5 ms to 1 s as Go's http.Server does for kube-proxy.
    let mut backoff = Duration::ZERO;
    loop {
        tokio::select! {
            accepted = listening.accept() => match accepted {
                None => return,
                Some(Ok((stream, _peer))) => {
                    backoff = Duration::ZERO;
                    connections.spawn(serve_connection(stream, handler.clone()));
                }
                Some(Err(e)) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    warn!("accepting a connection failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
            },
            // Reaps finished connections, so the set holds only live ones.
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection<H>(stream: TcpStream, handler: Arc<H>)
where
    H: Fn(&Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let service = service_fn(move |request| {
        let response = handler(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    // A client that hangs up or sends garbage (hyper answers that with 400) is no news.
    if let Err(e) = served {
        debug!("HTTP connection ended: {e}");
    }
}

/// A response with `status`, a `content_type` and `body`.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Go's `http.NotFound`, which kube-proxy's servers answer unknown paths with.
pub(crate) fn not_found() -> Response<Body> {
    response(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n",
    )
}

/// A JSON answer with the headers kube-proxy sends with its health answers.
pub(crate) fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    let mut body = serde_json::to_vec(body).expect("plain structs serialise");
    body.push(b'\n');
    let mut response = response(status, "application/json", body);
    response.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small HTTP/1.1 client over a raw TCP stream: the tests see exactly the bytes the
    //! servers send, with nothing in between that could hide a malformed answer.

    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::health::{ProxierHealth, Stamp};

    pub use crate::testbed::http::Response as Reply;

    /// Sends `raw` as is and reads the answer to the end (the request asks the server to
    /// close the connection after it).
    pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// `METHOD path` on `addr`, answered and parsed.
    pub async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Reply> {
        let raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let answer = exchange(addr, raw.as_bytes()).await?;
        Ok(parse(&answer))
    }

    /// `GET path` on `addr`; panics if the server does not answer.
    pub async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, "GET", path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
    }

    /// Parses a complete response, which must carry a `Content-Length` matching its body.
    pub fn parse(answer: &str) -> Reply {
        let reply =
            crate::testbed::http::parse(answer.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            reply.header("content-length").is_some(),
            "no Content-Length in {answer:?}"
        );
        reply
    }

    /// A clock that moves only when told to.
    #[derive(Clone)]
    pub struct FakeClock {
        base: Stamp,
        offset: Arc<Mutex<Duration>>,
    }

    impl FakeClock {
        pub fn new() -> FakeClock {
            FakeClock {
                base: Stamp::now(),
                offset: Arc::default(),
            }
        }

        pub fn advance(&self, by: Duration) {
            *self.offset.lock().unwrap() += by;
        }

        pub fn health(&self, timeout: Duration) -> ProxierHealth {
            let clock = self.clone();
            ProxierHealth::with_clock(
                timeout,
                Arc::new(move || {
                    let offset = *clock.offset.lock().unwrap();
                    Stamp {
                        at: clock.base.at + offset,
                        wall: clock.base.wall + offset,
                    }
                }),
            )
        }
    }
}
