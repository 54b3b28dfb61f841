//! The node daemon's side of the contract with the controller: the phase and, at the end,
//! the figures of a move, written as annotations on the target Pod. Reporting never
//! delays or fails a move: patches run in the background and errors are logged.

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use podmig_api::{
    ANNOTATION_MIGRATION_PHASE, ANNOTATION_MIGRATION_REPORT, v1alpha1::MigrationReport,
};
use serde_json::json;

/// Writes move progress on target Pods.
#[derive(Clone)]
pub struct PodReporter {
    client: kube::Client,
}

impl PodReporter {
    /// A reporter using `client` (the node's credentials).
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    fn patch(&self, ns: &str, pod: &str, annotations: serde_json::Value) {
        if ns.is_empty() || pod.is_empty() {
            return;
        }
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), ns);
        let (ns, pod) = (ns.to_owned(), pod.to_owned());
        tokio::spawn(async move {
            let body = json!({"metadata": {"annotations": annotations}});
            if let Err(error) = api
                .patch(&pod, &PatchParams::default(), &Patch::Merge(body))
                .await
            {
                tracing::warn!(%error, namespace = %ns, pod = %pod, "cannot report migration progress");
            }
        });
    }

    /// The move into `ns/pod` entered `phase` (`Checkpointing`, `Transferring`, `Restoring`).
    pub fn phase(&self, ns: &str, pod: &str, phase: &str) {
        self.patch(ns, pod, json!({ANNOTATION_MIGRATION_PHASE: phase}));
    }

    /// The move into `ns/pod` ended.
    pub fn done(&self, ns: &str, pod: &str, report: &MigrationReport) {
        let phase = if report.error.is_some() {
            "Failed"
        } else {
            "Restored"
        };
        let report = serde_json::to_string(report).unwrap_or_default();
        self.patch(
            ns,
            pod,
            json!({ANNOTATION_MIGRATION_PHASE: phase, ANNOTATION_MIGRATION_REPORT: report}),
        );
    }
}
