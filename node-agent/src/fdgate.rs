//! The fd gate (docs/design.md §1): right before acting, find every process on the host that holds a
//! card or render node of the reset domain, from `/proc/*/fd` links and `/proc/*/fdinfo`
//! `drm-pdev:` lines (the latter catch containers whose device node has another path).
//!
//! Read-only and tolerant: processes come and go while we scan; what vanished is skipped.

use std::fs;
use std::path::{Path, PathBuf};

/// A process holding a device node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    /// Host PID.
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub comm: String,
    /// What the fd points at (or `drm-pdev:<bdf>` when matched through fdinfo).
    pub path: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}) holds {}", self.pid, self.comm, self.path)
    }
}

/// The holders of `nodes` (`card0`, `renderD128`, ...) under `<dev_root>/dri/` and under
/// `/dev/dri/` (a link shows the path as the holder sees it: host processes say `/dev/dri/card0`
/// even when the agent mounts the host's /dev elsewhere), and of any DRM fd whose fdinfo names one of `pci_addresses`.
/// The agent's own PID is skipped. Sorted and one entry per (pid, path).
pub fn holders(
    proc_root: &Path,
    dev_root: &Path,
    nodes: &[String],
    pci_addresses: &[String],
) -> Vec<Holder> {
    let targets: Vec<PathBuf> = nodes.iter().map(|n| dev_root.join("dri").join(n)).collect();
    let own = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir(proc_root) else {
        tracing::error!(proc_root = %proc_root.display(), "cannot read proc root; the fd gate sees nothing");
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut found: Vec<String> = Vec::new();
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if targets.contains(&target) || is_dev_dri_node(&target, nodes) {
                found.push(target.display().to_string());
                continue;
            }
            if !pci_addresses.is_empty() && looks_like_device(&target) {
                let info = p.path().join("fdinfo").join(fd.file_name());
                if let Some(pdev) = drm_pdev(&info)
                    && pci_addresses.contains(&pdev)
                {
                    found.push(format!("drm-pdev:{pdev} via {}", target.display()));
                }
            }
        }
        if found.is_empty() {
            continue;
        }
        let comm = fs::read_to_string(p.path().join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        found.sort();
        found.dedup();
        out.extend(found.into_iter().map(|path| Holder {
            pid,
            comm: comm.clone(),
            path,
        }));
    }
    out.sort();
    out
}

fn is_dev_dri_node(target: &Path, nodes: &[String]) -> bool {
    target.parent() == Some(Path::new("/dev/dri"))
        && target
            .file_name()
            .is_some_and(|f| nodes.iter().any(|n| f == n.as_str()))
}

/// DRM fds point at device nodes, wherever the container mounted them.
fn looks_like_device(target: &Path) -> bool {
    let s = target.to_string_lossy();
    s.starts_with("/dev/") || s.contains("/dri/")
}

fn drm_pdev(fdinfo: &Path) -> Option<String> {
    let text = fs::read_to_string(fdinfo).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("drm-pdev:"))
        .map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_proc_tree_matches_links_and_fdinfo() {
        let t = tempfile::tempdir().unwrap();
        let proc_root = t.path().join("proc");
        let dev = t.path().join("dev");
        fs::create_dir_all(dev.join("dri")).unwrap();
        let p = proc_root.join("4242");
        fs::create_dir_all(p.join("fd")).unwrap();
        fs::create_dir_all(p.join("fdinfo")).unwrap();
        fs::write(p.join("comm"), "llama\n").unwrap();
        std::os::unix::fs::symlink(dev.join("dri/renderD128"), p.join("fd/3")).unwrap();
        std::os::unix::fs::symlink("/dev/dri/renderD129", p.join("fd/4")).unwrap();
        fs::write(
            p.join("fdinfo/4"),
            "pos:\t0\ndrm-driver:\txe\ndrm-pdev:\t0000:03:00.0\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/tmp/other", p.join("fd/5")).unwrap();
        let h = holders(
            &proc_root,
            &dev,
            &["card0".into(), "renderD128".into()],
            &["0000:03:00.0".into()],
        );
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.iter().all(|h| h.pid == 4242 && h.comm == "llama"));
        assert!(
            h.iter()
                .any(|h| h.path.starts_with("drm-pdev:0000:03:00.0"))
        );
        let none = holders(
            &proc_root,
            &dev,
            &["card1".into()],
            &["0000:04:00.0".into()],
        );
        assert!(none.is_empty(), "{none:?}");
    }
}
