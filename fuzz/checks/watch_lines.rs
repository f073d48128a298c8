// The line splitter of `detector watch`, fed a server's bytes in chunks of any size. Input: the
// line limit (first byte), the chunk size (second byte, 0 read as 1), then the stream. The
// lines must be the stream's, in order, and the splitter must fail exactly when a line (or the
// unfinished tail) is longer than the limit, after yielding the lines before it.
//
// The `watch_lines` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

use detector::cli::watch::lines::LineSplitter;

pub fn check(data: &[u8]) {
    let Some(([limit, chunk], stream)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (limit, chunk) = (usize::from(*limit), usize::from(*chunk).max(1));
    let mut splitter = LineSplitter::new(limit);
    let mut got = Vec::new();
    let mut failed = false;
    for c in stream.chunks(chunk) {
        match splitter.push(c) {
            Ok(lines) => got.extend(lines),
            Err(e) => {
                assert_eq!(e.limit, limit);
                failed = true;
                break;
            }
        }
    }
    let mut segments: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    let tail = segments.pop().unwrap_or_default();
    let too_long = segments.iter().chain([&tail]).any(|s| s.len() > limit);
    assert_eq!(failed, too_long, "fails exactly on a line over {limit} bytes");
    let want: Vec<String> = segments
        .iter()
        .take_while(|s| s.len() <= limit)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    if failed {
        assert!(want.starts_with(&got), "{got:?} is not a prefix of {want:?}");
    } else {
        assert_eq!(got, want);
    }
}
