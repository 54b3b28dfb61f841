//! The endpoints only peer daemons call: the hand-over of a checkpoint (`POST /migrate`
//! with a `handover`), the page streams and the lazy page tunnel of a move, and the
//! verdict (`POST /migrations/{id}/complete`). Each answers only the daemon of the node
//! the move names.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{Path as UrlPath, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use podmig_api::{
    nodeapi::{CHECKPOINT_MEDIA_TYPE, CompleteRequest, MigrateRequest},
    v1alpha1::Strategy,
};
use podmig_cri_ext::engine::CheckpointEngine;
use tokio::sync::oneshot;

use crate::node::{
    auth::{Attributes, Caller},
    migration::{Delivered, Verdict},
    peer::{
        HEADER_CHECKPOINT_MS, HEADER_FROZEN_MS, HEADER_PREFLIGHT_MS, HEADER_STRATEGY,
        PAGES_PROTOCOL,
    },
    podsync::PodUpdate,
    podsync::{MigrateOrder, MoveError, TargetRef},
    transfer::send_images,
};

use super::*;
use crate::node::migration::Role;

/// What the peer endpoints (hand-over, verdict, page tunnel) require: `create` on
/// `nodes/handover` of this node, a permission only the node daemons' role holds.
pub(super) fn peer_attrs<E>(s: &AppState<E>) -> Attributes {
    node_attrs(s, "create", podmig_api::PEER_SUBRESOURCE)
}

pub(super) fn refused(message: String) -> Failure {
    Failure::new(StatusCode::FORBIDDEN, "Forbidden", message)
}

/// Checks a hand-over against the API server before anything freezes: the caller is
/// the daemon of the node the target Pod is bound to, and the target is the one podmig's
/// controller made for this move of this Pod, in this Pod's namespace.
pub(super) async fn check_handover<E: CheckpointEngine>(
    s: &AppState<E>,
    uid: &str,
    pod: &Pod,
    caller: &Caller,
    h: &podmig_api::nodeapi::Handover,
) -> Result<(), Failure> {
    let Some(caller_node) = caller.node.as_deref() else {
        return Err(refused(format!(
            "user {:?} speaks for no node: only a node daemon takes a hand-over",
            caller.name
        )));
    };
    if h.target_node != caller_node {
        return Err(refused(format!(
            "node {caller_node:?} cannot take a hand-over for a target on node {:?}",
            h.target_node
        )));
    }
    let client = s.node.kube.clone().ok_or_else(|| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "no API access to check the target",
        )
    })?;
    let v = crate::node::trust::verify(&client, &h.target_namespace, &h.target_pod)
        .await
        .map_err(|why| refused(format!("hand-over refused: {why}")))?;
    let this_node = &s.node.settings.node_name;
    let namespace = pod.namespace().unwrap_or_default();
    let mismatch = if v.namespace != namespace {
        Some(format!(
            "the target is in namespace {:?}, the Pod in {namespace:?}",
            v.namespace
        ))
    } else if v.source_uid != uid {
        Some(format!(
            "the target's move is of Pod {}, not this one",
            v.source_uid
        ))
    } else if v.target_uid != h.target_pod_uid {
        Some(format!(
            "Pod {}/{} has uid {}, not {}",
            v.namespace, v.target_pod, v.target_uid, h.target_pod_uid
        ))
    } else if v.target_node != caller_node {
        Some(format!(
            "the target is bound to node {:?}, the caller is node {caller_node:?}",
            v.target_node
        ))
    } else if v.migration_id != h.migration_id {
        Some(format!(
            "the target belongs to move {:?}, not {:?}",
            v.migration_id, h.migration_id
        ))
    } else if v.source_node.as_deref().is_some_and(|n| n != this_node) {
        Some(format!(
            "the move's source node is {:?}, this is {this_node:?}",
            v.source_node
        ))
    } else {
        None
    };
    match mismatch {
        Some(why) => Err(refused(format!("hand-over refused: {why}"))),
        None => Ok(()),
    }
}

