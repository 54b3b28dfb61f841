//! Target side, first half: a migration target's container is created; which move it is
//! (as the API server records it), its record, where its checkpoint comes from — the
//! store, the source's worker on this node, or the source node's daemon (`handover.rs`) —
//! and the runtime is told to restore it.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_MIGRATION_DEADLINE, ANNOTATION_MIGRATION_ID,
    ANNOTATION_MIGRATION_STRATEGY, ANNOTATION_SOURCE_NODE,
    nodeapi::MoveInfo,
    v1alpha1::{MigrationReport, Strategy},
};
use podmig_cri_ext::{
    engine::{CheckpointEngine, dir_size},
    identity::find_container,
    lazy::LazyPages,
    proto::hook::v1::{ContainerIdentity, Refuse, hook_response::Decision as Answer},
};
use tokio::sync::oneshot;

use crate::node::{group::TargetGroup, journal, migration::Role};

use crate::node::moves::{EntryFor, Move, ReportTo};

use super::*;
use crate::node::migration::MovePhase;

/// How long a target's create waits for the controller's record of it to appear.
pub(super) const TARGET_RECORD_WAIT: Duration = Duration::from_secs(10);

/// The target end of a lazy move: CRIU's lazy-pages daemon and what the tunnel saw.
pub(super) struct LazyTarget {
    pub(super) pages: Arc<LazyPages>,
    /// Set when the source's side of the tunnel ended before the pages were all in (the
    /// restored container was frozen then).
    pub(super) broke: Arc<std::sync::atomic::AtomicBool>,
}

/// A checkpoint that arrived for a target container.
pub(super) struct Arrival {
    pub(super) dir: PathBuf,
    /// The checkpoints of the Pod's other containers, frozen and dumped with it.
    pub(super) others: Vec<(String, PathBuf)>,
    pub(super) handback: Handback,
    pub(super) frozen_at: Option<Instant>,
    pub(super) report: MigrationReport,
    pub(super) lazy: Option<LazyTarget>,
}

/// A target container's move, as the API server records it (or, without API access, as
/// its annotations say).
pub(super) struct Incoming {
    /// The move.
    pub(super) id: String,
    /// The source Pod.
    pub(super) source_uid: String,
    /// The source's node, when known.
    pub(super) source_node: Option<String>,
    /// When the source stops waiting.
    pub(super) deadline: Instant,
    /// How the controller asked to carry the memory.
    pub(super) strategy: Strategy,
    /// `auto`: the downtime budget, ms.
    pub(super) max_downtime_ms: u32,
    /// Set when the kubelet's runtime request timeout, not the move's, bounds `deadline`:
    /// the part of it the create may wait, and the timeout.
    pub(super) kubelet_bound: Option<(Duration, Duration)>,
}

impl Incoming {
    /// Why the checkpoint did not come: past a deadline the kubelet's timeout set, the
    /// failure says so (the cause alone would only name a broken transfer).
    fn explain(&self, cause: FetchError) -> FetchError {
        match self.kubelet_bound {
            // The source is given whole seconds (rounded down): it may give up to a
            // second before this deadline.
            Some((share, timeout))
                if Instant::now() + Duration::from_millis(1500) >= self.deadline =>
            {
                FetchError::KubeletTimeout {
                    share,
                    timeout,
                    cause: Box::new(cause),
                }
            }
            _ => cause,
        }
    }
}

impl<E: CheckpointEngine> PodWorker<E> {
    /// A migration target's container, top to bottom: which move it is, its record, the
    /// source's checkpoint — from the store, from the source's worker on this node, or from
    /// the source node's daemon — then the restore.
    pub(super) fn fetch(&mut self, c: ContainerIdentity, reply: oneshot::Sender<Answer>) {
        let incoming = match self.incoming(&c) {
            Ok(i) => i,
            Err(reason) => return self.refuse_untrusted(&c, reason, reply),
        };
        if let Some(answer) = self.restore_from_group(&c, &incoming.id) {
            let _ = reply.send(answer);
            return;
        }
        let mv = match self.begin_receive(&c, &incoming) {
            Ok(mv) => mv,
            Err(reason) => {
                let _ = reply.send(Answer::Refuse(Refuse {
                    reason: reason.to_string(),
                }));
                return;
            }
        };
        tracing::info!(pod_uid = %self.uid, container = %c.container_name, migration = %incoming.id,
            source_pod_uid = %incoming.source_uid, source_node = ?incoming.source_node,
            "fetching checkpoint for a migration target");
        self.kept_ip = self.address_taken_over(&c, incoming.source_node.as_deref());
        let arrival = match self.arrival(&c, &incoming) {
            Ok(a) if reply.is_closed() => Err(self.nobody_restores(a)),
            Err(cause) => Err(incoming.explain(cause)),
            ok => ok,
        };
        match arrival {
            Err(reason) => self.refuse_arrival(&c, mv, reason, reply),
            Ok(a) => self.restore_arrival(&c, mv, incoming, a, reply),
        }
    }

