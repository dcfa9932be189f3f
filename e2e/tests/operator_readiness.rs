//! Both replicas of a leader-elected operator become ready, the follower too.
//!
//! Readiness means "the node, policy and wedge stores have synced", which has nothing to do
//! with leadership. Two real `unwedge-operator` processes with `--leader-elect=true` run
//! against the real local control plane with the chart's RBAC (a ServiceAccount token), with
//! nodes, a policy and an open wedge to sync; both must answer `/readyz` 200 within 30 s, and
//! one of them must hold the Lease. After both are stopped with SIGTERM, no Lease is left.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::cluster::{ControlPlane, Proc};
use e2e::fleet::{Bins, Fleet, OPERATOR_SA, SYSTEM_NS};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use unwedge_crds::{GpuWedge, RecoveryPolicy};

fn free_port() -> u16 {
    e2e::cluster::free_port().expect("a free port")
}

/// The HTTP status of `GET path` on 127.0.0.1:`port`, or None when it does not answer.
async fn status_of(port: u16, path: &str) -> Option<u16> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_leader_elected_replicas_become_ready() -> anyhow::Result<()> {
    let bins = tokio::task::spawn_blocking(Bins::build).await??;
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    // The namespace, ServiceAccounts and the chart's RBAC.
    let fleet = Fleet::new(&cp, bins.clone()).await?;
    let client = fleet.client();
    for n in ["node-a", "node-b"] {
        cp.add_kwok_node(n, &[("unwedge.io/gpu", "true")], &[])
            .await?;
    }
    Api::<RecoveryPolicy>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
                "metadata": {"name": "default"}, "spec": {"default": true}
            }))?,
        )
        .await?;
    Api::<GpuWedge>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "unwedge.io/v1alpha1", "kind": "GpuWedge",
                "metadata": {"name": "node-a-0000-03-00-0-1",
                             "labels": {"unwedge.io/node": "node-a", "unwedge.io/device": "0000-03-00-0"}},
                "spec": {"nodeName": "node-a", "device": {"pciAddress": "0000:03:00.0", "driver": "amdgpu"},
                         "methods": ["rebind"], "detectedAt": "2025-01-01T00:00:00Z", "bootId": "b"}
            }))?,
        )
        .await?;

    let work = tempfile::tempdir()?;
    let token = cp.create_token(SYSTEM_NS, OPERATOR_SA, None).await?;
    let kc = work.path().join("operator.kubeconfig");
    cp.write_kubeconfig(&token, &kc)?;
    let mut ops: Vec<(Proc, u16, std::path::PathBuf)> = vec![];
    for i in 0..2 {
        let port = free_port();
        let log = work.path().join(format!("operator-{i}.log"));
        let args: Vec<String> = vec![
            format!("KUBECONFIG={}", kc.display()),
            "RUST_LOG=info,unwedge_operator=debug".into(),
            bins.operator.display().to_string(),
            format!("--metrics-addr=127.0.0.1:{port}"),
            "--leader-elect=true".into(),
            format!("--lease-namespace={SYSTEM_NS}"),
            format!("--identity=operator-{i}"),
        ];
        let p = Proc::spawn(&format!("operator-{i}"), Path::new("env"), &args, &log)?;
        ops.push((p, port, log));
        if i == 0 {
            // The second replica starts while the first already holds the Lease, as in a
            // rolling `helm upgrade`: it must become ready as a follower.
            let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NS);
            let until = Instant::now() + Duration::from_secs(30);
            while Instant::now() < until
                && leases
                    .get_opt("unwedge-operator")
                    .await?
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity)
                    .is_none()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let mut ready_after: Vec<Option<Duration>> = vec![None; ops.len()];
    while ready_after.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (p, port, log)) in ops.iter_mut().enumerate() {
            if let Some(st) = p.exited() {
                anyhow::bail!(
                    "operator-{i} exited ({st}); its log:\n{}",
                    e2e::fleet::tail(log, 40)
                );
            }
            if ready_after[i].is_none() && status_of(*port, "/readyz").await == Some(200) {
                ready_after[i] = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holder = Api::<Lease>::namespaced(client.clone(), SYSTEM_NS)
        .get_opt("unwedge-operator")
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity);
    eprintln!("lease holder {holder:?}; ready after {ready_after:?}");
    for (i, (_, _, log)) in ops.iter().enumerate() {
        assert!(
            ready_after[i].is_some(),
            "operator-{i} (lease holder {holder:?}) did not report /readyz 200 within 30 s; its log:\n{}",
            e2e::fleet::tail(log, 40)
        );
    }
    assert!(
        matches!(holder.as_deref(), Some("operator-0" | "operator-1")),
        "no replica holds the Lease: {holder:?}"
    );
    // SIGTERM both (as an uninstall does): whoever holds the Lease at the end deletes it.
    let mut procs: Vec<Proc> = ops.into_iter().map(|(p, _, _)| p).collect();
    futures::future::join_all(
        procs
            .iter_mut()
            .map(|p| p.terminate(Duration::from_secs(10))),
    )
    .await;
    let left = Api::<Lease>::namespaced(client.clone(), SYSTEM_NS)
        .get_opt("unwedge-operator")
        .await?;
    assert!(
        left.is_none(),
        "the Lease is left after both replicas shut down: {:?}",
        left.and_then(|l| l.spec)
    );
    let mut fleet = fleet;
    fleet.stop();
    cp.stop().await;
    Ok(())
}
