//! The migration manager (thesis §5.5.3): the moves in flight on this node by id and Pod
//! uid (one move per Pod at a time), their figures and history, the verdict channels a
//! source's Pod worker blocks on until its target has restored, and the restore records
//! the CRI extension lists.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use podmig_api::nodeapi::MoveInfo;
use podmig_cri_ext::proto::runtime::v1::RestoreRecord;

/// Which side of a move this node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This node's Pod is dumped and handed over.
    Source,
    /// This node's Pod restores the state.
    Target,
}

impl Role {
    /// `source` or `target`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Target => "target",
        }
    }
}

/// The target's word on a handed-over checkpoint, sent to the blocked source worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The target runs: the source is gone for good.
    Commit,
    /// The target failed (or the transfer broke): the source resumes.
    Abort(String),
}

/// What became of a verdict sent to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// The waiting source worker has it.
    Now,
    /// The move was decided before (an earlier verdict, or the source's own decision at
    /// its deadline): this is what was decided.
    Already(Verdict),
    /// No move of that id waits or was decided here.
    Unknown,
}

/// A Pod already has a move in flight.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("move {0} of this Pod is already running")]
pub struct Busy(pub String);

/// How many ended moves and restores are remembered.
const HISTORY: usize = 256;

#[derive(Default)]
struct Inner {
    active: Vec<(Role, Instant, MoveInfo)>,
    history: VecDeque<MoveInfo>,
    verdicts: Vec<(String, Sender<Verdict>)>,
    /// The verdicts taken, by move id, so that a repeated one (a retry after a lost
    /// answer, a restarted target asking again) is answered by what was decided.
    decided: VecDeque<(String, Verdict)>,
    restores: VecDeque<RestoreRecord>,
}

/// The moves of this node.
#[derive(Default)]
pub struct Manager {
    inner: Mutex<Inner>,
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() == HISTORY {
        q.pop_front();
    }
    q.push_back(item);
}

impl Manager {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a single push/remove: a panicking holder leaves it consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the start of a move; [`Busy`] when the Pod has one in flight already.
    pub fn begin(&self, role: Role, mut info: MoveInfo) -> Result<(), Busy> {
        let mut inner = self.lock();
        if let Some((_, _, other)) = inner
            .active
            .iter()
            .find(|(_, _, m)| m.pod_uid == info.pod_uid)
        {
            return Err(Busy(other.id.clone()));
        }
        info.role = role.as_str().into();
        info.started_at = chrono_now();
        inner.active.push((role, Instant::now(), info));
        Ok(())
    }

    /// The Pods with a move in flight.
    pub fn active_pods(&self) -> Vec<String> {
        self.lock()
            .active
            .iter()
            .map(|(_, _, m)| m.pod_uid.clone())
            .collect()
    }

    /// The id of the move in flight for `pod_uid`.
    pub fn active_for(&self, pod_uid: &str) -> Option<String> {
        self.lock()
            .active
            .iter()
            .find(|(_, _, m)| m.pod_uid == pod_uid)
            .map(|(_, _, m)| m.id.clone())
    }

    /// Updates the record of move `id` on side `role`.
    pub fn update(&self, role: Role, id: &str, f: impl FnOnce(&mut MoveInfo)) {
        if let Some((_, _, m)) = self
            .lock()
            .active
            .iter_mut()
            .find(|(r, _, m)| *r == role && m.id == id)
        {
            f(m);
        }
    }

    /// Ends move `id` on side `role` with `state`; returns how long it ran.
    pub fn finish(
        &self,
        role: Role,
        id: &str,
        state: &str,
        error: Option<String>,
    ) -> Option<Duration> {
        let mut inner = self.lock();
        let at = inner
            .active
            .iter()
            .position(|(r, _, m)| *r == role && m.id == id)?;
        let (_, started, mut info) = inner.active.remove(at);
        info.state = state.into();
        if error.is_some() {
            info.report.error = error;
        }
        push_bounded(&mut inner.history, info);
        Some(started.elapsed())
    }

    /// Moves in flight, then ended ones, newest first.
    pub fn list(&self) -> Vec<MoveInfo> {
        let inner = self.lock();
        inner
            .active
            .iter()
            .map(|(_, _, m)| m.clone())
            .chain(inner.history.iter().rev().cloned())
            .collect()
    }

    /// Every record of move `id` (a same-node move has a source and a target record).
    pub fn get(&self, id: &str) -> Vec<MoveInfo> {
        self.list().into_iter().filter(|m| m.id == id).collect()
    }

    /// Keeps the channel on which the source worker of move `id` waits for its verdict.
    pub fn await_verdict(&self, id: &str, tx: Sender<Verdict>) {
        let mut inner = self.lock();
        inner.verdicts.retain(|(i, _)| i != id);
        inner.verdicts.push((id.into(), tx));
    }

