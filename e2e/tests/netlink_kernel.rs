//! The agent's production listener and parser fed by the real kernel (docs/design.md §1): in a private
//! network namespace, uevents sent to the kernel come back from port id 0 exactly like the
//! kernel's own; a process's own group-1 multicast is refused; a flood of irrelevant uevents
//! is drained and a wedge after it is still heard; a captured kernel payload replayed by the
//! `uevent-inject --raw-file` binary reads as the original event with the kernel's fresh
//! `SEQNUM`, and a capture cut inside its `WEDGED=` value is reported as truncated.
//!
//! Needs CAP_SYS_ADMIN (CI runs it as root). Without it the test fails, it never skips.

use std::time::{Duration, Instant};

use e2e::fleet::Bins;
use e2e::inject;
use unwedge_agent::listener::{ListenError, UeventListener};
use unwedge_agent::uevent;

const DEVPATH: &str = "/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0";

/// Runs `f` on a thread of its own in a fresh network namespace (namespaces are per thread,
/// and threads it spawns inherit it), with a current-thread tokio runtime.
fn in_private_netns<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "netlink_kernel needs root (CAP_SYS_ADMIN) to create a network namespace; run it as root, as CI does"
    );
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(f());
    })
    .join()
    .expect("test thread panicked");
}

async fn next(l: &mut UeventListener) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(10), l.next())
        .await
        .expect("no uevent within 10s")
        .expect("listener error")
}

#[test]
fn kernel_rebroadcast_reaches_the_listener_and_parses() {
    in_private_netns(|| async {
        let mut l = UeventListener::bind().expect("bind uevent socket");
        let payload = inject::wedge_payload(DEVPATH, "card0", &["rebind", "bus-reset"], &[]);
        inject::send_to_kernel(&payload).expect("send to kernel");
        let msg = next(&mut l).await;
        let ev = uevent::parse(&msg).expect("well-formed").expect("a wedge");
        assert_eq!(ev.methods, ["rebind", "bus-reset"]);
        assert_eq!(ev.card, "card0");
        assert_eq!(ev.devpath, DEVPATH);
        assert_eq!(ev.devname.as_deref(), Some("dri/card0"));
        assert!(
            ev.seqnum.is_some(),
            "the kernel adds a SEQNUM: {:?}",
            ev.raw
        );
        assert_eq!(l.dropped_foreign(), 0);
    });
}

#[test]
fn a_process_multicast_is_refused() {
    in_private_netns(|| async {
        let mut l = UeventListener::bind().expect("bind uevent socket");
        let forged = inject::wedge_payload(DEVPATH, "card0", &["rebind"], &[("SEQNUM", "1")]);
        inject::multicast_as_process(&forged).expect("multicast");
        // A genuine one afterwards proves the listener was reading when the forgery arrived.
        let real = inject::wedge_payload(DEVPATH, "card0", &["bus-reset"], &[]);
        inject::send_to_kernel(&real).expect("send to kernel");
        let msg = next(&mut l).await;
        let ev = uevent::parse(&msg).unwrap().unwrap();
        assert_eq!(
            ev.methods,
            ["bus-reset"],
            "the forged rebind must not be returned"
        );
        assert_eq!(l.dropped_foreign(), 1, "the forgery is counted");
    });
}

#[test]
fn a_flood_of_irrelevant_uevents_is_drained() {
    const FLOOD: u64 = 10_000;
    in_private_netns(|| async {
        let mut l = UeventListener::bind().expect("bind uevent socket");
        let start = Instant::now();
        // The injector thread inherits this thread's network namespace.
        let injector = std::thread::spawn(|| {
            for n in 0..FLOOD {
                inject::send_to_kernel(&inject::usb_payload(n)).expect("flood");
            }
            let p = inject::wedge_payload(
                DEVPATH,
                "card0",
                &["rebind", "bus-reset"],
                &[("PID", "42"), ("TASK", "x")],
            );
            inject::send_to_kernel(&p).expect("wedge after flood");
        });
        let (mut ignored, mut overruns) = (0u64, 0u64);
        let ev = loop {
            let msg = match tokio::time::timeout(Duration::from_secs(30), l.next())
                .await
                .expect("stalled")
            {
                Ok(m) => m,
                Err(ListenError::Overrun) => {
                    overruns += 1;
                    continue;
                }
                Err(e) => panic!("listener error: {e}"),
            };
            match uevent::parse(&msg) {
                Ok(None) => ignored += 1,
                Ok(Some(ev)) => break ev,
                Err(e) => panic!("flood uevent misread as a malformed wedge: {e}"),
            }
        };
        injector.join().unwrap();
        eprintln!(
            "flood: {ignored} irrelevant uevents drained in {:?}, {overruns} overruns, receive buffer {} bytes",
            start.elapsed(),
            l.recv_buffer()
        );
        assert_eq!(ev.methods, ["rebind", "bus-reset"]);
        assert_eq!(ev.pid, Some(42));
        assert_eq!(overruns, 0, "a 16 MiB buffer holds the flood");
        assert_eq!(
            ignored, FLOOD,
            "every irrelevant uevent was read and ignored"
        );
    });
}

