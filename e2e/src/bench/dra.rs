//! `dra`: one wedged GPU on an 8-GPU DRA node, recovered once with DRA quarantine
//! (`--dra=on`: a DeviceTaintRule on the device) and once with the node cordon (`--dra=off`,
//! what device-plugin nodes get and what peer tools do), in the same run, each on a fresh node
//! of the same shape. Measured while the wedge is open (a Manual policy holds it after the
//! drain): how many of the node's free devices new pods are allocated, how many running pods
//! were left untouched, and how long the first new pod waits for a GPU on the node.
//!
//! The node: a kwok node, a real agent over a fake sysfs with 8 xe GPUs, a ResourceSlice of
//! those 8 PCI addresses (the real kube-scheduler allocates from it), a victim pod whose claim
//! is pinned to one GPU by a CEL selector, `gpu_pods` other pods with one GPU each and 2 pods
//! without a GPU. The wedge enters through the kernel. Then 8 probe pods, each with a GPU claim
//! for that node, are created and watched for `window`. In the cordon mode the operator knows
//! the victim's pod only from the agent, which learns consumers from the PodResources device
//! list (the simulated kubelet lists no DRA claims there), so the figures say whether it went.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::PostParams;
use unwedge_crds::gpuwedge::Phase;
use unwedge_crds::policy::RecoveryPolicy;

use super::Report;
use crate::dra_fixture as dra;
use crate::fleet::{Fleet, NodeSpec};
use crate::recorder::Recorder;
use crate::wait;

const NS: &str = "dra-bench";
const PROBES: usize = 8;
const VICTIM_GPU: usize = 2;

/// Bench options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Pods holding one GPU each besides the victim (at most 7).
    pub gpu_pods: usize,
    /// How long the probe pods are watched while the wedge is open.
    pub window: Duration,
    /// CI mode (debug builds allowed).
    pub short: bool,
}

/// What one mode measured.
#[derive(Debug)]
struct Outcome {
    /// uevent sent → the rule exists (quarantine) or the node is unschedulable (cordon).
    isolated_in: Duration,
    /// uevent sent → the wedge awaits approval (drained).
    drained_in: Duration,
    /// Probe pods running with a GPU on the node when the window closed.
    allocated: usize,
    /// Probe creation → the first one running with a GPU (`None`: none within the window).
    first: Option<Duration>,
    /// Whether a probe got the wedged device while the wedge was open.
    wedged_given: bool,
    /// Running pods other than the victim, untouched (same uid, not terminating).
    untouched: usize,
    /// Whether the victim pod was evicted.
    victim_evicted: bool,
    /// Whether the node was unschedulable while the wedge was open.
    cordoned: bool,
    /// DeviceTaintRules of the wedge while it was open.
    rules: usize,
    /// Approval → Recovered.
    recovered_in: Duration,
    /// Probe pods running with a GPU on the node 30 s after recovery at most.
    allocated_after: usize,
}

/// Runs both modes; returns the figures.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.gpu_pods <= 7,
        "--gpu-pods: at most 7 besides the victim"
    );
    let mut rep = Report::new("dra", opts.short);
    let (cp, bins) = super::control_plane(opts.short).await?;
    let client = cp.client().await?;
    let mut fleet = Fleet::with_chart_values(&cp, bins, &["dra.enabled=true"]).await?;
    dra::setup(&cp, &client, NS).await?;
    let policy: RecoveryPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": "default"},
        "spec": {"default": true, "maxUnavailable": 1, "maxUnavailableDevices": 1,
                 "approval": "Manual", "escalation": ["rebind", "bus-reset"],
                 "drain": {"timeout": "2m"}, "verifyTimeout": "1m"}
    }))?;
    Api::<RecoveryPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await?;
    let free = 8 - opts.gpu_pods;
    rep.note(format!(
        "per mode a fresh node: 8 xe GPUs in a ResourceSlice, a victim pod on gpu-{VICTIM_GPU}, {} other pods with one GPU each, 2 pods without a GPU; {free} devices are free once the victim is evicted (the wedged one included); {PROBES} probe pods with a GPU claim each are watched for {:?} while the wedge is open (Manual approval holds it after the drain)",
        opts.gpu_pods, opts.window
    ));
    let mut outcomes = vec![];
    for (i, (mode, flag)) in [("quarantine", "on"), ("cordon", "off")].iter().enumerate() {
        fleet.set_operator_dra(flag);
        let node = format!("dra-{mode}");
        let o = one(&cp, &client, &mut fleet, &node, &opts, i == 0)
            .await
            .with_context(|| format!("mode {mode} (--dra={flag})"))
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", fleet.operator_logs(40)))?;
        fleet.kill_operator(i);
        figures(&mut rep, mode, &o, &opts);
        outcomes.push(o);
    }
    let (q, c) = (&outcomes[0], &outcomes[1]);
    anyhow::ensure!(
        !q.wedged_given && !c.wedged_given,
        "a probe got the wedged device"
    );
    anyhow::ensure!(
        q.rules == 1 && !q.cordoned && c.rules == 0 && c.cordoned,
        "quarantine must taint the device and not cordon, cordon must cordon: {q:?} {c:?}"
    );
    drop(fleet);
    cp.stop().await;
    Ok(rep)
}

