//! What the plugin shows, as pure functions of the objects it read: the wedge list with queue
//! positions, the incident timeline, and the budget table. No I/O here, so every rule is a
//! unit test away.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Event;
use unwedge_crds::{AttemptOutcome, GpuWedge, Phase, RecoveryPolicy, budget};

/// Renders rows under headers as kubectl does: left-aligned columns separated by three spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// A duration the way kubectl prints ages: `45s`, `3m20s`, `45m`, `5h30m`, `20h`, `3d5h`, `30d`.
pub fn human_duration(d: SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (m, h, day) = (60, 3600, 86400);
    match secs {
        s if s < 2 * m => format!("{s}s"),
        s if s < 10 * m => format_pair(s / m, "m", s % m, "s"),
        s if s < 3 * h => format!("{}m", s / m),
        s if s < 8 * h => format_pair(s / h, "h", (s % h) / m, "m"),
        s if s < 2 * day => format!("{}h", s / h),
        s if s < 8 * day => format_pair(s / day, "d", (s % day) / h, "h"),
        s if s < 365 * 2 * day => format!("{}d", s / day),
        s => format!("{}y", s / (365 * day)),
    }
}

fn format_pair(a: i64, ua: &str, b: i64, ub: &str) -> String {
    if b == 0 {
        format!("{a}{ua}")
    } else {
        format!("{a}{ua}{b}{ub}")
    }
}

/// The phase a wedge is in; a wedge the operator has not touched yet is `Detected`.
pub fn phase_of(w: &GpuWedge) -> Phase {
    w.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// The policy that governs a wedge, as the operator recorded it.
pub fn policy_of(w: &GpuWedge) -> Option<&str> {
    w.status.as_ref().and_then(|s| s.policy.as_deref())
}

fn name_of(w: &GpuWedge) -> &str {
    w.metadata.name.as_deref().unwrap_or("")
}

/// Where each Queued wedge stands in its policy's queue: `(position from 1, queue length)`.
///
/// The operator admits first come, first served: by `spec.detectedAt`, then by name, within
/// one policy. Wedges without a recorded policy queue together under the empty name.
pub fn queue_positions(wedges: &[GpuWedge]) -> BTreeMap<String, (usize, usize)> {
    let mut by_policy: BTreeMap<&str, Vec<&GpuWedge>> = BTreeMap::new();
    for w in wedges.iter().filter(|w| phase_of(w) == Phase::Queued) {
        by_policy
            .entry(policy_of(w).unwrap_or(""))
            .or_default()
            .push(w);
    }
    let mut out = BTreeMap::new();
    for queue in by_policy.values_mut() {
        queue.sort_by(|a, b| {
            (a.spec.detected_at.0, name_of(a)).cmp(&(b.spec.detected_at.0, name_of(b)))
        });
        let len = queue.len();
        for (i, w) in queue.iter().enumerate() {
            out.insert(name_of(w).to_string(), (i + 1, len));
        }
    }
    out
}

/// The headers of `kubectl unwedge list`.
pub const LIST_HEADERS: [&str; 9] = [
    "NAME", "NODE", "DEVICE", "DRIVER", "METHODS", "PHASE", "ACTION", "AGE", "QUEUE",
];

/// One row per wedge, sorted by name; QUEUE is `position/length (policy)` for Queued wedges.
pub fn list_rows(wedges: &[GpuWedge], now: Timestamp) -> Vec<Vec<String>> {
    let queue = queue_positions(wedges);
    let mut sorted: Vec<&GpuWedge> = wedges.iter().collect();
    sorted.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    sorted
        .into_iter()
        .map(|w| {
            let status = w.status.as_ref();
            let methods = status
                .and_then(|s| s.methods.clone())
                .unwrap_or_else(|| w.spec.methods.join(","));
            let age = w
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| human_duration(now.duration_since(t.0)))
                .unwrap_or_else(|| "<unknown>".into());
            let q = match queue.get(name_of(w)) {
                Some((pos, len)) => match policy_of(w) {
                    Some(p) => format!("{pos}/{len} ({p})"),
                    None => format!("{pos}/{len}"),
                },
                None => "-".into(),
            };
            vec![
                name_of(w).to_string(),
                w.spec.node_name.clone(),
                w.spec.device.pci_address.clone(),
                or_dash(&w.spec.device.driver),
                methods,
                format!("{:?}", phase_of(w)),
                status
                    .and_then(|s| s.action.clone())
                    .unwrap_or_else(|| "-".into()),
                age,
                q,
            ]
        })
        .collect()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

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

fn outcome_word(o: AttemptOutcome) -> &'static str {
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

/// One line of `kubectl unwedge budget`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetRow {
    /// Policy name (with ` (default)` for the default policy).
    pub policy: String,
    /// Nodes the policy selects.
    pub nodes_selected: u32,
    /// Nodes that may be under recovery at once (`None`: maxUnavailable is malformed).
    pub nodes_allowed: Option<u32>,
    /// Distinct nodes holding a Node admission.
    pub nodes_in_use: u32,
    /// Reboot admissions.
    pub reboots_in_use: u32,
    /// maxConcurrentReboots.
    pub reboots_allowed: u32,
    /// DRA devices on the selected nodes.
    pub devices_selected: u32,
    /// DRA devices that may be quarantined at once.
    pub devices_allowed: Option<u32>,
    /// Device admissions.
    pub devices_in_use: u32,
    /// Wedges of this policy in phase Queued.
    pub queued: u32,
    /// `paused`, `dry-run`, `circuit breaker tripped`, or `-`.
    pub state: String,
}

