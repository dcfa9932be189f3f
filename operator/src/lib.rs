//! The unwedge operator: turns a GpuWedge into a safe, budgeted recovery (docs/design.md §2–§5).
//!
//! `decide`, `budget`, `breaker`, `policy_match`, `settings` and `wake` are pure; `ledger`, `drain` and
//! `reconciler` are the thin effect layer around them.

pub mod api_calls;
pub mod breaker;
pub mod budget;
pub mod decide;
pub mod default_policy;
pub mod dra;
pub mod drain;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod node_cache;
pub mod policy_match;
pub mod quarantine;
pub mod reconciler;
pub mod settings;
pub mod status;
pub mod turns;
pub mod wake;
pub mod writes;
