//! The decision core: given a GpuWedge and what surrounds it, what happens next.
//!
//! Pure: `decide` takes values and returns the status to persist and one effect to perform,
//! in that order. Every call recomputes from stored state (level-triggered), so a decision
//! that was persisted but not acted on is simply made again by the next reconcile.
//!
//! `decide` settles what every wedge shares (an ending, a human's abandon, the finalizer, a
//! deleted node, the governing policy, a new method list), then walks the `none` path (`none`)
//! or the recovery (`recovery`), with the views it reads (`views`), the plan (`ladder`), the
//! queue for budget (`queue`), the holds (`hold`), the drain (`drain`), the approval
//! (`approval`), the attempt (`attempt`) and what a wedge lets go of (`release`). Each step
//! edits a `Draft` and returns a `Flow`: on to the next step, or the decision that ends the walk.

use std::time::Duration;

use unwedge_crds::{Method, Phase, PodRef};

use crate::budget::Candidate;
use crate::status::OperatorStatus;

mod approval;
mod attempt;
mod draft;
mod drain;
mod hold;
mod ladder;
mod none;
mod queue;
mod recovery;
mod release;
mod report;
mod views;

pub use attempt::next_attempt;
pub use drain::reads_pods;
pub use ladder::{ladder, plan_methods, plans_none, with_vendor_hint, without_driver};
pub use none::none_round_at;
pub use queue::{queue_recheck, queued_status};
pub use release::{Heir, cordon_heir, places_to_release};
pub use report::{REPORT_GRACE, awaits_report};
pub use views::{
    DraView, Governance, Input, NodeView, PastWedge, PodView, PolicyView, Verbs, arrived,
};

use draft::{Draft, note, settle, wait};
use recovery::Recovery;
use release::{release_cordon, unfinalized_hold};

/// The one effect to perform after the status is persisted.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing to do; requeue soon if the status changed.
    Nothing,
    /// Come back later.
    Wait {
        /// When.
        requeue_after: Duration,
        /// Why (for logs).
        why: String,
    },
    /// Add (or upgrade) the wedge in the policy ledger by compare-and-swap.
    Admit {
        /// What it asks for.
        candidate: Candidate,
        /// It already holds its node (ledger lost or repaired): record it whatever the budget.
        reclaim: bool,
    },
    /// Remove the wedge from the policy ledger.
    Release,
    /// Cordon the node and annotate `unwedge.io/cordoned-by=<wedge>`.
    Cordon,
    /// Create the DeviceTaintRule that keeps new claims off the wedged DRA device (docs/design.md §5).
    Quarantine,
    /// Delete unwedge's DeviceTaintRule of this wedge (it is Recovered).
    Unquarantine,
    /// Pass the cordon to another open wedge of the node instead of uncordoning.
    HandOverCordon {
        /// The wedge that keeps the node cordoned.
        to: String,
    },
    /// Uncordon the node and remove the annotation (only ever for a cordon unwedge made).
    Uncordon,
    /// Put the operator's finalizer on the wedge: it holds a ledger place or the node's cordon
    /// without it, so a deletion would take it away with nothing released.
    Finalize,
    /// Evict these pods through the Eviction API.
    Evict {
        /// The pods.
        pods: Vec<PodRef>,
    },
    /// Delete these pods (drain.force at the timeout).
    ForceDelete {
        /// The pods.
        pods: Vec<PodRef>,
    },
    /// Remove honoured human-verb annotations.
    ClearVerbs {
        /// Annotation keys.
        keys: Vec<String>,
    },
}

/// An Event to publish when the status change is persisted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// The Event reason (CamelCase).
    pub reason: String,
    /// The Event note.
    pub message: String,
}

/// What to persist, then what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The operator part of the status to write first.
    pub status: OperatorStatus,
    /// The effect after the status is stored.
    pub step: Step,
    /// An Event about the transition.
    pub note: Option<Note>,
}

/// Why a wedge needs a human, with what the human should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attention {
    /// Condition reason.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
    /// What a human must do.
    pub todo: String,
}

