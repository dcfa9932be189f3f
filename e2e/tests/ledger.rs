//! The operator's admission ledger against the real API server: concurrent admissions are
//! committed in groups and never exceed the budget, and the copy of the policy the operator
//! remembers between writes never decides anything on its own — a write from it that is out
//! of date is refused (409) and redone from a fresh read, and "no room" is only answered from a
//! fresh read. A new leader's repair drops only the places of wedges confirmed gone. And the
//! reconciler, given a copy of a wedge older than the stored one (a cache
//! lagging behind the operator's own writes), never cordons a node on it: the wedge was
//! verified and its node uncordoned meanwhile, and a cordon made again from the old copy would
//! hold a node past the budget while the wedge gives its place back.

use std::sync::Arc;

use e2e::cluster::ControlPlane;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::json;
use unwedge_crds::labels::{ANN_CORDONED_BY, FINALIZER};
use unwedge_crds::{BudgetUnit, GpuWedge, Phase, RecoveryPolicy};
use unwedge_operator::budget::{Candidate, Limits};
use unwedge_operator::ledger;
use unwedge_operator::reconciler::{self, Ctx, admission};

const LIMITS: Limits = Limits {
    nodes: 5,
    reboots: 1,
    devices: 1,
    none: 1,
};

async fn policy(api: &Api<RecoveryPolicy>, name: &str) {
    policy_of(api, name, LIMITS.nodes).await
}

/// Creates policy `name` over the nodes labelled `ledger-test: <name>`, `maxUnavailable` nodes.
async fn policy_of(api: &Api<RecoveryPolicy>, name: &str, max_unavailable: u32) {
    let p: RecoveryPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"ledger-test": name}, "maxUnavailable": max_unavailable}
    }))
    .unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
}

fn candidate(i: usize) -> Candidate {
    Candidate {
        wedge: format!("w{i}"),
        node: format!("n{i}"),
        unit: BudgetUnit::Node,
        reboot: false,
    }
}

async fn admit(api: &Api<RecoveryPolicy>, policy: &str, i: usize) -> bool {
    ledger::admit(api, policy, &candidate(i), &LIMITS, &[], false)
        .await
        .expect("the API server answers")
        .is_ok()
}

async fn held(api: &Api<RecoveryPolicy>, name: &str) -> Vec<String> {
    let p = api.get(name).await.unwrap();
    p.status
        .unwrap_or_default()
        .admitted
        .into_iter()
        .map(|a| a.wedge)
        .collect()
}

/// Replaces the ledger as another writer would (another operator replica, a human).
async fn write_behind_our_back(api: &Api<RecoveryPolicy>, name: &str, wedges: &[usize]) {
    let mut p = api.get(name).await.unwrap();
    let mut st = p.status.clone().unwrap_or_default();
    st.admitted = wedges.iter().map(|i| candidate(*i).admission()).collect();
    p.status = Some(st);
    api.replace_status(name, &PostParams::default(), &p)
        .await
        .unwrap();
}

