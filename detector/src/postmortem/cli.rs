//! `detector report`: pictures and Perfetto exports of recorded races, from trace files alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::html::race_page;
use super::index::{IndexRow, index_page};
use super::perfetto::race_trace_events;
use super::trace_file::TraceDocument;
use crate::report::trace_file::write_atomic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// A self-contained HTML page per race (inline SVG, opens offline); an index.html for a
    /// directory.
    Html,
    /// Chrome trace-event JSON per race (`<name>.perfetto.json`), for ui.perfetto.dev or
    /// chrome://tracing.
    Perfetto,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// A race trace file (`race-*.json`) or a directory of them (`detector run --trace-dir`).
    pub input: PathBuf,
    /// Where to write. For a file: the output file (default: next to the input, with
    /// `.html` or `.perfetto.json`). For a directory: an output directory (default:
    /// `<DIR>/report`), which gets one file per race named after its trace file, and for
    /// HTML an `index.html`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Html)]
    pub format: ReportFormat,
}

impl ReportFormat {
    fn extension(self) -> &'static str {
        match self {
            ReportFormat::Html => "html",
            ReportFormat::Perfetto => "perfetto.json",
        }
    }
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "race".into())
}

fn render(doc: &TraceDocument, source: &Path, format: ReportFormat) -> Result<String> {
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(match format {
        ReportFormat::Html => race_page(doc, &name),
        ReportFormat::Perfetto => serde_json::to_string(&race_trace_events(doc))?,
    })
}

/// The race trace files of `dir`, in file-name order.
pub fn race_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = e
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("race-") && name.ends_with(".json") && !name.ends_with(".perfetto.json")
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub fn run(args: ReportArgs) -> Result<()> {
    let meta = std::fs::metadata(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    if !meta.is_dir() {
        let doc = TraceDocument::read(&args.input)?;
        let out = args.out.clone().unwrap_or_else(|| {
            args.input
                .with_file_name(format!("{}.{}", stem(&args.input), args.format.extension()))
        });
        write_atomic(&out, render(&doc, &args.input, args.format)?.as_bytes())?;
        println!("{}", out.display());
        return Ok(());
    }
    let files = race_files(&args.input)?;
    if files.is_empty() {
        bail!(
            "no race trace files (race-*.json) in {}",
            args.input.display()
        );
    }
    // Read them all first: a malformed file stops the report before anything is written.
    let mut docs = Vec::with_capacity(files.len());
    for f in &files {
        docs.push((TraceDocument::read(f)?, f));
    }
    docs.sort_by_key(|(d, _)| d.trace.verdict.delete_ts_ns);
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| args.input.join("report"));
    // A directory of races makes a directory of pages: a file name here would become a
    // directory of that name.
    if !out_dir.is_dir()
        && out_dir
            .extension()
            .is_some_and(|e| e == "json" || e == "html")
    {
        bail!(
            "--out {}: for a directory of traces, --out names a directory (one {} file per \
             race{}); give a directory, or a single trace file as the input",
            out_dir.display(),
            args.format.extension(),
            if args.format == ReportFormat::Html {
                ", and index.html"
            } else {
                ""
            }
        );
    }
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut rows = Vec::new();
    for (doc, src) in &docs {
        let page = format!("{}.{}", stem(src), args.format.extension());
        write_atomic(
            &out_dir.join(&page),
            render(doc, src, args.format)?.as_bytes(),
        )?;
        rows.push(IndexRow {
            doc,
            page,
            source: src
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        });
    }
    if args.format == ReportFormat::Html {
        let title = format!("Races in {}", args.input.display());
        let index = out_dir.join("index.html");
        write_atomic(&index, index_page(&title, &rows).as_bytes())?;
        println!("{}", index.display());
    }
    crate::note!(
        "{} race{} written to {}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        out_dir.display()
    );
    Ok(())
}