const REQUEUE_FAST: Duration = Duration::from_secs(2);
const REQUEUE_SLOW: Duration = Duration::from_secs(60);
const REQUEUE_IDLE: Duration = Duration::from_secs(300);

/// The condition types the operator writes.
pub mod cond {
    /// Which policy governs (False: NoPolicy, PolicyConflict, InvalidPolicy).
    pub const GOVERNED: &str = "Governed";
    /// Holds a place in the budget (False: BudgetFull).
    pub const ADMITTED: &str = "Admitted";
    /// The node is cordoned (reason CordonedByUnwedge or AlreadyCordoned).
    pub const CORDONED: &str = "Cordoned";
    /// Only the DRA device is tainted (DeviceTaintRule); the node keeps serving.
    pub const QUARANTINED: &str = "Quarantined";
    /// The device's pods are gone (False: Evicting, EvictionRefused).
    pub const DRAINED: &str = "Drained";
    /// An attempt is approved (False: AwaitingApproval, AttemptFailed).
    pub const APPROVED: &str = "Approved";
    /// The device works again.
    pub const RECOVERED: &str = "Recovered";
    /// A human must act; the message says what.
    pub const NEEDS_ATTENTION: &str = "NeedsAttention";
    /// Automatic actions are held (PolicyPaused, CircuitBreakerTripped).
    pub const PAUSED: &str = "Paused";
    /// The policy is in dry-run: the message says what would be done.
    pub const DRY_RUN: &str = "DryRun";
    /// A human abandoned the wedge.
    pub const ABANDONED: &str = "Abandoned";
}

/// Decides what happens next to `input.wedge`.
pub fn decide(input: &Input) -> Decision {
    let mut d = Draft::new(input);
    let name = input.wedge.metadata.name.clone().unwrap_or_default();
    let phase = d.new.phase.unwrap_or_default();
    let ours = input
        .node
        .is_some_and(|n| n.cordoned_by.as_deref() == Some(name.as_str()));
    let held = match &input.policy {
        Governance::Policy(p) => p.ledger.iter().find(|a| a.wedge == name).cloned(),
        _ => None,
    };

    if phase.is_terminal() {
        return ended(d, input, phase, held.is_some(), ours);
    }

    if let Some(reason) = input.verbs.abandon.clone() {
        let by = input
            .verbs
            .by
            .clone()
            .unwrap_or_else(|| "an unnamed user".into());
        let msg = format!(
            "abandoned by {by}: {reason}; unwedge lets go of the node and leaves it as it is"
        );
        let n = note(false, "Abandoned", msg.clone());
        return abandoned(d, format!("abandoned by {by}"), "ByHuman", msg, n);
    }

    if unfinalized_hold(input, held.is_some(), ours) {
        return d.done(Step::Finalize, None);
    }

    if input.node_deleted {
        let node = input.wedge.spec.node_name.clone();
        let msg = format!(
            "node {node} was deleted: the incident ends here and its budget place is released"
        );
        let n = note(true, "NodeDeleted", msg.clone());
        return abandoned(
            d,
            format!("abandoned: node {node} deleted"),
            "NodeDeleted",
            msg,
            n,
        );
    }

    let pv = match &input.policy {
        Governance::Policy(p) => p,
        Governance::NoPolicy => {
            let node = input.wedge.spec.node_name.clone();
            let msg = format!(
                "no RecoveryPolicy selects node {node} and there is no default policy: create one"
            );
            return ungoverned(d, "no policy", "NoPolicy", msg);
        }
        Governance::Conflict(names) => {
            let msg = format!(
                "policies {} all select node {}: make their nodeSelectors disjoint (or keep one default)",
                names.join(", "),
                input.wedge.spec.node_name
            );
            return ungoverned(d, "policy conflict", "PolicyConflict", msg);
        }
        Governance::Invalid { name: p, error } => {
            let msg = format!("policy {p} cannot be used: {error}");
            return ungoverned(d, "invalid policy", "InvalidPolicy", msg);
        }
    };
    d.new.policy = Some(pv.name.to_string());
    d.condition(
        cond::GOVERNED,
        true,
        "Matched",
        format!("governed by RecoveryPolicy {}", pv.name),
    );

    let methods = plan_methods(input.wedge);
    let replan_note = replan(&mut d, phase, &methods);
    let planned = d.new.methods.as_deref().map_or(methods, Method::parse_list);
    let decision = settle(if planned.first() == Some(&Method::None) {
        none::decide_none(d, input, pv, held.as_ref(), &name)
    } else {
        let r = Recovery::new(&mut d, input, pv, held.as_ref(), &name, &planned, ours);
        r.walk(d)
    });
    match (decision.note.is_none(), replan_note) {
        (true, Some(n)) => Decision {
            note: Some(n),
            ..decision
        },
        _ => decision,
    }
}

