//! The checkpoint/restore engine: runc + CRIU on containers that containerd manages.
//! runc is driven from outside the shim with the shim's own state root, as
//! `runc checkpoint` supports (containerd then observes the task as stopped).
//! See <https://github.com/opencontainers/runc/blob/main/man/runc-checkpoint.8.md>.

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{Error, Result, freezer::Freezer, lazy::PageServer};

/// Default runc state root of containerd's `k8s.io` namespace (runc shim v2 defaults).
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc/k8s.io";

/// How to take a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    /// Directory the CRIU images are written to; created root-only (0700).
    pub image_path: PathBuf,
    /// Keep the container running after the dump.
    pub leave_running: bool,
    /// Dump established TCP connections instead of failing on them.
    pub tcp_established: bool,
    /// Leave the container frozen (and running, not killed) after the dump: a move keeps
    /// its source frozen until the target's verdict, then discards or resumes it.
    pub keep_frozen: bool,
    /// Send the memory pages to a page server listening on [`crate::lazy::PAGE_PORT`] in
    /// this network namespace while dumping (a streamed move) instead of writing them
    /// into `image_path`; runc and CRIU run inside the namespace.
    pub stream_pages: Option<std::sync::Arc<crate::lazy::PrivateNet>>,
}

/// What a checkpoint cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointReport {
    /// Wall time of the dump; the container is frozen throughout.
    pub duration: Duration,
    /// Bytes of CRIU images written.
    pub image_bytes: u64,
    /// The file-system state captured beside them (writable layer and volumes).
    pub filesystem: crate::volumes::FilesystemCapture,
}

/// Checkpoints containers; a trait so daemon logic can be tested without runc.
pub trait CheckpointEngine: Send + Sync + 'static {
    /// Dumps container `id` into `opts.image_path`. On failure the directory is removed
    /// and, unless the dump got to kill it, the container keeps running.
    fn checkpoint(&self, id: &str, opts: &CheckpointOptions) -> Result<CheckpointReport>;

    /// Freezes container `id` without dumping it, so that all containers of a Pod stop
    /// at one instant before any is dumped; its checkpoint then finds it frozen. Default:
    /// nothing (each dump freezes its own container).
    fn freeze(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    /// Freezes containers `ids` at one instant (a Pod's containers before any is dumped).
    /// Default: one after the other with [`CheckpointEngine::freeze`].
    fn freeze_all(&self, ids: &[&str]) -> Result<()> {
        ids.iter().try_for_each(|id| self.freeze(id))
    }

    /// Thaws a container left frozen by a `keep_frozen` checkpoint: it runs on where it
    /// stopped (the rollback of a failed move).
    fn resume(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    /// Kills a container left frozen by a `keep_frozen` checkpoint without letting it run
    /// another instruction (its state lives on elsewhere).
    fn discard(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    /// Asks CRIU whether container `id` can be checkpointed, before a move freezes it:
    /// CRIU's real dump runs up to the first task's memory and is stopped there (its fault
    /// injection `FI_DUMP_PAGES`), so everything it refuses in that task — a file, socket,
    /// device, `io_uring` or namespace it cannot dump — fails exactly as the move would,
    /// with CRIU's own words; the task tree is seized for that long (tens of ms, no memory
    /// copied) and then runs on. `scratch` holds CRIU's images and log meanwhile and is
    /// removed. `Ok(None)`: nothing blocks; `Ok(Some(why))`: CRIU's reason. Default:
    /// nothing checked.
    fn preflight(&self, _id: &str, _scratch: &Path) -> Result<Option<String>> {
        Ok(None)
    }

    /// Dumps container `id` into `opts.image_path` without its memory pages and serves
    /// them from a [`PageServer`] until a lazy restore has pulled them all. The container
    /// stays frozen (as with `keep_frozen`) whatever happens to the page server. Default:
    /// not supported.
    fn checkpoint_lazy(
        &self,
        _id: &str,
        _opts: &CheckpointOptions,
    ) -> Result<(CheckpointReport, PageServer)> {
        Err(Error::CheckpointFailed(
            "this engine cannot serve pages lazily".into(),
        ))
    }
}

/// runc, pointed at the state root of the runtime that created the containers.
#[derive(Debug, Clone)]
pub struct Runc {
    /// The runc binary.
    pub binary: PathBuf,
    /// runc's `--root`.
    pub root: PathBuf,
    /// Where the CRIU log of a failed dump, lazy dump or preflight is kept (root-only), so
    /// that the next rare failure says which run it was; `None`: not kept.
    pub failed_logs: Option<PathBuf>,
}

impl Runc {
    /// runc from `PATH` with the given state root.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            binary: PathBuf::from("runc"),
            root: root.into(),
            failed_logs: None,
        }
    }

    /// `e` with where the CRIU log at `log` of the failed `run` of container `id` was kept
    /// (see [`Runc::failed_logs`]), or `e` as it is when none was kept.
    fn with_kept_log(&self, e: Error, log: &Path, run: &str, id: &str) -> Error {
        match self.keep_failed_log(log, run, id) {
            Some(note) => e.noting(&note),
            None => e,
        }
    }

    /// Keeps the CRIU log at `log` of the failed `run` of container `id` (see
    /// [`Runc::failed_logs`]); the note to add to the error: where it was kept.
    fn keep_failed_log(&self, log: &Path, run: &str, id: &str) -> Option<String> {
        let dir = self.failed_logs.as_deref()?;
        let kept = crate::criu_log::keep_failed(dir, log, run, id)?;
        tracing::warn!(container_id = id, run, log = %kept.display(), "CRIU run failed; its log is kept");
        Some(format!(
            "CRIU's log of this {run} is kept at {}",
            kept.display()
        ))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd
    }
}

