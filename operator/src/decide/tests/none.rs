//! The `none` path: the driver recovered by itself; record only, or evict the blamed pod or
//! the device's consumers within the `none` budget, rate-limited per device.

use super::*;

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
