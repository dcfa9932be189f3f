//! The human verbs (docs/design.md §4): when each one makes sense, and the annotations that carry it.
//!
//! Pure checks only; the operator remains the judge (it re-checks everything it acts on), the
//! plugin refuses early so that a human gets a clear answer instead of a silent no-op.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use unwedge_crds::labels::{ANN_ABANDON, ANN_APPROVE, ANN_BY, ANN_RESUME, ANN_RETRY};
use unwedge_crds::{AttemptOutcome, GpuWedge, Method, Phase, RecoveryPolicy, is_method_token};

use crate::error::CliError;
use crate::present::phase_of;

fn name(w: &GpuWedge) -> String {
    w.metadata.name.clone().unwrap_or_default()
}

/// What a phase means for someone who wanted to act on it.
fn phase_hint(w: &GpuWedge) -> String {
    let budget = w.status.as_ref().and_then(|s| s.budget.clone());
    match phase_of(w) {
        Phase::Recovered => "the incident is over: the device recovered".into(),
        Phase::Abandoned => "the incident is over: it was abandoned to a human".into(),
        Phase::Queued => format!(
            "it waits for budget{}",
            budget.map(|b| format!(" ({b})")).unwrap_or_default()
        ),
        Phase::Detected => "the operator has not picked it up yet".into(),
        Phase::Approved | Phase::Recovering | Phase::Verifying => {
            "an attempt is already approved and in progress".into()
        }
        Phase::Restarting => {
            "the driver recovered by itself (WEDGED=none); nothing to approve".into()
        }
        p => format!("it is {p:?}; the operator is working on it"),
    }
}

/// Checks that `approve` applies: the wedge waits for a human (AwaitingApproval or
/// NeedsAttention), and the method, when given, is a method token the policy allows.
pub fn check_approve(
    w: &GpuWedge,
    method: Option<&str>,
    policy: Option<&RecoveryPolicy>,
) -> Result<(), CliError> {
    let phase = phase_of(w);
    if !matches!(phase, Phase::AwaitingApproval | Phase::NeedsAttention) {
        return Err(CliError::WrongPhase {
            verb: "approve",
            name: name(w),
            phase,
            wanted: "AwaitingApproval or NeedsAttention",
            hint: phase_hint(w),
        });
    }
    let Some(m) = method else { return Ok(()) };
    if !is_method_token(m) {
        return Err(CliError::BadMethod {
            method: m.into(),
            why: "a method is a token of lowercase letters, digits and '-' (e.g. rebind, bus-reset, reboot)".into(),
        });
    }
    if let Some(p) = policy {
        let allowed: Vec<String> = p
            .spec
            .allowed_methods
            .clone()
            .unwrap_or_else(|| Method::DEFAULT_ALLOWED.map(|m| m.to_string()).to_vec());
        if !allowed.iter().any(|a| a == m) {
            return Err(CliError::BadMethod {
                method: m.into(),
                why: format!(
                    "RecoveryPolicy {} allows only: {}",
                    p.metadata.name.as_deref().unwrap_or(""),
                    allowed.join(", ")
                ),
            });
        }
    }
    Ok(())
}

/// Checks that `retry` applies: the wedge is in NeedsAttention, or its latest attempt failed
/// and the incident is still open.
pub fn check_retry(w: &GpuWedge) -> Result<(), CliError> {
    let phase = phase_of(w);
    let last_failed = w
        .status
        .as_ref()
        .and_then(|s| s.attempts.as_ref())
        .and_then(|a| a.iter().max_by_key(|a| a.attempt))
        .is_some_and(|a| a.result == AttemptOutcome::Failed);
    if phase == Phase::NeedsAttention || (last_failed && !phase.is_terminal()) {
        return Ok(());
    }
    Err(CliError::WrongPhase {
        verb: "retry",
        name: name(w),
        phase,
        wanted: "NeedsAttention, or an open wedge whose last attempt failed",
        hint: phase_hint(w),
    })
}

/// Checks that `abandon` applies: the incident is still open.
pub fn check_abandon(w: &GpuWedge) -> Result<(), CliError> {
    let phase = phase_of(w);
    if phase.is_terminal() {
        return Err(CliError::WrongPhase {
            verb: "abandon",
            name: name(w),
            phase,
            wanted: "an open incident (any phase but Recovered or Abandoned)",
            hint: phase_hint(w),
        });
    }
    Ok(())
}

