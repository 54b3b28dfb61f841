//! A private containerd instance (own root, state, socket, CNI network and runc root)
//! configured with the `podmig` runtime handler → `podmig-runc`, as a node would be.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{paths, process::Proc};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// containerd 1.6's configuration (version 2); `{name}` placeholders are filled in by
/// `Containerd::write_config`.
const CONFIG_V2: &str = r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  # NB: this machine denies lowering oom_score_adj (no CAP_SYS_RESOURCE); kubelet-style -998 fails.
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{cni_bin}"
  conf_dir = "{cni}"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  Root = "{runc}"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.podmig]
  runtime_type = "io.containerd.runc.v2"
  pod_annotations = ["podmig.dev/*"]
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.podmig.options]
  BinaryName = "{wrapper}"
  Root = "{runc}"
"#;

/// containerd 2.x's configuration (version 3), with the same placeholders.
const CONFIG_V3: &str = r#"version = 3
root = '{root}'
state = '{state}'
disabled_plugins = ['io.containerd.snapshotter.v1.btrfs', 'io.containerd.snapshotter.v1.zfs', 'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.aufs', 'io.containerd.snapshotter.v1.erofs', 'io.containerd.differ.v1.erofs', 'io.containerd.nri.v1.nri', 'io.containerd.tracing.processor.v1.otlp', 'io.containerd.internal.v1.tracing']
[grpc]
  address = '{sock}'
[ttrpc]
  address = '{sock}.ttrpc'
[debug]
  level = 'info'
[plugins.'io.containerd.internal.v1.opt']
  path = '{opt}'
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{pause}'
[plugins.'io.containerd.cri.v1.runtime']
  enable_cdi = false
  # NB: this machine denies lowering oom_score_adj (no CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{cni_bin}']
    conf_dir = '{cni}'
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '{runc_bin}'
        Root = '{runc}'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podmig]
      runtime_type = 'io.containerd.runc.v2'
      pod_annotations = ['podmig.dev/*']
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podmig.options]
        BinaryName = '{wrapper}'
        Root = '{runc}'
"#;

/// Which containerd a node runs: Debian 12's 1.6 with its runc 1.1 (configuration
/// version 2), or 2.x with runc 1.2+ (configuration version 3; `scripts/setup` installs
/// both under `/opt/podmig`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ContainerdVersion {
    /// containerd 1.6, runc 1.1.
    #[default]
    V1,
    /// containerd 2.x, runc 1.2+.
    V2,
}

impl ContainerdVersion {
    /// Parses `1` or `2`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "1" => Ok(Self::V1),
            "2" => Ok(Self::V2),
            other => bail!("containerd version {other:?}: 1 or 2"),
        }
    }

    /// The versions of a list such as `1,2` (node `i` gets entry `i % len`); empty: 1.
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<Self>> {
        let v: Vec<Self> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Self::parse)
            .collect::<anyhow::Result<_>>()?;
        Ok(if v.is_empty() { vec![Self::V1] } else { v })
    }

    /// The versions the environment asks every test cluster for (`PODMIG_E2E_CONTAINERD`,
    /// e.g. `2` or `1,2`); 1 when unset.
    pub fn from_env() -> anyhow::Result<Vec<Self>> {
        Self::from_env_or(&[Self::V1])
    }

    /// As [`ContainerdVersion::from_env`], `default` when unset.
    pub fn from_env_or(default: &[Self]) -> anyhow::Result<Vec<Self>> {
        match std::env::var("PODMIG_E2E_CONTAINERD") {
            Ok(list) => Self::parse_list(&list),
            Err(_) => Ok(default.to_vec()),
        }
    }

    /// Directory of this version's containerd, shim and ctr.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            Self::V1 => PathBuf::from("/usr/bin"),
            Self::V2 => paths::prefix().join("containerd2/usr/bin"),
        }
    }

    /// The runc its nodes run.
    pub fn runc(self) -> PathBuf {
        match self {
            Self::V1 => PathBuf::from("/usr/sbin/runc"),
            Self::V2 => paths::prefix().join("runc/runc"),
        }
    }

    /// What a kubelet reports as the node's `containerRuntimeVersion`.
    pub fn runtime_version(self) -> String {
        match self {
            Self::V1 => "containerd://1.6.20".into(),
            Self::V2 => "containerd://2.1.9".into(),
        }
    }

    /// `PATH` of its containerd: its own shim first.
    fn path(self) -> String {
        match self {
            Self::V1 => paths::RUNTIME_PATH.to_owned(),
            Self::V2 => format!("{}:{}", self.bin_dir().display(), paths::RUNTIME_PATH),
        }
    }
}