/// Runs a command to completion; a non-zero exit becomes [`Error::CommandFailed`] with
/// stderr completed by the tail of `log` (CRIU writes its reasons there, not to stderr).
pub fn run(mut cmd: Command, log: Option<&Path>) -> Result<std::process::Output> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if let Some(tail) = log.and_then(log_tail) {
        stderr.push_str("\n--- ");
        stderr.push_str(&tail);
    }
    Err(Error::CommandFailed {
        command,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    })
}

/// The last error lines of a CRIU log, which say why a dump or restore failed.
pub fn log_tail(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    let lines = if errors.is_empty() {
        text.lines().collect::<Vec<_>>()
    } else {
        errors
    };
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    let hint = known_cause(&tail).map_or(String::new(), |h| format!("\nhint: {h}"));
    Some(format!("{}: {tail}{hint}", path.display()))
}

/// CRIU's fault `FI_DUMP_PAGES` (`CRIU_FAULT=3`): the dump fails where the first task's
/// memory would be copied.
pub const PREFLIGHT_FAULT: &str = "3";

/// What CRIU logs when a preflight reached the injected fault: nothing before it failed.
pub const PREFLIGHT_REACHED: &str = "fault: Dump VMA pages failure";

/// The reason a preflight's CRIU log gives: its first error, with a hint when it is a
/// known one.
pub fn preflight_reason(log: &str) -> Option<String> {
    let first = log
        .lines()
        .filter(|l| !l.contains("RLIMIT_NOFILE for self"))
        .find_map(|l| l.split_once("Error (criu/").map(|(_, e)| e))?;
    let what = first.split_once("): ").map_or(first, |(_, m)| m).trim();
    Some(match known_cause(log) {
        Some(hint) => format!("CRIU: {what} — {hint}"),
        None => format!("CRIU: {what}"),
    })
}

/// What a CRIU failure seen often means on a node, in words an operator can act on.
pub fn known_cause(log: &str) -> Option<&'static str> {
    if log.contains("anon_inode:[io_uring]") {
        return Some(
            "the process uses io_uring, which CRIU cannot checkpoint; turn it off in the \
             application (MariaDB: innodb_use_native_aio=0)",
        );
    }
    (log.contains("Can't get rlimit") && log.contains("Operation not permitted")).then_some(
        "CRIU cannot read the resource limits of a process running as another user without \
         CAP_SYS_RESOURCE, which the checkpointing process lacks here (a privileged DaemonSet \
         has it; some VMs' root does not)",
    )
}

