//! The timing driver's traffic: a server in the server pod and a client that holds one
//! connection per fixed source port, lets it idle past the kernel's timeout, and reuses the
//! port (a new connection, same 5-tuple) around the cleanup, each time with a request whose
//! reply comes late enough to be caught by a delete. Every reply that never arrives is counted.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testbed::tcp::LateReply;

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    testbed::netns::in_netns(ns, f)?
}

/// How long the server waits before answering a `d` request.
pub const LATE_REPLY: Duration = Duration::from_millis(500);

/// Starts the server in `ns`: it echoes each byte, late for `d`.
pub fn start_server(ns: &Path, addr: SocketAddrV4) -> Result<()> {
    let late = LateReply {
        byte: b'd',
        delay: LATE_REPLY,
    };
    testbed::tcp::start_echo_server(ns, addr.into(), Some(late))
        .context("starting the lab server")?;
    Ok(())
}

/// A connection from `local:port` (SO_REUSEADDR: the port's previous connection was reset).
pub fn connect(local: Ipv4Addr, port: u16, to: SocketAddrV4) -> Result<TcpStream> {
    let s = testbed::tcp::connect_from_port(local, port, to)?;
    s.set_read_timeout(Some(LATE_REPLY * 3))?;
    Ok(s)
}

/// Closes with a RST: no FIN exchange, no TIME_WAIT, the port is free at once.
pub use testbed::tcp::reset;

/// One request and its reply; false when the reply never came.
fn exchange(s: &mut TcpStream, what: u8) -> bool {
    let mut b = [0u8; 1];
    s.write_all(&[what]).is_ok() && s.read_exact(&mut b).is_ok()
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReproStats {
    /// New connections that took a port whose previous connection was reset.
    pub reuses: u64,
    pub requests: u64,
    /// Requests whose reply never arrived.
    pub failed: u64,
    /// The source ports of those requests, in order.
    pub failed_ports: Vec<u16>,
}

/// The client: one connection per port.
pub struct Client {
    ns: PathBuf,
    local: Ipv4Addr,
    to: SocketAddrV4,
    ports: Vec<u16>,
    conns: Vec<Option<TcpStream>>,
    pub stats: ReproStats,
}

impl Client {
    pub fn new(ns: &Path, local: Ipv4Addr, to: SocketAddrV4, ports: Vec<u16>) -> Self {
        let conns = ports.iter().map(|_| None).collect();
        Self {
            ns: ns.to_path_buf(),
            local,
            to,
            ports,
            conns,
            stats: ReproStats::default(),
        }
    }

    /// (Re)connects every port, in parallel, and sends each a request. Requests whose reply
    /// is late (`d`) are answered after the caller's cleanup may have deleted the key; the
    /// caller collects them with [`Client::collect`].
    pub fn reuse_all(&mut self, late: bool) -> Result<()> {
        let (local, to, ns) = (self.local, self.to, self.ns.clone());
        let mut handles = Vec::new();
        for (i, port) in self.ports.iter().copied().enumerate() {
            let old = self.conns[i].take();
            if old.is_some() {
                self.stats.reuses += 1;
            }
            let ns = ns.clone();
            handles.push(std::thread::spawn(move || -> Result<TcpStream> {
                if let Some(old) = old {
                    reset(old);
                }
                let mut s = in_netns(&ns, move || connect(local, port, to))?;
                if !late {
                    // A first exchange so the flow is established and its key inserted.
                    if !exchange(&mut s, b'x') {
                        bail!("the first request from port {port} got no reply");
                    }
                } else {
                    s.write_all(b"d")?;
                }
                Ok(s)
            }));
        }
        for (i, h) in handles.into_iter().enumerate() {
            let s = h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            self.conns[i] = Some(s);
            self.stats.requests += 1;
        }
        Ok(())
    }

    /// Resets every open connection (RST: conntrack moves its entry to CLOSE).
    pub fn reset_all(&mut self) {
        for c in &mut self.conns {
            if let Some(s) = c.take() {
                reset(s);
            }
        }
    }

    /// Waits for the late replies; a missing one is a failed request.
    pub fn collect(&mut self) {
        let mut handles = Vec::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if let Some(mut s) = c.take() {
                handles.push((
                    i,
                    std::thread::spawn(move || {
                        let mut b = [0u8; 1];
                        let ok = s.read_exact(&mut b).is_ok();
                        if !ok {
                            // The application retries, as a real client would: its packet
                            // passes the ingress policy and re-creates the flow's key. Both
                            // answers (the late one, retransmitted, and the retry's) are read
                            // so the flow is quiet before the next idle period starts.
                            let _ = s.write_all(b"x");
                            let mut two = [0u8; 2];
                            let _ = s.read_exact(&mut two);
                        }
                        (s, ok)
                    }),
                ));
            }
        }
        for (i, h) in handles {
            if let Ok((s, ok)) = h.join() {
                if !ok {
                    self.stats.failed += 1;
                    self.stats.failed_ports.push(self.ports[i]);
                }
                self.conns[i] = Some(s);
            }
        }
    }
}
