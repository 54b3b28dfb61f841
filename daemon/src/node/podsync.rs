//! The Pod workers, mirroring kubelet's pod sync loop: one thread per Pod applies that
//! Pod's updates one at a time, in order — the API server's view of it, the runtime's
//! create/kill/restored events from `podmig-runc`, and moves. A move of a source Pod
//! (thesis §5.5.3) takes the first channel back to its requester once the checkpoint
//! exists, then blocks on a second channel until the target's verdict: meanwhile nothing
//! else — a restart, a kill — touches the Pod; those updates wait in its queue.
//!
//! Workers are threads because dumps and restores are blocking calls to runc; the async
//! side hands them updates through `crossbeam-channel` and awaits `tokio` oneshot answers.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use k8s_openapi::api::core::v1::Pod;
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_MIGRATION_DEADLINE, ANNOTATION_MIGRATION_ID,
    ANNOTATION_MIGRATION_PHASE, ANNOTATION_MIGRATION_STRATEGY, ANNOTATION_SOURCE_NODE,
    REASON_MIGRATED,
    contract::DaemonPhase,
    nodeapi::{CompleteRequest, Handover, MigrateRequest, MoveInfo},
    v1alpha1::{MigrationReport, Strategy},
};
use podmig_cri_ext::{
    engine::{CheckpointEngine, CheckpointOptions, CheckpointReport, dir_size},
    identity::{find_container, running_containers},
    lazy::{LazyPages, PageStats},
    proto::{
        hook::v1::{
            ContainerIdentity, NoOp, Pass, Refuse, RestoreFrom, RestoreResult,
            hook_response::Decision as Answer,
        },
        runtime::v1::RestoreRecord,
    },
};
use serde_json::json;
use tokio::sync::oneshot;

use crate::controller::pod::{has_finalizer, is_deleting};

use super::{
    Node,
    group::{Step, TargetGroup},
    journal,
    migration::{Role, Verdict},
    peer::PeerError,
    state::{CreateAnswer, InvalidTransition, KillAnswer, MoveState, PodMoves},
    stream::{PageStream, Sink, StreamFigures},
};

/// One update of a Pod, like kubelet's `SyncPodType` plus a migrate kind.
pub enum PodUpdate {
    /// The API server's current version of the Pod.
    Sync(Box<Pod>),
    /// The Pod was removed from the API server.
    Gone,
    /// The runtime is about to create one of its containers.
    Create {
        /// The container.
        container: ContainerIdentity,
        /// The answer for `podmig-runc`.
        reply: oneshot::Sender<Answer>,
    },
    /// The runtime is about to signal one of its containers.
    Kill {
        /// The container.
        container: ContainerIdentity,
        /// The answer for `podmig-runc`.
        reply: oneshot::Sender<Answer>,
    },
    /// A restore this worker answered with ended.
    Restored {
        /// The container.
        container: ContainerIdentity,
        /// How it went.
        result: RestoreResult,
    },
    /// Checkpoint containers of this Pod for a move (source side).
    Migrate {
        /// What to move, where.
        order: MigrateOrder,
        /// The first channel: the checkpoint, or why there is none.
        prepared: oneshot::Sender<Result<Prepared, MoveError>>,
    },
    /// CRI `CheckpointContainer`: dump one container into a given directory.
    Checkpoint {
        /// runc id.
        container_id: String,
        /// Name within the Pod.
        container: String,
        /// Where and how.
        options: CheckpointOptions,
        /// The outcome.
        reply: oneshot::Sender<podmig_cri_ext::Result<CheckpointReport>>,
    },
    /// The lazy-pages daemon of a lazily restored container ended.
    PagesArrived {
        /// The container.
        container: ContainerIdentity,
        /// The figures, or why pages are missing.
        result: Result<PageStats, String>,
    },
    /// CRI `RestoreContainer`: the next create of `container` restores `images`.
    Arm {
        /// Name within the Pod.
        container: String,
        /// The images.
        images: PathBuf,
        /// The outcome.
        reply: oneshot::Sender<Result<(), InvalidTransition>>,
    },
}

/// Where a moved Pod goes.
#[derive(Debug, Clone, Default)]
pub struct TargetRef {
    /// Namespace of the target Pod.
    pub namespace: String,
    /// Name of the target Pod.
    pub pod: String,
    /// Its node.
    pub node: String,
}

impl std::fmt::Display for TargetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.namespace, self.pod, self.node)
    }
}

/// A request to checkpoint a source Pod for a move.
#[derive(Debug, Clone)]
pub struct MigrateOrder {
    /// Id of the move.
    pub migration: String,
    /// Containers to move; empty for all that run.
    pub containers: Vec<String>,
    /// The target.
    pub target: TargetRef,
    /// When the source stops waiting for the target's verdict and resumes.
    pub deadline: Instant,
    /// True when the verdict arrives over HTTP (the manager delivers it).
    pub remote: bool,
    /// How the target wants the memory: `lazy` (or `lazy-or-full`) serves the pages after
    /// the handover.
    pub strategy: Strategy,
    /// The target takes a full move's pages in page streams while the source dumps.
    pub stream_pages: bool,
    /// `auto`: the downtime budget, ms.
    pub max_downtime_ms: u32,
    /// `auto`: why the target cannot take a lazy move, if it cannot.
    pub target_lazy_impossible: Option<String>,
}

/// A checkpoint ready to hand over.
#[derive(Debug)]
pub struct Prepared {
    /// Image directories per container.
    pub images: Vec<(String, PathBuf)>,
    /// When the source was frozen.
    pub frozen_at: Instant,
    /// Dump time.
    pub checkpoint_ms: u64,
    /// Bytes of images.
    pub bytes: u64,
    /// The memory pages were left out: the target pulls them through the page server.
    pub lazy: bool,
    /// Containers whose pages went ahead in page streams, with what each stream carried.
    pub streamed: Vec<(String, StreamFigures)>,
    /// `auto`: what it chose and why.
    pub choice: Option<super::estimate::Choice>,
    /// The second channel: the target's verdict.
    pub verdict: Sender<Verdict>,
}

/// Why a source could not be checkpointed; nothing was frozen unless said.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MoveError {
    /// A container to move does not run here.
    #[error("{0}")]
    NotRunning(String),
    /// A move of the Pod is already under way.
    #[error("{0}")]
    Busy(String),
    /// The dump failed (CRIU's reason); the containers keep running.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// The dump would not fit the node's checkpoint budget or free space.
    #[error("{0}")]
    NoRoom(String),
    /// A `lazy` move was asked for and cannot be made here.
    #[error("a lazy move is not possible: {0}")]
    NotLazy(String),
}

/// How long a target's create waits for the controller's record of it to appear.
const TARGET_RECORD_WAIT: Duration = Duration::from_secs(10);

/// Where a restore's checkpoint came from, and so who learns its outcome.
enum Handback {
    /// An armed or stored checkpoint: delete it after success.
    Drop,
    /// The source's worker on this node waits for the verdict.
    Local(Sender<Verdict>),
    /// The source's daemon on `host` waits for the verdict on move `id`.
    Remote { host: String, id: String },
    /// A source resuming on its own node after a failed move.
    Rollback,
    /// One container of a multi-container move: the group's handback gets the verdict
    /// once every container is restored.
    Group,
}

/// Whether the source took the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The source has it.
    Taken,
    /// The source answered that no move waits for it (it resumed, or restarted and
    /// rolled back): the target must not run.
    Refused(String),
    /// The source could not be reached; it decides at its deadline from the target Pod's
    /// reported phase.
    Unreachable(String),
}

impl From<Result<(), PeerError>> for Delivery {
    /// How a `complete` call to the source went: a refusal is final, anything else may be
    /// a source that is down.
    fn from(r: Result<(), PeerError>) -> Self {
        match r {
            Ok(()) => Delivery::Taken,
            Err(PeerError::Refused { status, body, .. }) => Delivery::Refused(format!(
                "the source answered {status} to the commit: {}",
                body.error
            )),
            Err(error) => Delivery::Unreachable(error.to_string()),
        }
    }
}

/// Why a restored target must stop although its restore worked: the source refused the
/// commit, or could not be told and its deadline (when it reads the target's phase) has
/// passed. `None`: the target runs on.
pub fn verdict_not_taken(delivery: &Delivery, deadline_passed: bool) -> Option<String> {
    match delivery {
        Delivery::Taken => None,
        Delivery::Refused(why) => Some(format!("the source did not take the move: {why}")),
        Delivery::Unreachable(why) if deadline_passed => Some(format!(
            "the source could not be told before the move's deadline: {why}"
        )),
        Delivery::Unreachable(_) => None,
    }
}

struct PendingRestore {
    /// The target's journal entry (none for a source restoring itself).
    journal: Option<journal::Entry>,
    handback: Handback,
    images: PathBuf,
    migration: String,
    frozen_at: Option<Instant>,
    report: MigrationReport,
    source_uid: String,
    /// A lazy restore: the lazy-pages daemon waiting for it.
    lazy: Option<LazyTarget>,
}

/// The target end of a lazy move: CRIU's lazy-pages daemon and what the tunnel saw.
struct LazyTarget {
    pages: Arc<LazyPages>,
    /// Set when the source's side of the tunnel ended before the pages were all in (the
    /// restored container was frozen then).
    broke: Arc<std::sync::atomic::AtomicBool>,
}

/// A restored container whose memory is still arriving; the move is settled when it has.
struct Paging {
    container: String,
    container_id: String,
    namespace: String,
    pod: String,
    migration: String,
    images: PathBuf,
    journal: Option<journal::Entry>,
    report: MigrationReport,
    resumed_at: Instant,
    broke: Arc<std::sync::atomic::AtomicBool>,
}

/// A multi-container move being restored into this (target) Pod.
struct GroupMove {
    plan: TargetGroup,
    handback: Handback,
    frozen_at: Option<Instant>,
    report: MigrationReport,
    source_uid: String,
    namespace: String,
    pod: String,
    /// Journal entries of the restored containers, removed when the move is settled.
    journals: Vec<journal::Entry>,
    /// File-system state of all containers: bytes, capture ms.
    filesystem: (u64, u64),
}

struct ParkedKill {
    container: String,
    reply: oneshot::Sender<Answer>,
}

/// A checkpoint that arrived for a target container.
struct Arrival {
    dir: PathBuf,
    /// The checkpoints of the Pod's other containers, frozen and dumped with it.
    others: Vec<(String, PathBuf)>,
    handback: Handback,
    frozen_at: Option<Instant>,
    report: MigrationReport,
    lazy: Option<LazyTarget>,
}

fn deleting_with_finalizer(p: &Pod) -> bool {
    is_deleting(p) && has_finalizer(p)
}

