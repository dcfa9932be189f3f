//! One agent instance's run loop: the uevent listener, the outbox replayer, the executor,
//! start-up reconciliation and the metrics server, wired together. `unwedge-agent` runs one
//! instance per process; a test harness may run many in one process (docs/design.md §7), each with its
//! own [`Instance`]: API client, uevent socket (opened in its node's network namespace),
//! metrics listener and shutdown signal. Nothing here is global: no tracing init, no shared
//! registry.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use unwedge_crds::labels::{LABEL_NODE, UEVENT_SURVIVABILITY_MODE};
use unwedge_crds::{DeviceRef, DraDeviceRef, GpuWedge};

use crate::config::{Args, DeviceIdMatchArg};
use crate::dra::{self, AttributeMap};
use crate::executor::{AdvertisedCheck, Executor, ExecutorConfig, KubeStore, WedgeClock};
use crate::host::{HostActions, SysfsHost};
use crate::listener::{ListenError, UeventListener};
use crate::metrics::{self, Metrics};
use crate::node_events::{self, RateLimit};
use crate::outbox::{self, Outbox};
use crate::podresources::{self, DeviceIdMatch};
use crate::reporter::{
    BlamedTask, DetectedWedge, ReportError, Reported, Reporter, Source, bdf_from_devpath,
};
use crate::startup;
use crate::sysfs::Sysfs;
use crate::uevent::{self, WedgeUevent};
use crate::{blamed, reporter};

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

    reconcile(&agent, "start").await;

    let m = metrics.clone();
    let rejected = outbox.clone();
    let (rejected_node, rejected_client) = (agent.args.node_name.clone(), client.clone());
    let mut rejected_seen = 0;
    let replayer = tokio::spawn(outbox::run_replayer(
        outbox,
        EnrichingReporter {
            agent: agent.clone(),
            reporter: Reporter::new(client.clone(), agent.args.node_name.clone())
                .dry_run(agent.args.dry_run),
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
        executor,
        metrics.clone(),
    ));

    let mut foreign_seen = 0;
    let mut lost_events = RateLimit::new(LOST_UEVENTS_EVENT_INTERVAL);
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = listener.next() => {
                match msg {
                    Ok(buf) => on_message(&agent, &buf).await,
                    Err(ListenError::Overrun) => {
                        metrics.netlink_overruns.inc();
                        metrics.uevents_lost.inc();
                        tracing::warn!("uevent receive buffer overrun: uevents were lost; reconciling from sysfs and the API");
                        let a = agent.clone();
                        let event = lost_events.allow(std::time::Instant::now());
                        tokio::spawn(async move { uevents_lost(&a, event).await });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "uevent socket error; continuing");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                let foreign = listener.dropped_foreign();
                for _ in foreign_seen..foreign {
                    metrics.uevent("foreign");
                }
                foreign_seen = foreign;
            }
        }
    }
    let _ = stop_tx.send(true);
    replayer.abort();
    watch.abort();
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

/// `KEY` names of a raw message, for a log line that does not dump untrusted values.
fn key_summary(buf: &[u8]) -> String {
    buf.split(|b| *b == 0)
        .skip(1)
        .filter_map(|f| {
            f.iter()
                .position(|b| *b == b'=')
                .map(|i| String::from_utf8_lossy(&f[..i]).into_owned())
        })
        .take(32)
        .collect::<Vec<_>>()
        .join(",")
}

async fn on_message(agent: &Arc<Agent>, buf: &[u8]) {
    match uevent::parse(buf) {
        Ok(None) => agent.metrics.uevent("ignored"),
        Ok(Some(ev)) => {
            agent.metrics.uevent("wedge");
            on_wedge(agent, ev).await;
        }
        Err(e) => {
            agent.metrics.uevent("malformed");
            tracing::warn!(error = %e, keys = %key_summary(buf), len = buf.len(), "malformed uevent ignored; the agent keeps running");
        }
    }
}

