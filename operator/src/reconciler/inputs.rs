//! Loading what `decide` reads for one wedge: its node (and whether it is gone), the governing
//! policy with its settings, ledger, limits and circuit breaker, the wedges waiting ahead of it,
//! the device's history, the node's pods and the DRA side. Everything is owned here; `input`
//! lends it to `decide` as an [`Input`].

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use unwedge_crds::labels::{ANN_ABANDON, ANN_APPROVE, ANN_BY, ANN_RETRY};
use unwedge_crds::{Admission, GpuWedge, Phase, RecoveryPolicy};

use super::policy_status::breaker_check;
use super::{Ctx, Error, open, open_on_node};
use crate::budget::Limits;
use crate::decide::{
    self, DraView, Governance, Input, NodeView, PastWedge, PodView, PolicyView, Verbs,
};
use crate::dra;
use crate::policy_match::{self, Governing};
use crate::quarantine;
use crate::settings::Settings;

/// The governing policy, usable as written.
struct Governed {
    /// Its name.
    name: String,
    /// Its settings, defaults applied.
    settings: Settings,
    /// Its ledger as cached.
    ledger: Vec<Admission>,
    /// Its limits for its current size.
    limits: Limits,
    /// Whether its circuit breaker holds automatic actions.
    tripped: bool,
}

/// What `decide` reads of one wedge's surroundings, loaded.
pub(super) struct Loaded {
    /// The clock of this reconcile.
    now: Timestamp,
    /// The wedge's node, from the cache.
    pub(super) node: Option<Arc<Node>>,
    /// What decisions read of it.
    node_view: Option<NodeView>,
    /// The node is gone (confirmed by a fresh read).
    node_deleted: bool,
    /// Which policy governs, by name.
    governing: Governing,
    /// That policy, when it can be used.
    governed: Option<Governed>,
    /// That policy and what is wrong with it, when it cannot.
    invalid: Option<(String, String)>,
    /// Open wedges of the policy that arrived earlier and hold no place: `(wedge, node)`.
    waiting_ahead: Vec<(String, String)>,
    /// Earlier wedges of the same device.
    history: Vec<PastWedge>,
    /// Other open wedges of the node.
    others: Vec<String>,
    /// The node's pods, when the decision reads them ([`decide::reads_pods`]); else empty.
    pods: Vec<PodView>,
    /// The DRA view, whether our DeviceTaintRule exists, whether the device is published again.
    dra: (Option<DraView>, bool, Option<bool>),
}

impl Loaded {
    /// Reads the stores (and the API where the cache is not enough) for `w`. The circuit
    /// breaker of the governing policy is evaluated here and a trip or resume recorded.
    pub(super) async fn load(ctx: &Ctx, w: &GpuWedge) -> Result<Loaded, Error> {
        let name = w.name_any();
        let now = Timestamp::now();
        let node_name = w.spec.node_name.clone();
        let node = ctx.node(&node_name);
        // Missing from the cache is not enough: the watch may lag. Only a fresh 404 ends the wedge.
        let node_deleted = node.is_none()
            && open(w)
            && Api::<Node>::all(ctx.client.clone())
                .get_opt(&node_name)
                .await?
                .is_none();
        let (governing, policies) = resolve_policy(ctx, node.as_deref(), &name);
        let all: Vec<Arc<GpuWedge>> = ctx.wedges.state();

        let (governed, invalid) = match &governing {
            Governing::Policy(pname) => policy(ctx, &policies, pname, &all, now).await?,
            _ => (None, None),
        };
        let waiting_ahead = waiting_ahead(&all, w, governed.as_ref());
        let history = history(&all, w);
        let others = open_on_node(&all, &node_name, &name);
        // Listed only when the decision reads them (no LIST for a first look or the queue).
        let pods: Vec<PodView> = if decide::reads_pods(w) {
            Api::<Pod>::all(ctx.client.clone())
                .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
                .await?
                .items
                .iter()
                .map(pod_view)
                .collect()
        } else {
            Vec::new()
        };
        let node_view = node.as_deref().map(NodeView::of);
        let dra = dra_inputs(ctx, w).await?;
        Ok(Loaded {
            now,
            node,
            node_view,
            node_deleted,
            governing,
            governed,
            invalid,
            waiting_ahead,
            history,
            others,
            pods,
            dra,
        })
    }

