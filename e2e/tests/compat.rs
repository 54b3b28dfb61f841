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
    let found: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.app.clone(),
                compat::major(&r.version).to_owned(),
                r.mv.clone(),
                compat::verdict(&r.outcome).to_owned(),
            ]
        })
        .collect();
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
