//! What the executor does next, decided from values only: the wedge, the attempt journal, the
//! boot id (`next_action`), and the pure helpers around it (the attempts array, the fd gate's
//! targets, the agent message, a method in words). Nothing here reads or writes anything.

use unwedge_crds::{AttemptResult, GpuWedge, Method};

use super::journal::{Journal, JournalRecord, wedge_key};

/// What the executor should do for a wedge now.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutorStep {
    /// Nothing: no approval, already done, or the incident is over.
    Idle,
    /// A new approval: journal and report Started, gate, act, verify.
    Start {
        /// Attempt id.
        attempt: u32,
        /// Method.
        method: String,
    },
    /// Started before a restart but the gate never cleared (the device was not touched): gate again.
    ResumeGate {
        /// Attempt id.
        attempt: u32,
        /// Method.
        method: String,
    },
    /// A reboot attempt and the boot id changed: verify the device and report.
    VerifyAfterReboot {
        /// Attempt id.
        attempt: u32,
        /// The boot id recorded before rebooting.
        started_boot_id: String,
    },
    /// This process asked the host to reboot for the attempt and the boot id has not changed
    /// yet: wait for the host to go down (the operator's attempt timeout covers a reboot that
    /// never comes).
    AwaitingReboot {
        /// Attempt id.
        attempt: u32,
    },
    /// The agent restarted while acting (or lost its journal): report Failed, never re-execute.
    ReportInterrupted {
        /// Attempt id.
        attempt: u32,
        /// Method.
        method: String,
    },
    /// The journal has the final result but the status does not (a lost patch): report it.
    ReportFinished {
        /// The Finished record.
        record: JournalRecord,
    },
}

/// Decides the next step for `wedge` given the journal, the current boot id and whether this
/// process has already asked the host to reboot for the approved attempt.
pub fn next_action(
    wedge: &GpuWedge,
    journal: &Journal,
    boot_id: &str,
    reboot_requested: bool,
) -> ExecutorStep {
    let Some(status) = wedge.status.as_ref() else {
        return ExecutorStep::Idle;
    };
    let Some(approval) = status.approval.as_ref() else {
        return ExecutorStep::Idle;
    };
    if status.phase.is_some_and(|p| p.is_terminal()) {
        return ExecutorStep::Idle;
    }
    let attempt = approval.attempt;
    let method = approval.method.clone();
    let reported = status
        .attempts
        .iter()
        .flatten()
        .find(|a| a.attempt == attempt);
    if reported.is_some_and(|a| a.result.is_final()) {
        return ExecutorStep::Idle;
    }
    let log = journal.of(&wedge_key(wedge), attempt);
    if let Some(record) = log.finished {
        return ExecutorStep::ReportFinished { record };
    }
    if let Some(acting) = log.acting {
        return if Method::Reboot == acting.method && acting.boot_id != boot_id {
            ExecutorStep::VerifyAfterReboot {
                attempt,
                started_boot_id: acting.boot_id,
            }
        } else if Method::Reboot == acting.method && reboot_requested {
            ExecutorStep::AwaitingReboot { attempt }
        } else {
            ExecutorStep::ReportInterrupted {
                attempt,
                method: acting.method,
            }
        };
    }
    if let Some(started) = log.started {
        return ExecutorStep::ResumeGate {
            attempt,
            method: started.method,
        };
    }
    if reported.is_some() {
        // Status says Started/Blocked but this state dir never heard of it: another agent
        // instance (or a wiped state dir) may have acted. Never guess: report.
        return ExecutorStep::ReportInterrupted { attempt, method };
    }
    ExecutorStep::Start { attempt, method }
}

/// `attempts` with `entry` put in place of the one with the same attempt id (or appended).
pub fn upsert_attempt(attempts: &[AttemptResult], entry: AttemptResult) -> Vec<AttemptResult> {
    let mut out: Vec<AttemptResult> = attempts
        .iter()
        .filter(|a| a.attempt != entry.attempt)
        .cloned()
        .collect();
    out.push(entry);
    out.sort_by_key(|a| a.attempt);
    out
}

