//! The controller: loads a GpuWedge's surroundings, calls `decide`, persists the status, then
//! performs the one effect, and requeues.
//!
//! Nodes and RecoveryPolicies are watched into stores (and trigger the wedges they concern);
//! pods trigger the wedges of their node and are listed fresh by the reconciles whose decision
//! reads them (`decide::reads_pods`). Only the leader acts: every API write first checks that
//! leadership still holds.
//!
//! This file is the reconcile of one wedge; `inputs` loads what `decide` reads, `persist`
//! writes the status (and the node's condition), `effects` performs the step (one function per
//! effect: admit, cordon, evict, release…), `finalize` is the operator's finalizer,
//! `policy_status` the circuit breaker and the policy's conditions, `refresh` the periodic
//! gauges, policy summaries and repairs, `admission` the pass that admits waiting wedges first
//! come first outside the controller's queue, and `run` wires the stores, triggers and
//! controller.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use unwedge_crds::{GpuWedge, Phase, RecoveryPolicy};

use crate::decide::{self, Input, Step};
use crate::dra;
use crate::ledger;
use crate::metrics::Metrics;
use crate::quarantine;
use crate::turns::Turns;
use crate::writes::Writes;

pub mod admission;
mod effects;
mod finalize;
mod inputs;
mod persist;
mod policy_status;
mod refresh;
mod run;

pub use refresh::{
    refresh, release_orphan_cordons, repair_from_store, repair_ledgers, repair_unlisted,
};
pub use run::run;

use effects::Outcome;
use inputs::Loaded;

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
    /// Nodes as we last wrote them, until the node watch shows it.
    pub node_writes: Arc<Writes<Node>>,
    /// GpuWedges as we last wrote them, until the wedge watch shows it.
    pub wedge_writes: Arc<Writes<GpuWedge>>,
    /// Events being sent ([`EVENTS_IN_FLIGHT`]).
    pub events: Arc<tokio::sync::Semaphore>,
    /// Wakes the admission pass ([`admission`]): a waiting wedge or a policy changed.
    pub admission: Arc<tokio::sync::Notify>,
    /// Which wedges are being decided on now, by a reconcile or the admission pass.
    pub turns: Turns,
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
    /// The newest copy of `node` we know: our last write of it, or the cache.
    fn node(&self, node: &str) -> Option<Arc<Node>> {
        self.node_writes
            .newest(node, self.nodes.get(&ObjectRef::new(node)))
    }

    /// Records our write of a node (trimmed like the cache).
    fn wrote_node(&self, mut n: Node) {
        crate::node_cache::trim(&mut n);
        self.node_writes.wrote(n);
    }

    /// The newest copy of `w` we know (our last write of it, or the cache), `w` itself when
    /// neither is of the same object (uid).
    fn newest_wedge(&self, w: Arc<GpuWedge>) -> Arc<GpuWedge> {
        let cached = self.wedges.get(&ObjectRef::from_obj(&*w));
        match self.wedge_writes.newest(&w.name_any(), cached) {
            Some(n) if n.uid() == w.uid() => n,
            _ => w,
        }
    }

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

    /// Publishes `note` about `obj` without waiting for it: an Event gates nothing, so the
    /// reconcile goes on (and gives its permit back) while at most [`EVENTS_IN_FLIGHT`] are
    /// being sent.
    fn event(&self, obj: &k8s_openapi::api::core::v1::ObjectReference, note: &decide::Note) {
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
        let (recorder, obj, slots) = (self.recorder.clone(), obj.clone(), self.events.clone());
        tokio::spawn(async move {
            let _slot = slots.acquire().await;
            if let Err(e) = recorder.publish(&ev, &obj).await {
                tracing::warn!(error = %e, "could not publish an event");
            }
        });
    }
}

/// Events being sent at once ([`Ctx::event`]).
pub const EVENTS_IN_FLIGHT: usize = 4;

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

