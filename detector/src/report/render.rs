//! Rendering events for people (one readable line each) and machines (NDJSON, stable names).

use serde::Serialize;
use serde_json::json;

use crate::clock::WallClock;
use crate::npa::NpaKey;
use crate::record::{
    CtKind, CtRecord, DeleteView, DestroyReason, Event, FlowTuple, MapDeleteRecord, MapWriteRecord,
    PacketDropRecord, proto_name,
};

/// Kernel time and tick units, turned into wall time and milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct TimeBase {
    pub wall: WallClock,
    /// Kernel tick rate, for jiffies.
    pub hz: u32,
}

impl TimeBase {
    pub fn jiffies_ms(&self, j: i64) -> i64 {
        j * 1000 / self.hz.max(1) as i64
    }
}

/// A tuple's ends on an NDJSON line. Fields in sorted order, as a `serde_json::Value` prints
/// them: the line is the same whether it was built as a Value or serialised straight.
#[derive(Serialize)]
struct Endpoint {
    dport: u16,
    dst: String,
    sport: u16,
    src: String,
}

impl From<&FlowTuple> for Endpoint {
    fn from(t: &FlowTuple) -> Self {
        Self {
            src: t.src.to_string(),
            sport: t.sport,
            dst: t.dst.to_string(),
            dport: t.dport,
        }
    }
}

/// A conntrack event's NDJSON line, serialised straight to text: `detector trace` writes one
/// per event, and building a `serde_json::Value` tree first took most of its CPU per event.
/// Fields in sorted order, as a Value prints them, so the line is what it always was.
#[derive(Serialize)]
struct CtLine<'a> {
    born_ns: Option<u64>,
    comm: &'a str,
    cpu: u32,
    expiry_ns: Option<u64>,
    expiry_time: Option<String>,
    id: String,
    lifetime_ns: Option<u64>,
    netns: u32,
    orig: Endpoint,
    pid: u32,
    proto: String,
    reason: Option<DestroyReason>,
    reply: Endpoint,
    source: &'static str,
    status: u32,
    tid: u32,
    time: String,
    timeout_left_ms: i64,
    ts_ns: u64,
    #[serde(rename = "type")]
    kind: &'static str,
}

fn ct_line(c: &CtRecord, u: &TimeBase) -> String {
    let line = CtLine {
        born_ns: (c.born_ns != 0).then_some(c.born_ns),
        comm: &c.task.comm,
        cpu: c.cpu,
        expiry_ns: (c.expiry_ns != 0).then_some(c.expiry_ns),
        expiry_time: (c.expiry_ns != 0).then(|| u.wall.iso(c.expiry_ns)),
        id: format!("{:016x}", c.id),
        lifetime_ns: lifetime(c),
        netns: c.netns,
        orig: Endpoint::from(&c.orig),
        pid: c.task.pid,
        proto: proto_name(c.orig.proto),
        reason: c.reason,
        reply: Endpoint::from(&c.reply),
        source: c.source.name(),
        status: c.status,
        tid: c.task.tid,
        time: u.wall.iso(c.ts_ns),
        timeout_left_ms: u.jiffies_ms(i64::from(c.timeout_left_jiffies)),
        ts_ns: c.ts_ns,
        kind: c.kind.name(),
    };
    // Serialising plain fields into a String cannot fail.
    serde_json::to_string(&line).unwrap_or_default()
}

fn lifetime(c: &CtRecord) -> Option<u64> {
    (c.kind == CtKind::Destroy && c.born_ns != 0).then(|| c.ts_ns.saturating_sub(c.born_ns))
}

pub fn json_line(ev: &Event, u: &TimeBase) -> String {
    match ev {
        Event::Ct(c) => ct_line(c, u),
        Event::MapDelete(d) => delete_json(d, None, u).to_string(),
        Event::PacketDrop(p) => drop_json(p, None, u).to_string(),
        Event::MapWrite(w) => write_json(w, None, u).to_string(),
    }
}

/// A write to the agent's map seen inside the kernel; `key` decoded when the layout is known.
pub fn write_json(w: &MapWriteRecord, key: Option<&NpaKey>, u: &TimeBase) -> serde_json::Value {
    json!({
        "type": "map_write",
        "ts_ns": w.ts_ns,
        "time": u.wall.iso(w.ts_ns),
        "cpu": w.cpu,
        "map_id": w.map_id,
        "op": w.op,
        "by": if w.from_syscall { "userspace" } else { "datapath" },
        "key_hex": hex(&w.key),
        "key": key,
        "pid": w.task.pid,
        "comm": w.task.comm,
    })
}

