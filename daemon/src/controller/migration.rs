//! The Migration decision: validate the request, create the target Pod next to the still
//! running source, follow the phases the node daemons report on it, and fail (rolling
//! back: the target goes, the source stays) on error or timeout.

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::ResourceExt;
use podmig_api::{
    ANNOTATION_CLAIMED_BY, ANNOTATION_MIGRATION_ID,
    contract::DaemonPhase,
    v1alpha1::{MigratingPod, Migration, MigrationPhase, MigrationStatus, PhaseTransition},
};

use super::{
    limits::{Admission, Busy, Limits, REASON_QUEUED},
    migratingpod::{Action, pod_from_template},
    pod::{has_finalizer, is_deleting, is_ready, next_index, reported, reported_phase},
};

/// What the Migration controller sees.
pub struct Observed<'a> {
    /// The Migration.
    pub migration: &'a Migration,
    /// The Pod to move, if it exists.
    pub pod: Option<&'a Pod>,
    /// The MigratingPod controlling it, if any.
    pub owner: Option<&'a MigratingPod>,
    /// All Pods of that MigratingPod (for the next index).
    pub siblings: &'a [Pod],
    /// The target Pod, once created.
    pub target: Option<&'a Pod>,
    /// Nodes.
    pub nodes: &'a [Node],
    /// Other Migrations in the namespace.
    pub others: &'a [Migration],
    /// The Pod's claims bound to node-local PersistentVolumes.
    pub local_claims: &'a super::pod::LocalClaims,
    /// The controller's limits on moves at once, and the default timeout per GiB.
    pub limits: &'a Limits,
    /// The moves under way in the whole cluster.
    pub busy: &'a [Busy],
    /// The Migrations of the whole cluster waiting for a place, with what they would load.
    pub queued: &'a [(Migration, Busy)],
}

fn fail(status: &mut MigrationStatus, reason: &str, message: String, now: Timestamp) {
    set_phase(status, MigrationPhase::Failed, now);
    status.reason = Some(reason.into());
    status.message = Some(message.clone());
    status.conditions = vec![Condition {
        type_: "Succeeded".into(),
        status: "False".into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(now),
        observed_generation: None,
    }];
}

fn set_phase(status: &mut MigrationStatus, phase: MigrationPhase, now: Timestamp) {
    if status.phase != Some(phase) {
        status.phase = Some(phase);
        status.transitions.push(PhaseTransition {
            phase,
            at: Time(now),
        });
    }
}

fn schedulable(n: &Node) -> bool {
    n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true)
}

/// Decides the next step of a Migration.
pub fn decide(o: &Observed<'_>, now: Timestamp) -> (Vec<Action>, MigrationStatus) {
    let was = o.migration.status.as_ref().and_then(|s| s.phase);
    let (mut actions, status) = decide_step(o, now);
    // Every failure is told once, also the refusals of a bad request.
    if status.phase == Some(MigrationPhase::Failed)
        && was != Some(MigrationPhase::Failed)
        && !actions.iter().any(|a| matches!(a, Action::Event { .. }))
    {
        actions.push(Action::Event {
            reason: "MigrationFailed",
            message: status.message.clone().unwrap_or_default(),
            warning: true,
        });
    }
    (actions, status)
}

/// The target Pod of Migration `m` for source `pod` of `owner`, named with `index`.
fn build_target(
    m: &Migration,
    owner: &MigratingPod,
    pod: &Pod,
    index: u32,
    local: &super::pod::LocalClaims,
    limits: &Limits,
    now: Timestamp,
) -> Pod {
    let mut target = pod_from_template(owner, index, Some(pod), local);
    let start = started_at(m).unwrap_or(now);
    let annotations = target.metadata.annotations.get_or_insert_default();
    annotations.insert(ANNOTATION_MIGRATION_ID.into(), m.name_any());
    super::pod::annotate_move(
        annotations,
        super::pod::MoveAsked {
            start,
            timeout_seconds: super::limits::timeout_seconds(m, Some(pod), limits),
            strategy: m.spec.strategy,
            max_downtime_ms: m.spec.max_downtime_ms,
            keep_ip: m.spec.keep_ip.or(owner.spec.keep_ip),
        },
        pod,
    );
    let spec = target.spec.get_or_insert_default();
    if let Some(t) = &m.spec.target_node {
        spec.node_name = Some(t.clone());
    }
    if let Some(sel) = &m.spec.node_selector {
        spec.node_selector
            .get_or_insert_default()
            .extend(sel.clone());
    }
    target
}

/// When the move itself started (its target was decided): the timeout counts from there,
/// not from the time spent queued.
fn started_at(m: &Migration) -> Option<Timestamp> {
    m.status.as_ref().and_then(|s| {
        s.transitions
            .iter()
            .find(|t| t.phase == MigrationPhase::Scheduling)
            .map(|t| t.at.0)
    })
}

/// How long a Migration waits for its Pod to appear (applied together with its workload).
pub const POD_APPEAR_GRACE_SECONDS: i64 = 30;

/// What a check of a pending Migration found: wait (with what for), or fail (reason,
/// message).
enum Hold {
    Wait(String),
    Queued(u32, String),
    Fail(&'static str, String),
}

/// Who asked to cancel the Migration, if anybody did.
fn cancelled_by(m: &Migration) -> Option<&str> {
    m.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(podmig_api::ANNOTATION_CANCEL))
        .map(String::as_str)
}

