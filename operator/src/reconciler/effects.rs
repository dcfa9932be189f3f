//! Performing a decision: its status is persisted first (`persist`), then its one step is
//! carried out, one function per effect — `admit`, `cordon` (and letting go of it), `evict`,
//! `release`, and the small ones below. `perform` is the dispatch.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use unwedge_crds::{GpuWedge, Phase};

use super::{Ctx, Error, finalize, persist};
use crate::decide::{Decision, Governance, Input, Step};
use crate::dra;
use crate::quarantine;
use crate::settings::Settings;
use crate::status::OperatorStatus;

mod admit;
mod cordon;
mod evict;
mod release;

pub(super) use admit::Admitted;
pub(super) use cordon::{cordon_heir, cordon_release_patch};

/// What a performed decision leaves the reconcile with.
pub(super) enum Outcome {
    /// Requeue with this action.
    Requeue(Action),
    /// The wedge was admitted: decide again at once with its place ([`Admitted::input`]).
    Admitted(Box<Admitted>),
}

impl Outcome {
    /// The requeue; after an admission, soon (the next decision goes on from the place).
    pub(super) fn action(self) -> Action {
        match self {
            Outcome::Requeue(action) => action,
            Outcome::Admitted(_) => soon(),
        }
    }
}

/// Requeue soon: the next step follows from what was just written.
pub(super) fn soon() -> Action {
    Action::requeue(Duration::from_millis(500))
}

/// A decision being carried out: what its effect reads.
struct Effect<'a> {
    ctx: &'a Ctx,
    /// The wedge as decided on (the cache's copy, or a fresh read).
    w: &'a GpuWedge,
    /// Its name.
    name: String,
    /// The inputs it was decided on.
    input: &'a Input<'a>,
    /// The status the decision persisted.
    status: &'a OperatorStatus,
    /// The wedge as the status write stored it (`None`: nothing was written).
    written: Option<GpuWedge>,
}

impl Effect<'_> {
    /// The newest copy of the wedge: as written, else as decided on.
    fn latest(&self) -> &GpuWedge {
        self.written.as_ref().unwrap_or(self.w)
    }

    /// The governing policy's name (empty when none governs).
    fn policy(&self) -> String {
        self.status.policy.clone().unwrap_or_default()
    }

    /// Whether the copy decided on is the wedge as stored now. A status write is a
    /// compare-and-swap against that copy and proves it; a decision that wrote nothing (a
    /// cordon made again, a DeviceTaintRule created again) reads the wedge fresh. The copy may
    /// be the cache's, lagging behind our own writes once they are no longer preferred to it
    /// ([`crate::writes::TTL`]): a wedge seen still Recovering after it was verified and its
    /// node uncordoned would cordon the node again, past the budget, while its place is being
    /// given back.
    async fn decided_on_current(&self) -> Result<bool, Error> {
        if self.written.is_some() {
            return Ok(true);
        }
        let fresh = self.ctx.wedge_api().get_opt(&self.name).await?;
        Ok(fresh.is_some_and(|f| f.resource_version() == self.w.resource_version()))
    }

    /// The governing policy's settings.
    fn settings(&self) -> Option<&Settings> {
        match &self.input.policy {
            Governance::Policy(p) => Some(p.settings),
            _ => None,
        }
    }
}

