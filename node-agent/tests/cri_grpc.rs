//! The CRI RuntimeService client against a real tonic gRPC server on a unix socket speaking the
//! `runtime.v1` proto: a stand-in runtime that filters as containerd does (`ContainerFilter`
//! fields ANDed, labels matched exactly), stops containers, and can be told to ignore filters,
//! fail or stall.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tonic::{Code, Request, Response, Status};
use unwedge_agent::cri::proto::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use unwedge_agent::cri::proto::*;
use unwedge_agent::cri::{
    CriClient, CriError, LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
    Selector, State,
};
use unwedge_agent::restart::{Allowed, restart_all};
use unwedge_crds::{ContainerTarget, RestartResult};

#[derive(Default)]
struct Runtime {
    containers: Mutex<Vec<Container>>,
    /// Every StopContainer request: (container id, timeout seconds).
    stops: Mutex<Vec<(String, i64)>>,
    /// Answer ListContainers with every container, whatever the filter.
    ignore_filter: bool,
    /// Fail every call with this code.
    fail: Option<Code>,
    delay: Duration,
    /// Act as the kubelet: this long after a stop, run a new container of the same pod and
    /// name with the next attempt number, unless the pod's uid is in `never`.
    restart_after: Option<Duration>,
    /// Pod uids whose containers the "kubelet" never restarts (`restartPolicy: Never`).
    never: Vec<String>,
}

fn selected(f: &ContainerFilter, c: &Container) -> bool {
    (f.id.is_empty() || f.id == c.id)
        && f.state.as_ref().is_none_or(|s| s.state == c.state)
        && (f.pod_sandbox_id.is_empty() || f.pod_sandbox_id == c.pod_sandbox_id)
        && f.label_selector
            .iter()
            .all(|(k, v)| c.labels.get(k) == Some(v))
}

/// The runtime as served (the test keeps another handle to look at it).
struct Served(Arc<Runtime>);

impl std::ops::Deref for Served {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        &self.0
    }
}

#[tonic::async_trait]
impl RuntimeService for Served {
    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        self.gate().await?;
        Ok(Response::new(VersionResponse {
            version: req.into_inner().version,
            runtime_name: "containerd".into(),
            runtime_version: "v2.1.4".into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn stop_container(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        self.gate().await?;
        let r = req.into_inner();
        let mut cs = self.containers.lock().unwrap();
        let Some(c) = cs.iter_mut().find(|c| c.id == r.container_id) else {
            return Err(Status::not_found(format!(
                "an error occurred when try to find container {:?}: not found",
                r.container_id
            )));
        };
        c.state = ContainerState::ContainerExited as i32;
        let stopped = c.clone();
        drop(cs);
        self.stops.lock().unwrap().push((r.container_id, r.timeout));
        let uid = stopped.labels[LABEL_POD_UID].clone();
        if let Some(after) = self.restart_after
            && !self.never.contains(&uid)
        {
            let rt = self.0.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let mut next = stopped;
                let meta = next.metadata.get_or_insert_with(Default::default);
                meta.attempt += 1;
                next.id = format!("{}-{}", meta.name, meta.attempt);
                next.state = ContainerState::ContainerRunning as i32;
                rt.containers.lock().unwrap().push(next);
            });
        }
        Ok(Response::new(StopContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        self.gate().await?;
        let f = req.into_inner().filter.unwrap_or_default();
        let containers = self
            .containers
            .lock()
            .unwrap()
            .iter()
            .filter(|c| self.ignore_filter || selected(&f, c))
            .cloned()
            .collect();
        Ok(Response::new(ListContainersResponse { containers }))
    }
}

impl Runtime {
    async fn gate(&self) -> Result<(), Status> {
        tokio::time::sleep(self.delay).await;
        match self.fail {
            Some(code) => Err(Status::new(code, "runtime says no")),
            None => Ok(()),
        }
    }
}

/// A container as containerd lists one the kubelet created (the kubelet's labels).
fn container(id: &str, pod: &str, uid: &str, name: &str, state: ContainerState) -> Container {
    Container {
        id: id.into(),
        pod_sandbox_id: format!("sandbox-{uid}"),
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: "sha256:0123".into(),
            ..Default::default()
        }),
        image_ref: "sha256:0123".into(),
        state: state as i32,
        created_at: 1_800_000_000_000_000_000,
        labels: [
            (LABEL_POD_UID, uid),
            (LABEL_POD_NAME, pod),
            (LABEL_POD_NAMESPACE, "ml"),
            (LABEL_CONTAINER_NAME, name),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    }
}

/// Two pods on the node: train-0 (uid u-train, containers main and sidecar, and an exited
/// earlier main) and other (uid u-other, container main).
fn node_containers() -> Vec<Container> {
    use ContainerState::*;
    vec![
        container("c-old-main", "train-0", "u-train", "main", ContainerExited),
        container("c-main", "train-0", "u-train", "main", ContainerRunning),
        container(
            "c-sidecar",
            "train-0",
            "u-train",
            "sidecar",
            ContainerRunning,
        ),
        container("c-other", "other", "u-other", "main", ContainerRunning),
    ]
}

fn serve(path: &Path, rt: Arc<Runtime>) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(RuntimeServiceServer::new(Served(rt)))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    })
}