/// PUTs on recoverypolicies/status counted by the API server itself.
async fn status_writes(client: &kube::Client) -> f64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"recoverypolicies\"")
                && l.contains("subresource=\"status\"")
                && l.contains("verb=\"PUT\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_commits_in_groups_and_decides_only_from_fresh_state() {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.apply_crds().await.expect("CRDs");
    let client = cp.client().await.unwrap();
    let api: Api<RecoveryPolicy> = Api::all(client.clone());

    // 40 admissions at once into a budget of 5 nodes.
    policy(&api, "storm").await;
    let before = status_writes(&client).await;
    let answers = futures::future::join_all((0..40).map(|i| {
        let api = api.clone();
        async move { admit(&api, "storm", i).await }
    }))
    .await;
    let writes = status_writes(&client).await - before;
    let admitted = answers.iter().filter(|a| **a).count();
    assert_eq!(admitted, LIMITS.nodes as usize, "answers: {answers:?}");
    let mut ledger = held(&api, "storm").await;
    ledger.sort();
    let mut told: Vec<String> = (0..40)
        .filter(|i| answers[*i])
        .map(|i| format!("w{i}"))
        .collect();
    told.sort();
    assert_eq!(
        ledger, told,
        "the ledger holds exactly the wedges told they were admitted"
    );
    // join_all polls every admission once before any answer: the first takes the turn alone
    // (one write), the other 39 queue behind it and are committed as one group (one write).
    // On a loaded machine the task yields before it has polled them all (tokio's budget) and
    // a group is cut: seen 3 at load 10, 4 beside a running `.ci/run`. What grouping proves is
    // fewer writes than admissions: one write per admission would be 5.
    assert!(
        (1.0..5.0).contains(&writes),
        "5 admissions from 40 concurrent changes in fewer than 5 status writes, seen {writes}"
    );

    // The remembered copy is now out of date in both directions.
    policy(&api, "stale").await;
    for i in 0..5 {
        assert!(admit(&api, "stale", i).await, "w{i} fits");
    }
    assert!(!admit(&api, "stale", 5).await, "the budget of 5 is full");
    // Another writer frees two places: "no room" from the remembered copy would be wrong.
    write_behind_our_back(&api, "stale", &[0, 1, 2]).await;
    assert!(
        admit(&api, "stale", 5).await,
        "w5 admitted after a fresh read showed room"
    );
    // Another writer fills the budget: the write from the remembered copy is refused (409),
    // and the fresh read queues w7.
    write_behind_our_back(&api, "stale", &[0, 1, 2, 3, 4]).await;
    assert!(
        !admit(&api, "stale", 7).await,
        "w7 queued: the budget is full"
    );
    assert_eq!(held(&api, "stale").await, ["w0", "w1", "w2", "w3", "w4"]);

    // A release, then a deleted policy: a clear error, not a hang.
    ledger::release(&api, "stale", "w4").await.unwrap();
    assert_eq!(held(&api, "stale").await, ["w0", "w1", "w2", "w3"]);
    api.delete("stale", &Default::default()).await.unwrap();
    let err = ledger::admit(&api, "stale", &candidate(9), &LIMITS, &[], false)
        .await
        .expect_err("the policy is gone");
    assert!(
        matches!(err, ledger::LedgerError::NoPolicy(ref p) if p == "stale"),
        "{err}"
    );
    a_ledger_repair_keeps_places_of_wedges_it_did_not_list(&client).await;
    a_stale_copy_never_cordons(&client).await;
    the_admission_pass_admits_first_come_within_the_budget(&client).await;
    cp.stop().await;
}

/// The repair a new leader runs drops the places of wedges that are gone, and only those: a
/// wedge created after its LIST (admitted by the new leader's first reconciles while the
/// repair runs) keeps its place. The LIST is passed in, taken before that wedge existed.
async fn a_ledger_repair_keeps_places_of_wedges_it_did_not_list(client: &kube::Client) {
    let api: Api<RecoveryPolicy> = Api::all(client.clone());
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    policy(&api, "repair").await;
    let listed = wedge_names(&wedges).await;
    create_wedge(&wedges, "w1", "n1").await;
    assert!(admit(&api, "repair", 1).await, "w1 admitted after the LIST");
    assert!(
        admit(&api, "repair", 2).await,
        "w2 (never created) admitted"
    );
    reconciler::repair_unlisted(client, &listed)
        .await
        .expect("repair");
    assert_eq!(
        held(&api, "repair").await,
        ["w1"],
        "w2 is gone and dropped; w1, missing from the earlier LIST, keeps its place"
    );
}

