//! Where checkpoints live on a node: `<root>/<pod-uid>/<container-name>/`, root-only.

use std::path::{Path, PathBuf};

/// The node's checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
}

impl CheckpointStore {
    /// A store below `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Image directory of one container of one Pod. `None` for names that could escape
    /// the store (path separators, `..`): both parts come from outside.
    pub fn path_for(&self, pod_uid: &str, container: &str) -> Option<PathBuf> {
        let safe = |s: &str| {
            !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
        };
        (safe(pod_uid) && safe(container)).then(|| self.root.join(pod_uid).join(container))
    }

    /// True when a complete checkpoint (CRIU's inventory image) exists there.
    pub fn has_checkpoint(&self, dir: &Path) -> bool {
        dir.join("inventory.img").is_file()
    }

    /// Removes a checkpoint and its Pod directory when that became empty.
    pub fn remove(&self, dir: &Path) {
        // What a killed CRIU left mounted inside (its cgroup yard) would keep it.
        let detached = podmig_cri_ext::stray::detach_mounts_below(dir);
        if detached > 0 {
            tracing::warn!(dir = %dir.display(), mounts = detached, "detached mounts a CRIU run left in a checkpoint");
        }
        if let Err(error) = std::fs::remove_dir_all(dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), %error, "cannot remove checkpoint");
        }
        if let Some(parent) = dir
            .parent()
            .filter(|p| p.starts_with(&self.root) && *p != self.root)
        {
            let _ = std::fs::remove_dir(parent); // only succeeds when empty
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape_the_store() {
        let s = CheckpointStore::new("/s");
        assert_eq!(s.path_for("u1", "app"), Some(PathBuf::from("/s/u1/app")));
        assert_eq!(s.path_for("..", "app"), None);
        assert_eq!(s.path_for("u1", "a/b"), None);
        assert_eq!(s.path_for("", "app"), None);
    }

    #[test]
    fn remove_drops_empty_pod_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = CheckpointStore::new(tmp.path());
        let dir = s.path_for("u1", "app").expect("path");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("inventory.img"), b"x").expect("write");
        assert!(s.has_checkpoint(&dir));
        s.remove(&dir);
        assert!(!tmp.path().join("u1").exists());
        assert!(tmp.path().exists());
    }
}
