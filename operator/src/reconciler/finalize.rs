//! The operator's finalizer on a GpuWedge, and what deleting a wedge releases.
//!
//! The finalizer (`unwedge.io/release`) is put on a wedge before its first admission, so a
//! wedge that holds a ledger place (and with it a reboot slot), a cordon or a DeviceTaintRule
//! can never disappear without the operator seeing it. It is taken off when the incident ends
//! with nothing left to release, or when a deleted wedge's places are released:
//!
//! - every ledger place of the wedge, in whichever policy holds it;
//! - its DeviceTaintRule, if it has one;
//! - the node's cordon, if unwedge made it for this wedge: handed to another open wedge of the
//!   node that still needs it, otherwise lifted (never a cordon someone else made).
//!
//! An Event on the node says what was released. Each release is idempotent, so a reconcile
//! cut short runs them all again.

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use unwedge_crds::GpuWedge;
use unwedge_crds::labels::{ANN_CORDONED_BY, FINALIZER};

use super::{Ctx, Error};
use crate::decide;
use crate::ledger;
use crate::quarantine;

/// Whether the wedge carries the operator's finalizer.
pub(super) fn held(w: &GpuWedge) -> bool {
    w.finalizers().iter().any(|f| f == FINALIZER)
}

/// JSON patch that adds our finalizer, guarded by the list it was computed from.
fn add_patch(w: &GpuWedge) -> json_patch::Patch {
    let ops = match &w.metadata.finalizers {
        None => json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
        Some(list) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
        ]),
    };
    serde_json::from_value(ops).expect("a well-formed JSON patch")
}

/// JSON patch that removes our finalizer, guarded by the list it was computed from.
fn remove_patch(w: &GpuWedge) -> Option<json_patch::Patch> {
    let list = w.metadata.finalizers.as_ref()?;
    let at = list.iter().position(|f| f == FINALIZER)?;
    let ops = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": list},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")}
    ]);
    Some(serde_json::from_value(ops).expect("a well-formed JSON patch"))
}

/// Puts the finalizer on `w`; returns the wedge as stored after the patch (`None` when the
/// finalizer was there already), so later writes guarded by its resourceVersion do not conflict.
pub(super) async fn ensure(ctx: &Ctx, w: &GpuWedge) -> Result<Option<GpuWedge>, Error> {
    if held(w) {
        return Ok(None);
    }
    ctx.ensure_leader()?;
    let p: Patch<()> = Patch::Json(add_patch(w));
    ctx.wedge_writes.sending(&w.name_any());
    match ctx
        .wedge_api()
        .patch(&w.name_any(), &PatchParams::default(), &p)
        .await
    {
        Ok(patched) => {
            ctx.wedge_writes.wrote(patched.clone());
            Ok(Some(patched))
        }
        // The list changed under us (422 from the failed test): decide again on a fresh read.
        Err(kube::Error::Api(s)) if s.code == 422 || s.is_conflict() => Err(Error::StatusConflict),
        Err(e) => Err(e.into()),
    }
}

