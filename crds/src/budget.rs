//! Budget semantics shared by the operator and kubectl-unwedge: a policy's limits with their
//! defaults, how an int-or-percent limit resolves against the pool it limits, and what a ledger
//! holds. One definition, so `kubectl unwedge budget` shows what the operator enforces.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::{Admission, BudgetUnit, RecoveryPolicySpec};

/// `maxUnavailable`, default 1.
pub fn max_unavailable(spec: &RecoveryPolicySpec) -> IntOrString {
    spec.max_unavailable.clone().unwrap_or(IntOrString::Int(1))
}

/// `maxUnavailableDevices`, default 10%.
pub fn max_unavailable_devices(spec: &RecoveryPolicySpec) -> IntOrString {
    spec.max_unavailable_devices
        .clone()
        .unwrap_or_else(|| IntOrString::String("10%".into()))
}

/// `maxConcurrentReboots`, default 1; a negative value (refused by the CRD) allows none.
pub fn max_concurrent_reboots(spec: &RecoveryPolicySpec) -> u32 {
    count(spec.max_concurrent_reboots, 1)
}

/// `none.maxConcurrent`, default 10; a negative value (refused by the CRD) allows none.
pub fn none_max_concurrent(spec: &RecoveryPolicySpec) -> u32 {
    count(spec.none.max_concurrent, 10)
}

fn count(v: Option<i32>, default: u32) -> u32 {
    v.map_or(default, |n| u32::try_from(n).unwrap_or(0))
}

/// An int-or-percent limit that cannot be used as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidLimit(pub IntOrString);

/// Resolves an int-or-percent limit against `total`, by the CRD's rule (a non-negative integer
/// or `0%`..`100%`): an integer is taken as it is (not capped by `total`); a percentage rounds
/// down, but any percentage above 0 allows at least 1 (a small pool is never frozen); `0` and
/// `0%` allow none. Anything else is invalid: a negative integer, a percentage over 100 %, a
/// number written as a string without `%`, any other text.
pub fn resolve_limit(value: &IntOrString, total: u32) -> Result<u32, InvalidLimit> {
    let invalid = || InvalidLimit(value.clone());
    match value {
        IntOrString::Int(n) => u32::try_from(*n).map_err(|_| invalid()),
        IntOrString::String(s) => {
            let p = s
                .strip_suffix('%')
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .filter(|p| *p <= 100)
                .ok_or_else(invalid)?;
            if p == 0 {
                return Ok(0);
            }
            Ok(((u64::from(total) * p) / 100).max(1) as u32)
        }
    }
}

/// The amounts in use in a ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Distinct nodes held by `Node` admissions.
    pub nodes: u32,
    /// Admissions that are reboots.
    pub reboots: u32,
    /// `Device` admissions.
    pub devices: u32,
    /// `None` admissions.
    pub none: u32,
}

/// Counts what a ledger holds. Nodes count once however many wedges they carry.
pub fn usage(ledger: &[Admission]) -> Usage {
    let nodes: BTreeSet<&str> = ledger
        .iter()
        .filter(|a| a.unit == BudgetUnit::Node)
        .map(|a| a.node.as_str())
        .collect();
    Usage {
        nodes: nodes.len() as u32,
        reboots: ledger.iter().filter(|a| a.reboot).count() as u32,
        devices: ledger
            .iter()
            .filter(|a| a.unit == BudgetUnit::Device)
            .count() as u32,
        none: ledger.iter().filter(|a| a.unit == BudgetUnit::None).count() as u32,
    }
}

/// A `maxUnavailable` as a policy may hold it, for [`LIMIT_CASES`].
#[derive(Clone, Copy, Debug)]
pub enum LimitValue {
    /// Not set (the default applies).
    Absent,
    /// An integer.
    Int(i32),
    /// A string.
    Str(&'static str),
}

impl LimitValue {
    /// The value as the spec field holds it.
    pub fn field(self) -> Option<IntOrString> {
        match self {
            LimitValue::Absent => None,
            LimitValue::Int(n) => Some(IntOrString::Int(n)),
            LimitValue::Str(s) => Some(IntOrString::String(s.into())),
        }
    }
}

/// The budget edge cases, as `(maxUnavailable, nodes selected, nodes allowed)`, `None` where
/// the value is invalid (the operator then allows none, kubectl-unwedge shows `invalid`). The
/// tests of both run this one table through their own code paths.
pub const LIMIT_CASES: &[(LimitValue, u32, Option<u32>)] = &[
    (LimitValue::Absent, 10, Some(1)),
    (LimitValue::Absent, 0, Some(1)),
    (LimitValue::Int(0), 10, Some(0)),
    (LimitValue::Int(3), 10, Some(3)),
    (LimitValue::Int(5), 3, Some(5)),
    (LimitValue::Int(-1), 10, None),
    (LimitValue::Str("0%"), 100, Some(0)),
    (LimitValue::Str("1%"), 0, Some(1)),
    (LimitValue::Str("10%"), 5, Some(1)),
    (LimitValue::Str("25%"), 10, Some(2)),
    (LimitValue::Str("50%"), 7, Some(3)),
    (LimitValue::Str("100%"), 7, Some(7)),
    (LimitValue::Str("101%"), 7, None),
    (LimitValue::Str("150%"), 10, None),
    (LimitValue::Str("-5%"), 10, None),
    (LimitValue::Str("+5%"), 10, None),
    (LimitValue::Str("3"), 10, None),
    (LimitValue::Str("%"), 10, None),
    (LimitValue::Str("x%"), 10, None),
    (LimitValue::Str("lots"), 10, None),
    (LimitValue::Str(""), 10, None),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_limit_case_resolves_as_the_table_says() {
        let spec = |v: LimitValue| RecoveryPolicySpec {
            max_unavailable: v.field(),
            ..serde_json::from_value(serde_json::json!({})).unwrap()
        };
        for (value, total, allowed) in LIMIT_CASES {
            let got = resolve_limit(&max_unavailable(&spec(*value)), *total).ok();
            assert_eq!(got, *allowed, "{value:?} of {total}");
        }
    }

    #[test]
    fn counts_default_and_negative_counts_allow_none() {
        let mut spec: RecoveryPolicySpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(max_concurrent_reboots(&spec), 1);
        assert_eq!(none_max_concurrent(&spec), 10);
        assert_eq!(
            max_unavailable_devices(&spec),
            IntOrString::String("10%".into())
        );
        spec.max_concurrent_reboots = Some(-2);
        spec.none.max_concurrent = Some(-1);
        assert_eq!(max_concurrent_reboots(&spec), 0);
        assert_eq!(none_max_concurrent(&spec), 0);
    }
}
