//! DRA on the local control plane (docs/design.md §5 "On DRA clusters"): a test DRA driver's
//! DeviceClass and ResourceClaimTemplate, a ResourceSlice of GPUs per kwok node (no kubelet
//! plugin needed: the real kube-scheduler allocates from the slice), pods with claims, and
//! what the scheduler allocated. Shared by `tests/dra.rs`, the demo (`--dra`) and `bench dra`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::resource::v1::{DeviceTaintRule, ResourceClaim, ResourceSlice};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::cluster::ControlPlane;
use crate::wait::until;

/// The test DRA driver (also the DeviceClass name).
pub const DRIVER: &str = "gpu.e2e.unwedge.io";
/// The ResourceClaimTemplate every GPU pod's claim comes from (one GPU of [`DRIVER`]).
pub const TEMPLATE: &str = "gpu";
/// The standard attribute holding a device's PCI address.
pub const PCI_ATTRIBUTE: &str = "resource.kubernetes.io/pciBusID";

/// The name of the `i`th device of a slice.
pub fn device_name(i: usize) -> String {
    format!("gpu-{i}")
}

/// Applies `yaml` (written to the control plane's work dir as `name`).
pub async fn apply_yaml(cp: &ControlPlane, name: &str, yaml: &str) -> anyhow::Result<()> {
    let f = cp.work_dir().join(name);
    std::fs::write(&f, yaml)?;
    cp.apply_yaml_file(&f).await?;
    Ok(())
}

/// Creates a namespaced object from JSON in `ns`.
pub async fn create<K>(client: &Client, ns: &str, v: serde_json::Value) -> anyhow::Result<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let obj: K = serde_json::from_value(v)?;
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api.create(&PostParams::default(), &obj).await?)
}

/// The namespace `ns`, the DeviceClass of [`DRIVER`] and the ResourceClaimTemplate
/// [`TEMPLATE`] in `ns`; returns once pods can be created there (its default ServiceAccount).
pub async fn setup(cp: &ControlPlane, client: &Client, ns: &str) -> anyhow::Result<()> {
    apply_yaml(
        cp,
        &format!("dra-class-{ns}.yaml"),
        &format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: resource.k8s.io/v1
kind: DeviceClass
metadata: {{name: {DRIVER}}}
spec:
  selectors:
  - cel: {{expression: 'device.driver == "{DRIVER}"'}}
"#
        ),
    )
    .await?;
    until(
        &format!("the {ns} namespace's default ServiceAccount"),
        Duration::from_secs(60),
        || {
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
            async move { Ok(api.get_opt("default").await?) }
        },
    )
    .await?;
    apply_yaml(
        cp,
        &format!("dra-template-{ns}.yaml"),
        &format!(
            r#"
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {{name: {TEMPLATE}, namespace: {ns}}}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: {{deviceClassName: {DRIVER}}}
"#
        ),
    )
    .await
}

/// The ResourceSlice of `node`: one device per PCI address (`gpu-0`, `gpu-1`, …), each with
/// [`PCI_ATTRIBUTE`]; the pool is named after the node.
pub fn slice(node: &str, pcis: &[String]) -> anyhow::Result<ResourceSlice> {
    let devices: Vec<serde_json::Value> = pcis
        .iter()
        .enumerate()
        .map(|(i, pci)| json!({"name": device_name(i), "attributes": {PCI_ATTRIBUTE: {"string": pci}}}))
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("{node}-gpus")},
        "spec": {"driver": DRIVER, "nodeName": node,
                 "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                 "devices": devices}
    }))?)
}

/// Publishes [`slice`] for `node` (what a DRA driver's kubelet plugin would do).
pub async fn publish(client: &Client, node: &str, pcis: &[String]) -> anyhow::Result<()> {
    Api::<ResourceSlice>::all(client.clone())
        .create(&PostParams::default(), &slice(node, pcis)?)
        .await?;
    Ok(())
}

/// A pod on `node` with one GPU claim: its own from [`TEMPLATE`], or the named `shared` one.
pub async fn gpu_pod(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    shared: Option<&str>,
    labels: serde_json::Value,
) -> anyhow::Result<Pod> {
    let claim = match shared {
        Some(c) => json!({"name": "gpu", "resourceClaimName": c}),
        None => json!({"name": "gpu", "resourceClaimTemplateName": TEMPLATE}),
    };
    create(client, ns, json!({
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

/// A pod on `node` whose own claim `name` asks for the device with PCI address `pci` (a CEL
/// selector on [`PCI_ATTRIBUTE`]), so which GPU it holds is known before the scheduler runs.
pub async fn pinned_gpu_pod(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    pci: &str,
) -> anyhow::Result<Pod> {
    let (domain, id) = PCI_ATTRIBUTE.split_once('/').unwrap_or_default();
    let cel = format!("device.attributes[\"{domain}\"].{id} == \"{pci}\"");
    create::<ResourceClaim>(
        client,
        ns,
        json!({
            "metadata": {"name": name},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
                "deviceClassName": DRIVER,
                "selectors": [{"cel": {"expression": cel}}]
            }}]}}
        }),
    )
    .await?;
    gpu_pod(client, ns, name, node, Some(name), json!({})).await
}

