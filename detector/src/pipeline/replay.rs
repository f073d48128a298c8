//! Reading back what `detector run --json` recorded, for `detector replay`: each NDJSON line
//! becomes the record, start-up state or marker the live run fed its pipeline, so the same
//! [`Detector`](super::dispatch::Detector) can judge it again.
//!
//! Lines of types this reader does not know (the run's own notes, the summary, types added
//! later) are skipped, as are fields it does not know: a recording stays readable as the
//! stream grows.

use std::net::IpAddr;

use serde_json::Value;
use thiserror::Error;

use super::ct_full::Change;
use crate::npa::Layout;
use crate::npa::target::AgentMap;
use crate::record::{
    CtKind, CtRecord, DeleteView, DestroyReason, Event, FlowTuple, MapDeleteRecord, MapOp,
    MapWriteRecord, PacketDropRecord, Source, Task, TcpState,
};
use crate::snapshot::CtSnapshotEntry;
use crate::snapshot::fill::Fill;

/// A line that could not be read, with its 1-based number.
#[derive(Debug, Error)]
#[error("line {line}: {problem}")]
pub struct ReplayError {
    pub line: usize,
    pub problem: String,
}

/// What the run judged with, from its `run_start` line.
#[derive(Debug, Clone)]
pub struct RunStart {
    pub hz: u32,
    pub wall_offset_ns: i128,
    pub agent_netns: u32,
    pub map: AgentMap,
    pub dump_ns: u64,
    pub max_flows: Option<usize>,
    pub snapshot_lag_window_ns: Option<u64>,
    pub before_window_ns: Option<u64>,
    pub after_window_ns: Option<u64>,
}

/// The part of a delete's kernel view its `agent_delete` line leaves out.
#[derive(Debug, Clone, Copy)]
pub struct DeleteKernelView {
    pub ts_ns: u64,
    pub map_id: u32,
    pub ct_addr: u64,
    pub ct_born_ns: u64,
    pub ct_timeout_left_jiffies: i32,
    pub ct_status: u32,
    pub view_reversed: bool,
}

/// One recorded line, as the pipeline needs it.
#[derive(Debug, Clone)]
pub enum Recorded {
    RunStart(Box<RunStart>),
    StartupEntry {
        dump_ns: u64,
        entry: CtSnapshotEntry,
    },
    StartupKey {
        map_id: u32,
        key: Vec<u8>,
    },
    Event(Event),
    DeleteKernelView(DeleteKernelView),
    Lost {
        ts_ns: u64,
        count: u64,
    },
    WallClock {
        ts_ns: u64,
        offset_ns: i128,
    },
    MapRecreated {
        ts_ns: u64,
        map: Box<AgentMap>,
    },
    /// The judged namespace's conntrack table was found full, or with room again.
    ConntrackFill {
        ts_ns: u64,
        change: Change,
    },
    /// A verdict the run printed (for comparing with the replay's).
    Verdict(Value),
}

type Res<T> = Result<T, String>;

fn field<'a>(v: &'a Value, name: &str) -> Res<&'a Value> {
    v.get(name)
        .filter(|f| !f.is_null())
        .ok_or_else(|| format!("missing field `{name}`"))
}

fn u64_of(v: &Value, name: &str) -> Res<u64> {
    field(v, name)?
        .as_u64()
        .ok_or_else(|| format!("`{name}` is not a non-negative integer"))
}

fn i64_of(v: &Value, name: &str) -> Res<i64> {
    field(v, name)?
        .as_i64()
        .ok_or_else(|| format!("`{name}` is not an integer"))
}

fn num<T: TryFrom<u64>>(v: &Value, name: &str) -> Res<T> {
    T::try_from(u64_of(v, name)?).map_err(|_| format!("`{name}` is out of range"))
}

fn str_of<'a>(v: &'a Value, name: &str) -> Res<&'a str> {
    field(v, name)?
        .as_str()
        .ok_or_else(|| format!("`{name}` is not a string"))
}

