//! The simulated GPU fleet on a real local control plane: per node a kwok Node with fake GPU
//! capacity, an "agent pod" object bound to it (so a pod-bound token carries the node claim),
//! a journaled fake sysfs, a PodResources server derived from the pods really bound there, a
//! private network namespace, and a real `unwedge-agent` process in it. The operator runs as
//! real `unwedge-operator` processes with leader election.
//!
//! Wedges reach the agent only through the kernel: `uevent-inject` runs inside the node's
//! network namespace and the kernel rebroadcasts the event to that namespace's listeners.
//! A simulated host reboot kills the agent, writes a new boot id and starts it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::cluster::{ControlPlane, Proc, repo_root};
use crate::fakesysfs::{FakeSysfs, Gpu};
use crate::netns::NetNs;
use crate::podresources_server::{PodResourcesServer, RESOURCE};
use crate::wait::{self, Check};

/// The namespace of the agents' and the operator's identities.
pub const SYSTEM_NS: &str = "unwedge-system";
/// The agent's ServiceAccount.
pub const AGENT_SA: &str = "unwedge-agent";
/// The operator's ServiceAccount.
pub const OPERATOR_SA: &str = "unwedge-operator";
/// Label every simulated GPU node carries.
pub const GPU_LABEL: (&str, &str) = ("unwedge.io/gpu", "true");

/// Paths of the binaries under test, built by cargo for the profile of the running test.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `unwedge-agent`.
    pub agent: PathBuf,
    /// `unwedge-operator`.
    pub operator: PathBuf,
    /// `uevent-inject`.
    pub inject: PathBuf,
}

impl Bins {
    /// The `agent-pool` binary (many agent instances in one process): `UNWEDGE_AGENT_POOL_BIN`,
    /// or `agent-pool` beside `unwedge-agent` (`cargo build -p e2e --bins` builds it).
    pub fn agent_pool(&self) -> PathBuf {
        std::env::var_os("UNWEDGE_AGENT_POOL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.agent.with_file_name("agent-pool"))
    }

    /// Locates the binaries in `target/<profile>/` (the profile this code was built with), or
    /// from `UNWEDGE_AGENT_BIN`, `UNWEDGE_OPERATOR_BIN`, `UEVENT_INJECT_BIN`. When one is
    /// missing it runs `cargo build` for them, which works under `cargo run` (the demo); under
    /// `cargo test` build them first: `cargo build [--release] -p unwedge-agent -p
    /// unwedge-operator -p e2e --bins` (cargo may hold the target lock while tests run).
    pub fn build() -> anyhow::Result<Bins> {
        let release = !cfg!(debug_assertions);
        let root = repo_root();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join(if release { "release" } else { "debug" });
        let pick = |env: &str, name: &str| {
            std::env::var_os(env)
                .map(PathBuf::from)
                .unwrap_or_else(|| target.join(name))
        };
        let b = Bins {
            agent: pick("UNWEDGE_AGENT_BIN", "unwedge-agent"),
            operator: pick("UNWEDGE_OPERATOR_BIN", "unwedge-operator"),
            inject: pick("UEVENT_INJECT_BIN", "uevent-inject"),
        };
        if [&b.agent, &b.operator, &b.inject]
            .iter()
            .all(|p| p.exists())
        {
            return Ok(b);
        }
        let mut cmd =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&root).args([
            "build",
            "-q",
            "-p",
            "unwedge-agent",
            "--bin",
            "unwedge-agent",
            "-p",
            "unwedge-operator",
            "--bin",
            "unwedge-operator",
            "-p",
            "uevent-inject",
            "--bin",
            "uevent-inject",
        ]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd
            .status()
            .context("run cargo build for the binaries under test")?;
        anyhow::ensure!(
            st.success(),
            "cargo build of unwedge-agent, unwedge-operator and uevent-inject failed"
        );
        for p in [&b.agent, &b.operator, &b.inject] {
            anyhow::ensure!(p.exists(), "{} is missing after cargo build", p.display());
        }
        Ok(b)
    }
}

/// How a simulated node looks.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Node name.
    pub name: String,
    /// Its GPUs.
    pub gpus: Vec<Gpu>,
    /// Extra node labels.
    pub labels: Vec<(String, String)>,
}

impl NodeSpec {
    /// A node with `n` GPUs of `driver`, labelled as a GPU node.
    pub fn new(name: &str, n: u32, driver: &str) -> NodeSpec {
        NodeSpec {
            name: name.to_string(),
            gpus: (0..n).map(|i| Gpu::nth(i, driver)).collect(),
            labels: vec![],
        }
    }
}

/// One simulated node.
pub struct SimNode {
    /// Node name.
    pub name: String,
    /// Its files: sysfs, dev, state dir, boot id, logs.
    pub dir: PathBuf,
    /// The fake sysfs and /dev with the write journal.
    pub sysfs: FakeSysfs,
    /// The node's PodResources server.
    pub podres: PodResourcesServer,
    /// The node's network namespace (the agent pod's).
    pub netns: NetNs,
    agent: Option<Proc>,
    /// The agent runs as an instance of the fleet's agent pool, not as its own process.
    pooled: bool,
    boots: u32,
    agent_pod_uid: String,
    extra_agent_args: Vec<String>,
}

