//! The wedged GPU as a DRA device: on nodes whose GPUs are published in ResourceSlices
//! (resource.k8s.io/v1), find the device whose PCI attribute equals the wedged card's PCI
//! address, so the operator can quarantine that one device instead of cordoning the node.
//!
//! `find` is pure; `lookup` only lists this node's slices; [`SliceView`] keeps them from a
//! watch so a detection asks no API server. No match is not an error: the wedge is then
//! handled like one on a device-plugin node, and the agent message says why.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use unwedge_crds::DraDeviceRef;

/// The standard attribute that holds a device's PCI address.
pub const PCI_BUS_ID: &str = "resource.kubernetes.io/pciBusID";

/// Which ResourceSlice attribute holds the PCI address, per DRA driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributeMap {
    /// For drivers not in `per_driver`.
    pub default: String,
    /// Driver name → attribute name.
    pub per_driver: BTreeMap<String, String>,
}

impl Default for AttributeMap {
    fn default() -> Self {
        AttributeMap {
            default: PCI_BUS_ID.to_string(),
            per_driver: BTreeMap::new(),
        }
    }
}

/// A `--dra-driver-attributes` value that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "--dra-driver-attributes {0:?}: expected driver=attribute[,driver=attribute...] or a JSON object {{\"driver\": \"attribute\"}}"
)]
pub struct BadAttributeMap(pub String);

impl AttributeMap {
    /// Builds the map from `--dra-pci-attribute` and `--dra-driver-attributes`, which is either
    /// `drv=attr,drv2=attr2` or a JSON object (what the chart renders from its values).
    pub fn parse(default: &str, per_driver: &str) -> Result<AttributeMap, BadAttributeMap> {
        let bad = || BadAttributeMap(per_driver.to_string());
        let text = per_driver.trim();
        let map = if text.is_empty() {
            BTreeMap::new()
        } else if text.starts_with('{') {
            serde_json::from_str::<BTreeMap<String, String>>(text).map_err(|_| bad())?
        } else {
            let mut m = BTreeMap::new();
            for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (d, a) = pair.split_once('=').ok_or_else(bad)?;
                let (d, a) = (d.trim(), a.trim());
                if d.is_empty() || a.is_empty() {
                    return Err(bad());
                }
                m.insert(d.to_string(), a.to_string());
            }
            m
        };
        let default = default.trim();
        Ok(AttributeMap {
            default: if default.is_empty() {
                PCI_BUS_ID.to_string()
            } else {
                default.to_string()
            },
            per_driver: map,
        })
    }

    /// The attribute that holds the PCI address for `driver`.
    pub fn attribute(&self, driver: &str) -> &str {
        self.per_driver
            .get(driver)
            .map_or(self.default.as_str(), String::as_str)
    }
}

/// What the slices of this node say about the wedged device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The device, by driver, pool and name.
    Found(DraDeviceRef),
    /// The node publishes no ResourceSlice: a device-plugin node.
    NoSlices,
    /// The node has slices but none names this PCI address; the text says what was searched.
    NoMatch(String),
}

/// Attribute names may be written fully qualified (`resource.kubernetes.io/pciBusID`) or, for
/// a driver's own attributes, unqualified in the slice (`pciAddress` under the driver's
/// domain): both spellings name the same attribute.
fn attribute_value<'a>(
    attrs: &'a BTreeMap<String, k8s_openapi::api::resource::v1::DeviceAttribute>,
    driver: &str,
    name: &str,
) -> Option<&'a str> {
    let short = name
        .strip_prefix(driver)
        .and_then(|s| s.strip_prefix('/'))
        .unwrap_or(name);
    attrs
        .get(name)
        .or_else(|| attrs.get(short))
        .or_else(|| attrs.get(&format!("{driver}/{name}")))
        .and_then(|a| a.string.as_deref())
}

/// Finds the device of `node` whose PCI attribute equals `pci` (case-insensitive) in `slices`.
/// Slices of other nodes are ignored, as are older generations of a pool.
pub fn find(slices: &[ResourceSlice], node: &str, pci: &str, map: &AttributeMap) -> Lookup {
    let mine: Vec<&ResourceSlice> = slices
        .iter()
        .filter(|s| s.spec.node_name.as_deref() == Some(node))
        .collect();
    if mine.is_empty() {
        return Lookup::NoSlices;
    }
    let newest = |s: &ResourceSlice| {
        mine.iter()
            .filter(|o| o.spec.driver == s.spec.driver && o.spec.pool.name == s.spec.pool.name)
            .all(|o| o.spec.pool.generation <= s.spec.pool.generation)
    };
    let mut searched: Vec<String> = Vec::new();
    for s in mine.iter().filter(|s| newest(s)) {
        let attr = map.attribute(&s.spec.driver);
        let entry = format!("{} ({attr})", s.spec.driver);
        if !searched.contains(&entry) {
            searched.push(entry);
        }
        for d in s.spec.devices.iter().flatten() {
            let Some(attrs) = d.attributes.as_ref() else {
                continue;
            };
            if attribute_value(attrs, &s.spec.driver, attr)
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(pci))
            {
                return Lookup::Found(DraDeviceRef {
                    driver: s.spec.driver.clone(),
                    pool: s.spec.pool.name.clone(),
                    device: d.name.clone(),
                });
            }
        }
    }
    Lookup::NoMatch(format!(
        "node {node} publishes DRA devices but none has PCI address {pci} (searched drivers: {}); handled like a device-plugin node (the node is cordoned). Set --dra-driver-attributes if the driver names the PCI address differently",
        searched.join(", ")
    ))
}