/// The deadline an RFC 3339 annotation names, as an `Instant`.
pub fn deadline_from(annotation: Option<&String>, fallback: Duration) -> Instant {
    let now = Instant::now();
    annotation
        .and_then(|v| v.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| {
            let left = t.as_millisecond() - k8s_openapi::jiff::Timestamp::now().as_millisecond();
            now + Duration::from_millis(left.max(1_000) as u64)
        })
        .unwrap_or(now + fallback)
}

/// The worker of one Pod.
pub struct PodWorker<E> {
    node: Arc<Node<E>>,
    uid: String,
    pod: Option<Pod>,
    moves: PodMoves,
    parked: Vec<ParkedKill>,
    pending: HashMap<String, PendingRestore>,
    group: Option<GroupMove>,
    /// A lazily restored container whose pages are still arriving.
    paging: Option<Paging>,
    gone: bool,
}

impl<E: CheckpointEngine> PodWorker<E> {
    /// Starts the worker of Pod `uid` on its own thread.
    pub fn spawn(node: Arc<Node<E>>, uid: String, rx: Receiver<PodUpdate>) {
        let name = format!("pod-{}", uid.chars().take(8).collect::<String>());
        let worker = Self {
            node,
            uid,
            pod: None,
            moves: PodMoves::default(),
            parked: Vec::new(),
            pending: HashMap::new(),
            group: None,
            paging: None,
            gone: false,
        };
        if let Err(error) = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run(rx))
        {
            tracing::error!(%error, "cannot start a pod worker");
        }
    }

    fn run(mut self, rx: Receiver<PodUpdate>) {
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(update) => self.handle(update),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.expire_parked();
            self.expire_group();
            if self.gone && self.node.retire_worker(&self.uid, &rx) {
                return;
            }
        }
    }

    fn handle(&mut self, update: PodUpdate) {
        match update {
            PodUpdate::Sync(pod) => {
                self.pod = Some(*pod);
                self.reconsider_parked();
                self.assert_migrated_status();
            }
            PodUpdate::Gone => {
                for p in self.parked.drain(..) {
                    let _ = p.reply.send(Answer::Pass(Pass {}));
                    self.node.metrics.held_kills.dec();
                }
                for images in self.moves.drain_images() {
                    self.node.store.remove(&images);
                }
                self.gone = true;
            }
            PodUpdate::Create { container, reply } => self.on_create(container, reply),
            PodUpdate::Kill { container, reply } => self.on_kill(container, reply),
            PodUpdate::Restored { container, result } => self.on_restored(&container, result),
            PodUpdate::PagesArrived { container, result } => self.on_pages(&container, result),
            PodUpdate::Migrate { order, prepared } => self.migrate(order, prepared),
            PodUpdate::Checkpoint {
                container_id,
                container,
                options,
                reply,
            } => {
                let _ = reply.send(self.checkpoint_for_cri(&container_id, &container, &options));
                self.reconsider_parked();
            }
            PodUpdate::Arm {
                container,
                images,
                reply,
            } => {
                let _ = reply.send(self.moves.arm(&container, images));
            }
        }
    }

    // ---- kills ------------------------------------------------------------------------

    /// True when kills of this Pod wait: it is being deleted and its finalizer says that
    /// means migrating it. With `fresh`, a Pod the cache does not show as deleting is
    /// read from the API server (kubelet may act on a deletion before our watch shows it).
    fn held_by_finalizer(&mut self, c: Option<&ContainerIdentity>, fresh: bool) -> bool {
        if self.pod.as_ref().is_some_and(deleting_with_finalizer) {
            return true;
        }
        if !fresh || self.pod.as_ref().is_some_and(|p| !has_finalizer(p)) {
            return false;
        }
        let Some(client) = self.node.kube.clone() else {
            return false;
        };
        let (ns, name) = match (&self.pod, c) {
            (Some(p), _) => (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            ),
            (None, Some(c)) => (c.pod_namespace.clone(), c.pod_name.clone()),
            (None, None) => return false,
        };
        if ns.is_empty() || name.is_empty() {
            return false;
        }
        let api: kube::Api<Pod> = kube::Api::namespaced(client, &ns);
        let got = self.node.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(3), api.get_opt(&name)).await
        });
        match got {
            Ok(Ok(Some(p))) if p.metadata.uid.as_deref() == Some(self.uid.as_str()) => {
                let held = deleting_with_finalizer(&p);
                self.pod = Some(p);
                held
            }
            Ok(Ok(_)) => false,
            Ok(Err(error)) => {
                tracing::warn!(pod_uid = %self.uid, %error, "cannot read the Pod; kill passes");
                false
            }
            Err(_) => false,
        }
    }

    fn on_kill(&mut self, c: ContainerIdentity, reply: oneshot::Sender<Answer>) {
        let answer = match MoveState::kill_answer(self.moves.get(&c.container_name)) {
            KillAnswer::NoOp => Answer::NoOp(NoOp {}),
            KillAnswer::Pass if !self.held_by_finalizer(Some(&c), true) => Answer::Pass(Pass {}),
            KillAnswer::Pass | KillAnswer::Wait => {
                tracing::info!(pod_uid = %self.uid, container = %c.container_name,
                    "holding kill: the Pod is being deleted and will be migrated");
                self.node.metrics.held_kills.inc();
                self.parked.push(ParkedKill {
                    container: c.container_name,
                    reply,
                });
                return;
            }
        };
        let _ = reply.send(answer);
    }

    /// Answers parked kills whose container or Pod no longer holds them.
    fn reconsider_parked(&mut self) {
        let held = self.held_by_finalizer(None, false);
        let parked = std::mem::take(&mut self.parked);
        for p in parked {
            let answer = match MoveState::kill_answer(self.moves.get(&p.container)) {
                KillAnswer::NoOp => Some(Answer::NoOp(NoOp {})),
                KillAnswer::Pass if !held => Some(Answer::Pass(Pass {})),
                _ => None,
            };
            match answer {
                Some(a) => {
                    let _ = p.reply.send(a);
                    self.node.metrics.held_kills.dec();
                }
                None => self.parked.push(p),
            }
        }
    }

    /// Drops parked kills whose runtime call gave up waiting (the hold timed out).
    fn expire_parked(&mut self) {
        let before = self.parked.len();
        self.parked.retain(|p| !p.reply.is_closed());
        for _ in self.parked.len()..before {
            self.node.metrics.held_kills.dec();
        }
    }

    // ---- creates and restores ---------------------------------------------------------

    fn on_create(&mut self, c: ContainerIdentity, reply: oneshot::Sender<Answer>) {
        let name = c.container_name.clone();
        let target = c
            .annotations
            .get(ANNOTATION_MIGRATE_FROM)
            .is_some_and(|v| !v.is_empty());
        if target && super::lock(&self.node.failed_targets).contains(&self.uid) {
            let _ = reply.send(Answer::Refuse(Refuse {
                reason: "the move into this Pod failed when the node's daemon restarted".into(),
            }));
            return;
        }
        let state = self.moves.get(&name).cloned();
        match MoveState::create_answer(state.as_ref(), target) {
            CreateAnswer::Pass => {
                let _ = reply.send(Answer::Pass(Pass {}));
            }
            CreateAnswer::Wait => {
                // Cannot happen while this worker handles the create (it is not dumping).
                let _ = reply.send(Answer::Refuse(Refuse {
                    reason: "the container is being checkpointed".into(),
                }));
            }
            CreateAnswer::Refuse(reason) => {
                tracing::info!(pod_uid = %self.uid, container = %name, %reason, "refusing create");
                let _ = reply.send(Answer::Refuse(Refuse { reason }));
            }
            CreateAnswer::Restore(images) => {
                let rollback = matches!(state, Some(MoveState::RollingBack { .. }));
                let migration = match &state {
                    Some(MoveState::RollingBack { migration, .. }) => migration.clone(),
                    _ => String::new(),
                };
                if let Err(e) = self.moves.begin_restore(&name, images.clone()) {
                    let _ = reply.send(Answer::Refuse(Refuse {
                        reason: e.to_string(),
                    }));
                    return;
                }
                tracing::info!(pod_uid = %self.uid, container = %name, images = %images.display(),
                    rollback, "restoring container");
                self.pending.insert(
                    name,
                    PendingRestore {
                        journal: None,
                        handback: if rollback {
                            Handback::Rollback
                        } else {
                            Handback::Drop
                        },
                        images: images.clone(),
                        migration,
                        frozen_at: None,
                        report: MigrationReport::default(),
                        source_uid: String::new(),
                        lazy: None,
                    },
                );
                let _ = reply.send(restore_from(&images));
            }
            CreateAnswer::Fetch => self.fetch(c, reply),
        }
    }

    /// A migration target's container: get the source's checkpoint — from the store, from
    /// the source's worker on this node, or from the source node's daemon — and restore it.
    fn fetch(&mut self, c: ContainerIdentity, reply: oneshot::Sender<Answer>) {
        let name = c.container_name.clone();
        // With API access, the move is what the API server records, never what the
        // container's annotations (written by whoever made the Pod) claim.
        let verified = match self.verify_target(&c) {
            Ok(v) => v,
            Err(reason) => {
                tracing::warn!(pod_uid = %self.uid, namespace = %c.pod_namespace, pod = %c.pod_name,
                    %reason, "refused a migration target podmig's controller did not make");
                self.node.metrics.moved("target", "refused");
                self.node.event_on_pod(
                    &c.pod_namespace,
                    &c.pod_name,
                    "MigrationTargetRefused",
                    &reason,
                );
                let _ = reply.send(Answer::Refuse(Refuse {
                    reason: format!("Refused: {reason}"),
                }));
                return;
            }
        };
        let ann = &c.annotations;
        let (source_uid, source_node, id) = match verified {
            Some(v) => (v.source_uid, v.source_node, v.migration_id),
            None => (
                ann.get(ANNOTATION_MIGRATE_FROM)
                    .cloned()
                    .unwrap_or_default(),
                ann.get(ANNOTATION_SOURCE_NODE)
                    .filter(|n| !n.is_empty())
                    .cloned(),
                ann.get(ANNOTATION_MIGRATION_ID)
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .unwrap_or_else(|| self.uid.clone()),
            ),
        };
        let id = if id.is_empty() { self.uid.clone() } else { id };
        let deadline = deadline_from(
            ann.get(ANNOTATION_MIGRATION_DEADLINE),
            self.node.settings.hold,
        );
        // No annotation: the controller asked for `full`.
        let strategy = ann
            .get(ANNOTATION_MIGRATION_STRATEGY)
            .and_then(|s| Strategy::parse(s))
            .unwrap_or(Strategy::Full);
        let max_downtime_ms = ann
            .get(podmig_api::ANNOTATION_MAX_DOWNTIME)
            .and_then(|v| v.parse().ok())
            .unwrap_or(podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS);
        if let Some(answer) = self.restore_from_group(&c, &id) {
            let _ = reply.send(answer);
            return;
        }
        if let Err(e) = self.moves.begin_receive(&name, &id) {
            let _ = reply.send(Answer::Refuse(Refuse {
                reason: e.to_string(),
            }));
            return;
        }
        let info = MoveInfo {
            id: id.clone(),
            namespace: c.pod_namespace.clone(),
            pod: c.pod_name.clone(),
            pod_uid: self.uid.clone(),
            peer_node: source_node.clone(),
            state: "Checkpointing".into(),
            ..Default::default()
        };
        if let Err(busy) = self.node.manager.begin(Role::Target, info)
            && busy.0 != id
        {
            let _ = self.moves.abandon(&name, &busy.to_string());
            let _ = reply.send(Answer::Refuse(Refuse {
                reason: busy.to_string(),
            }));
            return;
        }
        self.node
            .report_phase(&c.pod_namespace, &c.pod_name, DaemonPhase::Checkpointing);
        let mut entry = journal::Entry {
            migration: id.clone(),
            side: journal::Side::Target,
            pod_uid: self.uid.clone(),
            container: name.clone(),
            container_id: String::new(),
            images: self
                .node
                .store
                .path_for(&self.uid, &name)
                .unwrap_or_default(),
            target_namespace: c.pod_namespace.clone(),
            target_pod: c.pod_name.clone(),
            peer_node: source_node.clone().unwrap_or_default(),
            deadline_unix_ms: journal::deadline_unix_ms(deadline),
            step: journal::Step::Receiving,
            lazy: false,
        };
        self.node.journal.record(&entry);
        tracing::info!(pod_uid = %self.uid, container = %name, migration = %id,
            source_pod_uid = %source_uid, source_node = ?source_node, "fetching checkpoint for a migration target");
        let local_node = self.node.settings.node_name.clone();
        let stored = self
            .node
            .store
            .path_for(&source_uid, &name)
            .filter(|d| self.node.store.has_checkpoint(d));
        let running_here =
            || find_container(&self.node.settings.runc_root, &source_uid, &name).is_some();
        let result = if source_uid == self.uid {
            Err("a Pod cannot be its own migration source".to_owned())
        } else if let Some(dir) = stored {
            let bytes = dir_size(&dir);
            Ok(Arrival {
                dir,
                others: Vec::new(),
                handback: Handback::Drop,
                frozen_at: None,
                report: MigrationReport {
                    bytes,
                    ..Default::default()
                },
                lazy: None,
            })
        } else if running_here() {
            self.fetch_local(&c, &source_uid, &id, deadline)
        } else if let Some(node) = source_node.filter(|n| *n != local_node) {
            self.fetch_remote(
                &c,
                &source_uid,
                &node,
                &id,
                deadline,
                (strategy, max_downtime_ms),
            )
        } else {
            Err(format!(
                "no checkpoint of container {name:?} of source pod {source_uid} on this node and \
                 no running source to take one from"
            ))
        };
        let arrival = match result {
            Ok(a) if reply.is_closed() => {
                if let Some(l) = &a.lazy {
                    l.pages.kill();
                }
                // The runtime stopped waiting: nobody will restore this; resume the source.
                let _ = self.hand_back(&a.handback, false, "the target's runtime stopped waiting");
                if matches!(a.handback, Handback::Remote { .. }) {
                    self.node.store.remove(&a.dir);
                    for (_, d) in &a.others {
                        self.node.store.remove(d);
                    }
                }
                Err("the target's runtime stopped waiting for the checkpoint".to_owned())
            }
            other => other,
        };
        match arrival {
            Err(reason) => {
                self.node.journal.remove(&entry);
                tracing::warn!(pod_uid = %self.uid, container = %name, migration = %id, %reason, "migration target refused");
                let _ = self.moves.abandon(&name, &reason);
                self.node
                    .manager
                    .finish(Role::Target, &id, "Failed", Some(reason.clone()));
                self.node.metrics.moved("target", "failed");
                self.node.report_done(
                    &c.pod_namespace,
                    &c.pod_name,
                    &MigrationReport {
                        error: Some(reason.clone()),
                        ..Default::default()
                    },
                );
                let _ = reply.send(Answer::Refuse(Refuse { reason }));
            }
            Ok(a) => {
                if let Err(e) = self.moves.begin_restore(&name, a.dir.clone()) {
                    let _ = reply.send(Answer::Refuse(Refuse {
                        reason: e.to_string(),
                    }));
                    return;
                }
                self.node.manager.update(Role::Target, &id, |i| {
                    i.state = "Restoring".into();
                    i.report = a.report.clone();
                });
                self.node
                    .report_phase(&c.pod_namespace, &c.pod_name, DaemonPhase::Restoring);
                entry.lazy = a.lazy.is_some();
                self.node
                    .journal
                    .advance(&mut entry, journal::Step::Restoring);
                tracing::info!(pod_uid = %self.uid, container = %name, images = %a.dir.display(),
                    since_freeze_ms = a.frozen_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                    "restoring container");
                let _ = reply.send(match &a.lazy {
                    // The lazy-pages daemon's socket is in the images directory.
                    Some(_) => Answer::RestoreFrom(RestoreFrom {
                        image_path: a.dir.display().to_string(),
                        work_path: a.dir.display().to_string(),
                        lazy_pages: true,
                        ..Default::default()
                    }),
                    None => restore_from(&a.dir),
                });
                let handback = if a.others.is_empty() {
                    a.handback
                } else {
                    // Every container was frozen and dumped together: they commit together.
                    let mut dirs = vec![(name.clone(), a.dir.clone(), dir_size(&a.dir))];
                    dirs.extend(
                        a.others
                            .iter()
                            .map(|(n, d)| (n.clone(), d.clone(), dir_size(d))),
                    );
                    tracing::info!(pod_uid = %self.uid, migration = %id,
                        containers = ?dirs.iter().map(|(n, _, _)| n).collect::<Vec<_>>(),
                        "restoring a multi-container move");
                    let mut plan = TargetGroup::new(&id, dirs, deadline);
                    plan.take(&name);
                    self.group = Some(GroupMove {
                        plan,
                        handback: a.handback,
                        frozen_at: a.frozen_at,
                        report: a.report.clone(),
                        source_uid: source_uid.clone(),
                        namespace: c.pod_namespace.clone(),
                        pod: c.pod_name.clone(),
                        journals: Vec::new(),
                        filesystem: (0, 0),
                    });
                    Handback::Group
                };
                self.pending.insert(
                    name,
                    PendingRestore {
                        journal: Some(entry),
                        handback,
                        images: a.dir,
                        migration: id,
                        frozen_at: a.frozen_at,
                        report: a.report,
                        source_uid,
                        lazy: a.lazy,
                    },
                );
            }
        }
    }

    /// The move of this target container as the API server records it (`None`: no API
    /// access, the standalone engine). `Err`: not a target podmig's controller made, or
    /// not one for this node.
    fn verify_target(
        &self,
        c: &ContainerIdentity,
    ) -> Result<Option<super::trust::VerifiedTarget>, String> {
        let Some(client) = self.node.kube.clone() else {
            return Ok(None);
        };
        let v = self
            .node
            .rt
            .block_on(super::trust::verify_within(
                &client,
                &c.pod_namespace,
                &c.pod_name,
                TARGET_RECORD_WAIT,
            ))
            .map_err(|e| e.to_string())?;
        let here = &self.node.settings.node_name;
        if v.target_uid != self.uid {
            return Err(format!(
                "Pod {}/{} has uid {}, this container belongs to {}",
                v.namespace, v.target_pod, v.target_uid, self.uid
            ));
        }
        if !here.is_empty() && v.target_node != *here {
            return Err(format!(
                "Pod {}/{} is bound to node {:?}, not {here:?}",
                v.namespace, v.target_pod, v.target_node
            ));
        }
        Ok(Some(v))
    }

    fn fetch_local(
        &mut self,
        c: &ContainerIdentity,
        source_uid: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<Arrival, String> {
        let (tx, rx) = oneshot::channel();
        // Every container of the source, frozen together (empty: all that run).
        let order = MigrateOrder {
            migration: id.into(),
            containers: Vec::new(),
            target: TargetRef {
                namespace: c.pod_namespace.clone(),
                pod: c.pod_name.clone(),
                node: self.node.settings.node_name.clone(),
            },
            deadline,
            remote: false,
            strategy: Strategy::Full,
            stream_pages: false,
            max_downtime_ms: podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS,
            target_lazy_impossible: None,
        };
        self.node.dispatch(
            source_uid,
            PodUpdate::Migrate {
                order,
                prepared: tx,
            },
        );
        let left = deadline.saturating_duration_since(Instant::now());
        let prepared = match self
            .node
            .rt
            .block_on(async { tokio::time::timeout(left, rx).await })
        {
            Err(_) => return Err("the source's checkpoint did not come before the deadline".into()),
            Ok(Err(_)) => return Err("the source's worker went away".into()),
            Ok(Ok(Err(e))) => return Err(e.to_string()),
            Ok(Ok(Ok(p))) => p,
        };
        let (dir, others) = split_arrival(prepared.images, &c.container_name)?;
        Ok(Arrival {
            dir,
            others,
            frozen_at: Some(prepared.frozen_at),
            report: MigrationReport {
                checkpoint_ms: prepared.checkpoint_ms,
                bytes: prepared.bytes,
                ..Default::default()
            },
            handback: Handback::Local(prepared.verdict),
            lazy: None,
        })
    }

    fn fetch_remote(
        &mut self,
        c: &ContainerIdentity,
        source_uid: &str,
        source_node: &str,
        id: &str,
        deadline: Instant,
        (strategy, max_downtime_ms): (Strategy, u32),
    ) -> Result<Arrival, String> {
        let auto = strategy == Strategy::Auto;
        let strategy = match (strategy.wants_lazy(), self.node.lazy_impossible()) {
            // The source chooses; it must know whether this node can take a lazy move.
            _ if auto => Some(Strategy::Auto),
            (false, _) => None,
            (true, None) => Some(strategy),
            (true, Some(why)) if strategy == Strategy::Lazy => {
                return Err(format!("a lazy move is not possible: {why}"));
            }
            (true, Some(why)) => {
                tracing::info!(pod_uid = %self.uid, migration = %id, %why, "lazy-or-full: moving in full");
                None
            }
        };
        let peers = self
            .node
            .peers
            .clone()
            .ok_or("this daemon has no peer credentials (TLS CA and API access)")?;
        let host = self.node.node_address(source_node)?;
        let left = deadline.saturating_duration_since(Instant::now());
        // Every container of the source, frozen together (empty: all that run).
        let req = MigrateRequest {
            containers: Vec::new(),
            handover: Some(Handover {
                migration_id: id.into(),
                target_namespace: c.pod_namespace.clone(),
                target_pod: c.pod_name.clone(),
                target_pod_uid: self.uid.clone(),
                target_node: self.node.settings.node_name.clone(),
                timeout_seconds: left.as_secs().max(1) as u32,
                strategy,
                // A full move's pages come ahead in page streams while the source dumps.
                stream_pages: strategy.is_none() || auto,
                max_downtime_ms: auto.then_some(max_downtime_ms),
                lazy_impossible: if auto {
                    self.node.lazy_impossible()
                } else {
                    None
                },
            }),
            ..Default::default()
        };
        let containers = self.pod.as_ref().map_or_else(Vec::new, |p| {
            p.spec
                .as_ref()
                .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default()
        });
        let sink = Arc::new(Sink::new(
            self.node.store.clone(),
            &self.uid,
            source_node,
            containers,
        ));
        super::lock(&self.node.page_sinks).insert(id.to_owned(), sink.clone());
        let node = self.node.clone();
        let (ns, pod) = (c.pod_namespace.clone(), c.pod_name.clone());
        let target_uid = self.uid.clone();
        let store = self.node.store.clone();
        let fetched = self.node.rt.block_on(peers.fetch(
            &host,
            source_uid,
            &req,
            left,
            move || node.report_phase(&ns, &pod, DaemonPhase::Transferring),
            move |container| store.path_for(&target_uid, container),
        ));
        let checked = fetched.map_err(|e| e.to_string()).map(|f| {
            let streamed = check_streams(&sink, &f.streamed);
            (f, streamed)
        });
        super::lock(&self.node.page_sinks).remove(id);
        if !matches!(checked, Ok((_, Ok(())))) {
            // Whatever the streams wrote is of no use now.
            for d in sink.dirs() {
                self.node.store.remove(&d);
            }
        }
        let f = match checked {
            Ok((f, Ok(()))) => f,
            Ok((f, Err(why))) => {
                for (_, d) in &f.dirs {
                    self.node.store.remove(d);
                }
                let handback = Handback::Remote {
                    host: host.clone(),
                    id: id.into(),
                };
                let _ = self.hand_back(&handback, false, &why);
                return Err(why);
            }
            Err(why) => return Err(why),
        };
        self.node.metrics.phase_ms("transfer", f.transfer_ms);
        let streamed_bytes: u64 = f.streamed.iter().map(|(_, s)| s.bytes).sum();
        let (dir, others) = split_arrival(f.dirs, &c.container_name)?;
        let lazy = if f.lazy {
            match self.start_lazy_pages(&dir, &host, id, &c.container_id, &peers) {
                Ok(l) => Some(l),
                Err(why) => {
                    self.node.store.remove(&dir);
                    let _ = self.hand_back(
                        &Handback::Remote {
                            host: host.clone(),
                            id: id.into(),
                        },
                        false,
                        &why,
                    );
                    return Err(why);
                }
            }
        } else {
            None
        };
        Ok(Arrival {
            dir,
            others,
            frozen_at: Some(f.frozen_at),
            report: MigrationReport {
                checkpoint_ms: f.checkpoint_ms,
                transfer_ms: f.transfer_ms,
                bytes: f.bytes + streamed_bytes,
                streamed_bytes,
                strategy: auto.then_some(if f.lazy {
                    Strategy::Lazy
                } else {
                    Strategy::Full
                }),
                estimated_frozen_ms: f.choice.as_ref().map_or(0, |(ms, _)| *ms),
                strategy_reason: f.choice.map(|(_, why)| why),
                ..Default::default()
            },
            handback: Handback::Remote {
                host,
                id: id.into(),
            },
            lazy,
        })
    }

    /// Starts the lazy-pages daemon on the arrived images and the tunnel that feeds it
    /// from the source's page server. A break of the source's side freezes the restored
    /// container at once.
    fn start_lazy_pages(
        &self,
        dir: &std::path::Path,
        host: &str,
        id: &str,
        container_id: &str,
        peers: &super::peer::PeerClient,
    ) -> Result<LazyTarget, String> {
        let pages =
            LazyPages::start(std::path::Path::new("criu"), dir).map_err(|e| e.to_string())?;
        let listener = pages.listener.try_clone().map_err(|e| e.to_string())?;
        let pages = Arc::new(pages);
        let broke = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (peers, host, id, cid) = (
            peers.clone(),
            host.to_owned(),
            id.to_owned(),
            container_id.to_owned(),
        );
        let (engine, flag, waiting) = (self.node.engine.clone(), broke.clone(), pages.clone());
        self.node.rt.spawn(async move {
            let on_break = || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Err(error) = engine.freeze(&cid) {
                    tracing::warn!(migration = %id, %error, "cannot freeze the lazily restored container");
                }
            };
            match peers.tunnel_pages(&host, &id, listener, PAGES_LIMIT, on_break).await {
                Ok(end) => tracing::info!(migration = %id, ?end, "page tunnel ended"),
                Err(error) => {
                    tracing::warn!(migration = %id, %error, "page tunnel failed");
                    waiting.kill();
                }
            }
        });
        Ok(LazyTarget { pages, broke })
    }

    /// Tells the source how the restore of its checkpoint went.
    fn hand_back(&self, handback: &Handback, ok: bool, error: &str) -> Delivery {
        self.hand_back_after(handback, ok, error, None)
    }

    /// [`Self::hand_back`] with the restore's duration, which the source learns from.
    fn hand_back_after(
        &self,
        handback: &Handback,
        ok: bool,
        error: &str,
        restore_ms: Option<u64>,
    ) -> Delivery {
        let verdict = if ok {
            Verdict::Commit
        } else {
            Verdict::Abort(error.into())
        };
        match handback {
            Handback::Local(tx) => match tx.send(verdict) {
                Ok(()) => Delivery::Taken,
                Err(_) => Delivery::Refused("the source stopped waiting for the verdict".into()),
            },
            Handback::Remote { host, id } => {
                let Some(peers) = &self.node.peers else {
                    return Delivery::Unreachable("no peer credentials".into());
                };
                let body = CompleteRequest {
                    ok,
                    error: (!ok).then(|| error.to_owned()),
                    restore_ms,
                };
                let delivery =
                    Delivery::from(self.node.rt.block_on(peers.complete(host, id, &body)));
                if let Delivery::Unreachable(error) = &delivery {
                    tracing::warn!(migration = %id, %error, "cannot tell the source the verdict; it decides at its deadline");
                }
                delivery
            }
            Handback::Drop | Handback::Rollback | Handback::Group => Delivery::Taken,
        }
    }

    fn on_restored(&mut self, c: &ContainerIdentity, result: RestoreResult) {
        let name = &c.container_name;
        let Some(p) = self.pending.remove(name) else {
            tracing::warn!(pod_uid = %self.uid, container = %name, "restore report for an unknown restore");
            return;
        };
        // A group member's entry is kept by the group until the whole move is settled.
        let journal = p
            .journal
            .clone()
            .filter(|_| !matches!(p.handback, Handback::Group));
        self.settle_restore(c, p, result);
        // Forgotten only once the source has its verdict and the Pod its phase (for a lazy
        // restore: once every page arrived).
        let paging = self.paging.as_ref().is_some_and(|pg| pg.container == *name);
        if let Some(e) = journal.filter(|_| !paging) {
            self.node.journal.remove(&e);
        }
    }

    fn settle_restore(
        &mut self,
        c: &ContainerIdentity,
        mut p: PendingRestore,
        mut result: RestoreResult,
    ) {
        let name = &c.container_name;
        let lazy = p.lazy.take();
        if let Some(l) = lazy.as_ref().filter(|_| !result.ok) {
            // Never resumed: the pages are not needed; the source resumes.
            l.pages.kill();
        }
        // Read before the images go: what their file-system part cost on the source.
        let fs = podmig_cri_ext::volumes::FilesystemCapture::read(&p.images);
        if let Err(e) = self.moves.restored(name, result.ok) {
            tracing::warn!(pod_uid = %self.uid, error = %e, "restore outcome in an unexpected state");
        }
        let frozen_ms = p.frozen_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        self.node.manager.record_restore(RestoreRecord {
            pod_uid: self.uid.clone(),
            container_name: name.clone(),
            container_id: c.container_id.clone(),
            source_pod_uid: p.source_uid.clone(),
            checkpoint_ms: p.report.checkpoint_ms,
            restore_ms: result.duration_ms,
            frozen_ms,
            image_bytes: p.report.bytes,
            ok: result.ok,
            error: result.error.clone(),
        });
        self.node.metrics.phase_ms("restore", result.duration_ms);
        if matches!(p.handback, Handback::Group) {
            self.settle_group_member(c, p, &result, fs);
            return;
        }
        match &p.handback {
            Handback::Rollback => {
                if result.ok {
                    tracing::info!(pod_uid = %self.uid, container = %name, migration = %p.migration,
                        "container resumed on its own node after the failed move");
                    self.node.store.remove(&p.images);
                } else {
                    tracing::warn!(pod_uid = %self.uid, container = %name, error = %result.error,
                        "rollback restore failed; its checkpoint is kept for the next attempt");
                }
                return;
            }
            Handback::Drop => {
                if result.ok {
                    self.node.store.remove(&p.images);
                } else {
                    tracing::warn!(pod_uid = %self.uid, error = %result.error, "restore failed; checkpoint kept");
                }
            }
            // A lazy restore's lazy-pages daemon still reads the images.
            Handback::Remote { .. } if lazy.is_some() && result.ok => {}
            Handback::Remote { .. } => self.node.store.remove(&p.images),
            Handback::Local(_) | Handback::Group => {}
        }
        if lazy.is_some() && result.ok {
            // Journaled before the commit leaves: from the commit on, the source is gone
            // and only this daemon carries the pages, so a restart of it must find
            // `Paging` (the state is lost) and never ask the source for a second commit.
            if let Some(e) = p.journal.as_mut() {
                self.node.journal.advance(e, journal::Step::Paging);
            }
        }
        let delivered = self.hand_back_after(
            &p.handback,
            result.ok,
            &result.error,
            Some(result.duration_ms),
        );
        if result.ok
            && let Some(why) = verdict_not_taken(
                &delivered,
                p.journal.as_ref().is_some_and(journal::Entry::expired),
            )
        {
            // The source resumed (or will): this copy must not run as a second one.
            tracing::warn!(pod_uid = %self.uid, container = %name, migration = %p.migration, %why,
                "the source did not take the commit; stopping the restored copy");
            if let Err(error) = self.node.engine.discard(&c.container_id) {
                tracing::warn!(pod_uid = %self.uid, %error, "cannot stop the restored copy");
            }
            result.ok = false;
            result.error = why;
        }
        if p.migration.is_empty() || p.source_uid.is_empty() {
            return;
        }
        if let Some(l) = lazy.filter(|_| result.ok) {
            // Running on the target: the move is settled when every page has arrived.
            tracing::info!(pod_uid = %self.uid, container = %name, migration = %p.migration,
                restore_ms = result.duration_ms, frozen_ms, "lazily restored; the pages arrive");
            self.node.metrics.frozen.observe(frozen_ms as f64 / 1000.0);
            self.node.manager.update(Role::Target, &p.migration, |i| {
                i.state = "Paging".into();
            });
            let journal = p.journal.clone();
            self.paging = Some(Paging {
                container: name.clone(),
                container_id: c.container_id.clone(),
                namespace: c.pod_namespace.clone(),
                pod: c.pod_name.clone(),
                migration: p.migration.clone(),
                images: p.images.clone(),
                journal,
                report: MigrationReport {
                    restore_ms: result.duration_ms,
                    frozen_ms,
                    filesystem_bytes: fs.layer_bytes + fs.volume_bytes,
                    filesystem_ms: fs.capture_ms,
                    strategy: Some(Strategy::Lazy),
                    ..p.report
                },
                resumed_at: Instant::now(),
                broke: l.broke.clone(),
            });
            let (node, uid, container, pages) =
                (self.node.clone(), self.uid.clone(), c.clone(), l.pages);
            std::thread::spawn(move || {
                let result = pages.wait(PAGES_LIMIT).map_err(|e| e.to_string());
                node.dispatch(&uid, PodUpdate::PagesArrived { container, result });
            });
            return;
        }
        let report = MigrationReport {
            restore_ms: result.duration_ms,
            frozen_ms,
            filesystem_bytes: fs.layer_bytes + fs.volume_bytes,
            filesystem_ms: fs.capture_ms,
            error: (!result.ok).then(|| {
                format!(
                    "restore on {}: {}",
                    self.node.settings.node_name, result.error
                )
            }),
            ..p.report
        };
        if result.ok {
            tracing::info!(pod_uid = %self.uid, container = %name, migration = %p.migration,
                restore_ms = result.duration_ms, frozen_ms, "container restored");
            self.node.metrics.frozen.observe(frozen_ms as f64 / 1000.0);
        } else {
            tracing::warn!(pod_uid = %self.uid, container = %name, migration = %p.migration,
                error = %result.error, "restore failed; the source resumes");
        }
        let outcome = if result.ok { "Succeeded" } else { "Failed" };
        self.node
            .manager
            .update(Role::Target, &p.migration, |i| i.report = report.clone());
        self.node
            .manager
            .finish(Role::Target, &p.migration, outcome, report.error.clone());
        self.node.metrics.moved("target", &outcome.to_lowercase());
        self.node
            .report_done(&c.pod_namespace, &c.pod_name, &report);
    }

    /// The pages of a lazily restored container all arrived, or some never will: the move
    /// is settled. Missing pages stop the container (it would read zeros where its memory
    /// was) and refuse its restarts; the source is not resumed (the target already ran).
    fn on_pages(&mut self, c: &ContainerIdentity, result: Result<PageStats, String>) {
        let Some(pg) = self.paging.take_if(|pg| pg.container == c.container_name) else {
            tracing::warn!(pod_uid = %self.uid, container = %c.container_name, "pages of an unknown lazy restore");
            return;
        };
        let pages_ms = pg.resumed_at.elapsed().as_millis() as u64;
        let mut report = pg.report;
        report.pages_ms = pages_ms;
        match &result {
            Ok(stats) => {
                if pg.broke.load(std::sync::atomic::Ordering::SeqCst) {
                    // The tunnel's source side closed first, but every page had come.
                    let _ = self.node.engine.resume(&pg.container_id);
                }
                report.pages_faulted = stats.faulted;
                report.pages_pushed = stats.pushed();
                report.bytes += stats.transferred * 4096;
                tracing::info!(pod_uid = %self.uid, migration = %pg.migration, pages_ms,
                    faulted = stats.faulted, pushed = stats.pushed(), "every page arrived");
            }
            Err(why) => {
                if let Err(error) = self.node.engine.discard(&pg.container_id) {
                    tracing::warn!(pod_uid = %self.uid, %error, "cannot stop the lazily restored container");
                }
                super::lock(&self.node.failed_targets).insert(self.uid.clone());
                report.error = Some(format!(
                    "lazy move on {}: {}",
                    self.node.settings.node_name,
                    pages_lost(why)
                ));
                tracing::warn!(pod_uid = %self.uid, migration = %pg.migration, %why,
                    "pages lost after the resume; the target was stopped");
            }
        }
        self.node.store.remove(&pg.images);
        if let Some(e) = &pg.journal {
            self.node.journal.remove(e);
        }
        let outcome = if result.is_ok() {
            "Succeeded"
        } else {
            "Failed"
        };
        self.node
            .manager
            .update(Role::Target, &pg.migration, |i| i.report = report.clone());
        self.node
            .manager
            .finish(Role::Target, &pg.migration, outcome, report.error.clone());
        self.node.metrics.moved("target", &outcome.to_lowercase());
        self.node.report_done(&pg.namespace, &pg.pod, &report);
    }

    // ---- multi-container moves (target side) --------------------------------------------

    /// A later container of a multi-container move: restore the checkpoint that came with
    /// the first one. `None` when no group move `id` is under way here.
    fn restore_from_group(&mut self, c: &ContainerIdentity, id: &str) -> Option<Answer> {
        let g = self.group.as_mut().filter(|g| g.plan.migration == id)?;
        let name = c.container_name.clone();
        let refuse = |reason: String| Answer::Refuse(Refuse { reason });
        if let Some(why) = g.plan.failure() {
            return Some(refuse(format!("the move of this Pod failed: {why}")));
        }
        let Some(dir) = g.plan.take(&name) else {
            return Some(refuse(format!(
                "no checkpoint of container {name:?} came with move {id}"
            )));
        };
        let (frozen_at, source_uid, left) = (
            g.frozen_at,
            g.source_uid.clone(),
            g.plan.left(Instant::now()),
        );
        if let Err(e) = self
            .moves
            .begin_receive(&name, id)
            .and_then(|()| self.moves.begin_restore(&name, dir.clone()))
        {
            let reason = e.to_string();
            self.fail_group(reason.clone(), Vec::new(), vec![dir]);
            return Some(refuse(reason));
        }
        let entry = journal::Entry {
            migration: id.to_owned(),
            side: journal::Side::Target,
            pod_uid: self.uid.clone(),
            container: name.clone(),
            container_id: String::new(),
            images: dir.clone(),
            target_namespace: c.pod_namespace.clone(),
            target_pod: c.pod_name.clone(),
            peer_node: c
                .annotations
                .get(ANNOTATION_SOURCE_NODE)
                .cloned()
                .unwrap_or_default(),
            deadline_unix_ms: journal::deadline_unix_ms(Instant::now() + left),
            step: journal::Step::Restoring,
            lazy: false,
        };
        self.node.journal.record(&entry);
        tracing::info!(pod_uid = %self.uid, container = %name, migration = %id,
            images = %dir.display(), "restoring container of a multi-container move");
        self.pending.insert(
            name,
            PendingRestore {
                journal: Some(entry),
                handback: Handback::Group,
                images: dir.clone(),
                migration: id.to_owned(),
                frozen_at,
                report: MigrationReport::default(),
                source_uid,
                lazy: None,
            },
        );
        Some(restore_from(&dir))
    }

    /// Records one container's restore in its group; settles the move when it is the
    /// last one or a failure.
    fn settle_group_member(
        &mut self,
        c: &ContainerIdentity,
        p: PendingRestore,
        result: &RestoreResult,
        fs: podmig_cri_ext::volumes::FilesystemCapture,
    ) {
        let Some(g) = self.group.as_mut() else {
            tracing::warn!(pod_uid = %self.uid, container = %c.container_name,
                "restore of a group member without its group; stopping it");
            if result.ok {
                let _ = self.node.engine.discard(&c.container_id);
            }
            return;
        };
        if let Some(e) = p.journal {
            g.journals.push(e);
        }
        g.filesystem.0 += fs.layer_bytes + fs.volume_bytes;
        g.filesystem.1 += fs.capture_ms;
        let remote = matches!(g.handback, Handback::Remote { .. });
        if remote {
            self.node.store.remove(&p.images);
        }
        let step = g.plan.record(
            &c.container_name,
            &c.container_id,
            result.ok,
            &result.error,
            result.duration_ms,
        );
        match step {
            Step::Waiting => {
                tracing::info!(pod_uid = %self.uid, container = %c.container_name,
                    migration = %p.migration, "container restored; waiting for the others");
            }
            Step::Complete => self.finish_group(None),
            Step::Failed { reason, stop, drop } => self.fail_group(reason, stop, drop),
        }
    }

    /// A group that failed: its restored containers stop, its other images go, the source
    /// resumes.
    fn fail_group(&mut self, reason: String, stop: Vec<String>, drop: Vec<PathBuf>) {
        for id in &stop {
            if let Err(error) = self.node.engine.discard(id) {
                tracing::warn!(pod_uid = %self.uid, container_id = %id, %error,
                    "cannot stop a restored container of a failed move");
            }
        }
        if self
            .group
            .as_ref()
            .is_some_and(|g| matches!(g.handback, Handback::Remote { .. }))
        {
            for d in &drop {
                self.node.store.remove(d);
            }
        }
        self.finish_group(Some(reason));
    }

    /// Tells the source the verdict of the whole move and reports it on the target Pod.
    fn finish_group(&mut self, failure: Option<String>) {
        let Some(mut g) = self.group.take() else {
            return;
        };
        let mut error = failure;
        let delivered = self.hand_back_after(
            &g.handback,
            error.is_none(),
            error.as_deref().unwrap_or(""),
            Some(g.plan.restore_ms()),
        );
        if error.is_none()
            && let Some(why) =
                verdict_not_taken(&delivered, g.journals.iter().any(journal::Entry::expired))
        {
            tracing::warn!(pod_uid = %self.uid, migration = %g.plan.migration, %why,
                "the source did not take the commit; stopping the restored containers");
            for id in g.plan.restored_ids() {
                let _ = self.node.engine.discard(&id);
            }
            g.plan.abandon(&why);
            error = Some(why);
        }
        for e in &g.journals {
            self.node.journal.remove(e);
        }
        g.journals.clear();
        let frozen_ms = g.frozen_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        let report = MigrationReport {
            restore_ms: g.plan.restore_ms(),
            frozen_ms,
            filesystem_bytes: g.filesystem.0,
            filesystem_ms: g.filesystem.1,
            containers: g.plan.figures(),
            error: error
                .as_ref()
                .map(|e| format!("restore on {}: {e}", self.node.settings.node_name)),
            ..g.report.clone()
        };
        let outcome = if error.is_none() {
            "Succeeded"
        } else {
            "Failed"
        };
        if error.is_none() {
            tracing::info!(pod_uid = %self.uid, migration = %g.plan.migration, frozen_ms,
                containers = report.containers.len(), "every container restored");
            self.node.metrics.frozen.observe(frozen_ms as f64 / 1000.0);
        } else {
            tracing::warn!(pod_uid = %self.uid, migration = %g.plan.migration,
                error = ?report.error, "multi-container move failed; the source resumes");
        }
        self.node
            .manager
            .update(Role::Target, &g.plan.migration, |i| {
                i.report = report.clone()
            });
        self.node.manager.finish(
            Role::Target,
            &g.plan.migration,
            outcome,
            report.error.clone(),
        );
        self.node.metrics.moved("target", &outcome.to_lowercase());
        self.node.report_done(&g.namespace, &g.pod, &report);
        if error.is_some() {
            // Kept so that the containers' retried creates are refused with the reason.
            self.group = Some(g);
        }
    }

    /// A group still waiting for creates past its deadline fails.
    fn expire_group(&mut self) {
        let step = self
            .group
            .as_mut()
            .and_then(|g| g.plan.expire(Instant::now()));
        if let Some(Step::Failed { reason, stop, drop }) = step {
            self.fail_group(reason, stop, drop);
        }
    }

    // ---- the source side of a move ----------------------------------------------------

    fn migrate(
        &mut self,
        order: MigrateOrder,
        prepared: oneshot::Sender<Result<Prepared, MoveError>>,
    ) {
        let id = order.migration.clone();
        let running = running_containers(&self.node.settings.runc_root, &self.uid);
        let wanted: Vec<(String, String)> = if order.containers.is_empty() {
            running
        } else {
            let mut out = Vec::new();
            for name in &order.containers {
                match running.iter().find(|(_, n)| n == name) {
                    Some(c) => out.push(c.clone()),
                    None => {
                        let _ = prepared.send(Err(MoveError::NotRunning(format!(
                            "container {name:?} of pod {} is not running on this node",
                            self.uid
                        ))));
                        return;
                    }
                }
            }
            out
        };
        if wanted.is_empty() {
            let _ = prepared.send(Err(MoveError::NotRunning(format!(
                "no container of pod {} runs on this node",
                self.uid
            ))));
            return;
        }
        let why_not_lazy = if wanted.len() > 1 {
            Some(format!(
                "lazy moves carry single-container Pods; pod {} has {} containers",
                self.uid,
                wanted.len()
            ))
        } else {
            self.node.lazy_impossible().or_else(|| {
                order
                    .target_lazy_impossible
                    .as_ref()
                    .map(|w| format!("on the target: {w}"))
            })
        };
        let memory = self.memory_of(&wanted);
        let mut choice = None;
        let lazy = if order.strategy == Strategy::Auto {
            let c = self.choose_strategy(memory, &order, why_not_lazy);
            let lazy = c.strategy == Strategy::Lazy;
            choice = Some(c);
            lazy
        } else if order.strategy.wants_lazy() {
            match why_not_lazy {
                None => true,
                Some(why) if order.strategy == Strategy::Lazy => {
                    let _ = prepared.send(Err(MoveError::NotLazy(why)));
                    return;
                }
                Some(why) => {
                    tracing::info!(pod_uid = %self.uid, migration = %id, %why, "lazy-or-full: moving in full");
                    false
                }
            }
        } else {
            false
        };
        let ids: Vec<String> = wanted.iter().map(|(cid, _)| cid.clone()).collect();
        if let Err(why) = self.node.check_room(&ids) {
            tracing::warn!(pod_uid = %self.uid, migration = %id, %why, "move refused before the freeze");
            let _ = prepared.send(Err(MoveError::NoRoom(why)));
            return;
        }
        for (i, (_, name)) in wanted.iter().enumerate() {
            if let Err(e) = self.moves.begin_checkpoint(name, &id) {
                for (_, n) in &wanted[..i] {
                    let _ = self.moves.keep_running(n);
                }
                let _ = prepared.send(Err(MoveError::Busy(e.to_string())));
                return;
            }
        }
        let (ns, pod) = self.pod.as_ref().map_or_else(Default::default, |p| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        });
        let info = MoveInfo {
            id: id.clone(),
            namespace: ns,
            pod,
            pod_uid: self.uid.clone(),
            peer_node: Some(order.target.node.clone()),
            state: "Checkpointing".into(),
            ..Default::default()
        };
        if let Err(busy) = self.node.manager.begin(Role::Source, info) {
            for (_, n) in &wanted {
                let _ = self.moves.keep_running(n);
            }
            let _ = prepared.send(Err(MoveError::Busy(busy.to_string())));
            return;
        }
        tracing::info!(pod_uid = %self.uid, migration = %id, target = %order.target,
            containers = ?wanted.iter().map(|(_, n)| n).collect::<Vec<_>>(), "checkpointing for a move");
        let engine = self.node.engine.clone();
        let jobs: Vec<(String, String, PathBuf)> = wanted
            .iter()
            .filter_map(|(cid, name)| {
                Some((
                    cid.clone(),
                    name.clone(),
                    self.node.store.path_for(&self.uid, name)?,
                ))
            })
            .collect();
        // Journaled before the freeze: a daemon that dies from here on finds the move.
        let deadline_ms = journal::deadline_unix_ms(order.deadline);
        let mut entries: Vec<journal::Entry> = jobs
            .iter()
            .map(|(cid, name, dir)| journal::Entry {
                migration: id.clone(),
                side: journal::Side::Source,
                pod_uid: self.uid.clone(),
                container: name.clone(),
                container_id: cid.clone(),
                images: dir.clone(),
                target_namespace: order.target.namespace.clone(),
                target_pod: order.target.pod.clone(),
                peer_node: order.target.node.clone(),
                deadline_unix_ms: deadline_ms,
                step: journal::Step::Claimed,
                lazy: false,
            })
            .collect();
        for e in &entries {
            self.node.journal.record(e);
        }
        let streams = if lazy || !order.stream_pages || memory < STREAM_MIN_BYTES {
            Vec::new()
        } else {
            self.open_page_streams(&jobs, &order)
        };
        let (frozen_at, results, streams) = if lazy {
            let (at, results) = self.dump_lazy(&jobs, &id);
            (at, results, Vec::new())
        } else {
            dump_with_retries(&engine, &jobs, streams, &self.uid, &id)
        };
        let checkpoint_ms = frozen_at.elapsed().as_millis() as u64;
        let dumped = results.iter().all(|(_, _, r)| r.is_ok());
        let streamed = if dumped {
            self.streamed_figures(streams)
        } else {
            Ok(Vec::new())
        };
        let failure = results
            .iter()
            .find_map(|(name, _, r)| r.as_ref().err().map(|e| format!("container {name:?}: {e}")))
            .or_else(|| (results.len() != wanted.len()).then(|| "bad container name".to_owned()))
            .or_else(|| streamed.as_ref().err().cloned());
        let streamed = streamed.unwrap_or_default();
        let container_id = |name: &str| {
            jobs.iter()
                .find(|(_, n, _)| n == name)
                .map(|(cid, _, _)| cid.clone())
                .unwrap_or_default()
        };
        if let Some(reason) = failure {
            for (name, dir, r) in &results {
                if r.is_ok() {
                    // Dumped and frozen while another failed: it runs on.
                    let _ = self.moves.handed_over(name, dir.clone(), frozen_at);
                    self.resume_or_roll_back(name, &container_id(name));
                } else {
                    let _ = self.moves.keep_running(name);
                }
            }
            for e in &entries {
                self.node.journal.remove(e);
            }
            tracing::warn!(pod_uid = %self.uid, migration = %id, %reason, "checkpoint failed; the source keeps running");
            self.node
                .manager
                .finish(Role::Source, &id, "Failed", Some(reason.clone()));
            self.node.metrics.moved("source", "failed");
            let _ = prepared.send(Err(MoveError::Checkpoint(reason)));
            self.reconsider_parked();
            return;
        }
        let bytes: u64 = results
            .iter()
            .filter_map(|(_, _, r)| r.as_ref().ok().map(|r| r.image_bytes))
            .sum::<u64>()
            + streamed.iter().map(|(_, f)| f.bytes).sum::<u64>();
        self.node.metrics.checkpoint_bytes.inc_by(bytes);
        self.node.metrics.phase_ms("checkpoint", checkpoint_ms);
        let images: Vec<(String, PathBuf)> = results.into_iter().map(|(n, d, _)| (n, d)).collect();
        for (name, dir) in &images {
            let _ = self.moves.handed_over(name, dir.clone(), frozen_at);
        }
        for e in &mut entries {
            self.node.journal.advance(e, journal::Step::Dumped);
        }
        self.node.manager.update(Role::Source, &id, |i| {
            i.state = "Transferring".into();
            i.report.checkpoint_ms = checkpoint_ms;
            i.report.bytes = bytes;
        });
        tracing::info!(pod_uid = %self.uid, migration = %id, checkpoint_ms, bytes, "checkpoint handed over");
        let (vtx, vrx) = crossbeam_channel::bounded(1);
        if order.remote {
            self.node.manager.await_verdict(&id, vtx.clone());
        }
        let sent = prepared.send(Ok(Prepared {
            images: images.clone(),
            frozen_at,
            checkpoint_ms,
            bytes,
            lazy,
            streamed: streamed.clone(),
            choice,
            verdict: vtx,
        }));
        let verdict = if sent.is_err() {
            Verdict::Abort("the requester went away before the handover".into())
        } else {
            match vrx.recv_deadline(order.deadline) {
                Ok(v) => v,
                Err(_) => {
                    // Close the door first: a verdict that got in meanwhile was answered
                    // as taken, so it decides, not this node's own reading.
                    self.node.manager.stop_waiting(&id);
                    vrx.try_recv()
                        .unwrap_or_else(|_| self.verdict_without_answer(&order))
                }
            }
        };
        if order.remote {
            self.node.manager.settle_verdict(&id, &verdict);
        }
        match verdict {
            Verdict::Commit => {
                for e in &mut entries {
                    self.node.journal.advance(e, journal::Step::Committed);
                }
                if !lazy && !streamed.is_empty() {
                    self.learn_rates(&order, &id, bytes, checkpoint_ms, frozen_at);
                }
                // The target runs: this copy never does again. With lazy memory it still
                // serves the pages the target faults in, until every one has gone.
                let pages = self.serve_pages_to_the_end(&id);
                for (name, _) in &images {
                    if let Err(error) = self.node.engine.discard(&container_id(name)) {
                        tracing::warn!(pod_uid = %self.uid, container = %name, %error, "cannot stop the moved source");
                    }
                    match self.moves.commit(name, &order.target.to_string()) {
                        Ok(dir) => self.node.store.remove(&dir),
                        Err(e) => tracing::warn!(error = %e, "commit in an unexpected state"),
                    }
                }
                for e in &entries {
                    self.node.journal.remove(e);
                }
                tracing::info!(pod_uid = %self.uid, migration = %id, target = %order.target, "moved away");
                match pages {
                    Err(why) => {
                        self.node
                            .manager
                            .finish(Role::Source, &id, "Failed", Some(why));
                        self.node.metrics.moved("source", "failed");
                    }
                    Ok(()) => {
                        self.node
                            .manager
                            .finish(Role::Source, &id, "Succeeded", None);
                        self.node.metrics.moved("source", "succeeded");
                    }
                }
                self.assert_migrated_status();
            }
            Verdict::Abort(why) => {
                // The target never ran: nobody will read the pages.
                if let Some(server) = super::lock(&self.node.page_servers).remove(&id) {
                    server.abort();
                }
                for (name, _) in &images {
                    self.resume_or_roll_back(name, &container_id(name));
                }
                for e in &entries {
                    self.node.journal.remove(e);
                }
                tracing::warn!(pod_uid = %self.uid, migration = %id, reason = %why,
                    "move failed after the freeze; the source resumes from its checkpoint");
                self.node
                    .manager
                    .finish(Role::Source, &id, "RolledBack", Some(why.clone()));
                self.node.metrics.moved("source", "rolled_back");
                if order.remote {
                    // The target may be gone: make sure its Migration learns it.
                    self.node.report_done(
                        &order.target.namespace,
                        &order.target.pod,
                        &MigrationReport {
                            checkpoint_ms,
                            bytes,
                            error: Some(format!("rolled back on the source: {why}")),
                            ..Default::default()
                        },
                    );
                }
            }
        }
        self.reconsider_parked();
    }

    /// What the containers' cgroups charge now: about what a dump of them carries.
    fn memory_of(&self, containers: &[(String, String)]) -> u64 {
        let root = &self.node.settings.runc_root;
        containers
            .iter()
            .filter_map(|(cid, _)| podmig_cri_ext::freezer::memory_usage(root, cid))
            .sum()
    }

    /// `strategy: auto`: estimates the full move's frozen time from the containers'
    /// memory and the rates learned towards the target node, and chooses; an expected
    /// overrun of the budget is an Event on the Pod.
    fn choose_strategy(
        &self,
        bytes: u64,
        order: &MigrateOrder,
        why_not_lazy: Option<String>,
    ) -> super::estimate::Choice {
        let rates = self.node.learned.rates(&order.target.node);
        let c = super::estimate::choose(
            rates.full_frozen_ms(bytes),
            order.max_downtime_ms,
            why_not_lazy.map_or(Ok(()), Err),
        );
        tracing::info!(pod_uid = %self.uid, migration = %order.migration, bytes,
            estimate_ms = c.estimate_ms, budget_ms = c.budget_ms, strategy = c.strategy.as_str(),
            ?rates, "auto strategy chose");
        if c.over_budget()
            && let Some(p) = &self.pod
        {
            self.node.event_on_pod(
                &p.metadata.namespace.clone().unwrap_or_default(),
                &p.metadata.name.clone().unwrap_or_default(),
                "MigrationOverBudget",
                &c.reason,
            );
        }
        c
    }

    /// Learns the rates towards the target from a committed streamed full move (its
    /// restore time came with the verdict).
    fn learn_rates(
        &self,
        order: &MigrateOrder,
        id: &str,
        bytes: u64,
        dump_ms: u64,
        frozen_at: Instant,
    ) {
        let restore_ms = self
            .node
            .manager
            .get(id)
            .into_iter()
            .find(|m| m.role == "source")
            .map_or(0, |m| m.report.restore_ms);
        let frozen_ms = frozen_at.elapsed().as_millis() as u64;
        self.node
            .learned
            .learn(&order.target.node, bytes, dump_ms, restore_ms, frozen_ms);
        tracing::debug!(target_node = %order.target.node, rates = ?self.node.learned.rates(&order.target.node),
            "learned the rates of a full move");
    }

    /// Opens one page stream per container to the target before the freeze, so that the
    /// dump sends its pages there as it goes (see `stream.rs`). Empty when any cannot be
    /// opened: the pages then travel in the hand-over, as without streams.
    fn open_page_streams(
        &self,
        jobs: &[(String, String, PathBuf)],
        order: &MigrateOrder,
    ) -> Vec<PageStream> {
        let opened = || -> Result<Vec<PageStream>, String> {
            let peers = self.node.peers.clone().ok_or("no peer credentials")?;
            let host = self.node.node_address(&order.target.node)?;
            let limit = order.deadline.saturating_duration_since(Instant::now());
            jobs.iter()
                .map(|(_, name, _)| {
                    let tunnel = self
                        .node
                        .rt
                        .block_on(peers.open_page_stream(&host, &order.migration, name))
                        .map_err(|e| e.to_string())?;
                    PageStream::open(&self.node.rt, name, tunnel, limit).map_err(|e| e.to_string())
                })
                .collect()
        };
        opened().unwrap_or_else(|why| {
            tracing::warn!(pod_uid = %self.uid, migration = %order.migration, %why,
                "cannot stream the pages; they go in the hand-over");
            Vec::new()
        })
    }

    /// What each page stream carried, once the dump that fed it ended.
    fn streamed_figures(
        &self,
        streams: Vec<PageStream>,
    ) -> Result<Vec<(String, StreamFigures)>, String> {
        streams
            .into_iter()
            .map(|s| {
                let name = s.container.clone();
                self.node
                    .rt
                    .block_on(s.figures(Duration::from_secs(30)))
                    .map(|f| (name.clone(), f))
                    .map_err(|e| format!("container {name:?}: {e}"))
            })
            .collect()
    }

    /// Dumps the Pod's one container without its memory pages and registers the page
    /// server that serves them for move `id`.
    fn dump_lazy(
        &self,
        jobs: &[(String, String, PathBuf)],
        id: &str,
    ) -> (
        Instant,
        Vec<(String, PathBuf, podmig_cri_ext::Result<CheckpointReport>)>,
    ) {
        let frozen_at = Instant::now();
        let results = jobs
            .iter()
            .map(|(cid, name, dir)| {
                let options = CheckpointOptions {
                    image_path: dir.clone(),
                    keep_frozen: true,
                    ..Default::default()
                };
                let report =
                    self.node
                        .engine
                        .checkpoint_lazy(cid, &options)
                        .map(|(report, server)| {
                            super::lock(&self.node.page_servers)
                                .insert(id.to_owned(), Arc::new(server));
                            report
                        });
                (name.clone(), dir.clone(), report)
            })
            .collect();
        (frozen_at, results)
    }

    /// After the commit of a lazy move: waits until the page server has served every page
    /// (or failed, or ran out of [`PAGES_LIMIT`]). `Ok` for a full move.
    fn serve_pages_to_the_end(&self, id: &str) -> Result<(), String> {
        let Some(server) = super::lock(&self.node.page_servers).get(id).cloned() else {
            return Ok(());
        };
        let served = server.wait(PAGES_LIMIT).map_err(|e| {
            format!(
                "the target resumed, then the page stream broke ({e}); this copy was not \
                 resumed because the target had already run"
            )
        });
        if server.running() {
            server.abort();
        }
        super::lock(&self.node.page_servers).remove(id);
        match &served {
            Ok(()) => tracing::info!(pod_uid = %self.uid, migration = %id, "every page served"),
            Err(why) => {
                tracing::warn!(pod_uid = %self.uid, migration = %id, %why, "page serving failed")
            }
        }
        served
    }

    /// A frozen source container runs on; if it cannot be thawed, its next create
    /// restores it from its images instead.
    fn resume_or_roll_back(&mut self, name: &str, container_id: &str) {
        match self.node.engine.resume(container_id) {
            Ok(()) => {
                if let Ok(images) = self.moves.resume(name) {
                    self.node.store.remove(&images);
                }
                tracing::info!(pod_uid = %self.uid, container = %name, "source resumed in place");
            }
            Err(error) => {
                tracing::warn!(pod_uid = %self.uid, container = %name, %error,
                    "cannot thaw the source; it resumes from its checkpoint when restarted");
                let _ = self.node.engine.discard(container_id);
                let _ = self.moves.roll_back(name);
            }
        }
    }

    /// No verdict came by the deadline: the target Pod's reported phase decides.
    fn verdict_without_answer(&self, order: &MigrateOrder) -> Verdict {
        let no_answer = Verdict::Abort("no verdict from the target before the deadline".into());
        let Some(client) = self.node.kube.clone() else {
            return no_answer;
        };
        let api: kube::Api<Pod> = kube::Api::namespaced(client, &order.target.namespace);
        let got = self.node.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), api.get_opt(&order.target.pod)).await
        });
        let phase = match got {
            Ok(Ok(Some(p))) => p
                .metadata
                .annotations
                .and_then(|a| a.get(ANNOTATION_MIGRATION_PHASE).cloned()),
            _ => None,
        };
        match phase.as_deref().and_then(DaemonPhase::parse) {
            Some(DaemonPhase::Restored) => Verdict::Commit,
            _ => no_answer,
        }
    }

    fn checkpoint_for_cri(
        &mut self,
        container_id: &str,
        container: &str,
        options: &CheckpointOptions,
    ) -> podmig_cri_ext::Result<CheckpointReport> {
        self.moves
            .begin_checkpoint(container, "cri")
            .map_err(|e| podmig_cri_ext::Error::Refused(e.to_string()))?;
        let result = self.node.engine.checkpoint(container_id, options);
        match &result {
            Ok(report) if !options.leave_running => {
                let _ =
                    self.moves
                        .handed_over(container, options.image_path.clone(), Instant::now());
                // The caller owns the images; the container is gone from here.
                let _ = self.moves.commit(container, "a CRI CheckpointContainer");
                self.node
                    .metrics
                    .checkpoint_bytes
                    .inc_by(report.image_bytes);
                tracing::info!(
                    container_id,
                    dump_ms = report.duration.as_millis() as u64,
                    image_bytes = report.image_bytes,
                    "container checkpointed"
                );
            }
            Ok(_) => {
                let _ = self.moves.keep_running(container);
            }
            Err(error) => {
                let _ = self.moves.keep_running(container);
                tracing::warn!(container_id, %error, "checkpoint failed");
            }
        }
        result
    }

    /// The source Pod's containers that moved show `Terminated` with reason `Migrated`
    /// and the Pod is not Ready, so Services drop it and nobody alerts on a crash loop.
    /// Written again whenever the kubelet's own status write changed it back.
    fn assert_migrated_status(&self) {
        let migrated: HashMap<&String, &String> = self
            .moves
            .iter()
            .filter_map(|(n, s)| match s {
                MoveState::MigratedAway { target, .. } => Some((n, target)),
                _ => None,
            })
            .collect();
        let Some(pod) = &self.pod else { return };
        if migrated.is_empty() {
            return;
        }
        let status = pod.status.clone().unwrap_or_default();
        let statuses = status.container_statuses.clone().unwrap_or_default();
        let shows = |name: &String| {
            statuses.iter().any(|s| {
                &s.name == name
                    && s.state
                        .as_ref()
                        .and_then(|st| st.terminated.as_ref())
                        .is_some_and(|t| t.reason.as_deref() == Some(REASON_MIGRATED))
            })
        };
        if migrated.keys().all(|n| shows(n)) {
            return;
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let spec_names: Vec<String> = pod
            .spec
            .as_ref()
            .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default();
        let new_statuses: Vec<serde_json::Value> = spec_names
            .iter()
            .map(|name| {
                let old = statuses.iter().find(|s| &s.name == name);
                let mut v = old
                    .and_then(|o| serde_json::to_value(o).ok())
                    .unwrap_or_else(
                        || json!({"name": name, "image": "", "imageID": "", "restartCount": 0}),
                    );
                if let Some(target) = migrated.get(name) {
                    let started = v["state"]["running"]["startedAt"].clone();
                    v["ready"] = json!(false);
                    v["started"] = json!(false);
                    v["state"] = json!({"terminated": {"exitCode": 0, "reason": REASON_MIGRATED,
                        "message": format!("moved to {target}"), "startedAt": started, "finishedAt": now}});
                }
                v
            })
            .collect();
        let mut conditions: Vec<serde_json::Value> = status
            .conditions
            .clone()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .filter(|c| c["type"] != "Ready" && c["type"] != "ContainersReady")
            .collect();
        for ty in ["Ready", "ContainersReady"] {
            conditions.push(
                json!({"type": ty, "status": "False", "reason": REASON_MIGRATED,
                "message": "the Pod's containers were migrated", "lastTransitionTime": now}),
            );
        }
        if let Some(r) = &self.node.reporter {
            r.status(
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default(),
                json!({"containerStatuses": new_statuses, "conditions": conditions}),
            );
        }
    }
}

