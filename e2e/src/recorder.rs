//! Watches every change of every GpuWedge and every Node from the start of a scenario (a kube
//! watcher, not sampling), keeps a timeline, and checks invariants as the changes arrive:
//!
//! 1. nodes under recovery per policy (cordoned by unwedge, or with an admitted, non-terminal
//!    node-level wedge) never exceed the budget the scenario configured; the peak is recorded;
//! 3. unwedge never uncordons a node it did not cordon (an uncordon of a node that carried no
//!    `unwedge.io/cordoned-by` annotation just before is a violation).
//!
//! A watch that is cut (kube-apiserver restarted) relists; objects the relist no longer names
//! were deleted meanwhile and are dropped then (no Delete event comes for them). A cut watch
//! may also resume from its last resourceVersion instead, and then replays, in a burst, every
//! change made while it was down: until the replay is over its view is stale (a run read 4
//! nodes under recovery for budget 3: the node watch current, the wedge watch replaying
//! wedges of two nodes uncordoned seconds before). So after every watch error the recorder
//! lists that kind afresh (a quorum read) and merges the list into its view; every object
//! keeps its newest resourceVersion, and older versions the replay delivers afterwards only
//! add their approvals (invariant 2), never roll the view back. Invariant 1 is judged only
//! while both watches are live — not from a watch error until the watch delivers again and
//! that list is merged, nor during a relist (a list merged while the watch is still down
//! ages: the same seed read 4 for 3 again from a wedge Recovered 2 s before the wedge watch
//! came back) — and again as soon as both are.
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
    /// Every violation seen, with when.
    violations: Vec<(Duration, String)>,
    timeline: Vec<(Duration, String)>,
    approvals: BTreeSet<SeenApproval>,
    /// Every wedge ever seen, by uid: its name, node and device (kept after it is deleted).
    identities: BTreeMap<String, (String, String, String)>,
    ready: u8,
    /// Names listed by the (re)list in progress, per watch: what a relist does not name was
    /// deleted while the watch was down (kube-apiserver restarted), with no Delete event.
    relisted_wedges: BTreeSet<String>,
    relisted_nodes: BTreeSet<String>,
    /// Per watch: the resourceVersions its view holds and whether it is live (see [`Fresh`]).
    wedges_fresh: Fresh,
    nodes_fresh: Fresh,
    /// Per watch: the recent versions of what invariant 1 reads (see [`Versions`]).
    wedge_versions: Versions<(Option<String>, String, bool)>,
    node_versions: Versions<Option<String>>,
}

/// How long a watch that delivers nothing is taken as caught up ([`Versions::horizon`]).
const IDLE: Duration = Duration::from_secs(1);

/// Invariant 1 is judged on the two watches' views as of one revision. The API server orders
/// every write by one counter (etcd's revision, which resourceVersions are here), and the two
/// watches deliver at their own pace: in a 1,000-node storm the wedge watch, carrying a
/// thousand status writes, ran a second behind the node watch, and showed a node cordoned for a
/// wedge admitted into a place given back by a wedge it still showed Verifying (written
/// Recovered before the place was given back): 51 nodes for a budget of 50 that the API server
/// never held at once. So each view keeps its objects' recent versions, and the budget is
/// judged as of the older of the two watches' newest revisions; a watch that delivered nothing
/// for [`IDLE`] is taken as caught up.
struct Versions<P> {
    by_name: BTreeMap<String, Vec<(u64, Option<P>)>>,
    newest: u64,
    at: Instant,
}

impl<P> Default for Versions<P> {
    fn default() -> Self {
        Self {
            by_name: BTreeMap::new(),
            newest: 0,
            at: Instant::now(),
        }
    }
}

impl<P: Clone> Versions<P> {
    /// `name` as of revision `rv` (0: unknown, taken as the newest seen): `None` when deleted.
    fn record(&mut self, name: &str, rv: u64, p: Option<P>) {
        let rv = if rv == 0 { self.newest } else { rv };
        self.newest = self.newest.max(rv);
        self.at = Instant::now();
        self.by_name
            .entry(name.to_string())
            .or_default()
            .push((rv, p));
    }

