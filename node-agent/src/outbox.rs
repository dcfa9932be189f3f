//! The durable queue of detected wedges (docs/design.md §4 invariant 4: a wedge seen is never lost).
//!
//! Every detection is written to `<state-dir>/outbox/<wedge name>.json` (tmp file, fsync,
//! rename, fsync of the directory) before the first API attempt, and removed only after the API
//! accepted it. `replay` drains the queue; `run_replayer` is the only path from a detection to the
//! API, so one agent never races itself on the "one open incident per device" rule.
//!
//! A detection that cannot be written (disk full, state dir gone or read-only) is kept in
//! memory instead and reported like the others: lost only if the agent also restarts before
//! the API accepts it. The failed write is returned as an error for the caller to log. A newer
//! version of a stored detection (its enrichment) can be staged in memory the same way.
//!
//! Before an accepted entry is removed it is recorded in [`Detections`], so the executor can
//! tell, at any time and across restarts, whether it detected a GpuWedge ([`Outbox::detected`]).
//!
//! Replay never blocks on one entry. An entry the API refuses for good (400, 413, 422, no PCI
//! address) or that cannot be parsed is moved to `outbox/rejected/` for a human, logged and
//! counted ([`Outbox::rejected_total`], the `unwedge_agent_outbox_rejected_total` metric), and
//! the pass goes on. A transient error (no connection, 5xx, 429, ...) keeps the entry and holds
//! back only the later entries of the same device (their order decides which one opens the
//! incident); the other devices' entries are still reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::Notify;

use crate::detections::{DetectionRecord, Detections};
use crate::reporter::{DetectedWedge, ReportError, Reported, Reporter};

/// A directory of pending detections.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
    /// Detections newer than their file, by the file's path: staged ones and those whose file
    /// could not be written.
    unwritten: Arc<Mutex<BTreeMap<PathBuf, DetectedWedge>>>,
    /// The detections the API accepted.
    detections: Detections,
    /// Entries moved to `rejected/` since the agent started.
    rejected: Arc<AtomicU64>,
}

/// One pending detection and its file.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The file that holds it.
    pub path: PathBuf,
    /// The detection.
    pub wedge: DetectedWedge,
}

