//! DRA quarantine, the effects: create and delete the DeviceTaintRule of a wedge, read what
//! the decision needs (the rule, the device's claims and slices), and probe whether the cluster
//! serves DeviceTaintRules and lets this operator use them.
//!
//! Ownership is the label `unwedge.io/wedge`: a rule without it (an administrator's, even one
//! that happens to carry our name) is never changed or deleted. Every call is idempotent, so a
//! restart between any two of them finishes the job with one rule.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::resource::v1::{DeviceTaintRule, ResourceClaim, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use unwedge_crds::DraDeviceRef;

use crate::dra;

/// What can go wrong with a quarantine.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    /// A rule with our name exists but is not labelled for the wedge: someone else's.
    #[error(
        "DeviceTaintRule {0} exists and is not unwedge's (no label unwedge.io/wedge for this wedge): rename or delete it, unwedge will not touch it"
    )]
    Foreign(String),
    /// The API server refused.
    #[error("DeviceTaintRule {name}: {source}")]
    Api {
        /// The rule.
        name: String,
        /// The error.
        #[source]
        source: kube::Error,
    },
}

/// How `ensure` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// We created it now.
    Created,
    /// Our rule was already there (a restart after creating it, or a second reconcile).
    Existing,
}

fn api(client: &Client) -> Api<DeviceTaintRule> {
    Api::all(client.clone())
}

fn err(name: &str) -> impl FnOnce(kube::Error) -> QuarantineError + '_ {
    move |source| QuarantineError::Api {
        name: name.to_string(),
        source,
    }
}

/// Our rule for `wedge`, if it exists (a rule with that name that is not ours reads as none).
pub async fn get(client: &Client, wedge: &str) -> Result<Option<DeviceTaintRule>, QuarantineError> {
    let name = dra::rule_name(wedge);
    let r = api(client).get_opt(&name).await.map_err(err(&name))?;
    Ok(r.filter(|r| dra::is_ours(r, wedge)))
}

/// Creates the rule that taints `device` for `wedge`; an existing rule of ours is fine.
pub async fn ensure(
    client: &Client,
    wedge: &str,
    wedge_uid: Option<&str>,
    device: &DraDeviceRef,
) -> Result<Ensured, QuarantineError> {
    let rule = dra::rule(wedge, wedge_uid, device);
    let name = rule.name_any();
    match api(client).create(&PostParams::default(), &rule).await {
        Ok(_) => Ok(Ensured::Created),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            match api(client).get_opt(&name).await.map_err(err(&name))? {
                Some(r) if dra::is_ours(&r, wedge) => Ok(Ensured::Existing),
                Some(_) => Err(QuarantineError::Foreign(name)),
                // Deleted in between (a finished twin): the next reconcile creates it again.
                None => Ok(Ensured::Existing),
            }
        }
        Err(e) => Err(err(&name)(e)),
    }
}

/// Deletes our rule for `wedge`; returns whether one was deleted. The delete is guarded by
/// the uid and resourceVersion of the rule we read and found ours.
pub async fn remove(client: &Client, wedge: &str) -> Result<bool, QuarantineError> {
    let name = dra::rule_name(wedge);
    let Some(r) = get(client, wedge).await? else {
        return Ok(false);
    };
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: r.uid(),
            resource_version: r.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match api(client).delete(&name, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        // Changed since we read it: the next reconcile reads it again.
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(err(&name)(e)),
    }
}

/// Every ResourceClaim (all namespaces): the consumers of a device are found in them.
pub async fn claims(client: &Client) -> Result<Vec<ResourceClaim>, kube::Error> {
    Ok(Api::<ResourceClaim>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items)
}

/// The ResourceSlices of one node, or of all nodes with `None`.
pub async fn slices(
    client: &Client,
    node: Option<&str>,
) -> Result<Vec<ResourceSlice>, kube::Error> {
    let lp = match node {
        Some(n) => ListParams::default().fields(&format!("spec.nodeName={n}")),
        None => ListParams::default(),
    };
    Ok(Api::<ResourceSlice>::all(client.clone())
        .list(&lp)
        .await?
        .items)
}

/// Whether DRA devices are quarantined under `mode` (docs/design.md §5): for `auto` and `on` asks the
/// API server whether it serves `resource.k8s.io/v1` DeviceTaintRules (discovery) and whether
/// this operator holds every right in [`dra::RIGHTS`] (SelfSubjectAccessReviews), then lets
/// [`dra::support`] decide.
pub async fn support(client: &Client, mode: dra::Mode) -> dra::Support {
    if mode == dra::Mode::Off {
        return dra::support(mode, None);
    }
    let served = match client.list_api_group_resources("resource.k8s.io/v1").await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "devicetaintrules")),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e.to_string()),
    };
    let denied = denied(client).await.map_err(|e| e.to_string());
    dra::support(mode, Some(&dra::Probe { served, denied }))
}

/// The rights of [`dra::RIGHTS`] this operator is refused, as `verb resource`.
async fn denied(client: &Client) -> Result<Vec<String>, kube::Error> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut out = Vec::new();
    for (resource, verb) in dra::RIGHTS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some("resource.k8s.io".into()),
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = api.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            out.push(format!("{verb} {resource}"));
        }
    }
    Ok(out)
}