impl SimNode {
    /// The file the agent reads its boot id from.
    pub fn boot_id_path(&self) -> PathBuf {
        self.dir.join("boot_id")
    }

    /// The current boot id.
    pub fn boot_id(&self) -> String {
        std::fs::read_to_string(self.boot_id_path())
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The agent's durable state directory (outbox, attempt journal).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Where the reboot command records each request (one line each).
    pub fn reboot_log(&self) -> PathBuf {
        self.dir.join("reboot-requests")
    }

    /// How many reboots the agent has requested.
    pub fn reboot_requests(&self) -> usize {
        std::fs::read_to_string(self.reboot_log())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The agent's log file.
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// The agent's pid, when it runs.
    pub fn agent_pid(&mut self) -> Option<u32> {
        let a = self.agent.as_mut()?;
        if a.exited().is_some() {
            return None;
        }
        Some(a.pid())
    }

    /// The uid of the agent pod object on this node.
    pub fn agent_pod_uid(&self) -> &str {
        &self.agent_pod_uid
    }

    /// Extra agent flags used from the next (re)start on.
    pub fn set_agent_args(&mut self, args: Vec<String>) {
        self.extra_agent_args = args;
    }

    /// Writes a new boot id (what a host reboot does; the agent reads it when it starts).
    pub fn write_boot_id(&mut self) -> std::io::Result<()> {
        self.boots += 1;
        let id = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            fxhash(&self.name),
            self.boots
        );
        std::fs::write(self.boot_id_path(), format!("{id}\n"))
    }

    /// The agent's flags (without the program name).
    fn agent_flags(&self) -> Vec<String> {
        let reboot = self.dir.join("reboot.sh");
        let mut args: Vec<String> = vec![
            "--node-name".into(),
            self.name.clone(),
            "--sysfs-root".into(),
            self.sysfs.sys_root().display().to_string(),
            "--dev-root".into(),
            self.sysfs.dev_root().display().to_string(),
            "--proc-root".into(),
            "/proc".into(),
            "--boot-id-path".into(),
            self.boot_id_path().display().to_string(),
            "--state-dir".into(),
            self.state_dir().display().to_string(),
            "--pod-resources-socket".into(),
            self.podres.socket().display().to_string(),
            "--cri-socket".into(),
            self.dir.join("containerd.sock").display().to_string(),
            "--restart-grace".into(),
            "1s".into(),
            "--restart-timeout".into(),
            "5s".into(),
            "--metrics-addr".into(),
            "127.0.0.1:9101".into(),
            "--reboot-mode".into(),
            "command".into(),
            "--reboot-command".into(),
            reboot.display().to_string(),
            "--settle".into(),
            "1s".into(),
            "--reappear-timeout".into(),
            "10s".into(),
        ];
        args.extend(self.extra_agent_args.iter().cloned());
        args
    }

    /// Starts the agent (no-op when it runs).
    pub fn start_agent(&mut self, bins: &Bins) -> anyhow::Result<()> {
        if self.agent_pid().is_some() {
            return Ok(());
        }
        let kubeconfig = self.dir.join("kubeconfig");
        let mut args: Vec<String> = vec![
            format!("KUBECONFIG={}", kubeconfig.display()),
            "RUST_LOG=info,unwedge_agent=debug".into(),
            bins.agent.display().to_string(),
        ];
        args.extend(self.agent_flags());
        let (prog, args) = self.netns.wrap("env", &args);
        let p = Proc::spawn(
            &format!("agent-{}", self.name),
            &prog,
            &args,
            &self.agent_log(),
        )
        .with_context(|| format!("start the agent of {}", self.name))?;
        self.agent = Some(p);
        Ok(())
    }

    /// Kills the agent with SIGKILL (a crash, or the host going down).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill_now();
        }
    }

    /// A simulated host reboot: the agent dies, the boot id changes, the agent starts again.
    pub fn reboot(&mut self, bins: &Bins) -> anyhow::Result<()> {
        self.kill_agent();
        self.write_boot_id()?;
        self.start_agent(bins)
    }

    /// Waits until the agent answers `/readyz` with 200 inside its namespace.
    pub async fn wait_agent_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.pooled && self.agent_pid().is_none() {
                anyhow::bail!(
                    "the agent of {} exited; its log:\n{}",
                    self.name,
                    tail(&self.agent_log(), 40)
                );
            }
            if self
                .netns
                .http_get(9101, "/readyz")
                .await
                .is_ok_and(|(code, _)| code == 200)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the agent of {} was not ready after {timeout:?}; its log:\n{}",
                    self.name,
                    tail(&self.agent_log(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Injects a `WEDGED=` uevent for the GPU `bdf` through the kernel, in this node's network
    /// namespace. `extra` are further `uevent-inject` flags (e.g. `--pid`, `--count`).
    pub async fn inject(
        &self,
        bins: &Bins,
        bdf: &str,
        methods: &str,
        extra: &[String],
    ) -> anyhow::Result<()> {
        let g = self
            .sysfs
            .gpu(bdf)
            .with_context(|| format!("node {} has no GPU {bdf}", self.name))?;
        let mut args = vec![
            "--devpath".to_string(),
            g.card_devpath(),
            "--card".into(),
            g.card_name(),
            "--methods".into(),
            methods.into(),
        ];
        args.extend(extra.iter().cloned());
        self.inject_raw_args(bins, &args).await
    }

    /// Runs `uevent-inject args…` inside this node's network namespace.
    pub async fn inject_raw_args(&self, bins: &Bins, args: &[String]) -> anyhow::Result<()> {
        let (prog, a) = self.netns.wrap(&bins.inject.display().to_string(), args);
        let out = tokio::process::Command::new(prog)
            .args(&a)
            .output()
            .await
            .context("run uevent-inject")?;
        anyhow::ensure!(
            out.status.success(),
            "uevent-inject {args:?} in the namespace of {} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn fxhash(s: &str) -> u32 {
    s.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

/// The fleet: nodes, agents and operators on one control plane.
pub struct Fleet {
    /// Binaries under test.
    pub bins: Bins,
    /// The nodes, by name.
    pub nodes: BTreeMap<String, SimNode>,
    operators: Vec<Option<Proc>>,
    /// Each operator replica's metrics address (`127.0.0.1:port`), by replica.
    operator_metrics: Vec<String>,
    /// The agent pool process, when [`Fleet::start_agent_pool`] started one.
    pool: Option<Proc>,
    dir: tempfile::TempDir,
    client: Client,
    api_port: u16,
    server_url: String,
    ca_pem: String,
    identities: String,
    operator_dra: String,
}

/// Writes one kubeconfig YAML for a bearer token.
fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: e2e\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: e2e\ncurrent-context: e2e\n"
    )
}

impl Fleet {
    /// Prepares the identities (namespace, service accounts, RBAC) on `cp`. Nodes are added
    /// with [`Fleet::add_node`]; operators started with [`Fleet::start_operators`].
    pub async fn new(cp: &ControlPlane, bins: Bins) -> anyhow::Result<Fleet> {
        Fleet::with_chart_values(cp, bins, &[]).await
    }

    /// Like [`Fleet::new`], with `--set` `values` for the chart whose RBAC and admission
    /// policies are applied (e.g. `dra.enabled=true`: the DRA rights of the agent and the
    /// operator, whose `--dra` follows what the chart rendered).
    pub async fn with_chart_values(
        cp: &ControlPlane,
        bins: Bins,
        values: &[&str],
    ) -> anyhow::Result<Fleet> {
        let client = cp.client().await?;
        let (identities, operator_dra) = ensure_identities(cp, &client, values).await?;
        Ok(Fleet {
            identities,
            operator_dra,
            bins,
            nodes: BTreeMap::new(),
            operators: vec![],
            operator_metrics: vec![],
            pool: None,
            dir: tempfile::Builder::new()
                .prefix("unwedge-fleet-")
                .disable_cleanup(crate::cluster::keep_logs())
                .tempdir()?,
            client,
            api_port: cp.ports().apiserver,
            server_url: cp.server_url(),
            ca_pem: cp.ca_pem(),
        })
    }

    /// Where the RBAC and admission policies came from: `chart`, or `harness: <why the chart
    /// could not be rendered>`.
    pub fn identities(&self) -> &str {
        &self.identities
    }

    /// The admin client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A simulated node: kwok Node, agent pod object, sysfs, PodResources, namespace, and (when
    /// `agent`) its agent started (not waited for).
    pub async fn add_node(
        &mut self,
        cp: &ControlPlane,
        spec: NodeSpec,
        agent: bool,
    ) -> anyhow::Result<()> {
        let gpus = spec.gpus.len().to_string();
        let mut labels: Vec<(&str, &str)> = vec![GPU_LABEL];
        labels.extend(spec.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cp.add_kwok_node(&spec.name, &labels, &[(RESOURCE, gpus.as_str())])
            .await
            .with_context(|| format!("add kwok node {}", spec.name))?;
        let dir = self.dir.path().join(&spec.name);
        std::fs::create_dir_all(dir.join("state"))?;
        let sysfs = FakeSysfs::new(&dir, spec.gpus.clone())?;
        let mut podres = PodResourcesServer::start(
            self.client.clone(),
            &spec.name,
            spec.gpus.iter().map(|g| g.bdf.clone()).collect(),
            &dir.join("kubelet.sock"),
        )
        .await?;
        podres.serve_runtime(&dir.join("containerd.sock"))?;
        let netns = NetNs::new(self.api_port).await?;
        let reboot = dir.join("reboot.sh");
        std::fs::write(
            &reboot,
            format!(
                "#!/bin/sh\necho \"$(date +%s.%N)\" >> {}\n",
                dir.join("reboot-requests").display()
            ),
        )?;
        std::fs::set_permissions(&reboot, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let uid = create_agent_pod(&self.client, &spec.name).await?;
        let token = cp
            .create_token(
                SYSTEM_NS,
                AGENT_SA,
                Some((&format!("unwedge-agent-{}", spec.name), &uid)),
            )
            .await?;
        std::fs::write(
            dir.join("kubeconfig"),
            kubeconfig(&self.server_url, &self.ca_pem, &token),
        )?;
        std::fs::write(dir.join("token"), &token)?;
        let mut node = SimNode {
            name: spec.name.clone(),
            dir,
            sysfs,
            podres,
            netns,
            agent: None,
            pooled: false,
            boots: 0,
            agent_pod_uid: uid,
            extra_agent_args: vec![],
        };
        node.write_boot_id()?;
        if agent {
            node.start_agent(&self.bins)?;
        }
        self.nodes.insert(spec.name, node);
        Ok(())
    }

    /// The node called `name` (panics with a clear message when there is none).
    pub fn node(&mut self, name: &str) -> &mut SimNode {
        self.nodes
            .get_mut(name)
            .unwrap_or_else(|| panic!("the fleet has no node {name}"))
    }

    /// The node called `name`, for reading (panics with a clear message when there is none).
    pub fn sim(&self, name: &str) -> &SimNode {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("the fleet has no node {name}"))
    }

    /// The agent token of a node (its pod-bound ServiceAccount token).
    pub fn agent_token(&self, node: &str) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(
            self.nodes
                .get(node)
                .with_context(|| format!("no node {node}"))?
                .dir
                .join("token"),
        )?)
    }

    /// Waits until every agent answers /readyz (`timeout` for each).
    pub async fn wait_agents_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let pool_log = self.pool_log();
        for n in self.nodes.values_mut() {
            if n.agent.is_some() || n.pooled {
                if n.pooled
                    && let Some(code) = self.pool.as_mut().and_then(|p| p.exited())
                {
                    anyhow::bail!(
                        "the agent pool exited ({code:?}); its log:\n{}",
                        tail(&pool_log, 40)
                    );
                }
                n.wait_agent_ready(timeout).await?;
            }
        }
        Ok(())
    }

    /// The agent pool's log file.
    pub fn pool_log(&self) -> PathBuf {
        self.dir.path().join("agent-pool.log")
    }

    /// Runs the agents of `names` (nodes added without an agent) as instances of one
    /// `agent-pool` process (docs/design.md §7): the same flags and kubeconfig (pod-bound token) each
    /// node's own agent process would get, the uevent socket and `/readyz` inside the node's
    /// network namespace. Not waited for; one pool per fleet.
    pub fn start_agent_pool(&mut self, names: &[String]) -> anyhow::Result<()> {
        anyhow::ensure!(self.pool.is_none(), "the fleet already runs an agent pool");
        let mut lines = String::new();
        for name in names {
            let n = self
                .nodes
                .get(name)
                .with_context(|| format!("no node {name}"))?;
            anyhow::ensure!(n.agent.is_none(), "node {name} already runs its own agent");
            lines.push_str(&serde_json::to_string(&serde_json::json!({
                "netns": n.netns.path(),
                "kubeconfig": n.dir.join("kubeconfig"),
                "args": n.agent_flags(),
            }))?);
            lines.push('\n');
        }
        let file = self.dir.path().join("agent-pool.jsonl");
        std::fs::write(&file, lines)?;
        let bin = self.bins.agent_pool();
        anyhow::ensure!(
            bin.exists(),
            "{} is missing: cargo build [--release] -p e2e --bins",
            bin.display()
        );
        let args = vec![
            "RUST_LOG=info".to_string(),
            bin.display().to_string(),
            file.display().to_string(),
        ];
        let p = Proc::spawn("agent-pool", Path::new("env"), &args, &self.pool_log())?;
        self.pool = Some(p);
        for name in names {
            self.node(name).pooled = true;
        }
        Ok(())
    }

    /// Kills the agent pool process with SIGKILL (every pooled agent crashes at once); start
    /// it again with [`Fleet::start_agent_pool`].
    pub fn kill_agent_pool(&mut self) {
        if let Some(mut p) = self.pool.take() {
            p.kill_now();
        }
    }

    /// The agent pool's pid, while it runs.
    pub fn pool_pid(&mut self) -> Option<u32> {
        let p = self.pool.as_mut()?;
        if p.exited().is_some() {
            return None;
        }
        Some(p.pid())
    }

    /// Overrides the operator's `--dra` mode (by default the one the chart rendered), for tests
    /// that grant the DRA rights themselves.
    pub fn set_operator_dra(&mut self, mode: &str) {
        self.operator_dra = mode.to_string();
    }

    /// Starts `n` operator replicas with leader election, each with the operator
    /// ServiceAccount's token.
    pub async fn start_operators(&mut self, cp: &ControlPlane, n: usize) -> anyhow::Result<()> {
        let token = cp.create_token(SYSTEM_NS, OPERATOR_SA, None).await?;
        std::fs::write(
            self.operator_kubeconfig(),
            kubeconfig(&self.server_url, &self.ca_pem, &token),
        )?;
        for _ in 0..n {
            let (p, addr) = self.spawn_operator(self.operators.len())?;
            self.operators.push(Some(p));
            self.operator_metrics.push(addr);
        }
        Ok(())
    }

    /// Starts operator replica `i` again (same identity, port chosen afresh, same log) after
    /// [`Fleet::kill_operator`], as a kubelet restarts a crashed container; no-op while it runs.
    pub fn restart_operator(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            i < self.operators.len(),
            "no operator replica {i}: start_operators started {}",
            self.operators.len()
        );
        if self.operators[i].is_none() {
            let (p, addr) = self.spawn_operator(i)?;
            self.operators[i] = Some(p);
            self.operator_metrics[i] = addr;
        }
        Ok(())
    }

    fn operator_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("operator.kubeconfig")
    }

    /// The metrics address (`127.0.0.1:port`) of each operator replica, by replica.
    pub fn operator_metrics_addrs(&self) -> &[String] {
        &self.operator_metrics
    }

    /// Starts replica `i`; returns it and its metrics address.
    fn spawn_operator(&self, i: usize) -> anyhow::Result<(Proc, String)> {
        let port = crate::cluster::free_port()?;
        let args: Vec<String> = vec![
            format!("KUBECONFIG={}", self.operator_kubeconfig().display()),
            "RUST_LOG=info,unwedge_operator=debug".into(),
            "POD_NAMESPACE=unwedge-system".into(),
            self.bins.operator.display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
            "--leader-elect=true".into(),
            "--lease-namespace".into(),
            SYSTEM_NS.into(),
            "--identity".into(),
            format!("operator-{i}"),
            format!("--dra={}", self.operator_dra),
        ];
        let log = self.dir.path().join(format!("operator-{i}.log"));
        let p = Proc::spawn(&format!("operator-{i}"), Path::new("env"), &args, &log)?;
        Ok((p, format!("127.0.0.1:{port}")))
    }

    /// The identity holding the operator's Lease now.
    pub async fn leader(&self) -> Option<String> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(self.client.clone(), SYSTEM_NS);
        leases
            .get("unwedge-operator")
            .await
            .ok()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
    }

    /// Kills operator replica `i` (`operator-<i>`) with SIGKILL.
    pub fn kill_operator(&mut self, i: usize) {
        if let Some(Some(mut p)) = self.operators.get_mut(i).map(Option::take) {
            p.kill_now();
        }
    }

    /// The last lines of every operator's log (for failure messages).
    pub fn operator_logs(&self, n: usize) -> String {
        (0..self.operators.len())
            .map(|i| {
                let log = self.dir.path().join(format!("operator-{i}.log"));
                format!("--- operator-{i}:\n{}", tail(&log, n))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Makes every agent pod object a DaemonSet pod, as it is in a real cluster, so drains
    /// (the reboot rung's) leave it alone: evicting it would revoke the agent's pod-bound token.
    /// The owner is a real DaemonSet (the garbage collector deletes pods whose owner is gone)
    /// whose selector and node selector match nothing, so its controller neither adopts nor
    /// creates pods.
    pub async fn own_agent_pods_by_daemonset(&self) -> anyhow::Result<()> {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let dss: Api<DaemonSet> = Api::namespaced(self.client.clone(), SYSTEM_NS);
        let ds: DaemonSet = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "unwedge-agent"},
            "spec": {
                "selector": {"matchLabels": {"e2e.unwedge.io/daemonset": "unwedge-agent"}},
                "template": {
                    "metadata": {"labels": {"e2e.unwedge.io/daemonset": "unwedge-agent"}},
                    "spec": {
                        "nodeSelector": {"e2e.unwedge.io/no-such-node": "true"},
                        "containers": [{"name": "agent", "image": "unwedge-agent:e2e"}]
                    }
                }
            }
        }))?;
        let ds = match dss.get_opt("unwedge-agent").await? {
            Some(d) => d,
            None => dss
                .create(&PostParams::default(), &ds)
                .await
                .context("create the DaemonSet owning the agent pods")?,
        };
        let uid = ds.metadata.uid.context("the DaemonSet has no uid")?;
        let owner = serde_json::json!({"metadata": {"ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "unwedge-agent", "uid": uid
        }]}});
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), SYSTEM_NS);
        for node in self.nodes.keys() {
            let name = format!("unwedge-agent-{node}");
            pods.patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&owner),
            )
            .await
            .with_context(|| format!("make {name} a DaemonSet pod"))?;
        }
        Ok(())
    }

    /// The fleet's working directory (kept, with the logs, when `UNWEDGE_KEEP_LOGS` is set).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops everything the fleet started: agents, operators, servers.
    pub fn stop(&mut self) {
        for p in self.operators.iter_mut().flatten() {
            p.kill_now();
        }
        if let Some(mut p) = self.pool.take() {
            p.kill_now();
        }
        for n in self.nodes.values_mut() {
            n.kill_agent();
        }
        self.nodes.clear();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn create_agent_pod(client: &Client, node: &str) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("unwedge-agent-{node}"), "labels": {"app.kubernetes.io/name": "unwedge-agent"}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": AGENT_SA,
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "agent", "image": "unwedge-agent:e2e"}]
        }
    }))?;
    let p = pods
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create the agent pod object on {node}"))?;
    p.metadata.uid.context("the agent pod has no uid")
}

