//! Decoding a watched map's key into the flow it names, with the layout userspace wrote into
//! `TARGETS` (field offsets and address family).

use detector_common::{AF_INET, AF_INET6, MAX_KEY, TargetMap, Tuple};

use crate::kernel::read_kernel;

/// Bytes of a key to capture: the map's key size, at most MAX_KEY.
#[inline(always)]
pub fn key_len(size: u32) -> usize {
    if size as usize > MAX_KEY {
        MAX_KEY
    } else {
        size as usize
    }
}

/// An offset into a key, as an index the verifier can bound on every kernel. The offsets come
/// from a map; a range check on them alone was not enough on 6.1, whose verifier lost the
/// bound when the compiler checked one copy of the value and indexed with another (spilled
/// before the check): "invalid unbounded variable-offset read from stack". The volatile read
/// makes the value opaque to the compiler, so the mask it cannot prove redundant stays, and the
/// register that indexes carries the bound itself.
#[inline(always)]
fn key_index(off: u32) -> Option<usize> {
    if off as usize >= MAX_KEY {
        return None;
    }
    let off = off as usize;
    // SAFETY: a volatile read of a live, aligned local.
    Some(unsafe { core::ptr::read_volatile(&off) } & (MAX_KEY - 1))
}

/// The flow a key names, in the kernel's tuple form (ports in host order, as NPA stores them).
#[inline(always)]
pub fn key_tuple(key: &[u8; MAX_KEY], t: &TargetMap) -> Option<Tuple> {
    let alen = match t.family as u8 {
        AF_INET => 4,
        AF_INET6 => 16,
        _ => return None,
    };
    let mut tuple = Tuple {
        family: t.family as u8,
        ..Tuple::default()
    };
    // Each index is bounded on the very register that indexes: see `key_index`.
    let (s, d, sp, dp, pr) = (
        key_index(t.off_src)?,
        key_index(t.off_dst)?,
        key_index(t.off_sport)?,
        key_index(t.off_dport)?,
        key_index(t.off_proto)?,
    );
    if s > MAX_KEY - 16 || d > MAX_KEY - 16 || sp > MAX_KEY - 2 || dp > MAX_KEY - 2 {
        return None;
    }
    // Copies through bpf_probe_read_kernel, from the key's own buffer: the verifier checks a
    // direct access against the largest masked offset plus the access size, which runs past
    // the buffer for the later fields (the range check above is on another register).
    let base = key.as_ptr() as u64;
    if alen == 4 {
        let src: [u8; 4] = read_kernel(base, s as u32);
        let dst: [u8; 4] = read_kernel(base, d as u32);
        tuple.src_addr[..4].copy_from_slice(&src);
        tuple.dst_addr[..4].copy_from_slice(&dst);
    } else {
        tuple.src_addr = read_kernel(base, s as u32);
        tuple.dst_addr = read_kernel(base, d as u32);
    }
    tuple.src_port = u16::from_le_bytes(read_kernel(base, sp as u32));
    tuple.dst_port = u16::from_le_bytes(read_kernel(base, dp as u32));
    tuple.proto = read_kernel(base, pr as u32);
    Some(tuple)
}
