//! The benchmarks of issue 17 (`cargo run -p e2e --release --bin bench -- <scenario>`), on the
//! real local control plane with the real `unwedge-agent` and `unwedge-operator` binaries.
//!
//! Every scenario prints its figures as a table and writes them as JSON to
//! `target/bench/<scenario>.json`, each with the load average it was measured under (the
//! machine is shared). Short mode (`--short`, for CI) uses small sizes and still asserts the
//! invariants.

pub mod chaos;
pub mod dra;
pub mod drain;
pub mod footprint;
pub mod latency;
pub mod plot;
pub mod storm;
pub mod time_to_cordon;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cluster::{ControlPlane, repo_root};

/// One measured figure.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// The 1-minute load average when it was taken.
    pub load1: f64,
    /// How to read it (goal, comparison).
    pub note: String,
}

/// The figures of one scenario run.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Whether it ran in short mode.
    pub short: bool,
    /// `nproc`, memory, kernel.
    pub machine: String,
    /// The figures, in the order measured.
    pub figures: Vec<Figure>,
    /// Free-form remarks (sizes actually run, what broke).
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &str, short: bool) -> Report {
        Report {
            scenario: scenario.into(),
            short,
            machine: machine(),
            figures: vec![],
            notes: vec![],
        }
    }

    /// Records a figure (with the current load average) and prints it.
    pub fn fig(&mut self, name: &str, value: f64, unit: &str, note: &str) {
        let f = Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            load1: load1(),
            note: note.into(),
        };
        println!(
            "| {} | {:.3} {} | load {:.2} | {} |",
            f.name, f.value, f.unit, f.load1, f.note
        );
        self.figures.push(f);
    }

    /// Records a remark and prints it.
    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("note: {s}");
        self.notes.push(s);
    }

    /// Writes `target/bench/<scenario>[-short].json`; returns the path.
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let dir = out_dir();
        std::fs::create_dir_all(&dir)?;
        let suffix = if self.short { "-short" } else { "" };
        let p = dir.join(format!("{}{suffix}.json", self.scenario));
        std::fs::write(&p, serde_json::to_string_pretty(self)?)?;
        println!("wrote {}", p.display());
        Ok(p)
    }
}

/// `target/bench` (or `$CARGO_TARGET_DIR/bench`).
pub fn out_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("bench")
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// CPUs, memory and kernel of this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs, {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// What `/proc/<pid>` says about a process (summed over its threads where it matters).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
    /// Anonymous resident memory (heap, stacks), KiB.
    pub anon_kib: u64,
    /// File-backed resident memory (the mapped executable and libraries), KiB.
    pub file_kib: u64,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    /// Voluntary context switches, summed over all threads.
    pub voluntary: u64,
    /// Involuntary context switches, summed over all threads.
    pub involuntary: u64,
    /// When it was taken.
    pub at: Option<Instant>,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn status_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Reads `/proc/<pid>/{status,stat}` and every thread's context switch counters.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut s = ProcSample {
        rss_kib: status_field(&status, "VmRSS:"),
        hwm_kib: status_field(&status, "VmHWM:"),
        anon_kib: status_field(&status, "RssAnon:"),
        file_kib: status_field(&status, "RssFile:"),
        cpu_ticks: num(11) + num(12),
        at: Some(Instant::now()),
        ..Default::default()
    };
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if let Ok(ts) = std::fs::read_to_string(t.path().join("status")) {
            s.voluntary += status_field(&ts, "voluntary_ctxt_switches:");
            s.involuntary += status_field(&ts, "nonvoluntary_ctxt_switches:");
        }
    }
    Ok(s)
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(a: &ProcSample, b: &ProcSample) -> f64 {
    let (Some(ta), Some(tb)) = (a.at, b.at) else {
        return f64::NAN;
    };
    let wall = tb.duration_since(ta).as_secs_f64();
    (b.cpu_ticks.saturating_sub(a.cpu_ticks)) as f64 / clk_tck() / wall * 100.0
}

