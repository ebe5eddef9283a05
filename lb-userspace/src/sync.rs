//! The owner task: one loop owns the dataplane and applies every change to it, one at a time,
//! so map writes never race and a failed apply is simply tried again.
//!
//! Each sync reads the whole current set of objects from the source (a directory scan, or the
//! API-server watch caches), builds the desired state with the pure model and hands it to the
//! dataplane, which writes only the difference. Bursts of changes are coalesced the way
//! kube-proxy's `BoundedFrequencyRunner` does: a change after a quiet spell is applied at once,
//! and further changes within `min_sync_period` of a sync wait for the period to end and are
//! applied together.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::{core::v1::Node, discovery::v1::EndpointSlice};
use log::{error, info, warn};
use tokio::sync::mpsc;

use crate::{
    dataplane::{ApplyReport, Dataplane},
    model::{self, DesiredState, LABEL_ZONE},
    serve::{
        health::{node_is_eligible, ProxierHealth},
        metrics::Metrics,
        service_health::ServiceHealthServers,
    },
    source::{
        manifest_dir::{ManifestDir, ManifestError},
        Objects,
    },
};

/// The annotation the EndpointSlice controller stamps with the time of the change that made
/// it update a slice; kube-proxy measures network programming latency from it.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Where a sync reads the objects from.
pub enum Feed {
    /// `--source dir:PATH`.
    Dir {
        dir: ManifestDir,
        /// The manifest errors last reported: a standing error is logged once, not every scan.
        reported_errors: Vec<ManifestError>,
    },
    /// `--source kube`.
    Kube(crate::source::kube::KubeSource),
}

impl Feed {
    /// A directory feed.
    pub fn dir(dir: ManifestDir) -> Feed {
        Feed::Dir {
            dir,
            reported_errors: Vec::new(),
        }
    }

    /// Why the feed can no longer follow its source, if it cannot (a watch task died).
    fn stopped(&self) -> Option<String> {
        match self {
            Feed::Dir { .. } => None,
            Feed::Kube(kube) => kube.stopped(),
        }
    }

    /// The current objects, or `None` when a directory scan found nothing changed.
    fn read(&mut self, node_name: Option<&str>) -> Option<Objects> {
        match self {
            Feed::Dir {
                dir,
                reported_errors,
            } => {
                let scan = dir.scan();
                if scan.errors != *reported_errors {
                    for e in &scan.errors {
                        error!("{e}");
                    }
                    *reported_errors = scan.errors.clone();
                }
                if !scan.changed {
                    return None;
                }
                let node = scan
                    .nodes
                    .into_iter()
                    .find(|n| node_name.is_some() && n.metadata.name.as_deref() == node_name);
                Some(Objects {
                    services: scan.services,
                    endpoint_slices: scan.endpoint_slices,
                    node,
                })
            }
            Feed::Kube(kube) => Some(kube.snapshot()),
        }
    }
}

/// What one sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed since the last successful apply.
    Unchanged,
    /// The new desired state was applied.
    Applied(ApplyReport),
    /// Applying failed; the dataplane asks for a retry.
    Failed,
    /// The source can no longer report changes: the agent must stop (and be restarted)
    /// rather than serve a frozen state as healthy.
    SourceStopped,
}

/// What reports on the syncs: the proxy's own health, the health-check node ports, metrics.
pub struct Observers {
    pub health: ProxierHealth,
    pub service_health: ServiceHealthServers,
    pub metrics: Arc<Metrics>,
    /// When the agent started: only changes after it count for programming latency.
    pub started: SystemTime,
}