fn hex_u64(v: &Value, name: &str) -> Res<u64> {
    u64::from_str_radix(str_of(v, name)?, 16).map_err(|_| format!("`{name}` is not hex"))
}

fn bytes_of_hex(v: &Value, name: &str) -> Res<Vec<u8>> {
    let s = str_of(v, name)?;
    if s.len() % 2 != 0 {
        return Err(format!("`{name}` has an odd number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| format!("`{name}` is not hex"))
        })
        .collect()
}

fn proto_of(v: &Value) -> Res<u8> {
    let p = field(v, "proto")?;
    if let Some(n) = p.as_u64() {
        return u8::try_from(n).map_err(|_| "`proto` is out of range".into());
    }
    match p.as_str().ok_or("`proto` is neither a number nor a name")? {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" => Ok(58),
        "sctp" => Ok(132),
        other => other
            .strip_prefix("proto")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unknown protocol `{other}`")),
    }
}

fn tuple_of(v: &Value, name: &str, proto: u8) -> Res<FlowTuple> {
    let t = field(v, name)?;
    let addr = |f: &str| -> Res<IpAddr> {
        str_of(t, f)?
            .parse()
            .map_err(|_| format!("`{name}.{f}` is not an IP address"))
    };
    Ok(FlowTuple {
        proto,
        src: addr("src")?,
        sport: num(t, "sport")?,
        dst: addr("dst")?,
        dport: num(t, "dport")?,
    })
}

fn task_of(v: &Value) -> Res<Task> {
    Ok(Task {
        pid: num(v, "pid")?,
        tid: v.get("tid").and_then(Value::as_u64).unwrap_or(0) as u32,
        comm: str_of(v, "comm")?.to_string(),
    })
}

/// Milliseconds the stream wrote back to the jiffies they came from (`ms = j * 1000 / hz`,
/// truncated toward zero): the smallest count of jiffies that gives the same ms.
pub fn jiffies_of_ms(ms: i64, hz: u32) -> i32 {
    let abs = (ms.unsigned_abs() * u64::from(hz)).div_ceil(1000);
    let j = i32::try_from(abs).unwrap_or(i32::MAX);
    if ms < 0 { -j } else { j }
}

/// The expiry instant of a conntrack record from a recording made before records carried
/// it: the record's time plus its remaining timeout, as the kernel side computes it (the
/// timeout is known to a jiffy).
fn expiry_of_old_recording(ts_ns: u64, timeout_left_jiffies: i32, hz: u32) -> u64 {
    let ns_per_jiffy = 1_000_000_000 / i64::from(hz.max(1));
    let expiry = i64::try_from(ts_ns)
        .unwrap_or(i64::MAX)
        .saturating_add(i64::from(timeout_left_jiffies) * ns_per_jiffy);
    u64::try_from(expiry).unwrap_or(0)
}

fn ct_of(v: &Value, kind: CtKind, hz: u32) -> Res<CtRecord> {
    let proto = proto_of(v)?;
    let source_name = str_of(v, "source")?;
    let source = [
        Source::NetDevQueue,
        Source::ConsumeSkb,
        Source::KfreeSkb,
        Source::KmemCacheFree,
        Source::KretprobeConfirm,
        Source::KprobeDestroy,
        Source::FexitConfirm,
        Source::FentryDestroy,
    ]
    .into_iter()
    .find(|s| s.name() == source_name)
    .ok_or_else(|| format!("unknown source `{source_name}`"))?;
    let reason = match v.get("reason").and_then(Value::as_str) {
        Some("expired") => Some(DestroyReason::Expired),
        Some("killed") => Some(DestroyReason::Killed),
        Some(other) => return Err(format!("unknown destroy reason `{other}`")),
        None => None,
    };
    let ts_ns = u64_of(v, "ts_ns")?;
    let timeout_left_jiffies = jiffies_of_ms(i64_of(v, "timeout_left_ms")?, hz);
    Ok(CtRecord {
        kind,
        ts_ns,
        cpu: num(v, "cpu")?,
        orig: tuple_of(v, "orig", proto)?,
        reply: tuple_of(v, "reply", proto)?,
        id: hex_u64(v, "id")?,
        ct_addr: 0,
        born_ns: v.get("born_ns").and_then(Value::as_u64).unwrap_or(0),
        jiffies: 0,
        status: num(v, "status")?,
        netns: num(v, "netns")?,
        timeout_left_jiffies,
        reason,
        source,
        task: task_of(v)?,
        expiry_ns: match v.get("expiry_ns") {
            Some(Value::Null) => 0,
            Some(_) => u64_of(v, "expiry_ns")?,
            None => expiry_of_old_recording(ts_ns, timeout_left_jiffies, hz),
        },
    })
}

fn delete_of(v: &Value) -> Res<MapDeleteRecord> {
    let view = match str_of(v, "kernel_view")? {
        "unknown" => DeleteView::Unknown,
        "absent" => DeleteView::Absent,
        "live" => DeleteView::Live,
        "expired" => DeleteView::Expired,
        other => return Err(format!("unknown kernel_view `{other}`")),
    };
    Ok(MapDeleteRecord {
        ts_ns: u64_of(v, "ts_ns")?,
        exit_ns: u64_of(v, "exit_ns")?,
        cpu: num(v, "cpu")?,
        task: task_of(v)?,
        map_id: num(v, "map_id")?,
        cmd: num(v, "cmd")?,
        ret: i64_of(v, "ret")?,
        key: bytes_of_hex(v, "key_hex")?,
        view,
        // Filled in from the `delete_kernel_view` line that follows.
        view_reversed: false,
        ct_addr: 0,
        ct_born_ns: v.get("entry_born_ns").and_then(Value::as_u64).unwrap_or(0),
        ct_timeout_left_jiffies: 0,
        ct_status: 0,
        // Recorded as conntrack's name (`CLOSE`); absent or null when it was not read.
        ct_tcp_state: v
            .get("entry_tcp_state")
            .and_then(Value::as_str)
            .and_then(|name| {
                (0..=u8::MAX)
                    .filter_map(TcpState::from_raw)
                    .find(|t| t.name() == name)
            }),
        // Absent from recordings made before deletes were judged per namespace.
        judged_netns: v.get("judged_netns").and_then(Value::as_u64).unwrap_or(0) as u32,
    })
}

fn drop_of(v: &Value) -> Res<(PacketDropRecord, Option<String>)> {
    let ts_ns = u64_of(v, "ts_ns")?;
    let after = v
        .get("after_delete_ns")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let record = PacketDropRecord {
        ts_ns,
        cpu: num(v, "cpu")?,
        tuple: tuple_of(v, "tuple", proto_of(v)?)?,
        reason: num(v, "reason_code")?,
        delete_ns: ts_ns.saturating_sub(after),
    };
    Ok((
        record,
        v.get("reason").and_then(Value::as_str).map(String::from),
    ))
}

fn write_of(v: &Value) -> Res<MapWriteRecord> {
    Ok(MapWriteRecord {
        ts_ns: u64_of(v, "ts_ns")?,
        cpu: num(v, "cpu")?,
        task: task_of(v)?,
        map_id: num(v, "map_id")?,
        op: match str_of(v, "op")? {
            "update" => MapOp::Update,
            "delete" => MapOp::Delete,
            other => return Err(format!("unknown map op `{other}`")),
        },
        from_syscall: str_of(v, "by")? == "userspace",
        key: bytes_of_hex(v, "key_hex")?,
    })
}

fn map_of(v: &Value) -> Res<AgentMap> {
    let layout: Layout = str_of(v, "layout")?
        .parse()
        .map_err(|e| format!("`map.layout`: {e}"))?;
    Ok(AgentMap {
        id: num(v, "id")?,
        name: str_of(v, "name").unwrap_or_default().to_string(),
        key_size: num(v, "key_size").unwrap_or(0),
        value_size: num(v, "value_size").unwrap_or(0),
        max_entries: num(v, "max_entries").unwrap_or(0),
        layout,
        found_by: str_of(v, "found_by").unwrap_or("recording").to_string(),
        pin: None,
    })
}

fn i128_of(v: &Value, name: &str) -> Res<i128> {
    let f = field(v, name)?;
    f.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| f.to_string())
        .parse()
        .map_err(|_| format!("`{name}` is not an integer"))
}

