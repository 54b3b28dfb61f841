//! `podmig controller`: reconciles MigratingPods (migrate-on-delete) and Migrations (moves
//! on request), leader-elected on a Lease so that two replicas are safe.

pub mod eviction;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod migratingpod;
pub mod migration;
pub mod pod;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Node, Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action as Requeue,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        watcher,
    },
};
use podmig_api::{
    CLEANUP_FINALIZER, LABEL_MIGRATING_POD, MIGRATE_FINALIZER,
    v1alpha1::{MigratingPod, Migration, MigrationPhase},
};

use migratingpod::Action;

/// Errors of the controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// An object lacks its namespace.
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

impl Error {
    /// Short stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace(_) => "no_namespace",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Limits on moves at once.
    pub limits: limits::Limits,
    /// Held while a pending Migration is admitted: two reconciles never both take the
    /// last place.
    pub admission: tokio::sync::Mutex<()>,
    /// The Migrations waiting in the queue (namespace, name): a move that ends wakes them
    /// at once, instead of at their next look ([`QUEUE_RESYNC`]).
    pub waiting: Arc<std::sync::Mutex<std::collections::BTreeSet<(String, String)>>>,
}

impl Context {
    fn set_waiting(&self, ns: &str, name: &str, waiting: bool) {
        let mut w = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (ns.to_owned(), name.to_owned());
        if waiting {
            w.insert(key);
        } else {
            w.remove(&key);
        }
    }
}

/// How often objects are looked at again when nothing happens (timeouts, give-ups).
const REQUEUE: Duration = Duration::from_secs(2);

/// A target Pod just made, to be recorded on its MigratingPod's status.
type Recorded = (String, podmig_api::v1alpha1::MoveTarget);

/// Carries out `actions`; returns the move targets it created, for the caller to record
/// ([`record_move_targets`], or in its own status write when it reconciles their owner).
async fn apply_actions<K>(
    ctx: &Context,
    ns: &str,
    obj: &K,
    actions: Vec<Action>,
) -> Result<Vec<Recorded>, Error>
where
    K: Resource<DynamicType = ()>,
{
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut recorded = Vec::new();
    for action in actions {
        match action {
            Action::CreatePod(pod) => match pods.create(&PostParams::default(), &pod).await {
                // A name collision means the Pod was created before: exactly once. (Its
                // move record was written then; one never written — a crash in between —
                // leaves a target the daemons refuse, and the move fails safe.)
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Ok(created) => recorded.extend(move_target(ctx, ns, &created).await?),
                Err(e) => return Err(e.into()),
            },
            Action::ReleaseFinalizer(name) => {
                let Some(pod) = pods.get_opt(&name).await? else {
                    continue;
                };
                let kept: Vec<String> = pod
                    .finalizers()
                    .iter()
                    .filter(|f| *f != MIGRATE_FINALIZER)
                    .cloned()
                    .collect();
                let patch = serde_json::json!({"metadata": {"finalizers": kept, "resourceVersion": pod.resource_version()}});
                match pods
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    other => {
                        other?;
                    }
                }
            }
            Action::ClaimPod {
                pod,
                resource_version,
            } => {
                let patch = serde_json::json!({"metadata": {
                    "annotations": {podmig_api::ANNOTATION_CLAIMED_BY: obj.meta().name},
                    "resourceVersion": resource_version}});
                match pods
                    .patch(&pod, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    // Somebody changed the Pod (maybe another Migration claimed it): the
                    // next reconcile sees who holds it.
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {}
                    other => {
                        other?;
                    }
                }
            }
            Action::RecordPodIndex {
                migrating_pod,
                index,
            } => {
                let mpods: Api<MigratingPod> = Api::namespaced(ctx.client.clone(), ns);
                let patch = serde_json::json!({"status": {"lastPodIndex": index}});
                match mpods
                    .patch_status(
                        &migrating_pod,
                        &PatchParams::default(),
                        &Patch::Merge(patch),
                    )
                    .await
                {
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    other => {
                        other?;
                    }
                }
            }
            Action::DeletePod(name) => match pods.delete(&name, &DeleteParams::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                other => {
                    other?;
                }
            },
            Action::Event {
                reason,
                message,
                warning,
            } => {
                if reason != "MigrationStarted" {
                    ctx.metrics
                        .moves
                        .get_or_create(&metrics::OutcomeLabels {
                            outcome: reason.into(),
                        })
                        .inc();
                }
                let ev = Event {
                    type_: if warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.into(),
                    // NB: kube-runtime's recorder folds events with the same action and
                    // reason into one series, keeping the first note; the note as the
                    // action keeps each move's Event (client-go folds by message too).
                    action: message.chars().take(128).collect(),
                    note: Some(message),
                    secondary: None,
                };
                if let Err(error) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
                    tracing::warn!(%error, "cannot record event");
                }
            }
        }
    }
    Ok(recorded)
}