/// The namespace, service accounts, RBAC and admission policies: the chart's own (`helm
/// template charts/unwedge`, keeping ServiceAccounts, RBAC and ValidatingAdmissionPolicies),
/// or, when the chart cannot be rendered, the harness's minimal RBAC ([`HARNESS_RBAC`]).
/// Returns which one was applied.
async fn ensure_identities(
    cp: &ControlPlane,
    client: &Client,
    values: &[&str],
) -> anyhow::Result<(String, String)> {
    let nss: Api<Namespace> = Api::all(client.clone());
    if nss.get_opt(SYSTEM_NS).await?.is_none() {
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": SYSTEM_NS}}))?,
        )
        .await?;
    }
    let file = cp.work_dir().join("fleet-identities.yaml");
    let (source, dra) = match chart_identities(cp, values) {
        Ok((yaml, dra)) => {
            std::fs::write(&file, yaml)?;
            ("chart".to_string(), dra)
        }
        Err(e) => {
            tracing::warn!("using the harness RBAC: cannot render the chart: {e:#}");
            std::fs::write(&file, HARNESS_RBAC)?;
            (format!("harness: {e:#}"), "auto".to_string())
        }
    };
    cp.apply_yaml_file(&file).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), SYSTEM_NS);
    for sa in [AGENT_SA, OPERATOR_SA] {
        if sas.get_opt(sa).await?.is_none() {
            sas.create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({"metadata": {"name": sa}}))?,
            )
            .await?;
        }
    }
    Ok((source, dra))
}

