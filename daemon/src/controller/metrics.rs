//! The controller's Prometheus metrics (`podmig_controller_*`) and their HTTP endpoint.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

/// Labels of the reconcile counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `migratingpod` or `migration`.
    pub kind: String,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `migratingpod` or `migration`.
    pub kind: String,
    /// `Error::metric_label()`.
    pub reason: String,
}

/// Labels of the move counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Event reason of the end of a move (`MigrationSucceeded`, `MigrationGivenUp`, …).
    pub outcome: String,
}

/// The metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Reconciles run.
    pub reconciliations: Family<KindLabels, Counter>,
    /// Reconciles failed.
    pub failures: Family<FailureLabels, Counter>,
    /// Moves ended, by outcome.
    pub moves: Family<OutcomeLabels, Counter>,
    /// Times this replica stopped leading, by reason.
    pub leadership_lost: Family<ReasonLabels, Counter>,
}

/// Labels of the leadership counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `taken_over` or `renewal_failed`.
    pub reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("podmig_controller");
        let reconciliations = Family::<KindLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let moves = Family::<OutcomeLabels, Counter>::default();
        registry.register("reconciliations", "Reconciles run", reconciliations.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed",
            failures.clone(),
        );
        registry.register("moves", "Moves that ended, by outcome", moves.clone());
        let leadership_lost = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "leadership_lost",
            "Times this replica stopped leading, by reason",
            leadership_lost.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciliations,
            failures,
            moves,
            leadership_lost,
        }
    }
}

impl Metrics {
    /// Counts a loss of leadership.
    pub fn leadership_lost(&self, reason: &str) {
        self.leadership_lost
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped.
pub async fn serve(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

/// The Prometheus text exposition of `registry` (shared by the controller and the node
/// daemon); empty when it cannot be encoded.
pub fn render(registry: &Mutex<Registry>) -> String {
    let mut out = String::new();
    let registry = registry
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(error) = encode(&mut out, &registry) {
        tracing::warn!(%error, "cannot encode metrics");
        out.clear();
    }
    out
}
