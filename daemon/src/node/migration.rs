//! The migration manager (thesis §5.5.3): one record per move in flight on this node, by
//! id and Pod uid (one move per Pod at a time) — its figures, the verdict channel a
//! source's Pod worker blocks on until its target has restored, a lazy source's page
//! server, a streamed target's page sink — then its history; the restore records the CRI
//! extension lists; and the target Pods whose restarts are refused.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use podmig_api::nodeapi::MoveInfo;
use podmig_cri_ext::{lazy::PageServer, proto::runtime::v1::RestoreRecord};

use super::stream::Sink;

pub use podmig_api::nodeapi::{MovePhase, MoveRole as Role};

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

/// One move in flight on this node, on one side.
struct Active {
    role: Role,
    started: Instant,
    /// What `GET /migrations` lists.
    info: MoveInfo,
    /// Source: the channel its worker waits on for the target's verdict.
    verdict: Option<Sender<Verdict>>,
    /// Source of a lazy move: the page server the target's faults reach.
    page_server: Option<Arc<PageServer>>,
    /// Target of a streamed full move: where its page streams land.
    page_sink: Option<Arc<Sink>>,
}

#[derive(Default)]
struct Inner {
    active: Vec<Active>,
    history: VecDeque<MoveInfo>,
    /// The verdicts taken, by move id, so that a repeated one (a retry after a lost
    /// answer, a restarted target asking again) is answered by what was decided.
    decided: VecDeque<(String, Verdict)>,
    restores: VecDeque<RestoreRecord>,
    /// Target Pods whose move failed for good (a restart settled it, or pages were lost):
    /// their containers' retried creates are refused, never turned into a second move.
    refused: HashSet<String>,
}