    /// The newest revision the view is known to hold everything up to.
    fn horizon(&self) -> u64 {
        if self.at.elapsed() >= IDLE {
            u64::MAX
        } else {
            self.newest
        }
    }

    /// Every object as it was at revision `h` (objects absent then are left out); forgets the
    /// versions older than the newest one at or before `prune`, which no later judgement needs
    /// (both watches have delivered past it).
    fn as_of(&mut self, h: u64, prune: u64) -> Vec<(String, P)> {
        let mut out = Vec::new();
        self.by_name.retain(|name, vs| {
            if let Some(i) = vs.iter().rposition(|(rv, _)| *rv <= prune) {
                vs.drain(..i);
            }
            if let Some((_, Some(p))) = vs.iter().rev().find(|(rv, _)| *rv <= h) {
                out.push((name.clone(), p.clone()));
            }
            !(vs.len() == 1 && vs[0].1.is_none() && vs[0].0 <= prune)
        });
        out
    }
}

/// What keeps one watch's view from going back in time: the resourceVersion of every object it
/// holds, of every object it saw deleted, and of the last list merged after a watch error.
/// resourceVersions are compared as numbers (etcd revisions: true of every API server this
/// harness runs, never assumed by unwedge itself).
#[derive(Default)]
struct Fresh {
    rv: BTreeMap<String, u64>,
    gone: BTreeMap<String, u64>,
    floor: u64,
    /// A watch error happened and its catch-up list is not merged yet.
    catching_up: bool,
    /// The watch delivered a change since its last error (it is connected again).
    connected: bool,
    /// The watch is relisting (from its Init to its InitDone).
    relisting: bool,
    /// Counts watch errors: a catch-up list started before the latest error is not merged.
    epoch: u64,
}

