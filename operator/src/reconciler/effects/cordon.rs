//! The node's cordon: made for the wedge (`unwedge.io/cordoned-by` names it), and let go of —
//! lifted, or handed to another wedge of the node that holds a place (docs/design.md §4).

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use unwedge_crds::labels::ANN_CORDONED_BY;

use super::{Effect, soon};
use crate::decide;
use crate::dra;
use crate::reconciler::{Ctx, Error, finalize, open, open_on_node};

/// Cordons the node and names the wedge on it; says on the wedge when a DRA device could not
/// be quarantined instead.
pub(super) async fn cordon(e: &Effect<'_>, node: Option<&Node>) -> Result<Action, Error> {
    let (ctx, w, name, input) = (e.ctx, e.w, &e.name, e.input);
    ctx.ensure_leader()?;
    if !e.decided_on_current().await? {
        tracing::debug!("cordon decided on an older copy of the wedge: deciding again");
        return Err(Error::StatusConflict);
    }
    let body = json!({
        "metadata": {"annotations": {ANN_CORDONED_BY: name}},
        "spec": {"unschedulable": true}
    });
    ctx.node_writes.sending(&w.spec.node_name);
    let written = Api::<Node>::all(ctx.client.clone())
        .patch(
            &w.spec.node_name,
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await?;
    // A patch that changed nothing (the node was cordoned for this wedge already) answers with
    // the version the watch may have delivered already: not a write to prefer to the cache.
    if node.and_then(|n| n.resource_version()) != written.resource_version() {
        ctx.wrote_node(written);
    }
    if let Some(n) = node {
        ctx.event(
            &n.object_ref(&()),
            &decide::Note {
                warning: false,
                reason: "GpuWedgeCordon".into(),
                message: format!("cordoned by unwedge for {name}"),
            },
        );
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
        ctx.event(&w.object_ref(&()), &note);
    }
    if let Some(dev) = w.spec.device.dra.as_ref().filter(|_| !ctx.dra.on) {
        let message = dra::cordoned_instead(dev, &w.spec.node_name, &ctx.dra);
        let note = decide::Note {
            warning: true,
            reason: "QuarantineUnavailable".into(),
            message,
        };
        ctx.event(&w.object_ref(&()), &note);
    }
    Ok(soon())
}

/// Lets go of the node's cordon if it is (still) this wedge's: hands it over (`hand_over`) to
/// the heir read fresh, or lifts it. One JSON patch whose `test` of `unwedge.io/cordoned-by`
/// makes the API server refuse it when the cordon is not (or no longer) this wedge's: never
/// uncordons a cordon that is not ours, without a read of the node first.
pub(super) async fn let_go(e: &Effect<'_>, hand_over: bool) -> Result<Action, Error> {
    let (ctx, w, name) = (e.ctx, e.w, &e.name);
    ctx.ensure_leader()?;
    // The heir as read now: the cache that chose it may not show yet that it finished
    // (and let its finalizer go), and a cordon handed to it would outlive it.
    let heir = if hand_over {
        cordon_heir(ctx, &w.spec.node_name, name).await?
    } else {
        None
    };
    let ops: json_patch::Patch = serde_json::from_value(cordon_let_go_ops(name, heir.as_deref()))
        .expect("a well-formed JSON patch");
    ctx.node_writes.sending(&w.spec.node_name);
    let written = match Api::<Node>::all(ctx.client.clone())
        .patch(
            &w.spec.node_name,
            &PatchParams::default(),
            &Patch::Json::<()>(ops),
        )
        .await
    {
        // The test failed (422) or the node is gone: the cordon is not ours to let go of.
        Err(kube::Error::Api(s)) if s.code == 422 || s.is_not_found() => {
            tracing::debug!(code = s.code, "cordon not ours (any more): left as it is");
            return Ok(soon());
        }
        r => r?,
    };
    let node_ref = written.object_ref(&());
    ctx.wrote_node(written);
    let msg = match &heir {
        Some(to) => format!("cordon handed from {name} to {to}"),
        None => format!("uncordoned by unwedge: {name} recovered"),
    };
    ctx.event(
        &node_ref,
        &decide::Note {
            warning: false,
            reason: "GpuWedgeUncordon".into(),
            message: msg,
        },
    );
    Ok(soon())
}

/// The JSON patch with which wedge `name` lets go of its cordon: refused unless
/// `unwedge.io/cordoned-by` names `name`; hands the cordon to `to` (the node stays
/// unschedulable), or lifts it (annotation removed, node schedulable).
pub(in crate::reconciler) fn cordon_let_go_ops(name: &str, to: Option<&str>) -> serde_json::Value {
    let path = format!(
        "/metadata/annotations/{}",
        ANN_CORDONED_BY.replace('~', "~0").replace('/', "~1")
    );
    let test = json!({"op": "test", "path": path, "value": name});
    match to {
        Some(to) => json!([test, {"op": "replace", "path": path, "value": to}]),
        None => json!([
            test,
            {"op": "remove", "path": path},
            {"op": "add", "path": "/spec/unschedulable", "value": false}
        ]),
    }
}

/// The wedge of `node` (other than `except`) that takes unwedge's cordon over, chosen by
/// [`decide::cordon_heir`] from the open wedges the cache shows, each read fresh; `None`: lift it.
pub(in crate::reconciler) async fn cordon_heir(
    ctx: &Ctx,
    node: &str,
    except: &str,
) -> Result<Option<String>, Error> {
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
pub(in crate::reconciler) fn cordon_release_patch(
    resource_version: Option<String>,
    to: Option<&str>,
) -> serde_json::Value {
    match to {
        Some(to) => {
            json!({"metadata": {"resourceVersion": resource_version, "annotations": {ANN_CORDONED_BY: to}}})
        }
        None => {
            json!({"metadata": {"resourceVersion": resource_version, "annotations": {ANN_CORDONED_BY: null}}, "spec": {"unschedulable": false}})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(holder: Option<&str>) -> serde_json::Value {
        let annotations = match holder {
            Some(h) => json!({ANN_CORDONED_BY: h, "x": "y"}),
            None => json!({"x": "y"}),
        };
        json!({"metadata": {"name": "n", "annotations": annotations},
               "spec": {"unschedulable": true}})
    }

    fn apply(doc: &mut serde_json::Value, name: &str, to: Option<&str>) -> bool {
        let ops: json_patch::Patch = serde_json::from_value(cordon_let_go_ops(name, to)).unwrap();
        json_patch::patch(doc, &ops).is_ok()
    }

    #[test]
    fn a_cordon_is_let_go_of_only_by_the_wedge_it_names() {
        let mut ours = node(Some("w1"));
        assert!(apply(&mut ours, "w1", None));
        assert_eq!(
            ours,
            json!({"metadata": {"name": "n", "annotations": {"x": "y"}},
                   "spec": {"unschedulable": false}})
        );
        let mut handed = node(Some("w1"));
        assert!(apply(&mut handed, "w1", Some("w2")));
        assert_eq!(handed["metadata"]["annotations"][ANN_CORDONED_BY], "w2");
        assert_eq!(handed["spec"]["unschedulable"], true);
        for mut other in [node(Some("w2")), node(None)] {
            let before = other.clone();
            assert!(!apply(&mut other, "w1", None), "refused: not w1's cordon");
            assert_eq!(other, before);
        }
    }
}
