//! From a detected wedge to a `GpuWedge` in the API: the deterministic name and labels, the
//! object, the agent part of its status, and the "one open incident per device" rule.
//!
//! The decisions (`plan`, `build_wedge`, `is_open`, ...) are pure functions over values; the
//! `Reporter` only lists, creates and merge-patches. It never writes operator fields.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use unwedge_crds::labels::{LABEL_DEVICE, LABEL_NODE, device_label};
use unwedge_crds::{
    Blamed, Consumer, DeviceRef, DomainDevice, GpuWedge, GpuWedgeSpec, MAX_EVENTS, PodRef,
    WedgeEvent, is_method_token,
};

/// Where a detected wedge came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// A `WEDGED=` uevent from the kernel.
    #[default]
    Uevent,
    /// Start-up reconciliation found the device in a wedged state (see `startup`).
    Startup,
}

/// The task the driver blamed, as far as the agent could map it on the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BlamedTask {
    /// Host PID from `PID=`.
    pub pid: i64,
    /// Task name from `TASK=`.
    #[serde(default)]
    pub task: Option<String>,
    /// Container id from `/proc/<PID>/cgroup`.
    #[serde(default)]
    pub container_id: Option<String>,
    /// Pod UID from the same cgroup path; the pod's name is looked up when reporting.
    #[serde(default)]
    pub pod_uid: Option<String>,
}

/// Everything the agent knew about one wedge when it saw it: what the outbox stores and what
/// the reporter turns into a `GpuWedge` (so a replay does not depend on sysfs any more).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DetectedWedge {
    /// This node.
    pub node: String,
    /// The device, resolved best-effort.
    pub device: DeviceRef,
    /// The kernel's methods, verbatim and in order.
    pub methods: Vec<String>,
    /// When the agent received it.
    pub detected_at: Timestamp,
    /// The boot id at detection.
    pub boot_id: String,
    /// Every raw key of the uevent.
    pub uevent: BTreeMap<String, String>,
    /// The kernel's SEQNUM, if any.
    #[serde(default)]
    pub seqnum: Option<u64>,
    /// The blamed task, if the driver named one.
    #[serde(default)]
    pub blamed: Option<BlamedTask>,
    /// Containers holding a device of the reset domain at detection.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// The devices the methods would disturb.
    #[serde(default)]
    pub reset_domain: Vec<DomainDevice>,
    /// What went wrong while resolving (missing sysfs entries, ...), for a human.
    #[serde(default)]
    pub agent_message: Option<String>,
    /// Where the detection came from.
    #[serde(default)]
    pub source: Source,
    /// Whether the agent has asked the kubelet for `consumers` (and the API for the DRA
    /// device). A detection stored before that (or by an older agent) is enriched when it is
    /// replayed, never reported with an empty consumer list that only means "not asked".
    #[serde(default)]
    pub enriched: bool,
}

impl DetectedWedge {
    /// The wedge of a plain `WEDGED=<methods>` uevent (with `SEQNUM` when `seqnum` is set) on
    /// `node`, before the agent has looked for consumers, a reset domain or a blamed task.
    pub fn from_uevent(
        node: &str,
        device: DeviceRef,
        methods: &str,
        seqnum: Option<u64>,
        detected_at: Timestamp,
        boot_id: &str,
    ) -> DetectedWedge {
        let mut uevent = BTreeMap::from([("WEDGED".to_string(), methods.to_string())]);
        if let Some(n) = seqnum {
            uevent.insert("SEQNUM".into(), n.to_string());
        }
        DetectedWedge {
            node: node.into(),
            device,
            methods: methods.split(',').map(str::to_string).collect(),
            detected_at,
            boot_id: boot_id.into(),
            uevent,
            seqnum,
            blamed: None,
            consumers: vec![],
            reset_domain: vec![],
            agent_message: None,
            source: Source::Uevent,
            enriched: false,
        }
    }

    /// The deterministic name: `<node>-<bdf>-<seqnum or detection unix time>`.
    pub fn name(&self) -> String {
        let n = self
            .seqnum
            .unwrap_or(self.detected_at.as_second().max(0) as u64);
        wedge_name(&self.node, &self.device.pci_address, n)
    }

    /// The name used when the seqnum-based one is taken by an incident of another boot (the
    /// kernel's SEQNUM restarts at every boot): the detection unix time instead.
    pub fn fallback_name(&self) -> String {
        wedge_name(
            &self.node,
            &self.device.pci_address,
            self.detected_at.as_second().max(0) as u64,
        )
    }

