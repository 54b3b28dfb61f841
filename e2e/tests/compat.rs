//! The compatibility suite (`podmig_e2e::compat`): PostgreSQL, MariaDB, Redis, memcached,
//! nginx and an app with its sidecar moved on the local two-node cluster, same node then
//! across nodes (each with its own client working through the move), through
//! `Migration`s; and MariaDB on io_uring refused by CRIU's preflight before it freezes.
//! The README's table must say what this run found (`make compat-table` rewrites it).

use podmig_e2e::{cluster::Cluster, compat};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_applications_move_as_the_readme_table_says() -> anyhow::Result<()> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller("compat")?;
    let rows = compat::run(&c).await?;
    // What cannot move says why before anything freezes.
    let refused = compat::preflight_refusal(&c).await?;
    println!("podmig-compat preflight: {refused}");
    let table = compat::table(&rows);
    println!("{table}");
    let readme_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path)?;
    if std::env::var_os("PODMIG_WRITE_README").is_some() {
        std::fs::write(&readme_path, compat::with_table(&readme, &table)?)?;
        return Ok(());
    }
    let found: Vec<[String; 9]> = rows.iter().filter_map(compat::Row::comparable).collect();
    assert_eq!(found.len(), rows.len(), "every row can be compared");
    assert_eq!(
        compat::readme_outcomes(&readme),
        found,
        "the README's compatibility table is not what this run found (`make compat-table`):\n{}",
        rows.iter()
            .map(compat::Row::line)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

/// MariaDB (8 TiB of address space reserved at start) moved across nodes again and again
/// in `full`, `lazy` and `auto` in turn, its writer working through every move and every
/// acknowledged row read back after each: one move in four used to fail at random
/// ("page-pipe: create_page_pipe: Can't allocate 34364860720 bytes") whenever `auto`
/// chose lazy. `PODMIG_REPEAT_MOVES` moves (4 here; `make compat-repeat` runs 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_moves_across_nodes_again_and_again() -> anyhow::Result<()> {
    let moves: usize = std::env::var("PODMIG_REPEAT_MOVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller("repeat")?;
    let rows = compat::repeat_across(&c, "mariadb", moves).await?;
    let lines: Vec<String> = rows.iter().map(compat::Row::line).collect();
    println!("{}", lines.join("\n"));
    assert_eq!(rows.len(), moves, "stopped early:\n{}", lines.join("\n"));
    assert!(
        rows.iter()
            .all(|r| r.outcome == "ok" && r.client_errors == 0),
        "every move ok, its writer without an error:\n{}",
        lines.join("\n")
    );
    Ok(())
}
