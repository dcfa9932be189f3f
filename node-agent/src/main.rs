//! `unwedge-agent`: one agent instance ([`unwedge_agent::run`]) in its own process, with the
//! process-wide parts: command line, tracing, the tokio runtime and the signals. Decisions live
//! in the library modules; the wiring in `run.rs`.

use anyhow::Context;
use clap::Parser;
use unwedge_agent::config::{Args, LogFormat};
use unwedge_agent::run::{Instance, run};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async move {
        let instance = Instance::from_env(&args)?;
        run(args, instance).await
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}