    /// This detection as a later event of an open incident.
    pub fn as_event(&self) -> WedgeEvent {
        WedgeEvent {
            seqnum: self.seqnum,
            methods: self.methods.clone(),
            at: Time(self.detected_at),
            pid: self.blamed.as_ref().map(|b| b.pid),
        }
    }
}

/// `<node>-<bdf>-<n>` with the PCI address's `:` and `.` turned into `-`, lower-cased.
pub fn wedge_name(node: &str, pci: &str, n: u64) -> String {
    let bdf = pci.replace([':', '.'], "-");
    format!("{node}-{bdf}-{n}").to_ascii_lowercase()
}

/// The labels every GpuWedge carries: node and device (for "open incident" selectors).
pub fn wedge_labels(node: &str, pci: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NODE.to_string(), node.to_string()),
        (LABEL_DEVICE.to_string(), device_label(pci)),
    ])
}

/// The label selector of all wedges of one device of one node.
pub fn device_selector(node: &str, pci: &str) -> String {
    format!("{LABEL_NODE}={node},{LABEL_DEVICE}={}", device_label(pci))
}

/// Whether a wedge is an open incident: its phase is not Recovered or Abandoned (no phase yet
/// means Detected, which is open).
pub fn is_open(w: &GpuWedge) -> bool {
    !w.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
}

/// The PCI address named in a DEVPATH (`/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0`
/// → `0000:03:00.0`): the last component before `/drm/` that looks like a BDF.
pub fn bdf_from_devpath(devpath: &str) -> Option<String> {
    let head = devpath.split("/drm/").next()?;
    head.rsplit('/').find(|c| is_bdf(c)).map(str::to_string)
}

/// Whether `s` is `dddd:bb:dd.f` in lower-case hex.
pub fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
        && b[..4].iter().chain(&b[5..7]).chain(&b[8..10]).all(hex)
}

/// The methods as the API accepts them: tokens that fail the syntax (or overflow the list) are
/// replaced by `unknown` (they still show verbatim in `spec.uevent`), and a note says so.
pub fn api_methods(methods: &[String]) -> (Vec<String>, Option<String>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for m in methods {
        if is_method_token(m) && m.len() <= 63 {
            out.push(m.clone());
        } else {
            bad.push(m.clone());
            if !out.iter().any(|x| x == "unknown") {
                out.push("unknown".to_string());
            }
        }
    }
    if out.is_empty() {
        out.push("unknown".to_string());
    }
    out.truncate(16);
    let note = (!bad.is_empty()).then(|| {
        format!("malformed method tokens {bad:?} reported as \"unknown\"; see spec.uevent.WEDGED")
    });
    (out, note)
}

/// The GpuWedge for a detection, named `name`, with `pod` the blamed task's pod when found.
pub fn build_wedge(d: &DetectedWedge, name: &str, pod: Option<PodRef>) -> GpuWedge {
    let (methods, _) = api_methods(&d.methods);
    let spec = GpuWedgeSpec {
        node_name: d.node.clone(),
        device: d.device.clone(),
        methods,
        detected_at: Time(d.detected_at),
        boot_id: d.boot_id.clone(),
        uevent: d.uevent.clone(),
        blamed: d.blamed.as_ref().map(|b| Blamed {
            pid: b.pid,
            task: b.task.clone(),
            container_id: b.container_id.clone(),
            pod,
        }),
    };
    let mut w = GpuWedge::new(name, spec);
    w.metadata = ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(wedge_labels(&d.node, &d.device.pci_address)),
        ..ObjectMeta::default()
    };
    w
}

/// What a human must know when no driver was bound to the wedged device: the agent cannot
/// rebind or reset a device without one (it reads the driver from sysfs, never from the CR).
pub fn no_driver_note(device: &DeviceRef) -> Option<String> {
    device.driver.is_empty().then(|| {
        format!(
            "no driver bound to {} when the wedge was seen: the agent will refuse rebind and bus-reset (it needs the bound driver's name from sysfs); reboot can still recover it",
            device.pci_address
        )
    })
}