/// The images of container `name` and those of its siblings, from what the source handed over.
/// Checks what the source says each page stream carried against what arrived here.
fn check_streams(sink: &Sink, announced: &[(String, StreamFigures)]) -> Result<(), String> {
    for (container, sent) in announced {
        let got = sink.wait(container, Duration::from_secs(30))?;
        if got != *sent {
            return Err(format!(
                "the page stream of container {container:?} arrived damaged: the source sent \
                 {} bytes (CRC {:#010x}), {} bytes (CRC {:#010x}) arrived",
                sent.bytes, sent.crc, got.bytes, got.crc
            ));
        }
    }
    Ok(())
}

fn split_arrival(
    images: Vec<(String, PathBuf)>,
    name: &str,
) -> Result<(PathBuf, Vec<(String, PathBuf)>), String> {
    let (mine, others): (Vec<_>, Vec<_>) = images.into_iter().partition(|(n, _)| n == name);
    let dir = mine
        .into_iter()
        .next()
        .map(|(_, d)| d)
        .ok_or_else(|| format!("the source handed over no images of container {name:?}"))?;
    Ok((dir, others))
}

fn restore_from(images: &std::path::Path) -> Answer {
    Answer::RestoreFrom(RestoreFrom {
        image_path: images.display().to_string(),
        ..Default::default()
    })
}

