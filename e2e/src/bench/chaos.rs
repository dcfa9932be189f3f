//! `chaos` (issue 22): storms of wedges on kwok nodes (agents pooled in one `agent-pool`
//! process, two operator replicas with leader election) while, at moments drawn from a seeded
//! RNG, SIGKILLs hit the operator leader, the agent pool and kube-apiserver, and GpuWedges and
//! Nodes are deleted and nodes relabelled into a second policy. One chaos action at a time;
//! every wait is bounded.
//!
//! The figures, summed over the storms:
//! - `lost wedges`: an injected uevent whose wedge was never seen in a terminal phase
//!   (Recovered, Abandoned), was not deleted by the chaos and whose node was not deleted by the
//!   chaos, when its storm ends (every wedge resolved, or the storm's time bound), except
//!   those counted apart as `needs attention after cut attempts`: a wedge in NeedsAttention
//!   every attempt of which (every approval the recorder saw for it, and every attempt its
//!   status lists) the agent reported as cut by its own restart ("agent restarted during the
//!   attempt; not re-executed": the at-most-once rule), the designed outcome when restarts
//!   cut `maxAttempts` attempts in a row. Not a loss figure.
//!   The kernel sends a uevent once, so the agent may legitimately lose one it has not yet
//!   committed to its outbox: the agent pool is killed only at fair moments, once every uevent
//!   injected so far is committed (`outbox/<wedge>.json` on disk, or the GpuWedge seen). No
//!   uevent is injected while the pool is down. So no loss is excused.
//! - `double actions`: per device, the sysfs writes beyond the approved attempts that could
//!   cause them (the recorder's `check_journal` rule, without its reset-domain slack: the GPUs
//!   here share no reset domain): max of unbinds and binds over approved rebind + bus-reset
//!   attempts, and resets + removes over approved bus-reset attempts. Approved: seen on the
//!   recorder's watch, or announced in the operator's `Approved` Events (an approval whose
//!   whole life fell inside a watch cut is seen only there).
//! - `budget overruns`: per policy, the recorder's peak of nodes under recovery above its
//!   `maxUnavailable` (0 when the budget always held).
//! - `stranded cordons`: after each storm settled, nodes still unschedulable whose
//!   `unwedge.io/cordoned-by` names a wedge that is terminal or gone.
//! - `stranded ledger places`: after each storm settled, `status.admitted` entries of the
//!   policies naming a wedge that is terminal or gone.
//!
//! "Settled" allows the operator's 10 s ledger repair: the stranded checks are polled until
//! clean or [`Options::settle`] elapsed, and what remains is counted.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt as _};
use unwedge_crds::gpuwedge::GpuWedge;
use unwedge_crds::labels::ANN_CORDONED_BY;
use unwedge_crds::policy::RecoveryPolicy;

use super::Report;
use super::storm::{Tracker, WedgeTrack};
use crate::cluster::ControlPlane;
use crate::fleet::{NodeSpec, SCENARIO_LABEL, Scenario};
use crate::recorder::SeenApproval;

/// The agent's result message for an attempt its restart cut (at most once).
const CUT_BY_RESTART: &str = unwedge_agent::executor::INTERRUPTED;
/// The policy of the nodes relabelled away from the scenario's own.
const OTHER_POLICY: &str = "chaos-b";
/// How long one chaos action (a restart included) may take.
const ACTION_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the agents may take to answer `/readyz` after the pool restarts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of the chaos soak.
#[derive(Clone, Debug)]
pub struct Options {
    /// Storms.
    pub storms: usize,
    /// Wedges per storm (at most the devices of the nodes left).
    pub wedges: usize,
    /// kwok nodes.
    pub nodes: usize,
    /// GPUs per node.
    pub gpus: u32,
    /// maxUnavailable of each policy.
    pub budget: usize,
    /// Kills of each process kind the run must reach.
    pub min_kills: usize,
    /// The RNG seed.
    pub seed: u64,
    /// How long stranded cordons and ledger places may take to clear after a storm.
    pub settle: Duration,
    /// The bound of one storm, from its injection to every wedge resolved.
    pub storm_timeout: Duration,
    /// Short (CI) mode.
    pub short: bool,
}

/// SplitMix64: a seeded generator small enough to carry here.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A duration uniform in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len())])
    }
}

