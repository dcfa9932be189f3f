//! Letting go at the end: the ledger places of a finished wedge (in every policy that names
//! it), the operator's finalizer, and the device's older finished GpuWedges beyond the
//! policy's history limit.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use unwedge_crds::labels::ANN_CORDONED_BY;
use unwedge_crds::{GpuWedge, Phase};

use super::{Effect, soon};
use crate::decide;
use crate::reconciler::{Ctx, Error, finalize, open};

/// Nothing to do; a finished wedge with nothing left to release in its policy (decide would
/// have said so) gives back a place left in another policy's ledger (a relabel), then its
/// finalizer. Requeues soon when the status `changed`.
pub(super) async fn finished(e: &Effect<'_>, changed: bool) -> Result<Action, Error> {
    let (ctx, w, name) = (e.ctx, e.w, &e.name);
    if e.status.phase.is_some_and(Phase::is_terminal) && finalize::held(w) {
        for p in finalize::holding_policies(ctx, w) {
            ctx.ensure_leader()?;
            finalize::release_place(ctx, &p, name).await?;
        }
        finalize::forget(ctx, e.latest()).await?;
    }
    Ok(if changed {
        soon()
    } else {
        Action::requeue(Duration::from_secs(60))
    })
}

/// Gives back the wedge's places — once the node's cordon no longer needs one to count it —
/// then its finalizer when nothing else is held, and cleans up the device's history.
pub(super) async fn release(e: &Effect<'_>, node: Option<&Node>) -> Result<Action, Error> {
    let (ctx, w, name) = (e.ctx, e.w, &e.name);
    ctx.ensure_leader()?;
    if let Some(holder) = finalize::cordon_without_place(ctx, w).await? {
        // Releasing now would leave the node cordoned with no place counting it (two
        // wedges of one node finishing together): wait until its holder lets go.
        tracing::debug!(%holder, "release waits: the node's cordon is held by a finished wedge");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    // Every ledger that names it, not only its policy's now: a node relabelled
    // mid-recovery may have given it a place in the policy it moved away from.
    let mut places = finalize::holding_policies(ctx, w);
    places.push(e.policy());
    places.sort();
    places.dedup();
    for p in places.iter().filter(|p| !p.is_empty()) {
        finalize::release_place(ctx, p, name).await?;
    }
    let ours = node.is_some_and(|n| n.annotations().get(ANN_CORDONED_BY) == Some(name));
    if e.status.phase.is_some_and(Phase::is_terminal) && !ours && !e.input.quarantine_rule {
        finalize::forget(ctx, e.latest()).await?;
    }
    cleanup_history(ctx, w, e.settings().map_or(5, |s| s.history_limit)).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
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
