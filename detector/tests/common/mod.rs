//! Helpers for privileged tests: the detector binary run as a user would run it, and the
//! namespace pair the tests share. Namespaces, veth pairs, TCP and BPF maps come from the
//! `testbed` crate; these wrappers only turn its errors into test failures.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]
#![allow(dead_code)]

pub mod bpfmap;
pub mod fake_api;
pub mod faults;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{LazyLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use testbed::netns;
use testbed::veth::{self, End};

/// The detector binary: `DETECTOR_BIN` when set (the vm-test guest, where the payload is not at
/// the path cargo built it at), else the one cargo built for these tests.
pub struct DetectorBinary;

pub const DETECTOR: DetectorBinary = DetectorBinary;

static DETECTOR_PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    std::env::var_os("DETECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_detector")))
});

impl AsRef<OsStr> for DetectorBinary {
    fn as_ref(&self) -> &OsStr {
        DETECTOR_PATH.as_os_str()
    }
}

impl AsRef<Path> for DetectorBinary {
    fn as_ref(&self) -> &Path {
        DETECTOR_PATH.as_path()
    }
}

/// True when running as root. Privileged tests return early (with a note) when not root,
/// unless DETECTOR_REQUIRE_PRIVILEGED=1 (set by `cargo xtask test` and CI): then they fail.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("DETECTOR_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("this test needs root (DETECTOR_REQUIRE_PRIVILEGED=1)");
        }
        eprintln!("skipped: needs root");
    }
    root
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("running {cmd}: {e} (is it installed? scripts/setup.sh installs it)")
    })
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair: `server` (10.77.0.1, conntrack active through an nft
/// ct rule, short established timeout) and `client` (10.77.0.2). Removed on drop.
pub struct NetnsPair {
    pub server: String,
    pub client: String,
    pub server_ip: &'static str,
    pub client_ip: &'static str,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl NetnsPair {
    pub fn new(established_timeout_s: u32) -> Self {
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let pair = Self {
            server: format!("dts-{id}"),
            client: format!("dtc-{id}"),
            server_ip: "10.77.0.1",
            client_ip: "10.77.0.2",
        };
        netns::add(&pair.server).unwrap();
        netns::add(&pair.client).unwrap();
        let server = End {
            dev: "veth-s",
            ns: &pair.server,
        };
        let client = End {
            dev: "veth-c",
            ns: &pair.client,
        };
        veth::add_pair(server, client).unwrap();
        for (end, ip, ip6) in [
            (server, "10.77.0.1/24", "fd77::1/64"),
            (client, "10.77.0.2/24", "fd77::2/64"),
        ] {
            veth::add_address(end, ip).unwrap();
            // IPv6 too (no duplicate address detection, so the address is usable at once).
            veth::add_address(end, ip6).unwrap();
            veth::up(end).unwrap();
        }
        // Conntrack hooks register only when a rule needs them.
        pair.exec_ok(
            &pair.server,
            "nft",
            &["add table inet dt; \
                 add chain inet dt in { type filter hook input priority 0; policy accept; }; \
                 add rule inet dt in ct state new counter accept"],
        );
        pair.exec_ok(
            &pair.server,
            "sysctl",
            &[
                "-qw",
                &format!(
                    "net.netfilter.nf_conntrack_tcp_timeout_established={established_timeout_s}"
                ),
            ],
        );
        pair
    }

    pub fn path(ns: &str) -> String {
        netns::path(ns).to_string_lossy().into_owned()
    }

    pub fn inode(&self, ns: &str) -> u32 {
        netns::inode(ns).unwrap() as u32
    }

    /// Runs a command inside `ns` (nsenter keeps /sys and bpffs, unlike `ip netns exec`).
    pub fn exec(&self, ns: &str, cmd: &str, args: &[&str]) -> Output {
        let net = format!("--net={}", Self::path(ns));
        let mut all = vec![net.as_str(), cmd];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }

    pub fn exec_ok(&self, ns: &str, cmd: &str, args: &[&str]) -> String {
        netns::exec_in(ns, cmd, args).unwrap_or_else(|e| panic!("{cmd} {args:?} in {ns}: {e}"))
    }

    pub fn spawn_in(&self, ns: &str, cmd: &str, args: &[&str]) -> Child {
        netns::spawn_in(ns, cmd, args).unwrap_or_else(|e| panic!("spawning {cmd} in {ns}: {e}"))
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end, and with it the peer.
        let _ = netns::delete(&self.server);
        let _ = netns::delete(&self.client);
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    netns::in_netns(&netns::path(ns), f).unwrap_or_else(|e| panic!("in {ns}: {e}"))
}

/// A TCP server in a namespace that answers one byte per byte received and keeps every
/// connection open until the process ends.
pub fn start_echo_server(ns: &str, ip: &str) -> SocketAddr {
    start_echo_server_on(ns, ip, 0)
}

/// [`start_echo_server`] on a given port (0: any free one), for datapaths set up for a port.
pub fn start_echo_server_on(ns: &str, ip: &str, port: u16) -> SocketAddr {
    let addr = SocketAddr::new(ip.parse().unwrap(), port);
    testbed::tcp::start_echo_server(&netns::path(ns), addr, None).expect("server did not start")
}

/// Opens a connection from namespace `ns`, does one request/reply, and returns the open stream.
pub fn connect_from(ns: &str, to: SocketAddr) -> TcpStream {
    testbed::tcp::connect_from(&netns::path(ns), to).expect("connect")
}

/// A test that fails midway must not leave a detector running with its programs attached.
impl Drop for Detector {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills and reaps a helper process (e.g. `conntrack -E`) when dropped, even on a panic.
#[allow(unused_imports, reason = "not every test binary uses every helper")]
pub use testbed::process::ChildGuard;

/// Opens a connection from `ns` bound to `local:port` (as the lab's reproducer does: the
/// port's previous connection may just have been reset), does one request/reply, returns it.
pub fn connect_from_port(ns: &str, local: &str, port: u16, to: SocketAddr) -> TcpStream {
    let local: std::net::Ipv4Addr = local.parse().unwrap();
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    in_netns(ns, move || {
        let mut s = testbed::tcp::connect_from_port(local, port, to).expect("connect");
        testbed::tcp::exchange(&mut s).expect("reply");
        s
    })
}

/// Closes a connection with a RST (no TIME_WAIT, and no conntrack entry for the closing packet).
#[allow(unused_imports, reason = "not every test binary uses every helper")]
pub use testbed::tcp::reset;

/// The detector running `trace --json`, as a user would run it.
pub struct Detector {
    child: Child,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Detector {
    /// Starts `detector trace --json <args>` and waits until its programs are attached.
    pub fn trace(args: &[&str]) -> Self {
        Self::start(&["trace", "--json"], args, "tracing conntrack")
    }

    /// Starts `detector run --json <args>` and waits until it watches the map.
    pub fn run(args: &[&str]) -> Self {
        Self::start(&["run", "--json"], args, "detector: watching map")
    }

    /// The set-up the race tests share: `detector run` on the agent map `map` (by its pin and
    /// name), judging in `netns` (`None`: the deleting task's namespace), traces in `traces`,
    /// a 5 ms watermark, then `extra` flags.
    pub fn watching(
        map: &bpfmap::AgentMap,
        netns: Option<&str>,
        traces: &Path,
        extra: &[&str],
    ) -> Self {
        let pin = map.pin.to_str().unwrap();
        let traces = traces.to_str().unwrap();
        let mut args = vec!["--map-pin", pin, "--map-name", &map.name];
        if let Some(ns) = netns {
            args.extend(["--netns", ns]);
        }
        args.extend(["--trace-dir", traces, "--watermark-ms", "5"]);
        args.extend_from_slice(extra);
        Self::run(&args)
    }

    /// Starts `detector run --json <args>` and waits until it prints `ready` on stderr.
    pub fn run_until(args: &[&str], ready: &'static str) -> Self {
        Self::start(&["run", "--json"], args, ready)
    }

    /// The detector's process id (for /proc and prlimit).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for `text` on its stderr; whether it came.
    pub fn wait_for(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr.lock().unwrap().contains(text) {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn start(command: &[&str], args: &[&str], ready: &'static str) -> Self {
        let mut child = Command::new(DETECTOR)
            .args(command)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn detector");
        let mut out = child.stdout.take().unwrap();
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(ready)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let start = Instant::now();
        loop {
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "detector exited with {status} before it was ready: {}",
                    log.lock().unwrap()
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!(
                    "detector did not start within 30 s: {}",
                    log.lock().unwrap()
                );
            }
        }
        eprintln!("detector attached in {:?}", start.elapsed());
        Self {
            child,
            stdout: Some(stdout),
            stderr: log,
        }
    }

    /// Stops it with SIGINT (Ctrl-C) and returns (NDJSON objects, stderr). Fails the test if it
    /// does not exit within 15 s.
    pub fn stop(mut self) -> (Vec<serde_json::Value>, String) {
        // SAFETY: kill sends a signal to our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "detector did not exit within 15 s of SIGINT: {}",
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        let stdout = self.stdout.take().unwrap().join().unwrap();
        let status = self.child.wait().unwrap();
        // Let the stderr thread finish reading.
        thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().unwrap().clone();
        assert!(status.success(), "detector exited with {status}: {stderr}");
        let events = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l}: {e}")))
            .collect();
        (events, stderr)
    }
}

/// NPA's key of a TCP flow from the pair's client (10.77.0.2) to `server`, owned by the server
/// pod as NPA keys an ingress flow; `ifindex` only for the 24-byte key layouts.
pub fn client_key(sport: u16, server: SocketAddr, ifindex: Option<u32>) -> detector::npa::NpaKey {
    detector::npa::NpaKey {
        src: "10.77.0.2".parse().unwrap(),
        sport,
        dst: server.ip(),
        dport: server.port(),
        proto: 6,
        owner: server.ip(),
        ifindex,
    }
}

/// The records of one `type` in a detector's NDJSON output.
pub fn of_type<'a>(events: &'a [serde_json::Value], t: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == t).collect()
}

/// What a race test starts from: a client/server namespace pair, a bpffs holding an agent map
/// of the test's layout, an echo server in the server namespace and the trace directory. The
/// fields are in the order the tests used to declare them, so they drop the same way.
pub struct RaceWorld {
    pub ns: NetnsPair,
    pub fs: bpfmap::Bpffs,
    pub map: bpfmap::AgentMap,
    pub server: SocketAddr,
    pub traces: PathBuf,
}

impl RaceWorld {
    /// `established_timeout_s`: the pair's `nf_conntrack_tcp_timeout_established`.
    pub fn new(layout: detector::npa::Layout, established_timeout_s: u32) -> Self {
        let ns = NetnsPair::new(established_timeout_s);
        let fs = bpfmap::Bpffs::mount();
        let map = bpfmap::AgentMap::create(
            layout,
            &fs.dir.join("aws_conntrack_map"),
            &bpfmap::unique_name(),
        );
        let server = start_echo_server(&ns.server, ns.server_ip);
        let traces = fs.dir.with_extension("traces");
        Self {
            ns,
            fs,
            map,
            server,
            traces,
        }
    }
}