struct TestRuntime {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    rt: Arc<Runtime>,
    server: tokio::task::JoinHandle<()>,
}

fn runtime(rt: Runtime) -> TestRuntime {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("containerd.sock");
    let rt = Arc::new(rt);
    let server = serve(&sock, rt.clone());
    TestRuntime {
        _dir: dir,
        sock,
        rt,
        server,
    }
}

fn ids(cs: &[unwedge_agent::cri::RuntimeContainer]) -> Vec<&str> {
    cs.iter().map(|c| c.id.as_str()).collect()
}

#[tokio::test]
async fn lists_the_running_container_of_a_pod_by_the_kubelets_labels() {
    let t = runtime(Runtime {
        containers: Mutex::new(node_containers()),
        ..Runtime::default()
    });
    let cri = CriClient::connect(&t.sock, Duration::from_secs(5))
        .await
        .unwrap();
    let v = cri.version().await.unwrap();
    assert_eq!(
        (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
        ("containerd", "v1")
    );
    let main = cri
        .list_containers(&Selector::running("u-train", "main"))
        .await
        .unwrap();
    assert_eq!(
        ids(&main),
        ["c-main"],
        "not the exited one, not the sidecar"
    );
    let c = &main[0];
    assert_eq!(
        (
            c.name.as_str(),
            c.pod_name.as_str(),
            c.pod_namespace.as_str(),
            c.pod_uid.as_str(),
            c.pod_sandbox_id.as_str(),
            c.state
        ),
        (
            "main",
            "train-0",
            "ml",
            "u-train",
            "sandbox-u-train",
            State::Running
        )
    );
    let sandbox = cri
        .list_containers(&Selector {
            pod_sandbox_id: Some("sandbox-u-train".into()),
            ..Selector::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(&sandbox), ["c-old-main", "c-main", "c-sidecar"]);
    let blamed = cri
        .list_containers(&Selector::running_id("c-sidecar"))
        .await
        .unwrap();
    assert_eq!(ids(&blamed), ["c-sidecar"], "by container id");
    assert!(
        cri.list_containers(&Selector::running_id("c-old-main"))
            .await
            .unwrap()
            .is_empty(),
        "an exited container is not running"
    );
    let none = cri
        .list_containers(&Selector::running("u-gone", "main"))
        .await
        .unwrap();
    assert!(none.is_empty());
    t.server.abort();
}

#[tokio::test]
async fn stops_exactly_the_container_named_with_its_grace_period() {
    let t = runtime(Runtime {
        containers: Mutex::new(node_containers()),
        ..Runtime::default()
    });
    let cri = CriClient::connect(&t.sock, Duration::from_secs(5))
        .await
        .unwrap();
    cri.stop_container("c-main", Duration::from_millis(2500))
        .await
        .unwrap();
    assert_eq!(
        *t.rt.stops.lock().unwrap(),
        [("c-main".to_string(), 3)],
        "grace rounded up to whole seconds"
    );
    assert!(
        cri.list_containers(&Selector::running("u-train", "main"))
            .await
            .unwrap()
            .is_empty(),
        "c-main is no longer running"
    );
    let still = cri.list_containers(&Selector::default()).await.unwrap();
    let running: Vec<&str> = still
        .iter()
        .filter(|c| c.state == State::Running)
        .map(|c| c.id.as_str())
        .collect();
    assert_eq!(
        running,
        ["c-sidecar", "c-other"],
        "no other container stopped"
    );
    let err = cri
        .stop_container("c-nope", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CriError::Rpc { call: "StopContainer", status, .. } if status.code() == Code::NotFound),
        "{err}"
    );
    t.server.abort();
}

#[tokio::test]
async fn a_runtime_that_ignores_the_filter_cannot_widen_the_selection() {
    let t = runtime(Runtime {
        containers: Mutex::new(node_containers()),
        ignore_filter: true,
        ..Runtime::default()
    });
    let cri = CriClient::connect(&t.sock, Duration::from_secs(5))
        .await
        .unwrap();
    let main = cri
        .list_containers(&Selector::running("u-train", "main"))
        .await
        .unwrap();
    assert_eq!(ids(&main), ["c-main"]);
    let blamed = cri
        .list_containers(&Selector::running_id("c-other"))
        .await
        .unwrap();
    assert_eq!(ids(&blamed), ["c-other"]);
    t.server.abort();
}

#[tokio::test]
async fn a_missing_socket_a_failing_and_a_stalled_runtime_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("containerd.sock");
    let err = CriClient::connect(&missing, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, CriError::NoSocket { .. }), "{err}");
    assert!(err.to_string().contains("not there"), "{err}");

    let failing = runtime(Runtime {
        fail: Some(Code::Unavailable),
        ..Runtime::default()
    });
    let cri = CriClient::connect(&failing.sock, Duration::from_secs(5))
        .await
        .unwrap();
    let err = cri.list_containers(&Selector::default()).await.unwrap_err();
    assert!(
        matches!(&err, CriError::Rpc { call: "ListContainers", status, .. } if status.code() == Code::Unavailable),
        "{err}"
    );
    failing.server.abort();

    let stalled = runtime(Runtime {
        delay: Duration::from_secs(30),
        ..Runtime::default()
    });
    let cri = CriClient::connect(&stalled.sock, Duration::from_millis(300))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = cri.version().await.unwrap_err();
    assert!(
        matches!(
            err,
            CriError::Timeout {
                call: "Version",
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // StopContainer may take its grace period on top of the call limit.
    let started = std::time::Instant::now();
    let err = cri
        .stop_container("c-main", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CriError::Timeout {
                call: "StopContainer",
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1300));
    stalled.server.abort();
}

fn target(pod: &str, uid: &str, container: &str) -> ContainerTarget {
    ContainerTarget {
        namespace: "ml".into(),
        pod: pod.into(),
        uid: uid.into(),
        container: container.into(),
    }
}

#[tokio::test]
async fn restarts_allowed_containers_in_place_refuses_others_and_falls_back_when_none_comes_back() {
    let mut containers = node_containers();
    containers.push(container(
        "c-batch",
        "batch",
        "u-batch",
        "main",
        ContainerState::ContainerRunning,
    ));
    let t = runtime(Runtime {
        containers: Mutex::new(containers),
        restart_after: Some(Duration::from_millis(300)),
        never: vec!["u-batch".into()],
        ..Runtime::default()
    });
    let cri = CriClient::connect(&t.sock, Duration::from_secs(5))
        .await
        .unwrap();
    let allowed = Allowed {
        consumers: vec![
            ("ml".into(), "train-0".into(), "main".into()),
            ("ml".into(), "batch".into(), "main".into()),
        ],
        blamed_container_id: None,
    };
    let targets = [
        target("train-0", "u-train", "main"),
        // Not a consumer of the device: refused, never stopped.
        target("train-0", "u-train", "sidecar"),
        // The "kubelet" never restarts it: a fallback after the timeout.
        target("batch", "u-batch", "main"),
        // Gone from the node.
        target("gone", "u-gone", "main"),
    ];
    let out = restart_all(
        &cri,
        &targets,
        &allowed,
        Duration::from_secs(1),
        Duration::from_secs(2),
    )
    .await;
    let results: Vec<RestartResult> = out.iter().map(|r| r.result).collect();
    assert_eq!(
        results,
        [
            RestartResult::Restarted,
            RestartResult::Refused,
            RestartResult::Fallback,
            RestartResult::Fallback
        ],
        "{out:#?}"
    );
    let main = &out[0];
    assert_eq!(
        (main.old_restart_count, main.new_restart_count),
        (Some(0), Some(1))
    );
    assert!(
        main.millis_to_running.is_some_and(|ms| ms >= 300),
        "{main:?}"
    );
    assert!(
        out[2].message.contains("no new container ran"),
        "{:?}",
        out[2]
    );
    assert!(
        out[3].message.contains("no running container"),
        "{:?}",
        out[3]
    );
    let stopped: Vec<String> =
        t.rt.stops
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.0.clone())
            .collect();
    assert_eq!(
        {
            let mut s = stopped;
            s.sort();
            s
        },
        ["c-batch", "c-main"],
        "only the allowed containers were stopped"
    );
    let now_running = cri
        .list_containers(&Selector::running("u-train", "main"))
        .await
        .unwrap();
    assert_eq!(
        ids(&now_running),
        ["main-1"],
        "the same pod runs a new main"
    );
    t.server.abort();
}
