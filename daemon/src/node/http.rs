//! The node daemon's HTTPS API (axum over rustls):
//! - `POST /migrate/{pod-uid}`: a person or a scheduler asks to move a Pod of this node
//!   (recorded as a `Migration`), or a peer daemon asks for the hand-over of a checkpoint
//!   (the answer streams it, see [`super::transfer`]);
//! - `POST /migrations/{id}/complete`: a peer's verdict on a hand-over;
//! - `GET /migrations`, `GET /migrations/{id}`, `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! Every endpoint but health needs a bearer token (TokenReview) allowed by a
//! SubjectAccessReview: `create` on `pods/migrate` in the Pod's namespace for moves and
//! verdicts; `get` on `nodes/migrations` resp. `nodes/metrics` of this node for reading.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path as UrlPath, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::PostParams};
use podmig_api::{
    RUNTIME_HANDLER,
    nodeapi::{ApiError, CHECKPOINT_MEDIA_TYPE, CompleteRequest, MigrateRequest, MigrateResponse},
    v1alpha1::{Migration, MigrationSpec, Strategy},
};
use podmig_cri_ext::engine::CheckpointEngine;
use tokio::sync::oneshot;

use super::{
    Node, PodUpdate,
    auth::{Attributes, AuthError, Authorizer, Caller},
    migration::{Delivered, Verdict},
    peer::{HEADER_CHECKPOINT_MS, HEADER_FROZEN_MS, HEADER_STRATEGY, PAGES_PROTOCOL},
    podsync::{MigrateOrder, MoveError, TargetRef},
    transfer::send_images,
};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Bound on reading a request body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Annotation on a Migration created through this API: who asked.
const ANNOTATION_REQUESTED_BY: &str = "podmig.dev/requested-by";

struct AppState<E> {
    node: Arc<Node<E>>,
    auth: Authorizer,
}

/// An error answer: status, stable reason, message.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated(m) => {
                Failure::new(StatusCode::UNAUTHORIZED, "Unauthorized", m)
            }
            AuthError::Forbidden(m) => Failure::new(StatusCode::FORBIDDEN, "Forbidden", m),
            AuthError::Unavailable(m) => {
                Failure::new(StatusCode::SERVICE_UNAVAILABLE, "Unavailable", m)
            }
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
                reason: self.reason.into(),
            }),
        )
            .into_response()
    }
}

fn unavailable(e: kube::Error) -> Failure {
    Failure::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        format!("the API server could not be asked: {e}"),
    )
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Starts the HTTPS API on `listen` with the serving certificate and key (PEM files).
pub async fn serve<E: CheckpointEngine>(
    node: Arc<Node<E>>,
    listen: SocketAddr,
    cert: &Path,
    key: &Path,
) -> crate::Result<axum_server::Handle<SocketAddr>> {
    let client = node
        .kube
        .clone()
        .ok_or_else(|| crate::Error::InvalidRequest("the HTTP API needs API access".into()))?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .map_err(|source| crate::Error::Listen {
            path: cert.to_path_buf(),
            source,
        })?;
    let state = Arc::new(AppState {
        node,
        auth: Authorizer::new(client),
    });
    let app = router(state);
    let handle = axum_server::Handle::new();
    let listener = std::net::TcpListener::bind(listen).map_err(|source| crate::Error::Listen {
        path: listen.to_string().into(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| crate::Error::Listen {
            path: listen.to_string().into(),
            source,
        })?;
    // TCP_NODELAY on every accepted connection: the verdict and CRIU's page requests
    // through the page tunnel are small messages that Nagle would hold back.
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    let server = axum_server::from_tcp(listener)
        .map_err(|source| crate::Error::Listen {
            path: listen.to_string().into(),
            source,
        })?
        .acceptor(acceptor)
        .handle(handle.clone());
    tokio::spawn(async move {
        if let Err(error) = server.serve(app.into_make_service()).await {
            tracing::error!(%error, "migration API stopped");
        }
    });
    Ok(handle)
}

fn router<E: CheckpointEngine>(state: Arc<AppState<E>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics::<E>))
        .route("/migrate/{uid}", post(migrate::<E>))
        .route("/migrations", get(list::<E>))
        .route("/migrations/{id}", get(one::<E>))
        .route("/migrations/{id}/complete", post(complete::<E>))
        .route("/migrations/{id}/pages", post(pages::<E>))
        .route("/migrations/{id}/streams/{container}", post(streams::<E>))
        .fallback(|| async { Failure::new(StatusCode::NOT_FOUND, "NotFound", "no such endpoint") })
        .with_state(state)
}

fn node_attrs<E>(s: &AppState<E>, verb: &'static str, sub: &'static str) -> Attributes {
    Attributes {
        verb,
        group: "",
        resource: "nodes",
        subresource: sub,
        namespace: String::new(),
        name: s.node.settings.node_name.clone(),
    }
}

