//! Source side of a move: claim the containers, choose the strategy, freeze and dump
//! (`dump.rs`), hand the checkpoint over, wait for the target's verdict, then commit (stop
//! this copy) or abort (resume it).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use podmig_api::{
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

use kube::ResourceExt;

use crate::node::{
    moves::{EntryFor, Move, ReportTo},
    stream::StreamFigures,
};

use super::*;
use crate::node::migration::MovePhase;

/// How often a source frozen past its deadline without a verdict asks the API server for
/// its target's phase again.
const BLIND_RETRY: Duration = Duration::from_secs(2);

/// What a source move will dump, decided before anything is claimed.
struct Plan {
    /// (runc id, name) of each container.
    containers: Vec<(String, String)>,
    /// The pages stay behind for the target to pull.
    lazy: bool,
    /// `auto`: what it chose and why.
    choice: Option<crate::node::estimate::Choice>,
    /// What the containers' cgroups charge.
    memory: u64,
}

/// A claimed move: its record and what each container is dumped into.
struct Claimed {
    mv: Move,
    /// How many containers were claimed (a job is missing for one whose name the store
    /// refused).
    claimed: usize,
    /// (runc id, name, images) of each container.
    jobs: Vec<(String, String, PathBuf)>,
    lazy: bool,
    choice: Option<crate::node::estimate::Choice>,
    memory: u64,
    /// The Pod's address, held for a target that took it over.
    held: Option<super::address::KeptIp>,
}

impl Claimed {
    fn container_id(&self, name: &str) -> String {
        self.jobs
            .iter()
            .find(|(_, n, _)| n == name)
            .map(|(cid, _, _)| cid.clone())
            .unwrap_or_default()
    }
}

/// A move whose containers are frozen and dumped.
struct Dumped {
    images: Vec<(String, PathBuf)>,
    frozen_at: Instant,
    preflight_ms: u64,
    checkpoint_ms: u64,
    bytes: u64,
    streamed: Vec<(String, StreamFigures)>,
}

