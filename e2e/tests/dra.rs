//! DRA quarantine on the real 1.37.2 control plane (DESIGN §5 "On DRA clusters", issue 16):
//! kwok nodes publish 8 GPUs in a ResourceSlice, the real kube-scheduler allocates
//! ResourceClaims, the real `unwedge-operator` (`--dra=on`) quarantines the wedged
//! device with a DeviceTaintRule and evicts the pods of its claims.
//!
//! The agent side is a scripted stand-in that writes exactly what the agent writes: the
//! GpuWedge from `reporter::build_wedge` with `spec.device.dra` set, the agent status patch,
//! then the attempt records (Started, Succeeded) of the approval protocol. (kwok nodes have
//! no sysfs and no kubelet, so the real agent would have nothing to rebind.)
//!
//! `cargo build -p unwedge-operator -p unwedge-agent -p e2e --bins && cargo test -p e2e --test dra`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::resource::v1::{DeviceTaintRule, ResourceClaim};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use unwedge_agent::reporter::{DetectedWedge, Source, agent_status_patch, build_wedge};
use unwedge_crds::{DeviceRef, DraDeviceRef, GpuWedge, Phase};

use e2e::cluster::ControlPlane;
use e2e::fleet::{Bins, Fleet};

const DRIVER: &str = "gpu.e2e.unwedge.io";
const NS: &str = "ml";
const T: Duration = Duration::from_secs(90);

fn pci(node_idx: u8, dev: u8) -> String {
    format!("0000:{:02x}:{:02x}.0", 0x10 + node_idx, dev)
}

async fn create<K>(client: &Client, ns: Option<&str>, v: serde_json::Value) -> anyhow::Result<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let obj: K = serde_json::from_value(v)?;
    let api: Api<K> = Api::namespaced(client.clone(), ns.unwrap_or(NS));
    Ok(api.create(&PostParams::default(), &obj).await?)
}

async fn apply_yaml(cp: &ControlPlane, name: &str, yaml: &str) -> anyhow::Result<()> {
    let f = cp.work_dir().join(name);
    std::fs::write(&f, yaml)?;
    cp.apply_yaml_file(&f).await?;
    Ok(())
}

/// Polls `f` every 250 ms until it returns `Some`, or fails naming `what`.
async fn until<F, Fut, R>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<R>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<R>>>,
{
    let start = Instant::now();
    loop {
        if let Some(r) = f().await? {
            return Ok(r);
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A kwok node with one ResourceSlice of 8 GPUs, each with a distinct pciBusID.
async fn gpu_node(cp: &ControlPlane, client: &Client, name: &str, idx: u8) -> anyhow::Result<()> {
    cp.add_kwok_node(name, &[("unwedge.io/gpu", "true")], &[])
        .await?;
    let devices: Vec<serde_json::Value> = (0..8)
        .map(|i| json!({"name": format!("gpu-{i}"), "attributes": {"resource.kubernetes.io/pciBusID": {"string": pci(idx, i)}}}))
        .collect();
    let slice: k8s_openapi::api::resource::v1::ResourceSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-gpus")},
        "spec": {"driver": DRIVER, "nodeName": name,
                 "pool": {"name": name, "generation": 1, "resourceSliceCount": 1},
                 "devices": devices}
    }))?;
    Api::all(client.clone())
        .create(&PostParams::default(), &slice)
        .await?;
    Ok(())
}

/// A pod on `node` with a claim from the `gpu` template (or the named shared claim).
async fn gpu_pod(
    client: &Client,
    name: &str,
    node: &str,
    shared: Option<&str>,
    labels: serde_json::Value,
) -> anyhow::Result<Pod> {
    let claim = match shared {
        Some(c) => json!({"name": "gpu", "resourceClaimName": c}),
        None => json!({"name": "gpu", "resourceClaimTemplateName": "gpu"}),
    };
    create(client, None, json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 0,
            "resourceClaims": [claim],
            "containers": [{"name": "main", "image": "gpu-workload:e2e", "resources": {"claims": [{"name": "gpu"}]}}]
        }
    }))
    .await
}

