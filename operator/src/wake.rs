//! Which wedges a RecoveryPolicy change concerns (pure).
//!
//! Every admission and release writes the policy's ledger. Waking every open wedge on each of
//! those writes kept the controller's queue full of a storm's waiting wedges (a thousand
//! reconciles per ledger write), and the few admitted wedges' next steps waited behind them.
//! So a change of the policy itself (spec, annotations, selection counts, breaker, conditions)
//! still wakes every open wedge, but a ledger change wakes only the wedges it can let in: for
//! each place given back, the oldest waiting wedges of the policy, first come first served as
//! admission is. Queued wedges also keep a timer (`decide`), the safety net for anything missed.
//!
//! Nodes likewise: a kubelet's (or kwok's) status heartbeat is a node update every few tens
//! of seconds, and at a thousand nodes with open wedges that was tens of reconciles a second
//! that could change nothing. Only a change of what the decision reads of a node (its labels,
//! `unschedulable`, our cordon annotation) or its deletion wakes the node's wedges.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use unwedge_crds::{GpuWedge, RecoveryPolicy};

use crate::decide;

/// Waiting wedges woken per place given back beyond the place itself: a freed node place may
/// be taken by a wedge of another unit (a reboot blocked by its own limit, a `none` incident),
/// so a few more of the oldest look too.
pub const SLACK: usize = 4;

/// What was last seen of a policy, to tell a ledger change from a change of the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySeen {
    /// Everything but the ledger and the summary: spec generation, annotations, the rest of
    /// the status.
    shape: serde_json::Value,
    /// The wedges in the ledger.
    admitted: BTreeSet<String>,
}

impl PolicySeen {
    /// What matters of `p` for waking wedges.
    pub fn of(p: &RecoveryPolicy) -> Self {
        let mut status = p
            .status
            .as_ref()
            .map(|s| serde_json::to_value(s).unwrap_or_default())
            .unwrap_or_default();
        if let Some(m) = status.as_object_mut() {
            m.remove("admitted");
            m.remove("summary");
        }
        let shape = serde_json::json!({
            "generation": p.metadata.generation,
            "annotations": p.annotations(),
            "status": status,
        });
        let admitted = p
            .status
            .iter()
            .flat_map(|s| s.admitted.iter().map(|a| a.wedge.clone()))
            .collect();
        Self { shape, admitted }
    }
}

/// What to wake for a policy change.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Every open wedge (the policy is new, gone, or changed beyond its ledger).
    All,
    /// These wedges.
    Some(Vec<String>),
}

/// The wedges to reconcile after `policy` changed from `before` to `now` (`None`: unknown, or
/// deleted). `open` are the open wedges the operator knows.
pub fn on_policy_change(
    policy: &str,
    before: Option<&PolicySeen>,
    now: Option<&PolicySeen>,
    open: &[Arc<GpuWedge>],
) -> Wake {
    let (Some(before), Some(now)) = (before, now) else {
        return Wake::All;
    };
    if before.shape != now.shape {
        return Wake::All;
    }
    let freed = before.admitted.difference(&now.admitted).count();
    if freed == 0 {
        return Wake::Some(Vec::new());
    }
    // The oldest waiting wedges of the policy, per queue (`none` incidents queue apart).
    let mut queues: BTreeMap<bool, Vec<(jiff::Timestamp, String)>> = BTreeMap::new();
    for w in open {
        let name = w.name_any();
        let governed = w.status.as_ref().and_then(|s| s.policy.as_deref()) == Some(policy);
        if !governed || now.admitted.contains(&name) {
            continue;
        }
        let is_none = decide::plans_none(w);
        queues
            .entry(is_none)
            .or_default()
            .push((decide::arrived(w), name));
    }
    let mut out = Vec::new();
    for (_, mut q) in queues {
        q.sort();
        out.extend(q.into_iter().take(freed + SLACK).map(|(_, n)| n));
    }
    Wake::Some(out)
}

/// What the operator's decisions read of a node: a change of it wakes the node's wedges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeShape {
    labels: BTreeMap<String, String>,
    view: decide::NodeView,
}

