//! Invariant 2: an approved attempt is executed at most once, across restarts — checked against
//! an independent journal of the writes that reached a fake sysfs, not against the agent's status.
//!
//! The fake sysfs's `unbind`, `bind` and `reset` files are FIFOs read by a test thread that
//! appends every write to its own journal and applies the kernel's effect (unbind removes the
//! driver link and the card; bind restores them with a new card index).
//!
//! Issue #22 (fail safe): approvals of wedges the agent did not detect, of devices that are not
//! DRM devices or have no driver are refused with nothing written, checked the same way.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use unwedge_agent::config::RebootMode;
use unwedge_agent::detections::DetectionRecord;
use unwedge_agent::executor::{Executor, ExecutorConfig, ExecutorStep, WedgeClock, WedgeStore};
use unwedge_agent::host::{HostActions, HostError, SysfsHost};
use unwedge_agent::metrics::Metrics;
use unwedge_agent::outbox::Outbox;
use unwedge_crds::{
    Approval, AttemptOutcome, AttemptResult, DeviceRef, GpuWedge, GpuWedgeSpec, GpuWedgeStatus,
};

const BDF: &str = "0000:03:00.0";

fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        p.display()
    );
}

/// A fake sysfs whose control files are FIFOs drained by one thread each.
struct FakeSysfs {
    root: tempfile::TempDir,
    journal: Arc<Mutex<Vec<String>>>,
    applied: Arc<(Mutex<usize>, Condvar)>,
    readers: Vec<(PathBuf, JoinHandle<()>)>,
}

impl FakeSysfs {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("bus/pci/devices").join(BDF);
        let drv = root.path().join("bus/pci/drivers/xe");
        fs::create_dir_all(dev.join("drm/card0")).unwrap();
        fs::create_dir_all(&drv).unwrap();
        fs::write(dev.join("reset_method"), "flr bus\n").unwrap();
        fs::write(dev.join("class"), "0x030000\n").unwrap();
        std::os::unix::fs::symlink("../../drivers/xe", dev.join("driver")).unwrap();
        fs::write(root.path().join("boot_id"), "boot-1\n").unwrap();
        let journal = Arc::new(Mutex::new(Vec::new()));
        let applied = Arc::new((Mutex::new(0usize), Condvar::new()));
        let mut readers = Vec::new();
        for (file, kind) in [
            (drv.join("unbind"), "unbind"),
            (drv.join("bind"), "bind"),
            (dev.join("reset"), "reset"),
        ] {
            mkfifo(&file);
            let (j, dev, f, applied) =
                (journal.clone(), dev.clone(), file.clone(), applied.clone());
            let h = std::thread::spawn(move || {
                let mut binds = 0;
                loop {
                    let mut s = String::new();
                    fs::File::open(&f).unwrap().read_to_string(&mut s).unwrap();
                    if s == "STOP" {
                        return;
                    }
                    j.lock().unwrap().push(format!("{kind} {s}"));
                    match kind {
                        "unbind" => {
                            let _ = fs::remove_file(dev.join("driver"));
                            let _ = fs::remove_dir_all(dev.join("drm"));
                        }
                        "bind" => {
                            binds += 1;
                            let _ =
                                std::os::unix::fs::symlink("../../drivers/xe", dev.join("driver"));
                            let _ = fs::create_dir_all(dev.join(format!("drm/card{binds}")));
                        }
                        _ => {}
                    }
                    *applied.0.lock().unwrap() += 1;
                    applied.1.notify_all();
                }
            });
            readers.push((file, h));
        }
        Self {
            root,
            journal,
            applied,
            readers,
        }
    }

    fn writes(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }

    fn host(&self, reboot_command: &str) -> Synced {
        Synced {
            inner: SysfsHost {
                sysfs_root: self.root.path().to_path_buf(),
                reboot_mode: RebootMode::Command,
                reboot_command: reboot_command.to_string(),
                boot_id_path: self.root.path().join("boot_id"),
            },
            applied: self.applied.clone(),
        }
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        for (f, h) in self.readers.drain(..) {
            // Non-blocking: a reader that died (a failed assertion in it) must not hang the test.
            if let Ok(mut w) = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&f)
            {
                let _ = std::io::Write::write_all(&mut w, b"STOP");
                drop(w);
                let _ = h.join();
            }
        }
    }
}