/// The device allocated to a running pod's claim, once the pod runs.
async fn device_of(client: &Client, pod: &str) -> anyhow::Result<Option<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let Some(p) = pods.get_opt(pod).await? else {
        return Ok(None);
    };
    let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let claim = p
        .status
        .as_ref()
        .and_then(|s| s.resource_claim_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.resource_claim_name.clone())
        .or_else(|| {
            p.spec
                .as_ref()?
                .resource_claims
                .as_ref()?
                .first()?
                .resource_claim_name
                .clone()
        });
    let (true, Some(claim)) = (running, claim) else {
        return Ok(None);
    };
    let c = Api::<ResourceClaim>::namespaced(client.clone(), NS)
        .get(&claim)
        .await?;
    Ok(c.status
        .and_then(|s| s.allocation)
        .and_then(|a| a.devices)
        .and_then(|d| d.results)
        .and_then(|r| r.first().map(|r| r.device.clone())))
}

async fn wait_devices(
    client: &Client,
    pods: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pods {
        let d = until(
            &format!("pod {p} running with an allocated device"),
            T,
            || device_of(client, p),
        )
        .await?;
        out.insert(p.clone(), d);
    }
    Ok(out)
}

/// Creates the GpuWedge exactly as the agent reports it (object, then agent status).
async fn report_wedge(
    client: &Client,
    node: &str,
    pci_addr: &str,
    device: &str,
    seq: u64,
) -> anyhow::Result<String> {
    let d = DetectedWedge {
        node: node.into(),
        device: DeviceRef {
            pci_address: pci_addr.into(),
            card: Some("card3".into()),
            driver: "xe".into(),
            dra: Some(DraDeviceRef {
                driver: DRIVER.into(),
                pool: node.into(),
                device: device.into(),
            }),
            ..DeviceRef::default()
        },
        methods: vec!["rebind".into(), "bus-reset".into()],
        detected_at: jiff::Timestamp::now(),
        boot_id: "boot-1".into(),
        uevent: BTreeMap::from([
            ("WEDGED".to_string(), "rebind,bus-reset".to_string()),
            ("SEQNUM".to_string(), seq.to_string()),
        ]),
        seqnum: Some(seq),
        blamed: None,
        consumers: vec![],
        reset_domain: vec![],
        agent_message: None,
        source: Source::Uevent,
    };
    let name = d.name();
    let api: Api<GpuWedge> = Api::all(client.clone());
    api.create(&PostParams::default(), &build_wedge(&d, &name, None))
        .await?;
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(agent_status_patch(&d)),
    )
    .await?;
    Ok(name)
}

/// The agent's part of the approval protocol: Started for the approved attempt, and when
/// `finish`, Succeeded.
async fn agent_acts(client: &Client, wedge: &str, finish: bool) -> anyhow::Result<()> {
    let api: Api<GpuWedge> = Api::all(client.clone());
    let appr = until(&format!("an approval on {wedge}"), T, || {
        let api = api.clone();
        async move { Ok(api.get(wedge).await?.status.and_then(|s| s.approval)) }
    })
    .await?;
    let now = jiff::Timestamp::now();
    let mut rec = json!({"attempt": appr.attempt, "method": appr.method, "result": "Started", "startedAt": now, "message": "", "bootId": "boot-1"});
    api.patch_status(
        wedge,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"attempts": [rec.clone()]}})),
    )
    .await?;
    if finish {
        rec["result"] = json!("Succeeded");
        rec["finishedAt"] = json!(jiff::Timestamp::now());
        rec["message"] = json!("rebound (stand-in)");
        api.patch_status(
            wedge,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"attempts": [rec]}})),
        )
        .await?;
    }
    Ok(())
}

async fn phase(client: &Client, wedge: &str) -> anyhow::Result<Option<Phase>> {
    Ok(Api::<GpuWedge>::all(client.clone())
        .get(wedge)
        .await?
        .status
        .and_then(|s| s.phase))
}

async fn our_rules(client: &Client, wedge: &str) -> anyhow::Result<Vec<DeviceTaintRule>> {
    let lp = ListParams::default().labels(&format!("unwedge.io/wedge={wedge}"));
    Ok(Api::<DeviceTaintRule>::all(client.clone())
        .list(&lp)
        .await?
        .items)
}

async fn exists(client: &Client, pod: &str) -> anyhow::Result<bool> {
    Ok(Api::<Pod>::namespaced(client.clone(), NS)
        .get_opt(pod)
        .await?
        .is_some_and(|p| p.metadata.deletion_timestamp.is_none()))
}