/// Lists this node's ResourceSlices and finds the wedged device in them.
pub async fn lookup(
    client: &kube::Client,
    node: &str,
    pci: &str,
    map: &AttributeMap,
) -> Result<Lookup, kube::Error> {
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let slices = Api::<ResourceSlice>::all(client.clone()).list(&lp).await?;
    Ok(find(&slices.items, node, pci, map))
}

/// How long after the API server refused the slice watch (no right to read ResourceSlices: DRA
/// off in the chart; or no DRA API) a detection starts it again. No timer: the next detection
/// after that does.
const RETRY_REFUSED: Duration = Duration::from_secs(300);

enum SliceState {
    /// The watch runs; its store is ready after the first list.
    Watching {
        store: Store<ResourceSlice>,
        task: tokio::task::AbortHandle,
    },
    /// The API server refused the watch's list at this instant (403 or 404).
    Refused(Instant),
    /// Stopped with the agent.
    Stopped,
}

struct SliceInner {
    client: kube::Client,
    node: String,
    state: Mutex<SliceState>,
}

impl SliceInner {
    fn state(&self) -> std::sync::MutexGuard<'_, SliceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SliceInner {
    fn drop(&mut self) {
        if let SliceState::Watching { task, .. } = &*self.state() {
            task.abort();
        }
    }
}

/// This node's ResourceSlices from a watch (field selector `spec.nodeName`): a detection finds
/// its DRA device in memory. Until the watch's first list it LISTs as before; while the API
/// server refuses the watch it asks nothing (as a refused LIST would answer: not a DRA node).
#[derive(Clone)]
pub struct SliceView {
    inner: Arc<SliceInner>,
}

impl SliceView {
    /// Starts the watch of `node`'s slices (inside a Tokio runtime).
    pub fn start(client: kube::Client, node: &str) -> Self {
        let inner = Arc::new(SliceInner {
            client,
            node: node.to_string(),
            state: Mutex::new(SliceState::Stopped),
        });
        *inner.state() = spawn_watch(&inner);
        SliceView { inner }
    }

    /// Stops the watch.
    pub fn stop(&self) {
        let mut st = self.inner.state();
        if let SliceState::Watching { task, .. } = &*st {
            task.abort();
        }
        *st = SliceState::Stopped;
    }

    /// Finds the wedged device `pci` in this node's slices: from the watch's store once it
    /// has synced (a device it does not find is confirmed by a LIST), else from a LIST.
    pub async fn lookup(&self, pci: &str, map: &AttributeMap) -> Result<Lookup, kube::Error> {
        let store = {
            let mut st = self.inner.state();
            match &*st {
                SliceState::Watching { store, .. } => {
                    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
                        .then(|| store.clone())
                }
                SliceState::Refused(at) if at.elapsed() < RETRY_REFUSED => {
                    return Ok(Lookup::NoSlices);
                }
                SliceState::Refused(_) => {
                    *st = spawn_watch(&self.inner);
                    None
                }
                SliceState::Stopped => None,
            }
        };
        let node = &self.inner.node;
        if let Some(store) = store {
            let slices: Vec<ResourceSlice> = store.state().iter().map(|s| (**s).clone()).collect();
            match find(&slices, node, pci, map) {
                Lookup::NoMatch(_) => {}
                found => return Ok(found),
            }
        }
        lookup(&self.inner.client, node, pci, map).await
    }
}

/// Spawns the watch task; it marks the view `Refused` and ends when the API server refuses it.
fn spawn_watch(inner: &Arc<SliceInner>) -> SliceState {
    let (store, writer) = reflector::store();
    let api = Api::<ResourceSlice>::all(inner.client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", inner.node));
    let task = tokio::spawn(watch_slices(Arc::downgrade(inner), api, cfg, writer));
    SliceState::Watching {
        store,
        task: task.abort_handle(),
    }
}

async fn watch_slices(
    inner: Weak<SliceInner>,
    api: Api<ResourceSlice>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<ResourceSlice>,
) {
    let stream = reflector(writer, watcher(api, cfg)).default_backoff();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        let Err(e) = ev else { continue };
        if refused(&e) {
            tracing::debug!(error = %e, "ResourceSlices not readable: not a DRA node for unwedge; not watching them");
            if let Some(inner) = inner.upgrade() {
                *inner.state() = SliceState::Refused(Instant::now());
            }
            return;
        }
        tracing::warn!(error = %e, "ResourceSlice watch error; retrying");
    }
}

