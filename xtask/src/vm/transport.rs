//! A file from the guest to the host over its results port, as text lines: the port is a
//! serial line (a tty whose output processing turns `\n` into `\r\n`) shared with the guest's
//! progress lines, so the bytes travel hex-encoded in tagged lines, followed by their length
//! and checksum; a line lost or mangled on the way is an error, never a truncated file.
//!
//! ```text
//! FILE-DATA <hex of up to 64 bytes>
//! ...
//! FILE-END <length> <FNV-1a 64 of the bytes, hex>
//! ```

use anyhow::{Context, Result, bail};

const DATA: &str = "FILE-DATA ";
const END: &str = "FILE-END ";
/// Bytes per line (128 hex digits: short enough for any console, long enough to be quick).
const CHUNK: usize = 64;

/// FNV-1a, 64 bits: a checksum both ends can compute without a dependency.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The lines that carry `data` (each ends with `\n`).
pub fn encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len() * 2 + data.len() / CHUNK * 12 + 64);
    for chunk in data.chunks(CHUNK) {
        s.push_str(DATA);
        for b in chunk {
            s.push_str(&format!("{b:02x}"));
        }
        s.push('\n');
    }
    s.push_str(&format!("{END}{} {:016x}\n", data.len(), fnv1a(data)));
    s
}

/// The file carried in `text`, which may hold other lines too (they are skipped); an error
/// when there is no end line or the bytes do not match its length and checksum.
pub fn decode(text: &str) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(hex) = line.strip_prefix(DATA) {
            if hex.len() % 2 != 0 {
                bail!("a FILE-DATA line with an odd number of hex digits: {line:?}");
            }
            for i in (0..hex.len()).step_by(2) {
                let byte = hex
                    .get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .with_context(|| format!("not hex in a FILE-DATA line: {line:?}"))?;
                data.push(byte);
            }
        } else if let Some(end) = line.strip_prefix(END) {
            let (len, sum) = end
                .split_once(' ')
                .with_context(|| format!("a malformed FILE-END line: {line:?}"))?;
            let len: usize = len.parse().context("FILE-END length")?;
            let sum = u64::from_str_radix(sum.trim(), 16).context("FILE-END checksum")?;
            if data.len() != len || fnv1a(&data) != sum {
                bail!(
                    "the file arrived damaged: {} bytes with checksum {:016x}, sent {len} bytes \
                     with {sum:016x}",
                    data.len(),
                    fnv1a(&data)
                );
            }
            return Ok(data);
        }
    }
    bail!("no FILE-END line: the guest sent no file, or its end was lost")
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_a_serial_line_with_other_lines() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
        // What the host reads: the tty's \r\n, and progress lines interleaved.
        let text = format!("BENCH-LOG starting\n{}VMTEST-END rc=0\n", encode(&data))
            .replace('\n', "\r\n")
            .replacen("FILE-DATA", "BENCH-LOG a line\r\nFILE-DATA", 1);
        assert_eq!(decode(&text).unwrap(), data);
        assert_eq!(decode(&encode(b"")).unwrap(), b"");
    }

    #[test]
    fn damage_is_an_error() {
        let text = encode(b"{\"a\": 1}");
        let lost = text.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert!(decode(&lost).is_err());
        let flipped = text.replacen("7b", "7c", 1);
        assert!(
            decode(&flipped)
                .unwrap_err()
                .to_string()
                .contains("damaged")
        );
        let cut = text.lines().next().unwrap().to_string();
        assert!(
            decode(&cut)
                .unwrap_err()
                .to_string()
                .contains("no FILE-END")
        );
    }
}
