//! The lifecycle of a wedge recovered by its first rung: from Detected through the drain, the
//! approval and the attempt to Recovered, the verification, and the endings cut short.

use super::*;

#[test]
fn rebind_recovers_from_detected_to_recovered_evicting_only_the_devices_pods() {
    let mut w = World::new("rebind,bus-reset");
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved, "action {:?}", w.status().action);
    assert_eq!(w.ledger.len(), 1, "admitted before anything else");
    assert!(w.node.unschedulable && w.node.cordoned_by.as_deref() == Some(W));
    assert_eq!(
        evicted(&w),
        vec!["ml/train-0"],
        "only the wedged device's pod"
    );
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("rebind", 1));
    assert_eq!(w.status().action.as_deref(), Some("rebind#1"));
    // The order of effects: admit, cordon, evict, then nothing touches the node until the agent.
    let kinds: Vec<&str> = w
        .steps()
        .iter()
        .map(|s| match s {
            Step::Admit { .. } => "admit",
            Step::Cordon => "cordon",
            Step::Evict { .. } => "evict",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["admit", "cordon", "evict"]);

    w.agent(AttemptOutcome::Started, "");
    w.run(5);
    assert_eq!(w.phase(), Phase::Recovering);
    w.agent(AttemptOutcome::Succeeded, "rebound");
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(
        !w.node.unschedulable,
        "unwedge cordoned it, so unwedge uncordons it"
    );
    assert!(w.ledger.is_empty(), "released");
    assert_eq!(w.status().action.as_deref(), Some("recovered by rebind#1"));
    assert_eq!(w.cond(cond::RECOVERED).unwrap().status, "True");
}

/// The agent creates the GpuWedge, then patches its consumers and reset domain: until that
/// report is in, an empty consumer list means "not known yet", so nothing is approved (nor,
/// for `none` EvictConsumers, declared recovered); once it arrives the device's pods are
/// evicted first.
#[test]
fn nothing_is_approved_before_the_agent_reports_the_consumers() {
    for methods in ["rebind,bus-reset", "none"] {
        let mut w = World::new(methods);
        w.settings.none_action = NoneAction::EvictConsumers;
        let report = w.wedge.status.take().expect("World has the agent's report");
        w.run(20);
        assert!(
            w.status().approval.is_none() && evicted(&w).is_empty(),
            "{methods}: approved or evicted before the agent's report: {:?}",
            w.status()
        );
        assert_ne!(w.phase(), Phase::Recovered, "{methods}");
        let mut st = w.status();
        st.consumers = report.consumers;
        st.reset_domain = report.reset_domain;
        w.wedge.status = Some(st);
        w.run(20);
        assert_eq!(evicted(&w), vec!["ml/train-0"], "{methods}");
    }
}

#[test]
fn a_blocked_attempt_shows_who_holds_the_device() {
    let mut w = World::new("rebind");
    w.run(20);
    w.agent(
        AttemptOutcome::Blocked,
        "pid 42 (exporter) holds /dev/dri/card0",
    );
    w.run(5);
    assert_eq!(w.phase(), Phase::Recovering);
    assert_eq!(w.status().action.as_deref(), Some("rebind#1 blocked"));
    assert!(w.cond(cond::DRAINED).unwrap().message.contains("pid 42"));
}

#[test]
fn verifying_waits_for_the_device_to_be_advertised() {
    let mut w = World::new("rebind");
    w.run(20);
    w.agent(AttemptOutcome::Succeeded, "");
    w.advertised = Some(false);
    w.run(10);
    assert_eq!(w.phase(), Phase::Verifying);
    assert!(w.node.unschedulable);
    w.now = t(1 + 301);
    w.run(5);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "NotAdvertised"
    );
}