/// Takes the finalizer off `w` (a no-op when it is not there or the wedge is gone).
pub(super) async fn forget(ctx: &Ctx, w: &GpuWedge) -> Result<(), Error> {
    let Some(patch) = remove_patch(w) else {
        return Ok(());
    };
    ctx.ensure_leader()?;
    let p: Patch<()> = Patch::Json(patch);
    ctx.wedge_writes.sending(&w.name_any());
    match ctx
        .wedge_api()
        .patch(&w.name_any(), &PatchParams::default(), &p)
        .await
    {
        Ok(patched) => {
            ctx.wedge_writes.wrote(patched);
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 422 || s.is_conflict() => Err(Error::StatusConflict),
        Err(e) => Err(e.into()),
    }
}

/// Releases everything the operator holds for the deleted wedge `w`, then lets it go.
pub(super) async fn release_deleted(ctx: &Ctx, w: &GpuWedge) -> Result<(), Error> {
    if !held(w) {
        return Ok(());
    }
    let name = w.name_any();
    // The node and the device first, the budget place last: a place given back while the node
    // is still cordoned lets the ledger admit another node meanwhile, one node over the budget
    // for that moment (seen by the `queue` scenario's recorder). A crash in between leaves the
    // place held, which the retried finalizer releases.
    let mut released = Vec::new();
    let had_rule = w
        .status
        .as_ref()
        .is_some_and(|s| s.quarantine_rule.is_some());
    if had_rule || ctx.dra.on {
        ctx.ensure_leader()?;
        if quarantine::remove(&ctx.client, &name).await? {
            released.push("its DeviceTaintRule".into());
        }
    }
    if let Some(cordon) = release_cordon(ctx, w).await? {
        released.push(cordon);
    }
    let holding = holding_policies(ctx, w);
    for policy in &holding {
        ctx.ensure_leader()?;
        if release_place(ctx, policy, &name).await? {
            released.push(format!("its place in RecoveryPolicy {policy}"));
        }
    }
    // A first admission writes the wedge's status after its place (`effects::admit`): a wedge
    // deleted in between names no policy, and the cache may not show the ledger that holds it
    // yet. The policy that governs its node admitted it (a no-op release if it did not).
    if w.status.as_ref().and_then(|s| s.policy.as_ref()).is_none()
        && let Some(policy) = governing(ctx, w).filter(|p| !holding.contains(p))
    {
        ctx.ensure_leader()?;
        release_place(ctx, &policy, &name).await?;
    }
    forget(ctx, w).await?;
    let message = if released.is_empty() {
        format!("GpuWedge {name} deleted; it held nothing")
    } else {
        format!("GpuWedge {name} deleted: released {}", released.join(", "))
    };
    tracing::info!(%message, "deleted wedge released");
    let note = decide::Note {
        warning: true,
        reason: "GpuWedgeDeleted".into(),
        message,
    };
    let node_ref = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(w.spec.node_name.clone()),
        ..Default::default()
    };
    ctx.event(&node_ref, &note);
    ctx.metrics.deleted_released.inc();
    super::persist::update_node_condition(ctx, &w.spec.node_name, &name).await
}

