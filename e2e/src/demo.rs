//! The one-command demo: a local control plane, three simulated GPU nodes with workloads, the
//! operator (two replicas) and one agent per node; a `WEDGED=rebind,bus-reset` uevent injected
//! through the kernel on one node; the recovery printed live as a timeline; `kubectl get gw
//! -o wide`; then a `WEDGED=none` blaming a trainer's process on another node, whose container
//! restarts in place (no eviction, no cordon). With `keep` the cluster stays up until Ctrl-C.
//!
//! With `dra` (docs/design.md §5 "On DRA clusters"): one node whose 8 GPUs are published in a
//! ResourceSlice, a Deployment whose pods get them through ResourceClaims allocated by the real
//! kube-scheduler, and the wedge of one pod's GPU quarantines that device alone with a
//! DeviceTaintRule; the node stays schedulable and its other GPUs keep being allocated.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use unwedge_crds::gpuwedge::{GpuWedge, Phase};
use unwedge_crds::policy::RecoveryPolicy;

use crate::cluster::ControlPlane;
use crate::dra_fixture as dra;
use crate::fleet::{Bins, Fleet, NodeSpec};
use crate::recorder::Recorder;
use crate::wait::{self, Check};

/// Demo options.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Leave the cluster up (until Ctrl-C) and print the kubeconfig path.
    pub keep: bool,
    /// DRA: quarantine the wedged device instead of cordoning its node.
    pub dra: bool,
}

const NODES: [&str; 3] = ["gpu-node-a", "gpu-node-b", "gpu-node-c"];
const WORKLOAD_NS: &str = "ml";

fn say(msg: &str) {
    println!("{} {msg}", jiff::Zoned::now().strftime("%H:%M:%S%.3f"));
}

/// The default RecoveryPolicy of the demo: one node at a time, the kernel's ladder.
pub fn demo_policy() -> RecoveryPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1",
        "kind": "RecoveryPolicy",
        "metadata": {"name": "default"},
        "spec": {
            "default": true,
            "maxUnavailable": 1,
            "escalation": ["rebind", "bus-reset", "reboot"],
            "drain": {"timeout": "2m"},
            "verifyTimeout": "1m"
        }
    }))
    .expect("a valid policy")
}

/// A Deployment of `replicas` pods needing one fake GPU each on the GPU nodes, and a PDB that
/// lets one go at a time.
pub async fn deploy_workload(
    client: &kube::Client,
    name: &str,
    replicas: i32,
) -> anyhow::Result<()> {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), WORKLOAD_NS);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"unwedge.io/gpu": "true"},
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "main", "image": "trainer:demo",
                        "resources": {"limits": {"unwedge.io/fake-gpu": "1"}, "requests": {"unwedge.io/fake-gpu": "1"}}}]
                }
            }
        }
    }))?;
    deps.create(&PostParams::default(), &d)
        .await
        .with_context(|| format!("create deployment {name}"))?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), WORKLOAD_NS);
    let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": name}}}
    }))?;
    pdbs.create(&PostParams::default(), &pdb).await?;
    Ok(())
}

