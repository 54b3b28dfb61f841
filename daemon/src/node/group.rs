//! A Pod's move as one unit on the target side. The source freezes every container of
//! the Pod before it dumps any, and hands all checkpoints over at the first container's
//! create; each later create restores its own. The source learns one verdict, only when
//! every container is restored — and the first failure (or the deadline) undoes the
//! containers already restored, so the Pod runs either on the source or on the target,
//! never split between them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use podmig_api::v1alpha1::ContainerFigures;

/// One container restored so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Name in the Pod.
    pub name: String,
    /// Runtime id of the restored container (to stop it if the move fails).
    pub container_id: String,
    /// Restore time, ms.
    pub restore_ms: u64,
}

/// What to do after a container's restore was recorded, or the deadline checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Other containers are still to be restored.
    Waiting,
    /// Every container runs on the target: commit.
    Complete,
    /// The move failed: stop the restored containers, drop the images not restored.
    Failed {
        /// Why.
        reason: String,
        /// Runtime ids of the containers restored before the failure.
        stop: Vec<String>,
        /// Image directories that will not be restored.
        drop: Vec<PathBuf>,
    },
}

/// The containers of one move on the target.
#[derive(Debug)]
pub struct TargetGroup {
    /// Id of the move.
    pub migration: String,
    /// When the group gives up waiting for creates.
    pub deadline: Instant,
    waiting: BTreeMap<String, PathBuf>,
    bytes: BTreeMap<String, u64>,
    restored: Vec<Restored>,
    failed: Option<String>,
}

impl TargetGroup {
    /// A group of the checkpoints `dirs` (container name, images), each `bytes` large.
    pub fn new(migration: &str, dirs: Vec<(String, PathBuf, u64)>, deadline: Instant) -> Self {
        Self {
            migration: migration.to_owned(),
            deadline,
            bytes: dirs.iter().map(|(n, _, b)| (n.clone(), *b)).collect(),
            waiting: dirs.into_iter().map(|(n, d, _)| (n, d)).collect(),
            restored: Vec::new(),
            failed: None,
        }
    }

    /// The names of its containers.
    pub fn containers(&self) -> Vec<&str> {
        self.bytes.keys().map(String::as_str).collect()
    }

    /// Why the group failed, once it did: later creates are refused with it.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// The images of container `name`, taken for its restore.
    pub fn take(&mut self, name: &str) -> Option<PathBuf> {
        self.waiting.remove(name)
    }

    /// Records the outcome of container `name`'s restore.
    pub fn record(
        &mut self,
        name: &str,
        container_id: &str,
        ok: bool,
        error: &str,
        restore_ms: u64,
    ) -> Step {
        if self.failed.is_some() {
            // A straggler of a failed group: it must not run either.
            return Step::Failed {
                reason: self.failed.clone().unwrap_or_default(),
                stop: if ok {
                    vec![container_id.to_owned()]
                } else {
                    vec![]
                },
                drop: vec![],
            };
        }
        if ok {
            self.restored.push(Restored {
                name: name.to_owned(),
                container_id: container_id.to_owned(),
                restore_ms,
            });
            return if self.waiting.is_empty() {
                Step::Complete
            } else {
                Step::Waiting
            };
        }
        self.fail(format!("restore of container {name:?}: {error}"))
    }

    /// Fails the group if containers are still waiting at `now` past the deadline.
    pub fn expire(&mut self, now: Instant) -> Option<Step> {
        if self.failed.is_some() || self.waiting.is_empty() || now < self.deadline {
            return None;
        }
        let names: Vec<&String> = self.waiting.keys().collect();
        Some(self.fail(format!(
            "containers {names:?} were not created before the move's deadline"
        )))
    }

    /// Marks a group whose restored containers were stopped for `reason` as failed.
    pub fn abandon(&mut self, reason: &str) {
        self.restored.clear();
        self.waiting.clear();
        self.failed = Some(reason.to_owned());
    }

