//! The admission proofs (docs/design.md §4 invariant 5, §6; issues 11 item 8, 12 "human verbs", 14)
//! against the policies the chart renders, on the real local control plane, with tokens the
//! TokenRequest API mints for the chart's own ServiceAccounts, bound to pods on kwok nodes.
//!
//! Every refusal is checked to come from the named ValidatingAdmissionPolicy (not from RBAC),
//! and every refused write has an accepted twin, so no proof passes because nothing works.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use e2e::cluster::{ControlPlane, ensure_binaries, repo_root};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use unwedge_crds::{GpuWedge, RecoveryPolicy};

const NS: &str = "unwedge-system";
const AGENT_SA: &str = "unwedge-agent";
const OPERATOR_SA: &str = "unwedge-operator";
const AGENT_POLICY: &str = "ValidatingAdmissionPolicy 'unwedge-agent-own-node'";
const BY_POLICY: &str = "ValidatingAdmissionPolicy 'unwedge-human-verbs-by'";
const DEFAULT_POLICY: &str = "ValidatingAdmissionPolicy 'unwedge-single-default-policy'";
/// How long a new ValidatingAdmissionPolicy may take to be enforced after it is created.
const ENFORCEMENT_TIMEOUT: Duration = Duration::from_secs(60);

fn helm_install(cp: &ControlPlane) -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let bin = ensure_binaries(&["helm"])?.join("helm");
    let chart = repo_root().join("charts/unwedge");
    let out = Command::new(&bin)
        .args(["install", "unwedge"])
        .arg(&chart)
        .args(["--namespace", NS, "--create-namespace", "--kubeconfig"])
        .arg(cp.kubeconfig_path())
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "helm install failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A pod of the agent's ServiceAccount bound to `node`, so a token can be bound to it. Its
/// labels differ from the DaemonSet's, so no controller adopts it.
async fn agent_pod(client: &Client, node: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("agent-on-{node}"), "labels": {"test": "admission"}},
        "spec": {"serviceAccountName": AGENT_SA, "nodeName": node,
                 "containers": [{"name": "agent", "image": "unwedge/agent:dev"}]}
    }))
    .unwrap();
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create agent pod");
    created.metadata.uid.expect("pod uid")
}

fn wedge(node: &str, seq: u32, annotations: Value) -> GpuWedge {
    serde_json::from_value(json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "GpuWedge",
        "metadata": {
            "name": format!("{node}-0000-03-00-0-{seq}"),
            "labels": {"unwedge.io/node": node, "unwedge.io/device": "0000-03-00.0"},
            "annotations": annotations,
        },
        "spec": {"nodeName": node, "device": {"pciAddress": "0000:03:00.0", "driver": "xe", "card": "card0"},
                 "methods": ["rebind", "bus-reset"], "detectedAt": "2026-11-25T10:00:00Z", "bootId": "b1",
                 "uevent": {"ACTION": "change", "WEDGED": "rebind,bus-reset", "SEQNUM": seq.to_string()}}
    }))
    .unwrap()
}

/// Asserts `res` was refused by `policy` with a message containing `needle`.
fn refused<T: std::fmt::Debug>(
    what: &str,
    res: Result<T, kube::Error>,
    policy: &str,
    needle: &str,
) {
    match res {
        Ok(v) => panic!("{what}: accepted, but must be refused by {policy}: {v:?}"),
        Err(kube::Error::Api(s)) => {
            assert!(
                s.message.contains(policy) && s.message.contains(needle),
                "{what}: refused, but not by {policy} with {needle:?}: {} {}",
                s.code,
                s.message
            );
            assert!(
                s.code == 403 || s.code == 422,
                "{what}: code {} ({})",
                s.code,
                s.message
            );
        }
        Err(e) => panic!("{what}: unexpected error {e:#}"),
    }
}

fn accepted<T>(what: &str, res: Result<T, kube::Error>) -> T {
    res.unwrap_or_else(|e| panic!("{what}: refused, but must be accepted: {e:#}"))
}

fn merge(v: Value) -> Patch<Value> {
    Patch::Merge(v)
}

