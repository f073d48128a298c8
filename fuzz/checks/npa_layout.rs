// NPA's conntrack-map keys and values, read from the agent's map, in every layout; and the
// layout itself, detected from the map's sizes or given as `--layout` text.
//
// The `npa_layout` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

use detector::npa::{KeyLayout, Layout, NpaKey, NpaValue, ValueLayout};

pub fn check(data: &[u8]) {
    for layout in KeyLayout::ALL {
        // Every prefix of the input that has the layout's size, and the input as it is.
        for bytes in [data.get(..layout.size()).unwrap_or(data), data] {
            if let Ok(key) = NpaKey::decode(layout, bytes) {
                let _ = key.to_string();
                // A decoded key encodes back to the same bytes (padding was checked zero).
                let again = key.encode(layout);
                assert_eq!(again.as_deref(), Ok(bytes), "{layout:?} key round trip");
            }
        }
    }
    for layout in ValueLayout::ALL {
        for bytes in [data.get(..layout.size()).unwrap_or(data), data] {
            if let Ok(value) = NpaValue::decode(layout, bytes) {
                let again = value.encode(layout);
                assert_eq!(again.as_deref(), Ok(bytes), "{layout:?} value round trip");
            }
        }
    }
    if let Some((sizes, _)) = data.split_first_chunk::<8>() {
        let key_size = u32::from_ne_bytes([sizes[0], sizes[1], sizes[2], sizes[3]]);
        let value_size = u32::from_ne_bytes([sizes[4], sizes[5], sizes[6], sizes[7]]);
        if let Ok(l) = Layout::detect(key_size, value_size) {
            assert_eq!(
                (l.key.size(), l.value.size()),
                (key_size as usize, value_size as usize)
            );
        }
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(layout) = text.parse::<Layout>()
    {
        // The canonical form parses back to the same layout.
        assert_eq!(layout.to_string().parse::<Layout>(), Ok(layout));
    }
}
