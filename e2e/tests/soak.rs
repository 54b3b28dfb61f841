//! The short fault soak of `make test`: ten cross-node moves of a small app, each with a
//! fault at a random moment (a node daemon, the controller or containerd killed, a node cut
//! off, the API server down, or nothing), every invariant
//! checked after each move (`podmig_e2e::soak`), between a containerd 1.6 node and a
//! containerd 2.x node; `make soak` runs 50 with a 256 MiB app.

use std::time::Duration;

use podmig_e2e::containerd::ContainerdVersion;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_faulted_moves_keep_one_copy_with_its_count_and_leave_nothing() -> anyhow::Result<()> {
    // A fixed seed: the same faults at the same moments in every run (`make soak` draws a
    // new seed each time).
    let seed = 1_796_266_546_974_927_918;
    eprintln!("soak seed {seed} (podmig-e2e soak --moves 10 --sizes 16 --seed {seed} replays it)");
    // A containerd 1.6 node and a 2.x node, unless PODMIG_E2E_CONTAINERD says otherwise.
    let containerd =
        ContainerdVersion::from_env_or(&[ContainerdVersion::V1, ContainerdVersion::V2])?;
    let outcomes = tokio::time::timeout(
        Duration::from_secs(900),
        podmig_e2e::soak::run(10, &[16], seed, &containerd),
    )
    .await??;
    eprintln!("{}", podmig_e2e::soak::table(&outcomes));
    assert_eq!(outcomes.len(), 10);
    // Only a lazy move whose Migration said the state is lost may start the count over.
    assert!(
        outcomes
            .iter()
            .all(|o| o.counts.1 >= o.counts.0 || o.end.ends_with("state lost (lazy)")),
        "{outcomes:?}"
    );
    Ok(())
}
