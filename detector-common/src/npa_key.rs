//! NPA's conntrack-map key as bytes: where each field sits, and writing a key from its fields.
//! One encoder for the detector's key codec, the offsets its kernel programs read keys with,
//! and the bench's generated maps.
//!
//! Every layout is `src, sport, pad16, dst, dport, proto, pad8, owner [, ifindex]` with the
//! addresses 4-byte aligned (C's natural alignment), so one formula over the address length
//! covers IPv4 (4 bytes) and IPv6 (16); the NPA structs it follows are quoted in the detector's
//! `npa::layout`. Addresses are in network order, ports and ifindex in native order (NPA
//! byte-swaps the ports before storing them), padding zero.

use core::fmt;

/// Byte offsets of a key's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpaKeyOffsets {
    pub src: usize,
    pub sport: usize,
    pub pad16: usize,
    pub dst: usize,
    pub dport: usize,
    pub proto: usize,
    pub pad8: usize,
    pub owner: usize,
    pub ifindex: usize,
}

impl NpaKeyOffsets {
    /// The offsets for addresses of `addr_len` bytes (4 or 16).
    pub const fn new(addr_len: usize) -> Self {
        let a = addr_len;
        Self {
            src: 0,
            sport: a,
            pad16: a + 2,
            dst: a + 4,
            dport: 2 * a + 4,
            proto: 2 * a + 6,
            pad8: 2 * a + 7,
            owner: 2 * a + 8,
            ifindex: 3 * a + 8,
        }
    }
}

/// Size of a key with addresses of `addr_len` bytes: `3 * addr + 8`, plus 4 for `ifindex`.
pub const fn npa_key_size(addr_len: usize, ifindex: bool) -> usize {
    let base = 3 * addr_len + 8;
    if ifindex { base + 4 } else { base }
}

/// A key's fields: addresses as their network-order bytes (all three the same length).
#[derive(Debug, Clone, Copy)]
pub struct NpaKeyFields<'a> {
    pub src: &'a [u8],
    pub sport: u16,
    pub dst: &'a [u8],
    pub dport: u16,
    pub proto: u8,
    /// The pod the entry belongs to: `src` or `dst`.
    pub owner: &'a [u8],
    /// Host veth of the pod; `None` in a layout with ifindex writes 0, as NPA's cleanup does.
    pub ifindex: Option<u32>,
}

/// The fields do not fit the key buffer: addresses other than 4 or 16 bytes or of mixed
/// lengths, a buffer that is no key size for them, or an ifindex a 20/56-byte key cannot hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpaKeyMismatch;

impl fmt::Display for NpaKeyMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the key's fields do not fit an NPA key of this size")
    }
}

impl core::error::Error for NpaKeyMismatch {}

impl NpaKeyFields<'_> {
    /// Writes the key into `key`, whose length picks the layout (with or without ifindex);
    /// every byte is written, padding as zero.
    pub fn write(&self, key: &mut [u8]) -> Result<(), NpaKeyMismatch> {
        let a = self.src.len();
        if !(a == 4 || a == 16) || self.dst.len() != a || self.owner.len() != a {
            return Err(NpaKeyMismatch);
        }
        let has_ifindex = if key.len() == npa_key_size(a, true) {
            true
        } else if key.len() == npa_key_size(a, false) {
            false
        } else {
            return Err(NpaKeyMismatch);
        };
        if self.ifindex.is_some() && !has_ifindex {
            return Err(NpaKeyMismatch);
        }
        let o = NpaKeyOffsets::new(a);
        key.fill(0);
        key[o.src..o.src + a].copy_from_slice(self.src);
        key[o.sport..o.sport + 2].copy_from_slice(&self.sport.to_ne_bytes());
        key[o.dst..o.dst + a].copy_from_slice(self.dst);
        key[o.dport..o.dport + 2].copy_from_slice(&self.dport.to_ne_bytes());
        key[o.proto] = self.proto;
        key[o.owner..o.owner + a].copy_from_slice(self.owner);
        if has_ifindex {
            let i = self.ifindex.unwrap_or(0);
            key[o.ifindex..o.ifindex + 4].copy_from_slice(&i.to_ne_bytes());
        }
        Ok(())
    }
}
