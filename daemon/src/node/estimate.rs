//! `strategy: auto`: the source estimates how long a full move would keep the Pod frozen
//! and chooses `full` when that fits the move's downtime budget (`maxDowntimeMs`), `lazy`
//! when it does not and lazy is possible, else `full` with the overrun said out loud.
//!
//! The estimate is `fixed + bytes / stream rate + bytes / restore rate`: with streamed
//! pages the dump runs at the link's pace, then the target restores. The rates are learned
//! per target node from this node's earlier full moves there (an exponentially weighted
//! average, so one slow move does not swing the next choice); before the first move to a
//! node the defaults below apply — measured on the 2-core development machines, so a
//! faster cluster only errs towards `lazy` until its first move teaches the real rates.

use std::{collections::HashMap, sync::Mutex};

use podmig_api::v1alpha1::Strategy;

/// What a full move to one target node costs, as learned from earlier moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Dump with the pages streamed to the target, MB/s.
    pub stream_mb_s: f64,
    /// Restore on the target, MB/s.
    pub restore_mb_s: f64,
    /// What a move costs whatever its size (freezing, runc on both sides, hand-over), ms.
    pub fixed_ms: f64,
}

impl Default for Rates {
    fn default() -> Self {
        // `make bench` on the development machines (release build, 2 cores shared by
        // both nodes): streamed dump ~370 MB/s, restore ~830 MB/s, a 0 MiB move ~400 ms.
        Self {
            stream_mb_s: 300.0,
            restore_mb_s: 700.0,
            fixed_ms: 400.0,
        }
    }
}

impl Rates {
    /// Frozen time of a full move of `bytes`, ms.
    pub fn full_frozen_ms(&self, bytes: u64) -> u64 {
        let mb = bytes as f64 / 1e6;
        (self.fixed_ms + mb / self.stream_mb_s * 1e3 + mb / self.restore_mb_s * 1e3).round() as u64
    }
}

/// The choice `auto` made, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// `full` or `lazy`.
    pub strategy: Strategy,
    /// The full move's estimated frozen time, ms.
    pub estimate_ms: u64,
    /// The budget it was held against, ms.
    pub budget_ms: u32,
    /// In words, for the Event and the logs.
    pub reason: String,
}

impl Choice {
    /// True when the move is expected to exceed its budget (full, lazy impossible).
    pub fn over_budget(&self) -> bool {
        self.strategy == Strategy::Full && self.estimate_ms > u64::from(self.budget_ms)
    }
}

/// Chooses the strategy of an `auto` move from the full move's estimate, the budget and
/// why a lazy move is impossible, if it is.
pub fn choose(estimate_ms: u64, budget_ms: u32, lazy_impossible: Option<&str>) -> Choice {
    let budget = u64::from(budget_ms);
    let (strategy, reason) = if estimate_ms <= budget {
        (
            Strategy::Full,
            format!(
                "a full move is estimated at {estimate_ms} ms frozen, within maxDowntimeMs {budget_ms}"
            ),
        )
    } else {
        match lazy_impossible {
            None => (
                Strategy::Lazy,
                format!(
                    "a full move is estimated at {estimate_ms} ms frozen, over maxDowntimeMs \
                     {budget_ms}: moving lazily (memory follows after the resume)"
                ),
            ),
            Some(why) => (
                Strategy::Full,
                format!(
                    "a full move is estimated at {estimate_ms} ms frozen, {} ms over \
                     maxDowntimeMs {budget_ms}, and a lazy move is not possible ({why}): \
                     moving in full anyway",
                    estimate_ms - budget
                ),
            ),
        }
    };
    Choice {
        strategy,
        estimate_ms,
        budget_ms,
        reason,
    }
}

/// Weight of the newest move in the learned rates.
const LEARN_WEIGHT: f64 = 0.5;

/// Rates per target node, learned from this node's full moves.
#[derive(Debug, Default)]
pub struct Learned {
    by_node: Mutex<HashMap<String, Rates>>,
}

