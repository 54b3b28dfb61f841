//! The node daemon's HTTP API (`podmig node`, HTTPS): request and answer bodies of
//! `POST /migrate/{pod-uid}`, `GET /migrations`, `POST /migrations/{id}/complete`, and the
//! JSON error every endpoint answers with. Shared by the daemon, its peers and the tests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::v1alpha1::{MigrationPhase, MigrationReport, PhaseTransition, Strategy};

/// Body of `POST /migrate/{pod-uid}`. Without `handover` it is a person's or a scheduler's
/// request: the move is recorded as a `Migration` object. With `handover` it comes from the
/// peer daemon whose node holds the target Pod: the answer streams the checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrateRequest {
    /// Node to move to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Or: labels the target node must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// How to carry the state (default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// `strategy: auto`: the longest the Pod may stay frozen, ms (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u32>,
    /// The move fails and rolls back when not done within this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
    /// Containers to move; empty means all of the Pod's containers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// Keep the Pod's IP address and connections where the network can (default: yes).
    #[serde(default, rename = "keepIP", skip_serializing_if = "Option::is_none")]
    pub keep_ip: Option<bool>,
    /// Set by a peer daemon: hand the checkpoint over to this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

/// The target of a peer-to-peer handover.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Handover {
    /// Id of the move (the target Pod's `podmig.dev/migration-id`).
    pub migration_id: String,
    /// Namespace of the target Pod.
    pub target_namespace: String,
    /// Name of the target Pod.
    pub target_pod: String,
    /// Uid of the target Pod.
    pub target_pod_uid: String,
    /// Node of the target Pod.
    pub target_node: String,
    /// Seconds the source waits for the target's verdict before it resumes.
    #[serde(default)]
    pub timeout_seconds: u32,
    /// `lazy`: serve the memory pages after the handover instead of sending them in it;
    /// `lazy-or-full`: lazy where this node can, else full. The answer's
    /// `podmig-strategy` header says which.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// The target takes a full move's memory pages in page streams while the source dumps
    /// (`POST /migrations/{id}/streams/{container}` to the target's daemon) instead of in
    /// the answer. Unset: everything comes in the answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream_pages: bool,
    /// `auto`: the budget the source holds its estimate against, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u32>,
    /// `auto`: why the target cannot take a lazy move, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_impossible: Option<String>,
    /// The target's sandbox took over the source Pod's address (this one): the source
    /// holds the address's traffic from before its freeze until it is gone, so that it
    /// never answers (ACK, FIN, reset) for connections the target carries on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_ip: Option<String>,
}

/// Answer to a person's `POST /migrate/{pod-uid}`: the Migration that records the move
/// and, with `?wait=true`, how it ended.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrateResponse {
    /// Name of the Migration object.
    pub migration: String,
    /// Its namespace.
    pub namespace: String,
    /// The Pod being moved.
    pub pod: String,
    /// Phase when answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Reason of a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The target Pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    /// The target node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// Per-phase figures the daemons reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReport>,
    /// Phase history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transitions: Vec<PhaseTransition>,
}

/// Body of `POST /migrations/{id}/complete`: the target's verdict on a handover.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompleteRequest {
    /// True when the target runs with the handed-over state.
    pub ok: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The restore's duration, ms (the source learns its rates from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
}

/// One move a node daemon took part in (`GET /migrations`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MoveInfo {
    /// Id of the move.
    pub id: String,
    /// `source` or `target`.
    pub role: MoveRole,
    /// Namespace of this node's Pod.
    pub namespace: String,
    /// This node's Pod.
    pub pod: String,
    /// Its uid.
    pub pod_uid: String,
    /// The other side's node, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_node: Option<String>,
    /// Where the move stands on this node.
    pub state: MovePhase,
    /// When it began (RFC 3339).
    pub started_at: String,
    /// Figures so far.
    pub report: MigrationReport,
}

