//! The container's writable layer travels with its checkpoint, like Podman's and CRI-O's
//! rootfs diff: what changed in the root file system since the container started (the
//! overlay upper directory) is captured beside the images — files, directories, symlinks
//! with owners, modes and xattrs in `rootfs-diff.tar`, deletions (overlay whiteouts) in
//! `rootfs-deleted.json` — and applied to the target container's fresh root file system
//! before CRIU restores into it. Without it CRIU refuses to restore a process that holds a
//! file of its writable layer open, the most common failure of CRIU-based migration.

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Error, Result};

/// The archive of changed and new entries.
pub const DIFF_TAR: &str = "rootfs-diff.tar";
/// The JSON list of deleted paths.
pub const DELETED: &str = "rootfs-deleted.json";

/// runc's `state.json` of container `id` (null when unreadable).
pub fn runc_state(runc_root: &Path, id: &str) -> serde_json::Value {
    std::fs::read(runc_root.join(id).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The root file system of container `id` (its bundle's rootfs mount), from runc's state.
pub fn container_rootfs(runc_root: &Path, id: &str) -> Option<PathBuf> {
    rootfs_in(&runc_state(runc_root, id))
}

/// The root file system a runc `state.json` names.
pub fn rootfs_in(state: &serde_json::Value) -> Option<PathBuf> {
    state["config"]["rootfs"].as_str().map(PathBuf::from)
}

/// The root file system a bundle's `config.json` names (relative to the bundle or absolute).
pub fn bundle_rootfs(bundle: &Path) -> Option<PathBuf> {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).ok()?).ok()?;
    let root = PathBuf::from(config["root"]["path"].as_str()?);
    Some(if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    })
}

/// The overlay upper directory of the file system mounted at `mountpoint`, from
/// `/proc/self/mountinfo` (`None` when it is not an overlay mount).
pub fn upperdir_of(mountpoint: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    upperdir_in(&info, mountpoint)
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// [`upperdir_of`] over the text of a mountinfo file (the last mount there wins).
pub fn upperdir_in(mountinfo: &str, mountpoint: &Path) -> Option<PathBuf> {
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = left.split(' ').nth(4)?;
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let _source = r.next()?;
        let options = r.next()?;
        (fstype == "overlay" && Path::new(&unescape(point)) == mountpoint).then(|| {
            options
                .split(',')
                .find_map(|o| o.strip_prefix("upperdir="))
                .map(|u| PathBuf::from(unescape(u)))
        })?
    })
}

/// Whether overlayfs marked directory `dir` of an upper layer opaque: it replaces the
/// lower layers' directory instead of merging with it.
pub fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|name| matches!(xattr::get(dir, name), Ok(Some(v)) if v.as_slice() == b"y"))
}

/// Entries of `upper` relative to it: (kept entries, deletions: whiteouts and opaque
/// directories, which are removed on the target before the kept entries arrive).
fn walk(upper: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut kept, mut deleted) = (Vec::new(), Vec::new());
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(upper.join(&rel))? {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let meta = entry.metadata()?;
            let ft = meta.file_type();
            if ft.is_char_device() && meta.rdev() == 0 {
                deleted.push(path);
            } else {
                if ft.is_dir() {
                    if is_opaque(&upper.join(&path)) {
                        // Deleted and made again: the image's entries below it are gone.
                        deleted.push(path.clone());
                    }
                    stack.push(path.clone());
                }
                kept.push(path);
            }
        }
    }
    kept.sort();
    deleted.sort();
    Ok((kept, deleted))
}

