//! The admission ledger on each RecoveryPolicy's status, changed only by compare-and-swap.
//!
//! Every write replaces the status guarded by a resourceVersion; a 409 re-reads and tries again,
//! so two operators (or one with a stale cache) never both take the last slot. The base of a
//! write is the object this process last wrote or read (one round trip per write instead of a GET
//! and a PUT); an answer that writes nothing ("no room", "already released") is only given from a
//! fresh GET, never from that remembered copy.
//!
//! Within this process the changes of one policy's ledger take turns (a lock per policy), and
//! admissions and releases are committed in groups: while one write is in flight the next ones
//! queue, and whoever takes the turn next applies every queued change, in arrival order, to one
//! copy of the status and writes it once. A storm's hundreds of admissions and releases thus cost
//! a few writes per round trip instead of two round trips each, in a queue of one.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use kube::api::{Api, PostParams};
use tokio::sync::oneshot;
use unwedge_crds::{RecoveryPolicy, RecoveryPolicyStatus};

use crate::budget::{self, Candidate, Limits, QueueReason};

/// A change of the ledger that can be committed together with others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Admit a wedge (or upgrade it to a reboot) if it fits.
    Admit {
        /// What the wedge asks.
        candidate: Candidate,
        /// The policy's limits as the reconcile resolved them.
        limits: Limits,
        /// The wedges that arrived earlier and wait for the same unit, as `(wedge, node)`.
        waiting_ahead: Vec<(String, String)>,
        /// Record a wedge that already holds its node whatever the budget says.
        reclaim: bool,
    },
    /// Remove a wedge from the ledger.
    Release {
        /// The wedge.
        wedge: String,
    },
}

/// What a [`Change`] came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The wedge is in the ledger.
    Admitted,
    /// The wedge waits, for this reason.
    Queued(QueueReason),
    /// The wedge is not in the ledger (any more).
    Released,
}

/// Applies one change to `st`; returns what it came to. Pure: what a group commit does to each
/// queued change, in order, before the one write.
pub fn apply(change: &Change, st: &mut RecoveryPolicyStatus) -> Outcome {
    match change {
        Change::Admit {
            candidate,
            reclaim: true,
            ..
        } => {
            st.admitted = budget::release(&st.admitted, &candidate.wedge);
            st.admitted.push(candidate.admission());
            Outcome::Admitted
        }
        Change::Admit {
            candidate,
            limits,
            waiting_ahead,
            reclaim: false,
        } => match budget::admit(&st.admitted, candidate, limits, waiting_ahead) {
            Ok(next) => {
                if next != st.admitted {
                    st.admitted = next;
                    st.summary = Some(budget::summary(&st.admitted, limits, waiting_ahead.len()));
                }
                Outcome::Admitted
            }
            Err(reason) => Outcome::Queued(reason),
        },
        Change::Release { wedge } => {
            st.admitted = budget::release(&st.admitted, wedge);
            Outcome::Released
        }
    }
}

type Reply = oneshot::Sender<Result<Outcome, LedgerError>>;

/// One policy's turn (holding the copy of the policy this process last wrote or read) and its
/// queue of changes waiting for the next group commit.
#[derive(Default)]
struct Book {
    turn: tokio::sync::Mutex<Option<RecoveryPolicy>>,
    queue: Mutex<Vec<(Change, Reply)>>,
}

static BOOKS: LazyLock<Mutex<HashMap<String, Arc<Book>>>> = LazyLock::new(Default::default);

fn book_of(policy: &str) -> Arc<Book> {
    BOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(policy.to_string())
        .or_default()
        .clone()
}

/// Compare-and-swap attempts before giving up (the reconcile is retried later).
const CAS_ATTEMPTS: usize = 8;

/// What can go wrong while changing a ledger.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The policy is gone.
    #[error("RecoveryPolicy {0} not found")]
    NoPolicy(String),
    /// Too many writers at once.
    #[error(
        "RecoveryPolicy {0}: status changed under us {CAS_ATTEMPTS} times in a row; retrying later"
    )]
    Contended(String),
    /// The API server refused.
    #[error("RecoveryPolicy {policy}: {source}")]
    Api {
        /// The policy.
        policy: String,
        /// The error (shared by every change of the group commit it ended).
        #[source]
        source: Arc<kube::Error>,
    },
    /// The task committing this change's group went away before it answered.
    #[error("RecoveryPolicy {0}: the ledger write was abandoned; retrying later")]
    Abandoned(String),
}

fn api_error(policy: &str, source: kube::Error) -> LedgerError {
    match source {
        kube::Error::Api(s) if s.is_not_found() => LedgerError::NoPolicy(policy.into()),
        source => LedgerError::Api {
            policy: policy.into(),
            source: Arc::new(source),
        },
    }
}

