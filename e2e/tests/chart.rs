//! The Helm chart (issue 14): `helm lint`, `helm template` for three value sets, installs with
//! Helm 3 and Helm 4 into the real local control plane (every object accepted, the workloads
//! scheduled where they belong, the roles for people checked with impersonated users), and the
//! CRD upgrade step the chart README documents.
//!
//! The admission proofs against the chart's rendered policies are in `admission.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use e2e::cluster::{ControlPlane, ensure_binaries, repo_root};
use e2e::wait;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use unwedge_crds::{GpuWedge, RecoveryPolicy};

const NS: &str = "unwedge-system";
/// `helm template` has no cluster to ask; the chart needs >= 1.30 (ValidatingAdmissionPolicy v1).
const KUBE_VERSION: &str = "v1.37.2";
/// Every test here ends by itself within this time.
const TEST_TIMEOUT: Duration = Duration::from_secs(420);

fn chart_dir() -> PathBuf {
    repo_root().join("charts/unwedge")
}

/// Runs a Helm binary (`helm` = 3.22, `helm4` = 4.x) with its config, cache and data homes in
/// `home`, so the tests neither read nor write the user's Helm state.
fn helm(helm_bin: &str, home: &Path, args: &[&str]) -> anyhow::Result<String> {
    let bin = ensure_binaries(&[helm_bin])?.join(helm_bin);
    let out = Command::new(&bin)
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{helm_bin} {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Splits multi-document YAML into its non-empty documents.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("helm printed valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm template` of the chart with `args` (e.g. `--set k=v`), as objects.
fn template(helm_bin: &str, args: &[&str]) -> Vec<Value> {
    let home = tempfile::tempdir().expect("tempdir");
    let chart = chart_dir();
    let mut all = vec![
        "template",
        "unwedge",
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--kube-version",
        KUBE_VERSION,
    ];
    all.extend_from_slice(args);
    documents(&helm(helm_bin, home.path(), &all).unwrap_or_else(|e| panic!("{e:#}")))
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = objs
                .iter()
                .map(|o| {
                    format!(
                        "{}/{}",
                        o["kind"].as_str().unwrap_or("?"),
                        o["metadata"]["name"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            panic!("no {kind}/{name} in the rendered chart; it has {have:?}")
        })
}

/// The default RecoveryPolicy the chart rendered into the operator's ConfigMap.
fn default_policy(objs: &[Value]) -> Value {
    let cm = find(objs, "ConfigMap", "unwedge-default-policy");
    serde_json::from_str(cm["data"]["policy.json"].as_str().expect("policy.json"))
        .expect("policy.json is JSON")
}

/// A wedge of device 0000:03:00.0 (xe, card0) on `node`, as its agent would create it for the
/// uevent `seq`; its name follows the agent's scheme.
fn xe_wedge(node: &str, seq: u32) -> GpuWedge {
    serde_json::from_value(json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "GpuWedge",
        "metadata": {"name": format!("{node}-0000-03-00-0-{seq}"), "labels": {"unwedge.io/node": node, "unwedge.io/device": "0000-03-00.0"}},
        "spec": {"nodeName": node, "device": {"pciAddress": "0000:03:00.0", "driver": "xe", "card": "card0"},
                 "methods": ["rebind", "bus-reset"], "detectedAt": "2026-11-25T10:00:00Z", "bootId": "b1",
                 "uevent": {"ACTION": "change", "WEDGED": "rebind,bus-reset", "SEQNUM": seq.to_string()}}
    }))
    .expect("a GpuWedge")
}

/// The rules of a ClusterRole as (apiGroup, resource) -> verbs.
fn grants(role: &Value, group: &str, resource: &str) -> Vec<String> {
    let mut verbs = Vec::new();
    for rule in role["rules"].as_array().expect("rules") {
        let has = |field: &str, v: &str| {
            rule[field]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == v))
        };
        if has("apiGroups", group) && has("resources", resource) {
            verbs.extend(
                rule["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string()),
            );
        }
    }
    verbs.sort();
    verbs
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn args_of(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The pod template's spec of a rendered workload.
fn pod_spec<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    &find(objs, kind, name)["spec"]["template"]["spec"]
}

/// The container's `env` as (name, entry) pairs, in order.
fn env_of(container: &Value) -> Vec<(String, Value)> {
    container["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The required node selector terms of the agent's affinity.
fn agent_terms(objs: &[Value]) -> Vec<Value> {
    pod_spec(objs, "DaemonSet", "unwedge-agent")["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn helm_lint_passes_for_every_value_set_with_helm_3_and_4() {
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for helm_bin in ["helm", "helm4"] {
        let home = tempfile::tempdir().unwrap();
        for extra in [
            vec![],
            vec![
                "--set",
                "defaultPolicy.approval=Manual",
                "--set",
                "defaultPolicy.maxConcurrentReboots=2",
            ],
            vec!["--set", "dra.enabled=true"],
            vec![
                "--set",
                "namespace.create=true",
                "--set",
                "global.imageRegistry=registry.example.com/mirror",
                "--set",
                "operator.image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "--set-json",
                r#"agent.extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]"#,
            ],
            vec![
                "--set",
                "metrics.serviceMonitor.enabled=true",
                "--set",
                "metrics.prometheusRule.enabled=true",
            ],
        ] {
            let mut args = vec!["lint", "--strict", chart];
            args.extend(extra.iter().copied());
            let out = helm(helm_bin, home.path(), &args).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(
                out.contains("0 chart(s) failed"),
                "{helm_bin} lint {extra:?}: {out}"
            );
        }
    }
}

#[test]
fn template_defaults_render_the_security_contract() {
    let objs = template("helm", &[]);

    // The agent: privileged, host PID, never host network, the host mounts it needs.
    let ds = find(&objs, "DaemonSet", "unwedge-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "the reboot rung and the fd gate need the host PID namespace"
    );
    assert_ne!(
        pod["hostNetwork"], true,
        "hostNetwork would let any pod's root forge uevents (docs/design.md §1)"
    );
    assert_eq!(pod["serviceAccountName"], "unwedge-agent");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "unwedge/agent:0.1.0");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    assert_eq!(c["securityContext"]["privileged"], true);
    let env = &c["env"][0];
    assert_eq!(env["name"], "NODE_NAME");
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let mounts: Vec<(&str, bool)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["mountPath"].as_str().unwrap(), m["readOnly"] == true))
        .collect();
    for (path, read_only) in [
        ("/sys", false),
        ("/dev", false),
        ("/var/lib/kubelet/pod-resources", true),
        // The container runtime socket's directory, read-only (in-place restarts).
        ("/run/containerd", true),
        ("/var/lib/unwedge", false),
    ] {
        assert!(
            mounts.contains(&(path, read_only)),
            "agent mount {path} (readOnly {read_only}) missing: {mounts:?}"
        );
    }
    let host_paths: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        [
            "/sys",
            "/dev",
            "/var/lib/kubelet/pod-resources",
            "/run/containerd",
            "/var/lib/unwedge"
        ]
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "agent {probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "agent {probe}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 9101);
    let args = args_of(c);
    assert!(
        args.contains(&"--cri-socket=/run/containerd/containerd.sock".to_string()),
        "the agent is told where the runtime socket is: {args:?}"
    );
    assert!(
        args.contains(&"--reboot-mode=syscall".to_string()),
        "the scratch image has no shell: {args:?}"
    );
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["matchExpressions"][0]["key"] == "unwedge.io/gpu"),
        "GPU node affinity"
    );

    // The operator: two replicas, non-root, read-only, no capabilities, seccomp, probes.
    let dep = find(&objs, "Deployment", "unwedge-operator");
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "unwedge/operator:0.1.0");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["ports"][0]["containerPort"], 9100);
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        env,
        ["POD_NAME", "POD_NAMESPACE", "RUST_LOG"],
        "no DRA settings without DRA"
    );
    let args = args_of(c);
    assert!(
        args.contains(&"--dra=off".to_string()),
        "auto without a DRA cluster renders off: {args:?}"
    );
    assert!(
        args.contains(&"--leader-elect=true".to_string()),
        "{args:?}"
    );
    let pdb = find(&objs, "PodDisruptionBudget", "unwedge-operator");
    assert_eq!(pdb["spec"]["minAvailable"], 1);

    // RBAC: least privilege, DRA rights only with DRA.
    let agent = find(&objs, "ClusterRole", "unwedge-agent");
    assert_eq!(
        grants(agent, "unwedge.io", "gpuwedges"),
        sorted(&[
            "get", "list", "watch", "create", "update", "patch", "delete"
        ])
    );
    assert_eq!(
        grants(agent, "unwedge.io", "gpuwedges/status"),
        sorted(&["patch", "update"])
    );
    assert_eq!(grants(agent, "", "pods"), sorted(&["get", "list"]));
    assert!(
        grants(agent, "", "nodes").is_empty(),
        "the agent needs no node rights"
    );
    assert!(grants(agent, "resource.k8s.io", "resourceslices").is_empty());
    let op = find(&objs, "ClusterRole", "unwedge-operator");
    assert_eq!(grants(op, "", "pods/eviction"), sorted(&["create"]));
    assert_eq!(
        grants(op, "", "nodes"),
        sorted(&["get", "list", "watch", "patch"])
    );
    assert!(
        !grants(op, "unwedge.io", "gpuwedges").contains(&"create".to_string()),
        "only agents create wedges"
    );
    assert!(grants(op, "resource.k8s.io", "devicetaintrules").is_empty());
    assert!(
        grants(op, "coordination.k8s.io", "leases").is_empty(),
        "leases only in the release namespace"
    );
    let lease_role = find(&objs, "Role", "unwedge-operator-leader-election");
    assert_eq!(lease_role["metadata"]["namespace"], NS);
    assert!(
        args.contains(&"--lease-owner-deployment=unwedge-operator".to_string()),
        "the Lease is owned by the operator's Deployment: {args:?}"
    );
    assert!(
        grants(op, "apps", "deployments").is_empty(),
        "no cluster-wide Deployment rights"
    );
    let owner_rule = lease_role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == json!(["deployments"]))
        .expect("the leader-election Role reads the operator's Deployment");
    assert_eq!(
        (&owner_rule["resourceNames"], &owner_rule["verbs"]),
        (&json!(["unwedge-operator"]), &json!(["get"])),
        "only get, only the operator's own Deployment"
    );

    // Admission policies and their bindings.
    for name in [
        "unwedge-agent-own-node",
        "unwedge-human-verbs-by",
        "unwedge-single-default-policy",
    ] {
        let vap = find(&objs, "ValidatingAdmissionPolicy", name);
        assert_eq!(vap["apiVersion"], "admissionregistration.k8s.io/v1");
        assert_eq!(vap["spec"]["failurePolicy"], "Fail");
        let binding = find(&objs, "ValidatingAdmissionPolicyBinding", name);
        assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    }
    let agent_vap = find(&objs, "ValidatingAdmissionPolicy", "unwedge-agent-own-node");
    assert_eq!(
        agent_vap["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:unwedge-system:unwedge-agent'"
    );
    let binding = find(
        &objs,
        "ValidatingAdmissionPolicyBinding",
        "unwedge-single-default-policy",
    );
    assert_eq!(
        binding["spec"]["paramRef"],
        json!({"selector": {}, "parameterNotFoundAction": "Allow"})
    );

    // The default policy: not an object of the release (Helm cannot create a RecoveryPolicy in
    // the release that creates its CRD) but a ConfigMap the operator mounts and applies, and a
    // checksum that restarts the operator when it changes.
    assert!(
        !objs.iter().any(|o| o["kind"] == "RecoveryPolicy"),
        "Helm would refuse a RecoveryPolicy next to its CRD's template"
    );
    let policy = default_policy(&objs);
    assert_eq!(policy["metadata"]["name"], "default");
    assert_eq!(
        policy["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "unwedge-operator"
    );
    assert_eq!(policy["spec"]["default"], true);
    assert_eq!(policy["spec"]["approval"], "Automatic");
    assert_eq!(policy["spec"]["rebootApproval"], "Manual");
    assert_eq!(policy["spec"]["none"]["action"], "EvictBlamed");
    let op = &find(&objs, "Deployment", "unwedge-operator")["spec"]["template"];
    assert!(
        args_of(&op["spec"]["containers"][0])
            .contains(&"--default-policy=/etc/unwedge/default-policy/policy.json".to_string())
    );
    assert_eq!(
        op["spec"]["containers"][0]["volumeMounts"][0]["mountPath"],
        "/etc/unwedge/default-policy"
    );
    assert_eq!(
        op["spec"]["volumes"][0]["configMap"]["name"],
        "unwedge-default-policy"
    );
    assert!(
        op["metadata"]["annotations"]["checksum/default-policy"]
            .as_str()
            .is_some_and(|c| c.len() == 64)
    );
    let rbac = find(&objs, "ClusterRole", "unwedge-operator");
    assert!(
        grants(rbac, "unwedge.io", "recoverypolicies").contains(&"create".to_string()),
        "the operator creates the default policy"
    );

    // The CRDs are templates of the release, kept on uninstall.
    for crd in ["gpuwedges.unwedge.io", "recoverypolicies.unwedge.io"] {
        let crd = find(&objs, "CustomResourceDefinition", crd);
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/instance"],
            "unwedge"
        );
    }

    // The metrics Services (no Prometheus Operator objects by default).
    find(&objs, "Service", "unwedge-operator-metrics");
    find(&objs, "Service", "unwedge-agent-metrics");
    assert!(
        !objs
            .iter()
            .any(|o| o["kind"] == "ServiceMonitor" || o["kind"] == "PrometheusRule")
    );
}