/// A human verb with its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `unwedge.io/approve`: empty (the operator's planned method) or a method.
    Approve(String),
    /// `unwedge.io/retry`: a fresh token (a timestamp) so each retry is a change.
    Retry(String),
    /// `unwedge.io/abandon`: the reason.
    Abandon(String),
}

/// The merge patch that writes a verb and `unwedge.io/by` together, as the admission policy
/// requires (the operator only honours a verb whose `by` is the proven requester).
pub fn annotation_patch(verb: &Verb, by: &str) -> Value {
    let (key, value) = match verb {
        Verb::Approve(v) => (ANN_APPROVE, v),
        Verb::Retry(v) => (ANN_RETRY, v),
        Verb::Abandon(v) => (ANN_ABANDON, v),
    };
    let mut ann = BTreeMap::new();
    ann.insert(key, value.as_str());
    ann.insert(ANN_BY, by);
    json!({ "metadata": { "annotations": ann } })
}

/// What abandoning means, printed every time because `abandon` asks no questions.
pub fn abandon_meaning(name: &str, node: &str) -> String {
    format!(
        "Abandoning GpuWedge {name} means:\n  \
         - unwedge lets go: no further attempt, eviction or escalation for this incident;\n  \
         - node {node} stays cordoned (if unwedge cordoned it) for a human to repair and uncordon \
         (`kubectl uncordon {node}`);\n  \
         - its place in the budget is released and your name is recorded as the one who took over."
    )
}

/// The merge patch of `pause` (`true`) and of `resume` without a tripped breaker (`false`).
pub fn paused_patch(paused: bool) -> Value {
    json!({ "spec": { "paused": paused } })
}

/// What pausing means, printed with the change.
pub fn pause_meaning(policy: &str, was_paused: bool) -> String {
    let change = if was_paused {
        format!("recoverypolicy/{policy} was already paused (spec.paused: true); nothing changed.")
    } else {
        format!("recoverypolicy/{policy} paused: spec.paused set to true.")
    };
    format!(
        "{change}\nWhile it is paused, the operator takes no automatic action on the nodes it \
         governs: no new cordon, eviction or approval (a human approval waits too).\nWedges are \
         still recorded and shown, waiting with a condition that says the policy is paused.\n\
         `kubectl unwedge resume {policy}` resumes it."
    )
}

/// What `resume` writes to a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The merge patch.
    pub patch: Value,
    /// Whether `spec.paused` was true.
    pub was_paused: bool,
    /// When the circuit breaker tripped, if it is tripped: the patch then also sets
    /// `unwedge.io/resume`.
    pub tripped_at: Option<jiff::Timestamp>,
    /// The new `unwedge.io/resume` value, if any.
    pub token: Option<String>,
}

/// What `resume` writes: `spec.paused: false`, and when the circuit breaker is tripped
/// (`status.circuitBreakerTrippedAt`), `unwedge.io/resume` set to the time `now` in RFC 3339.
/// The operator resumes the breaker when that annotation differs from the value it last
/// honoured (`status.resumed`), so the token never repeats it nor the annotation in place
/// (whole seconds, or nanoseconds when the second is taken).
pub fn resume_plan(p: &RecoveryPolicy, now: jiff::Timestamp) -> Resume {
    let status = p.status.as_ref();
    let tripped_at = status
        .and_then(|s| s.circuit_breaker_tripped_at.as_ref())
        .map(|t| t.0);
    let token = tripped_at.map(|_| {
        let taken: Vec<&str> = [
            status.and_then(|s| s.resumed.as_deref()),
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_RESUME))
                .map(String::as_str),
        ]
        .into_iter()
        .flatten()
        .collect();
        let secs = format!("{now:.0}");
        if taken.contains(&secs.as_str()) {
            format!("{now:.9}")
        } else {
            secs
        }
    });
    let mut patch = paused_patch(false);
    if let Some(t) = &token {
        patch["metadata"] = json!({ "annotations": { ANN_RESUME: t } });
    }
    Resume {
        patch,
        was_paused: p.spec.paused,
        tripped_at,
        token,
    }
}

