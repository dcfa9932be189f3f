//! The recovery walk of a wedge with a recovery plan (rebind, bus-reset, reboot…): a place in
//! the budget, the cordon (or the DRA device's quarantine), then the step of its phase — plan
//! the attempt, drain for it and approve it (`approval`), follow it (`attempt`)
//! (docs/design.md §2–§5).

use std::ops::ControlFlow::{Break, Continue};

use unwedge_crds::{Admission, BudgetUnit, GpuWedgeStatus, Method, Phase};

use super::draft::{Draft, Flow, attention, note};
use super::hold::gate;
use super::ladder::{ladder, with_vendor_hint, without_driver};
use super::queue::{admit_more, admit_or_queue};
use super::{Attention, Decision, DraView, Input, PolicyView, Step, cond, next_attempt};
use crate::budget::Candidate;

/// What every step of a wedge's recovery reads, worked out once.
pub(super) struct Recovery<'a> {
    /// What `decide` was given.
    pub(super) input: &'a Input<'a>,
    /// The governing policy.
    pub(super) pv: &'a PolicyView<'a>,
    /// The wedge's name.
    pub(super) name: &'a str,
    /// Its node's name.
    pub(super) node_name: String,
    /// Its stored status.
    pub(super) status: GpuWedgeStatus,
    /// Its phase, sent back to Cordoned when its plan is stale.
    pub(super) phase: Phase,
    /// The ladder of rungs, or why a human must act.
    pub(super) plan: Result<Vec<Method>, Attention>,
    /// The rung planned now.
    rung_now: Option<Method>,
    /// The DRA device to quarantine instead of cordoning the node.
    pub(super) quarantine: Option<&'a DraView>,
    /// The budget unit the wedge needs: its device (quarantined) or its node.
    unit: BudgetUnit,
    /// Its place in the ledger, if it holds one.
    held: Option<&'a Admission>,
    /// The node's cordon names this wedge.
    pub(super) ours: bool,
}

impl<'a> Recovery<'a> {
    /// Works out the plan, the rung planned now and what it needs of the budget; a drain or an
    /// approval whose plan is stale goes back to the cordon (in `d`).
    pub(super) fn new(
        d: &mut Draft<'a>,
        input: &'a Input<'a>,
        pv: &'a PolicyView<'a>,
        held: Option<&'a Admission>,
        name: &'a str,
        methods: &[Method],
        ours: bool,
    ) -> Recovery<'a> {
        let s = pv.settings;
        let status = input.wedge.status.clone().unwrap_or_default();
        let mut phase = d.new.phase.unwrap_or_default();
        let plan = without_driver(
            ladder(methods, s).map_err(|a| with_vendor_hint(a, methods, &input.wedge.spec.uevent)),
            &input.wedge.spec.device.driver,
        );
        let stale = d
            .new
            .plan
            .as_ref()
            .is_none_or(|p| p.attempt < next_attempt(&status));
        if matches!(phase, Phase::Draining | Phase::AwaitingApproval) && stale {
            // A drain is always for the next unused attempt id. No plan, or an older one: written
            // by a version that kept the plan only in `action`, or left behind by one (downgrade and
            // upgrade again; docs/upgrades.md). Plan afresh from the cordon rather than guess.
            phase = Phase::Cordoned;
            d.phase(phase);
        }

