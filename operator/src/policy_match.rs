//! Which RecoveryPolicy governs a node.
//!
//! Non-default policies whose `nodeSelector` matches the node's labels come first; exactly one
//! governs, several are a conflict reported on each of them (never guessed). Nodes no
//! non-default policy selects fall to the single `default: true` policy.

use std::collections::BTreeMap;

use unwedge_crds::RecoveryPolicy;

/// The outcome of matching a node against all policies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Governing {
    /// Exactly this policy (by name) governs the node.
    Policy(String),
    /// Several policies claim the node; the wedge waits until a human resolves it.
    Conflict(Vec<String>),
    /// No policy selects the node and there is no default.
    NoPolicy,
}

/// Whether a policy's selector (label equality; empty selects all) matches these labels.
pub fn selects(policy: &RecoveryPolicy, labels: &BTreeMap<String, String>) -> bool {
    policy
        .spec
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

/// Finds the policy that governs a node with `labels`.
pub fn governing(policies: &[RecoveryPolicy], labels: &BTreeMap<String, String>) -> Governing {
    let name = |p: &RecoveryPolicy| p.metadata.name.clone().unwrap_or_default();
    let mut specific: Vec<String> = policies
        .iter()
        .filter(|p| !p.spec.default && selects(p, labels))
        .map(name)
        .collect();
    specific.sort();
    match specific.len() {
        1 => return Governing::Policy(specific.remove(0)),
        n if n > 1 => return Governing::Conflict(specific),
        _ => {}
    }
    let mut defaults: Vec<String> = policies
        .iter()
        .filter(|p| p.spec.default)
        .map(name)
        .collect();
    defaults.sort();
    match defaults.len() {
        0 => Governing::NoPolicy,
        1 => Governing::Policy(defaults.remove(0)),
        _ => Governing::Conflict(defaults),
    }
}

/// The policy that governs the wedge named `wedge` on a node with `labels`: the policy whose
/// ledger holds it, if one does — an admitted recovery keeps its place in the policy that admitted
/// it until the incident ends, so a relabelled node is never counted by two policies and never
/// skips the new policy's budget — else the one [`governing`] finds.
pub fn for_wedge(
    policies: &[RecoveryPolicy],
    labels: &BTreeMap<String, String>,
    wedge: &str,
) -> Governing {
    match holders(policies, wedge).into_iter().next() {
        None => governing(policies, labels),
        // Two ledgers holding one wedge is a past bug's leftover: the first keeps it, and the
        // ledger repair drops the other entry once the incident ends.
        Some(first) => Governing::Policy(first),
    }
}

/// The policies whose ledger holds `wedge`, by name.
fn holders(policies: &[RecoveryPolicy], wedge: &str) -> Vec<String> {
    let mut names: Vec<String> = policies
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.admitted.iter().any(|a| a.wedge == wedge))
        })
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    names
}

/// A policy other than `policy` whose ledger holds `wedge`, if any: an admission into `policy`
/// must not go ahead then (the wedge keeps its place where it was admitted; the cache that
/// chose `policy` lagged behind that ledger). Judged on a fresh list of the policies.
pub fn held_elsewhere(policies: &[RecoveryPolicy], wedge: &str, policy: &str) -> Option<String> {
    holders(policies, wedge).into_iter().find(|p| p != policy)
}

