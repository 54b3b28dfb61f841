//! Pod helpers both controllers share: names and their indices, readiness, the podmig
//! annotations a target carries, and who owns a move.

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::ResourceExt;
use podmig_api::{
    ANNOTATION_MIGRATION_ID, ANNOTATION_MIGRATION_PHASE, ANNOTATION_MIGRATION_REPORT,
    MIGRATE_FINALIZER, contract::DaemonPhase, v1alpha1::MigrationReport,
};

/// What the controller learned of a Pod's PersistentVolumeClaims that limits where the
/// Pod can move.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalClaims {
    /// Claims bound to node-local PersistentVolumes (`local` or `hostPath`), with a
    /// description of the volume: their data stays on one node.
    pub node_local: std::collections::BTreeMap<String, String>,
    /// Claims attachable to one node only (`ReadWriteOnce`) or one Pod only
    /// (`ReadWriteOncePod`), with that mode: the source holds them until it is released,
    /// after the target runs, so the target cannot attach them elsewhere.
    pub single_node: std::collections::BTreeMap<String, String>,
}

impl LocalClaims {
    /// No claim limits the move.
    pub const NONE: LocalClaims = LocalClaims {
        node_local: std::collections::BTreeMap::new(),
        single_node: std::collections::BTreeMap::new(),
    };
}

/// The Pod's volumes whose claims attach to a single node or Pod, each as
/// `"name" (claim c: ReadWriteOnce)`, with whether any is `ReadWriteOncePod` (which a
/// second Pod cannot use even on the same node).
pub fn single_node_volumes(
    spec: Option<&k8s_openapi::api::core::v1::PodSpec>,
    claims: &LocalClaims,
) -> (Vec<String>, bool) {
    let mut per_pod = false;
    let names = spec
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let claim = &v.persistent_volume_claim.as_ref()?.claim_name;
            let mode = claims.single_node.get(claim)?;
            per_pod |= mode == "ReadWriteOncePod";
            Some(format!("{:?} (claim {claim}: {mode})", v.name))
        })
        .collect();
    (names, per_pod)
}

/// Why a Pod in its own user namespace (`hostUsers: false`) cannot move: CRIU 4.2
/// restores processes only into a user namespace it creates itself, never into the target
/// Pod's, whose network namespace the restore must join (checkpoint-restore/criu issue
/// 2651; containerd's sandbox owns both). Found before anything freezes.
pub const USERNS_UNMOVABLE: &str = "it runs in its own user namespace (hostUsers: false), and CRIU 4.2 cannot restore processes into the target Pod's user namespace (checkpoint-restore/criu issue 2651); with hostUsers left true it can move";

/// What in a Pod's spec no move can carry, if anything (see [`USERNS_UNMOVABLE`]).
pub fn unmovable_spec(spec: Option<&k8s_openapi::api::core::v1::PodSpec>) -> Option<&'static str> {
    (spec?.host_users == Some(false)).then_some(USERNS_UNMOVABLE)
}

/// The volumes that tie a Pod to its node — `hostPath` volumes and claims of node-local
/// PersistentVolumes (`claims`) — unless its `podmig.dev/volumes-on-every-node`
/// annotation names them: such a Pod cannot move, its data would stay behind. Each as
/// `"name" (hostPath /path)` or `"name" (claim c: local PersistentVolume pv at /path)`.
pub fn node_local_volumes(
    spec: Option<&k8s_openapi::api::core::v1::PodSpec>,
    annotations: &std::collections::BTreeMap<String, String>,
    claims: &LocalClaims,
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
            if let Some(h) = &v.host_path {
                return Some(format!("{:?} (hostPath {})", v.name, h.path));
            }
            let claim = &v.persistent_volume_claim.as_ref()?.claim_name;
            claims
                .node_local
                .get(claim)
                .map(|pv| format!("{:?} (claim {claim}: {pv})", v.name))
        })
        .collect()
}