fn rv_of(m: &kube::api::ObjectMeta) -> u64 {
    m.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Fresh {
    /// Whether a version `rv` of `name` is older than what the view knows (a replayed change).
    fn stale(&self, name: &str, rv: u64) -> bool {
        if rv == 0 {
            return false;
        }
        match self.rv.get(name) {
            Some(&have) => rv < have,
            None => rv <= self.floor || self.gone.get(name).is_some_and(|&g| rv <= g),
        }
    }

    /// Whether the view is current: the watch is connected, not relisting, and the list made
    /// after its last error is merged (until then a resumed watch may be replaying).
    fn live(&self) -> bool {
        self.connected && !self.relisting && !self.catching_up
    }

    fn deleted(&mut self, name: &str, rv: u64) {
        self.rv.remove(name);
        self.gone.insert(name.to_string(), rv);
    }
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
    /// Nodes under recovery, per policy, as of the revision both watches have reached
    /// ([`Versions`]).
    fn under_recovery(&mut self) -> BTreeMap<String, BTreeSet<String>> {
        let h = self
            .wedge_versions
            .horizon()
            .min(self.node_versions.horizon());
        let prune = self.wedge_versions.newest.min(self.node_versions.newest);
        let wedges = self.wedge_versions.as_of(h, prune);
        let cordons = self.node_versions.as_of(h, prune);
        let policies: BTreeMap<&str, Option<&str>> = wedges
            .iter()
            .map(|(name, (policy, _, _))| (name.as_str(), policy.as_deref()))
            .collect();
        let policy_of = |wedge: &str| {
            policies
                .get(wedge)
                .copied()
                .flatten()
                .or_else(|| {
                    self.wedges
                        .get(wedge)
                        .and_then(|w| w.status.as_ref())
                        .and_then(|s| s.policy.as_deref())
                })
                .unwrap_or("<unknown policy>")
                .to_string()
        };
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (node, by) in &cordons {
            if let Some(w) = by {
                m.entry(policy_of(w)).or_default().insert(node.clone());
            }
        }
        for (name, (_, node, holds)) in &wedges {
            if *holds {
                m.entry(policy_of(name)).or_default().insert(node.clone());
            }
        }
        m
    }

    fn check_budget(&mut self, t: Duration, cause: &str) {
        // One watch cut (kube-apiserver restarted) while the other delivers would compare
        // current nodes with stale wedges (or the reverse): judged again once both are live.
        if !(self.wedges_fresh.live() && self.nodes_fresh.live()) {
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
                self.violations.push((t, format!(
                    "invariant 1 at +{:.1}s after {cause}: policy {policy} has {n} nodes under recovery, budget {max}: {nodes:?}",
                    t.as_secs_f64()
                )));
            }
        }
    }

    fn on_wedge(&mut self, t: Duration, w: GpuWedge) {
        let name = w.metadata.name.clone().unwrap_or_default();
        self.identities.insert(
            w.metadata.uid.clone().unwrap_or_default(),
            (
                name.clone(),
                w.spec.node_name.clone(),
                w.spec.device.pci_address.clone(),
            ),
        );
        let rv = rv_of(&w.metadata);
        if self.wedges_fresh.stale(&name, rv) {
            self.replayed_approval(t, &w);
            return;
        }
        self.wedges_fresh.rv.insert(name.clone(), rv);
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
        let judged = (
            w.status.as_ref().and_then(|s| s.policy.clone()),
            w.spec.node_name.clone(),
            holds_node(&w),
        );
        self.wedge_versions.record(&name, rv, Some(judged));
        self.wedges.insert(name.clone(), w);
        self.check_budget(t, &format!("wedge {name} changed"));
    }

    /// An older version of a wedge than the view holds (delivered by a watch replaying what it
    /// missed): only its approval counts, as one the operator gave.
    fn replayed_approval(&mut self, t: Duration, w: &GpuWedge) {
        let Some(a) = w.status.as_ref().and_then(|s| s.approval.as_ref()) else {
            return;
        };
        let seen = SeenApproval {
            wedge: w.metadata.name.clone().unwrap_or_default(),
            uid: w.metadata.uid.clone().unwrap_or_default(),
            node: w.spec.node_name.clone(),
            device: w.spec.device.pci_address.clone(),
            attempt: a.attempt,
            method: a.method.clone(),
            by: a.by.clone(),
        };
        if !self.approvals.contains(&seen) {
            self.timeline.push((
                t,
                format!(
                    "wedge {}: approved {} attempt {} by {} (seen late, in a watch's replay)",
                    seen.wedge, a.method, a.attempt, a.by
                ),
            ));
            self.approvals.insert(seen);
        }
    }

    /// Merges a list of every object of kind `K` made after a watch error (at collection
    /// resourceVersion `at`): the view becomes at least as new as the list, and that watch live
    /// again.
    fn merge_list<K: Watched>(&mut self, t: Duration, at: u64, items: Vec<K>) {
        let listed: BTreeSet<String> = items.iter().map(name_of).collect();
        for obj in items {
            K::apply(self, t, obj);
        }
        let gone: Vec<String> = K::names(self)
            .into_iter()
            .filter(|n| !listed.contains(n))
            .filter(|n| K::fresh(self).rv.get(n).is_none_or(|&rv| rv <= at))
            .collect();
        for name in gone {
            self.timeline
                .push((t, format!("{} {name} deleted (seen by a list)", K::WHAT)));
            K::forget(self, &name, at);
            K::fresh(self).deleted(&name, at);
        }
        let fresh = K::fresh(self);
        fresh.floor = fresh.floor.max(at);
        fresh.catching_up = false;
        self.check_budget(
            t,
            &format!("the {}s were listed after a watch error", K::WHAT),
        );
    }

    /// After a relist: forgets the objects of kind `K` it did not name (deleted while the watch
    /// was down).
    fn drop_unlisted<K: Watched>(&mut self, t: Duration) {
        let relisted = std::mem::take(K::relisted(self));
        let gone: Vec<String> = K::names(self)
            .into_iter()
            .filter(|n| !relisted.contains(n))
            .collect();
        *K::relisted(self) = relisted;
        for name in gone {
            self.timeline
                .push((t, format!("{} {name} deleted (seen by a relist)", K::WHAT)));
            K::forget(self, &name, 0);
            K::fresh(self).rv.remove(&name);
        }
    }

    /// Takes one event of the watch of kind `K`. After a watch error, returns the epoch of
    /// the catch-up list to make (see the module documentation).
    fn on_event<K: Watched>(
        &mut self,
        t: Duration,
        ev: Result<watcher::Event<K>, watcher::Error>,
    ) -> Option<u64> {
        match ev {
            Ok(watcher::Event::Apply(obj)) => {
                K::fresh(self).connected = true;
                K::apply(self, t, obj);
            }
            Ok(watcher::Event::InitApply(obj)) => {
                K::relisted(self).insert(name_of(&obj));
                K::apply(self, t, obj);
            }
            Ok(watcher::Event::Delete(obj)) => {
                let name = name_of(&obj);
                let rv = rv_of(obj.meta());
                K::fresh(self).connected = true;
                if !K::fresh(self).stale(&name, rv) {
                    self.timeline
                        .push((t, format!("{} {name} deleted", K::WHAT)));
                    K::forget(self, &name, rv);
                    K::fresh(self).deleted(&name, rv);
                    self.check_budget(t, &format!("{} {name} deleted", K::WHAT));
                }
            }
            Ok(watcher::Event::InitDone) => {
                self.ready += 1;
                self.drop_unlisted::<K>(t);
                let fresh = K::fresh(self);
                fresh.catching_up = false;
                fresh.relisting = false;
                fresh.connected = true;
                self.check_budget(t, &format!("the {} watch listed", K::WHAT));
            }
            Ok(watcher::Event::Init) => {
                K::relisted(self).clear();
                K::fresh(self).relisting = true;
            }
            Err(e) => {
                let fresh = K::fresh(self);
                fresh.connected = false;
                fresh.catching_up = true;
                fresh.epoch += 1;
                let epoch = fresh.epoch;
                self.timeline
                    .push((t, format!("(recorder: {} watch error: {e})", K::WHAT)));
                return Some(epoch);
            }
        }
        None
    }

    fn on_node(&mut self, t: Duration, n: Node) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let rv = rv_of(&n.metadata);
        if self.nodes_fresh.stale(&name, rv) {
            return;
        }
        self.nodes_fresh.rv.insert(name.clone(), rv);
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
                self.violations.push((t, format!(
                    "invariant 3 at +{:.1}s: node {name} was uncordoned but unwedge had not cordoned it (no {ANN_CORDONED_BY} annotation before)",
                    t.as_secs_f64()
                )));
            }
        }
        self.node_versions
            .record(&name, rv, Some(v.cordoned_by.clone()));
        self.nodes.insert(name.clone(), v);
        self.check_budget(t, &format!("node {name} changed"));
    }
}

