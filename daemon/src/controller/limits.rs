//! How many moves run at once: at most `per_cluster` in the cluster and `per_node` in or
//! out of any node (KubeVirt's 5 and 2). A Migration over a limit waits in phase `Pending`
//! with reason `Queued` and its place; places are served first come, first served. Also
//! the completion timeout, which grows with the Pod's memory.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Pod, apimachinery::pkg::api::resource::Quantity, jiff::Timestamp,
};
use kube::ResourceExt;
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_SOURCE_NODE,
    v1alpha1::{Migration, MigrationPhase},
};

use super::pod::{annotation, is_deleting, is_migrate_on_delete_target, moved_in, node, phase};

/// The reason of a Migration waiting for a free place.
pub const REASON_QUEUED: &str = "Queued";

/// The controller's limits (flags `--max-moves`, `--max-moves-per-node`,
/// `--timeout-seconds-per-gib`; chart values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Moves at once in the whole cluster.
    pub per_cluster: usize,
    /// Moves at once into or out of one node.
    pub per_node: usize,
    /// A Migration's timeout is at least this many seconds per GiB of the Pod's memory
    /// (when the Migration does not say).
    pub timeout_seconds_per_gib: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_cluster: 5,
            per_node: 2,
            timeout_seconds_per_gib: 60,
        }
    }
}

/// One move under way: the nodes it loads (a target not bound yet loads none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    /// The node it leaves.
    pub source: Option<String>,
    /// The node it goes to.
    pub target: Option<String>,
}

/// The moves under way in the cluster: Migrations past `Pending` and not finished, and
/// migrate-on-delete moves (a target Pod made by a MigratingPod, not moved in yet).
pub fn busy(migrations: &[Migration], pods: &[Pod]) -> Vec<Busy> {
    let started = migrations.iter().filter_map(|m| {
        let s = m.status.as_ref()?;
        let p = s.phase?;
        (p != MigrationPhase::Pending && !p.is_terminal()).then(|| Busy {
            source: s.source_node.clone(),
            target: s.target_node.clone(),
        })
    });
    let on_delete = pods
        .iter()
        .filter(|p| {
            annotation(p, ANNOTATION_MIGRATE_FROM).is_some()
                && is_migrate_on_delete_target(p)
                && !moved_in(p)
                && !is_deleting(p)
                && !matches!(phase(p), "Failed" | "Succeeded")
        })
        .map(|p| Busy {
            source: annotation(p, ANNOTATION_SOURCE_NODE).map(str::to_owned),
            target: node(p),
        });
    started.chain(on_delete).collect()
}

/// Whether a Migration may start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// It may: a place is free for it.
    Start,
    /// It waits at `position` (1: next) for the limit `message` names.
    Queued {
        /// Its place among the waiting Migrations.
        position: u32,
        /// Which limit holds it, for the status.
        message: String,
    },
}

/// The order places are served in: by creation, then name.
fn queue_key(m: &Migration) -> (Option<Timestamp>, String) {
    (
        m.metadata.creation_timestamp.as_ref().map(|t| t.0),
        format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()),
    )
}

/// Migrations that wait for a place (passed every check, reason `Queued`).
pub fn is_queued(m: &Migration) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.phase == Some(MigrationPhase::Pending) && s.reason.as_deref() == Some(REASON_QUEUED)
    })
}

