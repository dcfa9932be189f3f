//! Watches every change of every GpuWedge and every Node from the start of a scenario (a kube
//! watcher, not sampling), keeps a timeline, and checks invariants as the changes arrive:
//!
//! 1. nodes under recovery per policy (cordoned by unwedge, or with an admitted, non-terminal
//!    node-level wedge) never exceed the budget the scenario configured; the peak is recorded;
//! 3. unwedge never uncordons a node it did not cordon (an uncordon of a node that carried no
//!    `unwedge.io/cordoned-by` annotation just before is a violation).
//!
//! A watch that is cut (kube-apiserver restarted) relists; objects the relist no longer names
//! were deleted meanwhile and are dropped then (no Delete event comes for them). Invariant 1
//! is judged only while both watches are live (not between a watch error and the end of its
//! relist), and again as soon as both are.
//!
//! It also remembers every approval ever written, so invariant 2 can be checked against the
//! fake sysfs journal (see [`Recorder::check_journal`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use unwedge_crds::gpuwedge::{GpuWedge, Phase};
use unwedge_crds::labels::ANN_CORDONED_BY;

use crate::fakesysfs::FakeSysfs;

/// One approval as it was first seen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeenApproval {
    /// The GpuWedge.
    pub wedge: String,
    /// Its uid: a wedge deleted and created again under the same name (the agent replaying a
    /// detection whose object a person deleted) is another incident, with attempts of its own.
    pub uid: String,
    /// Its node.
    pub node: String,
    /// Its device (PCI address).
    pub device: String,
    /// Attempt id.
    pub attempt: u32,
    /// Method.
    pub method: String,
    /// Approver.
    pub by: String,
}

#[derive(Clone, Debug, Default)]
struct NodeView {
    unschedulable: bool,
    cordoned_by: Option<String>,
}

#[derive(Default)]
struct State {
    budgets: BTreeMap<String, usize>,
    wedges: BTreeMap<String, GpuWedge>,
    nodes: BTreeMap<String, NodeView>,
    peak: BTreeMap<String, usize>,
    peak_nodes: BTreeMap<String, BTreeSet<String>>,
    violations: Vec<String>,
    timeline: Vec<(Duration, String)>,
    approvals: BTreeSet<SeenApproval>,
    ready: u8,
    /// Names listed by the (re)list in progress, per watch: what a relist does not name was
    /// deleted while the watch was down (kube-apiserver restarted), with no Delete event.
    relisted_wedges: BTreeSet<String>,
    relisted_nodes: BTreeSet<String>,
    /// Whether each watch delivers a consistent, current view: false from a watch error or the
    /// start of a relist until its relist is done (or its watch delivers again).
    wedges_live: bool,
    nodes_live: bool,
}

