//! The kernel's uevent wire format (`ACTION@DEVPATH\0KEY=VALUE\0…`, docs/design.md §1) into a typed
//! `WEDGED=` event. Only `SUBSYSTEM=drm` `change` events on a primary `cardN` node that carry
//! `WEDGED` matter; everything else is `Ok(None)`, decided cheaply before any allocation.
//! A message that claims to be such an event but is malformed is an `Err`: the caller logs it
//! and keeps running. Method tokens are checked for syntax only and kept verbatim, in order.
//! Every field the kernel sends ends with a NUL, the last one included: a message without it
//! was cut off, and so may be its `WEDGED=` value (`bus-re` for `bus-reset`), so it is an
//! [`ParseError::Truncated`] error, never a shorter method list. Such a message replayed through
//! the kernel (`uevent_net_rcv`) comes back with the kernel's `SEQNUM=…\0` glued to its last
//! field; that is recognised as the same truncation.

use std::collections::BTreeMap;

use thiserror::Error;

/// The most methods one `WEDGED=` list may carry (the GpuWedge API's limit).
pub const MAX_METHODS: usize = 16;
/// The longest method token the GpuWedge API stores.
pub const MAX_METHOD_LEN: usize = 63;

/// A `WEDGED=` uevent of a primary DRM card node, as the kernel sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WedgeUevent {
    /// `ACTION` (always `change` for a wedge).
    pub action: String,
    /// `DEVPATH`, relative to the sysfs root, e.g. `/devices/pci0000:00/…/0000:03:00.0/drm/card0`.
    pub devpath: String,
    /// The card node's name, e.g. `card0` (the last component of `DEVPATH`).
    pub card: String,
    /// `DEVNAME` normalized relative to `/dev` (`dri/card0`), whether it came as `dri/card0`
    /// (the kernel) or `/dev/dri/card0` (udev).
    pub devname: Option<String>,
    /// The recovery methods of `WEDGED=`, verbatim and in the kernel's order.
    pub methods: Vec<String>,
    /// `SEQNUM`, when sent.
    pub seqnum: Option<u64>,
    /// `PID` of the task the driver blamed (Linux 6.17+), when sent.
    pub pid: Option<i64>,
    /// `TASK` (the blamed task's name), when sent.
    pub task: Option<String>,
    /// Every `KEY=VALUE` of the message as received.
    pub raw: BTreeMap<String, String>,
}

/// Why a message that claims to be a drm `WEDGED` event could not be read.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// A part of the message is not UTF-8.
    #[error("malformed WEDGED uevent: field {index} is not valid UTF-8")]
    NotUtf8 {
        /// Index of the NUL-separated field (0 is the `ACTION@DEVPATH` header).
        index: usize,
    },
    /// The first field is not `ACTION@DEVPATH`.
    #[error("malformed WEDGED uevent: header {header:?} is not ACTION@DEVPATH")]
    BadHeader {
        /// The header as received (shortened).
        header: String,
    },
    /// A field is not `KEY=VALUE` with a key of `[A-Z0-9_]`.
    #[error("malformed WEDGED uevent: field {field:?} is not KEY=VALUE")]
    BadField {
        /// The field as received (shortened).
        field: String,
    },
    /// A key appears twice, so its meaning is ambiguous.
    #[error("malformed WEDGED uevent: key {key} appears more than once")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// The header and the `ACTION`/`DEVPATH` keys disagree.
    #[error("malformed WEDGED uevent: header says {key}={header:?} but the key says {value:?}")]
    HeaderMismatch {
        /// `ACTION` or `DEVPATH`.
        key: &'static str,
        /// The header's value.
        header: String,
        /// The key's value.
        value: String,
    },
    /// `DEVNAME` does not name the card that `DEVPATH` names.
    #[error("malformed WEDGED uevent: DEVNAME {devname:?} does not name {card} of DEVPATH")]
    DevnameMismatch {
        /// `DEVNAME` as received.
        devname: String,
        /// The card of `DEVPATH`.
        card: String,
    },
    /// `WEDGED` is empty or a token breaks the syntax `[a-z0-9][a-z0-9-]*`.
    #[error("malformed WEDGED uevent: WEDGED={value:?}: {reason}")]
    BadMethods {
        /// The `WEDGED` value (shortened).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The message lacks the kernel's terminating NUL (or the kernel glued its own `SEQNUM=` to
    /// the unterminated last field of an injected message): the last field may be cut off.
    #[error(
        "malformed WEDGED uevent: truncated, the last field {field:?} has no terminating NUL{glued}, so its value may be cut off"
    )]
    Truncated {
        /// The last field as received (shortened).
        field: String,
        /// `" (the kernel appended its SEQNUM to it)"` when that is how it shows, else empty.
        glued: &'static str,
    },
    /// `SEQNUM` or `PID` is not a number.
    #[error("malformed WEDGED uevent: {key}={value:?} is not a number")]
    BadNumber {
        /// The key.
        key: &'static str,
        /// The value (shortened).
        value: String,
    },
}

