//! The admission ledger on each RecoveryPolicy's status, changed only by compare-and-swap.
//!
//! Every change GETs the policy fresh from the API server (never the cache), computes with
//! `budget`, and replaces the status guarded by the resourceVersion; a 409 re-reads and tries
//! again. Two operators (or one with a stale cache) therefore never both take the last slot.
//!
//! Within this process the changes of one policy's ledger take turns (a lock per policy): the
//! compare-and-swap keeps them correct either way, but a storm of concurrent reconciles racing
//! for one resourceVersion wins one write per round and burns the rest as conflicts.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use kube::api::{Api, PostParams};
use unwedge_crds::{RecoveryPolicy, RecoveryPolicyStatus};

use crate::budget::{self, Candidate, Limits, QueueReason};

/// One lock per policy name, held while that policy's ledger is read and replaced.
static TURNS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

fn turn_of(policy: &str) -> Arc<tokio::sync::Mutex<()>> {
    TURNS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(policy.to_string())
        .or_default()
        .clone()
}

/// Compare-and-swap attempts before giving up (the reconcile is retried later).
const CAS_ATTEMPTS: usize = 8;

/// What can go wrong while changing a ledger.
#[derive(Debug, thiserror::Error)]
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
        /// The error.
        #[source]
        source: kube::Error,
    },
}

/// Applies `f` to a fresh copy of the policy status and stores it by compare-and-swap.
/// `f` returns `Ok(true)` to write, `Ok(false)` to leave it, `Err` to stop with a reason.
pub async fn update<E, F>(
    api: &Api<RecoveryPolicy>,
    name: &str,
    mut f: F,
) -> Result<Result<RecoveryPolicyStatus, E>, LedgerError>
where
    F: FnMut(&RecoveryPolicy, &mut RecoveryPolicyStatus) -> Result<bool, E>,
{
    let turn = turn_of(name);
    let _turn = turn.lock().await;
    for _ in 0..CAS_ATTEMPTS {
        let mut p = api
            .get_opt(name)
            .await
            .map_err(|source| LedgerError::Api {
                policy: name.into(),
                source,
            })?
            .ok_or_else(|| LedgerError::NoPolicy(name.into()))?;
        let mut st = p.status.clone().unwrap_or_default();
        match f(&p, &mut st) {
            Err(e) => return Ok(Err(e)),
            Ok(false) => return Ok(Ok(st)),
            Ok(true) => {}
        }
        p.status = Some(st.clone());
        match api.replace_status(name, &PostParams::default(), &p).await {
            Ok(_) => return Ok(Ok(st)),
            Err(kube::Error::Api(s)) if s.is_conflict() => continue,
            Err(source) => {
                return Err(LedgerError::Api {
                    policy: name.into(),
                    source,
                });
            }
        }
    }
    Err(LedgerError::Contended(name.into()))
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
    let r = update(api, policy, |_, st| {
        if reclaim {
            let mut l = budget::release(&st.admitted, &candidate.wedge);
            l.push(unwedge_crds::Admission {
                wedge: candidate.wedge.clone(),
                node: candidate.node.clone(),
                unit: candidate.unit,
                reboot: candidate.reboot,
            });
            let changed = l != st.admitted;
            st.admitted = l;
            return Ok(changed);
        }
        let next = budget::admit(&st.admitted, candidate, limits, waiting_ahead)?;
        let changed = next != st.admitted;
        st.admitted = next;
        st.summary = Some(budget::summary(&st.admitted, limits, waiting_ahead.len()));
        Ok(changed)
    })
    .await?;
    Ok(r.map(|_| ()))
}

/// Removes a wedge from the ledger (no-op when it is not there).
pub async fn release(
    api: &Api<RecoveryPolicy>,
    policy: &str,
    wedge: &str,
) -> Result<(), LedgerError> {
    let r: Result<_, std::convert::Infallible> = update(api, policy, |_, st| {
        let next = budget::release(&st.admitted, wedge);
        let changed = next.len() != st.admitted.len();
        st.admitted = next;
        Ok(changed)
    })
    .await?;
    let _ = r;
    Ok(())
}

/// Drops ledger entries whose wedge is gone or finished (on start and after a leader change).
/// `open` tells whether a wedge, read fresh, is still open.
pub async fn repair<F>(
    api: &Api<RecoveryPolicy>,
    policy: &str,
    open: F,
) -> Result<Vec<String>, LedgerError>
where
    F: Fn(&str) -> bool,
{
    let mut dropped = Vec::new();
    let r: Result<_, std::convert::Infallible> = update(api, policy, |_, st| {
        dropped.clear();
        let before = st.admitted.clone();
        st.admitted.retain(|a| open(&a.wedge));
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