/// The merge patch of the agent part of a new wedge's status: consumers, reset domain and,
/// when something was missing, the agent message.
pub fn agent_status_patch(d: &DetectedWedge) -> Value {
    let (_, method_note) = api_methods(&d.methods);
    let message = [
        d.agent_message.clone(),
        no_driver_note(&d.device),
        method_note,
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("; ");
    let mut status = json!({
        "consumers": d.consumers,
        "resetDomain": d.reset_domain,
    });
    if !message.is_empty() {
        status["agentMessage"] = json!(message);
    }
    json!({ "status": status })
}

/// [`agent_status_patch`] plus `status.agentDryRun`: whether this agent runs with `--dry-run`
/// (the operator then records the wedge and disrupts nothing). Written `false` too, so an
/// agent restarted without `--dry-run` clears it.
pub fn agent_status_patch_as(d: &DetectedWedge, dry_run: bool) -> Value {
    let mut patch = agent_status_patch(d);
    patch["status"]["agentDryRun"] = json!(dry_run);
    patch
}

/// The merge patch that replaces `status.events` (the agent's own array) with `events` and
/// sets `status.eventsDropped` to `dropped`.
pub fn events_patch(events: &[WedgeEvent], dropped: u64) -> Value {
    json!({ "status": { "events": events, "eventsDropped": dropped } })
}

/// `events` (oldest first) with `new` added, as a ring of the newest [`MAX_EVENTS`]: the
/// events that no longer fit are left out and added to `dropped`. Returns the ring and the new
/// dropped count. The CRD refuses a longer list, and an unbounded one would in the end make
/// every status write of the incident fail.
pub fn push_event(
    mut events: Vec<WedgeEvent>,
    dropped: u64,
    new: WedgeEvent,
) -> (Vec<WedgeEvent>, u64) {
    events.push(new);
    let excess = events.len().saturating_sub(MAX_EVENTS);
    events.drain(..excess);
    (events, dropped + excess as u64)
}

/// What to do with a detection, given the wedges of its node and device now in the API.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportPlan {
    /// Create a new wedge under this name, then patch its agent status.
    Create {
        /// The name to create.
        name: String,
    },
    /// The wedge exists (an earlier, interrupted report): only its agent status is missing.
    PatchStatus {
        /// The existing wedge.
        name: String,
    },
    /// An open incident exists: replace its events with these (the old ones plus this one,
    /// the newest [`MAX_EVENTS`] only).
    AppendEvent {
        /// The open incident.
        name: String,
        /// The full new `status.events`.
        events: Vec<WedgeEvent>,
        /// The full new `status.eventsDropped`: events left out of the ring so far.
        dropped: u64,
    },
    /// Already in the API (a replay of something reported before): nothing to do.
    AlreadyRecorded {
        /// The wedge that holds it.
        name: String,
    },
}

fn seqnum_of(w: &GpuWedge) -> Option<u64> {
    w.spec.uevent.get("SEQNUM").and_then(|s| s.parse().ok())
}

fn lacks_agent_status(w: &GpuWedge) -> bool {
    w.status
        .as_ref()
        .is_none_or(|s| s.consumers.is_none() && s.reset_domain.is_none())
}

/// Decides how to report `d` given `existing`, the wedges with its node and device labels.
pub fn plan(d: &DetectedWedge, existing: &[GpuWedge]) -> ReportPlan {
    let mut name = d.name();
    if let Some(same) = existing.iter().find(|w| w.name_any() == name) {
        if same.spec.boot_id == d.boot_id
            && same.spec.detected_at.0.as_second() == d.detected_at.as_second()
        {
            return if lacks_agent_status(same) {
                ReportPlan::PatchStatus { name }
            } else {
                ReportPlan::AlreadyRecorded { name }
            };
        }
        name = d.fallback_name();
        if let Some(same) = existing.iter().find(|w| w.name_any() == name) {
            return if lacks_agent_status(same) {
                ReportPlan::PatchStatus { name }
            } else {
                ReportPlan::AlreadyRecorded { name }
            };
        }
    }
    let open = existing
        .iter()
        .filter(|w| is_open(w))
        .min_by_key(|w| (w.spec.detected_at.0, w.name_any()));
    if let Some(open) = open {
        let open_name = open.name_any();
        if d.source == Source::Startup {
            return ReportPlan::AlreadyRecorded { name: open_name };
        }
        let events = open
            .status
            .as_ref()
            .and_then(|s| s.events.clone())
            .unwrap_or_default();
        let dropped = open
            .status
            .as_ref()
            .and_then(|s| s.events_dropped)
            .unwrap_or(0);
        let same_boot = open.spec.boot_id == d.boot_id;
        let seen = (d.seqnum.is_some() && same_boot && seqnum_of(open) == d.seqnum)
            || events
                .iter()
                .any(|e| e.seqnum == d.seqnum && e.at.0.as_second() == d.detected_at.as_second());
        if seen {
            return ReportPlan::AlreadyRecorded { name: open_name };
        }
        let (events, dropped) = push_event(events, dropped, d.as_event());
        return ReportPlan::AppendEvent {
            name: open_name,
            events,
            dropped,
        };
    }
    ReportPlan::Create { name }
}

