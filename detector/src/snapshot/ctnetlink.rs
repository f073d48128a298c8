//! The ctnetlink wire format: the dump request, and a pure decoder of the kernel's answer.
//!
//! Constants are copied from the kernel's uapi headers (numbers in comments are the values):
//! `include/uapi/linux/netlink.h`, `include/uapi/linux/netfilter/nfnetlink.h` and
//! `include/uapi/linux/netfilter/nfnetlink_conntrack.h`.
//!
//! Byte order: the netlink headers (`nlmsghdr`, `nlattr`, `nlmsgerr.error`, the `NLMSG_DONE`
//! payload) are in host order; the netfilter attribute payloads are big-endian.
//!
//! The decoder never trusts a length: every header, message and attribute is checked against
//! the bytes that are really there, an `nla_len` below 4 is an error, and every step moves
//! forward by at least 4 bytes, so any input ends in `Ok` or `Err` without a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use super::CtSnapshotEntry;
use crate::record::FlowTuple;

// --- include/uapi/linux/netlink.h -----------------------------------------------------------

/// `NETLINK_NETFILTER`, the protocol of the socket.
pub const NETLINK_NETFILTER: i32 = 12;
/// `sizeof(struct nlmsghdr)`, already a multiple of `NLMSG_ALIGNTO`.
pub const NLMSG_HDRLEN: usize = 16;
/// `NLMSG_ALIGNTO`.
pub const NLMSG_ALIGNTO: usize = 4;
pub const NLM_F_REQUEST: u16 = 0x01;
/// Set on every message of a dump; only the tests' encoder writes it.
#[cfg(test)]
pub const NLM_F_MULTI: u16 = 0x02;
/// Set by the kernel when the dump was inconsistent (its data changed while dumping).
pub const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_ROOT | NLM_F_MATCH` (0x100 | 0x200).
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_NOOP: u16 = 0x1;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLMSG_OVERRUN: u16 = 0x4;
/// `sizeof(struct nlattr)` (`NLA_HDRLEN`).
pub const NLA_HDRLEN: usize = 4;
/// `NLA_F_NESTED` (1 << 15).
pub const NLA_F_NESTED: u16 = 1 << 15;
/// `NLA_F_NET_BYTEORDER` (1 << 14).
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// `NLA_TYPE_MASK`.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// --- include/uapi/linux/netfilter/nfnetlink.h -----------------------------------------------

/// `sizeof(struct nfgenmsg)`: family u8, version u8, res_id be16.
pub const NFGENMSG_LEN: usize = 4;
pub const NFNETLINK_V0: u8 = 0;
pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;

// --- include/uapi/linux/netfilter/nfnetlink_conntrack.h -------------------------------------

/// `enum cntl_msg_types`: IPCTNL_MSG_CT_NEW = 0, IPCTNL_MSG_CT_GET = 1.
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
pub const IPCTNL_MSG_CT_GET: u8 = 1;

/// `enum ctattr_type`.
pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_STATUS: u16 = 3;
pub const CTA_TIMEOUT: u16 = 7;
pub const CTA_MARK: u16 = 8;
pub const CTA_ID: u16 = 12;
pub const CTA_ZONE: u16 = 18;

/// `enum ctattr_tuple`.
pub const CTA_TUPLE_IP: u16 = 1;
pub const CTA_TUPLE_PROTO: u16 = 2;

/// `enum ctattr_ip`.
pub const CTA_IP_V4_SRC: u16 = 1;
pub const CTA_IP_V4_DST: u16 = 2;
pub const CTA_IP_V6_SRC: u16 = 3;
pub const CTA_IP_V6_DST: u16 = 4;

/// `enum ctattr_l4proto`.
pub const CTA_PROTO_NUM: u16 = 1;
pub const CTA_PROTO_SRC_PORT: u16 = 2;
pub const CTA_PROTO_DST_PORT: u16 = 3;

/// `nlmsg_type` of a ctnetlink message: subsystem in the high byte, operation in the low byte.
pub const fn ctnetlink_type(msg: u8) -> u16 {
    ((NFNL_SUBSYS_CTNETLINK as u16) << 8) | msg as u16
}

/// Rounds up to the 4-byte netlink alignment (`NLMSG_ALIGN`; `NLA_ALIGN` is the same, as
/// `NLA_ALIGNTO` is 4 too).
pub const fn align4(len: usize) -> usize {
    (len + NLMSG_ALIGNTO - 1) & !(NLMSG_ALIGNTO - 1)
}

/// The dump request: `IPCTNL_MSG_CT_GET` with `NLM_F_REQUEST | NLM_F_DUMP` and an `nfgenmsg` of
/// family `AF_UNSPEC`, which asks for the IPv4 and the IPv6 entries of every zone.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&ctnetlink_type(IPCTNL_MSG_CT_GET).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: 0, the kernel fills in ours
    m.push(libc::AF_UNSPEC as u8); // nfgen_family
    m.push(NFNETLINK_V0); // version
    m.extend_from_slice(&0u16.to_be_bytes()); // res_id
    m
}

/// What one buffer of netlink messages held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The conntrack entries, in the order of the messages.
    pub entries: Vec<CtSnapshotEntry>,
    /// An `NLMSG_DONE` was seen: the dump is complete. Bytes after it are not read.
    pub done: bool,
    /// A message carried `NLM_F_DUMP_INTR`: the kernel says the dump may be inconsistent.
    pub interrupted: bool,
    /// Messages that were neither conntrack entries nor control messages (skipped), plus
    /// `NLMSG_NOOP` and `NLMSG_ERROR` acknowledgements (error 0).
    pub skipped: usize,
}

/// Why a buffer could not be decoded. Offsets are byte offsets into the decoded buffer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error(
        "netlink message header at offset {offset} is truncated: {available} bytes left, a header needs {NLMSG_HDRLEN}"
    )]
    TruncatedHeader { offset: usize, available: usize },
    #[error(
        "netlink message at offset {offset} has nlmsg_len {len}, less than its {NLMSG_HDRLEN}-byte header"
    )]
    MessageTooShort { offset: usize, len: u32 },
    #[error("netlink message at offset {offset} claims {len} bytes but only {available} are left")]
    TruncatedMessage {
        offset: usize,
        len: u32,
        available: usize,
    },
    #[error(
        "{what} of the netlink message at offset {offset} is truncated: {available} bytes, needs {needed}"
    )]
    TruncatedPayload {
        what: &'static str,
        offset: usize,
        available: usize,
        needed: usize,
    },
    #[error("NLMSG_ERROR at offset {offset}: the kernel answered {}", errno_text(*.errno))]
    Kernel { offset: usize, errno: i32 },
    #[error("NLMSG_DONE at offset {offset}: the dump failed with {}", errno_text(*.errno))]
    DumpFailed { offset: usize, errno: i32 },
    #[error("NLMSG_OVERRUN at offset {offset}: the kernel lost data")]
    Overrun { offset: usize },
    #[error(
        "attribute header at offset {offset} is truncated: {available} bytes left, a header needs {NLA_HDRLEN}"
    )]
    TruncatedAttrHeader { offset: usize, available: usize },
    #[error(
        "attribute at offset {offset} has nla_len {len}, less than its {NLA_HDRLEN}-byte header"
    )]
    AttrTooShort { offset: usize, len: u16 },
    #[error("attribute at offset {offset} claims {len} bytes but only {available} are left")]
    TruncatedAttr {
        offset: usize,
        len: u16,
        available: usize,
    },
    #[error("attribute {attr} at offset {offset} has a {len}-byte payload, expected {expected}")]
    AttrSize {
        attr: &'static str,
        offset: usize,
        len: usize,
        expected: usize,
    },
    #[error("{parent} at offset {offset} lacks {attr}")]
    MissingAttr {
        parent: &'static str,
        attr: &'static str,
        offset: usize,
    },
    #[error("CTA_TUPLE_IP at offset {offset} mixes an IPv4 and an IPv6 address")]
    MixedFamilies { offset: usize },
}

/// `-error` of the kernel, with its text: "errno 1 (Operation not permitted)".
fn errno_text(errno: i32) -> String {
    format!(
        "errno {errno} ({})",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// Decodes a buffer of netlink messages (one or more datagrams of a ctnetlink dump).
///
/// Conntrack messages (`IPCTNL_MSG_CT_NEW` or `IPCTNL_MSG_CT_GET`, the type of the request
/// echoed in a dump) become entries; `NLMSG_DONE` ends the decoding with `done` set;
/// `NLMSG_ERROR` with a non-zero error, a `NLMSG_DONE` carrying a negative status and
/// `NLMSG_OVERRUN` are errors; other messages are skipped. Unknown attributes are skipped.
pub fn decode_messages(buf: &[u8]) -> Result<Decoded, DecodeError> {
    let mut out = Decoded::default();
    let mut offset = 0usize;
    while offset < buf.len() {
        let rest = &buf[offset..];
        if rest.len() < NLMSG_HDRLEN {
            return Err(DecodeError::TruncatedHeader {
                offset,
                available: rest.len(),
            });
        }
        let len = u32_ne(&rest[0..4]);
        let ty = u16_ne(&rest[4..6]);
        let flags = u16_ne(&rest[6..8]);
        if (len as usize) < NLMSG_HDRLEN {
            return Err(DecodeError::MessageTooShort { offset, len });
        }
        if len as usize > rest.len() {
            return Err(DecodeError::TruncatedMessage {
                offset,
                len,
                available: rest.len(),
            });
        }
        let payload = &rest[NLMSG_HDRLEN..len as usize];
        if flags & NLM_F_DUMP_INTR != 0 {
            out.interrupted = true;
        }
        match ty {
            NLMSG_NOOP => out.skipped += 1,
            NLMSG_ERROR => {
                // struct nlmsgerr { int error; struct nlmsghdr msg; ... }
                let error = read_i32_payload(payload, offset, "nlmsgerr")?;
                if error != 0 {
                    return Err(DecodeError::Kernel {
                        offset,
                        errno: error.saturating_neg(),
                    });
                }
                out.skipped += 1; // an acknowledgement
            }
            NLMSG_DONE => {
                // The kernel puts the dump's final status (an int) in NLMSG_DONE; older
                // kernels and other families may send no payload at all.
                if payload.len() >= 4 {
                    let status =
                        i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if status < 0 {
                        return Err(DecodeError::DumpFailed {
                            offset,
                            errno: status.saturating_neg(),
                        });
                    }
                }
                out.done = true;
                return Ok(out);
            }
            NLMSG_OVERRUN => return Err(DecodeError::Overrun { offset }),
            t if t == ctnetlink_type(IPCTNL_MSG_CT_NEW)
                || t == ctnetlink_type(IPCTNL_MSG_CT_GET) =>
            {
                if payload.len() < NFGENMSG_LEN {
                    return Err(DecodeError::TruncatedPayload {
                        what: "nfgenmsg",
                        offset,
                        available: payload.len(),
                        needed: NFGENMSG_LEN,
                    });
                }
                let attrs_at = offset + NLMSG_HDRLEN + NFGENMSG_LEN;
                let entry = decode_entry(&payload[NFGENMSG_LEN..], attrs_at, offset)?;
                out.entries.push(entry);
            }
            _ => out.skipped += 1,
        }
        // The last message of a buffer may lack its padding; never step past the end.
        offset = offset.saturating_add(align4(len as usize)).min(buf.len());
    }
    Ok(out)
}

fn read_i32_payload(payload: &[u8], offset: usize, what: &'static str) -> Result<i32, DecodeError> {
    match payload.get(0..4) {
        Some(b) => Ok(i32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(DecodeError::TruncatedPayload {
            what,
            offset,
            available: payload.len(),
            needed: 4,
        }),
    }
}

fn u16_ne(b: &[u8]) -> u16 {
    u16::from_ne_bytes([b[0], b[1]])
}

fn u32_ne(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// One attribute: its type with the flag bits masked off, its payload, and the absolute offset
/// of its header.
struct Attr<'a> {
    ty: u16,
    payload: &'a [u8],
    offset: usize,
}

impl<'a> Attr<'a> {
    fn exact<const N: usize>(&self, name: &'static str) -> Result<[u8; N], DecodeError> {
        <[u8; N]>::try_from(self.payload).map_err(|_| DecodeError::AttrSize {
            attr: name,
            offset: self.offset,
            len: self.payload.len(),
            expected: N,
        })
    }

    fn be_u32(&self, name: &'static str) -> Result<u32, DecodeError> {
        self.exact::<4>(name).map(u32::from_be_bytes)
    }

    fn be_u16(&self, name: &'static str) -> Result<u16, DecodeError> {
        self.exact::<2>(name).map(u16::from_be_bytes)
    }
}

/// Walks a run of attributes; `base` is the absolute offset of `buf[0]`.
struct Attrs<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

fn attrs(buf: &[u8], base: usize) -> Attrs<'_> {
    Attrs { buf, pos: 0, base }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let offset = self.base + self.pos;
        let rest = &self.buf[self.pos..];
        // Whatever happens below, this run ends on an error: stop after reporting it.
        let fail = |me: &mut Self, e| {
            me.pos = me.buf.len();
            Some(Err(e))
        };
        if rest.len() < NLA_HDRLEN {
            return fail(
                self,
                DecodeError::TruncatedAttrHeader {
                    offset,
                    available: rest.len(),
                },
            );
        }
        let len = u16_ne(&rest[0..2]);
        let ty = u16_ne(&rest[2..4]) & NLA_TYPE_MASK;
        if (len as usize) < NLA_HDRLEN {
            return fail(self, DecodeError::AttrTooShort { offset, len });
        }
        if len as usize > rest.len() {
            return fail(
                self,
                DecodeError::TruncatedAttr {
                    offset,
                    len,
                    available: rest.len(),
                },
            );
        }
        let payload = &rest[NLA_HDRLEN..len as usize];
        // The last attribute may lack its padding; never step past the end.
        self.pos = (self.pos + align4(len as usize)).min(self.buf.len());
        Some(Ok(Attr {
            ty,
            payload,
            offset,
        }))
    }
}

/// Decodes the attributes of one conntrack message. `msg_offset` is the message's offset.
fn decode_entry(
    buf: &[u8],
    base: usize,
    msg_offset: usize,
) -> Result<CtSnapshotEntry, DecodeError> {
    let (mut orig, mut reply) = (None, None);
    let (mut id, mut status, mut timeout_s, mut zone, mut mark) = (0, 0, 0, 0, 0);
    for a in attrs(buf, base) {
        let a = a?;
        match a.ty {
            CTA_TUPLE_ORIG => orig = Some(decode_tuple(&a, "CTA_TUPLE_ORIG")?),
            CTA_TUPLE_REPLY => reply = Some(decode_tuple(&a, "CTA_TUPLE_REPLY")?),
            CTA_STATUS => status = a.be_u32("CTA_STATUS")?,
            CTA_TIMEOUT => timeout_s = a.be_u32("CTA_TIMEOUT")?,
            CTA_MARK => mark = a.be_u32("CTA_MARK")?,
            CTA_ID => id = a.be_u32("CTA_ID")?,
            CTA_ZONE => zone = a.be_u16("CTA_ZONE")?,
            _ => {} // counters, protoinfo, helpers, timestamps, labels, ...: not needed
        }
    }
    let missing = |attr| DecodeError::MissingAttr {
        parent: "conntrack message",
        attr,
        offset: msg_offset,
    };
    Ok(CtSnapshotEntry {
        orig: orig.ok_or_else(|| missing("CTA_TUPLE_ORIG"))?,
        reply: reply.ok_or_else(|| missing("CTA_TUPLE_REPLY"))?,
        id,
        status,
        timeout_s,
        zone,
        mark,
    })
}

/// `CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`: `CTA_TUPLE_IP` and `CTA_TUPLE_PROTO`, both required.
fn decode_tuple(outer: &Attr<'_>, name: &'static str) -> Result<FlowTuple, DecodeError> {
    let base = outer.offset + NLA_HDRLEN;
    let mut ip: Option<(IpAddr, IpAddr)> = None;
    let mut proto: Option<(u8, u16, u16)> = None;
    for a in attrs(outer.payload, base) {
        let a = a?;
        match a.ty {
            CTA_TUPLE_IP => ip = Some(decode_ip(&a)?),
            CTA_TUPLE_PROTO => proto = Some(decode_proto(&a)?),
            _ => {} // e.g. CTA_TUPLE_ZONE of newer kernels
        }
    }
    let missing = |attr| DecodeError::MissingAttr {
        parent: name,
        attr,
        offset: outer.offset,
    };
    let (src, dst) = ip.ok_or_else(|| missing("CTA_TUPLE_IP"))?;
    let (proto, sport, dport) = proto.ok_or_else(|| missing("CTA_TUPLE_PROTO"))?;
    Ok(FlowTuple {
        proto,
        src,
        sport,
        dst,
        dport,
    })
}

fn decode_ip(outer: &Attr<'_>) -> Result<(IpAddr, IpAddr), DecodeError> {
    let mut src = None;
    let mut dst = None;
    for a in attrs(outer.payload, outer.offset + NLA_HDRLEN) {
        let a = a?;
        match a.ty {
            CTA_IP_V4_SRC => src = Some(IpAddr::V4(Ipv4Addr::from(a.exact::<4>("CTA_IP_V4_SRC")?))),
            CTA_IP_V4_DST => dst = Some(IpAddr::V4(Ipv4Addr::from(a.exact::<4>("CTA_IP_V4_DST")?))),
            CTA_IP_V6_SRC => {
                src = Some(IpAddr::V6(Ipv6Addr::from(a.exact::<16>("CTA_IP_V6_SRC")?)))
            }
            CTA_IP_V6_DST => {
                dst = Some(IpAddr::V6(Ipv6Addr::from(a.exact::<16>("CTA_IP_V6_DST")?)))
            }
            _ => {}
        }
    }
    let missing = |attr| DecodeError::MissingAttr {
        parent: "CTA_TUPLE_IP",
        attr,
        offset: outer.offset,
    };
    let src = src.ok_or_else(|| missing("a source address (CTA_IP_V4_SRC or CTA_IP_V6_SRC)"))?;
    let dst =
        dst.ok_or_else(|| missing("a destination address (CTA_IP_V4_DST or CTA_IP_V6_DST)"))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(DecodeError::MixedFamilies {
            offset: outer.offset,
        });
    }
    Ok((src, dst))
}

/// `CTA_TUPLE_PROTO`: the protocol number is required; ports are absent for ICMP (0).
fn decode_proto(outer: &Attr<'_>) -> Result<(u8, u16, u16), DecodeError> {
    let mut num = None;
    let mut sport = 0;
    let mut dport = 0;
    for a in attrs(outer.payload, outer.offset + NLA_HDRLEN) {
        let a = a?;
        match a.ty {
            CTA_PROTO_NUM => num = Some(a.exact::<1>("CTA_PROTO_NUM")?[0]),
            CTA_PROTO_SRC_PORT => sport = a.be_u16("CTA_PROTO_SRC_PORT")?,
            CTA_PROTO_DST_PORT => dport = a.be_u16("CTA_PROTO_DST_PORT")?,
            _ => {} // CTA_PROTO_ICMP_ID/TYPE/CODE and the ICMPv6 ones
        }
    }
    let num = num.ok_or(DecodeError::MissingAttr {
        parent: "CTA_TUPLE_PROTO",
        attr: "CTA_PROTO_NUM",
        offset: outer.offset,
    })?;
    Ok((num, sport, dport))
}
