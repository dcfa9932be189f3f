//! `unwedge-agent`: one agent instance ([`unwedge_agent::run`]) in its own process, with the
//! process-wide parts: command line, tracing, the tokio runtime and the signals. Decisions live
//! in the library modules; the wiring in `run/`.

use anyhow::Context;
use clap::Parser;
use unwedge_agent::config::Args;
use unwedge_agent::run::{Instance, run};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    unwedge_telemetry::init("info", args.log_format);
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
