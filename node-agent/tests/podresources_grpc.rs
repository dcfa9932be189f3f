//! The PodResources client against a real tonic gRPC server on a unix socket speaking the
//! kubelet's v1 proto, and the device-id matching for the AMD (PCI address) and Intel
//! (`cardN-M`) plugins' ids over a kernel-layout sysfs fixture.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixListener;
use tonic::{Request, Response, Status};
use unwedge_agent::podresources::proto::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use unwedge_agent::podresources::proto::*;
use unwedge_agent::podresources::{
    DeviceIdMatch, PodResourcesError, advertised, allocatable, consumers, dra_consumers, list,
    list_with_timeout,
};
use unwedge_agent::sysfs::Sysfs;
use unwedge_agent::sysfs::fixture::{self, Layout};

struct Kubelet {
    pods: Vec<PodResources>,
    /// What `GetAllocatableResources` answers: (resource, device ids).
    allocatable: Vec<(&'static str, Vec<&'static str>)>,
    delay: Duration,
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(ListPodResourcesResponse {
            pod_resources: self.pods.clone(),
        }))
    }
    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(AllocatableResourcesResponse {
            devices: self
                .allocatable
                .iter()
                .map(|(r, ids)| ContainerDevices {
                    resource_name: (*r).into(),
                    device_ids: ids.iter().map(|s| s.to_string()).collect(),
                    topology: None,
                })
                .collect(),
            ..Default::default()
        }))
    }
    async fn get(
        &self,
        _: Request<GetPodResourcesRequest>,
    ) -> Result<Response<GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not used"))
    }
}

fn pod(ns: &str, name: &str, containers: &[(&str, &str, &[&str])]) -> PodResources {
    PodResources {
        name: name.into(),
        namespace: ns.into(),
        containers: containers
            .iter()
            .map(|(c, res, ids)| ContainerResources {
                name: (*c).into(),
                devices: vec![ContainerDevices {
                    resource_name: (*res).into(),
                    device_ids: ids.iter().map(|s| s.to_string()).collect(),
                    topology: None,
                }],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Serves `kubelet` on a unix socket at `path` until the returned handle is aborted/dropped
/// with the runtime.
fn serve(path: &Path, kubelet: Kubelet) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    });
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(kubelet))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    })
}

/// A node for the tests: the XGMI-hive sysfs fixture (card0 = 0000:03:00.0, card1 =
/// 0000:83:00.0 in the same hive, card2 = 0000:c3:00.0) and `kubelet` served on a socket.
struct TestNode {
    /// Holds the files; bind it (`_dir`) so they live as long as the test.
    _dir: tempfile::TempDir,
    sysfs: Sysfs,
    sock: std::path::PathBuf,
    server: tokio::task::JoinHandle<()>,
}

fn test_node(kubelet: Kubelet) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys");
    fixture::build(&sys, Layout::XgmiHive2).unwrap();
    let sock = dir.path().join("kubelet.sock");
    let server = serve(&sock, kubelet);
    TestNode {
        sysfs: Sysfs::new(&sys),
        sock,
        server,
        _dir: dir,
    }
}

