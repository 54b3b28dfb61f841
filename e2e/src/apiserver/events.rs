//! The two faces of one Event: `events.k8s.io/v1` and core `v1`, mapped as the real API
//! server maps them (`note`↔`message`, `regarding`↔`involvedObject`, `series`,
//! `deprecated*`), so `kubectl get events`/`describe` show what controllers record.

use serde_json::{Value, json};

fn copy(from: &Value, to: &mut Value, pairs: &[(&str, &str)]) {
    for (a, b) in pairs {
        if !from[*a].is_null() {
            to[*b] = from[*a].clone();
        }
    }
}

/// Core `v1` view of an `events.k8s.io/v1` Event.
pub fn to_core(e: &Value) -> Value {
    let mut c = json!({"metadata": e["metadata"].clone()});
    copy(
        e,
        &mut c,
        &[
            ("note", "message"),
            ("regarding", "involvedObject"),
            ("related", "related"),
            ("reason", "reason"),
            ("type", "type"),
            ("action", "action"),
            ("eventTime", "eventTime"),
            ("reportingController", "reportingComponent"),
            ("reportingInstance", "reportingInstance"),
            ("deprecatedSource", "source"),
            ("deprecatedFirstTimestamp", "firstTimestamp"),
            ("deprecatedLastTimestamp", "lastTimestamp"),
            ("deprecatedCount", "count"),
        ],
    );
    if c["source"].is_null() && !e["reportingController"].is_null() {
        c["source"] = json!({"component": e["reportingController"]});
    }
    if !e["series"].is_null() {
        c["series"] = json!({"count": e["series"]["count"], "lastObservedTime": e["series"]["lastObservedTime"]});
        c["count"] = e["series"]["count"].clone();
        c["lastTimestamp"] = e["series"]["lastObservedTime"].clone();
    }
    let created = e["metadata"]["creationTimestamp"].clone();
    for f in ["firstTimestamp", "lastTimestamp"] {
        if c[f].is_null() {
            c[f] = if e["eventTime"].is_null() {
                created.clone()
            } else {
                e["eventTime"].clone()
            };
        }
    }
    if c["count"].is_null() {
        c["count"] = json!(1);
    }
    c
}

/// `events.k8s.io/v1` view of a core `v1` Event.
pub fn to_events_v1(c: &Value) -> Value {
    let mut e = json!({"metadata": c["metadata"].clone()});
    copy(
        c,
        &mut e,
        &[
            ("message", "note"),
            ("involvedObject", "regarding"),
            ("related", "related"),
            ("reason", "reason"),
            ("type", "type"),
            ("action", "action"),
            ("eventTime", "eventTime"),
            ("reportingComponent", "reportingController"),
            ("reportingInstance", "reportingInstance"),
            ("source", "deprecatedSource"),
            ("firstTimestamp", "deprecatedFirstTimestamp"),
            ("lastTimestamp", "deprecatedLastTimestamp"),
            ("count", "deprecatedCount"),
        ],
    );
    if !c["series"].is_null() {
        e["series"] = c["series"].clone();
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_map_both_ways() {
        let v1 = json!({"metadata": {"name": "e", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "note": "moved", "reason": "MigrationSucceeded", "type": "Normal",
            "regarding": {"kind": "Migration", "name": "m"}, "reportingController": "podmig-controller",
            "series": {"count": 3, "lastObservedTime": "2026-01-01T00:01:00Z"}});
        let core = to_core(&v1);
        assert_eq!(core["message"], "moved");
        assert_eq!(core["involvedObject"]["name"], "m");
        assert_eq!(core["count"], 3);
        assert_eq!(core["source"]["component"], "podmig-controller");
        assert_eq!(core["lastTimestamp"], "2026-01-01T00:01:00Z");
        let back = to_events_v1(&core);
        assert_eq!(back["note"], "moved");
        assert_eq!(back["regarding"]["kind"], "Migration");
    }
}