/// The chart's ServiceAccounts, RBAC and admission policies, rendered by `helm template`, and
/// the operator's `--dra` value the chart rendered with them (its RBAC grants DRA rights only
/// when that is `on`, so the operators here run with the same value).
fn chart_identities(cp: &ControlPlane, values: &[&str]) -> anyhow::Result<(String, String)> {
    const KINDS: [&str; 7] = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    let out = std::process::Command::new(cp.bin_dir().join("helm"))
        .args(["template", "unwedge"])
        .arg(repo_root().join("charts/unwedge"))
        .args(["--namespace", SYSTEM_NS, "--kube-version", "1.37.2"])
        .args(values.iter().flat_map(|v| ["--set", v]))
        .output()
        .context("run helm template")?;
    anyhow::ensure!(
        out.status.success(),
        "helm template charts/unwedge: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut keep = Vec::new();
    // Pick documents by their top-level `kind:` line first and parse only those, so a problem
    // in a workload template (which the fleet does not use) cannot hide the RBAC and policies.
    for doc in text.split("\n---") {
        let kind = doc
            .lines()
            .find_map(|l| l.strip_prefix("kind:"))
            .map(str::trim)
            .unwrap_or_default();
        if KINDS.contains(&kind) {
            let v: serde_yaml::Value =
                serde_yaml::from_str(doc).with_context(|| format!("parse the chart's {kind}"))?;
            keep.push(serde_yaml::to_string(&v)?);
        }
    }
    anyhow::ensure!(
        keep.iter().any(|d| d.contains("ValidatingAdmissionPolicy")),
        "the rendered chart has no ValidatingAdmissionPolicy"
    );
    let dra = text
        .split("--dra=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_alphanumeric()).next())
        .unwrap_or("auto")
        .to_string();
    Ok((keep.join("---\n"), dra))
}

/// RBAC for the agent and the operator until the chart's templates are applied here:
/// the agent may create and patch GpuWedges and their status and read pods and nodes; the
/// operator gets what its job needs (nodes, pods, evictions, leases, events, the CRDs).
const HARNESS_RBAC: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: unwedge-agent}
rules:
- apiGroups: [unwedge.io]
  resources: [gpuwedges]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [unwedge.io]
  resources: [gpuwedges/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [pods, nodes]
  verbs: [get, list, watch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: unwedge-agent}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: unwedge-agent}
subjects: [{kind: ServiceAccount, name: unwedge-agent, namespace: unwedge-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: unwedge-operator}
rules:
- apiGroups: [unwedge.io]
  resources: [gpuwedges, recoverypolicies]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [unwedge.io]
  resources: [gpuwedges/status, recoverypolicies/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch, patch, update]
- apiGroups: [""]
  resources: [nodes/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
- apiGroups: [""]
  resources: [pods/eviction]
  verbs: [create]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch]
- apiGroups: [apps]
  resources: [daemonsets, replicasets, statefulsets, deployments]
  verbs: [get, list, watch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch, update]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch, create, update, patch]
- apiGroups: [resource.k8s.io]
  resources: [resourceslices, resourceclaims, deviceclasses]
  verbs: [get, list, watch]
- apiGroups: [resource.k8s.io]
  resources: [devicetaintrules]
  verbs: [get, list, watch, create, update, patch, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: unwedge-operator}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: unwedge-operator}
