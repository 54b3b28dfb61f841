//! One move as this node plays it ([`Move`]): the single record a Pod worker keeps for a
//! move from its claim to its end. Each step goes through [`Move::advance`] and the end
//! through [`Move::finish`], which write together what every observer reads: the journal
//! (what a restarted daemon finds), the manager's record (`GET /migrations`), the Pod's
//! reported phase (the controller's view) and the metrics — so that no step can update
//! one of them and forget another.

use std::time::Duration;

use podmig_api::{
    contract::DaemonPhase,
    nodeapi::{MoveInfo, MovePhase, MoveRole},
    v1alpha1::MigrationReport,
};

use podmig_cri_ext::{engine::CheckpointEngine, proto::hook::v1::ContainerIdentity};

use super::{
    journal::{Entry, Side, Step},
    migration::Busy,
    shared::Node,
};

/// The Pod a move reports its phase on (the target Pod, on either side).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportTo {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pod: String,
}

impl ReportTo {
    /// The Pod of a container the runtime is creating.
    pub fn pod_of(c: &ContainerIdentity) -> Self {
        Self {
            namespace: c.pod_namespace.clone(),
            pod: c.pod_name.clone(),
        }
    }
}

/// One move on this node: its identity, its journal entries (one per container) and where
/// it stands.
#[derive(Debug)]
pub struct Move {
    id: String,
    role: MoveRole,
    report_to: ReportTo,
    entries: Vec<Entry>,
    phase: MovePhase,
}

/// Where a journal step puts the move in `GET /migrations`.
pub fn listed_phase(step: Step) -> MovePhase {
    match step {
        Step::Claimed | Step::Receiving => MovePhase::Checkpointing,
        Step::Dumped | Step::Committed => MovePhase::Transferring,
        Step::MovedAway => MovePhase::Succeeded,
        Step::Restoring => MovePhase::Restoring,
        Step::Paging => MovePhase::Paging,
    }
}

/// The phase a target reports on its Pod when it begins `step` (none: not a reported one).
pub fn reported_phase(step: Step) -> Option<DaemonPhase> {
    match step {
        Step::Receiving => Some(DaemonPhase::Checkpointing),
        Step::Restoring => Some(DaemonPhase::Restoring),
        Step::Claimed | Step::Dumped | Step::Committed | Step::Paging | Step::MovedAway => None,
    }
}

impl Move {
    /// Registers move `info.id` with the manager (refused when the Pod has another one in
    /// flight), journals `entries` at their step before anything changes the world, and
    /// reports that step.
    pub fn begin<E: CheckpointEngine>(
        node: &Node<E>,
        role: MoveRole,
        info: MoveInfo,
        report_to: ReportTo,
        entries: Vec<Entry>,
    ) -> Result<Self, Busy> {
        let id = info.id.clone();
        node.manager.begin(role, info)?;
        Ok(Self::rejoin(node, role, &id, report_to, entries))
    }

    /// A move of this id already registered (a target's create asked again): keeps its
    /// record and journals `entries`.
    pub fn rejoin<E: CheckpointEngine>(
        node: &Node<E>,
        role: MoveRole,
        id: &str,
        report_to: ReportTo,
        entries: Vec<Entry>,
    ) -> Self {
        let mut mv = Self {
            id: id.to_owned(),
            role,
            report_to,
            entries: Vec::new(),
            phase: MovePhase::Checkpointing,
        };
        let step = entries.first().map(|e| e.step);
        for e in entries {
            mv.journal(node, e);
        }
        if let Some(step) = step {
            mv.show(node, step);
        }
        mv
    }

    /// The move's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Journals one more container of the move.
    pub fn journal<E: CheckpointEngine>(&mut self, node: &Node<E>, entry: Entry) {
        node.journal.record(&entry);
        self.entries.push(entry);
    }

    /// Begins `step`: every container's journal entry, the listed phase and (target side)
    /// the Pod's reported phase.
    pub fn advance<E: CheckpointEngine>(&mut self, node: &Node<E>, step: Step) {
        for e in &mut self.entries {
            node.journal.advance(e, step);
        }
        self.show(node, step);
    }

    /// Sets the figures the manager lists for the move.
    pub fn figures<E: CheckpointEngine>(
        &self,
        node: &Node<E>,
        f: impl FnOnce(&mut MigrationReport),
    ) {
        node.manager
            .update(self.role, &self.id, |i| f(&mut i.report));
    }

    /// Marks the target lazy in its journal entries (a restart must not resume the source).
    pub fn set_lazy(&mut self, lazy: bool) {
        for e in &mut self.entries {
            e.lazy = lazy;
        }
    }

    /// Whether the move's deadline passed (from its journal).
    pub fn expired(&self) -> bool {
        self.entries.iter().any(Entry::expired)
    }

