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

    /// Drops the verdict channel of move `id` (its worker stopped waiting).
    pub fn forget_verdict(&self, id: &str) {
        self.lock().verdicts.retain(|(i, _)| i != id);
    }

    /// Delivers the verdict on move `id`; false when nobody waits for one.
    pub fn deliver(&self, id: &str, verdict: Verdict) -> bool {
        let tx = {
            let mut inner = self.lock();
            let Some(at) = inner.verdicts.iter().position(|(i, _)| i == id) else {
                return false;
            };
            inner.verdicts.remove(at).1
        };
        tx.send(verdict).is_ok()
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
        assert!(m.deliver("m1", Verdict::Abort("cut".into())));
        assert_eq!(rx.recv().ok(), Some(Verdict::Abort("cut".into())));
        assert!(!m.deliver("m1", Verdict::Commit), "delivered already");
    }
}
