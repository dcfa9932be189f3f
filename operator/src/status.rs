//! The operator's part of a GpuWedge status, and the merge patch that writes it.
//!
//! The agent owns the other fields; merge patches replace arrays whole, so the operator sends
//! only its own fields (every one of them, `null` when empty, so stale values are removed).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;
use unwedge_crds::{Approval, BudgetLimit, Eviction, GpuWedgeStatus, Phase, Plan};

/// Every status field the operator writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    /// Where the wedge stands.
    pub phase: Option<Phase>,
    /// The method list planned from, comma-joined.
    pub methods: Option<String>,
    /// What is being done now (for people; never read back).
    pub action: Option<String>,
    /// The planned method, attempt and rung.
    pub plan: Option<Plan>,
    /// The governing policy.
    pub policy: Option<String>,
    /// Conditions.
    pub conditions: Option<Vec<Condition>>,
    /// The approved method and attempt.
    pub approval: Option<Approval>,
    /// Evictions made.
    pub evictions: Option<Vec<Eviction>>,
    /// Why the wedge waits for budget.
    pub budget: Option<String>,
    /// The limit the wedge waits for.
    pub waiting_for: Option<BudgetLimit>,
    /// Whether unwedge cordoned the node for this wedge.
    pub cordoned: Option<bool>,
    /// The DRA quarantine rule.
    pub quarantine_rule: Option<String>,
    /// When admitted.
    pub admitted_at: Option<Time>,
    /// When the current phase began.
    pub phase_since: Option<Time>,
    /// When Recovered or Abandoned.
    pub finished_at: Option<Time>,
    /// Last generation acted on.
    pub observed_generation: Option<i64>,
}

impl OperatorStatus {
    /// The operator part of a stored status.
    pub fn of(s: &GpuWedgeStatus) -> OperatorStatus {
        OperatorStatus {
            phase: s.phase,
            methods: s.methods.clone(),
            action: s.action.clone(),
            plan: s.plan.clone(),
            policy: s.policy.clone(),
            conditions: s.conditions.clone(),
            approval: s.approval.clone(),
            evictions: s.evictions.clone(),
            budget: s.budget.clone(),
            waiting_for: s.waiting_for,
            cordoned: s.cordoned,
            quarantine_rule: s.quarantine_rule.clone(),
            admitted_at: s.admitted_at.clone(),
            phase_since: s.phase_since.clone(),
            finished_at: s.finished_at.clone(),
            observed_generation: s.observed_generation,
        }
    }

    /// The JSON merge patch body for the status subresource.
    pub fn merge_patch(&self) -> serde_json::Value {
        serde_json::json!({ "status": self })
    }

    /// The condition of this type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_nulls_empty_fields_and_leaves_agent_fields_out() {
        let s = OperatorStatus {
            phase: Some(Phase::Queued),
            budget: Some("2/2 nodes under recovery".into()),
            ..Default::default()
        };
        let p = s.merge_patch();
        assert_eq!(p["status"]["phase"], "Queued");
        assert_eq!(p["status"]["budget"], "2/2 nodes under recovery");
        assert!(p["status"]["approval"].is_null());
        assert!(
            p["status"].as_object().unwrap().contains_key("approval"),
            "null removes a stale value"
        );
        for agent in [
            "consumers",
            "resetDomain",
            "events",
            "attempts",
            "agentMessage",
        ] {
            assert!(
                !p["status"].as_object().unwrap().contains_key(agent),
                "{agent} belongs to the agent"
            );
        }
    }
}