/// The budget of every policy, from its status ledger (`status.admitted`,
/// `status.nodesSelected`, `status.devicesSelected`) and the Queued wedges it governs.
pub fn budget_rows(policies: &[RecoveryPolicy], wedges: &[GpuWedge]) -> Vec<BudgetRow> {
    let mut rows: Vec<BudgetRow> = policies
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let status = p.status.clone().unwrap_or_default();
            let used = budget::usage(&status.admitted);
            let queued = wedges
                .iter()
                .filter(|w| phase_of(w) == Phase::Queued && policy_of(w) == Some(name.as_str()))
                .count() as u32;
            let mut state = Vec::new();
            if p.spec.paused {
                state.push("paused");
            }
            if p.spec.dry_run {
                state.push("dry-run");
            }
            if status.circuit_breaker_tripped_at.is_some() {
                state.push("circuit breaker tripped");
            }
            BudgetRow {
                policy: if p.spec.default {
                    format!("{name} (default)")
                } else {
                    name
                },
                nodes_selected: status.nodes_selected,
                nodes_allowed: budget::resolve_limit(
                    &budget::max_unavailable(&p.spec),
                    status.nodes_selected,
                )
                .ok(),
                nodes_in_use: used.nodes,
                reboots_in_use: used.reboots,
                reboots_allowed: budget::max_concurrent_reboots(&p.spec),
                devices_selected: status.devices_selected,
                devices_allowed: budget::resolve_limit(
                    &budget::max_unavailable_devices(&p.spec),
                    status.devices_selected,
                )
                .ok(),
                devices_in_use: used.devices,
                queued,
                state: if state.is_empty() {
                    "-".into()
                } else {
                    state.join(", ")
                },
            }
        })
        .collect();
    rows.sort_by(|a, b| a.policy.cmp(&b.policy));
    rows
}

/// The headers of `kubectl unwedge budget`.
pub const BUDGET_HEADERS: [&str; 8] = [
    "POLICY", "NODES", "ALLOWED", "IN-USE", "REBOOTS", "DEVICES", "QUEUED", "STATE",
];

