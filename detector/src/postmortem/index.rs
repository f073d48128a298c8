//! The index page of a directory of race trace files: one row per race, linking its page.

use std::fmt::Write as _;

use super::html::{CSS, esc};
use super::trace_file::TraceDocument;

/// One race of the index: its document and the name of its page, relative to the index.
pub struct IndexRow<'a> {
    pub doc: &'a TraceDocument,
    pub page: String,
    pub source: String,
}

fn dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or_else(|| "—".into())
}

pub fn index_page(title: &str, rows: &[IndexRow<'_>]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{CSS}</style></head><body><h1>{t} <small>{n} race{plural}</small></h1>",
        t = esc(title),
        n = rows.len(),
        plural = if rows.len() == 1 { "" } else { "s" },
    );
    s.push_str("<table class=\"races\"><thead><tr><th>delete (UTC)</th><th>class</th><th>key</th><th>node</th><th>pods</th><th>delete → first denied</th><th>first denied reason</th><th>confirmed</th><th>trace file</th></tr></thead><tbody>");
    for r in rows {
        let v = &r.doc.trace.verdict;
        let pods = v.pods.as_ref().filter(|p| !p.is_empty()).map(|ps| {
            ps.iter()
                .map(|p| format!("{}/{}", p.namespace, p.pod))
                .collect::<Vec<_>>()
                .join(", ")
        });
        let _ = write!(
            s,
            "<tr><td><a href=\"{page}\">{time}</a></td><td>{class}</td><td>{key}</td><td>{node}</td><td>{pods}</td><td>{denied}</td><td>{reason}</td><td>{confirmed}</td><td>{src}</td></tr>",
            page = esc(&r.page),
            time = esc(&dash(v.delete_time.clone()).replace('T', " ")),
            class = esc(&v.class),
            key = esc(&v.key.display()),
            node = esc(&dash(r.doc.node().map(str::to_string))),
            pods = esc(&dash(pods)),
            denied = esc(&dash(
                v.delete_to_denied_ns
                    .map(|n| format!("{:.1} ms", n as f64 / 1e6))
            )),
            reason = esc(&dash(
                v.first_denied.as_ref().and_then(|f| f.reason.clone())
            )),
            confirmed = dash(
                v.confirmed
                    .map(|c| if c { "yes" } else { "no" }.to_string())
            ),
            src = esc(&r.source),
        );
    }
    s.push_str("</tbody></table></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::super::trace_file::tests::fixture;
    use super::*;

    #[test]
    fn rows_link_pages_and_show_unknown_fields_as_dash() {
        let mut doc = fixture();
        let known = fixture();
        doc.trace.verdict.confirmed = Some(true);
        let rows = [
            IndexRow {
                doc: &known,
                page: "a.html".into(),
                source: "a.json".into(),
            },
            IndexRow {
                doc: &doc,
                page: "b&c.html".into(),
                source: "b.json".into(),
            },
        ];
        let html = index_page("races", &rows);
        assert!(html.contains("<h1>races <small>2 races</small>"));
        assert!(html.contains("href=\"a.html\""));
        assert!(html.contains("href=\"b&amp;c.html\""));
        assert!(html.contains("<td>port-reuse</td>"));
        assert!(html.contains("<td>vm</td>"));
        assert!(html.contains("<td>348.7 ms</td><td>TC_INGRESS</td><td>—</td>"));
        assert!(html.contains("<td>TC_INGRESS</td><td>yes</td>"));
    }
}
