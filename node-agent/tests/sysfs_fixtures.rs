//! The sysfs resolver on trees laid out as the kernel lays them out (see `sysfs::fixture` for
//! the source of each layout), including each method's reset domain.

use unwedge_agent::sysfs::fixture::{self, Layout};
use unwedge_agent::sysfs::{ResolvedDevice, Sysfs, SysfsError};

fn tree(layout: Layout) -> (tempfile::TempDir, Sysfs, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let bdfs = fixture::build(dir.path(), layout).unwrap();
    let s = Sysfs::new(dir.path());
    (dir, s, bdfs)
}

fn domain(r: &ResolvedDevice, method: &str) -> Vec<(String, String)> {
    r.domain_for(method)
        .into_iter()
        .map(|d| (d.pci_address.clone(), d.relation.clone()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn xe_card() {
    let (_d, s, bdfs) = tree(Layout::Xe);
    assert_eq!(bdfs, ["0000:03:00.0"]);
    let r = s.resolve_card("card0").unwrap();
    assert_eq!(r.device.pci_address, "0000:03:00.0");
    assert_eq!(r.device.driver, "xe");
    assert_eq!(r.device.vendor_id.as_deref(), Some("0x8086"));
    assert_eq!(r.device.device_id.as_deref(), Some("0xe20b"));
    assert_eq!(r.device.card.as_deref(), Some("card0"));
    assert_eq!(r.device.render_node.as_deref(), Some("renderD128"));
    assert_eq!(r.device.numa_node, None, "numa_node -1 means none");
    assert!(
        r.sysfs_path
            .ends_with("devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:03:00.0")
    );
    // Behind its own switch port with nothing else: the domain is the GPU alone.
    assert_eq!(domain(&r, "rebind"), pairs(&[("0000:03:00.0", "self")]));
    assert_eq!(domain(&r, "bus-reset"), pairs(&[("0000:03:00.0", "self")]));
    assert!(domain(&r, "none").is_empty());
    // The uevent's DEVPATH resolves to the same device.
    let by_path = s
        .resolve_devpath(
            "/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:03:00.0/drm/card0",
        )
        .unwrap();
    assert_eq!(by_path, r);
    assert_eq!(
        s.gpus(),
        vec![("0000:03:00.0".to_string(), Some("xe".to_string()))]
    );
    assert_eq!(s.find_card_by_pci("0000:03:00.0").as_deref(), Some("card0"));
    assert_eq!(s.survivability_mode("0000:03:00.0"), None);
    std::fs::write(
        _d.path()
            .join("bus/pci/devices/0000:03:00.0/survivability_mode"),
        "Runtime\n",
    )
    .unwrap();
    assert_eq!(
        s.survivability_mode("0000:03:00.0").as_deref(),
        Some("Runtime")
    );
}

#[test]
fn i915_integrated_on_the_root_bus() {
    let (_d, s, _) = tree(Layout::I915);
    let r = s.resolve_card("card0").unwrap();
    assert_eq!(r.device.pci_address, "0000:00:02.0");
    assert_eq!(r.device.driver, "i915");
    // The root bus is no bridge: other root-bus devices are not in its domain.
    assert_eq!(domain(&r, "bus-reset"), pairs(&[("0000:00:02.0", "self")]));
}

#[test]
fn amdgpu_card() {
    let (_d, s, _) = tree(Layout::Amdgpu);
    let r = s.resolve_card("card0").unwrap();
    assert_eq!(r.device.pci_address, "0000:0b:00.0");
    assert_eq!(r.device.driver, "amdgpu");
    assert_eq!(r.device.vendor_id.as_deref(), Some("0x1002"));
    assert_eq!(s.driver_of("0000:0b:00.0").as_deref(), Some("amdgpu"));
}

#[test]
fn xgmi_hive_members_share_the_domain() {
    let (_d, s, bdfs) = tree(Layout::XgmiHive2);
    assert_eq!(bdfs, ["0000:03:00.0", "0000:83:00.0", "0000:c3:00.0"]);
    let r = s.resolve_card("card0").unwrap();
    assert_eq!(r.device.numa_node, Some(0));
    let want = pairs(&[("0000:03:00.0", "self"), ("0000:83:00.0", "xgmi-hive")]);
    assert_eq!(domain(&r, "rebind"), want);
    assert_eq!(domain(&r, "bus-reset"), want);
    let member = &r.reset_domain[1];
    assert_eq!(member.card.as_deref(), Some("card1"));
    assert_eq!(member.render_node.as_deref(), Some("renderD129"));
    // The third GPU is in another hive: alone.
    let other = s.resolve_card("card2").unwrap();
    assert_eq!(
        domain(&other, "bus-reset"),
        pairs(&[("0000:c3:00.0", "self")])
    );
    // An unknown method (vendor-specific, cold-reset, …) is assumed to disturb the whole domain.
    assert_eq!(domain(&r, "cold-reset"), want);
}

#[test]
fn hdmi_audio_function_is_disturbed_by_bus_reset_only() {
    let (_d, s, _) = tree(Layout::GpuWithAudio);
    let r = s.resolve_card("card0").unwrap();
    assert_eq!(domain(&r, "rebind"), pairs(&[("0000:03:00.0", "self")]));
    assert_eq!(
        domain(&r, "bus-reset"),
        pairs(&[("0000:03:00.0", "self"), ("0000:03:00.1", "same-slot")])
    );
    assert_eq!(r.reset_domain[1].card, None);
    // The audio function is no GPU.
    assert_eq!(s.gpus().len(), 1);
}

#[test]
fn sriov_vfs_go_with_their_pf() {
    let (_d, s, bdfs) = tree(Layout::SriovPf);
    assert_eq!(bdfs, ["0000:03:00.0"]);
    let r = s.resolve_card("card0").unwrap();
    let want = pairs(&[
        ("0000:03:00.0", "self"),
        ("0000:03:00.1", "sriov-vf"),
        ("0000:03:00.2", "sriov-vf"),
    ]);
    assert_eq!(domain(&r, "rebind"), want);
    assert_eq!(domain(&r, "bus-reset"), want);
    assert_eq!(r.reset_domain[1].card.as_deref(), Some("card1"));
    assert_eq!(s.driver_of("0000:03:00.2").as_deref(), Some("vfio-pci"));
}

#[test]
fn unbound_device_has_an_empty_driver() {
    let (d, s, _) = tree(Layout::Xe);
    std::fs::remove_file(d.path().join("bus/pci/devices/0000:03:00.0/driver")).unwrap();
    let r = s.resolve_card("card0").unwrap();
    assert_eq!(r.device.driver, "");
    assert_eq!(s.driver_of("0000:03:00.0"), None);
    assert_eq!(s.gpus(), vec![("0000:03:00.0".to_string(), None)]);
}

#[test]
fn missing_entries_are_typed_errors_naming_the_path() {
    let (d, s, _) = tree(Layout::Xe);
    match s.resolve_card("card7") {
        Err(SysfsError::NotFound { path }) => {
            assert!(path.ends_with("class/drm/card7/device"), "{path:?}")
        }
        other => panic!("want NotFound, got {other:?}"),
    }
    assert!(matches!(
        s.resolve_card("renderD128"),
        Err(SysfsError::NotACard { .. })
    ));
    assert!(matches!(
        s.resolve_devpath("/devices/nowhere/drm/card0"),
        Err(SysfsError::NotFound { .. })
    ));
    std::fs::remove_file(d.path().join("bus/pci/devices/0000:03:00.0/vendor")).unwrap();
    let err = s.resolve_card("card0").unwrap_err();
    assert!(err.to_string().contains("0000:03:00.0/vendor"), "{err}");
    let empty = Sysfs::new(d.path().join("nope"));
    assert!(empty.gpus().is_empty());
    assert_eq!(empty.find_card_by_pci("0000:03:00.0"), None);
}

#[test]
fn fleets_of_cards() {
    let dir = tempfile::tempdir().unwrap();
    let bdfs = fixture::build_cards(dir.path(), 8, "xe", "0x8086").unwrap();
    assert_eq!(bdfs.len(), 8);
    let s = Sysfs::new(dir.path());
    assert_eq!(s.gpus().len(), 8);
    for (i, bdf) in bdfs.iter().enumerate() {
        let r = s.resolve_card(&format!("card{i}")).unwrap();
        assert_eq!(&r.device.pci_address, bdf);
        assert_eq!(r.device.render_node, Some(format!("renderD{}", 128 + i)));
        assert_eq!(domain(&r, "bus-reset").len(), 1, "each behind its own port");
    }
}
