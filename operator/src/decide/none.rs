//! The `none` path: the driver recovered by itself (docs/design.md §4 "none"). Nothing is
//! cordoned and the device is never touched. `none.action` picks the containers (the blamed
//! task's, or every consumer of the device), within the policy's `none` budget, rate-limited per
//! device; `none.restart` says how they restart: in place (method `restart`, carried out by the
//! agent through the container runtime) or by eviction. A container that cannot restart in place
//! has its pod evicted instead, with the reason recorded.

use std::collections::BTreeSet;
use std::ops::ControlFlow::{Break, Continue};
use std::time::Duration;

use jiff::Timestamp;
use unwedge_crds::{
    Admission, Approval, AttemptOutcome, BudgetUnit, ContainerTarget, GpuWedgeStatus, Method,
    NoneAction, Phase, PodRef, RestartMode, RestartResult,
};

use super::attempt::next_attempt;
use super::draft::{Draft, Flow, attention, note, pods_text, wait};
use super::drain::{AWAITING_AGENT, agent_reported, drain, node_pod};
use super::hold::{dry_run, gate};
use super::queue::admit_or_queue;
use super::{Attention, Decision, Input, PolicyView, REQUEUE_FAST, Step, cond};
use crate::budget::Candidate;

/// When the wedge last started a `none` round on its device: an eviction, or the approval of an
/// in-place restart (what `none.minInterval` counts from).
pub fn none_round_at(s: &GpuWedgeStatus) -> Option<Timestamp> {
    let evicted = s.evictions.iter().flatten().map(|e| e.at.0).max();
    let restarted = s
        .approval
        .as_ref()
        .filter(|a| a.method == Method::Restart.as_str())
        .map(|a| a.at.0);
    evicted.max(restarted)
}

/// The containers `none.action` picks (pod and container name), the verb's stem, and why there
/// are none when there are none. `None`: the agent's consumer report is still missing.
fn chosen(input: &Input, action: NoneAction) -> Option<(Vec<PodRef>, &'static str, &'static str)> {
    let spec = &input.wedge.spec;
    Some(match action {
        NoneAction::Ignore => (vec![], "record", "none.action is Ignore"),
        NoneAction::EvictBlamed => match spec.blamed.as_ref().and_then(|b| b.pod.clone()) {
            Some(p) => (vec![p], "blamed", ""),
            None => (vec![], "blamed", "the driver blamed no pod"),
        },
        NoneAction::EvictConsumers if !agent_reported(input.wedge) => return None,
        NoneAction::EvictConsumers => {
            let containers: BTreeSet<PodRef> = input
                .wedge
                .status
                .iter()
                .flat_map(|s| s.consumers.iter().flatten())
                .filter(|c| c.pci_address == spec.device.pci_address)
                .map(|c| PodRef {
                    namespace: c.namespace.clone(),
                    name: c.pod.clone(),
                    container: Some(c.container.clone()),
                })
                .collect();
            (
                containers.into_iter().collect(),
                "consumers",
                "no pod holds the device",
            )
        }
    })
}

