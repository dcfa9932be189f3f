//! One turn per wedge: the controller's reconcile and the admission pass
//! (`reconciler::admission`) never decide on, or act for, the same wedge at once.
//!
//! The controller alone already runs one reconcile per wedge at a time; the admission pass acts
//! for waiting wedges outside it. Whoever holds a wedge's [`Turn`] decides and acts; the other
//! waits for it (the reconcile) or leaves the wedge to it (the pass).

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// The wedges being decided on or acted for now, by name.
#[derive(Default)]
pub struct Turns {
    busy: Mutex<HashSet<String>>,
    freed: Notify,
}

/// A wedge's turn, given back when dropped.
pub struct Turn<'a> {
    turns: &'a Turns,
    name: String,
}

impl Turns {
    fn busy(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The turn of wedge `name`, unless somebody holds it.
    pub fn try_take(&self, name: &str) -> Option<Turn<'_>> {
        self.busy().insert(name.to_string()).then(|| Turn {
            turns: self,
            name: name.to_string(),
        })
    }

    /// Waits until nobody holds the turn of wedge `name` (without taking it).
    pub async fn free(&self, name: &str) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.busy().contains(name) {
                return;
            }
            freed.await;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turns.busy().remove(&self.name);
        self.turns.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_turn_is_held_once_and_waited_for() {
        let turns = Turns::default();
        let held = turns.try_take("w").expect("free at first");
        assert!(turns.try_take("w").is_none(), "held: not given twice");
        assert!(
            turns.try_take("v").is_some(),
            "another wedge's turn is its own"
        );
        let waiter = turns.free("w");
        tokio::pin!(waiter);
        assert!(
            futures::poll!(waiter.as_mut()).is_pending(),
            "waits while it is held"
        );
        drop(held);
        waiter.await;
        assert!(turns.try_take("w").is_some(), "given back when dropped");
    }
}
