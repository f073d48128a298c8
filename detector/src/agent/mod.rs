//! The agent (NPA) side: map layouts and key decoding (being written).
