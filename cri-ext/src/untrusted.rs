//! What a peer sends is untrusted input: the writable-layer archive, its list of deletions
//! and the volume archives come from another node, and the target applies them as root
//! into a container's root file system before anything runs. Each is checked here first,
//! entry by entry, against the directory it will land in: every path stays below it (no
//! `..`, nothing absolute, no symbolic link on the way — neither one already there nor
//! one the archive makes), hard links point inside, no device nodes, and no new
//! privilege (setuid/setgid bits or file capabilities the image's file did not already
//! have). A refusal names the check and the entry.

use std::{
    collections::HashSet,
    fs::File,
    io::BufReader,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

/// The extended attribute holding a file's capabilities (a privilege like setuid).
const CAPABILITY_XATTR: &str = "SCHILY.xattr.security.capability";

/// Why something a peer sent is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The archive or list cannot be read as one.
    #[error("{what} is unreadable: {reason}")]
    Unreadable {
        /// Which input.
        what: String,
        /// Why.
        reason: String,
    },
    /// A path is absolute, empty or climbs with `..`.
    #[error("{what}: {path:?} leaves its root (absolute or `..`)")]
    Escapes {
        /// Which input.
        what: String,
        /// The path as sent.
        path: String,
    },
    /// A path goes through a symbolic link (already on disk or made by the archive).
    #[error("{what}: {path:?} goes through the symbolic link {link:?}")]
    ThroughSymlink {
        /// Which input.
        what: String,
        /// The path as sent.
        path: String,
        /// The link on its way.
        link: String,
    },
    /// A device node.
    #[error("{what}: {path:?} is a device node")]
    Device {
        /// Which input.
        what: String,
        /// The path as sent.
        path: String,
    },
    /// A hard link to something outside the root.
    #[error("{what}: hard link {path:?} points at {target:?}, outside its root")]
    LinkOut {
        /// Which input.
        what: String,
        /// The link.
        path: String,
        /// What it points at.
        target: String,
    },
    /// Setuid/setgid bits or file capabilities the file on the target does not have.
    #[error("{what}: {path:?} would gain a privilege ({privilege}) the image's file does not have")]
    NewPrivilege {
        /// Which input.
        what: String,
        /// The path as sent.
        path: String,
        /// setuid, setgid or file capabilities.
        privilege: &'static str,
    },
    /// An entry kind the capture never makes (sparse files, tar extensions podmig does not write).
    #[error("{what}: {path:?} has an entry type podmig does not carry ({kind})")]
    Unsupported {
        /// Which input.
        what: String,
        /// The path as sent.
        path: String,
        /// The kind.
        kind: String,
    },
}

/// The path as relative components below a root, or `None` when it would leave it
/// (`./` prefixes are dropped; absolute, empty or `..` paths leave).
pub fn contained(path: &Path) -> Option<PathBuf> {
    below(path).filter(|p| !p.as_os_str().is_empty())
}

/// [`contained`], except that the root itself (`.`, `./`) is the empty path.
fn below(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// The first proper ancestor of `rel` (below `root`) that is a symbolic link on disk.
fn symlink_on_disk(root: &Path, rel: &Path) -> Option<PathBuf> {
    rel.ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| std::fs::symlink_metadata(root.join(a)).is_ok_and(|m| m.file_type().is_symlink()))
        .map(Path::to_path_buf)
}

/// Checks the list of deletions `paths` (relative to `root`): each stays below it and
/// reaches its entry through real directories only.
pub fn check_deletions(what: &str, paths: &[String], root: &Path) -> Result<(), Refusal> {
    for path in paths {
        let rel = contained(Path::new(path)).ok_or_else(|| Refusal::Escapes {
            what: what.into(),
            path: path.clone(),
        })?;
        if let Some(link) = symlink_on_disk(root, &rel) {
            return Err(Refusal::ThroughSymlink {
                what: what.into(),
                path: path.clone(),
                link: link.display().to_string(),
            });
        }
    }
    Ok(())
}