    /// The move this target container is part of; `Err`: not one podmig's controller made.
    fn incoming(&self, c: &ContainerIdentity) -> Result<Incoming, Untrusted> {
        // With API access, the move is what the API server records, never what the
        // container's annotations (written by whoever made the Pod) claim.
        let verified = self.verify_target(c)?;
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
        // The kubelet gives up on this create after its runtime request timeout: the
        // checkpoint must be here in time for the restore to fit in it too.
        let timeout = self.node.settings.runtime_request_timeout;
        let share = crate::node::shared::create_share(timeout);
        let of_move = deadline_from(
            ann.get(ANNOTATION_MIGRATION_DEADLINE),
            self.node.settings.hold,
        );
        let of_kubelet = Instant::now() + share;
        let (deadline, kubelet_bound) = if of_kubelet < of_move {
            (of_kubelet, Some((share, timeout)))
        } else {
            (of_move, None)
        };
        Ok(Incoming {
            id: if id.is_empty() { self.uid.clone() } else { id },
            source_uid,
            source_node,
            deadline,
            kubelet_bound,
            // No annotation: the controller asked for `full`.
            strategy: ann
                .get(ANNOTATION_MIGRATION_STRATEGY)
                .and_then(|s| Strategy::parse(s))
                .unwrap_or(Strategy::Full),
            max_downtime_ms: ann
                .get(podmig_api::ANNOTATION_MAX_DOWNTIME)
                .and_then(|v| v.parse().ok())
                .unwrap_or(podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS),
        })
    }

    /// A target podmig's controller did not make: refused, with an Event on its Pod.
    fn refuse_untrusted(
        &self,
        c: &ContainerIdentity,
        reason: Untrusted,
        reply: oneshot::Sender<Answer>,
    ) {
        let reason = reason.to_string();
        tracing::warn!(pod_uid = %self.uid, namespace = %c.pod_namespace, pod = %c.pod_name,
            %reason, "refused a migration target podmig's controller did not make");
        self.node.metrics.moved(Role::Target, MovePhase::Refused);
        self.node.event_on_pod(
            &c.pod_namespace,
            &c.pod_name,
            "MigrationTargetRefused",
            &reason,
        );
        let _ = reply.send(Answer::Refuse(Refuse {
            reason: format!("Refused: {reason}"),
        }));
    }

    /// The container's state and the move's record, journaled as receiving.
    fn begin_receive(&mut self, c: &ContainerIdentity, i: &Incoming) -> Result<Move, FetchError> {
        let name = &c.container_name;
        self.moves.begin_receive(name, &i.id)?;
        let target = ReportTo::pod_of(c);
        let images = self
            .node
            .store
            .path_for(&self.uid, name)
            .unwrap_or_default();
        let entry = EntryFor {
            migration: &i.id,
            side: journal::Side::Target,
            pod_uid: &self.uid,
            peer_node: i.source_node.as_deref().unwrap_or_default(),
            target: &target,
            deadline_unix_ms: journal::deadline_unix_ms(i.deadline),
        }
        .entry(name, "", images, journal::Step::Receiving);
        let info = MoveInfo {
            id: i.id.clone(),
            namespace: c.pod_namespace.clone(),
            pod: c.pod_name.clone(),
            pod_uid: self.uid.clone(),
            peer_node: i.source_node.clone(),
            state: MovePhase::Checkpointing,
            ..Default::default()
        };
        match Move::begin(
            &self.node,
            Role::Target,
            info,
            target.clone(),
            vec![entry.clone()],
        ) {
            Ok(mv) => Ok(mv),
            // A create asked again for the move it is already part of.
            Err(busy) if busy.0 == i.id => Ok(Move::rejoin(
                &self.node,
                Role::Target,
                &i.id,
                target,
                vec![entry],
            )),
            Err(busy) => {
                let _ = self.moves.abandon(name, &busy.to_string());
                Err(busy.into())
            }
        }
    }

    /// Where the checkpoint comes from: the store, the source's worker here, or the source
    /// node's daemon.
    fn arrival(&mut self, c: &ContainerIdentity, i: &Incoming) -> Result<Arrival, FetchError> {
        let name = &c.container_name;
        let local_node = self.node.settings.node_name.clone();
        let stored = self
            .node
            .store
            .path_for(&i.source_uid, name)
            .filter(|d| self.node.store.has_checkpoint(d));
        let running_here =
            || find_container(&self.node.settings.runc_root, &i.source_uid, name).is_some();
        if i.source_uid == self.uid {
            Err(FetchError::OwnSource)
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
            self.fetch_local(c, &i.source_uid, &i.id, i.deadline)
        } else if let Some(node) = i.source_node.clone().filter(|n| *n != local_node) {
            self.fetch_remote(c, i, &node)
        } else {
            Err(FetchError::NoSource {
                container: name.clone(),
                source_uid: i.source_uid.clone(),
            })
        }
    }