/// One container's dump: its name, its images and how the dump went.
type Dumped = (String, PathBuf, podmig_cri_ext::Result<CheckpointReport>);

/// Freezes and dumps the Pod's containers; a multi-container dump that caught a Unix socket
/// connection between them half-made (its peer outside each container's dump) is thawed
/// and tried again, up to [`DUMP_ATTEMPTS`] times. The first attempt sends the pages into
/// `streams` (one per job, or none); the streams are spent then, so a later attempt writes
/// them into the images. Returns when the last freeze began, and the streams the final
/// results were sent into.
fn dump_with_retries<E: CheckpointEngine + 'static>(
    engine: &Arc<E>,
    jobs: &[(String, String, PathBuf)],
    mut streams: Vec<PageStream>,
    uid: &str,
    migration: &str,
) -> (Instant, Vec<Dumped>, Vec<PageStream>) {
    let mut attempt = 1;
    loop {
        let frozen_at = Instant::now();
        let nets: Vec<_> = jobs
            .iter()
            .map(|(_, name, _)| {
                streams
                    .iter()
                    .find(|s| s.container == *name)
                    .map(|s| s.net.clone())
            })
            .collect();
        let results = dump_all(engine, jobs, &nets, uid);
        let transient = jobs.len() > 1
            && results
                .iter()
                .any(|(_, _, r)| r.as_ref().is_err_and(|e| e.is_external_unix_socket()));
        if !transient || attempt >= DUMP_ATTEMPTS {
            return (frozen_at, results, streams);
        }
        // The target's page servers took one dump each: the next attempt writes locally.
        streams.clear();
        for ((cid, _, dir), (_, _, r)) in jobs.iter().zip(&results) {
            if r.is_ok() {
                let _ = engine.resume(cid);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!(pod_uid = %uid, migration, attempt,
            "a Unix socket between two containers was caught mid-connection; thawed, dumping again");
        // Jittered: an app that connects periodically must not meet every retry mid-way.
        let jitter = u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                % 37,
        );
        #[allow(clippy::disallowed_methods)] // the pod worker is a synchronous thread
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt) + jitter));
        attempt += 1;
    }
}

