//! The controller: loads a GpuWedge's surroundings, calls `decide`, persists the status, then
//! performs the one effect, and requeues.
//!
//! Nodes and RecoveryPolicies are watched into stores (and trigger the wedges they concern);
//! pods trigger the wedges of their node and are listed fresh per reconcile. Only the leader
//! acts: every API write first checks that leadership still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use unwedge_crds::labels::{
    ANN_ABANDON, ANN_APPROVE, ANN_BY, ANN_CORDONED_BY, ANN_RESUME, ANN_RETRY, NODE_CONDITION,
};
use unwedge_crds::{Eviction, GpuWedge, Phase, RecoveryPolicy};

use crate::breaker::{self, Verdict};
use crate::budget::{self, Limits};
use crate::decide::{
    self, Decision, Governance, Input, NodeView, PastWedge, PodView, PolicyView, Step, Verbs,
};
use crate::dra;
use crate::drain;
use crate::ledger;
use crate::metrics::{self, Metrics};
use crate::policy_match::{self, Governing};
use crate::quarantine;
use crate::settings::Settings;
use crate::status::OperatorStatus;
use crate::wake;

mod finalize;

/// Errors of one reconcile; the controller retries with a backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("API: {0}")]
    Kube(#[from] kube::Error),
    /// The ledger could not be changed.
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    /// This replica lost the lease mid-reconcile.
    #[error("not the leader any more")]
    NotLeader,
    /// The DeviceTaintRule could not be read, created or deleted.
    #[error(transparent)]
    Quarantine(#[from] quarantine::QuarantineError),
    /// The status write lost to a concurrent change of the wedge (decided again on a fresh read).
    #[error("the GpuWedge changed while it was being reconciled")]
    StatusConflict,
}

/// Shared state of the controller.
pub struct Ctx {
    /// API client.
    pub client: Client,
    /// GpuWedges (the controller's own store).
    pub wedges: Store<GpuWedge>,
    /// Nodes.
    pub nodes: Store<Node>,
    /// RecoveryPolicies.
    pub policies: Store<RecoveryPolicy>,
    /// Events.
    pub recorder: Recorder,
    /// Our identity (the approver of automatic approvals).
    pub identity: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Whether we lead.
    pub leader: watch::Receiver<bool>,
    /// Whether DRA devices are quarantined, and why (`--dra`, probed in `auto`).
    pub dra: dra::Support,
    /// Reconciles doing work at once, handed out first come first served.
    pub permits: tokio::sync::Semaphore,
    /// The same for wedges holding a budget place, so that a recovery under way never waits
    /// behind the first look at a storm's new wedges.
    pub admitted_permits: tokio::sync::Semaphore,
}

/// Whether `w` holds a place in its policy's ledger (admitted and not released).
fn holds_budget(ctx: &Ctx, w: &GpuWedge) -> bool {
    let Some(policy) = w.status.as_ref().and_then(|s| s.policy.as_deref()) else {
        return false;
    };
    let name = w.name_any();
    ctx.policies.get(&ObjectRef::new(policy)).is_some_and(|p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.admitted.iter().any(|a| a.wedge == name))
    })
}