/// One chaos action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chaos {
    KillOperatorLeader,
    KillAgentPool,
    KillApiserver,
    DeleteWedge,
    DeleteNode,
    Relabel,
}

/// One injected uevent.
#[derive(Clone, Debug)]
struct Injection {
    node: String,
    device: String,
    /// The prefix of its wedge's name (node and device; the suffix is the kernel's SEQNUM).
    name_prefix: String,
}

/// What the run counted.
#[derive(Default)]
struct Tally {
    storms: usize,
    wedges: usize,
    kills_operator: usize,
    kills_agent: usize,
    kills_apiserver: usize,
    deletions: usize,
    relabels: usize,
    reboots: usize,
    lost: Vec<String>,
    cut: Vec<String>,
    stranded_cordons: Vec<String>,
    stranded_places: Vec<String>,
}

/// The soak's state between storms.
struct Soak<'a> {
    cp: &'a mut ControlPlane,
    sc: Scenario,
    tracker: Tracker,
    client: Client,
    rng: Rng,
    opts: Options,
    dead_nodes: BTreeSet<String>,
    deleted_wedges: BTreeSet<String>,
    /// Devices whose last wedge never resolved: a new uevent would join that open incident.
    open_devices: BTreeSet<(String, String)>,
    /// Reboot requests already served, per node.
    reboots_served: BTreeMap<String, usize>,
    tally: Tally,
}

/// Runs the soak; returns the report, or an error (after saving the report) when a loss
/// figure is not 0 or a kill count is below [`Options::min_kills`].
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    super::raise_nofile();
    let mut rep = Report::new("chaos", opts.short);
    rep.note(format!(
        "seed {} (rerun with --seed {}); {} storms of {} wedges on {} kwok nodes × {} xe GPUs, agents pooled in one agent-pool process, 2 operator replicas, policies chaos and {OTHER_POLICY} with maxUnavailable {} each",
        opts.seed, opts.seed, opts.storms, opts.wedges, opts.nodes, opts.gpus, opts.budget
    ));
    println!("chaos: seed {}", opts.seed);
    let t_run = Instant::now();
    let (mut cp, bins) = super::control_plane(opts.short).await?;
    let client = cp.client().await?;
    let specs: Vec<NodeSpec> = (0..opts.nodes)
        .map(|i| NodeSpec::new(&format!("chaos-{i:03}"), opts.gpus, "xe"))
        .collect();
    let policy = serde_json::json!({"verifyTimeout": "60s"});
    let sc = Scenario::new_pooled(&cp, &bins, "chaos", specs, opts.budget, policy, 2)
        .await
        .context("set up the chaos fleet")?;
    sc.fleet.own_agent_pods_by_daemonset().await?;
    create_other_policy(&client, opts.budget).await?;
    sc.rec.add_budget(OTHER_POLICY, opts.budget);
    let tracker = Tracker::start(client.clone()).await?;
    let mut soak = Soak {
        cp: &mut cp,
        sc,
        tracker,
        client,
        rng: Rng(opts.seed),
        opts: opts.clone(),
        dead_nodes: BTreeSet::new(),
        deleted_wedges: BTreeSet::new(),
        open_devices: BTreeSet::new(),
        reboots_served: BTreeMap::new(),
        tally: Tally::default(),
    };
    for s in 0..opts.storms {
        soak.storm(s).await.with_context(|| format!("storm {s}"))?;
    }
    let announced = approvals_announced(&soak.client, &soak.sc).await;
    let failures = soak.report(&mut rep, t_run.elapsed(), &announced);
    let Soak { sc, tracker, .. } = soak;
    drop(tracker);
    drop(sc);
    cp.stop().await;
    if !failures.is_empty() {
        rep.save()?;
        anyhow::bail!("chaos: {}", failures.join("; "));
    }
    Ok(rep)
}

async fn create_other_policy(client: &Client, budget: usize) -> anyhow::Result<()> {
    let p: RecoveryPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "unwedge.io/v1alpha1", "kind": "RecoveryPolicy",
        "metadata": {"name": OTHER_POLICY},
        "spec": {"nodeSelector": {SCENARIO_LABEL: OTHER_POLICY}, "maxUnavailable": budget, "verifyTimeout": "60s"}
    }))?;
    Api::<RecoveryPolicy>::all(client.clone())
        .create(&PostParams::default(), &p)
        .await
        .with_context(|| format!("create RecoveryPolicy {OTHER_POLICY}"))?;
    Ok(())
}

