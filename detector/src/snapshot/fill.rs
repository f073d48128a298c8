//! How full the kernel conntrack table of one network namespace is: `nf_conntrack_count` (per
//! namespace) against `nf_conntrack_max` (global). A full table tracks no new flow (the kernel
//! drops what it cannot track, after evicting what it can), so what the detector saw in that
//! time may be incomplete.
//!
//! The two sysctl files are opened once, in the namespace (a `/proc/sys/net` file belongs to
//! the namespace of the task that opens it), and read with `pread` at every check: two small
//! reads, no path lookup.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// The count and the limit, read together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub count: u64,
    pub max: u64,
}

impl Fill {
    /// No new entry fits (a limit of 0 is no limit).
    pub fn full(&self) -> bool {
        self.max > 0 && self.count >= self.max
    }
}

/// The open sysctl files of one namespace's conntrack table.
pub struct ConntrackFill {
    count: File,
    max: File,
}

impl ConntrackFill {
    /// Opens the files in the namespace at `netns` (entered on a short-lived thread), or in
    /// the caller's namespace. Fails when conntrack is not loaded there.
    pub fn open(netns: Option<&Path>) -> io::Result<Self> {
        let open_here = || -> io::Result<Self> {
            Ok(Self {
                count: File::open(COUNT)?,
                max: File::open(MAX)?,
            })
        };
        let Some(path) = netns else {
            return open_here();
        };
        let ns = File::open(path)?;
        std::thread::Builder::new()
            .name("ct-fill".into())
            .spawn(move || {
                // SAFETY: `ns` is an open descriptor for the life of the call; setns changes
                // the network namespace of this short-lived thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                open_here()
            })?
            .join()
            .map_err(|_| io::Error::other("the thread opening the conntrack sysctls panicked"))?
    }

    /// The table's fill now; None when a read fails.
    pub fn read(&self) -> Option<Fill> {
        Some(Fill {
            count: read_number(&self.count)?,
            max: read_number(&self.max)?,
        })
    }
}

fn read_number(f: &File) -> Option<u64> {
    let mut buf = [0u8; 24];
    let n = f.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_means_the_count_reached_a_set_limit() {
        assert!(Fill { count: 8, max: 8 }.full());
        assert!(Fill { count: 9, max: 8 }.full());
        assert!(!Fill { count: 7, max: 8 }.full());
        assert!(!Fill { count: 100, max: 0 }.full(), "0 is no limit");
    }

    /// Where conntrack is loaded, the files read as numbers, again and again from one open.
    #[test]
    fn reads_this_namespaces_table() {
        let Ok(fill) = ConntrackFill::open(None) else {
            return; // nf_conntrack not loaded here
        };
        let by_path: Option<u64> = std::fs::read_to_string(MAX)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        for _ in 0..2 {
            let f = fill.read();
            assert!(f.is_some(), "the open files read as numbers");
            assert_eq!(f.map(|f| f.max), by_path);
        }
    }
}
