//! What must hold before the host is touched, and what happens when it does not: the guard's
//! clearance on facts read from sysfs (a refused approval is journaled, reported and told to a
//! human), and the fd gate (no process holds a device of the reset domain).

use jiff::Timestamp;
use kube::ResourceExt;
use unwedge_crds::{AttemptOutcome, GpuWedge};

use super::error::ExecutorError;
use super::journal::wedge_key;
use super::plan::{gate_targets, with_note};
use super::store::WedgeStore;
use super::{Executor, Outcome};
use crate::fdgate;
use crate::guard::{self, Clearance, DeviceFacts, Refusal};
use crate::host::HostActions;

impl<H: HostActions + 'static, S: WedgeStore> Executor<H, S> {
    /// Whether `method` may be carried out on `wedge` now (see [`crate::guard`]): detected by
    /// this agent, and the device's facts read from sysfs.
    pub(super) fn clearance(&self, wedge: &GpuWedge, method: &str) -> Result<Clearance, Refusal> {
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
            tracing::info!(cr_driver = %spec.device.driver, sysfs_driver = ?facts.driver, "spec.device.driver differs from sysfs; the agent uses sysfs only");
        }
        guard::clear(wedge, method, detection.is_some(), &facts)
    }

    /// Journals and reports a refused approval (final: never retried) and tells a human in
    /// `status.agentMessage`. Nothing touched the host.
    pub(super) async fn refuse(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        boot_id: &str,
        refusal: Refusal,
    ) -> Result<(), ExecutorError> {
        let why = format!("refused {method} (attempt {attempt}): {refusal}");
        tracing::warn!("{why}");
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
            .await?;
        Ok(())
    }

    /// Waits until no process holds a device of the reset domain. `Some(outcome)` when the
    /// approval went away meanwhile (nothing was done).
    pub(super) async fn gate(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        method: &str,
        started_at: Timestamp,
        boot_id: &str,
    ) -> Result<Option<Outcome>, ExecutorError> {
        let (nodes, pcis) = gate_targets(wedge, method);
        let mut last_message = String::new();
        loop {
            let (proc_root, dev_root) = (self.cfg.proc_root.clone(), self.cfg.dev_root.clone());
            let (n, p) = (nodes.clone(), pcis.clone());
            let holders =
                tokio::task::spawn_blocking(move || fdgate::holders(&proc_root, &dev_root, &n, &p))
                    .await
                    .map_err(ExecutorError::GateScan)?;
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
                tracing::warn!("{message}");
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
}
