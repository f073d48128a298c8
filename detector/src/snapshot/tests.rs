//! Decoder tests: an encoder of kernel-shaped dumps (tests only), round trips, control
//! messages, malformed input with exact offsets, and a deterministic mutation fuzzer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::collections::HashSet;
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use super::ctnetlink::*;
use super::{CtSnapshotEntry, SnapshotError};
use crate::record::FlowTuple;

// --- encoder (tests only) -------------------------------------------------------------------

/// Unknown attribute types, used to check that the decoder skips them.
const CTA_PROTOINFO: u16 = 4;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_USE: u16 = 11;
const CTA_TUPLE_ZONE: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

#[derive(Clone, Copy, Default)]
struct Opts {
    /// Add attributes the decoder does not know, at every level.
    unknown: bool,
    /// Set NLA_F_NET_BYTEORDER on scalar attributes (the kernel does not, but may).
    byteorder_flag: bool,
    /// Message flags besides NLM_F_MULTI.
    extra_flags: u16,
    /// Message type: IPCTNL_MSG_CT_GET (a dump answer) unless set.
    msg: Option<u8>,
}

fn put_attr(b: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    b.extend_from_slice(&((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(align4(b.len()), 0);
}

fn put_nest(b: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = b.len();
    b.extend_from_slice(&[0; NLA_HDRLEN]);
    f(b);
    let len = (b.len() - start) as u16;
    b[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    b[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
}

fn scalar(ty: u16, o: Opts) -> u16 {
    if o.byteorder_flag {
        ty | NLA_F_NET_BYTEORDER
    } else {
        ty
    }
}

fn put_tuple(b: &mut Vec<u8>, ty: u16, t: &FlowTuple, o: Opts) {
    put_nest(b, ty, |b| {
        put_nest(b, CTA_TUPLE_IP, |b| {
            match (t.src, t.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    put_attr(b, CTA_IP_V4_SRC, &s.octets());
                    put_attr(b, CTA_IP_V4_DST, &d.octets());
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    put_attr(b, CTA_IP_V6_SRC, &s.octets());
                    put_attr(b, CTA_IP_V6_DST, &d.octets());
                }
                _ => panic!("the encoder takes one family per tuple"),
            }
            if o.unknown {
                put_attr(b, 5, &[1, 2, 3]); // past CTA_IP_V6_DST
            }
        });
        put_nest(b, CTA_TUPLE_PROTO, |b| {
            put_attr(b, CTA_PROTO_NUM, &[t.proto]);
            match t.proto {
                // The kernel sends no ports for ICMP, but id, type and code.
                1 => {
                    put_attr(b, CTA_PROTO_ICMP_ID, &0x1234u16.to_be_bytes());
                    put_attr(b, CTA_PROTO_ICMP_TYPE, &[8]);
                    put_attr(b, CTA_PROTO_ICMP_CODE, &[0]);
                }
                58 => {
                    put_attr(b, CTA_PROTO_ICMPV6_ID, &0x1234u16.to_be_bytes());
                    put_attr(b, CTA_PROTO_ICMPV6_TYPE, &[128]);
                    put_attr(b, CTA_PROTO_ICMPV6_CODE, &[0]);
                }
                _ => {
                    put_attr(b, scalar(CTA_PROTO_SRC_PORT, o), &t.sport.to_be_bytes());
                    put_attr(b, scalar(CTA_PROTO_DST_PORT, o), &t.dport.to_be_bytes());
                }
            }
        });
        if o.unknown {
            put_attr(b, CTA_TUPLE_ZONE, &7u16.to_be_bytes());
        }
    });
}

fn put_msg(b: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, payload: &[u8]) {
    b.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&4242u32.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(align4(b.len()), 0);
}

/// One conntrack message as the kernel builds it in a dump (attribute order of
/// `ctnetlink_fill_info`; CTA_ZONE and CTA_MARK only when not 0).
fn put_entry(b: &mut Vec<u8>, e: &CtSnapshotEntry, o: Opts) {
    let family = if e.orig.src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    } as u8;
    let mut p = vec![family, NFNETLINK_V0, 0, 0];
    put_tuple(&mut p, CTA_TUPLE_ORIG, &e.orig, o);
    put_tuple(&mut p, CTA_TUPLE_REPLY, &e.reply, o);
    if e.zone != 0 {
        put_attr(&mut p, scalar(CTA_ZONE, o), &e.zone.to_be_bytes());
    }
    put_attr(&mut p, scalar(CTA_STATUS, o), &e.status.to_be_bytes());
    if o.unknown {
        put_nest(&mut p, CTA_COUNTERS_ORIG, |b| {
            put_attr(b, 1, &5u64.to_be_bytes());
        });
        put_nest(&mut p, CTA_PROTOINFO, |b| {
            put_nest(b, 1, |b| put_attr(b, 1, &[3]));
        });
        put_attr(&mut p, 0x3ff, b"future attribute");
    }
    put_attr(&mut p, scalar(CTA_TIMEOUT, o), &e.timeout_s.to_be_bytes());
    if e.mark != 0 {
        put_attr(&mut p, scalar(CTA_MARK, o), &e.mark.to_be_bytes());
    }
    put_attr(&mut p, scalar(CTA_USE, o), &1u32.to_be_bytes());
    put_attr(&mut p, scalar(CTA_ID, o), &e.id.to_be_bytes());
    let ty = ctnetlink_type(o.msg.unwrap_or(IPCTNL_MSG_CT_GET));
    put_msg(b, ty, NLM_F_MULTI | o.extra_flags, 1, &p);
}

fn put_done(b: &mut Vec<u8>, status: i32) {
    put_msg(b, NLMSG_DONE, NLM_F_MULTI, 1, &status.to_ne_bytes());
}

/// `struct nlmsgerr`: the error, then the header of the request it answers.
fn put_error(b: &mut Vec<u8>, error: i32) {
    let mut p = error.to_ne_bytes().to_vec();
    p.extend_from_slice(&dump_request(1)[..NLMSG_HDRLEN]);
    put_msg(b, NLMSG_ERROR, 0, 1, &p);
}

/// A whole dump: the entries, then NLMSG_DONE.
fn dump_of(entries: &[CtSnapshotEntry], o: Opts) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        put_entry(&mut b, e, o);
    }
    put_done(&mut b, 0);
    b
}

use crate::testutil::tuple;

fn entry(orig: FlowTuple, id: u32) -> CtSnapshotEntry {
    CtSnapshotEntry {
        orig,
        reply: orig.reversed(),
        id,
        status: 0x18e, // SEEN_REPLY | ASSURED | CONFIRMED | SRC_NAT_DONE | DST_NAT_DONE
        timeout_s: 431_999,
        zone: 0,
        mark: 0,
    }
}

fn tcp4() -> CtSnapshotEntry {
    entry(tuple(6, "10.78.0.1", 40000, "10.78.0.2", 8080), 0xdead_beef)
}

fn decode_ok(buf: &[u8]) -> Decoded {
    decode_messages(buf).unwrap_or_else(|e| panic!("decode failed: {e}"))
}

// --- round trips ----------------------------------------------------------------------------

#[test]
fn snapshot_request_is_a_ct_get_dump_of_all_families() {
    let r = dump_request(7);
    assert_eq!(r.len(), 20);
    assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 20);
    assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 0x0101);
    assert_eq!(u16::from_ne_bytes(r[6..8].try_into().unwrap()), 0x0301);
    assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
    assert_eq!(&r[12..16], &[0; 4]);
    assert_eq!(&r[16..20], &[0, 0, 0, 0]); // AF_UNSPEC, NFNETLINK_V0, res_id 0
}

