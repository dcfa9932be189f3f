//! `detection-latency`: time from a `WEDGED=` uevent handed to the kernel (in the agent's
//! network namespace, docs/design.md §1) to the GpuWedge arriving on a watch of GpuWedges opened
//! before, for many successive incidents on one node with 8 GPUs (each wedge deleted once the
//! agent has finished writing it, so the next uevent of that device opens a new incident);
//! beside the floor: the same number of GpuWedge creates by a kept-alive admin client, timed
//! from the create call to the watch event. Agent events and floor creates alternate, so both
//! see the same load.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use unwedge_crds::gpuwedge::GpuWedge;

use super::{Report, pct};
use crate::fleet::{Fleet, NodeSpec};

#[derive(Default)]
struct Seen {
    /// name → (first arrival, arrival of a version with an agent status)
    arrivals: BTreeMap<String, (Instant, Option<Instant>)>,
    deleted: BTreeMap<String, Instant>,
    ready: bool,
}

struct Watch {
    seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    async fn start(client: Client) -> anyhow::Result<Watch> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let changed = Arc::new(Notify::new());
        let (s, c) = (seen.clone(), changed.clone());
        let api: Api<GpuWedge> = Api::all(client);
        let task = tokio::spawn(async move {
            let mut st = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = st.next().await {
                let t = Instant::now();
                let mut g = s.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(w)) => {
                        let name = w.metadata.name.clone().unwrap_or_default();
                        let has_status = w
                            .status
                            .as_ref()
                            .is_some_and(|s| s.reset_domain.is_some() || s.events.is_some());
                        let e = g.arrivals.entry(name).or_insert((t, None));
                        if has_status && e.1.is_none() {
                            e.1 = Some(t);
                        }
                    }
                    Ok(watcher::Event::Delete(w)) => {
                        g.deleted
                            .insert(w.metadata.name.clone().unwrap_or_default(), t);
                    }
                    Ok(watcher::Event::InitDone) => g.ready = true,
                    _ => {}
                }
                drop(g);
                c.notify_waiters();
            }
        });
        let w = Watch {
            seen,
            changed,
            task,
        };
        w.wait(Duration::from_secs(30), |s| s.ready.then_some(()))
            .await
            .context("the watch's initial list")?;
        Ok(w)
    }

    async fn wait<T, F: Fn(&Seen) -> Option<T>>(
        &self,
        timeout: Duration,
        f: F,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.changed.notified();
            if let Some(v) = f(&self.seen.lock().unwrap_or_else(|e| e.into_inner())) {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                if let Some(v) = f(&self.seen.lock().unwrap_or_else(|e| e.into_inner())) {
                    return Ok(v);
                }
                anyhow::bail!("timed out after {timeout:?}");
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the scenario with `events` agent events and as many floor creates.
pub async fn run(events: usize, short: bool) -> anyhow::Result<Report> {
    let mut rep = Report::new("detection-latency", short);
    let (cp, bins) = super::control_plane(short).await?;
    let mut fleet = Fleet::new(&cp, bins).await?;
    let node = "lat-a";
    fleet
        .add_node(&cp, NodeSpec::new(node, 8, "xe"), true)
        .await?;
    fleet.wait_agents_ready(Duration::from_secs(60)).await?;
    let client = fleet.client();
    let api: Api<GpuWedge> = Api::all(client.clone());
    let watch = Watch::start(client.clone()).await?;
    let sim = fleet.sim(node);
    let gpus = sim.sysfs.gpus().to_vec();
    let inj = super::NsInjector::new(&sim.netns.path())?;
    let mut agent_ms: Vec<f64> = Vec::with_capacity(events);
    let mut floor_ms: Vec<f64> = Vec::with_capacity(events);
    let mut template: Option<GpuWedge> = None;
    // A few warm-up rounds (connections, caches) that are not counted.
    let warmup = 5;
    let t_all = Instant::now();
    for i in 0..events + warmup {
        let g = &gpus[i % gpus.len()];
        let prefix = format!("{node}-{}-", g.bdf.replace([':', '.'], "-"));
        let before: Vec<String> = watch
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .arrivals
            .keys()
            .cloned()
            .collect();
        let t0 = inj.send_wedge(g)?;
        let (name, t1) = watch
            .wait(Duration::from_secs(30), |s| {
                s.arrivals
                    .iter()
                    .find(|(n, _)| n.starts_with(&prefix) && !before.contains(n))
                    .map(|(n, (t, _))| (n.clone(), *t))
            })
            .await
            .with_context(|| format!("agent event {i}: no new GpuWedge {prefix}*"))?;
        // Wait for the agent's status patch so the delete does not race the agent.
        watch
            .wait(Duration::from_secs(30), |s| {
                s.arrivals.get(&name).and_then(|(_, st)| *st)
            })
            .await
            .with_context(|| format!("agent status of {name}"))?;
        if template.is_none() {
            template = Some(api.get(&name).await?);
        }
        api.delete(&name, &DeleteParams::default()).await?;
        watch
            .wait(Duration::from_secs(30), |s| s.deleted.get(&name).copied())
            .await
            .with_context(|| format!("deletion of {name}"))?;

        // The floor: one raw create of the same object by the admin client.
        let mut w = template.clone().context("template")?;
        let fname = format!("floor-{i:06}");
        w.metadata = kube::api::ObjectMeta {
            name: Some(fname.clone()),
            labels: w.metadata.labels.clone(),
            ..Default::default()
        };
        w.status = None;
        let f0 = Instant::now();
        api.create(&PostParams::default(), &w).await?;
        let f1 = watch
            .wait(Duration::from_secs(30), |s| {
                s.arrivals.get(&fname).map(|(t, _)| *t)
            })
            .await
            .with_context(|| format!("floor create {fname}"))?;
        api.delete(&fname, &DeleteParams::default()).await?;
        watch
            .wait(Duration::from_secs(30), |s| s.deleted.get(&fname).copied())
            .await?;
        if i >= warmup {
            agent_ms.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
            floor_ms.push(f1.duration_since(f0).as_secs_f64() * 1000.0);
        }
    }
    let wall = t_all.elapsed();
    drop(inj);
    agent_ms.sort_by(f64::total_cmp);
    floor_ms.sort_by(f64::total_cmp);
    rep.note(format!(
        "one node with 8 xe GPUs, one real unwedge-agent in its network namespace, no operator; {events} incidents (+{warmup} warm-up rounds not counted), round-robin over the 8 cards, each GpuWedge deleted after the agent's status patch; floor creates interleaved; {:.1} s in all",
        wall.as_secs_f64()
    ));
    for (what, v) in [("agent", &agent_ms), ("floor", &floor_ms)] {
        let desc = if what == "agent" {
            "uevent sent to the kernel → GpuWedge ADDED on a watch"
        } else {
            "admin create call → GpuWedge ADDED on the same watch (one kept-alive connection)"
        };
        for p in [50.0, 99.0] {
            rep.fig(&format!("{what} p{p}"), pct(v, p), "ms", desc);
        }
        rep.fig(&format!("{what} max"), pct(v, 100.0), "ms", desc);
    }
    let ratio = pct(&agent_ms, 99.0) / pct(&floor_ms, 99.0);
    rep.fig("agent p99 / floor p99", ratio, "×", "goal ≤ 2");
    let n_ok = agent_ms.len();
    anyhow::ensure!(
        n_ok == events && floor_ms.len() == events,
        "measured {n_ok} agent events and {} floor creates, wanted {events}",
        floor_ms.len()
    );
    drop(watch);
    drop(fleet);
    cp.stop().await;
    Ok(rep)
}