impl Ctx {
    fn ensure_leader(&self) -> Result<(), Error> {
        if *self.leader.borrow() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    fn policy_api(&self) -> Api<RecoveryPolicy> {
        Api::all(self.client.clone())
    }

    fn wedge_api(&self) -> Api<GpuWedge> {
        Api::all(self.client.clone())
    }

    async fn event(&self, obj: &k8s_openapi::api::core::v1::ObjectReference, note: &decide::Note) {
        let ev = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.clone(),
            note: Some(note.message.chars().take(1000).collect()),
            action: note.reason.clone(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, obj).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}

/// Whether the incident is still open: not Recovered or Abandoned, and not being deleted (a
/// deleted wedge's places are released by `finalize::release_deleted`, it needs nothing more).
fn open(w: &GpuWedge) -> bool {
    w.metadata.deletion_timestamp.is_none()
        && !w
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_terminal)
}

/// The open wedges of `node` other than `except`, by name (the order a cordon is handed on in).
fn open_on_node(wedges: &[Arc<GpuWedge>], node: &str, except: &str) -> Vec<String> {
    let mut out: Vec<String> = wedges
        .iter()
        .filter(|w| w.spec.node_name == node && w.name_any() != except && open(w))
        .map(|w| w.name_any())
        .collect();
    out.sort();
    out
}

fn phase_of(w: &GpuWedge) -> Phase {
    w.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

fn node_labels(n: Option<&Node>) -> BTreeMap<String, String> {
    n.map(|n| n.labels().clone()).unwrap_or_default()
}

/// The policy that governs `wedge` and every policy, resolved from the stores: the policy whose
/// ledger holds the wedge (it keeps its place there until the incident ends, whatever the
/// node's labels say now), else the one that selects the node.
fn resolve_policy(
    ctx: &Ctx,
    node: Option<&Node>,
    wedge: &str,
) -> (Governing, Vec<Arc<RecoveryPolicy>>) {
    let policies: Vec<Arc<RecoveryPolicy>> = ctx.policies.state();
    let plain: Vec<RecoveryPolicy> = policies.iter().map(|p| (**p).clone()).collect();
    (
        policy_match::for_wedge(&plain, &node_labels(node), wedge),
        policies,
    )
}

fn nodes_governed_by(ctx: &Ctx, policies: &[RecoveryPolicy], name: &str) -> Vec<String> {
    ctx.nodes
        .state()
        .iter()
        .filter(|n| policy_match::governing(policies, n.labels()) == Governing::Policy(name.into()))
        .map(|n| n.name_any())
        .collect()
}

fn pod_view(p: &Pod) -> PodView {
    let owners = p.metadata.owner_references.clone().unwrap_or_default();
    let phase = p
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    PodView {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        restart_never: p
            .spec
            .as_ref()
            .is_some_and(|s| s.restart_policy.as_deref() == Some("Never")),
        mirror: p.annotations().contains_key("kubernetes.io/config.mirror"),
        daemon_set: owners.iter().any(|o| o.kind == "DaemonSet"),
        terminating: p.metadata.deletion_timestamp.is_some(),
        finished: phase == "Succeeded" || phase == "Failed",
        empty_dir: p
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v.iter().any(|v| v.empty_dir.is_some())),
    }
}

fn verbs(w: &GpuWedge) -> Verbs {
    let a = w.annotations();
    Verbs {
        approve: a.get(ANN_APPROVE).cloned(),
        retry: a.get(ANN_RETRY).cloned(),
        abandon: a.get(ANN_ABANDON).cloned(),
        by: a.get(ANN_BY).cloned(),
    }
}

/// Reconciles one GpuWedge.
pub async fn reconcile(w: Arc<GpuWedge>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let lane = if holds_budget(&ctx, &w) {
        &ctx.admitted_permits
    } else {
        &ctx.permits
    };
    let asked = std::time::Instant::now();
    let _permit = lane
        .acquire()
        .await
        .expect("the reconcile semaphores are never closed");
    let started = std::time::Instant::now();
    let name = w.name_any();
    let mut w = w;
    for _ in 0..STATUS_CONFLICT_RETRIES {
        let Some((action, step)) = reconcile_once(w, &ctx).await? else {
            // The wedge changed since the cache showed it (typically the agent's own status
            // write right after the create): decide again on a fresh read while this reconcile
            // holds its permit, instead of queueing behind every other wedge.
            ctx.ensure_leader()?;
            match ctx.wedge_api().get_opt(&name).await? {
                Some(fresh) => w = Arc::new(fresh),
                None => return Ok(Action::await_change()),
            }
            continue;
        };
        tracing::debug!(
            wedge = %name,
            step,
            permit_wait_ms = started.duration_since(asked).as_millis() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "reconciled"
        );
        return Ok(action);
    }
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// Fresh reads after a status write lost to a concurrent one, before the reconcile requeues.
const STATUS_CONFLICT_RETRIES: usize = 3;

/// Decides and acts once on `w`; `None` when the status write lost to a concurrent change
/// of the wedge (decide again on a fresh copy). Also returns the name of the step taken.
async fn reconcile_once(
    w: Arc<GpuWedge>,
    ctx: &Arc<Ctx>,
) -> Result<Option<(Action, &'static str)>, Error> {
    let name = w.name_any();
    if w.metadata.deletion_timestamp.is_some() {
        finalize::release_deleted(ctx, &w).await?;
        return Ok(Some((Action::await_change(), "release-deleted")));
    }
    let now = Timestamp::now();
    let node_name = w.spec.node_name.clone();
    let node = ctx.nodes.get(&ObjectRef::new(&node_name));
    // Missing from the cache is not enough: the watch may lag. Only a fresh 404 ends the wedge.
    let node_deleted = node.is_none()
        && open(&w)
        && Api::<Node>::all(ctx.client.clone())
            .get_opt(&node_name)
            .await?
            .is_none();
    let (governing, policies) = resolve_policy(ctx, node.as_deref(), &name);
    let plain: Vec<RecoveryPolicy> = policies.iter().map(|p| (**p).clone()).collect();
    let all: Vec<Arc<GpuWedge>> = ctx.wedges.state();

    // Policy view (owned data first, borrowed view after).
    let mut settings_holder: Option<(
        String,
        Settings,
        Vec<unwedge_crds::Admission>,
        Limits,
        bool,
    )> = None;
    let mut invalid: Option<(String, String)> = None;
    if let Governing::Policy(pname) = &governing {
        let p = policies
            .iter()
            .find(|p| p.name_any() == *pname)
            .expect("governing policy is in the store");
        match Settings::from_spec(&p.spec) {
            Ok(s) => {
                let nodes = nodes_governed_by(ctx, &plain, pname);
                let st = p.status.clone().unwrap_or_default();
                let limits = Limits::of(&s, nodes.len() as u32, st.devices_selected);
                let tripped = breaker_check(ctx, p, &s, &all, &nodes, now).await?;
                settings_holder = Some((pname.clone(), s, st.admitted, limits, tripped));
            }
            Err(e) => invalid = Some((pname.clone(), e.to_string())),
        }
    }
    let plan_is_none = decide::plans_none(&w);
    let mut ahead: Vec<(Timestamp, String, String)> = all
        .iter()
        .filter(|o| open(o) && o.spec.node_name != node_name)
        .filter(|o| {
            o.status.as_ref().and_then(|s| s.policy.as_deref())
                == settings_holder.as_ref().map(|h| h.0.as_str())
        })
        .filter(|o| decide::plans_none(o) == plan_is_none)
        .filter(|o| (decide::arrived(o), o.name_any()) < (decide::arrived(&w), name.clone()))
        .filter(|o| {
            !settings_holder
                .as_ref()
                .is_some_and(|h| h.2.iter().any(|a| a.wedge == o.name_any()))
        })
        .map(|o| (decide::arrived(o), o.name_any(), o.spec.node_name.clone()))
        .collect();
    ahead.sort();
    let waiting_ahead: Vec<(String, String)> = ahead.into_iter().map(|(_, w, n)| (w, n)).collect();
    let governance = match (&governing, &settings_holder, &invalid) {
        (_, Some((pname, s, ledger, limits, tripped)), _) => Governance::Policy(PolicyView {
            name: pname,
            settings: s,
            ledger,
            limits: *limits,
            waiting_ahead: waiting_ahead.clone(),
            breaker_tripped: *tripped,
        }),
        (_, None, Some((n, e))) => Governance::Invalid {
            name: n.clone(),
            error: e.clone(),
        },
        (Governing::Conflict(n), _, _) => Governance::Conflict(n.clone()),
        _ => Governance::NoPolicy,
    };

    let device = unwedge_crds::labels::device_label(&w.spec.device.pci_address);
    let history: Vec<PastWedge> = all
        .iter()
        .filter(|o| {
            o.name_any() != name
                && o.spec.node_name == node_name
                && unwedge_crds::labels::device_label(&o.spec.device.pci_address) == device
        })
        .filter(|o| decide::arrived(o) <= decide::arrived(&w))
        .map(|o| PastWedge {
            name: o.name_any(),
            detected_at: decide::arrived(o),
            evicted_at: o.status.as_ref().and_then(decide::none_round_at),
        })
        .collect();
    let others = open_on_node(&all, &node_name, &name);
    let pods: Vec<PodView> = Api::<Pod>::all(ctx.client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
        .await?
        .items
        .iter()
        .map(pod_view)
        .collect();
    let node_view = node.as_deref().map(NodeView::of);
    let (dra_view, quarantine_rule, device_advertised) = dra_inputs(ctx, &w).await?;
    let input = Input {
        wedge: &w,
        node: node_view.as_ref(),
        policy: governance,
        pods: &pods,
        history: &history,
        others_on_node: &others,
        device_advertised,
        now,
        operator: &ctx.identity,
        verbs: verbs(&w),
        dra: dra_view,
        quarantine_rule,
        node_deleted,
    };
    let decision = decide::decide(&input);
    let step = step_name(&decision.step);
    let action = match perform(&w, ctx, &input, decision, node.as_deref()).await {
        Err(Error::StatusConflict) => return Ok(None),
        r => r?,
    };
    update_node_condition(ctx, &node_name, &name).await?;
    Ok(Some((action, step)))
}

/// The name of a step, for the log.
fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Nothing => "nothing",
        Step::Wait { .. } => "wait",
        Step::Admit { .. } => "admit",
        Step::Release => "release",
        Step::Cordon => "cordon",
        Step::Quarantine => "quarantine",
        Step::Unquarantine => "unquarantine",
        Step::Finalize => "finalize",
        Step::HandOverCordon { .. } => "hand-over-cordon",
        Step::Uncordon => "uncordon",
        Step::Evict { .. } => "evict",
        Step::ForceDelete { .. } => "force-delete",
        Step::ClearVerbs { .. } => "clear-verbs",
    }
}

/// The DRA side of a wedge: its view (when DRA is on and the agent named a DRA device),
/// whether our rule exists, and whether the device is published again (the verification).
async fn dra_inputs(
    ctx: &Ctx,
    w: &GpuWedge,
) -> Result<(Option<decide::DraView>, bool, Option<bool>), Error> {
    let name = w.name_any();
    let dev = w.spec.device.dra.as_ref().filter(|_| ctx.dra.on);
    // A rule of ours is looked for whatever the mode, so one left from a DRA-on run is
    // still deleted at recovery.
    let rule = if ctx.dra.on
        || w.status
            .as_ref()
            .is_some_and(|s| s.quarantine_rule.is_some())
    {
        match quarantine::get(&ctx.client, &name).await {
            Ok(r) => r.is_some(),
            Err(e) => {
                tracing::warn!(wedge = %name, error = %e, "cannot read the DeviceTaintRule");
                return Err(Error::Quarantine(e));
            }
        }
    } else {
        false
    };
    let Some(dev) = dev else {
        return Ok((None, rule, None));
    };
    if w.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(Phase::is_terminal)
    {
        return Ok((None, rule, None));
    }
    let slices = quarantine::slices(&ctx.client, Some(&w.spec.node_name)).await?;
    if !rule && !dra::advertised(&slices, dev) {
        // The agent-written DRA device is not published by the wedge's own node: never taint a
        // device this node does not have (a compromised node could name another node's GPU).
        // The wedge is handled like a non-DRA one: its own node is cordoned.
        tracing::warn!(wedge = %name, node = %w.spec.node_name, driver = %dev.driver, pool = %dev.pool, device = %dev.device,
            "the wedge names a DRA device that no ResourceSlice of its node publishes: not quarantining it, cordoning the node instead");
        return Ok((None, rule, None));
    }
    let claims = quarantine::claims(&ctx.client).await?;
    let view = decide::DraView {
        rule: dra::rule_name(&name),
        consumers: dra::consumers(&claims, dev),
    };
    Ok((Some(view), rule, Some(dra::advertised(&slices, dev))))
}

/// Evaluates the policy's circuit breaker and records a trip or a resume on the policy.
async fn breaker_check(
    ctx: &Ctx,
    p: &RecoveryPolicy,
    s: &Settings,
    all: &[Arc<GpuWedge>],
    nodes: &[String],
    now: Timestamp,
) -> Result<bool, Error> {
    let st = p.status.clone().unwrap_or_default();
    let resumed_at = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "CircuitBreakerTripped" && c.status == "False")
        .map(|c| c.last_transition_time.0);
    let annotation = p.annotations().get(ANN_RESUME).cloned();
    let state = breaker::State {
        tripped_at: st.circuit_breaker_tripped_at.as_ref().map(|t| t.0),
        resumed: st.resumed.as_deref(),
        resume_annotation: annotation.as_deref(),
        resumed_at,
    };
    let detections: Vec<Timestamp> = all
        .iter()
        .filter(|w| nodes.contains(&w.spec.node_name))
        .map(|w| decide::arrived(w))
        .collect();
    let verdict = breaker::evaluate(s.circuit_breaker.as_ref(), &state, &detections, now);
    let pname = p.name_any();
    ctx.metrics
        .breaker
        .get_or_create(&metrics::PolicyLabel {
            policy: pname.clone(),
        })
        .set(i64::from(verdict.holds()));
    match &verdict {
        Verdict::Trip { count } => {
            ctx.ensure_leader()?;
            let count = *count;
            let _: Result<_, std::convert::Infallible> =
                ledger::update(&ctx.policy_api(), &pname, |_, st| {
                    if st.circuit_breaker_tripped_at.is_some() {
                        return Ok(false);
                    }
                    st.circuit_breaker_tripped_at = Some(Time(now));
                    set_policy_condition(
                        st,
                        "CircuitBreakerTripped",
                        true,
                        "TooManyWedges",
                        &format!(
                            "{count} wedges in the window; annotate unwedge.io/resume to resume"
                        ),
                        now,
                    );
                    Ok(true)
                })
                .await?;
            ctx.event(&p.object_ref(&()), &decide::Note { warning: true, reason: "CircuitBreakerTripped".into(), message: format!("{count} wedges within the window: automatic actions paused; change annotation unwedge.io/resume to resume") }).await;
        }
        Verdict::Resume { value } => {
            ctx.ensure_leader()?;
            let _: Result<_, std::convert::Infallible> =
                ledger::update(&ctx.policy_api(), &pname, |_, st| {
                    st.circuit_breaker_tripped_at = None;
                    st.resumed = Some(value.clone());
                    set_policy_condition(
                        st,
                        "CircuitBreakerTripped",
                        false,
                        "Resumed",
                        &format!("resumed ({value})"),
                        now,
                    );
                    Ok(true)
                })
                .await?;
        }
        _ => {}
    }
    Ok(verdict.holds())
}

