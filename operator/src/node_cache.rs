//! What the operator keeps of a Node in its cache (pure).
//!
//! The operator watches every Node (a wedge may appear on any of them), and a Node as the API
//! server sends it is mostly what no decision reads: `managedFields`, the kubelet's image list,
//! addresses, node info, capacity, every condition but ours. At ten thousand nodes that was most
//! of the leader's memory (docs/benchmarks.md §3). [`trim`] runs on each watch event before
//! the object enters the store and keeps only what the operator reads: the name and identity,
//! labels (policy selection), annotations (our cordon mark), `spec.unschedulable`, and the
//! `GpuWedged` condition the operator owns. Nodes are only ever written with patches, never
//! from the cache, so nothing trimmed can be written back.

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use unwedge_crds::labels::NODE_CONDITION;

/// Drops everything of `n` the operator does not read (see the module documentation).
pub fn trim(n: &mut Node) {
    let m = std::mem::take(&mut n.metadata);
    n.metadata = ObjectMeta {
        name: m.name,
        uid: m.uid,
        resource_version: m.resource_version,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        labels: m.labels,
        annotations: m.annotations,
        ..ObjectMeta::default()
    };
    let unschedulable = n.spec.as_ref().and_then(|s| s.unschedulable);
    n.spec = Some(NodeSpec {
        unschedulable,
        ..NodeSpec::default()
    });
    let ours: Vec<_> = n
        .status
        .take()
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ == NODE_CONDITION)
        .collect();
    n.status = Some(NodeStatus {
        conditions: (!ours.is_empty()).then_some(ours),
        ..NodeStatus::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::NodeView;
    use crate::wake::NodeShape;

    /// A node as a kubelet (here: kwok) and the API server present it.
    fn full() -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "gpu-7", "uid": "u-7", "resourceVersion": "42",
                "creationTimestamp": "2026-12-05T10:00:00Z",
                "labels": {"unwedge.io/policy": "a", "kubernetes.io/hostname": "gpu-7"},
                "annotations": {"unwedge.io/cordoned-by": "gpu-7-0000-03-00-0-1", "x": "y"},
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]
            },
            "spec": {"unschedulable": true, "podCIDR": "10.0.0.0/24",
                     "taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]},
            "status": {
                "capacity": {"cpu": "32"}, "allocatable": {"cpu": "32"},
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": NODE_CONDITION, "status": "True", "reason": "Unrecovered",
                     "message": "wedged: 0000:03:00.0"}
                ],
                "images": [{"names": ["registry.example/cuda:12"], "sizeBytes": 1}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.7"}],
                "nodeInfo": {"architecture": "amd64", "bootID": "b", "containerRuntimeVersion": "c",
                             "kernelVersion": "k", "kubeProxyVersion": "", "kubeletVersion": "v",
                             "machineID": "m", "operatingSystem": "linux", "osImage": "o",
                             "systemUUID": "s"}
            }
        }))
        .expect("a valid Node")
    }

    #[test]
    fn keeps_what_decisions_read() {
        let before = full();
        let mut after = before.clone();
        trim(&mut after);
        assert_eq!(NodeView::of(&after), NodeView::of(&before));
        assert_eq!(NodeShape::of(&after), NodeShape::of(&before));
        assert_eq!(after.metadata.labels, before.metadata.labels);
        assert_eq!(after.metadata.annotations, before.metadata.annotations);
        assert_eq!(after.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(after.metadata.uid.as_deref(), Some("u-7"));
        let conds = after.status.as_ref().and_then(|s| s.conditions.as_ref());
        let conds = conds.expect("our condition is kept");
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].type_, NODE_CONDITION);
        assert_eq!(conds[0].message.as_deref(), Some("wedged: 0000:03:00.0"));
    }

    #[test]
    fn drops_the_rest() {
        let mut n = full();
        trim(&mut n);
        assert!(n.metadata.managed_fields.is_none());
        let spec = n.spec.as_ref().expect("spec");
        assert!(spec.taints.is_none() && spec.pod_cidr.is_none());
        let st = n.status.as_ref().expect("status");
        assert!(st.images.is_none() && st.addresses.is_none() && st.node_info.is_none());
        assert!(st.capacity.is_none() && st.allocatable.is_none());
        let size = |n: &Node| serde_json::to_vec(n).expect("serializes").len();
        assert!(size(&n) * 2 < size(&full()), "trimmed: {} bytes", size(&n));
    }

    #[test]
    fn a_node_without_spec_or_status_stays_valid() {
        let mut n = Node::default();
        n.metadata.name = Some("bare".into());
        trim(&mut n);
        assert_eq!(NodeView::of(&n).name, "bare");
        assert!(!NodeView::of(&n).unschedulable);
        assert!(n.status.as_ref().is_some_and(|s| s.conditions.is_none()));
    }
}
