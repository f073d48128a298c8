//! Post-mortem reports from race trace files alone: a timeline picture per race
//! (self-contained HTML with inline SVG), an index of a directory's races, and a Chrome
//! trace-event (Perfetto) export.

pub mod cli;
pub mod html;
pub mod index;
pub mod perfetto;
pub mod timeline;
pub mod trace_file;
