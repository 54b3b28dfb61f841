//! What this node's kernel and CRIU allow beyond a full dump, found once at daemon start:
//! whether lazy (post-copy) moves are possible. CRIU restores lazily through userfaultfd
//! (`criu check --feature uffd-noncoop`), and its page server needs pipes of ~3.4 MB, which
//! the kernel grants only with `CAP_SYS_RESOURCE` or a large enough `fs.pipe-max-size`
//! (without either the page transfer fails mid-way: `page-pipe: splice: Bad file descriptor`).

use std::process::Command;

use crate::nodeprep::LAZY_PIPE_SIZE;

/// Capability bit of `CAP_SYS_RESOURCE` in `/proc/self/status`'s `CapEff`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether lazy moves are possible on this node, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LazySupport {
    /// CRIU can restore lazily and serve pages here.
    Possible,
    /// They are not, for the reason given (in words an operator can act on).
    Impossible(String),
}

impl LazySupport {
    /// True when lazy moves are possible.
    pub fn possible(&self) -> bool {
        matches!(self, LazySupport::Possible)
    }
}

impl std::fmt::Display for LazySupport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LazySupport::Possible => write!(f, "lazy moves are possible on this node"),
            LazySupport::Impossible(why) => {
                write!(f, "lazy moves are not possible on this node: {why}")
            }
        }
    }
}

/// The decision from what was observed: CRIU's userfaultfd check, the node's
/// `fs.pipe-max-size` and whether this process holds `CAP_SYS_RESOURCE`.
pub fn lazy_support(
    uffd_missing: Option<String>,
    pipe_max_size: Option<u64>,
    cap_sys_resource: bool,
) -> LazySupport {
    if let Some(why) = uffd_missing {
        return LazySupport::Impossible(format!(
            "CRIU cannot restore lazily (criu check --feature uffd-noncoop: {why})"
        ));
    }
    if cap_sys_resource {
        return LazySupport::Possible;
    }
    match pipe_max_size {
        Some(size) if size >= LAZY_PIPE_SIZE => LazySupport::Possible,
        Some(size) => LazySupport::Impossible(format!(
            "fs.pipe-max-size is {size} and CRIU lacks CAP_SYS_RESOURCE; its page server needs {LAZY_PIPE_SIZE} (sysctl -w fs.pipe-max-size={LAZY_PIPE_SIZE}; the chart's node preparation sets it)"
        )),
        None => LazySupport::Impossible("cannot read fs.pipe-max-size".into()),
    }
}

/// Whether `CapEff` (hex, from `/proc/<pid>/status`) holds `CAP_SYS_RESOURCE`.
pub fn has_cap_sys_resource(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Looks at this node: runs `criu check --feature uffd-noncoop` with `criu` from `PATH`.
pub fn probe() -> LazySupport {
    let uffd_missing = match Command::new("criu")
        .args(["check", "--feature", "uffd-noncoop"])
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run criu: {e}")),
    };
    let pipe_max_size = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let cap = std::fs::read_to_string("/proc/self/status")
        .map(|s| has_cap_sys_resource(&s))
        .unwrap_or(false);
    lazy_support(uffd_missing, pipe_max_size, cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_moves_need_userfaultfd_and_big_enough_pipes() {
        assert_eq!(
            lazy_support(None, Some(4 << 20), false),
            LazySupport::Possible
        );
        assert_eq!(
            lazy_support(None, Some(1 << 20), true),
            LazySupport::Possible
        );
        let small = lazy_support(None, Some(1 << 20), false);
        assert!(
            small.to_string().contains("fs.pipe-max-size is 1048576"),
            "{small}"
        );
        let no_uffd = lazy_support(Some("no".into()), Some(4 << 20), true);
        assert!(no_uffd.to_string().contains("uffd-noncoop"), "{no_uffd}");
    }

    #[test]
    fn cap_sys_resource_is_read_from_the_effective_set() {
        // These machines' root: everything but CAP_SYS_RESOURCE.
        assert!(!has_cap_sys_resource(
            "Name:\tx\nCapEff:\t000001fffeffffff\n"
        ));
        assert!(has_cap_sys_resource("CapEff:\t000001ffffffffff\n"));
        assert!(!has_cap_sys_resource("CapEff:\tzz\n"));
    }
}
