//! Device resolution under a configurable sysfs root (`--sysfs-root`, default `/sys`): from a
//! card name or a uevent's `DEVPATH` to the PCI device, its driver, IDs, DRM nodes, NUMA node,
//! and the **reset domain**: every device a recovery method will disturb (docs/design.md §1).
//!
//! Reads only. Missing or odd entries give a typed [`SysfsError`] naming the path, never a panic.
//!
//! Reset domain, per method (`DomainDevice::methods` lists the methods that disturb a device):
//! - `self`: the device itself, for `rebind` and `bus-reset`.
//! - `xgmi-hive` (amdgpu): a full reset of any hive member resets every GPU of the hive
//!   (`amdgpu_device_gpu_recover` walks the hive's device list) while the kernel signals one
//!   card. A `bus-reset` of one member is such a reset; a `rebind` re-runs amdgpu's init, which
//!   on XGMI parts resets the hive too. So hive members count for both `rebind` and `bus-reset`.
//!   Members are found by an equal `device/xgmi_hive_info/xgmi_hive_id`.
//! - `same-slot`: the other functions of the same PCI device (the GPU's HDMI audio function)
//!   and, when the parent is a PCI bridge, every other device behind that bridge: a secondary
//!   bus reset hits them all. Only `bus-reset` disturbs them; a `rebind` touches one function.
//! - `sriov-vf`: the virtual functions of a physical function (`virtfnN` links); unbinding the
//!   PF removes them, so both `rebind` and `bus-reset` disturb them.
//! - `reboot` disturbs every device of the node: the operator drains the whole node for it, so
//!   it is not listed here. Methods this agent does not know (`vendor-specific`, `cold-reset`,
//!   any new token) are assumed to disturb the whole listed domain ([`ResolvedDevice::domain_for`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use unwedge_crds::{DeviceRef, DomainDevice};

/// `rebind`, as the kernel spells it.
pub const REBIND: &str = "rebind";
/// `bus-reset`, as the kernel spells it.
pub const BUS_RESET: &str = "bus-reset";

/// A sysfs lookup that failed, naming the path involved.
#[derive(Debug, Error)]
pub enum SysfsError {
    /// The entry does not exist (the device is gone, or the root is not a sysfs tree).
    #[error("{}: no such sysfs entry (is --sysfs-root right, and is the device still present?)", path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// The entry exists but could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The name is not a primary DRM card (`cardN`).
    #[error("{name:?} is not a DRM card node (cardN)")]
    NotACard {
        /// The name given.
        name: String,
    },
    /// The device directory's name is not a PCI address.
    #[error("{}: the device is not a PCI function (no DDDD:BB:DD.F name)", path.display())]
    NotPci {
        /// The resolved device path.
        path: PathBuf,
    },
}

