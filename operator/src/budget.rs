//! Budget arithmetic: how many nodes, reboots, DRA devices and `none` eviction rounds may be
//! in use at once, and whether one more wedge fits.
//!
//! Pure. The ledger module feeds it a ledger read fresh from the API and writes the result
//! back with a compare-and-swap, so the arithmetic here is the whole admission rule.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use unwedge_crds::{Admission, BudgetLimit, BudgetUnit};

use crate::settings::Settings;

pub use unwedge_crds::budget::{Usage, usage};

/// Resolves an int-or-percent against `total` ([`unwedge_crds::budget::resolve_limit`]). An
/// invalid value (negative, over 100 %, not a percentage; the CRD refuses them) allows none:
/// failing closed is safe.
pub fn resolve(value: &IntOrString, total: u32) -> u32 {
    unwedge_crds::budget::resolve_limit(value, total).unwrap_or(0)
}

/// The limits of one policy, resolved against its current size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Nodes under recovery at once.
    pub nodes: u32,
    /// Reboots at once.
    pub reboots: u32,
    /// DRA devices quarantined at once.
    pub devices: u32,
    /// `none` eviction rounds at once.
    pub none: u32,
}

impl Limits {
    /// Resolves a policy's limits for `nodes_selected` nodes and `devices_selected` DRA devices.
    pub fn of(settings: &Settings, nodes_selected: u32, devices_selected: u32) -> Limits {
        Limits {
            nodes: resolve(&settings.max_unavailable, nodes_selected),
            reboots: settings.max_concurrent_reboots,
            devices: resolve(&settings.max_unavailable_devices, devices_selected),
            none: settings.none_max_concurrent,
        }
    }
}

/// What a wedge asks of the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The GpuWedge.
    pub wedge: String,
    /// Its node.
    pub node: String,
    /// The unit it spends.
    pub unit: BudgetUnit,
    /// Whether it (now) needs a reboot slot too.
    pub reboot: bool,
}

impl Candidate {
    /// Its entry in a ledger.
    pub fn admission(&self) -> Admission {
        Admission {
            wedge: self.wedge.clone(),
            node: self.node.clone(),
            unit: self.unit,
            reboot: self.reboot,
        }
    }
}

/// Why a wedge waits: in the words `kubectl get gw` shows (`2/2 nodes under recovery`), and
/// the limit it waits for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueueReason(pub String, pub BudgetLimit);

/// A one-line summary for the policy status, e.g. `2/5 nodes, 0/1 reboots, 3 queued`.
pub fn summary(ledger: &[Admission], limits: &Limits, queued: usize) -> String {
    let u = usage(ledger);
    format!(
        "{}/{} nodes, {}/{} reboots, {}/{} none, {} queued",
        u.nodes, limits.nodes, u.reboots, limits.reboots, u.none, limits.none, queued
    )
}

