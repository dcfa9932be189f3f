//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `{driver, method}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverMethod {
    /// Kernel driver.
    pub driver: String,
    /// First method the kernel listed.
    pub method: String,
}

/// `{method, result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodResult {
    /// Method (or `none`).
    pub method: String,
    /// `recovered` or `abandoned`.
    pub result: String,
}

/// `{phase}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Phase name.
    pub phase: String,
}

/// `{wedge, node, device, driver, phase, policy}`: one open GpuWedge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct WedgeInfo {
    /// GpuWedge name.
    pub wedge: String,
    /// `spec.nodeName`.
    pub node: String,
    /// PCI address of the wedged device.
    pub device: String,
    /// Kernel driver bound when the wedge was seen (empty when none was).
    pub driver: String,
    /// Phase, as `unwedge_wedges_by_phase` names it.
    pub phase: String,
    /// `status.policy`: the governing RecoveryPolicy, empty until the operator resolved one.
    pub policy: String,
}

/// The `unwedge_wedge_info` label sets of `wedges`: one per wedge whose incident is open
/// (every phase but Recovered and Abandoned), so the family's size is the number of open
/// incidents, not of wedges ever seen.
pub fn wedge_info_labels<'a>(
    wedges: impl IntoIterator<Item = &'a unwedge_crds::GpuWedge>,
) -> BTreeSet<WedgeInfo> {
    wedges
        .into_iter()
        .filter_map(|w| {
            let status = w.status.as_ref();
            let phase = status.and_then(|s| s.phase).unwrap_or_default();
            if phase.is_terminal() {
                return None;
            }
            Some(WedgeInfo {
                wedge: w.metadata.name.clone().unwrap_or_default(),
                node: w.spec.node_name.clone(),
                device: w.spec.device.pci_address.clone(),
                driver: w.spec.device.driver.clone(),
                phase: format!("{phase:?}"),
                policy: status.and_then(|s| s.policy.clone()).unwrap_or_default(),
            })
        })
        .collect()
}

/// `{policy, unit}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyUnit {
    /// Policy.
    pub policy: String,
    /// `node`, `reboot`, `device`, `none`.
    pub unit: String,
}

/// `{policy}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    /// Policy.
    pub policy: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// unwedge_wedges_total{driver,method}
    pub wedges: Family<DriverMethod, Counter>,
    /// unwedge_recovery_duration_seconds{method,result}
    pub recovery_duration: Family<MethodResult, Histogram>,
    /// unwedge_wedges_by_phase{phase}
    pub by_phase: Family<PhaseLabel, Gauge>,
    /// unwedge_wedge_info{wedge,node,device,driver,phase,policy}: 1 for every GpuWedge whose
    /// incident is open (not Recovered or Abandoned); a finished wedge's series is removed, so
    /// the family holds one series per open incident. Set with [`Metrics::set_open_wedges`]
    /// where `unwedge_wedges_by_phase` is refreshed, from the same cache, on every replica.
    pub wedge_info: Family<WedgeInfo, Gauge>,
    /// unwedge_budget_in_use{policy,unit}
    pub budget_in_use: Family<PolicyUnit, Gauge>,
    /// unwedge_budget_allowed{policy,unit}
    pub budget_allowed: Family<PolicyUnit, Gauge>,
    /// unwedge_queue_length{policy}
    pub queue_length: Family<PolicyLabel, Gauge>,
    /// unwedge_evictions_total{result}
    pub evictions: Family<EvictionResult, Counter>,
    /// unwedge_attempt_failures_total{method}
    pub attempt_failures: Family<MethodLabel, Counter>,
    /// unwedge_circuit_breaker_tripped{policy}
    pub breaker: Family<PolicyLabel, Gauge>,
    /// unwedge_leader
    pub leader: Gauge,
    /// unwedge_deleted_wedges_released_total: GpuWedges deleted while the operator held
    /// something for them, whose places (ledger, cordon, DeviceTaintRule) it released.
    pub deleted_released: Counter,
    /// unwedge_ledger_repairs_total: ledger entries dropped because their wedge was gone.
    pub ledger_repairs: Counter,
    /// unwedge_default_policy_applied: 1 once this replica applied the chart's default
    /// RecoveryPolicy, 0 while it has not (or admission refused it).
    pub default_policy_applied: Gauge,
    /// unwedge_operator_api_requests_total{verb,resource}: every request this replica sent
    /// to the API server ([`crate::api_calls`]).
    pub api_requests: Family<crate::api_calls::Call, Counter>,
    registry: Registry,
    ready: AtomicBool,
    default_policy_pending: AtomicBool,
    /// The label sets `wedge_info` holds now (a `Family` cannot be listed).
    wedge_info_sets: Mutex<BTreeSet<WedgeInfo>>,
}

