//! Crash safety of a move: a daemon that starts again settles every move its journal
//! holds before it serves. It first waits for the runc/CRIU runs the dead daemon left
//! (never killing one midway: CRIU's parasite code would stay in the tasks), then:
//!
//! - a **target** that was receiving drops the partial images and reports the failure; one
//!   that was restoring and whose container runs asks the source to commit (a same-node
//!   source decides here), and stops its copy when the source will not take it;
//! - a **source** that committed stops the frozen copy; one whose target runs (it said
//!   so, or reported `Restored`) stops it too; one whose target failed resumes in place
//!   — or, when the dumped container is gone, its next start restores it from its own
//!   checkpoint, never fresh; one whose target is still at work waits for it, as the live
//!   daemon would have, until the move's deadline.
//!
//! Never two running copies, never none for longer than the move.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use podmig_api::{
    ANNOTATION_MIGRATION_PHASE,
    contract::DaemonPhase,
    nodeapi::{CompleteRequest, MoveInfo},
    v1alpha1::MigrationReport,
};
use podmig_cri_ext::{engine::CheckpointEngine, identity::find_container};

use super::{
    journal::{Entry, Side, Step},
    migration::{Role, Verdict},
    podsync::{Delivery, NotTaken, PodUpdate, verdict_not_taken},
    shared::AddressError,
    shared::Node,
};
use crate::node::migration::MovePhase;

/// What becomes of a source container after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    /// The target runs with the state: stop the source for good.
    Discard,
    /// The target does not run: the source runs on.
    Resume,
    /// The target is still at work: wait for its verdict or phase until the deadline.
    Wait,
}

/// What the API server shows of a move's target Pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sight {
    /// The Pod, with its reported phase (`None`: none yet).
    Seen(Option<DaemonPhase>),
    /// No such Pod.
    Gone,
    /// The API server could not be asked: the target may run.
    Blind,
}

/// The decision for a source entry, from what is known of its target: the outcome of a
/// same-node target settled in this recovery, else what the API server shows of the
/// target Pod. Past the deadline anything but `Restored` resumes the source — but only
/// when the API server could be read: while blind, the source stays frozen (it may be
/// unavailable for a while, it is never doubled).
pub fn decide_source(entry: &Entry, local_target: Option<bool>, target: Sight) -> SourceAction {
    if entry.step == Step::Committed {
        return SourceAction::Discard;
    }
    match local_target {
        Some(true) => return SourceAction::Discard,
        Some(false) => return SourceAction::Resume,
        None => {}
    }
    match target {
        Sight::Seen(Some(DaemonPhase::Restored)) => SourceAction::Discard,
        Sight::Seen(Some(DaemonPhase::Failed)) | Sight::Gone => SourceAction::Resume,
        // Claimed: the dump was cut with the daemon; no target can have the images.
        _ if entry.step == Step::Claimed => SourceAction::Resume,
        Sight::Blind => SourceAction::Wait,
        Sight::Seen(_) if entry.expired() => SourceAction::Resume,
        Sight::Seen(_) => SourceAction::Wait,
    }
}

/// Pids of processes whose command line mentions any of `needles` (the runc/CRIU runs a
/// dead daemon left: `runc checkpoint <id>`, `criu dump … <images>`).
fn orphans(needles: &[String]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let tool = args
                .first()
                .and_then(|a| Path::new(a).file_name())
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            (tool.contains("runc") || tool.contains("criu"))
                && (args
                    .iter()
                    .any(|a| a == "checkpoint" || a == "restore" || a == "dump"))
                && needles
                    .iter()
                    .filter(|n| !n.is_empty())
                    .any(|n| args.iter().any(|a| a.contains(n.as_str())))
        })
        .collect()
}

