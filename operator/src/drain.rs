//! Evictions through the Eviction API (policy/v1), so PodDisruptionBudgets hold.
//!
//! One call per pod; the decision core decides what to evict, when to give up and when to
//! force. A 429 means a PodDisruptionBudget refused: the caller backs off and asks again.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, EvictParams, PostParams};
use unwedge_crds::PodRef;

/// What became of one eviction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted: the pod is terminating.
    Evicted,
    /// Deleted outright (drain.force).
    Deleted,
    /// Already gone (404).
    Gone,
    /// Refused by a PodDisruptionBudget (429): try again later.
    Refused(String),
    /// Any other error.
    Failed(String),
}

impl Outcome {
    /// The word recorded in `status.evictions[].result`, for outcomes that are recorded.
    pub fn recorded(&self) -> Option<&'static str> {
        match self {
            Outcome::Evicted => Some("Evicted"),
            Outcome::Deleted => Some("Deleted"),
            Outcome::Gone => Some("Gone"),
            _ => None,
        }
    }

    /// A label for the evictions metric.
    pub fn metric(&self) -> &'static str {
        match self {
            Outcome::Evicted => "evicted",
            Outcome::Deleted => "deleted",
            Outcome::Gone => "gone",
            Outcome::Refused(_) => "refused",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Evicts one pod with the policy's grace period.
pub async fn evict(client: &kube::Client, pod: &PodRef, grace: Option<i64>) -> Outcome {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let params = EvictParams {
        delete_options: Some(DeleteParams {
            grace_period_seconds: grace.map(|g| g.max(0) as u32),
            ..Default::default()
        }),
        post_options: PostParams::default(),
    };
    match api.evict(&pod.name, &params).await {
        Ok(_) => Outcome::Evicted,
        Err(kube::Error::Api(s)) if s.is_not_found() => Outcome::Gone,
        Err(kube::Error::Api(s)) if s.code == 429 => Outcome::Refused(s.message.clone()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Deletes one pod (bypassing PodDisruptionBudgets; only when the policy says `drain.force`).
pub async fn force_delete(client: &kube::Client, pod: &PodRef, grace: Option<i64>) -> Outcome {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let params = DeleteParams {
        grace_period_seconds: grace.map(|g| g.max(0) as u32),
        ..Default::default()
    };
    match api.delete(&pod.name, &params).await {
        Ok(_) => Outcome::Deleted,
        Err(kube::Error::Api(s)) if s.is_not_found() => Outcome::Gone,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}
