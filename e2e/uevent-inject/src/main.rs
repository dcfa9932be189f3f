//! `uevent-inject`: sends a verbatim `WEDGED=` uevent to the kernel in the current network
//! namespace (docs/design.md §1), so every group-1 listener there (the agent) receives it from port 0.
//! Run it inside the agent's namespace: `nsenter -t <agent pid> -n uevent-inject --devpath …`.
//! Built static (x86_64-unknown-linux-musl) and copied into kind nodes.

use std::process::ExitCode;

use clap::Parser;
use uevent_inject as inject;

/// Inject a WEDGED uevent through the kernel's uevent_net_rcv.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// DEVPATH of the card, e.g. /devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0.
    #[arg(long)]
    devpath: Option<String>,
    /// The card node, e.g. card0 (default: the last component of --devpath).
    #[arg(long)]
    card: Option<String>,
    /// WEDGED methods, comma-separated, sent verbatim (e.g. rebind,bus-reset).
    #[arg(long, default_value = "rebind,bus-reset")]
    methods: String,
    /// PID= of the blamed task.
    #[arg(long)]
    pid: Option<i64>,
    /// TASK= of the blamed task.
    #[arg(long)]
    task: Option<String>,
    /// Send the event this many times.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Replay this file's bytes (a captured kernel payload, `ACTION@DEVPATH\0KEY=VALUE\0…`)
    /// instead of a built event: any captured `SEQNUM=` is stripped (the kernel appends its
    /// own), every other byte is sent as captured, malformed or cut-off ones included.
    #[arg(long)]
    raw_file: Option<std::path::PathBuf>,
    /// Multicast to group 1 from this process's own port instead (a forgery the agent refuses).
    #[arg(long)]
    multicast_self: bool,
    /// Before the event, send this many irrelevant (SUBSYSTEM=usb) uevents.
    #[arg(long, default_value_t = 0)]
    flood: u64,
}

fn run(args: Args) -> Result<(), String> {
    for n in 0..args.flood {
        inject::send_to_kernel(&inject::usb_payload(n))
            .map_err(|e| format!("flood uevent {n}: {e}"))?;
    }
    let payload = match (&args.raw_file, &args.devpath) {
        (Some(f), _) => inject::strip_seqnum(
            &std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?,
        ),
        (None, Some(devpath)) => {
            let card = match &args.card {
                Some(c) => c.clone(),
                None => devpath.rsplit('/').next().unwrap_or_default().to_string(),
            };
            let methods: Vec<&str> = args.methods.split(',').collect();
            let pid = args.pid.map(|p| p.to_string());
            let mut extra = Vec::new();
            if let Some(p) = &pid {
                extra.push(("PID", p.as_str()));
            }
            if let Some(t) = &args.task {
                extra.push(("TASK", t.as_str()));
            }
            inject::wedge_payload(devpath, &card, &methods, &extra)
        }
        (None, None) if args.flood > 0 => return Ok(()),
        (None, None) => return Err("give --devpath (or --raw-file, or only --flood)".into()),
    };
    for i in 0..args.count {
        let res = if args.multicast_self {
            inject::multicast_as_process(&payload)
        } else {
            inject::send_to_kernel(&payload)
        };
        res.map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_SYS_ADMIN over this network namespace: run as root or under `unshare -Urn`)"
            } else {
                ""
            };
            format!("sending uevent {}: {e}{hint}", i + 1)
        })?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uevent-inject: {e}");
            ExitCode::FAILURE
        }
    }
}
