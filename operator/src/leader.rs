//! Lease-based leader election (coordination.k8s.io/v1), written small and strict.
//!
//! kube-lease-manager 0.13 supports kube 5, but keeps reporting "leader" while renewals fail
//! (it only logs and backs off), and we must stop acting before another replica may take over.
//! So: try every 2 s; acquire when the holder has not renewed for a full lease duration
//! (measured on our own clock, as client-go does, so clock skew does not matter); renew by
//! replace with the resourceVersion (compare-and-swap); seeing another holder clears leadership
//! at once, and failed or slow rounds clear it when no renewal has succeeded for the renew
//! deadline (10 s, as client-go; a loaded API server made every 2 s hiccup a leader change);
//! on shutdown the holder deletes the lease. That delete can be refused when an uninstall
//! removes our Role before our pods stop, so the lease is also owned by the operator's
//! Deployment: the garbage collector deletes it with the Deployment.

use std::time::{Duration, Instant};

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use tokio::sync::watch;

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews (and a follower looks).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How long a leader keeps acting without a successful renewal (as client-go's renewDeadline):
/// well inside [`LEASE_DURATION`], after which another replica may take the lease, so a slow
/// API server delays renewals without two replicas ever acting at once.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How long one round (a GET and a replace) may take.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// How one election round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    /// We hold the lease, renewed now.
    Won,
    /// Another replica holds it.
    Lost,
    /// The round failed or timed out: we do not know.
    Failed,
}

/// While leading, how long until [`RENEW_DEADLINE`] passes since the last won round began;
/// rounds and pauses are cut to it, so leadership drops on time even when the API server hangs.
fn time_left(last_won: Option<Instant>, now: Instant) -> Option<Duration> {
    last_won.map(|t| RENEW_DEADLINE.saturating_sub(now.duration_since(t)))
}

/// Whether we lead after `round`: a won round leads, a lost one does not, and a failed one
/// keeps leadership only while the last won round began less than [`RENEW_DEADLINE`] ago.
fn still_leading(round: Round, last_won: Option<Instant>, now: Instant) -> bool {
    match round {
        Round::Won => true,
        Round::Lost => false,
        Round::Failed => last_won.is_some_and(|t| now.duration_since(t) < RENEW_DEADLINE),
    }
}

/// The owner reference that hands a lease to the garbage collector along with `deployment`
/// (None when the Deployment has no name or uid yet). No `blockOwnerDeletion`: the lease must
/// never hold up the Deployment's deletion.
pub fn owner_reference(deployment: &Deployment) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Deployment::API_VERSION.into(),
        kind: Deployment::KIND.into(),
        name: deployment.metadata.name.clone()?,
        uid: deployment.metadata.uid.clone()?,
        ..Default::default()
    })
}

/// One participant in the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The last holder record seen, and when we first saw it unchanged.
    observed: Option<(String, Option<MicroTime>, Instant)>,
    /// The Deployment that owns the lease, by name, while its uid is not known yet.
    owner_name: Option<String>,
    deployments: Api<Deployment>,
    owner: Option<OwnerReference>,
    owner_warned: bool,
}

