//! A simulated node's sysfs and /dev, laid out as the kernel lays them, whose action files are
//! FIFOs: every write the agent makes reaches a harness thread that appends it to an
//! independent journal (memory and a file) and applies the kernel's effect (unbind removes the
//! `driver` link and the DRM nodes, bind restores them, `remove` + `rescan` re-enumerate).
//!
//! The journal is the ground truth for invariant 2 (an approved attempt reaches the device at
//! most once): it is written by this module, never by the agent.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// One GPU (a PCI function with a DRM card and render node).
#[derive(Clone, Debug)]
pub struct Gpu {
    /// PCI address, e.g. `0000:03:00.0`.
    pub bdf: String,
    /// Kernel driver, e.g. `xe` or `amdgpu`.
    pub driver: String,
    /// PCI vendor id, e.g. `0x8086`.
    pub vendor: String,
    /// PCI device id, e.g. `0xe20b`.
    pub device: String,
    /// DRM minor of the primary node (`cardN`).
    pub card: u32,
    /// XGMI hive id, for amdgpu GPUs that share a reset domain.
    pub hive: Option<u64>,
}

impl Gpu {
    /// The `i`-th GPU of a simple node: one GPU per root port, bus `3 + i`.
    pub fn nth(i: u32, driver: &str) -> Gpu {
        let (vendor, device) = match driver {
            "amdgpu" => ("0x1002", "0x74a1"),
            "i915" => ("0x8086", "0x56a0"),
            _ => ("0x8086", "0xe20b"),
        };
        Gpu {
            bdf: format!("0000:{:02x}:00.0", 3 + i),
            driver: driver.to_string(),
            vendor: vendor.to_string(),
            device: device.to_string(),
            card: i,
            hive: None,
        }
    }

    /// `cardN`.
    pub fn card_name(&self) -> String {
        format!("card{}", self.card)
    }

    /// `renderD(128+N)`.
    pub fn render_name(&self) -> String {
        format!("renderD{}", 128 + self.card)
    }

    /// The root port the GPU sits behind (one per GPU, so no two GPUs share a secondary bus).
    fn port(&self) -> String {
        let bus = u32::from_str_radix(&self.bdf[5..7], 16).unwrap_or(3);
        format!("0000:00:{:02x}.0", bus.saturating_sub(2))
    }

    /// The kernel's DEVPATH of the device, e.g. `/devices/pci0000:00/0000:00:01.0/0000:03:00.0`.
    pub fn devpath(&self) -> String {
        format!("/devices/pci0000:00/{}/{}", self.port(), self.bdf)
    }

    /// The DEVPATH of the primary DRM node (what a `WEDGED=` uevent names).
    pub fn card_devpath(&self) -> String {
        format!("{}/drm/{}", self.devpath(), self.card_name())
    }
}

/// One write that reached an action file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// When the harness read it.
    pub at: SystemTime,
    /// What was written to: `unbind`, `bind`, `reset`, `remove`, `rescan`.
    pub op: String,
    /// The device it concerns (the written BDF for bind/unbind, the directory's for
    /// reset/remove, empty for rescan).
    pub bdf: String,
    /// The driver directory, for bind/unbind.
    pub driver: String,
    /// The bytes written, trimmed.
    pub value: String,
}

/// What the fake kernel does wrong, on purpose.
#[derive(Default, Debug)]
pub struct Faults {
    /// The next this many `bind` writes are journaled but leave the device unbound.
    pub failing_binds: AtomicU32,
}

struct Shared {
    journal: Mutex<Vec<Write>>,
    journal_file: Mutex<File>,
    faults: Faults,
    stop: AtomicBool,
    /// Set when the tree's FIFOs changed outside the harness thread.
    reopen: AtomicBool,
}

