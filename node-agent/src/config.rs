//! The agent's command line (docs/design.md §2); every flag can also come from the
//! environment variable of the same name in upper snake case (`--sysfs-root` → `SYSFS_ROOT`).
//!
//! Parsing only: turning these values into live objects is `main.rs`'s job.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Parser, ValueEnum};
pub use unwedge_telemetry::LogFormat;

/// Command-line arguments of `unwedge-agent`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "unwedge-agent",
    version,
    about = "Hears WEDGED uevents, reports GpuWedges, carries out approved recoveries."
)]
pub struct Args {
    /// This node's name (from the downward API); the agent only touches GpuWedges of this node.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Where sysfs is mounted.
    #[arg(long, env = "SYSFS_ROOT", default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// Where the device nodes are (`<dev-root>/dri/card0`).
    #[arg(long, env = "DEV_ROOT", default_value = "/dev")]
    pub dev_root: PathBuf,
    /// Where the host's procfs is mounted (for the fd gate and the blamed task's cgroup).
    #[arg(long, env = "PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// File holding the host's boot id.
    #[arg(
        long,
        env = "BOOT_ID_PATH",
        default_value = "/proc/sys/kernel/random/boot_id"
    )]
    pub boot_id_path: PathBuf,
    /// Durable state on the host: the outbox of unreported wedges and the attempt journal.
    #[arg(long, env = "STATE_DIR", default_value = "/var/lib/unwedge")]
    pub state_dir: PathBuf,
    /// The kubelet PodResources socket.
    #[arg(
        long,
        env = "POD_RESOURCES_SOCKET",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pub pod_resources_socket: PathBuf,
    /// The container runtime's CRI socket (the one the kubelet uses), for in-place restarts of
    /// a `none` wedge's containers. Absent: such restarts fall back to eviction.
    #[arg(
        long,
        env = "CRI_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub cri_socket: PathBuf,
    /// How long a stopped container may take to exit before the runtime kills it (CRI
    /// `StopContainer` timeout), e.g. `30s`.
    #[arg(long, env = "RESTART_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub restart_grace: Duration,
    /// How long, after it exited, the kubelet has to run a restarted container again before the
    /// restart falls back to eviction, e.g. `60s`.
    #[arg(long, env = "RESTART_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub restart_timeout: Duration,
    /// How device plugin ids are matched to PCI devices.
    #[arg(long, env = "DEVICE_ID_MATCH", value_enum, default_value_t = DeviceIdMatchArg::Auto)]
    pub device_id_match: DeviceIdMatchArg,
    /// File mapping device ids to PCI addresses (with `--device-id-match map`).
    #[arg(long, env = "DEVICE_ID_MAP")]
    pub device_id_map: Option<PathBuf>,
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9101")]
    pub metrics_addr: SocketAddr,
    /// Log what an approved attempt would do instead of doing it (see `executor`).
    #[arg(long, env = "DRY_RUN")]
    pub dry_run: bool,
    /// How the `reboot` rung reboots the host.
    #[arg(long, env = "REBOOT_MODE", value_enum, default_value_t = RebootMode::Command)]
    pub reboot_mode: RebootMode,
    /// The command run by `--reboot-mode command`: a program and its arguments, split on
    /// whitespace and run without a shell, like `--verify-command`.
    #[arg(long, env = "REBOOT_COMMAND", default_value = "systemctl reboot")]
    pub reboot_command: String,
    /// A program that must exit 0 for a recovery to count as verified, with its arguments,
    /// split on whitespace and run without a shell (the image has none): no quotes, pipes or
    /// variables. It gets UNWEDGE_PCI_ADDRESS, UNWEDGE_CARD and UNWEDGE_DRIVER in its environment.
    #[arg(long, env = "VERIFY_COMMAND")]
    pub verify_command: Option<String>,
    /// How long the device must stay quiet (no new WEDGED) after an action, e.g. `10s`, `500ms`.
    #[arg(long, env = "SETTLE", default_value = "10s", value_parser = parse_duration)]
    pub settle: Duration,
    /// How long, after an action, to wait for the driver and card to come back and then for the
    /// device plugin to advertise the GPU again, e.g. `60s`.
    #[arg(long, env = "REAPPEAR_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub reappear_timeout: Duration,
    /// The ResourceSlice attribute that holds a DRA device's PCI address (DRA nodes only).
    #[arg(long, env = "DRA_PCI_ATTRIBUTE", default_value = crate::dra::PCI_BUS_ID)]
    pub dra_pci_attribute: String,
    /// Per DRA driver, the attribute holding the PCI address when it is not
    /// `--dra-pci-attribute`: `driver=attribute[,...]` or a JSON object.
    #[arg(long, env = "DRA_DRIVER_ATTRIBUTES", default_value = "")]
    pub dra_driver_attributes: String,
    /// The receive buffer asked of the kernel for the uevent socket, in bytes. A burst larger
    /// than it while the agent is not reading overruns the socket: uevents are lost, counted
    /// and followed by a sysfs rescan (docs/lifecycle.md). Only tests set it small.
    #[arg(long, env = "UEVENT_BUFFER_BYTES", default_value_t = crate::listener::RECV_BUFFER_BYTES,
          value_parser = clap::value_parser!(u32).range(1..).map(|b| b as usize))]
    pub uevent_buffer_bytes: usize,
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--device-id-match`: how PodResources device ids name GPUs.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceIdMatchArg {
    /// Try PCI address, then card name, then index.
    Auto,
    /// Ids are PCI addresses (AMD's plugin).
    Pci,
    /// Ids carry the card name (Intel's plugin).
    Card,
    /// Ids are indexes.
    Index,
    /// Ids are mapped by `--device-id-map`.
    Map,
}

/// `--reboot-mode`.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    /// `sync` then the `reboot(2)` syscall (needs CAP_SYS_BOOT in the host PID namespace).
    Syscall,
    /// Run `--reboot-command` (through the host's init, e.g. systemd).
    Command,
}

/// Parses a flag's duration: the CRD's syntax (`10s`, `500ms`, `2m`, `1h30m`:
/// [`unwedge_crds::duration`]), or a bare whole number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let with_unit = if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) {
        format!("{s}s")
    } else {
        s.to_string()
    };
    unwedge_crds::duration::parse(&with_unit)
        .ok_or_else(|| format!("{s:?} is not a duration: expected e.g. 10s, 500ms, 2m, 1h30m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = Args::try_parse_from(["unwedge-agent", "--node-name", "node-a"]).unwrap();
        assert_eq!(a.sysfs_root, PathBuf::from("/sys"));
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/unwedge"));
        assert_eq!(a.metrics_addr.to_string(), "0.0.0.0:9101");
        assert_eq!(a.reboot_mode, RebootMode::Command);
        assert_eq!(a.reboot_command, "systemctl reboot");
        assert_eq!(a.settle, Duration::from_secs(10));
        assert_eq!(a.uevent_buffer_bytes, 16 << 20);
        assert!(!a.dry_run);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
