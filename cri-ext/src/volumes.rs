//! The Pod's own volumes travel with its checkpoint: every `emptyDir` (disk or memory)
//! and the Pod's shared memory (`/dev/shm`, a tmpfs of the sandbox) a container mounts
//! are archived beside its images while it is frozen, and unpacked into the target
//! container's mounts at the same paths before CRIU restores into them. A file the app
//! held open there is then found, with the content it had at the freeze.
//!
//! Each container carries the volumes it mounts; when several containers of a Pod share
//! one, the first restored fills the target's (still empty) directory and the others
//! leave it as it is.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The list of carried volumes beside the images.
pub const VOLUMES: &str = "volumes.json";

/// What the file-system capture of one checkpoint cost, kept beside its images (in
/// [`FILESYSTEM`]) so that the target can report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemCapture {
    /// Bytes of the writable-layer archive and deletion list.
    pub layer_bytes: u64,
    /// Bytes of the volume archives.
    pub volume_bytes: u64,
    /// Time spent capturing both while the container was frozen, ms.
    pub capture_ms: u64,
}

/// The file name of [`FilesystemCapture`] beside the images.
pub const FILESYSTEM: &str = "filesystem.json";

impl FilesystemCapture {
    /// Writes it beside the images.
    pub fn write(&self, images: &Path) -> Result<()> {
        let path = images.join(FILESYSTEM);
        std::fs::write(&path, serde_json::to_vec(self).unwrap_or_default())
            .map_err(|e| Error::io("write", &path, e))
    }

    /// Reads it from beside the images (zero when absent).
    pub fn read(images: &Path) -> Self {
        std::fs::read(images.join(FILESYSTEM))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
}

/// One volume carried with a container's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedVolume {
    /// Where the container mounts it; the target's mount at the same path receives it.
    pub destination: String,
    /// The archive's file name beside the images; empty when the volume was empty.
    pub archive: String,
    /// The archive's size.
    pub bytes: u64,
}

/// A mount of a container: host source and path inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    /// The host directory.
    pub source: PathBuf,
    /// The path in the container.
    pub destination: String,
}

/// Whether a bind mount holds Pod-scoped state podmig carries: an `emptyDir` (kubelet
/// keeps them under `.../volumes/kubernetes.io~empty-dir/`) or the sandbox's `/dev/shm`.
pub fn is_carried(source: &str, destination: &str) -> bool {
    source.contains("/volumes/kubernetes.io~empty-dir/") || destination == "/dev/shm"
}

/// The carried bind mounts of a running container, from its runc `state.json`.
pub fn running_mounts(state: &serde_json::Value) -> Vec<HostMount> {
    let mounts = state["config"]["mounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    mounts
        .iter()
        .filter(|m| m["device"] == "bind")
        .filter_map(|m| host_mount(m["source"].as_str()?, m["destination"].as_str()?))
        .collect()
}

/// The carried bind mounts a bundle's `config.json` asks for.
pub fn bundle_mounts(bundle: &Path) -> Vec<HostMount> {
    let config: serde_json::Value = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mounts = config["mounts"].as_array().cloned().unwrap_or_default();
    mounts
        .iter()
        .filter(|m| {
            m["type"] == "bind"
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
        })
        .filter_map(|m| host_mount(m["source"].as_str()?, m["destination"].as_str()?))
        .collect()
}

fn host_mount(source: &str, destination: &str) -> Option<HostMount> {
    (is_carried(source, destination) && Path::new(source).is_dir()).then(|| HostMount {
        source: PathBuf::from(source),
        destination: destination.to_owned(),
    })
}

fn is_empty_dir(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io("read", dir, e))?
        .next()
        .is_none())
}

