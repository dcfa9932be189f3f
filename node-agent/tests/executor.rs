//! Invariant 2: an approved attempt is executed at most once, across restarts — checked against
//! an independent journal of the writes that reached a fake sysfs, not against the agent's status.
//!
//! The fake sysfs's `unbind`, `bind` and `reset` files are FIFOs read by a test thread that
//! appends every write to its own journal and applies the kernel's effect (unbind removes the
//! driver link and the card; bind restores them with a new card index).

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
use unwedge_agent::executor::{Executor, ExecutorConfig, ExecutorStep, WedgeClock, WedgeStore};
use unwedge_agent::host::{HostActions, HostError, SysfsHost};
use unwedge_agent::metrics::Metrics;
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
        }),
        ..GpuWedgeStatus::default()
    });
    w
}

fn executor(
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
    assert_eq!(a.result, AttemptOutcome::Failed);
    assert!(
        a.message.starts_with("dry-run: would unbind"),
        "{}",
        a.message
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
    let cmd = format!("echo boot-2 > {}", boot.display());
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