fn decide_step(o: &Observed<'_>, now: Timestamp) -> (Vec<Action>, MigrationStatus) {
    let mut status = o.migration.status.clone().unwrap_or_default();
    let mut actions = Vec::new();
    match status.phase {
        Some(p) if p.is_terminal() => keep_late_figures(o, &mut status),
        None | Some(MigrationPhase::Pending) if cancelled_by(o.migration).is_some() => {
            status.queue_position = None;
            fail(
                &mut status,
                "Cancelled",
                format!(
                    "cancelled by {} before it started",
                    cancelled_by(o.migration).unwrap_or_default()
                ),
                now,
            );
        }
        None | Some(MigrationPhase::Pending) => {
            set_phase(&mut status, MigrationPhase::Pending, now);
            status.queue_position = None;
            if status.reason.as_deref() == Some(REASON_QUEUED) {
                status.reason = None;
            }
            match start(o, now, &mut status) {
                Ok(started) => actions = started,
                Err(Hold::Wait(message)) => status.message = Some(message),
                Err(Hold::Queued(position, message)) => {
                    status.reason = Some(REASON_QUEUED.into());
                    status.queue_position = Some(position);
                    status.message = Some(message);
                }
                Err(Hold::Fail(reason, message)) => fail(&mut status, reason, message, now),
            }
        }
        Some(_) => actions = follow(o, now, &mut status),
    }
    (actions, status)
}

/// The daemons' figures may land just after the target turned Ready.
fn keep_late_figures(o: &Observed<'_>, status: &mut MigrationStatus) {
    if status.phase == Some(MigrationPhase::Succeeded)
        && status.report.is_none()
        && let Some(r) = o.target.and_then(reported)
    {
        status.frozen_ms = Some(r.frozen_ms);
        status.report = Some(r);
    }
}

/// A pending Migration: its Pod checked, claimed, then its target created.
fn start(
    o: &Observed<'_>,
    now: Timestamp,
    status: &mut MigrationStatus,
) -> Result<Vec<Action>, Hold> {
    let m = o.migration;
    let pod_name = &m.spec.pod_name;
    let Some(pod) = o.pod else {
        return Err(if age_of(m, now) < POD_APPEAR_GRACE_SECONDS {
            Hold::Wait(format!("waiting for Pod {pod_name:?} to exist"))
        } else {
            Hold::Fail("PodNotFound", format!("Pod {pod_name:?} does not exist"))
        });
    };
    let Some(owner) = o.owner else {
        return Err(Hold::Fail(
            "NotMigratable",
            format!("Pod {pod_name:?} is not controlled by a MigratingPod"),
        ));
    };
    check_volumes(o, pod)?;
    if let Some(why) = super::pod::unmovable_spec(pod.spec.as_ref()) {
        return Err(Hold::Fail(
            "NotMigratable",
            format!("Pod {pod_name:?} cannot move: {why}"),
        ));
    }
    check_pod_state(m, pod, now)?;
    check_nodes(o)?;
    if let Some(claim) = claim(o, pod)? {
        status.message = Some(format!("claiming Pod {pod_name:?}"));
        return Ok(vec![claim]);
    }
    // Claimed (so no other Migration takes the Pod meanwhile), then in line for a place.
    let source = super::pod::node(pod);
    status.source_node.clone_from(&source);
    if let Admission::Queued { position, message } = super::limits::admit(
        m,
        source.as_deref(),
        m.spec.target_node.as_deref(),
        o.busy,
        o.queued,
        o.limits,
    ) {
        return Err(Hold::Queued(position, message));
    }
    Ok(create_target(o, pod, owner, now, status))
}

/// The reason of a move the target reported failed, from the source's answer its error
/// ends with: `NotMigratable` when the source refused it before anything froze (CRIU's
/// preflight), `CheckpointFailed` when CRIU could not dump the source (the source runs
/// on; the message names the run and its kept log), else `RestoreFailed`.
fn failure_reason(error: &str) -> &'static str {
    if error.ends_with("(NotMigratable)") {
        "NotMigratable"
    } else if error.ends_with("(CheckpointFailed)") {
        "CheckpointFailed"
    } else {
        "RestoreFailed"
    }
}

/// Seconds since the Migration was made (very many when unknown).
fn age_of(m: &Migration, now: Timestamp) -> i64 {
    m.metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| (now - t.0).get_seconds())
}

/// The Pod's volumes can go where it goes.
fn check_volumes(o: &Observed<'_>, pod: &Pod) -> Result<(), Hold> {
    let m = o.migration;
    let pod_name = &m.spec.pod_name;
    let local =
        super::pod::node_local_volumes(pod.spec.as_ref(), pod.annotations(), o.local_claims);
    if !local.is_empty() {
        return Err(Hold::Fail(
            "NotMigratable",
            format!(
                "Pod {pod_name:?} has node-local volumes that cannot move: {}; annotate it with {}=<names> if they exist on every node",
                local.join(", "),
                podmig_api::ANNOTATION_VOLUMES_ON_EVERY_NODE
            ),
        ));
    }
    let (exclusive, per_pod) = super::pod::single_node_volumes(pod.spec.as_ref(), o.local_claims);
    let source_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let same_node = m.spec.target_node.is_some() && m.spec.target_node.as_deref() == source_node;
    if !exclusive.is_empty() && (per_pod || !same_node) {
        return Err(Hold::Fail(
            "NotMigratable",
            format!(
                "Pod {pod_name:?} has volumes that attach to {} only: {}; the source holds them until the target runs, so {}",
                if per_pod { "one Pod" } else { "one node" },
                exclusive.join(", "),
                if per_pod {
                    "it cannot move".to_owned()
                } else {
                    format!(
                        "it can move only within its node (targetNode: {})",
                        source_node.unwrap_or("its node")
                    )
                }
            ),
        ));
    }
    Ok(())
}