#[test]
fn snapshot_round_trip_ipv4() {
    let mut a = tcp4();
    a.mark = 0x42;
    let mut b = entry(tuple(17, "192.0.2.7", 53, "198.51.100.1", 5353), 2);
    b.status = 0x8;
    b.timeout_s = 30;
    // NAT: the reply differs from the reversed original.
    b.reply = tuple(17, "198.51.100.1", 5353, "203.0.113.9", 61000);
    let d = decode_ok(&dump_of(&[a.clone(), b.clone()], Opts::default()));
    assert_eq!(d.entries, vec![a, b]);
    assert!(d.done);
    assert!(!d.interrupted);
    assert_eq!(d.skipped, 0);
}

#[test]
fn snapshot_round_trip_ipv6() {
    let mut e = entry(
        tuple(6, "2001:db8::1", 443, "2001:db8:ffff::abcd", 33000),
        u32::MAX,
    );
    e.zone = 5;
    e.mark = u32::MAX;
    let d = decode_ok(&dump_of(std::slice::from_ref(&e), Opts::default()));
    assert_eq!(d.entries, vec![e]);
    assert!(d.done);
}

#[test]
fn snapshot_round_trip_icmp_has_no_ports() {
    let v4 = entry(tuple(1, "10.0.0.1", 0, "10.0.0.2", 0), 11);
    let v6 = entry(tuple(58, "fe80::1", 0, "fe80::2", 0), 12);
    let buf = dump_of(&[v4.clone(), v6.clone()], Opts::default());
    let d = decode_ok(&buf);
    assert_eq!(d.entries, vec![v4, v6]);
    for e in &d.entries {
        assert_eq!(
            (e.orig.sport, e.orig.dport, e.reply.sport, e.reply.dport),
            (0, 0, 0, 0)
        );
    }
}

