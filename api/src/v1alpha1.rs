//! `podmig.dev/v1alpha1`: MigratingPod (a one-replica workload whose Pod may move) and
//! Migration (a one-shot request to move one Pod now).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::PodTemplateSpec,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a Pod's state is carried to its new place.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// `full` when the full move is estimated to stay within `maxDowntimeMs` frozen,
    /// else `lazy` where possible, else `full` with an Event saying by how much the
    /// budget will be exceeded. The default.
    #[default]
    Auto,
    /// Freeze, dump every container, carry the images, restore (thesis §4.5).
    Full,
    /// Post-copy: dump all but the memory pages, resume on the target at once and fault
    /// the pages in from the source afterwards; the move ends when every page arrived.
    /// Refused before the freeze where a node cannot do it.
    Lazy,
    /// `lazy` where both nodes can do it (a single-container Pod across nodes), else `full`.
    #[serde(rename = "lazy-or-full")]
    LazyOrFull,
    /// Pre-copy: iterative dumps while running, short final freeze (not implemented yet).
    Precopy,
}

impl Strategy {
    /// The name used in specs and annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::Full => "full",
            Strategy::Lazy => "lazy",
            Strategy::LazyOrFull => "lazy-or-full",
            Strategy::Precopy => "precopy",
        }
    }

    /// Reads [`Strategy::as_str`]'s names back.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Strategy::Auto,
            Strategy::Full,
            Strategy::Lazy,
            Strategy::LazyOrFull,
            Strategy::Precopy,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether the move should serve memory lazily where it can.
    pub fn wants_lazy(self) -> bool {
        matches!(self, Strategy::Lazy | Strategy::LazyOrFull)
    }

    /// Whether the move may turn out lazy (its target is done only once every page
    /// arrived): `lazy`, `lazy-or-full`, and `auto`, which chooses at the source.
    pub fn may_be_lazy(self) -> bool {
        self.wants_lazy() || self == Strategy::Auto
    }
}

fn default_timeout() -> u32 {
    300
}

/// How many targets a migrate-on-delete tries, each on another node, when none is given.
pub const DEFAULT_MOVE_ATTEMPTS: u32 = 3;

fn default_move_attempts() -> u32 {
    DEFAULT_MOVE_ATTEMPTS
}

/// The downtime budget of `strategy: auto` when none is given, ms.
pub const DEFAULT_MAX_DOWNTIME_MS: u32 = 1000;

fn default_max_downtime() -> u32 {
    DEFAULT_MAX_DOWNTIME_MS
}

/// A workload like a one-replica ReplicaSet whose Pod is moved, not restarted, when it is
/// deleted (drain, eviction) or when a Migration asks for it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "podmig.dev",
    version = "v1alpha1",
    kind = "MigratingPod",
    namespaced,
    shortname = "mpod",
    category = "podmig",
    status = "MigratingPodStatus",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Active Pod","type":"string","jsonPath":".status.activePod"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MigratingPodSpec {
    /// The Pod to run (its init containers run once; a moved Pod does not repeat them).
    pub template: PodTemplateSpec,
    /// How moves carry the Pod's state.
    #[serde(default)]
    pub strategy: Strategy,
    /// `strategy: auto`: the longest the Pod may stay frozen, ms; a full move estimated
    /// above it moves lazily instead.
    #[serde(default = "default_max_downtime")]
    #[schemars(range(min = 1))]
    pub max_downtime_ms: u32,
    /// Placement hint for the Pod and its moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// How long a migrate-on-delete may take before the source is let go and a fresh Pod
    /// is started instead.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1))]
    pub migration_timeout_seconds: u32,
    /// How many targets a migrate-on-delete tries before the state is given up: a target
    /// that fails is followed by another on a node not tried yet (the source stays frozen
    /// in its held kill meanwhile, running), all within `migrationTimeoutSeconds`.
    #[serde(default = "default_move_attempts")]
    #[schemars(range(min = 1))]
    pub move_attempts: u32,
    /// Moves keep the Pod's IP address (and its established TCP connections) where the
    /// target node's network can take the address over; unset: wherever it can. `false`:
    /// the target gets a new address and connections are closed.
    #[serde(default, rename = "keepIP", skip_serializing_if = "Option::is_none")]
    pub keep_ip: Option<bool>,
}

