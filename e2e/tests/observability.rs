//! The chart's alerts and dashboard are checked against promtool and against the metrics the
//! real binaries export.
//!
//! - `promtool check rules` and `promtool test rules` (promtool built from the Go module proxy
//!   by tools/promtool/build.sh) on charts/unwedge/files/rules.yaml;
//! - the PrometheusRule the chart renders is that same file;
//! - every unwedge series the dashboard and the rules use — metric names, the labels they
//!   group by and match on, and the label values they select — exists in the live `/metrics`
//!   of the operator and the agent, started against the real local control plane (labels
//!   Prometheus adds, [`EXTERNAL_LABELS`], excepted);
//! - the dashboard's `cluster` variable: every panel selects on it and uses the `datasource`
//!   variable, and its All value selects series with and without a `cluster` label (promtool
//!   evaluates the panels' own expressions).

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::cluster::{ControlPlane, ensure_binaries, repo_root};
use e2e::fleet::Bins;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use unwedge_crds::{DeviceRef, GpuWedge, GpuWedgeSpec, RecoveryPolicy};

fn promtool() -> PathBuf {
    let out = Command::new(repo_root().join("tools/promtool/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run tools/promtool/build.sh");
    assert!(out.status.success(), "tools/promtool/build.sh failed");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    PathBuf::from(path)
}

fn rules_file() -> PathBuf {
    repo_root().join("charts/unwedge/files/rules.yaml")
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let promtool = promtool();
    let check = run_ok(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(rules_file()),
    );
    assert!(check.contains("SUCCESS: 8 rules found"), "{check}");
    let tests = repo_root().join("tools/promtool/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&tests)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no promtool tests in {}",
        tests.display()
    );
    let out = run_ok(
        Command::new(&promtool)
            .arg("test")
            .arg("rules")
            .args(&files),
    );
    assert!(out.contains("SUCCESS") && !out.contains("FAILED"), "{out}");
}

fn helm_template(args: &[&str]) -> Vec<Value> {
    let bin = ensure_binaries(&["helm"]).expect("pinned binaries");
    let home = tempfile::tempdir().unwrap();
    let chart = repo_root().join("charts/unwedge");
    let out = run_ok(
        Command::new(bin.join("helm"))
            .env("HELM_CACHE_HOME", home.path())
            .env("HELM_CONFIG_HOME", home.path())
            .env("HELM_DATA_HOME", home.path())
            .args([
                "template",
                "rel",
                chart.to_str().unwrap(),
                "--namespace",
                "ops",
                "--kube-version",
                "1.37.2",
            ])
            .args(args),
    );
    serde_yaml::Deserializer::from_str(&out)
        .map(|d| Value::deserialize(d).expect("helm template prints YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn the_prometheus_rule_is_the_rules_file_with_the_release_job_names() {
    let objs = helm_template(&["--set", "metrics.prometheusRule.enabled=true"]);
    let rule = objs
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .expect("a PrometheusRule when metrics.prometheusRule.enabled=true");
    let text = std::fs::read_to_string(rules_file())
        .unwrap()
        .replace(
            "job=\"unwedge-agent-metrics\"",
            "job=\"rel-unwedge-agent-metrics\"",
        )
        .replace(
            "job=\"unwedge-operator-metrics\"",
            "job=\"rel-unwedge-operator-metrics\"",
        );
    let file: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        rule["spec"], file,
        "the PrometheusRule must embed charts/unwedge/files/rules.yaml"
    );
    // The job names are the metrics Services the ServiceMonitors select.
    let services: BTreeSet<&str> = objs
        .iter()
        .filter(|o| o["kind"] == "Service")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    for svc in ["rel-unwedge-agent-metrics", "rel-unwedge-operator-metrics"] {
        assert!(
            services.contains(svc),
            "no Service {svc} for the alerts' job label: {services:?}"
        );
    }
    assert!(
        !objs
            .iter()
            .any(|o| o["kind"] == "PrometheusRule" && o["metadata"]["name"] != "rel-unwedge")
    );
}

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/unwedge/dashboards/unwedge.json"))
            .unwrap(),
    )
    .expect("the dashboard is JSON")
}