#[test]
fn snapshot_unknown_attributes_and_flag_bits_are_skipped() {
    let mut e = tcp4();
    e.zone = 3;
    e.mark = 9;
    let o = Opts {
        unknown: true,
        byteorder_flag: true,
        ..Opts::default()
    };
    let d = decode_ok(&dump_of(std::slice::from_ref(&e), o));
    assert_eq!(d.entries, vec![e]);
}

#[test]
fn snapshot_ct_new_messages_are_entries_too() {
    let mut buf = Vec::new();
    let o = Opts {
        msg: Some(IPCTNL_MSG_CT_NEW),
        ..Opts::default()
    };
    put_entry(&mut buf, &tcp4(), o);
    assert_eq!(decode_ok(&buf).entries, vec![tcp4()]);
}

#[test]
fn snapshot_multipart_dump_across_datagrams() {
    let all: Vec<_> = (0..5)
        .map(|i| entry(tuple(6, "10.1.0.1", 1000 + i, "10.1.0.2", 80), i.into()))
        .collect();
    let mut first = Vec::new();
    for e in &all[..3] {
        put_entry(&mut first, e, Opts::default());
    }
    let mut second = Vec::new();
    put_msg(&mut second, NLMSG_NOOP, 0, 1, &[]);
    put_msg(&mut second, 0x0201, NLM_F_MULTI, 1, &[2, 0, 0, 0]); // an expectation: skipped
    for e in &all[3..] {
        put_entry(&mut second, e, Opts::default());
    }
    put_done(&mut second, 0);

    let a = decode_ok(&first);
    assert!(!a.done, "no NLMSG_DONE in the first datagram");
    let b = decode_ok(&second);
    assert!(b.done);
    assert_eq!(b.skipped, 2);
    let got: Vec<_> = a.entries.into_iter().chain(b.entries).collect();
    assert_eq!(got, all);
}

