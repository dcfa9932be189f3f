//! `list`: the wedge rows, wide columns and queue positions.

use std::collections::BTreeMap;

use jiff::Timestamp;
use unwedge_crds::labels::{ANN_APPROVE, ANN_BY};
use unwedge_crds::{GpuWedge, Phase};

use super::timeline::outcome_word;
use super::*;

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
