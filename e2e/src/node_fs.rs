//! Each node of the local cluster sees a file system of its own at the paths a real node
//! has: a mount namespace per node (kept by a bind mount of its `ns/mnt` file) in which
//! `node-N/root/{run/containerd,var/lib/containerd,var/lib/kubelet,run/podmig,var/lib/podmig}`
//! are mounted at `/run/containerd`, `/var/lib/containerd`, … (`node-N/root/run` is a
//! tmpfs, as a real node's `/run` is). The node's containerd (with
//! its shims, runc, `podmig-runc` and CRIU) and a podmig daemon run as a process enter it,
//! so the paths they exchange — runc's state root, checkpoint images, the hook socket,
//! volume directories — are the ones a podmig daemon Pod sees through the chart's hostPath
//! volumes, exactly as on a real node.
//!
//! Propagation: `node-N/root` is a shared mount on the host and the node's namespace keeps
//! the host's propagation (the host's `/` is private), so its own directories are peers of
//! their `node-N/root/…` counterparts: the volumes the kubelet stand-in mounts from the host
//! (tmpfs for memory emptyDirs, secrets, projected volumes) appear inside the node, the
//! node's mounts there (container root file systems) reach the containers that ask for
//! them (`mountPropagation: HostToContainer`) and show on the host below `node-N/root`
//! (never at the host's own `/run/containerd` or in other nodes); the Pods' network
//! namespaces containerd mounts in `/run/netns` are the host's, as `ip netns` expects.

