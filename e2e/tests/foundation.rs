//! The foundation against a real control plane (kube-apiserver, etcd, controller-manager,
//! scheduler, kwok): the CRDs are accepted, the API behaves as docs/design.md §3 says, every validation
//! rule refuses what it should with a clear message, and the harness itself works (kwok nodes,
//! the real scheduler, bound tokens, API server restarts).
//!
//! These tests never skip: if the binaries cannot be built, `ControlPlane::start` fails.

use std::time::Duration;

use e2e::cluster::ControlPlane;
use e2e::wait;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use serde_json::json;
use unwedge_crds::{DeviceRef, GpuWedge, GpuWedgeSpec, Phase, RecoveryPolicy};

fn wedge(name: &str, node: &str, pci: &str, methods: &[&str]) -> GpuWedge {
    let mut w = GpuWedge::new(
        name,
        GpuWedgeSpec {
            node_name: node.into(),
            device: DeviceRef {
                pci_address: pci.into(),
                card: Some("card0".into()),
                driver: "xe".into(),
                ..Default::default()
            },
            methods: methods.iter().map(|m| m.to_string()).collect(),
            detected_at: Time(jiff::Timestamp::now()),
            boot_id: "b0".into(),
            uevent: [("ACTION".to_string(), "change".to_string())].into(),
            blamed: None,
        },
    );
    w.metadata.labels = Some(
        [
            ("unwedge.io/node".to_string(), node.to_string()),
            (
                "unwedge.io/device".to_string(),
                unwedge_crds::labels::device_label(pci),
            ),
        ]
        .into(),
    );
    w
}

async fn started() -> ControlPlane {
    let t = std::time::Instant::now();
    let cp = ControlPlane::start()
        .await
        .expect("the local control plane must start (this test never skips)");
    eprintln!("control plane started in {:.1}s", t.elapsed().as_secs_f64());
    cp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpuwedge_api_on_a_real_api_server() {
    let cp = started().await;
    cp.apply_crds()
        .await
        .expect("the API server accepts the CRDs");
    let client = cp.client().await.unwrap();
    let api: Api<GpuWedge> = Api::all(client.clone());

    // Watch from the list's resourceVersion, so every later change shows up.
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = api
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();

    // Create; well-formed methods the kernel may add later are kept verbatim, in order.
    let name = "node-a-0000-03-00-0-4242";
    let w = wedge(
        name,
        "node-a",
        "0000:03:00.0",
        &["cold-reset", "warp-9", "rebind"],
    );
    api.create(&PostParams::default(), &w).await.unwrap();
    let got = api.get(name).await.unwrap();
    assert_eq!(got.spec.methods, ["cold-reset", "warp-9", "rebind"]);
    assert_eq!(got.spec.device.pci_address, "0000:03:00.0");

    // List by the shared labels.
    api.create(
        &PostParams::default(),
        &wedge("node-b-0000-04-00-0-7", "node-b", "0000:04:00.0", &["none"]),
    )
    .await
    .unwrap();
    let on_a = api
        .list(&ListParams::default().labels("unwedge.io/node=node-a"))
        .await
        .unwrap();
    let names: Vec<_> = on_a
        .items
        .iter()
        .map(|w| w.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, [name]);
    let by_device = api
        .list(&ListParams::default().labels("unwedge.io/device=0000-04-00.0"))
        .await
        .unwrap();
    assert_eq!(by_device.items.len(), 1);

    // Status through the subresource (a merge patch of the operator's part).
    let patched = api
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Cordoned", "methods": "cold-reset,warp-9,rebind", "action": "waiting: budget"
            }})),
        )
        .await
        .unwrap();
    let status = patched.status.unwrap();
    assert_eq!(status.phase, Some(Phase::Cordoned));
    assert_eq!(status.action.as_deref(), Some("waiting: budget"));
    // A status in the main resource is ignored (status subresource enabled).
    let spec_only = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Recovered"}})),
        )
        .await
        .unwrap();
    assert_eq!(spec_only.status.unwrap().phase, Some(Phase::Cordoned));

    // The watch saw the creation and the status change of our wedge.
    let mut seen_added = false;
    let mut seen_cordoned = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(seen_added && seen_cordoned) {
        let ev = tokio::time::timeout_at(deadline, events.try_next())
            .await
            .expect("watch events within 20s")
            .unwrap()
            .expect("the watch stays open");
        match ev {
            WatchEvent::Added(w) if w.metadata.name.as_deref() == Some(name) => seen_added = true,
            WatchEvent::Modified(w)
                if w.metadata.name.as_deref() == Some(name)
                    && w.status.as_ref().and_then(|s| s.phase) == Some(Phase::Cordoned) =>
            {
                seen_cordoned = true
            }
            WatchEvent::Error(e) => panic!("watch error: {e:?}"),
            _ => {}
        }
    }

    // kubectl prints the printer columns.
    let out = cp.kubectl_ok(&["get", "gw"]).await.unwrap();
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "NODE", "DEVICE", "DRIVER", "METHODS", "PHASE", "ACTION", "AGE"
        ],
        "{out}"
    );
    let row = out.lines().find(|l| l.starts_with(name)).expect(&out);
    for cell in [
        "node-a",
        "0000:03:00.0",
        "xe",
        "cold-reset,warp-9,rebind",
        "Cordoned",
        "waiting: budget",
    ] {
        assert!(row.contains(cell), "row lacks {cell:?}: {row}");
    }

    // kubectl explain shows the doc comments as field descriptions.
    let explain = cp.kubectl_ok(&["explain", "gpuwedge.spec"]).await.unwrap();
    for text in [
        "The node whose device is wedged",
        "The kernel's recovery methods from `WEDGED=`",
        "nodeName",
        "methods",
    ] {
        assert!(explain.contains(text), "explain lacks {text:?}:\n{explain}");
    }
    let explain = cp
        .kubectl_ok(&["explain", "recoverypolicy.spec.maxUnavailable"])
        .await
        .unwrap();
    assert!(explain.contains("percentage"), "{explain}");

    api.delete(name, &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt(name).await.unwrap().is_none());
    cp.stop().await;
}

