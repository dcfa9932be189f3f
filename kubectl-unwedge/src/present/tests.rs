//! The presentation rules, as unit tests.

use super::{budget::*, data::*, list::*, table::*, timeline::*, watch::*};
use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher;
use unwedge_crds::labels::{ANN_APPROVE, ANN_BY};
use unwedge_crds::{
    Admission, Approval, AttemptResult, BudgetUnit, DeviceRef, Eviction, GpuWedgeSpec,
    GpuWedgeStatus, RecoveryPolicySpec, RecoveryPolicyStatus,
};
use unwedge_crds::{AttemptOutcome, GpuWedge, Phase, RecoveryPolicy, budget};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn wedge(name: &str, detected: &str, phase: Phase, policy: Option<&str>) -> GpuWedge {
    let mut w = GpuWedge::new(
        name,
        GpuWedgeSpec {
            node_name: "node-a".into(),
            device: DeviceRef {
                pci_address: "0000:03:00.0".into(),
                driver: "xe".into(),
                ..Default::default()
            },
            methods: vec!["rebind".into(), "bus-reset".into()],
            detected_at: Time(ts(detected)),
            boot_id: String::new(),
            uevent: BTreeMap::new(),
            blamed: None,
        },
    );
    w.metadata.creation_timestamp = Some(Time(ts(detected)));
    w.status = Some(GpuWedgeStatus {
        phase: Some(phase),
        policy: policy.map(Into::into),
        ..Default::default()
    });
    w
}

#[test]
fn queue_is_first_come_first_served_per_policy_with_name_as_tie_breaker() {
    let ws = vec![
        wedge("c", "2026-01-01T00:00:02Z", Phase::Queued, Some("p1")),
        wedge("b", "2026-01-01T00:00:01Z", Phase::Queued, Some("p1")),
        wedge("a", "2026-01-01T00:00:02Z", Phase::Queued, Some("p1")),
        wedge("z", "2026-01-01T00:00:00Z", Phase::Queued, Some("p2")),
        wedge("x", "2025-01-01T00:00:00Z", Phase::Cordoned, Some("p1")),
    ];
    let q = queue_positions(&ws);
    assert_eq!(q.get("b"), Some(&(1, 3)));
    assert_eq!(
        q.get("a"),
        Some(&(2, 3)),
        "same detectedAt as c: name decides"
    );
    assert_eq!(q.get("c"), Some(&(3, 3)));
    assert_eq!(
        q.get("z"),
        Some(&(1, 1)),
        "another policy has its own queue"
    );
    assert_eq!(q.get("x"), None, "only Queued wedges have a position");
}

#[test]
fn list_rows_show_the_columns_and_queue_position() {
    let ws = vec![
        wedge("w2", "2026-01-01T00:00:00Z", Phase::Queued, Some("gpu")),
        wedge("w1", "2026-01-01T00:00:00Z", Phase::Cordoned, Some("gpu")),
    ];
    let rows = rows(&ws, ts("2026-01-01T00:05:30Z"), false);
    assert_eq!(
        rows[0],
        vec![
            "w1",
            "node-a",
            "0000:03:00.0",
            "xe",
            "rebind,bus-reset",
            "Cordoned",
            "-",
            "5m30s",
            "-"
        ]
    );
    assert_eq!(rows[1][5], "Queued");
    assert_eq!(rows[1][8], "1/1 (gpu)");
    let text = render_table(&LIST_HEADERS, &rows);
    assert!(text.starts_with("NAME   NODE     DEVICE"), "{text}");
}

#[test]
fn ages_read_like_kubectl() {
    let d = |s: i64| human_duration(SignedDuration::from_secs(s));
    assert_eq!(d(45), "45s");
    assert_eq!(d(200), "3m20s");
    assert_eq!(d(45 * 60), "45m");
    assert_eq!(d(5 * 3600 + 30 * 60), "5h30m");
    assert_eq!(d(20 * 3600), "20h");
    assert_eq!(d(3 * 86400 + 5 * 3600), "3d5h");
    assert_eq!(d(30 * 86400), "30d");
    assert_eq!(d(-5), "0s", "clock skew never shows a negative age");
}

