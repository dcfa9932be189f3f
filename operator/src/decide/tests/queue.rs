//! The budget and its queue: a full budget queues in arrival order, a queued wedge is not
//! rewritten for changing counts, reboot slots, and places taken back.

use super::*;

/// A queued wedge keeps the reason text it was queued with while only the counts change (no
/// status write, no Event per admission in a storm); a different kind of reason replaces it.
#[test]
fn a_queued_wedge_is_not_rewritten_for_changing_counts() {
    let now = t(10);
    let nodes = |text: &str| QueueReason(text.into(), BudgetLimit::Nodes);
    let first = queued_status(
        &OperatorStatus::default(),
        &nodes("50/50 nodes under recovery, 7 queued ahead"),
        now,
    );
    assert_eq!(first.phase, Some(Phase::Queued));
    assert_eq!(first.waiting_for, Some(BudgetLimit::Nodes));
    let later = queued_status(
        &first,
        &nodes("50/50 nodes under recovery, 3 queued ahead"),
        t(20),
    );
    assert_eq!(later, first, "same reason, other counts: unchanged");
    let later = queued_status(&first, &nodes("49/50 nodes under recovery"), t(20));
    assert_eq!(later, first, "no one ahead any more: still the same reason");
    let reboots = queued_status(
        &first,
        &QueueReason("1/1 reboots in progress".into(), BudgetLimit::Reboots),
        t(30),
    );
    assert_eq!(reboots.budget.as_deref(), Some("1/1 reboots in progress"));
    assert_eq!(
        reboots.phase_since, first.phase_since,
        "still Queued since then"
    );
    // Queued by a version that stored no limit: the text is written once more, with its limit.
    let legacy = OperatorStatus {
        waiting_for: None,
        ..first.clone()
    };
    let upgraded = queued_status(&legacy, &nodes("50/50 nodes under recovery"), t(40));
    assert_eq!(
        upgraded.budget.as_deref(),
        Some("50/50 nodes under recovery")
    );
    assert_eq!(upgraded.waiting_for, Some(BudgetLimit::Nodes));
    let later = queued_status(
        &upgraded,
        &nodes("50/50 nodes under recovery, 1 queued ahead"),
        t(50),
    );
    assert_eq!(later, upgraded, "then stable again");
}

#[test]
fn a_full_budget_queues_with_the_reason() {
    let mut w = World::new("rebind");
    w.ledger.push(Admission {
        wedge: "x".into(),
        node: "node-b".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    });
    w.run(5);
    assert_eq!(w.phase(), Phase::Queued);
    assert_eq!(
        w.status().budget.as_deref(),
        Some("1/1 nodes under recovery")
    );
    assert_eq!(w.status().action.as_deref(), Some("waiting: budget"));
    assert!(!w.node.unschedulable);
    w.ledger.clear();
    w.run(5);
    assert_eq!(w.phase(), Phase::Approved, "admitted once room appears");
    assert_eq!(w.status().budget, None);
}

#[test]
fn earlier_wedges_go_first() {
    let mut w = World::new("rebind");
    w.waiting = vec![("older".into(), "node-z".into())];
    w.run(3);
    assert_eq!(w.phase(), Phase::Queued);
    assert_eq!(
        w.status().budget.as_deref(),
        Some("0/1 nodes under recovery, 1 queued ahead")
    );
    assert!(
        matches!(w.decide().step, Step::Wait { requeue_after, .. } if requeue_after == queue_recheck(1)),
        "the safety-net timer follows the queue position"
    );
}

#[test]
fn reboot_waits_for_a_reboot_slot() {
    let mut w = World::new("rebind");
    w.settings.escalation = vec!["rebind".into(), "reboot".into()];
    w.limits.nodes = 2;
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.ledger.push(Admission {
        wedge: "other".into(),
        node: "node-b".into(),
        unit: BudgetUnit::Node,
        reboot: true,
    });
    w.run(20);
    assert_eq!(w.phase(), Phase::Draining);
    assert_eq!(
        w.status().budget.as_deref(),
        Some("1/1 reboots in progress")
    );
    assert_eq!(
        w.status().approval.unwrap().attempt,
        1,
        "no reboot approved"
    );
}

#[test]
fn a_reboot_that_ends_in_needs_attention_gives_its_reboot_slot_back() {
    let mut w = World::new("rebind,bus-reset");
    w.wedge.spec.device.driver = String::new();
    w.run(20);
    assert!(w.ledger[0].reboot, "reboot#1 holds the reboot slot");
    w.agent(AttemptOutcome::Refused, "no reboot: the host refused");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(w.ledger.len(), 1, "the node keeps its place");
    assert!(!w.ledger[0].reboot, "but not the reboot slot");
    assert!(w.node.unschedulable, "still cordoned for the human");
}

#[test]
fn a_lost_ledger_entry_is_reclaimed_whatever_the_budget() {
    let mut w = World::new("rebind");
    w.run(20);
    w.ledger.clear();
    w.ledger.push(Admission {
        wedge: "x".into(),
        node: "node-b".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    });
    let d = w.decide();
    assert!(
        matches!(d.step, Step::Admit { reclaim: true, .. }),
        "{:?}",
        d.step
    );
}

#[test]
fn a_queued_wedge_rechecks_later_the_further_back_it_waits() {
    assert_eq!(queue_recheck(0), Duration::from_secs(30));
    assert_eq!(queue_recheck(50), Duration::from_secs(80));
    assert_eq!(
        queue_recheck(950),
        Duration::from_secs(300),
        "at most 5 minutes"
    );
}
