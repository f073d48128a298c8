//! The kernel offsets the programs need, resolved from BTF into one `ProbeConfig`.

use detector_common::{ProbeConfig, TUPLE_READ_BYTES};

use super::btf::{BtfError, KernelBtf};

/// Modules whose split BTF may hold the types and functions we use.
pub const BTF_MODULES: &[&str] = &["nf_conntrack"];

/// (field of ProbeConfig, struct, member path, slot): the single table both the config and
/// `detector doctor` are built from.
type Slot = fn(&mut ProbeConfig) -> &mut u32;
const FIELDS: &[(&str, &str, &str, Slot)] = &[
    ("ct_timeout", "nf_conn", "timeout", |c| &mut c.ct_timeout),
    ("ct_status", "nf_conn", "status", |c| &mut c.ct_status),
    ("ct_net", "nf_conn", "ct_net.net", |c| &mut c.ct_net),
    ("ct_tuple_orig", "nf_conn", "tuplehash[0].tuple", |c| {
        &mut c.ct_tuple_orig
    }),
    ("ct_tuple_reply", "nf_conn", "tuplehash[1].tuple", |c| {
        &mut c.ct_tuple_reply
    }),
    ("tuple_src_addr", "nf_conntrack_tuple", "src.u3", |c| {
        &mut c.tuple_src_addr
    }),
    ("tuple_src_port", "nf_conntrack_tuple", "src.u.all", |c| {
        &mut c.tuple_src_port
    }),
    ("tuple_l3num", "nf_conntrack_tuple", "src.l3num", |c| {
        &mut c.tuple_l3num
    }),
    ("tuple_dst_addr", "nf_conntrack_tuple", "dst.u3", |c| {
        &mut c.tuple_dst_addr
    }),
    ("tuple_dst_port", "nf_conntrack_tuple", "dst.u.all", |c| {
        &mut c.tuple_dst_port
    }),
    (
        "tuple_protonum",
        "nf_conntrack_tuple",
        "dst.protonum",
        |c| &mut c.tuple_protonum,
    ),
    ("net_ns_inum", "net", "ns.inum", |c| &mut c.net_ns_inum),
    ("skb_nfct", "sk_buff", "_nfct", |c| &mut c.skb_nfct),
    ("kmem_cache_name", "kmem_cache", "name", |c| {
        &mut c.kmem_cache_name
    }),
    ("task_files", "task_struct", "files", |c| &mut c.task_files),
    ("files_fdt", "files_struct", "fdt", |c| &mut c.files_fdt),
    ("fdtable_fd", "fdtable", "fd", |c| &mut c.fdtable_fd),
    ("fdtable_max_fds", "fdtable", "max_fds", |c| {
        &mut c.fdtable_max_fds
    }),
    ("file_private_data", "file", "private_data", |c| {
        &mut c.file_private_data
    }),
    ("bpf_map_id", "bpf_map", "id", |c| &mut c.bpf_map_id),
    ("bpf_map_key_size", "bpf_map", "key_size", |c| {
        &mut c.bpf_map_key_size
    }),
    ("skb_head", "sk_buff", "head", |c| &mut c.skb_head),
    ("skb_network_header", "sk_buff", "network_header", |c| {
        &mut c.skb_network_header
    }),
    ("skb_protocol", "sk_buff", "protocol", |c| {
        &mut c.skb_protocol
    }),
    ("ct_tcp_state", "nf_conn", "proto.tcp.state", |c| {
        &mut c.ct_tcp_state
    }),
    ("task_nsproxy", "task_struct", "nsproxy", |c| {
        &mut c.task_nsproxy
    }),
    ("nsproxy_net_ns", "nsproxy", "net_ns", |c| {
        &mut c.nsproxy_net_ns
    }),
];

/// One resolved offset, for display.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolved {
    pub field: &'static str,
    pub strukt: &'static str,
    pub path: &'static str,
    pub offset: u32,
}