fn cond(t: &str, status: &str, at: &str, reason: &str) -> Condition {
    Condition {
        type_: t.into(),
        status: status.into(),
        last_transition_time: Time(ts(at)),
        reason: reason.into(),
        message: String::new(),
        observed_generation: None,
    }
}

#[test]
fn timeline_orders_the_incident_by_time_and_causality() {
    let mut w = wedge("w", "2026-01-01T00:00:00Z", Phase::Recovered, Some("gpu"));
    w.spec.uevent.insert("SEQNUM".into(), "4242".into());
    let s = w.status.as_mut().unwrap();
    s.admitted_at = Some(Time(ts("2026-01-01T00:00:01Z")));
    s.conditions = Some(vec![
        cond("Recovered", "True", "2026-01-01T00:01:00Z", "Verified"),
        cond("Admitted", "True", "2026-01-01T00:00:01Z", "Budget"),
    ]);
    s.evictions = Some(vec![Eviction {
        namespace: "ml".into(),
        pod: "train-0".into(),
        at: Time(ts("2026-01-01T00:00:05Z")),
        result: "Evicted".into(),
    }]);
    // Approval and attempt start in the same second: approval comes first.
    s.approval = Some(Approval {
        method: "rebind".into(),
        attempt: 1,
        at: Time(ts("2026-01-01T00:00:30Z")),
        by: "system:serviceaccount:unwedge-system:unwedge-operator".into(),
        containers: None,
    });
    s.attempts = Some(vec![AttemptResult {
        attempt: 1,
        method: "rebind".into(),
        result: AttemptOutcome::Succeeded,
        started_at: Time(ts("2026-01-01T00:00:30Z")),
        finished_at: Some(Time(ts("2026-01-01T00:00:40Z"))),
        message: "device back as card1".into(),
        boot_id: None,
        advertised: None,
        restarts: None,
    }]);
    s.finished_at = Some(Time(ts("2026-01-01T00:01:00Z")));
    let ev = Event {
        reason: Some("Uncordoned".into()),
        message: Some("node node-a uncordoned".into()),
        last_timestamp: Some(Time(ts("2026-01-01T00:00:59Z"))),
        involved_object: ObjectReference::default(),
        metadata: ObjectMeta::default(),
        ..Default::default()
    };
    let t = timeline(&w, &[ev]);
    let whats: Vec<&str> = t.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(
        whats,
        vec![
            "detected",
            "admitted",
            "condition",
            "eviction",
            "approved attempt #1",
            "attempt #1 started",
            "attempt #1 succeeded",
            "event Uncordoned",
            "condition",
            "finished",
        ]
    );
    assert!(t[0].detail.contains("SEQNUM=4242"), "{:?}", t[0]);
    assert!(
        t[4].detail.contains("by system:serviceaccount"),
        "{:?}",
        t[4]
    );
    assert_eq!(t[6].detail, "device back as card1");
    let text = render_timeline(&t);
    assert!(text.contains("+60s    condition"), "{text}");
}

#[test]
fn an_unfinished_attempt_shows_where_it_stands() {
    let mut w = wedge("w", "2026-01-01T00:00:00Z", Phase::Recovering, None);
    w.status.as_mut().unwrap().attempts = Some(vec![AttemptResult {
        attempt: 2,
        method: "bus-reset".into(),
        result: AttemptOutcome::Blocked,
        started_at: Time(ts("2026-01-01T00:00:10Z")),
        finished_at: None,
        message: "pid 42 (python) holds /dev/dri/renderD128".into(),
        boot_id: None,
        advertised: None,
        restarts: None,
    }]);
    let t = timeline(&w, &[]);
    assert_eq!(t.len(), 2);
    assert_eq!(t[1].what, "attempt #2 started");
    assert!(t[1].detail.contains("now blocked: pid 42"), "{:?}", t[1]);
}

