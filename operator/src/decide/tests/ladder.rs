//! The ladder: the first rung, climbing it on failure or timeout, methods unwedge cannot
//! carry out, a device without a driver, and repeat offenders.

use super::*;

#[test]
fn a_failed_attempt_climbs_the_ladder_with_a_new_attempt_id() {
    let mut w = World::new("rebind,bus-reset");
    w.run(20);
    w.agent(AttemptOutcome::Failed, "device did not come back");
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("bus-reset", 2));
    w.agent(AttemptOutcome::Failed, "still dead");
    w.limits.reboots = 1;
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("reboot", 3),
        "reboot is the last rung even unlisted"
    );
    assert!(
        w.ledger[0].reboot,
        "the reboot counts against maxConcurrentReboots"
    );
    assert!(
        w.pods.iter().all(|p| p.daemon_set || p.mirror),
        "whole-node drain: {:?}",
        w.pods
    );
    w.agent(AttemptOutcome::Failed, "no");
    w.run(10);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "LadderExhausted"
    );
    assert!(w.node.unschedulable);
    assert_eq!(w.ledger.len(), 1, "NeedsAttention keeps the budget place");
}

#[test]
fn a_timed_out_attempt_escalates() {
    let mut w = World::new("rebind,bus-reset");
    w.run(20);
    w.now = t(1 + 301);
    let d = w.decide();
    assert!(
        d.note
            .as_ref()
            .unwrap()
            .message
            .contains("rebind#1 timed out"),
        "{:?}",
        d.note
    );
    w.apply(&d);
    w.run(20);
    let a = w.status().approval.unwrap();
    assert_eq!((a.method.as_str(), a.attempt), ("bus-reset", 2));
}

#[test]
fn max_attempts_stops_the_ladder() {
    let mut w = World::new("rebind,bus-reset");
    w.settings.max_attempts = 1;
    w.run(20);
    w.agent(AttemptOutcome::Failed, "x");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    assert_eq!(
        w.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "LadderExhausted"
    );
}

#[test]
fn first_rung_is_the_least_disruptive_listed_and_allowed() {
    let s = |allowed: &[&str], esc: &[&str]| {
        let mut st =
            Settings::from_spec(&serde_json::from_value(serde_json::json!({})).unwrap()).unwrap();
        st.allowed_methods = allowed.iter().map(|x| Method::from(*x)).collect();
        st.escalation = esc.iter().map(|x| Method::from(*x)).collect();
        st
    };
    let m = Method::parse_list;
    let all = s(
        &["rebind", "bus-reset", "reboot"],
        &["rebind", "bus-reset", "reboot"],
    );
    assert_eq!(
        ladder(&m("rebind,bus-reset"), &all).unwrap(),
        ["rebind", "bus-reset", "reboot"]
    );
    assert_eq!(
        ladder(&m("bus-reset"), &all).unwrap(),
        ["bus-reset", "reboot"],
        "never backwards to rebind"
    );
    let no_rebind = s(&["bus-reset", "reboot"], &["bus-reset", "reboot"]);
    assert_eq!(
        ladder(&m("rebind,bus-reset"), &no_rebind).unwrap(),
        ["bus-reset", "reboot"]
    );
    let no_reboot = s(&["rebind", "bus-reset"], &["rebind", "bus-reset"]);
    assert_eq!(ladder(&m("rebind"), &no_reboot).unwrap(), ["rebind"]);
    assert_eq!(
        ladder(&m("rebind,bus-reset,vendor-specific"), &all).unwrap(),
        ["rebind", "bus-reset", "reboot"]
    );
    for (methods, reason) in [
        ("vendor-specific", "NoAllowedMethod"),
        ("unknown", "NoAllowedMethod"),
        ("warp-drive", "NoAllowedMethod"),
    ] {
        assert_eq!(
            ladder(&m(methods), &all).unwrap_err().reason,
            reason,
            "{methods}"
        );
    }
    let lenient = s(
        &[
            "vendor-specific",
            "cold-reset",
            "unknown",
            "warp-drive",
            "reboot",
        ],
        &["reboot"],
    );
    for (methods, reason) in [
        ("vendor-specific", "VendorSpecific"),
        ("cold-reset", "ColdReset"),
        ("unknown", "UnknownMethod"),
        ("warp-drive", "UnknownMethod"),
    ] {
        assert_eq!(
            ladder(&m(methods), &lenient).unwrap_err().reason,
            reason,
            "{methods}"
        );
    }
}

#[test]
fn methods_unwedge_cannot_carry_out_need_a_human_with_the_node_cordoned() {
    for methods in ["vendor-specific", "cold-reset", "unknown", "warp-drive"] {
        let mut w = World::new(methods);
        w.run(20);
        assert_eq!(w.phase(), Phase::NeedsAttention, "{methods}");
        assert!(w.node.unschedulable, "{methods}: node stays cordoned");
        assert_eq!(w.ledger.len(), 1, "{methods}: keeps its place");
        assert!(w.status().approval.is_none(), "{methods}: nothing approved");
        assert!(
            evicted(&w).is_empty(),
            "{methods}: nothing evicted for a recovery that will not come"
        );
        assert!(
            w.cond(cond::NEEDS_ATTENTION)
                .unwrap()
                .message
                .contains("To do:")
        );
    }
}