#[test]
fn snapshot_done_ends_decoding() {
    // Nothing after NLMSG_DONE is read, not even garbage.
    let mut buf = Vec::new();
    put_entry(&mut buf, &tcp4(), Opts::default());
    put_done(&mut buf, 0);
    put_entry(&mut buf, &tcp4(), Opts::default());
    buf.extend_from_slice(&[0xff; 7]);
    let d = decode_ok(&buf);
    assert!(d.done);
    assert_eq!(d.entries.len(), 1);

    // A DONE without payload (older kernels, other families) is a DONE too.
    let mut bare = Vec::new();
    put_msg(&mut bare, NLMSG_DONE, NLM_F_MULTI, 1, &[]);
    assert!(decode_ok(&bare).done);

    // An empty buffer holds nothing and does not end the dump.
    assert_eq!(decode_ok(&[]), Decoded::default());
}

#[test]
fn snapshot_done_with_negative_status_is_a_failed_dump() {
    let mut buf = Vec::new();
    put_entry(&mut buf, &tcp4(), Opts::default());
    let at = buf.len();
    put_done(&mut buf, -libc::ENOMEM);
    let err = decode_messages(&buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::DumpFailed {
            offset: at,
            errno: libc::ENOMEM
        }
    );
    assert!(err.to_string().contains(&format!("offset {at}")), "{err}");
}

#[test]
fn snapshot_nlmsg_error_carries_errno() {
    let mut buf = Vec::new();
    put_error(&mut buf, -libc::EPERM);
    let err = decode_messages(&buf).unwrap_err();
    assert_eq!(
        err,
        DecodeError::Kernel {
            offset: 0,
            errno: libc::EPERM
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("errno 1") && text.contains("offset 0"),
        "{text}"
    );

    let user = SnapshotError::from(err);
    assert!(matches!(user, SnapshotError::PermissionDenied));
    assert!(user.to_string().contains("CAP_NET_ADMIN"), "{user}");

    for errno in [libc::ENOENT, libc::EOPNOTSUPP] {
        let mut buf = Vec::new();
        put_error(&mut buf, -errno);
        let user = SnapshotError::from(decode_messages(&buf).unwrap_err());
        assert!(
            user.to_string().contains("modprobe nf_conntrack_netlink"),
            "{user}"
        );
    }

    // An error after entries still fails the whole buffer, at its own offset.
    let mut buf = Vec::new();
    put_entry(&mut buf, &tcp4(), Opts::default());
    let at = buf.len();
    put_error(&mut buf, -libc::EBUSY);
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::Kernel {
            offset: at,
            errno: libc::EBUSY
        }
    );
}

#[test]
fn snapshot_nlmsg_error_zero_is_an_ack() {
    let mut buf = Vec::new();
    put_error(&mut buf, 0);
    put_entry(&mut buf, &tcp4(), Opts::default());
    put_done(&mut buf, 0);
    let d = decode_ok(&buf);
    assert_eq!(d.skipped, 1);
    assert_eq!(d.entries, vec![tcp4()]);
}

#[test]
fn snapshot_dump_intr_is_reported() {
    let mut buf = Vec::new();
    let o = Opts {
        extra_flags: NLM_F_DUMP_INTR,
        ..Opts::default()
    };
    put_entry(&mut buf, &tcp4(), o);
    assert!(decode_ok(&buf).interrupted);
}

#[test]
fn snapshot_overrun_is_an_error() {
    let mut buf = Vec::new();
    put_msg(&mut buf, NLMSG_OVERRUN, 0, 1, &[]);
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::Overrun { offset: 0 }
    );
    assert!(matches!(
        SnapshotError::from(DecodeError::Overrun { offset: 0 }),
        SnapshotError::Overrun
    ));
}

#[test]
fn snapshot_entry_serializes() {
    let v = serde_json::to_value(tcp4()).unwrap();
    assert_eq!(v["orig"]["src"], "10.78.0.1");
    assert_eq!(v["orig"]["dport"], 8080);
    assert_eq!(v["reply"]["src"], "10.78.0.2");
    assert_eq!(v["id"], 0xdead_beef_u32);
    assert_eq!(v["timeout_s"], 431_999);
}

// --- malformed input: what and where --------------------------------------------------------

