//! Where the executor reads and writes GpuWedges: the [`WedgeStore`] trait (an in-memory one
//! in tests) and [`KubeStore`], the API server. The executor writes only the agent's own status
//! fields, `status.attempts` and `status.agentMessage`, each by merge patch.

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use unwedge_crds::{AttemptResult, GpuWedge};

/// Where the executor reads and writes GpuWedges (the API in production).
pub trait WedgeStore: Send + Sync {
    /// The current object, fresh from the source of truth.
    fn get(
        &self,
        name: &str,
    ) -> impl std::future::Future<Output = Result<Option<GpuWedge>, kube::Error>> + Send;
    /// Replaces `status.attempts` (the agent's own array) by merge patch.
    fn patch_attempts(
        &self,
        name: &str,
        attempts: &[AttemptResult],
    ) -> impl std::future::Future<Output = Result<(), kube::Error>> + Send;
    /// Replaces `status.agentMessage` (the agent's own field) by merge patch.
    fn patch_agent_message(
        &self,
        name: &str,
        message: &str,
    ) -> impl std::future::Future<Output = Result<(), kube::Error>> + Send;
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

    /// Merge-patches `{"status": status}` onto the wedge `name`.
    async fn merge_status(&self, name: &str, status: Value) -> Result<(), kube::Error> {
        let patch = json!({ "status": status });
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(|_| ())
    }
}

impl WedgeStore for KubeStore {
    async fn get(&self, name: &str) -> Result<Option<GpuWedge>, kube::Error> {
        self.api.get_opt(name).await
    }

    async fn patch_attempts(
        &self,
        name: &str,
        attempts: &[AttemptResult],
    ) -> Result<(), kube::Error> {
        self.merge_status(name, json!({ "attempts": attempts }))
            .await
    }

    async fn patch_agent_message(&self, name: &str, message: &str) -> Result<(), kube::Error> {
        self.merge_status(name, json!({ "agentMessage": message }))
            .await
    }
}
