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
    /// From the start of the dump to the restored process running (StartContainer returned).
    pub frozen: Duration,
    /// The dump alone, as the daemon measured it.
    pub checkpoint: Duration,
    /// Restore through CRI (create + start of the target container).
    pub restore: Duration,
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
pub async fn start_source(node: &mut TestNode, name: &str, uid: &str, mem_mib: u64) -> anyhow::Result<Source> {
    let pod = TestPod::new(name, uid, &node.logs_root());
    let sandbox = node.cri.run_pod(&pod).await?;
    let container = node.cri.run_container(&sandbox, &TestContainer::testapp(mem_mib)).await?;
    let ip = node.cri.pod_ip(&sandbox).await?;
    // Touching 1 GiB takes a while on a busy machine.
    wait_count(&ip, Duration::from_secs(60 + mem_mib / 10)).await?;
    Ok(Source { sandbox, container, ip })
}

/// Moves `source` into a new sandbox `name`/`uid`: the target sandbox is prepared first,
/// then the source is frozen and dumped, then the target container is created through CRI
/// (podmig-runc restores it).
pub async fn move_app(node: &mut TestNode, source: &Source, name: &str, uid: &str, mem_mib: u64) -> anyhow::Result<Moved> {
    let source_uid = source.sandbox.pod.uid.clone();
    let pod = TestPod::new(name, uid, &node.logs_root()).migrating_from(&source_uid);
    let sandbox = node.cri.run_pod(&pod).await?;
    let images = node.daemon.checkpoint_path(&source_uid, "app");
    let frozen = Instant::now();
    let dump = node
        .daemon
        .checkpoint(&source.container, &images, false)
        .await
        .map_err(|e| anyhow::anyhow!("checkpoint failed: {}", e.message()))?;
    let restore_started = Instant::now();
    let container = node
        .cri
        .run_container(&sandbox, &TestContainer::testapp(mem_mib))
        .await
        .with_context(|| format!("restore failed\n{}", node.diagnostics()))?;
    let restore = restore_started.elapsed();
    let frozen = frozen.elapsed();
    let ip = node.cri.pod_ip(&sandbox).await?;
    Ok(Moved {
        sandbox,
        container,
        ip,
        report: MoveReport {
            frozen,
            checkpoint: Duration::from_millis(dump.duration_ms),
            restore,
            image_bytes: dump.image_bytes,
        },
    })
}
