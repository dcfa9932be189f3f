//! Objects as this operator last wrote them, until their watch shows that write: Nodes (the
//! cordon, the uncordon, the `GpuWedged` condition) and GpuWedges (the status, the finalizer).
//!
//! A write wakes the wedge again within milliseconds, often before the watch delivers the write
//! itself. Decided on the cache, that reconcile took a node it had just cordoned for
//! uncordoned behind its back and cordoned it again (a second PATCH and a `Recordoned` warning
//! per wedge in the storm), wrote the node's condition twice, and wrote a wedge's status over
//! the copy before its own last write (a refused write and two GETs). A write of ours is the
//! newest state of the object until the watch delivers it (watch events come in order):
//! [`Writes::newest`] answers with it meanwhile. An entry also expires after [`TTL`], so a
//! re-list that skipped our version cannot leave it standing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};

/// How long a write is preferred to the cache at most.
pub const TTL: Duration = Duration::from_secs(1);

/// What is remembered of one kind of object.
struct State<K> {
    /// Our writes not yet seen on the watch, by name, with when they were made.
    written: HashMap<String, (Arc<K>, Instant)>,
    /// Names with a write on its way, and the versions the watch delivered meanwhile (a
    /// watch event can come before the answer to the write it shows).
    sending: HashMap<String, Vec<String>>,
}

/// Versions remembered per write on its way.
const SEEN_WHILE_SENDING: usize = 16;

/// Objects (cluster-scoped, by name) written by this process and not yet seen on the watch.
pub struct Writes<K>(Mutex<State<K>>);

impl<K> Default for Writes<K> {
    fn default() -> Self {
        Self(Mutex::new(State {
            written: HashMap::new(),
            sending: HashMap::new(),
        }))
    }
}

impl<K: Resource> Writes<K> {
    fn state(&self) -> std::sync::MutexGuard<'_, State<K>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A write of `name` is about to be sent: what the watch delivers of it meanwhile is noted.
    pub fn sending(&self, name: &str) {
        self.state().sending.entry(name.to_string()).or_default();
    }

    /// Records `n` as the API server returned it after our write (a Node trimmed like the
    /// cache first: [`crate::node_cache::trim`]), unless the watch already delivered it.
    pub fn wrote(&self, n: K) {
        let name = n.name_any();
        let mut st = self.state();
        let delivered = st.sending.remove(&name).is_some_and(|seen| {
            seen.iter()
                .any(|v| Some(v) == n.resource_version().as_ref())
        });
        if delivered {
            st.written.remove(&name);
        } else {
            st.written.insert(name, (Arc::new(n), Instant::now()));
        }
    }

    /// The watch delivered `n`: a write of ours with its version is in the cache now.
    pub fn seen(&self, n: &K) {
        let name = n.name_any();
        let mut st = self.state();
        if st
            .written
            .get(&name)
            .is_some_and(|(w, _)| w.resource_version() == n.resource_version())
        {
            st.written.remove(&name);
        }
        if let (Some(seen), Some(v)) = (st.sending.get_mut(&name), n.resource_version()) {
            if seen.len() >= SEEN_WHILE_SENDING {
                seen.remove(0);
            }
            seen.push(v);
        }
    }

    /// The node is gone, or the watch starts over: forget what we wrote (`None`: every node).
    pub fn forget(&self, node: Option<&str>) {
        let mut st = self.state();
        match node {
            Some(n) => {
                st.written.remove(n);
            }
            None => {
                st.written.clear();
                st.sending.clear();
            }
        }
    }

    /// Our write of `node` if the watch has not shown it yet, else `cached`.
    pub fn newest(&self, node: &str, cached: Option<Arc<K>>) -> Option<Arc<K>> {
        let mut st = self.state();
        match st.written.get(node) {
            Some((n, at)) if at.elapsed() < TTL => Some(n.clone()),
            Some(_) => {
                st.written.remove(node);
                cached
            }
            None => cached,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;

    fn node(rv: &str, unschedulable: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gpu-1", "resourceVersion": rv},
            "spec": {"unschedulable": unschedulable}
        }))
        .unwrap()
    }

    fn unschedulable(n: Option<Arc<Node>>) -> Option<bool> {
        n.and_then(|n| n.spec.as_ref().and_then(|s| s.unschedulable))
    }

    #[test]
    fn a_write_is_newest_until_the_watch_shows_its_version() {
        let w = Writes::<Node>::default();
        let cached = Some(Arc::new(node("1", false)));
        w.wrote(node("2", true));
        assert_eq!(unschedulable(w.newest("gpu-1", cached.clone())), Some(true));
        w.seen(&node("1", false));
        assert_eq!(
            unschedulable(w.newest("gpu-1", cached.clone())),
            Some(true),
            "an older event"
        );
        w.seen(&node("2", true));
        assert_eq!(
            unschedulable(w.newest("gpu-1", cached.clone())),
            Some(false),
            "ours is in the cache now: the cache answers"
        );
        w.wrote(node("3", true));
        w.forget(None);
        assert_eq!(unschedulable(w.newest("gpu-1", cached)), Some(false));
        assert!(w.newest("other", None).is_none());
    }

    #[test]
    fn a_write_the_watch_delivered_before_its_answer_is_not_kept() {
        let w = Writes::<Node>::default();
        let cached = Some(Arc::new(node("5", false)));
        w.sending("gpu-1");
        w.seen(&node("4", true));
        w.seen(&node("5", false));
        w.wrote(node("4", true));
        assert_eq!(
            unschedulable(w.newest("gpu-1", cached)),
            Some(false),
            "the cache holds our write and a newer one"
        );
    }
}
