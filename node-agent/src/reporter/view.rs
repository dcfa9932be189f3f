//! The node's GpuWedges as the agent knows them without asking the API server: the store of its
//! own watch (label `unwedge.io/node=<node>`), overlaid with what its own requests returned
//! (the objects it created or patched, the lists it made) until the watch has caught up.
//!
//! The overlay is what keeps "one open incident per device" with a watch that lags: the agent
//! is the only writer of its node's new wedges and reports one detection at a time (the
//! outbox's replayer), so every wedge it could collide with was either in the watch's first
//! list or written by itself, and is in the store or the overlay. An object that changed or
//! went away since (closed by the operator, deleted) is caught by the write that relies on
//! it: the reporter's event append carries the resourceVersion it read, a create names a
//! deterministic object, and a refusal sends the reporter back to a LIST.
//!
//! [`merge`] and [`prune`] are pure; [`WedgeView`] only holds the store and the overlay.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use unwedge_crds::GpuWedge;
use unwedge_crds::labels::{LABEL_DEVICE, LABEL_NODE, device_label};

/// What one of the agent's own requests said about a wedge, newer than the store when the
/// request answered.
#[derive(Clone, Debug)]
pub enum Known {
    /// The object as a create, patch or list returned it.
    Present(Box<GpuWedge>),
    /// Gone: absent from a list at this resourceVersion, or a write answered 404.
    Gone(u64),
}

/// The resourceVersion as a number (etcd's revision); `None` when the API server does not
/// give one that is (the view is then not used: every check LISTs).
pub fn revision(w: &GpuWedge) -> Option<u64> {
    w.metadata.resource_version.as_deref()?.parse().ok()
}

/// Whether `w` carries the labels of `node`'s device `pci`.
pub fn of_device(w: &GpuWedge, node: &str, pci: &str) -> bool {
    let labels = w.labels();
    labels.get(LABEL_NODE).map(String::as_str) == Some(node)
        && labels.get(LABEL_DEVICE) == Some(&device_label(pci))
}

/// The wedges by name: the store's, replaced by the overlay's where the overlay is newer, and
/// without those the overlay knows are gone. `None` when a resourceVersion is not a number.
pub fn merge(store: &[GpuWedge], own: &BTreeMap<String, Known>) -> Option<Vec<GpuWedge>> {
    let mut out: BTreeMap<String, GpuWedge> = BTreeMap::new();
    for w in store {
        revision(w)?;
        out.insert(w.name_any(), w.clone());
    }
    for (name, k) in own {
        let stored = match out.get(name) {
            Some(w) => Some(revision(w)?),
            None => None,
        };
        match k {
            Known::Present(w) => {
                let rv = revision(w)?;
                if stored.is_none_or(|s| s < rv) {
                    out.insert(name.clone(), (**w).clone());
                }
            }
            Known::Gone(rv) => {
                if stored.is_some_and(|s| s <= *rv) {
                    out.remove(name);
                }
            }
        }
    }
    Some(out.into_values().collect())
}

/// Drops the overlay entries the store has caught up with: everything at or below `progress`
/// (the newest resourceVersion the watch has delivered, deletions included: the store then
/// holds that state, or the object is gone), an object the store holds at the same or a newer
/// resourceVersion, a deletion the store has seen (or that a newer object of the same name
/// replaced).
pub fn prune(store: &[GpuWedge], own: &mut BTreeMap<String, Known>, progress: u64) {
    let stored: BTreeMap<String, Option<u64>> =
        store.iter().map(|w| (w.name_any(), revision(w))).collect();
    own.retain(|name, k| match (k, stored.get(name)) {
        (Known::Present(w), _) if revision(w).is_some_and(|rv| rv <= progress) => false,
        (Known::Gone(rv), _) if *rv <= progress => false,
        (Known::Present(w), Some(Some(s))) => revision(w).is_none_or(|rv| *s < rv),
        (Known::Present(_), _) => true,
        (Known::Gone(_), None) => false,
        (Known::Gone(rv), Some(s)) => s.is_none_or(|s| s <= *rv),
    });
}