/// The real `SysfsHost`, made as synchronous as the kernel's sysfs: a write to `unbind` returns
/// only once the unbind happened. The FIFO reader applies the effect after the writer closed,
/// so each write waits here for the reader's acknowledgement.
struct Synced {
    inner: SysfsHost,
    applied: Arc<(Mutex<usize>, Condvar)>,
}

impl Synced {
    fn wait<T>(&self, f: impl FnOnce() -> Result<T, HostError>) -> Result<T, HostError> {
        let before = *self.applied.0.lock().unwrap();
        let r = f()?;
        let guard = self.applied.0.lock().unwrap();
        let (_g, timeout) = self
            .applied
            .1
            .wait_timeout_while(guard, Duration::from_secs(5), |n| *n == before)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "the fake sysfs never applied the write"
        );
        Ok(r)
    }
}

impl HostActions for Synced {
    fn unbind(&self, bdf: &str, driver: &str) -> Result<(), HostError> {
        self.wait(|| self.inner.unbind(bdf, driver))
    }
    fn bind(&self, bdf: &str, driver: &str) -> Result<(), HostError> {
        self.wait(|| self.inner.bind(bdf, driver))
    }
    fn pci_reset(&self, bdf: &str) -> Result<String, HostError> {
        self.wait(|| self.inner.pci_reset(bdf))
    }
    fn remove(&self, bdf: &str) -> Result<(), HostError> {
        self.inner.remove(bdf)
    }
    fn rescan(&self) -> Result<(), HostError> {
        self.inner.rescan()
    }
    fn reboot(&self) -> Result<(), HostError> {
        self.inner.reboot()
    }
    fn boot_id(&self) -> Result<String, HostError> {
        self.inner.boot_id()
    }
    fn driver_of(&self, bdf: &str) -> Option<String> {
        self.inner.driver_of(bdf)
    }
    fn card_of(&self, bdf: &str) -> Option<String> {
        self.inner.card_of(bdf)
    }
    fn is_drm_device(&self, bdf: &str) -> bool {
        self.inner.is_drm_device(bdf)
    }
    fn pci_class(&self, bdf: &str) -> Option<u32> {
        self.inner.pci_class(bdf)
    }
}

/// An in-memory store standing in for the API; `lose_patches` drops status writes (a patch
/// lost when the agent died right after acting).
#[derive(Default, Clone)]
struct MemStore {
    objects: Arc<Mutex<HashMap<String, GpuWedge>>>,
    lose_patches: Arc<Mutex<bool>>,
}

impl WedgeStore for MemStore {
    async fn get(&self, name: &str) -> Result<Option<GpuWedge>, String> {
        Ok(self.objects.lock().unwrap().get(name).cloned())
    }
    async fn patch_attempts(&self, name: &str, attempts: &[AttemptResult]) -> Result<(), String> {
        if *self.lose_patches.lock().unwrap() {
            return Ok(());
        }
        let mut o = self.objects.lock().unwrap();
        let w = o.get_mut(name).ok_or("gone")?;
        w.status.get_or_insert_with(Default::default).attempts = Some(attempts.to_vec());
        Ok(())
    }
    async fn patch_agent_message(&self, name: &str, message: &str) -> Result<(), String> {
        let mut o = self.objects.lock().unwrap();
        let w = o.get_mut(name).ok_or("gone")?;
        w.status.get_or_insert_with(Default::default).agent_message = Some(message.to_string());
        Ok(())
    }
}

impl MemStore {
    fn with(w: &GpuWedge) -> Self {
        let s = Self::default();
        s.objects
            .lock()
            .unwrap()
            .insert(w.metadata.name.clone().unwrap(), w.clone());
        s
    }
    fn attempts(&self, name: &str) -> Vec<AttemptResult> {
        self.objects.lock().unwrap()[name]
            .status
            .clone()
            .unwrap()
            .attempts
            .unwrap_or_default()
    }
}

