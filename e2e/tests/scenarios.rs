//! End-to-end scenarios on the real local control plane (docs/design.md §7.3): real `unwedge-agent`
//! processes over journaled fake sysfs trees, each in its own network namespace fed through the
//! kernel, and two real `unwedge-operator` processes with leader election. One control plane
//! runs the scenarios one after the other; every scenario asserts its outcome and invariants
//! 1–3 (recorder + sysfs journal), and all failures are reported together.
//!
//! Needs root (network namespaces, cgroup v1). Build the binaries under test first (a test
//! cannot run cargo while cargo holds the lock), then run:
//! `cargo build -p unwedge-agent -p unwedge-operator -p uevent-inject && cargo test -p e2e --test
//! scenarios -- --nocapture`. `UNWEDGE_SCENARIOS=happy,storm,…` runs a subset (happy, xgmi,
//! storm, att, flood, killed, none, inplace, nonerebind, esc, outbox); `UNWEDGE_STORM_NODES` sizes the storm (default 30).

use std::time::Duration;

use e2e::cluster::ControlPlane;
use e2e::fakesysfs::Gpu;
use e2e::fleet::{Bins, Holder, NodeSpec, PodProcess, Scenario};
use e2e::scenario_ops::{PHASE_WAIT, binaries_and_plane};
use e2e::wedge_view::{Outcome, Runner, attempt_seq, evicted, phase};
use unwedge_crds::gpuwedge::{AttemptOutcome, GpuWedge, Phase};

const NS: &str = "workloads";

/// rebind happy path: the kernel says `rebind,bus-reset`; the consumer of the wedged GPU (and
/// only it) is evicted (not restarted in place, though the policy restarts `none` consumers in
/// place), the node cordoned, rebind approved as attempt 1, exactly one unbind and
/// one bind reach sysfs, the node is uncordoned and the wedge Recovered.
async fn rebind_happy_path(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "happy-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "happy",
        vec![NodeSpec::new(node, 2, "xe")],
        1,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario happy: setup: {x:#}"))?;
    let g0 = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    let g1 = sc.fleet.sim(node).sysfs.gpus()[1].bdf.clone();
    sc.pod(NS, "happy-w0", node, 1, Some(&g0))
        .await
        .map_err(sc.ctx("pod happy-w0"))?;
    sc.pod(NS, "happy-w1", node, 1, Some(&g1))
        .await
        .map_err(sc.ctx("pod happy-w1"))?;
    sc.inject(bins, node, &g0, "rebind,bus-reset").await?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let name = w.metadata.name.clone().unwrap_or_default();
    let st = w.status.clone().unwrap_or_default();
    if evicted(&w) != vec![format!("{NS}/happy-w0")] {
        return Err(sc.fail(&format!(
            "wedge {name}: evictions expected [{NS}/happy-w0] (device-scoped drain), seen {:?}",
            evicted(&w)
        )));
    }
    if !sc.pod_exists(NS, "happy-w1").await.unwrap_or(false) {
        return Err(
            sc.fail("pod happy-w1 (on the healthy GPU) expected to keep running, seen gone")
        );
    }
    let appr = st.approval.clone();
    if appr.as_ref().map(|a| (a.method.as_str(), a.attempt)) != Some(("rebind", 1)) {
        return Err(sc.fail(&format!(
            "wedge {name}: approval expected rebind#1, seen {appr:?}"
        )));
    }
    let attempts = st.attempts.clone().unwrap_or_default();
    if !attempts.iter().any(|a| {
        a.attempt == 1 && a.result == AttemptOutcome::Succeeded && a.advertised == Some(true)
    }) {
        return Err(sc.fail(&format!(
            "wedge {name}: attempt 1 expected Succeeded with the device advertised again by the node's PodResources server, seen {attempts:?}"
        )));
    }
    let s = &sc.fleet.sim(node).sysfs;
    let counts = (
        s.count("unbind", &g0),
        s.count("bind", &g0),
        s.count("reset", &g0),
        s.journal().iter().filter(|w| w.bdf == g1).count(),
    );
    if counts != (1, 1, 0, 0) {
        return Err(sc.fail(&format!(
            "sysfs journal on {node}: expected (unbind {g0}, bind {g0}, reset {g0}, writes for {g1}) = (1, 1, 0, 0), seen {counts:?}"
        )));
    }
    if !s.is_bound(&g0) {
        return Err(sc.fail(&format!(
            "device {g0} expected bound after recovery, seen unbound"
        )));
    }
    // The policy restarts `none` consumers in place (the default), yet a rebind's consumer is
    // evicted, never stopped through the runtime: the kubelet would start it again at once and
    // it would reopen the device mid-unbind (docs/design.md §4). The pod is gone and the
    // runtime saw no stop at all.
    let stops = sc.fleet.sim(node).podres.runtime().stops();
    if !stops.is_empty() || sc.pod_exists(NS, "happy-w0").await.unwrap_or(true) {
        return Err(sc.fail(&format!(
            "a rebind's consumer must be evicted, not restarted in place: runtime stops {stops:?}, happy-w0 still there: {}",
            sc.pod_exists(NS, "happy-w0").await.unwrap_or(true)
        )));
    }
    sc.uncordoned(node)?;
    sc.check_invariants()
}

/// Agent killed between approval and action: a host process holds the card, so the agent has
/// journaled attempt 1 and reports it Blocked by the fd gate, but has not touched the device. It
/// is killed (SIGKILL), the holder goes, the agent restarts: its journal says the attempt never
/// reached the device, so it gates again and acts once. The independent sysfs journal proves
/// exactly one unbind and one bind, all written by the restarted agent.
async fn agent_killed_between_approval_and_action(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "killed-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "killed",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario killed: setup: {x:#}"))?;
    let g0 = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    let card = sc.fleet.sim(node).sysfs.card_path(&g0).expect("gpu 0");
    let holder = Holder::open(&card).map_err(sc.ctx("hold the card"))?;
    sc.inject(bins, node, &g0, "rebind,bus-reset").await?;
    sc.rec
        .wait_node_wedges(
            node,
            "attempt 1 Blocked by the fd gate (a host process holds the card)",
            PHASE_WAIT,
            |ws| {
                ws.iter().any(|w| {
                    w.status
                        .as_ref()
                        .and_then(|s| s.attempts.as_ref())
                        .is_some_and(|a| {
                            a.iter()
                                .any(|a| a.attempt == 1 && a.result == AttemptOutcome::Blocked)
                        })
                })
            },
        )
        .await
        .map_err(|x| sc.fail(&x))?;
    sc.fleet.node(node).kill_agent();
    let killed_at = std::time::SystemTime::now();
    let before = sc.fleet.sim(node).sysfs.journal();
    if !before.is_empty() {
        return Err(sc.fail(&format!(
            "the fd gate was holding: expected no sysfs writes before the kill, seen {before:?}"
        )));
    }
    holder.release();
    sc.fleet
        .node(node)
        .start_agent(bins)
        .map_err(sc.ctx("restart the agent"))?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let name = w.metadata.name.clone().unwrap_or_default();
    let attempts = w
        .status
        .clone()
        .unwrap_or_default()
        .attempts
        .unwrap_or_default();
    let seen: Vec<(u32, String, AttemptOutcome)> = attempts
        .iter()
        .map(|a| (a.attempt, a.method.clone(), a.result))
        .collect();
    if seen != vec![(1, "rebind".to_string(), AttemptOutcome::Succeeded)] {
        return Err(sc.fail(&format!(
            "wedge {name}: attempts expected [(1, rebind, Succeeded)] (the interrupted attempt resumed at the gate, executed once), seen {seen:?}"
        )));
    }
    let s = &sc.fleet.sim(node).sysfs;
    let counts = (s.count("unbind", &g0), s.count("bind", &g0));
    if counts != (1, 1) {
        return Err(sc.fail(&format!(
            "sysfs journal on {node}: expected exactly (unbind, bind) of {g0} = (1, 1), seen {counts:?}: {:?}",
            s.journal()
        )));
    }
    if let Some(early) = s.journal().iter().find(|w| w.at < killed_at) {
        return Err(sc.fail(&format!(
            "sysfs write {early:?} reached the device before the agent was killed (the gate was holding)"
        )));
    }
    sc.check_invariants()
}

