//! `podmig prepare-node` (the chart's init container) against real containerd
//! configurations: containerd 1.6 (this machine's, `config.toml` version 2) and containerd
//! 2.x (Debian's, version 3, unpacked by scripts/setup). After the run containerd reads
//! the result and serves the `podmig` handler with the node's own settings kept; a second
//! run changes nothing and restarts nothing; `--uninstall` gives the node its files back.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use k8s_cri::v1 as cri;
use podmig_e2e::{cri::Cri, process::Proc};

/// A fake node root with containerd's configuration (`version`), the files to install,
/// and a restart command that leaves a mark.
struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    source: PathBuf,
    config: PathBuf,
    original: String,
}

impl Node {
    fn new(version: u8) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("host");
        let config = root.join("etc/containerd/config.toml");
        std::fs::create_dir_all(config.parent().context("parent")?)?;
        let base = tmp.path().display().to_string();
        let original = if version == 2 {
            format!(
                r#"version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "podmig.local/pause:latest"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{base}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = "{base}/runc"
"#
            )
        } else {
            format!(
                r#"version = 3
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri"]

[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[plugins.'io.containerd.cri.v1.runtime']
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = 'io.containerd.runc.v2'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      SystemdCgroup = false
      Root = '{base}/runc'
"#
            )
        };
        std::fs::write(&config, &original)?;
        let source = tmp.path().join("image/opt/podmig");
        std::fs::create_dir_all(source.join("bin"))?;
        std::fs::create_dir_all(source.join("criu/usr/sbin"))?;
        std::fs::copy(
            podmig_e2e::paths::bin("podmig-runc"),
            source.join("bin/podmig-runc"),
        )?;
        std::fs::write(
            source.join("bin/criu"),
            "#!/bin/sh\nexec /opt/podmig/criu/usr/sbin/criu \"$@\"\n",
        )?;
        std::fs::write(
            source.join("criu/usr/sbin/criu"),
            "criu stand-in for the file copy\n",
        )?;
        Ok(Self {
            root,
            source,
            config,
            original,
            _tmp: tmp,
        })
    }

    fn base(&self) -> PathBuf {
        self.root.parent().expect("tmp").to_owned()
    }

    fn restarted(&self) -> PathBuf {
        self.base().join("restarted")
    }