/// Where a MigratingPod is in its life (thesis fig. 5.4, plus Failed).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigratingPodState {
    /// Its Pod is being created.
    Creating,
    /// Its Pod runs.
    Running,
    /// Its Pod is being deleted; the target Pod is being created.
    MigrationPending,
    /// Source and target exist; the state is moving.
    Migrating,
    /// The last move failed or was given up (a fresh Pod is started).
    Failed,
    /// The object cannot be acted on (see the Ready condition).
    Invalid,
}

/// Observed state of a MigratingPod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigratingPodStatus {
    /// Lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<MigratingPodState>,
    /// Name of the Pod that serves now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_pod: Option<String>,
    /// Node of the active Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Index `n` of the newest Pod `<name>-<n>` created; names are never reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pod_index: Option<u32>,
    /// Conditions (`Ready`, `Migrating`), per the API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_migration: Option<MigrationRecord>,
    /// Failed moves of the Pod being deleted now, oldest first: the next target avoids
    /// their nodes. Cleared when a move succeeds or a fresh Pod is started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_attempts: Vec<MigrationRecord>,
    /// The target Pod podmig's controller made for the newest move. Node daemons act on a
    /// migration target only when it matches this record (written through the status
    /// subresource, which users of the MigratingPod cannot write).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_target: Option<MoveTarget>,
}

/// A target Pod made by podmig's controller, as recorded right after its creation: the
/// proof a node daemon asks for before it hands over or restores any memory.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveTarget {
    /// The move's id (the Migration's name, or the target Pod's name for migrate-on-delete).
    pub migration_id: String,
    /// The Pod being moved.
    pub source_pod: String,
    /// Its uid.
    pub source_pod_uid: String,
    /// The node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// The target Pod.
    pub target_pod: String,
    /// Its uid, as the API server assigned it at creation.
    pub target_pod_uid: String,
}

/// How a move ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Outcome {
    /// The target runs with the source's state.
    Succeeded,
    /// The move failed; the source keeps or resumes running where it could.
    Failed,
    /// The move did not finish in time; the source was let go and a fresh Pod started.
    GivenUp,
}

/// The record of one move.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    /// Source Pod.
    pub source_pod: String,
    /// Target Pod.
    pub target_pod: String,
    /// Source node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Target node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// When the move started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Outcome (None while running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Figures the node daemons reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReport>,
    /// Why it ended so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the node daemons report about a move (annotation
/// [`crate::ANNOTATION_MIGRATION_REPORT`] on the target Pod, JSON).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReport {
    /// CRIU's preflight on the source before the freeze, ms (its dump stopped at the first
    /// task's memory: what CRIU cannot dump is refused before anything freezes).
    #[serde(default)]
    pub preflight_ms: u64,
    /// Dump of the source, ms.
    #[serde(default)]
    pub checkpoint_ms: u64,
    /// Carrying the images, ms.
    #[serde(default)]
    pub transfer_ms: u64,
    /// Restore on the target, ms.
    #[serde(default)]
    pub restore_ms: u64,
    /// From the freeze of the source to the resume of the target, ms.
    #[serde(default)]
    pub frozen_ms: u64,
    /// Bytes of state moved.
    #[serde(default)]
    pub bytes: u64,
    /// Of those, the file-system state: the writable layer's changes and the Pod's
    /// `emptyDir`/`/dev/shm` volumes.
    #[serde(default)]
    pub filesystem_bytes: u64,
    /// Time spent capturing that file-system state while frozen, ms.
    #[serde(default)]
    pub filesystem_ms: u64,
    /// Full moves across nodes: bytes of memory pages that went to the target while the
    /// source dumped (page streams), so `checkpointMs` includes carrying them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streamed_bytes: u64,
    /// Per container of a multi-container Pod (all frozen together, restored one by one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<ContainerFigures>,
    /// The strategy the move ran with (`lazy-or-full` and `auto` resolve to one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// `strategy: auto`: the full move's frozen time the source estimated before it
    /// chose, ms (compare `frozenMs`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub estimated_frozen_ms: u64,
    /// `strategy: auto`: why it chose what it chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_reason: Option<String>,
    /// Lazy moves: from the target's resume until every page had arrived, ms (the
    /// degraded window, in which the app waits for each page it touches first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages_ms: u64,
    /// Lazy moves: pages the app faulted in on demand during that window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages_faulted: u64,
    /// Lazy moves: pages pushed in the background before the app touched them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pages_pushed: u64,
    /// How long CRIU itself ran in the source's dump (from its log), ms: of
    /// `checkpointMs`, the rest is runc and podmig.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub criu_dump_ms: u64,
    /// How long CRIU itself ran in the target's restore (from its log), ms: of
    /// `restoreMs`, the rest is runc and podmig.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub criu_restore_ms: u64,
    /// Failure reason, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One container's share of a move.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerFigures {
    /// Container name.
    pub name: String,
    /// Bytes of its checkpoint.
    #[serde(default)]
    pub bytes: u64,
    /// Its restore, ms.
    #[serde(default)]
    pub restore_ms: u64,
}

