//! Where verdicts go besides the terminal: post-mortem trace files (one JSON document per race,
//! written atomically) and the run summary.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::clock::WallClock;
use crate::engine::Trace;
use crate::npa::NpaKey;

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

/// Writes `contents` to `path` atomically: a temporary file in the same directory, synced,
/// then renamed over the target, so a reader never sees half a file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("trace"),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Trace files in one directory.
pub struct TraceDir {
    dir: PathBuf,
    written: u64,
}

impl TraceDir {
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the trace directory {} (set --trace-dir)",
                dir.display()
            )
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            written: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// File name a trace of a delete at `delete_ts_ns` will get. The key tells apart races of
    /// one batch delete, which share a timestamp.
    pub fn path_for(&self, delete_ts_ns: u64, class: &str, key: &NpaKey) -> PathBuf {
        let who = format!("{}.{}-{}.{}", key.src, key.sport, key.dst, key.dport)
            .replace([':', '[', ']'], "_");
        self.dir
            .join(format!("race-{delete_ts_ns}-{class}-{who}.json"))
    }

    /// Writes one race's trace document; returns its path.
    /// `detection_latency_ns`: the delete to the live verdict, when known.
    pub fn write(
        &mut self,
        trace: &Trace,
        detection_latency_ns: Option<u64>,
        wall: &WallClock,
        host: &str,
    ) -> Result<PathBuf> {
        self.write_enriched(trace, detection_latency_ns, wall, host, None)
    }

    /// [`Self::write`] with the pods of the race's addresses (Kubernetes enrichment), put in
    /// `trace.verdict.pods` when there are any.
    pub fn write_enriched(
        &mut self,
        trace: &Trace,
        detection_latency_ns: Option<u64>,
        wall: &WallClock,
        host: &str,
        pods: Option<&[crate::k8s::PodRef]>,
    ) -> Result<PathBuf> {
        let v = &trace.verdict;
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
        let path = self.path_for(v.delete_ts_ns, v.class.name(), &v.key);
        write_atomic(&path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
        self.written += 1;
        Ok(path)
    }

    pub fn written(&self) -> u64 {
        self.written
    }
}

/// This machine's name, for trace documents.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The trace files of `detector run` as an output: one file per race trace, and the run's
/// summary at the end.
pub struct TraceFiles {
    pub dir: TraceDir,
    host: String,
    /// File name of the summary (from the run's start time).
    summary: PathBuf,
}

impl TraceFiles {
    pub fn new(dir: TraceDir, host: String, started: &str) -> Self {
        let summary = dir
            .dir()
            .join(format!("summary-{}.json", started.replace([':', '.'], "")));
        Self { dir, host, summary }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn summary_path(&self) -> &Path {
        &self.summary
    }
}

impl super::Sink for TraceFiles {
    fn trace(&mut self, t: &super::TraceOut<'_>) -> Result<()> {
        self.dir
            .write_enriched(t.trace, t.latency_ns, t.wall, &self.host, t.pods)?;
        Ok(())
    }

    fn finish(&mut self, summary: &Value) -> Result<()> {
        write_atomic(
            &self.summary,
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )
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
}