/// Only a running Pod has state to move: one still starting is waited for, one being
/// deleted is refused.
fn check_pod_state(m: &Migration, pod: &Pod, now: Timestamp) -> Result<(), Hold> {
    let pod_name = &m.spec.pod_name;
    if pod.metadata.deletion_timestamp.is_none() && !is_ready(pod) {
        return Err(if age_of(m, now) < i64::from(m.spec.timeout_seconds) {
            Hold::Wait(format!("waiting for Pod {pod_name:?} to be Ready"))
        } else {
            Hold::Fail(
                "NotMigratable",
                format!("Pod {pod_name:?} did not become Ready"),
            )
        });
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(Hold::Fail(
            "PodTerminating",
            format!("Pod {pod_name:?} is being deleted"),
        ));
    }
    Ok(())
}

/// The target node, or one matching the selector, exists and takes Pods.
fn check_nodes(o: &Observed<'_>) -> Result<(), Hold> {
    let m = o.migration;
    if let Some(t) = &m.spec.target_node {
        match o.nodes.iter().find(|n| n.name_any() == *t) {
            None => {
                return Err(Hold::Fail(
                    "NodeNotFound",
                    format!("target node {t:?} does not exist"),
                ));
            }
            Some(n) if !schedulable(n) => {
                return Err(Hold::Fail(
                    "NodeUnschedulable",
                    format!("target node {t:?} is cordoned"),
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(sel) = &m.spec.node_selector {
        let fits = o
            .nodes
            .iter()
            .any(|n| schedulable(n) && sel.iter().all(|(k, v)| n.labels().get(k) == Some(v)));
        if !fits {
            return Err(Hold::Fail(
                "NoMatchingNode",
                format!("no schedulable node matches {sel:?}"),
            ));
        }
    }
    Ok(())
}

/// One move per Pod: the Pod is claimed with optimistic concurrency, so of two Migrations
/// created together exactly one holds it, whatever their order. `Some`: the claim to make
/// first; `None`: this Migration holds it.
fn claim(o: &Observed<'_>, pod: &Pod) -> Result<Option<Action>, Hold> {
    let m = o.migration;
    let name = m.name_any();
    let pod_name = &m.spec.pod_name;
    let holder = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_CLAIMED_BY))
        .filter(|h| {
            **h == name
                || o.others.iter().any(|x| {
                    x.name_any() == **h
                        && !x
                            .status
                            .as_ref()
                            .and_then(|s| s.phase)
                            .is_some_and(MigrationPhase::is_terminal)
                })
        });
    match holder {
        Some(h) if *h != name => Err(Hold::Fail(
            "AlreadyMigrating",
            format!("Migration {h:?} is already moving Pod {pod_name:?}"),
        )),
        Some(_) => Ok(None),
        None => Ok(Some(Action::ClaimPod {
            pod: pod_name.clone(),
            resource_version: pod.metadata.resource_version.clone().unwrap_or_default(),
        })),
    }
}

/// The target Pod, its name recorded before it exists (never handed out again).
fn create_target(
    o: &Observed<'_>,
    pod: &Pod,
    owner: &MigratingPod,
    now: Timestamp,
    status: &mut MigrationStatus,
) -> Vec<Action> {
    let m = o.migration;
    let pod_name = &m.spec.pod_name;
    let owner_name = owner.name_any();
    let owner_status = owner.status.clone().unwrap_or_default();
    let index = next_index(
        &owner_name,
        o.siblings,
        owner_status.active_pod.as_deref(),
        owner_status.last_pod_index,
    );
    let target = build_target(m, owner, pod, index, o.local_claims, o.limits, now);
    let target_name = target.metadata.name.clone().unwrap_or_default();
    status.migrating_pod = Some(owner_name.clone());
    status.source_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    status.target_pod = target.metadata.name.clone();
    status.target_node = m.spec.target_node.clone();
    status.reason = None;
    status.message = Some(format!("creating target Pod {target_name}"));
    set_phase(status, MigrationPhase::Scheduling, now);
    vec![
        Action::Event {
            reason: "MigrationStarted",
            message: format!("moving {pod_name} to {target_name}"),
            warning: false,
        },
        Action::RecordPodIndex {
            migrating_pod: owner_name,
            index,
        },
        Action::CreatePod(Box::new(target)),
    ]
}

/// A Migration whose target exists (or should): succeeded, failed, timed out, or the
/// daemons' progress.
fn follow(o: &Observed<'_>, now: Timestamp, status: &mut MigrationStatus) -> Vec<Action> {
    let m = o.migration;
    let pod_name = &m.spec.pod_name;
    let started = started_at(m)
        .or(m.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    let timeout = super::limits::timeout_seconds(m, o.pod, o.limits);
    let target_name = status.target_pod.clone().unwrap_or_default();
    let Some(target) = o.target else {
        return target_missing(o, now, status, &target_name);
    };
    status.target_node = target
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or(status.target_node.take());
    let report = reported(target);
    if let Some(r) = &report {
        status.frozen_ms = Some(r.frozen_ms);
        status.report = Some(r.clone());
    }
    let daemon_phase = reported_phase(target);
    let target_failed = target.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        || daemon_phase == Some(DaemonPhase::Failed);
    if super::pod::moved_in(target) {
        return succeeded(o, target, report.as_ref(), now, status);
    }
    let (reason, event, why) = if let Some(who) = cancelled_by(m) {
        let why = format!("cancelled by {who}; rolled back: {pod_name} keeps running");
        ("Cancelled", "MigrationCancelled", why)
    } else if target_failed {
        let why = report
            .and_then(|r| r.error)
            .unwrap_or_else(|| "the target failed to restore".into());
        (failure_reason(&why), "MigrationFailed", why)
    } else if (now - started).get_seconds() > i64::from(timeout) {
        let why = format!("not done within {timeout}s; rolled back: {pod_name} keeps running");
        ("Timeout", "MigrationTimedOut", why)
    } else {
        if let Some(p) = daemon_phase
            .map(DaemonPhase::migration_phase)
            .filter(|p| status.phase.is_some_and(|cur| cur < *p))
        {
            set_phase(status, p, now);
        }
        return Vec::new();
    };
    let actions = vec![
        Action::ReleaseFinalizer(target_name.clone()),
        Action::DeletePod(target_name),
        Action::Event {
            reason: event,
            message: why.clone(),
            warning: true,
        },
    ];
    fail(status, reason, why, now);
    actions
}

/// Recorded but not created yet (the status is written before the Pod): created under
/// the recorded name, so a retry never makes a second target. Gone after that: failed.
fn target_missing(
    o: &Observed<'_>,
    now: Timestamp,
    status: &mut MigrationStatus,
    target_name: &str,
) -> Vec<Action> {
    if status.phase == Some(MigrationPhase::Scheduling)
        && let (Some(pod), Some(owner)) = (o.pod, o.owner)
        && let Some(index) = super::pod::pod_index(&owner.name_any(), target_name)
    {
        return vec![Action::CreatePod(Box::new(build_target(
            o.migration,
            owner,
            pod,
            index,
            o.local_claims,
            o.limits,
            now,
        )))];
    }
    fail(
        status,
        "TargetPodDeleted",
        format!("target Pod {target_name:?} disappeared"),
        now,
    );
    Vec::new()
}

/// The move is done: the source goes (its state runs in the target).
fn succeeded(
    o: &Observed<'_>,
    target: &Pod,
    report: Option<&podmig_api::v1alpha1::MigrationReport>,
    now: Timestamp,
    status: &mut MigrationStatus,
) -> Vec<Action> {
    let pod_name = &o.migration.spec.pod_name;
    let target_name = status.target_pod.clone().unwrap_or_default();
    let mut actions = Vec::new();
    if let Some(source) = o.pod.filter(|p| p.metadata.uid != target.metadata.uid) {
        if has_finalizer(source) {
            actions.push(Action::ReleaseFinalizer(source.name_any()));
        }
        if !is_deleting(source) {
            actions.push(Action::DeletePod(source.name_any()));
        }
    }
    // Phases the daemons moved through too fast to be seen still count.
    for p in [
        MigrationPhase::Checkpointing,
        MigrationPhase::Transferring,
        MigrationPhase::Restoring,
    ] {
        if status.phase.is_some_and(|cur| cur < p) {
            set_phase(status, p, now);
        }
    }
    set_phase(status, MigrationPhase::Succeeded, now);
    status.message = Some(format!("{pod_name} runs as {target_name}"));
    status.conditions = vec![Condition {
        type_: "Succeeded".into(),
        status: "True".into(),
        reason: "Moved".into(),
        message: status.message.clone().unwrap_or_default(),
        last_transition_time: Time(now),
        observed_generation: None,
    }];
    actions.push(Action::Event {
        reason: "MigrationSucceeded",
        message: format!(
            "{pod_name} moved to {target_name}{}",
            super::pod::figures(report)
        ),
        warning: false,
    });
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-11-22T01:00:00Z".parse().expect("time")
    }

    fn mig(name: &str, pod: &str, extra: serde_json::Value) -> Migration {
        let mut spec = json!({"podName": pod});
        if let Some(o) = extra.as_object() {
            for (k, v) in o {
                spec[k] = v.clone();
            }
        }
        serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": "2026-11-22T00:59:00Z"}, "spec": spec})).expect("mig")
    }

    fn owner() -> MigratingPod {
        serde_json::from_value(json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod", "metadata": {"name": "x", "namespace": "ns", "uid": "mp"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}}})).expect("mpod")
    }

    fn pod(name: &str, v: serde_json::Value) -> Pod {
        // Claimed by Migration "m" unless a test says otherwise.
        let mut p = json!({"metadata": {"name": name, "uid": format!("uid-{name}"), "annotations": {ANNOTATION_CLAIMED_BY: "m"}},
            "spec": {"containers": [{"name": "app"}], "nodeName": "n1"}});
        if let Some(o) = v.as_object() {
            for (k, val) in o {
                p[k] = val.clone();
            }
        }
        serde_json::from_value(p).expect("pod")
    }

    fn node(name: &str, unschedulable: bool) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"zone": name}}, "spec": {"unschedulable": unschedulable}})).expect("node")
    }

    fn observe<'a>(
        m: &'a Migration,
        p: Option<&'a Pod>,
        own: Option<&'a MigratingPod>,
        target: Option<&'a Pod>,
        nodes: &'a [Node],
        others: &'a [Migration],
    ) -> Observed<'a> {
        Observed {
            migration: m,
            pod: p,
            owner: own,
            siblings: p.map(std::slice::from_ref).unwrap_or_default(),
            target,
            nodes,
            others,
            local_claims: &NO_CLAIMS,
            limits: &LIMITS,
            busy: &[],
            queued: &[],
        }
    }

    static NO_CLAIMS: crate::controller::pod::LocalClaims =
        crate::controller::pod::LocalClaims::NONE;
    static LIMITS: Limits = Limits {
        per_cluster: 5,
        per_node: 2,
        timeout_seconds_per_gib: 60,
    };

    #[test]
    fn bad_requests_fail_with_precise_reasons() {
        let nodes = [node("n1", false), node("n2", true)];
        let own = owner();
        let src = pod(
            "x-0",
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let cases = [
            (mig("m", "nope", json!({})), None, Some(&own), "PodNotFound"),
            (
                mig("m", "x-0", json!({})),
                Some(&src),
                None,
                "NotMigratable",
            ),
            (
                mig("m", "x-0", json!({"targetNode": "ghost"})),
                Some(&src),
                Some(&own),
                "NodeNotFound",
            ),
            (
                mig("m", "x-0", json!({"targetNode": "n2"})),
                Some(&src),
                Some(&own),
                "NodeUnschedulable",
            ),
            (
                mig("m", "x-0", json!({"nodeSelector": {"zone": "n2"}})),
                Some(&src),
                Some(&own),
                "NoMatchingNode",
            ),
        ];
        for (m, p, o, reason) in cases {
            let (actions, st) = decide(&observe(&m, p, o, None, &nodes, &[]), now());
            assert!(
                matches!(
                    &actions[..],
                    [Action::Event {
                        reason: "MigrationFailed",
                        warning: true,
                        ..
                    }]
                ),
                "{reason}: {actions:?}"
            );
            assert_eq!(
                (st.phase, st.reason.as_deref()),
                (Some(MigrationPhase::Failed), Some(reason))
            );
            assert_eq!(st.conditions[0].reason, reason);
        }
    }

    #[test]
    fn a_recorded_target_that_was_not_created_yet_is_created_under_its_name() {
        let nodes = [node("n1", false)];
        let own = owner();
        let src = pod(
            "x-0",
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let mut m = mig("m", "x-0", json!({}));
        m.status = Some(MigrationStatus {
            phase: Some(MigrationPhase::Scheduling),
            target_pod: Some("x-3".into()),
            ..Default::default()
        });
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_eq!(st.phase, Some(MigrationPhase::Scheduling));
        match &actions[..] {
            [Action::CreatePod(p)] => assert_eq!(p.metadata.name.as_deref(), Some("x-3")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pod_with_a_host_path_volume_is_refused_unless_it_is_everywhere() {
        let nodes = [node("n1", false), node("n2", false)];
        let own = owner();
        let spec = json!({"containers": [{"name": "app"}], "nodeName": "n1",
            "volumes": [{"name": "data", "hostPath": {"path": "/srv/data"}}, {"name": "tmp", "emptyDir": {}}]});
        let ready =
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        let tied = pod("x-0", json!({"spec": spec, "status": ready}));
        let m = mig("m", "x-0", json!({"targetNode": "n2"}));
        let (actions, st) = decide(
            &observe(&m, Some(&tied), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_eq!(st.reason.as_deref(), Some("NotMigratable"));
        let msg = st.message.clone().unwrap_or_default();
        assert!(
            msg.contains("\"data\" (hostPath /srv/data)") && !msg.contains("tmp"),
            "{msg}"
        );
        assert!(
            !actions.iter().any(|a| matches!(a, Action::CreatePod(_))),
            "{actions:?}"
        );
        let mut everywhere = tied.clone();
        everywhere
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                podmig_api::ANNOTATION_VOLUMES_ON_EVERY_NODE.into(),
                "data".into(),
            );
        let (_, st) = decide(
            &observe(&m, Some(&everywhere), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_ne!(st.reason.as_deref(), Some("NotMigratable"), "{st:?}");
    }

    #[test]
    fn a_source_s_refusal_before_the_freeze_is_not_migratable() {
        assert_eq!(
            failure_reason(
                "the daemon at 10.0.0.10 answered 422: preflight: container \"app\" cannot be checkpointed: CRIU: … (NotMigratable)"
            ),
            "NotMigratable"
        );
        assert_eq!(
            failure_reason("restore of container app failed"),
            "RestoreFailed"
        );
        assert_eq!(
            failure_reason(
                "the daemon at 10.0.0.10 answered 500: checkpoint failed: the lazy dump did not get ready: … page-pipe: create_page_pipe: Can't allocate 34360081360 bytes\nCRIU's log of this lazy-dump is kept at /var/lib/podmig/criu-failed/1-lazy-dump-x.log (CheckpointFailed)"
            ),
            "CheckpointFailed"
        );
    }

    #[test]
    fn a_pod_in_its_own_user_namespace_is_refused_before_anything_freezes() {
        let nodes = [node("n1", false), node("n2", false)];
        let own = owner();
        let ready =
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        let userns = pod(
            "x-0",
            json!({"spec": {"hostUsers": false, "containers": [{"name": "app"}], "nodeName": "n1"},
                "status": ready}),
        );
        let m = mig("m", "x-0", json!({"targetNode": "n2"}));
        let (actions, st) = decide(
            &observe(&m, Some(&userns), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_eq!(st.phase, Some(MigrationPhase::Failed), "{st:?}");
        assert_eq!(st.reason.as_deref(), Some("NotMigratable"));
        let msg = st.message.clone().unwrap_or_default();
        assert!(
            msg.contains("hostUsers: false") && msg.contains("2651"),
            "{msg}"
        );
        assert!(
            !actions.iter().any(|a| matches!(a, Action::CreatePod(_))),
            "{actions:?}"
        );
    }

    #[test]
    fn a_pod_with_a_claim_on_a_local_volume_is_refused() {
        let nodes = [node("n1", false), node("n2", false)];
        let own = owner();
        let spec = json!({"containers": [{"name": "app"}], "nodeName": "n1",
            "volumes": [{"name": "db", "persistentVolumeClaim": {"claimName": "pgdata"}},
                        {"name": "shared", "persistentVolumeClaim": {"claimName": "nfs"}}]});
        let ready =
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        let p = pod("x-0", json!({"spec": spec, "status": ready}));
        let m = mig("m", "x-0", json!({"targetNode": "n2"}));
        let pv: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-ssd"},
            "spec": {"local": {"path": "/mnt/ssd1"}, "capacity": {"storage": "1Gi"}}}))
        .expect("pv");
        let why = crate::controller::pod::local_volume_source(&pv).expect("local");
        let claims = crate::controller::pod::LocalClaims {
            node_local: [("pgdata".to_owned(), why)].into(),
            ..Default::default()
        };
        let mut o = observe(&m, Some(&p), Some(&own), None, &nodes, &[]);
        o.local_claims = &claims;
        let (actions, st) = decide(&o, now());
        assert_eq!(st.reason.as_deref(), Some("NotMigratable"));
        let msg = st.message.clone().unwrap_or_default();
        assert!(
            msg.contains("\"db\" (claim pgdata: local PersistentVolume pv-ssd at /mnt/ssd1)")
                && !msg.contains("nfs"),
            "{msg}"
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::CreatePod(_))));
        // A network-attached claim alone does not stop a move.
        let (_, st) = decide(&observe(&m, Some(&p), Some(&own), None, &nodes, &[]), now());
        assert_ne!(st.reason.as_deref(), Some("NotMigratable"), "{st:?}");
    }

    #[test]
    fn a_read_write_once_claim_moves_only_within_its_node() {
        let nodes = [node("n1", false), node("n2", false)];
        let own = owner();
        let spec = json!({"containers": [{"name": "app"}], "nodeName": "n1",
            "volumes": [{"name": "db", "persistentVolumeClaim": {"claimName": "disk"}}]});
        let ready =
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        let p = pod("x-0", json!({"spec": spec, "status": ready}));
        let mut claims = crate::controller::pod::LocalClaims::default();
        claims
            .single_node
            .insert("disk".into(), "ReadWriteOnce".into());
        let reason = |target: &str, claims: &crate::controller::pod::LocalClaims| {
            let m = mig("m", "x-0", json!({"targetNode": target}));
            let mut o = observe(&m, Some(&p), Some(&own), None, &nodes, &[]);
            o.local_claims = claims;
            let (_, st) = decide(&o, now());
            (st.reason, st.message.unwrap_or_default())
        };
        let (r, msg) = reason("n2", &claims);
        assert_eq!(r.as_deref(), Some("NotMigratable"));
        assert!(
            msg.contains("\"db\" (claim disk: ReadWriteOnce)") && msg.contains("targetNode: n1"),
            "{msg}"
        );
        assert_ne!(reason("n1", &claims).0.as_deref(), Some("NotMigratable"));
        claims
            .single_node
            .insert("disk".into(), "ReadWriteOncePod".into());
        let (r, msg) = reason("n1", &claims);
        assert_eq!(r.as_deref(), Some("NotMigratable"), "{msg}");
        assert!(msg.contains("one Pod"), "{msg}");
    }

    #[test]
    fn a_starting_pod_is_waited_for_then_refused() {
        let nodes = [node("n1", false)];
        let own = owner();
        let starting = pod("x-0", json!({"status": {"phase": "Pending"}}));
        let mut m = mig("m", "x-0", json!({"timeoutSeconds": 120}));
        let (actions, st) = decide(
            &observe(&m, Some(&starting), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(st.phase, Some(MigrationPhase::Pending));
        m.spec.timeout_seconds = 30;
        let (_, st) = decide(
            &observe(&m, Some(&starting), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_eq!(st.reason.as_deref(), Some("NotMigratable"));
    }

    #[test]
    fn a_pod_applied_together_with_its_migration_is_waited_for() {
        let nodes = [node("n1", false)];
        let own = owner();
        let mut m = mig("m", "x-0", json!({}));
        m.metadata.creation_timestamp = Some(Time("2026-11-22T00:59:50Z".parse().expect("t")));
        let (actions, st) = decide(&observe(&m, None, Some(&own), None, &nodes, &[]), now());
        assert!(actions.is_empty());
        assert_eq!(st.phase, Some(MigrationPhase::Pending));
        assert!(
            st.message
                .as_deref()
                .unwrap_or_default()
                .contains("waiting")
        );
    }

    #[test]
    fn one_migration_claims_the_pod_and_a_second_is_rejected_in_either_order() {
        let nodes = [node("n1", false)];
        let own = owner();
        let src = pod(
            "x-0",
            json!({"metadata": {"name": "x-0", "uid": "uid-x-0", "resourceVersion": "7"},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let (a, b) = (mig("a", "x-0", json!({})), mig("b", "x-0", json!({})));
        let others = [a.clone(), b.clone()];
        // Unclaimed: each asks to claim it, with the version it saw.
        for m in [&a, &b] {
            let (actions, st) = decide(
                &observe(m, Some(&src), Some(&own), None, &nodes, &others),
                now(),
            );
            assert_eq!(
                actions,
                [Action::ClaimPod {
                    pod: "x-0".into(),
                    resource_version: "7".into()
                }]
            );
            assert_eq!(st.phase, Some(MigrationPhase::Pending));
        }
        // Whichever won, the other fails at once and the winner proceeds.
        for (winner, loser) in [(&a, &b), (&b, &a)] {
            let claimed = pod(
                "x-0",
                json!({"metadata": {"name": "x-0", "uid": "uid-x-0", "annotations": {ANNOTATION_CLAIMED_BY: winner.name_any()}},
                    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
            );
            let (_, st) = decide(
                &observe(loser, Some(&claimed), Some(&own), None, &nodes, &others),
                now(),
            );
            assert_eq!(st.reason.as_deref(), Some("AlreadyMigrating"));
            assert!(
                st.message
                    .as_deref()
                    .unwrap_or_default()
                    .contains(&winner.name_any())
            );
            let (actions, st) = decide(
                &observe(winner, Some(&claimed), Some(&own), None, &nodes, &others),
                now(),
            );
            assert_eq!(st.phase, Some(MigrationPhase::Scheduling));
            assert_eq!(actions.len(), 3, "{actions:?}");
        }
        // A claim by a Migration that ended is free again.
        let mut done = a.clone();
        done.status = Some(MigrationStatus {
            phase: Some(MigrationPhase::Failed),
            ..Default::default()
        });
        let stale = pod(
            "x-0",
            json!({"metadata": {"name": "x-0", "resourceVersion": "9", "annotations": {ANNOTATION_CLAIMED_BY: "a"}},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let (actions, _) = decide(
            &observe(
                &b,
                Some(&stale),
                Some(&own),
                None,
                &nodes,
                &[done, b.clone()],
            ),
            now(),
        );
        assert!(
            matches!(&actions[..], [Action::ClaimPod { .. }]),
            "{actions:?}"
        );
    }

    #[test]
    fn a_claimed_move_over_the_nodes_limit_waits_queued_then_starts() {
        let nodes = [node("n1", false), node("n2", false)];
        let own = owner();
        let src = pod(
            "x-0",
            json!({"metadata": {"name": "x-0", "uid": "uid-x-0", "annotations": {ANNOTATION_CLAIMED_BY: "m"}},
                "spec": {"containers": [], "nodeName": "n1"},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let m = mig("m", "x-0", json!({}));
        let two_out = [
            Busy {
                source: Some("n1".into()),
                target: Some("n2".into()),
            },
            Busy {
                source: Some("n1".into()),
                target: None,
            },
        ];
        let mut o = observe(&m, Some(&src), Some(&own), None, &nodes, &[]);
        o.busy = &two_out;
        let (actions, st) = decide(&o, now());
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(st.phase, Some(MigrationPhase::Pending));
        assert_eq!(st.reason.as_deref(), Some(REASON_QUEUED));
        assert_eq!(st.queue_position, Some(1));
        assert!(
            st.message
                .as_deref()
                .unwrap_or_default()
                .contains("2 moves run in or out of node n1"),
            "{st:?}"
        );
        // A place is free: it starts, and the queue fields go.
        let mut queued = m.clone();
        queued.status = Some(st);
        let mut o = observe(&queued, Some(&src), Some(&own), None, &nodes, &[]);
        o.busy = &two_out[..1];
        let (actions, st) = decide(&o, now());
        assert_eq!(st.phase, Some(MigrationPhase::Scheduling));
        assert_eq!((st.reason, st.queue_position), (None, None));
        assert_eq!(actions.len(), 3, "{actions:?}");
        // The target's deadline counts from the start, not from the queueing.
        let started = now().to_string();
        let target = actions
            .iter()
            .find_map(|a| match a {
                Action::CreatePod(p) => Some(p.clone()),
                _ => None,
            })
            .expect("a target");
        let deadline = target
            .annotations()
            .get(podmig_api::ANNOTATION_MIGRATION_DEADLINE)
            .cloned()
            .unwrap_or_default();
        assert!(deadline > started, "{deadline} after {started}");
    }

    #[test]
    fn target_is_created_pinned_and_phases_follow_the_daemons() {
        let nodes = [node("n1", false), node("n3", false)];
        let (own, src) = (
            owner(),
            pod(
                "x-0",
                json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        );
        let m = mig("m", "x-0", json!({"targetNode": "n3"}));
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), None, &nodes, &[]),
            now(),
        );
        let Some(Action::CreatePod(t)) = actions.iter().find(|a| matches!(a, Action::CreatePod(_)))
        else {
            panic!("no target")
        };
        assert_eq!(t.metadata.name.as_deref(), Some("x-1"));
        assert_eq!(
            t.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("n3")
        );
        assert_eq!(
            t.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_MIGRATION_ID))
                .map(String::as_str),
            Some("m")
        );
        assert_eq!(
            (st.source_node.as_deref(), st.target_pod.as_deref()),
            (Some("n1"), Some("x-1"))
        );

        let mut m2 = m.clone();
        m2.status = Some(st);
        let checkpointing = pod(
            "x-1",
            json!({"metadata": {"name": "x-1", "annotations": {podmig_api::ANNOTATION_MIGRATION_PHASE: "Checkpointing"}}}),
        );
        let (_, st) = decide(
            &observe(
                &m2,
                Some(&src),
                Some(&own),
                Some(&checkpointing),
                &nodes,
                &[],
            ),
            now(),
        );
        assert_eq!(st.phase, Some(MigrationPhase::Checkpointing));
        m2.status = Some(st);
        let done = pod(
            "x-1",
            json!({"metadata": {"name": "x-1", "annotations": {podmig_api::ANNOTATION_MIGRATION_REPORT: "{\"frozenMs\":42}"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let (_, st) = decide(
            &observe(&m2, Some(&src), Some(&own), Some(&done), &nodes, &[]),
            now(),
        );
        assert_eq!(st.phase, Some(MigrationPhase::Succeeded));
        assert_eq!(st.frozen_ms, Some(42));
        let phases: Vec<_> = st.transitions.iter().map(|t| t.phase).collect();
        assert_eq!(
            phases,
            [
                MigrationPhase::Pending,
                MigrationPhase::Scheduling,
                MigrationPhase::Checkpointing,
                MigrationPhase::Transferring,
                MigrationPhase::Restoring,
                MigrationPhase::Succeeded
            ]
        );
    }

    #[test]
    fn success_lets_the_source_go_and_failure_keeps_its_finalizer() {
        let nodes = [node("n1", false)];
        let own = owner();
        let src = pod(
            "x-0",
            json!({"metadata": {"name": "x-0", "uid": "uid-x-0", "finalizers": [podmig_api::MIGRATE_FINALIZER]}}),
        );
        let mut m = mig("m", "x-0", json!({}));
        m.status = Some(MigrationStatus {
            phase: Some(MigrationPhase::Restoring),
            target_pod: Some("x-1".into()),
            ..Default::default()
        });
        let ready = pod(
            "x-1",
            json!({"metadata": {"name": "x-1", "uid": "uid-x-1"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), Some(&ready), &nodes, &[]),
            now(),
        );
        assert_eq!(st.phase, Some(MigrationPhase::Succeeded));
        assert!(
            actions.contains(&Action::ReleaseFinalizer("x-0".into())),
            "{actions:?}"
        );
        assert!(
            actions.contains(&Action::DeletePod("x-0".into())),
            "{actions:?}"
        );
        let failed = pod(
            "x-1",
            json!({"metadata": {"name": "x-1", "uid": "uid-x-1", "annotations": {podmig_api::ANNOTATION_MIGRATION_PHASE: "Failed",
                podmig_api::ANNOTATION_MIGRATION_REPORT: "{\"error\":\"restore on n2: CRIU: can't open file\"}"}}}),
        );
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), Some(&failed), &nodes, &[]),
            now(),
        );
        assert_eq!(st.reason.as_deref(), Some("RestoreFailed"));
        assert!(
            st.message
                .as_deref()
                .unwrap_or_default()
                .contains("can't open file"),
            "{st:?}"
        );
        assert!(
            !actions.contains(&Action::ReleaseFinalizer("x-0".into())),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::DeletePod("x-1".into())));
    }

    #[test]
    fn the_target_index_is_recorded_so_it_is_never_reused() {
        let nodes = [node("n1", false)];
        let mut own = owner();
        own.status = Some(podmig_api::v1alpha1::MigratingPodStatus {
            last_pod_index: Some(4),
            ..Default::default()
        });
        let src = pod(
            "x-0",
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let m = mig("m", "x-0", json!({}));
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_eq!(st.target_pod.as_deref(), Some("x-5"));
        assert!(actions.contains(&Action::RecordPodIndex {
            migrating_pod: "x".into(),
            index: 5
        }));
    }

    #[test]
    fn timeout_rolls_back_by_removing_the_target() {
        let nodes = [node("n1", false)];
        let (own, src) = (
            owner(),
            pod(
                "x-0",
                json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        );
        let mut m = mig("m", "x-0", json!({"timeoutSeconds": 30}));
        m.status = Some(MigrationStatus {
            phase: Some(MigrationPhase::Scheduling),
            target_pod: Some("x-1".into()),
            ..Default::default()
        });
        let stuck = pod("x-1", json!({"metadata": {"name": "x-1"}}));
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), Some(&stuck), &nodes, &[]),
            now(),
        );
        assert_eq!(st.reason.as_deref(), Some("Timeout"));
        assert!(actions.contains(&Action::DeletePod("x-1".into())));
        assert!(
            !actions.contains(&Action::DeletePod("x-0".into())),
            "the source keeps running"
        );
    }

    #[test]
    fn a_cancelled_move_ends_queued_or_rolls_back_under_way() {
        let nodes = [node("n1", false)];
        let own = owner();
        let src = pod(
            "x-0",
            json!({"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}),
        );
        let mut m = mig("m", "x-0", json!({}));
        m.metadata.annotations = Some(std::collections::BTreeMap::from([(
            podmig_api::ANNOTATION_CANCEL.to_owned(),
            "alice".to_owned(),
        )]));
        m.status = Some(MigrationStatus {
            phase: Some(MigrationPhase::Pending),
            reason: Some(REASON_QUEUED.into()),
            queue_position: Some(3),
            ..Default::default()
        });
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), None, &nodes, &[]),
            now(),
        );
        assert_eq!(st.phase, Some(MigrationPhase::Failed));
        assert_eq!(st.reason.as_deref(), Some("Cancelled"));
        assert_eq!(st.queue_position, None);
        assert!(
            matches!(
                &actions[..],
                [Action::Event {
                    reason: "MigrationFailed",
                    ..
                }]
            ),
            "{actions:?}"
        );
        m.status = Some(MigrationStatus {
            phase: Some(MigrationPhase::Transferring),
            target_pod: Some("x-1".into()),
            ..Default::default()
        });
        let target = pod("x-1", json!({"metadata": {"name": "x-1"}}));
        let (actions, st) = decide(
            &observe(&m, Some(&src), Some(&own), Some(&target), &nodes, &[]),
            now(),
        );
        assert_eq!(st.reason.as_deref(), Some("Cancelled"));
        assert!(
            st.message
                .as_deref()
                .unwrap_or_default()
                .contains("cancelled by alice")
        );
        assert!(actions.contains(&Action::DeletePod("x-1".into())));
        assert!(!actions.contains(&Action::DeletePod("x-0".into())));
    }
}