/// Admits `candidate` into `ledger` if it fits, first come first served.
///
/// `waiting_ahead` are the wedges that wait for the same unit and arrived earlier (by
/// `spec.detectedAt`, then name), as `(wedge, node)`; they keep their turn, so a later wedge
/// only takes what is left after them. Returns the new ledger, or why the candidate waits.
/// A candidate already in the ledger is kept (and upgraded to a reboot if it asks for one).
pub fn admit(
    ledger: &[Admission],
    candidate: &Candidate,
    limits: &Limits,
    waiting_ahead: &[(String, String)],
) -> Result<Vec<Admission>, QueueReason> {
    let u = usage(ledger);
    let ahead_unadmitted: Vec<&(String, String)> = waiting_ahead
        .iter()
        .filter(|(w, _)| *w != candidate.wedge && !ledger.iter().any(|a| &a.wedge == w))
        .collect();
    if let Some(pos) = ledger.iter().position(|a| a.wedge == candidate.wedge) {
        if ledger[pos].unit != candidate.unit {
            // A re-planned wedge (a `none` that became a recovery) trades its unit: it is
            // admitted afresh for the new one.
            return admit(
                &release(ledger, &candidate.wedge),
                candidate,
                limits,
                waiting_ahead,
            );
        }
        let held = &ledger[pos];
        if candidate.reboot && !held.reboot {
            if u.reboots >= limits.reboots {
                return Err(QueueReason(
                    format!("{}/{} reboots in progress", u.reboots, limits.reboots),
                    BudgetLimit::Reboots,
                ));
            }
            let mut out = ledger.to_vec();
            out[pos].reboot = true;
            return Ok(out);
        }
        return Ok(ledger.to_vec());
    }
    match candidate.unit {
        BudgetUnit::Node => {
            let node_held = ledger
                .iter()
                .any(|a| a.unit == BudgetUnit::Node && a.node == candidate.node);
            if !node_held {
                // Earlier arrivals on nodes not yet held each need a node of their own.
                let ahead_nodes: BTreeSet<&str> = ahead_unadmitted
                    .iter()
                    .map(|(_, n)| n.as_str())
                    .filter(|n| {
                        *n != candidate.node
                            && !ledger
                                .iter()
                                .any(|a| a.node == *n && a.unit == BudgetUnit::Node)
                    })
                    .collect();
                if u.nodes + ahead_nodes.len() as u32 >= limits.nodes {
                    return Err(QueueReason(
                        queue_text(
                            u.nodes,
                            limits.nodes,
                            "nodes under recovery",
                            ahead_nodes.len(),
                        ),
                        BudgetLimit::Nodes,
                    ));
                }
            }
        }
        BudgetUnit::Device => {
            if u.devices + ahead_unadmitted.len() as u32 >= limits.devices {
                return Err(QueueReason(
                    queue_text(
                        u.devices,
                        limits.devices,
                        "devices quarantined",
                        ahead_unadmitted.len(),
                    ),
                    BudgetLimit::Devices,
                ));
            }
        }
        BudgetUnit::None => {
            if u.none + ahead_unadmitted.len() as u32 >= limits.none {
                return Err(QueueReason(
                    queue_text(
                        u.none,
                        limits.none,
                        "none evictions in progress",
                        ahead_unadmitted.len(),
                    ),
                    BudgetLimit::NoneEvictions,
                ));
            }
        }
    }
    if candidate.reboot && u.reboots >= limits.reboots {
        return Err(QueueReason(
            format!("{}/{} reboots in progress", u.reboots, limits.reboots),
            BudgetLimit::Reboots,
        ));
    }
    let mut out = ledger.to_vec();
    out.push(candidate.admission());
    Ok(out)
}

fn queue_text(used: u32, limit: u32, what: &str, ahead: usize) -> String {
    if ahead == 0 {
        format!("{used}/{limit} {what}")
    } else {
        format!("{used}/{limit} {what}, {ahead} queued ahead")
    }
}

