//! A RecoveryPolicy spec with every default filled in and every duration parsed.
//!
//! Pure: the decision core reads `Settings`, never the raw spec, so defaults live in one place.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use unwedge_crds::{ApprovalMode, Method, NoneAction, RecoveryPolicySpec, RestartMode, budget};

/// A policy field that cannot be used as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// A duration such as `10m` or `1h30m` did not parse.
    #[error("{field}: {value:?} is not a duration like 90s, 10m or 1h30m")]
    BadDuration {
        /// The policy field.
        field: &'static str,
        /// What it held.
        value: String,
    },
}

/// Parses a policy's duration field (the CRD's syntax: [`unwedge_crds::duration`]).
pub fn parse_duration(s: &str) -> Option<Duration> {
    unwedge_crds::duration::parse(s)
}

fn duration(
    field: &'static str,
    v: Option<&String>,
    default: Duration,
) -> Result<Duration, SettingsError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).ok_or_else(|| SettingsError::BadDuration {
            field,
            value: s.clone(),
        }),
    }
}

/// A sliding-window threshold with its window parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// How many events.
    pub count: u32,
    /// Within how long.
    pub window: Duration,
}

/// Every knob of a RecoveryPolicy, defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `maxUnavailable` as written (resolved against the node count by `budget`).
    pub max_unavailable: IntOrString,
    /// `maxConcurrentReboots`.
    pub max_concurrent_reboots: u32,
    /// `maxUnavailableDevices` as written.
    pub max_unavailable_devices: IntOrString,
    /// Methods unwedge may carry out.
    pub allowed_methods: Vec<Method>,
    /// The escalation ladder as written.
    pub escalation: Vec<Method>,
    /// Automatic or Manual.
    pub approval: ApprovalMode,
    /// Who approves the reboot rung (`rebootApproval`, default: as `approval`).
    pub reboot_approval: ApprovalMode,
    /// How long evictions may be refused before the timeout action.
    pub drain_timeout: Duration,
    /// Grace period for evictions.
    pub grace_period_seconds: Option<i64>,
    /// Evict pods with emptyDir on whole-node drains.
    pub delete_empty_dir_data: bool,
    /// Delete at the drain timeout instead of NeedsAttention.
    pub force: bool,
    /// Which containers `none` restarts.
    pub none_action: NoneAction,
    /// How `none` restarts them: in place or by eviction.
    pub none_restart: RestartMode,
    /// One `none` eviction round per device per this interval.
    pub none_min_interval: Duration,
    /// `none` eviction rounds at once across the policy's nodes.
    pub none_max_concurrent: u32,
    /// How long an approved attempt may take, counted from the approval.
    pub verify_timeout: Duration,
    /// Attempts per wedge across all rungs.
    pub max_attempts: u32,
    /// Repeat-offender threshold.
    pub repeat_offender: Option<Window>,
    /// Circuit-breaker threshold.
    pub circuit_breaker: Option<Window>,
    /// No new cordons, evictions or approvals.
    pub paused: bool,
    /// Record what would be done, do nothing.
    pub dry_run: bool,
    /// Finished GpuWedges kept per device.
    pub history_limit: u32,
}

impl Settings {
    /// Fills in the defaults of docs/design.md §3 and parses the durations.
    pub fn from_spec(spec: &RecoveryPolicySpec) -> Result<Settings, SettingsError> {
        let window =
            |field, t: &Option<unwedge_crds::Threshold>| -> Result<Option<Window>, SettingsError> {
                t.as_ref()
                    .map(|t| {
                        Ok(Window {
                            count: t.count,
                            window: duration(field, Some(&t.window), Duration::ZERO)?,
                        })
                    })
                    .transpose()
            };
        let listed = |l: &Option<Vec<String>>| {
            l.as_ref().map_or(Method::DEFAULT_ALLOWED.to_vec(), |l| {
                l.iter().map(Method::from).collect()
            })
        };
        Ok(Settings {
            max_unavailable: budget::max_unavailable(spec),
            max_concurrent_reboots: budget::max_concurrent_reboots(spec),
            max_unavailable_devices: budget::max_unavailable_devices(spec),
            allowed_methods: listed(&spec.allowed_methods),
            escalation: listed(&spec.escalation),
            approval: spec.approval,
            reboot_approval: spec.reboot_approval.unwrap_or(spec.approval),
            drain_timeout: duration(
                "drain.timeout",
                spec.drain.timeout.as_ref(),
                Duration::from_secs(600),
            )?,
            grace_period_seconds: spec.drain.grace_period_seconds,
            delete_empty_dir_data: spec.drain.delete_empty_dir_data,
            force: spec.drain.force,
            none_action: spec.none.action,
            none_restart: spec.none.restart,
            none_min_interval: duration(
                "none.minInterval",
                spec.none.min_interval.as_ref(),
                Duration::from_secs(600),
            )?,
            none_max_concurrent: budget::none_max_concurrent(spec),
            verify_timeout: duration(
                "verifyTimeout",
                spec.verify_timeout.as_ref(),
                Duration::from_secs(300),
            )?,
            max_attempts: spec.max_attempts.unwrap_or(3).max(1),
            repeat_offender: window("repeatOffender.window", &spec.repeat_offender)?,
            circuit_breaker: window("circuitBreaker.window", &spec.circuit_breaker)?,
            paused: spec.paused,
            dry_run: spec.dry_run,
            history_limit: spec.history_limit.unwrap_or(5),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let spec: RecoveryPolicySpec = serde_json::from_value(serde_json::json!({})).unwrap();
        let s = Settings::from_spec(&spec).unwrap();
        assert_eq!(s.max_unavailable, IntOrString::Int(1));
        assert_eq!(s.max_concurrent_reboots, 1);
        assert_eq!(s.allowed_methods, vec!["rebind", "bus-reset", "reboot"]);
        assert_eq!(s.escalation, vec!["rebind", "bus-reset", "reboot"]);
        assert_eq!(s.drain_timeout, Duration::from_secs(600));
        assert_eq!(s.verify_timeout, Duration::from_secs(300));
        assert_eq!(s.max_attempts, 3);
        assert_eq!(s.none_action, NoneAction::EvictBlamed);
        assert_eq!(s.none_restart, RestartMode::InPlace);
        assert_eq!(s.none_max_concurrent, 10);
        assert_eq!(s.history_limit, 5);
    }

    #[test]
    fn a_bad_duration_names_the_field() {
        let spec: RecoveryPolicySpec =
            serde_json::from_value(serde_json::json!({"drain": {"timeout": "soon"}})).unwrap();
        assert_eq!(
            Settings::from_spec(&spec).unwrap_err().to_string(),
            "drain.timeout: \"soon\" is not a duration like 90s, 10m or 1h30m"
        );
    }
}
