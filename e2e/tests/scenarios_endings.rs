//! End-to-end scenarios of recoveries cut short, on the real local control plane with real
//! agents and two real operators (as in `scenarios.rs`): the GpuWedge deleted mid-recovery (an
//! admin cleaning up), the Node deleted mid-recovery (what cluster autoscalers do to drained
//! nodes), and the node relabelled into another policy mid-recovery. Each asserts that nothing
//! stays held — no cordon, no ledger place — and that the next wedge waiting for the budget is
//! admitted, plus invariants 1–3.
//!
//! Needs root. `UNWEDGE_SCENARIOS=deleted,nodegone,relabel` runs a subset.

use std::time::Duration;

use e2e::cluster::ControlPlane;
use e2e::fleet::{Bins, NodeSpec, SCENARIO_LABEL, Scenario};
use e2e::scenario_ops::{PHASE_WAIT, binaries_and_plane};
use e2e::wedge_view::{Outcome, Runner, condition, conditions_line, phase};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use unwedge_crds::gpuwedge::{GpuWedge, Phase};
use unwedge_crds::labels::ANN_CORDONED_BY;
use unwedge_crds::policy::RecoveryPolicy;

const NS: &str = "workloads";
/// How long a released place may take to reach the next wedge.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// The wedges the policy's ledger holds, read fresh.
async fn ledger(sc: &Scenario, policy: &str) -> Result<Vec<String>, String> {
    let p = Api::<RecoveryPolicy>::all(sc.fleet.client())
        .get(policy)
        .await
        .map_err(sc.ctx(&format!("get RecoveryPolicy {policy}")))?;
    Ok(p.status
        .map(|s| s.admitted.into_iter().map(|a| a.wedge).collect())
        .unwrap_or_default())
}

