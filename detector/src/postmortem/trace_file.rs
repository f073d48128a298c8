//! The race trace document `detector run` writes (docs/trace-schema.md), read back for the
//! post-mortem report. Fields the detector may add later (`confirmed`, `pods`) are optional,
//! and unknown event kinds are kept as [`TimelineEvent::Other`] so an older report still reads
//! a newer file.

use std::path::Path;

use serde::Deserialize;

/// Why a trace file could not be used; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TraceFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a race trace file: {source}")]
    Malformed {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} is not a race trace file: kind is {kind:?}, expected \"race_trace\"")]
    WrongKind { path: String, kind: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct TraceDocument {
    pub schema_version: u32,
    pub kind: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub written_at: Option<String>,
    #[serde(default)]
    pub detection_latency_ns: Option<u64>,
    pub trace: RaceTrace,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RaceTrace {
    pub verdict: Verdict,
    pub window_start_ns: u64,
    pub window_end_ns: u64,
    #[serde(default)]
    pub timeline: Vec<TimelineEvent>,
    #[serde(default)]
    pub after_window_incomplete: bool,
    /// Absent in traces written before confirmations existed.
    #[serde(default)]
    pub confirmed: Option<bool>,
    #[serde(default)]
    pub timeline_truncated: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Verdict {
    pub kind: String,
    pub class: String,
    #[serde(default)]
    pub decided_by: Option<String>,
    pub key: Key,
    #[serde(default)]
    pub layout: Option<String>,
    #[serde(default)]
    pub map_id: Option<u32>,
    #[serde(default)]
    pub agent: Option<Task>,
    pub delete_ts_ns: u64,
    #[serde(default)]
    pub delete_time: Option<String>,
    #[serde(default)]
    pub live: Option<LiveEntry>,
    #[serde(default)]
    pub old: Option<OldEntry>,
    #[serde(default)]
    pub reuse_gap_ns: Option<i64>,
    #[serde(default)]
    pub delete_lag_ns: Option<u64>,
    #[serde(default)]
    pub delete_to_denied_ns: Option<u64>,
    #[serde(default)]
    pub first_denied: Option<Drop>,
    #[serde(default)]
    pub maybe_incomplete: bool,
    #[serde(default)]
    pub timeline_truncated: bool,
    #[serde(default)]
    pub notes: Vec<serde_json::Value>,
    #[serde(default)]
    pub pods: Option<Vec<Pod>>,
    /// Whether a later check confirmed the race (denied packets seen, ...); not written by
    /// today's detector, shown as unknown when absent.
    #[serde(default)]
    pub confirmed: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Tuple {
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub proto: u8,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Key {
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub proto: u8,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub ifindex: Option<u32>,
}

impl Key {
    /// `10.0.0.1:42001 → 10.0.0.2:8080 TCP`.
    pub fn display(&self) -> String {
        format!(
            "{}:{} → {}:{} {}",
            self.src,
            self.sport,
            self.dst,
            self.dport,
            proto_name(self.proto)
        )
    }
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        1 => "ICMP".into(),
        p => format!("proto {p}"),
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LiveEntry {
    pub id: u64,
    #[serde(default)]
    pub born_ns: Option<u64>,
    #[serde(default)]
    pub timeout_left_ns: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OldEntry {
    pub id: u64,
    #[serde(default)]
    pub born_ns: Option<u64>,
    #[serde(default)]
    pub destroyed_ns: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Drop {
    pub ts_ns: u64,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub tuple: Option<Tuple>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Pod {
    pub ip: String,
    pub namespace: String,
    pub pod: String,
    #[serde(default)]
    pub node: Option<String>,
}

/// One record of `trace.timeline`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TimelineEvent {
    CtNew {
        ts_ns: u64,
        id: u64,
    },
    /// From the start-up snapshot: the entry existed before the detector (ts_ns is 0).
    CtExisting {
        ts_ns: u64,
        id: u64,
    },
    CtDestroy {
        ts_ns: u64,
        id: u64,
        #[serde(default)]
        born_ns: Option<u64>,
        #[serde(default)]
        reason: Option<String>,
    },
    AgentDelete {
        ts_ns: u64,
        key: Key,
        #[serde(default)]
        map_id: Option<u32>,
        #[serde(default)]
        task: Option<Task>,
        #[serde(default)]
        result: serde_json::Value,
    },
    AgentInsert {
        ts_ns: u64,
    },
    PacketDrop {
        ts_ns: u64,
        #[serde(default)]
        reason: Option<String>,
    },
    Lost {
        ts_ns: u64,
        #[serde(default)]
        count: Option<u64>,
    },
    MapRecreated {
        ts_ns: u64,
    },
    #[serde(other)]
    Other,
}

impl TraceDocument {
    pub fn parse(text: &str, path: &Path) -> Result<Self, TraceFileError> {
        let doc: TraceDocument =
            serde_json::from_str(text).map_err(|source| TraceFileError::Malformed {
                path: path.display().to_string(),
                source,
            })?;
        if doc.kind != "race_trace" {
            return Err(TraceFileError::WrongKind {
                path: path.display().to_string(),
                kind: doc.kind,
            });
        }
        Ok(doc)
    }

    pub fn read(path: &Path) -> Result<Self, TraceFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The node of the race: a pod's node when enrichment knew it, else the detector's host.
    pub fn node(&self) -> Option<&str> {
        self.trace
            .verdict
            .pods
            .iter()
            .flatten()
            .find_map(|p| p.node.as_deref())
            .or(self.host.as_deref())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    pub(crate) fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/traces")
    }

    pub(crate) fn fixture() -> TraceDocument {
        TraceDocument::read(
            &fixture_dir()
                .join("race-1036781864847-port-reuse-10.78.1.2.42001-10.78.2.2.8080.json"),
        )
        .unwrap()
    }

    #[test]
    fn reads_a_lab_trace_file() {
        let doc = fixture();
        let v = &doc.trace.verdict;
        assert_eq!(v.class, "port-reuse");
        assert_eq!(v.delete_ts_ns, 1_036_781_864_847);
        assert_eq!(v.key.display(), "10.78.1.2:42001 → 10.78.2.2:8080 TCP");
        assert_eq!(doc.node(), Some("vm"));
        assert!(v.confirmed.is_none());
        let drops = doc
            .trace
            .timeline
            .iter()
            .filter(|e| matches!(e, TimelineEvent::PacketDrop { .. }))
            .count();
        assert_eq!(drops, 4);
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let p = Path::new("/x/race-1.json");
        let e = TraceDocument::parse("{\"kind\": 3", p).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/x/race-1.json is not a race trace file")
        );
        let e = TraceDocument::parse(
            r#"{"schema_version":1,"kind":"summary","trace":{"verdict":{}}}"#,
            p,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/x/race-1.json"), "{e}");
        let e = TraceDocument::read(Path::new("/nonexistent/race.json")).unwrap_err();
        assert!(
            e.to_string().contains("cannot read /nonexistent/race.json"),
            "{e}"
        );
    }

    #[test]
    fn unknown_events_and_new_fields_are_tolerated() {
        let mut v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                fixture_dir()
                    .join("race-1036781864847-port-reuse-10.78.1.2.42001-10.78.2.2.8080.json"),
            )
            .unwrap(),
        )
        .unwrap();
        v["trace"]["timeline"][0] = serde_json::json!({"event": "from_the_future", "ts_ns": 1});
        v["trace"]["verdict"]["confirmed"] = true.into();
        let doc = TraceDocument::parse(&v.to_string(), Path::new("x")).unwrap();
        assert!(matches!(doc.trace.timeline[0], TimelineEvent::Other));
        assert_eq!(doc.trace.verdict.confirmed, Some(true));
    }
}