/// Waits for the runc/CRIU runs touching `entry` to end (bounded; never kills them).
async fn wait_for_orphans(entry: &Entry) {
    let needles = vec![
        entry.container_id.clone(),
        entry.images.display().to_string(),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let left = orphans(&needles);
        if left.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            tracing::error!(migration = %entry.migration, pids = ?left, "runc/CRIU runs of a previous daemon do not end; settling anyway");
            return;
        }
        tracing::info!(migration = %entry.migration, pids = ?left, "waiting for the runc/CRIU runs a previous daemon left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A move's target Pod `ns/name` as the API server shows it (`None`: gone), or why it
/// cannot be read (no API access, an error, no answer within 5 s).
pub(crate) async fn look_at_target<E: CheckpointEngine>(
    node: &Node<E>,
    ns: &str,
    name: &str,
) -> Result<Option<Pod>, String> {
    let client = node.kube.clone().ok_or("no API access")?;
    let api: kube::Api<Pod> = kube::Api::namespaced(client, ns);
    match tokio::time::timeout(Duration::from_secs(5), api.get_opt(name)).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the API server did not answer within 5 s".into()),
    }
}

async fn target_pod<E: CheckpointEngine>(node: &Node<E>, e: &Entry) -> Option<Option<Pod>> {
    look_at_target(node, &e.target_namespace, &e.target_pod)
        .await
        .ok()
}

/// The phase a target Pod reports.
pub(crate) fn phase_of(pod: &Pod) -> Option<DaemonPhase> {
    let a = pod.metadata.annotations.as_ref()?;
    let phase = a
        .get(ANNOTATION_MIGRATION_PHASE)
        .and_then(|v| DaemonPhase::parse(v));
    // A restored target says so before its move ends (and before it tells its source).
    match phase {
        Some(DaemonPhase::Failed) => phase,
        _ if a.contains_key(podmig_api::ANNOTATION_RESTORED) => Some(DaemonPhase::Restored),
        _ => phase,
    }
}

/// What a lookup showed (`None`: the API server could not be asked — or there is none,
/// and then nothing else can be learnt either: the deadline decides).
fn seen<E: CheckpointEngine>(node: &Node<E>, target: Option<&Option<Pod>>) -> Sight {
    match target {
        Some(Some(p)) => Sight::Seen(phase_of(p)),
        Some(None) => Sight::Gone,
        None if node.kube.is_some() => Sight::Blind,
        None => Sight::Seen(None),
    }
}

/// Settles every journaled move; moves whose target is still at work are waited for in
/// the background (their source stays frozen meanwhile and the Pod stays busy).
pub async fn run<E: CheckpointEngine>(node: Arc<Node<E>>) {
    let (moved_away, entries): (Vec<Entry>, Vec<Entry>) = node
        .journal
        .entries()
        .into_iter()
        .partition(|e| e.step == Step::MovedAway);
    for e in &moved_away {
        refuse_restarts(&node, e);
    }
    if entries.is_empty() {
        return;
    }
    tracing::warn!(
        moves = entries.len(),
        "settling the moves a previous run left"
    );
    for e in &entries {
        wait_for_orphans(e).await;
    }
    let targets: Vec<&Entry> = entries.iter().filter(|e| e.side == Side::Target).collect();
    let mut whole: HashMap<String, bool> = HashMap::new();
    for e in &targets {
        if !whole.contains_key(&e.migration) {
            let pod = target_pod(&node, e).await.flatten();
            let ok = pod_restored_whole(&node, &targets, e, pod.as_ref());
            whole.insert(e.migration.clone(), ok);
        }
    }
    let mut local_targets: HashMap<String, bool> = HashMap::new();
    let mut verdicts: HashMap<String, Result<(), NotTaken>> = HashMap::new();
    for e in &targets {
        let whole = whole.get(&e.migration).copied().unwrap_or(false);
        let runs = settle_target(&node, e, whole, &mut verdicts).await;
        local_targets.insert(e.migration.clone(), runs);
    }
    for e in entries.iter().filter(|e| e.side == Side::Source) {
        let local = local_targets.get(&e.migration).copied();
        let target = if local.is_some() {
            None
        } else {
            target_pod(&node, e).await
        };
        match decide_source(e, local, seen(&node, target.as_ref())) {
            SourceAction::Wait => {
                let node = node.clone();
                let e = e.clone();
                tokio::spawn(async move { wait_for_target(node, e).await });
            }
            action => settle_source(&node, e, action).await,
        }
    }
}

/// Whether every container of the target Pod of `e`'s move was restored and runs: a
/// multi-container move commits whole or not at all. The Pod's spec names its containers;
/// without it, the journal's entries of the move stand for them.
fn pod_restored_whole<E: CheckpointEngine>(
    node: &Node<E>,
    targets: &[&Entry],
    e: &Entry,
    pod: Option<&Pod>,
) -> bool {
    let entries: Vec<(String, Step)> = targets
        .iter()
        .filter(|t| t.migration == e.migration)
        .map(|t| (t.container.clone(), t.step))
        .collect();
    let names: Option<Vec<String>> = pod
        .and_then(|p| p.spec.as_ref())
        .map(|s| s.containers.iter().map(|c| c.name.clone()).collect());
    whole_move(names.as_deref(), &entries, |name| {
        find_container(&node.settings.runc_root, &e.pod_uid, name).is_some()
    })
}

/// The decision of [`pod_restored_whole`]: every container `names` lists (or, unknown,
/// every journaled one) has a `Restoring` entry and `runs`.
pub fn whole_move(
    names: Option<&[String]>,
    entries: &[(String, Step)],
    runs: impl Fn(&str) -> bool,
) -> bool {
    let journaled: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    names.unwrap_or(&journaled).iter().all(|name| {
        entries
            .iter()
            .any(|(n, step)| n == name && *step == Step::Restoring)
            && runs(name)
    })
}

/// What becomes of a target container after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetAction {
    /// It runs and may stay (a same-node move: the source's side was settled here).
    Keep,
    /// It runs; the source must take the commit (again: a repeated commit is answered
    /// by what was decided) or it stops.
    AskSource,
    /// It must stop (or never start), for this reason.
    Stop(String),
}

