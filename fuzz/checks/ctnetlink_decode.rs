// ctnetlink dump datagrams as the kernel (or anything on the netlink socket) sends them.
//
// The `ctnetlink_decode` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

pub fn check(data: &[u8]) {
    if let Ok(decoded) = detector::snapshot::decode_messages(data) {
        // Every message is at least a 16-byte header, so entries cannot outnumber them.
        assert!(decoded.entries.len() <= data.len() / 16);
    }
}
