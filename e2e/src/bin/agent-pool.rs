//! `agent-pool <pool.jsonl>`: many real agent instances in one process (docs/design.md §7), for fleets
//! too large for one `unwedge-agent` process per simulated node. Each line of the file is one
//! node: `{"netns": <path>, "kubeconfig": <path>, "args": [<unwedge-agent flags>]}`. Every
//! instance runs the production run loop ([`unwedge_agent::run::run`]) with its own flags
//! (node name, sysfs and dev roots, state dir, PodResources socket), its own API client from
//! its own kubeconfig (the node's pod-bound token), and its own uevent socket and metrics
//! listener, both opened by a thread that entered the node's network namespace: a socket
//! belongs to the namespace of the thread that created it, so each instance hears only the
//! uevents sent into its node's namespace and answers `/readyz` there. API connections leave
//! from this process's namespace straight to the API server.
//!
//! Runs until SIGTERM or SIGINT; an instance that fails to start is logged and the others
//! keep running.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::Instrument as _;
use unwedge_agent::config::Args;
use unwedge_agent::listener::UeventListener;
use unwedge_agent::run::{Instance, MetricsListen, run};

/// One line of the pool file.
#[derive(serde::Deserialize)]
struct Entry {
    /// The node's network namespace (e.g. `/proc/<pid>/fd/<n>` of the harness).
    netns: PathBuf,
    /// The node's kubeconfig (its agent token).
    kubeconfig: PathBuf,
    /// `unwedge-agent` flags, without the program name.
    args: Vec<String>,
}

/// Opens the uevent socket and binds the metrics listener on a thread inside `netns`.
fn sockets_in_netns(
    netns: &Path,
    rt: tokio::runtime::Handle,
    metrics: SocketAddr,
) -> anyhow::Result<(UeventListener, std::net::TcpListener)> {
    let ns = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    std::thread::spawn(move || -> anyhow::Result<_> {
        // SAFETY: setns moves only this short-lived thread into the namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
        }
        let _rt = rt.enter();
        let listener = UeventListener::bind().context("bind the uevent socket")?;
        let m = std::net::TcpListener::bind(metrics)
            .with_context(|| format!("bind the metrics listener {metrics}"))?;
        m.set_nonblocking(true)?;
        Ok((listener, m))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

async fn instance(
    e: Entry,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Args, Instance)> {
    let args = Args::try_parse_from(std::iter::once("unwedge-agent".to_string()).chain(e.args))?;
    let (listener, metrics) = sockets_in_netns(
        &e.netns,
        tokio::runtime::Handle::current(),
        args.metrics_addr,
    )?;
    let kc = Kubeconfig::read_from(&e.kubeconfig)
        .with_context(|| format!("read {}", e.kubeconfig.display()))?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let client = kube::Client::try_from(cfg)?;
    let mut stop = stop;
    Ok((
        args,
        Instance {
            client: Some(client),
            bind_listener: Box::new(move || Ok(listener)),
            metrics: MetricsListen::Listener(metrics),
            shutdown: Box::pin(async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
        },
    ))
}

fn main() -> anyhow::Result<()> {
    let file = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: agent-pool <pool.jsonl>")?;
    unwedge_telemetry::init("info", unwedge_telemetry::LogFormat::Text);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async move {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut set = tokio::task::JoinSet::new();
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let e: Entry = serde_json::from_str(line)
                .with_context(|| format!("{} line {}", file.display(), i + 1))?;
            let stop = stop_rx.clone();
            set.spawn(async move {
                let (args, inst) = instance(e, stop).await?;
                let node = args.node_name.clone();
                run(args, inst)
                    .instrument(tracing::info_span!("agent", node = %node))
                    .await
                    .with_context(|| format!("agent instance {node}"))
            });
        }
        tracing::info!(instances = set.len(), "agent pool started");
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                done = set.join_next() => match done {
                    Some(Ok(Err(e))) => tracing::error!(error = %format!("{e:#}"), "an agent instance stopped"),
                    Some(Err(e)) => tracing::error!(error = %e, "an agent instance panicked"),
                    Some(Ok(Ok(()))) => {}
                    None => break,
                },
            }
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        Ok(())
    })
}