    /// The inputs of `decide` for `w`, borrowed from what was loaded; `operator` approves
    /// automatic approvals.
    pub(super) fn input<'a>(&'a self, w: &'a GpuWedge, operator: &'a str) -> Input<'a> {
        let policy = match (&self.governing, &self.governed, &self.invalid) {
            (_, Some(g), _) => Governance::Policy(PolicyView {
                name: &g.name,
                settings: &g.settings,
                ledger: &g.ledger,
                limits: g.limits,
                waiting_ahead: self.waiting_ahead.clone(),
                breaker_tripped: g.tripped,
            }),
            (_, None, Some((n, e))) => Governance::Invalid {
                name: n.clone(),
                error: e.clone(),
            },
            (Governing::Conflict(n), _, _) => Governance::Conflict(n.clone()),
            _ => Governance::NoPolicy,
        };
        let (dra, quarantine_rule, device_advertised) = self.dra.clone();
        Input {
            wedge: w,
            node: self.node_view.as_ref(),
            policy,
            pods: &self.pods,
            history: &self.history,
            others_on_node: &self.others,
            device_advertised,
            now: self.now,
            operator,
            verbs: verbs(w),
            dra,
            quarantine_rule,
            node_deleted: self.node_deleted,
        }
    }
}

fn node_labels(n: Option<&Node>) -> BTreeMap<String, String> {
    n.map(|n| n.labels().clone()).unwrap_or_default()
}

/// The governing policy `pname`, usable (its settings, ledger, limits and circuit breaker,
/// evaluated now) or not (what is wrong with it).
async fn policy(
    ctx: &Ctx,
    policies: &[Arc<RecoveryPolicy>],
    pname: &str,
    all: &[Arc<GpuWedge>],
    now: Timestamp,
) -> Result<(Option<Governed>, Option<(String, String)>), Error> {
    let plain: Vec<RecoveryPolicy> = policies.iter().map(|p| (**p).clone()).collect();
    let p = policies
        .iter()
        .find(|p| p.name_any() == *pname)
        .expect("governing policy is in the store");
    match Settings::from_spec(&p.spec) {
        Ok(s) => {
            let nodes = nodes_governed_by(ctx, &plain, pname);
            let st = p.status.clone().unwrap_or_default();
            let limits = Limits::of(&s, nodes.len() as u32, st.devices_selected);
            let tripped = breaker_check(ctx, p, &s, all, &nodes, now).await?;
            let governed = Governed {
                name: pname.to_string(),
                settings: s,
                ledger: st.admitted,
                limits,
                tripped,
            };
            Ok((Some(governed), None))
        }
        Err(e) => Ok((None, Some((pname.to_string(), e.to_string())))),
    }
}

/// The open wedges of `w`'s policy on other nodes, on the same path (`none` or a recovery),
/// that arrived before it and hold no place: `(wedge, node)`, first come first.
fn waiting_ahead(
    all: &[Arc<GpuWedge>],
    w: &GpuWedge,
    governed: Option<&Governed>,
) -> Vec<(String, String)> {
    let name = w.name_any();
    let node_name = &w.spec.node_name;
    let plan_is_none = decide::plans_none(w);
    let mut ahead: Vec<(Timestamp, String, String)> = all
        .iter()
        .filter(|o| open(o) && o.spec.node_name != *node_name)
        .filter(|o| {
            o.status.as_ref().and_then(|s| s.policy.as_deref()) == governed.map(|g| g.name.as_str())
        })
        .filter(|o| decide::plans_none(o) == plan_is_none)
        .filter(|o| (decide::arrived(o), o.name_any()) < (decide::arrived(w), name.clone()))
        .filter(|o| !governed.is_some_and(|g| g.ledger.iter().any(|a| a.wedge == o.name_any())))
        .map(|o| (decide::arrived(o), o.name_any(), o.spec.node_name.clone()))
        .collect();
    ahead.sort();
    ahead.into_iter().map(|(_, w, n)| (w, n)).collect()
}

/// The earlier wedges of `w`'s device (same node, same PCI address), `w` excluded.
fn history(all: &[Arc<GpuWedge>], w: &GpuWedge) -> Vec<PastWedge> {
    let name = w.name_any();
    let device = unwedge_crds::labels::device_label(&w.spec.device.pci_address);
    all.iter()
        .filter(|o| {
            o.name_any() != name
                && o.spec.node_name == w.spec.node_name
                && unwedge_crds::labels::device_label(&o.spec.device.pci_address) == device
        })
        .filter(|o| decide::arrived(o) <= decide::arrived(w))
        .map(|o| PastWedge {
            name: o.name_any(),
            detected_at: decide::arrived(o),
            evicted_at: o.status.as_ref().and_then(decide::none_round_at),
        })
        .collect()
}

