//! What the plugin shows, as pure functions of the objects it read: the wedge list with queue
//! positions, the incident timeline, and the budget table. No I/O here, so every rule is a
//! unit test away.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Event;
use kube::Resource;
use kube::api::{ApiResource, DynamicObject, TypeMeta};
use kube::runtime::watcher;
use serde::Serialize;
use unwedge_crds::labels::{ANN_APPROVE, ANN_BY};
use unwedge_crds::{AttemptOutcome, GpuWedge, Phase, RecoveryPolicy, budget};

/// Column widths of a kubectl-style table, kept across lines so that the rows a watch prints
/// later line up under the table printed first (a wider cell widens its column from then on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Columns {
    widths: Vec<usize>,
}

impl Columns {
    /// Widths that fit the headers and every row.
    pub fn fit(headers: &[&str], rows: &[Vec<String>]) -> Self {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        Columns { widths }
    }

    /// One line: left-aligned cells separated by three spaces, without trailing blanks.
    pub fn line<S: AsRef<str>>(&mut self, cells: &[S]) -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let cell = cell.as_ref();
            let n = cell.chars().count();
            if i >= self.widths.len() {
                self.widths.push(n);
            }
            self.widths[i] = self.widths[i].max(n);
            out.push_str(cell);
            if i < last {
                out.extend(std::iter::repeat_n(' ', self.widths[i] - n + 3));
            }
        }
        out.trim_end().to_string()
    }
}

/// Renders rows under headers as kubectl does: left-aligned columns separated by three spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut cols = Columns::fit(headers, rows);
    let mut out = cols.line(headers);
    out.push('\n');
    for row in rows {
        out.push_str(&cols.line(row));
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

/// The headers of `kubectl unwedge list -o wide`: the list's, then the governing policy, the
/// device's card, the attempts so far, the latest one, and the approval.
pub const WIDE_HEADERS: [&str; 14] = [
    "NAME",
    "NODE",
    "DEVICE",
    "DRIVER",
    "METHODS",
    "PHASE",
    "ACTION",
    "AGE",
    "QUEUE",
    "POLICY",
    "CARD",
    "ATTEMPTS",
    "LAST-ATTEMPT",
    "APPROVAL",
];

/// The headers for `list` (`wide`: [`WIDE_HEADERS`]).
pub fn list_headers(wide: bool) -> &'static [&'static str] {
    if wide { &WIDE_HEADERS } else { &LIST_HEADERS }
}

/// One row per wedge, sorted by name; QUEUE is `position/length (policy)` for Queued wedges.
/// `wide` adds the [`WIDE_HEADERS`] columns after the list's.
pub fn rows(wedges: &[GpuWedge], now: Timestamp, wide: bool) -> Vec<Vec<String>> {
    let queue = queue_positions(wedges);
    let mut sorted: Vec<&GpuWedge> = wedges.iter().collect();
    sorted.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    sorted
        .into_iter()
        .map(|w| {
            let mut row = list_row(w, &queue, now);
            if wide {
                row.extend(wide_cells(w));
            }
            row
        })
        .collect()
}

fn list_row(w: &GpuWedge, queue: &BTreeMap<String, (usize, usize)>, now: Timestamp) -> Vec<String> {
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
}