        // The rung planned now. A DRA device is quarantined for every rung but reboot, which takes
        // all the node's devices down and so cordons and drains the node (docs/design.md §5).
        // NeedsAttention keeps its plan for a human's retry only: it never changes what the wedge
        // holds or asks of the budget while a human looks.
        let rung_now = match phase {
            Phase::Approved | Phase::Recovering | Phase::Verifying => {
                status.approval.as_ref().map(|a| Method::from(&a.method))
            }
            Phase::NeedsAttention => None,
            _ => d.new.plan.as_ref().map(|p| p.method.clone()),
        }
        .or_else(|| plan.as_ref().ok().map(|l| l[0].clone()));
        let quarantine = input.dra.as_ref().filter(|_| {
            rung_now != Some(Method::Reboot) && held.is_none_or(|h| h.unit != BudgetUnit::Node)
        });
        let unit = if quarantine.is_some() {
            BudgetUnit::Device
        } else {
            BudgetUnit::Node
        };
        Recovery {
            input,
            pv,
            name,
            node_name: input.wedge.spec.node_name.clone(),
            status,
            phase,
            plan,
            rung_now,
            quarantine,
            unit,
            held,
            ours,
        }
    }

    /// The recovery of the wedge, from its admission to Recovered or a human.
    pub(super) fn walk(&self, d: Draft<'a>) -> Flow<Decision> {
        // 1. Admission: a place in the budget before anything touches the node (or the device).
        let Some(held) = self.held.filter(|h| h.unit == self.unit) else {
            return self.ask_for_place(d);
        };
        let d = self.admitted(d);
        // 2. The cordon, kept while the recovery runs (never in Verifying: that one releases it).
        let d = self.cordon(d)?;
        // 2'. On a DRA device: the DeviceTaintRule instead, kept until the wedge is Recovered.
        let d = self.quarantine(d)?;
        match self.phase {
            Phase::Detected
            | Phase::Queued
            | Phase::Cordoned
            | Phase::Quarantined
            | Phase::Restarting => Continue(self.plan_attempt(d)),
            Phase::Draining => self.drain_for_attempt(d, held),
            Phase::AwaitingApproval | Phase::NeedsAttention => self.wait_for_human(d, held),
            Phase::Approved | Phase::Recovering | Phase::Verifying => {
                Continue(self.attempt_progress(d))
            }
            Phase::Recovered | Phase::Abandoned => Continue(d.done(Step::Nothing, None)),
        }
    }

    /// `driver/pool/device` of the wedge's DRA device.
    fn device_text(&self) -> String {
        let dev = self.input.wedge.spec.device.dra.clone().unwrap_or_default();
        format!("{}/{}/{}", dev.driver, dev.pool, dev.device)
    }

    /// What the wedge asks of the ledger: a place for its node in `unit`, and a reboot slot
    /// when `reboot`.
    pub(super) fn candidate(&self, unit: BudgetUnit, reboot: bool) -> Candidate {
        Candidate {
            wedge: self.name.into(),
            node: self.node_name.clone(),
            unit,
            reboot,
        }
    }

    /// Without a place for its unit, the wedge asks for one, takes back the one it holds its
    /// node (or device) with, or asks for the node place a quarantined device's reboot needs.
    fn ask_for_place(&self, d: Draft<'a>) -> Flow<Decision> {
        let node_name = &self.node_name;
        let cand = self.candidate(self.unit, self.rung_now == Some(Method::Reboot));
        if self.quarantine.is_none() && self.held.is_some_and(|h| h.unit == BudgetUnit::Device) {
            // A quarantined device escalated to reboot: the node must fit the node and
            // reboot budgets before it is cordoned; meanwhile the device stays quarantined.
            return admit_more(
                d,
                self.pv,
                cand,
                &format!("cordon {node_name} for a reboot"),
            );
        }
        let holds_node = d.old.cordoned.is_some()
            || (self.quarantine.is_some() && d.old.quarantine_rule.is_some())
            || !matches!(self.phase, Phase::Detected | Phase::Queued);
        if holds_node {
            return Break(d.done(
                Step::Admit {
                    candidate: cand,
                    reclaim: true,
                },
                None,
            ));
        }
        let first = match &self.plan {
            Ok(l) => format!("approve {}#{}", l[0], next_attempt(&self.status)),
            Err(a) => format!("ask a human ({})", a.reason),
        };
        let what = match self.quarantine {
            Some(q) => format!(
                "quarantine device {} (DeviceTaintRule {}), drain its pods, {first}",
                self.device_text(),
                q.rule
            ),
            None => format!("cordon {node_name}, drain the device's pods, {first}"),
        };
        let d = gate(d, self.pv, &what)?;
        Continue(admit_or_queue(d, self.pv, cand))
    }

    /// Records the place the wedge holds.
    fn admitted(&self, mut d: Draft<'a>) -> Draft<'a> {
        if d.new.admitted_at.is_none() {
            d.new.admitted_at = Some(d.now());
        }
        d.new.budget = None;
        d.new.waiting_for = None;
        d.condition(
            cond::ADMITTED,
            true,
            "Admitted",
            format!("holds a place in the budget of {}", self.pv.name),
        );
        d
    }

    /// The node's cordon: made (unless someone else's is there), made again when lost, taken
    /// over when handed to this wedge. Not for a quarantined device, nor in Verifying.
    fn cordon(&self, mut d: Draft<'a>) -> Flow<Draft<'a>> {
        if self.phase == Phase::Verifying || self.quarantine.is_some() {
            return Continue(d);
        }
        let (name, node_name, ours) = (self.name, &self.node_name, self.ours);
        let node = self.input.node;
        let unschedulable = node.is_some_and(|n| n.unschedulable);
        match d.old.cordoned {
            None => {
                if unschedulable && !ours {
                    let by = node
                        .and_then(|n| n.cordoned_by.clone())
                        .map_or("an administrator".to_string(), |w| {
                            format!("unwedge for {w}")
                        });
                    d.new.cordoned = Some(false);
                    d.new.plan = None;
                    d.phase(Phase::Cordoned).action("cordon");
                    let msg = format!(
                        "node {node_name} was already cordoned by {by}; unwedge will not uncordon it"
                    );
                    d.condition(cond::CORDONED, true, "AlreadyCordoned", msg.clone());
                    return Break(d.done(Step::Nothing, note(false, "AlreadyCordoned", msg)));
                }
                let mut d = gate(d, self.pv, &format!("cordon {node_name}"))?;
                d.new.cordoned = Some(true);
                // A quarantined device escalated to reboot keeps its rung; others start here.
                if self.phase != Phase::Draining {
                    d.new.plan = None;
                    d.phase(Phase::Cordoned).action("cordon");
                }
                let msg =
                    format!("cordoned node {node_name} (annotation unwedge.io/cordoned-by={name})");
                d.condition(cond::CORDONED, true, "CordonedByUnwedge", msg.clone());
                Break(d.done(Step::Cordon, note(false, "Cordoned", msg)))
            }
            // Ours but schedulable: a person ran `kubectl uncordon`, which keeps the annotation.
            Some(true) if !(ours && unschedulable) => {
                if unschedulable {
                    d.new.cordoned = Some(false);
                    let msg = format!(
                        "node {node_name} is now cordoned by someone else; unwedge will not uncordon it"
                    );
                    d.condition(cond::CORDONED, true, "AlreadyCordoned", msg.clone());
                    return Break(d.done(Step::Nothing, note(false, "CordonTakenOver", msg)));
                }
                Break(d.done(
                    Step::Cordon,
                    note(
                        true,
                        "Recordoned",
                        format!(
                            "node {node_name} was uncordoned during the recovery: cordoning it again"
                        ),
                    ),
                ))
            }
            Some(false) if ours => {
                d.new.cordoned = Some(true);
                d.condition(
                    cond::CORDONED,
                    true,
                    "CordonedByUnwedge",
                    format!("the cordon of node {node_name} was handed to this wedge"),
                );
                Break(d.done(Step::Nothing, None))
            }
            _ => Continue(d),
        }
    }

    /// The DRA device's DeviceTaintRule: created (or created again when it is gone).
    fn quarantine(&self, d: Draft<'a>) -> Flow<Draft<'a>> {
        let Some(q) = self.quarantine.filter(|_| !self.input.quarantine_rule) else {
            return Continue(d);
        };
        let device_text = self.device_text();
        let first = d.old.quarantine_rule.is_none();
        let mut d = if first {
            gate(d, self.pv, &format!("quarantine device {device_text}"))?
        } else {
            d
        };
        d.new.quarantine_rule = Some(q.rule.clone());
        if matches!(
            self.phase,
            Phase::Detected | Phase::Queued | Phase::Cordoned | Phase::Quarantined
        ) {
            d.phase(Phase::Quarantined).action("quarantine");
        }
        let msg = format!(
            "DeviceTaintRule {} taints device {device_text} (NoSchedule, key unwedge.io/wedged); node {} stays schedulable",
            q.rule, self.node_name
        );
        d.condition(cond::QUARANTINED, true, "DeviceTainted", msg.clone());
        let n = if first {
            note(false, "Quarantined", msg)
        } else {
            note(
                true,
                "Requarantined",
                format!("DeviceTaintRule {} was gone: creating it again", q.rule),
            )
        };
        Break(d.done(Step::Quarantine, n))
    }

    /// Cordoned (or quarantined): plans the first rung's attempt and drains for it, unless the
    /// device is a repeat offender or no rung can be planned.
    fn plan_attempt(&self, mut d: Draft<'a>) -> Decision {
        d.phase(if self.quarantine.is_some() {
            Phase::Quarantined
        } else {
            Phase::Cordoned
        });
        if let Some(a) = repeat_offender(self.input, self.pv) {
            return attention(d, a);
        }
        let ladder = match &self.plan {
            Ok(l) => l,
            Err(a) => return attention(d, a.clone()),
        };
        let n = next_attempt(&self.status);
        d.phase(Phase::Draining)
            .action(format!("drain for {}#{n}", ladder[0]))
            .plan(&ladder[0], n, Some(ladder));
        d.new.phase_since = Some(d.now());
        d.done(Step::Nothing, None)
    }
}

/// The device wedged `repeatOffender.count` times within its window: a human looks first.
fn repeat_offender(input: &Input, pv: &PolicyView) -> Option<Attention> {
    let t = pv.settings.repeat_offender.as_ref()?;
    let window = jiff::SignedDuration::try_from(t.window).unwrap_or(jiff::SignedDuration::MAX);
    let n = 1 + input
        .history
        .iter()
        .filter(|h| input.now.duration_since(h.detected_at) < window)
        .count() as u32;
    (n >= t.count).then(|| Attention {
        reason: "RepeatOffender",
        message: format!(
            "device {} wedged {n} times within {:?} (repeatOffender {})",
            input.wedge.spec.device.pci_address, t.window, t.count
        ),
        todo: "inspect the GPU, its driver and firmware; annotate unwedge.io/retry to recover it anyway, or unwedge.io/abandon to take the node over".into(),
    })
}
