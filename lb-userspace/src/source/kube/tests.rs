//! The kube source against a stand-in API server: `tower_test`'s mock service as the client's
//! transport (how kube-rs tests its own client), answering each request the watchers make with
//! real list bodies and newline-delimited watch event streams. Time is paused, so the watchers'
//! backoff delays pass at once (and can be measured).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::pin::pin;

use ::kube::client::Body;
use bytes::Bytes;
use futures::channel::mpsc as body_channel;
use http::{Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::{timeout, Instant};
use tower_test::mock;

use super::*;

/// How long (in paused, virtual time) a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(120);

/// The response body type of the stand-in: a whole body, or a stream the test feeds.
type MockBody = UnsyncBoxBody<Bytes, io::Error>;
type Frames = body_channel::UnboundedSender<Result<Frame<Bytes>, io::Error>>;

/// The three collections the source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Services,
    EndpointSlices,
    Nodes,
}

impl Kind {
    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlices),
            "/api/v1/nodes" => Some(Kind::Nodes),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Services | Kind::Nodes => "v1",
            Kind::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
            Kind::Nodes => "Node",
        }
    }
}

/// The stand-in API server: every request the client sends, sorted by collection, for the
/// test to answer.
struct FakeApi {
    calls: HashMap<Kind, tokio::sync::mpsc::UnboundedReceiver<Call>>,
    _router: JoinHandle<()>,
}

/// One request, waiting for its answer.
struct Call {
    uri: Uri,
    respond: mock::SendResponse<Response<MockBody>>,
}

impl FakeApi {
    fn new() -> (Client, FakeApi) {
        let (service, handle) = mock::pair::<Request<Body>, Response<MockBody>>();
        let mut senders = HashMap::new();
        let mut calls = HashMap::new();
        for kind in [Kind::Services, Kind::EndpointSlices, Kind::Nodes] {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            senders.insert(kind, tx);
            calls.insert(kind, rx);
        }
        let router = tokio::spawn(async move {
            let mut handle = pin!(handle);
            while let Some((request, respond)) = handle.next_request().await {
                let uri = request.uri().clone();
                assert_eq!(request.method(), http::Method::GET, "{uri}");
                let kind = Kind::from_path(uri.path())
                    .unwrap_or_else(|| panic!("request for an unexpected path: {uri}"));
                // A test that is done no longer listens; its source's requests go unanswered.
                let _ = senders[&kind].send(Call { uri, respond });
            }
        });
        let api = FakeApi {
            calls,
            _router: router,
        };
        (Client::new(service, "default"), api)
    }

    /// The next request for `kind`.
    async fn next(&mut self, kind: Kind) -> Call {
        let calls = self.calls.get_mut(&kind).unwrap();
        match timeout(PATIENCE, calls.recv()).await {
            Ok(Some(call)) => call,
            Ok(None) => panic!("the stand-in API server stopped (see its panic above)"),
            Err(_) => panic!("no {kind:?} request within {PATIENCE:?}"),
        }
    }

    /// The next request for `kind`, which must be a list.
    async fn next_list(&mut self, kind: Kind) -> Call {
        let call = self.next(kind).await;
        assert!(!call.is_watch(), "expected a list, got {}", call.uri);
        call
    }

    /// The next request for `kind`, which must be a watch from `resource_version`.
    async fn next_watch(&mut self, kind: Kind, resource_version: &str) -> Call {
        let call = self.next(kind).await;
        assert!(call.is_watch(), "expected a watch, got {}", call.uri);
        assert_eq!(
            call.param("resourceVersion").as_deref(),
            Some(resource_version),
            "{}",
            call.uri
        );
        call
    }

    fn assert_no_request(&mut self, kind: Kind) {
        let calls = self.calls.get_mut(&kind).unwrap();
        if let Ok(call) = calls.try_recv() {
            panic!("unexpected request: {}", call.uri);
        }
    }
}