#[test]
fn template_manual_approval_with_a_reboot_budget() {
    let objs = template(
        "helm",
        &[
            "--set",
            "defaultPolicy.approval=Manual",
            "--set",
            "defaultPolicy.maxConcurrentReboots=2",
            "--set-string",
            "defaultPolicy.maxUnavailable=25%",
            "--set",
            "defaultPolicy.none.action=Ignore",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
        ],
    );
    let policy = default_policy(&objs);
    let spec = &policy["spec"];
    assert_eq!(spec["approval"], "Manual");
    assert_eq!(spec["maxConcurrentReboots"], 2);
    assert_eq!(spec["maxUnavailable"], "25%");
    assert_eq!(spec["none"]["action"], "Ignore");
    assert_eq!(spec["escalation"], json!(["rebind", "bus-reset", "reboot"]));
    find(&objs, "ServiceMonitor", "unwedge-operator");
    find(&objs, "ServiceMonitor", "unwedge-agent");
    let rule = find(&objs, "PrometheusRule", "unwedge");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert!(alerts.contains(&"UnwedgeOperatorDown"), "{alerts:?}");
}

#[test]
fn template_crds_can_be_left_out_or_left_unkept_and_the_default_policy_off() {
    let kinds = |objs: &[Value], kind: &str| objs.iter().filter(|o| o["kind"] == kind).count();
    let off = template("helm", &["--set", "crds.enabled=false"]);
    assert_eq!(kinds(&off, "CustomResourceDefinition"), 0);
    let unkept = template("helm", &["--set", "crds.keep=false"]);
    assert_eq!(kinds(&unkept, "CustomResourceDefinition"), 2);
    for crd in unkept
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
    {
        assert!(crd["metadata"]["annotations"].is_null(), "{crd}");
    }
    let no_default = template("helm", &["--set", "defaultPolicy.enabled=false"]);
    assert!(
        !no_default
            .iter()
            .any(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "unwedge-default-policy")
    );
    let op = &find(&no_default, "Deployment", "unwedge-operator")["spec"]["template"];
    assert!(
        !args_of(&op["spec"]["containers"][0])
            .iter()
            .any(|a| a.starts_with("--default-policy"))
    );
    assert!(op["spec"]["volumes"].is_null());
}

