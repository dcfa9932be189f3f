//! Holds and policy resolution: a paused policy, a tripped circuit breaker, a dry run (the
//! policy's or the agent's), no policy and conflicting policies.

use super::*;

#[test]
fn paused_policy_holds_new_cordons_and_says_why() {
    let mut w = World::new("rebind");
    w.settings.paused = true;
    w.run(5);
    assert_eq!(w.phase(), Phase::Detected);
    assert!(w.ledger.is_empty() && !w.node.unschedulable);
    assert_eq!(w.cond(cond::PAUSED).unwrap().reason, "PolicyPaused");
    assert!(
        w.status()
            .action
            .unwrap()
            .starts_with("held: would cordon node-a")
    );
    w.settings.paused = false;
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved);
    assert!(w.cond(cond::PAUSED).is_none(), "the hold is gone");
}

#[test]
fn paused_mid_drain_stops_evictions_and_approvals() {
    let mut w = World::new("rebind");
    w.pods[0].terminating = true;
    w.run(10);
    w.pods[0].terminating = false;
    w.settings.paused = true;
    w.run(5);
    assert_eq!(w.phase(), Phase::Draining);
    assert!(evicted(&w).is_empty());
    assert!(
        w.status().action.unwrap().ends_with("rebind#1)"),
        "{:?}",
        w.status().action
    );
    w.settings.paused = false;
    w.run(20);
    assert_eq!(
        w.status().approval.unwrap().attempt,
        1,
        "the plan survived the hold"
    );
}

#[test]
fn tripped_breaker_holds_automatic_actions() {
    let mut w = World::new("rebind");
    w.breaker = true;
    w.run(5);
    assert!(w.ledger.is_empty());
    assert_eq!(
        w.cond(cond::PAUSED).unwrap().reason,
        "CircuitBreakerTripped"
    );
    assert!(
        w.cond(cond::PAUSED)
            .unwrap()
            .message
            .contains("unwedge.io/resume")
    );
}

#[test]
fn tripped_breaker_holds_none_evictions_too() {
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::EvictConsumers;
    w.breaker = true;
    w.run(5);
    assert!(evicted(&w).is_empty());
    assert_eq!(w.phase(), Phase::Detected);
}

#[test]
fn dry_run_records_what_it_would_do_and_does_nothing() {
    let mut w = World::new("rebind");
    w.settings.dry_run = true;
    w.run(5);
    assert!(w.ledger.is_empty() && !w.node.unschedulable && evicted(&w).is_empty());
    assert_eq!(
        w.status().action.as_deref(),
        Some("dry-run: would cordon node-a, drain the device's pods, approve rebind#1")
    );
    assert_eq!(w.cond(cond::DRY_RUN).unwrap().status, "True");
    let mut w = World::new("none");
    w.settings.dry_run = true;
    w.settings.none_action = NoneAction::EvictConsumers;
    w.run(5);
    assert_eq!(w.phase(), Phase::Recovered);
    assert_eq!(
        w.status().action.as_deref(),
        Some("dry-run: would evict ml/train-0")
    );
    assert!(evicted(&w).is_empty());
}

#[test]
fn an_agent_in_dry_run_disrupts_nothing_and_takes_no_place() {
    let mut w = World::new("rebind,bus-reset");
    let mut st = w.status();
    st.agent_dry_run = Some(true);
    w.wedge.status = Some(st);
    w.run(10);
    assert!(w.ledger.is_empty(), "no budget place: {:?}", w.ledger);
    assert!(!w.node.unschedulable, "never cordoned");
    assert!(evicted(&w).is_empty(), "nothing evicted");
    assert!(w.status().approval.is_none(), "nothing approved");
    let c = w.cond(cond::DRY_RUN).expect("a DryRun condition");
    assert!(c.message.contains("--dry-run"), "{}", c.message);
    assert!(
        c.message.contains("cordon node-a"),
        "says what it would do: {}",
        c.message
    );
}

#[test]
fn no_policy_and_conflicts_wait_with_a_condition() {
    let mut w = World::new("rebind");
    w.governance = Some(Governance::NoPolicy);
    w.run(3);
    assert_eq!(w.cond(cond::GOVERNED).unwrap().reason, "NoPolicy");
    assert_eq!(w.phase(), Phase::Detected);
    w.governance = Some(Governance::Conflict(vec!["a".into(), "b".into()]));
    w.run(3);
    let c = w.cond(cond::GOVERNED).unwrap();
    assert_eq!(c.reason, "PolicyConflict");
    assert!(c.message.contains("a, b"));
    w.governance = Some(Governance::Invalid {
        name: "a".into(),
        error: "bad".into(),
    });
    w.run(3);
    assert_eq!(w.cond(cond::GOVERNED).unwrap().reason, "InvalidPolicy");
    assert!(!w.node.unschedulable);
}
