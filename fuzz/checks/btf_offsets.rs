// Kernel BTF (vmlinux and a module's split BTF) and resolving the detector's member paths in
// it. Input: a 4-byte little-endian length of the base blob, the base blob, then the split blob
// (absent when empty); with no valid length prefix, the whole input is the base.
//
// The `btf_offsets` fuzz target's body; detector/tests/fuzz_corpus.rs runs its corpus
// through it in a plain build (`cargo test`).

use detector::kernel::btf::KernelBtf;
use detector::kernel::offsets;

pub fn check(data: &[u8]) {
    let (base, split) = match data.split_first_chunk::<4>() {
        Some((len, rest)) if (u32::from_le_bytes(*len) as usize) <= rest.len() => {
            rest.split_at(u32::from_le_bytes(*len) as usize)
        }
        _ => (data, &data[..0]),
    };
    let modules: &[(&str, &[u8])] = if split.is_empty() {
        &[]
    } else {
        &[("nf_conntrack", split)]
    };
    let Ok(btf) = KernelBtf::from_bytes(base, modules) else {
        return;
    };
    // Everything `detector doctor` and the loader ask of the BTF.
    let _ = offsets::resolve(&btf);
    for (strukt, path) in [
        ("nf_conn", "tuplehash[1].tuple.dst.u.all"),
        ("nf_conn", "ct_net.net"),
        ("net", "ns.inum"),
        ("nf_conntrack_tuple", "src.u3"),
    ] {
        let _ = btf.offset(strukt, path);
        let _ = btf.struct_home(strukt);
    }
    let _ = btf.vmlinux_has_func("nf_ct_destroy");
    let _ = btf.module_of_func("nf_ct_destroy");
    let _ = btf.tracepoint_arg_is_struct("kmem_cache_free", 2, "kmem_cache");
    let _ = btf.enum_values("ip_conntrack_status");
}