#[test]
fn template_dra_on_grants_device_taint_rights_and_passes_the_attribute_map() {
    let on = template(
        "helm",
        &[
            "--set",
            "dra.enabled=true",
            "--set",
            "dra.driverAttributes.gpu\\.example\\.com=gpu.example.com/pci",
        ],
    );
    // auto follows the cluster's API: with DeviceTaintRule served, DRA is on.
    let auto = template(
        "helm",
        &["--api-versions", "resource.k8s.io/v1/DeviceTaintRule"],
    );
    for (what, objs) in [("dra.enabled=true", &on), ("auto on a DRA cluster", &auto)] {
        let op = find(objs, "ClusterRole", "unwedge-operator");
        assert_eq!(
            grants(op, "resource.k8s.io", "devicetaintrules"),
            sorted(&[
                "get", "list", "watch", "create", "update", "patch", "delete"
            ]),
            "{what}"
        );
        assert_eq!(
            grants(op, "resource.k8s.io", "resourceclaims"),
            sorted(&["get", "list", "watch"]),
            "{what}"
        );
        assert_eq!(
            grants(op, "resource.k8s.io", "resourceslices"),
            sorted(&["get", "list", "watch"]),
            "{what}"
        );
        let agent = find(objs, "ClusterRole", "unwedge-agent");
        assert_eq!(
            grants(agent, "resource.k8s.io", "resourceslices"),
            sorted(&["get", "list", "watch"]),
            "{what}"
        );
        let c = &find(objs, "Deployment", "unwedge-operator")["spec"]["template"]["spec"]["containers"]
            [0];
        assert!(
            args_of(c).contains(&"--dra=on".to_string()),
            "{what}: {:?}",
            args_of(c)
        );
        let env = |name: &str| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].as_str().unwrap().to_string())
        };
        assert_eq!(
            env("DRA_PCI_ATTRIBUTE").as_deref(),
            Some("resource.kubernetes.io/pciBusID"),
            "{what}"
        );
    }
    let c =
        &find(&on, "Deployment", "unwedge-operator")["spec"]["template"]["spec"]["containers"][0];
    let map = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DRA_DRIVER_ATTRIBUTES")
        .unwrap();
    let map: Value = serde_json::from_str(map["value"].as_str().unwrap()).unwrap();
    assert_eq!(map, json!({"gpu.example.com": "gpu.example.com/pci"}));
    // And false means off even on a DRA cluster.
    let off = template(
        "helm",
        &[
            "--set",
            "dra.enabled=false",
            "--api-versions",
            "resource.k8s.io/v1/DeviceTaintRule",
        ],
    );
    assert!(
        grants(
            find(&off, "ClusterRole", "unwedge-operator"),
            "resource.k8s.io",
            "devicetaintrules"
        )
        .is_empty()
    );
}

#[test]
fn template_image_registry_prefixes_both_images_and_a_digest_pins_one() {
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let objs = template(
        "helm",
        &[
            "--set",
            "global.imageRegistry=registry.example.com:5000/mirror/",
            "--set",
            &format!("agent.image.digest={digest}"),
            "--set",
            "agent.image.tag=not-used",
            "--set",
            "operator.image.tag=1.2.3",
        ],
    );
    let agent = &pod_spec(&objs, "DaemonSet", "unwedge-agent")["containers"][0];
    assert_eq!(
        agent["image"],
        format!("registry.example.com:5000/mirror/unwedge/agent@{digest}"),
        "the digest pins the agent and the tag is ignored"
    );
    let operator = &pod_spec(&objs, "Deployment", "unwedge-operator")["containers"][0];
    assert_eq!(
        operator["image"], "registry.example.com:5000/mirror/unwedge/operator:1.2.3",
        "no digest: registry/repository:tag"
    );
}

#[test]
fn template_priority_classes_default_to_the_critical_ones_and_can_be_dropped() {
    let objs = template("helm", &[]);
    assert_eq!(
        pod_spec(&objs, "DaemonSet", "unwedge-agent")["priorityClassName"],
        "system-node-critical"
    );
    assert_eq!(
        pod_spec(&objs, "Deployment", "unwedge-operator")["priorityClassName"],
        "system-cluster-critical"
    );
    let objs = template(
        "helm",
        &[
            "--set",
            "agent.priorityClassName=",
            "--set",
            "operator.priorityClassName=",
        ],
    );
    for (kind, name) in [
        ("DaemonSet", "unwedge-agent"),
        ("Deployment", "unwedge-operator"),
    ] {
        let pc = &pod_spec(&objs, kind, name)["priorityClassName"];
        assert!(pc.is_null(), "{kind}/{name}: priorityClassName {pc}");
    }
}

#[test]
fn template_agent_affinity_matches_gpu_operator_labels_and_every_term_honours_the_opt_out() {
    let opt_out = json!({"key": "unwedge.io/disabled", "operator": "NotIn", "values": ["true"]});
    let terms = agent_terms(&template("helm", &[]));
    let first_keys: Vec<&str> = terms
        .iter()
        .map(|t| t["matchExpressions"][0]["key"].as_str().unwrap())
        .collect();
    for key in [
        "unwedge.io/gpu",
        // The NodeFeatureRules of AMD's GPU operator and Intel's device plugins operator.
        "feature.node.kubernetes.io/amd-gpu",
        "feature.node.kubernetes.io/amd-vgpu",
        "intel.feature.node.kubernetes.io/gpu",
        // node-feature-discovery's own PCI labels (class_vendor).
        "feature.node.kubernetes.io/pci-0300_1002.present",
        "feature.node.kubernetes.io/pci-0380_8086.present",
    ] {
        assert!(first_keys.contains(&key), "{key} missing: {first_keys:?}");
    }
    // Terms are ORed: the opt-out must be in each, or one matching term would bypass it.
    for t in &terms {
        let exprs = t["matchExpressions"].as_array().unwrap();
        assert_eq!(exprs.len(), 2, "{t}");
        assert_eq!(exprs[1], opt_out, "{t}");
    }

    // A user's own affinity gets the opt-out too.
    let custom = template(
        "helm",
        &[
            "--set-json",
            r#"agent.affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"pool","operator":"In","values":["gpu"]}]}]}}}"#,
        ],
    );
    assert_eq!(
        agent_terms(&custom),
        [json!({"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["gpu"]},
            opt_out.clone()
        ]})]
    );
    // No affinity at all: every node but the opted-out ones.
    let none = template("helm", &["--set", "agent.affinity=null"]);
    assert_eq!(agent_terms(&none), [json!({"matchExpressions": [opt_out]})]);
    // No opt-out label: the affinity exactly as given.
    let off = agent_terms(&template("helm", &["--set", "agent.optOutLabel="]));
    assert_eq!(off.len(), terms.len());
    assert!(
        off.iter()
            .all(|t| t["matchExpressions"].as_array().unwrap().len() == 1),
        "{off:?}"
    );
}

