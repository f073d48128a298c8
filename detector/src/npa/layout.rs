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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

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
        let base = 3 * self.addr_len() + 8;
        if self.has_ifindex() { base + 4 } else { base }
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

    /// Field offsets. Every layout is `src, sport, pad16, dst, dport, proto, pad8, owner
    /// [, ifindex]` with addresses 4-byte aligned, so one formula covers all four.
    const fn offsets(self) -> Offsets {
        let a = self.addr_len();
        Offsets {
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

struct Offsets {
    src: usize,
    sport: usize,
    pad16: usize,
    dst: usize,
    dport: usize,
    proto: usize,
    pad8: usize,
    owner: usize,
    ifindex: usize,
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

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("{what} of {actual} bytes does not fit layout {layout} ({expected} bytes)")]
    Length {
        what: &'static str,
        layout: &'static str,
        expected: usize,
        actual: usize,
    },
    /// NPA zeroes its keys before filling them, so non-zero padding means the layout is wrong
    /// (or the bytes are not an NPA key); decoding on would produce a plausible-looking lie.
    #[error("{what} has non-zero padding byte {byte:#04x} at offset {offset} (wrong layout?)")]
    Padding {
        what: &'static str,
        offset: usize,
        byte: u8,
    },
    #[error("key holds {family} addresses but layout {layout} stores {expected}")]
    Family {
        layout: &'static str,
        family: &'static str,
        expected: &'static str,
    },
    #[error("key has ifindex {0} but layout {1} has no ifindex field")]
    Ifindex(u32, &'static str),
    #[error("value {val} does not fit the 1-byte value layout")]
    ValueTooLarge { val: u64 },
    #[error("the 1-byte value layout has no last_seen field")]
    NoLastSeen,
}

/// One key of NPA's conntrack map, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NpaKey {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: u8,
    /// The pod this entry belongs to; NPA sets it to `src` or `dst`.
    pub owner: IpAddr,
    /// Host veth of the pod (layouts with ifindex only).
    pub ifindex: Option<u32>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

impl NpaKey {
    /// Decodes a key; `bytes` must be exactly `layout.size()` long with zero padding.
    pub fn decode(layout: KeyLayout, bytes: &[u8]) -> Result<NpaKey, CodecError> {
        if bytes.len() != layout.size() {
            return Err(CodecError::Length {
                what: "key",
                layout: layout.name(),
                expected: layout.size(),
                actual: bytes.len(),
            });
        }
        let o = layout.offsets();
        for offset in [o.pad16, o.pad16 + 1, o.pad8] {
            if bytes[offset] != 0 {
                return Err(CodecError::Padding {
                    what: "key",
                    offset,
                    byte: bytes[offset],
                });
            }
        }
        let addr = |at: usize| -> IpAddr {
            if layout.is_ipv6() {
                let mut a = [0u8; 16];
                a.copy_from_slice(&bytes[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            } else {
                IpAddr::V4(Ipv4Addr::new(
                    bytes[at],
                    bytes[at + 1],
                    bytes[at + 2],
                    bytes[at + 3],
                ))
            }
        };
        Ok(NpaKey {
            src: addr(o.src),
            sport: u16_at(bytes, o.sport),
            dst: addr(o.dst),
            dport: u16_at(bytes, o.dport),
            proto: bytes[o.proto],
            owner: addr(o.owner),
            ifindex: layout.has_ifindex().then(|| u32_at(bytes, o.ifindex)),
        })
    }

    /// Encodes the key as the datapath would store it (padding zeroed).
    ///
    /// Fails rather than guessing when the key does not fit the layout (IPv6 addresses in an
    /// IPv4 layout or the reverse, or an ifindex the layout cannot hold); a key without
    /// ifindex in an ifindex layout is written with ifindex 0, as NPA's own cleanup does.
    /// `decode(l, &k.encode(l)?) == k` for every key `k` that fits `l`.
    pub fn encode(&self, layout: KeyLayout) -> Result<Vec<u8>, CodecError> {
        let o = layout.offsets();
        let mut b = vec![0u8; layout.size()];
        for (at, ip) in [(o.src, self.src), (o.dst, self.dst), (o.owner, self.owner)] {
            match (ip, layout.is_ipv6()) {
                (IpAddr::V4(a), false) => b[at..at + 4].copy_from_slice(&a.octets()),
                (IpAddr::V6(a), true) => b[at..at + 16].copy_from_slice(&a.octets()),
                (ip, v6) => {
                    return Err(CodecError::Family {
                        layout: layout.name(),
                        family: if ip.is_ipv6() { "IPv6" } else { "IPv4" },
                        expected: if v6 { "IPv6" } else { "IPv4" },
                    });
                }
            }
        }
        b[o.sport..o.sport + 2].copy_from_slice(&self.sport.to_ne_bytes());
        b[o.dport..o.dport + 2].copy_from_slice(&self.dport.to_ne_bytes());
        b[o.proto] = self.proto;
        match (self.ifindex, layout.has_ifindex()) {
            (Some(i), true) => b[o.ifindex..o.ifindex + 4].copy_from_slice(&i.to_ne_bytes()),
            (None, _) => {}
            (Some(i), false) => return Err(CodecError::Ifindex(i, layout.name())),
        }
        Ok(b)
    }

    /// Whether `owner` is one end of the key, as NPA always makes it.
    pub fn owner_is_endpoint(&self) -> bool {
        self.owner == self.src || self.owner == self.dst
    }
}

impl fmt::Display for NpaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ep = |ip: &IpAddr, port: u16| match ip {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "{} {} -> {} owner {}",
            crate::record::proto_name(self.proto),
            ep(&self.src, self.sport),
            ep(&self.dst, self.dport),
            self.owner
        )?;
        if let Some(i) = self.ifindex {
            write!(f, " if {i}")?;
        }
        Ok(())
    }
}

/// One value of NPA's conntrack map, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct NpaValue {
    /// Policy state pair the flow was admitted under.
    pub val: u64,
    /// `bpf_ktime_get_ns()` of the datapath's last hit (16-byte layout only).
    pub last_seen_ns: Option<u64>,
}

impl NpaValue {
    pub fn decode(layout: ValueLayout, bytes: &[u8]) -> Result<NpaValue, CodecError> {
        if bytes.len() != layout.size() {
            return Err(CodecError::Length {
                what: "value",
                layout: layout.name(),
                expected: layout.size(),
                actual: bytes.len(),
            });
        }
        Ok(match layout {
            ValueLayout::Flag1 => NpaValue {
                val: u64::from(bytes[0]),
                last_seen_ns: None,
            },
            ValueLayout::LastSeen16 => NpaValue {
                val: u64_at(bytes, 0),
                last_seen_ns: Some(u64_at(bytes, 8)),
            },
        })
    }

    /// Encodes the value; fails when it does not fit (a `val` over 255 or a `last_seen` for
    /// the 1-byte layout) instead of silently dropping information. A 16-byte value without
    /// `last_seen` is written with 0 there.
    pub fn encode(&self, layout: ValueLayout) -> Result<Vec<u8>, CodecError> {
        match layout {
            ValueLayout::Flag1 => {
                if self.last_seen_ns.is_some() {
                    return Err(CodecError::NoLastSeen);
                }
                let v = u8::try_from(self.val)
                    .map_err(|_| CodecError::ValueTooLarge { val: self.val })?;
                Ok(vec![v])
            }
            ValueLayout::LastSeen16 => {
                let mut b = Vec::with_capacity(16);
                b.extend_from_slice(&self.val.to_ne_bytes());
                b.extend_from_slice(&self.last_seen_ns.unwrap_or(0).to_ne_bytes());
                Ok(b)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_key(ifindex: Option<u32>) -> NpaKey {
        NpaKey {
            src: "10.1.2.3".parse().unwrap(),
            sport: 0x1234,
            dst: "192.168.7.9".parse().unwrap(),
            dport: 443,
            proto: 6,
            owner: "10.1.2.3".parse().unwrap(),
            ifindex,
        }
    }

    fn v6_key(ifindex: Option<u32>) -> NpaKey {
        NpaKey {
            src: "fd00::1:2".parse().unwrap(),
            sport: 40000,
            dst: "2001:db8::ff".parse().unwrap(),
            dport: 53,
            proto: 17,
            owner: "2001:db8::ff".parse().unwrap(),
            ifindex,
        }
    }

    fn key_for(l: KeyLayout) -> NpaKey {
        let ifx = l.has_ifindex().then_some(0x0102_0304);
        if l.is_ipv6() {
            v6_key(ifx)
        } else {
            v4_key(ifx)
        }
    }

    #[test]
    fn sizes_match_npa_structs() {
        assert_eq!(KeyLayout::V4.size(), 20);
        assert_eq!(KeyLayout::V4Ifindex.size(), 24);
        assert_eq!(KeyLayout::V6.size(), 56);
        assert_eq!(KeyLayout::V6Ifindex.size(), 60);
        assert_eq!(ValueLayout::Flag1.size(), 1);
        assert_eq!(ValueLayout::LastSeen16.size(), 16);
    }

    #[test]
    fn key_round_trips_for_all_layouts() {
        for l in KeyLayout::ALL {
            let k = key_for(l);
            let b = k.encode(l).unwrap();
            assert_eq!(b.len(), l.size(), "{l:?}");
            assert_eq!(NpaKey::decode(l, &b).unwrap(), k, "{l:?}");
            // And bytes -> key -> bytes.
            assert_eq!(NpaKey::decode(l, &b).unwrap().encode(l).unwrap(), b);
        }
    }

    #[test]
    fn v4_key_bytes_have_npa_byte_order() {
        let b = v4_key(Some(7)).encode(KeyLayout::V4Ifindex).unwrap();
        // Addresses in network order.
        assert_eq!(&b[0..4], &[10, 1, 2, 3]);
        assert_eq!(&b[8..12], &[192, 168, 7, 9]);
        assert_eq!(&b[16..20], &[10, 1, 2, 3]);
        // Ports and ifindex in host order.
        assert_eq!(&b[4..6], &0x1234u16.to_ne_bytes());
        assert_eq!(&b[12..14], &443u16.to_ne_bytes());
        assert_eq!(&b[20..24], &7u32.to_ne_bytes());
        assert_eq!(b[14], 6);
        assert_eq!([b[6], b[7], b[15]], [0, 0, 0]);
        #[cfg(target_endian = "little")]
        {
            assert_eq!(&b[4..6], &[0x34, 0x12]);
            assert_eq!(&b[12..14], &[0xbb, 0x01]);
        }
    }

    #[test]
    fn v6_key_bytes_have_npa_offsets() {
        let b = v6_key(Some(9)).encode(KeyLayout::V6Ifindex).unwrap();
        let src: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::ff".parse().unwrap();
        assert_eq!(&b[0..16], &src.octets());
        assert_eq!(&b[16..18], &40000u16.to_ne_bytes());
        assert_eq!(&b[18..20], &[0, 0]);
        assert_eq!(&b[20..36], &dst.octets());
        assert_eq!(&b[36..38], &53u16.to_ne_bytes());
        assert_eq!(b[38], 17);
        assert_eq!(b[39], 0);
        assert_eq!(&b[40..56], &dst.octets());
        assert_eq!(&b[56..60], &9u32.to_ne_bytes());
    }

    #[test]
    fn decode_rejects_wrong_lengths_and_padding() {
        let b = v4_key(None).encode(KeyLayout::V4).unwrap();
        assert!(matches!(
            NpaKey::decode(KeyLayout::V4Ifindex, &b),
            Err(CodecError::Length {
                expected: 24,
                actual: 20,
                ..
            })
        ));
        assert!(NpaKey::decode(KeyLayout::V4, &b[..19]).is_err());
        let mut bad = b.clone();
        bad[6] = 1;
        assert_eq!(
            NpaKey::decode(KeyLayout::V4, &bad),
            Err(CodecError::Padding {
                what: "key",
                offset: 6,
                byte: 1
            })
        );
        let mut bad = b;
        bad[15] = 0xff;
        assert!(matches!(
            NpaKey::decode(KeyLayout::V4, &bad),
            Err(CodecError::Padding { offset: 15, .. })
        ));
    }

    #[test]
    fn encode_rejects_keys_that_do_not_fit() {
        assert!(matches!(
            v6_key(None).encode(KeyLayout::V4),
            Err(CodecError::Family { .. })
        ));
        assert!(matches!(
            v4_key(None).encode(KeyLayout::V6Ifindex),
            Err(CodecError::Family { .. })
        ));
        assert_eq!(
            v4_key(Some(3)).encode(KeyLayout::V4),
            Err(CodecError::Ifindex(3, "v4-20"))
        );
        // No ifindex into an ifindex layout: written as 0, read back as Some(0).
        let b = v4_key(None).encode(KeyLayout::V4Ifindex).unwrap();
        assert_eq!(
            NpaKey::decode(KeyLayout::V4Ifindex, &b).unwrap().ifindex,
            Some(0)
        );
    }

    #[test]
    fn value_round_trips_and_byte_order() {
        let v = NpaValue {
            val: 7,
            last_seen_ns: None,
        };
        let b = v.encode(ValueLayout::Flag1).unwrap();
        assert_eq!(b, vec![7]);
        assert_eq!(NpaValue::decode(ValueLayout::Flag1, &b).unwrap(), v);

        let v = NpaValue {
            val: 5,
            last_seen_ns: Some(0x0102_0304_0506_0708),
        };
        let b = v.encode(ValueLayout::LastSeen16).unwrap();
        assert_eq!(b.len(), 16);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_ne_bytes());
        #[cfg(target_endian = "little")]
        assert_eq!(&b[0..8], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(NpaValue::decode(ValueLayout::LastSeen16, &b).unwrap(), v);
    }

    #[test]
    fn value_errors() {
        assert!(matches!(
            NpaValue::decode(ValueLayout::LastSeen16, &[0; 8]),
            Err(CodecError::Length {
                expected: 16,
                actual: 8,
                ..
            })
        ));
        assert!(NpaValue::decode(ValueLayout::Flag1, &[]).is_err());
        let big = NpaValue {
            val: 256,
            last_seen_ns: None,
        };
        assert_eq!(
            big.encode(ValueLayout::Flag1),
            Err(CodecError::ValueTooLarge { val: 256 })
        );
        let stamped = NpaValue {
            val: 1,
            last_seen_ns: Some(1),
        };
        assert_eq!(
            stamped.encode(ValueLayout::Flag1),
            Err(CodecError::NoLastSeen)
        );
    }

    #[test]
    fn detects_every_supported_layout() {
        for k in KeyLayout::ALL {
            for v in ValueLayout::ALL {
                let l = Layout::detect(k.size() as u32, v.size() as u32).unwrap();
                assert_eq!(l, Layout::new(k, v));
            }
        }
    }

    #[test]
    fn unknown_sizes_explain_themselves() {
        let e = Layout::detect(28, 16).unwrap_err();
        assert_eq!(
            e,
            LayoutError::Unsupported {
                key_size: 28,
                value_size: 16
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("key 28 B"), "{msg}");
        assert!(msg.contains("value 16 B"), "{msg}");
        assert!(msg.contains("20") && msg.contains("24") && msg.contains("56"));
        assert!(msg.contains("60"));
        assert!(msg.contains("--layout"), "{msg}");
        assert!(Layout::detect(24, 8).is_err());
    }

    #[test]
    fn parses_layout_overrides() {
        for k in KeyLayout::ALL {
            for v in ValueLayout::ALL {
                let l = Layout::new(k, v);
                assert_eq!(l.to_string().parse::<Layout>().unwrap(), l);
            }
        }
        assert_eq!(
            "V6-IFINDEX/last-seen".parse::<Layout>().unwrap(),
            Layout::new(KeyLayout::V6Ifindex, ValueLayout::LastSeen16)
        );
        assert_eq!(
            "v4/flag".parse::<Layout>().unwrap(),
            Layout::new(KeyLayout::V4, ValueLayout::Flag1)
        );
        for bad in ["v4-24", "v5/16", "v4-24/8", "", "/"] {
            let e = bad.parse::<Layout>().unwrap_err();
            assert!(matches!(e, LayoutError::Parse { .. }), "{bad}");
            assert!(e.to_string().contains("v4-24/16"));
        }
    }

    #[test]
    fn serializes_readably() {
        let j = serde_json::to_value(v4_key(Some(2))).unwrap();
        assert_eq!(j["src"], "10.1.2.3");
        assert_eq!(j["sport"], 0x1234);
        assert_eq!(j["ifindex"], 2);
        let l = serde_json::to_value(Layout::new(KeyLayout::V6Ifindex, ValueLayout::Flag1));
        assert_eq!(l.unwrap(), "v6-60/1");
    }

    #[test]
    fn displays_key() {
        assert_eq!(
            v4_key(Some(4)).to_string(),
            "tcp 10.1.2.3:4660 -> 192.168.7.9:443 owner 10.1.2.3 if 4"
        );
        assert!(v6_key(None).to_string().contains("[fd00::1:2]:40000"));
    }
}