/// Lists every object of a kind (a quorum read), retrying while the API server is down (at
/// most two minutes); its collection resourceVersion and its items.
async fn list_after_error<K>(api: &Api<K>) -> Option<(u64, Vec<K>)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    for _ in 0..480 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(list) = api.list(&kube::api::ListParams::default()).await {
            let at = rv_of(&kube::api::ObjectMeta {
                resource_version: list.metadata.resource_version.clone(),
                ..Default::default()
            });
            return Some((at, list.items));
        }
    }
    None
}

fn name_of<K: kube::Resource>(obj: &K) -> String {
    obj.meta().name.clone().unwrap_or_default()
}

/// One of the two kinds the recorder watches: where its view and its watch's state live in
/// [`State`].
trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The kind as the timeline names it.
    const WHAT: &'static str;
    /// Its watch's freshness.
    fn fresh(s: &mut State) -> &mut Fresh;
    /// The names the relist in progress named.
    fn relisted(s: &mut State) -> &mut BTreeSet<String>;
    /// The names in the view.
    fn names(s: &State) -> Vec<String>;
    /// Takes one version into the view (checking the invariants).
    fn apply(s: &mut State, t: Duration, obj: Self);
    /// Drops one from the view, deleted at revision `rv` (0: unknown).
    fn forget(s: &mut State, name: &str, rv: u64);
}