/// Watches every change of the nodes: set when any node is ever unschedulable.
fn cordon_watch(client: &Client) -> Arc<AtomicBool> {
    let seen = Arc::new(AtomicBool::new(false));
    let s = seen.clone();
    let api: Api<Node> = Api::all(client.clone());
    tokio::spawn(async move {
        let mut st = kube::runtime::watcher(api, kube::runtime::watcher::Config::default()).boxed();
        while let Some(ev) = st.next().await {
            if let Ok(
                kube::runtime::watcher::Event::Apply(n)
                | kube::runtime::watcher::Event::InitApply(n),
            ) = ev
                && n.spec.and_then(|s| s.unschedulable).unwrap_or(false)
            {
                s.store(true, Ordering::SeqCst);
            }
        }
    });
    seen
}

const DRA_SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ml}
---
apiVersion: resource.k8s.io/v1
kind: DeviceClass
metadata: {name: gpu.e2e.unwedge.io}
spec:
  selectors:
  - cel: {expression: 'device.driver == "gpu.e2e.unwedge.io"'}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: unwedge-operator-dra-e2e}
rules:
- apiGroups: [resource.k8s.io]
  resources: [resourceslices, resourceclaims]
  verbs: [get, list, watch]
- apiGroups: [resource.k8s.io]
  resources: [devicetaintrules]
  verbs: [get, list, watch, create, update, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: unwedge-operator-dra-e2e}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: unwedge-operator-dra-e2e}
subjects: [{kind: ServiceAccount, name: unwedge-operator, namespace: unwedge-system}]
---
apiVersion: unwedge.io/v1alpha1
kind: RecoveryPolicy
metadata: {name: default}
spec:
  default: true
  maxUnavailableDevices: 1
  drain: {timeout: 10m}
"#;

const TEMPLATE: &str = r#"
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: gpu, namespace: ml}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: {deviceClassName: gpu.e2e.unwedge.io}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_quarantine_on_the_real_control_plane() -> anyhow::Result<()> {
    let bins = Bins::build()?;
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let client = cp.client().await?;
    let mut fleet = Fleet::new(&cp, bins).await?;
    apply_yaml(&cp, "dra-setup.yaml", DRA_SETUP).await?;
    until("the ml namespace's default ServiceAccount", T, || {
        let c = client.clone();
        async move {
            Ok(
                Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c, NS)
                    .get_opt("default")
                    .await?,
            )
        }
    })
    .await?;
    apply_yaml(&cp, "dra-template.yaml", TEMPLATE).await?;
    let cordoned = cordon_watch(&client);
    let r = scenarios(&cp, &client, &mut fleet, &cordoned).await;
    if r.is_err() {
        eprintln!("{}\n{}", fleet.operator_logs(60), cp.log_tails(20));
    }
    fleet.stop();
    r
}

