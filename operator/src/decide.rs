//! The decision core: given a GpuWedge and what surrounds it, what happens next.
//!
//! Pure: `decide` takes values and returns the status to persist and one effect to perform,
//! in that order. Every call recomputes from stored state (level-triggered), so a decision
//! that was persisted but not acted on is simply made again by the next reconcile.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use unwedge_crds::{
    Admission, Approval, ApprovalMode, AttemptOutcome, BudgetUnit, GpuWedge, GpuWedgeStatus,
    Method, NoneAction, Phase, Plan, PodRef, labels::UEVENT_SURVIVABILITY_MODE,
};

use crate::budget::{self, Candidate, Limits, QueueReason};
use crate::settings::Settings;
use crate::status::OperatorStatus;

/// A decision that ends the walk early (boxed: decisions are large).
type Held = Box<Decision>;

/// The node as the decision needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// The `unwedge.io/cordoned-by` annotation.
    pub cordoned_by: Option<String>,
}

impl NodeView {
    /// What decisions read of `n`.
    pub fn of(n: &k8s_openapi::api::core::v1::Node) -> NodeView {
        use kube::ResourceExt as _;
        NodeView {
            name: n.name_any(),
            unschedulable: n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            cordoned_by: n
                .annotations()
                .get(unwedge_crds::labels::ANN_CORDONED_BY)
                .cloned(),
        }
    }
}

/// A pod bound to the wedge's node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// A static (mirror) pod: never evicted.
    pub mirror: bool,
    /// Owned by a DaemonSet: stays, like `kubectl drain --ignore-daemonsets`.
    pub daemon_set: bool,
    /// Has a deletionTimestamp: on its way out.
    pub terminating: bool,
    /// Succeeded or Failed: holds nothing.
    pub finished: bool,
    /// Has an emptyDir volume (its data goes with an eviction).
    pub empty_dir: bool,
}

/// An earlier GpuWedge of the same device (for rate limits and the repeat-offender rule).
#[derive(Clone, Debug, PartialEq)]
pub struct PastWedge {
    /// Its name.
    pub name: String,
    /// When it reached the API server ([`arrived`]).
    pub detected_at: Timestamp,
    /// When it last evicted a pod (a `none` eviction round), if it did.
    pub evicted_at: Option<Timestamp>,
}

/// The human verbs found on the wedge's annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verbs {
    /// `unwedge.io/approve` ("" or a method).
    pub approve: Option<String>,
    /// `unwedge.io/retry`.
    pub retry: Option<String>,
    /// `unwedge.io/abandon` (a reason).
    pub abandon: Option<String>,
    /// `unwedge.io/by`: the human, as admission proved.
    pub by: Option<String>,
}

/// The governing policy, resolved.
#[derive(Clone, Debug)]
pub struct PolicyView<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its settings, defaults applied.
    pub settings: &'a Settings,
    /// Its admission ledger (from the cache; the CAS re-checks it fresh).
    pub ledger: &'a [Admission],
    /// Its limits for its current size.
    pub limits: Limits,
    /// Open wedges of this policy that arrived earlier and are not admitted: `(wedge, node)`.
    pub waiting_ahead: Vec<(String, String)>,
    /// Whether the circuit breaker holds automatic actions.
    pub breaker_tripped: bool,
}

/// Which policy governs the wedge's node.
#[derive(Clone, Debug)]
pub enum Governance<'a> {
    /// One policy governs.
    Policy(PolicyView<'a>),
    /// No policy selects the node and there is no default.
    NoPolicy,
    /// Several policies claim the node.
    Conflict(Vec<String>),
    /// The governing policy cannot be used as written.
    Invalid {
        /// Its name.
        name: String,
        /// What is wrong.
        error: String,
    },
}

/// Everything `decide` looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The wedge.
    pub wedge: &'a GpuWedge,
    /// Its node, if it exists.
    pub node: Option<&'a NodeView>,
    /// The governing policy.
    pub policy: Governance<'a>,
    /// Pods bound to the node.
    pub pods: &'a [PodView],
    /// Earlier GpuWedges of the same device (not this one).
    pub history: &'a [PastWedge],
    /// Other open (not Recovered/Abandoned) wedges on the same node.
    pub others_on_node: &'a [String],
    /// Whether the device is advertised again after a recovery (`None`: cannot tell).
    pub device_advertised: Option<bool>,
    /// The clock.
    pub now: Timestamp,
    /// Who the operator is (recorded as the approver of automatic approvals).
    pub operator: &'a str,
    /// Human verbs on the wedge.
    pub verbs: Verbs,
    /// The wedge's DRA device, when the operator quarantines DRA devices and the agent named
    /// one (`spec.device.dra`): the non-reboot path then taints the device, not the node.
    pub dra: Option<DraView>,
    /// Whether unwedge's DeviceTaintRule for this wedge exists now.
    pub quarantine_rule: bool,
    /// The wedge's Node is gone (confirmed by a fresh read, not only missing from the cache):
    /// the incident ends as Abandoned with reason NodeDeleted and its places are released.
    pub node_deleted: bool,
}

/// The DRA side of a wedge (docs/design.md §5 "On DRA clusters").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DraView {
    /// The DeviceTaintRule's name.
    pub rule: String,
    /// Pods that reserve a ResourceClaim allocated the device.
    pub consumers: Vec<PodRef>,
}

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