/// A one-shot request to move one Pod of a MigratingPod now, without deleting it first:
/// the source serves until the freeze and a failure rolls back (thesis §7.2.5).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "podmig.dev",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    shortname = "mig",
    category = "podmig",
    status = "MigrationStatus",
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.podName"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.sourceNode"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".status.targetNode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Queue","type":"integer","jsonPath":".status.queuePosition"}"#,
    printcolumn = r#"{"name":"Frozen ms","type":"integer","jsonPath":".status.frozenMs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// The Pod to move (it must belong to a MigratingPod in the same namespace).
    #[schemars(length(min = 1))]
    pub pod_name: String,
    /// Node to move to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Or: labels the target node must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// How to carry the state.
    #[serde(default)]
    pub strategy: Strategy,
    /// `strategy: auto`: the longest the Pod may stay frozen, ms; a full move estimated
    /// above it moves lazily instead.
    #[serde(default = "default_max_downtime")]
    #[schemars(range(min = 1))]
    pub max_downtime_ms: u32,
    /// The move fails (and rolls back) when not done within this time.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: u32,
    /// A move of a large Pod gets longer: at least this many seconds per GiB of the Pod's
    /// memory (its containers' limits, else requests); unset: the controller's default.
    /// Time spent queued (phase `Pending`, reason `Queued`) does not count.
    #[serde(
        default,
        rename = "timeoutSecondsPerGiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_seconds_per_gib: Option<u32>,
    /// Keep the Pod's IP address and its established TCP connections where the target
    /// node's network can take the address over; unset: wherever it can.
    #[serde(default, rename = "keepIP", skip_serializing_if = "Option::is_none")]
    pub keep_ip: Option<bool>,
}

/// Phases of a Migration.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum MigrationPhase {
    /// Accepted, nothing done yet.
    Pending,
    /// The target Pod is created and waits for a node.
    Scheduling,
    /// The source is being dumped.
    Checkpointing,
    /// The state travels to the target node.
    Transferring,
    /// The target restores.
    Restoring,
    /// The target runs with the source's state; the source is gone.
    Succeeded,
    /// The move failed or was refused (see reason); the source keeps running.
    Failed,
}

impl MigrationPhase {
    /// True once nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }

    /// The phase a node daemon's annotation value names.
    pub fn from_annotation(v: &str) -> Option<Self> {
        Some(match v {
            "Checkpointing" => MigrationPhase::Checkpointing,
            "Transferring" => MigrationPhase::Transferring,
            "Restoring" | "Restored" => MigrationPhase::Restoring,
            "Failed" => MigrationPhase::Failed,
            _ => return None,
        })
    }
}

/// When a Migration entered a phase.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    /// The phase.
    pub phase: MigrationPhase,
    /// When.
    pub at: Time,
}

/// Observed state of a Migration.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Machine-readable reason of the phase (`PodNotFound`, `NodeUnschedulable`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// MigratingPod the Pod belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_pod: Option<String>,
    /// Source node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    /// Target Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    /// Target node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Place in the queue of moves waiting for the cluster's or a node's limit (1: next);
    /// set only while `reason` is `Queued`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// Frozen time the daemons reported, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
    /// Figures the daemons reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReport>,
    /// Phase history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transitions: Vec<PhaseTransition>,
    /// Conditions per the API conventions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
