//! DRA quarantine, the pure part (docs/design.md §5 "On DRA clusters"): the `DeviceTaintRule` that keeps
//! the scheduler away from one wedged device, the pods that hold that device through their
//! ResourceClaims, the device count a policy's `maxUnavailableDevices` is a share of, and
//! whether `--dra` turns quarantine on given what the cluster serves and allows.
//!
//! No I/O: `quarantine` creates and deletes the rule and probes the cluster, the reconciler
//! lists claims and slices.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::resource::v1::{
    DeviceTaint, DeviceTaintRule, DeviceTaintRuleSpec, DeviceTaintSelector, ResourceClaim,
    ResourceSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use unwedge_crds::labels::{LABEL_WEDGE, TAINT_KEY};
use unwedge_crds::{DraDeviceRef, PodRef};

/// The taint effect unwedge uses: no new allocations; running pods are drained through the
/// Eviction API (so PodDisruptionBudgets hold), never by a `NoExecute` taint.
pub const EFFECT: &str = "NoSchedule";
/// Annotation on the rule with the full GpuWedge name (the label may be shortened).
pub const ANN_WEDGE: &str = "unwedge.io/wedge";

/// `s` if it fits in `max` bytes, else a prefix and a stable hash of the whole, so two long
/// names never collapse into one.
fn fit(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    // FNV-1a, 32 bits: stable across releases (unlike std's hasher).
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let keep = max - 9;
    let mut prefix: String = s.chars().take(keep).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{h:08x}")
}

/// The rule's name for a wedge: `unwedge-<wedge>` (shortened with a hash past 253 bytes).
pub fn rule_name(wedge: &str) -> String {
    fit(&format!("unwedge-{wedge}"), 253)
}

/// The value of the `unwedge.io/wedge` label for a wedge (label values hold 63 bytes).
pub fn wedge_label(wedge: &str) -> String {
    fit(wedge, 63)
}

/// Whether `rule` is unwedge's rule for `wedge`: named for it and labelled with it. A rule
/// without the label is someone else's and is never updated or deleted.
pub fn is_ours(rule: &DeviceTaintRule, wedge: &str) -> bool {
    rule.metadata.name.as_deref() == Some(rule_name(wedge).as_str())
        && rule
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_WEDGE))
            .is_some_and(|v| *v == wedge_label(wedge))
}

/// The DeviceTaintRule that quarantines `device` for the GpuWedge `wedge` (uid `wedge_uid`,
/// the owner: deleting the wedge lets the garbage collector delete the rule).
pub fn rule(wedge: &str, wedge_uid: Option<&str>, device: &DraDeviceRef) -> DeviceTaintRule {
    DeviceTaintRule {
        metadata: ObjectMeta {
            name: Some(rule_name(wedge)),
            labels: Some(BTreeMap::from([(
                LABEL_WEDGE.to_string(),
                wedge_label(wedge),
            )])),
            annotations: Some(BTreeMap::from([(ANN_WEDGE.to_string(), wedge.to_string())])),
            owner_references: wedge_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "unwedge.io/v1alpha1".into(),
                    kind: "GpuWedge".into(),
                    name: wedge.to_string(),
                    uid: uid.to_string(),
                    controller: Some(true),
                    block_owner_deletion: Some(false),
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: DeviceTaintRuleSpec {
            device_selector: Some(DeviceTaintSelector {
                driver: Some(device.driver.clone()),
                pool: Some(device.pool.clone()),
                device: Some(device.device.clone()),
            }),
            taint: DeviceTaint {
                key: TAINT_KEY.to_string(),
                value: Some(wedge_label(wedge)),
                effect: EFFECT.to_string(),
                time_added: None,
            },
        },
        status: None,
    }
}

/// Whether `claim`'s allocation includes `device`.
pub fn allocates(claim: &ResourceClaim, device: &DraDeviceRef) -> bool {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())
        .is_some_and(|rs| {
            rs.iter().any(|r| {
                r.driver == device.driver && r.pool == device.pool && r.device == device.device
            })
        })
}

