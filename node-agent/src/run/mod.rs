//! One agent instance's run loop: the uevent listener, the outbox replayer, the executor,
//! start-up reconciliation and the metrics server, wired together. `unwedge-agent` runs one
//! instance per process; a test harness may run many in one process (docs/design.md §7), each with its
//! own [`Instance`]: API client, uevent socket (opened in its node's network namespace),
//! metrics listener and shutdown signal. Nothing here is global: no tracing init, no shared
//! registry. The uevent path (listen, detect, enrich, rescan) is in `run/uevents.rs`.

mod uevents;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use jiff::Timestamp;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use unwedge_crds::GpuWedge;
use unwedge_crds::labels::LABEL_NODE;

use crate::config::{Args, DeviceIdMatchArg};
use crate::dra::{AttributeMap, SliceView};
use crate::executor::{
    AdvertisedCheck, ConsumersCheck, Executor, ExecutorConfig, KubeStore, RestartConfig, WedgeClock,
};
use crate::host::SysfsHost;
use crate::listener::UeventListener;
use crate::metrics::{self, Metrics};
use crate::node_events;
use crate::outbox::{self, Outbox};
use crate::podresources::{self, DeviceIdMatch};
use crate::reporter::{Reporter, WedgeView, revision};
use crate::sysfs::Sysfs;

type AgentExecutor = Executor<SysfsHost, KubeStore>;

/// Opens an instance's uevent socket; called once, inside the runtime, after the outbox and
/// the API client are ready.
pub type BindListener = Box<dyn FnOnce() -> std::io::Result<UeventListener> + Send>;

/// Where an instance serves `/healthz`, `/readyz` and `/metrics`.
pub enum MetricsListen {
    /// Bind this address (the process's network namespace).
    Addr(SocketAddr),
    /// A listener already bound (e.g. inside the node's network namespace); nonblocking.
    Listener(std::net::TcpListener),
}

/// What one agent instance gets from its host process besides its [`Args`].
pub struct Instance {
    /// The API client; `None`: the in-cluster service account or `KUBECONFIG`.
    pub client: Option<Client>,
    /// Opens the uevent socket in the node's network namespace.
    pub bind_listener: BindListener,
    /// The metrics server's listener.
    pub metrics: MetricsListen,
    /// Completes when the instance must stop.
    pub shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Instance {
    /// The production instance: client from the environment, uevent socket in the calling
    /// thread's network namespace (`--uevent-buffer-bytes`), metrics on `args.metrics_addr`,
    /// stop on SIGTERM or SIGINT.
    pub fn from_env(args: &Args) -> anyhow::Result<Instance> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let buffer = args.uevent_buffer_bytes;
        Ok(Instance {
            client: None,
            bind_listener: Box::new(move || UeventListener::bind_with_buffer(buffer)),
            metrics: MetricsListen::Addr(args.metrics_addr),
            shutdown: Box::pin(async move {
                tokio::select! {
                    _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
                }
            }),
        })
    }
}