/// The API server's refusal message for `what`, or a panic if it was accepted.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) -> String {
    match r {
        Ok(v) => panic!("{what}: accepted, but must be refused: {v:?}"),
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{what}: {e:?}");
            e.message
        }
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

/// A RecoveryPolicy as raw JSON, so that values the Rust type cannot hold reach the server.
fn policy(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_rules_refuse_bad_objects_with_clear_messages() {
    let cp = started().await;
    cp.apply_crds()
        .await
        .expect("the API server accepts the CRDs");
    let client = cp.client().await.unwrap();
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let typed_policies: Api<RecoveryPolicy> = Api::all(client.clone());
    let policies: Api<DynamicObject> =
        Api::all_with(client, &ApiResource::erase::<RecoveryPolicy>(&()));
    let pp = PostParams::default();

    // GpuWedge: PCI address format.
    for bad in ["0000:03:00", "03:00.0", "0000:03:00.8", "0000:0G:00.0"] {
        let msg = refused(
            bad,
            wedges
                .create(&pp, &wedge("w-pci", "n", bad, &["rebind"]))
                .await,
        );
        assert!(msg.contains("spec.device.pciAddress"), "{bad}: {msg}");
        assert!(msg.contains("should match"), "{bad}: {msg}");
    }
    // GpuWedge: method token syntax (never a list of names).
    for bad in ["Rebind", "bus_reset", "-x", "re bind", ""] {
        let msg = refused(
            bad,
            wedges
                .create(&pp, &wedge("w-m", "n", "0000:03:00.0", &["none", bad]))
                .await,
        );
        assert!(msg.contains("spec.methods[1]"), "{bad:?}: {msg}");
    }
    let msg = refused(
        "no methods",
        wedges
            .create(&pp, &wedge("w-e", "n", "0000:03:00.0", &[]))
            .await,
    );
    assert!(msg.contains("spec.methods"), "{msg}");

    // GpuWedge: spec is immutable after create; status and metadata stay writable.
    wedges
        .create(&pp, &wedge("w-ok", "n", "0000:03:00.0", &["bus-reset"]))
        .await
        .unwrap();
    for (field, patch) in [
        ("driver", json!({"spec": {"device": {"driver": "i915"}}})),
        ("methods", json!({"spec": {"methods": ["rebind"]}})),
        ("nodeName", json!({"spec": {"nodeName": "other"}})),
    ] {
        let msg = refused(
            field,
            wedges
                .patch("w-ok", &PatchParams::default(), &Patch::Merge(patch))
                .await,
        );
        assert!(msg.contains("spec is immutable"), "{field}: {msg}");
    }
    wedges
        .patch(
            "w-ok",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"unwedge.io/approve": ""}}})),
        )
        .await
        .expect("annotations stay writable");
    let msg = refused(
        "approval method",
        wedges
            .patch_status(
                "w-ok",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"approval": {
                    "method": "Bus_Reset", "attempt": 1, "at": "2026-01-01T00:00:00Z", "by": "x"}}})),
            )
            .await,
    );
    assert!(msg.contains("status.approval.method"), "{msg}");

    // RecoveryPolicy: a valid one is accepted, with unknown-but-well-formed methods.
    let good = policy(
        "good",
        json!({"nodeSelector": {"pool": "gpu"}, "maxUnavailable": "10%",
               "allowedMethods": ["rebind", "bus-reset", "cold-reset", "reboot"],
               "escalation": ["rebind", "cold-reset", "reboot"]}),
    );
    policies
        .create(&pp, &good)
        .await
        .expect("a valid policy is accepted");
    let stored = typed_policies.get("good").await.unwrap();
    assert_eq!(
        stored.spec.escalation.as_deref(),
        Some(&["rebind".to_string(), "cold-reset".into(), "reboot".into()][..])
    );
    policies
        .create(&pp, &policy("int", json!({"maxUnavailable": 3})))
        .await
        .expect("an integer maxUnavailable is accepted");

    for bad in [json!("150%"), json!("abc"), json!("10"), json!(-1)] {
        let msg = refused(
            &bad.to_string(),
            policies
                .create(&pp, &policy("mu", json!({"maxUnavailable": bad})))
                .await,
        );
        assert!(msg.contains("spec.maxUnavailable"), "{bad}: {msg}");
    }
    let msg = refused(
        "escalation outside allowedMethods",
        policies
            .create(
                &pp,
                &policy(
                    "esc",
                    json!({"allowedMethods": ["rebind"], "escalation": ["rebind", "reboot"]}),
                ),
            )
            .await,
    );
    assert!(
        msg.contains("every escalation rung must be in allowedMethods"),
        "{msg}"
    );
    let msg = refused(
        "default with nodeSelector",
        policies
            .create(
                &pp,
                &policy(
                    "def",
                    json!({"default": true, "nodeSelector": {"pool": "gpu"}}),
                ),
            )
            .await,
    );
    assert!(
        msg.contains("a default policy applies to nodes no other policy selects"),
        "{msg}"
    );
    policies
        .create(&pp, &policy("def", json!({"default": true})))
        .await
        .expect("a default policy without nodeSelector is accepted");
    let msg = refused(
        "bad rung token",
        policies
            .create(&pp, &policy("tok", json!({"escalation": ["Rebind"]})))
            .await,
    );
    assert!(msg.contains("spec.escalation[0]"), "{msg}");
    let msg = refused(
        "bad approval mode",
        policies
            .create(&pp, &policy("ap", json!({"approval": "Sometimes"})))
            .await,
    );
    assert!(msg.contains("spec.approval"), "{msg}");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kwok_nodes_scheduler_controllers_tokens_and_apiserver_restart() {
    let mut cp = started().await;
    let client = cp.client().await.unwrap();
    let node = cp
        .add_kwok_node("kwok-a", &[("pool", "gpu")], &[("example.com/gpu", "2")])
        .await
        .expect("kwok makes the node Ready");
    let alloc = node.status.unwrap().allocatable.unwrap();
    assert_eq!(alloc["example.com/gpu"].0, "2");
    assert_eq!(node.metadata.labels.unwrap()["pool"], "gpu");

    // The real scheduler binds a pod that asks for a GPU; kwok runs it.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sas.create(
        &PostParams::default(),
        &ServiceAccount {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu-user"},
        "spec": {"serviceAccountName": "agent", "nodeSelector": {"pool": "gpu"}, "containers": [{
            "name": "c", "image": "registry.invalid/none",
            "resources": {"limits": {"example.com/gpu": "1"}}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = wait::object(&pods, "gpu-user", "Running", Duration::from_secs(60), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
    .unwrap();
    assert_eq!(
        running.spec.as_ref().unwrap().node_name.as_deref(),
        Some("kwok-a")
    );
    let uid = running.metadata.uid.clone().unwrap();
    // A wait that times out says what it awaited and what it saw last.
    let never = wait::object(
        &pods,
        "gpu-user",
        "Succeeded",
        Duration::from_secs(2),
        |p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        never.starts_with(
            "timed out after 2s waiting for Pod gpu-user Succeeded; last seen: status "
        ) && never.contains(r#""phase":"Running""#),
        "{never}"
    );

    // The controller manager runs: a Deployment gets a ReplicaSet and running pods.
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "x"}]}}}
    }))
    .unwrap();
    deploys.create(&PostParams::default(), &d).await.unwrap();
    wait::object(
        &deploys,
        "web",
        "with 2 ready replicas",
        Duration::from_secs(60),
        |d| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2),
    )
    .await
    .unwrap();

    // A token bound to the pod carries the node's name; an unbound one does not.
    let bound = cp
        .create_token("default", "agent", Some(("gpu-user", &uid)))
        .await
        .unwrap();
    let review = ControlPlane::whoami(&cp.client_for_token(&bound).await.unwrap())
        .await
        .unwrap();
    let user = review.status.unwrap().user_info.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:default:agent")
    );
    let extra = user.extra.unwrap_or_default();
    assert_eq!(
        extra.get("authentication.kubernetes.io/node-name"),
        Some(&vec!["kwok-a".to_string()]),
        "{extra:?}"
    );
    let unbound = cp.create_token("default", "agent", None).await.unwrap();
    let review = ControlPlane::whoami(&cp.client_for_token(&unbound).await.unwrap())
        .await
        .unwrap();
    let extra = review
        .status
        .unwrap()
        .user_info
        .unwrap()
        .extra
        .unwrap_or_default();
    assert!(
        !extra.contains_key("authentication.kubernetes.io/node-name"),
        "{extra:?}"
    );
    let kubeconfig = cp.work_dir().join("agent.kubeconfig");
    cp.write_kubeconfig(&bound, &kubeconfig).unwrap();
    let out = cp
        .kubectl_ok(&[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "auth",
            "whoami",
            "-o",
            "json",
        ])
        .await
        .unwrap();
    assert!(out.contains("kwok-a"), "{out}");

    // The API server can be stopped and started again on the same port, certificates and data.
    cp.stop_apiserver().await;
    assert!(
        pods.get("gpu-user").await.is_err(),
        "the API server is down"
    );
    cp.start_apiserver().await.unwrap();
    let again = Api::<Pod>::namespaced(cp.client().await.unwrap(), "default")
        .get("gpu-user")
        .await
        .unwrap();
    assert_eq!(again.metadata.uid.as_deref(), Some(uid.as_str()));
    cp.restart_apiserver().await.unwrap();
    let client = cp.client().await.unwrap();
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(client)
        .get("kwok-a")
        .await
        .unwrap();
    assert_eq!(node.metadata.name.as_deref(), Some("kwok-a"));
    cp.stop().await;
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purposes (its parent has not reaped it yet).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().next() != Some("Z"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_no_process_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let cp = started().await;
        tx.send(cp.pids()).unwrap();
        panic!("deliberate panic while the control plane runs");
    });
    assert!(task.await.unwrap_err().is_panic());
    let pids = rx.recv().unwrap();
    assert_eq!(
        pids.len(),
        5,
        "etcd, apiserver, controller-manager, scheduler, kwok"
    );
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "still running after the panic: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_binary_serves_and_its_children_die_with_it() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cluster"))
        .arg("up")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let kubeconfig = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(path) = line.strip_prefix("export KUBECONFIG=") {
                return path.to_string();
            }
        }
        panic!("cluster up exited without printing the kubeconfig");
    })
    .await
    .expect("cluster up prints the kubeconfig");
    // The CRDs are served through the printed kubeconfig.
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let api: Api<GpuWedge> = Api::all(kube::Client::try_from(config).unwrap());
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // SIGKILL leaves no chance to clean up: PR_SET_PDEATHSIG must take the children down.
    let pid = child.id().unwrap();
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect();
    assert_eq!(children.len(), 5, "children of cluster up: {children:?}");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while children.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<u32> = children.into_iter().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "still running after SIGKILL of cluster up: {left:?}"
    );
}
