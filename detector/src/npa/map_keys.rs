//! The start-up read of every key in the agent's map.
//!
//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+) copies thousands of keys per system call; where the
//! kernel or the map type refuses it, the keys are walked one `BPF_MAP_GET_NEXT_KEY` at a time
//! (one system call per key: about half a second at 524,288 keys). Both are raw bpf(2) calls on
//! the map's fd: aya has no batch call, and raw bytes serve every key and value size alike.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use super::target::{AgentMap, TargetError};

/// Keys asked for per batch call. A hash map's batch stops at a bucket boundary, and a bucket
/// larger than the room left fails the call with ENOSPC, so the first call that fails so is
/// retried with twice the room.
const BATCH_KEYS: usize = 4096;

/// The largest room a batch call is given (a bucket never holds this many keys).
const MAX_BATCH_KEYS: usize = 1 << 20;

/// bpf(2) commands.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Linux's ENOTSUPP (524, kernel-internal, but bpf(2) returns it for map types without batch
/// operations).
const ENOTSUPP: i32 = 524;

/// How the keys were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMethod {
    Batch,
    OneAtATime,
}

impl ReadMethod {
    pub fn label(self) -> &'static str {
        match self {
            ReadMethod::Batch => "batched",
            ReadMethod::OneAtATime => "one key at a time",
        }
    }
}

/// Every key the map held when it was read, back to back.
#[derive(Debug)]
pub struct KeySnapshot {
    bytes: Vec<u8>,
    key_size: usize,
    pub method: ReadMethod,
    /// Why the walk stopped before the end of the map, if it did: the keys not read are
    /// unknown to the engine, so their deletes show as deletes of unknown keys.
    pub stopped: Option<io::Error>,
}

impl KeySnapshot {
    pub fn len(&self) -> usize {
        self.bytes.len().checked_div(self.key_size).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.bytes.chunks_exact(self.key_size.max(1))
    }

    /// The last `n` keys (all of them when there are fewer).
    pub fn last(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        let from = self.len().saturating_sub(n) * self.key_size;
        self.bytes[from..].chunks_exact(self.key_size.max(1))
    }

    /// Forgets the last `n` keys and gives their memory back (the snapshot is fed to the
    /// engine a chunk at a time, so that it and the engine's tables do not peak together).
    pub fn forget_last(&mut self, n: usize) {
        let keep = self.len().saturating_sub(n) * self.key_size;
        self.bytes.truncate(keep);
        // Shrinking in halves: each shrink is a reallocation, and this keeps them few.
        if self.bytes.capacity() > 2 * keep.max(4096) {
            self.bytes.shrink_to_fit();
        }
    }
}

/// Every key currently in the map (the start-up snapshot).
pub fn keys(map: &AgentMap) -> Result<KeySnapshot, TargetError> {
    let data = match &map.pin {
        Some(pin) => aya::maps::MapData::from_pin(pin),
        None => aya::maps::MapData::from_id(map.id),
    }
    .map_err(|source| TargetError::Read { id: map.id, source })?;
    // The pin may have been replaced since `resolve`: the keys must come from the map the
    // probes watch.
    if let Ok(info) = data.info()
        && info.id() != map.id
    {
        return Err(TargetError::Replaced {
            id: map.id,
            now: info.id(),
        });
    }
    let fd = data.fd().as_fd();
    Ok(read_keys(
        fd,
        map.key_size as usize,
        map.value_size as usize,
        map.max_entries as usize,
        ReadMethod::Batch,
    ))
}