/// The wedge's phase (Detected before the operator wrote one).
fn phase_of(w: &GpuWedge) -> Phase {
    w.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// Reconciles one GpuWedge, in a span naming the wedge, its node and the phase it starts from
/// (every log line of the reconcile carries them).
#[tracing::instrument(name = "reconcile", skip_all, fields(wedge = %w.name_any(), node = %w.spec.node_name, phase = ?phase_of(&w)))]
pub async fn reconcile(w: Arc<GpuWedge>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    if let Some(left) = decide::awaits_report(&ctx.newest_wedge(w.clone()), jiff::Timestamp::now())
    {
        // The agent's report is on its way and its write wakes the wedge (the timer is the
        // safety net): a decision now would only lose to it. No permit taken.
        tracing::debug!(
            left_ms = left.as_millis() as u64,
            "waiting for the agent's first report"
        );
        return Ok(Action::requeue(left));
    }
    let lane = if holds_budget(&ctx, &w) {
        &ctx.admitted_permits
    } else {
        &ctx.permits
    };
    let name = w.name_any();
    let asked = std::time::Instant::now();
    // A permit, then the wedge's turn: while the admission pass acts for the wedge, the permit
    // goes back and the reconcile waits for the pass to finish (and decides on what it wrote).
    let (_permit, _turn) = loop {
        let permit = lane
            .acquire()
            .await
            .expect("the reconcile semaphores are never closed");
        if let Some(turn) = ctx.turns.try_take(&name) {
            break (permit, turn);
        }
        drop(permit);
        ctx.turns.free(&name).await;
    };
    let waited_ms = asked.elapsed().as_millis() as u64;
    decide_and_act(&ctx, w, waited_ms).await
}

/// Decides and acts on the newest copy of `w` we know, deciding again on a fresh read when the
/// status write loses to a concurrent change. The caller holds the wedge's turn, for which it
/// waited `waited_ms` (logged).
async fn decide_and_act(ctx: &Arc<Ctx>, w: Arc<GpuWedge>, waited_ms: u64) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let name = w.name_any();
    // The wait for a permit can be long in a storm: decide on the newest copy the cache holds
    // (typically with the agent's first report, written right after the create), or our own
    // last write when the watch has not shown it yet.
    let mut w = ctx.newest_wedge(w);
    for _ in 0..STATUS_CONFLICT_RETRIES {
        let Some((action, step)) = reconcile_once(w, ctx).await? else {
            // The wedge changed since the cache showed it (typically the agent's own status
            // write right after the create): decide again on a fresh read while this reconcile
            // holds its permit, instead of queueing behind every other wedge.
            tracing::debug!("status write lost to a concurrent change: deciding again");
            ctx.ensure_leader()?;
            match ctx.wedge_api().get_opt(&name).await? {
                Some(fresh) => {
                    ctx.wedge_writes.forget(Some(&name));
                    w = Arc::new(fresh);
                }
                None => return Ok(Action::await_change()),
            }
            continue;
        };
        tracing::debug!(
            step,
            permit_wait_ms = waited_ms,
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
    let loaded = Loaded::load(ctx, &w).await?;
    let input = loaded.input(&w, &ctx.identity);
    let done = match act(ctx, &w, &input, loaded.node.as_deref()).await {
        Err(Error::StatusConflict) => return Ok(None),
        r => r?,
    };
    persist::update_node_condition(ctx, &w.spec.node_name, &name).await?;
    Ok(Some(done))
}

/// Decides on `input`, persists and performs. An admission goes on at once with what the place
/// allows (the cordon, or the device's quarantine): a second decision on the wedge as written
/// and the ledger with its place, which the next reconcile would otherwise make from the same
/// inputs once the cache shows the ledger, one round of reads later.
async fn act(
    ctx: &Ctx,
    w: &GpuWedge,
    input: &Input<'_>,
    node: Option<&Node>,
) -> Result<(Action, &'static str), Error> {
    let decision = decide::decide(input);
    let step = step_name(&decision.step);
    let action = match effects::perform(ctx, w, input, decision, node).await? {
        Outcome::Requeue(action) => action,
        Outcome::Admitted(admitted) => {
            let next = admitted.input(input);
            let d = decide::decide(&next);
            if matches!(d.step, Step::Admit { .. }) {
                effects::soon()
            } else {
                effects::perform(ctx, admitted.wedge(), &next, d, node)
                    .await?
                    .action()
            }
        }
    };
    Ok((action, step))
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