/// The device nodes and PCI addresses the fd gate must see closed for `wedge`: the device
/// itself and every reset-domain member the method disturbs (all of them when none says).
pub fn gate_targets(wedge: &GpuWedge, method: &str) -> (Vec<String>, Vec<String>) {
    let mut nodes = Vec::new();
    let mut pcis = vec![wedge.spec.device.pci_address.clone()];
    nodes.extend(wedge.spec.device.card.clone());
    nodes.extend(wedge.spec.device.render_node.clone());
    let domain = wedge
        .status
        .as_ref()
        .and_then(|s| s.reset_domain.clone())
        .unwrap_or_default();
    let relevant: Vec<_> = domain
        .iter()
        .filter(|d| d.methods.iter().any(|m| m == method))
        .collect();
    let members = if relevant.is_empty() {
        domain.iter().collect()
    } else {
        relevant
    };
    for d in members {
        pcis.push(d.pci_address.clone());
        nodes.extend(d.card.clone());
        nodes.extend(d.render_node.clone());
    }
    nodes.sort();
    nodes.dedup();
    pcis.sort();
    pcis.dedup();
    (nodes, pcis)
}

/// `existing` agent message with `note` put first (once), for a human reading the status.
pub fn with_note(existing: Option<&str>, note: &str) -> String {
    match existing.filter(|m| !m.is_empty()) {
        Some(m) if m.contains(note) => m.to_string(),
        Some(m) => format!("{note}; {m}"),
        None => note.to_string(),
    }
}

