//! In-place restart of a `none` wedge's containers (method `restart`, docs/design.md §4 "none"):
//! the kernel asks userspace to "restart container, daemon, whatever service which was using
//! this device". Each approved container is stopped through the container runtime's CRI API
//! ([`crate::cri`]) and the kubelet starts it again in the same pod, with the same device
//! allocation; the agent waits until the new container runs and records old and new restart
//! counts and the time it took.
//!
//! The agent restarts only containers it can vouch for itself ([`Allowed`]): those the kubelet's
//! PodResources API lists as holding the wedged device right now, and the container of the
//! blamed task as the agent recorded it in the (immutable) spec at detection. Anything else in an
//! approval is refused and left alone. A container that cannot be restarted in place (no
//! runtime socket, not running, the stop fails, or the kubelet does not start it again within
//! the timeout, e.g. `restartPolicy: Never`) is reported as a fallback: the operator evicts its
//! pod instead.

use std::time::{Duration, Instant};

use unwedge_crds::{ContainerRestart, ContainerTarget, RestartResult};

use crate::cri::{CriClient, CriError, RuntimeContainer, Selector};

/// How often the runtime is asked whether a stopped container runs again.
pub const POLL: Duration = Duration::from_millis(200);

/// The runtime calls a restart needs (the CRI client; tests serve a stand-in over gRPC).
pub trait Runtime: Send + Sync {
    /// The containers selected by `sel`.
    fn list(
        &self,
        sel: &Selector,
    ) -> impl std::future::Future<Output = Result<Vec<RuntimeContainer>, CriError>> + Send;
    /// Stops container `id`, waiting up to `grace` before it is killed.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl std::future::Future<Output = Result<(), CriError>> + Send;
}

impl Runtime for CriClient {
    async fn list(&self, sel: &Selector) -> Result<Vec<RuntimeContainer>, CriError> {
        self.list_containers(sel).await
    }
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        self.stop_container(id, grace).await
    }
}

/// The containers the agent itself vouches for as restartable for one wedge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// `(namespace, pod, container)` of every container PodResources lists as holding the
    /// wedged device now.
    pub consumers: Vec<(String, String, String)>,
    /// The runtime id of the blamed task's container (`spec.blamed.containerId`).
    pub blamed_container_id: Option<String>,
}

/// Which running container a target means: by pod UID and container name, or — for the
/// blamed task's container, whose name the approval may not know — by the blamed container id
/// the agent recorded at detection. `None`: neither is known.
pub fn selector(target: &ContainerTarget, allowed: &Allowed) -> Option<Selector> {
    if !target.container.is_empty() {
        return Some(Selector::running(&target.uid, &target.container));
    }
    allowed
        .blamed_container_id
        .as_deref()
        .map(Selector::running_id)
}

/// Why a target may not be touched, if it may not: the pure check before the stop. `running`
/// is the running container the runtime lists for the target ([`selector`]).
pub fn refusal(
    target: &ContainerTarget,
    running: &RuntimeContainer,
    allowed: &Allowed,
) -> Option<String> {
    if running.pod_uid != target.uid
        || running.pod_namespace != target.namespace
        || running.pod_name != target.pod
    {
        return Some(format!(
            "the runtime's container {} belongs to {}/{} (uid {}), not {}/{} (uid {})",
            running.id,
            running.pod_namespace,
            running.pod_name,
            running.pod_uid,
            target.namespace,
            target.pod,
            target.uid
        ));
    }
    let consumer = allowed
        .consumers
        .iter()
        .any(|(ns, pod, c)| *ns == target.namespace && *pod == target.pod && *c == running.name);
    let blamed = allowed.blamed_container_id.as_deref() == Some(running.id.as_str());
    if consumer || blamed {
        None
    } else {
        Some(format!(
            "{}/{} container {} neither holds the wedged device (PodResources) nor ran the blamed task",
            target.namespace, target.pod, running.name
        ))
    }
}

/// Restarts every target (concurrently) and says how each ended, in the order given.
pub async fn restart_all<R: Runtime>(
    rt: &R,
    targets: &[ContainerTarget],
    allowed: &Allowed,
    grace: Duration,
    timeout: Duration,
) -> Vec<ContainerRestart> {
    futures::future::join_all(
        targets
            .iter()
            .map(|t| restart_one(rt, t, allowed, grace, timeout)),
    )
    .await
}

/// A record of `t` with `result` and `message`, nothing measured.
fn record(t: &ContainerTarget, result: RestartResult, message: String) -> ContainerRestart {
    ContainerRestart {
        namespace: t.namespace.clone(),
        pod: t.pod.clone(),
        container: t.container.clone(),
        result,
        old_restart_count: None,
        new_restart_count: None,
        millis_to_running: None,
        message,
    }
}