/// Prints and records the figures of one mode (with the load average right after it ran).
fn figures(rep: &mut Report, mode: &str, o: &Outcome, opts: &Options) {
    let free = 8 - opts.gpu_pods;
    rep.fig(
        &format!("{mode}: new pods allocated a GPU on the node while the wedge was open"),
        o.allocated as f64,
        &format!("of {free} free"),
        &format!(
            "{PROBES} probes; the wedged device given to one: {}",
            o.wedged_given
        ),
    );
    rep.fig(
        &format!("{mode}: GPUs of the node in service while the wedge was open"),
        (opts.gpu_pods + o.allocated) as f64,
        "of 8",
        "held by untouched pods + allocated to new pods",
    );
    rep.fig(
        &format!("{mode}: running pods left untouched"),
        o.untouched as f64,
        &format!("of {}", opts.gpu_pods + 2),
        &format!("victim evicted: {}", o.victim_evicted),
    );
    match o.first {
        Some(t) => rep.fig(
            &format!("{mode}: probe created → first new pod running with a GPU on the node"),
            t.as_secs_f64(),
            "s",
            "while the wedge was open",
        ),
        None => rep.fig(
            &format!("{mode}: probe created → first new pod running with a GPU on the node"),
            f64::NAN,
            "s",
            &format!("none within {:?}", opts.window),
        ),
    }
    rep.fig(
        &format!("{mode}: uevent → device isolated"),
        o.isolated_in.as_secs_f64(),
        "s",
        &format!(
            "DeviceTaintRules: {}, node cordoned: {}",
            o.rules, o.cordoned
        ),
    );
    rep.fig(
        &format!("{mode}: uevent → drained (awaiting approval)"),
        o.drained_in.as_secs_f64(),
        "s",
        &format!("victim evicted: {}", o.victim_evicted),
    );
    rep.fig(
        &format!("{mode}: approval → Recovered"),
        o.recovered_in.as_secs_f64(),
        "s",
        &format!(
            "probes running with a GPU after recovery: {}",
            o.allocated_after
        ),
    );
}

