//! Carries out the recoveries the operator approved (docs/design.md §4).
//!
//! `next_action` decides, from the wedge, the local attempt journal and the boot id, what to
//! do; it is pure. `Executor` performs the step: journal first (fsync'd), then status, then the
//! fd gate, then the host action, then verification. The journal makes "at most once" hold
//! across restarts even when a status patch was lost (docs/design.md §4 invariant 2).
//!
//! Before anything is journaled or written, [`crate::guard`] clears the approval: the agent
//! must have detected the wedge itself (its outbox or record of reported detections, see
//! [`crate::detections`]), and `rebind`/`bus-reset` need a DRM device with a plainly named
//! driver bound, read from sysfs (never from the CR). A refused approval is journaled as
//! finished with result `Refused` (so it is never retried), reported with the reason, and the
//! reason is added to `status.agentMessage`; nothing touches the host. The check runs again
//! after the fd gate, just before acting, on fresh sysfs facts.
//!
//! `--dry-run`: the host is never touched and the attempt is reported `DryRun` with a message
//! "dry-run: would ...". `Succeeded` would be a lie the operator acts on (it would uncordon a
//! node whose GPU is still wedged), and `Failed` would make it escalate to the next rung and in
//! the end to a reboot approval. `DryRun` is final: the operator holds the wedge for a human
//! and never escalates past it (the agent also reports `status.agentDryRun`, so the operator
//! disrupts nothing in the first place). `none` needs no host action, so it succeeds.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use unwedge_crds::{AttemptOutcome, AttemptResult, GpuWedge, Method};

use crate::fdgate;
use crate::guard::{self, Clearance, DeviceFacts, Refusal};
use crate::host::HostActions;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::verify_command::VerifyCommand;

/// How far an attempt got, as recorded in the journal.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The attempt id is spent; the device has not been touched yet.
    Started,
    /// The fd gate was clear and the host action is about to run.
    Acting,
    /// The attempt ended with `result`.
    Finished,
}

/// One line of `<state-dir>/attempts.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JournalRecord {
    /// The wedge's name.
    pub wedge: String,
    /// The wedge's uid (a recreated wedge of the same name is another incident).
    pub uid: String,
    /// Attempt id.
    pub attempt: u32,
    /// Method.
    pub method: String,
    /// Stage reached.
    pub stage: Stage,
    /// When.
    pub at: Timestamp,
    /// Boot id at that moment.
    pub boot_id: String,
    /// Final result (stage Finished).
    #[serde(default)]
    pub result: Option<AttemptOutcome>,
    /// Final message (stage Finished).
    #[serde(default)]
    pub message: Option<String>,
    /// Whether the device plugin advertised the device again (stage Finished, after success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertised: Option<bool>,
    /// The driver read from sysfs before acting (stage Acting; none for a device without one),
    /// which verification expects bound again, also after a reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

/// What the journal knows about one attempt.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AttemptLog {
    /// The Started record.
    pub started: Option<JournalRecord>,
    /// The Acting record.
    pub acting: Option<JournalRecord>,
    /// The Finished record.
    pub finished: Option<JournalRecord>,
}

/// The append-only attempt journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    records: Vec<JournalRecord>,
}

impl Journal {
    /// Loads `<state_dir>/attempts.jsonl` (creating the dir). Unparseable lines (a torn last
    /// line after a crash) are logged and skipped.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(state_dir)?;
        let path = state_dir.join("attempts.jsonl");
        let records = match File::open(&path) {
            Ok(f) => crate::jsonl::read(f, &path, "attempt journal line")?,
            Err(_) => Vec::new(),
        };
        Ok(Self { path, records })
    }

    /// Appends a record and fsyncs it before returning.
    pub fn append(&mut self, rec: JournalRecord) -> io::Result<()> {
        crate::jsonl::append(&self.path, &rec)?;
        self.records.push(rec);
        Ok(())
    }

    /// The driver read from sysfs before the latest attempt on the wedge with `uid` that had
    /// one (see [`JournalRecord::driver`]).
    pub fn driver_read(&self, uid: &str) -> Option<String> {
        self.records
            .iter()
            .rev()
            .filter(|r| r.uid == uid && r.stage == Stage::Acting)
            .find_map(|r| r.driver.clone())
    }

    /// What is recorded for attempt `attempt` of the wedge with `uid`.
    pub fn of(&self, uid: &str, attempt: u32) -> AttemptLog {
        let mut log = AttemptLog::default();
        for r in self
            .records
            .iter()
            .filter(|r| r.uid == uid && r.attempt == attempt)
        {
            let slot = match r.stage {
                Stage::Started => &mut log.started,
                Stage::Acting => &mut log.acting,
                Stage::Finished => &mut log.finished,
            };
            *slot = Some(r.clone());
        }
        log
    }
}

/// What the executor should do for a wedge now.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutorStep {
    /// Nothing: no approval, already done, or the incident is over.
    Idle,
    /// A new approval: journal and report Started, gate, act, verify.
    Start {
        /// Attempt id.
        attempt: u32,
        /// Method.
        method: String,
    },
    /// Started before a restart but the gate never cleared (the device was not touched): gate again.
    ResumeGate {
        /// Attempt id.
        attempt: u32,
        /// Method.
        method: String,
    },
    /// A reboot attempt and the boot id changed: verify the device and report.
    VerifyAfterReboot {
        /// Attempt id.
        attempt: u32,
        /// The boot id recorded before rebooting.
        started_boot_id: String,
    },
    /// This process asked the host to reboot for the attempt and the boot id has not changed
    /// yet: wait for the host to go down (the operator's attempt timeout covers a reboot that
    /// never comes).
    AwaitingReboot {
        /// Attempt id.
        attempt: u32,
    },
    /// The agent restarted while acting (or lost its journal): report Failed, never re-execute.
    ReportInterrupted {
        /// Attempt id.
        attempt: u32,
        /// Method.
        method: String,
    },
    /// The journal has the final result but the status does not (a lost patch): report it.
    ReportFinished {
        /// The Finished record.
        record: JournalRecord,
    },
}

