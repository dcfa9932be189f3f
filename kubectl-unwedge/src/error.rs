//! Errors a user of the plugin sees; each one says what to do next.

use unwedge_crds::Phase;

/// Everything that can stop a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No kubeconfig, a bad context, or an unreachable cluster.
    #[error(
        "cannot load the Kubernetes client configuration: {0}\n  (use --kubeconfig / --context, or set KUBECONFIG)"
    )]
    Config(String),
    /// The named object does not exist.
    #[error("no {kind} named {name}; try `kubectl unwedge {hint}`")]
    NotFound {
        /// Kind of the object.
        kind: &'static str,
        /// Name asked for.
        name: String,
        /// The plugin command that lists them.
        hint: &'static str,
    },
    /// RBAC refused a request.
    #[error(
        "missing RBAC: you may not {verb} {resource}{scope}.\n  Ask a cluster admin for a (Cluster)Role \
         that grants `{verb}` on `{resource}`.\n  The API server said: {message}"
    )]
    Forbidden {
        /// The API verb refused (get, list, patch, create).
        verb: &'static str,
        /// `resource.group`.
        resource: &'static str,
        /// ` named X` or ` (cluster-wide)`.
        scope: String,
        /// The API server's message (names the user).
        message: String,
    },
    /// The verb does not apply to the wedge's phase.
    #[error(
        "cannot {verb} GpuWedge {name}: it is {phase:?}, and {verb} applies to {wanted} ({hint})"
    )]
    WrongPhase {
        /// The human verb.
        verb: &'static str,
        /// Wedge name.
        name: String,
        /// Its phase.
        phase: Phase,
        /// Phases the verb applies to.
        wanted: &'static str,
        /// What the phase means.
        hint: String,
    },
    /// A method the policy does not allow, or not a method token at all.
    #[error("cannot approve method {method:?}: {why}")]
    BadMethod {
        /// The method asked for.
        method: String,
        /// Why not.
        why: String,
    },
    /// An object could not be printed as JSON or YAML.
    #[error("cannot print the output: {0}")]
    Encode(String),
    /// Any other API failure.
    #[error("{verb} {resource}: {source}")]
    Api {
        /// The API verb.
        verb: &'static str,
        /// `resource.group`.
        resource: &'static str,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// The resource a request was about, to turn API errors into actionable ones.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The API verb.
    pub verb: &'static str,
    /// `resource.group`.
    pub resource: &'static str,
    /// The kind, for NotFound.
    pub kind: &'static str,
    /// The object's name, for single-object requests.
    pub name: Option<&'a str>,
}

impl Target<'_> {
    /// Translates a client error: 404 → NotFound, 403 → Forbidden naming verb and resource.
    pub fn err(self, e: kube::Error) -> CliError {
        if let kube::Error::Api(s) = &e {
            if let (404, Some(name)) = (s.code, self.name) {
                let hint = if self.kind == "RecoveryPolicy" {
                    "budget"
                } else {
                    "list"
                };
                return CliError::NotFound {
                    kind: self.kind,
                    name: name.into(),
                    hint,
                };
            }
            if s.code == 403 {
                let scope = match self.name {
                    Some(n) => format!(" named {n}"),
                    None => " (cluster-wide)".into(),
                };
                return CliError::Forbidden {
                    verb: self.verb,
                    resource: self.resource,
                    scope,
                    message: s.message.clone(),
                };
            }
        }
        CliError::Api {
            verb: self.verb,
            resource: self.resource,
            source: e,
        }
    }
}
