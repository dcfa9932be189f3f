//! DRA quarantine (docs/design.md §5 "On DRA clusters"): the device is tainted instead of the
//! node cordoned, within the device budget, until the wedge is Recovered.

use super::*;

fn dra_world(methods: &str) -> World {
    let mut w = World::new(methods);
    w.wedge.spec.device.dra = Some(unwedge_crds::DraDeviceRef {
        driver: "gpu.e2e.unwedge.io".into(),
        pool: "node-a".into(),
        device: "gpu-3".into(),
    });
    // The agent saw no consumer through PodResources; the claims name the pods.
    w.wedge.status.as_mut().unwrap().consumers = Some(vec![]);
    w.pods.push(pod("ml", "claim-a"));
    w.pods.push(pod("ml", "claim-b"));
    w.dra = Some(DraView {
        rule: format!("unwedge-{W}"),
        consumers: vec![
            PodRef {
                namespace: "ml".into(),
                name: "claim-a".into(),
                container: None,
            },
            PodRef {
                namespace: "ml".into(),
                name: "claim-b".into(),
                container: None,
            },
        ],
    });
    w
}

#[test]
fn a_dra_device_is_quarantined_not_cordoned_and_only_its_claims_pods_are_evicted() {
    let mut w = dra_world("rebind,bus-reset");
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved, "action {:?}", w.status().action);
    assert!(!w.node.unschedulable, "the node is never cordoned");
    assert_eq!(w.node.cordoned_by, None);
    assert!(w.rule, "the DeviceTaintRule exists");
    assert_eq!(
        w.status().quarantine_rule.as_deref(),
        Some(format!("unwedge-{W}").as_str())
    );
    assert_eq!(w.ledger.len(), 1);
    assert_eq!(w.ledger[0].unit, BudgetUnit::Device, "a device, not a node");
    assert_eq!(
        evicted(&w),
        vec!["ml/claim-a", "ml/claim-b"],
        "the claim's pods only"
    );
    let kinds: Vec<&str> = w
        .steps()
        .iter()
        .map(|s| match s {
            Step::Admit { .. } => "admit",
            Step::Quarantine => "quarantine",
            Step::Cordon => "cordon",
            Step::Evict { .. } => "evict",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["admit", "quarantine", "evict"]);
    assert_eq!(w.cond(cond::QUARANTINED).unwrap().status, "True");

    w.agent(AttemptOutcome::Started, "");
    w.run(5);
    w.agent(AttemptOutcome::Succeeded, "rebound");
    w.advertised = Some(false);
    w.run(5);
    assert_eq!(
        w.phase(),
        Phase::Verifying,
        "waits until the slice names the device again"
    );
    assert!(w.rule, "the rule stays while verifying");
    w.advertised = Some(true);
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(!w.rule, "the rule is deleted when Recovered");
    assert!(w.ledger.is_empty());
    assert!(
        w.log
            .iter()
            .all(|s| !matches!(s, Step::Cordon | Step::Uncordon))
    );
}

#[test]
fn the_device_budget_queues_a_second_quarantine() {
    let mut w = dra_world("rebind");
    w.ledger.push(Admission {
        wedge: "other".into(),
        node: "node-b".into(),
        unit: BudgetUnit::Device,
        reboot: false,
    });
    w.run(5);
    assert_eq!(w.phase(), Phase::Queued);
    assert_eq!(
        w.status().budget.as_deref(),
        Some("1/1 devices quarantined")
    );
    assert!(!w.rule && !w.node.unschedulable);
    // A node held by a cordon elsewhere does not take the device's place.
    w.ledger = vec![Admission {
        wedge: "other".into(),
        node: "node-b".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    }];
    w.run(10);
    assert!(
        w.rule,
        "admitted on the device budget: {:?}",
        w.status().budget
    );
}

#[test]
fn a_deleted_rule_is_created_again_while_the_wedge_is_open() {
    let mut w = dra_world("rebind");
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved);
    w.rule = false;
    let d = w.decide();
    assert_eq!(d.step, Step::Quarantine);
    assert_eq!(d.note.as_ref().unwrap().reason, "Requarantined");
    assert_eq!(
        d.status.phase,
        Some(Phase::Approved),
        "the attempt is not disturbed"
    );
}

#[test]
fn a_paused_policy_holds_the_quarantine() {
    let mut w = dra_world("rebind");
    w.settings.paused = true;
    w.run(5);
    assert!(!w.rule && w.ledger.is_empty());
    assert!(
        w.status()
            .action
            .unwrap()
            .contains("quarantine device gpu.e2e.unwedge.io/node-a/gpu-3")
    );
}

#[test]
fn without_dra_the_same_wedge_cordons_the_node() {
    let mut w = dra_world("rebind");
    w.dra = None;
    w.run(20);
    assert!(w.node.unschedulable);
    assert!(!w.rule);
    assert_eq!(w.ledger[0].unit, BudgetUnit::Node);
}

#[test]
fn escalation_to_reboot_cordons_and_drains_the_node_and_keeps_the_taint_until_recovered() {
    let mut w = dra_world("rebind");
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved);
    w.agent(AttemptOutcome::Failed, "still wedged");
    w.run(20);
    assert!(w.node.unschedulable, "reboot cordons the node");
    assert_eq!(w.ledger.len(), 1);
    assert_eq!(w.ledger[0].unit, BudgetUnit::Node);
    assert!(w.ledger[0].reboot);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("reboot", 2));
    assert!(
        w.pods
            .iter()
            .all(|p| p.name == "exporter" || p.namespace != "ml"),
        "whole node drained: {:?}",
        w.pods.iter().map(|p| &p.name).collect::<Vec<_>>()
    );
    assert!(w.rule, "the taint stays");
    w.agent(AttemptOutcome::Succeeded, "rebooted");
    w.advertised = Some(true);
    w.run(20);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(!w.node.unschedulable, "uncordoned: unwedge cordoned it");
    assert!(!w.rule, "and the rule is gone");
}

/// NeedsAttention waits for a human whatever plan it keeps: a kept reboot plan on a quarantined
/// DRA device takes no node place and cordons nothing by itself.
#[test]
fn a_kept_plan_takes_nothing_while_a_human_is_asked() {
    let mut w = dra_world("rebind");
    w.run(20);
    assert_eq!(w.ledger[0].unit, BudgetUnit::Device);
    let mut st = w.status();
    st.phase = Some(Phase::NeedsAttention);
    st.plan = Some(Plan {
        method: Method::Reboot,
        attempt: 2,
        rung: Some(2),
    });
    w.wedge.status = Some(st);
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert!(!w.node.unschedulable, "nothing cordoned");
    assert_eq!(w.ledger.len(), 1);
    assert_eq!(w.ledger[0].unit, BudgetUnit::Device, "no node place taken");
}
