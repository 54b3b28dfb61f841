//! The eviction webhook: an HTTPS admission webhook on `pods/eviction` (registered by the
//! chart's ValidatingWebhookConfiguration), served by every controller replica (it only
//! reads and creates objects; the leader moves them). It carries out the answer
//! [`super::eviction::decide`] gives: a Migration (adopting a bare Pod first) and a
//! `429 TooManyRequests` naming it, or the eviction let through, with an Event on the Pod.
//! Its serving certificate is re-read when the files change (the chart rotates it).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{Json, Router, body::Bytes, extract::State, http::StatusCode, response::IntoResponse};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
    },
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use podmig_api::{
    ANNOTATION_ADOPTS, ANNOTATION_STARTED_BY_EVICTION, LABEL_MIGRATING_POD,
    v1alpha1::{MigratingPod, Migration, MigrationSpec},
};

use super::eviction::{self, Answer, Note};

/// Errors of the webhook.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The serving certificate or key cannot be read.
    #[error("webhook certificate {path}: {source}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The listener cannot be bound.
    #[error("webhook listener {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What every review shares.
struct Hook {
    client: Client,
    recorder: Recorder,
    /// One eviction decided at a time in this replica: two evictions of one Pod at once
    /// start one Migration.
    deciding: tokio::sync::Mutex<()>,
    /// How long a review of a Pod that is moving waits for the move to end before it
    /// answers 429 (kept below the configuration's `timeoutSeconds`).
    wait: Duration,
}

/// What a review answers.
#[derive(Debug)]
enum Reply {
    /// Let the eviction through.
    Allow,
    /// 429 with this message.
    Refuse(String),
    /// 429 with this message unless the Pod (uid) is gone before the wait ends: then the
    /// eviction is let through and finds nothing to evict (404), and the evicting client
    /// goes on at once instead of after its retry period.
    Moving {
        /// The refusal.
        message: String,
        /// The Migration under way.
        migration: String,
        /// The Pod's uid.
        uid: String,
    },
}

/// Serves the webhook on `addr` until the process ends; the certificate files are polled
/// every 10 s and reloaded when they changed.
pub async fn serve(
    client: Client,
    identity: &str,
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    wait: Duration,
) -> Result<axum_server::Handle<SocketAddr>, Error> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Certificate { path, source }
    };
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .map_err(read_err(cert))?;
    let hook = Arc::new(Hook {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "podmig-eviction-webhook".into(),
                instance: Some(identity.into()),
            },
        ),
        client,
        deciding: tokio::sync::Mutex::new(()),
        wait,
    });
    let app = Router::new()
        .route("/evict", axum::routing::post(review))
        .with_state(hook);
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Listen { addr, source })?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config.clone())
        .map_err(|source| Error::Listen { addr, source })?
        .handle(handle.clone());
    tokio::spawn(async move {
        if let Err(error) = server.serve(app.into_make_service()).await {
            tracing::error!(%error, "eviction webhook stopped");
        }
    });
    tokio::spawn(reload(config, cert.to_path_buf(), key.to_path_buf()));
    Ok(handle)
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Re-reads the certificate when its files change (a Secret volume is updated in place).
async fn reload(config: axum_server::tls_rustls::RustlsConfig, cert: PathBuf, key: PathBuf) {
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match config.reload_from_pem_file(&cert, &key).await {
            Ok(()) => {
                tracing::info!(cert = %cert.display(), "eviction webhook certificate reloaded");
                seen = now;
            }
            Err(error) => tracing::warn!(%error, "cannot reload the webhook certificate"),
        }
    }
}

/// A failure to observe or act: answered 500, so the API server applies the webhook's
/// `failurePolicy` (as when the webhook is down).
fn unavailable(e: impl std::fmt::Display) -> axum::response::Response {
    tracing::warn!(error = %e, "eviction review failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(serde_json::json!({"error": "Unavailable", "message": e.to_string()})),
    )
        .into_response()
}