/// What makes PersistentVolume `pv` node-local, if anything: a `local` or `hostPath`
/// source.
pub fn local_volume_source(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> Option<String> {
    let spec = pv.spec.as_ref()?;
    let name = pv.name_any();
    if let Some(l) = &spec.local {
        return Some(format!("local PersistentVolume {name} at {}", l.path));
    }
    spec.host_path
        .as_ref()
        .map(|h| format!("hostPath PersistentVolume {name} at {}", h.path))
}

/// Looks up which of the claims the Pods' specs use are bound to node-local volumes.
pub async fn local_claims<'a>(
    client: &kube::Client,
    namespace: &str,
    specs: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::PodSpec>,
) -> Result<LocalClaims, kube::Error> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let names: std::collections::BTreeSet<String> = specs
        .into_iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect();
    let pvcs: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(client.clone(), namespace);
    let pvs: kube::Api<PersistentVolume> = kube::Api::all(client.clone());
    let mut out = LocalClaims::default();
    for name in names {
        let Some(spec) = pvcs.get_opt(&name).await?.and_then(|c| c.spec) else {
            continue;
        };
        let modes = spec.access_modes.clone().unwrap_or_default();
        let shared = modes
            .iter()
            .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany");
        if let Some(mode) = modes
            .iter()
            .find(|m| *m == "ReadWriteOncePod")
            .or_else(|| modes.iter().find(|m| *m == "ReadWriteOnce"))
            .filter(|_| !shared)
        {
            out.single_node.insert(name.clone(), mode.clone());
        }
        let Some(volume) = spec.volume_name.filter(|v| !v.is_empty()) else {
            continue;
        };
        if let Some(why) = pvs
            .get_opt(&volume)
            .await?
            .as_ref()
            .and_then(local_volume_source)
        {
            out.node_local.insert(name, why);
        }
    }
    Ok(out)
}

/// Index `n` of a Pod named `<mpod>-<n>`.
pub fn pod_index(mpod: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(mpod)?.strip_prefix('-')?.parse().ok()
}

/// How a move is to be made, as its MigratingPod or Migration asks.
#[derive(Debug, Clone, Copy)]
pub struct MoveAsked {
    /// When the move was asked for (its deadline counts from here).
    pub start: Timestamp,
    /// Its time limit.
    pub timeout_seconds: u32,
    /// How its state is carried.
    pub strategy: podmig_api::v1alpha1::Strategy,
    /// `auto`'s downtime budget.
    pub max_downtime_ms: u32,
    /// `keepIP` (unset: keep where the network can).
    pub keep_ip: Option<bool>,
}

