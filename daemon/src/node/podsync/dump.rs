//! Source side: the freeze and the dump — every container frozen at one instant, dumped in
//! parallel, its pages sent ahead in page streams (full) or left to a page server (lazy).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use podmig_cri_ext::engine::{CheckpointEngine, CheckpointOptions, CheckpointReport};

use crate::node::stream::{PageStream, StreamFigures};

use super::*;

impl<E: CheckpointEngine> PodWorker<E> {
    /// Opens one page stream per container to the target before the freeze, so that the
    /// dump sends its pages there as it goes (see `stream.rs`). Empty when any cannot be
    /// opened: the pages then travel in the hand-over, as without streams. An error when
    /// the target has no room for them: they would not fit through the hand-over either.
    pub(super) fn open_page_streams(
        &self,
        jobs: &[(String, String, PathBuf)],
        order: &MigrateOrder,
    ) -> Result<Vec<PageStream>, DumpError> {
        let runc_root = &self.node.settings.runc_root;
        let opened = || -> Result<Vec<PageStream>, OpenStreams> {
            let peers = self.node.peers.clone().ok_or(OpenStreams::NoPeers)?;
            let host = self.node.node_address(&order.target.node)?;
            let limit = order.deadline.saturating_duration_since(Instant::now());
            // One cap for the move: its containers' streams share it.
            let pace = crate::node::stream::Pace::per_move(self.node.settings.move_bandwidth_mibps);
            jobs.iter()
                .map(|(cid, name, _)| {
                    let expected =
                        podmig_cri_ext::freezer::memory_usage(runc_root, cid).unwrap_or(0);
                    let tunnel = self.node.wait_on(peers.open_page_stream(
                        &host,
                        &order.migration,
                        name,
                        expected,
                    ))?;
                    Ok(PageStream::open(
                        self.node.runtime(),
                        name,
                        tunnel,
                        limit,
                        pace.clone(),
                    )?)
                })
                .collect()
        };
        match opened() {
            Ok(streams) => Ok(streams),
            Err(OpenStreams::Peer(
                e @ crate::node::peer::PeerError::Refused { status: 507, .. },
            )) => Err(DumpError::TargetNoRoom(e)),
            Err(why) => {
                tracing::warn!(pod_uid = %self.uid, migration = %order.migration, %why,
                    "cannot stream the pages; they go in the hand-over");
                Ok(Vec::new())
            }
        }
    }

    /// What each page stream carried, once the dump that fed it ended.
    pub(super) fn streamed_figures(
        &self,
        streams: Vec<PageStream>,
    ) -> Result<Vec<(String, StreamFigures)>, DumpError> {
        streams
            .into_iter()
            .map(|s| {
                let name = s.container.clone();
                self.node
                    .wait_on(s.figures(Duration::from_secs(30)))
                    .map(|f| (name.clone(), f))
                    .map_err(|source| DumpError::Stream {
                        container: name.clone(),
                        source,
                    })
            })
            .collect()
    }

    /// Dumps the Pod's one container without its memory pages and registers the page
    /// server that serves them for move `id`.
    pub(super) fn dump_lazy(
        &self,
        jobs: &[(String, String, PathBuf)],
        id: &str,
    ) -> (
        Instant,
        Vec<(String, PathBuf, podmig_cri_ext::Result<CheckpointReport>)>,
    ) {
        let frozen_at = Instant::now();
        let results = jobs
            .iter()
            .map(|(cid, name, dir)| {
                let options = CheckpointOptions {
                    image_path: dir.clone(),
                    keep_frozen: true,
                    // Connections are dumped with their state; the target's restore
                    // keeps or closes them.
                    tcp_established: true,
                    ..Default::default()
                };
                let report =
                    self.node
                        .engine
                        .checkpoint_lazy(cid, &options)
                        .map(|(report, server)| {
                            self.node.manager.set_page_server(id, Arc::new(server));
                            report
                        });
                (name.clone(), dir.clone(), report)
            })
            .collect();
        (frozen_at, results)
    }
}

