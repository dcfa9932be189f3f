//! A real local Kubernetes control plane for tests, without Docker (docs/design.md §7).
//!
//! [`ControlPlane::start`] builds (or reuses from the cache) the pinned upstream binaries with
//! `e2e/cluster/build-binaries.sh`, generates a CA, serving and client certificates and a
//! service-account key pair, and starts on free loopback ports:
//!
//! - etcd (data in a temporary directory, no fsync),
//! - kube-apiserver (`--authorization-mode=Node,RBAC`, the default admission plugins, which
//!   include ValidatingAdmissionPolicy),
//! - kube-controller-manager (`--leader-elect=false`, every default controller: garbage
//!   collector, deployment, replicaset, statefulset, job, disruption, serviceaccount, …),
//! - kube-scheduler (`--leader-elect=false`),
//! - kwok, which manages only nodes annotated `kwok.x-k8s.io/node=fake`
//!   (`--manage-nodes-with-annotation-selector`): those nodes become Ready and pods bound to
//!   them run. Nodes without the annotation are left alone, so a test can also register nodes
//!   that nobody heartbeats.
//!
//! Each process logs to a file under [`ControlPlane::log_dir`]; the tails are printed when
//! start-up fails and when a test panics while the control plane is alive. Every child dies
//! with the test process (`PR_SET_PDEATHSIG`) and is killed, with its process group, on drop.

mod pki;
mod process;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, SelfSubjectReview, TokenRequest, TokenRequestSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, NodeStatus, ServiceAccount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::wait::Check;

pub use pki::Pki;
pub use process::Proc;

/// The annotation kwok selects the nodes it manages by (`kwok.x-k8s.io/node=fake`).
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// The label every node made by [`ControlPlane::add_kwok_node`] carries (`type=kwok`).
pub const KWOK_NODE_LABEL: (&str, &str) = ("type", "kwok");

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A component of the control plane exited while it should run.
#[derive(Debug)]
struct ComponentExited(String);

impl std::fmt::Display for ComponentExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ComponentExited {}

/// The loopback ports of one control plane.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// etcd client port.
    pub etcd_client: u16,
    /// etcd peer port.
    pub etcd_peer: u16,
    /// kube-apiserver secure port.
    pub apiserver: u16,
    /// kube-controller-manager secure (health) port.
    pub controller_manager: u16,
    /// kube-scheduler secure (health) port.
    pub scheduler: u16,
}

/// A running local control plane. Dropping it kills every process and removes its files.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    repo: PathBuf,
    bin: PathBuf,
    ports: Ports,
    pki: Pki,
    admin_kubeconfig: PathBuf,
    apiserver_args: Vec<String>,
    /// etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok (stopped ones are None).
    procs: Vec<Option<Proc>>,
}

const APISERVER: usize = 1;

/// The repository root (the parent of the `e2e` crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e has a parent directory")
        .to_path_buf()
}

/// The pinned binaries [`ControlPlane::start`] builds: the control plane's own, kubectl, and
/// helm, with which a [`crate::fleet::Fleet`] renders the chart's RBAC and admission policies
/// (without it the fleet falls back to the harness's RBAC). helm4 only the chart tests ask for.
pub const CONTROL_PLANE_BINARIES: [&str; 7] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
];