/// A dropped packet; `reason` is the drop reason's name when BTF gave one.
pub fn drop_json(p: &PacketDropRecord, reason: Option<&str>, u: &TimeBase) -> serde_json::Value {
    json!({
        "type": "packet_drop",
        "ts_ns": p.ts_ns,
        "time": u.wall.iso(p.ts_ns),
        "cpu": p.cpu,
        "proto": proto_name(p.tuple.proto),
        "tuple": Endpoint::from(&p.tuple),
        "reason": reason,
        "reason_code": p.reason,
        "after_delete_ns": p.ts_ns.saturating_sub(p.delete_ns),
    })
}

pub fn drop_text(p: &PacketDropRecord, reason: Option<&str>, u: &TimeBase) -> String {
    let time = u.wall.iso(p.ts_ns);
    format!(
        "{} DROP    {} {}  {} ({} after the delete)",
        time.get(11..26).unwrap_or(&time),
        proto_name(p.tuple.proto),
        p.tuple,
        reason.map_or_else(|| format!("reason {}", p.reason), str::to_string),
        secs(p.ts_ns.saturating_sub(p.delete_ns) as i128)
    )
}

/// A userspace delete on the agent's map; `key` is its decoded form when the layout is known.
pub fn delete_json(d: &MapDeleteRecord, key: Option<&NpaKey>, u: &TimeBase) -> serde_json::Value {
    json!({
        "type": "agent_delete",
        "ts_ns": d.ts_ns,
        "time": u.wall.iso(d.ts_ns),
        "exit_ns": d.exit_ns,
        "cpu": d.cpu,
        "map_id": d.map_id,
        "cmd": d.cmd,
        "ret": d.ret,
        "key_hex": hex(&d.key),
        "key": key,
        "kernel_view": d.view,
        "entry_id": d.entry_id().map(|id| format!("{id:016x}")),
        "entry_born_ns": (d.ct_born_ns != 0).then_some(d.ct_born_ns),
        "entry_timeout_left_ms": (d.ct_addr != 0).then(|| u.jiffies_ms(d.ct_timeout_left_jiffies as i64)),
        "entry_tcp_state": d.ct_tcp_state,
        "judged_netns": (d.judged_netns != 0).then_some(d.judged_netns),
        "pid": d.task.pid,
        "tid": d.task.tid,
        "comm": d.task.comm,
    })
}

