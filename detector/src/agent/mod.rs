//! The agent (NPA) side: conntrack-cache map layouts and key/value decoding. Pure, no I/O.

pub mod layout;

pub use layout::{CodecError, KeyLayout, Layout, LayoutError, NpaKey, NpaValue, ValueLayout};