fn one_entry() -> Vec<u8> {
    let mut b = Vec::new();
    put_entry(&mut b, &tcp4(), Opts::default());
    b
}

/// Offset of the first attribute of type `ty` (flags masked) in the attribute run at `at`.
fn find_attr(buf: &[u8], mut at: usize, end: usize, ty: u16) -> usize {
    while at + 4 <= end {
        let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
        if u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & NLA_TYPE_MASK == ty {
            return at;
        }
        at += align4(len);
    }
    panic!("attribute {ty} not found");
}

fn set_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

#[test]
fn snapshot_rejects_truncated_header() {
    let buf = one_entry();
    assert_eq!(
        decode_messages(&buf[..10]).unwrap_err(),
        DecodeError::TruncatedHeader {
            offset: 0,
            available: 10
        }
    );
    let mut two = one_entry();
    let at = two.len();
    two.extend_from_slice(&[1, 2, 3]);
    assert_eq!(
        decode_messages(&two).unwrap_err(),
        DecodeError::TruncatedHeader {
            offset: at,
            available: 3
        }
    );
}

#[test]
fn snapshot_rejects_bad_message_lengths() {
    for len in [0u32, 1, 15] {
        let mut buf = one_entry();
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            decode_messages(&buf).unwrap_err(),
            DecodeError::MessageTooShort { offset: 0, len }
        );
    }
    let mut buf = one_entry();
    let real = buf.len();
    buf[0..4].copy_from_slice(&(real as u32 + 4).to_ne_bytes());
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::TruncatedMessage {
            offset: 0,
            len: real as u32 + 4,
            available: real
        }
    );
    let mut short = Vec::new();
    put_msg(&mut short, ctnetlink_type(IPCTNL_MSG_CT_GET), 0, 1, &[]);
    assert!(matches!(
        decode_messages(&short).unwrap_err(),
        DecodeError::TruncatedPayload {
            what: "nfgenmsg",
            offset: 0,
            ..
        }
    ));
    let mut short_err = Vec::new();
    put_msg(&mut short_err, NLMSG_ERROR, 0, 1, &[]);
    assert!(matches!(
        decode_messages(&short_err).unwrap_err(),
        DecodeError::TruncatedPayload {
            what: "nlmsgerr",
            ..
        }
    ));
}

#[test]
fn snapshot_rejects_bad_attribute_lengths() {
    let first = NLMSG_HDRLEN + NFGENMSG_LEN; // CTA_TUPLE_ORIG
    // nla_len 0 would never advance: it must be an error, not a loop.
    for len in [0u16, 1, 3] {
        let mut buf = one_entry();
        set_u16(&mut buf, first, len);
        assert_eq!(
            decode_messages(&buf).unwrap_err(),
            DecodeError::AttrTooShort { offset: first, len }
        );
    }
    let mut buf = one_entry();
    let end = buf.len();
    set_u16(&mut buf, first, (end - first + 4) as u16);
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::TruncatedAttr {
            offset: first,
            len: (end - first + 4) as u16,
            available: end - first
        }
    );
    // Inside a nest: the nested CTA_TUPLE_IP is checked against its parent, not the message.
    let mut buf = one_entry();
    let ip = first + NLA_HDRLEN;
    let orig_len = u16::from_ne_bytes([buf[first], buf[first + 1]]) as usize;
    set_u16(&mut buf, ip, (orig_len + 8) as u16);
    assert!(matches!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::TruncatedAttr { offset, .. } if offset == ip
    ));
}

#[test]
fn snapshot_rejects_wrong_payload_sizes() {
    let mut buf = one_entry();
    let start = NLMSG_HDRLEN + NFGENMSG_LEN;
    let status = find_attr(&buf, start, buf.len(), CTA_STATUS);
    set_u16(&mut buf, status, 6); // 2-byte payload where a u32 belongs
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::AttrSize {
            attr: "CTA_STATUS",
            offset: status,
            len: 2,
            expected: 4
        }
    );
    let text = decode_messages(&buf).unwrap_err().to_string();
    assert!(text.contains("CTA_STATUS") && text.contains(&format!("offset {status}")));
}

