//! Layouts of NPA's conntrack-cache map (`aws_conntrack_map`) and codecs for its keys and values.
//!
//! # What the NPA source says
//!
//! Read from aws/aws-network-policy-agent (snapshot at commit c8619c0, Aug 2026):
//!
//! * C key, `pkg/ebpf/c/tc.v4ingress.bpf.c` (same in `tc.v4egress.bpf.c`, `v4events.bpf.c`):
//!   `struct conntrack_key { __u32 src_ip; __u16 src_port; __u32 dest_ip; __u16 dest_port;
//!   __u8 protocol; __u32 owner_ip; __u32 ifindex; }`. Natural C alignment gives
//!   `src_ip@0 src_port@4 pad@6..8 dest_ip@8 dest_port@12 protocol@14 pad@15 owner_ip@16
//!   ifindex@20`: 24 bytes, 20 before `ifindex` was added (commit 8147f19, first in v1.3.7).
//! * C key, `pkg/ebpf/c/tc.v6ingress.bpf.c` (same in `tc.v6egress.bpf.c`, `v6events.bpf.c`):
//!   `struct conntrack_key { struct in6_addr saddr; __u16 src_port; struct in6_addr daddr;
//!   __u16 dest_port; __u8 protocol; struct in6_addr owner_addr; __u32 ifindex; }`.
//!   `struct in6_addr` is a union containing `__be32[4]`, so it is 4-byte aligned and the
//!   compiler pads after each `__u16`/`__u8` run: `saddr@0 src_port@16 pad@18..20 daddr@20
//!   dest_port@36 protocol@38 pad@39 owner_addr@40 ifindex@56`: 60 bytes, 56 without
//!   `ifindex`. The Go mirror `utils.ConntrackKeyV6` in `pkg/utils/utils.go` spells the same
//!   padding out explicitly (`_ uint16` after `Source_port`, `_ uint8` after `Protocol`) and
//!   is copied byte for byte into the map key (`ConvConntrackV6ToByte`), which confirms it.
//!   (Before v1.0 the IPv6 key had no owner field at all; that layout is not supported.)
//! * Value: `struct conntrack_value { __u8 val; }` (1 byte) until the last_seen fix; then
//!   briefly `{ __u8 val; __u8 _pad[7]; __u64 last_seen; }` (dd11826) and finally
//!   `{ __u64 val; __u64 last_seen; }` (f120e45, PR #610). Both later forms are 16 bytes and
//!   decode the same way when the padding is zero, which the datapath guarantees (it builds
//!   the value from `= {}`).
//!
//! Addresses are stored in network byte order (copied from the packet); ports, `ifindex`,
//! `val` and `last_seen` are host-order integers (the datapath byte-swaps the ports before
//! storing them). NPA runs on x86_64 and arm64, both little-endian, but the codecs use the
//! native byte order so they stay right wherever the detector runs next to the map.
//!
//! # Layout syntax (CLI override)
//!
//! `<key>/<value>` where key is one of `v4-20`, `v4-24`, `v6-56`, `v6-60` (the family and the
//! key size in bytes; aliases `v4`, `v4-ifindex`, `v6`, `v6-ifindex`) and value is `1` or `16`
//! (the value size in bytes; aliases `flag`, `last-seen`). Example: `v4-24/16` is NPA with
//! ifindex keys and the PR #610 value. Case is ignored. [`Layout`]'s `Display` prints the
//! canonical form, which parses back.

use std::fmt;
use std::str::FromStr;

use detector_common::npa_key::{NpaKeyOffsets, npa_key_size};
use serde::Serialize;
use thiserror::Error;

/// Shape of the map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyLayout {
    /// IPv4, 20 bytes (NPA before v1.3.7).
    V4,
    /// IPv4 with `ifindex`, 24 bytes (NPA v1.3.7 and later).
    V4Ifindex,
    /// IPv6, 56 bytes.
    V6,
    /// IPv6 with `ifindex`, 60 bytes.
    V6Ifindex,
}

impl KeyLayout {
    pub const ALL: [KeyLayout; 4] = [
        KeyLayout::V4,
        KeyLayout::V4Ifindex,
        KeyLayout::V6,
        KeyLayout::V6Ifindex,
    ];

    pub const fn is_ipv6(self) -> bool {
        matches!(self, KeyLayout::V6 | KeyLayout::V6Ifindex)
    }

    pub const fn has_ifindex(self) -> bool {
        matches!(self, KeyLayout::V4Ifindex | KeyLayout::V6Ifindex)
    }

