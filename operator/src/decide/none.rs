//! The `none` path: the driver recovered by itself (docs/design.md §3 "none"). Nothing is
//! cordoned; per `none.action` the wedge is recorded only, or the blamed pod or the device's
//! consumers are evicted within the policy's `none` budget, rate-limited per device.

use std::collections::BTreeSet;
use std::ops::ControlFlow::{Break, Continue};

use unwedge_crds::{Admission, BudgetUnit, NoneAction, Phase, PodRef};

use super::draft::{Draft, Flow, note, pods_text, wait};
use super::drain::{AWAITING_AGENT, agent_reported, drain};
use super::hold::{dry_run, gate};
use super::queue::admit_or_queue;
use super::{Decision, Input, PolicyView, REQUEUE_FAST, Step, cond};
use crate::budget::Candidate;

/// The `none` path of the wedge, from its admission to Recovered.
pub(super) fn decide_none(
    mut d: Draft,
    input: &Input,
    pv: &PolicyView,
    held: Option<&Admission>,
    name: &str,
) -> Flow<Decision> {
    let s = pv.settings;
    let spec = &input.wedge.spec;
    let status = input.wedge.status.clone().unwrap_or_default();
    let phase = d.new.phase.unwrap_or_default();
    let (verb, targets, why_none): (&str, Vec<PodRef>, &str) = match s.none_action {
        NoneAction::Ignore => ("record", vec![], "none.action is Ignore"),
        NoneAction::EvictBlamed => match spec.blamed.as_ref().and_then(|b| b.pod.clone()) {
            Some(p) => (
                "evict-blamed",
                vec![PodRef {
                    container: None,
                    ..p
                }],
                "",
            ),
            None => ("evict-blamed", vec![], "the driver blamed no pod"),
        },
        NoneAction::EvictConsumers if !agent_reported(input.wedge) => {
            return Break(d.done(wait(REQUEUE_FAST, AWAITING_AGENT), None));
        }
        NoneAction::EvictConsumers => {
            let pods: BTreeSet<PodRef> = status
                .consumers
                .iter()
                .flatten()
                .filter(|c| c.pci_address == spec.device.pci_address)
                .map(|c| PodRef {
                    namespace: c.namespace.clone(),
                    name: c.pod.clone(),
                    container: None,
                })
                .collect();
            (
                "evict-consumers",
                pods.into_iter().collect(),
                "no pod holds the device",
            )
        }
    };
    let recovered = |mut d: Draft, how: String| {
        d.phase(Phase::Recovered).action(how.clone());
        d.new.finished_at = Some(d.now());
        d.new.budget = None;
        d.new.waiting_for = None;
        d.condition(
            cond::RECOVERED,
            true,
            "DriverRecovered",
            format!("the driver recovered by itself; {how}"),
        );
        let step = if held.is_some() {
            Step::Release
        } else {
            Step::Nothing
        };
        d.done(
            step,
            note(
                false,
                "DriverRecovered",
                format!("the driver recovered by itself; {how}"),
            ),
        )
    };

    if matches!(phase, Phase::Detected | Phase::Queued) {
        if targets.is_empty() {
            return Break(recovered(d, format!("recorded only: {why_none}")));
        }
        let window = jiff::SignedDuration::try_from(s.none_min_interval)
            .unwrap_or(jiff::SignedDuration::MAX);
        if let Some(last) = input
            .history
            .iter()
            .filter_map(|h| h.evicted_at)
            .filter(|t| input.now.duration_since(*t) < window)
            .max()
        {
            return Break(recovered(
                d,
                format!(
                    "recorded only: rate-limited (the device's last eviction round was at {last}, none.minInterval {:?})",
                    s.none_min_interval
                ),
            ));
        }
        if held.is_some_and(|h| h.unit == BudgetUnit::None) {
            d.phase(Phase::Restarting).action(verb);
            d.new.budget = None;
            d.new.waiting_for = None;
            d.condition(cond::ADMITTED, true, "Admitted", "within the none budget");
            return Break(d.done(Step::Nothing, None));
        }
        if dry_run(input, s) && !s.paused && !pv.breaker_tripped {
            let list = pods_text(&targets);
            d.condition(
                cond::DRY_RUN,
                true,
                "DryRun",
                format!("dry run: would evict {list}"),
            );
            return Break(recovered(d, format!("dry-run: would evict {list}")));
        }
        let d = gate(d, pv, &format!("evict {}", pods_text(&targets)))?;
        let cand = Candidate {
            wedge: name.into(),
            node: spec.node_name.clone(),
            unit: BudgetUnit::None,
            reboot: false,
        };
        return Break(admit_or_queue(d, pv, cand));
    }

    // Restarting: evict the targets, then done.
    let d = drain(d, input, pv, &targets, verb)?;
    Continue(recovered(d, format!("{verb}: done")))
}
