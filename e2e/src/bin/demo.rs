//! `cargo run -p e2e --release --bin demo [-- --keep] [--dra]`: the one-command demo (see
//! `e2e::demo`).
//! Needs root (network namespaces) and the pinned Kubernetes binaries
//! (`e2e/cluster/build-binaries.sh`, built on first use).

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut opts = e2e::demo::Options::default();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--keep" => opts.keep = true,
            "--dra" => opts.dra = true,
            "-h" | "--help" => {
                println!(
                    "usage: demo [--keep] [--dra]\n  --keep  leave the cluster up (until Ctrl-C) and print the kubeconfig path\n  --dra   a node whose 8 GPUs are DRA devices: the wedged GPU is quarantined alone (DeviceTaintRule), the node keeps serving"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("demo: unknown argument {other:?} (try --help)");
                return ExitCode::from(2);
            }
        }
    }
    match e2e::demo::run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