#[tokio::test]
async fn list_and_match_amd_and_intel_ids() {
    let TestNode {
        sysfs,
        sock,
        server,
        _dir,
    } = test_node(Kubelet {
        pods: vec![
            pod(
                "ml",
                "train-0",
                &[
                    ("trainer", "amd.com/gpu", &["0000:03:00.0", "0000:83:00.0"]),
                    ("sidecar", "cpu", &[]),
                ],
            ),
            pod(
                "ml",
                "infer-1",
                &[("server", "amd.com/gpu", &["0000:C3:00.0"])],
            ),
            pod(
                "media",
                "transcode",
                &[("ffmpeg", "gpu.intel.com/xe", &["card1-0", "card1-3"])],
            ),
        ],
        allocatable: vec![],
        delay: Duration::ZERO,
    });

    let got = list(&sock).await.expect("list");
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(
        got[0],
        unwedge_agent::podresources::ContainerDevices {
            namespace: "ml".into(),
            pod: "train-0".into(),
            container: "trainer".into(),
            resource_name: "amd.com/gpu".into(),
            device_ids: vec!["0000:03:00.0".into(), "0000:83:00.0".into()],
            dra: None,
        }
    );

    // The hive of card0: the AMD pod holding both hive GPUs and the Intel-style ids of card1.
    let domain = vec!["0000:03:00.0".to_string(), "0000:83:00.0".to_string()];
    let who = consumers(&got, &domain, &DeviceIdMatch::Auto, &sysfs);
    let brief: Vec<(&str, &str, &str)> = who
        .iter()
        .map(|c| (c.pod.as_str(), c.device_id.as_str(), c.pci_address.as_str()))
        .collect();
    assert_eq!(
        brief,
        [
            ("train-0", "0000:03:00.0", "0000:03:00.0"),
            ("train-0", "0000:83:00.0", "0000:83:00.0"),
            ("transcode", "card1-0", "0000:83:00.0"),
            ("transcode", "card1-3", "0000:83:00.0"),
        ]
    );
    // Explicit modes: Pci ignores card names; Card ignores addresses.
    assert_eq!(
        consumers(&got, &domain, &DeviceIdMatch::Pci, &sysfs).len(),
        2
    );
    assert_eq!(
        consumers(&got, &domain, &DeviceIdMatch::Card, &sysfs).len(),
        2
    );
    // Upper-case addresses are normalized.
    let third = consumers(
        &got,
        &["0000:c3:00.0".to_string()],
        &DeviceIdMatch::Pci,
        &sysfs,
    );
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].pod, "infer-1");
    server.abort();
}

#[test]
fn index_and_map_matching() {
    let dir = tempfile::tempdir().unwrap();
    fixture::build(dir.path(), Layout::XgmiHive2).unwrap();
    let sysfs = Sysfs::new(dir.path());
    assert_eq!(
        DeviceIdMatch::Index.device_pci("2", &sysfs).as_deref(),
        Some("0000:c3:00.0")
    );
    assert_eq!(
        DeviceIdMatch::Index.device_pci("gpu-1", &sysfs).as_deref(),
        Some("0000:83:00.0")
    );
    assert_eq!(DeviceIdMatch::Index.device_pci("gpu-9", &sysfs), None);
    assert_eq!(DeviceIdMatch::Auto.device_pci("GPU-5a2c0f9e", &sysfs), None);
    assert_eq!(DeviceIdMatch::Card.device_pci("card7-0", &sysfs), None);
    assert_eq!(DeviceIdMatch::Card.device_pci("card0-x", &sysfs), None);

    let map_file = dir.path().join("map");
    std::fs::write(
        &map_file,
        "# uuid -> pci\nGPU-5a2c0f9e = 0000:83:00.0\n\nGPU-77 =0000:C3:00.0\n",
    )
    .unwrap();
    let m = DeviceIdMatch::from_options("map", Some(&map_file)).unwrap();
    let want: BTreeMap<String, String> =
        [("GPU-5a2c0f9e", "0000:83:00.0"), ("GPU-77", "0000:c3:00.0")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(m, DeviceIdMatch::Map(want));
    assert_eq!(
        m.device_pci("GPU-5a2c0f9e", &sysfs).as_deref(),
        Some("0000:83:00.0")
    );

    std::fs::write(&map_file, "GPU-1 = not-a-pci-address\n").unwrap();
    let err = DeviceIdMatch::load_map(&map_file).unwrap_err();
    assert!(
        matches!(err, PodResourcesError::MapLine { line: 1, .. }),
        "{err}"
    );
    assert!(matches!(
        DeviceIdMatch::from_options("uuid", None),
        Err(PodResourcesError::UnknownMatch(_))
    ));
}

#[tokio::test]
async fn missing_socket_and_slow_kubelet_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = list(&dir.path().join("absent.sock")).await.unwrap_err();
    assert!(matches!(err, PodResourcesError::Connect { .. }), "{err}");
    assert!(err.to_string().contains("absent.sock"), "{err}");

    let sock = dir.path().join("slow.sock");
    let server = serve(
        &sock,
        Kubelet {
            pods: vec![],
            allocatable: vec![],
            delay: Duration::from_secs(30),
        },
    );
    let started = std::time::Instant::now();
    let err = list_with_timeout(&sock, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PodResourcesError::Timeout { .. } | PodResourcesError::Rpc { .. }
        ),
        "want a timeout, got {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the limit holds"
    );
    server.abort();
}