/// API server down when the wedge happens: the agent keeps it in its outbox on the host and
/// reports it once the API server is back; nothing is lost and nothing duplicated. The agent
/// is also restarted while the API is still down, so what it reports is the entry stored on
/// disk, which it enriches again when replaying: the pod on the GPU is still known and evicted.
async fn api_down_outbox(cp: &mut ControlPlane, bins: &Bins) -> Outcome {
    let node = "outbox-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "outbox",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario outbox: setup: {x:#}"))?;
    let g0 = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    sc.pod(NS, "outbox-w0", node, 1, Some(&g0))
        .await
        .map_err(sc.ctx("pod outbox-w0"))?;
    cp.stop_apiserver().await;
    let injected = sc
        .fleet
        .sim(node)
        .inject(bins, &g0, "rebind,bus-reset", &[])
        .await;
    // The outbox is durable state on the host: the wedge must be there while the API is down.
    // The agent is killed only once the entry is committed; a crash before that loses the
    // uevent (the kernel sends it once), which no test can ask the agent to survive.
    let state = sc.fleet.sim(node).state_dir();
    let mut in_outbox = false;
    for _ in 0..100 {
        in_outbox = outbox_holds(&state, &g0);
        if in_outbox {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sc.fleet.node(node).kill_agent();
    let agent_back = sc.fleet.node(node).start_agent(bins);
    let restarted = cp.start_apiserver().await;
    injected.map_err(sc.ctx("inject"))?;
    agent_back.map_err(sc.ctx("restart the agent"))?;
    restarted.map_err(sc.ctx("restart kube-apiserver"))?;
    if !in_outbox {
        return Err(sc.fail(&format!(
            "API down: expected the wedge of {g0} in the agent's outbox under {}, found nothing",
            state.display()
        )));
    }
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let all = sc.rec.wedges_of(node);
    if all.len() != 1 {
        return Err(sc.fail(&format!(
            "expected exactly 1 GpuWedge for {node}/{g0} after the replay, seen {}",
            all.len()
        )));
    }
    if evicted(&w) != vec![format!("{NS}/outbox-w0")] {
        return Err(sc.fail(&format!(
            "the wedge replayed after the agent restart: expected the pod on {g0} ({NS}/outbox-w0) evicted, seen {:?}",
            evicted(&w)
        )));
    }
    sc.check_invariants()
}

/// XGMI hive: on `xgmi-a` GPUs 0 and 1 form an amdgpu XGMI hive, GPU 2 stands alone; each
/// has a pod. The kernel signals GPU 0 only, but a reset of any hive member resets the hive, so
/// the agent reports GPU 1 in the reset domain and the operator drains the consumers of both:
/// `xgmi-0` and `xgmi-1` are evicted, `xgmi-2` keeps running; GPU 0 is rebound once.
async fn xgmi_hive(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "xgmi-a";
    let mut spec = NodeSpec::new(node, 3, "amdgpu");
    for g in spec.gpus.iter_mut().take(2) {
        g.hive = Some(0x4a4a_0001);
    }
    let mut sc = Scenario::new(cp, bins, "xgmi", vec![spec], 1, serde_json::json!({}), 2)
        .await
        .map_err(|x| format!("scenario xgmi: setup: {x:#}"))?;
    let gpus: Vec<Gpu> = sc.fleet.sim(node).sysfs.gpus().to_vec();
    for (i, g) in gpus.iter().enumerate() {
        sc.pod(NS, &format!("xgmi-{i}"), node, 1, Some(&g.bdf))
            .await
            .map_err(sc.ctx(&format!("pod xgmi-{i}")))?;
    }
    sc.inject(bins, node, &gpus[0].bdf, "rebind,bus-reset")
        .await?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let domain: Vec<String> = w
        .status
        .as_ref()
        .and_then(|s| s.reset_domain.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.pci_address)
        .collect();
    if !domain.contains(&gpus[1].bdf) || domain.contains(&gpus[2].bdf) {
        return Err(sc.fail(&format!(
            "status.resetDomain expected to hold hive member {} and not {}, seen {domain:?}",
            gpus[1].bdf, gpus[2].bdf
        )));
    }
    let want = [format!("{NS}/xgmi-0"), format!("{NS}/xgmi-1")];
    if evicted(&w) != want {
        return Err(sc.fail(&format!(
            "evictions expected {want:?} (the consumers of both hive GPUs), seen {:?}",
            evicted(&w)
        )));
    }
    if !sc
        .pod_exists(NS, "xgmi-2")
        .await
        .map_err(sc.ctx("get pod"))?
    {
        return Err(sc.fail("xgmi-2, on the GPU outside the hive, was evicted"));
    }
    sc.rebinds(node, &gpus[0].bdf, 1)?;
    sc.check_invariants()
}

/// A `rebind` arriving during an open `none` incident is not lost: the driver blames a task of
/// `nr-blamed` (policy none.action EvictBlamed), whose eviction a PDB refuses, so the `none`
/// incident stays open; then the kernel sends `WEDGED=rebind,bus-reset` for the same device.
/// The agent adds it to the open incident's events, the operator re-plans from it (methods
/// `rebind,bus-reset`), cordons, and once the PDB is relaxed drains and rebinds: one GpuWedge,
/// one rebind, the node cordoned during and uncordoned after.
async fn rebind_during_open_none(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "nr-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "nr",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        serde_json::json!({"none": {"action": "EvictBlamed", "restart": "Evict"}}),
        2,
    )
    .await
    .map_err(|x| format!("scenario nr: setup: {x:#}"))?;
    let g = sc.fleet.sim(node).sysfs.gpus()[0].bdf.clone();
    let pod = sc
        .pod(NS, "nr-blamed", node, 1, Some(&g))
        .await
        .map_err(sc.ctx("pod"))?;
    sc.pdb_blocking(NS, "nr-guard", &["nr-blamed"]).await?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let task = PodProcess::start(&uid, &format!("{:064x}", 0x6e72)).map_err(sc.ctx("task"))?;
    let pid_args = ["--pid".to_string(), task.pid().to_string()];
    sc.fleet
        .sim(node)
        .inject(bins, &g, "none", &pid_args)
        .await
        .map_err(sc.ctx("inject none"))?;
    let w = sc.wait_phase(node, Phase::Restarting).await?;
    let name = w.metadata.name.clone().unwrap_or_default();
    sc.wait_event(
        &name,
        "EvictionRefused",
        "the PDB refuses the eviction of nr-blamed",
    )
    .await?;
    sc.inject(bins, node, &g, "rebind,bus-reset").await?;
    sc.rec
        .wait_node_wedges(
            node,
            "the open incident re-planned from rebind,bus-reset",
            PHASE_WAIT,
            |ws| {
                ws.iter().any(|w| {
                    w.status.as_ref().and_then(|s| s.methods.as_deref()) == Some("rebind,bus-reset")
                })
            },
        )
        .await
        .map_err(|x| sc.fail(&x))?;
    sc.pdb_relax(NS, "nr-guard").await?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let events = w
        .status
        .as_ref()
        .and_then(|s| s.events.clone())
        .unwrap_or_default();
    let wedges = sc.rec.wedges_of(node).len();
    let seq = attempt_seq(&w);
    if wedges != 1
        || w.metadata.name.as_deref() != Some(name.as_str())
        || events.is_empty()
        || seq != vec![("rebind".to_string(), AttemptOutcome::Succeeded)]
    {
        return Err(sc.fail(&format!(
            "expected one GpuWedge ({name}) holding the later event and one successful rebind; seen {wedges} wedge(s), {:?} Recovered, events {events:?}, attempts {seq:?}",
            w.metadata.name
        )));
    }
    if evicted(&w) != [format!("{NS}/nr-blamed")] {
        return Err(sc.fail(&format!(
            "evictions expected [{NS}/nr-blamed], seen {:?}",
            evicted(&w)
        )));
    }
    sc.rebinds(node, &g, 1)?;
    let cordoned = sc
        .rec
        .timeline()
        .iter()
        .any(|l| l.contains(&format!("node {node}: cordoned")));
    if !cordoned || sc.rec.node_cordoned(node) != Some(false) {
        return Err(sc.fail(&format!(
            "node {node}: expected cordoned for the rebind and uncordoned after, seen cordoned-ever {cordoned}, now {:?}",
            sc.rec.node_cordoned(node)
        )));
    }
    sc.check_invariants()
}