async fn serve_metrics(
    how: MetricsListen,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match how {
        MetricsListen::Addr(addr) => metrics::serve(addr, metrics, shutdown).await,
        MetricsListen::Listener(l) => {
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(addr = ?l.local_addr().ok(), "serving /healthz /readyz /metrics");
            axum::serve(l, metrics::router(metrics))
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// Everything the uevent path needs.
struct Agent {
    args: Args,
    sysfs: Sysfs,
    host: Arc<SysfsHost>,
    matcher: DeviceIdMatch,
    outbox: Outbox,
    wake: Arc<Notify>,
    clock: WedgeClock,
    metrics: Arc<Metrics>,
    client: Client,
    /// Which ResourceSlice attribute holds a DRA device's PCI address.
    dra_attributes: AttributeMap,
    /// This node's ResourceSlices, from a watch.
    slices: SliceView,
    /// This node's GpuWedges, from the executor's watch.
    wedges: WedgeView,
}

/// Runs one agent instance until its shutdown signal; returns early only when its outbox,
/// API client, uevent socket or attempt journal cannot be set up.
pub async fn run(args: Args, instance: Instance) -> anyhow::Result<()> {
    let Instance {
        client,
        bind_listener,
        metrics: metrics_listen,
        shutdown,
    } = instance;
    tracing::info!(node = %args.node_name, version = env!("CARGO_PKG_VERSION"), dry_run = args.dry_run, "unwedge-agent starting");
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(serve_metrics(
        metrics_listen,
        metrics.clone(),
        stopped(stop_rx.clone()),
    ));

    let outbox = Outbox::open(&args.state_dir).with_context(|| {
        format!(
            "opening the outbox under {} (--state-dir)",
            args.state_dir.display()
        )
    })?;
    let client = match client {
        Some(c) => c,
        None => Client::try_default().await.context(
            "no Kubernetes client configuration (in-cluster service account or KUBECONFIG)",
        )?,
    };
    let matcher = device_id_match(&args);
    let dra_attributes = AttributeMap::parse(&args.dra_pci_attribute, &args.dra_driver_attributes)
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "bad DRA attribute map; using {} for every driver", args.dra_pci_attribute);
            AttributeMap::parse(&args.dra_pci_attribute, "").unwrap_or_default()
        });
    let host = Arc::new(SysfsHost {
        sysfs_root: args.sysfs_root.clone(),
        reboot_mode: args.reboot_mode,
        reboot_command: args.reboot_command.clone(),
        boot_id_path: args.boot_id_path.clone(),
    });
    // One watch of this node's wedges: the executor's events, the reporter's and the rescan's
    // view (driven once the executor's watch task runs; until its first list, they LIST).
    let (wedge_store, wedge_writer) = reflector::store();
    let slices = SliceView::start(client.clone(), &args.node_name);
    let agent = Arc::new(Agent {
        sysfs: Sysfs::new(&args.sysfs_root),
        host: host.clone(),
        matcher,
        outbox: outbox.clone(),
        wake: Arc::new(Notify::new()),
        clock: WedgeClock::default(),
        metrics: metrics.clone(),
        client: client.clone(),
        dra_attributes,
        slices,
        wedges: WedgeView::new(wedge_store.clone()),
        args,
    });

    let mut listener = bind_listener().context("binding the NETLINK_KOBJECT_UEVENT socket")?;
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        recv_buffer = listener.recv_buffer(),
        "listening for WEDGED uevents"
    );

    uevents::reconcile(&agent, "start").await;

    let m = metrics.clone();
    let rejected = outbox.clone();
    let (rejected_node, rejected_client) = (agent.args.node_name.clone(), client.clone());
    let mut rejected_seen = 0;
    let replayer = tokio::spawn(outbox::run_replayer(
        outbox,
        uevents::EnrichingReporter {
            agent: agent.clone(),
            reporter: Reporter::new(client.clone(), agent.args.node_name.clone())
                .dry_run(agent.args.dry_run)
                .watching(agent.wedges.clone()),
        },
        agent.wake.clone(),
        Duration::from_secs(2),
        Duration::from_secs(10),
        move |pass, pending| {
            m.wedges_reported.inc_by(pass.reported.len() as u64);
            if pass.stalled {
                m.api_errors.inc();
            }
            m.outbox_pending.set(pending as i64);
            let total = rejected.rejected_total();
            let new = total.saturating_sub(rejected_seen);
            m.outbox_rejected.inc_by(new);
            rejected_seen = total;
            if new > 0 {
                let note = format!(
                    "{new} detected wedge(s) refused for good by the API server (or unreadable), never to be retried; kept for a human in {} on this node",
                    rejected.rejected_dir().display()
                );
                let ev = node_events::warning(
                    &rejected_node,
                    node_events::REASON_REPORT_REJECTED,
                    "Report",
                    &note,
                    Timestamp::now(),
                );
                let client = rejected_client.clone();
                tokio::spawn(async move { node_events::publish(&client, &ev).await });
            }
        },
    ));
    agent.wake.notify_one();

    let executor = Arc::new(
        Executor::new(
            ExecutorConfig {
                proc_root: agent.args.proc_root.clone(),
                dev_root: agent.args.dev_root.clone(),
                dry_run: agent.args.dry_run,
                settle: agent.args.settle,
                verify_command: verify_command(&agent.args),
                gate_interval: Duration::from_secs(2),
                reappear_timeout: agent.args.reappear_timeout,
                advertised: Some(advertised_check(&agent)),
                restarts: Some(RestartConfig {
                    socket: agent.args.cri_socket.clone(),
                    grace: agent.args.restart_grace,
                    timeout: agent.args.restart_timeout,
                    consumers: consumers_check(&agent),
                }),
            },
            host,
            KubeStore::new(client.clone()),
            &agent.args.state_dir,
            agent.outbox.clone(),
            agent.clock.clone(),
            metrics.clone(),
        )
        .context("opening the attempt journal (--state-dir)")?,
    );
    let watch = tokio::spawn(run_executor(
        client,
        agent.args.node_name.clone(),
        (wedge_store, wedge_writer),
        agent.wedges.clone(),
        executor,
        metrics.clone(),
    ));

    uevents::listen(&agent, &mut listener, shutdown).await;
    let _ = stop_tx.send(true);
    replayer.abort();
    watch.abort();
    agent.slices.stop();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    tracing::info!(
        pending = agent.outbox.len(),
        "stopped; unreported wedges stay in the outbox"
    );
    Ok(())
}

