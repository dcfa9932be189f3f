//! End-to-end scenarios of the controls people hold over a recovery, on the real local control
//! plane with real agents and two real operators (as in `scenarios.rs`): a PodDisruptionBudget
//! that blocks the drain until it is relaxed, a node an admin cordoned, manual approval naming
//! a method, a paused policy, the circuit breaker and its resume, and a repeat offender retried
//! by a human. Every scenario asserts its outcome and invariants 1–3.
//!
//! Needs root. `UNWEDGE_SCENARIOS=pdb,manual,paused,breaker,repeat` runs a subset.

use e2e::cluster::ControlPlane;
use e2e::fleet::{Bins, NodeSpec, Scenario};
use e2e::scenario_ops::{HOLD, PHASE_WAIT, binaries_and_plane};
use e2e::wedge_view::{
    Outcome, Runner, attempt_seq, condition, conditions_line, evicted, eviction_records, phase,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use unwedge_crds::gpuwedge::{AttemptOutcome, Phase};
use unwedge_crds::policy::RecoveryPolicy;

const NS: &str = "workloads";

/// A PodDisruptionBudget blocks the drain until relaxed; a node an admin cordoned stays
/// cordoned. `pdb-a` holds `pdb-guarded` (PDB minAvailable 1) and `pdb-free` on its GPU: the
/// free pod is evicted, the guarded one refused (Event EvictionRefused) and the wedge stays
/// Draining with nothing approved and the device untouched; once the PDB is relaxed the
/// guarded pod is evicted, rebind runs once and the node is uncordoned. `pdb-b`, cordoned by
/// the admin before its wedge, recovers too and is still cordoned afterwards.
async fn pdb_then_relaxed(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (a, b) = ("pdb-a", "pdb-b");
    let mut sc = Scenario::new(
        cp,
        bins,
        "pdb",
        vec![NodeSpec::new(a, 2, "xe"), NodeSpec::new(b, 1, "xe")],
        2,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario pdb: setup: {x:#}"))?;
    let ga = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    let gb = sc.fleet.sim(b).sysfs.gpus()[0].bdf.clone();
    sc.pod(NS, "pdb-guarded", a, 1, Some(&ga))
        .await
        .map_err(sc.ctx("pod pdb-guarded"))?;
    sc.pod(NS, "pdb-free", a, 1, Some(&ga))
        .await
        .map_err(sc.ctx("pod pdb-free"))?;
    sc.pod(NS, "pdb-b-pod", b, 1, Some(&gb))
        .await
        .map_err(sc.ctx("pod pdb-b-pod"))?;
    sc.pdb_blocking(NS, "pdb-guard", &["pdb-guarded"]).await?;
    Api::<Node>::all(sc.fleet.client())
        .patch(
            b,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .map_err(sc.ctx("admin cordons pdb-b"))?;
    for (n, g) in [(a, &ga), (b, &gb)] {
        sc.inject(bins, n, g, "rebind,bus-reset").await?;
    }
    let w = sc.wait_phase(a, Phase::Draining).await?;
    let name = w.metadata.name.clone().unwrap_or_default();
    sc.wait_event(&name, "EvictionRefused", "the PDB refuses pdb-guarded")
        .await?;
    sc.stays(a, Phase::Draining, "PDB blocks the drain").await?;
    if !sc
        .pod_exists(NS, "pdb-guarded")
        .await
        .map_err(sc.ctx("get pod"))?
    {
        return Err(
            sc.fail("pdb-guarded was removed while its PodDisruptionBudget allowed no disruption")
        );
    }
    let w = sc.only_wedge(a)?;
    if evicted(&w) != [format!("{NS}/pdb-free")] {
        return Err(sc.fail(&format!(
            "while the PDB holds: evictions expected [{NS}/pdb-free], seen {:?}",
            evicted(&w)
        )));
    }
    sc.pdb_relax(NS, "pdb-guard").await?;
    let w = sc.wait_phase(a, Phase::Recovered).await?;
    let want = [format!("{NS}/pdb-free"), format!("{NS}/pdb-guarded")];
    if evicted(&w) != want || eviction_records(&w) != 2 {
        return Err(sc.fail(&format!(
            "after the PDB was relaxed: evictions expected {want:?} once each, seen {:?}",
            w.status.as_ref().and_then(|s| s.evictions.clone())
        )));
    }
    sc.rebinds(a, &ga, 1)?;
    sc.uncordoned(a)?;
    let wb = sc.wait_phase(b, Phase::Recovered).await?;
    sc.rebinds(b, &gb, 1)?;
    let ours = wb.status.as_ref().and_then(|s| s.cordoned);
    if sc.rec.node_cordoned(b) != Some(true) || ours == Some(true) {
        return Err(sc.fail(&format!(
            "node {b}, cordoned by an admin before its wedge: expected still cordoned and status.cordoned not true, seen cordoned {:?}, status.cordoned {ours:?}",
            sc.rec.node_cordoned(b)
        )));
    }
    sc.check_invariants()
}

/// Manual approval: the wedge drains and waits in AwaitingApproval with nothing approved and
/// the device untouched; a `kubectl uncordon` meanwhile is undone (the node cordoned again, a
/// `Recordoned` Warning on the wedge); the admin approves `bus-reset` (not the kernel's first choice) with
/// `unwedge.io/by`; the operator records the admin as the approver and the agent runs bus-reset
/// once.
async fn manual_approval(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "manual-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "manual",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        json!({"approval": "Manual"}),
        2,
    )
    .await
    .map_err(|x| format!("scenario manual: setup: {x:#}"))?;
    let g = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    sc.pod(NS, "manual-pod", node, 1, Some(&g))
        .await
        .map_err(sc.ctx("pod"))?;
    sc.inject(bins, node, &g, "rebind,bus-reset").await?;
    let w = sc.wait_phase(node, Phase::AwaitingApproval).await?;
    if evicted(&w) != [format!("{NS}/manual-pod")] {
        return Err(sc.fail(&format!(
            "AwaitingApproval comes after the drain: evictions expected [{NS}/manual-pod], seen {:?}",
            evicted(&w)
        )));
    }
    sc.stays(node, Phase::AwaitingApproval, "manual policy")
        .await?;
    let name = w.metadata.name.clone().unwrap_or_default();
    // A person runs `kubectl uncordon` while the wedge waits (it keeps unwedge's annotation):
    // the wedged node is cordoned again, and a Warning on the wedge says so.
    let nodes: Api<Node> = Api::all(sc.fleet.client());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": null}})),
        )
        .await
        .map_err(sc.ctx("kubectl uncordon"))?;
    sc.wait_event(
        &name,
        "Recordoned",
        "a person uncordoned the node mid-recovery",
    )
    .await?;
    let n = nodes.get(node).await.map_err(sc.ctx("GET node"))?;
    let by = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("unwedge.io/cordoned-by").cloned());
    if n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true) || by.as_deref() != Some(&name) {
        return Err(sc.fail(&format!(
            "node {node}: expected cordoned again for {name}, seen unschedulable {:?}, cordoned-by {by:?}",
            n.spec.as_ref().and_then(|s| s.unschedulable)
        )));
    }
    sc.human_verb(&name, "approve", "bus-reset").await?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let admin = sc.admin_name().await?;
    let by = w
        .status
        .as_ref()
        .and_then(|s| s.approval.as_ref())
        .map(|a| a.by.clone());
    if by.as_deref() != Some(admin.as_str()) {
        return Err(sc.fail(&format!(
            "status.approval.by expected the approving admin {admin:?}, seen {by:?}"
        )));
    }
    let want = vec![("bus-reset".to_string(), AttemptOutcome::Succeeded)];
    if attempt_seq(&w) != want {
        return Err(sc.fail(&format!(
            "attempts expected {want:?} (the method the admin named), seen {:?}",
            attempt_seq(&w)
        )));
    }
    let s = &sc.fleet.sim(node).sysfs;
    let resets = s.count("reset", &g) + s.count("remove", &g);
    if resets != 1 {
        return Err(sc.fail(&format!(
            "sysfs journal: expected one bus reset of {g}, seen {resets}: {:?}",
            s.journal()
        )));
    }
    sc.check_invariants()
}