/// Builds the pinned binaries `names` not in the cache yet and returns the directory they are in
/// (one directory for every pinned binary, keyed by their versions).
///
/// `UNWEDGE_BIN_DIR`, when set, names a directory that already holds them and skips the build.
pub fn ensure_binaries(names: &[&str]) -> anyhow::Result<PathBuf> {
    let dir = if let Some(dir) = std::env::var_os("UNWEDGE_BIN_DIR") {
        PathBuf::from(dir)
    } else {
        let script = repo_root().join("e2e/cluster/build-binaries.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(names)
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("run {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}); the control-plane tests need Go >= 1.26 and network access to \
                 the Go module proxy for the first build (see .ci/run)",
                script.display(),
                out.status
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .context("build-binaries.sh printed no bin directory")?
                .trim(),
        )
    };
    for b in names {
        if !dir.join(b).is_file() {
            bail!("{} has no {b}", dir.display());
        }
    }
    Ok(dir)
}

/// Whether `UNWEDGE_KEEP_LOGS` asks to keep the working directories and logs (set, and not
/// empty or `0`).
pub fn keep_logs() -> bool {
    std::env::var_os("UNWEDGE_KEEP_LOGS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A loopback port that is free now, chosen below the kernel's ephemeral range (32768–60999 by
/// default). A port the kernel hands out (`bind` to 0) is one that any outgoing connection of a
/// test running beside this one may take between this check and the server's own bind — seen
/// once with two e2e lanes: "kube-controller-manager … bind: address already in use".
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    const LOW: u64 = 10_000;
    const SPAN: u64 = 32_768 - LOW;
    // One start per process, then a step coprime to the span: no port is handed out twice by
    // one process (until the span is used up), and two processes start far apart.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
    });
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (seed % SPAN + n * 7919) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn kubeconfig_yaml(server: &str, ca_pem: &[u8], user: serde_json::Value) -> String {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "unwedge-e2e", "cluster": {
            "server": server,
            "certificate-authority-data": b64(ca_pem),
        }}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "unwedge-e2e", "context": {"cluster": "unwedge-e2e", "user": "user"}}],
        "current-context": "unwedge-e2e",
    });
    serde_yaml::to_string(&doc).expect("a kubeconfig serializes")
}

fn cert_kubeconfig(server: &str, pki: &Pki, pair: &(PathBuf, PathBuf)) -> anyhow::Result<String> {
    let ca = std::fs::read(&pki.ca_crt)?;
    let crt = std::fs::read(&pair.0)?;
    let key = std::fs::read(&pair.1)?;
    Ok(kubeconfig_yaml(
        server,
        &ca,
        serde_json::json!({
            "client-certificate-data": b64(&crt),
            "client-key-data": b64(&key),
        }),
    ))
}

async fn client_from_kubeconfig_text(text: &str) -> anyhow::Result<kube::Client> {
    let kc = Kubeconfig::from_yaml(text)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// [`crate::wait::poll`] every 100 ms for the control plane's start: an error or a try
/// without an answer within 10 s is one more state seen, except a component that exited, which
/// ends the wait at once.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    crate::wait::poll(what, timeout, Duration::from_millis(100), || {
        let answer = tokio::time::timeout(Duration::from_secs(10), f());
        async move {
            Ok(match answer.await {
                Ok(Ok(o)) => Check::from(o),
                Ok(Err(e)) if e.downcast_ref::<ComponentExited>().is_some() => return Err(e),
                Ok(Err(e)) => Check::Seen(format!("{e:#}")),
                Err(_) => Check::Seen("no answer within 10s".to_string()),
            })
        }
    })
    .await?
}

impl ControlPlane {
    /// Builds or finds the binaries, generates certificates and starts every component; returns
    /// once `/readyz` is ok and the `default` namespace and its `default` ServiceAccount exist.
    pub async fn start() -> anyhow::Result<ControlPlane> {
        let bin =
            tokio::task::spawn_blocking(|| ensure_binaries(&CONTROL_PLANE_BINARIES)).await??;
        let dir = tempfile::Builder::new().prefix("unwedge-cp-").tempdir()?;
        let root = dir.path().to_path_buf();
        let pki = {
            let pki_dir = root.join("pki");
            tokio::task::spawn_blocking(move || pki::generate(&pki_dir)).await??
        };
        std::fs::create_dir_all(root.join("logs"))?;
        let ports = Ports {
            etcd_client: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
            controller_manager: free_port()?,
            scheduler: free_port()?,
        };
        let server = format!("https://127.0.0.1:{}", ports.apiserver);
        let admin_kubeconfig = root.join("admin.kubeconfig");
        std::fs::write(
            &admin_kubeconfig,
            cert_kubeconfig(&server, &pki, &pki.admin)?,
        )?;
        let kcm_kubeconfig = root.join("controller-manager.kubeconfig");
        std::fs::write(
            &kcm_kubeconfig,
            cert_kubeconfig(&server, &pki, &pki.controller_manager)?,
        )?;
        let sched_kubeconfig = root.join("scheduler.kubeconfig");
        std::fs::write(
            &sched_kubeconfig,
            cert_kubeconfig(&server, &pki, &pki.scheduler)?,
        )?;
        let p = |p: &Path| p.display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.apiserver),
            format!("--cert-dir={}", p(&root.join("apiserver-certs"))),
            format!("--tls-cert-file={}", p(&pki.serving_crt)),
            format!("--tls-private-key-file={}", p(&pki.serving_key)),
            format!("--client-ca-file={}", p(&pki.ca_crt)),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            // The lease reconciler refuses a loopback advertise address; nothing here needs
            // endpoints for the `kubernetes` Service.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];

