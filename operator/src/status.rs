//! The operator's part of a GpuWedge status, and the patches that write it.
//!
//! The agent owns the other fields; the operator writes only its own. Its status write is a
//! JSON patch ([`OperatorStatus::json_patch`]) that compares and swaps the operator's part
//! alone, so the agent's writes of its own fields do not make it lose (docs/design.md §4).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;
use serde_json::{Map, Value, json};
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

    /// The JSON patch (RFC 6902) for the status subresource that writes `self` over `stored`, the
    /// status the decision was made on (`None`: the wedge had no status yet).
    ///
    /// Without `resource_version`, a compare-and-swap of the operator's part only: each operator
    /// field is tested to be as decided on (`null`: absent), then set, or removed when it became
    /// empty. Of the agent's part it tests what gates or steers a disruption: `agentDryRun` (no
    /// cordon, eviction or approval for a dry-run agent) and `attempts` (an attempt's start or
    /// end), and for a decision that `drains` (see [`crate::decide::reads_pods`]) the
    /// `consumers` and `resetDomain` it drains for; the agent's other writes (later uevents, its
    /// messages, a consumer refresh outside a drain) do not make it lose. A copy without any
    /// status was decided
    /// before the agent's first report: the patch writes only if there is still none. With
    /// `resource_version` (see [`OperatorStatus::needs_version`]) the whole object is the
    /// precondition instead, as a merge patch with a resourceVersion would make it.
    pub fn json_patch(
        &self,
        stored: Option<&GpuWedgeStatus>,
        drains: bool,
        resource_version: Option<&str>,
    ) -> Value {
        let mut ops = Vec::new();
        let new = fields(self);
        let Some(stored) = stored else {
            let set: Map<String, Value> = new.into_iter().filter(|(_, v)| !v.is_null()).collect();
            if let Some(rv) = resource_version {
                ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}));
            }
            ops.push(json!({"op": "test", "path": "/status", "value": null}));
            ops.push(json!({"op": "add", "path": "/status", "value": set}));
            return Value::Array(ops);
        };
        let old = fields(&OperatorStatus::of(stored));
        let tests = resource_version.is_none();
        match resource_version {
            Some(rv) => {
                ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}))
            }
            None => {
                for (k, v) in agent_guards(stored, drains) {
                    ops.push(json!({"op": "test", "path": format!("/status/{k}"), "value": v}));
                }
            }
        }
        for (k, v) in new {
            let path = format!("/status/{k}");
            let was = old.get(&k).cloned().unwrap_or(Value::Null);
            if tests {
                ops.push(json!({"op": "test", "path": path, "value": was}));
            }
            if v == was {
                continue;
            }
            if v.is_null() {
                ops.push(json!({"op": "remove", "path": path}));
            } else {
                ops.push(json!({"op": "add", "path": path, "value": v}));
            }
        }
        Value::Array(ops)
    }

    /// Whether writing `self` over `stored` needs the whole object as its precondition
    /// (a resourceVersion) rather than the tests of [`OperatorStatus::json_patch`]:
    ///
    /// - it changes the approval: the agent acts on it, so it must be decided on the agent's
    ///   newest report (its consumers drained, its attempts), and an approval must never be
    ///   written twice with different attempt ids;
    /// - a tested value has characters the API server encodes differently from us (`<`, `>`,
    ///   `&`, control characters): `test` compares the encoded text, and would never pass.
    pub fn needs_version(&self, stored: Option<&GpuWedgeStatus>, drains: bool) -> bool {
        let Some(stored) = stored else {
            return false;
        };
        if stored.approval != self.approval {
            return true;
        }
        let tested = Value::Array(
            fields(&OperatorStatus::of(stored))
                .into_values()
                .chain(agent_guards(stored, drains).into_iter().map(|(_, v)| v))
                .collect(),
        );
        !encodes_alike(&tested)
    }

    /// The condition of this type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.as_ref()?.iter().find(|c| c.type_ == type_)
    }
}

/// The operator's fields of `s` by their JSON name (`null` when empty).
fn fields(s: &OperatorStatus) -> Map<String, Value> {
    match serde_json::to_value(s).expect("a status serializes") {
        Value::Object(m) => m,
        _ => unreachable!("a struct serializes to an object"),
    }
}

/// The agent's fields an operator write is guarded by (tested to be as decided on): those that
/// gate or steer a disruption, and what a drain drains for when the decision `drains`.
fn agent_guards(s: &GpuWedgeStatus, drains: bool) -> Vec<(&'static str, Value)> {
    let mut g = vec![
        ("agentDryRun", json!(s.agent_dry_run)),
        ("attempts", json!(s.attempts)),
    ];
    if drains {
        g.push(("consumers", json!(s.consumers)));
        g.push(("resetDomain", json!(s.reset_domain)));
    }
    g
}

