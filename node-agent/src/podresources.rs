//! Who holds a device: the kubelet PodResources v1 API (`List` on a unix socket, by default
//! `/var/lib/kubelet/pod-resources/kubelet.sock`), and the explicit mapping from a device
//! plugin's device ids to PCI addresses (docs/design.md §5).
//!
//! Device plugins name devices differently, so the mapping is a choice ([`DeviceIdMatch`]):
//! - AMD's k8s-device-plugin (ROCm/k8s-device-plugin, `internal/pkg/amdgpu`) uses the GPU's PCI
//!   address (`0000:03:00.0`) as the device id: [`DeviceIdMatch::Pci`].
//! - Intel's GPU plugin (intel/intel-device-plugins-for-kubernetes, `cmd/gpu_plugin`) names
//!   each device `<card>-<n>` (`card0-0`, `card0-1`, … one per `-shared-dev-num` slot,
//!   `devID := fmt.Sprintf("%s-%d", name, i)`): [`DeviceIdMatch::Card`].
//! - Others use an index or a UUID: [`DeviceIdMatch::Index`] or [`DeviceIdMatch::Map`].
//! - [`DeviceIdMatch::Auto`] (the default) takes a PCI address as one, then a card name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Endpoint, Uri};
use tower::service_fn;
use unwedge_crds::{Consumer, DraDeviceRef};

use crate::sysfs::{Sysfs, is_bdf};

/// The generated PodResources v1 API (`k8s.io/kubelet/pkg/apis/podresources/v1`), client and
/// server (the tests and the e2e harness serve it).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("v1");
}

/// How long one `List` may take, connection included.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// The devices of one resource assigned to one container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerDevices {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Extended resource name, e.g. `gpu.intel.com/xe` or `amd.com/gpu`.
    pub resource_name: String,
    /// The device plugin's ids of the devices.
    pub device_ids: Vec<String>,
    /// For a DRA allocation (PodResources `dynamic_resources`, reported by kubelets with
    /// `KubeletPodResourcesDynamicResources`): the driver, pool and device; `resource_name` is
    /// then the driver and `device_ids` is empty.
    pub dra: Option<DraDeviceRef>,
}

/// Why the kubelet's PodResources could not be listed or the id mapping loaded.
#[derive(Debug, Error)]
pub enum PodResourcesError {
    /// No connection to the kubelet's socket.
    #[error("connecting to the kubelet PodResources socket {}: {source} (is --pod-resources-socket right and mounted?)", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The `List` call failed.
    #[error("PodResources List on {}: {status}", socket.display())]
    Rpc {
        /// The socket path.
        socket: PathBuf,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// The call did not finish in time.
    #[error("PodResources List on {} took longer than {timeout:?}", socket.display())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The limit.
        timeout: Duration,
    },
    /// The device id map file could not be read.
    #[error("reading the device id map {}: {source}", path.display())]
    MapFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line of the device id map is not `<id>=<pci address>`.
    #[error("device id map {} line {line}: {text:?} is not `<device id>=<pci address>`", path.display())]
    MapLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// An unknown `--device-id-match` value.
    #[error("unknown device id match {0:?}: use auto, pci, card, index or map")]
    UnknownMatch(String),
}

/// Lists every container's devices through the kubelet's PodResources API at `socket`.
pub async fn list(socket: &Path) -> Result<Vec<ContainerDevices>, PodResourcesError> {
    list_with_timeout(socket, LIST_TIMEOUT).await
}

/// [`list`] with a custom time limit.
pub async fn list_with_timeout(
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<ContainerDevices>, PodResourcesError> {
    match tokio::time::timeout(timeout, list_inner(socket, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(PodResourcesError::Timeout {
            socket: socket.to_path_buf(),
            timeout,
        }),
    }
}

/// A client of the kubelet's PodResources API on the unix socket `socket`.
async fn connect(
    socket: &Path,
    timeout: Duration,
) -> Result<
    proto::pod_resources_lister_client::PodResourcesListerClient<tonic::transport::Channel>,
    PodResourcesError,
> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the unix socket.
    let channel = Endpoint::from_static("http://localhost")
        .timeout(timeout)
        .connect_timeout(timeout)
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|source| PodResourcesError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
    Ok(proto::pod_resources_lister_client::PodResourcesListerClient::new(channel))
}

fn rpc_error(socket: &Path) -> impl FnOnce(tonic::Status) -> PodResourcesError + '_ {
    move |status| PodResourcesError::Rpc {
        socket: socket.to_path_buf(),
        status: Box::new(status),
    }
}