/// The pods that hold `device`: every pod that reserves (`status.reservedFor`) a claim whose
/// allocation includes it. A claim shared by several pods names all of them. Sorted, unique.
pub fn consumers(claims: &[ResourceClaim], device: &DraDeviceRef) -> Vec<PodRef> {
    let pods: BTreeSet<PodRef> = claims
        .iter()
        .filter(|c| allocates(c, device))
        .flat_map(|c| {
            let ns = c.metadata.namespace.clone().unwrap_or_default();
            c.status
                .iter()
                .flat_map(|s| s.reserved_for.iter().flatten())
                .filter(|r| r.resource == "pods" && r.api_group.as_deref().unwrap_or("").is_empty())
                .map(move |r| PodRef {
                    namespace: ns.clone(),
                    name: r.name.clone(),
                    container: None,
                })
        })
        .collect();
    pods.into_iter().collect()
}

/// Whether `device` is published in one of `slices` (after a recovery: advertised again).
pub fn advertised(slices: &[ResourceSlice], device: &DraDeviceRef) -> bool {
    slices.iter().any(|s| {
        s.spec.driver == device.driver
            && s.spec.pool.name == device.pool
            && s.spec
                .devices
                .iter()
                .flatten()
                .any(|d| d.name == device.device)
    })
}

/// The devices published for `nodes` (the share `maxUnavailableDevices` is a percentage of).
/// A pool split across several slices, or republished in a newer generation, counts each
/// device once (the newest generation of each pool wins).
pub fn devices_on(slices: &[ResourceSlice], nodes: &BTreeSet<String>) -> u32 {
    let mut newest: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for s in slices {
        let key = (s.spec.driver.as_str(), s.spec.pool.name.as_str());
        let g = newest.entry(key).or_insert(s.spec.pool.generation);
        *g = (*g).max(s.spec.pool.generation);
    }
    let mut devices: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    for s in slices {
        let on_node = s.spec.node_name.as_ref().is_some_and(|n| nodes.contains(n));
        let key = (s.spec.driver.as_str(), s.spec.pool.name.as_str());
        if !on_node || newest.get(&key) != Some(&s.spec.pool.generation) {
            continue;
        }
        for d in s.spec.devices.iter().flatten() {
            devices.insert((key.0, key.1, d.name.as_str()));
        }
    }
    devices.len() as u32
}

/// `--dra`: quarantine DRA devices (`On`), never (`Off`), or when the cluster allows it (`Auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On when the API server serves DeviceTaintRules and the operator holds [`RIGHTS`].
    Auto,
    /// On, whatever the cluster says (a missing right is reported, and quarantines fail).
    On,
    /// Off: a wedged DRA device cordons its node, as on a device-plugin node.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            other => Err(format!("--dra {other:?}: expected auto, on or off")),
        }
    }
}

/// What quarantine does through the API, all cluster-wide in `resource.k8s.io` as
/// `(resource, verb)`: its rule (read, create, delete), the consumers of a device (every
/// namespace's ResourceClaims) and the devices of a policy's nodes (every ResourceSlice).
pub const RIGHTS: [(&str, &str); 5] = [
    ("devicetaintrules", "get"),
    ("devicetaintrules", "create"),
    ("devicetaintrules", "delete"),
    ("resourceclaims", "list"),
    ("resourceslices", "list"),
];

/// What the cluster answered when asked whether quarantine can work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Discovery: whether `resource.k8s.io/v1` serves `devicetaintrules` (`Err`: it failed).
    pub served: Result<bool, String>,
    /// The [`RIGHTS`] the operator was refused, as `verb resource` (`Err`: the
    /// SelfSubjectAccessReviews failed).
    pub denied: Result<Vec<String>, String>,
}