/// Errors while reporting. The outbox retries the transient ones and sets the others aside.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The API server refused or could not be reached.
    #[error("API request for GpuWedge {name}: {source}")]
    Api {
        /// The wedge concerned.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The detection cannot be expressed as a GpuWedge (e.g. no PCI address); retrying won't help.
    #[error("cannot report wedge: {0}")]
    Unreportable(String),
}

/// HTTP statuses with which the API server refuses a request for good: the same request
/// fails the same way however often it is sent (400 Bad Request, 413 Request Entity Too
/// Large, 415, 422 Invalid). Everything else (no connection, 401/403 while RBAC is fixed,
/// 404/409 races, 429, 5xx) may pass later.
pub const PERMANENT_STATUSES: [u16; 4] = [400, 413, 415, 422];

impl ReportError {
    /// Whether retrying later can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReportError::Api { source, .. } => {
                !matches!(source, kube::Error::Api(s) if PERMANENT_STATUSES.contains(&s.code))
            }
            ReportError::Unreportable(_) => false,
        }
    }
}

/// How a report ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// A new GpuWedge.
    Created(String),
    /// A new event on an open incident.
    Appended(String),
    /// Nothing new: the API already had it.
    AlreadyRecorded(String),
}

/// Writes detections to the API as this node.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    node: String,
    dry_run: bool,
}

