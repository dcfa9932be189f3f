//! The container runtime's CRI RuntimeService (`runtime.v1`, the API the kubelet itself speaks)
//! on the runtime's unix socket (containerd: `/run/containerd/containerd.sock`): list the
//! containers of a pod, by the labels the kubelet puts on every container it creates, and stop
//! one so that the kubelet restarts it in the same pod, with the same device allocation
//! (in-place restarts of a `none` wedge's containers, [`crate::restart`]). This module is the
//! client only.
//!
//! Every listed container is checked against the selector again on this side, so a runtime
//! that ignores part of a filter can never make the agent stop a container of another pod.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Endpoint, Uri};
use tower::service_fn;

/// The generated CRI `runtime.v1` subset (`proto/cri.proto`), client and server (the tests
/// serve it).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("runtime.v1");
}

use proto::runtime_service_client::RuntimeServiceClient;

/// How long a `Version` or `ListContainers` call may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Label the kubelet sets on every container: the UID of its pod.
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// Label the kubelet sets on every container: the pod's name.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// Label the kubelet sets on every container: the pod's namespace.
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Label the kubelet sets on every container: its name in the pod spec.
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// Why a CRI call failed.
#[derive(Debug, Error)]
pub enum CriError {
    /// The runtime socket does not exist (no runtime, or it is not mounted into the agent).
    #[error("the container runtime socket {} is not there (is --cri-socket right and mounted?)", socket.display())]
    NoSocket {
        /// The socket path.
        socket: PathBuf,
    },
    /// No connection to the runtime socket.
    #[error("connecting to the container runtime socket {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The call failed.
    #[error("CRI {call} on {}: {status}", socket.display())]
    Rpc {
        /// The socket path.
        socket: PathBuf,
        /// `Version`, `ListContainers` or `StopContainer`.
        call: &'static str,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
    /// The call did not finish in time.
    #[error("CRI {call} on {} took longer than {timeout:?}", socket.display())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// `Version`, `ListContainers` or `StopContainer`.
        call: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

/// The runtime's name and versions (`Version`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// The runtime's name, e.g. `containerd`.
    pub runtime_name: String,
    /// The runtime's version.
    pub runtime_version: String,
    /// The CRI version it speaks, e.g. `v1`.
    pub runtime_api_version: String,
}

/// A container's state as the runtime reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited.
    Exited,
    /// The runtime does not know (or sent a value this client does not know).
    Unknown,
}

impl From<i32> for State {
    fn from(v: i32) -> State {
        match proto::ContainerState::try_from(v) {
            Ok(proto::ContainerState::ContainerCreated) => State::Created,
            Ok(proto::ContainerState::ContainerRunning) => State::Running,
            Ok(proto::ContainerState::ContainerExited) => State::Exited,
            _ => State::Unknown,
        }
    }
}

/// One container as the runtime lists it, with the kubelet's labels read out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeContainer {
    /// The runtime's container id (what `StopContainer` takes; the pod status's `containerID`
    /// without its `containerd://` prefix).
    pub id: String,
    /// The id of the pod sandbox it belongs to.
    pub pod_sandbox_id: String,
    /// Its name in the pod spec (`metadata.name`).
    pub name: String,
    /// How many times the kubelet created it before in this sandbox (`metadata.attempt`).
    pub attempt: u32,
    /// Its state.
    pub state: State,
    /// When it was created, in nanoseconds since the epoch.
    pub created_at: i64,
    /// Its pod's UID (label [`LABEL_POD_UID`]; empty if the kubelet did not set it).
    pub pod_uid: String,
    /// Its pod's namespace (label [`LABEL_POD_NAMESPACE`]).
    pub pod_namespace: String,
    /// Its pod's name (label [`LABEL_POD_NAME`]).
    pub pod_name: String,
}

/// Which containers to list. Every field that is set must match (AND), as in the CRI's
/// `ContainerFilter`; an empty selector lists every container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// The container id (what `/proc/<PID>/cgroup` gives for a blamed task, see `blamed.rs`).
    pub id: Option<String>,
    /// The pod's UID (label [`LABEL_POD_UID`]).
    pub pod_uid: Option<String>,
    /// The container's name in the pod spec (label [`LABEL_CONTAINER_NAME`]).
    pub container_name: Option<String>,
    /// The pod sandbox id.
    pub pod_sandbox_id: Option<String>,
    /// Only running containers.
    pub running_only: bool,
}