#[test]
fn template_namespace_create_renders_the_release_namespace_for_a_privileged_agent() {
    let objs = template("helm", &[]);
    assert!(
        !objs.iter().any(|o| o["kind"] == "Namespace"),
        "no Namespace unless namespace.create"
    );
    let objs = template("helm", &["--set", "namespace.create=true"]);
    let ns = find(&objs, "Namespace", NS);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "the agent is privileged with hostPID and host paths: baseline or restricted refuse it"
    );
    assert_eq!(
        ns["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "an uninstall must not delete the namespace and what else lives in it"
    );
}

#[test]
fn template_log_level_and_extra_env_reach_both_containers() {
    let objs = template("helm", &[]);
    for (kind, name, level) in [
        ("DaemonSet", "unwedge-agent", "info"),
        ("Deployment", "unwedge-operator", "info,kube=warn"),
    ] {
        let env = env_of(&pod_spec(&objs, kind, name)["containers"][0]);
        let rust_log = env.iter().find(|(n, _)| n == "RUST_LOG").map(|(_, e)| e);
        assert_eq!(
            rust_log.map(|e| &e["value"]),
            Some(&json!(level)),
            "{kind}/{name}"
        );
    }
    let objs = template(
        "helm",
        &[
            "--set",
            "agent.logLevel=debug",
            "--set",
            "operator.logLevel=",
            "--set-json",
            r#"agent.extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy:3128"}]"#,
            "--set-json",
            r#"operator.extraEnv=[{"name":"NODE_IP","valueFrom":{"fieldRef":{"fieldPath":"status.hostIP"}}}]"#,
        ],
    );
    let agent = env_of(&pod_spec(&objs, "DaemonSet", "unwedge-agent")["containers"][0]);
    let names: Vec<&str> = agent.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["NODE_NAME", "RUST_LOG", "HTTPS_PROXY"]);
    assert_eq!(agent[1].1["value"], "debug");
    assert_eq!(agent[2].1["value"], "http://proxy:3128");
    let operator = env_of(&pod_spec(&objs, "Deployment", "unwedge-operator")["containers"][0]);
    let names: Vec<&str> = operator.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["POD_NAME", "POD_NAMESPACE", "NODE_IP"],
        "an empty logLevel leaves the binary's default"
    );
    assert_eq!(
        operator[2].1["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
}

#[test]
fn template_people_roles_view_reads_and_the_approver_patches_wedges() {
    let objs = template("helm", &[]);
    let view = find(&objs, "ClusterRole", "unwedge-view");
    for role in ["view", "edit", "admin"] {
        assert_eq!(
            view["metadata"]["labels"][format!("rbac.authorization.k8s.io/aggregate-to-{role}")],
            "true",
            "aggregated to {role}"
        );
    }
    for resource in ["gpuwedges", "recoverypolicies"] {
        assert_eq!(
            grants(view, "unwedge.io", resource),
            sorted(&["get", "list", "watch"]),
            "view on {resource}"
        );
    }
    assert_eq!(
        view["rules"].as_array().unwrap().len(),
        1,
        "read-only: {}",
        view["rules"]
    );
    let approver = find(&objs, "ClusterRole", "unwedge-approver");
    assert_eq!(
        grants(approver, "unwedge.io", "gpuwedges"),
        sorted(&["get", "list", "watch", "patch"])
    );
    assert!(
        grants(approver, "unwedge.io", "gpuwedges/status").is_empty(),
        "status belongs to the agent and the operator"
    );
    assert_eq!(
        grants(approver, "unwedge.io", "recoverypolicies"),
        sorted(&["get", "list", "watch"])
    );
    assert!(
        approver["metadata"]["labels"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("rbac.authorization.k8s.io/aggregate-to")),
        "approving is bound on purpose, never aggregated"
    );
}

#[test]
fn values_schema_refuses_bad_values_with_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart_dir();
    for (set, field) in [
        ("defaultPolicy.approval=Sometimes", "approval"),
        ("agent.reboot.mode=kexec", "mode"),
        ("dra.enabled=maybe", "enabled"),
        ("defaultPolicy.escalation[0]=Bus_Reset", "escalation"),
        ("agent.image.pullPolicy=Sometimes", "pullPolicy"),
        ("agent.image.digest=latest", "digest"),
        (
            "global.imageRegistry=https://registry.example.com",
            "imageRegistry",
        ),
        ("namespace.create=maybe", "create"),
        ("agent.optOutLabel=not a label", "optOutLabel"),
        ("operator.extraEnv[0].value=x", "name"),
    ] {
        let err = helm(
            "helm",
            home.path(),
            &[
                "template",
                "unwedge",
                chart.to_str().unwrap(),
                "--kube-version",
                KUBE_VERSION,
                "--set",
                set,
            ],
        )
        .expect_err(&format!(
            "--set {set} must be refused by values.schema.json"
        ));
        let msg = format!("{err:#}");
        assert!(
            msg.contains("schema") && msg.contains(field),
            "--set {set}: {msg}"
        );
    }
}

/// [`wait::until_through_errors`], failing the test when it times out.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    wait::until_through_errors(what, timeout, f)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The namespace as each Helm gets it labeled for the privileged agent (chart README): Helm 4
/// lets the chart own it (`namespace.create`); Helm 3 refuses that next to `--create-namespace`,
/// so the namespace is created and labeled first. The values go to every install and upgrade.
async fn namespace_for(cp: &ControlPlane, helm_bin: &str) -> Vec<&'static str> {
    if helm_bin == "helm4" {
        return vec!["--create-namespace", "--set", "namespace.create=true"];
    }
    cp.kubectl_ok(&["create", "namespace", NS]).await.unwrap();
    cp.kubectl_ok(&[
        "label",
        "namespace",
        NS,
        "pod-security.kubernetes.io/enforce=privileged",
    ])
    .await
    .unwrap();
    vec![]
}