fn set_policy_condition(
    st: &mut unwedge_crds::RecoveryPolicyStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let list = st.conditions.get_or_insert_with(Vec::new);
    let s = if status { "True" } else { "False" };
    if let Some(c) = list.iter_mut().find(|c| c.type_ == type_) {
        if c.status != s {
            c.last_transition_time = Time(now);
        }
        c.status = s.into();
        c.reason = reason.into();
        c.message = message.into();
    } else {
        list.push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.into(),
            status: s.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(now),
            observed_generation: None,
        });
    }
}

/// Writes the operator's part of the status; returns the wedge as the API server stored it.
async fn patch_status(ctx: &Ctx, w: &GpuWedge, status: &OperatorStatus) -> Result<GpuWedge, Error> {
    ctx.ensure_leader()?;
    // The resourceVersion makes the write a compare-and-swap against the object we decided on.
    let mut body = status.merge_patch();
    body["metadata"] = json!({ "resourceVersion": w.resource_version() });
    Ok(ctx
        .wedge_api()
        .patch_status(&w.name_any(), &PatchParams::default(), &Patch::Merge(&body))
        .await?)
}

async fn perform(
    w: &GpuWedge,
    ctx: &Ctx,
    input: &Input<'_>,
    d: Decision,
    node: Option<&Node>,
) -> Result<Action, Error> {
    let name = w.name_any();
    let current = w
        .status
        .as_ref()
        .map(OperatorStatus::of)
        .unwrap_or_default();
    let changed = d.status != current;
    let mut written = None;
    if changed {
        match patch_status(ctx, w, &d.status).await {
            Err(Error::Kube(kube::Error::Api(s))) if s.is_conflict() => {
                return Err(Error::StatusConflict);
            }
            r => written = Some(r?),
        }
        if current.phase.is_none() && d.status.phase.is_some() {
            // Counted once, by the write that gave the wedge its first phase (a reconcile that
            // lost that write to a concurrent change counts nothing).
            ctx.metrics
                .wedges
                .get_or_create(&metrics::DriverMethod {
                    driver: w.spec.device.driver.clone(),
                    method: w.spec.methods.first().cloned().unwrap_or_default(),
                })
                .inc();
        }
        if let Some(n) = &d.note {
            ctx.event(&w.object_ref(&()), n).await;
            if matches!(n.reason.as_str(), "Escalating" | "LadderExhausted")
                && let Some(a) = &current.approval
            {
                ctx.metrics
                    .attempt_failures
                    .get_or_create(&metrics::MethodLabel {
                        method: a.method.clone(),
                    })
                    .inc();
            }
        }
        let finished = matches!(d.status.phase, Some(Phase::Recovered | Phase::Abandoned))
            && !matches!(current.phase, Some(Phase::Recovered | Phase::Abandoned));
        if finished {
            let secs = now_secs(w);
            let method = d
                .status
                .approval
                .as_ref()
                .map_or_else(|| "none".to_string(), |a| a.method.clone());
            let result = if d.status.phase == Some(Phase::Recovered) {
                "recovered"
            } else {
                "abandoned"
            };
            ctx.metrics
                .recovery_duration
                .get_or_create(&metrics::MethodResult {
                    method,
                    result: result.into(),
                })
                .observe(secs);
        }
    }
    let policy = d.status.policy.clone().unwrap_or_default();
    let settings = match &input.policy {
        Governance::Policy(p) => Some(p.settings.clone()),
        _ => None,
    };
    let grace = settings.as_ref().and_then(|s| s.grace_period_seconds);
    let soon = Action::requeue(Duration::from_millis(500));
    let force = matches!(d.step, Step::ForceDelete { .. });
    match d.step.clone() {
        Step::Nothing => {
            if d.status.phase.is_some_and(Phase::is_terminal) && finalize::held(w) {
                // Terminal with nothing left to release in its policy (decide would have said
                // so); a place left in another policy's ledger (a relabel) goes first.
                for p in finalize::holding_policies(ctx, w) {
                    ctx.ensure_leader()?;
                    match ledger::release(&ctx.policy_api(), &p, &name).await {
                        Ok(()) | Err(ledger::LedgerError::NoPolicy(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                finalize::forget(ctx, written.as_ref().unwrap_or(w)).await?;
            }
            Ok(if changed {
                soon
            } else {
                Action::requeue(Duration::from_secs(60))
            })
        }
        Step::Wait { requeue_after, why } => {
            tracing::debug!(wedge = %name, %why, "waiting");
            Ok(Action::requeue(requeue_after))
        }
        Step::Admit { candidate, reclaim } => {
            ctx.ensure_leader()?;
            // A place only for a wedge that is still open, read fresh: after a watch cut the
            // cache can show a wedge that has finished and given its place back as still
            // Verifying and cordoned, and a reclaim decided on that would hold a place for a
            // finished wedge (seen in the default-size chaos run). A first admission (Detected,
            // Queued) is not read again: its budget check and the ledger's fresh write bound it.
            let cached = w.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
            if reclaim || !matches!(cached, Phase::Detected | Phase::Queued) {
                let open_now = ctx.wedge_api().get_opt(&name).await?.is_some_and(|f| {
                    f.metadata.deletion_timestamp.is_none()
                        && !f
                            .status
                            .as_ref()
                            .and_then(|s| s.phase)
                            .is_some_and(Phase::is_terminal)
                });
                if !open_now {
                    tracing::info!(wedge = %name, policy = %policy,
                        "not admitted: the wedge has finished or is being deleted (the cache lagged)");
                    return Ok(soon);
                }
            }
            // The finalizer first: a place is never held by a wedge that can vanish unnoticed.
            if let Some(patched) = finalize::ensure(ctx, written.as_ref().unwrap_or(w)).await? {
                written = Some(patched);
            }
            let (limits, ahead) = match &input.policy {
                Governance::Policy(p) => (p.limits, p.waiting_ahead.clone()),
                _ => return Ok(soon),
            };
            // A place taken back without the budget's check (reclaim), or by a wedge admitted
            // before under another policy (a relabelled node): never in a second ledger. The
            // policy was chosen from the cache, which can lag behind the ledger that holds the
            // wedge; a fresh list decides, and the wedge waits for the cache to catch up.
            let admitted_by = w.status.as_ref().and_then(|s| s.policy.as_deref());
            if reclaim || admitted_by.is_some_and(|a| !a.is_empty() && a != policy) {
                let fresh = ctx.policy_api().list(&Default::default()).await?;
                if let Some(holder) = policy_match::held_elsewhere(&fresh.items, &name, &policy) {
                    tracing::info!(wedge = %name, policy = %policy, %holder,
                        "not admitted: the ledger of another policy holds this wedge");
                    return Ok(soon);
                }
            }
            match ledger::admit(
                &ctx.policy_api(),
                &policy,
                &candidate,
                &limits,
                &ahead,
                reclaim,
            )
            .await?
            {
                Ok(()) => {
                    tracing::info!(wedge = %name, policy = %policy, reboot = candidate.reboot, "admitted");
                    let Governance::Policy(p) = &input.policy else {
                        return Ok(soon);
                    };
                    // Go on at once with what the place allows (the cordon, or the device's
                    // quarantine): the next reconcile would decide it from the same inputs
                    // once the cache shows the ledger, one round of reads later.
                    let w = written.unwrap_or_else(|| w.clone());
                    let mut held = budget::release(p.ledger, &candidate.wedge);
                    held.push(candidate.admission());
                    let next = Input {
                        wedge: &w,
                        policy: Governance::Policy(PolicyView {
                            ledger: &held,
                            ..p.clone()
                        }),
                        now: Timestamp::now(),
                        ..input.clone()
                    };
                    let d = decide::decide(&next);
                    if matches!(d.step, Step::Admit { .. }) {
                        return Ok(soon);
                    }
                    Box::pin(perform(&w, ctx, &next, d, node)).await
                }
                Err(reason) => {
                    let q = decide::queued_status(&d.status, &reason, Timestamp::now());
                    if q != current {
                        // Derived from the status just written (which moved the resourceVersion):
                        // a plain merge patch of the operator's fields.
                        ctx.ensure_leader()?;
                        ctx.wedge_api()
                            .patch_status(
                                &name,
                                &PatchParams::default(),
                                &Patch::Merge(&q.merge_patch()),
                            )
                            .await?;
                    }
                    Ok(Action::requeue(decide::queue_recheck(ahead.len())))
                }
            }
        }
        Step::Release => {
            ctx.ensure_leader()?;
            if let Some(holder) = finalize::cordon_without_place(ctx, w).await? {
                // Releasing now would leave the node cordoned with no place counting it (two
                // wedges of one node finishing together): wait until its holder lets go.
                tracing::debug!(wedge = %name, %holder, "release waits: the node's cordon is held by a finished wedge");
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            // Every ledger that names it, not only its policy's now: a node relabelled
            // mid-recovery may have given it a place in the policy it moved away from.
            let mut places = finalize::holding_policies(ctx, w);
            places.push(policy.clone());
            places.sort();
            places.dedup();
            for p in places.iter().filter(|p| !p.is_empty()) {
                match ledger::release(&ctx.policy_api(), p, &name).await {
                    Ok(()) | Err(ledger::LedgerError::NoPolicy(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let ours = node.is_some_and(|n| n.annotations().get(ANN_CORDONED_BY) == Some(&name));
            if d.status.phase.is_some_and(Phase::is_terminal) && !ours && !input.quarantine_rule {
                finalize::forget(ctx, written.as_ref().unwrap_or(w)).await?;
            }
            cleanup_history(ctx, w, settings.as_ref().map_or(5, |s| s.history_limit)).await?;
            Ok(Action::requeue(Duration::from_secs(300)))
        }
        Step::Cordon => {
            ctx.ensure_leader()?;
            let body = json!({
                "metadata": {"annotations": {ANN_CORDONED_BY: name}},
                "spec": {"unschedulable": true}
            });
            Api::<Node>::all(ctx.client.clone())
                .patch(
                    &w.spec.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await?;
            if let Some(n) = node {
                ctx.event(
                    &n.object_ref(&()),
                    &decide::Note {
                        warning: false,
                        reason: "GpuWedgeCordon".into(),
                        message: format!("cordoned by unwedge for {name}"),
                    },
                )
                .await;
            }
            if let Some(dev) = w
                .spec
                .device
                .dra
                .as_ref()
                .filter(|_| ctx.dra.on && input.dra.is_none())
            {
                let note = decide::Note {
                    warning: true,
                    reason: "DraDeviceNotOnNode".into(),
                    message: format!(
                        "no ResourceSlice of node {} publishes DRA device {}/{}/{}: the node is cordoned instead of quarantining a device it does not have",
                        w.spec.node_name, dev.driver, dev.pool, dev.device
                    ),
                };
                ctx.event(&w.object_ref(&()), &note).await;
            }
            if let Some(dev) = w.spec.device.dra.as_ref().filter(|_| !ctx.dra.on) {
                let message = dra::cordoned_instead(dev, &w.spec.node_name, &ctx.dra);
                let note = decide::Note {
                    warning: true,
                    reason: "QuarantineUnavailable".into(),
                    message,
                };
                ctx.event(&w.object_ref(&()), &note).await;
            }
            Ok(soon)
        }
        Step::Uncordon | Step::HandOverCordon { .. } => {
            ctx.ensure_leader()?;
            // Re-read the node and guard with its resourceVersion: never uncordon a cordon
            // that is not (or no longer) ours.
            let api = Api::<Node>::all(ctx.client.clone());
            let fresh = api.get(&w.spec.node_name).await?;
            if fresh.annotations().get(ANN_CORDONED_BY) != Some(&name) {
                return Ok(soon);
            }
            // The heir as read now: the cache that chose it may not show yet that it finished
            // (and let its finalizer go), and a cordon handed to it would outlive it.
            let heir = match &d.step {
                Step::HandOverCordon { .. } => cordon_heir(ctx, &w.spec.node_name, &name).await?,
                _ => None,
            };
            let body = cordon_release_patch(fresh.resource_version(), heir.as_deref());
            match api
                .patch(
                    &w.spec.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
            {
                Err(kube::Error::Api(s)) if s.is_conflict() => return Ok(soon),
                r => r?,
            };
            let msg = match &heir {
                Some(to) => format!("cordon handed from {name} to {to}"),
                None => format!("uncordoned by unwedge: {name} recovered"),
            };
            ctx.event(
                &fresh.object_ref(&()),
                &decide::Note {
                    warning: false,
                    reason: "GpuWedgeUncordon".into(),
                    message: msg,
                },
            )
            .await;
            Ok(soon)
        }
        Step::Evict { pods } | Step::ForceDelete { pods } => {
            let mut records: Vec<Eviction> = d.status.evictions.clone().unwrap_or_default();
            let mut refused = Vec::new();
            for p in &pods {
                ctx.ensure_leader()?;
                let out = if force {
                    drain::force_delete(&ctx.client, p, grace).await
                } else {
                    drain::evict(&ctx.client, p, grace).await
                };
                ctx.metrics
                    .evictions
                    .get_or_create(&metrics::EvictionResult {
                        result: out.metric().into(),
                    })
                    .inc();
                match (&out, out.recorded()) {
                    (_, Some(result)) => records.push(Eviction {
                        namespace: p.namespace.clone(),
                        pod: p.name.clone(),
                        at: Time(Timestamp::now()),
                        result: result.into(),
                    }),
                    (drain::Outcome::Refused(m), _) | (drain::Outcome::Failed(m), _) => {
                        refused.push(format!("{}/{}: {m}", p.namespace, p.name))
                    }
                    _ => {}
                }
            }
            if records.len() != d.status.evictions.as_ref().map_or(0, Vec::len) {
                // Only the evictions array: a plain merge patch, no resourceVersion (the
                // status was just written and the agent may have written since).
                let body = json!({"status": {"evictions": records}});
                ctx.wedge_api()
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
            }
            if !refused.is_empty() {
                tracing::info!(wedge = %name, refused = ?refused, "evictions refused; backing off");
                ctx.event(
                    &w.object_ref(&()),
                    &decide::Note {
                        warning: true,
                        reason: "EvictionRefused".into(),
                        message: refused.join("; "),
                    },
                )
                .await;
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Step::ClearVerbs { keys } => {
            ctx.ensure_leader()?;
            let ann: serde_json::Map<String, serde_json::Value> = keys
                .into_iter()
                .map(|k| (k, serde_json::Value::Null))
                .collect();
            let body = json!({"metadata": {"annotations": ann}});
            ctx.wedge_api()
                .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await?;
            Ok(soon)
        }
        Step::Quarantine => {
            ctx.ensure_leader()?;
            let dev = w.spec.device.dra.clone().unwrap_or_default();
            match quarantine::ensure(&ctx.client, &name, w.uid().as_deref(), &dev).await? {
                quarantine::Ensured::Created => {
                    tracing::info!(wedge = %name, rule = %dra::rule_name(&name), device = %dev.device, "device quarantined")
                }
                quarantine::Ensured::Existing => {
                    tracing::debug!(wedge = %name, "DeviceTaintRule already there")
                }
            }
            Ok(soon)
        }
        Step::Finalize => {
            ctx.ensure_leader()?;
            finalize::ensure(ctx, written.as_ref().unwrap_or(w)).await?;
            tracing::info!(wedge = %name, "finalizer put on a wedge that held a place or the node's cordon without it");
            // Decide again at once on a fresh read: the copy decided from may be a cache that
            // lags (a cut watch), which would ask for the finalizer again every requeue.
            Err(Error::StatusConflict)
        }
        Step::Unquarantine => {
            ctx.ensure_leader()?;
            if quarantine::remove(&ctx.client, &name).await? {
                tracing::info!(wedge = %name, rule = %dra::rule_name(&name), "quarantine lifted: DeviceTaintRule deleted");
            }
            Ok(soon)
        }
    }
}

/// The wedge of `node` (other than `except`) that takes unwedge's cordon over, chosen by
/// [`decide::cordon_heir`] from the open wedges the cache shows, each read fresh; `None`: lift it.
async fn cordon_heir(ctx: &Ctx, node: &str, except: &str) -> Result<Option<String>, Error> {
    let policies = ctx.policies.state();
    let mut heirs = Vec::new();
    for name in open_on_node(&ctx.wedges.state(), node, except) {
        let Some(w) = ctx.wedge_api().get_opt(&name).await? else {
            continue;
        };
        heirs.push(decide::Heir {
            open: open(&w),
            finalized: finalize::held(&w),
            placed: policies.iter().any(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.admitted.iter().any(|a| a.wedge == name))
            }),
            name,
        });
    }
    Ok(decide::cordon_heir(&heirs))
}

/// The node patch that lets go of unwedge's cordon, guarded by the node's resourceVersion:
/// hands it to the wedge `to` (the annotation names it, the node stays unschedulable), or lifts
/// it (annotation removed, node schedulable).
fn cordon_release_patch(resource_version: Option<String>, to: Option<&str>) -> serde_json::Value {
    match to {
        Some(to) => {
            json!({"metadata": {"resourceVersion": resource_version, "annotations": {ANN_CORDONED_BY: to}}})
        }
        None => {
            json!({"metadata": {"resourceVersion": resource_version, "annotations": {ANN_CORDONED_BY: null}}, "spec": {"unschedulable": false}})
        }
    }
}

fn now_secs(w: &GpuWedge) -> f64 {
    Timestamp::now()
        .duration_since(decide::arrived(w))
        .as_secs_f64()
        .max(0.0)
}

/// Keeps `limit` finished GpuWedges per device of this wedge's node; deletes older ones.
async fn cleanup_history(ctx: &Ctx, w: &GpuWedge, limit: u32) -> Result<(), Error> {
    let mut done: Vec<Arc<GpuWedge>> = ctx
        .wedges
        .state()
        .into_iter()
        .filter(|o| {
            o.spec.node_name == w.spec.node_name
                && o.spec.device.pci_address == w.spec.device.pci_address
                && !open(o)
        })
        .collect();
    done.sort_by_key(|o| {
        std::cmp::Reverse(
            o.status
                .as_ref()
                .and_then(|s| s.finished_at.clone())
                .map(|t| t.0)
                .unwrap_or_else(|| decide::arrived(o)),
        )
    });
    for old in done.iter().skip(limit as usize) {
        ctx.ensure_leader()?;
        match ctx
            .wedge_api()
            .delete(&old.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => tracing::info!(wedge = %old.name_any(), "history cleanup: deleted"),
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sets the node condition `GpuWedged` while any device on it is unrecovered.
async fn update_node_condition(ctx: &Ctx, node: &str, _this: &str) -> Result<(), Error> {
    let Some(n) = ctx.nodes.get(&ObjectRef::new(node)) else {
        return Ok(());
    };
    // From the store, which may lag our own write of this reconcile: that write comes back as a
    // watch event and reconciles the wedge again, which corrects the condition. The message
    // names devices only (no phases), so it changes when a device opens or closes, not at every
    // step of a recovery.
    let open_ones: Vec<String> = ctx
        .wedges
        .state()
        .iter()
        .filter(|w| w.spec.node_name == node && open(w))
        .map(|w| w.spec.device.pci_address.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let (status, reason, message) = if open_ones.is_empty() {
        (
            "False",
            "AllRecovered",
            "no wedged GPU on this node".to_string(),
        )
    } else {
        (
            "True",
            "Unrecovered",
            format!("wedged: {}", open_ones.join(", ")),
        )
    };
    let current = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == NODE_CONDITION));
    if current.is_some_and(|c| c.status == status && c.message.as_deref() == Some(message.as_str()))
    {
        return Ok(());
    }
    if current.is_none() && open_ones.is_empty() {
        return Ok(());
    }
    ctx.ensure_leader()?;
    let now = Time(Timestamp::now());
    let since = match current {
        Some(c) if c.status == status => c.last_transition_time.clone().unwrap_or(now.clone()),
        _ => now.clone(),
    };
    let body = json!({"status": {"conditions": [{
        "type": NODE_CONDITION, "status": status, "reason": reason, "message": message,
        "lastHeartbeatTime": now, "lastTransitionTime": since
    }]}});
    Api::<Node>::all(ctx.client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&body))
        .await?;
    Ok(())
}

/// Reconciles doing work at once (different wedges; one wedge is never reconciled twice at
/// once).
///
/// Not the controller's own `concurrency` limit: at its limit kube-runtime parks due requests
/// in a hash set and takes them in the set's iteration order, so in the 1,000-node storm some
/// new wedges waited four minutes for their first reconcile while others' follow-ups kept
/// arriving. The controller starts every due reconcile; each waits here for a permit of a
/// tokio semaphore, which is fair (first come, first served). Wedges holding a budget place
/// have their own lane of half as many permits (`Ctx::admitted_permits`).
const RECONCILE_CONCURRENCY: usize = 16;

fn error_policy(w: Arc<GpuWedge>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    match e {
        Error::NotLeader => Action::await_change(),
        e => {
            tracing::warn!(wedge = %w.name_any(), error = %e, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// Drops ledger entries of wedges that are gone, read fresh from the API (at every leadership change).
pub async fn repair_ledgers(client: &Client) -> Result<(), Error> {
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    // Only wedges that are gone: a finished wedge still holding its place releases it itself
    // (every wedge is reconciled after a leadership change), and only once its node's cordon
    // is lifted, so the node is never cordoned without a place counting it.
    let existing: std::collections::BTreeSet<String> = wedges
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|w| w.name_any())
        .collect();
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    for p in policies.list(&ListParams::default()).await?.items {
        let dropped = ledger::repair(&policies, &p.name_any(), |w| existing.contains(w)).await?;
        if !dropped.is_empty() {
            tracing::info!(policy = %p.name_any(), ?dropped, "ledger repaired: dropped places of wedges that are gone");
        }
    }
    Ok(())
}

/// Drops ledger entries whose wedge is gone — missing from the cache and confirmed by a fresh
/// read (the cache may lag): runs with every refresh, so a place held by a wedge that vanished
/// without its finalizer (removed by hand, or a wedge from before the finalizer existed) is
/// given back within one refresh period, not only at the next leader change. A finished wedge's
/// place is left to its own Release step, which keeps it until the node's cordon is lifted.
pub async fn repair_from_store(ctx: &Ctx) -> Result<(), Error> {
    if !*ctx.leader.borrow() {
        return Ok(());
    }
    let known: std::collections::BTreeSet<String> =
        ctx.wedges.state().iter().map(|w| w.name_any()).collect();
    for p in ctx.policies.state() {
        let stale: Vec<String> = p
            .status
            .iter()
            .flat_map(|s| s.admitted.iter())
            .filter(|a| !known.contains(&a.wedge))
            .map(|a| a.wedge.clone())
            .collect();
        let mut gone = std::collections::BTreeSet::new();
        for w in stale {
            if ctx.wedge_api().get_opt(&w).await?.is_none() {
                gone.insert(w);
            }
        }
        if gone.is_empty() {
            continue;
        }
        ctx.ensure_leader()?;
        let dropped =
            ledger::repair(&ctx.policy_api(), &p.name_any(), |w| !gone.contains(w)).await?;
        if !dropped.is_empty() {
            ctx.metrics.ledger_repairs.inc_by(dropped.len() as u64);
            tracing::info!(policy = %p.name_any(), ?dropped, "ledger repaired: dropped places of wedges that are gone");
        }
    }
    Ok(())
}

/// Lifts unwedge's cordon from nodes whose `unwedge.io/cordoned-by` names a wedge that is gone
/// (missing from the cache, confirmed by a fresh read): the cordon of a wedge deleted without
/// its finalizer's release (the finalizer removed by hand, or a path not yet understood) would
/// otherwise stay forever. The cordon goes to another open wedge of the node, else is lifted,
/// guarded by the node's resourceVersion. Runs with every refresh, on the leader.
pub async fn release_orphan_cordons(ctx: &Ctx) -> Result<(), Error> {
    if !*ctx.leader.borrow() {
        return Ok(());
    }
    let wedges = ctx.wedges.state();
    for n in ctx.nodes.state() {
        let Some(holder) = n.annotations().get(ANN_CORDONED_BY) else {
            continue;
        };
        if wedges.iter().any(|w| w.name_any() == *holder)
            || ctx.wedge_api().get_opt(holder).await?.is_some()
        {
            continue;
        }
        let node = n.name_any();
        let heir = cordon_heir(ctx, &node, holder).await?;
        ctx.ensure_leader()?;
        let body = cordon_release_patch(n.resource_version(), heir.as_deref());
        match Api::<Node>::all(ctx.client.clone())
            .patch(&node, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                tracing::warn!(%node, %holder, to = ?heir, "cordon of a wedge that is gone released")
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Refreshes the gauges and each policy's status summary and Conflict condition.
pub async fn refresh(ctx: &Ctx) -> Result<(), Error> {
    let wedges = ctx.wedges.state();
    let mut by_phase: BTreeMap<String, i64> = BTreeMap::new();
    for w in &wedges {
        *by_phase.entry(format!("{:?}", phase_of(w))).or_default() += 1;
    }
    for p in [
        "Detected",
        "Queued",
        "Cordoned",
        "Draining",
        "AwaitingApproval",
        "Approved",
        "Recovering",
        "Verifying",
        "Restarting",
        "Quarantined",
        "Recovered",
        "NeedsAttention",
        "Abandoned",
    ] {
        ctx.metrics
            .by_phase
            .get_or_create(&metrics::PhaseLabel { phase: p.into() })
            .set(*by_phase.get(p).unwrap_or(&0));
    }
    ctx.metrics
        .set_open_wedges(metrics::wedge_info_labels(wedges.iter().map(|w| &**w)));
    ctx.metrics.leader.set(i64::from(*ctx.leader.borrow()));
    let policies: Vec<RecoveryPolicy> =
        ctx.policies.state().iter().map(|p| (**p).clone()).collect();
    let nodes: BTreeMap<String, BTreeMap<String, String>> = ctx
        .nodes
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    // The devices each policy's maxUnavailableDevices is a share of (DRA only).
    let slices = if ctx.dra.on {
        match quarantine::slices(&ctx.client, None).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list ResourceSlices: devicesSelected not refreshed");
                None
            }
        }
    } else {
        None
    };
    for p in &policies {
        let pname = p.name_any();
        let Ok(s) = Settings::from_spec(&p.spec) else {
            continue;
        };
        let governed = nodes_governed_by(ctx, &policies, &pname);
        let selected = governed.len() as u32;
        let st = p.status.clone().unwrap_or_default();
        let devices = slices.as_ref().map_or(st.devices_selected, |sl| {
            dra::devices_on(sl, &governed.iter().cloned().collect())
        });
        let limits = Limits::of(&s, selected, devices);
        let u = budget::usage(&st.admitted);
        let queued = wedges
            .iter()
            .filter(|w| {
                phase_of(w) == Phase::Queued
                    && w.status.as_ref().and_then(|s| s.policy.as_deref()) == Some(pname.as_str())
            })
            .count();
        for (unit, used, allowed) in [
            ("node", u.nodes, limits.nodes),
            ("reboot", u.reboots, limits.reboots),
            ("device", u.devices, limits.devices),
            ("none", u.none, limits.none),
        ] {
            let l = metrics::PolicyUnit {
                policy: pname.clone(),
                unit: unit.into(),
            };
            ctx.metrics
                .budget_in_use
                .get_or_create(&l)
                .set(i64::from(used));
            ctx.metrics
                .budget_allowed
                .get_or_create(&l)
                .set(i64::from(allowed));
        }
        ctx.metrics
            .queue_length
            .get_or_create(&metrics::PolicyLabel {
                policy: pname.clone(),
            })
            .set(queued as i64);
        if !*ctx.leader.borrow() {
            continue;
        }
        let conflicts = policy_match::conflicts_of(&pname, &policies, &nodes);
        let summary = budget::summary(&st.admitted, &limits, queued);
        let now = Timestamp::now();
        let _: Result<_, std::convert::Infallible> =
            ledger::update(&ctx.policy_api(), &pname, |_, st| {
                let before = st.clone();
                st.nodes_selected = selected;
                st.devices_selected = devices;
                st.summary = Some(summary.clone());
                set_policy_condition(
                    st,
                    "DeviceQuarantine",
                    ctx.dra.on,
                    ctx.dra.reason,
                    &ctx.dra.message,
                    now,
                );
                if conflicts.is_empty() {
                    if st
                        .conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Conflict")
                    {
                        set_policy_condition(
                            st,
                            "Conflict",
                            false,
                            "NoConflict",
                            "no other policy selects the same nodes",
                            now,
                        );
                    }
                } else {
                    let msg: Vec<String> = conflicts
                        .iter()
                        .map(|(n, o)| format!("{n}: also selected by {}", o.join(", ")))
                        .collect();
                    set_policy_condition(
                        st,
                        "Conflict",
                        true,
                        "OverlappingSelectors",
                        &msg.join("; "),
                        now,
                    );
                }
                Ok(*st != before)
            })
            .await?;
    }
    Ok(())
}

/// A stream inspector that reports `what` on `tx` at each complete list (InitDone).
fn synced<K>(
    tx: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    what: &'static str,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
    let tx = tx.clone();
    move |ev| {
        if matches!(ev, Ok(watcher::Event::InitDone)) {
            let _ = tx.send(what);
        }
    }
}

/// Wires stores, triggers and the controller, and runs until `shutdown` turns true. `dra`:
/// whether DRA devices are quarantined instead of cordoning their node (docs/design.md §5), and why.
pub async fn run(
    client: Client,
    identity: String,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    dra: dra::Support,
) {
    // Readiness: each of the three reflectors reports its first complete list (InitDone) as it
    // passes through. Not `Store::wait_until_ready`: its DelayedInit keeps one waker only, and
    // the controller's runner waits on the wedge store's too, so a second waiter there could be
    // left asleep forever (which kept replicas at 503).
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let (wedge_store, wedge_writer) = reflector::store::<GpuWedge>();
    let wedge_stream = reflector::reflector(
        wedge_writer,
        watcher(
            Api::<GpuWedge>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .inspect(synced(&synced_tx, "wedges"))
    .applied_objects();
    // Unbounded here; the API work is bounded by `Ctx::permits` (RECONCILE_CONCURRENCY).
    let controller = Controller::for_stream(wedge_stream, wedge_store.clone());
    let by_node = {
        let s = wedge_store.clone();
        move |node: String| -> Vec<ObjectRef<GpuWedge>> {
            s.state()
                .iter()
                .filter(|w| w.spec.node_name == node && open(w))
                .map(|w| ObjectRef::from_obj(&**w))
                .collect()
        }
    };
    let by_node_p = by_node.clone();
    // Nodes and policies are reflected by their own tasks, so their stores sync (and readiness
    // follows) whatever the controller is doing; each change is handed to the controller as
    // reconcile requests for the wedges it concerns.
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded::<ObjectRef<GpuWedge>>();
    let (nodes_store, nodes_writer) = reflector::store::<Node>();
    let nodes_task = {
        let tx = trigger_tx.clone();
        let mut shapes: BTreeMap<String, wake::NodeShape> = BTreeMap::new();
        tokio::spawn(
            reflector::reflector(
                nodes_writer,
                watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                    .modify(crate::node_cache::trim),
            )
            .default_backoff()
            .inspect(synced(&synced_tx, "nodes"))
            .for_each(move |ev| {
                let changed = match ev {
                    Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                        let shape = wake::NodeShape::of(&n);
                        let name = n.name_any();
                        let holder = n.annotations().get(ANN_CORDONED_BY).cloned();
                        (shapes.insert(name.clone(), shape.clone()) != Some(shape))
                            .then_some((name, holder))
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        shapes.remove(&n.name_any());
                        Some((n.name_any(), None))
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "node watch failed; retrying");
                        None
                    }
                };
                if let Some((node, holder)) = changed {
                    for w in by_node(node) {
                        let _ = tx.unbounded_send(w);
                    }
                    // The wedge the cordon names, open or not: a wedge that finished just as
                    // the cordon was handed to it must lift (or hand on) the cordon now, not at
                    // its next timer (the node's open wedges alone would not wake it).
                    if let Some(h) = holder {
                        let _ = tx.unbounded_send(ObjectRef::new(&h));
                    }
                }
                std::future::ready(())
            }),
        )
    };
    let (policy_store, policy_writer) = reflector::store::<RecoveryPolicy>();
    let policies_task = {
        let wedges = wedge_store.clone();
        let mut seen: BTreeMap<String, wake::PolicySeen> = BTreeMap::new();
        tokio::spawn(
            reflector::reflector(
                policy_writer,
                watcher(
                    Api::<RecoveryPolicy>::all(client.clone()),
                    watcher::Config::default(),
                ),
            )
            .default_backoff()
            .inspect(synced(&synced_tx, "policies"))
            .for_each(move |ev| {
                let (name, now) = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        (p.name_any(), Some(wake::PolicySeen::of(&p)))
                    }
                    Ok(watcher::Event::Delete(p)) => (p.name_any(), None),
                    // A re-list may have missed deletions: look at everything again.
                    Ok(watcher::Event::InitDone) => (String::new(), None),
                    Ok(watcher::Event::Init) => return std::future::ready(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "RecoveryPolicy watch failed; retrying");
                        return std::future::ready(());
                    }
                };
                let before = match &now {
                    Some(n) => seen.insert(name.clone(), n.clone()),
                    None => seen.remove(&name),
                };
                let open: Vec<Arc<GpuWedge>> =
                    wedges.state().into_iter().filter(|w| open(w)).collect();
                let targets: Vec<ObjectRef<GpuWedge>> =
                    match wake::on_policy_change(&name, before.as_ref(), now.as_ref(), &open) {
                        wake::Wake::All => open.iter().map(|w| ObjectRef::from_obj(&**w)).collect(),
                        wake::Wake::Some(names) => {
                            names.iter().map(|n| ObjectRef::new(n)).collect()
                        }
                    };
                for w in targets {
                    let _ = trigger_tx.unbounded_send(w);
                }
                std::future::ready(())
            }),
        )
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "unwedge-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        wedges: wedge_store.clone(),
        nodes: nodes_store.clone(),
        policies: policy_store.clone(),
        recorder,
        identity,
        metrics: metrics.clone(),
        leader: leader.clone(),
        dra,
        permits: tokio::sync::Semaphore::new(RECONCILE_CONCURRENCY),
        admitted_permits: tokio::sync::Semaphore::new(RECONCILE_CONCURRENCY / 2),
    });
    // Re-examine every wedge (after repairing the ledgers) whenever we become leader.
    let became_leader = futures::stream::unfold(
        (leader.clone(), client.clone()),
        |(mut rx, client)| async move {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                if *rx.borrow_and_update() {
                    if let Err(e) = repair_ledgers(&client).await {
                        tracing::warn!(error = %e, "ledger repair failed; it runs again on the next leadership change");
                    }
                    return Some(((), (rx, client)));
                }
            }
        },
    );
    let refresher = {
        let ctx = ctx.clone();
        let mut sd = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = sd.changed() => return,
                }
                if let Err(e) = refresh(&ctx).await {
                    tracing::warn!(error = %e, "refresh of policy status and gauges failed");
                }
                if let Err(e) = repair_from_store(&ctx).await {
                    tracing::warn!(error = %e, "ledger repair failed; it runs again at the next refresh");
                }
                if let Err(e) = release_orphan_cordons(&ctx).await {
                    tracing::warn!(error = %e, "releasing cordons of wedges that are gone failed; it runs again at the next refresh");
                }
            }
        }
    };
    drop(synced_tx);
    let readiness = {
        let m = metrics.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            while let Some(what) = synced_rx.recv().await {
                seen.insert(what);
                if seen.len() == 3 {
                    tracing::info!("nodes, policies and wedges listed: ready");
                    m.set_ready();
                    return;
                }
            }
        }
    };
    tokio::spawn(readiness);
    tokio::spawn(refresher);
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    };
    drop(wedge_store);
    controller
        .reconcile_on(trigger_rx)
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |p: Pod| {
                p.spec
                    .and_then(|s| s.node_name)
                    .map(&by_node_p)
                    .unwrap_or_default()
            },
        )
        .reconcile_all_on(became_leader)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    nodes_task.abort();
    policies_task.abort();
}
