//! Target side: the checkpoint's way here from the source's worker on this node or from
//! the source node's daemon — the hand-over request, the page streams landing while the
//! source dumps and their check against what the source says it sent, and (lazy) the page
//! tunnel to the source's page server.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use podmig_api::{
    contract::DaemonPhase,
    nodeapi::{Handover, MigrateRequest},
    v1alpha1::{MigrationReport, Strategy},
};
use podmig_cri_ext::{
    engine::CheckpointEngine, lazy::LazyPages, proto::hook::v1::ContainerIdentity,
};
use tokio::sync::oneshot;

use crate::node::{
    stream::{Sink, StreamFigures},
    transfer::Receiver,
};

use super::*;

impl<E: CheckpointEngine> PodWorker<E> {
    pub(super) fn fetch_local(
        &mut self,
        c: &ContainerIdentity,
        source_uid: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<Arrival, FetchError> {
        let (tx, rx) = oneshot::channel();
        // Every container of the source, frozen together (empty: all that run).
        let order = MigrateOrder {
            migration: id.into(),
            containers: Vec::new(),
            target: TargetRef {
                namespace: c.pod_namespace.clone(),
                pod: c.pod_name.clone(),
                node: self.node.settings.node_name.clone(),
            },
            deadline,
            remote: false,
            strategy: Strategy::Full,
            stream_pages: false,
            max_downtime_ms: podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS,
            target_lazy_impossible: None,
            kept_ip: None,
        };
        self.node.dispatch(
            source_uid,
            PodUpdate::Migrate {
                order,
                prepared: tx,
            },
        );
        let left = deadline.saturating_duration_since(Instant::now());
        let prepared = match self
            .node
            .wait_on(async { tokio::time::timeout(left, rx).await })
        {
            Err(_) => return Err(FetchError::LocalDeadline),
            Ok(Err(_)) => return Err(FetchError::LocalWorkerGone),
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Ok(Ok(p))) => p,
        };
        let (dir, others) = split_arrival(prepared.images, &c.container_name)?;
        Ok(Arrival {
            dir,
            others,
            frozen_at: Some(prepared.frozen_at),
            report: MigrationReport {
                preflight_ms: prepared.preflight_ms,
                checkpoint_ms: prepared.checkpoint_ms,
                bytes: prepared.bytes,
                ..Default::default()
            },
            handback: Handback::Local(prepared.verdict),
            lazy: None,
        })
    }

    /// The hand-over from the source node's daemon: the request, the page streams landing
    /// here while the source dumps, their check, then (lazy) the page tunnel.
    pub(super) fn fetch_remote(
        &mut self,
        c: &ContainerIdentity,
        i: &Incoming,
        source_node: &str,
    ) -> Result<Arrival, FetchError> {
        let req = self.handover_request(c, i)?;
        let auto = i.strategy == Strategy::Auto;
        let peers = self.node.peers.clone().ok_or(FetchError::NoPeers)?;
        let host = self.node.node_address(source_node)?;
        let handback = Handback::Remote {
            host: host.clone(),
            id: i.id.clone(),
        };
        let f = self.receive_handover(c, i, source_node, &peers, &host, &req, &handback)?;
        self.node.metrics.phase_ms("transfer", f.transfer_ms);
        let streamed_bytes: u64 = f.streamed.iter().map(|(_, s)| s.bytes).sum();
        let (dir, others) = split_arrival(f.dirs, &c.container_name)?;
        let lazy = if f.lazy {
            let started = self.start_lazy_pages(&dir, &host, &i.id, &c.container_id, &peers);
            Some(started.inspect_err(|why| {
                self.node.store.remove(&dir);
                let _ = self.hand_back(&handback, false, &why.to_string());
            })?)
        } else {
            None
        };
        Ok(Arrival {
            dir,
            others,
            frozen_at: Some(f.frozen_at),
            report: MigrationReport {
                preflight_ms: f.preflight_ms,
                checkpoint_ms: f.checkpoint_ms,
                transfer_ms: f.transfer_ms,
                bytes: f.bytes + streamed_bytes,
                streamed_bytes,
                strategy: auto.then_some(if f.lazy {
                    Strategy::Lazy
                } else {
                    Strategy::Full
                }),
                estimated_frozen_ms: f.choice.as_ref().map_or(0, |(ms, _)| *ms),
                strategy_reason: f.choice.map(|(_, why)| why),
                ..Default::default()
            },
            handback,
            lazy,
        })
    }

