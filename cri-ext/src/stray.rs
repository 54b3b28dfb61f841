//! CRIU helpers a killed node daemon left running. The receiving page server and the
//! lazy-pages daemon run in their own process group (so a move can stop them with their
//! children) and so outlive a daemon killed with SIGKILL; a restarted daemon settles every
//! move from its journal and never reattaches to them, so they only hold memory, a port
//! in their namespace and files in the checkpoint directory until they are stopped here.

use std::path::{Path, PathBuf};

/// CRIU subcommands whose processes serve one move of the daemon that started them.
const HELPERS: &[&str] = &["page-server", "lazy-pages"];

/// A process whose command line is that of a CRIU helper working below `root`.
fn is_helper_below(argv: &[String], root: &Path) -> bool {
    argv.iter().any(|a| HELPERS.contains(&a.as_str()))
        && argv.iter().any(|a| Path::new(a).starts_with(root))
}

/// The pids of CRIU helpers (`page-server`, `lazy-pages`) working on images below `root`.
pub fn helpers_below(root: &Path) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            is_helper_below(&argv, root)
        })
        .collect()
}

/// Kills (SIGKILL, with their process group) the CRIU helpers working below `root` that a
/// previous run of the daemon left; returns their pids. Call before any move starts.
pub fn kill_helpers_below(root: &Path) -> Vec<u32> {
    let root: PathBuf = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let pids = helpers_below(&root);
    for &pid in &pids {
        if let Ok(raw) = i32::try_from(pid) {
            let pid = nix::unistd::Pid::from_raw(raw);
            // Its own group when it leads one (as spawned), else the process alone.
            if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            } else {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn only_criu_helpers_on_images_below_the_root_are_recognised() {
        let root = Path::new("/var/lib/podmig/checkpoints");
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(is_helper_below(
            &argv(&[
                "criu",
                "page-server",
                "--images-dir",
                "/var/lib/podmig/checkpoints/uid/app"
            ]),
            root
        ));
        assert!(is_helper_below(
            &argv(&[
                "nice",
                "criu",
                "lazy-pages",
                "--images-dir",
                "/var/lib/podmig/checkpoints/x"
            ]),
            root
        ));
        // A dump acting as page server is runc's, under the container's shim: not ours.
        assert!(!is_helper_below(
            &argv(&["runc", "checkpoint", "--page-server", "127.0.0.1:7070"]),
            root
        ));
        assert!(!is_helper_below(
            &argv(&["criu", "page-server", "--images-dir", "/elsewhere/x"]),
            root
        ));
    }

    #[test]
    fn a_left_helper_is_killed_with_its_group_and_others_are_not() {
        let tmp = tempfile::tempdir().expect("tmp");
        let images = tmp.path().join("uid").join("app");
        let spawn = |dir: &Path| {
            // `sh -c` with a second command so that the shell stays (no exec of sleep).
            std::process::Command::new("sh")
                .args([
                    "-c",
                    "sleep 60; true",
                    "criu",
                    "page-server",
                    "--images-dir",
                ])
                .arg(dir)
                .process_group(0)
                .spawn()
                .expect("spawn")
        };
        let mut left = spawn(&images);
        let other_tmp = tempfile::tempdir().expect("tmp");
        let mut other = spawn(other_tmp.path());
        let killed = kill_helpers_below(tmp.path());
        assert_eq!(killed, [left.id()]);
        let status = left.wait().expect("wait");
        assert!(!status.success(), "killed: {status}");
        assert_eq!(other.try_wait().expect("try_wait"), None, "still running");
        let _ = other.kill();
        let _ = other.wait();
    }
}
