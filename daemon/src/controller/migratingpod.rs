//! The MigratingPod decision (thesis fig. 5.5 plus give-up and cleanup): a plain function
//! from the MigratingPod and the Pods it owns to the actions to take and the status to write.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::{Resource, ResourceExt};
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_MIGRATION_ID, ANNOTATION_SOURCE_NODE, LABEL_MIGRATING_POD,
    MIGRATE_FINALIZER, RUNTIME_HANDLER,
    contract::DaemonPhase,
    v1alpha1::{MigratingPod, MigratingPodState, MigratingPodStatus, MigrationRecord, Outcome},
};

/// Something the controller does to the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create this Pod (a name collision means it was already done).
    CreatePod(Box<Pod>),
    /// Remove the `podmig.dev/migrate` finalizer from a Pod.
    ReleaseFinalizer(String),
    /// Delete a Pod.
    DeletePod(String),
    /// Claim Pod `pod` for the Migration reconciled (an annotation written only if the Pod
    /// is still at `resource_version`).
    ClaimPod {
        /// The Pod.
        pod: String,
        /// The version the claim was decided on.
        resource_version: String,
    },
    /// Record in MigratingPod `migrating_pod`'s status that Pod index `index` is taken.
    RecordPodIndex {
        /// The MigratingPod.
        migrating_pod: String,
        /// The index.
        index: u32,
    },
    /// Record an Event on the object reconciled.
    Event {
        /// CamelCase reason.
        reason: &'static str,
        /// Message.
        message: String,
        /// Warning or Normal.
        warning: bool,
    },
}

/// What reconciling decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Actions, in order.
    pub actions: Vec<Action>,
    /// The status to write.
    pub status: MigratingPodStatus,
}

pub use super::pod::{LocalClaims, pod_index};
use super::pod::{
    annotation, has_finalizer, is_deleting as deleting, is_migrate_on_delete_target,
    moved_in as ready, node, phase, reported, reported_phase,
};

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(now),
        observed_generation: generation,
    }
}

/// What keeps a deleted Pod from moving to a node the scheduler picks: node-local volumes,
/// claims that attach to one node or Pod, its own user namespace. Such a Pod is replaced
/// when deleted.
fn unmovable_volumes(
    spec: Option<&k8s_openapi::api::core::v1::PodSpec>,
    annotations: &BTreeMap<String, String>,
    local: &LocalClaims,
) -> Vec<String> {
    let mut v = super::pod::node_local_volumes(spec, annotations, local);
    v.extend(super::pod::single_node_volumes(spec, local).0);
    v.extend(super::pod::unmovable_spec(spec).map(str::to_owned));
    v
}

/// Builds Pod `<mpod>-<index>` from the template; a migration target (with `from`) gets the
/// target annotations, runs no init containers (they ran on the source, thesis §4.3) and
/// stays on the source's node selector.
pub fn pod_from_template(
    mpod: &MigratingPod,
    index: u32,
    from: Option<&Pod>,
    local: &LocalClaims,
) -> Pod {
    let name = format!("{}-{index}", mpod.name_any());
    let template = &mpod.spec.template;
    let mut meta = template.metadata.clone().unwrap_or_default();
    // podmig's own annotations come from podmig alone: a template naming another Pod as
    // its source would get the controller to make a thief.
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| !podmig_api::is_podmig_owned(k));
    }
    meta.name = Some(name.clone());
    meta.namespace = mpod.namespace();
    meta.generate_name = None;
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL_MIGRATING_POD.into(), mpod.name_any());
    // A Pod tied to its node by its volumes is not moved when deleted: it is replaced,
    // as a Deployment's would be.
    let movable = unmovable_volumes(
        template.spec.as_ref(),
        meta.annotations.as_ref().unwrap_or(&BTreeMap::new()),
        local,
    )
    .is_empty();
    meta.finalizers = movable.then(|| vec![MIGRATE_FINALIZER.into()]);
    meta.owner_references = Some(vec![OwnerReference {
        api_version: MigratingPod::api_version(&()).into(),
        kind: MigratingPod::kind(&()).into(),
        name: mpod.name_any(),
        uid: mpod.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.runtime_class_name = Some(RUNTIME_HANDLER.into());
    if let Some(sel) = &mpod.spec.node_selector {
        spec.node_selector
            .get_or_insert_with(BTreeMap::new)
            .extend(sel.clone());
    }
    if let Some(source) = from {
        spec.init_containers = None;
        let a = meta.annotations.get_or_insert_with(BTreeMap::new);
        a.insert(
            ANNOTATION_MIGRATE_FROM.into(),
            source.uid().unwrap_or_default(),
        );
        a.insert(ANNOTATION_MIGRATION_ID.into(), name.clone());
        if let Some(n) = node(source) {
            a.insert(ANNOTATION_SOURCE_NODE.into(), n);
        }
    }
    Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    }
}

/// The move record of a target Pod as created (uid assigned): `None` for a Pod that is
/// no migration target. The source Pod's name is filled in by the caller.
pub fn move_target_of(created: &Pod) -> Option<podmig_api::v1alpha1::MoveTarget> {
    let a = created.annotations();
    let source_uid = a.get(ANNOTATION_MIGRATE_FROM).filter(|v| !v.is_empty())?;
    Some(podmig_api::v1alpha1::MoveTarget {
        migration_id: a.get(ANNOTATION_MIGRATION_ID).cloned().unwrap_or_default(),
        source_pod: String::new(),
        source_pod_uid: source_uid.clone(),
        source_node: a.get(ANNOTATION_SOURCE_NODE).cloned(),
        target_pod: created.name_any(),
        target_pod_uid: created.uid().unwrap_or_default(),
    })
}

/// How long a move's target may stay unschedulable before the move is given up.
pub const UNSCHEDULABLE_GRACE_SECONDS: i64 = 10;

/// The scheduler's message when `pod` has been unschedulable (`PodScheduled=False`,
/// reason `Unschedulable`) for more than `grace` seconds.
pub fn unschedulable(pod: &Pod, now: Timestamp, grace: i64) -> Option<String> {
    if node(pod).is_some() {
        return None;
    }
    let c = pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })?;
    let since = c.last_transition_time.as_ref().map(|t| t.0)?;
    ((now - since).get_seconds() > grace).then(|| c.message.clone().unwrap_or_default())
}

/// A migrate-on-delete starts another target only with at least this much of its time left.
pub const RETRY_MIN_SECONDS: i64 = 10;