/// Parses one uevent message. `Ok(None)` for anything but a drm `WEDGED` change event on a
/// primary card node (including udev's `libudev` re-broadcasts); never panics on any input.
pub fn parse(buf: &[u8]) -> Result<Option<WedgeUevent>, ParseError> {
    // Cheap exits first: the vast majority of uevents are not ours.
    if buf.starts_with(b"libudev\0")
        || !contains(buf, b"WEDGED=")
        || !contains(buf, b"SUBSYSTEM=drm")
    {
        return Ok(None);
    }
    let mut fields = buf.split(|b| *b == 0);
    let header = fields.next().unwrap_or_default();
    let fields: Vec<&[u8]> = fields.filter(|f| !f.is_empty()).collect();
    let claims_wedge = fields.iter().any(|f| f.starts_with(b"WEDGED="));
    let claims_drm = fields.iter().any(|f| *f == b"SUBSYSTEM=drm");
    if !claims_wedge || !claims_drm {
        return Ok(None);
    }
    check_terminated(buf, &fields)?;

    let header = std::str::from_utf8(header).map_err(|_| ParseError::NotUtf8 { index: 0 })?;
    let (h_action, h_devpath) = match header.split_once('@') {
        Some((a, d)) if !a.is_empty() && d.starts_with('/') => (a, d),
        _ => {
            return Err(ParseError::BadHeader {
                header: short(header),
            });
        }
    };

    let mut raw = BTreeMap::new();
    for (i, field) in fields.iter().enumerate() {
        let field = std::str::from_utf8(field).map_err(|_| ParseError::NotUtf8 { index: i + 1 })?;
        let (key, value) = match field.split_once('=') {
            Some((k, v)) if is_key(k) => (k, v),
            _ => {
                return Err(ParseError::BadField {
                    field: short(field),
                });
            }
        };
        if raw.insert(key.to_string(), value.to_string()).is_some() {
            return Err(ParseError::DuplicateKey {
                key: key.to_string(),
            });
        }
    }

    for (key, header_value) in [("ACTION", h_action), ("DEVPATH", h_devpath)] {
        if let Some(value) = raw.get(key)
            && value != header_value
        {
            return Err(ParseError::HeaderMismatch {
                key,
                header: short(header_value),
                value: short(value),
            });
        }
    }
    if h_action != "change" {
        return Ok(None);
    }
    let card = h_devpath.rsplit('/').next().unwrap_or_default();
    if !is_card(card) {
        // renderD*, connectors (card0-DP-1) and anything else: not the primary node.
        return Ok(None);
    }

    let devname = match raw.get("DEVNAME") {
        None => None,
        Some(d) => {
            let rel = d.strip_prefix("/dev/").unwrap_or(d);
            if rel.strip_prefix("dri/") != Some(card) {
                return Err(ParseError::DevnameMismatch {
                    devname: short(d),
                    card: card.to_string(),
                });
            }
            Some(rel.to_string())
        }
    };

    let wedged = raw.get("WEDGED").map(String::as_str).unwrap_or_default();
    let methods = parse_methods(wedged)?;
    let seqnum = match raw.get("SEQNUM") {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| ParseError::BadNumber {
            key: "SEQNUM",
            value: short(v),
        })?),
    };
    let pid = match raw.get("PID") {
        None => None,
        Some(v) => Some(v.parse::<i64>().map_err(|_| ParseError::BadNumber {
            key: "PID",
            value: short(v),
        })?),
    };
    let task = raw.get("TASK").cloned();

    Ok(Some(WedgeUevent {
        action: h_action.to_string(),
        devpath: h_devpath.to_string(),
        card: card.to_string(),
        devname,
        methods,
        seqnum,
        pid,
        task,
        raw,
    }))
}

