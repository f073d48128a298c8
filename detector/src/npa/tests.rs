#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use std::net::Ipv6Addr;

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
