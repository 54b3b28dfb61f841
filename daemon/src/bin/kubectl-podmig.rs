//! `kubectl-podmig`: the kubectl plugin (`kubectl podmig migrate|drain|list|describe|cancel`;
//! see `podmig_daemon::plugin`). Errors go to stderr as kubectl prints them, exit 1.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = podmig_daemon::plugin::Cli::parse();
    let mut out = std::io::stdout();
    match podmig_daemon::plugin::run(cli, &mut out).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
