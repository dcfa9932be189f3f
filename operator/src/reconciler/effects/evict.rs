//! The Evict and ForceDelete effects: the drain's pods go through the Eviction API (or are
//! deleted at the drain timeout with drain.force); each eviction is recorded on the wedge.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use unwedge_crds::{Eviction, PodRef};

use super::Effect;
use crate::decide;
use crate::drain;
use crate::metrics;
use crate::reconciler::Error;

/// Evicts `pods` (deletes them with `force`), records what was evicted in
/// `status.evictions`, and backs off when evictions are refused.
pub(super) async fn evict(e: &Effect<'_>, pods: &[PodRef], force: bool) -> Result<Action, Error> {
    let (ctx, w, name) = (e.ctx, e.w, &e.name);
    let grace = e.settings().and_then(|s| s.grace_period_seconds);
    let mut records: Vec<Eviction> = e.status.evictions.clone().unwrap_or_default();
    let mut refused = Vec::new();
    for p in pods {
        ctx.ensure_leader()?;
        let out = if force {
            drain::force_delete(&ctx.client, p, grace).await
        } else {
            drain::evict(&ctx.client, p, grace).await
        };
        ctx.metrics
            .evictions
            .get_or_create(&metrics::EvictionResult {
                result: out.metric().into(),
            })
            .inc();
        match (&out, out.recorded()) {
            (_, Some(result)) => records.push(Eviction {
                namespace: p.namespace.clone(),
                pod: p.name.clone(),
                at: Time(Timestamp::now()),
                result: result.into(),
            }),
            (drain::Outcome::Refused(m), _) | (drain::Outcome::Failed(m), _) => {
                refused.push(format!("{}/{}: {m}", p.namespace, p.name))
            }
            _ => {}
        }
    }
    if records.len() != e.status.evictions.as_ref().map_or(0, Vec::len) {
        // Only the evictions array: a plain merge patch, no resourceVersion (the
        // status was just written and the agent may have written since).
        let body = json!({"status": {"evictions": records}});
        ctx.wedge_api()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await?;
    }
    if !refused.is_empty() {
        tracing::info!(refused = ?refused, "evictions refused; backing off");
        ctx.event(
            &w.object_ref(&()),
            &decide::Note {
                warning: true,
                reason: "EvictionRefused".into(),
                message: refused.join("; "),
            },
        );
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}
