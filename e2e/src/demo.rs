//! `make demo`: the single-node move, narrated, ending with one machine-readable line.

use std::time::Duration;

use crate::{
    node::TestNode,
    scenario,
    testapp::{get_count, heartbeats},
};

/// Runs the demo; prints its narration and the result line to stdout.
pub async fn run() -> anyhow::Result<()> {
    println!(
        "podmig demo: move a running container into another Pod sandbox without restarting it"
    );
    let mut node = TestNode::start().await?;
    println!(
        "1. started containerd (runtime handler 'podmig' -> podmig-runc) and the podmig node daemon"
    );
    let source = scenario::start_source(&mut node, "demo-0", "demo-uid-0", 64).await?;
    for _ in 0..9 {
        get_count(&source.ip).await?;
    }
    let count_before = get_count(&source.ip).await?;
    println!(
        "2. test app (64 MiB ballast) runs in Pod demo-0 at {}; GET /count -> {count_before}",
        source.ip
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let moved = scenario::move_app(&mut node, &source, "demo-1", "demo-uid-1", 64).await?;
    let r = moved.report;
    println!(
        "3. created Pod demo-1 as its migration target: podmig froze demo-0, dumped it in {} ms ({} MiB of images) and restored it in demo-1 in {} ms",
        r.checkpoint.as_millis(),
        r.image_bytes >> 20,
        r.restore.as_millis()
    );
    let count_after = get_count(&moved.ip).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last_a = heartbeats(&source.sandbox.log_path("app"))
        .last()
        .copied()
        .unwrap_or(0);
    let first_b = heartbeats(&moved.sandbox.log_path("app"))
        .first()
        .copied()
        .unwrap_or(0);
    println!(
        "4. demo-1 at {} answers GET /count -> {count_after}; its heartbeat continues at seq {first_b} (demo-0 stopped at {last_a})",
        moved.ip
    );
    let ok = count_after > count_before && first_b > last_a;
    node.cri.remove_all_sandboxes().await?;
    println!("5. cleaned up: sandboxes, containers and checkpoint removed");
    println!(
        "podmig-demo result={} frozen_ms={} count_before={count_before} count_after={count_after}",
        if ok { "ok" } else { "failed" },
        r.frozen.as_millis()
    );
    anyhow::ensure!(ok, "the restored app did not continue its state");
    Ok(())
}
