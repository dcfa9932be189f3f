//! Warning Events on this agent's Node, for what a human must see and no GpuWedge can carry
//! (lost uevents, detections the API refused for good). `kubectl describe node` shows them.
//!
//! The agent may only create Events (chart `rbac-agent.yaml`: no `patch`, no `nodes/status`,
//! so no node condition and no event series): each Event is a new object in `default`, the
//! namespace of cluster-scoped objects' Events, regarding the Node with its name as uid (as the
//! kubelet does, which is what `kubectl describe node` looks up). [`RateLimit`] keeps a storm
//! from flooding the API.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The `reportingController` of the agent's Events.
pub const CONTROLLER: &str = "unwedge.io/agent";

/// The Event `reason` when uevents were lost (netlink ENOBUFS).
pub const REASON_UEVENTS_LOST: &str = "GpuUeventsLost";

/// The Event `reason` when outbox entries were set aside (see [`crate::outbox`]).
pub const REASON_REPORT_REJECTED: &str = "GpuWedgeReportRejected";

/// The Event for `node`, with `reason`, `action` and `note` (cut to the API's 1 KiB).
pub fn warning(node: &str, reason: &str, action: &str, note: &str, now: jiff::Timestamp) -> Event {
    let mut note = note.to_string();
    if note.len() > 1024 {
        let mut cut = 1021;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{node}.{}.{:x}",
                reason.to_ascii_lowercase(),
                now.as_nanosecond()
            )),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(reason.into()),
        action: Some(action.into()),
        note: Some(note),
        regarding: Some(ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            uid: Some(node.into()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(CONTROLLER.into()),
        reporting_instance: Some(format!("{CONTROLLER}-{node}")),
        ..Event::default()
    }
}

/// Creates `event`; a failure (e.g. no RBAC for Events) is logged, never fatal.
pub async fn publish(client: &Client, event: &Event) {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    if let Err(e) = api.create(&PostParams::default(), event).await {
        tracing::warn!(error = %e, reason = ?event.reason, "cannot create the node Event (does the agent's ClusterRole allow creating events.k8s.io Events?); the log and metrics still say it");
    }
}

/// At most one Event per `every`.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
}

impl RateLimit {
    /// A limit of one per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Whether one may be sent at `now` (and, if so, records it as sent).
    pub fn allow(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_regards_the_node_the_way_describe_finds_it() {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let e = warning(
            "node-a",
            REASON_UEVENTS_LOST,
            "Rescan",
            &"x".repeat(2000),
            now,
        );
        let r = e.regarding.unwrap();
        assert_eq!(
            (r.kind.as_deref(), r.name.as_deref(), r.uid.as_deref()),
            (Some("Node"), Some("node-a"), Some("node-a"))
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("default"));
        assert!(e.note.unwrap().len() <= 1024);
        assert!(
            e.metadata
                .name
                .unwrap()
                .starts_with("node-a.gpuueventslost.")
        );
    }

    #[test]
    fn a_storm_sends_one_event_per_interval() {
        let mut limit = RateLimit::new(Duration::from_secs(300));
        let t0 = Instant::now();
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0 + Duration::from_secs(10)));
        assert!(limit.allow(t0 + Duration::from_secs(301)));
    }
}
