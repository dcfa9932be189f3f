//! Property tests of the uevent parser: it never panics, reads every well-formed WEDGED event
//! whatever the key order, and keeps unknown method tokens verbatim (docs/design.md §1).

use proptest::prelude::*;
use unwedge_agent::uevent::{ParseError, parse};

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("none".to_string()),
        Just("rebind".to_string()),
        Just("bus-reset".to_string()),
        Just("vendor-specific".to_string()),
        Just("cold-reset".to_string()),
        Just("unknown".to_string()),
        Just("warp-9".to_string()),
        "[a-z0-9][a-z0-9-]{0,20}",
    ]
}

#[derive(Debug, Clone)]
struct Event {
    devpath: String,
    card: u32,
    methods: Vec<String>,
    seqnum: Option<u64>,
    pid: Option<i64>,
    task: Option<String>,
    devname_dev_prefix: bool,
    extra: Vec<(String, String)>,
}

fn event() -> impl Strategy<Value = Event> {
    (
        "0000:[0-9a-f]{2}:[01][0-9a-f]\\.[0-7]",
        0u32..64,
        prop::collection::vec(method(), 1..6),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<i64>()),
        prop::option::of("[ -~]{0,15}"),
        any::<bool>(),
        prop::collection::vec(("X_[A-Z0-9_]{1,8}", "[ -~]{0,12}"), 0..3),
    )
        .prop_map(
            |(bdf, card, methods, seqnum, pid, task, devname_dev_prefix, extra)| Event {
                devpath: format!("/devices/pci0000:00/0000:00:01.0/{bdf}/drm/card{card}"),
                card,
                methods,
                seqnum,
                pid,
                task,
                devname_dev_prefix,
                extra: extra
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into_iter()
                    .collect(),
            },
        )
}

fn fields(e: &Event) -> Vec<String> {
    let mut f = vec![
        "ACTION=change".to_string(),
        format!("DEVPATH={}", e.devpath),
        "SUBSYSTEM=drm".to_string(),
        "DEVTYPE=drm_minor".to_string(),
        format!(
            "DEVNAME={}dri/card{}",
            if e.devname_dev_prefix { "/dev/" } else { "" },
            e.card
        ),
        "MAJOR=226".to_string(),
        format!("MINOR={}", e.card),
        format!("WEDGED={}", e.methods.join(",")),
    ];
    f.extend(e.seqnum.map(|s| format!("SEQNUM={s}")));
    f.extend(e.pid.map(|p| format!("PID={p}")));
    f.extend(e.task.as_ref().map(|t| format!("TASK={t}")));
    f.extend(e.extra.iter().map(|(k, v)| format!("{k}={v}")));
    f
}

fn encode(devpath: &str, fields: &[String]) -> Vec<u8> {
    let mut out = format!("change@{devpath}\0").into_bytes();
    for f in fields {
        out.extend_from_slice(f.as_bytes());
        out.push(0);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse(&buf);
    }

    #[test]
    fn wedged_looking_noise_never_panics(
        parts in prop::collection::vec(prop_oneof![
            Just(b"SUBSYSTEM=drm".to_vec()),
            Just(b"WEDGED=".to_vec()),
            Just(b"change@/devices/x/drm/card0".to_vec()),
            Just(b"DEVNAME=".to_vec()),
            Just(b"PID=".to_vec()),
            Just(b"\0".to_vec()),
            Just(b"@".to_vec()),
            Just(b",".to_vec()),
            prop::collection::vec(any::<u8>(), 0..8),
        ], 0..24)
    ) {
        let buf: Vec<u8> = parts.concat();
        let _ = parse(&buf);
    }

    #[test]
    fn valid_events_round_trip_in_any_key_order(e in event(), seed in any::<u64>()) {
        let mut f = fields(&e);
        // Shuffle deterministically from the seed: key order is not guaranteed by the kernel.
        let mut s = seed | 1;
        for i in (1..f.len()).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            f.swap(i, (s % (i as u64 + 1)) as usize);
        }
        let ev = parse(&encode(&e.devpath, &f)).expect("valid event").expect("a wedge");
        prop_assert_eq!(&ev.action, "change");
        prop_assert_eq!(&ev.devpath, &e.devpath);
        prop_assert_eq!(ev.card.clone(), format!("card{}", e.card));
        prop_assert_eq!(ev.devname.clone(), Some(format!("dri/card{}", e.card)));
        prop_assert_eq!(&ev.methods, &e.methods);
        prop_assert_eq!(ev.seqnum, e.seqnum);
        prop_assert_eq!(ev.pid, e.pid);
        prop_assert_eq!(&ev.task, &e.task);
        prop_assert_eq!(ev.raw.len(), f.len());
        for (k, v) in &e.extra {
            prop_assert_eq!(ev.raw.get(k), Some(v));
        }
    }

    #[test]
    fn a_bad_token_makes_the_event_malformed(e in event(), bad in "[A-Z_.,!]{1,4}|-[a-z]{0,3}", at in 0usize..6) {
        let mut methods = e.methods.clone();
        let at = at.min(methods.len());
        methods.insert(at, bad);
        let e2 = Event { methods, ..e };
        let res = parse(&encode(&e2.devpath, &fields(&e2)));
        prop_assert!(matches!(res, Err(ParseError::BadMethods { .. })), "{:?}", res);
    }

    #[test]
    fn render_nodes_are_ignored(e in event()) {
        let devpath = e.devpath.replace(&format!("card{}", e.card), &format!("renderD{}", 128 + e.card));
        let f: Vec<String> = fields(&e).into_iter().filter(|f| !f.starts_with("DEVNAME=") && !f.starts_with("DEVPATH=")).collect();
        prop_assert_eq!(parse(&encode(&devpath, &f)), Ok(None));
    }
}