/// A client that acts as `user` (impersonated by the admin), with no groups but
/// `system:authenticated`: only what RBAC grants that user by name.
async fn client_as(cp: &ControlPlane, user: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(cp.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(user.into());
    kube::Client::try_from(config).unwrap()
}

/// Asserts `res` was refused by RBAC (403 Forbidden, not an admission policy).
fn forbidden<T: std::fmt::Debug>(what: &str, res: Result<T, kube::Error>) {
    match res {
        Err(kube::Error::Api(s)) if s.code == 403 && s.reason == "Forbidden" => assert!(
            !s.message.contains("ValidatingAdmissionPolicy"),
            "{what}: refused by admission, not RBAC: {}",
            s.message
        ),
        other => panic!("{what}: must be forbidden by RBAC, got {other:?}"),
    }
}

/// The chart's roles for people, through the real RBAC of the installed release: `view` reads
/// wedges and policies (through aggregation) and cannot patch; the approver approves; a user
/// bound to neither reads nothing.
async fn people_rbac(cp: &ControlPlane, helm_bin: &str) {
    let admin = cp.client().await.unwrap();
    let wedge: GpuWedge = xe_wedge("gpu-node", 1);
    let name = "gpu-node-0000-03-00-0-1";
    Api::<GpuWedge>::all(admin.clone())
        .create(&PostParams::default(), &wedge)
        .await
        .unwrap();
    for (binding, role, user) in [
        ("test-viewer", "view", "viewer"),
        ("test-oncall", "unwedge-approver", "oncall"),
    ] {
        cp.kubectl_ok(&[
            "create",
            "clusterrolebinding",
            binding,
            &format!("--clusterrole={role}"),
            &format!("--user={user}"),
        ])
        .await
        .unwrap();
    }
    let approve = |by: &str| {
        Patch::Merge(
            json!({"metadata": {"annotations": {"unwedge.io/approve": "", "unwedge.io/by": by}}}),
        )
    };

    // view: the aggregation controller adds the chart's rules to `view` a moment after install.
    let as_viewer: Api<GpuWedge> = Api::all(client_as(cp, "viewer").await);
    let listed = wait_for(
        "a user bound to view lists GpuWedges",
        Duration::from_secs(60),
        || {
            let api = as_viewer.clone();
            async move { Ok(Some(api.list(&ListParams::default()).await?)) }
        },
    )
    .await;
    assert_eq!(listed.items.len(), 1, "{helm_bin}: viewer sees the wedge");
    let viewer_policies: Api<RecoveryPolicy> = Api::all(client_as(cp, "viewer").await);
    // (No operator runs here, so there is no default policy to get: listing is the right.)
    assert!(
        viewer_policies.list(&ListParams::default()).await.is_ok(),
        "{helm_bin}: viewer reads the RecoveryPolicies"
    );
    forbidden(
        &format!("{helm_bin}: viewer approves"),
        as_viewer
            .patch(name, &PatchParams::default(), &approve("viewer"))
            .await,
    );

    // The approver: the approve annotation passes RBAC and the by-policy; status stays closed.
    let as_oncall: Api<GpuWedge> = Api::all(client_as(cp, "oncall").await);
    // The API server's RBAC cache sees a new binding a moment after it is created.
    wait_for(
        "the approver's binding is in effect",
        Duration::from_secs(60),
        || {
            let api = as_oncall.clone();
            async move { Ok(Some(api.get(name).await?)) }
        },
    )
    .await;
    let approved = as_oncall
        .patch(name, &PatchParams::default(), &approve("oncall"))
        .await
        .unwrap_or_else(|e| panic!("{helm_bin}: the approver's approve was refused: {e:#}"));
    let annotations = approved.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations.get("unwedge.io/by").map(String::as_str),
        Some("oncall"),
        "{helm_bin}: {annotations:?}"
    );
    forbidden(
        &format!("{helm_bin}: approver writes status"),
        as_oncall
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
            )
            .await,
    );

    // Bound to neither: nothing to read.
    let as_nobody: Api<GpuWedge> = Api::all(client_as(cp, "nobody").await);
    forbidden(
        &format!("{helm_bin}: unbound user lists"),
        as_nobody.list(&ListParams::default()).await,
    );
}

