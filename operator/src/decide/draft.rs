//! The draft a decision is built in (a copy of the stored operator status, edited), and the
//! small helpers every step of the walk shares.

use std::ops::ControlFlow;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use unwedge_crds::{Method, Phase, Plan, PodRef};

use super::{Attention, Decision, Input, Note, REQUEUE_IDLE, Step, cond};
use crate::status::OperatorStatus;

/// Where a step of the walk leaves it: `Continue` with what the next step needs (the draft,
/// or a decision the step reached), or `Break` with the decision that ends the walk early (a
/// hold, a wait, an effect to perform first). `?` returns the early decision.
pub(super) type Flow<T> = ControlFlow<Decision, T>;

/// The decision a walk reached: early (`Break`) or at its last step (`Continue`).
pub(super) fn settle(flow: Flow<Decision>) -> Decision {
    match flow {
        ControlFlow::Break(d) | ControlFlow::Continue(d) => d,
    }
}

/// Builds the decision: a copy of the stored operator status, edited.
pub(super) struct Draft<'a> {
    pub(super) input: &'a Input<'a>,
    pub(super) old: OperatorStatus,
    pub(super) new: OperatorStatus,
}

impl<'a> Draft<'a> {
    pub(super) fn new(input: &'a Input<'a>) -> Draft<'a> {
        let old = input
            .wedge
            .status
            .as_ref()
            .map(OperatorStatus::of)
            .unwrap_or_default();
        let mut new = old.clone();
        // Holds are re-derived every time; a decision that proceeds drops them.
        if let Some(c) = new.conditions.as_mut() {
            c.retain(|c| c.type_ != cond::PAUSED && c.type_ != cond::DRY_RUN);
        }
        if new.phase.is_none() {
            new.phase = Some(Phase::Detected);
        }
        new.observed_generation = input.wedge.metadata.generation;
        Draft { input, old, new }
    }

    /// The decision's clock, as a status time.
    pub(super) fn now(&self) -> Time {
        Time(self.input.now)
    }

    /// Moves to phase `p`; `phaseSince` changes only when the stored phase does.
    pub(super) fn phase(&mut self, p: Phase) -> &mut Self {
        if self.new.phase != Some(p) || self.new.phase_since.is_none() {
            if self.old.phase != Some(p) || self.old.phase_since.is_none() {
                self.new.phase_since = Some(self.now());
            }
            self.new.phase = Some(p);
        }
        self
    }

    /// Sets the action text (`status.action`, what a human reads).
    pub(super) fn action(&mut self, a: impl Into<String>) -> &mut Self {
        self.new.action = Some(a.into());
        self
    }

    /// Records the plan: `method` with attempt id `attempt`, and its rung on `ladder`.
    pub(super) fn plan(
        &mut self,
        method: &Method,
        attempt: u32,
        ladder: Option<&[Method]>,
    ) -> &mut Self {
        let rung = ladder
            .and_then(|l| l.iter().position(|m| m == method))
            .map(|p| p as u32 + 1);
        self.new.plan = Some(Plan {
            method: method.clone(),
            attempt,
            rung,
        });
        self
    }

    /// Sets a condition; its transition time moves only when its status does.
    pub(super) fn condition(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> &mut Self {
        let status = if status { "True" } else { "False" }.to_string();
        let message = message.into();
        let since = match self.old.condition(type_) {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => self.now(),
        };
        let c = Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: since,
            observed_generation: self.input.wedge.metadata.generation,
        };
        let list = self.new.conditions.get_or_insert_with(Vec::new);
        match list.iter_mut().find(|x| x.type_ == type_) {
            Some(x) => *x = c,
            None => list.push(c),
        }
        self
    }

    /// The decision: this status, then `step`, announced by `note`.
    pub(super) fn done(self, step: Step, note: Option<Note>) -> Decision {
        Decision {
            status: self.new,
            step,
            note,
        }
    }
}

/// An Event to publish with the status change.
pub(super) fn note(warning: bool, reason: &str, message: impl Into<String>) -> Option<Note> {
    Some(Note {
        warning,
        reason: reason.into(),
        message: message.into(),
    })
}

/// Come back after `after`, saying why (for the log).
pub(super) fn wait(after: Duration, why: impl Into<String>) -> Step {
    Step::Wait {
        requeue_after: after,
        why: why.into(),
    }
}

/// `namespace/name` of each pod, comma-separated.
pub(super) fn pods_text(p: &[PodRef]) -> String {
    let names: Vec<String> = p
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    names.join(", ")
}

/// The wedge needs a human: NeedsAttention, with what happened and what to do.
pub(super) fn attention(mut d: Draft, a: Attention) -> Decision {
    let msg = format!("{}. To do: {}", a.message, a.todo);
    d.phase(Phase::NeedsAttention)
        .action(format!("needs attention: {}", a.reason));
    d.condition(cond::NEEDS_ATTENTION, true, a.reason, msg.clone());
    d.done(wait(REQUEUE_IDLE, a.reason), note(true, a.reason, msg))
}
