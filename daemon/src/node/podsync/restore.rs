//! Target side, second half: the restore ended; the source is told the verdict (commit or
//! abort), a lazily restored container waits for its last page, and the move is reported.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use podmig_api::{
    nodeapi::CompleteRequest,
    v1alpha1::{MigrationReport, Strategy},
};
use podmig_cri_ext::{
    engine::CheckpointEngine,
    lazy::PageStats,
    proto::{
        hook::v1::{
            ContainerIdentity, RestoreFrom, RestoreResult, hook_response::Decision as Answer,
        },
        runtime::v1::RestoreRecord,
    },
};

use crate::node::{journal, migration::Verdict, peer::PeerError};

use crate::node::moves::Move;

use super::*;
use crate::node::migration::MovePhase;

/// Where a restore's checkpoint came from, and so who learns its outcome.
pub(super) enum Handback {
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

/// How long before the move's deadline a target's `Restored` must have landed on the API
/// server for the target to run on without its source's answer: a source that cannot be
/// told reads the phase at the deadline, and must then see it.
pub const RECORD_MARGIN: Duration = Duration::from_secs(2);

/// Why a restored target must stop although its restore worked: the source refused the
/// commit, or could not be told and would not see that the target runs (`seen`: its
/// `Restored` phase landed on the API server in time, [`RECORD_MARGIN`] before the
/// deadline — the source then commits when it reads it, or stays frozen while it cannot
/// read). `None`: the target runs on.
pub fn verdict_not_taken(delivery: &Delivery, seen: bool) -> Option<NotTaken> {
    match delivery {
        Delivery::Taken => None,
        Delivery::Refused(why) => Some(NotTaken::Refused(why.clone())),
        Delivery::Unreachable(_) if seen => None,
        Delivery::Unreachable(why) => Some(NotTaken::Unseen(why.clone())),
    }
}

/// Why a restored target must stop: the source did not take its commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotTaken {
    /// The source answered that no move waits for it.
    #[error("the source did not take the move: {0}")]
    Refused(String),
    /// The source could not be told, and would not see that the target runs.
    #[error(
        "the source could not be told and the target's Restored phase was not recorded before the move's deadline: {0}"
    )]
    Unseen(String),
}

pub(super) struct PendingRestore {
    /// The target's journal entry (none for a source restoring itself).
    pub(super) mv: Option<Move>,
    pub(super) handback: Handback,
    pub(super) images: PathBuf,
    pub(super) migration: String,
    pub(super) frozen_at: Option<Instant>,
    pub(super) report: MigrationReport,
    pub(super) source_uid: String,
    /// A lazy restore: the lazy-pages daemon waiting for it.
    pub(super) lazy: Option<LazyTarget>,
}

/// A restored container whose memory is still arriving; the move is settled when it has.
pub(super) struct Paging {
    pub(super) container: String,
    pub(super) container_id: String,
    pub(super) migration: String,
    pub(super) images: PathBuf,
    pub(super) mv: Move,
    pub(super) report: MigrationReport,
    pub(super) resumed_at: Instant,
    pub(super) broke: Arc<std::sync::atomic::AtomicBool>,
}

impl<E: CheckpointEngine> PodWorker<E> {
    /// Tells the source how the restore of its checkpoint went.
    pub(super) fn hand_back(&self, handback: &Handback, ok: bool, error: &str) -> Delivery {
        self.hand_back_after(handback, ok, error, None)
    }

