//! The kernel uevent socket: `NETLINK_KOBJECT_UEVENT`, multicast group 1 (the kernel's own
//! broadcast; group 2 is udev's re-broadcast with a `libudev` header), read with tokio.
//!
//! Only messages whose sender port id is 0 are returned. Any process may multicast to group 1
//! itself, but then its own port id shows, so port 0 refuses forgeries by ordinary processes.
//! Port 0 is not proof of the kernel, though: a process with CAP_SYS_ADMIN over a network
//! namespace may send a uevent *to* the kernel (`uevent_net_rcv`), which rebroadcasts it from
//! port 0 to group 1 of that namespace. That is why the agent listens in its own pod network
//! namespace and never with `hostNetwork`: there only node root can forge, and kernel uevents
//! for devices reach every network namespace owned by the initial user namespace anyway
//! (docs/design.md §1). This module does no parsing: see [`crate::uevent`].

use std::io;
use std::os::fd::AsRawFd;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_KOBJECT_UEVENT};
use thiserror::Error;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The kernel's uevent multicast group (udev's re-broadcast is group 2, which we never join).
pub const KERNEL_GROUP: u32 = 1;
/// The receive buffer asked for by default (`--uevent-buffer-bytes`): a burst of uevents (a
/// hotplug storm, a flood) must not overrun.
pub const RECV_BUFFER_BYTES: usize = 16 << 20;
/// Larger than any uevent (the kernel caps one at a few KiB).
const MAX_MESSAGE: usize = 64 << 10;

/// Why no message could be returned.
#[derive(Debug, Error)]
pub enum ListenError {
    /// The socket's receive buffer overflowed (ENOBUFS): uevents were lost. Log it, count it,
    /// reconcile from sysfs and the API, then keep reading.
    #[error(
        "uevent receive buffer overrun: uevents were lost; reconcile from sysfs and keep reading"
    )]
    Overrun,
    /// A message longer than the read buffer arrived; it was dropped.
    #[error("uevent of {len} bytes exceeds the {MAX_MESSAGE}-byte read buffer; dropped")]
    Truncated {
        /// The message's real length.
        len: usize,
    },
    /// Any other socket error.
    #[error("reading the uevent socket failed: {0}")]
    Io(#[from] io::Error),
}

/// A bound, nonblocking uevent socket on the kernel's multicast group.
pub struct UeventListener {
    socket: AsyncFd<Socket>,
    buf: Vec<u8>,
    dropped_foreign: u64,
    recv_buffer: usize,
}

impl UeventListener {
    /// Opens and binds the socket in the calling thread's network namespace with the default
    /// receive buffer ([`RECV_BUFFER_BYTES`]). Must be called inside a tokio runtime (the socket
    /// registers with its reactor).
    pub fn bind() -> io::Result<Self> {
        Self::bind_with_buffer(RECV_BUFFER_BYTES)
    }

    /// Like [`Self::bind`], asking for a receive buffer of `bytes` (the kernel doubles it for
    /// its bookkeeping and enforces a floor of a few KiB; [`Self::recv_buffer`] says what it
    /// granted).
    pub fn bind_with_buffer(bytes: usize) -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_KOBJECT_UEVENT)?;
        // SO_RCVBUFFORCE ignores rmem_max but needs CAP_NET_ADMIN; fall back to SO_RCVBUF.
        if set_int(&socket, libc::SO_RCVBUFFORCE, bytes).is_err() {
            set_int(&socket, libc::SO_RCVBUF, bytes)?;
        }
        let recv_buffer = socket.get_rx_buf_sz()?;
        socket.bind(&SocketAddr::new(0, 1 << (KERNEL_GROUP - 1)))?;
        socket.set_non_blocking(true)?;
        // SAFETY: the netlink Socket owns its fd and closes it only on drop, so the fd stays
        // open and the same for the AsyncFd's whole life (it owns the Socket).
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self {
            socket,
            buf: Vec::with_capacity(MAX_MESSAGE),
            dropped_foreign: 0,
            recv_buffer,
        })
    }

    /// The next message sent from port id 0, as raw bytes. Messages from any other port are
    /// dropped and counted ([`Self::dropped_foreign`]).
    pub async fn next(&mut self) -> Result<Vec<u8>, ListenError> {
        loop {
            let mut guard = self.socket.readable().await?;
            let buf = &mut self.buf;
            buf.clear();
            let res = guard.try_io(|s| s.get_ref().recv_from(buf, libc::MSG_TRUNC));
            let (len, from) = match res {
                Err(_would_block) => continue,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(ListenError::Overrun);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(r)) => r,
            };
            if from.port_number() != 0 {
                self.dropped_foreign += 1;
                continue;
            }
            if len > self.buf.len() {
                return Err(ListenError::Truncated { len });
            }
            return Ok(self.buf.clone());
        }
    }

    /// How many messages came from a port id other than 0 and were dropped.
    pub fn dropped_foreign(&self) -> u64 {
        self.dropped_foreign
    }

    /// The receive buffer the kernel granted, in bytes (as `SO_RCVBUF` reports it).
    pub fn recv_buffer(&self) -> usize {
        self.recv_buffer
    }
}

fn set_int(socket: &Socket, opt: libc::c_int, value: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid fd, a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
