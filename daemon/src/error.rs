//! Errors of the daemon.

use std::path::PathBuf;

/// Result with the daemon's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the daemon, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding a socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state directory (move journal) cannot be used.
    #[error("state directory {path}: {source}")]
    State {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The runtime extension failed (runc, CRIU, files).
    #[error(transparent)]
    Runtime(#[from] podmig_cri_ext::Error),
    /// The gRPC server stopped with an error.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A request was refused because of its content.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl Error {
    /// Short stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Listen { .. } => "listen",
            Error::State { .. } => "state",
            Error::Runtime(e) => e.metric_label(),
            Error::Serve(_) => "serve",
            Error::InvalidRequest(_) => "invalid_request",
        }
    }
}
