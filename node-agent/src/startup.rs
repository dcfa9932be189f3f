//! Start-up (and post-overrun) reconciliation: what the uevent socket may have missed.
//!
//! - A GPU in xe's survivability mode is a wedge the agent may not have heard: it is reported as
//!   a GpuWedge with methods `["vendor-specific"]` (what the kernel sends for it since 6.18) and
//!   `spec.uevent` `{SOURCE: startup-reconcile, SURVIVABILITY_MODE: <mode>}`, through the outbox
//!   (an open incident of that device absorbs it).
//! - A GPU with no driver bound is logged (naming its open incident, if any) and counted in
//!   `startup_findings_total{kind="unbound-driver"}`. No GpuWedge is created for it: a GPU can be unbound on
//!   purpose (blacklisted driver, passthrough), and a wedge would cordon the node on a guess.
//! - Open incidents of this node whose attempts were left `Started`/`Blocked` are logged; the
//!   executor's first pass reports them (never re-executes them).
//!
//! After a netlink overrun (ENOBUFS) the same rescan runs, but it cannot recover everything the
//! lost uevents said: xe, i915 and amdgpu keep a wedged device bound, and sysfs has no generic
//! "wedged" attribute, so a wedge of a GPU that stays bound (and is not in xe's survivability
//! mode) leaves no trace the agent can read. [`lost_uevents_note`] says so, naming those GPUs,
//! for the log, `unwedge_agent_uevents_lost_total` and a `GpuUeventsLost` Event on the Node.

use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::ResourceExt;
use unwedge_crds::{AttemptOutcome, DeviceRef, GpuWedge};

use crate::reporter::{DetectedWedge, Source, is_open};
use crate::sysfs::Sysfs;

/// Something reconciliation found.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// A GPU with no driver bound; `open_incident` names its open wedge, if any.
    UnboundDriver {
        /// PCI address.
        pci: String,
        /// The open wedge of that device.
        open_incident: Option<String>,
    },
    /// xe's survivability mode is set.
    Survivability {
        /// PCI address.
        pci: String,
        /// The attribute's value.
        mode: String,
    },
    /// An open incident with attempts left unfinished.
    InterruptedAttempts {
        /// The wedge.
        wedge: String,
        /// The unfinished attempt ids.
        attempts: Vec<u32>,
    },
}

impl Finding {
    /// The metric label of this finding.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::UnboundDriver { .. } => "unbound-driver",
            Finding::Survivability { .. } => "survivability-mode",
            Finding::InterruptedAttempts { .. } => "interrupted-attempt",
        }
    }
}

/// The findings, from the node's GPUs `(pci, driver)`, a survivability probe and this node's
/// wedges. Pure.
pub fn findings(
    gpus: &[(String, Option<String>)],
    survivability: impl Fn(&str) -> Option<String>,
    wedges: &[GpuWedge],
) -> Vec<Finding> {
    let open: Vec<&GpuWedge> = wedges.iter().filter(|w| is_open(w)).collect();
    let mut out = Vec::new();
    for (pci, driver) in gpus {
        if driver.is_none() {
            out.push(Finding::UnboundDriver {
                pci: pci.clone(),
                open_incident: open
                    .iter()
                    .find(|w| w.spec.device.pci_address == *pci)
                    .map(|w| w.name_any()),
            });
        }
        if let Some(mode) = survivability(pci) {
            out.push(Finding::Survivability {
                pci: pci.clone(),
                mode,
            });
        }
    }
    for w in open {
        let attempts: Vec<u32> = w
            .status
            .as_ref()
            .and_then(|s| s.attempts.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| matches!(a.result, AttemptOutcome::Started | AttemptOutcome::Blocked))
            .map(|a| a.attempt)
            .collect();
        if !attempts.is_empty() {
            out.push(Finding::InterruptedAttempts {
                wedge: w.name_any(),
                attempts,
            });
        }
    }
    out
}

