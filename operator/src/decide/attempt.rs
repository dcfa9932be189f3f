//! The attempt an agent carries out: waiting for its report, escalating to the next rung when
//! it fails or times out, verifying that the device is back, and the ending — Recovered, or a
//! human (docs/design.md §3).

use std::time::Duration;

use unwedge_crds::{Approval, AttemptOutcome, GpuWedgeStatus, Method, Phase};

use super::draft::{Draft, attention, note, wait};
use super::ladder::plan_methods;
use super::recovery::Recovery;
use super::release::release_cordon;
use super::{Attention, Decision, Step, cond};

/// The next unused attempt id (ids only ever grow, so an agent never re-runs one).
pub fn next_attempt(s: &GpuWedgeStatus) -> u32 {
    let a = s.approval.as_ref().map_or(0, |a| a.attempt);
    let r = s
        .attempts
        .iter()
        .flatten()
        .map(|a| a.attempt)
        .max()
        .unwrap_or(0);
    a.max(r) + 1
}

impl<'a> Recovery<'a> {
    /// Approved, Recovering or Verifying: follows the agent's report of the approved attempt.
    pub(super) fn attempt_progress(&self, mut d: Draft<'a>) -> Decision {
        let (input, s, status) = (self.input, self.pv.settings, &self.status);
        let Some(appr) = status.approval.clone() else {
            // Approved without an approval cannot be; start over from the cordon.
            d.phase(Phase::Cordoned);
            return d.done(Step::Nothing, None);
        };
        let tag = format!("{}#{}", appr.method, appr.attempt);
        let result = status
            .attempts
            .iter()
            .flatten()
            .find(|a| a.attempt == appr.attempt);
        let timeout =
            jiff::SignedDuration::try_from(s.verify_timeout).unwrap_or(jiff::SignedDuration::MAX);
        let elapsed = input.now.duration_since(appr.at.0);
        let left = timeout
            .checked_sub(elapsed)
            .map_or(Duration::from_secs(10), |l| l.unsigned_abs())
            .min(Duration::from_secs(10))
            .max(Duration::from_secs(1));
        match result.map(|r| r.result) {
            None | Some(AttemptOutcome::Started) | Some(AttemptOutcome::Blocked) => {
                if elapsed >= timeout {
                    return self.escalate(
                        d,
                        &appr,
                        format!(
                            "{tag} timed out after {:?} (verifyTimeout)",
                            s.verify_timeout
                        ),
                    );
                }
                if let Some(r) = result {
                    d.phase(Phase::Recovering);
                    if r.result == AttemptOutcome::Blocked {
                        d.action(format!("{tag} blocked"));
                        d.condition(
                            cond::DRAINED,
                            false,
                            "DeviceHeld",
                            format!("the agent waits: {}", r.message),
                        );
                    } else {
                        d.action(tag.clone());
                    }
                }
                d.done(wait(left, format!("agent carrying out {tag}")), None)
            }
            Some(AttemptOutcome::Failed) => {
                let msg = result.map(|r| r.message.clone()).unwrap_or_default();
                self.escalate(d, &appr, format!("{tag} failed: {msg}"))
            }
            Some(AttemptOutcome::Refused) => {
                let msg = result.map(|r| r.message.clone()).unwrap_or_default();
                attention(
                    d,
                    Attention {
                        reason: "ApprovalRefused",
                        message: format!("the agent refused {tag} and touched nothing: {msg}"),
                        todo: "check that the GpuWedge names a GPU the node's agent detected (a hand-made or forged GpuWedge is refused by design); annotate unwedge.io/abandon to release the node".into(),
                    },
                )
            }
            Some(AttemptOutcome::DryRun) => {
                let msg = result.map(|r| r.message.clone()).unwrap_or_default();
                attention(
                    d,
                    Attention {
                        reason: "DryRun",
                        message: format!("the agent runs with --dry-run and only reported what {tag} would do: {msg}"),
                        todo: "turn off the agent's dry run (chart value agent.dryRun) to let it act, then annotate unwedge.io/retry; or annotate unwedge.io/abandon".into(),
                    },
                )
            }
            Some(AttemptOutcome::Succeeded) => {
                let started = result.map_or(appr.at.0, |r| r.started_at.0);
                let wedged_again = status.events.iter().flatten().any(|e| e.at.0 > started);
                if wedged_again {
                    d.phase(Phase::Cordoned).action("re-plan");
                    d.new.plan = None;
                    d.new.methods = Some(Method::join(&plan_methods(input.wedge)));
                    return d.done(
                        Step::Nothing,
                        note(
                            true,
                            "WedgedAgain",
                            format!("the device wedged again during {tag}: re-planning"),
                        ),
                    );
                }
                if d.new.phase != Some(Phase::Verifying) {
                    d.phase(Phase::Verifying).action(format!("verify {tag}"));
                    return d.done(
                        Step::Nothing,
                        note(false, "AttemptSucceeded", format!("{tag} succeeded")),
                    );
                }
                // The agent asked its kubelet once, after waiting: its "no" is final. A DRA
                // node's ResourceSlices are read anew on every reconcile, so that "no" may change.
                if input.device_advertised.is_none()
                    && result.and_then(|r| r.advertised) == Some(false)
                {
                    return attention(d, Attention {
                        reason: "NotAdvertised",
                        message: format!("{tag} succeeded but the node's device plugin does not advertise the device again (the kubelet does not list it as allocatable)"),
                        todo: "check the device plugin on the node (its pod, its logs, the device's health), then annotate unwedge.io/retry or unwedge.io/abandon".into(),
                    });
                }
                if input.device_advertised == Some(false) {
                    if elapsed >= timeout {
                        return attention(d, Attention {
                            reason: "NotAdvertised",
                            message: format!("{tag} succeeded but the device is not advertised again after {:?}", s.verify_timeout),
                            todo: "check the device plugin or DRA driver on the node, then annotate unwedge.io/retry or unwedge.io/abandon".into(),
                        });
                    }
                    return d.done(wait(left, "waiting for the device to be advertised"), None);
                }
                if self.ours {
                    return release_cordon(d, input);
                }
                d.phase(Phase::Recovered)
                    .action(format!("recovered by {tag}"));
                d.new.finished_at = Some(d.now());
                let msg = format!("recovered by {tag}");
                d.condition(cond::RECOVERED, true, "Succeeded", msg.clone());
                d.condition(cond::NEEDS_ATTENTION, false, "Recovered", "");
                d.done(Step::Release, note(false, "Recovered", msg))
            }
        }
    }

