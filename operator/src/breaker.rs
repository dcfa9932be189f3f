//! The circuit breaker: too many wedges across a policy's nodes in a window pause every
//! automatic action until a human resumes (annotation `unwedge.io/resume` on the policy).
//!
//! Pure. After a resume only wedges detected after the resume count, so a resumed storm does
//! not re-trip on the very wedges a human has just looked at.

use jiff::Timestamp;

use crate::settings::Window;

/// What the breaker state of a policy is, or should become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Closed: automatic actions run.
    Closed,
    /// Tripped earlier and not resumed: automatic actions wait.
    Tripped {
        /// When it tripped.
        since: Timestamp,
    },
    /// Trip now (record `circuitBreakerTrippedAt`).
    Trip {
        /// Wedges counted in the window.
        count: u32,
    },
    /// A human changed `unwedge.io/resume`: clear the trip and remember the value.
    Resume {
        /// The annotation value to record as `resumed`.
        value: String,
    },
}

impl Verdict {
    /// Whether automatic actions must wait under this verdict.
    pub fn holds(&self) -> bool {
        matches!(self, Verdict::Tripped { .. } | Verdict::Trip { .. })
    }
}

/// The breaker's input, as stored on the policy.
#[derive(Clone, Debug, Default)]
pub struct State<'a> {
    /// `status.circuitBreakerTrippedAt`.
    pub tripped_at: Option<Timestamp>,
    /// `status.resumed`: the resume annotation value last honoured.
    pub resumed: Option<&'a str>,
    /// The `unwedge.io/resume` annotation now.
    pub resume_annotation: Option<&'a str>,
    /// When the breaker was last resumed (wedges before it do not count).
    pub resumed_at: Option<Timestamp>,
}

/// Evaluates the breaker for wedges detected at `detections` (across the policy's nodes).
pub fn evaluate(
    threshold: Option<&Window>,
    state: &State,
    detections: &[Timestamp],
    now: Timestamp,
) -> Verdict {
    if let Some(since) = state.tripped_at {
        return match state.resume_annotation {
            Some(v) if Some(v) != state.resumed => Verdict::Resume {
                value: v.to_string(),
            },
            _ => Verdict::Tripped { since },
        };
    }
    let Some(t) = threshold else {
        return Verdict::Closed;
    };
    let window = jiff::SignedDuration::try_from(t.window).unwrap_or(jiff::SignedDuration::MAX);
    let from = now.checked_sub(window).unwrap_or(Timestamp::MIN);
    let count = detections
        .iter()
        .filter(|d| **d > from && **d <= now && state.resumed_at.is_none_or(|r| **d > r))
        .count() as u32;
    if count > t.count {
        Verdict::Trip { count }
    } else {
        Verdict::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn w(count: u32, secs: u64) -> Window {
        Window {
            count,
            window: Duration::from_secs(secs),
        }
    }

    #[test]
    fn trips_only_above_the_count_within_the_window() {
        let now = t(1000);
        let three = [t(900), t(950), t(999)];
        assert_eq!(
            evaluate(Some(&w(3, 3600)), &State::default(), &three, now),
            Verdict::Closed,
            "3 is not above 3"
        );
        let four = [t(900), t(950), t(999), t(1000)];
        assert_eq!(
            evaluate(Some(&w(3, 3600)), &State::default(), &four, now),
            Verdict::Trip { count: 4 }
        );
        assert_eq!(
            evaluate(Some(&w(3, 60)), &State::default(), &four, now),
            Verdict::Closed,
            "only 2 in the last minute"
        );
        assert_eq!(
            evaluate(None, &State::default(), &four, now),
            Verdict::Closed,
            "no breaker configured"
        );
    }

    #[test]
    fn stays_tripped_until_the_resume_annotation_changes() {
        let s = State {
            tripped_at: Some(t(5)),
            resumed: Some("a"),
            resume_annotation: Some("a"),
            resumed_at: None,
        };
        assert_eq!(
            evaluate(Some(&w(1, 60)), &s, &[], t(10)),
            Verdict::Tripped { since: t(5) }
        );
        let s = State {
            resume_annotation: Some("b"),
            ..s
        };
        assert_eq!(
            evaluate(Some(&w(1, 60)), &s, &[], t(10)),
            Verdict::Resume { value: "b".into() }
        );
        let s = State {
            tripped_at: Some(t(5)),
            ..Default::default()
        };
        assert!(
            evaluate(None, &s, &[], t(10)).holds(),
            "no annotation yet: still tripped"
        );
    }

    #[test]
    fn after_a_resume_only_newer_wedges_count() {
        let s = State {
            resumed_at: Some(t(100)),
            ..Default::default()
        };
        let storm = [t(90), t(91), t(92), t(93), t(101)];
        assert_eq!(
            evaluate(Some(&w(3, 3600)), &s, &storm, t(200)),
            Verdict::Closed
        );
    }
}