/// Fails unless `buf` ends with the kernel's terminating NUL and the value of its last field does
/// not end with a `SEQNUM=<digits>` the kernel glued to it (an injected message whose last field was cut off:
/// `uevent_net_rcv` appends `SEQNUM=…\0` right after the bytes it was given).
fn check_terminated(buf: &[u8], fields: &[&[u8]]) -> Result<(), ParseError> {
    let last = fields.last().copied().unwrap_or_default();
    let field = || short(&String::from_utf8_lossy(last));
    if buf.last() != Some(&0) {
        return Err(ParseError::Truncated {
            field: field(),
            glued: "",
        });
    }
    let has_seqnum = fields.iter().any(|f| f.starts_with(b"SEQNUM="));
    let value_at = last
        .iter()
        .position(|b| *b == b'=')
        .map_or(usize::MAX, |i| i + 1);
    let glued = !has_seqnum
        && last.windows(7).enumerate().any(|(i, w)| {
            i >= value_at
                && w == b"SEQNUM="
                && last.len() > i + 7
                && last[i + 7..].iter().all(u8::is_ascii_digit)
        });
    if glued {
        return Err(ParseError::Truncated {
            field: field(),
            glued: " (the kernel appended its SEQNUM to it)",
        });
    }
    Ok(())
}

/// Splits a `WEDGED=` value into its tokens, checking syntax only (never against a list).
fn parse_methods(value: &str) -> Result<Vec<String>, ParseError> {
    let bad = |reason: String| ParseError::BadMethods {
        value: short(value),
        reason,
    };
    if value.is_empty() {
        return Err(bad("no method listed".into()));
    }
    let methods: Vec<String> = value.split(',').map(str::to_string).collect();
    if methods.len() > MAX_METHODS {
        return Err(bad(format!(
            "{} methods, more than the {MAX_METHODS} the API stores",
            methods.len()
        )));
    }
    for m in &methods {
        if !unwedge_crds::is_method_token(m) {
            return Err(bad(format!(
                "token {:?} is not of the form [a-z0-9][a-z0-9-]*",
                short(m)
            )));
        }
        if m.len() > MAX_METHOD_LEN {
            return Err(bad(format!(
                "token longer than {MAX_METHOD_LEN} characters"
            )));
        }
    }
    Ok(methods)
}

/// A uevent key: `[A-Z0-9_]+` (the kernel's `add_uevent_var` keys are upper-case identifiers).
fn is_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