/// Sets fields of the scenario's RecoveryPolicy (a merge patch of `body`).
async fn patch_policy(sc: &Scenario, body: serde_json::Value) -> Outcome {
    sc.patch_policy(body).await.map_err(sc.ctx("patch"))
}

/// Fails unless the node's only wedge is held with condition Paused=True (reason `reason`),
/// the node not cordoned by unwedge and no pod evicted.
fn held_by(sc: &Scenario, node: &str, reason: &str) -> Outcome {
    let w = sc.only_wedge(node)?;
    let c = condition(&w, "Paused");
    let ok = c
        .as_ref()
        .is_some_and(|c| c.status == "True" && c.reason == reason);
    if !ok || sc.rec.node_cordoned(node) == Some(true) || !evicted(&w).is_empty() {
        return Err(sc.fail(&format!(
            "node {node}: expected the wedge held (Paused=True, {reason}), the node not cordoned and nothing evicted; seen conditions [{}], cordoned {:?}, evictions {:?}",
            conditions_line(&w),
            sc.rec.node_cordoned(node),
            evicted(&w)
        )));
    }
    Ok(())
}

/// Waits until the node's only wedge carries condition Paused=True with `reason`.
async fn wait_held(sc: &Scenario, node: &str, reason: &str) -> Outcome {
    let reason = reason.to_string();
    sc.rec
        .wait_node_wedges(
            node,
            &format!("the wedge of {node} held with Paused=True ({reason})"),
            PHASE_WAIT,
            |ws| {
                ws.iter().any(|w| {
                    condition(w, "Paused").is_some_and(|c| c.status == "True" && c.reason == reason)
                })
            },
        )
        .await
        .map_err(|x| sc.fail(&x))
}