    fn fail(&mut self, reason: String) -> Step {
        self.failed = Some(reason.clone());
        Step::Failed {
            reason,
            stop: self.restored.drain(..).map(|r| r.container_id).collect(),
            drop: std::mem::take(&mut self.waiting).into_values().collect(),
        }
    }

    /// Per-container figures of the restored containers.
    pub fn figures(&self) -> Vec<ContainerFigures> {
        self.restored
            .iter()
            .map(|r| ContainerFigures {
                name: r.name.clone(),
                bytes: self.bytes.get(&r.name).copied().unwrap_or_default(),
                restore_ms: r.restore_ms,
            })
            .collect()
    }

    /// Restore time of all containers, ms (they are restored one after the other).
    pub fn restore_ms(&self) -> u64 {
        self.restored.iter().map(|r| r.restore_ms).sum()
    }

    /// Runtime ids of the restored containers.
    pub fn restored_ids(&self) -> Vec<String> {
        self.restored
            .iter()
            .map(|r| r.container_id.clone())
            .collect()
    }

    /// How long until the deadline (zero once passed).
    pub fn left(&self, now: Instant) -> Duration {
        self.deadline.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> TargetGroup {
        TargetGroup::new(
            "m1",
            vec![
                ("app".into(), "/ck/app".into(), 100),
                ("sidecar".into(), "/ck/sidecar".into(), 20),
            ],
            Instant::now() + Duration::from_secs(60),
        )
    }

    #[test]
    fn the_move_commits_only_when_every_container_is_restored() {
        let mut g = group();
        assert_eq!(g.take("app"), Some(PathBuf::from("/ck/app")));
        assert_eq!(g.record("app", "c1", true, "", 30), Step::Waiting);
        assert_eq!(g.take("sidecar"), Some(PathBuf::from("/ck/sidecar")));
        assert_eq!(g.record("sidecar", "c2", true, "", 10), Step::Complete);
        assert_eq!(g.restore_ms(), 40);
        let f = g.figures();
        assert_eq!((f[0].name.as_str(), f[0].bytes), ("app", 100));
        assert_eq!((f[1].name.as_str(), f[1].restore_ms), ("sidecar", 10));
    }

    #[test]
    fn one_failure_stops_the_restored_and_drops_the_waiting() {
        let mut g = TargetGroup::new(
            "m1",
            vec![
                ("a".into(), "/ck/a".into(), 1),
                ("b".into(), "/ck/b".into(), 1),
                ("c".into(), "/ck/c".into(), 1),
            ],
            Instant::now() + Duration::from_secs(60),
        );
        g.take("a");
        assert_eq!(g.record("a", "ca", true, "", 1), Step::Waiting);
        g.take("b");
        match g.record("b", "cb", false, "CRIU said no", 1) {
            Step::Failed { reason, stop, drop } => {
                assert!(reason.contains("\"b\"") && reason.contains("CRIU said no"));
                assert_eq!(stop, vec!["ca".to_owned()]);
                assert_eq!(drop, vec![PathBuf::from("/ck/c")]);
            }
            other => panic!("{other:?}"),
        }
        assert!(g.failure().is_some(), "later creates are refused");
        // A straggler restored after the failure is stopped too.
        match g.record("c", "cc", true, "", 1) {
            Step::Failed { stop, .. } => assert_eq!(stop, vec!["cc".to_owned()]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_deadline_fails_a_group_still_waiting() {
        let mut g = group();
        g.take("app");
        g.record("app", "c1", true, "", 1);
        assert_eq!(g.expire(Instant::now()), None);
        match g.expire(Instant::now() + Duration::from_secs(61)) {
            Some(Step::Failed { stop, drop, reason }) => {
                assert_eq!(stop, vec!["c1".to_owned()]);
                assert_eq!(drop, vec![PathBuf::from("/ck/sidecar")]);
                assert!(reason.contains("sidecar"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(g.expire(Instant::now() + Duration::from_secs(99)), None);
    }
}