/// Reads, changes with `f` and writes the status of `name` by compare-and-swap, starting from
/// `held` (the copy last written or read). `f` returns whether it changed anything; a copy
/// that `f` leaves unchanged is re-read fresh once before the answer stands.
async fn cas(
    api: &Api<RecoveryPolicy>,
    name: &str,
    held: &mut Option<RecoveryPolicy>,
    mut f: impl FnMut(&RecoveryPolicy, &mut RecoveryPolicyStatus) -> bool,
) -> Result<(), LedgerError> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut p, fresh) = match held.take() {
            Some(p) => (p, false),
            None => (
                api.get_opt(name)
                    .await
                    .map_err(|e| api_error(name, e))?
                    .ok_or_else(|| LedgerError::NoPolicy(name.into()))?,
                true,
            ),
        };
        let mut st = p.status.clone().unwrap_or_default();
        if !f(&p, &mut st) {
            if fresh {
                *held = Some(p);
                return Ok(());
            }
            continue;
        }
        p.status = Some(st);
        match api.replace_status(name, &PostParams::default(), &p).await {
            Ok(written) => {
                *held = Some(written);
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => continue,
            Err(e) => return Err(api_error(name, e)),
        }
    }
    Err(LedgerError::Contended(name.into()))
}

/// Applies `f` to a fresh copy of the policy status and stores it by compare-and-swap.
/// `f` returns `Ok(true)` to write, `Ok(false)` to leave it, `Err` to stop with a reason.
pub async fn update<E, F>(
    api: &Api<RecoveryPolicy>,
    name: &str,
    mut f: F,
) -> Result<Result<(), E>, LedgerError>
where
    F: FnMut(&RecoveryPolicy, &mut RecoveryPolicyStatus) -> Result<bool, E>,
{
    let book = book_of(name);
    let mut held = book.turn.lock().await;
    let mut stopped = None;
    cas(api, name, &mut held, |p, st| {
        let mut next = st.clone();
        match f(p, &mut next) {
            Ok(true) => {
                stopped = None;
                *st = next;
                true
            }
            Ok(false) => {
                stopped = None;
                false
            }
            Err(e) => {
                stopped = Some(e);
                false
            }
        }
    })
    .await?;
    Ok(stopped.map_or(Ok(()), Err))
}

/// Commits `change` together with whatever else is queued for `policy` (see the module doc).
pub async fn commit(
    api: &Api<RecoveryPolicy>,
    policy: &str,
    change: Change,
) -> Result<Outcome, LedgerError> {
    let book = book_of(policy);
    let (tx, rx) = oneshot::channel();
    book.queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((change, tx));
    {
        let mut held = book.turn.lock().await;
        let group = std::mem::take(&mut *book.queue.lock().unwrap_or_else(|e| e.into_inner()));
        if !group.is_empty() {
            tracing::debug!(policy, changes = group.len(), "ledger: group commit");
            let mut outcomes = Vec::new();
            let r = cas(api, policy, &mut held, |_, st| {
                let before = st.clone();
                outcomes = group.iter().map(|(c, _)| apply(c, st)).collect();
                *st != before
            })
            .await;
            for ((_, reply), outcome) in group.into_iter().zip(
                outcomes
                    .into_iter()
                    .map(Some)
                    .chain(std::iter::repeat(None)),
            ) {
                let answer = match (&r, outcome) {
                    (Err(e), _) => Err(e.clone()),
                    (Ok(()), Some(o)) => Ok(o),
                    (Ok(()), None) => Err(LedgerError::Abandoned(policy.into())),
                };
                let _ = reply.send(answer);
            }
        }
    }
    rx.await
        .unwrap_or_else(|_| Err(LedgerError::Abandoned(policy.into())))
}

/// Admits `candidate` (or upgrades it to a reboot) if the fresh ledger has room.
/// `reclaim` records a wedge that already holds its node whatever the budget says.
pub async fn admit(
    api: &Api<RecoveryPolicy>,
    policy: &str,
    candidate: &Candidate,
    limits: &Limits,
    waiting_ahead: &[(String, String)],
    reclaim: bool,
) -> Result<Result<(), QueueReason>, LedgerError> {
    let change = Change::Admit {
        candidate: candidate.clone(),
        limits: *limits,
        waiting_ahead: waiting_ahead.to_vec(),
        reclaim,
    };
    match commit(api, policy, change).await? {
        Outcome::Queued(reason) => Ok(Err(reason)),
        Outcome::Admitted | Outcome::Released => Ok(Ok(())),
    }
}

/// Removes a wedge from the ledger (no-op when it is not there).
pub async fn release(
    api: &Api<RecoveryPolicy>,
    policy: &str,
    wedge: &str,
) -> Result<(), LedgerError> {
    commit(
        api,
        policy,
        Change::Release {
            wedge: wedge.into(),
        },
    )
    .await
    .map(|_| ())
}

