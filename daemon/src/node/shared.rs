//! The daemon's shared state ([`Node`]): settings, engine, store, journal, the moves in
//! flight, the API client and the Pods' cache — what the workers and adapters all use.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use crossbeam_channel::Sender;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use podmig_api::{contract::DaemonPhase, v1alpha1::MigrationReport};
use podmig_cri_ext::engine::CheckpointEngine;

use crate::{Error, Result, store::CheckpointStore};

use super::{capabilities, estimate, journal, metrics, migration, orders::PodUpdate, peer, report};

/// What the daemon is told about its place.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name (empty when unknown: no cross-node moves).
    pub node_name: String,
    /// runc state root of the runtime's containers.
    pub runc_root: PathBuf,
    /// Upper bound of a held kill or create without a deadline of its own.
    pub hold: Duration,
    /// The daemon's state on the node's disk (the move journal).
    pub state_dir: PathBuf,
    /// Checkpoint bytes the node may hold at once.
    pub checkpoint_budget: u64,
    /// A move's bandwidth cap towards its target, MiB/s (0: none).
    pub move_bandwidth_mibps: u64,
    /// The kubelet's runtime request timeout: how long it waits on a target's create.
    pub runtime_request_timeout: Duration,
}

/// How long a target's held create may wait for its checkpoint: the kubelet's runtime
/// request timeout less a quarter of it (at most 15 s), kept for the restore itself.
pub fn create_share(runtime_request_timeout: Duration) -> Duration {
    let kept = (runtime_request_timeout / 4).min(Duration::from_secs(15));
    runtime_request_timeout.saturating_sub(kept)
}

/// The daemon's shared state: everything the workers and adapters use.
pub struct Node<E> {
    /// Settings.
    pub settings: Settings,
    pub(crate) engine: Arc<E>,
    pub(crate) store: CheckpointStore,
    pub(crate) journal: journal::Journal,
    /// The moves of this node.
    pub manager: migration::Manager,
    /// Metrics.
    pub metrics: metrics::Metrics,
    pub(crate) kube: Option<kube::Client>,
    pub(crate) reporter: Option<report::PodReporter>,
    pub(crate) peers: Option<peer::PeerClient>,
    /// The Pod workers' queues, by Pod uid.
    pub(crate) workers: Mutex<HashMap<String, Sender<PodUpdate>>>,
    /// The Pods bound to this node, by uid (the watch's cache).
    pub(crate) pods: Mutex<HashMap<String, Pod>>,
    /// Whether lazy moves are possible here (found at start; unknown in unit tests).
    pub lazy: std::sync::OnceLock<capabilities::LazySupport>,
    /// The rates of full moves towards each target node, for `strategy: auto`.
    pub(crate) learned: estimate::Learned,
    /// Page streams still arriving into the store, counted against its budget.
    pub(crate) in_flight: Arc<super::janitor::InFlight>,
    /// The daemon's async runtime: reached from a worker's thread only through
    /// [`Node::wait_on`] and [`Node::start_async`].
    rt: tokio::runtime::Handle,
}

