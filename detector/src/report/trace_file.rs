//! Where verdicts go besides the terminal: post-mortem trace files (one JSON document per race,
//! written atomically) and the run summary.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::clock::WallClock;
use crate::engine::Trace;
use crate::npa::NpaKey;
use crate::report::trace_writer::{TraceWriter, WriteCounts};

/// Version of the trace-file schema (see docs/trace-schema.md).
pub const TRACE_SCHEMA_VERSION: u32 = 1;

/// Adds `"time"` (ISO-8601 UTC) next to every `"ts_ns"` and every `*_ts_ns`/`*_ns` timestamp
/// field that names an instant, so each record carries both clocks.
pub fn add_wall_times(v: &mut Value, wall: &WallClock) {
    match v {
        Value::Object(map) => {
            let mut extra = Vec::new();
            for (k, val) in map.iter() {
                // 0 means "unknown" for kernel times (e.g. a birth before the detector).
                let Some(ns) = val.as_u64().filter(|ns| *ns != 0) else {
                    continue;
                };
                let Some(name) = wall_time_name(k) else {
                    continue;
                };
                if !map.contains_key(&name) {
                    extra.push((name, Value::from(wall.iso(ns))));
                }
            }
            for (k, val) in extra {
                map.insert(k, val);
            }
            for val in map.values_mut() {
                add_wall_times(val, wall);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| add_wall_times(x, wall)),
        _ => {}
    }
}

/// The name of the wall-clock field [`add_wall_times`] adds next to timestamp field `key`.
fn wall_time_name(key: &str) -> Option<String> {
    if key == "ts_ns" {
        Some("time".to_string())
    } else if let Some(stem) = key.strip_suffix("_ts_ns") {
        Some(format!("{stem}_time"))
    } else if matches!(
        key,
        "born_ns"
            | "destroyed_ns"
            | "window_start_ns"
            | "window_end_ns"
            | "key_inserted_ns"
            | "exit_ns"
            | "expiry_ns"
            | "reap_ns"
            | "reuse_ns"
            | "delete_ns"
    ) {
        Some(format!("{}_time", key.trim_end_matches("_ns")))
    } else {
        None
    }
}

/// `value` as one line of JSON with the same wall-clock fields as [`add_wall_times`] (each
/// right after its timestamp rather than in sorted order). Serializes straight to text:
/// going through a `Value` tree costs several times as much, which a burst of verdicts
/// waits for. `value` must not itself have the added field names (`time`, ...).
pub fn json_with_wall_times<T: serde::Serialize>(
    value: &T,
    wall: &WallClock,
) -> serde_json::Result<String> {
    let raw = serde_json::to_string(value)?;
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len() + raw.len() / 4);
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        // A string: object keys are strings followed by ':'; quotes inside strings are
        // escaped, so the string ends at the next unescaped quote.
        let start = i + 1;
        i += 1;
        while i < b.len() && b[i] != b'"' {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        let end = i.min(b.len());
        i += 1;
        if b.get(i) != Some(&b':') {
            continue;
        }
        let Some(name) = wall_time_name(&raw[start..end]) else {
            continue;
        };
        let digits = i + 1;
        let mut j = digits;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        // A plain unsigned integer (not null, negative or fractional), not 0 ("unknown").
        if j == digits || !matches!(b.get(j), Some(b',' | b'}')) {
            continue;
        }
        if let Ok(ns) = raw[digits..j].parse::<u64>()
            && ns != 0
        {
            out.push_str(&raw[copied..j]);
            out.push_str(&format!(",\"{name}\":\"{}\"", wall.iso(ns)));
            copied = j;
        }
        i = j;
    }
    out.push_str(&raw[copied..]);
    Ok(out)
}

/// Temporary files of this process get distinct names, so one never meets another's.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `path` atomically: a temporary file in the same directory, synced,
/// then renamed over the target, so a reader never sees half a file. The temporary file is
/// created exclusively and never through a link (the directory may be a shared hostPath),
/// readable by the owner's group only. A failed write leaves no temporary file behind.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("trace"),
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Whether `name` is a temporary file [`write_atomic`] left behind (a crash mid-write).
fn is_leftover_tmp(name: &str) -> bool {
    name.starts_with('.') && name.contains(".json.tmp-")
}

/// Trace files in one directory.
pub struct TraceDir {
    dir: PathBuf,
    /// Sequence number of the next trace name: names stay unique whatever the key.
    seq: u64,
    /// Names given to verdicts whose traces are not written yet, by delete time and key.
    named: HashMap<(u64, String), PathBuf>,
}