subjects: [{kind: ServiceAccount, name: unwedge-operator, namespace: unwedge-system}]
"#;

/// A Pod on `node` requesting `gpus` fake GPUs (`pinned`: the PCI addresses it must get).
pub fn gpu_pod(namespace: &str, name: &str, node: &str, gpus: u32, pinned: Option<&str>) -> Pod {
    let mut annotations = serde_json::Map::new();
    if let Some(p) = pinned {
        annotations.insert(crate::podresources_server::ANN_DEVICES.into(), p.into());
    }
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}, "annotations": annotations},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "main",
                "image": "gpu-workload:e2e",
                "resources": {"limits": {RESOURCE: gpus.to_string()}, "requests": {RESOURCE: gpus.to_string()}}
            }]
        }
    }))
    .expect("a valid pod")
}

/// Label that ties a scenario's nodes to its RecoveryPolicy.
pub const SCENARIO_LABEL: &str = "e2e.unwedge.io/scenario";

/// One scenario: its nodes (labelled for its own RecoveryPolicy), agents, operators and
/// recorder, on a control plane that several scenarios share one after the other.
pub struct Scenario {
    /// Scenario name (also the policy name and the node-name prefix).
    pub name: String,
    /// The fleet.
    pub fleet: Fleet,
    /// The recorder, started before the first wedge.
    pub rec: crate::recorder::Recorder,
}

