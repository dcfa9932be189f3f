//! The admission pass: the wedges waiting for a place, first come first, admitted in one pass
//! over the watch cache, and each one's admission and cordon made at once, concurrently
//! (docs/design.md §4, "The admission pass").
//!
//! In a storm the controller's queue holds a first look at every new wedge; the few that a
//! policy's budget can take would wait their turn behind all of them. The pass looks at the
//! cache instead, whenever a waiting wedge or a policy changes: it walks the waiting wedges
//! (Detected with the agent's report, or Queued) in arrival order, decides on each as its
//! reconcile would, and keeps those whose decision is a first admission that fits the policy's
//! cached ledger with the places this pass already handed out. Those are then reconciled
//! concurrently ([`CONCURRENCY`]), outside the controller's permits: their ledger changes meet
//! in the ledger's group commit (one write for many), and each admitted wedge's cordon follows
//! its admission in the same step. The ledger's compare-and-swap stays the judge: a wedge the
//! cache let through that does not fit is queued by it, as in its own reconcile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use unwedge_crds::{Admission, GpuWedge, Phase, RecoveryPolicy};

use super::inputs::Loaded;
use super::{Ctx, decide_and_act, open};
use crate::budget::{self, Limits};
use crate::decide::{self, Governance, Step};
use crate::policy_match::{self, Governing};

/// Admitted wedges acted for at once by one pass.
pub const CONCURRENCY: usize = 32;

/// Wedges one pass admits at most (the next pass takes the rest).
const PER_PASS: usize = 128;

/// How long a pass waits after being woken, so that a burst of arrivals is taken in one pass.
const GATHER: Duration = Duration::from_millis(20);

/// How often a pass runs without being woken (a safety net: every change wakes it).
const EVERY: Duration = Duration::from_secs(10);

/// Whether `w` waits for a place as the pass sees it: open, Detected or Queued, and not in the
/// first moments before its agent's report ([`decide::awaits_report`]).
pub fn waits(w: &GpuWedge, now: Timestamp) -> bool {
    let phase = w.status.as_ref().and_then(|s| s.phase).unwrap_or_default();
    open(w)
        && matches!(phase, Phase::Detected | Phase::Queued)
        && decide::awaits_report(w, now).is_none()
}

/// The waiting wedges ([`waits`]) in the order they are admitted: by arrival, then name.
pub fn in_order(all: &[Arc<GpuWedge>], now: Timestamp) -> Vec<Arc<GpuWedge>> {
    let mut out: Vec<Arc<GpuWedge>> = all.iter().filter(|w| waits(w, now)).cloned().collect();
    out.sort_by_cached_key(|w| (decide::arrived(w), w.name_any()));
    out
}

/// A policy as this pass hands out its places: the cached ledger and the places given so far.
struct Book {
    ledger: Vec<Admission>,
    limits: Limits,
    full: bool,
}

