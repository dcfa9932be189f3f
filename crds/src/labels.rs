//! Names of labels, annotations, finalizers and conditions that both binaries agree on.

/// Annotation a human sets to approve a wedge (value: empty or a method name).
pub const ANN_APPROVE: &str = "unwedge.io/approve";
/// Annotation a human sets to start a new attempt from the current rung (value: any token).
pub const ANN_RETRY: &str = "unwedge.io/retry";
/// Annotation a human sets to hand the node over to a human (value: a reason).
pub const ANN_ABANDON: &str = "unwedge.io/abandon";
/// Who wrote the human verb; admission checks it equals the requester.
pub const ANN_BY: &str = "unwedge.io/by";
/// Node annotation naming the GpuWedge that made unwedge cordon the node.
pub const ANN_CORDONED_BY: &str = "unwedge.io/cordoned-by";
/// RecoveryPolicy annotation a human sets to resume after the circuit breaker tripped.
pub const ANN_RESUME: &str = "unwedge.io/resume";
/// Label on a GpuWedge: the node it belongs to (for selectors).
pub const LABEL_NODE: &str = "unwedge.io/node";
/// Label on a GpuWedge: the PCI address with `:` replaced by `-` (label-safe).
pub const LABEL_DEVICE: &str = "unwedge.io/device";
/// Label on objects unwedge creates (DeviceTaintRules): the GpuWedge that owns them.
pub const LABEL_WEDGE: &str = "unwedge.io/wedge";
/// The DRA device taint key.
pub const TAINT_KEY: &str = "unwedge.io/wedged";
/// The Node condition type set while a device on the node is unrecovered.
pub const NODE_CONDITION: &str = "GpuWedged";
/// Key the agent adds to a GpuWedge's `spec.uevent` (unless the kernel sent it) with xe's sysfs
/// `survivability_mode`, read when the wedge lists `vendor-specific` or found at agent start.
pub const UEVENT_SURVIVABILITY_MODE: &str = "SURVIVABILITY_MODE";

/// A PCI address as a label value (`0000:03:00.0` → `0000-03-00.0`).
pub fn device_label(pci: &str) -> String {
    pci.replace(':', "-")
}

/// Finalizer the operator keeps on a GpuWedge while it holds anything for it (a ledger place, a
/// cordon, a DeviceTaintRule): deleting the wedge releases them first.
pub const FINALIZER: &str = "unwedge.io/release";