    /// Runs `podmig prepare-node`; returns its output line.
    fn prepare(&self, uninstall: bool) -> anyhow::Result<String> {
        let mut cmd = Command::new(podmig_e2e::paths::bin("podmig"));
        cmd.arg("prepare-node")
            .arg("--host-root")
            .arg(&self.root)
            .arg("--source-dir")
            .arg(&self.source)
            .arg("--restart")
            .arg(format!("touch {}", self.restarted().display()));
        if uninstall {
            cmd.arg("--uninstall");
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("prepare-node: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts `binary` with the node's configuration; returns it and its CRI config.
    async fn containerd_config(&self, binary: &Path) -> anyhow::Result<serde_json::Value> {
        let log = self.base().join("containerd.log");
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut proc = Proc::spawn("containerd", cmd)?;
        let sock = self.base().join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        let result = async {
            loop {
                if sock.exists()
                    && let Ok(mut cri) = Cri::connect(&sock).await
                    && let Ok(st) = cri
                        .runtime
                        .status(cri::StatusRequest { verbose: true })
                        .await
                {
                    let info = st.into_inner().info;
                    let config = info.get("config").context("no config in the CRI status")?;
                    return Ok(serde_json::from_str(config)?);
                }
                if !proc.is_running() || Instant::now() > deadline {
                    bail!(
                        "containerd did not serve CRI:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        .await;
        proc.stop(Duration::from_secs(10));
        result
    }
}

async fn prepare_and_check(version: u8, binary: &Path) -> anyhow::Result<()> {
    let node = Node::new(version)?;
    let before = node.containerd_config(binary).await?;
    assert!(
        before["containerd"]["runtimes"]["podmig"].is_null(),
        "no handler before: {}",
        before["containerd"]["runtimes"]
    );

    let said = node.prepare(false)?;
    assert!(said.contains("restarted"), "{said}");
    assert!(node.restarted().exists(), "the runtime was restarted");
    let installed = node.root.join("opt/podmig/bin/podmig-runc");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&installed)?.permissions());
    assert_eq!(mode & 0o111, 0o111, "podmig-runc is executable");
    assert!(node.root.join("opt/podmig/criu/usr/sbin/criu").is_file());
    let runc_conf = std::fs::read_to_string(node.root.join("etc/criu/runc.conf"))?;
    assert!(
        runc_conf.starts_with("# podmig")
            && ["network-lock nftables", "tcp-established", "skip-in-flight"]
                .iter()
                .all(|o| runc_conf.lines().any(|l| l == *o)),
        "{runc_conf}"
    );

    let after = node.containerd_config(binary).await?;
    let rt = &after["containerd"]["runtimes"]["podmig"];
    assert_eq!(rt["runtimeType"], "io.containerd.runc.v2", "{rt}");
    assert_eq!(rt["PodAnnotations"][0], "podmig.dev/*", "{rt}");
    assert_eq!(
        rt["options"]["BinaryName"], "/opt/podmig/bin/podmig-runc",
        "{rt}"
    );
    assert_eq!(
        rt["options"]["Root"],
        format!("{}/runc", node.base().display()),
        "the node's runc options are kept: {rt}"
    );
    assert_eq!(
        after["containerd"]["runtimes"]["runc"]["options"]["Root"],
        format!("{}/runc", node.base().display()),
        "the node's own runtime is untouched"
    );
    if version == 2 {
        assert_eq!(
            after["sandboxImage"], "podmig.local/pause:latest",
            "the node's CRI settings survive the section import"
        );
        assert_eq!(
            after["cni"]["confDir"],
            format!("{}/cni", node.base().display())
        );
    }

    // Again: nothing to do, no restart.
    std::fs::remove_file(node.restarted())?;
    let said = node.prepare(false)?;
    assert!(
        said.contains("0 file(s) changed") && said.contains("unchanged"),
        "{said}"
    );
    assert!(!node.restarted().exists(), "no restart without a change");

    // Uninstall: the node's files as they were.
    let said = node.prepare(true)?;
    assert!(
        said.contains("uninstalled") && said.contains("restarted"),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(&node.config)?, node.original);
    assert!(!node.root.join("etc/containerd/conf.d/podmig.toml").exists());
    assert!(!installed.exists());
    assert!(!node.root.join("etc/criu/runc.conf").exists());
    let gone = node.containerd_config(binary).await?;
    assert!(gone["containerd"]["runtimes"]["podmig"].is_null());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_1_6_with_a_version_2_config_serves_the_handler() -> anyhow::Result<()> {
    prepare_and_check(2, Path::new("/usr/bin/containerd")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_with_a_version_3_config_serves_the_handler() -> anyhow::Result<()> {
    let binary =
        Path::new(&std::env::var("PODMIG_PREFIX").unwrap_or_else(|_| "/opt/podmig".into()))
            .join("containerd2/usr/bin/containerd");
    prepare_and_check(3, &binary).await
}

#[test]
fn a_node_without_a_runtime_configuration_gets_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(podmig_e2e::paths::bin("podmig"))
        .args(["prepare-node", "--restart", "none", "--host-root"])
        .arg(tmp.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("containerd config default"), "{err}");
}

/// podmig's image (scripts/build-images --podmig, here from the debug binaries) carries
/// what node preparation installs: run as the chart's init container runs it, with a
/// node's root at /host, it prepares that node; its CRIU runs.
#[test]
fn the_podmig_image_prepares_a_node_and_its_criu_runs() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let images = tmp.path().join("images");
    let bins = podmig_e2e::paths::bin("podmig")
        .parent()
        .context("bin dir")?
        .to_owned();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(repo.join("scripts/build-images"))
        .arg("--podmig")
        .arg(&bins)
        .arg(&images)
        .output()?;
    assert!(
        out.status.success(),
        "build-images: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let containerd = podmig_e2e::containerd::Containerd::start_with(
        podmig_e2e::containerd::ContainerdOptions {
            hook_socket: tmp.path().join("none.sock"),
            dir: None,
            netns: None,
            network: None,
            node_fs: None,
            cni_kubeconfig: None,
            version: Default::default(),
        },
    )?;
    containerd.ctr(&[
        "images",
        "import",
        &images.join("podmig.tar").display().to_string(),
    ])?;
    let host = tmp.path().join("host");
    std::fs::create_dir_all(host.join("etc/containerd"))?;
    std::fs::write(
        host.join("etc/containerd/config.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n",
    )?;
    let mount = format!(
        "type=bind,src={},dst=/host,options=rbind:rw",
        host.display()
    );
    let said = containerd.ctr(&[
        "run",
        "--rm",
        "--privileged",
        "--mount",
        &mount,
        "podmig.local/podmig:latest",
        "prepare-node",
        "podmig",
        "prepare-node",
        "--restart",
        "none",
    ])?;
    assert!(
        said.contains("installed into containerd (config version 2)"),
        "{said}"
    );
    for f in [
        "opt/podmig/bin/podmig-runc",
        "opt/podmig/bin/criu",
        "opt/podmig/criu/usr/sbin/criu",
        "etc/containerd/conf.d/podmig.toml",
    ] {
        assert!(host.join(f).is_file(), "{f} not installed");
    }
    let version = containerd.ctr(&[
        "run",
        "--rm",
        "podmig.local/podmig:latest",
        "criu-version",
        "/opt/podmig/bin/criu",
        "--version",
    ])?;
    assert!(version.contains("Version: 4."), "{version}");
    Ok(())
}
