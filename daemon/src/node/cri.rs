//! The CRI checkpoint/restore extension (gRPC on a root-only unix socket): requests
//! become updates of the Pod's worker, so a CRI checkpoint holds kills like a move does.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use podmig_cri_ext::{
    engine::{CheckpointEngine, CheckpointOptions},
    identity::Annotations,
    proto::runtime::v1::{
        CheckpointContainerRequest, CheckpointContainerResponse, ListRestoresRequest,
        ListRestoresResponse, RestoreContainerRequest, RestoreContainerResponse,
        checkpoint_service_server::CheckpointService,
    },
};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::{podsync::PodUpdate, shared::Node};

/// The gRPC face of the node.
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
        let node = &self.0;
        // Read before the dump: runc forgets a container it dumped without --leave-running.
        let (uid, name) = Annotations::from_runc_state(&node.settings.runc_root, &req.container_id)
            .ok()
            .map(|(ann, _)| {
                let id = ann.identity(&req.container_id, Path::new(""), &node.settings.runc_root);
                (
                    Some(id.pod_uid).filter(|u| !u.is_empty()),
                    id.container_name,
                )
            })
            .unwrap_or_default();
        let key = uid.unwrap_or_else(|| format!("container:{}", req.container_id));
        let name = if name.is_empty() {
            req.container_id.clone()
        } else {
            name
        };
        let (tx, rx) = oneshot::channel();
        node.dispatch(
            &key,
            PodUpdate::Checkpoint {
                container_id: req.container_id.clone(),
                container: name,
                options: CheckpointOptions {
                    image_path: PathBuf::from(&opts.checkpoint_path),
                    leave_running: opts.leave_running,
                    tcp_established: opts.tcp_established,
                    keep_frozen: false,
                    stream_pages: None,
                },
                reply: tx,
            },
        );
        match rx.await {
            Ok(Ok(report)) => Ok(Response::new(CheckpointContainerResponse {
                checkpoint_path: opts.checkpoint_path,
                duration_ms: report.duration.as_millis() as u64,
                image_bytes: report.image_bytes,
            })),
            Ok(Err(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(_) => Err(Status::unavailable("the Pod's worker went away")),
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
        let (tx, rx) = oneshot::channel();
        self.0.dispatch(
            &req.pod_uid,
            PodUpdate::Arm {
                container: req.container_name,
                images: PathBuf::from(path),
                reply: tx,
            },
        );
        match rx.await {
            Ok(Ok(())) => Ok(Response::new(RestoreContainerResponse {})),
            Ok(Err(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(_) => Err(Status::unavailable("the Pod's worker went away")),
        }
    }

    async fn list_restores(
        &self,
        request: Request<ListRestoresRequest>,
    ) -> Result<Response<ListRestoresResponse>, Status> {
        let restores = self.0.manager.restores(&request.into_inner().pod_uid);
        Ok(Response::new(ListRestoresResponse { restores }))
    }
}