/// Runs the demo; returns an error naming what did not happen.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.dra {
        return run_dra(opts).await;
    }
    say("building the agent, the operator and the injector (cargo)…");
    let bins = tokio::task::spawn_blocking(Bins::build).await??;
    say(
        "starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)…",
    );
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let client = cp.client().await?;
    let mut fleet = Fleet::new(&cp, bins.clone()).await?;
    for n in NODES {
        fleet.add_node(&cp, NodeSpec::new(n, 4, "xe"), true).await?;
        say(&format!(
            "node {n}: 4 fake xe GPUs, agent started in its own network namespace"
        ));
    }
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    policies
        .create(&PostParams::default(), &demo_policy())
        .await?;
    cp.kubectl_ok(&["create", "namespace", WORKLOAD_NS]).await?;
    deploy_workload(&client, "trainer", 6).await?;
    fleet.start_operators(&cp, 2).await?;
    fleet.wait_agents_ready(Duration::from_secs(60)).await?;
    wait_running(&cp, 6).await?;
    say("6 trainer pods Running on 3 nodes; operator replicas: 2 (leader election)");
    let rec = Recorder::start(client.clone(), &[("default", 1)]).await?;
    let target = NODES[0];
    let bdf = {
        let node = fleet.node(target);
        let holders = node.podres.holders();
        node.sysfs
            .gpus()
            .iter()
            .map(|g| g.bdf.clone())
            .find(|b| holders.contains_key(b))
            .unwrap_or_else(|| node.sysfs.gpus()[0].bdf.clone())
    };
    say(&format!(
        "injecting WEDGED=rebind,bus-reset for {target} {bdf} through the kernel (uevent_net_rcv in the agent's namespace)"
    ));
    let node = fleet.node(target);
    node.inject(&bins, &bdf, "rebind,bus-reset", &[]).await?;
    let mut shown = 0;
    let outcome = follow(
        &rec,
        &mut shown,
        target,
        Phase::Recovered,
        &fleet,
        THREE_MINUTES,
    )
    .await
    .map(drop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for l in rec.timeline_since(shown) {
        println!("{l}");
    }
    println!();
    println!("$ kubectl get gw -o wide");
    println!(
        "{}",
        cp.kubectl_ok(&["get", "gw", "-o", "wide"])
            .await
            .unwrap_or_else(|e| e.to_string())
    );
    println!("sysfs writes on {target} (independent journal):");
    for w in fleet.node(target).sysfs.journal() {
        println!("  {} {} {}", w.op, w.bdf, w.driver);
    }
    let inv = rec
        .check_invariants()
        .and_then(|_| rec.check_journal(target, &fleet.node(target).sysfs));
    println!(
        "invariants: {}; peak nodes under recovery: {}/1",
        match &inv {
            Ok(()) => "held".to_string(),
            Err(e) => format!("VIOLATED: {e}"),
        },
        rec.peak("default")
    );
    outcome?;
    inv.map_err(anyhow::Error::msg)?;
    restart_in_place(&cp, &mut fleet, &bins, &rec).await?;
    if opts.keep {
        println!();
        println!("The cluster stays up. Explore it with:");
        println!("  export KUBECONFIG={}", cp.kubeconfig_path().display());
        println!("  kubectl get gw,rp,nodes -o wide");
        println!("Press Ctrl-C to tear it down.");
        tokio::signal::ctrl_c().await?;
    }
    fleet.stop();
    cp.stop().await;
    Ok(())
}

/// The second act: `WEDGED=none` on another node, the driver blaming a process of a trainer
/// pod's container. The default policy restarts that container in place through the node's
/// container runtime (the simulated node's stand-in CRI server plays the kubelet's part): same
/// pod, same node, same GPU, restart count + 1, no eviction, no cordon.
async fn restart_in_place(
    cp: &ControlPlane,
    fleet: &mut Fleet,
    bins: &Bins,
    rec: &Recorder,
) -> anyhow::Result<()> {
    let target = NODES[1];
    let node = fleet.node(target);
    let (bdf, pod) = node
        .podres
        .holders()
        .into_iter()
        .next()
        .context("no trainer pod holds a GPU on the second node")?;
    let (ns, name) = pod.split_once('/').context("namespace/name")?;
    let p = Api::<Pod>::namespaced(cp.client().await?, ns)
        .get(name)
        .await?;
    let uid = p.metadata.uid.clone().unwrap_or_default();
    let (cid, before) = node
        .podres
        .runtime()
        .running(&uid, "main")
        .context("the trainer's container is not running in the node's runtime")?;
    let task = crate::fleet::PodProcess::start(&uid, &cid)?;
    println!();
    say(&format!(
        "injecting WEDGED=none for {target} {bdf}, PID={} (a process of {pod}'s container): the driver recovered by itself and asks for its user to be restarted",
        task.pid()
    ));
    let shown = rec.timeline().len();
    node.inject(
        bins,
        &bdf,
        "none",
        &["--pid".into(), task.pid().to_string()],
    )
    .await?;
    let mut printed = shown;
    follow(
        rec,
        &mut printed,
        target,
        Phase::Recovered,
        fleet,
        Duration::from_secs(60),
    )
    .await?;
    let after = fleet.node(target).podres.runtime().running(&uid, "main");
    let same = Api::<Pod>::namespaced(cp.client().await?, ns)
        .get_opt(name)
        .await?
        .and_then(|p| p.metadata.uid)
        == Some(uid.clone());
    println!();
    println!(
        "{pod}: same pod (uid {uid}) still on {target}: {same}; container main restarted in place, attempt {before} -> {}; pods evicted: 0",
        after.map_or("not running".to_string(), |(_, n)| n.to_string())
    );
    show(
        cp,
        &["get", "gw", "-l", &format!("unwedge.io/node={target}")],
    )
    .await;
    Ok(())
}

