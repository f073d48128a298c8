//! A race's confirmation (its flow's first denied packet) or its absence: the readable line
//! and the NDJSON line (`race_confirmed` / `race_unconfirmed`).

use anyhow::Result;

use crate::engine::RaceConfirmation;
use crate::record::{FlowTuple, proto_name};
use crate::report::render::TimeBase;
use crate::report::trace_file::json_with_wall_times;

#[derive(serde::Serialize)]
struct ConfirmationLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// The denied packet (confirmed), or the end of the after-window (unconfirmed).
    ts_ns: u64,
    race_confirmation: &'a RaceConfirmation,
}

fn at_ns(c: &RaceConfirmation) -> u64 {
    c.first_denied.as_ref().map_or_else(
        || c.delete_ts_ns.saturating_add(c.after_window_ns),
        |d| d.ts_ns,
    )
}

/// The NDJSON line, wall times added after each `_ns` time.
pub fn confirmation_json(c: &RaceConfirmation, time: &TimeBase) -> Result<String> {
    json_with_wall_times(
        &ConfirmationLine {
            kind: if c.confirmed {
                "race_confirmed"
            } else {
                "race_unconfirmed"
            },
            ts_ns: at_ns(c),
            race_confirmation: c,
        },
        &time.wall,
    )
    .map_err(Into::into)
}

/// The readable line: which race, and the denial (delay and drop reason) or its absence.
pub fn confirmation_text(c: &RaceConfirmation, time: &TimeBase) -> String {
    let flow = FlowTuple {
        proto: c.key.proto,
        src: c.key.src,
        sport: c.key.sport,
        dst: c.key.dst,
        dport: c.key.dport,
    };
    let race = format!("{} {} {}", c.class.name(), proto_name(c.key.proto), flow);
    match (&c.first_denied, c.delete_to_denied_ns) {
        (Some(d), Some(delay)) => format!(
            "{} CONFIRMED {race}: packet {} denied {:.3} ms after the delete ({})",
            time.wall.iso(d.ts_ns),
            d.tuple,
            delay as f64 / 1e6,
            d.reason
        ),
        _ => format!(
            "{} UNCONFIRMED {race}: no packet denied within {:.1} s after the delete{}",
            time.wall.iso(at_ns(c)),
            c.after_window_ns as f64 / 1e9,
            if c.maybe_incomplete {
                " (records may be missing)"
            } else {
                ""
            }
        ),
    }
}
