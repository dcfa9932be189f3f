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

/// `UNWEDGE_SCENARIOS=key,…`: the scenarios a run selects by key. Unset or blank selects every
/// scenario.
///
/// Several scenario files read the same variable, so a filter may name keys of several files
/// (`outbox,pdb` runs `outbox` in `scenarios` and `pdb` in `scenarios_controls`). A file fails
/// only when the filter selects none of its own scenarios: that catches a misspelt key when one
/// file runs alone, and never fails a file over keys that belong to another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScenarioFilter {
    keys: Option<Vec<String>>,
}

/// A filter that selects none of one file's scenarios.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "UNWEDGE_SCENARIOS={filter} selects none of this file's scenarios; its keys are: {known} \
     (unset UNWEDGE_SCENARIOS to run them all)"
)]
pub struct NoScenarioSelected {
    /// The filter as given.
    pub filter: String,
    /// This file's keys, comma separated.
    pub known: String,
}

impl ScenarioFilter {
    /// The filter in `UNWEDGE_SCENARIOS`.
    pub fn from_env() -> ScenarioFilter {
        ScenarioFilter::parse(std::env::var("UNWEDGE_SCENARIOS").ok().as_deref())
    }

    /// Parses `key,key,…` (spaces around keys ignored); `None` or blank selects everything.
    pub fn parse(value: Option<&str>) -> ScenarioFilter {
        let keys: Vec<String> = value
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect();
        ScenarioFilter {
            keys: (!keys.is_empty()).then_some(keys),
        }
    }

    /// Whether the scenario with this key is selected.
    pub fn selects(&self, key: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|keys| keys.iter().any(|k| k == key))
    }

    /// Fails when the filter is set and selects none of `known`, one file's scenario keys.
    pub fn check(&self, known: &[String]) -> Result<(), NoScenarioSelected> {
        match &self.keys {
            Some(keys) if !known.iter().any(|k| self.selects(k)) => Err(NoScenarioSelected {
                filter: keys.join(","),
                known: known.join(", "),
            }),
            _ => Ok(()),
        }
    }
}

/// Runs scenarios one after the other, prints each one's result and time, and gathers the
/// failures; `UNWEDGE_SCENARIOS=key,…` selects a subset by key ([`ScenarioFilter`]).
pub struct Runner {
    filter: ScenarioFilter,
    known: Vec<String>,
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
        Runner::with_filter(ScenarioFilter::from_env())
    }

    /// A runner selecting scenarios with `filter`.
    pub fn with_filter(filter: ScenarioFilter) -> Runner {
        Runner {
            filter,
            known: Vec::new(),
            failures: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Whether the scenario with this key is selected; remembers the key for [`Runner::finish`].
    pub fn wants(&mut self, key: &str) -> bool {
        self.known.push(key.to_string());
        self.filter.selects(key)
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

    /// Panics with every failure report, if any scenario failed, or when `UNWEDGE_SCENARIOS`
    /// selected none of the keys [`Runner::wants`] was asked about.
    pub fn finish(self) {
        if let Err(e) = self.filter.check(&self.known) {
            panic!("{e}");
        }
        assert!(
            self.failures.is_empty(),
            "{} scenario(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ks: &[&str]) -> Vec<String> {
        ks.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn unset_or_blank_selects_every_scenario() {
        for value in [None, Some(""), Some(" , ")] {
            let f = ScenarioFilter::parse(value);
            assert!(f.selects("happy"), "{value:?} should select happy");
            assert_eq!(f.check(&keys(&["happy"])), Ok(()), "{value:?}");
        }
    }

    #[test]
    fn selects_the_named_keys_only_trimmed_and_exact() {
        let f = ScenarioFilter::parse(Some(" outbox ,esc"));
        assert!(f.selects("outbox"));
        assert!(f.selects("esc"));
        assert!(!f.selects("happy"));
        assert!(!f.selects("out"), "a key is matched whole, not as a prefix");
    }

    #[test]
    fn keys_of_another_file_pass_when_one_of_this_file_is_named() {
        let f = ScenarioFilter::parse(Some("outbox,pdb"));
        assert_eq!(f.check(&keys(&["happy", "outbox"])), Ok(()));
        assert_eq!(f.check(&keys(&["pdb", "manual"])), Ok(()));
    }

    #[test]
    #[should_panic(expected = "UNWEDGE_SCENARIOS=outbx selects none of this file's scenarios")]
    fn a_runner_that_ran_nothing_for_its_filter_fails() {
        let mut run = Runner::with_filter(ScenarioFilter::parse(Some("outbx")));
        assert!(!run.wants("happy"));
        assert!(!run.wants("outbox"));
        run.finish();
    }

    #[test]
    fn a_runner_that_ran_a_selected_scenario_passes() {
        let mut run = Runner::with_filter(ScenarioFilter::parse(Some("outbox")));
        assert!(!run.wants("happy"));
        assert!(run.wants("outbox"));
        run.record("outbox", Ok(()));
        run.finish();
    }

    #[test]
    fn a_filter_selecting_none_of_this_file_fails_naming_its_keys() {
        let f = ScenarioFilter::parse(Some("outbx"));
        let err = f.check(&keys(&["happy", "outbox"])).unwrap_err();
        assert_eq!(
            err,
            NoScenarioSelected {
                filter: "outbx".into(),
                known: "happy, outbox".into()
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("UNWEDGE_SCENARIOS=outbx") && msg.contains("happy, outbox"),
            "{msg}"
        );
    }
}
