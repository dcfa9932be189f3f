//! Invariant 2: an approved attempt is executed at most once, across restarts — checked against
//! an independent journal of the writes that reached a fake sysfs, not against the agent's status.
//!
//! The fake sysfs's `unbind`, `bind` and `reset` files are FIFOs read by a test thread that
//! appends every write to its own journal and applies the kernel's effect (unbind removes the
//! driver link and the card; bind restores them with a new card index).
//!
//! Issue #22 (fail safe): approvals of wedges the agent did not detect, of devices that are not
//! DRM devices or have no driver are refused with nothing written, checked the same way.

use std::fs;
use std::path::Path;

use unwedge_agent::executor::{ExecutorStep, WedgeStore};
use unwedge_crds::{AttemptOutcome, AttemptResult};

mod fakes;

use fakes::{BDF, FakeSysfs, MemStore, approved, detected, detected_with, executor, executor_of};

#[tokio::test]
async fn rebind_runs_once_across_a_restart_even_when_the_status_was_lost() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("rebind", 1);
    let store = MemStore::with(&w);
    *store.lose_patches.lock().unwrap() = true;

    let first = executor(&fake, store.clone(), state.path(), "false", false);
    assert_eq!(
        first.process(&w).await,
        ExecutorStep::Start {
            attempt: 1,
            method: "rebind".into()
        }
    );
    drop(first);
    assert_eq!(
        fake.writes(),
        vec![format!("unbind {BDF}"), format!("bind {BDF}")]
    );
    assert!(
        store.attempts(&w.metadata.name.clone().unwrap()).is_empty(),
        "the patches were lost"
    );

    // Restart: same state dir, same approval, the status still knows nothing.
    *store.lose_patches.lock().unwrap() = false;
    let second = executor(&fake, store.clone(), state.path(), "false", false);
    assert!(matches!(
        second.process(&w).await,
        ExecutorStep::ReportFinished { .. }
    ));
    assert_eq!(
        fake.writes().len(),
        2,
        "no second unbind/bind: {:?}",
        fake.writes()
    );
    let attempts = store.attempts("node-a-0000-03-00-0-7");
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].result,
        AttemptOutcome::Succeeded,
        "{:?}",
        attempts[0]
    );
    assert!(
        attempts[0].message.contains("card1"),
        "the card index changed after the rebind: {}",
        attempts[0].message
    );

    // A third evaluation of the finished attempt does nothing.
    let current = store.get("node-a-0000-03-00-0-7").await.unwrap().unwrap();
    assert_eq!(second.process(&current).await, ExecutorStep::Idle);
    assert_eq!(fake.writes().len(), 2);
}

#[tokio::test]
async fn bus_reset_reports_the_reset_method_and_unknown_methods_fail() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("bus-reset", 1);
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    assert_eq!(
        fake.writes(),
        vec![
            format!("unbind {BDF}"),
            "reset 1".to_string(),
            format!("bind {BDF}")
        ]
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Succeeded);
    assert!(a.message.contains("flr"), "{}", a.message);

    let w2 = approved("cold-reset", 2);
    let store2 = MemStore::with(&w2);
    executor(&fake, store2.clone(), state.path(), "false", false)
        .process(&w2)
        .await;
    let a = &store2.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Failed);
    assert_eq!(a.message, "agent does not know how to carry out cold-reset");
    assert_eq!(fake.writes().len(), 3, "nothing written for cold-reset");
}

#[tokio::test]
async fn dry_run_touches_nothing_and_says_so() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("rebind", 1);
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", true)
        .process(&w)
        .await;
    assert!(fake.writes().is_empty());
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(
        a.result,
        AttemptOutcome::DryRun,
        "a dry run is never Failed (the operator would escalate): {a:?}"
    );
    assert!(
        a.message
            .starts_with("dry-run: would unbind 0000:03:00.0 from xe"),
        "{}",
        a.message
    );
}

/// The attempt `attempt` as the store holds it.
fn attempt_of(store: &MemStore, name: &str, attempt: u32) -> AttemptResult {
    store
        .attempts(name)
        .into_iter()
        .find(|a| a.attempt == attempt)
        .unwrap_or_else(|| panic!("no attempt {attempt} reported on {name}"))
}

fn agent_message(store: &MemStore, name: &str) -> String {
    store.objects.lock().unwrap()[name]
        .status
        .clone()
        .unwrap()
        .agent_message
        .unwrap_or_default()
}

/// A reboot command (run as argv, no shell) that only writes `boot-2` into the boot id file.
fn new_boot_id_command(fake: &FakeSysfs, boot: &Path) -> String {
    let next = fake.root.path().join("next-boot-id");
    fs::write(&next, "boot-2\n").unwrap();
    format!("cp {} {}", next.display(), boot.display())
}

