//! ctnetlink dump datagrams as the kernel (or anything on the netlink socket) sends them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = detector::snapshot::decode_messages(data) {
        // Every message is at least a 16-byte header, so entries cannot outnumber them.
        assert!(decoded.entries.len() <= data.len() / 16);
    }
});
