//! `kubectl unwedge` against the real local control plane, invoked as a kubectl plugin
//! (`kubectl unwedge …` with the plugin on PATH).
//!
//! No operator runs: the test writes GpuWedges, RecoveryPolicies and their status as the agent
//! and the operator would, then reads what the plugin prints and what it wrote.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use e2e::cluster::{ControlPlane, repo_root};
use k8s_openapi::api::core::v1::{Event, ObjectReference, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use unwedge_crds::{DeviceRef, GpuWedge, GpuWedgeSpec, RecoveryPolicy};

/// Builds the plugin (same profile as this test) and returns the directory that holds it.
fn build_plugin() -> PathBuf {
    let release = !cfg!(debug_assertions);
    let root = repo_root();
    let mut cmd =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "-q", "-p", "kubectl-unwedge"]);
    if release {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build -p kubectl-unwedge");
    assert!(st.success(), "cargo build -p kubectl-unwedge failed");
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(if release { "release" } else { "debug" });
    assert!(
        dir.join("kubectl-unwedge").exists(),
        "no kubectl-unwedge in {}",
        dir.display()
    );
    dir
}

struct Plugin {
    path_env: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Plugin {
    /// The command `kubectl unwedge <args>` with KUBECONFIG set to `kubeconfig`.
    fn command(&self, kubeconfig: &Path, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.kubectl);
        cmd.arg("unwedge")
            .args(args)
            .env("PATH", &self.path_env)
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", "/nonexistent")
            .kill_on_drop(true);
        cmd
    }

    /// `kubectl unwedge <args>` with KUBECONFIG set to `kubeconfig`.
    async fn run_as(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.command(kubeconfig, args)
            .output()
            .await
            .expect("run kubectl unwedge")
    }

    /// `kubectl unwedge <args>` left running (e.g. `list --watch`), its stdout piped.
    fn spawn(&self, args: &[&str]) -> std::io::Result<tokio::process::Child> {
        self.command(&self.kubeconfig, args)
            .stdout(Stdio::piped())
            .spawn()
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_as(&self.kubeconfig, args).await
    }

