//! `/v1/traces`: the trace files of `--trace-dir` over HTTP, so a cluster's traces can be
//! collected without a debug pod on the node (the image has no `tar` for `kubectl cp`).
//!
//! Only the files the listing names are served: `race-*.json` and `summary-*.json` directly in
//! the directory, regular files (not links), so a request cannot reach anything else (no `..`,
//! no `/`, no hidden temporary files of an unfinished write).

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::engine::VerdictClass;

/// One trace file as `GET /v1/traces` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// File name, the `{name}` of `GET /v1/traces/{name}`.
    pub name: String,
    /// Last modification, ISO-8601 UTC (when the trace was written).
    pub time: String,
    /// The verdict class of a race trace (e.g. `port-reuse`), or `summary`.
    pub class: String,
    /// Bytes.
    pub size: u64,
}

/// True for names the listing may return: a race trace or a run summary, as written by the
/// detector, with no path separator and no leading dot.
pub fn servable_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    (stem.starts_with("race-") || stem.starts_with("summary-"))
        && stem
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.contains("..")
}

/// The class in a file name: `race-{delete_ts}-{class}-{key...}.json`, where the key part has
/// been `{src}.{sport}-{dst}.{dport}` and is now `{proto}-{src}.{sport}-{dst}.{dport}-owner...`
/// (trace_file.rs); classes contain `-` themselves, so the class is the known class name the
/// rest starts with.
fn class_of(name: &str) -> String {
    if name.starts_with("summary-") {
        return "summary".into();
    }
    let rest = name
        .strip_prefix("race-")
        .and_then(|r| r.split_once('-'))
        .map_or("", |(_ts, rest)| rest);
    VerdictClass::ALL
        .iter()
        .map(|c| c.name())
        .find(|c| rest.strip_prefix(c).is_some_and(|r| r.starts_with('-')))
        .unwrap_or("unknown")
        .to_string()
}

/// The servable trace files of `dir`, newest first (ties by name).
pub fn list(dir: &Path) -> std::io::Result<Vec<TraceEntry>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        // Not created yet: the server starts before the run makes its directory.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    for e in entries {
        let e = e?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !servable_name(&name) {
            continue;
        }
        // DirEntry::metadata does not follow links: a link is not a regular file here.
        let Ok(md) = e.metadata() else { continue };
        if !md.is_file() {
            continue;
        }
        let ns = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        out.push((ns, name, md.len()));
    }
    out.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    Ok(out
        .into_iter()
        .map(|(ns, name, size)| TraceEntry {
            class: class_of(&name),
            time: crate::clock::iso8601(ns),
            name,
            size,
        })
        .collect())
}

/// The file `name` in `dir` if the listing would return it.
fn resolve(dir: &Path, name: &str) -> Option<PathBuf> {
    if !servable_name(name) {
        return None;
    }
    let p = dir.join(name);
    let md = std::fs::symlink_metadata(&p).ok()?;
    md.is_file().then_some(p)
}

fn text(status: StatusCode, msg: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

fn no_dir() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "this detector writes no trace files (no --trace-dir)\n".into(),
    )
}

/// `GET /v1/traces`.
pub async fn list_handler(dir: Option<PathBuf>) -> Response {
    let Some(dir) = dir else { return no_dir() };
    let listed = tokio::task::spawn_blocking(move || list(&dir)).await;
    match listed {
        Ok(Ok(entries)) => match serde_json::to_string(&entries) {
            Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing the trace directory: {e}\n"),
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `GET /v1/traces/{name}`.
pub async fn file_handler(dir: Option<PathBuf>, name: String) -> Response {
    let Some(dir) = dir else { return no_dir() };
    let read = tokio::task::spawn_blocking(move || {
        let p = resolve(&dir, &name).ok_or(name)?;
        std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
    })
    .await;
    match read {
        Ok(Ok(bytes)) => (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response(),
        Ok(Err(name)) => text(
            StatusCode::NOT_FOUND,
            format!("no trace named {name:?}; GET /v1/traces lists them\n"),
        ),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
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
    fn names_outside_the_listing_are_refused() {
        for bad in [
            "../etc/passwd",
            "race-1-port-reuse-a.1-b.2.json/../../x",
            "race-..json",
            ".race-1.json.tmp-3",
            "race-1-port-reuse-a.1-b.2.txt",
            "other.json",
            "race-1/x.json",
            "",
        ] {
            assert!(!servable_name(bad), "{bad:?} accepted");
        }
        assert!(servable_name(
            "race-1036781864847-port-reuse-10.78.1.2.42001-10.78.2.2.8080.json"
        ));
        assert!(servable_name("summary-2026-11-30T211500Z.json"));
    }

    #[test]
    fn class_comes_from_the_name_even_with_dashes() {
        assert_eq!(
            class_of("race-1036781864847-port-reuse-10.78.1.2.42001-10.78.2.2.8080.json"),
            "port-reuse"
        );
        assert_eq!(
            class_of("race-5-stale-match-fd00__1.42001-fd00__2.8080.json"),
            "stale-match"
        );
        assert_eq!(class_of("summary-x.json"), "summary");
    }

    /// The names the trace writer gives today, for every class and an IPv6 key: the listing
    /// parses what the writer writes.
    #[test]
    fn class_comes_from_the_writers_own_names() {
        let tmp = std::env::temp_dir().join(format!("detector-trace-names-{}", std::process::id()));
        let mut dir = crate::report::trace_file::TraceDir::create(&tmp).unwrap();
        for (src, dst, owner) in [
            ("10.78.1.2", "10.78.2.2", "10.78.2.2"),
            ("fd00::1", "fd00::2", "fd00::1"),
        ] {
            let key = crate::npa::NpaKey {
                src: src.parse().unwrap(),
                sport: 42001,
                dst: dst.parse().unwrap(),
                dport: 8080,
                proto: 17,
                owner: owner.parse().unwrap(),
                ifindex: Some(7),
            };
            for class in VerdictClass::ALL {
                let path = dir.name(12345, class.name(), &key);
                let name = path.file_name().unwrap().to_str().unwrap();
                assert!(servable_name(name), "{name} not servable");
                assert_eq!(class_of(name), class.name(), "{name}");
            }
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