impl Outbox {
    /// Opens (creating) `<state_dir>/outbox` and removes temp files a crash left behind; loads
    /// the record of reported detections (`<state_dir>/detections.jsonl`).
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let dir = state_dir.join("outbox");
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(Self {
            dir,
            unwritten: Arc::default(),
            detections: Detections::open(state_dir)?,
            rejected: Arc::default(),
        })
    }

    /// The record of detections the API accepted.
    pub fn detections(&self) -> &Detections {
        &self.detections
    }

    /// Whether this agent detected the GpuWedge named `wedge` with these spec fields: it is
    /// pending here (under its name or its fallback name) or was reported.
    pub fn detected(&self, wedge: &str, node: &str, pci_address: &str, boot_id: &str) -> bool {
        self.detection(wedge, node, pci_address, boot_id).is_some()
    }

    /// This agent's record of the GpuWedge named `wedge` with these spec fields (see
    /// [`Outbox::detected`]).
    pub fn detection(
        &self,
        wedge: &str,
        node: &str,
        pci_address: &str,
        boot_id: &str,
    ) -> Option<DetectionRecord> {
        if let Some(r) = self.detections.find(wedge, node, pci_address, boot_id) {
            return Some(r);
        }
        let pending = self.pending().unwrap_or_else(|e| {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the outbox to look for a detection");
            Vec::new()
        });
        pending
            .iter()
            .map(|p| &p.wedge)
            .find(|d| {
                (d.name() == wedge || d.fallback_name() == wedge)
                    && d.node == node
                    && d.device.pci_address == pci_address
                    && d.boot_id == boot_id
            })
            .map(|d| record_of(d, wedge))
    }

    /// How many entries were moved to `rejected/` since the agent started.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Where entries that can never be reported are kept for a human.
    pub fn rejected_dir(&self) -> PathBuf {
        self.dir.join("rejected")
    }

    /// The outbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores a detection durably; a second detection with the same name replaces the first.
    /// When the file cannot be written the detection is kept in memory (still pending) and the
    /// write's error returned.
    pub fn put(&self, wedge: &DetectedWedge) -> io::Result<PathBuf> {
        let path = self.dir.join(format!("{}.json", wedge.name()));
        let written = self.write(wedge, &path);
        let mut unwritten = self.unwritten.lock().expect("outbox memory poisoned");
        match written {
            Ok(()) => {
                unwritten.remove(&path);
                Ok(path)
            }
            Err(e) => {
                unwritten.insert(path, wedge.clone());
                Err(e)
            }
        }
    }

    /// Hands a newer version of a stored detection to the replayer without writing it: the
    /// file keeps the version stored before (see [`DetectedWedge::enriched`]).
    pub fn stage(&self, wedge: &DetectedWedge) -> PathBuf {
        let path = self.dir.join(format!("{}.json", wedge.name()));
        self.unwritten
            .lock()
            .expect("outbox memory poisoned")
            .insert(path.clone(), wedge.clone());
        path
    }

    fn write(&self, wedge: &DetectedWedge, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(wedge).map_err(io::Error::other)?;
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        File::open(&self.dir)?.sync_all()
    }

    /// The pending detections, oldest first. A file that cannot be read or parsed is moved to
    /// `rejected/` (kept for a human), logged and counted; it does not block the others.
    /// Detections kept in memory are included (the newer version when a file also exists);
    /// an unreadable directory is an error only when nothing is kept in memory.
    pub fn pending(&self) -> io::Result<Vec<Pending>> {
        let mut out = Vec::new();
        let memory = self
            .unwritten
            .lock()
            .expect("outbox memory poisoned")
            .clone();
        let listed = match fs::read_dir(&self.dir) {
            Ok(l) => l.collect::<io::Result<Vec<_>>>(),
            Err(e) => Err(e),
        };
        let entries = match listed {
            Ok(entries) => entries,
            Err(e) if memory.is_empty() => return Err(e),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot read the outbox; reporting the detections kept in memory");
                Vec::new()
            }
        };
        for entry in entries {
            let path = entry.path();
            if memory.contains_key(&path) {
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<DetectedWedge>(&b).map_err(|e| e.to_string())
            }) {
                Ok(wedge) => out.push(Pending { path, wedge }),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, rejected_dir = %self.rejected_dir().display(), "unreadable outbox entry; moved to the rejected directory for a human");
                    self.move_to_rejected(&path);
                }
            }
        }
        out.extend(
            memory
                .into_iter()
                .map(|(path, wedge)| Pending { path, wedge }),
        );
        out.sort_by(|a, b| (a.wedge.detected_at, &a.path).cmp(&(b.wedge.detected_at, &b.path)));
        Ok(out)
    }

    /// Removes an entry the API accepted.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        if self
            .unwritten
            .lock()
            .expect("outbox memory poisoned")
            .remove(path)
            .is_some()
            && !path.exists()
        {
            return Ok(());
        }
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Records an entry the API accepted as `reported` among the detections (when the wedge
    /// that holds it is its own, not an open incident it was added to), then removes it.
    pub fn accepted(&self, pending: &Pending, reported: &Reported) -> io::Result<()> {
        let d = &pending.wedge;
        let name = match reported {
            Reported::Created(n) | Reported::AlreadyRecorded(n) => Some(n),
            Reported::Appended(_) => None,
        };
        if let Some(name) = name.filter(|n| **n == d.name() || **n == d.fallback_name())
            && let Err(e) = self.detections.record(record_of(d, name))
        {
            tracing::error!(error = %e, wedge = %name, "cannot write the record of reported detections; it is kept in memory, and approvals of this wedge are refused after a restart");
        }
        self.remove(&pending.path)
    }

    /// Moves an entry that can never be reported to `rejected/` (for a human) and counts it;
    /// one kept only in memory is written there.
    pub fn set_aside(&self, path: &Path) {
        let kept = self
            .unwritten
            .lock()
            .expect("outbox memory poisoned")
            .remove(path);
        if !path.exists()
            && let Some(wedge) = kept
        {
            let _ = self.write(&wedge, path);
        }
        self.move_to_rejected(path);
    }

    fn move_to_rejected(&self, path: &Path) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let dir = self.rejected_dir();
        let moved = fs::create_dir_all(&dir)
            .and_then(|()| fs::rename(path, dir.join(path.file_name().unwrap_or_default())));
        if let Err(e) = moved {
            tracing::error!(file = %path.display(), error = %e, "cannot move the entry to the rejected directory; deleting it so it cannot block the outbox");
            let _ = fs::remove_file(path);
        }
    }

    /// How many entries wait.
    pub fn len(&self) -> usize {
        self.pending().map(|p| p.len()).unwrap_or(0)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The record of detection `d`, held by the GpuWedge `wedge`.
fn record_of(d: &DetectedWedge, wedge: &str) -> DetectionRecord {
    DetectionRecord {
        wedge: wedge.to_string(),
        node: d.node.clone(),
        pci_address: d.device.pci_address.clone(),
        boot_id: d.boot_id.clone(),
        driver: d.device.driver.clone(),
        at: Timestamp::now(),
    }
}

/// Where the replayer sends detections (the `Reporter` in production).
pub trait Sink {
    /// Reports one detection.
    fn report(
        &self,
        wedge: &DetectedWedge,
    ) -> impl std::future::Future<Output = Result<Reported, ReportError>> + Send;
}

impl Sink for Reporter {
    fn report(
        &self,
        wedge: &DetectedWedge,
    ) -> impl std::future::Future<Output = Result<Reported, ReportError>> + Send {
        Reporter::report(self, wedge)
    }
}

/// The result of one pass over the outbox.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayPass {
    /// Entries the API accepted (and that were removed).
    pub reported: Vec<Reported>,
    /// Entries moved to `rejected/` because they can never be reported.
    pub rejected: usize,
    /// Whether some entries stay for a retry (a transient error: the API is away or busy).
    pub stalled: bool,
}

