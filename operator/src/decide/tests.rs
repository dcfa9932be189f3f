//! Every branch of the lifecycle, as scenarios: a small world (wedge, node, pods, ledger) that
//! applies each decision the way the effect layer would, and an agent stand-in. The scenarios
//! are grouped by topic in the modules below.

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
        uid: format!("uid-{name}"),
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
        // `none` by eviction: most tests of the none path predate in-place restarts (the
        // default); tests of in-place restarts set `RestartMode::InPlace` themselves.
        let settings = Settings::from_spec(
            &serde_json::from_value(serde_json::json!({"none": {"restart": "Evict"}})).unwrap(),
        )
        .unwrap();
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
        let d = decide(&input);
        if !super::reads_pods(&self.wedge) {
            // The loader lists no pods for such a wedge: every scenario checks that the
            // decision is the same without them.
            let without = Input { pods: &[], ..input };
            assert_eq!(
                decide(&without),
                d,
                "decided differently without the node's pods"
            );
        }
        d
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
            restarts: None,
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

mod cordon;
mod dra;
mod drain;
mod holds;
mod ladder;
mod lifecycle;
mod none;
mod queue;
mod replan;
mod verbs;
