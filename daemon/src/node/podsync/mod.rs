//! The Pod workers, mirroring kubelet's pod sync loop: one thread per Pod applies that
//! Pod's updates one at a time, in order — the API server's view of it, the runtime's
//! create/kill/restored events from `podmig-runc`, and moves. A move of a source Pod
//! (thesis §5.5.3) takes the first channel back to its requester once the checkpoint
//! exists, then blocks on a second channel until the target's verdict: meanwhile nothing
//! else — a restart, a kill — touches the Pod; those updates wait in its queue.
//!
//! Workers are threads because dumps and restores are blocking calls to runc; the async
//! side hands them updates through `crossbeam-channel` and awaits `tokio` oneshot answers.

mod address;
mod dump;
mod errors;
mod fetch;
mod handover;
mod restore;
mod restore_group;
mod source;

pub use crate::node::orders::{MigrateOrder, MoveError, PodUpdate, Prepared, TargetRef};
pub use dump::STREAM_MIN_BYTES;
use dump::*;
use errors::*;
use fetch::*;
use restore::*;
pub use restore::{Delivery, NotTaken, PAGES_LIMIT, pages_lost, verdict_not_taken};
use restore_group::*;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use k8s_openapi::api::core::v1::Pod;
use podmig_api::{ANNOTATION_MIGRATE_FROM, REASON_MIGRATED, v1alpha1::MigrationReport};
use podmig_cri_ext::{
    engine::{CheckpointEngine, CheckpointOptions, CheckpointReport},
    proto::hook::v1::{ContainerIdentity, NoOp, Pass, Refuse, hook_response::Decision as Answer},
};
use serde_json::json;
use tokio::sync::oneshot;

use crate::controller::pod::{has_finalizer, is_deleting};

use super::{
    shared::Node,
    state::{CreateAnswer, KillAnswer, MoveState, PodMoves},
};

struct ParkedKill {
    container: String,
    reply: oneshot::Sender<Answer>,
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
    /// A target's address taken over from its source (announced when the move commits).
    kept_ip: Option<address::KeptIp>,
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
            kept_ip: None,
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
            PodUpdate::MovedAway {
                container,
                migration,
                target,
            } => {
                if let Err(error) = self.moves.moved_away(&container, &migration, &target) {
                    tracing::warn!(pod_uid = %self.uid, %error, "cannot mark a container moved away");
                }
            }
        }
    }

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
        let got = self.node.wait_on(async {
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

    fn on_create(&mut self, c: ContainerIdentity, reply: oneshot::Sender<Answer>) {
        let name = c.container_name.clone();
        let target = c
            .annotations
            .get(ANNOTATION_MIGRATE_FROM)
            .is_some_and(|v| !v.is_empty());
        if target && self.node.manager.restarts_refused(&self.uid) {
            let _ = reply.send(Answer::Refuse(Refuse {
                reason: "the move into this Pod failed when the node's daemon restarted".into(),
            }));
            return;
        }
        // A restored member of a failed multi-container move was stopped; the kubelet's
        // restart of it must not start a fresh copy in the target Pod.
        if let Some(why) = self
            .group
            .as_ref()
            .filter(|_| target)
            .and_then(|g| g.plan.failure())
        {
            let reason = format!("the move of this Pod failed: {why}");
            tracing::info!(pod_uid = %self.uid, container = %name, %reason, "refusing create");
            let _ = reply.send(Answer::Refuse(Refuse { reason }));
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
                        mv: None,
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

/// The Pod workers of a node: one per Pod, started by its first update.
impl<E: CheckpointEngine> Node<E> {
    /// Hands `update` to the worker of Pod `uid`, starting one when there is none.
    pub fn dispatch(self: &Arc<Self>, uid: &str, update: PodUpdate) {
        let mut workers = crate::node::shared::lock(&self.workers);
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
        PodWorker::spawn(self.clone(), uid.to_owned(), rx);
    }

    /// A worker whose Pod is gone asks to end; refused while updates wait for it.
    pub(crate) fn retire_worker(&self, uid: &str, rx: &Receiver<PodUpdate>) -> bool {
        let mut workers = crate::node::shared::lock(&self.workers);
        if !rx.is_empty() {
            return false;
        }
        workers.remove(uid);
        true
    }
}