/// Installs the chart with `helm_bin` into a fresh control plane with one GPU node, one GPU node
/// opted out (`unwedge.io/disabled=true`) and one other node, then checks that the API server
/// accepted every object Helm says it installed, that the workloads were scheduled where they
/// belong with their priority classes, and the chart's roles for people.
async fn install_and_check(helm_bin: &str) {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.add_kwok_node("gpu-node", &[("unwedge.io/gpu", "true")], &[])
        .await
        .unwrap();
    cp.add_kwok_node(
        "gpu-node-opted-out",
        &[("unwedge.io/gpu", "true"), ("unwedge.io/disabled", "true")],
        &[],
    )
    .await
    .unwrap();
    cp.add_kwok_node("cpu-node", &[], &[]).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = cp.kubeconfig_path().to_str().unwrap().to_string();
    let chart = chart_dir();
    let ns_args = namespace_for(&cp, helm_bin).await;
    let mut args = vec![
        "install",
        "unwedge",
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--kubeconfig",
        &kubeconfig,
    ];
    args.extend(&ns_args);
    let out = helm(helm_bin, home.path(), &args).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        out.contains("kubectl get gw"),
        "NOTES.txt tells the user what to run next: {out}"
    );
    assert!(
        out.contains("`helm upgrade` upgrades them, and `helm uninstall` keeps"),
        "NOTES.txt says the CRDs are part of the release: {out}"
    );

    // Every object of the release exists in the API server (helm get manifest lists them).
    let manifest = helm(
        helm_bin,
        home.path(),
        &[
            "get",
            "manifest",
            "unwedge",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let objs = documents(&manifest);
    let mut kinds: Vec<String> = Vec::new();
    for o in &objs {
        let kind = o["kind"].as_str().unwrap();
        let name = o["metadata"]["name"].as_str().unwrap();
        let api_version = o["apiVersion"].as_str().unwrap();
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let resource = if group.is_empty() {
            kind.to_lowercase()
        } else {
            format!("{}.{group}", kind.to_lowercase())
        };
        let mut args = vec!["get", resource.as_str(), name, "-o", "name"];
        if let Some(ns) = o["metadata"]["namespace"].as_str() {
            args.extend(["-n", ns]);
        }
        let got = cp
            .kubectl_ok(&args)
            .await
            .unwrap_or_else(|e| panic!("{helm_bin}: {kind}/{name} not in the API server: {e:#}"));
        assert!(got.contains(name), "{kind}/{name}: {got}");
        kinds.push(kind.to_string());
    }
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "CustomResourceDefinition",
        "ConfigMap",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{helm_bin} installed no {kind}: {kinds:?}"
        );
    }
    // The CRDs of the release are established.
    for crd in ["gpuwedges.unwedge.io", "recoverypolicies.unwedge.io"] {
        let cond = cp
            .kubectl_ok(&[
                "get",
                "crd",
                crd,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            ])
            .await
            .unwrap();
        assert_eq!(cond.trim(), "True", "{helm_bin}: CRD {crd} established");
    }
    // The VAPs type-check against the CRD schemas without warnings.
    for vap in [
        "unwedge-agent-own-node",
        "unwedge-human-verbs-by",
        "unwedge-single-default-policy",
    ] {
        let client = cp.client().await.unwrap();
        let api: Api<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy> =
            Api::all(client);
        let checked = wait_for(
            &format!("{vap} type-checked"),
            Duration::from_secs(60),
            || {
                let api = api.clone();
                async move {
                    let p = api.get(vap).await?;
                    Ok(p.status
                        .and_then(|s| s.type_checking)
                        .map(|t| t.expression_warnings.unwrap_or_default()))
                }
            },
        )
        .await;
        assert!(
            checked.is_empty(),
            "{helm_bin}: {vap} has type-checking warnings: {checked:?}"
        );
    }

    // The agent runs on the GPU node only; both operator replicas are scheduled.
    let client = cp.client().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), NS);
    wait_for(
        "agent DaemonSet scheduled on the GPU node",
        Duration::from_secs(90),
        || {
            let ds = ds.clone();
            async move {
                let s = ds.get("unwedge-agent").await?.status.unwrap_or_default();
                Ok(
                    (s.desired_number_scheduled == 1 && s.current_number_scheduled == 1)
                        .then_some(()),
                )
            }
        },
    )
    .await;
    let agent_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .unwrap();
    let nodes: Vec<String> = agent_pods
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert_eq!(
        nodes,
        ["gpu-node"],
        "{helm_bin}: the agent belongs on GPU nodes only, and not on one labeled unwedge.io/disabled=true"
    );
    // The built-in priority classes are admitted in the release namespace and resolved.
    let priority = agent_pods.items[0].spec.as_ref().and_then(|s| s.priority);
    assert_eq!(
        priority,
        Some(2_000_001_000),
        "{helm_bin}: agent at system-node-critical"
    );
    wait_for("two operator replicas", Duration::from_secs(90), || {
        let deps = deps.clone();
        async move {
            let s = deps
                .get("unwedge-operator")
                .await?
                .status
                .unwrap_or_default();
            Ok((s.replicas == Some(2)).then_some(()))
        }
    })
    .await;
    let operator_pods = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap();
    let priorities: Vec<Option<i32>> = operator_pods
        .items
        .iter()
        .map(|p| p.spec.as_ref().and_then(|s| s.priority))
        .collect();
    assert_eq!(
        priorities,
        [Some(2_000_000_000), Some(2_000_000_000)],
        "{helm_bin}: operator at system-cluster-critical"
    );
    if helm_bin == "helm4" {
        let labels = cp
            .kubectl_ok(&["get", "namespace", NS, "-o", "jsonpath={.metadata.labels}"])
            .await
            .unwrap();
        assert!(
            labels.contains(r#""pod-security.kubernetes.io/enforce":"privileged""#),
            "{helm_bin}: namespace.create labels the release namespace: {labels}"
        );
    }

    people_rbac(&cp, helm_bin).await;

    // An upgrade with other values goes through too (Manual approval, a reboot budget).
    let mut args = vec![
        "upgrade",
        "unwedge",
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--kubeconfig",
        &kubeconfig,
        "--set",
        "defaultPolicy.approval=Manual",
        "--set",
        "defaultPolicy.maxConcurrentReboots=2",
    ];
    args.extend(ns_args.iter().filter(|a| **a != "--create-namespace"));
    let checksum = |d: Deployment| {
        d.spec
            .template
            .metadata
            .and_then(|m| m.annotations?.remove("checksum/default-policy"))
    };
    let before = checksum(deps.get("unwedge-operator").await.unwrap());
    helm(helm_bin, home.path(), &args).unwrap_or_else(|e| panic!("{e:#}"));
    // The operator (no real pods here: kwok) would apply the ConfigMap's policy at its restart,
    // which the changed checksum asks for. The policy there is the upgraded one, and the API
    // server accepts it as it stands (server-side dry run: CRD schema, rules, admission).
    assert_ne!(
        checksum(deps.get("unwedge-operator").await.unwrap()),
        before,
        "{helm_bin}: a changed default policy restarts the operator"
    );
    let cm = cp
        .kubectl_ok(&[
            "get",
            "configmap",
            "unwedge-default-policy",
            "-n",
            NS,
            "-o",
            "jsonpath={.data.policy\\.json}",
        ])
        .await
        .unwrap();
    let p: RecoveryPolicy = serde_json::from_str(&cm).unwrap_or_else(|e| panic!("{e}: {cm}"));
    assert_eq!(
        p.spec.approval,
        unwedge_crds::ApprovalMode::Manual,
        "{helm_bin} upgrade"
    );
    assert_eq!(p.spec.max_concurrent_reboots, Some(2), "{helm_bin} upgrade");
    let file = home.path().join("policy.json");
    std::fs::write(&file, &cm).unwrap();
    let dry = cp
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=unwedge-default-policy",
            "-f",
            file.to_str().unwrap(),
        ])
        .await
        .unwrap_or_else(|e| panic!("{helm_bin}: the rendered default policy is refused: {e:#}"));
    assert!(dry.contains("recoverypolicy.unwedge.io/default"), "{dry}");

    // Opting a node out later removes its agent (the chart README says so).
    cp.kubectl_ok(&["label", "node", "gpu-node", "unwedge.io/disabled=true"])
        .await
        .unwrap();
    wait_for(
        "the agent leaves the node labeled unwedge.io/disabled=true",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let agents = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
                    .await?;
                Ok(agents
                    .items
                    .iter()
                    .all(|p| p.metadata.deletion_timestamp.is_some())
                    .then_some(()))
            }
        },
    )
    .await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_with_helm_3_every_object_is_accepted() {
    tokio::time::timeout(TEST_TIMEOUT, install_and_check("helm"))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_with_helm_4_every_object_is_accepted() {
    tokio::time::timeout(TEST_TIMEOUT, install_and_check("helm4"))
        .await
        .expect("test timed out");
}

/// An older copy of the generated CRDs (plain YAML, file name -> text), as a previous release
/// would have shipped them: without the newest optional status field and its printer column,
/// with older descriptions.
fn older_crds() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for file in [
        "gpuwedges.unwedge.io.yaml",
        "recoverypolicies.unwedge.io.yaml",
    ] {
        let text = std::fs::read_to_string(repo_root().join("crds").join(file)).unwrap();
        let mut docs = documents(&text);
        assert_eq!(docs.len(), 1, "{file} holds one CRD");
        let crd = &mut docs[0];
        let version = &mut crd["spec"]["versions"][0];
        if file.starts_with("gpuwedges") {
            let props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
                .as_object_mut()
                .expect("status properties");
            assert!(
                props.remove("quarantineRule").is_some(),
                "the current CRD has status.quarantineRule"
            );
            let cols = version["additionalPrinterColumns"].as_array_mut().unwrap();
            cols.retain(|c| c["name"] != "POLICY");
        }
        version["schema"]["openAPIV3Schema"]["description"] = json!("an older description");
        out.push((file, serde_yaml::to_string(crd).unwrap()));
    }
    out
}

/// A copy of the current chart in `dir`, with the older CRDs: as templates (`layout_0_1 ==
/// false`), or in `crds/` as chart 0.1.0 shipped them, with the default policy as an object of
/// the release (kept on uninstall) as 0.1.0 rendered it.
fn older_chart(dir: &Path, layout_0_1: bool) -> PathBuf {
    let copy = Command::new("cp")
        .arg("-r")
        .arg(chart_dir())
        .arg(dir)
        .status()
        .unwrap();
    assert!(copy.success());
    let chart = dir.join("unwedge");
    let templates = chart.join("templates").join("crds");
    if layout_0_1 {
        std::fs::remove_dir_all(&templates).unwrap();
        std::fs::create_dir(chart.join("crds")).unwrap();
        std::fs::remove_file(chart.join("templates/default-policy.yaml")).unwrap();
        std::fs::write(
            chart.join("templates/default-policy.yaml"),
            "apiVersion: unwedge.io/v1alpha1\nkind: RecoveryPolicy\nmetadata:\n  name: default\n  annotations:\n    helm.sh/resource-policy: keep\nspec:\n  default: true\n  maxUnavailable: 1\n",
        )
        .unwrap();
    }
    for (file, yaml) in older_crds() {
        if layout_0_1 {
            std::fs::write(chart.join("crds").join(file), yaml).unwrap();
        } else {
            std::fs::write(templates.join(file), unwedge_crds::chart_template(&yaml)).unwrap();
        }
    }
    chart
}

