//! podmig's API: the `MigratingPod` and `Migration` resources (`podmig.dev/v1alpha1`),
//! their status types, the contract between node daemons and the controller, and the
//! well-known names every component shares. Types only, no I/O.

pub mod v1alpha1;

/// API group of podmig's resources.
pub const GROUP: &str = "podmig.dev";

/// Finalizer on a Pod meaning "deleting me means migrating me".
pub const MIGRATE_FINALIZER: &str = "podmig.dev/migrate";

/// Runtime handler (and RuntimeClass name) whose containers run through `podmig-runc`.
pub const RUNTIME_HANDLER: &str = "podmig";

/// Prefix of every podmig annotation; containerd passes Pod annotations with it to the OCI spec
/// (`pod_annotations = ["podmig.dev/*"]`).
pub const ANNOTATION_PREFIX: &str = "podmig.dev/";

/// Pod annotation on a migration target: uid of the Pod whose containers it restores.
pub const ANNOTATION_MIGRATE_FROM: &str = "podmig.dev/migrate-from";

/// Pod annotation on a migration target: node the source Pod runs on.
pub const ANNOTATION_SOURCE_NODE: &str = "podmig.dev/source-node";

/// Pod annotation on a migration target: id of the migration that created it.
pub const ANNOTATION_MIGRATION_ID: &str = "podmig.dev/migration-id";

/// Finalizer on a MigratingPod: its Pods' finalizers are released before it goes.
pub const CLEANUP_FINALIZER: &str = "podmig.dev/cleanup";

/// Label on Pods of a MigratingPod: its name.
pub const LABEL_MIGRATING_POD: &str = "podmig.dev/migratingpod";

/// Target-Pod annotation the node daemons write: the phase of the move they run
/// (`Checkpointing`, `Transferring`, `Restoring`, `Restored`, `Failed`).
pub const ANNOTATION_MIGRATION_PHASE: &str = "podmig.dev/migration-phase";

/// Target-Pod annotation a target's node daemon writes as soon as its (full) restore
/// worked, before it tells the source: a source that cannot be told reads it at its
/// deadline as `Restored` (the phase itself, with the move's figures, follows at its end).
pub const ANNOTATION_RESTORED: &str = "podmig.dev/restored";

/// Target-Pod annotation the node daemons write when the move ended: a JSON
/// [`v1alpha1::MigrationReport`].
pub const ANNOTATION_MIGRATION_REPORT: &str = "podmig.dev/migration-report";

/// The permission of the daemons' peer endpoints (hand-over, verdict, page tunnel):
/// `create` on the subresource `nodes/handover` of the node whose daemon is called. Only
/// the node daemons' role holds it; people and schedulers move Pods with
/// `create pods/migrate`. (`kubectl auth can-i create nodes --subresource handover`.)
pub const PEER_SUBRESOURCE: &str = "handover";

/// The user-info extra key under which a token bound to a Pod names that Pod's node
/// (Kubernetes 1.30+, `ServiceAccountTokenPodNodeInfo`): a daemon Pod's node identity.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Annotations containerd's CRI plugin writes into every OCI spec it generates.
pub mod cri {
    /// `sandbox` for the pause container, `container` for application containers.
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    /// Value of [`CONTAINER_TYPE`] for sandbox (pause) containers.
    pub const CONTAINER_TYPE_SANDBOX: &str = "sandbox";
    /// Id of the sandbox the container belongs to.
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    /// Name of the Pod.
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    /// Namespace of the Pod.
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    /// Uid of the Pod (containerd 1.7 and later).
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    /// Log directory of the Pod; kubelet names it `<namespace>_<name>_<uid>`.
    pub const SANDBOX_LOG_DIRECTORY: &str = "io.kubernetes.cri.sandbox-log-directory";
    /// Name of the container within its Pod.
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
}

pub mod contract;
pub mod nodeapi;

/// Reason on the container statuses of a Pod whose containers were moved to another Pod.
pub const REASON_MIGRATED: &str = "Migrated";

/// Pod annotation naming the Migration that claimed the Pod (written with optimistic
/// concurrency, so exactly one Migration of a Pod proceeds).
pub const ANNOTATION_CLAIMED_BY: &str = "podmig.dev/claimed-by";