/// Which side of a move a node plays.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MoveRole {
    /// This node's Pod is dumped and handed over.
    #[default]
    Source,
    /// This node's Pod restores the state.
    Target,
}

impl MoveRole {
    /// `source` or `target`.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveRole::Source => "source",
            MoveRole::Target => "target",
        }
    }
}

/// Where a move stands on one node (`GET /migrations`), in the order a move goes through.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MovePhase {
    /// The source is being frozen and dumped (the target waits for it).
    #[default]
    Checkpointing,
    /// The checkpoint is travelling to the target.
    Transferring,
    /// The target restores it.
    Restoring,
    /// The target runs; its memory pages still arrive (lazy moves).
    Paging,
    /// The target runs with the state; the source is gone.
    Succeeded,
    /// The move failed; the source runs on (or, after a lazy resume, the state is lost).
    Failed,
    /// The source was frozen, the move failed, and the source resumed.
    RolledBack,
    /// The target refused a move podmig's controller did not make.
    Refused,
}

impl MovePhase {
    /// True once the move ended on this node.
    pub fn ended(self) -> bool {
        matches!(
            self,
            MovePhase::Succeeded | MovePhase::Failed | MovePhase::RolledBack | MovePhase::Refused
        )
    }

    /// The word `GET /migrations` shows (`RolledBack`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            MovePhase::Checkpointing => "Checkpointing",
            MovePhase::Transferring => "Transferring",
            MovePhase::Restoring => "Restoring",
            MovePhase::Paging => "Paging",
            MovePhase::Succeeded => "Succeeded",
            MovePhase::Failed => "Failed",
            MovePhase::RolledBack => "RolledBack",
            MovePhase::Refused => "Refused",
        }
    }

    /// The `outcome` label of `podmig_migrations_total` for an ended move.
    pub fn outcome_label(self) -> &'static str {
        match self {
            MovePhase::Succeeded => "succeeded",
            MovePhase::Failed => "failed",
            MovePhase::RolledBack => "rolled_back",
            MovePhase::Refused => "refused",
            MovePhase::Checkpointing
            | MovePhase::Transferring
            | MovePhase::Restoring
            | MovePhase::Paging => "in_flight",
        }
    }
}

/// The body of every error answer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ApiError {
    /// What went wrong, for a person.
    pub error: String,
    /// A stable CamelCase reason (`PodNotFound`, `NotMigratable`, `AlreadyMigrating`, …).
    pub reason: String,
}

/// Media type of a streamed checkpoint (see the daemon's `transfer` module).
pub const CHECKPOINT_MEDIA_TYPE: &str = "application/vnd.podmig.checkpoint.v1";

/// Default port of the node daemon's HTTPS API.
pub const DEFAULT_API_PORT: u16 = 10443;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_records_keep_their_json_words() {
        let m = MoveInfo {
            role: MoveRole::Target,
            state: MovePhase::RolledBack,
            ..Default::default()
        };
        let v = serde_json::to_value(&m).expect("json");
        assert_eq!(
            (v["role"].as_str(), v["state"].as_str()),
            (Some("target"), Some("RolledBack"))
        );
        let back: MoveInfo = serde_json::from_value(v).expect("back");
        assert_eq!(back, m);
        assert!(MovePhase::Refused.ended() && !MovePhase::Paging.ended());
        for p in [
            MovePhase::Checkpointing,
            MovePhase::Paging,
            MovePhase::Refused,
        ] {
            assert_eq!(serde_json::to_value(p).expect("json"), p.as_str());
        }
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<MigrateRequest>(r#"{"targetNode":"n","bogus":1}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("bogus"), "{err}");
        let ok: MigrateRequest =
            serde_json::from_str(r#"{"targetNode":"n","strategy":"full"}"#).expect("ok");
        assert_eq!(ok.target_node.as_deref(), Some("n"));
        let keep: MigrateRequest =
            serde_json::from_str(r#"{"targetNode":"n","keepIP":false}"#).expect("ok");
        assert_eq!(keep.keep_ip, Some(false));
    }
}
