//! Invariant 4 at the file level: a wedge written to the outbox survives an agent restart while
//! the API server is unreachable, and nothing is removed until the API accepts it.

use std::fs;
use std::net::TcpListener;

use std::sync::Mutex;

use unwedge_agent::outbox::{Outbox, Sink, replay};
use unwedge_agent::reporter::{DetectedWedge, ReportError, Reported, Reporter};
use unwedge_crds::DeviceRef;

fn detected(seq: u64) -> DetectedWedge {
    let device = DeviceRef {
        pci_address: "0000:03:00.0".into(),
        card: Some("card0".into()),
        driver: "xe".into(),
        ..DeviceRef::default()
    };
    let at = "2026-11-25T10:00:00Z".parse().unwrap();
    DetectedWedge::from_uevent(
        "node-a",
        device,
        "rebind,bus-reset",
        Some(seq),
        at,
        "boot-1",
    )
}

/// A client for an API server that is not there: a port that was bound and released.
fn dead_api() -> kube::Client {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
    kube::Client::try_from(cfg).unwrap()
}

#[tokio::test]
async fn outbox_survives_a_restart_with_the_api_down() {
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path()).unwrap();
    let path = outbox.put(&detected(4242)).unwrap();
    assert_eq!(path.file_name().unwrap(), "node-a-0000-03-00-0-4242.json");
    // A duplicate of the same event replaces, not adds.
    outbox.put(&detected(4242)).unwrap();
    assert_eq!(outbox.len(), 1);

    let reporter = Reporter::new(dead_api(), "node-a");
    let pass = replay(&outbox, &reporter).await.unwrap();
    assert!(pass.stalled, "the API is down: {pass:?}");
    assert!(pass.reported.is_empty());
    drop(outbox);

    // A crash mid-write leaves a temp file: the next start ignores and removes it.
    fs::write(
        state.path().join("outbox/node-a-0000-03-00-0-9.json.tmp"),
        b"{\"trunc",
    )
    .unwrap();
    // Restart: a new Outbox over the same state dir, API still down.
    let outbox = Outbox::open(state.path()).unwrap();
    let pending = outbox.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].wedge, detected(4242));
    assert!(
        !state
            .path()
            .join("outbox/node-a-0000-03-00-0-9.json.tmp")
            .exists()
    );
    let pass = replay(&outbox, &Reporter::new(dead_api(), "node-a"))
        .await
        .unwrap();
    assert!(pass.stalled);
    assert_eq!(
        outbox.len(),
        1,
        "still there after the second failed replay"
    );
}

#[test]
fn a_corrupt_entry_is_set_aside_and_does_not_block_the_rest() {
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path()).unwrap();
    outbox.put(&detected(1)).unwrap();
    fs::write(outbox.dir().join("garbage.json"), b"not json").unwrap();
    let pending = outbox.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert!(outbox.rejected_dir().join("garbage.json").exists());
    assert!(!outbox.dir().join("garbage.json").exists());
    assert_eq!(outbox.rejected_total(), 1);
}

/// An API that refuses some wedges for good (422 Invalid, as for a status too large for the
/// CRD), fails others transiently (503) and accepts the rest.
#[derive(Default)]
struct Picky {
    invalid: Vec<String>,
    unavailable: Vec<String>,
    seen: Mutex<Vec<String>>,
}

fn api_error(code: u16) -> ReportError {
    ReportError::Api {
        name: "w".into(),
        source: kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: format!("HTTP {code}"),
            ..kube::core::Status::default()
        })),
    }
}

impl Sink for Picky {
    fn report(
        &self,
        wedge: &DetectedWedge,
    ) -> impl std::future::Future<Output = Result<Reported, ReportError>> + Send {
        let name = wedge.name();
        self.seen.lock().unwrap().push(name.clone());
        std::future::ready(if self.invalid.contains(&name) {
            Err(api_error(422))
        } else if self.unavailable.contains(&name) {
            Err(api_error(503))
        } else {
            Ok(Reported::Created(name))
        })
    }
}

fn on_device(seq: u64, pci: &str, second: i64) -> DetectedWedge {
    let mut d = detected(seq);
    d.device.pci_address = pci.into();
    d.detected_at = jiff::Timestamp::from_second(1_800_000_000 + second).unwrap();
    d
}