/// Checks every entry of the tar `archive` before it is unpacked into `root` (as it is on
/// disk now). Returns the number of entries.
pub fn check_archive(what: &str, archive: &Path, root: &Path) -> Result<usize, Refusal> {
    let unreadable = |reason: String| Refusal::Unreadable {
        what: what.into(),
        reason,
    };
    let file = File::open(archive).map_err(|e| unreadable(e.to_string()))?;
    let mut tar = tar::Archive::new(BufReader::new(file));
    let mut made_links: HashSet<PathBuf> = HashSet::new();
    let mut count = 0;
    for entry in tar.entries().map_err(|e| unreadable(e.to_string()))? {
        let mut entry = entry.map_err(|e| unreadable(e.to_string()))?;
        let sent = entry
            .path()
            .map_err(|e| unreadable(e.to_string()))?
            .into_owned();
        let shown = sent.display().to_string();
        let kind = entry.header().entry_type();
        let escapes = || Refusal::Escapes {
            what: what.into(),
            path: shown.clone(),
        };
        let rel = below(&sent).ok_or_else(escapes)?;
        if rel.as_os_str().is_empty() {
            // The root directory itself (`./` of a volume archive): its mode and owner.
            if kind != tar::EntryType::Directory {
                return Err(escapes());
            }
            count += 1;
            continue;
        }
        let through = |rel: &Path, made: &HashSet<PathBuf>| {
            rel.ancestors()
                .skip(1)
                .find(|a| made.contains(*a))
                .map(Path::to_path_buf)
                .or_else(|| symlink_on_disk(root, rel))
        };
        if let Some(link) = through(&rel, &made_links) {
            return Err(Refusal::ThroughSymlink {
                what: what.into(),
                path: shown,
                link: link.display().to_string(),
            });
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                check_privilege(what, &shown, &mut entry, &root.join(&rel))?;
            }
            tar::EntryType::Directory => {
                if std::fs::symlink_metadata(root.join(&rel))
                    .is_ok_and(|m| m.file_type().is_symlink())
                {
                    // A real directory over a link would be an opaque one, deleted first.
                    return Err(Refusal::ThroughSymlink {
                        what: what.into(),
                        path: shown.clone(),
                        link: shown,
                    });
                }
            }
            tar::EntryType::Symlink => {
                made_links.insert(rel);
            }
            tar::EntryType::Fifo => {}
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| unreadable(e.to_string()))?
                    .unwrap_or_default()
                    .into_owned();
                let out = || Refusal::LinkOut {
                    what: what.into(),
                    path: shown.clone(),
                    target: target.display().to_string(),
                };
                let inside = contained(&target).ok_or_else(out)?;
                if through(&inside, &made_links).is_some() || made_links.contains(&inside) {
                    return Err(out());
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(Refusal::Device {
                    what: what.into(),
                    path: shown,
                });
            }
            other => {
                return Err(Refusal::Unsupported {
                    what: what.into(),
                    path: shown,
                    kind: format!("{other:?}"),
                });
            }
        }
        count += 1;
    }
    Ok(count)
}