fn approved(method: &str, attempt: u32) -> GpuWedge {
    let mut w = GpuWedge::new(
        "node-a-0000-03-00-0-7",
        GpuWedgeSpec {
            node_name: "node-a".into(),
            device: DeviceRef {
                pci_address: BDF.into(),
                card: Some("card0".into()),
                render_node: Some("renderD128".into()),
                driver: "xe".into(),
                ..DeviceRef::default()
            },
            methods: vec!["rebind".into(), "bus-reset".into()],
            detected_at: Time(Timestamp::now()),
            boot_id: "boot-1".into(),
            uevent: Default::default(),
            blamed: None,
        },
    );
    w.metadata.uid = Some("uid-7".into());
    w.status = Some(GpuWedgeStatus {
        approval: Some(Approval {
            method: method.into(),
            attempt,
            at: Time(Timestamp::now()),
            by: "system:serviceaccount:unwedge-system:operator".into(),
            containers: None,
        }),
        ..GpuWedgeStatus::default()
    });
    w
}

/// The agent's record that it detected and reported `w` with `xe` bound (what the outbox
/// replayer writes when the API accepts a detection).
fn detected(state: &Path, w: &GpuWedge) {
    detected_with(state, w, "xe");
}

/// [`detected`] with `driver` bound at detection (empty: none).
fn detected_with(state: &Path, w: &GpuWedge, driver: &str) {
    let outbox = Outbox::open(state).unwrap();
    outbox
        .detections()
        .record(DetectionRecord {
            wedge: w.metadata.name.clone().unwrap(),
            node: w.spec.node_name.clone(),
            pci_address: w.spec.device.pci_address.clone(),
            boot_id: w.spec.boot_id.clone(),
            driver: driver.into(),
            at: Timestamp::now(),
        })
        .unwrap();
}

/// An executor over `state` whose agent detected the standard wedge ([`approved`]).
fn executor(
    fake: &FakeSysfs,
    store: MemStore,
    state: &Path,
    reboot_command: &str,
    dry_run: bool,
) -> Executor<Synced, MemStore> {
    detected(state, &approved("rebind", 1));
    executor_of(fake, store, state, reboot_command, dry_run)
}

/// An executor over `state` with only the detections already recorded there.
fn executor_of(
    fake: &FakeSysfs,
    store: MemStore,
    state: &Path,
    reboot_command: &str,
    dry_run: bool,
) -> Executor<Synced, MemStore> {
    let empty_proc = fake.root.path().join("proc");
    fs::create_dir_all(&empty_proc).unwrap();
    let cfg = ExecutorConfig {
        proc_root: empty_proc,
        dev_root: fake.root.path().join("dev"),
        dry_run,
        settle: Duration::from_millis(100),
        verify_command: None,
        gate_interval: Duration::from_millis(100),
        reappear_timeout: Duration::from_secs(5),
        advertised: None,
    };
    Executor::new(
        cfg,
        Arc::new(fake.host(reboot_command)),
        store,
        state,
        Outbox::open(state).unwrap(),
        WedgeClock::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

#[tokio::test]
async fn rebind_runs_once_across_a_restart_even_when_the_status_was_lost() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("rebind", 1);
    let store = MemStore::with(&w);
    *store.lose_patches.lock().unwrap() = true;

    let first = executor(&fake, store.clone(), state.path(), "false", false);
    assert_eq!(
        first.process(&w).await,
        ExecutorStep::Start {
            attempt: 1,
            method: "rebind".into()
        }
    );
    drop(first);
    assert_eq!(
        fake.writes(),
        vec![format!("unbind {BDF}"), format!("bind {BDF}")]
    );
    assert!(
        store.attempts(&w.metadata.name.clone().unwrap()).is_empty(),
        "the patches were lost"
    );

    // Restart: same state dir, same approval, the status still knows nothing.
    *store.lose_patches.lock().unwrap() = false;
    let second = executor(&fake, store.clone(), state.path(), "false", false);
    assert!(matches!(
        second.process(&w).await,
        ExecutorStep::ReportFinished { .. }
    ));
    assert_eq!(
        fake.writes().len(),
        2,
        "no second unbind/bind: {:?}",
        fake.writes()
    );
    let attempts = store.attempts("node-a-0000-03-00-0-7");
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].result,
        AttemptOutcome::Succeeded,
        "{:?}",
        attempts[0]
    );
    assert!(
        attempts[0].message.contains("card1"),
        "the card index changed after the rebind: {}",
        attempts[0].message
    );

    // A third evaluation of the finished attempt does nothing.
    let current = store.get("node-a-0000-03-00-0-7").await.unwrap().unwrap();
    assert_eq!(second.process(&current).await, ExecutorStep::Idle);
    assert_eq!(fake.writes().len(), 2);
}

