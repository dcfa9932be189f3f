//! From a detected wedge to a `GpuWedge` in the API: the deterministic name and labels, the
//! object, the agent part of its status, and the "one open incident per device" rule.
//!
//! The decisions ([`plan()`], [`build_wedge`], [`is_open`], ...) are pure functions over values
//! (`reporter/plan.rs`); the detection and its names are in `reporter/detection.rs`; the
//! wedges it decides from come from the agent's watch ([`WedgeView`], `reporter/view.rs`) or,
//! without one or when a write finds the watch behind, from a LIST. The `Reporter` here only
//! lists, creates and merge-patches. It never writes operator fields.

mod detection;
mod plan;
mod view;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use unwedge_crds::{GpuWedge, PodRef};

pub use detection::{
    BlamedTask, DetectedWedge, Source, bdf_from_devpath, device_selector, is_bdf, wedge_labels,
    wedge_name,
};
pub use plan::{
    ReportPlan, agent_status_patch, agent_status_patch_as, api_methods, build_wedge, events_patch,
    is_open, no_driver_note, plan, push_event,
};
pub use view::{Known, WedgeView, revision};

/// Errors while reporting. The outbox retries the transient ones and sets the others aside.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The API server refused or could not be reached.
    #[error("API request for GpuWedge {name}: {source}")]
    Api {
        /// The wedge concerned.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The detection cannot be expressed as a GpuWedge (e.g. no PCI address); retrying won't help.
    #[error("cannot report wedge: {0}")]
    Unreportable(String),
}

/// HTTP statuses with which the API server refuses a request for good: the same request
/// fails the same way however often it is sent (400 Bad Request, 413 Request Entity Too
/// Large, 415, 422 Invalid). Everything else (no connection, 401/403 while RBAC is fixed,
/// 404/409 races, 429, 5xx) may pass later.
pub const PERMANENT_STATUSES: [u16; 4] = [400, 413, 415, 422];

impl ReportError {
    /// Whether retrying later can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReportError::Api { source, .. } => {
                !matches!(source, kube::Error::Api(s) if PERMANENT_STATUSES.contains(&s.code))
            }
            ReportError::Unreportable(_) => false,
        }
    }
}

/// How a report ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// A new GpuWedge.
    Created(String),
    /// A new event on an open incident.
    Appended(String),
    /// Nothing new: the API already had it.
    AlreadyRecorded(String),
}

/// Writes detections to the API as this node.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    node: String,
    dry_run: bool,
    view: Option<WedgeView>,
}

/// How many times one report decides again from a fresh LIST after a write found that what it
/// decided from was out of date; then the outbox retries it later.
const FRESH_ATTEMPTS: usize = 3;

/// A write refused because the wedges it was decided from were out of date.
enum Outcome {
    Done(Reported),
    Stale(ReportError),
}