/// Waits until process `pid` has exited (gone or a zombie), at most `limit`.
pub fn wait_exit(pid: u32, limit: Duration) -> bool {
    let status = PathBuf::from(format!("/proc/{pid}/status"));
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match std::fs::read_to_string(&status) {
            Err(_) => return true,
            Ok(s)
                if s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z')) =>
            {
                return true;
            }
            Ok(_) => {
                #[allow(clippy::disallowed_methods)] // synchronous engine, off the async runtime
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    false
}

/// Total size of the regular files below `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Creates `dir` (and parents) readable by root only: checkpoints hold process memory.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("chmod", dir, e))
}

impl Runc {
    /// Captures the container's writable layer and volumes beside its images (while it is
    /// still stopped).
    fn capture_filesystem(
        &self,
        id: &str,
        dir: &Path,
    ) -> Result<crate::volumes::FilesystemCapture> {
        let fs_started = Instant::now();
        let state = crate::rootfs::runc_state(&self.root, id);
        let upper = crate::rootfs::rootfs_in(&state).and_then(|r| crate::rootfs::upperdir_of(&r));
        let layer_bytes = match upper {
            Some(upper) => crate::rootfs::capture(&upper, dir)?,
            None => 0,
        };
        let volume_bytes = crate::volumes::capture(&crate::volumes::running_mounts(&state), dir)?;
        let fs = crate::volumes::FilesystemCapture {
            layer_bytes,
            volume_bytes,
            capture_ms: fs_started.elapsed().as_millis() as u64,
        };
        fs.write(dir)?;
        Ok(fs)
    }
}

impl CheckpointEngine for Runc {
    fn checkpoint_lazy(
        &self,
        id: &str,
        opts: &CheckpointOptions,
    ) -> Result<(CheckpointReport, PageServer)> {
        let dir = &opts.image_path;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io("remove", dir, e))?;
        }
        create_private_dir(dir)?;
        // Without a freezer nothing would hold the container once CRIU lets go of it.
        let freezer = Freezer::of(&self.root, id)?;
        let started = Instant::now();
        freezer.freeze()?;
        let mut cmd = self.command();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(dir)
            .arg("--work-path")
            .arg(dir)
            .arg("--lazy-pages")
            .arg("--page-server")
            .arg(format!("127.0.0.1:{}", crate::lazy::PAGE_PORT))
            .args(["--status-fd", "1", "--leave-running"]);
        if opts.tcp_established {
            cmd.arg("--tcp-established");
        }
        cmd.arg(id);
        let served = PageServer::start(cmd, dir, Duration::from_secs(120)).and_then(|server| {
            // CRIU holds the tasks with ptrace and thawed the cgroup: frozen again, they
            // cannot run even if CRIU dies while serving.
            freezer.freeze()?;
            Ok((self.capture_filesystem(id, dir)?, server))
        });
        match served {
            Ok((filesystem, server)) => Ok((
                CheckpointReport {
                    duration: started.elapsed(),
                    image_bytes: dir_size(dir),
                    filesystem,
                },
                server,
            )),
            Err(e) => {
                // Nothing was handed over: the container runs on.
                let e = self.with_kept_log(e, &dir.join("dump.log"), "lazy-dump", id);
                let _ = std::fs::remove_dir_all(dir);
                let _ = freezer.thaw();
                Err(e)
            }
        }
    }

    fn freeze(&self, id: &str) -> Result<()> {
        Freezer::of(&self.root, id)?.freeze()
    }

    fn freeze_all(&self, ids: &[&str]) -> Result<()> {
        let freezers = ids
            .iter()
            .map(|id| Freezer::of(&self.root, id))
            .collect::<Result<Vec<_>>>()?;
        Freezer::freeze_all(&freezers)
    }

    fn resume(&self, id: &str) -> Result<()> {
        Freezer::of(&self.root, id)?.thaw()
    }

    fn discard(&self, id: &str) -> Result<()> {
        let init = crate::identity::init_pid(&self.root.join(id));
        let mut cmd = self.command();
        cmd.args(["kill", id, "KILL"]);
        let killed = run(cmd, None);
        // The kill is delivered once the cgroup thaws: the tasks die without running.
        let thawed = self.resume(id);
        if let Some(pid) = init {
            wait_exit(pid, Duration::from_secs(5));
        }
        killed.and(thawed).map(|_| ())
    }

    fn preflight(&self, id: &str, scratch: &Path) -> Result<Option<String>> {
        if scratch.exists() {
            std::fs::remove_dir_all(scratch).map_err(|e| Error::io("remove", scratch, e))?;
        }
        create_private_dir(scratch)?;
        let mut cmd = self.command();
        // CRIU's fault injection: fail the dump where the first task's pages would be
        // copied (criu/include/fault-injection.h; runc passes its environment to CRIU).
        cmd.env("CRIU_FAULT", PREFLIGHT_FAULT)
            .arg("checkpoint")
            .arg("--leave-running")
            .arg("--image-path")
            .arg(scratch)
            .arg("--work-path")
            .arg(scratch)
            .arg(id);
        let log = scratch.join("dump.log");
        let out = run(cmd, None);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let refused = match out {
            Ok(_) => None,
            Err(_) if text.contains(PREFLIGHT_REACHED) => None,
            Err(e) => {
                let why = preflight_reason(&text).unwrap_or_else(|| e.to_string());
                Some(match self.keep_failed_log(&log, "preflight", id) {
                    Some(note) => format!("{why}\n{note}"),
                    None => why,
                })
            }
        };
        let _ = std::fs::remove_dir_all(scratch);
        Ok(refused)
    }

    fn checkpoint(&self, id: &str, opts: &CheckpointOptions) -> Result<CheckpointReport> {
        let dir = &opts.image_path;
        if dir.exists() {
            // A stale image set would make CRIU mix old and new images.
            std::fs::remove_dir_all(dir).map_err(|e| Error::io("remove", dir, e))?;
        }
        create_private_dir(dir)?;
        let mut cmd = self.command();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(dir)
            .arg("--work-path")
            .arg(dir);
        if opts.leave_running || opts.keep_frozen {
            cmd.arg("--leave-running");
        }
        if opts.tcp_established {
            cmd.arg("--tcp-established");
        }
        if opts.stream_pages.is_some() {
            cmd.arg("--page-server")
                .arg(format!("127.0.0.1:{}", crate::lazy::PAGE_PORT));
        }
        cmd.arg(id);
        let started = Instant::now();
        // Pre-freezing only saves time; without a freezer CRIU freezes by itself.
        let freezer = Freezer::of(&self.root, id)
            .ok()
            .filter(|f| match f.freeze() {
                Ok(()) => true,
                Err(error) => {
                    tracing::warn!(container_id = id, %error, "cannot pre-freeze; CRIU will freeze");
                    false
                }
            });
        let init = crate::identity::init_pid(&self.root.join(id));
        // The writable layer is captured while the tasks are still stopped.
        let log = dir.join("dump.log");
        let dumped = match &opts.stream_pages {
            Some(net) => net.run(cmd, Some(log.clone())),
            None => run(cmd, Some(&log)),
        };
        let result = dumped.and_then(|_| self.capture_filesystem(id, dir));
        let stay_frozen = opts.keep_frozen && result.is_ok() && freezer.is_some();
        if let Some(f) = freezer.as_ref().filter(|_| !stay_frozen) {
            // Resumes a container left running (or whose dump failed); lets killed tasks exit.
            if let Err(error) = f.thaw() {
                tracing::warn!(container_id = id, %error, "cannot thaw after checkpoint");
            }
        }
        if opts.keep_frozen && result.is_ok() && freezer.is_none() {
            // Without a freezer the dumped container would run on: two copies. Stop it.
            let _ = self.discard(id);
        }
        if let (Ok(_), false, false, Some(pid)) =
            (&result, opts.leave_running, opts.keep_frozen, init)
        {
            // NB: the dumped process is killed but frees its memory as it exits; a
            // restore running meanwhile competes with that for the memory allocator
            // and runs up to twice as slow. Waiting is cheaper than that contention.
            wait_exit(pid, Duration::from_secs(5));
        }
        let duration = started.elapsed();
        let filesystem = match result {
            Ok(fs) => fs,
            Err(e) => {
                let e = self.with_kept_log(e, &log, "dump", id);
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        Ok(CheckpointReport {
            duration,
            image_bytes: dir_size(dir),
            filesystem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preflight_names_criu_s_first_error_with_its_hint() {
        let log = "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.05) Error (criu/files-ext.c:96): Can't dump file 600 of that type [7] (unknown anon_inode:[io_uring])\n\
                   (00.06) Error (criu/cr-dump.c:1698): Dump files (pid: 1) failed with -1\n";
        let why = preflight_reason(log).expect("a reason");
        assert!(
            why.starts_with(
                "CRIU: Can't dump file 600 of that type [7] (unknown anon_inode:[io_uring])"
            ),
            "{why}"
        );
        assert!(why.contains("innodb_use_native_aio=0"), "{why}");
        assert_eq!(
            preflight_reason("(00.01) Warn (criu/x.c:1): nothing\n"),
            None
        );
    }

    #[test]
    fn private_dir_is_root_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path().join("a/b");
        create_private_dir(&d).expect("create");
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn failing_command_reports_log_tail() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("dump.log");
        std::fs::write(&log, "ok line\nError (criu/cr-dump.c:1): boom\n").expect("write");
        let err = run(Command::new("false"), Some(&log)).expect_err("false fails");
        let text = err.to_string();
        assert!(text.contains("boom"), "{text}");
        assert_eq!(err.metric_label(), "command_failed");
    }

    #[test]
    fn checkpoint_of_unknown_container_fails_and_leaves_no_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // `false` stands in for a runc that rejects the container.
        let engine = Runc {
            binary: PathBuf::from("false"),
            root: tmp.path().into(),
            failed_logs: None,
        };
        let image_path = tmp.path().join("img");
        let err = engine
            .checkpoint(
                "nope",
                &CheckpointOptions {
                    image_path: image_path.clone(),
                    ..Default::default()
                },
            )
            .expect_err("must fail");
        assert_eq!(err.metric_label(), "command_failed");
        assert!(!image_path.exists());
    }

    #[test]
    fn dir_size_counts_nested_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(tmp.path().join("x")).expect("mkdir");
        std::fs::write(tmp.path().join("x/a"), [0u8; 100]).expect("write");
        std::fs::write(tmp.path().join("b"), [0u8; 23]).expect("write");
        assert_eq!(dir_size(tmp.path()), 123);
    }
}