impl Reporter {
    /// A reporter for `node` of an agent that acts (not `--dry-run`).
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
            dry_run: false,
        }
    }

    /// This reporter, saying in each new wedge's `status.agentDryRun` whether the agent runs
    /// with `--dry-run`.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Reports one detection: creates the wedge or appends to the open incident.
    pub async fn report(&self, d: &DetectedWedge) -> Result<Reported, ReportError> {
        if !is_bdf(&d.device.pci_address) {
            return Err(ReportError::Unreportable(format!(
                "no PCI address for the device (got {:?}); uevent {:?}",
                d.device.pci_address, d.uevent
            )));
        }
        let api: Api<GpuWedge> = Api::all(self.client.clone());
        let api_err = |name: &str| {
            let name = name.to_string();
            move |source| ReportError::Api { name, source }
        };
        let lp = ListParams::default().labels(&device_selector(&self.node, &d.device.pci_address));
        let existing = api.list(&lp).await.map_err(api_err(&d.name()))?.items;
        match plan(d, &existing) {
            ReportPlan::AlreadyRecorded { name } => Ok(Reported::AlreadyRecorded(name)),
            ReportPlan::AppendEvent {
                name,
                events,
                dropped,
            } => {
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(events_patch(&events, dropped)),
                )
                .await
                .map_err(api_err(&name))?;
                Ok(Reported::Appended(name))
            }
            ReportPlan::PatchStatus { name } => {
                self.patch_agent_status(&api, &name, d).await?;
                Ok(Reported::Created(name))
            }
            ReportPlan::Create { name } => {
                let pod = match d.blamed.as_ref().and_then(|b| b.pod_uid.as_deref()) {
                    Some(uid) => self.pod_by_uid(uid).await,
                    None => None,
                };
                let wedge = build_wedge(d, &name, pod);
                match api.create(&PostParams::default(), &wedge).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.is_already_exists() => {
                        tracing::info!(wedge = %name, "GpuWedge already exists (replay); completing its status");
                    }
                    Err(e) => return Err(api_err(&name)(e)),
                }
                self.patch_agent_status(&api, &name, d).await?;
                Ok(Reported::Created(name))
            }
        }
    }

    async fn patch_agent_status(
        &self,
        api: &Api<GpuWedge>,
        name: &str,
        d: &DetectedWedge,
    ) -> Result<(), ReportError> {
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(agent_status_patch_as(d, self.dry_run)),
        )
        .await
        .map_err(|source| ReportError::Api {
            name: name.to_string(),
            source,
        })?;
        Ok(())
    }

    /// The pod on this node with metadata.uid == `uid`, if the agent may list pods.
    async fn pod_by_uid(&self, uid: &str) -> Option<PodRef> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        match pods.list(&lp).await {
            Ok(list) => list
                .items
                .into_iter()
                .find(|p| p.metadata.uid.as_deref() == Some(uid))
                .map(|p| PodRef {
                    namespace: p.namespace().unwrap_or_default(),
                    name: p.name_any(),
                    container: None,
                }),
            Err(e) => {
                tracing::warn!(error = %e, pod_uid = uid, "cannot list this node's pods to name the blamed pod; reporting without it");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unwedge_crds::{GpuWedgeStatus, Phase};

    fn detected(seq: Option<u64>) -> DetectedWedge {
        let device = DeviceRef {
            pci_address: "0000:03:00.0".into(),
            card: Some("card0".into()),
            driver: "xe".into(),
            ..DeviceRef::default()
        };
        let at = "2026-11-25T10:00:00Z".parse().unwrap();
        DetectedWedge::from_uevent("node-a", device, "rebind,bus-reset", seq, at, "boot-1")
    }

    fn stored(d: &DetectedWedge, name: &str, phase: Option<Phase>) -> GpuWedge {
        let mut w = build_wedge(d, name, None);
        w.status = Some(GpuWedgeStatus {
            phase,
            consumers: Some(vec![]),
            reset_domain: Some(vec![]),
            ..GpuWedgeStatus::default()
        });
        w
    }

    #[test]
    fn name_and_labels_follow_the_convention() {
        let d = detected(Some(4242));
        assert_eq!(d.name(), "node-a-0000-03-00-0-4242");
        let no_seq = detected(None);
        assert_eq!(
            no_seq.name(),
            format!("node-a-0000-03-00-0-{}", no_seq.detected_at.as_second())
        );
        let w = build_wedge(&d, &d.name(), None);
        let labels = w.metadata.labels.unwrap();
        assert_eq!(labels[LABEL_NODE], "node-a");
        assert_eq!(labels[LABEL_DEVICE], "0000-03-00.0");
        assert_eq!(w.spec.methods, vec!["rebind", "bus-reset"]);
        assert_eq!(w.spec.boot_id, "boot-1");
    }

    #[test]
    fn open_means_not_recovered_or_abandoned() {
        let d = detected(Some(1));
        assert!(is_open(&build_wedge(&d, "x", None)));
        assert!(is_open(&stored(&d, "x", Some(Phase::NeedsAttention))));
        assert!(!is_open(&stored(&d, "x", Some(Phase::Recovered))));
        assert!(!is_open(&stored(&d, "x", Some(Phase::Abandoned))));
    }

    #[test]
    fn first_detection_creates_and_a_second_appends_to_the_open_incident() {
        let first = detected(Some(10));
        assert_eq!(plan(&first, &[]), ReportPlan::Create { name: first.name() });
        let open = stored(&first, &first.name(), Some(Phase::Cordoned));
        let mut second = detected(Some(11));
        second.detected_at = "2026-11-25T10:00:05Z".parse().unwrap();
        match plan(&second, std::slice::from_ref(&open)) {
            ReportPlan::AppendEvent {
                name,
                events,
                dropped,
            } => {
                assert_eq!(name, first.name());
                assert_eq!(events.len(), 1);
                assert_eq!(dropped, 0);
                assert_eq!(events[0].seqnum, Some(11));
            }
            other => panic!("expected AppendEvent, got {other:?}"),
        }
    }

    #[test]
    fn events_keep_the_newest_and_count_the_dropped() {
        let first = detected(Some(10));
        let mut open = stored(&first, &first.name(), Some(Phase::Cordoned));
        let event = |seq: u64| {
            let mut d = detected(Some(seq));
            d.detected_at = Timestamp::from_second(1_700_000_000 + seq as i64).unwrap();
            d
        };
        let full: Vec<WedgeEvent> = (100..100 + MAX_EVENTS as u64)
            .map(|s| event(s).as_event())
            .collect();
        let status = open.status.as_mut().unwrap();
        status.events = Some(full);
        status.events_dropped = Some(5);
        let next = event(500);
        match plan(&next, std::slice::from_ref(&open)) {
            ReportPlan::AppendEvent {
                events, dropped, ..
            } => {
                assert_eq!(
                    events.len(),
                    MAX_EVENTS,
                    "the ring never grows past MAX_EVENTS"
                );
                assert_eq!(dropped, 6, "5 dropped before, the oldest (seq 100) now");
                assert_eq!(events[0].seqnum, Some(101), "oldest kept");
                assert_eq!(events[MAX_EVENTS - 1].seqnum, Some(500), "newest last");
            }
            other => panic!("expected AppendEvent, got {other:?}"),
        }
        let (ring, dropped) = push_event(vec![], 0, event(1).as_event());
        assert_eq!((ring.len(), dropped), (1, 0));
        let patch = events_patch(&ring, 7);
        assert_eq!(patch["status"]["eventsDropped"], 7);
    }

    #[test]
    fn replays_collapse() {
        let first = detected(Some(10));
        let open = stored(&first, &first.name(), None);
        assert_eq!(
            plan(&first, std::slice::from_ref(&open)),
            ReportPlan::AlreadyRecorded { name: first.name() }
        );
        let bare = build_wedge(&first, &first.name(), None);
        assert_eq!(
            plan(&first, std::slice::from_ref(&bare)),
            ReportPlan::PatchStatus { name: first.name() }
        );
        let mut second = detected(Some(11));
        second.detected_at = "2026-11-25T10:00:05Z".parse().unwrap();
        let mut with_event = open.clone();
        with_event.status.as_mut().unwrap().events = Some(vec![second.as_event()]);
        assert_eq!(
            plan(&second, std::slice::from_ref(&with_event)),
            ReportPlan::AlreadyRecorded { name: first.name() }
        );
    }

    #[test]
    fn a_closed_incident_does_not_absorb_a_new_wedge() {
        let first = detected(Some(10));
        let closed = stored(&first, &first.name(), Some(Phase::Recovered));
        let second = detected(Some(12));
        assert_eq!(
            plan(&second, &[closed]),
            ReportPlan::Create {
                name: second.name()
            }
        );
    }

    #[test]
    fn a_seqnum_reused_after_reboot_gets_the_time_name() {
        let old = detected(Some(10));
        let closed = stored(&old, &old.name(), Some(Phase::Recovered));
        let mut new = detected(Some(10));
        new.boot_id = "boot-2".into();
        new.detected_at = "2026-11-26T10:00:00Z".parse().unwrap();
        assert_eq!(
            plan(&new, &[closed]),
            ReportPlan::Create {
                name: new.fallback_name()
            }
        );
    }

    #[test]
    fn malformed_methods_become_unknown_with_a_note() {
        let (m, note) = api_methods(&["rebind".into(), "Bad Token".into(), "cold-reset".into()]);
        assert_eq!(m, vec!["rebind", "unknown", "cold-reset"]);
        assert!(note.unwrap().contains("Bad Token"));
        let (m, note) = api_methods(&[]);
        assert_eq!(m, vec!["unknown"]);
        assert!(note.is_none());
    }

    #[test]
    fn bdf_comes_from_the_devpath_when_sysfs_is_missing() {
        assert_eq!(
            bdf_from_devpath("/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0").as_deref(),
            Some("0000:03:00.0")
        );
        assert_eq!(bdf_from_devpath("/devices/platform/gpu/drm/card0"), None);
    }

    #[test]
    fn status_patch_touches_only_agent_fields() {
        let mut d = detected(Some(1));
        d.agent_message = Some("missing /sys/x".into());
        let p = agent_status_patch(&d);
        let keys: Vec<_> = p["status"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["agentMessage", "consumers", "resetDomain"]);
    }

    #[test]
    fn a_dry_run_agent_says_so_in_the_status() {
        let d = detected(Some(1));
        assert_eq!(
            agent_status_patch_as(&d, true)["status"]["agentDryRun"],
            true
        );
        assert_eq!(
            agent_status_patch_as(&d, false)["status"]["agentDryRun"],
            false
        );
        assert!(
            agent_status_patch(&d)["status"]
                .get("agentMessage")
                .is_none()
        );
    }

    #[test]
    fn no_driver_bound_is_told_to_a_human() {
        let mut d = detected(Some(1));
        d.device.driver = String::new();
        let message = agent_status_patch(&d)["status"]["agentMessage"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            message.starts_with("no driver bound to 0000:03:00.0"),
            "{message}"
        );
        assert!(message.contains("reboot can still recover it"), "{message}");
    }
}
