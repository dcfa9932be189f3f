//! `storm`: N kwok nodes (one agent process each, or above [`POOL_ABOVE`] nodes one agent
//! instance each in one `agent-pool` process, docs/design.md §7), N simultaneous wedges, a policy with
//! `maxUnavailable` B, two real operator replicas. Measures the total time until every wedge
//! is Recovered against the lower bound ⌈N/B⌉ × one recovery (measured first, in the same
//! run), the admission + cordon rate, the peak of nodes under recovery (asserted ≤ B), the
//! operator's RSS and CPU, and API requests per wedge; then optionally grows the cluster to
//! many watched kwok nodes and reads the operator's RSS there.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use unwedge_crds::gpuwedge::{GpuWedge, Phase};
use unwedge_crds::labels::ANN_CORDONED_BY;

use super::{Report, apiserver_requests, find_pids, load1, sample};
use crate::fleet::{NodeSpec, Scenario};

/// Above this many nodes the agents run as instances of one `agent-pool` process: a process
/// per node (11 MiB and two runtime threads each) starved a 2-core machine at 1,000 nodes.
pub const POOL_ABOVE: usize = 100;

/// Options of the storm.
#[derive(Clone, Debug)]
pub struct Options {
    /// Nodes (and simultaneous wedges).
    pub nodes: usize,
    /// The policy's maxUnavailable.
    pub budget: usize,
    /// Extra kwok nodes to create afterwards for the watched-nodes figure (0: skip).
    pub watch_nodes: usize,
    /// Short (CI) mode.
    pub short: bool,
    /// Where the plot goes (`None`: `target/bench/storm-<nodes>.png`).
    pub plot: Option<std::path::PathBuf>,
}

/// What the tracker knows about one wedge.
#[derive(Clone, Debug)]
pub struct WedgeTrack {
    /// Node name.
    pub node: String,
    /// The device's PCI address.
    pub device: String,
    /// When this process first saw it.
    pub first_seen: Instant,
    /// Last phase seen.
    pub phase: Phase,
    /// How many times it entered Recovered.
    pub recovered_entries: u32,
    /// When it first entered Recovered.
    pub recovered_at: Option<Instant>,
    /// Whether it holds a node-level place in the budget now.
    pub holds: bool,
    /// Whether it was ever seen in a terminal phase (Recovered or Abandoned).
    pub ended: bool,
}

#[derive(Default)]
struct TrackState {
    wedges: BTreeMap<String, WedgeTrack>,
    cordoned: BTreeSet<String>,
    cordon_times: Vec<(Instant, String)>,
    series: Vec<(Instant, usize)>,
    ready: u8,
}

impl TrackState {
    fn under_recovery(&self) -> usize {
        let mut s: BTreeSet<&str> = self.cordoned.iter().map(String::as_str).collect();
        for w in self.wedges.values() {
            if w.holds {
                s.insert(&w.node);
            }
        }
        s.len()
    }

    fn push_series(&mut self, t: Instant) {
        let n = self.under_recovery();
        if self.series.last().map(|(_, c)| *c) != Some(n) {
            self.series.push((t, n));
        }
    }
}

