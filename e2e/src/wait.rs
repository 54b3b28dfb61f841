//! Polling helpers for tests and tools.

use std::time::{Duration, Instant};

/// Calls `f` every 100 ms until it yields a value; fails naming `what` after `within`.
pub async fn until<T>(
    what: &str,
    within: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until Pod `name` is Ready (Running with the `Ready` condition); returns it.
pub async fn ready_pod(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    within: Duration,
) -> anyhow::Result<k8s_openapi::api::core::v1::Pod> {
    until(&format!("{name} ready"), within, async || {
        let p = pods.get(name).await.ok()?;
        is_ready(&p).then_some(p)
    })
    .await
}

/// Whether a Pod has the `Ready` condition.
pub fn is_ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until Pod `name` no longer exists.
pub async fn pod_gone(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    within: Duration,
) -> anyhow::Result<()> {
    until(&format!("{name} gone"), within, async || {
        pods.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await
}

/// Waits until `pods` lists no Pod at all (a namespace emptied, an owner's Pods gone).
pub async fn no_pods(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    within: Duration,
) -> anyhow::Result<()> {
    until("no Pods left", within, async || {
        pods.list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await
}

/// Waits until Migration `name` has ended (a terminal phase); returns its status.
pub async fn migration_ended(
    migs: &kube::Api<podmig_api::v1alpha1::Migration>,
    name: &str,
    within: Duration,
) -> anyhow::Result<podmig_api::v1alpha1::MigrationStatus> {
    until(&format!("migration {name} ended"), within, async || {
        migs.get(name)
            .await
            .ok()?
            .status
            .filter(|s| s.phase.is_some_and(|p| p.is_terminal()))
    })
    .await
}

/// Migration `name`'s status once it carries the move's figures (`report`), which the
/// controller records just after a successful move's phase: read earlier, a status would
/// say 0 ms frozen for a move that froze.
pub async fn migration_report(
    migs: &kube::Api<podmig_api::v1alpha1::Migration>,
    name: &str,
    within: Duration,
) -> anyhow::Result<podmig_api::v1alpha1::MigrationStatus> {
    until("the move's report", within, async || {
        migs.get(name)
            .await
            .ok()?
            .status
            .filter(|s| s.report.is_some())
    })
    .await
}

/// A Pod's address (empty until it has one).
pub fn pod_ip(p: &k8s_openapi::api::core::v1::Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

/// The node a Pod is bound to (empty until it is).
pub fn node_of(p: &k8s_openapi::api::core::v1::Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}