use std::{
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::Context;

/// Directories a node has of its own, relative to `/`.
pub const NODE_DIRS: &[&str] = &[
    "run/containerd",
    "var/lib/containerd",
    "var/lib/kubelet",
    "run/podmig",
    "var/lib/podmig",
];

/// Host paths a node shares with the host, as real nodes' kernels provide them.
const KERNEL_DIRS: &[&str] = &["sys", "proc", "dev"];

/// One node's file system: its root directory on the host and its mount namespace.
#[derive(Debug, Clone)]
pub struct NodeFs {
    /// The directory standing for the node's `/` on the host (`node-N/root`).
    pub root: PathBuf,
    /// The file keeping the node's mount namespace (`node-N/ns/mnt`).
    pub ns_file: PathBuf,
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn is_mountpoint(p: &Path) -> bool {
    crate::containerd::mounts_under(p)
        .iter()
        .any(|m| Path::new(m) == p)
}

impl NodeFs {
    /// The node file system of node directory `node_dir` (not created).
    pub fn of(node_dir: &Path) -> Self {
        Self {
            root: node_dir.join("root"),
            ns_file: node_dir.join("ns").join("mnt"),
        }
    }

    /// Creates the node's directories and mount namespace (or keeps those a crashed run
    /// left, when still mounted).
    pub fn create(node_dir: &Path) -> anyhow::Result<Self> {
        let fs = Self::of(node_dir);
        let root = fs.root.display().to_string();
        std::fs::create_dir_all(&fs.root)?;
        if !is_mountpoint(&fs.root) {
            sh("mount", &["--bind", &root, &root])?;
            sh("mount", &["--make-shared", &root])?;
        }
        // A node's /run is memory, as on real nodes (checkpoint images live there).
        let run = fs.root.join("run");
        std::fs::create_dir_all(&run)?;
        if !is_mountpoint(&run) {
            sh(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    "mode=0755",
                    "tmpfs",
                    &run.display().to_string(),
                ],
            )?;
        }
        std::fs::create_dir_all(fs.root.join("var/lib/kubelet/pods"))?;
        for d in NODE_DIRS {
            std::fs::create_dir_all(fs.root.join(d))?;
            // The mount point on the host's own file system (empty; nothing of the
            // host's is hidden anywhere but inside the node).
            std::fs::create_dir_all(Path::new("/").join(d))?;
        }
        if is_mountpoint(&fs.ns_file) {
            return Ok(fs);
        }
        // A persistent namespace's file must sit on a mount that is not shared.
        let ns_dir = fs.ns_file.parent().context("ns dir")?.to_owned();
        std::fs::create_dir_all(&ns_dir)?;
        let ns = ns_dir.display().to_string();
        if !is_mountpoint(&ns_dir) {
            sh("mount", &["--bind", &ns, &ns])?;
            sh("mount", &["--make-private", &ns])?;
        }
        std::fs::write(&fs.ns_file, b"")?;
        let script: String = NODE_DIRS
            .iter()
            .map(|d| {
                format!(
                    "mount --bind '{root}/{d}' '/{d}' && mount --make-shared '/{d}' && ",
                    root = root
                )
            })
            .collect::<String>()
            + "true";
        sh(
            "unshare",
            &[
                &format!("--mount={}", fs.ns_file.display()),
                "--propagation",
                "unchanged",
                "sh",
                "-c",
                &script,
            ],
        )
        .context("creating the node's mount namespace")?;
        Ok(fs)
    }

    /// `nsenter` arguments that run a command inside the node's mount namespace.
    pub fn enter_args(&self) -> Vec<String> {
        vec![format!("--mount={}", self.ns_file.display())]
    }
}

/// A command running `program` in a node's network namespace and file system, each when
/// given. NB: `nsenter`, not `ip netns exec`, which remounts `/sys` and so hides the cgroup
/// mounts runc needs.
pub fn node_command(
    program: impl AsRef<std::ffi::OsStr>,
    netns: Option<&str>,
    fs: Option<&NodeFs>,
) -> Command {
    let mut enter: Vec<String> = netns
        .map(|ns| format!("--net=/var/run/netns/{ns}"))
        .into_iter()
        .collect();
    enter.extend(fs.iter().flat_map(|f| f.enter_args()));
    if enter.is_empty() {
        return Command::new(program);
    }
    let mut c = Command::new("nsenter");
    c.args(&enter).arg(program);
    c
}

impl NodeFs {
    /// The path inside the node of host path `host`: below one of the node's own
    /// directories it is that directory's node path, elsewhere it is the same.
    pub fn node_view(&self, host: &Path) -> PathBuf {
        let Ok(rel) = host.strip_prefix(&self.root) else {
            return host.to_path_buf();
        };
        if NODE_DIRS.iter().any(|d| rel.starts_with(d)) {
            Path::new("/").join(rel)
        } else {
            host.to_path_buf()
        }
    }

    /// The host path of a path the node's runtime reports (runc's state, a container's
    /// mounts): below one of the node's own directories it lives under the node's root;
    /// any other path is the host's own.
    pub fn host_of(&self, node_path: &Path) -> PathBuf {
        let Ok(rel) = node_path.strip_prefix("/") else {
            return node_path.to_path_buf();
        };
        if NODE_DIRS.iter().any(|d| rel.starts_with(d)) {
            self.root.join(rel)
        } else {
            node_path.to_path_buf()
        }
    }

    /// The host path of node path `path` (absolute): the kernel's file systems (`/sys`,
    /// `/proc`, `/dev`) are the host's, everything else lives below the node's root.
    pub fn host_path(&self, path: &str) -> Option<PathBuf> {
        let rel: PathBuf = Path::new(path)
            .components()
            .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
            .collect();
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return None;
        }
        if KERNEL_DIRS.iter().any(|k| rel.starts_with(k)) {
            return Some(Path::new("/").join(rel));
        }
        Some(self.root.join(rel))
    }

    /// Releases the node's mount namespace (its mounts go with its last process) and the
    /// host's mounts of its root.
    pub fn remove(&self) {
        let mut mounts: Vec<String> = [self.ns_file.parent(), Some(self.root.as_path())]
            .into_iter()
            .flatten()
            .flat_map(crate::containerd::mounts_under)
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_paths_map_to_the_nodes_root_except_the_kernels() {
        let fs = NodeFs::of(Path::new("/c/node-0"));
        assert_eq!(
            fs.host_path("/run/podmig/hook.sock"),
            Some(PathBuf::from("/c/node-0/root/run/podmig/hook.sock"))
        );
        assert_eq!(
            fs.host_path("/sys/fs/cgroup"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(fs.host_path("/srv/../../etc"), None);
        assert_eq!(
            fs.node_view(Path::new("/c/node-0/root/var/lib/kubelet/pods/u")),
            PathBuf::from("/var/lib/kubelet/pods/u")
        );
        // Below the node's root but not one of its own mounts: only the host path exists.
        assert_eq!(
            fs.node_view(Path::new("/c/node-0/root/srv/data")),
            PathBuf::from("/c/node-0/root/srv/data")
        );
        assert_eq!(
            fs.node_view(Path::new("/dev/shm/x")),
            PathBuf::from("/dev/shm/x")
        );
        assert_eq!(
            fs.host_of(Path::new(
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/a/rootfs"
            )),
            PathBuf::from(
                "/c/node-0/root/run/containerd/io.containerd.runtime.v2.task/k8s.io/a/rootfs"
            )
        );
        assert_eq!(
            fs.host_of(Path::new("/var/tmp/x")),
            PathBuf::from("/var/tmp/x")
        );
    }
}
