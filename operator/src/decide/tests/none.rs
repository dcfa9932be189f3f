//! The `none` path: the driver recovered by itself; record only, or restart (in place or by
//! eviction) the blamed container or the device's consumers within the `none` budget,
//! rate-limited per device.

use super::*;
use unwedge_crds::{ContainerRestart, ContainerTarget, RestartMode, RestartResult};

#[test]
fn none_evict_blamed_evicts_exactly_the_blamed_pod_and_never_cordons() {
    let mut w = World::new("none");
    w.wedge.spec.blamed = Some(Blamed {
        pid: 4242,
        task: Some("python".into()),
        container_id: Some("abc".into()),
        pod: Some(PodRef {
            namespace: "ml".into(),
            name: "other-gpu".into(),
            container: Some("c".into()),
        }),
    });
    w.run(20);
    assert_eq!(w.phase(), Phase::Recovered);
    assert_eq!(evicted(&w), vec!["ml/other-gpu"]);
    assert!(!w.node.unschedulable);
    assert!(!w.log.contains(&Step::Cordon));
    assert!(w.ledger.is_empty(), "none budget released");
    assert!(
        w.log.iter().any(
            |s| matches!(s, Step::Admit { candidate, .. } if candidate.unit == BudgetUnit::None)
        )
    );
}

#[test]
fn none_evict_blamed_without_a_blamed_pod_records_only() {
    let mut w = World::new("none");
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(evicted(&w).is_empty());
    assert_eq!(
        w.status().action.as_deref(),
        Some("recorded only: the driver blamed no pod")
    );
}

#[test]
fn none_ignore_records_only() {
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::Ignore;
    w.wedge.spec.blamed = Some(Blamed {
        pid: 1,
        pod: Some(PodRef {
            namespace: "ml".into(),
            name: "train-0".into(),
            container: None,
        }),
        ..Default::default()
    });
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(evicted(&w).is_empty());
}

#[test]
fn none_evict_consumers_evicts_the_devices_pods_only() {
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::EvictConsumers;
    w.run(20);
    assert_eq!(evicted(&w), vec!["ml/train-0"]);
    assert_eq!(w.phase(), Phase::Recovered);
}

#[test]
fn none_is_rate_limited_per_device() {
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::EvictConsumers;
    w.history = vec![PastWedge {
        name: "earlier".into(),
        detected_at: t(-60),
        evicted_at: Some(t(-59)),
    }];
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(evicted(&w).is_empty());
    assert!(w.status().action.unwrap().contains("rate-limited"));
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::EvictConsumers;
    w.history = vec![PastWedge {
        name: "earlier".into(),
        detected_at: t(-6000),
        evicted_at: Some(t(-5999)),
    }];
    w.run(10);
    assert_eq!(evicted(&w), vec!["ml/train-0"], "outside minInterval");
}

#[test]
fn none_waits_for_its_own_budget() {
    let mut w = World::new("none");
    w.settings.none_action = NoneAction::EvictConsumers;
    w.limits.none = 0;
    w.run(5);
    assert_eq!(w.phase(), Phase::Queued);
    assert_eq!(
        w.status().budget.as_deref(),
        Some("0/0 none evictions in progress")
    );
}

fn blamed(w: &mut World, pod: &str) {
    w.wedge.spec.blamed = Some(Blamed {
        pid: 4242,
        task: Some("python".into()),
        container_id: Some("cid".into()),
        pod: Some(PodRef {
            namespace: "ml".into(),
            name: pod.into(),
            container: Some("c".into()),
        }),
    });
}

fn in_place(w: &mut World) {
    w.settings.none_restart = RestartMode::InPlace;
}

/// The agent's report of a restart attempt: one record per approved container, `Restarted`
/// unless named in `fallback`.
fn agent_restarts(w: &mut World, result: AttemptOutcome, fallback: &[&str]) {
    let a = w.status().approval.expect("a restart approval");
    let restarts = a
        .containers
        .iter()
        .flatten()
        .map(|t| {
            let fb = fallback.contains(&t.pod.as_str());
            ContainerRestart {
                namespace: t.namespace.clone(),
                pod: t.pod.clone(),
                container: t.container.clone(),
                result: if fb {
                    RestartResult::Fallback
                } else {
                    RestartResult::Restarted
                },
                old_restart_count: Some(0),
                new_restart_count: (!fb).then_some(1),
                millis_to_running: (!fb).then_some(700),
                message: if fb {
                    "no new container ran".into()
                } else {
                    String::new()
                },
            }
        })
        .collect();
    w.agent(result, "restart");
    let mut st = w.status();
    st.attempts.as_mut().unwrap()[0].restarts = Some(restarts);
    w.wedge.status = Some(st);
}

