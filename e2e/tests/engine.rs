//! The foundation against the real stack: containerd's CRI, podmig-runc, runc and CRIU.
//! The test plays kubelet; the node daemon runs as a real process.

use std::time::{Duration, Instant};

use k8s_cri::v1::ContainerState;
use podmig_e2e::{
    containerd::mounts_under,
    cri::{TestContainer, TestPod},
    node::TestNode,
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

    // Checkpoint A into the daemon's store.
    let images = node.daemon.checkpoint_path("uid-a", "app");
    let frozen = Instant::now();
    let report = node
        .daemon
        .checkpoint(&ctr_a, &images, false)
        .await
        .map_err(|e| anyhow::anyhow!("checkpoint: {e}\n{}", node.diagnostics()))?;
    assert!(report.image_bytes > 64 << 20, "images hold the ballast: {report:?}");
    let last_a = *heartbeats(&sb_a.log_path("app")).last().expect("A printed heartbeats");

    // Sandbox B, its own network namespace, created as a migration target.
    let pod_b = TestPod::new("app-1", "uid-b", &logs).migrating_from("uid-a");
    let sb_b = node.cri.run_pod(&pod_b).await?;
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
    eprintln!("frozen {frozen_ms} ms, dump {} ms, images {} bytes", report.duration_ms, report.image_bytes);

    assert_eq!(node.cri.container_state(&ctr_b).await?, ContainerState::ContainerRunning);
    assert_eq!(count_after, count_before + 1, "B continues A's count");
    assert_eq!(node.cri.container_state(&ctr_a).await?, ContainerState::ContainerExited);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let beats_b = heartbeats(&sb_b.log_path("app"));
    let first_b = *beats_b.first().expect("B prints heartbeats");
    assert!(first_b > last_a && first_b <= last_a + 5, "B's log continues A's sequence: A ended at {last_a}, B starts at {first_b}");
    assert!(beats_b.windows(2).all(|w| w[1] == w[0] + 1), "B's sequence has no gaps");
    assert!(!images.exists(), "checkpoint images are deleted after the restore");

    // Cleanup leaves nothing behind.
    node.cri.remove_all_sandboxes().await?;
    assert!(node.cri.containers().await?.is_empty());
    assert!(node.containerd.runc_containers().is_empty(), "runc state: {:?}", node.containerd.runc_containers());
    let ckpts = std::fs::read_dir(node.daemon.checkpoint_dir())?.count();
    assert_eq!(ckpts, 0, "no checkpoint directory left");
    let ctrd_dir = node.containerd.dir().to_path_buf();
    drop(node);
    assert!(mounts_under(&ctrd_dir).is_empty(), "mounts left: {:?}", mounts_under(&ctrd_dir));
    Ok(())
}