/// `paused: true`: a wedge is recorded and held (no cordon, no eviction, no approval, device
/// untouched) with condition Paused (PolicyPaused); unpausing lets it recover.
async fn paused_policy(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "paused-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "paused",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        json!({"paused": true}),
        2,
    )
    .await
    .map_err(|x| format!("scenario paused: setup: {x:#}"))?;
    let g = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    sc.pod(NS, "paused-pod", node, 1, Some(&g))
        .await
        .map_err(sc.ctx("pod"))?;
    sc.inject(bins, node, &g, "rebind,bus-reset").await?;
    wait_held(&sc, node, "PolicyPaused").await?;
    let held = phase(&sc.only_wedge(node)?).unwrap_or_default();
    sc.stays(node, held, "paused policy").await?;
    held_by(&sc, node, "PolicyPaused")?;
    patch_policy(&sc, json!({"spec": {"paused": false}})).await?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    if evicted(&w) != [format!("{NS}/paused-pod")] {
        return Err(sc.fail(&format!(
            "after unpausing: evictions expected [{NS}/paused-pod], seen {:?}",
            evicted(&w)
        )));
    }
    sc.rebinds(node, &g, 1)?;
    sc.check_invariants()
}

/// Circuit breaker (2 wedges per hour): `brk-a` and `brk-b` wedge and recover (2 is not above
/// 2); the third wedge, on `brk-c`, trips the breaker: the policy records the trip with a
/// condition, the wedge is held (Paused, CircuitBreakerTripped) with nothing done to the node;
/// the admin's `unwedge.io/resume` on the policy lets it recover.
async fn circuit_breaker(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let nodes = ["brk-a", "brk-b", "brk-c"];
    let mut sc = Scenario::new(
        cp,
        bins,
        "breaker",
        nodes.iter().map(|n| NodeSpec::new(n, 1, "xe")).collect(),
        3,
        json!({"circuitBreaker": {"count": 2, "window": "1h"}}),
        2,
    )
    .await
    .map_err(|x| format!("scenario breaker: setup: {x:#}"))?;
    let mut gpus = Vec::new();
    for n in nodes {
        gpus.push(sc.fleet.sim(n).sysfs.gpus()[0].bdf.clone());
    }
    for (n, g) in nodes.iter().zip(&gpus).take(2) {
        sc.inject(bins, n, g, "rebind,bus-reset").await?;
        sc.wait_phase(n, Phase::Recovered).await?;
    }
    let (c, gc) = (nodes[2], &gpus[2]);
    sc.pod(NS, "breaker-pod", c, 1, Some(gc))
        .await
        .map_err(sc.ctx("pod"))?;
    sc.inject(bins, c, gc, "rebind,bus-reset").await?;
    wait_held(&sc, c, "CircuitBreakerTripped").await?;
    let policy = Api::<RecoveryPolicy>::all(sc.fleet.client())
        .get(&sc.name)
        .await
        .map_err(sc.ctx("get policy"))?;
    let st = policy.status.clone().unwrap_or_default();
    let tripped_cond = st.conditions.as_ref().is_some_and(|cs| {
        cs.iter()
            .any(|x| x.type_ == "CircuitBreakerTripped" && x.status == "True")
    });
    if st.circuit_breaker_tripped_at.is_none() || !tripped_cond {
        return Err(sc.fail(&format!(
            "RecoveryPolicy breaker: expected circuitBreakerTrippedAt and condition CircuitBreakerTripped=True, seen {st:?}"
        )));
    }
    let held = phase(&sc.only_wedge(c)?).unwrap_or_default();
    sc.stays(c, held, "tripped breaker").await?;
    held_by(&sc, c, "CircuitBreakerTripped")?;
    patch_policy(
        &sc,
        json!({"metadata": {"annotations": {"unwedge.io/resume": "checked the fleet"}}}),
    )
    .await?;
    let w = sc.wait_phase(c, Phase::Recovered).await?;
    if evicted(&w) != [format!("{NS}/breaker-pod")] {
        return Err(sc.fail(&format!(
            "after resume: evictions expected [{NS}/breaker-pod], seen {:?}",
            evicted(&w)
        )));
    }
    for (n, g) in nodes.iter().zip(&gpus) {
        sc.rebinds(n, g, 1)?;
    }
    sc.check_invariants()
}