    /// The runtime stopped waiting: nobody will restore what arrived; the source resumes.
    fn nobody_restores(&self, a: Arrival) -> FetchError {
        if let Some(l) = &a.lazy {
            l.pages.kill();
        }
        let _ = self.hand_back(&a.handback, false, "the target's runtime stopped waiting");
        if matches!(a.handback, Handback::Remote { .. }) {
            self.node.store.remove(&a.dir);
            for (_, d) in &a.others {
                self.node.store.remove(d);
            }
        }
        FetchError::RuntimeGone
    }

    /// No checkpoint: the create is refused and the move ends failed.
    fn refuse_arrival(
        &mut self,
        c: &ContainerIdentity,
        mv: Move,
        reason: FetchError,
        reply: oneshot::Sender<Answer>,
    ) {
        let reason = reason.to_string();
        tracing::warn!(pod_uid = %self.uid, container = %c.container_name, migration = %mv.id(),
            %reason, "migration target refused");
        let _ = self.moves.abandon(&c.container_name, &reason);
        mv.finish_reported(
            &self.node,
            MovePhase::Failed,
            &MigrationReport {
                error: Some(reason.clone()),
                ..Default::default()
            },
        );
        let _ = reply.send(Answer::Refuse(Refuse { reason }));
    }

    /// The checkpoint is here: the runtime is told to restore it (lazily: with the
    /// lazy-pages daemon's socket), and the restore is remembered until it reports back.
    fn restore_arrival(
        &mut self,
        c: &ContainerIdentity,
        mut mv: Move,
        i: Incoming,
        a: Arrival,
        reply: oneshot::Sender<Answer>,
    ) {
        let name = c.container_name.clone();
        if let Err(e) = self.moves.begin_restore(&name, a.dir.clone()) {
            let _ = reply.send(Answer::Refuse(Refuse {
                reason: e.to_string(),
            }));
            return;
        }
        mv.figures(&self.node, |r| *r = a.report.clone());
        mv.set_lazy(a.lazy.is_some());
        mv.advance(&self.node, journal::Step::Restoring);
        tracing::info!(pod_uid = %self.uid, container = %name, images = %a.dir.display(),
            since_freeze_ms = a.frozen_at.map_or(0, |t| t.elapsed().as_millis() as u64),
            "restoring container");
        self.announce_kept_address();
        let _ = reply.send(match &a.lazy {
            // The lazy-pages daemon's socket is in the images directory.
            Some(_) => self.restore_answer(&a.dir, true),
            None => self.restore_answer(&a.dir, false),
        });
        let Arrival {
            dir,
            others,
            handback,
            frozen_at,
            report,
            lazy,
        } = a;
        let (handback, mv) = if others.is_empty() {
            (handback, Some(mv))
        } else {
            // Every container was frozen and dumped together: they commit together.
            let mut dirs = vec![(name.clone(), dir.clone(), dir_size(&dir))];
            dirs.extend(
                others
                    .iter()
                    .map(|(n, d)| (n.clone(), d.clone(), dir_size(d))),
            );
            let group = GroupMove {
                plan: TargetGroup::new(&i.id, dirs, i.deadline),
                handback,
                frozen_at,
                report: report.clone(),
                source_uid: i.source_uid.clone(),
                namespace: c.pod_namespace.clone(),
                pod: c.pod_name.clone(),
                mv: Some(mv),
                filesystem: (0, 0),
            };
            self.begin_group(&name, group);
            (Handback::Group, None)
        };
        self.pending.insert(
            name,
            PendingRestore {
                mv,
                handback,
                images: dir,
                migration: i.id,
                frozen_at,
                report,
                source_uid: i.source_uid,
                lazy,
            },
        );
    }

    /// The move of this target container as the API server records it (`None`: no API
    /// access, the standalone engine). `Err`: not a target podmig's controller made, or
    /// not one for this node.
    pub(super) fn verify_target(
        &self,
        c: &ContainerIdentity,
    ) -> Result<Option<crate::node::trust::VerifiedTarget>, Untrusted> {
        let Some(client) = self.node.kube.clone() else {
            return Ok(None);
        };
        let v = self.node.wait_on(crate::node::trust::verify_within(
            &client,
            &c.pod_namespace,
            &c.pod_name,
            TARGET_RECORD_WAIT,
        ))?;
        let here = &self.node.settings.node_name;
        if v.target_uid != self.uid {
            return Err(Untrusted::OtherPod {
                namespace: v.namespace,
                pod: v.target_pod,
                recorded: v.target_uid,
                here: self.uid.clone(),
            });
        }
        if !here.is_empty() && v.target_node != *here {
            return Err(Untrusted::OtherNode {
                namespace: v.namespace,
                pod: v.target_pod,
                recorded: v.target_node,
                here: here.clone(),
            });
        }
        Ok(Some(v))
    }
}
