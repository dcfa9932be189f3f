//! `Method`: one recovery method, as the kernel names it in `WEDGED=` (docs/design.md §1), plus
//! `reboot`, unwedge's own last rung.
//!
//! On the wire a method is its token (`rebind`, `bus-reset`, ...), so stored objects read the
//! same whichever version wrote them. Tokens this version does not know are kept verbatim in
//! [`Method::Other`]: the kernel's list grows (`cold-reset` is coming) and an unknown token
//! means "ask a human", never "drop it".

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::METHOD_PATTERN;

/// A recovery method.
///
/// Build one with [`Method::from`] (or `"rebind".into()`), which maps a known token to its
/// variant; equality, ordering and hashing compare tokens, so `Other("rebind")` written by hand
/// still equals [`Method::Rebind`].
#[derive(Clone, Debug)]
pub enum Method {
    /// `none`: the driver recovered by itself; nothing to carry out.
    None,
    /// `rebind`: unbind the driver and bind it again.
    Rebind,
    /// `bus-reset`: a PCI secondary bus reset, then bind again.
    BusReset,
    /// `vendor-specific`: a procedure only the vendor documents (a human carries it out).
    VendorSpecific,
    /// `unknown`: the driver does not know how to recover.
    Unknown,
    /// `reboot`: unwedge's own last rung, never sent by the kernel.
    Reboot,
    /// `restart`: unwedge's own in-place restart of a `none` wedge's containers (the device is
    /// not touched), never sent by the kernel and never a rung of the ladder.
    Restart,
    /// Any other well-formed token (e.g. `cold-reset`), kept verbatim.
    Other(String),
}

impl Method {
    /// The methods a policy allows when it names none, in ladder order.
    pub const DEFAULT_ALLOWED: [Method; 3] = [Method::Rebind, Method::BusReset, Method::Reboot];
    /// The methods the node agent handles (`none` included: it acts on nothing). Metrics
    /// pre-create their series for these.
    pub const AGENT_KNOWN: [Method; 5] = [
        Method::None,
        Method::Rebind,
        Method::BusReset,
        Method::Reboot,
        Method::Restart,
    ];

    /// The token, as the kernel writes it.
    pub fn as_str(&self) -> &str {
        match self {
            Method::None => "none",
            Method::Rebind => "rebind",
            Method::BusReset => "bus-reset",
            Method::VendorSpecific => "vendor-specific",
            Method::Unknown => "unknown",
            Method::Reboot => "reboot",
            Method::Restart => "restart",
            Method::Other(s) => s,
        }
    }

    /// Whether the agent carries this method out on the host (a rung of the ladder): rebind,
    /// bus-reset and reboot. Any other method needs a human.
    pub fn agent_runs(&self) -> bool {
        matches!(
            Method::from(self.as_str()),
            Method::Rebind | Method::BusReset | Method::Reboot
        )
    }

    /// Whether the agent knows this method (one of [`Method::AGENT_KNOWN`]).
    pub fn agent_knows(&self) -> bool {
        Method::AGENT_KNOWN.contains(self)
    }

    /// A comma-joined list (`WEDGED=` syntax, as `status.methods` stores it) as methods.
    /// Tokens cannot contain commas, so this is the exact inverse of [`Method::join`].
    pub fn parse_list(joined: &str) -> Vec<Method> {
        joined
            .split(',')
            .filter(|t| !t.is_empty())
            .map(Method::from)
            .collect()
    }

    /// Methods comma-joined, as `WEDGED=` and `status.methods` write them.
    pub fn join<M: AsRef<str>>(methods: &[M]) -> String {
        methods
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl From<&str> for Method {
    fn from(s: &str) -> Method {
        match s {
            "none" => Method::None,
            "rebind" => Method::Rebind,
            "bus-reset" => Method::BusReset,
            "vendor-specific" => Method::VendorSpecific,
            "unknown" => Method::Unknown,
            "reboot" => Method::Reboot,
            "restart" => Method::Restart,
            other => Method::Other(other.to_string()),
        }
    }
}

impl From<String> for Method {
    fn from(s: String) -> Method {
        match Method::from(s.as_str()) {
            Method::Other(_) => Method::Other(s),
            known => known,
        }
    }
}

impl From<&String> for Method {
    fn from(s: &String) -> Method {
        Method::from(s.as_str())
    }
}

impl std::str::FromStr for Method {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Method, Self::Err> {
        Ok(Method::from(s))
    }
}

impl AsRef<str> for Method {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Method {
    fn eq(&self, other: &Method) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Method {}

impl PartialEq<str> for Method {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Method {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Method {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Method> for String {
    fn eq(&self, other: &Method) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Method> for &str {
    fn eq(&self, other: &Method) -> bool {
        *self == other.as_str()
    }
}

impl Hash for Method {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Method {
    fn partial_cmp(&self, other: &Method) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Method {
    fn cmp(&self, other: &Method) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
        String::deserialize(d).map(Method::from)
    }
}

impl JsonSchema for Method {
    fn schema_name() -> Cow<'static, str> {
        "Method".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": METHOD_PATTERN,
            "maxLength": 63,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every token the kernel or unwedge writes today, plus one the kernel will add.
    const TOKENS: [&str; 7] = [
        "none",
        "rebind",
        "bus-reset",
        "vendor-specific",
        "unknown",
        "reboot",
        "cold-reset",
    ];

    #[test]
    fn tokens_round_trip_through_serde_as_the_same_strings() {
        for t in TOKENS {
            let m: Method = serde_json::from_value(serde_json::json!(t)).unwrap();
            assert_eq!(m.as_str(), t);
            assert_eq!(serde_json::to_value(&m).unwrap(), serde_json::json!(t));
        }
        assert_eq!(Method::from("bus-reset"), Method::BusReset);
        assert!(matches!(Method::from("cold-reset"), Method::Other(ref s) if s == "cold-reset"));
    }

    #[test]
    fn a_hand_built_other_equals_its_known_variant() {
        let m = Method::Other("rebind".into());
        assert_eq!(m, Method::Rebind);
        assert!(m.agent_runs());
        assert!(m.agent_knows());
        assert!(!Method::Other("cold-reset".into()).agent_runs());
    }

    #[test]
    fn only_rebind_bus_reset_and_reboot_are_run_by_the_agent() {
        let runs: Vec<&str> = TOKENS
            .into_iter()
            .filter(|t| Method::from(*t).agent_runs())
            .collect();
        assert_eq!(runs, ["rebind", "bus-reset", "reboot"]);
    }

    #[test]
    fn lists_join_and_parse_back_exactly() {
        let l = vec![Method::Rebind, Method::from("cold-reset"), Method::Reboot];
        assert_eq!(Method::join(&l), "rebind,cold-reset,reboot");
        assert_eq!(Method::parse_list(&Method::join(&l)), l);
        assert!(Method::parse_list("").is_empty());
    }
}
