//! `bench time-to-cordon`: single wedges one after another, each on a quiet fleet — the time
//! from the uevent (sent into the node's network namespace, through the kernel) to the node
//! unschedulable on a watch, and to Recovered. Issue 27's single-wedge goal (p99 ≤ 150 ms) is
//! measured here; `bench storm` measures the same time inside a storm's first wave.

use std::time::Duration;

use anyhow::Context as _;
use unwedge_crds::Phase;

use super::storm::Tracker;
use super::{NsInjector, Report, load1, pct};
use crate::fleet::{NodeSpec, Scenario};
use crate::wait;

/// Options of the run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Wedges, one after another.
    pub wedges: usize,
    /// Nodes they take turns on (one GPU each).
    pub nodes: usize,
    /// Short (CI) mode.
    pub short: bool,
}

/// Runs the wedges; fails unless each one is cordoned and Recovered.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    super::raise_nofile();
    anyhow::ensure!(opts.nodes > 0 && opts.wedges > 0, "need nodes and wedges");
    let mut rep = Report::new("time-to-cordon", opts.short);
    let (cp, bins) = super::control_plane(opts.short).await?;
    let client = cp.client().await?;
    let (n, count) = (opts.nodes, opts.wedges);
    rep.note(format!(
        "{count} wedges (WEDGED=rebind,bus-reset) one after another, taking turns on {n} kwok nodes with 1 xe GPU each, one real unwedge-agent process per node; each sent after the previous one is Recovered and its node uncordoned; policy maxUnavailable {n}; 2 unwedge-operator replicas with leader election"
    ));
    let specs: Vec<NodeSpec> = (0..n)
        .map(|i| NodeSpec::new(&format!("ttc-{i:03}"), 1, "xe"))
        .collect();
    let sc = Scenario::new(&cp, &bins, "ttc", specs, n, serde_json::json!({}), 2)
        .await
        .context("set up the fleet")?;
    let tracker = Tracker::start(client.clone()).await?;
    let names: Vec<String> = sc.fleet.nodes.keys().cloned().collect();
    let load_before = load1();

    let mut to_cordon = Vec::with_capacity(count);
    let mut to_recovered = Vec::with_capacity(count);
    for i in 0..count {
        let node = &names[i % n];
        let sim = sc.fleet.sim(node);
        let g = sim.sysfs.gpus()[0].clone();
        let inj = NsInjector::new(&sim.netns.path())?;
        let t0 = inj.send_wedge(&g)?;
        drop(inj);
        let what = format!("wedge {i} on {node} Recovered");
        tracker
            .wait_wedges(&what, t0, Duration::from_secs(120), |ws| {
                ws.iter()
                    .any(|w| &w.node == node && w.phase == Phase::Recovered)
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", sc.fail(&what)))?;
        let cordoned = tracker
            .cordons_since(t0)
            .into_iter()
            .find(|(_, name)| name == node)
            .with_context(|| format!("wedge {i}: {node} Recovered but never seen cordoned"))?
            .0;
        let recovered = tracker
            .wedges_since(t0)
            .values()
            .find(|w| &w.node == node)
            .and_then(|w| w.recovered_at)
            .with_context(|| format!("wedge {i}: no Recovered time"))?;
        to_cordon.push(cordoned.duration_since(t0).as_secs_f64() * 1000.0);
        to_recovered.push(recovered.duration_since(t0).as_secs_f64() * 1000.0);
        // The operator uncordons after Recovered: the next wedge starts on a quiet fleet.
        let rec = &sc.rec;
        wait::until(
            &format!("{node} schedulable again after wedge {i}"),
            Duration::from_secs(60),
            || async { Ok((rec.node_cordoned(node) == Some(false)).then_some(())) },
        )
        .await?;
    }
    let load_after = load1();
    to_cordon.sort_by(f64::total_cmp);
    to_recovered.sort_by(f64::total_cmp);
    let loads = format!("load (1 min) {load_before:.2} before, {load_after:.2} after");
    for (name, p) in [
        ("single wedge: time to cordon p50", 50.0),
        ("single wedge: time to cordon p99", 99.0),
    ] {
        rep.fig(
            name,
            pct(&to_cordon, p),
            "ms",
            &format!(
                "{count} wedges one at a time: uevent sent -> node unschedulable on the watch (goal p99 ≤ 150 ms); max {:.1} ms; {loads}",
                to_cordon.last().copied().unwrap_or(0.0)
            ),
        );
    }
    rep.fig(
        "single wedge: uevent to Recovered p50",
        pct(&to_recovered, 50.0),
        "ms",
        &format!(
            "p99 {:.1} ms; rebind, no pods on the device",
            pct(&to_recovered, 99.0)
        ),
    );
    sc.rec
        .check_invariants()
        .map_err(|e| anyhow::anyhow!("recorder invariants: {e}"))?;
    Ok(rep)
}
