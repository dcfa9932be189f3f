//! Method `restart`: a `none` wedge's containers restarted in place (docs/design.md §4 "none").
//! Cleared by the guard like any approval (this agent detected the wedge), journaled as Acting
//! before the first stop (an agent restart mid-way reports the attempt interrupted and never
//! stops anything twice), carried out by [`crate::restart`], and finished with one record per
//! container, in the journal and in the status in one write.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use unwedge_crds::{AttemptOutcome, ContainerRestart, GpuWedge, Method, RestartResult};

use super::Executor;
use super::error::ExecutorError;
use super::journal::{JournalRecord, Stage};
use super::store::WedgeStore;
use crate::cri::{CALL_TIMEOUT, CriClient};
use crate::host::HostActions;
use crate::restart::{self, Allowed};

/// Lists, for a PCI address, the containers the kubelet reports holding it now (PodResources):
/// `(namespace, pod, container)`.
#[derive(Clone)]
pub struct ConsumersCheck(pub Arc<dyn Fn(String) -> ConsumersAnswer + Send + Sync>);

/// The answer of a [`ConsumersCheck`], to be awaited (empty when the kubelet cannot be asked).
pub type ConsumersAnswer =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<(String, String, String)>> + Send>>;

impl std::fmt::Debug for ConsumersCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsumersCheck")
    }
}

/// How in-place restarts are carried out on this node.
#[derive(Clone, Debug)]
pub struct RestartConfig {
    /// The runtime's CRI socket (`--cri-socket`).
    pub socket: PathBuf,
    /// `--restart-grace`: how long a stopped container may take to exit.
    pub grace: Duration,
    /// `--restart-timeout`: how long the kubelet has to run it again.
    pub timeout: Duration,
    /// Who holds the device now.
    pub consumers: ConsumersCheck,
}

impl<H: HostActions + 'static, S: WedgeStore> Executor<H, S> {
    /// Carries out an approved `restart` (Started is already reported).
    pub(super) async fn restart_in_place(
        &self,
        wedge: &GpuWedge,
        attempt: u32,
        boot_id: &str,
        started_at: Timestamp,
    ) -> Result<(), ExecutorError> {
        let method = Method::Restart.as_str();
        let targets = wedge
            .status
            .as_ref()
            .and_then(|s| s.approval.as_ref())
            .and_then(|a| a.containers.clone())
            .unwrap_or_default();
        if self.cfg.dry_run {
            let list: Vec<String> = targets
                .iter()
                .map(|t| format!("{}/{}/{}", t.namespace, t.pod, t.container))
                .collect();
            let outcome = (
                AttemptOutcome::DryRun,
                format!("dry-run: would restart {} in place", list.join(", ")),
            );
            return self
                .finish(wedge, attempt, method, boot_id, outcome, None)
                .await;
        }
        let Some(rc) = self.cfg.restarts.clone() else {
            let outcome = (
                AttemptOutcome::Failed,
                "in-place restarts are not configured on this agent".to_string(),
            );
            return self
                .finish(wedge, attempt, method, boot_id, outcome, None)
                .await;
        };
        let allowed = Allowed {
            consumers: (rc.consumers.0)(wedge.spec.device.pci_address.clone()).await,
            blamed_container_id: wedge
                .spec
                .blamed
                .as_ref()
                .and_then(|b| b.container_id.clone()),
        };
        self.journal_acting(wedge, attempt, method, boot_id, None)?;
        let restarts = match CriClient::connect(&rc.socket, CALL_TIMEOUT).await {
            Ok(cri) => restart::restart_all(&cri, &targets, &allowed, rc.grace, rc.timeout).await,
            Err(e) => targets
                .iter()
                .map(|t| ContainerRestart {
                    namespace: t.namespace.clone(),
                    pod: t.pod.clone(),
                    container: t.container.clone(),
                    result: RestartResult::Fallback,
                    old_restart_count: None,
                    new_restart_count: None,
                    millis_to_running: None,
                    message: e.to_string(),
                })
                .collect(),
        };
        let all = restarts.iter().all(|r| r.result != RestartResult::Fallback);
        let result = if all {
            AttemptOutcome::Succeeded
        } else {
            AttemptOutcome::Failed
        };
        let message = restart::summary(&restarts);
        tracing::info!(result = ?result, message = %message, "attempt finished");
        self.append(JournalRecord {
            result: Some(result),
            message: Some(message.clone()),
            restarts: Some(restarts.clone()),
            ..JournalRecord::new(wedge, attempt, method, Stage::Finished, boot_id)
        })?;
        let mut entry = Self::entry(attempt, method, result, started_at, boot_id, message, None);
        entry.restarts = Some(restarts);
        self.report(&wedge.name_any(), entry).await
    }
}