/// Table cells for budget rows: REBOOTS is `in use/allowed`, DEVICES `in use/allowed of total`.
pub fn budget_cells(rows: &[BudgetRow]) -> Vec<Vec<String>> {
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "invalid".into());
    rows.iter()
        .map(|r| {
            vec![
                r.policy.clone(),
                r.nodes_selected.to_string(),
                opt(r.nodes_allowed),
                r.nodes_in_use.to_string(),
                format!("{}/{}", r.reboots_in_use, r.reboots_allowed),
                format!(
                    "{}/{} of {}",
                    r.devices_in_use,
                    opt(r.devices_allowed),
                    r.devices_selected
                ),
                r.queued.to_string(),
                r.state.clone(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use unwedge_crds::{
        Admission, Approval, AttemptResult, BudgetUnit, DeviceRef, Eviction, GpuWedgeSpec,
        GpuWedgeStatus, RecoveryPolicySpec, RecoveryPolicyStatus,
    };

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn wedge(name: &str, detected: &str, phase: Phase, policy: Option<&str>) -> GpuWedge {
        let mut w = GpuWedge::new(
            name,
            GpuWedgeSpec {
                node_name: "node-a".into(),
                device: DeviceRef {
                    pci_address: "0000:03:00.0".into(),
                    driver: "xe".into(),
                    ..Default::default()
                },
                methods: vec!["rebind".into(), "bus-reset".into()],
                detected_at: Time(ts(detected)),
                boot_id: String::new(),
                uevent: BTreeMap::new(),
                blamed: None,
            },
        );
        w.metadata.creation_timestamp = Some(Time(ts(detected)));
        w.status = Some(GpuWedgeStatus {
            phase: Some(phase),
            policy: policy.map(Into::into),
            ..Default::default()
        });
        w
    }

    #[test]
    fn queue_is_first_come_first_served_per_policy_with_name_as_tie_breaker() {
        let ws = vec![
            wedge("c", "2026-01-01T00:00:02Z", Phase::Queued, Some("p1")),
            wedge("b", "2026-01-01T00:00:01Z", Phase::Queued, Some("p1")),
            wedge("a", "2026-01-01T00:00:02Z", Phase::Queued, Some("p1")),
            wedge("z", "2026-01-01T00:00:00Z", Phase::Queued, Some("p2")),
            wedge("x", "2025-01-01T00:00:00Z", Phase::Cordoned, Some("p1")),
        ];
        let q = queue_positions(&ws);
        assert_eq!(q.get("b"), Some(&(1, 3)));
        assert_eq!(
            q.get("a"),
            Some(&(2, 3)),
            "same detectedAt as c: name decides"
        );
        assert_eq!(q.get("c"), Some(&(3, 3)));
        assert_eq!(
            q.get("z"),
            Some(&(1, 1)),
            "another policy has its own queue"
        );
        assert_eq!(q.get("x"), None, "only Queued wedges have a position");
    }

    #[test]
    fn list_rows_show_the_columns_and_queue_position() {
        let ws = vec![
            wedge("w2", "2026-01-01T00:00:00Z", Phase::Queued, Some("gpu")),
            wedge("w1", "2026-01-01T00:00:00Z", Phase::Cordoned, Some("gpu")),
        ];
        let rows = list_rows(&ws, ts("2026-01-01T00:05:30Z"));
        assert_eq!(
            rows[0],
            vec![
                "w1",
                "node-a",
                "0000:03:00.0",
                "xe",
                "rebind,bus-reset",
                "Cordoned",
                "-",
                "5m30s",
                "-"
            ]
        );
        assert_eq!(rows[1][5], "Queued");
        assert_eq!(rows[1][8], "1/1 (gpu)");
        let text = render_table(&LIST_HEADERS, &rows);
        assert!(text.starts_with("NAME   NODE     DEVICE"), "{text}");
    }

    #[test]
    fn ages_read_like_kubectl() {
        let d = |s: i64| human_duration(SignedDuration::from_secs(s));
        assert_eq!(d(45), "45s");
        assert_eq!(d(200), "3m20s");
        assert_eq!(d(45 * 60), "45m");
        assert_eq!(d(5 * 3600 + 30 * 60), "5h30m");
        assert_eq!(d(20 * 3600), "20h");
        assert_eq!(d(3 * 86400 + 5 * 3600), "3d5h");
        assert_eq!(d(30 * 86400), "30d");
        assert_eq!(d(-5), "0s", "clock skew never shows a negative age");
    }

    fn cond(t: &str, status: &str, at: &str, reason: &str) -> Condition {
        Condition {
            type_: t.into(),
            status: status.into(),
            last_transition_time: Time(ts(at)),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
        }
    }

    #[test]
    fn timeline_orders_the_incident_by_time_and_causality() {
        let mut w = wedge("w", "2026-01-01T00:00:00Z", Phase::Recovered, Some("gpu"));
        w.spec.uevent.insert("SEQNUM".into(), "4242".into());
        let s = w.status.as_mut().unwrap();
        s.admitted_at = Some(Time(ts("2026-01-01T00:00:01Z")));
        s.conditions = Some(vec![
            cond("Recovered", "True", "2026-01-01T00:01:00Z", "Verified"),
            cond("Admitted", "True", "2026-01-01T00:00:01Z", "Budget"),
        ]);
        s.evictions = Some(vec![Eviction {
            namespace: "ml".into(),
            pod: "train-0".into(),
            at: Time(ts("2026-01-01T00:00:05Z")),
            result: "Evicted".into(),
        }]);
        // Approval and attempt start in the same second: approval comes first.
        s.approval = Some(Approval {
            method: "rebind".into(),
            attempt: 1,
            at: Time(ts("2026-01-01T00:00:30Z")),
            by: "system:serviceaccount:unwedge-system:unwedge-operator".into(),
        });
        s.attempts = Some(vec![AttemptResult {
            attempt: 1,
            method: "rebind".into(),
            result: AttemptOutcome::Succeeded,
            started_at: Time(ts("2026-01-01T00:00:30Z")),
            finished_at: Some(Time(ts("2026-01-01T00:00:40Z"))),
            message: "device back as card1".into(),
            boot_id: None,
            advertised: None,
        }]);
        s.finished_at = Some(Time(ts("2026-01-01T00:01:00Z")));
        let ev = Event {
            reason: Some("Uncordoned".into()),
            message: Some("node node-a uncordoned".into()),
            last_timestamp: Some(Time(ts("2026-01-01T00:00:59Z"))),
            involved_object: ObjectReference::default(),
            metadata: ObjectMeta::default(),
            ..Default::default()
        };
        let t = timeline(&w, &[ev]);
        let whats: Vec<&str> = t.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(
            whats,
            vec![
                "detected",
                "admitted",
                "condition",
                "eviction",
                "approved attempt #1",
                "attempt #1 started",
                "attempt #1 succeeded",
                "event Uncordoned",
                "condition",
                "finished",
            ]
        );
        assert!(t[0].detail.contains("SEQNUM=4242"), "{:?}", t[0]);
        assert!(
            t[4].detail.contains("by system:serviceaccount"),
            "{:?}",
            t[4]
        );
        assert_eq!(t[6].detail, "device back as card1");
        let text = render_timeline(&t);
        assert!(text.contains("+60s    condition"), "{text}");
    }

    #[test]
    fn an_unfinished_attempt_shows_where_it_stands() {
        let mut w = wedge("w", "2026-01-01T00:00:00Z", Phase::Recovering, None);
        w.status.as_mut().unwrap().attempts = Some(vec![AttemptResult {
            attempt: 2,
            method: "bus-reset".into(),
            result: AttemptOutcome::Blocked,
            started_at: Time(ts("2026-01-01T00:00:10Z")),
            finished_at: None,
            message: "pid 42 (python) holds /dev/dri/renderD128".into(),
            boot_id: None,
            advertised: None,
        }]);
        let t = timeline(&w, &[]);
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].what, "attempt #2 started");
        assert!(t[1].detail.contains("now blocked: pid 42"), "{:?}", t[1]);
    }

    /// The shared resolution, with a default for an absent value.
    fn resolve_allowed(v: Option<&IntOrString>, total: u32, default: &IntOrString) -> Option<u32> {
        budget::resolve_limit(v.unwrap_or(default), total).ok()
    }

    /// The shared edge-case table, through the plugin's path: a policy and its status as
    /// `kubectl unwedge budget` reads them, to the NODES ALLOWED cell.
    #[test]
    fn the_shared_limit_cases_hold_for_the_plugin() {
        for (value, total, allowed) in budget::LIMIT_CASES {
            let mut p = RecoveryPolicy::new(
                "gpu",
                serde_json::from_value(serde_json::json!({})).unwrap(),
            );
            p.spec.max_unavailable = value.field();
            p.status = Some(RecoveryPolicyStatus {
                nodes_selected: *total,
                ..Default::default()
            });
            let rows = budget_rows(&[p], &[]);
            assert_eq!(rows[0].nodes_allowed, *allowed, "{value:?} of {total}");
            let shown = allowed.map_or("invalid".to_string(), |n| n.to_string());
            assert_eq!(budget_cells(&rows)[0][2], shown, "{value:?} of {total}");
        }
    }

    #[test]
    fn allowed_counts_resolve_ints_and_percentages() {
        let d = IntOrString::Int(1);
        assert_eq!(resolve_allowed(None, 10, &d), Some(1));
        assert_eq!(resolve_allowed(Some(&IntOrString::Int(3)), 10, &d), Some(3));
        assert_eq!(
            resolve_allowed(Some(&IntOrString::String("25%".into())), 10, &d),
            Some(2)
        );
        assert_eq!(
            resolve_allowed(Some(&IntOrString::String("10%".into())), 3, &d),
            Some(1)
        );
        assert_eq!(
            resolve_allowed(Some(&IntOrString::String("0%".into())), 30, &d),
            Some(0)
        );
        assert_eq!(
            resolve_allowed(Some(&IntOrString::String("x%".into())), 3, &d),
            None
        );
        assert_eq!(resolve_allowed(Some(&IntOrString::Int(-1)), 3, &d), None);
    }

    #[test]
    fn budget_counts_the_ledger_and_the_queue() {
        let mut p = RecoveryPolicy::new(
            "gpu",
            RecoveryPolicySpec {
                default: false,
                node_selector: BTreeMap::new(),
                max_unavailable: Some(IntOrString::String("20%".into())),
                max_concurrent_reboots: Some(1),
                max_unavailable_devices: None,
                allowed_methods: None,
                escalation: None,
                approval: Default::default(),
                reboot_approval: None,
                drain: Default::default(),
                none: Default::default(),
                verify_timeout: None,
                max_attempts: None,
                repeat_offender: None,
                circuit_breaker: None,
                paused: true,
                dry_run: false,
                history_limit: None,
            },
        );
        let adm = |w: &str, n: &str, unit, reboot| Admission {
            wedge: w.into(),
            node: n.into(),
            unit,
            reboot,
        };
        p.status = Some(RecoveryPolicyStatus {
            admitted: vec![
                adm("w1", "n1", BudgetUnit::Node, false),
                adm("w2", "n1", BudgetUnit::Node, true),
                adm("w3", "n2", BudgetUnit::Device, false),
            ],
            nodes_selected: 10,
            devices_selected: 80,
            ..Default::default()
        });
        let ws = vec![
            wedge("q1", "2026-01-01T00:00:00Z", Phase::Queued, Some("gpu")),
            wedge("q2", "2026-01-01T00:00:00Z", Phase::Queued, Some("other")),
        ];
        let rows = budget_rows(&[p], &ws);
        assert_eq!(
            rows[0],
            BudgetRow {
                policy: "gpu".into(),
                nodes_selected: 10,
                nodes_allowed: Some(2),
                nodes_in_use: 1,
                reboots_in_use: 1,
                reboots_allowed: 1,
                devices_selected: 80,
                devices_allowed: Some(8),
                devices_in_use: 1,
                queued: 1,
                state: "paused".into(),
            }
        );
        assert_eq!(budget_cells(&rows)[0][5], "1/8 of 80");
    }
}