impl Call {
    fn params(&self) -> BTreeMap<String, String> {
        form_urlencoded::parse(self.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect()
    }

    fn param(&self, name: &str) -> Option<String> {
        self.params().remove(name)
    }

    fn is_watch(&self) -> bool {
        self.param("watch").as_deref() == Some("true")
    }

    fn answer(self, status: StatusCode, body: Vec<u8>) {
        let body = Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync();
        let response = Response::builder().status(status).body(body).unwrap();
        self.respond.send_response(response);
    }

    /// Answers a list request with `items` as of `resource_version`. As the API server does,
    /// the items carry no apiVersion or kind: the list says what they are.
    fn answer_list(self, kind: Kind, resource_version: &str, items: &[Value]) {
        let items: Vec<Value> = items
            .iter()
            .map(|item| {
                let mut item = item.clone();
                let fields = item.as_object_mut().unwrap();
                fields.remove("apiVersion");
                fields.remove("kind");
                item
            })
            .collect();
        let list = json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": {"resourceVersion": resource_version},
            "items": items,
        });
        self.answer(StatusCode::OK, serde_json::to_vec(&list).unwrap());
    }

    /// Answers a watch with these events, then ends the response, as the API server does when
    /// the watch's timeoutSeconds are up.
    fn answer_events(self, events: &[Value]) {
        self.answer(StatusCode::OK, event_lines(events));
    }

    /// Answers with an error status, as the API server (or a proxy in front of it) does.
    fn answer_status(self, code: u16, reason: &str, message: &str) {
        let status = status(code, reason, message);
        let code = StatusCode::from_u16(code).unwrap();
        self.answer(code, serde_json::to_vec(&status).unwrap());
    }

    /// Fails the request as a refused or reset connection does.
    fn fail_connection(self) {
        self.respond.send_error(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
    }

    /// Answers a watch with a response that stays open: events are sent through the result.
    fn open_watch(self) -> OpenWatch {
        let (frames, body) = body_channel::unbounded();
        let body = StreamBody::new(body).boxed_unsync();
        self.respond
            .send_response(Response::builder().body(body).unwrap());
        OpenWatch { frames }
    }
}

/// A watch response in progress. Dropping it ends the response.
struct OpenWatch {
    frames: Frames,
}

impl OpenWatch {
    fn send(&self, event: Value) {
        self.frames
            .unbounded_send(Ok(Frame::data(Bytes::from(event_lines(&[event])))))
            .expect("the client hung up on the watch");
    }

    /// Breaks the connection mid-stream, as a restarting API server or a lost network does.
    fn break_connection(self) {
        let _ = self.frames.unbounded_send(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )));
    }
}

fn event_lines(events: &[Value]) -> Vec<u8> {
    let mut lines = Vec::new();
    for event in events {
        serde_json::to_writer(&mut lines, event).unwrap();
        lines.push(b'\n');
    }
    lines
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn event(kind: &str, object: &Value) -> Value {
    json!({"type": kind, "object": object})
}

fn bookmark(kind: Kind, resource_version: &str) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "apiVersion": kind.api_version(),
            "kind": kind.kind(),
            "metadata": {"resourceVersion": resource_version},
        },
    })
}

/// The ERROR event an API server sends when a watch starts from a resourceVersion it no
/// longer has.
fn expired() -> Value {
    event(
        "ERROR",
        &status(
            410,
            "Expired",
            "The resourceVersion for the provided watch is too old.",
        ),
    )
}

fn service(namespace: &str, name: &str, resource_version: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": format!("uid-svc-{namespace}-{name}"),
            "resourceVersion": resource_version,
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": port, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn endpoint_slice(namespace: &str, name: &str, resource_version: &str, service: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "resourceVersion": resource_version,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": ["10.0.11.2"],
            "conditions": {"ready": true},
            "nodeName": "node-1",
        }],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, resource_version: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "resourceVersion": resource_version,
            "labels": {"topology.kubernetes.io/zone": zone},
        },
    })
}

fn parse<K: DeserializeOwned>(object: &Value) -> K {
    serde_json::from_value(object.clone()).unwrap()
}

/// `namespace/name` of each object, in order.
fn names<K: Resource>(objects: &[K]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            let meta = o.meta();
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or(""),
                meta.name.as_deref().unwrap_or("")
            )
        })
        .collect()
}

fn zone(node: &Node) -> Option<&str> {
    node.metadata
        .labels
        .as_ref()?
        .get("topology.kubernetes.io/zone")
        .map(String::as_str)
}

/// A started source whose first lists are answered.
struct Listed {
    source: KubeSource,
    changes: mpsc::Receiver<()>,
    api: FakeApi,
}

/// The watch requests that followed the first lists, unanswered.
struct Watches {
    services: Call,
    endpoint_slices: Call,
    node: Option<Call>,
}

/// The resourceVersion every first list is answered at.
const LISTED_AT: &str = "100";