/// A Recovered or Abandoned wedge lets go: of the node's cordon if unwedge made it for this
/// wedge, of its DeviceTaintRule once recovered (or its node is gone), then of its place.
fn ended(mut d: Draft, input: &Input, phase: Phase, placed: bool, ours: bool) -> Decision {
    if phase == Phase::Recovered && ours {
        return release_cordon(d, input);
    }
    if (phase == Phase::Recovered || input.node_deleted) && input.quarantine_rule {
        d.new.quarantine_rule = None;
        d.condition(
            cond::QUARANTINED,
            false,
            "Released",
            "the device is recovered or its node is gone: its DeviceTaintRule is deleted",
        );
        return d.done(
            Step::Unquarantine,
            note(
                false,
                "Unquarantined",
                "the device is recovered or its node is gone: deleting its DeviceTaintRule",
            ),
        );
    }
    if placed {
        d.done(Step::Release, None)
    } else {
        d.done(Step::Nothing, None)
    }
}

/// Abandoned (by a human, or its node is gone): the incident ends and what it holds is released.
fn abandoned(mut d: Draft, action: String, reason: &str, msg: String, n: Option<Note>) -> Decision {
    d.phase(Phase::Abandoned).action(action);
    d.new.finished_at = Some(d.now());
    d.new.budget = None;
    d.new.waiting_for = None;
    d.condition(cond::ABANDONED, true, reason, msg);
    d.done(Step::Release, n)
}

/// No usable policy governs the wedge (`reason`, `msg`): it waits, saying so.
fn ungoverned(mut d: Draft, why: &str, reason: &str, msg: String) -> Decision {
    d.action(format!("waiting: {why}"));
    d.condition(cond::GOVERNED, false, reason, msg.clone());
    d.done(wait(REQUEUE_SLOW, why), note(true, reason, msg))
}

/// Plans from the kernel's newest method list when it changed (`methods`): a drain, an
/// approval or a human's look goes back to the cordon, a `none` restart back to Detected.
/// Never under a running attempt: that one re-plans when it ends. Returns the Event to publish.
fn replan(d: &mut Draft, phase: Phase, methods: &[Method]) -> Option<Note> {
    let joined = Method::join(methods);
    if d.old.methods.as_deref() == Some(joined.as_str()) {
        return None;
    }
    let in_attempt = matches!(
        phase,
        Phase::Approved | Phase::Recovering | Phase::Verifying
    );
    if d.old.methods.is_some() && in_attempt {
        // Never pull the rug from under a running attempt: re-plan when it ends.
        return None;
    }
    let is_none = methods.first() == Some(&Method::None);
    let mut replan_note = None;
    if let Some(old) = d.old.methods.clone() {
        replan_note = note(
            false,
            "Replanned",
            format!("the kernel now lists {joined} (was {old}): planning from the newer list"),
        );
        if !is_none && matches!(phase, Phase::Restarting) {
            d.phase(Phase::Detected);
        } else if !is_none
            && matches!(
                phase,
                Phase::Draining | Phase::AwaitingApproval | Phase::NeedsAttention
            )
        {
            d.phase(Phase::Cordoned);
        }
    }
    d.new.methods = Some(joined);
    d.new.plan = None;
    replan_note
}

#[cfg(test)]
mod tests;