#[tokio::test]
async fn a_poison_entry_is_set_aside_and_the_next_is_still_reported() {
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path()).unwrap();
    let poison = on_device(1, "0000:03:00.0", 0);
    let next = on_device(2, "0000:03:00.0", 1);
    outbox.put(&poison).unwrap();
    outbox.put(&next).unwrap();
    let api = Picky {
        invalid: vec![poison.name()],
        ..Picky::default()
    };
    let pass = replay(&outbox, &api).await.unwrap();
    assert_eq!(pass.rejected, 1, "{pass:?}");
    assert_eq!(pass.reported, vec![Reported::Created(next.name())]);
    assert!(!pass.stalled);
    assert!(outbox.is_empty(), "nothing left to block later wedges");
    assert!(
        outbox
            .rejected_dir()
            .join(format!("{}.json", poison.name()))
            .exists(),
        "kept for a human"
    );
    assert_eq!(outbox.rejected_total(), 1);
    // The accepted one is remembered as detected; the rejected one is not.
    assert!(outbox.detected(&next.name(), "node-a", "0000:03:00.0", "boot-1"));
    assert!(!outbox.detected(&poison.name(), "node-a", "0000:03:00.0", "boot-1"));
    assert!(
        Outbox::open(state.path()).unwrap().detected(
            &next.name(),
            "node-a",
            "0000:03:00.0",
            "boot-1"
        ),
        "a restart remembers"
    );
}

#[tokio::test]
async fn a_transient_error_holds_back_only_its_own_device() {
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path()).unwrap();
    let busy = on_device(1, "0000:03:00.0", 0);
    let same_device_later = on_device(2, "0000:03:00.0", 1);
    let other_device = on_device(3, "0000:04:00.0", 2);
    for d in [&busy, &same_device_later, &other_device] {
        outbox.put(d).unwrap();
    }
    let api = Picky {
        unavailable: vec![busy.name()],
        ..Picky::default()
    };
    let pass = replay(&outbox, &api).await.unwrap();
    assert!(pass.stalled);
    assert_eq!(pass.rejected, 0);
    assert_eq!(pass.reported, vec![Reported::Created(other_device.name())]);
    assert_eq!(
        *api.seen.lock().unwrap(),
        vec![busy.name(), other_device.name()],
        "the later wedge of the busy device waits for the first (it may open the incident)"
    );
    assert_eq!(outbox.len(), 2, "the busy device's entries are kept");
}

#[test]
fn only_refusals_for_good_are_permanent() {
    for code in [400, 413, 422] {
        assert!(!api_error(code).is_retryable(), "{code}");
    }
    for code in [401, 403, 404, 409, 429, 500, 503] {
        assert!(api_error(code).is_retryable(), "{code}");
    }
    assert!(!ReportError::Unreportable("no PCI address".into()).is_retryable());
}

/// An API that accepts everything, recording what it was sent.
#[derive(Default)]
struct Accepting(Mutex<Vec<String>>);

impl Sink for Accepting {
    fn report(
        &self,
        wedge: &DetectedWedge,
    ) -> impl std::future::Future<Output = Result<Reported, ReportError>> + Send {
        self.0.lock().unwrap().push(wedge.name());
        std::future::ready(Ok(Reported::Created(wedge.name())))
    }
}

#[tokio::test]
async fn a_detection_that_cannot_be_written_is_still_reported() {
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path()).unwrap();
    // The state dir's outbox is replaced by a file: every write fails (as root, permissions
    // would not stop the test).
    fs::remove_dir_all(outbox.dir()).unwrap();
    fs::write(outbox.dir(), b"not a directory").unwrap();
    let d = detected(1);
    assert!(outbox.put(&d).is_err(), "the failed write is reported");
    assert_eq!(outbox.pending().unwrap().len(), 1, "kept in memory");
    let api = Accepting::default();
    let pass = replay(&outbox, &api).await.unwrap();
    assert_eq!(pass.reported, vec![Reported::Created(d.name())]);
    assert_eq!(*api.0.lock().unwrap(), vec![d.name()]);
    assert!(
        outbox.pending().is_err(),
        "nothing left in memory: the broken directory is the error again"
    );
    fs::remove_file(outbox.dir()).unwrap();
    fs::create_dir(outbox.dir()).unwrap();
    assert!(outbox.pending().unwrap().is_empty(), "gone once accepted");
}

/// An API where every detection joins an open incident of another name.
struct Appending;

impl Sink for Appending {
    fn report(
        &self,
        _wedge: &DetectedWedge,
    ) -> impl std::future::Future<Output = Result<Reported, ReportError>> + Send {
        std::future::ready(Ok(Reported::Appended("node-a-0000-03-00-0-1".into())))
    }
}

#[tokio::test]
async fn a_detection_added_to_an_open_incident_is_not_recorded_under_that_incident() {
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path()).unwrap();
    let later = on_device(2, "0000:03:00.0", 5);
    outbox.put(&later).unwrap();
    assert!(
        outbox.detected(&later.name(), "node-a", "0000:03:00.0", "boot-1"),
        "pending in the outbox counts as detected"
    );
    let pass = replay(&outbox, &Appending).await.unwrap();
    assert_eq!(pass.reported.len(), 1);
    assert!(
        outbox.detections().is_empty(),
        "the incident was not this detection's own"
    );
    assert!(!outbox.detected("node-a-0000-03-00-0-1", "node-a", "0000:03:00.0", "boot-1"));
}
