//! The node daemon's writes to the API server, in order per Pod: the phase and figures of
//! a move on the target Pod (the contract with the controller, [`DaemonPhase`]) and the
//! `Migrated` status of a source Pod. One task per Pod applies its patches one after the
//! other, so a `Checkpointing` never lands after a `Failed`. Reporting never delays or
//! fails a move: errors are logged.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use podmig_api::{
    ANNOTATION_MIGRATION_PHASE, ANNOTATION_MIGRATION_REPORT, contract::DaemonPhase,
    v1alpha1::MigrationReport,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How long a Pod's reporter task lives without work.
const IDLE: Duration = Duration::from_secs(120);

/// Tries of one write when the API server is busy or unreachable
/// ([`crate::kubeclient::is_transient`]); the waits between them double from
/// [`FIRST_WAIT`]: a write is given up after ~25 s of trying (0.2 + 0.4 + … + 12.8 s). It
/// runs in the Pod's reporter task, so the move never waits for it; it is long because
/// the target's `Restored` is what commits a move whose verdict was lost. The client itself
/// does not retry (see [`crate::kubeclient`]).
const WRITE_TRIES: u32 = 8;
/// The wait before the second try of a write.
const FIRST_WAIT: Duration = Duration::from_millis(200);

/// One patch of a Pod.
#[derive(Debug)]
enum Write {
    /// Merge patch of the Pod's metadata.
    Meta(Value),
    /// Merge patch of the Pod's status.
    Status(Value),
}

/// One queued write, with whom to tell once it landed (or was given up).
#[derive(Debug)]
struct Queued {
    write: Write,
    landed: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// The queue of each Pod's reporter task, by (namespace, name).
type Queues = HashMap<(String, String), mpsc::UnboundedSender<Queued>>;

/// Writes move progress on Pods, in order per Pod.
#[derive(Clone)]
pub struct PodReporter {
    client: kube::Client,
    rt: tokio::runtime::Handle,
    queues: Arc<Mutex<Queues>>,
}

impl PodReporter {
    /// A reporter using `client` (the node's credentials); call within a tokio runtime
    /// (its tasks run there, whatever thread reports).
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            rt: tokio::runtime::Handle::current(),
            queues: Arc::default(),
        }
    }

    fn send(&self, ns: &str, pod: &str, write: Write) {
        self.send_noting(ns, pod, write, None);
    }

    fn send_noting(
        &self,
        ns: &str,
        pod: &str,
        write: Write,
        landed: Option<tokio::sync::oneshot::Sender<bool>>,
    ) {
        if ns.is_empty() || pod.is_empty() {
            return;
        }
        let key = (ns.to_owned(), pod.to_owned());
        let mut queues = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        queues.retain(|_, tx| !tx.is_closed());
        let tx = queues.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            self.rt.spawn(apply_in_order(api, key.1.clone(), rx));
            tx
        });
        if let Err(mpsc::error::SendError(q)) = tx.send(Queued { write, landed }) {
            tracing::warn!(namespace = %ns, pod = %pod, write = ?q.write, "reporter queue closed; dropped");
        }
    }

    /// The move into `ns/pod` entered `phase`.
    pub fn phase(&self, ns: &str, pod: &str, phase: DaemonPhase) {
        self.send(
            ns,
            pod,
            Write::Meta(json!({ANNOTATION_MIGRATION_PHASE: phase.as_str()})),
        );
    }

    /// The move into `ns/pod` restored its Pod: [`podmig_api::ANNOTATION_RESTORED`], after
    /// every write queued before it; the answer says whether it landed on the API server.
    pub fn restored(&self, ns: &str, pod: &str) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send_noting(
            ns,
            pod,
            Write::Meta(json!({podmig_api::ANNOTATION_RESTORED: "true"})),
            Some(tx),
        );
        rx
    }

    /// The move into `ns/pod` ended (`Failed` when the report carries an error).
    pub fn done(&self, ns: &str, pod: &str, report: &MigrationReport) {
        let phase = if report.error.is_some() {
            DaemonPhase::Failed
        } else {
            DaemonPhase::Restored
        };
        let report = serde_json::to_string(report).unwrap_or_default();
        self.send(
            ns,
            pod,
            Write::Meta(
                json!({ANNOTATION_MIGRATION_PHASE: phase.as_str(), ANNOTATION_MIGRATION_REPORT: report}),
            ),
        );
    }

    /// Writes `status` (a merge patch of `.status`) on `ns/pod`.
    pub fn status(&self, ns: &str, pod: &str, status: Value) {
        self.send(ns, pod, Write::Status(status));
    }
}

async fn apply_in_order(api: Api<Pod>, pod: String, mut rx: mpsc::UnboundedReceiver<Queued>) {
    while let Ok(Some(q)) = tokio::time::timeout(IDLE, rx.recv()).await {
        let result = apply_with_tries(&api, &pod, &q.write, FIRST_WAIT).await;
        if let Err(error) = &result {
            tracing::warn!(%error, pod = %pod, "cannot report migration progress");
        }
        if let Some(tx) = q.landed {
            let _ = tx.send(result.is_ok());
        }
    }
}

/// Applies one write, trying again (at most [`WRITE_TRIES`] in all, waits doubling from
/// `first_wait`) while the API server is busy or unreachable.
async fn apply_with_tries(
    api: &Api<Pod>,
    pod: &str,
    write: &Write,
    first_wait: Duration,
) -> Result<(), kube::Error> {
    let mut wait = first_wait;
    let mut tries = 1;
    loop {
        let result = match write {
            Write::Meta(annotations) => {
                let body = json!({"metadata": {"annotations": annotations}});
                api.patch(pod, &PatchParams::default(), &Patch::Merge(body))
                    .await
            }
            Write::Status(status) => {
                api.patch_status(
                    pod,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": status })),
                )
                .await
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(error) if tries < WRITE_TRIES && crate::kubeclient::is_transient(&error) => {
                tracing::info!(%error, pod, tries, "API server busy; trying the write again");
                tokio::time::sleep(wait).await;
                wait *= 2;
                tries += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// An API server answering the first `busy` requests `503`, then the Pod; counts them.
    async fn busy_then_fine(busy: u32) -> (Api<Pod>, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let app = axum::Router::new().fallback(move || {
            let seen = seen.clone();
            async move {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let json = [("content-type", "application/json")];
                if n < busy {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        json,
                        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"ServiceUnavailable","code":503}"#,
                    )
                } else {
                    (
                        axum::http::StatusCode::OK,
                        json,
                        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"default"}}"#,
                    )
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = crate::kubeclient::from_config(kube::Config::new(url.parse().expect("url")))
            .expect("client");
        (Api::namespaced(client, "default"), calls)
    }

    #[tokio::test]
    async fn a_write_is_tried_again_while_the_api_server_is_busy_and_then_given_up() {
        let write = Write::Meta(json!({ "podmig.dev/migration-phase": "Restored" }));
        let wait = Duration::from_millis(1);
        let (api, calls) = busy_then_fine(2).await;
        apply_with_tries(&api, "p", &write, wait)
            .await
            .expect("the third try lands");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let (api, calls) = busy_then_fine(u32::MAX).await;
        let error = apply_with_tries(&api, "p", &write, wait)
            .await
            .expect_err("always busy");
        assert!(crate::kubeclient::is_transient(&error), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), WRITE_TRIES, "bounded");
    }
}