/// Writes what a target Pod's daemons need to know of its move into its annotations: the
/// deadline (`timeout_seconds` after `start`), the strategy (absent: `full`) with, for
/// `auto`, the downtime budget, and the source's address to keep (unless `keepIP: false`
/// or the source has none).
pub fn annotate_move(
    annotations: &mut std::collections::BTreeMap<String, String>,
    asked: MoveAsked,
    source: &Pod,
) {
    use podmig_api::v1alpha1::Strategy;
    let MoveAsked {
        start,
        timeout_seconds,
        strategy,
        max_downtime_ms,
        keep_ip,
    } = asked;
    annotations.insert(
        podmig_api::ANNOTATION_MIGRATION_DEADLINE.into(),
        deadline(start, timeout_seconds),
    );
    let source_ip = source
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    match source_ip {
        Some(ip) if keep_ip != Some(false) => {
            annotations.insert(podmig_api::ANNOTATION_POD_IP.into(), ip.to_owned());
        }
        _ => {
            annotations.remove(podmig_api::ANNOTATION_POD_IP);
        }
    }
    if strategy != Strategy::Full {
        annotations.insert(
            podmig_api::ANNOTATION_MIGRATION_STRATEGY.into(),
            strategy.as_str().into(),
        );
        if strategy == Strategy::Auto {
            annotations.insert(
                podmig_api::ANNOTATION_MAX_DOWNTIME.into(),
                max_downtime_ms.to_string(),
            );
        }
    }
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

pub use podmig_api::quantity;

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

/// A target Pod whose move is done: Ready, and for a lazy move also every page arrived
/// (the daemon reported `Restored`; until then the source still serves memory). Any other
/// Pod: Ready.
pub fn moved_in(p: &Pod) -> bool {
    let lazy = annotation(p, podmig_api::ANNOTATION_MIGRATION_STRATEGY)
        .and_then(podmig_api::v1alpha1::Strategy::parse)
        .is_some_and(podmig_api::v1alpha1::Strategy::may_be_lazy);
    is_ready(p) && (!lazy || reported_phase(p) == Some(DaemonPhase::Restored))
}

/// What a finished move's report says in an Event: the frozen time and, for
/// `strategy: auto`, what it chose against what it estimated.
pub fn figures(report: Option<&podmig_api::v1alpha1::MigrationReport>) -> String {
    let Some(r) = report else {
        return String::new();
    };
    let chose = match (r.strategy, r.estimated_frozen_ms) {
        (Some(s), e) if e > 0 => format!(
            "; auto chose {} (a full move estimated at {e} ms frozen)",
            s.as_str()
        ),
        _ => String::new(),
    };
    format!(", frozen {} ms{chose}", r.frozen_ms)
}

/// When a Pod's deletion was asked for. NB: `deletionTimestamp` is when the grace
/// period *ends* (request time + `deletionGracePeriodSeconds`), not the request.
pub fn deletion_requested_at(p: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    let at = p.metadata.deletion_timestamp.as_ref()?.0;
    let grace = p.metadata.deletion_grace_period_seconds.unwrap_or(0);
    Some(at - k8s_openapi::jiff::SignedDuration::from_secs(grace))
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
    fn a_target_asks_for_its_sources_address_unless_keep_ip_is_false() {
        let source: Pod = serde_json::from_value(
            json!({"metadata": {"name": "s-0"}, "status": {"podIP": "10.1.1.5"}}),
        )
        .expect("pod");
        let asked = |keep_ip, source: &Pod| {
            let mut a = std::collections::BTreeMap::from([(
                podmig_api::ANNOTATION_POD_IP.to_owned(),
                "stale".to_owned(),
            )]);
            annotate_move(
                &mut a,
                MoveAsked {
                    start: Timestamp::UNIX_EPOCH,
                    timeout_seconds: 60,
                    strategy: podmig_api::v1alpha1::Strategy::Full,
                    max_downtime_ms: 1000,
                    keep_ip,
                },
                source,
            );
            a.get(podmig_api::ANNOTATION_POD_IP).cloned()
        };
        assert_eq!(asked(None, &source).as_deref(), Some("10.1.1.5"));
        assert_eq!(asked(Some(true), &source).as_deref(), Some("10.1.1.5"));
        // An annotation copied from an earlier move never survives.
        assert_eq!(asked(Some(false), &source), None);
        assert_eq!(asked(None, &pod("no-address")), None);
    }

    #[test]
    fn an_events_figures_say_what_auto_chose_against_its_estimate() {
        use podmig_api::v1alpha1::{MigrationReport, Strategy};
        assert_eq!(figures(None), "");
        let full = MigrationReport {
            frozen_ms: 412,
            ..Default::default()
        };
        assert_eq!(figures(Some(&full)), ", frozen 412 ms");
        let auto = MigrationReport {
            frozen_ms: 530,
            strategy: Some(Strategy::Lazy),
            estimated_frozen_ms: 5077,
            ..Default::default()
        };
        assert_eq!(
            figures(Some(&auto)),
            ", frozen 530 ms; auto chose lazy (a full move estimated at 5077 ms frozen)"
        );
    }

    #[test]
    fn a_deletion_was_asked_for_a_grace_period_before_its_timestamp() {
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "a",
            "deletionTimestamp": "2026-12-02T15:14:02Z", "deletionGracePeriodSeconds": 10}}))
        .expect("pod");
        assert_eq!(
            deletion_requested_at(&p).map(|t| t.to_string()),
            Some("2026-12-02T15:13:52Z".to_owned())
        );
        assert_eq!(deletion_requested_at(&pod("b")), None);
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
