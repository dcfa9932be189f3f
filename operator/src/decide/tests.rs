//! Every branch of the lifecycle, as scenarios: a small world (wedge, node, pods, ledger) that
//! applies each decision the way the effect layer would, and an agent stand-in.

use std::time::Duration;

use super::*;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use unwedge_crds::{
    Admission, ApprovalMode, AttemptOutcome, BudgetUnit, GpuWedge, GpuWedgeStatus, NoneAction,
    Plan, labels::UEVENT_SURVIVABILITY_MODE,
};

use crate::budget::{self, Limits, QueueReason};
use crate::settings::Settings;
use kube::ResourceExt as _;
use unwedge_crds::labels::FINALIZER;
use unwedge_crds::{
    AttemptResult, Blamed, BudgetLimit, Consumer, DeviceRef, DomainDevice, GpuWedgeSpec, WedgeEvent,
};

const W: &str = "node-a-0000-03-00-0-1";
const PCI: &str = "0000:03:00.0";

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn pod(ns: &str, name: &str) -> PodView {
    PodView {
        namespace: ns.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn consumer(pod: &str, pci: &str) -> Consumer {
    Consumer {
        namespace: "ml".into(),
        pod: pod.into(),
        container: "c".into(),
        device_id: pci.into(),
        pci_address: pci.into(),
    }
}

struct World {
    wedge: GpuWedge,
    node: NodeView,
    settings: Settings,
    ledger: Vec<Admission>,
    limits: Limits,
    waiting: Vec<(String, String)>,
    breaker: bool,
    governance: Option<Governance<'static>>,
    pods: Vec<PodView>,
    history: Vec<PastWedge>,
    others: Vec<String>,
    advertised: Option<bool>,
    now: Timestamp,
    verbs: Verbs,
    /// The DRA view (a DRA device and DRA on).
    dra: Option<DraView>,
    /// Whether our DeviceTaintRule exists.
    rule: bool,
    /// Whether the wedge's Node is confirmed gone.
    node_deleted: bool,
    /// Effects performed, in order (for assertions).
    log: Vec<Step>,
}

impl World {
    fn new(methods: &str) -> World {
        let spec = GpuWedgeSpec {
            node_name: "node-a".into(),
            device: DeviceRef {
                pci_address: PCI.into(),
                card: Some("card0".into()),
                driver: "xe".into(),
                ..Default::default()
            },
            methods: methods.split(',').map(str::to_string).collect(),
            detected_at: Time(t(0)),
            boot_id: "boot-1".into(),
            uevent: Default::default(),
            blamed: None,
        };
        let mut wedge = GpuWedge::new(W, spec);
        wedge.status = Some(GpuWedgeStatus {
            consumers: Some(vec![
                consumer("train-0", PCI),
                consumer("other-gpu", "0000:04:00.0"),
            ]),
            ..Default::default()
        });
        let settings =
            Settings::from_spec(&serde_json::from_value(serde_json::json!({})).unwrap()).unwrap();
        World {
            wedge,
            node: NodeView {
                name: "node-a".into(),
                ..Default::default()
            },
            settings,
            ledger: vec![],
            limits: Limits {
                nodes: 1,
                reboots: 1,
                devices: 1,
                none: 10,
            },
            waiting: vec![],
            breaker: false,
            governance: None,
            pods: vec![
                pod("ml", "train-0"),
                pod("ml", "other-gpu"),
                pod("kube-system", "exporter"),
            ],
            history: vec![],
            others: vec![],
            advertised: None,
            now: t(1),
            verbs: Verbs::default(),
            dra: None,
            rule: false,
            node_deleted: false,
            log: vec![],
        }
    }

    fn status(&self) -> GpuWedgeStatus {
        self.wedge.status.clone().unwrap_or_default()
    }

    fn phase(&self) -> Phase {
        self.status().phase.unwrap_or_default()
    }

    fn cond(&self, type_: &str) -> Option<Condition> {
        self.status()
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == type_)
    }

    fn decide(&self) -> Decision {
        let pv = PolicyView {
            name: "gpu",
            settings: &self.settings,
            ledger: &self.ledger,
            limits: self.limits,
            waiting_ahead: self.waiting.clone(),
            breaker_tripped: self.breaker,
        };
        let input = Input {
            wedge: &self.wedge,
            node: Some(&self.node),
            policy: self.governance.clone().unwrap_or(Governance::Policy(pv)),
            pods: &self.pods,
            history: &self.history,
            others_on_node: &self.others,
            device_advertised: self.advertised,
            now: self.now,
            operator: "system:serviceaccount:unwedge-system:unwedge-operator",
            verbs: self.verbs.clone(),
            dra: self.dra.clone(),
            quarantine_rule: self.rule,
            node_deleted: self.node_deleted,
        };
        decide(&input)
    }

    /// Persists the status, then performs the step the way the effect layer does.
    fn apply(&mut self, d: &Decision) {
        let mut st = self.status();
        let o = &d.status;
        st.phase = o.phase;
        st.methods = o.methods.clone();
        st.action = o.action.clone();
        st.plan = o.plan.clone();
        st.policy = o.policy.clone();
        st.conditions = o.conditions.clone();
        st.approval = o.approval.clone();
        st.budget = o.budget.clone();
        st.waiting_for = o.waiting_for;
        st.cordoned = o.cordoned;
        st.quarantine_rule = o.quarantine_rule.clone();
        st.admitted_at = o.admitted_at.clone();
        st.phase_since = o.phase_since.clone();
        st.finished_at = o.finished_at.clone();
        self.wedge.status = Some(st);
        match &d.step {
            Step::Admit { candidate, reclaim } => {
                // The effect layer puts the finalizer on before the ledger write.
                self.finalize();
                if *reclaim {
                    self.ledger = budget::release(&self.ledger, &candidate.wedge);
                    self.ledger.push(Admission {
                        wedge: candidate.wedge.clone(),
                        node: candidate.node.clone(),
                        unit: candidate.unit,
                        reboot: candidate.reboot,
                    });
                } else {
                    match budget::admit(&self.ledger, candidate, &self.limits, &self.waiting) {
                        Ok(l) => self.ledger = l,
                        Err(r) => {
                            let q =
                                queued_status(&OperatorStatus::of(&self.status()), &r, self.now);
                            let mut st = self.status();
                            st.phase = q.phase;
                            st.plan = q.plan;
                            st.budget = q.budget;
                            st.waiting_for = q.waiting_for;
                            self.wedge.status = Some(st);
                        }
                    }
                }
            }
            Step::Release => self.ledger = budget::release(&self.ledger, W),
            Step::Cordon => {
                self.node.unschedulable = true;
                self.node.cordoned_by = Some(W.into());
            }
            Step::Uncordon => {
                self.node.unschedulable = false;
                self.node.cordoned_by = None;
            }
            Step::HandOverCordon { to } => self.node.cordoned_by = Some(to.clone()),
            Step::Evict { pods } | Step::ForceDelete { pods } => {
                let mut st = self.status();
                for p in pods {
                    self.pods
                        .retain(|x| !(x.namespace == p.namespace && x.name == p.name));
                    st.evictions
                        .get_or_insert_with(Vec::new)
                        .push(unwedge_crds::Eviction {
                            namespace: p.namespace.clone(),
                            pod: p.name.clone(),
                            at: Time(self.now),
                            result: "Evicted".into(),
                        });
                }
                self.wedge.status = Some(st);
            }
            Step::ClearVerbs { .. } => self.verbs = Verbs::default(),
            Step::Quarantine => self.rule = true,
            Step::Unquarantine => self.rule = false,
            Step::Finalize => self.finalize(),
            Step::Nothing | Step::Wait { .. } => {}
        }
        self.log.push(d.step.clone());
    }

    /// Puts the operator's finalizer on the wedge (as `finalize::ensure` does).
    fn finalize(&mut self) {
        let f = self.wedge.metadata.finalizers.get_or_insert_with(Vec::new);
        if !f.iter().any(|x| x == FINALIZER) {
            f.push(FINALIZER.into());
        }
    }

    /// Decides and applies until the world stops changing (or `max` rounds).
    fn run(&mut self, max: usize) {
        for _ in 0..max {
            let before = (
                self.status(),
                self.ledger.clone(),
                self.node.clone(),
                self.pods.len(),
            );
            let d = self.decide();
            self.apply(&d);
            if before
                == (
                    self.status(),
                    self.ledger.clone(),
                    self.node.clone(),
                    self.pods.len(),
                )
            {
                return;
            }
        }
    }

    /// The agent's part: report an attempt result for the current approval.
    fn agent(&mut self, result: AttemptOutcome, msg: &str) {
        let mut st = self.status();
        let a = st.approval.clone().expect("an approval to act on");
        let list = st.attempts.get_or_insert_with(Vec::new);
        list.retain(|x| x.attempt != a.attempt);
        list.push(AttemptResult {
            attempt: a.attempt,
            method: a.method,
            result,
            started_at: Time(self.now),
            finished_at: None,
            message: msg.into(),
            boot_id: Some("boot-1".into()),
            advertised: None,
        });
        self.wedge.status = Some(st);
    }

    fn steps(&self) -> Vec<&Step> {
        self.log
            .iter()
            .filter(|s| !matches!(s, Step::Nothing | Step::Wait { .. }))
            .collect()
    }
}

fn evicted(w: &World) -> Vec<String> {
    w.status()
        .evictions
        .unwrap_or_default()
        .iter()
        .map(|e| format!("{}/{}", e.namespace, e.pod))
        .collect()
}

// ---- rebind / bus-reset ----

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
fn a_failed_attempt_climbs_the_ladder_with_a_new_attempt_id() {
    let mut w = World::new("rebind,bus-reset");
    w.run(20);
    w.agent(AttemptOutcome::Failed, "device did not come back");
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("bus-reset", 2));
    w.agent(AttemptOutcome::Failed, "still dead");
    w.limits.reboots = 1;
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("reboot", 3),
        "reboot is the last rung even unlisted"
    );
    assert!(
        w.ledger[0].reboot,
        "the reboot counts against maxConcurrentReboots"
    );
    assert!(
        w.pods.iter().all(|p| p.daemon_set || p.mirror),
        "whole-node drain: {:?}",
        w.pods
    );
    w.agent(AttemptOutcome::Failed, "no");
    w.run(10);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "LadderExhausted"
    );
    assert!(w.node.unschedulable);
    assert_eq!(w.ledger.len(), 1, "NeedsAttention keeps the budget place");
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

