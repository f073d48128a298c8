//! Load generators, run on threads that entered the bench's namespaces: TCP connect/reset
//! churn, UDP new flows (sendmmsg over many source sockets and destination ports), and a
//! workload of slab frees unrelated to conntrack.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::sys::{self, enter, in_netns};

/// What a generator did in its run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Count {
    pub ops: u64,
    pub errors: u64,
    pub secs: f64,
}

impl Count {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Runs `threads` workers in namespace `ns` for `dur`; each calls `work` in a loop, which
/// returns (ops, errors) done in one call.
fn workers<S: Send + 'static>(
    ns: &Path,
    threads: usize,
    dur: Duration,
    setup: impl Fn(usize) -> Result<S> + Send + Sync + 'static,
    work: impl Fn(&mut S) -> (u64, u64) + Send + Sync + 'static,
    finished: impl Fn() -> bool,
) -> Result<Count> {
    let setup = Arc::new(setup);
    let work = Arc::new(work);
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..threads {
        let file = File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        let (setup, work, ops, errors, go, done) = (
            setup.clone(),
            work.clone(),
            ops.clone(),
            errors.clone(),
            go.clone(),
            done.clone(),
        );
        handles.push(std::thread::spawn(move || -> Result<()> {
            enter(&file)?;
            let mut state = setup(i)?;
            while !go.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_micros(200));
            }
            while !done.load(Ordering::Relaxed) {
                let (o, e) = work(&mut state);
                ops.fetch_add(o, Ordering::Relaxed);
                errors.fetch_add(e, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    // Every worker set up before the clock starts.
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    go.store(true, Ordering::Release);
    let end = t0 + dur;
    while !sys::stopping() && !finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
    }
    // After the join: a batch in flight at the deadline is counted (at most one per worker).
    let (o, e) = (ops.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    sys::check_stop()?;
    Ok(Count {
        ops: o,
        errors: e,
        secs,
    })
}

/// A TCP server in `ns` that accepts and closes every connection, until dropped.
pub struct TcpSink {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TcpSink {
    pub fn start(ns: &Path, addr: SocketAddrV4, threads: usize) -> Result<Self> {
        let listener =
            in_netns(ns, move || listen(addr))?.with_context(|| format!("listening on {addr}"))?;
        // Non-blocking with a poll, so the threads notice the stop flag.
        listener.set_nonblocking(true)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (l, stop) = (listener.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut pfd = libc::pollfd {
                        fd: l.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((s, _)) => drop(s),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                // SAFETY: one valid pollfd.
                                unsafe { libc::poll(&mut pfd, 1, 50) };
                            }
                            Err(_) => {}
                        }
                    }
                })
            })
            .collect();
        Ok(Self { stop, threads })
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A listening socket with a deep accept queue (std's is 128): under churn on two cores the
/// accepting threads fall behind, and a full queue drops SYNs, which the client retries only
/// after a second.
fn listen(addr: SocketAddrV4) -> std::io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on an fd we own; the sockaddr is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        ) != 0
            || libc::listen(fd, 8192) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// Short-lived TCP connections: connect, then close with RST (SO_LINGER 0, so no TIME_WAIT
/// holds the client's port), in `threads` workers. Each is one conntrack NEW (and DESTROY).
pub fn tcp_churn(ns: &Path, to: SocketAddrV4, threads: usize, dur: Duration) -> Result<Count> {
    workers(
        ns,
        threads,
        dur,
        |_| Ok(()),
        move |_| match TcpStream::connect_timeout(&to.into(), Duration::from_secs(5)) {
            Ok(s) => {
                testbed::tcp::reset(s);
                (1, 0)
            }
            Err(e) => {
                static SHOWN: AtomicBool = AtomicBool::new(false);
                if !SHOWN.swap(true, Ordering::Relaxed) {
                    eprintln!("bench: first TCP connect error: {e}");
                }
                (0, 1)
            }
        },
        || false,
    )
}

/// Source sockets of the UDP generator (ports UDP_SPORT..+UDP_SOCKETS) and destination ports
/// (UDP_DPORT..+UDP_DPORTS): flow `i` is a distinct 5-tuple for i < UDP_SOCKETS*UDP_DPORTS.
pub const UDP_SOCKETS: u64 = 32;
pub const UDP_SPORT: u16 = 20_000;
pub const UDP_DPORT: u16 = 1024;
pub const UDP_DPORTS: u64 = 64_000;
const BATCH: u64 = 64;

/// The 5-tuple ports of flow `i`: batches of 64 consecutive flows share a source socket.
pub fn udp_flow(i: u64) -> (u16, u16) {
    let i = i % (UDP_SOCKETS * UDP_DPORTS);
    let batch = i / BATCH;
    let sock = batch % UDP_SOCKETS;
    let dport = ((batch / UDP_SOCKETS) * BATCH + i % BATCH) % UDP_DPORTS;
    (UDP_SPORT + sock as u16, UDP_DPORT + dport as u16)
}

/// A UDP new-flow generator: source sockets bound in the client namespace, and a cursor over
/// the flow space that runs across calls so consecutive phases use fresh tuples.
pub struct UdpGen {
    socks: Arc<Vec<UdpSocket>>,
    cursor: Arc<AtomicU64>,
    ns: std::path::PathBuf,
    dst: Ipv4Addr,
}

impl UdpGen {
    pub fn new(ns: &Path, src: Ipv4Addr, dst: Ipv4Addr) -> Result<Self> {
        let socks = in_netns(ns, move || -> Result<Vec<UdpSocket>> {
            (0..UDP_SOCKETS)
                .map(|s| {
                    UdpSocket::bind(SocketAddrV4::new(src, UDP_SPORT + s as u16))
                        .with_context(|| format!("binding UDP port {}", UDP_SPORT + s as u16))
                })
                .collect()
        })??;
        Ok(Self {
            socks: Arc::new(socks),
            cursor: Arc::new(AtomicU64::new(0)),
            ns: ns.to_path_buf(),
            dst,
        })
    }

    pub fn set_cursor(&self, i: u64) {
        self.cursor.store(i, Ordering::SeqCst);
    }

    /// Sends one datagram per new flow, `threads` workers, for `dur` or until `limit` flows,
    /// at most `rate` flows per second in total (None: as fast as possible).
    pub fn run(
        &self,
        threads: usize,
        dur: Duration,
        rate: Option<f64>,
        limit: Option<u64>,
    ) -> Result<Count> {
        let (socks, cursor, dst) = (self.socks.clone(), self.cursor.clone(), self.dst);
        let start = cursor.load(Ordering::SeqCst);
        let end_cursor = cursor.clone();
        let per_thread = rate.map(|r| r / threads as f64);
        let seen = self.cursor.clone();
        let c = workers(
            &self.ns,
            threads,
            dur,
            |_| Ok((None::<Instant>, 0u64)),
            move |(t0, sent): &mut (Option<Instant>, u64)| {
                let t0 = *t0.get_or_insert_with(Instant::now);
                if let Some(r) = per_thread {
                    // Pace: never ahead of the schedule by more than one batch.
                    let due = (t0.elapsed().as_secs_f64() * r) as u64;
                    if *sent >= due + BATCH {
                        std::thread::sleep(Duration::from_micros(100));
                        return (0, 0);
                    }
                }
                let first = cursor.fetch_add(BATCH, Ordering::Relaxed);
                if limit.is_some_and(|l| first >= start + l) {
                    std::thread::sleep(Duration::from_millis(1));
                    return (0, 0);
                }
                let n = limit.map_or(BATCH, |l| BATCH.min(start + l - first));
                let (ok, failed) = send_batch(&socks, dst, first, n);
                *sent += ok;
                (ok, failed)
            },
            move || limit.is_some_and(|l| seen.load(Ordering::Relaxed) >= start + l),
        )?;
        // Flows claimed past the limit were not sent: keep the cursor honest.
        if let Some(l) = limit {
            let end = end_cursor.load(Ordering::SeqCst).min(start + l);
            end_cursor.store(end, Ordering::SeqCst);
        }
        Ok(c)
    }
}

/// One sendmmsg of flows first..first+n (one source socket, consecutive destination ports).
fn send_batch(socks: &[UdpSocket], dst: Ipv4Addr, first: u64, n: u64) -> (u64, u64) {
    let (sport, _) = udp_flow(first);
    let sock = &socks[usize::from(sport - UDP_SPORT)];
    let payload = [0u8; 1];
    let mut addrs: Vec<libc::sockaddr_in> = (first..first + n)
        .map(|i| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: udp_flow(i).1.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .map(|a| {
            // SAFETY: mmsghdr is plain data; zeroed is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut done = 0;
    while done < msgs.len() {
        // SAFETY: the headers point at addrs, iov and payload, which outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (msgs.len() - done) as u32,
                0,
            )
        };
        if r <= 0 {
            // Counted, not retried: the flow was not created (e.g. ENOBUFS).
            return (done as u64, (msgs.len() - done) as u64);
        }
        done += r as usize;
    }
    (done as u64, 0)
}

/// Objects of other slab caches allocated and freed: a UDP socket opened and closed (its
/// socket inode, sock, file and dentry come from kmem caches, none of them conntrack's).
pub fn slab_frees(ns: &Path, threads: usize, dur: Duration) -> Result<Count> {
    workers(
        ns,
        threads,
        dur,
        |_| Ok(()),
        |_| {
            let mut n = 0;
            for _ in 0..64 {
                // SAFETY: socket/close with constant arguments.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
                if fd >= 0 {
                    // SAFETY: `fd` is the socket just created here, closed once.
                    unsafe { libc::close(fd) };
                    n += 1;
                }
            }
            (n, 64 - n)
        },
        || false,
    )
}

/// Checks that the generator reached the server namespace at all (a missing route would
/// otherwise look like a slow machine).
pub fn check_reach(tcp: &Count, what: &str) -> Result<()> {
    if tcp.ops == 0 {
        bail!(
            "{what}: the generator made no connection/flow ({} errors)",
            tcp.errors
        );
    }
    Ok(())
}