/// `{result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionResult {
    /// evicted, deleted, gone, refused, failed.
    pub result: String,
}

/// `{method}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    /// The method.
    pub method: String,
}

fn histogram() -> Histogram {
    Histogram::new([
        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    ])
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            wedges: Family::default(),
            recovery_duration: Family::new_with_constructor(histogram),
            by_phase: Family::default(),
            wedge_info: Family::default(),
            budget_in_use: Family::default(),
            budget_allowed: Family::default(),
            queue_length: Family::default(),
            evictions: Family::default(),
            attempt_failures: Family::default(),
            breaker: Family::default(),
            leader: Gauge::default(),
            deleted_released: Counter::default(),
            ledger_repairs: Counter::default(),
            default_policy_applied: Gauge::default(),
            api_requests: Family::default(),
            registry: Registry::default(),
            ready: AtomicBool::new(false),
            default_policy_pending: AtomicBool::new(false),
            wedge_info_sets: Mutex::new(BTreeSet::new()),
        };
        registry.register(
            "unwedge_wedges",
            "GpuWedges seen, by driver and first method",
            m.wedges.clone(),
        );
        registry.register(
            "unwedge_recovery_duration_seconds",
            "Detection to Recovered/Abandoned",
            m.recovery_duration.clone(),
        );
        registry.register(
            "unwedge_wedges_by_phase",
            "GpuWedges by phase",
            m.by_phase.clone(),
        );
        registry.register(
            "unwedge_wedge_info",
            "1 for every open GpuWedge (not Recovered or Abandoned), labelled with its node, device, driver, phase and policy",
            m.wedge_info.clone(),
        );
        registry.register(
            "unwedge_budget_in_use",
            "Budget in use per policy and unit",
            m.budget_in_use.clone(),
        );
        registry.register(
            "unwedge_budget_allowed",
            "Budget allowed per policy and unit",
            m.budget_allowed.clone(),
        );
        registry.register(
            "unwedge_queue_length",
            "Wedges waiting for budget",
            m.queue_length.clone(),
        );
        registry.register(
            "unwedge_evictions",
            "Evictions by result",
            m.evictions.clone(),
        );
        registry.register(
            "unwedge_attempt_failures",
            "Failed or timed-out attempts by method",
            m.attempt_failures.clone(),
        );
        registry.register(
            "unwedge_circuit_breaker_tripped",
            "1 while a policy's circuit breaker holds",
            m.breaker.clone(),
        );
        registry.register(
            "unwedge_leader",
            "1 on the replica that holds the lease",
            m.leader.clone(),
        );
        registry.register(
            "unwedge_deleted_wedges_released",
            "GpuWedges deleted mid-recovery whose places the operator released",
            m.deleted_released.clone(),
        );
        registry.register(
            "unwedge_ledger_repairs",
            "Ledger entries dropped because their wedge was gone",
            m.ledger_repairs.clone(),
        );
        registry.register(
            "unwedge_default_policy_applied",
            "1 once this replica applied the chart's default RecoveryPolicy",
            m.default_policy_applied.clone(),
        );
        registry.register(
            "unwedge_operator_api_requests",
            "Requests this replica sent to the API server, by verb and resource",
            m.api_requests.clone(),
        );
        m.preinitialise();
        Metrics { registry, ..m }
    }

    /// Creates the label sets dashboards and alerts query, so each series exists at zero
    /// before its first event (prometheus-client prints nothing for an unused label set).
    fn preinitialise(&self) {
        for result in ["evicted", "deleted", "gone", "refused", "failed"] {
            let _ = self.evictions.get_or_create(&EvictionResult {
                result: result.into(),
            });
        }
        // The methods the agent knows; other tokens still get series when first seen.
        for method in unwedge_crds::Method::AGENT_KNOWN {
            let _ = self.attempt_failures.get_or_create(&MethodLabel {
                method: method.to_string(),
            });
            for result in ["recovered", "abandoned"] {
                let _ = self.recovery_duration.get_or_create(&MethodResult {
                    method: method.to_string(),
                    result: result.into(),
                });
            }
        }
    }

    /// Makes `unwedge_wedge_info` hold exactly `open` (see [`wedge_info_labels`]): series of
    /// wedges no longer open, or whose labels changed, are removed after the new ones exist,
    /// so a scrape never misses an open wedge (it may see one with both its old and new phase).
    pub fn set_open_wedges(&self, open: BTreeSet<WedgeInfo>) {
        let mut current = self
            .wedge_info_sets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for l in &open {
            self.wedge_info.get_or_create(l).set(1);
        }
        for gone in current.difference(&open) {
            self.wedge_info.remove(gone);
        }
        *current = open;
    }

    /// Marks the process ready (stores synced).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Holds readiness until [`Metrics::default_policy_settled`]: the replica has a default
    /// policy to apply.
    pub fn default_policy_pending(&self) {
        self.default_policy_pending.store(true, Ordering::Relaxed);
    }

    /// The default policy was applied (`applied`) or refused for good by admission.
    pub fn default_policy_settled(&self, applied: bool) {
        self.default_policy_applied.set(i64::from(applied));
        self.default_policy_pending.store(false, Ordering::Relaxed);
    }

    /// Why the replica is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Relaxed) {
            Some("caches not synced")
        } else if self.default_policy_pending.load(Ordering::Relaxed) {
            Some("default RecoveryPolicy not applied yet")
        } else {
            None
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` resolves.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let m = metrics.clone();
    let r = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    match r.not_ready() {
                        None => (StatusCode::OK, "ready"),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_with_its_name() {
        let m = Metrics::new();
        m.wedges
            .get_or_create(&DriverMethod {
                driver: "xe".into(),
                method: "rebind".into(),
            })
            .inc();
        m.by_phase
            .get_or_create(&PhaseLabel {
                phase: "Draining".into(),
            })
            .set(2);
        m.leader.set(1);
        let text = m.encode();
        for name in [
            "unwedge_wedges_total{driver=\"xe\",method=\"rebind\"} 1",
            "unwedge_wedges_by_phase{phase=\"Draining\"} 2",
            "unwedge_leader 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    fn wedge(name: &str, node: &str, phase: Option<unwedge_crds::Phase>) -> unwedge_crds::GpuWedge {
        use unwedge_crds::{DeviceRef, GpuWedge, GpuWedgeSpec, GpuWedgeStatus};
        let mut w = GpuWedge::new(
            name,
            GpuWedgeSpec {
                node_name: node.into(),
                device: DeviceRef {
                    pci_address: "0000:03:00.0".into(),
                    driver: "xe".into(),
                    ..Default::default()
                },
                methods: vec!["rebind".into()],
                detected_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::UNIX_EPOCH,
                ),
                boot_id: String::new(),
                uevent: Default::default(),
                blamed: None,
            },
        );
        w.status = phase.map(|p| GpuWedgeStatus {
            phase: Some(p),
            policy: Some("default".into()),
            ..Default::default()
        });
        w
    }

    /// The `unwedge_wedge_info` samples, sorted (a family prints in hash order).
    fn info_lines(m: &Metrics) -> Vec<String> {
        let mut out: Vec<String> = m
            .encode()
            .lines()
            .filter(|l| l.starts_with("unwedge_wedge_info{"))
            .map(str::to_string)
            .collect();
        out.sort();
        out
    }

    #[test]
    fn wedge_info_follows_open_wedges_and_drops_finished_ones() {
        use unwedge_crds::Phase;
        let m = Metrics::new();
        // No series before the first refresh (prometheus-client prints nothing, not even
        // `# TYPE`, for a family without label sets).
        assert!(info_lines(&m).is_empty());

        let mut wedges = vec![
            wedge("a", "node-a", None),
            wedge("b", "node-b", Some(Phase::Draining)),
            wedge("c", "node-b", Some(Phase::Recovered)),
            wedge("d", "node-c", Some(Phase::Abandoned)),
            wedge("e", "node-c", Some(Phase::NeedsAttention)),
        ];
        let open = wedge_info_labels(&wedges);
        let names: Vec<(&str, &str)> = open
            .iter()
            .map(|l| (l.wedge.as_str(), l.phase.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("a", "Detected"),
                ("b", "Draining"),
                ("e", "NeedsAttention")
            ]
        );
        m.set_open_wedges(open);
        assert_eq!(
            info_lines(&m),
            [
                r#"unwedge_wedge_info{wedge="a",node="node-a",device="0000:03:00.0",driver="xe",phase="Detected",policy=""} 1"#,
                r#"unwedge_wedge_info{wedge="b",node="node-b",device="0000:03:00.0",driver="xe",phase="Draining",policy="default"} 1"#,
                r#"unwedge_wedge_info{wedge="e",node="node-c",device="0000:03:00.0",driver="xe",phase="NeedsAttention",policy="default"} 1"#,
            ]
        );

        // b recovers, a moves on, e is deleted: only a, with its new phase, is left.
        wedges[1].status.as_mut().unwrap().phase = Some(Phase::Recovered);
        wedges[0] = wedge("a", "node-a", Some(Phase::Queued));
        wedges.pop();
        m.set_open_wedges(wedge_info_labels(&wedges));
        assert_eq!(
            info_lines(&m),
            [
                r#"unwedge_wedge_info{wedge="a",node="node-a",device="0000:03:00.0",driver="xe",phase="Queued",policy="default"} 1"#
            ]
        );

        m.set_open_wedges(wedge_info_labels(&[]));
        assert!(info_lines(&m).is_empty(), "{}", m.encode());
    }
}