/// Why another node's daemon cannot be addressed.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// Without API access no node can be looked up.
    #[error("no API access to look up the source node")]
    NoApi,
    /// The API server did not answer in time.
    #[error("looking up node {0}: timed out")]
    TimedOut(String),
    /// The API server refused or failed.
    #[error("looking up node {node}: {source}")]
    Api {
        /// The node.
        node: String,
        /// Why.
        source: kube::Error,
    },
    /// The lookup did not finish (its task was cancelled or panicked).
    #[error("looking up the node: {0}")]
    Interrupted(String),
    /// The node has no address to reach it at.
    #[error("node {0} has no InternalIP address")]
    NoInternalIp(String),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a single insert or remove.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<E: CheckpointEngine> Node<E> {
    /// A daemon using `engine` and `store`, without API access (no watch, no reports, no
    /// peers). Must be called within a tokio runtime.
    pub fn new(engine: E, store: CheckpointStore, settings: Settings) -> Result<Self> {
        let journal =
            journal::Journal::open(&settings.state_dir).map_err(|source| Error::State {
                path: settings.state_dir.clone(),
                source,
            })?;
        Ok(Self {
            settings,
            engine: Arc::new(engine),
            store,
            journal,
            manager: migration::Manager::default(),
            metrics: metrics::Metrics::default(),
            kube: None,
            reporter: None,
            peers: None,
            workers: Mutex::default(),
            pods: Mutex::default(),
            lazy: std::sync::OnceLock::new(),
            learned: estimate::Learned::default(),
            in_flight: Arc::default(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    /// Uses `client` for the watch, the progress reports and the peers' addresses.
    pub fn with_kube(mut self, client: kube::Client) -> Self {
        self.reporter = Some(report::PodReporter::new(client.clone()));
        self.kube = Some(client);
        self
    }

    /// Calls other nodes' daemons with `peers`.
    pub fn with_peers(mut self, peers: peer::PeerClient) -> Self {
        self.peers = Some(peers);
        self
    }

    /// Why a lazy move cannot be made on this node, if it cannot.
    pub(crate) fn lazy_impossible(&self) -> Option<String> {
        match self.lazy.get() {
            Some(l) if l.possible() => None,
            Some(l) => Some(format!("node {}: {l}", self.settings.node_name)),
            None => Some(format!(
                "node {}: lazy support not probed",
                self.settings.node_name
            )),
        }
    }

    pub(crate) fn report_phase(&self, ns: &str, pod: &str, phase: DaemonPhase) {
        if let Some(r) = &self.reporter {
            r.phase(ns, pod, phase);
        }
    }

    /// Writes the phase `Restored` on target Pod `ns/pod` and waits until it landed on the
    /// API server, at most until `by`; false when it did not (or there is no API access).
    pub(crate) fn report_restored_by(&self, ns: &str, pod: &str, by: std::time::Instant) -> bool {
        let Some(r) = &self.reporter else {
            return false;
        };
        let landed = r.restored(ns, pod);
        self.wait_on(async {
            matches!(
                tokio::time::timeout_at(by.into(), landed).await,
                Ok(Ok(true))
            )
        })
    }

    pub(crate) fn report_done(&self, ns: &str, pod: &str, report: &MigrationReport) {
        if let Some(r) = &self.reporter {
            r.done(ns, pod, report);
        }
    }

    /// Records a Warning Event on Pod `ns/pod` (as `podmig-node` on this node), in the
    /// background; nothing without API access.
    pub(crate) fn event_on_pod(&self, ns: &str, pod: &str, reason: &'static str, note: &str) {
        use kube::runtime::events::{Event, EventType, Recorder, Reporter};
        let Some(client) = self.kube.clone() else {
            return;
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(ns.into()),
            name: Some(pod.into()),
            uid: lock(&self.pods)
                .values()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(ns)
                        && p.metadata.name.as_deref() == Some(pod)
                })
                .and_then(|p| p.metadata.uid.clone()),
            ..Default::default()
        };
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "podmig-node".into(),
                instance: Some(self.settings.node_name.clone()),
            },
        );
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.chars().take(1024).collect()),
            action: reason.into(),
            secondary: None,
        };
        self.start_async(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot record event");
            }
        });
    }

    /// The address other daemons reach node `name`'s daemon at (its InternalIP).
    pub(crate) fn node_address(&self, name: &str) -> std::result::Result<String, AddressError> {
        let client = self.kube.clone().ok_or(AddressError::NoApi)?;
        let api: kube::Api<KubeNode> = kube::Api::all(client);
        let node = self
            .wait_on(async { tokio::time::timeout(Duration::from_secs(5), api.get(name)).await })
            .map_err(|_| AddressError::TimedOut(name.to_owned()))?
            .map_err(|source| AddressError::Api {
                node: name.to_owned(),
                source,
            })?;
        node.status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .ok_or_else(|| AddressError::NoInternalIp(name.to_owned()))
    }

    /// The one crossing from a Pod worker's (blocking) thread into async code: runs `fut` on
    /// the daemon's runtime and waits for its output. Workers are threads because dumps and
    /// restores are blocking runc/CRIU calls; everything that talks to the network (peers,
    /// the API server) is async. Never called from async code (it would block the runtime);
    /// async code reaches a worker only with a [`super::orders::PodUpdate`] and awaits its
    /// oneshot answer, and hands its own blocking work to `spawn_blocking`.
    pub(crate) fn wait_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    /// Starts `fut` on the daemon's runtime from a worker's thread without waiting (a page
    /// tunnel, an Event).
    pub(crate) fn start_async<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(fut);
    }

    /// The runtime, for a component that runs its own task on it (a page stream's carrier).
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// The cached Pod with `uid`, if it is bound to this node.
    pub fn pod(&self, uid: &str) -> Option<Pod> {
        lock(&self.pods).get(uid).cloned()
    }
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn a_held_create_leaves_a_quarter_of_the_kubelets_timeout_at_most_15_s() {
        let s = |t| create_share(Duration::from_secs(t)).as_secs();
        assert_eq!(s(120), 105, "kubelet's default: 15 s kept for the restore");
        assert_eq!(s(8), 6, "a short timeout keeps a quarter");
        assert_eq!(s(40), 30);
        assert_eq!(s(600), 585);
    }
}