async fn list_inner(
    socket: &Path,
    timeout: Duration,
) -> Result<Vec<ContainerDevices>, PodResourcesError> {
    let resp = connect(socket, timeout)
        .await?
        .list(proto::ListPodResourcesRequest {})
        .await
        .map_err(rpc_error(socket))?;
    let mut out = Vec::new();
    for pod in resp.into_inner().pod_resources {
        for c in pod.containers {
            for d in c.devices {
                out.push(ContainerDevices {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    container: c.name.clone(),
                    resource_name: d.resource_name,
                    device_ids: d.device_ids,
                    dra: None,
                });
            }
            let claimed = c.dynamic_resources.iter().flat_map(|r| &r.claim_resources);
            for r in claimed.filter(|r| !r.device_name.is_empty()) {
                out.push(ContainerDevices {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    container: c.name.clone(),
                    resource_name: r.driver_name.clone(),
                    device_ids: vec![],
                    dra: Some(DraDeviceRef {
                        driver: r.driver_name.clone(),
                        pool: r.pool_name.clone(),
                        device: r.device_name.clone(),
                    }),
                });
            }
        }
    }
    Ok(out)
}

/// The device ids the kubelet can allocate now (`GetAllocatableResources`: the devices its
/// device plugins advertise healthy), as (resource name, device id).
pub async fn allocatable(socket: &Path) -> Result<Vec<(String, String)>, PodResourcesError> {
    let call = async {
        let resp = connect(socket, LIST_TIMEOUT)
            .await?
            .get_allocatable_resources(proto::AllocatableResourcesRequest {})
            .await
            .map_err(rpc_error(socket))?;
        Ok(resp
            .into_inner()
            .devices
            .into_iter()
            .flat_map(|d| {
                let r = d.resource_name;
                d.device_ids.into_iter().map(move |id| (r.clone(), id))
            })
            .collect())
    };
    tokio::time::timeout(LIST_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(PodResourcesError::Timeout {
                socket: socket.to_path_buf(),
                timeout: LIST_TIMEOUT,
            })
        })
}

/// Whether a device plugin advertises the GPU `bdf` as allocatable: `None` when no allocatable
/// device id maps to any GPU of the node (no device plugin serves them, e.g. a DRA node), else
/// whether one maps to `bdf`.
pub fn advertised(
    allocatable: &[(String, String)],
    bdf: &str,
    matcher: &DeviceIdMatch,
    sysfs: &Sysfs,
) -> Option<bool> {
    let mut any = false;
    for (_, id) in allocatable {
        match matcher.device_pci(id, sysfs) {
            Some(b) if b == bdf => return Some(true),
            Some(_) => any = true,
            None => {}
        }
    }
    any.then_some(false)
}

/// How a device plugin's device id maps to a PCI address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceIdMatch {
    /// A PCI address if the id is one, else a card name (`card0`, `card0-1`), else no match.
    #[default]
    Auto,
    /// The id is the PCI address (AMD's plugin).
    Pci,
    /// The id is a card name, optionally with a `-<n>` slot suffix (Intel's plugin).
    Card,
    /// The id ends in a number: the ordinal among the node's GPUs sorted by PCI address.
    Index,
    /// An explicit table from id to PCI address.
    Map(BTreeMap<String, String>),
}

impl DeviceIdMatch {
    /// From the agent's `--device-id-match` and `--device-id-map` options.
    pub fn from_options(kind: &str, map_file: Option<&Path>) -> Result<Self, PodResourcesError> {
        match kind {
            "auto" => Ok(Self::Auto),
            "pci" => Ok(Self::Pci),
            "card" => Ok(Self::Card),
            "index" => Ok(Self::Index),
            "map" => match map_file {
                Some(p) => Self::load_map(p),
                None => Err(PodResourcesError::UnknownMatch(
                    "map without --device-id-map".into(),
                )),
            },
            other => Err(PodResourcesError::UnknownMatch(other.to_string())),
        }
    }

