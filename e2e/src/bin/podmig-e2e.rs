//! `podmig-e2e`: the demo and the benchmarks of the local test bed.

use clap::{Parser, Subcommand};
use podmig_e2e::containerd::ContainerdVersion;

#[derive(Parser)]
#[command(
    name = "podmig-e2e",
    about = "podmig's local test bed: demo and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drain a node of the local two-node cluster under the running example app, narrated;
    /// ends with `podmig-demo result=ok from=… to=… service_downtime_ms=… connection_kept=… connection_gap_ms=… frozen_ms=… count_before=… count_after=…`.
    Demo,
    /// Serve the Kubernetes API for tests until interrupted; prints the kubeconfig path.
    Apiserver {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: std::net::SocketAddr,
        /// Directory for the certificate and kubeconfig.
        #[arg(long, default_value = "/var/tmp/podmig-apiserver")]
        dir: std::path::PathBuf,
    },
    /// The local cluster: `up` starts it in the background and prints the kubeconfig path,
    /// `down` removes it (also what a crashed run left), `run` serves it in the foreground.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
        /// Directory of the cluster's state.
        #[arg(long, global = true, default_value = "/var/tmp/podmig-cluster")]
        dir: std::path::PathBuf,
    },
    /// Cross-node moves with one fault each (a node daemon or the controller killed at a
    /// random moment), the invariants checked after each; prints fault × outcome.
    Soak {
        /// Moves.
        #[arg(long, default_value_t = 50)]
        moves: usize,
        /// Memory of the apps moved in turn, MiB.
        #[arg(long, value_delimiter = ',', default_values_t = [16u32, 256])]
        sizes: Vec<u32>,
        /// Seed of the faults and their moments (printed; a run is replayed from it).
        #[arg(long)]
        seed: Option<u64>,
        /// The two nodes' containerd, as for `cluster up` (`1,2`: a 1.6 node and a 2.x node).
        #[arg(long, default_value = "1,2")]
        containerd: String,
    },
    /// `cluster up`/`down` times, the API server's watch latency, and a node's drain
    /// (MigratingPods through the eviction webhook within the limits, against one move
    /// alone and against a Deployment's plain eviction).
    BenchCluster {
        /// Runs of each (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// MigratingPods on the drained node.
        #[arg(long, default_value_t = 8)]
        drain_pods: usize,
        /// Memory of each, MiB.
        #[arg(long, default_value_t = 64)]
        drain_mib: u64,
        /// Only the drain.
        #[arg(long)]
        only_drain: bool,
    },
    /// Downtime of a cross-node move: podmig (full and lazy) vs delete-and-recreate vs the
    /// thesis' order.
    Bench {
        /// Ballast sizes in MiB.
        #[arg(long, value_delimiter = ',', default_values_t = [0u64, 256, 1024, 2560, 4096])]
        sizes: Vec<u64>,
        /// Runs per size and strategy (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Cross-node moves in a row of one 16 MiB Pod for the `pingpong` line (0: none).
        #[arg(long, default_value_t = 20)]
        pingpong: usize,
        /// Ballast sizes in MiB for the connections table (clients of a Service across a
        /// move that keeps the Pod's address).
        #[arg(long, value_delimiter = ',', default_values_t = [0u64, 256])]
        connections: Vec<u64>,
        /// Measure only the connections table.
        #[arg(long)]
        only_connections: bool,
    },
    /// Redraws `docs/downtime.svg` from a saved `make bench` output (its `podmig-bench`
    /// lines), e.g. after editing the README's tables from that run.
    Plot {
        /// The saved output.
        from: std::path::PathBuf,
        /// The plot's title.
        #[arg(
            long,
            default_value = "cross-node move downtime, medians of 3 runs (2-core VM)"
        )]
        title: String,
    },
    /// Checkpoint, restore and frozen time of podmig next to plain CRIU.
    BenchEngine {
        /// Ballast sizes in MiB.
        #[arg(long, value_delimiter = ',', default_values_t = [0u64, 256, 1024])]
        sizes: Vec<u64>,
        /// Runs per size (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start the cluster in the background; prints the kubeconfig path when Nodes are Ready.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Install podmig with `helm install` of helm/podmig (daemon and controller Pods)
        /// instead of running the daemons and the controller as processes.
        #[arg(long)]
        chart: bool,
        /// The nodes' containerd: `1` (1.6 with runc 1.1), `2` (2.x with runc 1.3), or a
        /// list such as `1,2` (node i takes entry i modulo its length).
        #[arg(long, default_value = "1")]
        containerd: String,
    },
    /// Stop the cluster and remove everything it made.
    Down,
    /// Run the cluster in the foreground until SIGTERM.
    Run {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// As for `up`.
        #[arg(long)]
        chart: bool,
        /// As for `up`.
        #[arg(long, default_value = "1")]
        containerd: String,
    },
}

