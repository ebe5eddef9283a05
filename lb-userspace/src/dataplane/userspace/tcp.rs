//! The TCP portal: accepts the redirected connections, dials an endpoint (the next one on a
//! failure, as kube-proxy's `TryConnectEndpoints` in `proxysocket.go`), and copies bytes both
//! ways until both sides are done.
//!
//! Each connection is its own task, independent of the listener's: closing a portal stops
//! new connections only, established ones go on (as kube-proxy's did). They end when the
//! dataplane's shutdown signal goes (its cleanup, or its drop).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use log::{debug, warn};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::balancer::{self, Shared};

/// The dial timeout of each attempt, one attempt per entry: kube-proxy's
/// `EndpointDialTimeouts`. A connection tries up to this many endpoints.
pub const DIAL_TIMEOUTS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// How long the accept loop waits after an error such as running out of file descriptors,
/// so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    balancer: Shared,
    name: String,
    shutdown: watch::Receiver<()>,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("{name}: accepting a connection failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (balancer, name, mut shutdown) = (balancer.clone(), name.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = proxy(client, peer, &balancer, &name) => {}
                // Changed or closed: either way the dataplane is shutting its portals down.
                _ = shutdown.changed() => {}
            }
        });
    }
}

async fn proxy(mut client: TcpStream, peer: SocketAddr, balancer: &Shared, name: &str) {
    match dial(balancer, peer.ip(), &DIAL_TIMEOUTS).await {
        Ok((mut upstream, endpoint)) => {
            debug!("{name}: {peer} -> {endpoint}");
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                debug!("{name}: {peer} -> {endpoint} ended: {e}");
            }
        }
        Err(e) => {
            warn!("{name}: {peer}: {e}");
            // A reset rather than a clean close, so the client sees a failure, not an
            // empty answer. Normally the filter rules refuse a service without endpoints
            // before it gets here; this covers the moment between the two updates.
            let _ = client.set_zero_linger();
        }
    }
}

/// Connects to an endpoint for `client`: one attempt per entry of `timeouts`, each to the
/// next endpoint the balancer gives (the first as affinity says, then skipping it).
pub async fn dial(
    balancer: &Shared,
    client: IpAddr,
    timeouts: &[Duration],
) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last_err = None;
    for (attempt, &timeout) in timeouts.iter().enumerate() {
        let Some(endpoint) = balancer::pick(balancer, client, attempt > 0) else {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the service has no endpoints",
            ));
        };
        match tokio::time::timeout(timeout, TcpStream::connect(endpoint)).await {
            Ok(Ok(stream)) => return Ok((stream, endpoint)),
            Ok(Err(e)) => {
                debug!("dialing {endpoint} failed: {e}");
                last_err = Some(format!("{endpoint}: {e}"));
            }
            Err(_) => {
                debug!("dialing {endpoint} timed out after {timeout:?}");
                last_err = Some(format!("{endpoint}: no answer in {timeout:?}"));
            }
        }
    }
    Err(io::Error::other(format!(
        "no endpoint could be reached in {} attempts (last: {})",
        timeouts.len(),
        last_err.unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::userspace::balancer::Balancer;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback port nothing listens on (bound, then closed).
    pub(crate) fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_refused_endpoint_is_skipped_for_the_next() {
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap();
        let closed = closed_port();
        let b: Shared = Arc::new(Mutex::new(Balancer::new(vec![closed, open_addr], None)));
        let client = IpAddr::from([127, 0, 0, 1]);
        let (_, reached) = dial(&b, client, &DIAL_TIMEOUTS).await.unwrap();
        assert_eq!(reached, open_addr);
        // With one attempt only, the closed endpoint (next in turn again) is the answer.
        let e = dial(&b, client, &DIAL_TIMEOUTS[..1]).await.unwrap_err();
        assert!(e.to_string().contains(&closed.to_string()), "{e}");
        // Without endpoints: refused at once.
        let empty: Shared = Arc::new(Mutex::new(Balancer::new(vec![], None)));
        let e = dial(&empty, client, &DIAL_TIMEOUTS).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_through_a_portal() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"pong:").await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let portal = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let portal_addr = portal.local_addr().unwrap();
        let b: Shared = Arc::new(Mutex::new(Balancer::new(
            vec![closed_port(), backend_addr],
            None,
        )));
        let (_tx, rx) = watch::channel(());
        let task = tokio::spawn(serve(portal, b, "test".into(), rx));
        let mut c = TcpStream::connect(portal_addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "pong:hello");
        task.abort();
    }
}