/// A peer's verdict or page request on move `id`: accepted only from the node that holds
/// the move's target (the one the hand-over went to).
pub(super) async fn check_peer_of_move<E: CheckpointEngine>(
    s: &AppState<E>,
    token: Option<&str>,
    id: &str,
) -> Result<(), Failure> {
    let record = s
        .node
        .manager
        .get(id)
        .into_iter()
        .find(|m| m.role == Role::Source);
    let caller = s.auth.check(token, &peer_attrs(s)).await?;
    let target_node = record.and_then(|r| r.peer_node);
    match (caller.node.as_deref(), target_node.as_deref()) {
        // An unknown move: the handler answers what it knows of it.
        (Some(_), None) => Ok(()),
        (Some(c), Some(t)) if c == t => Ok(()),
        (Some(c), Some(_)) => Err(refused(format!(
            "node {c:?} does not hold the target of move {id:?}"
        ))),
        (None, _) => Err(refused(format!(
            "user {:?} speaks for no node: only the target's daemon may answer for move {id:?}",
            caller.name
        ))),
    }
}

/// A peer daemon's request: checkpoint the Pod now and stream the images in the answer.
pub(super) async fn handover<E: CheckpointEngine>(
    s: &AppState<E>,
    uid: &str,
    pod: &Pod,
    caller: &Caller,
    body: MigrateRequest,
) -> Result<Response, Failure> {
    let h = body.handover.clone().unwrap_or_default();
    check_handover(s, uid, pod, caller, &h).await?;
    if body.strategy == Some(Strategy::Precopy) {
        return Err(not_migratable(NotMigratable::NoPrecopy));
    }
    // A Pod being deleted is fine here: migrate-on-delete moves exactly those.
    check_migratable(pod, &body.containers).map_err(not_migratable)?;
    let hold = if h.timeout_seconds > 0 {
        Duration::from_secs(u64::from(h.timeout_seconds))
    } else {
        s.node.settings.hold
    };
    let target = TargetRef {
        namespace: h.target_namespace.clone(),
        pod: h.target_pod.clone(),
        node: h.target_node.clone(),
    };
    let (tx, rx) = oneshot::channel();
    s.node.dispatch(
        uid,
        PodUpdate::Migrate {
            order: MigrateOrder {
                migration: h.migration_id.clone(),
                containers: body.containers,
                target: target.clone(),
                deadline: Instant::now() + hold,
                remote: true,
                // A hand-over that names no strategy is a full one.
                strategy: h.strategy.unwrap_or(Strategy::Full),
                stream_pages: h.stream_pages,
                max_downtime_ms: h
                    .max_downtime_ms
                    .unwrap_or(podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS),
                target_lazy_impossible: h.lazy_impossible.clone(),
                kept_ip: h.kept_ip.clone(),
            },
            prepared: tx,
        },
    );
    let prepared = match tokio::time::timeout(hold, rx).await {
        Err(_) => {
            return Err(Failure::new(
                StatusCode::GATEWAY_TIMEOUT,
                "Timeout",
                "the checkpoint was not taken in time",
            ));
        }
        Ok(Err(_)) => {
            return Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "the Pod's worker went away",
            ));
        }
        Ok(Ok(Err(e))) => {
            let (status, reason) = match &e {
                MoveError::NotRunning { .. }
                | MoveError::NothingRuns(_)
                | MoveError::NotLazy(_)
                | MoveError::NotCheckpointable(_) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "NotMigratable")
                }
                MoveError::Busy(_) | MoveError::Claimed(_) => {
                    (StatusCode::CONFLICT, "AlreadyMigrating")
                }
                MoveError::Checkpoint(_) => (StatusCode::INTERNAL_SERVER_ERROR, "CheckpointFailed"),
                MoveError::NoRoom(_) => (StatusCode::INSUFFICIENT_STORAGE, "InsufficientStorage"),
            };
            return Err(Failure::new(status, reason, e.to_string()));
        }
        Ok(Ok(Ok(p))) => p,
    };
    let frozen_ms = prepared.frozen_at.elapsed().as_millis() as u64;
    let (chunks, stream_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let node = s.node.clone();
    let id = h.migration_id.clone();
    let images = prepared.images.clone();
    let streamed = prepared.streamed.clone();
    let verdict = prepared.verdict;
    let pace = crate::node::stream::Pace::per_move(s.node.settings.move_bandwidth_mibps);
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let sent = send_images(&images, &streamed, |b| {
            if let Some(p) = &pace {
                p.take_blocking(b.len());
            }
            chunks.blocking_send(Ok(b)).is_ok()
        });
        match sent {
            Ok(bytes) => {
                let ms = started.elapsed().as_millis() as u64;
                node.metrics.phase_ms("transfer", ms);
                tracing::info!(migration = %id, target = %target, bytes, transfer_ms = ms, "checkpoint streamed");
            }
            Err(error) => {
                tracing::warn!(migration = %id, target = %target, %error, "checkpoint transfer broke");
                node.manager.deliver(
                    &id,
                    Verdict::Abort(format!("the transfer to {target} broke: {error}")),
                );
            }
        }
        drop(verdict);
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(stream_rx));
    let mut response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, CHECKPOINT_MEDIA_TYPE.to_owned()),
            (
                header::HeaderName::from_static(HEADER_CHECKPOINT_MS),
                prepared.checkpoint_ms.to_string(),
            ),
            (
                header::HeaderName::from_static(HEADER_PREFLIGHT_MS),
                prepared.preflight_ms.to_string(),
            ),
            (
                header::HeaderName::from_static(HEADER_FROZEN_MS),
                frozen_ms.to_string(),
            ),
            (
                header::HeaderName::from_static(HEADER_STRATEGY),
                if prepared.lazy { "lazy" } else { "full" }.to_owned(),
            ),
        ],
        body,
    )
        .into_response();
    if let Some(c) = &prepared.choice {
        let headers = response.headers_mut();
        headers.insert(
            header::HeaderName::from_static(crate::node::peer::HEADER_ESTIMATE_MS),
            header::HeaderValue::from(c.estimate_ms),
        );
        if let Ok(v) = header::HeaderValue::from_str(&c.reason) {
            headers.insert(
                header::HeaderName::from_static(crate::node::peer::HEADER_STRATEGY_REASON),
                v,
            );
        }
    }
    Ok(response)
}