/// A watch on every GpuWedge and Node with arrival timestamps: the series of nodes under
/// recovery (cordoned by unwedge, or with an admitted non-terminal node-level wedge, as the
/// recorder counts them), cordon times, and each wedge's Recovered entries.
pub struct Tracker {
    state: Arc<Mutex<TrackState>>,
    changed: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn holds_node(w: &GpuWedge) -> bool {
    let Some(st) = w.status.as_ref() else {
        return false;
    };
    let p = st.phase.unwrap_or_default();
    st.admitted_at.is_some()
        && !p.is_terminal()
        && !matches!(
            p,
            Phase::Restarting | Phase::Quarantined | Phase::Detected | Phase::Queued
        )
}

impl Tracker {
    /// Starts both watches and waits for their initial lists.
    pub async fn start(client: Client) -> anyhow::Result<Tracker> {
        let state = Arc::new(Mutex::new(TrackState::default()));
        let changed = Arc::new(Notify::new());
        let (s1, c1) = (state.clone(), changed.clone());
        let wedges: Api<GpuWedge> = Api::all(client.clone());
        let t1 = tokio::spawn(async move {
            let mut st = watcher(wedges, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = st.next().await {
                let t = Instant::now();
                let mut s = s1.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(w)) | Ok(watcher::Event::InitApply(w)) => {
                        let name = w.metadata.name.clone().unwrap_or_default();
                        let phase = w.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
                        let holds = holds_node(&w);
                        let e = s.wedges.entry(name).or_insert(WedgeTrack {
                            node: w.spec.node_name.clone(),
                            device: w.spec.device.pci_address.clone(),
                            first_seen: t,
                            phase: Phase::Detected,
                            recovered_entries: 0,
                            recovered_at: None,
                            holds: false,
                            ended: false,
                        });
                        if phase == Phase::Recovered && e.phase != Phase::Recovered {
                            e.recovered_entries += 1;
                            e.recovered_at.get_or_insert(t);
                        }
                        e.phase = phase;
                        e.holds = holds;
                        e.ended |= phase.is_terminal();
                        s.push_series(t);
                    }
                    Ok(watcher::Event::Delete(w)) => {
                        if let Some(e) = w.metadata.name.as_ref().and_then(|n| s.wedges.get_mut(n))
                        {
                            e.holds = false;
                        }
                        s.push_series(t);
                    }
                    Ok(watcher::Event::InitDone) => s.ready += 1,
                    _ => {}
                }
                drop(s);
                c1.notify_waiters();
            }
        });
        let (s2, c2) = (state.clone(), changed.clone());
        let nodes: Api<Node> = Api::all(client);
        let t2 = tokio::spawn(async move {
            let mut st = watcher(nodes, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = st.next().await {
                let t = Instant::now();
                let mut s = s2.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(n)) | Ok(watcher::Event::InitApply(n)) => {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        let by_us = n
                            .metadata
                            .annotations
                            .as_ref()
                            .is_some_and(|a| a.contains_key(ANN_CORDONED_BY));
                        if by_us && !s.cordoned.contains(&name) {
                            s.cordoned.insert(name.clone());
                            s.cordon_times.push((t, name));
                        } else if !by_us {
                            s.cordoned.remove(&name);
                        }
                        s.push_series(t);
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        s.cordoned
                            .remove(&n.metadata.name.clone().unwrap_or_default());
                        s.push_series(t);
                    }
                    Ok(watcher::Event::InitDone) => s.ready += 1,
                    _ => {}
                }
                drop(s);
                c2.notify_waiters();
            }
        });
        let tr = Tracker {
            state,
            changed,
            tasks: vec![t1, t2],
        };
        tr.wait(
            "the tracker's initial lists",
            Duration::from_secs(60),
            |s| s.ready >= 2,
        )
        .await?;
        Ok(tr)
    }

    async fn wait<F: Fn(&TrackState) -> bool>(
        &self,
        what: &str,
        timeout: Duration,
        f: F,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.changed.notified();
            if f(&self.state.lock().unwrap_or_else(|e| e.into_inner())) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, n).await.is_err()
                && !f(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
            {
                anyhow::bail!("timed out after {timeout:?} waiting for {what}");
            }
        }
    }

    /// Waits until `pred` holds for the wedges first seen at or after `since`.
    pub async fn wait_wedges<F: Fn(&[&WedgeTrack]) -> bool>(
        &self,
        what: &str,
        since: Instant,
        timeout: Duration,
        pred: F,
    ) -> anyhow::Result<()> {
        self.wait(what, timeout, |s| {
            let v: Vec<&WedgeTrack> = s
                .wedges
                .values()
                .filter(|w| w.first_seen >= since)
                .collect();
            pred(&v)
        })
        .await
    }

    /// The wedges first seen at or after `since`, by name.
    pub fn wedges_since(&self, since: Instant) -> BTreeMap<String, WedgeTrack> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wedges
            .iter()
            .filter(|(_, w)| w.first_seen >= since)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every wedge seen so far (deleted ones included, with their last phase), by name.
    pub fn wedges(&self) -> BTreeMap<String, WedgeTrack> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wedges
            .clone()
    }

    /// Cordon times (by unwedge) at or after `since`.
    pub fn cordons_since(&self, since: Instant) -> Vec<(Instant, String)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cordon_times
            .iter()
            .filter(|(t, _)| *t >= since)
            .cloned()
            .collect()
    }

    /// The series of (time, nodes under recovery).
    pub fn series(&self) -> Vec<(Instant, usize)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .series
            .clone()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Runs the storm; returns the report (the invariants failing is an error).
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    super::raise_nofile();
    let mut rep = Report::new("storm", opts.short);
    let (cp, bins) = super::control_plane(opts.short).await?;
    let client = cp.client().await?;
    let n = opts.nodes;
    let b = opts.budget;
    let pooled = n > POOL_ABOVE;
    let agents = if pooled {
        "every node's agent an instance of the real agent run loop in one agent-pool process (own uevent socket and /readyz in the node's network namespace, own pod-bound token and API client, own fake sysfs and PodResources server)"
    } else {
        "one real unwedge-agent process per node (own network namespace, pod-bound token, fake sysfs, PodResources server)"
    };
    rep.note(format!(
        "{n} kwok nodes with 1 xe GPU each, {agents}, plus one node 'storm-solo' for the single-recovery reference; policy maxUnavailable {b}; 2 unwedge-operator replicas with leader election"
    ));
    let mut specs: Vec<NodeSpec> = (0..n)
        .map(|i| NodeSpec::new(&format!("storm-{i:05}"), 1, "xe"))
        .collect();
    specs.push(NodeSpec::new("storm-solo", 1, "xe"));
    let t_setup = Instant::now();
    let mut sc = if pooled {
        Scenario::new_pooled(&cp, &bins, "storm", specs, b, serde_json::json!({}), 2).await
    } else {
        Scenario::new(&cp, &bins, "storm", specs, b, serde_json::json!({}), 2).await
    }
    .context("set up the storm fleet")?;
    let setup = t_setup.elapsed();
    rep.fig(
        "fleet setup (nodes + agents ready)",
        setup.as_secs_f64(),
        "s",
        &format!("{} nodes, sequential", n + 1),
    );
    let pool_pid = sc.fleet.pool_pid();
    let agent_pids: Vec<u32> = match pool_pid {
        Some(p) => vec![p],
        None => find_pids(&bins.agent, &sc.fleet.dir().display().to_string()),
    };
    let agents_rss: u64 = agent_pids
        .iter()
        .filter_map(|p| sample(*p).ok())
        .map(|s| s.rss_kib)
        .sum();
    if pooled {
        rep.fig(
            "agent pool RSS after setup",
            agents_rss as f64 / 1024.0,
            "MiB",
            &format!(
                "{} agent instances in one process: {:.3} MiB per instance",
                n + 1,
                agents_rss as f64 / 1024.0 / (n + 1) as f64
            ),
        );
    } else {
        rep.fig(
            "agents running",
            agent_pids.len() as f64,
            "processes",
            &format!(
                "total RSS {:.1} MiB, {:.2} MiB each on average",
                agents_rss as f64 / 1024.0,
                agents_rss as f64 / 1024.0 / agent_pids.len().max(1) as f64
            ),
        );
    }
    let tracker = Tracker::start(client.clone()).await?;
    let op_pids = find_pids(&bins.operator, &sc.fleet.dir().display().to_string());
    anyhow::ensure!(
        op_pids.len() == 2,
        "expected 2 operator processes, found {op_pids:?}"
    );

    // One recovery alone: the reference for the lower bound.
    let solo = sc.fleet.sim("storm-solo");
    let g = solo.sysfs.gpus()[0].clone();
    let inj = super::NsInjector::new(&solo.netns.path())?;
    let t0 = inj.send_wedge(&g)?;
    drop(inj);
    tracker
        .wait_wedges(
            "the solo wedge Recovered",
            t0,
            Duration::from_secs(180),
            |ws| {
                ws.iter()
                    .any(|w| w.node == "storm-solo" && w.phase == Phase::Recovered)
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", sc.fail("solo recovery")))?;
    let one = tracker
        .wedges_since(t0)
        .values()
        .find(|w| w.node == "storm-solo")
        .and_then(|w| w.recovered_at)
        .context("solo recovered")?
        .duration_since(t0);
    rep.fig(
        "one recovery alone (uevent → Recovered)",
        one.as_secs_f64(),
        "s",
        "reference for the lower bound; rebind, no pods on the device",
    );
    // Let the solo node's uncordon settle before the storm starts.
    super::sleep(Duration::from_secs(2)).await;

    // The floor: how fast one sequential client cordons nodes on this control plane, now.
    let (floor_rate, floor_secs) = floor_cordon_rate(&client, FLOOR_NODES).await?;
    rep.fig(
        "floor: sequential cordon rate",
        floor_rate,
        "nodes/s",
        &format!(
            "one client, one merge patch of spec.unschedulable after another, over {FLOOR_NODES} kwok nodes made for it (no GPU, deleted after) in {floor_secs:.3} s; what the API server allows here, now"
        ),
    );
    super::sleep(Duration::from_secs(1)).await;

    let req_before = apiserver_requests(&client).await?;
    let op_req_before = super::operator_requests(sc.fleet.operator_metrics_addrs()).await;
    let op_before: Vec<_> = op_pids.iter().filter_map(|p| sample(*p).ok()).collect();
    let pool_before = pool_pid.and_then(|p| sample(p).ok());
    let sampling = Arc::new(Mutex::new(Vec::<(u32, super::ProcSample)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let mut pids = op_pids.clone();
        pids.extend(pool_pid);
        let (sampling, stop) = (sampling.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for p in &pids {
                    if let Ok(s) = sample(*p) {
                        sampling
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((*p, s));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // The storm: every node's wedge through the kernel in its own namespace, back to back.
    let targets: Vec<(std::path::PathBuf, Vec<u8>)> = sc
        .fleet
        .nodes
        .iter()
        .filter(|(name, _)| name.as_str() != "storm-solo")
        .map(|(_, node)| {
            let g = &node.sysfs.gpus()[0];
            (
                node.netns.path(),
                crate::inject::wedge_payload(
                    &g.card_devpath(),
                    &g.card_name(),
                    &["rebind", "bus-reset"],
                    &[],
                ),
            )
        })
        .collect();
    let load_at_start = load1();
    let (t_storm, t_sent) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let start = Instant::now();
        for (ns, payload) in &targets {
            super::enter_netns(ns)?;
            crate::inject::send_to_kernel(payload)?;
        }
        Ok((start, Instant::now()))
    })
    .await??;
    rep.fig(
        "injection of all wedges",
        t_sent.duration_since(t_storm).as_secs_f64() * 1000.0,
        "ms",
        &format!("{n} uevents into {n} namespaces from one thread"),
    );
    let timeout = Duration::from_secs(
        (one.as_secs_f64() * (n as f64 / b as f64).ceil() * 6.0).max(300.0) as u64,
    );
    let all = tracker
        .wait_wedges("every storm wedge Recovered", t_storm, timeout, |ws| {
            ws.len() >= n && ws.iter().all(|w| w.phase == Phase::Recovered)
        })
        .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sampler.await;
    if let Err(e) = all {
        let ws = tracker.wedges_since(t_storm);
        let recovered = ws.values().filter(|w| w.phase == Phase::Recovered).count();
        anyhow::bail!(
            "{e:#}: {} wedges seen, {recovered} Recovered\n{}",
            ws.len(),
            sc.fail("storm")
        );
    }
    let req_after = apiserver_requests(&client).await?;
    let op_req_after = super::operator_requests(sc.fleet.operator_metrics_addrs()).await;
    let ws = tracker.wedges_since(t_storm);
    let last = ws
        .values()
        .filter_map(|w| w.recovered_at)
        .max()
        .context("no recovery")?;
    let total = last.duration_since(t_storm);
    let waves = (n as f64 / b as f64).ceil();
    let bound = one.as_secs_f64() * waves;
    rep.fig(
        "storm: all Recovered",
        total.as_secs_f64(),
        "s",
        &format!(
            "{n} wedges; load at start {load_at_start:.2}; lower bound ⌈{n}/{b}⌉ × {:.2} s = {bound:.1} s; ratio {:.2}",
            one.as_secs_f64(),
            total.as_secs_f64() / bound
        ),
    );
    rep.fig(
        "storm: lower bound",
        bound,
        "s",
        &format!("{waves} waves × one recovery alone"),
    );
    let cordons = tracker.cordons_since(t_storm);
    let first_wave = b.min(n);
    if cordons.len() >= first_wave {
        let t = cordons[first_wave - 1]
            .0
            .duration_since(t_storm)
            .as_secs_f64();
        rep.fig(
            "admission + cordon rate, first wave",
            first_wave as f64 / t,
            "nodes/s",
            &format!(
                "{first_wave} nodes cordoned {t:.3} s after the first uevent, detection included (goal ≥ 50/s)"
            ),
        );
        if first_wave > 1 {
            let span = cordons[first_wave - 1]
                .0
                .duration_since(cordons[0].0)
                .as_secs_f64();
            rep.fig(
                "admission + cordon rate, first to last cordon of the first wave",
                (first_wave - 1) as f64 / span.max(1e-9),
                "nodes/s",
                &format!(
                    "{} further nodes in {span:.3} s after the first cordon (operator throughput alone; goal ≥ 50/s)",
                    first_wave - 1
                ),
            );
        }
    }
    if cordons.len() >= first_wave {
        // Every uevent was sent within the injection time above (milliseconds), so each time is
        // counted from the first one: an upper bound of uevent sent -> node unschedulable.
        let mut ts: Vec<f64> = cordons[..first_wave]
            .iter()
            .map(|(t, _)| t.duration_since(t_storm).as_secs_f64() * 1000.0)
            .collect();
        ts.sort_by(f64::total_cmp);
        for (name, p) in [("time to cordon p50", 50.0), ("time to cordon p99", 99.0)] {
            rep.fig(
                name,
                super::pct(&ts, p),
                "ms",
                &format!(
                    "first wave ({first_wave} nodes): uevent sent -> node unschedulable on the watch; floor {floor_rate:.1} nodes/s"
                ),
            );
        }
    }
    if let (Some(f), Some(l)) = (cordons.first(), cordons.last()) {
        rep.fig(
            "cordons over the whole storm",
            cordons.len() as f64 / l.0.duration_since(t_storm).as_secs_f64().max(1e-9),
            "nodes/s",
            &format!(
                "{} cordons, first at +{:.3} s, last at +{:.1} s (bounded by the budget: the next wave waits for recoveries)",
                cordons.len(),
                f.0.duration_since(t_storm).as_secs_f64(),
                l.0.duration_since(t_storm).as_secs_f64()
            ),
        );
    }
    let series = tracker.series();
    let my_peak = series
        .iter()
        .filter(|(t, _)| *t >= t_storm)
        .map(|(_, c)| *c)
        .max()
        .unwrap_or(0);
    let rec_peak = sc.rec.peak("storm");
    rep.fig(
        "peak nodes under recovery (recorder)",
        rec_peak as f64,
        "nodes",
        &format!("budget {b}; this tracker's own count: {my_peak}"),
    );
    // Operator figures: the leader is the one that used the CPU.
    let samples = sampling.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (i, p) in op_pids.iter().enumerate() {
        let mine: Vec<&super::ProcSample> = samples
            .iter()
            .filter(|(q, _)| q == p)
            .map(|(_, s)| s)
            .collect();
        let (Some(a), Some(z)) = (op_before.get(i), mine.last()) else {
            continue;
        };
        let peak = mine.iter().map(|s| s.hwm_kib).max().unwrap_or(0);
        rep.fig(
            &format!("operator pid {p}: peak RSS (VmHWM)"),
            peak as f64 / 1024.0,
            "MiB",
            "over the storm",
        );
        rep.fig(
            &format!("operator pid {p}: CPU during the storm"),
            super::cpu_percent(a, z),
            "% of one core",
            &format!(
                "{:.2} CPU-seconds over {:.1} s",
                z.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / super::clk_tck(),
                z.at.zip(a.at)
                    .map(|(z, a)| z.duration_since(a).as_secs_f64())
                    .unwrap_or(0.0)
            ),
        );
    }
    if let (Some(p), Some(a)) = (pool_pid, pool_before.as_ref()) {
        let mine: Vec<&super::ProcSample> = samples
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, s)| s)
            .collect();
        if let Some(z) = mine.last() {
            rep.fig(
                "agent pool: peak RSS (VmHWM)",
                mine.iter().map(|s| s.hwm_kib).max().unwrap_or(0) as f64 / 1024.0,
                "MiB",
                &format!("{} agent instances, over the storm", n + 1),
            );
            rep.fig(
                "agent pool: CPU during the storm",
                super::cpu_percent(a, z),
                "% of one core",
                &format!(
                    "{:.2} CPU-seconds for {} instances",
                    z.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / super::clk_tck(),
                    n + 1
                ),
            );
        }
    }
    let delta = |k: &str| req_after.get(k).unwrap_or(&0.0) - req_before.get(k).unwrap_or(&0.0);
    let by = grown_most_first(&req_before, &req_after, |k| !k.starts_with('='));
    rep.fig(
        "API requests per wedge",
        delta("_total") / n as f64,
        "requests",
        &format!(
            "apiserver_request_total delta over the storm / {n}; every client (agents, operators, kwok, controllers, this harness) included; by resource: {}",
            by.iter()
                .take(8)
                .map(|(k, d)| format!("{k} {:.1}", d / n as f64))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let op_delta =
        |k: &str| op_req_after.get(k).unwrap_or(&0.0) - op_req_before.get(k).unwrap_or(&0.0);
    let op_by = grown_most_first(&op_req_before, &op_req_after, |_| true);
    rep.fig(
        "operator API requests per wedge",
        op_delta("_total") / n as f64,
        "requests",
        &format!(
            "requests both operator replicas sent during the storm (their own count, unwedge_operator_api_requests_total) / {n}; by verb and resource: {}",
            op_by
                .iter()
                .map(|(k, d)| format!("{k} {:.2}", d / n as f64))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );

    let calls = |verb: &str, path: &str, codes: &[&str]| -> f64 {
        codes
            .iter()
            .map(|c| delta(&format!("={verb} {path} {c}")))
            .sum()
    };
    let lost = calls("PATCH", "gpuwedges/status", &["409", "422"]);
    rep.fig(
        "GpuWedge status writes that lost",
        lost,
        "writes",
        &format!(
            "PATCHes of gpuwedges/status answered 409 (resourceVersion) or 422 (a failed JSON patch test), every client; {:.0} status PATCHes in all",
            calls("PATCH", "gpuwedges/status", &["200", "409", "422"])
        ),
    );
    rep.fig(
        "pod LISTs per wedge",
        calls("LIST", "pods", &["200"]) / n as f64,
        "requests",
        "LIST pods answered 200 during the storm / wedges (the operator lists a node's pods for a decision that reads them)",
    );

    // Invariants: peak ≤ budget, exactly one wedge per node reaching Recovered exactly once,
    // one approved attempt each, and the journals: exactly one unbind and one bind per approved
    // rebind attempt.
    let mut errs: Vec<String> = vec![];
    if rec_peak > b || my_peak > b {
        errs.push(format!(
            "peak nodes under recovery {rec_peak} (recorder) / {my_peak} (tracker) > budget {b}"
        ));
    }
    if let Err(e) = sc.check_invariants() {
        errs.push(e);
    }
    let mut per_node: BTreeMap<&str, Vec<&WedgeTrack>> = BTreeMap::new();
    for w in ws.values() {
        per_node.entry(w.node.as_str()).or_default().push(w);
    }
    let approvals = sc.rec.approvals();
    for name in sc.fleet.nodes.keys() {
        if name == "storm-solo" {
            continue;
        }
        let mine = per_node.get(name.as_str()).cloned().unwrap_or_default();
        if mine.len() != 1 || mine[0].recovered_entries != 1 {
            errs.push(format!(
                "node {name}: {} storm wedges, Recovered entries {:?} (want exactly one wedge, Recovered once)",
                mine.len(),
                mine.iter().map(|w| w.recovered_entries).collect::<Vec<_>>()
            ));
        }
    }
    for (name, node) in &sc.fleet.nodes {
        let bdf = &node.sysfs.gpus()[0].bdf;
        let appr: Vec<_> = approvals.iter().filter(|a| &a.node == name).collect();
        let rebinds = appr.iter().filter(|a| a.method == "rebind").count();
        let want = 1;
        let (u, bi) = (
            node.sysfs.count("unbind", bdf),
            node.sysfs.count("bind", bdf),
        );
        if appr.len() != want || rebinds != want || u != want || bi != want {
            errs.push(format!(
                "node {name}: {} approvals ({rebinds} rebind), journal {u} unbind / {bi} bind (want {want} each)",
                appr.len()
            ));
        }
    }
    let png = opts
        .plot
        .clone()
        .unwrap_or_else(|| super::out_dir().join(format!("storm-{n}.png")));
    let pts: Vec<(f64, usize)> = series
        .iter()
        .filter(|(t, _)| *t >= t_storm)
        .map(|(t, c)| (t.duration_since(t_storm).as_secs_f64(), *c))
        .collect();
    super::plot::nodes_under_recovery(&png, &pts, b, n, total.as_secs_f64())?;
    rep.note(format!("plot: {}", png.display()));
    if !errs.is_empty() {
        anyhow::bail!(
            "storm invariants violated:\n{}",
            errs.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
        );
    }
    rep.note(format!(
        "invariants held: peak ≤ {b}; {n} wedges, each Recovered exactly once; one approval and exactly one unbind + one bind per node in the sysfs journals; recorder invariants 1–3"
    ));

    if opts.watch_nodes > 0 {
        watched_nodes(&mut rep, &cp, &client, &op_pids, opts.watch_nodes).await?;
    }
    drop(tracker);
    drop(sc);
    cp.stop().await;
    Ok(rep)
}

/// The counters (but `_total`) that grew from `before` to `after` and that `keep` names, with
/// their growth, largest first.
fn grown_most_first(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, f64)> {
    let mut by: Vec<(String, f64)> = after
        .iter()
        .filter(|(k, _)| k.as_str() != "_total" && keep(k))
        .map(|(k, v)| (k.clone(), v - before.get(k).unwrap_or(&0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    by
}

/// A kwok Node named `name` (no GPU, no agent) with `status`.
fn kwok_node(name: &str, status: serde_json::Value) -> anyhow::Result<Node> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "labels": {"type": "kwok", "kubernetes.io/hostname": name},
            "annotations": {crate::cluster::KWOK_NODE_ANNOTATION: "fake"}
        },
        "status": status
    }))?)
}

/// Nodes the floor is measured over.
const FLOOR_NODES: usize = 200;

/// Makes `count` kwok nodes (no GPU, no agent), cordons them one after another with one client
/// (a merge patch of `spec.unschedulable` each, as a cordon is), then deletes them: cordons per
/// second and the seconds the cordons took. Nodes of their own, so the recorder never sees a
/// storm node cordoned or uncordoned by anyone but unwedge.
async fn floor_cordon_rate(client: &Client, count: usize) -> anyhow::Result<(f64, f64)> {
    let api: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = (0..count).map(|i| format!("floor-{i:05}")).collect();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                let node = kwok_node(&name, serde_json::json!({}))?;
                api.create(&Default::default(), &node)
                    .await
                    .with_context(|| format!("floor: create node {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let cordon = kube::api::Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}}));
    let t = Instant::now();
    for n in &names {
        api.patch(n, &Default::default(), &cordon)
            .await
            .with_context(|| format!("floor: cordon {n}"))?;
    }
    let secs = t.elapsed().as_secs_f64();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                api.delete(&name, &Default::default())
                    .await
                    .with_context(|| format!("floor: delete node {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok((count as f64 / secs.max(1e-9), secs))
}

/// Grows the cluster to `target` extra kwok nodes (not GPU nodes, not selected by the policy)
/// and reads the operators' RSS; stops early (and says where) when creation stalls.
async fn watched_nodes(
    rep: &mut Report,
    cp: &crate::cluster::ControlPlane,
    client: &Client,
    op_pids: &[u32],
    target: usize,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let t = Instant::now();
    let limit = Duration::from_secs(900);
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let _ = cp;
    let res = futures::stream::iter(0..target)
        .map(|i| {
            let nodes = nodes.clone();
            let made = made.clone();
            async move {
                if t.elapsed() > limit {
                    anyhow::bail!("stopped: {limit:?} elapsed");
                }
                let node = kwok_node(
                    &format!("watched-{i:05}"),
                    serde_json::json!({"capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                                       "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"}}),
                )?;
                nodes
                    .create(&Default::default(), &node)
                    .await
                    .with_context(|| format!("create node watched-{i:05}"))?;
                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await;
    let made = made.load(std::sync::atomic::Ordering::SeqCst);
    rep.fig(
        "watched kwok nodes created",
        made as f64,
        "nodes",
        &format!(
            "in {:.1} s (16 concurrent creates)",
            t.elapsed().as_secs_f64()
        ),
    );
    if let Err(e) = res {
        rep.note(format!("node creation stopped after {made} nodes: {e:#}"));
    }
    // Let kwok heartbeat them and the operators' node caches absorb the updates.
    super::sleep(Duration::from_secs(60)).await;
    let total = nodes
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
        .ok()
        .and_then(|l| l.metadata.remaining_item_count)
        .map(|r| r + 1)
        .unwrap_or(0);
    for p in op_pids {
        if let Ok(s) = sample(*p) {
            rep.fig(
                &format!("operator pid {p}: RSS with the extra nodes watched"),
                s.rss_kib as f64 / 1024.0,
                "MiB",
                &format!(
                    "VmHWM {:.1} MiB; ~{total} nodes in the cluster 60 s after creation (goal ≤ 256 MiB)",
                    s.hwm_kib as f64 / 1024.0
                ),
            );
        } else {
            rep.note(format!("operator pid {p} is gone after the node growth"));
        }
    }
    Ok(())
}