impl TraceDir {
    /// Creates the directory (0750) if needed, checks that a file can be created in it, and
    /// removes temporary files an earlier run left behind.
    pub fn create(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        if dir.exists() && !dir.is_dir() {
            anyhow::bail!(
                "the trace directory {} is not a directory (set --trace-dir to a directory)",
                dir.display()
            );
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .with_context(|| {
                format!(
                    "creating the trace directory {} (set --trace-dir)",
                    dir.display()
                )
            })?;
        let probe = dir.join(format!(".detector-write-check-{}", std::process::id()));
        write_atomic(&probe, b"").with_context(|| {
            format!(
                "the trace directory {} is not writable (set --trace-dir to a writable directory)",
                dir.display()
            )
        })?;
        let _ = std::fs::remove_file(&probe);
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_str().is_some_and(is_leftover_tmp) {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => tracing::info!("removed a leftover {}", e.path().display()),
                    Err(err) => tracing::warn!("removing {}: {err}", e.path().display()),
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            seq: 0,
            named: HashMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new file name for the trace of a delete at `delete_ts_ns`: its time, class and key
    /// (protocol, addresses, owner, host veth) and a sequence number, so races of one batch
    /// delete, which share a timestamp and may share addresses, never share a file.
    pub fn name(&mut self, delete_ts_ns: u64, class: &str, key: &NpaKey) -> PathBuf {
        let proto = match key.proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            132 => "sctp".to_string(),
            p => format!("p{p}"),
        };
        let ifindex = key.ifindex.map(|i| format!("-if{i}")).unwrap_or_default();
        let who = format!(
            "{proto}-{}.{}-{}.{}-owner{}{ifindex}",
            key.src, key.sport, key.dst, key.dport, key.owner
        )
        .replace([':', '[', ']'], "_");
        self.seq += 1;
        self.dir.join(format!(
            "race-{delete_ts_ns}-{class}-{who}-{}.json",
            self.seq
        ))
    }

    /// The name of the verdict's trace, remembered until [`Self::take_name`].
    pub fn name_verdict(&mut self, delete_ts_ns: u64, class: &str, key: &NpaKey) -> PathBuf {
        let path = self.name(delete_ts_ns, class, key);
        self.named
            .insert((delete_ts_ns, key.to_string()), path.clone());
        path
    }

    /// The name [`Self::name_verdict`] gave this race, or a new one.
    pub fn take_name(&mut self, delete_ts_ns: u64, class: &str, key: &NpaKey) -> PathBuf {
        self.named
            .remove(&(delete_ts_ns, key.to_string()))
            .unwrap_or_else(|| self.name(delete_ts_ns, class, key))
    }

    /// One race's trace document.
    /// `detection_latency_ns`: the delete to the live verdict, when known; `pods`: the pods
    /// of the race's addresses (Kubernetes enrichment), put in `trace.verdict.pods`.
    pub fn document(
        trace: &Trace,
        detection_latency_ns: Option<u64>,
        wall: &WallClock,
        host: &str,
        pods: Option<&[crate::k8s::PodRef]>,
    ) -> Result<Vec<u8>> {
        let mut body = serde_json::to_value(trace)?;
        add_wall_times(&mut body, wall);
        if let Some(pods) = pods.filter(|p| !p.is_empty()) {
            body["verdict"]["pods"] = serde_json::to_value(pods)?;
        }
        let doc = json!({
            "schema_version": TRACE_SCHEMA_VERSION,
            "kind": "race_trace",
            "host": host,
            "written_at": crate::clock::now_iso(),
            "clock": "kernel CLOCK_MONOTONIC ns (bpf_ktime_get_ns, the clock of NPA's last_seen); *time fields are UTC",
            "detection_latency_ns": detection_latency_ns,
            "trace": body,
        });
        Ok(serde_json::to_vec_pretty(&doc)?)
    }
}

/// This machine's name, for trace documents.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The trace files of `detector run` as an output: one file per race trace, written off the
/// event loop, and the run's summary at the end.
pub struct TraceFiles {
    pub dir: TraceDir,
    host: String,
    /// File name of the summary (from the run's start time).
    summary: PathBuf,
    writer: TraceWriter,
    /// The file of the last trace queued, for the note that it was written.
    last_queued: Option<PathBuf>,
    /// Whether the summary file was written.
    summary_written: bool,
}

impl TraceFiles {
    pub fn new(dir: TraceDir, host: String, started: &str, writer: TraceWriter) -> Self {
        let summary = dir
            .dir()
            .join(format!("summary-{}.json", started.replace([':', '.'], "")));
        Self {
            dir,
            host,
            summary,
            writer,
            last_queued: None,
            summary_written: false,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn summary_path(&self) -> &Path {
        &self.summary
    }

    pub fn summary_written(&self) -> bool {
        self.summary_written
    }

    /// The file of the last trace handed to the writer (None if it was dropped).
    pub fn last_queued(&self) -> Option<&Path> {
        self.last_queued.as_deref()
    }

    /// What the writer did so far.
    pub fn counts(&self) -> &WriteCounts {
        &self.writer.counts
    }

    /// Writes the queued traces, so the counts are final.
    pub fn drain(&mut self) {
        self.writer.drain();
    }
}

impl super::Sink for TraceFiles {
    fn trace(&mut self, t: &super::TraceOut<'_>) -> Result<()> {
        let v = &t.trace.verdict;
        let path = self.dir.take_name(v.delete_ts_ns, v.class.name(), &v.key);
        let doc = TraceDir::document(t.trace, t.latency_ns, t.wall, &self.host, t.pods)?;
        self.last_queued = self.writer.submit(path.clone(), doc).then_some(path);
        Ok(())
    }

    /// The summary file. A failure (disk full, read-only) is a warning and counted: the run's
    /// results are already out on stdout and the HTTP streams.
    fn finish(&mut self, summary: &Value) -> Result<()> {
        let text = serde_json::to_vec_pretty(summary)?;
        let written = write_atomic(&self.summary, &text).or_else(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            write_atomic(&self.summary, &text)
        });
        match written {
            Ok(()) => self.summary_written = true,
            Err(e) => {
                self.writer.counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("summary {} not written: {e:#}", self.summary.display());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    #[test]
    fn json_with_wall_times_matches_the_value_walk() {
        let wall = WallClock::measure();
        let doc = json!({
            "ts_ns": 5_000_000_000u64,
            "note": "a \\\"ts_ns\\\":7 inside a string, and \\\\",
            "nested": [{"delete_ts_ns": 6_000_000_000u64, "born_ns": 0, "destroyed_ns": null}],
            "live": {"born_ns": 7_000_000_000u64, "reuse_gap_ns": -5, "x_ns": 3},
            "window_end_ns": 8_000_000_000u64,
        });
        let mut want = doc.clone();
        add_wall_times(&mut want, &wall);
        let got: Value = serde_json::from_str(&json_with_wall_times(&doc, &wall).unwrap()).unwrap();
        assert_eq!(got, want);
        assert!(got["live"].get("born_time").is_some());
        assert!(got["nested"][0].get("born_time").is_none());
    }

    #[test]
    fn wall_times_are_added_next_to_kernel_times() {
        let wall = WallClock::from_offset(1_795_678_405_000_000_000);
        let mut v = json!({"ts_ns": 1_000_000, "x": {"delete_ts_ns": 2_000, "born_ns": 5, "lag_ns": 9},
                           "a": [{"ts_ns": 7}], "unknown": {"born_ns": 0}});
        add_wall_times(&mut v, &wall);
        assert_eq!(v["time"], "2026-11-26T07:33:25.001000Z");
        assert_eq!(v["x"]["delete_time"], "2026-11-26T07:33:25.000002Z");
        assert!(
            v["unknown"].get("born_time").is_none(),
            "0 is unknown, not boot time"
        );
        assert!(v["x"]["born_time"].is_string());
        assert!(
            v["x"].get("lag_time").is_none(),
            "durations get no wall time"
        );
        assert!(v["a"][0]["time"].is_string());
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("detector-sinks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.json");
        write_atomic(&p, b"{}").unwrap();
        write_atomic(&p, b"{\"a\":1}").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trace_dir_is_private_cleans_leftovers_and_names_each_race_apart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("detector-tracedir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let traces = dir.join("traces");
        std::fs::create_dir_all(&traces).unwrap();
        let leftover = traces.join(".race-1-port-reuse-x.json.tmp-77-0");
        std::fs::write(&leftover, b"").unwrap();
        let mut td = TraceDir::create(&traces).unwrap();
        assert!(!leftover.exists(), "leftover temporary file not cleaned");
        let fresh = dir.join("new");
        TraceDir::create(&fresh).unwrap();
        // A file where the directory should be: named as such, not "File exists".
        let file = dir.join("a-file");
        std::fs::write(&file, b"").unwrap();
        let err = TraceDir::create(&file).err().map(|e| format!("{e:#}"));
        let err = err.unwrap_or_default();
        assert!(err.contains("is not a directory"), "{err}");
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o027, 0, "directory mode {mode:o}");
        // Both pods' keys of one flow, deleted in one batch: one timestamp, one 5-tuple.
        let key = |owner: &str| NpaKey {
            src: "10.0.0.1".parse().unwrap(),
            sport: 4000,
            dst: "10.0.0.2".parse().unwrap(),
            dport: 80,
            proto: 6,
            owner: owner.parse().unwrap(),
            ifindex: Some(7),
        };
        let a = td.name_verdict(5, "port-reuse", &key("10.0.0.1"));
        let b = td.name_verdict(5, "port-reuse", &key("10.0.0.2"));
        let c = td.name(5, "port-reuse", &key("10.0.0.2"));
        assert!(a != b && b != c && a != c, "{a:?} {b:?} {c:?}");
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.contains("tcp") && name.contains("owner10.0.0.1") && name.contains("if7"));
        assert_eq!(td.take_name(5, "port-reuse", &key("10.0.0.2")), b);
        write_atomic(&a, b"{}").unwrap();
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o037, 0, "file mode {mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