/// A wedge is written to the outbox first (invariant 4), enriched, rewritten, then reported.
async fn on_wedge(agent: &Arc<Agent>, ev: WedgeUevent) {
    let detected_at =
        Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now());
    let mut problems = Vec::new();
    let (device, reset_domain) = match agent.sysfs.resolve_devpath(&ev.devpath) {
        Ok(r) => (r.device, r.reset_domain),
        Err(e) => {
            tracing::error!(devpath = %ev.devpath, error = %e, "cannot resolve the wedged device in sysfs; reporting what the uevent says");
            problems.push(format!("sysfs: {e}"));
            let device = DeviceRef {
                pci_address: bdf_from_devpath(&ev.devpath).unwrap_or_default(),
                card: Some(ev.card.clone()),
                ..DeviceRef::default()
            };
            (device, Vec::new())
        }
    };
    agent.clock.wedged(&device.pci_address);
    let boot_id = agent.host.boot_id().unwrap_or_else(|e| {
        problems.push(format!("boot id: {e}"));
        String::new()
    });
    let blamed = ev.pid.map(|pid| {
        let mut b = BlamedTask {
            pid,
            task: ev.task.clone(),
            ..BlamedTask::default()
        };
        match blamed::cgroup_of(&agent.args.proc_root, pid) {
            Ok(info) => {
                b.container_id = info.container_id;
                b.pod_uid = info.pod_uid;
            }
            Err(e) => tracing::info!(pid, error = %e, "blamed task not mapped to a container"),
        }
        b
    });
    let unknown: Vec<&String> = ev
        .methods
        .iter()
        .filter(|m| !unwedge_crds::Method::from(*m).agent_knows())
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(methods = ?ev.methods, unknown = ?unknown, "WEDGED names methods this agent cannot carry out; reporting them verbatim for the operator's policy");
    }
    let mut uevent = ev.raw.clone();
    vendor_hint(
        &agent.sysfs,
        &ev.methods,
        &device.pci_address,
        &mut uevent,
        &mut problems,
    );
    let mut d = DetectedWedge {
        node: agent.args.node_name.clone(),
        device,
        methods: ev.methods.clone(),
        detected_at,
        boot_id,
        uevent,
        seqnum: ev.seqnum,
        blamed,
        consumers: Vec::new(),
        reset_domain,
        agent_message: (!problems.is_empty()).then(|| problems.join("; ")),
        source: Source::Uevent,
        enriched: false,
    };
    tracing::warn!(wedge = %d.name(), pci = %d.device.pci_address, methods = ?d.methods, seqnum = ?d.seqnum, "GPU wedged");
    if !reporter::is_bdf(&d.device.pci_address) {
        tracing::error!(devpath = %ev.devpath, "wedged device has no PCI address; it cannot be reported as a GpuWedge");
        return;
    }
    // The bare detection is made durable while the kubelet and the API are asked about it.
    // The enriched one is then handed to the replayer from memory: a crash before the API
    // accepts it leaves the bare entry on disk, which is enriched again when replayed.
    let first_write = {
        let (outbox, bare) = (agent.outbox.clone(), d.clone());
        tokio::task::spawn_blocking(move || outbox.put(&bare))
    };
    enrich(agent, &mut d).await;
    match first_write.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, dir = %agent.outbox.dir().display(), "cannot write the outbox; the detection is kept in memory until reported")
        }
        Err(e) => tracing::error!(error = %e, "the outbox write panicked"),
    }
    agent.outbox.stage(&d);
    agent.metrics.outbox_pending.set(agent.outbox.len() as i64);
    agent.wake.notify_one();
}

/// What the agent adds to a wedge that lists `vendor-specific` (docs/design.md §1): xe's sysfs
/// `survivability_mode` of the device, as the `spec.uevent` key [`UEVENT_SURVIVABILITY_MODE`]
/// (unless the kernel sent that key itself), from which the operator's NeedsAttention message
/// names the firmware flash, and a note for a human. Nothing for other wedges, or when the
/// attribute is absent (not xe, or not in survivability mode).
fn vendor_hint(
    sysfs: &Sysfs,
    methods: &[String],
    bdf: &str,
    uevent: &mut BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    if !methods.iter().any(|m| m == "vendor-specific") {
        return;
    }
    let Some(mode) = sysfs.survivability_mode(bdf) else {
        return;
    };
    tracing::warn!(pci = %bdf, mode = %mode, "vendor-specific wedge in xe survivability mode: the GPU needs a firmware flash (fwupd)");
    let first = mode.lines().next().unwrap_or_default().to_string();
    problems.push(format!(
        "xe survivability_mode {first:?}: the GPU needs a firmware flash (fwupd)"
    ));
    uevent
        .entry(UEVENT_SURVIVABILITY_MODE.to_string())
        .or_insert(mode);
}

