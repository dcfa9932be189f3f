//! Invariant 4 on the real control plane: a wedge seen while kube-apiserver is down waits in the
//! agent's outbox across an agent restart, is created when the API is back, and duplicates of
//! the open incident collapse (a replay records nothing new; a later uevent becomes an event).

use e2e::cluster::ControlPlane;
use kube::Api;
use unwedge_agent::outbox::{Outbox, replay};
use unwedge_agent::reporter::{DetectedWedge, Reported, Reporter};
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