/// The move record of a target Pod just made, with the uid the API server gave it, and
/// its MigratingPod's name (`None`: not a migration target).
async fn move_target(ctx: &Context, ns: &str, created: &Pod) -> Result<Option<Recorded>, Error> {
    let Some(record) = migratingpod::move_target_of(created) else {
        return Ok(None);
    };
    let Some(owner) = created
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "MigratingPod")
        .map(|o| o.name.clone())
    else {
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let source_pod = pods
        .list(&ListParams::default().labels(&format!("{LABEL_MIGRATING_POD}={owner}")))
        .await?
        .items
        .into_iter()
        .find(|p| p.uid().as_deref() == Some(record.source_pod_uid.as_str()))
        .map(|p| p.name_any())
        .unwrap_or_default();
    let record = podmig_api::v1alpha1::MoveTarget {
        source_pod,
        ..record
    };
    tracing::info!(target_pod = %record.target_pod, target_uid = %record.target_pod_uid,
        migration = %record.migration_id, "a move's target made");
    Ok(Some((owner, record)))
}

/// Records targets just made on their MigratingPods' status (`moveTarget`): the node
/// daemons hand over and restore memory only for the target this record names. A merge
/// of that one field, so no other writer's status is overwritten.
async fn record_move_targets(
    ctx: &Context,
    ns: &str,
    recorded: Vec<Recorded>,
) -> Result<(), Error> {
    let mpods: Api<MigratingPod> = Api::namespaced(ctx.client.clone(), ns);
    for (owner, record) in recorded {
        let patch = serde_json::json!({"status": {"moveTarget": record}});
        match mpods
            .patch_status(&owner, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

/// What both reconcilers do first: count the reconciliation of `kind` and find the
/// object's namespace (both kinds are namespaced).
fn begin_reconcile<K: ResourceExt>(ctx: &Context, kind: &str, obj: &K) -> Result<String, Error> {
    ctx.metrics
        .reconciliations
        .get_or_create(&metrics::KindLabels { kind: kind.into() })
        .inc();
    obj.namespace()
        .ok_or_else(|| Error::NoNamespace(obj.name_any()))
}

async fn reconcile_mpod(mpod: Arc<MigratingPod>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = begin_reconcile(&ctx, "migratingpod", mpod.as_ref())?;
    let api: Api<MigratingPod> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, CLEANUP_FINALIZER, mpod, |event| async {
        match event {
            Finalizer::Apply(m) | Finalizer::Cleanup(m) => sync_mpod(&m, &ctx, &ns).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

#[tracing::instrument(skip(m, ctx), fields(migratingpod = %m.name_any(), namespace = %ns))]
async fn sync_mpod(m: &MigratingPod, ctx: &Context, ns: &str) -> Result<Requeue, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let uid = m.uid().unwrap_or_default();
    let owned: Vec<Pod> = pods
        .list(&ListParams::default().labels(&format!("{LABEL_MIGRATING_POD}={}", m.name_any())))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        })
        .collect();
    let local = pod::local_claims(
        &ctx.client,
        ns,
        owned
            .iter()
            .filter_map(|p| p.spec.as_ref())
            .chain(m.spec.template.spec.as_ref()),
    )
    .await?;
    let decision = migratingpod::decide_with(m, &owned, &local, Timestamp::now());
    if !decision.actions.is_empty() {
        tracing::info!(actions = ?decision.actions.iter().map(short).collect::<Vec<_>>(), "reconciling");
    }
    let (events, effects) = split_events(decision.actions);
    let recorded = apply_actions(ctx, ns, m, effects).await?;
    let mut status = decision.status;
    // A target of this MigratingPod is recorded in the same write as the rest of its
    // status (the index of the Pod just made with it).
    let (own, others): (Vec<_>, Vec<_>) = recorded
        .into_iter()
        .partition(|(owner, _)| *owner == m.name_any());
    if let Some((_, r)) = own.last() {
        status.move_target = Some(r.clone());
    }
    record_move_targets(ctx, ns, others).await?;
    if m.metadata.deletion_timestamp.is_none() && m.status.as_ref() != Some(&status) {
        let api: Api<MigratingPod> = Api::namespaced(ctx.client.clone(), ns);
        if !patch_status_from(&api, m, cleared(m.status.as_ref(), &status)).await? {
            // Changed meanwhile: the record must not be lost with this write.
            record_move_targets(ctx, ns, own).await?;
            return Ok(Requeue::requeue(Duration::from_millis(200)));
        }
    } else if m.metadata.deletion_timestamp.is_some() {
        record_move_targets(ctx, ns, own).await?;
    }
    apply_actions(ctx, ns, m, events).await?;
    Ok(Requeue::requeue(REQUEUE))
}

/// Events apart from the other actions: they are recorded only once the status that
/// explains them is written, so a reconcile on a stale copy never records them twice.
fn split_events(actions: Vec<Action>) -> (Vec<Action>, Vec<Action>) {
    actions
        .into_iter()
        .partition(|a| matches!(a, Action::Event { .. }))
}

/// `new` as a merge patch over `old`: a field `new` no longer has (a queue place, a
/// reason) is written as null, so the write removes it.
fn cleared<T: serde::Serialize>(old: Option<&T>, new: &T) -> serde_json::Value {
    let mut patch = serde_json::json!(new);
    if let (Some(serde_json::Value::Object(was)), serde_json::Value::Object(now)) =
        (old.map(|o| serde_json::json!(o)), &mut patch)
    {
        for key in was.keys() {
            if !now.contains_key(key) {
                now.insert(key.clone(), serde_json::Value::Null);
            }
        }
    }
    patch
}

/// Writes `status` on `obj` only if it is still the version this decision saw; false
/// when it changed meanwhile (the next reconcile decides again on the new version).
async fn patch_status_from<K>(
    api: &Api<K>,
    obj: &K,
    status: serde_json::Value,
) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({"metadata": {"resourceVersion": obj.resource_version()}, "status": status});
    match api
        .patch_status(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn short(a: &Action) -> String {
    match a {
        Action::CreatePod(p) => format!("create {}", p.name_any()),
        Action::ReleaseFinalizer(n) => format!("release {n}"),
        Action::DeletePod(n) => format!("delete {n}"),
        Action::RecordPodIndex { index, .. } => format!("record index {index}"),
        Action::ClaimPod { pod, .. } => format!("claim {pod}"),
        Action::Event { reason, .. } => format!("event {reason}"),
    }
}

#[tracing::instrument(skip(m, ctx), fields(migration = %m.name_any()))]
async fn reconcile_migration(m: Arc<Migration>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let ns = begin_reconcile(&ctx, "migration", m.as_ref())?;
    let waiting_for_report = m
        .status
        .as_ref()
        .is_some_and(|s| s.phase == Some(MigrationPhase::Succeeded) && s.report.is_none())
        && m.metadata.creation_timestamp.as_ref().is_some_and(|t| {
            (Timestamp::now() - t.0).get_seconds() < REPORT_GRACE.as_secs() as i64
        });
    if m.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
        && !waiting_for_report
    {
        ctx.set_waiting(&ns, &m.name_any(), false);
        return Ok(Requeue::await_change());
    }
    let pending = m
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_none_or(|p| p == MigrationPhase::Pending);
    let _admitting = if pending {
        Some(ctx.admission.lock().await)
    } else {
        None
    };
    let (busy, queued) = if pending {
        moves_under_way(&ctx.client, &m).await?
    } else {
        (vec![], vec![])
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod = pods.get_opt(&m.spec.pod_name).await?;
    let owner_name = pod.as_ref().and_then(|p| {
        p.owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "MigratingPod")
            .map(|o| o.name.clone())
    });
    let mpods: Api<MigratingPod> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = match &owner_name {
        Some(n) => mpods.get_opt(n).await?,
        None => None,
    };
    let siblings = match &owner_name {
        Some(n) => {
            pods.list(&ListParams::default().labels(&format!("{LABEL_MIGRATING_POD}={n}")))
                .await?
                .items
        }
        None => vec![],
    };
    let target = match m.status.as_ref().and_then(|s| s.target_pod.clone()) {
        Some(t) => pods.get_opt(&t).await?,
        None => None,
    };
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let migrations: Api<Migration> = Api::namespaced(ctx.client.clone(), &ns);
    let others = migrations.list(&ListParams::default()).await?.items;
    let local_claims =
        pod::local_claims(&ctx.client, &ns, pod.as_ref().and_then(|p| p.spec.as_ref())).await?;
    let observed = migration::Observed {
        migration: &m,
        pod: pod.as_ref(),
        owner: owner.as_ref(),
        siblings: &siblings,
        target: target.as_ref(),
        nodes: &nodes,
        others: &others,
        local_claims: &local_claims,
        limits: &ctx.limits,
        busy: &busy,
        queued: &queued,
    };
    let (actions, status) = migration::decide(&observed, Timestamp::now());
    let (events, effects) = split_events(actions);
    // A target is recorded (name, index) before it is created, so a decision taken on a
    // stale copy can never create a second one; other steps act first, then record.
    let record_first = status.phase == Some(MigrationPhase::Scheduling)
        && m.status.as_ref().and_then(|s| s.phase) != Some(MigrationPhase::Scheduling);
    let mut effects = Some(effects);
    if !record_first {
        let made = apply_actions(&ctx, &ns, m.as_ref(), effects.take().unwrap_or_default()).await?;
        record_move_targets(&ctx, &ns, made).await?;
    }
    if m.status.as_ref() != Some(&status) {
        tracing::info!(phase = ?status.phase, reason = ?status.reason, "migration progressed");
        let patch = cleared(m.status.as_ref(), &status);
        if !patch_status_from(&migrations, m.as_ref(), patch).await? {
            return Ok(Requeue::requeue(Duration::from_millis(200)));
        }
    }
    if let Some(effects) = effects {
        let made = apply_actions(&ctx, &ns, m.as_ref(), effects).await?;
        record_move_targets(&ctx, &ns, made).await?;
    }
    apply_actions(&ctx, &ns, m.as_ref(), events).await?;
    // A queued move looks for its place often (no watch tells it a place came free);
    // otherwise watches of the Pods drive progress and this bounds how late a timeout is seen.
    let queued_now = status.reason.as_deref() == Some(limits::REASON_QUEUED);
    ctx.set_waiting(&ns, &m.name_any(), queued_now);
    if queued_now {
        return Ok(Requeue::requeue(QUEUE_RESYNC));
    }
    Ok(Requeue::requeue(MIGRATION_RESYNC))
}

/// The moves under way in the cluster and the Migrations queued for a place (but `m`).
async fn moves_under_way(
    client: &Client,
    m: &Migration,
) -> Result<(Vec<limits::Busy>, Vec<(Migration, limits::Busy)>), Error> {
    let all = Api::<Migration>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let targets = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(LABEL_MIGRATING_POD))
        .await?
        .items;
    let busy = limits::busy(&all, &targets);
    let queued = all
        .into_iter()
        .filter(|x| limits::is_queued(x) && x.uid() != m.uid())
        .map(|x| {
            let b = limits::Busy {
                source: x.status.as_ref().and_then(|s| s.source_node.clone()),
                target: x.spec.target_node.clone(),
            };
            (x, b)
        })
        .collect();
    Ok((busy, queued))
}

/// How often a queued Migration looks for a free place.
pub const QUEUE_RESYNC: Duration = Duration::from_millis(500);
/// How often an unfinished Migration is looked at without any change (its timeout).
pub const MIGRATION_RESYNC: Duration = Duration::from_secs(2);
/// Back-off after a failed reconcile.
pub const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// How long a Migration that succeeded waits for the daemons' figures.
pub const REPORT_GRACE: Duration = Duration::from_secs(120);

fn error_policy<K: Resource<DynamicType = ()>>(
    _obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Requeue {
    tracing::warn!(%error, reason = error.metric_label(), "reconcile failed");
    let kind = K::kind(&()).to_lowercase();
    ctx.metrics
        .failures
        .get_or_create(&metrics::FailureLabels {
            kind,
            reason: error.metric_label().into(),
        })
        .inc();
    Requeue::requeue(ERROR_BACKOFF)
}

/// Runs both controllers until the future is dropped.
pub async fn run(
    client: Client,
    identity: &str,
    metrics: Arc<metrics::Metrics>,
    limits: limits::Limits,
) {
    let ctx = Arc::new(Context {
        metrics,
        limits,
        admission: tokio::sync::Mutex::new(()),
        waiting: Arc::default(),
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "podmig-controller".into(),
                instance: Some(identity.into()),
            },
        ),
    });
    let mpods = Controller::new(
        Api::<MigratingPod>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(LABEL_MIGRATING_POD),
    )
    .shutdown_on_signal()
    .run(reconcile_mpod, error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let migrations = Controller::new(
        Api::<Migration>::all(client.clone()),
        watcher::Config::default(),
    )
    // A Migration follows its Pods (the source it claimed, the target it created):
    // their changes wake it, not a polling loop.
    .watches(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(LABEL_MIGRATING_POD),
        |pod: Pod| {
            let ns = pod.namespace().unwrap_or_default();
            let a = pod.annotations();
            [
                podmig_api::ANNOTATION_MIGRATION_ID,
                podmig_api::ANNOTATION_CLAIMED_BY,
            ]
            .into_iter()
            .filter_map(|k| a.get(k).cloned())
            .map(|name| kube::runtime::reflector::ObjectRef::new(&name).within(&ns))
            .collect::<Vec<_>>()
        },
    )
    // A move that ended frees its place: the queued Migrations look at once.
    .watches(
        Api::<Migration>::all(client.clone()),
        watcher::Config::default(),
        {
            let waiting = ctx.waiting.clone();
            move |m: Migration| {
                let ended = m
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_terminal());
                let w = waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !ended {
                    return Vec::new();
                }
                w.iter()
                    .map(|(ns, name)| kube::runtime::reflector::ObjectRef::new(name).within(ns))
                    .collect::<Vec<_>>()
            }
        },
    )
    .shutdown_on_signal()
    .run(reconcile_migration, error_policy, ctx)
    .for_each(|_| futures::future::ready(()));
    tokio::join!(mpods, migrations);
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_field_that_went_is_removed_by_the_patch() {
        let old = serde_json::json!({"phase": "Pending", "reason": "Queued", "queuePosition": 2});
        let new = serde_json::json!({"phase": "Scheduling", "targetPod": "x-1"});
        assert_eq!(
            super::cleared(Some(&old), &new),
            serde_json::json!({"phase": "Scheduling", "targetPod": "x-1", "reason": null, "queuePosition": null})
        );
        assert_eq!(super::cleared(None, &new), new);
    }
}