/// Removes a wedge from a ledger (Recovered, Abandoned, or gone).
pub fn release(ledger: &[Admission], wedge: &str) -> Vec<Admission> {
    ledger
        .iter()
        .filter(|a| a.wedge != wedge)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pct(s: &str) -> IntOrString {
        IntOrString::String(s.into())
    }

    #[test]
    fn int_is_taken_as_is_and_percent_rounds_down_with_a_floor_of_one() {
        assert_eq!(resolve(&IntOrString::Int(2), 10), 2);
        assert_eq!(resolve(&IntOrString::Int(0), 10), 0);
        assert_eq!(
            resolve(&IntOrString::Int(5), 3),
            5,
            "an int is not capped by the node count"
        );
        assert_eq!(resolve(&pct("25%"), 10), 2, "2.5 rounds down");
        assert_eq!(resolve(&pct("10%"), 10), 1);
        assert_eq!(
            resolve(&pct("10%"), 5),
            1,
            "0.5 rounds down to 0, the floor makes it 1"
        );
        assert_eq!(resolve(&pct("1%"), 0), 1, "percent > 0 always allows one");
        assert_eq!(resolve(&pct("0%"), 100), 0, "0% allows none");
        assert_eq!(resolve(&pct("100%"), 7), 7);
        assert_eq!(resolve(&pct("50%"), 7), 3);
        assert_eq!(resolve(&pct("lots"), 7), 0, "malformed fails closed");
    }

    /// The shared edge-case table, through the operator's path: a policy spec, its settings with
    /// defaults applied, its limits for the nodes it selects. Invalid values allow none.
    #[test]
    fn the_shared_limit_cases_hold_for_the_operator() {
        for (value, total, allowed) in unwedge_crds::budget::LIMIT_CASES {
            let mut spec: unwedge_crds::RecoveryPolicySpec =
                serde_json::from_value(serde_json::json!({})).unwrap();
            spec.max_unavailable = value.field();
            let s = Settings::from_spec(&spec).unwrap();
            assert_eq!(
                Limits::of(&s, *total, 0).nodes,
                allowed.unwrap_or(0),
                "{value:?} of {total}"
            );
        }
    }

    fn limits(nodes: u32) -> Limits {
        Limits {
            nodes,
            reboots: 1,
            devices: 1,
            none: 1,
        }
    }

    fn cand(w: &str, n: &str) -> Candidate {
        Candidate {
            wedge: w.into(),
            node: n.into(),
            unit: BudgetUnit::Node,
            reboot: false,
        }
    }

    #[test]
    fn full_budget_queues_with_the_reason_users_see() {
        let l = admit(&[], &cand("a", "n1"), &limits(2), &[]).unwrap();
        let l = admit(&l, &cand("b", "n2"), &limits(2), &[]).unwrap();
        let e = admit(&l, &cand("c", "n3"), &limits(2), &[]).unwrap_err();
        assert_eq!(e.0, "2/2 nodes under recovery");
    }

    #[test]
    fn a_second_wedge_on_a_held_node_costs_nothing() {
        let l = admit(&[], &cand("a", "n1"), &limits(1), &[]).unwrap();
        let l = admit(&l, &cand("b", "n1"), &limits(1), &[]).unwrap();
        assert_eq!(usage(&l).nodes, 1);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn earlier_arrivals_keep_their_turn() {
        let ahead = vec![("early".to_string(), "n9".to_string())];
        let e = admit(&[], &cand("late", "n2"), &limits(1), &ahead).unwrap_err();
        assert_eq!(e.0, "0/1 nodes under recovery, 1 queued ahead");
        assert!(admit(&[], &cand("late", "n2"), &limits(2), &ahead).is_ok());
    }

    #[test]
    fn zero_allows_nothing() {
        assert!(admit(&[], &cand("a", "n1"), &limits(0), &[]).is_err());
    }

    #[test]
    fn reboots_have_their_own_limit_and_upgrade_in_place() {
        let l = admit(&[], &cand("a", "n1"), &limits(3), &[]).unwrap();
        let l = admit(&l, &cand("b", "n2"), &limits(3), &[]).unwrap();
        let mut up = cand("a", "n1");
        up.reboot = true;
        let l = admit(&l, &up, &limits(3), &[]).unwrap();
        assert!(l.iter().find(|a| a.wedge == "a").unwrap().reboot);
        let mut up_b = cand("b", "n2");
        up_b.reboot = true;
        assert_eq!(
            admit(&l, &up_b, &limits(3), &[]).unwrap_err().0,
            "1/1 reboots in progress"
        );
    }

    #[test]
    fn none_and_device_units_count_apart_from_nodes() {
        let none = Candidate {
            unit: BudgetUnit::None,
            ..cand("x", "n1")
        };
        let l = admit(&[], &none, &limits(0), &[]).unwrap();
        assert_eq!(usage(&l).nodes, 0);
        let none2 = Candidate {
            unit: BudgetUnit::None,
            ..cand("y", "n2")
        };
        assert_eq!(
            admit(&l, &none2, &limits(0), &[]).unwrap_err().0,
            "1/1 none evictions in progress"
        );
        let dev = Candidate {
            unit: BudgetUnit::Device,
            ..cand("d", "n3")
        };
        let l = admit(&l, &dev, &limits(0), &[]).unwrap();
        let dev2 = Candidate {
            unit: BudgetUnit::Device,
            ..cand("e", "n3")
        };
        assert_eq!(
            admit(&l, &dev2, &limits(0), &[]).unwrap_err().0,
            "1/1 devices quarantined"
        );
    }

    #[test]
    fn a_replanned_wedge_trades_its_unit() {
        let none = Candidate {
            unit: BudgetUnit::None,
            ..cand("a", "n1")
        };
        let l = admit(&[], &none, &limits(1), &[]).unwrap();
        let l = admit(&l, &cand("a", "n1"), &limits(1), &[]).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].unit, BudgetUnit::Node);
    }

    #[test]
    fn release_drops_only_that_wedge() {
        let l = admit(&[], &cand("a", "n1"), &limits(2), &[]).unwrap();
        let l = admit(&l, &cand("b", "n2"), &limits(2), &[]).unwrap();
        let l = release(&l, "a");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].wedge, "b");
    }

    /// What one step of the simulated cluster does.
    #[derive(Clone, Debug)]
    enum Op {
        /// The operator with this index reconciles the wedge with this index.
        Reconcile(usize, usize),
        /// A wedge finishes (Recovered or Abandoned) and is released.
        Finish(usize),
        /// The operator restarts: its cached view is reloaded from the stored ledger.
        Restart(usize),
        /// The other operator becomes leader.
        LeaderChange,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..2usize, 0..40usize).prop_map(|(o, w)| Op::Reconcile(o, w)),
            2 => (0..40usize).prop_map(Op::Finish),
            1 => (0..2usize).prop_map(Op::Restart),
            1 => Just(Op::LeaderChange),
        ]
    }

    proptest! {
        /// For random arrival orders, restarts, leader changes and policy sizes, the stored
        /// ledger never holds more nodes (or reboots) than the budget allows.
        #[test]
        fn admitted_never_exceeds_the_budget(
            nodes in 1u32..30,
            max in prop_oneof![
                (0i32..6).prop_map(IntOrString::Int),
                (0u32..=100).prop_map(|p| IntOrString::String(format!("{p}%"))),
            ],
            wedge_nodes in proptest::collection::vec(0u32..30, 1..40),
            reboot_flags in proptest::collection::vec(any::<bool>(), 40),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let limit = resolve(&max, nodes);
            let lim = Limits { nodes: limit, reboots: 1, devices: 1, none: 1 };
            // The API server's copy: (resourceVersion, ledger).
            let mut stored: (u64, Vec<Admission>) = (0, vec![]);
            // Each operator's possibly stale cache of the stored ledger.
            let mut cache = [stored.clone(), stored.clone()];
            let mut finished = vec![false; wedge_nodes.len()];
            let mut leader = 0usize;
            for o in ops {
                match o {
                    Op::Reconcile(who, w) => {
                        let w = w % wedge_nodes.len();
                        if finished[w] { continue; }
                        let c = Candidate {
                            wedge: format!("w{w}"),
                            node: format!("n{}", wedge_nodes[w] % nodes),
                            unit: BudgetUnit::Node,
                            reboot: reboot_flags[w],
                        };
                        // A follower (or a deposed leader with a stale cache) may still try:
                        // only the compare-and-swap protects the ledger.
                        let base = if who == leader { stored.clone() } else { cache[who].clone() };
                        let ahead: Vec<(String, String)> = (0..w)
                            .filter(|i| !finished[*i])
                            .map(|i| (format!("w{i}"), format!("n{}", wedge_nodes[i] % nodes)))
                            .collect();
                        // A stale resourceVersion is a 409 Conflict: the operator re-reads next time.
                        if let Ok(next) = admit(&base.1, &c, &lim, &ahead)
                            && base.0 == stored.0
                        {
                            stored = (stored.0 + 1, next);
                        }
                        cache[who] = stored.clone();
                    }
                    Op::Finish(w) => {
                        let w = w % wedge_nodes.len();
                        finished[w] = true;
                        stored = (stored.0 + 1, release(&stored.1, &format!("w{w}")));
                    }
                    Op::Restart(who) => cache[who] = stored.clone(),
                    Op::LeaderChange => leader = 1 - leader,
                }
                let u = usage(&stored.1);
                prop_assert!(u.nodes <= limit, "{} nodes held, budget {limit}: {:?}", u.nodes, stored.1);
                prop_assert!(u.reboots <= 1, "{} reboots held: {:?}", u.reboots, stored.1);
            }
        }
    }
}