impl Selector {
    /// The running containers named `container` of the pod `pod_uid`.
    pub fn running(pod_uid: &str, container: &str) -> Selector {
        Selector {
            id: None,
            pod_uid: Some(pod_uid.to_string()),
            container_name: Some(container.to_string()),
            pod_sandbox_id: None,
            running_only: true,
        }
    }

    /// The container `id` if it is running (the container of a blamed task).
    pub fn running_id(id: &str) -> Selector {
        Selector {
            id: Some(id.to_string()),
            running_only: true,
            ..Selector::default()
        }
    }

    /// The CRI filter of this selector.
    pub fn filter(&self) -> proto::ContainerFilter {
        let mut labels = HashMap::new();
        if let Some(uid) = &self.pod_uid {
            labels.insert(LABEL_POD_UID.to_string(), uid.clone());
        }
        if let Some(name) = &self.container_name {
            labels.insert(LABEL_CONTAINER_NAME.to_string(), name.clone());
        }
        proto::ContainerFilter {
            id: self.id.clone().unwrap_or_default(),
            state: self.running_only.then_some(proto::ContainerStateValue {
                state: proto::ContainerState::ContainerRunning as i32,
            }),
            pod_sandbox_id: self.pod_sandbox_id.clone().unwrap_or_default(),
            label_selector: labels,
        }
    }

    /// Whether `c` is selected (the same test as [`Selector::filter`], made on this side).
    pub fn matches(&self, c: &RuntimeContainer) -> bool {
        self.id.as_ref().is_none_or(|i| *i == c.id)
            && self.pod_uid.as_ref().is_none_or(|u| *u == c.pod_uid)
            && self.container_name.as_ref().is_none_or(|n| *n == c.name)
            && self
                .pod_sandbox_id
                .as_ref()
                .is_none_or(|s| *s == c.pod_sandbox_id)
            && (!self.running_only || c.state == State::Running)
    }
}

impl From<proto::Container> for RuntimeContainer {
    fn from(c: proto::Container) -> RuntimeContainer {
        let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
        let metadata = c.metadata.clone().unwrap_or_default();
        // The kubelet's container-name label is authoritative; metadata.name is the fallback.
        let name = c
            .labels
            .get(LABEL_CONTAINER_NAME)
            .cloned()
            .unwrap_or(metadata.name);
        RuntimeContainer {
            pod_uid: label(LABEL_POD_UID),
            pod_namespace: label(LABEL_POD_NAMESPACE),
            pod_name: label(LABEL_POD_NAME),
            id: c.id,
            pod_sandbox_id: c.pod_sandbox_id,
            name,
            attempt: metadata.attempt,
            state: State::from(c.state),
            created_at: c.created_at,
        }
    }
}

/// A connection to the runtime's CRI RuntimeService.
#[derive(Clone, Debug)]
pub struct CriClient {
    socket: PathBuf,
    timeout: Duration,
    inner: RuntimeServiceClient<tonic::transport::Channel>,
}

