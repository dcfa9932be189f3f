//! End-to-end scenarios of recoveries cut short or fed a lie, on the real local control plane
//! with real agents and two real operators (as in `scenarios.rs`): the GpuWedge deleted
//! mid-recovery (an admin cleaning up), the Node deleted mid-recovery (what cluster autoscalers
//! do to drained nodes), the node relabelled into another policy mid-recovery, hand-made
//! GpuWedges the agent never detected, a device with no driver bound, an agent in dry run, a
//! wedge dated in the past that tries to jump the queue, the methods only a human can carry out
//! (xe's survivability mode, a cold reset the policy does not allow), and uevents lost to a real
//! netlink overrun. Each asserts that nothing stays held — no cordon, no ledger place — that
//! nothing the agent did not detect is written, plus invariants 1–3.
//!
//! Needs root. `UNWEDGE_SCENARIOS=deleted,nodegone,relabel,forged,nodriver,dryrun,queue,brkclock,`
//! `vendor,overrun` runs a subset.

use std::time::Duration;

use e2e::cluster::ControlPlane;
use e2e::fleet::{Bins, NodeSpec, SCENARIO_LABEL, Scenario};
use e2e::scenario_ops::{PHASE_WAIT, binaries_and_plane};
use e2e::wait::Check;
use e2e::wedge_view::{Outcome, Runner, attempt_seq, condition, conditions_line, phase};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use unwedge_agent::reporter::{DetectedWedge, agent_status_patch, build_wedge};
use unwedge_crds::gpuwedge::{AttemptOutcome, DeviceRef, GpuWedge, Phase};
use unwedge_crds::labels::{ANN_CORDONED_BY, UEVENT_SURVIVABILITY_MODE};
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

