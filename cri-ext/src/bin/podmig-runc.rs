//! `podmig-runc`: the OCI runtime wrapper containerd runs for the `podmig` runtime
//! handler. Synchronous and runc-compatible; see `podmig_cri_ext::wrapper`.
//!
//! NB: no clap here: the wrapper must accept every runc command line unchanged, including
//! flags it has never heard of, so it only picks out the few it acts on.

fn main() {
    let cfg = podmig_cri_ext::wrapper::config_from(|k| std::env::var_os(k));
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    std::process::exit(podmig_cri_ext::wrapper::run(&cfg, args));
}