/// One container's dump: its name, its images and how the dump went.
pub(super) type Dumped = (String, PathBuf, podmig_cri_ext::Result<CheckpointReport>);

/// Freezes and dumps the Pod's containers; a multi-container dump that caught a Unix socket
/// connection between them half-made (its peer outside each container's dump) is thawed
/// and tried again, up to [`DUMP_ATTEMPTS`] times. The first attempt sends the pages into
/// `streams` (one per job, or none); the streams are spent then, so a later attempt writes
/// them into the images. Returns when the last freeze began, and the streams the final
/// results were sent into.
pub(super) fn dump_with_retries<E: CheckpointEngine + 'static>(
    engine: &Arc<E>,
    jobs: &[(String, String, PathBuf)],
    mut streams: Vec<PageStream>,
    uid: &str,
    migration: &str,
) -> (Instant, Vec<Dumped>, Vec<PageStream>) {
    let mut attempt = 1;
    loop {
        let frozen_at = Instant::now();
        let nets: Vec<_> = jobs
            .iter()
            .map(|(_, name, _)| {
                streams
                    .iter()
                    .find(|s| s.container == *name)
                    .map(|s| s.net.clone())
            })
            .collect();
        let results = dump_all(engine, jobs, &nets, uid);
        let transient = jobs.len() > 1
            && results
                .iter()
                .any(|(_, _, r)| r.as_ref().is_err_and(|e| e.is_external_unix_socket()));
        if !transient || attempt >= DUMP_ATTEMPTS {
            return (frozen_at, results, streams);
        }
        // The target's page servers took one dump each: the next attempt writes locally.
        streams.clear();
        for ((cid, _, dir), (_, _, r)) in jobs.iter().zip(&results) {
            if r.is_ok() {
                let _ = engine.resume(cid);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!(pod_uid = %uid, migration, attempt,
            "a Unix socket between two containers was caught mid-connection; thawed, dumping again");
        // Jittered: an app that connects periodically must not meet every retry mid-way.
        let jitter = u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                % 37,
        );
        #[allow(clippy::disallowed_methods)] // the pod worker is a synchronous thread
        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt) + jitter));
        attempt += 1;
    }
}

/// Below this much memory a full move's pages travel in the hand-over instead of page
/// streams: a streamed dump costs ~200 ms more than a local one whatever its size
/// (pingpong, 16 MiB: dump 344 against 183 ms), more than streaming saves on small Pods.
/// NB: that is CRIU's, measured with raw `criu dump --page-server` on loopback (16 MiB:
/// 268–283 ms against 76 ms local): it corks its page-server socket and sends the final
/// `PS_IOV_CLOSE` without a push, so the close waits out the kernel's 200 ms cork ceiling
/// (`page-xfer.c` `disconnect_from_page_server`); nothing on the receiving side shortens it.
pub const STREAM_MIN_BYTES: u64 = 64 << 20;

/// How often a multi-container Pod is frozen and dumped again when the dump caught a
/// Unix socket connection between its containers half-made.
pub(super) const DUMP_ATTEMPTS: u32 = 4;

/// Freezes every container of `jobs` at one instant (when more than one: state they share is
/// caught consistent), then dumps each in parallel, leaving a dumped one frozen.
pub(super) fn dump_all<E: CheckpointEngine + 'static>(
    engine: &Arc<E>,
    jobs: &[(String, String, PathBuf)],
    streams: &[Option<Arc<podmig_cri_ext::lazy::PrivateNet>>],
    uid: &str,
) -> Vec<(String, PathBuf, podmig_cri_ext::Result<CheckpointReport>)> {
    if jobs.len() > 1 {
        let ids: Vec<&str> = jobs.iter().map(|(cid, _, _)| cid.as_str()).collect();
        if let Err(error) = engine.freeze_all(&ids) {
            tracing::warn!(pod_uid = %uid, %error, "cannot pre-freeze the Pod; each dump freezes its container");
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .enumerate()
            .map(|(i, (cid, name, dir))| {
                let engine = engine.clone();
                // Frozen, not killed: a failed move resumes it where it stopped.
                let options = CheckpointOptions {
                    image_path: dir.clone(),
                    keep_frozen: true,
                    tcp_established: true,
                    stream_pages: streams.get(i).cloned().flatten(),
                    ..Default::default()
                };
                (
                    name.clone(),
                    dir.clone(),
                    s.spawn(move || engine.checkpoint(cid, &options)),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(name, dir, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(podmig_cri_ext::Error::CheckpointFailed(
                        "dump thread panicked".into(),
                    ))
                });
                (name, dir, r)
            })
            .collect()
    })
}

