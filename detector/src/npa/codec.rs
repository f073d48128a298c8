//! Decoding and encoding the keys and values of NPA's conntrack map for a given
//! [`Layout`](super::Layout): lengths and zero padding checked, addresses in network order,
//! the rest in native order (see the layout module's notes on the NPA source).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use detector_common::npa_key::NpaKeyFields;
use serde::Serialize;
use thiserror::Error;

use super::layout::{KeyLayout, ValueLayout};

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
        let octets = |ip: IpAddr| -> Result<Vec<u8>, CodecError> {
            match (ip, layout.is_ipv6()) {
                (IpAddr::V4(a), false) => Ok(a.octets().to_vec()),
                (IpAddr::V6(a), true) => Ok(a.octets().to_vec()),
                (ip, v6) => Err(CodecError::Family {
                    layout: layout.name(),
                    family: if ip.is_ipv6() { "IPv6" } else { "IPv4" },
                    expected: if v6 { "IPv6" } else { "IPv4" },
                }),
            }
        };
        if let (Some(i), false) = (self.ifindex, layout.has_ifindex()) {
            return Err(CodecError::Ifindex(i, layout.name()));
        }
        let (src, dst, owner) = (octets(self.src)?, octets(self.dst)?, octets(self.owner)?);
        let mut b = vec![0u8; layout.size()];
        NpaKeyFields {
            src: &src,
            sport: self.sport,
            dst: &dst,
            dport: self.dport,
            proto: self.proto,
            owner: &owner,
            ifindex: self.ifindex,
        }
        .write(&mut b)
        // Not reached: the family and ifindex checks above make the fields fit the layout.
        .map_err(|_| CodecError::Length {
            what: "key",
            layout: layout.name(),
            expected: layout.size(),
            actual: b.len(),
        })?;
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
