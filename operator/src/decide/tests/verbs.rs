//! Human verbs: manual approval, approving another method or one the policy forbids, retry
//! and abandon.

use super::*;

#[test]
fn manual_approval_waits_for_a_human_and_records_who() {
    let mut w = World::new("rebind");
    w.settings.approval = ApprovalMode::Manual;
    w.run(20);
    assert_eq!(w.phase(), Phase::AwaitingApproval);
    assert_eq!(
        w.status().action.as_deref(),
        Some("awaiting approval for rebind#1")
    );
    w.verbs.approve = Some(String::new());
    w.run(3);
    assert_eq!(
        w.phase(),
        Phase::AwaitingApproval,
        "approve without by is refused"
    );
    assert_eq!(w.cond(cond::APPROVED).unwrap().reason, "MissingBy");
    w.verbs.by = Some("alice".into());
    w.run(3);
    assert_eq!(w.phase(), Phase::Approved);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt, a.by.as_str()),
        ("rebind", 1, "alice")
    );
    assert!(
        w.log.iter().any(|s| matches!(s, Step::ClearVerbs { .. })),
        "the verb is consumed"
    );
}

#[test]
fn approving_another_method_drains_for_it_first() {
    let mut w = World::new("rebind,bus-reset");
    w.settings.approval = ApprovalMode::Manual;
    w.run(20);
    w.pods.push(pod("ml", "late"));
    let mut st = w.status();
    st.consumers
        .get_or_insert_with(Vec::new)
        .push(consumer("late", "0000:04:00.0"));
    st.reset_domain = Some(vec![DomainDevice {
        pci_address: "0000:04:00.0".into(),
        card: None,
        render_node: None,
        relation: "same-slot".into(),
        methods: vec!["bus-reset".into()],
    }]);
    w.wedge.status = Some(st);
    w.verbs = Verbs {
        approve: Some("bus-reset".into()),
        by: Some("bob".into()),
        ..Default::default()
    };
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.by.as_str()), ("bus-reset", "bob"));
    assert!(evicted(&w).contains(&"ml/late".to_string()));
}

#[test]
fn approving_a_method_the_policy_forbids_is_refused() {
    let mut w = World::new("rebind");
    w.settings.approval = ApprovalMode::Manual;
    w.run(20);
    w.verbs = Verbs {
        approve: Some("cold-reset".into()),
        by: Some("bob".into()),
        ..Default::default()
    };
    w.run(3);
    assert_eq!(w.phase(), Phase::AwaitingApproval);
    assert_eq!(w.cond(cond::APPROVED).unwrap().reason, "MethodNotAllowed");
}

#[test]
fn retry_starts_a_new_attempt_from_the_current_rung() {
    let mut w = World::new("rebind,bus-reset");
    w.settings.max_attempts = 1;
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    w.verbs = Verbs {
        retry: Some("1".into()),
        by: Some("carol".into()),
        ..Default::default()
    };
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("rebind", 2),
        "same rung, new attempt id"
    );
    assert_eq!(w.phase(), Phase::Approved);
}

#[test]
fn retry_is_ignored_while_an_attempt_runs() {
    let mut w = World::new("rebind");
    w.run(20);
    w.verbs = Verbs {
        retry: Some("1".into()),
        by: Some("carol".into()),
        ..Default::default()
    };
    w.run(5);
    assert_eq!(w.status().approval.unwrap().attempt, 1);
}

#[test]
fn abandon_lets_go_without_uncordoning_and_records_who() {
    let mut w = World::new("rebind");
    w.run(20);
    w.verbs = Verbs {
        abandon: Some("taking it to the lab".into()),
        by: Some("dave".into()),
        ..Default::default()
    };
    w.run(5);
    assert_eq!(w.phase(), Phase::Abandoned);
    assert!(w.node.unschedulable, "left to the human");
    assert!(w.ledger.is_empty(), "budget released");
    assert!(w.cond(cond::ABANDONED).unwrap().message.contains("dave"));
    assert_eq!(w.status().action.as_deref(), Some("abandoned by dave"));
}

#[test]
fn reboot_approval_manual_waits_for_a_human_before_a_reboot_only() {
    let mut w = World::new("rebind,bus-reset");
    w.settings.reboot_approval = ApprovalMode::Manual;
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("rebind", 1),
        "rebind is automatic"
    );
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    assert_eq!(
        w.phase(),
        Phase::AwaitingApproval,
        "action {:?}",
        w.status().action
    );
    assert_eq!(
        w.status().action.as_deref(),
        Some("awaiting approval for reboot#3")
    );
    w.verbs.approve = Some(String::new());
    w.verbs.by = Some("alice".into());
    w.run(5);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt, a.by.as_str()),
        ("reboot", 3, "alice")
    );
}