/// What a lazy move that lost pages after the resume tells its users (the policy).
pub fn pages_lost(why: &str) -> String {
    format!(
        "the page stream broke after the target resumed ({why}); the target was stopped so \
         that it never runs on missing memory, and the source was not resumed because the \
         target had already run: the Pod's in-memory state is lost"
    )
}

/// Below this much memory a full move's pages travel in the hand-over instead of page
/// streams: a streamed dump costs ~200 ms more than a local one whatever its size
/// (pingpong, 16 MiB: dump 344 against 183 ms), more than streaming saves on small Pods.
/// NB: that is CRIU's, measured with raw `criu dump --page-server` on loopback (16 MiB:
/// 268–283 ms against 76 ms local): it corks its page-server socket and sends the final
/// `PS_IOV_CLOSE` without a push, so the close waits out the kernel's 200 ms cork ceiling
/// (`page-xfer.c` `disconnect_from_page_server`); nothing on the receiving side shortens it.
pub const STREAM_MIN_BYTES: u64 = 64 << 20;

/// Longest a lazy move's pages may take to arrive after the target resumed.
pub const PAGES_LIMIT: Duration = Duration::from_secs(600);

/// How often a multi-container Pod is frozen and dumped again when the dump caught a
/// Unix socket connection between its containers half-made.
const DUMP_ATTEMPTS: u32 = 4;