/// Polls until `probe` is refused by `policy`: policies are enforced a moment after they are
/// created. `undo` removes what an accepted probe created. Fails after ENFORCEMENT_TIMEOUT.
async fn until_enforced<T, P, PF, U, UF>(what: &str, policy: &str, mut probe: P, mut undo: U)
where
    P: FnMut() -> PF,
    PF: std::future::Future<Output = Result<T, kube::Error>>,
    U: FnMut() -> UF,
    UF: std::future::Future<Output = ()>,
{
    let deadline = Instant::now() + ENFORCEMENT_TIMEOUT;
    loop {
        match probe().await {
            Err(kube::Error::Api(s)) if s.message.contains(policy) => return,
            Err(e) => panic!("{what}: refused, but not by {policy}: {e:#}"),
            Ok(_) => {
                undo().await;
                assert!(
                    Instant::now() < deadline,
                    "{what}: still accepted after {ENFORCEMENT_TIMEOUT:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn annotations(w: &GpuWedge) -> std::collections::BTreeMap<String, String> {
    w.metadata.annotations.clone().unwrap_or_default()
}

async fn scenario() {
    let cp = ControlPlane::start().await.expect("control plane");
    helm_install(&cp).expect("install the chart");
    cp.add_kwok_node("node-a", &[], &[]).await.unwrap();
    cp.add_kwok_node("node-b", &[], &[]).await.unwrap();
    let admin = cp.client().await.unwrap();
    let uid_a = agent_pod(&admin, "node-a").await;
    let uid_b = agent_pod(&admin, "node-b").await;
    let token_a = cp
        .create_token(NS, AGENT_SA, Some(("agent-on-node-a", &uid_a)))
        .await
        .unwrap();
    let token_b = cp
        .create_token(NS, AGENT_SA, Some(("agent-on-node-b", &uid_b)))
        .await
        .unwrap();
    let token_unbound = cp.create_token(NS, AGENT_SA, None).await.unwrap();
    let token_operator = cp.create_token(NS, OPERATOR_SA, None).await.unwrap();
    let agent_a = cp.client_for_token(&token_a).await.unwrap();
    let agent_b = cp.client_for_token(&token_b).await.unwrap();
    let unbound = cp.client_for_token(&token_unbound).await.unwrap();
    let operator = cp.client_for_token(&token_operator).await.unwrap();

    // The setup is what the proofs assume: node A's token carries node A's claim.
    let who = ControlPlane::whoami(&agent_a).await.unwrap();
    let user = who.status.and_then(|s| s.user_info).expect("userInfo");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:unwedge-system:unwedge-agent")
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec!["node-a".to_string()]),
        "{extra:?}"
    );
    let admin_name = ControlPlane::whoami(&admin)
        .await
        .unwrap()
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap();

    let as_admin: Api<GpuWedge> = Api::all(admin.clone());
    let as_a: Api<GpuWedge> = Api::all(agent_a.clone());
    let as_b: Api<GpuWedge> = Api::all(agent_b.clone());
    let as_unbound: Api<GpuWedge> = Api::all(unbound.clone());
    let as_operator: Api<GpuWedge> = Api::all(operator.clone());
    let pp = PostParams::default();
    let patch = PatchParams::default();

    // A token not bound to a pod has no node claim: refused (this also waits for enforcement).
    let w_a = wedge("node-a", 1, json!({}));
    until_enforced(
        "unbound agent token creates a wedge",
        AGENT_POLICY,
        || as_unbound.create(&pp, &w_a),
        || async {
            let _ = as_admin
                .delete("node-a-0000-03-00-0-1", &DeleteParams::default())
                .await;
        },
    )
    .await;
    refused(
        "unbound agent token creates a wedge",
        as_unbound.create(&pp, &w_a).await,
        AGENT_POLICY,
        "no node claim",
    );

    // Each agent creates the wedge of its own node.
    accepted(
        "agent A creates node A's wedge",
        as_a.create(&pp, &w_a).await,
    );
    let w_b = wedge("node-b", 2, json!({}));
    accepted(
        "agent B creates node B's wedge",
        as_b.create(&pp, &w_b).await,
    );
    let (a, b) = ("node-a-0000-03-00-0-1", "node-b-0000-03-00-0-2");
    refused(
        "unbound agent token patches node A's status",
        as_unbound
            .patch_status(a, &patch, &merge(json!({"status": {"agentMessage": "x"}})))
            .await,
        AGENT_POLICY,
        "no node claim",
    );

    // Node A's token on node B's wedge: create, update, status, annotations, delete.
    let other = AGENT_POLICY;
    let msg = "the agent of node node-a may not touch GpuWedges of node node-b";
    refused(
        "agent A creates a wedge of node B",
        as_a.create(&pp, &wedge("node-b", 3, json!({}))).await,
        other,
        msg,
    );
    let mut changed = as_a.get(b).await.expect("agents may read every wedge");
    changed
        .metadata
        .labels
        .get_or_insert_default()
        .insert("tampered".into(), "yes".into());
    refused(
        "agent A updates node B's wedge",
        as_a.replace(b, &pp, &changed).await,
        other,
        msg,
    );
    refused(
        "agent A patches node B's status",
        as_a.patch_status(
            b,
            &patch,
            &merge(json!({"status": {"consumers": [], "agentMessage": "mine now"}})),
        )
        .await,
        other,
        msg,
    );
    refused(
        "agent A changes node B's annotations",
        as_a.patch(
            b,
            &patch,
            &merge(json!({"metadata": {"annotations": {"note": "x"}}})),
        )
        .await,
        other,
        msg,
    );
    refused(
        "agent A deletes node B's wedge",
        as_a.delete(b, &DeleteParams::default()).await,
        other,
        msg,
    );
    let still = as_admin.get(b).await.expect("node B's wedge survives");
    assert!(
        !still
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .contains_key("tampered")
    );
    assert!(!annotations(&still).contains_key("note"));
    assert!(still.status.and_then(|s| s.agent_message).is_none());

    // Its own wedge: the agent part of the status and ordinary annotations are fine ...
    accepted(
        "agent A reports consumers and an attempt on its own wedge",
        as_a.patch_status(
            a,
            &patch,
            &merge(json!({"status": {
                "consumers": [{"namespace": "ml", "pod": "train-0", "container": "main", "deviceId": "0000:03:00.0", "pciAddress": "0000:03:00.0"}],
                "agentMessage": "1 consumer"}})),
        )
        .await,
    );
    accepted(
        "agent A annotates its own wedge",
        as_a.patch(
            a,
            &patch,
            &merge(json!({"metadata": {"annotations": {"note": "seen"}}})),
        )
        .await,
    );
    // ... but never a human verb, not even on its own wedge and with its own name as `by`,
    let agent_name = "system:serviceaccount:unwedge-system:unwedge-agent";
    for verb in ["approve", "retry", "abandon"] {
        refused(
            &format!("agent A sets unwedge.io/{verb} on its own wedge"),
            as_a.patch(a, &patch, &merge(json!({"metadata": {"annotations": {format!("unwedge.io/{verb}"): "", "unwedge.io/by": agent_name}}})))
                .await,
            AGENT_POLICY,
            &format!("unwedge.io/{verb}"),
        );
    }
    refused(
        "agent A creates a wedge that comes approved",
        as_a.create(
            &pp,
            &wedge(
                "node-a",
                4,
                json!({"unwedge.io/approve": "rebind", "unwedge.io/by": agent_name}),
            ),
        )
        .await,
        AGENT_POLICY,
        "unwedge.io/approve",
    );
    // ... nor the operator's part of the status,
    refused(
        "agent A approves itself in status.approval",
        as_a.patch_status(a, &patch, &merge(json!({"status": {"approval": {"method": "rebind", "attempt": 1, "at": "2026-11-25T10:01:00Z", "by": agent_name}}})))
            .await,
        AGENT_POLICY,
        "status.approval",
    );
    refused(
        "agent A sets status.phase",
        as_a.patch_status(a, &patch, &merge(json!({"status": {"phase": "Approved"}})))
            .await,
        AGENT_POLICY,
        "status.phase",
    );
    // ... nor move the node label away from spec.nodeName.
    refused(
        "agent A relabels its wedge to node B",
        as_a.patch(
            a,
            &patch,
            &merge(json!({"metadata": {"labels": {"unwedge.io/node": "node-b"}}})),
        )
        .await,
        AGENT_POLICY,
        "unwedge.io/node",
    );

    // The operator writes its part of the status (RBAC allows, no policy objects) but cannot
    // create wedges (RBAC: only agents do).
    accepted(
        "operator sets phase and approval",
        as_operator
            .patch_status(
                a,
                &patch,
                &merge(json!({"status": {"phase": "AwaitingApproval", "approval": null}})),
            )
            .await,
    );
    match as_operator
        .create(&pp, &wedge("node-a", 5, json!({})))
        .await
    {
        Err(kube::Error::Api(s)) => assert!(
            s.code == 403 && s.message.contains("cannot create"),
            "{}",
            s.message
        ),
        other => panic!("the operator must not be able to create wedges: {other:?}"),
    }

    // A human verb needs unwedge.io/by == the requester (admin included).
    let approve_as = |by: &str| {
        merge(json!({"metadata": {"annotations": {"unwedge.io/approve": "", "unwedge.io/by": by}}}))
    };
    let clear = || async {
        let _ = as_admin
            .patch(a, &PatchParams::default(), &merge(json!({"metadata": {"annotations": {"unwedge.io/approve": null, "unwedge.io/by": null}}})))
            .await;
    };
    let as_alice = approve_as("alice");
    until_enforced(
        "admin approves as someone else",
        BY_POLICY,
        || as_admin.patch(a, &patch, &as_alice),
        clear,
    )
    .await;
    refused(
        "admin approves as alice",
        as_admin.patch(a, &patch, &approve_as("alice")).await,
        BY_POLICY,
        &format!("unwedge.io/by={admin_name}"),
    );
    refused(
        "admin approves with no by",
        as_admin
            .patch(
                a,
                &patch,
                &merge(json!({"metadata": {"annotations": {"unwedge.io/approve": "rebind"}}})),
            )
            .await,
        BY_POLICY,
        "got none",
    );
    accepted(
        "admin approves as itself",
        as_admin.patch(a, &patch, &approve_as(&admin_name)).await,
    );
    let got = as_admin.get(a).await.unwrap();
    assert_eq!(annotations(&got).get("unwedge.io/by"), Some(&admin_name));
    refused(
        "admin rewrites by to someone else under an existing approve",
        as_admin
            .patch(
                a,
                &patch,
                &merge(json!({"metadata": {"annotations": {"unwedge.io/by": "alice"}}})),
            )
            .await,
        BY_POLICY,
        "unwedge.io/by",
    );
    // With a human's approval on it, the agent still edits the rest of its own wedge, but
    // cannot take the approval away.
    accepted(
        "agent A annotates its approved wedge",
        as_a.patch(
            a,
            &patch,
            &merge(json!({"metadata": {"annotations": {"note": "acting"}}})),
        )
        .await,
    );
    refused(
        "agent A removes the human's approval",
        as_a.patch(
            a,
            &patch,
            &merge(json!({"metadata": {"annotations": {"unwedge.io/approve": null}}})),
        )
        .await,
        AGENT_POLICY,
        "unwedge.io/approve",
    );
    accepted(
        "admin sets retry as itself",
        as_admin.patch(a, &patch, &merge(json!({"metadata": {"annotations": {"unwedge.io/retry": "1", "unwedge.io/by": admin_name}}}))).await,
    );

    // At most one default RecoveryPolicy. The chart's default comes from its ConfigMap, applied
    // as the operator applies it at start (no operator runs here): server-side, as
    // unwedge-default-policy, retried while the admission policy's parameters sync.
    let policies: Api<RecoveryPolicy> = Api::all(admin.clone());
    let cm: k8s_openapi::api::core::v1::ConfigMap = Api::namespaced(admin.clone(), NS)
        .get("unwedge-default-policy")
        .await
        .unwrap();
    let chart_default: Value = serde_json::from_str(
        cm.data
            .as_ref()
            .and_then(|d| d.get("policy.json"))
            .expect("the chart renders policy.json"),
    )
    .unwrap();
    let deadline = Instant::now() + ENFORCEMENT_TIMEOUT;
    loop {
        match policies
            .patch(
                "default",
                &PatchParams::apply("unwedge-default-policy"),
                &Patch::Apply(&chart_default),
            )
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("the default policy is not applied yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("the chart's default policy is refused: {e}"),
        }
    }
    let policy = |name: &str, default: bool| -> RecoveryPolicy {
        serde_json::from_value(
            json!({"apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
            "metadata": {"name": name}, "spec": {"default": default}}),
        )
        .unwrap()
    };
    assert!(
        policies.get("default").await.unwrap().spec.default,
        "the chart's default policy"
    );
    let second = policy("second-default", true);
    until_enforced(
        "a second default policy",
        DEFAULT_POLICY,
        || policies.create(&pp, &second),
        || async {
            let _ = policies
                .delete("second-default", &DeleteParams::default())
                .await;
        },
    )
    .await;
    refused(
        "a second default policy",
        policies.create(&pp, &policy("second-default", true)).await,
        DEFAULT_POLICY,
        "default is already the default",
    );
    accepted(
        "a non-default policy",
        policies.create(&pp, &policy("gpu-pool-1", false)).await,
    );
    refused(
        "turning a second policy into a default",
        policies
            .patch(
                "gpu-pool-1",
                &patch,
                &merge(json!({"spec": {"default": true}})),
            )
            .await,
        DEFAULT_POLICY,
        "default is already the default",
    );
    accepted(
        "the default policy itself can change",
        policies
            .patch(
                "default",
                &patch,
                &merge(json!({"spec": {"maxUnavailable": 2}})),
            )
            .await,
    );

    // Finally each agent deletes its own wedge; node B's was never touched by node A.
    accepted(
        "agent B deletes its own wedge",
        as_b.delete(b, &DeleteParams::default()).await,
    );
    accepted(
        "agent A deletes its own wedge",
        as_a.delete(a, &DeleteParams::default()).await,
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_policies_confine_agents_and_prove_who_approved() {
    tokio::time::timeout(Duration::from_secs(420), scenario())
        .await
        .expect("test timed out");
}