impl Inner {
    fn find(&mut self, role: Role, id: &str) -> Option<&mut Active> {
        self.active
            .iter_mut()
            .find(|a| a.role == role && a.info.id == id)
    }
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
        if let Some(other) = inner.active.iter().find(|a| a.info.pod_uid == info.pod_uid) {
            return Err(Busy(other.info.id.clone()));
        }
        info.role = role;
        info.started_at = now_rfc3339();
        inner.active.push(Active {
            role,
            started: Instant::now(),
            info,
            verdict: None,
            page_server: None,
            page_sink: None,
        });
        Ok(())
    }

    /// The Pods with a move in flight.
    pub fn active_pods(&self) -> Vec<String> {
        self.lock()
            .active
            .iter()
            .map(|a| a.info.pod_uid.clone())
            .collect()
    }

    /// The id of the move in flight for `pod_uid`.
    pub fn active_for(&self, pod_uid: &str) -> Option<String> {
        self.lock()
            .active
            .iter()
            .find(|a| a.info.pod_uid == pod_uid)
            .map(|a| a.info.id.clone())
    }

    /// Updates the record of move `id` on side `role`.
    pub fn update(&self, role: Role, id: &str, f: impl FnOnce(&mut MoveInfo)) {
        if let Some(a) = self.lock().find(role, id) {
            f(&mut a.info);
        }
    }

    /// Ends move `id` on side `role` with `state`; returns how long it ran. What the record
    /// held (verdict channel, page server, page sink) is dropped with it.
    pub fn finish(
        &self,
        role: Role,
        id: &str,
        state: MovePhase,
        error: Option<String>,
    ) -> Option<Duration> {
        let mut inner = self.lock();
        let at = inner
            .active
            .iter()
            .position(|a| a.role == role && a.info.id == id)?;
        let Active {
            started, mut info, ..
        } = inner.active.remove(at);
        info.state = state;
        if error.is_some() {
            info.report.error = error;
        }
        push_bounded(&mut inner.history, info);
        Some(started.elapsed())
    }

    /// Keeps `server` as the page server of lazy move `id` (source side).
    pub fn set_page_server(&self, id: &str, server: Arc<PageServer>) {
        if let Some(a) = self.lock().find(Role::Source, id) {
            a.page_server = Some(server);
        }
    }

    /// The page server of move `id`, while it is in flight.
    pub fn page_server(&self, id: &str) -> Option<Arc<PageServer>> {
        self.lock().find(Role::Source, id)?.page_server.clone()
    }

    /// Takes the page server of move `id` out of its record.
    pub fn take_page_server(&self, id: &str) -> Option<Arc<PageServer>> {
        self.lock().find(Role::Source, id)?.page_server.take()
    }

    /// Keeps `sink` as where the page streams of move `id` land (target side).
    pub fn set_page_sink(&self, id: &str, sink: Arc<Sink>) {
        if let Some(a) = self.lock().find(Role::Target, id) {
            a.page_sink = Some(sink);
        }
    }

    /// Where the page streams of move `id` land, while it expects them.
    pub fn page_sink(&self, id: &str) -> Option<Arc<Sink>> {
        self.lock().find(Role::Target, id)?.page_sink.clone()
    }

    /// Stops taking page streams for move `id`.
    pub fn drop_page_sink(&self, id: &str) {
        if let Some(a) = self.lock().find(Role::Target, id) {
            a.page_sink = None;
        }
    }

    /// From now on the creates of target Pod `pod_uid` are refused.
    pub fn refuse_restarts(&self, pod_uid: &str) {
        self.lock().refused.insert(pod_uid.to_owned());
    }

    /// Whether the creates of target Pod `pod_uid` are refused.
    pub fn restarts_refused(&self, pod_uid: &str) -> bool {
        self.lock().refused.contains(pod_uid)
    }

    /// Moves in flight, then ended ones, newest first.
    pub fn list(&self) -> Vec<MoveInfo> {
        let inner = self.lock();
        inner
            .active
            .iter()
            .map(|a| a.info.clone())
            .chain(inner.history.iter().rev().cloned())
            .collect()
    }

    /// Every record of move `id` (a same-node move has a source and a target record).
    pub fn get(&self, id: &str) -> Vec<MoveInfo> {
        self.list().into_iter().filter(|m| m.id == id).collect()
    }

    /// Keeps the channel on which the source worker of move `id` waits for its verdict;
    /// false when no such move is in flight (nothing can reach the worker then).
    pub fn await_verdict(&self, id: &str, tx: Sender<Verdict>) -> bool {
        match self.lock().find(Role::Source, id) {
            Some(a) => {
                a.verdict = Some(tx);
                true
            }
            None => false,
        }
    }

    /// Drops the verdict channel of move `id`: from now on nothing more reaches its worker,
    /// which then looks once more for a verdict that came in before deciding alone.
    pub fn stop_waiting(&self, id: &str) {
        if let Some(a) = self.lock().find(Role::Source, id) {
            a.verdict = None;
        }
    }

    /// Drops the verdict channel of move `id` (its worker stopped waiting) and remembers
    /// what the source did: `verdict` is final for this move.
    pub fn settle_verdict(&self, id: &str, verdict: &Verdict) {
        let mut inner = self.lock();
        if let Some(a) = inner.find(Role::Source, id) {
            a.verdict = None;
        }
        remember(&mut inner.decided, id, verdict);
    }

    /// Delivers the verdict on move `id` to its waiting worker, or says what was decided
    /// before.
    pub fn deliver(&self, id: &str, verdict: Verdict) -> Delivered {
        let tx = {
            let mut inner = self.lock();
            let Some(tx) = inner.find(Role::Source, id).and_then(|a| a.verdict.take()) else {
                return match inner.decided.iter().find(|(i, _)| i == id) {
                    Some((_, v)) => Delivered::Already(v.clone()),
                    None => Delivered::Unknown,
                };
            };
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

fn now_rfc3339() -> String {
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
        assert!(
            m.finish(Role::Source, "m1", MovePhase::Succeeded, None)
                .is_some()
        );
        assert_eq!(m.active_for("u1"), None);
        let both = m.get("m1");
        assert_eq!(both.len(), 2);
        let src = both
            .iter()
            .find(|i| i.role == Role::Source)
            .expect("source");
        assert_eq!((src.state.as_str(), src.report.bytes), ("Succeeded", 7));
        m.begin(Role::Source, info("m3", "u1")).expect("free again");
    }

    #[test]
    fn a_verdict_reaches_the_waiting_worker_once() {
        let m = Manager::default();
        m.begin(Role::Source, info("m1", "u1")).expect("begin");
        let (tx, rx) = crossbeam_channel::bounded(1);
        assert!(m.await_verdict("m1", tx));
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
        m.begin(Role::Source, info("m1", "u1")).expect("begin");
        m.begin(Role::Source, info("m2", "u2")).expect("begin");
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

    #[test]
    fn a_moves_record_holds_what_it_uses_and_drops_it_when_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::CheckpointStore::new(dir.path());
        let m = Manager::default();
        let sink = Arc::new(Sink::new(store, "t1", "node-a", vec!["c".into()]));
        m.set_page_sink("m1", sink.clone());
        assert!(m.page_sink("m1").is_none(), "no record, nothing kept");
        let (tx, _rx) = crossbeam_channel::bounded(1);
        assert!(!m.await_verdict("m1", tx), "no record, no verdict channel");
        m.begin(Role::Target, info("m1", "t1")).expect("begin");
        m.set_page_sink("m1", sink.clone());
        assert!(m.page_sink("m1").is_some_and(|s| Arc::ptr_eq(&s, &sink)));
        assert!(m.page_server("m1").is_none(), "a target has no page server");
        m.finish(Role::Target, "m1", MovePhase::Failed, Some("cut".into()));
        assert!(m.page_sink("m1").is_none(), "gone with the move");
        assert_eq!(Arc::strong_count(&sink), 1, "the record let go of the sink");
        assert!(!m.restarts_refused("t1"));
        m.refuse_restarts("t1");
        assert!(m.restarts_refused("t1") && !m.restarts_refused("t2"));
    }
}