/// The pods of `containers`, each once.
fn pods_of(containers: &[PodRef]) -> Vec<PodRef> {
    let pods: BTreeSet<PodRef> = containers
        .iter()
        .map(|c| PodRef {
            container: None,
            ..c.clone()
        })
        .collect();
    pods.into_iter().collect()
}

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
    let phase = d.new.phase.unwrap_or_default();
    let Some((containers, stem, why_none)) = chosen(input, s.none_action) else {
        return Break(d.done(wait(REQUEUE_FAST, AWAITING_AGENT), None));
    };
    let in_place = s.none_restart == RestartMode::InPlace && stem != "record";
    let verb = match (stem, in_place) {
        ("record", _) => "record".to_string(),
        (stem, true) => format!("restart-{stem}"),
        (stem, false) => format!("evict-{stem}"),
    };
    let how = if in_place { "restart" } else { "evict" };
    let pods = pods_of(&containers);
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
        if pods.is_empty() {
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
                    "recorded only: rate-limited (the device's last restart or eviction round was at {last}, none.minInterval {:?})",
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
            let list = pods_text(if in_place { &containers } else { &pods });
            d.condition(
                cond::DRY_RUN,
                true,
                "DryRun",
                format!("dry run: would {how} {list}"),
            );
            return Break(recovered(d, format!("dry-run: would {how} {list}")));
        }
        let d = gate(d, pv, &format!("{how} {}", pods_text(&pods)))?;
        let cand = Candidate {
            wedge: name.into(),
            node: spec.node_name.clone(),
            unit: BudgetUnit::None,
            reboot: false,
        };
        return Break(admit_or_queue(d, pv, cand));
    }

    if !in_place {
        // Restarting by eviction: evict the pods, then done.
        let d = drain(d, input, pv, &pods, &verb)?;
        return Continue(recovered(d, format!("{verb}: done")));
    }
    let (d, restarted, mut evict) = restart_in_place(d, input, pv, &containers, &verb)?;
    evict.sort();
    evict.dedup();
    let targets: Vec<PodRef> = evict.iter().map(|(p, _)| p.clone()).collect();
    let d = drain(d, input, pv, &targets, &verb)?;
    let mut done = format!("{verb}: restarted {restarted} in place");
    if !evict.is_empty() {
        let why: Vec<String> = evict
            .iter()
            .map(|(p, why)| format!("{}/{} ({why})", p.namespace, p.name))
            .collect();
        done.push_str(&format!("; evicted {}", why.join(", ")));
    }
    Continue(recovered(d, done))
}

/// Where an in-place round stands once the agent is done: the draft, how many containers
/// restarted in place, and the pods to evict instead, each with the reason.
type InPlace<'a> = (Draft<'a>, usize, Vec<(PodRef, String)>);