/// Creates GpuWedge `name` of device 0000:03:00.0 on `node` (`rebind,bus-reset`), carrying the
/// operator's finalizer as an admitted wedge does.
async fn create_wedge(wedges: &Api<GpuWedge>, name: &str, node: &str) {
    let w: GpuWedge = serde_json::from_value(json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "GpuWedge",
        "metadata": {"name": name, "finalizers": [FINALIZER],
                     "labels": {"unwedge.io/node": node, "unwedge.io/device": "0000-03-00.0"}},
        "spec": {"nodeName": node, "device": {"pciAddress": "0000:03:00.0", "driver": "xe", "card": "card0"},
                 "methods": ["rebind", "bus-reset"], "detectedAt": "2026-11-25T10:00:00Z", "bootId": "b1",
                 "uevent": {"ACTION": "change", "WEDGED": "rebind,bus-reset", "SEQNUM": "7"}}
    }))
    .unwrap();
    wedges.create(&PostParams::default(), &w).await.unwrap();
}

/// The names of every GpuWedge now.
async fn wedge_names(wedges: &Api<GpuWedge>) -> std::collections::BTreeSet<String> {
    wedges
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|w| w.name_any())
        .collect()
}

/// The operator's caches, filled by hand: what a lagging watch would show.
struct Caches {
    ctx: Arc<Ctx>,
    wedges: Writer<GpuWedge>,
    nodes: Writer<Node>,
    policies: Writer<RecoveryPolicy>,
    _leader: tokio::sync::watch::Sender<bool>,
}

impl Caches {
    fn new(client: &kube::Client) -> Caches {
        let (wedge_store, wedges) = reflector::store::<GpuWedge>();
        let (node_store, nodes) = reflector::store::<Node>();
        let (policy_store, policies) = reflector::store::<RecoveryPolicy>();
        let (leader_tx, leader) = tokio::sync::watch::channel(true);
        let ctx = Arc::new(Ctx {
            client: client.clone(),
            wedges: wedge_store,
            nodes: node_store,
            policies: policy_store,
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "unwedge-operator".into(),
                    instance: Some("ledger-test".into()),
                },
            ),
            identity: "system:serviceaccount:unwedge:unwedge-operator".into(),
            metrics: Arc::new(unwedge_operator::metrics::Metrics::new()),
            leader,
            dra: unwedge_operator::dra::Support::enabled(),
            permits: tokio::sync::Semaphore::new(4),
            admitted_permits: tokio::sync::Semaphore::new(2),
            node_writes: Default::default(),
            wedge_writes: Default::default(),
            events: Arc::new(tokio::sync::Semaphore::new(4)),
            admission: Default::default(),
            turns: Default::default(),
        });
        Caches {
            ctx,
            wedges,
            nodes,
            policies,
            _leader: leader_tx,
        }
    }

    /// The caches show exactly these copies.
    fn show(&mut self, w: &GpuWedge, n: &Node, p: &RecoveryPolicy) {
        self.wedges
            .apply_watcher_event(&watcher::Event::Apply(w.clone()));
        self.nodes
            .apply_watcher_event(&watcher::Event::Apply(n.clone()));
        self.policies
            .apply_watcher_event(&watcher::Event::Apply(p.clone()));
    }
}

