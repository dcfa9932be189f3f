//! The Admit effect: the wedge's place in its policy's ledger, by compare-and-swap
//! (docs/design.md §4), with the finalizer put on first; queued when the ledger is full.

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use unwedge_crds::{Admission, GpuWedge, Phase};

use super::{Effect, Outcome, soon};
use crate::budget::{self, Candidate};
use crate::decide::{self, Governance, Input, PolicyView};
use crate::ledger;
use crate::policy_match;
use crate::reconciler::{Error, finalize, persist};
use crate::status::OperatorStatus;

/// A wedge just admitted: the wedge as written, and its policy's ledger with its place.
pub(in crate::reconciler) struct Admitted {
    wedge: GpuWedge,
    ledger: Vec<Admission>,
}

impl Admitted {
    /// The wedge as written.
    pub(in crate::reconciler) fn wedge(&self) -> &GpuWedge {
        &self.wedge
    }

    /// The inputs of the first decision with the wedge as written, the ledger holding its
    /// place, and the clock now: what the next reconcile would decide on once the cache shows
    /// the ledger.
    pub(in crate::reconciler) fn input<'a>(&'a self, first: &Input<'a>) -> Input<'a> {
        let policy = match &first.policy {
            Governance::Policy(p) => Governance::Policy(PolicyView {
                ledger: &self.ledger,
                ..p.clone()
            }),
            other => other.clone(),
        };
        Input {
            wedge: &self.wedge,
            policy,
            now: Timestamp::now(),
            ..first.clone()
        }
    }
}

/// Adds (or upgrades, or with `reclaim` takes back) the wedge's place; `current` is the status
/// stored before this reconcile's write. `unwritten`: the decision's status was not written
/// (a first admission): the queue's status is written in its place when the ledger is full, and
/// the decision after the admission writes it otherwise.
pub(super) async fn admit(
    mut e: Effect<'_>,
    current: &OperatorStatus,
    candidate: Candidate,
    reclaim: bool,
    unwritten: bool,
) -> Result<Outcome, Error> {
    let (ctx, w, policy) = (e.ctx, e.w, e.policy());
    let name = e.name.clone();
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
            tracing::info!(policy = %policy,
                "not admitted: the wedge has finished or is being deleted (the cache lagged)");
            return Ok(Outcome::Requeue(soon()));
        }
    }
    // The finalizer first: a place is never held by a wedge that can vanish unnoticed.
    if let Some(patched) = finalize::ensure(ctx, e.latest()).await? {
        e.written = Some(patched);
    }
    let Governance::Policy(p) = &e.input.policy else {
        return Ok(Outcome::Requeue(soon()));
    };
    // A place taken back without the budget's check (reclaim), or by a wedge admitted
    // before under another policy (a relabelled node): never in a second ledger. The
    // policy was chosen from the cache, which can lag behind the ledger that holds the
    // wedge; a fresh list decides, and the wedge waits for the cache to catch up.
    let admitted_by = w.status.as_ref().and_then(|s| s.policy.as_deref());
    if reclaim || admitted_by.is_some_and(|a| !a.is_empty() && a != policy) {
        let fresh = ctx.policy_api().list(&Default::default()).await?;
        if let Some(holder) = policy_match::held_elsewhere(&fresh.items, &name, &policy) {
            tracing::info!(policy = %policy, %holder,
                "not admitted: the ledger of another policy holds this wedge");
            return Ok(Outcome::Requeue(soon()));
        }
    }
    match ledger::admit(
        &ctx.policy_api(),
        &policy,
        &candidate,
        &p.limits,
        &p.waiting_ahead,
        reclaim,
    )
    .await?
    {
        Ok(()) => {
            tracing::info!(policy = %policy, reboot = candidate.reboot, "admitted");
            let mut ledger = budget::release(p.ledger, &candidate.wedge);
            ledger.push(candidate.admission());
            Ok(Outcome::Admitted(Box::new(Admitted {
                wedge: e.written.unwrap_or_else(|| w.clone()),
                ledger,
            })))
        }
        Err(reason) => {
            let q = decide::queued_status(e.status, &reason, Timestamp::now());
            if unwritten {
                // The one write of this reconcile: a compare-and-swap of the operator's part
                // against the copy decided on, counted and announced like any other.
                let queued = decide::Decision {
                    status: q,
                    step: decide::Step::Nothing,
                    note: None,
                };
                persist::status(ctx, e.latest(), &queued, current).await?;
            } else if q != *current {
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
            Ok(Outcome::Requeue(Action::requeue(decide::queue_recheck(
                p.waiting_ahead.len(),
            ))))
        }
    }
}
