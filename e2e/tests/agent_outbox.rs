//! Invariant 4 on the real control plane: a wedge seen while kube-apiserver is down waits in the
//! agent's outbox across an agent restart, is created when the API is back, and duplicates of
//! the open incident collapse (a replay records nothing new; a later uevent becomes an event);
//! and the same rule decided from a watch that lags.

use e2e::cluster::ControlPlane;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::{reflector, watcher};
use unwedge_agent::outbox::{Outbox, replay};
use unwedge_agent::reporter::{DetectedWedge, Reported, Reporter, WedgeView};
use unwedge_crds::{DeviceRef, GpuWedge};

fn detected(seq: u64, at: &str) -> DetectedWedge {
    let device = DeviceRef {
        pci_address: "0000:03:00.0".into(),
        card: Some("card0".into()),
        driver: "xe".into(),
        ..DeviceRef::default()
    };
    let at = at.parse().unwrap();
    DetectedWedge::from_uevent(
        "node-a",
        device,
        "rebind,bus-reset",
        Some(seq),
        at,
        "boot-1",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedge_seen_with_the_api_down_is_created_after_restart_and_duplicates_collapse() {
    let mut cp = ControlPlane::start().await.expect("control plane");
    cp.apply_crds().await.expect("CRDs");
    let client = cp.client().await.unwrap();
    let state = tempfile::tempdir().unwrap();

    cp.stop_apiserver().await;
    {
        let outbox = Outbox::open(state.path()).unwrap();
        outbox.put(&detected(4242, "2026-11-25T10:00:00Z")).unwrap();
        let pass = replay(&outbox, &Reporter::new(client.clone(), "node-a"))
            .await
            .unwrap();
        assert!(pass.stalled, "API is down, the pass must stall: {pass:?}");
        assert_eq!(outbox.len(), 1);
    } // the agent "dies" here

    cp.start_apiserver().await.expect("apiserver back");
    let outbox = Outbox::open(state.path()).unwrap();
    let reporter = Reporter::new(client.clone(), "node-a");
    let pass = replay(&outbox, &reporter).await.unwrap();
    let name = "node-a-0000-03-00-0-4242".to_string();
    assert_eq!(
        pass.reported,
        vec![Reported::Created(name.clone())],
        "{pass:?}"
    );
    assert!(outbox.is_empty(), "removed only after the API accepted it");

    let api: Api<GpuWedge> = Api::all(client.clone());
    let w = api.get(&name).await.unwrap();
    let labels = w.metadata.labels.clone().unwrap();
    assert_eq!(labels["unwedge.io/node"], "node-a");
    assert_eq!(labels["unwedge.io/device"], "0000-03-00.0");
    assert_eq!(w.spec.methods, vec!["rebind", "bus-reset"]);
    assert_eq!(
        w.status.as_ref().and_then(|s| s.consumers.clone()),
        Some(vec![]),
        "agent status written"
    );

    // The same event again (a replay after a crash between create and remove): nothing new.
    outbox.put(&detected(4242, "2026-11-25T10:00:00Z")).unwrap();
    let pass = replay(&outbox, &reporter).await.unwrap();
    assert_eq!(pass.reported, vec![Reported::AlreadyRecorded(name.clone())]);
    // A later uevent of the same device while the incident is open: an event, not a new object.
    outbox.put(&detected(4250, "2026-11-25T10:00:07Z")).unwrap();
    let pass = replay(&outbox, &reporter).await.unwrap();
    assert_eq!(pass.reported, vec![Reported::Appended(name.clone())]);
    outbox.put(&detected(4250, "2026-11-25T10:00:07Z")).unwrap();
    let pass = replay(&outbox, &reporter).await.unwrap();
    assert_eq!(
        pass.reported,
        vec![Reported::AlreadyRecorded(name.clone())],
        "the event is not appended twice"
    );

    let all = api.list(&Default::default()).await.unwrap().items;
    assert_eq!(
        all.len(),
        1,
        "one open incident per device: {:?}",
        all.iter()
            .map(|w| w.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    let events = all[0]
        .status
        .as_ref()
        .and_then(|s| s.events.clone())
        .unwrap_or_default();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].seqnum, Some(4250));
    cp.stop().await;
}

fn open_of(all: &[GpuWedge]) -> Vec<String> {
    all.iter()
        .filter(|w| unwedge_agent::reporter::is_open(w))
        .map(|w| w.metadata.name.clone().unwrap_or_default())
        .collect()
}

/// A store that synced once (a watch's first list, here empty) and never hears another event:
/// the worst a lagging watch can do.
fn frozen_view() -> WedgeView {
    let (store, mut writer) = reflector::store::<GpuWedge>();
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    WedgeView::new(store)
}

/// "One open incident per device" served from the agent's watch instead of a LIST: with a
/// watch that never delivers anything after its first list, the agent still sees its own
/// create, an incident the operator closed meanwhile is not appended to (the append's
/// resourceVersion is refused, the reporter LISTs), a deleted one neither, and a replay's
/// create that finds its name taken is decided again from a LIST. At every step the device
/// has exactly one open GpuWedge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_watch_never_lets_a_second_open_incident_be_created() {
    let cp = ControlPlane::start().await.expect("control plane");
    cp.apply_crds().await.expect("CRDs");
    let client = cp.client().await.unwrap();
    let api: Api<GpuWedge> = Api::all(client.clone());
    let all = || async { api.list(&Default::default()).await.unwrap().items };
    let reporter = Reporter::new(client.clone(), "node-a").watching(frozen_view());
    let name = |seq: u64| format!("node-a-0000-03-00-0-{seq}");

    let d1 = detected(100, "2026-11-25T10:00:00Z");
    assert_eq!(
        reporter.report(&d1).await.unwrap(),
        Reported::Created(name(100))
    );
    // The watch has not delivered it: the reporter's own write is what it decides from.
    let r = reporter
        .report(&detected(101, "2026-11-25T10:00:05Z"))
        .await
        .unwrap();
    assert_eq!(r, Reported::Appended(name(100)));
    assert_eq!(open_of(&all().await), [name(100)]);

    // The operator closes it; the agent's view still has it open.
    api.patch_status(
        &name(100),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Recovered"}})),
    )
    .await
    .unwrap();
    let r = reporter
        .report(&detected(102, "2026-11-25T10:01:00Z"))
        .await
        .unwrap();
    assert_eq!(
        r,
        Reported::Created(name(102)),
        "a new incident, not an event of a closed one"
    );
    let w100 = api.get(&name(100)).await.unwrap();
    assert_eq!(
        w100.status.and_then(|s| s.events).map(|e| e.len()),
        Some(1),
        "nothing appended to the closed incident"
    );
    assert_eq!(open_of(&all().await), [name(102)]);

    // A human deletes the open one; the agent's view still has it.
    api.delete(&name(102), &DeleteParams::default())
        .await
        .unwrap();
    let r = reporter
        .report(&detected(103, "2026-11-25T10:02:00Z"))
        .await
        .unwrap();
    assert_eq!(r, Reported::Created(name(103)));
    assert_eq!(open_of(&all().await), [name(103)]);

    // A replay of that detection by a reporter whose view synced before it was created (an
    // agent restarted between the create and the outbox's removal, its watch not yet
    // delivering it): the create finds the name taken, and the LIST says already recorded.
    let replayer = Reporter::new(client.clone(), "node-a").watching(frozen_view());
    let r = replayer
        .report(&detected(103, "2026-11-25T10:02:00Z"))
        .await
        .unwrap();
    assert_eq!(r, Reported::AlreadyRecorded(name(103)));
    // Its next detection of the device is decided from what that LIST taught the view.
    let r = replayer
        .report(&detected(104, "2026-11-25T10:02:09Z"))
        .await
        .unwrap();
    assert_eq!(r, Reported::Appended(name(103)));
    let now = all().await;
    assert_eq!(open_of(&now), [name(103)]);
    assert_eq!(
        now.len(),
        2,
        "100 (closed), 103 (open); 102 deleted: {:?}",
        now.iter()
            .map(|w| w.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    cp.stop().await;
}
