//! tracefs `events/<category>/<name>/format` files: the field-offset parser over any text. The
//! first line of the input is the field asked for, the rest the format file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (field, format) = text.split_once('\n').unwrap_or(("cmd", &text));
    for field in [field, "cmd", "uattr", "__syscall_nr", "ret"] {
        let _ = detector::kernel::tracefs::parse_offset(format, field);
    }
});
