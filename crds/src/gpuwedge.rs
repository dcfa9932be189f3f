//! `GpuWedge`: one object per incident of one device on one node (docs/design.md §3).
//!
//! The agent writes the spec (immutable after creation) and the agent part of the status;
//! the operator writes the operator part. Each writer owns its own fields, so merge patches
//! from the two never overwrite each other.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Method;

/// A wedged GPU as the node agent saw it: who, what the kernel said, and when.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "unwedge.io",
    version = "v1alpha1",
    kind = "GpuWedge",
    plural = "gpuwedges",
    shortname = "gw",
    category = "unwedge",
    status = "GpuWedgeStatus",
    printcolumn = r#"{"name":"NODE","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"DEVICE","type":"string","jsonPath":".spec.device.pciAddress"}"#,
    printcolumn = r#"{"name":"DRIVER","type":"string","jsonPath":".spec.device.driver"}"#,
    printcolumn = r#"{"name":"METHODS","type":"string","jsonPath":".status.methods"}"#,
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"ACTION","type":"string","jsonPath":".status.action"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"CARD","type":"string","jsonPath":".spec.device.card","priority":1}"#,
    printcolumn = r#"{"name":"DRA-DRIVER","type":"string","jsonPath":".spec.device.dra.driver","priority":1}"#,
    printcolumn = r#"{"name":"POOL","type":"string","jsonPath":".spec.device.dra.pool","priority":1}"#,
    printcolumn = r#"{"name":"DRA-DEVICE","type":"string","jsonPath":".spec.device.dra.device","priority":1}"#,
    printcolumn = r#"{"name":"POLICY","type":"string","jsonPath":".status.policy","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self == oldSelf", "message": "spec is immutable: open a new GpuWedge for a new incident"}
]))]
pub struct GpuWedgeSpec {
    /// The node whose device is wedged; the agent only ever writes wedges of its own node.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// The wedged device, as resolved from sysfs.
    pub device: DeviceRef,
    /// The kernel's recovery methods from `WEDGED=`, verbatim and in the kernel's order (fewer
    /// to more side effects). Any well-formed token is kept; unknown ones mean "ask a human".
    #[schemars(
        length(min = 1, max = 16),
        inner(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"), length(max = 63))
    )]
    pub methods: Vec<String>,
    /// When the agent received the uevent.
    pub detected_at: Time,
    /// The node's boot id (`/proc/sys/kernel/random/boot_id`) when the wedge was detected.
    #[serde(default)]
    pub boot_id: String,
    /// Every key of the uevent as received (ACTION, DEVPATH, SEQNUM, WEDGED, PID, ...). At most
    /// 64 keys of at most 64 characters, values of at most 1024 (a kernel uevent buffer is 2 KiB).
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "x-kubernetes-validations" = [
            {"rule": "self.all(k, size(k) <= 64 && size(self[k]) <= 1024)",
             "message": "uevent keys are at most 64 characters and values at most 1024"}
        ]
    ))]
    pub uevent: BTreeMap<String, String>,
    /// The task the driver blamed (`PID=`/`TASK=`, Linux 6.17+), mapped to its pod when possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blamed: Option<Blamed>,
}

/// The PCI and DRM identity of a GPU.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRef {
    /// PCI address (domain:bus:device.function), e.g. `0000:03:00.0`.
    #[schemars(regex(pattern = r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$"))]
    pub pci_address: String,
    /// The primary DRM node, e.g. `card0` (may change after a rebind; the PCI address does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
    /// The render node, e.g. `renderD128`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_node: Option<String>,
    /// The kernel driver bound when the wedge was seen (`xe`, `i915`, `amdgpu`, ...); empty when
    /// none was bound. Informational: the agent reads the driver from sysfs before it acts and
    /// never takes it from here.
    #[serde(default)]
    #[schemars(regex(pattern = r"^([A-Za-z0-9_][A-Za-z0-9_-]{0,62})?$"))]
    pub driver: String,
    /// PCI vendor id, e.g. `0x8086`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_id: Option<String>,
    /// PCI device id, e.g. `0xe20b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// NUMA node of the device, when the platform reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<i32>,
    /// The device as a DRA ResourceSlice publishes it, on nodes that allocate GPUs through DRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dra: Option<DraDeviceRef>,
}

/// A device in a DRA ResourceSlice.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DraDeviceRef {
    /// DRA driver name.
    pub driver: String,
    /// Pool name.
    pub pool: String,
    /// Device name within the pool.
    pub device: String,
}

/// The task a driver blamed for a hang, and where it ran.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Blamed {
    /// The host PID from `PID=`.
    pub pid: i64,
    /// The task name from `TASK=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The container id read from `/proc/<PID>/cgroup`, when the task ran in a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The pod of that container, when the kubelet knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// A pod by namespace and name (and uid when known, to tell a replacement apart).
