//! `RecoveryPolicy`: which nodes, how much disruption at once, which methods (docs/design.md §3).
//!
//! The policy's status doubles as the admission ledger: the operator admits a wedge by
//! replacing the status with the wedge added, guarded by the policy's resourceVersion, so two
//! operators (or one with a stale cache) can never both fill the last slot.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How much disruption unwedge may cause, on which nodes, with which methods.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "unwedge.io",
    version = "v1alpha1",
    kind = "RecoveryPolicy",
    plural = "recoverypolicies",
    shortname = "rp",
    category = "unwedge",
    status = "RecoveryPolicyStatus",
    printcolumn = r#"{"name":"DEFAULT","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"MAX-UNAVAILABLE","type":"string","jsonPath":".spec.maxUnavailable"}"#,
    printcolumn = r#"{"name":"APPROVAL","type":"string","jsonPath":".spec.approval"}"#,
    printcolumn = r#"{"name":"IN-USE","type":"string","jsonPath":".status.summary"}"#,
    printcolumn = r#"{"name":"PAUSED","type":"boolean","jsonPath":".spec.paused"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.nodeSelector) || !self.default || size(self.nodeSelector) == 0",
     "message": "a default policy applies to nodes no other policy selects: leave nodeSelector empty"},
    {"rule": "!has(self.escalation) || self.escalation.all(m, !has(self.allowedMethods) || m in self.allowedMethods)",
     "message": "every escalation rung must be in allowedMethods"}
]))]
pub struct RecoveryPolicySpec {
    /// The fallback policy for nodes that no other policy selects. At most one may be default.
    #[serde(default)]
    pub default: bool,
    /// Nodes this policy governs (label equality, like a Pod's nodeSelector). Empty: all nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Nodes under recovery at once: an integer or a percentage of the selected nodes
    /// (rounded down, at least 1). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_percent")]
    pub max_unavailable: Option<IntOrString>,
    /// Reboots in progress at once across the policy's nodes. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_concurrent_reboots: Option<i32>,
    /// DRA devices quarantined at once: an integer or a percentage of the devices on the
    /// selected nodes (rounded down, at least 1). Default 10%.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_percent")]
    pub max_unavailable_devices: Option<IntOrString>,
    /// Methods unwedge may carry out. Default: rebind, bus-reset, reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"), length(max = 63))
    )]
    pub allowed_methods: Option<Vec<String>>,
    /// The ladder: rungs tried in order when an attempt fails. Default: rebind, bus-reset, reboot.
    /// The first rung is the least disruptive method the kernel listed and the policy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 16),
        inner(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"), length(max = 63))
    )]
    pub escalation: Option<Vec<String>>,
    /// `Automatic` (default) or `Manual` (a human approves each recovery).
    #[serde(default)]
    pub approval: ApprovalMode,
    /// Who approves the `reboot` rung: `Manual` makes a reboot wait in AwaitingApproval (the
    /// node drained) even when `approval` is `Automatic`. Default: as `approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_approval: Option<ApprovalMode>,
    /// How pods are drained.
    #[serde(default)]
    pub drain: DrainSpec,
    /// What to do with pods when the driver recovered by itself (`WEDGED=none`).
    #[serde(default)]
    pub none: NoneSpec,
    /// How long the agent's attempt and the re-advertisement of the device may take. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub verify_timeout: Option<String>,
    /// Attempts per wedge across all rungs before NeedsAttention. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub max_attempts: Option<u32>,
    /// A device wedged this often in the window goes to NeedsAttention instead of recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_offender: Option<Threshold>,
    /// Wedges across the policy's nodes in the window above the threshold pause all automatic
    /// actions until a human resumes (annotation `unwedge.io/resume` on the policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<Threshold>,
    /// No new cordons, evictions or approvals while true.
    #[serde(default)]
    pub paused: bool,
    /// Record what would be done, do nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Finished GpuWedges kept per device. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub history_limit: Option<u32>,
}

fn int_or_percent(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "maxLength": 4,
        "description": "An integer, or a percentage such as \"10%\" (0%..100%).",
        // A CEL rule, not anyOf: the structural schema drops the branch types, and an untyped
        // `minimum` branch would accept any string.
        "x-kubernetes-validations": [{
            "rule": "type(self) == int ? self >= 0 : self.matches('^(100|[1-9]?[0-9])%$')",
            "message": "must be a non-negative integer or a percentage from 0% to 100%"
        }]
    })
}

