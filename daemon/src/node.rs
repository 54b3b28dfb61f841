//! `podmig node`: the per-node daemon. For now it serves the runtime hook of
//! `podmig-runc` and the CRI checkpoint/restore extension; the Pod sync loop, the
//! migration manager and the HTTP API join it in later issues.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use podmig_cri_ext::{
    engine::{CheckpointEngine, CheckpointOptions, CheckpointReport, Runc},
    hook::{Decision, HookHandler},
    identity::find_container,
    proto::{
        hook::v1::{
            ContainerIdentity, Event, HookRequest, NoOp, Pass, Refuse,
            hook_response::Decision as Answer,
        },
        runtime::v1::{
            CheckpointContainerRequest, CheckpointContainerResponse, ListRestoresRequest,
            ListRestoresResponse, RestoreContainerRequest, RestoreContainerResponse, RestoreRecord,
            checkpoint_service_server::{CheckpointService, CheckpointServiceServer},
        },
    },
};
use tokio::{
    net::UnixListener,
    sync::{oneshot, watch},
};
use tonic::{Request, Response, Status};

use crate::{
    Error, Result,
    config::NodeConfig,
    decide::{self, CheckpointLookup},
    store::CheckpointStore,
};

/// A checkpoint in progress: kills of the container wait on it.
type InFlight = watch::Receiver<Option<bool>>;

/// State shared by the daemon's servers.
pub struct Node<E> {
    engine: Arc<E>,
    store: CheckpointStore,
    kill_hold: Duration,
    /// Restores armed by RestoreContainer, by (pod uid, container name).
    armed: Mutex<HashMap<(String, String), PathBuf>>,
    /// Checkpoints being taken, by container id; the value turns `Some(left_running)`.
    in_flight: Mutex<HashMap<String, InFlight>>,
    /// Restores handed to podmig-runc, by container id.
    restoring: Mutex<HashMap<String, PendingRestore>>,
    /// Finished restores, oldest first (bounded).
    restores: Mutex<Vec<RestoreRecord>>,
    /// runc state root, where migration sources on this node are found.
    runc_root: PathBuf,
    /// Containers dumped away from this node, by (pod uid, container name): the runtime
    /// must not start them again (kubelet would restart the dumped container), or two
    /// copies would run.
    migrated: Mutex<HashMap<(String, String), Instant>>,
    /// Writes move progress on target Pods, when the daemon has API credentials.
    reporter: Option<crate::report::PodReporter>,
}

/// How long a migrated container is refused a restart (its Pod is deleted well before).
const MIGRATED_TTL: Duration = Duration::from_secs(600);

/// A restore podmig-runc is performing.
struct PendingRestore {
    /// Images to drop after success.
    images: PathBuf,
    /// When this node froze the source, if it did.
    frozen_at: Option<Instant>,
    /// The record being filled in.
    record: RestoreRecord,
}

