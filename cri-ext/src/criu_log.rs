//! What CRIU's own logs say about its time: every line of a CRIU log starts with the
//! seconds since CRIU started, `(00.105456)`, so its largest stamp is how long CRIU itself
//! ran. Set against a phase's whole time, it shows what runc and podmig add around CRIU.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

/// Copies the log of a failed CRIU run (`run`: dump, lazy-dump, preflight) of container
/// `id` into `dir` (root-only, created 0700; the copy 0600: a log names the process's
/// files and mappings) as `<unix seconds>-<run>-<id>.log`, so that a failure seen once
/// can be read after its checkpoint directory is gone. Returns the copy's path.
pub fn keep_failed(dir: &Path, log: &Path, run: &str, id: &str) -> Option<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = std::fs::read(log).ok()?;
    crate::engine::create_private_dir(dir).ok()?;
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("{secs}-{run}-{safe}.log"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .ok()?;
    std::io::Write::write_all(&mut f, &text).ok()?;
    Some(path)
}

/// Removes the kept logs in `dir` older than `max_age`; returns how many went.
pub fn sweep_failed(dir: &Path, max_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > max_age)
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// How long the CRIU run that wrote the log at `path` took, in ms; `None` when the log is
/// missing or holds no stamp.
pub fn elapsed_ms(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    largest_stamp_ms(&text)
}

/// The largest `(SS.micros)` stamp at the start of a line of `log`, in ms.
pub fn largest_stamp_ms(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|line| {
            let stamp = line.strip_prefix('(')?.split_once(')')?.0;
            let (secs, micros) = stamp.trim().split_once('.')?;
            let secs: u64 = secs.parse().ok()?;
            let micros: u64 = micros.parse().ok()?;
            Some(secs * 1000 + micros / 1000)
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_stamp_is_the_run_time_and_other_lines_are_skipped() {
        let log = "(00.000041) Version: 4.2.1\n\tRPC\n(00.090986) Running post-dump scripts\n\
                   (01.105456) Dumping finished successfully\n(00.2) short\nnot a stamp (9.9)\n";
        assert_eq!(largest_stamp_ms(log), Some(1105));
        assert_eq!(largest_stamp_ms("no stamps\n(abc) x\n"), None);
    }

    #[test]
    fn a_failed_runs_log_is_kept_root_only_and_swept_when_old() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.018) Error (criu/page-pipe.c:203): Can't allocate\n",
        )
        .expect("write");
        let kept_dir = dir.path().join("failed");
        let kept = keep_failed(&kept_dir, &log, "lazy-dump", "abc/../x").expect("kept");
        assert_eq!(kept.parent(), Some(kept_dir.as_path()));
        let name = kept
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(name.ends_with("-lazy-dump-abc____x.log"), "{name}");
        assert_eq!(
            std::fs::read_to_string(&kept).expect("read"),
            "(00.018) Error (criu/page-pipe.c:203): Can't allocate\n"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&kept), 0o600);
        assert_eq!(mode(&kept_dir), 0o700);
        // Young logs stay; with a zero age limit they go.
        assert_eq!(sweep_failed(&kept_dir, Duration::from_secs(3600)), 0);
        assert!(kept.exists());
        #[allow(clippy::disallowed_methods)] // a synchronous unit test
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(sweep_failed(&kept_dir, Duration::from_millis(1)), 1);
        assert!(!kept.exists());
        // No log, nothing kept.
        assert_eq!(
            keep_failed(&kept_dir, &dir.path().join("none"), "dump", "x"),
            None
        );
    }

    #[test]
    fn a_missing_log_has_no_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(elapsed_ms(&dir.path().join("dump.log")), None);
    }
}
