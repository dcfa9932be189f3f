//! The agent's first report: the agent creates a GpuWedge and reports on it (its consumers,
//! reset domain and `agentDryRun`) right after, in a status write of its own. A wedge without
//! any status waits for that report before anything is decided on it.

use std::time::Duration;

use jiff::Timestamp;
use unwedge_crds::GpuWedge;

use super::arrived;

/// How long a wedge waits for its agent's first report. Past it, the wedge is decided on as it
/// is (an agent that died between the create and the report).
pub const REPORT_GRACE: Duration = Duration::from_secs(10);

/// `Some(left)`: `w` has no status yet and arrived less than [`REPORT_GRACE`] before `now`, so
/// it waits (at most `left`) for its agent's first report, whose write wakes it. Deciding on it
/// before would write a status that loses to the report (the write tests that there is still
/// none) and read it again.
pub fn awaits_report(w: &GpuWedge, now: Timestamp) -> Option<Duration> {
    if w.status.is_some() || w.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let age = now.duration_since(arrived(w));
    let left = jiff::SignedDuration::try_from(REPORT_GRACE).ok()? - age;
    Duration::try_from(left).ok().filter(|d| !d.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::GpuWedgeStatus;

    fn wedge(created: &str) -> GpuWedge {
        let mut w = GpuWedge::new(
            "w",
            serde_json::from_value(serde_json::json!({
                "nodeName": "n",
                "device": {"pciAddress": "0000:03:00.0", "driver": "xe"},
                "methods": ["rebind"],
                "detectedAt": created,
            }))
            .unwrap(),
        );
        w.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        w
    }

    #[test]
    fn a_new_wedge_without_a_report_waits_for_it_within_the_grace() {
        let w = wedge("2026-12-06T06:00:00Z");
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(
            awaits_report(&w, at("2026-12-06T06:00:03Z")),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            awaits_report(&w, at("2026-12-06T06:00:10Z")),
            None,
            "grace over"
        );
        assert_eq!(awaits_report(&w, at("2026-12-06T06:05:00Z")), None);
    }

    #[test]
    fn a_reported_or_deleted_wedge_does_not_wait() {
        let now = "2026-12-06T06:00:01Z".parse().unwrap();
        let mut w = wedge("2026-12-06T06:00:00Z");
        w.status = Some(GpuWedgeStatus::default());
        assert_eq!(awaits_report(&w, now), None);
        let mut w = wedge("2026-12-06T06:00:00Z");
        w.metadata.deletion_timestamp = Some(Time(now));
        assert_eq!(awaits_report(&w, now), None);
    }
}