#[test]
fn snapshot_rejects_missing_and_mixed_attributes() {
    // Turn CTA_TUPLE_REPLY into an unknown type: the entry lacks its reply tuple.
    let mut buf = one_entry();
    let start = NLMSG_HDRLEN + NFGENMSG_LEN;
    let reply = find_attr(&buf, start, buf.len(), CTA_TUPLE_REPLY);
    set_u16(&mut buf, reply + 2, 0x3fe | NLA_F_NESTED);
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::MissingAttr {
            parent: "conntrack message",
            attr: "CTA_TUPLE_REPLY",
            offset: 0
        }
    );

    // Without CTA_PROTO_NUM.
    let mut buf = one_entry();
    let proto = find_attr(&buf, start + NLA_HDRLEN, buf.len(), CTA_TUPLE_PROTO);
    set_u16(&mut buf, proto + NLA_HDRLEN + 2, 0x3fe);
    assert!(matches!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::MissingAttr { parent: "CTA_TUPLE_PROTO", attr: "CTA_PROTO_NUM", offset }
            if offset == proto
    ));

    // An IPv4 source with an IPv6 destination.
    let mut p = vec![libc::AF_INET as u8, 0, 0, 0];
    put_nest(&mut p, CTA_TUPLE_ORIG, |b| {
        put_nest(b, CTA_TUPLE_IP, |b| {
            put_attr(b, CTA_IP_V4_SRC, &[10, 0, 0, 1]);
            put_attr(b, CTA_IP_V6_DST, &[0; 16]);
        });
    });
    let mut buf = Vec::new();
    put_msg(&mut buf, ctnetlink_type(IPCTNL_MSG_CT_GET), 0, 1, &p);
    assert_eq!(
        decode_messages(&buf).unwrap_err(),
        DecodeError::MixedFamilies {
            offset: start + NLA_HDRLEN
        }
    );
}

#[test]
fn snapshot_accepts_unpadded_last_message() {
    // A final message whose nlmsg_len is not a multiple of 4 and that has no padding bytes.
    let mut buf = one_entry();
    put_msg(&mut buf, NLMSG_NOOP, 0, 1, &[9]);
    let n = buf.len();
    buf.truncate(n - 3);
    let d = decode_ok(&buf);
    assert_eq!(d.entries.len(), 1);
    assert_eq!(d.skipped, 1);
}

// --- fuzzing --------------------------------------------------------------------------------

use crate::testutil::Rng;

fn random_entry(r: &mut Rng) -> CtSnapshotEntry {
    let proto = [6u8, 17, 1, 58, 132][r.index(5)];
    let v6 = match proto {
        1 => false,
        58 => true,
        _ => r.one_in(2),
    };
    let addr = |r: &mut Rng| -> IpAddr {
        if v6 {
            IpAddr::from(std::net::Ipv6Addr::from(
                (r.next() as u128) << 64 | r.next() as u128,
            ))
        } else {
            IpAddr::from(std::net::Ipv4Addr::from(r.next() as u32))
        }
    };
    let icmp = proto == 1 || proto == 58;
    let port = |r: &mut Rng| if icmp { 0 } else { r.next() as u16 };
    let orig = FlowTuple {
        proto,
        src: addr(r),
        sport: port(r),
        dst: addr(r),
        dport: port(r),
    };
    CtSnapshotEntry {
        orig,
        reply: orig.reversed(),
        id: r.next() as u32,
        status: r.next() as u32 & 0x3fff,
        timeout_s: r.next() as u32 % 500_000,
        zone: if r.one_in(4) { r.next() as u16 } else { 0 },
        mark: if r.one_in(4) { r.next() as u32 } else { 0 },
    }
}

