//! The kubelet PodResources v1 API of one simulated node, served over a unix socket by a real
//! tonic server, whose answers are derived from the pods really bound to that node in the API
//! server (a watch with `fieldSelector=spec.nodeName=<node>`).
//!
//! Device ids are PCI addresses, handed out first-fit in pod creation order to the containers
//! that request [`RESOURCE`], and stable while the pod lives. The pod annotation
//! [`ANN_DEVICES`] (comma-separated PCI addresses) pins them instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use unwedge_agent::podresources::proto;

use crate::cri_server::{CriServer, RuntimeState};
use unwedge_agent::podresources::proto::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};

/// The extended resource fake GPUs are requested as.
pub const RESOURCE: &str = "unwedge.io/fake-gpu";
/// Pod annotation that pins the device ids (comma-separated PCI addresses).
pub const ANN_DEVICES: &str = "e2e.unwedge.io/devices";

/// What the assigner needs to know about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// Pod uid.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Creation time (RFC 3339, sorts chronologically) and name, for first-fit order.
    pub created: String,
    /// Containers and the number of fake GPUs each requests.
    pub containers: Vec<(String, u32)>,
    /// Pinned device ids, from the annotation.
    pub pinned: Option<Vec<String>>,
    /// The pod's `restartPolicy` (`Always` when unset).
    pub restart_policy: String,
}

impl PodView {
    /// Reads a pod; `None` for pods that hold no devices (finished pods).
    pub fn from_pod(p: &Pod) -> Option<PodView> {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            return None;
        }
        let spec = p.spec.as_ref()?;
        let containers = spec
            .containers
            .iter()
            .map(|c| {
                let req = c
                    .resources
                    .as_ref()
                    .and_then(|r| r.limits.as_ref().or(r.requests.as_ref()))
                    .and_then(|l| l.get(RESOURCE))
                    .and_then(|q| q.0.parse::<u32>().ok())
                    .unwrap_or(0);
                (c.name.clone(), req)
            })
            .collect();
        Some(PodView {
            uid: p.metadata.uid.clone()?,
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone()?,
            created: p
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            containers,
            pinned: p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_DEVICES))
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                }),
            restart_policy: spec
                .restart_policy
                .clone()
                .unwrap_or_else(|| "Always".into()),
        })
    }
}

/// A pod and, per container, its name and device ids.
type Assignment = (PodView, Vec<(String, Vec<String>)>);

/// Device assignment: first-fit in creation order, stable while the pod lives.
#[derive(Debug, Default)]
pub struct Assigner {
    devices: Vec<String>,
    /// uid → (pod, per container: name and device ids).
    assigned: BTreeMap<String, Assignment>,
}

impl Assigner {
    /// An assigner over the node's devices (PCI addresses, in first-fit order).
    pub fn new(devices: Vec<String>) -> Assigner {
        Assigner {
            devices,
            assigned: BTreeMap::new(),
        }
    }

    /// Brings the assignment up to date with the pods now on the node.
    pub fn update(&mut self, pods: &[PodView]) {
        let live: BTreeSet<&str> = pods.iter().map(|p| p.uid.as_str()).collect();
        self.assigned.retain(|uid, _| live.contains(uid.as_str()));
        let mut new: Vec<&PodView> = pods
            .iter()
            .filter(|p| !self.assigned.contains_key(&p.uid))
            .collect();
        new.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        for p in new {
            let mut used: BTreeSet<String> = self
                .assigned
                .values()
                .flat_map(|(_, cs)| cs.iter().flat_map(|(_, d)| d.iter().cloned()))
                .collect();
            let mut pinned = p.pinned.clone().map(|v| v.into_iter());
            let mut per = Vec::new();
            for (c, n) in &p.containers {
                let mut ids = Vec::new();
                for _ in 0..*n {
                    let next = match pinned.as_mut() {
                        Some(it) => it.next(),
                        None => self.devices.iter().find(|d| !used.contains(*d)).cloned(),
                    };
                    if let Some(d) = next {
                        used.insert(d.clone());
                        ids.push(d);
                    }
                }
                per.push((c.clone(), ids));
            }
            self.assigned.insert(p.uid.clone(), (p.clone(), per));
        }
    }

