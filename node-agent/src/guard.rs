//! Whether an approval may be carried out on this host: the checks every approval passes
//! before the executor writes anything (issue #22, "nothing touched that the agent did not
//! detect"). Pure: the executor gathers the facts, [`clear`] decides.
//!
//! - Every method: the GpuWedge must be a detection this agent reported itself (its outbox or
//!   its record of reported detections holds the same name, node, PCI address and boot id). A
//!   GpuWedge made by hand, or routed here for another node's device, is refused.
//! - `rebind` and `bus-reset` write under `/sys/bus/pci`. With a driver bound, the address must
//!   be a DRM device in sysfs (`devices/<bdf>/drm` exists) and the driver is the basename of
//!   its `driver` link, a plain name (`^[A-Za-z0-9_][A-Za-z0-9_-]*$`). With none bound (an
//!   earlier rung's bind failed, which is when `bus-reset` is needed), the device must be a
//!   GPU by PCI class (display `0x03`, accelerator `0x12`: `drm/` leaves with the driver) and
//!   the driver is the one this agent itself read from sysfs before (its journal of an earlier
//!   attempt on the wedge, or its detection record). A device that had no driver when it was
//!   detected has none to use: refused. `spec.device.driver` is never used: the CR is not a
//!   source of paths.
//! - `reboot` and `none` touch no device file and need no driver.

use thiserror::Error;
use unwedge_crds::GpuWedge;

/// What sysfs says about the approved device now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceFacts {
    /// `/sys/bus/pci/devices/<bdf>/drm` exists.
    pub is_drm: bool,
    /// The basename of `/sys/bus/pci/devices/<bdf>/driver`, when bound.
    pub driver: Option<String>,
    /// Its PCI class is display (`0x03xxxx`) or processing accelerator (`0x12xxxx`).
    pub is_gpu_class: bool,
    /// The driver this agent read from sysfs for the wedge before (journal or detection).
    pub remembered_driver: Option<String>,
}

/// An approval that may go ahead, with what the executor may use to carry it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clearance {
    /// The driver to unbind and bind again, read from sysfs (`None` for `reboot` and `none`
    /// on a device without a driver).
    pub driver: Option<String>,
}

/// Why an approval is refused; nothing was written to the host.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// `spec.device.pciAddress` is not a PCI address.
    #[error(
        "{pci:?} is not a PCI address (dddd:bb:dd.f): the agent writes nothing for it; nothing was touched"
    )]
    NotPciAddress {
        /// The address in the CR.
        pci: String,
    },
    /// This agent did not detect this wedge.
    #[error(
        "this agent did not detect GpuWedge {wedge} ({pci} on node {node}, boot id {boot_id}): it carries out approvals only for wedges it detected and reported itself (was the GpuWedge made by hand, or the agent's state dir wiped?); nothing was touched"
    )]
    NotDetected {
        /// The GpuWedge's name.
        wedge: String,
        /// Its `spec.nodeName`.
        node: String,
        /// Its PCI address.
        pci: String,
        /// Its `spec.bootId`.
        boot_id: String,
    },
    /// No driver is bound: nothing to unbind or bind.
    #[error(
        "no driver bound to {pci}: {method} needs the bound driver's name from sysfs; nothing was touched. Approve reboot, or bind the driver by hand and retry"
    )]
    NoDriver {
        /// The device.
        pci: String,
        /// The approved method.
        method: String,
    },
    /// The address is not a DRM device (no `drm` directory in sysfs).
    #[error(
        "{pci} is not a DRM device on this node (no drm directory under /sys/bus/pci/devices/{pci}): the agent only rebinds or resets GPUs; nothing was touched"
    )]
    NotDrm {
        /// The device.
        pci: String,
    },
    /// The bound driver's name is not a plain name; it will not be used in a path.
    #[error(
        "the driver bound to {pci} is named {driver:?}, not a plain driver name: the agent will not build a sysfs path from it; nothing was touched"
    )]
    OddDriverName {
        /// The device.
        pci: String,
        /// The name sysfs shows.
        driver: String,
    },
}

