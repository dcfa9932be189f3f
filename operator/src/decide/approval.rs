//! From the drain to the approval: drain for the planned attempt, then approve it (automatic,
//! or manual with a human's `unwedge.io/approve`); and the human verbs of a wedge that waits for
//! a person — approve, retry (docs/design.md §3).

use std::collections::BTreeSet;
use std::ops::ControlFlow::{Break, Continue};

use unwedge_crds::{Admission, Approval, ApprovalMode, BudgetUnit, Method, Phase, Plan, PodRef};

use super::draft::{Draft, Flow, attention, note, wait};
use super::drain::{AWAITING_AGENT, agent_reported, drain, drain_targets};
use super::hold::gate;
use super::queue::admit_more;
use super::recovery::Recovery;
use super::{
    Decision, PolicyView, REQUEUE_FAST, REQUEUE_IDLE, REQUEUE_SLOW, Step, cond, next_attempt,
};

impl<'a> Recovery<'a> {
    /// Draining: a reboot first asks for its reboot slot; then the pods go, and the attempt is
    /// approved, or waits for a human when the policy says so.
    pub(super) fn drain_for_attempt(&self, mut d: Draft<'a>, held: &Admission) -> Flow<Decision> {
        let (input, pv, s) = (self.input, self.pv, self.pv.settings);
        let Some(Plan {
            method, attempt: n, ..
        }) = d.new.plan.clone()
        else {
            // Not reached: a Draining wedge without a plan was sent back to the cordon.
            d.phase(Phase::Cordoned);
            return Break(d.done(Step::Nothing, None));
        };
        if method == Method::Reboot && !held.reboot {
            let what = format!("drain node {} for reboot#{n}", self.node_name);
            return admit_more(d, pv, self.candidate(BudgetUnit::Node, true), &what);
        }
        if method != Method::Reboot && !agent_reported(input.wedge) {
            return Break(d.done(wait(REQUEUE_FAST, AWAITING_AGENT), None));
        }
        let mut targets = match drain_targets(input, pv, &method) {
            Ok(t) => t,
            Err(a) => return Break(attention(d, a)),
        };
        if let Some(q) = self.quarantine {
            // The pods whose ResourceClaims hold the device, beside what the agent saw.
            let all: BTreeSet<PodRef> = targets.into_iter().chain(q.consumers.clone()).collect();
            targets = all.into_iter().collect();
        }
        let mut d = drain(d, input, pv, &targets, &format!("for {method}#{n}"))?;
        let manual = s.approval == ApprovalMode::Manual
            || (method == Method::Reboot && s.reboot_approval == ApprovalMode::Manual);
        if !manual {
            return approve(d, pv, &method, n, input.operator.to_string(), false);
        }
        let verbs = &input.verbs;
        let approved_now = verbs
            .approve
            .as_deref()
            .is_some_and(|m| m.is_empty() || m == method);
        if let Some(by) = verbs.by.clone().filter(|_| approved_now) {
            return approve(d, pv, &method, n, by, true);
        }
        d.phase(Phase::AwaitingApproval)
            .action(format!("awaiting approval for {method}#{n}"));
        let msg = format!(
            "drained; annotate unwedge.io/approve (empty for {method}, or an allowed method) with unwedge.io/by=<you> to approve attempt {n}"
        );
        d.condition(cond::APPROVED, false, "AwaitingApproval", msg.clone());
        Continue(d.done(Step::Nothing, note(false, "AwaitingApproval", msg)))
    }

    /// AwaitingApproval or NeedsAttention: a human approves a method, or asks for a retry;
    /// meanwhile a wedge that needs attention gives its reboot slot back.
    pub(super) fn wait_for_human(&self, d: Draft<'a>, held: &Admission) -> Flow<Decision> {
        let verbs = &self.input.verbs;
        if let Some(m) = verbs.approve.as_deref() {
            return self.approved_by_human(d, m);
        }
        if self.phase == Phase::NeedsAttention && verbs.retry.is_some() {
            return Continue(self.retry(d));
        }
        if self.phase == Phase::NeedsAttention && held.reboot {
            // No reboot runs while a human looks: the reboot slot goes back to the policy
            // (the node keeps its place). A retry of the reboot asks for the slot again.
            return Continue(d.done(
                Step::Admit {
                    candidate: self.candidate(held.unit, false),
                    reclaim: true,
                },
                note(
                    false,
                    "RebootSlotReleased",
                    "no reboot runs while the wedge needs attention: its reboot slot is released",
                ),
            ));
        }
        Continue(d.done(wait(REQUEUE_IDLE, "waiting for a human"), None))
    }

