//! TCP in namespaces: an echo server, connections from a fixed source port, and resets.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::Duration;

use crate::netns::in_netns;
use crate::{Error, Result};

/// A byte the echo server answers late (to hold a reply in flight while something else
/// happens), and how late.
#[derive(Debug, Clone, Copy)]
pub struct LateReply {
    pub byte: u8,
    pub delay: Duration,
}

/// Starts a TCP server in the namespace at `ns` bound to `addr` (port 0: any free one). It
/// answers every byte with the same byte (after `late.delay` for `late.byte`) and keeps each
/// connection open until the peer closes it or the process ends. Returns the bound address.
pub fn start_echo_server(
    ns: &Path,
    addr: SocketAddr,
    late: Option<LateReply>,
) -> Result<SocketAddr> {
    let listener = in_netns(ns, move || TcpListener::bind(addr))?
        .map_err(|e| Error::io(format!("binding an echo server on {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("the echo server's address", e))?;
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    if let Some(late) = late
                        && b[0] == late.byte
                    {
                        std::thread::sleep(late.delay);
                    }
                    if s.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(bound)
}

/// Connects from namespace `ns` to `to` and does one request/reply (so the flow is
/// established and seen both ways); returns the open stream (5 s read timeout).
pub fn connect_from(ns: &Path, to: SocketAddr) -> Result<TcpStream> {
    in_netns(ns, move || -> Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| Error::io(format!("connecting to {to}"), e))?;
        exchange(&mut s)?;
        Ok(s)
    })?
}

/// One byte out, its echo back, with a 5 s read timeout left on the stream.
pub fn exchange(s: &mut TcpStream) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| Error::io("setting a read timeout", e))?;
    s.write_all(b"x")
        .map_err(|e| Error::io("sending a request", e))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .map_err(|e| Error::io("reading the reply", e))
}

fn sockaddr(a: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A connection from `local:port` to `to` in the calling thread's namespace, with
/// SO_REUSEADDR (the port's previous connection may just have been reset). The previous
/// connection's 4-tuple can linger a moment after its reset: EADDRNOTAVAIL is retried for
/// about a second.
pub fn connect_from_port(local: Ipv4Addr, port: u16, to: SocketAddrV4) -> Result<TcpStream> {
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket(2) has no memory preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::last_os("socket"));
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else; the stream closes it.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and an option buffer of the size passed, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os("setsockopt SO_REUSEADDR"));
    }
    let me = sockaddr(local, port);
    // SAFETY: a valid socket and a sockaddr_in of `len` bytes, alive for the call.
    if unsafe { libc::bind(fd, (&raw const me).cast(), len) } != 0 {
        return Err(Error::last_os("bind"));
    }
    let them = sockaddr(*to.ip(), to.port());
    for attempt in 0.. {
        // SAFETY: as for bind.
        if unsafe { libc::connect(fd, (&raw const them).cast(), len) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) || attempt >= 50 {
            return Err(Error::io(format!("connect from port {port} to {to}"), e));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(s)
}

/// Closes a connection with a RST (SO_LINGER with a zero timeout): no FIN exchange, no
/// TIME_WAIT, the port is free at once, and no conntrack entry for a closing packet.
pub fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket (owned by `s` until it drops below) and an option buffer of the
    // size passed. A failure leaves an ordinary close, which is all that can be done.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}
