//! Re-planning from a newer method list, and the plan as a status field (kept through holds
//! and NeedsAttention, never read back from the action text).

use super::*;

#[test]
fn a_rebind_event_turns_an_open_none_incident_into_a_recovery() {
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::EvictConsumers;
    // Stop in Restarting: the eviction is in flight.
    w.pods[0].terminating = true;
    w.run(10);
    assert_eq!(w.phase(), Phase::Restarting);
    let mut st = w.status();
    st.events = Some(vec![WedgeEvent {
        seqnum: Some(9),
        methods: vec!["rebind".into(), "bus-reset".into()],
        at: Time(t(5)),
        pid: None,
    }]);
    w.wedge.status = Some(st);
    w.pods[0].terminating = false;
    w.run(30);
    assert_eq!(w.status().methods.as_deref(), Some("rebind,bus-reset"));
    assert_eq!(w.phase(), Phase::Approved);
    assert!(w.node.unschedulable);
    assert_eq!(w.ledger[0].unit, BudgetUnit::Node);
}

#[test]
fn a_later_none_never_replaces_a_recovery_plan() {
    let mut w = World::new("rebind");
    let mut st = w.status();
    st.events = Some(vec![WedgeEvent {
        seqnum: Some(9),
        methods: vec!["none".into()],
        at: Time(t(5)),
        pid: None,
    }]);
    w.wedge.status = Some(st);
    w.run(20);
    assert_eq!(w.status().methods.as_deref(), Some("rebind"));
    assert_eq!(w.phase(), Phase::Approved);
}

#[test]
fn a_new_method_list_replans_a_drain() {
    let mut w = World::new("rebind");
    w.pods[0].terminating = true;
    w.run(10);
    assert_eq!(w.phase(), Phase::Draining);
    let mut st = w.status();
    st.events = Some(vec![WedgeEvent {
        seqnum: Some(9),
        methods: vec!["bus-reset".into()],
        at: Time(t(5)),
        pid: None,
    }]);
    w.wedge.status = Some(st);
    w.pods.remove(0);
    w.run(20);
    assert_eq!(w.status().approval.unwrap().method, "bus-reset");
}

#[test]
fn wedging_again_during_a_successful_attempt_replans() {
    let mut w = World::new("rebind");
    w.run(20);
    w.agent(AttemptOutcome::Succeeded, "ok");
    let mut st = w.status();
    st.events = Some(vec![WedgeEvent {
        seqnum: Some(9),
        methods: vec!["bus-reset".into()],
        at: Time(t(50)),
        pid: None,
    }]);
    w.wedge.status = Some(st);
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("bus-reset", 2));
}

fn stored_plan(w: &World) -> Option<(String, u32, Option<u32>)> {
    w.status()
        .plan
        .map(|p| (p.method.to_string(), p.attempt, p.rung))
}

#[test]
fn the_plan_is_written_with_its_action_and_survives_a_hold() {
    let mut w = World::new("rebind,bus-reset");
    w.pods[0].terminating = true;
    w.run(10);
    assert_eq!(w.phase(), Phase::Draining);
    assert_eq!(w.status().action.as_deref(), Some("drain for rebind#1"));
    assert_eq!(stored_plan(&w), Some(("rebind".into(), 1, Some(1))));
    w.pods[0].terminating = false;
    w.settings.paused = true;
    w.run(5);
    assert!(w.status().action.unwrap().starts_with("held: "));
    assert_eq!(
        stored_plan(&w),
        Some(("rebind".into(), 1, Some(1))),
        "a hold rewrites the action, not the plan"
    );
    w.settings.paused = false;
    w.run(20);
    assert_eq!(stored_plan(&w), Some(("rebind".into(), 1, Some(1))));
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    assert_eq!(w.status().action.as_deref(), Some("bus-reset#2"));
    assert_eq!(stored_plan(&w), Some(("bus-reset".into(), 2, Some(2))));
}