/// Owns the dataplane and applies every change to it, one at a time.
pub struct Syncer<D: Dataplane> {
    observers: Observers,
    feed: Feed,
    dataplane: D,
    /// The node as configured; its zone is filled in from the Node object at every sync.
    node: model::Node,
    generation: u64,
    /// What the dataplane was last given successfully: the health-check ports answer for it.
    applied: Option<DesiredState>,
    /// What the last, failed apply was given, to retry without a source change.
    failed: Option<DesiredState>,
    /// What the last successful apply reported, for the metrics of syncs that change nothing.
    report: ApplyReport,
    /// The model warnings last logged: a standing warning is logged once.
    reported_warnings: Vec<model::ModelWarning>,
    /// Whether this node's Node object was eligible when last seen: a Node deleted outright
    /// disappears without a deletion timestamp, and must not look eligible again.
    node_eligible: bool,
    /// The dataplane asked for a full apply at the periodic resync, changed or not.
    full_resync: bool,
    /// Trigger times read by syncs that failed, observed when a later one succeeds.
    unobserved_triggers: Vec<((String, String), SystemTime)>,
    /// Whether the "no endpoint is on this node" warning was given.
    warned_node_name: bool,
    /// When the last sync started (Tokio's clock, which tests can pause and advance).
    last_sync: Option<tokio::time::Instant>,
    /// The health-check ports that could not be opened, as last reported.
    health_check_errors: Option<String>,
    /// The trigger time of every slice whose programming latency was observed.
    observed_triggers: HashMap<(String, String), SystemTime>,
}

impl<D: Dataplane> Syncer<D> {
    pub fn new(feed: Feed, dataplane: D, node: model::Node, observers: Observers) -> Syncer<D> {
        Syncer {
            observers,
            health_check_errors: None,
            observed_triggers: HashMap::new(),
            failed: None,
            report: ApplyReport::default(),
            reported_warnings: Vec::new(),
            node_eligible: true,
            unobserved_triggers: Vec::new(),
            full_resync: false,
            feed,
            dataplane,
            node,
            generation: 0,
            applied: None,
            warned_node_name: false,
            last_sync: None,
        }
    }

    /// The dataplane, to clean up at exit.
    pub fn dataplane_mut(&mut self) -> &mut D {
        &mut self.dataplane
    }

    /// True while the last apply failed: sync again soon even without a change.
    pub fn needs_retry(&self) -> bool {
        self.dataplane.needs_retry()
    }

    /// When the next change may be applied: `min_sync_period` after the last sync.
    pub fn next_sync_allowed(&self, min_sync_period: Duration) -> tokio::time::Instant {
        match self.last_sync {
            Some(at) => at + min_sync_period,
            None => tokio::time::Instant::now(),
        }
    }

    /// A change is waiting to be applied: the proxy is unhealthy if it waits too long.
    pub fn queued(&self) {
        self.observers.health.queued();
    }

    /// The periodic resync: as `sync`, and the dataplane may ask to rewrite everything it
    /// owns (`Dataplane::full_resync`), repairing what someone else changed in the kernel.
    pub fn resync(&mut self) -> Outcome {
        self.full_resync |= self.dataplane.full_resync();
        self.sync()
    }

    /// Reads the source and, if the desired state differs from what the dataplane holds (or
    /// the last apply failed), applies it; then brings health and metrics up to date.
    pub fn sync(&mut self) -> Outcome {
        let started = Instant::now();
        self.last_sync = Some(tokio::time::Instant::now());
        if let Some(why) = self.feed.stopped() {
            error!("{why}");
            return Outcome::SourceStopped;
        }
        let retry = self.dataplane.needs_retry() || std::mem::take(&mut self.full_resync);
        let (outcome, mut triggers) = match self.feed.read(self.node.name.as_deref()) {
            None if !retry => (Outcome::Unchanged, None),
            None => match self.failed.take().or_else(|| self.applied.clone()) {
                Some(desired) => (self.apply(desired, started), None),
                None => (Outcome::Unchanged, None),
            },
            Some(objects) => {
                self.note_node(objects.node.as_ref());
                let (desired, warnings) =
                    model::build(&objects.services, &objects.endpoint_slices, &self.node);
                if warnings != self.reported_warnings {
                    for w in &warnings {
                        warn!("{w}");
                    }
                    self.reported_warnings = warnings;
                }
                self.check_node_name(&objects.endpoint_slices);
                let triggers = trigger_times(&objects.endpoint_slices);
                if !retry && self.applied.as_ref() == Some(&desired) {
                    (Outcome::Unchanged, Some(triggers))
                } else {
                    (self.apply(desired, started), Some(triggers))
                }
            }
        };
        let metrics = &self.observers.metrics;
        match outcome {
            Outcome::Failed => {
                metrics.sync_failed(started.elapsed());
                // Nothing new may be queued, but the datapath is behind: if retries keep
                // failing, /healthz must say so after its timeout.
                self.observers.health.queued();
                if let Some(t) = triggers {
                    self.unobserved_triggers = t;
                }
            }
            Outcome::Unchanged | Outcome::Applied(_) => {
                if let Outcome::Applied(report) = outcome {
                    self.report = report;
                }
                // Every successful sync counts, as kube-proxy's: a quiet cluster's last-sync
                // timestamp must not look stale.
                metrics.sync_succeeded(started.elapsed(), &self.report);
                self.observers.health.updated();
                if triggers.is_none() && !self.unobserved_triggers.is_empty() {
                    triggers = Some(std::mem::take(&mut self.unobserved_triggers));
                }
                self.observe_programming(triggers.unwrap_or_default());
            }
            Outcome::SourceStopped => unreachable!("returned above"),
        }
        self.serve_health_checks();
        outcome
    }

