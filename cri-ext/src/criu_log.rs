//! What CRIU's own logs say about its time: every line of a CRIU log starts with the
//! seconds since CRIU started, `(00.105456)`, so its largest stamp is how long CRIU itself
//! ran. Set against a phase's whole time, it shows what runc and podmig add around CRIU.

use std::path::Path;

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
    fn a_missing_log_has_no_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(elapsed_ms(&dir.path().join("dump.log")), None);
    }
}
