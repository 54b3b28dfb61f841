//! CRIU and runc processes a killed node daemon left running. The receiving page server
//! and the lazy-pages daemon run in their own process group (so a move can stop them with
//! their children) and so outlive a daemon killed with SIGKILL, as does a lazy dump
//! serving pages; a restarted daemon settles every move from its journal and never
//! reattaches to them, so they only hold memory, a port, files in the checkpoint directory
//! — and a lazy dump the source's tasks — until they are stopped here. A restore whose
//! pages can no longer come is stopped here too ([`kill_restore_of`]).

use std::path::{Path, PathBuf};

/// CRIU subcommands whose processes serve one move of the daemon that started them.
const HELPERS: &[&str] = &["page-server", "lazy-pages"];

/// A process whose command line is that of a CRIU helper working below `root`.
fn is_helper_below(argv: &[String], root: &Path) -> bool {
    argv.iter().any(|a| HELPERS.contains(&a.as_str()))
        && argv.iter().any(|a| Path::new(a).starts_with(root))
}

/// The command line of process `pid` (empty when it is gone).
fn argv_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `dir` as process `pid` sees it (through its root, in its mount namespace) is
/// the very directory this process sees at `dir`: a path names another node's directory
/// in another node's namespace (nodes on one kernel, as in the local test cluster).
fn sees_same_dir(pid: u32, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let theirs = Path::new(&format!("/proc/{pid}/root")).join(dir.strip_prefix("/").unwrap_or(dir));
    match (std::fs::metadata(theirs), std::fs::metadata(dir)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Every process but this one whose command line satisfies `wanted` and that works on
/// this process's `root` (see [`sees_same_dir`]).
fn processes(root: &Path, wanted: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| wanted(&argv_of(pid)))
        .filter(|&pid| sees_same_dir(pid, root))
        .collect()
}

/// The pids of CRIU helpers (`page-server`, `lazy-pages`) working on images below `root`.
pub fn helpers_below(root: &Path) -> Vec<u32> {
    processes(root, |argv| is_helper_below(argv, root))
}

/// Every process whose command line names a path below `root` (a checkpoint directory):
/// CRIU helpers, `runc restore` and `runc checkpoint` of its images.
pub fn users_of(root: &Path) -> Vec<u32> {
    processes(root, |argv| {
        argv.iter().any(|a| Path::new(a).starts_with(root))
    })
}

/// `pid`'s descendants, deepest first.
fn descendants(pid: u32) -> Vec<u32> {
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .flat_map(|c| {
                    c.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in children {
        out.extend(descendants(c));
        out.push(c);
    }
    out
}

/// Kills `pids` and every descendant of theirs (descendants first: a restored tree never
/// outlives the CRIU that was restoring it). Returns the pids killed, each once (one of
/// `pids` may descend from another: a forked child not yet exec'd has its parent's
/// command line).
pub fn kill_trees(pids: &[u32]) -> Vec<u32> {
    let mut all: Vec<u32> = Vec::new();
    for &pid in pids {
        for p in descendants(pid).into_iter().chain([pid]) {
            if !all.contains(&p) {
                all.push(p);
            }
        }
    }
    for &pid in &all {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    all
}

/// Kills (with their CRIU) the lazy `runc checkpoint` runs of images below `root` that a
/// previous run of the daemon left: a lazy dump serves pages until it is told to stop and
/// holds the container's tasks meanwhile, so a source could not resume. A full dump is
/// left to end on its own (recovery settles it). Returns the pids.
pub fn kill_lazy_dumps_below(root: &Path) -> Vec<u32> {
    kill_lazy_runs_below(root, "checkpoint")
}

/// Kills the lazy `runc <verb>` runs (with their descendants) of images below `root`.
fn kill_lazy_runs_below(root: &Path, verb: &str) -> Vec<u32> {
    let root: PathBuf = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let runs = processes(&root, |argv| {
        argv.iter().any(|a| a == verb)
            && argv.iter().any(|a| a == "--lazy-pages")
            && argv.iter().any(|a| Path::new(a).starts_with(&root))
    });
    kill_trees(&runs)
}

/// Kills (with their CRIU and what it restored so far) the lazy restores of images below
/// `root` a previous run of the daemon left: their lazy-pages daemon is gone with that
/// run, so they could only hang or run without their memory. Returns the pids.
pub fn kill_lazy_restores_below(root: &Path) -> Vec<u32> {
    kill_lazy_runs_below(root, "restore")
}

/// The CRIU and runc runs (dumps, restores, page servers, lazy-pages daemons) working on
/// images below `root`, without the processes that merely name it (a node daemon's
/// `--checkpoint-dir`).
pub fn runs_below(root: &Path) -> Vec<u32> {
    const VERBS: [&str; 4] = ["restore", "checkpoint", "page-server", "lazy-pages"];
    processes(root, |argv| {
        argv.iter().any(|a| VERBS.contains(&a.as_str()))
            && argv.iter().any(|a| Path::new(a).starts_with(root))
    })
}

/// Mount points below `dir` in this mount namespace, deepest first: a CRIU killed during
/// a restore leaves its cgroup yard (`.criu.cgyard.*`, a tmpfs and the cgroup hierarchies)
/// mounted in its work directory, which is the images directory.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// Detaches every mount below `dir` (see [`mounts_below`]), so the directory can go;
/// returns how many were detached.
pub fn detach_mounts_below(dir: &Path) -> usize {
    mounts_below(dir)
        .iter()
        .filter(|p| nix::mount::umount2(p.as_path(), nix::mount::MntFlags::MNT_DETACH).is_ok())
        .count()
}

/// Stops a restore of `images` that is still running (`runc restore --image-path images`,
/// its CRIU and what CRIU restored so far), so that it fails instead of finishing: for a
/// lazy restore whose pages can no longer come. Returns the pids killed (none: no such
/// restore runs).
pub fn kill_restore_of(images: &Path) -> Vec<u32> {
    let restores = processes(images.parent().unwrap_or(images), |argv| {
        argv.iter().any(|a| a == "restore") && argv.iter().any(|a| Path::new(a) == images)
    });
    kill_trees(&restores)
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
#[allow(clippy::disallowed_methods)] // synchronous tests: they wait with the thread
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Kills the process group a test's shell leads (the shell and its `sleep`).
    fn stop_group(pid: u32) {
        if let Ok(raw) = i32::try_from(pid) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

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
    fn mounts_left_below_a_directory_are_detached_so_it_can_go() {
        let tmp = tempfile::tempdir().expect("tmp");
        let yard = tmp.path().join("app").join(".criu.cgyard.x");
        std::fs::create_dir_all(yard.join("inner")).expect("dirs");
        nix::mount::mount(
            Some("none"),
            &yard,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount (needs root)");
        std::fs::create_dir_all(yard.join("inner")).expect("dir");
        nix::mount::mount(
            Some("none"),
            &yard.join("inner"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount");
        assert_eq!(mounts_below(tmp.path()), [yard.join("inner"), yard.clone()]);
        assert_eq!(detach_mounts_below(tmp.path()), 2);
        assert!(mounts_below(tmp.path()).is_empty());
        std::fs::remove_dir_all(tmp.path().join("app")).expect("removable now");
    }

    #[test]
    fn a_left_dump_below_the_root_is_killed_with_its_criu() {
        let tmp = tempfile::tempdir().expect("tmp");
        let images = tmp.path().join("uid").join("app");
        let mut dump = std::process::Command::new("sh")
            .args([
                "-c",
                "sleep 60 & wait",
                "runc",
                "checkpoint",
                "--lazy-pages",
                "--image-path",
            ])
            .arg(&images)
            .spawn()
            .expect("spawn");
        let pid = dump.id();
        let criu = (0..200)
            .find_map(|_| {
                let c = descendants(pid);
                if c.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                c.first().copied()
            })
            .expect("the child started");
        assert_eq!(kill_lazy_dumps_below(tmp.path()), [criu, pid]);
        assert!(!dump.wait().expect("wait").success());
    }

    #[test]
    fn a_running_restore_of_the_images_is_killed_with_its_children() {
        let tmp = tempfile::tempdir().expect("tmp");
        let images = tmp.path().join("app");
        // A stand-in `runc restore --image-path images` whose child stands for its CRIU.
        let mut restore = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & wait", "runc", "restore", "--image-path"])
            .arg(&images)
            .spawn()
            .expect("spawn");
        let pid = restore.id();
        let child = (0..200)
            .find_map(|_| {
                let c = descendants(pid);
                if c.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                c.first().copied()
            })
            .expect("the child started");
        let mut other = std::process::Command::new("sh")
            .args([
                "-c",
                "sleep 60; true",
                "runc",
                "restore",
                "--image-path",
                "/else",
            ])
            .process_group(0)
            .spawn()
            .expect("spawn");
        let killed = kill_restore_of(&images);
        assert_eq!(killed, [child, pid]);
        assert!(!restore.wait().expect("wait").success());
        assert_eq!(
            other.try_wait().expect("try_wait"),
            None,
            "another restore runs on"
        );
        stop_group(other.id());
        let _ = other.wait();
        assert_eq!(users_of(tmp.path()), Vec::<u32>::new());
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
        // Until the shells have exec'd, their command lines are this test's; until their
        // `sleep` child has exec'd, it has the shell's: wait for exactly the two shells.
        for _ in 0..500 {
            if helpers_below(tmp.path()) == [left.id()]
                && helpers_below(other_tmp.path()) == [other.id()]
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let killed = kill_helpers_below(tmp.path());
        assert_eq!(killed, [left.id()]);
        let status = left.wait().expect("wait");
        assert!(!status.success(), "killed: {status}");
        assert_eq!(other.try_wait().expect("try_wait"), None, "still running");
        stop_group(other.id());
        let _ = other.wait();
    }
}