impl Reporter {
    /// A reporter for `node` of an agent that acts (not `--dry-run`).
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
            dry_run: false,
            view: None,
        }
    }

    /// This reporter, deciding from `view` (the agent's watch of its node's wedges) instead of
    /// a LIST per report, as long as its writes find it current.
    pub fn watching(mut self, view: WedgeView) -> Self {
        self.view = Some(view);
        self
    }

    /// This reporter, saying in each new wedge's `status.agentDryRun` whether the agent runs
    /// with `--dry-run`.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Reports one detection: creates the wedge or appends to the open incident.
    pub async fn report(&self, d: &DetectedWedge) -> Result<Reported, ReportError> {
        if !is_bdf(&d.device.pci_address) {
            return Err(ReportError::Unreportable(format!(
                "no PCI address for the device (got {:?}); uevent {:?}",
                d.device.pci_address, d.uevent
            )));
        }
        let api: Api<GpuWedge> = Api::all(self.client.clone());
        let pci = &d.device.pci_address;
        let cached = self.view.as_ref().and_then(|v| v.device(&self.node, pci));
        if let Some(existing) = cached {
            match self.apply(&api, d, &existing, true).await? {
                Outcome::Done(r) => return Ok(r),
                Outcome::Stale(e) => {
                    tracing::debug!(error = %e, "the watch of this node's wedges was behind; deciding from a LIST")
                }
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let existing = self.list_device(&api, d).await?;
            match self.apply(&api, d, &existing, false).await? {
                Outcome::Done(r) => return Ok(r),
                Outcome::Stale(e) if attempt >= FRESH_ATTEMPTS => return Err(e),
                Outcome::Stale(_) => {}
            }
        }
    }

    /// The wedges of the detection's device, fresh from the API (recorded in the view).
    async fn list_device(
        &self,
        api: &Api<GpuWedge>,
        d: &DetectedWedge,
    ) -> Result<Vec<GpuWedge>, ReportError> {
        let pci = &d.device.pci_address;
        let lp = ListParams::default().labels(&device_selector(&self.node, pci));
        let list = api.list(&lp).await.map_err(|source| ReportError::Api {
            name: d.name(),
            source,
        })?;
        if let Some(v) = &self.view {
            let rv = list.metadata.resource_version.as_deref();
            v.listed(
                &self.node,
                pci,
                &list.items,
                rv.and_then(|r| r.parse().ok()),
            );
        }
        Ok(list.items)
    }

    /// Carries out the plan for `d` over `existing`. With `cached` (wedges from the watch),
    /// every outcome the watch could have got wrong comes back `Stale`: a create that finds
    /// the name taken, an append whose resourceVersion moved on (409) or whose wedge is gone
    /// (404), a completion of a wedge that is gone, and "already recorded" (nothing is written
    /// that could tell).
    async fn apply(
        &self,
        api: &Api<GpuWedge>,
        d: &DetectedWedge,
        existing: &[GpuWedge],
        cached: bool,
    ) -> Result<Outcome, ReportError> {
        let api_err = |name: &str| {
            let name = name.to_string();
            move |source| ReportError::Api { name, source }
        };
        let stale = |name: &str, source: kube::Error| {
            Ok(Outcome::Stale(ReportError::Api {
                name: name.to_string(),
                source,
            }))
        };
        match plan(d, existing) {
            ReportPlan::AlreadyRecorded { name } if cached => stale(
                &name,
                kube::Error::Service("already recorded, by the watch: confirming".into()),
            ),
            ReportPlan::AlreadyRecorded { name } => {
                Ok(Outcome::Done(Reported::AlreadyRecorded(name)))
            }
            ReportPlan::AppendEvent {
                name,
                events,
                dropped,
            } => {
                let mut patch = events_patch(&events, dropped);
                let read = existing
                    .iter()
                    .find(|w| w.name_any() == name)
                    .and_then(|w| w.metadata.resource_version.clone());
                if let Some(rv) = read {
                    patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
                }
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    Ok(w) => {
                        self.saw(&w);
                        Ok(Outcome::Done(Reported::Appended(name)))
                    }
                    Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {
                        stale(&name, kube::Error::Api(s))
                    }
                    Err(e) => Err(api_err(&name)(e)),
                }
            }
            ReportPlan::PatchStatus { name } => {
                match self.patch_agent_status(api, &name, d).await {
                    Ok(()) => Ok(Outcome::Done(Reported::Created(name))),
                    Err(ReportError::Api {
                        source: kube::Error::Api(s),
                        ..
                    }) if s.is_not_found() => stale(&name, kube::Error::Api(s)),
                    Err(e) => Err(e),
                }
            }
            ReportPlan::Create { name } => {
                let pod = match d.blamed.as_ref().and_then(|b| b.pod_uid.as_deref()) {
                    Some(uid) => self.pod_by_uid(uid).await,
                    None => None,
                };
                let wedge = build_wedge(d, &name, pod);
                match api.create(&PostParams::default(), &wedge).await {
                    Ok(w) => self.saw(&w),
                    Err(kube::Error::Api(s)) if s.is_already_exists() && cached => {
                        return stale(&name, kube::Error::Api(s));
                    }
                    Err(kube::Error::Api(s)) if s.is_already_exists() => {
                        tracing::info!(wedge = %name, "GpuWedge already exists (replay); completing its status");
                    }
                    Err(e) => return Err(api_err(&name)(e)),
                }
                self.patch_agent_status(api, &name, d).await?;
                Ok(Outcome::Done(Reported::Created(name)))
            }
        }
    }

    fn saw(&self, w: &GpuWedge) {
        if let Some(v) = &self.view {
            v.saw(w);
        }
    }

    async fn patch_agent_status(
        &self,
        api: &Api<GpuWedge>,
        name: &str,
        d: &DetectedWedge,
    ) -> Result<(), ReportError> {
        let w = api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(agent_status_patch_as(d, self.dry_run)),
            )
            .await
            .map_err(|source| ReportError::Api {
                name: name.to_string(),
                source,
            })?;
        self.saw(&w);
        Ok(())
    }

    /// The pod on this node with metadata.uid == `uid`, if the agent may list pods.
    async fn pod_by_uid(&self, uid: &str) -> Option<PodRef> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.node));
        match pods.list(&lp).await {
            Ok(list) => list
                .items
                .into_iter()
                .find(|p| p.metadata.uid.as_deref() == Some(uid))
                .map(|p| PodRef {
                    namespace: p.namespace().unwrap_or_default(),
                    name: p.name_any(),
                    container: None,
                }),
            Err(e) => {
                tracing::warn!(error = %e, pod_uid = uid, "cannot list this node's pods to name the blamed pod; reporting without it");
                None
            }
        }
    }
}