    /// `unwedge.io/approve=m` (empty: the planned rung): approves the drained attempt, or drains
    /// for another method first (the approval stays on the wedge until the drain completes).
    fn approved_by_human(&self, mut d: Draft<'a>, m: &str) -> Flow<Decision> {
        let (pv, s) = (self.pv, self.pv.settings);
        let current = d.new.plan.as_ref().map(|p| p.method.clone());
        let Some(who) = self.input.verbs.by.clone() else {
            d.condition(
                cond::APPROVED,
                false,
                "MissingBy",
                "unwedge.io/approve needs unwedge.io/by=<you>",
            );
            return Break(d.done(wait(REQUEUE_SLOW, "approve without by"), None));
        };
        let method = if m.is_empty() {
            let planned = current
                .clone()
                .or_else(|| self.plan.as_ref().ok().map(|l| l[0].clone()));
            let Some(m) = planned else {
                d.condition(
                    cond::APPROVED,
                    false,
                    "NoMethod",
                    "nothing to approve: name a method, unwedge.io/approve=<method>",
                );
                return Break(d.done(wait(REQUEUE_SLOW, "approve without method"), None));
            };
            m
        } else {
            Method::from(m)
        };
        if !s.allowed_methods.contains(&method) {
            let msg = format!(
                "{who} approved {method}, which RecoveryPolicy {} does not allow ({})",
                pv.name,
                Method::join(&s.allowed_methods)
            );
            d.condition(cond::APPROVED, false, "MethodNotAllowed", msg.clone());
            return Break(d.done(
                wait(REQUEUE_SLOW, "method not allowed"),
                note(true, "MethodNotAllowed", msg),
            ));
        }
        let n = next_attempt(&self.status);
        if self.phase == Phase::AwaitingApproval && current.as_ref() == Some(&method) {
            let n = d.new.plan.as_ref().map_or(n, |p| p.attempt);
            return approve(d, pv, &method, n, who, true);
        }
        // Another method (or out of NeedsAttention): drain for it; the approval stays
        // on the wedge and is honoured when the drain completes.
        d.phase(Phase::Draining)
            .action(format!("drain for {method}#{n}"))
            .plan(&method, n, self.plan.as_deref().ok());
        d.new.phase_since = Some(d.now());
        d.condition(
            cond::NEEDS_ATTENTION,
            false,
            "Approved",
            format!("{who} approved {method}"),
        );
        Continue(d.done(
            Step::Nothing,
            note(
                false,
                "ApprovedByHuman",
                format!("{who} approved {method}#{n}; draining for it"),
            ),
        ))
    }

    /// `unwedge.io/retry` on a wedge that needs attention: a new attempt of the rung where the
    /// ladder stood.
    fn retry(&self, mut d: Draft<'a>) -> Decision {
        let who = self
            .input
            .verbs
            .by
            .clone()
            .unwrap_or_else(|| "an unnamed user".into());
        // Where the ladder stood (the plan is kept through NeedsAttention), else the
        // last approved method, else the first rung.
        let rung = d
            .new
            .plan
            .as_ref()
            .map(|p| p.method.clone())
            .or_else(|| {
                self.status
                    .approval
                    .as_ref()
                    .map(|a| Method::from(&a.method))
            })
            .or_else(|| self.plan.as_ref().ok().map(|l| l[0].clone()));
        let Some(rung) = rung else {
            d.condition(
                cond::NEEDS_ATTENTION,
                true,
                "NothingToRetry",
                "no method to retry: approve one with unwedge.io/approve=<method>",
            );
            return d.done(wait(REQUEUE_SLOW, "nothing to retry"), None);
        };
        let n = next_attempt(&self.status);
        d.phase(Phase::Draining)
            .action(format!("drain for {rung}#{n}"))
            .plan(&rung, n, self.plan.as_deref().ok());
        d.new.phase_since = Some(d.now());
        let msg = format!("{who} asked for a retry: {rung}#{n}");
        d.condition(cond::NEEDS_ATTENTION, false, "Retry", msg.clone());
        d.done(
            Step::ClearVerbs {
                keys: vec![
                    unwedge_crds::labels::ANN_RETRY.into(),
                    unwedge_crds::labels::ANN_BY.into(),
                ],
            },
            note(false, "Retry", msg),
        )
    }
}

/// Approves attempt `n` with `method`, by `by` (a human, whose verbs are then cleared, or the
/// operator). Held like any new disruption.
fn approve(
    d: Draft,
    pv: &PolicyView,
    method: &Method,
    n: u32,
    by: String,
    human: bool,
) -> Flow<Decision> {
    let what = if human {
        format!("approve {method}#{n} (approved by {by})")
    } else {
        format!("approve {method}#{n}")
    };
    let mut d = gate(d, pv, &what)?;
    d.new.approval = Some(Approval {
        method: method.to_string(),
        attempt: n,
        at: d.now(),
        by: by.clone(),
        containers: None,
    });
    let rung = d
        .new
        .plan
        .as_ref()
        .filter(|p| p.method == *method)
        .and_then(|p| p.rung);
    d.phase(Phase::Approved).action(format!("{method}#{n}"));
    d.new.plan = Some(Plan {
        method: method.clone(),
        attempt: n,
        rung,
    });
    let msg = format!("approved {method}#{n} (by {by})");
    d.condition(
        cond::APPROVED,
        true,
        if human { "ByHuman" } else { "Automatic" },
        msg.clone(),
    );
    let step = if human {
        Step::ClearVerbs {
            keys: vec![
                unwedge_crds::labels::ANN_APPROVE.into(),
                unwedge_crds::labels::ANN_BY.into(),
            ],
        }
    } else {
        Step::Nothing
    };
    Continue(d.done(step, note(false, "Approved", msg)))
}
