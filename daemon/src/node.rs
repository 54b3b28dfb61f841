//! `podmig node`: the per-node daemon. For now it serves the runtime hook of
//! `podmig-runc` and the CRI checkpoint/restore extension; the Pod sync loop, the
//! migration manager and the HTTP API join it in later issues.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use podmig_cri_ext::{
    engine::{CheckpointEngine, CheckpointOptions, Runc},
    hook::{Decision, HookHandler},
    proto::{
        hook::v1::{Event, HookRequest, NoOp, Pass, hook_response::Decision as Answer},
        runtime::v1::{
            CheckpointContainerRequest, CheckpointContainerResponse, RestoreContainerRequest,
            RestoreContainerResponse,
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
    /// Restores handed to podmig-runc, by container id: the images to drop afterwards.
    restoring: Mutex<HashMap<String, PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder cannot leave these maps inconsistent: every update is one insert/remove.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<E: CheckpointEngine> Node<E> {
    /// A node daemon using `engine` and keeping checkpoints in `store`.
    pub fn new(engine: E, store: CheckpointStore, kill_hold: Duration) -> Self {
        Self {
            engine: Arc::new(engine),
            store,
            kill_hold,
            armed: Mutex::default(),
            in_flight: Mutex::default(),
            restoring: Mutex::default(),
        }
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
                let source = c.annotations.get(podmig_api::ANNOTATION_MIGRATE_FROM).cloned();
                let lookup = self.lookup(&c.pod_uid, &c.container_name, source.as_deref());
                let answer = decide::on_create(&c, &lookup);
                match &answer {
                    Answer::RestoreFrom(r) => {
                        tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid,
                            container = %c.container_name, images = %r.image_path, "restoring container");
                        lock(&self.restoring).insert(c.container_id.clone(), PathBuf::from(&r.image_path));
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
        let images = lock(&self.restoring).remove(&c.container_id);
        if result.ok {
            tracing::info!(container_id = %c.container_id, pod_uid = %c.pod_uid,
                restore_ms = result.duration_ms, "container restored");
            lock(&self.armed).remove(&(c.pod_uid.clone(), c.container_name.clone()));
            if let Some(dir) = images {
                self.store.remove(&dir);
            }
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
            return Err(Status::invalid_argument("options.checkpoint_path is required"));
        }
        let node = self.0.clone();
        let id = req.container_id.clone();
        let (tx, rx) = watch::channel(None);
        lock(&node.in_flight).insert(id.clone(), rx);
        let options = CheckpointOptions {
            image_path: PathBuf::from(&opts.checkpoint_path),
            leave_running: opts.leave_running,
            tcp_established: opts.tcp_established,
        };
        let engine = node.engine.clone();
        let id2 = id.clone();
        let result = tokio::task::spawn_blocking(move || engine.checkpoint(&id2, &options))
            .await
            .map_err(|e| Status::internal(format!("checkpoint task: {e}")))?;
        lock(&node.in_flight).remove(&id);
        // A failed dump left the container running: held kills go ahead.
        let _ = tx.send(Some(result.is_err() || opts.leave_running));
        match result {
            Ok(report) => {
                tracing::info!(container_id = %id, dump_ms = report.duration.as_millis() as u64,
                    image_bytes = report.image_bytes, "container checkpointed");
                Ok(Response::new(CheckpointContainerResponse {
                    checkpoint_path: opts.checkpoint_path,
                    duration_ms: report.duration.as_millis() as u64,
                    image_bytes: report.image_bytes,
                }))
            }
            Err(e) => {
                tracing::warn!(container_id = %id, error = %e, "checkpoint failed");
                Err(Status::failed_precondition(e.to_string()))
            }
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
    let node = Arc::new(Node::new(
        engine,
        CheckpointStore::new(&cfg.checkpoint_dir),
        Duration::from_millis(cfg.kill_hold_ms),
    ));
    let hook = bind(&cfg.hook_socket)?;
    let api = bind(&cfg.api_socket)?;
    tracing::info!(hook = %cfg.hook_socket.display(), api = %cfg.api_socket.display(),
        runc_root = %cfg.runc_root.display(), "podmig node daemon ready");
    let hook_task = tokio::spawn(podmig_cri_ext::hook::serve(hook, node.clone()));
    let served = tonic::transport::Server::builder()
        .add_service(CheckpointServiceServer::new(CheckpointApi(node)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(api), shutdown)
        .await;
    hook_task.abort();
    let _ = std::fs::remove_file(&cfg.hook_socket);
    let _ = std::fs::remove_file(&cfg.api_socket);
    served.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podmig_cri_ext::{
        engine::CheckpointReport,
        proto::hook::v1::{ContainerIdentity, RestoreResult},
    };

    /// Engine that writes an inventory image after a delay, or fails.
    struct FakeEngine {
        delay: Duration,
        fail: bool,
    }

    impl CheckpointEngine for FakeEngine {
        fn checkpoint(&self, _id: &str, opts: &CheckpointOptions) -> podmig_cri_ext::Result<CheckpointReport> {
            #[allow(clippy::disallowed_methods)] // runs in spawn_blocking, like runc does
            std::thread::sleep(self.delay);
            if self.fail {
                return Err(podmig_cri_ext::Error::Usage("dump failed".into()));
            }
            std::fs::create_dir_all(&opts.image_path).expect("mkdir");
            std::fs::write(opts.image_path.join("inventory.img"), b"x").expect("write");
            Ok(CheckpointReport { duration: self.delay, image_bytes: 1 })
        }
    }

    fn node(tmp: &Path, fail: bool) -> Arc<Node<FakeEngine>> {
        Arc::new(Node::new(
            FakeEngine { delay: Duration::from_millis(100), fail },
            CheckpointStore::new(tmp),
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
            options: Some(podmig_cri_ext::proto::runtime::v1::CheckpointContainerOptions {
                checkpoint_path: path.display().to_string(),
                ..Default::default()
            }),
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
        CheckpointApi(n.clone()).checkpoint_container(ckpt_req("c1", &dir)).await.expect("ok");
        let a = answer(n.decide(req(Event::Create, "c2", "dst-uid", Some("src-uid"))).await).await;
        assert!(matches!(&a, Answer::RestoreFrom(r) if Path::new(&r.image_path) == dir));
        let mut done = req(Event::Restored, "c2", "dst-uid", Some("src-uid"));
        done.restore_result = Some(RestoreResult { ok: true, ..Default::default() });
        n.restored(done).await;
        assert!(!dir.exists(), "checkpoint must be deleted after a restore");
        assert!(!tmp.path().join("src-uid").exists());
    }

    #[tokio::test]
    async fn failed_restore_keeps_checkpoint_and_missing_one_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let n = node(tmp.path(), false);
        let a = answer(n.decide(req(Event::Create, "c2", "dst", Some("gone"))).await).await;
        assert!(matches!(a, Answer::Refuse(_)));
        let dir = tmp.path().join("src/app");
        CheckpointApi(n.clone()).checkpoint_container(ckpt_req("c1", &dir)).await.expect("ok");
        let _ = answer(n.decide(req(Event::Create, "c2", "dst", Some("src"))).await).await;
        let mut done = req(Event::Restored, "c2", "dst", Some("src"));
        done.restore_result = Some(RestoreResult { ok: false, error: "boom".into(), ..Default::default() });
        n.restored(done).await;
        assert!(dir.join("inventory.img").exists());
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
                options: Some(podmig_cri_ext::proto::runtime::v1::RestoreContainerOptions {
                    checkpoint_path: tmp.path().join("none").display().to_string(),
                    ..Default::default()
                }),
            }))
            .await
            .expect_err("no checkpoint");
        assert_eq!(s.code(), tonic::Code::NotFound);
    }
}