/// Whether `<state>/outbox` holds a committed entry (`*.json`, not the `.json.tmp` being
/// written) that names `needle`. Only a renamed entry survives a crash: the agent removes
/// leftover temp files when it starts.
fn outbox_holds(state: &std::path::Path, needle: &str) -> bool {
    std::fs::read_dir(state.join("outbox"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let p = e.path();
            p.extension().is_some_and(|x| x == "json")
                && std::fs::read(&p).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle))
        })
}

/// `none` with each none.action, restarting by eviction (`none.restart: Evict`): two pods share
/// the device (pinned), the driver blames a PID placed in a kubepods cgroup of the first.
/// EvictBlamed evicts exactly that pod, EvictConsumers both, Ignore none; the node is never
/// cordoned and sysfs never written.
async fn none_actions(cp: &ControlPlane, bins: &Bins) -> Outcome {
    for (i, action) in ["EvictBlamed", "EvictConsumers", "Ignore"]
        .iter()
        .enumerate()
    {
        let sname = format!("none{i}");
        let node = format!("none{i}-a");
        let mut sc = Scenario::new(
            cp,
            bins,
            &sname,
            vec![NodeSpec::new(&node, 2, "amdgpu")],
            1,
            serde_json::json!({"none": {"action": action, "restart": "Evict"}}),
            2,
        )
        .await
        .map_err(|x| format!("scenario {sname}: setup: {x:#}"))?;
        let g0 = sc.fleet.sim(&node).sysfs.gpus()[0].bdf.clone();
        let a = sc
            .pod(NS, &format!("{sname}-blamed"), &node, 1, Some(&g0))
            .await
            .map_err(sc.ctx("pod blamed"))?;
        sc.pod(NS, &format!("{sname}-innocent"), &node, 1, Some(&g0))
            .await
            .map_err(sc.ctx("pod innocent"))?;
        let uid = a.metadata.uid.clone().unwrap_or_default();
        let task = PodProcess::start(&uid, &format!("{:064x}", i + 1))
            .map_err(sc.ctx("blamed process"))?;
        sc.fleet
            .sim(&node)
            .inject(
                bins,
                &g0,
                "none",
                &[
                    "--pid".into(),
                    task.pid().to_string(),
                    "--task".into(),
                    "trainer".into(),
                ],
            )
            .await
            .map_err(sc.ctx("inject"))?;
        let expected: Vec<String> = match *action {
            "EvictBlamed" => vec![format!("{NS}/{sname}-blamed")],
            "EvictConsumers" => vec![
                format!("{NS}/{sname}-blamed"),
                format!("{NS}/{sname}-innocent"),
            ],
            _ => vec![],
        };
        let w = sc.wait_phase(&node, Phase::Recovered).await?;
        if evicted(&w) != expected {
            return Err(sc.fail(&format!(
                "none.action {action}: evictions expected {expected:?}, seen {:?}",
                evicted(&w)
            )));
        }
        let blamed_pod = w
            .spec
            .blamed
            .as_ref()
            .and_then(|b| b.pod.as_ref())
            .map(|p| p.name.clone());
        if blamed_pod.as_deref() != Some(&format!("{sname}-blamed")) {
            return Err(sc.fail(&format!("spec.blamed.pod expected {sname}-blamed (PID {} in its cgroup), seen {blamed_pod:?}", task.pid())));
        }
        if sc
            .rec
            .timeline()
            .iter()
            .any(|l| l.contains(&format!("node {node}: cordoned")))
        {
            return Err(sc.fail(&format!("none must never cordon: node {node} was cordoned")));
        }
        if !sc.fleet.sim(&node).sysfs.journal().is_empty() {
            return Err(sc.fail("none must never touch the device: sysfs was written"));
        }
        sc.check_invariants()?;
    }
    Ok(())
}

