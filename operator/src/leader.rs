//! Lease-based leader election (coordination.k8s.io/v1), written small and strict.
//!
//! kube-lease-manager 0.13 supports kube 5, but keeps reporting "leader" while renewals fail
//! (it only logs and backs off), and we must stop acting the moment a renewal fails. So: try
//! every 2 s; acquire when the holder has not renewed for a full lease duration (measured on
//! our own clock, as client-go does, so clock skew does not matter); renew by replace with the
//! resourceVersion (compare-and-swap); any failure or timeout clears leadership at once;
//! on shutdown the holder deletes the lease (nothing is left after an uninstall).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use tokio::sync::watch;

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews (and a follower looks).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

/// One participant in the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The last holder record seen, and when we first saw it unchanged.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

impl Elector {
    /// A participant for lease `name` in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            observed: None,
        }
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
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
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
    /// Leadership drops to false the moment a round fails or times out.
    pub async fn run(mut self, tx: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let held = match tokio::time::timeout(RENEW_EVERY, self.try_once()).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, lease = %self.name, "lease round failed: not leading");
                    false
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, "lease round timed out: not leading");
                    false
                }
            };
            if *tx.borrow() != held {
                tracing::info!(identity = %self.identity, leader = held, "leadership changed");
                let _ = tx.send(held);
            }
            tokio::select! {
                _ = tokio::time::sleep(RENEW_EVERY) => {}
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
