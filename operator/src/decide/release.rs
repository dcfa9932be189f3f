//! What a wedge holds and how it lets go: the operator's finalizer, its ledger places in every
//! policy that names it, and the node's cordon, lifted or handed to another wedge of the node
//! (docs/design.md §4).

use unwedge_crds::Admission;

use super::draft::{Draft, note};
use super::{Decision, Governance, Input, Step};

/// Whether an open wedge without the operator's finalizer holds something: a ledger place
/// under its name (an earlier incident of the same name — deleted, then created again by the
/// agent's outbox replay — whose place the cache still shows) or the node's cordon. Admission
/// puts the finalizer on before the ledger write; a wedge that finds itself holding either
/// without it gets it before anything else, so deleting it always releases what it holds.
pub(super) fn unfinalized_hold(input: &Input, placed: bool, cordon: bool) -> bool {
    let w = input.wedge;
    let finalized = w
        .metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == unwedge_crds::labels::FINALIZER);
    (placed || cordon) && !finalized && w.metadata.deletion_timestamp.is_none()
}

/// The policies a finished (or deleted) wedge gives its places back to: every policy whose
/// ledger names it, plus the one its status names. A node relabelled mid-recovery can leave
/// the wedge a place in the policy it moved away from (seen in bench chaos: admitted by
/// `chaos`, then `chaos-b`, then `chaos` again; Recovered, it released `chaos` only and the
/// place in `chaos-b` stayed, never repaired since the wedge still exists). Sorted, no repeats.
pub fn places_to_release(
    wedge: &str,
    status_policy: Option<&str>,
    ledgers: &[(String, Vec<Admission>)],
) -> Vec<String> {
    let mut out: Vec<String> = ledgers
        .iter()
        .filter(|(_, l)| l.iter().any(|a| a.wedge == wedge))
        .map(|(p, _)| p.clone())
        .chain(status_policy.map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A wedge of the node that the cordon could be handed to, as read fresh just before the
/// hand-over (the cache may not show yet that it finished).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heir {
    /// Its name.
    pub name: String,
    /// Not Recovered or Abandoned, and not being deleted.
    pub open: bool,
    /// It carries the operator's finalizer (its deletion releases what it holds).
    pub finalized: bool,
    /// It holds a place in a policy's ledger.
    pub placed: bool,
}

/// The wedge that takes the node's cordon over, from the candidates read fresh: one that is
/// open, carries the finalizer and holds a place in a ledger; `None` lifts the cordon. A
/// wedge that finished, or never got the finalizer, would let the cordon vanish with it (a
/// node stranded cordoned); one without a place (a wedge Queued for budget carries the
/// finalizer from its first admission attempt) would keep the node cordoned while no ledger
/// counts it, and the ledger would admit another node past the budget. Lifted, the node is
/// cordoned again by its next wedge once that one is admitted.
pub fn cordon_heir(candidates: &[Heir]) -> Option<String> {
    candidates
        .iter()
        .find(|h| h.open && h.finalized && h.placed)
        .map(|h| h.name.clone())
}

/// Lifts the node's cordon for this wedge, or hands it to another open wedge of the node that
/// still needs it — preferably one holding a place in this policy's ledger. The effect reads
/// the candidates fresh and hands the cordon only to one holding a place in some ledger
/// ([`cordon_heir`]), else lifts it: a cordoned node is always counted by a budget.
pub(super) fn release_cordon(mut d: Draft, input: &Input) -> Decision {
    let placed = |w: &String| match &input.policy {
        Governance::Policy(p) => p.ledger.iter().any(|a| a.wedge == *w),
        _ => false,
    };
    let next = input
        .others_on_node
        .iter()
        .find(|w| placed(w))
        .or(input.others_on_node.first());
    if let Some(next) = next {
        d.action(format!("handing the cordon to {next}"));
        return d.done(
            Step::HandOverCordon { to: next.clone() },
            note(
                false,
                "CordonHandedOver",
                format!("{next} still needs the node cordoned"),
            ),
        );
    }
    d.action("uncordon");
    d.done(
        Step::Uncordon,
        note(
            false,
            "Uncordoned",
            "unwedge cordoned the node for this wedge and uncordons it",
        ),
    )
}
