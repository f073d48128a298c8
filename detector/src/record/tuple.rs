//! Flow tuples: decoded, packed for tables, and printed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use detector_common::{self as common, AF_INET, AF_INET6};
use serde::Serialize;

use super::DecodeError;

/// One direction of a flow, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FlowTuple {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl FlowTuple {
    pub fn from_raw(t: &common::Tuple) -> Result<Self, DecodeError> {
        let addr = |b: &[u8; 16]| -> Result<IpAddr, DecodeError> {
            match t.family {
                AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
                AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*b))),
                value => Err(DecodeError::UnknownValue {
                    what: "address family",
                    value,
                }),
            }
        };
        Ok(Self {
            proto: t.proto,
            src: addr(&t.src_addr)?,
            sport: t.src_port,
            dst: addr(&t.dst_addr)?,
            dport: t.dst_port,
        })
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// A [`FlowTuple`] packed for tables that hold one per flow: an IPv4 tuple in 13 bytes inline
/// (proto, then address and port of each end), an IPv6 (or mixed) one boxed with a family
/// byte per end; 16 bytes either way, against 40 for the tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PackedTuple {
    V4([u8; 13]),
    V6(Box<[u8; 39]>),
}

impl PackedTuple {
    pub fn of(t: &FlowTuple) -> Self {
        match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut b = [0u8; 13];
                b[0] = t.proto;
                b[1..5].copy_from_slice(&s.octets());
                b[5..7].copy_from_slice(&t.sport.to_be_bytes());
                b[7..11].copy_from_slice(&d.octets());
                b[11..13].copy_from_slice(&t.dport.to_be_bytes());
                PackedTuple::V4(b)
            }
            _ => {
                let mut b = [0u8; 39];
                b[0] = t.proto;
                for (at, addr, port) in [(1, t.src, t.sport), (20, t.dst, t.dport)] {
                    let (family, bytes) = match addr {
                        IpAddr::V4(a) => (4, a.to_ipv6_mapped().octets()),
                        IpAddr::V6(a) => (6, a.octets()),
                    };
                    b[at] = family;
                    b[at + 1..at + 17].copy_from_slice(&bytes);
                    b[at + 17..at + 19].copy_from_slice(&port.to_be_bytes());
                }
                PackedTuple::V6(Box::new(b))
            }
        }
    }

    pub fn tuple(&self) -> FlowTuple {
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        match self {
            PackedTuple::V4(b) => FlowTuple {
                proto: b[0],
                src: IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4])),
                sport: port(&b[5..7]),
                dst: IpAddr::V4(Ipv4Addr::new(b[7], b[8], b[9], b[10])),
                dport: port(&b[11..13]),
            },
            PackedTuple::V6(b) => {
                let addr = |at: usize| -> IpAddr {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&b[at + 1..at + 17]);
                    let a = Ipv6Addr::from(o);
                    match (b[at], a.to_ipv4_mapped()) {
                        (4, Some(v4)) => IpAddr::V4(v4),
                        _ => IpAddr::V6(a),
                    }
                };
                FlowTuple {
                    proto: b[0],
                    src: addr(1),
                    sport: port(&b[18..20]),
                    dst: addr(20),
                    dport: port(&b[37..39]),
                }
            }
        }
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => format!("proto{other}"),
    }
}

impl std::fmt::Display for FlowTuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ep = |ip: &IpAddr, port: u16| match ip {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "{} -> {}",
            ep(&self.src, self.sport),
            ep(&self.dst, self.dport)
        )
    }
}