/// Keeps `pod` off `nodes` (required node affinity on `metadata.name`, as the DaemonSet
/// controller pins Pods), on top of any affinity it has.
fn avoid_nodes(pod: &mut Pod, nodes: &[String]) {
    use k8s_openapi::api::core::v1::{
        Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    };
    if nodes.is_empty() {
        return;
    }
    let not_there = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "NotIn".into(),
        values: Some(nodes.to_vec()),
    };
    let spec = pod.spec.get_or_insert_default();
    let required = spec
        .affinity
        .get_or_insert_with(Affinity::default)
        .node_affinity
        .get_or_insert_with(NodeAffinity::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        });
    // Terms are ORed: the requirement joins every one of them.
    for term in &mut required.node_selector_terms {
        term.match_fields
            .get_or_insert_default()
            .push(not_there.clone());
    }
}

/// Decides what to do for `mpod` given the Pods it controls, at time `now`.
pub fn decide(mpod: &MigratingPod, pods: &[Pod], now: Timestamp) -> Decision {
    decide_with(mpod, pods, &LocalClaims::NONE, now)
}

/// [`decide`], knowing which of the Pods' claims are bound to node-local volumes: a Pod
/// with one is replaced when deleted, never moved (its data would stay behind).
pub fn decide_with(
    mpod: &MigratingPod,
    pods: &[Pod],
    local: &LocalClaims,
    now: Timestamp,
) -> Decision {
    let mut d = Deciding::new(mpod, pods, local, now);
    // Deleting the MigratingPod releases every finalizer it set, then its Pods go.
    if mpod.metadata.deletion_timestamp.is_some() {
        d.let_go_of_all(pods);
        return d.done();
    }
    if let Some((reason, message)) = invalid(mpod, pods) {
        d.set(MigratingPodState::Invalid, false, reason, &message);
        return d.done();
    }
    let pair = move_pair(pods);
    // A `Migration`'s move is that Migration's to finish or roll back: here it is only
    // reported.
    if let Some((target, Some(source))) = pair
        && !is_migrate_on_delete_target(target)
    {
        d.report_migrations_move(source, target);
        return d.done();
    }
    match (pods, pair) {
        ([], _) if adopting(mpod, now) => d.set(
            MigratingPodState::Creating,
            false,
            "Adopting",
            "waiting for the Pod it adopts to be handed over",
        ),
        ([], _) => d.create_fresh(),
        (_, Some((target, Some(_)))) if deleting(target) => {
            // A move being unwound: wait until its Pods are gone.
        }
        (_, Some((target, Some(source)))) => d.follow_move(source, target),
        (_, Some((target, None))) if !ready(target) && !deleting(target) => {
            d.source_vanished(target)
        }
        ([p], _)
            if deleting(p)
                && has_finalizer(p)
                && unmovable_volumes(p.spec.as_ref(), p.annotations(), local).is_empty() =>
        {
            d.migrate_on_delete(p)
        }
        ([p], _) if deleting(p) || matches!(phase(p), "Failed" | "Succeeded") => d.replace(p),
        ([p], _) | ([p, _], None) | ([_, p], None) if !deleting(p) || pods.len() == 1 => {
            d.report_pod(p)
        }
        _ => d.set(
            MigratingPodState::Invalid,
            false,
            "TooManyPods",
            "two unrelated Pods belong to this MigratingPod",
        ),
    }
    d.done()
}

/// How long a MigratingPod made to adopt a bare Pod waits for it before it makes its own.
pub const ADOPTION_GRACE_SECONDS: i64 = 30;

/// True while a MigratingPod made to adopt a Pod (the eviction webhook's) waits for it.
fn adopting(mpod: &MigratingPod, now: Timestamp) -> bool {
    mpod.annotations()
        .contains_key(podmig_api::ANNOTATION_ADOPTS)
        && mpod
            .metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|t| (now - t.0).get_seconds() < ADOPTION_GRACE_SECONDS)
}

/// Why the MigratingPod cannot be acted on: (reason, message).
fn invalid(mpod: &MigratingPod, pods: &[Pod]) -> Option<(&'static str, String)> {
    if mpod
        .spec
        .template
        .spec
        .as_ref()
        .is_none_or(|s| s.containers.is_empty())
    {
        return Some((
            "NoContainers",
            "spec.template.spec.containers must name at least one container".into(),
        ));
    }
    (pods.len() > 2).then(|| {
        (
            "TooManyPods",
            format!(
                "{} Pods belong to this MigratingPod; at most a source and a target may exist",
                pods.len()
            ),
        )
    })
}

/// A target and its source, if a move is under way. A Pod that was a target once and
/// whose source is gone is an ordinary Pod now (unless it never became ready).
fn move_pair(pods: &[Pod]) -> Option<(&Pod, Option<&Pod>)> {
    pods.iter()
        .find_map(|t| {
            let from = annotation(t, ANNOTATION_MIGRATE_FROM)?;
            let source = pods.iter().find(|s| s.uid().as_deref() == Some(from))?;
            Some((t, Some(source)))
        })
        .or_else(|| {
            pods.iter()
                .find(|t| annotation(t, ANNOTATION_MIGRATE_FROM).is_some() && !ready(t))
                .map(|t| (t, None))
        })
}

/// One reconcile of a MigratingPod being decided: what it observed, and the status and
/// actions decided so far. Each situation is one method.
struct Deciding<'a> {
    mpod: &'a MigratingPod,
    local: &'a LocalClaims,
    now: Timestamp,
    name: String,
    next_index: u32,
    timeout: i64,
    status: MigratingPodStatus,
    actions: Vec<Action>,
}

impl<'a> Deciding<'a> {
    fn new(mpod: &'a MigratingPod, pods: &[Pod], local: &'a LocalClaims, now: Timestamp) -> Self {
        let mut status = mpod.status.clone().unwrap_or_default();
        status.observed_generation = mpod.metadata.generation;
        let name = mpod.name_any();
        let next_index = super::pod::next_index(
            &name,
            pods,
            status.active_pod.as_deref(),
            status.last_pod_index,
        );
        Self {
            mpod,
            local,
            now,
            name,
            next_index,
            timeout: i64::from(mpod.spec.migration_timeout_seconds),
            status,
            actions: Vec::new(),
        }
    }