/// The shared resolution, with a default for an absent value.
fn resolve_allowed(v: Option<&IntOrString>, total: u32, default: &IntOrString) -> Option<u32> {
    budget::resolve_limit(v.unwrap_or(default), total).ok()
}

/// The shared edge-case table, through the plugin's path: a policy and its status as
/// `kubectl unwedge budget` reads them, to the NODES ALLOWED cell.
#[test]
fn the_shared_limit_cases_hold_for_the_plugin() {
    for (value, total, allowed) in budget::LIMIT_CASES {
        let mut p = RecoveryPolicy::new(
            "gpu",
            serde_json::from_value(serde_json::json!({})).unwrap(),
        );
        p.spec.max_unavailable = value.field();
        p.status = Some(RecoveryPolicyStatus {
            nodes_selected: *total,
            ..Default::default()
        });
        let rows = budget_rows(&[p], &[]);
        assert_eq!(rows[0].nodes_allowed, *allowed, "{value:?} of {total}");
        let shown = allowed.map_or("invalid".to_string(), |n| n.to_string());
        assert_eq!(budget_cells(&rows)[0][2], shown, "{value:?} of {total}");
    }
}

#[test]
fn allowed_counts_resolve_ints_and_percentages() {
    let d = IntOrString::Int(1);
    assert_eq!(resolve_allowed(None, 10, &d), Some(1));
    assert_eq!(resolve_allowed(Some(&IntOrString::Int(3)), 10, &d), Some(3));
    assert_eq!(
        resolve_allowed(Some(&IntOrString::String("25%".into())), 10, &d),
        Some(2)
    );
    assert_eq!(
        resolve_allowed(Some(&IntOrString::String("10%".into())), 3, &d),
        Some(1)
    );
    assert_eq!(
        resolve_allowed(Some(&IntOrString::String("0%".into())), 30, &d),
        Some(0)
    );
    assert_eq!(
        resolve_allowed(Some(&IntOrString::String("x%".into())), 3, &d),
        None
    );
    assert_eq!(resolve_allowed(Some(&IntOrString::Int(-1)), 3, &d), None);
}

#[test]
fn budget_counts_the_ledger_and_the_queue() {
    let mut p = RecoveryPolicy::new(
        "gpu",
        RecoveryPolicySpec {
            default: false,
            node_selector: BTreeMap::new(),
            max_unavailable: Some(IntOrString::String("20%".into())),
            max_concurrent_reboots: Some(1),
            max_unavailable_devices: None,
            allowed_methods: None,
            escalation: None,
            approval: Default::default(),
            reboot_approval: None,
            drain: Default::default(),
            none: Default::default(),
            verify_timeout: None,
            max_attempts: None,
            repeat_offender: None,
            circuit_breaker: None,
            paused: true,
            dry_run: false,
            history_limit: None,
        },
    );
    let adm = |w: &str, n: &str, unit, reboot| Admission {
        wedge: w.into(),
        node: n.into(),
        unit,
        reboot,
    };
    p.status = Some(RecoveryPolicyStatus {
        admitted: vec![
            adm("w1", "n1", BudgetUnit::Node, false),
            adm("w2", "n1", BudgetUnit::Node, true),
            adm("w3", "n2", BudgetUnit::Device, false),
        ],
        nodes_selected: 10,
        devices_selected: 80,
        ..Default::default()
    });
    let ws = vec![
        wedge("q1", "2026-01-01T00:00:00Z", Phase::Queued, Some("gpu")),
        wedge("q2", "2026-01-01T00:00:00Z", Phase::Queued, Some("other")),
    ];
    let rows = budget_rows(&[p], &ws);
    assert_eq!(
        rows[0],
        BudgetRow {
            policy: "gpu".into(),
            default: false,
            nodes_selected: 10,
            nodes_allowed: Some(2),
            nodes_in_use: 1,
            reboots_in_use: 1,
            reboots_allowed: 1,
            devices_selected: 80,
            devices_allowed: Some(8),
            devices_in_use: 1,
            queued: 1,
            state: "paused".into(),
        }
    );
    assert_eq!(budget_cells(&rows)[0][5], "1/8 of 80");
}

