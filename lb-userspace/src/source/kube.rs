//! `--source kube`: Services, EndpointSlices and this node's Node, watched on the API server.
//!
//! Three reflectors (list, then watch from the list's resourceVersion, with watch bookmarks so a
//! resumed watch starts from a recent version) keep one in-memory store per kind:
//! - Services and EndpointSlices in every namespace, selected by `!service.kubernetes.io/headless`
//!   as kube-proxy selects them: the endpoints controller puts that label on the slices of
//!   headless services, which no service proxy programs, and on large clusters they are many.
//!   Services labelled for another proxy (`service.kubernetes.io/service-proxy-name`) are not
//!   excluded here, because which proxy name is ours is the model's decision (`--service-proxy-name`).
//! - This node's own Node, selected by `metadata.name=<node name>`: the model reads its zone
//!   label for topology-aware hints. Without a node name there is no Node watch.
//!
//! A store is replaced only by a complete list and then changed only by watch events, so while
//! the API server cannot be reached the last good objects keep being served: errors are
//! logged (each distinct one once per run of failures), retried with kube-runtime's default
//! backoff (0.8 s doubling to 30 s, with jitter), and a watch whose resourceVersion expired
//! (410 Gone) lists again, with the old objects served until the new list is complete.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use ::kube::{
    api::Api,
    config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher::{self, DefaultBackoff},
        WatchStreamExt,
    },
    Client, Config, Resource, ResourceExt,
};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use log::{debug, info, warn};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

use super::Objects;
use crate::model::LABEL_HEADLESS;

#[cfg(test)]
mod tests;

/// The objects the agent reads, kept in step with the API server by watcher tasks that run
/// until this is dropped.
#[derive(Debug)]
pub struct KubeSource {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    /// `None` when the node name is unknown: then no Node is watched.
    node: Option<Store<Node>>,
    tasks: Vec<JoinHandle<()>>,
}

/// A watch task ended before its store completed a first list. The tasks run until the
/// [`KubeSource`] is dropped, so this means one panicked.
#[derive(Debug, thiserror::Error)]
#[error("the {what} watch task ended before its first list completed (it panicked; see above)")]
pub struct WatchStopped {
    pub what: String,
}

/// Why no client for the API server could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no --kubeconfig given, and this process is not in a pod with a service account \
         ({source}); pass --kubeconfig PATH, or run the agent in a pod"
    )]
    InCluster { source: InClusterError },
    #[error("cannot use the kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error("cannot build a Kubernetes client from {origin}: {source}")]
    Build {
        /// "the pod's service account" or the kubeconfig path.
        origin: String,
        source: ::kube::Error,
    },
}

/// A client for the API server: the pod's service account (in-cluster configuration, as a
/// DaemonSet runs the agent) when `kubeconfig` is `None`, else that kubeconfig file's current
/// context. Must be called on a tokio runtime, which the client's connection task runs on.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let (config, origin) = match kubeconfig {
        None => (
            Config::incluster().map_err(|source| ClientError::InCluster { source })?,
            "the pod's service account".to_owned(),
        ),
        Some(path) => {
            let kubeconfig_error = |source| ClientError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?;
            (config, path.display().to_string())
        }
    };
    Client::try_from(config).map_err(|source| ClientError::Build { origin, source })
}

/// The label selector of both the Service and the EndpointSlice watch, as kube-proxy's.
fn not_headless() -> String {
    format!("!{LABEL_HEADLESS}")
}

