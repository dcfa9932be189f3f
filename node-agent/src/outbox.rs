//! The durable queue of detected wedges (DESIGN invariant 4: a wedge seen is never lost).
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

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::reporter::{DetectedWedge, ReportError, Reported, Reporter};

/// A directory of pending detections.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
    /// Detections newer than their file, by the file's path: staged ones and those whose file
    /// could not be written.
    unwritten: Arc<Mutex<BTreeMap<PathBuf, DetectedWedge>>>,
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
    /// Opens (creating) `<state_dir>/outbox` and removes temp files a crash left behind.
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
        })
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

    /// The pending detections, oldest first. A file that cannot be read or parsed is renamed to
    /// `*.bad` (kept for a human) and logged; it does not block the others.
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
                    tracing::error!(file = %path.display(), error = %e, "unreadable outbox entry; moved aside as .bad for a human");
                    let _ = fs::rename(&path, path.with_extension("bad"));
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

    /// Moves an entry that can never be reported aside as `*.bad` (for a human); one kept in
    /// memory is dropped.
    pub fn set_aside(&self, path: &Path) {
        self.unwritten
            .lock()
            .expect("outbox memory poisoned")
            .remove(path);
        let _ = fs::rename(path, path.with_extension("bad"));
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
    /// Entries dropped because they can never be reported.
    pub dropped: usize,
    /// Whether the pass stopped at a retryable error (the API is away).
    pub stalled: bool,
}

/// Reports every pending entry in order, stopping at the first retryable error.
pub async fn replay<S: Sink>(outbox: &Outbox, sink: &S) -> io::Result<ReplayPass> {
    let mut pass = ReplayPass::default();
    for p in outbox.pending()? {
        match sink.report(&p.wedge).await {
            Ok(r) => {
                tracing::info!(wedge = ?r, "wedge reported");
                outbox.remove(&p.path)?;
                pass.reported.push(r);
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, file = %p.path.display(), "API not accepting the wedge yet; kept in the outbox");
                pass.stalled = true;
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, file = %p.path.display(), "wedge can never be reported; moved aside as .bad");
                outbox.set_aside(&p.path);
                pass.dropped += 1;
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