/// `none` restarted in place, the default (docs/design.md §4 "none"), against the node's
/// stand-in container runtime (CRI over gRPC, restarting a stopped container as the kubelet
/// does). EvictBlamed: the driver blames a PID in the cgroup of `ip0-blamed`'s running
/// container; exactly that container is stopped and runs again in the same pod (same UID,
/// attempt 0 -> 1), the status records it, nothing is evicted, the node is never cordoned and
/// sysfs never written; an innocent pod on the same device keeps its container. Then
/// EvictConsumers on a device held by a restartPolicy Always pod and a restartPolicy Never pod:
/// the first restarts in place, the second is evicted with the reason recorded.
async fn none_in_place(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "ip-a";
    let mut sc = Scenario::new(
        cp,
        bins,
        "ip",
        vec![NodeSpec::new(node, 4, "amdgpu")],
        1,
        serde_json::json!({"none": {"action": "EvictBlamed"}}),
        2,
    )
    .await
    .map_err(|x| format!("scenario ip: setup: {x:#}"))?;
    let gpus: Vec<String> = sc
        .fleet
        .sim(node)
        .sysfs
        .gpus()
        .iter()
        .map(|g| g.bdf.clone())
        .collect();
    let blamed = sc
        .pod(NS, "ip-blamed", node, 1, Some(&gpus[0]))
        .await
        .map_err(sc.ctx("pod blamed"))?;
    let innocent = sc
        .pod(NS, "ip-innocent", node, 1, Some(&gpus[0]))
        .await
        .map_err(sc.ctx("pod innocent"))?;
    let uid = |p: &k8s_openapi::api::core::v1::Pod| p.metadata.uid.clone().unwrap_or_default();
    let running =
        |sc: &Scenario, uid: &str| sc.fleet.sim(node).podres.runtime().running(uid, "main");
    let (blamed_cid, _) = running(&sc, &uid(&blamed))
        .ok_or_else(|| sc.fail("no running container of ip-blamed in the runtime"))?;
    let (innocent_cid, _) = running(&sc, &uid(&innocent))
        .ok_or_else(|| sc.fail("no running container of ip-innocent in the runtime"))?;
    let task = PodProcess::start(&uid(&blamed), &blamed_cid).map_err(sc.ctx("blamed process"))?;
    sc.fleet
        .sim(node)
        .inject(
            bins,
            &gpus[0],
            "none",
            &["--pid".into(), task.pid().to_string()],
        )
        .await
        .map_err(sc.ctx("inject"))?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let seq = attempt_seq(&w);
    let restarts = w
        .status
        .as_ref()
        .and_then(|s| s.attempts.as_ref())
        .and_then(|a| a.first())
        .and_then(|a| a.restarts.clone())
        .unwrap_or_default();
    let stops = sc.fleet.sim(node).podres.runtime().stops();
    let now_running = running(&sc, &uid(&blamed));
    if seq != vec![("restart".to_string(), AttemptOutcome::Succeeded)]
        || restarts.len() != 1
        || restarts[0].pod != "ip-blamed"
        || restarts[0].container != "main"
        || (restarts[0].old_restart_count, restarts[0].new_restart_count) != (Some(0), Some(1))
        || restarts[0].millis_to_running.is_none()
        || stops != vec![blamed_cid.clone()]
        || now_running
            .as_ref()
            .is_none_or(|(id, n)| *id == blamed_cid || *n != 1)
    {
        return Err(sc.fail(&format!(
            "expected restart#1 Succeeded restarting ip-blamed/main 0 -> 1 and only its container stopped; attempts {seq:?}, restarts {restarts:?}, runtime stops {stops:?} (blamed {blamed_cid}, innocent {innocent_cid}), blamed now running {now_running:?}"
        )));
    }
    if !evicted(&w).is_empty()
        || !sc
            .pod_exists(NS, "ip-blamed")
            .await
            .map_err(sc.ctx("get"))?
        || !sc
            .pod_exists(NS, "ip-innocent")
            .await
            .map_err(sc.ctx("get"))?
    {
        return Err(sc.fail(&format!(
            "nothing may be evicted in place; evictions {:?}",
            evicted(&w)
        )));
    }
    if sc
        .rec
        .timeline()
        .iter()
        .any(|l| l.contains(&format!("node {node}: cordoned")))
        || !sc.fleet.sim(node).sysfs.journal().is_empty()
    {
        return Err(sc.fail("none must never cordon or write sysfs"));
    }

    // EvictConsumers on the second device: an Always and a Never pod hold it.
    sc.patch_policy(serde_json::json!({"spec": {"none": {"action": "EvictConsumers"}}}))
        .await
        .map_err(sc.ctx("policy"))?;
    let always = sc
        .pod(NS, "ip-always", node, 1, Some(&gpus[1]))
        .await
        .map_err(sc.ctx("pod always"))?;
    let mut never = e2e::fleet::gpu_pod(NS, "ip-never", node, 1, Some(&gpus[1]));
    never.spec.as_mut().expect("a spec").restart_policy = Some("Never".into());
    sc.pod_from(never, 1).await.map_err(sc.ctx("pod never"))?;
    let first = w.metadata.name.clone().unwrap_or_default();
    sc.inject(bins, node, &gpus[1], "none").await?;
    sc.rec
        .wait_node_wedges(node, "the second none wedge Recovered", PHASE_WAIT, |ws| {
            ws.iter().any(|w| {
                w.metadata.name.as_deref() != Some(first.as_str())
                    && phase(w) == Some(Phase::Recovered)
            })
        })
        .await
        .map_err(|x| sc.fail(&x))?;
    let w = sc
        .rec
        .wedges_of(node)
        .into_iter()
        .find(|w| w.metadata.name.as_deref() != Some(first.as_str()))
        .ok_or_else(|| sc.fail("the second wedge is gone"))?;
    let action = w
        .status
        .as_ref()
        .and_then(|s| s.action.clone())
        .unwrap_or_default();
    let restarted: Vec<String> = w
        .status
        .as_ref()
        .and_then(|s| s.attempts.as_ref())
        .and_then(|a| a.first())
        .and_then(|a| a.restarts.clone())
        .unwrap_or_default()
        .iter()
        .map(|r| format!("{}/{:?}", r.pod, r.result))
        .collect();
    if evicted(&w) != [format!("{NS}/ip-never")]
        || restarted != ["ip-always/Restarted"]
        || !action.contains("restartPolicy Never")
        || !sc
            .pod_exists(NS, "ip-always")
            .await
            .map_err(sc.ctx("get"))?
        || running(&sc, &uid(&always)).is_none_or(|(_, n)| n != 1)
    {
        return Err(sc.fail(&format!(
            "EvictConsumers in place: expected ip-always restarted in place and ip-never evicted (restartPolicy Never); evictions {:?}, restarts {restarted:?}, action {action:?}",
            evicted(&w)
        )));
    }
    sc.check_invariants()
}

