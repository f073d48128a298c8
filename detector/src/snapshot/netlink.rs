//! The `NETLINK_NETFILTER` socket: one dump request, then datagrams until `NLMSG_DONE`.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::ctnetlink::{NETLINK_NETFILTER, decode_messages, dump_request};
use super::{CtSnapshotEntry, RECV_TIMEOUT_S, SnapshotError};

/// Receive buffer; grown when a datagram is larger (seen with `MSG_PEEK | MSG_TRUNC`).
const RECV_BUF: usize = 64 * 1024;

/// Dumps the conntrack table of the network namespace of the calling thread, handing each
/// datagram's entries to `each` as they are decoded; `each` returning false (its consumer is
/// gone) ends the dump early.
pub(super) fn dump_current_netns_each(
    mut each: impl FnMut(Vec<CtSnapshotEntry>) -> bool,
) -> Result<(), SnapshotError> {
    let fd = open_socket()?;
    let seq = 1;
    send_to_kernel(&fd, &dump_request(seq))?;

    let mut buf = vec![0u8; RECV_BUF];
    let mut interrupted = false;
    loop {
        let Some(n) = recv_datagram(&fd, &mut buf)? else {
            continue; // not from the kernel
        };
        let decoded = decode_messages(&buf[..n])?;
        interrupted |= decoded.interrupted;
        if !decoded.entries.is_empty() && !each(decoded.entries) {
            return Ok(());
        }
        if decoded.done {
            break;
        }
    }
    if interrupted {
        tracing::warn!(
            "conntrack dump flagged NLM_F_DUMP_INTR: the table changed during the dump, entries may be missing or repeated"
        );
    }
    Ok(())
}

fn open_socket() -> Result<OwnedFd, SnapshotError> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if raw < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPROTONOSUPPORT) => SnapshotError::NotAvailable {
                detail: format!("no NETLINK_NETFILTER sockets: {e}"),
            },
            Some(libc::EPERM | libc::EACCES) => SnapshotError::PermissionDenied,
            _ => SnapshotError::Socket(e),
        });
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: RECV_TIMEOUT_S as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: `tv` is a valid timeval for the length given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SnapshotError::Socket(io::Error::last_os_error()));
    }
    Ok(fd)
}

fn kernel_addr() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all zeroes is valid (pid 0 = the kernel, no groups).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr
}

fn send_to_kernel(fd: &OwnedFd, msg: &[u8]) -> Result<(), SnapshotError> {
    let addr = kernel_addr();
    loop {
        // SAFETY: `msg` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => SnapshotError::PermissionDenied,
                _ => SnapshotError::Send(e),
            });
        }
        if n as usize != msg.len() {
            return Err(SnapshotError::Send(io::Error::other(format!(
                "sent {n} of {} bytes",
                msg.len()
            ))));
        }
        return Ok(());
    }
}

/// Receives one datagram whole into `buf` (grown when needed) and returns its length, or
/// `None` when it came from another process rather than the kernel.
fn recv_datagram(fd: &OwnedFd, buf: &mut Vec<u8>) -> Result<Option<usize>, SnapshotError> {
    // Learn the datagram's real size first: MSG_TRUNC makes recv return it even when it is
    // larger than the buffer, and MSG_PEEK leaves it queued.
    let size = recv_retrying(fd, buf, libc::MSG_PEEK | libc::MSG_TRUNC)?.0;
    if size > buf.len() {
        buf.resize(size, 0);
    }
    let (n, from) = recv_retrying(fd, buf, libc::MSG_TRUNC)?;
    if n > buf.len() {
        // Cannot happen after the peek; refuse rather than decode a cut datagram.
        return Err(SnapshotError::Recv(io::Error::other(format!(
            "datagram of {n} bytes truncated to {}",
            buf.len()
        ))));
    }
    Ok((from.nl_pid == 0).then_some(n))
}

fn recv_retrying(
    fd: &OwnedFd,
    buf: &mut [u8],
    flags: libc::c_int,
) -> Result<(usize, libc::sockaddr_nl), SnapshotError> {
    loop {
        let mut from = kernel_addr();
        let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: `buf`, `from` and `from_len` are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if n >= 0 {
            return Ok((n as usize, from));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Err(SnapshotError::Timeout(RECV_TIMEOUT_S)),
            Some(libc::ENOBUFS) => return Err(SnapshotError::Overrun),
            _ => return Err(SnapshotError::Recv(e)),
        }
    }
}
