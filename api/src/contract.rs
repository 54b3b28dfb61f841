//! The contract between node daemons and the controller: the phase a daemon reports on a
//! target Pod (annotation [`crate::ANNOTATION_MIGRATION_PHASE`]). One type on both sides,
//! so a phase is never spelled twice.

use crate::v1alpha1::MigrationPhase;

/// Progress of one move as the node daemons see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DaemonPhase {
    /// The source is being frozen and dumped.
    Checkpointing,
    /// The images travel to the target node.
    Transferring,
    /// The target restores.
    Restoring,
    /// The target runs with the source's state.
    Restored,
    /// The move failed; the source resumes (see the report's error).
    Failed,
}

impl DaemonPhase {
    /// The annotation value.
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonPhase::Checkpointing => "Checkpointing",
            DaemonPhase::Transferring => "Transferring",
            DaemonPhase::Restoring => "Restoring",
            DaemonPhase::Restored => "Restored",
            DaemonPhase::Failed => "Failed",
        }
    }

    /// Parses an annotation value; `None` for anything else.
    pub fn parse(v: &str) -> Option<Self> {
        [
            DaemonPhase::Checkpointing,
            DaemonPhase::Transferring,
            DaemonPhase::Restoring,
            DaemonPhase::Restored,
            DaemonPhase::Failed,
        ]
        .into_iter()
        .find(|p| p.as_str() == v)
    }

    /// The Migration phase this daemon phase corresponds to (`Restored` is still
    /// `Restoring` until the target Pod is Ready).
    pub fn migration_phase(self) -> MigrationPhase {
        match self {
            DaemonPhase::Checkpointing => MigrationPhase::Checkpointing,
            DaemonPhase::Transferring => MigrationPhase::Transferring,
            DaemonPhase::Restoring | DaemonPhase::Restored => MigrationPhase::Restoring,
            DaemonPhase::Failed => MigrationPhase::Failed,
        }
    }

    /// True once the daemons will report nothing more.
    pub fn is_final(self) -> bool {
        matches!(self, DaemonPhase::Restored | DaemonPhase::Failed)
    }
}

impl std::fmt::Display for DaemonPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_map_to_migration_phases() {
        for p in [
            DaemonPhase::Checkpointing,
            DaemonPhase::Transferring,
            DaemonPhase::Restoring,
            DaemonPhase::Restored,
            DaemonPhase::Failed,
        ] {
            assert_eq!(DaemonPhase::parse(p.as_str()), Some(p));
        }
        assert_eq!(DaemonPhase::parse("restored"), None);
        assert_eq!(
            DaemonPhase::Restored.migration_phase(),
            MigrationPhase::Restoring
        );
        assert!(DaemonPhase::Failed.is_final() && !DaemonPhase::Restoring.is_final());
    }
}
