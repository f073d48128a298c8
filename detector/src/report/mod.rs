//! What the detector tells people: readable lines and NDJSON (`render`, `verdict`), the run
//! summary (`summary`), and the outputs they go to, each behind [`Sink`]: stdout (`console`),
//! trace files (`trace_file`), the HTTP hub (`crate::http::sink`) and Kubernetes Events
//! (`kube_events`).

pub mod closed_flow;
pub mod confirmation;
pub mod console;
pub mod kube_events;
pub mod render;
pub mod summary;
pub mod trace_file;
pub mod trace_writer;
pub mod verdict;

use std::cell::OnceCell;
use std::path::Path;

use anyhow::Result;

use crate::clock::WallClock;
use crate::engine::{Trace, Verdict};
use crate::k8s::PodRef;

/// One output of `detector run`. Every method has a no-op default: a sink implements what it
/// shows.
pub trait Sink {
    /// One record (a kernel event, or the detector's own note such as a trace written).
    fn event(&mut self, _record: &Record<'_>) -> Result<()> {
        Ok(())
    }
    /// One race, as soon as it is decided.
    fn verdict(&mut self, _verdict: &VerdictOut<'_>) -> Result<()> {
        Ok(())
    }
    /// A race confirmed by its first denied packet, or unconfirmed when its window closed.
    fn confirmation(&mut self, _c: &ConfirmationOut<'_>) -> Result<()> {
        Ok(())
    }
    /// A race's trace, complete once its window after the delete has passed.
    fn trace(&mut self, _trace: &TraceOut<'_>) -> Result<()> {
        Ok(())
    }
    /// The end of the run, with its summary.
    fn finish(&mut self, _summary: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// Where the readable form of a record goes when stdout is not NDJSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextTo {
    /// Nowhere (kernel events are only streamed or shown as NDJSON).
    Nowhere,
    Stdout,
    /// The detector's own notes (a trace written, the map re-created).
    Stderr,
}

/// A record rendered lazily: each form is built at most once, and only if a sink asks for it
/// (most records are shown nowhere unless `--json` is on or a stream client listens).
pub struct Record<'a> {
    pub text_to: TextTo,
    json: OnceCell<String>,
    text: OnceCell<String>,
    render_json: &'a dyn Fn() -> String,
    render_text: &'a dyn Fn() -> String,
}

impl<'a> Record<'a> {
    pub fn new(
        text_to: TextTo,
        render_json: &'a dyn Fn() -> String,
        render_text: &'a dyn Fn() -> String,
    ) -> Self {
        Self {
            text_to,
            json: OnceCell::new(),
            text: OnceCell::new(),
            render_json,
            render_text,
        }
    }

    /// The NDJSON line.
    pub fn json(&self) -> &str {
        self.json.get_or_init(self.render_json)
    }

    /// The readable line.
    pub fn text(&self) -> &str {
        self.text.get_or_init(self.render_text)
    }
}

/// A race on its way out: the verdict with what the detector adds to it.
pub struct VerdictOut<'a> {
    pub verdict: &'a Verdict,
    /// Kernel time of the delete to this verdict.
    pub latency_ns: u64,
    pub pods: &'a [PodRef],
    /// Where its trace file will be written.
    pub trace_file: &'a Path,
    /// The NDJSON line and the readable line.
    pub json: &'a str,
    pub text: &'a str,
}

/// A race's confirmation on its way out, with its NDJSON line and its readable line.
pub struct ConfirmationOut<'a> {
    pub confirmation: &'a crate::engine::RaceConfirmation,
    pub json: &'a str,
    pub text: &'a str,
}

/// A complete trace on its way out.
pub struct TraceOut<'a> {
    pub trace: &'a Trace,
    /// The detection latency of its verdict, when it was seen live.
    pub latency_ns: Option<u64>,
    pub pods: Option<&'a [PodRef]>,
    pub wall: &'a WallClock,
}
