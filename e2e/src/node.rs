//! One test node: a containerd instance with the `podmig` handler, its node daemon and
//! a CRI client. Dropping it tears everything down in order.

use anyhow::Context;

use crate::{containerd::Containerd, cri::Cri, daemon::NodeDaemon, paths};

/// A node of the test bed.
pub struct TestNode {
    /// CRI client (kubelet's view).
    pub cri: Cri,
    /// containerd (dropped first: its sandboxes go while the daemon still answers hooks).
    pub containerd: Containerd,
    /// The node daemon.
    pub daemon: NodeDaemon,
    dir: tempfile::TempDir,
    _checkpoints: tempfile::TempDir,
}

impl TestNode {
    /// Starts containerd and `podmig node` for one node.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("podmig-node-")
            .tempdir_in("/var/tmp")?;
        let hook = NodeDaemon::hook_socket_in(dir.path());
        let containerd = tokio::task::block_in_place(|| Containerd::start(&hook))?;
        // Checkpoints live in memory (tmpfs), as on a node whose /run is tmpfs: a dump is
        // then bound by copying pages, not by the disk's writeback.
        let checkpoints = tempfile::Builder::new()
            .prefix("podmig-ckpt-")
            .tempdir_in(paths::memory_dir())?;
        let daemon = tokio::task::block_in_place(|| {
            NodeDaemon::start(
                dir.path(),
                checkpoints.path(),
                &containerd.runc_root(),
                None,
            )
        })?;
        let cri = Cri::connect(&containerd.socket())
            .await
            .context("CRI connect")?;
        Ok(Self {
            cri,
            containerd,
            daemon,
            dir,
            _checkpoints: checkpoints,
        })
    }

    /// Root for Pod log directories.
    pub fn logs_root(&self) -> std::path::PathBuf {
        self.dir.path().join("logs")
    }

    /// Logs of containerd and the daemon, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- containerd log (tail)\n{}\n--- daemon log\n{}",
            tail(&self.containerd.log(), 30),
            self.daemon.log()
        )
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
