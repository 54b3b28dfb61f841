//! The short fault soak of `make test`: ten cross-node moves of a small app, each with a
//! node daemon or the controller killed at a random moment (or nothing), every invariant
//! checked after each move (`podmig_e2e::soak`); `make soak` runs 50 with a 256 MiB app.

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_faulted_moves_keep_one_copy_with_its_count_and_leave_nothing() -> anyhow::Result<()> {
    // A fixed seed: the same faults at the same moments in every run (`make soak` draws a
    // new seed each time).
    let seed = 1_796_266_546_974_927_918;
    eprintln!("soak seed {seed} (podmig-e2e soak --moves 10 --sizes 16 --seed {seed} replays it)");
    let outcomes = tokio::time::timeout(
        Duration::from_secs(900),
        podmig_e2e::soak::run(10, &[16], seed),
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