/// Gives back `wedge`'s place in `policy`'s ledger (a no-op when it holds none); false when
/// the policy is gone.
pub(super) async fn release_place(ctx: &Ctx, policy: &str, wedge: &str) -> Result<bool, Error> {
    match ledger::release(&ctx.policy_api(), policy, wedge).await {
        Ok(()) => Ok(true),
        Err(ledger::LedgerError::NoPolicy(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The policy that governs `w`'s node now, by its labels (`None`: none, a conflict, or the node
/// is not known).
fn governing(ctx: &Ctx, w: &GpuWedge) -> Option<String> {
    let node = ctx.node(&w.spec.node_name)?;
    let policies: Vec<unwedge_crds::RecoveryPolicy> =
        ctx.policies.state().iter().map(|p| (**p).clone()).collect();
    match crate::policy_match::for_wedge(&policies, node.labels(), &w.name_any()) {
        crate::policy_match::Governing::Policy(p) => Some(p),
        _ => None,
    }
}

/// The policies whose ledger (as cached) holds `w`, plus the one its status names (see
/// [`decide::places_to_release`]): a release that finds nothing is a no-op.
pub(super) fn holding_policies(ctx: &Ctx, w: &GpuWedge) -> Vec<String> {
    let ledgers: Vec<(String, Vec<unwedge_crds::Admission>)> = ctx
        .policies
        .state()
        .iter()
        .map(|p| {
            (
                p.name_any(),
                p.status
                    .as_ref()
                    .map(|s| s.admitted.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let status_policy = w.status.as_ref().and_then(|s| s.policy.as_deref());
    decide::places_to_release(&w.name_any(), status_policy, &ledgers)
}

/// Lifts (or hands over) the node's cordon if unwedge made it for `w`; says what it did.
async fn release_cordon(ctx: &Ctx, w: &GpuWedge) -> Result<Option<String>, Error> {
    let name = w.name_any();
    let api = Api::<k8s_openapi::api::core::v1::Node>::all(ctx.client.clone());
    let Some(node) = api.get_opt(&w.spec.node_name).await? else {
        return Ok(None);
    };
    if node.annotations().get(ANN_CORDONED_BY) != Some(&name) {
        return Ok(None);
    }
    let heir = super::effects::cordon_heir(ctx, &w.spec.node_name, &name).await?;
    let rv = node.resource_version();
    let next = heir.as_deref();
    let body = super::effects::cordon_release_patch(rv, next);
    let said = match next {
        Some(next) => format!("the cordon (handed to {next}, which still needs it)"),
        None => "the cordon (node uncordoned)".to_string(),
    };
    ctx.ensure_leader()?;
    match api
        .patch(
            &w.spec.node_name,
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
    {
        Ok(_) => Ok(Some(said)),
        // The node changed since it was read: the reconcile fails and runs again.
        Err(kube::Error::Api(s)) if s.is_conflict() => Err(Error::StatusConflict),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The wedge whose cordon is on `w`'s node, read fresh, when releasing `w`'s place now would
/// leave the node cordoned by unwedge with no ledger place behind it: the cordon names `w`
/// itself (decided from a cache that had not seen a hand-over yet), or another wedge of the
/// node that is Recovered or being deleted — it lifts or hands over the cordon next, and `w`
/// keeps the node counted until then. A holder that is gone or Abandoned (which leaves the
/// node as it is) does not hold `w` back: nothing would ever move that cordon.
pub(super) async fn cordon_without_place(ctx: &Ctx, w: &GpuWedge) -> Result<Option<String>, Error> {
    let name = w.name_any();
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(ctx.client.clone());
    let Some(node) = nodes.get_opt(&w.spec.node_name).await? else {
        return Ok(None);
    };
    let Some(holder) = node.annotations().get(ANN_CORDONED_BY).cloned() else {
        return Ok(None);
    };
    if holder == name {
        return Ok(Some(holder));
    }
    let moves_soon = ctx.wedge_api().get_opt(&holder).await?.is_some_and(|h| {
        h.spec.node_name == w.spec.node_name
            && (h.metadata.deletion_timestamp.is_some()
                || h.status.as_ref().and_then(|s| s.phase) == Some(unwedge_crds::Phase::Recovered))
    });
    Ok(moves_soon.then_some(holder))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wedge(finalizers: Option<Vec<&str>>) -> GpuWedge {
        let spec = serde_json::from_value(serde_json::json!({
            "nodeName": "n", "device": {"pciAddress": "0000:03:00.0"}, "methods": ["rebind"],
            "detectedAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let mut w = GpuWedge::new("w", spec);
        w.metadata.finalizers = finalizers.map(|l| l.into_iter().map(String::from).collect());
        w
    }

    fn apply(w: &GpuWedge, p: json_patch::Patch) -> Vec<String> {
        let mut v = serde_json::to_value(w).unwrap();
        json_patch::patch(&mut v, &p).unwrap();
        serde_json::from_value::<GpuWedge>(v)
            .unwrap()
            .metadata
            .finalizers
            .unwrap_or_default()
    }

    #[test]
    fn the_finalizer_is_added_to_no_list_and_to_someone_elses() {
        assert_eq!(
            apply(&wedge(None), add_patch(&wedge(None))),
            vec![FINALIZER]
        );
        let other = wedge(Some(vec!["example.com/keep"]));
        assert_eq!(
            apply(&other, add_patch(&other)),
            vec!["example.com/keep", FINALIZER]
        );
    }

    #[test]
    fn only_our_finalizer_is_removed() {
        let w = wedge(Some(vec!["example.com/keep", FINALIZER]));
        assert!(held(&w));
        assert_eq!(
            apply(&w, remove_patch(&w).unwrap()),
            vec!["example.com/keep"]
        );
        assert!(remove_patch(&wedge(Some(vec!["example.com/keep"]))).is_none());
        assert!(remove_patch(&wedge(None)).is_none());
    }

    #[test]
    fn a_patch_computed_from_a_stale_list_fails_its_test() {
        let seen = wedge(Some(vec![FINALIZER]));
        let now = wedge(Some(vec!["example.com/new", FINALIZER]));
        let mut v = serde_json::to_value(&now).unwrap();
        assert!(json_patch::patch(&mut v, &remove_patch(&seen).unwrap()).is_err());
    }
}