#[test]
fn every_truncation_of_a_real_event_is_safe() {
    let msg = b"change@/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,bus-reset\0DEVNAME=dri/card0\0DEVTYPE=drm_minor\0SEQNUM=5208\0MAJOR=226\0MINOR=0\0";
    let wedged = msg.windows(7).position(|w| w == b"WEDGED=").unwrap();
    let value_end = wedged + b"WEDGED=rebind,bus-reset".len();
    for n in 0..=msg.len() {
        match parse(&msg[..n]) {
            Ok(Some(ev)) => assert_eq!(
                ev.methods,
                ["rebind", "bus-reset"],
                "cut at {n}: a shorter method list was kept"
            ),
            Ok(None) => {}
            Err(e) => assert!(n < msg.len(), "the whole event is an error: {e}"),
        }
        if n > wedged + 7 && n <= value_end {
            assert!(
                matches!(parse(&msg[..n]), Err(ParseError::Truncated { .. })),
                "cut at {n} inside WEDGED= is a truncation: {:?}",
                parse(&msg[..n])
            );
        }
    }
    assert!(parse(msg).unwrap().is_some());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// A message cut anywhere but right after a NUL is never read as a wedge, and a cut at a
    /// field boundary never shortens the method list.
    #[test]
    fn a_cut_off_event_never_yields_cut_methods(e in event(), cut in any::<prop::sample::Index>()) {
        let msg = encode(&e.devpath, &fields(&e));
        let n = cut.index(msg.len());
        match parse(&msg[..n]) {
            Ok(Some(ev)) => {
                prop_assert_eq!(msg[n - 1], 0u8);
                prop_assert_eq!(&ev.methods, &e.methods);
            }
            Ok(None) => {}
            Err(err) => prop_assert!(
                msg[n - 1] == 0 || matches!(err, ParseError::Truncated { .. }),
                "cut at {} (not after a NUL) should be Truncated: {}", n, err
            ),
        }
    }

    /// What `uevent_net_rcv` makes of an injected message cut inside its last field: the
    /// kernel's `SEQNUM=<n>\0` is appended to the cut bytes. Never a wedge with cut methods.
    #[test]
    fn a_kernel_glued_seqnum_is_a_truncation(e in event(), keep in 1usize..40, seq in any::<u64>()) {
        let mut f: Vec<String> = fields(&e).into_iter().filter(|f| !f.starts_with("SEQNUM=")).collect();
        let w = f.iter().position(|f| f.starts_with("WEDGED=")).unwrap();
        let last = f.remove(w);
        let cut = &last[..("WEDGED=".len() + keep).min(last.len())];
        let mut msg = encode(&e.devpath, &f);
        msg.extend_from_slice(cut.as_bytes());
        msg.extend_from_slice(format!("SEQNUM={seq}\0").as_bytes());
        let res = parse(&msg);
        prop_assert!(matches!(res, Err(ParseError::Truncated { .. })), "{:?}", res);
    }
}