/// The first rung and the ladder for a method list (kernel order, fewer to more side effects).
///
/// The first rung is the first method the kernel listed that the policy allows; if that
/// method is not one unwedge can carry out (vendor-specific, cold-reset, unknown, any new
/// token) or none is allowed, a human must act. The ladder continues with the escalation rungs
/// after it that the kernel listed later, plus `reboot` (unwedge's own last rung).
pub fn ladder(methods: &[Method], s: &Settings) -> Result<Vec<Method>, Attention> {
    let listed: Vec<&Method> = methods.iter().filter(|m| **m != Method::None).collect();
    let Some((first_idx, first)) = listed
        .iter()
        .enumerate()
        .find(|(_, m)| s.allowed_methods.contains(*m))
    else {
        let cold_reset = Method::from(COLD_RESET);
        if listed.contains(&&cold_reset) {
            // A power cycle is a human's job whatever the policy allows: say so, not just
            // that no method is allowed.
            let mut a = unusable(&cold_reset);
            a.message = format!(
                "the kernel asked for {}, and the policy allows {}; only a power cycle of the device is left, which unwedge cannot carry out",
                Method::join(&listed),
                Method::join(&s.allowed_methods)
            );
            return Err(a);
        }
        return Err(Attention {
            reason: "NoAllowedMethod",
            message: format!(
                "the kernel asked for {}; the policy allows {}",
                Method::join(&listed),
                Method::join(&s.allowed_methods)
            ),
            todo: "recover the device by hand, then annotate unwedge.io/abandon; or approve an allowed method with unwedge.io/approve=<method>".into(),
        });
    };
    if !first.agent_runs() {
        return Err(unusable(first));
    }
    let mut out = vec![(*first).clone()];
    let start = s
        .escalation
        .iter()
        .position(|r| r == *first)
        .map_or(0, |p| p + 1);
    for rung in &s.escalation[start..] {
        let later_listed = listed.iter().skip(first_idx + 1).any(|m| *m == rung);
        let allowed = s.allowed_methods.contains(rung);
        if allowed
            && (later_listed || *rung == Method::Reboot)
            && rung.agent_runs()
            && !out.contains(rung)
        {
            out.push(rung.clone());
        }
    }
    Ok(out)
}

/// With no driver bound to the device (the agent reports `driver: ""`), rebind and bus-reset
/// cannot work (both end by binding the driver again and verifying it): only the reboot rung is
/// kept. A ladder with no reboot left asks a human at once instead of walking rungs that fail.
pub fn without_driver(
    plan: Result<Vec<Method>, Attention>,
    driver: &str,
) -> Result<Vec<Method>, Attention> {
    if !driver.is_empty() {
        return plan;
    }
    let rungs = plan?;
    if rungs.contains(&Method::Reboot) {
        return Ok(vec![Method::Reboot]);
    }
    Err(Attention {
        reason: "NoDriver",
        message: format!(
            "no driver is bound to the device, so {} cannot work, and the policy allows no reboot",
            Method::join(&rungs).replace(',', ", ")
        ),
        todo: "bind the device's driver by hand or reboot the node, then annotate unwedge.io/abandon; or allow reboot in the policy and annotate unwedge.io/retry".into(),
    })
}

/// `cold-reset`: a complete power cycle of the device (docs/design.md §1).
const COLD_RESET: &str = "cold-reset";

/// A NeedsAttention of a wedge that lists `vendor-specific`, with what xe's
/// `survivability_mode` (the agent's `spec.uevent` key [`UEVENT_SURVIVABILITY_MODE`]) says
/// the device needs: a firmware flash, which fwupd carries out. Any other attention, or no mode
/// reported, is returned as it is.
pub fn with_vendor_hint(
    mut a: Attention,
    methods: &[Method],
    uevent: &BTreeMap<String, String>,
) -> Attention {
    let relevant = matches!(a.reason, "VendorSpecific" | "NoAllowedMethod")
        && methods.contains(&Method::VendorSpecific);
    let Some(raw) = uevent.get(UEVENT_SURVIVABILITY_MODE).filter(|_| relevant) else {
        return a;
    };
    let first = raw.lines().next().unwrap_or_default();
    let mode = first
        .strip_prefix("Survivability mode type:")
        .unwrap_or(first)
        .trim();
    let what = match mode.to_ascii_lowercase().as_str() {
        "runtime" => "xe runtime survivability mode: a firmware error at runtime; the GPU needs a firmware flash to work again".to_string(),
        "boot" => "xe boot survivability mode: the GPU's boot firmware failed; it needs a firmware flash to work again".to_string(),
        _ => format!("xe survivability mode {mode:?}: the GPU needs a firmware flash to work again"),
    };
    a.reason = "VendorSpecific";
    a.message = format!("{}; {what}", a.message);
    a.todo = "flash the GPU's firmware on the node with fwupd (fwupdmgr refresh, then fwupdmgr update), then annotate unwedge.io/abandon".into();
    a
}

fn unusable(method: &Method) -> Attention {
    let (reason, todo) = match method {
        Method::VendorSpecific => (
            "VendorSpecific",
            "the driver asks for a vendor procedure (e.g. a firmware flash, xe survivability mode): carry it out on the node, then annotate unwedge.io/abandon",
        ),
        Method::Other(t) if t == COLD_RESET => (
            "ColdReset",
            "the device needs a complete power cycle (a warm reboot may not give one): power-cycle the node, then annotate unwedge.io/abandon",
        ),
        Method::Unknown => (
            "UnknownMethod",
            "the driver does not know how to recover: inspect the device and its kernel log, then annotate unwedge.io/approve=<method> or unwedge.io/abandon",
        ),
        _ => (
            "UnknownMethod",
            "unwedge does not know this method: recover the device by hand, then annotate unwedge.io/abandon, or approve a known method with unwedge.io/approve=<method>",
        ),
    };
    Attention {
        reason,
        message: format!("the kernel asked for {method}, which unwedge cannot carry out"),
        todo: todo.into(),
    }
}