    /// Runs and expects success; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "kubectl unwedge {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and expects failure; returns stderr.
    async fn fails(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let out = self.run_as(kubeconfig, args).await;
        assert!(
            !out.status.success(),
            "kubectl unwedge {} should have failed; it printed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn t(s: &str) -> Time {
    Time(s.parse().unwrap())
}

async fn wedge(api: &Api<GpuWedge>, name: &str, node: &str, detected: &str, status: Value) {
    let mut uevent = BTreeMap::new();
    uevent.insert("SEQNUM".to_string(), "4242".to_string());
    uevent.insert("WEDGED".to_string(), "rebind,bus-reset".to_string());
    let w = GpuWedge::new(
        name,
        GpuWedgeSpec {
            node_name: node.into(),
            device: DeviceRef {
                pci_address: "0000:03:00.0".into(),
                card: Some("card0".into()),
                driver: "xe".into(),
                ..Default::default()
            },
            methods: vec!["rebind".into(), "bus-reset".into()],
            detected_at: t(detected),
            boot_id: "b0".into(),
            uevent,
            blamed: None,
        },
    );
    api.create(&PostParams::default(), &w)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
    .unwrap_or_else(|e| panic!("status of {name}: {e}"));
}

/// Sends `signal` to a running `list --watch` (kubectl execs the plugin: same process) and
/// expects it to end cleanly.
async fn stop(watch: &mut tokio::process::Child, signal: &str) -> anyhow::Result<()> {
    let pid = watch.id().context("still running")?;
    let st = tokio::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .await?;
    assert!(st.success(), "kill -{signal} {pid}");
    let st = tokio::time::timeout(Duration::from_secs(10), watch.wait())
        .await
        .with_context(|| format!("list --watch still runs 10 s after SIG{signal}"))??;
    assert!(st.success(), "list --watch after SIG{signal}: {st}");
    Ok(())
}

fn line_of<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no line for {name} in:\n{text}"))
}

fn annotations(w: &GpuWedge) -> BTreeMap<String, String> {
    w.metadata.annotations.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_unwedge_lists_describes_and_steers_wedges() -> anyhow::Result<()> {
    let plugin_dir = tokio::task::spawn_blocking(build_plugin).await?;
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let client = cp.client().await?;
    let admin = ControlPlane::whoami(&client)
        .await?
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .context("admin username")?;
    let plugin = Plugin {
        path_env: format!(
            "{}:{}:{}",
            plugin_dir.display(),
            cp.bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
        kubectl: cp.bin_dir().join("kubectl"),
        kubeconfig: cp.kubeconfig_path().to_path_buf(),
    };

    // A policy whose ledger holds one node of four; only rebind and bus-reset are allowed.
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    let p: RecoveryPolicy = serde_json::from_value(json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": "gpu"},
        "spec": {"maxUnavailable": 1, "maxConcurrentReboots": 1, "approval": "Manual",
                 "allowedMethods": ["rebind", "bus-reset"], "escalation": ["rebind", "bus-reset"]}
    }))?;
    policies.create(&PostParams::default(), &p).await?;
    policies
        .patch_status(
            "gpu",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {
                "admitted": [{"wedge": "wa-approve", "node": "node-a", "unit": "Node", "reboot": false}],
                "nodesSelected": 4, "devicesSelected": 0}})),
        )
        .await?;

    let wedges: Api<GpuWedge> = Api::all(client.clone());
    // Admitted, drained, waiting for a human.
    wedge(
        &wedges,
        "wa-approve",
        "node-a",
        "2026-11-25T10:00:00Z",
        json!({"phase": "AwaitingApproval", "policy": "gpu", "methods": "rebind,bus-reset",
               "action": "waiting: approval", "cordoned": true,
               "admittedAt": "2026-11-25T10:00:02Z",
               "conditions": [
                 {"type": "Admitted", "status": "True", "reason": "Budget", "message": "1/1 nodes",
                  "lastTransitionTime": "2026-11-25T10:00:02Z"},
                 {"type": "Drained", "status": "True", "reason": "Evicted", "message": "1 pod",
                  "lastTransitionTime": "2026-11-25T10:00:20Z"}],
               "evictions": [{"namespace": "ml", "pod": "train-0", "at": "2026-11-25T10:00:05Z", "result": "Evicted"}]}),
    )
    .await;
    // Ran out of rungs: a failed attempt, then NeedsAttention.
    wedge(
        &wedges,
        "wn-attention",
        "node-b",
        "2026-11-25T09:00:00Z",
        json!({"phase": "NeedsAttention", "policy": "gpu", "methods": "rebind",
               "admittedAt": "2026-11-25T09:00:01Z",
               "approval": {"method": "rebind", "attempt": 1, "at": "2026-11-25T09:01:00Z",
                            "by": "system:serviceaccount:unwedge-system:unwedge-operator"},
               "attempts": [{"attempt": 1, "method": "rebind", "result": "Failed",
                             "startedAt": "2026-11-25T09:01:00Z", "finishedAt": "2026-11-25T09:01:30Z",
                             "message": "device did not come back after bind"}],
               "conditions": [{"type": "NeedsAttention", "status": "True", "reason": "LadderExhausted",
                               "message": "no rung left", "lastTransitionTime": "2026-11-25T09:02:00Z"}]}),
    )
    .await;
    // Four Queued wedges: first come, first served by detectedAt, then by name.
    for (name, node, at) in [
        ("wq-late", "node-c", "2026-11-25T11:00:30Z"),
        ("wq-tie-b", "node-d", "2026-11-25T11:00:20Z"),
        ("wq-tie-a", "node-e", "2026-11-25T11:00:20Z"),
        ("wq-early", "node-f", "2026-11-25T11:00:10Z"),
    ] {
        wedge(
            &wedges,
            name,
            node,
            at,
            json!({"phase": "Queued", "policy": "gpu", "budget": "1/1 nodes under recovery"}),
        )
        .await;
    }
    // An Event about the NeedsAttention wedge, as the operator's recorder writes it.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    events
        .create(
            &PostParams::default(),
            &Event {
                metadata: ObjectMeta {
                    name: Some("wn-attention.1".into()),
                    ..Default::default()
                },
                involved_object: ObjectReference {
                    api_version: Some("unwedge.io/v1alpha1".into()),
                    kind: Some("GpuWedge".into()),
                    name: Some("wn-attention".into()),
                    ..Default::default()
                },
                reason: Some("LadderExhausted".into()),
                message: Some("rebind failed; bus-reset not allowed by policy gpu".into()),
                type_: Some("Warning".into()),
                first_timestamp: Some(t("2026-11-25T09:01:45Z")),
                last_timestamp: Some(t("2026-11-25T09:01:45Z")),
                count: Some(1),
                ..Default::default()
            },
        )
        .await?;

    // list: the columns, and queue positions in FCFS order.
    let list = plugin.ok(&["list"]).await;
    let header: Vec<&str> = list.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "NODE", "DEVICE", "DRIVER", "METHODS", "PHASE", "ACTION", "AGE", "QUEUE"
        ],
        "{list}"
    );
    let cols = |name: &str| -> Vec<String> {
        line_of(&list, name)
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(
        cols("wa-approve")[..6],
        [
            "wa-approve",
            "node-a",
            "0000:03:00.0",
            "xe",
            "rebind,bus-reset",
            "AwaitingApproval"
        ]
    );
    assert_eq!(cols("wa-approve").last().unwrap(), "-", "{list}");
    for (name, pos) in [
        ("wq-early", "1/4"),
        ("wq-tie-a", "2/4"),
        ("wq-tie-b", "3/4"),
        ("wq-late", "4/4"),
    ] {
        let c = cols(name);
        assert_eq!(c[5], "Queued", "{list}");
        assert_eq!(
            c[c.len() - 2..],
            [pos.to_string(), "(gpu)".to_string()],
            "queue position of {name}:\n{list}"
        );
    }

    // describe: the incident in order.
    let d = plugin.ok(&["describe", "wn-attention"]).await;
    assert!(d.contains("Phase:        NeedsAttention"), "{d}");
    let order = [
        "detected",
        "admitted",
        "approved attempt #1",
        "attempt #1 started",
        "attempt #1 failed",
        "event LadderExhausted (Warning)",
        "condition",
    ];
    let timeline = d.split("Timeline:").nth(1).expect("a Timeline section");
    let mut at = 0;
    for step in order {
        let found = timeline[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} missing or out of order in:\n{timeline}"));
        at += found + step.len();
    }
    assert!(
        timeline.contains("device did not come back after bind"),
        "{timeline}"
    );
    assert!(timeline.contains("SEQNUM=4242"), "{timeline}");
    let d = plugin.ok(&["describe", "wa-approve"]).await;
    assert!(
        d.contains("eviction") && d.contains("ml/train-0: Evicted"),
        "{d}"
    );

    // Unknown names.
    let e = plugin
        .fails(&plugin.kubeconfig, &["describe", "nope"])
        .await;
    assert!(
        e.contains("no GpuWedge named nope; try `kubectl unwedge list`"),
        "{e}"
    );
    let e = plugin.fails(&plugin.kubeconfig, &["approve", "nope"]).await;
    assert!(e.contains("no GpuWedge named nope"), "{e}");

    // approve: wrong phase, a method the policy excludes, then the real thing.
    let e = plugin
        .fails(&plugin.kubeconfig, &["approve", "wq-early"])
        .await;
    assert!(
        e.contains("cannot approve GpuWedge wq-early: it is Queued"),
        "{e}"
    );
    assert!(
        e.contains("waits for budget (1/1 nodes under recovery)"),
        "{e}"
    );
    let e = plugin
        .fails(
            &plugin.kubeconfig,
            &["approve", "wa-approve", "--method", "reboot"],
        )
        .await;
    assert!(
        e.contains("RecoveryPolicy gpu allows only: rebind, bus-reset"),
        "{e}"
    );
    assert!(
        annotations(&wedges.get("wa-approve").await?).is_empty(),
        "a refused approve writes nothing"
    );
    let out = plugin
        .ok(&["approve", "wa-approve", "--method", "bus-reset"])
        .await;
    assert!(out.contains(&format!("by {admin}")), "{out}");
    let ann = annotations(&wedges.get("wa-approve").await?);
    assert_eq!(
        ann.get("unwedge.io/approve").map(String::as_str),
        Some("bus-reset")
    );
    assert_eq!(
        ann.get("unwedge.io/by"),
        Some(&admin),
        "by must be the username the API server sees"
    );

    // retry and abandon.
    let e = plugin
        .fails(&plugin.kubeconfig, &["retry", "wq-late"])
        .await;
    assert!(
        e.contains("cannot retry GpuWedge wq-late: it is Queued"),
        "{e}"
    );
    plugin.ok(&["retry", "wn-attention"]).await;
    let ann = annotations(&wedges.get("wn-attention").await?);
    assert!(
        ann.get("unwedge.io/retry")
            .is_some_and(|v| v.parse::<jiff::Timestamp>().is_ok()),
        "{ann:?}"
    );
    assert_eq!(ann.get("unwedge.io/by"), Some(&admin));
    let out = plugin
        .ok(&["abandon", "wq-late", "--reason", "bad board, RMA"])
        .await;
    assert!(out.contains("node node-c stays cordoned"), "{out}");
    let ann = annotations(&wedges.get("wq-late").await?);
    assert_eq!(
        ann.get("unwedge.io/abandon").map(String::as_str),
        Some("bad board, RMA")
    );
    assert_eq!(ann.get("unwedge.io/by"), Some(&admin));

    // budget: the ledger and the queue.
    let b = plugin.ok(&["budget"]).await;
    let header: Vec<&str> = b.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "POLICY", "NODES", "ALLOWED", "IN-USE", "REBOOTS", "DEVICES", "QUEUED", "STATE"
        ],
        "{b}"
    );
    let row: Vec<&str> = line_of(&b, "gpu").split_whitespace().collect();
    assert_eq!(
        row,
        ["gpu", "4", "1", "1", "0/1", "0/1", "of", "0", "4", "-"],
        "{b}"
    );

    // list -o json|yaml: a List of the objects as the API returned them.
    let j: Value = serde_json::from_str(&plugin.ok(&["list", "-o", "json"]).await)?;
    assert_eq!(
        (&j["apiVersion"], &j["kind"]),
        (&json!("v1"), &json!("List"))
    );
    let items = j["items"].as_array().context("items")?;
    let names: Vec<&str> = items
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "wa-approve",
            "wn-attention",
            "wq-early",
            "wq-late",
            "wq-tie-a",
            "wq-tie-b"
        ]
    );
    let wn = &items[1];
    assert_eq!(wn["kind"], "GpuWedge");
    assert_eq!(wn["apiVersion"], "unwedge.io/v1alpha1");
    assert_eq!(wn["spec"]["device"]["card"], "card0");
    assert_eq!(wn["status"]["attempts"][0]["result"], "Failed");
    assert!(wn["metadata"]["resourceVersion"].is_string(), "{wn}");
    assert!(
        wn["metadata"].get("managedFields").is_none(),
        "hidden, as kubectl does"
    );
    let y: Value = serde_yaml::from_str(&plugin.ok(&["list", "-o", "yaml"]).await)?;
    assert_eq!(y, j, "yaml and json print the same List");

    // list -o wide: the policy, card, attempts and approval.
    let wide = plugin.ok(&["list", "-o", "wide"]).await;
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header[8..],
        [
            "QUEUE",
            "POLICY",
            "CARD",
            "ATTEMPTS",
            "LAST-ATTEMPT",
            "APPROVAL"
        ],
        "{wide}"
    );
    let row = line_of(&wide, "wn-attention");
    for cell in [
        "   gpu   ",
        "   card0   ",
        "   1   ",
        "   #1 rebind failed   ",
        "   rebind by system:serviceaccount:unwedge-system:unwedge-operator",
    ] {
        assert!(row.contains(cell), "{cell:?} missing in:\n{wide}");
    }
    assert!(
        line_of(&wide, "wa-approve").ends_with(&format!("requested by {admin}")),
        "approved above, not yet honoured by an operator:\n{wide}"
    );

    // describe -o json|yaml: the object itself.
    let d: Value =
        serde_json::from_str(&plugin.ok(&["describe", "wn-attention", "-o", "json"]).await)?;
    assert_eq!(&d, wn, "the same object as in the List");
    let d: Value =
        serde_yaml::from_str(&plugin.ok(&["describe", "wn-attention", "-o", "yaml"]).await)?;
    assert_eq!(&d, wn);

    // budget -o json: the rows, camelCase.
    let b: Value = serde_json::from_str(&plugin.ok(&["budget", "-o", "json"]).await)?;
    assert_eq!(
        b,
        json!([{"policy": "gpu", "default": false, "nodesSelected": 4, "nodesAllowed": 1,
                "nodesInUse": 1, "rebootsInUse": 0, "rebootsAllowed": 1, "devicesSelected": 0,
                "devicesAllowed": 1, "devicesInUse": 0, "queued": 4, "state": "-"}])
    );
    let b: Value = serde_yaml::from_str(&plugin.ok(&["budget", "-o", "yaml"]).await)?;
    assert_eq!(b[0]["nodesInUse"], 1);

    // pause and resume.
    let paused = |p: &RecoveryPolicy| p.spec.paused;
    let resume_ann = |p: &RecoveryPolicy| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("unwedge.io/resume").cloned())
    };
    let out = plugin.ok(&["pause", "gpu"]).await;
    assert!(
        out.contains("recoverypolicy/gpu paused: spec.paused set to true"),
        "{out}"
    );
    assert!(out.contains("Wedges are still recorded"), "{out}");
    assert!(paused(&policies.get("gpu").await?));
    let b: Value = serde_json::from_str(&plugin.ok(&["budget", "-o", "json"]).await)?;
    assert_eq!(b[0]["state"], "paused");
    let out = plugin.ok(&["resume", "gpu"]).await;
    assert!(out.contains("spec.paused set to false"), "{out}");
    assert!(out.contains("circuit breaker is not tripped"), "{out}");
    let p = policies.get("gpu").await?;
    assert!(!paused(&p) && resume_ann(&p).is_none(), "{:?}", p.metadata);
    // The breaker trips (as the operator records it); resume also sets unwedge.io/resume.
    policies
        .patch_status(
            "gpu",
            &PatchParams::default(),
            &Patch::Merge(
                &json!({"status": {"circuitBreakerTrippedAt": "2026-11-25T12:00:00Z",
                                            "resumed": "an earlier resume"}}),
            ),
        )
        .await?;
    plugin.ok(&["pause", "gpu"]).await;
    let out = plugin.ok(&["resume", "gpu"]).await;
    assert!(out.contains("tripped at 2026-11-25T12:00:00Z"), "{out}");
    let p = policies.get("gpu").await?;
    let token = resume_ann(&p).context("unwedge.io/resume set")?;
    assert!(token.parse::<jiff::Timestamp>().is_ok(), "{token}");
    assert!(
        out.contains(&format!("set unwedge.io/resume={token}")),
        "{out}"
    );
    assert!(!paused(&p));
    let e = plugin.fails(&plugin.kubeconfig, &["pause", "nope"]).await;
    assert!(
        e.contains("no RecoveryPolicy named nope; try `kubectl unwedge budget`"),
        "{e}"
    );

    // list --watch: the table, then a row for a wedge created while it runs (and nothing the
    // watcher's own first list replays).
    let mut watch = plugin.spawn(&["list", "--watch"])?;
    let mut lines = BufReader::new(watch.stdout.take().context("stdout")?).lines();
    let mut next_line = async || -> anyhow::Result<String> {
        tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("no line from list --watch within 30 s")??
            .context("list --watch ended")
    };
    let first = next_line().await?;
    assert!(first.starts_with("NAME "), "{first}");
    for _ in 0..6 {
        next_line().await?;
    }
    wedge(
        &wedges,
        "ww-new",
        "node-g",
        "2026-11-25T12:30:00Z",
        json!({"phase": "Queued", "policy": "gpu"}),
    )
    .await;
    let mut row = next_line().await?;
    assert!(
        row.starts_with("ww-new "),
        "the first change is the new wedge: {row}"
    );
    if !row.contains(" Queued ") {
        // Created, then its status written: two changes unless the watcher listed both at once.
        row = next_line().await?;
    }
    assert!(
        row.starts_with("ww-new ") && row.contains(" Queued ") && row.contains(" 5/5 (gpu)"),
        "its status written: {row}"
    );
    stop(&mut watch, "INT").await?;

    // list --watch -o json: every object on a line, then each change.
    let mut watch = plugin.spawn(&["list", "-w", "-o", "json"])?;
    let mut lines = BufReader::new(watch.stdout.take().context("stdout")?).lines();
    let mut next_object = async || -> anyhow::Result<Value> {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("no line from list -w -o json within 30 s")??
            .context("list -w -o json ended")?;
        Ok(serde_json::from_str(&line)?)
    };
    for _ in 0..7 {
        assert_eq!(next_object().await?["kind"], "GpuWedge");
    }
    wedges
        .patch(
            "ww-new",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"seen": "yes"}}})),
        )
        .await?;
    let o = next_object().await?;
    assert_eq!(o["metadata"]["name"], "ww-new");
    assert_eq!(o["metadata"]["labels"]["seen"], "yes");
    stop(&mut watch, "TERM").await?;

    // Completion: the scripts for kubectl-unwedge, and `kubectl unwedge <TAB>` through
    // kubectl's plugin completion (kubectl_complete-unwedge on PATH).
    let script = plugin.ok(&["completion", "bash"]).await;
    assert!(script.contains("kubectl-unwedge"), "{script}");
    let comp_dir = tempfile::tempdir()?;
    let bash_script = comp_dir.path().join("kubectl-unwedge.bash");
    std::fs::write(&bash_script, &script)?;
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(kubectl-unwedge list -o ''); COMP_CWORD=3; \
             _kubectl_unwedge kubectl-unwedge '' -o; echo \"${{COMPREPLY[*]}}\"",
            bash_script.display()
        ))
        .output()
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "table wide json yaml",
        "bash completes a subcommand's flag values: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        plugin
            .ok(&["completion", "zsh"])
            .await
            .contains("#compdef kubectl-unwedge")
    );
    let helper = comp_dir.path().join("kubectl_complete-unwedge");
    std::fs::write(&helper, plugin.ok(&["completion", "--kubectl"]).await)?;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))?;
    let kubectl_complete = async |words: &[&str]| -> String {
        let out = tokio::process::Command::new(&plugin.kubectl)
            .arg("__complete")
            .arg("unwedge")
            .args(words)
            .env(
                "PATH",
                format!("{}:{}", comp_dir.path().display(), plugin.path_env),
            )
            .env("KUBECONFIG", &plugin.kubeconfig)
            .env("HOME", "/nonexistent")
            .output()
            .await
            .expect("run kubectl __complete");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let c = kubectl_complete(&["pa"]).await;
    assert!(c.starts_with("pause\t"), "{c}");
    let c = kubectl_complete(&["describe", "wn-"]).await;
    assert!(
        c.starts_with("wn-attention\tNeedsAttention on node-b\n"),
        "{c}"
    );
    assert!(c.lines().any(|l| l == ":4"), "{c}");
    let c = kubectl_complete(&["resume", ""]).await;
    assert!(c.starts_with("gpu\n"), "{c}");

    // A user without RBAC: the message names the verb and resource it lacks.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "nobody"}}))?,
    )
    .await?;
    let token = cp.create_token("default", "nobody", None).await?;
    let dir = tempfile::tempdir()?;
    let nobody = dir.path().join("nobody.kubeconfig");
    cp.write_kubeconfig(&token, &nobody)?;
    let e = plugin.fails(&nobody, &["list"]).await;
    assert!(
        e.contains("missing RBAC: you may not list gpuwedges.unwedge.io (cluster-wide)"),
        "{e}"
    );
    assert!(
        e.contains("system:serviceaccount:default:nobody"),
        "the API server's message names the user: {e}"
    );
    let e = plugin.fails(&nobody, &["approve", "wa-approve"]).await;
    assert!(
        e.contains("you may not get gpuwedges.unwedge.io named wa-approve"),
        "{e}"
    );
    // --kubeconfig works as well as KUBECONFIG.
    let nobody_arg = nobody.display().to_string();
    let e = plugin
        .fails(&plugin.kubeconfig, &["budget", "--kubeconfig", &nobody_arg])
        .await;
    assert!(
        e.contains("you may not list recoverypolicies.unwedge.io"),
        "{e}"
    );

    // pause and resume need patch on recoverypolicies, which the chart's approver role does
    // not grant: a user with the approver's reads is told what is missing.
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "reader"}}))?,
    )
    .await?;
    let roles: Api<ClusterRole> = Api::all(client.clone());
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "unwedge-reader"},
                "rules": [{"apiGroups": ["unwedge.io"], "resources": ["gpuwedges", "recoverypolicies"],
                           "verbs": ["get", "list", "watch"]}]}))?,
        )
        .await?;
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "unwedge-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "unwedge-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}]}))?,
        )
        .await?;
    let token = cp.create_token("default", "reader", None).await?;
    let reader = dir.path().join("reader.kubeconfig");
    cp.write_kubeconfig(&token, &reader)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = plugin.fails(&reader, &["pause", "gpu"]).await;
        if !e.contains("you may not get") || tokio::time::Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        e.contains("missing RBAC: you may not patch recoverypolicies.unwedge.io named gpu"),
        "{e}"
    );
    assert!(
        e.contains("grants `patch` on `recoverypolicies.unwedge.io`"),
        "{e}"
    );
    assert!(
        !paused(&policies.get("gpu").await?),
        "a refused pause changes nothing"
    );
    Ok(())
}