/// A primary DRM node name: `card` followed by decimal digits.
pub fn is_card(name: &str) -> bool {
    name.strip_prefix("card")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A value for an error message: at most 80 characters.
fn short(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(80).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XE: &[u8] = b"change@/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,bus-reset\0DEVNAME=dri/card0\0DEVTYPE=drm_minor\0SEQNUM=5208\0MAJOR=226\0MINOR=0\0";

    #[test]
    fn xe_event() {
        let ev = parse(XE).unwrap().unwrap();
        assert_eq!(ev.card, "card0");
        assert_eq!(ev.methods, ["rebind", "bus-reset"]);
        assert_eq!(ev.devname.as_deref(), Some("dri/card0"));
        assert_eq!(ev.seqnum, Some(5208));
        assert_eq!(ev.pid, None);
        assert_eq!(ev.raw["MAJOR"], "226");
    }

    #[test]
    fn amdgpu_none_with_pid_and_udev_devname() {
        let msg = b"change@/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/drm/card1\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/drm/card1\0SUBSYSTEM=drm\0DEVNAME=/dev/dri/card1\0WEDGED=none\0PID=2519\0TASK=glxgears:cs0\0";
        let ev = parse(msg).unwrap().unwrap();
        assert_eq!(ev.card, "card1");
        assert_eq!(ev.devname.as_deref(), Some("dri/card1"));
        assert_eq!(ev.methods, ["none"]);
        assert_eq!(ev.pid, Some(2519));
        assert_eq!(ev.task.as_deref(), Some("glxgears:cs0"));
    }

    #[test]
    fn unknown_tokens_kept_verbatim() {
        let msg = b"change@/devices/x/drm/card2\0SUBSYSTEM=drm\0WEDGED=vendor-specific,cold-reset,warp-9\0";
        let ev = parse(msg).unwrap().unwrap();
        assert_eq!(ev.methods, ["vendor-specific", "cold-reset", "warp-9"]);
    }

    #[test]
    fn ignored_messages() {
        for msg in [
            &b""[..],
            b"add@/devices/usb1\0ACTION=add\0SUBSYSTEM=usb\0",
            b"change@/devices/x/drm/renderD128\0ACTION=change\0SUBSYSTEM=drm\0WEDGED=rebind\0",
            b"change@/devices/x/drm/card0/card0-DP-1\0SUBSYSTEM=drm\0WEDGED=rebind\0",
            b"change@/devices/x/drm/card0\0ACTION=change\0SUBSYSTEM=drm\0HOTPLUG=1\0",
            b"change@/devices/x/sound/card0\0SUBSYSTEM=sound\0WEDGED=rebind\0",
            b"libudev\0\xfe\xed\xca\xfeSUBSYSTEM=drm\0WEDGED=rebind\0",
            b"remove@/devices/x/drm/card0\0ACTION=remove\0SUBSYSTEM=drm\0WEDGED=rebind\0",
        ] {
            assert_eq!(parse(msg), Ok(None), "{:?}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn malformed_claims_are_errors() {
        let cases: &[(&[u8], &str)] = &[
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=\0", "no method"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,,bus-reset\0", "not of the form"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=Rebind\0", "not of the form"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,\0", "not of the form"),
            (b"change/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0", "ACTION@DEVPATH"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0garbage\0", "KEY=VALUE"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0WEDGED=none\0", "more than once"),
            (b"change@/devices/x/drm/card0\0DEVPATH=/devices/y/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0", "DEVPATH"),
            (b"change@/devices/x/drm/card0\0DEVNAME=dri/card1\0SUBSYSTEM=drm\0WEDGED=rebind\0", "DEVNAME"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0SEQNUM=x1\0", "SEQNUM"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0PID=-\0", "PID"),
            (b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0TASK=\xff\0", "UTF-8"),
        ];
        for (msg, want) in cases {
            let err = parse(msg).expect_err(&String::from_utf8_lossy(msg));
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        }
    }

    #[test]
    fn a_missing_terminating_nul_is_a_truncation() {
        let cut = &XE[..XE.len() - 1];
        assert!(matches!(
            parse(cut),
            Err(ParseError::Truncated { glued: "", .. })
        ));
        let msg = b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,bus-re";
        let err = parse(msg).unwrap_err();
        assert!(
            err.to_string().contains("truncated")
                && err.to_string().contains("WEDGED=rebind,bus-re"),
            "{err}"
        );
    }

    #[test]
    fn a_seqnum_glued_to_the_last_field_is_a_truncation() {
        let msg = b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,bus-reSEQNUM=5209\0";
        let err = parse(msg).unwrap_err();
        assert!(
            matches!(err, ParseError::Truncated { glued, .. } if !glued.is_empty()),
            "{err}"
        );
        let ok = b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0SEQNUM=5209\0";
        assert!(parse(ok).unwrap().is_some());
        let own_key = b"change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind\0X_SEQNUM=1\0";
        assert!(parse(own_key).unwrap().is_some());
    }

    #[test]
    fn too_many_methods() {
        let list = vec!["a"; MAX_METHODS + 1].join(",");
        let msg = format!("change@/devices/x/drm/card0\0SUBSYSTEM=drm\0WEDGED={list}\0");
        assert!(matches!(
            parse(msg.as_bytes()),
            Err(ParseError::BadMethods { .. })
        ));
    }
}