    /// What this target asks the source for: every container, frozen together, the
    /// strategy and (full) page streams.
    pub(super) fn handover_request(
        &self,
        c: &ContainerIdentity,
        i: &Incoming,
    ) -> Result<MigrateRequest, FetchError> {
        let auto = i.strategy == Strategy::Auto;
        let strategy = match (i.strategy.wants_lazy(), self.node.lazy_impossible()) {
            // The source chooses; it must know whether this node can take a lazy move.
            _ if auto => Some(Strategy::Auto),
            (false, _) => None,
            (true, None) => Some(i.strategy),
            (true, Some(why)) if i.strategy == Strategy::Lazy => {
                return Err(FetchError::NotLazy(why));
            }
            (true, Some(why)) => {
                tracing::info!(pod_uid = %self.uid, migration = %i.id, %why, "lazy-or-full: moving in full");
                None
            }
        };
        let left = i.deadline.saturating_duration_since(Instant::now());
        Ok(MigrateRequest {
            // Every container of the source, frozen together (empty: all that run).
            containers: Vec::new(),
            handover: Some(Handover {
                migration_id: i.id.clone(),
                target_namespace: c.pod_namespace.clone(),
                target_pod: c.pod_name.clone(),
                target_pod_uid: self.uid.clone(),
                target_node: self.node.settings.node_name.clone(),
                timeout_seconds: left.as_secs().max(1) as u32,
                strategy,
                // A full move's pages come ahead in page streams while the source dumps.
                stream_pages: strategy.is_none() || auto,
                max_downtime_ms: auto.then_some(i.max_downtime_ms),
                lazy_impossible: if auto {
                    self.node.lazy_impossible()
                } else {
                    None
                },
                kept_ip: self.kept_ip.as_ref().map(|k| k.ip.to_string()),
            }),
            ..Default::default()
        })
    }