/// Fills in what the node knows about a detection beyond sysfs: the containers holding a
/// device of its reset domain (kubelet PodResources) and, on DRA nodes, its DRA device.
async fn enrich(agent: &Agent, d: &mut DetectedWedge) {
    let mut domain: Vec<String> = d
        .reset_domain
        .iter()
        .map(|x| x.pci_address.clone())
        .collect();
    domain.push(d.device.pci_address.clone());
    // The kubelet and the API server are asked at once.
    let (listed, (dra, dra_note)) = tokio::join!(
        podresources::list(&agent.args.pod_resources_socket),
        dra_device(agent, &d.device.pci_address)
    );
    match &listed {
        Ok(list) => {
            d.consumers = podresources::consumers(list, &domain, &agent.matcher, &agent.sysfs)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list consumers from the kubelet; reporting without them");
            let note = format!("consumers unknown: {e}");
            d.agent_message = Some(match d.agent_message.take() {
                Some(m) => format!("{m}; {note}"),
                None => note,
            });
        }
    }
    d.device.dra = dra;
    if let Some(note) = dra_note {
        d.agent_message = Some(match d.agent_message.take() {
            Some(m) => format!("{m}; {note}"),
            None => note,
        });
    }
    if let (Ok(list), Some(dev)) = (&listed, &d.device.dra) {
        for c in podresources::dra_consumers(list, dev, &d.device.pci_address) {
            if !d.consumers.contains(&c) {
                d.consumers.push(c);
            }
        }
    }
    d.enriched = true;
}

/// The replayer's way to the API: enriches a detection stored before its enrichment (an
/// agent restart in between, a startup finding), then reports it.
struct EnrichingReporter {
    agent: Arc<Agent>,
    reporter: Reporter,
}

impl outbox::Sink for EnrichingReporter {
    async fn report(&self, wedge: &DetectedWedge) -> Result<Reported, ReportError> {
        if wedge.enriched {
            return self.reporter.report(wedge).await;
        }
        let mut d = wedge.clone();
        enrich(&self.agent, &mut d).await;
        self.reporter.report(&d).await
    }
}

/// On DRA nodes: the wedged device's name in this node's ResourceSlices (`spec.device.dra`),
/// so the operator quarantines the device instead of cordoning the node. No slices (or no
/// right to read them: DRA is off in the chart) leaves the wedge a device-plugin one; slices
/// without the device give a note saying why, for the agent message.
async fn dra_device(agent: &Agent, pci: &str) -> (Option<DraDeviceRef>, Option<String>) {
    let node = &agent.args.node_name;
    let lookup = dra::lookup(&agent.client, node, pci, &agent.dra_attributes);
    let note = match tokio::time::timeout(Duration::from_secs(5), lookup).await {
        Ok(Ok(dra::Lookup::Found(dev))) => {
            tracing::info!(driver = %dev.driver, pool = %dev.pool, device = %dev.device, "wedged GPU is a DRA device");
            return (Some(dev), None);
        }
        Ok(Ok(dra::Lookup::NoSlices)) => return (None, None),
        Ok(Ok(dra::Lookup::NoMatch(why))) => format!("DRA: {why}"),
        Ok(Err(kube::Error::Api(s))) if s.code == 403 || s.code == 404 => {
            tracing::debug!(error = %s.message, "ResourceSlices not readable: not a DRA node for unwedge");
            return (None, None);
        }
        Ok(Err(e)) => format!("DRA: cannot list this node's ResourceSlices ({e}); handled like a device-plugin node"),
        Err(_) => "DRA: listing this node's ResourceSlices took over 5s; handled like a device-plugin node".to_string(),
    };
    tracing::warn!(%note, "wedged GPU not matched to a DRA device");
    (None, Some(note))
}

/// At most one `GpuUeventsLost` Event per node in this interval (an overrun storm).
const LOST_UEVENTS_EVENT_INTERVAL: Duration = Duration::from_secs(300);

/// After an overrun: the rescan, then a note for a human in the log and, when `event`, in a
/// Warning Event on the Node (the agent has no right to set a node condition).
async fn uevents_lost(agent: &Arc<Agent>, event: bool) {
    let findings = reconcile(agent, "overrun").await;
    let note = startup::lost_uevents_note(&agent.sysfs.gpus(), &findings);
    tracing::warn!(%note, "uevents lost");
    if event {
        let ev = node_events::warning(
            &agent.args.node_name,
            node_events::REASON_UEVENTS_LOST,
            "Rescan",
            &note,
            Timestamp::now(),
        );
        node_events::publish(&agent.client, &ev).await;
    }
}