/// `--verify-command`, unset when blank; a program given by a path that does not exist is
/// logged at start, not only when the first recovery fails on it.
fn verify_command(args: &Args) -> Option<String> {
    let cmd = args
        .verify_command
        .clone()
        .filter(|c| !c.trim().is_empty())?;
    if let Ok(parsed) = crate::verify_command::VerifyCommand::parse(&cmd) {
        let program = std::path::Path::new(&parsed.argv()[0]);
        if program.is_absolute() && !program.exists() {
            tracing::error!(program = %program.display(), "--verify-command names a program that does not exist in the agent's image; every recovery will fail verification until it is fixed (it runs without a shell)");
        }
    }
    Some(cmd)
}

/// Asks the kubelet (PodResources `GetAllocatableResources`) whether a GPU is advertised
/// again; an unreachable kubelet cannot tell (logged), which must not hold a recovery.
fn advertised_check(agent: &Agent) -> AdvertisedCheck {
    let socket = agent.args.pod_resources_socket.clone();
    let (matcher, sysfs) = (agent.matcher.clone(), agent.sysfs.clone());
    AdvertisedCheck(Arc::new(move |bdf: String| {
        let (socket, matcher, sysfs) = (socket.clone(), matcher.clone(), sysfs.clone());
        Box::pin(async move {
            match podresources::allocatable(&socket).await {
                Ok(a) => podresources::advertised(&a, &bdf, &matcher, &sysfs),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the kubelet whether {bdf} is advertised again");
                    None
                }
            }
        })
    }))
}

/// Asks the kubelet (PodResources `List`) which containers hold a GPU now, for an in-place
/// restart; an unreachable kubelet vouches for none (logged), so only the blamed container
/// can be restarted.
fn consumers_check(agent: &Agent) -> ConsumersCheck {
    let socket = agent.args.pod_resources_socket.clone();
    let (matcher, sysfs) = (agent.matcher.clone(), agent.sysfs.clone());
    ConsumersCheck(Arc::new(move |bdf: String| {
        let (socket, matcher, sysfs) = (socket.clone(), matcher.clone(), sysfs.clone());
        Box::pin(async move {
            match podresources::list(&socket).await {
                Ok(list) => {
                    podresources::consumers(&list, std::slice::from_ref(&bdf), &matcher, &sysfs)
                        .into_iter()
                        .map(|c| (c.namespace, c.pod, c.container))
                        .collect()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask the kubelet which containers hold {bdf}");
                    Vec::new()
                }
            }
        })
    }))
}

fn device_id_match(args: &Args) -> DeviceIdMatch {
    let kind = match args.device_id_match {
        DeviceIdMatchArg::Auto => "auto",
        DeviceIdMatchArg::Pci => "pci",
        DeviceIdMatchArg::Card => "card",
        DeviceIdMatchArg::Index => "index",
        DeviceIdMatchArg::Map => "map",
    };
    DeviceIdMatch::from_options(kind, args.device_id_map.as_deref()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "bad --device-id-match/--device-id-map; matching device ids with auto instead");
        DeviceIdMatch::Auto
    })
}

async fn run_executor(
    client: Client,
    node: String,
    (reader, writer): (
        reflector::Store<GpuWedge>,
        reflector::store::Writer<GpuWedge>,
    ),
    view: WedgeView,
    executor: Arc<AgentExecutor>,
    metrics: Arc<Metrics>,
) {
    let api: Api<GpuWedge> = Api::all(client);
    let cfg = watcher::Config::default().labels(&format!("{LABEL_NODE}={node}"));
    let stream = reflector(writer, watcher(api, cfg)).default_backoff();
    futures::pin_mut!(stream);
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    let mut listing = 0;
    let spawn = |w: GpuWedge| {
        let ex = executor.clone();
        tokio::spawn(async move {
            ex.process(&w).await;
        });
    };
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Apply(w))) => {
                    view.delivered(revision(&w));
                    spawn(w)
                }
                Some(Ok(watcher::Event::Delete(w))) => view.delivered(revision(&w)),
                // A (re)list reaches the store only at its end.
                Some(Ok(watcher::Event::Init)) => listing = 0,
                Some(Ok(watcher::Event::InitApply(w))) => {
                    listing = listing.max(revision(&w).unwrap_or(0));
                    spawn(w)
                }
                Some(Ok(watcher::Event::InitDone)) => view.delivered(Some(listing)),
                Some(Err(e)) => {
                    metrics.api_errors.inc();
                    tracing::warn!(error = %e, "GpuWedge watch error; retrying");
                }
                None => break,
            },
            _ = resync.tick() => {
                for w in reader.state() {
                    spawn((*w).clone());
                }
            }
        }
    }
}
