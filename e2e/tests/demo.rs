//! `make demo` is what a newcomer runs first: it must show the app moving with its state.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_drains_a_node_and_the_app_keeps_counting_on_the_other() -> anyhow::Result<()> {
    let r = podmig_e2e::demo::run().await?;
    eprintln!("{}", r.line());
    assert!(r.ok(), "{r:?}");
    assert_ne!(r.from, r.to);
    // Every answer the Service's poller got between the two reads was counted by the one
    // app: a copy started afresh could not reach this.
    assert!(r.count_after > r.count_before + r.answers_between, "{r:?}");
    assert!(r.frozen_ms > 0 && r.service_downtime_ms > 0, "{r:?}");
    assert!(
        r.connection_kept,
        "the held connection ended across the move: {r:?}"
    );
    Ok(())
}