impl Scenario {
    /// Creates `nodes` (names prefixed by the scenario name), a RecoveryPolicy named after
    /// the scenario with `policy_spec` merged over `{nodeSelector, maxUnavailable}`, the
    /// recorder with that budget, `operators` operator replicas, and waits for the agents (one
    /// process per node).
    pub async fn new(
        cp: &ControlPlane,
        bins: &Bins,
        name: &str,
        nodes: Vec<NodeSpec>,
        max_unavailable: usize,
        policy_spec: serde_json::Value,
        operators: usize,
    ) -> anyhow::Result<Scenario> {
        Scenario::build(
            cp,
            bins,
            name,
            nodes,
            (max_unavailable, policy_spec),
            operators,
            false,
        )
        .await
    }

    /// Like [`Scenario::new`], with every node's agent an instance of one `agent-pool`
    /// process ([`Fleet::start_agent_pool`]), for fleets too large for a process per node.
    pub async fn new_pooled(
        cp: &ControlPlane,
        bins: &Bins,
        name: &str,
        nodes: Vec<NodeSpec>,
        max_unavailable: usize,
        policy_spec: serde_json::Value,
        operators: usize,
    ) -> anyhow::Result<Scenario> {
        Scenario::build(
            cp,
            bins,
            name,
            nodes,
            (max_unavailable, policy_spec),
            operators,
            true,
        )
        .await
    }

