//! Pod helpers both controllers share: names and their indices, readiness, the podmig
//! annotations a target carries, and who owns a move.

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;
use podmig_api::{
    ANNOTATION_MIGRATION_ID, ANNOTATION_MIGRATION_PHASE, ANNOTATION_MIGRATION_REPORT,
    MIGRATE_FINALIZER, contract::DaemonPhase, v1alpha1::MigrationReport,
};

/// The volumes that tie a Pod to its node (`hostPath`), unless its
/// `podmig.dev/volumes-on-every-node` annotation names them: such a Pod cannot move, its
/// data would stay behind. Each as `"name" (hostPath /path)`.
pub fn node_local_volumes(
    spec: Option<&k8s_openapi::api::core::v1::PodSpec>,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let everywhere: Vec<&str> = annotations
        .get(podmig_api::ANNOTATION_VOLUMES_ON_EVERY_NODE)
        .map(|v| v.split(',').map(str::trim).collect())
        .unwrap_or_default();
    spec.and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter(|v| !everywhere.contains(&v.name.as_str()))
        .filter_map(|v| {
            v.host_path
                .as_ref()
                .map(|h| format!("{:?} (hostPath {})", v.name, h.path))
        })
        .collect()
}

/// Index `n` of a Pod named `<mpod>-<n>`.
pub fn pod_index(mpod: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(mpod)?.strip_prefix('-')?.parse().ok()
}

/// The next unused index of MigratingPod `mpod`'s Pods: above every Pod that exists, the
/// active one and the last index the MigratingPod recorded — so no name is ever reused.
pub fn next_index<'a>(
    mpod: &str,
    pods: impl IntoIterator<Item = &'a Pod>,
    active: Option<&str>,
    recorded: Option<u32>,
) -> u32 {
    pods.into_iter()
        .filter_map(|p| pod_index(mpod, &p.name_any()))
        .chain(active.and_then(|a| pod_index(mpod, a)))
        .chain(recorded)
        .max()
        .map_or(0, |i| i + 1)
}

/// The Pod's phase (`Pending` when none is reported yet).
pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Running and Ready.
pub fn is_ready(p: &Pod) -> bool {
    phase(p) == "Running"
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Being deleted.
pub fn is_deleting(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_some()
}

/// Carries the `podmig.dev/migrate` finalizer.
pub fn has_finalizer(p: &Pod) -> bool {
    p.finalizers().iter().any(|f| f == MIGRATE_FINALIZER)
}

/// The node it is bound to.
pub fn node(p: &Pod) -> Option<String> {
    p.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// One of its annotations.
pub fn annotation<'a>(p: &'a Pod, key: &str) -> Option<&'a str> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The phase the node daemons reported on a target.
pub fn reported_phase(p: &Pod) -> Option<DaemonPhase> {
    annotation(p, ANNOTATION_MIGRATION_PHASE).and_then(DaemonPhase::parse)
}

/// The figures the node daemons reported on a target.
pub fn reported(p: &Pod) -> Option<MigrationReport> {
    annotation(p, ANNOTATION_MIGRATION_REPORT).and_then(|r| serde_json::from_str(r).ok())
}

/// True when target `p` belongs to a migrate-on-delete move of its MigratingPod (whose
/// id is the target's own name), false when a `Migration` created it.
pub fn is_migrate_on_delete_target(p: &Pod) -> bool {
    annotation(p, ANNOTATION_MIGRATION_ID).is_none_or(|id| id == p.name_any())
}

/// The deadline annotation value of a move that started at `start` with `timeout_s`.
pub fn deadline(start: Timestamp, timeout_s: u32) -> String {
    (start + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(timeout_s))).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("pod")
    }

    #[test]
    fn indices_never_repeat() {
        let pods = [pod("x-0"), pod("x-3"), pod("other-9")];
        assert_eq!(next_index("x", &pods, None, None), 4);
        assert_eq!(next_index("x", &pods, Some("x-5"), None), 6);
        // A target that was rolled back and deleted is remembered by the recorded index.
        assert_eq!(next_index("x", &pods[..1], None, Some(1)), 2);
        assert_eq!(next_index("x", [], None, None), 0);
        assert_eq!(pod_index("x", "x-y-1"), None);
    }

    #[test]
    fn a_migrations_target_is_not_a_migrate_on_delete_target() {
        let mut p = pod("x-1");
        assert!(is_migrate_on_delete_target(&p));
        p.metadata.annotations =
            Some([(ANNOTATION_MIGRATION_ID.to_owned(), "x-1".to_owned())].into());
        assert!(is_migrate_on_delete_target(&p));
        p.metadata.annotations =
            Some([(ANNOTATION_MIGRATION_ID.to_owned(), "move-1".to_owned())].into());
        assert!(!is_migrate_on_delete_target(&p));
    }
}