    /// Sets the state and its `Ready` condition.
    fn set(&mut self, state: MigratingPodState, ok: bool, reason: &str, message: &str) {
        self.status.state = Some(state);
        let c = condition(
            "Ready",
            ok,
            reason,
            message,
            self.now,
            self.mpod.metadata.generation,
        );
        match self
            .status
            .conditions
            .iter_mut()
            .find(|x| x.type_ == "Ready")
        {
            Some(old) if old.status == c.status && old.reason == c.reason => {
                old.message = c.message
            }
            Some(old) => *old = c,
            None => self.status.conditions.push(c),
        }
    }

    /// The decision, with the highest Pod index it creates recorded.
    fn done(mut self) -> Decision {
        let name = &self.name;
        if let Some(n) = self
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::CreatePod(p) => p.metadata.name.as_deref().and_then(|n| pod_index(name, n)),
                _ => None,
            })
            .max()
        {
            self.status.last_pod_index = Some(n);
        }
        Decision {
            actions: self.actions,
            status: self.status,
        }
    }

    /// The MigratingPod is deleted: its finalizers are released, its Pods deleted.
    fn let_go_of_all(&mut self, pods: &[Pod]) {
        for p in pods {
            if has_finalizer(p) {
                self.actions.push(Action::ReleaseFinalizer(p.name_any()));
            }
            if !deleting(p) {
                self.actions.push(Action::DeletePod(p.name_any()));
            }
        }
    }

    /// A `Migration` moves the Pod: reported as migrating, nothing done.
    fn report_migrations_move(&mut self, source: &Pod, target: &Pod) {
        if ready(target) {
            // Done: the Migration lets the source go; here the move is recorded.
            self.record_migrations_success(Some(source), target);
            return;
        }
        self.status.active_pod = Some(source.name_any());
        self.status.node = node(source);
        self.set(
            MigratingPodState::Migrating,
            false,
            "Migrating",
            &format!(
                "Migration {} moves {} to {}",
                annotation(target, ANNOTATION_MIGRATION_ID).unwrap_or_default(),
                source.name_any(),
                target.name_any()
            ),
        );
    }

    /// A fresh Pod from the template, under the next index, becomes the active one.
    fn create_next_pod(&mut self) {
        let pod = pod_from_template(self.mpod, self.next_index, None, self.local);
        self.actions.push(Action::CreatePod(Box::new(pod)));
        self.status.active_pod = Some(format!("{}-{}", self.name, self.next_index));
        self.status.failed_attempts.clear();
    }

    /// The failed moves of `source` so far (each one's target node is avoided next).
    fn failed_attempts_of(&self, source: &Pod) -> Vec<&MigrationRecord> {
        let name = source.name_any();
        self.status
            .failed_attempts
            .iter()
            .filter(|r| r.source_pod == name)
            .collect()
    }

    /// No Pod: the first one is created.
    fn create_fresh(&mut self) {
        self.create_next_pod();
        self.status.node = None;
        self.set(
            MigratingPodState::Creating,
            false,
            "Creating",
            "creating the Pod",
        );
    }

    /// A migrate-on-delete move under way: succeeded, failed or given up, or still going.
    fn follow_move(&mut self, source: &Pod, target: &Pod) {
        let started = super::pod::deletion_requested_at(source).or(target
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0));
        let elapsed = started.map_or(0, |s| (self.now - s).get_seconds());
        let failed =
            phase(target) == "Failed" || reported_phase(target) == Some(DaemonPhase::Failed);
        // No node can take the target (the last schedulable node is being drained, say):
        // waiting out the timeout would change nothing.
        let unplaceable = unschedulable(target, self.now, UNSCHEDULABLE_GRACE_SECONDS);
        let record = MigrationRecord {
            source_pod: source.name_any(),
            target_pod: target.name_any(),
            source_node: node(source),
            target_node: node(target),
            started_at: started.map(Time),
            report: reported(target),
            ..Default::default()
        };
        if ready(target) {
            self.move_succeeded(source, target, record);
        } else if failed || elapsed > self.timeout || unplaceable.is_some() {
            let (outcome, why) = self.why_it_ended(source, target, failed, unplaceable, &record);
            self.move_failed(source, target, record, outcome, why, failed);
        } else {
            let state = if node(target).is_some() {
                MigratingPodState::Migrating
            } else {
                MigratingPodState::MigrationPending
            };
            self.status.last_migration = Some(record);
            self.set(
                state,
                false,
                "Migrating",
                &format!("moving {} to {}", source.name_any(), target.name_any()),
            );
        }
    }

    /// The target runs: the source is let go of and deleted; recorded (and an Event) once.
    fn move_succeeded(&mut self, source: &Pod, target: &Pod, mut record: MigrationRecord) {
        // Recorded once: the source may take a while to go, reconciles repeat.
        let known = self.status.last_migration.as_ref().is_some_and(|r| {
            r.target_pod == target.name_any() && r.outcome == Some(Outcome::Succeeded)
        });
        if has_finalizer(source) {
            self.actions
                .push(Action::ReleaseFinalizer(source.name_any()));
        }
        if !deleting(source) {
            self.actions.push(Action::DeletePod(source.name_any()));
        }
        record.outcome = Some(Outcome::Succeeded);
        record.finished_at = Some(Time(self.now));
        let frozen = super::pod::figures(record.report.as_ref());
        if known {
            if let Some(old) = &self.status.last_migration {
                record.finished_at = old.finished_at.clone();
            }
        } else {
            self.actions.push(Action::Event {
                reason: "MigrationSucceeded",
                message: format!(
                    "{} moved to {} on {}{frozen}",
                    source.name_any(),
                    target.name_any(),
                    node(target).unwrap_or_default()
                ),
                warning: false,
            });
        }
        self.status.active_pod = Some(target.name_any());
        self.status.node = node(target);
        self.status.last_migration = Some(record);
        self.status.failed_attempts.clear();
        self.set(MigratingPodState::Running, true, "Running", "the Pod runs");
    }

    /// How a move that will not succeed ended, and why, for its record.
    fn why_it_ended(
        &self,
        source: &Pod,
        target: &Pod,
        failed: bool,
        unplaceable: Option<String>,
        record: &MigrationRecord,
    ) -> (Outcome, String) {
        if let Some(why) = unplaceable.filter(|_| !failed) {
            (
                Outcome::Failed,
                format!("target {} cannot be scheduled: {why}", target.name_any()),
            )
        } else if failed {
            (
                Outcome::Failed,
                format!(
                    "target {} failed: {}",
                    target.name_any(),
                    record
                        .report
                        .as_ref()
                        .and_then(|r| r.error.clone())
                        .unwrap_or_else(|| "restore failed".into())
                ),
            )
        } else {
            (
                Outcome::GivenUp,
                format!(
                    "the move of {} did not finish within {}s",
                    source.name_any(),
                    self.timeout
                ),
            )
        }
    }

    /// A failed target is followed by another on a node not tried yet while attempts and
    /// time remain: the source keeps running, its kill held by its finalizer. Only when no
    /// node can take it (unschedulable), the attempts are spent or the time is up is the
    /// source let go of — its state lost, said by an Event — and a fresh Pod replaces it.
    fn move_failed(
        &mut self,
        source: &Pod,
        target: &Pod,
        mut record: MigrationRecord,
        outcome: Outcome,
        why: String,
        failed: bool,
    ) {
        record.outcome = Some(outcome);
        record.finished_at = Some(Time(self.now));
        record.message = Some(why.clone());
        let tried = self.failed_attempts_of(source).len() as u32 + 1;
        let allowed = self.mpod.spec.move_attempts.max(1);
        let retry = failed && node(target).is_some() && tried < allowed && self.time_left(source);
        if has_finalizer(target) {
            self.actions
                .push(Action::ReleaseFinalizer(target.name_any()));
        }
        self.actions.push(Action::DeletePod(target.name_any()));
        self.status.last_migration = Some(record.clone());
        self.status.active_pod = Some(source.name_any());
        if retry {
            self.status.failed_attempts.push(record);
            let message = format!(
                "{why}; {} keeps running and moves again, avoiding {} (attempt {} of {allowed})",
                source.name_any(),
                self.failed_attempts_of(source)
                    .iter()
                    .filter_map(|r| r.target_node.as_deref())
                    .collect::<Vec<_>>()
                    .join(", "),
                tried + 1
            );
            self.actions.push(Action::Event {
                reason: "MigrationRetrying",
                message: message.clone(),
                warning: true,
            });
            self.set(
                MigratingPodState::MigrationPending,
                false,
                "MigrationRetrying",
                &message,
            );
            return;
        }
        if has_finalizer(source) {
            self.actions
                .push(Action::ReleaseFinalizer(source.name_any()));
        }
        self.actions.push(Action::Event {
            reason: if failed {
                "MigrationFailed"
            } else {
                "MigrationGivenUp"
            },
            message: why.clone(),
            warning: true,
        });
        if deleting(source) {
            let earlier: Vec<String> = self
                .failed_attempts_of(source)
                .iter()
                .map(|r| {
                    format!(
                        "{} on {}: {}",
                        r.target_pod,
                        r.target_node.as_deref().unwrap_or("no node"),
                        r.message.as_deref().unwrap_or("failed")
                    )
                })
                .chain(std::iter::once(why.clone()))
                .collect();
            self.actions.push(Action::Event {
                reason: "MigrationStateLost",
                message: format!(
                    "the in-memory state of {} is lost: {} move(s) did not succeed ({}); a fresh Pod replaces it",
                    source.name_any(),
                    earlier.len(),
                    earlier.join("; ")
                ),
                warning: true,
            });
        }
        self.status.failed_attempts.clear();
        self.set(MigratingPodState::Failed, false, "MigrationFailed", &why);
    }

    /// True while a migrate-on-delete of `source` may still start another target: some of
    /// its `migrationTimeoutSeconds`, counted from the deletion, is left.
    fn time_left(&self, source: &Pod) -> bool {
        super::pod::deletion_requested_at(source)
            .is_none_or(|s| (self.now - s).get_seconds() + RETRY_MIN_SECONDS < self.timeout)
    }

    /// The source vanished before its state was taken: the target can never restore.
    fn source_vanished(&mut self, target: &Pod) {
        let why = format!(
            "source of {} vanished before its checkpoint",
            target.name_any()
        );
        if has_finalizer(target) {
            self.actions
                .push(Action::ReleaseFinalizer(target.name_any()));
        }
        self.actions.push(Action::DeletePod(target.name_any()));
        self.actions.push(Action::Event {
            reason: "MigrationFailed",
            message: why.clone(),
            warning: true,
        });
        self.set(MigratingPodState::Failed, false, "SourceVanished", &why);
    }

    /// Migrate-on-delete: the deleted Pod is held by its finalizer until the target runs.
    fn migrate_on_delete(&mut self, p: &Pod) {
        let mpod = self.mpod;
        let mut target = pod_from_template(mpod, self.next_index, Some(p), self.local);
        let avoid: Vec<String> = self
            .failed_attempts_of(p)
            .iter()
            .filter_map(|r| r.target_node.clone())
            .collect();
        avoid_nodes(&mut target, &avoid);
        let start = super::pod::deletion_requested_at(p).unwrap_or(self.now);
        super::pod::annotate_move(
            target.metadata.annotations.get_or_insert_default(),
            super::pod::MoveAsked {
                start,
                timeout_seconds: mpod.spec.migration_timeout_seconds,
                strategy: mpod.spec.strategy,
                max_downtime_ms: mpod.spec.max_downtime_ms,
                keep_ip: mpod.spec.keep_ip,
            },
            p,
        );
        let attempt = if avoid.is_empty() {
            String::new()
        } else {
            format!(
                " (attempt {} of {}, not on {})",
                avoid.len() + 1,
                mpod.spec.move_attempts,
                avoid.join(", ")
            )
        };
        self.actions.push(Action::Event {
            reason: "MigrationStarted",
            message: format!(
                "{} is being deleted; moving it to {}{attempt}",
                p.name_any(),
                target.name_any()
            ),
            warning: false,
        });
        self.actions.push(Action::CreatePod(Box::new(target)));
        self.set(
            MigratingPodState::MigrationPending,
            false,
            "MigrationPending",
            &format!("{} is being deleted; its move is starting", p.name_any()),
        );
    }

    /// Going away without a move: replaced, like a ReplicaSet does. A deleted Pod still
    /// held by the migrate finalizer is one bound to node-local volumes since it was made:
    /// it is let go of.
    fn replace(&mut self, p: &Pod) {
        let tied = deleting(p) && has_finalizer(p);
        if !deleting(p) {
            self.actions.push(Action::DeletePod(p.name_any()));
        }
        if tied {
            self.actions.push(Action::ReleaseFinalizer(p.name_any()));
        }
        self.create_next_pod();
        let (reason, message) = if tied {
            (
                "NotMigratable",
                format!(
                    "{} cannot move and is replaced, not moved: {}",
                    p.name_any(),
                    unmovable_volumes(p.spec.as_ref(), p.annotations(), self.local).join(", ")
                ),
            )
        } else {
            (
                "Replacing",
                format!("{} is gone; creating a fresh Pod", p.name_any()),
            )
        };
        self.set(MigratingPodState::Creating, false, reason, &message);
    }

    /// One Pod, no move: it runs or is starting.
    /// A Migration's target that runs: the MigratingPod's record of its last move says
    /// so (once; the Migration records its own Event and deletes the source).
    fn record_migrations_success(&mut self, source: Option<&Pod>, target: &Pod) {
        let known = self
            .status
            .last_migration
            .as_ref()
            .is_some_and(|r| r.target_pod == target.name_any());
        if !known {
            self.status.last_migration = Some(MigrationRecord {
                source_pod: source.map(|s| s.name_any()).unwrap_or_default(),
                target_pod: target.name_any(),
                source_node: annotation(target, ANNOTATION_SOURCE_NODE).map(str::to_owned),
                target_node: node(target),
                started_at: target.metadata.creation_timestamp.clone(),
                finished_at: Some(Time(self.now)),
                outcome: Some(Outcome::Succeeded),
                report: reported(target),
                message: annotation(target, ANNOTATION_MIGRATION_ID)
                    .map(|m| format!("moved by Migration {m}")),
            });
        }
        self.status.active_pod = Some(target.name_any());
        self.status.node = node(target);
        self.set(MigratingPodState::Running, true, "Running", "the Pod runs");
    }

    fn report_pod(&mut self, p: &Pod) {
        if annotation(p, ANNOTATION_MIGRATE_FROM).is_some()
            && !is_migrate_on_delete_target(p)
            && ready(p)
        {
            self.record_migrations_success(None, p);
            return;
        }
        self.status.active_pod = Some(p.name_any());
        self.status.node = node(p);
        if ready(p) {
            self.set(MigratingPodState::Running, true, "Running", "the Pod runs");
        } else {
            self.set(
                MigratingPodState::Creating,
                false,
                "Creating",
                "the Pod is starting",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-11-22T01:00:00Z".parse().expect("time")
    }

    fn mpod(containers: bool) -> MigratingPod {
        let c = if containers {
            json!([{"name": "app", "image": "img"}])
        } else {
            json!([])
        };
        serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod",
            "metadata": {"name": "x", "namespace": "ns", "uid": "mp-uid", "generation": 2},
            "spec": {"template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": c, "initContainers": [{"name": "init", "image": "img"}]}}}}))
        .expect("mpod")
    }

    /// A builder for the Pods the decision sees.
    struct TestPod(serde_json::Value);

    impl TestPod {
        fn new(name: &str) -> Self {
            Self(
                json!({"metadata": {"name": name, "uid": format!("uid-{name}"), "finalizers": [MIGRATE_FINALIZER],
                "creationTimestamp": "2026-11-22T00:59:00Z"}, "spec": {"containers": [{"name": "app"}]}, "status": {"phase": "Pending"}}),
            )
        }
        fn running(mut self) -> Self {
            self.0["status"] =
                json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
            self
        }
        fn on_node(mut self, n: &str) -> Self {
            self.0["spec"]["nodeName"] = json!(n);
            self
        }
        fn deleted_at(mut self, t: &str) -> Self {
            self.0["metadata"]["deletionTimestamp"] = json!(t);
            self
        }
        fn without_finalizer(mut self) -> Self {
            self.0["metadata"]["finalizers"] = json!([]);
            self
        }
        fn target_of(mut self, source: &str) -> Self {
            self.0["metadata"]["annotations"] =
                json!({ANNOTATION_MIGRATE_FROM: format!("uid-{source}")});
            self
        }
        fn annotated(mut self, k: &str, v: &str) -> Self {
            self.0["metadata"]["annotations"][k] = json!(v);
            self
        }
        fn failed(mut self) -> Self {
            self.0["status"]["phase"] = json!("Failed");
            self
        }
        fn build(self) -> Pod {
            serde_json::from_value(self.0).expect("pod")
        }
    }

    fn created(d: &Decision) -> Vec<Pod> {
        d.actions
            .iter()
            .filter_map(|a| match a {
                Action::CreatePod(p) => Some((**p).clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_template_cannot_name_a_source_only_podmig_sets_its_annotations() {
        let m: MigratingPod = serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1",
            "kind": "MigratingPod", "metadata": {"name": "thief", "namespace": "evil", "uid": "mp"},
            "spec": {"template": {"metadata": {"annotations": {
                ANNOTATION_MIGRATE_FROM: "victim-uid", ANNOTATION_SOURCE_NODE: "node-0",
                ANNOTATION_MIGRATION_ID: "steal-1", "podmig.dev/migration-phase": "Restored",
                podmig_api::ANNOTATION_VOLUMES_ON_EVERY_NODE: "data", "team": "red"}},
                "spec": {"containers": [{"name": "app"}]}}}}))
        .expect("mpod");
        let fresh = pod_from_template(&m, 0, None, &LocalClaims::NONE);
        let a = fresh.annotations();
        assert!(!a.contains_key(ANNOTATION_MIGRATE_FROM), "{a:?}");
        assert!(!a.contains_key(ANNOTATION_SOURCE_NODE), "{a:?}");
        assert!(!a.contains_key(ANNOTATION_MIGRATION_ID), "{a:?}");
        assert!(!a.contains_key("podmig.dev/migration-phase"), "{a:?}");
        assert_eq!(
            a.get(podmig_api::ANNOTATION_VOLUMES_ON_EVERY_NODE)
                .map(String::as_str),
            Some("data"),
            "a user's option stays"
        );
        assert_eq!(a.get("team").map(String::as_str), Some("red"));
        // A real target names its real source, whatever the template said.
        let source = TestPod::new("thief-0").on_node("node-1").build();
        let target = pod_from_template(&m, 1, Some(&source), &LocalClaims::NONE);
        assert_eq!(
            target
                .annotations()
                .get(ANNOTATION_MIGRATE_FROM)
                .map(String::as_str),
            Some("uid-thief-0")
        );
        assert_eq!(
            target
                .annotations()
                .get(ANNOTATION_MIGRATION_ID)
                .map(String::as_str),
            Some("thief-1")
        );
    }

    #[test]
    fn a_deleted_pod_whose_claim_turned_out_local_is_replaced_not_moved() {
        let m: MigratingPod = serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1",
            "kind": "MigratingPod", "metadata": {"name": "x", "namespace": "ns", "uid": "mp"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}],
                "volumes": [{"name": "db", "persistentVolumeClaim": {"claimName": "pgdata"}}]}}}}))
        .expect("mpod");
        let mut src = pod_from_template(&m, 0, None, &LocalClaims::NONE);
        assert!(
            has_finalizer(&src),
            "unbound at creation: movable as far as known"
        );
        src.metadata.deletion_timestamp = Some(Time(now()));
        src.spec.as_mut().expect("spec").node_name = Some("n1".into());
        let local = LocalClaims {
            node_local: [("pgdata".to_owned(), "local PersistentVolume pv".to_owned())].into(),
            ..Default::default()
        };
        let d = decide_with(&m, std::slice::from_ref(&src), &local, now());
        assert!(
            d.actions.contains(&Action::ReleaseFinalizer("x-0".into())),
            "{:?}",
            d.actions
        );
        let created: Vec<&Pod> = d
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::CreatePod(p) => Some(p.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(created.len(), 1);
        assert!(!has_finalizer(created[0]) && created[0].annotations().is_empty());
        let ready = d
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .expect("ready");
        assert_eq!(ready.reason, "NotMigratable");
        assert!(ready.message.contains("claim pgdata"), "{}", ready.message);
    }

    #[test]
    fn a_pod_tied_to_its_node_gets_no_migrate_finalizer() {
        let mpod = |annotations: serde_json::Value| -> MigratingPod {
            serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod",
                "metadata": {"name": "x", "namespace": "ns", "uid": "mp"},
                "spec": {"template": {"metadata": {"annotations": annotations}, "spec": {"containers": [{"name": "app"}],
                    "volumes": [{"name": "data", "hostPath": {"path": "/srv"}}]}}}}))
            .expect("mpod")
        };
        let none = LocalClaims::NONE;
        let tied = pod_from_template(&mpod(json!({})), 0, None, &none);
        assert_eq!(tied.metadata.finalizers, None);
        let everywhere = pod_from_template(
            &mpod(json!({podmig_api::ANNOTATION_VOLUMES_ON_EVERY_NODE: "data"})),
            0,
            None,
            &none,
        );
        assert_eq!(
            everywhere.metadata.finalizers,
            Some(vec![MIGRATE_FINALIZER.to_owned()])
        );
    }

    #[test]
    fn a_pod_in_its_own_user_namespace_gets_no_migrate_finalizer() {
        let mpod = |host_users: bool| -> MigratingPod {
            serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod",
                "metadata": {"name": "x", "namespace": "ns", "uid": "mp"},
                "spec": {"template": {"spec": {"hostUsers": host_users, "containers": [{"name": "app"}]}}}}))
            .expect("mpod")
        };
        let none = LocalClaims::NONE;
        let own_userns = pod_from_template(&mpod(false), 0, None, &none);
        assert_eq!(own_userns.metadata.finalizers, None);
        let host_userns = pod_from_template(&mpod(true), 0, None, &none);
        assert_eq!(
            host_userns.metadata.finalizers,
            Some(vec![MIGRATE_FINALIZER.to_owned()])
        );
    }

    #[test]
    fn first_pod_is_created_with_owner_finalizer_and_runtime_class() {
        let d = decide(&mpod(true), &[], now());
        let pods = created(&d);
        assert_eq!(pods.len(), 1);
        let p = &pods[0];
        assert_eq!(p.metadata.name.as_deref(), Some("x-0"));
        assert_eq!(
            p.metadata.finalizers,
            Some(vec![MIGRATE_FINALIZER.to_owned()])
        );
        let owner = &p.metadata.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            ("mp-uid", Some(true))
        );
        assert_eq!(
            p.spec
                .as_ref()
                .and_then(|s| s.runtime_class_name.as_deref()),
            Some("podmig")
        );
        assert!(
            p.spec.as_ref().is_some_and(|s| s.init_containers.is_some()),
            "a fresh Pod runs its init containers"
        );
        assert_eq!(d.status.state, Some(MigratingPodState::Creating));
        assert_eq!(d.status.observed_generation, Some(2));
    }

    #[test]
    fn running_pod_makes_state_running() {
        let d = decide(
            &mpod(true),
            &[TestPod::new("x-0").running().on_node("n1").build()],
            now(),
        );
        assert!(d.actions.is_empty());
        assert_eq!(d.status.state, Some(MigratingPodState::Running));
        assert_eq!(
            (d.status.active_pod.as_deref(), d.status.node.as_deref()),
            (Some("x-0"), Some("n1"))
        );
        assert_eq!(d.status.conditions[0].status, "True");
    }

    #[test]
    fn deleting_the_active_pod_creates_the_target_once() {
        let src = TestPod::new("x-0")
            .running()
            .on_node("n1")
            .deleted_at("2026-11-22T00:59:50Z")
            .build();
        let d = decide(&mpod(true), std::slice::from_ref(&src), now());
        let pods = created(&d);
        assert_eq!(pods.len(), 1);
        let t = &pods[0];
        assert_eq!(t.metadata.name.as_deref(), Some("x-1"));
        let a = t.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(
            a.get(ANNOTATION_MIGRATE_FROM).map(String::as_str),
            Some("uid-x-0")
        );
        assert_eq!(
            a.get(ANNOTATION_SOURCE_NODE).map(String::as_str),
            Some("n1")
        );
        assert_eq!(
            a.get(ANNOTATION_MIGRATION_ID).map(String::as_str),
            Some("x-1")
        );
        assert!(
            t.spec.as_ref().is_some_and(|s| s.init_containers.is_none()),
            "init containers are stripped"
        );
        assert_eq!(d.status.state, Some(MigratingPodState::MigrationPending));
        // Once the target exists, nothing is created again.
        let tgt = TestPod::new("x-1").target_of("x-0").on_node("n2").build();
        let d = decide(&mpod(true), &[src, tgt], now());
        assert!(created(&d).is_empty());
        assert_eq!(d.status.state, Some(MigratingPodState::Migrating));
    }

    #[test]
    fn running_target_releases_the_source() {
        let src = TestPod::new("x-0")
            .on_node("n1")
            .deleted_at("2026-11-22T00:59:50Z")
            .build();
        let tgt = TestPod::new("x-1")
            .target_of("x-0")
            .running()
            .on_node("n2")
            .annotated(
                podmig_api::ANNOTATION_MIGRATION_REPORT,
                r#"{"frozenMs": 321}"#,
            )
            .build();
        let d = decide(&mpod(true), &[src, tgt], now());
        assert_eq!(d.actions[0], Action::ReleaseFinalizer("x-0".into()));
        assert_eq!(d.status.state, Some(MigratingPodState::Running));
        assert_eq!(d.status.active_pod.as_deref(), Some("x-1"));
        let rec = d.status.last_migration.expect("record");
        assert_eq!(rec.outcome, Some(Outcome::Succeeded));
        assert_eq!(rec.report.map(|r| r.frozen_ms), Some(321));
    }

    #[test]
    fn success_is_recorded_and_counted_once_while_the_source_goes() {
        let src = TestPod::new("x-0")
            .on_node("n1")
            .deleted_at("2026-11-22T00:59:50Z")
            .without_finalizer()
            .build();
        let tgt = TestPod::new("x-1")
            .target_of("x-0")
            .running()
            .on_node("n2")
            .build();
        let first = decide(&mpod(true), &[src.clone(), tgt.clone()], now());
        let events = |d: &Decision| {
            d.actions
                .iter()
                .filter(|a| matches!(a, Action::Event { .. }))
                .count()
        };
        assert_eq!(events(&first), 1);
        let mut m = mpod(true);
        m.status = Some(first.status);
        let again = decide(&m, &[src, tgt], now());
        assert_eq!(events(&again), 0, "{:?}", again.actions);
    }

    #[test]
    fn a_former_target_moves_again_on_delete() {
        let old_target = TestPod::new("x-1")
            .target_of("x-0")
            .annotated(ANNOTATION_MIGRATION_ID, "move-1")
            .running()
            .on_node("n2")
            .deleted_at("2026-11-22T00:59:50Z")
            .build();
        let d = decide(&mpod(true), std::slice::from_ref(&old_target), now());
        assert_eq!(created(&d).len(), 1, "{:?}", d.actions);
        let next = TestPod::new("x-2").target_of("x-1").on_node("n1").build();
        let d = decide(&mpod(true), &[old_target, next], now());
        assert_eq!(
            d.status.state,
            Some(MigratingPodState::Migrating),
            "{:?}",
            d.status
        );
    }

    #[test]
    fn a_migrations_move_is_left_to_the_migration() {
        let src = TestPod::new("x-0").running().on_node("n1").build();
        let failed = TestPod::new("x-1")
            .target_of("x-0")
            .annotated(ANNOTATION_MIGRATION_ID, "move-1")
            .annotated(podmig_api::ANNOTATION_MIGRATION_PHASE, "Failed")
            .build();
        let d = decide(&mpod(true), &[src, failed], now());
        assert!(d.actions.is_empty(), "{:?}", d.actions);
        assert_eq!(d.status.state, Some(MigratingPodState::Migrating));
        assert_eq!(d.status.active_pod.as_deref(), Some("x-0"));
    }

    #[test]
    fn a_migrations_finished_move_is_recorded_without_acting() {
        let src = TestPod::new("x-0").running().on_node("n1").build();
        let moved = TestPod::new("x-1")
            .target_of("x-0")
            .annotated(ANNOTATION_MIGRATION_ID, "move-1")
            .running()
            .on_node("n2")
            .build();
        for pods in [vec![src, moved.clone()], vec![moved]] {
            let d = decide(&mpod(true), &pods, now());
            assert!(d.actions.is_empty(), "the Migration acts: {:?}", d.actions);
            let r = d.status.last_migration.expect("recorded");
            assert_eq!(
                (r.target_pod.as_str(), r.outcome),
                ("x-1", Some(Outcome::Succeeded))
            );
            assert_eq!(r.message.as_deref(), Some("moved by Migration move-1"));
            assert_eq!(d.status.active_pod.as_deref(), Some("x-1"));
            assert_eq!(d.status.state, Some(MigratingPodState::Running));
        }
    }

    #[test]
    fn a_target_no_node_can_take_fails_the_move_after_a_short_grace() {
        let src = || {
            TestPod::new("x-0")
                .on_node("n1")
                .deleted_at("2026-11-22T00:59:50Z")
                .build()
        };
        let unschedulable = |since: &str| {
            let mut p = TestPod::new("x-1").target_of("x-0");
            p.0["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": "0/2 nodes are available: 2 node(s) were unschedulable.",
                "lastTransitionTime": since}]});
            p.build()
        };
        let d = decide(
            &mpod(true),
            &[src(), unschedulable("2026-11-22T00:59:55Z")],
            now(),
        );
        assert!(
            !d.actions.contains(&Action::DeletePod("x-1".into())),
            "{:?}",
            d.actions
        );
        let d = decide(
            &mpod(true),
            &[src(), unschedulable("2026-11-22T00:59:45Z")],
            now(),
        );
        assert!(d.actions.contains(&Action::ReleaseFinalizer("x-0".into())));
        assert!(d.actions.contains(&Action::DeletePod("x-1".into())));
        let msg = d
            .status
            .last_migration
            .and_then(|r| r.message)
            .unwrap_or_default();
        assert!(
            msg.contains("cannot be scheduled: 0/2 nodes are available"),
            "{msg}"
        );
    }

    #[test]
    fn target_failure_or_timeout_lets_the_source_go_with_an_event() {
        let src = || {
            TestPod::new("x-0")
                .on_node("n1")
                .deleted_at("2026-11-22T00:59:50Z")
                .build()
        };
        let failed = TestPod::new("x-1").target_of("x-0").failed().build();
        let d = decide(&mpod(true), &[src(), failed], now());
        assert!(d.actions.contains(&Action::ReleaseFinalizer("x-0".into())));
        assert!(d.actions.contains(&Action::DeletePod("x-1".into())));
        assert!(d.actions.iter().any(|a| matches!(
            a,
            Action::Event {
                reason: "MigrationFailed",
                warning: true,
                ..
            }
        )));
        assert_eq!(d.status.state, Some(MigratingPodState::Failed));

        let slow_src = TestPod::new("x-0")
            .deleted_at("2026-11-22T00:50:00Z")
            .build();
        let pending = TestPod::new("x-1").target_of("x-0").build();
        let d = decide(&mpod(true), &[slow_src, pending], now());
        assert!(d.actions.iter().any(|a| matches!(
            a,
            Action::Event {
                reason: "MigrationGivenUp",
                ..
            }
        )));
        assert_eq!(
            d.status.last_migration.and_then(|r| r.outcome),
            Some(Outcome::GivenUp)
        );
        // The source is gone after that: a fresh Pod with the next index replaces it.
        let mut mp = mpod(true);
        mp.status = Some(MigratingPodStatus {
            active_pod: Some("x-0".into()),
            ..Default::default()
        });
        let d = decide(&mp, &[], now());
        assert_eq!(created(&d)[0].metadata.name.as_deref(), Some("x-1"));
        assert_eq!(d.status.last_pod_index, Some(1));
        // Names are never reused: after a target x-1 was given up, the fresh Pod is x-2.
        mp.status = Some(MigratingPodStatus {
            active_pod: Some("x-0".into()),
            last_pod_index: Some(1),
            ..Default::default()
        });
        assert_eq!(
            created(&decide(&mp, &[], now()))[0]
                .metadata
                .name
                .as_deref(),
            Some("x-2")
        );
    }

    #[test]
    fn a_failed_migrate_on_delete_keeps_the_source_and_tries_other_nodes_until_spent() {
        let src = || {
            TestPod::new("x-0")
                .on_node("n1")
                .deleted_at("2026-11-22T00:59:50Z")
                .build()
        };
        let events = |d: &Decision| -> Vec<&'static str> {
            d.actions
                .iter()
                .filter_map(|a| match a {
                    Action::Event { reason, .. } => Some(*reason),
                    _ => None,
                })
                .collect()
        };
        let mut mp = mpod(true);
        for (attempt, node) in [(1u32, "n2"), (2, "n3")] {
            let target = format!("x-{attempt}");
            let failed = TestPod::new(&target)
                .target_of("x-0")
                .on_node(node)
                .failed()
                .build();
            let d = decide(&mp, &[src(), failed], now());
            assert!(
                !d.actions.contains(&Action::ReleaseFinalizer("x-0".into())),
                "the source's kill stays held: {:?}",
                d.actions
            );
            assert!(d.actions.contains(&Action::DeletePod(target.clone())));
            assert_eq!(events(&d), ["MigrationRetrying"]);
            assert_eq!(d.status.state, Some(MigratingPodState::MigrationPending));
            assert_eq!(d.status.failed_attempts.len(), attempt as usize);
            assert_eq!(
                d.status
                    .failed_attempts
                    .last()
                    .and_then(|r| r.target_node.as_deref()),
                Some(node)
            );
            let mut status = d.status;
            status.last_pod_index = Some(attempt);
            mp.status = Some(status);
            // Its target gone, the source alone: the next target avoids every node tried.
            let d = decide(&mp, &[src()], now());
            let next = &created(&d)[0];
            assert_eq!(
                next.metadata.name.as_deref(),
                Some(format!("x-{}", attempt + 1).as_str())
            );
            let avoided = next
                .spec
                .as_ref()
                .and_then(|s| s.affinity.as_ref())
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|r| {
                    r.node_selector_terms[0]
                        .match_fields
                        .clone()
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            assert_eq!(avoided.len(), 1);
            assert_eq!(avoided[0].key, "metadata.name");
            assert_eq!(avoided[0].operator, "NotIn");
            assert_eq!(
                avoided[0].values.as_deref().map(<[String]>::len),
                Some(attempt as usize)
            );
            mp.status = Some(d.status);
        }
        // The third failure spends the attempts: the source goes, the state is said lost.
        let failed = TestPod::new("x-3")
            .target_of("x-0")
            .on_node("n4")
            .failed()
            .build();
        let d = decide(&mp, &[src(), failed], now());
        assert!(d.actions.contains(&Action::ReleaseFinalizer("x-0".into())));
        assert_eq!(events(&d), ["MigrationFailed", "MigrationStateLost"]);
        let lost = d
            .actions
            .iter()
            .find_map(|a| match a {
                Action::Event {
                    reason: "MigrationStateLost",
                    message,
                    ..
                } => Some(message.clone()),
                _ => None,
            })
            .unwrap_or_default();
        assert!(
            lost.contains("3 move(s)") && lost.contains("x-1 on n2") && lost.contains("x-2 on n3"),
            "{lost}"
        );
        assert!(d.status.failed_attempts.is_empty());
        assert_eq!(d.status.state, Some(MigratingPodState::Failed));

        // Out of time (less than RETRY_MIN_SECONDS of the timeout left): no second target.
        mp.status = None;
        let late_src = TestPod::new("x-0")
            .on_node("n1")
            .deleted_at("2026-11-22T00:55:05Z")
            .build();
        let failed = TestPod::new("x-1")
            .target_of("x-0")
            .on_node("n2")
            .failed()
            .build();
        let d = decide(&mp, &[late_src, failed], now());
        assert!(d.actions.contains(&Action::ReleaseFinalizer("x-0".into())));
        assert_eq!(events(&d), ["MigrationFailed", "MigrationStateLost"]);
    }

    #[test]
    fn vanished_source_fails_the_target() {
        let orphan = TestPod::new("x-1").target_of("x-0").build();
        let d = decide(&mpod(true), &[orphan], now());
        assert!(d.actions.contains(&Action::DeletePod("x-1".into())));
        assert_eq!(d.status.conditions[0].reason, "SourceVanished");
    }

    #[test]
    fn invalid_objects_get_a_clear_condition() {
        let d = decide(&mpod(false), &[], now());
        assert!(d.actions.is_empty());
        assert_eq!(d.status.state, Some(MigratingPodState::Invalid));
        assert_eq!(d.status.conditions[0].reason, "NoContainers");
        let three: Vec<Pod> = (0..3)
            .map(|i| TestPod::new(&format!("x-{i}")).build())
            .collect();
        let d = decide(&mpod(true), &three, now());
        assert_eq!(d.status.state, Some(MigratingPodState::Invalid));
        assert_eq!(d.status.conditions[0].reason, "TooManyPods");
    }

    #[test]
    fn deleted_pod_without_finalizer_is_replaced_and_deleted_mpod_releases_everything() {
        let gone = TestPod::new("x-3")
            .without_finalizer()
            .deleted_at("2026-11-22T00:59:59Z")
            .build();
        let d = decide(&mpod(true), &[gone], now());
        assert_eq!(created(&d)[0].metadata.name.as_deref(), Some("x-4"));
        let mut mp = mpod(true);
        mp.metadata.deletion_timestamp = Some(Time(now()));
        let d = decide(
            &mp,
            &[
                TestPod::new("x-0").running().build(),
                TestPod::new("x-1").target_of("x-0").build(),
            ],
            now(),
        );
        assert_eq!(
            d.actions,
            vec![
                Action::ReleaseFinalizer("x-0".into()),
                Action::DeletePod("x-0".into()),
                Action::ReleaseFinalizer("x-1".into()),
                Action::DeletePod("x-1".into()),
            ]
        );
    }
}
