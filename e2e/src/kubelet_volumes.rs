//! The kubelet stand-in's volumes, laid out as kubelet lays them out so that podmig sees
//! what it sees on a real node: `emptyDir` under `<root>/pods/<uid>/volumes/
//! kubernetes.io~empty-dir/<name>` (a tmpfs for `medium: Memory`), `hostPath` below the
//! node's own root (each node of the local cluster has a file system of its own, as real
//! nodes have), `subPath`/`subPathExpr` resolved against the container's environment, and
//! the downward API's `fieldRef` environment variables; `secret`, `configMap` and
//! `projected` volumes with what `kubelet_projected` fetched. Other kinds are not mounted.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Component, Path, PathBuf},
    process::Command,
};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

/// Where a node keeps Pod volumes and what it calls its root file system.
#[derive(Debug, Clone)]
pub struct VolumeRoots {
    /// kubelet's root directory on the host (the node's `/var/lib/kubelet`).
    pub kubelet_root: PathBuf,
    /// The node's file system (hostPath volumes live below its root; mounts are given to
    /// the runtime as the node sees them).
    pub node: crate::node_fs::NodeFs,
}

impl VolumeRoots {
    /// The volumes of node file system `node`, kubelet's root where a real node has it.
    pub fn of(node: crate::node_fs::NodeFs) -> Self {
        Self {
            kubelet_root: node.root.join("var/lib/kubelet"),
            node,
        }
    }
}

/// The emptyDir directory of volume `name` of Pod `uid`, where kubelet puts it.
pub fn empty_dir_path(kubelet_root: &Path, uid: &str, name: &str) -> PathBuf {
    kubelet_root
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(name)
}

/// A path made relative and free of `..`, or `None` when it would leave its root.
fn relative(p: &str) -> Option<PathBuf> {
    let rel: PathBuf = Path::new(p)
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect();
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(rel)
}

/// Makes the Pod's volumes on the node (`api_backed`: what its secret, configMap and
/// projected volumes hold, fetched beforehand); returns each volume's host directory by name.
pub fn set_up(
    roots: &VolumeRoots,
    pod: &Pod,
    api_backed: &BTreeMap<String, crate::kubelet_projected::Contents>,
) -> anyhow::Result<HashMap<String, PathBuf>> {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let mut dirs = HashMap::new();
    for (name, contents) in api_backed {
        let dir = roots
            .kubelet_root
            .join("pods")
            .join(&uid)
            .join("volumes")
            .join(contents.kind)
            .join(name);
        std::fs::create_dir_all(&dir)?;
        if contents.memory && !is_mountpoint(&dir) {
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"])
                .arg(&dir)
                .status()?;
            anyhow::ensure!(st.success(), "mounting tmpfs for volume {name:?}");
        }
        for f in &contents.files {
            let rel = relative(&f.path.display().to_string())
                .ok_or_else(|| anyhow::anyhow!("volume {name:?}: path {:?} leaves it", f.path))?;
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, &f.bytes)?;
            std::fs::set_permissions(
                &path,
                std::os::unix::fs::PermissionsExt::from_mode(f.mode & 0o7777),
            )?;
        }
        dirs.insert(name.clone(), dir);
    }
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        if let Some(ed) = &v.empty_dir {
            let dir = empty_dir_path(&roots.kubelet_root, &uid, &v.name);
            std::fs::create_dir_all(&dir)?;
            if ed.medium.as_deref() == Some("Memory") && !is_mountpoint(&dir) {
                let mut opts = "mode=0777".to_owned();
                if let Some(limit) = &ed.size_limit {
                    opts.push_str(&format!(",size={}", limit.0.trim_end_matches('i')));
                }
                let st = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
                    .arg(&dir)
                    .status()?;
                anyhow::ensure!(st.success(), "mounting tmpfs for emptyDir {:?}", v.name);
            }
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            dirs.insert(v.name.clone(), dir);
        } else if let Some(hp) = &v.host_path {
            let dir = roots
                .node
                .host_path(&hp.path)
                .ok_or_else(|| anyhow::anyhow!("hostPath {:?} leaves the node's root", hp.path))?;
            match hp.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => std::fs::create_dir_all(&dir)?,
                "FileOrCreate" => {
                    if let Some(parent) = dir.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&dir)?;
                }
                "Directory" => anyhow::ensure!(
                    dir.is_dir(),
                    "hostPath type check failed: {} is not a directory",
                    hp.path
                ),
                "File" => anyhow::ensure!(
                    dir.is_file(),
                    "hostPath type check failed: {} is not a file",
                    hp.path
                ),
                _ => {}
            }
            dirs.insert(v.name.clone(), dir);
        }
    }
    Ok(dirs)
}