/// Who approves recoveries.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ApprovalMode {
    /// The operator approves within the budget.
    #[default]
    Automatic,
    /// A human approves with `unwedge.io/approve` (the wedge waits in AwaitingApproval).
    Manual,
}

/// How pods are drained.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// How long evictions may be refused (PodDisruptionBudgets) before the timeout action.
    /// Default 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub timeout: Option<String>,
    /// Grace period passed to evictions; default: the pod's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period_seconds: Option<i64>,
    /// Evict pods with emptyDir volumes (their data is lost) on whole-node drains.
    #[serde(default)]
    pub delete_empty_dir_data: bool,
    /// At the timeout, delete the pods (bypassing PodDisruptionBudgets) instead of NeedsAttention.
    #[serde(default)]
    pub force: bool,
}

/// What `WEDGED=none` does to pods.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NoneAction {
    /// Record only.
    Ignore,
    /// Evict only the pod of the blamed task (`PID=`); record only when there is none.
    #[default]
    EvictBlamed,
    /// Evict every pod holding the device.
    EvictConsumers,
}

/// How the pods chosen by `none.action` are restarted (docs/design.md §4, "none").
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartMode {
    /// The node agent stops the chosen containers through the container runtime (CRI
    /// `StopContainer`) and the kubelet starts them again in the same pod, with the same device
    /// allocation. A pod with `restartPolicy: Never`, a container that does not come back in
    /// time, or a node without a runtime socket falls back to eviction, with the reason recorded.
    #[default]
    InPlace,
    /// Evict the chosen pods through the Eviction API (PodDisruptionBudgets honoured).
    Evict,
}

/// Handling of `WEDGED=none`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NoneSpec {
    /// Which pods to restart: the blamed task's (`EvictBlamed`), every consumer of the device
    /// (`EvictConsumers`) or none (`Ignore`). `restart` says how.
    #[serde(default)]
    pub action: NoneAction,
    /// How the chosen pods are restarted: `InPlace` (default: the containers restart in their
    /// pod) or `Evict`.
    #[serde(default)]
    pub restart: RestartMode,
    /// At most one restart or eviction round per device in this interval; later ones are
    /// recorded only. Default 10m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub min_interval: Option<String>,
    /// `none` incidents restarting or evicting at once across the policy's nodes. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_concurrent: Option<i32>,
}

/// N events in a sliding window.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Threshold {
    /// How many.
    #[schemars(range(min = 1))]
    pub count: u32,
    /// Within how long, e.g. `24h`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub window: String,
}

/// The admission ledger and what the operator wants people to see about the policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPolicyStatus {
    /// Wedges holding budget now (admitted and not finished). Changed only by compare-and-swap.
    #[serde(default)]
    pub admitted: Vec<Admission>,
    /// Nodes the policy selects.
    #[serde(default)]
    pub nodes_selected: u32,
    /// DRA devices on those nodes.
    #[serde(default)]
    pub devices_selected: u32,
    /// A one-line summary, e.g. `2/5 nodes, 0/1 reboots, 3 queued`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// When the circuit breaker tripped; automatic actions stay paused until resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker_tripped_at: Option<Time>,
    /// The value of `unwedge.io/resume` last honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<String>,
    /// Conditions: Conflict (another policy selects the same nodes), CircuitBreakerTripped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}

/// One wedge holding a place in the budget.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// The GpuWedge.
    pub wedge: String,
    /// Its node.
    pub node: String,
    /// What it holds: `Node` (cordon), `Device` (DRA quarantine), `None` (a none-eviction).
    pub unit: BudgetUnit,
    /// Whether it is (also) a reboot, counted against maxConcurrentReboots.
    #[serde(default)]
    pub reboot: bool,
}

/// The unit a wedge spends from the budget.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BudgetUnit {
    /// A node out of service (cordoned).
    Node,
    /// One DRA device quarantined; the node keeps serving.
    Device,
    /// A `none` eviction round.
    None,
}