/// Waits for SIGINT or SIGTERM (Ctrl-C of `make` reaches the whole process group); its name.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    // `cluster run` tears down on a signal itself once it is up; a signal while it comes
    // up, or during a demo or a benchmark, drops the work in progress: every Cluster it
    // holds tears itself down (containerd, daemons, controller, network), and what a
    // cluster started but did not finish is swept from its state file.
    let sweep_dir = match &command {
        Command::Cluster {
            action: ClusterAction::Run { .. },
            dir,
        } => Some(dir.clone()),
        _ => None,
    };
    tokio::select! {
        done = run(command) => done,
        signal = interrupted() => {
            eprintln!("podmig-e2e: {signal}: everything it started is torn down");
            if let Some(dir) = sweep_dir {
                tokio::task::block_in_place(|| podmig_e2e::cluster::sweep(&dir))?;
            }
            anyhow::bail!("interrupted by {signal}")
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo => {
            let result = podmig_e2e::demo::run().await?;
            println!("{}", result.line());
            anyhow::ensure!(result.ok(), "the app did not move with its state");
            Ok(())
        }
        Command::Apiserver { listen, dir } => {
            let server = podmig_e2e::apiserver::ApiServer::start(podmig_e2e::apiserver::Options {
                listen,
                extra_sans: vec![],
                dir,
                bookmark_interval: std::time::Duration::from_secs(60),
            })
            .await?;
            println!("{}", server.kubeconfig.display());
            tokio::signal::ctrl_c().await?;
            server.stop().await;
            Ok(())
        }
        Command::Cluster { action, dir } => match action {
            ClusterAction::Up {
                nodes,
                chart,
                containerd,
            } => {
                ContainerdVersion::parse_list(&containerd)?;
                podmig_e2e::cluster::up_background(&dir, nodes, chart, &containerd)
            }
            ClusterAction::Down => tokio::task::block_in_place(|| podmig_e2e::cluster::sweep(&dir)),
            ClusterAction::Run {
                nodes,
                chart,
                containerd,
            } => {
                let versions = ContainerdVersion::parse_list(&containerd)?;
                podmig_e2e::cluster::run_foreground(&dir, nodes, chart, &versions).await
            }
        },
        Command::BenchCluster {
            runs,
            drain_pods,
            drain_mib,
            only_drain,
        } => {
            if !only_drain {
                podmig_e2e::bench::cluster(runs).await?;
            }
            podmig_e2e::bench_drain::run(runs, drain_pods, drain_mib).await
        }
        Command::Soak {
            moves,
            sizes,
            seed,
            containerd,
        } => {
            let versions = ContainerdVersion::parse_list(&containerd)?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            println!(
                "soak: {moves} moves, sizes {sizes:?} MiB, seed {seed}, containerd {containerd}"
            );
            let outcomes = podmig_e2e::soak::run(moves, &sizes, seed, &versions).await?;
            print!("{}", podmig_e2e::soak::table(&outcomes));
            println!("podmig-soak moves={} seed={seed} result=ok", outcomes.len());
            Ok(())
        }
        Command::Bench {
            sizes,
            runs,
            pingpong,
            connections,
            only_connections,
        } => {
            let sizes = if only_connections { vec![] } else { sizes };
            let pingpong = if only_connections { 0 } else { pingpong };
            podmig_e2e::bench_move::moves(&sizes, runs, pingpong, &connections).await
        }
        Command::BenchEngine { sizes, runs } => podmig_e2e::bench::engine(&sizes, runs).await,
        Command::Plot { from, title } => {
            let series = podmig_e2e::plot::series_from_bench(&std::fs::read_to_string(&from)?);
            anyhow::ensure!(
                !series.is_empty(),
                "no podmig-bench lines in {}",
                from.display()
            );
            let svg = podmig_e2e::paths::repo_root().join("docs/downtime.svg");
            podmig_e2e::plot::downtime_svg(&svg, &title, &series)?;
            println!("plot: {}", svg.display());
            Ok(())
        }
    }
}
