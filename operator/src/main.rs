//! `unwedge-operator`: cordon, drain, admit, approve, escalate, uncordon (docs/design.md §2–§5).

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use tokio::sync::watch;
use unwedge_operator::{default_policy, dra, leader, metrics, reconciler};

/// Coordinates GPU recoveries on Kubernetes nodes.
#[derive(Parser, Debug)]
#[command(name = "unwedge-operator", version, about)]
struct Cli {
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9100")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease (two replicas: one acts).
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The Lease name.
    #[arg(long, default_value = "unwedge-operator")]
    lease_name: String,
    /// The Lease namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "unwedge-system")]
    lease_namespace: String,
    /// The Deployment (in the Lease namespace) that owns the Lease, so that deleting it (e.g.
    /// `helm uninstall`) deletes the Lease too. Empty: the Lease has no owner.
    #[arg(long, default_value = "")]
    lease_owner_deployment: String,
    /// This replica's identity (default: hostname and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// DRA device quarantine: on, off, or auto (on when the API server serves
    /// resource.k8s.io/v1 DeviceTaintRules and this operator may use them and read
    /// ResourceClaims and ResourceSlices). On: a wedged GPU that the agent found in its
    /// node's ResourceSlice is tainted alone instead of cordoning the node.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    dra: String,
    /// The fallback RecoveryPolicy to apply at start (JSON, rendered by the chart into a
    /// ConfigMap). The replica is ready once it is applied or refused by admission.
    #[arg(long)]
    default_policy: Option<String>,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn identity(cli: &Cli) -> String {
    cli.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        format!("{host}-{}", std::process::id())
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    unwedge_telemetry::init("info,kube=warn", cli.log_format.parse()?);
    let id = identity(&cli);
    tracing::info!(identity = %id, leader_elect = cli.leader_elect, dra = %cli.dra, "starting unwedge-operator");
    // No client-side retries: an eviction refused by a PodDisruptionBudget answers 429, and
    // kube's default retry (15 times, honouring Retry-After) would hold a reconcile for minutes
    // instead of letting the drain record the refusal and back off on its own.
    let mut config = kube::Config::infer().await?;
    config.default_retry = false;
    let metrics = Arc::new(metrics::Metrics::new());
    let calls = metrics.api_requests.clone();
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapRequestLayer::new(move |req| {
            unwedge_operator::api_calls::count(&calls, req)
        }))
        .build();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // A file that is not a default policy stops the start: the chart rendered it, so this is
    // a broken install, said at once rather than a cluster without its fallback policy.
    if let Some(path) = &cli.default_policy {
        let policy = default_policy::load(path)?;
        metrics.default_policy_pending();
        let (client, m, rx) = (client.clone(), metrics.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            match default_policy::apply(client, policy, rx).await {
                default_policy::Outcome::Applied => m.default_policy_settled(true),
                default_policy::Outcome::Refused => m.default_policy_settled(false),
                default_policy::Outcome::Retry => {}
            }
        });
    }

    let (leader_tx, leader_rx) = watch::channel(false);
    let election = if cli.leader_elect {
        let mut e =
            leader::Elector::new(client.clone(), &cli.lease_namespace, &cli.lease_name, &id);
        if !cli.lease_owner_deployment.is_empty() {
            e = e.owned_by_deployment(&cli.lease_owner_deployment);
        }
        Some(tokio::spawn(e.run(leader_tx, shutdown_rx.clone())))
    } else {
        let _ = leader_tx.send(true);
        // Keep the sender alive for the process lifetime.
        let mut rx = shutdown_rx.clone();
        Some(tokio::spawn(async move {
            let _ = rx.changed().await;
            drop(leader_tx);
        }))
    };

    let server = {
        let m = metrics.clone();
        let mut rx = shutdown_rx.clone();
        let addr = cli.metrics_addr;
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            if let Err(e) = metrics::serve(addr, m, stop).await {
                tracing::error!(error = %e, %addr, "metrics server failed");
            }
        })
    };

    let signals = tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    });

    let mode: dra::Mode = cli.dra.parse().map_err(anyhow::Error::msg)?;
    let dra = unwedge_operator::quarantine::support(&client, mode).await;
    if matches!(dra.reason, "Enabled" | "Disabled" | "NotServed") {
        tracing::info!(mode = %cli.dra, on = dra.on, reason = dra.reason, "DRA device quarantine: {}", dra.message);
    } else {
        tracing::warn!(mode = %cli.dra, on = dra.on, reason = dra.reason, "DRA device quarantine: {}", dra.message);
    }
    reconciler::run(client, id, metrics, leader_rx, shutdown_rx, dra).await;
    if let Some(e) = election {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), e).await;
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server).await;
    signals.abort();
    Ok(())
}