#[test]
fn wide_rows_add_policy_card_attempts_and_approval() {
    let mut w = wedge("w1", "2026-01-01T00:00:00Z", Phase::Verifying, Some("gpu"));
    w.spec.device.card = Some("card1".into());
    let s = w.status.as_mut().unwrap();
    let at = |n, m: &str, r| AttemptResult {
        attempt: n,
        method: m.into(),
        result: r,
        started_at: Time(ts("2026-01-01T00:01:00Z")),
        finished_at: None,
        message: String::new(),
        boot_id: None,
        advertised: None,
        restarts: None,
    };
    s.attempts = Some(vec![
        at(2, "bus-reset", AttemptOutcome::Succeeded),
        at(1, "rebind", AttemptOutcome::Failed),
    ]);
    s.approval = Some(Approval {
        method: "bus-reset".into(),
        attempt: 2,
        at: Time(ts("2026-01-01T00:01:00Z")),
        by: "alice".into(),
        containers: None,
    });
    let mut pending = wedge("w2", "2026-01-01T00:00:00Z", Phase::AwaitingApproval, None);
    pending.metadata.annotations = Some(BTreeMap::from([
        (ANN_APPROVE.to_string(), String::new()),
        (ANN_BY.to_string(), "bob".to_string()),
    ]));
    let now = ts("2026-01-01T00:05:30Z");
    let ws = [pending, w];
    let r = rows(&ws, now, true);
    assert_eq!(r[0].len(), WIDE_HEADERS.len());
    assert_eq!(
        r[0][..9],
        rows(&ws, now, false)[0],
        "wide starts with the list's columns"
    );
    assert_eq!(
        r[0][9..],
        [
            "gpu",
            "card1",
            "2",
            "#2 bus-reset succeeded",
            "bus-reset by alice"
        ]
    );
    assert_eq!(r[1][9..], ["-", "-", "0", "-", "requested by bob"]);
    assert_eq!(
        list_headers(true)[9..],
        ["POLICY", "CARD", "ATTEMPTS", "LAST-ATTEMPT", "APPROVAL"]
    );
    assert_eq!(list_headers(false), LIST_HEADERS);
}

#[test]
fn columns_keep_later_rows_under_the_table_and_widen_for_wider_cells() {
    let rows = vec![vec!["a".to_string(), "x".to_string(), "1".to_string()]];
    let mut cols = Columns::fit(&["NAME", "NODE", "AGE"], &rows);
    assert_eq!(cols.line(&["NAME", "NODE", "AGE"]), "NAME   NODE   AGE");
    assert_eq!(cols.line(&rows[0]), "a      x      1");
    assert_eq!(
        cols.line(&["longer-name", "y", "2"]),
        "longer-name   y      2"
    );
    assert_eq!(cols.line(&["b", "z", "3"]), "b             z      3");
}

fn obj(name: &str, rv: &str) -> DynamicObject {
    let mut o = DynamicObject::new(name, &ApiResource::erase::<GpuWedge>(&()));
    o.metadata.resource_version = Some(rv.into());
    o
}

fn names(changes: &[Change<DynamicObject>]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::Applied(o) => format!(
                "+{}@{}",
                o.metadata.name.as_deref().unwrap(),
                o.metadata.resource_version.as_deref().unwrap()
            ),
            Change::Deleted(o) => format!("-{}", o.metadata.name.as_deref().unwrap()),
        })
        .collect()
}