/// Whether DRA devices are quarantined, and why: logged at start, written as the
/// `DeviceQuarantine` condition of every RecoveryPolicy and, when a DRA device's node is
/// cordoned instead, as a `QuarantineUnavailable` Event on the wedge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Support {
    /// Quarantine DRA devices.
    pub on: bool,
    /// Condition reason (CamelCase).
    pub reason: &'static str,
    /// What it means and, when off by accident, what to do.
    pub message: String,
}

impl Support {
    /// Quarantine on, every right held.
    pub fn enabled() -> Support {
        Support {
            on: true,
            reason: "Enabled",
            message:
                "DRA devices are quarantined with a DeviceTaintRule; their node stays schedulable"
                    .into(),
        }
    }
}

const GRANT: &str = "grant them (Helm: dra.enabled=true renders them) and restart the operator";

/// Decides `--dra` from what the cluster answered (`probe`: `None` when not asked, as for
/// `off`). `auto` is on only when DeviceTaintRules are served and every right in [`RIGHTS`]
/// is held, so an operator without the DRA RBAC keeps cordoning nodes instead of failing
/// every reconcile on a 403.
pub fn support(mode: Mode, probe: Option<&Probe>) -> Support {
    let off = |reason, message: String| Support {
        on: false,
        reason,
        message,
    };
    let served = probe.map(|p| &p.served);
    let denied = probe.map(|p| &p.denied);
    match (mode, served, denied) {
        (Mode::Off, _, _) => off("Disabled", "--dra=off: a wedged DRA device cordons its node".into()),
        (Mode::On, _, Some(Ok(d))) if !d.is_empty() => Support {
            on: true,
            reason: "MissingRights",
            message: format!(
                "--dra=on, but the operator may not {}: every quarantine fails until then; {GRANT}",
                d.join(", ")
            ),
        },
        (Mode::On, _, _) => Support {
            message: "--dra=on: DRA devices are quarantined with a DeviceTaintRule; their node stays schedulable".into(),
            ..Support::enabled()
        },
        (Mode::Auto, None, _) => off("NotProbed", "--dra=auto without a probe of the cluster".into()),
        (Mode::Auto, Some(Err(e)), _) => off(
            "DiscoveryFailed",
            format!("discovery of resource.k8s.io/v1 failed ({e}); set --dra=on to force quarantine"),
        ),
        (Mode::Auto, Some(Ok(false)), _) => off(
            "NotServed",
            "the API server serves no resource.k8s.io/v1 DeviceTaintRule (Kubernetes 1.37 or later)".into(),
        ),
        (Mode::Auto, Some(Ok(true)), None) => off("NotProbed", "--dra=auto: rights not checked".into()),
        (Mode::Auto, Some(Ok(true)), Some(Err(e))) => off(
            "AccessReviewFailed",
            format!("cannot check the operator's DRA rights ({e}); set --dra=on to force quarantine"),
        ),
        (Mode::Auto, Some(Ok(true)), Some(Ok(d))) if !d.is_empty() => off(
            "MissingRights",
            format!(
                "DeviceTaintRules are served, but the operator may not {}; {GRANT}",
                d.join(", ")
            ),
        ),
        (Mode::Auto, Some(Ok(true)), Some(Ok(_))) => Support::enabled(),
    }
}