/// For one policy: the other policies it conflicts with on any of `nodes` (name → labels),
/// so a Conflict condition can be written on each party.
pub fn conflicts_of(
    policy: &str,
    policies: &[RecoveryPolicy],
    nodes: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (node, labels) in nodes {
        if let Governing::Conflict(names) = governing(policies, labels)
            && names.iter().any(|n| n == policy)
        {
            out.push((
                node.clone(),
                names.into_iter().filter(|n| n != policy).collect(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, default: bool, sel: &[(&str, &str)]) -> RecoveryPolicy {
        let mut p = RecoveryPolicy::new(
            name,
            serde_json::from_value(serde_json::json!({"default": default})).unwrap(),
        );
        p.spec.node_selector = sel
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p
    }

    fn labels(l: &[(&str, &str)]) -> BTreeMap<String, String> {
        l.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_matching_policy_governs() {
        let ps = [
            policy("gpu", false, &[("pool", "gpu")]),
            policy("dflt", true, &[]),
        ];
        assert_eq!(
            governing(&ps, &labels(&[("pool", "gpu")])),
            Governing::Policy("gpu".into())
        );
    }

    #[test]
    fn the_default_applies_only_where_no_other_selects() {
        let ps = [
            policy("gpu", false, &[("pool", "gpu")]),
            policy("dflt", true, &[]),
        ];
        assert_eq!(
            governing(&ps, &labels(&[("pool", "cpu")])),
            Governing::Policy("dflt".into())
        );
    }

    #[test]
    fn two_matching_policies_are_a_conflict_not_a_guess() {
        let ps = [
            policy("b", false, &[("pool", "gpu")]),
            policy("a", false, &[]),
            policy("dflt", true, &[]),
        ];
        assert_eq!(
            governing(&ps, &labels(&[("pool", "gpu")])),
            Governing::Conflict(vec!["a".into(), "b".into()])
        );
        let nodes = BTreeMap::from([("n1".to_string(), labels(&[("pool", "gpu")]))]);
        assert_eq!(
            conflicts_of("a", &ps, &nodes),
            vec![("n1".to_string(), vec!["b".to_string()])]
        );
        assert_eq!(
            conflicts_of("b", &ps, &nodes),
            vec![("n1".to_string(), vec!["a".to_string()])]
        );
        assert!(conflicts_of("dflt", &ps, &nodes).is_empty());
    }

    #[test]
    fn two_defaults_are_a_conflict() {
        let ps = [policy("d1", true, &[]), policy("d2", true, &[])];
        assert_eq!(
            governing(&ps, &labels(&[])),
            Governing::Conflict(vec!["d1".into(), "d2".into()])
        );
    }

    #[test]
    fn no_policy_at_all() {
        let ps = [policy("gpu", false, &[("pool", "gpu")])];
        assert_eq!(governing(&ps, &labels(&[])), Governing::NoPolicy);
        assert_eq!(governing(&[], &labels(&[])), Governing::NoPolicy);
    }

    fn admit(p: &mut RecoveryPolicy, wedge: &str) {
        let st = p.status.get_or_insert_with(Default::default);
        st.admitted.push(unwedge_crds::Admission {
            wedge: wedge.into(),
            node: "n".into(),
            unit: unwedge_crds::BudgetUnit::Node,
            reboot: false,
        });
    }

    #[test]
    fn an_admitted_wedge_stays_with_its_policy_after_a_relabel() {
        let mut ps = [
            policy("a", false, &[("pool", "a")]),
            policy("b", false, &[("pool", "b")]),
        ];
        admit(&mut ps[0], "w");
        assert_eq!(
            for_wedge(&ps, &labels(&[("pool", "b")]), "w"),
            Governing::Policy("a".into())
        );
        assert_eq!(
            for_wedge(&ps, &labels(&[("pool", "b")]), "other"),
            Governing::Policy("b".into())
        );
    }

    #[test]
    fn an_admission_waits_while_another_ledger_holds_the_wedge() {
        let mut ps = [
            policy("a", false, &[("pool", "a")]),
            policy("b", false, &[("pool", "b")]),
        ];
        assert_eq!(held_elsewhere(&ps, "w", "b"), None);
        admit(&mut ps[0], "w");
        assert_eq!(held_elsewhere(&ps, "w", "b"), Some("a".into()));
        assert_eq!(
            held_elsewhere(&ps, "w", "a"),
            None,
            "its own ledger is not elsewhere"
        );
        assert_eq!(held_elsewhere(&ps, "other", "b"), None);
    }

    proptest::proptest! {
        /// Relabelling a node at random while its wedge is admitted and released at random: the
        /// wedge is never held by two policies, and while held it is governed by its holder.
        #[test]
        fn relabelling_never_moves_or_doubles_a_place(
            steps in proptest::collection::vec((0usize..4, proptest::bool::ANY), 1..40)
        ) {
            let pools = ["a", "b", "c", "none"];
            let mut ps = vec![
                policy("a", false, &[("pool", "a")]),
                policy("b", false, &[("pool", "b")]),
                policy("c", false, &[("pool", "c")]),
                policy("dflt", true, &[]),
            ];
            let mut holder: Option<String> = None;
            for (pool, admit_now) in steps {
                let l = labels(&[("pool", pools[pool])]);
                let g = for_wedge(&ps, &l, "w");
                if let Some(h) = &holder {
                    proptest::prop_assert_eq!(&g, &Governing::Policy(h.clone()));
                }
                match (admit_now, &g, &holder) {
                    (true, Governing::Policy(p), None) => {
                        let i = ps.iter().position(|x| x.metadata.name.as_deref() == Some(p)).unwrap();
                        admit(&mut ps[i], "w");
                        holder = Some(p.clone());
                    }
                    (false, _, Some(_)) => {
                        for p in &mut ps {
                            if let Some(st) = p.status.as_mut() {
                                st.admitted.retain(|a| a.wedge != "w");
                            }
                        }
                        holder = None;
                    }
                    _ => {}
                }
                let holding = ps
                    .iter()
                    .filter(|p| p.status.as_ref().is_some_and(|s| s.admitted.iter().any(|a| a.wedge == "w")))
                    .count();
                proptest::prop_assert!(holding <= 1);
            }
        }
    }
}