/// Stops `t`'s running container and waits until the kubelet runs a new one in the same pod.
pub async fn restart_one<R: Runtime>(
    rt: &R,
    t: &ContainerTarget,
    allowed: &Allowed,
    grace: Duration,
    timeout: Duration,
) -> ContainerRestart {
    let Some(sel) = selector(t, allowed) else {
        return record(
            t,
            RestartResult::Refused,
            "the approval names no container and the agent recorded no blamed container".into(),
        );
    };
    let running = match rt.list(&sel).await {
        Ok(list) => list,
        Err(e) => return record(t, RestartResult::Fallback, e.to_string()),
    };
    let Some(old) = running
        .into_iter()
        .max_by_key(|c| (c.attempt, c.created_at))
    else {
        return record(
            t,
            RestartResult::Fallback,
            format!(
                "no running container {} of pod uid {} on this node's runtime",
                t.container, t.uid
            ),
        );
    };
    if let Some(why) = refusal(t, &old, allowed) {
        return record(t, RestartResult::Refused, why);
    }
    let t = &ContainerTarget {
        container: old.name.clone(),
        ..t.clone()
    };
    let sel = Selector::running(&t.uid, &old.name);
    let started = Instant::now();
    if let Err(e) = rt.stop(&old.id, grace).await {
        let mut r = record(
            t,
            RestartResult::Fallback,
            format!("stopping {}: {e}", old.id),
        );
        r.old_restart_count = Some(old.attempt);
        return r;
    }
    let deadline = started + grace + timeout;
    loop {
        if let Ok(list) = rt.list(&sel).await
            && let Some(new) = list
                .into_iter()
                .filter(|c| c.id != old.id && c.attempt > old.attempt)
                .max_by_key(|c| c.attempt)
        {
            let mut r = record(
                t,
                RestartResult::Restarted,
                format!("container {} stopped, {} running", old.id, new.id),
            );
            r.old_restart_count = Some(old.attempt);
            r.new_restart_count = Some(new.attempt);
            r.millis_to_running =
                Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
            return r;
        }
        if Instant::now() >= deadline {
            let mut r = record(
                t,
                RestartResult::Fallback,
                format!(
                    "stopped {} but no new container ran within {:?} (restartPolicy Never, or the kubelet backs off)",
                    old.id,
                    grace + timeout
                ),
            );
            r.old_restart_count = Some(old.attempt);
            return r;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line for the attempt's message: how many containers restarted, fell back, were refused.
pub fn summary(restarts: &[ContainerRestart]) -> String {
    let count = |r: RestartResult| restarts.iter().filter(|x| x.result == r).count();
    let mut parts = vec![format!(
        "restarted {} of {} container(s) in place",
        count(RestartResult::Restarted),
        restarts.len()
    )];
    for x in restarts
        .iter()
        .filter(|x| x.result != RestartResult::Restarted)
    {
        parts.push(format!(
            "{}/{}/{}: {:?}: {}",
            x.namespace, x.pod, x.container, x.result, x.message
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::State;

    fn target(pod: &str, container: &str) -> ContainerTarget {
        ContainerTarget {
            namespace: "ml".into(),
            pod: pod.into(),
            uid: format!("u-{pod}"),
            container: container.into(),
        }
    }

    fn running(id: &str, pod: &str, name: &str) -> RuntimeContainer {
        RuntimeContainer {
            id: id.into(),
            pod_sandbox_id: format!("sb-{pod}"),
            name: name.into(),
            attempt: 0,
            state: State::Running,
            created_at: 0,
            pod_uid: format!("u-{pod}"),
            pod_namespace: "ml".into(),
            pod_name: pod.into(),
        }
    }

    #[test]
    fn only_consumers_and_the_blamed_container_may_be_restarted() {
        let allowed = Allowed {
            consumers: vec![("ml".into(), "train-0".into(), "main".into())],
            blamed_container_id: Some("c-blamed".into()),
        };
        let t = target("train-0", "main");
        assert_eq!(
            refusal(&t, &running("c1", "train-0", "main"), &allowed),
            None
        );
        let side = target("train-0", "sidecar");
        assert!(refusal(&side, &running("c2", "train-0", "sidecar"), &allowed).is_some());
        let other = target("other", "main");
        assert_eq!(
            refusal(&other, &running("c-blamed", "other", "main"), &allowed),
            None
        );
        assert!(refusal(&other, &running("c3", "other", "main"), &allowed).is_some());
        // The runtime's labels must name the approved pod, whatever the approval says.
        assert!(
            refusal(&t, &running("c1", "impostor", "main"), &allowed)
                .unwrap()
                .contains("belongs to ml/impostor")
        );
        assert!(refusal(&t, &running("c1", "train-0", "main"), &Allowed::default()).is_some());
    }

    #[test]
    fn a_nameless_target_is_the_blamed_container_by_id() {
        let allowed = Allowed {
            consumers: vec![],
            blamed_container_id: Some("c-blamed".into()),
        };
        let mut t = target("train-0", "");
        assert_eq!(
            selector(&t, &allowed),
            Some(Selector::running_id("c-blamed"))
        );
        assert_eq!(selector(&t, &Allowed::default()), None);
        t.container = "main".into();
        assert_eq!(
            selector(&t, &allowed),
            Some(Selector::running("u-train-0", "main"))
        );
        // The blamed container must still belong to the approved pod UID.
        let mut other = running("c-blamed", "train-0", "main");
        other.pod_uid = "u-replacement".into();
        assert!(
            refusal(&t, &other, &allowed)
                .unwrap()
                .contains("uid u-replacement")
        );
    }

    #[test]
    fn the_summary_names_what_did_not_restart() {
        let t = target("train-0", "main");
        let mut ok = record(&t, RestartResult::Restarted, String::new());
        ok.new_restart_count = Some(1);
        let fb = record(
            &target("b", "main"),
            RestartResult::Fallback,
            "no socket".into(),
        );
        let s = summary(&[ok, fb]);
        assert!(
            s.starts_with("restarted 1 of 2 container(s) in place"),
            "{s}"
        );
        assert!(s.contains("ml/b/main: Fallback: no socket"), "{s}");
    }
}