/// The policy that governs `wedge` and every policy, resolved from the stores: the policy whose
/// ledger holds the wedge (it keeps its place there until the incident ends, whatever the
/// node's labels say now), else the one that selects the node.
fn resolve_policy(
    ctx: &Ctx,
    node: Option<&Node>,
    wedge: &str,
) -> (Governing, Vec<Arc<RecoveryPolicy>>) {
    let policies: Vec<Arc<RecoveryPolicy>> = ctx.policies.state();
    let plain: Vec<RecoveryPolicy> = policies.iter().map(|p| (**p).clone()).collect();
    (
        policy_match::for_wedge(&plain, &node_labels(node), wedge),
        policies,
    )
}

/// The nodes (from the cache) that policy `name` governs.
pub(super) fn nodes_governed_by(ctx: &Ctx, policies: &[RecoveryPolicy], name: &str) -> Vec<String> {
    ctx.nodes
        .state()
        .iter()
        .filter(|n| policy_match::governing(policies, n.labels()) == Governing::Policy(name.into()))
        .map(|n| n.name_any())
        .collect()
}

fn pod_view(p: &Pod) -> PodView {
    let owners = p.metadata.owner_references.clone().unwrap_or_default();
    let phase = p
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    PodView {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        restart_never: p
            .spec
            .as_ref()
            .is_some_and(|s| s.restart_policy.as_deref() == Some("Never")),
        mirror: p.annotations().contains_key("kubernetes.io/config.mirror"),
        daemon_set: owners.iter().any(|o| o.kind == "DaemonSet"),
        terminating: p.metadata.deletion_timestamp.is_some(),
        finished: phase == "Succeeded" || phase == "Failed",
        empty_dir: p
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v.iter().any(|v| v.empty_dir.is_some())),
    }
}

fn verbs(w: &GpuWedge) -> Verbs {
    let a = w.annotations();
    Verbs {
        approve: a.get(ANN_APPROVE).cloned(),
        retry: a.get(ANN_RETRY).cloned(),
        abandon: a.get(ANN_ABANDON).cloned(),
        by: a.get(ANN_BY).cloned(),
    }
}

/// The DRA side of a wedge: its view (when DRA is on and the agent named a DRA device),
/// whether our rule exists, and whether the device is published again (the verification).
async fn dra_inputs(
    ctx: &Ctx,
    w: &GpuWedge,
) -> Result<(Option<decide::DraView>, bool, Option<bool>), Error> {
    let name = w.name_any();
    let dev = w.spec.device.dra.as_ref().filter(|_| ctx.dra.on);
    // A rule of ours is looked for whatever the mode, so one left from a DRA-on run is
    // still deleted at recovery.
    let rule = if ctx.dra.on
        || w.status
            .as_ref()
            .is_some_and(|s| s.quarantine_rule.is_some())
    {
        match quarantine::get(&ctx.client, &name).await {
            Ok(r) => r.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the DeviceTaintRule");
                return Err(Error::Quarantine(e));
            }
        }
    } else {
        false
    };
    let Some(dev) = dev else {
        return Ok((None, rule, None));
    };
    if w.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(Phase::is_terminal)
    {
        return Ok((None, rule, None));
    }
    let slices = quarantine::slices(&ctx.client, Some(&w.spec.node_name)).await?;
    if !rule && !dra::advertised(&slices, dev) {
        // The agent-written DRA device is not published by the wedge's own node: never taint a
        // device this node does not have (a compromised node could name another node's GPU).
        // The wedge is handled like a non-DRA one: its own node is cordoned.
        tracing::warn!(driver = %dev.driver, pool = %dev.pool, device = %dev.device,
            "the wedge names a DRA device that no ResourceSlice of its node publishes: not quarantining it, cordoning the node instead");
        return Ok((None, rule, None));
    }
    let claims = quarantine::claims(&ctx.client).await?;
    let view = decide::DraView {
        rule: dra::rule_name(&name),
        consumers: dra::consumers(&claims, dev),
    };
    Ok((Some(view), rule, Some(dra::advertised(&slices, dev))))
}