    /// Drops the verdict channel of move `id`: from now on nothing more reaches its worker,
    /// which then looks once more for a verdict that came in before deciding alone.
    pub fn stop_waiting(&self, id: &str) {
        self.lock().verdicts.retain(|(i, _)| i != id);
    }

    /// Drops the verdict channel of move `id` (its worker stopped waiting) and remembers
    /// what the source did: `verdict` is final for this move.
    pub fn settle_verdict(&self, id: &str, verdict: &Verdict) {
        let mut inner = self.lock();
        inner.verdicts.retain(|(i, _)| i != id);
        remember(&mut inner.decided, id, verdict);
    }

    /// Delivers the verdict on move `id` to its waiting worker, or says what was decided
    /// before.
    pub fn deliver(&self, id: &str, verdict: Verdict) -> Delivered {
        let tx = {
            let mut inner = self.lock();
            let Some(at) = inner.verdicts.iter().position(|(i, _)| i == id) else {
                return match inner.decided.iter().find(|(i, _)| i == id) {
                    Some((_, v)) => Delivered::Already(v.clone()),
                    None => Delivered::Unknown,
                };
            };
            let tx = inner.verdicts.remove(at).1;
            remember(&mut inner.decided, id, &verdict);
            tx
        };
        if tx.send(verdict).is_ok() {
            Delivered::Now
        } else {
            // The worker stopped waiting in between: it records its own decision.
            Delivered::Unknown
        }
    }

    /// Remembers a finished restore.
    pub fn record_restore(&self, record: RestoreRecord) {
        push_bounded(&mut self.lock().restores, record);
    }

    /// The restores done on this node, optionally into `pod_uid` only, oldest first.
    pub fn restores(&self, pod_uid: &str) -> Vec<RestoreRecord> {
        self.lock()
            .restores
            .iter()
            .filter(|r| pod_uid.is_empty() || r.pod_uid == pod_uid)
            .cloned()
            .collect()
    }
}

fn remember(decided: &mut VecDeque<(String, Verdict)>, id: &str, verdict: &Verdict) {
    decided.retain(|(i, _)| i != id);
    push_bounded(decided, (id.to_owned(), verdict.clone()));
}

fn chrono_now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, uid: &str) -> MoveInfo {
        MoveInfo {
            id: id.into(),
            pod_uid: uid.into(),
            ..Default::default()
        }
    }

    #[test]
    fn one_move_per_pod_and_history_keeps_the_outcome() {
        let m = Manager::default();
        m.begin(Role::Source, info("m1", "u1")).expect("first");
        assert_eq!(
            m.begin(Role::Source, info("m2", "u1")),
            Err(Busy("m1".into()))
        );
        m.begin(Role::Target, info("m1", "u2")).expect("other pod");
        assert_eq!(m.active_for("u1").as_deref(), Some("m1"));
        m.update(Role::Source, "m1", |i| i.report.bytes = 7);
        assert!(m.finish(Role::Source, "m1", "Succeeded", None).is_some());
        assert_eq!(m.active_for("u1"), None);
        let both = m.get("m1");
        assert_eq!(both.len(), 2);
        let src = both.iter().find(|i| i.role == "source").expect("source");
        assert_eq!((src.state.as_str(), src.report.bytes), ("Succeeded", 7));
        m.begin(Role::Source, info("m3", "u1")).expect("free again");
    }

    #[test]
    fn a_verdict_reaches_the_waiting_worker_once() {
        let m = Manager::default();
        let (tx, rx) = crossbeam_channel::bounded(1);
        m.await_verdict("m1", tx);
        assert_eq!(
            m.deliver("m1", Verdict::Abort("cut".into())),
            Delivered::Now
        );
        assert_eq!(rx.recv().ok(), Some(Verdict::Abort("cut".into())));
        assert_eq!(
            m.deliver("m1", Verdict::Commit),
            Delivered::Already(Verdict::Abort("cut".into())),
            "a later verdict learns what was decided"
        );
        assert_eq!(m.deliver("m2", Verdict::Commit), Delivered::Unknown);
    }

    #[test]
    fn a_source_that_decided_alone_answers_late_verdicts_with_its_decision() {
        let m = Manager::default();
        let (tx, _rx) = crossbeam_channel::bounded(1);
        m.await_verdict("m1", tx);
        m.settle_verdict("m1", &Verdict::Abort("deadline".into()));
        assert_eq!(
            m.deliver("m1", Verdict::Commit),
            Delivered::Already(Verdict::Abort("deadline".into()))
        );
        let (tx, _rx) = crossbeam_channel::bounded(1);
        m.await_verdict("m2", tx);
        assert_eq!(m.deliver("m2", Verdict::Commit), Delivered::Now);
        m.settle_verdict("m2", &Verdict::Commit);
        assert_eq!(
            m.deliver("m2", Verdict::Commit),
            Delivered::Already(Verdict::Commit),
            "a repeated commit is no refusal"
        );
    }
}
