//! Decoding tests, and raw records other tests build on.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::net::Ipv6Addr;

use detector_common::{AF_INET, AF_INET6};

use super::*;

#[test]
fn packed_tuples_round_trip() {
    for (src, dst) in [
        ("10.0.0.1", "192.168.7.9"),
        ("fd00::1", "2001:db8::7"),
        ("10.0.0.1", "fd00::2"),
        ("::ffff:10.0.0.1", "fd00::2"),
    ] {
        let t = FlowTuple {
            proto: 6,
            src: src.parse().unwrap(),
            sport: 40000,
            dst: dst.parse().unwrap(),
            dport: 443,
        };
        let p = PackedTuple::of(&t);
        assert_eq!(p.tuple(), t, "{src} -> {dst}");
        assert_eq!(
            matches!(p, PackedTuple::V4(_)),
            src.contains('.') && dst.contains('.') && !src.contains(':')
        );
    }
    assert_eq!(std::mem::size_of::<PackedTuple>(), 16);
}
use detector_common::{TaskInfo, Tuple, kind, reason, source};

pub fn raw_ct(k: u8) -> CtEvent {
    let mut orig = Tuple {
        family: AF_INET,
        proto: 6,
        src_port: 40000,
        dst_port: 5001,
        ..Default::default()
    };
    orig.src_addr[..4].copy_from_slice(&[10, 77, 0, 2]);
    orig.dst_addr[..4].copy_from_slice(&[10, 77, 0, 1]);
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"curl");
    CtEvent {
        hdr: EventHeader {
            kind: k,
            version: RECORD_VERSION,
            size: size_of::<CtEvent>() as u16,
            cpu: 1,
            ts_ns: 123,
        },
        orig,
        reply: orig,
        ct_addr: 0xffff_8880_0000_1000,
        born_ns: 100,
        jiffies: 5,
        status: 0x18e,
        netns: 4026532177,
        timeout_left: -3,
        reason: if k == kind::CT_DESTROY {
            reason::EXPIRED
        } else {
            0
        },
        source: source::TP_KMEM_CACHE_FREE,
        _pad: 0,
        task: TaskInfo {
            pid: 7,
            tid: 8,
            comm,
        },
        expiry_ns: 111,
    }
}

pub fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: test helper over padding-free repr(C) records.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[test]
fn decodes_a_destroy() {
    let raw = raw_ct(kind::CT_DESTROY);
    let Event::Ct(c) = decode(&bytes_of(&raw)).unwrap() else {
        panic!("not a ct record")
    };
    assert_eq!(c.kind, CtKind::Destroy);
    assert_eq!(c.reason, Some(DestroyReason::Expired));
    assert_eq!(c.orig.to_string(), "10.77.0.2:40000 -> 10.77.0.1:5001");
    assert_eq!(c.task.comm, "curl");
    assert_eq!(c.source, Source::KmemCacheFree);
    assert_eq!(c.id, entry_id(raw.ct_addr, raw.born_ns));
    assert_eq!(c.netns, 4026532177);
    assert_eq!(c.expiry_ns, raw.expiry_ns);
}

#[test]
fn decodes_a_map_delete() {
    let mut raw = MapDeleteEvent::ZERO;
    raw.hdr = EventHeader {
        kind: kind::MAP_DELETE,
        version: RECORD_VERSION,
        size: size_of::<MapDeleteEvent>() as u16,
        cpu: 0,
        ts_ns: 10,
    };
    raw.map_id = 42;
    raw.ret = -2;
    raw.key_size = 24;
    raw.key[0] = 10;
    raw.view = detector_common::view::LIVE;
    raw.ct_addr = 0x1000;
    raw.ct_born_ns = 5;
    let Event::MapDelete(d) = decode(&bytes_of(&raw)).unwrap() else {
        panic!("not a map delete");
    };
    assert_eq!(d.key.len(), 24);
    assert_eq!(d.key[0], 10);
    assert_eq!(d.view, DeleteView::Live);
    assert_eq!(d.entry_id(), Some(entry_id(0x1000, 5)));
    assert_eq!(d.ct_tcp_state, None, "not read: UNKNOWN");
    // The TCP state travels at the end of the record, after the key.
    raw.ct_tcp_state = detector_common::tcp_state::CLOSE;
    let Event::MapDelete(d) = decode(&bytes_of(&raw)).unwrap() else {
        panic!("not a map delete");
    };
    assert_eq!(d.ct_tcp_state, Some(crate::record::TcpState::Close));
    assert!(d.ct_tcp_state.unwrap().carries_no_packets());
    // A state this detector does not know (a newer kernel's) is "not read", not an error.
    raw.ct_tcp_state = 42;
    let Event::MapDelete(d) = decode(&bytes_of(&raw)).unwrap() else {
        panic!("not a map delete");
    };
    assert_eq!(d.ct_tcp_state, None);
    raw.view = 9;
    assert!(decode(&bytes_of(&raw)).is_err());
}

