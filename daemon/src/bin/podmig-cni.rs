//! `podmig-cni`: the chained CNI plugin that lets a migration target keep its Pod's
//! address (see `podmig_daemon::cni`). The runtime runs it with `CNI_*` variables and the
//! network configuration on stdin; it prints a result or a CNI error object.

use std::io::{Read, Write};

fn main() -> std::process::ExitCode {
    let inv = podmig_daemon::cni::Invocation::from_env();
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".into());
    let (out, code) = match podmig_daemon::cni::run(&inv, &stdin) {
        Ok(Some(v)) => (Some(v), 0),
        Ok(None) => (None, 0),
        Err(e) => (Some(podmig_daemon::cni::error_json(&version, &e)), 1),
    };
    if let Some(v) = out {
        let _ = writeln!(std::io::stdout(), "{v}");
    }
    std::process::ExitCode::from(code)
}
