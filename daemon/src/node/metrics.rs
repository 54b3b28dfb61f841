//! The node daemon's Prometheus metrics (`podmig_*`), served on `GET /metrics`.

use std::sync::Mutex;

use podmig_api::nodeapi::{MovePhase, MoveRole};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of the move counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    /// `source` or `target`.
    pub role: String,
    /// `succeeded`, `failed` or `rolled_back`.
    pub outcome: String,
}

/// Labels of the phase histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// `checkpoint`, `transfer` or `restore`.
    pub phase: String,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    [
        0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Moves ended, by role and outcome.
    pub migrations: Family<MoveLabels, Counter>,
    /// Frozen time of moves this node restored.
    pub frozen: Histogram,
    /// Duration of each phase.
    pub phases: Family<PhaseLabels, Histogram>,
    /// Bytes of checkpoint images this node wrote.
    pub checkpoint_bytes: Counter,
    /// Kills of containers currently held.
    pub held_kills: Gauge,
    /// Bytes of checkpoint images on this node now.
    pub bytes_held: Gauge,
    /// 1 when lazy (post-copy) moves are possible on this node.
    pub lazy_possible: Gauge,
    /// Sources frozen past their deadline because their target's outcome cannot be known.
    pub awaiting_verdict: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("podmig");
        let migrations = Family::<MoveLabels, Counter>::default();
        let frozen = Histogram::new(seconds_buckets());
        let phases = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(seconds_buckets())
        });
        let checkpoint_bytes = Counter::default();
        let held_kills = Gauge::default();
        let bytes_held = Gauge::default();
        let lazy_possible = Gauge::default();
        let awaiting_verdict = Gauge::default();
        registry.register(
            "moves_awaiting_verdict",
            "Sources frozen past their deadline: neither the target nor the API server can say whether the target runs",
            awaiting_verdict.clone(),
        );
        registry.register(
            "lazy_moves_possible",
            "1 when CRIU can restore lazily and serve pages on this node (userfaultfd, pipe size)",
            lazy_possible.clone(),
        );
        registry.register(
            "migrations",
            "Moves that ended, by role and outcome",
            migrations.clone(),
        );
        registry.register(
            "migration_frozen_seconds",
            "From the freeze of the source to the resume of the target",
            frozen.clone(),
        );
        registry.register(
            "migration_phase_seconds",
            "Duration of the phases of a move",
            phases.clone(),
        );
        registry.register(
            "checkpoint_bytes",
            "Bytes of checkpoint images written on this node",
            checkpoint_bytes.clone(),
        );
        registry.register(
            "held_kills",
            "Kills of containers held until their checkpoint is taken",
            held_kills.clone(),
        );
        registry.register(
            "checkpoint_bytes_held",
            "Bytes of checkpoint images held on this node now",
            bytes_held.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            migrations,
            frozen,
            phases,
            checkpoint_bytes,
            held_kills,
            bytes_held,
            lazy_possible,
            awaiting_verdict,
        }
    }
}

impl Metrics {
    /// Counts a move that ended.
    pub fn moved(&self, role: MoveRole, outcome: MovePhase) {
        self.migrations
            .get_or_create(&MoveLabels {
                role: role.as_str().into(),
                outcome: outcome.outcome_label().into(),
            })
            .inc();
    }

    /// Records the duration of a phase, in milliseconds.
    pub fn phase_ms(&self, phase: &str, ms: u64) {
        self.phases
            .get_or_create(&PhaseLabels {
                phase: phase.into(),
            })
            .observe(ms as f64 / 1000.0);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        crate::controller::metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_and_held_kills_are_exposed() {
        let m = Metrics::default();
        m.moved(MoveRole::Source, MovePhase::Succeeded);
        m.held_kills.inc();
        m.frozen.observe(0.3);
        m.phase_ms("checkpoint", 120);
        let text = m.render();
        for needle in [
            "podmig_migrations_total{role=\"source\",outcome=\"succeeded\"} 1",
            "podmig_held_kills 1",
            "podmig_migration_frozen_seconds_count 1",
            "podmig_migration_phase_seconds_count{phase=\"checkpoint\"} 1",
            "podmig_checkpoint_bytes_total 0",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
    }
}
