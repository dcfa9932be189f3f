//! Holds: a paused policy, a tripped circuit breaker and a dry run (the policy's or the
//! agent's) let nothing new be disrupted; the walk stops where it would have (docs/design.md §4).

use std::ops::ControlFlow::{Break, Continue};

use super::draft::{Draft, Flow, note, wait};
use super::{Input, PolicyView, REQUEUE_IDLE, REQUEUE_SLOW, cond};
use crate::settings::Settings;

/// Whether nothing may be disrupted for the wedge: its policy is in dry run, or the agent that
/// reported it runs with `--dry-run` (it would not act on an approval anyway).
pub(super) fn dry_run(input: &Input, s: &Settings) -> bool {
    s.dry_run
        || input
            .wedge
            .status
            .as_ref()
            .and_then(|st| st.agent_dry_run)
            .unwrap_or(false)
}

/// Paused, tripped or dry-run policies allow no new cordons, evictions or approvals: the walk
/// goes on with the draft, or ends with the holding decision (saying it would `what`).
pub(super) fn gate<'a>(mut d: Draft<'a>, pv: &PolicyView, what: &str) -> Flow<Draft<'a>> {
    let s = pv.settings;
    if s.paused || pv.breaker_tripped {
        let (reason, why) = if s.paused {
            (
                "PolicyPaused",
                format!("RecoveryPolicy {} is paused", pv.name),
            )
        } else {
            (
                "CircuitBreakerTripped",
                format!(
                    "the circuit breaker of RecoveryPolicy {} tripped (too many wedges); change the annotation unwedge.io/resume on it to resume",
                    pv.name
                ),
            )
        };
        let msg = format!("{why}: would {what}");
        d.action(format!("held: would {what}"));
        d.condition(cond::PAUSED, true, reason, msg.clone());
        return Break(d.done(wait(REQUEUE_SLOW, why), note(true, reason, msg)));
    }
    if dry_run(d.input, s) {
        let msg = if s.dry_run {
            format!("dry run (RecoveryPolicy {}): would {what}", pv.name)
        } else {
            format!(
                "dry run (the agent on {} runs with --dry-run): would {what}",
                d.input.wedge.spec.node_name
            )
        };
        d.action(format!("dry-run: would {what}"));
        d.condition(cond::DRY_RUN, true, "DryRun", msg.clone());
        return Break(d.done(wait(REQUEUE_IDLE, "dry run"), note(false, "DryRun", msg)));
    }
    Continue(d)
}
