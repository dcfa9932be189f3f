//! The fallback RecoveryPolicy the chart configures, applied by the operator (docs/design.md §3,
//! "The default policy").
//!
//! The chart ships the CRDs as templates (so `helm upgrade` upgrades them), and Helm cannot
//! create an object of a kind its own release is still creating: it maps every manifest to
//! the API before it creates the first one. So the chart renders the default policy into a
//! ConfigMap, and each operator replica applies it at start (server-side apply, its own field
//! manager). A spec field a human changed on the live policy (say `kubectl unwedge pause`) is
//! theirs: the apply conflicts on it, and the field is left out of the apply and logged, so a
//! restarted operator never resumes what a human paused. Replicas apply the same content, so two
//! of them, or a restart, change nothing else. The replica is not ready until the
//! policy is applied, or refused for good by admission: `helm install --wait` then also means
//! that the admission policies on RecoveryPolicies are in force, and a user's first
//! `kubectl apply` of a policy is not refused for a parameter cache still syncing.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;
use unwedge_crds::RecoveryPolicy;

/// The field manager of the applied default policy.
pub const FIELD_MANAGER: &str = "unwedge-default-policy";

/// A default-policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a RecoveryPolicy.
    #[error("{path} is not a RecoveryPolicy: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The policy is not one the operator may apply as the default.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A checked default policy: its name, and the object exactly as the file has it (applied as
/// it stands: re-serializing the typed policy would claim fields the file does not set).
#[derive(Clone, Debug)]
pub struct DefaultPolicy {
    /// `metadata.name`.
    pub name: String,
    /// The file's object.
    pub body: serde_json::Value,
}

/// Reads and checks the default policy the chart rendered (JSON).
pub fn load(path: &str) -> Result<DefaultPolicy, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and checks a default policy: a named RecoveryPolicy with `spec.default: true`.
pub fn parse(path: &str, text: &str) -> Result<DefaultPolicy, Error> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|source| Error::Parse {
        path: path.into(),
        source,
    })?;
    if value["apiVersion"] != "unwedge.io/v1alpha1" || value["kind"] != "RecoveryPolicy" {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "apiVersion must be unwedge.io/v1alpha1 and kind RecoveryPolicy",
        });
    }
    let policy: RecoveryPolicy =
        serde_json::from_value(value.clone()).map_err(|source| Error::Parse {
            path: path.into(),
            source,
        })?;
    if policy
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "metadata.name is required",
        });
    }
    if !policy.spec.default {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "spec.default must be true: this file is the fallback policy",
        });
    }
    if policy.status.is_some() {
        return Err(Error::Invalid {
            path: path.into(),
            reason: "status belongs to the operator's ledger, not to the file",
        });
    }
    Ok(DefaultPolicy {
        name: policy.metadata.name.unwrap_or_default(),
        body: value,
    })
}

/// The spec fields (as `.spec.a.b` paths) a server-side apply conflict names: fields another
/// manager (a human's `kubectl edit`, `patch`, the plugin) set on the live policy.
pub fn conflicting_spec_fields(status: &kube::core::Status) -> Vec<String> {
    status
        .details
        .iter()
        .flat_map(|d| d.causes.iter())
        .filter(|c| c.reason == "FieldManagerConflict" || c.reason.is_empty())
        .map(|c| c.field.clone())
        .filter(|f| f.starts_with(".spec."))
        .collect()
}

/// Removes the `.spec.a.b` paths from `body` (pure); returns those that were there.
pub fn drop_fields(body: &mut serde_json::Value, paths: &[String]) -> Vec<String> {
    let mut dropped = Vec::new();
    for path in paths {
        let keys: Vec<&str> = path.trim_start_matches('.').split('.').collect();
        let Some((last, parents)) = keys.split_last() else {
            continue;
        };
        // A JSON pointer to the parent object (RFC 6901 escapes).
        let parent: String = parents
            .iter()
            .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
            .collect();
        if body
            .pointer_mut(&parent)
            .and_then(|n| n.as_object_mut())
            .and_then(|o| o.remove(*last))
            .is_some()
        {
            dropped.push(path.clone());
        }
    }
    dropped
}

/// What an apply's answer means for the next step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied: the policy is in place.
    Applied,
    /// Refused by a validation (a CRD rule or an admission policy, e.g. another policy is
    /// already the default): retrying cannot help until someone changes the cluster, but
    /// admission is working.
    Refused,
    /// Worth retrying: the CRD is not served yet, an admission policy's parameters are still
    /// syncing, the API server is unreachable or busy, or this operator lacks a permission.
    Retry,
}

/// Classifies an apply error (pure).
pub fn classify(err: &kube::Error) -> Outcome {
    match err {
        kube::Error::Api(status) if status.code == 422 => {
            // A ValidatingAdmissionPolicy that cannot evaluate yet (its paramKind informer
            // has not synced) denies with the same code, "failed to configure policy" or
            // "failed to configure binding": that one passes.
            if status.message.contains("failed to configure") {
                Outcome::Retry
            } else {
                Outcome::Refused
            }
        }
        _ => Outcome::Retry,
    }
}

/// The wait before retry number `attempt` (0-based): 1 s doubling, at most 30 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(5)).min(Duration::from_secs(30))
}

