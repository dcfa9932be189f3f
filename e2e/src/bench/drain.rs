//! `drain`: one node with 8 GPUs and 100 pods (8 hold one GPU each, 92 hold none). unwedge's
//! device-scoped drain for one wedged GPU against `kubectl drain --ignore-daemonsets` of the
//! same node (the pinned kubectl), both on the real control plane, in the same run: pods
//! disrupted and wall time.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use unwedge_crds::gpuwedge::Phase;

use super::Report;
use crate::fleet::{NodeSpec, Scenario, gpu_pod};
use crate::wait::{self, Check};

const NS: &str = "drain-bench";
const NODE: &str = "drain-a";

/// Pod deletions seen on a watch of the namespace (first time a pod gets a deletion timestamp
/// or disappears), with their times.
struct Disruptions {
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Disruptions {
    fn start(client: Client) -> Disruptions {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let api: Api<Pod> = Api::namespaced(client, NS);
        let task = tokio::spawn(async move {
            let mut known: BTreeSet<String> = BTreeSet::new();
            let mut st = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = st.next().await {
                let t = Instant::now();
                let (name, gone) = match ev {
                    Ok(watcher::Event::Apply(p)) => (
                        p.metadata.name.clone().unwrap_or_default(),
                        p.metadata.deletion_timestamp.is_some(),
                    ),
                    Ok(watcher::Event::Delete(p)) => {
                        (p.metadata.name.clone().unwrap_or_default(), true)
                    }
                    _ => continue,
                };
                let uid_key = name.clone();
                if gone && known.insert(uid_key) {
                    s.lock().unwrap_or_else(|e| e.into_inner()).push((t, name));
                } else if !gone {
                    known.remove(&name);
                }
            }
        });
        Disruptions { seen, task }
    }

    fn since(&self, t: Instant) -> Vec<(Instant, String)> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(x, _)| *x >= t)
            .cloned()
            .collect()
    }
}

impl Drop for Disruptions {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_running(client: &Client, want: usize) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    wait::until(
        &format!("{want} pods Running on {NODE}"),
        Duration::from_secs(180),
        || async {
            let running = pods
                .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
                .await?
                .items
                .iter()
                .filter(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .count();
            Ok(if running >= want {
                Check::Done(())
            } else {
                Check::Seen(format!("{running} Running"))
            })
        },
    )
    .await
}

/// Runs the comparison with `pods` pods on the node (8 of them hold a GPU).
pub async fn run(pods: usize, short: bool) -> anyhow::Result<Report> {
    let mut rep = Report::new("drain", short);
    let (cp, bins) = super::control_plane(short).await?;
    let sc = Scenario::new(
        &cp,
        &bins,
        "drain",
        vec![NodeSpec::new(NODE, 8, "xe")],
        1,
        serde_json::json!({}),
        2,
    )
    .await?;
    let client = sc.fleet.client();
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))?,
    )
    .await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    let gpus = sc.fleet.sim(NODE).sysfs.gpus().to_vec();
    let make = |i: usize| {
        if i < gpus.len() {
            gpu_pod(NS, &format!("gpu-{i}"), NODE, 1, Some(&gpus[i].bdf))
        } else {
            gpu_pod(NS, &format!("cpu-{i:03}"), NODE, 0, None)
        }
    };
    futures::stream::iter(0..pods)
        .map(|i| {
            let (api, p) = (api.clone(), make(i));
            async move { api.create(&PostParams::default(), &p).await }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .context("create the pods")?;
    wait_running(&client, pods).await?;
    // The PodResources server must report the 8 GPU holders before the wedge.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sc.fleet.sim(NODE).podres.holders().len() < gpus.len() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "PodResources does not list 8 holders"
        );
        super::sleep(Duration::from_millis(200)).await;
    }
    rep.note(format!(
        "node {NODE}: 8 xe GPUs, {pods} Running pods in {NS} ({} hold one GPU each, pinned by PCI address; the rest none); 2 operator replicas; policy maxUnavailable 1, defaults otherwise",
        gpus.len()
    ));
    let dis = Disruptions::start(client.clone());
    super::sleep(Duration::from_secs(1)).await;

    // unwedge: one wedged GPU.
    let inj = super::NsInjector::new(&sc.fleet.sim(NODE).netns.path())?;
    let t0 = inj.send(crate::inject::wedge_payload(
        &gpus[0].card_devpath(),
        &gpus[0].card_name(),
        &["rebind", "bus-reset"],
        &[],
    ))?;
    drop(inj);
    sc.rec
        .wait_phase(NODE, Phase::Recovered, Duration::from_secs(180))
        .await
        .map_err(|e| anyhow::anyhow!("{}", sc.fail(&e)))?;
    let t_rec = Instant::now();
    // Uncordon is part of Recovered; give the watch a moment to deliver the last deletions.
    super::sleep(Duration::from_secs(1)).await;
    let ours = dis.since(t0);
    let last_evict = ours.iter().map(|(t, _)| *t).max();
    rep.fig(
        "unwedge: pods disrupted",
        ours.len() as f64,
        "pods",
        &format!(
            "{:?} (device-scoped: only the holder of the wedged GPU)",
            ours.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>()
        ),
    );
    if let Some(t) = last_evict {
        rep.fig(
            "unwedge: drain wall time (uevent → last disrupted pod deleting)",
            t.duration_since(t0).as_secs_f64(),
            "s",
            "includes detection, admission and cordon",
        );
    }
    rep.fig(
        "unwedge: uevent → Recovered (node uncordoned)",
        t_rec.duration_since(t0).as_secs_f64(),
        "s",
        "the whole incident: drain, rebind, verify, uncordon",
    );
    sc.check_invariants().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        ours.len() == 1 && ours[0].1 == "gpu-0",
        "unwedge disrupted {ours:?}, expected only gpu-0"
    );

    // Give the node its 100 pods back, then kubectl drain it.
    api.create(&PostParams::default(), &make(0)).await?;
    wait_running(&client, pods).await?;
    let t1 = Instant::now();
    let out = cp
        .kubectl(&[
            "drain",
            NODE,
            "--ignore-daemonsets",
            "--force",
            "--delete-emptydir-data",
            "--timeout=300s",
            // The agent pod object stands for the agent DaemonSet's pod, which
            // --ignore-daemonsets would skip.
            "--pod-selector",
            "app.kubernetes.io/name!=unwedge-agent",
        ])
        .await?;
    let wall = t1.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "kubectl drain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    super::sleep(Duration::from_secs(1)).await;
    let theirs = dis.since(t1);
    rep.fig(
        "kubectl drain: pods disrupted",
        theirs.len() as f64,
        "pods",
        "--ignore-daemonsets --force --delete-emptydir-data",
    );
    rep.fig(
        "kubectl drain: wall time",
        wall.as_secs_f64(),
        "s",
        "the kubectl process, cordon + evict every pod + wait for deletion",
    );
    rep.fig(
        "pods disrupted: kubectl drain / unwedge",
        theirs.len() as f64 / ours.len().max(1) as f64,
        "×",
        "same node, same run",
    );
    if let Some(t) = last_evict {
        rep.fig(
            "wall time: kubectl drain / unwedge drain",
            wall.as_secs_f64() / t.duration_since(t0).as_secs_f64(),
            "×",
            "unwedge's figure includes detection; kubectl's starts when a human runs it",
        );
    }
    drop(dis);
    drop(sc);
    cp.stop().await;
    Ok(rep)
}