fn is_mountpoint(dir: &Path) -> bool {
    crate::containerd::mounts_under(dir)
        .iter()
        .any(|m| Path::new(m) == dir)
}

/// Removes the Pod's volumes (unmounting memory-backed ones), as kubelet does once the
/// Pod is gone.
pub fn tear_down(roots: &VolumeRoots, uid: &str) {
    let pod_dir = roots.kubelet_root.join("pods").join(uid);
    let mut mounts = crate::containerd::mounts_under(&pod_dir);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    let _ = std::fs::remove_dir_all(pod_dir);
}

/// The value of a downward-API field, as kubelet fills `env[].valueFrom.fieldRef`.
pub fn field(pod: &Pod, path: &str) -> Option<String> {
    let m = &pod.metadata;
    match path {
        "metadata.name" => m.name.clone(),
        "metadata.namespace" => m.namespace.clone(),
        "metadata.uid" => m.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "status.podIP" => pod.status.as_ref()?.pod_ip.clone(),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone(),
        _ => {
            let key = path
                .strip_prefix("metadata.labels['")
                .map(|k| (k, true))
                .or_else(|| {
                    path.strip_prefix("metadata.annotations['")
                        .map(|k| (k, false))
                })?;
            let name = key.0.strip_suffix("']")?;
            let map = if key.1 { &m.labels } else { &m.annotations };
            map.as_ref()?.get(name).cloned()
        }
    }
}

/// The container's environment: literal values and downward-API fields, with `$(VAR)`
/// references to earlier variables expanded, as kubelet does.
pub fn environment(pod: &Pod, c: &Container) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for EnvVar {
        name,
        value,
        value_from,
    } in c.env.clone().unwrap_or_default()
    {
        let v = match (value, value_from.and_then(|f| f.field_ref)) {
            (Some(v), _) => expand(&v, &env),
            (None, Some(f)) => field(pod, &f.field_path).unwrap_or_default(),
            (None, None) => String::new(),
        };
        env.push((name, v));
    }
    env
}

/// Expands `$(NAME)` with the variables defined so far; unknown references stay as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) => {
                let name = &after[..end];
                match env.iter().rev().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The container's CRI mounts for its `volumeMounts`, their sources as the node sees them.
pub fn mounts(
    c: &Container,
    roots: &VolumeRoots,
    dirs: &HashMap<String, PathBuf>,
    env: &[(String, String)],
) -> anyhow::Result<Vec<cri::Mount>> {
    let mut out = Vec::new();
    for vm in c.volume_mounts.clone().unwrap_or_default() {
        let Some(dir) = dirs.get(&vm.name) else {
            continue;
        };
        let sub = match (&vm.sub_path, &vm.sub_path_expr) {
            (Some(p), _) if !p.is_empty() => Some(p.clone()),
            (_, Some(e)) if !e.is_empty() => Some(expand(e, env)),
            _ => None,
        };
        let host = match sub {
            Some(s) => {
                let rel = relative(&s)
                    .ok_or_else(|| anyhow::anyhow!("subPath {s:?} leaves volume {}", vm.name))?;
                let p = dir.join(rel);
                if !p.exists() {
                    std::fs::create_dir_all(&p)?;
                    std::fs::set_permissions(
                        &p,
                        std::os::unix::fs::PermissionsExt::from_mode(0o777),
                    )?;
                }
                p
            }
            None => dir.clone(),
        };
        let propagation = match vm.mount_propagation.as_deref() {
            Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
            _ => cri::MountPropagation::PropagationPrivate,
        };
        out.push(cri::Mount {
            container_path: vm.mount_path.clone(),
            host_path: roots.node.node_view(&host).display().to_string(),
            readonly: vm.read_only.unwrap_or(false),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_expand_in_order_and_unknown_ones_stay() {
        let env = vec![("A".to_owned(), "x".to_owned()), ("B".into(), "y".into())];
        assert_eq!(expand("$(A)/$(B)/$(C)", &env), "x/y/$(C)");
        assert_eq!(expand("plain", &env), "plain");
        assert_eq!(expand("open $(A", &env), "open $(A");
    }

    #[test]
    fn paths_cannot_leave_their_root() {
        assert_eq!(relative("/srv/data"), Some(PathBuf::from("srv/data")));
        assert_eq!(relative("../etc"), None);
        assert_eq!(relative("a/../../b"), None);
    }
}