#[test]
fn a_timed_out_attempt_escalates() {
    let mut w = World::new("rebind,bus-reset");
    w.run(20);
    w.now = t(1 + 301);
    let d = w.decide();
    assert!(
        d.note
            .as_ref()
            .unwrap()
            .message
            .contains("rebind#1 timed out"),
        "{:?}",
        d.note
    );
    w.apply(&d);
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("bus-reset", 2));
}

#[test]
fn max_attempts_stops_the_ladder() {
    let mut w = World::new("rebind,bus-reset");
    w.settings.max_attempts = 1;
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "LadderExhausted"
    );
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
fn first_rung_is_the_least_disruptive_listed_and_allowed() {
    let s = |allowed: &[&str], esc: &[&str]| {
        let mut st =
            Settings::from_spec(&serde_json::from_value(serde_json::json!({})).unwrap()).unwrap();
        st.allowed_methods = allowed.iter().map(|x| Method::from(*x)).collect();
        st.escalation = esc.iter().map(|x| Method::from(*x)).collect();
        st
    };
    let m = Method::parse_list;
    let all = s(
        &["rebind", "bus-reset", "reboot"],
        &["rebind", "bus-reset", "reboot"],
    );
    assert_eq!(
        ladder(&m("rebind,bus-reset"), &all).unwrap(),
        ["rebind", "bus-reset", "reboot"]
    );
    assert_eq!(
        ladder(&m("bus-reset"), &all).unwrap(),
        ["bus-reset", "reboot"],
        "never backwards to rebind"
    );
    let no_rebind = s(&["bus-reset", "reboot"], &["bus-reset", "reboot"]);
    assert_eq!(
        ladder(&m("rebind,bus-reset"), &no_rebind).unwrap(),
        ["bus-reset", "reboot"]
    );
    let no_reboot = s(&["rebind", "bus-reset"], &["rebind", "bus-reset"]);
    assert_eq!(ladder(&m("rebind"), &no_reboot).unwrap(), ["rebind"]);
    assert_eq!(
        ladder(&m("rebind,bus-reset,vendor-specific"), &all).unwrap(),
        ["rebind", "bus-reset", "reboot"]
    );
    for (methods, reason) in [
        ("vendor-specific", "NoAllowedMethod"),
        ("unknown", "NoAllowedMethod"),
        ("warp-drive", "NoAllowedMethod"),
    ] {
        assert_eq!(
            ladder(&m(methods), &all).unwrap_err().reason,
            reason,
            "{methods}"
        );
    }
    let lenient = s(
        &[
            "vendor-specific",
            "cold-reset",
            "unknown",
            "warp-drive",
            "reboot",
        ],
        &["reboot"],
    );
    for (methods, reason) in [
        ("vendor-specific", "VendorSpecific"),
        ("cold-reset", "ColdReset"),
        ("unknown", "UnknownMethod"),
        ("warp-drive", "UnknownMethod"),
    ] {
        assert_eq!(
            ladder(&m(methods), &lenient).unwrap_err().reason,
            reason,
            "{methods}"
        );
    }
}