/// How many finished restores are remembered.
const RESTORE_HISTORY: usize = 256;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder cannot leave these maps inconsistent: every update is one insert/remove.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<E: CheckpointEngine> Node<E> {
    /// A node daemon using `engine` and keeping checkpoints in `store`.
    pub fn new(engine: E, store: CheckpointStore, runc_root: PathBuf, kill_hold: Duration) -> Self {
        Self {
            engine: Arc::new(engine),
            store,
            kill_hold,
            armed: Mutex::default(),
            in_flight: Mutex::default(),
            restoring: Mutex::default(),
            restores: Mutex::default(),
            runc_root,
            migrated: Mutex::default(),
            reporter: None,
        }
    }

    /// Reports move progress on target Pods through `reporter`.
    pub fn with_reporter(mut self, reporter: crate::report::PodReporter) -> Self {
        self.reporter = Some(reporter);
        self
    }

    fn report_phase(&self, c: &ContainerIdentity, phase: &str) {
        if let Some(r) = &self.reporter {
            r.phase(&c.pod_namespace, &c.pod_name, phase);
        }
    }

    /// Checkpoints container `id`; kills of it are held meanwhile.
    pub async fn checkpoint(
        &self,
        id: &str,
        options: CheckpointOptions,
    ) -> podmig_cri_ext::Result<CheckpointReport> {
        let (tx, rx) = watch::channel(None);
        lock(&self.in_flight).insert(id.to_owned(), rx);
        let leave_running = options.leave_running;
        // Read before the dump: runc forgets a container it dumped without --leave-running.
        let owner = podmig_cri_ext::identity::Annotations::from_runc_state(&self.runc_root, id)
            .ok()
            .and_then(|(ann, _)| {
                Some((
                    ann.pod_uid()?,
                    ann.identity(id, Path::new(""), &self.runc_root)
                        .container_name,
                ))
            });
        let engine = self.engine.clone();
        let id2 = id.to_owned();
        let result = tokio::task::spawn_blocking(move || engine.checkpoint(&id2, &options))
            .await
            .unwrap_or_else(|e| {
                Err(podmig_cri_ext::Error::Usage(format!(
                    "checkpoint task: {e}"
                )))
            });
        lock(&self.in_flight).remove(id);
        if result.is_ok()
            && !leave_running
            && let Some(key) = owner
        {
            let mut migrated = lock(&self.migrated);
            migrated.retain(|_, at| at.elapsed() < MIGRATED_TTL);
            migrated.insert(key, Instant::now());
        }
        // A failed dump left the container running: held kills go ahead.
        let _ = tx.send(Some(result.is_err() || leave_running));
        match &result {
            Ok(report) => {
                tracing::info!(container_id = %id, dump_ms = report.duration.as_millis() as u64,
                image_bytes = report.image_bytes, "container checkpointed")
            }
            Err(error) => tracing::warn!(container_id = %id, %error, "checkpoint failed"),
        }
        result
    }

    /// The restores performed on this node, optionally only those into `pod_uid`.
    pub fn restores(&self, pod_uid: &str) -> Vec<RestoreRecord> {
        lock(&self.restores)
            .iter()
            .filter(|r| pod_uid.is_empty() || r.pod_uid == pod_uid)
            .cloned()
            .collect()
    }

    /// A migration target whose source runs on this node: take its checkpoint now, as late
    /// as possible (the target's container is created and waiting).
    async fn checkpoint_local_source(
        &self,
        c: &ContainerIdentity,
        source_uid: &str,
        dir: &Path,
    ) -> Option<Result<(CheckpointReport, Instant), String>> {
        let source_id = find_container(&self.runc_root, source_uid, &c.container_name)?;
        tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid, source_pod_uid = %source_uid,
            source_container_id = %source_id, "checkpointing local migration source");
        let frozen_at = Instant::now();
        let options = CheckpointOptions {
            image_path: dir.to_path_buf(),
            ..Default::default()
        };
        Some(
            self.checkpoint(&source_id, options)
                .await
                .map(|r| (r, frozen_at))
                .map_err(|e| format!("checkpoint of source container {source_id} failed: {e}")),
        )
    }

    fn lookup(&self, pod_uid: &str, container: &str, source_uid: Option<&str>) -> CheckpointLookup {
        if let Some(dir) = lock(&self.armed).get(&(pod_uid.to_owned(), container.to_owned())) {
            return CheckpointLookup::Armed(dir.clone());
        }
        let Some(dir) = source_uid.and_then(|s| self.store.path_for(s, container)) else {
            return CheckpointLookup::Missing(None);
        };
        if self.store.has_checkpoint(&dir) {
            CheckpointLookup::Stored(dir)
        } else {
            CheckpointLookup::Missing(Some(dir))
        }
    }
}