/// A wedge Recovering on a node cordoned for it, in a policy of one node: the reconciler,
/// shown the stored copies, settles (writes nothing more). Then the attempt succeeds, the
/// wedge is Verifying and its node uncordoned (what the operator did next), and the reconciler
/// is handed the settled Recovering copy again, as a cache lagging behind those writes would:
/// the node stays uncordoned (no cordon made again from the old copy), and the fresh copy is
/// decided on instead (Recovered, its place given back).
async fn a_stale_copy_never_cordons(client: &kube::Client) {
    let (node, wedge, pol) = ("stale-n", "stale-n-0000-03-00-0-7", "stale-cordon");
    let nodes: Api<Node> = Api::all(client.clone());
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "labels": {"ledger-test": pol},
                     "annotations": {ANN_CORDONED_BY: wedge}},
        "spec": {"unschedulable": true}
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &n).await.unwrap();
    policy_of(&policies, pol, 1).await;
    policies
        .patch_status(
            pol,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"admitted": [
                {"wedge": wedge, "node": node, "unit": "Node", "reboot": false}
            ]}})),
        )
        .await
        .unwrap();
    create_wedge(&wedges, wedge, node).await;
    // Whole seconds, as a Kubernetes Time is written.
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let approval = json!({"method": "rebind", "attempt": 1, "at": now,
                          "by": "system:serviceaccount:unwedge:unwedge-operator"});
    wedges
        .patch_status(
            wedge,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Recovering", "policy": pol, "cordoned": true, "admittedAt": now,
                "methods": "rebind,bus-reset", "agentDryRun": false,
                "plan": {"method": "rebind", "attempt": 1}, "approval": approval,
                "attempts": [{"attempt": 1, "method": "rebind", "result": "Started",
                              "startedAt": now, "bootId": "b1"}]
            }})),
        )
        .await
        .unwrap();

    // The reconciler settles on the stored copies.
    let mut caches = Caches::new(client);
    let mut settled = None;
    for _ in 0..6 {
        let before = wedges.get(wedge).await.unwrap();
        caches.show(
            &before,
            &nodes.get(node).await.unwrap(),
            &policies.get(pol).await.unwrap(),
        );
        reconciler::reconcile(Arc::new(before.clone()), caches.ctx.clone())
            .await
            .expect("reconcile");
        let after = wedges.get(wedge).await.unwrap();
        if after.resource_version() == before.resource_version() {
            settled = Some(after);
            break;
        }
    }
    let stale = settled.expect("the reconciler settles on a Recovering wedge within 6 rounds");
    let phase = |w: &GpuWedge| w.status.as_ref().and_then(|s| s.phase);
    assert_eq!(phase(&stale), Some(Phase::Recovering));
    assert_eq!(
        nodes
            .get(node)
            .await
            .unwrap()
            .annotations()
            .get(ANN_CORDONED_BY),
        Some(&wedge.to_string()),
        "settled with the node cordoned for the wedge"
    );

    // Meanwhile: the attempt succeeded, the wedge is Verifying, its node uncordoned.
    wedges
        .patch_status(
            wedge,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Verifying", "cordoned": false,
                "attempts": [{"attempt": 1, "method": "rebind", "result": "Succeeded",
                              "startedAt": now, "finishedAt": now, "bootId": "b1"}]
            }})),
        )
        .await
        .unwrap();
    let uncordoned = nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ANN_CORDONED_BY: null}},
                                 "spec": {"unschedulable": null}})),
        )
        .await
        .unwrap();

    // The caches show the node as it is and the wedge as it was; our own writes are no longer
    // preferred to them (past writes::TTL, as after a watch that lagged longer than that).
    tokio::time::sleep(unwedge_operator::writes::TTL).await;
    caches.show(&stale, &uncordoned, &policies.get(pol).await.unwrap());
    reconciler::reconcile(Arc::new(stale.clone()), caches.ctx.clone())
        .await
        .expect("reconcile the stale copy");
    let n = nodes.get(node).await.unwrap();
    assert!(
        n.annotations().get(ANN_CORDONED_BY).is_none()
            && !n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
        "no cordon made again from a stale copy of the wedge: node {node} is {:?} {:?}",
        n.spec.as_ref().and_then(|s| s.unschedulable),
        n.annotations().get(ANN_CORDONED_BY)
    );
    let w = wedges.get(wedge).await.unwrap();
    assert_eq!(
        phase(&w),
        Some(Phase::Recovered),
        "decided on the fresh copy: {}",
        serde_json::to_string(&w.status).unwrap()
    );
    assert!(
        held(&policies, pol).await.is_empty(),
        "the place is given back"
    );
}