/// What resuming did and means, printed with the change.
pub fn resume_meaning(policy: &str, r: &Resume) -> String {
    let mut out = if r.was_paused {
        format!("recoverypolicy/{policy} resumed: spec.paused set to false.")
    } else {
        format!("recoverypolicy/{policy} was not paused (spec.paused: false).")
    };
    match (&r.tripped_at, &r.token) {
        (Some(at), Some(token)) => out.push_str(&format!(
            "\nIts circuit breaker tripped at {at:.0} (too many wedges in its window): set \
             {ANN_RESUME}={token}, which tells the operator to close it. Only wedges detected \
             from now on count towards tripping it again."
        )),
        _ => out.push_str("\nIts circuit breaker is not tripped."),
    }
    if r.was_paused || r.tripped_at.is_some() {
        out.push_str(
            "\nThe operator acts on the policy's wedges again (admission, cordon, drain, \
             approval, recovery) within its budget.",
        );
    } else {
        out.push_str("\nNothing held the policy's automatic actions; nothing changed.");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::{
        AttemptResult, DeviceRef, GpuWedgeSpec, GpuWedgeStatus, RecoveryPolicySpec,
        RecoveryPolicyStatus,
    };

    fn wedge(phase: Phase) -> GpuWedge {
        let mut w = GpuWedge::new(
            "w",
            GpuWedgeSpec {
                node_name: "n".into(),
                device: DeviceRef {
                    pci_address: "0000:03:00.0".into(),
                    ..Default::default()
                },
                methods: vec!["rebind".into()],
                detected_at: Time(jiff::Timestamp::UNIX_EPOCH),
                boot_id: String::new(),
                uevent: Default::default(),
                blamed: None,
            },
        );
        w.status = Some(GpuWedgeStatus {
            phase: Some(phase),
            ..Default::default()
        });
        w
    }

    fn policy(allowed: Option<Vec<&str>>) -> RecoveryPolicy {
        let mut spec: RecoveryPolicySpec = serde_json::from_value(json!({})).unwrap();
        spec.allowed_methods = allowed.map(|a| a.into_iter().map(Into::into).collect());
        RecoveryPolicy::new("gpu", spec)
    }

    #[test]
    fn approve_applies_only_to_wedges_waiting_for_a_human() {
        assert!(check_approve(&wedge(Phase::AwaitingApproval), None, None).is_ok());
        assert!(check_approve(&wedge(Phase::NeedsAttention), None, None).is_ok());
        for p in [
            Phase::Queued,
            Phase::Recovering,
            Phase::Recovered,
            Phase::Detected,
        ] {
            let e = check_approve(&wedge(p), None, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("is {p:?}")), "{e}");
            assert!(e.contains("AwaitingApproval or NeedsAttention"), "{e}");
        }
    }

    #[test]
    fn approve_refuses_a_method_the_policy_excludes() {
        let w = wedge(Phase::AwaitingApproval);
        let p = policy(Some(vec!["rebind", "cold-reset"]));
        assert!(
            check_approve(&w, Some("cold-reset"), Some(&p)).is_ok(),
            "any token the policy lists"
        );
        let e = check_approve(&w, Some("reboot"), Some(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("allows only: rebind, cold-reset"), "{e}");
        let e = check_approve(&w, Some("vendor-specific"), Some(&policy(None))).unwrap_err();
        assert!(e.to_string().contains("rebind, bus-reset, reboot"), "{e}");
        let e = check_approve(&w, Some("Bus_Reset"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lowercase"), "{e}");
    }

    #[test]
    fn retry_needs_attention_or_a_failed_last_attempt() {
        assert!(check_retry(&wedge(Phase::NeedsAttention)).is_ok());
        assert!(check_retry(&wedge(Phase::Cordoned)).is_err());
        let mut w = wedge(Phase::Approved);
        let at = |n, r| AttemptResult {
            attempt: n,
            method: "rebind".into(),
            result: r,
            started_at: Time(jiff::Timestamp::UNIX_EPOCH),
            finished_at: None,
            message: String::new(),
            boot_id: None,
            advertised: None,
            restarts: None,
        };
        w.status.as_mut().unwrap().attempts = Some(vec![
            at(2, AttemptOutcome::Failed),
            at(1, AttemptOutcome::Succeeded),
        ]);
        assert!(
            check_retry(&w).is_ok(),
            "attempt 2 is the latest and failed"
        );
        w.status.as_mut().unwrap().phase = Some(Phase::Abandoned);
        assert!(
            check_retry(&w).is_err(),
            "a finished incident cannot be retried"
        );
    }

    #[test]
    fn abandon_applies_to_open_incidents() {
        assert!(check_abandon(&wedge(Phase::Draining)).is_ok());
        assert!(check_abandon(&wedge(Phase::Recovered)).is_err());
    }

    #[test]
    fn verbs_are_written_together_with_by() {
        let p = annotation_patch(&Verb::Approve(String::new()), "alice");
        assert_eq!(
            p,
            json!({"metadata": {"annotations": {"unwedge.io/approve": "", "unwedge.io/by": "alice"}}})
        );
        let p = annotation_patch(&Verb::Abandon("bad board".into()), "bob");
        assert_eq!(
            p["metadata"]["annotations"]["unwedge.io/abandon"],
            "bad board"
        );
        assert!(abandon_meaning("w", "node-a").contains("node node-a stays cordoned"));
    }

    fn tripped(annotation: Option<&str>, resumed: Option<&str>) -> RecoveryPolicy {
        let mut p = policy(None);
        p.spec.paused = true;
        if let Some(a) = annotation {
            p.metadata.annotations =
                Some(BTreeMap::from([(ANN_RESUME.to_string(), a.to_string())]));
        }
        p.status = Some(RecoveryPolicyStatus {
            circuit_breaker_tripped_at: Some(Time("2026-01-01T00:00:00Z".parse().unwrap())),
            resumed: resumed.map(Into::into),
            ..Default::default()
        });
        p
    }

    #[test]
    fn pause_sets_paused_and_says_what_it_means() {
        assert_eq!(paused_patch(true), json!({"spec": {"paused": true}}));
        let m = pause_meaning("gpu", false);
        assert!(
            m.contains("recoverypolicy/gpu paused: spec.paused set to true"),
            "{m}"
        );
        assert!(m.contains("no new cordon, eviction or approval"), "{m}");
        assert!(m.contains("still recorded"), "{m}");
        assert!(pause_meaning("gpu", true).contains("already paused"));
    }

    #[test]
    fn resume_without_a_tripped_breaker_only_unpauses() {
        let mut p = policy(None);
        p.spec.paused = true;
        let r = resume_plan(&p, "2026-02-03T04:05:06.5Z".parse().unwrap());
        assert_eq!(r.patch, json!({"spec": {"paused": false}}));
        assert!(r.was_paused && r.token.is_none() && r.tripped_at.is_none());
        let m = resume_meaning("gpu", &r);
        assert!(m.contains("spec.paused set to false"), "{m}");
        assert!(m.contains("circuit breaker is not tripped"), "{m}");
        let r = resume_plan(&policy(None), jiff::Timestamp::UNIX_EPOCH);
        assert!(!r.was_paused && r.token.is_none());
        assert!(resume_meaning("gpu", &r).contains("nothing changed"));
    }

    #[test]
    fn resume_of_a_tripped_breaker_sets_a_new_resume_token() {
        let now: jiff::Timestamp = "2026-02-03T04:05:06.5Z".parse().unwrap();
        let r = resume_plan(
            &tripped(Some("2026-01-01T00:00:00Z"), Some("2026-01-01T00:00:00Z")),
            now,
        );
        assert_eq!(
            r.patch,
            json!({"spec": {"paused": false},
                   "metadata": {"annotations": {"unwedge.io/resume": "2026-02-03T04:05:06Z"}}})
        );
        let m = resume_meaning("gpu", &r);
        assert!(m.contains("tripped at 2026-01-01T00:00:00Z"), "{m}");
        assert!(
            m.contains("set unwedge.io/resume=2026-02-03T04:05:06Z"),
            "{m}"
        );
        // The same second was already used (a resume a moment ago): the token still changes.
        let r = resume_plan(&tripped(None, Some("2026-02-03T04:05:06Z")), now);
        assert_eq!(r.token.as_deref(), Some("2026-02-03T04:05:06.500000000Z"));
        let r = resume_plan(&tripped(Some("2026-02-03T04:05:06Z"), None), now);
        assert_eq!(r.token.as_deref(), Some("2026-02-03T04:05:06.500000000Z"));
    }
}
