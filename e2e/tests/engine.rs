//! The foundation against the real stack: containerd's CRI, podmig-runc, runc and CRIU.
//! The test plays kubelet; the node daemon runs as a real process.

use std::time::{Duration, Instant};

use k8s_cri::v1::ContainerState;
use podmig_e2e::{
    containerd::mounts_under,
    cri::{TestContainer, TestPod},
    node::TestNode,
    scenario::{Source, start_source},
    testapp::{get_count, heartbeats, wait_count},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_moves_between_sandboxes_and_keeps_its_state() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let logs = node.logs_root();
    let app = TestContainer::testapp(64);

    // Sandbox A runs the app; give it some in-memory state.
    let pod_a = TestPod::new("app-0", "uid-a", &logs);
    let sb_a = node.cri.run_pod(&pod_a).await?;
    let ctr_a = node.cri.run_container(&sb_a, &app).await?;
    let ip_a = node.cri.pod_ip(&sb_a).await?;
    wait_count(&ip_a, Duration::from_secs(20)).await?;
    for _ in 0..4 {
        get_count(&ip_a).await?;
    }
    let count_before = get_count(&ip_a).await?;
    assert_eq!(count_before, 6);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Sandbox B (its own network namespace) exists before the freeze, as in a real move.
    let pod_b = TestPod::new("app-1", "uid-b", &logs).migrating_from("uid-a");
    let sb_b = node.cri.run_pod(&pod_b).await?;

    // Checkpoint A into the daemon's store.
    let images = node.daemon.checkpoint_path("uid-a", "app");
    let frozen = Instant::now();
    let report = node
        .daemon
        .checkpoint(&ctr_a, &images, false)
        .await
        .map_err(|e| anyhow::anyhow!("checkpoint: {e}\n{}", node.diagnostics()))?;
    assert!(
        report.image_bytes > 64 << 20,
        "images hold the ballast: {report:?}"
    );
    let last_a = *heartbeats(&sb_a.log_path("app"))
        .last()
        .expect("A printed heartbeats");

    // B's container is a migration target: podmig-runc restores it instead of creating it.
    let ctr_b = node
        .cri
        .create_container(&sb_b, &app)
        .await
        .map_err(|e| anyhow::anyhow!("create (restore): {e}\n{}", node.diagnostics()))?;
    node.cri.start_container(&ctr_b).await?;
    let ip_b = node.cri.pod_ip(&sb_b).await?;
    assert_ne!(ip_a, ip_b, "B has its own network namespace");
    let count_after = wait_count(&ip_b, Duration::from_secs(10)).await?;
    let frozen_ms = frozen.elapsed().as_millis();
    eprintln!(
        "frozen {frozen_ms} ms, dump {} ms, images {} bytes",
        report.duration_ms, report.image_bytes
    );

    assert_eq!(
        node.cri.container_state(&ctr_b).await?,
        ContainerState::ContainerRunning
    );
    assert_eq!(count_after, count_before + 1, "B continues A's count");
    assert_eq!(
        node.cri.container_state(&ctr_a).await?,
        ContainerState::ContainerExited
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let beats_b = heartbeats(&sb_b.log_path("app"));
    let first_b = *beats_b.first().expect("B prints heartbeats");
    assert!(
        first_b > last_a && first_b <= last_a + 5,
        "B's log continues A's sequence: A ended at {last_a}, B starts at {first_b}"
    );
    assert!(
        beats_b.windows(2).all(|w| w[1] == w[0] + 1),
        "B's sequence has no gaps"
    );
    assert!(
        !images.exists(),
        "checkpoint images are deleted after the restore"
    );

    // Cleanup leaves nothing behind.
    node.cri.remove_all_sandboxes().await?;
    assert!(node.cri.containers().await?.is_empty());
    assert!(
        node.containerd.runc_containers().is_empty(),
        "runc state: {:?}",
        node.containerd.runc_containers()
    );
    let ckpts = std::fs::read_dir(node.daemon.checkpoint_dir())?.count();
    assert_eq!(ckpts, 0, "no checkpoint directory left");
    let ctrd_dir = node.containerd.dir().to_path_buf();
    drop(node);
    assert!(
        mounts_under(&ctrd_dir).is_empty(),
        "mounts left: {:?}",
        mounts_under(&ctrd_dir)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_container_under_podmig_handler_runs_unchanged() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let pod = TestPod::new("plain-0", "uid-plain", &node.logs_root());
    let sb = node.cri.run_pod(&pod).await?;
    let ctr = node
        .cri
        .run_container(&sb, &TestContainer::testapp(0))
        .await?;
    let ip = node.cri.pod_ip(&sb).await?;
    assert_eq!(
        wait_count(&ip, Duration::from_secs(20)).await?,
        1,
        "a fresh app counts from 1"
    );
    assert_eq!(get_count(&ip).await?, 2);
    assert_eq!(
        node.cri.container_state(&ctr).await?,
        ContainerState::ContainerRunning
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        heartbeats(&sb.log_path("app")).first(),
        Some(&1),
        "fresh heartbeat sequence"
    );

    // StopContainer: the kill passes through podmig-runc and the app sees SIGTERM.
    node.cri
        .runtime
        .stop_container(k8s_cri::v1::StopContainerRequest {
            container_id: ctr.clone(),
            timeout: 10,
        })
        .await?;
    assert_eq!(
        node.cri.container_state(&ctr).await?,
        ContainerState::ContainerExited
    );
    let log = std::fs::read_to_string(sb.log_path("app"))?;
    assert!(
        log.contains("received SIGTERM"),
        "graceful stop reached the app"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_daemon_ordinary_containers_start_and_targets_fail() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let logs = node.logs_root();
    node.daemon.stop();

    let plain = node
        .cri
        .run_pod(&TestPod::new("plain-0", "uid-plain", &logs))
        .await?;
    let ctr = node
        .cri
        .run_container(&plain, &TestContainer::testapp(0))
        .await?;
    let ip = node.cri.pod_ip(&plain).await?;
    assert_eq!(wait_count(&ip, Duration::from_secs(20)).await?, 1);
    assert_eq!(
        node.cri.container_state(&ctr).await?,
        ContainerState::ContainerRunning
    );

    let target = TestPod::new("app-1", "uid-b", &logs).migrating_from("uid-a");
    let sb = node.cri.run_pod(&target).await?;
    let err = start_expecting_failure(&mut node, &sb).await?;
    assert!(
        err.contains("migration target") && err.contains("refusing to start it fresh"),
        "{err}"
    );
    Ok(())
}

/// Creates and starts the test app in `sb`, expects the start to fail, and checks that
/// nothing of the container runs: CRI does not report it running and runc has no state.
async fn start_expecting_failure(
    node: &mut TestNode,
    sb: &podmig_e2e::cri::Sandbox,
) -> anyhow::Result<String> {
    let before = node.containerd.runc_containers();
    let id = node
        .cri
        .create_container(sb, &TestContainer::testapp(0))
        .await?;
    let err = match node.cri.start_container(&id).await {
        Ok(()) => anyhow::bail!("start of a migration target without a checkpoint succeeded"),
        Err(status) => status.message().to_owned(),
    };
    assert_ne!(
        node.cri.container_state(&id).await?,
        ContainerState::ContainerRunning
    );
    assert_eq!(
        node.containerd.runc_containers(),
        before,
        "no half-made container is left in runc"
    );
    Ok(err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_corrupt_checkpoint_fails_the_restore_cleanly() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let logs = node.logs_root();

    // No checkpoint at all for the named source.
    let sb = node
        .cri
        .run_pod(&TestPod::new("app-1", "uid-b", &logs).migrating_from("uid-nowhere"))
        .await?;
    let err = start_expecting_failure(&mut node, &sb).await?;
    assert!(
        err.contains("no checkpoint") && err.contains("uid-nowhere"),
        "{err}"
    );

    // A checkpoint whose memory image is damaged.
    let ctr = start_source(&mut node, "app-0", "uid-a", 0)
        .await?
        .container;
    let images = node.daemon.checkpoint_path("uid-a", "app");
    node.daemon
        .checkpoint(&ctr, &images, true)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for entry in std::fs::read_dir(&images)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("pstree") || name.starts_with("core-") {
            std::fs::write(&path, b"this is not a CRIU image")?;
        }
    }
    let sb = node
        .cri
        .run_pod(&TestPod::new("app-2", "uid-c", &logs).migrating_from("uid-a"))
        .await?;
    let err = start_expecting_failure(&mut node, &sb).await?;
    assert!(err.contains("restore of container"), "{err}");
    assert!(
        images.join("inventory.img").exists(),
        "a failed restore keeps the checkpoint for a rollback"
    );
    Ok(())
}

/// A directory even root cannot write to (immutable attribute), reset when dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(dir: std::path::PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&dir)
            .status()?
            .success();
        anyhow::ensure!(ok, "chattr +i {} failed", dir.display());
        Ok(Self(dir))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_into_unwritable_directory_fails_and_source_keeps_running() -> anyhow::Result<()>
{
    let mut node = TestNode::start().await?;
    let Source {
        container: ctr, ip, ..
    } = start_source(&mut node, "app-0", "uid-a", 0).await?;

    let locked = Immutable::new(node.logs_root().join("locked"))?;
    let err = node
        .daemon
        .checkpoint(&ctr, &locked.0.join("ckpt"), false)
        .await
        .expect_err("checkpoint into an immutable directory must fail");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("locked/ckpt"), "{}", err.message());
    assert_eq!(
        node.cri.container_state(&ctr).await?,
        ContainerState::ContainerRunning
    );
    assert_eq!(
        get_count(&ip).await?,
        2,
        "the source keeps serving with its state"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_checkpoint_is_held_until_the_dump_is_taken() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let Source {
        sandbox: sb,
        container: ctr,
        ..
    } = start_source(&mut node, "app-0", "uid-a", 256).await?;

    let images = node.daemon.checkpoint_path("uid-a", "app");
    let runc_root = node.containerd.runc_root();
    let dump = node.daemon.checkpoint(&ctr, &images, false);
    let mut runtime = node.cri.runtime.clone();
    let stop = async {
        // Once the dump has begun (the daemon freezes the cgroup first), do what kubelet
        // does on Pod deletion.
        let freezer = podmig_cri_ext::freezer::Freezer::of(&runc_root, &ctr)?;
        let started = Instant::now();
        while !freezer.is_frozen().unwrap_or(false) && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        runtime
            .stop_container(k8s_cri::v1::StopContainerRequest {
                container_id: ctr.clone(),
                timeout: 30,
            })
            .await
            .map_err(anyhow::Error::from)
    };
    let (dumped, stopped) = tokio::join!(dump, stop);
    let report = dumped.map_err(|e| anyhow::anyhow!("dump failed: {e}\n{}", node.diagnostics()))?;
    stopped?;
    assert!(report.image_bytes > 256 << 20, "{report:?}");
    let log = std::fs::read_to_string(sb.log_path("app"))?;
    assert!(
        !log.contains("received SIGTERM"),
        "the kill reached the app before its checkpoint"
    );
    assert!(
        node.daemon.log().contains("holding kill"),
        "{}",
        node.daemon.log()
    );
    assert_eq!(
        node.cri.container_state(&ctr).await?,
        ContainerState::ContainerExited
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_the_target_freezes_the_local_source_and_moves_it() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let source = start_source(&mut node, "app-0", "uid-a", 32).await?;
    for _ in 0..2 {
        get_count(&source.ip).await?;
    }
    // The source serves until the target's container is created.
    assert_eq!(get_count(&source.ip).await?, 4);

    let moved = podmig_e2e::scenario::move_app(&mut node, &source, "app-1", "uid-b", 32).await?;
    assert_eq!(
        get_count(&moved.ip).await?,
        5,
        "the target continues the source's count"
    );
    assert_eq!(
        node.cri.container_state(&moved.container).await?,
        ContainerState::ContainerRunning
    );
    // The source stays frozen until the target's verdict, then is stopped for good.
    let mut cri = node.cri.clone();
    podmig_e2e::wait::until("source stopped", Duration::from_secs(10), async || {
        (cri.container_state(&source.container).await.ok()? == ContainerState::ContainerExited)
            .then_some(())
    })
    .await?;
    let r = moved.report;
    assert!(
        r.checkpoint > Duration::ZERO && r.restore > Duration::ZERO,
        "{r:?}"
    );
    assert!(
        r.frozen >= r.checkpoint + r.restore,
        "frozen time spans dump and restore: {r:?}"
    );
    assert!(r.image_bytes > 32 << 20, "{r:?}");
    assert!(
        !node.daemon.checkpoint_path("uid-a", "app").exists(),
        "checkpoint removed after the restore"
    );
    Ok(())
}
