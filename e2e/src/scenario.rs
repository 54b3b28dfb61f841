//! The single-node move shared by the demo, the benchmark and the tests: the test app
//! runs in sandbox A, sandbox B is prepared, A is checkpointed and B restores it.

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{
    cri::{Sandbox, TestContainer, TestPod},
    node::TestNode,
    testapp::wait_count,
};

/// The source side of a move: the app running in its sandbox.
pub struct Source {
    /// Sandbox A.
    pub sandbox: Sandbox,
    /// The app's container.
    pub container: String,
    /// A's Pod IP.
    pub ip: String,
}

/// What one move measured.
#[derive(Debug, Clone, Copy)]
pub struct MoveReport {
    /// From the freeze of the source to the restored process running, as the daemon
    /// recorded it.
    pub frozen: Duration,
    /// The dump alone, as the daemon measured it.
    pub checkpoint: Duration,
    /// `runc restore`, as podmig-runc measured it.
    pub restore: Duration,
    /// CreateContainer + StartContainer of the target as kubelet sees them (includes
    /// everything the runtime does before the freeze).
    pub start_container: Duration,
    /// Size of the checkpoint images.
    pub image_bytes: u64,
}

/// The result of a move: the target sandbox and container, and the figures.
pub struct Moved {
    /// Sandbox B.
    pub sandbox: Sandbox,
    /// The restored container.
    pub container: String,
    /// B's Pod IP.
    pub ip: String,
    /// Figures.
    pub report: MoveReport,
}

/// Starts the test app with `mem_mib` MiB in a new sandbox `name`/`uid` and waits until it serves.
pub async fn start_source(
    node: &mut TestNode,
    name: &str,
    uid: &str,
    mem_mib: u64,
) -> anyhow::Result<Source> {
    let pod = TestPod::new(name, uid, &node.logs_root());
    let sandbox = node.cri.run_pod(&pod).await?;
    let container = node
        .cri
        .run_container(&sandbox, &TestContainer::testapp(mem_mib))
        .await?;
    let ip = node.cri.pod_ip(&sandbox).await?;
    // Touching 1 GiB takes a while on a busy machine.
    wait_count(&ip, Duration::from_secs(60 + mem_mib / 10)).await?;
    Ok(Source {
        sandbox,
        container,
        ip,
    })
}

/// Moves `source` into a new sandbox `name`/`uid` the way a migration target runs: the
/// target sandbox and container are created through CRI first; when the runtime creates
/// the container, podmig-runc asks the node daemon, which freezes and dumps the source
/// (still running until then) and answers with the checkpoint to restore.
pub async fn move_app(
    node: &mut TestNode,
    source: &Source,
    name: &str,
    uid: &str,
    mem_mib: u64,
) -> anyhow::Result<Moved> {
    let source_uid = source.sandbox.pod.uid.clone();
    let pod = TestPod::new(name, uid, &node.logs_root()).migrating_from(&source_uid);
    let sandbox = node.cri.run_pod(&pod).await?;
    let started = Instant::now();
    let container = node
        .cri
        .run_container(&sandbox, &TestContainer::testapp(mem_mib))
        .await
        .with_context(|| format!("migration target did not start\n{}", node.diagnostics()))?;
    let cri_elapsed = started.elapsed();
    let ip = node.cri.pod_ip(&sandbox).await?;
    let record = node
        .daemon
        .restores(uid)
        .await?
        .pop()
        .context("the daemon recorded no restore")?;
    anyhow::ensure!(record.ok, "restore failed: {}", record.error);
    Ok(Moved {
        sandbox,
        container,
        ip,
        report: MoveReport {
            frozen: Duration::from_millis(record.frozen_ms),
            checkpoint: Duration::from_millis(record.checkpoint_ms),
            restore: Duration::from_millis(record.restore_ms),
            image_bytes: record.image_bytes,
            start_container: cri_elapsed,
        },
    })
}