/// Pod (template) annotation: comma-separated names of node-local volumes (`hostPath`)
/// that exist with the same content on every node, so the Pod may move anyway.
pub const ANNOTATION_VOLUMES_ON_EVERY_NODE: &str = "podmig.dev/volumes-on-every-node";

/// Target-Pod annotation set by the controller: when the move is given up (RFC 3339). The
/// node daemons bound their waits by it (the target's create, the source's handover).
pub const ANNOTATION_MIGRATION_DEADLINE: &str = "podmig.dev/migration-deadline";

/// The `podmig.dev/*` annotations a user may put on a Pod template: options. Every other
/// `podmig.dev/` annotation is podmig's own, and the controller never copies one from a
/// user's object into a Pod it makes.
pub const USER_ANNOTATIONS: &[&str] = &[ANNOTATION_VOLUMES_ON_EVERY_NODE, ANNOTATION_ON_EVICTION];

/// Pod annotation (a user's option): what an eviction of the Pod does. `migrate` or
/// `migrate-or-evict`: podmig moves it first, and lets the eviction through when it cannot;
/// `migrate-only`: podmig moves it or the eviction is refused; `evict`: a plain eviction.
/// A MigratingPod's Pods default to `migrate-or-evict`; other Pods to `evict`.
pub const ANNOTATION_ON_EVICTION: &str = "podmig.dev/on-eviction";

/// Migration annotation: the eviction that started it (`<user>`), set by the eviction
/// webhook; later evictions of the Pod read the outcome of such Migrations.
pub const ANNOTATION_STARTED_BY_EVICTION: &str = "podmig.dev/started-by-eviction";

/// Migration annotation asking the controller to give the move up (`kubectl podmig
/// cancel`; its value says who asked): a queued move ends, one under way rolls back (the
/// target goes, the source keeps running). A move that has succeeded stays done.
pub const ANNOTATION_CANCEL: &str = "podmig.dev/cancel";

/// MigratingPod annotation set by the eviction webhook when it adopts a bare Pod: that
/// Pod's name. The MigratingPod makes no Pod of its own while it waits for that one.
pub const ANNOTATION_ADOPTS: &str = "podmig.dev/adopts";

/// True for a `podmig.dev/*` annotation only podmig itself may set.
pub fn is_podmig_owned(key: &str) -> bool {
    key.starts_with(ANNOTATION_PREFIX) && !USER_ANNOTATIONS.contains(&key)
}

/// Target-Pod annotation set by the controller from the move's `strategy` (absent: `full`).
pub const ANNOTATION_MIGRATION_STRATEGY: &str = "podmig.dev/migration-strategy";

/// Target-Pod annotation set by the controller when the move keeps the Pod's address: the
/// source Pod's IP, which podmig's CNI plugin gives the target's sandbox once it has
/// checked the move's record (a Pod cannot claim another's address by annotating itself).
pub const ANNOTATION_POD_IP: &str = "podmig.dev/pod-ip";

/// The `proto` of the /32 route by which a node announces a Pod address it took over in a
/// move (`ip route ... proto 211`): what carries routes between nodes picks it up.
pub const KEPT_IP_ROUTE_PROTO: &str = "211";

/// Target-Pod annotation set by the controller for `strategy: auto`: the move's
/// `maxDowntimeMs`.
pub const ANNOTATION_MAX_DOWNTIME: &str = "podmig.dev/max-downtime-ms";

/// The value of a resource quantity: millicores for CPU (`cpu`: `500m`, `2`), bytes
/// otherwise (`512Mi`, `1Gi`, `3G`, `1000`); 0 when unreadable. What the scheduler and
/// podmig's limits count Pods' requests and limits in.
pub fn quantity(q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity, cpu: bool) -> f64 {
    let s = q.0.trim();
    if cpu {
        return match s.strip_suffix('m') {
            Some(m) => m.parse().unwrap_or(0.0),
            None => s.parse::<f64>().map(|c| c * 1000.0).unwrap_or(0.0),
        };
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().unwrap_or(0.0);
    n * match unit {
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => 1.0,
    }
}