/// The fields of a delete's kernel view that its `agent_delete` line leaves out: the entry's
/// address (its identity, with its birth), status, and whether the key matched reversed.
pub fn delete_view_json(d: &MapDeleteRecord) -> serde_json::Value {
    json!({
        "type": "delete_kernel_view",
        "ts_ns": d.ts_ns,
        "map_id": d.map_id,
        "ct_addr": format!("{:016x}", d.ct_addr),
        "ct_born_ns": d.ct_born_ns,
        "ct_timeout_left_jiffies": d.ct_timeout_left_jiffies,
        "ct_status": d.ct_status,
        "view_reversed": d.view_reversed,
    })
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn delete_text(d: &MapDeleteRecord, key: Option<&NpaKey>, u: &TimeBase) -> String {
    let time = u.wall.iso(d.ts_ns);
    let time = time.get(11..26).unwrap_or(&time);
    let result = match d.ret {
        0 => "deleted".to_string(),
        r if r == -(libc::ENOENT as i64) => "not found".to_string(),
        r => format!("error {r}"),
    };
    let what = key.map_or_else(|| hex(&d.key), |k| k.to_string());
    format!(
        "{time} DELETE  map {} {what}  {result}  kernel entry: {}  [{}/{}]",
        d.map_id,
        match d.view {
            DeleteView::Live => format!(
                "LIVE{} ({} left)",
                d.ct_tcp_state
                    .map(|t| format!(" {}", t.name()))
                    .unwrap_or_default(),
                secs(u.jiffies_ms(d.ct_timeout_left_jiffies as i64) as i128 * 1_000_000)
            ),
            DeleteView::Expired => "expired, not reaped".into(),
            DeleteView::Absent => "none".into(),
            DeleteView::Unknown => "not checked".into(),
        },
        d.task.comm,
        d.task.pid
    )
}

fn secs(ns: i128) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

pub fn text_line(ev: &Event, u: &TimeBase) -> String {
    match ev {
        Event::Ct(c) => {
            let time = u.wall.iso(c.ts_ns);
            let time = time.get(11..26).unwrap_or(&time); // HH:MM:SS.micros
            let mut line = format!(
                "{time} {:<7} {:<4} {}  netns {}  id {:016x}",
                match c.kind {
                    CtKind::New => "NEW",
                    CtKind::Destroy => "DESTROY",
                },
                proto_name(c.orig.proto),
                c.orig,
                c.netns,
                c.id,
            );
            if c.reply != c.orig.reversed() {
                line.push_str(&format!("  reply {}", c.reply));
            }
            let left_ms = u.jiffies_ms(c.timeout_left_jiffies as i64);
            match (c.kind, c.reason) {
                (CtKind::New, _) => {
                    line.push_str(&format!("  timeout {}", secs(left_ms as i128 * 1_000_000)))
                }
                (_, Some(DestroyReason::Expired)) => line.push_str(&format!(
                    "  expired ({} past timeout)",
                    secs(-(left_ms as i128) * 1_000_000)
                )),
                (_, Some(DestroyReason::Killed)) => line.push_str(&format!(
                    "  killed ({} before timeout)",
                    secs(left_ms as i128 * 1_000_000)
                )),
                (_, None) => {}
            }
            if let Some(l) = lifetime(c) {
                line.push_str(&format!("  lived {}", secs(l as i128)));
            }
            line.push_str(&format!(
                "  [{} {}/{}]",
                c.source.name(),
                c.task.comm,
                c.task.pid
            ));
            line
        }
        Event::MapDelete(d) => delete_text(d, None, u),
        Event::PacketDrop(p) => drop_text(p, None, u),
        Event::MapWrite(w) => {
            let time = u.wall.iso(w.ts_ns);
            format!(
                "{} WRITE   map {} {:?} {} by {}",
                time.get(11..26).unwrap_or(&time),
                w.map_id,
                w.op,
                hex(&w.key),
                if w.from_syscall {
                    "userspace"
                } else {
                    "datapath"
                }
            )
        }
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
    use crate::record::{
        decode,
        tests::{bytes_of, raw_ct},
    };
    use detector_common::kind;

    fn units() -> TimeBase {
        TimeBase {
            wall: WallClock::from_offset(1_795_678_405_000_000_000),
            hz: 250,
        }
    }

    #[test]
    fn destroy_renders_reason_and_lifetime() {
        let ev = decode(&bytes_of(&raw_ct(kind::CT_DESTROY))).unwrap();
        let line = text_line(&ev, &units());
        assert!(
            line.contains("DESTROY tcp  10.77.0.2:40000 -> 10.77.0.1:5001"),
            "{line}"
        );
        assert!(line.contains("expired (0.012s past timeout)"), "{line}");
        assert!(line.contains("lived 0.000s"), "{line}");
        // reply == orig (not reversed) in the fixture: shown as NAT
        assert!(line.contains("reply 10.77.0.2:40000"), "{line}");
        let v: serde_json::Value = serde_json::from_str(&json_line(&ev, &units())).unwrap();
        assert_eq!(v["type"], "ct_destroy");
        assert_eq!(v["reason"], "expired");
        assert_eq!(v["lifetime_ns"], 23);
        assert_eq!(v["timeout_left_ms"], -12);
        assert_eq!(v["orig"]["dport"], 5001);
        assert_eq!(v["time"], "2026-11-26T07:33:25.000000Z");
    }

    #[test]
    fn conntrack_lines_are_what_a_value_tree_prints() {
        // Built straight to text, a line must keep the field set and order a Value gives
        // (sorted keys): readers of older recordings and of the docs see the same lines.
        for k in [kind::CT_NEW, kind::CT_DESTROY] {
            let ev = decode(&bytes_of(&raw_ct(k))).unwrap();
            let line = json_line(&ev, &units());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v.to_string(), line);
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                [
                    "born_ns",
                    "comm",
                    "cpu",
                    "expiry_ns",
                    "expiry_time",
                    "id",
                    "lifetime_ns",
                    "netns",
                    "orig",
                    "pid",
                    "proto",
                    "reason",
                    "reply",
                    "source",
                    "status",
                    "tid",
                    "time",
                    "timeout_left_ms",
                    "ts_ns",
                    "type",
                ]
            );
        }
    }
}
