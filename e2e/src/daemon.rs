//! The node daemon (`podmig node`) as a real process bound to one containerd instance,
//! optionally supervised like a DaemonSet's Pod: restarted when it exits, with kubelet's
//! back-off (at once the first time, then 10 s doubling up to 5 min).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use podmig_cri_ext::proto::runtime::v1::{
    CheckpointContainerOptions, CheckpointContainerRequest, CheckpointContainerResponse,
    ListRestoresRequest, RestoreContainerOptions, RestoreContainerRequest, RestoreRecord,
    checkpoint_service_client::CheckpointServiceClient,
};

use crate::{paths, process::Proc};

/// A running `podmig node`, stopped when dropped.
pub struct NodeDaemon {
    dir: PathBuf,
    checkpoints: PathBuf,
    proc: Arc<Mutex<Proc>>,
    opts: DaemonOptions,
    supervisor: Option<Supervisor>,
}

/// The thread restarting a supervised daemon.
struct Supervisor {
    stop: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(p: &Mutex<Proc>) -> std::sync::MutexGuard<'_, Proc> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// kubelet's restart back-off after the `n`th restart (the first is immediate).
pub fn restart_backoff(n: u32) -> Duration {
    if n == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs(10u64.saturating_mul(1 << (n - 1).min(5)).min(300))
    }
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
    /// Restart it when it exits (a DaemonSet's restart policy).
    pub supervise: bool,
    /// A cluster directory whose `state.json` records each restarted daemon's pid.
    pub cluster_dir: Option<PathBuf>,
    /// The node's file system: the daemon runs in its mount namespace, as the chart's
    /// daemon Pod sees the node.
    pub node_fs: Option<crate::node_fs::NodeFs>,
    /// Where it serves the runtime hook (default: `hook.sock` in `dir`).
    pub hook_socket: Option<PathBuf>,
    /// Its checkpoint budget in MiB (default: the daemon's).
    pub checkpoint_budget_mib: Option<u64>,
    /// Its moves' bandwidth cap in MiB/s (default: none).
    pub move_bandwidth_mibps: Option<u64>,
    /// The kubelet's runtime request timeout it is told, ms (default: the daemon's, 2 min).
    pub runtime_request_timeout_ms: Option<u64>,
    /// The runc it checkpoints and restores with (default: `runc` on its PATH).
    pub runc_binary: Option<PathBuf>,
}

impl NodeDaemon {
    /// The hook socket of a daemon rooted at `dir` unless told otherwise.
    pub fn hook_socket_in(dir: &Path) -> PathBuf {
        dir.join("hook.sock")
    }

