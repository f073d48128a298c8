//! What the detector tells people: readable lines and NDJSON (`render`), and trace files
//! (`trace_file`).

pub mod render;
pub mod trace_file;