fn io_err(path: &Path, source: io::Error) -> SysfsError {
    if source.kind() == io::ErrorKind::NotFound {
        SysfsError::NotFound {
            path: path.to_path_buf(),
        }
    } else {
        SysfsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A GPU as sysfs describes it, with the devices its recovery would disturb.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedDevice {
    /// Identity (PCI address, card, render node, driver — `""` when unbound —, IDs, NUMA node).
    pub device: DeviceRef,
    /// The reset domain: this device first (`self`), then the others, by PCI address.
    pub reset_domain: Vec<DomainDevice>,
    /// The PCI device directory (canonical, under the sysfs root).
    pub sysfs_path: PathBuf,
}

impl ResolvedDevice {
    /// The devices `method` disturbs: none for `none`, those listing it for `rebind` and
    /// `bus-reset`, and the whole domain for any method this agent does not know.
    pub fn domain_for(&self, method: &str) -> Vec<&DomainDevice> {
        match method {
            "none" => Vec::new(),
            REBIND | BUS_RESET => self
                .reset_domain
                .iter()
                .filter(|d| d.methods.iter().any(|m| m == method))
                .collect(),
            _ => self.reset_domain.iter().collect(),
        }
    }
}

/// Whether `s` is a PCI address `dddd:bb:dd.f` (lower-case hex, as sysfs writes it).
pub fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && (b'0'..=b'7').contains(&b[11])
}

/// A sysfs tree rooted at `root` (`/sys` in production, a fixture in tests).
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    /// A resolver over the tree at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root it reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a card by name (`card0`) through `class/drm/<card>/device`.
    pub fn resolve_card(&self, card: &str) -> Result<ResolvedDevice, SysfsError> {
        if !crate::uevent::is_card(card) {
            return Err(SysfsError::NotACard {
                name: card.to_string(),
            });
        }
        let link = self.root.join("class/drm").join(card).join("device");
        let dev = canonical(&link)?;
        self.resolve_pci_dir(dev, Some(card.to_string()))
    }

    /// Resolves a uevent's `DEVPATH` (`/devices/…/0000:03:00.0/drm/card0`) under the root.
    pub fn resolve_devpath(&self, devpath: &str) -> Result<ResolvedDevice, SysfsError> {
        let card = devpath.rsplit('/').next().unwrap_or_default();
        if !crate::uevent::is_card(card) {
            return Err(SysfsError::NotACard {
                name: card.to_string(),
            });
        }
        let node = self.root.join(devpath.trim_start_matches('/'));
        let dev = canonical(&node.join("device"))?;
        self.resolve_pci_dir(dev, Some(card.to_string()))
    }

    /// Resolves a PCI device by address (card and render node looked up in its `drm` directory).
    pub fn resolve_pci(&self, bdf: &str) -> Result<ResolvedDevice, SysfsError> {
        let dev = canonical(&self.pci_dir(bdf))?;
        let card = drm_nodes(&dev).0;
        self.resolve_pci_dir(dev, card)
    }

    fn pci_dir(&self, bdf: &str) -> PathBuf {
        self.root.join("bus/pci/devices").join(bdf)
    }

    fn resolve_pci_dir(
        &self,
        dev: PathBuf,
        card: Option<String>,
    ) -> Result<ResolvedDevice, SysfsError> {
        let bdf = dev
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !is_bdf(&bdf) {
            return Err(SysfsError::NotPci { path: dev });
        }
        let driver = link_name(&dev.join("driver")).unwrap_or_default();
        let vendor_id = Some(read_trimmed(&dev.join("vendor"))?);
        let device_id = Some(read_trimmed(&dev.join("device"))?);
        let numa_node = read_trimmed(&dev.join("numa_node"))
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
            .filter(|n| *n >= 0);
        let (found_card, render_node) = drm_nodes(&dev);
        let card = card.or(found_card);
        let device = DeviceRef {
            pci_address: bdf.clone(),
            card: card.clone(),
            render_node: render_node.clone(),
            driver,
            vendor_id,
            device_id,
            numa_node,
            dra: None,
        };
        let reset_domain = self.reset_domain(&dev, &bdf, card, render_node);
        Ok(ResolvedDevice {
            device,
            reset_domain,
            sysfs_path: dev,
        })
    }

    fn reset_domain(
        &self,
        dev: &Path,
        bdf: &str,
        card: Option<String>,
        render: Option<String>,
    ) -> Vec<DomainDevice> {
        let both = || vec![REBIND.to_string(), BUS_RESET.to_string()];
        let mut out = vec![DomainDevice {
            pci_address: bdf.to_string(),
            card,
            render_node: render,
            relation: "self".into(),
            methods: both(),
        }];
        let mut others: Vec<(String, &str, Vec<String>)> = Vec::new();
        // SR-IOV virtual functions of a physical function.
        for vf in link_targets(dev, "virtfn") {
            others.push((vf, "sriov-vf", both()));
        }
        // XGMI hive members.
        if let Ok(hive) = read_trimmed(&dev.join("xgmi_hive_info/xgmi_hive_id")) {
            for (other, _) in self.pci_devices() {
                if other != bdf
                    && read_trimmed(&self.pci_dir(&other).join("xgmi_hive_info/xgmi_hive_id"))
                        .ok()
                        .as_deref()
                        == Some(hive.as_str())
                {
                    others.push((other, "xgmi-hive", both()));
                }
            }
        }
        // Same slot, and everything behind the same bridge.
        if let Some(parent) = dev.parent() {
            let parent_is_bridge = parent
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_bdf);
            for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == bdf || !is_bdf(&name) {
                    continue;
                }
                if parent_is_bridge || name[..10] == bdf[..10] {
                    others.push((name, "same-slot", vec![BUS_RESET.to_string()]));
                }
            }
        }
        others.sort_by(|a, b| {
            rel_rank(a.1)
                .cmp(&rel_rank(b.1))
                .then_with(|| a.0.cmp(&b.0))
        });
        for (other, relation, methods) in others {
            if out.iter().any(|d| d.pci_address == other) {
                // One entry per device: the stronger relation (sriov-vf over same-slot) wins.
                continue;
            }
            let (card, render_node) = fs::canonicalize(self.pci_dir(&other))
                .map(|d| drm_nodes(&d))
                .unwrap_or((None, None));
            out.push(DomainDevice {
                pci_address: other,
                card,
                render_node,
                relation: relation.into(),
                methods,
            });
        }
        out
    }

    /// Every PCI device under `bus/pci/devices`, with its class (`0x030000`), sorted by address.
    fn pci_devices(&self) -> Vec<(String, Option<u32>)> {
        let mut out: Vec<(String, Option<u32>)> = fs::read_dir(self.root.join("bus/pci/devices"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_bdf(n))
            .map(|n| {
                let class = read_trimmed(&self.pci_dir(&n).join("class"))
                    .ok()
                    .and_then(|c| u32::from_str_radix(c.trim_start_matches("0x"), 16).ok());
                (n, class)
            })
            .collect();
        out.sort();
        out
    }

    /// The card node (`card0`) of the PCI device `bdf`, if it has one.
    pub fn find_card_by_pci(&self, bdf: &str) -> Option<String> {
        fs::canonicalize(self.pci_dir(bdf))
            .ok()
            .and_then(|d| drm_nodes(&d).0)
    }

    /// The driver bound to `bdf`, or `None` when unbound or absent.
    pub fn driver_of(&self, bdf: &str) -> Option<String> {
        link_name(&self.pci_dir(bdf).join("driver"))
    }

    /// The GPUs of the node: display-class PCI devices (class `0x03xxxx`) and any PCI device
    /// with DRM nodes (compute accelerators such as AMD Instinct enumerate as class `0x12`),
    /// by address, with their bound driver.
    pub fn gpus(&self) -> Vec<(String, Option<String>)> {
        self.pci_devices()
            .into_iter()
            .filter(|(bdf, class)| {
                class.is_some_and(|c| c >> 16 == 0x03) || self.pci_dir(bdf).join("drm").is_dir()
            })
            .map(|(bdf, _)| {
                let drv = self.driver_of(&bdf);
                (bdf, drv)
            })
            .collect()
    }

    /// xe's `survivability_mode` attribute (present only while the device is in it), trimmed.
    pub fn survivability_mode(&self, bdf: &str) -> Option<String> {
        read_trimmed(&self.pci_dir(bdf).join("survivability_mode")).ok()
    }
}