fn run_start_of(v: &Value) -> Res<RunStart> {
    let engine = v.get("engine").cloned().unwrap_or(Value::Null);
    let opt = |name: &str| engine.get(name).and_then(Value::as_u64);
    Ok(RunStart {
        hz: num(v, "hz")?,
        wall_offset_ns: i128_of(v, "wall_offset_ns")?,
        agent_netns: num(v, "agent_netns")?,
        map: map_of(field(v, "map")?)?,
        dump_ns: u64_of(v, "ts_ns")?,
        max_flows: opt("max_flows").map(|n| n as usize),
        snapshot_lag_window_ns: opt("snapshot_lag_window_ns"),
        before_window_ns: opt("before_window_ns"),
        after_window_ns: opt("after_window_ns"),
    })
}

/// Reads one line; `hz` is the recording's kernel tick rate (from its `run_start`). `None`
/// for lines replay has no use for. Also returns a drop reason's name with a drop.
pub fn parse_line(text: &str, hz: u32) -> Res<Option<(Recorded, Option<String>)>> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    let Some(kind) = v.get("type").and_then(Value::as_str) else {
        return Err("no `type` field".into());
    };
    let rec = match kind {
        "run_start" => Recorded::RunStart(Box::new(run_start_of(&v)?)),
        "startup_entry" => {
            let proto = proto_of(&v)?;
            Recorded::StartupEntry {
                dump_ns: u64_of(&v, "dump_ns")?,
                entry: CtSnapshotEntry {
                    orig: tuple_of(&v, "orig", proto)?,
                    reply: tuple_of(&v, "reply", proto)?,
                    id: num(&v, "id")?,
                    status: num(&v, "status")?,
                    timeout_s: num(&v, "timeout_s")?,
                    zone: num(&v, "zone").unwrap_or(0),
                    mark: num(&v, "mark").unwrap_or(0),
                },
            }
        }
        "startup_key" => Recorded::StartupKey {
            map_id: num(&v, "map_id")?,
            key: bytes_of_hex(&v, "key_hex")?,
        },
        "ct_new" => Recorded::Event(Event::Ct(ct_of(&v, CtKind::New, hz)?)),
        "ct_destroy" => Recorded::Event(Event::Ct(ct_of(&v, CtKind::Destroy, hz)?)),
        "agent_delete" => Recorded::Event(Event::MapDelete(delete_of(&v)?)),
        "map_write" => Recorded::Event(Event::MapWrite(write_of(&v)?)),
        "packet_drop" => {
            let (p, reason) = drop_of(&v)?;
            return Ok(Some((Recorded::Event(Event::PacketDrop(p)), reason)));
        }
        "delete_kernel_view" => Recorded::DeleteKernelView(DeleteKernelView {
            ts_ns: u64_of(&v, "ts_ns")?,
            map_id: num(&v, "map_id")?,
            ct_addr: hex_u64(&v, "ct_addr")?,
            ct_born_ns: u64_of(&v, "ct_born_ns")?,
            ct_timeout_left_jiffies: i32::try_from(i64_of(&v, "ct_timeout_left_jiffies")?)
                .map_err(|_| "`ct_timeout_left_jiffies` is out of range")?,
            ct_status: num(&v, "ct_status")?,
            view_reversed: field(&v, "view_reversed")?
                .as_bool()
                .ok_or("`view_reversed` is not a boolean")?,
        }),
        "lost" => Recorded::Lost {
            ts_ns: u64_of(&v, "ts_ns")?,
            count: u64_of(&v, "count")?,
        },
        "wall_clock" => Recorded::WallClock {
            ts_ns: u64_of(&v, "ts_ns")?,
            offset_ns: i128_of(&v, "offset_ns")?,
        },
        "map_recreated" => Recorded::MapRecreated {
            ts_ns: u64_of(&v, "ts_ns")?,
            map: Box::new(map_of(field(&v, "map")?)?),
        },
        "conntrack_fill" => {
            let fill = Fill {
                count: u64_of(&v, "count")?,
                max: u64_of(&v, "max")?,
            };
            let full = field(&v, "full")?
                .as_bool()
                .ok_or("`full` is not a boolean")?;
            Recorded::ConntrackFill {
                ts_ns: u64_of(&v, "ts_ns")?,
                change: if full {
                    Change::Filled {
                        fill,
                        since_ns: u64_of(&v, "since_ns")?,
                    }
                } else {
                    Change::Emptied {
                        fill,
                        lasted_ns: u64_of(&v, "lasted_ns")?,
                    }
                },
            }
        }
        "verdict" => Recorded::Verdict(v),
        _ => return Ok(None),
    };
    Ok(Some((rec, None)))
}

