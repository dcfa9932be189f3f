//! The executor tests' stand-ins for the kernel and the API: a fake sysfs whose control files
//! are FIFOs (every write journaled by a reader thread that applies the kernel's effect), the
//! real `SysfsHost` made as synchronous as sysfs over it, an in-memory `WedgeStore`, and the
//! standard approved wedge and executor. Shared by two test binaries (`executor`, and
//! `attempt_span`, which needs a process of its own), so not every item is used by each.
#![allow(dead_code)]

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
use unwedge_agent::executor::{Executor, ExecutorConfig, WedgeClock, WedgeStore};
use unwedge_agent::host::{HostActions, HostError, SysfsHost};
use unwedge_agent::metrics::Metrics;
use unwedge_agent::outbox::Outbox;
use unwedge_crds::{Approval, AttemptResult, DeviceRef, GpuWedge, GpuWedgeSpec, GpuWedgeStatus};

/// The PCI address of the fake sysfs's one device.
pub const BDF: &str = "0000:03:00.0";

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
pub struct FakeSysfs {
    /// The sysfs root.
    pub root: tempfile::TempDir,
    journal: Arc<Mutex<Vec<String>>>,
    applied: Arc<(Mutex<usize>, Condvar)>,
    readers: Vec<(PathBuf, JoinHandle<()>)>,
}

impl FakeSysfs {
    /// One device, xe bound, card0, FIFOs for unbind, bind and reset.
    pub fn new() -> Self {
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

    /// Every write that reached a control file, in order (`unbind <bdf>`, ...).
    pub fn writes(&self) -> Vec<String> {
        self.journal.lock().unwrap().clone()
    }

    /// The real `SysfsHost` over this tree, rebooting with `reboot_command`.
    pub fn host(&self, reboot_command: &str) -> Synced {
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
pub struct Synced {
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
pub struct MemStore {
    /// The wedges by name.
    pub objects: Arc<Mutex<HashMap<String, GpuWedge>>>,
    /// Whether status writes are dropped.
    pub lose_patches: Arc<Mutex<bool>>,
}

/// What the API server answers for a wedge that is not there.
fn not_found(name: &str) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure(&format!("gpuwedges {name:?} not found"), "NotFound")
            .with_code(404)
            .boxed(),
    )
}

impl WedgeStore for MemStore {
    async fn get(&self, name: &str) -> Result<Option<GpuWedge>, kube::Error> {
        Ok(self.objects.lock().unwrap().get(name).cloned())
    }
    async fn patch_attempts(
        &self,
        name: &str,
        attempts: &[AttemptResult],
    ) -> Result<(), kube::Error> {
        if *self.lose_patches.lock().unwrap() {
            return Ok(());
        }
        let mut o = self.objects.lock().unwrap();
        let w = o.get_mut(name).ok_or_else(|| not_found(name))?;
        w.status.get_or_insert_with(Default::default).attempts = Some(attempts.to_vec());
        Ok(())
    }
    async fn patch_agent_message(&self, name: &str, message: &str) -> Result<(), kube::Error> {
        let mut o = self.objects.lock().unwrap();
        let w = o.get_mut(name).ok_or_else(|| not_found(name))?;
        w.status.get_or_insert_with(Default::default).agent_message = Some(message.to_string());
        Ok(())
    }
}

impl MemStore {
    /// A store holding `w`.
    pub fn with(w: &GpuWedge) -> Self {
        let s = Self::default();
        s.objects
            .lock()
            .unwrap()
            .insert(w.metadata.name.clone().unwrap(), w.clone());
        s
    }
    /// `status.attempts` of the wedge `name`.
    pub fn attempts(&self, name: &str) -> Vec<AttemptResult> {
        self.objects.lock().unwrap()[name]
            .status
            .clone()
            .unwrap()
            .attempts
            .unwrap_or_default()
    }
}

/// The standard wedge (node-a, the fake device, driver xe) with `method`#`attempt` approved.
pub fn approved(method: &str, attempt: u32) -> GpuWedge {
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
pub fn detected(state: &Path, w: &GpuWedge) {
    detected_with(state, w, "xe");
}

/// [`detected`] with `driver` bound at detection (empty: none).
pub fn detected_with(state: &Path, w: &GpuWedge, driver: &str) {
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
pub fn executor(
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
pub fn executor_of(
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
        restarts: None,
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