impl<E: CheckpointEngine> HookHandler for Node<E> {
    async fn decide(&self, req: HookRequest) -> Decision {
        let c = req.container.clone().unwrap_or_default();
        match req.event() {
            Event::Create => {
                let source = c
                    .annotations
                    .get(podmig_api::ANNOTATION_MIGRATE_FROM)
                    .cloned();
                if source.is_none()
                    && lock(&self.migrated)
                        .get(&(c.pod_uid.clone(), c.container_name.clone()))
                        .is_some_and(|at| at.elapsed() < MIGRATED_TTL)
                {
                    let reason = format!(
                        "container {:?} of pod {} was migrated away; it is not started again here",
                        c.container_name, c.pod_uid
                    );
                    tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid, "refusing restart of a migrated container");
                    return Decision::Reply(Answer::Refuse(Refuse { reason }));
                }
                let mut lookup = self.lookup(&c.pod_uid, &c.container_name, source.as_deref());
                let mut dumped = None;
                if let (CheckpointLookup::Missing(Some(dir)), Some(src)) = (&lookup, &source) {
                    self.report_phase(&c, "Checkpointing");
                    match self.checkpoint_local_source(&c, src, dir).await {
                        Some(Ok(report)) => {
                            lookup = CheckpointLookup::Stored(dir.clone());
                            dumped = Some(report);
                        }
                        Some(Err(reason)) => {
                            if let Some(r) = &self.reporter {
                                r.done(
                                    &c.pod_namespace,
                                    &c.pod_name,
                                    &podmig_api::v1alpha1::MigrationReport {
                                        error: Some(reason.clone()),
                                        ..Default::default()
                                    },
                                );
                            }
                            return Decision::Reply(Answer::Refuse(Refuse { reason }));
                        }
                        None => {}
                    }
                }
                let answer = decide::on_create(&c, &lookup);
                match &answer {
                    Answer::RestoreFrom(r) => {
                        tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid,
                            container = %c.container_name, images = %r.image_path,
                            since_freeze_ms = dumped.map_or(0, |(_, at)| at.elapsed().as_millis() as u64),
                            "restoring container");
                        let record = RestoreRecord {
                            pod_uid: c.pod_uid.clone(),
                            container_name: c.container_name.clone(),
                            container_id: c.container_id.clone(),
                            source_pod_uid: source.clone().unwrap_or_default(),
                            checkpoint_ms: dumped.map_or(0, |(r, _)| r.duration.as_millis() as u64),
                            image_bytes: dumped.map_or(0, |(r, _)| r.image_bytes),
                            ..Default::default()
                        };
                        self.report_phase(&c, "Restoring");
                        lock(&self.restoring).insert(
                            c.container_id.clone(),
                            PendingRestore {
                                images: PathBuf::from(&r.image_path),
                                frozen_at: dumped.map(|(_, at)| at),
                                record,
                            },
                        );
                    }
                    Answer::Refuse(r) => tracing::warn!(container_id = %c.container_id,
                        pod_uid = %c.pod_uid, reason = %r.reason, "refusing create"),
                    _ => {}
                }
                Decision::Reply(answer)
            }
            Event::Kill => {
                let Some(mut done) = lock(&self.in_flight).get(&c.container_id).cloned() else {
                    return Decision::Reply(Answer::Pass(Pass {}));
                };
                tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid,
                    signal = %req.signal, "holding kill until the checkpoint is taken");
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move {
                    let outcome = done.wait_for(Option::is_some).await.ok().and_then(|v| *v);
                    // Dumped and stopped: nothing is left to kill.
                    let answer = match outcome {
                        Some(false) => Answer::NoOp(NoOp {}),
                        _ => Answer::Pass(Pass {}),
                    };
                    let _ = tx.send(answer);
                });
                Decision::Hold {
                    timeout: self.kill_hold,
                    release: rx,
                }
            }
            _ => Decision::Reply(Answer::Pass(Pass {})),
        }
    }

    async fn restored(&self, req: HookRequest) {
        let c = req.container.unwrap_or_default();
        let result = req.restore_result.unwrap_or_default();
        let Some(pending) = lock(&self.restoring).remove(&c.container_id) else {
            tracing::warn!(container_id = %c.container_id, "restore report for an unknown restore");
            return;
        };
        let mut record = pending.record;
        record.ok = result.ok;
        record.error = result.error.clone();
        record.restore_ms = result.duration_ms;
        record.frozen_ms = pending
            .frozen_at
            .map_or(0, |at| at.elapsed().as_millis() as u64);
        {
            let mut restores = lock(&self.restores);
            if restores.len() == RESTORE_HISTORY {
                restores.remove(0);
            }
            restores.push(record.clone());
        }
        if let Some(r) = self
            .reporter
            .as_ref()
            .filter(|_| !record.source_pod_uid.is_empty())
        {
            r.done(
                &c.pod_namespace,
                &c.pod_name,
                &podmig_api::v1alpha1::MigrationReport {
                    checkpoint_ms: record.checkpoint_ms,
                    transfer_ms: 0,
                    restore_ms: record.restore_ms,
                    frozen_ms: record.frozen_ms,
                    bytes: record.image_bytes,
                    error: (!result.ok).then(|| result.error.clone()),
                },
            );
        }
        if result.ok {
            tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid,
                restore_ms = record.restore_ms, frozen_ms = record.frozen_ms, "container restored");
            lock(&self.armed).remove(&(c.pod_uid.clone(), c.container_name.clone()));
            self.store.remove(&pending.images);
        } else {
            // Kept: the same checkpoint is what a rollback resumes the source from.
            tracing::warn!(container_id = %c.container_id, pod_uid = %c.pod_uid,
                error = %result.error, "restore failed; checkpoint kept");
        }
    }
}

