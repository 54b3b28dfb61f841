//! `podmig node`: the per-node daemon. It mirrors kubelet's pod sync loop (one worker per
//! Pod on this node, fed by a watch of the API server, by `podmig-runc`'s runtime hook and
//! by the HTTP API), keeps the moves in flight in a migration manager, and carries
//! checkpoints to and from the other nodes' daemons.
//!
//! The adapters translate, the workers decide:
//! - [`hook`]: `podmig-runc`'s create/kill/restored events → Pod updates;
//! - [`cri`]: the CRI checkpoint/restore extension (gRPC, unix socket) → Pod updates;
//! - [`http`]: `POST /migrate/{uid}` and friends (HTTPS, authenticated) → Pod updates or
//!   `Migration` objects; [`auth`] checks every caller with TokenReview and
//!   SubjectAccessReview;
//! - [`watch`]: the Pods bound to this node → Pod updates;
//! - [`podsync`]: the Pod workers; [`state`]: one container's place in a move;
//!   [`migration`]: the moves in flight; [`transfer`] and [`peer`]: the data path;
//!   [`recovery`]: sources a crashed run left frozen.

pub mod auth;
pub mod capabilities;
pub mod cri;
pub mod estimate;
pub mod group;
pub mod hook;
pub mod http;
pub mod janitor;
pub mod journal;
pub mod metrics;
pub mod migration;
pub mod peer;
pub mod podsync;
pub mod recovery;
pub mod report;
pub mod state;
pub mod stream;
pub mod tls;
pub mod transfer;
pub mod trust;
pub mod watch;

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender};
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod};
use podmig_api::{contract::DaemonPhase, v1alpha1::MigrationReport};
use podmig_cri_ext::engine::{CheckpointEngine, Runc};
use tokio::net::UnixListener;

use crate::{Error, Result, config::NodeConfig, store::CheckpointStore};

pub use podsync::PodUpdate;

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
    workers: Mutex<HashMap<String, Sender<PodUpdate>>>,
    /// The Pods bound to this node, by uid (the watch's cache).
    pub(crate) pods: Mutex<HashMap<String, Pod>>,
    /// Target Pods whose move a restart settled as failed: their containers' retried
    /// creates are refused, never turned into a second move.
    pub(crate) failed_targets: Mutex<std::collections::HashSet<String>>,
    /// Whether lazy moves are possible here (found at start; unknown in unit tests).
    pub lazy: std::sync::OnceLock<capabilities::LazySupport>,
    /// Lazy moves' page servers on this (source) node, by move id: the tunnel endpoint
    /// connects the target to them.
    pub(crate) page_servers: Mutex<HashMap<String, Arc<podmig_cri_ext::lazy::PageServer>>>,
    /// Streamed full moves this (target) node expects page streams for, by move id.
    pub(crate) page_sinks: Mutex<HashMap<String, Arc<stream::Sink>>>,
    /// The rates of full moves towards each target node, for `strategy: auto`.
    pub(crate) learned: estimate::Learned,
    pub(crate) rt: tokio::runtime::Handle,
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
            failed_targets: Mutex::default(),
            lazy: std::sync::OnceLock::new(),
            page_servers: Mutex::default(),
            page_sinks: Mutex::default(),
            learned: estimate::Learned::default(),
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

    /// Hands `update` to the worker of Pod `uid`, starting one when there is none.
    pub fn dispatch(self: &Arc<Self>, uid: &str, update: PodUpdate) {
        let mut workers = lock(&self.workers);
        let update = match workers.get(uid) {
            Some(tx) => match tx.send(update) {
                Ok(()) => return,
                Err(crossbeam_channel::SendError(u)) => u,
            },
            None => update,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let _ = tx.send(update);
        workers.insert(uid.to_owned(), tx);
        podsync::PodWorker::spawn(self.clone(), uid.to_owned(), rx);
    }

    /// A worker whose Pod is gone asks to end; refused while updates wait for it.
    pub(crate) fn retire_worker(&self, uid: &str, rx: &Receiver<PodUpdate>) -> bool {
        let mut workers = lock(&self.workers);
        if !rx.is_empty() {
            return false;
        }
        workers.remove(uid);
        true
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
        self.rt.spawn(async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot record event");
            }
        });
    }

    /// The address other daemons reach node `name`'s daemon at (its InternalIP).
    pub(crate) fn node_address(&self, name: &str) -> std::result::Result<String, String> {
        let client = self
            .kube
            .clone()
            .ok_or("no API access to look up the source node")?;
        let api: kube::Api<KubeNode> = kube::Api::all(client);
        let node = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), api.get(name)).await })
            .map_err(|_| format!("looking up node {name}: timed out"))?
            .map_err(|e| format!("looking up node {name}: {e}"))?;
        node.status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .ok_or_else(|| format!("node {name} has no InternalIP address"))
    }

    /// The cached Pod with `uid`, if it is bound to this node.
    pub fn pod(&self, uid: &str) -> Option<Pod> {
        lock(&self.pods).get(uid).cloned()
    }
}

