//! Why a step of a move failed, typed: the worker matches on these, and their messages are
//! what a refused create, a Migration's condition and the logs say.

use crate::node::{
    migration::Busy,
    orders::MoveError,
    peer::PeerError,
    shared::AddressError,
    state::InvalidTransition,
    stream::{SinkError, StreamError, StreamFigures},
    trust::Unverified,
};

/// Why a target container is not one this node may restore.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// The API server's record does not make it a target (or cannot be read).
    #[error(transparent)]
    Record(#[from] Unverified),
    /// The record names another Pod.
    #[error("Pod {namespace}/{pod} has uid {recorded}, this container belongs to {here}")]
    OtherPod {
        /// The Pod's namespace.
        namespace: String,
        /// Its name.
        pod: String,
        /// The uid the record gives it.
        recorded: String,
        /// The uid of the Pod this container belongs to.
        here: String,
    },
    /// The record binds it to another node.
    #[error("Pod {namespace}/{pod} is bound to node {recorded:?}, not {here:?}")]
    OtherNode {
        /// The Pod's namespace.
        namespace: String,
        /// Its name.
        pod: String,
        /// The node it is bound to.
        recorded: String,
        /// This node.
        here: String,
    },
}

/// Why a target got no checkpoint to restore; its create is refused with it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The container is not in a state to receive one.
    #[error(transparent)]
    State(#[from] InvalidTransition),
    /// Another move of this Pod is under way.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The source named is the target itself.
    #[error("a Pod cannot be its own migration source")]
    OwnSource,
    /// No stored checkpoint, no source here, no source node to ask.
    #[error(
        "no checkpoint of container {container:?} of source pod {source_uid} on this node and \
         no running source to take one from"
    )]
    NoSource {
        /// The container.
        container: String,
        /// The source Pod.
        source_uid: String,
    },
    /// The source's worker on this node did not answer by the deadline.
    #[error("the source's checkpoint did not come before the deadline")]
    LocalDeadline,
    /// The source's worker on this node went away.
    #[error("the source's worker went away")]
    LocalWorkerGone,
    /// The source could not be checkpointed.
    #[error(transparent)]
    Source(#[from] MoveError),
    /// The hand-over lacks this container's images.
    #[error("the source handed over no images of container {0:?}")]
    NoImages(String),
    /// `lazy` was asked for and this node cannot take it.
    #[error("a lazy move is not possible: {0}")]
    NotLazy(String),
    /// This daemon cannot call other daemons.
    #[error("this daemon has no peer credentials (TLS CA and API access)")]
    NoPeers,
    /// The source node's address is unknown.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The hand-over failed.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// A page stream failed or arrived damaged.
    #[error(transparent)]
    Stream(#[from] StreamCheck),
    /// CRIU's lazy-pages daemon could not start.
    #[error(transparent)]
    LazyPages(#[from] podmig_cri_ext::Error),
    /// Its listening socket could not be shared with the tunnel.
    #[error("the lazy-pages daemon's socket: {0}")]
    LazySocket(#[from] std::io::Error),
    /// The checkpoint did not arrive within the part of the kubelet's runtime request
    /// timeout a held create may wait.
    #[error(
        "the checkpoint did not arrive within {}s, the part of the kubelet's runtime request \
         timeout ({}s) a target's create may be held (a quarter, at most 15 s, is kept for \
         the restore); the move is too slow for this timeout (raise kubelet's \
         --runtime-request-timeout with the daemon's --runtime-request-timeout-ms, or move \
         less memory): {cause}",
        share.as_secs(),
        timeout.as_secs()
    )]
    KubeletTimeout {
        /// How long the create was held.
        share: std::time::Duration,
        /// The kubelet's timeout.
        timeout: std::time::Duration,
        /// What the fetch saw when it gave up.
        cause: Box<FetchError>,
    },
    /// The runtime stopped waiting for the checkpoint.
    #[error("the target's runtime stopped waiting for the checkpoint")]
    RuntimeGone,
}

/// Why a page stream's figures cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum StreamCheck {
    /// No figures arrived.
    #[error(transparent)]
    Missing(#[from] SinkError),
    /// Different figures arrived from those the source sent.
    #[error(
        "the page stream of container {container:?} arrived damaged: the source sent {} bytes \
         (CRC {:#010x}), {} bytes (CRC {:#010x}) arrived",
        sent.bytes, sent.crc, got.bytes, got.crc
    )]
    Damaged {
        /// The container.
        container: String,
        /// What the source says it sent.
        sent: StreamFigures,
        /// What arrived.
        got: StreamFigures,
    },
}

/// Why a source's page streams could not be opened (the pages then go in the hand-over).
#[derive(Debug, thiserror::Error)]
pub enum OpenStreams {
    /// This daemon cannot call other daemons.
    #[error("no peer credentials")]
    NoPeers,
    /// The target node's address is unknown.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The target refused or could not be reached.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// The local end for CRIU could not be set up.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Why a source's dump failed; every container runs on.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// A container's dump failed (CRIU's reason).
    #[error("container {container:?}: {source}")]
    Container {
        /// The container.
        container: String,
        /// Why.
        source: podmig_cri_ext::Error,
    },
    /// Fewer dumps than containers came back.
    #[error("bad container name")]
    Missing,
    /// A page stream failed.
    #[error("container {container:?}: {source}")]
    Stream {
        /// The container.
        container: String,
        /// Why.
        source: StreamError,
    },
    /// The target has no room for the pages (refused before anything froze).
    #[error("the target cannot take the pages: {0}")]
    TargetNoRoom(PeerError),
    /// The Pod's address could not be held for the target (refused before the freeze).
    #[error("cannot keep the Pod's address: {0}")]
    Hold(#[from] super::address::HoldError),
    /// CRIU's preflight found what it cannot dump (refused before the freeze).
    #[error("preflight: container {container:?} cannot be checkpointed: {reason}")]
    Preflight {
        /// The container.
        container: String,
        /// CRIU's reason.
        reason: String,
    },
}

/// A lazy move's pages stopped coming after the target resumed.
#[derive(Debug, thiserror::Error)]
#[error(
    "the target resumed, then the page stream broke ({0}); this copy was not resumed because \
     the target had already run"
)]
pub struct PagesBroke(pub podmig_cri_ext::Error);