/// Prints `$ kubectl <args>` and what it printed (or its error).
async fn show(cp: &ControlPlane, args: &[&str]) {
    println!("$ kubectl {}", args.join(" "));
    match cp.kubectl(args).await {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let err = String::from_utf8_lossy(&out.stderr);
            let shown = if text.trim().is_empty() { err } else { text };
            println!("{}\n", shown.trim_end());
        }
        Err(e) => println!("{e:#}\n"),
    }
}

const DRA_NODE: &str = "gpu-node-a";

/// The DRA demo's policy: one quarantined device at a time, approved by a human (so the wedge
/// stays open while you look at it).
fn dra_policy() -> RecoveryPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1",
        "kind": "RecoveryPolicy",
        "metadata": {"name": "default"},
        "spec": {
            "default": true,
            "maxUnavailableDevices": 1,
            "approval": "Manual",
            "escalation": ["rebind", "bus-reset"],
            "drain": {"timeout": "2m"},
            "verifyTimeout": "1m"
        }
    }))
    .expect("a valid policy")
}

/// A Deployment of `replicas` pods, each with its own GPU claim from the DRA template.
async fn deploy_claim_workload(
    client: &kube::Client,
    name: &str,
    replicas: i32,
) -> anyhow::Result<()> {
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"unwedge.io/gpu": "true"},
                    "terminationGracePeriodSeconds": 0,
                    "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": dra::TEMPLATE}],
                    "containers": [{"name": "main", "image": "trainer:demo",
                        "resources": {"claims": [{"name": "gpu"}]}}]
                }
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), WORKLOAD_NS)
        .create(&PostParams::default(), &d)
        .await
        .with_context(|| format!("create deployment {name}"))?;
    Ok(())
}

/// Pod → allocated device of the workload namespace's live pods (`None`: not allocated yet).
async fn allocations(client: &kube::Client) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), WORKLOAD_NS);
    let mut out = vec![];
    for p in pods.list(&ListParams::default()).await?.items {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = p.name_any();
        let dev = dra::device_of(client, WORKLOAD_NS, &name).await?;
        out.push((name, dev));
    }
    out.sort();
    Ok(out)
}

fn print_allocations(rows: &[(String, Option<String>)], pci: &BTreeMap<String, String>) {
    for (pod, dev) in rows {
        match dev {
            Some(d) => println!(
                "  {pod:<28} {d} ({})",
                pci.get(d).map(String::as_str).unwrap_or("?")
            ),
            None => println!("  {pod:<28} Pending: no device allocated"),
        }
    }
    println!();
}

/// Waits until `n` workload pods run with a device.
async fn wait_allocated(client: &kube::Client, n: usize) -> anyhow::Result<()> {
    wait::until(
        &format!("{n} workload pods running with a device"),
        Duration::from_secs(120),
        || async {
            let got = allocations(client).await?;
            Ok((got.iter().filter(|(_, d)| d.is_some()).count() >= n).then_some(()))
        },
    )
    .await
}