/// On a device-plugin node the agent reports whether the kubelet lists the device as
/// allocatable again: "yes" (or "cannot tell") recovers, "no" needs a human at once (the agent
/// has already waited), and the node stays cordoned.
#[test]
fn verifying_follows_the_agents_advertisement_answer() {
    for (answer, want) in [
        (Some(true), Phase::Recovered),
        (None, Phase::Recovered),
        (Some(false), Phase::NeedsAttention),
    ] {
        let mut w = World::new("rebind");
        w.run(20);
        w.agent(AttemptOutcome::Succeeded, "");
        let mut st = w.status();
        st.attempts.as_mut().unwrap()[0].advertised = answer;
        w.wedge.status = Some(st);
        w.run(20);
        assert_eq!(w.phase(), want, "agent answered {answer:?}");
        if want == Phase::NeedsAttention {
            assert_eq!(
                w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
                "NotAdvertised"
            );
            assert!(w.node.unschedulable, "the node stays cordoned");
        }
    }
}

#[test]
fn a_refused_or_dry_run_attempt_is_held_for_a_human_and_never_escalated() {
    for (outcome, reason) in [
        (AttemptOutcome::Refused, "ApprovalRefused"),
        (AttemptOutcome::DryRun, "DryRun"),
    ] {
        let mut w = World::new("rebind,bus-reset");
        w.run(20);
        w.agent(outcome, "not a device this agent detected");
        w.run(20);
        assert_eq!(w.phase(), Phase::NeedsAttention, "{outcome:?}");
        let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
        assert_eq!(c.reason, reason);
        assert!(c.message.contains("not a device this agent detected"));
        let a = w.status().approval.unwrap();
        assert_eq!(
            (a.method.as_str(), a.attempt),
            ("rebind", 1),
            "no escalation"
        );
    }
}

#[test]
fn a_deleted_node_ends_the_wedge_and_releases_its_place_and_quarantine() {
    let mut w = World::new("rebind,bus-reset");
    w.run(3);
    assert_eq!(w.ledger.len(), 1, "admitted");
    assert_eq!(w.phase(), Phase::Draining, "action {:?}", w.status().action);
    w.node_deleted = true;
    w.rule = true;
    w.run(10);
    assert_eq!(w.phase(), Phase::Abandoned);
    assert_eq!(w.cond(cond::ABANDONED).unwrap().reason, "NodeDeleted");
    assert!(w.ledger.is_empty(), "the place is released at once");
    assert!(!w.rule, "a quarantine of the gone node's device is lifted");
    assert!(w.status().approval.is_none(), "nothing was approved");
}

proptest::proptest! {
    /// `decide` never panics, whatever the clock, the policy's timeouts and the times written in
    /// the wedge (an approval or phase dated far in the future or past, durations at the maximum).
    #[test]
    fn decide_never_panics_on_extreme_times(
        now in -377_705_116_800i64..253_402_207_200i64,
        approved in -377_705_116_800i64..253_402_207_200i64,
        since in -377_705_116_800i64..253_402_207_200i64,
        verify in proptest::prop_oneof![proptest::strategy::Just(u64::MAX), 0u64..1_000_000_000],
        drain in proptest::prop_oneof![proptest::strategy::Just(u64::MAX), 0u64..1_000_000_000],
        outcome in 0usize..7,
        phase in 0usize..4,
    ) {
        let mut w = World::new("rebind,bus-reset");
        w.run(20);
        w.settings.verify_timeout = Duration::from_secs(verify);
        w.settings.drain_timeout = Duration::from_secs(drain);
        w.now = Timestamp::from_second(now).unwrap();
        let mut st = w.status();
        if let Some(a) = st.approval.as_mut() {
            a.at = Time(Timestamp::from_second(approved).unwrap());
        }
        st.phase_since = Some(Time(Timestamp::from_second(since).unwrap()));
        st.phase = Some([Phase::Approved, Phase::Recovering, Phase::Draining, Phase::Verifying][phase]);
        w.wedge.status = Some(st);
        if outcome < 6 {
            w.agent(
                [
                    AttemptOutcome::Started,
                    AttemptOutcome::Blocked,
                    AttemptOutcome::Succeeded,
                    AttemptOutcome::Failed,
                    AttemptOutcome::Refused,
                    AttemptOutcome::DryRun,
                ][outcome],
                "x",
            );
        }
        let _ = w.decide();
    }
}