#[test]
fn methods_unwedge_cannot_carry_out_need_a_human_with_the_node_cordoned() {
    for methods in ["vendor-specific", "cold-reset", "unknown", "warp-drive"] {
        let mut w = World::new(methods);
        w.run(20);
        assert_eq!(w.phase(), Phase::NeedsAttention, "{methods}");
        assert!(w.node.unschedulable, "{methods}: node stays cordoned");
        assert_eq!(w.ledger.len(), 1, "{methods}: keeps its place");
        assert!(w.status().approval.is_none(), "{methods}: nothing approved");
        assert!(
            evicted(&w).is_empty(),
            "{methods}: nothing evicted for a recovery that will not come"
        );
        assert!(
            w.cond(cond::NEEDS_ATTENTION)
                .unwrap()
                .message
                .contains("To do:")
        );
    }
}

#[test]
fn cold_reset_under_a_policy_that_does_not_allow_it_says_power_cycle() {
    let w = World::new("cold-reset");
    for methods in ["cold-reset", "rebind,cold-reset"] {
        let mut st = w.settings.clone();
        st.allowed_methods = vec!["reboot".into()];
        let a = ladder(&Method::parse_list(methods), &st).unwrap_err();
        assert_eq!(
            a.reason, "ColdReset",
            "{methods}: not the generic NoAllowedMethod"
        );
        assert!(a.todo.contains("power-cycle"), "{methods}: {}", a.todo);
        assert!(a.message.contains("policy allows reboot"), "{}", a.message);
    }
    let mut w = World::new("cold-reset");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
    assert_eq!(c.reason, "ColdReset");
    assert!(c.message.contains("power-cycle the node"), "{}", c.message);
}

