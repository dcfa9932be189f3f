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
}
