//! End-to-end scenarios where the control plane fails under a recovery, on the real local
//! control plane with real agents and two real operators (as in `scenarios.rs`): the operator
//! leader killed mid-drain, and kube-apiserver restarted mid-recovery. A PodDisruptionBudget
//! holds the drain open so the failure lands in it for certain. Every scenario asserts its
//! outcome and invariants 1–3.
//!
//! Needs root. `UNWEDGE_SCENARIOS=leader,apiserver` runs a subset.

use std::time::Duration;

use e2e::cluster::ControlPlane;
use e2e::fleet::{Bins, NodeSpec, Scenario};
use e2e::scenario_ops::binaries_and_plane;
use e2e::wait::Check;
use e2e::wedge_view::{Outcome, Runner, evicted, eviction_records};
use unwedge_crds::gpuwedge::Phase;

const NS: &str = "workloads";

/// Fails unless the node's wedges evicted exactly `pods` (namespace `NS`), each once.
fn evicted_once(sc: &Scenario, node: &str, pods: &[&str]) -> Outcome {
    let w = sc.only_wedge(node)?;
    let want: Vec<String> = pods.iter().map(|p| format!("{NS}/{p}")).collect();
    if evicted(&w) != want || eviction_records(&w) != want.len() {
        return Err(sc.fail(&format!(
            "node {node}: evictions expected {want:?}, once each, seen {:?}",
            w.status.as_ref().and_then(|s| s.evictions.clone())
        )));
    }
    Ok(())
}

/// The operator leader killed mid-drain (policy maxUnavailable 1). `ldr-a` wedges first; its
/// free pod is evicted, its guarded pod refused by a PDB, so the drain is open; `ldr-b` and
/// `ldr-c` wedge and queue. The leader is SIGKILLed; the other replica takes the Lease, the PDB
/// is relaxed, and the new leader finishes `ldr-a` and then recovers the queued two one at a
/// time: every pod evicted once, every device rebound once, never more than 1 node under
/// recovery (the recorder) and no attempt approved twice.
async fn leader_killed_mid_drain(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let nodes = ["ldr-a", "ldr-b", "ldr-c"];
    let mut sc = Scenario::new(
        cp,
        bins,
        "leader",
        nodes
            .iter()
            .map(|n| NodeSpec::new(n, if *n == "ldr-a" { 2 } else { 1 }, "xe"))
            .collect(),
        1,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario leader: setup: {x:#}"))?;
    let gpus: Vec<String> = nodes
        .iter()
        .map(|n| sc.fleet.sim(n).sysfs.gpus()[0].bdf.clone())
        .collect();
    let a = nodes[0];
    for (pod, node, g) in [
        ("ldr-guarded", a, &gpus[0]),
        ("ldr-free", a, &gpus[0]),
        ("ldr-b-pod", nodes[1], &gpus[1]),
        ("ldr-c-pod", nodes[2], &gpus[2]),
    ] {
        sc.pod(NS, pod, node, 1, Some(g))
            .await
            .map_err(sc.ctx(&format!("pod {pod}")))?;
    }
    sc.pdb_blocking(NS, "ldr-guard", &["ldr-guarded"]).await?;
    sc.inject(bins, a, &gpus[0], "rebind,bus-reset").await?;
    let w = sc.wait_phase(a, Phase::Draining).await?;
    for (n, g) in nodes.iter().zip(&gpus).skip(1) {
        sc.inject(bins, n, g, "rebind,bus-reset").await?;
    }
    sc.wait_event(
        &w.metadata.name.clone().unwrap_or_default(),
        "EvictionRefused",
        "a PDB holds the drain",
    )
    .await?;
    let leader = sc
        .fleet
        .leader()
        .await
        .ok_or_else(|| sc.fail("no operator holds the Lease"))?;
    let i: usize = leader
        .strip_prefix("operator-")
        .and_then(|i| i.parse().ok())
        .ok_or_else(|| sc.fail(&format!("unexpected leader identity {leader:?}")))?;
    sc.fleet.kill_operator(i);
    sc.eventually(
        &format!("the other replica to take the Lease after {leader} was killed"),
        Duration::from_secs(60),
        || async {
            Ok(match sc.fleet.leader().await {
                Some(l) if l != leader => Check::Done(()),
                holder => Check::Seen(format!("holder {holder:?}")),
            })
        },
    )
    .await?;
    sc.pdb_relax(NS, "ldr-guard").await?;
    for n in nodes {
        sc.wait_phase(n, Phase::Recovered).await?;
    }
    evicted_once(&sc, a, &["ldr-free", "ldr-guarded"])?;
    evicted_once(&sc, nodes[1], &["ldr-b-pod"])?;
    evicted_once(&sc, nodes[2], &["ldr-c-pod"])?;
    for (n, g) in nodes.iter().zip(&gpus) {
        sc.rebinds(n, g, 1)?;
        sc.uncordoned(n)?;
    }
    sc.check_invariants()
}

/// kube-apiserver restarted mid-recovery: the drain of `api-a` is held open by a PDB, the API
/// server is stopped and started again (every watch and connection of the agent and both
/// operators breaks); once the PDB is relaxed the wedge recovers with its pod evicted once, the
/// device rebound once and the node uncordoned.
async fn apiserver_restarted_mid_recovery(cp: &mut ControlPlane, bins: &Bins) -> Outcome {
    let node = "api-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "apiserver",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario apiserver: setup: {x:#}"))?;
    let g = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    sc.pod(NS, "api-guarded", node, 1, Some(&g))
        .await
        .map_err(sc.ctx("pod"))?;
    sc.pdb_blocking(NS, "api-guard", &["api-guarded"]).await?;
    sc.inject(bins, node, &g, "rebind,bus-reset").await?;
    let w = sc.wait_phase(node, Phase::Draining).await?;
    sc.wait_event(
        &w.metadata.name.clone().unwrap_or_default(),
        "EvictionRefused",
        "a PDB holds the drain",
    )
    .await?;
    cp.restart_apiserver()
        .await
        .map_err(sc.ctx("restart kube-apiserver"))?;
    sc.pdb_relax(NS, "api-guard").await?;
    sc.wait_phase(node, Phase::Recovered).await?;
    evicted_once(&sc, node, &["api-guarded"])?;
    sc.rebinds(node, &g, 1)?;
    sc.uncordoned(node)?;
    sc.check_invariants()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_scenarios() {
    let (bins, mut cp) = binaries_and_plane().await;
    let mut run = Runner::new();
    if run.wants("leader") {
        let r = leader_killed_mid_drain(&cp, &bins).await;
        run.record("operator leader killed mid-drain", r);
    }
    if run.wants("apiserver") {
        let r = apiserver_restarted_mid_recovery(&mut cp, &bins).await;
        run.record("kube-apiserver restarted mid-recovery", r);
    }
    run.finish();
}