/// Freezes every container of `jobs` at one instant (when more than one: state they share is
/// caught consistent), then dumps each in parallel, leaving a dumped one frozen.
fn dump_all<E: CheckpointEngine + 'static>(
    engine: &Arc<E>,
    jobs: &[(String, String, PathBuf)],
    streams: &[Option<Arc<podmig_cri_ext::lazy::PrivateNet>>],
    uid: &str,
) -> Vec<(String, PathBuf, podmig_cri_ext::Result<CheckpointReport>)> {
    if jobs.len() > 1 {
        let ids: Vec<&str> = jobs.iter().map(|(cid, _, _)| cid.as_str()).collect();
        if let Err(error) = engine.freeze_all(&ids) {
            tracing::warn!(pod_uid = %uid, %error, "cannot pre-freeze the Pod; each dump freezes its container");
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(i, (cid, name, dir))| {
                let engine = engine.clone();
                // Frozen, not killed: a failed move resumes it where it stopped.
                let options = CheckpointOptions {
                    image_path: dir.clone(),
                    keep_frozen: true,
                    stream_pages: streams.get(i).cloned().flatten(),
                    ..Default::default()
                };
                (
                    name.clone(),
                    dir.clone(),
                    s.spawn(move || engine.checkpoint(cid, &options)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, dir, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(podmig_cri_ext::Error::CheckpointFailed(
                        "dump thread panicked".into(),
                    ))
                });
                (name, dir, r)
            })
            .collect()
    })
}