#[test]
fn cold_reset_under_a_policy_that_does_not_allow_it_says_power_cycle() {
    let w = World::new("cold-reset");
    for methods in ["cold-reset", "rebind,cold-reset"] {
        let mut st = w.settings.clone();
        st.allowed_methods = vec!["reboot".into()];
        let a = ladder(&Method::parse_list(methods), &st).unwrap_err();
        assert_eq!(
            a.reason, "ColdReset",
            "{methods}: not the generic NoAllowedMethod"
        );
        assert!(a.todo.contains("power-cycle"), "{methods}: {}", a.todo);
        assert!(a.message.contains("policy allows reboot"), "{}", a.message);
    }
    let mut w = World::new("cold-reset");
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
    assert_eq!(c.reason, "ColdReset");
    assert!(c.message.contains("power-cycle the node"), "{}", c.message);
}

#[test]
fn vendor_specific_with_xe_survivability_mode_asks_for_a_firmware_flash() {
    for (mode, says) in [
        ("Runtime", "runtime survivability"),
        (
            "Survivability mode type: Boot\nCapability Info: 0x1",
            "boot survivability",
        ),
        ("Survivability mode type: Runtime", "runtime survivability"),
        ("Something", "survivability mode \"Something\""),
    ] {
        // Under the default policy vendor-specific is not allowed (NoAllowedMethod without a
        // mode); with a lenient one it is VendorSpecific: both name the flash once xe says so.
        for allow in [false, true] {
            let mut w = World::new("vendor-specific");
            if allow {
                w.settings.allowed_methods.push("vendor-specific".into());
            }
            w.wedge
                .spec
                .uevent
                .insert(UEVENT_SURVIVABILITY_MODE.into(), mode.into());
            w.run(20);
            assert_eq!(w.phase(), Phase::NeedsAttention, "{mode}");
            let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
            assert_eq!(c.reason, "VendorSpecific", "{mode} allow={allow}");
            assert!(c.message.contains(says), "{mode}: {}", c.message);
            assert!(c.message.contains("firmware flash"), "{}", c.message);
            assert!(c.message.contains("fwupd"), "{}", c.message);
        }
    }
    // Without a mode (not xe, or the attribute is absent) the message stays generic.
    let mut w = World::new("vendor-specific");
    w.settings.allowed_methods.push("vendor-specific".into());
    w.run(20);
    let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
    assert_eq!(c.reason, "VendorSpecific");
    assert!(!c.message.contains("fwupd"), "{}", c.message);
    // A mode on a wedge that does not list vendor-specific changes nothing.
    let a = Attention {
        reason: "NoAllowedMethod",
        message: "m".into(),
        todo: "t".into(),
    };
    let uevent = [(UEVENT_SURVIVABILITY_MODE.to_string(), "Runtime".to_string())].into();
    assert_eq!(with_vendor_hint(a.clone(), &["unknown".into()], &uevent), a);
}

#[test]
fn repeat_offender_goes_to_needs_attention() {
    let mut w = World::new("rebind");
    w.settings.repeat_offender = Some(crate::settings::Window {
        count: 3,
        window: Duration::from_secs(3600),
    });
    w.history = vec![
        PastWedge {
            name: "a".into(),
            detected_at: t(-100),
            evicted_at: None,
        },
        PastWedge {
            name: "b".into(),
            detected_at: t(-7200),
            evicted_at: None,
        },
    ];
    w.run(20);
    assert_eq!(w.phase(), Phase::Approved, "2 within the hour is below 3");
    let mut w2 = World::new("rebind");
    w2.settings.repeat_offender = w.settings.repeat_offender.clone();
    w2.history = vec![
        PastWedge {
            name: "a".into(),
            detected_at: t(-100),
            evicted_at: None,
        },
        PastWedge {
            name: "b".into(),
            detected_at: t(-200),
            evicted_at: None,
        },
    ];
    w2.run(20);
    assert_eq!(w2.phase(), Phase::NeedsAttention);
    assert_eq!(
        w2.cond(cond::NEEDS_ATTENTION).unwrap().reason,
        "RepeatOffender"
    );
    assert!(w2.node.unschedulable);
}

#[test]
fn with_no_driver_bound_only_the_reboot_rung_is_planned() {
    let mut w = World::new("rebind,bus-reset");
    w.wedge.spec.device.driver = String::new();
    w.run(20);
    let a = w.status().approval.expect("an approval");
    assert_eq!(
        (a.method.as_str(), a.attempt),
        ("reboot", 1),
        "no ladder walk"
    );
    assert!(w.ledger[0].reboot, "counted against maxConcurrentReboots");
}

#[test]
fn with_no_driver_and_no_reboot_allowed_a_human_is_asked_at_once() {
    let mut w = World::new("rebind,bus-reset");
    w.wedge.spec.device.driver = String::new();
    w.settings.allowed_methods = vec!["rebind".into(), "bus-reset".into()];
    w.run(20);
    assert_eq!(w.phase(), Phase::NeedsAttention);
    let c = w.cond(cond::NEEDS_ATTENTION).unwrap();
    assert_eq!(c.reason, "NoDriver");
    assert!(c.message.contains("To do:"), "{}", c.message);
    assert!(w.status().approval.is_none());
}