/// Every PromQL expression of the dashboard (panels, then query variables) and the rules.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dash = dashboard();
    fn walk(v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(("dashboard".into(), e.clone()));
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut out);
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            let q = v["query"]
                .as_str()
                .or(v["query"]["query"].as_str())
                .unwrap_or_default();
            out.push((
                format!(
                    "dashboard variable {}",
                    v["name"].as_str().unwrap_or_default()
                ),
                q.into(),
            ));
        }
    }
    let rules: Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules_file()).unwrap()).unwrap();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            out.push((
                format!("alert {}", r["alert"].as_str().unwrap()),
                r["expr"].as_str().unwrap().into(),
            ));
        }
    }
    out
}

/// What an expression asks of the unwedge series: metric names, `by (...)` labels, and
/// `label="value"` matchers of each metric.
#[derive(Debug, Default)]
struct Uses {
    metrics: BTreeSet<String>,
    by_labels: BTreeSet<String>,
    matchers: BTreeSet<(String, String, String)>,
    /// Label names matched on with any operator (`=`, `!=`, `=~`, `!~`), and the label of
    /// `label_values(metric, label)` in a dashboard variable.
    labels: BTreeSet<String>,
}

/// Labels Prometheus puts on every series (an external label, or a target label a
/// multi-cluster setup adds by relabelling), never unwedge: a bare `/metrics` has none of them
/// by design. The dashboard selects `cluster=~"$cluster"` and groups by `cluster`; its All
/// value `.*` also matches series without the label, so a Prometheus that has none needs
/// nothing (`the_cluster_variable_selects_series_with_and_without_a_cluster_label`).
const EXTERNAL_LABELS: &[&str] = &["cluster"];

fn ident_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_' || s[i] == b':') {
        i += 1;
    }
    i
}

fn uses(expr: &str) -> Uses {
    let mut u = Uses::default();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_alphabetic() || b[i] == b'_' {
            let start = i;
            i = ident_end(b, i);
            let word = &expr[start..i];
            let rest = expr[i..].trim_start();
            if word == "label_values" && rest.starts_with('(') {
                let close = rest.find(')').unwrap();
                if let Some((_, label)) = rest[1..close].rsplit_once(',') {
                    u.labels.insert(label.trim().into());
                }
            } else if (word == "by" || word == "without") && rest.starts_with('(') {
                let close = rest.find(')').unwrap();
                if word == "by" {
                    for l in rest[1..close]
                        .split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                    {
                        u.by_labels.insert(l.into());
                    }
                }
                i = expr.len() - rest.len() + close + 1;
            } else if word.starts_with("unwedge_") {
                u.metrics.insert(word.into());
                if let Some(sel) = rest.strip_prefix('{') {
                    let close = sel.find('}').unwrap();
                    for m in sel[..close].split(',') {
                        let name: String = m
                            .trim()
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if !name.is_empty() {
                            u.labels.insert(name);
                        }
                        if let Some((k, v)) = m.split_once('=') {
                            let (k, v) = (k.trim(), v.trim());
                            if !k.ends_with('!') && !v.starts_with('~') {
                                u.matchers.insert((
                                    word.into(),
                                    k.into(),
                                    v.trim_matches('"').into(),
                                ));
                            }
                        }
                    }
                    i = expr.len() - sel.len() + close + 1;
                }
            }
        } else if b[i] == b'"' {
            i += 1 + expr[i + 1..]
                .find('"')
                .map(|n| n + 1)
                .unwrap_or(expr.len() - i - 1);
        } else {
            i += 1;
        }
    }
    u
}

