//! `--watch`: what changed since the last print.

use std::collections::BTreeMap;

use kube::Resource;
use kube::runtime::watcher;

/// What a watch saw change, to print.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<K> {
    /// Created or changed: its state now.
    Applied(K),
    /// Deleted: its last state.
    Deleted(K),
}

/// The objects a watch has printed, so that the watcher's own re-lists (at its start and after
/// a lost connection) print only what changed, as `kubectl get -w` does.
#[derive(Clone, Debug)]
pub struct Watch<K> {
    known: BTreeMap<String, K>,
    relist: Option<BTreeMap<String, K>>,
}

impl<K: Resource + Clone> Watch<K> {
    /// Starts from the objects already printed.
    pub fn new(printed: Vec<K>) -> Self {
        let known = printed
            .into_iter()
            .map(|o| (o.meta().name.clone().unwrap_or_default(), o))
            .collect();
        Watch {
            known,
            relist: None,
        }
    }

    /// Every object as last seen.
    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.known.values()
    }

    /// Takes one watcher event; returns the changes to print.
    pub fn on(&mut self, event: watcher::Event<K>) -> Vec<Change<K>> {
        match event {
            watcher::Event::Apply(o) => self.apply(o).into_iter().collect(),
            watcher::Event::Delete(o) => {
                let name = o.meta().name.clone().unwrap_or_default();
                self.known.remove(&name);
                vec![Change::Deleted(o)]
            }
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                let name = o.meta().name.clone().unwrap_or_default();
                self.relist.get_or_insert_default().insert(name, o);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let mut out: Vec<Change<K>> = self
                    .known
                    .iter()
                    .filter(|(name, _)| !listed.contains_key(*name))
                    .map(|(_, o)| Change::Deleted(o.clone()))
                    .collect();
                for name in out.iter().filter_map(|c| match c {
                    Change::Deleted(o) => o.meta().name.clone(),
                    Change::Applied(_) => None,
                }) {
                    self.known.remove(&name);
                }
                for o in listed.into_values() {
                    out.extend(self.apply(o));
                }
                out
            }
        }
    }

    fn apply(&mut self, o: K) -> Option<Change<K>> {
        let name = o.meta().name.clone().unwrap_or_default();
        let same = self.known.get(&name).is_some_and(|k| {
            k.meta().resource_version.is_some()
                && k.meta().resource_version == o.meta().resource_version
        });
        self.known.insert(name, o.clone());
        (!same).then_some(Change::Applied(o))
    }
}
