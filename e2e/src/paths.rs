//! Where the binaries and images the tests use are found.

use std::path::PathBuf;

/// Where `scripts/setup` installs (`PODMIG_PREFIX`, default `/opt/podmig`).
pub fn prefix() -> PathBuf {
    std::env::var_os("PODMIG_PREFIX").map_or_else(|| PathBuf::from("/opt/podmig"), PathBuf::from)
}

/// Images built by `scripts/setup` (`scripts/build-images`).
pub fn images_dir() -> PathBuf {
    std::env::var_os("PODMIG_IMAGES")
        .map_or_else(|| PathBuf::from("/opt/podmig/images"), PathBuf::from)
}

/// The cargo target directory holding the workspace's binaries (next to the running
/// test or tool executable, one level up from `deps/` for tests).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(PathBuf::from).unwrap_or(dir)
    } else {
        dir
    }
}

/// A workspace binary by name (`podmig`, `podmig-runc`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// `PATH` for the runtime stack: the CRIU 4 wrapper in /usr/local/sbin comes first.
pub const RUNTIME_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Image reference of the test app.
pub const TESTAPP_IMAGE: &str = "podmig.local/testapp:latest";
/// Image reference of the sandbox container.
pub const PAUSE_IMAGE: &str = "podmig.local/pause:latest";

/// The static test app binary built by `scripts/build-images` (for runs outside containers).
pub fn testapp_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODMIG_TESTAPP_BIN") {
        return PathBuf::from(p);
    }
    let target = bin_dir().parent().map(PathBuf::from).unwrap_or_default();
    target.join("testapp/x86_64-unknown-linux-gnu/release/testapp")
}

/// A memory-backed directory (tmpfs) for checkpoint images.
pub fn memory_dir() -> PathBuf {
    std::env::var_os("PODMIG_MEMORY_DIR").map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from)
}

/// The repository's root (where `helm/`, `examples/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every file below `dir` (none when it does not exist): what a checkpoint store holds.
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { files_under(&p) } else { vec![p] }
        })
        .collect()
}