    async fn build(
        cp: &ControlPlane,
        bins: &Bins,
        name: &str,
        nodes: Vec<NodeSpec>,
        (max_unavailable, policy_spec): (usize, serde_json::Value),
        operators: usize,
        pool: bool,
    ) -> anyhow::Result<Scenario> {
        let mut fleet = Fleet::new(cp, bins.clone()).await?;
        let client = fleet.client();
        let mut spec = serde_json::json!({
            "nodeSelector": {SCENARIO_LABEL: name},
            "maxUnavailable": max_unavailable,
        });
        if let (Some(m), Some(extra)) = (spec.as_object_mut(), policy_spec.as_object()) {
            for (k, v) in extra {
                m.insert(k.clone(), v.clone());
            }
        }
        let policy: unwedge_crds::policy::RecoveryPolicy =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
                "metadata": {"name": name}, "spec": spec
            }))
            .context("the scenario's RecoveryPolicy")?;
        Api::<unwedge_crds::policy::RecoveryPolicy>::all(client.clone())
            .create(&PostParams::default(), &policy)
            .await
            .with_context(|| format!("create RecoveryPolicy {name}"))?;
        let rec =
            crate::recorder::Recorder::start(client.clone(), &[(name, max_unavailable)]).await?;
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        for mut n in nodes {
            n.labels.push((SCENARIO_LABEL.into(), name.into()));
            fleet.add_node(cp, n, !pool).await?;
        }
        if pool {
            fleet.start_agent_pool(&names)?;
        }
        if operators > 0 {
            fleet.start_operators(cp, operators).await?;
        }
        fleet.wait_agents_ready(Duration::from_secs(60)).await?;
        Ok(Scenario {
            name: name.to_string(),
            fleet,
            rec,
        })
    }

    /// Creates a pod needing `gpus` fake GPUs on `node` (`pinned`: the PCI addresses) and
    /// waits until it runs and the node's PodResources server reports it.
    pub async fn pod(
        &mut self,
        ns: &str,
        name: &str,
        node: &str,
        gpus: u32,
        pinned: Option<&str>,
    ) -> anyhow::Result<Pod> {
        self.pod_from(gpu_pod(ns, name, node, gpus, pinned), gpus)
            .await
    }

    /// Creates `pod` (a [`gpu_pod`], perhaps changed: e.g. its restartPolicy) and waits as
    /// [`Scenario::pod`] does.
    pub async fn pod_from(&mut self, pod: Pod, gpus: u32) -> anyhow::Result<Pod> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_selector.as_ref())
            .and_then(|n| n.get("kubernetes.io/hostname").cloned())
            .unwrap_or_default();
        let (ns, name, node) = (ns.as_str(), name.as_str(), node.as_str());
        let client = self.fleet.client();
        let nss: Api<Namespace> = Api::all(client.clone());
        if nss.get_opt(ns).await?.is_none() {
            let _ = nss
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))?,
                )
                .await;
        }
        let pods: Api<Pod> = Api::namespaced(client, ns);
        pods.create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("create pod {ns}/{name}"))?;
        let podres = &self.fleet.node(node).podres;
        wait::until(
            &format!("pod {ns}/{name} running on {node} with its GPUs"),
            Duration::from_secs(60),
            || async {
                let p = pods.get(name).await?;
                let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                let listed = podres.has_devices(ns, name);
                Ok(
                    if phase.as_deref() == Some("Running") && (gpus == 0 || listed) {
                        Check::Done(p)
                    } else {
                        Check::Seen(format!(
                            "phase {phase:?}, its devices listed by PodResources: {listed}"
                        ))
                    },
                )
            },
        )
        .await
    }

    /// Sets fields of the scenario's RecoveryPolicy (a merge patch of `body`, e.g. `{"spec":
    /// {"paused": true}}`).
    pub async fn patch_policy(&self, body: serde_json::Value) -> anyhow::Result<()> {
        Api::<unwedge_crds::policy::RecoveryPolicy>::all(self.fleet.client())
            .patch(
                &self.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(body),
            )
            .await
            .with_context(|| format!("patch the RecoveryPolicy {}", self.name))?;
        Ok(())
    }

    /// Whether the pod still exists (not evicted).
    pub async fn pod_exists(&self, ns: &str, name: &str) -> anyhow::Result<bool> {
        let pods: Api<Pod> = Api::namespaced(self.fleet.client(), ns);
        Ok(pods
            .get_opt(name)
            .await?
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none()))
    }

    /// Invariants 1–3 for the whole scenario (the recorder's checks and every node's journal).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.rec.check_invariants()?;
        for (name, n) in &self.fleet.nodes {
            self.rec
                .check_journal(name, &n.sysfs)
                .map_err(|e| format!("scenario {}: {e}\n{}", self.name, self.rec.report()))?;
        }
        Ok(())
    }

    /// A `map_err` adapter: turns an error into [`Scenario::fail`] of `what: error`.
    pub fn ctx<E: std::fmt::Display>(&self, what: &str) -> impl FnOnce(E) -> String + '_ {
        let what = what.to_string();
        move |err| self.fail(&format!("{what}: {err}"))
    }

    /// A failure message: what, then the recorder's report, the agents' and operators' logs.
    pub fn fail(&self, what: &str) -> String {
        let mut s = format!("scenario {}: {what}\n{}", self.name, self.rec.report());
        for (name, n) in &self.fleet.nodes {
            if !n.pooled {
                s.push_str(&format!(
                    "--- agent {name}:\n{}\n",
                    tail(&n.agent_log(), 25)
                ));
            }
        }
        if self.fleet.pool.is_some() {
            s.push_str(&format!(
                "--- agent pool:\n{}\n",
                tail(&self.fleet.pool_log(), 60)
            ));
        }
        s.push_str(&self.fleet.operator_logs(40));
        s
    }
}

