//! Freezing a container's cgroup before CRIU sees it.
//!
//! NB: CRIU freezes a cgroup itself when runc passes `--freeze-cgroup`, but it polls the
//! freezer state in 100 ms steps, so every dump pays up to 100 ms of frozen time for
//! nothing. Freezing first and polling at 1 ms lets CRIU find the cgroup already FROZEN.
//! The caller thaws afterwards (after a dump without `--leave-running`, thawing lets the
//! killed tasks exit). cgroup v1 `freezer.state` and cgroup v2 `cgroup.freeze` are both
//! handled. See <https://docs.kernel.org/admin-guide/cgroup-v1/freezer-subsystem.html>.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::{Error, Result};

/// How long freezing may take before the dump is attempted without it.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
struct State {
    #[serde(default)]
    cgroup_paths: std::collections::HashMap<String, String>,
}

/// The freezer control of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup v1: `<freezer>/freezer.state` with FROZEN / THAWED.
    V1(PathBuf),
    /// cgroup v2: `<group>/cgroup.freeze` with 1 / 0 and `cgroup.events` `frozen 1`.
    V2(PathBuf),
}

/// Memory the container's cgroup charges now (bytes): about what a dump of it writes.
/// `None` when runc's state or the cgroup cannot be read.
pub fn memory_usage(root: &Path, id: &str) -> Option<u64> {
    let bytes = std::fs::read(root.join(id).join("state.json")).ok()?;
    let state: State = serde_json::from_slice(&bytes).ok()?;
    let file = match (state.cgroup_paths.get("memory"), state.cgroup_paths.get("")) {
        (Some(v1), _) => PathBuf::from(v1).join("memory.usage_in_bytes"),
        (None, Some(v2)) => PathBuf::from(v2).join("memory.current"),
        _ => return None,
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

impl Freezer {
    /// The freezer of container `id` from runc's `state.json` under `root`.
    pub fn of(root: &Path, id: &str) -> Result<Self> {
        let path = root.join(id).join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let state: State = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        if let Some(p) = state.cgroup_paths.get("freezer") {
            return Ok(Freezer::V1(PathBuf::from(p)));
        }
        if let Some(p) = state.cgroup_paths.get("") {
            return Ok(Freezer::V2(PathBuf::from(p)));
        }
        Err(Error::io(
            "find freezer cgroup in",
            path,
            std::io::Error::other("no freezer cgroup"),
        ))
    }

    fn write(&self, frozen: bool) -> Result<()> {
        let (file, value) = match self {
            Freezer::V1(d) => (
                d.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            Freezer::V2(d) => (d.join("cgroup.freeze"), if frozen { "1" } else { "0" }),
        };
        std::fs::write(&file, value).map_err(|e| Error::io("write", file, e))
    }

    /// True when every task of the cgroup is frozen.
    pub fn is_frozen(&self) -> Result<bool> {
        let (file, want) = match self {
            Freezer::V1(d) => (d.join("freezer.state"), "FROZEN"),
            Freezer::V2(d) => (d.join("cgroup.events"), "frozen 1"),
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io("read", file, e))?;
        Ok(match self {
            Freezer::V1(_) => text.trim() == want,
            Freezer::V2(_) => text.lines().any(|l| l.trim() == want),
        })
    }

    /// Freezes the cgroup and waits until every task is frozen. On failure the cgroup is
    /// thawed again.
    pub fn freeze(&self) -> Result<()> {
        self.write(true)?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            match self.is_frozen() {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    #[allow(clippy::disallowed_methods)]
                    // synchronous engine, runs off the async runtime
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(false) => {
                    let _ = self.thaw();
                    return Err(Error::io(
                        "freeze",
                        self.dir(),
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "tasks did not freeze"),
                    ));
                }
                Err(e) => {
                    let _ = self.thaw();
                    return Err(e);
                }
            }
        }
    }

    /// Freezes several cgroups at one instant: every freeze is asked for before any is
    /// waited for, so that tasks of one cannot act on another already stopped (a Pod's
    /// containers connecting to each other). On failure all are thawed again.
    pub fn freeze_all(freezers: &[Freezer]) -> Result<()> {
        let asked: Result<()> = freezers.iter().try_for_each(|f| f.write(true));
        let waited = asked.and_then(|()| freezers.iter().try_for_each(Freezer::freeze));
        if waited.is_err() {
            for f in freezers {
                let _ = f.thaw();
            }
        }
        waited
    }

    /// Thaws the cgroup; a cgroup that is already gone counts as thawed.
    pub fn thaw(&self) -> Result<()> {
        match self.write(false) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(())
            }
            other => other,
        }
    }

    fn dir(&self) -> &Path {
        match self {
            Freezer::V1(d) | Freezer::V2(d) => d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v1_and_v2_paths_from_runc_state() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(tmp.path().join("a")).expect("mkdir");
        std::fs::write(
            tmp.path().join("a/state.json"),
            r#"{"cgroup_paths":{"freezer":"/sys/fs/cgroup/freezer/k8s.io/a","memory":"/m"}}"#,
        )
        .expect("write");
        assert_eq!(
            Freezer::of(tmp.path(), "a").expect("v1"),
            Freezer::V1("/sys/fs/cgroup/freezer/k8s.io/a".into())
        );
        std::fs::create_dir_all(tmp.path().join("b")).expect("mkdir");
        std::fs::write(
            tmp.path().join("b/state.json"),
            r#"{"cgroup_paths":{"":"/sys/fs/cgroup/k8s.io/b"}}"#,
        )
        .expect("write");
        assert_eq!(
            Freezer::of(tmp.path(), "b").expect("v2"),
            Freezer::V2("/sys/fs/cgroup/k8s.io/b".into())
        );
    }

    #[test]
    fn v2_freeze_waits_for_frozen_event_and_thaw_of_gone_cgroup_is_ok() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A fake cgroup directory whose events already report frozen.
        std::fs::write(tmp.path().join("cgroup.events"), "populated 1\nfrozen 1\n").expect("write");
        let f = Freezer::V2(tmp.path().into());
        f.freeze().expect("freeze");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("cgroup.freeze")).expect("read"),
            "1"
        );
        assert!(Freezer::V2(tmp.path().join("gone")).thaw().is_ok());
    }

    #[test]
    fn freeze_that_never_completes_times_out_and_thaws() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("cgroup.events"), "populated 1\nfrozen 0\n").expect("write");
        let err = Freezer::V2(tmp.path().into())
            .freeze()
            .expect_err("must time out");
        assert!(err.to_string().contains("did not freeze"), "{err}");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("cgroup.freeze")).expect("read"),
            "0"
        );
    }

    #[test]
    fn a_pod_is_frozen_all_at_once_or_not_at_all() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs: Vec<PathBuf> = ["app", "sidecar"]
            .iter()
            .map(|n| tmp.path().join(n))
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).expect("mkdir");
            std::fs::write(d.join("cgroup.events"), "frozen 1\n").expect("write");
        }
        let freezers: Vec<Freezer> = dirs.iter().cloned().map(Freezer::V2).collect();
        Freezer::freeze_all(&freezers).expect("freeze");
        for d in &dirs {
            assert_eq!(
                std::fs::read_to_string(d.join("cgroup.freeze")).expect("read"),
                "1"
            );
        }
        // One that never freezes: the whole Pod is thawed again.
        std::fs::write(dirs[1].join("cgroup.events"), "frozen 0\n").expect("write");
        assert!(Freezer::freeze_all(&freezers).is_err());
        for d in &dirs {
            assert_eq!(
                std::fs::read_to_string(d.join("cgroup.freeze")).expect("read"),
                "0"
            );
        }
    }
}
