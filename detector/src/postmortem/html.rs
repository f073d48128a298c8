//! One race as a self-contained HTML page: inline CSS and an inline SVG drawn from the
//! [`RaceTimeline`] model, no script and nothing fetched, so it opens offline.

use std::fmt::Write as _;

use super::timeline::{EntryRole, RaceTimeline};
use super::trace_file::TraceDocument;

/// Colours chosen to be told apart at a glance (and by the screenshot test).
pub const LIVE_BAR: &str = "#2563eb";
pub const OLD_BAR: &str = "#94a3b8";
pub const OTHER_BAR: &str = "#cbd5e1";
pub const DELETE: &str = "#c026d3";
pub const DROP: &str = "#dc2626";
pub const REUSE_GAP: &str = "#f59e0b";
pub const EXPIRY: &str = "#0f766e";

const WIDTH: f64 = 1100.0;
const PLOT_X0: f64 = 190.0;
const PLOT_X1: f64 = 1070.0;
const TOP: f64 = 56.0;
const ENTRY_LANE: f64 = 58.0;
const AGENT_LANE: f64 = 66.0;
const DROP_LANE: f64 = 58.0;
const BAR_H: f64 = 16.0;

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `+12.3 ms`, `−155.6 ms` (a real minus sign), `0 ms`.
pub fn fmt_ms(ms: f64) -> String {
    let digits = if ms.abs() >= 100.0 {
        1
    } else if ms.abs() >= 1.0 {
        2
    } else {
        3
    };
    if ms == 0.0 {
        "0 ms".into()
    } else if ms < 0.0 {
        format!("−{:.*} ms", digits, -ms)
    } else {
        format!("+{ms:.digits$} ms")
    }
}

fn fmt_tick(ms: f64, step: f64) -> String {
    let digits = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    if ms == 0.0 {
        "0".into()
    } else if ms < 0.0 {
        format!("−{:.*}", digits, -ms)
    } else {
        format!("+{ms:.digits$}")
    }
}

fn dur_ms(ns: u64) -> String {
    format!("{:.2} ms", ns as f64 / 1e6)
}

struct Plot<'a> {
    t: &'a RaceTimeline,
}

impl Plot<'_> {
    fn x(&self, ms: f64) -> f64 {
        PLOT_X0 + (PLOT_X1 - PLOT_X0) * self.t.fraction(ms)
    }
}

