//! Wiring: the GpuWedge, Node and RecoveryPolicy reflectors and what each change triggers, the
//! readiness report, the periodic refresh, and the controller that runs `reconcile`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use unwedge_crds::labels::ANN_CORDONED_BY;
use unwedge_crds::{GpuWedge, RecoveryPolicy};

use super::refresh::{refresh, release_orphan_cordons, repair_from_store, repair_ledgers};
use super::{Ctx, Error, open, reconcile};
use crate::decide;
use crate::dra;
use crate::metrics::Metrics;
use crate::wake;

/// Reconciles doing work at once (different wedges; one wedge is never reconciled twice at
/// once).
///
/// Not the controller's own `concurrency` limit: at its limit kube-runtime parks due requests
/// in a hash set and takes them in the set's iteration order, so in the 1,000-node storm some
/// new wedges waited four minutes for their first reconcile while others' follow-ups kept
/// arriving. The controller starts every due reconcile; each waits here for a permit of a
/// tokio semaphore, which is fair (first come, first served). Wedges holding a budget place
/// have their own lane of half as many permits (`Ctx::admitted_permits`).
const RECONCILE_CONCURRENCY: usize = 16;

/// Drops `metadata.managedFields` before an object enters a store: no decision reads them, and
/// on a GpuWedge written by the agent and the operator at every step they are a large part of
/// the object (docs/benchmarks.md §3). Objects are only ever written with patches or from
/// fresh reads, never from the cache.
fn drop_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Requeues a failed reconcile after 5 s; a replica that lost the lease waits for a change.
fn error_policy(w: Arc<GpuWedge>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    match e {
        Error::NotLeader => Action::await_change(),
        e => {
            tracing::warn!(wedge = %w.name_any(), error = %e, "reconcile failed; retrying");
            Action::requeue(Duration::from_secs(5))
        }
    }
}

/// A stream inspector that reports `what` on `tx` at each complete list (InitDone).
fn synced<K>(
    tx: &tokio::sync::mpsc::UnboundedSender<&'static str>,
    what: &'static str,
) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
    let tx = tx.clone();
    move |ev| {
        if matches!(ev, Ok(watcher::Event::InitDone)) {
            let _ = tx.send(what);
        }
    }
}