    /// Target side, restored: records `Restored` on the target Pod, where its source reads
    /// it at its deadline when the verdict does not reach it. True only when the write
    /// landed at least `margin` before the deadline, so that a source reading at the
    /// deadline sees it (the API server's reads follow its writes).
    pub fn record_restored<E: CheckpointEngine>(&self, node: &Node<E>, margin: Duration) -> bool {
        let Some(deadline) = self.entries.iter().map(|e| e.deadline_unix_ms).min() else {
            return false;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let Some(left) = deadline
            .checked_sub(now_ms)
            .map(Duration::from_millis)
            .and_then(|l| l.checked_sub(margin))
            .filter(|l| !l.is_zero())
        else {
            return false;
        };
        node.report_restored_by(
            &self.report_to.namespace,
            &self.report_to.pod,
            std::time::Instant::now() + left,
        )
    }

    /// Ends the move with `outcome` (and `error`): files its record with the figures it
    /// has, counts it, then forgets its journal entries.
    pub fn finish<E: CheckpointEngine>(
        self,
        node: &Node<E>,
        outcome: MovePhase,
        error: Option<String>,
    ) {
        self.file(node, outcome, error);
        self.forget(node);
    }

    /// Files the move's record and counts it.
    fn file<E: CheckpointEngine>(&self, node: &Node<E>, outcome: MovePhase, error: Option<String>) {
        node.manager.finish(self.role, &self.id, outcome, error);
        node.metrics.moved(self.role, outcome);
    }

    /// Ends the move with `outcome` and its final figures `report` (its error with them):
    /// files and counts it, reports it on the target Pod, then forgets its journal entries.
    pub fn finish_reported<E: CheckpointEngine>(
        self,
        node: &Node<E>,
        outcome: MovePhase,
        report: &MigrationReport,
    ) {
        node.manager
            .update(self.role, &self.id, |i| i.report = report.clone());
        node.report_done(&self.report_to.namespace, &self.report_to.pod, report);
        self.finish(node, outcome, report.error.clone());
    }

    /// Ends a source's move whose target runs (with `outcome`: a lazy move's pages may
    /// still have failed): files and counts it, and keeps its journal entries at
    /// [`Step::MovedAway`] until the Pod leaves the node.
    pub fn finish_moved_away<E: CheckpointEngine>(
        mut self,
        node: &Node<E>,
        outcome: MovePhase,
        error: Option<String>,
    ) {
        self.file(node, outcome, error);
        for mut e in self.entries.drain(..) {
            node.journal.advance(&mut e, Step::MovedAway);
        }
    }

    /// Forgets the journal entries of a move that ends without a record of its own.
    pub fn forget<E: CheckpointEngine>(mut self, node: &Node<E>) {
        for e in self.entries.drain(..) {
            node.journal.remove(&e);
        }
    }

    fn show<E: CheckpointEngine>(&mut self, node: &Node<E>, step: Step) {
        let phase = listed_phase(step);
        if phase != self.phase {
            self.phase = phase;
            node.manager
                .update(self.role, &self.id, |i| i.state = phase);
        }
        if self.role == MoveRole::Target
            && let Some(p) = reported_phase(step)
        {
            node.report_phase(&self.report_to.namespace, &self.report_to.pod, p);
        }
    }
}

/// The journal entry of container `container` of a move.
#[derive(Debug, Clone)]
pub struct EntryFor<'a> {
    /// The move.
    pub migration: &'a str,
    /// This node's side.
    pub side: Side,
    /// This node's Pod.
    pub pod_uid: &'a str,
    /// The other node.
    pub peer_node: &'a str,
    /// The target Pod.
    pub target: &'a ReportTo,
    /// The move's deadline, ms since the epoch.
    pub deadline_unix_ms: u64,
}

impl EntryFor<'_> {
    /// The entry of one container (`container_id`: the source's runc id, or empty), its
    /// images in `images`, at `step`.
    pub fn entry(
        &self,
        container: &str,
        container_id: &str,
        images: std::path::PathBuf,
        step: Step,
    ) -> Entry {
        Entry {
            migration: self.migration.to_owned(),
            side: self.side,
            pod_uid: self.pod_uid.to_owned(),
            container: container.to_owned(),
            container_id: container_id.to_owned(),
            images,
            target_namespace: self.target.namespace.clone(),
            target_pod: self.target.pod.clone(),
            peer_node: self.peer_node.to_owned(),
            deadline_unix_ms: self.deadline_unix_ms,
            step,
            lazy: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_journal_step_has_one_listed_phase_and_targets_report_theirs() {
        assert_eq!(listed_phase(Step::Claimed), MovePhase::Checkpointing);
        assert_eq!(listed_phase(Step::Receiving), MovePhase::Checkpointing);
        assert_eq!(listed_phase(Step::Dumped), MovePhase::Transferring);
        assert_eq!(listed_phase(Step::Restoring), MovePhase::Restoring);
        assert_eq!(listed_phase(Step::Paging), MovePhase::Paging);
        assert_eq!(
            reported_phase(Step::Receiving),
            Some(DaemonPhase::Checkpointing)
        );
        assert_eq!(
            reported_phase(Step::Restoring),
            Some(DaemonPhase::Restoring)
        );
        assert_eq!(reported_phase(Step::Dumped), None);
    }
}
