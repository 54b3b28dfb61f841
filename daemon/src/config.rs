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
    /// How long a kill of a container being checkpointed is held, in milliseconds.
    #[arg(long, env = "PODMIG_KILL_HOLD_MS", default_value_t = 60_000)]
    pub kill_hold_ms: u64,
}