/// Escalation, two nodes side by side under one policy (ladder rebind → bus-reset → reboot):
/// on `esc-bus` the first bind fails (the device stays unbound), so rebind fails verification
/// and bus-reset recovers it; on `esc-boot` the first two binds fail, so the reboot rung makes
/// the agent request a reboot, the harness reboots the host (devices re-enumerated, agent
/// restarted with a new boot id) and the agent proves the reboot by the boot id.
async fn escalation(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (bus, boot) = ("esc-bus", "esc-boot");
    let mut sc = Scenario::new(
        cp,
        bins,
        "esc",
        vec![NodeSpec::new(bus, 1, "xe"), NodeSpec::new(boot, 1, "xe")],
        2,
        serde_json::json!({"escalation": ["rebind", "bus-reset", "reboot"]}),
        2,
    )
    .await
    .map_err(|x| format!("scenario esc: setup: {x:#}"))?;
    let gb = sc.fleet.sim(bus).sysfs.gpus()[0].bdf.clone();
    let gr = sc.fleet.sim(boot).sysfs.gpus()[0].bdf.clone();
    sc.fleet.sim(bus).sysfs.fail_next_binds(1);
    sc.fleet.sim(boot).sysfs.fail_next_binds(2);
    for (n, g) in [(bus, &gb), (boot, &gr)] {
        sc.inject(bins, n, g, "rebind,bus-reset").await?;
    }
    sc.wait_reboot_request(
        boot,
        "rebind and bus-reset failed",
        Duration::from_secs(300),
    )
    .await?;
    let boot_before = sc.fleet.sim(boot).boot_id();
    sc.fleet
        .sim(boot)
        .sysfs
        .power_cycle()
        .map_err(sc.ctx("power cycle"))?;
    sc.fleet.node(boot).reboot(bins).map_err(sc.ctx("reboot"))?;
    let wb = sc.wait_phase(bus, Phase::Recovered).await?;
    let want = vec![
        ("rebind".to_string(), AttemptOutcome::Failed),
        ("bus-reset".to_string(), AttemptOutcome::Succeeded),
    ];
    if attempt_seq(&wb) != want {
        return Err(sc.fail(&format!(
            "node {bus}: attempts expected {want:?}, seen {:?}",
            attempt_seq(&wb)
        )));
    }
    let s = &sc.fleet.sim(bus).sysfs;
    let counts = (
        s.count("unbind", &gb),
        s.count("reset", &gb) + s.count("remove", &gb),
        s.count("bind", &gb),
    );
    if counts != (1, 1, 2) {
        return Err(sc.fail(&format!(
            "sysfs journal on {bus}: expected (unbind, reset or remove, bind) = (1, 1, 2), seen {counts:?}: {:?}",
            s.journal()
        )));
    }
    let wr = sc.wait_phase(boot, Phase::Recovered).await?;
    let want = vec![
        ("rebind".to_string(), AttemptOutcome::Failed),
        ("bus-reset".to_string(), AttemptOutcome::Failed),
        ("reboot".to_string(), AttemptOutcome::Succeeded),
    ];
    if attempt_seq(&wr) != want {
        return Err(sc.fail(&format!(
            "node {boot}: attempts expected {want:?}, seen {:?}",
            attempt_seq(&wr)
        )));
    }
    let reqs = sc.fleet.sim(boot).reboot_requests();
    if reqs != 1 || sc.fleet.sim(boot).boot_id() == boot_before {
        return Err(sc.fail(&format!(
            "node {boot}: expected exactly one reboot request and a new boot id, seen {reqs} requests, boot id {} (before {boot_before})",
            sc.fleet.sim(boot).boot_id()
        )));
    }
    for n in [bus, boot] {
        sc.uncordoned(n)?;
    }
    sc.check_invariants()
}