    /// The attempt `appr` failed (`why`): the next rung of the ladder, a new attempt id, or a
    /// human when no rung (or no attempt) is left.
    fn escalate(&self, mut d: Draft<'a>, appr: &Approval, why: String) -> Decision {
        let (status, pv) = (&self.status, self.pv);
        let ladder = self.plan.as_deref().ok();
        let n = next_attempt(status);
        let next = ladder.and_then(|l| {
            let pos = l.iter().position(|m| *m == appr.method)?;
            l.get(pos + 1).cloned()
        });
        match next {
            Some(rung) if n <= pv.settings.max_attempts => {
                d.phase(Phase::Draining)
                    .action(format!("drain for {rung}#{n}"))
                    .plan(&rung, n, ladder);
                d.new.phase_since = Some(d.now());
                let msg = format!("{why}; escalating to {rung}#{n}");
                d.condition(cond::APPROVED, false, "AttemptFailed", msg.clone());
                d.done(Step::Nothing, note(true, "Escalating", msg))
            }
            _ => {
                let tried: Vec<String> = status
                    .attempts
                    .iter()
                    .flatten()
                    .map(|a| format!("{}#{} {:?}", a.method, a.attempt, a.result))
                    .collect();
                attention(
                    d,
                    Attention {
                        reason: "LadderExhausted",
                        message: format!("{why}; no rung left (attempts: {}; maxAttempts {})", tried.join(", "), pv.settings.max_attempts),
                        todo: "inspect the device; annotate unwedge.io/retry for another attempt of the last rung, unwedge.io/approve=<method> for another method, or unwedge.io/abandon".into(),
                    },
                )
            }
        }
    }
}
