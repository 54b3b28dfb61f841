//! `podmig`: the node daemon (`podmig node`); the controller and client commands follow.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "podmig", version, about = "Live migration of Kubernetes Pods")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node daemon (runtime hook + checkpoint/restore extension).
    Node(Box<podmig_daemon::config::NodeConfig>),
    /// Run the MigratingPod and Migration controllers (leader-elected).
    Controller(podmig_daemon::config::ControllerConfig),
    /// Prepare this node for podmig (the chart's init container): install podmig-runc and
    /// CRIU under /opt/podmig and add the `podmig` runtime handler to containerd or CRI-O.
    PrepareNode(podmig_daemon::config::PrepareConfig),
    /// Wait until a DaemonSet has a Ready Pod on every node it schedules to (the chart's
    /// uninstall hook: every node's preparation undone).
    AwaitDaemonset {
        /// Its namespace.
        #[arg(long, env = "PODMIG_NAMESPACE")]
        namespace: String,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Give up (exit non-zero) after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_seconds: u64,
    },
    /// Take podmig's finalizers off every MigratingPod's Pods, MigratingPod and Migration
    /// (the chart's post-delete hook: nothing may wait for a controller that is gone).
    ReleaseFinalizers,
    /// Do nothing until SIGTERM (the main container of the uninstall hook's DaemonSet).
    Idle,
    /// Run the kube-scheduler extender (`filter`, `prioritize`, `preempt`): a preemption
    /// moves the victims podmig can move instead of letting them be killed.
    Extender {
        /// Address to serve on.
        #[arg(long, env = "PODMIG_EXTENDER_ADDR", default_value = "0.0.0.0:8888")]
        listen: std::net::SocketAddr,
        /// The node daemons' CA bundle (PEM).
        #[arg(long, env = "PODMIG_TLS_CA")]
        daemon_ca: std::path::PathBuf,
        /// Port of the node daemons' HTTPS API.
        #[arg(long, env = "PODMIG_DAEMON_PORT", default_value_t = podmig_api::nodeapi::DEFAULT_API_PORT)]
        daemon_port: u16,
        /// Bearer token for the daemons (needs `create pods/migrate`), re-read at each use;
        /// default: the Kubernetes credentials' token.
        #[arg(long, env = "PODMIG_TOKEN_FILE")]
        token_file: Option<std::path::PathBuf>,
    },
    /// Print the CustomResourceDefinitions (YAML), or write one file per CRD into a directory.
    Crds {
        /// Directory to write `<plural>.<group>.yaml` files into.
        #[arg(long)]
        write: Option<std::path::PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::PrepareNode(cfg) => println!("{}", podmig_daemon::nodeprep::run(&cfg)?),
        Command::AwaitDaemonset {
            namespace,
            name,
            timeout_seconds,
        } => {
            let client = podmig_daemon::kubeclient::infer().await?;
            let said = podmig_daemon::cleanup::await_daemonset(
                client,
                &namespace,
                &name,
                std::time::Duration::from_secs(timeout_seconds),
            )
            .await?;
            println!("{said}");
        }
        Command::Idle => shutdown().await,
        Command::ReleaseFinalizers => {
            let client = podmig_daemon::kubeclient::infer().await?;
            println!(
                "{}",
                podmig_daemon::cleanup::release_finalizers_within(
                    client,
                    std::time::Duration::from_secs(60)
                )
                .await?
            );
        }
        Command::Node(cfg) => podmig_daemon::node::run(*cfg, shutdown()).await?,
        Command::Controller(cfg) => {
            let client = podmig_daemon::kubeclient::infer().await?;
            let identity = cfg.identity.clone();
            let metrics =
                std::sync::Arc::new(podmig_daemon::controller::metrics::Metrics::default());
            let served = metrics.clone();
            let addr = cfg.metrics_addr;
            tokio::spawn(async move {
                if let Err(error) = podmig_daemon::controller::metrics::serve(addr, served).await {
                    tracing::error!(%error, %addr, "metrics endpoint failed");
                }
            });
            let _webhook = match (&cfg.webhook_addr, &cfg.webhook_cert, &cfg.webhook_key) {
                (Some(addr), Some(cert), Some(key)) => Some(
                    podmig_daemon::controller::webhook::serve(
                        client.clone(),
                        &identity,
                        *addr,
                        cert,
                        key,
                        std::time::Duration::from_secs(cfg.eviction_wait_seconds),
                    )
                    .await?,
                ),
                (None, _, _) => None,
                _ => anyhow::bail!("--webhook-addr needs --webhook-cert and --webhook-key"),
            };
            let lost = metrics.clone();
            let limits = cfg.limits();
            podmig_daemon::controller::leader::lead(
                client.clone(),
                &cfg.lease_namespace,
                &cfg.lease_name,
                &identity,
                || {
                    podmig_daemon::controller::run(
                        client.clone(),
                        &identity,
                        metrics.clone(),
                        limits,
                    )
                },
                |why| lost.leadership_lost(why.label()),
                shutdown(),
            )
            .await;
        }
        Command::Extender {
            listen,
            daemon_ca,
            daemon_port,
            token_file,
        } => {
            let config = kube::Config::infer().await?;
            let token = match token_file {
                Some(f) => podmig_daemon::node::peer::TokenSource::File(f),
                None => podmig_daemon::node::peer::TokenSource::from_config(&config)
                    .ok_or_else(|| anyhow::anyhow!("no token: pass --token-file"))?,
            };
            let client = podmig_daemon::kubeclient::from_config(config)?;
            let peers = podmig_daemon::node::peer::PeerClient::new(
                &std::fs::read(&daemon_ca)?,
                token,
                daemon_port,
            )?;
            let ext = std::sync::Arc::new(podmig_daemon::extender::Extender::new(client, peers));
            tokio::select! {
                served = podmig_daemon::extender::serve(ext, listen) => served?,
                () = shutdown() => {}
            }
        }
        Command::Crds { write: None } => print!("{}", podmig_daemon::crds::yaml()?),
        Command::Crds { write: Some(dir) } => {
            for (name, yaml) in podmig_daemon::crds::files()? {
                std::fs::write(dir.join(name), yaml)?;
            }
        }
    }
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot watch SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
