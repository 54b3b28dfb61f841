//! `POST /migrate/{pod-uid}` from a person or a scheduler: checks the caller and the Pod,
//! then records the move as a `Migration` (or, without a controller, moves it here).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    extract::{Path as UrlPath, Query, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::PostParams};
use podmig_api::{
    RUNTIME_HANDLER,
    nodeapi::{MigrateRequest, MigrateResponse},
    v1alpha1::{Migration, MigrationSpec, Strategy},
};
use podmig_cri_ext::engine::CheckpointEngine;

use crate::node::auth::Attributes;

use super::*;

#[derive(serde::Deserialize, Default)]
pub(super) struct MigrateQuery {
    #[serde(default)]
    wait: bool,
}

pub(super) async fn migrate<E: CheckpointEngine>(
    State(s): State<Arc<AppState<E>>>,
    UrlPath(uid): UrlPath<String>,
    query: Result<Query<MigrateQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Result<Response, Failure> {
    // A malformed query (`?wait=maybe`) is answered with the JSON error body, as the rest.
    let Query(q) = query.map_err(|e| {
        Failure::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("query: {}", e.body_text()),
        )
    })?;
    let token = bearer(request.headers()).map(str::to_owned);
    let raw = read_body(request).await;
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
    check_timeout(body.timeout_seconds)?;
    let pod = pod.ok_or_else(|| pod_not_found(&s, &uid))?;
    match body.strategy.unwrap_or_default() {
        Strategy::Precopy => {
            return Err(not_migratable(NotMigratable::NoPrecopy));
        }
        Strategy::Lazy => {
            if let Some(why) = s.node.lazy_impossible() {
                return Err(not_migratable(NotMigratable::NotLazy(why)));
            }
        }
        _ => {}
    }
    check_migratable(&pod, &body.containers).map_err(not_migratable)?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(not_migratable(NotMigratable::Deleting(name)));
    }
    let owned = pod
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == "MigratingPod");
    if !owned {
        return Err(not_migratable(NotMigratable::NoController(name)));
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
            timeout_seconds_per_gib: None,
            keep_ip: body.keep_ip,
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
        let got = migrations.get_opt(&mig_name).await;
        if let Ok(None) = got {
            // Deleted while the caller waited: nothing left to wait for.
            return Err(Failure::new(
                StatusCode::GONE,
                "MigrationDeleted",
                format!("Migration {mig_name:?} was deleted before its move ended"),
            ));
        }
        if let Ok(Some(m)) = got
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

/// The longest move a request over HTTP may ask for, seconds: a `?wait=true` request holds
/// its connection, and this daemon polls the API server for it, that long at most.
pub const MAX_TIMEOUT_SECONDS: u32 = 3600;

/// Refuses a `timeoutSeconds` over [`MAX_TIMEOUT_SECONDS`] with a clear 400.
fn check_timeout(timeout_seconds: Option<u32>) -> Result<(), Failure> {
    match timeout_seconds {
        Some(t) if t > MAX_TIMEOUT_SECONDS => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "timeoutSeconds {t} is more than a move asked for over HTTP may take ({MAX_TIMEOUT_SECONDS}); create a Migration for a longer one"
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) fn not_migratable(why: NotMigratable) -> Failure {
    Failure::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "NotMigratable",
        why.to_string(),
    )
}

/// Why a Pod cannot be moved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotMigratable {
    /// It does not run under podmig's runtime handler.
    #[error("Pod {0:?} does not run with runtimeClassName {RUNTIME_HANDLER:?}")]
    OtherRuntime(String),
    /// It is not running.
    #[error("Pod {pod:?} is {phase:?}, not Running")]
    NotRunning {
        /// The Pod.
        pod: String,
        /// Its phase.
        phase: String,
    },
    /// `precopy` needs soft-dirty memory tracking, which these kernels lack.
    #[error(
        "strategy precopy is not possible on these kernels (no soft-dirty memory tracking); use full, lazy or lazy-or-full"
    )]
    NoPrecopy,
    /// `lazy` was asked for and this node cannot make one.
    #[error("a lazy move is not possible: {0}; ask for lazy-or-full to fall back to full")]
    NotLazy(String),
    /// It is being deleted (its MigratingPod moves it, if anything does).
    #[error("Pod {0:?} is being deleted")]
    Deleting(String),
    /// Nothing would recreate it elsewhere.
    #[error("Pod {0:?} is not controlled by a MigratingPod")]
    NoController(String),
    /// A container asked for is not one of its.
    #[error("Pod {pod:?} has no container {container:?}")]
    NoContainer {
        /// The Pod.
        pod: String,
        /// The container asked for.
        container: String,
    },
}

/// Why `pod` cannot be moved with `containers`, if it cannot (a Pod being deleted is
/// exactly what migrate-on-delete moves: callers decide on deletion themselves).
pub fn check_migratable(pod: &Pod, containers: &[String]) -> Result<(), NotMigratable> {
    let name = pod.name_any();
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.runtime_class_name.as_deref() != Some(RUNTIME_HANDLER) {
        return Err(NotMigratable::OtherRuntime(name));
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase != "Running" {
        return Err(NotMigratable::NotRunning { pod: name, phase });
    }
    for c in containers {
        if !spec.containers.iter().any(|s| &s.name == c) {
            return Err(NotMigratable::NoContainer {
                pod: name,
                container: c.clone(),
            });
        }
    }
    Ok(())
}

pub(super) fn pod_not_found<E>(s: &AppState<E>, uid: &str) -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "PodNotFound",
        format!(
            "no Pod with uid {uid:?} runs on node {:?}",
            s.node.settings.node_name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_past_an_hour_is_refused_with_its_reason() {
        assert!(check_timeout(None).is_ok());
        assert!(check_timeout(Some(MAX_TIMEOUT_SECONDS)).is_ok());
        let refused = check_timeout(Some(4_000_000_000)).expect_err("refused");
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(refused.reason, "BadRequest");
        assert!(
            refused.message.contains("timeoutSeconds 4000000000"),
            "{}",
            refused.message
        );
    }
}