/// Where and how a containerd instance runs.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// The node daemon's hook socket podmig-runc talks to.
    pub hook_socket: PathBuf,
    /// Directory of the instance (a fresh temporary one when None).
    pub dir: Option<PathBuf>,
    /// Network namespace to run in (a node of the local cluster), or the host's.
    pub netns: Option<String>,
    /// CNI bridge name and Pod subnet (derived from a counter when None).
    pub network: Option<(String, String)>,
    /// The node's own file system (a node of the local cluster): containerd runs in its
    /// mount namespace with its root, state and runc state at the standard paths there.
    pub node_fs: Option<crate::node_fs::NodeFs>,
    /// The node's kubeconfig for podmig's CNI plugin: with it, `podmig-cni` is chained
    /// after the bridge and migration targets keep their source's address.
    pub cni_kubeconfig: Option<PathBuf>,
    /// Which containerd (and runc) it is.
    pub version: ContainerdVersion,
}

/// One containerd with everything it made; torn down (containers, sandboxes, network
/// namespaces, mounts, shims, bridge, directories) when dropped.
pub struct Containerd {
    dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    keep: bool,
    bridge: String,
    subnet: String,
    netns: Option<String>,
    cni_kubeconfig: Option<PathBuf>,
    node_fs: Option<crate::node_fs::NodeFs>,
    hook_socket: PathBuf,
    version: ContainerdVersion,
    proc: Option<Proc>,
}

impl Containerd {
    /// Starts an instance whose `podmig-runc` talks to `hook_socket`, and imports the
    /// test images into it.
    pub fn start(hook_socket: &Path) -> anyhow::Result<Self> {
        Self::start_with(ContainerdOptions {
            hook_socket: hook_socket.to_path_buf(),
            ..Default::default()
        })
    }

    /// Starts an instance as `opts` says.
    pub fn start_with(opts: ContainerdOptions) -> anyhow::Result<Self> {
        let n = (std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst)) % 200 + 20;
        let (dir, tmp) = match opts.dir {
            Some(d) => {
                std::fs::create_dir_all(&d)?;
                (d, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("podmig-ctrd-")
                    .tempdir_in("/var/tmp")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let (bridge, subnet) = opts
            .network
            .unwrap_or_else(|| (format!("pmbr{n}"), format!("10.77.{n}.0/24")));
        let mut me = Self {
            dir,
            tmp,
            keep: std::env::var_os("PODMIG_E2E_KEEP").is_some(),
            bridge,
            subnet,
            netns: opts.netns.clone(),
            cni_kubeconfig: opts.cni_kubeconfig.clone(),
            node_fs: opts.node_fs.clone(),
            hook_socket: opts.hook_socket.clone(),
            version: opts.version,
            proc: None,
        };
        me.write_config()?;
        me.spawn()?;
        for image in ["pause", "testapp"] {
            me.import(image)?;
        }
        Ok(me)
    }

    /// Starts the containerd process on the written configuration (its log appended to).
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = crate::node_fs::node_command(
            self.version.bin_dir().join("containerd"),
            self.netns.as_deref(),
            self.node_fs.as_ref(),
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))?;
        cmd.arg("--config")
            .arg(self.dir.join("config.toml"))
            .env_clear()
            .env("PATH", self.version.path())
            .env("PODMIG_RUNC_BINARY", self.version.runc())
            .env("PODMIG_HOOK_SOCKET", &self.hook_socket)
            .stdout(Stdio::null())
            .stderr(log);
        // Debugging aid: run podmig-runc over another runc (e.g. one under strace).
        if let Some(runc) = std::env::var_os("PODMIG_RUNC_BINARY") {
            cmd.env("PODMIG_RUNC_BINARY", runc);
        }
        self.proc = Some(Proc::spawn("containerd", cmd)?);
        self.wait_ready()
    }