/// What a human must know after uevents were lost: what the rescan found and which GPUs it
/// cannot vouch for (bound, not in survivability mode: a wedge of them is invisible in sysfs).
pub fn lost_uevents_note(gpus: &[(String, Option<String>)], findings: &[Finding]) -> String {
    let mut found = Vec::new();
    let mut flagged = Vec::new();
    for f in findings {
        match f {
            Finding::UnboundDriver { pci, .. } => {
                found.push(format!("{pci} has no driver bound"));
                flagged.push(pci.as_str());
            }
            Finding::Survivability { pci, mode } => {
                found.push(format!("{pci} is in survivability mode {mode} (reported)"));
                flagged.push(pci.as_str());
            }
            Finding::InterruptedAttempts { .. } => {}
        }
    }
    let unknown: Vec<&str> = gpus
        .iter()
        .filter(|(pci, driver)| driver.is_some() && !flagged.contains(&pci.as_str()))
        .map(|(pci, _)| pci.as_str())
        .collect();
    let found = if found.is_empty() {
        "no GPU is unbound or in survivability mode".to_string()
    } else {
        found.join("; ")
    };
    let mut note =
        format!("uevents were lost (netlink receive buffer overrun); sysfs rescan: {found}.");
    if !unknown.is_empty() {
        note.push_str(&format!(
            " A wedge of a GPU that stays bound leaves no trace in sysfs: if a workload on {} fails, look for 'wedged' in the kernel log; unwedge cannot act on a wedge it did not hear (a GpuWedge written by hand is refused), so recover that GPU by hand (drain the node, reboot it).",
            unknown.join(", ")
        ));
    }
    note
}