/// The overlay after an authoritative LIST of one device's wedges at resourceVersion `list_rv`:
/// every listed object, and every other object of that device the store or overlay holds,
/// gone.
pub fn listed(
    store: &[GpuWedge],
    own: &mut BTreeMap<String, Known>,
    node: &str,
    pci: &str,
    items: &[GpuWedge],
    list_rv: Option<u64>,
) {
    let names: Vec<String> = items.iter().map(|w| w.name_any()).collect();
    let mut stale: Vec<String> = store
        .iter()
        .filter(|w| of_device(w, node, pci))
        .map(|w| w.name_any())
        .collect();
    stale.extend(
        own.iter()
            .filter(|(_, k)| match k {
                Known::Present(w) => of_device(w, node, pci),
                Known::Gone(_) => false,
            })
            .map(|(n, _)| n.clone()),
    );
    match list_rv {
        Some(rv) => {
            for n in stale.into_iter().filter(|n| !names.contains(n)) {
                own.insert(n, Known::Gone(rv));
            }
        }
        None => own.retain(|n, _| !stale.contains(n)),
    }
    for w in items {
        own.insert(w.name_any(), Known::Present(Box::new(w.clone())));
    }
}

/// The node's wedges from the agent's watch, and what its own requests learnt since.
#[derive(Clone)]
pub struct WedgeView {
    store: Store<GpuWedge>,
    own: Arc<Mutex<BTreeMap<String, Known>>>,
    progress: Arc<AtomicU64>,
}

impl WedgeView {
    /// A view over the store of the watch of this node's wedges.
    pub fn new(store: Store<GpuWedge>) -> Self {
        Self {
            store,
            own: Arc::default(),
            progress: Arc::default(),
        }
    }

    /// Records that the store holds what the watch delivered up to resourceVersion `rv` (an
    /// object added, changed or deleted, or a whole list, once applied to the store).
    pub fn delivered(&self, rv: Option<u64>) {
        if let Some(rv) = rv {
            self.progress.fetch_max(rv, Ordering::Relaxed);
        }
    }