#[test]
fn vendor_specific_with_xe_survivability_mode_asks_for_a_firmware_flash() {
    for (mode, says) in [
        ("Runtime", "runtime survivability"),
        (
            "Survivability mode type: Boot\nCapability Info: 0x1",
            "boot survivability",
        ),
        ("Survivability mode type: Runtime", "runtime survivability"),
        ("Something", "survivability mode \"Something\""),
    ] {
        // Under the default policy vendor-specific is not allowed (NoAllowedMethod without a
        // mode); with a lenient one it is VendorSpecific: both name the flash once xe says so.
        for allow in [false, true] {
            let mut w = World::new("vendor-specific");
            if allow {
                w.settings.allowed_methods.push("vendor-specific".into());
            }
            w.wedge
                .spec
                .uevent
                .insert(UEVENT_SURVIVABILITY_MODE.into(), mode.into());
            w.run(20);
            assert_eq!(w.phase(), Phase::NeedsAttention, "{mode}");
            let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
            assert_eq!(c.reason, "VendorSpecific", "{mode} allow={allow}");
            assert!(c.message.contains(says), "{mode}: {}", c.message);
            assert!(c.message.contains("firmware flash"), "{}", c.message);
            assert!(c.message.contains("fwupd"), "{}", c.message);
        }
    }
    // Without a mode (not xe, or the attribute is absent) the message stays generic.
    let mut w = World::new("vendor-specific");
    w.settings.allowed_methods.push("vendor-specific".into());
    w.run(20);
    let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
    assert_eq!(c.reason, "VendorSpecific");
    assert!(!c.message.contains("fwupd"), "{}", c.message);
    // A mode on a wedge that does not list vendor-specific changes nothing.
    let a = Attention {
        reason: "NoAllowedMethod",
        message: "m".into(),
        todo: "t".into(),
    };
    let uevent = [(UEVENT_SURVIVABILITY_MODE.to_string(), "Runtime".to_string())].into();
    assert_eq!(with_vendor_hint(a.clone(), &["unknown".into()], &uevent), a);
}