impl Listed {
    /// Starts a source, answers its lists with these objects, waits until it is ready, and
    /// takes the watch requests that follow (each from the list's resourceVersion). The change
    /// the lists made is consumed.
    async fn start(
        node_name: Option<&str>,
        services: &[Value],
        endpoint_slices: &[Value],
        nodes: &[Value],
    ) -> (Listed, Watches) {
        let (client, mut api) = FakeApi::new();
        let (source, mut changes) = KubeSource::start(client, node_name);
        api.next_list(Kind::Services)
            .await
            .answer_list(Kind::Services, LISTED_AT, services);
        api.next_list(Kind::EndpointSlices).await.answer_list(
            Kind::EndpointSlices,
            LISTED_AT,
            endpoint_slices,
        );
        if node_name.is_some() {
            api.next_list(Kind::Nodes)
                .await
                .answer_list(Kind::Nodes, LISTED_AT, nodes);
        }
        timeout(PATIENCE, source.ready())
            .await
            .expect("not ready after every list was answered")
            .unwrap();
        let watches = Watches {
            services: api.next_watch(Kind::Services, LISTED_AT).await,
            endpoint_slices: api.next_watch(Kind::EndpointSlices, LISTED_AT).await,
            node: match node_name {
                Some(_) => Some(api.next_watch(Kind::Nodes, LISTED_AT).await),
                None => None,
            },
        };
        assert_eq!(changes.try_recv(), Ok(()), "the lists made no change");
        let listed = Listed {
            source,
            changes,
            api,
        };
        (listed, watches)
    }

    /// Waits for a change notification.
    async fn changed(&mut self) {
        match timeout(PATIENCE, self.changes.recv()).await {
            Ok(Some(())) => {}
            Ok(None) => panic!("the change channel closed"),
            Err(_) => panic!("no change notification within {PATIENCE:?}"),
        }
    }

    fn assert_unchanged(&mut self) {
        assert_eq!(self.changes.try_recv(), Err(TryRecvError::Empty));
    }

    fn service_names(&self) -> Vec<String> {
        names(&self.source.snapshot().services)
    }
}

#[tokio::test(start_paused = true)]
async fn ready_waits_for_every_first_list_and_the_snapshot_is_exactly_what_was_listed() {
    let (client, mut api) = FakeApi::new();
    let (source, mut changes) = KubeSource::start(client, Some("node-1"));

    let services = [
        service("ns2", "a", "90", 80),
        service("ns1", "b", "91", 80),
        service("ns1", "a", "92", 443),
    ];
    let slices = [
        endpoint_slice("ns1", "b-x1", "93", "b"),
        endpoint_slice("ns1", "a-x1", "94", "a"),
    ];
    let nodes = [node("node-1", "95", "zone-a")];

    let services_list = api.next_list(Kind::Services).await;
    let slices_list = api.next_list(Kind::EndpointSlices).await;
    let nodes_list = api.next_list(Kind::Nodes).await;
    // kube-proxy's selector on both, nothing else; the Node by name only.
    for list in [&services_list, &slices_list] {
        assert_eq!(
            list.param("labelSelector").as_deref(),
            Some("!service.kubernetes.io/headless"),
            "{}",
            list.uri
        );
        assert_eq!(list.param("fieldSelector"), None, "{}", list.uri);
    }
    assert_eq!(
        nodes_list.param("fieldSelector").as_deref(),
        Some("metadata.name=node-1"),
        "{}",
        nodes_list.uri
    );
    assert_eq!(
        nodes_list.param("labelSelector"),
        None,
        "{}",
        nodes_list.uri
    );

    assert!(
        timeout(Duration::from_secs(5), source.ready())
            .await
            .is_err(),
        "ready before any list was answered"
    );
    services_list.answer_list(Kind::Services, LISTED_AT, &services);
    slices_list.answer_list(Kind::EndpointSlices, LISTED_AT, &slices);
    // The watches that follow show both lists were taken in.
    let services_watch = api.next_watch(Kind::Services, LISTED_AT).await;
    let slices_watch = api.next_watch(Kind::EndpointSlices, LISTED_AT).await;
    assert!(
        timeout(Duration::from_secs(5), source.ready())
            .await
            .is_err(),
        "ready while the Node list was outstanding"
    );
    nodes_list.answer_list(Kind::Nodes, LISTED_AT, &nodes);
    timeout(PATIENCE, source.ready())
        .await
        .expect("not ready after every list was answered")
        .unwrap();
    let nodes_watch = api.next_watch(Kind::Nodes, LISTED_AT).await;

    // Watches keep the selectors and ask for bookmarks.
    for watch in [&services_watch, &slices_watch, &nodes_watch] {
        assert_eq!(
            watch.param("allowWatchBookmarks").as_deref(),
            Some("true"),
            "{}",
            watch.uri
        );
    }
    for watch in [&services_watch, &slices_watch] {
        assert_eq!(
            watch.param("labelSelector").as_deref(),
            Some("!service.kubernetes.io/headless"),
            "{}",
            watch.uri
        );
    }
    assert_eq!(
        nodes_watch.param("fieldSelector").as_deref(),
        Some("metadata.name=node-1"),
        "{}",
        nodes_watch.uri
    );

    let want = Objects {
        services: [&services[2], &services[1], &services[0]]
            .map(parse)
            .to_vec(),
        endpoint_slices: [&slices[1], &slices[0]].map(parse).to_vec(),
        node: Some(parse(&nodes[0])),
    };
    assert_eq!(source.snapshot(), want);
    assert_eq!(changes.try_recv(), Ok(()), "the lists made no change");
}

