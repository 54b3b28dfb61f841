//! The answer to an eviction (`kubectl drain`, the Cluster Autoscaler, Karpenter, the
//! descheduler): a Pod podmig may move is moved first — the eviction is refused with 429
//! (clients retry) while a Migration carries it to another node, and once it is gone the
//! retried eviction finds nothing to evict. A Pod that cannot move is let through to a
//! plain eviction or kept, by its `podmig.dev/on-eviction` policy, with an Event either way.
//! The decision is a plain function of what the webhook observed.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Node, Pod, PodTemplateSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::ResourceExt;
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_ON_EVICTION, ANNOTATION_STARTED_BY_EVICTION,
    RUNTIME_HANDLER,
    v1alpha1::{MigratingPod, MigratingPodSpec, Migration, MigrationPhase, Strategy},
};

use super::pod::{annotation, is_deleting, is_ready, moved_in, node};

/// What an eviction of a Pod does, by its `podmig.dev/on-eviction` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Plain eviction: podmig stays out of it.
    Evict,
    /// Move first; when the Pod cannot move, the eviction goes on (the Pod restarts).
    MigrateOrEvict,
    /// Move first; when the Pod cannot move, the eviction is refused (its state is kept).
    MigrateOnly,
}

impl Policy {
    /// The policy an annotation value names (`migrate` is `migrate-or-evict`).
    pub fn parse(v: &str) -> Option<Self> {
        Some(match v {
            "evict" => Self::Evict,
            "migrate" | "migrate-or-evict" => Self::MigrateOrEvict,
            "migrate-only" => Self::MigrateOnly,
            _ => return None,
        })
    }
}

/// Who runs the Pod, as far as a move is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A MigratingPod (its name): it moves the Pod.
    MigratingPod(String),
    /// Nobody: the webhook adopts it into a MigratingPod of its own to move it.
    Bare,
    /// Another controller (kind): it would not adopt the moved Pod, so no move.
    Other(String),
}

/// The controller of `pod`.
pub fn owner_of(pod: &Pod) -> Owner {
    match pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
    {
        None => Owner::Bare,
        Some(o) if o.kind == "MigratingPod" && o.api_version.starts_with("podmig.dev/") => {
            Owner::MigratingPod(o.name.clone())
        }
        Some(o) => Owner::Other(o.kind.clone()),
    }
}

/// An Event to record on the Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// CamelCase reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

/// The webhook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Let the eviction through.
    Allow(Option<Note>),
    /// Refuse it with 429 (the client retries later).
    Deny(String, Option<Note>),
    /// Refuse it with 429 while Migration `migration` moves the Pod (the webhook may first
    /// wait a little for the move to end).
    Moving {
        /// The Migration under way.
        migration: String,
        /// The refusal.
        message: String,
    },
    /// Start a Migration to `target_node` (adopting the Pod first when bare), then refuse
    /// the eviction with 429 naming it.
    Move {
        /// The node chosen for it.
        target_node: String,
        /// The Pod is bare and must first be adopted.
        adopt: bool,
    },
}

/// Failure reasons that another try would meet again.
const FINAL_REASONS: &[&str] = &[
    "NotMigratable",
    "PodNotFound",
    "PodTerminating",
    "NodeNotFound",
    "NodeUnschedulable",
    "NoMatchingNode",
];

/// Moves an eviction tries before it gives up (within [`RETRY_WINDOW_SECONDS`]).
pub const MAX_ATTEMPTS: usize = 3;

/// How far back failed eviction moves count against [`MAX_ATTEMPTS`].
pub const RETRY_WINDOW_SECONDS: i64 = 600;

