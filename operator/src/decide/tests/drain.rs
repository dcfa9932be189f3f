//! The drain: the device's pods and its reset domain, a reboot's whole-node drain, pods on
//! their way out, refused evictions and the drain timeout.

use super::*;

#[test]
fn the_drain_covers_the_reset_domain_for_the_planned_method() {
    let mut w = World::new("bus-reset");
    let mut st = w.status();
    st.reset_domain = Some(vec![
        DomainDevice {
            pci_address: PCI.into(),
            card: None,
            render_node: None,
            relation: "self".into(),
            methods: vec!["rebind".into(), "bus-reset".into()],
        },
        DomainDevice {
            pci_address: "0000:04:00.0".into(),
            card: None,
            render_node: None,
            relation: "xgmi-hive".into(),
            methods: vec!["bus-reset".into()],
        },
    ]);
    w.wedge.status = Some(st);
    w.pods.push(pod("ml", "unrelated"));
    w.run(20);
    let mut e = evicted(&w);
    e.sort();
    assert_eq!(e, vec!["ml/other-gpu", "ml/train-0"]);
    assert!(w.pods.iter().any(|p| p.name == "unrelated"));
    assert_eq!(w.status().approval.unwrap().method, "bus-reset");
}

#[test]
fn the_reset_domain_is_not_drained_for_a_method_that_spares_it() {
    let mut w = World::new("rebind");
    let mut st = w.status();
    st.reset_domain = Some(vec![DomainDevice {
        pci_address: "0000:04:00.0".into(),
        card: None,
        render_node: None,
        relation: "same-slot".into(),
        methods: vec!["bus-reset".into()],
    }]);
    w.wedge.status = Some(st);
    w.run(20);
    assert_eq!(evicted(&w), vec!["ml/train-0"]);
}

#[test]
fn terminating_pods_are_waited_for() {
    let mut w = World::new("rebind");
    w.pods[0].terminating = true;
    w.run(10);
    assert_eq!(w.phase(), Phase::Draining);
    assert!(matches!(w.log.last(), Some(Step::Wait { .. })));
    w.pods.remove(0);
    w.run(5);
    assert_eq!(w.phase(), Phase::Approved);
}

#[test]
fn a_refused_eviction_times_out_to_needs_attention() {
    let mut w = World::new("rebind");
    // Drain until the eviction is asked for, then pretend the PDB refuses (pod stays).
    for _ in 0..10 {
        let d = w.decide();
        if matches!(d.step, Step::Evict { .. }) {
            break;
        }
        w.apply(&d);
    }
    assert_eq!(w.phase(), Phase::Draining);
    let d = w.decide();
    assert!(
        matches!(d.step, Step::Evict { .. }),
        "eviction retried while within the timeout"
    );
    w.now = t(1 + 601);
    let d = w.decide();
    w.apply(&d);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "DrainTimeout"
    );
    assert!(
        d.note
            .unwrap()
            .message
            .contains("relax the PodDisruptionBudget")
    );
    assert!(w.node.unschedulable, "stays cordoned");
    assert_eq!(w.ledger.len(), 1, "keeps its place in the budget");
}

#[test]
fn drain_force_deletes_at_the_timeout() {
    let mut w = World::new("rebind");
    w.settings.force = true;
    for _ in 0..10 {
        let d = w.decide();
        if matches!(d.step, Step::Evict { .. }) {
            break;
        }
        w.apply(&d);
    }
    w.now = t(1 + 601);
    let d = w.decide();
    assert_eq!(
        d.step,
        Step::ForceDelete {
            pods: vec![PodRef {
                namespace: "ml".into(),
                name: "train-0".into(),
                container: None
            }]
        }
    );
}

#[test]
fn reboot_drain_keeps_daemonset_and_mirror_pods() {
    let mut w = World::new("rebind");
    w.settings.escalation = vec!["rebind".into(), "reboot".into()];
    w.pods.push(PodView {
        daemon_set: true,
        ..pod("kube-system", "device-plugin")
    });
    w.pods.push(PodView {
        mirror: true,
        ..pod("kube-system", "static")
    });
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    let names: Vec<&str> = w.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["device-plugin", "static"]);
    assert_eq!(w.status().approval.unwrap().method, "reboot");
}

#[test]
fn emptydir_pods_block_a_reboot_unless_allowed() {
    let mut w = World::new("reboot");
    w.pods.push(PodView {
        empty_dir: true,
        ..pod("ml", "scratch")
    });
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "EmptyDirData"
    );
    let mut w = World::new("reboot");
    w.settings.delete_empty_dir_data = true;
    w.pods.push(PodView {
        empty_dir: true,
        ..pod("ml", "scratch")
    });
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved);
}