    /// Observes the network programming latency of every slice whose trigger time is new
    /// since the last observation and after the agent started (as kube-proxy's endpoints
    /// change tracker does): the change is in the datapath now.
    fn observe_programming(&mut self, triggers: Vec<((String, String), SystemTime)>) {
        if triggers.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let mut observed = HashMap::with_capacity(triggers.len());
        for (slice, at) in triggers {
            let seen = self.observed_triggers.get(&slice) == Some(&at);
            if !seen && at > self.observers.started {
                self.observers.metrics.observe_network_programming(at, now);
            }
            observed.insert(slice, at);
        }
        // Deleted slices are forgotten.
        self.observed_triggers = observed;
    }

    /// Opens, updates and closes the health-check node ports to match what was last applied;
    /// a port that could not be opened is retried here at every sync, and reported when the
    /// set of failures changes.
    fn serve_health_checks(&mut self) {
        let Some(applied) = &self.applied else { return };
        let result = self.observers.service_health.sync(&applied.health_checks);
        let errors = result.err().map(|e| e.to_string());
        if errors != self.health_check_errors {
            match &errors {
                Some(e) => error!("{e}"),
                None if self.health_check_errors.is_some() => {
                    info!("every health-check node port is open")
                }
                None => {}
            }
            self.health_check_errors = errors;
        }
    }

    fn apply(&mut self, desired: DesiredState, started: Instant) -> Outcome {
        match self.dataplane.apply(&desired) {
            Ok(r) => {
                self.generation += 1;
                info!(
                    "synced generation={} service_ports={} backends={} writes={} deletes={} in {:?}",
                    self.generation,
                    r.service_ports,
                    r.backends,
                    r.writes,
                    r.deletes,
                    started.elapsed()
                );
                self.applied = Some(desired);
                self.failed = None;
                Outcome::Applied(r)
            }
            Err(e) => {
                error!("applying the desired state failed: {e:#}");
                // Kept, so a retry without a source change has something to apply; the
                // health-check ports keep answering for what was applied before.
                self.failed = Some(desired);
                Outcome::Failed
            }
        }
    }

