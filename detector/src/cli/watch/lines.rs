//! What `detector watch` does with the bytes of a stream: splits them into lines of bounded
//! length, and remembers the lines it showed so that the replay after a reconnect does not
//! repeat them.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use thiserror::Error;

/// Longest line `detector watch` takes (1 MiB). A record is a few KiB; a stream that sends more
/// with no newline is not a detector's, and holding it would grow memory without bound.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("a line longer than {limit} bytes (no newline within the limit): not a detector's stream")]
pub struct LineTooLong {
    pub limit: usize,
}

/// Splits a byte stream, arriving in chunks of any size, into lines of at most `limit` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    /// The unfinished line; never longer than `limit`.
    pending: Vec<u8>,
    limit: usize,
}

impl LineSplitter {
    pub fn new(limit: usize) -> Self {
        Self {
            pending: Vec::new(),
            limit,
        }
    }

    /// Takes the next chunk; returns the lines it completes, without their newline (invalid
    /// UTF-8 replaced). Fails as soon as a line, finished or not, is longer than the limit.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, LineTooLong> {
        let mut lines = Vec::new();
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.append(&rest[..nl])?;
            lines.push(String::from_utf8_lossy(&self.pending).into_owned());
            self.pending.clear();
            rest = &rest[nl + 1..];
        }
        self.append(rest)?;
        Ok(lines)
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), LineTooLong> {
        if self.pending.len() + bytes.len() > self.limit {
            return Err(LineTooLong { limit: self.limit });
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }
}

/// Lines already shown (their hashes, the last [`Seen::CAP`]).
#[derive(Debug, Default)]
pub struct Seen {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Seen {
    const CAP: usize = 10_000;

    /// True the first time a line is seen.
    pub fn first(&mut self, line: &str) -> bool {
        let mut h = DefaultHasher::new();
        line.hash(&mut h);
        let h = h.finish();
        if !self.set.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > Self::CAP
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a panic is the failure report")]
    use super::*;

    #[test]
    fn lines_split_across_chunks_come_out_whole() {
        let mut s = LineSplitter::new(16);
        assert_eq!(s.push(b"ab").unwrap(), Vec::<String>::new());
        assert_eq!(s.push(b"c\n\nde").unwrap(), ["abc", ""]);
        assert_eq!(s.push(b"f\ng\n").unwrap(), ["def", "g"]);
    }

    #[test]
    fn a_line_over_the_limit_fails_whether_or_not_its_newline_came() {
        let mut s = LineSplitter::new(4);
        assert_eq!(s.push(b"abcd\n").unwrap(), ["abcd"]);
        assert_eq!(s.push(b"abcde\n"), Err(LineTooLong { limit: 4 }));
        let mut s = LineSplitter::new(4);
        s.push(b"abc").unwrap();
        assert_eq!(s.push(b"de"), Err(LineTooLong { limit: 4 }));
    }

    #[test]
    fn seen_is_true_once_per_line_and_forgets_the_oldest_beyond_its_cap() {
        let mut seen = Seen::default();
        assert!(seen.first("a"));
        assert!(!seen.first("a"));
        for i in 0..Seen::CAP {
            assert!(seen.first(&i.to_string()));
        }
        assert!(seen.first("a"), "forgotten after CAP newer lines");
    }
}
