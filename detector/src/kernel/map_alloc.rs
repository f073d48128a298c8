//! Whether the tables of live entries are preallocated, and setting that in the object before
//! it is loaded.
//!
//! A preallocated hash map takes the memory of every entry at creation; with
//! `BPF_F_NO_PREALLOC` only the bucket array is taken up front and each element when inserted.
//! Tracing programs (kprobe, tracepoint) may use a hash map that allocates at run time only
//! from Linux 6.1 on, where hash maps allocate from the BPF memory allocator: before, the
//! verifier refuses it (up to 5.6) or loads it with a kernel `WARN_ONCE` (5.7 to 6.0, a panic
//! where `panic_on_warn` is set). So the flag is set per kernel, at load time.
//!
//! aya 0.16 cannot override a map's flags, and the kernel crate declares its maps in the legacy
//! `maps` section as `struct bpf_map_def { type, key_size, value_size, max_entries,
//! map_flags, ... }` (u32 each), so the flag is written into a copy of the object's bytes at
//! the map symbol's definition.

use object::{Object, ObjectSection, ObjectSymbol};
use thiserror::Error;

/// `BPF_F_NO_PREALLOC` (uapi/linux/bpf.h).
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_MAP_TYPE_HASH`: the only kind this is done for (LRU maps must preallocate).
const BPF_MAP_TYPE_HASH: u32 = 1;
/// Byte offsets in `struct bpf_map_def`.
const DEF_TYPE: usize = 0;
const DEF_FLAGS: usize = 16;

/// The first kernel whose verifier lets tracing programs use a hash map without
/// preallocation, safely (hash maps on the BPF memory allocator).
const FIRST_KERNEL_WITHOUT_PREALLOC: (u32, u32) = (6, 1);

#[derive(Debug, Error)]
pub enum MapAllocError {
    #[error("the eBPF object does not parse as ELF: {0}")]
    Elf(#[from] object::Error),
    #[error("the eBPF object has no map definition `{0}`")]
    NoSymbol(String),
    #[error("map `{name}` is not a plain hash map (type {kind}) or already has flags {flags:#x}")]
    Unexpected { name: String, kind: u32, flags: u32 },
}

/// The kernel's (major, minor) version from a release string such as `6.1.0-18-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether this kernel's tracing programs may use hash maps that allocate as they fill.
pub fn kernel_allows_no_prealloc(release: Option<&str>) -> bool {
    release
        .and_then(kernel_version)
        .is_some_and(|v| v >= FIRST_KERNEL_WITHOUT_PREALLOC)
}

/// This kernel's release (`/proc/sys/kernel/osrelease`).
pub fn running_kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// A copy of `elf` in which the plain hash maps `names` are created with `BPF_F_NO_PREALLOC`.
/// Every name must be a legacy map definition of a plain hash map without flags.
pub fn without_prealloc(elf: &[u8], names: &[&str]) -> Result<Vec<u8>, MapAllocError> {
    let file = object::File::parse(elf)?;
    let mut at = Vec::with_capacity(names.len());
    for name in names {
        let def = file
            .symbols()
            .find(|s| s.name() == Ok(*name))
            .and_then(|s| {
                let section = file.section_by_index(s.section_index()?).ok()?;
                let (start, size) = section.file_range()?;
                // In a relocatable object a symbol's value is its offset in its section.
                let offset = s.address().checked_sub(section.address())?;
                (offset + (DEF_FLAGS as u64 + 4) <= size)
                    .then(|| usize::try_from(start + offset).ok())
                    .flatten()
            })
            .ok_or_else(|| MapAllocError::NoSymbol((*name).to_string()))?;
        at.push((*name, def));
    }
    let mut out = elf.to_vec();
    for (name, def) in at {
        let word = |o: usize| u32::from_le_bytes([out[o], out[o + 1], out[o + 2], out[o + 3]]);
        let (kind, flags) = (word(def + DEF_TYPE), word(def + DEF_FLAGS));
        if kind != BPF_MAP_TYPE_HASH || flags != 0 {
            return Err(MapAllocError::Unexpected {
                name: name.to_string(),
                kind,
                flags,
            });
        }
        out[def + DEF_FLAGS..def + DEF_FLAGS + 4].copy_from_slice(&BPF_F_NO_PREALLOC.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    #[test]
    fn kernel_versions_decide_preallocation() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("6.1.0-18-amd64\n"), Some((6, 1)));
        assert_eq!(
            kernel_version("5.10.228-219.884.amzn2.x86_64"),
            Some((5, 10))
        );
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_allows_no_prealloc(Some("6.1.0-18-amd64")));
        assert!(kernel_allows_no_prealloc(Some("6.18.44")));
        assert!(!kernel_allows_no_prealloc(Some("6.0.19")));
        assert!(!kernel_allows_no_prealloc(Some("5.15.0-1051-aws")));
        assert!(!kernel_allows_no_prealloc(None));
    }

    /// The real object: SEEN and FLOWS get the flag, nothing else changes, and a map that is
    /// not a plain hash (the ring buffer) is refused.
    #[test]
    fn the_live_entry_tables_are_patched_and_nothing_else() {
        let elf = crate::kernel::OBJECT;
        let patched = without_prealloc(elf, &["SEEN", "FLOWS"]).unwrap();
        assert_eq!(patched.len(), elf.len());
        let changed: Vec<usize> = (0..elf.len()).filter(|&i| elf[i] != patched[i]).collect();
        assert_eq!(
            changed.len(),
            2,
            "one byte of each map's flags: {changed:?}"
        );
        let file = object::File::parse(&*patched).unwrap();
        for name in ["SEEN", "FLOWS"] {
            let sym = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
            let section = file.section_by_index(sym.section_index().unwrap()).unwrap();
            let data = section.data().unwrap();
            let def = usize::try_from(sym.address()).unwrap();
            assert_eq!(data[def + DEF_FLAGS], 1, "{name}");
        }
        assert!(matches!(
            without_prealloc(elf, &["EVENTS"]),
            Err(MapAllocError::Unexpected { .. })
        ));
        assert!(matches!(
            without_prealloc(elf, &["NO_SUCH_MAP"]),
            Err(MapAllocError::NoSymbol(_))
        ));
    }
}
