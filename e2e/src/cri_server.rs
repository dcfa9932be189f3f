//! The container runtime of one simulated node: the CRI `runtime.v1` RuntimeService (the subset
//! the agent speaks, `node-agent/proto/cri.proto`) served over a unix socket by a real tonic
//! server, with one running container per container of every pod bound to the node in the API
//! server (fed by the PodResources stand-in's pod watch, [`crate::podresources_server`]).
//!
//! It also plays the kubelet's part in an in-place restart: a stopped container of a pod whose
//! `restartPolicy` is not `Never` runs again [`KUBELET_RESTART_DELAY`] later as a new container
//! (new id, attempt + 1) in the same pod. Containers carry the labels the kubelet puts on every
//! container (pod UID, name, namespace, container name), as containerd lists them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use unwedge_agent::cri::proto::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use unwedge_agent::cri::proto::*;
use unwedge_agent::cri::{
    LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID,
};

use crate::podresources_server::PodView;

/// How long after a stop the stand-in kubelet runs the container again (a real kubelet's first
/// restart after an exit takes about as long: its pod sync, no back-off yet).
pub const KUBELET_RESTART_DELAY: Duration = Duration::from_millis(500);

/// The node's containers, as the runtime knows them.
#[derive(Debug, Default)]
pub struct RuntimeState {
    /// Every container, running or exited, in creation order.
    containers: Vec<Container>,
    /// Pod uid → restartPolicy.
    restart_policy: BTreeMap<String, String>,
    /// Every StopContainer request, by container id.
    stops: Vec<String>,
    /// A counter for creation times and ids.
    created: i64,
}

impl RuntimeState {
    /// Brings the containers up to date with the pods now on the node: a new pod's containers
    /// start running; a gone pod's containers are removed.
    pub fn sync(&mut self, pods: &[PodView]) {
        let live: BTreeMap<&str, &PodView> = pods.iter().map(|p| (p.uid.as_str(), p)).collect();
        self.containers
            .retain(|c| live.contains_key(c.labels[LABEL_POD_UID].as_str()));
        self.restart_policy
            .retain(|uid, _| live.contains_key(uid.as_str()));
        for p in pods {
            if self.restart_policy.contains_key(&p.uid) {
                continue;
            }
            self.restart_policy
                .insert(p.uid.clone(), p.restart_policy.clone());
            for (name, _) in &p.containers {
                let c = self.new_container(p, name, 0);
                self.containers.push(c);
            }
        }
    }

    fn new_container(&mut self, p: &PodView, name: &str, attempt: u32) -> Container {
        self.created += 1;
        // 64 hex digits, as containerd's ids (and what `/proc/<pid>/cgroup` names).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(&p.uid, name, attempt), &mut h);
        let id = format!(
            "{:016x}{:048x}",
            std::hash::Hasher::finish(&h),
            self.created
        );
        Container {
            id,
            pod_sandbox_id: format!("sandbox-{}", p.uid),
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt,
            }),
            state: ContainerState::ContainerRunning as i32,
            created_at: self.created,
            labels: [
                (LABEL_POD_UID, p.uid.as_str()),
                (LABEL_POD_NAME, p.name.as_str()),
                (LABEL_POD_NAMESPACE, p.namespace.as_str()),
                (LABEL_CONTAINER_NAME, name),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }

    /// The container ids stopped so far.
    pub fn stops(&self) -> Vec<String> {
        self.stops.clone()
    }

    /// The running container `name` of pod `uid`: its id and attempt.
    pub fn running(&self, uid: &str, name: &str) -> Option<(String, u32)> {
        self.containers
            .iter()
            .filter(|c| {
                c.state == ContainerState::ContainerRunning as i32
                    && c.labels[LABEL_POD_UID] == uid
                    && c.labels[LABEL_CONTAINER_NAME] == name
            })
            .map(|c| (c.id.clone(), c.metadata.as_ref().map_or(0, |m| m.attempt)))
            .next_back()
    }
}