impl Elector {
    /// A participant for lease `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Elector {
        Elector {
            api: Api::namespaced(client.clone(), namespace),
            name: name.into(),
            identity: identity.into(),
            observed: None,
            owner_name: None,
            deployments: Api::namespaced(client, namespace),
            owner: None,
            owner_warned: false,
        }
    }

    /// Makes every lease this participant writes owned by `deployment` (same namespace), so
    /// deleting the Deployment deletes the lease even when we cannot.
    pub fn owned_by_deployment(mut self, deployment: &str) -> Elector {
        self.owner_name = Some(deployment.into());
        self
    }

    /// The owner reference to write, looked up once. A failed lookup is retried next round and
    /// does not stop the election: an unowned lease is still deleted on shutdown.
    async fn owner(&mut self) -> Option<OwnerReference> {
        if self.owner.is_none()
            && let Some(name) = &self.owner_name
        {
            match self.deployments.get(name).await {
                Ok(d) => self.owner = owner_reference(&d),
                Err(e) if !self.owner_warned => {
                    self.owner_warned = true;
                    tracing::warn!(error = %e, deployment = %name, lease = %self.name,
                        "cannot read the lease's owner Deployment; the lease stays unowned until it can");
                }
                Err(_) => {}
            }
        }
        self.owner.clone()
    }

    fn spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: returns whether we hold the lease now.
    pub async fn try_once(&mut self) -> Result<bool, kube::Error> {
        let owner = self.owner().await;
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    owner_references: owner.map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        let record = (holder.clone(), spec.renew_time.clone());
        let first_seen = match &self.observed {
            Some((h, r, at)) if (h, r) == (&record.0, &record.1) => *at,
            _ => Instant::now(),
        };
        self.observed = Some((record.0, record.1, first_seen));
        let mine = holder == self.identity;
        let free = holder.is_empty() || first_seen.elapsed() >= duration;
        if !mine && !free {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquire = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.spec(transitions, acquire));
        if let Some(o) = owner {
            // Also adopts a lease written before it had an owner (an upgrade from an older operator).
            lease.metadata.owner_references = Some(vec![o]);
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if we hold it, so the other replica takes over at once: deletes it
    /// (only this version of it, so a lease another replica has just taken stays), which also
    /// leaves nothing behind after an uninstall; when the delete is refused (e.g. RBAC without
    /// `delete`), clears the holder instead.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        match self.api.delete(&self.name, &dp).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, lease = %self.name, "cannot delete the lease; clearing its holder instead");
            }
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        lease.spec = Some(spec);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    /// Runs the election until `shutdown` turns true, publishing leadership on `tx`.
    /// Leadership drops at once when another replica holds the lease, and when no round has
    /// renewed it for [`RENEW_DEADLINE`] (see [`still_leading`]).
    pub async fn run(mut self, tx: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut last_won: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let left = time_left(last_won, started);
            let limit = left.map_or(ROUND_TIMEOUT, |l| l.min(ROUND_TIMEOUT));
            let round = match tokio::time::timeout(limit, self.try_once()).await {
                Ok(Ok(true)) => Round::Won,
                Ok(Ok(false)) => Round::Lost,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.name, "lease round failed");
                    Round::Failed
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, "lease round timed out");
                    Round::Failed
                }
            };
            if round == Round::Won {
                last_won = Some(started);
            }
            let held = still_leading(round, last_won, Instant::now());
            if !held {
                last_won = None;
            }
            if *tx.borrow() != held {
                tracing::info!(identity = %self.identity, leader = held, "leadership changed");
                let _ = tx.send(held);
            }
            let pause =
                time_left(last_won, Instant::now()).map_or(RENEW_EVERY, |l| l.min(RENEW_EVERY));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                let _ = tx.send(false);
                if held && let Err(e) = self.release().await {
                    tracing::warn!(error = %e, "could not release the lease");
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_api_server_delays_renewal_without_losing_leadership_past_the_deadline() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(still_leading(Round::Won, Some(t0), t0));
        assert!(
            !still_leading(Round::Lost, Some(t0), t0),
            "another holder: at once"
        );
        assert!(
            still_leading(Round::Failed, Some(t0), at(9)),
            "within the deadline"
        );
        assert!(
            !still_leading(Round::Failed, Some(t0), at(10)),
            "deadline reached"
        );
        assert!(!still_leading(Round::Failed, None, t0), "never won");
        assert!(
            RENEW_DEADLINE < LEASE_DURATION,
            "a leader stops acting before another replica may take the lease"
        );
        assert_eq!(time_left(None, t0), None, "not leading: no deadline");
        assert_eq!(time_left(Some(t0), at(4)), Some(Duration::from_secs(6)));
        assert_eq!(time_left(Some(t0), at(12)), Some(Duration::ZERO));
    }

    #[test]
    fn the_owner_reference_names_the_deployment_by_uid_and_never_blocks_its_deletion() {
        let mut d = Deployment::default();
        d.metadata.name = Some("unwedge-operator".into());
        assert_eq!(owner_reference(&d), None, "no uid yet: no owner");
        d.metadata.uid = Some("5f1c".into());
        let o = owner_reference(&d).unwrap();
        assert_eq!(
            (
                o.api_version.as_str(),
                o.kind.as_str(),
                o.name.as_str(),
                o.uid.as_str()
            ),
            ("apps/v1", "Deployment", "unwedge-operator", "5f1c")
        );
        assert_eq!(o.block_owner_deletion, None);
        assert_eq!(o.controller, None);
    }
}
