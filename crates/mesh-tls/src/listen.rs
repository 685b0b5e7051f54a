//! A listening socket with the backlog a busy server needs.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// The most connections the kernel queues for a listener: `net.core.somaxconn`, which caps
/// any backlog asked for anyway (4096 where it cannot be read), as Go's `net` package does.
pub fn system_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(4096)
        // Kernels before 4.1 kept the backlog in 16 bits.
        .min(65_535)
}

/// Binds `addr` (with `SO_REUSEADDR`, as tokio does) and listens with `backlog` queued
/// connections, [`system_backlog`] when `None`. tokio's own `bind` queues 128, and a burst of
/// connects past that has its SYNs dropped and retried a second later.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// let listener = mesh_tls::listen("127.0.0.1:0".parse().expect("addr"), None)?;
/// assert!(listener.local_addr()?.port() > 0);
/// # Ok(()) }
/// ```
pub fn listen(addr: SocketAddr, backlog: Option<u32>) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    #[cfg(not(windows))]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let backlog = backlog.unwrap_or_else(system_backlog).clamp(1, i32::MAX as u32);
    socket.listen(backlog as i32)?;
    TcpListener::from_std(socket.into())
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does
/// at start: each connection holds a descriptor, and a soft limit of 1024 (a common
/// default) lets a thousand idle sockets make the server refuse everyone with "Too many open
/// files". Returns the limit before and after; on other systems, does nothing.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
        if soft < hard {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
        }
        Ok((soft, hard.max(soft)))
    }
    #[cfg(not(unix))]
    Ok((0, 0))
}