/// Whether the installed GpuWedge CRD is the current one (has status.quarantineRule), and who
/// owns it (the meta.helm.sh/release-name annotation).
async fn crd_state(cp: &ControlPlane) -> (bool, Option<String>) {
    let crd: Value = serde_json::from_str(
        &cp.kubectl_ok(&["get", "crd", "gpuwedges.unwedge.io", "-o", "json"])
            .await
            .unwrap(),
    )
    .unwrap();
    (
        crd.to_string().contains("quarantineRule"),
        crd["metadata"]["annotations"]["meta.helm.sh/release-name"]
            .as_str()
            .map(String::from),
    )
}

/// The CRD lifecycle a user goes through, with the real Helm 3: chart 0.1.0's layout (CRDs in
/// crds/, never upgraded by Helm) to this one (`--take-ownership`, docs/upgrades.md), an upgrade
/// to a chart whose CRD changed (Helm updates it; an incident recorded under the older CRD stays
/// readable and takes the new field), an uninstall (the CRDs, the incident and the default
/// policy stay), and an install again (the kept CRDs are adopted without flags).
async fn crd_upgrade() {
    let cp = ControlPlane::start().await.expect("control plane");
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = cp.kubeconfig_path().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--namespace", NS, "--kubeconfig", &kubeconfig]);
        helm("helm", home.path(), &all)
    };
    let old_layout = tempfile::tempdir().unwrap();
    let old_layout = older_chart(old_layout.path(), true);
    let old = tempfile::tempdir().unwrap();
    let old = older_chart(old.path(), false);
    let current = chart_dir();

    // Chart 0.1.0: Helm installs crds/ before the templates and never owns them.
    run(&[
        "install",
        "unwedge",
        old_layout.to_str().unwrap(),
        "--create-namespace",
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        crd_state(&cp).await,
        (false, None),
        "the older CRD, unowned"
    );

    // An incident recorded under the older CRD.
    let client = cp.client().await.unwrap();
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let wedge: GpuWedge = xe_wedge("node-a", 7);
    wedges.create(&PostParams::default(), &wedge).await.unwrap();
    wedges
        .patch_status(
            "node-a-0000-03-00-0-7",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Cordoned", "cordoned": true, "methods": "rebind,bus-reset"}})),
        )
        .await
        .unwrap();

    // To the templates layout: Helm refuses to adopt CRDs it did not create, unless told to,
    // exactly as docs/upgrades.md says.
    let refused = run(&["upgrade", "unwedge", old.to_str().unwrap()])
        .expect_err("Helm adopts no object it does not own");
    assert!(
        format!("{refused:#}").contains("invalid ownership metadata"),
        "docs/upgrades.md quotes this refusal: {refused:#}"
    );
    run(&[
        "upgrade",
        "unwedge",
        old.to_str().unwrap(),
        "--take-ownership",
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        crd_state(&cp).await,
        (false, Some("unwedge".into())),
        "the release owns the CRD now"
    );
    // 0.1.0's default policy left the release but was not deleted (resource-policy keep).
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    assert!(policies.get("default").await.unwrap().spec.default);

    // The upgrade to a chart whose CRD changed updates it.
    run(&["upgrade", "unwedge", current.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/gpuwedges.unwedge.io",
        "--timeout=30s",
    ])
    .await
    .unwrap();
    assert_eq!(
        crd_state(&cp).await,
        (true, Some("unwedge".into())),
        "helm upgrade installed the current CRD"
    );

    // The old incident stays readable, typed and through kubectl, and takes the new field.
    let got = wedges.get("node-a-0000-03-00-0-7").await.unwrap();
    assert_eq!(got.spec.node_name, "node-a");
    assert_eq!(
        got.status.as_ref().and_then(|s| s.phase),
        Some(unwedge_crds::Phase::Cordoned)
    );
    let listed = cp.kubectl_ok(&["get", "gw", "-o", "wide"]).await.unwrap();
    assert!(
        listed.contains("node-a-0000-03-00-0-7") && listed.contains("Cordoned"),
        "{listed}"
    );
    wedges
        .patch_status(
            "node-a-0000-03-00-0-7",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"quarantineRule": "unwedge-node-a-0000-03-00-0-7"}})),
        )
        .await
        .unwrap();
    let got = wedges.get("node-a-0000-03-00-0-7").await.unwrap();
    assert_eq!(
        got.status.and_then(|s| s.quarantine_rule).as_deref(),
        Some("unwedge-node-a-0000-03-00-0-7"),
        "the new field is stored, not pruned"
    );

    // Uninstall keeps the CRDs, and with them the incident and the default policy.
    run(&["uninstall", "unwedge", "--wait"]).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        crd_state(&cp).await.0,
        "helm uninstall kept the CRD (crds.keep)"
    );
    assert!(
        wedges
            .get_opt("node-a-0000-03-00-0-7")
            .await
            .unwrap()
            .is_some()
    );
    assert!(policies.get_opt("default").await.unwrap().is_some());

    // Installing again adopts the kept CRDs (they name this release) without any flag.
    run(&["install", "unwedge", current.to_str().unwrap()]).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(crd_state(&cp).await, (true, Some("unwedge".into())));
    let manifest = run(&["get", "manifest", "unwedge"]).unwrap_or_else(|e| panic!("{e:#}"));
    let crds = documents(&manifest)
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .count();
    assert_eq!(crds, 2, "the reinstalled release manages both CRDs");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_lifecycle_from_chart_0_1_through_upgrade_uninstall_and_reinstall() {
    tokio::time::timeout(TEST_TIMEOUT, crd_upgrade())
        .await
        .expect("test timed out");
}

#[test]
fn template_device_id_map_renders_the_agents_file_format() {
    let objs = template(
        "helm",
        &[
            "--set",
            "agent.deviceIdMatch=map",
            "--set",
            "agent.deviceIdMap.GPU-0=0000:03:00.0",
            "--set",
            "agent.deviceIdMap.GPU-1=0000:83:00.0",
        ],
    );
    let cm = find(&objs, "ConfigMap", "unwedge-device-id-map");
    // node-agent/src/podresources.rs load_map: one `<device id>=<pci address>` per line.
    assert_eq!(
        cm["data"]["device-id-map"],
        "GPU-0=0000:03:00.0\nGPU-1=0000:83:00.0\n"
    );
    let pod = &find(&objs, "DaemonSet", "unwedge-agent")["spec"]["template"]["spec"];
    let args = args_of(&pod["containers"][0]);
    assert!(
        args.contains(&"--device-id-match=map".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--device-id-map=/etc/unwedge/device-id-map".to_string()),
        "{args:?}"
    );
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "device-id-map")
        .expect("the map is mounted");
    assert_eq!(mount["mountPath"], "/etc/unwedge");
}

/// Builds the operator binary in this test's profile and returns its path.
fn operator_binary() -> PathBuf {
    let release = !cfg!(debug_assertions);
    let root = repo_root();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root).args([
        "build",
        "-q",
        "-p",
        "unwedge-operator",
        "--bin",
        "unwedge-operator",
    ]);
    if release {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().expect("run cargo build").success(),
        "cargo build of unwedge-operator failed"
    );
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(if release { "release" } else { "debug" })
        .join("unwedge-operator")
}