    fn own(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the watch has delivered its first list.
    pub fn synced(&self) -> bool {
        matches!(self.store.wait_until_ready().now_or_never(), Some(Ok(())))
    }

    /// The wedges of `node`'s device `pci`; `None` until the watch has synced (or when a
    /// resourceVersion is not a number): the caller then LISTs.
    pub fn device(&self, node: &str, pci: &str) -> Option<Vec<GpuWedge>> {
        if !self.synced() {
            return None;
        }
        let store: Vec<GpuWedge> = self.store.state().iter().map(|w| (**w).clone()).collect();
        let mut own = self.own();
        prune(&store, &mut own, self.progress.load(Ordering::Relaxed));
        let all = merge(&store, &own)?;
        Some(
            all.into_iter()
                .filter(|w| of_device(w, node, pci))
                .collect(),
        )
    }

    /// All the node's wedges, for the rescan after lost uevents; `None` until synced.
    pub fn all(&self) -> Option<Vec<GpuWedge>> {
        if !self.synced() {
            return None;
        }
        let store: Vec<GpuWedge> = self.store.state().iter().map(|w| (**w).clone()).collect();
        let mut own = self.own();
        prune(&store, &mut own, self.progress.load(Ordering::Relaxed));
        merge(&store, &own)
    }

    /// Records an object one of the agent's own requests returned.
    pub fn saw(&self, w: &GpuWedge) {
        if revision(w).is_some() {
            self.own()
                .insert(w.name_any(), Known::Present(Box::new(w.clone())));
        }
    }

    /// Records an authoritative LIST of one device's wedges.
    pub fn listed(&self, node: &str, pci: &str, items: &[GpuWedge], list_rv: Option<u64>) {
        let store: Vec<GpuWedge> = self.store.state().iter().map(|w| (**w).clone()).collect();
        listed(&store, &mut self.own(), node, pci, items, list_rv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporter::{DetectedWedge, build_wedge};
    use unwedge_crds::{DeviceRef, GpuWedgeStatus, Phase};

    fn wedge(name: &str, pci: &str, rv: u64, phase: Option<Phase>) -> GpuWedge {
        let device = DeviceRef {
            pci_address: pci.into(),
            ..DeviceRef::default()
        };
        let at = "2026-11-25T10:00:00Z".parse().unwrap();
        let d = DetectedWedge::from_uevent("node-a", device, "rebind", Some(1), at, "boot-1");
        let mut w = build_wedge(&d, name, None);
        w.metadata.resource_version = Some(rv.to_string());
        w.status = Some(GpuWedgeStatus {
            phase,
            ..GpuWedgeStatus::default()
        });
        w
    }

    fn names(ws: &[GpuWedge]) -> Vec<(String, String)> {
        ws.iter()
            .map(|w| {
                (
                    w.name_any(),
                    w.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    const PCI: &str = "0000:03:00.0";

    #[test]
    fn an_own_create_the_watch_has_not_delivered_is_seen() {
        let store = vec![wedge("a", PCI, 10, Some(Phase::Recovered))];
        let own = BTreeMap::from([(
            "b".to_string(),
            Known::Present(Box::new(wedge("b", PCI, 12, None))),
        )]);
        assert_eq!(
            names(&merge(&store, &own).unwrap()),
            [("a".into(), "10".into()), ("b".into(), "12".into())]
        );
    }

    #[test]
    fn the_newer_of_store_and_overlay_wins() {
        let own = BTreeMap::from([(
            "a".to_string(),
            Known::Present(Box::new(wedge("a", PCI, 12, Some(Phase::Recovered)))),
        )]);
        let older = vec![wedge("a", PCI, 11, None)];
        let newer = vec![wedge("a", PCI, 13, None)];
        assert_eq!(
            names(&merge(&older, &own).unwrap()),
            [("a".into(), "12".into())]
        );
        assert_eq!(
            names(&merge(&newer, &own).unwrap()),
            [("a".into(), "13".into())]
        );
    }

    #[test]
    fn a_deletion_hides_the_store_copy_until_a_newer_object_of_the_name() {
        let own = BTreeMap::from([("a".to_string(), Known::Gone(20))]);
        assert!(
            merge(&[wedge("a", PCI, 15, None)], &own)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            names(&merge(&[wedge("a", PCI, 21, None)], &own).unwrap()),
            [("a".into(), "21".into())]
        );
    }

    #[test]
    fn a_resource_version_that_is_not_a_number_disables_the_view() {
        let mut w = wedge("a", PCI, 1, None);
        w.metadata.resource_version = Some("opaque".into());
        assert!(merge(&[w], &BTreeMap::new()).is_none());
    }

    #[test]
    fn pruning_keeps_only_what_the_store_has_not_caught_up_with() {
        let mut own = BTreeMap::from([
            (
                "a".to_string(),
                Known::Present(Box::new(wedge("a", PCI, 12, None))),
            ),
            (
                "b".to_string(),
                Known::Present(Box::new(wedge("b", PCI, 12, None))),
            ),
            ("c".to_string(), Known::Gone(12)),
            ("d".to_string(), Known::Gone(12)),
            (
                "e".to_string(),
                Known::Present(Box::new(wedge("e", PCI, 12, None))),
            ),
        ]);
        let store = vec![
            wedge("a", PCI, 12, None),
            wedge("b", PCI, 11, None),
            wedge("d", PCI, 11, None),
        ];
        let mut later = own.clone();
        prune(&store, &mut own, 11);
        assert_eq!(
            own.keys().cloned().collect::<Vec<_>>(),
            ["b", "d", "e"],
            "a caught up, c's deletion seen; b, d and e not yet"
        );
        // Once the watch has delivered revision 12, e (absent from the store) was deleted.
        prune(&store, &mut later, 12);
        assert!(later.is_empty(), "{later:?}");
    }

    #[test]
    fn a_list_replaces_what_was_known_of_its_device_only() {
        let other = "0000:04:00.0";
        let store = vec![
            wedge("gone", PCI, 5, None),
            wedge("kept", PCI, 6, None),
            wedge("x", other, 7, None),
        ];
        let mut own = BTreeMap::from(
            [("mine", wedge("mine", PCI, 8, None))]
                .map(|(n, w)| (n.to_string(), Known::Present(Box::new(w)))),
        );
        let items = vec![wedge("kept", PCI, 9, Some(Phase::Recovered))];
        listed(&store, &mut own, "node-a", PCI, &items, Some(10));
        let got = merge(&store, &own).unwrap();
        assert_eq!(
            names(&got),
            [("kept".into(), "9".into()), ("x".into(), "7".into())]
        );
    }
}