async fn reconcile(agent: &Arc<Agent>, why: &str) -> Vec<startup::Finding> {
    let api: Api<GpuWedge> = Api::all(agent.client.clone());
    let lp = ListParams::default().labels(&format!("{LABEL_NODE}={}", agent.args.node_name));
    let wedges = match tokio::time::timeout(Duration::from_secs(5), api.list(&lp)).await {
        Ok(Ok(l)) => l.items,
        Ok(Err(e)) => {
            agent.metrics.api_errors.inc();
            tracing::warn!(error = %e, "reconciliation without the API's view of open incidents");
            Vec::new()
        }
        Err(_) => {
            agent.metrics.api_errors.inc();
            tracing::warn!(
                "API did not answer within 5s; reconciliation without its view of open incidents"
            );
            Vec::new()
        }
    };
    let boot_id = agent.host.boot_id().unwrap_or_default();
    let (findings, detections) =
        startup::reconcile(&agent.sysfs, &agent.args.node_name, &boot_id, &wedges);
    tracing::info!(why, findings = findings.len(), "reconciliation done");
    for f in &findings {
        agent.metrics.finding(f.kind());
    }
    for d in detections {
        if let Err(e) = agent.outbox.put(&d) {
            tracing::error!(error = %e, "cannot write the outbox");
        }
    }
    agent.wake.notify_one();
    findings
}

async fn run_executor(
    client: Client,
    node: String,
    executor: Arc<AgentExecutor>,
    metrics: Arc<Metrics>,
) {
    let api: Api<GpuWedge> = Api::all(client);
    let (reader, writer) = reflector::store();
    let cfg = watcher::Config::default().labels(&format!("{LABEL_NODE}={node}"));
    let stream = reflector(writer, watcher(api, cfg))
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let mut resync = tokio::time::interval(Duration::from_secs(30));
    let spawn = |w: GpuWedge| {
        let ex = executor.clone();
        tokio::spawn(async move {
            ex.process(&w).await;
        });
    };
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(w)) => spawn(w),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vendor_specific_wedge_carries_xe_survivability_mode() {
        let dir = tempfile::tempdir().unwrap();
        let bdfs =
            crate::sysfs::fixture::build(dir.path(), crate::sysfs::fixture::Layout::Xe).unwrap();
        let sysfs = Sysfs::new(dir.path());
        let bdf = &bdfs[0];
        let methods = |m: &str| m.split(',').map(str::to_string).collect::<Vec<_>>();
        let hint = |m: &str, uevent: &[(&str, &str)]| {
            let mut u: BTreeMap<String, String> = uevent
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut problems = Vec::new();
            vendor_hint(&sysfs, &methods(m), bdf, &mut u, &mut problems);
            (u, problems)
        };
        // Not in survivability mode: nothing added.
        assert_eq!(hint("vendor-specific", &[]), (BTreeMap::new(), vec![]));
        std::fs::write(
            dir.path()
                .join(format!("bus/pci/devices/{bdf}/survivability_mode")),
            "Survivability mode type: Runtime\n",
        )
        .unwrap();
        let (u, problems) = hint("vendor-specific", &[("WEDGED", "vendor-specific")]);
        assert_eq!(
            u.get(UEVENT_SURVIVABILITY_MODE).map(String::as_str),
            Some("Survivability mode type: Runtime")
        );
        assert_eq!(u.len(), 2);
        assert!(problems[0].contains("firmware flash"), "{problems:?}");
        // Other wedges are not touched, and a key the kernel sent is kept.
        assert_eq!(hint("rebind,bus-reset", &[]), (BTreeMap::new(), vec![]));
        let (u, _) = hint(
            "vendor-specific",
            &[(UEVENT_SURVIVABILITY_MODE, "kernel's")],
        );
        assert_eq!(u[UEVENT_SURVIVABILITY_MODE], "kernel's");
    }

    #[test]
    fn key_summary_names_keys_only() {
        assert_eq!(
            key_summary(b"change@/x\0ACTION=change\0WEDGED=secret\0junk"),
            "ACTION,WEDGED"
        );
    }
}
