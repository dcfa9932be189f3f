//! `describe`'s header: identity, state, and what is on the device.

use unwedge_crds::GpuWedge;

use crate::present;

/// The header of `describe`: identity, state, and what is on the device.
pub(crate) fn describe(w: &GpuWedge) -> String {
    let s = w.status.clone().unwrap_or_default();
    let d = &w.spec.device;
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<14}{v}\n"));
    kv("Name:", w.metadata.name.clone().unwrap_or_default());
    kv("Node:", w.spec.node_name.clone());
    let mut dev = d.pci_address.clone();
    for part in [d.card.as_deref(), d.render_node.as_deref()]
        .into_iter()
        .flatten()
    {
        dev.push_str(&format!(" {part}"));
    }
    if let Some(dra) = &d.dra {
        dev.push_str(&format!(
            " (DRA {}/{}/{})",
            dra.driver, dra.pool, dra.device
        ));
    }
    kv("Device:", dev);
    kv("Driver:", d.driver.clone());
    kv(
        "Methods:",
        s.methods
            .clone()
            .unwrap_or_else(|| w.spec.methods.join(",")),
    );
    kv("Phase:", format!("{:?}", present::phase_of(w)));
    kv("Action:", s.action.clone().unwrap_or_else(|| "-".into()));
    kv("Policy:", s.policy.clone().unwrap_or_else(|| "-".into()));
    if let Some(b) = &s.budget {
        kv("Budget:", b.clone());
    }
    if let Some(m) = &s.agent_message {
        kv("Agent says:", m.clone());
    }
    let consumers: Vec<String> = s
        .consumers
        .iter()
        .flatten()
        .map(|c| {
            format!(
                "{}/{} ({}) {}",
                c.namespace, c.pod, c.container, c.device_id
            )
        })
        .collect();
    kv(
        "Consumers:",
        if consumers.is_empty() {
            "-".into()
        } else {
            consumers.join(", ")
        },
    );
    let domain: Vec<String> = s
        .reset_domain
        .iter()
        .flatten()
        .map(|d| {
            format!(
                "{} [{}] by {}",
                d.pci_address,
                d.relation,
                d.methods.join("/")
            )
        })
        .collect();
    if !domain.is_empty() {
        kv("Reset domain:", domain.join(", "));
    }
    let ann = w.metadata.annotations.clone().unwrap_or_default();
    let verbs: Vec<String> = [
        "unwedge.io/approve",
        "unwedge.io/retry",
        "unwedge.io/abandon",
        "unwedge.io/by",
    ]
    .iter()
    .filter_map(|k| ann.get(*k).map(|v| format!("{k}={v:?}")))
    .collect();
    if !verbs.is_empty() {
        kv("Human verbs:", verbs.join(" "));
    }
    out
}