impl Soak<'_> {
    fn live_nodes(&self) -> Vec<String> {
        self.sc
            .fleet
            .nodes
            .keys()
            .filter(|n| !self.dead_nodes.contains(*n))
            .cloned()
            .collect()
    }

    /// The devices a storm may wedge: on live nodes, with no unresolved wedge.
    fn free_devices(&self) -> Vec<(String, String)> {
        let mut out = vec![];
        for name in self.live_nodes() {
            for g in self.sc.fleet.sim(&name).sysfs.gpus() {
                let d = (name.clone(), g.bdf.clone());
                if !self.open_devices.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// One storm: inject, run the chaos plan, wait for every wedge to resolve, count.
    async fn storm(&mut self, s: usize) -> anyhow::Result<()> {
        self.wait_pool_ready().await?;
        let mut devices = self.free_devices();
        self.rng.shuffle(&mut devices);
        devices.truncate(self.opts.wedges);
        let t0 = Instant::now();
        let injections = self.inject(&devices).await?;
        self.tally.storms += 1;
        self.tally.wedges += injections.len();
        let deadline = t0 + self.opts.storm_timeout;
        for action in self.plan(s) {
            super::sleep(self.rng.millis(200, 2500)).await;
            if Instant::now() > deadline {
                break;
            }
            self.serve_reboots(&injections, t0).await?;
            tokio::time::timeout(ACTION_TIMEOUT, self.act(action, &injections, t0))
                .await
                .with_context(|| format!("{action:?} took more than {ACTION_TIMEOUT:?}"))?
                .with_context(|| format!("chaos action {action:?}"))?;
        }
        self.wait_resolved(&injections, t0, deadline).await?;
        let (cut, lost): (Vec<Injection>, Vec<Injection>) = injections
            .iter()
            .filter(|i| !self.dead_nodes.contains(&i.node))
            .filter(|i| !self.ended_or_deleted(i, t0))
            .cloned()
            .partition(|i| self.needs_attention_after_cut_attempts(i));
        for i in &cut {
            self.tally
                .cut
                .push(format!("storm {s}: {}/{}", i.node, i.device));
            self.open_devices.insert((i.node.clone(), i.device.clone()));
        }
        for i in &lost {
            let seen = self.wedge_of(i, t0);
            self.tally.lost.push(format!(
                "storm {s}: {}/{} {}",
                i.node,
                i.device,
                seen.map(|w| format!("last seen {:?}", w.phase))
                    .unwrap_or_else(|| "never seen as a GpuWedge".into())
            ));
            self.open_devices.insert((i.node.clone(), i.device.clone()));
        }
        self.settle(s).await?;
        println!(
            "chaos: storm {s}: {} wedges, {} lost, kills so far operator {} agent {} kube-apiserver {}, deletions {}",
            injections.len(),
            lost.len(),
            self.tally.kills_operator,
            self.tally.kills_agent,
            self.tally.kills_apiserver,
            self.tally.deletions
        );
        Ok(())
    }

    /// The storm's actions in random order: enough kills of each kind to reach the minimum
    /// over the run, a few wedge deletions, a relabel, and a node deletion when devices spare.
    fn plan(&mut self, s: usize) -> Vec<Chaos> {
        let per_storm = self.opts.min_kills.div_ceil(self.opts.storms.max(1));
        let mut plan = vec![];
        for _ in 0..per_storm {
            plan.extend([
                Chaos::KillOperatorLeader,
                Chaos::KillAgentPool,
                Chaos::KillApiserver,
            ]);
        }
        plan.extend([Chaos::DeleteWedge, Chaos::DeleteWedge, Chaos::Relabel]);
        let spare = self.free_devices().len() as i64 - self.opts.wedges as i64;
        if s % 2 == 1 && spare >= i64::from(self.opts.gpus) {
            plan.push(Chaos::DeleteNode);
        }
        self.rng.shuffle(&mut plan);
        plan
    }

    /// Sends one wedge uevent per device, each in its node's network namespace (the kernel
    /// adds the SEQNUM that names the wedge).
    async fn inject(&mut self, devices: &[(String, String)]) -> anyhow::Result<Vec<Injection>> {
        let mut jobs = vec![];
        let mut out = vec![];
        for (node, bdf) in devices {
            let sim = self.sc.fleet.sim(node);
            let g = sim.sysfs.gpu(bdf).context("a device of the fleet")?;
            jobs.push((
                sim.netns.path(),
                crate::inject::wedge_payload(
                    &g.card_devpath(),
                    &g.card_name(),
                    &["rebind", "bus-reset"],
                    &[],
                ),
            ));
            let full = unwedge_agent::reporter::wedge_name(node, bdf, 0);
            out.push(Injection {
                node: node.clone(),
                device: bdf.clone(),
                name_prefix: full[..full.len() - 1].to_string(),
            });
        }
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for (ns, payload) in &jobs {
                super::enter_netns(ns)?;
                crate::inject::send_to_kernel(payload)?;
            }
            Ok(())
        })
        .await??;
        Ok(out)
    }

    async fn act(
        &mut self,
        action: Chaos,
        injections: &[Injection],
        t0: Instant,
    ) -> anyhow::Result<()> {
        match action {
            Chaos::KillOperatorLeader => self.kill_operator_leader().await,
            Chaos::KillAgentPool => self.kill_agent_pool(injections, t0).await,
            Chaos::KillApiserver => self.kill_apiserver().await,
            Chaos::DeleteWedge => self.delete_wedge(t0).await,
            Chaos::DeleteNode => self.delete_node(injections, t0).await,
            Chaos::Relabel => self.relabel().await,
        }
    }

    /// SIGKILL to the replica holding the Lease; it is started again (same identity) after
    /// a random pause, as a kubelet restarts a crashed container.
    async fn kill_operator_leader(&mut self) -> anyhow::Result<()> {
        let leader = self.sc.fleet.leader().await;
        let i = leader
            .as_deref()
            .and_then(|l| l.strip_prefix("operator-"))
            .and_then(|i| i.parse::<usize>().ok())
            .unwrap_or_else(|| self.rng.below(2));
        self.sc.fleet.kill_operator(i);
        self.tally.kills_operator += 1;
        super::sleep(self.rng.millis(0, 3000)).await;
        self.sc.fleet.restart_operator(i)
    }

    /// SIGKILL to the agent pool once every uevent injected so far is committed, then a
    /// restart of the pool for the live nodes.
    async fn kill_agent_pool(
        &mut self,
        injections: &[Injection],
        t0: Instant,
    ) -> anyhow::Result<()> {
        self.wait_committed(injections, t0).await?;
        self.sc.fleet.kill_agent_pool();
        self.tally.kills_agent += 1;
        super::sleep(self.rng.millis(0, 3000)).await;
        self.sc.fleet.start_agent_pool(&self.live_nodes())?;
        self.wait_pool_ready().await
    }

    /// SIGKILL to kube-apiserver, which is started again after a random pause.
    async fn kill_apiserver(&mut self) -> anyhow::Result<()> {
        self.cp.kill_apiserver();
        self.tally.kills_apiserver += 1;
        super::sleep(self.rng.millis(0, 2000)).await;
        self.cp.start_apiserver().await
    }

    /// Deletes a random unfinished wedge of this storm.
    async fn delete_wedge(&mut self, t0: Instant) -> anyhow::Result<()> {
        let open: Vec<String> = self
            .tracker
            .wedges_since(t0)
            .into_iter()
            .filter(|(n, w)| {
                !w.ended && !self.dead_nodes.contains(&w.node) && !self.deleted_wedges.contains(n)
            })
            .map(|(n, _)| n)
            .collect();
        let Some(name) = self.rng.pick(&open).cloned() else {
            return Ok(());
        };
        let r = Api::<GpuWedge>::all(self.client.clone())
            .delete(&name, &DeleteParams::default())
            .await;
        match r {
            Ok(_) => {
                self.deleted_wedges.insert(name);
                self.tally.deletions += 1;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("delete GpuWedge {name}")),
        }
    }

    /// Deletes a random live Node, preferring one with an unfinished wedge of this storm.
    async fn delete_node(&mut self, injections: &[Injection], t0: Instant) -> anyhow::Result<()> {
        let busy: Vec<String> = injections
            .iter()
            .filter(|i| !self.dead_nodes.contains(&i.node))
            .filter(|i| self.wedge_of(i, t0).is_some_and(|w| !w.ended))
            .map(|i| i.node.clone())
            .collect();
        let live = self.live_nodes();
        let pool = if busy.is_empty() { &live } else { &busy };
        let Some(name) = self.rng.pick(pool).cloned() else {
            return Ok(());
        };
        Api::<Node>::all(self.client.clone())
            .delete(&name, &DeleteParams::default())
            .await
            .with_context(|| format!("delete Node {name}"))?;
        self.dead_nodes.insert(name);
        self.tally.deletions += 1;
        Ok(())
    }

    /// Moves a random live node into the other policy, or back.
    async fn relabel(&mut self) -> anyhow::Result<()> {
        let live = self.live_nodes();
        let Some(name) = self.rng.pick(&live).cloned() else {
            return Ok(());
        };
        let nodes = Api::<Node>::all(self.client.clone());
        let n = nodes.get(&name).await?;
        let to = if n.labels().get(SCENARIO_LABEL).map(String::as_str) == Some(OTHER_POLICY) {
            self.sc.name.clone()
        } else {
            OTHER_POLICY.to_string()
        };
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {SCENARIO_LABEL: to}}})),
            )
            .await
            .with_context(|| format!("relabel Node {name}"))?;
        self.tally.relabels += 1;
        Ok(())
    }

    /// Waits until the pool runs and every live node's agent answers `/readyz`.
    async fn wait_pool_ready(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.sc.fleet.pool_pid().is_some(),
            "the agent pool is not running; its log:\n{}",
            crate::fleet::tail(&self.sc.fleet.pool_log(), 40)
        );
        for name in self.live_nodes() {
            self.sc
                .fleet
                .node(&name)
                .wait_agent_ready(READY_TIMEOUT)
                .await?;
        }
        Ok(())
    }

    /// The wedge of an injection in this storm, as the tracker saw it.
    fn wedge_of(&self, i: &Injection, t0: Instant) -> Option<WedgeTrack> {
        self.tracker
            .wedges_since(t0)
            .into_values()
            .find(|w| w.node == i.node && w.device == i.device)
    }

    /// Whether the uevent reached the agent's outbox on disk or the API already.
    fn committed(&self, i: &Injection, t0: Instant) -> bool {
        if self.dead_nodes.contains(&i.node) || self.wedge_of(i, t0).is_some() {
            return true;
        }
        let dir = self.sc.fleet.sim(&i.node).state_dir().join("outbox");
        std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                let f = e.file_name().to_string_lossy().into_owned();
                f.starts_with(&i.name_prefix) && f.ends_with(".json")
            })
        })
    }

    /// Waits (bounded) until every injection of the storm is committed: only then is killing
    /// the agents fair.
    async fn wait_committed(&self, injections: &[Injection], t0: Instant) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pending: Vec<&Injection> = injections
                .iter()
                .filter(|i| !self.committed(i, t0))
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} uevents not committed by the agents after 30 s, e.g. {}/{}",
                    pending.len(),
                    pending[0].node,
                    pending[0].device
                );
            }
            super::sleep(Duration::from_millis(50)).await;
        }
    }

    fn resolved(&self, i: &Injection, t0: Instant) -> bool {
        // NeedsAttention after cut attempts is where that wedge stays: the storm need not wait
        // out its time bound for it (counted apart when the storm ends).
        if self.dead_nodes.contains(&i.node) || self.needs_attention_after_cut_attempts(i) {
            return true;
        }
        self.ended_or_deleted(i, t0)
    }

    /// Whether the injection's wedge was seen terminal, or was deleted by the chaos.
    fn ended_or_deleted(&self, i: &Injection, t0: Instant) -> bool {
        self.tracker
            .wedges_since(t0)
            .iter()
            .filter(|(_, w)| w.node == i.node && w.device == i.device)
            .any(|(n, w)| w.ended || self.deleted_wedges.contains(n))
    }

    /// Whether the injection's wedge, as the recorder sees it now, is in NeedsAttention after
    /// attempts every one of which the agent's restart cut (see the module documentation).
    fn needs_attention_after_cut_attempts(&self, i: &Injection) -> bool {
        let approvals = self.sc.rec.approvals();
        self.sc
            .rec
            .wedges_of(&i.node)
            .iter()
            .filter(|w| w.spec.device.pci_address == i.device)
            .any(|w| {
                let Some(st) = w.status.as_ref() else {
                    return false;
                };
                let attempts = st.attempts.clone().unwrap_or_default();
                let uid = w.metadata.uid.clone().unwrap_or_default();
                let approved: Vec<u32> = approvals
                    .iter()
                    .filter(|a| a.uid == uid)
                    .map(|a| a.attempt)
                    .collect();
                st.phase == Some(unwedge_crds::Phase::NeedsAttention)
                    && !approved.is_empty()
                    && attempts.iter().all(|a| a.message == CUT_BY_RESTART)
                    && approved.iter().all(|n| {
                        attempts
                            .iter()
                            .any(|a| a.attempt == *n && a.message == CUT_BY_RESTART)
                    })
            })
    }

    fn unresolved(&self, injections: &[Injection], t0: Instant) -> Vec<Injection> {
        injections
            .iter()
            .filter(|i| !self.resolved(i, t0))
            .cloned()
            .collect()
    }

    /// Waits until every wedge of the storm resolved or the deadline, serving reboots.
    async fn wait_resolved(
        &mut self,
        injections: &[Injection],
        t0: Instant,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        while Instant::now() < deadline && !self.unresolved(injections, t0).is_empty() {
            self.serve_reboots(injections, t0).await?;
            super::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// Reboots the hosts whose agent asked for it (the harness's reboot command only records
    /// the request): a new boot id for each and its devices enumerated and bound again, as a
    /// boot does (a device left unbound by a cut attempt would otherwise stay unbound and the
    /// reboot fail), then the pool restarts, as those hosts come back (the other pooled agents
    /// restart with them; these restarts are not counted as kills).
    async fn serve_reboots(&mut self, injections: &[Injection], t0: Instant) -> anyhow::Result<()> {
        let due: Vec<(String, usize)> = self
            .live_nodes()
            .into_iter()
            .map(|n| {
                let asked = self.sc.fleet.sim(&n).reboot_requests();
                (n, asked)
            })
            .filter(|(n, asked)| *asked > *self.reboots_served.get(n).unwrap_or(&0))
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        self.wait_committed(injections, t0).await?;
        self.sc.fleet.kill_agent_pool();
        for (name, asked) in due {
            self.sc.fleet.sim(&name).sysfs.power_cycle()?;
            self.sc.fleet.node(&name).write_boot_id()?;
            self.reboots_served.insert(name, asked);
            self.tally.reboots += 1;
        }
        self.sc.fleet.start_agent_pool(&self.live_nodes())?;
        self.wait_pool_ready().await
    }

    /// Polls the stranded cordons and ledger places until none is left or the settle window
    /// passed; counts what remains.
    async fn settle(&mut self, s: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.opts.settle;
        loop {
            let (cordons, places) = stranded(&self.client, &self.sc.name).await?;
            if (cordons.is_empty() && places.is_empty()) || Instant::now() > deadline {
                let tag = |v: Vec<String>| v.into_iter().map(move |x| format!("storm {s}: {x}"));
                self.tally.stranded_cordons.extend(tag(cordons));
                self.tally.stranded_places.extend(tag(places));
                return Ok(());
            }
            super::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Writes the figures; returns what fails the run.
    fn report(&self, rep: &mut Report, took: Duration, announced: &[SeenApproval]) -> Vec<String> {
        let t = &self.tally;
        let (doubles, double_detail) = double_actions(&self.sc, announced);
        let overruns: usize = [self.sc.name.as_str(), OTHER_POLICY]
            .iter()
            .map(|p| self.sc.rec.peak(p).saturating_sub(self.opts.budget))
            .sum();
        let peaks = format!(
            "peaks: {} {}, {OTHER_POLICY} {} (budget {} each)",
            self.sc.name,
            self.sc.rec.peak(&self.sc.name),
            self.sc.rec.peak(OTHER_POLICY),
            self.opts.budget
        );
        let n = |v: usize| v as f64;
        rep.fig("storms", n(t.storms), "storms", "");
        rep.fig(
            "wedges",
            n(t.wedges),
            "uevents",
            "injected, one per device per storm",
        );
        let kills = format!("minimum {}", self.opts.min_kills);
        rep.fig(
            "kills: operator",
            n(t.kills_operator),
            "SIGKILLs",
            &format!("the Lease holder; {kills}"),
        );
        rep.fig(
            "kills: agent",
            n(t.kills_agent),
            "SIGKILLs",
            &format!("the agent-pool process, once every injected uevent was committed; {kills}"),
        );
        rep.fig(
            "kills: kube-apiserver",
            n(t.kills_apiserver),
            "SIGKILLs",
            &kills,
        );
        rep.fig(
            "deletions",
            n(t.deletions),
            "objects",
            "GpuWedges and Nodes deleted mid-storm",
        );
        rep.fig(
            "relabels",
            n(t.relabels),
            "nodes",
            &format!("moved between policies chaos and {OTHER_POLICY}"),
        );
        rep.fig(
            "host reboots",
            n(t.reboots),
            "reboots",
            "requested by agents after failed attempts, simulated by the bench",
        );
        rep.fig("lost wedges", n(t.lost.len()), "wedges", &first(&t.lost));
        rep.fig(
            "needs attention after cut attempts",
            n(t.cut.len()),
            "wedges",
            &first(&t.cut),
        );
        rep.fig(
            "double actions",
            n(doubles),
            "writes",
            &first(&double_detail),
        );
        rep.fig("budget overruns", n(overruns), "nodes", &peaks);
        rep.fig(
            "stranded cordons",
            n(t.stranded_cordons.len()),
            "nodes",
            &first(&t.stranded_cordons),
        );
        rep.fig(
            "stranded ledger places",
            n(t.stranded_places.len()),
            "entries",
            &first(&t.stranded_places),
        );
        rep.fig(
            "duration",
            took.as_secs_f64(),
            "s",
            "control plane start to the last storm settled",
        );
        let timeline = super::out_dir().join(format!(
            "chaos{}-timeline.txt",
            if self.opts.short { "-short" } else { "" }
        ));
        match std::fs::create_dir_all(super::out_dir())
            .and_then(|()| std::fs::write(&timeline, self.sc.rec.timeline().join("\n")))
        {
            Ok(()) => rep.note(format!("recorder timeline: {}", timeline.display())),
            Err(e) => rep.note(format!("cannot write {}: {e}", timeline.display())),
        }
        if let Err(e) = self.sc.rec.check_invariants() {
            rep.note(format!(
                "recorder invariants violated: {}",
                e.lines().take(5).collect::<Vec<_>>().join(" | ")
            ));
        }
        let mut failures = vec![];
        for (name, v) in [
            ("lost wedges", t.lost.len()),
            ("double actions", doubles),
            ("budget overruns", overruns),
            ("stranded cordons", t.stranded_cordons.len()),
            ("stranded ledger places", t.stranded_places.len()),
        ] {
            if v > 0 {
                failures.push(format!("{name} {v}"));
            }
        }
        for (name, v) in [
            ("operator", t.kills_operator),
            ("agent", t.kills_agent),
            ("kube-apiserver", t.kills_apiserver),
        ] {
            if v < self.opts.min_kills {
                failures.push(format!("kills: {name} {v} < {}", self.opts.min_kills));
            }
        }
        failures
    }
}

/// The first few items of a list of findings, for a figure's note.
fn first(v: &[String]) -> String {
    let mut s = v.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    if v.len() > 5 {
        s.push_str(&format!("; … {} more", v.len() - 5));
    }
    s
}

/// Whether the wedge `name` is terminal or gone (so nothing may still be held for it).
async fn finished(wedges: &Api<GpuWedge>, name: &str) -> anyhow::Result<bool> {
    Ok(wedges.get_opt(name).await?.is_none_or(|w| {
        w.status
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_terminal())
    }))
}

/// Cordons and ledger places held for wedges that are terminal or gone.
async fn stranded(client: &Client, policy: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let wedges = Api::<GpuWedge>::all(client.clone());
    let mut cordons = vec![];
    for n in Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await?
    {
        let unschedulable = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
        if let Some(w) = n.annotations().get(ANN_CORDONED_BY)
            && unschedulable
            && finished(&wedges, w).await?
        {
            cordons.push(format!("node {} cordoned for {w}", n.name_any()));
        }
    }
    let mut places = vec![];
    let policies = Api::<RecoveryPolicy>::all(client.clone());
    for p in [policy, OTHER_POLICY] {
        let admitted = policies
            .get(p)
            .await?
            .status
            .map(|s| s.admitted)
            .unwrap_or_default();
        for a in admitted {
            if finished(&wedges, &a.wedge).await? {
                places.push(format!("policy {p} holds a place for {}", a.wedge));
            }
        }
    }
    Ok((cordons, places))
}

/// Per device, the sysfs writes beyond the approved attempts that could cause them; the sum,
/// and one line per device with any.
/// The approvals the operator announced in its `Approved` Events (events.k8s.io, written after
/// the approval itself): an approval given, carried out and its wedge deleted while the
/// recorder's wedge watch was cut (kube-apiserver restarting) is never seen on that watch, and
/// its writes would read as a double action (seen once in a `--short` run: 3 rebinds of one
/// device for 3 approvals, one of them given and its wedge deleted within 0.4 s of a cut). The
/// wedge's node and device are those the recorder saw for its uid; an Event of a wedge the
/// recorder never saw at all is not used.
async fn approvals_announced(client: &Client, sc: &Scenario) -> Vec<SeenApproval> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let Ok(list) = events.list(&kube::api::ListParams::default()).await else {
        return vec![];
    };
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Approved"))
        .filter_map(|e| {
            let r = e.regarding?;
            if r.kind.as_deref() != Some("GpuWedge") {
                return None;
            }
            let uid = r.uid?;
            let (wedge, node, device) = sc.rec.identity(&uid)?;
            let (method, attempt, by) = parse_approved(e.note.as_deref()?)?;
            Some(SeenApproval {
                wedge,
                uid,
                node,
                device,
                attempt,
                method,
                by,
            })
        })
        .collect()
}

/// Method, attempt and approver of the operator's `Approved` note: "approved rebind#2 (by x)".
fn parse_approved(note: &str) -> Option<(String, u32, String)> {
    let rest = note.strip_prefix("approved ")?;
    let (tag, by) = rest.split_once(" (by ")?;
    let (method, n) = tag.split_once('#')?;
    Some((
        method.to_string(),
        n.parse().ok()?,
        by.strip_suffix(')')?.to_string(),
    ))
}

fn double_actions(sc: &Scenario, announced: &[SeenApproval]) -> (usize, Vec<String>) {
    let mut approvals = sc.rec.approvals();
    approvals.extend(announced.iter().cloned());
    let mut total = 0;
    let mut detail = vec![];
    for (name, node) in &sc.fleet.nodes {
        for g in node.sysfs.gpus() {
            let mine: BTreeSet<(&str, u32, &str)> = approvals
                .iter()
                .filter(|a| &a.node == name && a.device == g.bdf)
                .map(|a| (a.uid.as_str(), a.attempt, a.method.as_str()))
                .collect();
            let bus = mine.iter().filter(|a| a.2 == "bus-reset").count();
            let any = bus + mine.iter().filter(|a| a.2 == "rebind").count();
            let count = |op: &str| node.sysfs.count(op, &g.bdf);
            let excess = [
                count("unbind").saturating_sub(any),
                count("bind").saturating_sub(any),
                (count("reset") + count("remove")).saturating_sub(bus),
            ]
            .into_iter()
            .max()
            .unwrap_or(0);
            if excess > 0 {
                total += excess;
                detail.push(format!(
                    "{name}/{}: {} unbind, {} bind, {} reset, {} remove for {any} approved attempts ({bus} bus-reset)",
                    g.bdf,
                    count("unbind"),
                    count("bind"),
                    count("reset"),
                    count("remove")
                ));
            }
        }
    }
    (total, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_approved_note_is_read_back() {
        assert_eq!(
            parse_approved("approved bus-reset#2 (by operator-1)"),
            Some(("bus-reset".into(), 2, "operator-1".into()))
        );
        assert_eq!(parse_approved("approve rebind#1 (by x)"), None);
        assert_eq!(parse_approved("approved rebind (by x)"), None);
    }

    #[test]
    fn the_rng_is_reproducible_and_stays_in_range() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let xs: Vec<usize> = (0..100).map(|_| a.below(5)).collect();
        let ys: Vec<usize> = (0..100).map(|_| b.below(5)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 5));
        assert!((0..5).all(|v| xs.contains(&v)), "every value drawn: {xs:?}");
        let d = a.millis(200, 300);
        assert!(d >= Duration::from_millis(200) && d < Duration::from_millis(300));
    }

    #[test]
    fn a_shuffle_keeps_every_item() {
        let mut v: Vec<u32> = (0..20).collect();
        Rng(3).shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..20).collect::<Vec<_>>());
        assert_ne!(v, s, "seed 3 moves something");
    }
}