#[tokio::test(start_paused = true)]
async fn watch_events_show_in_the_snapshot_and_each_notifies() {
    let (mut t, watches) = Listed::start(
        Some("node-1"),
        &[service("ns1", "a", "90", 80), service("ns1", "b", "91", 80)],
        &[endpoint_slice("ns1", "a-x1", "92", "a")],
        &[node("node-1", "93", "zone-a")],
    )
    .await;
    let services = watches.services.open_watch();
    let slices = watches.endpoint_slices.open_watch();
    let nodes = watches.node.unwrap().open_watch();

    services.send(event("ADDED", &service("ns1", "c", "101", 80)));
    t.changed().await;
    assert_eq!(t.service_names(), ["ns1/a", "ns1/b", "ns1/c"]);

    services.send(event("MODIFIED", &service("ns1", "a", "102", 8443)));
    t.changed().await;
    let a = &t.source.snapshot().services[0];
    assert_eq!(
        a.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        8443
    );

    services.send(event("DELETED", &service("ns1", "b", "103", 80)));
    t.changed().await;
    assert_eq!(t.service_names(), ["ns1/a", "ns1/c"]);

    slices.send(event("ADDED", &endpoint_slice("ns1", "c-x1", "104", "c")));
    t.changed().await;
    assert_eq!(
        names(&t.source.snapshot().endpoint_slices),
        ["ns1/a-x1", "ns1/c-x1"]
    );

    nodes.send(event("MODIFIED", &node("node-1", "105", "zone-b")));
    t.changed().await;
    assert_eq!(
        zone(t.source.snapshot().node.as_ref().unwrap()),
        Some("zone-b")
    );

    nodes.send(event("DELETED", &node("node-1", "106", "zone-b")));
    t.changed().await;
    assert_eq!(t.source.snapshot().node, None);
    t.assert_unchanged();
}

#[tokio::test(start_paused = true)]
async fn a_bookmark_moves_the_resume_version_and_changes_nothing() {
    let (mut t, watches) = Listed::start(None, &[service("ns1", "a", "90", 80)], &[], &[]).await;
    let before = t.source.snapshot();

    // The bookmark, then the end of the watch (its timeout): the next watch resumes from the
    // bookmark's version, not the list's.
    watches
        .services
        .answer_events(&[bookmark(Kind::Services, "150")]);
    let resumed = t.api.next_watch(Kind::Services, "150").await;
    assert_eq!(t.source.snapshot(), before);
    t.assert_unchanged();

    // And without a bookmark, from the last event's version.
    resumed.answer_events(&[event("ADDED", &service("ns1", "b", "160", 80))]);
    t.changed().await;
    t.api.next_watch(Kind::Services, "160").await;
    assert_eq!(t.service_names(), ["ns1/a", "ns1/b"]);
}