#[cfg(test)]
mod dump_tests {
    use std::sync::Mutex;

    use super::*;

    /// Engine whose dump of container `a` finds an external Unix socket the first
    /// `external` times; records what was asked of it.
    struct Scripted {
        external: Mutex<u32>,
        calls: Mutex<Vec<String>>,
    }

    impl CheckpointEngine for Scripted {
        fn checkpoint(
            &self,
            id: &str,
            opts: &CheckpointOptions,
        ) -> podmig_cri_ext::Result<CheckpointReport> {
            self.calls.lock().expect("calls").push(format!("dump {id}"));
            let mut left = self.external.lock().expect("left");
            if id == "a" && *left > 0 {
                *left -= 1;
                return Err(podmig_cri_ext::Error::CheckpointFailed(
                    "Error (criu/sk-unix.c:874): unix: External socket is used.".into(),
                ));
            }
            std::fs::create_dir_all(&opts.image_path).expect("mkdir");
            Ok(CheckpointReport {
                duration: Duration::ZERO,
                image_bytes: 1,
                filesystem: Default::default(),
            })
        }

        fn resume(&self, id: &str) -> podmig_cri_ext::Result<()> {
            self.calls
                .lock()
                .expect("calls")
                .push(format!("resume {id}"));
            Ok(())
        }
    }