/// Decides the answer to an eviction of `pod`, knowing the Migrations of that Pod, and the
/// node a move would go to (`None`: no node can take it).
pub fn decide(
    pod: &Pod,
    migrations: &[Migration],
    target: Option<String>,
    now: Timestamp,
) -> Answer {
    let name = pod.name_any();
    if is_deleting(pod) {
        return Answer::Allow(None);
    }
    if annotation(pod, ANNOTATION_MIGRATE_FROM).is_some() && !moved_in(pod) {
        return Answer::Deny(
            format!("Pod {name} is the target of a move under way; evict it once it runs"),
            None,
        );
    }
    let owner = owner_of(pod);
    let asked = annotation(pod, ANNOTATION_ON_EVICTION);
    let policy = match (&owner, asked.map(Policy::parse)) {
        (_, Some(Some(p))) => p,
        (Owner::MigratingPod(_), _) => Policy::MigrateOrEvict,
        // An unknown value is taken as a wish to move, never as a wish to lose the Pod.
        (_, Some(None)) => Policy::MigrateOrEvict,
        (_, None) => Policy::Evict,
    };
    if policy == Policy::Evict {
        return Answer::Allow(None);
    }
    if let Owner::Other(kind) = &owner {
        return Answer::Allow(Some(Note {
            reason: "EvictedWithoutMove",
            message: format!(
                "{ANNOTATION_ON_EVICTION} is ignored on a Pod controlled by a {kind}: it would not adopt the moved Pod, so the eviction goes on"
            ),
        }));
    }
    if let Some(m) = migrations.iter().find(|m| !is_finished(m)) {
        return Answer::Moving {
            migration: m.name_any(),
            message: format!(
                "Pod {name} is being moved by Migration {} ({}); the eviction succeeds once the move ended",
                m.name_any(),
                phase_of(m)
            ),
        };
    }
    let cannot = |why: String| fallback(&name, policy, why);
    if owner == Owner::Bare
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.as_deref())
            != Some(RUNTIME_HANDLER)
    {
        return cannot(format!(
            "it does not run with the {RUNTIME_HANDLER} RuntimeClass (spec.runtimeClassName)"
        ));
    }
    if let Some(why) = super::pod::unmovable_spec(pod.spec.as_ref()) {
        return cannot(why.into());
    }
    if !is_ready(pod) {
        return cannot("it is not running and Ready, so there is no state to carry".into());
    }
    let mut tried: Vec<&Migration> = migrations
        .iter()
        .filter(|m| m.annotations().contains_key(ANNOTATION_STARTED_BY_EVICTION))
        .filter(|m| {
            m.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| (now - t.0).get_seconds() < RETRY_WINDOW_SECONDS)
        })
        .filter(|m| phase_of(m) == "Failed")
        .collect();
    tried.sort_by_key(|m| m.metadata.creation_timestamp.as_ref().map(|t| t.0));
    if let Some(last) = tried.last() {
        let st = last.status.clone().unwrap_or_default();
        let reason = st.reason.unwrap_or_default();
        if FINAL_REASONS.contains(&reason.as_str()) || tried.len() >= MAX_ATTEMPTS {
            return cannot(format!(
                "Migration {} failed ({reason}: {}){}",
                last.name_any(),
                st.message.unwrap_or_default(),
                if tried.len() > 1 {
                    format!(" after {} tries", tried.len())
                } else {
                    String::new()
                }
            ));
        }
    }
    match target {
        Some(target_node) => Answer::Move {
            target_node,
            adopt: owner == Owner::Bare,
        },
        None => {
            let failed: Vec<String> = tried
                .iter()
                .filter_map(|m| m.spec.target_node.clone())
                .collect();
            cannot(if failed.is_empty() {
                "no other Ready, schedulable node fits it".into()
            } else {
                format!(
                    "no other Ready, schedulable node fits it but {}, where its moves failed",
                    failed.join(", ")
                )
            })
        }
    }
}

fn phase_of(m: &Migration) -> &'static str {
    match m.status.as_ref().and_then(|s| s.phase) {
        None | Some(MigrationPhase::Pending) => "Pending",
        Some(MigrationPhase::Scheduling) => "Scheduling",
        Some(MigrationPhase::Checkpointing) => "Checkpointing",
        Some(MigrationPhase::Transferring) => "Transferring",
        Some(MigrationPhase::Restoring) => "Restoring",
        Some(MigrationPhase::Succeeded) => "Succeeded",
        Some(MigrationPhase::Failed) => "Failed",
    }
}

