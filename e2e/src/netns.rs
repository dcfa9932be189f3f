//! A private network namespace per simulated node, as an agent pod has one.
//!
//! Uevents injected into the kernel from inside the namespace are rebroadcast to that namespace
//! only (docs/design.md §1), so each node's agent hears its own wedges and nobody else's. The API server
//! listens on the host's loopback, which the namespace cannot reach: a listener created *inside*
//! the namespace on `127.0.0.1:<api port>` (a socket keeps the namespace it was created in) is
//! served by a harness task that connects to the real API server from the host side. The agent
//! sees an ordinary `https://127.0.0.1:<port>` server; it has no test-only mode.
//!
//! Creating a network namespace needs CAP_SYS_ADMIN: the suite runs as root (as CI does here).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A network namespace with a loopback bridge to the API server.
pub struct NetNs {
    ns: File,
    bridge: JoinHandle<()>,
}

fn lo_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq naming "lo"; the fd is closed below.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr);
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(s);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

impl NetNs {
    /// Creates a namespace whose `127.0.0.1:api_port` reaches the host's `127.0.0.1:api_port`.
    pub async fn new(api_port: u16) -> io::Result<NetNs> {
        // A short-lived thread moves itself into a new namespace, brings up loopback, binds the
        // listener there and hands back the listener and a handle on the namespace.
        let (listener, ns) = std::thread::spawn(move || -> io::Result<(std::net::TcpListener, File)> {
            // SAFETY: unshare affects only this thread, which exits right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "unshare(CLONE_NEWNET): {} (the e2e suite needs root for network namespaces)",
                        io::Error::last_os_error()
                    ),
                ));
            }
            lo_up()?;
            let l = std::net::TcpListener::bind(("127.0.0.1", api_port))?;
            l.set_nonblocking(true)?;
            let ns = File::open("/proc/thread-self/ns/net")?;
            Ok((l, ns))
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))??;
        let listener = TcpListener::from_std(listener)?;
        let bridge = tokio::spawn(async move {
            loop {
                let Ok((mut inner, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut outer) = TcpStream::connect(("127.0.0.1", api_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inner, &mut outer).await;
                    }
                });
            }
        });
        Ok(NetNs { ns, bridge })
    }

    /// A path that names the namespace for `nsenter --net=<path>` while this value lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.ns.as_raw_fd()
        ))
    }

    /// A TCP connection to `127.0.0.1:port` inside the namespace (a socket made by a thread
    /// that entered the namespace keeps it).
    pub async fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let ns = self.ns.try_clone()?;
        let s = tokio::task::spawn_blocking(move || -> io::Result<std::net::TcpStream> {
            std::thread::spawn(move || {
                // SAFETY: setns on this short-lived thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                let s = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    std::time::Duration::from_secs(2),
                )?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
        })
        .await
        .map_err(io::Error::other)??;
        TcpStream::from_std(s)
    }

    /// `GET path` on `127.0.0.1:port` inside the namespace: status code and body.
    pub async fn http_get(&self, port: u16, path: &str) -> io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = self.connect(port).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    }

    /// `nsenter --net=<ns> --` followed by `program args`, as program and arguments.
    pub fn wrap(&self, program: &str, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut a = vec![
            format!("--net={}", self.path().display()),
            "--".into(),
            program.into(),
        ];
        a.extend(args.iter().cloned());
        (PathBuf::from("nsenter"), a)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.bridge.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn loopback_inside_reaches_the_host_port() {
        let host = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = host.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = host.accept().await.unwrap();
            s.write_all(b"hello from the host").await.unwrap();
        });
        let ns = NetNs::new(port).await.unwrap();
        let run = |script: String| {
            let (prog, args) = ns.wrap("bash", &["-c".into(), script]);
            tokio::process::Command::new(prog).args(args).output()
        };
        // /proc/net follows the reader's namespace (sysfs would show the mounter's).
        let out = run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '".into())
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "lo",
            "only loopback in the namespace"
        );
        let out = run(format!("exec 3<>/dev/tcp/127.0.0.1/{port}; head -c 19 <&3"))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the host",
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