impl Watched for GpuWedge {
    const WHAT: &'static str = "wedge";
    fn fresh(s: &mut State) -> &mut Fresh {
        &mut s.wedges_fresh
    }
    fn relisted(s: &mut State) -> &mut BTreeSet<String> {
        &mut s.relisted_wedges
    }
    fn names(s: &State) -> Vec<String> {
        s.wedges.keys().cloned().collect()
    }
    fn apply(s: &mut State, t: Duration, obj: Self) {
        s.on_wedge(t, obj)
    }
    fn forget(s: &mut State, name: &str, rv: u64) {
        s.wedges.remove(name);
        s.wedge_versions.record(name, rv, None);
    }
}

impl Watched for Node {
    const WHAT: &'static str = "node";
    fn fresh(s: &mut State) -> &mut Fresh {
        &mut s.nodes_fresh
    }
    fn relisted(s: &mut State) -> &mut BTreeSet<String> {
        &mut s.relisted_nodes
    }
    fn names(s: &State) -> Vec<String> {
        s.nodes.keys().cloned().collect()
    }
    fn apply(s: &mut State, t: Duration, obj: Self) {
        s.on_node(t, obj)
    }
    fn forget(s: &mut State, name: &str, rv: u64) {
        s.nodes.remove(name);
        s.node_versions.record(name, rv, None);
    }
}