#[derive(
    Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Container name, when the reference is about one container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// Where a wedge stands. The operator writes it; see docs/design.md §4 for the transitions.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Seen by the agent, not yet handled by the operator.
    #[default]
    Detected,
    /// Waiting for room in the policy's budget.
    Queued,
    /// Admitted; the node is cordoned.
    Cordoned,
    /// Admitted; only the DRA device is tainted, the node keeps serving.
    Quarantined,
    /// Evicting the pods that hold a device of the reset domain.
    Draining,
    /// Drained; a human must approve (policy approval: Manual).
    AwaitingApproval,
    /// A method and attempt are approved; the agent has not reported a start yet.
    Approved,
    /// The agent is carrying out the approved attempt.
    Recovering,
    /// The attempt succeeded; waiting for the device to be advertised again.
    Verifying,
    /// `none`: the driver recovered by itself; applying the policy's none.action.
    Restarting,
    /// Done: device healthy, node uncordoned if unwedge cordoned it.
    Recovered,
    /// unwedge will not act further; a human must (the condition says what).
    NeedsAttention,
    /// A human took over (`unwedge.io/abandon`); unwedge let go of the node.
    Abandoned,
}

impl Phase {
    /// Every phase, in lifecycle order (gauges pre-create a series for each).
    pub const ALL: [Phase; 13] = [
        Phase::Detected,
        Phase::Queued,
        Phase::Cordoned,
        Phase::Quarantined,
        Phase::Draining,
        Phase::AwaitingApproval,
        Phase::Approved,
        Phase::Recovering,
        Phase::Verifying,
        Phase::Restarting,
        Phase::Recovered,
        Phase::NeedsAttention,
        Phase::Abandoned,
    ];

    /// The position of `self` in [`Phase::ALL`]. An exhaustive match: a new variant does not
    /// compile until it is placed here, and the test below checks `ALL` agrees.
    pub const fn index(self) -> usize {
        match self {
            Phase::Detected => 0,
            Phase::Queued => 1,
            Phase::Cordoned => 2,
            Phase::Quarantined => 3,
            Phase::Draining => 4,
            Phase::AwaitingApproval => 5,
            Phase::Approved => 6,
            Phase::Recovering => 7,
            Phase::Verifying => 8,
            Phase::Restarting => 9,
            Phase::Recovered => 10,
            Phase::NeedsAttention => 11,
            Phase::Abandoned => 12,
        }
    }

    /// Whether the incident is over (nothing more will happen to it).
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Recovered | Phase::Abandoned)
    }
}

/// Observed state of a GpuWedge.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuWedgeStatus {
    // ---- agent part ----
    /// Containers that hold a device of the reset domain (agent, refreshed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<Vec<Consumer>>,
    /// The devices each method would disturb (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_domain: Option<Vec<DomainDevice>>,
    /// Later uevents for the same device while the incident is open (agent): the newest
    /// 32 only; `eventsDropped` counts the older ones left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub events: Option<Vec<WedgeEvent>>,
    /// How many later uevents were left out of `events` because it was full (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_dropped: Option<u64>,
    /// Results of approved attempts (agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptResult>>,
    /// Problems the agent wants a human to see (missing sysfs entries, open fds, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_message: Option<String>,
    /// The agent runs with `--dry-run` (agent): it never touches the host, so the operator
    /// records what it would do and disrupts nothing (no cordon, no eviction, no approval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_dry_run: Option<bool>,

    // ---- operator part ----
    /// Where the wedge stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The method list the operator plans from (the newest the kernel sent), comma-joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<String>,
    /// What is being done now, e.g. `rebind#1`, `evict-blamed`, `waiting: budget`. For people:
    /// the operator never reads it back (the plan is in `plan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The rung the operator drains for, awaits approval of or approved: written with the
    /// action that announces it, kept while a human is asked (NeedsAttention) so a retry
    /// resumes where the ladder stood, cleared when the wedge plans afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// The RecoveryPolicy that governs this wedge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Standard conditions: Admitted, Drained, Approved, Recovered, NeedsAttention, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// The method and attempt the agent may carry out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Evictions the operator made for this wedge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evictions: Option<Vec<Eviction>>,
    /// Why the wedge waits for budget, e.g. `2/2 nodes under recovery`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// The limit the wedge waits for, while it waits for budget (`budget` says it in words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<BudgetLimit>,
    /// Whether unwedge cordoned the node for this wedge (and so may uncordon it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cordoned: Option<bool>,
    /// The DeviceTaintRule unwedge created for this wedge, on DRA nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_rule: Option<String>,
    /// When the operator admitted the wedge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_at: Option<Time>,
    /// When the current phase began (timeouts count from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Time>,
    /// When the wedge was Recovered or Abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// The last generation the operator acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A container that holds a device.
#[derive(
    Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Consumer {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    #[serde(default)]
    pub container: String,
    /// The device id as the device plugin or DRA driver names it.
    #[serde(default)]
    pub device_id: String,
    /// The PCI address of the device that id maps to.
    #[serde(default)]
    pub pci_address: String,
}

/// A device that a recovery method will disturb.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainDevice {
    /// PCI address.
    pub pci_address: String,
    /// DRM card node, for GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<String>,
    /// DRM render node, for GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_node: Option<String>,
    /// Why it is in the domain: `self`, `xgmi-hive`, `same-slot`, `sriov-vf`.
    pub relation: String,
    /// The methods that disturb it.
    pub methods: Vec<String>,
}