async fn review(State(hook): State<Arc<Hook>>, body: Bytes) -> axum::response::Response {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": "BadRequest", "message": format!("not an AdmissionReview: {e}")})),
            )
                .into_response();
        }
    };
    let req: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": "BadRequest", "message": format!("no request in the AdmissionReview: {e}")})),
            )
                .into_response();
        }
    };
    let allowed = AdmissionResponse::from(&req);
    if req.sub_resource.as_deref() != Some("eviction") || req.resource.resource != "pods" {
        return Json(allowed.into_review()).into_response();
    }
    let ns = req.namespace.clone().unwrap_or_default();
    let user = req.user_info.username.clone().unwrap_or_default();
    let until = tokio::time::Instant::now() + hook.wait;
    let message = match answer(&hook, &ns, &req.name, &user, req.dry_run).await {
        Ok(Reply::Allow) => return Json(allowed.into_review()).into_response(),
        Ok(Reply::Refuse(message)) => message,
        Ok(Reply::Moving {
            message,
            migration,
            uid,
        }) => {
            if moved_before(&hook, &ns, &req.name, &uid, &migration, until).await {
                tracing::info!(pod = %req.name, namespace = %ns, %migration,
                    "the evicted Pod moved away during the review; the eviction goes on");
                return Json(allowed.into_review()).into_response();
            }
            message
        }
        Err(e) => return unavailable(e),
    };
    let mut denied = allowed.deny(message);
    denied.result.code = 429;
    denied.result.reason = "TooManyRequests".into();
    Json(denied.into_review()).into_response()
}