/// Repeat offender (2 wedges of one device per hour): the first wedge recovers; the second
/// goes to NeedsAttention (RepeatOffender) with the node kept cordoned and the device
/// untouched; the admin's `unwedge.io/retry` recovers it.
async fn repeat_offender(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "repeat-a";
    let sc = Scenario::new(
        cp,
        bins,
        "repeat",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        json!({"repeatOffender": {"count": 2, "window": "1h"}}),
        2,
    )
    .await
    .map_err(|x| format!("scenario repeat: setup: {x:#}"))?;
    let g = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    sc.inject(bins, node, &g, "rebind,bus-reset").await?;
    let first = sc.wait_phase(node, Phase::Recovered).await?;
    let first = first.metadata.name.unwrap_or_default();
    sc.inject(bins, node, &g, "rebind,bus-reset").await?;
    let w = sc.wait_phase(node, Phase::NeedsAttention).await?;
    let name = w.metadata.name.clone().unwrap_or_default();
    let reason = condition(&w, "NeedsAttention").map(|c| c.reason);
    if name == first || reason.as_deref() != Some("RepeatOffender") {
        return Err(sc.fail(&format!(
            "second wedge of {g}: expected a new GpuWedge in NeedsAttention (RepeatOffender), seen {name} with reason {reason:?}"
        )));
    }
    tokio::time::sleep(HOLD).await;
    if sc.rec.node_cordoned(node) != Some(true) || sc.fleet.sim(node).sysfs.count("unbind", &g) != 1
    {
        return Err(sc.fail(&format!(
            "repeat offender: expected node {node} kept cordoned and the device not touched again, seen cordoned {:?}, unbinds {}",
            sc.rec.node_cordoned(node),
            sc.fleet.sim(node).sysfs.count("unbind", &g)
        )));
    }
    sc.human_verb(&name, "retry", "1").await?;
    sc.rec
        .wait_node_wedges(node, "the retried wedge Recovered", PHASE_WAIT, |ws| {
            ws.iter()
                .filter(|w| phase(w) == Some(Phase::Recovered))
                .count()
                == 2
        })
        .await
        .map_err(|x| sc.fail(&x))?;
    sc.rebinds(node, &g, 2)?;
    sc.uncordoned(node)?;
    sc.check_invariants()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_scenarios() {
    let (bins, cp) = binaries_and_plane().await;
    let mut run = Runner::new();
    if run.wants("pdb") {
        let r = pdb_then_relaxed(&cp, &bins).await;
        run.record("PDB blocks the drain until relaxed; admin cordon kept", r);
    }
    if run.wants("manual") {
        let r = manual_approval(&cp, &bins).await;
        run.record("manual approval naming a method", r);
    }
    if run.wants("paused") {
        let r = paused_policy(&cp, &bins).await;
        run.record("paused policy holds, unpause recovers", r);
    }
    if run.wants("breaker") {
        let r = circuit_breaker(&cp, &bins).await;
        run.record("circuit breaker trips, resume recovers", r);
    }
    if run.wants("repeat") {
        let r = repeat_offender(&cp, &bins).await;
        run.record("repeat offender needs attention, retry recovers", r);
    }
    run.finish();
}
