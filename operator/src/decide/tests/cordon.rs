//! Cordon ownership and what a wedge lets go of: a cordon someone else made, handed over,
//! lost and restored; the finalizer; the places a finished wedge releases.

use super::*;

#[test]
fn an_admin_cordoned_node_stays_cordoned() {
    let mut w = World::new("rebind");
    w.node.unschedulable = true;
    w.run(20);
    assert_eq!(w.status().cordoned, Some(false));
    assert_eq!(w.cond(cond::CORDONED).unwrap().reason, "AlreadyCordoned");
    w.agent(AttemptOutcome::Succeeded, "");
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(
        w.node.unschedulable,
        "never uncordon a node unwedge did not cordon"
    );
    assert!(!w.log.contains(&Step::Uncordon));
}

#[test]
fn two_wedges_on_one_node_hand_the_cordon_over() {
    let mut w = World::new("rebind");
    w.run(20);
    w.agent(AttemptOutcome::Succeeded, "");
    w.limits.nodes = 2;
    w.others = vec!["node-a-0000-04-00-0-2".into()];
    w.ledger.push(Admission {
        wedge: "node-a-0000-04-00-0-2".into(),
        node: "node-a".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    });
    w.run(10);
    assert_eq!(w.node.cordoned_by.as_deref(), Some("node-a-0000-04-00-0-2"));
    assert!(
        w.node.unschedulable,
        "the other wedge still needs it cordoned"
    );
    assert_eq!(w.phase(), Phase::Recovered);
}

/// Two other wedges on the node: the cordon goes to the one that holds a place in the budget
/// (the ledger keeps counting the node), not to the first by name that holds none.
#[test]
fn the_cordon_is_handed_to_a_wedge_that_holds_a_place() {
    let mut w = World::new("rebind");
    w.limits.nodes = 2;
    w.run(20);
    w.agent(AttemptOutcome::Succeeded, "");
    let (queued, placed) = ("node-a-0000-04-00-0-2", "node-a-0000-05-00-0-3");
    w.others = vec![queued.into(), placed.into()];
    w.ledger.push(Admission {
        wedge: placed.into(),
        node: "node-a".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    });
    w.run(10);
    assert_eq!(w.node.cordoned_by.as_deref(), Some(placed));
}

/// bench chaos, seed 1796501097449694757 (docs/benchmarks.md §6): two wedges of one node
/// finish together; the first is Recovered, releases its place and lets its finalizer go; the
/// second, from a cache that still showed the first open, handed the cordon to it; the chaos
/// then deleted the first, gone at once with nothing released: the node stayed cordoned,
/// counted by no ledger. Read fresh, a finished wedge, or one without the finalizer, never
/// takes a cordon over. And bench chaos, seed 2027 (default size, 2026-12-06): the cordon went
/// to a wedge Queued for budget (finalized by its admission attempt, no place); the Recovered
/// one released its place, and the ledger admitted an 11th node for budget 10 while this one
/// stayed cordoned. The cordon goes only to an open, finalized wedge holding a place, else it
/// is lifted.
#[test]
fn a_cordon_is_never_handed_to_a_wedge_that_finished_lacks_the_finalizer_or_holds_no_place() {
    let heir = |name: &str, open: bool, finalized: bool, placed: bool| Heir {
        name: name.into(),
        open,
        finalized,
        placed,
    };
    let recovered = heir("node-a-0000-05-00-0-1", false, false, false);
    assert_eq!(cordon_heir(std::slice::from_ref(&recovered)), None);
    let recovered_still_finalized = heir("node-a-0000-05-00-0-1", false, true, true);
    assert_eq!(cordon_heir(&[recovered_still_finalized]), None);
    let unfinalized = heir("node-a-0000-04-00-0-2", true, false, false);
    assert_eq!(cordon_heir(std::slice::from_ref(&unfinalized)), None);
    let queued = heir("node-a-0000-06-00-0-3", true, true, false);
    let placed = heir("node-a-0000-07-00-0-4", true, true, true);
    assert_eq!(
        cordon_heir(&[recovered.clone(), unfinalized.clone(), queued.clone()]),
        None,
        "a wedge without a place would keep the node cordoned outside every budget"
    );
    assert_eq!(
        cordon_heir(&[recovered, unfinalized, queued, placed.clone()]),
        Some(placed.name)
    );
    assert_eq!(cordon_heir(&[]), None);
}

/// bench chaos, seed 1796501097449694757, second run after the fixes: a node relabelled
/// chaos → chaos-b → chaos mid-recovery; the wedge, Recovered, released its place in `chaos`
/// only, and `chaos-b` kept one for it (a stranded ledger place after two storms). A finished
/// wedge gives back the places of every ledger naming it, and its status's policy.
#[test]
fn a_finished_wedge_releases_its_places_in_every_policy() {
    let place = |wedge: &str| Admission {
        wedge: wedge.into(),
        node: "node-a".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    };
    let ledgers = vec![
        ("chaos".to_string(), vec![place(W)]),
        ("chaos-b".to_string(), vec![place("other"), place(W)]),
        ("idle".to_string(), vec![place("other")]),
    ];
    assert_eq!(
        places_to_release(W, Some("chaos"), &ledgers),
        vec!["chaos".to_string(), "chaos-b".to_string()]
    );
    assert_eq!(
        places_to_release(W, Some("new"), &ledgers[2..]),
        vec!["new".to_string()],
        "its status's policy even when the cache shows no place there"
    );
    assert!(places_to_release(W, None, &ledgers[2..]).is_empty());
}