/// The Warning a wedge gets when its DRA device's node is cordoned because quarantine is off.
pub fn cordoned_instead(device: &DraDeviceRef, node: &str, support: &Support) -> String {
    format!(
        "node {node} is cordoned instead of quarantining DRA device {}/{}/{}: DRA quarantine is off ({}: {})",
        device.driver, device.pool, device.device, support.reason, support.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dev(name: &str) -> DraDeviceRef {
        DraDeviceRef {
            driver: "gpu.e2e.unwedge.io".into(),
            pool: "node-a".into(),
            device: name.into(),
        }
    }

    fn claim(ns: &str, name: &str, devices: &[&str], pods: &[&str]) -> ResourceClaim {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"devices": {"requests": []}},
            "status": {
                "allocation": {"devices": {"results": devices.iter().map(|d| json!({
                    "request": "gpu", "driver": "gpu.e2e.unwedge.io", "pool": "node-a", "device": d
                })).collect::<Vec<_>>()}},
                "reservedFor": pods.iter().map(|p| json!({"resource": "pods", "name": p, "uid": format!("uid-{p}")})).collect::<Vec<_>>()
            }
        }))
        .unwrap()
    }

    fn slice(node: &str, pool: &str, generation: i64, devices: &[&str]) -> ResourceSlice {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{node}-{pool}-{generation}")},
            "spec": {
                "driver": "gpu.e2e.unwedge.io", "nodeName": node,
                "pool": {"name": pool, "generation": generation, "resourceSliceCount": 1},
                "devices": devices.iter().map(|d| json!({"name": d})).collect::<Vec<_>>()
            }
        }))
        .unwrap()
    }

    #[test]
    fn the_rule_selects_exactly_the_device_with_a_noschedule_taint_and_our_label() {
        let r = rule("node-a-0000-03-00-0-7", Some("u-1"), &dev("gpu-3"));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["metadata"]["name"], "unwedge-node-a-0000-03-00-0-7");
        assert_eq!(
            v["metadata"]["labels"]["unwedge.io/wedge"],
            "node-a-0000-03-00-0-7"
        );
        assert_eq!(
            v["spec"]["deviceSelector"],
            json!({"driver": "gpu.e2e.unwedge.io", "pool": "node-a", "device": "gpu-3"})
        );
        assert_eq!(v["spec"]["taint"]["key"], "unwedge.io/wedged");
        assert_eq!(v["spec"]["taint"]["effect"], "NoSchedule");
        assert_eq!(v["metadata"]["ownerReferences"][0]["kind"], "GpuWedge");
        assert!(is_ours(&r, "node-a-0000-03-00-0-7"));
        assert!(
            !is_ours(&r, "node-a-0000-03-00-0-8"),
            "another wedge's rule"
        );
    }

    #[test]
    fn a_rule_without_our_label_is_not_ours_even_under_our_name() {
        let mut r = rule("w", None, &dev("gpu-3"));
        r.metadata.labels = None;
        assert!(!is_ours(&r, "w"));
        let mut r = rule("w", None, &dev("gpu-3"));
        r.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_WEDGE.into(), "other".into());
        assert!(!is_ours(&r, "w"));
    }

    #[test]
    fn long_wedge_names_fit_label_and_name_limits_and_stay_distinct() {
        let a = format!("{}-0000-03-00-0-1", "n".repeat(240));
        let b = format!("{}-0000-03-00-0-2", "n".repeat(240));
        assert!(wedge_label(&a).len() <= 63);
        assert!(rule_name(&a).len() <= 253);
        assert_ne!(wedge_label(&a), wedge_label(&b));
        assert_ne!(rule_name(&a), rule_name(&b));
        assert!(is_ours(&rule(&a, None, &dev("gpu-0")), &a));
    }

    #[test]
    fn consumers_are_the_pods_reserving_a_claim_allocated_the_device() {
        let claims = vec![
            claim("w", "c3", &["gpu-3"], &["p3"]),
            claim("w", "c4", &["gpu-4"], &["p4"]),
            claim("x", "shared", &["gpu-1", "gpu-3"], &["s1", "s2"]),
            claim("w", "unreserved", &["gpu-3"], &[]),
        ];
        let got = consumers(&claims, &dev("gpu-3"));
        let names: Vec<String> = got
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        assert_eq!(names, vec!["w/p3", "x/s1", "x/s2"]);
        assert!(consumers(&claims, &dev("gpu-7")).is_empty());
    }

    #[test]
    fn a_device_of_another_pool_or_driver_is_not_the_wedged_one() {
        let mut other_pool = dev("gpu-3");
        other_pool.pool = "node-b".into();
        let mut other_driver = dev("gpu-3");
        other_driver.driver = "other.example.com".into();
        let c = claim("w", "c", &["gpu-3"], &["p"]);
        assert!(allocates(&c, &dev("gpu-3")));
        assert!(!allocates(&c, &other_pool));
        assert!(!allocates(&c, &other_driver));
    }

    #[test]
    fn devices_are_counted_once_per_selected_node_from_the_newest_generation() {
        let slices = vec![
            slice("node-a", "node-a", 1, &["gpu-0", "gpu-1"]),
            slice("node-a", "node-a", 2, &["gpu-0", "gpu-1", "gpu-2"]),
            slice("node-b", "node-b", 1, &["gpu-0", "gpu-1"]),
            slice("node-c", "node-c", 1, &["gpu-0"]),
        ];
        let sel: BTreeSet<String> = ["node-a".to_string(), "node-b".to_string()].into();
        assert_eq!(devices_on(&slices, &sel), 5);
        assert!(advertised(&slices, &dev("gpu-2")));
        assert!(!advertised(&slices, &dev("gpu-9")));
    }

    fn probe(served: Result<bool, &str>, denied: Result<&[&str], &str>) -> Probe {
        Probe {
            served: served.map_err(String::from),
            denied: denied
                .map(|d| d.iter().map(|s| s.to_string()).collect())
                .map_err(String::from),
        }
    }

    #[test]
    fn auto_is_on_only_when_served_and_every_right_is_held() {
        let s = support(Mode::Auto, Some(&probe(Ok(true), Ok(&[]))));
        assert!(s.on);
        assert_eq!(s.reason, "Enabled");
        for (p, reason) in [
            (probe(Ok(false), Ok(&[])), "NotServed"),
            (probe(Err("timeout"), Ok(&[])), "DiscoveryFailed"),
            (probe(Ok(true), Err("forbidden")), "AccessReviewFailed"),
            (
                probe(
                    Ok(true),
                    Ok(&["create devicetaintrules", "list resourceslices"]),
                ),
                "MissingRights",
            ),
        ] {
            let s = support(Mode::Auto, Some(&p));
            assert!(!s.on, "{reason}: {s:?}");
            assert_eq!(s.reason, reason);
            assert!(!s.message.is_empty(), "{s:?}");
        }
        assert!(!support(Mode::Auto, None).on);
    }

    #[test]
    fn missing_rights_are_named_with_what_to_do() {
        let s = support(
            Mode::Auto,
            Some(&probe(
                Ok(true),
                Ok(&["create devicetaintrules", "list resourceslices"]),
            )),
        );
        assert!(
            s.message
                .contains("may not create devicetaintrules, list resourceslices"),
            "{s:?}"
        );
        assert!(s.message.contains("dra.enabled=true"), "{s:?}");
    }

    #[test]
    fn on_and_off_are_obeyed_whatever_the_cluster_says() {
        let none = probe(Ok(false), Ok(&["create devicetaintrules"]));
        assert!(!support(Mode::Off, Some(&none)).on);
        assert_eq!(support(Mode::Off, None).reason, "Disabled");
        let forced = support(Mode::On, Some(&none));
        assert!(forced.on);
        assert_eq!(forced.reason, "MissingRights", "forced on, but said loudly");
        assert_eq!(support(Mode::On, None).reason, "Enabled");
        assert!(support(Mode::On, Some(&probe(Ok(true), Ok(&[])))).on);
    }

    #[test]
    fn modes_parse_like_the_flag() {
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Auto));
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes".parse::<Mode>().is_err());
    }

    #[test]
    fn the_cordon_warning_names_the_device_and_the_reason() {
        let s = support(Mode::Off, None);
        assert_eq!(
            cordoned_instead(&dev("gpu-3"), "node-a", &s),
            "node node-a is cordoned instead of quarantining DRA device gpu.e2e.unwedge.io/node-a/gpu-3: DRA quarantine is off (Disabled: --dra=off: a wedged DRA device cordons its node)"
        );
    }
}