/// The uid the journal keys a wedge by (its name when the object has no uid, e.g. in tests).
pub fn wedge_key(w: &GpuWedge) -> String {
    w.uid().unwrap_or_else(|| w.name_any())
}

/// Decides the next step for `wedge` given the journal, the current boot id and whether this
/// process has already asked the host to reboot for the approved attempt.
pub fn next_action(
    wedge: &GpuWedge,
    journal: &Journal,
    boot_id: &str,
    reboot_requested: bool,
) -> ExecutorStep {
    let Some(status) = wedge.status.as_ref() else {
        return ExecutorStep::Idle;
    };
    let Some(approval) = status.approval.as_ref() else {
        return ExecutorStep::Idle;
    };
    if status.phase.is_some_and(|p| p.is_terminal()) {
        return ExecutorStep::Idle;
    }
    let attempt = approval.attempt;
    let method = approval.method.clone();
    let reported = status
        .attempts
        .iter()
        .flatten()
        .find(|a| a.attempt == attempt);
    if reported.is_some_and(|a| a.result.is_final()) {
        return ExecutorStep::Idle;
    }
    let log = journal.of(&wedge_key(wedge), attempt);
    if let Some(record) = log.finished {
        return ExecutorStep::ReportFinished { record };
    }
    if let Some(acting) = log.acting {
        return if Method::Reboot == acting.method && acting.boot_id != boot_id {
            ExecutorStep::VerifyAfterReboot {
                attempt,
                started_boot_id: acting.boot_id,
            }
        } else if Method::Reboot == acting.method && reboot_requested {
            ExecutorStep::AwaitingReboot { attempt }
        } else {
            ExecutorStep::ReportInterrupted {
                attempt,
                method: acting.method,
            }
        };
    }
    if let Some(started) = log.started {
        return ExecutorStep::ResumeGate {
            attempt,
            method: started.method,
        };
    }
    if reported.is_some() {
        // Status says Started/Blocked but this state dir never heard of it: another agent
        // instance (or a wiped state dir) may have acted. Never guess: report.
        return ExecutorStep::ReportInterrupted { attempt, method };
    }
    ExecutorStep::Start { attempt, method }
}

/// `attempts` with `entry` put in place of the one with the same attempt id (or appended).
pub fn upsert_attempt(attempts: &[AttemptResult], entry: AttemptResult) -> Vec<AttemptResult> {
    let mut out: Vec<AttemptResult> = attempts
        .iter()
        .filter(|a| a.attempt != entry.attempt)
        .cloned()
        .collect();
    out.push(entry);
    out.sort_by_key(|a| a.attempt);
    out
}

/// The device nodes and PCI addresses the fd gate must see closed for `wedge`: the device
/// itself and every reset-domain member the method disturbs (all of them when none says).
pub fn gate_targets(wedge: &GpuWedge, method: &str) -> (Vec<String>, Vec<String>) {
    let mut nodes = Vec::new();
    let mut pcis = vec![wedge.spec.device.pci_address.clone()];
    nodes.extend(wedge.spec.device.card.clone());
    nodes.extend(wedge.spec.device.render_node.clone());
    let domain = wedge
        .status
        .as_ref()
        .and_then(|s| s.reset_domain.clone())
        .unwrap_or_default();
    let relevant: Vec<_> = domain
        .iter()
        .filter(|d| d.methods.iter().any(|m| m == method))
        .collect();
    let members = if relevant.is_empty() {
        domain.iter().collect()
    } else {
        relevant
    };
    for d in members {
        pcis.push(d.pci_address.clone());
        nodes.extend(d.card.clone());
        nodes.extend(d.render_node.clone());
    }
    nodes.sort();
    nodes.dedup();
    pcis.sort();
    pcis.dedup();
    (nodes, pcis)
}