/// Refuses setuid/setgid bits and file capabilities on a regular file unless the file
/// already at `target` has them.
fn check_privilege(
    what: &str,
    shown: &str,
    entry: &mut tar::Entry<'_, BufReader<File>>,
    target: &Path,
) -> Result<(), Refusal> {
    let refuse = |privilege| Refusal::NewPrivilege {
        what: what.into(),
        path: shown.into(),
        privilege,
    };
    let existing = std::fs::symlink_metadata(target)
        .ok()
        .filter(|m| m.is_file());
    let mode = entry.header().mode().unwrap_or(0);
    let had = existing.as_ref().map_or(0, MetadataExt::mode);
    for (bit, privilege) in [(0o4000, "setuid"), (0o2000, "setgid")] {
        if mode & bit != 0 && had & bit == 0 {
            return Err(refuse(privilege));
        }
    }
    let Ok(Some(extensions)) = entry.pax_extensions() else {
        return Ok(());
    };
    for extension in extensions {
        let extension = extension.map_err(|e| Refusal::Unreadable {
            what: what.into(),
            reason: e.to_string(),
        })?;
        if extension.key() == Ok(CAPABILITY_XATTR) {
            let kept = existing.is_some()
                && matches!(xattr::get(target, "security.capability"),
                    Ok(Some(v)) if v.as_slice() == extension.value_bytes());
            if !kept {
                return Err(refuse("file capabilities"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A hostile archive: entries written header by header, names as given (the crate's
    /// `append_*` helpers refuse `..`, which is the point here).
    struct Crafted(tar::Builder<Vec<u8>>);

    impl Crafted {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }

        fn entry(mut self, kind: tar::EntryType, name: &str, mode: u32, link: &str) -> Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(if kind == tar::EntryType::Regular {
                3
            } else {
                0
            });
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            if !link.is_empty() {
                h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            let data: &[u8] = if kind == tar::EntryType::Regular {
                b"abc"
            } else {
                b""
            };
            self.0.append(&h, data).expect("append");
            self
        }

        fn file(self, name: &str, mode: u32) -> Self {
            self.entry(tar::EntryType::Regular, name, mode, "")
        }

        fn write(self, dir: &Path) -> PathBuf {
            let path = dir.join("layer.tar");
            std::fs::write(&path, self.0.into_inner().expect("tar")).expect("write");
            path
        }
    }

    fn root_and_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).expect("dir");
        (tmp, root)
    }

    fn check(c: Crafted) -> Result<usize, Refusal> {
        let (tmp, root) = root_and_dir();
        std::os::unix::fs::symlink("/", root.join("host")).expect("symlink");
        let archive = c.write(tmp.path());
        check_archive("rootfs-diff.tar", &archive, &root)
    }

    #[test]
    fn an_ordinary_layer_passes() {
        let c = Crafted::new()
            .entry(tar::EntryType::Directory, "data", 0o755, "")
            .file("data/state.db", 0o640)
            .entry(tar::EntryType::Symlink, "data/latest", 0o777, "/etc/passwd")
            .entry(tar::EntryType::Link, "data/again", 0o640, "data/state.db")
            .entry(tar::EntryType::Fifo, "data/pipe", 0o600, "");
        assert_eq!(check(c).expect("passes"), 5);
    }

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        for name in ["../evil", "data/../../evil", "/etc/shadow"] {
            let got = check(Crafted::new().file(name, 0o644));
            assert!(
                matches!(got, Err(Refusal::Escapes { .. })),
                "{name}: {got:?}"
            );
        }
    }

    #[test]
    fn paths_through_a_symbolic_link_are_refused() {
        // Through a link already in the root (the image's), and one the archive makes.
        let got = check(Crafted::new().file("host/etc/cron.d/x", 0o644));
        assert!(
            matches!(got, Err(Refusal::ThroughSymlink { ref link, .. }) if link == "host"),
            "{got:?}"
        );
        let got = check(
            Crafted::new()
                .entry(tar::EntryType::Symlink, "out", 0o777, "/")
                .file("out/etc/shadow", 0o644),
        );
        assert!(
            matches!(got, Err(Refusal::ThroughSymlink { ref link, .. }) if link == "out"),
            "{got:?}"
        );
        // A directory entry over a link (not deleted first) would be followed.
        let got = check(Crafted::new().entry(tar::EntryType::Directory, "host", 0o755, ""));
        assert!(
            matches!(got, Err(Refusal::ThroughSymlink { .. })),
            "{got:?}"
        );
    }

    #[test]
    fn hard_links_out_devices_and_new_privileges_are_refused() {
        for target in ["../../etc/shadow", "/etc/shadow", "host/etc/shadow"] {
            let got = check(Crafted::new().entry(tar::EntryType::Link, "x", 0o644, target));
            assert!(
                matches!(got, Err(Refusal::LinkOut { .. })),
                "{target}: {got:?}"
            );
        }
        for kind in [tar::EntryType::Char, tar::EntryType::Block] {
            let got = check(Crafted::new().entry(kind, "dev/sda", 0o666, ""));
            assert!(matches!(got, Err(Refusal::Device { .. })), "{got:?}");
        }
        let got = check(Crafted::new().file("usr/bin/sh", 0o4755));
        assert!(
            matches!(
                got,
                Err(Refusal::NewPrivilege {
                    privilege: "setuid",
                    ..
                })
            ),
            "{got:?}"
        );
        let got = check(Crafted::new().file("usr/bin/sh", 0o2755));
        assert!(
            matches!(
                got,
                Err(Refusal::NewPrivilege {
                    privilege: "setgid",
                    ..
                })
            ),
            "{got:?}"
        );
        // Sparse entries (never made by the capture) are refused, malformed or not.
        let got = check(Crafted::new().entry(tar::EntryType::GNUSparse, "big", 0o644, ""));
        assert!(
            matches!(
                got,
                Err(Refusal::Unsupported { .. } | Refusal::Unreadable { .. })
            ),
            "{got:?}"
        );
    }

    #[test]
    fn a_setuid_file_the_image_had_keeps_its_bit() {
        let (tmp, root) = root_and_dir();
        std::fs::create_dir_all(root.join("usr/bin")).expect("dir");
        std::fs::write(root.join("usr/bin/su"), b"su").expect("write");
        std::fs::set_permissions(
            root.join("usr/bin/su"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .expect("chmod");
        let archive = Crafted::new().file("usr/bin/su", 0o4755).write(tmp.path());
        assert_eq!(check_archive("t", &archive, &root).expect("kept"), 1);
    }

    #[test]
    fn file_capabilities_need_the_image_s_own() {
        let (tmp, root) = root_and_dir();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([(CAPABILITY_XATTR, &b"\x01\x00\x00\x02"[..])])
            .expect("pax");
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o755);
        b.append_data(&mut h, "usr/bin/ping", &b"abc"[..])
            .expect("append");
        std::fs::write(tmp.path().join("caps.tar"), b.into_inner().expect("tar")).expect("write");
        let got = check_archive("t", &tmp.path().join("caps.tar"), &root);
        assert!(
            matches!(
                got,
                Err(Refusal::NewPrivilege {
                    privilege: "file capabilities",
                    ..
                })
            ),
            "{got:?}"
        );
    }

    #[test]
    fn deletions_stay_below_the_root_and_off_links() {
        let (_tmp, root) = root_and_dir();
        std::os::unix::fs::symlink("/", root.join("host")).expect("symlink");
        assert!(check_deletions("d", &["etc/group".into(), "host".into()], &root).is_ok());
        for bad in ["../x", "/etc", "host/etc/passwd", ""] {
            assert!(
                check_deletions("d", &[bad.into()], &root).is_err(),
                "{bad:?} refused"
            );
        }
    }

    proptest! {
        // 256 cases by default (make test); PROPTEST_CASES sets more (make fuzz).

        /// Whatever bytes arrive, the check answers (no panic), and what it passes has
        /// only contained paths.
        #[test]
        fn any_bytes_are_answered_and_nothing_passed_leaves(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            name in "[a-z./]{1,40}",
        ) {
            let (tmp, root) = root_and_dir();
            let garbage = tmp.path().join("garbage.tar");
            std::fs::write(&garbage, &bytes).expect("write");
            let _ = check_archive("t", &garbage, &root);
            let archive = Crafted::new().file(&name, 0o644).write(tmp.path());
            if check_archive("t", &archive, &root).is_ok() {
                prop_assert!(contained(Path::new(&name)).is_some());
                prop_assert!(!name.split('/').any(|c| c == ".."));
            }
        }
    }
}
