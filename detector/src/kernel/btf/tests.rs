#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests: a panic is the failure report"
)]

use super::fixture::BtfWriter;
use super::*;

/// A small "kernel": struct net { u64 pad; struct ns_common ns @16 } in the base, and a
/// conntrack-like struct with anonymous unions and an array in a module's split section.
fn fixture() -> (Vec<u8>, Vec<u8>) {
    let mut b = BtfWriter::base();
    let u8_ = b.int("u8", 1);
    let u16_ = b.int("u16", 2);
    let u32_ = b.int("unsigned int", 4);
    let u64_ = b.int("long unsigned int", 8);
    let ns = b.strukt("ns_common", 16, &[("stashed", u64_, 0), ("inum", u32_, 8)]);
    let net = b.strukt("net", 64, &[("passive", u64_, 0), ("ns", ns, 16)]);
    let netp = b.ptr(net);
    let possible = b.strukt("", 8, &[("net", netp, 0)]);
    let possible_t = b.typedef("possible_net_t", possible);
    // sk_buff with _nfct inside an anonymous union
    let anon = b.union("", 8, &[("_nfct", u64_, 0), ("other", u32_, 0)]);
    let _skb = b.strukt("sk_buff", 232, &[("next", u64_, 0), ("", anon, 104)]);
    b.func("vmlinux_fn");
    let base_bytes = b.bytes();

    let mut m = BtfWriter::split(&b);
    let addr = m.union("nf_inet_addr", 16, &[("ip", u32_, 0), ("all", u32_, 0)]);
    let port = m.union("", 2, &[("all", u16_, 0)]);
    let src = m.strukt(
        "nf_conntrack_man",
        20,
        &[("u3", addr, 0), ("u", port, 16), ("l3num", u16_, 18)],
    );
    let dst = m.strukt(
        "",
        20,
        &[
            ("u3", addr, 0),
            ("u", port, 16),
            ("protonum", u8_, 18),
            ("dir", u8_, 19),
        ],
    );
    let tuple = m.strukt(
        "nf_conntrack_tuple",
        40,
        &[("src", src, 0), ("dst", dst, 20)],
    );
    let hash = m.strukt(
        "nf_conntrack_tuple_hash",
        56,
        &[("hnnode", u64_, 0), ("tuple", tuple, 16)],
    );
    let arr = m.array(hash, u32_, 2);
    let _ct = m.strukt(
        "nf_conn",
        256,
        &[
            ("ct_general", u32_, 0),
            ("timeout", u32_, 8),
            ("tuplehash", arr, 16),
            ("status", u64_, 128),
            ("ct_net", possible_t, 136),
        ],
    );
    m.func("nf_ct_delete");
    (base_bytes, m.bytes())
}

#[test]
fn offsets_from_base_and_split_btf() {
    let (base, split) = fixture();
    let k = KernelBtf::from_bytes(&base, &[("nf_conntrack", &split)]).unwrap();
    assert_eq!(k.offset("net", "ns.inum").unwrap(), 24);
    assert_eq!(
        k.offset("sk_buff", "_nfct").unwrap(),
        104,
        "through an anonymous union"
    );
    assert_eq!(k.offset("nf_conn", "timeout").unwrap(), 8);
    assert_eq!(k.offset("nf_conn", "status").unwrap(), 128);
    assert_eq!(
        k.offset("nf_conn", "ct_net.net").unwrap(),
        136,
        "through a typedef"
    );
    assert_eq!(k.offset("nf_conn", "tuplehash[0].tuple").unwrap(), 16 + 16);
    assert_eq!(
        k.offset("nf_conn", "tuplehash[1].tuple").unwrap(),
        16 + 56 + 16
    );
    assert_eq!(
        k.offset("nf_conn", "tuplehash[1].tuple.dst.protonum")
            .unwrap(),
        16 + 56 + 16 + 20 + 18
    );
    assert_eq!(k.offset("nf_conntrack_tuple", "src.u.all").unwrap(), 16);
    assert_eq!(k.offset("nf_conntrack_tuple", "dst.u3").unwrap(), 20);
    assert_eq!(k.struct_home("nf_conn"), Some("nf_conntrack"));
    assert_eq!(k.struct_home("net"), Some("vmlinux"));
    assert!(k.vmlinux_has_func("vmlinux_fn"));
    assert!(!k.vmlinux_has_func("nf_ct_delete"));
    assert_eq!(k.module_of_func("nf_ct_delete"), Some("nf_conntrack"));
    assert_eq!(k.module_of_func("vmlinux_fn"), None);
}

#[test]
fn split_types_are_invisible_without_the_module() {
    let (base, _) = fixture();
    let k = KernelBtf::from_bytes(&base, &[]).unwrap();
    assert!(matches!(
        k.offset("nf_conn", "timeout"),
        Err(BtfError::NoStruct(_))
    ));
}

#[test]
fn errors_name_the_member() {
    let (base, split) = fixture();
    let k = KernelBtf::from_bytes(&base, &[("nf_conntrack", &split)]).unwrap();
    let e = k.offset("nf_conn", "tuplehash[2].tuple").unwrap_err();
    assert!(matches!(e, BtfError::NoMember { .. }), "{e}");
    let e = k.offset("nf_conn", "nope").unwrap_err();
    assert!(e.to_string().contains("nf_conn") && e.to_string().contains("nope"));
    assert!(matches!(
        k.offset("nf_conn", "a..b"),
        Err(BtfError::BadPath(_))
    ));
    assert!(matches!(
        k.offset("nf_conn", "x[y]"),
        Err(BtfError::BadPath(_))
    ));
}

#[test]
fn missing_btf_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join("detector-no-btf-here");
    let e = KernelBtf::load(&dir, &["nf_conntrack"]).err().unwrap();
    let msg = e.to_string();
    assert!(msg.contains("CONFIG_DEBUG_INFO_BTF"), "{msg}");
    assert!(msg.contains("vmlinux"), "{msg}");
}