#[tokio::test]
async fn a_hand_made_wedge_is_refused_and_nothing_is_written() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let marker = fake.root.path().join("rebooted");
    let reboot = format!("touch {}", marker.display());
    // A real detection of the same device exists: the hand-made wedge differs only in name.
    let mut forged = approved("rebind", 1);
    forged.metadata.name = Some("handmade".into());
    let store = MemStore::with(&forged);
    let ex = executor(&fake, store.clone(), state.path(), &reboot, false);
    ex.process(&forged).await;
    let a = attempt_of(&store, "handmade", 1);
    assert_eq!(a.result, AttemptOutcome::Refused, "{a:?}");
    assert!(a.message.contains("did not detect"), "{}", a.message);
    assert!(a.finished_at.is_some(), "a refusal is final");
    assert!(
        agent_message(&store, "handmade").contains("refused rebind (attempt 1)"),
        "{}",
        agent_message(&store, "handmade")
    );
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );

    // Never retried: the next evaluation of the same approval does nothing.
    let current = store.get("handmade").await.unwrap().unwrap();
    assert_eq!(ex.process(&current).await, ExecutorStep::Idle);

    // Nor does a reboot approval of it reboot, nor one for another boot id.
    let mut reboot_it = approved("reboot", 2);
    reboot_it.metadata.name = Some("handmade".into());
    ex.process(&reboot_it).await;
    assert_eq!(
        attempt_of(&store, "handmade", 2).result,
        AttemptOutcome::Refused
    );
    let mut other_boot = approved("reboot", 3);
    other_boot.spec.boot_id = "boot-0".into();
    let store2 = MemStore::with(&other_boot);
    executor(&fake, store2.clone(), state.path(), &reboot, false)
        .process(&other_boot)
        .await;
    assert_eq!(
        attempt_of(&store2, "node-a-0000-03-00-0-7", 3).result,
        AttemptOutcome::Refused
    );
    assert!(!marker.exists(), "the host was rebooted for a forged wedge");
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );
}

#[tokio::test]
async fn a_wedge_naming_a_non_drm_device_is_refused() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    // A NIC: a PCI function bound to e1000e, without a drm directory.
    let nic = "0000:00:19.0";
    let dev = fake.root.path().join("bus/pci/devices").join(nic);
    let drv = fake.root.path().join("bus/pci/drivers/e1000e");
    fs::create_dir_all(&dev).unwrap();
    fs::create_dir_all(&drv).unwrap();
    fs::write(drv.join("unbind"), "").unwrap();
    fs::write(drv.join("bind"), "").unwrap();
    std::os::unix::fs::symlink("../../drivers/e1000e", dev.join("driver")).unwrap();
    let mut w = approved("rebind", 1);
    w.spec.device.pci_address = nic.into();
    w.spec.device.driver = "e1000e".into();
    // Even a detection of that address (the record is the agent's) does not make it a GPU.
    detected(state.path(), &w);
    let store = MemStore::with(&w);
    executor_of(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 1);
    assert_eq!(a.result, AttemptOutcome::Refused, "{a:?}");
    assert!(a.message.contains("not a DRM device"), "{}", a.message);
    assert_eq!(fs::read_to_string(drv.join("unbind")).unwrap(), "");
    assert_eq!(fs::read_to_string(drv.join("bind")).unwrap(), "");
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );
}

#[tokio::test]
async fn the_crs_driver_is_never_used_the_sysfs_one_is() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    // `../../../escape` from bus/pci/drivers/ is <root>/escape: a file outside the drivers.
    let escape = fake.root.path().join("escape");
    fs::create_dir_all(&escape).unwrap();
    fs::write(escape.join("unbind"), "").unwrap();
    fs::write(escape.join("bind"), "").unwrap();
    let mut w = approved("rebind", 1);
    w.spec.device.driver = "../../../escape".into();
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    assert_eq!(
        fake.writes(),
        vec![format!("unbind {BDF}"), format!("bind {BDF}")],
        "xe's files (from sysfs) were written"
    );
    assert_eq!(fs::read_to_string(escape.join("unbind")).unwrap(), "");
    assert_eq!(fs::read_to_string(escape.join("bind")).unwrap(), "");
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 1);
    assert_eq!(a.result, AttemptOutcome::Succeeded, "{}", a.message);
    assert!(a.message.contains("xe bound"), "{}", a.message);
}