/// The gRPC face of the node: the CRI checkpoint/restore extension.
pub struct CheckpointApi<E>(pub Arc<Node<E>>);

#[tonic::async_trait]
impl<E: CheckpointEngine> CheckpointService for CheckpointApi<E> {
    async fn checkpoint_container(
        &self,
        request: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        let req = request.into_inner();
        let opts = req.options.unwrap_or_default();
        if req.container_id.is_empty() {
            return Err(Status::invalid_argument("container_id is required"));
        }
        if opts.checkpoint_path.is_empty() {
            return Err(Status::invalid_argument(
                "options.checkpoint_path is required",
            ));
        }
        let options = CheckpointOptions {
            image_path: PathBuf::from(&opts.checkpoint_path),
            leave_running: opts.leave_running,
            tcp_established: opts.tcp_established,
        };
        let result = self.0.checkpoint(&req.container_id, options).await;
        match result {
            Ok(report) => Ok(Response::new(CheckpointContainerResponse {
                checkpoint_path: opts.checkpoint_path,
                duration_ms: report.duration.as_millis() as u64,
                image_bytes: report.image_bytes,
            })),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }

    async fn restore_container(
        &self,
        request: Request<RestoreContainerRequest>,
    ) -> Result<Response<RestoreContainerResponse>, Status> {
        let req = request.into_inner();
        let path = req.options.unwrap_or_default().checkpoint_path;
        if req.pod_uid.is_empty() || req.container_name.is_empty() || path.is_empty() {
            return Err(Status::invalid_argument(
                "pod_uid, container_name and options.checkpoint_path are required",
            ));
        }
        if !self.0.store.has_checkpoint(Path::new(&path)) {
            return Err(Status::not_found(format!("no checkpoint in {path}")));
        }
        lock(&self.0.armed).insert((req.pod_uid, req.container_name), PathBuf::from(path));
        Ok(Response::new(RestoreContainerResponse {}))
    }

    async fn list_restores(
        &self,
        request: Request<ListRestoresRequest>,
    ) -> Result<Response<ListRestoresResponse>, Status> {
        let restores = self.0.restores(&request.into_inner().pod_uid);
        Ok(Response::new(ListRestoresResponse { restores }))
    }
}

fn bind(path: &Path) -> Result<UnixListener> {
    let err = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Runs the node daemon until `shutdown` resolves.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    podmig_cri_ext::engine::create_private_dir(&cfg.checkpoint_dir)?;
    let engine = Runc {
        binary: cfg.runc_binary.clone(),
        root: cfg.runc_root.clone(),
    };
    let reporter = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                Error::InvalidRequest(format!("kubeconfig {}: {e}", path.display()))
            })?;
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| Error::InvalidRequest(format!("kubeconfig {}: {e}", path.display())))?;
            Some(crate::report::PodReporter::new(
                kube::Client::try_from(config).map_err(|e| Error::InvalidRequest(e.to_string()))?,
            ))
        }
        None => None,
    };
    let node = Node::new(
        engine,
        CheckpointStore::new(&cfg.checkpoint_dir),
        cfg.runc_root.clone(),
        Duration::from_millis(cfg.kill_hold_ms),
    );
    let node = Arc::new(match reporter {
        Some(r) => node.with_reporter(r),
        None => node,
    });
    let hook = bind(&cfg.hook_socket)?;
    let api = bind(&cfg.api_socket)?;
    tracing::info!(hook = %cfg.hook_socket.display(), api = %cfg.api_socket.display(),
        runc_root = %cfg.runc_root.display(), "podmig node daemon ready");
    let hook_task = tokio::spawn(podmig_cri_ext::hook::serve(hook, node.clone()));
    let served = tonic::transport::Server::builder()
        .add_service(CheckpointServiceServer::new(CheckpointApi(node)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(api),
            shutdown,
        )
        .await;
    hook_task.abort();
    let _ = std::fs::remove_file(&cfg.hook_socket);
    let _ = std::fs::remove_file(&cfg.api_socket);
    served.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podmig_cri_ext::proto::hook::v1::RestoreResult;

    /// Engine that writes an inventory image after a delay, or fails.
    struct FakeEngine {
        delay: Duration,
        fail: bool,
    }

    impl CheckpointEngine for FakeEngine {
        fn checkpoint(
            &self,
            _id: &str,
            opts: &CheckpointOptions,
        ) -> podmig_cri_ext::Result<CheckpointReport> {
            #[allow(clippy::disallowed_methods)] // runs in spawn_blocking, like runc does
            std::thread::sleep(self.delay);
            if self.fail {
                return Err(podmig_cri_ext::Error::Usage("dump failed".into()));
            }
            std::fs::create_dir_all(&opts.image_path).expect("mkdir");
            std::fs::write(opts.image_path.join("inventory.img"), b"x").expect("write");
            Ok(CheckpointReport {
                duration: self.delay,
                image_bytes: 1,
            })
        }
    }

    fn node(tmp: &Path, fail: bool) -> Arc<Node<FakeEngine>> {
        Arc::new(Node::new(
            FakeEngine {
                delay: Duration::from_millis(100),
                fail,
            },
            CheckpointStore::new(tmp),
            tmp.join("runc"),
            Duration::from_secs(5),
        ))
    }

    fn req(event: Event, id: &str, uid: &str, source: Option<&str>) -> HookRequest {
        HookRequest {
            event: event as i32,
            container: Some(ContainerIdentity {
                container_id: id.into(),
                pod_uid: uid.into(),
                container_name: "app".into(),
                annotations: source
                    .map(|s| (podmig_api::ANNOTATION_MIGRATE_FROM.to_owned(), s.to_owned()))
                    .into_iter()
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn answer(d: Decision) -> Answer {
        match d {
            Decision::Reply(a) => a,
            Decision::Hold { release, .. } => release.await.expect("released"),
        }
    }

    fn ckpt_req(id: &str, path: &Path) -> Request<CheckpointContainerRequest> {
        Request::new(CheckpointContainerRequest {
            container_id: id.into(),
            options: Some(
                podmig_cri_ext::proto::runtime::v1::CheckpointContainerOptions {
                    checkpoint_path: path.display().to_string(),
                    ..Default::default()
                },
            ),
        })
    }

    #[tokio::test]
    async fn kill_during_checkpoint_is_held_then_becomes_noop() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = node(tmp.path(), false);
        let api = CheckpointApi(n.clone());
        let dir = tmp.path().join("src-uid/app");
        let ck = tokio::spawn(async move { api.checkpoint_container(ckpt_req("c1", &dir)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = n.decide(req(Event::Kill, "c1", "src-uid", None)).await;
        assert!(matches!(d, Decision::Hold { .. }));
        assert!(matches!(answer(d).await, Answer::NoOp(_)));
        ck.await.expect("join").expect("checkpoint ok");
        // No checkpoint in flight any more: kills pass.
        let d = n.decide(req(Event::Kill, "c1", "src-uid", None)).await;
        assert!(matches!(answer(d).await, Answer::Pass(_)));
    }

    #[tokio::test]
    async fn failed_checkpoint_releases_held_kill_as_pass() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = node(tmp.path(), true);
        let api = CheckpointApi(n.clone());
        let dir = tmp.path().join("u/app");
        let ck = tokio::spawn(async move { api.checkpoint_container(ckpt_req("c1", &dir)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let d = n.decide(req(Event::Kill, "c1", "u", None)).await;
        assert!(matches!(answer(d).await, Answer::Pass(_)));
        let status = ck.await.expect("join").expect_err("must fail");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("dump failed"));
    }

    #[tokio::test]
    async fn target_create_restores_from_store_and_cleans_up_after_success() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = node(tmp.path(), false);
        let dir = tmp.path().join("src-uid/app");
        CheckpointApi(n.clone())
            .checkpoint_container(ckpt_req("c1", &dir))
            .await
            .expect("ok");
        let a = answer(
            n.decide(req(Event::Create, "c2", "dst-uid", Some("src-uid")))
                .await,
        )
        .await;
        assert!(matches!(&a, Answer::RestoreFrom(r) if Path::new(&r.image_path) == dir));
        let mut done = req(Event::Restored, "c2", "dst-uid", Some("src-uid"));
        done.restore_result = Some(RestoreResult {
            ok: true,
            ..Default::default()
        });
        n.restored(done).await;
        assert!(!dir.exists(), "checkpoint must be deleted after a restore");
        assert!(!tmp.path().join("src-uid").exists());
    }

    #[tokio::test]
    async fn failed_restore_keeps_checkpoint_and_missing_one_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = node(tmp.path(), false);
        let a = answer(
            n.decide(req(Event::Create, "c2", "dst", Some("gone")))
                .await,
        )
        .await;
        assert!(matches!(a, Answer::Refuse(_)));
        let dir = tmp.path().join("src/app");
        CheckpointApi(n.clone())
            .checkpoint_container(ckpt_req("c1", &dir))
            .await
            .expect("ok");
        let _ = answer(n.decide(req(Event::Create, "c2", "dst", Some("src"))).await).await;
        let mut done = req(Event::Restored, "c2", "dst", Some("src"));
        done.restore_result = Some(RestoreResult {
            ok: false,
            error: "boom".into(),
            ..Default::default()
        });
        n.restored(done).await;
        assert!(dir.join("inventory.img").exists());
    }

    fn live_source(tmp: &Path, pod_uid: &str) {
        let dir = tmp.join("runc").join("src-ctr");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("state.json"),
            format!(
                r#"{{"init_process_pid":{},"config":{{"labels":["io.kubernetes.cri.container-type=container","io.kubernetes.cri.sandbox-uid={pod_uid}","io.kubernetes.cri.container-name=app"]}}}}"#,
                std::process::id()
            ),
        )
        .expect("write");
    }

    #[tokio::test]
    async fn target_of_a_local_source_checkpoints_it_and_records_frozen_time() {
        let tmp = tempfile::tempdir().expect("tempdir");
        live_source(tmp.path(), "src");
        let n = node(tmp.path(), false);
        let a = answer(n.decide(req(Event::Create, "c2", "dst", Some("src"))).await).await;
        let image_path = match a {
            Answer::RestoreFrom(r) => r.image_path,
            other => panic!("expected a restore, got {other:?}"),
        };
        assert_eq!(Path::new(&image_path), tmp.path().join("src/app"));
        let mut done = req(Event::Restored, "c2", "dst", Some("src"));
        done.restore_result = Some(RestoreResult {
            ok: true,
            duration_ms: 40,
            ..Default::default()
        });
        n.restored(done).await;
        let records = n.restores("dst");
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert!(r.ok && r.source_pod_uid == "src" && r.restore_ms == 40);
        assert!(r.checkpoint_ms >= 100, "fake dump takes 100 ms: {r:?}");
        assert!(r.frozen_ms >= r.checkpoint_ms, "{r:?}");
        assert!(n.restores("other").is_empty());
        // kubelet restarting the dumped source container is refused: one copy only.
        match answer(n.decide(req(Event::Create, "c3", "src", None)).await).await {
            Answer::Refuse(r) => assert!(r.reason.contains("migrated away"), "{}", r.reason),
            other => panic!("expected refuse, got {other:?}"),
        }
        let other = answer(n.decide(req(Event::Create, "c4", "unrelated", None)).await).await;
        assert!(matches!(other, Answer::Pass(_)));
    }

    #[tokio::test]
    async fn failing_local_source_checkpoint_refuses_the_target() {
        let tmp = tempfile::tempdir().expect("tempdir");
        live_source(tmp.path(), "src");
        let n = node(tmp.path(), true);
        match answer(n.decide(req(Event::Create, "c2", "dst", Some("src"))).await).await {
            Answer::Refuse(r) => assert!(
                r.reason.contains("src-ctr") && r.reason.contains("dump failed"),
                "{}",
                r.reason
            ),
            other => panic!("expected refuse, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_requests_get_precise_status() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let api = CheckpointApi(node(tmp.path(), false));
        let s = api
            .checkpoint_container(Request::new(CheckpointContainerRequest::default()))
            .await
            .expect_err("empty id");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s = api
            .restore_container(Request::new(RestoreContainerRequest {
                pod_uid: "u".into(),
                container_name: "app".into(),
                options: Some(
                    podmig_cri_ext::proto::runtime::v1::RestoreContainerOptions {
                        checkpoint_path: tmp.path().join("none").display().to_string(),
                        ..Default::default()
                    },
                ),
            }))
            .await
            .expect_err("no checkpoint");
        assert_eq!(s.code(), tonic::Code::NotFound);
    }
}