async fn scenarios(
    cp: &ControlPlane,
    client: &Client,
    fleet: &mut Fleet,
    cordoned: &AtomicBool,
) -> anyhow::Result<()> {
    // ---- 1. one pod per claim: exactly the wedged device's pod goes, the node keeps serving ----
    gpu_node(cp, client, "dra-a", 0).await?;
    let pods: Vec<String> = (0..6).map(|i| format!("a{i}")).collect();
    for p in &pods {
        gpu_pod(client, p, "dra-a", None, json!({})).await?;
    }
    let devs = wait_devices(client, &pods).await?;
    let distinct: std::collections::BTreeSet<&String> = devs.values().collect();
    assert_eq!(
        distinct.len(),
        6,
        "the scheduler gave 6 distinct devices: {devs:?}"
    );
    let uids: BTreeMap<String, String> = {
        let api: Api<Pod> = Api::namespaced(client.clone(), NS);
        let mut m = BTreeMap::new();
        for p in &pods {
            m.insert(p.clone(), api.get(p).await?.uid().unwrap_or_default());
        }
        m
    };
    // This test grants the operator the DRA rights itself (the fleet renders the chart without
    // DRA), so it turns quarantine on explicitly.
    fleet.set_operator_dra("on");
    fleet.start_operators(cp, 1).await?;
    let victim = "a2";
    let dev = devs[victim].clone();
    let idx: u8 = dev.trim_start_matches("gpu-").parse()?;
    let wedged_at = Instant::now();
    let wedge = report_wedge(client, "dra-a", &pci(0, idx), &dev, 100).await?;
    until("the DeviceTaintRule", T, || async {
        Ok(our_rules(client, &wedge).await?.into_iter().next())
    })
    .await?;
    let quarantined_in = wedged_at.elapsed();
    until(&format!("pod {victim} evicted"), T, || async {
        Ok((!exists(client, victim).await?).then_some(()))
    })
    .await?;
    agent_acts(client, &wedge, false).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), NS);
    for p in pods.iter().filter(|p| *p != victim) {
        let now = api.get(p).await?;
        assert_eq!(
            now.uid().unwrap_or_default(),
            uids[p],
            "pod {p} of another device was touched"
        );
        assert!(
            now.metadata.deletion_timestamp.is_none(),
            "pod {p} of another device is terminating"
        );
    }
    let rule = &our_rules(client, &wedge).await?[0];
    let sel = rule.spec.device_selector.clone().unwrap_or_default();
    assert_eq!(
        (
            sel.driver.as_deref(),
            sel.pool.as_deref(),
            sel.device.as_deref()
        ),
        (Some(DRIVER), Some("dra-a"), Some(dev.as_str()))
    );
    assert_eq!(
        (
            rule.spec.taint.key.as_str(),
            rule.spec.taint.effect.as_str()
        ),
        ("unwedge.io/wedged", "NoSchedule")
    );

    // Three new GPU pods: two get the free devices, never the wedged one; the third waits.
    let new: Vec<String> = (0..3).map(|i| format!("n{i}")).collect();
    let asked = Instant::now();
    for p in &new {
        gpu_pod(client, p, "dra-a", None, json!({})).await?;
    }
    let first = until("a first new pod allocated", T, || async {
        for p in &new {
            if device_of(client, p).await?.is_some() {
                return Ok(Some(asked.elapsed()));
            }
        }
        Ok(None)
    })
    .await?;
    until("two of the new pods running", T, || async {
        let mut n = 0;
        for p in &new {
            if device_of(client, p).await?.is_some() {
                n += 1;
            }
        }
        Ok((n >= 2).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut pending = None;
    for p in &new {
        match device_of(client, p).await? {
            Some(d) => assert_ne!(d, dev, "pod {p} was given the quarantined device"),
            None => pending = Some(p.clone()),
        }
    }
    let pending = pending.context("one new pod stays Pending while the rule exists")?;
    assert!(!cordoned.load(Ordering::SeqCst), "the node was cordoned");
    let node: Node = Api::all(client.clone()).get("dra-a").await?;
    assert!(!node.annotations().contains_key("unwedge.io/cordoned-by"));
    eprintln!(
        "DRA numbers: devices allocatable on dra-a while the wedge is open: 7 of 8 (1 tainted); \
         quarantine in {quarantined_in:?} after the GpuWedge; first new allocation {first:?} after the pods were created; \
         running pods untouched: 5 of 5"
    );

    // Recovery: the rule goes, the Pending pod gets the recovered device.
    agent_acts(client, &wedge, true).await?;
    until("the wedge Recovered", T, || async {
        Ok((phase(client, &wedge).await? == Some(Phase::Recovered)).then_some(()))
    })
    .await?;
    until("the DeviceTaintRule deleted", T, || async {
        Ok(our_rules(client, &wedge).await?.is_empty().then_some(()))
    })
    .await?;
    let got = until(&format!("pod {pending} allocated"), T, || {
        device_of(client, &pending)
    })
    .await?;
    assert_eq!(got, dev, "the Pending pod gets the recovered device");
    assert!(!cordoned.load(Ordering::SeqCst), "the node was cordoned");

    // ---- 2. a claim shared by two pods: both go, nothing else ----
    gpu_node(cp, client, "dra-b", 1).await?;
    create::<ResourceClaim>(client, None, json!({
        "metadata": {"name": "shared"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}}
    }))
    .await?;
    for p in ["s1", "s2"] {
        gpu_pod(client, p, "dra-b", Some("shared"), json!({})).await?;
    }
    for p in ["b0", "b1"] {
        gpu_pod(client, p, "dra-b", None, json!({})).await?;
    }
    let bdevs = wait_devices(client, &["s1", "s2", "b0", "b1"].map(String::from)).await?;
    assert_eq!(bdevs["s1"], bdevs["s2"], "one shared claim, one device");
    let sdev = bdevs["s1"].clone();
    let sidx: u8 = sdev.trim_start_matches("gpu-").parse()?;
    let wedge_b = report_wedge(client, "dra-b", &pci(1, sidx), &sdev, 200).await?;
    for p in ["s1", "s2"] {
        until(&format!("pod {p} evicted"), T, || async {
            Ok((!exists(client, p).await?).then_some(()))
        })
        .await?;
    }
    for p in ["b0", "b1"] {
        assert!(
            exists(client, p).await?,
            "pod {p} of another device was evicted"
        );
    }
    let ev = Api::<GpuWedge>::all(client.clone())
        .get(&wedge_b)
        .await?
        .status
        .and_then(|s| s.evictions)
        .unwrap_or_default();
    let mut names: Vec<&str> = ev.iter().map(|e| e.pod.as_str()).collect();
    names.sort();
    assert_eq!(names, ["s1", "s2"], "evictions recorded");
    agent_acts(client, &wedge_b, true).await?;
    until("wedge b Recovered, rule gone", T, || async {
        Ok((phase(client, &wedge_b).await? == Some(Phase::Recovered)
            && our_rules(client, &wedge_b).await?.is_empty())
        .then_some(()))
    })
    .await?;

    // ---- 3. a PDB holds the eviction, the taint stays; the operator dies between the rule and
    // the eviction; an admin's DeviceTaintRule is left alone ----
    gpu_node(cp, client, "dra-c", 2).await?;
    gpu_pod(client, "c0", "dra-c", None, json!({"app": "guarded"})).await?;
    let cdev = wait_devices(client, &["c0".to_string()]).await?["c0"].clone();
    let cidx: u8 = cdev.trim_start_matches("gpu-").parse()?;
    create::<PodDisruptionBudget>(
        client,
        None,
        json!({
            "metadata": {"name": "guarded"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}}
        }),
    )
    .await?;
    let admin: DeviceTaintRule = serde_json::from_value(json!({
        "metadata": {"name": "admin-maintenance"},
        "spec": {"deviceSelector": {"driver": DRIVER, "pool": "dra-c", "device": "gpu-7"},
                 "taint": {"key": "example.com/maintenance", "effect": "NoSchedule"}}
    }))?;
    let rules: Api<DeviceTaintRule> = Api::all(client.clone());
    let admin = rules.create(&PostParams::default(), &admin).await?;
    until("the PDB to allow no disruption", T, || async {
        let p = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
            .get("guarded")
            .await?;
        Ok((p
            .status
            .is_some_and(|s| s.expected_pods == Some(1) && s.disruptions_allowed == Some(0)))
        .then_some(()))
    })
    .await?;
    let wedge_c = report_wedge(client, "dra-c", &pci(2, cidx), &cdev, 300).await?;
    until("the DeviceTaintRule on dra-c", T, || async {
        Ok(our_rules(client, &wedge_c).await?.into_iter().next())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(exists(client, "c0").await?, "the PDB holds the eviction");
    assert_eq!(
        our_rules(client, &wedge_c).await?.len(),
        1,
        "the taint stays while the PDB holds"
    );
    fleet.kill_operator(0);
    fleet.start_operators(cp, 1).await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        our_rules(client, &wedge_c).await?.len(),
        1,
        "one rule after the restart"
    );
    assert!(
        exists(client, "c0").await?,
        "still held by the PDB after the restart"
    );
    Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
        .patch(
            "guarded",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minAvailable": 0}})),
        )
        .await?;
    until("pod c0 evicted once the PDB is relaxed", T, || async {
        Ok((!exists(client, "c0").await?).then_some(()))
    })
    .await?;
    agent_acts(client, &wedge_c, true).await?;
    until("wedge c Recovered, rule gone", T, || async {
        Ok((phase(client, &wedge_c).await? == Some(Phase::Recovered)
            && our_rules(client, &wedge_c).await?.is_empty())
        .then_some(()))
    })
    .await?;
    let ev = Api::<GpuWedge>::all(client.clone())
        .get(&wedge_c)
        .await?
        .status
        .and_then(|s| s.evictions)
        .unwrap_or_default();
    assert_eq!(
        ev.iter().filter(|e| e.pod == "c0").count(),
        1,
        "one eviction of c0: {ev:?}"
    );
    let still = rules.get("admin-maintenance").await?;
    // The controller-manager writes the rule's status; its generation, spec and labels are
    // what an owner would change.
    assert_eq!(
        (
            still.metadata.generation,
            &still.spec,
            still.metadata.labels.clone()
        ),
        (
            admin.metadata.generation,
            &admin.spec,
            admin.metadata.labels.clone()
        ),
        "the admin's rule was not touched"
    );
    assert!(!cordoned.load(Ordering::SeqCst), "a node was cordoned");
    rules
        .delete("admin-maintenance", &DeleteParams::default())
        .await?;
    Ok(())
}