/// Reports every pending entry, oldest first. A permanent refusal sets the entry aside and
/// the pass goes on; a transient error keeps it and holds back only the later entries of the
/// same device.
pub async fn replay<S: Sink>(outbox: &Outbox, sink: &S) -> io::Result<ReplayPass> {
    let mut pass = ReplayPass::default();
    let mut held: BTreeSet<String> = BTreeSet::new();
    for p in outbox.pending()? {
        let device = p.wedge.device.pci_address.clone();
        if held.contains(&device) {
            continue;
        }
        match sink.report(&p.wedge).await {
            Ok(r) => {
                tracing::info!(wedge = ?r, "wedge reported");
                outbox.accepted(&p, &r)?;
                pass.reported.push(r);
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, file = %p.path.display(), "API not accepting the wedge yet; kept in the outbox (later wedges of this device wait for it)");
                pass.stalled = true;
                held.insert(device);
            }
            Err(e) => {
                tracing::error!(error = %e, file = %p.path.display(), rejected_dir = %outbox.rejected_dir().display(), "the API refuses this wedge for good; moved to the rejected directory for a human, replay goes on");
                outbox.set_aside(&p.path);
                pass.rejected += 1;
            }
        }
    }
    Ok(pass)
}

/// Drains the outbox forever: on every `wake` and, while anything is pending, with a backoff
/// from `min` doubling up to `max`. `on_pass` sees each pass (metrics).
pub async fn run_replayer<S: Sink>(
    outbox: Outbox,
    sink: S,
    wake: Arc<Notify>,
    min: Duration,
    max: Duration,
    mut on_pass: impl FnMut(&ReplayPass, usize),
) {
    let mut delay = min;
    loop {
        let pass = match replay(&outbox, &sink).await {
            Ok(pass) => pass,
            Err(e) => {
                tracing::error!(error = %e, dir = %outbox.dir().display(), "cannot read the outbox; check the state dir");
                ReplayPass {
                    stalled: true,
                    ..ReplayPass::default()
                }
            }
        };
        on_pass(&pass, outbox.len());
        if pass.stalled {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(max);
        } else {
            delay = min;
            wake.notified().await;
        }
    }
}
