//! Configuration of `podmig node`, parsed once from flags and `PODMIG_*` variables.

use std::path::PathBuf;

/// Flags of `podmig node`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// Unix socket of the runtime hook `podmig-runc` calls.
    #[arg(long, env = "PODMIG_HOOK_SOCKET", default_value = podmig_cri_ext::wrapper::DEFAULT_HOOK_SOCKET)]
    pub hook_socket: PathBuf,
    /// Unix socket of the CRI checkpoint/restore extension (gRPC).
    #[arg(
        long,
        env = "PODMIG_API_SOCKET",
        default_value = "/run/podmig/api.sock"
    )]
    pub api_socket: PathBuf,
    /// runc state root of the runtime's containers.
    #[arg(long, env = "PODMIG_RUNC_ROOT", default_value = podmig_cri_ext::engine::DEFAULT_RUNC_ROOT)]
    pub runc_root: PathBuf,
    /// The runc binary.
    #[arg(long, env = "PODMIG_RUNC_BINARY", default_value = "runc")]
    pub runc_binary: PathBuf,
    /// Where checkpoints are kept (root-only; best on tmpfs: dumps are then bound by page copies).
    #[arg(
        long,
        env = "PODMIG_CHECKPOINT_DIR",
        default_value = "/run/podmig/checkpoints"
    )]
    pub checkpoint_dir: PathBuf,
    /// The daemon's state on the node's disk (root-only): the journal of the moves in
    /// flight, read again after a restart.
    #[arg(long, env = "PODMIG_STATE_DIR", default_value = "/var/lib/podmig")]
    pub state_dir: PathBuf,
    /// Checkpoint bytes the daemon may hold at once; a move that would exceed it (or the
    /// free space of the checkpoint directory) is refused before anything is frozen.
    #[arg(long, env = "PODMIG_CHECKPOINT_BUDGET_MIB", default_value_t = 16_384)]
    pub checkpoint_budget_mib: u64,
    /// How long the CRIU log of a failed dump, lazy dump or preflight is kept (root-only,
    /// in `<state-dir>/criu-failed`), hours; the Migration's message names the file.
    #[arg(long, env = "PODMIG_FAILED_LOG_RETENTION_HOURS", default_value_t = 24)]
    pub failed_log_retention_hours: u64,
    /// Bandwidth cap of each move leaving this node, MiB/s (its page streams and its image
    /// stream; lazy pages are not capped: the application waits for them); 0: none.
    #[arg(long, env = "PODMIG_MOVE_BANDWIDTH_MIBPS", default_value_t = 0)]
    pub move_bandwidth_mibps: u64,
    /// Kubeconfig of the node's API credentials; progress of moves is then written on the
    /// target Pods (the contract with the controller). Without it nothing is reported.
    #[arg(long, env = "PODMIG_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Upper bound, in milliseconds, of a held kill (a Pod being checkpointed, or deleted
    /// and about to be migrated) and of a held create without a move deadline of its own.
    #[arg(long, env = "PODMIG_KILL_HOLD_MS", default_value_t = 300_000)]
    pub kill_hold_ms: u64,
    /// The kubelet's `--runtime-request-timeout` on this node, ms (kubelet's default: 2
    /// minutes). A migration target's create is a CRI call the kubelet gives up on after
    /// it: the daemon holds it at most this less a quarter (at most 15 s), kept for the
    /// restore, and fails the move when the checkpoint does not arrive within that.
    #[arg(long, env = "PODMIG_RUNTIME_REQUEST_TIMEOUT_MS", default_value_t = 120_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub runtime_request_timeout_ms: u64,
    /// This node's name (in the chart: from the downward API, `spec.nodeName`). Needed to
    /// watch the node's Pods and for moves across nodes.
    #[arg(long, env = "PODMIG_NODE_NAME")]
    pub node_name: Option<String>,
    /// Address of the HTTPS migration API.
    #[arg(long, env = "PODMIG_LISTEN", default_value = "0.0.0.0:10443")]
    pub listen: std::net::SocketAddr,
    /// Port other nodes' daemons serve their migration API on.
    #[arg(long, env = "PODMIG_PEER_PORT", default_value_t = podmig_api::nodeapi::DEFAULT_API_PORT)]
    pub peer_port: u16,
    /// Serving certificate of the migration API (PEM).
    #[arg(long, env = "PODMIG_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "PODMIG_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle the other daemons' certificates are checked against (PEM).
    #[arg(long, env = "PODMIG_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Key of that CA (PKCS #8 PEM): without `--tls-cert`/`--tls-key`, the daemon issues
    /// its own serving certificate for the node's InternalIP at start (as the chart runs it).
    #[arg(long, env = "PODMIG_TLS_CA_KEY")]
    pub tls_ca_key: Option<PathBuf>,
}