/// The wide columns: POLICY, CARD (card, else render node), ATTEMPTS (how many were started),
/// LAST-ATTEMPT (`#n method outcome` of the latest), APPROVAL (`method by user` as the operator
/// recorded it; `requested by user` while a human's `unwedge.io/approve` waits to be honoured).
fn wide_cells(w: &GpuWedge) -> Vec<String> {
    let status = w.status.as_ref();
    let d = &w.spec.device;
    let attempts = status.and_then(|s| s.attempts.as_deref()).unwrap_or(&[]);
    let last = attempts
        .iter()
        .max_by_key(|a| a.attempt)
        .map(|a| format!("#{} {} {}", a.attempt, a.method, outcome_word(a.result)))
        .unwrap_or_else(|| "-".into());
    let ann = w.metadata.annotations.as_ref();
    let approval = match status.and_then(|s| s.approval.as_ref()) {
        Some(a) => format!("{} by {}", a.method, a.by),
        None => match ann.filter(|a| a.contains_key(ANN_APPROVE)) {
            Some(a) => format!(
                "requested by {}",
                a.get(ANN_BY).map(String::as_str).unwrap_or("?")
            ),
            None => "-".into(),
        },
    };
    vec![
        policy_of(w).unwrap_or("-").to_string(),
        d.card
            .clone()
            .or_else(|| d.render_node.clone())
            .unwrap_or_else(|| "-".into()),
        attempts.len().to_string(),
        last,
        approval,
    ]
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

/// One line of `kubectl unwedge budget`; `budget -o json|yaml` prints these (camelCase, an
/// invalid limit as `null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetRow {
    /// Policy name.
    pub policy: String,
    /// Whether it is the default policy (`spec.default`).
    pub default: bool,
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
                policy: name,
                default: p.spec.default,
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

/// Table cells for budget rows: POLICY has ` (default)` for the default policy, REBOOTS is
/// `in use/allowed`, DEVICES `in use/allowed of total`.
pub fn budget_cells(rows: &[BudgetRow]) -> Vec<Vec<String>> {
    let opt = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "invalid".into());
    rows.iter()
        .map(|r| {
            vec![
                if r.default {
                    format!("{} (default)", r.policy)
                } else {
                    r.policy.clone()
                },
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

/// How `list` prints (`-o`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    /// The table.
    #[default]
    Table,
    /// The table with the policy, card, attempts and approval.
    Wide,
    /// The GpuWedges as JSON (a `List`).
    Json,
    /// The GpuWedges as YAML (a `List`).
    Yaml,
}

impl ListFormat {
    /// The data format when the objects themselves are printed, `None` for a table.
    pub fn data(self) -> Option<DataFormat> {
        match self {
            ListFormat::Table | ListFormat::Wide => None,
            ListFormat::Json => Some(DataFormat::Json),
            ListFormat::Yaml => Some(DataFormat::Yaml),
        }
    }
}

/// `-o` of `describe` and `budget`: data instead of text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataFormat {
    /// JSON, indented by four spaces as kubectl does.
    Json,
    /// YAML.
    Yaml,
}

/// Prints data as `kubectl get -o json|yaml` does: JSON indented by four spaces, YAML as one
/// document without `---`; both end with a newline.
pub fn render_data<T: Serialize + ?Sized>(v: &T, f: DataFormat) -> Result<String, String> {
    match f {
        DataFormat::Json => {
            let mut buf = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            v.serialize(&mut ser).map_err(|e| e.to_string())?;
            let mut out = String::from_utf8(buf).map_err(|e| e.to_string())?;
            out.push('\n');
            Ok(out)
        }
        DataFormat::Yaml => serde_yaml::to_string(v).map_err(|e| e.to_string()),
    }
}

/// One object of a watch stream: JSON on one line, or a YAML document opened by `---`.
pub fn render_watch_item<T: Serialize + ?Sized>(v: &T, f: DataFormat) -> Result<String, String> {
    match f {
        DataFormat::Json => {
            let mut out = serde_json::to_string(v).map_err(|e| e.to_string())?;
            out.push('\n');
            Ok(out)
        }
        DataFormat::Yaml => Ok(format!(
            "---\n{}",
            serde_yaml::to_string(v).map_err(|e| e.to_string())?
        )),
    }
}

/// The `List` kubectl prints for `get -o json|yaml` of a collection.
pub fn list_object<T: Serialize>(items: &[T]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    })
}

/// An object as kubectl prints it: `apiVersion` and `kind` present (a list's items may lack
/// them), `metadata.managedFields` hidden as kubectl hides them by default.
pub fn shown(mut o: DynamicObject, ar: &ApiResource) -> DynamicObject {
    if o.types.is_none() {
        o.types = Some(TypeMeta {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
        });
    }
    o.metadata.managed_fields = None;
    o
}

/// What a watch saw change, to print.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<K> {
    /// Created or changed: its state now.
    Applied(K),
    /// Deleted: its last state.
    Deleted(K),
}

/// The objects a watch has printed, so that the watcher's own re-lists (at its start and after
/// a lost connection) print only what changed, as `kubectl get -w` does.
#[derive(Clone, Debug)]
pub struct Watch<K> {
    known: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
}

impl<K: Resource + Clone> Watch<K> {
    /// Starts from the objects already printed.
    pub fn new(printed: Vec<K>) -> Self {
        let known = printed
            .into_iter()
            .map(|o| (o.meta().name.clone().unwrap_or_default(), o))
            .collect();
        Watch {
            known,
            relist: None,
        }
    }

