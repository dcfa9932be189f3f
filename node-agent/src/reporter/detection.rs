//! What the agent knew about one wedge when it saw it ([`DetectedWedge`]: what the outbox
//! stores and the reporter turns into a GpuWedge), and the names derived from it: the
//! deterministic wedge name, its labels and selector, the PCI address of a DEVPATH.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use unwedge_crds::labels::{LABEL_DEVICE, LABEL_NODE, device_label};
use unwedge_crds::{Consumer, DeviceRef, DomainDevice, WedgeEvent};

/// Where a detected wedge came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// A `WEDGED=` uevent from the kernel.
    #[default]
    Uevent,
    /// Start-up reconciliation found the device in a wedged state (see `startup`).
    Startup,
}

/// The task the driver blamed, as far as the agent could map it on the host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BlamedTask {
    /// Host PID from `PID=`.
    pub pid: i64,
    /// Task name from `TASK=`.
    #[serde(default)]
    pub task: Option<String>,
    /// Container id from `/proc/<PID>/cgroup`.
    #[serde(default)]
    pub container_id: Option<String>,
    /// Pod UID from the same cgroup path; the pod's name is looked up when reporting.
    #[serde(default)]
    pub pod_uid: Option<String>,
}

/// Everything the agent knew about one wedge when it saw it: what the outbox stores and what
/// the reporter turns into a `GpuWedge` (so a replay does not depend on sysfs any more).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DetectedWedge {
    /// This node.
    pub node: String,
    /// The device, resolved best-effort.
    pub device: DeviceRef,
    /// The kernel's methods, verbatim and in order.
    pub methods: Vec<String>,
    /// When the agent received it.
    pub detected_at: Timestamp,
    /// The boot id at detection.
    pub boot_id: String,
    /// Every raw key of the uevent.
    pub uevent: BTreeMap<String, String>,
    /// The kernel's SEQNUM, if any.
    #[serde(default)]
    pub seqnum: Option<u64>,
    /// The blamed task, if the driver named one.
    #[serde(default)]
    pub blamed: Option<BlamedTask>,
    /// Containers holding a device of the reset domain at detection.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// The devices the methods would disturb.
    #[serde(default)]
    pub reset_domain: Vec<DomainDevice>,
    /// What went wrong while resolving (missing sysfs entries, ...), for a human.
    #[serde(default)]
    pub agent_message: Option<String>,
    /// Where the detection came from.
    #[serde(default)]
    pub source: Source,
    /// Whether the agent has asked the kubelet for `consumers` (and the API for the DRA
    /// device). A detection stored before that (or by an older agent) is enriched when it is
    /// replayed, never reported with an empty consumer list that only means "not asked".
    #[serde(default)]
    pub enriched: bool,
}

impl DetectedWedge {
    /// The wedge of a plain `WEDGED=<methods>` uevent (with `SEQNUM` when `seqnum` is set) on
    /// `node`, before the agent has looked for consumers, a reset domain or a blamed task.
    pub fn from_uevent(
        node: &str,
        device: DeviceRef,
        methods: &str,
        seqnum: Option<u64>,
        detected_at: Timestamp,
        boot_id: &str,
    ) -> DetectedWedge {
        let mut uevent = BTreeMap::from([("WEDGED".to_string(), methods.to_string())]);
        if let Some(n) = seqnum {
            uevent.insert("SEQNUM".into(), n.to_string());
        }
        DetectedWedge {
            node: node.into(),
            device,
            methods: methods.split(',').map(str::to_string).collect(),
            detected_at,
            boot_id: boot_id.into(),
            uevent,
            seqnum,
            blamed: None,
            consumers: vec![],
            reset_domain: vec![],
            agent_message: None,
            source: Source::Uevent,
            enriched: false,
        }
    }

    /// The deterministic name: `<node>-<bdf>-<seqnum or detection unix time>`.
    pub fn name(&self) -> String {
        let n = self
            .seqnum
            .unwrap_or(self.detected_at.as_second().max(0) as u64);
        wedge_name(&self.node, &self.device.pci_address, n)
    }

    /// The name used when the seqnum-based one is taken by an incident of another boot (the
    /// kernel's SEQNUM restarts at every boot): the detection unix time instead.
    pub fn fallback_name(&self) -> String {
        wedge_name(
            &self.node,
            &self.device.pci_address,
            self.detected_at.as_second().max(0) as u64,
        )
    }

    /// This detection as a later event of an open incident.
    pub fn as_event(&self) -> WedgeEvent {
        WedgeEvent {
            seqnum: self.seqnum,
            methods: self.methods.clone(),
            at: Time(self.detected_at),
            pid: self.blamed.as_ref().map(|b| b.pid),
        }
    }
}

/// `<node>-<bdf>-<n>` with the PCI address's `:` and `.` turned into `-`, lower-cased.
pub fn wedge_name(node: &str, pci: &str, n: u64) -> String {
    let bdf = pci.replace([':', '.'], "-");
    format!("{node}-{bdf}-{n}").to_ascii_lowercase()
}

/// The labels every GpuWedge carries: node and device (for "open incident" selectors).
pub fn wedge_labels(node: &str, pci: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NODE.to_string(), node.to_string()),
        (LABEL_DEVICE.to_string(), device_label(pci)),
    ])
}

/// The label selector of all wedges of one device of one node.
pub fn device_selector(node: &str, pci: &str) -> String {
    format!("{LABEL_NODE}={node},{LABEL_DEVICE}={}", device_label(pci))
}

/// The PCI address named in a DEVPATH (`/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0`
/// → `0000:03:00.0`): the last component before `/drm/` that looks like a BDF.
pub fn bdf_from_devpath(devpath: &str) -> Option<String> {
    let head = devpath.split("/drm/").next()?;
    head.rsplit('/').find(|c| is_bdf(c)).map(str::to_string)
}

/// Whether `s` is `dddd:bb:dd.f` in lower-case hex.
pub fn is_bdf(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |c: &u8| c.is_ascii_digit() || (b'a'..=b'f').contains(c);
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11])
        && b[..4].iter().chain(&b[5..7]).chain(&b[8..10]).all(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_comes_from_the_devpath_when_sysfs_is_missing() {
        assert_eq!(
            bdf_from_devpath("/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0").as_deref(),
            Some("0000:03:00.0")
        );
        assert_eq!(bdf_from_devpath("/devices/platform/gpu/drm/card0"), None);
    }
}
