//! Prometheus metrics at `/metrics`, in the OpenMetrics text format: kube-proxy's sync
//! metrics (pkg/proxy/metrics/metrics.go) under the `lbagent_` prefix, what the datapath
//! holds, and its packet counters.
//!
//! The datapath's counters live in per-CPU BPF arrays; they are read when scraped, through
//! closures the agent registers ([`Metrics::register_datapath_counters`],
//! [`Metrics::register_socket_counters`]), so this module knows nothing of BPF and its tests
//! feed it made-up numbers.

use std::fmt::{self, Display};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use lb_common::{sock, stats, Counter as DatapathCounter};
use log::warn;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use super::{not_found, response, serve, Listening};
use crate::dataplane::ApplyReport;

/// The prefix of every metric name (kube-proxy's is `kubeproxy_`).
pub const PREFIX: &str = "lbagent";

/// What a scrape answers with: OpenMetrics 1.0 text, which is what prometheus-client writes
/// and Prometheus asks for first.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The agent's metrics. Update them through the methods below from anywhere (they are
/// atomics); register the datapath's counters before sharing it, then serve it with
/// [`serve_metrics`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    network_programming: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    sync_failures: Counter,
    service_ports: Gauge,
    backends: Gauge,
    conntrack_entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// kube-proxy's buckets for its sync duration: 1 ms doubling to 16.384 s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's buckets for network programming latency: 0.25 s, 0.5 s, then every second
/// to 59 s, every 5 s to 115 s, every 30 s to 5 min. Its `merge` starts from a slice
/// holding one zero, so there is a 0 bucket too (where clock skew between the node and the
/// API server, which makes latencies negative, ends up): kept, so dashboards built for
/// kube-proxy's see the same series.
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    std::iter::once(0.0)
        .chain(linear_buckets(0.25, 0.25, 2))
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix(PREFIX);
        let sync_duration = Histogram::new(sync_buckets());
        registry.register_with_unit(
            "sync_proxy_rules_duration",
            "How long one sync took, from reading the objects to the last datapath write, failed ones included",
            Unit::Seconds,
            sync_duration.clone(),
        );
        let network_programming = Histogram::new(network_programming_buckets());
        registry.register_with_unit(
            "network_programming_duration",
            "From a Service's or EndpointSlice's change (its endpoints.kubernetes.io/last-change-trigger-time) to the datapath write that carried it",
            Unit::Seconds,
            network_programming.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "sync_proxy_rules_last_timestamp",
            "When the datapath was last synced successfully, in seconds since the Unix epoch",
            Unit::Seconds,
            last_sync.clone(),
        );
        let sync_failures = Counter::default();
        registry.register(
            "sync_proxy_rules_failures",
            "Syncs that failed to apply the desired state (retried)",
            sync_failures.clone(),
        );
        let service_ports = Gauge::default();
        registry.register(
            "service_ports",
            "Service ports programmed in the datapath after the last successful sync",
            service_ports.clone(),
        );
        let backends = Gauge::default();
        registry.register(
            "backends",
            "Distinct backends programmed in the datapath after the last successful sync",
            backends.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "conntrack_entries",
            "Connection-tracking entries of both families after the last garbage collection (two per flow)",
            conntrack_entries.clone(),
        );
        Metrics {
            registry,
            sync_duration,
            network_programming,
            last_sync,
            sync_failures,
            service_ports,
            backends,
            conntrack_entries,
        }
    }

    /// A sync applied the desired state: observes how long it `took`, stamps the time and
    /// records what the datapath now holds.
    pub fn sync_succeeded(&self, took: Duration, report: &ApplyReport) {
        self.sync_duration.observe(took.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync.set(now.as_secs_f64());
        self.service_ports.set(gauge_value(report.service_ports));
        self.backends.set(gauge_value(report.backends));
    }

    /// A sync failed to apply the desired state after `took`. kube-proxy observes the
    /// duration of every sync, failed or not.
    pub fn sync_failed(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
        self.sync_failures.inc();
    }

    /// A change made at `changed` (an EndpointSlice's or Service's
    /// `endpoints.kubernetes.io/last-change-trigger-time`) reached the datapath at
    /// `programmed`. A `changed` later than `programmed` (the clocks of the node and the
    /// control plane disagree) is observed as negative, as kube-proxy does.
    pub fn observe_network_programming(&self, changed: SystemTime, programmed: SystemTime) {
        let seconds = match programmed.duration_since(changed) {
            Ok(latency) => latency.as_secs_f64(),
            Err(skew) => -skew.duration().as_secs_f64(),
        };
        self.network_programming.observe(seconds);
    }

    /// The connection-tracking map holds `entries` (both families).
    pub fn set_conntrack_entries(&self, entries: usize) {
        self.conntrack_entries.set(gauge_value(entries));
    }

    /// Exposes the datapath's packet counters, read on every scrape by `read`: summed over
    /// CPUs and indexed by `lb_common::stats` reason, as
    /// `dataplane::ebpf::inspect::sum_counters` returns them. They appear as
    /// `lbagent_datapath_packets_total` and `lbagent_datapath_bytes_total`, labelled with
    /// the reason's name (`drop_no_route`, as `lb-agent dump` shows it) and its verdict
    /// (the name's first word: `pass`, `xlate`, `reject` or `drop`). A read that fails
    /// leaves them out of that scrape, with a warning.
    pub fn register_datapath_counters<F, E>(&mut self, read: F)
    where
        F: Fn() -> Result<Vec<DatapathCounter>, E> + Send + Sync + 'static,
        E: Display,
    {
        self.registry
            .register_collector(Box::new(DatapathCounters(Box::new(move || {
                read().map_err(|e| e.to_string())
            }))));
    }

    /// Exposes the socket programs' counters, read on every scrape by `read`: calls summed
    /// over CPUs, indexed by `lb_common::sock::stats` reason. They appear as
    /// `lbagent_socket_lb_calls_total{reason="sock_connect_xlate"}` and so on.
    pub fn register_socket_counters<F, E>(&mut self, read: F)
    where
        F: Fn() -> Result<Vec<u64>, E> + Send + Sync + 'static,
        E: Display,
    {
        self.registry
            .register_collector(Box::new(SocketCounters(Box::new(move || {
                read().map_err(|e| e.to_string())
            }))));
    }

    /// The exposition a scrape gets, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// A count as a gauge's `i64` (saturating; no map holds 2^63 entries).
fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The verdict a datapath reason's name starts with.
fn verdict(name: &str) -> &str {
    name.split('_').next().unwrap_or(name)
}

/// A registered read of counters; the error is only ever shown.
type Read<T> = Box<dyn Fn() -> Result<Vec<T>, String> + Send + Sync>;

struct DatapathCounters(Read<DatapathCounter>);

struct SocketCounters(Read<u64>);

impl fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCounters")
    }
}

