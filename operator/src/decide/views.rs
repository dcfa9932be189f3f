//! What `decide` looks at: the wedge, its node and pods, the governing policy and the wedge's
//! history, as plain values the reconciler loads (docs/design.md §2).

use jiff::Timestamp;
use unwedge_crds::{Admission, GpuWedge, PodRef};

use crate::budget::Limits;
use crate::settings::Settings;

/// The node as the decision needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// The `unwedge.io/cordoned-by` annotation.
    pub cordoned_by: Option<String>,
}

impl NodeView {
    /// What decisions read of `n`.
    pub fn of(n: &k8s_openapi::api::core::v1::Node) -> NodeView {
        use kube::ResourceExt as _;
        NodeView {
            name: n.name_any(),
            unschedulable: n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            cordoned_by: n
                .annotations()
                .get(unwedge_crds::labels::ANN_CORDONED_BY)
                .cloned(),
        }
    }
}

/// A pod bound to the wedge's node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (an in-place restart names the pod by it, so a replacement is never touched).
    pub uid: String,
    /// `restartPolicy: Never`: its containers cannot be restarted in place.
    pub restart_never: bool,
    /// A static (mirror) pod: never evicted.
    pub mirror: bool,
    /// Owned by a DaemonSet: stays, like `kubectl drain --ignore-daemonsets`.
    pub daemon_set: bool,
    /// Has a deletionTimestamp: on its way out.
    pub terminating: bool,
    /// Succeeded or Failed: holds nothing.
    pub finished: bool,
    /// Has an emptyDir volume (its data goes with an eviction).
    pub empty_dir: bool,
}

/// An earlier GpuWedge of the same device (for rate limits and the repeat-offender rule).
#[derive(Clone, Debug, PartialEq)]
pub struct PastWedge {
    /// Its name.
    pub name: String,
    /// When it reached the API server ([`arrived`]).
    pub detected_at: Timestamp,
    /// When it last evicted a pod (a `none` eviction round), if it did.
    pub evicted_at: Option<Timestamp>,
}

/// The human verbs found on the wedge's annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verbs {
    /// `unwedge.io/approve` ("" or a method).
    pub approve: Option<String>,
    /// `unwedge.io/retry`.
    pub retry: Option<String>,
    /// `unwedge.io/abandon` (a reason).
    pub abandon: Option<String>,
    /// `unwedge.io/by`: the human, as admission proved.
    pub by: Option<String>,
}

/// The governing policy, resolved.
#[derive(Clone, Debug)]
pub struct PolicyView<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its settings, defaults applied.
    pub settings: &'a Settings,
    /// Its admission ledger (from the cache; the CAS re-checks it fresh).
    pub ledger: &'a [Admission],
    /// Its limits for its current size.
    pub limits: Limits,
    /// Open wedges of this policy that arrived earlier and are not admitted: `(wedge, node)`.
    pub waiting_ahead: Vec<(String, String)>,
    /// Whether the circuit breaker holds automatic actions.
    pub breaker_tripped: bool,
}

/// Which policy governs the wedge's node.
#[derive(Clone, Debug)]
pub enum Governance<'a> {
    /// One policy governs.
    Policy(PolicyView<'a>),
    /// No policy selects the node and there is no default.
    NoPolicy,
    /// Several policies claim the node.
    Conflict(Vec<String>),
    /// The governing policy cannot be used as written.
    Invalid {
        /// Its name.
        name: String,
        /// What is wrong.
        error: String,
    },
}

/// Everything `decide` looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The wedge.
    pub wedge: &'a GpuWedge,
    /// Its node, if it exists.
    pub node: Option<&'a NodeView>,
    /// The governing policy.
    pub policy: Governance<'a>,
    /// Pods bound to the node.
    pub pods: &'a [PodView],
    /// Earlier GpuWedges of the same device (not this one).
    pub history: &'a [PastWedge],
    /// Other open (not Recovered/Abandoned) wedges on the same node.
    pub others_on_node: &'a [String],
    /// Whether the device is advertised again after a recovery (`None`: cannot tell).
    pub device_advertised: Option<bool>,
    /// The clock.
    pub now: Timestamp,
    /// Who the operator is (recorded as the approver of automatic approvals).
    pub operator: &'a str,
    /// Human verbs on the wedge.
    pub verbs: Verbs,
    /// The wedge's DRA device, when the operator quarantines DRA devices and the agent named
    /// one (`spec.device.dra`): the non-reboot path then taints the device, not the node.
    pub dra: Option<DraView>,
    /// Whether unwedge's DeviceTaintRule for this wedge exists now.
    pub quarantine_rule: bool,
    /// The wedge's Node is gone (confirmed by a fresh read, not only missing from the cache):
    /// the incident ends as Abandoned with reason NodeDeleted and its places are released.
    pub node_deleted: bool,
}

/// The DRA side of a wedge (docs/design.md §5 "On DRA clusters").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DraView {
    /// The DeviceTaintRule's name.
    pub rule: String,
    /// Pods that reserve a ResourceClaim allocated the device.
    pub consumers: Vec<PodRef>,
}

/// When the wedge reached the API server (`metadata.creationTimestamp`, the API server's clock).
/// Queue order, the circuit breaker's window and the repeat-offender window count from it, never
/// from the agent-written `spec.detectedAt`: a node cannot jump the queue or trip a policy's
/// breaker by dating its wedges. Falls back to `detectedAt` only for an object that was never
/// stored (unit tests).
pub fn arrived(w: &GpuWedge) -> Timestamp {
    w.metadata
        .creation_timestamp
        .as_ref()
        .map_or(w.spec.detected_at.0, |t| t.0)
}
