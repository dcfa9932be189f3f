//! What a reconcile writes besides its effect: the operator's part of the wedge's status (a
//! compare-and-swap of that part against the copy decided on), with its Event and the metrics of the transition,
//! and the node's `GpuWedged` condition.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use unwedge_crds::labels::NODE_CONDITION;
use unwedge_crds::{GpuWedge, Phase};

use super::{Ctx, Error, open};
use crate::decide::{self, Decision};
use crate::metrics;
use crate::status::OperatorStatus;

/// Writes `d`'s status when it differs from `current` (the stored one), then publishes its
/// Event and counts the transition; returns the wedge as the API server stored it (`None`:
/// nothing to write). A write that lost to a concurrent change is [`Error::StatusConflict`].
pub(super) async fn status(
    ctx: &Ctx,
    w: &GpuWedge,
    d: &Decision,
    current: &OperatorStatus,
) -> Result<Option<GpuWedge>, Error> {
    if d.status == *current {
        return Ok(None);
    }
    let written = patch_status(ctx, w, &d.status).await?;
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
        ctx.event(&w.object_ref(&()), n);
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
    Ok(Some(written))
}

/// Writes the operator's part of the status; returns the wedge as the API server stored it.
///
/// A compare-and-swap of the operator's part against `w`, the copy decided on
/// ([`OperatorStatus::json_patch`]): the agent's writes of its own fields in between do not
/// make it lose; one that changes the approval is guarded by `w`'s resourceVersion.
async fn patch_status(ctx: &Ctx, w: &GpuWedge, status: &OperatorStatus) -> Result<GpuWedge, Error> {
    ctx.ensure_leader()?;
    let stored = w.status.as_ref();
    // A decision that drains was made on the agent's consumers and reset domain: guarded by them.
    let drains = decide::reads_pods(w);
    let rv = w
        .resource_version()
        .filter(|_| status.needs_version(stored, drains));
    match write(ctx, w, status.json_patch(stored, drains, rv.as_deref())).await {
        Err(Error::StatusConflict) if rv.is_none() => {}
        r => return r,
    }
    // A test failed. Mostly the wedge changed; but if what was tested reads the same on a fresh
    // copy, a value was stored in another spelling (the test compares text): write over that
    // copy, guarded by its resourceVersion. A copy without any status lost to the agent's first
    // report: nothing to compare.
    if stored.is_none() {
        return Err(Error::StatusConflict);
    }
    let Some(fresh) = ctx.wedge_api().get_opt(&w.name_any()).await? else {
        return Err(Error::StatusConflict);
    };
    let fs = fresh.status.as_ref();
    let same = |s: Option<&unwedge_crds::GpuWedgeStatus>| {
        s.map(|s| {
            let drained = drains.then(|| (s.consumers.clone(), s.reset_domain.clone()));
            (
                OperatorStatus::of(s),
                s.agent_dry_run,
                s.attempts.clone(),
                drained,
            )
        })
    };
    if stored.is_none() || same(fs) != same(stored) {
        return Err(Error::StatusConflict);
    }
    ctx.ensure_leader()?;
    write(
        ctx,
        &fresh,
        status.json_patch(fs, drains, fresh.resource_version().as_deref()),
    )
    .await
}

/// Sends the JSON patch `ops` to `w`'s status; a failed `test` is [`Error::StatusConflict`].
async fn write(ctx: &Ctx, w: &GpuWedge, ops: serde_json::Value) -> Result<GpuWedge, Error> {
    let ops: json_patch::Patch = serde_json::from_value(ops).expect("a well-formed JSON patch");
    ctx.wedge_writes.sending(&w.name_any());
    match ctx
        .wedge_api()
        .patch_status(
            &w.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(ops),
        )
        .await
    {
        Ok(written) => {
            ctx.wedge_writes.wrote(written.clone());
            Ok(written)
        }
        Err(kube::Error::Api(s)) if s.is_conflict() || failed_test(&s) => {
            tracing::debug!(code = s.code, "status write refused: the wedge changed");
            Err(Error::StatusConflict)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the API server refused a JSON patch because one of its `test`s failed: a 422 with
/// its generic message, unlike a validation error, which names the object and the field.
fn failed_test(s: &kube::core::Status) -> bool {
    s.code == 422 && s.message.starts_with("the server rejected our request")
}

/// Seconds since the wedge arrived (its recovery's duration so far).
fn now_secs(w: &GpuWedge) -> f64 {
    Timestamp::now()
        .duration_since(decide::arrived(w))
        .as_secs_f64()
        .max(0.0)
}

/// Sets the node condition `GpuWedged` while any device on it is unrecovered.
pub(super) async fn update_node_condition(ctx: &Ctx, node: &str, _this: &str) -> Result<(), Error> {
    let Some(n) = ctx.node(node) else {
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
    ctx.node_writes.sending(node);
    let written = Api::<Node>::all(ctx.client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&body))
        .await?;
    ctx.wrote_node(written);
    Ok(())
}
