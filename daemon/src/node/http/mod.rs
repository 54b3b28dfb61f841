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

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use podmig_api::nodeapi::ApiError;
use podmig_cri_ext::engine::CheckpointEngine;

use super::{
    auth::{Attributes, AuthError, Authorizer},
    shared::Node,
};

mod migrate;
mod peers;

pub use migrate::check_migratable;
use migrate::*;
use peers::*;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Bound on reading a request's head (request line and headers).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
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
        let (status, reason) = match &e {
            AuthError::NoToken | AuthError::Unauthenticated { .. } => {
                (StatusCode::UNAUTHORIZED, "Unauthorized")
            }
            AuthError::Forbidden { .. } => (StatusCode::FORBIDDEN, "Forbidden"),
            AuthError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable"),
        };
        Failure::new(status, reason, e.to_string())
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
    // Offer HTTP/1.1 alone in ALPN: the server speaks nothing else (below), and a client
    // offered h2 (curl) would speak it.
    let mut only_h1 = (*tls.get_inner()).clone();
    only_h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.reload_from_config(Arc::new(only_h1));
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
    // Garbage is answered 400; a client that never finishes its request head is dropped
    // after 10 s. (ALPN offers HTTP/1.1 alone; an HTTP/2 prior-knowledge preface is still
    // served as HTTP/2 by hyper's upgrade-capable connection, which the page tunnel needs.)
    let mut server = axum_server::from_tcp(listener)
        .map_err(|source| crate::Error::Listen {
            path: listen.to_string().into(),
            source,
        })?
        .acceptor(acceptor)
        .handle(handle.clone());
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
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
        .route("/probe", post(probe::<E>))
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
/// Reads a request's body (at most [`MAX_BODY`]). A request announcing more is refused
/// before anything is read — so a client sending `Expect: 100-continue` gets its 413
/// instead of a `100 Continue` (hyper sends that only once the body is read).
async fn read_body(request: axum::extract::Request) -> Result<Bytes, Failure> {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = announced.filter(|n| *n > MAX_BODY as u64) {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BodyTooLarge",
            format!("request body of {n} bytes announced, at most {MAX_BODY} accepted"),
        ));
    }
    let body: Body = request.into_body();
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;

    use super::*;
    use crate::node::migration::Verdict;
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
        assert!(e.to_string().contains("runtimeClassName"), "{e}");
        let e = check_migratable(&pod(json!({"status": {"phase": "Pending"}})), &[])
            .expect_err("pending");
        assert!(e.to_string().contains("Pending"), "{e}");
        let e = check_migratable(&pod(json!({})), &["db".into()]).expect_err("container");
        assert!(e.to_string().contains("\"db\""), "{e}");
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
        let r = Failure::from(AuthError::NoToken).into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = not_migratable(NotMigratable::NoPrecopy).into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