impl fmt::Debug for SocketCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SocketCounters")
    }
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = match (self.0)() {
            Ok(counters) => counters,
            Err(e) => {
                warn!("cannot read the datapath counters for /metrics: {e}");
                return Ok(());
            }
        };
        // One reading for both families, so packets and bytes agree. (A collector's help is
        // written as given: the registry adds the full stop only to registered metrics'.)
        let by_reason: Vec<_> = stats::NAMES.iter().zip(&counters).collect();
        let mut packets = encoder.encode_descriptor(
            "datapath_packets",
            "Packets the datapath programs saw, by what they did with them (lb_common::stats).",
            None,
            MetricType::Counter,
        )?;
        for (name, counter) in &by_reason {
            let labels = [("verdict", verdict(name)), ("reason", name)];
            ConstCounter::new(counter.packets).encode(packets.encode_family(&labels)?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "datapath",
            "Bytes of the packets in lbagent_datapath_packets_total.",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (name, counter) in &by_reason {
            let labels = [("verdict", verdict(name)), ("reason", name)];
            ConstCounter::new(counter.bytes).encode(bytes.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Collector for SocketCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let calls = match (self.0)() {
            Ok(calls) => calls,
            Err(e) => {
                warn!("cannot read the socket program counters for /metrics: {e}");
                return Ok(());
            }
        };
        let mut family = encoder.encode_descriptor(
            "socket_lb_calls",
            "Runs of the socket-level load-balancing programs, by outcome (lb_common::sock::stats).",
            None,
            MetricType::Counter,
        )?;
        for (name, n) in sock::stats::NAMES.iter().zip(&calls) {
            ConstCounter::new(*n).encode(family.encode_family(&[("reason", *name)])?)?;
        }
        Ok(())
    }
}

/// Serves `metrics` at `/metrics` on `listener` until dropped; every other path is 404.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    serve(Listening::new(listener), move |request| {
        if request.uri().path() != "/metrics" {
            return not_found();
        }
        match metrics.encode() {
            Ok(text) => response(StatusCode::OK, CONTENT_TYPE, text),
            Err(fmt::Error) => response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "encoding the metrics failed\n",
            ),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::testing::{exchange, get};
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    /// Made-up datapath counters: reason i saw i+1 packets of 100 bytes each, except
    /// `pass_not_ip`, which saw none.
    fn fake_counters() -> Vec<DatapathCounter> {
        (0..stats::REASONS as u64)
            .map(|i| DatapathCounter {
                packets: if i == 0 { 0 } else { i + 1 },
                bytes: if i == 0 { 0 } else { (i + 1) * 100 },
            })
            .collect()
    }

    fn metrics_with_fakes() -> Metrics {
        let mut metrics = Metrics::new();
        metrics.register_datapath_counters(|| Ok::<_, String>(fake_counters()));
        metrics.register_socket_counters(|| {
            Ok::<_, String>((0..sock::stats::REASONS as u64).map(|i| i * 7).collect())
        });
        metrics
    }

    /// A sample line: name, labels and value.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// Parses an OpenMetrics text exposition strictly enough to catch a malformed one:
    /// every line is a HELP, TYPE or UNIT comment or a sample, every sample belongs to the
    /// family the last TYPE line declared (with its type's suffix), and the page ends in
    /// `# EOF`.
    fn parse(page: &str) -> Vec<Sample> {
        let body = page
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("no # EOF at the end: {page}"));
        let mut samples = Vec::new();
        let mut family: Option<(String, String)> = None;
        for line in body.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let (kind, rest) = comment.split_once(' ').unwrap();
                let (name, value) = rest.split_once(' ').unwrap();
                assert!(is_name(name), "{line}");
                match kind {
                    "TYPE" => {
                        assert!(["counter", "gauge", "histogram"].contains(&value), "{line}");
                        family = Some((name.to_string(), value.to_string()));
                    }
                    "HELP" => assert!(value.ends_with('.'), "{line}"),
                    "UNIT" => assert!(name.ends_with(&format!("_{value}")), "{line}"),
                    _ => panic!("unknown comment {line:?}"),
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, labels)) => {
                    let labels = labels
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                    let labels = labels
                        .split(',')
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').unwrap();
                            assert!(is_name(k), "{line}");
                            let v = v
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .unwrap_or_else(|| panic!("unquoted label in {line:?}"));
                            (k.to_string(), v.to_string())
                        })
                        .collect();
                    (name, labels)
                }
            };
            let (family_name, family_type) = family
                .as_ref()
                .unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
            let suffix = name
                .strip_prefix(family_name.as_str())
                .unwrap_or_else(|| panic!("{line:?} outside its family {family_name}"));
            let allowed: &[&str] = match family_type.as_str() {
                "counter" => &["_total", "_created"],
                "gauge" => &[""],
                _ => &["_bucket", "_sum", "_count", "_created"],
            };
            assert!(allowed.contains(&suffix), "{line:?} in {family_type}");
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        samples
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == name && s.labels == wanted)
            .collect();
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        found[0].value
    }

    #[test]
    fn every_metric_is_on_the_page_with_its_values() {
        let metrics = metrics_with_fakes();
        let report = ApplyReport {
            service_ports: 12,
            backends: 30,
            writes: 0,
            deletes: 0,
        };
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        metrics.sync_succeeded(Duration::from_millis(3), &report);
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        metrics.sync_failed(Duration::from_millis(40));
        metrics.set_conntrack_entries(8);
        let changed = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        metrics.observe_network_programming(changed, changed + Duration::from_millis(1500));

        let page = metrics.encode().unwrap();
        let samples = parse(&page);

        let sync = "lbagent_sync_proxy_rules_duration_seconds";
        assert_eq!(value(&samples, &format!("{sync}_count"), &[]), 2.0);
        assert!((value(&samples, &format!("{sync}_sum"), &[]) - 0.043).abs() < 1e-9);
        // 3 ms falls in the 4 ms bucket, 40 ms in the 64 ms one.
        assert_eq!(
            value(&samples, &format!("{sync}_bucket"), &[("le", "0.002")]),
            0.0
        );
        assert_eq!(
            value(&samples, &format!("{sync}_bucket"), &[("le", "0.004")]),
            1.0
        );
        assert_eq!(
            value(&samples, &format!("{sync}_bucket"), &[("le", "0.064")]),
            2.0
        );
        assert_eq!(
            value(&samples, &format!("{sync}_bucket"), &[("le", "+Inf")]),
            2.0
        );

        let programming = "lbagent_network_programming_duration_seconds";
        assert_eq!(
            value(&samples, &format!("{programming}_bucket"), &[("le", "1.0")]),
            0.0
        );
        assert_eq!(
            value(&samples, &format!("{programming}_bucket"), &[("le", "2.0")]),
            1.0
        );
        assert_eq!(value(&samples, &format!("{programming}_sum"), &[]), 1.5);

        let last = value(
            &samples,
            "lbagent_sync_proxy_rules_last_timestamp_seconds",
            &[],
        );
        assert!(
            (before.as_secs_f64()..=after.as_secs_f64()).contains(&last),
            "{last} not in [{before:?}, {after:?}]"
        );
        assert_eq!(
            value(&samples, "lbagent_sync_proxy_rules_failures_total", &[]),
            1.0
        );
        assert_eq!(value(&samples, "lbagent_service_ports", &[]), 12.0);
        assert_eq!(value(&samples, "lbagent_backends", &[]), 30.0);
        assert_eq!(value(&samples, "lbagent_conntrack_entries", &[]), 8.0);

        // Every reason, zeros included, under its verdict.
        for (i, name) in stats::NAMES.iter().enumerate() {
            let labels = [("verdict", verdict(name)), ("reason", *name)];
            let expected = fake_counters()[i];
            assert_eq!(
                value(&samples, "lbagent_datapath_packets_total", &labels),
                expected.packets as f64
            );
            assert_eq!(
                value(&samples, "lbagent_datapath_bytes_total", &labels),
                expected.bytes as f64
            );
        }
        let drop_no_route = [("verdict", "drop"), ("reason", "drop_no_route")];
        assert_eq!(
            value(&samples, "lbagent_datapath_packets_total", &drop_no_route),
            (stats::DROP_NO_ROUTE + 1) as f64
        );
        let verdicts: std::collections::BTreeSet<&str> = samples
            .iter()
            .filter_map(|s| s.labels.get("verdict").map(String::as_str))
            .collect();
        assert_eq!(
            verdicts.into_iter().collect::<Vec<_>>(),
            ["drop", "pass", "reject", "xlate"]
        );
        for (i, name) in sock::stats::NAMES.iter().enumerate() {
            assert_eq!(
                value(
                    &samples,
                    "lbagent_socket_lb_calls_total",
                    &[("reason", name)]
                ),
                (i * 7) as f64
            );
        }
    }

    #[test]
    fn buckets_are_kube_proxys() {
        let sync: Vec<f64> = sync_buckets().collect();
        assert_eq!(sync.len(), 15);
        assert_eq!((sync[0], sync[14]), (0.001, 16.384));
        let programming: Vec<f64> = network_programming_buckets().collect();
        assert_eq!(programming.len(), 1 + 2 + 59 + 12 + 7);
        assert_eq!(&programming[..4], &[0.0, 0.25, 0.5, 1.0]);
        assert_eq!(programming[programming.len() - 1], 300.0);
        assert!(
            programming.windows(2).all(|w| w[0] < w[1]),
            "{programming:?}"
        );
    }

    #[test]
    fn negative_latencies_from_clock_skew_land_in_the_zero_bucket() {
        let metrics = Metrics::new();
        let programmed = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        metrics.observe_network_programming(programmed + Duration::from_secs(2), programmed);
        let samples = parse(&metrics.encode().unwrap());
        let name = "lbagent_network_programming_duration_seconds";
        assert_eq!(
            value(&samples, &format!("{name}_bucket"), &[("le", "0.0")]),
            1.0
        );
        assert_eq!(value(&samples, &format!("{name}_sum"), &[]), -2.0);
    }

    #[test]
    fn a_counter_read_that_fails_leaves_the_rest_of_the_page() {
        let mut metrics = Metrics::new();
        let reads = Arc::new(AtomicU64::new(0));
        let counted = reads.clone();
        metrics.register_datapath_counters(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            Err::<Vec<DatapathCounter>, _>("map gone")
        });
        let page = metrics.encode().unwrap();
        assert_eq!(reads.load(Ordering::Relaxed), 1, "read once per scrape");
        let samples = parse(&page);
        assert!(!page.contains("lbagent_datapath"), "{page}");
        assert_eq!(value(&samples, "lbagent_service_ports", &[]), 0.0);
    }

    #[tokio::test]
    async fn served_at_metrics_only() {
        let listener = TcpListener::bind("[::1]:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_metrics(listener, Arc::new(metrics_with_fakes())));

        let reply = get(addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
        let samples = parse(&reply.body);
        let labels = [("verdict", "xlate"), ("reason", "xlate_new_flow")];
        assert_eq!(
            value(&samples, "lbagent_datapath_packets_total", &labels),
            (stats::XLATE_NEW_FLOW + 1) as f64
        );

        assert_eq!(get(addr, "/").await.status, 404);
        assert_eq!(get(addr, "/metrics/x").await.status, 404);
        let garbage = exchange(addr, b"GET\r\n\r\n\r\n").await.unwrap();
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
        assert_eq!(get(addr, "/metrics").await.status, 200, "still serving");
    }
}