    fn run(external: u32, containers: &[&str]) -> (Vec<String>, Vec<bool>) {
        let tmp = tempfile::tempdir().expect("tmp");
        let engine = Arc::new(Scripted {
            external: Mutex::new(external),
            calls: Mutex::default(),
        });
        let jobs: Vec<(String, String, PathBuf)> = containers
            .iter()
            .map(|c| (c.to_string(), c.to_string(), tmp.path().join(c)))
            .collect();
        let (_, results, _) = dump_with_retries(&engine, &jobs, Vec::new(), "uid", "m");
        let ok = results.iter().map(|(_, _, r)| r.is_ok()).collect();
        let mut calls = engine.calls.lock().expect("calls").clone();
        calls.sort();
        (calls, ok)
    }

    #[test]
    fn a_connection_between_containers_caught_at_the_freeze_is_dumped_again() {
        let (calls, ok) = run(1, &["a", "b"]);
        assert_eq!(ok, [true, true]);
        // The first attempt's dumped container was thawed before the second freeze.
        assert_eq!(calls, ["dump a", "dump a", "dump b", "dump b", "resume b"]);
    }

    #[test]
    fn a_lasting_connection_fails_after_the_last_attempt() {
        let (calls, ok) = run(99, &["a", "b"]);
        assert_eq!(ok, [false, true]);
        let dumps = calls.iter().filter(|c| *c == "dump a").count();
        assert_eq!(dumps, DUMP_ATTEMPTS as usize);
    }

    #[test]
    fn a_single_container_with_an_outside_peer_is_not_retried() {
        let (calls, ok) = run(1, &["a"]);
        assert_eq!(ok, [false]);
        assert_eq!(calls, ["dump a"]);
    }
}
