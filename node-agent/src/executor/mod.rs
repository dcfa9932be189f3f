//! Carries out the recoveries the operator approved (docs/design.md §4).
//!
//! `next_action` decides, from the wedge, the local attempt journal and the boot id, what to
//! do; it is pure. `Executor` performs the step: journal first (fsync'd), then status, then the
//! fd gate, then the host action, then verification. The journal makes "at most once" hold
//! across restarts even when a status patch was lost (docs/design.md §4 invariant 2).
//!
//! The parts: [`plan`] decides (pure), [`journal`] remembers, [`store`] reads and writes the
//! wedge in the API, `clearance` checks before acting (the guard, the fd gate), `effects` acts
//! on the host and verifies, [`error`] says what can fail. This file holds the `Executor` and
//! the order of an attempt's steps; everything an attempt logs is in its `attempt` span
//! (wedge, method, attempt).
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
//!
//! `restart` (a `none` wedge's containers restarted in place, `in_place`) touches no device
//! and passes no fd gate: it stops the approved containers through the container runtime and
//! waits for the kubelet to run them again.

mod clearance;
mod effects;
pub mod error;
mod in_place;
pub mod journal;
pub mod plan;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use unwedge_crds::{AttemptOutcome, AttemptResult, GpuWedge, Method};

pub use error::{ActError, ExecutorError, VerifyError};
pub use in_place::{ConsumersAnswer, ConsumersCheck, RestartConfig};
pub use journal::{AttemptLog, Journal, JournalRecord, Stage, wedge_key};
pub use plan::{ExecutorStep, gate_targets, next_action, plan_text, upsert_attempt, with_note};
pub use store::{KubeStore, WedgeStore};

use crate::host::HostActions;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// The message of an attempt an agent restart cut while acting: reported `Failed`, never run
/// again (at most once). The chaos benchmark counts these by it.
pub const INTERRUPTED: &str = "agent restarted during the attempt; not re-executed";

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
    /// In-place restarts through the container runtime (None: not configured; every restart
    /// falls back to eviction).
    pub restarts: Option<in_place::RestartConfig>,
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
        match wedge.status.as_ref().and_then(|s| s.approval.as_ref()) {
            Some(approval) => {
                self.process_attempt(wedge, &approval.method, approval.attempt)
                    .await
            }
            None => ExecutorStep::Idle,
        }
    }

    /// [`Executor::process`] for the approved `attempt` of `wedge` with `method`; everything
    /// it logs carries the three in its span.
    #[tracing::instrument(name = "attempt", skip_all, fields(wedge = %wedge.name_any(), method = %method, attempt = attempt))]
    async fn process_attempt(&self, wedge: &GpuWedge, method: &str, attempt: u32) -> ExecutorStep {
        // Claim the attempt before deciding, so a decision is always made from a journal that
        // includes everything an earlier run of the same attempt wrote.
        let key = (wedge_key(wedge), attempt);
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
            tracing::error!(error = %e, "attempt step not completed; will retry on the next resync");
        }
        self.in_flight
            .lock()
            .expect("in-flight poisoned")
            .remove(&key);
        step
    }

    /// Journals `stage` of the attempt; `end` (stage Finished) is its outcome and whether the
    /// device plugin advertises the device again.
    fn journal(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        stage: Stage,
        boot_id: &str,
        end: Option<(&Outcome, Option<bool>)>,
    ) -> Result<(), ExecutorError> {
        self.append(JournalRecord {
            result: end.map(|(o, _)| o.0),
            message: end.map(|(o, _)| o.1.clone()),
            advertised: end.and_then(|(_, a)| a),
            ..JournalRecord::new(wedge, attempt, method, stage, boot_id)
        })
    }

    /// Journals the Acting stage with the driver read from sysfs.
    fn journal_acting(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        boot_id: &str,
        driver: Option<&str>,
    ) -> Result<(), ExecutorError> {
        self.append(JournalRecord {
            driver: driver.map(str::to_string),
            ..JournalRecord::new(wedge, attempt, method, Stage::Acting, boot_id)
        })
    }

    fn append(&self, rec: JournalRecord) -> Result<(), ExecutorError> {
        self.journal
            .lock()
            .expect("journal poisoned")
            .append(rec)
            .map_err(ExecutorError::Journal)
    }

    /// Upserts this attempt's entry in status.attempts, retrying for a while if the API is away.
    async fn report(&self, name: &str, entry: AttemptResult) -> Result<(), ExecutorError> {
        let mut last = None;
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
                        Err(e) => last = Some(e),
                    }
                }
                Ok(None) => return Err(ExecutorError::Gone(name.to_string())),
                Err(e) => last = Some(e),
            }
            self.metrics.api_errors.inc();
            tokio::time::sleep(Duration::from_millis(200) * (i + 1).min(10)).await;
        }
        Err(ExecutorError::Report {
            name: name.to_string(),
            source: last.expect("every failed try records its error"),
        })
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
    ) -> Result<(), ExecutorError> {
        let started_at = Self::started_at(wedge, attempt);
        tracing::info!(result = ?outcome.0, message = %outcome.1, ?advertised, "attempt finished");
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
    ) -> Result<(), ExecutorError> {
        let name = wedge.name_any();
        match step {
            ExecutorStep::Idle | ExecutorStep::AwaitingReboot { .. } => Ok(()),
            ExecutorStep::ReportFinished { record } => {
                tracing::info!("re-reporting a finished attempt whose status was lost");
                let outcome = (
                    record.result.unwrap_or(AttemptOutcome::Failed),
                    record.message.clone().unwrap_or_default(),
                );
                let mut entry = Self::entry(
                    record.attempt,
                    &record.method,
                    outcome.0,
                    Self::started_at(wedge, record.attempt),
                    &record.boot_id,
                    outcome.1,
                    record.advertised,
                );
                entry.restarts = record.restarts.clone();
                self.report(&name, entry).await
            }
            ExecutorStep::ReportInterrupted { attempt, method } => {
                tracing::warn!(
                    "attempt interrupted by an agent restart; reporting it, not re-executing"
                );
                let outcome = (AttemptOutcome::Failed, INTERRUPTED.to_string());
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
    ) -> Result<(), ExecutorError> {
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
        if method == Method::Restart.as_str() {
            return self
                .restart_in_place(wedge, attempt, boot_id, started_at)
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
        tracing::info!("acting: {}", plan_text(bdf, driver, method));
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
}
