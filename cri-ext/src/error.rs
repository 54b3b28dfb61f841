//! Errors of the runtime extension.

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What CRIU prints when a dumped Unix socket's peer is outside the dump.
pub const CRIU_EXTERNAL_UNIX_SOCKET: &str = "External socket is used";

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
    /// The same error with `note` added to what it says (e.g. where the failed run's CRIU
    /// log was kept); errors that carry no command output stay as they are.
    pub fn noting(self, note: &str) -> Self {
        match self {
            Error::CommandFailed {
                command,
                status,
                stdout,
                stderr,
            } => Error::CommandFailed {
                command,
                status,
                stdout,
                stderr: format!("{stderr}\n{note}"),
            },
            Error::CheckpointFailed(m) => Error::CheckpointFailed(format!("{m}\n{note}")),
            Error::RestoreFailed(m) => Error::RestoreFailed(format!("{m}\n{note}")),
            other => other,
        }
    }

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
    /// Read from what the failed command returned (CRIU's message reaches runc's log,
    /// whose tail is the command's `stderr` here); CRIU gives this failure no code of its
    /// own.
    pub fn is_external_unix_socket(&self) -> bool {
        match self {
            Error::CommandFailed { stdout, stderr, .. } => [stdout, stderr]
                .iter()
                .any(|out| out.contains(CRIU_EXTERNAL_UNIX_SOCKET)),
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod external_socket_tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn an_external_socket_is_read_from_what_the_command_returned() {
        let failed = |stderr: &str| Error::CommandFailed {
            command: "runc checkpoint app".into(),
            status: std::process::ExitStatus::from_raw(256),
            stdout: String::new(),
            stderr: stderr.into(),
        };
        assert!(
            failed("--- (00.18) Error (criu/sk-unix.c:874): unix: External socket is used.")
                .is_external_unix_socket()
        );
        assert!(!failed("Error (criu/cr-dump.c:1): Dumping FAILED.").is_external_unix_socket());
        // A message of podmig's own that quotes CRIU is not CRIU's answer.
        assert!(
            !Error::CheckpointFailed("External socket is used".into()).is_external_unix_socket()
        );
    }
}