impl KubeSource {
    /// Starts the watches on the current tokio runtime and returns at once. Each change to a
    /// store (a completed list, an added, modified or deleted object) sends a `()` on the
    /// returned channel; it holds one, so a burst of changes collapses into one wake-up, after
    /// which [`snapshot`](Self::snapshot) shows them all. The channel closes when this is
    /// dropped.
    pub fn start(client: Client, node_name: Option<&str>) -> (KubeSource, mpsc::Receiver<()>) {
        let (changes_tx, changes) = mpsc::channel(1);
        let mut tasks = Vec::new();
        let label_selector = not_headless();

        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&label_selector),
            "Services".to_owned(),
            None,
            changes_tx.clone(),
            &mut tasks,
        );
        let endpoint_slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&label_selector),
            "EndpointSlices".to_owned(),
            None,
            changes_tx.clone(),
            &mut tasks,
        );
        let node = node_name.map(|name| {
            spawn_reflector(
                Api::<Node>::all(client),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
                format!("Node {name}"),
                Some(format!(
                    "no Node named {name:?} exists: topology-aware hints are ignored until it \
                     does (is the node name, --node-name or $NODE_NAME, the Node object's name?)"
                )),
                changes_tx,
                &mut tasks,
            )
        });
        let source = KubeSource {
            services,
            endpoint_slices,
            node,
            tasks,
        };
        (source, changes)
    }

    /// Resolves once every store has completed its first list. Until then a snapshot may be
    /// missing objects that exist, so the agent must not program the datapath from one (it
    /// would delete services that are there). While the API server cannot be reached this
    /// waits, and the watch tasks log why.
    pub async fn ready(&self) -> Result<(), WatchStopped> {
        let stopped = |what: &str| WatchStopped {
            what: what.to_owned(),
        };
        self.services
            .wait_until_ready()
            .await
            .map_err(|_| stopped("Services"))?;
        self.endpoint_slices
            .wait_until_ready()
            .await
            .map_err(|_| stopped("EndpointSlices"))?;
        if let Some(node) = &self.node {
            node.wait_until_ready().await.map_err(|_| stopped("Node"))?;
        }
        Ok(())
    }

    /// Why the watches can no longer follow the API server, if one of their tasks ended
    /// (they run until this is dropped, so it panicked).
    pub fn stopped(&self) -> Option<String> {
        let ended = self.tasks.iter().filter(|t| t.is_finished()).count();
        (ended > 0).then(|| {
            format!("{ended} of the API-server watch tasks ended (a panic, logged above): this agent no longer sees changes")
        })
    }

    /// The objects as the stores hold them now: Services and EndpointSlices sorted by
    /// namespace and name, and this node's Node if it is watched and exists.
    pub fn snapshot(&self) -> Objects {
        Objects {
            services: sorted(self.services.state()),
            endpoint_slices: sorted(self.endpoint_slices.state()),
            node: self
                .node
                .as_ref()
                .and_then(|store| store.state().into_iter().next())
                .map(Arc::unwrap_or_clone),
        }
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn sorted<K: ResourceExt + Clone>(objects: Vec<Arc<K>>) -> Vec<K> {
    let mut objects: Vec<K> = objects.into_iter().map(Arc::unwrap_or_clone).collect();
    objects.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    objects
}

/// Spawns the task that keeps a new store of `K` in step with `api` and returns the store.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: String,
    if_empty: Option<String>,
    changes: mpsc::Sender<()>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    tasks.push(tokio::spawn(reflect(
        api, config, writer, what, if_empty, changes,
    )));
    store
}