/// The decision for a target entry from its journaled step, whether its container
/// runs, whether every container of its Pod was restored, and whether the source is on
/// this node. A lazy move's memory arrives only through the dead daemon's tunnel: at
/// `Paging` (journaled before the commit left) the state is lost; before it, nothing
/// was committed and the source resumes.
pub fn decide_target(e: &Entry, runs: bool, whole: bool, same_node: bool) -> TargetAction {
    match (e.step, runs) {
        (Step::Paging, _) => TargetAction::Stop(super::podsync::pages_lost(
            "the target's daemon restarted while the pages arrived",
        )),
        (Step::Restoring, true) if e.lazy => TargetAction::Stop(
            "the target's daemon restarted before it committed the lazy move (its page \
             tunnel died with it); the source resumes"
                .into(),
        ),
        (Step::Restoring, true) if !whole => TargetAction::Stop(
            "the daemon restarted before every container of the Pod was restored".into(),
        ),
        (Step::Restoring, true) if same_node => TargetAction::Keep,
        (Step::Restoring, true) => TargetAction::AskSource,
        (Step::Restoring, false) => {
            TargetAction::Stop("the restore did not leave a running container".into())
        }
        _ => TargetAction::Stop("the target daemon restarted while the images arrived".into()),
    }
}

/// A target entry: returns whether the restored copy runs (and may stay). `whole`: every
/// container of its Pod was restored (else none may stay).
/// `verdicts` holds the source's answer per move: it is asked once for all containers.
async fn settle_target<E: CheckpointEngine>(
    node: &Arc<Node<E>>,
    e: &Entry,
    whole: bool,
    verdicts: &mut HashMap<String, Result<(), NotTaken>>,
) -> bool {
    let running = find_container(&node.settings.runc_root, &e.pod_uid, &e.container);
    let own_images = e.images.starts_with(node.store.root().join(&e.pod_uid));
    let same_node = e.peer_node.is_empty() || e.peer_node == node.settings.node_name;
    let outcome = match decide_target(e, running.is_some(), whole, same_node) {
        TargetAction::Keep => Ok(()),
        TargetAction::Stop(why) => Err(why),
        TargetAction::AskSource => match verdicts.get(&e.migration) {
            Some(v) => v.clone().map_err(|why| why.to_string()),
            None => {
                let v = confirm_with_source(node, e).await;
                verdicts.insert(e.migration.clone(), v.clone());
                v.map_err(|why| why.to_string())
            }
        },
    };
    if own_images {
        node.store.remove(&e.images);
    }
    let sandbox = podmig_cri_ext::identity::sandbox_of(
        &node.settings.runc_root,
        running.as_deref().unwrap_or(&e.container_id),
    );
    let runs = match outcome {
        Ok(()) => {
            if let Some(id) = &running {
                release_hold(node, id);
            }
            node.report_done(
                &e.target_namespace,
                &e.target_pod,
                &MigrationReport::default(),
            );
            true
        }
        Err(why) => {
            node.manager.refuse_restarts(&e.pod_uid);
            if let Some(id) = &running {
                let engine = node.engine.clone();
                let id = id.clone();
                let _ = tokio::task::spawn_blocking(move || engine.discard(&id)).await;
            }
            // A kept address announced for this restore goes back to the source.
            if let Some(sb) = &sandbox {
                for ip in crate::keepip::held_addresses(sb).unwrap_or_default() {
                    let _ = crate::keepip::unroute(ip);
                }
                let _ = crate::keepip::release(sb);
            }
            node.report_done(
                &e.target_namespace,
                &e.target_pod,
                &MigrationReport {
                    error: Some(format!("restore on {}: {why}", node.settings.node_name)),
                    ..Default::default()
                },
            );
            false
        }
    };
    tracing::warn!(migration = %e.migration, pod_uid = %e.pod_uid, container = %e.container, step = ?e.step,
        runs, "settled a move target a previous run left");
    node.journal.remove(e);
    runs
}