/// A fake sysfs tree and /dev for one simulated node, with its harness thread.
pub struct FakeSysfs {
    dir: PathBuf,
    gpus: Vec<Gpu>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Errors building the tree.
#[derive(Debug, thiserror::Error)]
pub enum FakeSysfsError {
    /// A file operation failed.
    #[error("fake sysfs: {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn io<T>(what: &'static str, path: &Path, r: std::io::Result<T>) -> Result<T, FakeSysfsError> {
    r.map_err(|source| FakeSysfsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn mkfifo(path: &Path) -> Result<(), FakeSysfsError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if rc != 0 {
        return io("mkfifo", path, Err(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn write_file(path: &Path, content: &str) -> Result<(), FakeSysfsError> {
    if let Some(p) = path.parent() {
        io("mkdir", p, fs::create_dir_all(p))?;
    }
    io("write", path, fs::write(path, content))
}

fn link(target: &str, at: &Path) -> Result<(), FakeSysfsError> {
    if let Some(p) = at.parent() {
        io("mkdir", p, fs::create_dir_all(p))?;
    }
    let _ = fs::remove_file(at);
    io("symlink", at, symlink(target, at))
}

/// The FIFOs of the tree, with what a write to each means.
#[derive(Clone, Debug)]
enum Fifo {
    Unbind(String),
    Bind(String),
    Reset(String),
    Remove(String),
    Rescan,
}

impl Fifo {
    /// Order in which writes that arrive together are applied: one attempt writes in this order.
    fn rank(&self) -> u8 {
        match self {
            Fifo::Unbind(_) => 0,
            Fifo::Remove(_) => 1,
            Fifo::Reset(_) => 2,
            Fifo::Rescan => 3,
            Fifo::Bind(_) => 4,
        }
    }
}

impl FakeSysfs {
    /// Builds the tree for `gpus` under `dir` (which must exist) and starts the harness thread.
    pub fn new(dir: &Path, gpus: Vec<Gpu>) -> Result<FakeSysfs, FakeSysfsError> {
        let sys = dir.join("sys");
        let dev = dir.join("dev");
        io(
            "mkdir",
            &sys,
            fs::create_dir_all(sys.join("bus/pci/devices")),
        )?;
        io("mkdir", &dev, fs::create_dir_all(dev.join("dri")))?;
        io("mkdir", &sys, fs::create_dir_all(sys.join("class/drm")))?;
        let mut drivers: Vec<&str> = gpus.iter().map(|g| g.driver.as_str()).collect();
        drivers.sort();
        drivers.dedup();
        for d in &drivers {
            let ddir = sys.join("bus/pci/drivers").join(d);
            io("mkdir", &ddir, fs::create_dir_all(&ddir))?;
            write_file(&ddir.join("module_name"), &format!("{d}\n"))?;
            mkfifo(&ddir.join("bind"))?;
            mkfifo(&ddir.join("unbind"))?;
        }
        mkfifo(&sys.join("bus/pci/rescan"))?;
        let journal_path = dir.join("sysfs-journal.log");
        let journal_file = io(
            "create",
            &journal_path,
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&journal_path),
        )?;
        let me = FakeSysfs {
            dir: dir.to_path_buf(),
            gpus: gpus.clone(),
            shared: Arc::new(Shared {
                journal: Mutex::new(Vec::new()),
                journal_file: Mutex::new(journal_file),
                faults: Faults::default(),
                stop: AtomicBool::new(false),
                reopen: AtomicBool::new(false),
            }),
            thread: None,
        };
        for g in &gpus {
            me.create_device(g)?;
            me.bind(g)?;
        }
        me.create_hives()?;
        let mut me = me;
        let tree = Tree {
            sys: sys.clone(),
            dev: dev.clone(),
            gpus: gpus.clone(),
            shared: me.shared.clone(),
        };
        me.thread = Some(
            std::thread::Builder::new()
                .name("fake-sysfs".into())
                .spawn(move || tree.serve())
                .map_err(|source| FakeSysfsError::Io {
                    what: "spawn thread for",
                    path: sys,
                    source,
                })?,
        );
        Ok(me)
    }

    fn tree(&self) -> Tree {
        Tree {
            sys: self.sys_root(),
            dev: self.dev_root(),
            gpus: self.gpus.clone(),
            shared: self.shared.clone(),
        }
    }

    fn create_device(&self, g: &Gpu) -> Result<(), FakeSysfsError> {
        self.tree().create_device(g)
    }

    fn bind(&self, g: &Gpu) -> Result<(), FakeSysfsError> {
        self.tree().bind(g)
    }

    fn create_hives(&self) -> Result<(), FakeSysfsError> {
        // amdgpu: the first GPU of a hive owns the `xgmi_hive_info` kobject; the others link
        // to it; every member has `xgmi_device_id`; the hive lists its members as `nodeN`.
        let mut hives: BTreeMap<u64, Vec<&Gpu>> = BTreeMap::new();
        for g in &self.gpus {
            if let Some(h) = g.hive {
                hives.entry(h).or_default().push(g);
            }
        }
        let sys = self.sys_root();
        for (id, members) in hives {
            let owner = sys.join(&members[0].devpath()[1..]);
            let hive_dir = owner.join("xgmi_hive_info");
            write_file(&hive_dir.join("xgmi_hive_id"), &format!("{id}\n"))?;
            for (i, m) in members.iter().enumerate() {
                let mdir = sys.join(&m.devpath()[1..]);
                write_file(
                    &mdir.join("xgmi_device_id"),
                    &format!("{}\n", 0x1000 + i as u64),
                )?;
                if i > 0 {
                    link(
                        &format!(
                            "../../{}/{}/xgmi_hive_info",
                            members[0].port(),
                            members[0].bdf
                        ),
                        &mdir.join("xgmi_hive_info"),
                    )?;
                }
                link(
                    &format!("../../../{}/{}", m.port(), m.bdf),
                    &hive_dir.join(format!("node{}", i + 1)),
                )?;
            }
        }
        Ok(())
    }

    /// The directory holding `sys/`, `dev/` and the journal file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's `--sysfs-root`.
    pub fn sys_root(&self) -> PathBuf {
        self.dir.join("sys")
    }

    /// The agent's `--dev-root`.
    pub fn dev_root(&self) -> PathBuf {
        self.dir.join("dev")
    }

    /// The GPUs of this node.
    pub fn gpus(&self) -> &[Gpu] {
        &self.gpus
    }

    /// The GPU with this PCI address.
    pub fn gpu(&self, bdf: &str) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.bdf == bdf)
    }

    /// The `/dev` path of a GPU's card node in the fake dev root.
    pub fn card_path(&self, bdf: &str) -> Option<PathBuf> {
        self.gpu(bdf)
            .map(|g| self.dev_root().join("dri").join(g.card_name()))
    }

    /// Every write so far, in the order the harness read them.
    pub fn journal(&self) -> Vec<Write> {
        self.shared
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The writes of one operation (`unbind`, `bind`, `reset`, ...) for one device.
    pub fn count(&self, op: &str, bdf: &str) -> usize {
        self.journal()
            .iter()
            .filter(|w| w.op == op && w.bdf == bdf)
            .count()
    }

    /// Whether the device is bound to its driver right now.
    pub fn is_bound(&self, bdf: &str) -> bool {
        self.gpu(bdf)
            .map(|g| {
                self.sys_root()
                    .join(&g.devpath()[1..])
                    .join("driver")
                    .exists()
            })
            .unwrap_or(false)
    }

    /// The device's `driver` link goes while its DRM nodes are still there: what the agent
    /// reads when the driver is being unbound between the uevent and the agent's look (a driver
    /// remove under way, an admin's unbind). Not an agent write, so nothing is journaled;
    /// [`FakeSysfs::power_cycle`] binds it again.
    pub fn drop_driver_link(&self, bdf: &str) {
        if let Some(g) = self.gpu(bdf) {
            let t = self.tree();
            let _ = fs::remove_file(t.devdir(g).join("driver"));
            let _ = fs::remove_file(
                self.sys_root()
                    .join("bus/pci/drivers")
                    .join(&g.driver)
                    .join(&g.bdf),
            );
        }
    }

    /// Makes the next `n` bind writes leave the device unbound (a failed rebind).
    pub fn fail_next_binds(&self, n: u32) {
        self.shared.faults.failing_binds.store(n, Ordering::SeqCst);
    }

    /// A host reboot as the devices see it: faults cleared, every device enumerated and bound
    /// again. Not an agent write, so nothing is journaled.
    pub fn power_cycle(&self) -> Result<(), FakeSysfsError> {
        self.shared.faults.failing_binds.store(0, Ordering::SeqCst);
        let t = self.tree();
        for g in &self.gpus {
            if !t.devdir(g).exists() {
                t.create_device(g)?;
            }
            t.bind(g)?;
        }
        self.shared.reopen.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Waits until the harness has journaled at least `n` writes, or `timeout`.
    pub fn wait_writes(&self, n: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.journal().len() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the harness thread needs to apply effects.
struct Tree {
    sys: PathBuf,
    dev: PathBuf,
    gpus: Vec<Gpu>,
    shared: Arc<Shared>,
}

impl Tree {
    fn devdir(&self, g: &Gpu) -> PathBuf {
        self.sys.join(&g.devpath()[1..])
    }

    fn create_device(&self, g: &Gpu) -> Result<(), FakeSysfsError> {
        let d = self.devdir(g);
        io("mkdir", &d, fs::create_dir_all(&d))?;
        let port = d.parent().expect("device has a port");
        write_file(&port.join("vendor"), "0x8086\n")?;
        write_file(&port.join("device"), "0x7ab8\n")?;
        write_file(&port.join("class"), "0x060400\n")?;
        write_file(&d.join("vendor"), &format!("{}\n", g.vendor))?;
        write_file(&d.join("device"), &format!("{}\n", g.device))?;
        write_file(&d.join("class"), "0x030000\n")?;
        write_file(&d.join("numa_node"), "-1\n")?;
        write_file(&d.join("reset_method"), "flr bus\n")?;
        write_file(
            &d.join("uevent"),
            &format!(
                "PCI_CLASS=30000\nPCI_ID={}:{}\nPCI_SLOT_NAME={}\n",
                g.vendor[2..].to_uppercase(),
                g.device[2..].to_uppercase(),
                g.bdf
            ),
        )?;
        link("../../../../bus/pci", &d.join("subsystem"))?;
        mkfifo(&d.join("reset"))?;
        mkfifo(&d.join("remove"))?;
        link(
            &format!("../../../devices/pci0000:00/{}/{}", g.port(), g.bdf),
            &self.sys.join("bus/pci/devices").join(&g.bdf),
        )?;
        Ok(())
    }

    /// Restores the DRM nodes, then the `driver` link: a bound device is a complete device.
    fn bind(&self, g: &Gpu) -> Result<(), FakeSysfsError> {
        let d = self.devdir(g);
        link(
            &format!("../../../../devices/pci0000:00/{}/{}", g.port(), g.bdf),
            &self
                .sys
                .join("bus/pci/drivers")
                .join(&g.driver)
                .join(&g.bdf),
        )?;
        for (name, minor) in [(g.card_name(), g.card), (g.render_name(), 128 + g.card)] {
            let nd = d.join("drm").join(&name);
            write_file(&nd.join("dev"), &format!("226:{minor}\n"))?;
            write_file(
                &nd.join("uevent"),
                &format!("MAJOR=226\nMINOR={minor}\nDEVNAME=dri/{name}\nDEVTYPE=drm_minor\n"),
            )?;
            link(&format!("../../../{}", g.bdf), &nd.join("device"))?;
            link("../../../../../../class/drm", &nd.join("subsystem"))?;
            link(
                &format!("../../devices/pci0000:00/{}/{}/drm/{name}", g.port(), g.bdf),
                &self.sys.join("class/drm").join(&name),
            )?;
            write_file(&self.dev.join("dri").join(&name), "")?;
        }
        link(
            &format!("../../../../bus/pci/drivers/{}", g.driver),
            &d.join("driver"),
        )
    }

    /// Removes the DRM nodes, then the `driver` link (the reverse of [`Tree::bind`]).
    fn unbind(&self, g: &Gpu) {
        let d = self.devdir(g);
        for name in [g.card_name(), g.render_name()] {
            let _ = fs::remove_file(self.sys.join("class/drm").join(&name));
            let _ = fs::remove_file(self.dev.join("dri").join(&name));
        }
        let _ = fs::remove_dir_all(d.join("drm"));
        let _ = fs::remove_file(
            self.sys
                .join("bus/pci/drivers")
                .join(&g.driver)
                .join(&g.bdf),
        );
        let _ = fs::remove_file(d.join("driver"));
    }

    fn fifos(&self) -> Vec<(PathBuf, Fifo)> {
        let mut v = vec![(self.sys.join("bus/pci/rescan"), Fifo::Rescan)];
        let mut drivers: Vec<&str> = self.gpus.iter().map(|g| g.driver.as_str()).collect();
        drivers.sort();
        drivers.dedup();
        for d in drivers {
            let dd = self.sys.join("bus/pci/drivers").join(d);
            v.push((dd.join("bind"), Fifo::Bind(d.to_string())));
            v.push((dd.join("unbind"), Fifo::Unbind(d.to_string())));
        }
        for g in &self.gpus {
            let d = self.devdir(g);
            if d.join("reset").exists() {
                v.push((d.join("reset"), Fifo::Reset(g.bdf.clone())));
                v.push((d.join("remove"), Fifo::Remove(g.bdf.clone())));
            }
        }
        v
    }

    fn serve(self) {
        let mut open: Vec<(Fifo, File)> = Vec::new();
        let mut reopen = true;
        while !self.shared.stop.load(Ordering::SeqCst) {
            if reopen || self.shared.reopen.swap(false, Ordering::SeqCst) {
                open.clear();
                for (path, kind) in self.fifos() {
                    // O_RDWR keeps the FIFO open for writers without ever reading EOF.
                    if let Ok(f) = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&path)
                    {
                        open.push((kind, f));
                    }
                }
                reopen = false;
            }
            let mut pfds: Vec<libc::pollfd> = open
                .iter()
                .map(|(_, f)| libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: pfds is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
            if n <= 0 {
                continue;
            }
            let mut batch: Vec<(Fifo, String)> = Vec::new();
            for (i, p) in pfds.iter().enumerate() {
                if p.revents & libc::POLLIN != 0 {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match (&open[i].1).read(&mut chunk) {
                            Ok(0) => break,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            Err(_) => break,
                        }
                    }
                    batch.push((
                        open[i].0.clone(),
                        String::from_utf8_lossy(&buf).into_owned(),
                    ));
                }
            }
            batch.sort_by_key(|(k, _)| k.rank());
            for (kind, text) in batch {
                for value in split_writes(&kind, &text) {
                    reopen |= self.apply(&kind, &value);
                }
            }
        }
    }

    /// Journals one write and applies its effect; true when the set of FIFOs changed.
    fn apply(&self, kind: &Fifo, value: &str) -> bool {
        let (op, bdf, driver) = match kind {
            Fifo::Unbind(d) => ("unbind", value.to_string(), d.clone()),
            Fifo::Bind(d) => ("bind", value.to_string(), d.clone()),
            Fifo::Reset(b) => ("reset", b.clone(), String::new()),
            Fifo::Remove(b) => ("remove", b.clone(), String::new()),
            Fifo::Rescan => ("rescan", String::new(), String::new()),
        };
        let w = Write {
            at: SystemTime::now(),
            op: op.to_string(),
            bdf: bdf.clone(),
            driver: driver.clone(),
            value: value.to_string(),
        };
        {
            let mut f = self
                .shared
                .journal_file
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let t =
                w.at.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
            let _ = writeln!(f, "{t:.6} {op} {bdf} {driver} {value:?}");
        }
        self.shared
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
        let gpu = self.gpus.iter().find(|g| g.bdf == bdf);
        match (op, gpu) {
            ("unbind", Some(g)) if g.driver == driver => self.unbind(g),
            ("bind", Some(g)) if g.driver == driver => {
                let failing = &self.shared.faults.failing_binds;
                let fail = failing
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if !fail && self.devdir(g).exists() {
                    let _ = self.bind(g);
                }
            }
            ("remove", Some(g)) => {
                self.unbind(g);
                let _ = fs::remove_file(self.sys.join("bus/pci/devices").join(&g.bdf));
                let _ = fs::remove_dir_all(self.devdir(g));
                return true;
            }
            ("rescan", _) => {
                let mut changed = false;
                for g in &self.gpus {
                    if !self.devdir(g).exists() {
                        let _ = self.create_device(g);
                        let _ = self.bind(g);
                        changed = true;
                    }
                }
                return changed;
            }
            _ => {}
        }
        false
    }
}

/// Splits what one read returned into the individual writes: the agent's writes may be
/// coalesced by the pipe if two arrive before the harness reads (which is itself a finding).
fn split_writes(kind: &Fifo, text: &str) -> Vec<String> {
    match kind {
        Fifo::Unbind(_) | Fifo::Bind(_) => {
            let mut out = Vec::new();
            for tok in text.split_whitespace() {
                // Two BDFs without a separator: 12 characters each.
                let mut rest = tok;
                while rest.len() > 12 && rest.as_bytes()[4] == b':' {
                    out.push(rest[..12].to_string());
                    rest = &rest[12..];
                }
                if !rest.is_empty() {
                    out.push(rest.to_string());
                }
            }
            out
        }
        _ => {
            let t: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            if t.is_empty() {
                vec![]
            } else if t.chars().all(|c| c == '1') {
                t.chars().map(|c| c.to_string()).collect()
            } else {
                vec![t]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait<F: Fn() -> bool>(f: F) -> bool {
        for _ in 0..100 {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn unbind_and_bind_are_journaled_and_applied() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FakeSysfs::new(dir.path(), vec![Gpu::nth(0, "xe"), Gpu::nth(1, "xe")]).unwrap();
        let g = fs.gpus()[0].clone();
        let card = fs.sys_root().join("class/drm/card0");
        assert!(
            card.join("device/driver").exists(),
            "card0 resolves to a bound device"
        );
        assert_eq!(
            fs::read_link(fs.sys_root().join(&g.card_devpath()[1..]).join("device"))
                .unwrap()
                .to_str(),
            Some("../../../0000:03:00.0")
        );
        fs::write(fs.sys_root().join("bus/pci/drivers/xe/unbind"), &g.bdf).unwrap();
        assert!(
            wait(|| !fs.is_bound(&g.bdf)),
            "unbind removes the driver link"
        );
        assert!(!fs.dev_root().join("dri/card0").exists());
        fs.fail_next_binds(1);
        fs::write(fs.sys_root().join("bus/pci/drivers/xe/bind"), &g.bdf).unwrap();
        assert!(wait(|| fs.count("bind", &g.bdf) == 1));
        assert!(!fs.is_bound(&g.bdf), "the failing bind leaves it unbound");
        fs::write(
            fs.sys_root()
                .join("bus/pci/devices")
                .join(&g.bdf)
                .join("reset"),
            "1",
        )
        .unwrap();
        fs::write(
            fs.sys_root().join("bus/pci/drivers/xe/bind"),
            format!("{}\n", g.bdf),
        )
        .unwrap();
        assert!(wait(|| fs.is_bound(&g.bdf)), "the second bind restores it");
        assert!(fs.dev_root().join("dri/card0").exists());
        assert_eq!(fs.count("unbind", &g.bdf), 1);
        assert_eq!(fs.count("reset", &g.bdf), 1);
        assert_eq!(fs.count("bind", &g.bdf), 2);
        assert!(
            fs.is_bound(&fs.gpus()[1].bdf),
            "the other GPU was never touched"
        );
        let log = fs::read_to_string(dir.path().join("sysfs-journal.log")).unwrap();
        assert_eq!(log.lines().count(), 4, "journal file: {log}");
    }

    #[test]
    fn remove_and_rescan_reenumerate() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FakeSysfs::new(dir.path(), vec![Gpu::nth(0, "xe")]).unwrap();
        let bdf = fs.gpus()[0].bdf.clone();
        fs::write(
            fs.sys_root()
                .join("bus/pci/devices")
                .join(&bdf)
                .join("remove"),
            "1",
        )
        .unwrap();
        assert!(wait(|| !fs
            .sys_root()
            .join("bus/pci/devices")
            .join(&bdf)
            .exists()));
        fs::write(fs.sys_root().join("bus/pci/rescan"), "1").unwrap();
        assert!(wait(|| fs.is_bound(&bdf)));
        // The recreated reset FIFO is served again.
        fs::write(
            fs.sys_root()
                .join("bus/pci/devices")
                .join(&bdf)
                .join("reset"),
            "1",
        )
        .unwrap();
        assert!(wait(|| fs.count("reset", &bdf) == 1));
    }

    #[test]
    fn hive_members_share_the_hive_kobject() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Gpu::nth(0, "amdgpu");
        let mut b = Gpu::nth(1, "amdgpu");
        a.hive = Some(77);
        b.hive = Some(77);
        let fs = FakeSysfs::new(dir.path(), vec![a.clone(), b.clone()]).unwrap();
        let id = fs
            .sys_root()
            .join("bus/pci/devices")
            .join(&b.bdf)
            .join("xgmi_hive_info/xgmi_hive_id");
        assert_eq!(fs::read_to_string(id).unwrap().trim(), "77");
        let node2 = fs
            .sys_root()
            .join("bus/pci/devices")
            .join(&a.bdf)
            .join("xgmi_hive_info/node2");
        assert_eq!(
            fs::canonicalize(node2).unwrap(),
            fs::canonicalize(fs.sys_root().join("bus/pci/devices").join(&b.bdf)).unwrap()
        );
    }
}