/// Whether the API server writes `v` as the same text as we do: its encoder escapes `<`, `>`,
/// `&`, U+2028, U+2029 and some control characters where serde_json does not, and a JSON
/// patch `test` compares strings as encoded.
fn encodes_alike(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.chars().any(|c| {
            matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}')
                || (c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        }),
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::Array(a) => a.iter().all(encodes_alike),
        Value::Object(m) => m.values().all(encodes_alike),
        Value::Null | Value::Bool(_) => true,
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
            "agentDryRun",
            "eventsDropped",
        ] {
            assert!(
                !p["status"].as_object().unwrap().contains_key(agent),
                "{agent} belongs to the agent"
            );
        }
    }

    /// A status as the agent and the operator left it: agent fields beside operator ones.
    fn stored() -> GpuWedgeStatus {
        GpuWedgeStatus {
            consumers: Some(vec![unwedge_crds::Consumer {
                namespace: "ml".into(),
                pod: "trainer".into(),
                ..Default::default()
            }]),
            agent_message: Some("fd open".into()),
            agent_dry_run: Some(false),
            phase: Some(Phase::Queued),
            action: Some("waiting: budget".into()),
            budget: Some("2/2 nodes under recovery".into()),
            ..Default::default()
        }
    }

    /// The stored object as JSON with every operator field present (`null` when empty), as
    /// the API server's patch treats an absent field.
    fn object(s: &GpuWedgeStatus) -> Value {
        let mut st = serde_json::to_value(s).unwrap();
        for (k, v) in fields(&OperatorStatus::of(s)) {
            st[k] = v;
        }
        for (k, v) in agent_guards(s, true) {
            st[k] = v;
        }
        json!({"metadata": {"name": "w", "resourceVersion": "7"}, "status": st})
    }

    fn apply(doc: &Value, ops: &Value) -> Result<Value, json_patch::PatchError> {
        let mut doc = doc.clone();
        let p: json_patch::Patch = serde_json::from_value(ops.clone()).unwrap();
        json_patch::patch(&mut doc, &p).map(|_| doc)
    }

    #[test]
    fn status_patch_writes_operator_fields_only_guarded_by_them() {
        let old = stored();
        let mut new = OperatorStatus::of(&old);
        new.phase = Some(Phase::Cordoned);
        new.cordoned = Some(true);
        new.budget = None;
        let ops = new.json_patch(Some(&old), false, None);
        let ops_list = ops.as_array().unwrap();
        let operator_keys: Vec<String> = fields(&new).keys().cloned().collect();
        for op in ops_list {
            let path = op["path"].as_str().unwrap();
            assert_ne!(
                path, "/metadata/resourceVersion",
                "no resourceVersion: {op}"
            );
            let key = path.strip_prefix("/status/").expect("a status field");
            if op["op"] != "test" {
                assert!(operator_keys.iter().any(|k| k == key), "writes {key}: {op}");
            } else {
                assert!(
                    operator_keys.iter().any(|k| k == key)
                        || ["agentDryRun", "attempts"].contains(&key),
                    "tests {key}"
                );
            }
        }
        let has = |o: &str, p: &str| ops_list.iter().any(|x| x["op"] == o && x["path"] == p);
        for k in &operator_keys {
            assert!(has("test", &format!("/status/{k}")), "{k} is compared");
        }
        assert!(has("add", "/status/phase") && has("add", "/status/cordoned"));
        assert!(
            has("remove", "/status/budget"),
            "an emptied field is removed"
        );
        assert!(
            !has("add", "/status/action"),
            "an unchanged field is not written"
        );

        // The agent rewrote its own fields meanwhile: the write goes through and keeps them.
        let mut agent_moved = old.clone();
        agent_moved.consumers = None;
        agent_moved.agent_message = Some("all clear".into());
        let after = apply(&object(&agent_moved), &ops).expect("agent writes do not conflict");
        assert_eq!(after["status"]["phase"], "Cordoned");
        assert_eq!(after["status"]["cordoned"], true);
        assert_eq!(after["status"]["agentMessage"], "all clear");
        assert!(after["status"]["consumers"].is_null());
        assert!(after["status"].get("budget").is_none());

        // A decision that drains was made on the consumers: it loses when they changed.
        let drain_ops = new.json_patch(Some(&old), true, None);
        assert!(apply(&object(&agent_moved), &drain_ops).is_err());
        let mut message_only = old.clone();
        message_only.agent_message = Some("all clear".into());
        assert!(apply(&object(&message_only), &drain_ops).is_ok());

        // The operator's part moved (a cache that lags our own write): the write loses.
        let mut ours_moved = old.clone();
        ours_moved.phase = Some(Phase::Cordoned);
        assert!(apply(&object(&ours_moved), &ops).is_err());
        // So does it when the agent reported an attempt or its dry run.
        let mut dry = old.clone();
        dry.agent_dry_run = Some(true);
        assert!(apply(&object(&dry), &ops).is_err());
    }

    #[test]
    fn first_status_is_written_only_over_none() {
        let new = OperatorStatus {
            phase: Some(Phase::Queued),
            ..Default::default()
        };
        let ops = new.json_patch(None, false, None);
        assert_eq!(
            ops,
            json!([
                {"op": "test", "path": "/status", "value": null},
                {"op": "add", "path": "/status", "value": {"phase": "Queued"}}
            ])
        );
        assert!(!new.needs_version(None, false));
    }

    #[test]
    fn an_approval_or_a_spelling_that_differs_needs_the_resource_version() {
        let old = stored();
        let mut approve = OperatorStatus::of(&old);
        assert!(!approve.needs_version(Some(&old), false));
        approve.approval = Some(Approval {
            method: "rebind".into(),
            attempt: 1,
            at: Time(jiff::Timestamp::UNIX_EPOCH),
            by: "op".into(),
            containers: None,
        });
        assert!(
            approve.needs_version(Some(&old), false),
            "an approval is written over what it was decided on"
        );
        let ops = approve.json_patch(Some(&old), false, Some("7"));
        assert_eq!(
            ops[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "7"})
        );
        assert!(
            ops.as_array().unwrap()[1..]
                .iter()
                .all(|o| o["op"] != "test"),
            "the resourceVersion alone guards it"
        );
        assert!(apply(&object(&old), &ops).is_ok());

        let mut asked = old.clone();
        asked.action = Some("annotate unwedge.io/by=<you>".into());
        let same = OperatorStatus::of(&asked);
        assert!(
            same.needs_version(Some(&asked), false),
            "the API server spells < as \\u003c"
        );
    }
}
