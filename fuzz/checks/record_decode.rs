// Ring-buffer records: whatever the kernel side writes (or a corrupted ring) must decode to an
// event or an error, never a panic.
//
// The `record_decode` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

pub fn check(data: &[u8]) {
    if let Ok(ev) = detector::record::decode(data) {
        // What every consumer does next with a decoded record.
        let _ = (ev.ts_ns(), ev.kind());
        if let detector::record::Event::Ct(c) = &ev {
            let _ = c.orig.reversed();
        }
    }
}
