//! Target side of a multi-container move: every container restores the checkpoint that
//! came with the first one, and the move commits or fails as one.

use std::{path::PathBuf, time::Instant};

use podmig_api::{ANNOTATION_SOURCE_NODE, v1alpha1::MigrationReport};
use podmig_cri_ext::{
    engine::CheckpointEngine,
    proto::hook::v1::{
        ContainerIdentity, Refuse, RestoreResult, hook_response::Decision as Answer,
    },
};

use crate::node::{
    group::{Step, TargetGroup},
    journal,
};

use crate::node::moves::{EntryFor, Move, ReportTo};

use super::*;
use crate::node::migration::MovePhase;

/// A multi-container move being restored into this (target) Pod.
pub(super) struct GroupMove {
    pub(super) plan: TargetGroup,
    pub(super) handback: Handback,
    pub(super) frozen_at: Option<Instant>,
    pub(super) report: MigrationReport,
    pub(super) source_uid: String,
    pub(super) namespace: String,
    pub(super) pod: String,
    /// The move's record, with every member's journal entry; taken when it is settled.
    pub(super) mv: Option<Move>,
    /// File-system state of all containers: bytes, capture ms.
    pub(super) filesystem: (u64, u64),
}

impl<E: CheckpointEngine> PodWorker<E> {
    /// The first container of a multi-container move is restoring: the others will
    /// restore the checkpoints that came with it.
    pub(super) fn begin_group(&mut self, first: &str, mut group: GroupMove) {
        group.plan.take(first);
        tracing::info!(pod_uid = %self.uid, migration = %group.plan.migration,
            containers = ?group.plan.containers(), "restoring a multi-container move");
        self.group = Some(group);
    }

    /// A later container of a multi-container move: restore the checkpoint that came with
    /// the first one. `None` when no group move `id` is under way here.
    pub(super) fn restore_from_group(&mut self, c: &ContainerIdentity, id: &str) -> Option<Answer> {
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
        let target = ReportTo::pod_of(c);
        let peer_node = c.annotations.get(ANNOTATION_SOURCE_NODE);
        let entry = EntryFor {
            migration: id,
            side: journal::Side::Target,
            pod_uid: &self.uid,
            peer_node: peer_node.map_or("", String::as_str),
            target: &target,
            deadline_unix_ms: journal::deadline_unix_ms(Instant::now() + left),
        }
        .entry(&name, "", dir.clone(), journal::Step::Restoring);
        if let Some(mv) = self.group.as_mut().and_then(|g| g.mv.as_mut()) {
            mv.journal(&self.node, entry);
        }
        tracing::info!(pod_uid = %self.uid, container = %name, migration = %id,
            images = %dir.display(), "restoring container of a multi-container move");
        self.pending.insert(
            name,
            PendingRestore {
                mv: None,
                handback: Handback::Group,
                images: dir.clone(),
                migration: id.to_owned(),
                frozen_at,
                report: MigrationReport::default(),
                source_uid,
                lazy: None,
            },
        );
        Some(self.restore_answer(&dir, false))
    }