/// Valid dumps of various shapes, and the entries each holds.
fn corpus(r: &mut Rng) -> Vec<(Vec<u8>, Vec<CtSnapshotEntry>)> {
    let mut out = Vec::new();
    for i in 0..24 {
        let n = 1 + r.index(4);
        let entries: Vec<_> = (0..n).map(|_| random_entry(r)).collect();
        let o = Opts {
            unknown: i % 3 == 0,
            byteorder_flag: i % 5 == 0,
            ..Opts::default()
        };
        let mut buf = Vec::new();
        if i % 4 == 1 {
            put_error(&mut buf, 0);
        }
        for e in &entries {
            put_entry(&mut buf, e, o);
        }
        match i % 4 {
            0 | 1 => put_done(&mut buf, 0),
            2 => put_error(&mut buf, -libc::EINVAL),
            _ => {} // a datagram in the middle of a dump
        }
        out.push((buf, entries));
    }
    out
}

/// Offsets and widths of every length field (nlmsg_len, nla_len) of a valid buffer.
fn length_fields(buf: &[u8]) -> Vec<(usize, usize)> {
    fn walk(buf: &[u8], mut at: usize, end: usize, out: &mut Vec<(usize, usize)>) {
        while at + NLA_HDRLEN <= end {
            let len = u16::from_ne_bytes([buf[at], buf[at + 1]]) as usize;
            let ty = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]);
            out.push((at, 2));
            if ty & NLA_F_NESTED != 0 {
                walk(buf, at + NLA_HDRLEN, at + len, out);
            }
            at += align4(len);
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        out.push((at, 4));
        if ty >> 8 == NFNL_SUBSYS_CTNETLINK as u16 {
            walk(buf, at + NLMSG_HDRLEN + NFGENMSG_LEN, at + len, &mut out);
        }
        at += align4(len);
    }
    out
}

fn mutate(r: &mut Rng, buf: &mut Vec<u8>, fields: &[(usize, usize)]) {
    let rounds = 1 + r.index(3);
    for _ in 0..rounds {
        match r.index(7) {
            // Bit flips.
            0 | 1 if !buf.is_empty() => {
                for _ in 0..1 + r.index(4) {
                    let i = r.index(buf.len());
                    buf[i] ^= 1 << r.index(8);
                }
            }
            // Truncation.
            2 if !buf.is_empty() => {
                let n = r.index(buf.len());
                buf.truncate(n);
            }
            // Length-field corruption, with the values that break naive parsers.
            3 | 4 if !fields.is_empty() => {
                let (at, width) = fields[r.index(fields.len())];
                if at + width > buf.len() {
                    continue;
                }
                let old = if width == 2 {
                    u16::from_ne_bytes([buf[at], buf[at + 1]]) as u64
                } else {
                    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as u64
                };
                let v = match r.index(10) {
                    0 => 0,
                    1 => 1 + r.index(3) as u64,
                    2 => 4,
                    3 => old.wrapping_sub(1 + r.index(8) as u64),
                    4 => old + 1 + r.index(8) as u64,
                    5 => old.wrapping_sub(4),
                    6 => old + 4,
                    7 => u64::MAX,
                    8 => buf.len() as u64,
                    _ => r.next(),
                };
                if width == 2 {
                    buf[at..at + 2].copy_from_slice(&(v as u16).to_ne_bytes());
                } else {
                    buf[at..at + 4].copy_from_slice(&(v as u32).to_ne_bytes());
                }
            }
            // Remove or duplicate a range.
            5 if !buf.is_empty() => {
                let a = r.index(buf.len());
                let b = (a + 1 + r.index(32)).min(buf.len());
                if r.one_in(2) {
                    buf.drain(a..b);
                } else {
                    let chunk = buf[a..b].to_vec();
                    let at = r.index(buf.len() + 1);
                    buf.splice(at..at, chunk);
                }
            }
            // Random bytes somewhere, or appended.
            _ => {
                let at = if buf.is_empty() {
                    0
                } else {
                    r.index(buf.len() + 1)
                };
                let junk: Vec<u8> = (0..1 + r.index(24)).map(|_| r.next() as u8).collect();
                buf.splice(at..at, junk);
            }
        }
    }
}

