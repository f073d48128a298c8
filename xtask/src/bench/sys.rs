//! The bench's own environment: network namespaces it creates, sysctls it changes (restored),
//! a bpffs it mounts, child processes (stopped), and a stop flag set by Ctrl-C/SIGTERM.
//! Everything here undoes itself on drop, so an error or an interrupt leaves nothing behind.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testbed::netns;
use testbed::veth::{self, End};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set the stop flag; the bench then unwinds through its guards.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails with a clear error once the bench was asked to stop.
pub fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted (Ctrl-C or SIGTERM): cleaned up, no report written");
    }
    Ok(())
}

/// Sleeps, waking early when asked to stop.
pub fn nap(d: Duration) {
    let end = Instant::now() + d;
    while !stopping() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

pub use testbed::cmd::run;
pub use testbed::netns::{enter, exec_in, in_netns, path as netns_path};

/// Reads a file under /proc/sys/net of a namespace (per-namespace values such as
/// nf_conntrack_count), from a thread that entered it.
pub fn ns_proc_read(ns: &Path, file: &'static str) -> Result<String> {
    in_netns(ns, move || {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    })?
}

/// Prefix of every namespace the bench creates: `bench-<pid>-...`.
const NS_PREFIX: &str = "dtbench-";

/// Two namespaces joined by a veth pair: `cli` (10.79.0.2) sends and has conntrack active (an
/// nft ct rule on output, like kube-proxy's rules on a node), so its table holds the entries;
/// `srv` (10.79.0.1) answers. Every packet of a flow leaves `cli` through a device carrying its
/// confirmed entry, which is where the tracepoint backend sees a NEW. Removed on drop.
pub struct Topology {
    pub cli: String,
    pub srv: String,
    created: Vec<String>,
}

pub const SRV_IP: &str = "10.79.0.1";
pub const CLI_IP: &str = "10.79.0.2";

impl Topology {
    pub fn create(tag: &str) -> Result<Self> {
        let id = format!("{NS_PREFIX}{}-{tag}", std::process::id());
        let mut t = Self {
            cli: format!("{id}-cli"),
            srv: format!("{id}-srv"),
            created: Vec::new(),
        };
        for ns in [t.cli.clone(), t.srv.clone()] {
            netns::add(&ns)?;
            t.created.push(ns);
        }
        let cli = End {
            dev: "eth0",
            ns: &t.cli,
        };
        let srv = End {
            dev: "eth0",
            ns: &t.srv,
        };
        veth::add_pair(cli, srv)?;
        for (end, ip) in [(cli, CLI_IP), (srv, SRV_IP)] {
            veth::add_address(end, &format!("{ip}/24"))?;
            veth::up(end)?;
        }
        // Conntrack hooks register only when a rule needs them.
        exec_in(
            &t.cli,
            "nft",
            &["add table inet bench; \
               add chain inet bench output { type filter hook output priority 0; policy accept; }; \
               add rule inet bench output ct state new counter accept"],
        )?;
        // Short timeouts keep the table small under churn (these sysctls are per namespace
        // and die with it). Port range: the client's connections end with RST, so no
        // TIME_WAIT holds its ports, but more ports spread the churn.
        for kv in [
            "net.netfilter.nf_conntrack_udp_timeout=1",
            "net.netfilter.nf_conntrack_tcp_timeout_close=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ] {
            exec_in(&t.cli, "sysctl", &["-qw", kv])?;
        }
        exec_in(&t.srv, "sysctl", &["-qw", "net.core.somaxconn=8192"])?;
        Ok(t)
    }

    pub fn srv_path(&self) -> PathBuf {
        netns_path(&self.srv)
    }

    pub fn cli_path(&self) -> PathBuf {
        netns_path(&self.cli)
    }

    /// The namespace whose conntrack table the bench fills and observes.
    pub fn ct_path(&self) -> PathBuf {
        self.cli_path()
    }

    /// Empties the bench's conntrack table and waits until it is empty.
    pub fn flush(&self) -> Result<()> {
        let t0 = Instant::now();
        loop {
            // `conntrack -F` exits non-zero on an empty table on some versions: ignore.
            let _ = exec_in(&self.cli, "conntrack", &["-F"]);
            if self.ct_count()? == 0 {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("the bench namespace's conntrack table does not empty");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Entries in the bench's conntrack table.
    pub fn ct_count(&self) -> Result<u64> {
        let s = ns_proc_read(
            &self.ct_path(),
            "/proc/sys/net/netfilter/nf_conntrack_count",
        )?;
        s.trim().parse().context("nf_conntrack_count")
    }

    /// The kernel's per-namespace conntrack statistics summed over CPUs, by column name
    /// (/proc/net/stat/nf_conntrack, hex).
    pub fn ct_stats(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let text = ns_proc_read(&self.ct_path(), "/proc/net/stat/nf_conntrack")?;
        let mut lines = text.lines();
        let names: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let mut sum = std::collections::BTreeMap::new();
        for l in lines {
            for (n, v) in names.iter().zip(l.split_whitespace()) {
                // `entries` is the same global figure on every line, not per CPU.
                if n == "entries" {
                    continue;
                }
                *sum.entry(n.clone()).or_insert(0) += u64::from_str_radix(v, 16).unwrap_or(0);
            }
        }
        Ok(sum)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            if let Err(e) = netns::delete(&ns) {
                eprintln!("bench cleanup: {e}");
            }
        }
    }
}

/// Namespaces left by a bench that was killed (its pid is gone): removed at start.
pub fn remove_leftovers() {
    for name in netns::orphans(NS_PREFIX) {
        let _ = netns::delete(&name);
        eprintln!("bench: removed leftover namespace {name}");
    }
}

/// One bench at a time on a machine: two would share the CPUs, skew each other's figures, and
/// take each other's sysctl changes for leftovers. Held (flock) until the process exits.
pub struct BenchLock(#[allow(dead_code)] File);

impl BenchLock {
    pub fn acquire(timeout: Duration) -> Result<Self> {
        let path = "/run/detector-bench.lock";
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {path}"))?;
        let t0 = Instant::now();
        let mut said = false;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                let _ = std::fs::write(path, std::process::id().to_string());
                return Ok(Self(f));
            }
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            if !said {
                eprintln!(
                    "bench: another bench (pid {}) is running; waiting for it (up to {:?})",
                    holder.trim(),
                    timeout
                );
                said = true;
            }
            check_stop()?;
            if t0.elapsed() > timeout {
                bail!(
                    "another bench (pid {}) is still running after {timeout:?}: run one at a time",
                    holder.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

const STATE_PREFIX: &str = "detector-bench-sysctl.";

/// Sets a global sysctl (a /proc/sys path) for the bench, restored when the guard drops; a
/// bench that was killed outright is undone by the next ([`restore_leftover_sysctls`]).
pub fn set_sysctl(path: &'static str, value: &str) -> Result<testbed::sysctl::Global> {
    Ok(testbed::sysctl::Global::set(path, value, STATE_PREFIX)?)
}

/// Restores what a killed bench left changed.
pub fn restore_leftover_sysctls() {
    for restored in testbed::sysctl::restore_leftovers(STATE_PREFIX) {
        eprintln!("bench: restored {restored} left by an earlier bench");
    }
}

pub use testbed::bpfmap::Bpffs;

/// Mounts the bench's bpffs (`dtbench-bpffs-<pid>` in the temporary directory).
pub fn mount_bpffs() -> Result<Bpffs> {
    let dir = std::env::temp_dir().join(format!("dtbench-bpffs-{}", std::process::id()));
    Ok(Bpffs::mount_at(dir)?)
}

/// Unmounts bpffs left by a killed bench.
pub fn unmount_leftovers() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for m in mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.contains("/dtbench-bpffs-"))
    {
        let pid = m.rsplit('-').next().unwrap_or("");
        if pid
            .parse::<u32>()
            .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            let _ = run("umount", &[m]);
        }
    }
}

/// A child process that dies with the bench (PR_SET_PDEATHSIG) and is stopped on drop.
pub use testbed::process::Proc;

/// Reads lines from a child's pipe on a thread until `pred` matches one (returns the time it
/// took), then keeps draining the rest into the returned collector.
pub fn wait_line(
    pipe: impl Read + Send + 'static,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Result<(Duration, std::thread::JoinHandle<Vec<String>>)> {
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let handle = std::thread::spawn(move || {
        let mut kept = Vec::new();
        for l in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(l.clone());
            kept.push(l);
        }
        kept
    });
    let t0 = Instant::now();
    loop {
        check_stop()?;
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(l) if pred(&l) => return Ok((t0.elapsed(), handle)),
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let lines = handle.join().unwrap_or_default();
                bail!(
                    "the process exited before it was ready: {}",
                    lines.join(" | ")
                );
            }
        }
        if t0.elapsed() > timeout {
            bail!("not ready within {timeout:?}");
        }
    }
}

/// A process's memory figures from /proc/PID/status, in bytes.
pub fn proc_mem(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Kernel memory of the BPF maps a process holds open: the sum of `memlock` over its map fds
/// (each map counted once, by id).
pub fn bpf_map_memlock(pid: u32) -> Result<(u64, usize)> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.filter_map(|e| e.ok()) {
        let Ok(s) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let get = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        if let (Some(id), Some(mem)) = (get("map_id:"), get("memlock:"))
            && seen.insert(id)
        {
            total += mem.parse::<u64>().unwrap_or(0);
        }
    }
    Ok((total, seen.len()))
}

/// CPU time (user + system) a process has used, in ns.
pub fn proc_cpu_ns(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = s.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (1-based), in clock ticks.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Ok(ticks * 1_000_000_000 / hz)
}

/// One BPF program's counters (kernel.bpf_stats_enabled): run time and run count.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProgRuns {
    pub ns: u64,
    pub cnt: u64,
}