/// Decides whether `me` (moving a Pod off `source` to `target`, when known) starts, given
/// the moves under way and the Migrations queued in the cluster. The queue is served in
/// order: every Migration queued before `me` that would fit takes its place first, so a
/// later one never overtakes an earlier one that waits for the same node.
pub fn admit(
    me: &Migration,
    source: Option<&str>,
    target: Option<&str>,
    busy: &[Busy],
    queued: &[(Migration, Busy)],
    limits: &Limits,
) -> Admission {
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for b in busy {
        for n in [&b.source, &b.target].into_iter().flatten() {
            *load.entry(n).or_default() += 1;
        }
    }
    let mut running = busy.len();
    let fits = |load: &BTreeMap<&str, usize>, running: usize, b: &Busy| -> Result<(), String> {
        if running >= limits.per_cluster {
            return Err(format!(
                "{running} moves run in the cluster (at most {})",
                limits.per_cluster
            ));
        }
        for n in [&b.source, &b.target].into_iter().flatten() {
            let l = load.get(n.as_str()).copied().unwrap_or(0);
            if l >= limits.per_node {
                return Err(format!(
                    "{l} moves run in or out of node {n} (at most {} per node)",
                    limits.per_node
                ));
            }
        }
        Ok(())
    };
    let mine = Busy {
        source: source.map(str::to_owned),
        target: target.map(str::to_owned),
    };
    let my_key = queue_key(me);
    let mut earlier: Vec<&(Migration, Busy)> = queued
        .iter()
        .filter(|(m, _)| queue_key(m) < my_key)
        .collect();
    earlier.sort_by_key(|(m, _)| queue_key(m));
    for (_, b) in &earlier {
        if fits(&load, running, b).is_ok() {
            running += 1;
            for n in [&b.source, &b.target].into_iter().flatten() {
                *load.entry(n).or_default() += 1;
            }
        }
    }
    match fits(&load, running, &mine) {
        Ok(()) => Admission::Start,
        Err(why) => Admission::Queued {
            position: u32::try_from(earlier.len() + 1).unwrap_or(u32::MAX),
            message: format!("queued: {why}"),
        },
    }
}

/// The Pod's memory as its containers declare it (limit, else request), GiB.
pub fn memory_gib(pod: &Pod) -> f64 {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .filter_map(|c| {
                    let r = c.resources.as_ref()?;
                    let pick = |m: &Option<BTreeMap<String, Quantity>>| {
                        m.as_ref()
                            .and_then(|m| m.get("memory"))
                            .map(|q| super::pod::quantity(q, false))
                    };
                    pick(&r.limits).or_else(|| pick(&r.requests))
                })
                .sum::<f64>()
        })
        .unwrap_or(0.0)
        / (1024.0 * 1024.0 * 1024.0)
}