/// The admission pass over caches filled by hand: four wedges reported on four nodes of a
/// policy with room for two. The pass admits the first two that are free to act for, first
/// come first (the first one's turn is held, as by its own reconcile), and cordons their
/// nodes; the rest stays untouched. With the budget full it acts for nobody; a place given
/// back goes to the first waiting wedge.
async fn the_admission_pass_admits_first_come_within_the_budget(client: &kube::Client) {
    let pol = "pass-test";
    let nodes: Api<Node> = Api::all(client.clone());
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    policy_of(&policies, pol, 2).await;
    let names: Vec<(String, String)> = (0..4)
        .map(|i| (format!("pass-w{i}"), format!("pass-n{i}")))
        .collect();
    for (wedge, node) in &names {
        let n: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"ledger-test": pol}}
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &n).await.unwrap();
        create_wedge(&wedges, wedge, node).await;
        // The agent's first report.
        wedges
            .patch_status(
                wedge,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"agentDryRun": false}})),
            )
            .await
            .unwrap();
    }
    let mut caches = Caches::new(client);
    let cordoned = |n: &Node| {
        (
            n.spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            n.annotations().get(ANN_CORDONED_BY).cloned(),
        )
    };
    let (retry, _retried) = futures::channel::mpsc::unbounded();
    show_fresh(&mut caches, client, &names, pol).await;

    // One memory across the passes: a policy found full is passed over until it changes.
    let mut passes = admission::Passes::default();
    let held_by_its_reconcile = caches.ctx.turns.try_take("pass-w0").unwrap();
    let acted = passes.pass(&caches.ctx, &retry).await;
    assert_eq!(acted, 2, "two places, two wedges acted for");
    let mut ledger = held(&policies, pol).await;
    ledger.sort();
    assert_eq!(
        ledger,
        ["pass-w1", "pass-w2"],
        "first come first, w0 being busy"
    );
    for (i, (wedge, node)) in names.iter().enumerate() {
        let n = nodes.get(node).await.unwrap();
        if i == 1 || i == 2 {
            assert_eq!(
                cordoned(&n),
                (true, Some(wedge.clone())),
                "{node} cordoned for {wedge}"
            );
        } else {
            assert_eq!(cordoned(&n), (false, None), "{node} untouched");
        }
    }
    let w3 = wedges.get("pass-w3").await.unwrap();
    assert_eq!(
        w3.status.as_ref().and_then(|s| s.phase),
        None,
        "the wedge past the budget is left to its reconcile"
    );
    drop(held_by_its_reconcile);

    // The budget is full: nobody is acted for.
    show_fresh(&mut caches, client, &names, pol).await;
    assert_eq!(passes.pass(&caches.ctx, &retry).await, 0, "budget full");

    // A place given back goes to the first waiting wedge, w0.
    ledger::release(&policies, pol, "pass-w1").await.unwrap();
    show_fresh(&mut caches, client, &names, pol).await;
    assert_eq!(passes.pass(&caches.ctx, &retry).await, 1);
    let mut ledger = held(&policies, pol).await;
    ledger.sort();
    assert_eq!(ledger, ["pass-w0", "pass-w2"]);
    assert_eq!(
        cordoned(&nodes.get("pass-n0").await.unwrap()),
        (true, Some("pass-w0".to_string()))
    );
    assert_eq!(
        cordoned(&nodes.get("pass-n3").await.unwrap()),
        (false, None),
        "w3 still waits"
    );
}

/// The caches show the stored copies of these wedges and nodes and of policy `pol`.
async fn show_fresh(
    caches: &mut Caches,
    client: &kube::Client,
    names: &[(String, String)],
    pol: &str,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    for (wedge, node) in names {
        caches
            .wedges
            .apply_watcher_event(&watcher::Event::Apply(wedges.get(wedge).await.unwrap()));
        caches
            .nodes
            .apply_watcher_event(&watcher::Event::Apply(nodes.get(node).await.unwrap()));
    }
    caches
        .policies
        .apply_watcher_event(&watcher::Event::Apply(policies.get(pol).await.unwrap()));
}