/// True once Migration `m` ended (succeeded, failed or rolled back).
pub fn is_finished(m: &Migration) -> bool {
    m.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(MigrationPhase::is_terminal)
}

/// The answer for `pod` when a move turned out impossible (`why`), by its policy.
pub fn cannot_move(pod: &Pod, why: String) -> Answer {
    let policy = annotation(pod, ANNOTATION_ON_EVICTION)
        .and_then(Policy::parse)
        .unwrap_or(Policy::MigrateOrEvict);
    fallback(&pod.name_any(), policy, why)
}

/// The MigratingPod that adopts bare Pod `pod` to move it: named as the Pod, its template
/// the Pod's labels, user annotations and spec (not its node), marked as adopting it.
pub fn adopter_of(pod: &Pod) -> MigratingPod {
    let name = pod.name_any();
    let mut labels = pod.labels().clone();
    labels.remove(podmig_api::LABEL_MIGRATING_POD);
    let annotations: BTreeMap<String, String> = pod
        .annotations()
        .iter()
        .filter(|(k, _)| {
            !podmig_api::is_podmig_owned(k) && !k.starts_with("kubectl.kubernetes.io/")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut spec = pod.spec.clone().unwrap_or_default();
    spec.node_name = None;
    let mut mpod = MigratingPod::new(
        &name,
        MigratingPodSpec {
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(spec),
            },
            strategy: Strategy::default(),
            max_downtime_ms: podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS,
            node_selector: None,
            migration_timeout_seconds: 300,
            move_attempts: podmig_api::v1alpha1::DEFAULT_MOVE_ATTEMPTS,
            keep_ip: None,
        },
    );
    mpod.metadata.namespace = pod.namespace();
    mpod.metadata
        .annotations
        .get_or_insert_default()
        .insert(podmig_api::ANNOTATION_ADOPTS.into(), name);
    mpod
}

/// A Pod that cannot move: evicted or kept, by its policy.
fn fallback(name: &str, policy: Policy, why: String) -> Answer {
    if policy == Policy::MigrateOnly {
        let message = format!(
            "Pod {name} cannot move: {why}; it is not evicted ({ANNOTATION_ON_EVICTION}: migrate-only)"
        );
        Answer::Deny(
            message.clone(),
            Some(Note {
                reason: "EvictionRefused",
                message,
            }),
        )
    } else {
        Answer::Allow(Some(Note {
            reason: "EvictedWithoutMove",
            message: format!(
                "Pod {name} cannot move: {why}; the eviction goes on and its state is lost"
            ),
        }))
    }
}

/// Whether node `n` takes new Pods: Ready and not cordoned.
pub fn schedulable(n: &Node) -> bool {
    n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true)
        && n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The nodes where a move started by an eviction of this Pod failed lately (within
/// [`RETRY_WINDOW_SECONDS`]): the next try goes elsewhere.
pub fn failed_targets(migrations: &[Migration], now: Timestamp) -> Vec<String> {
    migrations
        .iter()
        .filter(|m| m.annotations().contains_key(ANNOTATION_STARTED_BY_EVICTION))
        .filter(|m| phase_of(m) == "Failed")
        .filter(|m| {
            m.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| (now - t.0).get_seconds() < RETRY_WINDOW_SECONDS)
        })
        .filter_map(|m| m.spec.target_node.clone())
        .collect()
}

/// The node a move of `pod` goes to, as the scheduler would pick it: Ready, schedulable,
/// matching the Pod's node selector, not the Pod's own nor one in `avoid` (where a move
/// of it failed lately), the one running the fewest Pods.
pub fn pick_target(
    pod: &Pod,
    nodes: &[Node],
    load: &BTreeMap<String, usize>,
    avoid: &[String],
) -> Option<String> {
    let here = node(pod);
    let selector = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    nodes
        .iter()
        .filter(|n| Some(n.name_any()) != here && schedulable(n))
        .filter(|n| !avoid.contains(&n.name_any()))
        .filter(|n| {
            let labels = n.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|n| n.name_any())
        .min_by_key(|n| (load.get(n).copied().unwrap_or(0), n.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2026-12-03T01:00:00Z".parse().expect("time")
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut v = json!({"metadata": {"name": "web-0", "namespace": "default",
            "ownerReferences": [{"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod", "name": "web", "uid": "u", "controller": true}]},
            "spec": {"containers": [], "nodeName": "n0", "runtimeClassName": "podmig"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}});
        merge(&mut v, extra);
        serde_json::from_value(v).expect("pod")
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn mig(name: &str, created: &str, status: serde_json::Value) -> Migration {
        serde_json::from_value(
            json!({"metadata": {"name": name, "creationTimestamp": created,
            "annotations": {ANNOTATION_STARTED_BY_EVICTION: "admin"}},
            "spec": {"podName": "web-0"}, "status": status}),
        )
        .expect("migration")
    }

    fn target() -> Option<String> {
        Some("n1".into())
    }

    #[test]
    fn a_migratingpods_pod_is_moved_and_later_evictions_wait_for_the_move() {
        let p = pod(json!({}));
        assert_eq!(
            decide(&p, &[], target(), now()),
            Answer::Move {
                target_node: "n1".into(),
                adopt: false
            }
        );
        let moving = mig(
            "web-0-evict-1",
            "2026-12-03T00:59:00Z",
            json!({"phase": "Transferring"}),
        );
        let Answer::Moving {
            migration,
            message: msg,
        } = decide(&p, &[moving], target(), now())
        else {
            panic!("denied while it moves")
        };
        assert_eq!(migration, "web-0-evict-1");
        assert!(
            msg.contains("Migration web-0-evict-1 (Transferring)"),
            "{msg}"
        );
        // Being deleted (migrate-on-delete already has it) or opted out: plain eviction.
        let deleting = pod(json!({"metadata": {"deletionTimestamp": "2026-12-03T00:00:00Z"}}));
        assert_eq!(decide(&deleting, &[], target(), now()), Answer::Allow(None));
        let opted_out =
            pod(json!({"metadata": {"annotations": {ANNOTATION_ON_EVICTION: "evict"}}}));
        assert_eq!(
            decide(&opted_out, &[], target(), now()),
            Answer::Allow(None)
        );
    }

    #[test]
    fn a_bare_pod_moves_only_when_it_asks_and_runs_movable() {
        let bare = |annotations: serde_json::Value| {
            let mut p = pod(json!({"metadata": {"annotations": annotations}}));
            p.metadata.owner_references = None;
            p
        };
        assert_eq!(
            decide(&bare(json!({})), &[], target(), now()),
            Answer::Allow(None)
        );
        assert_eq!(
            decide(
                &bare(json!({ANNOTATION_ON_EVICTION: "migrate"})),
                &[],
                target(),
                now()
            ),
            Answer::Move {
                target_node: "n1".into(),
                adopt: true
            }
        );
        let mut plain_runtime = bare(json!({ANNOTATION_ON_EVICTION: "migrate-only"}));
        plain_runtime
            .spec
            .as_mut()
            .expect("spec")
            .runtime_class_name = None;
        let Answer::Deny(msg, Some(note)) = decide(&plain_runtime, &[], target(), now()) else {
            panic!("kept")
        };
        assert!(
            msg.contains("RuntimeClass") && msg.contains("migrate-only"),
            "{msg}"
        );
        assert_eq!(note.reason, "EvictionRefused");
        // A ReplicaSet's Pod is left to the eviction, with an Event saying why.
        let mut rs = pod(json!({"metadata": {"annotations": {ANNOTATION_ON_EVICTION: "migrate"}}}));
        rs.metadata.owner_references.as_mut().expect("owners")[0].kind = "ReplicaSet".into();
        rs.metadata.owner_references.as_mut().expect("owners")[0].api_version = "apps/v1".into();
        assert!(matches!(
            decide(&rs, &[], target(), now()),
            Answer::Allow(Some(Note {
                reason: "EvictedWithoutMove",
                ..
            }))
        ));
    }

    #[test]
    fn a_pod_that_cannot_move_is_evicted_or_kept_by_its_policy() {
        let p = pod(json!({}));
        let Answer::Allow(Some(note)) = decide(&p, &[], None, now()) else {
            panic!("evicted")
        };
        assert!(
            note.message.contains("no other Ready, schedulable node"),
            "{note:?}"
        );
        let only =
            pod(json!({"metadata": {"annotations": {ANNOTATION_ON_EVICTION: "migrate-only"}}}));
        assert!(matches!(
            decide(&only, &[], None, now()),
            Answer::Deny(
                _,
                Some(Note {
                    reason: "EvictionRefused",
                    ..
                })
            )
        ));
        // A refusal that would repeat ends the tries at once; a failure that may not
        // repeat is tried again, up to three times in ten minutes.
        let refused = mig(
            "a",
            "2026-12-03T00:58:00Z",
            json!({"phase": "Failed", "reason": "NotMigratable", "message": "node-local volumes"}),
        );
        let Answer::Allow(Some(note)) = decide(&p, &[refused], target(), now()) else {
            panic!("evicted")
        };
        assert!(
            note.message
                .contains("Migration a failed (NotMigratable: node-local volumes)"),
            "{note:?}"
        );
        let failed = |n: &str, at: &str| {
            mig(
                n,
                at,
                json!({"phase": "Failed", "reason": "RestoreFailed", "message": "boom"}),
            )
        };
        let twice = [
            failed("a", "2026-12-03T00:58:00Z"),
            failed("b", "2026-12-03T00:59:00Z"),
        ];
        assert!(matches!(
            decide(&p, &twice, target(), now()),
            Answer::Move { .. }
        ));
        let thrice = [
            failed("a", "2026-12-03T00:58:00Z"),
            failed("b", "2026-12-03T00:59:00Z"),
            failed("c", "2026-12-03T00:59:30Z"),
        ];
        let Answer::Allow(Some(note)) = decide(&p, &thrice, target(), now()) else {
            panic!("evicted")
        };
        assert!(note.message.contains("after 3 tries"), "{note:?}");
        // Old failures do not count.
        let old = [
            failed("a", "2026-12-03T00:10:00Z"),
            failed("b", "2026-12-03T00:11:00Z"),
            failed("c", "2026-12-03T00:12:00Z"),
        ];
        assert!(matches!(
            decide(&p, &old, target(), now()),
            Answer::Move { .. }
        ));
    }

    #[test]
    fn the_target_is_another_ready_schedulable_matching_node_with_the_fewest_pods() {
        let node = |name: &str, ready: bool, cordoned: bool, zone: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"zone": zone}},
                "spec": {"unschedulable": cordoned},
                "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
            .expect("node")
        };
        let nodes = [
            node("n0", true, false, "a"),
            node("n1", true, false, "a"),
            node("n2", true, false, "a"),
            node("n3", false, false, "a"),
            node("n4", true, true, "a"),
            node("n5", true, false, "b"),
        ];
        let load = BTreeMap::from([("n1".to_owned(), 4), ("n2".to_owned(), 1)]);
        let p = pod(json!({"spec": {"nodeSelector": {"zone": "a"}}}));
        assert_eq!(pick_target(&p, &nodes, &load, &[]).as_deref(), Some("n2"));
        assert_eq!(pick_target(&p, &nodes[..1], &load, &[]), None);
        // A node where a move of the Pod failed lately is passed over.
        assert_eq!(
            pick_target(&p, &nodes, &load, &["n2".into()]).as_deref(),
            Some("n1")
        );
        let failed_on = |name: &str, node: &str, at: &str| -> Migration {
            let mut m = mig(
                name,
                at,
                json!({"phase": "Failed", "reason": "RestoreFailed"}),
            );
            m.spec.target_node = Some(node.into());
            m
        };
        let tried = [
            failed_on("a", "n1", "2026-12-03T00:59:00Z"),
            failed_on("b", "n2", "2026-12-03T00:10:00Z"),
        ];
        assert_eq!(failed_targets(&tried, now()), ["n1"], "only lately");
        let Answer::Allow(Some(note)) = decide(&p, &tried[..1], None, now()) else {
            panic!("evicted")
        };
        assert!(
            note.message.contains("but n1, where its moves failed"),
            "{note:?}"
        );
    }
}