    /// Kills containerd with SIGKILL — its shims, and so the containers, live on — and
    /// starts it again on the same state, as systemd restarts a crashed containerd.
    /// Returns the new process's pid.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<Option<u32>> {
        if let Some(mut p) = self.proc.take() {
            if let Some(pid) = p.pid() {
                crate::process::signal(pid, libc::SIGKILL);
            }
            p.stop(Duration::from_secs(5));
        }
        // The socket of the killed process stays on disk; the new one replaces it.
        let _ = std::fs::remove_file(self.socket());
        self.spawn()?;
        Ok(self.pid())
    }

    /// Imports image `podmig.local/<name>:latest` built by `scripts/build-images` (the
    /// applications' images are imported only by the tests that run them).
    pub fn import(&self, name: &str) -> anyhow::Result<()> {
        self.ctr(&[
            "images",
            "import",
            &paths::images_dir()
                .join(format!("{name}.tar"))
                .display()
                .to_string(),
        ])
        .with_context(|| format!("importing {name} (did scripts/setup run?)"))?;
        Ok(())
    }

    /// Which containerd this is.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The pid of the containerd process.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// The instance's directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_path()
    }

    /// containerd's gRPC socket (CRI is served there).
    pub fn socket(&self) -> PathBuf {
        self.dir.as_path().join("containerd.sock")
    }

    /// runc state root of the `k8s.io` namespace on the host (what the node daemon
    /// checkpoints with).
    pub fn runc_root(&self) -> PathBuf {
        self.host_dirs().2.join("k8s.io")
    }

    /// containerd's root, state and runc state directories as containerd is configured
    /// with them (inside a node: its standard paths) and as the host reaches them.
    fn dirs(&self) -> [(PathBuf, PathBuf); 3] {
        let d = self.dir.as_path();
        match &self.node_fs {
            Some(fs) => [
                "var/lib/containerd",
                "run/containerd",
                "run/containerd/runc",
            ]
            .map(|p| (std::path::Path::new("/").join(p), fs.root.join(p))),
            None => ["root", "state", "runc"].map(|p| (d.join(p), d.join(p))),
        }
    }

    /// Host paths of root, state and runc state.
    fn host_dirs(&self) -> (PathBuf, PathBuf, PathBuf) {
        let [(_, root), (_, state), (_, runc)] = self.dirs();
        (root, state, runc)
    }

    /// The CNI bridge; the host reaches Pod IPs through it.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// containerd's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.as_path().join("containerd.log")).unwrap_or_default()
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let d = self.dir.as_path();
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni)?;
        let cni_bin = self.cni_bin_dir()?;
        let wrapper = paths::bin("podmig-runc");
        if !wrapper.exists() {
            bail!(
                "{} is not built (cargo build --workspace)",
                wrapper.display()
            );
        }
        let [(root, _), (state, _), (runc, _)] = self.dirs();
        let template = match self.version {
            ContainerdVersion::V1 => CONFIG_V2,
            ContainerdVersion::V2 => CONFIG_V3,
        };
        let values = [
            ("root", root.display().to_string()),
            ("state", state.display().to_string()),
            ("sock", self.socket().display().to_string()),
            ("opt", d.join("opt").display().to_string()),
            ("pause", paths::PAUSE_IMAGE.to_owned()),
            ("cni", cni.display().to_string()),
            ("cni_bin", cni_bin.display().to_string()),
            ("runc", runc.display().to_string()),
            ("runc_bin", self.version.runc().display().to_string()),
            ("wrapper", wrapper.display().to_string()),
        ];
        let config = values.iter().fold(template.to_owned(), |t, (k, v)| {
            t.replace(&format!("{{{k}}}"), v)
        });
        std::fs::write(d.join("config.toml"), config)?;
        let (host_root, host_state, host_runc) = self.host_dirs();
        for dir in [host_root, host_state, host_runc] {
            std::fs::create_dir_all(dir)?;
        }
        self.write_cni(&cni)
    }

    /// The node's CNI network: the bridge, podmig's plugin when it has a kubeconfig, loopback.
    fn write_cni(&self, cni: &Path) -> anyhow::Result<()> {
        let d = self.dir.as_path();
        let mut plugins = vec![serde_json::json!({
            "type": "bridge", "bridge": self.bridge, "isGateway": true, "ipMasq": false,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]], "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": d.join("cni-ipam").display().to_string()}
        })];
        if let Some(kc) = &self.cni_kubeconfig {
            plugins.push(serde_json::json!({"type": "podmig-cni", "kubeconfig": kc}));
        }
        plugins.push(serde_json::json!({"type": "loopback"}));
        let net = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.bridge,
            "plugins": plugins,
        });
        std::fs::write(
            cni.join("10-podmig.conflist"),
            serde_json::to_vec_pretty(&net)?,
        )?;
        Ok(())
    }

    /// One directory of CNI plugins (containerd 1.x reads one): Debian's, and podmig's own.
    fn cni_bin_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("cni-bin");
        std::fs::create_dir_all(&dir)?;
        let mut plugins: Vec<(std::ffi::OsString, PathBuf)> = std::fs::read_dir("/usr/lib/cni")?
            .flatten()
            .map(|e| (e.file_name(), e.path()))
            .collect();
        plugins.push(("podmig-cni".into(), paths::bin("podmig-cni")));
        for (name, target) in plugins {
            let link = dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, link)?;
        }
        Ok(dir)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.socket().exists() && self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            if !self.proc.as_mut().is_some_and(Proc::is_running) {
                bail!("containerd exited:\n{}", self.log());
            }
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("containerd not ready after 20 s:\n{}", self.log())
    }

    /// Runs `ctr` against this instance in the `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.version.bin_dir().join("ctr"))
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Mount points below the instance directory (should be none after teardown).
    pub fn mounts(&self) -> Vec<String> {
        mounts_under(self.dir.as_path())
    }

    /// Containers runc still knows in this instance's state root.
    pub fn runc_containers(&self) -> Vec<String> {
        std::fs::read_dir(self.runc_root())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn shim_pids(&self) -> Vec<u32> {
        shim_pids_in(&self.host_dirs().1)
    }

    /// Stops every sandbox through CRI, then containerd, its shims, mounts and bridge.
    fn teardown(&mut self) {
        let sock = self.socket();
        let mut shims = self.shim_pids();
        let socket = sock.clone();
        // Drop may run inside a test's runtime: do the async CRI cleanup on a thread of its own.
        let cri = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut cri = crate::cri::Cri::connect(&sock).await.ok()?;
                cri.remove_all_sandboxes().await.ok()
            })
        });
        // A containerd stuck on a sandbox must not hang the teardown: CRI gets 30 s, then
        // the shims are stopped by pid below.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cri.is_finished() && Instant::now() < deadline {
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(100));
        }
        if cri.is_finished() {
            let _ = cri.join();
        }
        shims.extend(self.shim_pids());
        shims.extend(shims_serving(&socket));
        // Containers CRI could not stop (containerd already gone): by their runc init pid.
        for id in self.runc_containers() {
            if let Some(pid) = podmig_cri_ext::identity::init_pid(&self.runc_root().join(&id)) {
                crate::process::signal(pid, libc::SIGKILL);
            }
        }
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(10));
        }
        for pid in shims {
            crate::process::signal(pid, libc::SIGKILL);
        }
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let mut del = Command::new("ip");
        if let Some(ns) = &self.netns {
            del.args(["-n", ns]);
        }
        let _ = del
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "PODMIG_E2E_KEEP: leaving {} running",
                self.dir.as_path().display()
            );
            if let Some(p) = self.proc.as_mut() {
                p.detach();
            }
            if let Some(t) = self.tmp.as_mut() {
                t.disable_cleanup(true);
            }
            return;
        }
        self.teardown();
    }
}

/// Pids of the shims an instance whose state directory is `state` started.
pub fn shim_pids_in(state: &Path) -> Vec<u32> {
    std::fs::read_dir(state.join("io.containerd.runtime.v2.task/k8s.io"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("shim.pid")).ok())
                .filter_map(|p| p.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Shims started for the containerd at `socket` (their command line names its address),
/// found even when the instance's state directory is gone.
fn shims_serving(socket: &Path) -> Vec<u32> {
    let needle = socket.display().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.starts_with("/usr/bin/containerd-shim") && c.contains(&needle)
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}