fn phase_of(w: &GpuWedge) -> Phase {
    w.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// Whether this wedge holds a node-level place in its policy's budget.
fn holds_node(w: &GpuWedge) -> bool {
    let Some(st) = w.status.as_ref() else {
        return false;
    };
    let p = phase_of(w);
    st.admitted_at.is_some()
        && !p.is_terminal()
        && !matches!(
            p,
            Phase::Restarting | Phase::Quarantined | Phase::Detected | Phase::Queued
        )
}

impl State {
    /// Nodes under recovery, per policy.
    fn under_recovery(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let policy_of = |wedge: &str| {
            self.wedges
                .get(wedge)
                .and_then(|w| w.status.as_ref())
                .and_then(|s| s.policy.clone())
                .unwrap_or_else(|| "<unknown policy>".into())
        };
        for (node, v) in &self.nodes {
            if let Some(w) = &v.cordoned_by {
                m.entry(policy_of(w)).or_default().insert(node.clone());
            }
        }
        for (name, w) in &self.wedges {
            if holds_node(w) {
                m.entry(policy_of(name))
                    .or_default()
                    .insert(w.spec.node_name.clone());
            }
        }
        m
    }

    fn check_budget(&mut self, t: Duration, cause: &str) {
        // One watch cut (kube-apiserver restarted) while the other delivers would compare
        // current nodes with stale wedges (or the reverse): judged again once both are live.
        if !(self.wedges_live && self.nodes_live) {
            return;
        }
        for (policy, nodes) in self.under_recovery() {
            let n = nodes.len();
            if n > *self.peak.get(&policy).unwrap_or(&0) {
                self.peak.insert(policy.clone(), n);
                self.peak_nodes.insert(policy.clone(), nodes.clone());
            }
            if let Some(&max) = self.budgets.get(&policy)
                && n > max
            {
                self.violations.push(format!(
                    "invariant 1 at +{:.1}s after {cause}: policy {policy} has {n} nodes under recovery, budget {max}: {nodes:?}",
                    t.as_secs_f64()
                ));
            }
        }
    }

    fn on_wedge(&mut self, t: Duration, w: GpuWedge) {
        let name = w.metadata.name.clone().unwrap_or_default();
        let old = self.wedges.get(&name);
        let old_phase = old.map(phase_of);
        let new_phase = phase_of(&w);
        let st = w.status.clone().unwrap_or_default();
        let ost = old.and_then(|o| o.status.clone()).unwrap_or_default();
        if old.is_none() {
            self.timeline.push((
                t,
                format!(
                    "wedge {name} created: node {} device {} methods {}",
                    w.spec.node_name,
                    w.spec.device.pci_address,
                    w.spec.methods.join(",")
                ),
            ));
        }
        if old_phase != Some(new_phase) && st.phase.is_some() {
            self.timeline.push((
                t,
                format!(
                    "wedge {name}: {} -> {:?}{}",
                    old_phase
                        .map(|p| format!("{p:?}"))
                        .unwrap_or_else(|| "-".into()),
                    new_phase,
                    st.action
                        .as_ref()
                        .map(|a| format!(" ({a})"))
                        .unwrap_or_default()
                ),
            ));
        }
        if st.approval != ost.approval
            && let Some(a) = &st.approval
        {
            self.timeline.push((
                t,
                format!(
                    "wedge {name}: approved {} attempt {} by {}",
                    a.method, a.attempt, a.by
                ),
            ));
            self.approvals.insert(SeenApproval {
                wedge: name.clone(),
                uid: w.metadata.uid.clone().unwrap_or_default(),
                node: w.spec.node_name.clone(),
                device: w.spec.device.pci_address.clone(),
                attempt: a.attempt,
                method: a.method.clone(),
                by: a.by.clone(),
            });
        }
        let old_attempts = ost.attempts.unwrap_or_default();
        for a in st.attempts.clone().unwrap_or_default() {
            if !old_attempts
                .iter()
                .any(|o| o.attempt == a.attempt && o.result == a.result)
            {
                self.timeline.push((
                    t,
                    format!(
                        "wedge {name}: agent attempt {} {} {:?}{}",
                        a.attempt,
                        a.method,
                        a.result,
                        if a.message.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", a.message)
                        }
                    ),
                ));
            }
        }
        let old_ev = ost.evictions.unwrap_or_default();
        for e in st.evictions.clone().unwrap_or_default() {
            if !old_ev
                .iter()
                .any(|o| o.namespace == e.namespace && o.pod == e.pod)
            {
                self.timeline.push((
                    t,
                    format!(
                        "wedge {name}: evicted {}/{} ({})",
                        e.namespace, e.pod, e.result
                    ),
                ));
            }
        }
        self.wedges.insert(name.clone(), w);
        self.check_budget(t, &format!("wedge {name} changed"));
    }

    /// After a relist: forgets the wedges it did not name (deleted while the watch was down).
    fn drop_unlisted_wedges(&mut self, t: Duration) {
        let gone: Vec<String> = self
            .wedges
            .keys()
            .filter(|n| !self.relisted_wedges.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.timeline
                .push((t, format!("wedge {name} deleted (seen by a relist)")));
            self.wedges.remove(&name);
        }
    }

    /// After a relist: forgets the nodes it did not name (deleted while the watch was down).
    fn drop_unlisted_nodes(&mut self, t: Duration) {
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !self.relisted_nodes.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.timeline
                .push((t, format!("node {name} deleted (seen by a relist)")));
            self.nodes.remove(&name);
        }
    }

    fn on_node(&mut self, t: Duration, n: Node) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let v = NodeView {
            unschedulable: n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            cordoned_by: n
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_CORDONED_BY).cloned()),
        };
        let old = self.nodes.get(&name).cloned().unwrap_or_default();
        if old.unschedulable != v.unschedulable {
            self.timeline.push((
                t,
                format!(
                    "node {name}: {}{}",
                    if v.unschedulable {
                        "cordoned"
                    } else {
                        "uncordoned"
                    },
                    v.cordoned_by
                        .as_ref()
                        .or(old.cordoned_by.as_ref())
                        .map(|w| format!(" (for {w})"))
                        .unwrap_or_default()
                ),
            ));
            if old.unschedulable && !v.unschedulable && old.cordoned_by.is_none() && self.ready >= 2
            {
                self.violations.push(format!(
                    "invariant 3 at +{:.1}s: node {name} was uncordoned but unwedge had not cordoned it (no {ANN_CORDONED_BY} annotation before)",
                    t.as_secs_f64()
                ));
            }
        }
        self.nodes.insert(name.clone(), v);
        self.check_budget(t, &format!("node {name} changed"));
    }
}