/// The counters of each BPF program a process holds open, by program name (each program
/// counted once, however many descriptors name it). Needs kernel.bpf_stats_enabled=1.
pub fn bpf_prog_stats(pid: u32) -> Result<std::collections::BTreeMap<String, ProgRuns>> {
    let mut seen = std::collections::HashSet::new();
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.filter_map(|e| e.ok()) {
        let Ok(s) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let (Some(id), Some(runs)) = (fdinfo_field(&s, "prog_id:"), prog_runs(&s))
            && seen.insert(id)
        {
            let ProgRuns { ns, cnt } = runs;
            let name =
                testbed::bpfmap::prog_name(id as u32).unwrap_or_else(|_| format!("prog {id}"));
            let r: &mut ProgRuns = out.entry(name).or_default();
            r.ns += ns;
            r.cnt += cnt;
        }
    }
    Ok(out)
}

/// A numeric field of a /proc/PID/fdinfo file.
fn fdinfo_field(fdinfo: &str, key: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// A BPF program's counters from its descriptor's fdinfo (kernel.bpf_stats_enabled=1).
pub fn prog_runs(fdinfo: &str) -> Option<ProgRuns> {
    Some(ProgRuns {
        ns: fdinfo_field(fdinfo, "run_time_ns:")?,
        cnt: fdinfo_field(fdinfo, "run_cnt:")?,
    })
}