    /// Reads a map file: one `<device id>=<pci address>` per line; blank lines and `#` comments
    /// are skipped.
    pub fn load_map(path: &Path) -> Result<Self, PodResourcesError> {
        let text = std::fs::read_to_string(path).map_err(|source| PodResourcesError::MapFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mut map = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line
                .split_once('=')
                .map(|(k, v)| (k.trim(), normalize_bdf(v.trim())))
            {
                Some((k, Some(bdf))) if !k.is_empty() => {
                    map.insert(k.to_string(), bdf);
                }
                _ => {
                    return Err(PodResourcesError::MapLine {
                        path: path.to_path_buf(),
                        line: i + 1,
                        text: line.to_string(),
                    });
                }
            }
        }
        Ok(Self::Map(map))
    }

    /// The PCI address the device id `id` names, if any.
    pub fn device_pci(&self, id: &str, sysfs: &Sysfs) -> Option<String> {
        match self {
            Self::Pci => normalize_bdf(id),
            Self::Card => card_pci(id, sysfs),
            Self::Index => {
                let digits = id.len() - id.bytes().rev().take_while(u8::is_ascii_digit).count();
                let n: usize = id[digits..].parse().ok()?;
                sysfs.gpus().into_iter().nth(n).map(|(bdf, _)| bdf)
            }
            Self::Map(m) => m.get(id).cloned(),
            Self::Auto => normalize_bdf(id).or_else(|| card_pci(id, sysfs)),
        }
    }
}

/// `0000:03:00.0` (any hex case) to the lower-case form sysfs uses.
fn normalize_bdf(id: &str) -> Option<String> {
    let lower = id.to_ascii_lowercase();
    is_bdf(&lower).then_some(lower)
}

/// `card0` or `card0-<n>` to the card's PCI address through `class/drm`.
fn card_pci(id: &str, sysfs: &Sysfs) -> Option<String> {
    let card = match id.split_once('-') {
        Some((c, slot)) if !slot.is_empty() && slot.bytes().all(|b| b.is_ascii_digit()) => c,
        Some(_) => return None,
        None => id,
    };
    if !crate::uevent::is_card(card) {
        return None;
    }
    let dev =
        std::fs::canonicalize(sysfs.root().join("class/drm").join(card).join("device")).ok()?;
    let name = dev.file_name()?.to_str()?;
    is_bdf(name).then(|| name.to_string())
}

/// The containers holding any device of `domain_bdfs`, one entry per (container, device id).
pub fn consumers(
    list: &[ContainerDevices],
    domain_bdfs: &[String],
    matcher: &DeviceIdMatch,
    sysfs: &Sysfs,
) -> Vec<Consumer> {
    let mut out = Vec::new();
    for c in list {
        for id in &c.device_ids {
            let Some(bdf) = matcher.device_pci(id, sysfs) else {
                continue;
            };
            if domain_bdfs.contains(&bdf) {
                out.push(Consumer {
                    namespace: c.namespace.clone(),
                    pod: c.pod.clone(),
                    container: c.container.clone(),
                    device_id: id.clone(),
                    pci_address: bdf,
                });
            }
        }
    }
    out
}

/// The containers the kubelet reports holding the DRA device `dev` (the wedged GPU `pci`), one
/// entry per container. Empty where the kubelet does not report DRA allocations; the operator
/// then finds them through ResourceClaims when it quarantines.
pub fn dra_consumers(list: &[ContainerDevices], dev: &DraDeviceRef, pci: &str) -> Vec<Consumer> {
    list.iter()
        .filter(|c| c.dra.as_ref() == Some(dev))
        .map(|c| Consumer {
            namespace: c.namespace.clone(),
            pod: c.pod.clone(),
            container: c.container.clone(),
            device_id: format!("{}/{}", dev.pool, dev.device),
            pci_address: pci.to_string(),
        })
        .collect()
}