    /// Takes the node's zone from its Node object, for topology-aware routing, and whether
    /// it is being taken out of service, for `/healthz`.
    /// A Node that disappears (deleted outright, without a deletion timestamp the agent could
    /// see) keeps its last verdict and zone, as kube-proxy keeps the last Node it saw.
    fn note_node(&mut self, node: Option<&Node>) {
        let Some(node) = node else {
            self.observers.health.set_node_eligible(self.node_eligible);
            return;
        };
        self.node_eligible = node_is_eligible(node);
        self.observers.health.set_node_eligible(self.node_eligible);
        let zone = Some(node)
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|labels| labels.get(LABEL_ZONE))
            .cloned();
        if zone != self.node.zone {
            match &zone {
                Some(z) => info!("this node is in zone {z:?} (label {LABEL_ZONE})"),
                None => info!("this node has no zone (no {LABEL_ZONE} label on its Node object)"),
            }
            self.node.zone = zone;
        }
    }

    /// Warns, once, when endpoints are placed on nodes but none on this one by name: the
    /// likeliest cause is a wrong node name, under which externalTrafficPolicy Local finds no
    /// local endpoints and drops every external packet.
    fn check_node_name(&mut self, slices: &[k8s_openapi::api::discovery::v1::EndpointSlice]) {
        let Some(name) = self.node.name.as_deref() else {
            return;
        };
        let placed: Vec<&str> = slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter_map(|e| e.node_name.as_deref())
            .collect();
        if !self.warned_node_name && !placed.is_empty() && !placed.contains(&name) {
            warn!(
                "no endpoint is on node {name:?} (they name nodes such as {:?}); if this node is one of them, set --node-name or NODE_NAME, or externalTrafficPolicy: Local services drop all their external traffic here",
                placed[0]
            );
            self.warned_node_name = true;
        }
    }
}

/// The trigger time of every slice that carries one, keyed by namespace and name.
fn trigger_times(slices: &[EndpointSlice]) -> Vec<((String, String), SystemTime)> {
    slices
        .iter()
        .filter_map(|slice| {
            let meta = &slice.metadata;
            let stamp = meta.annotations.as_ref()?.get(ANNOTATION_TRIGGER_TIME)?;
            let at = stamp.parse::<k8s_openapi::jiff::Timestamp>().ok()?;
            let key = (meta.namespace.clone()?, meta.name.clone()?);
            Some((key, SystemTime::from(at)))
        })
        .collect()
}

/// When the owner task syncs.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The shortest time between two syncs started by changes.
    pub min_sync_period: Duration,
    /// How long a change is left to settle before it is read (editors write a file in steps).
    pub settle: Duration,
    /// How often everything is re-read anyway.
    pub resync_every: Duration,
    /// How soon a failed apply is tried again.
    pub retry_after: Duration,
}