    /// Bytes per address in this layout.
    pub const fn addr_len(self) -> usize {
        if self.is_ipv6() { 16 } else { 4 }
    }

    /// Size of the key in bytes (`3 * addr + 8`, plus 4 for `ifindex`).
    pub const fn size(self) -> usize {
        npa_key_size(self.addr_len(), self.has_ifindex())
    }

    /// Canonical name used by the `--layout` syntax.
    pub const fn name(self) -> &'static str {
        match self {
            KeyLayout::V4 => "v4-20",
            KeyLayout::V4Ifindex => "v4-24",
            KeyLayout::V6 => "v6-56",
            KeyLayout::V6Ifindex => "v6-60",
        }
    }

    fn from_size(size: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.size() == size)
    }

    /// Field offsets (one formula for all four layouts: see `detector_common::npa_key`).
    pub const fn offsets(self) -> NpaKeyOffsets {
        NpaKeyOffsets::new(self.addr_len())
    }
}

/// Shape of the map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueLayout {
    /// `{ __u8 val; }`: 1 byte, before PR #610.
    Flag1,
    /// `{ __u64 val; __u64 last_seen; }`: 16 bytes, PR #610 and later.
    LastSeen16,
}

impl ValueLayout {
    pub const ALL: [ValueLayout; 2] = [ValueLayout::Flag1, ValueLayout::LastSeen16];

    pub const fn size(self) -> usize {
        match self {
            ValueLayout::Flag1 => 1,
            ValueLayout::LastSeen16 => 16,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ValueLayout::Flag1 => "1",
            ValueLayout::LastSeen16 => "16",
        }
    }

    fn from_size(size: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.size() == size)
    }
}

/// Key and value layout of one NPA conntrack map. Serializes as its canonical string
/// (`"v4-24/16"`), the same syntax `--layout` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub key: KeyLayout,
    pub value: ValueLayout,
}

impl Serialize for Layout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "unsupported NPA conntrack map layout: key {key_size} B, value {value_size} B; \
         supported key sizes are 20 (IPv4), 24 (IPv4 + ifindex, NPA >= v1.3.7), 56 (IPv6) and \
         60 (IPv6 + ifindex), supported value sizes 1 (val) and 16 (val + last_seen, NPA PR #610); \
         if you know this NPA's structs match a supported layout, force it with \
         --layout <key>/<value> (e.g. --layout v4-24/16)"
    )]
    Unsupported { key_size: u32, value_size: u32 },
    #[error(
        "invalid layout {input:?}: {reason}; expected <key>/<value> with key v4-20, v4-24, \
         v6-56 or v6-60 and value 1 or 16, e.g. v4-24/16"
    )]
    Parse { input: String, reason: String },
    #[error(
        "--layout {forced} does not match the map: its key {key_size} B / value {value_size} B \
         are layout {actual}; drop --layout or point it at the right map"
    )]
    Mismatch {
        forced: Layout,
        actual: Layout,
        key_size: u32,
        value_size: u32,
    },
}

impl Layout {
    pub const fn new(key: KeyLayout, value: ValueLayout) -> Self {
        Self { key, value }
    }

    /// Picks the layout from the map's `key_size`/`value_size` (as `bpf_map_info` reports
    /// them). Every supported key size is distinct, so there is no guessing involved.
    pub fn detect(key_size: u32, value_size: u32) -> Result<Layout, LayoutError> {
        let key = KeyLayout::from_size(key_size as usize);
        let value = ValueLayout::from_size(value_size as usize);
        match (key, value) {
            (Some(key), Some(value)) => Ok(Layout { key, value }),
            _ => Err(LayoutError::Unsupported {
                key_size,
                value_size,
            }),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.key.name(), self.value.name())
    }
}

impl FromStr for Layout {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, LayoutError> {
        let err = |reason: &str| LayoutError::Parse {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let lower = s.trim().to_ascii_lowercase();
        let (k, v) = lower
            .split_once('/')
            .ok_or_else(|| err("missing '/' between key and value"))?;
        let key = match k {
            "v4-20" | "v4" => KeyLayout::V4,
            "v4-24" | "v4-ifindex" => KeyLayout::V4Ifindex,
            "v6-56" | "v6" => KeyLayout::V6,
            "v6-60" | "v6-ifindex" => KeyLayout::V6Ifindex,
            _ => return Err(err("unknown key layout")),
        };
        let value = match v {
            "1" | "flag" => ValueLayout::Flag1,
            "16" | "last-seen" => ValueLayout::LastSeen16,
            _ => return Err(err("unknown value layout")),
        };
        Ok(Layout { key, value })
    }
}