#[tokio::test(start_paused = true)]
async fn an_expired_watch_lists_again_and_drops_what_the_new_list_lacks() {
    let (mut t, watches) = Listed::start(
        None,
        &[service("ns1", "a", "90", 80), service("ns1", "b", "91", 80)],
        &[],
        &[],
    )
    .await;
    watches
        .services
        .answer_events(&[event("ADDED", &service("ns1", "c", "101", 80)), expired()]);
    t.changed().await;
    let relist = t.api.next_list(Kind::Services).await;
    // Until the new list is complete, the old objects are served.
    assert_eq!(t.service_names(), ["ns1/a", "ns1/b", "ns1/c"]);
    t.assert_unchanged();

    relist.answer_list(
        Kind::Services,
        "250",
        &[
            service("ns1", "a", "90", 80),
            service("ns1", "c", "101", 80),
        ],
    );
    t.changed().await;
    assert_eq!(t.service_names(), ["ns1/a", "ns1/c"]);
    t.api.next_watch(Kind::Services, "250").await;
}

#[tokio::test(start_paused = true)]
async fn a_watch_refused_with_http_410_lists_again() {
    let (mut t, watches) = Listed::start(
        None,
        &[service("ns1", "a", "90", 80), service("ns1", "b", "91", 80)],
        &[],
        &[],
    )
    .await;
    watches
        .services
        .answer_status(410, "Expired", "too old resource version: 100 (300)");
    // Not the same watch again (kube-runtime's own retry would repeat resourceVersion=100).
    let relist = t.api.next_list(Kind::Services).await;
    assert_eq!(t.service_names(), ["ns1/a", "ns1/b"]);
    relist.answer_list(Kind::Services, "300", &[service("ns1", "b", "91", 80)]);
    t.changed().await;
    assert_eq!(t.service_names(), ["ns1/b"]);
    t.api.next_watch(Kind::Services, "300").await;
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_api_server_keeps_the_last_objects_and_the_watch_resumes() {
    let (mut t, watches) = Listed::start(
        None,
        &[service("ns1", "a", "90", 80), service("ns1", "b", "91", 80)],
        &[endpoint_slice("ns1", "a-x1", "92", "a")],
        &[],
    )
    .await;
    let services = watches.services.open_watch();
    services.send(event("ADDED", &service("ns1", "c", "101", 80)));
    t.changed().await;
    let good = t.source.snapshot();
    assert_eq!(names(&good.services), ["ns1/a", "ns1/b", "ns1/c"]);

    let failed_at = Instant::now();
    services.break_connection();
    let watch = t.api.next_watch(Kind::Services, "101").await;
    watch.answer_status(503, "ServiceUnavailable", "etcdserver: leader changed");
    assert_eq!(t.source.snapshot(), good);
    let watch = t.api.next_watch(Kind::Services, "101").await;
    watch.answer_status(500, "InternalError", "etcdserver: request timed out");
    assert_eq!(t.source.snapshot(), good);
    let watch = t.api.next_watch(Kind::Services, "101").await;
    watch.fail_connection();
    assert_eq!(t.source.snapshot(), good);
    let watch = t.api.next_watch(Kind::Services, "101").await;
    // Four failures, each followed by at least the backoff's 0.8 s: the retries are paced.
    let waited = failed_at.elapsed();
    assert!(waited >= Duration::from_millis(4 * 800), "{waited:?}");
    assert_eq!(t.source.snapshot(), good);
    t.assert_unchanged();

    let services = watch.open_watch();
    services.send(event("DELETED", &service("ns1", "b", "102", 80)));
    t.changed().await;
    assert_eq!(t.service_names(), ["ns1/a", "ns1/c"]);
    assert_eq!(t.source.snapshot().endpoint_slices, good.endpoint_slices);
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_list_is_retried_and_ready_waits_for_it() {
    let (client, mut api) = FakeApi::new();
    let (source, _changes) = KubeSource::start(client, None);
    api.next_list(Kind::Services).await.answer_status(
        500,
        "InternalError",
        "etcdserver: request timed out",
    );
    api.next_list(Kind::EndpointSlices)
        .await
        .answer_list(Kind::EndpointSlices, LISTED_AT, &[]);
    let retry = api.next_list(Kind::Services).await;
    assert!(
        timeout(Duration::from_secs(5), source.ready())
            .await
            .is_err(),
        "ready while the Services list had failed"
    );
    retry.fail_connection();
    api.next_list(Kind::Services).await.answer_list(
        Kind::Services,
        LISTED_AT,
        &[service("ns1", "a", "90", 80)],
    );
    timeout(PATIENCE, source.ready())
        .await
        .expect("not ready after the retried list was answered")
        .unwrap();
    assert_eq!(names(&source.snapshot().services), ["ns1/a"]);
}

#[tokio::test(start_paused = true)]
async fn without_a_node_name_no_node_is_watched() {
    let (mut t, _watches) = Listed::start(None, &[], &[], &[]).await;
    assert_eq!(t.source.snapshot(), Objects::default());
    t.api.assert_no_request(Kind::Nodes);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_source_stops_the_watches() {
    let (t, watches) = Listed::start(None, &[service("ns1", "a", "90", 80)], &[], &[]).await;
    let Listed {
        source,
        mut changes,
        ..
    } = t;
    let services = watches.services.open_watch();
    drop(source);
    // Every watch task held a sender: the channel closes once they are all gone.
    assert_eq!(timeout(PATIENCE, changes.recv()).await, Ok(None));
    assert!(services.frames.is_closed(), "the watch is still being read");
}

#[test]
fn each_problem_is_warned_once_per_run_of_failures() {
    let api_error = |code: u16| {
        watcher::Error::WatchStartFailed(::kube::Error::Api(
            serde_json::from_value::<::kube::core::Status>(status(code, "Some", "went wrong"))
                .unwrap()
                .boxed(),
        ))
    };
    let gone = watcher::Error::WatchError(
        serde_json::from_value::<::kube::core::Status>(status(410, "Expired", "too old"))
            .unwrap()
            .boxed(),
    );
    let mut health = Health::default();
    assert_eq!(health.on_success(), None);
    assert_eq!(health.on_error(&gone), Note::Gone);
    assert_eq!(health.on_success(), None, "410 Gone is no failure");
    assert_eq!(health.on_error(&api_error(503)), Note::Warn);
    assert_eq!(health.on_error(&api_error(503)), Note::Repeat);
    assert_eq!(health.on_error(&gone), Note::Gone);
    assert_eq!(health.on_error(&api_error(503)), Note::Repeat);
    assert_eq!(health.on_error(&api_error(403)), Note::Warn);
    assert_eq!(health.on_error(&api_error(503)), Note::Warn);
    let recovered_from = health.on_success().expect("the failure's end");
    assert!(recovered_from.contains("went wrong"), "{recovered_from}");
    assert_eq!(health.on_success(), None);
    assert_eq!(health.on_error(&api_error(503)), Note::Warn);
}

#[test]
fn only_410s_count_as_gone_and_only_at_watch_start_restart_the_watcher() {
    let api = |code: u16| {
        ::kube::Error::Api(
            serde_json::from_value::<::kube::core::Status>(status(code, "Some", "m"))
                .unwrap()
                .boxed(),
        )
    };
    assert!(is_gone_at_watch_start(&watcher::Error::WatchStartFailed(
        api(410)
    )));
    assert!(!is_gone_at_watch_start(&watcher::Error::WatchStartFailed(
        api(503)
    )));
    assert!(!is_gone_at_watch_start(&watcher::Error::InitialListFailed(
        api(410)
    )));
    assert!(is_gone(&watcher::Error::InitialListFailed(api(410))));
    assert!(!is_gone(&watcher::Error::InitialListFailed(api(500))));
    assert!(!is_gone(&watcher::Error::NoResourceVersion));
}

#[tokio::test]
async fn a_client_is_built_from_a_kubeconfig_file() {
    let dir = crate::testbed::TempDir::new("kubeconfig").unwrap();
    let path = dir.path().join("config");
    std::fs::write(
        &path,
        "apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {cluster: test, user: test, namespace: lb-system}
clusters:
- name: test
  cluster: {server: 'https://127.0.0.1:6443'}
users:
- name: test
  user: {token: not-a-real-token}
",
    )
    .unwrap();
    let client = client(Some(&path)).await.unwrap();
    assert_eq!(client.default_namespace(), "lb-system");
}

#[tokio::test]
async fn client_errors_say_what_to_do() {
    let missing = Path::new("/nonexistent/lb-agent-kubeconfig");
    let Err(error) = client(Some(missing)).await else {
        panic!("a client from a kubeconfig that does not exist");
    };
    let error = error.to_string();
    assert!(
        error.contains("/nonexistent/lb-agent-kubeconfig"),
        "{error}"
    );

    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        eprintln!("skipping the in-cluster check: this process runs in a pod");
        return;
    }
    let Err(error) = client(None).await else {
        panic!("an in-cluster client outside a pod");
    };
    let error = error.to_string();
    assert!(error.contains("pass --kubeconfig PATH"), "{error}");
}
