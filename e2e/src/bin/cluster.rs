//! `cargo run -p e2e --bin cluster -- up`: a local control plane with the unwedge CRDs that
//! stays up until Ctrl-C or SIGTERM, then tears everything down.

use anyhow::bail;
use e2e::cluster::ControlPlane;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("up") => {}
        _ => bail!("usage: cluster up   (starts a local control plane until Ctrl-C)"),
    }
    let t = std::time::Instant::now();
    let cp = ControlPlane::start().await?;
    cp.apply_crds().await?;
    let kubeconfig = cp.kubeconfig_path().display().to_string();
    println!(
        "control plane up in {:.1}s at {}",
        t.elapsed().as_secs_f64(),
        cp.server_url()
    );
    println!("kubeconfig: {kubeconfig}");
    println!("logs: {}", cp.log_dir().display());
    println!("kubectl: {}", cp.bin_dir().join("kubectl").display());
    println!("export KUBECONFIG={kubeconfig}");
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping the control plane");
    cp.stop().await;
    Ok(())
}