#[test]
fn expression_scanner_finds_names_labels_and_matchers() {
    let u = uses(
        r#"max by (policy, unit) (unwedge_budget_in_use{unit="node", cluster=~"$cluster"}) and on (policy) sum(rate(unwedge_x_bucket{le!="+Inf"}[5m])) > up{job="unwedge_not_a_metric"}"#,
    );
    assert_eq!(
        u.metrics,
        BTreeSet::from([
            "unwedge_budget_in_use".to_string(),
            "unwedge_x_bucket".to_string()
        ])
    );
    assert_eq!(
        u.by_labels,
        BTreeSet::from(["policy".to_string(), "unit".to_string()])
    );
    assert_eq!(
        u.matchers,
        BTreeSet::from([(
            "unwedge_budget_in_use".to_string(),
            "unit".to_string(),
            "node".to_string()
        )])
    );
    assert_eq!(
        u.labels,
        BTreeSet::from(["cluster".to_string(), "le".to_string(), "unit".to_string()])
    );
    let v = uses("label_values(unwedge_leader, cluster)");
    assert_eq!(v.metrics, BTreeSet::from(["unwedge_leader".to_string()]));
    assert_eq!(v.labels, BTreeSet::from(["cluster".to_string()]));
}

/// The selectors of `expr` on unwedge series and on `up`: (metric, what is between the braces,
/// or `None` when the metric has no braces).
fn selectors(expr: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            i += 1 + expr[i + 1..].find('"').map(|n| n + 1).unwrap_or(0);
        } else if b[i].is_ascii_alphabetic() || b[i] == b'_' {
            let start = i;
            i = ident_end(b, i);
            let word = &expr[start..i];
            if word.starts_with("unwedge_") || word == "up" {
                let sel = expr[i..]
                    .strip_prefix('{')
                    .map(|r| r[..r.find('}').unwrap()].to_string());
                if word.starts_with("unwedge_") || sel.is_some() {
                    out.push((word.to_string(), sel));
                }
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn every_dashboard_panel_uses_the_datasource_and_cluster_variables() {
    let dash = dashboard();
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no dashboard variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let cluster = var("cluster");
    assert_eq!(cluster["type"], "query");
    assert_eq!(cluster["query"], "label_values(unwedge_leader, cluster)");
    assert_eq!(cluster["datasource"]["uid"], "${datasource}");
    assert_eq!(cluster["includeAll"], true);
    // All is `.*`, not Grafana's default (a regex of the values found): with no cluster label
    // anywhere there are no values, and `.*` still matches the series.
    assert_eq!(cluster["allValue"], ".*");
    assert_eq!(cluster["current"]["value"], json!(["$__all"]));

    let mut wrong = Vec::new();
    let mut panels = 0;
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = p["title"].as_str().unwrap();
        if p["datasource"]["uid"] != "${datasource}" {
            wrong.push(format!("{title}: panel datasource {}", p["datasource"]));
        }
        for t in p["targets"].as_array().unwrap() {
            if t["datasource"]["uid"] != "${datasource}" {
                wrong.push(format!("{title}: target datasource {}", t["datasource"]));
            }
            let expr = t["expr"].as_str().unwrap();
            for (metric, sel) in selectors(expr) {
                if !sel.is_some_and(|s| s.contains(r#"cluster=~"$cluster""#)) {
                    wrong.push(format!(
                        "{title}: {metric} without cluster=~\"$cluster\" in {expr}"
                    ));
                }
            }
        }
    }
    assert!(panels > 10, "{panels} panels");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The dashboard's own expressions, with the variables as Grafana substitutes them
/// (`$cluster` given), evaluated by promtool over two clusters' series: one from a Prometheus
/// that adds no `cluster` label, one labelled `cluster="east"`, each with two operator
/// replicas.
#[test]
fn the_cluster_variable_selects_series_with_and_without_a_cluster_label() {
    let dash = dashboard();
    let expr = |title: &str, cluster: &str| -> String {
        let p = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        p["targets"][0]["expr"]
            .as_str()
            .unwrap()
            .replace("$cluster", cluster)
    };
    let info = |cluster: Option<&str>, instance: &str, wedge: &str, node: &str, phase: &str| {
        let c = cluster
            .map(|c| format!("cluster=\"{c}\", "))
            .unwrap_or_default();
        json!({
            "series": format!(
                "unwedge_wedge_info{{{c}instance=\"{instance}\", wedge=\"{wedge}\", node=\"{node}\", device=\"0000:03:00.0\", driver=\"xe\", phase=\"{phase}\", policy=\"gpu\"}}"
            ),
            "values": "1x5",
        })
    };
    let gauge = |name: &str, labels: &str, v: u32| json!({"series": format!("{name}{{{labels}}}"), "values": format!("{v}x5")});
    let mut input = Vec::new();
    for op in ["op-0", "op-1"] {
        input.push(info(None, op, "w1", "n1", "Draining"));
        input.push(info(None, op, "w2", "n1", "NeedsAttention"));
        input.push(info(Some("east"), op, "w1", "e1", "NeedsAttention"));
        input.push(gauge(
            "unwedge_wedges_by_phase",
            &format!(r#"phase="NeedsAttention", instance="{op}""#),
            1,
        ));
        input.push(gauge(
            "unwedge_wedges_by_phase",
            &format!(r#"phase="NeedsAttention", cluster="east", instance="{op}""#),
            1,
        ));
    }
    input.push(gauge("unwedge_leader", r#"instance="op-0""#, 1));
    input.push(gauge("unwedge_leader", r#"instance="op-1""#, 0));
    input.push(gauge(
        "unwedge_leader",
        r#"cluster="east", instance="op-0""#,
        0,
    ));
    input.push(gauge(
        "unwedge_leader",
        r#"cluster="east", instance="op-1""#,
        0,
    ));

    let wedge = |c: &str, wedge: &str, node: &str, phase: &str| {
        format!(
            r#"{{{c}wedge="{wedge}", node="{node}", device="0000:03:00.0", driver="xe", phase="{phase}", policy="gpu"}}"#
        )
    };
    let sample = |labels: String, value: u32| json!({"labels": labels, "value": value});
    let case = |expr: String, samples: Vec<Value>| json!({"expr": expr, "eval_time": "2m", "exp_samples": samples});
    let cases = vec![
        // All: both clusters, each wedge once however many replicas export it.
        case(
            expr("Open wedges", ".*"),
            vec![
                sample(wedge("", "w1", "n1", "Draining"), 1),
                sample(wedge("", "w2", "n1", "NeedsAttention"), 1),
                sample(
                    wedge(r#"cluster="east", "#, "w1", "e1", "NeedsAttention"),
                    1,
                ),
            ],
        ),
        case(
            expr("Open wedges", "east"),
            vec![sample(
                wedge(r#"cluster="east", "#, "w1", "e1", "NeedsAttention"),
                1,
            )],
        ),
        case(
            expr("Nodes with open wedges", ".*"),
            vec![
                sample(r#"{node="n1", phase="Draining"}"#.into(), 1),
                sample(r#"{node="n1", phase="NeedsAttention"}"#.into(), 1),
                sample(
                    r#"{cluster="east", node="e1", phase="NeedsAttention"}"#.into(),
                    1,
                ),
            ],
        ),
        // One per cluster, not one per replica.
        case(expr("Needs attention", ".*"), vec![sample("{}".into(), 2)]),
        case(
            expr("Needs attention", "east"),
            vec![sample("{}".into(), 1)],
        ),
        // The cluster with the fewest leaders: east has none.
        case(expr("Operator leader", ".*"), vec![sample("{}".into(), 0)]),
    ];
    let file = json!({
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input, "promql_expr_test": cases}],
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard_test.yaml");
    std::fs::write(&path, serde_yaml::to_string(&file).unwrap()).unwrap();
    let out = run_ok(Command::new(promtool()).arg("test").arg("rules").arg(&path));
    assert!(out.contains("SUCCESS") && !out.contains("FAILED"), "{out}");
}

/// Sample name → the label sets seen.
type Series = BTreeMap<String, Vec<BTreeMap<String, String>>>;

/// The series of a text exposition, and the family names it declares (`# TYPE`).
fn parse_exposition(text: &str) -> (Series, BTreeSet<String>) {
    let mut series = Series::new();
    let mut declared = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                declared.insert(name.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        let mut labels = BTreeMap::new();
        if line[end..].starts_with('{') {
            let close = line.rfind('}').unwrap();
            for kv in line[end + 1..close].split("\",") {
                if let Some((k, v)) = kv.split_once("=\"") {
                    labels.insert(k.trim().to_string(), v.trim_end_matches('"').to_string());
                }
            }
        }
        series.entry(name.to_string()).or_default().push(labels);
    }
    (series, declared)
}

/// A child process, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    Ok(body.to_string())
}

fn spawn(
    bin: &Path,
    args: &[String],
    env: &[(&str, &Path)],
    log: &Path,
    what: &'static str,
) -> Running {
    let f = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(args).stdout(f.try_clone().unwrap()).stderr(f);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Running(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("start {what} ({}): {e}", bin.display())),
    )
}

/// What the dashboard and rules need that a scrape does not have, one line each.
fn missing(scraped: &Series, declared: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for (who, expr) in expressions() {
        let u = uses(&expr);
        let mut labels_here = BTreeSet::new();
        for m in &u.metrics {
            match scraped.get(m) {
                Some(sets) => sets
                    .iter()
                    .for_each(|s| labels_here.extend(s.keys().cloned())),
                None => {
                    let family = ["_total", "_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|suf| m.strip_suffix(suf))
                        .unwrap_or(m);
                    let why = if declared.contains(family) || declared.contains(m.as_str()) {
                        "declared (# TYPE) but no series: its label sets are never pre-initialised"
                    } else {
                        "no series: prometheus-client 0.24 prints nothing (not even # TYPE) for a labelled family until a label set exists, so the code must pre-initialise its label sets"
                    };
                    out.push(format!("{who}: {m} — {why}"));
                }
            }
        }
        for (m, k, v) in &u.matchers {
            if let Some(sets) = scraped
                .get(m)
                .filter(|sets| !sets.iter().any(|s| s.get(k) == Some(v)))
            {
                let seen: BTreeSet<&String> = sets.iter().filter_map(|s| s.get(k)).collect();
                out.push(format!(
                    "{who}: no {m}{{{k}=\"{v}\"}} series (values seen: {seen:?})"
                ));
            }
        }
        if !u.metrics.is_empty() && u.metrics.iter().all(|m| scraped.contains_key(m)) {
            let absent = |l: &String| {
                l != "le" && !EXTERNAL_LABELS.contains(&l.as_str()) && !labels_here.contains(l)
            };
            for l in u.by_labels.iter().filter(|l| absent(l)) {
                out.push(format!(
                    "{who}: groups by {l:?}, which no series of {:?} carries",
                    u.metrics
                ));
            }
            for l in u.labels.iter().filter(|l| absent(l)) {
                out.push(format!(
                    "{who}: matches on {l:?}, which no series of {:?} carries",
                    u.metrics
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboard_and_rules_use_is_in_live_metrics() -> anyhow::Result<()> {
    let bins = tokio::task::spawn_blocking(Bins::build).await??;
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let client = cp.client().await?;
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "unwedge-system"}}))?,
    )
    .await?;
    cp.add_kwok_node("node-a", &[("unwedge.io/gpu", "true")], &[])
        .await?;
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
                "metadata": {"name": "default"}, "spec": {"default": true}
            }))?,
        )
        .await?;

    let work = tempfile::tempdir()?;
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    let op_addr = free_addr();
    let agent_addr = free_addr();
    let _operator = spawn(
        &bins.operator,
        &[
            "--leader-elect=true".into(),
            "--lease-namespace=unwedge-system".into(),
            "--identity=observability-test".into(),
            format!("--metrics-addr={op_addr}"),
        ],
        &[("KUBECONFIG", &kubeconfig)],
        &work.path().join("operator.log"),
        "operator",
    );
    for d in ["sys", "dev", "proc", "state"] {
        std::fs::create_dir_all(work.path().join(d))?;
    }
    let p = |d: &str| work.path().join(d).display().to_string();
    let _agent = spawn(
        &bins.agent,
        &[
            "--node-name=node-a".into(),
            format!("--sysfs-root={}", p("sys")),
            format!("--dev-root={}", p("dev")),
            format!("--proc-root={}", p("proc")),
            format!("--state-dir={}", p("state")),
            format!("--pod-resources-socket={}", p("state/none.sock")),
            format!("--metrics-addr={agent_addr}"),
        ],
        &[("KUBECONFIG", &kubeconfig)],
        &work.path().join("agent.log"),
        "agent",
    );

    // A wedge as the agent reports it, so the operator has something to count.
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let w = GpuWedge::new(
        "node-a-0000-03-00-0-1",
        GpuWedgeSpec {
            node_name: "node-a".into(),
            device: DeviceRef {
                pci_address: "0000:03:00.0".into(),
                driver: "xe".into(),
                ..Default::default()
            },
            methods: vec!["rebind".into(), "bus-reset".into()],
            detected_at: Time(jiff::Timestamp::now()),
            boot_id: String::new(),
            uevent: BTreeMap::new(),
            blamed: None,
        },
    );
    wedges.create(&PostParams::default(), &w).await?;
    let _ = wedges
        .patch_status(
            "node-a-0000-03-00-0-1",
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {}})),
        )
        .await;

    // Both must serve; then poll until nothing is missing or the deadline passes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut gaps: Vec<String>;
    loop {
        let (op, agent) = (scrape(&op_addr).await, scrape(&agent_addr).await);
        match (op, agent) {
            (Ok(op), Ok(agent)) => {
                let (mut series, mut declared) = parse_exposition(&op);
                let (s2, d2) = parse_exposition(&agent);
                series.extend(s2);
                declared.extend(d2);
                let last = missing(&series, &declared);
                if last.is_empty() {
                    break;
                }
                gaps = last;
            }
            (op, agent) => {
                gaps = vec![format!(
                    "scrape: operator {:?}, agent {:?}",
                    op.err(),
                    agent.err()
                )];
            }
        }
        if Instant::now() > deadline {
            let logs = |f: &str| std::fs::read_to_string(work.path().join(f)).unwrap_or_default();
            let tail = |s: String| {
                s.lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "series used by the dashboard/rules missing from live /metrics after 60s:\n  {}\n\noperator log:\n{}\n\nagent log:\n{}",
                gaps.join("\n  "),
                tail(logs("operator.log")),
                tail(logs("agent.log"))
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(())
}

#[test]
fn exposition_parser_tells_declared_families_from_series() {
    let m = unwedge_agent::metrics::Metrics::new();
    m.uevent("wedge");
    let (series, declared) = parse_exposition(&m.encode());
    assert!(
        series.contains_key("unwedge_agent_uevents_received_total"),
        "{series:?}"
    );
    assert!(
        series.contains_key("unwedge_agent_netlink_overruns_total"),
        "{series:?}"
    );
    // The agent pre-creates the label sets the dashboards query, so they exist at zero before
    // the first attempt.
    assert!(
        series.contains_key("unwedge_agent_attempts_total"),
        "pre-created attempts series missing: {series:?}"
    );
    // A family declared without any label set is told apart from one with series.
    let (bare_series, bare_declared) =
        parse_exposition("# HELP lazy_total A family.\n# TYPE lazy_total counter\n");
    assert!(!bare_series.contains_key("lazy_total"), "{bare_series:?}");
    assert!(bare_declared.contains("lazy_total"), "{bare_declared:?}");
    assert!(
        declared.contains("unwedge_agent_uevents_received"),
        "{declared:?}"
    );
}