    /// Records one container's restore in its group; settles the move when it is the
    /// last one or a failure.
    pub(super) fn settle_group_member(
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
    pub(super) fn fail_group(&mut self, reason: String, stop: Vec<String>, drop: Vec<PathBuf>) {
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
    pub(super) fn finish_group(&mut self, failure: Option<String>) {
        let Some(mut g) = self.group.take() else {
            return;
        };
        let mut error = failure;
        self.restored_kept_address();
        // Recorded first: a source the verdict cannot reach reads it at its deadline.
        let seen = error.is_none()
            && matches!(g.handback, Handback::Remote { .. })
            && g.mv
                .as_ref()
                .is_some_and(|mv| mv.record_restored(&self.node, RECORD_MARGIN));
        let delivered = self.hand_back_after(
            &g.handback,
            error.is_none(),
            error.as_deref().unwrap_or(""),
            Some(g.plan.restore_ms()),
        );
        if error.is_none()
            && let Some(why) = verdict_not_taken(&delivered, seen)
        {
            tracing::warn!(pod_uid = %self.uid, migration = %g.plan.migration, %why,
                "the source did not take the commit; stopping the restored containers");
            for id in g.plan.restored_ids() {
                let _ = self.node.engine.discard(&id);
            }
            g.plan.abandon(&why.to_string());
            error = Some(why.to_string());
        }
        self.settle_kept_address(error.is_none());
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
            MovePhase::Succeeded
        } else {
            MovePhase::Failed
        };
        if error.is_none() {
            tracing::info!(pod_uid = %self.uid, migration = %g.plan.migration, frozen_ms,
                containers = report.containers.len(), "every container restored");
            self.node.metrics.frozen.observe(frozen_ms as f64 / 1000.0);
        } else {
            tracing::warn!(pod_uid = %self.uid, migration = %g.plan.migration,
                error = ?report.error, "multi-container move failed; the source resumes");
        }
        match g.mv.take() {
            Some(mv) => mv.finish_reported(&self.node, outcome, &report),
            // Settled before (a failed group's late member): the Pod hears it again.
            None => self.node.report_done(&g.namespace, &g.pod, &report),
        }
        if error.is_some() {
            // Kept so that the containers' retried creates are refused with the reason.
            self.group = Some(g);
        }
    }

    /// A group still waiting for creates past its deadline fails.
    pub(super) fn expire_group(&mut self) {
        let step = self
            .group
            .as_mut()
            .and_then(|g| g.plan.expire(Instant::now()));
        if let Some(Step::Failed { reason, stop, drop }) = step {
            self.fail_group(reason, stop, drop);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::node::{group::TargetGroup, state::PodMoves};

    /// A worker of a target Pod whose two-container move failed after `app` restored.
    fn worker_after_a_failed_group(
        tmp: &std::path::Path,
    ) -> PodWorker<crate::node::tests::FakeEngine> {
        let node = crate::node::tests::node(tmp, false);
        let mut plan = TargetGroup::new(
            "m1",
            vec![
                ("app".into(), tmp.join("app"), 1),
                ("sidecar".into(), tmp.join("sidecar"), 1),
            ],
            Instant::now() + std::time::Duration::from_secs(30),
        );
        plan.take("app");
        plan.record("app", "id-app", true, "", 5);
        plan.take("sidecar");
        let step = plan.record("sidecar", "id-sidecar", false, "CRIU: no such file", 5);
        assert!(matches!(step, crate::node::group::Step::Failed { .. }));
        let mut moves = PodMoves::default();
        // The restored member ends as a target that arrived: a create alone would pass.
        moves.begin_receive("app", "m1").expect("receive");
        moves
            .begin_restore("app", tmp.join("app"))
            .expect("restore");
        moves.restored("app", true).expect("restored");
        PodWorker {
            node,
            uid: "target-uid".into(),
            pod: None,
            moves,
            parked: Vec::new(),
            pending: HashMap::new(),
            group: Some(GroupMove {
                plan,
                handback: Handback::Group,
                frozen_at: None,
                report: MigrationReport::default(),
                source_uid: "source-uid".into(),
                namespace: "ns".into(),
                pod: "web-1".into(),
                mv: None,
                filesystem: (0, 0),
            }),
            paging: None,
            kept_ip: None,
            gone: false,
        }
    }

    fn create(w: &mut PodWorker<crate::node::tests::FakeEngine>, name: &str) -> Answer {
        let (tx, mut rx) = oneshot::channel();
        let c = ContainerIdentity {
            container_id: format!("restart-{name}"),
            pod_uid: "target-uid".into(),
            pod_name: "web-1".into(),
            pod_namespace: "ns".into(),
            container_name: name.into(),
            annotations: [(
                podmig_api::ANNOTATION_MIGRATE_FROM.to_owned(),
                "source-uid".to_owned(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        w.on_create(c, tx);
        rx.try_recv().expect("answered at once")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_group_refuses_the_kubelets_restart_of_a_member_that_had_restored() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut w = worker_after_a_failed_group(tmp.path());
        for name in ["app", "sidecar"] {
            match create(&mut w, name) {
                Answer::Refuse(r) => assert!(
                    r.reason.contains("the move of this Pod failed")
                        && r.reason.contains("CRIU: no such file"),
                    "{name}: {}",
                    r.reason
                ),
                other => panic!("{name}: a fresh copy would start: {other:?}"),
            }
        }
    }
}
