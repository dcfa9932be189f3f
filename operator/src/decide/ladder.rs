//! The plan: which method list the wedge is recovered from, its first rung and the ladder of
//! rungs after it, and the attention a method unwedge cannot carry out asks for
//! (docs/design.md §1, §3).

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use unwedge_crds::{GpuWedge, Method, labels::UEVENT_SURVIVABILITY_MODE};

use super::Attention;
use crate::settings::Settings;

/// The first rung and the ladder for a method list (kernel order, fewer to more side effects).
///
/// The first rung is the first method the kernel listed that the policy allows; if that
/// method is not one unwedge can carry out (vendor-specific, cold-reset, unknown, any new
/// token) or none is allowed, a human must act. The ladder continues with the escalation rungs
/// after it that the kernel listed later, plus `reboot` (unwedge's own last rung).
pub fn ladder(methods: &[Method], s: &Settings) -> Result<Vec<Method>, Attention> {
    let listed: Vec<&Method> = methods.iter().filter(|m| **m != Method::None).collect();
    let Some((first_idx, first)) = listed
        .iter()
        .enumerate()
        .find(|(_, m)| s.allowed_methods.contains(*m))
    else {
        let cold_reset = Method::from(COLD_RESET);
        if listed.contains(&&cold_reset) {
            // A power cycle is a human's job whatever the policy allows: say so, not just
            // that no method is allowed.
            let mut a = unusable(&cold_reset);
            a.message = format!(
                "the kernel asked for {}, and the policy allows {}; only a power cycle of the device is left, which unwedge cannot carry out",
                Method::join(&listed),
                Method::join(&s.allowed_methods)
            );
            return Err(a);
        }
        return Err(Attention {
            reason: "NoAllowedMethod",
            message: format!(
                "the kernel asked for {}; the policy allows {}",
                Method::join(&listed),
                Method::join(&s.allowed_methods)
            ),
            todo: "recover the device by hand, then annotate unwedge.io/abandon; or approve an allowed method with unwedge.io/approve=<method>".into(),
        });
    };
    if !first.agent_runs() {
        return Err(unusable(first));
    }
    let mut out = vec![(*first).clone()];
    let start = s
        .escalation
        .iter()
        .position(|r| r == *first)
        .map_or(0, |p| p + 1);
    for rung in &s.escalation[start..] {
        let later_listed = listed.iter().skip(first_idx + 1).any(|m| *m == rung);
        let allowed = s.allowed_methods.contains(rung);
        if allowed
            && (later_listed || *rung == Method::Reboot)
            && rung.agent_runs()
            && !out.contains(rung)
        {
            out.push(rung.clone());
        }
    }
    Ok(out)
}

/// With no driver bound to the device (the agent reports `driver: ""`), rebind and bus-reset
/// cannot work (both end by binding the driver again and verifying it): only the reboot rung is
/// kept. A ladder with no reboot left asks a human at once instead of walking rungs that fail.
pub fn without_driver(
    plan: Result<Vec<Method>, Attention>,
    driver: &str,
) -> Result<Vec<Method>, Attention> {
    if !driver.is_empty() {
        return plan;
    }
    let rungs = plan?;
    if rungs.contains(&Method::Reboot) {
        return Ok(vec![Method::Reboot]);
    }
    Err(Attention {
        reason: "NoDriver",
        message: format!(
            "no driver is bound to the device, so {} cannot work, and the policy allows no reboot",
            Method::join(&rungs).replace(',', ", ")
        ),
        todo: "bind the device's driver by hand or reboot the node, then annotate unwedge.io/abandon; or allow reboot in the policy and annotate unwedge.io/retry".into(),
    })
}

/// `cold-reset`: a complete power cycle of the device (docs/design.md §1).
const COLD_RESET: &str = "cold-reset";