#[tokio::test]
async fn bus_reset_reports_the_reset_method_and_unknown_methods_fail() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("bus-reset", 1);
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    assert_eq!(
        fake.writes(),
        vec![
            format!("unbind {BDF}"),
            "reset 1".to_string(),
            format!("bind {BDF}")
        ]
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Succeeded);
    assert!(a.message.contains("flr"), "{}", a.message);

    let w2 = approved("cold-reset", 2);
    let store2 = MemStore::with(&w2);
    executor(&fake, store2.clone(), state.path(), "false", false)
        .process(&w2)
        .await;
    let a = &store2.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Failed);
    assert_eq!(a.message, "agent does not know how to carry out cold-reset");
    assert_eq!(fake.writes().len(), 3, "nothing written for cold-reset");
}

#[tokio::test]
async fn dry_run_touches_nothing_and_says_so() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("rebind", 1);
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", true)
        .process(&w)
        .await;
    assert!(fake.writes().is_empty());
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(
        a.result,
        AttemptOutcome::DryRun,
        "a dry run is never Failed (the operator would escalate): {a:?}"
    );
    assert!(
        a.message
            .starts_with("dry-run: would unbind 0000:03:00.0 from xe"),
        "{}",
        a.message
    );
}

/// The attempt `attempt` as the store holds it.
fn attempt_of(store: &MemStore, name: &str, attempt: u32) -> AttemptResult {
    store
        .attempts(name)
        .into_iter()
        .find(|a| a.attempt == attempt)
        .unwrap_or_else(|| panic!("no attempt {attempt} reported on {name}"))
}

fn agent_message(store: &MemStore, name: &str) -> String {
    store.objects.lock().unwrap()[name]
        .status
        .clone()
        .unwrap()
        .agent_message
        .unwrap_or_default()
}

/// A reboot command (run as argv, no shell) that only writes `boot-2` into the boot id file.
fn new_boot_id_command(fake: &FakeSysfs, boot: &Path) -> String {
    let next = fake.root.path().join("next-boot-id");
    fs::write(&next, "boot-2\n").unwrap();
    format!("cp {} {}", next.display(), boot.display())
}