impl<E: CheckpointEngine> PodWorker<E> {
    /// A move of this (source) Pod, top to bottom: plan, claim, freeze and dump, hand the
    /// checkpoint over on `prepared`, wait for the target's verdict, commit or abort.
    pub(super) fn migrate(
        &mut self,
        order: MigrateOrder,
        prepared: oneshot::Sender<Result<Prepared, MoveError>>,
    ) {
        let claimed = self
            .plan_move(&order)
            .and_then(|plan| self.claim(&order, plan));
        let mut claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                let _ = prepared.send(Err(e));
                return;
            }
        };
        let dumped = match self.freeze_and_dump(&order, &mut claimed) {
            Ok(d) => d,
            Err(reason) => {
                let preflight = matches!(reason, DumpError::Preflight { .. });
                let reason = reason.to_string();
                claimed
                    .mv
                    .finish(&self.node, MovePhase::Failed, Some(reason.clone()));
                let _ = prepared.send(Err(if preflight {
                    MoveError::NotCheckpointable(reason)
                } else {
                    MoveError::Checkpoint(reason)
                }));
                self.reconsider_parked();
                return;
            }
        };
        let verdict = self.hand_over(&order, &mut claimed, &dumped, prepared);
        match verdict {
            Verdict::Commit => self.commit(&order, claimed, &dumped),
            Verdict::Abort(why) => self.abort(&order, claimed, &dumped, &why),
        }
        self.reconsider_parked();
    }

    /// The containers to move and the strategy; nothing is claimed yet.
    fn plan_move(&self, order: &MigrateOrder) -> Result<Plan, MoveError> {
        let containers = self.containers_to_move(order)?;
        let why_not_lazy = if containers.len() > 1 {
            Some(format!(
                "lazy moves carry single-container Pods; pod {} has {} containers",
                self.uid,
                containers.len()
            ))
        } else {
            self.node.lazy_impossible().or_else(|| {
                order
                    .target_lazy_impossible
                    .as_ref()
                    .map(|w| format!("on the target: {w}"))
            })
        };
        let memory = self.memory_of(&containers);
        let (lazy, choice) = if order.strategy == Strategy::Auto {
            let c = self.choose_strategy(memory, order, why_not_lazy);
            (c.strategy == Strategy::Lazy, Some(c))
        } else if order.strategy.wants_lazy() {
            match why_not_lazy {
                None => (true, None),
                Some(why) if order.strategy == Strategy::Lazy => {
                    return Err(MoveError::NotLazy(why));
                }
                Some(why) => {
                    tracing::info!(pod_uid = %self.uid, migration = %order.migration, %why,
                        "lazy-or-full: moving in full");
                    (false, None)
                }
            }
        } else {
            (false, None)
        };
        Ok(Plan {
            containers,
            lazy,
            choice,
            memory,
        })
    }

    /// (runc id, name) of the containers `order` names (all that run when it names none).
    fn containers_to_move(&self, order: &MigrateOrder) -> Result<Vec<(String, String)>, MoveError> {
        let running = running_containers(&self.node.settings.runc_root, &self.uid);
        let wanted: Vec<(String, String)> = if order.containers.is_empty() {
            running
        } else {
            let mut out = Vec::new();
            for name in &order.containers {
                let c = running.iter().find(|(_, n)| n == name).ok_or_else(|| {
                    MoveError::NotRunning {
                        container: name.clone(),
                        pod: self.uid.clone(),
                    }
                })?;
                out.push(c.clone());
            }
            out
        };
        if wanted.is_empty() {
            return Err(MoveError::NothingRuns(self.uid.clone()));
        }
        Ok(wanted)
    }

    /// Claims the containers for the move: room checked, each container's state set, the
    /// move registered and journaled before the freeze (a daemon that dies from here on
    /// finds it).
    fn claim(&mut self, order: &MigrateOrder, plan: Plan) -> Result<Claimed, MoveError> {
        let id = &order.migration;
        let ids: Vec<String> = plan.containers.iter().map(|(cid, _)| cid.clone()).collect();
        if let Err(why) = self.node.check_room(&ids) {
            tracing::warn!(pod_uid = %self.uid, migration = %id, %why, "move refused before the freeze");
            return Err(MoveError::NoRoom(why));
        }
        for (i, (_, name)) in plan.containers.iter().enumerate() {
            if let Err(e) = self.moves.begin_checkpoint(name, id) {
                for (_, n) in &plan.containers[..i] {
                    let _ = self.moves.keep_running(n);
                }
                return Err(MoveError::Claimed(e));
            }
        }
        let jobs: Vec<(String, String, PathBuf)> = plan
            .containers
            .iter()
            .filter_map(|(cid, name)| {
                let dir = self.node.store.path_for(&self.uid, name)?;
                Some((cid.clone(), name.clone(), dir))
            })
            .collect();
        let target = ReportTo {
            namespace: order.target.namespace.clone(),
            pod: order.target.pod.clone(),
        };
        let entry = EntryFor {
            migration: id,
            side: journal::Side::Source,
            pod_uid: &self.uid,
            peer_node: &order.target.node,
            target: &target,
            deadline_unix_ms: journal::deadline_unix_ms(order.deadline),
        };
        let entries = jobs
            .iter()
            .map(|(cid, name, dir)| entry.entry(name, cid, dir.clone(), journal::Step::Claimed))
            .collect();
        let (namespace, pod) = self.pod.as_ref().map_or_else(Default::default, |p| {
            (p.namespace().unwrap_or_default(), p.name_any())
        });
        let info = MoveInfo {
            id: id.clone(),
            namespace,
            pod,
            pod_uid: self.uid.clone(),
            peer_node: Some(order.target.node.clone()),
            state: MovePhase::Checkpointing,
            ..Default::default()
        };
        let mv = Move::begin(&self.node, Role::Source, info, target, entries).map_err(|busy| {
            for (_, n) in &plan.containers {
                let _ = self.moves.keep_running(n);
            }
            MoveError::Busy(busy)
        })?;
        tracing::info!(pod_uid = %self.uid, migration = %id, target = %order.target,
            containers = ?plan.containers.iter().map(|(_, n)| n).collect::<Vec<_>>(), "checkpointing for a move");
        Ok(Claimed {
            mv,
            claimed: plan.containers.len(),
            jobs,
            lazy: plan.lazy,
            choice: plan.choice,
            memory: plan.memory,
            held: None,
        })
    }

    /// Freezes and dumps the claimed containers: their pages go ahead in page streams
    /// (full, big enough, the target takes them), stay behind for a page server (lazy), or
    /// go into the images. On failure every container runs on and the reason is returned.
    fn freeze_and_dump(
        &mut self,
        order: &MigrateOrder,
        c: &mut Claimed,
    ) -> Result<Dumped, DumpError> {
        let id = &order.migration;
        let preflight_ms = self
            .preflight(c)
            .map_err(|reason| self.refused_before_the_freeze(id, c, reason))?;
        let streams = if c.lazy || !order.stream_pages || c.memory < STREAM_MIN_BYTES {
            Vec::new()
        } else {
            self.open_page_streams(&c.jobs, order)
                .map_err(|reason| self.refused_before_the_freeze(id, c, reason))?
        };
        if let Some(asked) = &order.kept_ip
            && let Err(reason) = self.freeze_and_hold(asked, c)
        {
            tracing::warn!(pod_uid = %self.uid, migration = %id, %reason, "move refused before the freeze");
            return Err(reason);
        }
        let (frozen_at, results, streams) = if c.lazy {
            let (at, results) = self.dump_lazy(&c.jobs, id);
            (at, results, Vec::new())
        } else {
            dump_with_retries(&self.node.engine, &c.jobs, streams, &self.uid, id)
        };
        let checkpoint_ms = frozen_at.elapsed().as_millis() as u64;
        let all_dumped = results.len() == c.claimed;
        let mut failure = None;
        let mut dumped = Vec::new();
        for (name, dir, r) in results {
            match r {
                Ok(report) => dumped.push((name, dir, report)),
                Err(source) => {
                    let _ = self.moves.keep_running(&name);
                    failure.get_or_insert(DumpError::Container {
                        container: name,
                        source,
                    });
                }
            }
        }
        if failure.is_none() && !all_dumped {
            failure = Some(DumpError::Missing);
        }
        let streamed = match failure.map_or_else(|| self.streamed_figures(streams), Err) {
            Ok(s) => s,
            Err(reason) => return Err(self.thaw_after(id, c, &dumped, frozen_at, reason)),
        };
        let bytes: u64 = dumped.iter().map(|(_, _, r)| r.image_bytes).sum::<u64>()
            + streamed.iter().map(|(_, f)| f.bytes).sum::<u64>();
        self.node.metrics.checkpoint_bytes.inc_by(bytes);
        self.node.metrics.phase_ms("checkpoint", checkpoint_ms);
        Ok(Dumped {
            images: dumped.into_iter().map(|(n, d, _)| (n, d)).collect(),
            frozen_at,
            preflight_ms,
            checkpoint_ms,
            bytes,
            streamed,
        })
    }

    /// A move refused before anything froze: every claimed container runs on as before.
    fn refused_before_the_freeze(&mut self, id: &str, c: &Claimed, reason: DumpError) -> DumpError {
        for (_, name, _) in &c.jobs {
            let _ = self.moves.keep_running(name);
        }
        tracing::warn!(pod_uid = %self.uid, migration = %id, %reason, "move refused before the freeze");
        reason
    }

    /// CRIU's preflight of each claimed container (see
    /// [`CheckpointEngine::preflight`]): the first one CRIU cannot dump ends the move
    /// before anything freezes for it. A preflight that cannot run at all does not: the
    /// dump then says what it says. Returns how long the preflights took, ms.
    fn preflight(&self, c: &Claimed) -> Result<u64, DumpError> {
        let mut total = 0;
        for (cid, name, dir) in &c.jobs {
            // The checkpoint's own directory, which the journal already names: a daemon
            // killed meanwhile leaves nothing its recovery does not clean up.
            let started = std::time::Instant::now();
            let found = self.node.engine.preflight(cid, dir);
            let ms = started.elapsed().as_millis() as u64;
            total += ms;
            self.node.metrics.phase_ms("preflight", ms);
            tracing::info!(pod_uid = %self.uid, container = %name, preflight_ms = ms, "preflight done");
            match found {
                Ok(None) => {}
                Ok(Some(reason)) => {
                    return Err(DumpError::Preflight {
                        container: name.clone(),
                        reason,
                    });
                }
                Err(error) => {
                    tracing::warn!(pod_uid = %self.uid, container = %name, %error, "preflight did not run");
                }
            }
        }
        Ok(total)
    }

    /// A move that keeps the Pod's address: the containers are frozen first, then the
    /// address's traffic held — what the app sent before the freeze has left, nothing the
    /// frozen copy's kernel would ACK or resend after it gets out — so that the target's
    /// restored sockets carry on from exactly the dumped state. On failure nothing is held
    /// and every container runs on.
    fn freeze_and_hold(&mut self, asked: &str, c: &mut Claimed) -> Result<(), DumpError> {
        let ids: Vec<&str> = c.jobs.iter().map(|(cid, _, _)| cid.as_str()).collect();
        let held = match self.hold_own_address(asked, ids.first().copied().unwrap_or("")) {
            Ok(h) => h,
            Err(reason) => {
                for (_, name, _) in &c.jobs {
                    let _ = self.moves.keep_running(name);
                }
                return Err(reason.into());
            }
        };
        let frozen = self
            .node
            .engine
            .freeze_all(&ids)
            .map_err(|source| DumpError::Container {
                container: c.jobs.first().map(|j| j.1.clone()).unwrap_or_default(),
                source,
            })
            .and_then(|()| Ok(self.hold_traffic(&held)?));
        match frozen {
            Ok(()) => {
                c.held = Some(held);
                Ok(())
            }
            Err(reason) => {
                self.release_own_address(&held);
                for (cid, name, _) in &c.jobs {
                    let _ = self.node.engine.resume(cid);
                    let _ = self.moves.keep_running(name);
                }
                Err(reason)
            }
        }
    }

    /// A dump failed: the containers that were dumped (and stay frozen) run on; the reason
    /// is returned for the move's record and the requester.
    fn thaw_after(
        &mut self,
        id: &str,
        c: &Claimed,
        dumped: &[(String, PathBuf, CheckpointReport)],
        frozen_at: Instant,
        reason: DumpError,
    ) -> DumpError {
        for (name, dir, _) in dumped {
            // Dumped and frozen while another failed: it runs on.
            let _ = self.moves.handed_over(name, dir.clone(), frozen_at);
            self.resume_or_roll_back(name, &c.container_id(name));
        }
        if let Some(held) = &c.held {
            self.release_own_address(held);
        }
        tracing::warn!(pod_uid = %self.uid, migration = %id, %reason, "checkpoint failed; the source keeps running");
        reason
    }

    /// Hands the checkpoint over on `prepared` and waits for the target's verdict until the
    /// move's deadline; without one, the target Pod's reported phase decides.
    fn hand_over(
        &mut self,
        order: &MigrateOrder,
        c: &mut Claimed,
        d: &Dumped,
        prepared: oneshot::Sender<Result<Prepared, MoveError>>,
    ) -> Verdict {
        let id = &order.migration;
        for (name, dir) in &d.images {
            let _ = self.moves.handed_over(name, dir.clone(), d.frozen_at);
        }
        c.mv.advance(&self.node, journal::Step::Dumped);
        c.mv.figures(&self.node, |r| {
            r.preflight_ms = d.preflight_ms;
            r.checkpoint_ms = d.checkpoint_ms;
            r.bytes = d.bytes;
        });
        tracing::info!(pod_uid = %self.uid, migration = %id, checkpoint_ms = d.checkpoint_ms,
            bytes = d.bytes, "checkpoint handed over");
        let (vtx, vrx) = crossbeam_channel::bounded(1);
        if order.remote {
            let _ = self.node.manager.await_verdict(id, vtx.clone());
        }
        let sent = prepared.send(Ok(Prepared {
            images: d.images.clone(),
            frozen_at: d.frozen_at,
            preflight_ms: d.preflight_ms,
            checkpoint_ms: d.checkpoint_ms,
            bytes: d.bytes,
            lazy: c.lazy,
            streamed: d.streamed.clone(),
            choice: c.choice.take(),
            verdict: vtx,
        }));
        let verdict = if sent.is_err() {
            Verdict::Abort("the requester went away before the handover".into())
        } else {
            match vrx.recv_deadline(order.deadline) {
                Ok(v) => v,
                Err(_) => self.verdict_after_deadline(order, &vrx),
            }
        };
        if order.remote {
            self.node.manager.settle_verdict(id, &verdict);
        }
        verdict
    }

    /// The target runs: this copy never does again. With lazy memory it still serves the
    /// pages the target faults in, until every one has gone.
    fn commit(&mut self, order: &MigrateOrder, mut c: Claimed, d: &Dumped) {
        let id = order.migration.clone();
        c.mv.advance(&self.node, journal::Step::Committed);
        if !c.lazy && !d.streamed.is_empty() {
            self.learn_rates(order, &id, d.bytes, d.checkpoint_ms, d.frozen_at);
        }
        let pages = self.serve_pages_to_the_end(&id);
        for (name, _) in &d.images {
            if let Err(error) = self.node.engine.discard(&c.container_id(name)) {
                tracing::warn!(pod_uid = %self.uid, container = %name, %error, "cannot stop the moved source");
            }
            match self.moves.commit(name, &order.target.to_string()) {
                Ok(dir) => self.node.store.remove(&dir),
                Err(e) => tracing::warn!(error = %e, "commit in an unexpected state"),
            }
        }
        tracing::info!(pod_uid = %self.uid, migration = %id, target = %order.target, "moved away");
        match pages {
            Err(why) => {
                c.mv.finish_moved_away(&self.node, MovePhase::Failed, Some(why.to_string()))
            }
            Ok(()) => {
                c.mv.finish_moved_away(&self.node, MovePhase::Succeeded, None)
            }
        }
        self.assert_migrated_status();
    }

    /// The target never ran: the source resumes where it stopped, and (remote move) the
    /// target's Migration learns it even if the target is gone.
    fn abort(&mut self, order: &MigrateOrder, c: Claimed, d: &Dumped, why: &str) {
        let id = &order.migration;
        // Nobody will read the pages.
        if let Some(server) = self.node.manager.take_page_server(id) {
            server.abort();
        }
        for (name, _) in &d.images {
            self.resume_or_roll_back(name, &c.container_id(name));
        }
        if let Some(held) = &c.held {
            self.release_own_address(held);
        }
        tracing::warn!(pod_uid = %self.uid, migration = %id, reason = %why,
            "move failed after the freeze; the source resumes from its checkpoint");
        c.mv.finish(&self.node, MovePhase::RolledBack, Some(why.to_owned()));
        if order.remote {
            self.node.report_done(
                &order.target.namespace,
                &order.target.pod,
                &MigrationReport {
                    checkpoint_ms: d.checkpoint_ms,
                    bytes: d.bytes,
                    error: Some(format!("rolled back on the source: {why}")),
                    ..Default::default()
                },
            );
        }
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
        let probed = self.probe_link_once(&order.target.node);
        let rates = self.node.learned.rates(&order.target.node);
        let mut c = crate::node::estimate::choose(
            rates.full_frozen_ms(bytes),
            order.max_downtime_ms,
            why_not_lazy.as_deref(),
        );
        if let Some(mb_s) = probed {
            c.reason.push_str(&format!(
                " (first move to {}: its link probed at {mb_s:.0} MB/s)",
                order.target.node
            ));
        }
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

    /// Before the first move to `node`, times the link to it (see
    /// [`crate::node::peer::PeerClient::probe_link`]) and seeds its rates; the rate, or
    /// `None` when the node is known already or cannot be probed (the defaults apply).
    fn probe_link_once(&self, node: &str) -> Option<f64> {
        if self.node.learned.knows(node) {
            return None;
        }
        let peers = self.node.peers.as_ref()?;
        let host = self.node.node_address(node).ok()?;
        match self
            .node
            .wait_on(peers.probe_link(&host, crate::node::peer::PROBE_BYTES))
        {
            Ok(mb_s) => {
                let rates = self.node.learned.seed_from_link(node, mb_s);
                tracing::info!(pod_uid = %self.uid, node, link_mb_s = mb_s, ?rates, "link probed");
                Some(mb_s)
            }
            Err(error) => {
                tracing::warn!(pod_uid = %self.uid, node, %error, "cannot probe the link; default rates apply");
                None
            }
        }
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
    pub(super) fn serve_pages_to_the_end(&self, id: &str) -> Result<(), PagesBroke> {
        let Some(server) = self.node.manager.page_server(id) else {
            return Ok(());
        };
        let served = server.wait(PAGES_LIMIT).map_err(PagesBroke);
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

    /// The verdict once the move's deadline passed without one from the target: the
    /// target Pod's reported phase decides (`Restored` commits, anything else rolls back,
    /// the target stopping itself when it could not tell this node in time) — but only
    /// once the API server can be read. While neither the target nor the API server can
    /// be reached, the source stays frozen (unavailable, never doubled): the door for the
    /// target's verdict stays open and the API server is asked again every
    /// [`BLIND_RETRY`], with the gauge `podmig_moves_awaiting_verdict` meanwhile and a
    /// Warning Event on the Pod once it can be recorded.
    fn verdict_after_deadline(
        &self,
        order: &MigrateOrder,
        vrx: &crossbeam_channel::Receiver<Verdict>,
    ) -> Verdict {
        let id = &order.migration;
        let mut blind: Option<(Instant, String)> = None;
        let verdict = loop {
            match self.target_phase(order) {
                Err(why) if self.node.kube.is_some() => {
                    if blind.is_none() {
                        self.node.metrics.awaiting_verdict.inc();
                        tracing::warn!(pod_uid = %self.uid, migration = %id, reason = %why,
                            "no verdict by the deadline and the target's phase cannot be read; the source stays frozen");
                        blind = Some((Instant::now(), why));
                    }
                    if let Ok(v) = vrx.recv_timeout(BLIND_RETRY) {
                        break v;
                    }
                }
                seen => {
                    // Close the door first: a verdict that got in meanwhile was answered
                    // as taken, so it decides, not this node's own reading.
                    self.node.manager.stop_waiting(id);
                    break vrx.try_recv().unwrap_or_else(|_| match seen {
                        Ok(Some(DaemonPhase::Restored)) => Verdict::Commit,
                        _ => {
                            Verdict::Abort("no verdict from the target before the deadline".into())
                        }
                    });
                }
            }
        };
        if let Some((since, why)) = blind {
            self.node.metrics.awaiting_verdict.dec();
            let outcome = match &verdict {
                Verdict::Commit => "the target runs: the source is stopped".to_owned(),
                Verdict::Abort(reason) => format!("the source resumes ({reason})"),
            };
            tracing::warn!(pod_uid = %self.uid, migration = %id, %outcome, "the target's outcome is known again");
            // Recorded once the API server answers again (it could not be told before).
            if let Some(p) = &self.pod {
                self.node.event_on_pod(
                    &p.namespace().unwrap_or_default(),
                    &p.name_any(),
                    "MigrationVerdictUnknown",
                    &format!(
                        "move {id} to {}: no verdict by its deadline and the API server could not be read ({why}); the Pod stayed frozen {} s longer, so that it never ran twice; then {outcome}",
                        order.target,
                        since.elapsed().as_secs()
                    ),
                );
            }
        }
        verdict
    }

    /// The phase the target Pod reports (`None`: none, or the Pod is gone), or why it
    /// cannot be read.
    fn target_phase(&self, order: &MigrateOrder) -> Result<Option<DaemonPhase>, String> {
        let target = self.node.wait_on(crate::node::recovery::look_at_target(
            &self.node,
            &order.target.namespace,
            &order.target.pod,
        ))?;
        Ok(target.as_ref().and_then(crate::node::recovery::phase_of))
    }
}
