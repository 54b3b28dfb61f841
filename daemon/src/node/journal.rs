//! The journal of the moves in flight: one root-only file per container and role in the
//! daemon's state directory (on the node's disk), written before each step that changes
//! the world — claimed (about to freeze), dumped (frozen, images complete), committed
//! (the target runs; the source is about to be stopped) on the source; receiving and
//! restoring on the target — and removed once the move is settled. A daemon that dies
//! mid-move finds here, when it starts again, every move it has to finish or undo
//! ([`super::recovery`]).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// Which end of the move this node is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The node the Pod leaves.
    Source,
    /// The node the Pod arrives on.
    Target,
}

/// The last step begun.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Source: about to freeze and dump (a runc/CRIU run may be under way).
    Claimed,
    /// Source: dumped and frozen; the target is fetching or restoring.
    Dumped,
    /// Source: the target runs; the frozen source is being stopped.
    Committed,
    /// Target: the images are arriving (a partial image set may exist).
    Receiving,
    /// Target: the runtime was told to restore; the restored container may run.
    Restoring,
    /// Target: restored lazily and running; its memory pages are still arriving.
    Paging,
    /// Source: the move is over and the target runs this container: it is never started
    /// here again. Kept until the Pod leaves the node, so a restarted daemon still
    /// refuses the kubelet's restart of it.
    MovedAway,
}

/// One container's move as the journal keeps it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The move.
    pub migration: String,
    /// This node's end.
    pub side: Side,
    /// The Pod on this node (the source Pod on the source, the target Pod on the target).
    pub pod_uid: String,
    /// Container name.
    pub container: String,
    /// runc id of the source container (source side).
    #[serde(default)]
    pub container_id: String,
    /// Its images on this node.
    pub images: PathBuf,
    /// The target Pod.
    pub target_namespace: String,
    /// The target Pod's name.
    pub target_pod: String,
    /// The other node (empty for a same-node move).
    #[serde(default)]
    pub peer_node: String,
    /// When the move's deadline passes (ms since the epoch).
    pub deadline_unix_ms: u64,
    /// The last step begun.
    pub step: Step,
    /// Target: the restore is lazy (its memory comes from the source's page server, which
    /// only this daemon's tunnel reaches).
    #[serde(default)]
    pub lazy: bool,
}

impl Entry {
    /// The deadline as an `Instant` of this run (now when already past).
    pub fn deadline(&self) -> Instant {
        let now_ms = unix_ms(SystemTime::now());
        Instant::now() + Duration::from_millis(self.deadline_unix_ms.saturating_sub(now_ms))
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        unix_ms(SystemTime::now()) >= self.deadline_unix_ms
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `deadline` (an `Instant`) as ms since the epoch, for the journal.
pub fn deadline_unix_ms(deadline: Instant) -> u64 {
    unix_ms(SystemTime::now() + deadline.saturating_duration_since(Instant::now()))
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Journal {
    /// The journal in `state_dir/journal` (created root-only).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("journal");
        podmig_cri_ext::engine::create_private_dir(&dir).map_err(std::io::Error::other)?;
        Ok(Self { dir })
    }

    fn path(&self, e: &Entry) -> PathBuf {
        let side = match e.side {
            Side::Source => "source",
            Side::Target => "target",
        };
        self.dir.join(format!(
            "{side}-{}-{}.json",
            file_part(&e.migration),
            file_part(&e.container)
        ))
    }

    /// Writes `entry` durably (temporary file, fsync, rename). A journal that cannot be
    /// written is logged: the move goes on, a crash would then be settled from the API.
    pub fn record(&self, entry: &Entry) {
        let path = self.path(entry);
        let tmp = path.with_extension("tmp");
        let written = (|| -> std::io::Result<()> {
            use std::{io::Write, os::unix::fs::OpenOptionsExt};
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(error) = written {
            tracing::warn!(%error, migration = %entry.migration, path = %path.display(), "cannot write the move journal");
        }
    }

    /// Records that `entry` reached `step`.
    pub fn advance(&self, entry: &mut Entry, step: Step) {
        entry.step = step;
        self.record(entry);
    }

    /// Forgets a settled move.
    pub fn remove(&self, entry: &Entry) {
        let _ = std::fs::remove_file(self.path(entry));
    }

    /// Forgets the moved-away entries of the Pods (by uid) that `left` the node: they
    /// need no refusal any more.
    pub fn forget_moved_away(&self, left: impl Fn(&str) -> bool) {
        for e in self.entries() {
            if e.step == Step::MovedAway && left(&e.pod_uid) {
                self.remove(&e);
            }
        }
    }

    /// Every entry a previous run (or this one) left.
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out: Vec<Entry> = rd
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| (&a.migration, &a.container).cmp(&(&b.migration, &b.container)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_files_are_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let j = Journal::open(tmp.path()).expect("journal");
        let mut e = Entry {
            migration: "m/1".into(),
            side: Side::Source,
            pod_uid: "u".into(),
            container: "app".into(),
            container_id: "c1".into(),
            images: "/i".into(),
            target_namespace: "ns".into(),
            target_pod: "p-1".into(),
            peer_node: "node-1".into(),
            deadline_unix_ms: deadline_unix_ms(Instant::now() + Duration::from_secs(60)),
            step: Step::Claimed,
            lazy: false,
        };
        j.record(&e);
        j.advance(&mut e, Step::Dumped);
        assert_eq!(j.entries(), [e.clone()]);
        assert!(!e.expired());
        assert!(e.deadline() > Instant::now() + Duration::from_secs(50));
        let mode = std::fs::metadata(tmp.path().join("journal/source-m_1-app.json"))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        j.remove(&e);
        assert!(j.entries().is_empty());
    }
}