/// Asks the source to commit a restored target; `Err` when this copy must stop.
async fn confirm_with_source<E: CheckpointEngine>(
    node: &Arc<Node<E>>,
    e: &Entry,
) -> Result<(), NotTaken> {
    let address = {
        let (node, peer) = (node.clone(), e.peer_node.clone());
        tokio::task::spawn_blocking(move || node.node_address(&peer))
            .await
            .unwrap_or_else(|e| Err(AddressError::Interrupted(e.to_string())))
    };
    let delivery = match (&node.peers, address) {
        (Some(peers), Ok(host)) => {
            let body = CompleteRequest {
                ok: true,
                error: None,
                restore_ms: None,
            };
            Delivery::from(peers.complete(&host, &e.migration, &body).await)
        }
        (_, Err(why)) => Delivery::Unreachable(why.to_string()),
        (None, _) => Delivery::Unreachable("no peer credentials".into()),
    };
    // Restored before the restart: its phase was recorded then, or it stops (the old
    // rule of a run before the deadline, kept for entries a previous version journaled).
    match verdict_not_taken(&delivery, !e.expired()) {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

/// A source that runs again (or will) is reached again: the hold a previous run set on its
/// address for a move that kept it (rules tagged with its sandbox) goes.
fn release_hold<E: CheckpointEngine>(node: &Arc<Node<E>>, container_id: &str) {
    let Some(sandbox) =
        podmig_cri_ext::identity::sandbox_of(&node.settings.runc_root, container_id)
    else {
        return;
    };
    match crate::keepip::release_and_reclaim(&sandbox) {
        Ok(again) => tracing::info!(
            container_id,
            announced_again = ?again,
            "released the address hold a previous run set"
        ),
        Err(error) => {
            tracing::warn!(container_id, %error, "cannot release the address hold a previous run set")
        }
    }
}

/// Where a moved-away container went, for the runtime's refusal.
fn moved_to<E: CheckpointEngine>(node: &Node<E>, e: &Entry) -> String {
    let on = if e.peer_node.is_empty() {
        &node.settings.node_name
    } else {
        &e.peer_node
    };
    format!("{}/{} on {on}", e.target_namespace, e.target_pod)
}

/// A container a previous run moved away stays refused: the kubelet, seeing it exited,
/// would otherwise start it again fresh next to its moved copy.
fn refuse_restarts<E: CheckpointEngine>(node: &Arc<Node<E>>, e: &Entry) {
    tracing::info!(migration = %e.migration, pod_uid = %e.pod_uid, container = %e.container,
        "a container a previous run moved away stays refused");
    node.dispatch(
        &e.pod_uid,
        PodUpdate::MovedAway {
            container: e.container.clone(),
            migration: e.migration.clone(),
            target: moved_to(node, e),
        },
    );
}

async fn settle_source<E: CheckpointEngine>(node: &Arc<Node<E>>, e: &Entry, action: SourceAction) {
    let engine = node.engine.clone();
    let id = e.container_id.clone();
    let alive = find_container(&node.settings.runc_root, &e.pod_uid, &e.container).is_some();
    let complete = node.store.has_checkpoint(&e.images);
    let outcome = match action {
        SourceAction::Discard => {
            let r = tokio::task::spawn_blocking(move || engine.discard(&id)).await;
            node.store.remove(&e.images);
            format!("stopped for good: {r:?}")
        }
        _ if alive => {
            release_hold(node, &e.container_id);
            let r = tokio::task::spawn_blocking(move || engine.resume(&id)).await;
            node.store.remove(&e.images);
            format!("resumed in place: {r:?}")
        }
        _ if complete => {
            release_hold(node, &e.container_id);
            // The dumped container is gone: its next start restores the checkpoint.
            let (tx, rx) = tokio::sync::oneshot::channel();
            node.dispatch(
                &e.pod_uid,
                PodUpdate::Arm {
                    container: e.container.clone(),
                    images: e.images.clone(),
                    reply: tx,
                },
            );
            format!("armed to restore from its checkpoint: {:?}", rx.await)
        }
        _ => {
            node.store.remove(&e.images);
            "gone, and no complete checkpoint of it exists".to_owned()
        }
    };
    tracing::warn!(migration = %e.migration, pod_uid = %e.pod_uid, container = %e.container, step = ?e.step,
        ?action, %outcome, "settled a move source a previous run left");
    if action == SourceAction::Discard {
        // Its container now runs elsewhere: kept as moved away until the Pod leaves.
        let mut kept = e.clone();
        node.journal.advance(&mut kept, Step::MovedAway);
        refuse_restarts(node, &kept);
    } else {
        node.journal.remove(e);
    }
}

/// A source whose target is still at work: it can still take the move. The move is
/// listed (and the Pod busy) again; a verdict from the target, or the target Pod's phase,
/// decides; at the deadline anything but `Restored` resumes the source.
async fn wait_for_target<E: CheckpointEngine>(node: Arc<Node<E>>, e: Entry) {
    let info = MoveInfo {
        id: e.migration.clone(),
        namespace: e.target_namespace.clone(),
        pod_uid: e.pod_uid.clone(),
        peer_node: Some(e.peer_node.clone()),
        state: MovePhase::Transferring,
        ..Default::default()
    };
    let registered = node.manager.begin(Role::Source, info).is_ok();
    let (tx, rx) = crossbeam_channel::bounded(1);
    if !node.manager.await_verdict(&e.migration, tx) {
        tracing::warn!(migration = %e.migration, "another move of this Pod is in flight; no verdict can reach this one");
    }
    let by_verdict = |v: Verdict| match v {
        Verdict::Commit => SourceAction::Discard,
        Verdict::Abort(_) => SourceAction::Resume,
    };
    let action = loop {
        if let Ok(v) = rx.try_recv() {
            break by_verdict(v);
        }
        let target = target_pod(&node, &e).await;
        match decide_source(&e, None, seen(&node, target.as_ref())) {
            SourceAction::Wait => tokio::time::sleep(Duration::from_millis(500)).await,
            action => {
                // A verdict taken meanwhile decides (its sender was told it was taken).
                node.manager.stop_waiting(&e.migration);
                break rx.try_recv().map_or(action, by_verdict);
            }
        }
    };
    node.manager.settle_verdict(
        &e.migration,
        &match action {
            SourceAction::Discard => Verdict::Commit,
            _ => Verdict::Abort("the source resumed after its daemon restarted".into()),
        },
    );
    settle_source(&node, &e, action).await;
    if registered {
        let (outcome, error) = match action {
            SourceAction::Discard => (MovePhase::Succeeded, None),
            _ => (
                MovePhase::RolledBack,
                Some("the source daemon restarted; the target did not finish".to_owned()),
            ),
        };
        node.manager
            .finish(Role::Source, &e.migration, outcome, error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::journal::deadline_unix_ms;
    use std::time::Instant;

    #[test]
    fn a_restarted_lazy_target_never_asks_for_a_second_commit() {
        let mut e = entry(Step::Restoring, 60);
        e.side = Side::Target;
        assert_eq!(
            decide_target(&e, true, true, false),
            TargetAction::AskSource
        );
        e.lazy = true;
        let TargetAction::Stop(why) = decide_target(&e, true, true, false) else {
            panic!("a lazy target that had not committed must stop");
        };
        assert!(why.contains("the source resumes"), "{why}");
        e.step = Step::Paging;
        let TargetAction::Stop(why) = decide_target(&e, true, true, false) else {
            panic!("a committed lazy target lost its pages");
        };
        assert!(why.contains("in-memory state is lost"), "{why}");
        e.lazy = false;
        e.step = Step::Restoring;
        assert_eq!(decide_target(&e, true, true, true), TargetAction::Keep);
        assert!(matches!(
            decide_target(&e, true, false, false),
            TargetAction::Stop(_)
        ));
        assert!(matches!(
            decide_target(&e, false, true, false),
            TargetAction::Stop(_)
        ));
    }

    fn entry(step: Step, secs: u64) -> Entry {
        Entry {
            migration: "m".into(),
            side: Side::Source,
            pod_uid: "u".into(),
            container: "app".into(),
            container_id: "c".into(),
            images: "/i".into(),
            target_namespace: "ns".into(),
            target_pod: "p-1".into(),
            peer_node: "n2".into(),
            deadline_unix_ms: deadline_unix_ms(Instant::now() + Duration::from_secs(secs)),
            step,
            lazy: false,
        }
    }

    #[test]
    fn a_source_is_stopped_only_when_its_target_runs() {
        use SourceAction::*;
        let dumped = entry(Step::Dumped, 60);
        assert_eq!(
            decide_source(&entry(Step::Committed, 60), None, Sight::Gone),
            Discard
        );
        assert_eq!(
            decide_source(&dumped, Some(true), Sight::Seen(None)),
            Discard
        );
        assert_eq!(
            decide_source(
                &dumped,
                Some(false),
                Sight::Seen(Some(DaemonPhase::Restored))
            ),
            Resume
        );
        assert_eq!(
            decide_source(&dumped, None, Sight::Seen(Some(DaemonPhase::Restored))),
            Discard
        );
        assert_eq!(
            decide_source(&dumped, None, Sight::Seen(Some(DaemonPhase::Failed))),
            Resume
        );
        assert_eq!(decide_source(&dumped, None, Sight::Gone), Resume);
        assert_eq!(
            decide_source(&dumped, None, Sight::Seen(Some(DaemonPhase::Restoring))),
            Wait
        );
        assert_eq!(
            decide_source(
                &entry(Step::Claimed, 60),
                None,
                Sight::Seen(Some(DaemonPhase::Transferring))
            ),
            Resume
        );
        assert_eq!(
            decide_source(
                &entry(Step::Dumped, 0),
                None,
                Sight::Seen(Some(DaemonPhase::Restoring))
            ),
            Resume
        );
        // Blind (the API server cannot be read): never resumed, even past the deadline.
        assert_eq!(decide_source(&dumped, None, Sight::Blind), Wait);
        assert_eq!(
            decide_source(&entry(Step::Dumped, 0), None, Sight::Blind),
            Wait
        );
        assert_eq!(
            decide_source(&entry(Step::Claimed, 0), None, Sight::Blind),
            Resume
        );
    }

    #[test]
    fn a_multi_container_target_stays_only_when_every_container_was_restored() {
        let names = ["app".to_owned(), "sidecar".to_owned()];
        let both = [
            ("app".to_owned(), Step::Restoring),
            ("sidecar".to_owned(), Step::Restoring),
        ];
        assert!(whole_move(Some(&names), &both, |_| true));
        // The sidecar's create had not come when the daemon died: no entry for it.
        let app_only = [("app".to_owned(), Step::Restoring)];
        assert!(!whole_move(Some(&names), &app_only, |_| true));
        // Its restore had begun but left nothing running.
        assert!(!whole_move(Some(&names), &both, |n| n == "app"));
        // Still receiving.
        let receiving = [
            ("app".to_owned(), Step::Restoring),
            ("sidecar".to_owned(), Step::Receiving),
        ];
        assert!(!whole_move(Some(&names), &receiving, |_| true));
        // Without the Pod's spec the journal's entries stand for the containers.
        assert!(whole_move(None, &app_only, |_| true));
    }

    #[test]
    fn a_target_annotated_restored_reads_as_restored_unless_it_failed() {
        let pod = |a: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"annotations": a}}))
                .expect("pod")
        };
        let restored = podmig_api::ANNOTATION_RESTORED;
        assert_eq!(
            phase_of(&pod(
                serde_json::json!({ANNOTATION_MIGRATION_PHASE: "Restoring", restored: "true"})
            )),
            Some(DaemonPhase::Restored)
        );
        assert_eq!(
            phase_of(&pod(
                serde_json::json!({ANNOTATION_MIGRATION_PHASE: "Failed", restored: "true"})
            )),
            Some(DaemonPhase::Failed)
        );
        assert_eq!(
            phase_of(&pod(
                serde_json::json!({ANNOTATION_MIGRATION_PHASE: "Restoring"})
            )),
            Some(DaemonPhase::Restoring)
        );
    }

    #[test]
    fn a_restored_target_stops_when_the_source_will_not_take_it_nor_see_it() {
        assert_eq!(verdict_not_taken(&Delivery::Taken, false), None);
        assert!(matches!(
            verdict_not_taken(&Delivery::Refused("409".into()), true),
            Some(NotTaken::Refused(_))
        ));
        // Unreachable: it runs on only where the source will read its `Restored`.
        assert_eq!(
            verdict_not_taken(&Delivery::Unreachable("down".into()), true),
            None
        );
        assert!(matches!(
            verdict_not_taken(&Delivery::Unreachable("down".into()), false),
            Some(NotTaken::Unseen(_))
        ));
    }
}
