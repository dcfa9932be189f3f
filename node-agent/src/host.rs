//! The only code that changes the host: sysfs writes for unbind/bind/reset/remove/rescan and
//! the reboot. Behind the `HostActions` trait so the executor runs over a temporary sysfs tree
//! in tests; `SysfsHost` writes the real files under a configurable root.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::RebootMode;

/// A failed host action, naming the file or command.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A sysfs file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was tried.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The reboot (or another command) failed.
    #[error("{0}")]
    Command(String),
    /// A PCI address or driver name that would make a path outside the device's or driver's
    /// sysfs directory; nothing was written.
    #[error("refusing to write to sysfs: {0}")]
    Refused(String),
}

/// `bdf` and `driver` as path components, or why not (the executor's guard checks them
/// first; this is the last line before a write as root).
fn checked(bdf: &str, driver: Option<&str>) -> Result<(), HostError> {
    if !crate::sysfs::is_bdf(bdf) {
        return Err(HostError::Refused(format!("{bdf:?} is not a PCI address")));
    }
    match driver {
        Some(d) if !crate::guard::is_plain_driver_name(d) => Err(HostError::Refused(format!(
            "{d:?} is not a plain driver name"
        ))),
        _ => Ok(()),
    }
}

/// What the executor may do to the host, and what it reads back to verify.
pub trait HostActions: Send + Sync {
    /// Unbinds `bdf` from `driver`.
    fn unbind(&self, bdf: &str, driver: &str) -> Result<(), HostError>;
    /// Binds `bdf` to `driver`.
    fn bind(&self, bdf: &str, driver: &str) -> Result<(), HostError>;
    /// Resets the function through `reset`; returns the method the kernel uses (the first of
    /// `reset_method`, or `unknown` when the file is absent).
    fn pci_reset(&self, bdf: &str) -> Result<String, HostError>;
    /// Removes the function from the PCI bus.
    fn remove(&self, bdf: &str) -> Result<(), HostError>;
    /// Rescans the PCI bus.
    fn rescan(&self) -> Result<(), HostError>;
    /// Reboots the host (returns only if the reboot could not be started, or in command mode
    /// when the command returned before the host went down).
    fn reboot(&self) -> Result<(), HostError>;
    /// The current boot id.
    fn boot_id(&self) -> Result<String, HostError>;
    /// The driver bound to `bdf` now, if any.
    fn driver_of(&self, bdf: &str) -> Option<String>;
    /// The primary DRM node (`cardN`) of `bdf` now, if any.
    fn card_of(&self, bdf: &str) -> Option<String>;
    /// Whether `bdf` is a DRM device now (its sysfs directory has `drm/`).
    fn is_drm_device(&self, bdf: &str) -> bool;
    /// The PCI class of `bdf` (`0x030000`), if readable.
    fn pci_class(&self, bdf: &str) -> Option<u32>;
}

/// `HostActions` on a sysfs tree rooted at `sysfs_root`.
#[derive(Debug, Clone)]
pub struct SysfsHost {
    /// Where sysfs is (`/sys` in production).
    pub sysfs_root: PathBuf,
    /// How to reboot.
    pub reboot_mode: RebootMode,
    /// The command for `RebootMode::Command`: split on whitespace and run as an argv, without
    /// a shell ([`crate::verify_command::split_argv`]).
    pub reboot_command: String,
    /// The boot id file.
    pub boot_id_path: PathBuf,
}

