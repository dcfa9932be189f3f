//! The uevent path of one agent instance: the listen loop, a WEDGED uevent to an outbox entry
//! (resolve in sysfs, map the blamed task, enrich from the kubelet and the API), the rescan
//! after lost uevents, start-up reconciliation, and the replayer's enriching sink.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;
use unwedge_crds::labels::{LABEL_NODE, UEVENT_SURVIVABILITY_MODE};
use unwedge_crds::{DeviceRef, DraDeviceRef, GpuWedge};

use super::Agent;
use crate::host::HostActions;
use crate::listener::{ListenError, UeventListener};
use crate::node_events::{self, RateLimit};
use crate::outbox;
use crate::podresources;
use crate::reporter::{
    self, BlamedTask, DetectedWedge, ReportError, Reported, Reporter, Source, bdf_from_devpath,
};
use crate::startup;
use crate::sysfs::Sysfs;
use crate::uevent::{self, WedgeUevent};
use crate::{blamed, dra};

/// Hears uevents until `shutdown`: each WEDGED one becomes a detection ([`on_wedge`]); an
/// overrun starts a rescan ([`uevents_lost`]); messages from other senders are counted.
pub(super) async fn listen(
    agent: &Arc<Agent>,
    listener: &mut UeventListener,
    mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let metrics = &agent.metrics;
    let mut foreign_seen = 0;
    let mut lost_events = RateLimit::new(LOST_UEVENTS_EVENT_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            msg = listener.next() => {
                match msg {
                    Ok(buf) => on_message(agent, &buf).await,
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
pub(super) struct EnrichingReporter {
    pub(super) agent: Arc<Agent>,
    pub(super) reporter: Reporter,
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
    let lookup = agent.slices.lookup(pci, &agent.dra_attributes);
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

/// The rescan (at start, after lost uevents): sysfs against this node's wedges, from the watch
/// once it has synced; what it finds goes to the outbox, whose report checks again.
pub(super) async fn reconcile(agent: &Arc<Agent>, why: &str) -> Vec<startup::Finding> {
    let wedges = match agent.wedges.all() {
        Some(w) => w,
        None => list_node_wedges(agent).await,
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

/// This node's wedges from a LIST (before the watch has synced); none when the API does not
/// answer within 5 s (the reporter's own check still guards every create).
async fn list_node_wedges(agent: &Agent) -> Vec<GpuWedge> {
    let api: Api<GpuWedge> = Api::all(agent.client.clone());
    let lp = ListParams::default().labels(&format!("{LABEL_NODE}={}", agent.args.node_name));
    match tokio::time::timeout(Duration::from_secs(5), api.list(&lp)).await {
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