/// The method list to plan from: the newest recovery list the kernel sent (spec or a later
/// event), or `none` when every list said the driver recovered by itself. A later `none` never
/// replaces a recovery plan: it does not unpark a device.
pub fn plan_methods(w: &GpuWedge) -> Vec<Method> {
    let mut lists: Vec<(Timestamp, u64, &Vec<String>)> =
        vec![(ts(&w.spec.detected_at), 0, &w.spec.methods)];
    if let Some(ev) = w.status.as_ref().and_then(|s| s.events.as_ref()) {
        for e in ev {
            lists.push((ts(&e.at), e.seqnum.unwrap_or(0), &e.methods));
        }
    }
    lists.sort_by_key(|(at, seq, _)| (*at, *seq));
    let is_none = |l: &Vec<String>| l.first().is_none_or(|m| Method::None == *m);
    lists
        .iter()
        .rev()
        .find(|(_, _, l)| !is_none(l))
        .or(lists.last())
        .map(|(_, _, l)| l.iter().map(Method::from).collect())
        .unwrap_or_default()
}

/// Whether the wedge's plan is `none` (the driver recovered by itself; nothing to carry out).
pub fn plans_none(w: &GpuWedge) -> bool {
    plan_methods(w).first() == Some(&Method::None)
}

fn ts(t: &Time) -> Timestamp {
    t.0
}

/// When the wedge reached the API server (`metadata.creationTimestamp`, the API server's clock).
/// Queue order, the circuit breaker's window and the repeat-offender window count from it, never
/// from the agent-written `spec.detectedAt`: a node cannot jump the queue or trip a policy's
/// breaker by dating its wedges. Falls back to `detectedAt` only for an object that was never
/// stored (unit tests).
pub fn arrived(w: &GpuWedge) -> Timestamp {
    w.metadata
        .creation_timestamp
        .as_ref()
        .map_or(w.spec.detected_at.0, |t| t.0)
}

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

/// Builds the decision: a copy of the stored operator status, edited.
struct Draft<'a> {
    input: &'a Input<'a>,
    old: OperatorStatus,
    new: OperatorStatus,
}

impl<'a> Draft<'a> {
    fn new(input: &'a Input<'a>) -> Draft<'a> {
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

    fn now(&self) -> Time {
        Time(self.input.now)
    }

    fn phase(&mut self, p: Phase) -> &mut Self {
        if self.new.phase != Some(p) || self.new.phase_since.is_none() {
            if self.old.phase != Some(p) || self.old.phase_since.is_none() {
                self.new.phase_since = Some(self.now());
            }
            self.new.phase = Some(p);
        }
        self
    }

    fn action(&mut self, a: impl Into<String>) -> &mut Self {
        self.new.action = Some(a.into());
        self
    }

    /// Records the plan: `method` with attempt id `attempt`, and its rung on `ladder`.
    fn plan(&mut self, method: &Method, attempt: u32, ladder: Option<&[Method]>) -> &mut Self {
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

    fn condition(
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

    fn done(self, step: Step, note: Option<Note>) -> Decision {
        Decision {
            status: self.new,
            step,
            note,
        }
    }
}

fn note(warning: bool, reason: &str, message: impl Into<String>) -> Option<Note> {
    Some(Note {
        warning,
        reason: reason.into(),
        message: message.into(),
    })
}

fn wait(after: Duration, why: impl Into<String>) -> Step {
    Step::Wait {
        requeue_after: after,
        why: why.into(),
    }
}

fn pods_text(p: &[PodRef]) -> String {
    let names: Vec<String> = p
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    names.join(", ")
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
        return match held {
            Some(_) => d.done(Step::Release, None),
            None => d.done(Step::Nothing, None),
        };
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
        d.phase(Phase::Abandoned)
            .action(format!("abandoned by {by}"));
        d.new.finished_at = Some(d.now());
        d.new.budget = None;
        d.new.waiting_for = None;
        d.condition(cond::ABANDONED, true, "ByHuman", msg.clone());
        return d.done(Step::Release, note(false, "Abandoned", msg));
    }

    if unfinalized_hold(input, held.is_some(), ours) {
        return d.done(Step::Finalize, None);
    }

    if input.node_deleted {
        let node = input.wedge.spec.node_name.clone();
        let msg = format!(
            "node {node} was deleted: the incident ends here and its budget place is released"
        );
        d.phase(Phase::Abandoned)
            .action(format!("abandoned: node {node} deleted"));
        d.new.finished_at = Some(d.now());
        d.new.budget = None;
        d.new.waiting_for = None;
        d.condition(cond::ABANDONED, true, "NodeDeleted", msg.clone());
        return d.done(Step::Release, note(true, "NodeDeleted", msg));
    }

    let pv = match &input.policy {
        Governance::Policy(p) => p,
        Governance::NoPolicy => {
            let node = input.wedge.spec.node_name.clone();
            let msg = format!(
                "no RecoveryPolicy selects node {node} and there is no default policy: create one"
            );
            d.action("waiting: no policy");
            d.condition(cond::GOVERNED, false, "NoPolicy", msg.clone());
            return d.done(wait(REQUEUE_SLOW, "no policy"), note(true, "NoPolicy", msg));
        }
        Governance::Conflict(names) => {
            let msg = format!(
                "policies {} all select node {}: make their nodeSelectors disjoint (or keep one default)",
                names.join(", "),
                input.wedge.spec.node_name
            );
            d.action("waiting: policy conflict");
            d.condition(cond::GOVERNED, false, "PolicyConflict", msg.clone());
            return d.done(
                wait(REQUEUE_SLOW, "policy conflict"),
                note(true, "PolicyConflict", msg),
            );
        }
        Governance::Invalid { name: p, error } => {
            let msg = format!("policy {p} cannot be used: {error}");
            d.action("waiting: invalid policy");
            d.condition(cond::GOVERNED, false, "InvalidPolicy", msg.clone());
            return d.done(
                wait(REQUEUE_SLOW, "invalid policy"),
                note(true, "InvalidPolicy", msg),
            );
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
    let joined = Method::join(&methods);
    let is_none = methods.first() == Some(&Method::None);
    let mut replan_note = None;
    if d.old.methods.as_deref() != Some(joined.as_str()) {
        let in_attempt = matches!(
            phase,
            Phase::Approved | Phase::Recovering | Phase::Verifying
        );
        if d.old.methods.is_some() && in_attempt {
            // Never pull the rug from under a running attempt: re-plan when it ends.
        } else {
            if let Some(old) = d.old.methods.clone() {
                replan_note = note(
                    false,
                    "Replanned",
                    format!(
                        "the kernel now lists {joined} (was {old}): planning from the newer list"
                    ),
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
            d.new.methods = Some(joined.clone());
            d.new.plan = None;
        }
    }
    let planned = d.new.methods.as_deref().map_or(methods, Method::parse_list);
    let decision = if planned.first() == Some(&Method::None) {
        decide_none(d, input, pv, held.as_ref(), &name)
    } else {
        decide_recovery(d, input, pv, held.as_ref(), &name, &planned, ours)
    };
    match (decision.note.is_none(), replan_note) {
        (true, Some(n)) => Decision {
            note: Some(n),
            ..decision
        },
        _ => decision,
    }
}

/// Whether nothing may be disrupted for the wedge: its policy is in dry run, or the agent that
/// reported it runs with `--dry-run` (it would not act on an approval anyway).
fn dry_run(input: &Input, s: &Settings) -> bool {
    s.dry_run
        || input
            .wedge
            .status
            .as_ref()
            .and_then(|st| st.agent_dry_run)
            .unwrap_or(false)
}

/// Paused, tripped or dry-run policies allow no new cordons, evictions or approvals: this
/// returns the holding decision when one applies.
fn gate<'a>(mut d: Draft<'a>, pv: &PolicyView, what: &str) -> Result<Draft<'a>, Held> {
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
        return Err(Box::new(
            d.done(wait(REQUEUE_SLOW, why), note(true, reason, msg)),
        ));
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
        return Err(Box::new(
            d.done(wait(REQUEUE_IDLE, "dry run"), note(false, "DryRun", msg)),
        ));
    }
    Ok(d)
}

fn node_pod<'a>(input: &'a Input, r: &PodRef) -> Option<&'a PodView> {
    input
        .pods
        .iter()
        .find(|p| p.namespace == r.namespace && p.name == r.name)
}