/// The scenario recorder (see the module documentation).
pub struct Recorder {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    started: Instant,
    tasks: Vec<JoinHandle<()>>,
}

impl Recorder {
    /// Starts watching; returns once both watches delivered their initial lists.
    /// `budgets`: policy name → maxUnavailable in nodes, as the scenario configured it.
    pub async fn start(client: Client, budgets: &[(&str, usize)]) -> anyhow::Result<Recorder> {
        let state = Arc::new(Mutex::new(State {
            budgets: budgets.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            ..State::default()
        }));
        let changed = Arc::new(Notify::new());
        let started = Instant::now();
        let wedges: Api<GpuWedge> = Api::all(client.clone());
        let nodes: Api<Node> = Api::all(client);
        let (s1, c1) = (state.clone(), changed.clone());
        let t1 = tokio::spawn(async move {
            let mut stream = watcher(wedges, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                let t = started.elapsed();
                let mut s = s1.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(w)) => {
                        s.wedges_live = true;
                        s.on_wedge(t, w)
                    }
                    Ok(watcher::Event::InitApply(w)) => {
                        s.relisted_wedges
                            .insert(w.metadata.name.clone().unwrap_or_default());
                        s.on_wedge(t, w)
                    }
                    Ok(watcher::Event::Delete(w)) => {
                        let name = w.metadata.name.clone().unwrap_or_default();
                        s.timeline.push((t, format!("wedge {name} deleted")));
                        s.wedges.remove(&name);
                        s.wedges_live = true;
                        s.check_budget(t, &format!("wedge {name} deleted"));
                    }
                    Ok(watcher::Event::InitDone) => {
                        s.ready += 1;
                        s.drop_unlisted_wedges(t);
                        s.wedges_live = true;
                        s.check_budget(t, "the wedge watch listed");
                    }
                    Ok(watcher::Event::Init) => {
                        s.relisted_wedges.clear();
                        s.wedges_live = false;
                    }
                    Err(e) => {
                        s.wedges_live = false;
                        s.timeline
                            .push((t, format!("(recorder: wedge watch error: {e})")))
                    }
                }
                drop(s);
                c1.notify_waiters();
            }
        });
        let (s2, c2) = (state.clone(), changed.clone());
        let t2 = tokio::spawn(async move {
            let mut stream = watcher(nodes, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                let t = started.elapsed();
                let mut s = s2.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Ok(watcher::Event::Apply(n)) => {
                        s.nodes_live = true;
                        s.on_node(t, n)
                    }
                    Ok(watcher::Event::InitApply(n)) => {
                        s.relisted_nodes
                            .insert(n.metadata.name.clone().unwrap_or_default());
                        s.on_node(t, n)
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        let name = n.metadata.name.clone().unwrap_or_default();
                        s.nodes.remove(&name);
                        s.nodes_live = true;
                        s.check_budget(t, &format!("node {name} deleted"));
                    }
                    Ok(watcher::Event::InitDone) => {
                        s.ready += 1;
                        s.drop_unlisted_nodes(t);
                        s.nodes_live = true;
                        s.check_budget(t, "the node watch listed");
                    }
                    Ok(watcher::Event::Init) => {
                        s.relisted_nodes.clear();
                        s.nodes_live = false;
                    }
                    Err(e) => {
                        s.nodes_live = false;
                        s.timeline
                            .push((t, format!("(recorder: node watch error: {e})")))
                    }
                }
                drop(s);
                c2.notify_waiters();
            }
        });
        let r = Recorder {
            state,
            changed,
            started,
            tasks: vec![t1, t2],
        };
        r.wait_until(
            "the recorder's initial lists",
            Duration::from_secs(30),
            |s| s.ready >= 2,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        Ok(r)
    }

    /// Checks invariant 1 for one more policy (created after the recorder started) from now on.
    pub fn add_budget(&self, policy: &str, max_unavailable: usize) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .budgets
            .insert(policy.to_string(), max_unavailable);
    }

    async fn wait_until<F: Fn(&State) -> bool>(
        &self,
        what: &str,
        timeout: Duration,
        f: F,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if f(&self.state.lock().unwrap_or_else(|e| e.into_inner())) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if f(&self.state.lock().unwrap_or_else(|e| e.into_inner())) {
                    return Ok(());
                }
                return Err(format!("timed out after {timeout:?} waiting for {what}"));
            }
        }
    }

    /// Waits until `pred` holds for the current set of wedges. The error names `what` and
    /// shows every wedge's phase, action and attempts, and the end of the timeline.
    pub async fn wait_wedges<F: Fn(&[GpuWedge]) -> bool>(
        &self,
        what: &str,
        timeout: Duration,
        pred: F,
    ) -> Result<(), String> {
        self.wait_until(what, timeout, |s| {
            let ws: Vec<GpuWedge> = s.wedges.values().cloned().collect();
            pred(&ws)
        })
        .await
        .map_err(|e| format!("{e}\n{}", self.report()))
    }

    /// Waits until the node's wedges satisfy `pred`.
    pub async fn wait_node_wedges<F: Fn(&[GpuWedge]) -> bool>(
        &self,
        node: &str,
        what: &str,
        timeout: Duration,
        pred: F,
    ) -> Result<(), String> {
        let node = node.to_string();
        self.wait_wedges(what, timeout, move |ws| {
            let mine: Vec<GpuWedge> = ws
                .iter()
                .filter(|w| w.spec.node_name == node)
                .cloned()
                .collect();
            pred(&mine)
        })
        .await
    }

    /// Waits until some wedge of `node` reaches `phase`; returns it.
    pub async fn wait_phase(
        &self,
        node: &str,
        phase: Phase,
        timeout: Duration,
    ) -> Result<GpuWedge, String> {
        self.wait_node_wedges(
            node,
            &format!("a wedge of node {node} in phase {phase:?}"),
            timeout,
            |ws| ws.iter().any(|w| phase_of(w) == phase),
        )
        .await?;
        Ok(self
            .wedges_of(node)
            .into_iter()
            .find(|w| phase_of(w) == phase)
            .expect("just seen"))
    }

    /// The current wedges of a node.
    pub fn wedges_of(&self, node: &str) -> Vec<GpuWedge> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wedges
            .values()
            .filter(|w| w.spec.node_name == node)
            .cloned()
            .collect()
    }

    /// Every wedge now.
    pub fn wedges(&self) -> Vec<GpuWedge> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wedges
            .values()
            .cloned()
            .collect()
    }

    /// Whether the node is cordoned now.
    pub fn node_cordoned(&self, node: &str) -> Option<bool> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .get(node)
            .map(|n| n.unschedulable)
    }

    /// The most nodes ever seen under recovery at once for `policy`.
    pub fn peak(&self, policy: &str) -> usize {
        *self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peak
            .get(policy)
            .unwrap_or(&0)
    }

    /// Every approval seen so far.
    pub fn approvals(&self) -> Vec<SeenApproval> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .approvals
            .iter()
            .cloned()
            .collect()
    }

    /// Invariants 1 and 3 so far: Err lists every violation, with the timeline.
    pub fn check_invariants(&self) -> Result<(), String> {
        let v = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .violations
            .clone();
        if v.is_empty() {
            Ok(())
        } else {
            Err(format!("{}\n{}", v.join("\n"), self.report()))
        }
    }

    /// Invariant 2 for one node: the writes that reached its fake sysfs are covered by distinct
    /// approved attempts (each approved attempt reached the device at most once). For every
    /// device: unbinds and binds ≤ approved rebind + bus-reset attempts, resets and removes ≤
    /// approved bus-reset attempts.
    pub fn check_journal(&self, node: &str, sysfs: &FakeSysfs) -> Result<(), String> {
        let approvals = self.approvals();
        let mut errs = Vec::new();
        for g in sysfs.gpus() {
            let mine: BTreeSet<(String, u32, String)> = approvals
                .iter()
                .filter(|a| a.node == node && a.device == g.bdf)
                .map(|a| (a.uid.clone(), a.attempt, a.method.clone()))
                .collect();
            let n = |m: &str| mine.iter().filter(|(_, _, mm)| mm == m).count();
            let (rebind, bus) = (n("rebind"), n("bus-reset"));
            // Devices of a reset domain are disturbed by the wedged device's attempts too.
            let domain_attempts: usize = approvals
                .iter()
                .filter(|a| {
                    a.node == node
                        && a.device != g.bdf
                        && (a.method == "rebind" || a.method == "bus-reset")
                })
                .count();
            let unbinds = sysfs.count("unbind", &g.bdf);
            let binds = sysfs.count("bind", &g.bdf);
            let resets = sysfs.count("reset", &g.bdf);
            let removes = sysfs.count("remove", &g.bdf);
            if unbinds > rebind + bus + domain_attempts {
                errs.push(format!(
                    "invariant 2: node {node} device {}: {unbinds} unbind writes reached sysfs for {rebind} approved rebind and {bus} bus-reset attempts (+{domain_attempts} of its reset domain): {mine:?}",
                    g.bdf
                ));
            }
            if resets + removes > bus + domain_attempts {
                errs.push(format!(
                    "invariant 2: node {node} device {}: {resets} reset and {removes} remove writes for {bus} approved bus-reset attempts: {mine:?}",
                    g.bdf
                ));
            }
            // A bus-reset after a failed rebind finds the device unbound and only binds, so
            // binds are bounded by attempts, not by unbinds.
            if binds > rebind + bus + domain_attempts {
                errs.push(format!(
                    "invariant 2: node {node} device {}: {binds} bind writes reached sysfs for {rebind} approved rebind and {bus} bus-reset attempts (+{domain_attempts} of its reset domain): {mine:?}",
                    g.bdf
                ));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}\njournal: {:?}",
                errs.join("\n"),
                sysfs.journal()
            ))
        }
    }

    /// The timeline so far, one line per change, with seconds since the start.
    pub fn timeline(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .timeline
            .iter()
            .map(|(t, s)| format!("+{:7.2}s {s}", t.as_secs_f64()))
            .collect()
    }

    /// Timeline lines after the first `from`.
    pub fn timeline_since(&self, from: usize) -> Vec<String> {
        self.timeline().into_iter().skip(from).collect()
    }

    /// A human-readable dump for failure messages: every wedge and the last timeline lines.
    pub fn report(&self) -> String {
        let mut out = String::from("wedges now:\n");
        for w in self.wedges() {
            let st = w.status.clone().unwrap_or_default();
            out.push_str(&format!(
                "  {} node={} phase={:?} action={:?} approval={:?} attempts={:?} budget={:?} agentMessage={:?}\n",
                w.metadata.name.clone().unwrap_or_default(),
                w.spec.node_name,
                st.phase,
                st.action,
                st.approval.map(|a| (a.method, a.attempt)),
                st.attempts
                    .unwrap_or_default()
                    .iter()
                    .map(|a| (a.attempt, a.method.clone(), a.result, a.message.clone()))
                    .collect::<Vec<_>>(),
                st.budget,
                st.agent_message,
            ));
        }
        let tl = self.timeline();
        out.push_str("timeline (last 40):\n");
        for l in &tl[tl.len().saturating_sub(40)..] {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// Seconds since the recorder started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