/// Whether the API server refused the watch for good: no right (403) or no such API (404).
fn refused(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => {
            s.is_forbidden() || s.is_not_found()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(
        node: &str,
        driver: &str,
        generation: i64,
        devices: &[(&str, &str, &str)],
    ) -> ResourceSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{node}-{driver}-{generation}")},
            "spec": {
                "driver": driver, "nodeName": node,
                "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
                "devices": devices.iter().map(|(name, attr, pci)| json!({
                    "name": name, "attributes": {*attr: {"string": pci}}
                })).collect::<Vec<_>>()
            }
        }))
        .unwrap()
    }

    fn eight(node: &str) -> ResourceSlice {
        let pcis: Vec<String> = (0..8)
            .map(|i| format!("0000:{:02x}:00.0", 0x10 + i))
            .collect();
        let names: Vec<String> = (0..8).map(|i| format!("gpu-{i}")).collect();
        let devs: Vec<(&str, &str, &str)> = (0..8)
            .map(|i| (names[i].as_str(), PCI_BUS_ID, pcis[i].as_str()))
            .collect();
        slice(node, "gpu.e2e.unwedge.io", 1, &devs)
    }

    #[test]
    fn finds_the_device_whose_pci_bus_id_is_the_wedged_address() {
        let got = find(
            &[eight("node-a"), eight("node-b")],
            "node-a",
            "0000:13:00.0",
            &AttributeMap::default(),
        );
        assert_eq!(
            got,
            Lookup::Found(DraDeviceRef {
                driver: "gpu.e2e.unwedge.io".into(),
                pool: "node-a".into(),
                device: "gpu-3".into()
            })
        );
    }

    #[test]
    fn upper_case_hex_in_the_slice_still_matches() {
        let s = slice(
            "n",
            "d.example.com",
            1,
            &[("g0", PCI_BUS_ID, "0000:AB:00.0")],
        );
        assert!(matches!(
            find(&[s], "n", "0000:ab:00.0", &AttributeMap::default()),
            Lookup::Found(_)
        ));
    }

    #[test]
    fn a_node_without_slices_is_a_device_plugin_node_and_no_match_says_why() {
        assert_eq!(
            find(
                &[eight("node-b")],
                "node-a",
                "0000:13:00.0",
                &AttributeMap::default()
            ),
            Lookup::NoSlices
        );
        match find(
            &[eight("node-a")],
            "node-a",
            "0000:99:00.0",
            &AttributeMap::default(),
        ) {
            Lookup::NoMatch(why) => {
                assert!(why.contains("0000:99:00.0"), "{why}");
                assert!(
                    why.contains("gpu.e2e.unwedge.io (resource.kubernetes.io/pciBusID)"),
                    "{why}"
                );
            }
            other => panic!("expected NoMatch, got {other:?}"),
        }
    }

    #[test]
    fn a_driver_attribute_from_the_map_is_used_for_that_driver_only() {
        let own = slice(
            "n",
            "gpu.example.com",
            1,
            &[("card-a", "pciAddress", "0000:03:00.0")],
        );
        let std = slice(
            "n",
            "other.example.com",
            1,
            &[("x", PCI_BUS_ID, "0000:04:00.0")],
        );
        let map =
            AttributeMap::parse(PCI_BUS_ID, "gpu.example.com=gpu.example.com/pciAddress").unwrap();
        let slices = [own, std];
        assert!(
            matches!(find(&slices, "n", "0000:03:00.0", &map), Lookup::Found(d) if d.device == "card-a")
        );
        assert!(
            matches!(find(&slices, "n", "0000:04:00.0", &map), Lookup::Found(d) if d.device == "x")
        );
        assert!(matches!(
            find(&slices, "n", "0000:03:00.0", &AttributeMap::default()),
            Lookup::NoMatch(_)
        ));
    }

    #[test]
    fn an_older_generation_of_a_pool_is_ignored() {
        let old = slice("n", "d", 1, &[("old-name", PCI_BUS_ID, "0000:03:00.0")]);
        let new = slice("n", "d", 2, &[("new-name", PCI_BUS_ID, "0000:03:00.0")]);
        assert!(
            matches!(find(&[old, new], "n", "0000:03:00.0", &AttributeMap::default()), Lookup::Found(d) if d.device == "new-name")
        );
    }

    #[test]
    fn the_attribute_map_reads_pairs_and_the_charts_json() {
        let m = AttributeMap::parse("", "a=x/pci, b=y/bus").unwrap();
        assert_eq!(m.default, PCI_BUS_ID);
        assert_eq!(m.attribute("a"), "x/pci");
        assert_eq!(m.attribute("b"), "y/bus");
        assert_eq!(m.attribute("c"), PCI_BUS_ID);
        let j = AttributeMap::parse("my/pci", r#"{"a": "x/pci"}"#).unwrap();
        assert_eq!(j.attribute("a"), "x/pci");
        assert_eq!(j.attribute("z"), "my/pci");
        assert_eq!(AttributeMap::parse("", "{}").unwrap().per_driver.len(), 0);
        assert!(AttributeMap::parse("", "a").is_err());
        assert!(AttributeMap::parse("", "=x").is_err());
        assert!(AttributeMap::parse("", "{not json").is_err());
    }
}
