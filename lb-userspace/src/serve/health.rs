//! The agent's own health, `/healthz` and `/livez`, as kube-proxy answers them
//! (pkg/proxy/healthcheck/proxy_health.go).
//!
//! The agent is healthy unless a change has been waiting longer than the health timeout to
//! reach the datapath. `/livez` says only that; `/healthz` also turns 503 while the node is
//! going away (its Node object is being deleted, or the cluster autoscaler has tainted it
//! for deletion), so load balancers that probe it drain the node first.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hyper::StatusCode;
use k8s_openapi::api::core::v1::Node;
use tokio::net::TcpListener;

use super::{json, not_found, serve, Listening};

/// The taint the cluster autoscaler puts on a node before deleting it.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// What Go's JSON encoding of a zero `time.Time` gives: kube-proxy's `lastUpdated` before
/// its first update.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A moment, read from both clocks: the monotonic one measures ages (immune to the wall
/// clock being set), the wall clock is what the answers show.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamp {
    pub(crate) at: Instant,
    pub(crate) wall: SystemTime,
}

impl Stamp {
    pub(crate) fn now() -> Stamp {
        Stamp {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

type Clock = Arc<dyn Fn() -> Stamp + Send + Sync>;

/// The proxier's health: a cheap handle, cloned into every place that reports to it or
/// reads it. kube-proxy's `ProxyHealthServer`, for one proxier that serves both families.
#[derive(Clone)]
pub struct ProxierHealth {
    shared: Arc<Shared>,
}

struct Shared {
    timeout: Duration,
    clock: Clock,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When the oldest change not yet applied was queued.
    oldest_queued: Option<Stamp>,
    last_updated: Option<Stamp>,
    /// Eligible until told otherwise, as kube-proxy is while it starts up.
    node_eligible: bool,
}

/// One answer's view of the state.
struct Report {
    healthy: bool,
    node_eligible: bool,
    last_updated: Option<Stamp>,
    now: Stamp,
}

impl std::fmt::Debug for ProxierHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxierHealth")
            .field("timeout", &self.shared.timeout)
            .field("state", &*self.state())
            .finish()
    }
}

impl ProxierHealth {
    /// Health that turns bad when a change has waited `timeout` to be applied. kube-proxy
    /// uses twice its sync period (`--iptables-sync-period`, 30 s by default): 60 s.
    pub fn new(timeout: Duration) -> ProxierHealth {
        ProxierHealth::with_clock(timeout, Arc::new(Stamp::now))
    }

