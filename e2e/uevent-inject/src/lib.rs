//! Feeding uevents to a real kernel, the way docs/design.md §1 prescribes for tests without a hung GPU.
//!
//! [`send_to_kernel`] sends a verbatim uevent *to* the kernel on `NETLINK_KOBJECT_UEVENT`
//! (port 0, an `nlmsghdr` of type 0x10 with `NLM_F_REQUEST`); the kernel's `uevent_net_rcv`
//! rebroadcasts it from port id 0, with a fresh `SEQNUM`, to group 1 of the caller's network
//! namespace, exactly as its own uevents. It needs CAP_SYS_ADMIN over that namespace (root, or
//! `unshare -Urn`). [`multicast_as_process`] is the forgery the agent must refuse: a message a
//! process multicasts to group 1 itself carries its own port id. Only `libc`: this module is
//! also compiled into the static `uevent-inject` binary copied into kind nodes.

use std::io;

const NETLINK_KOBJECT_UEVENT: libc::c_int = 15;
/// The message type the kernel expects on a uevent sent to it (`uevent_net_rcv`).
const UEVENT_MSG_TYPE: u16 = 0x10;
const NLMSG_HDRLEN: usize = 16;

/// The uevent of a wedged card, as drivers send it (docs/design.md §1), without `SEQNUM` (the kernel
/// adds a fresh one). `extra` is appended verbatim (e.g. `PID`, `TASK`).
pub fn wedge_payload(
    devpath: &str,
    card: &str,
    methods: &[&str],
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let minor = card.trim_start_matches("card");
    let mut fields = vec![
        "ACTION=change".to_string(),
        format!("DEVPATH={devpath}"),
        "SUBSYSTEM=drm".to_string(),
        "DEVTYPE=drm_minor".to_string(),
        format!("DEVNAME=dri/{card}"),
        "MAJOR=226".to_string(),
        format!("MINOR={minor}"),
        format!("WEDGED={}", methods.join(",")),
    ];
    fields.extend(extra.iter().map(|(k, v)| format!("{k}={v}")));
    encode("change", devpath, &fields)
}

/// An irrelevant uevent (a USB device change) for floods; `n` makes each one distinct.
pub fn usb_payload(n: u64) -> Vec<u8> {
    let devpath = format!("/devices/pci0000:00/0000:00:14.0/usb1/1-{}", n % 16 + 1);
    let fields = [
        "ACTION=change".to_string(),
        format!("DEVPATH={devpath}"),
        "SUBSYSTEM=usb".to_string(),
        "DEVTYPE=usb_device".to_string(),
        format!("PRODUCT=46d/c52b/{n:x}"),
    ];
    encode("change", &devpath, &fields)
}

/// `ACTION@DEVPATH\0KEY=VALUE\0…`.
pub fn encode(action: &str, devpath: &str, fields: &[String]) -> Vec<u8> {
    let mut out = format!("{action}@{devpath}\0").into_bytes();
    for f in fields {
        out.extend_from_slice(f.as_bytes());
        out.push(0);
    }
    out
}

/// A captured kernel payload made fit to replay: every `SEQNUM=` field after the header is
/// removed (the kernel appends a fresh one to whatever it is sent, and a second would make the
/// event ambiguous). Every other byte is kept as captured, a missing terminating NUL included.
pub fn strip_seqnum(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len());
    for (i, field) in payload.split_inclusive(|b| *b == 0).enumerate() {
        if i > 0 && field.starts_with(b"SEQNUM=") {
            continue;
        }
        out.extend_from_slice(field);
    }
    out
}

/// A netlink uevent socket, closed on drop.
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by this value and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn socket() -> io::Result<Fd> {
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_KOBJECT_UEVENT,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Fd(fd))
}

fn send_to(fd: &Fd, msg: &[u8], groups: u32) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_nl is valid; fields set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_pid = 0;
    addr.nl_groups = groups;
    // SAFETY: msg and addr are live for the call, lengths exact.
    let rc = unsafe {
        libc::sendto(
            fd.0,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc as usize != msg.len() {
        return Err(io::Error::other(format!(
            "short send: {rc} of {} bytes",
            msg.len()
        )));
    }
    Ok(())
}

/// Sends `payload` to the kernel (port 0), which rebroadcasts it from port id 0 to group 1 of
/// the current network namespace. Fails with EPERM without CAP_SYS_ADMIN over the namespace.
pub fn send_to_kernel(payload: &[u8]) -> io::Result<()> {
    let fd = socket()?;
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + payload.len());
    let len = u32::try_from(NLMSG_HDRLEN + payload.len())
        .map_err(|_| io::Error::other("payload too large"))?;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&UEVENT_MSG_TYPE.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg.extend_from_slice(payload);
    send_to(&fd, &msg, 0)
}

/// Multicasts `payload` to group 1 from this process's own (kernel-assigned) port id: the
/// forgery any process can attempt and the agent must refuse.
pub fn multicast_as_process(payload: &[u8]) -> io::Result<()> {
    let fd = socket()?;
    send_to(&fd, payload, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_seqnum_removes_only_the_seqnum_field() {
        let captured =
            b"change@/d/drm/card0\0ACTION=change\0SEQNUM=5208\0WEDGED=rebind\0X_SEQNUM=1\0";
        assert_eq!(
            strip_seqnum(captured),
            b"change@/d/drm/card0\0ACTION=change\0WEDGED=rebind\0X_SEQNUM=1\0"
        );
        let last = b"change@/d/drm/card0\0WEDGED=rebind\0SEQNUM=7\0";
        assert_eq!(strip_seqnum(last), b"change@/d/drm/card0\0WEDGED=rebind\0");
        let cut = b"change@/d/drm/card0\0SEQNUM=7\0WEDGED=rebind,bus-re";
        assert_eq!(
            strip_seqnum(cut),
            b"change@/d/drm/card0\0WEDGED=rebind,bus-re"
        );
        let unterminated_seqnum = b"change@/d/drm/card0\0WEDGED=none\0SEQNUM=7";
        assert_eq!(
            strip_seqnum(unterminated_seqnum),
            b"change@/d/drm/card0\0WEDGED=none\0"
        );
    }
}