/// GET `path` on 127.0.0.1:`port`; the HTTP status code, if the server answered.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The operator, run with the chart's rendered arguments and a token of the chart's operator
/// ServiceAccount, can do its job with the chart's RBAC: it takes the Lease (owned by the
/// operator's Deployment), turns ready, and writes a wedge's status, and never hears "forbidden".
/// Killed without releasing the Lease, then uninstalled: the garbage collector deletes the Lease.
async fn operator_with_chart_rbac() {
    let bin = operator_binary();
    let cp = ControlPlane::start().await.expect("control plane");
    cp.add_kwok_node("node-a", &[("unwedge.io/gpu", "true")], &[])
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let kubeconfig = cp.kubeconfig_path().to_str().unwrap().to_string();
    let chart = chart_dir();
    helm(
        "helm",
        home.path(),
        &[
            "install",
            "unwedge",
            chart.to_str().unwrap(),
            "--namespace",
            NS,
            "--create-namespace",
            "--kubeconfig",
            &kubeconfig,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let manifest = helm(
        "helm",
        home.path(),
        &[
            "get",
            "manifest",
            "unwedge",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let objs = documents(&manifest);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The default policy as the ConfigMap mounts it in the pod.
    let policy_file = home.path().join("policy.json");
    std::fs::write(&policy_file, default_policy(&objs).to_string()).unwrap();
    let args: Vec<String> = args_of(
        &find(&objs, "Deployment", "unwedge-operator")["spec"]["template"]["spec"]["containers"][0],
    )
    .into_iter()
    .map(|a| {
        if a.starts_with("--metrics-addr=") {
            format!("--metrics-addr=127.0.0.1:{port}")
        } else if a.starts_with("--default-policy=") {
            format!("--default-policy={}", policy_file.display())
        } else {
            a
        }
    })
    .collect();
    assert!(
        args.iter().any(|a| a.starts_with("--default-policy=")),
        "{args:?}"
    );
    let token = cp.create_token(NS, "unwedge-operator", None).await.unwrap();
    let op_kubeconfig = home.path().join("operator.kubeconfig");
    cp.write_kubeconfig(&token, &op_kubeconfig).unwrap();
    let log_path = home.path().join("operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(&bin)
        .args(&args)
        .env("KUBECONFIG", &op_kubeconfig)
        .env("POD_NAME", "unwedge-operator-test-0")
        .env("POD_NAMESPACE", NS)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the operator");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let client = cp.client().await.unwrap();
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), NS);
    wait_for(
        "the operator holds the Lease",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move {
                let l = leases.get_opt("unwedge-operator").await?;
                Ok(l.and_then(|l| l.spec?.holder_identity)
                    .filter(|h| h == "unwedge-operator-test-0"))
            }
        },
    )
    .await;
    let deployment_uid = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("unwedge-operator")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let owners: Vec<(String, String, String)> = leases
        .get("unwedge-operator")
        .await
        .unwrap()
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|o| (o.kind, o.name, o.uid))
        .collect();
    assert_eq!(
        owners,
        [(
            "Deployment".to_string(),
            "unwedge-operator".to_string(),
            deployment_uid
        )],
        "the Lease's owner is the operator's Deployment"
    );
    wait_for("the operator is ready", Duration::from_secs(60), || async {
        Ok((http_status(port, "/readyz").await == Some(200)).then_some(()))
    })
    .await;
    // Ready means the default policy is applied: the operator created it (Helm did not), with
    // the chart's values, as the field manager the docs name.
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    let applied = policies
        .get_opt("default")
        .await
        .unwrap()
        .expect("a ready operator has applied the default policy");
    assert!(applied.spec.default);
    assert_eq!(
        applied.spec.reboot_approval,
        Some(unwedge_crds::ApprovalMode::Manual)
    );
    let managers: Vec<String> = applied
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "unwedge-default-policy"),
        "{managers:?}"
    );

    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let wedge: GpuWedge = xe_wedge("node-a", 9);
    wedges.create(&PostParams::default(), &wedge).await.unwrap();
    let phase = wait_for(
        "the operator writes the wedge's phase",
        Duration::from_secs(60),
        || {
            let wedges = wedges.clone();
            async move {
                Ok(wedges
                    .get("node-a-0000-03-00-0-9")
                    .await?
                    .status
                    .and_then(|s| s.phase))
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = log_text();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the operator exited:\n{text}"
    );
    assert!(
        !text.to_lowercase().contains("forbidden"),
        "the chart's RBAC refused the operator something (phase reached: {phase:?}):\n{text}"
    );
    // SIGKILL: no release, as when an uninstall removes the Role before the leader stops.
    child.kill().await.unwrap();

    // Later starts of the operator, without leader election, each with its own policy file.
    let restart = |policy: Value, tag: &'static str| {
        std::fs::write(&policy_file, policy.to_string()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log_path = home.path().join(format!("operator-{tag}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = tokio::process::Command::new(&bin)
            .args(args.iter().map(|a| {
                if a.starts_with("--metrics-addr=") {
                    format!("--metrics-addr=127.0.0.1:{port}")
                } else if a.starts_with("--leader-elect=") {
                    "--leader-elect=false".to_string()
                } else {
                    a.clone()
                }
            }))
            .env("KUBECONFIG", &op_kubeconfig)
            .env("POD_NAME", format!("unwedge-operator-test-{tag}"))
            .env("POD_NAMESPACE", NS)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the operator again");
        (child, port, log_path)
    };

    // A human pauses the default policy; then the operator restarts with a changed chart value
    // (a helm upgrade): the change is applied, the human's pause is not undone.
    policies
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    let mut upgraded = default_policy(&objs);
    upgraded["spec"]["maxAttempts"] = json!(4);
    let (mut second, port2, log2) = restart(upgraded, "upgrade");
    wait_for(
        "the restarted operator is ready",
        Duration::from_secs(60),
        || async { Ok((http_status(port2, "/readyz").await == Some(200)).then_some(())) },
    )
    .await;
    let p = policies.get("default").await.unwrap();
    assert_eq!(
        p.spec.max_attempts,
        Some(4),
        "the chart's change is applied"
    );
    assert!(
        p.spec.paused,
        "a human's pause survives the operator's restart"
    );
    let text = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        text.contains("except fields someone changed") && text.contains(".spec.paused"),
        "{text}"
    );
    second.kill().await.unwrap();

    // A second default policy is refused by the chart's admission policy: the replica logs
    // the refusal and turns ready anyway (admission works; there is nothing to wait for).
    let mut other = default_policy(&objs);
    other["metadata"]["name"] = json!("default-2");
    let (mut third, port3, log3) = restart(other, "conflict");
    wait_for(
        "the operator is ready after the refusal",
        Duration::from_secs(60),
        || async { Ok((http_status(port3, "/readyz").await == Some(200)).then_some(())) },
    )
    .await;
    let text = std::fs::read_to_string(&log3).unwrap_or_default();
    assert!(
        text.contains("the default RecoveryPolicy was refused")
            && text.contains("is already the default"),
        "{text}"
    );
    assert!(policies.get_opt("default-2").await.unwrap().is_none());
    third.kill().await.unwrap();
    assert!(
        leases.get_opt("unwedge-operator").await.unwrap().is_some(),
        "the killed operator could not delete its Lease"
    );
    helm(
        "helm",
        home.path(),
        &[
            "uninstall",
            "unwedge",
            "--namespace",
            NS,
            "--kubeconfig",
            &kubeconfig,
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    wait_for(
        "the garbage collector deletes the Lease with the Deployment",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move {
                Ok(leases
                    .get_opt("unwedge-operator")
                    .await?
                    .is_none()
                    .then_some(()))
            }
        },
    )
    .await;
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_with_the_charts_rbac_and_arguments() {
    tokio::time::timeout(TEST_TIMEOUT, operator_with_chart_rbac())
        .await
        .expect("test timed out");
}