impl CriClient {
    /// Connects to the runtime's unix socket `socket`; `timeout` bounds the connection and each
    /// `Version` and `ListContainers` call ([`CALL_TIMEOUT`] is the default to use).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<CriClient, CriError> {
        if !socket.exists() {
            return Err(CriError::NoSocket {
                socket: socket.to_path_buf(),
            });
        }
        let path = socket.to_path_buf();
        // The URI is required by the API but unused: the connector dials the unix socket.
        let endpoint = Endpoint::from_static("http://localhost").connect_timeout(timeout);
        let connect = endpoint.connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }));
        let channel = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                return Err(CriError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                });
            }
            Err(_) => {
                return Err(CriError::Timeout {
                    socket: socket.to_path_buf(),
                    call: "connect",
                    timeout,
                });
            }
        };
        Ok(CriClient {
            socket: socket.to_path_buf(),
            timeout,
            inner: RuntimeServiceClient::new(channel),
        })
    }

    /// Runs one call with a time limit, mapping its errors.
    async fn call<T>(
        &self,
        call: &'static str,
        timeout: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CriError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(CriError::Rpc {
                socket: self.socket.clone(),
                call,
                status: Box::new(status),
            }),
            Err(_) => Err(CriError::Timeout {
                socket: self.socket.clone(),
                call,
                timeout,
            }),
        }
    }

    /// The runtime's name and versions.
    pub async fn version(&self) -> Result<RuntimeVersion, CriError> {
        let mut c = self.inner.clone();
        let v = self
            .call(
                "Version",
                self.timeout,
                c.version(proto::VersionRequest {
                    version: "v1".into(),
                }),
            )
            .await?;
        Ok(RuntimeVersion {
            runtime_name: v.runtime_name,
            runtime_version: v.runtime_version,
            runtime_api_version: v.runtime_api_version,
        })
    }

    /// The containers `sel` selects, in the runtime's order. The runtime filters; every
    /// container it returns is checked against `sel` again here.
    pub async fn list_containers(&self, sel: &Selector) -> Result<Vec<RuntimeContainer>, CriError> {
        let mut c = self.inner.clone();
        let resp = self
            .call(
                "ListContainers",
                self.timeout,
                c.list_containers(proto::ListContainersRequest {
                    filter: Some(sel.filter()),
                }),
            )
            .await?;
        Ok(resp
            .containers
            .into_iter()
            .map(RuntimeContainer::from)
            .filter(|c| sel.matches(c))
            .collect())
    }

    /// Stops the container `id`: the runtime signals it, waits up to `grace` (whole seconds,
    /// rounded up) and then kills it; the kubelet then restarts it in the same pod if the pod's
    /// `restartPolicy` allows. Idempotent for a stopped container. The call may take `grace`
    /// plus the client's timeout.
    pub async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let mut c = self.inner.clone();
        self.call(
            "StopContainer",
            Duration::from_secs(secs) + self.timeout,
            c.stop_container(proto::StopContainerRequest {
                container_id: id.to_string(),
                timeout: i64::try_from(secs).unwrap_or(i64::MAX),
            }),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(
        id: &str,
        uid: &str,
        name: &str,
        state: proto::ContainerState,
    ) -> proto::Container {
        proto::Container {
            id: id.into(),
            pod_sandbox_id: format!("sb-{uid}"),
            metadata: Some(proto::ContainerMetadata {
                name: name.into(),
                attempt: 2,
            }),
            state: state as i32,
            labels: [
                (LABEL_POD_UID.to_string(), uid.to_string()),
                (LABEL_CONTAINER_NAME.to_string(), name.to_string()),
                (LABEL_POD_NAME.to_string(), "train-0".to_string()),
                (LABEL_POD_NAMESPACE.to_string(), "ml".to_string()),
            ]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_filter_says_what_matches_checks() {
        let f = Selector::running("u1", "main").filter();
        assert_eq!(f.label_selector[LABEL_POD_UID], "u1");
        assert_eq!(f.label_selector[LABEL_CONTAINER_NAME], "main");
        assert_eq!(
            f.state.map(|s| s.state),
            Some(proto::ContainerState::ContainerRunning as i32)
        );
        assert!(f.id.is_empty() && f.pod_sandbox_id.is_empty());
        assert_eq!(Selector::running_id("c1").filter().id, "c1");
        let empty = Selector::default().filter();
        assert!(empty.label_selector.is_empty() && empty.state.is_none());
    }

    #[test]
    fn matches_is_an_and_of_every_field_set() {
        use proto::ContainerState::*;
        let sel = Selector::running("u1", "main");
        let c = |id, uid, name, st| RuntimeContainer::from(container(id, uid, name, st));
        assert!(sel.matches(&c("a", "u1", "main", ContainerRunning)));
        assert!(!sel.matches(&c("b", "u2", "main", ContainerRunning)));
        assert!(!sel.matches(&c("c", "u1", "sidecar", ContainerRunning)));
        assert!(!sel.matches(&c("d", "u1", "main", ContainerExited)));
        let by_sandbox = Selector {
            pod_sandbox_id: Some("sb-u1".into()),
            ..Selector::default()
        };
        assert!(by_sandbox.matches(&c("e", "u1", "sidecar", ContainerExited)));
        assert!(!by_sandbox.matches(&c("f", "u2", "main", ContainerRunning)));
        assert!(Selector::running_id("a").matches(&c("a", "u1", "main", ContainerRunning)));
        assert!(!Selector::running_id("a").matches(&c("b", "u1", "main", ContainerRunning)));
        let read = c("g", "u1", "main", ContainerCreated);
        assert_eq!(
            (
                read.attempt,
                read.state,
                read.pod_name.as_str(),
                read.pod_namespace.as_str()
            ),
            (2, State::Created, "train-0", "ml")
        );
        assert_eq!(State::from(99), State::Unknown);
    }
}