#[test]
fn in_place_approves_a_restart_of_exactly_the_blamed_container_and_evicts_nothing() {
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.run(20);
    assert_eq!(w.phase(), Phase::Restarting);
    let a = w.status().approval.expect("approved");
    assert_eq!((a.method.as_str(), a.attempt), ("restart", 1));
    assert_eq!(
        a.containers.unwrap(),
        vec![ContainerTarget {
            namespace: "ml".into(),
            pod: "other-gpu".into(),
            uid: "uid-other-gpu".into(),
            container: "c".into(),
        }]
    );
    assert_eq!(w.status().action.as_deref(), Some("restart-blamed#1"));
    w.run(5);
    assert_eq!(w.phase(), Phase::Restarting, "waits for the agent");
    agent_restarts(&mut w, AttemptOutcome::Succeeded, &[]);
    w.run(20);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(evicted(&w).is_empty(), "nothing evicted");
    assert_eq!(
        w.status().action.as_deref(),
        Some("restart-blamed: restarted 1 in place")
    );
    assert!(!w.node.unschedulable && !w.log.contains(&Step::Cordon));
    assert!(w.ledger.is_empty(), "none budget released");
}

#[test]
fn in_place_restarts_every_consumer_container_of_the_device() {
    let mut w = World::new("none");
    in_place(&mut w);
    w.settings.none_action = NoneAction::EvictConsumers;
    w.run(20);
    let a = w.status().approval.expect("approved");
    let pods: Vec<String> = a
        .containers
        .unwrap()
        .iter()
        .map(|t| t.pod.clone())
        .collect();
    assert_eq!(
        pods,
        ["train-0"],
        "only the device's consumer, not other-gpu's"
    );
    assert_eq!(w.status().action.as_deref(), Some("restart-consumers#1"));
}

#[test]
fn a_restart_policy_never_pod_is_evicted_without_asking_the_agent() {
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.pods[1].restart_never = true;
    w.run(20);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(w.status().approval.is_none(), "no restart approved");
    assert_eq!(evicted(&w), vec!["ml/other-gpu"]);
    let action = w.status().action.unwrap();
    assert!(action.contains("restartPolicy Never"), "{action}");
}

#[test]
fn a_fallback_or_an_interrupted_restart_evicts_the_pod_with_the_reason() {
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.run(20);
    agent_restarts(&mut w, AttemptOutcome::Failed, &["other-gpu"]);
    w.run(20);
    assert_eq!(w.phase(), Phase::Recovered);
    assert_eq!(evicted(&w), vec!["ml/other-gpu"]);
    let action = w.status().action.unwrap();
    assert!(
        action.contains("restarted 0 in place; evicted ml/other-gpu (no new container ran)"),
        "{action}"
    );

    // An agent restarted mid-attempt reports it interrupted, with no per-container record.
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.run(20);
    w.agent(
        AttemptOutcome::Failed,
        "agent restarted during the attempt; not re-executed",
    );
    w.run(20);
    assert_eq!(evicted(&w), vec!["ml/other-gpu"]);
    assert!(w.status().action.unwrap().contains("not re-executed"));
}

#[test]
fn a_restart_the_agent_never_finishes_falls_back_at_verify_timeout() {
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.run(20);
    w.now = t(1 + 301);
    w.run(20);
    assert_eq!(w.phase(), Phase::Recovered);
    assert_eq!(evicted(&w), vec!["ml/other-gpu"]);
    assert_eq!(w.cond(cond::APPROVED).unwrap().reason, "RestartTimedOut");
}

#[test]
fn a_refused_restart_asks_a_human_and_evicts_nothing() {
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.run(20);
    w.agent(AttemptOutcome::Refused, "not detected by this agent");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert!(evicted(&w).is_empty());
}

#[test]
fn an_in_place_round_counts_against_the_rate_limit() {
    let mut w = World::new("none");
    in_place(&mut w);
    blamed(&mut w, "other-gpu");
    w.run(20);
    agent_restarts(&mut w, AttemptOutcome::Succeeded, &[]);
    w.run(20);
    let at = none_round_at(&w.status()).expect("the approval is a round");
    let mut next = World::new("none");
    in_place(&mut next);
    blamed(&mut next, "other-gpu");
    next.history = vec![PastWedge {
        name: "earlier".into(),
        detected_at: t(0),
        evicted_at: Some(at),
    }];
    next.now = t(60);
    next.run(10);
    assert!(next.status().action.unwrap().contains("rate-limited"));
    assert!(next.status().approval.is_none());
}
