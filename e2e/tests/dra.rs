//! DRA quarantine on the real 1.37.2 control plane (docs/design.md §5 "On DRA clusters", issue 16):
//! kwok nodes publish 8 GPUs in a ResourceSlice, the real kube-scheduler allocates
//! ResourceClaims, the real `unwedge-operator` with the chart's RBAC for `dra.enabled=true`
//! (and the `--dra=on` it renders) quarantines the wedged device with a DeviceTaintRule and
//! evicts the pods of its claims. Last, with the DRA rights taken away and `--dra=auto`, a
//! wedged DRA device cordons its node instead, and the wedge and the policy say why.
//!
//! The agent side is a scripted stand-in that writes exactly what the agent writes: the
//! GpuWedge from `reporter::build_wedge` with `spec.device.dra` set, the agent status patch,
//! then the attempt records (Started, Succeeded) of the approval protocol. (kwok nodes have
//! no sysfs and no kubelet, so the real agent would have nothing to rebind.)
//!
//! `cargo build -p unwedge-operator -p unwedge-agent -p e2e --bins && cargo test -p e2e --test dra`

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::api::resource::v1::DeviceTaintRule;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use unwedge_agent::reporter::{DetectedWedge, agent_status_patch, build_wedge};
use unwedge_crds::{DeviceRef, DraDeviceRef, GpuWedge, Phase, RecoveryPolicy};

use e2e::cluster::ControlPlane;
use e2e::dra_fixture::{self as dra, DRIVER, apply_yaml, cordon_watch, create};
use e2e::fleet::{Bins, Fleet};
use e2e::wait::until;

const NS: &str = "ml";
const T: Duration = Duration::from_secs(90);

fn pci(node_idx: u8, dev: u8) -> String {
    format!("0000:{:02x}:{:02x}.0", 0x10 + node_idx, dev)
}

/// A kwok node with one ResourceSlice of 8 GPUs, each with a distinct pciBusID.
async fn gpu_node(cp: &ControlPlane, client: &Client, name: &str, idx: u8) -> anyhow::Result<()> {
    cp.add_kwok_node(name, &[("unwedge.io/gpu", "true")], &[])
        .await?;
    let pcis: Vec<String> = (0..8).map(|i| pci(idx, i)).collect();
    dra::publish(client, name, &pcis).await
}

async fn gpu_pod(
    client: &Client,
    name: &str,
    node: &str,
    shared: Option<&str>,
    labels: serde_json::Value,
) -> anyhow::Result<Pod> {
    dra::gpu_pod(client, NS, name, node, shared, labels).await
}

async fn exists(client: &Client, pod: &str) -> anyhow::Result<bool> {
    dra::exists(client, NS, pod).await
}

async fn device_of(client: &Client, pod: &str) -> anyhow::Result<Option<String>> {
    dra::device_of(client, NS, pod).await
}

async fn wait_devices(
    client: &Client,
    pods: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    dra::wait_devices(client, NS, pods, T).await
}

/// Creates the GpuWedge exactly as the agent reports it (object, then agent status), naming
/// DRA device `device` of the node's own pool.
async fn report_wedge(
    client: &Client,
    node: &str,
    pci_addr: &str,
    device: &str,
    seq: u64,
) -> anyhow::Result<String> {
    report_wedge_in_pool(client, node, node, pci_addr, device, seq).await
}

/// Like [`report_wedge`], naming a device of DRA pool `pool` (another node's, for a lie).
async fn report_wedge_in_pool(
    client: &Client,
    node: &str,
    pool: &str,
    pci_addr: &str,
    device: &str,
    seq: u64,
) -> anyhow::Result<String> {
    let device = DeviceRef {
        pci_address: pci_addr.into(),
        card: Some("card3".into()),
        driver: "xe".into(),
        dra: Some(DraDeviceRef {
            driver: DRIVER.into(),
            pool: pool.into(),
            device: device.into(),
        }),
        ..DeviceRef::default()
    };
    let now = jiff::Timestamp::now();
    let d = DetectedWedge::from_uevent(node, device, "rebind,bus-reset", Some(seq), now, "boot-1");
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
    dra::rules_of(client, wedge).await
}