/// Whether `s` is a plain kernel driver name: `^[A-Za-z0-9_][A-Za-z0-9_-]*$`.
pub fn is_plain_driver_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Decides whether `method` may be carried out on `wedge`'s device, given whether this agent
/// `detected` the wedge and what sysfs shows now.
pub fn clear(
    wedge: &GpuWedge,
    method: &str,
    detected: bool,
    facts: &DeviceFacts,
) -> Result<Clearance, Refusal> {
    let pci = wedge.spec.device.pci_address.clone();
    if !crate::sysfs::is_bdf(&pci) {
        return Err(Refusal::NotPciAddress { pci });
    }
    if !detected {
        return Err(Refusal::NotDetected {
            wedge: kube::ResourceExt::name_any(wedge),
            node: wedge.spec.node_name.clone(),
            pci,
            boot_id: wedge.spec.boot_id.clone(),
        });
    }
    let remembered = facts
        .remembered_driver
        .clone()
        .filter(|d| is_plain_driver_name(d));
    let writes_sysfs = matches!(method, crate::sysfs::REBIND | crate::sysfs::BUS_RESET);
    if !writes_sysfs {
        let bound = facts.driver.clone().filter(|d| is_plain_driver_name(d));
        return Ok(Clearance {
            driver: bound.or(remembered),
        });
    }
    match facts.driver.clone() {
        Some(_) if !facts.is_drm => Err(Refusal::NotDrm { pci }),
        Some(driver) if !is_plain_driver_name(&driver) => {
            Err(Refusal::OddDriverName { pci, driver })
        }
        Some(driver) => Ok(Clearance {
            driver: Some(driver),
        }),
        None if !facts.is_gpu_class => Err(Refusal::NotDrm { pci }),
        None => match remembered {
            Some(driver) => Ok(Clearance {
                driver: Some(driver),
            }),
            None => Err(Refusal::NoDriver {
                pci,
                method: method.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::{DeviceRef, GpuWedgeSpec};

    fn wedge(pci: &str, cr_driver: &str) -> GpuWedge {
        GpuWedge::new(
            "node-a-0000-03-00-0-7",
            GpuWedgeSpec {
                node_name: "node-a".into(),
                device: DeviceRef {
                    pci_address: pci.into(),
                    driver: cr_driver.into(),
                    ..DeviceRef::default()
                },
                methods: vec!["rebind".into()],
                detected_at: Time(jiff::Timestamp::UNIX_EPOCH),
                boot_id: "boot-1".into(),
                uevent: Default::default(),
                blamed: None,
            },
        )
    }

    fn gpu(driver: Option<&str>) -> DeviceFacts {
        DeviceFacts {
            is_drm: driver.is_some(),
            driver: driver.map(str::to_string),
            is_gpu_class: true,
            remembered_driver: Some("xe".into()),
        }
    }

    #[test]
    fn a_detected_bound_gpu_is_cleared_with_the_sysfs_driver() {
        let w = wedge("0000:03:00.0", "../../../../tmp/x");
        for method in ["rebind", "bus-reset", "reboot", "none"] {
            assert_eq!(
                clear(&w, method, true, &gpu(Some("xe"))),
                Ok(Clearance {
                    driver: Some("xe".into())
                }),
                "{method}: the CR's driver is never used"
            );
        }
    }

    #[test]
    fn an_undetected_wedge_is_refused_for_every_method() {
        let w = wedge("0000:03:00.0", "xe");
        for method in ["rebind", "bus-reset", "reboot", "none", "cold-reset"] {
            let r = clear(&w, method, false, &gpu(Some("xe"))).unwrap_err();
            assert!(matches!(r, Refusal::NotDetected { .. }), "{method}: {r:?}");
            assert!(r.to_string().contains("did not detect"), "{r}");
        }
    }

    #[test]
    fn a_non_drm_device_is_refused_for_writes_only() {
        let w = wedge("0000:00:19.0", "");
        let nic = DeviceFacts {
            is_drm: false,
            driver: Some("e1000e".into()),
            is_gpu_class: false,
            remembered_driver: Some("e1000e".into()),
        };
        assert_eq!(
            clear(&w, "rebind", true, &nic),
            Err(Refusal::NotDrm {
                pci: "0000:00:19.0".into()
            })
        );
        let unbound_nic = DeviceFacts {
            driver: None,
            ..nic
        };
        assert!(matches!(
            clear(&w, "bus-reset", true, &unbound_nic),
            Err(Refusal::NotDrm { .. })
        ));
    }

    #[test]
    fn a_gpu_left_unbound_by_a_failed_bind_uses_the_driver_the_agent_read_before() {
        let w = wedge("0000:03:00.0", "../../x");
        let left_unbound = gpu(None);
        for method in ["rebind", "bus-reset", "reboot"] {
            assert_eq!(
                clear(&w, method, true, &left_unbound),
                Ok(Clearance {
                    driver: Some("xe".into())
                }),
                "{method}"
            );
        }
        let odd = DeviceFacts {
            remembered_driver: Some("../x".into()),
            ..gpu(None)
        };
        assert!(matches!(
            clear(&w, "rebind", true, &odd),
            Err(Refusal::NoDriver { .. })
        ));
    }

    #[test]
    fn no_driver_refuses_rebind_and_reset_but_not_reboot() {
        let w = wedge("0000:03:00.0", "xe");
        let unbound = DeviceFacts {
            is_drm: false,
            driver: None,
            is_gpu_class: true,
            remembered_driver: None,
        };
        for method in ["rebind", "bus-reset"] {
            let r = clear(&w, method, true, &unbound).unwrap_err();
            assert!(matches!(r, Refusal::NoDriver { .. }), "{r:?}");
            assert!(r.to_string().contains("Approve reboot"), "{r}");
        }
        assert_eq!(
            clear(&w, "reboot", true, &unbound),
            Ok(Clearance { driver: None })
        );
    }

    #[test]
    fn odd_names_and_addresses_are_refused() {
        let r = clear(
            &wedge("0000:03:00.0", "xe"),
            "rebind",
            true,
            &gpu(Some("..")),
        );
        assert!(matches!(r, Err(Refusal::OddDriverName { .. })), "{r:?}");
        let r = clear(&wedge("../../x", "xe"), "reboot", true, &gpu(Some("xe")));
        assert!(matches!(r, Err(Refusal::NotPciAddress { .. })), "{r:?}");
        for ok in ["xe", "i915", "amdgpu", "nvidia-drm", "_x"] {
            assert!(is_plain_driver_name(ok), "{ok}");
        }
        for bad in ["", "-x", "../x", "a/b", "x y", "."] {
            assert!(!is_plain_driver_name(bad), "{bad:?}");
        }
    }
}