/// A host process placed in a kubepods-style cgroup of a pod (cgroup v1 `pids` hierarchy,
/// cgroupfs driver: `/sys/fs/cgroup/pids/kubepods/besteffort/pod<uid>/<container id>`), so
/// `/proc/<pid>/cgroup` names the pod's uid as a real container's task would. Killed and its
/// cgroup removed on drop.
pub struct PodProcess {
    child: std::process::Child,
    cgroup: PathBuf,
}

impl PodProcess {
    /// Starts `sleep` in the cgroup of container `container_id` of pod `pod_uid`.
    pub fn start(pod_uid: &str, container_id: &str) -> anyhow::Result<PodProcess> {
        let root = std::env::var_os("UNWEDGE_E2E_CGROUP_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/pids"));
        let cgroup = root
            .join("kubepods/besteffort")
            .join(format!("pod{pod_uid}"))
            .join(container_id);
        std::fs::create_dir_all(&cgroup).with_context(|| {
            format!(
                "create the cgroup {} (needs root and a writable cgroup v1 pids hierarchy)",
                cgroup.display()
            )
        })?;
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .context("start the blamed process")?;
        std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string())
            .with_context(|| format!("move pid {} into {}", child.id(), cgroup.display()))?;
        Ok(PodProcess { child, cgroup })
    }

    /// The process id (what a driver would send as `PID=`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
        if let Some(p) = self.cgroup.parent() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// A host process that keeps a file (a card node) open, for the fd gate.
pub struct Holder {
    child: std::process::Child,
}

impl Holder {
    /// Opens `path` read-only and holds it until dropped or [`Holder::release`]d.
    pub fn open(path: &Path) -> anyhow::Result<Holder> {
        let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        let child = std::process::Command::new("sleep")
            .arg("600")
            .stdin(f)
            .spawn()
            .context("start the holder")?;
        Ok(Holder { child })
    }

    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the file (kills the holder).
    pub fn release(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