/// The completion timeout of Migration `m` of `pod`: its `timeoutSeconds`, or more for a
/// large Pod (seconds per GiB, the Migration's or the controller's default).
pub fn timeout_seconds(m: &Migration, pod: Option<&Pod>, limits: &Limits) -> u32 {
    let per_gib = m
        .spec
        .timeout_seconds_per_gib
        .unwrap_or(limits.timeout_seconds_per_gib);
    let scaled = pod.map_or(0.0, memory_gib) * f64::from(per_gib);
    m.spec
        .timeout_seconds
        .max(scaled.ceil().min(f64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mig(name: &str, created: &str, status: serde_json::Value) -> Migration {
        serde_json::from_value(
            json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": name, "namespace": "default", "creationTimestamp": created},
            "spec": {"podName": "p"}, "status": status}),
        )
        .expect("migration")
    }

    fn b(source: &str, target: Option<&str>) -> Busy {
        Busy {
            source: Some(source.into()),
            target: target.map(str::to_owned),
        }
    }

    #[test]
    fn moves_under_way_are_counted_by_phase_and_migrate_on_delete_targets() {
        let migrations = [
            mig("a", "2026-01-01T00:00:00Z", json!({"phase": "Pending"})),
            mig(
                "b",
                "2026-01-01T00:00:00Z",
                json!({"phase": "Transferring", "sourceNode": "n0", "targetNode": "n1"}),
            ),
            mig(
                "c",
                "2026-01-01T00:00:00Z",
                json!({"phase": "Succeeded", "sourceNode": "n0"}),
            ),
        ];
        let target = |name: &str, extra: serde_json::Value| -> Pod {
            let mut v = json!({"metadata": {"name": name, "annotations": {
                "podmig.dev/migrate-from": "uid", "podmig.dev/source-node": "n0"}},
                "spec": {"containers": [], "nodeName": "n2"}});
            json_merge(&mut v, extra);
            serde_json::from_value(v).expect("pod")
        };
        let pods = [
            target("w-1", json!({})),
            target(
                "w-2",
                json!({"metadata": {"annotations": {"podmig.dev/migration-id": "mig-x"}}}),
            ),
            target("w-3", json!({"status": {"phase": "Failed"}})),
            serde_json::from_value(json!({"metadata": {"name": "plain"}})).expect("pod"),
        ];
        assert_eq!(
            busy(&migrations, &pods),
            vec![b("n0", Some("n1")), b("n0", Some("n2"))]
        );
    }

    fn json_merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    json_merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn a_move_waits_for_its_node_and_the_cluster_and_keeps_its_place() {
        let limits = Limits::default();
        let me = mig("me", "2026-01-01T00:00:10Z", json!({"phase": "Pending"}));
        // Two moves leave n0 already: a third waits, at place 1.
        let two_out = [b("n0", Some("n1")), b("n0", Some("n2"))];
        assert_eq!(
            admit(&me, Some("n0"), None, &two_out, &[], &limits),
            Admission::Queued {
                position: 1,
                message: "queued: 2 moves run in or out of node n0 (at most 2 per node)".into()
            }
        );
        // Moves into the target count as well.
        assert!(matches!(
            admit(
                &me,
                Some("n5"),
                Some("n1"),
                &[b("n0", Some("n1")), b("n3", Some("n1"))],
                &[],
                &limits
            ),
            Admission::Queued { .. }
        ));
        assert_eq!(
            admit(&me, Some("n5"), Some("n6"), &two_out, &[], &limits),
            Admission::Start
        );
        // Five in the cluster: nothing more starts.
        let five: Vec<Busy> = (0..5).map(|i| b(&format!("s{i}"), None)).collect();
        assert!(matches!(
            admit(&me, Some("n9"), None, &five, &[], &limits),
            Admission::Queued { message, .. } if message.contains("5 moves run in the cluster")
        ));
        // One place left on n0, and an earlier queued move wants it: it goes first.
        let earlier = mig(
            "early",
            "2026-01-01T00:00:05Z",
            json!({"phase": "Pending", "reason": "Queued"}),
        );
        let later = mig(
            "late",
            "2026-01-01T00:00:20Z",
            json!({"phase": "Pending", "reason": "Queued"}),
        );
        let queue = [(earlier, b("n0", None)), (later, b("n0", None))];
        let one_out = [b("n0", Some("n1"))];
        assert_eq!(
            admit(&me, Some("n0"), None, &one_out, &queue, &limits),
            Admission::Queued {
                position: 2,
                message: "queued: 2 moves run in or out of node n0 (at most 2 per node)".into()
            }
        );
        // An earlier one that waits for another node takes nothing from this one.
        assert_eq!(
            admit(&me, Some("n7"), None, &one_out, &queue, &limits),
            Admission::Start
        );
    }

    #[test]
    fn the_timeout_grows_with_the_pods_memory() {
        let limits = Limits::default();
        let pod = |mem: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "a", "resources": {"limits": {"memory": mem}}},
                {"name": "b", "resources": {"requests": {"memory": "1Gi"}}}]}}))
            .expect("pod")
        };
        let m = mig("m", "2026-01-01T00:00:00Z", json!({}));
        assert_eq!(m.spec.timeout_seconds, 300);
        assert_eq!(timeout_seconds(&m, Some(&pod("512Mi")), &limits), 300);
        // 9 GiB at 60 s per GiB.
        assert_eq!(timeout_seconds(&m, Some(&pod("8Gi")), &limits), 540);
        let mut own = m.clone();
        own.spec.timeout_seconds_per_gib = Some(100);
        assert_eq!(timeout_seconds(&own, Some(&pod("3G")), &limits), 380);
        assert_eq!(timeout_seconds(&m, None, &limits), 300);
    }
}
