//! Source side of a move: claim the containers, choose the strategy, freeze and dump
//! (`dump.rs`), hand the checkpoint over, wait for the target's verdict, then commit (stop
//! this copy) or abort (resume it).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use podmig_api::{
    ANNOTATION_MIGRATION_PHASE,
    contract::DaemonPhase,
    nodeapi::MoveInfo,
    v1alpha1::{MigrationReport, Strategy},
};
use podmig_cri_ext::{engine::CheckpointEngine, identity::running_containers};
use tokio::sync::oneshot;

use crate::node::{
    journal,
    migration::{Role, Verdict},
};

use super::*;
use crate::node::migration::MovePhase;

impl<E: CheckpointEngine> PodWorker<E> {
    pub(super) fn migrate(
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
            state: MovePhase::Checkpointing,
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
                .finish(Role::Source, &id, MovePhase::Failed, Some(reason.clone()));
            self.node.metrics.moved(Role::Source, MovePhase::Failed);
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
            i.state = MovePhase::Transferring;
            i.report.checkpoint_ms = checkpoint_ms;
            i.report.bytes = bytes;
        });
        tracing::info!(pod_uid = %self.uid, migration = %id, checkpoint_ms, bytes, "checkpoint handed over");
        let (vtx, vrx) = crossbeam_channel::bounded(1);
        if order.remote {
            let _ = self.node.manager.await_verdict(&id, vtx.clone());
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
                            .finish(Role::Source, &id, MovePhase::Failed, Some(why));
                        self.node.metrics.moved(Role::Source, MovePhase::Failed);
                    }
                    Ok(()) => {
                        self.node
                            .manager
                            .finish(Role::Source, &id, MovePhase::Succeeded, None);
                        self.node.metrics.moved(Role::Source, MovePhase::Succeeded);
                    }
                }
                self.assert_migrated_status();
            }
            Verdict::Abort(why) => {
                // The target never ran: nobody will read the pages.
                if let Some(server) = self.node.manager.take_page_server(&id) {
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
                self.node.manager.finish(
                    Role::Source,
                    &id,
                    MovePhase::RolledBack,
                    Some(why.clone()),
                );
                self.node.metrics.moved(Role::Source, MovePhase::RolledBack);
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
    pub(super) fn memory_of(&self, containers: &[(String, String)]) -> u64 {
        let root = &self.node.settings.runc_root;
        containers
            .iter()
            .filter_map(|(cid, _)| podmig_cri_ext::freezer::memory_usage(root, cid))
            .sum()
    }

    /// `strategy: auto`: estimates the full move's frozen time from the containers'
    /// memory and the rates learned towards the target node, and chooses; an expected
    /// overrun of the budget is an Event on the Pod.
    pub(super) fn choose_strategy(
        &self,
        bytes: u64,
        order: &MigrateOrder,
        why_not_lazy: Option<String>,
    ) -> crate::node::estimate::Choice {
        let rates = self.node.learned.rates(&order.target.node);
        let c = crate::node::estimate::choose(
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
    pub(super) fn learn_rates(
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
            .find(|m| m.role == Role::Source)
            .map_or(0, |m| m.report.restore_ms);
        let frozen_ms = frozen_at.elapsed().as_millis() as u64;
        self.node
            .learned
            .learn(&order.target.node, bytes, dump_ms, restore_ms, frozen_ms);
        tracing::debug!(target_node = %order.target.node, rates = ?self.node.learned.rates(&order.target.node),
            "learned the rates of a full move");
    }

    /// After the commit of a lazy move: waits until the page server has served every page
    /// (or failed, or ran out of [`PAGES_LIMIT`]). `Ok` for a full move.
    pub(super) fn serve_pages_to_the_end(&self, id: &str) -> Result<(), String> {
        let Some(server) = self.node.manager.page_server(id) else {
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
        self.node.manager.take_page_server(id);
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
    pub(super) fn resume_or_roll_back(&mut self, name: &str, container_id: &str) {
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
    pub(super) fn verdict_without_answer(&self, order: &MigrateOrder) -> Verdict {
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
}