#[tokio::test]
async fn a_hand_made_wedge_is_refused_and_nothing_is_written() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let marker = fake.root.path().join("rebooted");
    let reboot = format!("touch {}", marker.display());
    // A real detection of the same device exists: the hand-made wedge differs only in name.
    let mut forged = approved("rebind", 1);
    forged.metadata.name = Some("handmade".into());
    let store = MemStore::with(&forged);
    let ex = executor(&fake, store.clone(), state.path(), &reboot, false);
    ex.process(&forged).await;
    let a = attempt_of(&store, "handmade", 1);
    assert_eq!(a.result, AttemptOutcome::Refused, "{a:?}");
    assert!(a.message.contains("did not detect"), "{}", a.message);
    assert!(a.finished_at.is_some(), "a refusal is final");
    assert!(
        agent_message(&store, "handmade").contains("refused rebind (attempt 1)"),
        "{}",
        agent_message(&store, "handmade")
    );
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );

    // Never retried: the next evaluation of the same approval does nothing.
    let current = store.get("handmade").await.unwrap().unwrap();
    assert_eq!(ex.process(&current).await, ExecutorStep::Idle);

    // Nor does a reboot approval of it reboot, nor one for another boot id.
    let mut reboot_it = approved("reboot", 2);
    reboot_it.metadata.name = Some("handmade".into());
    ex.process(&reboot_it).await;
    assert_eq!(
        attempt_of(&store, "handmade", 2).result,
        AttemptOutcome::Refused
    );
    let mut other_boot = approved("reboot", 3);
    other_boot.spec.boot_id = "boot-0".into();
    let store2 = MemStore::with(&other_boot);
    executor(&fake, store2.clone(), state.path(), &reboot, false)
        .process(&other_boot)
        .await;
    assert_eq!(
        attempt_of(&store2, "node-a-0000-03-00-0-7", 3).result,
        AttemptOutcome::Refused
    );
    assert!(!marker.exists(), "the host was rebooted for a forged wedge");
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );
}

#[tokio::test]
async fn a_wedge_naming_a_non_drm_device_is_refused() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    // A NIC: a PCI function bound to e1000e, without a drm directory.
    let nic = "0000:00:19.0";
    let dev = fake.root.path().join("bus/pci/devices").join(nic);
    let drv = fake.root.path().join("bus/pci/drivers/e1000e");
    fs::create_dir_all(&dev).unwrap();
    fs::create_dir_all(&drv).unwrap();
    fs::write(drv.join("unbind"), "").unwrap();
    fs::write(drv.join("bind"), "").unwrap();
    std::os::unix::fs::symlink("../../drivers/e1000e", dev.join("driver")).unwrap();
    let mut w = approved("rebind", 1);
    w.spec.device.pci_address = nic.into();
    w.spec.device.driver = "e1000e".into();
    // Even a detection of that address (the record is the agent's) does not make it a GPU.
    detected(state.path(), &w);
    let store = MemStore::with(&w);
    executor_of(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 1);
    assert_eq!(a.result, AttemptOutcome::Refused, "{a:?}");
    assert!(a.message.contains("not a DRM device"), "{}", a.message);
    assert_eq!(fs::read_to_string(drv.join("unbind")).unwrap(), "");
    assert_eq!(fs::read_to_string(drv.join("bind")).unwrap(), "");
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );
}

#[tokio::test]
async fn the_crs_driver_is_never_used_the_sysfs_one_is() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    // `../../../escape` from bus/pci/drivers/ is <root>/escape: a file outside the drivers.
    let escape = fake.root.path().join("escape");
    fs::create_dir_all(&escape).unwrap();
    fs::write(escape.join("unbind"), "").unwrap();
    fs::write(escape.join("bind"), "").unwrap();
    let mut w = approved("rebind", 1);
    w.spec.device.driver = "../../../escape".into();
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    assert_eq!(
        fake.writes(),
        vec![format!("unbind {BDF}"), format!("bind {BDF}")],
        "xe's files (from sysfs) were written"
    );
    assert_eq!(fs::read_to_string(escape.join("unbind")).unwrap(), "");
    assert_eq!(fs::read_to_string(escape.join("bind")).unwrap(), "");
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 1);
    assert_eq!(a.result, AttemptOutcome::Succeeded, "{}", a.message);
    assert!(a.message.contains("xe bound"), "{}", a.message);
}