/// Reads the keys of the hash map at `fd`: with [`ReadMethod::Batch`], batched where the
/// kernel allows it and one at a time where it refuses; with [`ReadMethod::OneAtATime`], one
/// at a time (tests compare the two). A walk of a map that changes as it is read stops after
/// twice `max_entries` keys.
pub fn read_keys(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    max_entries: usize,
    method: ReadMethod,
) -> KeySnapshot {
    let max_keys = max_entries.saturating_mul(2).max(1);
    if method == ReadMethod::Batch {
        match read_batched(fd, key_size, value_size) {
            Ok(snap) => return snap,
            Err(e) => {
                tracing::debug!("batched map read refused ({e}): reading one key at a time");
            }
        }
    }
    read_one_at_a_time(fd, key_size, max_keys)
}

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_MAP_GET_NEXT_KEY`.
#[repr(C)]
#[derive(Default)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, alive and
    // exclusively borrowed across the call; the kernel reads at most `size_of::<T>()` bytes of
    // it and writes only through the buffers its fields point to, which the callers size for
    // the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The batched walk. An error on the first call means the kernel or the map type has no batch
/// read (the caller falls back); an error after it ends the walk with the keys read so far.
fn read_batched(fd: BorrowedFd<'_>, key_size: usize, value_size: usize) -> io::Result<KeySnapshot> {
    let mut room = BATCH_KEYS;
    let mut bytes = Vec::new();
    let mut values = Vec::new();
    // The kernel's batch position (a bucket index for hash maps); 8 bytes cover every map type.
    let mut token = [0u64; 2];
    let mut started = false;
    loop {
        let have = bytes.len();
        bytes.resize(have + room * key_size, 0);
        values.resize(room * value_size.max(1), 0);
        let mut attr = BatchAttr {
            in_batch: if started { token.as_ptr() as u64 } else { 0 },
            out_batch: token[1..].as_mut_ptr() as u64,
            keys: bytes[have..].as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: room as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let rc = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(room);
        bytes.truncate(have + got * key_size);
        match rc {
            Ok(()) => {}
            // The end of the map (with the last keys, if any, in this call's `count`).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(snapshot(bytes, key_size, ReadMethod::Batch, None));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && room < MAX_BATCH_KEYS => {
                // A bucket larger than the room left: ask again from the same position.
                room *= 2;
                continue;
            }
            Err(e) if !started && refuses_batches(&e) => return Err(e),
            Err(e) => return Ok(snapshot(bytes, key_size, ReadMethod::Batch, Some(e))),
        }
        token[0] = token[1];
        started = true;
    }
}

/// Whether a failed first batch call means "no batch operations here" (an older kernel does
/// not know the command; some map types lack it).
fn refuses_batches(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// The one-key-at-a-time walk. A key deleted under the walk makes the kernel restart from
/// the first key, so a walk of a busy map can see keys twice (the engine takes a key it
/// already has as the same key); it gives up after twice the map's capacity.
fn read_one_at_a_time(fd: BorrowedFd<'_>, key_size: usize, max_keys: usize) -> KeySnapshot {
    let mut bytes: Vec<u8> = Vec::new();
    let mut next = vec![0u8; key_size];
    loop {
        if bytes.len() / key_size.max(1) > max_keys {
            let e = io::Error::other(format!(
                "the map changed under the walk: more than {max_keys} keys read"
            ));
            return snapshot(bytes, key_size, ReadMethod::OneAtATime, Some(e));
        }
        let prev = (!bytes.is_empty()).then(|| bytes.len() - key_size);
        let mut attr = NextKeyAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: prev.map_or(0, |p| bytes[p..].as_ptr() as u64),
            next_key: next.as_mut_ptr() as u64,
            ..NextKeyAttr::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => bytes.extend_from_slice(&next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                return snapshot(bytes, key_size, ReadMethod::OneAtATime, None);
            }
            Err(e) => return snapshot(bytes, key_size, ReadMethod::OneAtATime, Some(e)),
        }
    }
}

fn snapshot(
    mut bytes: Vec<u8>,
    key_size: usize,
    method: ReadMethod,
    stopped: Option<io::Error>,
) -> KeySnapshot {
    bytes.shrink_to_fit();
    KeySnapshot {
        bytes,
        key_size,
        method,
        stopped,
    }
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
    fn fed_a_chunk_at_a_time_every_key_comes_out_once() {
        let bytes: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_be_bytes()).collect();
        let mut snap = snapshot(bytes, 4, ReadMethod::Batch, None);
        let mut seen = Vec::new();
        while !snap.is_empty() {
            let before = snap.len();
            seen.extend(snap.last(3000).map(<[u8]>::to_vec));
            snap.forget_last(3000);
            assert_eq!(snap.len(), before.saturating_sub(3000));
            assert!(snap.bytes.capacity() <= 2 * (snap.bytes.len().max(4096)));
        }
        seen.sort();
        let want: Vec<Vec<u8>> = (0..10_000u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(seen, want);
        assert_eq!(snap.last(5).count(), 0);
    }
}
