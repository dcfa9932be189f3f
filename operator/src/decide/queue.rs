//! The queue: a wedge asks its policy's budget for a place (docs/design.md §4) and is admitted,
//! or waits Queued behind the wedges that arrived before it, saying for which limit.

use std::ops::ControlFlow::Continue;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use unwedge_crds::Phase;

use super::draft::{Draft, Flow, note, wait};
use super::hold::gate;
use super::{Decision, Governance, PolicyView, Step, cond};
use crate::budget::{self, Candidate, QueueReason};
use crate::status::OperatorStatus;

/// How long a wedge that asks for more than it holds waits before it asks again.
const MORE_RECHECK: Duration = Duration::from_secs(30);

/// Ask the ledger for `cand`'s place (the compare-and-swap re-checks the budget).
fn admit(d: Draft, cand: Candidate) -> Decision {
    d.done(
        Step::Admit {
            candidate: cand,
            reclaim: false,
        },
        None,
    )
}

/// A place, or a queue position behind the wedges waiting ahead.
pub(super) fn admit_or_queue(d: Draft, pv: &PolicyView, cand: Candidate) -> Decision {
    match budget::admit(pv.ledger, &cand, &pv.limits, &pv.waiting_ahead) {
        Ok(_) => admit(d, cand),
        Err(reason) => queued(d, &reason),
    }
}

/// More than the place the wedge holds: a node place and a reboot slot for a reboot (or the
/// node place of a quarantined device that escalated to reboot). Not queued behind the wedges
/// waiting ahead (it keeps what it holds meanwhile): admitted when it fits, else it waits and
/// asks again, the limit it waits for in its status. Held like any new disruption (`what`).
pub(super) fn admit_more(d: Draft, pv: &PolicyView, cand: Candidate, what: &str) -> Flow<Decision> {
    let mut d = gate(d, pv, what)?;
    Continue(match budget::admit(pv.ledger, &cand, &pv.limits, &[]) {
        Ok(_) => admit(d, cand),
        Err(r) => {
            d.new.budget = Some(r.0.clone());
            d.new.waiting_for = Some(r.1);
            d.done(wait(MORE_RECHECK, r.0), None)
        }
    })
}

/// The status of a wedge that waits for budget (also used when the CAS finds it full).
///
/// A wedge already queued for the same limit keeps the text it was queued with: the
/// counts change with every admission and release, and rewriting (and announcing) every waiting
/// wedge each time is a write storm of its own at a thousand wedges. The policy's summary
/// (`kubectl get recoverypolicy`) shows the live counts.
/// A wedge queued again plans afresh when admitted (its plan is cleared).
pub fn queued_status(status: &OperatorStatus, why: &QueueReason, now: Timestamp) -> OperatorStatus {
    let mut s = status.clone();
    let reason = match s.budget.as_deref() {
        Some(old) if s.phase == Some(Phase::Queued) && s.waiting_for == Some(why.1) => {
            old.to_string()
        }
        _ => why.0.clone(),
    };
    let reason = reason.as_str();
    if s.phase != Some(Phase::Queued) {
        s.phase = Some(Phase::Queued);
        s.phase_since = Some(Time(now));
    }
    s.action = Some("waiting: budget".into());
    s.plan = None;
    s.budget = Some(reason.to_string());
    s.waiting_for = Some(why.1);
    let c = Condition {
        type_: cond::ADMITTED.into(),
        status: "False".into(),
        reason: "BudgetFull".into(),
        message: reason.to_string(),
        last_transition_time: s
            .condition(cond::ADMITTED)
            .filter(|c| c.status == "False")
            .map_or(Time(now), |c| c.last_transition_time.clone()),
        observed_generation: None,
    };
    let list = s.conditions.get_or_insert_with(Vec::new);
    list.retain(|x| x.type_ != cond::ADMITTED);
    list.push(c);
    s
}

/// How long a wedge waiting for budget sleeps before it looks again on its own: 30 s plus a
/// second per wedge queued ahead of it, at most 5 minutes. Wedges are woken when a place is
/// given back (`wake`); this timer is only the safety net, and spreading it by queue position
/// keeps a storm's hundreds of queued wedges from all waking in the same second, every 30 s,
/// ahead of the ones a release just let in (measured: 8.8 such reconciles per wedge in the
/// 1,000-node storm, waits of up to 40 s for a permit).
pub fn queue_recheck(ahead: usize) -> Duration {
    Duration::from_secs(30 + ahead as u64).min(Duration::from_secs(300))
}

/// Queued for budget ([`queued_status`]), announced when the reason shown changes; it looks
/// again after [`queue_recheck`].
fn queued(d: Draft, reason: &QueueReason) -> Decision {
    let now = d.input.now;
    let ahead = match &d.input.policy {
        Governance::Policy(pv) => pv.waiting_ahead.len(),
        _ => 0,
    };
    let status = queued_status(&d.new, reason, now);
    let note = match &status.budget {
        shown if *shown != d.old.budget => note(
            false,
            "Queued",
            format!(
                "waiting for budget: {}",
                shown.as_deref().unwrap_or(&reason.0)
            ),
        ),
        _ => None,
    };
    Decision {
        status,
        step: wait(queue_recheck(ahead), reason.0.clone()),
        note,
    }
}