#[tokio::test]
async fn without_a_driver_reboot_runs_and_rebind_is_refused() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let dev = fake.root.path().join("bus/pci/devices").join(BDF);
    fs::remove_file(dev.join("driver")).unwrap();
    fs::remove_dir_all(dev.join("drm")).unwrap();

    // Detected while no driver was bound: the agent has no driver it read itself.
    let w = approved("rebind", 1);
    detected_with(state.path(), &w, "");
    let store = MemStore::with(&w);
    executor_of(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 1);
    assert_eq!(a.result, AttemptOutcome::Refused, "{a:?}");
    assert!(a.message.contains("no driver bound to"), "{}", a.message);

    let boot = fake.root.path().join("boot_id");
    let reboot = new_boot_id_command(&fake, &boot);
    let w = approved("reboot", 2);
    let store = MemStore::with(&w);
    let step = executor_of(&fake, store.clone(), state.path(), &reboot, false)
        .process(&w)
        .await;
    assert_eq!(
        step,
        ExecutorStep::Start {
            attempt: 2,
            method: "reboot".into()
        }
    );
    assert_eq!(
        fs::read_to_string(&boot).unwrap().trim(),
        "boot-2",
        "the reboot ran without a driver"
    );
    assert_eq!(
        attempt_of(&store, "node-a-0000-03-00-0-7", 2).result,
        AttemptOutcome::Started
    );
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );
}

#[tokio::test]
async fn reboot_is_verified_by_the_new_boot_id_after_restart() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("reboot", 3);
    let store = MemStore::with(&w);
    // The "reboot" only changes the boot id file: harmless, never a real reboot.
    let boot = fake.root.path().join("boot_id");
    let cmd = new_boot_id_command(&fake, &boot);
    let first = executor(&fake, store.clone(), state.path(), &cmd, false);
    assert_eq!(
        first.process(&w).await,
        ExecutorStep::Start {
            attempt: 3,
            method: "reboot".into()
        }
    );
    assert_eq!(fs::read_to_string(&boot).unwrap().trim(), "boot-2");
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(
        a.result,
        AttemptOutcome::Started,
        "nothing final before the host comes back"
    );
    drop(first);

    let current = store.get("node-a-0000-03-00-0-7").await.unwrap().unwrap();
    let second = executor(&fake, store.clone(), state.path(), "false", false);
    assert_eq!(
        second.process(&current).await,
        ExecutorStep::VerifyAfterReboot {
            attempt: 3,
            started_boot_id: "boot-1".into()
        }
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Succeeded, "{}", a.message);
    assert!(a.message.contains("boot-1 -> boot-2"), "{}", a.message);
    assert!(fake.writes().is_empty(), "a reboot writes no sysfs files");
}

#[tokio::test]
async fn the_agent_that_asked_for_a_reboot_waits_for_it_instead_of_failing_the_attempt() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("reboot", 3);
    let store = MemStore::with(&w);
    // The reboot command returns at once and the host has not gone down yet (boot id unchanged),
    // as `systemctl reboot` does; the wedge is then reconciled again (a status update).
    let first = executor(&fake, store.clone(), state.path(), "true", false);
    assert_eq!(
        first.process(&w).await,
        ExecutorStep::Start {
            attempt: 3,
            method: "reboot".into()
        }
    );
    let current = store.get("node-a-0000-03-00-0-7").await.unwrap().unwrap();
    assert_eq!(
        first.process(&current).await,
        ExecutorStep::AwaitingReboot { attempt: 3 }
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Started, "{}", a.message);
    drop(first);

    // A new process with the same boot id: the host never rebooted, so the attempt failed.
    let second = executor(&fake, store.clone(), state.path(), "true", false);
    assert_eq!(
        second.process(&current).await,
        ExecutorStep::ReportInterrupted {
            attempt: 3,
            method: "reboot".into()
        }
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Failed, "{}", a.message);
}

#[tokio::test]
async fn a_gpu_left_unbound_by_a_failed_rebind_can_still_be_bus_reset() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    // The rebind rung's bind failed: the device is unbound, its drm directory gone.
    let dev = fake.root.path().join("bus/pci/devices").join(BDF);
    fs::remove_file(dev.join("driver")).unwrap();
    fs::remove_dir_all(dev.join("drm")).unwrap();
    let mut w = approved("bus-reset", 2);
    w.spec.device.driver = "../../../escape".into();
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    assert_eq!(
        fake.writes(),
        vec!["reset 1".to_string(), format!("bind {BDF}")],
        "no unbind of an unbound device; bound to xe, the driver the agent detected"
    );
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 2);
    assert_eq!(a.result, AttemptOutcome::Succeeded, "{}", a.message);
}