/// [`Scenario::eventually`] for [`RELEASE_WAIT`] with a check that returns what it saw when
/// the awaited state does not hold, and nothing when it does.
async fn eventually<F, Fut>(sc: &Scenario, what: &str, mut check: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, String>>,
{
    sc.eventually(what, RELEASE_WAIT, || {
        let seen = check();
        async move { Ok(Check::unless(seen.await?)) }
    })
    .await
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
    // The finalizer removed by hand, then the wedge deleted: nothing releases the cordon at the
    // deletion, so the leader's periodic check lifts the cordon of a wedge that is gone.
    let ga = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    sc.inject(bins, a, &ga, "rebind,bus-reset").await?;
    let held = sc.wait_phase(a, Phase::Draining).await?.name_any();
    api.patch(
        &held,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .map_err(sc.ctx("remove the finalizer by hand"))?;
    api.delete(&held, &DeleteParams::default())
        .await
        .map_err(sc.ctx(&format!("delete {held}")))?;
    released_node(&sc, a).await?;
    released_place(&sc, "deleted", &held).await?;
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

/// Creates, as an admin (or a compromised agent) would, a GpuWedge of `node` naming `device`
/// that no agent detected, with the agent part of its status, so the operator goes ahead.
async fn hand_made(
    sc: &Scenario,
    node: &str,
    device: DeviceRef,
    detected_at: jiff::Timestamp,
    seq: u64,
) -> Result<String, String> {
    let d = DetectedWedge::from_uevent(
        node,
        device,
        "rebind,bus-reset",
        Some(seq),
        detected_at,
        "forged-boot",
    );
    let name = d.name();
    let api = Api::<GpuWedge>::all(sc.fleet.client());
    api.create(&PostParams::default(), &build_wedge(&d, &name, None))
        .await
        .map_err(sc.ctx(&format!("create the hand-made wedge {name}")))?;
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(agent_status_patch(&d)),
    )
    .await
    .map_err(sc.ctx("the hand-made wedge's agent status"))?;
    Ok(name)
}

/// Waits until `wedge` is in `want` and returns it.
async fn wedge_in(sc: &Scenario, wedge: &str, want: Phase) -> Result<GpuWedge, String> {
    let api = Api::<GpuWedge>::all(sc.fleet.client());
    sc.eventually(
        &format!("wedge {wedge} in {want:?}"),
        PHASE_WAIT,
        || async {
            let w = api.get(wedge).await.map_err(sc.ctx("get"))?;
            Ok(if phase(&w) == Some(want) {
                Check::Done(w)
            } else {
                Check::Seen(format!("{:?}: {}", phase(&w), conditions_line(&w)))
            })
        },
    )
    .await
}

/// Hand-made GpuWedges the agent never detected: one naming an address that is no DRM device
/// (a stand-in for the NIC of the report), one naming the node's real GPU. The API server
/// refuses a driver that is a path. The operator cordons and approves (it cannot tell), the
/// agent refuses each approval and writes nothing; the wedge waits for a human
/// (ApprovalRefused) without escalating; deleting it releases the node.
async fn forged(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let a = "forged-a";
    let sc = Scenario::new(
        cp,
        bins,
        "forged",
        vec![NodeSpec::new(a, 1, "xe")],
        1,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario forged: setup: {x:#}"))?;
    let gpu = sc.fleet.sim(a).sysfs.gpus()[0].clone();
    let now = jiff::Timestamp::now();
    let path_driver = DeviceRef {
        pci_address: gpu.bdf.clone(),
        card: Some(gpu.card_name()),
        driver: "../../../../tmp/x".into(),
        ..DeviceRef::default()
    };
    match hand_made(&sc, a, path_driver, now, 900).await {
        Err(e) if e.contains("spec.device.driver") => {}
        Err(e) => return Err(sc.fail(&format!("a driver that is a path: expected the API server to refuse spec.device.driver, seen {e}"))),
        Ok(n) => return Err(sc.fail(&format!("a driver that is a path was accepted ({n})"))),
    }
    let nic = DeviceRef {
        pci_address: "0000:7f:00.0".into(),
        driver: "e1000e".into(),
        ..DeviceRef::default()
    };
    let real = DeviceRef {
        pci_address: gpu.bdf.clone(),
        card: Some(gpu.card_name()),
        driver: "xe".into(),
        ..DeviceRef::default()
    };
    let api = Api::<GpuWedge>::all(sc.fleet.client());
    for (what, dev, seq) in [
        ("a non-DRM address", nic, 901),
        ("the real GPU, never detected", real, 902),
    ] {
        let name = hand_made(&sc, a, dev, now, seq).await?;
        let w = wedge_in(&sc, &name, Phase::NeedsAttention).await?;
        let reason = condition(&w, "NeedsAttention").map(|c| c.reason);
        let attempts = attempt_seq(&w);
        if reason.as_deref() != Some("ApprovalRefused")
            || attempts != vec![("rebind".to_string(), AttemptOutcome::Refused)]
        {
            return Err(sc.fail(&format!(
                "{what} ({name}): expected NeedsAttention (ApprovalRefused) after one refused rebind, seen {reason:?}, attempts {attempts:?}: {}",
                conditions_line(&w)
            )));
        }
        if !sc.fleet.sim(a).sysfs.journal().is_empty() {
            return Err(sc.fail(&format!(
                "{what}: the agent wrote to sysfs for a wedge it never detected: {:?}",
                sc.fleet.sim(a).sysfs.journal()
            )));
        }
        api.delete(&name, &DeleteParams::default())
            .await
            .map_err(sc.ctx(&format!("delete {name}")))?;
        released_node(&sc, a).await?;
        released_place(&sc, "forged", &name).await?;
    }
    sc.check_invariants()
}

/// Methods only a human can carry out, each with what to do: `WEDGED=vendor-specific` of an xe
/// GPU whose sysfs `survivability_mode` says `Runtime` (the agent reports the mode, the
/// NeedsAttention message asks for a firmware flash with fwupd), and `WEDGED=cold-reset` under
/// the default policy, which does not allow it (ColdReset, power-cycle, not NoAllowedMethod).
/// Nothing is written to either device.
async fn human_methods(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (a, b) = ("vendor-a", "vendor-b");
    let sc = Scenario::new(
        cp,
        bins,
        "vendor",
        vec![NodeSpec::new(a, 1, "xe"), NodeSpec::new(b, 1, "xe")],
        2,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario vendor: setup: {x:#}"))?;
    let ga = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    let gb = sc.fleet.sim(b).sysfs.gpus()[0].bdf.clone();
    // Written after the agent started, so only the uevent path can report it.
    std::fs::write(
        sc.fleet
            .sim(a)
            .sysfs
            .sys_root()
            .join(format!("bus/pci/devices/{ga}/survivability_mode")),
        "Runtime\n",
    )
    .map_err(sc.ctx("write survivability_mode"))?;
    sc.inject(bins, a, &ga, "vendor-specific").await?;
    sc.inject(bins, b, &gb, "cold-reset").await?;
    for (node, reason, says) in [
        (
            a,
            "VendorSpecific",
            &["runtime survivability", "firmware flash", "fwupd"][..],
        ),
        (b, "ColdReset", &["power-cycle"][..]),
    ] {
        let w = sc.wait_phase(node, Phase::NeedsAttention).await?;
        let c = condition(&w, "NeedsAttention");
        let ok = c
            .as_ref()
            .is_some_and(|c| c.reason == reason && says.iter().all(|x| c.message.contains(x)));
        if !ok {
            return Err(sc.fail(&format!(
                "node {node}: expected NeedsAttention ({reason}) whose message says {says:?}, seen {c:?}"
            )));
        }
        if !sc.fleet.sim(node).sysfs.journal().is_empty() {
            return Err(sc.fail(&format!(
                "node {node}: nothing may be written for a method unwedge cannot carry out, seen {:?}",
                sc.fleet.sim(node).sysfs.journal()
            )));
        }
    }
    let w = sc.only_wedge(a)?;
    let mode = w.spec.uevent.get(UEVENT_SURVIVABILITY_MODE);
    if mode.map(String::as_str) != Some("Runtime") {
        return Err(sc.fail(&format!(
            "wedge of {a}: expected spec.uevent.{UEVENT_SURVIVABILITY_MODE}=Runtime from sysfs, seen {mode:?}"
        )));
    }
    sc.check_invariants()
}

/// A device whose driver is gone when the agent looks: the agent says so, the operator plans
/// the reboot rung only (no rebind or bus-reset walk), the harness reboots the host, and the
/// wedge recovers with one attempt; sysfs saw no unbind or bind.
async fn no_driver(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let a = "nodriver-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "nodriver",
        vec![NodeSpec::new(a, 1, "xe")],
        1,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario nodriver: setup: {x:#}"))?;
    let g = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    sc.fleet.sim(a).sysfs.drop_driver_link(&g);
    sc.inject(bins, a, &g, "rebind,bus-reset").await?;
    sc.wait_reboot_request(a, "its device has no driver bound", PHASE_WAIT)
        .await?;
    let w = sc.only_wedge(a)?;
    let msg = w
        .status
        .as_ref()
        .and_then(|s| s.agent_message.clone())
        .unwrap_or_default();
    if !msg.contains("no driver bound") {
        return Err(sc.fail(&format!(
            "the agent message should say no driver was bound, seen {msg:?}"
        )));
    }
    sc.fleet
        .sim(a)
        .sysfs
        .power_cycle()
        .map_err(sc.ctx("power cycle"))?;
    sc.fleet.node(a).reboot(bins).map_err(sc.ctx("reboot"))?;
    let w = sc.wait_phase(a, Phase::Recovered).await?;
    let want = vec![("reboot".to_string(), AttemptOutcome::Succeeded)];
    if attempt_seq(&w) != want {
        return Err(sc.fail(&format!(
            "attempts expected {want:?} (no ladder walk), seen {:?}",
            attempt_seq(&w)
        )));
    }
    let s = &sc.fleet.sim(a).sysfs;
    if s.count("unbind", &g) + s.count("bind", &g) != 0 {
        return Err(sc.fail(&format!(
            "no unbind or bind expected for a driverless device, seen {:?}",
            s.journal()
        )));
    }
    sc.uncordoned(a)?;
    sc.check_invariants()
}

/// An agent started with `--dry-run`: its wedge says so (status.agentDryRun), the operator
/// records what it would do (DryRun condition) and takes nothing — no budget place, no cordon,
/// no eviction, no approval — and sysfs sees no write.
async fn agent_dry_run(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let a = "dryrun-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "dryrun",
        vec![NodeSpec::new(a, 1, "xe")],
        1,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario dryrun: setup: {x:#}"))?;
    let node = sc.fleet.node(a);
    node.kill_agent();
    node.set_agent_args(vec!["--dry-run".into()]);
    node.start_agent(bins)
        .map_err(|x| format!("restart the agent with --dry-run: {x:#}"))?;
    node.wait_agent_ready(Duration::from_secs(60))
        .await
        .map_err(|x| format!("the dry-run agent: {x:#}"))?;
    let g = sc.fleet.sim(a).sysfs.gpus()[0].bdf.clone();
    sc.pod(NS, "dryrun-w", a, 1, Some(&g))
        .await
        .map_err(sc.ctx("pod dryrun-w"))?;
    sc.inject(bins, a, &g, "rebind,bus-reset").await?;
    sc.rec
        .wait_node_wedges(
            a,
            "a wedge marked agentDryRun with a DryRun condition",
            PHASE_WAIT,
            |ws| {
                ws.iter().any(|w| {
                    w.status.as_ref().and_then(|s| s.agent_dry_run) == Some(true)
                        && condition(w, "DryRun").is_some_and(|c| c.status == "True")
                })
            },
        )
        .await
        .map_err(|x| sc.fail(&x))?;
    tokio::time::sleep(e2e::scenario_ops::HOLD).await;
    let w = sc.only_wedge(a)?;
    let st = w.status.clone().unwrap_or_default();
    let held = ledger(&sc, "dryrun").await?;
    let msg = condition(&w, "DryRun")
        .map(|c| c.message)
        .unwrap_or_default();
    if st.approval.is_some()
        || sc.rec.node_cordoned(a) == Some(true)
        || !held.is_empty()
        || !sc.pod_exists(NS, "dryrun-w").await.unwrap_or(false)
        || !sc.fleet.sim(a).sysfs.journal().is_empty()
        || !msg.contains("would")
    {
        return Err(sc.fail(&format!(
            "dry run: expected no approval, no cordon, no place, the pod kept, no sysfs write and a DryRun message saying what would be done; seen approval {:?}, cordoned {:?}, ledger {held:?}, pod kept {:?}, journal {:?}, message {msg:?}",
            st.approval,
            sc.rec.node_cordoned(a),
            sc.pod_exists(NS, "dryrun-w").await,
            sc.fleet.sim(a).sysfs.journal()
        )));
    }
    sc.check_invariants()
}

/// Queue order is the API server's: node `a`'s wedge holds the only place, `b`'s waits, then a
/// hand-made wedge of `c` claims to be from the year 2000. When `a`'s wedge is deleted the place
/// goes to `b`, which arrived first, not to the wedge with the oldest `detectedAt`.
async fn queue_order(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (a, b, c) = ("queue-a", "queue-b", "queue-c");
    let mut sc = Scenario::new(
        cp,
        bins,
        "queue",
        vec![
            NodeSpec::new(a, 1, "xe"),
            NodeSpec::new(b, 1, "xe"),
            NodeSpec::new(c, 1, "xe"),
        ],
        1,
        json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario queue: setup: {x:#}"))?;
    let held = one_held_one_queued(&mut sc, bins, (a, b)).await?;
    let gc = sc.fleet.sim(c).sysfs.gpus()[0].clone();
    let dev = DeviceRef {
        pci_address: gc.bdf.clone(),
        card: Some(gc.card_name()),
        driver: "xe".into(),
        ..DeviceRef::default()
    };
    let old = jiff::Timestamp::from_second(946_684_800).map_err(|e| e.to_string())?;
    let dated = hand_made(&sc, c, dev, old, 903).await?;
    wedge_in(&sc, &dated, Phase::Queued).await?;
    Api::<GpuWedge>::all(sc.fleet.client())
        .delete(&held, &DeleteParams::default())
        .await
        .map_err(sc.ctx(&format!("delete {held}")))?;
    let wb = sc
        .rec
        .wait_node_wedges(b, "node b's wedge admitted", RELEASE_WAIT, |ws| {
            ws.iter().any(|w| {
                w.status
                    .as_ref()
                    .and_then(|s| s.admitted_at.as_ref())
                    .is_some()
            })
        })
        .await;
    wb.map_err(|x| sc.fail(&x))?;
    let wc = Api::<GpuWedge>::all(sc.fleet.client())
        .get(&dated)
        .await
        .map_err(sc.ctx("get"))?;
    if wc
        .status
        .as_ref()
        .and_then(|s| s.admitted_at.as_ref())
        .is_some()
    {
        return Err(sc.fail(&format!("{dated} (detectedAt 2000-01-01, created last) was admitted before or with node {b}'s wedge")));
    }
    sc.wait_phase(b, Phase::Recovered).await?;
    sc.check_invariants()
}

/// The policy's circuit breaker state, read fresh: (tripped, CircuitBreakerTripped condition).
async fn breaker_tripped(sc: &Scenario) -> Result<bool, String> {
    let p = Api::<RecoveryPolicy>::all(sc.fleet.client())
        .get(&sc.name)
        .await
        .map_err(sc.ctx("get policy"))?;
    Ok(p.status
        .and_then(|s| s.circuit_breaker_tripped_at)
        .is_some())
}

/// The breaker counts wedges by the API server's clock: three hand-made wedges dated 20 s in
/// the future trip it at once (they arrived now), and once a human resumes, the same wedges
/// never trip it again — not even when the time they claim comes (with agent-written dates they
/// would, after every resume). A real wedge on a fourth node then recovers.
async fn breaker_clock(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let nodes = ["brkclock-a", "brkclock-b", "brkclock-c", "brkclock-d"];
    let sc = Scenario::new(
        cp,
        bins,
        "brkclock",
        nodes.iter().map(|n| NodeSpec::new(n, 1, "xe")).collect(),
        4,
        json!({"circuitBreaker": {"count": 2, "window": "1h"}}),
        2,
    )
    .await
    .map_err(|x| format!("scenario brkclock: setup: {x:#}"))?;
    let future = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(20);
    for (i, n) in nodes.iter().take(3).enumerate() {
        let g = sc.fleet.sim(n).sysfs.gpus()[0].clone();
        let dev = DeviceRef {
            pci_address: g.bdf.clone(),
            card: Some(g.card_name()),
            driver: "xe".into(),
            ..DeviceRef::default()
        };
        hand_made(&sc, n, dev, future, 910 + i as u64).await?;
    }
    eventually(
        &sc,
        "the breaker tripped by three wedges that arrived now",
        || async { Ok((!breaker_tripped(&sc).await?).then(|| "not tripped".to_string())) },
    )
    .await?;
    Api::<RecoveryPolicy>::all(sc.fleet.client())
        .patch(
            &sc.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"unwedge.io/resume": "checked"}}})),
        )
        .await
        .map_err(sc.ctx("resume"))?;
    eventually(&sc, "the breaker resumed", || async {
        Ok(breaker_tripped(&sc)
            .await?
            .then(|| "still tripped".to_string()))
    })
    .await?;
    // Past the time the hand-made wedges claim, plus a refresh.
    tokio::time::sleep(Duration::from_secs(25)).await;
    if breaker_tripped(&sc).await? {
        return Err(
            sc.fail("the breaker tripped again after the resume, from wedges dated in the future")
        );
    }
    let d = nodes[3];
    let gd = sc.fleet.sim(d).sysfs.gpus()[0].bdf.clone();
    sc.inject(bins, d, &gd, "rebind,bus-reset").await?;
    sc.wait_phase(d, Phase::Recovered).await?;
    sc.rebinds(d, &gd, 1)?;
    sc.check_invariants()
}

/// The receive buffer the overrun scenario asks for: the kernel doubles it to 8 KiB, a handful
/// of uevents. The default (16 MiB) holds a 10,000-uevent flood (`netlink_kernel.rs`).
const SMALL_UEVENT_BUFFER: &str = "4096";
/// Irrelevant uevents sent while the agent is stopped: far more than 8 KiB holds.
const OVERRUN_FLOOD: &str = "2000";

/// The value of an unlabelled counter in the agent's `/metrics` text, if present.
fn counter(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// The agent's `/metrics`, read inside the node's network namespace.
async fn agent_metrics(sc: &Scenario, node: &str) -> Result<String, String> {
    let (code, body) = sc
        .fleet
        .sim(node)
        .netns
        .http_get(9101, "/metrics")
        .await
        .map_err(sc.ctx("GET /metrics"))?;
    if code != 200 {
        return Err(sc.fail(&format!("GET /metrics answered {code}")));
    }
    Ok(body)
}

/// Sends `sig` to the agent process of `node` (checked to be the agent, not a wrapper).
fn signal_agent(sc: &mut Scenario, node: &str, sig: libc::c_int) -> Outcome {
    let pid = sc
        .fleet
        .node(node)
        .agent_pid()
        .ok_or_else(|| format!("the agent of {node} is not running"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "unwedge-agent" {
        return Err(format!(
            "pid {pid} of {node}'s agent is {comm:?}, not unwedge-agent"
        ));
    }
    let pid = libc::pid_t::try_from(pid).map_err(|e| e.to_string())?;
    // SAFETY: kill with a pid we spawned and a valid signal number.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(format!(
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Lost uevents are visible and the agent recovers what sysfs can tell (docs/lifecycle.md,
/// "When uevents are lost"). The agent, with a tiny receive buffer, is stopped (SIGSTOP); while
/// it cannot read, one GPU loses its driver, one enters xe survivability mode, and a flood of
/// uevents through the kernel overruns its socket. After SIGCONT: the Node has a Warning Event
/// `GpuUeventsLost` whose note names the unbound GPU, the survivability GPU and the bound GPU
/// it cannot vouch for; `/metrics` counts the loss; the survivability GPU is reported as a
/// `vendor-specific` GpuWedge; the unbound GPU is not turned into a wedge; and a WEDGED uevent
/// sent afterwards still becomes its GpuWedge. No operator runs: this is the agent's part.
async fn overrun(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let a = "overrun-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "overrun",
        vec![NodeSpec::new(a, 3, "xe")],
        1,
        json!({}),
        0,
    )
    .await
    .map_err(|x| format!("scenario overrun: setup: {x:#}"))?;
    {
        let n = sc.fleet.node(a);
        n.kill_agent();
        n.set_agent_args(vec![
            "--uevent-buffer-bytes".into(),
            SMALL_UEVENT_BUFFER.into(),
        ]);
        n.start_agent(bins)
            .map_err(|e| format!("restart agent: {e:#}"))?;
        n.wait_agent_ready(Duration::from_secs(30))
            .await
            .map_err(|e| format!("agent ready: {e:#}"))?;
    }
    let log = sc.fleet.sim(a).agent_log();
    eventually(&sc, "the agent's start-up reconciliation", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok((!text.contains("reconciliation done")).then(|| "not yet in the agent log".into()))
    })
    .await?;
    let lost = "unwedge_agent_uevents_lost_total";
    let before = counter(&agent_metrics(&sc, a).await?, lost);
    if before != Some(0.0) {
        return Err(sc.fail(&format!("{lost} before the overrun: {before:?}")));
    }
    let gpus: Vec<String> = sc
        .fleet
        .sim(a)
        .sysfs
        .gpus()
        .iter()
        .map(|g| g.bdf.clone())
        .collect();
    let (bound, unbound, survivor) = (&gpus[0], &gpus[1], &gpus[2]);

    signal_agent(&mut sc, a, libc::SIGSTOP)?;
    let sim = sc.fleet.sim(a);
    sim.sysfs.drop_driver_link(unbound);
    let g = sim.sysfs.gpu(survivor).expect("the node's GPU");
    let mode = sim
        .sysfs
        .sys_root()
        .join(&g.devpath()[1..])
        .join("survivability_mode");
    std::fs::write(&mode, "Runtime\n").map_err(sc.ctx("write survivability_mode"))?;
    let flood = sim
        .inject_raw_args(bins, &["--flood".into(), OVERRUN_FLOOD.into()])
        .await
        .map_err(|e| format!("flood: {e:#}"));
    signal_agent(&mut sc, a, libc::SIGCONT)?;
    flood?;

    let mut note = String::new();
    eventually(
        &sc,
        "a Warning Event GpuUeventsLost on the Node",
        || async {
            let evs = sc.events(a, "GpuUeventsLost").await?;
            Ok(
                match evs.iter().find(|e| e.type_.as_deref() == Some("Warning")) {
                    Some(_) => None,
                    None => Some(format!("{} such Events", evs.len())),
                },
            )
        },
    )
    .await?;
    for e in sc.events(a, "GpuUeventsLost").await? {
        if e.involved_object.kind.as_deref() == Some("Node") {
            note = e.message.unwrap_or_default();
        }
    }
    for want in [
        format!("{unbound} has no driver bound"),
        format!("{survivor} is in survivability mode Runtime"),
        format!("if a workload on {bound} fails"),
    ] {
        if !note.contains(&want) {
            return Err(sc.fail(&format!(
                "the GpuUeventsLost note does not say {want:?}: {note:?}"
            )));
        }
    }
    let metrics = agent_metrics(&sc, a).await?;
    let seen = counter(&metrics, lost).unwrap_or(0.0);
    let unbound_found = metrics
        .lines()
        .any(|l| l.starts_with("unwedge_agent_startup_findings_total{kind=\"unbound-driver\"}"));
    if seen < 1.0 || !unbound_found {
        return Err(sc.fail(&format!(
            "/metrics after the overrun: {lost} {seen}, unbound-driver finding counted {unbound_found}"
        )));
    }
    let w = sc
        .rec
        .wait_node_wedges(a, "the survivability GPU reported", PHASE_WAIT, |ws| {
            ws.iter().any(|w| {
                w.spec.device.pci_address == *survivor && w.spec.methods == ["vendor-specific"]
            })
        })
        .await;
    w.map_err(|x| sc.fail(&x))?;

    sc.inject(bins, a, bound, "rebind,bus-reset").await?;
    let w = sc
        .rec
        .wait_node_wedges(a, "the WEDGED uevent after the overrun", PHASE_WAIT, |ws| {
            ws.iter().any(|w| {
                w.spec.device.pci_address == *bound && w.spec.methods == ["rebind", "bus-reset"]
            })
        })
        .await;
    w.map_err(|x| sc.fail(&x))?;
    let ws = sc.rec.wedges_of(a);
    if ws.iter().any(|w| w.spec.device.pci_address == *unbound) || ws.len() != 2 {
        return Err(sc.fail(&format!(
            "expected exactly the two wedges of {survivor} and {bound} (an unbound GPU is not a wedge), seen {:?}",
            ws.iter()
                .map(|w| (&w.spec.device.pci_address, &w.spec.methods))
                .collect::<Vec<_>>()
        )));
    }
    if !sc.fleet.sim(a).sysfs.journal().is_empty() {
        return Err(sc.fail("a device was written with no operator running"));
    }
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
    if run.wants("forged") {
        let r = forged(&cp, &bins).await;
        run.record(
            "hand-made GpuWedges are refused by the agent, nothing written",
            r,
        );
    }
    if run.wants("nodriver") {
        let r = no_driver(&cp, &bins).await;
        run.record("a device with no driver goes to the reboot rung at once", r);
    }
    if run.wants("dryrun") {
        let r = agent_dry_run(&cp, &bins).await;
        run.record("an agent in dry run: nothing disrupted", r);
    }
    if run.wants("queue") {
        let r = queue_order(&cp, &bins).await;
        run.record("queue order by the API server's clock, not detectedAt", r);
    }
    if run.wants("brkclock") {
        let r = breaker_clock(&cp, &bins).await;
        run.record("the breaker counts by the API server's clock", r);
    }
    if run.wants("vendor") {
        let r = human_methods(&cp, &bins).await;
        run.record(
            "vendor-specific (xe survivability) and a disallowed cold-reset say what a human must do",
            r,
        );
    }
    if run.wants("overrun") {
        let r = overrun(&cp, &bins).await;
        run.record(
            "a uevent overrun raises the alarm, the rescan reports, the agent keeps hearing",
            r,
        );
    }
    run.finish();
}