/// A NeedsAttention of a wedge that lists `vendor-specific`, with what xe's
/// `survivability_mode` (the agent's `spec.uevent` key [`UEVENT_SURVIVABILITY_MODE`]) says
/// the device needs: a firmware flash, which fwupd carries out. Any other attention, or no mode
/// reported, is returned as it is.
pub fn with_vendor_hint(
    mut a: Attention,
    methods: &[Method],
    uevent: &BTreeMap<String, String>,
) -> Attention {
    let relevant = matches!(a.reason, "VendorSpecific" | "NoAllowedMethod")
        && methods.contains(&Method::VendorSpecific);
    let Some(raw) = uevent.get(UEVENT_SURVIVABILITY_MODE).filter(|_| relevant) else {
        return a;
    };
    let first = raw.lines().next().unwrap_or_default();
    let mode = first
        .strip_prefix("Survivability mode type:")
        .unwrap_or(first)
        .trim();
    let what = match mode.to_ascii_lowercase().as_str() {
        "runtime" => "xe runtime survivability mode: a firmware error at runtime; the GPU needs a firmware flash to work again".to_string(),
        "boot" => "xe boot survivability mode: the GPU's boot firmware failed; it needs a firmware flash to work again".to_string(),
        _ => format!("xe survivability mode {mode:?}: the GPU needs a firmware flash to work again"),
    };
    a.reason = "VendorSpecific";
    a.message = format!("{}; {what}", a.message);
    a.todo = "flash the GPU's firmware on the node with fwupd (fwupdmgr refresh, then fwupdmgr update), then annotate unwedge.io/abandon".into();
    a
}

fn unusable(method: &Method) -> Attention {
    let (reason, todo) = match method {
        Method::VendorSpecific => (
            "VendorSpecific",
            "the driver asks for a vendor procedure (e.g. a firmware flash, xe survivability mode): carry it out on the node, then annotate unwedge.io/abandon",
        ),
        Method::Other(t) if t == COLD_RESET => (
            "ColdReset",
            "the device needs a complete power cycle (a warm reboot may not give one): power-cycle the node, then annotate unwedge.io/abandon",
        ),
        Method::Unknown => (
            "UnknownMethod",
            "the driver does not know how to recover: inspect the device and its kernel log, then annotate unwedge.io/approve=<method> or unwedge.io/abandon",
        ),
        _ => (
            "UnknownMethod",
            "unwedge does not know this method: recover the device by hand, then annotate unwedge.io/abandon, or approve a known method with unwedge.io/approve=<method>",
        ),
    };
    Attention {
        reason,
        message: format!("the kernel asked for {method}, which unwedge cannot carry out"),
        todo: todo.into(),
    }
}

/// The method list to plan from: the newest recovery list the kernel sent (spec or a later
/// event), or `none` when every list said the driver recovered by itself. A later `none` never
/// replaces a recovery plan: it does not unpark a device.
pub fn plan_methods(w: &GpuWedge) -> Vec<Method> {
    let mut lists: Vec<(Timestamp, u64, &Vec<String>)> =
        vec![(ts(&w.spec.detected_at), 0, &w.spec.methods)];
    if let Some(ev) = w.status.as_ref().and_then(|s| s.events.as_ref()) {
        for e in ev {
            lists.push((ts(&e.at), e.seqnum.unwrap_or(0), &e.methods));
        }
    }
    lists.sort_by_key(|(at, seq, _)| (*at, *seq));
    let is_none = |l: &Vec<String>| l.first().is_none_or(|m| Method::None == *m);
    lists
        .iter()
        .rev()
        .find(|(_, _, l)| !is_none(l))
        .or(lists.last())
        .map(|(_, _, l)| l.iter().map(Method::from).collect())
        .unwrap_or_default()
}

/// Whether the wedge's plan is `none` (the driver recovered by itself; nothing to carry out).
pub fn plans_none(w: &GpuWedge) -> bool {
    plan_methods(w).first() == Some(&Method::None)
}

fn ts(t: &Time) -> Timestamp {
    t.0
}
