//! The one-command demo: a local control plane, three simulated GPU nodes with workloads, the
//! operator (two replicas) and one agent per node; a `WEDGED=rebind,bus-reset` uevent injected
//! through the kernel on one node; the recovery printed live as a timeline; `kubectl get gw
//! -o wide` at the end. With `keep` the cluster stays up until Ctrl-C.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, PostParams};
use unwedge_crds::gpuwedge::Phase;
use unwedge_crds::policy::RecoveryPolicy;

use crate::cluster::ControlPlane;
use crate::fleet::{Bins, Fleet, NodeSpec};
use crate::recorder::Recorder;

/// Demo options.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Leave the cluster up (until Ctrl-C) and print the kubeconfig path.
    pub keep: bool,
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let outcome = loop {
        for l in rec.timeline_since(shown) {
            println!("{l}");
            shown += 1;
        }
        let done = rec
            .wedges_of(target)
            .iter()
            .any(|w| w.status.as_ref().and_then(|s| s.phase) == Some(Phase::Recovered));
        if done {
            break Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "the wedge on {target} was not Recovered within 3 minutes\n{}\n{}",
                rec.report(),
                fleet.operator_logs(30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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

async fn wait_running(cp: &ControlPlane, n: usize) -> anyhow::Result<()> {
    for _ in 0..300 {
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
        if out.lines().count() >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("fewer than {n} workload pods Running after 60s")
}