/// An escalation held while paused keeps its rung: the plan is not lost with the action text
/// (which used to send the wedge back to the first rung after a pause mid-escalation).
#[test]
fn an_escalation_held_mid_drain_keeps_its_rung() {
    let mut w = World::new("rebind,bus-reset");
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.pods.push(PodView {
        terminating: true,
        ..pod("ml", "train-1")
    });
    w.wedge.status.as_mut().unwrap().consumers = Some(vec![consumer("train-1", PCI)]);
    w.run(20);
    assert_eq!(w.phase(), Phase::Draining);
    assert_eq!(stored_plan(&w), Some(("bus-reset".into(), 2, Some(2))));
    w.pods.last_mut().unwrap().terminating = false;
    w.settings.paused = true;
    w.run(5);
    assert!(w.status().action.unwrap().starts_with("held: "));
    w.settings.paused = false;
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("bus-reset", 2));
}

/// NeedsAttention rewrites the action but keeps the plan, so a retry resumes the rung where
/// the ladder stood (here the reboot it escalated to), not the last approved one.
#[test]
fn needs_attention_keeps_the_plan_and_a_retry_resumes_there() {
    let mut w = World::new("rebind");
    w.settings.escalation = vec!["rebind".into(), "reboot".into()];
    w.pods.push(PodView {
        empty_dir: true,
        ..pod("ml", "scratch")
    });
    w.run(20);
    assert_eq!(w.status().approval.unwrap().method, "rebind");
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.status().action.as_deref(),
        Some("needs attention: EmptyDirData")
    );
    assert_eq!(stored_plan(&w), Some(("reboot".into(), 2, Some(2))));
    w.pods.retain(|p| p.name != "scratch");
    w.verbs = Verbs {
        retry: Some("1".into()),
        by: Some("carol".into()),
        ..Default::default()
    };
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("reboot", 2),
        "the planned reboot#2 was never approved, so its id is still unused"
    );
}

/// A wedge written by a version without `status.plan` (the plan only in the action text) is
/// never read from the text: it plans afresh from the cordon, first rung, new attempt id. So is
/// one whose plan is older than its last approval (left by a downgrade and upgrade again).
#[test]
fn a_wedge_without_a_current_plan_plans_afresh_with_a_new_attempt_id() {
    let stale = Plan {
        method: Method::Rebind,
        attempt: 1,
        rung: Some(1),
    };
    for (phase, old_plan) in [
        (Phase::Draining, None),
        (Phase::AwaitingApproval, None),
        (Phase::Draining, Some(stale.clone())),
        (Phase::AwaitingApproval, Some(stale)),
    ] {
        let mut w = World::new("rebind,bus-reset");
        w.run(20);
        w.agent(AttemptOutcome::Failed, "x");
        w.pods.push(PodView {
            terminating: true,
            ..pod("ml", "train-1")
        });
        w.wedge.status.as_mut().unwrap().consumers = Some(vec![consumer("train-1", PCI)]);
        w.run(20);
        assert_eq!(stored_plan(&w), Some(("bus-reset".into(), 2, Some(2))));
        let mut st = w.status();
        st.phase = Some(phase);
        st.action = Some("awaiting approval for bus-reset#2".into());
        st.plan = old_plan;
        w.wedge.status = Some(st);
        w.pods.last_mut().unwrap().terminating = false;
        let d = w.decide();
        assert_eq!(d.status.phase, Some(Phase::Draining), "{phase:?}");
        assert_eq!(
            d.status
                .plan
                .as_ref()
                .map(|p| (p.method.as_str(), p.attempt)),
            Some(("rebind", 2)),
            "{phase:?}: first rung, the next unused id (only #1 was approved)"
        );
        w.apply(&d);
        w.run(20);
        let a = w.status().approval.unwrap();
        assert_eq!((a.method.as_str(), a.attempt), ("rebind", 2), "{phase:?}");
    }
}