/// The SVG picture of one race.
pub fn race_svg(doc: &TraceDocument, t: &RaceTimeline) -> String {
    let v = &doc.trace.verdict;
    let p = Plot { t };
    let lanes_h = t.entries.len() as f64 * ENTRY_LANE + AGENT_LANE + DROP_LANE;
    let axis_y = TOP + lanes_h + 6.0;
    let height = axis_y + 52.0;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="race" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="race timeline">"#
    );
    // Headline: the verdict's class and latency.
    let latency = doc
        .detection_latency_ns
        .map(|n| format!(" · verdict {} after the delete", dur_ms(n)))
        .unwrap_or_default();
    let denied = v
        .delete_to_denied_ns
        .map(|n| format!(" · first denied {} after", dur_ms(n)))
        .unwrap_or_default();
    let _ = write!(
        s,
        r#"<text class="headline" x="{PLOT_X0}" y="22">{}{}{}</text>"#,
        esc(&v.class),
        esc(&latency),
        esc(&denied)
    );
    // Lane backgrounds first, then the reuse gap behind the bars.
    let agent_y = TOP + t.entries.len() as f64 * ENTRY_LANE;
    for i in 0..t.entries.len() + 2 {
        let (y, h) = match i.checked_sub(t.entries.len()) {
            None => (TOP + i as f64 * ENTRY_LANE, ENTRY_LANE),
            Some(0) => (agent_y, AGENT_LANE),
            Some(_) => (agent_y + AGENT_LANE, DROP_LANE),
        };
        lane_background(&mut s, y, h, i);
    }
    // The reuse gap, across the old and live lanes.
    if let Some((a, b)) = t.reuse_gap {
        let (xa, xb) = (p.x(a), p.x(b));
        let w = (xb - xa).max(3.0);
        let _ = write!(
            s,
            r#"<rect class="reuse-gap" x="{xa:.1}" y="{TOP}" width="{w:.1}" height="{:.1}" fill="{REUSE_GAP}" opacity="0.7"><title>reuse gap {}</title></rect><text class="small gap-label" x="{:.1}" y="{:.1}">reuse gap {}</text>"#,
            agent_y - TOP,
            fmt_ms(b - a),
            xb + 6.0,
            TOP - 6.0,
            dur_ms(((b - a) * 1e6).round().max(0.0) as u64),
        );
    }
    // Entry lanes: a lifetime bar each.
    let mut y = TOP;
    for e in &t.entries {
        let (role, fill) = match e.role {
            EntryRole::Old => ("old entry", OLD_BAR),
            EntryRole::Live => ("live entry", LIVE_BAR),
            EntryRole::Other => ("other entry", OTHER_BAR),
        };
        lane_label(
            &mut s,
            y + ENTRY_LANE / 2.0,
            role,
            &format!("conntrack #{}", short_id(e.id)),
        );
        let bar_y = y + (ENTRY_LANE - BAR_H) / 2.0 + 2.0;
        let x0 = e.born_ms.map_or(PLOT_X0, |b| p.x(b));
        let x1 = e.reaped.as_ref().map_or(PLOT_X1, |(r, _)| p.x(*r));
        let w = (x1 - x0).max(2.0);
        let _ = write!(
            s,
            r#"<rect class="entry-bar {cls}" x="{x0:.1}" y="{bar_y:.1}" width="{w:.1}" height="{BAR_H}" rx="3" fill="{fill}"><title>{role} {id}</title></rect>"#,
            cls = role.replace(' ', "-"),
            id = e.id,
        );
        let label_y = bar_y - 5.0;
        match e.born_ms {
            Some(b) if b >= t.start_ms => {
                let _ = write!(
                    s,
                    r##"<circle class="birth" cx="{x0:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="#1e293b"/><text class="small" x="{x0:.1}" y="{label_y:.1}" text-anchor="{}">born {}</text>"##,
                    bar_y + BAR_H / 2.0,
                    if x0 > PLOT_X0 + (PLOT_X1 - PLOT_X0) * 0.75 {
                        "end"
                    } else {
                        "start"
                    },
                    fmt_ms(b)
                );
            }
            Some(b) => {
                let _ = write!(
                    s,
                    r#"<text class="small" x="{PLOT_X0}" y="{label_y:.1}">◂ born {}</text>"#,
                    fmt_ms(b)
                );
            }
            None => {
                let _ = write!(
                    s,
                    r#"<text class="small" x="{PLOT_X0}" y="{label_y:.1}">◂ born before the detector saw it</text>"#
                );
            }
        }
        if let Some((r, why)) = &e.reaped {
            let _ = write!(
                s,
                r##"<path class="reap" d="M{a:.1},{b:.1} l8,8 m0,-8 l-8,8" stroke="#1e293b" stroke-width="2"/><text class="small" x="{x1:.1}" y="{ly:.1}" text-anchor="{anchor}">reaped by the kernel ({why}) {at}</text>"##,
                a = x1 - 4.0,
                b = bar_y + BAR_H / 2.0 - 4.0,
                ly = bar_y + BAR_H + 13.0,
                anchor = if x1 > (PLOT_X0 + PLOT_X1) / 2.0 {
                    "end"
                } else {
                    "start"
                },
                why = esc(why),
                at = fmt_ms(*r),
            );
        } else {
            let _ = write!(
                s,
                r#"<text class="small" x="{PLOT_X1}" y="{:.1}" text-anchor="end">alive at the window's end ▸</text>"#,
                bar_y + BAR_H + 13.0
            );
        }
        if let Some(x) = e.expiry_ms.filter(|m| *m <= t.end_ms).map(|m| p.x(m)) {
            let _ = write!(
                s,
                r#"<line class="expiry" x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{EXPIRY}" stroke-width="2" stroke-dasharray="3,2"/><text class="small expiry-label" x="{x:.1}" y="{label_y:.1}" text-anchor="middle">timeout as of the delete: {}</text>"#,
                bar_y - 3.0,
                bar_y + BAR_H + 3.0,
                fmt_ms(e.expiry_ms.unwrap_or_default()),
            );
        }
        y += ENTRY_LANE;
    }
    lane_label(&mut s, agent_y + AGENT_LANE / 2.0, "agent", "map delete");
    let drop_y = agent_y + AGENT_LANE;
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for d in &t.drops {
        match reasons.iter_mut().find(|(r, _)| *r == d.reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((d.reason.clone(), 1)),
        }
    }
    lane_label(
        &mut s,
        drop_y + DROP_LANE / 2.0,
        &format!("denied packets ({})", t.drops.len()),
        &reasons
            .iter()
            .map(|(r, n)| format!("{r} ×{n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );

    // Deletes: a line across every lane for the race's delete, a diamond in the agent lane.
    let mid = agent_y + 22.0;
    for d in &t.deletes {
        let x = p.x(d.at_ms);
        let (fill, opacity) = if d.is_race {
            (DELETE, 1.0)
        } else {
            (DELETE, 0.45)
        };
        if d.is_race {
            let _ = write!(
                s,
                r#"<line class="delete-line" x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{DELETE}" stroke-width="2" stroke-dasharray="6,3"/>"#,
                TOP - 2.0,
                axis_y
            );
        }
        let _ = write!(
            s,
            r#"<path class="delete-marker{}" d="M{x:.1},{:.1} l9,9 l-9,9 l-9,-9 z" fill="{fill}" opacity="{opacity}"><title>delete by {} · map {} · {} · {}</title></path>"#,
            if d.is_race { " race-delete" } else { "" },
            mid - 9.0,
            esc(&d.task),
            d.map_id.map_or("—".into(), |m| m.to_string()),
            esc(&d.key),
            esc(&d.result),
        );
        if d.is_race {
            let anchor_end = x > PLOT_X0 + (PLOT_X1 - PLOT_X0) * 0.6;
            let (tx, anchor) = if anchor_end {
                (x - 14.0, "end")
            } else {
                (x + 14.0, "start")
            };
            let _ = write!(
                s,
                r#"<text class="label" x="{tx:.1}" y="{:.1}" text-anchor="{anchor}">delete by {} · map {}</text><text class="small" x="{tx:.1}" y="{:.1}" text-anchor="{anchor}">key {} · {}</text>"#,
                mid + 1.0,
                esc(&d.task),
                d.map_id.map_or("—".into(), |m| m.to_string()),
                mid + 17.0,
                esc(&d.key),
                esc(&d.result),
            );
        } else {
            // The agent's delete of another cycle: only when, the rest is in the tooltip.
            let anchor = if x > PLOT_X0 + (PLOT_X1 - PLOT_X0) * 0.75 {
                "end"
            } else {
                "middle"
            };
            let _ = write!(
                s,
                r#"<text class="small" x="{:.1}" y="{:.1}" text-anchor="{anchor}">other delete {}</text>"#,
                x + if anchor == "end" { 9.0 } else { 0.0 },
                mid + 26.0,
                fmt_ms(d.at_ms),
            );
        }
    }
    // Drops: a triangle and a tick each; the first denied one gets its time and reason.
    let dmid = drop_y + 22.0;
    for d in &t.drops {
        let x = p.x(d.at_ms);
        let _ = write!(
            s,
            r#"<path class="drop-marker" d="M{:.1},{:.1} l16,0 l-8,14 z" fill="{DROP}"><title>denied {} · {}</title></path><line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{DROP}" stroke-width="2"/>"#,
            x - 8.0,
            dmid - 9.0,
            fmt_ms(d.at_ms),
            esc(&d.reason),
            dmid + 5.0,
            dmid + 16.0,
        );
    }
    if let Some(first) = t.drops.iter().find(|d| d.first) {
        let (xd, xf) = (p.x(0.0), p.x(first.at_ms));
        let _ = write!(
            s,
            r##"<path class="flow" d="M{xd:.1},{:.1} C{:.1},{:.1} {:.1},{:.1} {xf:.1},{:.1}" fill="none" stroke="#475569" stroke-width="1.5" marker-end="url(#arrow)"/><text class="small" x="{:.1}" y="{:.1}">first denied {} · {}</text>"##,
            mid + 9.0,
            xd,
            dmid - 12.0,
            xf - 20.0,
            dmid - 30.0,
            dmid - 10.0,
            xf + 12.0,
            dmid + 30.0,
            fmt_ms(first.at_ms),
            esc(&first.reason),
        );
    }
    for (at, count) in &t.lost {
        let x = p.x(*at);
        let _ = write!(
            s,
            r##"<text class="small lost" x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#b45309">⚠ lost {}</text>"##,
            TOP - 20.0,
            count.map_or("records".into(), |c| c.to_string())
        );
    }
    // Time axis.
    let _ = write!(
        s,
        r##"<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#475569"/></marker></defs><rect class="axis" x="{PLOT_X0}" y="{axis_y:.0}" width="{:.0}" height="2" fill="#334155" shape-rendering="crispEdges"/>"##,
        PLOT_X1 - PLOT_X0
    );
    let ticks = t.ticks();
    let (lstep, rstep) = (
        ticks
            .windows(2)
            .find(|w| w[1] <= 0.0)
            .map_or(1.0, |w| w[1] - w[0]),
        ticks
            .windows(2)
            .find(|w| w[0] >= 0.0)
            .map_or(1.0, |w| w[1] - w[0]),
    );
    for tick in ticks {
        let x = p.x(tick);
        let step = if tick < 0.0 { lstep } else { rstep };
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{axis_y:.1}" y2="{:.1}" stroke="#334155"/><line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{axis_y:.1}" stroke="#e2e8f0" stroke-width="1"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            axis_y + 5.0,
            axis_y + 18.0,
            fmt_tick(tick, step)
        );
    }
    let _ = write!(
        s,
        r#"<text class="small" x="{:.1}" y="{:.1}" text-anchor="middle">ms relative to the agent's delete (each side of the delete has its own scale)</text></svg>"#,
        (PLOT_X0 + PLOT_X1) / 2.0,
        axis_y + 40.0
    );
    s
}

fn lane_background(s: &mut String, y: f64, h: f64, i: usize) {
    let fill = if i.is_multiple_of(2) {
        "#f8fafc"
    } else {
        "#ffffff"
    };
    let _ = write!(
        s,
        r#"<rect x="0" y="{y:.1}" width="{WIDTH}" height="{h:.1}" fill="{fill}"/>"#
    );
}

fn lane_label(s: &mut String, mid: f64, title: &str, sub: &str) {
    let _ = write!(
        s,
        r#"<text class="lane" x="12" y="{:.1}">{}</text><text class="small" x="12" y="{:.1}">{}</text>"#,
        mid - 3.0,
        esc(title),
        mid + 13.0,
        esc(sub)
    );
}

/// The last digits of a conntrack id: enough to tell a tuple's entries apart.
fn short_id(id: u64) -> String {
    let s = id.to_string();
    format!("…{}", &s[s.len().saturating_sub(6)..])
}

pub const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#0f172a;background:#fff}
h1{font-size:20px;margin:0 0 4px}h1 small{color:#64748b;font-weight:400}
.facts{border-collapse:collapse;font-size:13px;margin:10px 0 14px}.facts td{padding:2px 14px 2px 0;vertical-align:top}.facts td:first-child{color:#64748b}
svg.race text{font-family:system-ui,sans-serif;fill:#0f172a}svg.race .headline{font-size:15px;font-weight:600}
svg.race .lane{font-size:13px;font-weight:600}svg.race .label{font-size:12px}svg.race .small{font-size:11px;fill:#334155}svg.race .tick{font-size:11px;fill:#334155}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;font-size:12px;margin:10px 0 0 0;max-width:1100px}.legend span{display:inline-flex;align-items:center;gap:6px}
table.races{border-collapse:collapse;font-size:13px}table.races th,table.races td{border-bottom:1px solid #e2e8f0;padding:4px 10px;text-align:left}table.races th{background:#f1f5f9}
.warn{color:#b45309}";

fn legend() -> String {
    let items = [
        (
            format!(r#"<rect width="22" height="10" y="2" rx="2" fill="{LIVE_BAR}"/>"#),
            "live entry's lifetime (conntrack)",
        ),
        (
            format!(r#"<rect width="22" height="10" y="2" rx="2" fill="{OLD_BAR}"/>"#),
            "old entry (predecessor)",
        ),
        (
            format!(r#"<rect width="22" height="10" y="2" rx="2" fill="{OTHER_BAR}"/>"#),
            "other entry of the tuple",
        ),
        (
            r##"<circle cx="11" cy="7" r="4" fill="#fff" stroke="#1e293b"/>"##.to_string(),
            "birth",
        ),
        (
            r##"<path d="M7,3 l8,8 m0,-8 l-8,8" stroke="#1e293b" stroke-width="2"/>"##.to_string(),
            "reaped by the kernel (reason)",
        ),
        (
            format!(
                r#"<line x1="11" x2="11" y1="0" y2="14" stroke="{EXPIRY}" stroke-width="2" stroke-dasharray="3,2"/>"#
            ),
            "timeout as of the delete",
        ),
        (
            format!(r#"<rect width="22" height="12" y="1" fill="{REUSE_GAP}"/>"#),
            "reuse gap",
        ),
        (
            format!(r#"<path d="M11,0 l7,7 l-7,7 l-7,-7 z" fill="{DELETE}"/>"#),
            "agent's map delete (dashed: the race's)",
        ),
        (
            format!(r#"<path d="M5,2 l12,0 l-6,10 z" fill="{DROP}"/>"#),
            "denied packet (drop reason)",
        ),
        (
            r##"<path d="M2,12 C8,0 14,0 20,8" fill="none" stroke="#475569" stroke-width="1.5"/>"##
                .to_string(),
            "delete → first denied packet",
        ),
    ];
    let mut s = String::from(r#"<div class="legend">"#);
    for (swatch, text) in items {
        let _ = write!(
            s,
            r#"<span><svg width="22" height="14" viewBox="0 0 22 14">{swatch}</svg>{text}</span>"#
        );
    }
    s.push_str("</div>");
    s
}

/// The full page of one race.
pub fn race_page(doc: &TraceDocument, source_name: &str) -> String {
    let t = RaceTimeline::build(doc);
    let v = &doc.trace.verdict;
    let opt = |o: Option<String>| o.unwrap_or_else(|| "—".into());
    let pods = v.pods.as_ref().filter(|p| !p.is_empty()).map(|ps| {
        ps.iter()
            .map(|p| format!("{}/{} ({})", p.namespace, p.pod, p.ip))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let facts: Vec<(&str, String)> = vec![
        ("class", format!("{} ({})", v.class, v.kind)),
        ("decided by", opt(v.decided_by.clone())),
        (
            "delete",
            format!("{} · {}", opt(v.delete_time.clone()), v.delete_ts_ns),
        ),
        (
            "agent",
            opt(v
                .agent
                .as_ref()
                .map(|a| format!("{} pid {} tid {}", a.comm, a.pid, a.tid))),
        ),
        (
            "map",
            format!(
                "{} · layout {} · key owner {} · ifindex {}",
                opt(v.map_id.map(|m| m.to_string())),
                opt(v.layout.clone()),
                opt(v.key.owner.clone()),
                opt(v.key.ifindex.map(|i| i.to_string()))
            ),
        ),
        ("node", opt(doc.node().map(str::to_string))),
        ("pods", opt(pods)),
        (
            "reuse gap",
            opt(v.reuse_gap_ns.map(|n| format!("{:.2} ms", n as f64 / 1e6))),
        ),
        ("birth → delete", opt(v.delete_lag_ns.map(dur_ms))),
        (
            "delete → first denied",
            opt(v.delete_to_denied_ns.map(dur_ms)),
        ),
        (
            "detection latency",
            opt(doc.detection_latency_ns.map(dur_ms)),
        ),
        (
            "confirmed",
            opt(v
                .confirmed
                .map(|c| if c { "yes" } else { "no" }.to_string())),
        ),
    ];
    let mut warn = Vec::new();
    if v.maybe_incomplete {
        warn.push("kernel records were lost in this window: events may be missing".to_string());
    }
    if doc.trace.timeline_truncated || v.timeline_truncated {
        warn.push("the flight recorder dropped events of this story".to_string());
    }
    if doc.trace.after_window_incomplete {
        warn.push("the window after the delete was cut short (detector exit)".to_string());
    }
    if t.hidden_before > 0 {
        warn.push(format!(
            "{} earlier events of the tuple in the trace window (an earlier cycle) are not drawn",
            t.hidden_before
        ));
    }
    for n in &v.notes {
        warn.push(format!(
            "note: {}",
            n.as_str().map_or(n.to_string(), str::to_string)
        ));
    }
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{cls} race {key}</title><style>{CSS}</style></head><body><h1>{cls} race <small>{key}</small></h1><table class=\"facts\">",
        cls = esc(&v.class),
        key = esc(&v.key.display()),
    );
    for (k, val) in facts {
        let _ = write!(s, "<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&val));
    }
    s.push_str("</table>");
    for w in warn {
        let _ = write!(s, "<p class=\"warn\">{}</p>", esc(&w));
    }
    s.push_str(&race_svg(doc, &t));
    s.push_str(&legend());
    let _ = writeln!(
        s,
        "<p style=\"font-size:12px;color:#64748b\">From {} · host {} · written {}</p></body></html>",
        esc(source_name),
        esc(doc.host.as_deref().unwrap_or("—")),
        esc(doc.written_at.as_deref().unwrap_or("—"))
    );
    s
}