    /// The kubelet's List answer.
    pub fn list(&self) -> Vec<proto::PodResources> {
        let mut pods: Vec<&Assignment> = self.assigned.values().collect();
        pods.sort_by(|a, b| (&a.0.created, &a.0.name).cmp(&(&b.0.created, &b.0.name)));
        pods.into_iter().map(|(p, cs)| to_proto(p, cs)).collect()
    }

    /// The devices of one pod's containers, by namespace and name.
    pub fn get(&self, namespace: &str, name: &str) -> Option<proto::PodResources> {
        self.assigned
            .values()
            .find(|(p, _)| p.namespace == namespace && p.name == name)
            .map(|(p, cs)| to_proto(p, cs))
    }

    /// Device id → pod (`namespace/name`) for every device in use.
    pub fn holders(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (p, cs) in self.assigned.values() {
            for (_, ids) in cs {
                for d in ids {
                    m.insert(d.clone(), format!("{}/{}", p.namespace, p.name));
                }
            }
        }
        m
    }
}

fn to_proto(p: &PodView, cs: &[(String, Vec<String>)]) -> proto::PodResources {
    proto::PodResources {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        containers: cs
            .iter()
            .map(|(c, ids)| proto::ContainerResources {
                name: c.clone(),
                devices: if ids.is_empty() {
                    vec![]
                } else {
                    vec![proto::ContainerDevices {
                        resource_name: RESOURCE.to_string(),
                        device_ids: ids.clone(),
                        ..Default::default()
                    }]
                },
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[derive(Clone)]
struct Service {
    devices: Vec<String>,
    state: Arc<Mutex<Assigner>>,
}

#[tonic::async_trait]
impl PodResourcesLister for Service {
    async fn list(
        &self,
        _: Request<proto::ListPodResourcesRequest>,
    ) -> Result<Response<proto::ListPodResourcesResponse>, Status> {
        let pods = self.state.lock().unwrap_or_else(|e| e.into_inner()).list();
        Ok(Response::new(proto::ListPodResourcesResponse {
            pod_resources: pods,
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<proto::AllocatableResourcesRequest>,
    ) -> Result<Response<proto::AllocatableResourcesResponse>, Status> {
        Ok(Response::new(proto::AllocatableResourcesResponse {
            devices: vec![proto::ContainerDevices {
                resource_name: RESOURCE.to_string(),
                device_ids: self.devices.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }

    async fn get(
        &self,
        req: Request<proto::GetPodResourcesRequest>,
    ) -> Result<Response<proto::GetPodResourcesResponse>, Status> {
        let r = req.into_inner();
        let found = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.pod_namespace, &r.pod_name);
        match found {
            Some(p) => Ok(Response::new(proto::GetPodResourcesResponse {
                pod_resources: Some(p),
            })),
            None => Err(Status::not_found(format!(
                "pod {}/{} not found on this node",
                r.pod_namespace, r.pod_name
            ))),
        }
    }
}

/// A running PodResources server for one node.
pub struct PodResourcesServer {
    socket: PathBuf,
    state: Arc<Mutex<Assigner>>,
    runtime: Arc<Mutex<RuntimeState>>,
    cri: Option<CriServer>,
    stop: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl PodResourcesServer {
    /// Serves `node`'s PodResources on `socket`, assigning `devices` (PCI addresses).
    pub async fn start(
        client: Client,
        node: &str,
        devices: Vec<String>,
        socket: &Path,
    ) -> anyhow::Result<PodResourcesServer> {
        let _ = std::fs::remove_file(socket);
        let state = Arc::new(Mutex::new(Assigner::new(devices.clone())));
        let runtime = Arc::new(Mutex::new(RuntimeState::default()));
        let rt = runtime.clone();
        let pods: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let st = state.clone();
        let watch = tokio::spawn(async move {
            let mut current: BTreeMap<String, PodView> = BTreeMap::new();
            let mut init: Option<BTreeMap<String, PodView>> = None;
            let mut stream = watcher(pods, cfg).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                };
                match ev {
                    watcher::Event::Init => init = Some(BTreeMap::new()),
                    watcher::Event::InitApply(p) => {
                        if let (Some(m), Some(v)) = (init.as_mut(), PodView::from_pod(&p)) {
                            m.insert(v.uid.clone(), v);
                        }
                    }
                    watcher::Event::InitDone => current = init.take().unwrap_or_default(),
                    watcher::Event::Apply(p) => {
                        let uid = p.metadata.uid.clone().unwrap_or_default();
                        match PodView::from_pod(&p) {
                            Some(v) => current.insert(uid, v),
                            None => current.remove(&uid),
                        };
                    }
                    watcher::Event::Delete(p) => {
                        current.remove(&p.metadata.uid.clone().unwrap_or_default());
                    }
                }
                if init.is_none() {
                    let views: Vec<PodView> = current.values().cloned().collect();
                    st.lock().unwrap_or_else(|e| e.into_inner()).update(&views);
                    rt.lock().unwrap_or_else(|e| e.into_inner()).sync(&views);
                }
            }
        });
        let listener = tokio::net::UnixListener::bind(socket)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let (tx, rx) = oneshot::channel::<()>();
        let svc = Service {
            devices,
            state: state.clone(),
        };
        let serve = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(PodResourcesServer {
            socket: socket.to_path_buf(),
            state,
            stop: Some(tx),
            tasks: vec![watch, serve],
            runtime,
            cri: None,
        })
    }

    /// Also serves the node's container runtime (CRI) on `socket` (the agent's `--cri-socket`),
    /// its containers those of the pods this server sees.
    pub fn serve_runtime(&mut self, socket: &Path) -> anyhow::Result<()> {
        self.cri = Some(CriServer::start(self.runtime.clone(), socket)?);
        Ok(())
    }

    /// The node's container runtime, as the CRI stand-in keeps it.
    pub fn runtime(&self) -> std::sync::MutexGuard<'_, RuntimeState> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The unix socket (the agent's `--pod-resources-socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Device id → `namespace/pod` for every device in use now.
    pub fn holders(&self) -> BTreeMap<String, String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .holders()
    }

    /// Whether the pod `namespace/name` is listed with at least one device (several pods may
    /// share one pinned device, so [`PodResourcesServer::holders`] cannot tell).
    pub fn has_devices(&self, namespace: &str, name: &str) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(namespace, name)
            .is_some_and(|p| p.containers.iter().any(|c| !c.devices.is_empty()))
    }
}

impl Drop for PodResourcesServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, created: &str, gpus: u32, pinned: Option<&str>) -> PodView {
        PodView {
            uid: uid.into(),
            namespace: "ns".into(),
            name: format!("p-{uid}"),
            created: created.into(),
            containers: vec![("main".into(), gpus), ("side".into(), 0)],
            pinned: pinned.map(|p| p.split(',').map(String::from).collect()),
            restart_policy: "Always".into(),
        }
    }

    #[test]
    fn first_fit_in_creation_order_and_stable() {
        let devs: Vec<String> = (0..4).map(|i| format!("0000:0{}:00.0", 3 + i)).collect();
        let mut a = Assigner::new(devs.clone());
        a.update(&[
            pod("b", "2026-01-01T00:00:02Z", 1, None),
            pod("a", "2026-01-01T00:00:01Z", 2, None),
        ]);
        let h = a.holders();
        assert_eq!(h.get(&devs[0]).map(String::as_str), Some("ns/p-a"));
        assert_eq!(h.get(&devs[1]).map(String::as_str), Some("ns/p-a"));
        assert_eq!(h.get(&devs[2]).map(String::as_str), Some("ns/p-b"));
        // a goes away, c arrives: c gets a's first device, b keeps its own.
        a.update(&[
            pod("b", "2026-01-01T00:00:02Z", 1, None),
            pod("c", "2026-01-01T00:00:03Z", 1, None),
        ]);
        let h = a.holders();
        assert_eq!(h.get(&devs[0]).map(String::as_str), Some("ns/p-c"));
        assert_eq!(h.get(&devs[2]).map(String::as_str), Some("ns/p-b"));
        assert_eq!(h.len(), 2);
        let list = a.list();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list[0].containers[0].devices[0].device_ids,
            vec![devs[2].clone()]
        );
        assert!(
            list[0].containers[1].devices.is_empty(),
            "a container without a request holds nothing"
        );
    }

    #[test]
    fn annotation_pins_devices() {
        let devs: Vec<String> = (0..4).map(|i| format!("0000:0{}:00.0", 3 + i)).collect();
        let mut a = Assigner::new(devs.clone());
        a.update(&[pod("a", "1", 1, Some("0000:06:00.0"))]);
        assert_eq!(
            a.holders().get("0000:06:00.0").map(String::as_str),
            Some("ns/p-a")
        );
    }
}