/// Runs passes while this replica leads, whenever `wake` is notified (and every [`EVERY`]),
/// until `shutdown` turns true. A wedge whose reconcile in the pass failed is handed to the
/// controller (`retry`), which retries it with its backoff.
pub async fn run(
    ctx: Arc<Ctx>,
    retry: futures::channel::mpsc::UnboundedSender<ObjectRef<GpuWedge>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut leader = ctx.leader.clone();
    let mut passes = Passes::default();
    loop {
        tokio::select! {
            _ = ctx.admission.notified() => {}
            // The leader election is gone: the process is stopping.
            changed = leader.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if !*ctx.leader.borrow() {
            continue;
        }
        tokio::time::sleep(GATHER).await;
        passes.pass(&ctx, &retry).await;
    }
}

/// What passes remember of each other: the policies found full, with the resourceVersion they
/// were full at. A storm's hundreds of waiting wedges wake the pass at each of their writes;
/// while a full policy is unchanged, its wedges are passed over without a decision.
#[derive(Default)]
pub struct Passes {
    full: HashMap<String, String>,
}

impl Passes {
    /// One pass: admits (and cordons for) the waiting wedges that fit, first come first.
    /// Returns how many wedges it acted for.
    pub async fn pass(
        &mut self,
        ctx: &Arc<Ctx>,
        retry: &futures::channel::mpsc::UnboundedSender<ObjectRef<GpuWedge>>,
    ) -> usize {
        let started = std::time::Instant::now();
        let now = Timestamp::now();
        let waiting = in_order(&ctx.wedges.state(), now);
        let policies: Vec<RecoveryPolicy> =
            ctx.policies.state().iter().map(|p| (**p).clone()).collect();
        let version = |name: &str| {
            policies
                .iter()
                .find(|p| p.name_any() == name)
                .and_then(|p| p.resource_version())
        };
        self.full
            .retain(|name, rv| version(name).as_deref() == Some(rv.as_str()));
        let mut books: HashMap<String, Book> = HashMap::new();
        let mut chosen = Vec::new();
        let mut decided = 0usize;
        for w in &waiting {
            if chosen.len() >= PER_PASS {
                break;
            }
            let w = ctx.newest_wedge(w.clone());
            if !waits(&w, now) {
                continue;
            }
            let name = w.name_any();
            let labels = ctx
                .node(&w.spec.node_name)
                .map(|n| n.labels().clone())
                .unwrap_or_default();
            let Governing::Policy(pname) = policy_match::for_wedge(&policies, &labels, &name)
            else {
                continue;
            };
            if self.full.contains_key(&pname) || books.get(&pname).is_some_and(|b| b.full) {
                continue;
            }
            let Some(turn) = ctx.turns.try_take(&name) else {
                continue;
            };
            let loaded = match Loaded::load(ctx, &w).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(wedge = %name, error = %e, "admission pass: cannot load; left to its reconcile");
                    continue;
                }
            };
            decided += 1;
            let input = loaded.input(&w, &ctx.identity);
            let d = decide::decide(&input);
            let Governance::Policy(pv) = &input.policy else {
                continue;
            };
            let book = books.entry(pv.name.to_string()).or_insert_with(|| Book {
                ledger: pv.ledger.to_vec(),
                limits: pv.limits,
                full: false,
            });
            match &d.step {
                Step::Admit {
                    candidate,
                    reclaim: false,
                } => match budget::admit(&book.ledger, candidate, &book.limits, &[]) {
                    Ok(next) => {
                        book.ledger = next;
                        chosen.push((w, turn));
                    }
                    Err(_) => book.full = true,
                },
                // Queued on the cached ledger: the later wedges of the policy wait too.
                _ if d.status.phase == Some(Phase::Queued) => book.full = true,
                _ => {}
            }
        }
        for (name, book) in &books {
            if let (true, Some(rv)) = (book.full, version(name)) {
                self.full.insert(name.clone(), rv);
            }
        }
        let acted = chosen.len();
        let chose_ms = started.elapsed().as_millis() as u64;
        futures::stream::iter(chosen)
            .for_each_concurrent(CONCURRENCY, |(w, turn)| async move {
                let name = w.name_any();
                let r = decide_and_act(ctx, w.clone(), 0).await;
                drop(turn);
                if let Err(e) = r {
                    tracing::warn!(wedge = %name, error = %e, "admission pass: reconcile failed; handed to the controller");
                    let _ = retry.unbounded_send(ObjectRef::from_obj(&*w));
                }
            })
            .await;
        if decided > 0 {
            tracing::debug!(
                waiting = waiting.len(),
                decided,
                acted,
                chose_ms,
                took_ms = started.elapsed().as_millis() as u64,
                "admission pass"
            );
        }
        acted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use unwedge_crds::GpuWedgeStatus;

    fn wedge(name: &str, created: &str, phase: Option<Phase>, reported: bool) -> Arc<GpuWedge> {
        let mut w = GpuWedge::new(
            name,
            serde_json::from_value(serde_json::json!({
                "nodeName": format!("n-{name}"),
                "device": {"pciAddress": "0000:03:00.0", "driver": "xe"},
                "methods": ["rebind"],
                "detectedAt": created,
            }))
            .unwrap(),
        );
        w.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        if reported || phase.is_some() {
            w.status = Some(GpuWedgeStatus {
                phase,
                ..Default::default()
            });
        }
        Arc::new(w)
    }

    #[test]
    fn waiting_wedges_are_taken_first_come_first() {
        let now: Timestamp = "2026-12-06T10:00:30Z".parse().unwrap();
        let all = vec![
            wedge("c", "2026-12-06T10:00:03Z", None, true),
            wedge("a", "2026-12-06T10:00:01Z", Some(Phase::Queued), true),
            wedge("b", "2026-12-06T10:00:02Z", Some(Phase::Detected), true),
            // The same second: by name.
            wedge("b2", "2026-12-06T10:00:02Z", None, true),
        ];
        let names: Vec<String> = in_order(&all, now).iter().map(|w| w.name_any()).collect();
        assert_eq!(names, ["a", "b", "b2", "c"]);
    }

    #[test]
    fn admitted_finished_and_unreported_wedges_do_not_wait() {
        let now: Timestamp = "2026-12-06T10:00:30Z".parse().unwrap();
        let all = vec![
            wedge(
                "cordoned",
                "2026-12-06T10:00:01Z",
                Some(Phase::Cordoned),
                true,
            ),
            wedge(
                "recovered",
                "2026-12-06T10:00:01Z",
                Some(Phase::Recovered),
                true,
            ),
            // Created a second ago, no report yet: its agent's report wakes it.
            wedge("fresh", "2026-12-06T10:00:29Z", None, false),
            // Past the grace without a report: decided on what it has.
            wedge("silent", "2026-12-06T10:00:01Z", None, false),
        ];
        let names: Vec<String> = in_order(&all, now).iter().map(|w| w.name_any()).collect();
        assert_eq!(names, ["silent"]);
    }
}