#[tokio::test]
async fn without_a_driver_reboot_runs_and_rebind_is_refused() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let dev = fake.root.path().join("bus/pci/devices").join(BDF);
    fs::remove_file(dev.join("driver")).unwrap();
    fs::remove_dir_all(dev.join("drm")).unwrap();

    // Detected while no driver was bound: the agent has no driver it read itself.
    let w = approved("rebind", 1);
    detected_with(state.path(), &w, "");
    let store = MemStore::with(&w);
    executor_of(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 1);
    assert_eq!(a.result, AttemptOutcome::Refused, "{a:?}");
    assert!(a.message.contains("no driver bound to"), "{}", a.message);

    let boot = fake.root.path().join("boot_id");
    let reboot = new_boot_id_command(&fake, &boot);
    let w = approved("reboot", 2);
    let store = MemStore::with(&w);
    let step = executor_of(&fake, store.clone(), state.path(), &reboot, false)
        .process(&w)
        .await;
    assert_eq!(
        step,
        ExecutorStep::Start {
            attempt: 2,
            method: "reboot".into()
        }
    );
    assert_eq!(
        fs::read_to_string(&boot).unwrap().trim(),
        "boot-2",
        "the reboot ran without a driver"
    );
    assert_eq!(
        attempt_of(&store, "node-a-0000-03-00-0-7", 2).result,
        AttemptOutcome::Started
    );
    assert!(
        fake.writes().is_empty(),
        "sysfs writes: {:?}",
        fake.writes()
    );
}

#[tokio::test]
async fn reboot_is_verified_by_the_new_boot_id_after_restart() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("reboot", 3);
    let store = MemStore::with(&w);
    // The "reboot" only changes the boot id file: harmless, never a real reboot.
    let boot = fake.root.path().join("boot_id");
    let cmd = new_boot_id_command(&fake, &boot);
    let first = executor(&fake, store.clone(), state.path(), &cmd, false);
    assert_eq!(
        first.process(&w).await,
        ExecutorStep::Start {
            attempt: 3,
            method: "reboot".into()
        }
    );
    assert_eq!(fs::read_to_string(&boot).unwrap().trim(), "boot-2");
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(
        a.result,
        AttemptOutcome::Started,
        "nothing final before the host comes back"
    );
    drop(first);

    let current = store.get("node-a-0000-03-00-0-7").await.unwrap().unwrap();
    let second = executor(&fake, store.clone(), state.path(), "false", false);
    assert_eq!(
        second.process(&current).await,
        ExecutorStep::VerifyAfterReboot {
            attempt: 3,
            started_boot_id: "boot-1".into()
        }
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Succeeded, "{}", a.message);
    assert!(a.message.contains("boot-1 -> boot-2"), "{}", a.message);
    assert!(fake.writes().is_empty(), "a reboot writes no sysfs files");
}

#[tokio::test]
async fn the_agent_that_asked_for_a_reboot_waits_for_it_instead_of_failing_the_attempt() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    let w = approved("reboot", 3);
    let store = MemStore::with(&w);
    // The reboot command returns at once and the host has not gone down yet (boot id unchanged),
    // as `systemctl reboot` does; the wedge is then reconciled again (a status update).
    let first = executor(&fake, store.clone(), state.path(), "true", false);
    assert_eq!(
        first.process(&w).await,
        ExecutorStep::Start {
            attempt: 3,
            method: "reboot".into()
        }
    );
    let current = store.get("node-a-0000-03-00-0-7").await.unwrap().unwrap();
    assert_eq!(
        first.process(&current).await,
        ExecutorStep::AwaitingReboot { attempt: 3 }
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Started, "{}", a.message);
    drop(first);

    // A new process with the same boot id: the host never rebooted, so the attempt failed.
    let second = executor(&fake, store.clone(), state.path(), "true", false);
    assert_eq!(
        second.process(&current).await,
        ExecutorStep::ReportInterrupted {
            attempt: 3,
            method: "reboot".into()
        }
    );
    let a = &store.attempts("node-a-0000-03-00-0-7")[0];
    assert_eq!(a.result, AttemptOutcome::Failed, "{}", a.message);
}

#[tokio::test]
async fn a_gpu_left_unbound_by_a_failed_rebind_can_still_be_bus_reset() {
    let fake = FakeSysfs::new();
    let state = tempfile::tempdir().unwrap();
    // The rebind rung's bind failed: the device is unbound, its drm directory gone.
    let dev = fake.root.path().join("bus/pci/devices").join(BDF);
    fs::remove_file(dev.join("driver")).unwrap();
    fs::remove_dir_all(dev.join("drm")).unwrap();
    let mut w = approved("bus-reset", 2);
    w.spec.device.driver = "../../../escape".into();
    let store = MemStore::with(&w);
    executor(&fake, store.clone(), state.path(), "false", false)
        .process(&w)
        .await;
    assert_eq!(
        fake.writes(),
        vec!["reset 1".to_string(), format!("bind {BDF}")],
        "no unbind of an unbound device; bound to xe, the driver the agent detected"
    );
    let a = attempt_of(&store, "node-a-0000-03-00-0-7", 2);
    assert_eq!(a.result, AttemptOutcome::Succeeded, "{}", a.message);
}