const FUZZ_CASES: usize = 25_000;

struct FuzzReport {
    cases: usize,
    ok: usize,
    err: usize,
    error_kinds: usize,
    elapsed: Duration,
}

fn fuzz(seed: u64) -> FuzzReport {
    let started = Instant::now();
    let mut r = Rng(seed);
    let corpus = corpus(&mut r);
    // The unmutated corpus decodes to exactly what was encoded.
    for (buf, entries) in &corpus {
        match decode_messages(buf) {
            Ok(d) => assert_eq!(&d.entries, entries),
            Err(DecodeError::Kernel { errno, .. }) => assert_eq!(errno, libc::EINVAL),
            Err(e) => panic!("valid corpus buffer rejected: {e}"),
        }
    }
    let fields: Vec<_> = corpus.iter().map(|(b, _)| length_fields(b)).collect();
    let (mut ok, mut err) = (0, 0);
    let mut kinds = HashSet::new();
    for case in 0..FUZZ_CASES {
        let input = if r.one_in(32) {
            // Pure noise, sometimes starting with a plausible header.
            let mut b: Vec<u8> = (0..r.index(256)).map(|_| r.next() as u8).collect();
            if b.len() >= 8 && r.one_in(2) {
                let n = r.index(b.len() + 8) as u32;
                b[0..4].copy_from_slice(&n.to_ne_bytes());
                b[4..6].copy_from_slice(&ctnetlink_type(IPCTNL_MSG_CT_GET).to_ne_bytes());
            }
            b
        } else {
            let k = r.index(corpus.len());
            let mut b = corpus[k].0.clone();
            mutate(&mut r, &mut b, &fields[k]);
            b
        };
        let result = catch_unwind(AssertUnwindSafe(|| decode_messages(&input)));
        match result {
            Ok(Ok(d)) => {
                ok += 1;
                // Every entry needs at least a header, an nfgenmsg and two tuples.
                assert!(d.entries.len() * 20 <= input.len(), "case {case}");
            }
            Ok(Err(e)) => {
                err += 1;
                kinds.insert(std::mem::discriminant(&e));
                let _ = e.to_string(); // Display must not panic either
            }
            Err(_) => panic!(
                "decoder panicked on fuzz case {case} (seed {seed:#x}), input {:02x?}",
                input
            ),
        }
    }
    FuzzReport {
        cases: FUZZ_CASES,
        ok,
        err,
        error_kinds: kinds.len(),
        elapsed: started.elapsed(),
    }
}

#[test]
fn snapshot_fuzz_decoder_never_panics_or_hangs() {
    // Deterministic; SNAPSHOT_FUZZ_SEED=<u64> explores other inputs (the seed of a failure is
    // in its message).
    let seed = std::env::var("SNAPSHOT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0x5eed_c0de_2024_0001);
    // Run on a thread so that a decoder stuck in a loop fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let report = catch_unwind(|| fuzz(seed));
        let _ = tx.send(report);
    });
    let report = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(Ok(report)) => report,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("fuzzing did not finish in 300 s: the decoder loops"),
    };
    eprintln!(
        "fuzz: {} cases in {:.2?} ({} decoded, {} rejected, {} distinct errors)",
        report.cases, report.elapsed, report.ok, report.err, report.error_kinds
    );
    assert!(report.cases >= 20_000);
    // The mutations reach both outcomes and many different checks.
    assert!(report.ok > 500, "only {} cases decoded", report.ok);
    assert!(report.err > 5_000, "only {} cases rejected", report.err);
    assert!(
        report.error_kinds >= 8,
        "only {} kinds of error",
        report.error_kinds
    );
}
