//! The drain: which pods hold the device (or, for a reboot, the node), and evicting them —
//! waiting for those on their way out, and at the drain timeout deleting them (drain.force) or
//! asking a human (docs/design.md §3).

use std::collections::BTreeSet;
use std::ops::ControlFlow::{Break, Continue};

use unwedge_crds::{GpuWedge, Method, Phase, PodRef};

use super::draft::{Draft, Flow, attention, note, pods_text, wait};
use super::hold::gate;
use super::{Attention, Input, PodView, PolicyView, REQUEUE_FAST, Step, cond};

/// Why a drain waits before the agent's first status report.
pub(super) const AWAITING_AGENT: &str = "waiting for the agent's report of the device's consumers";

/// Whether the agent has reported the device's consumers and reset domain (it creates the
/// GpuWedge first and patches its part of the status right after; until then an empty
/// consumer list means "not known yet", not "nobody").
pub(super) fn agent_reported(w: &GpuWedge) -> bool {
    w.status
        .as_ref()
        .is_some_and(|s| s.consumers.is_some() || s.reset_domain.is_some())
}

/// Whether deciding on `w` reads its node's pods, so the caller lists them only then: a
/// recovery reads them while Draining (its consumers still running, or a reboot's whole-node
/// drain) and the `none` path in every open phase (its evictions and in-place restarts). A
/// first look, the queue, the cordon, the approval's wait and the attempt read none.
pub fn reads_pods(w: &GpuWedge) -> bool {
    let status = w.status.as_ref();
    let phase = status.and_then(|s| s.phase).unwrap_or_default();
    if phase.is_terminal() {
        return false;
    }
    let stored_none = status
        .and_then(|s| s.methods.as_deref())
        .is_some_and(|m| Method::parse_list(m).first() == Some(&Method::None));
    phase == Phase::Draining || stored_none || super::plans_none(w)
}

/// The pods to drain for `method`: the node's (but DaemonSet, mirror and finished pods) for a
/// reboot, which a human must clear first when they hold emptyDir data the policy keeps; else the
/// consumers of the device and of the devices `method` disturbs with it (its reset domain).
pub(super) fn drain_targets(
    input: &Input,
    pv: &PolicyView,
    method: &Method,
) -> Result<Vec<PodRef>, Attention> {
    if *method == Method::Reboot {
        let pods: Vec<&PodView> = input
            .pods
            .iter()
            .filter(|p| !p.mirror && !p.daemon_set && !p.finished)
            .collect();
        let blocked: Vec<String> = pods
            .iter()
            .filter(|p| p.empty_dir && !pv.settings.delete_empty_dir_data)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        if !blocked.is_empty() {
            return Err(Attention {
                reason: "EmptyDirData",
                message: format!("a reboot needs a whole-node drain and {} use emptyDir (their data would be lost)", blocked.join(", ")),
                todo: "move those pods or set drain.deleteEmptyDirData in the policy, then annotate unwedge.io/retry".into(),
            });
        }
        return Ok(pods
            .into_iter()
            .map(|p| PodRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                container: None,
            })
            .collect());
    }
    let status = input.wedge.status.clone().unwrap_or_default();
    let me = &input.wedge.spec.device.pci_address;
    let disturbed: BTreeSet<&str> = status
        .reset_domain
        .iter()
        .flatten()
        .filter(|dd| dd.methods.iter().any(|m| m == method))
        .map(|dd| dd.pci_address.as_str())
        .chain(std::iter::once(me.as_str()))
        .collect();
    let pods: BTreeSet<PodRef> = status
        .consumers
        .iter()
        .flatten()
        .filter(|c| disturbed.contains(c.pci_address.as_str()))
        .map(|c| PodRef {
            namespace: c.namespace.clone(),
            name: c.pod.clone(),
            container: None,
        })
        .collect();
    Ok(pods.into_iter().collect())
}

/// The node's pod `r` names, if it is still there.
pub(super) fn node_pod<'a>(input: &'a Input, r: &PodRef) -> Option<&'a PodView> {
    input
        .pods
        .iter()
        .find(|p| p.namespace == r.namespace && p.name == r.name)
}

/// Evict what is left of `targets`; wait for pods on their way out; at the drain timeout
/// delete (force) or hand over to a human. The walk goes on when nothing holds the device any more.
pub(super) fn drain<'a>(
    mut d: Draft<'a>,
    input: &'a Input,
    pv: &PolicyView,
    targets: &[PodRef],
    purpose: &str,
) -> Flow<Draft<'a>> {
    let present: Vec<(&PodRef, &PodView)> = targets
        .iter()
        .filter_map(|r| node_pod(input, r).map(|p| (r, p)))
        .filter(|(_, p)| !p.finished)
        .collect();
    if present.is_empty() {
        d.condition(
            cond::DRAINED,
            true,
            "Drained",
            format!("no pod holds the device any more ({purpose})"),
        );
        return Continue(d);
    }
    let to_evict: Vec<PodRef> = present
        .iter()
        .filter(|(_, p)| !p.terminating)
        .map(|(r, _)| PodRef {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            container: None,
        })
        .collect();
    if to_evict.is_empty() {
        d.condition(
            cond::DRAINED,
            false,
            "Terminating",
            format!("{} pod(s) terminating", present.len()),
        );
        return Break(d.done(wait(REQUEUE_FAST, "pods terminating"), None));
    }
    let since = d.new.phase_since.as_ref().map_or(input.now, |t| t.0);
    let timeout = jiff::SignedDuration::try_from(pv.settings.drain_timeout)
        .unwrap_or(jiff::SignedDuration::MAX);
    let expired = input.now.duration_since(since) >= timeout;
    let list = pods_text(&to_evict);
    if expired {
        if pv.settings.force {
            let mut d = gate(d, pv, &format!("delete {list} ({purpose})"))?;
            let msg = format!("drain timeout: deleting {list} (drain.force)");
            d.condition(cond::DRAINED, false, "ForceDeleting", msg.clone());
            return Break(d.done(
                Step::ForceDelete { pods: to_evict },
                note(true, "ForceDelete", msg),
            ));
        }
        return Break(attention(
            d,
            Attention {
                reason: "DrainTimeout",
                message: format!("evictions of {list} were refused for {:?} (PodDisruptionBudget?)", pv.settings.drain_timeout),
                todo: "relax the PodDisruptionBudget or move the pods, then annotate unwedge.io/retry; or set drain.force in the policy".into(),
            },
        ));
    }
    let mut d = gate(d, pv, &format!("evict {list} ({purpose})"))?;
    d.condition(cond::DRAINED, false, "Evicting", format!("evicting {list}"));
    Break(d.done(Step::Evict { pods: to_evict }, None))
}