#[test]
fn a_watch_prints_only_what_changed_since_it_printed() {
    let mut w = Watch::new(vec![obj("a", "1"), obj("b", "1")]);
    // The watcher's own first list: nothing new.
    assert!(w.on(watcher::Event::Init).is_empty());
    assert!(w.on(watcher::Event::InitApply(obj("a", "1"))).is_empty());
    assert!(w.on(watcher::Event::InitApply(obj("b", "1"))).is_empty());
    assert!(w.on(watcher::Event::InitDone).is_empty());
    assert_eq!(names(&w.on(watcher::Event::Apply(obj("c", "2")))), ["+c@2"]);
    assert!(
        w.on(watcher::Event::Apply(obj("c", "2"))).is_empty(),
        "a replayed version"
    );
    assert_eq!(names(&w.on(watcher::Event::Apply(obj("a", "3")))), ["+a@3"]);
    assert_eq!(names(&w.on(watcher::Event::Delete(obj("b", "4")))), ["-b"]);
    // A re-list after a lost connection: c went away, a changed, d is new.
    w.on(watcher::Event::Init);
    w.on(watcher::Event::InitApply(obj("a", "5")));
    w.on(watcher::Event::InitApply(obj("d", "6")));
    assert_eq!(
        names(&w.on(watcher::Event::InitDone)),
        ["-c", "+a@5", "+d@6"]
    );
    let left: Vec<_> = w
        .objects()
        .map(|o| o.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(left, ["a", "d"]);
}

#[test]
fn data_prints_like_kubectl() {
    let mut o = obj("w", "7");
    o.types = None;
    o.metadata.managed_fields = Some(vec![Default::default()]);
    o.data = serde_json::json!({"spec": {"nodeName": "node-a"}});
    let o = shown(o, &ApiResource::erase::<GpuWedge>(&()));
    assert!(
        o.metadata.managed_fields.is_none(),
        "kubectl hides managedFields"
    );
    let list = list_object(&[o]);
    let json = render_data(&list, DataFormat::Json).unwrap();
    assert!(json.starts_with("{\n    \"apiVersion\": \"v1\""), "{json}");
    let back: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(back["kind"], "List");
    assert_eq!(back["items"][0]["kind"], "GpuWedge");
    assert_eq!(back["items"][0]["apiVersion"], "unwedge.io/v1alpha1");
    assert_eq!(back["items"][0]["spec"]["nodeName"], "node-a");
    let yaml = render_data(&list, DataFormat::Yaml).unwrap();
    let back: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(back["items"][0]["metadata"]["name"], "w");
    let line = render_watch_item(&back["items"][0], DataFormat::Json).unwrap();
    assert_eq!(line.lines().count(), 1);
    let doc = render_watch_item(&back["items"][0], DataFormat::Yaml).unwrap();
    assert!(
        doc.starts_with("---\napiVersion: unwedge.io/v1alpha1\n"),
        "{doc}"
    );
    assert_eq!(ListFormat::Wide.data(), None);
    assert_eq!(ListFormat::Yaml.data(), Some(DataFormat::Yaml));
}

#[test]
fn budget_rows_serialize_in_camel_case_with_null_for_an_invalid_limit() {
    let mut p = RecoveryPolicy::new(
        "gpu",
        serde_json::from_value(serde_json::json!({"default": true})).unwrap(),
    );
    p.spec.max_unavailable = Some(IntOrString::String("x%".into()));
    let rows = budget_rows(&[p], &[]);
    assert_eq!(budget_cells(&rows)[0][0], "gpu (default)");
    let v = serde_json::to_value(&rows).unwrap();
    assert_eq!(v[0]["policy"], "gpu");
    assert_eq!(v[0]["default"], true);
    assert_eq!(v[0]["nodesAllowed"], serde_json::Value::Null);
    assert_eq!(v[0]["rebootsAllowed"], 1);
    assert_eq!(v[0]["state"], "-");
}
