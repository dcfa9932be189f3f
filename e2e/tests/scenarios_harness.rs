//! The scenario harness itself, on the real local control plane, before any agent or operator
//! runs: a simulated node's PodResources answers follow the pods really bound to it; its
//! network namespace reaches the API server with the node's pod-bound token (the node claim
//! is in the token's user); and the recorder catches a budget overrun (invariant 1) and an
//! uncordon of a node unwedge did not cordon (invariant 3) — so its silence in the scenarios
//! means something.
//!
//! Needs root (network namespaces). `cargo test -p e2e --test scenarios_harness`.

use std::path::PathBuf;
use std::time::Duration;

use e2e::cluster::ControlPlane;
use e2e::fleet::{Bins, Fleet, NodeSpec};
use e2e::recorder::Recorder;
use hyper_util::rt::TokioIo;
use kube::api::{Api, Patch, PatchParams, PostParams};
use unwedge_agent::podresources::proto;
use unwedge_crds::gpuwedge::GpuWedge;

async fn list_pod_resources(socket: PathBuf) -> Vec<(String, Vec<String>)> {
    let channel = tonic::transport::Endpoint::try_from("http://kubelet.local")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect to the node's PodResources socket");
    let mut c = proto::pod_resources_lister_client::PodResourcesListerClient::new(channel);
    let r = c
        .list(proto::ListPodResourcesRequest {})
        .await
        .expect("List")
        .into_inner();
    let mut out: Vec<(String, Vec<String>)> = r
        .pod_resources
        .into_iter()
        .filter(|p| p.namespace == "w")
        .map(|p| {
            let ids = p
                .containers
                .into_iter()
                .flat_map(|c| c.devices)
                .flat_map(|d| d.device_ids)
                .collect();
            (format!("{}/{}", p.namespace, p.name), ids)
        })
        .collect();
    out.sort();
    out
}

async fn wait_list(socket: PathBuf, want: Vec<(String, Vec<String>)>) {
    let mut seen = vec![];
    for _ in 0..150 {
        seen = list_pod_resources(socket.clone()).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("PodResources List: expected {want:?}, seen {seen:?}");
}

fn wedge(name: &str, node: &str) -> GpuWedge {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "GpuWedge",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "device": {"pciAddress": "0000:03:00.0", "driver": "xe"},
                 "methods": ["rebind"], "detectedAt": "2026-11-26T00:00:00Z"}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_harness_on_the_real_control_plane() {
    let cp = ControlPlane::start()
        .await
        .expect("start the local control plane");
    cp.apply_crds().await.expect("CRDs");
    let bins = Bins {
        agent: "/nonexistent/unwedge-agent".into(),
        operator: "/nonexistent/unwedge-operator".into(),
        inject: Bins::build()
            .expect("the workspace binaries (`make bins` builds them)")
            .inject,
    };
    let mut fleet = Fleet::new(&cp, bins).await.expect("fleet identities");
    eprintln!("RBAC and admission from: {}", fleet.identities());
    for n in ["harness-a", "harness-b"] {
        fleet
            .add_node(&cp, NodeSpec::new(n, 2, "xe"), false)
            .await
            .expect("add node");
    }
    let client = fleet.client();
    let rec = Recorder::start(client.clone(), &[("harness", 1)])
        .await
        .expect("recorder");

    // PodResources follows the pods bound to the node: first-fit, pinned, and gone when deleted.
    cp.kubectl_ok(&["create", "namespace", "w"]).await.unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "w");
    let g = fleet
        .sim("harness-a")
        .sysfs
        .gpus()
        .iter()
        .map(|g| g.bdf.clone())
        .collect::<Vec<_>>();
    pods.create(
        &PostParams::default(),
        &e2e::fleet::gpu_pod("w", "pinned", "harness-a", 1, Some(&g[1])),
    )
    .await
    .unwrap();
    let socket = fleet.sim("harness-a").podres.socket().to_path_buf();
    wait_list(
        socket.clone(),
        vec![("w/pinned".into(), vec![g[1].clone()])],
    )
    .await;
    pods.create(
        &PostParams::default(),
        &e2e::fleet::gpu_pod("w", "first-fit", "harness-a", 1, None),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &e2e::fleet::gpu_pod("w", "elsewhere", "harness-b", 1, None),
    )
    .await
    .unwrap();
    wait_list(
        socket.clone(),
        vec![
            ("w/first-fit".into(), vec![g[0].clone()]),
            ("w/pinned".into(), vec![g[1].clone()]),
        ],
    )
    .await;
    pods.delete("pinned", &Default::default()).await.unwrap();
    wait_list(
        socket.clone(),
        vec![("w/first-fit".into(), vec![g[0].clone()])],
    )
    .await;

    // Inside the node's namespace, the API server answers on 127.0.0.1 and the token carries
    // the node claim of the agent pod it is bound to.
    let kubeconfig = fleet.sim("harness-a").dir.join("kubeconfig");
    let (prog, args) = fleet.sim("harness-a").netns.wrap(
        &cp.bin_dir().join("kubectl").display().to_string(),
        &[
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "auth".into(),
            "whoami".into(),
            "-o".into(),
            "json".into(),
        ],
    );
    let out = tokio::process::Command::new(prog)
        .args(args)
        .output()
        .await
        .unwrap();
    let who = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl auth whoami inside the namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        who.contains("system:serviceaccount:unwedge-system:unwedge-agent"),
        "whoami: {who}"
    );
    assert!(
        who.contains("harness-a") && !who.contains("harness-b"),
        "the node claim names harness-a: {who}"
    );

    // Invariant 1: two nodes cordoned by unwedge under a budget of 1 is caught.
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for n in ["harness-a", "harness-b"] {
        let w = wedges
            .create(
                &PostParams::default(),
                &wedge(&format!("{n}-0000-03-00-0-1"), n),
            )
            .await
            .unwrap();
        wedges
            .patch_status(
                &w.metadata.name.clone().unwrap(),
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"status": {"policy": "harness", "phase": "Cordoned"}}),
                ),
            )
            .await
            .unwrap();
        nodes
            .patch(
                n,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": {"annotations": {"unwedge.io/cordoned-by": format!("{n}-0000-03-00-0-1")}},
                    "spec": {"unschedulable": true}
                })),
            )
            .await
            .unwrap();
    }
    // Invariant 3: a node cordoned by someone else, then uncordoned.
    fleet
        .add_node(&cp, NodeSpec::new("harness-c", 1, "xe"), false)
        .await
        .unwrap();
    for u in [true, false] {
        nodes
            .patch(
                "harness-c",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"unschedulable": u}})),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut err = String::new();
    for _ in 0..50 {
        err = rec.check_invariants().err().unwrap_or_default();
        if err.contains("invariant 1") && err.contains("invariant 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        err.contains("invariant 1") && err.contains("policy harness has 2 nodes"),
        "recorder must catch the overrun: {err}"
    );
    assert!(
        err.contains("invariant 3") && err.contains("harness-c"),
        "recorder must catch the foreign uncordon: {err}"
    );
    assert_eq!(rec.peak("harness"), 2);
    fleet.stop();
}
