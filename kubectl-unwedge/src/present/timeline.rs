//! `describe`: the incident timeline from a wedge's status and its Events.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;
use unwedge_crds::{AttemptOutcome, GpuWedge};

use super::*;

/// One line of an incident timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineEntry {
    /// When it happened.
    pub at: Timestamp,
    /// Short title: `detected`, `admitted`, `attempt #1 started`, ...
    pub what: String,
    /// The details worth reading.
    pub detail: String,
}

/// Builds the incident timeline from the wedge and the Events whose involvedObject is it.
///
/// Entries are sorted by time; entries of the same instant keep the incident's causal order
/// (detection, admission, conditions and events, evictions, approval, attempt start, attempt
/// end, finish), because the API's timestamps have second precision.
pub fn timeline(w: &GpuWedge, events: &[Event]) -> Vec<TimelineEntry> {
    let mut items: Vec<(Timestamp, u8, String, String)> = Vec::new();
    let spec = &w.spec;
    let mut detail = format!(
        "{} {} on {}: WEDGED={}",
        spec.device.driver,
        spec.device.pci_address,
        spec.node_name,
        spec.methods.join(",")
    );
    if let Some(card) = &spec.device.card {
        detail.push_str(&format!(" ({card})"));
    }
    if let Some(seq) = spec.uevent.get("SEQNUM") {
        detail.push_str(&format!(", uevent SEQNUM={seq}"));
    }
    if let Some(b) = &spec.blamed {
        detail.push_str(&format!(", blamed PID {}", b.pid));
        if let Some(task) = &b.task {
            detail.push_str(&format!(" ({task})"));
        }
        if let Some(pod) = &b.pod {
            detail.push_str(&format!(" in pod {}/{}", pod.namespace, pod.name));
        }
    }
    items.push((spec.detected_at.0, 0, "detected".into(), detail));

    if let Some(s) = &w.status {
        for e in s.events.iter().flatten() {
            let seq = e.seqnum.map(|n| format!(" SEQNUM={n}")).unwrap_or_default();
            items.push((
                e.at.0,
                1,
                "uevent again".into(),
                format!("WEDGED={}{seq}", e.methods.join(",")),
            ));
        }
        if let Some(at) = &s.admitted_at {
            let policy = s.policy.as_deref().unwrap_or("<unknown policy>");
            items.push((
                at.0,
                2,
                "admitted".into(),
                format!("budget of policy {policy}"),
            ));
        }
        for c in s.conditions.iter().flatten() {
            let mut d = format!("{}={}", c.type_, c.status);
            if !c.reason.is_empty() {
                d.push_str(&format!(" ({})", c.reason));
            }
            if !c.message.is_empty() {
                d.push_str(&format!(": {}", c.message));
            }
            items.push((c.last_transition_time.0, 3, "condition".into(), d));
        }
        for e in s.evictions.iter().flatten() {
            items.push((
                e.at.0,
                5,
                "eviction".into(),
                format!("{}/{}: {}", e.namespace, e.pod, e.result),
            ));
        }
        if let Some(a) = &s.approval {
            items.push((
                a.at.0,
                6,
                format!("approved attempt #{}", a.attempt),
                format!("method {} by {}", a.method, a.by),
            ));
        }
        for a in s.attempts.iter().flatten() {
            let mut d = format!("method {}", a.method);
            if let Some(b) = &a.boot_id {
                d.push_str(&format!(", boot {b}"));
            }
            match &a.finished_at {
                Some(fin) => {
                    items.push((
                        a.started_at.0,
                        7,
                        format!("attempt #{} started", a.attempt),
                        d,
                    ));
                    items.push((
                        fin.0,
                        8,
                        format!("attempt #{} {}", a.attempt, outcome_word(a.result)),
                        a.message.clone(),
                    ));
                }
                None => {
                    if a.result != AttemptOutcome::Started && !a.message.is_empty() {
                        d.push_str(&format!("; now {}: {}", outcome_word(a.result), a.message));
                    } else if a.result != AttemptOutcome::Started {
                        d.push_str(&format!("; now {}", outcome_word(a.result)));
                    }
                    items.push((
                        a.started_at.0,
                        7,
                        format!("attempt #{} started", a.attempt),
                        d,
                    ));
                }
            }
        }
        if let Some(at) = &s.finished_at {
            let phase = s
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "finished".into());
            let mut d = phase;
            if let Some(false) = s.cordoned {
                d.push_str(", node not cordoned by unwedge");
            }
            items.push((at.0, 9, "finished".into(), d));
        }
    }

    for e in events {
        let Some(at) = event_time(e) else { continue };
        let mut what = format!("event {}", e.reason.as_deref().unwrap_or("-"));
        if let Some(t) = e.type_.as_deref().filter(|t| *t != "Normal") {
            what.push_str(&format!(" ({t})"));
        }
        let mut d = e.message.clone().unwrap_or_default();
        if let Some(n) = e.count.filter(|n| *n > 1) {
            d.push_str(&format!(" (x{n})"));
        }
        items.push((at, 4, what, d));
    }

    items.sort_by_key(|i| (i.0, i.1));
    items
        .into_iter()
        .map(|(at, _, what, detail)| TimelineEntry { at, what, detail })
        .collect()
}

pub(super) fn outcome_word(o: AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Started => "started",
        AttemptOutcome::Blocked => "blocked",
        AttemptOutcome::Succeeded => "succeeded",
        AttemptOutcome::Failed => "failed",
        AttemptOutcome::Refused => "refused",
        AttemptOutcome::DryRun => "dry-run",
    }
}

/// When an Event last happened, from whichever of its time fields the writer filled.
pub fn event_time(e: &Event) -> Option<Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// Renders a timeline with times in UTC and the offset from the first entry.
pub fn render_timeline(entries: &[TimelineEntry]) -> String {
    let Some(first) = entries.first().map(|e| e.at) else {
        return String::new();
    };
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                format!("+{}", human_duration(e.at.duration_since(first))),
                e.what.clone(),
                e.detail.clone(),
            ]
        })
        .collect();
    render_table(&["TIME", "SINCE", "WHAT", "DETAIL"], &rows)
}