/// The DRA demo (see the module docs).
async fn run_dra(opts: Options) -> anyhow::Result<()> {
    say("building the agent, the operator and the injector (cargo)…");
    let bins = tokio::task::spawn_blocking(Bins::build).await??;
    say(
        "starting the local control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok)…",
    );
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let client = cp.client().await?;
    let mut fleet = Fleet::with_chart_values(&cp, bins.clone(), &["dra.enabled=true"]).await?;
    fleet
        .add_node(&cp, NodeSpec::new(DRA_NODE, 8, "xe"), true)
        .await?;
    let bdfs: Vec<String> = fleet
        .sim(DRA_NODE)
        .sysfs
        .gpus()
        .iter()
        .map(|g| g.bdf.clone())
        .collect();
    dra::setup(&cp, &client, WORKLOAD_NS).await?;
    dra::publish(&client, DRA_NODE, &bdfs).await?;
    let pci: BTreeMap<String, String> = bdfs
        .iter()
        .enumerate()
        .map(|(i, b)| (dra::device_name(i), b.clone()))
        .collect();
    say(&format!(
        "node {DRA_NODE}: 8 fake xe GPUs, published by DRA driver {} in ResourceSlice {DRA_NODE}-gpus (attribute {}); agent started in its own network namespace",
        dra::DRIVER,
        dra::PCI_ATTRIBUTE
    ));
    Api::<RecoveryPolicy>::all(client.clone())
        .create(&PostParams::default(), &dra_policy())
        .await?;
    deploy_claim_workload(&client, "trainer", 6).await?;
    fleet.start_operators(&cp, 2).await?;
    fleet.wait_agents_ready(Duration::from_secs(60)).await?;
    wait_allocated(&client, 6).await?;
    let condition = wait::until(
        "the policy's DeviceQuarantine condition",
        Duration::from_secs(60),
        || async {
            let p = Api::<RecoveryPolicy>::all(client.clone())
                .get("default")
                .await?;
            Ok(p.status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "DeviceQuarantine"))
        },
    )
    .await?;
    let before = allocations(&client).await?;
    say(
        "6 trainer pods Running, each with a ResourceClaim the scheduler allocated; operator replicas: 2 (--dra=on), policy approval: Manual",
    );
    print_allocations(&before, &pci);
    say(&format!(
        "RecoveryPolicy default: DeviceQuarantine={} ({}: {})",
        condition.status, condition.reason, condition.message
    ));
    let rec = Recorder::start(client.clone(), &[("default", 1)]).await?;
    let cordoned = dra::cordon_watch(&client);
    let (victim, dev) = before
        .iter()
        .find_map(|(p, d)| d.clone().map(|d| (p.clone(), d)))
        .context("no pod has a device")?;
    let bdf = pci
        .get(&dev)
        .cloned()
        .context("the device has no PCI address")?;
    say(&format!(
        "injecting WEDGED=rebind,bus-reset for {DRA_NODE} {bdf} ({dev}, the GPU of pod {victim}) through the kernel"
    ));
    fleet
        .node(DRA_NODE)
        .inject(&bins, &bdf, "rebind,bus-reset", &[])
        .await?;
    let mut shown = 0;
    let wedge = follow(
        &rec,
        &mut shown,
        DRA_NODE,
        Phase::AwaitingApproval,
        &fleet,
        THREE_MINUTES,
    )
    .await?;

    // Extra GPU pods while the wedge is open: the free GPUs are allocated, the quarantined one
    // never is.
    wait_allocated(&client, 6).await?;
    for i in 0..2 {
        dra::gpu_pod(
            &client,
            WORKLOAD_NS,
            &format!("extra-{i}"),
            DRA_NODE,
            None,
            serde_json::json!({}),
        )
        .await?;
    }
    wait_allocated(&client, 7).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!();
    say(&format!(
        "the wedge is open ({wedge} awaits approval): what a user sees"
    ));
    println!();
    show(&cp, &["get", "devicetaintrules"]).await;
    show(&cp, &["get", "devicetaintrules", "-o", "yaml"]).await;
    show(&cp, &["get", "gw", "-o", "wide"]).await;
    show(&cp, &["get", "nodes"]).await;
    let open = allocations(&client).await?;
    let held = open.iter().filter(|(_, d)| d.is_some()).count();
    let pending: Vec<&str> = open
        .iter()
        .filter(|(_, d)| d.is_none())
        .map(|(p, _)| p.as_str())
        .collect();
    say(&format!(
        "allocations while {dev} is quarantined: {held} pods hold {held} of the 8 GPUs (the evicted pod's replacement and the extra pods got the free ones), pending: {pending:?}"
    ));
    print_allocations(&open, &pci);
    let given_wedged: Vec<&String> = open
        .iter()
        .filter(|(_, d)| d.as_deref() == Some(dev.as_str()))
        .map(|(p, _)| p)
        .collect();
    anyhow::ensure!(
        given_wedged.is_empty(),
        "the quarantined device {dev} was allocated to {given_wedged:?}"
    );
    // The admission policy wants unwedge.io/by to name the requester.
    let me = ControlPlane::whoami(&client)
        .await?
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("the admin user has no name")?;
    let by = format!("unwedge.io/by={me}");
    say(&format!(
        "approving as a human would: kubectl annotate gw {wedge} unwedge.io/approve= {by}"
    ));
    cp.kubectl_ok(&["annotate", "gw", &wedge, "unwedge.io/approve=", &by])
        .await?;
    follow(
        &rec,
        &mut shown,
        DRA_NODE,
        Phase::Recovered,
        &fleet,
        THREE_MINUTES,
    )
    .await?;
    wait::until(
        "the DeviceTaintRule deleted",
        Duration::from_secs(60),
        || async {
            Ok(dra::rules_of(&client, &wedge)
                .await?
                .is_empty()
                .then_some(()))
        },
    )
    .await?;
    wait_allocated(&client, 8).await?;
    println!();
    say("recovered: what a user sees");
    println!();
    show(&cp, &["get", "devicetaintrules"]).await;
    show(&cp, &["get", "gw", "-o", "wide"]).await;
    let field = format!("involvedObject.name={wedge}");
    show(&cp, &["get", "events", "-A", "--field-selector", &field]).await;
    let after = allocations(&client).await?;
    let holder = after
        .iter()
        .find(|(_, d)| d.as_deref() == Some(dev.as_str()))
        .map_or("nobody yet", |(p, _)| p.as_str());
    say(&format!(
        "allocations after recovery: {dev} is allocatable again, now held by {holder}"
    ));
    print_allocations(&after, &pci);
    println!("sysfs writes on {DRA_NODE} (independent journal):");
    for w in fleet.node(DRA_NODE).sysfs.journal() {
        println!("  {} {} {}", w.op, w.bdf, w.driver);
    }
    let never_cordoned = !cordoned.load(std::sync::atomic::Ordering::SeqCst);
    let inv = rec
        .check_invariants()
        .and_then(|_| rec.check_journal(DRA_NODE, &fleet.node(DRA_NODE).sysfs));
    println!(
        "invariants: {}; node {DRA_NODE} cordoned: {}",
        match &inv {
            Ok(()) => "held".to_string(),
            Err(e) => format!("VIOLATED: {e}"),
        },
        if never_cordoned { "never" } else { "YES" }
    );
    inv.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(never_cordoned, "node {DRA_NODE} was cordoned");
    if opts.keep {
        println!();
        println!("The cluster stays up. Explore it with:");
        println!("  export KUBECONFIG={}", cp.kubeconfig_path().display());
        println!("  kubectl get gw,rp,devicetaintrules,resourceclaims -A");
        println!("Press Ctrl-C to tear it down.");
        tokio::signal::ctrl_c().await?;
    }
    fleet.stop();
    cp.stop().await;
    Ok(())
}

