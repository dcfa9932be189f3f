//! What runs every refresh period (and at a leadership change) beside the reconciles: the
//! gauges and each policy's status summary, and the repairs — ledger places of wedges that are
//! gone, and cordons whose wedge is gone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use unwedge_crds::labels::ANN_CORDONED_BY;
use unwedge_crds::{GpuWedge, Phase, RecoveryPolicy};

use super::effects::{cordon_heir, cordon_release_patch};
use super::inputs::nodes_governed_by;
use super::policy_status::{Summary, write_summary};
use super::{Ctx, Error, phase_of};
use crate::budget::{self, Limits};
use crate::dra;
use crate::ledger;
use crate::metrics;
use crate::policy_match;
use crate::quarantine;
use crate::settings::Settings;

/// Refreshes the gauges and each policy's status summary and Conflict condition.
pub async fn refresh(ctx: &Ctx) -> Result<(), Error> {
    let wedges = ctx.wedges.state();
    let mut by_phase: BTreeMap<String, i64> = BTreeMap::new();
    for w in &wedges {
        *by_phase.entry(format!("{:?}", phase_of(w))).or_default() += 1;
    }
    for p in unwedge_crds::Phase::ALL.map(|p| format!("{p:?}")) {
        let n = *by_phase.get(&p).unwrap_or(&0);
        ctx.metrics
            .by_phase
            .get_or_create(&metrics::PhaseLabel { phase: p })
            .set(n);
    }
    ctx.metrics
        .set_open_wedges(metrics::wedge_info_labels(wedges.iter().map(|w| &**w)));
    ctx.metrics.leader.set(i64::from(*ctx.leader.borrow()));
    let policies: Vec<RecoveryPolicy> =
        ctx.policies.state().iter().map(|p| (**p).clone()).collect();
    let nodes: BTreeMap<String, BTreeMap<String, String>> = ctx
        .nodes
        .state()
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect();
    // The devices each policy's maxUnavailableDevices is a share of (DRA only).
    let slices = if ctx.dra.on {
        match quarantine::slices(&ctx.client, None).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list ResourceSlices: devicesSelected not refreshed");
                None
            }
        }
    } else {
        None
    };
    for p in &policies {
        let pname = p.name_any();
        let Ok(s) = Settings::from_spec(&p.spec) else {
            continue;
        };
        let governed = nodes_governed_by(ctx, &policies, &pname);
        let selected = governed.len() as u32;
        let st = p.status.clone().unwrap_or_default();
        let devices = slices.as_ref().map_or(st.devices_selected, |sl| {
            dra::devices_on(sl, &governed.iter().cloned().collect())
        });
        let limits = Limits::of(&s, selected, devices);
        let u = budget::usage(&st.admitted);
        let queued = wedges
            .iter()
            .filter(|w| {
                phase_of(w) == Phase::Queued
                    && w.status.as_ref().and_then(|s| s.policy.as_deref()) == Some(pname.as_str())
            })
            .count();
        for (unit, used, allowed) in [
            ("node", u.nodes, limits.nodes),
            ("reboot", u.reboots, limits.reboots),
            ("device", u.devices, limits.devices),
            ("none", u.none, limits.none),
        ] {
            let l = metrics::PolicyUnit {
                policy: pname.clone(),
                unit: unit.into(),
            };
            ctx.metrics
                .budget_in_use
                .get_or_create(&l)
                .set(i64::from(used));
            ctx.metrics
                .budget_allowed
                .get_or_create(&l)
                .set(i64::from(allowed));
        }
        ctx.metrics
            .queue_length
            .get_or_create(&metrics::PolicyLabel {
                policy: pname.clone(),
            })
            .set(queued as i64);
        if !*ctx.leader.borrow() {
            continue;
        }
        let summary = Summary {
            selected,
            devices,
            text: budget::summary(&st.admitted, &limits, queued),
            conflicts: policy_match::conflicts_of(&pname, &policies, &nodes),
        };
        write_summary(ctx, &pname, &summary).await?;
    }
    Ok(())
}

/// Drops ledger entries of wedges that are gone, read fresh from the API (at every leadership
/// change).
///
/// An entry missing from the LIST is dropped only once a GET of its wedge, made after the
/// policy was read, answers 404. The new leader's reconciles admit wedges while this runs: a
/// wedge created after the LIST and admitted before the ledger write would otherwise lose its
/// place while it goes on to cordon its node, and the place would be given to another node
/// (6 nodes under recovery for a budget of 5, seen when leadership began in a storm).
pub async fn repair_ledgers(client: &Client) -> Result<(), Error> {
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    // Only wedges that are gone: a finished wedge still holding its place releases it itself
    // (every wedge is reconciled after a leadership change), and only once its node's cordon
    // is lifted, so the node is never cordoned without a place counting it.
    let existing: BTreeSet<String> = wedges
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|w| w.name_any())
        .collect();
    repair_unlisted(client, &existing).await
}