/// Captures the writable layer `upper` into `images`; returns the bytes written.
pub fn capture(upper: &Path, images: &Path) -> Result<u64> {
    let (kept, deleted) = walk(upper).map_err(|e| Error::io("walk", upper, e))?;
    let deleted_path = images.join(DELETED);
    let list: Vec<String> = deleted.iter().map(|p| p.display().to_string()).collect();
    std::fs::write(&deleted_path, serde_json::to_vec(&list).unwrap_or_default())
        .map_err(|e| Error::io("write", &deleted_path, e))?;
    let names = images.join("rootfs-diff.list");
    let mut nul = Vec::new();
    for p in &kept {
        nul.extend_from_slice(p.as_os_str().as_encoded_bytes());
        nul.push(0);
    }
    std::fs::write(&names, nul).map_err(|e| Error::io("write", &names, e))?;
    let tar = images.join(DIFF_TAR);
    let out = Command::new("tar")
        .args(["--create", "--file"])
        .arg(&tar)
        .arg("--directory")
        .arg(upper)
        .args([
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            // overlayfs' own marks mean nothing on the target, which refuses them.
            "--xattrs-exclude=trusted.overlay.*",
            "--xattrs-exclude=user.overlay.*",
            "--acls",
            "--no-recursion",
            "--null",
            "--files-from",
        ])
        .arg(&names)
        .output()
        .map_err(|source| Error::Spawn {
            command: "tar".into(),
            source,
        })?;
    let _ = std::fs::remove_file(&names);
    if !out.status.success() {
        return Err(Error::CheckpointFailed(format!(
            "capturing the writable layer {}: {}",
            upper.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let bytes = std::fs::metadata(&tar).map_or(0, |m| m.len())
        + std::fs::metadata(&deleted_path).map_or(0, |m| m.len());
    Ok(bytes)
}

/// Applies a captured writable layer in `images` (if there is one) to `rootfs`:
/// deletions first, then the changed and new entries. Both come from another node: each
/// is checked ([`crate::untrusted`]) before it touches `rootfs`.
pub fn apply(images: &Path, rootfs: &Path) -> Result<bool> {
    let tar = images.join(DIFF_TAR);
    if !tar.is_file() {
        return Ok(false);
    }
    let refused = |r: crate::untrusted::Refusal| {
        Error::RestoreFailed(format!("the carried writable layer is refused: {r}"))
    };
    let deleted_path = images.join(DELETED);
    let deleted: Vec<String> = match std::fs::read(&deleted_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            refused(crate::untrusted::Refusal::Unreadable {
                what: DELETED.into(),
                reason: e.to_string(),
            })
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("read", &deleted_path, e)),
    };
    crate::untrusted::check_deletions(DELETED, &deleted, rootfs).map_err(refused)?;
    for rel in &deleted {
        let target = rootfs.join(rel);
        let removed = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        };
        removed.map_err(|e| Error::io("remove", &target, e))?;
    }
    crate::untrusted::check_archive(DIFF_TAR, &tar, rootfs).map_err(refused)?;
    let out = Command::new("tar")
        .args(["--extract", "--file"])
        .arg(&tar)
        .arg("--directory")
        .arg(rootfs)
        .args([
            "--numeric-owner",
            "--same-permissions",
            "--same-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            // Not --overwrite: an existing file is unlinked, never written through.
        ])
        .output()
        .map_err(|source| Error::Spawn {
            command: "tar".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::RestoreFailed(format!(
            "applying the writable layer to {}: {}",
            rootfs.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finds_the_upper_directory_of_an_overlay_mount() {
        let info = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
            2 1 0:50 / /run/c/k8s.io/abc/rootfs rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/snap/9/fs,workdir=/snap/9/work\n\
            3 1 0:51 / /run/with\\040space rw - overlay overlay rw,upperdir=/u\\040x,workdir=/w\n";
        assert_eq!(
            upperdir_in(info, Path::new("/run/c/k8s.io/abc/rootfs")),
            Some(PathBuf::from("/snap/9/fs"))
        );
        assert_eq!(
            upperdir_in(info, Path::new("/run/with space")),
            Some(PathBuf::from("/u x"))
        );
        assert_eq!(upperdir_in(info, Path::new("/")), None);
    }

    #[test]
    fn carries_new_changed_and_deleted_files_with_their_modes() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (upper, images, rootfs) = (
            tmp.path().join("upper"),
            tmp.path().join("images"),
            tmp.path().join("rootfs"),
        );
        for d in [&upper, &images, &rootfs] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::create_dir_all(upper.join("data/sub")).expect("dir");
        std::fs::write(upper.join("data/sub/state.db"), b"state").expect("write");
        std::fs::set_permissions(
            upper.join("data/sub/state.db"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("sub/state.db", upper.join("data/link")).expect("symlink");
        // A whiteout: the image's /etc/group was deleted in the container.
        std::fs::create_dir_all(upper.join("etc")).expect("dir");
        let status = Command::new("mknod")
            .arg(upper.join("etc/group"))
            .args(["c", "0", "0"])
            .status()
            .expect("mknod");
        assert!(status.success());
        std::fs::create_dir_all(rootfs.join("etc")).expect("dir");
        std::fs::write(rootfs.join("etc/group"), b"root:x:0:").expect("write");
        std::fs::write(rootfs.join("etc/passwd"), b"root").expect("write");

        assert!(capture(&upper, &images).expect("capture") > 0);
        assert!(apply(&images, &rootfs).expect("apply"));
        assert_eq!(
            std::fs::read(rootfs.join("data/sub/state.db")).expect("read"),
            b"state"
        );
        let mode = std::fs::metadata(rootfs.join("data/sub/state.db"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            std::fs::read_link(rootfs.join("data/link")).expect("link"),
            PathBuf::from("sub/state.db")
        );
        assert!(
            !rootfs.join("etc/group").exists(),
            "deleted in the source, gone on the target"
        );
        assert!(rootfs.join("etc/passwd").exists());
        // No captured layer: nothing to do.
        assert!(!apply(&tmp.path().join("none"), &rootfs).expect("nothing"));
    }

    /// A directory of the image deleted and made again in a real overlay mount is opaque
    /// in the upper layer: on the target it replaces the image's, it is not merged.
    #[test]
    fn a_directory_deleted_and_made_again_replaces_the_image_s() {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = |s: &str| tmp.path().join(s);
        for d in [
            "lower/srv",
            "upper",
            "work",
            "merged",
            "images",
            "target/srv",
        ] {
            std::fs::create_dir_all(p(d)).expect("dir");
        }
        for root in ["lower", "target"] {
            std::fs::write(p(root).join("srv/old.txt"), b"image").expect("write");
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            p("lower").display(),
            p("upper").display(),
            p("work").display()
        );
        let mounted = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(p("merged"))
            .status()
            .expect("mount");
        assert!(mounted.success(), "overlay mount");
        let merged = p("merged");
        let result = std::panic::catch_unwind(|| {
            std::fs::remove_dir_all(merged.join("srv")).expect("rm");
            std::fs::create_dir(merged.join("srv")).expect("mkdir");
            std::fs::write(merged.join("srv/new.txt"), b"container").expect("write");
        });
        let _ = Command::new("umount").arg(&merged).status();
        result.expect("changes through the overlay");
        assert!(is_opaque(&p("upper/srv")), "overlayfs marked it opaque");
        capture(&p("upper"), &p("images")).expect("capture");
        assert!(apply(&p("images"), &p("target")).expect("apply"));
        assert_eq!(
            std::fs::read(p("target/srv/new.txt")).expect("new"),
            b"container"
        );
        assert!(!p("target/srv/old.txt").exists(), "replaced, not merged");
        assert!(!is_opaque(&p("target/srv")), "overlay marks stay behind");
    }

    /// A peer's layer that reaches out through a link of the image is refused before
    /// anything is written, and the refusal names the check.
    #[test]
    fn a_hostile_layer_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (images, rootfs, outside) = (
            tmp.path().join("images"),
            tmp.path().join("rootfs"),
            tmp.path().join("outside"),
        );
        for d in [&images, &rootfs, &outside] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::os::unix::fs::symlink(&outside, rootfs.join("var")).expect("symlink");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        b.append_data(&mut h, "fresh.txt", &b"benign"[..])
            .expect("append");
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o644);
        b.append_data(&mut h, "var/pwned", &b"pwned!"[..])
            .expect("append");
        std::fs::write(images.join(DIFF_TAR), b.into_inner().expect("tar")).expect("write");
        std::fs::write(images.join(DELETED), b"[]").expect("write");
        let err = apply(&images, &rootfs).expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("symbolic link") && text.contains("var/pwned"),
            "{text}"
        );
        assert!(!rootfs.join("fresh.txt").exists(), "nothing applied");
        assert_eq!(std::fs::read_dir(&outside).expect("read").count(), 0);
        // A deletion list that reaches out is refused too, and deletes nothing.
        std::fs::write(outside.join("keep"), b"k").expect("write");
        std::fs::write(images.join(DELETED), br#"["var/keep"]"#).expect("write");
        assert!(apply(&images, &rootfs).is_err());
        assert!(outside.join("keep").exists());
    }
}