fn bind(path: &Path) -> Result<UnixListener> {
    let err = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

async fn kube_client(
    cfg: &NodeConfig,
) -> Result<Option<(kube::Client, Option<peer::TokenSource>)>> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                Error::InvalidRequest(format!("kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::InvalidRequest(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => return Ok(None),
        },
    };
    let token = peer::TokenSource::from_config(&config);
    let client =
        kube::Client::try_from(config).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    Ok(Some((client, token)))
}

/// Runs the node daemon until `shutdown` resolves.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    podmig_cri_ext::engine::create_private_dir(&cfg.checkpoint_dir)?;
    let engine = Runc {
        binary: cfg.runc_binary.clone(),
        root: cfg.runc_root.clone(),
    };
    let settings = Settings {
        node_name: cfg.node_name.clone().unwrap_or_default(),
        runc_root: cfg.runc_root.clone(),
        hold: Duration::from_millis(cfg.kill_hold_ms),
        state_dir: cfg.state_dir.clone(),
        checkpoint_budget: cfg.checkpoint_budget_mib << 20,
    };
    let mut node = Node::new(engine, CheckpointStore::new(&cfg.checkpoint_dir), settings)?;
    let kube = kube_client(&cfg).await?;
    if let Some((client, token)) = &kube {
        node = node.with_kube(client.clone());
        match (&cfg.tls_ca, token) {
            (Some(ca), Some(token)) => {
                let pem = std::fs::read(ca).map_err(|source| Error::Listen {
                    path: ca.clone(),
                    source,
                })?;
                let peers = peer::PeerClient::new(&pem, token.clone(), cfg.peer_port)
                    .map_err(|e| Error::InvalidRequest(format!("{}: {e}", ca.display())))?;
                node = node.with_peers(peers);
            }
            _ => tracing::warn!("no --tls-ca or no token: moves from other nodes are not possible"),
        }
    }
    let lazy = tokio::task::spawn_blocking(capabilities::probe)
        .await
        .unwrap_or_else(|e| capabilities::LazySupport::Impossible(e.to_string()));
    tracing::info!(lazy_possible = lazy.possible(), "{lazy}");
    node.metrics.lazy_possible.set(i64::from(lazy.possible()));
    let _ = node.lazy.set(lazy);
    let node = Arc::new(node);
    let hook = bind(&cfg.hook_socket)?;
    let api = bind(&cfg.api_socket)?;
    // Sources a crashed run left frozen are settled before anything else moves.
    recovery::run(node.clone()).await;
    let mut tasks = vec![
        tokio::spawn(podmig_cri_ext::hook::serve(
            hook,
            Arc::new(hook::NodeHook(node.clone())),
        )),
        tokio::spawn(janitor::run(node.clone())),
    ];
    if node.kube.is_some() {
        if node.settings.node_name.is_empty() {
            tracing::warn!("no --node-name: the daemon does not watch its Pods");
        } else {
            tasks.push(tokio::spawn(watch::run(node.clone())));
        }
    }
    let serving = match (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca, &cfg.tls_ca_key) {
        (Some(cert), Some(key), _, _) => Some((cert.clone(), key.clone())),
        (None, None, Some(ca), Some(ca_key)) => {
            let mut sans = vec![node.settings.node_name.clone()];
            if !node.settings.node_name.is_empty() {
                let n = node.clone();
                let name = node.settings.node_name.clone();
                match tokio::task::spawn_blocking(move || n.node_address(&name)).await {
                    Ok(Ok(ip)) => sans.insert(0, ip),
                    other => tracing::warn!(
                        ?other,
                        "cannot learn this node's address for its certificate"
                    ),
                }
            }
            let issued = tls::issue(ca, ca_key, &sans, &cfg.state_dir.join("tls"))?;
            tracing::info!(names = ?sans, "issued this node's serving certificate from the daemon CA");
            Some(issued)
        }
        _ => None,
    };
    let http = match (&serving, &node.kube) {
        (Some((cert, key)), Some(_)) => {
            let server = http::serve(node.clone(), cfg.listen, cert, key).await?;
            tracing::info!(listen = %cfg.listen, "migration API listening (HTTPS)");
            Some(server)
        }
        _ => {
            tracing::warn!("no --tls-cert/--tls-key or no API access: the HTTP API is off");
            None
        }
    };
    tracing::info!(node = %node.settings.node_name, hook = %cfg.hook_socket.display(),
        api = %cfg.api_socket.display(), runc_root = %cfg.runc_root.display(), "podmig node daemon ready");
    let served = tonic::transport::Server::builder()
        .add_service(podmig_cri_ext::proto::runtime::v1::checkpoint_service_server::CheckpointServiceServer::new(
            cri::CheckpointApi(node.clone()),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(api),
            shutdown,
        )
        .await;
    if let Some(h) = http {
        h.shutdown();
    }
    for t in tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.hook_socket);
    let _ = std::fs::remove_file(&cfg.api_socket);
    served.map_err(Error::from)
}

#[cfg(test)]
mod tests;
