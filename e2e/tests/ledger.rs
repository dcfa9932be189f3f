//! The operator's admission ledger against the real API server: concurrent admissions are
//! committed in groups and never exceed the budget, and the copy of the policy the operator
//! remembers between writes never decides anything on its own — a write from it that is out
//! of date is refused (409) and redone from a fresh read, and "no room" is only answered from a
//! fresh read.

use e2e::cluster::ControlPlane;
use kube::api::{Api, PostParams};
use unwedge_crds::{BudgetUnit, RecoveryPolicy};
use unwedge_operator::budget::{Candidate, Limits};
use unwedge_operator::ledger;

const LIMITS: Limits = Limits {
    nodes: 5,
    reboots: 1,
    devices: 1,
    none: 1,
};

async fn policy(api: &Api<RecoveryPolicy>, name: &str) {
    let p: RecoveryPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": name},
        "spec": {"nodeSelector": {"ledger-test": name}, "maxUnavailable": LIMITS.nodes}
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
    // On a loaded machine a group can be cut once more (seen: 3 at load 10). One write per
    // admission would be 5.
    assert!(
        (1.0..=3.0).contains(&writes),
        "5 admissions from 40 concurrent changes in at most 3 status writes, seen {writes}"
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
    cp.stop().await;
}