/// How long the demo follows a recovery before it gives up.
const THREE_MINUTES: Duration = Duration::from_secs(180);

/// Prints the recorder's timeline until a wedge on `node` reaches `phase` (`timeout` at most);
/// returns the wedge's name.
async fn follow(
    rec: &Recorder,
    shown: &mut usize,
    node: &str,
    phase: Phase,
    fleet: &Fleet,
    timeout: Duration,
) -> anyhow::Result<String> {
    wait::until(&format!("a wedge on {node} in {phase:?}"), timeout, || {
        for l in rec.timeline_since(*shown) {
            println!("{l}");
            *shown += 1;
        }
        let wedges = rec.wedges_of(node);
        let phase_of = |w: &GpuWedge| w.status.as_ref().and_then(|s| s.phase);
        let found = match wedges.iter().find(|w| phase_of(w) == Some(phase)) {
            Some(w) => Check::Done(w.name_any()),
            None => Check::Seen(format!(
                "phases {:?}",
                wedges.iter().map(phase_of).collect::<Vec<_>>()
            )),
        };
        async move { Ok(found) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}\n{}", rec.report(), fleet.operator_logs(30)))
}

async fn wait_running(cp: &ControlPlane, n: usize) -> anyhow::Result<()> {
    wait::until(
        &format!("{n} workload pods Running"),
        Duration::from_secs(60),
        || async {
            let out = cp
                .kubectl_ok(&[
                    "get",
                    "pods",
                    "-n",
                    WORKLOAD_NS,
                    "--field-selector=status.phase=Running",
                    "-o",
                    "name",
                ])
                .await?;
            let running = out.lines().count();
            Ok(if running >= n {
                Check::Done(())
            } else {
                Check::Seen(format!("{running} Running"))
            })
        },
    )
    .await
}