impl NodeShape {
    /// The shape of `n`: its labels (policy selection) and what `decide` reads of it.
    pub fn of(n: &Node) -> Self {
        Self {
            labels: n.labels().clone(),
            view: decide::NodeView::of(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::labels::ANN_CORDONED_BY;
    use unwedge_crds::{Admission, BudgetUnit, GpuWedgeStatus, RecoveryPolicyStatus};

    fn policy(generation: i64, admitted: &[&str], summary: &str) -> RecoveryPolicy {
        let mut p = RecoveryPolicy::new("gpus", serde_json::from_str("{}").unwrap());
        p.metadata.generation = Some(generation);
        p.status = Some(RecoveryPolicyStatus {
            admitted: admitted
                .iter()
                .map(|w| Admission {
                    wedge: (*w).into(),
                    node: format!("node-{w}"),
                    unit: BudgetUnit::Node,
                    reboot: false,
                })
                .collect(),
            nodes_selected: 10,
            summary: Some(summary.into()),
            ..Default::default()
        });
        p
    }

    fn wedge(name: &str, second: i64, methods: &str, policy: &str) -> Arc<GpuWedge> {
        let mut w = GpuWedge::new(
            name,
            serde_json::from_value(serde_json::json!({
                "nodeName": format!("node-{name}"),
                "device": {"pciAddress": "0000:03:00.0", "driver": "xe"},
                "methods": methods.split(',').collect::<Vec<_>>(),
                "detectedAt": format!("2026-11-26T06:00:{second:02}Z"),
            }))
            .unwrap(),
        );
        w.status = Some(GpuWedgeStatus {
            policy: Some(policy.into()),
            ..Default::default()
        });
        Arc::new(w)
    }

    #[test]
    fn a_heartbeat_does_not_change_a_node_shape_but_a_cordon_does() {
        let mut n = Node::default();
        n.metadata.name = Some("gpu-a".into());
        let before = NodeShape::of(&n);
        n.status = Some(Default::default());
        n.metadata.resource_version = Some("42".into());
        assert_eq!(NodeShape::of(&n), before, "status and metadata noise");
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        assert_ne!(NodeShape::of(&n), before, "cordoned");
        let cordoned = NodeShape::of(&n);
        n.metadata.annotations = Some(
            [(ANN_CORDONED_BY.to_string(), "w".to_string())]
                .into_iter()
                .collect(),
        );
        assert_ne!(NodeShape::of(&n), cordoned, "our cordon annotation");
        let annotated = NodeShape::of(&n);
        n.metadata.labels = Some(
            [("gpu".to_string(), "xe".to_string())]
                .into_iter()
                .collect(),
        );
        assert_ne!(NodeShape::of(&n), annotated, "labels select policies");
    }

    fn seen(p: &RecoveryPolicy) -> PolicySeen {
        PolicySeen::of(p)
    }

    #[test]
    fn a_new_deleted_or_changed_policy_wakes_everything() {
        let p = seen(&policy(1, &["a"], "1/5"));
        assert_eq!(on_policy_change("gpus", None, Some(&p), &[]), Wake::All);
        assert_eq!(on_policy_change("gpus", Some(&p), None, &[]), Wake::All);
        let edited = seen(&policy(2, &["a"], "1/5"));
        assert_eq!(
            on_policy_change("gpus", Some(&p), Some(&edited), &[]),
            Wake::All
        );
        let mut resumed = policy(1, &["a"], "1/5");
        resumed.status.as_mut().unwrap().resumed = Some("x".into());
        assert_eq!(
            on_policy_change("gpus", Some(&p), Some(&seen(&resumed)), &[]),
            Wake::All
        );
        let mut tripped = policy(1, &["a"], "1/5");
        tripped.status.as_mut().unwrap().circuit_breaker_tripped_at =
            Some(Time("2026-11-26T06:00:00Z".parse().unwrap()));
        assert_eq!(
            on_policy_change("gpus", Some(&p), Some(&seen(&tripped)), &[]),
            Wake::All
        );
    }

    #[test]
    fn an_admission_or_a_new_summary_wakes_nobody() {
        let before = seen(&policy(1, &["a"], "1/5"));
        let after = seen(&policy(1, &["a", "b"], "2/5, 40 queued"));
        let open = [wedge("c", 3, "rebind", "gpus")];
        assert_eq!(
            on_policy_change("gpus", Some(&before), Some(&after), &open),
            Wake::Some(vec![])
        );
    }

    #[test]
    fn a_release_wakes_the_oldest_waiting_wedges_of_each_queue() {
        let before = seen(&policy(1, &["a", "b"], "2/2"));
        let after = seen(&policy(1, &["b"], "1/2"));
        let mut open: Vec<Arc<GpuWedge>> = (0..20)
            .map(|i| wedge(&format!("w{i:02}"), 59 - i, "rebind", "gpus"))
            .collect();
        open.push(wedge("b", 0, "rebind", "gpus"));
        open.push(wedge("other", 0, "rebind", "another-policy"));
        open.push(wedge("n1", 30, "none", "gpus"));
        let Wake::Some(woken) = on_policy_change("gpus", Some(&before), Some(&after), &open) else {
            panic!("a release is not a change of the policy");
        };
        // One place freed: the 1 + SLACK oldest of the rebind queue (w19 is the oldest) and
        // the only none incident; never the admitted `b` or another policy's wedge.
        assert_eq!(woken, vec!["w19", "w18", "w17", "w16", "w15", "n1"]);
    }
}