impl Learned {
    /// The rates towards `node` (the defaults before any move there).
    pub fn rates(&self, node: &str) -> Rates {
        self.lock().get(node).copied().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Rates>> {
        self.by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a move to `node` or a probe of its link taught anything yet.
    pub fn knows(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    /// Starts the rates towards `node` from a probe of the link (MB/s): pages cannot
    /// stream faster than the link carries them; a faster link leaves the default, which
    /// is the dump's own pace. Returns the rates now held.
    pub fn seed_from_link(&self, node: &str, link_mb_s: f64) -> Rates {
        let mut all = self.lock();
        let r = all.entry(node.to_owned()).or_default();
        if link_mb_s > 0.0 {
            r.stream_mb_s = r.stream_mb_s.min(link_mb_s);
        }
        *r
    }

    /// Learns from a full move of `bytes` to `node` whose streamed dump took `dump_ms`
    /// and whose restore took `restore_ms`, frozen `frozen_ms` in all. Moves too small to
    /// say anything about a rate (under 32 MB) only teach the fixed cost.
    pub fn learn(&self, node: &str, bytes: u64, dump_ms: u64, restore_ms: u64, frozen_ms: u64) {
        let mut all = self.lock();
        let r = all.entry(node.to_owned()).or_default();
        let mix = |old: f64, new: f64| old * (1.0 - LEARN_WEIGHT) + new * LEARN_WEIGHT;
        let mb = bytes as f64 / 1e6;
        if mb >= 32.0 && dump_ms > 0 && restore_ms > 0 {
            let stream = mb / (dump_ms as f64 / 1e3);
            let restore = mb / (restore_ms as f64 / 1e3);
            r.stream_mb_s = mix(r.stream_mb_s, stream);
            r.restore_mb_s = mix(r.restore_mb_s, restore);
            let rest = frozen_ms as f64 - mb / stream * 1e3 - mb / restore * 1e3;
            r.fixed_ms = mix(r.fixed_ms, rest.max(0.0));
        } else if frozen_ms > 0 {
            r.fixed_ms = mix(r.fixed_ms, frozen_ms as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_pod_moves_in_full_and_a_big_one_lazily() {
        let rates = Rates::default();
        let small = rates.full_frozen_ms(16 << 20);
        let big = rates.full_frozen_ms(2 << 30);
        assert!(small < 1000 && big > 1000, "{small} {big}");
        let c = choose(small, 1000, None);
        assert_eq!(c.strategy, Strategy::Full);
        assert!(!c.over_budget());
        let c = choose(big, 1000, None);
        assert_eq!(c.strategy, Strategy::Lazy);
        assert!(c.reason.contains("over maxDowntimeMs 1000"), "{}", c.reason);
    }

    #[test]
    fn without_lazy_the_overrun_is_said() {
        let c = choose(2500, 1000, Some("two containers"));
        assert_eq!(c.strategy, Strategy::Full);
        assert!(c.over_budget());
        assert!(
            c.reason.contains("1500 ms over") && c.reason.contains("two containers"),
            "{}",
            c.reason
        );
    }

    #[test]
    fn a_probed_slow_link_slows_the_estimate_and_a_fast_one_leaves_the_default() {
        let learned = Learned::default();
        assert!(!learned.knows("slow"));
        // 1 Gbit/s: ~117 MB/s.
        let slow = learned.seed_from_link("slow", 117.0);
        assert!(learned.knows("slow"));
        assert_eq!(slow.stream_mb_s, 117.0);
        let gib = 1 << 30;
        assert!(slow.full_frozen_ms(gib) > Rates::default().full_frozen_ms(gib) + 5000);
        let fast = learned.seed_from_link("fast", 5000.0);
        assert_eq!(fast, Rates::default());
        // A later move teaches from the seeded rates on.
        learned.learn("slow", 1_000_000_000, 10_000, 1000, 11_500);
        assert!(learned.rates("slow").stream_mb_s < 117.0);
    }

    #[test]
    fn rates_are_learned_per_node_and_smoothed() {
        let learned = Learned::default();
        assert_eq!(learned.rates("node-1"), Rates::default());
        // 1000 MB: dump 1 s (1000 MB/s), restore 0.5 s (2000 MB/s), frozen 1.6 s.
        learned.learn("node-1", 1_000_000_000, 1000, 500, 1600);
        let r = learned.rates("node-1");
        assert!((r.stream_mb_s - 650.0).abs() < 1e-6, "{r:?}");
        assert!((r.restore_mb_s - 1350.0).abs() < 1e-6, "{r:?}");
        assert!((r.fixed_ms - 250.0).abs() < 1e-6, "{r:?}");
        assert_eq!(learned.rates("node-2"), Rates::default(), "per node");
        // A tiny move teaches only the fixed cost.
        learned.learn("node-1", 1_000, 10, 10, 450);
        let r2 = learned.rates("node-1");
        assert_eq!(r2.stream_mb_s, r.stream_mb_s);
        assert!((r2.fixed_ms - 350.0).abs() < 1e-6, "{r2:?}");
    }
}
