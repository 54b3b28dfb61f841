//! Checkpoint images are process memory on a tmpfs: none may outlive its move. The
//! janitor sweeps, at start and then every [`SWEEP_EVERY`], the image directories of Pods
//! that are no longer on this node or that no move in flight uses any more; the bytes
//! held are exported (`podmig_checkpoint_bytes_held`) and bounded: a move whose dump
//! would not fit in the budget or in the free space is refused before anything freezes.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use podmig_cri_ext::engine::{CheckpointEngine, dir_size};

use super::shared::Node;

/// How often the janitor sweeps.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// What a sweep must keep.
#[derive(Debug, Default)]
pub struct InUse {
    /// Pods with a move in flight or journaled.
    pub moving: HashSet<String>,
    /// Pods bound to this node (`None`: unknown, the daemon has no API access).
    pub on_node: Option<HashSet<String>>,
    /// Images younger than this are kept whatever they belong to (a move being set up,
    /// a checkpoint kept for a restore that is about to come).
    pub min_age: Duration,
}

/// The `<root>/<pod uid>/<container>` directories a sweep removes.
pub fn garbage(root: &Path, keep: &InUse, now: SystemTime) -> Vec<PathBuf> {
    let Ok(pods) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut out = Vec::new();
    for pod in pods.flatten() {
        let uid = pod.file_name().to_string_lossy().into_owned();
        if uid.starts_with('.') || !pod.path().is_dir() || keep.moving.contains(&uid) {
            continue;
        }
        let gone = keep.on_node.as_ref().is_some_and(|on| !on.contains(&uid));
        let Ok(containers) = std::fs::read_dir(pod.path()) else {
            continue;
        };
        for c in containers.flatten() {
            let age = c
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            // A Pod that left the node needs none; one still here keeps its images for
            // a while (a rollback restore or a CRI restore may still use them).
            let min_age = if gone {
                keep.min_age.min(Duration::from_secs(60))
            } else {
                keep.min_age
            };
            if age >= min_age {
                out.push(c.path());
            }
        }
    }
    out
}

/// Why a dump must not start (figures in MiB).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// It would take the node over its checkpoint budget.
    #[error(
        "a checkpoint of about {needed} MiB does not fit the node's checkpoint budget: {held} MiB held of {budget} MiB"
    )]
    Budget {
        /// About what the dump writes.
        needed: u64,
        /// What checkpoints hold now.
        held: u64,
        /// The budget.
        budget: u64,
    },
    /// The checkpoint directory lacks the space.
    #[error(
        "a checkpoint of about {needed} MiB does not fit the {free} MiB free in the checkpoint directory"
    )]
    Disk {
        /// About what the dump writes.
        needed: u64,
        /// Free space there.
        free: u64,
    },
}

/// Why a dump of `needed` bytes must not start, if it must not.
pub fn room_for(held: u64, needed: u64, budget: u64, free: Option<u64>) -> Result<(), NoRoom> {
    let mib = |b: u64| b >> 20;
    if held + needed > budget {
        return Err(NoRoom::Budget {
            needed: mib(needed),
            held: mib(held),
            budget: mib(budget),
        });
    }
    if let Some(free) = free
        && needed > free
    {
        return Err(NoRoom::Disk {
            needed: mib(needed),
            free: mib(free),
        });
    }
    Ok(())
}

/// Pages still arriving: what each page stream into this node's store announced, and
/// where it writes. The part not yet written counts against the budget like images held,
/// so two moves cannot both be let in on room only one of them will find.
#[derive(Debug, Default)]
pub struct InFlight {
    streams: std::sync::Mutex<std::collections::HashMap<u64, (PathBuf, u64)>>,
    next: std::sync::atomic::AtomicU64,
}

/// One page stream's share of [`InFlight`], given back when it is dropped (the stream
/// ended: what it wrote is held, or was removed).
#[derive(Debug)]
pub struct Reservation {
    of: Arc<InFlight>,
    key: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.of.lock().remove(&self.key);
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, (PathBuf, u64)>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Announced bytes not yet written into their directories.
    pub fn unwritten(&self) -> u64 {
        unwritten_in(&self.lock())
    }

    /// Lets in a stream of `announced` bytes into `dir` when it fits next to `held` bytes
    /// (the store's) and what other streams still bring, within `budget` and `free`.
    pub fn reserve(
        self: &Arc<Self>,
        dir: &Path,
        announced: u64,
        held: u64,
        budget: u64,
        free: Option<u64>,
    ) -> Result<Reservation, NoRoom> {
        let mut streams = self.lock();
        room_for(held + unwritten_in(&streams), announced, budget, free)?;
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        streams.insert(key, (dir.to_owned(), announced));
        Ok(Reservation {
            of: self.clone(),
            key,
        })
    }
}

/// What the streams of `streams` announced and have not written yet.
fn unwritten_in(streams: &std::collections::HashMap<u64, (PathBuf, u64)>) -> u64 {
    streams
        .values()
        .map(|(dir, announced)| announced.saturating_sub(dir_size(dir)))
        .sum()
}

/// Free bytes of the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