fn rel_rank(r: &str) -> u8 {
    match r {
        "self" => 0,
        "xgmi-hive" => 1,
        "sriov-vf" => 2,
        _ => 3,
    }
}

fn canonical(path: &Path) -> Result<PathBuf, SysfsError> {
    fs::canonicalize(path).map_err(|e| io_err(path, e))
}

fn read_trimmed(path: &Path) -> Result<String, SysfsError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io_err(path, e))
}

/// The file name of a symlink's target (`driver -> ../../bus/pci/drivers/xe` gives `xe`).
fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

/// Targets' names of the links `<prefix>N` in `dir` (`virtfn0`, `virtfn1`, …), sorted.
fn link_targets(dir: &Path, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.strip_prefix(prefix)
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|c| c.is_ascii_digit()))
        })
        .filter_map(|e| link_name(&e.path()))
        .filter(|n| is_bdf(n))
        .collect();
    out.sort();
    out
}

/// The primary card and render node in `<dev>/drm`.
fn drm_nodes(dev: &Path) -> (Option<String>, Option<String>) {
    let mut names: Vec<String> = fs::read_dir(dev.join("drm"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let card = names.iter().find(|n| crate::uevent::is_card(n)).cloned();
    let render = names.iter().find(|n| n.starts_with("renderD")).cloned();
    (card, render)
}

/// Fake sysfs trees laid out as the kernel lays them out, for tests and the e2e harness.
#[cfg(any(test, feature = "fixtures"))]
pub mod fixture;