/// Drops the ledger entries whose wedge `keep` rejects (the callers pass "still exists"), by
/// compare-and-swap; returns the wedges dropped.
pub async fn repair<F>(
    api: &Api<RecoveryPolicy>,
    policy: &str,
    keep: F,
) -> Result<Vec<String>, LedgerError>
where
    F: Fn(&str) -> bool,
{
    let mut dropped = Vec::new();
    let r: Result<_, std::convert::Infallible> = update(api, policy, |_, st| {
        dropped.clear();
        let before = st.admitted.clone();
        st.admitted.retain(|a| keep(&a.wedge));
        dropped.extend(
            before
                .iter()
                .filter(|a| !st.admitted.contains(a))
                .map(|a| a.wedge.clone()),
        );
        Ok(!dropped.is_empty())
    })
    .await?;
    let _ = r;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use unwedge_crds::BudgetUnit;

    const LIMITS: Limits = Limits {
        nodes: 2,
        reboots: 1,
        devices: 1,
        none: 1,
    };

    fn admit(wedge: &str, node: &str) -> Change {
        Change::Admit {
            candidate: Candidate {
                wedge: wedge.into(),
                node: node.into(),
                unit: BudgetUnit::Node,
                reboot: false,
            },
            limits: LIMITS,
            waiting_ahead: vec![],
            reclaim: false,
        }
    }

    fn group(changes: &[Change], st: &mut RecoveryPolicyStatus) -> Vec<Outcome> {
        changes.iter().map(|c| apply(c, st)).collect()
    }

    fn held(st: &RecoveryPolicyStatus) -> Vec<&str> {
        st.admitted.iter().map(|a| a.wedge.as_str()).collect()
    }

    #[test]
    fn a_group_admits_in_arrival_order_until_the_budget_is_full() {
        let mut st = RecoveryPolicyStatus::default();
        let out = group(
            &[admit("w1", "n1"), admit("w2", "n2"), admit("w3", "n3")],
            &mut st,
        );
        assert_eq!(out[..2], [Outcome::Admitted, Outcome::Admitted]);
        assert!(
            matches!(&out[2], Outcome::Queued(r) if r.0 == "2/2 nodes under recovery"),
            "{out:?}"
        );
        assert_eq!(held(&st), ["w1", "w2"]);
        assert_eq!(
            st.summary.as_deref(),
            Some("2/2 nodes, 0/1 reboots, 0/1 none, 0 queued")
        );
    }

    #[test]
    fn a_release_earlier_in_the_group_makes_room_for_a_later_admission() {
        let mut st = RecoveryPolicyStatus::default();
        group(&[admit("w1", "n1"), admit("w2", "n2")], &mut st);
        let out = group(
            &[
                admit("w3", "n3"),
                Change::Release { wedge: "w1".into() },
                admit("w4", "n4"),
            ],
            &mut st,
        );
        assert!(matches!(out[0], Outcome::Queued(_)), "{out:?}");
        assert_eq!(out[1..], [Outcome::Released, Outcome::Admitted]);
        assert_eq!(held(&st), ["w2", "w4"]);
    }

    #[test]
    fn an_admission_repeated_in_a_group_changes_nothing_and_a_reclaim_ignores_the_budget() {
        let mut st = RecoveryPolicyStatus::default();
        group(&[admit("w1", "n1"), admit("w2", "n2")], &mut st);
        let before = st.clone();
        let mut again = admit("w1", "n1");
        if let Change::Admit { waiting_ahead, .. } = &mut again {
            waiting_ahead.push(("w7".into(), "n7".into()));
        }
        assert_eq!(group(&[again], &mut st), [Outcome::Admitted]);
        assert_eq!(
            st, before,
            "already admitted: nothing to write, not even the summary"
        );
        let Change::Admit { candidate, .. } = admit("w5", "n5") else {
            unreachable!()
        };
        let reclaim = Change::Admit {
            candidate,
            limits: LIMITS,
            waiting_ahead: vec![],
            reclaim: true,
        };
        assert_eq!(group(&[reclaim], &mut st), [Outcome::Admitted]);
        assert_eq!(
            held(&st),
            ["w1", "w2", "w5"],
            "a reclaim is recorded over the budget"
        );
    }

    #[test]
    fn releasing_a_wedge_not_in_the_ledger_changes_nothing() {
        let mut st = RecoveryPolicyStatus::default();
        group(&[admit("w1", "n1")], &mut st);
        let before = st.clone();
        let out = group(&[Change::Release { wedge: "w9".into() }], &mut st);
        assert_eq!(out, [Outcome::Released]);
        assert_eq!(st, before);
    }
}