async fn metrics<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    s.auth
        .check(bearer(&headers), &node_attrs(&s, "get", "metrics"))
        .await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.node.metrics.render(),
    )
        .into_response())
}

async fn list<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    s.auth
        .check(bearer(&headers), &node_attrs(&s, "get", "migrations"))
        .await?;
    Ok(Json(s.node.manager.list()).into_response())
}

async fn one<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    s.auth
        .check(bearer(&headers), &node_attrs(&s, "get", "migrations"))
        .await?;
    let found = s.node.manager.get(&id);
    if found.is_empty() {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "MigrationNotFound",
            format!("no move {id:?} on this node"),
        ));
    }
    Ok(Json(found).into_response())
}

/// Reads a whole (bounded) request body. Read before any answer: an HTTP/2 client whose
/// body is left unread when the answer comes sees its stream reset.
async fn read_body(body: Body) -> Result<Bytes, Failure> {
    tokio::time::timeout(READ_TIMEOUT, axum::body::to_bytes(body, MAX_BODY))
        .await
        .map_err(|_| {
            Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                "Timeout",
                "the request body did not arrive in time",
            )
        })?
        .map_err(|e| {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BodyTooLarge",
                format!("request body over {MAX_BODY} bytes or unreadable: {e}"),
            )
        })
}

fn parse_json<T: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, Failure> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("malformed JSON body: {e}"),
        )
    })
}

fn not_migratable(message: String) -> Failure {
    Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "NotMigratable", message)
}

