//! The blamed task (`PID=` of a `WEDGED=none` event, docs/design.md §1) to its container and pod UID,
//! from `/proc/<PID>/cgroup`. The pod itself is then found through the API (pods on this node
//! with that UID); this module only reads the file.
//!
//! Both cgroup versions and both kubelet cgroup drivers are understood:
//! - cgroup v2 has one line `0::<path>`; v1 has `N:<controllers>:<path>` per hierarchy.
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<container id>` (guaranteed pods sit
//!   directly under `/kubepods`).
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
//!   '-' escaped to '_'>.slice/<runtime>-<container id>.scope`, with `cri-containerd-`,
//!   `docker-` or `crio-` as the runtime prefix; under kind the root is
//!   `/kubelet.slice/kubelet-kubepods.slice/…`.
//!
//! Sources: the kubelet's cgroup naming (pkg/kubelet/cm/cgroup_manager_linux.go: the systemd
//! driver escapes the pod UID's dashes; `pod_container_manager_linux.go`: `pod<uid>`), and
//! `/proc/<pid>/cgroup` lines quoted in containerd and cri-o issues (e.g. containerd's
//! `cri-containerd-<id>.scope` units, cri-o's `crio-<id>.scope`).

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where the blamed task runs, as far as its cgroup tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The pod's UID (with dashes), when the task runs in a Kubernetes pod.
    pub pod_uid: Option<String>,
    /// The container id (64 hex digits), when the task runs in a container.
    pub container_id: Option<String>,
}

/// Why the blamed task's cgroup could not be read.
#[derive(Debug, Error)]
pub enum BlamedError {
    /// The process no longer exists (it may have exited after the hang).
    #[error("blamed PID {pid}: no such process ({}); it may have exited", path.display())]
    Gone {
        /// The PID.
        pid: i64,
        /// The file that was missing.
        path: PathBuf,
    },
    /// The PID is not a valid process id.
    #[error("blamed PID {pid} is not a valid process id")]
    BadPid {
        /// The PID.
        pid: i64,
    },
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Reads `<proc_root>/<pid>/cgroup` and extracts the pod UID and container id.
pub fn cgroup_of(proc_root: &Path, pid: i64) -> Result<CgroupInfo, BlamedError> {
    if pid <= 0 {
        return Err(BlamedError::BadPid { pid });
    }
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let text = std::fs::read_to_string(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            BlamedError::Gone {
                pid,
                path: path.clone(),
            }
        } else {
            BlamedError::Io {
                path: path.clone(),
                source,
            }
        }
    })?;
    Ok(parse_cgroup(&text))
}

/// Extracts the pod UID and container id from the text of a `/proc/<pid>/cgroup` file.
/// The v2 line (`0::`) is preferred; otherwise the first v1 line naming a pod.
pub fn parse_cgroup(text: &str) -> CgroupInfo {
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        if let (Some(id), Some(_controllers), Some(path)) = (it.next(), it.next(), it.next()) {
            if id == "0" {
                v2.push(path)
            } else {
                v1.push(path)
            }
        }
    }
    v2.into_iter()
        .chain(v1)
        .map(parse_path)
        .find(|i| i.pod_uid.is_some())
        .unwrap_or_default()
}