impl<E: CheckpointEngine> Node<E> {
    /// Checks that dumping the containers `ids` fits (budget and free space).
    pub(crate) fn check_room(&self, ids: &[String]) -> Result<(), NoRoom> {
        let needed: u64 = ids
            .iter()
            .filter_map(|id| podmig_cri_ext::freezer::memory_usage(&self.settings.runc_root, id))
            .sum();
        let root = self.store.root();
        let held = dir_size(root);
        self.metrics.bytes_held.set(held as i64);
        room_for(
            held + self.in_flight.unwritten(),
            needed,
            self.settings.checkpoint_budget,
            free_bytes(root),
        )
    }

    /// Lets in a page stream announcing `announced` bytes into `dir` (see [`InFlight`]).
    pub(crate) fn reserve_stream(&self, dir: &Path, announced: u64) -> Result<Reservation, NoRoom> {
        let root = self.store.root();
        self.in_flight.reserve(
            dir,
            announced,
            dir_size(root),
            self.settings.checkpoint_budget,
            free_bytes(root),
        )
    }

    fn in_use(&self) -> InUse {
        let mut moving: HashSet<String> = self
            .journal
            .entries()
            .into_iter()
            .map(|e| e.pod_uid)
            .collect();
        moving.extend(self.manager.active_pods());
        // An empty cache may only mean the watch has not listed yet: then only age counts.
        let on_node = self.kube.as_ref().and_then(|_| {
            let pods = super::shared::lock(&self.pods);
            (!pods.is_empty()).then(|| pods.keys().cloned().collect())
        });
        InUse {
            moving,
            on_node,
            min_age: self.settings.hold,
        }
    }

    /// One sweep: removes what no move uses, updates the metric; returns the bytes freed.
    pub fn sweep(&self) -> u64 {
        let root = self.store.root().to_path_buf();
        let mut freed = 0;
        for dir in garbage(&root, &self.in_use(), SystemTime::now()) {
            let bytes = dir_size(&dir);
            tracing::warn!(images = %dir.display(), bytes, "removing checkpoint images no move uses");
            self.store.remove(&dir);
            freed += bytes;
        }
        self.metrics.bytes_held.set(dir_size(&root) as i64);
        freed
    }
}

/// Sweeps now and every [`SWEEP_EVERY`].
pub async fn run<E: CheckpointEngine>(node: Arc<Node<E>>) {
    loop {
        let n = node.clone();
        let _ = tokio::task::spawn_blocking(move || n.sweep()).await;
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_only_what_no_move_and_no_pod_here_uses() {
        let tmp = tempfile::tempdir().expect("tmp");
        for (pod, c) in [
            ("gone", "app"),
            ("here", "app"),
            ("moving", "app"),
            (".frozen", "x"),
        ] {
            std::fs::create_dir_all(tmp.path().join(pod).join(c)).expect("dir");
        }
        let later = SystemTime::now() + Duration::from_secs(120);
        let keep = InUse {
            moving: HashSet::from(["moving".to_owned()]),
            on_node: Some(HashSet::from(["here".to_owned(), "moving".to_owned()])),
            min_age: Duration::from_secs(300),
        };
        assert_eq!(
            garbage(tmp.path(), &keep, later),
            vec![tmp.path().join("gone/app")]
        );
        let much_later = SystemTime::now() + Duration::from_secs(600);
        let mut swept = garbage(tmp.path(), &keep, much_later);
        swept.sort();
        assert_eq!(
            swept,
            vec![tmp.path().join("gone/app"), tmp.path().join("here/app")]
        );
        assert!(garbage(tmp.path(), &keep, SystemTime::now()).is_empty());
    }

    #[test]
    fn streams_in_flight_count_until_written_and_are_given_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mib = 1 << 20;
        let flight = Arc::new(InFlight::default());
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a).expect("dir");
        let first = flight
            .reserve(&a, 6 * mib, 0, 10 * mib, None)
            .expect("the first stream fits");
        assert_eq!(flight.unwritten(), 6 * mib);
        // Announced but unwritten bytes count: a second stream of 6 MiB does not fit.
        let e = flight
            .reserve(&b, 6 * mib, 0, 10 * mib, None)
            .expect_err("the second does not fit");
        assert!(e.to_string().contains("6 MiB held of 10 MiB"), "{e}");
        // What the first wrote is no longer in flight (it is held, counted by the store).
        std::fs::write(a.join("pages-1.img"), vec![0u8; 4 * mib as usize]).expect("write");
        assert_eq!(flight.unwritten(), 2 * mib);
        drop(first);
        assert_eq!(flight.unwritten(), 0);
        flight
            .reserve(&b, 6 * mib, 4 * mib, 10 * mib, None)
            .expect("room again once the first ended");
    }

    #[test]
    fn refuses_a_dump_that_does_not_fit() {
        let gib = 1 << 30;
        assert!(room_for(0, gib, 4 * gib, Some(2 * gib)).is_ok());
        let e = room_for(3 * gib, 2 * gib, 4 * gib, None).expect_err("over budget");
        assert!(e.to_string().contains("3072 MiB held of 4096 MiB"), "{e}");
        let e = room_for(0, 2 * gib, 4 * gib, Some(gib)).expect_err("no space");
        assert!(e.to_string().contains("1024 MiB free"), "{e}");
    }
}