#[test]
fn repeat_offender_goes_to_needs_attention() {
    let mut w = World::new("rebind");
    w.settings.repeat_offender = Some(crate::settings::Window {
        count: 3,
        window: Duration::from_secs(3600),
    });
    w.history = vec![
        PastWedge {
            name: "a".into(),
            detected_at: t(-100),
            evicted_at: None,
        },
        PastWedge {
            name: "b".into(),
            detected_at: t(-7200),
            evicted_at: None,
        },
    ];
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved, "2 within the hour is below 3");
    let mut w2 = World::new("rebind");
    w2.settings.repeat_offender = w.settings.repeat_offender.clone();
    w2.history = vec![
        PastWedge {
            name: "a".into(),
            detected_at: t(-100),
            evicted_at: None,
        },
        PastWedge {
            name: "b".into(),
            detected_at: t(-200),
            evicted_at: None,
        },
    ];
    w2.run(20);
    assert_eq!(w2.phase(), Phase::NeedsAttention);
    assert_eq!(
        w2.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "RepeatOffender"
    );
    assert!(w2.node.unschedulable);
}

// ---- human verbs ----

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

// ---- re-planning ----

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

// ---- none ----

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

// ---- holds ----

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

// ---- policy resolution ----

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

// ---- cordon ownership ----

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

// ---- the plan as a status field ----

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

// ---- DRA quarantine (docs/design.md §5 "On DRA clusters") ----

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

// ---- endings cut short, and inputs that must not be trusted ----

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
fn with_no_driver_bound_only_the_reboot_rung_is_planned() {
    let mut w = World::new("rebind,bus-reset");
    w.wedge.spec.device.driver = String::new();
    w.run(20);
    let a = w.status().approval.expect("an approval");
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("reboot", 1),
        "no ladder walk"
    );
    assert!(w.ledger[0].reboot, "counted against maxConcurrentReboots");
}

#[test]
fn with_no_driver_and_no_reboot_allowed_a_human_is_asked_at_once() {
    let mut w = World::new("rebind,bus-reset");
    w.wedge.spec.device.driver = String::new();
    w.settings.allowed_methods = vec!["rebind".into(), "bus-reset".into()];
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
    assert_eq!(c.reason, "NoDriver");
    assert!(c.message.contains("To do:"), "{}", c.message);
    assert!(w.status().approval.is_none());
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