/// A later uevent for the device of an open incident.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WedgeEvent {
    /// The kernel's SEQNUM.
    #[serde(default)]
    pub seqnum: Option<u64>,
    /// The methods it listed, in order.
    pub methods: Vec<String>,
    /// When the agent received it.
    pub at: Time,
    /// The blamed PID, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
}

/// How an attempt ended, as the agent reports it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AttemptOutcome {
    /// Recorded before acting: the attempt id is spent.
    Started,
    /// Held by the fd gate: some process still holds a device of the reset domain.
    Blocked,
    /// The method ran and the device is healthy again.
    Succeeded,
    /// The method ran (or could not) and the device is not healthy.
    Failed,
    /// The agent refused the approval without touching anything: it did not detect this
    /// device on this node, the address is not a DRM device, or no usable driver is bound.
    /// The operator never escalates past a refusal; a human looks.
    Refused,
    /// The agent runs with `--dry-run` and only said what it would do. The operator holds the
    /// wedge for a human and never escalates.
    DryRun,
}

impl AttemptOutcome {
    /// Whether the agent is done with the attempt (nothing more will be reported for it).
    pub fn is_final(self) -> bool {
        !matches!(self, AttemptOutcome::Started | AttemptOutcome::Blocked)
    }
}

/// How many later uevents `status.events` keeps (the newest).
pub const MAX_EVENTS: usize = 32;

/// The agent's record of one approved attempt.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptResult {
    /// The attempt id from the approval.
    pub attempt: u32,
    /// The method carried out.
    pub method: String,
    /// Outcome so far.
    pub result: AttemptOutcome,
    /// When the agent recorded the start.
    pub started_at: Time,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Details: what ran, which reset the kernel used, who holds the device.
    #[serde(default)]
    pub message: String,
    /// Boot id when the attempt started (a reboot is proven by a different one after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// After a success: whether the kubelet lists the device as allocatable again (PodResources
    /// `GetAllocatableResources`: its device plugin advertises it healthy). Unset where no
    /// device plugin serves the node's GPUs (DRA nodes are checked by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised: Option<bool>,
    /// Method `restart`: each container's in-place restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub restarts: Option<Vec<ContainerRestart>>,
}

/// The method and attempt the operator plans to carry out next.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The method.
    pub method: Method,
    /// The attempt id it will be approved with (ids only grow).
    pub attempt: u32,
    /// Its place on the ladder it was planned from (1 is the first rung); absent for a
    /// method a human chose off the ladder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rung: Option<u32>,
}

/// A limit of a RecoveryPolicy's budget: the one a wedge waiting for budget waits for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BudgetLimit {
    /// `maxUnavailable`: nodes under recovery.
    Nodes,
    /// `maxUnavailableDevices`: DRA devices quarantined.
    Devices,
    /// `none.maxConcurrent`: `none` eviction rounds.
    NoneEvictions,
    /// `maxConcurrentReboots`: reboots.
    Reboots,
}

/// The operator's go-ahead for one attempt.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Approval {
    /// The method to carry out.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub method: String,
    /// Attempt id: unique per wedge, increasing; an agent runs each id at most once.
    pub attempt: u32,
    /// When it was approved.
    pub at: Time,
    /// Who approved: the operator's service account, or the human named by `unwedge.io/by`.
    pub by: String,
    /// Method `restart` only: the containers to restart in place. The agent restarts only those
    /// it sees holding the wedged device (or running the blamed task), never others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub containers: Option<Vec<ContainerTarget>>,
}

/// A container approved for an in-place restart.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerTarget {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod UID (the runtime labels every container with it: a replacement pod of the same
    /// name is never touched).
    pub uid: String,
    /// Container name in the pod spec.
    pub container: String,
}

/// How one in-place restart ended.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestartResult {
    /// Stopped, and running again in the same pod.
    Restarted,
    /// Not restarted in place (the message says why); the operator evicts its pod instead.
    Fallback,
    /// Refused: the container does not hold the wedged device (nor ran the blamed task), or is
    /// not on this node. Nothing was done to it and it is not evicted either.
    Refused,
}

/// The agent's record of one container restarted in place (method `restart`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRestart {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// How it ended.
    pub result: RestartResult,
    /// The restart count before (the runtime's attempt number of the stopped container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_restart_count: Option<u32>,
    /// The restart count of the container running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_restart_count: Option<u32>,
    /// Milliseconds from the stop request to the new container running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis_to_running: Option<u64>,
    /// Details (why it fell back, what was refused).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One eviction the operator made.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Eviction {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// When the eviction was accepted (or the pod deleted, with force).
    pub at: Time,
    /// `Evicted`, `Deleted` (force), or `Gone`.
    pub result: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_phase_once_in_index_order() {
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(p.index(), i, "{p:?}");
        }
        let names: std::collections::BTreeSet<String> =
            Phase::ALL.iter().map(|p| format!("{p:?}")).collect();
        assert_eq!(names.len(), Phase::ALL.len());
    }
}