fn tar(args: &[&std::ffi::OsStr], what: &str) -> Result<()> {
    let out = Command::new("tar")
        .args(args)
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
        ])
        .output()
        .map_err(|source| Error::Spawn {
            command: "tar".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::CheckpointFailed(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Archives `mounts` into `images` (and lists them in [`VOLUMES`]); returns the bytes.
pub fn capture(mounts: &[HostMount], images: &Path) -> Result<u64> {
    let mut carried = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let (archive, bytes) = if is_empty_dir(&m.source)? {
            (String::new(), 0)
        } else {
            let name = format!("volume-{i}.tar");
            let path = images.join(&name);
            tar(
                &[
                    "--create".as_ref(),
                    "--file".as_ref(),
                    path.as_os_str(),
                    "--directory".as_ref(),
                    m.source.as_os_str(),
                    ".".as_ref(),
                ],
                &format!("capturing the volume at {}", m.destination),
            )?;
            (name, std::fs::metadata(&path).map_or(0, |x| x.len()))
        };
        carried.push(CarriedVolume {
            destination: m.destination.clone(),
            archive,
            bytes,
        });
    }
    if carried.is_empty() {
        return Ok(0);
    }
    let list = images.join(VOLUMES);
    std::fs::write(&list, serde_json::to_vec(&carried).unwrap_or_default())
        .map_err(|e| Error::io("write", &list, e))?;
    Ok(carried.iter().map(|c| c.bytes).sum())
}

/// Unpacks the volumes captured in `images` into the target's `mounts` at the same
/// paths; a target directory that already holds files (a sibling container restored
/// first) is left as it is. Returns the bytes unpacked.
pub fn apply(images: &Path, mounts: &[HostMount]) -> Result<u64> {
    let Ok(bytes) = std::fs::read(images.join(VOLUMES)) else {
        return Ok(0);
    };
    let carried: Vec<CarriedVolume> = serde_json::from_slice(&bytes).map_err(|e| {
        Error::RestoreFailed(format!("unreadable {VOLUMES} in {}: {e}", images.display()))
    })?;
    let by_path: HashMap<&str, &Path> = mounts
        .iter()
        .map(|m| (m.destination.as_str(), m.source.as_path()))
        .collect();
    let mut unpacked = 0;
    for v in carried {
        let Some(dir) = by_path.get(v.destination.as_str()) else {
            return Err(Error::RestoreFailed(format!(
                "the volume mounted at {} on the source has no counterpart in the target container",
                v.destination
            )));
        };
        if v.archive.is_empty() || !is_empty_dir(dir)? {
            continue;
        }
        if v.archive.contains('/') || v.archive == ".." || v.archive == "." {
            return Err(Error::RestoreFailed(format!(
                "bad archive name {:?}",
                v.archive
            )));
        }
        let archive = images.join(&v.archive);
        crate::untrusted::check_archive(&v.archive, &archive, dir).map_err(|r| {
            Error::RestoreFailed(format!(
                "the carried volume at {} is refused: {r}",
                v.destination
            ))
        })?;
        tar(
            &[
                "--extract".as_ref(),
                "--file".as_ref(),
                archive.as_os_str(),
                "--directory".as_ref(),
                dir.as_os_str(),
                "--same-permissions".as_ref(),
                "--same-owner".as_ref(),
            ],
            &format!("unpacking the volume at {}", v.destination),
        )
        .map_err(|e| Error::RestoreFailed(e.to_string()))?;
        unpacked += v.bytes;
    }
    Ok(unpacked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn only_empty_dirs_and_shm_are_carried() {
        assert!(is_carried(
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache",
            "/cache"
        ));
        assert!(is_carried("/run/containerd/sandboxes/x/shm", "/dev/shm"));
        assert!(!is_carried("/srv/data", "/data"));
        assert!(!is_carried(
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/c",
            "/etc/c"
        ));
    }

    #[test]
    fn volumes_arrive_with_content_modes_and_owners_and_a_filled_one_is_kept() {
        let src = tempfile::tempdir().expect("test setup");
        let images = tempfile::tempdir().expect("test setup");
        let dst = tempfile::tempdir().expect("test setup");
        let shm_src = tempfile::tempdir().expect("test setup");
        let shm_dst = tempfile::tempdir().expect("test setup");
        std::fs::create_dir(src.path().join("db")).expect("test setup");
        std::fs::write(src.path().join("db/rows"), b"1,2,3").expect("test setup");
        std::fs::set_permissions(
            src.path().join("db/rows"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("test setup");
        std::os::unix::fs::chown(src.path().join("db/rows"), Some(1000), Some(1000))
            .expect("test setup");
        std::fs::write(shm_dst.path().join("sibling"), b"there first").expect("test setup");
        std::fs::write(shm_src.path().join("seg"), b"shared").expect("test setup");
        let src_mounts = [
            HostMount {
                source: src.path().into(),
                destination: "/data".into(),
            },
            HostMount {
                source: shm_src.path().into(),
                destination: "/dev/shm".into(),
            },
        ];
        let bytes = capture(&src_mounts, images.path()).expect("test setup");
        assert!(bytes > 0);
        let dst_mounts = [
            HostMount {
                source: dst.path().into(),
                destination: "/data".into(),
            },
            HostMount {
                source: shm_dst.path().into(),
                destination: "/dev/shm".into(),
            },
        ];
        apply(images.path(), &dst_mounts).expect("test setup");
        let rows = dst.path().join("db/rows");
        assert_eq!(std::fs::read(&rows).expect("test setup"), b"1,2,3");
        let meta = std::fs::metadata(&rows).expect("test setup");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
        assert!(
            !shm_dst.path().join("seg").exists(),
            "a volume a sibling already filled is left alone"
        );
        // A target without the mount cannot receive the volume: the restore fails.
        let err = apply(images.path(), &dst_mounts[1..]).expect_err("no counterpart");
        assert!(err.to_string().contains("/data"), "{err}");
    }
}