/// Why `pod` cannot be moved with `containers`, if it cannot (a Pod being deleted is
/// exactly what migrate-on-delete moves: callers decide on deletion themselves).
pub fn check_migratable(pod: &Pod, containers: &[String]) -> Result<(), String> {
    let name = pod.name_any();
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.runtime_class_name.as_deref() != Some(RUNTIME_HANDLER) {
        return Err(format!(
            "Pod {name:?} does not run with runtimeClassName {RUNTIME_HANDLER:?}"
        ));
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase != "Running" {
        return Err(format!("Pod {name:?} is {phase:?}, not Running"));
    }
    for c in containers {
        if !spec.containers.iter().any(|s| &s.name == c) {
            return Err(format!("Pod {name:?} has no container {c:?}"));
        }
    }
    Ok(())
}

#[derive(serde::Deserialize, Default)]
struct MigrateQuery {
    #[serde(default)]
    wait: bool,
}

async fn migrate<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(uid): UrlPath<String>,
    Query(q): Query<MigrateQuery>,
    request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    let raw = read_body(request.into_body()).await;
    // Authenticate before anything is revealed about the Pod.
    let pod = s.node.pod(&uid);
    let (ns, name) = pod
        .as_ref()
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .unwrap_or_default();
    // A hand-over is a peer daemon's request and needs the peer permission; anything
    // else is a person's or a scheduler's (`create pods/migrate`).
    let parsed: Option<MigrateRequest> = raw
        .as_ref()
        .ok()
        .and_then(|r| serde_json::from_slice(r).ok());
    if let Some(body) = parsed.filter(|b| b.handover.is_some()) {
        let caller = s.auth.check(token.as_deref(), &peer_attrs(&s)).await?;
        let pod = pod.ok_or_else(|| pod_not_found(&s, &uid))?;
        return handover(&s, &uid, &pod, &caller, body).await;
    }
    let attrs = Attributes {
        verb: "create",
        group: "",
        resource: "pods",
        subresource: "migrate",
        namespace: ns.clone(),
        name: name.clone(),
    };
    let user = s.auth.check(token.as_deref(), &attrs).await?.name;
    let body: MigrateRequest = parse_json(&raw?)?;
    let pod = pod.ok_or_else(|| pod_not_found(&s, &uid))?;
    match body.strategy.unwrap_or_default() {
        Strategy::Precopy => {
            return Err(not_migratable(
                "strategy precopy is not possible on these kernels (no soft-dirty memory \
                 tracking); use full, lazy or lazy-or-full"
                    .to_owned(),
            ));
        }
        Strategy::Lazy => {
            if let Some(why) = s.node.lazy_impossible() {
                return Err(not_migratable(format!(
                    "a lazy move is not possible: {why}; ask for lazy-or-full to fall back to full"
                )));
            }
        }
        _ => {}
    }
    check_migratable(&pod, &body.containers).map_err(not_migratable)?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(not_migratable(format!("Pod {name:?} is being deleted")));
    }
    let owned = pod
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == "MigratingPod");
    if !owned {
        return Err(not_migratable(format!(
            "Pod {name:?} is not controlled by a MigratingPod"
        )));
    }
    if let Some(id) = s.node.manager.active_for(&uid) {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "AlreadyMigrating",
            format!("move {id:?} of Pod {name:?} is already running"),
        ));
    }
    let client = s.node.kube.clone().ok_or_else(|| {
        Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "no API access",
        )
    })?;
    let migrations: Api<Migration> = Api::namespaced(client, &ns);
    let running = migrations
        .list(&Default::default())
        .await
        .map_err(unavailable)?
        .items
        .into_iter()
        .find(|m| {
            m.spec.pod_name == name
                && !m
                    .status
                    .as_ref()
                    .and_then(|st| st.phase)
                    .is_some_and(|p| p.is_terminal())
        });
    if let Some(m) = running {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "AlreadyMigrating",
            format!(
                "Migration {:?} is already moving Pod {name:?}",
                m.name_any()
            ),
        ));
    }
    let suffix: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(6)
        .collect();
    let mut m = Migration::new(
        &format!("{name}-{suffix}"),
        MigrationSpec {
            pod_name: name.clone(),
            target_node: body.target_node.clone(),
            node_selector: body.node_selector.clone(),
            strategy: body.strategy.unwrap_or_default(),
            max_downtime_ms: body
                .max_downtime_ms
                .unwrap_or(podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS)
                .max(1),
            timeout_seconds: body.timeout_seconds.unwrap_or(300).max(1),
        },
    );
    m.metadata
        .annotations
        .get_or_insert_default()
        .insert(ANNOTATION_REQUESTED_BY.into(), user.clone());
    let created = migrations
        .create(&PostParams::default(), &m)
        .await
        .map_err(unavailable)?;
    let mig_name = created.name_any();
    tracing::info!(pod_uid = %uid, migration = %mig_name, %user, "move requested over HTTP");
    let mut answer = MigrateResponse {
        migration: mig_name.clone(),
        namespace: ns.clone(),
        pod: name.clone(),
        ..Default::default()
    };
    if !q.wait {
        return Ok((StatusCode::ACCEPTED, Json(answer)).into_response());
    }
    let bound = Duration::from_secs(u64::from(created.spec.timeout_seconds) + 30);
    let started = Instant::now();
    loop {
        if let Ok(Some(m)) = migrations.get_opt(&mig_name).await
            && let Some(st) = m.status
        {
            answer.phase = st.phase;
            answer.reason = st.reason;
            answer.message = st.message;
            answer.target_pod = st.target_pod;
            answer.target_node = st.target_node;
            answer.report = st.report;
            answer.transitions = st.transitions;
            let done = answer.phase.is_some_and(|p| p.is_terminal());
            // A success is complete once the daemons' figures are in.
            let figures = answer.phase != Some(podmig_api::v1alpha1::MigrationPhase::Succeeded)
                || answer.report.is_some()
                || started.elapsed() > bound;
            if done && figures {
                return Ok((StatusCode::OK, Json(answer)).into_response());
            }
        }
        if started.elapsed() > bound {
            return Ok((StatusCode::ACCEPTED, Json(answer)).into_response());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn pod_not_found<E>(s: &AppState<E>, uid: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "PodNotFound",
        format!(
            "no Pod with uid {uid:?} runs on node {:?}",
            s.node.settings.node_name
        ),
    )
}

/// What the peer endpoints (hand-over, verdict, page tunnel) require: `create` on
/// `nodes/handover` of this node, a permission only the node daemons' role holds.
fn peer_attrs<E>(s: &AppState<E>) -> Attributes {
    node_attrs(s, "create", podmig_api::PEER_SUBRESOURCE)
}

fn refused(message: String) -> Failure {
    Failure::new(StatusCode::FORBIDDEN, "Forbidden", message)
}

/// Checks a hand-over against the API server before anything freezes: the caller is
/// the daemon of the node the target Pod is bound to, and the target is the one podmig's
/// controller made for this move of this Pod, in this Pod's namespace.
async fn check_handover<E: CheckpointEngine>(
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
    let v = super::trust::verify(&client, &h.target_namespace, &h.target_pod)
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
async fn check_peer_of_move<E: CheckpointEngine>(
    s: &AppState<E>,
    token: Option<&str>,
    id: &str,
) -> Result<(), Failure> {
    let record = s
        .node
        .manager
        .get(id)
        .into_iter()
        .find(|m| m.role == "source");
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
async fn handover<E: CheckpointEngine>(
    s: &AppState<E>,
    uid: &str,
    pod: &Pod,
    caller: &Caller,
    body: MigrateRequest,
) -> Result<Response, Failure> {
    let h = body.handover.clone().unwrap_or_default();
    check_handover(s, uid, pod, caller, &h).await?;
    if body.strategy == Some(Strategy::Precopy) {
        return Err(not_migratable(
            "strategy precopy is not possible on these kernels (no soft-dirty memory tracking)"
                .to_owned(),
        ));
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
                MoveError::NotRunning(_) | MoveError::NotLazy(_) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "NotMigratable")
                }
                MoveError::Busy(_) => (StatusCode::CONFLICT, "AlreadyMigrating"),
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
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let sent = send_images(&images, &streamed, |b| chunks.blocking_send(Ok(b)).is_ok());
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
            header::HeaderName::from_static(super::peer::HEADER_ESTIMATE_MS),
            header::HeaderValue::from(c.estimate_ms),
        );
        if let Ok(v) = header::HeaderValue::from_str(&c.reason) {
            headers.insert(
                header::HeaderName::from_static(super::peer::HEADER_STRATEGY_REASON),
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
async fn pages<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(id): UrlPath<String>,
    mut request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    check_peer_of_move(&s, token.as_deref(), &id).await?;
    let server = super::lock(&s.node.page_servers)
        .get(&id)
        .cloned()
        .ok_or_else(|| {
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
fn switching_to_pages() -> Result<Response, Failure> {
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
async fn streams<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath((id, container)): UrlPath<(String, String)>,
    mut request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    let caller = s.auth.check(token.as_deref(), &peer_attrs(&s)).await?;
    let sink = super::lock(&s.node.page_sinks)
        .get(&id)
        .cloned()
        .ok_or_else(|| {
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
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(u) => {
                let tunnel = hyper_util::rt::TokioIo::new(u);
                super::stream::receive(sink, container, dir, tunnel, super::podsync::PAGES_LIMIT)
                    .await
            }
            Err(error) => tracing::warn!(migration = %id, %error, "page stream upgrade failed"),
        }
    });
    switching_to_pages()
}

async fn complete<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(id): UrlPath<String>,
    request: Request,
) -> Result<Response, Failure> {
    let token = bearer(request.headers()).map(str::to_owned);
    let raw = read_body(request.into_body()).await;
    check_peer_of_move(&s, token.as_deref(), &id).await?;
    let body: CompleteRequest = parse_json(&raw?)?;
    if let Some(ms) = body.restore_ms {
        s.node
            .manager
            .update(super::migration::Role::Source, &id, |i| {
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
fn repeated_verdict(id: &str, asked: &Verdict, decided: &Verdict) -> Result<Response, Failure> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        let mut base = json!({"metadata": {"name": "x-0", "uid": "u"},
            "spec": {"runtimeClassName": "podmig", "containers": [{"name": "app"}]},
            "status": {"phase": "Running"}});
        for (k, val) in v.as_object().cloned().unwrap_or_default() {
            base[k] = val;
        }
        serde_json::from_value(base).expect("pod")
    }

    #[test]
    fn only_running_podmig_pods_with_known_containers_move() {
        assert!(check_migratable(&pod(json!({})), &["app".into()]).is_ok());
        let e = check_migratable(
            &pod(json!({"spec": {"containers": [{"name": "app"}]}})),
            &[],
        )
        .expect_err("runtime class");
        assert!(e.contains("runtimeClassName"), "{e}");
        let e = check_migratable(&pod(json!({"status": {"phase": "Pending"}})), &[])
            .expect_err("pending");
        assert!(e.contains("Pending"), "{e}");
        let e = check_migratable(&pod(json!({})), &["db".into()]).expect_err("container");
        assert!(e.contains("\"db\""), "{e}");
    }

    #[test]
    fn a_repeated_verdict_is_taken_and_a_contrary_one_names_what_was_decided() {
        let r = repeated_verdict("m", &Verdict::Commit, &Verdict::Commit).expect("taken");
        assert_eq!(r.status(), StatusCode::OK);
        let r = repeated_verdict(
            "m",
            &Verdict::Abort("x".into()),
            &Verdict::Abort("y".into()),
        )
        .expect("taken");
        assert_eq!(r.status(), StatusCode::OK);
        let e = repeated_verdict("m", &Verdict::Commit, &Verdict::Abort("deadline".into()))
            .expect_err("conflict");
        assert_eq!(
            (e.status, e.reason, e.message.contains("deadline")),
            (StatusCode::CONFLICT, "AlreadyAborted", true)
        );
        let e = repeated_verdict("m", &Verdict::Abort("x".into()), &Verdict::Commit)
            .expect_err("conflict");
        assert_eq!(
            (e.status, e.reason),
            (StatusCode::CONFLICT, "AlreadyCommitted")
        );
    }

    #[test]
    fn failures_answer_json_with_a_reason() {
        let r = Failure::from(AuthError::Unauthenticated("no token".into())).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = not_migratable("nope".into()).into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
