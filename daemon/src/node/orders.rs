//! What a Pod worker is asked: the updates it applies, and the orders and answers of a
//! move's source side.

use std::{path::PathBuf, time::Instant};

use crossbeam_channel::Sender;
use k8s_openapi::api::core::v1::Pod;
use podmig_api::v1alpha1::Strategy;
use podmig_cri_ext::{
    engine::{CheckpointOptions, CheckpointReport},
    lazy::PageStats,
    proto::hook::v1::{ContainerIdentity, RestoreResult, hook_response::Decision as Answer},
};
use tokio::sync::oneshot;

use crate::node::{
    janitor::NoRoom,
    migration::{Busy, Verdict},
    state::InvalidTransition,
    stream::StreamFigures,
};

/// One update of a Pod, like kubelet's `SyncPodType` plus a migrate kind.
pub enum PodUpdate {
    /// The API server's current version of the Pod.
    Sync(Box<Pod>),
    /// The Pod was removed from the API server.
    Gone,
    /// The runtime is about to create one of its containers.
    Create {
        /// The container.
        container: ContainerIdentity,
        /// The answer for `podmig-runc`.
        reply: oneshot::Sender<Answer>,
    },
    /// The runtime is about to signal one of its containers.
    Kill {
        /// The container.
        container: ContainerIdentity,
        /// The answer for `podmig-runc`.
        reply: oneshot::Sender<Answer>,
    },
    /// A restore this worker answered with ended.
    Restored {
        /// The container.
        container: ContainerIdentity,
        /// How it went.
        result: RestoreResult,
    },
    /// Checkpoint containers of this Pod for a move (source side).
    Migrate {
        /// What to move, where.
        order: MigrateOrder,
        /// The first channel: the checkpoint, or why there is none.
        prepared: oneshot::Sender<Result<Prepared, MoveError>>,
    },
    /// CRI `CheckpointContainer`: dump one container into a given directory.
    Checkpoint {
        /// runc id.
        container_id: String,
        /// Name within the Pod.
        container: String,
        /// Where and how.
        options: CheckpointOptions,
        /// The outcome.
        reply: oneshot::Sender<podmig_cri_ext::Result<CheckpointReport>>,
    },
    /// The lazy-pages daemon of a lazily restored container ended.
    PagesArrived {
        /// The container.
        container: ContainerIdentity,
        /// The figures, or why pages are missing.
        result: podmig_cri_ext::Result<PageStats>,
    },
    /// CRI `RestoreContainer`: the next create of `container` restores `images`.
    Arm {
        /// Name within the Pod.
        container: String,
        /// The images.
        images: PathBuf,
        /// The outcome.
        reply: oneshot::Sender<Result<(), InvalidTransition>>,
    },
    /// A previous run of the daemon moved `container` away (from its journal): it is
    /// never started here again.
    MovedAway {
        /// Name within the Pod.
        container: String,
        /// The move.
        migration: String,
        /// Where it went, for the refusal.
        target: String,
    },
}

/// Where a moved Pod goes.
#[derive(Debug, Clone, Default)]
pub struct TargetRef {
    /// Namespace of the target Pod.
    pub namespace: String,
    /// Name of the target Pod.
    pub pod: String,
    /// Its node.
    pub node: String,
}

impl std::fmt::Display for TargetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.namespace, self.pod, self.node)
    }
}

/// A request to checkpoint a source Pod for a move.
#[derive(Debug, Clone)]
pub struct MigrateOrder {
    /// Id of the move.
    pub migration: String,
    /// Containers to move; empty for all that run.
    pub containers: Vec<String>,
    /// The target.
    pub target: TargetRef,
    /// When the source stops waiting for the target's verdict and resumes.
    pub deadline: Instant,
    /// True when the verdict arrives over HTTP (the manager delivers it).
    pub remote: bool,
    /// How the target wants the memory: `lazy` (or `lazy-or-full`) serves the pages after
    /// the handover.
    pub strategy: Strategy,
    /// The target takes a full move's pages in page streams while the source dumps.
    pub stream_pages: bool,
    /// `auto`: the downtime budget, ms.
    pub max_downtime_ms: u32,
    /// `auto`: why the target cannot take a lazy move, if it cannot.
    pub target_lazy_impossible: Option<String>,
    /// The target's sandbox took over this Pod's address: hold it from the freeze on.
    pub kept_ip: Option<String>,
}

/// A checkpoint ready to hand over.
#[derive(Debug)]
pub struct Prepared {
    /// Image directories per container.
    pub images: Vec<(String, PathBuf)>,
    /// When the source was frozen.
    pub frozen_at: Instant,
    /// CRIU's preflight before the freeze.
    pub preflight_ms: u64,
    /// Dump time.
    pub checkpoint_ms: u64,
    /// Bytes of images.
    pub bytes: u64,
    /// The memory pages were left out: the target pulls them through the page server.
    pub lazy: bool,
    /// Containers whose pages went ahead in page streams, with what each stream carried.
    pub streamed: Vec<(String, StreamFigures)>,
    /// `auto`: what it chose and why.
    pub choice: Option<crate::node::estimate::Choice>,
    /// The second channel: the target's verdict.
    pub verdict: Sender<Verdict>,
}

/// Why a source could not be checkpointed; nothing was frozen unless said.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MoveError {
    /// A container to move does not run here.
    #[error("container {container:?} of pod {pod} is not running on this node")]
    NotRunning {
        /// The container asked for.
        container: String,
        /// The Pod's uid.
        pod: String,
    },
    /// No container of the Pod runs here.
    #[error("no container of pod {0} runs on this node")]
    NothingRuns(String),
    /// A container is already part of a move.
    #[error(transparent)]
    Claimed(#[from] InvalidTransition),
    /// A move of the Pod is already under way.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The dump failed (CRIU's reason); the containers keep running.
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    /// CRIU's preflight found what it cannot dump; nothing froze for the move.
    #[error("{0}")]
    NotCheckpointable(String),
    /// The dump would not fit the node's checkpoint budget or free space.
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
    /// A `lazy` move was asked for and cannot be made here.
    #[error("a lazy move is not possible: {0}")]
    NotLazy(String),
}