/// A pod on `node` without a GPU.
pub async fn plain_pod(client: &Client, ns: &str, name: &str, node: &str) -> anyhow::Result<Pod> {
    create(
        client,
        ns,
        json!({
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "main", "image": "cpu-workload:e2e"}]
            }
        }),
    )
    .await
}

/// A ResourceClaim `name` for one GPU, to be shared by several pods.
pub async fn shared_claim(client: &Client, ns: &str, name: &str) -> anyhow::Result<ResourceClaim> {
    create(client, ns, json!({
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}}
    }))
    .await
}

/// The device allocated to the claim of `pod`, once the pod runs.
pub async fn device_of(client: &Client, ns: &str, pod: &str) -> anyhow::Result<Option<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
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
    let c = Api::<ResourceClaim>::namespaced(client.clone(), ns)
        .get(&claim)
        .await?;
    Ok(c.status
        .and_then(|s| s.allocation)
        .and_then(|a| a.devices)
        .and_then(|d| d.results)
        .and_then(|r| r.first().map(|r| r.device.clone())))
}

/// Waits until every pod of `pods` runs with a device; returns pod → device.
pub async fn wait_devices(
    client: &Client,
    ns: &str,
    pods: &[String],
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pods {
        let d = until(
            &format!("pod {ns}/{p} running with an allocated device"),
            timeout,
            || device_of(client, ns, p),
        )
        .await?;
        out.insert(p.clone(), d);
    }
    Ok(out)
}

/// unwedge's DeviceTaintRules for `wedge` (by the `unwedge.io/wedge` label).
pub async fn rules_of(client: &Client, wedge: &str) -> anyhow::Result<Vec<DeviceTaintRule>> {
    let lp = ListParams::default().labels(&format!("unwedge.io/wedge={wedge}"));
    Ok(Api::<DeviceTaintRule>::all(client.clone())
        .list(&lp)
        .await?
        .items)
}

/// Whether `pod` exists and is not terminating.
pub async fn exists(client: &Client, ns: &str, pod: &str) -> anyhow::Result<bool> {
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(pod)
        .await?
        .is_some_and(|p| p.metadata.deletion_timestamp.is_none()))
}

/// The uids of `pods` in `ns` now (to tell later whether they were replaced or touched).
pub async fn uids(
    client: &Client,
    ns: &str,
    pods: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut m = BTreeMap::new();
    for p in pods {
        m.insert(p.clone(), api.get(p).await?.uid().unwrap_or_default());
    }
    Ok(m)
}

/// How many of `before` (pod → uid) still run unchanged: same uid, not terminating.
pub async fn untouched(
    client: &Client,
    ns: &str,
    before: &BTreeMap<String, String>,
) -> anyhow::Result<usize> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut n = 0;
    for (p, uid) in before {
        if let Some(now) = api.get_opt(p).await?
            && now.uid().as_deref() == Some(uid.as_str())
            && now.metadata.deletion_timestamp.is_none()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// Watches every node: the flag is set when any node is ever unschedulable.
pub fn cordon_watch(client: &Client) -> Arc<AtomicBool> {
    let seen = Arc::new(AtomicBool::new(false));
    let s = seen.clone();
    let api: Api<Node> = Api::all(client.clone());
    tokio::spawn(async move {
        // With a backoff: once the test's API server is stopped, a bare watcher retries in a
        // tight loop that never yields and starved the test's runtime (a CI run hung here).
        let mut st = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = st.next().await {
            if let Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) = ev
                && n.spec.and_then(|s| s.unschedulable).unwrap_or(false)
            {
                s.store(true, Ordering::SeqCst);
            }
        }
    });
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_names_each_device_with_its_pci_address() {
        let s = slice("n1", &["0000:03:00.0".into(), "0000:04:00.0".into()]).unwrap();
        assert_eq!(s.spec.driver, DRIVER);
        assert_eq!(s.spec.pool.name, "n1");
        let devs = s.spec.devices.unwrap();
        assert_eq!(devs[1].name, "gpu-1");
        let v = serde_json::to_value(&devs[1]).unwrap();
        assert_eq!(v["attributes"][PCI_ATTRIBUTE]["string"], "0000:04:00.0");
    }
}
