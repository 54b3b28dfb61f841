//! `podmig node`: the per-node daemon. It mirrors kubelet's pod sync loop (one worker per
//! Pod on this node, fed by a watch of the API server, by `podmig-runc`'s runtime hook and
//! by the HTTP API), keeps the moves in flight in a migration manager, and carries
//! checkpoints to and from the other nodes' daemons.
//!
//! The adapters translate, the workers decide:
//! - [`hook`]: `podmig-runc`'s create/kill/restored events → Pod updates;
//! - [`cri`]: the CRI checkpoint/restore extension (gRPC, unix socket) → Pod updates;
//! - [`http`]: `POST /migrate/{uid}` and friends (HTTPS, authenticated) → Pod updates or
//!   `Migration` objects; [`auth`] checks every caller with TokenReview and
//!   SubjectAccessReview;
//! - [`watch`]: the Pods bound to this node → Pod updates;
//! - [`shared`]: the state all of them use; [`start`]: the wiring;
//! - [`orders`]: what a Pod worker is asked ([`PodUpdate`]); [`podsync`]: the Pod workers;
//!   [`moves`]: one move's record; [`state`]: one container's place in a move;
//!   [`migration`]: the moves in flight; [`transfer`] and [`peer`]: the data path;
//!   [`recovery`]: sources a crashed run left frozen.

pub mod auth;
pub mod capabilities;
pub mod cri;
pub mod estimate;
pub mod group;
pub mod hook;
pub mod http;
pub mod janitor;
pub mod journal;
pub mod metrics;
pub mod migration;
pub mod moves;
pub mod orders;
pub mod peer;
pub mod podsync;
pub mod recovery;
pub mod report;
pub mod shared;
pub mod start;
pub mod state;
pub mod stream;
pub mod tls;
pub mod transfer;
pub mod trust;
pub mod watch;

pub use podsync::PodUpdate;
pub use shared::{Node, Settings};
pub use start::run;

#[cfg(test)]
mod tests;
