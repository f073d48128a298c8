//! Ring-buffer records: whatever the kernel side writes (or a corrupted ring) must decode to an
//! event or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = detector::record::decode(data) {
        // What every consumer does next with a decoded record.
        let _ = (ev.ts_ns(), ev.kind());
        if let detector::record::Event::Ct(c) = &ev {
            let _ = c.orig.reversed();
        }
    }
});