/// A real xe wedge as captured from the kernel (its `SEQNUM` in the middle, not last).
const CAPTURED: &[u8] = b"change@/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:03:00.0/drm/card0\0SUBSYSTEM=drm\0WEDGED=rebind,bus-reset\0DEVNAME=dri/card0\0DEVTYPE=drm_minor\0SEQNUM=5208\0MAJOR=226\0MINOR=0\0";

/// Runs the `uevent-inject` binary with `--raw-file` (a file holding `payload`) in the calling
/// thread's network namespace (a spawned process inherits the thread's namespaces).
fn replay(payload: &[u8]) {
    let bins = Bins::build().expect("binaries under test (cargo build -p uevent-inject --bins)");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("captured.uevent");
    std::fs::write(&file, payload).unwrap();
    let out = std::process::Command::new(&bins.inject)
        .arg("--raw-file")
        .arg(&file)
        .output()
        .expect("run uevent-inject");
    assert!(
        out.status.success(),
        "uevent-inject --raw-file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kernel_seqnum() -> u64 {
    std::fs::read_to_string("/sys/kernel/uevent_seqnum")
        .expect("/sys/kernel/uevent_seqnum")
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn a_captured_payload_replays_with_the_kernels_seqnum() {
    in_private_netns(|| async {
        let mut l = UeventListener::bind().expect("bind uevent socket");
        let before = kernel_seqnum();
        replay(CAPTURED);
        let msg = next(&mut l).await;
        let ev = uevent::parse(&msg)
            .expect("the replay is well-formed (one SEQNUM, the kernel's)")
            .expect("a wedge");
        let captured = uevent::parse(CAPTURED).unwrap().unwrap();
        assert_eq!(ev.methods, ["rebind", "bus-reset"]);
        let seq = ev.seqnum.expect("the kernel appends a SEQNUM");
        assert!(
            seq > before,
            "SEQNUM {seq} is the kernel's fresh one (was {before}), not the captured 5208"
        );
        let mut raw = ev.raw.clone();
        let mut want = captured.raw.clone();
        raw.remove("SEQNUM");
        want.remove("SEQNUM");
        assert_eq!(raw, want, "every other key as captured");
        assert!(msg.ends_with(format!("SEQNUM={seq}\0").as_bytes()));
    });
}

#[test]
fn a_capture_cut_inside_wedged_is_reported_truncated() {
    in_private_netns(|| async {
        let mut l = UeventListener::bind().expect("bind uevent socket");
        let cut = inject::encode(
            "change",
            DEVPATH,
            &[
                "ACTION=change".into(),
                format!("DEVPATH={DEVPATH}"),
                "SUBSYSTEM=drm".into(),
                "DEVNAME=dri/card0".into(),
                "SEQNUM=5208".into(),
                "WEDGED=rebind,bus-reset".into(),
            ],
        );
        // The capture ends inside the method name: "…WEDGED=rebind,bus-re", no NUL.
        let cut = &cut[..cut.len() - "set\0".len()];
        replay(cut);
        let msg = next(&mut l).await;
        eprintln!("received: {:?}", String::from_utf8_lossy(&msg));
        let err = uevent::parse(&msg).expect_err("a cut-off WEDGED= is never read as a wedge");
        assert!(
            matches!(err, uevent::ParseError::Truncated { .. }),
            "reported as truncated, not as a method list: {err}"
        );
        assert!(err.to_string().contains("WEDGED=rebind,bus-re"), "{err}");
    });
}
