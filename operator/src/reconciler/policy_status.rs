//! What the operator writes on a RecoveryPolicy's status besides its ledger: the circuit
//! breaker's trip and resume, and (at each refresh) its size, its budget summary and its
//! DeviceQuarantine and Conflict conditions.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use unwedge_crds::labels::ANN_RESUME;
use unwedge_crds::{GpuWedge, RecoveryPolicy};

use super::{Ctx, Error};
use crate::breaker::{self, Verdict};
use crate::decide;
use crate::ledger;
use crate::metrics;
use crate::settings::Settings;

/// Evaluates the policy's circuit breaker and records a trip or a resume on the policy.
pub(super) async fn breaker_check(
    ctx: &Ctx,
    p: &RecoveryPolicy,
    s: &Settings,
    all: &[Arc<GpuWedge>],
    nodes: &[String],
    now: Timestamp,
) -> Result<bool, Error> {
    let st = p.status.clone().unwrap_or_default();
    let resumed_at = st
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "CircuitBreakerTripped" && c.status == "False")
        .map(|c| c.last_transition_time.0);
    let annotation = p.annotations().get(ANN_RESUME).cloned();
    let state = breaker::State {
        tripped_at: st.circuit_breaker_tripped_at.as_ref().map(|t| t.0),
        resumed: st.resumed.as_deref(),
        resume_annotation: annotation.as_deref(),
        resumed_at,
    };
    let detections: Vec<Timestamp> = all
        .iter()
        .filter(|w| nodes.contains(&w.spec.node_name))
        .map(|w| decide::arrived(w))
        .collect();
    let verdict = breaker::evaluate(s.circuit_breaker.as_ref(), &state, &detections, now);
    let pname = p.name_any();
    ctx.metrics
        .breaker
        .get_or_create(&metrics::PolicyLabel {
            policy: pname.clone(),
        })
        .set(i64::from(verdict.holds()));
    match &verdict {
        Verdict::Trip { count } => {
            ctx.ensure_leader()?;
            let count = *count;
            let _: Result<_, std::convert::Infallible> =
                ledger::update(&ctx.policy_api(), &pname, |_, st| {
                    if st.circuit_breaker_tripped_at.is_some() {
                        return Ok(false);
                    }
                    st.circuit_breaker_tripped_at = Some(Time(now));
                    set_policy_condition(
                        st,
                        "CircuitBreakerTripped",
                        true,
                        "TooManyWedges",
                        &format!(
                            "{count} wedges in the window; annotate unwedge.io/resume to resume"
                        ),
                        now,
                    );
                    Ok(true)
                })
                .await?;
            ctx.event(&p.object_ref(&()), &decide::Note { warning: true, reason: "CircuitBreakerTripped".into(), message: format!("{count} wedges within the window: automatic actions paused; change annotation unwedge.io/resume to resume") });
        }
        Verdict::Resume { value } => {
            ctx.ensure_leader()?;
            let _: Result<_, std::convert::Infallible> =
                ledger::update(&ctx.policy_api(), &pname, |_, st| {
                    st.circuit_breaker_tripped_at = None;
                    st.resumed = Some(value.clone());
                    set_policy_condition(
                        st,
                        "CircuitBreakerTripped",
                        false,
                        "Resumed",
                        &format!("resumed ({value})"),
                        now,
                    );
                    Ok(true)
                })
                .await?;
        }
        _ => {}
    }
    Ok(verdict.holds())
}

/// Sets condition `type_` on a policy status; its transition time moves only when its status does.
fn set_policy_condition(
    st: &mut unwedge_crds::RecoveryPolicyStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    let list = st.conditions.get_or_insert_with(Vec::new);
    let s = if status { "True" } else { "False" };
    if let Some(c) = list.iter_mut().find(|c| c.type_ == type_) {
        if c.status != s {
            c.last_transition_time = Time(now);
        }
        c.status = s.into();
        c.reason = reason.into();
        c.message = message.into();
    } else {
        list.push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.into(),
            status: s.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Time(now),
            observed_generation: None,
        });
    }
}

/// A policy's size and budget as the refresh computed them.
pub(super) struct Summary {
    /// Nodes it governs.
    pub(super) selected: u32,
    /// Devices of those nodes (DRA), the base of maxUnavailableDevices.
    pub(super) devices: u32,
    /// `budget::summary` of its ledger.
    pub(super) text: String,
    /// Nodes that other policies select too, with those policies.
    pub(super) conflicts: Vec<(String, Vec<String>)>,
}

/// Writes the refresh's `summary` on policy `pname`, with its DeviceQuarantine condition (what
/// `--dra` resolved to) and its Conflict condition; no write when nothing changed.
pub(super) async fn write_summary(ctx: &Ctx, pname: &str, summary: &Summary) -> Result<(), Error> {
    let now = Timestamp::now();
    let _: Result<_, std::convert::Infallible> =
        ledger::update(&ctx.policy_api(), pname, |_, st| {
            let before = st.clone();
            st.nodes_selected = summary.selected;
            st.devices_selected = summary.devices;
            st.summary = Some(summary.text.clone());
            set_policy_condition(
                st,
                "DeviceQuarantine",
                ctx.dra.on,
                ctx.dra.reason,
                &ctx.dra.message,
                now,
            );
            if summary.conflicts.is_empty() {
                if st
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Conflict")
                {
                    set_policy_condition(
                        st,
                        "Conflict",
                        false,
                        "NoConflict",
                        "no other policy selects the same nodes",
                        now,
                    );
                }
            } else {
                let msg: Vec<String> = summary
                    .conflicts
                    .iter()
                    .map(|(n, o)| format!("{n}: also selected by {}", o.join(", ")))
                    .collect();
                set_policy_condition(
                    st,
                    "Conflict",
                    true,
                    "OverlappingSelectors",
                    &msg.join("; "),
                    now,
                );
            }
            Ok(*st != before)
        })
        .await?;
    Ok(())
}