/// What a method would do to the device `bdf` with the sysfs `driver`, in words (logs and
/// dry-run messages).
pub fn plan_text(bdf: &str, driver: Option<&str>, method: &str) -> String {
    let drv = driver.unwrap_or("its driver");
    match Method::from(method) {
        Method::None => "do nothing to the device".to_string(),
        Method::Rebind => format!("unbind {bdf} from {drv} and bind it again"),
        Method::BusReset => format!(
            "unbind {bdf} from {drv}, write 1 to its reset file, bind it again (fallback: remove + rescan)"
        ),
        Method::Reboot => "reboot the host".to_string(),
        other => format!("not know how to carry out {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::journal::Stage;
    use crate::executor::journal::tests::{journal, rec};
    use jiff::Timestamp;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::{Approval, AttemptOutcome, DeviceRef, GpuWedgeSpec, GpuWedgeStatus, Phase};

    fn wedge(approval: Option<(&str, u32)>, attempts: Vec<AttemptResult>) -> GpuWedge {
        let mut w = GpuWedge::new(
            "node-a-0000-03-00-0-7",
            GpuWedgeSpec {
                node_name: "node-a".into(),
                device: DeviceRef {
                    pci_address: "0000:03:00.0".into(),
                    driver: "xe".into(),
                    ..DeviceRef::default()
                },
                methods: vec!["rebind".into()],
                detected_at: Time(Timestamp::UNIX_EPOCH),
                boot_id: "b1".into(),
                uevent: Default::default(),
                blamed: None,
            },
        );
        w.metadata.uid = Some("uid-1".into());
        w.status = Some(GpuWedgeStatus {
            approval: approval.map(|(m, a)| Approval {
                method: m.into(),
                attempt: a,
                at: Time(Timestamp::UNIX_EPOCH),
                by: "op".into(),
                containers: None,
            }),
            attempts: Some(attempts),
            ..GpuWedgeStatus::default()
        });
        w
    }

    fn result(r: AttemptOutcome) -> AttemptResult {
        AttemptResult {
            attempt: 1,
            method: "rebind".into(),
            result: r,
            started_at: Time(Timestamp::UNIX_EPOCH),
            finished_at: None,
            message: String::new(),
            boot_id: None,
            advertised: None,
            restarts: None,
        }
    }

    #[test]
    fn new_approval_starts() {
        let (_t, j) = journal(vec![]);
        assert_eq!(
            next_action(&wedge(Some(("rebind", 1)), vec![]), &j, "b1", false),
            ExecutorStep::Start {
                attempt: 1,
                method: "rebind".into()
            }
        );
        assert_eq!(
            next_action(&wedge(None, vec![]), &j, "b1", false),
            ExecutorStep::Idle
        );
    }

    #[test]
    fn finished_attempts_and_closed_incidents_are_idle() {
        let (_t, j) = journal(vec![]);
        assert_eq!(
            next_action(
                &wedge(Some(("rebind", 1)), vec![result(AttemptOutcome::Failed)]),
                &j,
                "b1",
                false
            ),
            ExecutorStep::Idle
        );
        let mut w = wedge(Some(("rebind", 1)), vec![]);
        w.status.as_mut().unwrap().phase = Some(Phase::Abandoned);
        assert_eq!(next_action(&w, &j, "b1", false), ExecutorStep::Idle);
    }

    #[test]
    fn journal_wins_over_a_lost_status_patch() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "rebind", "b1"),
            rec(Stage::Acting, "rebind", "b1"),
            rec(Stage::Finished, "rebind", "b1"),
        ]);
        assert!(matches!(
            next_action(&wedge(Some(("rebind", 1)), vec![]), &j, "b1", false),
            ExecutorStep::ReportFinished { .. }
        ));
    }

    #[test]
    fn interrupted_action_is_reported_not_repeated() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "rebind", "b1"),
            rec(Stage::Acting, "rebind", "b1"),
        ]);
        let w = wedge(Some(("rebind", 1)), vec![result(AttemptOutcome::Started)]);
        assert_eq!(
            next_action(&w, &j, "b1", false),
            ExecutorStep::ReportInterrupted {
                attempt: 1,
                method: "rebind".into()
            }
        );
        let (_t2, empty) = journal(vec![]);
        assert_eq!(
            next_action(&w, &empty, "b1", false),
            ExecutorStep::ReportInterrupted {
                attempt: 1,
                method: "rebind".into()
            }
        );
    }

    #[test]
    fn gate_not_passed_resumes_the_gate() {
        let (_t, j) = journal(vec![rec(Stage::Started, "rebind", "b1")]);
        let w = wedge(Some(("rebind", 1)), vec![result(AttemptOutcome::Blocked)]);
        assert_eq!(
            next_action(&w, &j, "b1", false),
            ExecutorStep::ResumeGate {
                attempt: 1,
                method: "rebind".into()
            }
        );
    }

    #[test]
    fn reboot_is_proven_by_a_new_boot_id() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "reboot", "b1"),
            rec(Stage::Acting, "reboot", "b1"),
        ]);
        let w = wedge(Some(("reboot", 1)), vec![]);
        assert_eq!(
            next_action(&w, &j, "b2", false),
            ExecutorStep::VerifyAfterReboot {
                attempt: 1,
                started_boot_id: "b1".into()
            }
        );
        assert_eq!(
            next_action(&w, &j, "b1", false),
            ExecutorStep::ReportInterrupted {
                attempt: 1,
                method: "reboot".into()
            }
        );
    }

    #[test]
    fn the_process_that_asked_for_the_reboot_waits_for_it() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "reboot", "b1"),
            rec(Stage::Acting, "reboot", "b1"),
        ]);
        let w = wedge(Some(("reboot", 1)), vec![]);
        assert_eq!(
            next_action(&w, &j, "b1", true),
            ExecutorStep::AwaitingReboot { attempt: 1 }
        );
        assert_eq!(
            next_action(&w, &j, "b2", true),
            ExecutorStep::VerifyAfterReboot {
                attempt: 1,
                started_boot_id: "b1".into()
            }
        );
    }
}