/// Wires stores, triggers and the controller, and runs until `shutdown` turns true. `dra`:
/// whether DRA devices are quarantined instead of cordoning their node (docs/design.md §5), and why.
pub async fn run(
    client: Client,
    identity: String,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    dra: dra::Support,
) {
    // Readiness: each of the three reflectors reports its first complete list (InitDone) as it
    // passes through. Not `Store::wait_until_ready`: its DelayedInit keeps one waker only, and
    // the controller's runner waits on the wedge store's too, so a second waiter there could be
    // left asleep forever (which kept replicas at 503).
    let (synced_tx, mut synced_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let (wedge_store, wedge_writer) = reflector::store::<GpuWedge>();
    let wedge_writes = Arc::new(crate::writes::Writes::<GpuWedge>::default());
    let seen = wedge_writes.clone();
    let admission = Arc::new(tokio::sync::Notify::new());
    let waiting = admission.clone();
    let wedge_stream = reflector::reflector(
        wedge_writer,
        watcher(
            Api::<GpuWedge>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(drop_managed_fields),
    )
    .default_backoff()
    .inspect(synced(&synced_tx, "wedges"))
    .inspect(move |ev| match ev {
        Ok(watcher::Event::Apply(w) | watcher::Event::InitApply(w)) => {
            seen.seen(w);
            if super::admission::waits(w, jiff::Timestamp::now()) {
                waiting.notify_one();
            }
        }
        Ok(watcher::Event::Delete(w)) => seen.forget(Some(&w.name_any())),
        Ok(watcher::Event::Init) => seen.forget(None),
        _ => {}
    })
    .applied_objects();
    // Unbounded here; the API work is bounded by `Ctx::permits` (RECONCILE_CONCURRENCY).
    let controller = Controller::for_stream(wedge_stream, wedge_store.clone());
    let by_node = {
        let s = wedge_store.clone();
        move |node: String| -> Vec<ObjectRef<GpuWedge>> {
            s.state()
                .iter()
                .filter(|w| w.spec.node_name == node && open(w))
                .map(|w| ObjectRef::from_obj(&**w))
                .collect()
        }
    };
    // A pod's change matters only to the wedges of its node whose decision reads pods.
    let by_node_p = {
        let s = wedge_store.clone();
        move |node: String| -> Vec<ObjectRef<GpuWedge>> {
            s.state()
                .iter()
                .filter(|w| w.spec.node_name == node && open(w) && decide::reads_pods(w))
                .map(|w| ObjectRef::from_obj(&**w))
                .collect()
        }
    };
    // Nodes and policies are reflected by their own tasks, so their stores sync (and readiness
    // follows) whatever the controller is doing; each change is handed to the controller as
    // reconcile requests for the wedges it concerns.
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded::<ObjectRef<GpuWedge>>();
    let (nodes_store, nodes_writer) = reflector::store::<Node>();
    let node_writes = Arc::new(crate::writes::Writes::<Node>::default());
    let nodes_task = {
        let tx = trigger_tx.clone();
        let writes = node_writes.clone();
        let mut shapes: BTreeMap<String, wake::NodeShape> = BTreeMap::new();
        tokio::spawn(
            reflector::reflector(
                nodes_writer,
                watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                    .modify(crate::node_cache::trim),
            )
            .default_backoff()
            .inspect(synced(&synced_tx, "nodes"))
            .for_each(move |ev| {
                let changed = match ev {
                    Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => {
                        writes.seen(&n);
                        let shape = wake::NodeShape::of(&n);
                        let name = n.name_any();
                        let holder = n.annotations().get(ANN_CORDONED_BY).cloned();
                        (shapes.insert(name.clone(), shape.clone()) != Some(shape))
                            .then_some((name, holder))
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        writes.forget(Some(&n.name_any()));
                        shapes.remove(&n.name_any());
                        Some((n.name_any(), None))
                    }
                    Ok(watcher::Event::Init) => {
                        writes.forget(None);
                        None
                    }
                    Ok(watcher::Event::InitDone) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "node watch failed; retrying");
                        None
                    }
                };
                if let Some((node, holder)) = changed {
                    for w in by_node(node) {
                        let _ = tx.unbounded_send(w);
                    }
                    // The wedge the cordon names, open or not: a wedge that finished just as
                    // the cordon was handed to it must lift (or hand on) the cordon now, not at
                    // its next timer (the node's open wedges alone would not wake it).
                    if let Some(h) = holder {
                        let _ = tx.unbounded_send(ObjectRef::new(&h));
                    }
                }
                std::future::ready(())
            }),
        )
    };
    let (policy_store, policy_writer) = reflector::store::<RecoveryPolicy>();
    let retry_tx = trigger_tx.clone();
    let policies_task = {
        let wedges = wedge_store.clone();
        let ledger_changed = admission.clone();
        let mut seen: BTreeMap<String, wake::PolicySeen> = BTreeMap::new();
        tokio::spawn(
            reflector::reflector(
                policy_writer,
                watcher(
                    Api::<RecoveryPolicy>::all(client.clone()),
                    watcher::Config::default(),
                )
                .modify(drop_managed_fields),
            )
            .default_backoff()
            .inspect(synced(&synced_tx, "policies"))
            .for_each(move |ev| {
                let (name, now) = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        (p.name_any(), Some(wake::PolicySeen::of(&p)))
                    }
                    Ok(watcher::Event::Delete(p)) => (p.name_any(), None),
                    // A re-list may have missed deletions: look at everything again.
                    Ok(watcher::Event::InitDone) => (String::new(), None),
                    Ok(watcher::Event::Init) => return std::future::ready(()),
                    Err(e) => {
                        tracing::warn!(error = %e, "RecoveryPolicy watch failed; retrying");
                        return std::future::ready(());
                    }
                };
                let before = match &now {
                    Some(n) => seen.insert(name.clone(), n.clone()),
                    None => seen.remove(&name),
                };
                // A place given back (or a limit raised) lets the next waiting wedges in.
                ledger_changed.notify_one();
                let open: Vec<Arc<GpuWedge>> =
                    wedges.state().into_iter().filter(|w| open(w)).collect();
                let targets: Vec<ObjectRef<GpuWedge>> =
                    match wake::on_policy_change(&name, before.as_ref(), now.as_ref(), &open) {
                        wake::Wake::All => open.iter().map(|w| ObjectRef::from_obj(&**w)).collect(),
                        wake::Wake::Some(names) => {
                            names.iter().map(|n| ObjectRef::new(n)).collect()
                        }
                    };
                for w in targets {
                    let _ = trigger_tx.unbounded_send(w);
                }
                std::future::ready(())
            }),
        )
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "unwedge-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        wedges: wedge_store.clone(),
        nodes: nodes_store.clone(),
        policies: policy_store.clone(),
        recorder,
        identity,
        metrics: metrics.clone(),
        leader: leader.clone(),
        dra,
        permits: tokio::sync::Semaphore::new(RECONCILE_CONCURRENCY),
        admitted_permits: tokio::sync::Semaphore::new(RECONCILE_CONCURRENCY / 2),
        events: Arc::new(tokio::sync::Semaphore::new(super::EVENTS_IN_FLIGHT)),
        node_writes,
        wedge_writes,
        admission,
        turns: Default::default(),
    });
    tokio::spawn(super::admission::run(
        ctx.clone(),
        retry_tx,
        shutdown.clone(),
    ));
    // Re-examine every wedge (after repairing the ledgers) whenever we become leader.
    let became_leader = futures::stream::unfold(
        (leader.clone(), client.clone()),
        |(mut rx, client)| async move {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                if *rx.borrow_and_update() {
                    if let Err(e) = repair_ledgers(&client).await {
                        tracing::warn!(error = %e, "ledger repair failed; it runs again on the next leadership change");
                    }
                    return Some(((), (rx, client)));
                }
            }
        },
    );
    let refresher = {
        let ctx = ctx.clone();
        let mut sd = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = sd.changed() => return,
                }
                if let Err(e) = refresh(&ctx).await {
                    tracing::warn!(error = %e, "refresh of policy status and gauges failed");
                }
                if let Err(e) = repair_from_store(&ctx).await {
                    tracing::warn!(error = %e, "ledger repair failed; it runs again at the next refresh");
                }
                if let Err(e) = release_orphan_cordons(&ctx).await {
                    tracing::warn!(error = %e, "releasing cordons of wedges that are gone failed; it runs again at the next refresh");
                }
            }
        }
    };
    drop(synced_tx);
    let readiness = {
        let m = metrics.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            while let Some(what) = synced_rx.recv().await {
                seen.insert(what);
                if seen.len() == 3 {
                    tracing::info!("nodes, policies and wedges listed: ready");
                    m.set_ready();
                    return;
                }
            }
        }
    };
    tokio::spawn(readiness);
    tokio::spawn(refresher);
    let stop = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
    };
    drop(wedge_store);
    controller
        .reconcile_on(trigger_rx)
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |p: Pod| {
                p.spec
                    .and_then(|s| s.node_name)
                    .map(&by_node_p)
                    .unwrap_or_default()
            },
        )
        .reconcile_all_on(became_leader)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    nodes_task.abort();
    policies_task.abort();
}
