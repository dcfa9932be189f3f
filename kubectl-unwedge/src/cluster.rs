//! What the plugin reads and writes in the cluster: the client, wedges, policies, Events,
//! who the caller is, and the verb annotations; every refusal as a [`CliError`] that names the
//! missing right.

use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use unwedge_crds::{GpuWedge, RecoveryPolicy};

use crate::error::{CliError, Target};
use crate::verbs::{self, Verb};
use crate::{POLICIES, WEDGES};

pub(crate) async fn client(
    kubeconfig: Option<&PathBuf>,
    context: Option<&str>,
) -> Result<Client, CliError> {
    let options = KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| CliError::Config(e.to_string()))?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| CliError::Config(e.to_string()))?
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| CliError::Config(e.to_string()))
}

pub(crate) fn wedge_target<'a>(verb: &'static str, name: Option<&'a str>) -> Target<'a> {
    Target {
        verb,
        resource: WEDGES,
        kind: "GpuWedge",
        name,
    }
}

pub(crate) fn policy_target<'a>(verb: &'static str, name: Option<&'a str>) -> Target<'a> {
    Target {
        verb,
        resource: POLICIES,
        kind: "RecoveryPolicy",
        name,
    }
}

pub(crate) async fn get_policy(
    api: &Api<RecoveryPolicy>,
    name: &str,
) -> Result<RecoveryPolicy, CliError> {
    api.get(name)
        .await
        .map_err(|e| policy_target("get", Some(name)).err(e))
}

pub(crate) async fn patch_policy(
    api: &Api<RecoveryPolicy>,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), CliError> {
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| policy_target("patch", Some(name)).err(e))?;
    Ok(())
}

pub(crate) async fn list_wedges(api: &Api<GpuWedge>) -> Result<Vec<GpuWedge>, CliError> {
    Ok(api
        .list(&ListParams::default())
        .await
        .map_err(|e| wedge_target("list", None).err(e))?
        .items)
}

pub(crate) async fn get_wedge(api: &Api<GpuWedge>, name: &str) -> Result<GpuWedge, CliError> {
    api.get(name)
        .await
        .map_err(|e| wedge_target("get", Some(name)).err(e))
}

/// The Events about the wedge in any namespace (cluster-scoped objects' events land in
/// `default` or the writer's namespace). Events are context: without the right to list
/// them the timeline is still shown, with a note.
pub(crate) async fn wedge_events(client: &Client, name: &str) -> (Vec<Event>, Option<String>) {
    let api: Api<Event> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=GpuWedge,involvedObject.name={name}"
    ));
    match api.list(&lp).await {
        Ok(l) => (l.items, None),
        Err(e) => (
            Vec::new(),
            Some(
                Target {
                    verb: "list",
                    resource: "events",
                    kind: "Event",
                    name: None,
                }
                .err(e)
                .to_string(),
            ),
        ),
    }
}

/// The username the API server sees for our credentials (authentication.k8s.io/v1
/// SelfSubjectReview): the admission policy refuses a `unwedge.io/by` that differs from it.
pub(crate) async fn whoami(client: &Client) -> Result<String, CliError> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let target = Target {
        verb: "create",
        resource: "selfsubjectreviews.authentication.k8s.io",
        kind: "SelfSubjectReview",
        name: None,
    };
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|e| target.err(e))?;
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            CliError::Config(
                "the API server did not say who you are (empty SelfSubjectReview)".into(),
            )
        })
}

pub(crate) async fn write_verb(
    api: &Api<GpuWedge>,
    name: &str,
    verb: &Verb,
    by: &str,
) -> Result<(), CliError> {
    let patch = verbs::annotation_patch(verb, by);
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            Target {
                verb: "patch",
                resource: WEDGES,
                kind: "GpuWedge",
                name: Some(name),
            }
            .err(e)
        })?;
    Ok(())
}