fn write_file(path: &Path, value: &str) -> Result<(), HostError> {
    let io = |source| HostError::Io {
        op: "write",
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new().write(true).open(path).map_err(io)?;
    f.write_all(value.as_bytes()).map_err(io)
}

impl SysfsHost {
    fn pci(&self) -> PathBuf {
        self.sysfs_root.join("bus/pci")
    }
}

impl HostActions for SysfsHost {
    fn unbind(&self, bdf: &str, driver: &str) -> Result<(), HostError> {
        checked(bdf, Some(driver))?;
        write_file(&self.pci().join("drivers").join(driver).join("unbind"), bdf)
    }

    fn bind(&self, bdf: &str, driver: &str) -> Result<(), HostError> {
        checked(bdf, Some(driver))?;
        write_file(&self.pci().join("drivers").join(driver).join("bind"), bdf)
    }

    fn pci_reset(&self, bdf: &str) -> Result<String, HostError> {
        checked(bdf, None)?;
        let dev = self.pci().join("devices").join(bdf);
        let method = fs::read_to_string(dev.join("reset_method"))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string());
        write_file(&dev.join("reset"), "1")?;
        Ok(method)
    }

    fn remove(&self, bdf: &str) -> Result<(), HostError> {
        checked(bdf, None)?;
        write_file(&self.pci().join("devices").join(bdf).join("remove"), "1")
    }

    fn rescan(&self) -> Result<(), HostError> {
        write_file(&self.pci().join("rescan"), "1")
    }

    fn reboot(&self) -> Result<(), HostError> {
        match self.reboot_mode {
            RebootMode::Command => {
                let argv = crate::verify_command::split_argv(&self.reboot_command);
                let Some((program, args)) = argv.split_first() else {
                    return Err(HostError::Command(
                        "--reboot-command is empty: give a program and its arguments, e.g. \"systemctl reboot\"".to_string(),
                    ));
                };
                let status = Command::new(program).args(args).status().map_err(|e| {
                    let hint = if e.kind() == io::ErrorKind::NotFound {
                        " (it runs without a shell: name a program present in the agent's image; quotes, pipes and variables are not interpreted)"
                    } else {
                        ""
                    };
                    HostError::Command(format!("cannot run reboot command {argv:?}: {e}{hint}"))
                })?;
                if status.success() {
                    Ok(())
                } else {
                    Err(HostError::Command(format!(
                        "reboot command {argv:?} exited with {status}"
                    )))
                }
            }
            RebootMode::Syscall => {
                // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
                unsafe {
                    libc::sync();
                    libc::reboot(libc::RB_AUTOBOOT);
                }
                Err(HostError::Command(format!(
                    "reboot(2) failed: {} (the agent needs CAP_SYS_BOOT in the host's PID namespace)",
                    io::Error::last_os_error()
                )))
            }
        }
    }

    fn boot_id(&self) -> Result<String, HostError> {
        fs::read_to_string(&self.boot_id_path)
            .map(|s| s.trim().to_string())
            .map_err(|source| HostError::Io {
                op: "read",
                path: self.boot_id_path.clone(),
                source,
            })
    }

    fn driver_of(&self, bdf: &str) -> Option<String> {
        let link = fs::read_link(self.pci().join("devices").join(bdf).join("driver")).ok()?;
        link.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    fn card_of(&self, bdf: &str) -> Option<String> {
        let drm = self.pci().join("devices").join(bdf).join("drm");
        let mut cards: Vec<String> = fs::read_dir(drm)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.strip_prefix("card")
                    .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        cards.sort();
        cards.into_iter().next()
    }

    fn is_drm_device(&self, bdf: &str) -> bool {
        crate::sysfs::is_bdf(bdf) && self.pci().join("devices").join(bdf).join("drm").is_dir()
    }

    fn pci_class(&self, bdf: &str) -> Option<u32> {
        if !crate::sysfs::is_bdf(bdf) {
            return None;
        }
        let class = fs::read_to_string(self.pci().join("devices").join(bdf).join("class")).ok()?;
        u32::from_str_radix(class.trim().trim_start_matches("0x"), 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(root: &Path, cmd: &str) -> SysfsHost {
        SysfsHost {
            sysfs_root: root.to_path_buf(),
            reboot_mode: RebootMode::Command,
            reboot_command: cmd.to_string(),
            boot_id_path: root.join("boot_id"),
        }
    }

    #[test]
    fn writes_land_in_the_kernel_files() {
        let t = tempfile::tempdir().unwrap();
        let dev = t.path().join("bus/pci/devices/0000:03:00.0");
        let drv = t.path().join("bus/pci/drivers/xe");
        fs::create_dir_all(&dev).unwrap();
        fs::create_dir_all(dev.join("drm/card1")).unwrap();
        fs::create_dir_all(&drv).unwrap();
        for f in [
            drv.join("unbind"),
            drv.join("bind"),
            dev.join("reset"),
            dev.join("remove"),
            t.path().join("bus/pci/rescan"),
        ] {
            fs::write(f, "").unwrap();
        }
        fs::write(dev.join("reset_method"), "flr bus\n").unwrap();
        std::os::unix::fs::symlink("../../drivers/xe", dev.join("driver")).unwrap();
        let h = host(t.path(), "true");
        h.unbind("0000:03:00.0", "xe").unwrap();
        assert_eq!(
            fs::read_to_string(drv.join("unbind")).unwrap(),
            "0000:03:00.0"
        );
        assert_eq!(h.pci_reset("0000:03:00.0").unwrap(), "flr");
        assert_eq!(fs::read_to_string(dev.join("reset")).unwrap(), "1");
        assert_eq!(h.driver_of("0000:03:00.0").as_deref(), Some("xe"));
        assert_eq!(h.card_of("0000:03:00.0").as_deref(), Some("card1"));
        assert!(
            h.bind("0000:03:00.0", "amdgpu").is_err(),
            "no such driver dir"
        );
        assert!(h.is_drm_device("0000:03:00.0"));
        fs::write(dev.join("class"), "0x030000\n").unwrap();
        assert_eq!(h.pci_class("0000:03:00.0"), Some(0x030000));
        assert_eq!(h.pci_class("0000:04:00.0"), None);
        assert!(!h.is_drm_device("0000:04:00.0"));
    }

    #[test]
    fn paths_outside_sysfs_are_never_written() {
        let t = tempfile::tempdir().unwrap();
        let escape = t.path().join("tmp/x");
        fs::create_dir_all(&escape).unwrap();
        fs::write(escape.join("unbind"), "").unwrap();
        fs::create_dir_all(t.path().join("bus/pci/drivers")).unwrap();
        let h = host(&t.path().join("sys"), "true");
        for driver in ["../../../../tmp/x", "../x", "x/y", ""] {
            let e = h.unbind("0000:03:00.0", driver).unwrap_err();
            assert!(matches!(e, HostError::Refused(_)), "{driver}: {e}");
        }
        assert!(matches!(
            h.remove("../../../tmp/x"),
            Err(HostError::Refused(_))
        ));
        assert_eq!(fs::read_to_string(escape.join("unbind")).unwrap(), "");
    }

    #[test]
    fn reboot_command_mode_runs_the_command_and_reports_failure() {
        let t = tempfile::tempdir().unwrap();
        let marker = t.path().join("rebooted");
        let h = host(t.path(), &format!("touch {}", marker.display()));
        h.reboot().unwrap();
        assert!(marker.exists());
        assert!(host(t.path(), "false").reboot().is_err());
    }

    #[test]
    fn the_reboot_command_runs_as_argv_not_through_a_shell() {
        let t = tempfile::tempdir().unwrap();
        // A shell would strip the quotes and `test` would pass; as argv `"x"` is not `x`.
        host(t.path(), "test x = x").reboot().unwrap();
        let quoted = host(t.path(), "test \"x\" = x").reboot().unwrap_err();
        assert!(quoted.to_string().contains("exited with"), "{quoted}");
        // `exit` is a shell builtin, not a program: without a shell it is not found.
        let builtin = host(t.path(), "exit 0").reboot().unwrap_err();
        assert!(builtin.to_string().contains("without a shell"), "{builtin}");
        // `;` is an argument of `true`, not a command separator: the marker is not written.
        let marker = t.path().join("second");
        host(t.path(), &format!("true ; touch {}", marker.display()))
            .reboot()
            .unwrap();
        assert!(!marker.exists());
        let empty = host(t.path(), "  ").reboot().unwrap_err();
        assert!(empty.to_string().contains("is empty"), "{empty}");
    }
}
