//! The agent (NPA) side: conntrack-cache map layouts and key/value decoding (pure), and
//! finding the map on this node (`target`).

pub mod layout;
pub mod target;

pub use layout::{CodecError, KeyLayout, Layout, LayoutError, NpaKey, NpaValue, ValueLayout};