/// Runs a watcher into `writer`, forever: kube-runtime's watcher lists, watches, resumes from
/// the last resourceVersion (bookmarks included) and lists again after a 410 Gone event, all
/// with backoff after errors; this adds the logging, the change notifications, and a restart for
/// the one case the watcher retries without end (below). The store is written only here and
/// only through `apply_watcher_event`, which swaps a new list in whole once it is complete.
async fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    mut writer: Writer<K>,
    what: String,
    if_empty: Option<String>,
    changes: mpsc::Sender<()>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let store = writer.as_reader();
    let mut health = Health::default();
    let mut warned_empty = false;
    // Whether a list has completed: before, there is nothing to serve, and the agent waits.
    let mut listed = false;
    // Paces restarts, so an API server that answers every watch with 410 is not hammered.
    let mut restart_backoff = DefaultBackoff::default();
    loop {
        let mut events = pin!(watcher::watcher(api.clone(), config.clone()).default_backoff());
        loop {
            let Some(event) = events.next().await else {
                // The default backoff never gives up, so the stream never ends; if it does,
                // start over rather than serve a store nothing updates.
                warn!("{what}: the watch stream ended; starting it again");
                break;
            };
            match event {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    listed |= matches!(event, watcher::Event::InitDone);
                    let (answered, changed) = match &event {
                        // Emitted before the list request is made: proves nothing yet.
                        watcher::Event::Init => (false, false),
                        // The list's objects go to a buffer until the list is complete.
                        watcher::Event::InitApply(_) => (true, false),
                        watcher::Event::InitDone
                        | watcher::Event::Apply(_)
                        | watcher::Event::Delete(_) => (true, true),
                    };
                    if answered {
                        if let Some(error) = health.on_success() {
                            info!("{what}: the watch works again (it failed with: {error})");
                        }
                    }
                    if changed {
                        // Full means a wake-up is already pending: it will see this change
                        // too. Closed means nobody listens any more; the store is still read.
                        let _ = changes.try_send(());
                        if let Some(note) = &if_empty {
                            let empty = store.is_empty();
                            if empty && !warned_empty {
                                warn!("{note}");
                            }
                            warned_empty = empty;
                        }
                    }
                }
                Err(error) => {
                    match health.on_error(&error) {
                        Note::Gone => info!(
                            "{what}: the API server no longer has the resourceVersion the \
                             watch was at (410 Gone: {error}); listing again, serving the \
                             current {what} meanwhile"
                        ),
                        Note::Warn if listed => warn!(
                            "{what}: {error}; serving the last {what} seen until the watch \
                             works again, retrying with backoff"
                        ),
                        Note::Warn => warn!(
                            "{what}: {error}; none known until a first list completes, \
                             retrying with backoff"
                        ),
                        Note::Repeat => debug!("{what}: still failing: {error}"),
                    }
                    if is_gone_at_watch_start(&error) {
                        // kube-runtime's watcher keeps its resourceVersion after a failed
                        // watch start, so it would retry this expired one for ever (see
                        // kube-rs#1042): start a new watcher, which lists first. The store
                        // keeps its objects until that list completes.
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(restart_backoff.next().unwrap_or(Duration::from_secs(30))).await;
    }
}

/// An HTTP 410 in answer to a watch request. API servers usually send 410 as an ERROR event
/// in an open watch, which the watcher handles by listing again; but a watch request can also
/// be refused with a 410 status (an API server whose watch cache is behind, a proxy in between).
fn is_gone_at_watch_start(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(::kube::Error::Api(status)) if status.code == 410)
}

/// Whether an error is the API server saying "your resourceVersion is too old" (410 Gone): an
/// ordinary event of long watches, answered by listing again, not a failure.
fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(::kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(::kube::Error::Api(status))
        | watcher::Error::WatchFailed(::kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// One watch's run of failures, so that each problem is logged once rather than at every
/// retry, and its end is logged too. The end is seen at the next answer the watcher reports:
/// a list, or an event in a watch. A watch that reconnects reports nothing until its first
/// event, so on a quiet cluster "works again" can come well after the reconnection.
#[derive(Debug, Default)]
struct Health {
    /// The last error logged as a warning, while the watch has not worked since.
    failing: Option<String>,
}

/// How to log a watch error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Note {
    /// The resourceVersion expired: routine, the watcher lists again.
    Gone,
    /// A new problem: a warning.
    Warn,
    /// The same problem as the last warning, at the next retry: debug only.
    Repeat,
}

impl Health {
    fn on_error(&mut self, error: &watcher::Error) -> Note {
        if is_gone(error) {
            return Note::Gone;
        }
        let text = error.to_string();
        if self.failing.as_ref() == Some(&text) {
            return Note::Repeat;
        }
        self.failing = Some(text);
        Note::Warn
    }

    /// Records an answer from the API server; returns the error it ends, if the watch was
    /// failing.
    fn on_success(&mut self) -> Option<String> {
        self.failing.take()
    }
}