/// Flags of `podmig controller` (the Kubernetes connection comes from KUBECONFIG or the
/// in-cluster service account).
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerConfig {
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "PODMIG_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "PODMIG_LEASE_NAME", default_value = "podmig-controller")]
    pub lease_name: String,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, env = "PODMIG_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: std::net::SocketAddr,
    /// This replica's identity in the Lease.
    #[arg(long, env = "PODMIG_IDENTITY", default_value_t = default_identity())]
    pub identity: String,
    /// Moves at once in the cluster; more wait queued.
    #[arg(long, env = "PODMIG_MAX_MOVES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_moves: u32,
    /// Moves at once into or out of one node; more wait queued.
    #[arg(long, env = "PODMIG_MAX_MOVES_PER_NODE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_moves_per_node: u32,
    /// A Migration's timeout is at least this many seconds per GiB of its Pod's memory
    /// (unless the Migration says `timeoutSecondsPerGiB`).
    #[arg(long, env = "PODMIG_TIMEOUT_SECONDS_PER_GIB", default_value_t = 60)]
    pub timeout_seconds_per_gib: u32,
    /// Address of the HTTPS admission webhook answering evictions (`POST /evict`); off
    /// unless given, with `--webhook-cert` and `--webhook-key`.
    #[arg(long, env = "PODMIG_WEBHOOK_ADDR")]
    pub webhook_addr: Option<std::net::SocketAddr>,
    /// The webhook's serving certificate (PEM); re-read when the file changes (rotation).
    #[arg(long, env = "PODMIG_WEBHOOK_CERT")]
    pub webhook_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, env = "PODMIG_WEBHOOK_KEY")]
    pub webhook_key: Option<PathBuf>,
    /// How long the webhook waits for a moving Pod's move to end before it answers 429
    /// (seconds; 0: at once). Keep it below the webhook configuration's `timeoutSeconds`
    /// (by 2 s or more): an answer after it counts as the webhook being down.
    #[arg(long, env = "PODMIG_EVICTION_WAIT_SECONDS", default_value_t = 8, value_parser = clap::value_parser!(u64).range(0..=28))]
    pub eviction_wait_seconds: u64,
}

impl ControllerConfig {
    /// The limits on moves at once these flags set.
    pub fn limits(&self) -> crate::controller::limits::Limits {
        crate::controller::limits::Limits {
            per_cluster: self.max_moves as usize,
            per_node: self.max_moves_per_node as usize,
            timeout_seconds_per_gib: self.timeout_seconds_per_gib,
        }
    }
}

fn default_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| format!("{}-{}", h.trim(), std::process::id()))
        .unwrap_or_else(|_| format!("podmig-{}", std::process::id()))
}

/// Flags of `podmig prepare-node` (the chart's init container; see [`crate::nodeprep`]).
#[derive(Debug, Clone, clap::Args)]
pub struct PrepareConfig {
    /// The host's root file system as mounted in this container.
    #[arg(long, env = "PODMIG_HOST_ROOT", default_value = "/host")]
    pub host_root: PathBuf,
    /// Where to install on the host (binaries in `bin/`, CRIU's files in `criu/`).
    #[arg(long, env = "PODMIG_INSTALL_DIR", default_value = "/opt/podmig")]
    pub install_dir: PathBuf,
    /// What to install, in this container: `bin/podmig-runc`, `bin/criu` and `criu/`.
    #[arg(long, env = "PODMIG_SOURCE_DIR", default_value = "/opt/podmig")]
    pub source_dir: PathBuf,
    /// The runtime handler's name (the RuntimeClass's `handler`).
    #[arg(long, default_value = "podmig")]
    pub handler: String,
    /// How to restart the runtime after a configuration change: `auto` (systemctl in
    /// the host's namespaces, for the runtime found), `none`, or a command line.
    #[arg(long, env = "PODMIG_RESTART_RUNTIME", default_value = "auto")]
    pub restart: String,
    /// Undo everything a previous run did.
    #[arg(long)]
    pub uninstall: bool,
}
