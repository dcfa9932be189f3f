//! `agent-footprint`: the real `unwedge-agent` (release build) on one simulated node, idle for
//! a window (RSS, peak RSS, CPU from `/proc/<pid>/stat`, voluntary context switches of every
//! thread as the count of wakeups), then under a flood of irrelevant uevents sent through the
//! kernel into its network namespace (docs/design.md §1) at a fixed rate, then one `WEDGED=` uevent
//! that must still become a GpuWedge.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::Api;
use kube::api::ListParams;
use unwedge_crds::gpuwedge::GpuWedge;

use super::{Report, cpu_percent, sample};
use crate::fleet::{Fleet, NodeSpec};

/// Runs the scenario: `idle` window, then `rate` uevents/s for `flood`.
pub async fn run(
    idle: Duration,
    rate: u64,
    flood: Duration,
    short: bool,
) -> anyhow::Result<Report> {
    let mut rep = Report::new("agent-footprint", short);
    let (cp, bins) = super::control_plane(short).await?;
    let mut fleet = Fleet::new(&cp, bins).await?;
    let node = "fp-a";
    fleet
        .add_node(&cp, NodeSpec::new(node, 2, "xe"), true)
        .await?;
    fleet.wait_agents_ready(Duration::from_secs(60)).await?;
    let pid = fleet.node(node).agent_pid().context("the agent runs")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    rep.note(format!(
        "agent pid {pid} ({}), one node with 2 xe GPUs, no operator; its only API traffic is its own watch",
        exe.display()
    ));
    // Let start-up work (initial lists, reconciliation) finish before the idle window.
    super::sleep(Duration::from_secs(5)).await;
    let a = sample(pid)?;
    super::sleep(idle).await;
    let b = sample(pid)?;
    let secs = idle.as_secs_f64();
    rep.fig(
        "idle RSS (VmRSS)",
        b.rss_kib as f64 / 1024.0,
        "MiB",
        "goal ≤ 8 MiB",
    );
    rep.fig(
        "idle RSS: anonymous (RssAnon)",
        b.anon_kib as f64 / 1024.0,
        "MiB",
        "heap and stacks: the agent's own memory",
    );
    rep.fig(
        "idle RSS: file-backed (RssFile)",
        b.file_kib as f64 / 1024.0,
        "MiB",
        &format!(
            "pages of the mapped executable ({:.1} MiB on disk) and libc; shared and reclaimable",
            std::fs::metadata(&exe).map(|m| m.len()).unwrap_or(0) as f64 / 1024.0 / 1024.0
        ),
    );
    rep.fig(
        "idle peak RSS (VmHWM)",
        b.hwm_kib as f64 / 1024.0,
        "MiB",
        "since start",
    );
    rep.fig(
        "idle CPU",
        cpu_percent(&a, &b),
        "% of one core",
        &format!(
            "utime+stime {} ticks over {secs:.0} s",
            b.cpu_ticks - a.cpu_ticks
        ),
    );
    rep.fig(
        "idle wakeups (voluntary context switches, all threads)",
        (b.voluntary - a.voluntary) as f64,
        &format!("in {secs:.0} s"),
        &format!(
            "{:.2}/s; involuntary {}; goal: no periodic wakeups",
            (b.voluntary - a.voluntary) as f64 / secs,
            b.involuntary - a.involuntary
        ),
    );

    // The flood, paced from a thread inside the agent's namespace.
    let ns = fleet.sim(node).netns.path();
    let total = rate * flood.as_secs();
    let c = sample(pid)?;
    let (sent, took) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, Duration)> {
        super::enter_netns(&ns)?;
        let start = Instant::now();
        let per_tick = (rate / 1000).max(1);
        let mut sent = 0u64;
        while sent < total {
            for _ in 0..per_tick {
                crate::inject::send_to_kernel(&crate::inject::usb_payload(sent))?;
                sent += 1;
            }
            let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Ok((sent, start.elapsed()))
    })
    .await??;
    let d = sample(pid)?;
    rep.fig(
        "flood: uevents sent",
        sent as f64 / took.as_secs_f64(),
        "uevents/s",
        &format!(
            "{sent} irrelevant (SUBSYSTEM=usb) uevents in {:.2} s",
            took.as_secs_f64()
        ),
    );
    rep.fig(
        "flood: agent CPU",
        cpu_percent(&c, &d),
        "% of one core",
        "during the flood",
    );
    rep.fig(
        "flood: RSS after",
        d.rss_kib as f64 / 1024.0,
        "MiB",
        "VmRSS",
    );
    rep.fig(
        "flood: peak RSS",
        d.hwm_kib as f64 / 1024.0,
        "MiB",
        "VmHWM since start",
    );
    rep.fig(
        "flood: voluntary context switches",
        (d.voluntary - c.voluntary) as f64,
        "",
        "fewer than the events: the listener drains several per wakeup",
    );

    // A WEDGED event after the flood must still be reported.
    let g = fleet.sim(node).sysfs.gpus()[1].clone();
    let inj = super::NsInjector::new(&fleet.sim(node).netns.path())?;
    let t0 = inj.send_wedge(&g)?;
    let api: Api<GpuWedge> = Api::all(fleet.client());
    let lp = ListParams::default().labels(&format!("unwedge.io/node={node}"));
    let mut found = None;
    while t0.elapsed() < Duration::from_secs(30) {
        if let Some(w) = api.list(&lp).await?.items.into_iter().next() {
            found = Some(w);
            break;
        }
        super::sleep(Duration::from_millis(20)).await;
    }
    let w = found.with_context(|| {
        format!(
            "the WEDGED uevent sent after the flood did not become a GpuWedge within 30 s; agent log:\n{}",
            crate::fleet::tail(&fleet.sim(node).agent_log(), 30)
        )
    })?;
    anyhow::ensure!(
        w.spec.device.pci_address == g.bdf,
        "the GpuWedge names {} instead of {}",
        w.spec.device.pci_address,
        g.bdf
    );
    rep.fig(
        "WEDGED after the flood reported",
        t0.elapsed().as_secs_f64() * 1000.0,
        "ms",
        &format!(
            "GpuWedge {} (polled every 20 ms)",
            w.metadata.name.unwrap_or_default()
        ),
    );
    anyhow::ensure!(
        fleet.node(node).agent_pid().is_some(),
        "the agent died during the flood"
    );
    drop(inj);
    drop(fleet);
    cp.stop().await;
    Ok(rep)
}