/// Re-advertisement after a recovery: `GetAllocatableResources` lists the devices the device
/// plugins advertise healthy; a GPU of the node is advertised when one of its ids maps to it,
/// not advertised when ids map to its siblings only, and "cannot tell" when no id maps to any
/// GPU of the node (no device plugin serves them).
#[tokio::test]
async fn allocatable_devices_tell_whether_a_gpu_is_advertised_again() {
    let TestNode {
        sysfs,
        sock,
        server,
        _dir,
    } = test_node(Kubelet {
        pods: vec![],
        allocatable: vec![
            ("amd.com/gpu", vec!["0000:03:00.0", "0000:C3:00.0"]),
            ("example.com/nic", vec!["nic-0"]),
        ],
        delay: Duration::ZERO,
    });
    let got = allocatable(&sock).await.expect("GetAllocatableResources");
    assert_eq!(
        got,
        [
            ("amd.com/gpu".to_string(), "0000:03:00.0".to_string()),
            ("amd.com/gpu".to_string(), "0000:C3:00.0".to_string()),
            ("example.com/nic".to_string(), "nic-0".to_string()),
        ]
    );
    let m = DeviceIdMatch::Auto;
    assert_eq!(advertised(&got, "0000:03:00.0", &m, &sysfs), Some(true));
    assert_eq!(advertised(&got, "0000:c3:00.0", &m, &sysfs), Some(true));
    assert_eq!(
        advertised(&got, "0000:83:00.0", &m, &sysfs),
        Some(false),
        "a sibling is advertised, this GPU is not"
    );
    let no_plugin = [("example.com/nic".to_string(), "nic-0".to_string())];
    assert_eq!(advertised(&no_plugin, "0000:83:00.0", &m, &sysfs), None);
    assert_eq!(advertised(&[], "0000:83:00.0", &m, &sysfs), None);
    server.abort();
}

/// A kubelet that reports DRA allocations (`dynamic_resources`, KubeletPodResourcesDynamicResources):
/// the containers holding the wedged DRA device are its consumers, those of the same driver's
/// other devices are not; device-plugin matching ignores DRA entries.
#[tokio::test]
async fn dra_allocations_reported_by_the_kubelet_name_their_consumers() {
    let claimed = |pod_name: &str, container: &str, device: &str| PodResources {
        name: pod_name.into(),
        namespace: "ml".into(),
        containers: vec![ContainerResources {
            name: container.into(),
            dynamic_resources: vec![DynamicResource {
                claim_name: format!("{pod_name}-gpu"),
                claim_namespace: "ml".into(),
                claim_resources: vec![ClaimResource {
                    driver_name: "gpu.example.com".into(),
                    pool_name: "node-a".into(),
                    device_name: device.into(),
                    ..Default::default()
                }],
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let TestNode {
        sysfs,
        sock,
        server,
        _dir,
    } = test_node(Kubelet {
        pods: vec![
            claimed("train-0", "trainer", "gpu-2"),
            claimed("train-1", "trainer", "gpu-3"),
        ],
        allocatable: vec![],
        delay: Duration::ZERO,
    });
    let got = list(&sock).await.expect("list");
    let dev = unwedge_crds::DraDeviceRef {
        driver: "gpu.example.com".into(),
        pool: "node-a".into(),
        device: "gpu-2".into(),
    };
    let who = dra_consumers(&got, &dev, "0000:03:00.0");
    let brief: Vec<(&str, &str, &str, &str)> = who
        .iter()
        .map(|c| {
            (
                c.pod.as_str(),
                c.container.as_str(),
                c.device_id.as_str(),
                c.pci_address.as_str(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        [("train-0", "trainer", "node-a/gpu-2", "0000:03:00.0")]
    );
    let domain = vec!["0000:03:00.0".to_string()];
    assert!(consumers(&got, &domain, &DeviceIdMatch::Auto, &sysfs).is_empty());
    server.abort();
}