/// Applies `policy` until it is applied or refused, or until shutdown. Returns the outcome
/// (`Retry` only on shutdown). Spec fields another manager set are left out (and logged);
/// a conflict outside the spec (a label) is forced.
pub async fn apply(
    client: kube::Client,
    policy: DefaultPolicy,
    mut shutdown: watch::Receiver<bool>,
) -> Outcome {
    let name = policy.name;
    let mut body = policy.body;
    let api: Api<RecoveryPolicy> = Api::all(client);
    let mut left_to_humans: Vec<String> = Vec::new();
    let mut force = false;
    let mut attempt = 0u32;
    loop {
        let mut params = PatchParams::apply(FIELD_MANAGER);
        params.force = force;
        let err = match api.patch(&name, &params, &Patch::Apply(&body)).await {
            Ok(_) => {
                if left_to_humans.is_empty() {
                    tracing::info!(policy = %name, "default RecoveryPolicy applied");
                } else {
                    tracing::warn!(policy = %name, fields = ?left_to_humans, "default RecoveryPolicy applied, except fields someone changed on the live policy: they keep their values (to hand them back to the chart, apply them with field manager unwedge-default-policy and --force-conflicts: docs/upgrades.md)");
                }
                return Outcome::Applied;
            }
            Err(e) => e,
        };
        if let kube::Error::Api(status) = &err
            && status.code == 409
            && !force
        {
            let dropped = drop_fields(&mut body, &conflicting_spec_fields(status));
            if dropped.is_empty() {
                force = true;
            }
            left_to_humans.extend(dropped);
            continue;
        }
        match classify(&err) {
            Outcome::Refused => {
                tracing::error!(policy = %name, error = %err, "the default RecoveryPolicy was refused: fix the conflict (e.g. another policy with spec.default) and restart the operator, or set defaultPolicy.enabled=false");
                return Outcome::Refused;
            }
            _ => {
                let wait = backoff(attempt);
                tracing::warn!(policy = %name, error = %err, retry_in = ?wait, "the default RecoveryPolicy is not applied yet");
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return Outcome::Retry,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        let status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": message, "reason": "Invalid", "code": code
        }))
        .expect("a Status");
        kube::Error::Api(Box::new(status))
    }

    const GOOD: &str = r#"{"apiVersion":"unwedge.io/v1alpha1","kind":"RecoveryPolicy",
        "metadata":{"name":"default","labels":{"app.kubernetes.io/name":"unwedge"}},
        "spec":{"default":true,"maxUnavailable":1,"rebootApproval":"Manual"}}"#;

    #[test]
    fn a_named_default_policy_parses_and_is_applied_as_the_file_has_it() {
        let p = parse("f", GOOD).unwrap();
        assert_eq!(p.name, "default");
        assert_eq!(p.body["spec"]["rebootApproval"], "Manual");
        assert!(
            p.body["spec"].get("paused").is_none(),
            "no field the file does not set"
        );
    }

    #[test]
    fn conflicting_spec_fields_are_dropped_and_others_are_not() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "code": 409, "reason": "Conflict", "message": "Apply failed with 2 conflicts",
            "details": {"causes": [
                {"reason": "FieldManagerConflict", "message": "conflict with \"kubectl-unwedge\": .spec.paused", "field": ".spec.paused"},
                {"reason": "FieldManagerConflict", "message": "conflict with \"kubectl-edit\": .spec.drain.timeout", "field": ".spec.drain.timeout"},
                {"reason": "FieldManagerConflict", "message": "conflict with \"x\"", "field": ".metadata.labels.team"}
            ]}
        }))
        .unwrap();
        let fields = conflicting_spec_fields(&status);
        assert_eq!(fields, vec![".spec.paused", ".spec.drain.timeout"]);
        let mut body = serde_json::json!({"spec": {"paused": false, "maxAttempts": 3,
            "drain": {"timeout": "10m", "force": false}}});
        let dropped = drop_fields(&mut body, &fields);
        assert_eq!(dropped, fields);
        assert_eq!(
            body,
            serde_json::json!({"spec": {"maxAttempts": 3, "drain": {"force": false}}})
        );
        assert!(
            drop_fields(&mut body, &[".spec.nope.x".to_string()]).is_empty(),
            "a path that is not there drops nothing"
        );
    }

    #[test]
    fn files_that_are_not_a_default_policy_are_refused_with_the_reason() {
        for (text, want) in [
            ("not json", "is not a RecoveryPolicy"),
            (
                r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x"}}"#,
                "kind RecoveryPolicy",
            ),
            (
                r#"{"apiVersion":"unwedge.io/v1alpha1","kind":"RecoveryPolicy","metadata":{},"spec":{"default":true}}"#,
                "metadata.name is required",
            ),
            (
                r#"{"apiVersion":"unwedge.io/v1alpha1","kind":"RecoveryPolicy","metadata":{"name":"a"},"spec":{}}"#,
                "spec.default must be true",
            ),
            (
                r#"{"apiVersion":"unwedge.io/v1alpha1","kind":"RecoveryPolicy","metadata":{"name":"a"},"spec":{"default":true},"status":{}}"#,
                "status belongs",
            ),
        ] {
            let err = parse("f", text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn a_validation_refusal_is_final_and_a_syncing_admission_policy_is_retried() {
        let conflict = api_error(
            422,
            "recoverypolicies.unwedge.io \"default\" is forbidden: ValidatingAdmissionPolicy 'unwedge-single-default-policy' with binding 'unwedge-single-default-policy' denied request: RecoveryPolicy other is already the default",
        );
        assert_eq!(classify(&conflict), Outcome::Refused);
        let syncing = api_error(
            422,
            "ValidatingAdmissionPolicy 'unwedge-single-default-policy' with binding 'unwedge-single-default-policy' denied request: failed to configure binding: paramKind kind `unwedge.io/v1alpha1, Kind=RecoveryPolicy` not yet synced to use for admission",
        );
        assert_eq!(classify(&syncing), Outcome::Retry);
        for code in [403, 404, 409, 429, 500, 503] {
            assert_eq!(classify(&api_error(code, "x")), Outcome::Retry, "{code}");
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let waits: Vec<u64> = (0..8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
