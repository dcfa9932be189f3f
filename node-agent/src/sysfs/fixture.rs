//! Fake sysfs trees in the kernel's layout: real directories under `devices/`, and the same
//! relative symlinks the kernel creates (`class/drm/cardN`, `device`, `driver`, `subsystem`,
//! `bus/pci/devices/<bdf>`, `bus/pci/drivers/<drv>/<bdf>`, `virtfnN`/`physfn`), plus the writable
//! control files (`bind`, `unbind`, `reset`, `reset_method`, `remove`, `rescan`) as plain files.
//!
//! Sources of the layouts:
//! - Link targets and attribute names: Documentation/ABI/testing/sysfs-bus-pci (bind, unbind,
//!   reset, reset_method, remove, rescan, numa_node, sriov_numvfs, virtfnN/physfn) and
//!   Documentation/ABI/testing/sysfs-class-drm; `/sys/class/drm/card0 ->
//!   ../../devices/pci0000:00/0000:00:02.0/drm/card0` and `device -> ../../../0000:00:02.0` as
//!   in `ls -l /sys/class/drm` listings of i915 laptops in freedesktop drm/intel issues.
//! - xe discrete (Arc/Battlemage): the GPU sits behind the card's own PCIe switch
//!   (root port 00:01.0 → upstream 01:00.0 → downstream 02:01.0 → GPU 03:00.0), as `lspci -tv`
//!   shows in drm/xe kernel issues; `survivability_mode` at `/sys/bus/pci/devices/0000:03:00.0/`
//!   as in the xe survivability commit message ("drm/xe/xe_survivability: Redesign
//!   survivability mode", Riana Tauro, 2025).
//! - i915 integrated: 0000:00:02.0 directly on the root bus.
//! - amdgpu (Navi): root port 00:03.1 → switch 09:00.0 → 0a:00.0 → GPU 0b:00.0, audio 0b:00.1,
//!   as in amdgpu bug reports' `lspci -tv` (gitlab.freedesktop.org/drm/amd issues).
//! - XGMI hive: `device/xgmi_hive_info/xgmi_hive_id` and `xgmi_hive_info/node<N>/xgmi_device_id`
//!   per the kernel's "AMDGPU XGMI Support" doc (Documentation/gpu/amdgpu/xgmi.rst).
//! - SR-IOV PF: `virtfnN -> ../<vf bdf>` on the PF and `physfn -> ../<pf bdf>` on each VF
//!   (sysfs-bus-pci, "sriov_numvfs"), as Intel's GPU device plugin README describes for
//!   SR-IOV GPUs.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::Path;

/// A machine layout to lay out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// An Intel discrete GPU on xe at 0000:03:00.0 (card0, renderD128) behind its own switch.
    Xe,
    /// An Intel integrated GPU on i915 at 0000:00:02.0 (card0, renderD128) on the root bus.
    I915,
    /// An AMD GPU on amdgpu at 0000:0b:00.0 (card0, renderD128) behind a switch.
    Amdgpu,
    /// Two amdgpu Instinct GPUs in one XGMI hive (0000:03:00.0 card0, 0000:83:00.0 card1) and a
    /// third in another hive (0000:c3:00.0 card2).
    XgmiHive2,
    /// An amdgpu GPU at 0000:03:00.0 with its HDMI audio function 0000:03:00.1 (snd_hda_intel).
    GpuWithAudio,
    /// An xe SR-IOV physical function 0000:03:00.0 (card0) with two VFs: 0000:03:00.1 on xe
    /// (card1) and 0000:03:00.2 on vfio-pci (no DRM node).
    SriovPf,
}

/// One PCI function to create.
struct Func<'a> {
    /// Path under `devices/`, parent included: `pci0000:00/0000:00:01.0`.
    parent: &'a str,
    bdf: &'a str,
    driver: Option<&'a str>,
    vendor: &'a str,
    device: &'a str,
    class: &'a str,
    numa: i32,
    /// DRM minor (card N, renderD 128+N), when the function is a GPU with DRM nodes.
    drm_minor: Option<u32>,
}

fn write(path: &Path, content: &str) -> io::Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(path, content)
}

fn link(target: &str, at: &Path) -> io::Result<()> {
    if let Some(p) = at.parent() {
        fs::create_dir_all(p)?;
    }
    if at.symlink_metadata().is_ok() {
        fs::remove_file(at)?;
    }
    symlink(target, at)
}

fn ups(n: usize) -> String {
    "../".repeat(n)
}