/// The owner task's loop, after the first sync: syncs on changes (coalesced), every
/// `resync_every`, and soon after a failure, until `stop` completes. Fails when the source
/// can no longer report changes: serving a frozen state as healthy would hide it, and a
/// restarted agent lists everything afresh.
pub async fn drive<D: Dataplane>(
    syncer: &mut Syncer<D>,
    changes: &mut mpsc::Receiver<()>,
    timing: Timing,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut resync = tokio::time::interval(timing.resync_every);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    tokio::pin!(stop);
    // Set while a change waits for its turn: the first change after a quiet spell is applied
    // after `settle`; those that come within `min_sync_period` of a sync, at its end, together.
    let mut pending: Option<tokio::time::Instant> = None;
    loop {
        let due = pending.unwrap_or_else(tokio::time::Instant::now);
        let outcome = tokio::select! {
            change = changes.recv() => {
                if change.is_none() {
                    anyhow::bail!("the source stopped reporting changes (its watch ended)");
                }
                syncer.queued();
                let allowed = syncer.next_sync_allowed(timing.min_sync_period);
                let settled = tokio::time::Instant::now() + timing.settle;
                pending.get_or_insert(allowed.max(settled));
                continue;
            }
            _ = tokio::time::sleep_until(due), if pending.is_some() => {
                pending = None;
                while changes.try_recv().is_ok() {}
                syncer.sync()
            }
            _ = resync.tick() => syncer.resync(),
            // A failed apply (a full map, say) is retried soon, not only at the next resync.
            _ = tokio::time::sleep(timing.retry_after), if syncer.needs_retry() => syncer.sync(),
            () = &mut stop => return Ok(()),
        };
        if outcome == Outcome::SourceStopped {
            anyhow::bail!("the source stopped following the API server");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::serve::health::ProxierHealth;

    /// When each apply happened and the services it was given.
    type Applies = Arc<Mutex<Vec<(tokio::time::Instant, Vec<String>)>>>;

    /// A dataplane that records when it was given which services, and fails when told to.
    struct Recorder {
        applies: Applies,
        fail: Arc<Mutex<bool>>,
        failed: bool,
        /// Asks for a full apply at every periodic resync, as the rule-based dataplanes do.
        full_resyncs: bool,
    }

    impl Dataplane for Recorder {
        fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport> {
            self.failed = *self.fail.lock().unwrap();
            let names = desired.services.keys().map(|n| n.name.clone()).collect();
            self.applies
                .lock()
                .unwrap()
                .push((tokio::time::Instant::now(), names));
            if self.failed {
                anyhow::bail!("told to fail");
            }
            Ok(ApplyReport {
                service_ports: desired.services.len(),
                ..ApplyReport::default()
            })
        }

        fn needs_retry(&self) -> bool {
            self.failed
        }

        fn full_resync(&mut self) -> bool {
            self.full_resyncs
        }

        fn cleanup(&mut self) -> anyhow::Result<()> {
            Ok(())
        }
    }

    fn service(name: &str, octet: u8) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: 10.96.0.{octet}, ports: [{{port: 80}}]}}\n---\n"
        )
    }

    /// Writes services `s0` .. `s<n-1>` into the one manifest file.
    fn write_services(dir: &std::path::Path, n: u8) {
        let text: String = (0..n).map(|i| service(&format!("s{i}"), i + 1)).collect();
        std::fs::write(dir.join("services.yaml"), text).unwrap();
    }

    struct World {
        dir: std::path::PathBuf,
        syncer: Syncer<Recorder>,
        applies: Applies,
        fail: Arc<Mutex<bool>>,
    }

    impl World {
        fn new(test: &str) -> World {
            let dir = std::env::temp_dir().join(format!("lb-sync-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let applies = Arc::default();
            let fail = Arc::default();
            let recorder = Recorder {
                applies: Arc::clone(&applies),
                fail: Arc::clone(&fail),
                failed: false,
                full_resyncs: false,
            };
            let health = ProxierHealth::new(Duration::from_secs(120));
            let observers = Observers {
                service_health: ServiceHealthServers::new(health.clone()),
                health,
                metrics: Arc::new(Metrics::new()),
                started: SystemTime::now(),
            };
            let feed = Feed::dir(ManifestDir::new(&dir).unwrap());
            World {
                syncer: Syncer::new(feed, recorder, model::Node::default(), observers),
                dir,
                applies,
                fail,
            }
        }

        fn write(&self, n: u8) {
            write_services(&self.dir, n);
        }

        fn applies(&self) -> Vec<(tokio::time::Instant, Vec<String>)> {
            self.applies.lock().unwrap().clone()
        }
    }

    impl Drop for World {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const TIMING: Timing = Timing {
        min_sync_period: Duration::from_secs(1),
        settle: Duration::from_millis(20),
        resync_every: Duration::from_secs(60),
        retry_after: Duration::from_secs(2),
    };

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_applied_once_and_a_lone_change_at_once() {
        let mut world = World::new("burst");
        world.write(1);
        let t0 = tokio::time::Instant::now();
        assert!(matches!(world.syncer.sync(), Outcome::Applied(_)));
        let (tx, mut rx) = mpsc::channel(1);
        let dir = world.dir.clone();
        let script = async {
            // A change after a quiet spell: applied after the settle time only.
            tokio::time::sleep(Duration::from_secs(5)).await;
            write_services(&dir, 2);
            let _ = tx.try_send(());
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Nine more, 10 ms apart, within the minimum sync period of that sync.
            for n in 3..=11u8 {
                write_services(&dir, n);
                let _ = tx.try_send(());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        drive(&mut world.syncer, &mut rx, TIMING, script)
            .await
            .unwrap();

        let applies = world.applies();
        let at: Vec<Duration> = applies.iter().map(|(t, _)| *t - t0).collect();
        let sizes: Vec<usize> = applies.iter().map(|(_, s)| s.len()).collect();
        assert_eq!(sizes, [1, 2, 11], "applies at {at:?}");
        assert_eq!(
            at[1],
            Duration::from_millis(5_020),
            "a lone change waits only to settle"
        );
        assert_eq!(
            at[2],
            Duration::from_millis(6_020),
            "the burst waits for the minimum period after the last sync, then goes at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_apply_is_retried_without_a_change_and_resyncs_skip_unchanged_states() {
        let mut world = World::new("retry");
        world.write(2);
        *world.fail.lock().unwrap() = true;
        let t0 = tokio::time::Instant::now();
        assert_eq!(world.syncer.sync(), Outcome::Failed);
        assert!(world.syncer.needs_retry());
        let fail = Arc::clone(&world.fail);
        let (_tx, mut rx) = mpsc::channel(1);
        let script = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            *fail.lock().unwrap() = false;
            // Two resync periods: nothing changed, so nothing is applied again.
            tokio::time::sleep(Duration::from_secs(125)).await;
        };
        drive(&mut world.syncer, &mut rx, TIMING, script)
            .await
            .unwrap();
        let applies = world.applies();
        let at: Vec<Duration> = applies.iter().map(|(t, _)| *t - t0).collect();
        assert_eq!(
            at,
            [0, 2, 4].map(Duration::from_secs),
            "failed at 0 and 2 s, retried every 2 s until it worked at 4 s; no apply since"
        );
        assert!(applies.iter().all(|(_, s)| s.len() == 2));
        assert!(!world.syncer.needs_retry());
        let page = world.syncer.observers.metrics.encode().unwrap();
        let count = |name: &str| -> f64 {
            let line = page.lines().find(|l| l.starts_with(name));
            line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{page}"))
        };
        assert_eq!(
            count("lbagent_sync_proxy_rules_duration_seconds_count"),
            5.0,
            "every sync is observed: 2 failed, 1 applied, 2 resyncs that changed nothing"
        );
        assert_eq!(count("lbagent_sync_proxy_rules_failures_total"), 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dataplane_that_asks_for_full_resyncs_gets_an_apply_at_every_resync() {
        let mut world = World::new("full-resync");
        world.syncer.dataplane.full_resyncs = true;
        world.write(1);
        let t0 = tokio::time::Instant::now();
        assert!(matches!(world.syncer.sync(), Outcome::Applied(_)));
        let (_tx, mut rx) = mpsc::channel(1);
        let script = tokio::time::sleep(Duration::from_secs(125));
        drive(&mut world.syncer, &mut rx, TIMING, script)
            .await
            .unwrap();
        let at: Vec<Duration> = world.applies().iter().map(|(t, _)| *t - t0).collect();
        assert_eq!(
            at,
            [0, 60, 120].map(Duration::from_secs),
            "nothing changed, yet each resync rewrote the rules"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_fails_when_the_source_stops_reporting_changes() {
        let mut world = World::new("stopped");
        world.write(1);
        world.syncer.sync();
        let (tx, mut rx) = mpsc::channel(1);
        drop(tx);
        let stop = tokio::time::sleep(Duration::from_secs(3600));
        let err = drive(&mut world.syncer, &mut rx, TIMING, stop)
            .await
            .expect_err("a closed change channel must end the loop");
        assert!(err.to_string().contains("stopped"), "{err}");
    }

    #[test]
    fn a_node_that_disappears_keeps_its_last_verdict_and_zone() {
        let mut world = World::new("node");
        let node = |taint: bool| -> Node {
            let taints = if taint {
                "  taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]\n"
            } else {
                ""
            };
            serde_yaml::from_str(&format!(
                "metadata:\n  name: n\n  labels: {{{LABEL_ZONE}: z1}}\nspec:\n{taints}"
            ))
            .unwrap()
        };
        world.syncer.note_node(Some(&node(false)));
        assert!(world.syncer.node_eligible);
        assert_eq!(world.syncer.node.zone.as_deref(), Some("z1"));
        world.syncer.note_node(Some(&node(true)));
        assert!(!world.syncer.node_eligible, "tainted for deletion");
        world.syncer.note_node(None);
        assert!(
            !world.syncer.node_eligible,
            "deleted outright: still not eligible, so load balancers keep away"
        );
        assert_eq!(world.syncer.node.zone.as_deref(), Some("z1"));
    }
}