#[test]
fn decodes_a_map_write() {
    let raw = detector_common::MapWriteEvent {
        hdr: EventHeader {
            kind: kind::MAP_WRITE,
            version: RECORD_VERSION,
            size: size_of::<detector_common::MapWriteEvent>() as u16,
            cpu: 1,
            ts_ns: 9,
        },
        task: TaskInfo::default(),
        map_id: 7,
        key_size: 20,
        op: detector_common::map_op::UPDATE,
        from_syscall: 0,
        _pad: [0; 6],
        key: [1; detector_common::MAX_KEY],
    };
    let Event::MapWrite(w) = decode(&bytes_of(&raw)).unwrap() else {
        panic!("not a map write");
    };
    assert_eq!(
        (w.op, w.from_syscall, w.key.len()),
        (MapOp::Update, false, 20)
    );
    let mut bad = raw;
    bad.op = 3;
    assert!(decode(&bytes_of(&bad)).is_err());
}

#[test]
fn ids_separate_lifetimes_at_one_address() {
    assert_ne!(entry_id(0x1000, 1), entry_id(0x1000, 2));
    assert_eq!(entry_id(0x1000, 1), entry_id(0x1000, 1));
}

#[test]
fn decodes_ipv6() {
    let mut raw = raw_ct(kind::CT_NEW);
    raw.orig.family = AF_INET6;
    raw.orig.src_addr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
    raw.orig.dst_addr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
    let Event::Ct(c) = decode(&bytes_of(&raw)).unwrap() else {
        panic!("not a ct record")
    };
    assert_eq!(c.orig.to_string(), "[fd00::2]:40000 -> [fd00::1]:5001");
    assert_eq!(c.reason, None);
}

#[test]
fn rejects_short_and_mislabelled_records() {
    let raw = raw_ct(kind::CT_NEW);
    let b = bytes_of(&raw);
    assert_eq!(decode(&b[..10]), Err(DecodeError::Short(10)));
    assert!(matches!(
        decode(&b[..b.len() - 1]),
        Err(DecodeError::Length { .. })
    ));
    let mut wrong_size = raw;
    wrong_size.hdr.size -= 8;
    assert!(matches!(
        decode(&bytes_of(&wrong_size)),
        Err(DecodeError::Length { .. })
    ));
}

#[test]
fn rejects_unknown_kinds_and_values() {
    let mut raw = raw_ct(kind::CT_NEW);
    raw.hdr.kind = 99;
    assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownKind(99)));
    let mut raw = raw_ct(kind::CT_DESTROY);
    raw.reason = 42;
    assert!(matches!(
        decode(&bytes_of(&raw)),
        Err(DecodeError::UnknownValue {
            what: "destroy reason",
            value: 42
        })
    ));
    let mut raw = raw_ct(kind::CT_NEW);
    raw.orig.family = 3;
    assert!(matches!(
        decode(&bytes_of(&raw)),
        Err(DecodeError::UnknownValue {
            what: "address family",
            ..
        })
    ));
    let mut raw = raw_ct(kind::CT_NEW);
    raw.source = 200;
    assert!(decode(&bytes_of(&raw)).is_err());
    let mut raw = raw_ct(kind::CT_NEW);
    raw.hdr.version = 9;
    assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::Version(9)));
}