/// Polls until `check` holds (it returns what it saw when it does not), or fails with `what`.
async fn eventually<F, Fut>(sc: &Scenario, what: &str, check: F) -> Outcome
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, String>>,
{
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        let seen = check().await?;
        let Some(seen) = seen else {
            return Ok(());
        };
        if tokio::time::Instant::now() > deadline {
            return Err(sc.fail(&format!(
                "{what} within {RELEASE_WAIT:?}; last seen: {seen}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Node `a`'s wedge held in Draining by a PodDisruptionBudget (so it holds the only budget
/// place and the cordon), node `b`'s wedge Queued behind it. Returns `a`'s wedge name.
async fn one_held_one_queued(
    sc: &mut Scenario,
    bins: &Bins,
    (a, b): (&str, &str),
) -> Result<String, String> {
    let ga = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    let gb = sc.fleet.sim(b).sysfs.gpus()[0].bdf.clone();
    let guarded = format!("{a}-guarded");
    sc.pod(NS, &guarded, a, 1, Some(&ga))
        .await
        .map_err(sc.ctx(&format!("pod {guarded}")))?;
    sc.pdb_blocking(NS, &format!("{a}-guard"), &[guarded.as_str()])
        .await?;
    sc.inject(bins, a, &ga, "rebind,bus-reset").await?;
    let w = sc.wait_phase(a, Phase::Draining).await?;
    sc.inject(bins, b, &gb, "rebind,bus-reset").await?;
    sc.wait_phase(b, Phase::Queued).await?;
    Ok(w.name_any())
}

/// Fails unless `node` exists, is schedulable and carries no cordoned-by annotation.
async fn released_node(sc: &Scenario, node: &str) -> Outcome {
    eventually(
        sc,
        &format!("node {node} uncordoned by unwedge"),
        || async {
            let n = Api::<Node>::all(sc.fleet.client())
                .get(node)
                .await
                .map_err(sc.ctx(&format!("get node {node}")))?;
            let unschedulable = n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let by = n.annotations().get(ANN_CORDONED_BY).cloned();
            Ok((unschedulable || by.is_some())
                .then(|| format!("unschedulable {unschedulable}, {ANN_CORDONED_BY} {by:?}")))
        },
    )
    .await
}

/// Fails unless the policy's ledger no longer holds `wedge`.
async fn released_place(sc: &Scenario, policy: &str, wedge: &str) -> Outcome {
    eventually(
        sc,
        &format!("RecoveryPolicy {policy} releases {wedge}'s place"),
        || async {
            let l = ledger(sc, policy).await?;
            Ok(l.iter()
                .any(|w| w == wedge)
                .then(|| format!("ledger {l:?}")))
        },
    )
    .await
}

/// A GpuWedge deleted while Draining: its cordon is lifted, its place released, the wedge lets
/// go (the finalizer comes off), an Event on the node says so, and the queued wedge of the other
/// node is admitted and recovers.
async fn wedge_deleted(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (a, b) = ("deleted-a", "deleted-b");
    let mut sc = Scenario::new(
        cp,
        bins,
        "deleted",
        vec![NodeSpec::new(a, 1, "xe"), NodeSpec::new(b, 1, "xe")],
        1,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario deleted: setup: {x:#}"))?;
    let name = one_held_one_queued(&mut sc, bins, (a, b)).await?;
    let api = Api::<GpuWedge>::all(sc.fleet.client());
    let w = api.get(&name).await.map_err(sc.ctx("get the held wedge"))?;
    if !w.finalizers().iter().any(|f| f == "unwedge.io/release") {
        return Err(sc.fail(&format!(
            "wedge {name}: expected the operator's finalizer unwedge.io/release while it holds a place, seen {:?}",
            w.finalizers()
        )));
    }
    api.delete(&name, &DeleteParams::default())
        .await
        .map_err(sc.ctx(&format!("delete {name}")))?;
    eventually(&sc, &format!("wedge {name} gone"), || async {
        Ok(api
            .get_opt(&name)
            .await
            .map_err(sc.ctx("get"))?
            .map(|w| format!("still there, finalizers {:?}", w.finalizers())))
    })
    .await?;
    released_node(&sc, a).await?;
    released_place(&sc, "deleted", &name).await?;
    if sc.events(a, "GpuWedgeDeleted").await?.is_empty() {
        return Err(sc.fail(&format!(
            "node {a}: expected an Event GpuWedgeDeleted saying what was released, seen none"
        )));
    }
    sc.wait_phase(b, Phase::Recovered).await?;
    if !sc.fleet.sim(a).sysfs.journal().is_empty() {
        return Err(sc.fail(&format!(
            "the device of {a} was written although its wedge was deleted before any approval: {:?}",
            sc.fleet.sim(a).sysfs.journal()
        )));
    }
    sc.check_invariants()
}

/// The Node deleted while its wedge is Draining: the wedge ends Abandoned (NodeDeleted), its
/// place is released at once, and the queued wedge of the other node is admitted and recovers.
async fn node_deleted(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (a, b) = ("nodegone-a", "nodegone-b");
    let mut sc = Scenario::new(
        cp,
        bins,
        "nodegone",
        vec![NodeSpec::new(a, 1, "xe"), NodeSpec::new(b, 1, "xe")],
        1,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario nodegone: setup: {x:#}"))?;
    let name = one_held_one_queued(&mut sc, bins, (a, b)).await?;
    Api::<Node>::all(sc.fleet.client())
        .delete(a, &DeleteParams::default())
        .await
        .map_err(sc.ctx(&format!("delete node {a}")))?;
    let api = Api::<GpuWedge>::all(sc.fleet.client());
    eventually(
        &sc,
        &format!("wedge {name} Abandoned (NodeDeleted)"),
        || async {
            let w = api.get(&name).await.map_err(sc.ctx("get"))?;
            let reason = condition(&w, "Abandoned").map(|c| c.reason);
            Ok(
                (phase(&w) != Some(Phase::Abandoned) || reason.as_deref() != Some("NodeDeleted"))
                    .then(|| format!("phase {:?}: {}", phase(&w), conditions_line(&w))),
            )
        },
    )
    .await?;
    released_place(&sc, "nodegone", &name).await?;
    sc.wait_phase(b, Phase::Recovered).await?;
    sc.check_invariants()
}

/// The node relabelled into another policy while its wedge awaits approval: the wedge keeps its
/// place in the policy that admitted it (the new policy never counts it), recovers once a human
/// approves, and the place is released from the admitting policy.
async fn relabelled(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let a = "relabel-a";
    let sc = Scenario::new(
        cp,
        bins,
        "relabel",
        vec![NodeSpec::new(a, 1, "xe")],
        1,
        json!({"approval": "Manual"}),
        2,
    )
    .await
    .map_err(|x| format!("scenario relabel: setup: {x:#}"))?;
    let other: RecoveryPolicy = serde_json::from_value(json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": "relabel-other"},
        "spec": {"nodeSelector": {"unwedge.test/pool": "other"}, "maxUnavailable": 1}
    }))
    .map_err(sc.ctx("the other policy"))?;
    Api::<RecoveryPolicy>::all(sc.fleet.client())
        .create(&PostParams::default(), &other)
        .await
        .map_err(sc.ctx("create RecoveryPolicy relabel-other"))?;
    let g = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    sc.inject(bins, a, &g, "rebind,bus-reset").await?;
    let w = sc.wait_phase(a, Phase::AwaitingApproval).await?;
    let name = w.name_any();
    let labels: serde_json::Map<String, serde_json::Value> = Api::<Node>::all(sc.fleet.client())
        .get(a)
        .await
        .map_err(sc.ctx("get node"))?
        .labels()
        .keys()
        .filter(|k| k.as_str() == SCENARIO_LABEL)
        .map(|k| (k.clone(), serde_json::Value::Null))
        .chain([("unwedge.test/pool".to_string(), json!("other"))])
        .collect();
    Api::<Node>::all(sc.fleet.client())
        .patch(
            a,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": labels}})),
        )
        .await
        .map_err(sc.ctx("relabel the node"))?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (held, other_held) = (
        ledger(&sc, "relabel").await?,
        ledger(&sc, "relabel-other").await?,
    );
    let w = Api::<GpuWedge>::all(sc.fleet.client())
        .get(&name)
        .await
        .map_err(sc.ctx("get"))?;
    let policy = w.status.as_ref().and_then(|s| s.policy.clone());
    if held != vec![name.clone()] || !other_held.is_empty() || policy.as_deref() != Some("relabel")
    {
        return Err(sc.fail(&format!(
            "after the relabel: expected {name} held by relabel only and governed by it, seen relabel {held:?}, relabel-other {other_held:?}, status.policy {policy:?}"
        )));
    }
    sc.human_verb(&name, "approve", "rebind").await?;
    sc.rec
        .wait_phase(a, Phase::Recovered, PHASE_WAIT)
        .await
        .map_err(|x| sc.fail(&x))?;
    released_node(&sc, a).await?;
    released_place(&sc, "relabel", &name).await?;
    let other_held = ledger(&sc, "relabel-other").await?;
    if !other_held.is_empty() {
        return Err(sc.fail(&format!(
            "relabel-other never admitted {name}, yet its ledger holds {other_held:?}"
        )));
    }
    sc.rebinds(a, &g, 1)?;
    sc.check_invariants()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ending_scenarios() {
    let (bins, cp) = binaries_and_plane().await;
    let mut run = Runner::new();
    if run.wants("deleted") {
        let r = wedge_deleted(&cp, &bins).await;
        run.record("GpuWedge deleted while Draining releases everything", r);
    }
    if run.wants("nodegone") {
        let r = node_deleted(&cp, &bins).await;
        run.record("Node deleted mid-recovery ends the wedge", r);
    }
    if run.wants("relabel") {
        let r = relabelled(&cp, &bins).await;
        run.record(
            "a relabelled node keeps its place in the admitting policy",
            r,
        );
    }
    run.finish();
}