/// The default RecoveryPolicy: one quarantined device at a time.
const POLICY: &str = r#"
apiVersion: unwedge.io/v1alpha1
kind: RecoveryPolicy
metadata: {name: default}
spec:
  default: true
  maxUnavailableDevices: 1
  drain: {timeout: 10m}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dra_quarantine_on_the_real_control_plane() -> anyhow::Result<()> {
    let bins = Bins::build()?;
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let client = cp.client().await?;
    // The chart's own RBAC with DRA on: the operator runs with the --dra it renders.
    let mut fleet = Fleet::with_chart_values(&cp, bins, &["dra.enabled=true"]).await?;
    anyhow::ensure!(
        fleet.identities() == "chart",
        "the DRA rights must come from the chart, not the harness: {}",
        fleet.identities()
    );
    dra::setup(&cp, &client, NS).await?;
    apply_yaml(&cp, "dra-policy.yaml", POLICY).await?;
    let cordoned = cordon_watch(&client);
    let mut r = scenarios(&cp, &client, &mut fleet, &cordoned).await;
    if r.is_ok() {
        r = without_rights(&cp, &client, &mut fleet).await;
    }
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
    let uids = dra::uids(client, NS, &pods).await?;
    fleet.start_operators(cp, 1).await?;
    // The chart's RBAC holds every right quarantine uses: the operator says so on the policy.
    until(
        "DeviceQuarantine=True (Enabled) on the policy",
        T,
        || async {
            Ok(quarantine_condition(client)
                .await?
                .filter(|(st, reason, _)| st == "True" && reason == "Enabled"))
        },
    )
    .await?;
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

    // A person deletes the rule mid-recovery: it is made again, and a Warning says so.
    let rules: Api<DeviceTaintRule> = Api::all(client.clone());
    let first_rule = our_rules(client, &wedge).await?[0].name_any();
    rules.delete(&first_rule, &Default::default()).await?;
    until("the DeviceTaintRule made again", T, || async {
        Ok(our_rules(client, &wedge)
            .await?
            .into_iter()
            .find(|r| r.uid() != rule.uid()))
    })
    .await?;
    until("a Requarantined Event on the wedge", T, || async {
        let evs = Api::<k8s_openapi::api::core::v1::Event>::all(client.clone())
            .list(
                &kube::api::ListParams::default()
                    .fields(&format!("involvedObject.name={wedge},reason=Requarantined")),
            )
            .await?;
        Ok(evs
            .items
            .into_iter()
            .find(|e| e.type_.as_deref() == Some("Warning")))
    })
    .await?;

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
    dra::shared_claim(client, NS, "shared").await?;
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
        NS,
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

    // ---- 4. a wedge of dra-c naming a device of dra-b (a lying node): never quarantined; its
    // own node is cordoned instead; deleting the wedge lifts that cordon ----
    let lie = report_wedge_in_pool(client, "dra-c", "dra-b", &pci(2, 5), "gpu-5", 400).await?;
    until("dra-c cordoned for the lying wedge", T, || async {
        let n: Node = Api::all(client.clone()).get("dra-c").await?;
        Ok((n.annotations().get("unwedge.io/cordoned-by") == Some(&lie)).then_some(()))
    })
    .await?;
    assert!(
        our_rules(client, &lie).await?.is_empty(),
        "a DeviceTaintRule was made for another node's device"
    );
    let dra_b: Node = Api::all(client.clone()).get("dra-b").await?;
    assert!(
        !dra_b.spec.and_then(|s| s.unschedulable).unwrap_or(false),
        "dra-b was cordoned by a wedge of dra-c"
    );
    let events: Api<Event> = Api::all(client.clone());
    until(
        "an Event DraDeviceNotOnNode on the lying wedge",
        T,
        || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("DraDeviceNotOnNode")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(lie.as_str())
                })
                .and_then(|e| e.note))
        },
    )
    .await?;
    Api::<GpuWedge>::all(client.clone())
        .delete(&lie, &DeleteParams::default())
        .await?;
    until(
        "dra-c uncordoned once the lying wedge is deleted",
        T,
        || async {
            let n: Node = Api::all(client.clone()).get("dra-c").await?;
            Ok((!n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
                && !n.annotations().contains_key("unwedge.io/cordoned-by"))
            .then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// The `DeviceQuarantine` condition of the default policy: status, reason, message.
async fn quarantine_condition(client: &Client) -> anyhow::Result<Option<(String, String, String)>> {
    let p = Api::<RecoveryPolicy>::all(client.clone())
        .get("default")
        .await?;
    Ok(p.status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "DeviceQuarantine")
        .map(|c| (c.status, c.reason, c.message)))
}

/// ---- 4. `--dra=auto` without the DRA rights (the chart rendered without DRA on a cluster
/// that serves DeviceTaintRules): a wedged DRA device cordons its node as on a device-plugin
/// node, the wedge and the policy say why, and the recovery completes and uncordons.
async fn without_rights(
    cp: &ControlPlane,
    client: &Client,
    fleet: &mut Fleet,
) -> anyhow::Result<()> {
    fleet.stop();
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let mut role = roles.get("unwedge-operator").await?;
    let dra_rule = |r: &PolicyRule| {
        r.api_groups
            .iter()
            .flatten()
            .any(|g| g == "resource.k8s.io")
    };
    role.rules = role
        .rules
        .map(|rs| rs.into_iter().filter(|r| !dra_rule(r)).collect());
    roles
        .replace("unwedge-operator", &PostParams::default(), &role)
        .await?;
    fleet.set_operator_dra("auto");
    fleet.start_operators(cp, 1).await?;
    let (_, reason, message) = until("DeviceQuarantine=False on the policy", T, || async {
        Ok(quarantine_condition(client)
            .await?
            .filter(|(st, _, _)| st == "False"))
    })
    .await?;
    eprintln!("DeviceQuarantine=False {reason}: {message}");
    assert_eq!(reason, "MissingRights", "{message}");
    assert!(
        message.contains("may not get devicetaintrules, create devicetaintrules"),
        "the condition names the missing rights: {message}"
    );

    gpu_node(cp, client, "dra-d", 3).await?;
    gpu_pod(client, "d0", "dra-d", None, json!({})).await?;
    let ddev = wait_devices(client, &["d0".to_string()]).await?["d0"].clone();
    let didx: u8 = ddev.trim_start_matches("gpu-").parse()?;
    let wedge = report_wedge(client, "dra-d", &pci(3, didx), &ddev, 400).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    until("node dra-d cordoned instead", T, || async {
        let n = nodes.get("dra-d").await?;
        Ok(n.spec
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
            .then_some(()))
    })
    .await?;
    let events: Api<Event> = Api::all(client.clone());
    let note = until(
        "the QuarantineUnavailable event on the wedge",
        T,
        || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("QuarantineUnavailable")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(wedge.as_str())
                })
                .and_then(|e| e.note))
        },
    )
    .await?;
    eprintln!("QuarantineUnavailable on {wedge}: {note}");
    assert!(
        note.contains(&format!("{DRIVER}/dra-d/{ddev}")) && note.contains("MissingRights"),
        "the event names the device and why: {note}"
    );
    assert!(
        our_rules(client, &wedge).await?.is_empty(),
        "no DeviceTaintRule without the rights"
    );
    agent_acts(client, &wedge, true).await?;
    until("the wedge Recovered and dra-d uncordoned", T, || async {
        let schedulable = !nodes
            .get("dra-d")
            .await?
            .spec
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        Ok((phase(client, &wedge).await? == Some(Phase::Recovered) && schedulable).then_some(()))
    })
    .await?;
    Ok(())
}