/// Evict what is left of `targets`; wait for pods on their way out; at the drain timeout
/// delete (force) or hand over to a human. `Ok(())` when nothing holds the device any more.
fn drain<'a>(
    mut d: Draft<'a>,
    input: &'a Input,
    pv: &PolicyView,
    targets: &[PodRef],
    purpose: &str,
) -> Result<Draft<'a>, Held> {
    let present: Vec<(&PodRef, &PodView)> = targets
        .iter()
        .filter_map(|r| node_pod(input, r).map(|p| (r, p)))
        .filter(|(_, p)| !p.finished)
        .collect();
    if present.is_empty() {
        d.condition(
            cond::DRAINED,
            true,
            "Drained",
            format!("no pod holds the device any more ({purpose})"),
        );
        return Ok(d);
    }
    let to_evict: Vec<PodRef> = present
        .iter()
        .filter(|(_, p)| !p.terminating)
        .map(|(r, _)| PodRef {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            container: None,
        })
        .collect();
    if to_evict.is_empty() {
        d.condition(
            cond::DRAINED,
            false,
            "Terminating",
            format!("{} pod(s) terminating", present.len()),
        );
        return Err(Box::new(
            d.done(wait(REQUEUE_FAST, "pods terminating"), None),
        ));
    }
    let since = d.new.phase_since.as_ref().map_or(input.now, |t| t.0);
    let timeout = jiff::SignedDuration::try_from(pv.settings.drain_timeout)
        .unwrap_or(jiff::SignedDuration::MAX);
    let expired = input.now.duration_since(since) >= timeout;
    let list = pods_text(&to_evict);
    if expired {
        if pv.settings.force {
            let mut d = gate(d, pv, &format!("delete {list} ({purpose})"))?;
            let msg = format!("drain timeout: deleting {list} (drain.force)");
            d.condition(cond::DRAINED, false, "ForceDeleting", msg.clone());
            return Err(Box::new(d.done(
                Step::ForceDelete { pods: to_evict },
                note(true, "ForceDelete", msg),
            )));
        }
        return Err(Box::new(attention(
            d,
            Attention {
                reason: "DrainTimeout",
                message: format!("evictions of {list} were refused for {:?} (PodDisruptionBudget?)", pv.settings.drain_timeout),
                todo: "relax the PodDisruptionBudget or move the pods, then annotate unwedge.io/retry; or set drain.force in the policy".into(),
            },
        )));
    }
    let mut d = gate(d, pv, &format!("evict {list} ({purpose})"))?;
    d.condition(cond::DRAINED, false, "Evicting", format!("evicting {list}"));
    Err(Box::new(d.done(Step::Evict { pods: to_evict }, None)))
}

fn attention(mut d: Draft, a: Attention) -> Decision {
    let msg = format!("{}. To do: {}", a.message, a.todo);
    d.phase(Phase::NeedsAttention)
        .action(format!("needs attention: {}", a.reason));
    d.condition(cond::NEEDS_ATTENTION, true, a.reason, msg.clone());
    d.done(wait(REQUEUE_IDLE, a.reason), note(true, a.reason, msg))
}