/// Runs the sysfs side of reconciliation and returns the findings plus the detections to put
/// in the outbox (survivability mode). `wedges` are this node's GpuWedges (empty if the API is
/// away: the outbox's open-incident check still collapses duplicates later).
pub fn reconcile(
    sysfs: &Sysfs,
    node: &str,
    boot_id: &str,
    wedges: &[GpuWedge],
) -> (Vec<Finding>, Vec<DetectedWedge>) {
    let found = findings(&sysfs.gpus(), |pci| sysfs.survivability_mode(pci), wedges);
    let mut detections = Vec::new();
    for f in &found {
        match f {
            Finding::UnboundDriver { pci, open_incident } => tracing::warn!(
                pci = %pci,
                open_incident = open_incident.as_deref().unwrap_or("none"),
                "GPU has no driver bound at agent start; if it was not unbound on purpose, a wedge or an interrupted recovery left it so"
            ),
            Finding::Survivability { pci, mode } => {
                tracing::warn!(pci = %pci, mode = %mode, "GPU is in xe survivability mode; reporting it as a vendor-specific wedge");
                let device = sysfs.resolve_pci(pci).map(|r| r.device).unwrap_or_else(|e| {
                    tracing::error!(pci = %pci, error = %e, "cannot resolve the device; reporting what is known");
                    DeviceRef { pci_address: pci.clone(), ..DeviceRef::default() }
                });
                let detected_at = Timestamp::from_second(Timestamp::now().as_second())
                    .unwrap_or_else(|_| Timestamp::now());
                detections.push(DetectedWedge {
                    node: node.to_string(),
                    device,
                    methods: vec!["vendor-specific".to_string()],
                    detected_at,
                    boot_id: boot_id.to_string(),
                    uevent: BTreeMap::from([
                        ("SOURCE".to_string(), "startup-reconcile".to_string()),
                        (unwedge_crds::labels::UEVENT_SURVIVABILITY_MODE.to_string(), mode.clone()),
                    ]),
                    seqnum: None,
                    blamed: None,
                    consumers: Vec::new(),
                    reset_domain: Vec::new(),
                    agent_message: Some(format!(
                        "found by a sysfs rescan (agent start or lost uevents): xe survivability_mode={mode}"
                    )),
                    source: Source::Startup,
                    enriched: false,
                });
            }
            Finding::InterruptedAttempts { wedge, attempts } => tracing::warn!(
                wedge = %wedge,
                ?attempts,
                "open incident has unfinished attempts; the executor reports them and does not re-execute them"
            ),
        }
    }
    (found, detections)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::{AttemptResult, GpuWedgeSpec, GpuWedgeStatus, Phase};

    fn wedge(pci: &str, phase: Option<Phase>, attempt: Option<AttemptOutcome>) -> GpuWedge {
        let mut w = GpuWedge::new(
            &format!("n-{}", pci.replace([':', '.'], "-")),
            GpuWedgeSpec {
                node_name: "n".into(),
                device: DeviceRef {
                    pci_address: pci.into(),
                    ..DeviceRef::default()
                },
                methods: vec!["rebind".into()],
                detected_at: Time(Timestamp::UNIX_EPOCH),
                boot_id: String::new(),
                uevent: BTreeMap::new(),
                blamed: None,
            },
        );
        w.status = Some(GpuWedgeStatus {
            phase,
            attempts: attempt.map(|r| {
                vec![AttemptResult {
                    attempt: 4,
                    method: "rebind".into(),
                    result: r,
                    started_at: Time(Timestamp::UNIX_EPOCH),
                    finished_at: None,
                    message: String::new(),
                    boot_id: None,
                    advertised: None,
                    restarts: None,
                }]
            }),
            ..GpuWedgeStatus::default()
        });
        w
    }

    #[test]
    fn reports_unbound_survivability_and_interrupted() {
        let gpus = vec![
            ("0000:03:00.0".to_string(), None),
            ("0000:04:00.0".to_string(), Some("xe".to_string())),
            ("0000:05:00.0".to_string(), Some("xe".to_string())),
        ];
        let wedges = vec![
            wedge(
                "0000:03:00.0",
                Some(Phase::Recovering),
                Some(AttemptOutcome::Started),
            ),
            wedge(
                "0000:05:00.0",
                Some(Phase::Recovered),
                Some(AttemptOutcome::Started),
            ),
        ];
        let f = findings(
            &gpus,
            |p| (p == "0000:04:00.0").then(|| "Runtime".to_string()),
            &wedges,
        );
        assert_eq!(
            f,
            vec![
                Finding::UnboundDriver {
                    pci: "0000:03:00.0".into(),
                    open_incident: Some("n-0000-03-00-0".into())
                },
                Finding::Survivability {
                    pci: "0000:04:00.0".into(),
                    mode: "Runtime".into()
                },
                Finding::InterruptedAttempts {
                    wedge: "n-0000-03-00-0".into(),
                    attempts: vec![4]
                },
            ]
        );
    }

    #[test]
    fn the_lost_uevents_note_names_what_the_rescan_cannot_see() {
        let gpus = vec![
            ("0000:03:00.0".to_string(), None),
            ("0000:04:00.0".to_string(), Some("xe".to_string())),
            ("0000:05:00.0".to_string(), Some("xe".to_string())),
        ];
        let found = findings(
            &gpus,
            |p| (p == "0000:04:00.0").then(|| "Runtime".to_string()),
            &[],
        );
        let note = lost_uevents_note(&gpus, &found);
        assert!(note.contains("0000:03:00.0 has no driver bound"), "{note}");
        assert!(
            note.contains("0000:04:00.0 is in survivability mode"),
            "{note}"
        );
        assert!(
            note.contains("if a workload on 0000:05:00.0 fails"),
            "{note}"
        );
        assert!(note.contains("recover that GPU by hand"), "{note}");
        let quiet = lost_uevents_note(&gpus[2..], &[]);
        assert!(quiet.contains("no GPU is unbound"), "{quiet}");
    }

    #[test]
    fn a_healthy_node_has_no_findings() {
        let gpus = vec![("0000:03:00.0".to_string(), Some("amdgpu".to_string()))];
        assert!(
            findings(
                &gpus,
                |_| None,
                &[wedge("0000:03:00.0", Some(Phase::Recovered), None)]
            )
            .is_empty()
        );
    }
}