/// Creates `devices/<parent>` bridges (each a directory with a PCI class file) as needed.
fn bridge_chain(root: &Path, parent: &str) -> io::Result<()> {
    let mut path = root.join("devices");
    for part in parent.split('/') {
        path = path.join(part);
        fs::create_dir_all(&path)?;
        if crate::sysfs::is_bdf(part) && !path.join("class").exists() {
            write(&path.join("class"), "0x060400\n")?; // PCI-to-PCI bridge
            link(
                &format!("{}bus/pci/drivers/pcieport", ups(rel_depth(&path, root))),
                &path.join("driver"),
            )?;
            let bdf = part;
            link(
                &format!("../../../devices/{}", rel(&path, root)),
                &root.join("bus/pci/devices").join(bdf),
            )?;
        }
    }
    Ok(())
}

/// Path of `p` relative to `<root>/devices`.
fn rel(p: &Path, root: &Path) -> String {
    p.strip_prefix(root.join("devices"))
        .map(|r| r.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Number of components of `p` below `root`.
fn rel_depth(p: &Path, root: &Path) -> usize {
    p.strip_prefix(root)
        .map(|r| r.components().count())
        .unwrap_or(0)
}

fn add(root: &Path, f: &Func) -> io::Result<()> {
    bridge_chain(root, f.parent)?;
    let dev = root.join("devices").join(f.parent).join(f.bdf);
    fs::create_dir_all(&dev)?;
    let depth = rel_depth(&dev, root);
    write(&dev.join("vendor"), &format!("{}\n", f.vendor))?;
    write(&dev.join("device"), &format!("{}\n", f.device))?;
    write(&dev.join("class"), &format!("{}\n", f.class))?;
    write(&dev.join("numa_node"), &format!("{}\n", f.numa))?;
    write(&dev.join("reset"), "")?;
    write(&dev.join("reset_method"), "flr bus\n")?;
    write(&dev.join("remove"), "")?;
    write(
        &dev.join("uevent"),
        &format!(
            "DRIVER={}\nPCI_SLOT_NAME={}\n",
            f.driver.unwrap_or(""),
            f.bdf
        ),
    )?;
    link(&format!("{}bus/pci", ups(depth)), &dev.join("subsystem"))?;
    link(
        &format!("../../../devices/{}", rel(&dev, root)),
        &root.join("bus/pci/devices").join(f.bdf),
    )?;
    write(&root.join("bus/pci/rescan"), "")?;
    if let Some(drv) = f.driver {
        let drvdir = root.join("bus/pci/drivers").join(drv);
        write(&drvdir.join("bind"), "")?;
        write(&drvdir.join("unbind"), "")?;
        link(
            &format!("{}bus/pci/drivers/{drv}", ups(depth)),
            &dev.join("driver"),
        )?;
        link(
            &format!("../../../../devices/{}", rel(&dev, root)),
            &drvdir.join(f.bdf),
        )?;
    }
    if let Some(n) = f.drm_minor {
        for (name, minor) in [
            (format!("card{n}"), n),
            (format!("renderD{}", 128 + n), 128 + n),
        ] {
            let node = dev.join("drm").join(&name);
            fs::create_dir_all(&node)?;
            write(&node.join("dev"), &format!("226:{minor}\n"))?;
            write(
                &node.join("uevent"),
                &format!("MAJOR=226\nMINOR={minor}\nDEVNAME=dri/{name}\nDEVTYPE=drm_minor\n"),
            )?;
            link(&format!("../../../{}", f.bdf), &node.join("device"))?;
            link(
                &format!("{}class/drm", ups(depth + 2)),
                &node.join("subsystem"),
            )?;
            link(
                &format!("../../devices/{}/drm/{name}", rel(&dev, root)),
                &root.join("class/drm").join(&name),
            )?;
        }
    }
    Ok(())
}

fn gpu<'a>(
    parent: &'a str,
    bdf: &'a str,
    driver: &'a str,
    vendor: &'a str,
    device: &'a str,
    class: &'a str,
    minor: u32,
) -> Func<'a> {
    Func {
        parent,
        bdf,
        driver: Some(driver),
        vendor,
        device,
        class,
        numa: -1,
        drm_minor: Some(minor),
    }
}