/// Pod UID and container id from one cgroup path.
fn parse_path(path: &str) -> CgroupInfo {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if !parts.iter().any(|p| p.contains("kubepods")) {
        return CgroupInfo::default();
    }
    let Some(pod_at) = parts.iter().position(|p| pod_uid(p).is_some()) else {
        return CgroupInfo::default();
    };
    let pod_uid = pod_uid(parts[pod_at]);
    let container_id = parts.get(pod_at + 1).and_then(|c| container_id(c));
    CgroupInfo {
        pod_uid,
        container_id,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_escaped>.slice` (systemd) to the UID.
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let at = part.rfind("pod")?;
    if at > 0 && !part[..at].ends_with('-') {
        return None;
    }
    let uid = part[at + 3..].replace('_', "-");
    // A UUID (36) or, for static pods, the kubelet's 32-hex-digit config hash.
    let ok = (uid.len() == 36 || uid.len() == 32)
        && uid.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-');
    ok.then_some(uid)
}

/// `<id>` (cgroupfs) or `<runtime>-<id>.scope` (systemd) to the 64-hex-digit container id.
fn container_id(part: &str) -> Option<String> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    let id = ["cri-containerd-", "docker-", "crio-", "containerd-"]
        .iter()
        .find_map(|p| part.strip_prefix(p))
        .unwrap_or(part);
    (id.len() == 64 && id.bytes().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "5e7b1a0a3f1d2c4b8e9f00112233445566778899aabbccddeeff001122334455";
    const UID: &str = "0f3a2b1c-4d5e-6f70-8192-a3b4c5d6e7f8";
    const UID_: &str = "0f3a2b1c_4d5e_6f70_8192_a3b4c5d6e7f8";

    fn want() -> CgroupInfo {
        CgroupInfo {
            pod_uid: Some(UID.into()),
            container_id: Some(CID.into()),
        }
    }

    #[test]
    fn v2_systemd_containerd() {
        let t = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup(&t), want());
    }

    #[test]
    fn v2_systemd_guaranteed_crio_and_docker() {
        let t = format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope\n");
        assert_eq!(parse_cgroup(&t), want());
        let t = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup(&t), want());
    }

    #[test]
    fn v2_cgroupfs_driver() {
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/burstable/pod{UID}/{CID}\n")),
            want()
        );
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/pod{UID}/{CID}\n")),
            want()
        );
        assert_eq!(
            parse_cgroup(&format!("0::/kubepods/besteffort/pod{UID}/{CID}\n")),
            want()
        );
    }

    #[test]
    fn kind_node_nested_root() {
        let t = format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup(&t), want());
    }

    #[test]
    fn v1_lines() {
        let t = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{CID}\n11:memory:/kubepods/burstable/pod{UID}/{CID}\n1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
        );
        assert_eq!(parse_cgroup(&t), want());
        let t = format!(
            "13:cpuset:/\n4:devices:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup(&t), want());
    }

    #[test]
    fn pod_cgroup_without_container_and_static_pod_hash() {
        let t = format!("0::/kubepods/burstable/pod{UID}\n");
        assert_eq!(
            parse_cgroup(&t),
            CgroupInfo {
                pod_uid: Some(UID.into()),
                container_id: None
            }
        );
        let hash = "6c1a2fb4d2a94e0f8f3c5d7e9b1a2c3d";
        let t = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup(&t).pod_uid.as_deref(), Some(hash));
    }

    #[test]
    fn host_processes_have_no_pod() {
        for t in [
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/system.slice/containerd.service\n",
            "0::/\n",
            "",
            "garbage",
            &format!("0::/kubepods.slice/kubepods-burstable.slice/crio-conmon-{CID}.scope\n"),
        ] {
            assert_eq!(parse_cgroup(t), CgroupInfo::default(), "{t:?}");
        }
    }

    #[test]
    fn reads_proc() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("4242")).unwrap();
        std::fs::write(
            dir.path().join("4242/cgroup"),
            format!("0::/kubepods/pod{UID}/{CID}\n"),
        )
        .unwrap();
        assert_eq!(cgroup_of(dir.path(), 4242).unwrap(), want());
        assert!(matches!(
            cgroup_of(dir.path(), 7),
            Err(BlamedError::Gone { pid: 7, .. })
        ));
        assert!(matches!(
            cgroup_of(dir.path(), -1),
            Err(BlamedError::BadPid { .. })
        ));
        // This very process, on the real /proc: readable, whatever it says.
        assert!(cgroup_of(Path::new("/proc"), i64::from(std::process::id())).is_ok());
    }
}