    /// The same, reading time from `clock`: tests move time on without waiting for it.
    pub(crate) fn with_clock(timeout: Duration, clock: Clock) -> ProxierHealth {
        ProxierHealth {
            shared: Arc::new(Shared {
                timeout,
                clock,
                state: Mutex::new(State {
                    oldest_queued: None,
                    last_updated: None,
                    node_eligible: true,
                }),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A change is waiting to be applied (kube-proxy's `QueuedUpdate`). Only the first call
    /// after an update counts: the age that matters is the oldest waiting change's.
    ///
    /// Call it when there is a complete view to apply: kube-proxy queues nothing until its
    /// informers have synced, so a slow initial list does not fail the probe.
    pub fn queued(&self) {
        let now = (self.shared.clock)();
        self.state().oldest_queued.get_or_insert(now);
    }

    /// An apply succeeded: every change queued before it is in the datapath (kube-proxy's
    /// `Updated`).
    pub fn updated(&self) {
        let now = (self.shared.clock)();
        let mut state = self.state();
        state.oldest_queued = None;
        state.last_updated = Some(now);
    }

    /// Whether this node should receive load-balanced traffic: false while its Node object
    /// is being deleted or carries the autoscaler's deletion taint ([`node_is_eligible`]).
    /// Only `/healthz` reports it.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// The proxier's own health, ignoring the node's eligibility (kube-proxy's `IsHealthy`,
    /// which the health-check node ports report as `serviceProxyHealthy`): no change has
    /// waited `timeout` or longer.
    ///
    /// kube-proxy is healthy before its first update too ("healthy while it's starting
    /// up"), but it calls `Updated` as its sync loop starts, so a first sync that never
    /// succeeds still turns it unhealthy once a change has waited the timeout. Ignoring
    /// whether an update happened gives that directly: nothing queued, healthy; queued and
    /// never applied, unhealthy after `timeout`.
    pub fn is_healthy(&self) -> bool {
        self.report().healthy
    }

    fn report(&self) -> Report {
        let now = (self.shared.clock)();
        let state = self.state();
        let healthy = match state.oldest_queued {
            None => true,
            Some(queued) => now.at.saturating_duration_since(queued.at) < self.shared.timeout,
        };
        Report {
            healthy,
            node_eligible: state.node_eligible,
            last_updated: state.last_updated,
            now,
        }
    }
}

/// Whether `node` should receive load-balanced traffic, as kube-proxy judges it: not while
/// it is being deleted, nor once the cluster autoscaler has tainted it for deletion.
pub fn node_is_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !tainted
}

/// kube-proxy's answer body (its `ProxyHealth`, in its field order).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    /// When healthy, the current time: kube-proxy keeps older releases' meaning, "the sync
    /// loop ran recently". Otherwise the last update, or Go's zero time if there was none.
    last_updated: String,
    current_time: String,
    /// Only in `/healthz` answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
}

/// RFC 3339 in UTC with as many fractional digits as needed, as Go encodes a `time.Time`.
fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ZERO_TIME.to_string())
}

/// The answer to `/healthz` (`with_node` true) or `/livez`.
fn answer(health: &ProxierHealth, with_node: bool) -> hyper::Response<super::Body> {
    let report = health.report();
    let healthy = report.healthy && (report.node_eligible || !with_node);
    let last_updated = if healthy {
        Some(report.now)
    } else {
        report.last_updated
    };
    let body = Body {
        last_updated: last_updated.map_or_else(|| ZERO_TIME.to_string(), |s| rfc3339(s.wall)),
        current_time: rfc3339(report.now.wall),
        node_eligible: with_node.then_some(report.node_eligible),
        healthy: report.healthy,
    };
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &body)
}

/// Serves `/healthz` and `/livez` on `listener` until dropped; every other path is 404.
/// Any method is answered, as kube-proxy's handlers do (HEAD gets the headers only).
pub async fn serve_proxier_health(listener: TcpListener, health: ProxierHealth) {
    serve(Listening::new(listener), move |request| {
        // Only the path counts: a probe may add a query string.
        match request.uri().path() {
            "/healthz" => answer(&health, true),
            "/livez" => answer(&health, false),
            _ => not_found(),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::testing::{exchange, get, request, FakeClock, Reply};
    use std::net::SocketAddr;

    const TIMEOUT: Duration = Duration::from_secs(60);

    async fn start(health: &ProxierHealth) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_proxier_health(listener, health.clone()));
        addr
    }

    /// The status of `/healthz` and of `/livez`, with the bodies checked for their shape.
    async fn statuses(addr: SocketAddr) -> (u16, u16) {
        let healthz = get(addr, "/healthz").await;
        let livez = get(addr, "/livez").await;
        for (reply, with_node) in [(&healthz, true), (&livez, false)] {
            check_shape(reply, with_node);
        }
        (healthz.status, livez.status)
    }

    fn check_shape(reply: &Reply, with_node: bool) {
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        let body = reply.json();
        for field in ["lastUpdated", "currentTime"] {
            let t = body[field].as_str().unwrap();
            assert!(
                t == ZERO_TIME || t.parse::<jiff::Timestamp>().is_ok(),
                "{field} {t:?} is not RFC 3339"
            );
        }
        assert_eq!(body["nodeEligible"].is_boolean(), with_node, "{body}");
        assert!(body["healthy"].is_boolean(), "{body}");
    }

    #[tokio::test]
    async fn healthy_until_a_queued_change_waits_the_timeout() {
        let clock = FakeClock::new();
        let health = clock.health(TIMEOUT);
        let addr = start(&health).await;

        // Starting up: nothing queued.
        assert_eq!(statuses(addr).await, (200, 200));
        health.queued();
        clock.advance(TIMEOUT - Duration::from_millis(1));
        assert_eq!(statuses(addr).await, (200, 200));
        // A later change does not restart the wait.
        health.queued();
        clock.advance(Duration::from_millis(1));
        assert_eq!(statuses(addr).await, (503, 503));
        let body = get(addr, "/livez").await.json();
        assert_eq!(body["healthy"], false);
        assert_eq!(body["lastUpdated"], ZERO_TIME, "never updated");

        health.updated();
        assert_eq!(statuses(addr).await, (200, 200));
        // Long after the update, with nothing queued: still healthy (no traffic, no work).
        clock.advance(TIMEOUT * 10);
        assert_eq!(statuses(addr).await, (200, 200));

        // Unhealthy again, now reporting when the last update was.
        let updated_at = get(addr, "/livez").await.json()["currentTime"].clone();
        health.updated();
        health.queued();
        clock.advance(TIMEOUT);
        let body = get(addr, "/healthz").await.json();
        assert_eq!(body["lastUpdated"], updated_at, "{body}");
        assert_ne!(body["currentTime"], updated_at, "{body}");
    }

    #[tokio::test]
    async fn node_eligibility_fails_healthz_only() {
        let clock = FakeClock::new();
        let health = clock.health(TIMEOUT);
        let addr = start(&health).await;

        health.set_node_eligible(false);
        assert_eq!(statuses(addr).await, (503, 200));
        let body = get(addr, "/healthz").await.json();
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(body["healthy"], true, "the proxier itself is fine: {body}");
        assert!(health.is_healthy());

        health.set_node_eligible(true);
        assert_eq!(statuses(addr).await, (200, 200));
        assert_eq!(get(addr, "/healthz").await.json()["nodeEligible"], true);
    }

    #[tokio::test]
    async fn healthy_answers_show_the_current_time_as_last_updated() {
        let clock = FakeClock::new();
        let health = clock.health(TIMEOUT);
        let addr = start(&health).await;
        health.updated();
        clock.advance(Duration::from_secs(5));
        let body = get(addr, "/livez").await.json();
        assert_eq!(body["lastUpdated"], body["currentTime"], "{body}");
    }

    #[tokio::test]
    async fn other_paths_and_garbage_do_not_bring_it_down() {
        let health = ProxierHealth::new(TIMEOUT);
        let addr = start(&health).await;

        assert_eq!(get(addr, "/").await.status, 404);
        assert_eq!(get(addr, "/healthz/extra").await.status, 404);
        assert_eq!(get(addr, "/livez?verbose").await.status, 200);
        assert_eq!(request(addr, "POST", "/healthz").await.unwrap().status, 200);
        let head = exchange(
            addr,
            b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");

        let garbage = exchange(addr, b"\x00\x01 ?? HTTP/9\r\n\r\n").await.unwrap();
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
        let odd_method = request(addr, "BREW", "/%%%").await.unwrap();
        assert_eq!(odd_method.status, 404);

        assert_eq!(statuses(addr).await, (200, 200), "still serving");
    }

    #[test]
    fn nodes_being_deleted_or_tainted_for_deletion_are_not_eligible() {
        let node = |yaml: &str| -> Node { serde_yaml::from_str(yaml).unwrap() };
        assert!(node_is_eligible(&node("metadata: {name: n}")));
        assert!(node_is_eligible(&node(
            "metadata: {name: n}\nspec: {taints: [{key: other, effect: NoSchedule}]}"
        )));
        assert!(!node_is_eligible(&node(
            "metadata: {name: n, deletionTimestamp: '2024-01-01T00:00:00Z'}"
        )));
        assert!(!node_is_eligible(&node(
            "metadata: {name: n}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}]}"
        )));
    }
}
