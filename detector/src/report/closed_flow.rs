//! A delete of a closed connection's key (TCP CLOSE or TIME_WAIT): its readable line and its
//! NDJSON line. Shown apart from races, never as one.

use anyhow::Result;

use crate::engine::ClosedFlowDelete;
use crate::record::{FlowTuple, proto_name};
use crate::report::render::TimeBase;
use crate::report::trace_file::json_with_wall_times;

/// A closed-flow delete on the NDJSON stream.
#[derive(serde::Serialize)]
struct ClosedFlowLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    ts_ns: u64,
    closed_flow_delete: &'a ClosedFlowDelete,
}

/// The NDJSON line (`"type":"closed_flow_delete"`), wall times added after each `_ns` time.
pub fn closed_flow_json(c: &ClosedFlowDelete, time: &TimeBase) -> Result<String> {
    json_with_wall_times(
        &ClosedFlowLine {
            kind: "closed_flow_delete",
            ts_ns: c.delete_ts_ns,
            closed_flow_delete: c,
        },
        &time.wall,
    )
    .map_err(Into::into)
}

/// The readable line: the flow, its entry's state and remaining timeout, and who deleted it.
pub fn closed_flow_text(c: &ClosedFlowDelete, time: &TimeBase) -> String {
    let flow = FlowTuple {
        proto: c.key.proto,
        src: c.key.src,
        sport: c.key.sport,
        dst: c.key.dst,
        dport: c.key.dport,
    };
    format!(
        "{} CLOSED-FLOW DELETE {} {} by {}[{}]: entry {:016x} in {} ({:.1} s left) carries no \
         more packets; no race",
        time.wall.iso(c.delete_ts_ns),
        proto_name(c.key.proto),
        flow,
        c.agent.comm,
        c.agent.pid,
        c.entry_id,
        c.tcp_state.name(),
        c.timeout_left_ns as f64 / 1e9,
    )
}