        let mut cp = ControlPlane {
            dir: Some(dir),
            root: root.clone(),
            repo: repo_root(),
            bin: bin.clone(),
            ports,
            pki: pki.clone(),
            admin_kubeconfig: admin_kubeconfig.clone(),
            apiserver_args,
            procs: Vec::new(),
        };
        let started = cp
            .start_all(&kcm_kubeconfig, &sched_kubeconfig)
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", cp.log_tails(40)));
        started?;
        Ok(cp)
    }

    async fn start_all(&mut self, kcm: &Path, sched: &Path) -> anyhow::Result<()> {
        let root = self.root.clone();
        let ports = self.ports;
        let p = |p: &Path| p.display().to_string();
        let etcd = self.spawn(
            "etcd",
            &[
                "--name=e2e".into(),
                format!("--data-dir={}", p(&root.join("etcd"))),
                format!(
                    "--listen-client-urls=http://127.0.0.1:{}",
                    ports.etcd_client
                ),
                format!(
                    "--advertise-client-urls=http://127.0.0.1:{}",
                    ports.etcd_client
                ),
                format!("--listen-peer-urls=http://127.0.0.1:{}", ports.etcd_peer),
                format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                    ports.etcd_peer
                ),
                format!("--initial-cluster=e2e=http://127.0.0.1:{}", ports.etcd_peer),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.procs.push(Some(etcd));
        self.procs.push(None);
        self.start_apiserver().await?;

        let kcm_args = vec![
            format!("--kubeconfig={}", p(kcm)),
            format!("--authentication-kubeconfig={}", p(kcm)),
            format!("--authorization-kubeconfig={}", p(kcm)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.controller_manager),
            format!("--cert-dir={}", p(&root.join("kcm-certs"))),
            "--leader-elect=false".into(),
            "--controllers=*".into(),
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", p(&self.pki.sa_key)),
            format!("--root-ca-file={}", p(&self.pki.ca_crt)),
            format!("--cluster-signing-cert-file={}", p(&self.pki.ca_crt)),
            format!("--cluster-signing-key-file={}", p(&self.pki.ca_key)),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let kcm = self.spawn("kube-controller-manager", &kcm_args)?;
        self.procs.push(Some(kcm));
        let sched_args = vec![
            format!("--kubeconfig={}", p(sched)),
            format!("--authentication-kubeconfig={}", p(sched)),
            format!("--authorization-kubeconfig={}", p(sched)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.scheduler),
            format!("--cert-dir={}", p(&root.join("scheduler-certs"))),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let sched = self.spawn("kube-scheduler", &sched_args)?;
        self.procs.push(Some(sched));
        let kwok_args = vec![
            format!("--kubeconfig={}", p(&self.admin_kubeconfig)),
            "--manage-all-nodes=false".into(),
            format!("--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake"),
            "--node-lease-duration-seconds=40".into(),
            "--cidr=10.244.0.0/16".into(),
            "--node-ip=127.0.0.1".into(),
        ];
        let kwok = self.spawn("kwok", &kwok_args)?;
        self.procs.push(Some(kwok));

        let client = self.client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        let namespaces: Api<Namespace> = Api::all(client);
        let this = &*self;
        poll(
            "the default namespace and ServiceAccount",
            READY_TIMEOUT,
            || {
                let (sas, namespaces) = (sas.clone(), namespaces.clone());
                async move {
                    this.check_alive()?;
                    Ok((namespaces.get_opt("default").await?.is_some()
                        && sas.get_opt("default").await?.is_some())
                    .then_some(()))
                }
            },
        )
        .await?;
        Ok(())
    }

    fn spawn(&self, name: &str, args: &[String]) -> anyhow::Result<Proc> {
        Ok(Proc::spawn(
            name,
            &self.bin.join(name),
            args,
            &self.root.join("logs").join(format!("{name}.log")),
        )?)
    }

    /// Fails when a component that should run has exited.
    fn check_alive(&self) -> anyhow::Result<()> {
        // try_wait needs &mut; the processes are checked through /proc instead.
        for p in self.procs.iter().flatten() {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", p.pid())).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("X");
            if state == "Z" || state == "X" {
                return Err(
                    ComponentExited(format!("{} exited; see {}", p.name, p.log.display())).into(),
                );
            }
        }
        Ok(())
    }

    /// Starts kube-apiserver (again) with the same ports, certificates and etcd, and waits
    /// until `/readyz` is ok. Does nothing if it is running.
    pub async fn start_apiserver(&mut self) -> anyhow::Result<()> {
        if self.procs[APISERVER].is_some() {
            return Ok(());
        }
        let proc = self.spawn("kube-apiserver", &self.apiserver_args.clone())?;
        self.procs[APISERVER] = Some(proc);
        let client = self.client().await?;
        let this = &*self;
        poll("kube-apiserver /readyz", READY_TIMEOUT, || {
            let client = client.clone();
            async move {
                this.check_alive()?;
                let req = http::Request::get("/readyz").body(Vec::new())?;
                let text = client.request_text(req).await?;
                Ok((text.trim() == "ok").then_some(()))
            }
        })
        .await
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 10 s); etcd and the rest keep running.
    pub async fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.procs[APISERVER].take() {
            p.terminate(Duration::from_secs(10)).await;
        }
    }

    /// Kills kube-apiserver with SIGKILL (a crash: no graceful shutdown, watches cut); etcd and
    /// the rest keep running. [`ControlPlane::start_apiserver`] brings it back.
    pub fn kill_apiserver(&mut self) {
        if let Some(mut p) = self.procs[APISERVER].take() {
            p.kill_now();
        }
    }

    /// Stops and starts kube-apiserver; returns when it is ready again.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        self.stop_apiserver().await;
        self.start_apiserver().await
    }

    /// Stops every component gracefully (kwok first, etcd last) and removes the files.
    pub async fn stop(mut self) {
        for slot in self.procs.iter_mut().rev() {
            if let Some(mut p) = slot.take() {
                p.terminate(Duration::from_secs(5)).await;
            }
        }
    }

    /// The admin kubeconfig (client certificate with `O=system:masters`; data embedded).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// Process ids of the running components (each is also its process group id).
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().flatten().map(Proc::pid).collect()
    }

    /// The loopback ports in use.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The CA certificate (PEM) that signed the serving and client certificates.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.pki.ca_crt).expect("the CA certificate is readable")
    }

    /// Paths of the generated certificates and keys.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The directory of the pinned binaries (kubectl, helm, … as well).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Where each component logs (`<name>.log`).
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The control plane's scratch directory (removed on drop).
    pub fn work_dir(&self) -> &Path {
        &self.root
    }

    /// The last `n` lines of every component's log.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(self.log_dir())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for path in names {
            out.push_str(&format!(
                "----- {} (last {n} lines) -----\n{}\n",
                path.display(),
                process::tail(&path, n)
            ));
        }
        out
    }

    /// A client with the admin identity.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let text = std::fs::read_to_string(&self.admin_kubeconfig)?;
        client_from_kubeconfig_text(&text).await
    }

    /// Runs the pinned kubectl with the admin kubeconfig.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = tokio::process::Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .context("run kubectl")?;
        Ok(out)
    }

    /// Runs kubectl and returns its stdout; fails with stderr when it exits non-zero.
    pub async fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.kubectl(args).await?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply --server-side --force-conflicts -f <path>` (a file or a directory).
    ///
    /// Retried for up to 30 s while the API server answers that a ValidatingAdmissionPolicy's
    /// paramKind is "not yet synced to use for admission": right after the chart installs its
    /// policies, the first write they govern can meet that (a CI run failed on it).
    pub async fn apply_yaml_file(&self, path: &Path) -> anyhow::Result<String> {
        let path = path.display().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .kubectl_ok(&[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--field-manager=unwedge-e2e",
                    "-f",
                    &path,
                ])
                .await;
            match r {
                Err(e)
                    if e.to_string()
                        .contains("not yet synced to use for admission")
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                r => return r,
            }
        }
    }

    /// Applies `<repo>/crds/*.yaml` and waits until every CRD is Established.
    pub async fn apply_crds(&self) -> anyhow::Result<()> {
        let dir = self.repo.join("crds");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no CRD YAML in {}", dir.display());
        }
        let mut names = Vec::new();
        for f in &files {
            self.apply_yaml_file(f).await?;
            let stem = f.file_stem().unwrap_or_default().to_string_lossy();
            names.push(format!("crd/{stem}"));
        }
        let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
        args.extend(names.iter().map(String::as_str));
        self.kubectl_ok(&args).await?;
        Ok(())
    }

    /// Registers a node that kwok manages (annotation `kwok.x-k8s.io/node=fake`, label
    /// `type=kwok`, no taints) with 32 CPUs, 256Gi, 110 pods and `extra_allocatable`, and waits
    /// until it is Ready and the not-ready taint is gone.
    pub async fn add_kwok_node(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        extra_allocatable: &[(&str, &str)],
    ) -> anyhow::Result<Node> {
        let mut all_labels: BTreeMap<String, String> = [
            ("kubernetes.io/hostname", name),
            ("kubernetes.io/os", "linux"),
            ("kubernetes.io/arch", "amd64"),
            KWOK_NODE_LABEL,
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        all_labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut resources: BTreeMap<String, Quantity> =
            [("cpu", "32"), ("memory", "256Gi"), ("pods", "110")]
                .iter()
                .chain(extra_allocatable.iter())
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect();
        resources.retain(|_, v| !v.0.is_empty());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(all_labels),
                annotations: Some(
                    [
                        (KWOK_NODE_ANNOTATION.to_string(), "fake".to_string()),
                        ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                capacity: Some(resources.clone()),
                allocatable: Some(resources),
                ..Default::default()
            }),
        };
        let nodes: Api<Node> = Api::all(self.client().await?);
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("create node {name}"))?;
        crate::wait::object(&nodes, name, "Ready and untainted", READY_TIMEOUT, |n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| !t.is_empty());
            ready && !tainted
        })
        .await
    }

    /// A token for `namespace/serviceaccount` from the TokenRequest API (valid 24 h). Bound to
    /// a pod, the token's user carries `authentication.kubernetes.io/node-name` (and
    /// `pod-name`, `pod-uid`, `node-uid`) in its extra, which admission policies read.
    pub async fn create_token(
        &self,
        namespace: &str,
        serviceaccount: &str,
        bound_pod: Option<(&str, &str)>,
    ) -> anyhow::Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let req = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: None,
                attestations: None,
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: bound_pod.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
            }),
            ..Default::default()
        };
        let resp = sas
            .create_token_request(serviceaccount, &PostParams::default(), &req)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{serviceaccount}"))?;
        resp.status
            .and_then(|s| s.token)
            .context("TokenRequest returned no token")
    }

    /// The kubeconfig text for a bearer token against this control plane.
    pub fn kubeconfig_for_token(&self, token: &str) -> String {
        kubeconfig_yaml(
            &self.server_url(),
            self.ca_pem().as_bytes(),
            serde_json::json!({ "token": token }),
        )
    }

    /// Writes a kubeconfig for a bearer token (server and CA embedded) to `path`.
    pub fn write_kubeconfig(&self, token: &str, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.kubeconfig_for_token(token))
            .with_context(|| format!("write {}", path.display()))
    }

    /// A client that authenticates with a bearer token.
    pub async fn client_for_token(&self, token: &str) -> anyhow::Result<kube::Client> {
        client_from_kubeconfig_text(&self.kubeconfig_for_token(token)).await
    }

    /// Who the API server says the client is (a SelfSubjectReview).
    pub async fn whoami(client: &kube::Client) -> anyhow::Result<SelfSubjectReview> {
        let api: Api<SelfSubjectReview> = Api::all(client.clone());
        Ok(api
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await?)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!("control plane logs:\n{}", self.log_tails(30));
        }
        // kwok first, etcd last; SIGKILL cannot be refused, so this is quick.
        for slot in self.procs.iter_mut().rev() {
            if let Some(mut p) = slot.take() {
                p.kill_now();
            }
        }
        if panicking
            && keep_logs()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("kept {}", dir.keep().display());
        }
    }
}
