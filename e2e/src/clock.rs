//! Times as the Kubernetes API writes them (RFC 3339, UTC, whole seconds unless said), from
//! the one time library the workspace uses (jiff, as k8s-openapi re-exports it).

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// `t` as Kubernetes writes times in metadata and status fields.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Now, as Kubernetes writes it.
pub fn now() -> String {
    rfc3339(Timestamp::now())
}

/// `secs` seconds from now (negative: ago), as Kubernetes writes it.
pub fn from_now(secs: i64) -> String {
    rfc3339(Timestamp::now() + SignedDuration::from_secs(secs))
}

/// Now with microseconds (a Lease's `renewTime`, a `MicroTime`).
pub fn now_micros() -> String {
    Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// A time given in nanoseconds since the epoch (the CRI's), as Kubernetes writes it; empty
/// when out of range.
pub fn from_unix_nanos(ns: i64) -> String {
    Timestamp::from_second(ns / 1_000_000_000)
        .map(rfc3339)
        .unwrap_or_default()
}

/// Whole seconds since the RFC 3339 time `at` (`None` when it is not one).
pub fn seconds_since(at: &str) -> Option<i64> {
    let t: Timestamp = at.parse().ok()?;
    Some(Timestamp::now().duration_since(t).as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_kubernetes_writes_them() {
        assert_eq!(
            from_unix_nanos(1_700_000_000_123_000_000),
            "2023-11-14T22:13:20Z"
        );
        let t = now();
        assert!(t.ends_with('Z') && t.len() == 20, "{t}");
        assert!(now_micros().parse::<Timestamp>().is_ok());
        assert!(seconds_since(&from_now(-90)).is_some_and(|s| (89..=91).contains(&s)));
        assert_eq!(seconds_since("yesterday"), None);
    }
}
