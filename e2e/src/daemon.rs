//! The node daemon (`podmig node`) as a real process bound to one containerd instance.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;
use podmig_cri_ext::proto::runtime::v1::{
    CheckpointContainerOptions, CheckpointContainerRequest, CheckpointContainerResponse,
    ListRestoresRequest, RestoreRecord, checkpoint_service_client::CheckpointServiceClient,
};

use crate::{paths, process::Proc};

/// A running `podmig node`, stopped when dropped.
pub struct NodeDaemon {
    dir: PathBuf,
    checkpoints: PathBuf,
    proc: Proc,
    opts: DaemonOptions,
}

/// How to run a node daemon.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Directory of its sockets and log.
    pub dir: PathBuf,
    /// Its checkpoint store.
    pub checkpoints: PathBuf,
    /// The runc root of its containerd.
    pub runc_root: PathBuf,
    /// API credentials (the node's).
    pub kubeconfig: Option<PathBuf>,
    /// Network namespace to run in (the node's).
    pub netns: Option<String>,
    /// The node's name.
    pub node_name: Option<String>,
    /// TLS identity of its HTTPS API.
    pub tls: Option<crate::pki::DaemonTls>,
}

impl NodeDaemon {
    /// Sockets and checkpoint store of a daemon rooted at `dir`.
    pub fn hook_socket_in(dir: &Path) -> PathBuf {
        dir.join("hook.sock")
    }

    /// Starts the daemon with its sockets in `dir` and its checkpoint store in
    /// `checkpoints`, checkpointing with `runc_root`.
    /// With `kubeconfig`, the daemon reports move progress on target Pods.
    pub fn start(
        dir: &Path,
        checkpoints: &Path,
        runc_root: &Path,
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<Self> {
        Self::start_with(&DaemonOptions {
            dir: dir.to_path_buf(),
            checkpoints: checkpoints.to_path_buf(),
            runc_root: runc_root.to_path_buf(),
            kubeconfig: kubeconfig.map(Path::to_path_buf),
            ..Default::default()
        })
    }

    /// Starts the daemon as `opts` say.
    pub fn start_with(opts: &DaemonOptions) -> anyhow::Result<Self> {
        let dir = opts.dir.as_path();
        std::fs::create_dir_all(dir)?;
        let mut cmd = match &opts.netns {
            // NB: nsenter, not `ip netns exec` (which remounts /sys): network namespace only.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/var/run/netns/{ns}"))
                    .arg(paths::bin("podmig"));
                c
            }
            None => Command::new(paths::bin("podmig")),
        };
        cmd.arg("node")
            .arg("--hook-socket")
            .arg(Self::hook_socket_in(dir))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .arg("--runc-root")
            .arg(&opts.runc_root)
            .arg("--checkpoint-dir")
            .arg(&opts.checkpoints)
            .env("PATH", paths::RUNTIME_PATH)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("daemon.log"))?,
            );
        if let Some(kc) = &opts.kubeconfig {
            cmd.arg("--kubeconfig").arg(kc);
        }
        if let Some(n) = &opts.node_name {
            cmd.arg("--node-name").arg(n);
        }
        if let Some(tls) = &opts.tls {
            cmd.arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key)
                .arg("--tls-ca")
                .arg(&tls.ca);
        }
        // A restart must not find the sockets of the previous run.
        let _ = std::fs::remove_file(dir.join("api.sock"));
        let _ = std::fs::remove_file(Self::hook_socket_in(dir));
        let mut me = Self {
            dir: dir.to_path_buf(),
            checkpoints: opts.checkpoints.clone(),
            proc: Proc::spawn("podmig node", cmd)?,
            opts: opts.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(me.api_socket().exists() && Self::hook_socket_in(dir).exists()) {
            if !me.proc.is_running() || Instant::now() > deadline {
                bail!("podmig node did not come up:\n{}", me.log());
            }
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// Starts the daemon again with the same options (after [`NodeDaemon::stop`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let fresh = Self::start_with(&self.opts)?;
        *self = fresh;
        Ok(())
    }

    /// Kills the daemon at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(pid) = self.proc.pid() {
            crate::process::signal(pid, libc::SIGKILL);
        }
        self.proc.stop(Duration::from_secs(2));
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The checkpoint/restore extension socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The daemon's checkpoint store.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoints.clone()
    }

    /// Where the checkpoint of `container` of Pod `pod_uid` is kept.
    pub fn checkpoint_path(&self, pod_uid: &str, container: &str) -> PathBuf {
        self.checkpoint_dir().join(pod_uid).join(container)
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon (a runtime going away).
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(5));
    }

    async fn client(
        &self,
    ) -> Result<CheckpointServiceClient<tonic::transport::Channel>, tonic::Status> {
        let channel = podmig_cri_ext::connect(self.api_socket())
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        Ok(CheckpointServiceClient::new(channel))
    }

    /// The restores the daemon performed into Pod `pod_uid`.
    pub async fn restores(&self, pod_uid: &str) -> Result<Vec<RestoreRecord>, tonic::Status> {
        let resp = self
            .client()
            .await?
            .list_restores(ListRestoresRequest {
                pod_uid: pod_uid.into(),
            })
            .await?;
        Ok(resp.into_inner().restores)
    }

    /// CheckpointContainer through the daemon's CRI extension.
    pub async fn checkpoint(
        &self,
        container_id: &str,
        path: &Path,
        leave_running: bool,
    ) -> Result<CheckpointContainerResponse, tonic::Status> {
        let resp = self
            .client()
            .await?
            .checkpoint_container(CheckpointContainerRequest {
                container_id: container_id.into(),
                options: Some(CheckpointContainerOptions {
                    checkpoint_path: path.display().to_string(),
                    leave_running,
                    ..Default::default()
                }),
            })
            .await?;
        Ok(resp.into_inner())
    }
}
