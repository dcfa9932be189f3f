//! `cargo run -p e2e --release --bin bench -- <scenario> [--short]`: the benchmarks of issue 17
//! on the real local control plane (see `e2e::bench` and docs/benchmarks.md). Needs root
//! (network namespaces) and the pinned Kubernetes binaries (built on first use).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use e2e::bench;

/// unwedge benchmarks.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Small sizes for CI; the invariants are still asserted.
    #[arg(long, global = true)]
    short: bool,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Idle RSS/CPU/wakeups of the agent, then a flood of irrelevant uevents.
    AgentFootprint {
        /// Idle window, seconds (default 60; --short: 5).
        #[arg(long)]
        idle: Option<u64>,
        /// Flood rate, uevents/s.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// Flood duration, seconds (default 10; --short: 1).
        #[arg(long)]
        flood: Option<u64>,
    },
    /// uevent → GpuWedge on a watch, beside raw creates (the floor).
    DetectionLatency {
        /// Events (default 1000; --short: 50).
        #[arg(long)]
        events: Option<usize>,
    },
    /// N simultaneous wedges on N nodes under a budget.
    Storm {
        /// Nodes (default 1000; --short: 20).
        #[arg(long)]
        nodes: Option<usize>,
        /// maxUnavailable (default 50; --short: 5).
        #[arg(long)]
        budget: Option<usize>,
        /// Extra kwok nodes to watch afterwards (default 10000; --short: 0).
        #[arg(long)]
        watch_nodes: Option<usize>,
        /// Where the nodes-under-recovery plot goes (default: target/bench/storm-<N>.png;
        /// the published one is docs/img/storm-nodes-under-recovery.png).
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
    },
    /// One wedged GPU on an 8-GPU DRA node: DRA quarantine vs node cordon.
    Dra {
        /// Pods holding one GPU each besides the wedged one's (default 0; at most 7).
        #[arg(long, default_value_t = 0)]
        gpu_pods: usize,
        /// Seconds the probe pods are watched while the wedge is open (default 20; --short: 8).
        #[arg(long)]
        window: Option<u64>,
    },
    /// Storms of wedges while SIGKILLs hit the operator leader, the agents and kube-apiserver,
    /// and wedges and nodes are deleted and relabelled (issue 22).
    Chaos {
        /// Storms (default 20; --short: 3).
        #[arg(long)]
        storms: Option<usize>,
        /// Wedges per storm (default 100; --short: 12).
        #[arg(long)]
        wedges: Option<usize>,
        /// kwok nodes (default 30; --short: 6).
        #[arg(long)]
        nodes: Option<usize>,
        /// GPUs per node (default 4; --short: 3).
        #[arg(long)]
        gpus: Option<u32>,
        /// maxUnavailable of each policy (default 10; --short: 3).
        #[arg(long)]
        budget: Option<usize>,
        /// Kills of each process kind the run must reach (default 50; --short: 5).
        #[arg(long)]
        min_kills: Option<usize>,
        /// RNG seed (default: from the clock; printed either way).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Single wedges one after another: uevent -> node cordoned, and -> Recovered.
    TimeToCordon {
        /// Wedges, one after another (default 100; --short: 6).
        #[arg(long)]
        wedges: Option<usize>,
        /// Nodes they take turns on (default 10; --short: 2).
        #[arg(long)]
        nodes: Option<usize>,
    },
    /// Device-scoped drain vs kubectl drain of one node.
    Drain {
        /// Pods on the node (default 100; --short: 20).
        #[arg(long)]
        pods: Option<usize>,
    },
}

/// A seed from the clock, for runs that do not name one.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let short = args.short;
    let pick =
        |v: Option<u64>, full: u64, small: u64| v.unwrap_or(if short { small } else { full });
    let pick_n =
        |v: Option<usize>, full: usize, small: usize| v.unwrap_or(if short { small } else { full });
    let res = match args.scenario {
        Scenario::AgentFootprint { idle, rate, flood } => {
            bench::footprint::run(
                Duration::from_secs(pick(idle, 60, 5)),
                rate,
                Duration::from_secs(pick(flood, 10, 1)),
                short,
            )
            .await
        }
        Scenario::DetectionLatency { events } => {
            bench::latency::run(pick_n(events, 1000, 50), short).await
        }
        Scenario::Storm {
            nodes,
            budget,
            watch_nodes,
            plot,
        } => {
            bench::storm::run(bench::storm::Options {
                nodes: pick_n(nodes, 1000, 20),
                budget: pick_n(budget, 50, 5),
                watch_nodes: pick_n(watch_nodes, 10_000, 0),
                short,
                plot,
            })
            .await
        }
        Scenario::Chaos {
            storms,
            wedges,
            nodes,
            gpus,
            budget,
            min_kills,
            seed,
        } => {
            bench::chaos::run(bench::chaos::Options {
                storms: pick_n(storms, 20, 3),
                wedges: pick_n(wedges, 100, 12),
                nodes: pick_n(nodes, 30, 6),
                gpus: gpus.unwrap_or(if short { 3 } else { 4 }),
                budget: pick_n(budget, 10, 3),
                min_kills: pick_n(min_kills, 50, 5),
                seed: seed.unwrap_or_else(clock_seed),
                settle: Duration::from_secs(30),
                storm_timeout: Duration::from_secs(pick(None, 300, 120)),
                short,
            })
            .await
        }
        Scenario::TimeToCordon { wedges, nodes } => {
            bench::time_to_cordon::run(bench::time_to_cordon::Options {
                wedges: pick_n(wedges, 100, 6),
                nodes: pick_n(nodes, 10, 2),
                short,
            })
            .await
        }
        Scenario::Drain { pods } => bench::drain::run(pick_n(pods, 100, 20), short).await,
        Scenario::Dra { gpu_pods, window } => {
            bench::dra::run(bench::dra::Options {
                gpu_pods,
                window: Duration::from_secs(pick(window, 20, 8)),
                short,
            })
            .await
        }
    };
    match res.and_then(|r| r.save()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