/// Who may act on the source side of move `id`: whoever may migrate its Pod.
/// The page tunnel of a lazy move: after `101 Switching Protocols` the connection carries
/// CRIU's page-server protocol between the target's lazy-pages daemon and this node's
/// page server, inside the TLS channel.
pub(super) async fn pages<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(id): UrlPath<String>,
    mut request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    check_peer_of_move(&s, token.as_deref(), &id).await?;
    let server = s.node.manager.page_server(&id).ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "MigrationNotFound",
            format!("no lazy move {id:?} serves pages on this node"),
        )
    })?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let tunnel = async {
            let upgraded = upgrade.await.map_err(|e| e.to_string())?;
            let tcp = tokio::task::spawn_blocking(move || server.connect())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let mut tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            // Large buffers: CRIU serves pages in runs of up to 4 MiB.
            tokio::io::copy_bidirectional_with_sizes(&mut io, &mut tcp, 64 << 10, 1 << 20)
                .await
                .map_err(|e| e.to_string())
        };
        match tunnel.await {
            Ok((to_server, to_target)) => {
                tracing::info!(migration = %id, to_server, to_target, "page tunnel closed")
            }
            Err(error) => tracing::warn!(migration = %id, %error, "page tunnel broke"),
        }
    });
    switching_to_pages()
}

/// The answer that turns a peer's request into a raw byte stream ([`PAGES_PROTOCOL`]).
pub(super) fn switching_to_pages() -> Result<Response, Failure> {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, PAGES_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", e.to_string()))
}

/// A page stream of a streamed full move, from the source's daemon: after `101 Switching
/// Protocols` the connection carries CRIU's page-server protocol from the source's dump to
/// a page server writing into this (target) node's store. Accepted only from the daemon
/// of the move's source node, for a move this node asked to be streamed, into a container
/// of the target Pod.
pub(super) async fn streams<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath((id, container)): UrlPath<(String, String)>,
    mut request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    let caller = s.auth.check(token.as_deref(), &peer_attrs(&s)).await?;
    let sink = s.node.manager.page_sink(&id).ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "MigrationNotFound",
            format!("no move {id:?} expects page streams on this node"),
        )
    })?;
    if caller.node.as_deref() != Some(sink.source_node.as_str()) {
        return Err(refused(format!(
            "only the daemon of node {:?}, the source of move {id:?}, may stream its pages",
            sink.source_node
        )));
    }
    let dir = sink.dir_for(&container).ok_or_else(|| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("move {id:?} takes no pages of a container {container:?}"),
        )
    })?;
    // The pages count against this node's checkpoint budget from now until they are in.
    let expected = request
        .headers()
        .get(crate::node::peer::HEADER_EXPECTED_BYTES)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let reservation = s.node.reserve_stream(&dir, expected).map_err(|why| {
        tracing::warn!(migration = %id, container, %why, "page stream refused: no room");
        Failure::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "InsufficientStorage",
            format!("node {}: {why}", s.node.settings.node_name),
        )
    })?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _reservation = reservation;
        match upgrade.await {
            Ok(u) => {
                let tunnel = hyper_util::rt::TokioIo::new(u);
                crate::node::stream::receive(
                    sink,
                    container,
                    dir,
                    tunnel,
                    crate::node::podsync::PAGES_LIMIT,
                )
                .await
            }
            Err(error) => tracing::warn!(migration = %id, %error, "page stream upgrade failed"),
        }
    });
    switching_to_pages()
}