/// The in-place part of a `Restarting` wedge: approve method `restart` for the containers that
/// can restart in place, wait for the agent's report, and say which pods must be evicted
/// instead (and why). Continues with the number of containers restarted and those pods.
fn restart_in_place<'a>(
    mut d: Draft<'a>,
    input: &'a Input,
    pv: &PolicyView,
    containers: &[PodRef],
    verb: &str,
) -> Flow<InPlace<'a>> {
    let status = input.wedge.status.clone().unwrap_or_default();
    let approval = status
        .approval
        .clone()
        .filter(|a| a.method == Method::Restart.as_str());
    let approved_pods = pods_of(
        &approval
            .iter()
            .flat_map(|a| a.containers.iter().flatten())
            .map(|t| PodRef {
                namespace: t.namespace.clone(),
                name: t.pod.clone(),
                container: None,
            })
            .collect::<Vec<_>>(),
    );
    // A pod that cannot restart in place: `restartPolicy: Never` now, or evicted by this wedge
    // without having been approved for a restart (which only that reason does).
    let evicted_here = |p: &PodRef| {
        status
            .evictions
            .iter()
            .flatten()
            .any(|e| e.namespace == p.namespace && e.pod == p.name)
    };
    let never: Vec<(PodRef, String)> = pods_of(containers)
        .into_iter()
        .filter(|p| {
            node_pod(input, p).is_some_and(|v| v.restart_never)
                || (evicted_here(p) && !approved_pods.contains(p))
        })
        .map(|p| (p, "restartPolicy Never".to_string()))
        .collect();
    let Some(appr) = approval else {
        let restart: Vec<ContainerTarget> = containers
            .iter()
            .filter_map(|c| {
                let p = node_pod(input, c).filter(|p| !p.finished && !p.terminating)?;
                (!p.restart_never).then(|| ContainerTarget {
                    namespace: c.namespace.clone(),
                    pod: c.name.clone(),
                    uid: p.uid.clone(),
                    container: c.container.clone().unwrap_or_default(),
                })
            })
            .collect();
        if restart.is_empty() {
            return Continue((d, 0, never));
        }
        let n = next_attempt(&status);
        let list: Vec<String> = restart
            .iter()
            .map(|t| format!("{}/{}/{}", t.namespace, t.pod, t.container))
            .collect();
        let mut d = gate(d, pv, &format!("restart {} in place", list.join(", ")))?;
        d.new.approval = Some(Approval {
            method: Method::Restart.to_string(),
            attempt: n,
            at: d.now(),
            by: input.operator.to_string(),
            containers: Some(restart),
        });
        d.phase(Phase::Restarting).action(format!("{verb}#{n}"));
        let msg = format!("approved restart#{n} in place: {}", list.join(", "));
        d.condition(cond::APPROVED, true, "Automatic", msg.clone());
        return Break(d.done(Step::Nothing, note(false, "Approved", msg)));
    };
    let tag = format!("restart#{}", appr.attempt);
    let result = status
        .attempts
        .iter()
        .flatten()
        .find(|a| a.attempt == appr.attempt);
    let timeout = jiff::SignedDuration::try_from(pv.settings.verify_timeout)
        .unwrap_or(jiff::SignedDuration::MAX);
    let elapsed = input.now.duration_since(appr.at.0);
    let everything = |why: String| -> Vec<(PodRef, String)> {
        approved_pods
            .iter()
            .map(|p| (p.clone(), why.clone()))
            .chain(never.iter().cloned())
            .collect()
    };
    match result.map(|r| (r.result, r)) {
        None | Some((AttemptOutcome::Started | AttemptOutcome::Blocked, _)) => {
            if elapsed >= timeout {
                let why = format!(
                    "{tag} not finished within {:?} (verifyTimeout)",
                    pv.settings.verify_timeout
                );
                d.condition(cond::APPROVED, false, "RestartTimedOut", why.clone());
                return Continue((d, 0, everything(why)));
            }
            let left = timeout
                .checked_sub(elapsed)
                .map_or(Duration::from_secs(10), |l| l.unsigned_abs())
                .clamp(Duration::from_secs(1), Duration::from_secs(10));
            Break(d.done(wait(left, format!("agent carrying out {tag}")), None))
        }
        Some((AttemptOutcome::Refused, r)) => Break(attention(
            d,
            Attention {
                reason: "ApprovalRefused",
                message: format!("the agent refused {tag} and touched nothing: {}", r.message),
                todo: "check that the GpuWedge names a GPU the node's agent detected (a hand-made or forged GpuWedge is refused by design); annotate unwedge.io/abandon".into(),
            },
        )),
        Some((AttemptOutcome::DryRun, r)) => Break(attention(
            d,
            Attention {
                reason: "DryRun",
                message: format!("the agent runs with --dry-run and only reported what {tag} would do: {}", r.message),
                todo: "turn off the agent's dry run (chart value agent.dryRun) to let it act; or annotate unwedge.io/abandon".into(),
            },
        )),
        Some((AttemptOutcome::Succeeded | AttemptOutcome::Failed, r)) => {
            let Some(restarts) = r.restarts.as_ref() else {
                // Interrupted, or failed before any container (no runtime socket): evict.
                return Continue((d, 0, everything(format!("{tag}: {}", r.message))));
            };
            let restarted = restarts
                .iter()
                .filter(|x| x.result == RestartResult::Restarted)
                .count();
            let fallback = restarts
                .iter()
                .filter(|x| x.result == RestartResult::Fallback)
                .map(|x| {
                    (
                        PodRef {
                            namespace: x.namespace.clone(),
                            name: x.pod.clone(),
                            container: None,
                        },
                        x.message.clone(),
                    )
                })
                .chain(never)
                .collect();
            Continue((d, restarted, fallback))
        }
    }
}