fn decide_none(
    mut d: Draft,
    input: &Input,
    pv: &PolicyView,
    held: Option<&Admission>,
    name: &str,
) -> Decision {
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
            return d.done(wait(REQUEUE_FAST, AWAITING_AGENT), None);
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
            return recovered(d, format!("recorded only: {why_none}"));
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
            return recovered(
                d,
                format!(
                    "recorded only: rate-limited (the device's last eviction round was at {last}, none.minInterval {:?})",
                    s.none_min_interval
                ),
            );
        }
        if held.is_some_and(|h| h.unit == BudgetUnit::None) {
            d.phase(Phase::Restarting).action(verb);
            d.new.budget = None;
            d.new.waiting_for = None;
            d.condition(cond::ADMITTED, true, "Admitted", "within the none budget");
            return d.done(Step::Nothing, None);
        }
        if dry_run(input, s) && !s.paused && !pv.breaker_tripped {
            let list = pods_text(&targets);
            d.condition(
                cond::DRY_RUN,
                true,
                "DryRun",
                format!("dry run: would evict {list}"),
            );
            return recovered(d, format!("dry-run: would evict {list}"));
        }
        let d = match gate(d, pv, &format!("evict {}", pods_text(&targets))) {
            Ok(d) => d,
            Err(h) => return *h,
        };
        let cand = Candidate {
            wedge: name.into(),
            node: spec.node_name.clone(),
            unit: BudgetUnit::None,
            reboot: false,
        };
        return admit_or_queue(d, pv, cand);
    }

    // Restarting: evict the targets, then done.
    match drain(d, input, pv, &targets, verb) {
        Ok(d) => recovered(d, format!("{verb}: done")),
        Err(decision) => *decision,
    }
}

fn admit_or_queue(d: Draft, pv: &PolicyView, cand: Candidate) -> Decision {
    match budget::admit(pv.ledger, &cand, &pv.limits, &pv.waiting_ahead) {
        Ok(_) => d.done(
            Step::Admit {
                candidate: cand,
                reclaim: false,
            },
            None,
        ),
        Err(reason) => queued(d, &reason),
    }
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

/// Whether an open wedge without the operator's finalizer holds something: a ledger place
/// under its name (an earlier incident of the same name — deleted, then created again by the
/// agent's outbox replay — whose place the cache still shows) or the node's cordon. Admission
/// puts the finalizer on before the ledger write; a wedge that finds itself holding either
/// without it gets it before anything else, so deleting it always releases what it holds.
fn unfinalized_hold(input: &Input, placed: bool, cordon: bool) -> bool {
    let w = input.wedge;
    let finalized = w
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == unwedge_crds::labels::FINALIZER);
    (placed || cordon) && !finalized && w.metadata.deletion_timestamp.is_none()
}

/// The policies a finished (or deleted) wedge gives its places back to: every policy whose
/// ledger names it, plus the one its status names. A node relabelled mid-recovery can leave
/// the wedge a place in the policy it moved away from (seen in bench chaos: admitted by
/// `chaos`, then `chaos-b`, then `chaos` again; Recovered, it released `chaos` only and the
/// place in `chaos-b` stayed, never repaired since the wedge still exists). Sorted, no repeats.
pub fn places_to_release(
    wedge: &str,
    status_policy: Option<&str>,
    ledgers: &[(String, Vec<Admission>)],
) -> Vec<String> {
    let mut out: Vec<String> = ledgers
        .iter()
        .filter(|(_, l)| l.iter().any(|a| a.wedge == wedge))
        .map(|(p, _)| p.clone())
        .chain(status_policy.map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A wedge of the node that the cordon could be handed to, as read fresh just before the
/// hand-over (the cache may not show yet that it finished).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heir {
    /// Its name.
    pub name: String,
    /// Not Recovered or Abandoned, and not being deleted.
    pub open: bool,
    /// It carries the operator's finalizer (its deletion releases what it holds).
    pub finalized: bool,
    /// It holds a place in a policy's ledger.
    pub placed: bool,
}

/// The wedge that takes the node's cordon over, from the candidates read fresh: one that is
/// open, carries the finalizer and holds a place in a ledger; `None` lifts the cordon. A
/// wedge that finished, or never got the finalizer, would let the cordon vanish with it (a
/// node stranded cordoned); one without a place (a wedge Queued for budget carries the
/// finalizer from its first admission attempt) would keep the node cordoned while no ledger
/// counts it, and the ledger would admit another node past the budget. Lifted, the node is
/// cordoned again by its next wedge once that one is admitted.
pub fn cordon_heir(candidates: &[Heir]) -> Option<String> {
    candidates
        .iter()
        .find(|h| h.open && h.finalized && h.placed)
        .map(|h| h.name.clone())
}

/// Lifts the node's cordon for this wedge, or hands it to another open wedge of the node that
/// still needs it — preferably one holding a place in this policy's ledger. The effect reads
/// the candidates fresh and hands the cordon only to one holding a place in some ledger
/// ([`cordon_heir`]), else lifts it: a cordoned node is always counted by a budget.
fn release_cordon(mut d: Draft, input: &Input) -> Decision {
    let placed = |w: &String| match &input.policy {
        Governance::Policy(p) => p.ledger.iter().any(|a| a.wedge == *w),
        _ => false,
    };
    let next = input
        .others_on_node
        .iter()
        .find(|w| placed(w))
        .or(input.others_on_node.first());
    if let Some(next) = next {
        d.action(format!("handing the cordon to {next}"));
        return d.done(
            Step::HandOverCordon { to: next.clone() },
            note(
                false,
                "CordonHandedOver",
                format!("{next} still needs the node cordoned"),
            ),
        );
    }
    d.action("uncordon");
    d.done(
        Step::Uncordon,
        note(
            false,
            "Uncordoned",
            "unwedge cordoned the node for this wedge and uncordons it",
        ),
    )
}

/// Why a drain waits before the agent's first status report.
const AWAITING_AGENT: &str = "waiting for the agent's report of the device's consumers";

/// Whether the agent has reported the device's consumers and reset domain (it creates the
/// GpuWedge first and patches its part of the status right after; until then an empty
/// consumer list means "not known yet", not "nobody").
fn agent_reported(w: &GpuWedge) -> bool {
    w.status
        .as_ref()
        .is_some_and(|s| s.consumers.is_some() || s.reset_domain.is_some())
}

fn drain_targets(
    input: &Input,
    pv: &PolicyView,
    method: &Method,
) -> Result<Vec<PodRef>, Attention> {
    if *method == Method::Reboot {
        let pods: Vec<&PodView> = input
            .pods
            .iter()
            .filter(|p| !p.mirror && !p.daemon_set && !p.finished)
            .collect();
        let blocked: Vec<String> = pods
            .iter()
            .filter(|p| p.empty_dir && !pv.settings.delete_empty_dir_data)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        if !blocked.is_empty() {
            return Err(Attention {
                reason: "EmptyDirData",
                message: format!("a reboot needs a whole-node drain and {} use emptyDir (their data would be lost)", blocked.join(", ")),
                todo: "move those pods or set drain.deleteEmptyDirData in the policy, then annotate unwedge.io/retry".into(),
            });
        }
        return Ok(pods
            .into_iter()
            .map(|p| PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                container: None,
            })
            .collect());
    }
    let status = input.wedge.status.clone().unwrap_or_default();
    let me = &input.wedge.spec.device.pci_address;
    let disturbed: BTreeSet<&str> = status
        .reset_domain
        .iter()
        .flatten()
        .filter(|dd| dd.methods.iter().any(|m| m == method))
        .map(|dd| dd.pci_address.as_str())
        .chain(std::iter::once(me.as_str()))
        .collect();
    let pods: BTreeSet<PodRef> = status
        .consumers
        .iter()
        .flatten()
        .filter(|c| disturbed.contains(c.pci_address.as_str()))
        .map(|c| PodRef {
            namespace: c.namespace.clone(),
            name: c.pod.clone(),
            container: None,
        })
        .collect();
    Ok(pods.into_iter().collect())
}

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

