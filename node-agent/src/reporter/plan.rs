//! How a detection becomes API writes, decided from values only: whether a wedge is an open
//! incident, the GpuWedge to create, the merge patches of the agent part of its status, and
//! [`plan`], which picks create, complete, append an event, or nothing ("one open incident per
//! device"). Nothing here calls the API.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use serde_json::{Value, json};
use unwedge_crds::{
    Blamed, DeviceRef, GpuWedge, GpuWedgeSpec, MAX_EVENTS, PodRef, WedgeEvent, is_method_token,
};

use super::detection::{DetectedWedge, Source, wedge_labels};

/// Whether a wedge is an open incident: its phase is not Recovered or Abandoned (no phase yet
/// means Detected, which is open).
pub fn is_open(w: &GpuWedge) -> bool {
    !w.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
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

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use unwedge_crds::labels::{LABEL_DEVICE, LABEL_NODE};
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