    /// Every object as last seen.
    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.known.values()
    }

    /// Takes one watcher event; returns the changes to print.
    pub fn on(&mut self, event: watcher::Event<K>) -> Vec<Change<K>> {
        match event {
            watcher::Event::Apply(o) => self.apply(o).into_iter().collect(),
            watcher::Event::Delete(o) => {
                let name = o.meta().name.clone().unwrap_or_default();
                self.known.remove(&name);
                vec![Change::Deleted(o)]
            }
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                let name = o.meta().name.clone().unwrap_or_default();
                self.relist.get_or_insert_default().insert(name, o);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let mut out: Vec<Change<K>> = self
                    .known
                    .iter()
                    .filter(|(name, _)| !listed.contains_key(*name))
                    .map(|(_, o)| Change::Deleted(o.clone()))
                    .collect();
                for name in out.iter().filter_map(|c| match c {
                    Change::Deleted(o) => o.meta().name.clone(),
                    Change::Applied(_) => None,
                }) {
                    self.known.remove(&name);
                }
                for o in listed.into_values() {
                    out.extend(self.apply(o));
                }
                out
            }
        }
    }

    fn apply(&mut self, o: K) -> Option<Change<K>> {
        let name = o.meta().name.clone().unwrap_or_default();
        let same = self.known.get(&name).is_some_and(|k| {
            k.meta().resource_version.is_some()
                && k.meta().resource_version == o.meta().resource_version
        });
        self.known.insert(name, o.clone());
        (!same).then_some(Change::Applied(o))
    }
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
        let rows = rows(&ws, ts("2026-01-01T00:05:30Z"), false);
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
            containers: None,
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
            restarts: None,
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
            restarts: None,
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
                default: false,
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

    #[test]
    fn wide_rows_add_policy_card_attempts_and_approval() {
        let mut w = wedge("w1", "2026-01-01T00:00:00Z", Phase::Verifying, Some("gpu"));
        w.spec.device.card = Some("card1".into());
        let s = w.status.as_mut().unwrap();
        let at = |n, m: &str, r| AttemptResult {
            attempt: n,
            method: m.into(),
            result: r,
            started_at: Time(ts("2026-01-01T00:01:00Z")),
            finished_at: None,
            message: String::new(),
            boot_id: None,
            advertised: None,
            restarts: None,
        };
        s.attempts = Some(vec![
            at(2, "bus-reset", AttemptOutcome::Succeeded),
            at(1, "rebind", AttemptOutcome::Failed),
        ]);
        s.approval = Some(Approval {
            method: "bus-reset".into(),
            attempt: 2,
            at: Time(ts("2026-01-01T00:01:00Z")),
            by: "alice".into(),
            containers: None,
        });
        let mut pending = wedge("w2", "2026-01-01T00:00:00Z", Phase::AwaitingApproval, None);
        pending.metadata.annotations = Some(BTreeMap::from([
            (ANN_APPROVE.to_string(), String::new()),
            (ANN_BY.to_string(), "bob".to_string()),
        ]));
        let now = ts("2026-01-01T00:05:30Z");
        let ws = [pending, w];
        let r = rows(&ws, now, true);
        assert_eq!(r[0].len(), WIDE_HEADERS.len());
        assert_eq!(
            r[0][..9],
            rows(&ws, now, false)[0],
            "wide starts with the list's columns"
        );
        assert_eq!(
            r[0][9..],
            [
                "gpu",
                "card1",
                "2",
                "#2 bus-reset succeeded",
                "bus-reset by alice"
            ]
        );
        assert_eq!(r[1][9..], ["-", "-", "0", "-", "requested by bob"]);
        assert_eq!(
            list_headers(true)[9..],
            ["POLICY", "CARD", "ATTEMPTS", "LAST-ATTEMPT", "APPROVAL"]
        );
        assert_eq!(list_headers(false), LIST_HEADERS);
    }

    #[test]
    fn columns_keep_later_rows_under_the_table_and_widen_for_wider_cells() {
        let rows = vec![vec!["a".to_string(), "x".to_string(), "1".to_string()]];
        let mut cols = Columns::fit(&["NAME", "NODE", "AGE"], &rows);
        assert_eq!(cols.line(&["NAME", "NODE", "AGE"]), "NAME   NODE   AGE");
        assert_eq!(cols.line(&rows[0]), "a      x      1");
        assert_eq!(
            cols.line(&["longer-name", "y", "2"]),
            "longer-name   y      2"
        );
        assert_eq!(cols.line(&["b", "z", "3"]), "b             z      3");
    }

    fn obj(name: &str, rv: &str) -> DynamicObject {
        let mut o = DynamicObject::new(name, &ApiResource::erase::<GpuWedge>(&()));
        o.metadata.resource_version = Some(rv.into());
        o
    }

    fn names(changes: &[Change<DynamicObject>]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Applied(o) => format!(
                    "+{}@{}",
                    o.metadata.name.as_deref().unwrap(),
                    o.metadata.resource_version.as_deref().unwrap()
                ),
                Change::Deleted(o) => format!("-{}", o.metadata.name.as_deref().unwrap()),
            })
            .collect()
    }

    #[test]
    fn a_watch_prints_only_what_changed_since_it_printed() {
        let mut w = Watch::new(vec![obj("a", "1"), obj("b", "1")]);
        // The watcher's own first list: nothing new.
        assert!(w.on(watcher::Event::Init).is_empty());
        assert!(w.on(watcher::Event::InitApply(obj("a", "1"))).is_empty());
        assert!(w.on(watcher::Event::InitApply(obj("b", "1"))).is_empty());
        assert!(w.on(watcher::Event::InitDone).is_empty());
        assert_eq!(names(&w.on(watcher::Event::Apply(obj("c", "2")))), ["+c@2"]);
        assert!(
            w.on(watcher::Event::Apply(obj("c", "2"))).is_empty(),
            "a replayed version"
        );
        assert_eq!(names(&w.on(watcher::Event::Apply(obj("a", "3")))), ["+a@3"]);
        assert_eq!(names(&w.on(watcher::Event::Delete(obj("b", "4")))), ["-b"]);
        // A re-list after a lost connection: c went away, a changed, d is new.
        w.on(watcher::Event::Init);
        w.on(watcher::Event::InitApply(obj("a", "5")));
        w.on(watcher::Event::InitApply(obj("d", "6")));
        assert_eq!(
            names(&w.on(watcher::Event::InitDone)),
            ["-c", "+a@5", "+d@6"]
        );
        let left: Vec<_> = w
            .objects()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(left, ["a", "d"]);
    }

    #[test]
    fn data_prints_like_kubectl() {
        let mut o = obj("w", "7");
        o.types = None;
        o.metadata.managed_fields = Some(vec![Default::default()]);
        o.data = serde_json::json!({"spec": {"nodeName": "node-a"}});
        let o = shown(o, &ApiResource::erase::<GpuWedge>(&()));
        assert!(
            o.metadata.managed_fields.is_none(),
            "kubectl hides managedFields"
        );
        let list = list_object(&[o]);
        let json = render_data(&list, DataFormat::Json).unwrap();
        assert!(json.starts_with("{\n    \"apiVersion\": \"v1\""), "{json}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["kind"], "List");
        assert_eq!(back["items"][0]["kind"], "GpuWedge");
        assert_eq!(back["items"][0]["apiVersion"], "unwedge.io/v1alpha1");
        assert_eq!(back["items"][0]["spec"]["nodeName"], "node-a");
        let yaml = render_data(&list, DataFormat::Yaml).unwrap();
        let back: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back["items"][0]["metadata"]["name"], "w");
        let line = render_watch_item(&back["items"][0], DataFormat::Json).unwrap();
        assert_eq!(line.lines().count(), 1);
        let doc = render_watch_item(&back["items"][0], DataFormat::Yaml).unwrap();
        assert!(
            doc.starts_with("---\napiVersion: unwedge.io/v1alpha1\n"),
            "{doc}"
        );
        assert_eq!(ListFormat::Wide.data(), None);
        assert_eq!(ListFormat::Yaml.data(), Some(DataFormat::Yaml));
    }

    #[test]
    fn budget_rows_serialize_in_camel_case_with_null_for_an_invalid_limit() {
        let mut p = RecoveryPolicy::new(
            "gpu",
            serde_json::from_value(serde_json::json!({"default": true})).unwrap(),
        );
        p.spec.max_unavailable = Some(IntOrString::String("x%".into()));
        let rows = budget_rows(&[p], &[]);
        assert_eq!(budget_cells(&rows)[0][0], "gpu (default)");
        let v = serde_json::to_value(&rows).unwrap();
        assert_eq!(v[0]["policy"], "gpu");
        assert_eq!(v[0]["default"], true);
        assert_eq!(v[0]["nodesAllowed"], serde_json::Value::Null);
        assert_eq!(v[0]["rebootsAllowed"], 1);
        assert_eq!(v[0]["state"], "-");
    }
}