#[allow(clippy::too_many_arguments)]
fn decide_recovery(
    mut d: Draft,
    input: &Input,
    pv: &PolicyView,
    held: Option<&Admission>,
    name: &str,
    methods: &[Method],
    ours: bool,
) -> Decision {
    let s = pv.settings;
    let status = input.wedge.status.clone().unwrap_or_default();
    let mut phase = d.new.phase.unwrap_or_default();
    let node_name = input.wedge.spec.node_name.clone();
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
    let device_text = {
        let dev = input.wedge.spec.device.dra.clone().unwrap_or_default();
        format!("{}/{}/{}", dev.driver, dev.pool, dev.device)
    };

    // 1. Admission: a place in the budget before anything touches the node (or the device).
    let held = match held {
        Some(h) if h.unit == unit => h,
        _ => {
            let reboot = rung_now == Some(Method::Reboot);
            let cand = Candidate {
                wedge: name.into(),
                node: node_name.clone(),
                unit,
                reboot,
            };
            if quarantine.is_none() && held.is_some_and(|h| h.unit == BudgetUnit::Device) {
                // A quarantined device escalated to reboot: the node must fit the node and
                // reboot budgets before it is cordoned; meanwhile the device stays quarantined.
                let mut d = match gate(d, pv, &format!("cordon {node_name} for a reboot")) {
                    Ok(d) => d,
                    Err(h) => return *h,
                };
                return match budget::admit(pv.ledger, &cand, &pv.limits, &[]) {
                    Ok(_) => d.done(
                        Step::Admit {
                            candidate: cand,
                            reclaim: false,
                        },
                        None,
                    ),
                    Err(r) => {
                        d.new.budget = Some(r.0.clone());
                        d.new.waiting_for = Some(r.1);
                        d.done(wait(Duration::from_secs(30), r.0), None)
                    }
                };
            }
            let holds_node = d.old.cordoned.is_some()
                || (quarantine.is_some() && d.old.quarantine_rule.is_some())
                || !matches!(phase, Phase::Detected | Phase::Queued);
            if holds_node {
                return d.done(
                    Step::Admit {
                        candidate: cand,
                        reclaim: true,
                    },
                    None,
                );
            }
            let first = match &plan {
                Ok(l) => format!("approve {}#{}", l[0], next_attempt(&status)),
                Err(a) => format!("ask a human ({})", a.reason),
            };
            let what = match quarantine {
                Some(q) => format!(
                    "quarantine device {device_text} (DeviceTaintRule {}), drain its pods, {first}",
                    q.rule
                ),
                None => format!("cordon {node_name}, drain the device's pods, {first}"),
            };
            let d = match gate(d, pv, &what) {
                Ok(d) => d,
                Err(h) => return *h,
            };
            return admit_or_queue(d, pv, cand);
        }
    };
    if d.new.admitted_at.is_none() {
        d.new.admitted_at = Some(d.now());
    }
    d.new.budget = None;
    d.new.waiting_for = None;
    d.condition(
        cond::ADMITTED,
        true,
        "Admitted",
        format!("holds a place in the budget of {}", pv.name),
    );

    // 2. The cordon, kept while the recovery runs (never in Verifying: that one releases it).
    if phase != Phase::Verifying && quarantine.is_none() {
        let node = input.node;
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
                    return d.done(Step::Nothing, note(false, "AlreadyCordoned", msg));
                }
                let mut d = match gate(d, pv, &format!("cordon {node_name}")) {
                    Ok(d) => d,
                    Err(h) => return *h,
                };
                d.new.cordoned = Some(true);
                // A quarantined device escalated to reboot keeps its rung; others start here.
                if phase != Phase::Draining {
                    d.new.plan = None;
                    d.phase(Phase::Cordoned).action("cordon");
                }
                let msg =
                    format!("cordoned node {node_name} (annotation unwedge.io/cordoned-by={name})");
                d.condition(cond::CORDONED, true, "CordonedByUnwedge", msg.clone());
                return d.done(Step::Cordon, note(false, "Cordoned", msg));
            }
            Some(true) if !ours => {
                if unschedulable {
                    d.new.cordoned = Some(false);
                    let msg = format!(
                        "node {node_name} is now cordoned by someone else; unwedge will not uncordon it"
                    );
                    d.condition(cond::CORDONED, true, "AlreadyCordoned", msg.clone());
                    return d.done(Step::Nothing, note(false, "CordonTakenOver", msg));
                }
                return d.done(Step::Cordon, note(true, "Recordoned", format!("node {node_name} was uncordoned during the recovery: cordoning it again")));
            }
            Some(false) if ours => {
                d.new.cordoned = Some(true);
                d.condition(
                    cond::CORDONED,
                    true,
                    "CordonedByUnwedge",
                    format!("the cordon of node {node_name} was handed to this wedge"),
                );
                return d.done(Step::Nothing, None);
            }
            _ => {}
        }
    }

    // 2'. On a DRA device: the DeviceTaintRule instead, kept until the wedge is Recovered.
    if let Some(q) = quarantine
        && !input.quarantine_rule
    {
        let first = d.old.quarantine_rule.is_none();
        let mut d = if first {
            match gate(d, pv, &format!("quarantine device {device_text}")) {
                Ok(d) => d,
                Err(h) => return *h,
            }
        } else {
            d
        };
        d.new.quarantine_rule = Some(q.rule.clone());
        if matches!(
            phase,
            Phase::Detected | Phase::Queued | Phase::Cordoned | Phase::Quarantined
        ) {
            d.phase(Phase::Quarantined).action("quarantine");
        }
        let msg = format!(
            "DeviceTaintRule {} taints device {device_text} (NoSchedule, key unwedge.io/wedged); node {node_name} stays schedulable",
            q.rule
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
        return d.done(Step::Quarantine, n);
    }

    let verbs = &input.verbs;
    let by = verbs.by.clone();
    match phase {
        Phase::Detected
        | Phase::Queued
        | Phase::Cordoned
        | Phase::Quarantined
        | Phase::Restarting => {
            d.phase(if quarantine.is_some() {
                Phase::Quarantined
            } else {
                Phase::Cordoned
            });
            if let Some(a) = repeat_offender(input, pv) {
                return attention(d, a);
            }
            let ladder = match plan {
                Ok(l) => l,
                Err(a) => return attention(d, a),
            };
            let n = next_attempt(&status);
            d.phase(Phase::Draining)
                .action(format!("drain for {}#{n}", ladder[0]))
                .plan(&ladder[0], n, Some(&ladder));
            d.new.phase_since = Some(d.now());
            d.done(Step::Nothing, None)
        }
        Phase::Draining => {
            let Some(Plan {
                method, attempt: n, ..
            }) = d.new.plan.clone()
            else {
                // Not reached: a Draining wedge without a plan was sent back to the cordon above.
                d.phase(Phase::Cordoned);
                return d.done(Step::Nothing, None);
            };
            if method == Method::Reboot && !held.reboot {
                let d = match gate(d, pv, &format!("drain node {node_name} for reboot#{n}")) {
                    Ok(d) => d,
                    Err(h) => return *h,
                };
                let cand = Candidate {
                    wedge: name.into(),
                    node: node_name,
                    unit: BudgetUnit::Node,
                    reboot: true,
                };
                return match budget::admit(pv.ledger, &cand, &pv.limits, &[]) {
                    Ok(_) => d.done(
                        Step::Admit {
                            candidate: cand,
                            reclaim: false,
                        },
                        None,
                    ),
                    Err(r) => {
                        let mut d = d;
                        d.new.budget = Some(r.0.clone());
                        d.new.waiting_for = Some(r.1);
                        d.done(wait(Duration::from_secs(30), r.0), None)
                    }
                };
            }
            if method != Method::Reboot && !agent_reported(input.wedge) {
                return d.done(wait(REQUEUE_FAST, AWAITING_AGENT), None);
            }
            let mut targets = match drain_targets(input, pv, &method) {
                Ok(t) => t,
                Err(a) => return attention(d, a),
            };
            if let Some(q) = quarantine {
                // The pods whose ResourceClaims hold the device, beside what the agent saw.
                let all: BTreeSet<PodRef> =
                    targets.into_iter().chain(q.consumers.clone()).collect();
                targets = all.into_iter().collect();
            }
            let mut d = match drain(d, input, pv, &targets, &format!("for {method}#{n}")) {
                Ok(d) => d,
                Err(dec) => return *dec,
            };
            let manual = s.approval == ApprovalMode::Manual
                || (method == Method::Reboot && s.reboot_approval == ApprovalMode::Manual);
            if manual {
                let approved_now = verbs
                    .approve
                    .as_deref()
                    .is_some_and(|m| m.is_empty() || m == method);
                if approved_now && by.is_some() {
                    return approve(d, pv, &method, n, by.unwrap_or_default(), true);
                }
                d.phase(Phase::AwaitingApproval)
                    .action(format!("awaiting approval for {method}#{n}"));
                let msg = format!(
                    "drained; annotate unwedge.io/approve (empty for {method}, or an allowed method) with unwedge.io/by=<you> to approve attempt {n}"
                );
                d.condition(cond::APPROVED, false, "AwaitingApproval", msg.clone());
                return d.done(Step::Nothing, note(false, "AwaitingApproval", msg));
            }
            approve(d, pv, &method, n, input.operator.to_string(), false)
        }
        Phase::AwaitingApproval | Phase::NeedsAttention => {
            let current = d.new.plan.as_ref().map(|p| p.method.clone());
            if let Some(m) = verbs.approve.clone() {
                let Some(who) = by else {
                    d.condition(
                        cond::APPROVED,
                        false,
                        "MissingBy",
                        "unwedge.io/approve needs unwedge.io/by=<you>",
                    );
                    return d.done(wait(REQUEUE_SLOW, "approve without by"), None);
                };
                let method = if m.is_empty() {
                    match current
                        .clone()
                        .or_else(|| plan.as_ref().ok().map(|l| l[0].clone()))
                    {
                        Some(m) => m,
                        None => {
                            d.condition(
                                cond::APPROVED,
                                false,
                                "NoMethod",
                                "nothing to approve: name a method, unwedge.io/approve=<method>",
                            );
                            return d.done(wait(REQUEUE_SLOW, "approve without method"), None);
                        }
                    }
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
                    return d.done(
                        wait(REQUEUE_SLOW, "method not allowed"),
                        note(true, "MethodNotAllowed", msg),
                    );
                }
                let n = next_attempt(&status);
                if phase == Phase::AwaitingApproval && current.as_ref() == Some(&method) {
                    let n = d.new.plan.as_ref().map_or(n, |p| p.attempt);
                    return approve(d, pv, &method, n, who, true);
                }
                // Another method (or out of NeedsAttention): drain for it; the approval stays
                // on the wedge and is honoured when the drain completes.
                d.phase(Phase::Draining)
                    .action(format!("drain for {method}#{n}"))
                    .plan(&method, n, plan.as_deref().ok());
                d.new.phase_since = Some(d.now());
                d.condition(
                    cond::NEEDS_ATTENTION,
                    false,
                    "Approved",
                    format!("{who} approved {method}"),
                );
                return d.done(
                    Step::Nothing,
                    note(
                        false,
                        "ApprovedByHuman",
                        format!("{who} approved {method}#{n}; draining for it"),
                    ),
                );
            }
            if phase == Phase::NeedsAttention && verbs.retry.is_some() {
                let who = by.unwrap_or_else(|| "an unnamed user".into());
                // Where the ladder stood (the plan is kept through NeedsAttention), else the
                // last approved method, else the first rung.
                let rung = d
                    .new
                    .plan
                    .as_ref()
                    .map(|p| p.method.clone())
                    .or_else(|| status.approval.as_ref().map(|a| Method::from(&a.method)))
                    .or_else(|| plan.as_ref().ok().map(|l| l[0].clone()));
                let Some(rung) = rung else {
                    d.condition(
                        cond::NEEDS_ATTENTION,
                        true,
                        "NothingToRetry",
                        "no method to retry: approve one with unwedge.io/approve=<method>",
                    );
                    return d.done(wait(REQUEUE_SLOW, "nothing to retry"), None);
                };
                let n = next_attempt(&status);
                d.phase(Phase::Draining)
                    .action(format!("drain for {rung}#{n}"))
                    .plan(&rung, n, plan.as_deref().ok());
                d.new.phase_since = Some(d.now());
                let msg = format!("{who} asked for a retry: {rung}#{n}");
                d.condition(cond::NEEDS_ATTENTION, false, "Retry", msg.clone());
                return d.done(
                    Step::ClearVerbs {
                        keys: vec![
                            unwedge_crds::labels::ANN_RETRY.into(),
                            unwedge_crds::labels::ANN_BY.into(),
                        ],
                    },
                    note(false, "Retry", msg),
                );
            }
            if phase == Phase::NeedsAttention && held.reboot {
                // No reboot runs while a human looks: the reboot slot goes back to the policy
                // (the node keeps its place). A retry of the reboot asks for the slot again.
                let cand = Candidate {
                    wedge: name.into(),
                    node: node_name,
                    unit: held.unit,
                    reboot: false,
                };
                return d.done(
                    Step::Admit {
                        candidate: cand,
                        reclaim: true,
                    },
                    note(
                        false,
                        "RebootSlotReleased",
                        "no reboot runs while the wedge needs attention: its reboot slot is released",
                    ),
                );
            }
            d.done(wait(REQUEUE_IDLE, "waiting for a human"), None)
        }
        Phase::Approved | Phase::Recovering | Phase::Verifying => {
            attempt_progress(d, input, pv, &status, plan.ok(), ours)
        }
        Phase::Recovered | Phase::Abandoned => d.done(Step::Nothing, None),
    }
}