/// Where the executor reads and writes GpuWedges (the API in production).
pub trait WedgeStore: Send + Sync {
    /// The current object, fresh from the source of truth.
    fn get(
        &self,
        name: &str,
    ) -> impl std::future::Future<Output = Result<Option<GpuWedge>, String>> + Send;
    /// Replaces `status.attempts` (the agent's own array) by merge patch.
    fn patch_attempts(
        &self,
        name: &str,
        attempts: &[AttemptResult],
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// Replaces `status.agentMessage` (the agent's own field) by merge patch.
    fn patch_agent_message(
        &self,
        name: &str,
        message: &str,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// `WedgeStore` on the API server.
#[derive(Clone)]
pub struct KubeStore {
    api: Api<GpuWedge>,
}

impl KubeStore {
    /// A store over `client`.
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }
}

impl WedgeStore for KubeStore {
    async fn get(&self, name: &str) -> Result<Option<GpuWedge>, String> {
        self.api.get_opt(name).await.map_err(|e| e.to_string())
    }

    async fn patch_attempts(&self, name: &str, attempts: &[AttemptResult]) -> Result<(), String> {
        let patch = json!({ "status": { "attempts": attempts } });
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn patch_agent_message(&self, name: &str, message: &str) -> Result<(), String> {
        let patch = json!({ "status": { "agentMessage": message } });
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// `existing` agent message with `note` put first (once), for a human reading the status.
pub fn with_note(existing: Option<&str>, note: &str) -> String {
    match existing.filter(|m| !m.is_empty()) {
        Some(m) if m.contains(note) => m.to_string(),
        Some(m) => format!("{note}; {m}"),
        None => note.to_string(),
    }
}

/// When each device (by PCI address) last sent a WEDGED uevent; the listener writes it, the
/// verifier reads it for the settle window.
#[derive(Debug, Default, Clone)]
pub struct WedgeClock(Arc<Mutex<HashMap<String, Instant>>>);

impl WedgeClock {
    /// Records a wedge of `pci` now.
    pub fn wedged(&self, pci: &str) {
        self.0
            .lock()
            .expect("wedge clock poisoned")
            .insert(pci.to_string(), Instant::now());
    }

    /// Whether `pci` wedged after `since`.
    pub fn wedged_since(&self, pci: &str, since: Instant) -> bool {
        self.0
            .lock()
            .expect("wedge clock poisoned")
            .get(pci)
            .is_some_and(|t| *t > since)
    }
}

/// Executor settings.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// `--proc-root`.
    pub proc_root: PathBuf,
    /// `--dev-root`.
    pub dev_root: PathBuf,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--settle`.
    pub settle: Duration,
    /// `--verify-command`, run as an argv (see [`crate::verify_command`]).
    pub verify_command: Option<String>,
    /// How often the fd gate re-checks while blocked (2 s).
    pub gate_interval: Duration,
    /// How long to wait for the driver and card to come back after acting, and then for the
    /// device plugin to advertise the device again.
    pub reappear_timeout: Duration,
    /// Asks whether the device plugin advertises a GPU again (None in the config: not asked).
    pub advertised: Option<AdvertisedCheck>,
}

/// Asks, for a PCI address, whether the node's device plugin advertises that GPU as
/// allocatable (`None`: cannot tell, e.g. no device plugin serves the node's GPUs).
#[derive(Clone)]
pub struct AdvertisedCheck(pub Arc<dyn Fn(String) -> AdvertisedAnswer + Send + Sync>);

/// The answer of an [`AdvertisedCheck`], to be awaited.
pub type AdvertisedAnswer =
    std::pin::Pin<Box<dyn std::future::Future<Output = Option<bool>> + Send>>;

impl std::fmt::Debug for AdvertisedCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdvertisedCheck")
    }
}

/// A successful verification: what was seen, and whether the device plugin advertises the
/// device again.
struct Verified {
    message: String,
    advertised: Option<bool>,
}

/// Performs `ExecutorStep`s for the wedges of this node.
pub struct Executor<H, S> {
    cfg: ExecutorConfig,
    host: Arc<H>,
    store: S,
    outbox: Outbox,
    journal: Mutex<Journal>,
    in_flight: Mutex<HashSet<(String, u32)>>,
    reboots_requested: Mutex<HashSet<(String, u32)>>,
    clock: WedgeClock,
    metrics: Arc<Metrics>,
}

/// An attempt's end as the executor saw it.
type Outcome = (AttemptOutcome, String);

impl<H: HostActions + 'static, S: WedgeStore> Executor<H, S> {
    /// An executor with its journal under `state_dir`; `outbox` tells which wedges this agent
    /// detected (only those are acted on).
    pub fn new(
        cfg: ExecutorConfig,
        host: Arc<H>,
        store: S,
        state_dir: &Path,
        outbox: Outbox,
        clock: WedgeClock,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        Ok(Self {
            cfg,
            host,
            store,
            outbox,
            journal: Mutex::new(Journal::open(state_dir)?),
            in_flight: Mutex::new(HashSet::new()),
            reboots_requested: Mutex::new(HashSet::new()),
            clock,
            metrics,
        })
    }

    fn boot_id(&self) -> String {
        self.host.boot_id().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the boot id; recording it as unknown");
            "unknown".to_string()
        })
    }

    /// Decides and performs the next step for `wedge`, to the end (a blocked gate waits here).
    /// Returns the step taken. A step already running for the same attempt is skipped.
    pub async fn process(&self, wedge: &GpuWedge) -> ExecutorStep {
        let Some(approval) = wedge.status.as_ref().and_then(|s| s.approval.as_ref()) else {
            return ExecutorStep::Idle;
        };
        // Claim the attempt before deciding, so a decision is always made from a journal that
        // includes everything an earlier run of the same attempt wrote.
        let key = (wedge_key(wedge), approval.attempt);
        if !self
            .in_flight
            .lock()
            .expect("in-flight poisoned")
            .insert(key.clone())
        {
            return ExecutorStep::Idle;
        }
        let boot_id = self.boot_id();
        let step = {
            let journal = self.journal.lock().expect("journal poisoned");
            let requested = self
                .reboots_requested
                .lock()
                .expect("reboot requests poisoned")
                .contains(&key);
            next_action(wedge, &journal, &boot_id, requested)
        };
        if let Err(e) = self.perform(wedge, &step, &boot_id).await {
            self.metrics.api_errors.inc();
            tracing::error!(wedge = %wedge.name_any(), attempt = key.1, error = %e, "attempt step not completed; will retry on the next resync");
        }
        self.in_flight
            .lock()
            .expect("in-flight poisoned")
            .remove(&key);
        step
    }

    fn journal(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        stage: Stage,
        boot_id: &str,
        end: Option<(&Outcome, Option<bool>)>,
    ) -> Result<(), String> {
        let rec = JournalRecord {
            wedge: wedge.name_any(),
            uid: wedge_key(wedge),
            attempt,
            method: method.to_string(),
            stage,
            at: Timestamp::now(),
            boot_id: boot_id.to_string(),
            result: end.map(|(o, _)| o.0),
            message: end.map(|(o, _)| o.1.clone()),
            advertised: end.and_then(|(_, a)| a),
            driver: None,
        };
        self.append(rec)
    }

    /// Journals the Acting stage with the driver read from sysfs.
    fn journal_acting(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        boot_id: &str,
        driver: Option<&str>,
    ) -> Result<(), String> {
        self.append(JournalRecord {
            wedge: wedge.name_any(),
            uid: wedge_key(wedge),
            attempt,
            method: method.to_string(),
            stage: Stage::Acting,
            at: Timestamp::now(),
            boot_id: boot_id.to_string(),
            result: None,
            message: None,
            advertised: None,
            driver: driver.map(str::to_string),
        })
    }

    fn append(&self, rec: JournalRecord) -> Result<(), String> {
        self.journal
            .lock()
            .expect("journal poisoned")
            .append(rec)
            .map_err(|e| format!("cannot write the attempt journal (refusing to act): {e}"))
    }

    /// Upserts this attempt's entry in status.attempts, retrying for a while if the API is away.
    async fn report(&self, name: &str, entry: AttemptResult) -> Result<(), String> {
        let mut last = String::new();
        for i in 0..10u32 {
            match self.store.get(name).await {
                Ok(Some(current)) => {
                    let attempts = current.status.and_then(|s| s.attempts).unwrap_or_default();
                    match self
                        .store
                        .patch_attempts(name, &upsert_attempt(&attempts, entry.clone()))
                        .await
                    {
                        Ok(()) => {
                            self.metrics
                                .attempt(&entry.method, &format!("{:?}", entry.result));
                            return Ok(());
                        }
                        Err(e) => last = e,
                    }
                }
                Ok(None) => return Err(format!("GpuWedge {name} is gone")),
                Err(e) => last = e,
            }
            self.metrics.api_errors.inc();
            tokio::time::sleep(Duration::from_millis(200) * (i + 1).min(10)).await;
        }
        Err(format!("cannot report attempt on {name}: {last}"))
    }

    fn entry(
        attempt: u32,
        method: &str,
        result: AttemptOutcome,
        started_at: Timestamp,
        boot_id: &str,
        message: String,
        advertised: Option<bool>,
    ) -> AttemptResult {
        let finished = result.is_final();
        AttemptResult {
            attempt,
            method: method.to_string(),
            result,
            started_at: Time(started_at),
            finished_at: finished.then(|| Time(Timestamp::now())),
            message,
            boot_id: Some(boot_id.to_string()),
            advertised,
            restarts: None,
        }
    }

    async fn finish(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        boot_id: &str,
        outcome: Outcome,
        advertised: Option<bool>,
    ) -> Result<(), String> {
        let started_at = Self::started_at(wedge, attempt);
        tracing::info!(wedge = %wedge.name_any(), attempt, method, result = ?outcome.0, message = %outcome.1, ?advertised, "attempt finished");
        self.journal(
            wedge,
            attempt,
            method,
            Stage::Finished,
            boot_id,
            Some((&outcome, advertised)),
        )?;
        self.report(
            &wedge.name_any(),
            Self::entry(
                attempt, method, outcome.0, started_at, boot_id, outcome.1, advertised,
            ),
        )
        .await
    }

    fn started_at(wedge: &GpuWedge, attempt: u32) -> Timestamp {
        wedge
            .status
            .as_ref()
            .and_then(|s| s.attempts.as_ref())
            .and_then(|a| a.iter().find(|a| a.attempt == attempt))
            .map(|a| a.started_at.0)
            .unwrap_or_else(Timestamp::now)
    }

    async fn perform(
        &self,
        wedge: &GpuWedge,
        step: &ExecutorStep,
        boot_id: &str,
    ) -> Result<(), String> {
        let name = wedge.name_any();
        match step {
            ExecutorStep::Idle | ExecutorStep::AwaitingReboot { .. } => Ok(()),
            ExecutorStep::ReportFinished { record } => {
                tracing::info!(wedge = %name, attempt = record.attempt, "re-reporting a finished attempt whose status was lost");
                let outcome = (
                    record.result.unwrap_or(AttemptOutcome::Failed),
                    record.message.clone().unwrap_or_default(),
                );
                let entry = Self::entry(
                    record.attempt,
                    &record.method,
                    outcome.0,
                    Self::started_at(wedge, record.attempt),
                    &record.boot_id,
                    outcome.1,
                    record.advertised,
                );
                self.report(&name, entry).await
            }
            ExecutorStep::ReportInterrupted { attempt, method } => {
                tracing::warn!(wedge = %name, attempt, method, "attempt interrupted by an agent restart; reporting it, not re-executing");
                let outcome = (
                    AttemptOutcome::Failed,
                    "agent restarted during the attempt; not re-executed".to_string(),
                );
                self.finish(wedge, *attempt, method, boot_id, outcome, None)
                    .await
            }
            ExecutorStep::VerifyAfterReboot {
                attempt,
                started_boot_id,
            } => {
                let driver = self
                    .journal
                    .lock()
                    .expect("journal poisoned")
                    .of(&wedge_key(wedge), *attempt)
                    .acting
                    .and_then(|r| r.driver);
                let verified = self.verify(wedge, driver.as_deref(), Instant::now()).await;
                let (outcome, advertised) = match verified {
                    Ok(v) => (
                        (
                            AttemptOutcome::Succeeded,
                            format!(
                                "rebooted (boot id {started_boot_id} -> {boot_id}); {}",
                                v.message
                            ),
                        ),
                        v.advertised,
                    ),
                    Err(m) => (
                        (
                            AttemptOutcome::Failed,
                            format!("rebooted (boot id {started_boot_id} -> {boot_id}) but {m}"),
                        ),
                        None,
                    ),
                };
                self.finish(wedge, *attempt, "reboot", boot_id, outcome, advertised)
                    .await
            }
            ExecutorStep::Start { attempt, method }
            | ExecutorStep::ResumeGate { attempt, method } => {
                let first = matches!(step, ExecutorStep::Start { .. });
                self.carry_out(wedge, *attempt, method, boot_id, first)
                    .await
            }
        }
    }

    /// An approved attempt from its start (or from the fd gate after a restart, `first`
    /// false): clearance, Started, the fd gate, clearance again on fresh facts, act, verify.
    async fn carry_out(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        boot_id: &str,
        first: bool,
    ) -> Result<(), String> {
        let name = wedge.name_any();
        let started_at = Self::started_at(wedge, attempt);
        let cleared = match self.clearance(wedge, method) {
            Ok(c) => c,
            Err(r) => return self.refuse(wedge, attempt, method, boot_id, r).await,
        };
        if first {
            self.journal(wedge, attempt, method, Stage::Started, boot_id, None)?;
        }
        self.report(
            &name,
            Self::entry(
                attempt,
                method,
                AttemptOutcome::Started,
                started_at,
                boot_id,
                format!("{method}: started"),
                None,
            ),
        )
        .await?;
        if !Method::from(method).agent_knows() {
            let outcome = (
                AttemptOutcome::Failed,
                format!("agent does not know how to carry out {method}"),
            );
            return self
                .finish(wedge, attempt, method, boot_id, outcome, None)
                .await;
        }
        if method == "none" {
            let outcome = (
                AttemptOutcome::Succeeded,
                "none: the driver recovered by itself; nothing done to the device".to_string(),
            );
            return self
                .finish(wedge, attempt, method, boot_id, outcome, None)
                .await;
        }
        let bdf = wedge.spec.device.pci_address.as_str();
        if self.cfg.dry_run {
            let outcome = (
                AttemptOutcome::DryRun,
                format!(
                    "dry-run: would {}; the host was not touched",
                    plan_text(bdf, cleared.driver.as_deref(), method)
                ),
            );
            return self
                .finish(wedge, attempt, method, boot_id, outcome, None)
                .await;
        }
        if let Some(outcome) = self
            .gate(wedge, attempt, method, started_at, boot_id)
            .await?
        {
            return self
                .finish(wedge, attempt, method, boot_id, outcome, None)
                .await;
        }
        // The gate may have waited long: decide again on what sysfs shows now.
        let cleared = match self.clearance(wedge, method) {
            Ok(c) => c,
            Err(r) => return self.refuse(wedge, attempt, method, boot_id, r).await,
        };
        let driver = cleared.driver.as_deref();
        self.journal_acting(wedge, attempt, method, boot_id, driver)?;
        tracing::info!(wedge = %name, attempt, method, "acting: {}", plan_text(bdf, driver, method));
        let acted = self
            .act(wedge, method, driver, attempt, started_at, boot_id)
            .await;
        let (outcome, advertised) = match acted {
            Ok(None) => return Ok(()),
            Ok(Some(done)) => match self.verify(wedge, driver, Instant::now()).await {
                Ok(v) => (
                    (AttemptOutcome::Succeeded, format!("{done}; {}", v.message)),
                    v.advertised,
                ),
                Err(m) => ((AttemptOutcome::Failed, format!("{done} but {m}")), None),
            },
            Err(e) => (
                (AttemptOutcome::Failed, format!("{method} failed: {e}")),
                None,
            ),
        };
        self.finish(wedge, attempt, method, boot_id, outcome, advertised)
            .await
    }

    /// Whether `method` may be carried out on `wedge` now (see [`crate::guard`]): detected by
    /// this agent, and the device's facts read from sysfs.
    fn clearance(&self, wedge: &GpuWedge, method: &str) -> Result<Clearance, Refusal> {
        let spec = &wedge.spec;
        let pci = spec.device.pci_address.as_str();
        if !crate::sysfs::is_bdf(pci) {
            return guard::clear(wedge, method, false, &DeviceFacts::default());
        }
        let detection =
            self.outbox
                .detection(&wedge.name_any(), &spec.node_name, pci, &spec.boot_id);
        let journaled = self
            .journal
            .lock()
            .expect("journal poisoned")
            .driver_read(&wedge_key(wedge));
        let detected_with = detection
            .as_ref()
            .map(|d| d.driver.clone())
            .filter(|d| !d.is_empty());
        let facts = DeviceFacts {
            is_drm: self.host.is_drm_device(pci),
            driver: self.host.driver_of(pci),
            is_gpu_class: self
                .host
                .pci_class(pci)
                .is_some_and(|c| matches!(c >> 16, 0x03 | 0x12)),
            remembered_driver: journaled.or(detected_with),
        };
        if !spec.device.driver.is_empty() && facts.driver.as_deref() != Some(&spec.device.driver) {
            tracing::info!(wedge = %wedge.name_any(), cr_driver = %spec.device.driver, sysfs_driver = ?facts.driver, "spec.device.driver differs from sysfs; the agent uses sysfs only");
        }
        guard::clear(wedge, method, detection.is_some(), &facts)
    }

    /// Journals and reports a refused approval (final: never retried) and tells a human in
    /// `status.agentMessage`. Nothing touched the host.
    async fn refuse(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        boot_id: &str,
        refusal: Refusal,
    ) -> Result<(), String> {
        let why = format!("refused {method} (attempt {attempt}): {refusal}");
        tracing::warn!(wedge = %wedge.name_any(), attempt, method, "{why}");
        self.finish(
            wedge,
            attempt,
            method,
            boot_id,
            (AttemptOutcome::Refused, why.clone()),
            None,
        )
        .await?;
        let name = wedge.name_any();
        let current = self.store.get(&name).await?;
        let existing = current
            .as_ref()
            .and_then(|w| w.status.as_ref())
            .and_then(|s| s.agent_message.clone());
        self.store
            .patch_agent_message(&name, &with_note(existing.as_deref(), &why))
            .await
    }

    /// Waits until no process holds a device of the reset domain. `Some(outcome)` when the
    /// approval went away meanwhile (nothing was done).
    async fn gate(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        started_at: Timestamp,
        boot_id: &str,
    ) -> Result<Option<Outcome>, String> {
        let (nodes, pcis) = gate_targets(wedge, method);
        let mut last_message = String::new();
        loop {
            let (proc_root, dev_root) = (self.cfg.proc_root.clone(), self.cfg.dev_root.clone());
            let (n, p) = (nodes.clone(), pcis.clone());
            let holders =
                tokio::task::spawn_blocking(move || fdgate::holders(&proc_root, &dev_root, &n, &p))
                    .await
                    .map_err(|e| format!("fd gate scan panicked: {e}"))?;
            if holders.is_empty() {
                return Ok(None);
            }
            let message = format!(
                "blocked by the fd gate: {}",
                holders
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if message != last_message {
                tracing::warn!(wedge = %wedge.name_any(), attempt, "{message}");
                self.metrics.fd_gate_blocked.inc();
                self.report(
                    &wedge.name_any(),
                    Self::entry(
                        attempt,
                        method,
                        AttemptOutcome::Blocked,
                        started_at,
                        boot_id,
                        message.clone(),
                        None,
                    ),
                )
                .await?;
                last_message = message;
            }
            tokio::time::sleep(self.cfg.gate_interval).await;
            let current = self.store.get(&wedge.name_any()).await?;
            let still = current
                .as_ref()
                .and_then(|w| w.status.as_ref())
                .is_some_and(|s| {
                    s.approval.as_ref().is_some_and(|a| a.attempt == attempt)
                        && !s.phase.is_some_and(|p| p.is_terminal())
                });
            if !still {
                return Ok(Some((
                    AttemptOutcome::Failed,
                    "approval withdrawn while blocked by the fd gate; nothing was done".to_string(),
                )));
            }
        }
    }

    /// Runs the method on the host with the cleared `driver`. `Ok(None)`: a reboot is under
    /// way (nothing to report yet).
    async fn act(
        &self,
        wedge: &GpuWedge,
        method: &str,
        driver: Option<&str>,
        attempt: u32,
        started_at: Timestamp,
        boot_id: &str,
    ) -> Result<Option<String>, String> {
        let bdf = wedge.spec.device.pci_address.clone();
        let host = self.host.clone();
        let needs_driver = || {
            driver
                .map(str::to_string)
                .ok_or_else(|| format!("no driver bound to {bdf}: {method} needs one"))
        };
        match Method::from(method) {
            Method::Rebind => {
                let driver = needs_driver()?;
                let (b, d) = (bdf.clone(), driver.clone());
                blocking(move || {
                    if host.driver_of(&b).is_some() {
                        unbind_confirmed(host.as_ref(), &b, &d)?;
                    }
                    host.bind(&b, &d)
                })
                .await?;
                Ok(Some(format!("rebind: unbound and bound {bdf} to {driver}")))
            }
            Method::BusReset => {
                let driver = needs_driver()?;
                let (b, d) = (bdf.clone(), driver.clone());
                let done = blocking(move || {
                    if host.driver_of(&b).is_some() {
                        unbind_confirmed(host.as_ref(), &b, &d)?;
                    }
                    match host.pci_reset(&b) {
                        Ok(used) => {
                            host.bind(&b, &d)?;
                            Ok(format!("bus-reset: {b} reset by the kernel's {used} reset_method, bound to {d}"))
                        }
                        Err(e) => {
                            host.remove(&b)?;
                            host.rescan()?;
                            Ok(format!("bus-reset: reset of {b} failed ({e}); removed and rescanned the bus"))
                        }
                    }
                })
                .await?;
                Ok(Some(done))
            }
            Method::Reboot => {
                self.report(
                    &wedge.name_any(),
                    Self::entry(
                        attempt,
                        method,
                        AttemptOutcome::Started,
                        started_at,
                        boot_id,
                        format!("rebooting the host (boot id {boot_id})"),
                        None,
                    ),
                )
                .await?;
                blocking(move || host.reboot()).await?;
                self.reboots_requested
                    .lock()
                    .expect("reboot requests poisoned")
                    .insert((wedge_key(wedge), attempt));
                tracing::warn!(wedge = %wedge.name_any(), "reboot requested; waiting for the host to go down");
                Ok(None)
            }
            other => Err(format!("agent does not know how to carry out {other}")),
        }
    }

    /// Driver bound again (the `expected` one read from sysfs before acting; any driver when
    /// none was bound), card node back (found by PCI address), quiet for the settle window,
    /// verify command exits 0.
    async fn verify(
        &self,
        wedge: &GpuWedge,
        expected: Option<&str>,
        acted_at: Instant,
    ) -> Result<Verified, String> {
        let bdf = wedge.spec.device.pci_address.clone();
        let deadline = Instant::now() + self.cfg.reappear_timeout;
        let (driver, card) = loop {
            let (d, c) = (self.host.driver_of(&bdf), self.host.card_of(&bdf));
            let back = match (&d, expected) {
                (Some(d), Some(want)) => d == want,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if let (true, Some(d), Some(c)) = (back, &d, &c) {
                break (d.clone(), c.clone());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the device did not come back within {:?}: driver {:?} (want {}), card {:?}",
                    self.cfg.reappear_timeout,
                    d,
                    expected.unwrap_or("any"),
                    c
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        tokio::time::sleep(self.cfg.settle).await;
        if self.clock.wedged_since(&bdf, acted_at) {
            return Err(format!(
                "{bdf} wedged again within the settle window of {:?}",
                self.cfg.settle
            ));
        }
        if let Some(cmd) = &self.cfg.verify_command {
            VerifyCommand::parse(cmd)
                .map_err(|e| e.to_string())?
                .run(&[
                    ("UNWEDGE_PCI_ADDRESS", bdf.as_str()),
                    ("UNWEDGE_CARD", card.as_str()),
                    ("UNWEDGE_DRIVER", driver.as_str()),
                ])
                .await
                .map_err(|e| e.to_string())?;
        }
        let was = wedge.spec.device.card.clone().unwrap_or_default();
        let advertised = self.wait_advertised(&bdf).await;
        let plugin = match advertised {
            Some(true) => "; its device plugin advertises it again",
            Some(false) => "; its device plugin does not advertise it again",
            None => "",
        };
        Ok(Verified {
            message: format!(
                "verified: {driver} bound, {card} present (was {was}), quiet for {:?}{plugin}",
                self.cfg.settle
            ),
            advertised,
        })
    }

    /// Asks until the device plugin advertises `bdf` again, or [`ExecutorConfig::reappear_timeout`]
    /// passes (`Some(false)`); `None` when the question cannot be answered here.
    async fn wait_advertised(&self, bdf: &str) -> Option<bool> {
        let check = self.cfg.advertised.as_ref()?;
        let deadline = Instant::now() + self.cfg.reappear_timeout;
        loop {
            match (check.0)(bdf.to_string()).await {
                Some(false) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                answer => return answer,
            }
        }
    }
}

/// How long an unbind may take to show in sysfs before the attempt fails.
const UNBIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Unbinds and waits until sysfs shows the device without a driver, so the bind that follows
/// never races a driver still going away (a driver whose remove failed or hangs fails the
/// attempt here with a clear message instead of a bind that silently did nothing).
fn unbind_confirmed<H: HostActions + ?Sized>(
    host: &H,
    bdf: &str,
    driver: &str,
) -> Result<(), crate::host::HostError> {
    host.unbind(bdf, driver)?;
    let deadline = Instant::now() + UNBIND_TIMEOUT;
    while host.driver_of(bdf).is_some() {
        if Instant::now() >= deadline {
            return Err(crate::host::HostError::Command(format!(
                "{bdf} still bound to {driver} {UNBIND_TIMEOUT:?} after the unbind write"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::host::HostError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("host action panicked: {e}"))?
        .map_err(|e| e.to_string())
}

/// What a method would do to the device `bdf` with the sysfs `driver`, in words (logs and
/// dry-run messages).
pub fn plan_text(bdf: &str, driver: Option<&str>, method: &str) -> String {
    let drv = driver.unwrap_or("its driver");
    match Method::from(method) {
        Method::None => "do nothing to the device".to_string(),
        Method::Rebind => format!("unbind {bdf} from {drv} and bind it again"),
        Method::BusReset => format!(
            "unbind {bdf} from {drv}, write 1 to its reset file, bind it again (fallback: remove + rescan)"
        ),
        Method::Reboot => "reboot the host".to_string(),
        other => format!("not know how to carry out {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unwedge_crds::{Approval, DeviceRef, GpuWedgeSpec, GpuWedgeStatus, Phase};

    fn wedge(approval: Option<(&str, u32)>, attempts: Vec<AttemptResult>) -> GpuWedge {
        let mut w = GpuWedge::new(
            "node-a-0000-03-00-0-7",
            GpuWedgeSpec {
                node_name: "node-a".into(),
                device: DeviceRef {
                    pci_address: "0000:03:00.0".into(),
                    driver: "xe".into(),
                    ..DeviceRef::default()
                },
                methods: vec!["rebind".into()],
                detected_at: Time(Timestamp::UNIX_EPOCH),
                boot_id: "b1".into(),
                uevent: Default::default(),
                blamed: None,
            },
        );
        w.metadata.uid = Some("uid-1".into());
        w.status = Some(GpuWedgeStatus {
            approval: approval.map(|(m, a)| Approval {
                method: m.into(),
                attempt: a,
                at: Time(Timestamp::UNIX_EPOCH),
                by: "op".into(),
                containers: None,
            }),
            attempts: Some(attempts),
            ..GpuWedgeStatus::default()
        });
        w
    }

    fn rec(stage: Stage, method: &str, boot: &str) -> JournalRecord {
        JournalRecord {
            wedge: "node-a-0000-03-00-0-7".into(),
            uid: "uid-1".into(),
            attempt: 1,
            method: method.into(),
            stage,
            at: Timestamp::UNIX_EPOCH,
            boot_id: boot.into(),
            result: (stage == Stage::Finished).then_some(AttemptOutcome::Succeeded),
            advertised: None,
            message: None,
            driver: None,
        }
    }

    fn journal(recs: Vec<JournalRecord>) -> (tempfile::TempDir, Journal) {
        let t = tempfile::tempdir().unwrap();
        let mut j = Journal::open(t.path()).unwrap();
        for r in recs {
            j.append(r).unwrap();
        }
        let j = Journal::open(t.path()).unwrap();
        (t, j)
    }

    fn result(r: AttemptOutcome) -> AttemptResult {
        AttemptResult {
            attempt: 1,
            method: "rebind".into(),
            result: r,
            started_at: Time(Timestamp::UNIX_EPOCH),
            finished_at: None,
            message: String::new(),
            boot_id: None,
            advertised: None,
            restarts: None,
        }
    }

    #[test]
    fn new_approval_starts() {
        let (_t, j) = journal(vec![]);
        assert_eq!(
            next_action(&wedge(Some(("rebind", 1)), vec![]), &j, "b1", false),
            ExecutorStep::Start {
                attempt: 1,
                method: "rebind".into()
            }
        );
        assert_eq!(
            next_action(&wedge(None, vec![]), &j, "b1", false),
            ExecutorStep::Idle
        );
    }

    #[test]
    fn finished_attempts_and_closed_incidents_are_idle() {
        let (_t, j) = journal(vec![]);
        assert_eq!(
            next_action(
                &wedge(Some(("rebind", 1)), vec![result(AttemptOutcome::Failed)]),
                &j,
                "b1",
                false
            ),
            ExecutorStep::Idle
        );
        let mut w = wedge(Some(("rebind", 1)), vec![]);
        w.status.as_mut().unwrap().phase = Some(Phase::Abandoned);
        assert_eq!(next_action(&w, &j, "b1", false), ExecutorStep::Idle);
    }

    #[test]
    fn journal_wins_over_a_lost_status_patch() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "rebind", "b1"),
            rec(Stage::Acting, "rebind", "b1"),
            rec(Stage::Finished, "rebind", "b1"),
        ]);
        assert!(matches!(
            next_action(&wedge(Some(("rebind", 1)), vec![]), &j, "b1", false),
            ExecutorStep::ReportFinished { .. }
        ));
    }

    #[test]
    fn interrupted_action_is_reported_not_repeated() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "rebind", "b1"),
            rec(Stage::Acting, "rebind", "b1"),
        ]);
        let w = wedge(Some(("rebind", 1)), vec![result(AttemptOutcome::Started)]);
        assert_eq!(
            next_action(&w, &j, "b1", false),
            ExecutorStep::ReportInterrupted {
                attempt: 1,
                method: "rebind".into()
            }
        );
        let (_t2, empty) = journal(vec![]);
        assert_eq!(
            next_action(&w, &empty, "b1", false),
            ExecutorStep::ReportInterrupted {
                attempt: 1,
                method: "rebind".into()
            }
        );
    }

    #[test]
    fn gate_not_passed_resumes_the_gate() {
        let (_t, j) = journal(vec![rec(Stage::Started, "rebind", "b1")]);
        let w = wedge(Some(("rebind", 1)), vec![result(AttemptOutcome::Blocked)]);
        assert_eq!(
            next_action(&w, &j, "b1", false),
            ExecutorStep::ResumeGate {
                attempt: 1,
                method: "rebind".into()
            }
        );
    }

    #[test]
    fn reboot_is_proven_by_a_new_boot_id() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "reboot", "b1"),
            rec(Stage::Acting, "reboot", "b1"),
        ]);
        let w = wedge(Some(("reboot", 1)), vec![]);
        assert_eq!(
            next_action(&w, &j, "b2", false),
            ExecutorStep::VerifyAfterReboot {
                attempt: 1,
                started_boot_id: "b1".into()
            }
        );
        assert_eq!(
            next_action(&w, &j, "b1", false),
            ExecutorStep::ReportInterrupted {
                attempt: 1,
                method: "reboot".into()
            }
        );
    }

    #[test]
    fn the_process_that_asked_for_the_reboot_waits_for_it() {
        let (_t, j) = journal(vec![
            rec(Stage::Started, "reboot", "b1"),
            rec(Stage::Acting, "reboot", "b1"),
        ]);
        let w = wedge(Some(("reboot", 1)), vec![]);
        assert_eq!(
            next_action(&w, &j, "b1", true),
            ExecutorStep::AwaitingReboot { attempt: 1 }
        );
        assert_eq!(
            next_action(&w, &j, "b2", true),
            ExecutorStep::VerifyAfterReboot {
                attempt: 1,
                started_boot_id: "b1".into()
            }
        );
    }

    #[test]
    fn a_torn_journal_line_is_skipped() {
        let t = tempfile::tempdir().unwrap();
        let mut j = Journal::open(t.path()).unwrap();
        j.append(rec(Stage::Started, "rebind", "b1")).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(t.path().join("attempts.jsonl"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"wedge\":\"x\",\"ui").unwrap();
        let j = Journal::open(t.path()).unwrap();
        assert!(j.of("uid-1", 1).started.is_some());
    }
}
