//! The agent (NPA) side: conntrack-cache map layouts and key/value decoding (pure), and
//! finding the map on this node (`target`).

pub mod codec;
pub mod layout;
pub mod map_keys;
pub mod target;

pub use codec::{CodecError, NpaKey, NpaValue};
pub use layout::{KeyLayout, Layout, LayoutError, ValueLayout};

#[cfg(test)]
mod tests;