fn selected(f: &ContainerFilter, c: &Container) -> bool {
    (f.id.is_empty() || f.id == c.id)
        && f.state.as_ref().is_none_or(|s| s.state == c.state)
        && (f.pod_sandbox_id.is_empty() || f.pod_sandbox_id == c.pod_sandbox_id)
        && f.label_selector
            .iter()
            .all(|(k, v)| c.labels.get(k) == Some(v))
}

#[derive(Clone)]
struct Service(Arc<Mutex<RuntimeState>>);

impl Service {
    fn state(&self) -> std::sync::MutexGuard<'_, RuntimeState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[tonic::async_trait]
impl RuntimeService for Service {
    async fn version(
        &self,
        req: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: req.into_inner().version,
            runtime_name: "unwedge-e2e-runtime".into(),
            runtime_version: "0.1.0".into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn list_containers(
        &self,
        req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        let f = req.into_inner().filter.unwrap_or_default();
        let containers = self
            .state()
            .containers
            .iter()
            .filter(|c| selected(&f, c))
            .cloned()
            .collect();
        Ok(Response::new(ListContainersResponse { containers }))
    }

    async fn stop_container(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        let mut st = self.state();
        let Some(c) = st.containers.iter_mut().find(|c| c.id == id) else {
            return Err(Status::not_found(format!("container {id:?}: not found")));
        };
        if c.state != ContainerState::ContainerRunning as i32 {
            return Ok(Response::new(StopContainerResponse {}));
        }
        c.state = ContainerState::ContainerExited as i32;
        let stopped = c.clone();
        st.stops.push(id);
        let uid = stopped.labels[LABEL_POD_UID].clone();
        if st.restart_policy.get(&uid).map(String::as_str) == Some("Never") {
            return Ok(Response::new(StopContainerResponse {}));
        }
        let shared = self.0.clone();
        tokio::spawn(async move {
            tokio::time::sleep(KUBELET_RESTART_DELAY).await;
            let mut st = shared.lock().unwrap_or_else(|e| e.into_inner());
            if !st.restart_policy.contains_key(&uid) {
                return; // the pod went away meanwhile
            }
            let meta = stopped.metadata.clone().unwrap_or_default();
            let view = PodView {
                uid: uid.clone(),
                namespace: stopped.labels[LABEL_POD_NAMESPACE].clone(),
                name: stopped.labels[LABEL_POD_NAME].clone(),
                created: String::new(),
                containers: vec![],
                pinned: None,
                restart_policy: String::new(),
            };
            let next = st.new_container(&view, &meta.name, meta.attempt + 1);
            st.containers.push(next);
        });
        Ok(Response::new(StopContainerResponse {}))
    }
}

/// A running CRI server of one node; stops when dropped.
pub struct CriServer {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl CriServer {
    /// Serves `state` on the unix socket `socket`.
    pub fn start(state: Arc<Mutex<RuntimeState>>, socket: &Path) -> anyhow::Result<CriServer> {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RuntimeServiceServer::new(Service(state)))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(CriServer {
            stop: Some(tx),
            task,
        })
    }
}

impl Drop for CriServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, policy: &str) -> PodView {
        PodView {
            uid: uid.into(),
            namespace: "ns".into(),
            name: format!("p-{uid}"),
            created: String::new(),
            containers: vec![("main".into(), 1), ("side".into(), 0)],
            pinned: None,
            restart_policy: policy.into(),
        }
    }

    #[test]
    fn pods_bring_running_containers_and_take_them_away() {
        let mut st = RuntimeState::default();
        st.sync(&[pod("aaaaaaaa-1", "Always"), pod("bbbbbbbb-2", "Never")]);
        let (id, attempt) = st.running("aaaaaaaa-1", "main").unwrap();
        assert_eq!((id.len(), attempt), (64, 0));
        assert!(st.running("bbbbbbbb-2", "side").is_some());
        st.sync(&[pod("bbbbbbbb-2", "Never")]);
        assert_eq!(st.running("aaaaaaaa-1", "main"), None);
        assert_eq!(st.containers.len(), 2);
    }
}
