//! Read-outs of a GpuWedge that scenarios assert on, and the runner that collects the
//! outcome of several scenarios sharing one control plane.

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use unwedge_crds::gpuwedge::{AttemptOutcome, GpuWedge, Phase};

/// A scenario's result: `Err` carries the whole failure report.
pub type Outcome = Result<(), String>;

/// The pods the operator evicted for this wedge, as sorted, deduplicated `namespace/pod`.
pub fn evicted(w: &GpuWedge) -> Vec<String> {
    let mut v: Vec<String> = w
        .status
        .as_ref()
        .and_then(|s| s.evictions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| format!("{}/{}", e.namespace, e.pod))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The number of eviction records (duplicates included: a pod evicted twice counts twice).
pub fn eviction_records(w: &GpuWedge) -> usize {
    w.status
        .as_ref()
        .and_then(|s| s.evictions.as_ref())
        .map_or(0, Vec::len)
}

/// The attempts the agent reported, as (method, result) in order.
pub fn attempt_seq(w: &GpuWedge) -> Vec<(String, AttemptOutcome)> {
    w.status
        .clone()
        .unwrap_or_default()
        .attempts
        .unwrap_or_default()
        .iter()
        .map(|a| (a.method.clone(), a.result))
        .collect()
}

/// The phase, if the operator has written one.
pub fn phase(w: &GpuWedge) -> Option<Phase> {
    w.status.as_ref().and_then(|s| s.phase)
}

/// The status condition of type `kind`.
pub fn condition(w: &GpuWedge, kind: &str) -> Option<Condition> {
    w.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == kind).cloned())
}

/// Every condition as `Type=Status (Reason): message`, for failure messages.
pub fn conditions_line(w: &GpuWedge) -> String {
    w.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| format!("{}={} ({}): {}", c.type_, c.status, c.reason, c.message))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// Runs scenarios one after the other, prints each one's result and time, and gathers the
/// failures; `UNWEDGE_SCENARIOS=key,…` selects a subset by key.
pub struct Runner {
    only: Option<String>,
    failures: Vec<String>,
    started: Instant,
}

impl Default for Runner {
    fn default() -> Self {
        Runner::new()
    }
}

impl Runner {
    /// A runner honouring `UNWEDGE_SCENARIOS`.
    pub fn new() -> Runner {
        Runner {
            only: std::env::var("UNWEDGE_SCENARIOS").ok(),
            failures: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Whether the scenario with this key is selected.
    pub fn wants(&self, key: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|k| k.trim() == key))
    }

    /// Records a scenario's outcome (and restarts the clock for the next one).
    pub fn record(&mut self, name: &str, r: Outcome) {
        eprintln!(
            "scenario {name}: {} in {:.1}s",
            if r.is_ok() { "ok" } else { "FAILED" },
            self.started.elapsed().as_secs_f64()
        );
        self.started = Instant::now();
        if let Err(e) = r {
            self.failures.push(format!("=== {name}\n{e}"));
        }
    }

    /// Panics with every failure report, if any scenario failed.
    pub fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} scenario(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n\n")
        );
    }
}
