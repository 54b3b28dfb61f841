//! Errors of the runtime extension.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the runtime extension, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A runc (or CRIU) command exited non-zero.
    #[error("{command} failed with {status}: {stderr}")]
    CommandFailed {
        /// The command line, for the log.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stdout.
        stdout: String,
        /// What it printed on stderr (or, for runc, the tail of its log file).
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file or directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON document (OCI config, runc state) could not be read.
    #[error("cannot parse {path}: {source}")]
    Json {
        /// Which document.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The hook socket could not be reached or the exchange broke.
    #[error("runtime hook at {path}: {source}")]
    Hook {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A hook message could not be decoded.
    #[error("bad runtime hook message: {0}")]
    HookDecode(#[from] prost::DecodeError),
    /// A gRPC channel could not be opened.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A runc command line the wrapper must understand was malformed.
    #[error("bad runc command line: {0}")]
    Usage(String),
    /// podmig refused the operation (a migration target without a checkpoint, a container
    /// migrated away); the reason says why.
    #[error("{0}")]
    Refused(String),
    /// CRIU could not restore a checkpoint; carries CRIU's own reason.
    #[error("{0}")]
    RestoreFailed(String),
    /// A checkpoint could not be taken; carries CRIU's own reason.
    #[error("checkpoint failed: {0}")]
    CheckpointFailed(String),
}

impl Error {
    /// Short stable label for failure counters.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::CommandFailed { .. } => "command_failed",
            Error::Spawn { .. } => "spawn",
            Error::Io { .. } => "io",
            Error::Json { .. } => "json",
            Error::Hook { .. } | Error::HookDecode(_) => "hook",
            Error::Connect { .. } => "connect",
            Error::Usage(_) => "usage",
            Error::Refused(_) => "refused",
            Error::RestoreFailed(_) => "restore_failed",
            Error::CheckpointFailed(_) => "checkpoint_failed",
        }
    }

    /// Whether CRIU refused the dump because a Unix socket's peer is outside it: in a
    /// multi-container Pod, a connection between two containers caught at the freeze,
    /// which a retry a moment later usually no longer finds.
    pub fn is_external_unix_socket(&self) -> bool {
        self.to_string().contains("External socket is used")
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