/// Budget storm: `UNWEDGE_STORM_NODES` nodes (default 30) of one policy with maxUnavailable 5
/// all wedge in the same instant. The recorder, watching every change of every GpuWedge and
/// Node, never sees more than 5 of them under recovery (invariant 1); every wedge ends
/// Recovered, every node uncordoned, every device unbound and bound exactly once.
async fn budget_storm(cp: &ControlPlane, bins: &Bins) -> Outcome {
    const BUDGET: usize = 5;
    let n: usize = std::env::var("UNWEDGE_STORM_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let nodes: Vec<String> = (0..n).map(|i| format!("storm-{i:03}")).collect();
    let sc = Scenario::new(
        cp,
        bins,
        "storm",
        nodes.iter().map(|x| NodeSpec::new(x, 1, "xe")).collect(),
        BUDGET,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario storm: setup: {x:#}"))?;
    let injections = nodes.iter().map(|x| {
        let sim = sc.fleet.sim(x);
        let g = sim.sysfs.gpus()[0].bdf.clone();
        async move { sim.inject(bins, &g, "rebind,bus-reset", &[]).await }
    });
    for r in futures::future::join_all(injections).await {
        r.map_err(sc.ctx("inject"))?;
    }
    let timeout = Duration::from_secs(60 + 10 * n as u64);
    sc.rec
        .wait_wedges(&format!("all {n} storm wedges Recovered"), timeout, |ws| {
            ws.iter()
                .filter(|w| {
                    w.spec.node_name.starts_with("storm-")
                        && w.status.as_ref().and_then(|s| s.phase) == Some(Phase::Recovered)
                })
                .count()
                == n
        })
        .await
        .map_err(|x| sc.fail(&x))?;
    sc.check_invariants()?;
    let peak = sc.rec.peak("storm");
    eprintln!("storm: {n} nodes, budget {BUDGET}, peak under recovery {peak}");
    if !(2..=BUDGET).contains(&peak) {
        return Err(sc.fail(&format!(
            "policy storm: peak nodes under recovery expected within 2..={BUDGET} (concurrent, within budget), seen {peak}"
        )));
    }
    for x in &nodes {
        let ws = sc.rec.wedges_of(x);
        if ws.len() != 1 {
            return Err(sc.fail(&format!(
                "node {x}: expected exactly 1 GpuWedge, seen {}",
                ws.len()
            )));
        }
        let s = &sc.fleet.sim(x).sysfs;
        let g = &s.gpus()[0].bdf;
        let counts = (s.count("unbind", g), s.count("bind", g));
        if counts != (1, 1) {
            return Err(sc.fail(&format!(
                "sysfs journal on {x}: expected (unbind, bind) = (1, 1), seen {counts:?}"
            )));
        }
        sc.uncordoned(x)?;
    }
    Ok(())
}

/// vendor-specific and cold-reset → NeedsAttention, holding their budget places; and an
/// agent's credentials are refused on another node's wedge and on the human verbs.
/// Policy maxUnavailable 2: `att-vendor` wedges with `vendor-specific`, `att-cold` with
/// `cold-reset`: both end NeedsAttention with their nodes cordoned and their devices
/// untouched. Then `att-late` wedges with `rebind,bus-reset` and stays Queued (node not
/// cordoned, nothing approved): the two NeedsAttention wedges keep the budget full. With the
/// chart's admission policies, `att-late`'s agent token may patch its own wedge's status but
/// is refused on `att-vendor`'s wedge and on `unwedge.io/approve` of its own.
async fn needs_attention_and_agent_rights(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let (vendor, cold, late) = ("att-vendor", "att-cold", "att-late");
    let sc = Scenario::new(
        cp,
        bins,
        "att",
        vec![
            NodeSpec::new(vendor, 1, "xe"),
            NodeSpec::new(cold, 1, "xe"),
            NodeSpec::new(late, 1, "xe"),
        ],
        2,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario att: setup: {x:#}"))?;
    for (n, m) in [(vendor, "vendor-specific"), (cold, "cold-reset")] {
        let g = sc.fleet.sim(n).sysfs.gpus()[0].bdf.clone();
        sc.fleet
            .sim(n)
            .inject(bins, &g, m, &[])
            .await
            .map_err(sc.ctx("inject"))?;
    }
    for n in [vendor, cold] {
        sc.wait_phase(n, Phase::NeedsAttention).await?;
        if sc.rec.node_cordoned(n) != Some(true) {
            return Err(sc.fail(&format!(
                "node {n}: expected to stay cordoned in NeedsAttention, seen {:?}",
                sc.rec.node_cordoned(n)
            )));
        }
    }
    let gl = sc.fleet.sim(late).sysfs.gpus()[0].bdf.clone();
    sc.inject(bins, late, &gl, "rebind,bus-reset").await?;
    let wl = sc.wait_phase(late, Phase::Queued).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let now = sc.rec.wedges_of(late);
    let seen: Vec<(Option<Phase>, bool)> = now
        .iter()
        .map(|w| {
            (
                phase(w),
                w.status.as_ref().is_some_and(|s| s.approval.is_some()),
            )
        })
        .collect();
    if seen != vec![(Some(Phase::Queued), false)] || sc.rec.node_cordoned(late) != Some(false) {
        return Err(sc.fail(&format!(
            "node {late}: expected its wedge Queued without approval and the node schedulable 5s later (budget 2 held by two NeedsAttention wedges), seen {seen:?}, cordoned {:?}",
            sc.rec.node_cordoned(late)
        )));
    }
    for n in [vendor, cold, late] {
        let j = sc.fleet.sim(n).sysfs.journal();
        if !j.is_empty() {
            return Err(sc.fail(&format!("node {n}: expected no sysfs writes, seen {j:?}")));
        }
    }
    if sc.fleet.identities() != "chart" {
        return Err(sc.fail(&format!(
            "agent rights: expected the chart's RBAC and admission policies applied, seen {}",
            sc.fleet.identities()
        )));
    }
    let token = sc.fleet.agent_token(late).map_err(sc.ctx("agent token"))?;
    let agent = cp
        .client_for_token(token.trim())
        .await
        .map_err(sc.ctx("agent client"))?;
    let api: kube::Api<GpuWedge> = kube::Api::all(agent);
    let own = wl.metadata.name.clone().unwrap_or_default();
    let other = sc.rec.wedges_of(vendor)[0]
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    let pp = kube::api::PatchParams::default();
    let msg = serde_json::json!({"status": {"agentMessage": "e2e: own wedge"}});
    api.patch_status(&own, &pp, &kube::api::Patch::Merge(&msg))
        .await
        .map_err(|x| {
            sc.fail(&format!(
                "agent of {late}: patching its own wedge {own}'s status expected allowed, seen {x}"
            ))
        })?;
    let msg = serde_json::json!({"status": {"agentMessage": "e2e: forged"}});
    if api
        .patch_status(&other, &pp, &kube::api::Patch::Merge(&msg))
        .await
        .is_ok()
    {
        return Err(sc.fail(&format!(
            "invariant 5: agent of {late} patched the status of {other} (node {vendor}): expected refused, seen allowed"
        )));
    }
    let approve = serde_json::json!({"metadata": {"annotations": {
        "unwedge.io/approve": "rebind", "unwedge.io/by": "system:serviceaccount:unwedge-system:unwedge-agent"}}});
    if api
        .patch(&own, &pp, &kube::api::Patch::Merge(&approve))
        .await
        .is_ok()
    {
        return Err(sc.fail(&format!(
            "invariant 5: agent of {late} wrote unwedge.io/approve on its own wedge {own}: expected refused, seen allowed"
        )));
    }
    sc.check_invariants()
}

/// Malformed-uevent flood: 200 drm uevents with an unparsable `WEDGED=` and 500 irrelevant
/// (usb) uevents reach the agent through the kernel; it counts them as malformed, stays ready,
/// and the real wedge sent right after is still recovered.
async fn malformed_flood(cp: &ControlPlane, bins: &Bins) -> Outcome {
    let node = "flood-a";
    let sc = Scenario::new(
        cp,
        bins,
        "flood",
        vec![NodeSpec::new(node, 1, "xe")],
        1,
        serde_json::json!({}),
        2,
    )
    .await
    .map_err(|x| format!("scenario flood: setup: {x:#}"))?;
    let sim = sc.fleet.sim(node);
    let g = sim
        .sysfs
        .gpu(&sim.sysfs.gpus()[0].bdf.clone())
        .cloned()
        .expect("gpu 0");
    let dp = g.card_devpath();
    let bad = format!(
        "change@{dp}\0ACTION=change\0DEVPATH={dp}\0SUBSYSTEM=drm\0DEVNAME=dri/{c}\0DEVTYPE=drm_minor\0MAJOR=226\0MINOR=0\0WEDGED=Re Bind;;\0",
        c = g.card_name()
    );
    let raw = sim.dir.join("malformed.uevent");
    std::fs::write(&raw, bad.as_bytes()).map_err(sc.ctx("write the malformed uevent"))?;
    sim.inject_raw_args(
        bins,
        &[
            "--raw-file".into(),
            raw.display().to_string(),
            "--count".into(),
            "200".into(),
            "--flood".into(),
            "500".into(),
        ],
    )
    .await
    .map_err(sc.ctx("inject the flood"))?;
    sim.inject(bins, &g.bdf, "rebind,bus-reset", &[])
        .await
        .map_err(sc.ctx("inject"))?;
    let w = sc.wait_phase(node, Phase::Recovered).await?;
    let (code, metrics) = sim
        .netns
        .http_get(9101, "/metrics")
        .await
        .map_err(sc.ctx("GET /metrics"))?;
    let malformed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("unwedge_agent_uevents_received_total{kind=\"malformed\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    if code != 200 || malformed < 200.0 {
        return Err(sc.fail(&format!(
            "agent of {node}: expected /metrics 200 with uevents_received_total{{kind=malformed}} >= 200, seen {code} and {malformed}"
        )));
    }
    let (code, _) = sim
        .netns
        .http_get(9101, "/readyz")
        .await
        .map_err(sc.ctx("GET /readyz"))?;
    if code != 200 {
        return Err(sc.fail(&format!(
            "agent of {node}: expected /readyz 200 after the flood, seen {code}"
        )));
    }
    if sc.rec.wedges_of(node).len() != 1 {
        return Err(sc.fail(&format!(
            "node {node}: expected exactly 1 GpuWedge (the real one; malformed events create none), seen {}",
            sc.rec.wedges_of(node).len()
        )));
    }
    let _ = w;
    sc.check_invariants()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_scenarios() {
    let (bins, mut cp) = binaries_and_plane().await;
    let mut run = Runner::new();
    if run.wants("happy") {
        let r = rebind_happy_path(&cp, &bins).await;
        run.record("rebind happy path", r);
    }
    if run.wants("xgmi") {
        let r = xgmi_hive(&cp, &bins).await;
        run.record("XGMI hive: the consumers of both hive GPUs drained", r);
    }
    if run.wants("storm") {
        let r = budget_storm(&cp, &bins).await;
        run.record("budget storm (maxUnavailable 5)", r);
    }
    if run.wants("att") {
        let r = needs_attention_and_agent_rights(&cp, &bins).await;
        run.record(
            "vendor-specific and cold-reset -> NeedsAttention keep the budget; agent rights",
            r,
        );
    }
    if run.wants("flood") {
        let r = malformed_flood(&cp, &bins).await;
        run.record("malformed-uevent flood (agent keeps serving)", r);
    }
    if run.wants("killed") {
        let r = agent_killed_between_approval_and_action(&cp, &bins).await;
        run.record("agent killed between approval and action", r);
    }
    if run.wants("none") {
        let r = none_actions(&cp, &bins).await;
        run.record("none with each none.action", r);
    }
    if run.wants("inplace") {
        let r = none_in_place(&cp, &bins).await;
        run.record(
            "none restarted in place (none.restart InPlace, the default)",
            r,
        );
    }
    if run.wants("nonerebind") {
        let r = rebind_during_open_none(&cp, &bins).await;
        run.record("rebind arriving during an open none incident", r);
    }
    if run.wants("esc") {
        let r = escalation(&cp, &bins).await;
        run.record(
            "escalation: bus-reset after a failed rebind; reboot after both failed",
            r,
        );
    }
    // Restarts the API server: last.
    if run.wants("outbox") {
        let r = api_down_outbox(&mut cp, &bins).await;
        run.record("API server down when the wedge happens (outbox)", r);
    }
    run.finish();
}
