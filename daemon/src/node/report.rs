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

/// One patch of a Pod.
#[derive(Debug)]
enum Write {
    /// Merge patch of the Pod's metadata.
    Meta(Value),
    /// Merge patch of the Pod's status.
    Status(Value),
}

/// The queue of each Pod's reporter task, by (namespace, name).
type Queues = HashMap<(String, String), mpsc::UnboundedSender<Write>>;

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
        if let Err(mpsc::error::SendError(write)) = tx.send(write) {
            tracing::warn!(namespace = %ns, pod = %pod, ?write, "reporter queue closed; dropped");
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

async fn apply_in_order(api: Api<Pod>, pod: String, mut rx: mpsc::UnboundedReceiver<Write>) {
    while let Ok(Some(write)) = tokio::time::timeout(IDLE, rx.recv()).await {
        let result = match &write {
            Write::Meta(annotations) => {
                let body = json!({"metadata": {"annotations": annotations}});
                api.patch(&pod, &PatchParams::default(), &Patch::Merge(body))
                    .await
            }
            Write::Status(status) => {
                api.patch_status(
                    &pod,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": status })),
                )
                .await
            }
        };
        if let Err(error) = result {
            tracing::warn!(%error, pod = %pod, "cannot report migration progress");
        }
    }
}