/// Lays out `layout` under `root` and returns the GPUs' PCI addresses (card order).
pub fn build(root: &Path, layout: Layout) -> io::Result<Vec<String>> {
    let funcs: Vec<Func> = match layout {
        Layout::Xe => vec![gpu(
            "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0",
            "0000:03:00.0",
            "xe",
            "0x8086",
            "0xe20b",
            "0x030000",
            0,
        )],
        Layout::I915 => vec![gpu(
            "pci0000:00",
            "0000:00:02.0",
            "i915",
            "0x8086",
            "0x9a49",
            "0x030000",
            0,
        )],
        Layout::Amdgpu => vec![gpu(
            "pci0000:00/0000:00:03.1/0000:09:00.0/0000:0a:00.0",
            "0000:0b:00.0",
            "amdgpu",
            "0x1002",
            "0x73bf",
            "0x030000",
            0,
        )],
        Layout::XgmiHive2 => vec![
            Func {
                numa: 0,
                ..gpu(
                    "pci0000:00/0000:00:01.1",
                    "0000:03:00.0",
                    "amdgpu",
                    "0x1002",
                    "0x740c",
                    "0x038000",
                    0,
                )
            },
            Func {
                numa: 1,
                ..gpu(
                    "pci0000:80/0000:80:01.1",
                    "0000:83:00.0",
                    "amdgpu",
                    "0x1002",
                    "0x740c",
                    "0x038000",
                    1,
                )
            },
            Func {
                numa: 1,
                ..gpu(
                    "pci0000:c0/0000:c0:01.1",
                    "0000:c3:00.0",
                    "amdgpu",
                    "0x1002",
                    "0x740c",
                    "0x038000",
                    2,
                )
            },
        ],
        Layout::GpuWithAudio => vec![
            gpu(
                "pci0000:00/0000:00:01.1",
                "0000:03:00.0",
                "amdgpu",
                "0x1002",
                "0x73bf",
                "0x030000",
                0,
            ),
            Func {
                parent: "pci0000:00/0000:00:01.1",
                bdf: "0000:03:00.1",
                driver: Some("snd_hda_intel"),
                vendor: "0x1002",
                device: "0xab28",
                class: "0x040300",
                numa: -1,
                drm_minor: None,
            },
        ],
        Layout::SriovPf => vec![
            gpu(
                "pci0000:00/0000:00:01.0",
                "0000:03:00.0",
                "xe",
                "0x8086",
                "0xe20b",
                "0x030000",
                0,
            ),
            gpu(
                "pci0000:00/0000:00:01.0",
                "0000:03:00.1",
                "xe",
                "0x8086",
                "0xe20b",
                "0x030000",
                1,
            ),
            Func {
                parent: "pci0000:00/0000:00:01.0",
                bdf: "0000:03:00.2",
                driver: Some("vfio-pci"),
                vendor: "0x8086",
                device: "0xe20b",
                class: "0x030000",
                numa: -1,
                drm_minor: None,
            },
        ],
    };
    for f in &funcs {
        add(root, f)?;
    }
    let dev = |parent: &str, bdf: &str| root.join("devices").join(parent).join(bdf);
    match layout {
        Layout::XgmiHive2 => {
            let hive_a = "0x3f2a7e5c1b9d0e11";
            for (i, f) in funcs.iter().enumerate() {
                let d = dev(f.parent, f.bdf);
                let hive = if i < 2 { hive_a } else { "0x7c11d40f2e8a9b36" };
                write(&d.join("xgmi_device_id"), &format!("{}\n", 0x1000 + i))?;
                write(&d.join("xgmi_hive_info/xgmi_hive_id"), &format!("{hive}\n"))?;
                let members: Vec<usize> = if i < 2 { vec![0, 1] } else { vec![2] };
                for (n, m) in members.iter().enumerate() {
                    write(
                        &d.join(format!("xgmi_hive_info/node{}/xgmi_device_id", n + 1)),
                        &format!("{}\n", 0x1000 + m),
                    )?;
                }
            }
        }
        Layout::SriovPf => {
            let pf = dev(funcs[0].parent, funcs[0].bdf);
            write(&pf.join("sriov_totalvfs"), "2\n")?;
            write(&pf.join("sriov_numvfs"), "2\n")?;
            for (i, vf) in funcs[1..].iter().enumerate() {
                link(&format!("../{}", vf.bdf), &pf.join(format!("virtfn{i}")))?;
                link(
                    &format!("../{}", funcs[0].bdf),
                    &dev(vf.parent, vf.bdf).join("physfn"),
                )?;
            }
        }
        _ => {}
    }
    Ok(funcs
        .iter()
        .filter(|f| f.drm_minor.is_some() && !is_vf(layout, f.bdf))
        .map(|f| f.bdf.to_string())
        .collect())
}

fn is_vf(layout: Layout, bdf: &str) -> bool {
    layout == Layout::SriovPf && bdf != "0000:03:00.0"
}

/// Lays out `n` GPUs bound to `driver` (vendor id `vendor`, e.g. `0x8086`), each behind its own
/// root port: GPU i at `0000:<i+3>:00.0` with `card<i>` and `renderD<128+i>`. For fleets.
pub fn build_cards(root: &Path, n: u32, driver: &str, vendor: &str) -> io::Result<Vec<String>> {
    let device = match vendor {
        "0x8086" => "0xe20b",
        "0x1002" => "0x740f",
        _ => "0x0001",
    };
    let mut out = Vec::new();
    for i in 0..n {
        let port = format!("pci0000:00/0000:00:{:02x}.0", i % 31 + 1);
        let bdf = format!("0000:{:02x}:00.0", (i + 3) % 256);
        add(
            root,
            &gpu(&port, &bdf, driver, vendor, device, "0x030000", i),
        )?;
        out.push(bdf);
    }
    Ok(out)
}