/// One mode on a fresh node `node`: `quarantine` is what the fleet's `--dra` turns on.
async fn one(
    cp: &crate::cluster::ControlPlane,
    client: &kube::Client,
    fleet: &mut Fleet,
    node: &str,
    opts: &Options,
    quarantine: bool,
) -> anyhow::Result<Outcome> {
    fleet
        .add_node(cp, NodeSpec::new(node, 8, "xe"), true)
        .await?;
    let gpus = fleet.sim(node).sysfs.gpus().to_vec();
    let pcis: Vec<String> = gpus.iter().map(|g| g.bdf.clone()).collect();
    dra::publish(client, node, &pcis).await?;
    let victim = format!("{node}-victim");
    dra::pinned_gpu_pod(client, NS, &victim, node, &pcis[VICTIM_GPU]).await?;
    let mut others = vec![];
    for i in 0..opts.gpu_pods {
        let p = format!("{node}-gpu-{i}");
        dra::gpu_pod(client, NS, &p, node, None, serde_json::json!({})).await?;
        others.push(p);
    }
    let t = Duration::from_secs(120);
    dra::wait_devices(client, NS, &others, t).await?;
    let vdev = dra::wait_devices(client, NS, std::slice::from_ref(&victim), t).await?;
    anyhow::ensure!(
        vdev[&victim] == dra::device_name(VICTIM_GPU),
        "the victim got {} instead of the pinned device",
        vdev[&victim]
    );
    for i in 0..2 {
        let p = format!("{node}-cpu-{i}");
        dra::plain_pod(client, NS, &p, node).await?;
        others.push(p);
    }
    wait::until("the pods without a GPU running", t, || async {
        let mut n = 0;
        for p in others.iter().filter(|p| p.contains("-cpu-")) {
            let pod = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), NS)
                .get(p)
                .await?;
            if pod.status.and_then(|s| s.phase).as_deref() == Some("Running") {
                n += 1;
            }
        }
        Ok((n == 2).then_some(()))
    })
    .await?;
    fleet.start_operators(cp, 1).await?;
    fleet.wait_agents_ready(Duration::from_secs(60)).await?;
    // The operator of this mode is up once the policy carries its DeviceQuarantine condition.
    wait::until("the operator's DeviceQuarantine condition", t, || async {
        let p = Api::<RecoveryPolicy>::all(client.clone())
            .get("default")
            .await?;
        let want = if quarantine { "True" } else { "False" };
        Ok(p.status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "DeviceQuarantine" && c.status == want))
    })
    .await?;
    let before = dra::uids(client, NS, &others).await?;
    let rec = Recorder::start(client.clone(), &[("default", 1)]).await?;
    let nodes: Api<Node> = Api::all(client.clone());

    let inj = super::NsInjector::new(&fleet.sim(node).netns.path())?;
    let g = &gpus[VICTIM_GPU];
    let t0 = inj.send_wedge(g)?;
    drop(inj);
    let wedge = wait::until("the wedge", t, || async {
        Ok(rec.wedges_of(node).first().map(kube::ResourceExt::name_any))
    })
    .await?;
    let isolated_in = wait::until("the device isolated (rule or cordon)", t, || async {
        let rule = !dra::rules_of(client, &wedge).await?.is_empty();
        let cordoned = nodes
            .get(node)
            .await?
            .spec
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        Ok((rule || cordoned).then(|| t0.elapsed()))
    })
    .await?;
    rec.wait_phase(node, Phase::AwaitingApproval, t)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", rec.report()))?;
    let drained_in = t0.elapsed();

    let probes: Vec<String> = (0..PROBES).map(|i| format!("{node}-probe-{i}")).collect();
    let asked = Instant::now();
    for p in &probes {
        dra::gpu_pod(client, NS, p, node, None, serde_json::json!({})).await?;
    }
    let mut first = None;
    let mut wedged_given = false;
    let mut allocated = 0;
    while asked.elapsed() < opts.window {
        allocated = 0;
        for p in &probes {
            if let Some(d) = dra::device_of(client, NS, p).await? {
                allocated += 1;
                wedged_given |= d == dra::device_name(VICTIM_GPU);
            }
        }
        if allocated > 0 && first.is_none() {
            first = Some(asked.elapsed());
        }
        super::sleep(Duration::from_millis(100)).await;
    }
    let untouched = dra::untouched(client, NS, &before).await?;
    let victim_evicted = !dra::exists(client, NS, &victim).await?;
    let cordoned = nodes
        .get(node)
        .await?
        .spec
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let rules = dra::rules_of(client, &wedge).await?.len();

    let me = crate::cluster::ControlPlane::whoami(client)
        .await?
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("the admin user has no name")?;
    let approved = Instant::now();
    cp.kubectl_ok(&[
        "annotate",
        "gw",
        &wedge,
        "unwedge.io/approve=",
        &format!("unwedge.io/by={me}"),
    ])
    .await?;
    rec.wait_phase(node, Phase::Recovered, t)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", rec.report()))?;
    let recovered_in = approved.elapsed();
    let want_after = 8 - opts.gpu_pods;
    let after = Instant::now();
    let mut allocated_after = 0;
    while after.elapsed() < Duration::from_secs(30) {
        allocated_after = 0;
        for p in &probes {
            if dra::device_of(client, NS, p).await?.is_some() {
                allocated_after += 1;
            }
        }
        if allocated_after >= want_after {
            break;
        }
        super::sleep(Duration::from_millis(200)).await;
    }
    rec.check_invariants().map_err(anyhow::Error::msg)?;
    rec.check_journal(node, &fleet.sim(node).sysfs)
        .map_err(anyhow::Error::msg)?;
    Ok(Outcome {
        isolated_in,
        drained_in,
        allocated,
        first,
        wedged_given,
        untouched,
        victim_evicted,
        cordoned,
        rules,
        recovered_in,
        allocated_after,
    })
}