#[cfg(test)]
mod dump_tests {
    use std::sync::Mutex;

    use super::*;

    /// Engine whose dump of container `a` finds an external Unix socket the first
    /// `external` times; records what was asked of it.
    struct Scripted {
        external: Mutex<u32>,
        calls: Mutex<Vec<String>>,
    }

    impl CheckpointEngine for Scripted {
        fn checkpoint(
            &self,
            id: &str,
            opts: &CheckpointOptions,
        ) -> podmig_cri_ext::Result<CheckpointReport> {
            self.calls.lock().expect("calls").push(format!("dump {id}"));
            let mut left = self.external.lock().expect("left");
            if id == "a" && *left > 0 {
                *left -= 1;
                return Err(podmig_cri_ext::Error::CommandFailed {
                    command: "runc checkpoint a".into(),
                    status: std::os::unix::process::ExitStatusExt::from_raw(256),
                    stdout: String::new(),
                    stderr: "Error (criu/sk-unix.c:874): unix: External socket is used.".into(),
                });
            }
            std::fs::create_dir_all(&opts.image_path).expect("mkdir");
            Ok(CheckpointReport {
                duration: Duration::ZERO,
                image_bytes: 1,
                filesystem: Default::default(),
            })
        }

        fn resume(&self, id: &str) -> podmig_cri_ext::Result<()> {
            self.calls
                .lock()
                .expect("calls")
                .push(format!("resume {id}"));
            Ok(())
        }
    }

    fn run(external: u32, containers: &[&str]) -> (Vec<String>, Vec<bool>) {
        let tmp = tempfile::tempdir().expect("tmp");
        let engine = Arc::new(Scripted {
            external: Mutex::new(external),
            calls: Mutex::default(),
        });
        let jobs: Vec<(String, String, PathBuf)> = containers
            .iter()
            .map(|c| (c.to_string(), c.to_string(), tmp.path().join(c)))
            .collect();
        let (_, results, _) = dump_with_retries(&engine, &jobs, Vec::new(), "uid", "m");
        let ok = results.iter().map(|(_, _, r)| r.is_ok()).collect();
        let mut calls = engine.calls.lock().expect("calls").clone();
        calls.sort();
        (calls, ok)
    }

    #[test]
    fn a_connection_between_containers_caught_at_the_freeze_is_dumped_again() {
        let (calls, ok) = run(1, &["a", "b"]);
        assert_eq!(ok, [true, true]);
        // The first attempt's dumped container was thawed before the second freeze.
        assert_eq!(calls, ["dump a", "dump a", "dump b", "dump b", "resume b"]);
    }

    #[test]
    fn a_lasting_connection_fails_after_the_last_attempt() {
        let (calls, ok) = run(99, &["a", "b"]);
        assert_eq!(ok, [false, true]);
        let dumps = calls.iter().filter(|c| *c == "dump a").count();
        assert_eq!(dumps, DUMP_ATTEMPTS as usize);
    }

    #[test]
    fn a_single_container_with_an_outside_peer_is_not_retried() {
        let (calls, ok) = run(1, &["a"]);
        assert_eq!(ok, [false]);
        assert_eq!(calls, ["dump a"]);
    }
}