/// An earlier incident of the same name (deleted by a person, created again by the agent's
/// outbox replay) whose ledger place the cache still shows: the new wedge would proceed as
/// admitted (cordon, drain, approval) without ever passing the admission that puts the
/// finalizer on, and a deletion would take it away with nothing released. It gets the
/// finalizer first, then goes on.
#[test]
fn a_wedge_holding_a_place_without_the_finalizer_gets_it_first() {
    let mut w = World::new("rebind");
    w.ledger.push(Admission {
        wedge: W.into(),
        node: "node-a".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    });
    assert_eq!(w.decide().step, Step::Finalize);
    w.run(1);
    assert!(w.wedge.finalizers().iter().any(|f| f == FINALIZER));
    w.run(20);
    assert_eq!(w.node.cordoned_by.as_deref(), Some(W));
    assert!(w.log.contains(&Step::Cordon));
    assert_eq!(
        w.log.iter().filter(|s| **s == Step::Finalize).count(),
        1,
        "once: {:?}",
        w.log
    );
}

/// The node's cordon names a wedge without the finalizer (handed to it, or left by an earlier
/// incident of its name): it gets the finalizer before anything else.
#[test]
fn a_wedge_holding_the_cordon_without_the_finalizer_gets_it_first() {
    let mut w = World::new("rebind");
    w.node.unschedulable = true;
    w.node.cordoned_by = Some(W.into());
    assert_eq!(w.decide().step, Step::Finalize);
    w.apply(&w.decide());
    assert_ne!(w.decide().step, Step::Finalize);
    // Being deleted, it is released by the finalizer's path, never finalized again.
    let mut gone = World::new("rebind");
    gone.node.cordoned_by = Some(W.into());
    gone.wedge.metadata.deletion_timestamp = Some(Time(t(1)));
    assert_ne!(gone.decide().step, Step::Finalize);
}

#[test]
fn a_cordon_handed_over_is_adopted() {
    let mut w = World::new("rebind");
    w.node.unschedulable = true;
    w.node.cordoned_by = Some("node-a-0000-04-00-0-2".into());
    w.run(20);
    assert_eq!(w.status().cordoned, Some(false));
    w.node.cordoned_by = Some(W.into());
    w.run(3);
    assert_eq!(w.status().cordoned, Some(true));
    w.agent(AttemptOutcome::Succeeded, "");
    w.run(10);
    assert!(!w.node.unschedulable, "the adopted cordon is released");
}

#[test]
fn a_cordon_lost_during_recovery_is_restored() {
    let mut w = World::new("rebind");
    w.run(20);
    w.node.unschedulable = false;
    w.node.cordoned_by = None;
    let d = w.decide();
    assert_eq!(d.step, Step::Cordon);
}

/// `kubectl uncordon` mid-recovery clears `unschedulable` and keeps unwedge's annotation: the
/// node is cordoned again, with a warning, as when the annotation went too (a wedged device
/// must not take new pods; abandoning the wedge hands the node to the person).
#[test]
fn a_kubectl_uncordon_during_recovery_is_cordoned_again_with_a_warning() {
    let mut w = World::new("rebind");
    w.run(20);
    assert_eq!(w.node.cordoned_by.as_deref(), Some(W));
    w.node.unschedulable = false;
    let d = w.decide();
    assert_eq!(d.step, Step::Cordon);
    let n = d.note.expect("a warning says so");
    assert!(n.warning && n.reason == "Recordoned", "{n:?}");
    w.run(3);
    assert!(w.node.unschedulable);
    w.agent(AttemptOutcome::Succeeded, "");
    w.run(10);
    assert_eq!(w.phase(), Phase::Recovered);
    assert!(
        !w.node.unschedulable,
        "uncordoned at the end, as unwedge made the cordon"
    );
}

#[test]
fn a_recovered_wedge_still_holding_the_cordon_releases_it() {
    let mut w = World::new("rebind");
    let mut st = w.status();
    st.phase = Some(Phase::Recovered);
    w.wedge.status = Some(st);
    w.node.unschedulable = true;
    w.node.cordoned_by = Some(W.into());
    assert_eq!(w.decide().step, Step::Uncordon);
}

#[test]
fn terminal_wedges_release_their_budget() {
    let mut w = World::new("rebind");
    let mut st = w.status();
    st.phase = Some(Phase::Abandoned);
    w.wedge.status = Some(st);
    w.ledger.push(Admission {
        wedge: W.into(),
        node: "node-a".into(),
        unit: BudgetUnit::Node,
        reboot: false,
    });
    assert_eq!(w.decide().step, Step::Release);
    w.ledger.clear();
    assert_eq!(w.decide().step, Step::Nothing);
}