/// The pids of running processes whose executable is `exe` and whose environment holds
/// `env_needle` (e.g. the `KUBECONFIG=` of one fleet).
pub fn find_pids(exe: &Path, env_needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut out = vec![];
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        if link != exe {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if String::from_utf8_lossy(&env).contains(env_needle) {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// Percentile (nearest rank) of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

type Job = (Vec<u8>, mpsc::Sender<io::Result<Instant>>);

/// A thread that lives in one network namespace and sends uevents to the kernel there
/// (docs/design.md §1: the kernel rebroadcasts them from port id 0 to that namespace's listeners).
/// Each send returns the instant just before the `sendto` to the kernel.
pub struct NsInjector {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Moves the calling thread into the network namespace named by `ns_path`.
pub fn enter_netns(ns_path: &Path) -> io::Result<()> {
    let f = File::open(ns_path)?;
    // SAFETY: setns on the calling thread with a namespace fd we own.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl NsInjector {
    /// Starts the thread inside the namespace at `ns_path` (a [`crate::netns::NetNs::path`]).
    pub fn new(ns_path: &Path) -> io::Result<NsInjector> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = ns_path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("ns-injector".into())
            .spawn(move || {
                let r = enter_netns(&path);
                let ok = r.is_ok();
                let _ = ready_tx.send(r);
                if !ok {
                    return;
                }
                for (payload, reply) in rx {
                    let t = Instant::now();
                    let _ = reply.send(crate::inject::send_to_kernel(&payload).map(|()| t));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the injector thread died"))??;
        Ok(NsInjector {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Sends the benches' usual wedge of `gpu` (`WEDGED=rebind,bus-reset`, no blamed task); the
    /// instant it was handed to the kernel.
    pub fn send_wedge(&self, gpu: &crate::fakesysfs::Gpu) -> io::Result<Instant> {
        self.send(crate::inject::wedge_payload(
            &gpu.card_devpath(),
            &gpu.card_name(),
            &["rebind", "bus-reset"],
            &[],
        ))
    }

    /// Sends one uevent; the instant it was handed to the kernel.
    pub fn send(&self, payload: Vec<u8>) -> io::Result<Instant> {
        let (rtx, rrx) = mpsc::channel();
        self.tx
            .as_ref()
            .ok_or_else(|| io::Error::other("injector stopped"))?
            .send((payload, rtx))
            .map_err(|_| io::Error::other("the injector thread died"))?;
        rrx.recv()
            .map_err(|_| io::Error::other("the injector thread died"))?
    }
}

impl Drop for NsInjector {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A started control plane with the CRDs, and the binaries under test (release builds for
/// figures; a debug build is accepted only in short mode, which proves the scenario and its
/// invariants rather than measuring).
pub async fn control_plane(short: bool) -> anyhow::Result<(ControlPlane, crate::fleet::Bins)> {
    anyhow::ensure!(
        short || !cfg!(debug_assertions),
        "figures come from release builds: cargo run -p e2e --release --bin bench -- … (a debug build runs only with --short)"
    );
    let bins = tokio::task::spawn_blocking(crate::fleet::Bins::build)
        .await
        .context("build the binaries")??;
    let cp = ControlPlane::start()
        .await
        .context("start the control plane")?;
    cp.apply_crds().await.context("apply the CRDs")?;
    Ok((cp, bins))
}

/// The samples of the labelled metric `metric` in Prometheus text: for each, a lookup of its
/// labels by name (empty when absent) and its value.
fn samples<'a>(
    text: &'a str,
    metric: &'a str,
) -> impl Iterator<Item = (impl Fn(&str) -> String + 'a, f64)> + 'a {
    text.lines().filter_map(move |l| {
        let rest = l.strip_prefix(metric)?.strip_prefix('{')?;
        let (labels, value) = rest.rsplit_once("} ")?;
        let label = move |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|r| r.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        Some((label, value.trim().parse().unwrap_or(0.0)))
    })
}

/// Sum of `apiserver_request_total` over every label set (`_total`), per `resource` label, and
/// per call as `=VERB resource[/subresource] CODE` (e.g. `=PATCH gpuwedges/status 409`), from
/// the API server's `/metrics` (admin client).
pub async fn apiserver_requests(
    client: &kube::Client,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await.context("GET /metrics")?;
    let mut out = std::collections::BTreeMap::new();
    for (label, v) in samples(&text, "apiserver_request_total") {
        let resource = label("resource");
        let sub = label("subresource");
        let call = format!(
            "={} {resource}{}{sub} {}",
            label("verb"),
            if sub.is_empty() { "" } else { "/" },
            label("code")
        );
        *out.entry("_total".to_string()).or_insert(0.0) += v;
        *out.entry(resource).or_insert(0.0) += v;
        *out.entry(call).or_insert(0.0) += v;
    }
    Ok(out)
}

/// The operator replicas' own API requests (`unwedge_operator_api_requests_total`), summed over
/// the replicas at `addrs`, by `"verb resource"` and `_total`. A replica that does not answer
/// counts nothing.
pub async fn operator_requests(addrs: &[String]) -> std::collections::BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = std::collections::BTreeMap::new();
    for addr in addrs {
        let text = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
                .await?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).await?;
            std::io::Result::Ok(buf)
        };
        let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(5), text).await else {
            continue;
        };
        for (label, v) in samples(&text, "unwedge_operator_api_requests_total") {
            let key = format!("{} {}", label("verb"), label("resource"));
            *out.entry("_total".to_string()).or_insert(0.0) += v;
            *out.entry(key).or_insert(0.0) += v;
        }
    }
    out
}

/// Raises RLIMIT_NOFILE to its hard limit (a large fleet holds many fds in this process).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Sleeps `d` (helper for readability in the scenarios).
pub async fn sleep(d: Duration) {
    tokio::time::sleep(d).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 50.0), 50.0);
        assert_eq!(pct(&v, 99.0), 99.0);
        assert_eq!(pct(&v, 100.0), 100.0);
        assert_eq!(pct(&[3.0], 99.0), 3.0);
        assert!(pct(&[], 50.0).is_nan());
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
        assert!(s.voluntary + s.involuntary > 0);
    }
}
