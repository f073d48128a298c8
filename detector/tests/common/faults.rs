//! Helpers of the fault suite: a lab that makes races on demand, a tmpfs the test can fill or
//! make read-only, and a scrape of the detector's /metrics.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::bpfmap::{AgentMap, Bpffs, unique_name};
use super::{NetnsPair, connect_from, run_ok, start_echo_server};
use detector::npa::{Layout, NpaKey};

/// An agent map, a server namespace and live connections: each [`RaceLab::race`] deletes the
/// key of a live flow, which the detector must report as a race.
pub struct RaceLab {
    pub ns: NetnsPair,
    pub map: AgentMap,
    pub server: SocketAddr,
    _bpffs: Bpffs,
    /// The raced flows, kept open so that each stays live.
    flows: Vec<TcpStream>,
}

impl RaceLab {
    pub fn new() -> Self {
        let layout: Layout = "v4-24/16".parse().unwrap();
        let ns = NetnsPair::new(60);
        let bpffs = Bpffs::mount();
        let map = AgentMap::create(layout, &bpffs.dir.join("aws_conntrack_map"), &unique_name());
        let server = start_echo_server(&ns.server, ns.server_ip);
        Self {
            ns,
            map,
            server,
            _bpffs: bpffs,
            flows: Vec::new(),
        }
    }

    /// `detector run` arguments for this lab, its traces in `trace_dir`, serving on `listen`.
    pub fn args(&self, trace_dir: &Path, listen: &str) -> Vec<String> {
        [
            "--map-pin",
            self.map.pin.to_str().unwrap(),
            "--netns",
            &NetnsPair::path(&self.ns.server),
            "--trace-dir",
            trace_dir.to_str().unwrap(),
            "--trace-before",
            "0.2",
            "--trace-after",
            "0.2",
            "--watermark-ms",
            "5",
            "--listen",
            listen,
        ]
        .map(String::from)
        .to_vec()
    }

    /// A new live flow whose key the test inserts; returns the key (not yet deleted).
    pub fn live_key(&mut self, owner: Option<&str>, ifindex: u32) -> NpaKey {
        let c = connect_from(&self.ns.client, self.server);
        let mut k = super::client_key(c.local_addr().unwrap().port(), self.server, Some(ifindex));
        if let Some(o) = owner {
            k.owner = o.parse().unwrap();
        }
        self.flows.push(c);
        k
    }

    /// One race: the key of a live flow inserted and deleted. Returns the flow's port.
    pub fn race(&mut self) -> u16 {
        let k = self.live_key(None, 5);
        self.map.insert(&k, 1);
        assert_eq!(self.map.delete(&k), 0, "delete of {k}");
        k.sport
    }
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted and removed on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("detector-faults-{}", unique_name()));
        std::fs::create_dir_all(&dir).unwrap();
        run_ok(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0750"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Self { dir }
    }

    /// Remounts it read-only (`true`) or read-write: root ignores mode bits, not this.
    pub fn set_read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        run_ok("mount", &["-o", opt, self.dir.to_str().unwrap()]);
    }

    /// Fills the file system with one file until a write fails with ENOSPC; returns it.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback address nothing listens on now (the detector's `--listen`).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` on `addr`: the status code and the body, or what went wrong.
pub fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read: {e} after {:?}", String::from_utf8_lossy(&raw)))?;
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .ok_or_else(|| format!("no body in {text:?}"))?;
    Ok((code, body))
}

/// The value of the metric line that starts with `name` (labels included).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
}

/// The /metrics text of the detector serving on `addr`.
pub fn metrics(addr: &str) -> String {
    let (code, text) = get(addr, "/metrics").unwrap_or_else(|e| panic!("/metrics: {e}"));
    assert_eq!(code, 200, "{text}");
    text
}

/// `detector_trace_writes_total{result="<result>"}` from /metrics on `addr`.
pub fn trace_writes(addr: &str, result: &str) -> u64 {
    let text = metrics(addr);
    metric(
        &text,
        &format!("detector_trace_writes_total{{result=\"{result}\"}}"),
    )
}

/// Waits up to `secs` for `cond`; false if it never held.
pub fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// The names in `dir`, sorted.
pub fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The race trace files in `dir`.
pub fn race_files(dir: &Path) -> Vec<String> {
    names_in(dir)
        .into_iter()
        .filter(|n| n.starts_with("race-") && n.ends_with(".json"))
        .collect()
}