fn approve(
    mut d: Draft,
    pv: &PolicyView,
    method: &Method,
    n: u32,
    by: String,
    human: bool,
) -> Decision {
    if !human {
        d = match gate(d, pv, &format!("approve {method}#{n}")) {
            Ok(d) => d,
            Err(h) => return *h,
        };
    } else if pv.settings.paused || pv.breaker_tripped || dry_run(d.input, pv.settings) {
        d = match gate(d, pv, &format!("approve {method}#{n} (approved by {by})")) {
            Ok(d) => d,
            Err(h) => return *h,
        };
    }
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
    d.done(step, note(false, "Approved", msg))
}

fn attempt_progress(
    mut d: Draft,
    input: &Input,
    pv: &PolicyView,
    status: &GpuWedgeStatus,
    ladder: Option<Vec<Method>>,
    ours: bool,
) -> Decision {
    let s = pv.settings;
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
                return escalate(
                    d,
                    input,
                    pv,
                    status,
                    ladder,
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
            escalate(
                d,
                input,
                pv,
                status,
                ladder,
                &appr,
                format!("{tag} failed: {msg}"),
            )
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
            if input.device_advertised.is_none() && result.and_then(|r| r.advertised) == Some(false)
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
            if ours {
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

fn escalate(
    mut d: Draft,
    input: &Input,
    pv: &PolicyView,
    status: &GpuWedgeStatus,
    ladder: Option<Vec<Method>>,
    appr: &Approval,
    why: String,
) -> Decision {
    let _ = input;
    let n = next_attempt(status);
    let next = ladder.as_ref().and_then(|l| {
        let pos = l.iter().position(|m| *m == appr.method)?;
        l.get(pos + 1).cloned()
    });
    match next {
        Some(rung) if n <= pv.settings.max_attempts => {
            d.phase(Phase::Draining)
                .action(format!("drain for {rung}#{n}"))
                .plan(&rung, n, ladder.as_deref());
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

#[cfg(test)]
mod tests;
