//! `budget`: each policy's limits, the places its ledger holds and its queue.

use serde::Serialize;
use unwedge_crds::{GpuWedge, Phase, RecoveryPolicy, budget};

use super::*;

/// One line of `kubectl unwedge budget`; `budget -o json|yaml` prints these (camelCase, an
/// invalid limit as `null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetRow {
    /// Policy name.
    pub policy: String,
    /// Whether it is the default policy (`spec.default`).
    pub default: bool,
    /// Nodes the policy selects.
    pub nodes_selected: u32,
    /// Nodes that may be under recovery at once (`None`: maxUnavailable is malformed).
    pub nodes_allowed: Option<u32>,
    /// Distinct nodes holding a Node admission.
    pub nodes_in_use: u32,
    /// Reboot admissions.
    pub reboots_in_use: u32,
    /// maxConcurrentReboots.
    pub reboots_allowed: u32,
    /// DRA devices on the selected nodes.
    pub devices_selected: u32,
    /// DRA devices that may be quarantined at once.
    pub devices_allowed: Option<u32>,
    /// Device admissions.
    pub devices_in_use: u32,
    /// Wedges of this policy in phase Queued.
    pub queued: u32,
    /// `paused`, `dry-run`, `circuit breaker tripped`, or `-`.
    pub state: String,
}

/// The budget of every policy, from its status ledger (`status.admitted`,
/// `status.nodesSelected`, `status.devicesSelected`) and the Queued wedges it governs.
pub fn budget_rows(policies: &[RecoveryPolicy], wedges: &[GpuWedge]) -> Vec<BudgetRow> {
    let mut rows: Vec<BudgetRow> = policies
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let status = p.status.clone().unwrap_or_default();
            let used = budget::usage(&status.admitted);
            let queued = wedges
                .iter()
                .filter(|w| phase_of(w) == Phase::Queued && policy_of(w) == Some(name.as_str()))
                .count() as u32;
            let mut state = Vec::new();
            if p.spec.paused {
                state.push("paused");
            }
            if p.spec.dry_run {
                state.push("dry-run");
            }
            if status.circuit_breaker_tripped_at.is_some() {
                state.push("circuit breaker tripped");
            }
            BudgetRow {
                policy: name,
                default: p.spec.default,
                nodes_selected: status.nodes_selected,
                nodes_allowed: budget::resolve_limit(
                    &budget::max_unavailable(&p.spec),
                    status.nodes_selected,
                )
                .ok(),
                nodes_in_use: used.nodes,
                reboots_in_use: used.reboots,
                reboots_allowed: budget::max_concurrent_reboots(&p.spec),
                devices_selected: status.devices_selected,
                devices_allowed: budget::resolve_limit(
                    &budget::max_unavailable_devices(&p.spec),
                    status.devices_selected,
                )
                .ok(),
                devices_in_use: used.devices,
                queued,
                state: if state.is_empty() {
                    "-".into()
                } else {
                    state.join(", ")
                },
            }
        })
        .collect();
    rows.sort_by(|a, b| a.policy.cmp(&b.policy));
    rows
}

/// The headers of `kubectl unwedge budget`.
pub const BUDGET_HEADERS: [&str; 8] = [
    "POLICY", "NODES", "ALLOWED", "IN-USE", "REBOOTS", "DEVICES", "QUEUED", "STATE",
];

/// Table cells for budget rows: POLICY has ` (default)` for the default policy, REBOOTS is
/// `in use/allowed`, DEVICES `in use/allowed of total`.
pub fn budget_cells(rows: &[BudgetRow]) -> Vec<Vec<String>> {
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "invalid".into());
    rows.iter()
        .map(|r| {
            vec![
                if r.default {
                    format!("{} (default)", r.policy)
                } else {
                    r.policy.clone()
                },
                r.nodes_selected.to_string(),
                opt(r.nodes_allowed),
                r.nodes_in_use.to_string(),
                format!("{}/{}", r.reboots_in_use, r.reboots_allowed),
                format!(
                    "{}/{} of {}",
                    r.devices_in_use,
                    opt(r.devices_allowed),
                    r.devices_selected
                ),
                r.queued.to_string(),
                r.state.clone(),
            ]
        })
        .collect()
}