/// The second half of [`repair_ledgers`]: drops the ledger entries that `listed` (a LIST of
/// every GpuWedge, made earlier) does not name and whose wedge a GET now confirms gone.
pub async fn repair_unlisted(client: &Client, listed: &BTreeSet<String>) -> Result<(), Error> {
    let wedges: Api<GpuWedge> = Api::all(client.clone());
    let policies: Api<RecoveryPolicy> = Api::all(client.clone());
    for p in policies.list(&ListParams::default()).await?.items {
        let gone = confirmed_gone(&wedges, &p, listed).await?;
        if gone.is_empty() {
            continue;
        }
        let dropped = ledger::repair(&policies, &p.name_any(), |w| !gone.contains(w)).await?;
        if !dropped.is_empty() {
            tracing::info!(policy = %p.name_any(), ?dropped, "ledger repaired: dropped places of wedges that are gone");
        }
    }
    Ok(())
}

/// The wedges of `p`'s ledger that `known` does not name and that a GET, made now, confirms
/// gone (a missing name alone proves nothing: the cache or the LIST may be older than the
/// wedge).
async fn confirmed_gone(
    wedges: &Api<GpuWedge>,
    p: &RecoveryPolicy,
    known: &BTreeSet<String>,
) -> Result<BTreeSet<String>, Error> {
    let mut gone = BTreeSet::new();
    for a in p.status.iter().flat_map(|s| s.admitted.iter()) {
        if !known.contains(&a.wedge) && wedges.get_opt(&a.wedge).await?.is_none() {
            gone.insert(a.wedge.clone());
        }
    }
    Ok(gone)
}

/// Drops ledger entries whose wedge is gone — missing from the cache and confirmed by a fresh
/// read (the cache may lag): runs with every refresh, so a place held by a wedge that vanished
/// without its finalizer (removed by hand, or a wedge from before the finalizer existed) is
/// given back within one refresh period, not only at the next leader change. A finished wedge's
/// place is left to its own Release step, which keeps it until the node's cordon is lifted.
pub async fn repair_from_store(ctx: &Ctx) -> Result<(), Error> {
    if !*ctx.leader.borrow() {
        return Ok(());
    }
    let known: BTreeSet<String> = ctx.wedges.state().iter().map(|w| w.name_any()).collect();
    for p in ctx.policies.state() {
        let gone = confirmed_gone(&ctx.wedge_api(), &p, &known).await?;
        if gone.is_empty() {
            continue;
        }
        ctx.ensure_leader()?;
        let dropped =
            ledger::repair(&ctx.policy_api(), &p.name_any(), |w| !gone.contains(w)).await?;
        if !dropped.is_empty() {
            ctx.metrics.ledger_repairs.inc_by(dropped.len() as u64);
            tracing::info!(policy = %p.name_any(), ?dropped, "ledger repaired: dropped places of wedges that are gone");
        }
    }
    Ok(())
}

/// Lifts unwedge's cordon from nodes whose `unwedge.io/cordoned-by` names a wedge that is gone
/// (missing from the cache, confirmed by a fresh read): the cordon of a wedge deleted without
/// its finalizer's release (the finalizer removed by hand, or a path not yet understood) would
/// otherwise stay forever. The cordon goes to another open wedge of the node, else is lifted,
/// guarded by the node's resourceVersion. Runs with every refresh, on the leader.
pub async fn release_orphan_cordons(ctx: &Ctx) -> Result<(), Error> {
    if !*ctx.leader.borrow() {
        return Ok(());
    }
    let wedges = ctx.wedges.state();
    for n in ctx.nodes.state() {
        let Some(holder) = n.annotations().get(ANN_CORDONED_BY) else {
            continue;
        };
        if wedges.iter().any(|w| w.name_any() == *holder)
            || ctx.wedge_api().get_opt(holder).await?.is_some()
        {
            continue;
        }
        let node = n.name_any();
        let heir = cordon_heir(ctx, &node, holder).await?;
        ctx.ensure_leader()?;
        let body = cordon_release_patch(n.resource_version(), heir.as_deref());
        match Api::<Node>::all(ctx.client.clone())
            .patch(&node, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                tracing::warn!(%node, %holder, to = ?heir, "cordon of a wedge that is gone released")
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
