//! The agent's Prometheus metrics and its /healthz, /readyz and /metrics server.
//!
//! Counters are plain values shared through `Arc<Metrics>`; the server only encodes them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `kind` of a received uevent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `wedge`, `ignored`, `malformed` or `foreign`.
    pub kind: String,
}

/// `method` and `result` of an attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// The method.
    pub method: String,
    /// `Started`, `Blocked`, `Succeeded`, `Failed`, `Refused` or `DryRun`.
    pub result: String,
}

/// `kind` of a start-up finding.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FindingLabel {
    /// `unbound-driver`, `survivability-mode`, `interrupted-attempt`.
    pub kind: String,
}

/// The `result` label values of `attempts_total`, as the agent reports them.
pub const ATTEMPT_RESULTS: [&str; 6] = [
    "Started",
    "Blocked",
    "Succeeded",
    "Failed",
    "Refused",
    "DryRun",
];

/// All agent metrics.
pub struct Metrics {
    registry: Registry,
    /// Uevents received, by kind.
    pub uevents_received: Family<KindLabel, Counter>,
    /// Receive-buffer overruns of the netlink socket.
    pub netlink_overruns: Counter,
    /// Times uevents were lost (each overrun): a human should look, see [`crate::startup`].
    pub uevents_lost: Counter,
    /// Wedges the API accepted (created or appended).
    pub wedges_reported: Counter,
    /// Detections waiting in the outbox.
    pub outbox_pending: Gauge,
    /// Outbox entries the API refused for good (or unparseable), moved to `outbox/rejected/`.
    pub outbox_rejected: Counter,
    /// Attempt results.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Times the fd gate held an attempt.
    pub fd_gate_blocked: Counter,
    /// Failed API requests.
    pub api_errors: Counter,
    /// What start-up reconciliation found.
    pub startup_findings: Family<FindingLabel, Counter>,
    /// Whether the agent is ready (listener bound).
    pub ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under the `unwedge_agent_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("unwedge_agent");
        let uevents_received = Family::<KindLabel, Counter>::default();
        let netlink_overruns = Counter::default();
        let uevents_lost = Counter::default();
        let outbox_rejected = Counter::default();
        let wedges_reported = Counter::default();
        let outbox_pending = Gauge::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        let fd_gate_blocked = Counter::default();
        let api_errors = Counter::default();
        let startup_findings = Family::<FindingLabel, Counter>::default();
        registry.register(
            "uevents_received",
            "Uevents received, by kind",
            uevents_received.clone(),
        );
        registry.register(
            "netlink_overruns",
            "Netlink receive-buffer overruns (ENOBUFS)",
            netlink_overruns.clone(),
        );
        registry.register(
            "uevents_lost",
            "Times uevents were lost (netlink ENOBUFS): a wedge of a GPU that stays bound may have gone unseen",
            uevents_lost.clone(),
        );
        registry.register(
            "outbox_rejected",
            "Outbox entries the API refused for good or that could not be parsed, moved to outbox/rejected/",
            outbox_rejected.clone(),
        );
        registry.register(
            "wedges_reported",
            "Wedges the API accepted",
            wedges_reported.clone(),
        );
        registry.register(
            "outbox_pending",
            "Detections waiting in the outbox",
            outbox_pending.clone(),
        );
        registry.register("attempts", "Attempt results by method", attempts.clone());
        registry.register(
            "fd_gate_blocked",
            "Times the fd gate held an attempt",
            fd_gate_blocked.clone(),
        );
        registry.register("api_errors", "Failed API requests", api_errors.clone());
        registry.register(
            "startup_findings",
            "What start-up reconciliation found",
            startup_findings.clone(),
        );
        let m = Self {
            registry,
            uevents_received,
            netlink_overruns,
            uevents_lost,
            wedges_reported,
            outbox_pending,
            outbox_rejected,
            attempts,
            fd_gate_blocked,
            api_errors,
            startup_findings,
            ready: AtomicBool::new(false),
        };
        m.preinitialise();
        m
    }

    /// Creates the label sets dashboards and alerts query, so each series exists at zero
    /// before its first event (prometheus-client prints nothing for an unused label set).
    fn preinitialise(&self) {
        for kind in ["wedge", "ignored", "malformed", "foreign"] {
            let _ = self
                .uevents_received
                .get_or_create(&KindLabel { kind: kind.into() });
        }
        for method in unwedge_crds::Method::AGENT_KNOWN {
            for result in ATTEMPT_RESULTS {
                let _ = self.attempts.get_or_create(&AttemptLabels {
                    method: method.to_string(),
                    result: result.into(),
                });
            }
        }
    }

    /// Counts a uevent of `kind`.
    pub fn uevent(&self, kind: &str) {
        self.uevents_received
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Counts an attempt result.
    pub fn attempt(&self, method: &str, result: &str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                method: method.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Counts a start-up finding.
    pub fn finding(&self, kind: &str) {
        self.startup_findings
            .get_or_create(&FindingLabel { kind: kind.into() })
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The HTTP routes: `/healthz` (alive), `/readyz` (listener bound), `/metrics`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                if m.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: uevent listener not bound yet",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
                    .into_response()
            }),
        )
        .with_state(metrics)
}

/// Serves `router` on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_every_metric() {
        let m = Metrics::new();
        m.uevent("wedge");
        m.attempt("rebind", "Succeeded");
        let text = m.encode();
        for name in [
            "unwedge_agent_uevents_received_total{kind=\"wedge\"} 1",
            "unwedge_agent_netlink_overruns_total",
            "unwedge_agent_wedges_reported_total",
            "unwedge_agent_outbox_pending",
            "unwedge_agent_attempts_total{method=\"rebind\",result=\"Succeeded\"} 1",
            "unwedge_agent_fd_gate_blocked_total",
            "unwedge_agent_api_errors_total",
            "unwedge_agent_uevents_lost_total 0",
            "unwedge_agent_outbox_rejected_total 0",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn dashboard_series_exist_at_zero() {
        let text = Metrics::new().encode();
        for kind in ["wedge", "ignored", "malformed", "foreign"] {
            let s = format!("unwedge_agent_uevents_received_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&s), "{s} missing from:\n{text}");
        }
        for method in ["none", "rebind", "bus-reset", "reboot"] {
            for result in ATTEMPT_RESULTS {
                let s = format!(
                    "unwedge_agent_attempts_total{{method=\"{method}\",result=\"{result}\"}} 0"
                );
                assert!(text.contains(&s), "{s} missing from:\n{text}");
            }
        }
    }
}
