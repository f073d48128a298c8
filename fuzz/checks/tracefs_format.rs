// tracefs `events/<category>/<name>/format` files: the field-offset parser over any text. The
// first line of the input is the field asked for, the rest the format file.
//
// The `tracefs_format` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (field, format) = text.split_once('\n').unwrap_or(("cmd", &text));
    for field in [field, "cmd", "uattr", "__syscall_nr", "ret"] {
        let _ = detector::kernel::tracefs::parse_offset(format, field);
    }
}