/// Resolves every offset; the first one missing is the error (it names struct and member).
pub fn resolve(btf: &KernelBtf) -> Result<(ProbeConfig, Vec<Resolved>), BtfError> {
    let mut cfg = ProbeConfig::ZERO;
    let mut list = Vec::with_capacity(FIELDS.len());
    for &(field, strukt, path, slot) in FIELDS {
        let offset = btf.offset(strukt, path)?;
        *slot(&mut cfg) = offset;
        list.push(Resolved {
            field,
            strukt,
            path,
            offset,
        });
    }
    // The programs copy each tuple whole: every field they take must lie in the copy.
    for (field, offset, size) in [
        ("src.u3", cfg.tuple_src_addr, 16),
        ("src.u.all", cfg.tuple_src_port, 2),
        ("src.l3num", cfg.tuple_l3num, 2),
        ("dst.u3", cfg.tuple_dst_addr, 16),
        ("dst.u.all", cfg.tuple_dst_port, 2),
        ("dst.protonum", cfg.tuple_protonum, 1),
    ] {
        if offset as usize + size > TUPLE_READ_BYTES {
            return Err(BtfError::Layout(format!(
                "struct nf_conntrack_tuple member {field} at byte {offset} lies beyond the \
                 {TUPLE_READ_BYTES} bytes the programs copy per tuple: this kernel's conntrack \
                 tuple is not one the detector knows; please report it with `detector doctor`'s \
                 output"
            )));
        }
    }
    // kmem_cache_free(call_site, ptr, s): `s` became the cache itself in 6.2; before, it was
    // the cache's name. Undescribed: assume the current form.
    cfg.kmem_free_arg_cache = u32::from(
        btf.tracepoint_arg_is_struct("kmem_cache_free", 2, "kmem_cache")
            .unwrap_or(true),
    );
    Ok((cfg, list))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    /// Runs against this machine's kernel BTF when it has one (every CI machine does).
    #[test]
    fn resolves_every_field_on_this_kernel() {
        let dir = std::path::Path::new("/sys/kernel/btf");
        if !dir.join("vmlinux").exists() {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        }
        let btf = KernelBtf::load(dir, BTF_MODULES).unwrap();
        let (cfg, list) = resolve(&btf).unwrap();
        assert_eq!(list.len(), FIELDS.len());
        // Invariants that hold on every kernel: the reply tuple follows the original one, and
        // inside a tuple the source precedes the destination.
        assert!(cfg.ct_tuple_reply > cfg.ct_tuple_orig);
        assert!(cfg.tuple_dst_addr > cfg.tuple_src_addr);
        assert_eq!(cfg.tuple_src_addr, 0, "src.u3 starts nf_conntrack_tuple");
    }

    /// Where nf_conntrack is a module (Debian, EKS), its functions and any types it defines
    /// come from its split BTF over vmlinux: the split file parses, names the module's
    /// functions (and not vmlinux), and every offset still resolves through it. Where it is
    /// built in, the same functions are in vmlinux BTF and no split file exists.
    #[test]
    fn module_split_btf_on_this_kernel() {
        let dir = std::path::Path::new("/sys/kernel/btf");
        if !dir.join("vmlinux").exists() {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        }
        let btf = KernelBtf::load(dir, BTF_MODULES).unwrap();
        let funcs = ["nf_ct_destroy", "__nf_conntrack_confirm"];
        if dir.join("nf_conntrack").exists() {
            assert_eq!(btf.modules().collect::<Vec<_>>(), ["nf_conntrack"]);
            for f in funcs {
                assert_eq!(btf.module_of_func(f), Some("nf_conntrack"), "{f}");
                assert!(!btf.vmlinux_has_func(f), "{f} is not in vmlinux");
            }
            let home = btf.struct_home("nf_conn").unwrap();
            eprintln!("nf_conntrack is a module; struct nf_conn is defined in {home}");
        } else {
            assert!(
                std::path::Path::new("/sys/module/nf_conntrack").exists()
                    && !std::path::Path::new("/sys/module/nf_conntrack/initstate").exists(),
                "nf_conntrack is neither built in nor a loaded module with BTF \
                 (modprobe nf_conntrack)"
            );
            assert_eq!(btf.modules().count(), 0);
            for f in funcs {
                assert!(btf.vmlinux_has_func(f), "{f} in vmlinux BTF");
                assert_eq!(btf.module_of_func(f), None);
            }
        }
        let (cfg, _) = resolve(&btf).unwrap();
        assert!(cfg.ct_tuple_reply > cfg.ct_tuple_orig);
    }
}