/// Persists `d`'s status, then performs its step on `w` (decided on `input`; `node` from the
/// cache).
pub(super) async fn perform(
    ctx: &Ctx,
    w: &GpuWedge,
    input: &Input<'_>,
    d: Decision,
    node: Option<&Node>,
) -> Result<Outcome, Error> {
    let current = w
        .status
        .as_ref()
        .map(OperatorStatus::of)
        .unwrap_or_default();
    let changed = d.status != current;
    // A first admission writes no status before its place: the decision after it (the cordon,
    // or the queue when the ledger is full) writes the status once (`admit`). Only once the
    // agent has reported (the first report carries `agentDryRun`, which the cordon's write is
    // guarded by), and only without an Event to publish with the write.
    let first_admission = matches!(d.step, Step::Admit { reclaim: false, .. })
        && w.status.is_some()
        && d.note.is_none()
        && matches!(
            current.phase.unwrap_or_default(),
            Phase::Detected | Phase::Queued
        );
    let written = if first_admission {
        None
    } else {
        persist::status(ctx, w, &d, &current).await?
    };
    // A decision's Event goes out with its status write (`persist`); a cordon or a
    // DeviceTaintRule made again changes no status, so its warning is published once made.
    let unwritten_note = if changed { None } else { d.note.clone() };
    let announce = |n: &Option<crate::decide::Note>| {
        if let Some(n) = n {
            ctx.event(&w.object_ref(&()), n);
        }
    };
    let e = Effect {
        ctx,
        w,
        name: w.name_any(),
        input,
        status: &d.status,
        written,
    };
    let action = match d.step {
        Step::Nothing => release::finished(&e, changed).await?,
        Step::Wait { requeue_after, why } => {
            tracing::debug!(%why, "waiting");
            Action::requeue(requeue_after)
        }
        Step::Admit { candidate, reclaim } => {
            return admit::admit(e, &current, candidate, reclaim, first_admission).await;
        }
        Step::Release => release::release(&e, node).await?,
        Step::Cordon => {
            let action = cordon::cordon(&e, node).await?;
            announce(&unwritten_note);
            action
        }
        Step::Uncordon => cordon::let_go(&e, false).await?,
        Step::HandOverCordon { .. } => cordon::let_go(&e, true).await?,
        Step::Evict { pods } => evict::evict(&e, &pods, false).await?,
        Step::ForceDelete { pods } => evict::evict(&e, &pods, true).await?,
        Step::ClearVerbs { keys } => clear_verbs(&e, keys).await?,
        Step::Quarantine => {
            let action = quarantine_device(&e).await?;
            announce(&unwritten_note);
            action
        }
        Step::Finalize => put_finalizer(&e).await?,
        Step::Unquarantine => lift_quarantine(&e).await?,
    };
    Ok(Outcome::Requeue(action))
}

/// Removes the honoured human-verb annotations `keys`.
async fn clear_verbs(e: &Effect<'_>, keys: Vec<String>) -> Result<Action, Error> {
    e.ctx.ensure_leader()?;
    let ann: serde_json::Map<String, serde_json::Value> = keys
        .into_iter()
        .map(|k| (k, serde_json::Value::Null))
        .collect();
    let body = json!({"metadata": {"annotations": ann}});
    e.ctx
        .wedge_api()
        .patch(&e.name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(soon())
}

/// Creates the wedge's DeviceTaintRule (docs/design.md §5).
async fn quarantine_device(e: &Effect<'_>) -> Result<Action, Error> {
    let (ctx, w, name) = (e.ctx, e.w, &e.name);
    ctx.ensure_leader()?;
    if !e.decided_on_current().await? {
        tracing::debug!("quarantine decided on an older copy of the wedge: deciding again");
        return Err(Error::StatusConflict);
    }
    let dev = w.spec.device.dra.clone().unwrap_or_default();
    match quarantine::ensure(&ctx.client, name, w.uid().as_deref(), &dev).await? {
        quarantine::Ensured::Created => {
            tracing::info!(rule = %dra::rule_name(name), device = %dev.device, "device quarantined")
        }
        quarantine::Ensured::Existing => {
            tracing::debug!("DeviceTaintRule already there")
        }
    }
    Ok(soon())
}

/// Deletes the wedge's DeviceTaintRule (it is Recovered, or its node is gone).
async fn lift_quarantine(e: &Effect<'_>) -> Result<Action, Error> {
    e.ctx.ensure_leader()?;
    if quarantine::remove(&e.ctx.client, &e.name).await? {
        tracing::info!(rule = %dra::rule_name(&e.name), "quarantine lifted: DeviceTaintRule deleted");
    }
    Ok(soon())
}

/// Puts the finalizer on a wedge that holds a place or the node's cordon without it.
async fn put_finalizer(e: &Effect<'_>) -> Result<Action, Error> {
    e.ctx.ensure_leader()?;
    finalize::ensure(e.ctx, e.latest()).await?;
    tracing::info!("finalizer put on a wedge that held a place or the node's cordon without it");
    // Decide again at once on a fresh read: the copy decided from may be a cache that
    // lags (a cut watch), which would ask for the finalizer again every requeue.
    Err(Error::StatusConflict)
}