/// Fills a delete's kernel view from its `delete_kernel_view` line.
pub fn apply_view(d: &mut MapDeleteRecord, k: &DeleteKernelView) {
    d.ct_addr = k.ct_addr;
    d.ct_born_ns = k.ct_born_ns;
    d.ct_timeout_left_jiffies = k.ct_timeout_left_jiffies;
    d.ct_status = k.ct_status;
    d.view_reversed = k.view_reversed;
}

/// A verdict line without what depends on the wall clock of the machine that judged it,
/// for comparing a run's verdicts with a replay's: `detection_latency_ns` (how long the live
/// run took to see the race) and `trace_file` (its directory is the run's `--trace-dir`).
pub fn comparable_verdict(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("detection_latency_ns");
        o.remove("trace_file");
    }
    v
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
    fn jiffies_round_trip_through_ms() {
        for hz in [100u32, 250, 300, 1000] {
            for j in -700i64..700 {
                let ms = j * 1000 / i64::from(hz);
                let back = i64::from(jiffies_of_ms(ms, hz));
                assert_eq!(back * 1000 / i64::from(hz), ms, "hz {hz} j {j}");
            }
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(parse_line("{", 250).unwrap_err().contains("not JSON"));
        assert!(parse_line("[1]", 250).unwrap_err().contains("object"));
        assert!(parse_line(r#"{"a":1}"#, 250).unwrap_err().contains("type"));
        let full =
            r#"{"type":"conntrack_fill","ts_ns":9,"full":true,"since_ns":5,"count":8,"max":8}"#;
        assert!(matches!(
            parse_line(full, 250),
            Ok(Some((
                Recorded::ConntrackFill {
                    ts_ns: 9,
                    change: Change::Filled { since_ns: 5, .. }
                },
                _
            )))
        ));
        let e = parse_line(r#"{"type":"conntrack_fill","ts_ns":9,"full":1}"#, 250).unwrap_err();
        assert!(e.contains("count"), "{e}");
        let e = parse_line(r#"{"type":"lost","ts_ns":1}"#, 250).unwrap_err();
        assert!(e.contains("count"), "{e}");
        assert!(
            parse_line(r#"{"type":"something_new","x":1}"#, 250)
                .unwrap()
                .is_none()
        );
    }

    /// Every record line of a real recording, cut short at each character or with one
    /// character changed, is an error or a record: never a panic.
    #[test]
    fn damaged_lines_of_a_real_recording_never_panic() {
        let text = include_str!("../../tests/fixtures/replay/legacy-lab.ndjson");
        let mut read = 0;
        for line in text.lines().filter(|l| !l.contains(r#""type":"verdict""#)) {
            let (ok, _) = parse_line(line, 250)
                .unwrap()
                .map_or((false, ()), |_| (true, ()));
            read += usize::from(ok);
            for (i, _) in line.char_indices() {
                assert!(parse_line(&line[..i], 250).is_err(), "prefix {i} of {line}");
                for c in ['x', '-', '9', '"'] {
                    let mut damaged = line.to_string();
                    damaged.replace_range(i..=i, &c.to_string());
                    let _ = parse_line(&damaged, 250);
                }
            }
        }
        assert!(read > 50, "{read} records read");
    }
}