    fn hook_socket_of(opts: &DaemonOptions) -> PathBuf {
        opts.hook_socket
            .clone()
            .unwrap_or_else(|| Self::hook_socket_in(&opts.dir))
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
        let proc = Arc::new(Mutex::new(Self::spawn(opts)?));
        let supervisor = opts.supervise.then(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let restarts = Arc::new(AtomicU32::new(0));
            let (p, o, s, r) = (proc.clone(), opts.clone(), stop.clone(), restarts.clone());
            let thread = std::thread::spawn(move || supervise(&p, &o, &s, &r));
            Supervisor {
                stop,
                restarts,
                thread: Some(thread),
            }
        });
        Ok(Self {
            dir: opts.dir.clone(),
            checkpoints: opts.checkpoints.clone(),
            proc,
            opts: opts.clone(),
            supervisor,
        })
    }

    /// How often the supervisor restarted the daemon.
    pub fn restarts(&self) -> u32 {
        self.supervisor
            .as_ref()
            .map_or(0, |s| s.restarts.load(Ordering::SeqCst))
    }

    /// Waits until the daemon serves again after a crash (its sockets are back).
    pub fn wait_serving(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let running = lock(&self.proc).is_running();
            if running && self.api_socket().exists() && Self::hook_socket_of(&self.opts).exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("podmig node is not serving again:\n{}", self.log());
            }
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(opts: &DaemonOptions) -> anyhow::Result<Proc> {
        let dir = opts.dir.as_path();
        std::fs::create_dir_all(dir)?;
        let mut cmd = crate::node_fs::node_command(
            paths::bin("podmig"),
            opts.netns.as_deref(),
            opts.node_fs.as_ref(),
        );
        let hook = Self::hook_socket_of(opts);
        if let Some(parent) = hook.parent() {
            std::fs::create_dir_all(parent)?;
        }
        cmd.arg("node")
            .arg("--hook-socket")
            .arg(&hook)
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .arg("--runc-root")
            .arg(&opts.runc_root)
            .arg("--checkpoint-dir")
            .arg(&opts.checkpoints)
            .arg("--state-dir")
            .arg(dir.join("state"))
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
        if let Some(mibps) = opts.move_bandwidth_mibps {
            cmd.arg("--move-bandwidth-mibps").arg(mibps.to_string());
        }
        if let Some(mib) = opts.checkpoint_budget_mib {
            cmd.arg("--checkpoint-budget-mib").arg(mib.to_string());
        }
        if let Some(runc) = &opts.runc_binary {
            cmd.arg("--runc-binary").arg(runc);
        }
        if let Some(ms) = opts.runtime_request_timeout_ms {
            cmd.arg("--runtime-request-timeout-ms").arg(ms.to_string());
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
        let _ = std::fs::remove_file(&hook);
        let mut proc = Proc::spawn("podmig node", cmd)?;
        if let (Some(cluster), Some(pid)) = (&opts.cluster_dir, proc.pid()) {
            crate::cluster::track_pid_in(cluster, Some(pid))?;
        }
        let log = || std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        // Recovery of journaled moves may take a while before the sockets are served.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(dir.join("api.sock").exists() && hook.exists()) {
            if !proc.is_running() || Instant::now() > deadline {
                bail!("podmig node did not come up:\n{}", log());
            }
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proc)
    }

    /// Starts the daemon again with the same options (after [`NodeDaemon::stop`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.supervisor = None;
        lock(&self.proc).stop(Duration::from_secs(5));
        let fresh = Self::start_with(&self.opts)?;
        *self = fresh;
        Ok(())
    }

    /// Starts the daemon again with other API credentials (a ServiceAccount's, say).
    pub fn restart_with_kubeconfig(&mut self, kubeconfig: &Path) -> anyhow::Result<()> {
        self.opts.kubeconfig = Some(kubeconfig.to_path_buf());
        self.restart()
    }

    /// Starts the daemon again with its moves capped at `mibps` MiB/s.
    pub fn restart_with_bandwidth(&mut self, mibps: u64) -> anyhow::Result<()> {
        self.opts.move_bandwidth_mibps = Some(mibps);
        self.restart()
    }

    /// Starts the daemon again told that the kubelet's runtime request timeout is `ms`.
    pub fn restart_with_runtime_request_timeout(&mut self, ms: u64) -> anyhow::Result<()> {
        self.opts.runtime_request_timeout_ms = Some(ms);
        self.restart()
    }

    /// Starts the daemon again with a checkpoint budget of `mib` MiB.
    pub fn restart_with_budget(&mut self, mib: u64) -> anyhow::Result<()> {
        self.opts.checkpoint_budget_mib = Some(mib);
        self.restart()
    }

    /// Kills the daemon at once (SIGKILL), as a crash or an OOM kill would; a supervised
    /// daemon is then restarted by its supervisor.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            crate::process::signal(pid, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            // Reaped here (or by the supervisor, which then restarts it).
            while lock(&self.proc).pid() == Some(pid)
                && lock(&self.proc).is_running()
                && Instant::now() < deadline
            {
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.proc).pid()
    }

    /// The checkpoint/restore extension socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The daemon's move journal (one file per container and side of a move in flight).
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("state").join("journal")
    }

    /// True while the journal holds a source entry: this node has claimed a Pod's
    /// containers for a move (the freeze is under way or done).
    /// (A source entry kept at `MovedAway` only marks a container moved off this node.)
    pub fn source_claimed(&self) -> bool {
        std::fs::read_dir(self.journal_dir()).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("source-")
                    && std::fs::read(e.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .is_none_or(|v| v["step"] != "MovedAway")
            })
        })
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

    /// Stops the daemon (a runtime going away); a supervised one stays stopped.
    pub fn stop(&mut self) {
        self.supervisor = None;
        lock(&self.proc).stop(Duration::from_secs(5));
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

    /// RestoreContainer through the daemon's CRI extension: the next creation of
    /// `container` of Pod `pod_uid` on this node restores the checkpoint at `path`.
    pub async fn arm_restore(
        &self,
        pod_uid: &str,
        container: &str,
        path: &Path,
    ) -> Result<(), tonic::Status> {
        self.client()
            .await?
            .restore_container(RestoreContainerRequest {
                pod_uid: pod_uid.into(),
                container_name: container.into(),
                options: Some(RestoreContainerOptions {
                    checkpoint_path: path.display().to_string(),
                    ..Default::default()
                }),
            })
            .await?;
        Ok(())
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

/// The supervisor's loop: a daemon that exited is started again after the back-off.
fn supervise(proc: &Mutex<Proc>, opts: &DaemonOptions, stop: &AtomicBool, restarts: &AtomicU32) {
    let mut exited_at: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        #[allow(clippy::disallowed_methods)] // a plain supervisor thread
        std::thread::sleep(Duration::from_millis(100));
        if lock(proc).is_running() {
            continue;
        }
        let since = *exited_at.get_or_insert_with(Instant::now);
        let n = restarts.load(Ordering::SeqCst);
        if since.elapsed() < restart_backoff(n) || stop.load(Ordering::SeqCst) {
            continue;
        }
        match NodeDaemon::spawn(opts) {
            Ok(fresh) => {
                *lock(proc) = fresh;
                restarts.fetch_add(1, Ordering::SeqCst);
                exited_at = None;
            }
            Err(error) => {
                eprintln!("podmig node restart failed: {error:#}");
                restarts.fetch_add(1, Ordering::SeqCst);
                exited_at = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_like_kubelet() {
        assert_eq!(restart_backoff(0), Duration::ZERO);
        assert_eq!(restart_backoff(1), Duration::from_secs(10));
        assert_eq!(restart_backoff(2), Duration::from_secs(20));
        assert_eq!(restart_backoff(6), Duration::from_secs(300));
        assert_eq!(restart_backoff(40), Duration::from_secs(300));
    }
}