    /// Asks the source for the hand-over and takes it in, with the page streams that land
    /// in this move's sink meanwhile; checks each stream against what the source says it
    /// sent. On failure nothing of it stays on this node.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn receive_handover(
        &self,
        c: &ContainerIdentity,
        i: &Incoming,
        source_node: &str,
        peers: &crate::node::peer::PeerClient,
        host: &str,
        req: &MigrateRequest,
        handback: &Handback,
    ) -> Result<crate::node::peer::Fetched, FetchError> {
        let containers = self.pod.as_ref().map_or_else(Vec::new, |p| {
            p.spec
                .as_ref()
                .map(|s| s.containers.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default()
        });
        let sink = Arc::new(Sink::new(
            self.node.store.clone(),
            &self.uid,
            source_node,
            containers,
        ));
        self.node.manager.set_page_sink(&i.id, sink.clone());
        let node = self.node.clone();
        let (ns, pod) = (c.pod_namespace.clone(), c.pod_name.clone());
        let target_uid = self.uid.clone();
        let store = self.node.store.clone();
        let left = i.deadline.saturating_duration_since(Instant::now());
        let fetched = self.node.wait_on(
            peers.fetch(
                host,
                &i.source_uid,
                req,
                left,
                move || node.report_phase(&ns, &pod, DaemonPhase::Transferring),
                Receiver::new(move |container: &str| store.path_for(&target_uid, container))
                    .bounded(self.node.settings.checkpoint_budget),
            ),
        );
        let checked = fetched.map(|f| {
            let streamed = check_streams(&sink, &f.streamed);
            (f, streamed)
        });
        self.node.manager.drop_page_sink(&i.id);
        if !matches!(checked, Ok((_, Ok(())))) {
            // Whatever the streams wrote is of no use now.
            for d in sink.dirs() {
                self.node.store.remove(&d);
            }
        }
        match checked {
            Ok((f, Ok(()))) => Ok(f),
            Ok((f, Err(why))) => {
                for (_, d) in &f.dirs {
                    self.node.store.remove(d);
                }
                let _ = self.hand_back(handback, false, &why.to_string());
                Err(why.into())
            }
            Err(why) => Err(why.into()),
        }
    }

    /// Starts the lazy-pages daemon on the arrived images and the tunnel that feeds it
    /// from the source's page server. A break of the source's side freezes the restored
    /// container at once.
    pub(super) fn start_lazy_pages(
        &self,
        dir: &std::path::Path,
        host: &str,
        id: &str,
        container_id: &str,
        peers: &crate::node::peer::PeerClient,
    ) -> Result<LazyTarget, FetchError> {
        let pages = LazyPages::start(std::path::Path::new("criu"), dir)?;
        let listener = pages.listener.try_clone()?;
        let pages = Arc::new(pages);
        let broke = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (peers, host, id, cid) = (
            peers.clone(),
            host.to_owned(),
            id.to_owned(),
            container_id.to_owned(),
        );
        // The tunnel holds the lazy-pages daemon weakly: it lives as long as the restore
        // that needs it (a restore that never comes, or is given up, takes it along) and not
        // as long as the tunnel waits for it to connect.
        let (engine, flag, waiting) = (
            self.node.engine.clone(),
            broke.clone(),
            Arc::downgrade(&pages),
        );
        let images = dir.to_path_buf();
        self.node.start_async(async move {
            let on_break = || {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Err(error) = engine.freeze(&cid) {
                    // Not restored yet: the restore would wait for pages forever, or
                    // finish and run without them. It is stopped, with its CRIU; then
                    // the lazy-pages daemon (nothing can fault on it any more).
                    let killed = podmig_cri_ext::stray::kill_restore_of(&images);
                    if killed.is_empty() {
                        tracing::warn!(migration = %id, %error, "cannot freeze the lazily restored container");
                    } else {
                        tracing::warn!(migration = %id, %error, pids = ?killed,
                            "the page source broke during the restore: stopped the restore, so the container never runs on missing memory");
                        if let Some(w) = waiting.upgrade() {
                            w.kill();
                        }
                    }
                }
            };
            match peers.tunnel_pages(&host, &id, listener, PAGES_LIMIT, on_break).await {
                Ok(end) => tracing::info!(migration = %id, ?end, "page tunnel ended"),
                Err(error) => {
                    tracing::warn!(migration = %id, %error, "page tunnel failed");
                    if let Some(w) = waiting.upgrade() {
                        w.kill();
                    }
                }
            }
        });
        Ok(LazyTarget { pages, broke })
    }
}

/// Checks what the source says each page stream carried against what arrived here.
pub(super) fn check_streams(
    sink: &Sink,
    announced: &[(String, StreamFigures)],
) -> Result<(), StreamCheck> {
    for (container, sent) in announced {
        let got = sink.wait(container, Duration::from_secs(30))?;
        if got != *sent {
            return Err(StreamCheck::Damaged {
                container: container.clone(),
                sent: *sent,
                got,
            });
        }
    }
    Ok(())
}

/// The images of container `name` and those of its siblings, from what the source handed over.
pub(super) fn split_arrival(
    images: Vec<(String, PathBuf)>,
    name: &str,
) -> Result<(PathBuf, Vec<(String, PathBuf)>), FetchError> {
    let (mine, others): (Vec<_>, Vec<_>) = images.into_iter().partition(|(n, _)| n == name);
    let dir = mine
        .into_iter()
        .next()
        .map(|(_, d)| d)
        .ok_or_else(|| FetchError::NoImages(name.to_owned()))?;
    Ok((dir, others))
}