/// Watches every object of kind `K` into the state, waking waiters after each event; after a
/// watch error, lists them afresh and merges the list (unless another error came since).
fn watch_into<K: Watched>(
    api: Api<K>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    started: Instant,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stream = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            let t = started.elapsed();
            let catch_up = state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .on_event(t, ev);
            if let Some(epoch) = catch_up {
                let (api, st, ch) = (api.clone(), state.clone(), changed.clone());
                tokio::spawn(async move {
                    let Some((at, items)) = list_after_error(&api).await else {
                        return;
                    };
                    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                    if K::fresh(&mut s).epoch == epoch {
                        s.merge_list(started.elapsed(), at, items);
                    }
                    drop(s);
                    ch.notify_waiters();
                });
            }
            changed.notify_waiters();
        }
    })
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
        let t1 = watch_into(wedges, state.clone(), changed.clone(), started);
        let t2 = watch_into(nodes, state.clone(), changed.clone(), started);
        // Judges again while nothing is delivered: a watch quiet for IDLE is caught up, and
        // the other watch's last changes are judged then ([`Versions`]).
        let quiet = {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(IDLE / 4).await;
                    state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .check_budget(started.elapsed(), "a watch went quiet");
                }
            })
        };
        let r = Recorder {
            state,
            changed,
            started,
            tasks: vec![t1, t2, quiet],
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

    /// The name, node and device of the wedge with this uid, if it was ever seen.
    pub fn identity(&self, uid: &str) -> Option<(String, String, String)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .identities
            .get(uid)
            .cloned()
    }

    /// Invariants 1 and 3 so far: Err lists every violation, with the timeline.
    pub fn check_invariants(&self) -> Result<(), String> {
        let (v, around) = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(&(first, _)) = st.violations.first() else {
                return Ok(());
            };
            // What led to the first violation: the changes of the 3 s before it and the second
            // after, at most 80 lines (the report's own tail shows only the end of the run).
            let window: Vec<String> = st
                .timeline
                .iter()
                .filter(|(t, _)| {
                    *t + Duration::from_secs(3) >= first && *t <= first + Duration::from_secs(1)
                })
                .map(|(t, s)| format!("  +{:7.2}s {s}", t.as_secs_f64()))
                .collect();
            let window = window[window.len().saturating_sub(80)..].join("\n");
            (st.violations.clone(), window)
        };
        let shown: Vec<&str> = v.iter().take(10).map(|(_, s)| s.as_str()).collect();
        Err(format!(
            "{} violation(s), the first {}:\n{}\ntimeline around the first:\n{around}\n{}",
            v.len(),
            shown.len(),
            shown.join("\n"),
            self.report()
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch resumed after a cut replays older versions: none rolls the view back, a deleted
    /// object's replayed versions do not bring it back, and one created again under its name
    /// (a newer resourceVersion) is taken.
    #[test]
    fn a_replayed_version_never_rolls_the_view_back() {
        let mut f = Fresh::default();
        f.rv.insert("a".into(), 10);
        assert!(f.stale("a", 9));
        assert!(!f.stale("a", 10));
        assert!(!f.stale("a", 11));
        f.deleted("a", 12);
        assert!(f.stale("a", 11));
        assert!(!f.stale("a", 13), "created again under its name");
        f.floor = 20;
        assert!(
            f.stale("b", 15),
            "not in the list merged at 20: gone by then"
        );
        assert!(!f.stale("b", 21));
        assert!(!f.stale("c", 0), "no resourceVersion: taken");
    }

    /// After a watch error the view is live only once the watch delivers again and the list
    /// made after the error is merged (in either order), and never during a relist.
    #[test]
    fn a_view_is_live_only_when_connected_and_caught_up() {
        let mut f = Fresh {
            connected: true,
            ..Fresh::default()
        };
        assert!(f.live());
        f.connected = false;
        f.catching_up = true;
        assert!(!f.live(), "cut");
        f.catching_up = false;
        assert!(!f.live(), "list merged, watch still down: the list ages");
        f.connected = true;
        assert!(f.live());
        f.relisting = true;
        assert!(!f.live(), "relisting");
    }

    /// The storm's false count: the node watch shows node n2 cordoned for wedge B (revision
    /// 10) while the wedge watch, behind, still shows wedge A holding n1 (revision 5); A was
    /// Recovered (8) before B took its place (9). Judged as of the older watch, one node.
    #[test]
    fn the_budget_is_judged_as_of_both_watches() {
        let mut wedges: Versions<(String, bool)> = Versions::default();
        let mut nodes: Versions<Option<String>> = Versions::default();
        wedges.record("A", 5, Some(("n1".into(), true)));
        nodes.record("n1", 4, Some(Some("A".into())));
        nodes.record("n1", 7, Some(None));
        nodes.record("n2", 10, Some(Some("B".into())));
        let h = wedges.horizon().min(nodes.horizon());
        assert_eq!(h, 5, "the wedge watch is behind");
        let prune = wedges.newest.min(nodes.newest);
        assert_eq!(
            wedges.as_of(h, prune),
            [("A".to_string(), ("n1".to_string(), true))]
        );
        assert_eq!(
            nodes.as_of(h, prune),
            [("n1".to_string(), Some("A".to_string()))],
            "n2's cordon (10) is not judged before the wedge watch reaches it"
        );
        // The wedge watch catches up: A gave its place back, B holds n2.
        wedges.record("A", 8, Some(("n1".into(), false)));
        wedges.record("B", 9, Some(("n2".into(), true)));
        let h = wedges.horizon().min(nodes.horizon());
        let prune = wedges.newest.min(nodes.newest);
        assert_eq!(h, 9);
        let held: Vec<_> = wedges
            .as_of(h, prune)
            .into_iter()
            .filter(|(_, (_, holds))| *holds)
            .map(|(w, _)| w)
            .collect();
        assert_eq!(held, ["B"]);
        assert_eq!(
            nodes.as_of(h, prune),
            [("n1".to_string(), None)],
            "n1 uncordoned at 7, n2's cordon still ahead"
        );
        // A deleted: gone from the view once both watches are past it.
        wedges.record("A", 11, None);
        nodes.record("n2", 12, Some(None));
        let h = wedges.horizon().min(nodes.horizon());
        let prune = wedges.newest.min(nodes.newest);
        assert_eq!(h, 11);
        assert_eq!(wedges.as_of(h, prune).len(), 1, "only B");
        assert!(!wedges.by_name.contains_key("A"), "A's versions forgotten");
    }
}