/// Waits until Pod `name` (`uid`) is gone, Migration `migration` ended with the Pod still
/// there, or `until`; true when the Pod is gone.
async fn moved_before(
    hook: &Hook,
    ns: &str,
    name: &str,
    uid: &str,
    migration: &str,
    until: tokio::time::Instant,
) -> bool {
    let pods: Api<Pod> = Api::namespaced(hook.client.clone(), ns);
    let migrations: Api<Migration> = Api::namespaced(hook.client.clone(), ns);
    loop {
        match pods.get_opt(name).await {
            Ok(None) => return true,
            Ok(Some(p)) if p.metadata.uid.as_deref() != Some(uid) => return true,
            Ok(Some(_)) => {}
            Err(_) => return false,
        }
        if let Ok(Some(m)) = migrations.get_opt(migration).await
            && eviction::is_finished(&m)
            && m.status.as_ref().and_then(|s| s.phase)
                != Some(podmig_api::v1alpha1::MigrationPhase::Succeeded)
        {
            return false;
        }
        if tokio::time::Instant::now() + WAIT_POLL >= until {
            return false;
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// How often a waiting review looks at the Pod.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// Decides and acts.
async fn answer(
    hook: &Hook,
    ns: &str,
    name: &str,
    user: &str,
    dry_run: bool,
) -> Result<Reply, kube::Error> {
    let _one = hook.deciding.lock().await;
    let pods: Api<Pod> = Api::namespaced(hook.client.clone(), ns);
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(Reply::Allow);
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let migrations: Vec<Migration> = Api::<Migration>::namespaced(hook.client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|m| m.spec.pod_name == name)
        .collect();
    let nodes = Api::<Node>::all(hook.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in Api::<Pod>::all(hook.client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        if let Some(n) = p.spec.and_then(|s| s.node_name) {
            *load.entry(n).or_default() += 1;
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    let avoid = eviction::failed_targets(&migrations, now);
    let target = eviction::pick_target(&pod, &nodes, &load, &avoid);
    let decided = eviction::decide(&pod, &migrations, target, now);
    tracing::info!(pod = %name, namespace = %ns, %user, answer = ?decided, "eviction reviewed");
    let (target_node, adopt) = match decided {
        Answer::Move { target_node, adopt } => (target_node, adopt),
        Answer::Moving { migration, message } if !dry_run => {
            return Ok(Reply::Moving {
                message,
                migration,
                uid,
            });
        }
        other => {
            return Ok(settle(hook, &pod, other, dry_run)
                .await
                .map_or(Reply::Allow, Reply::Refuse));
        }
    };
    if dry_run {
        return Ok(Reply::Refuse(format!(
            "podmig would move Pod {name} to node {target_node} first (dry run)"
        )));
    }
    let owner = if adopt {
        match adopt_pod(hook, &pod).await {
            Ok(o) => Some(o),
            Err(why) => {
                return Ok(settle(hook, &pod, eviction::cannot_move(&pod, why), false)
                    .await
                    .map_or(Reply::Allow, Reply::Refuse));
            }
        }
    } else if let eviction::Owner::MigratingPod(o) = eviction::owner_of(&pod) {
        Api::<MigratingPod>::namespaced(hook.client.clone(), ns)
            .get_opt(&o)
            .await?
    } else {
        None
    };
    let m = start_move(hook, ns, &pod, owner.as_ref(), &target_node, user).await?;
    let message = format!(
        "podmig moves Pod {name} to node {target_node} first (Migration {m}); the eviction succeeds once the Pod is gone"
    );
    record(
        hook,
        &pod,
        Note {
            reason: "EvictionMovesPod",
            message: format!("the eviction by {user} is answered by a move: {message}"),
        },
        false,
    )
    .await;
    Ok(Reply::Moving {
        message,
        migration: m,
        uid,
    })
}

/// Carries out an answer that starts no move: its Event (not on a dry run), and the
/// eviction let through (`None`) or refused.
async fn settle(hook: &Hook, pod: &Pod, answer: Answer, dry_run: bool) -> Option<String> {
    let (note, refusal) = match answer {
        Answer::Allow(note) => (note, None),
        Answer::Deny(message, note) => (note, Some(message)),
        Answer::Moving { message, .. } => (None, Some(message)),
        Answer::Move { .. } => (None, None),
    };
    if let Some(n) = note.filter(|_| !dry_run) {
        record(hook, pod, n, true).await;
    }
    refusal
}

/// Creates the Migration of an evicted Pod (its MigratingPod's move settings); its name.
async fn start_move(
    hook: &Hook,
    ns: &str,
    pod: &Pod,
    owner: Option<&MigratingPod>,
    target_node: &str,
    user: &str,
) -> Result<String, kube::Error> {
    let name = pod.name_any();
    let suffix: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(5)
        .collect();
    let base: String = name.chars().take(240).collect();
    let spec = owner.map(|o| o.spec.clone());
    let mut m = Migration::new(
        &format!("{base}-evict-{suffix}"),
        MigrationSpec {
            pod_name: name.clone(),
            target_node: Some(target_node.into()),
            node_selector: None,
            strategy: spec.as_ref().map(|s| s.strategy).unwrap_or_default(),
            max_downtime_ms: spec
                .as_ref()
                .map_or(podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS, |s| {
                    s.max_downtime_ms
                }),
            timeout_seconds: spec.as_ref().map_or(300, |s| s.migration_timeout_seconds),
            timeout_seconds_per_gib: None,
            keep_ip: None,
        },
    );
    m.metadata
        .annotations
        .get_or_insert_default()
        .insert(ANNOTATION_STARTED_BY_EVICTION.into(), user.into());
    let created = Api::<Migration>::namespaced(hook.client.clone(), ns)
        .create(&PostParams::default(), &m)
        .await?;
    tracing::info!(pod = %name, namespace = %ns, migration = %created.name_any(), %target_node,
        "an eviction starts a move");
    Ok(created.name_any())
}

/// Makes bare Pod `pod` a MigratingPod's (of its own name, its template the Pod's spec),
/// so that it can move; the MigratingPod waits for it instead of making a Pod.
async fn adopt_pod(hook: &Hook, pod: &Pod) -> Result<MigratingPod, String> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let mpods: Api<MigratingPod> = Api::namespaced(hook.client.clone(), &ns);
    let wanted = eviction::adopter_of(pod);
    let mpod = match mpods.create(&PostParams::default(), &wanted).await {
        Ok(m) => m,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = mpods
                .get(&name)
                .await
                .map_err(|e| format!("cannot read MigratingPod {name}: {e}"))?;
            if existing.annotations().get(ANNOTATION_ADOPTS) != Some(&name) {
                return Err(format!(
                    "a MigratingPod named {name} exists already and does not adopt it"
                ));
            }
            existing
        }
        Err(e) => return Err(format!("cannot create a MigratingPod for it: {e}")),
    };
    let mut owners = pod.owner_references().to_vec();
    owners.push(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: MigratingPod::api_version(&()).into(),
            kind: MigratingPod::kind(&()).into(),
            name: name.clone(),
            uid: mpod.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    );
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": pod.resource_version(),
        "labels": {LABEL_MIGRATING_POD: name},
        "ownerReferences": owners}});
    Api::<Pod>::namespaced(hook.client.clone(), &ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| format!("cannot adopt it: {e}"))?;
    tracing::info!(pod = %name, namespace = %ns, "a bare Pod adopted by a MigratingPod to move it");
    Ok(mpod)
}

/// Records `note` on the Pod (a failure to record is logged, never fatal).
async fn record(hook: &Hook, pod: &Pod, note: Note, warning: bool) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.into(),
        action: note.message.chars().take(128).collect(),
        note: Some(note.message),
        secondary: None,
    };
    if let Err(error) = hook.recorder.publish(&ev, &pod.object_ref(&())).await {
        tracing::warn!(%error, "cannot record event");
    }
}