    /// [`Self::hand_back`] with the restore's duration, which the source learns from.
    pub(super) fn hand_back_after(
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
                let delivery = Delivery::from(self.node.wait_on(peers.complete(host, id, &body)));
                if let Delivery::Unreachable(error) = &delivery {
                    tracing::warn!(migration = %id, %error, "cannot tell the source the verdict; it decides at its deadline");
                }
                delivery
            }
            Handback::Drop | Handback::Rollback | Handback::Group => Delivery::Taken,
        }
    }

    pub(super) fn on_restored(&mut self, c: &ContainerIdentity, result: RestoreResult) {
        let Some(p) = self.pending.remove(&c.container_name) else {
            tracing::warn!(pod_uid = %self.uid, container = %c.container_name, "restore report for an unknown restore");
            return;
        };
        self.settle_restore(c, p, result);
    }

    /// A restore ended: recorded, then settled by where its checkpoint came from — a group
    /// member waits for its group, a rollback or a stored checkpoint ends here, a move's
    /// target tells its source the verdict and ends (or, lazy, waits for its pages).
    pub(super) fn settle_restore(
        &mut self,
        c: &ContainerIdentity,
        mut p: PendingRestore,
        result: RestoreResult,
    ) {
        let lazy = p.lazy.take();
        if let Some(l) = lazy.as_ref().filter(|_| !result.ok) {
            // Never resumed: the pages are not needed; the source resumes.
            l.pages.kill();
        }
        // Read before the images go: what their file-system part cost on the source.
        let fs = podmig_cri_ext::volumes::FilesystemCapture::read(&p.images);
        // CRIU's own share of the dump and of the restore, from their logs.
        p.report.criu_dump_ms =
            podmig_cri_ext::criu_log::elapsed_ms(&p.images.join("dump.log")).unwrap_or(0);
        p.report.criu_restore_ms = result.criu_ms;
        let frozen_ms = self.record_restore(c, &p, &result);
        if matches!(p.handback, Handback::Group) {
            self.settle_group_member(c, p, &result, fs);
            return;
        }
        if !self.drop_images_after(c, &p, &result, lazy.is_some()) {
            return;
        }
        let remote = matches!(p.handback, Handback::Remote { .. });
        if remote {
            self.restored_kept_address();
        }
        let result = self.deliver_verdict(c, &mut p, lazy.is_some(), result);
        if remote {
            self.settle_kept_address(result.ok);
        }
        let Some(mv) = p.mv.take() else { return };
        if p.migration.is_empty() || p.source_uid.is_empty() {
            mv.forget(&self.node);
            return;
        }
        match lazy.filter(|_| result.ok) {
            Some(l) => self.start_paging(c, p, mv, l, &result, fs, frozen_ms),
            None => self.end_restore(c, p, mv, &result, fs, frozen_ms),
        }
    }

    /// Remembers a finished restore for the CRI extension and the metrics; returns how long
    /// the Pod was frozen.
    fn record_restore(
        &mut self,
        c: &ContainerIdentity,
        p: &PendingRestore,
        result: &RestoreResult,
    ) -> u64 {
        if let Err(e) = self.moves.restored(&c.container_name, result.ok) {
            tracing::warn!(pod_uid = %self.uid, error = %e, "restore outcome in an unexpected state");
        }
        let frozen_ms = p.frozen_at.map_or(0, |t| t.elapsed().as_millis() as u64);
        self.node.manager.record_restore(RestoreRecord {
            pod_uid: self.uid.clone(),
            container_name: c.container_name.clone(),
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
        frozen_ms
    }

    /// Removes the images no one reads any more; false when the restore is settled here
    /// (a rollback: nobody waits for a verdict).
    fn drop_images_after(
        &self,
        c: &ContainerIdentity,
        p: &PendingRestore,
        result: &RestoreResult,
        lazy: bool,
    ) -> bool {
        match &p.handback {
            Handback::Rollback => {
                if result.ok {
                    tracing::info!(pod_uid = %self.uid, container = %c.container_name, migration = %p.migration,
                        "container resumed on its own node after the failed move");
                    self.node.store.remove(&p.images);
                } else {
                    tracing::warn!(pod_uid = %self.uid, container = %c.container_name, error = %result.error,
                        "rollback restore failed; its checkpoint is kept for the next attempt");
                }
                return false;
            }
            Handback::Drop => {
                if result.ok {
                    self.node.store.remove(&p.images);
                } else {
                    tracing::warn!(pod_uid = %self.uid, error = %result.error, "restore failed; checkpoint kept");
                }
            }
            // A lazy restore's lazy-pages daemon still reads the images.
            Handback::Remote { .. } if lazy && result.ok => {}
            Handback::Remote { .. } => self.node.store.remove(&p.images),
            Handback::Local(_) | Handback::Group => {}
        }
        true
    }

    /// Tells the source the verdict. A restored copy whose commit the source did not take
    /// is stopped at once (the source runs, or will): the result turns into a failure.
    fn deliver_verdict(
        &self,
        c: &ContainerIdentity,
        p: &mut PendingRestore,
        lazy: bool,
        mut result: RestoreResult,
    ) -> RestoreResult {
        if lazy && result.ok {
            // Journaled before the commit leaves: from the commit on, the source is gone
            // and only this daemon carries the pages, so a restart of it must find
            // `Paging` (the state is lost) and never ask the source for a second commit.
            if let Some(mv) = p.mv.as_mut() {
                mv.advance(&self.node, journal::Step::Paging);
            }
        }
        // Recorded first: a source the verdict cannot reach reads it at its deadline. Not
        // for a lazy restore: it runs on pages only its source serves, so `Restored` waits
        // for the last page, and without its source it stops anyway (the old rule: it
        // runs on only before the deadline).
        let seen = if lazy {
            !p.mv.as_ref().is_some_and(Move::expired)
        } else {
            result.ok
                && matches!(p.handback, Handback::Remote { .. })
                && p.mv
                    .as_ref()
                    .is_some_and(|mv| mv.record_restored(&self.node, RECORD_MARGIN))
        };
        let delivered = self.hand_back_after(
            &p.handback,
            result.ok,
            &result.error,
            Some(result.duration_ms),
        );
        if result.ok
            && let Some(why) = verdict_not_taken(&delivered, seen)
        {
            tracing::warn!(pod_uid = %self.uid, container = %c.container_name, migration = %p.migration, %why,
                "the source did not take the commit; stopping the restored copy");
            if let Err(error) = self.node.engine.discard(&c.container_id) {
                tracing::warn!(pod_uid = %self.uid, %error, "cannot stop the restored copy");
            }
            result.ok = false;
            result.error = why.to_string();
        }
        result
    }

    /// A lazily restored target runs: the move is settled when every page has arrived.
    #[allow(clippy::too_many_arguments)]
    fn start_paging(
        &mut self,
        c: &ContainerIdentity,
        p: PendingRestore,
        mv: Move,
        l: LazyTarget,
        result: &RestoreResult,
        fs: podmig_cri_ext::volumes::FilesystemCapture,
        frozen_ms: u64,
    ) {
        tracing::info!(pod_uid = %self.uid, container = %c.container_name, migration = %p.migration,
            restore_ms = result.duration_ms, frozen_ms, "lazily restored; the pages arrive");
        self.node.metrics.frozen.observe(frozen_ms as f64 / 1000.0);
        self.paging = Some(Paging {
            container: c.container_name.clone(),
            container_id: c.container_id.clone(),
            migration: p.migration.clone(),
            images: p.images.clone(),
            mv,
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
            let result = pages.wait(PAGES_LIMIT);
            node.dispatch(&uid, PodUpdate::PagesArrived { container, result });
        });
    }

    /// The move ends on this target: its figures are filed and reported on the Pod, and
    /// (only now that the source has its verdict) its journal entry is forgotten.
    fn end_restore(
        &mut self,
        c: &ContainerIdentity,
        p: PendingRestore,
        mv: Move,
        result: &RestoreResult,
        fs: podmig_cri_ext::volumes::FilesystemCapture,
        frozen_ms: u64,
    ) {
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
            tracing::info!(pod_uid = %self.uid, container = %c.container_name, migration = %p.migration,
                restore_ms = result.duration_ms, frozen_ms, "container restored");
            self.node.metrics.frozen.observe(frozen_ms as f64 / 1000.0);
        } else {
            tracing::warn!(pod_uid = %self.uid, container = %c.container_name, migration = %p.migration,
                error = %result.error, "restore failed; the source resumes");
        }
        let outcome = if result.ok {
            MovePhase::Succeeded
        } else {
            MovePhase::Failed
        };
        mv.finish_reported(&self.node, outcome, &report);
    }

    /// The pages of a lazily restored container all arrived, or some never will: the move
    /// is settled. Missing pages stop the container (it would read zeros where its memory
    /// was) and refuse its restarts; the source is not resumed (the target already ran).
    pub(super) fn on_pages(
        &mut self,
        c: &ContainerIdentity,
        result: podmig_cri_ext::Result<PageStats>,
    ) {
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
                self.node.manager.refuse_restarts(&self.uid);
                report.error = Some(format!(
                    "lazy move on {}: {}",
                    self.node.settings.node_name,
                    pages_lost(&why.to_string())
                ));
                tracing::warn!(pod_uid = %self.uid, migration = %pg.migration, %why,
                    "pages lost after the resume; the target was stopped");
            }
        }
        self.node.store.remove(&pg.images);
        let outcome = if result.is_ok() {
            MovePhase::Succeeded
        } else {
            MovePhase::Failed
        };
        pg.mv.finish_reported(&self.node, outcome, &report);
    }
}

pub(super) fn restore_from(images: &std::path::Path) -> Answer {
    Answer::RestoreFrom(RestoreFrom {
        image_path: images.display().to_string(),
        ..Default::default()
    })
}

/// What a lazy move that lost pages after the resume tells its users (the policy).
pub fn pages_lost(why: &str) -> String {
    format!(
        "the page stream broke after the target resumed ({why}); the target was stopped so \
         that it never runs on missing memory, and the source was not resumed because the \
         target had already run: the Pod's in-memory state is lost"
    )
}

/// Longest a lazy move's pages may take to arrive after the target resumed.
pub const PAGES_LIMIT: Duration = Duration::from_secs(600);