/// Link probe: another node's daemon sends zeros, this one reads and counts them (at most
/// the body limit) and answers how many, so that the sender can time the link before its
/// first move here (`strategy: auto`).
/// How much of a refused probe's body is read before the refusal is answered.
const REFUSED_BODY_BYTES: usize = 64 << 10;

pub(super) async fn probe<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    request: Request,
) -> Result<Response, Failure> {
    use http_body_util::BodyExt;
    let token = bearer(request.headers()).map(str::to_owned);
    let allowed = s.auth.check(token.as_deref(), &peer_attrs(&s)).await;
    let mut body = request.into_body();
    if let Err(refused) = allowed {
        // A client still sending would see its stream reset instead of the refusal
        // (curl: "Stream error in the HTTP/2 framing layer"): a small body is read first,
        // never more than REFUSED_BODY_BYTES of someone not allowed to send any.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut read = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > REFUSED_BODY_BYTES {
                    break;
                }
            }
        })
        .await;
        return Err(refused.into());
    }
    let mut bytes = 0usize;
    let counted = tokio::time::timeout(READ_TIMEOUT, async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            bytes += frame.data_ref().map_or(0, Bytes::len);
            if bytes > crate::node::peer::PROBE_MAX_BYTES {
                return Err(format!(
                    "a probe is at most {} bytes",
                    crate::node::peer::PROBE_MAX_BYTES
                ));
            }
        }
        Ok(())
    })
    .await;
    match counted {
        Ok(Ok(())) => Ok(axum::Json(serde_json::json!({ "bytes": bytes })).into_response()),
        Ok(Err(why)) => Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BodyTooLarge",
            why,
        )),
        Err(_) => Err(Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            "Timeout",
            "the probe did not arrive in time",
        )),
    }
}

pub(super) async fn complete<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(id): UrlPath<String>,
    request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    let raw = read_body(request).await;
    check_peer_of_move(&s, token.as_deref(), &id).await?;
    let body: CompleteRequest = parse_json(&raw?)?;
    if let Some(ms) = body.restore_ms {
        s.node
            .manager
            .update(crate::node::migration::Role::Source, &id, |i| {
                i.report.restore_ms = ms
            });
    }
    let verdict = if body.ok {
        Verdict::Commit
    } else {
        Verdict::Abort(body.error.unwrap_or_else(|| "the target failed".into()))
    };
    let asked = verdict.clone();
    match s.node.manager.deliver(&id, verdict) {
        Delivered::Now => Ok(StatusCode::NO_CONTENT.into_response()),
        Delivered::Already(decided) => repeated_verdict(&id, &asked, &decided),
        Delivered::Unknown => Err(Failure::new(
            StatusCode::NOT_FOUND,
            "MigrationNotFound",
            format!("no hand-over {id:?} waits for a verdict on this node"),
        )),
    }
}

/// The answer to a verdict on a move already decided: the same verdict again (a retry
/// after a lost answer, a restarted target asking again) is taken; the other one is a
/// conflict that names what the source did.
pub(super) fn repeated_verdict(
    id: &str,
    asked: &Verdict,
    decided: &Verdict,
) -> Result<Response, Failure> {
    match (asked, decided) {
        (Verdict::Commit, Verdict::Commit) | (Verdict::Abort(_), Verdict::Abort(_)) => Ok((
            StatusCode::OK,
            axum::Json(serde_json::json!({
                "migration": id,
                "verdict": if *decided == Verdict::Commit { "commit" } else { "abort" },
                "repeated": true,
            })),
        )
            .into_response()),
        (Verdict::Abort(_), Verdict::Commit) => Err(Failure::new(
            StatusCode::CONFLICT,
            "AlreadyCommitted",
            format!("move {id:?} was committed before: the source is gone and will not resume"),
        )),
        (Verdict::Commit, Verdict::Abort(why)) => Err(Failure::new(
            StatusCode::CONFLICT,
            "AlreadyAborted",
            format!(
                "move {id:?} was aborted before ({why}): the source resumed, the target must not run"
            ),
        )),
    }
}
