//! Tracepoint backend (no kprobes, no trampolines: works wherever BTF does).
//!
//! - NEW: tp_btf `net_dev_queue(struct sk_buff *skb)`, `consume_skb(struct sk_buff *skb, ...)`
//!   and `kfree_skb(struct sk_buff *skb, ...)`: the first packet seen carrying a confirmed
//!   entry in `skb->_nfct`.
//! - DESTROY: raw tracepoint `kmem_cache_free(unsigned long call_site, const void *ptr,
//!   <struct kmem_cache *s from 6.2, const char *name before>)`: nf_conntrack_free() hands the
//!   still-intact entry to its slab here.

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::Array,
    programs::{BtfTracePointContext, RawTracePointContext},
};
use detector_common::source::{TP_CONSUME_SKB, TP_KFREE_SKB, TP_KMEM_CACHE_FREE, TP_NET_DEV_QUEUE};

use super::{report_destroy, report_new};
use crate::emit::probe_config;
use crate::kernel::{NfConn, Skb, read_kernel, read_kernel_str};

/// Address of the `nf_conntrack` kmem_cache, found by name on the first conntrack free and
/// compared by pointer from then on (kmem_cache_free fires for every slab free on the machine).
#[map]
static CT_CACHE: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn report_skb(skb: u64, source: u8) {
    report_new(Skb(skb).conntrack(&probe_config()), source);
}

#[btf_tracepoint(function = "net_dev_queue")]
pub fn ct_new_net_dev_queue(ctx: BtfTracePointContext) -> u32 {
    report_skb(ctx.arg::<u64>(0), TP_NET_DEV_QUEUE);
    0
}

#[btf_tracepoint(function = "consume_skb")]
pub fn ct_new_consume_skb(ctx: BtfTracePointContext) -> u32 {
    report_skb(ctx.arg::<u64>(0), TP_CONSUME_SKB);
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn ct_new_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    report_skb(ctx.arg::<u64>(0), TP_KFREE_SKB);
    0
}

/// True when the `kmem_cache_free` tracepoint's third argument names the nf_conntrack
/// kmem_cache. That argument is the cache (`struct kmem_cache *`) from 6.2 on, and the cache's
/// name (`const char *`) before; both are stable per cache, so after the first match it is
/// compared by value.
#[inline(always)]
fn is_ct_cache(arg: u64) -> bool {
    let Some(slot) = CT_CACHE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a slot of a one-element array map, valid for the program's run; a concurrent
    // writer can only store the same cache address.
    let known = unsafe { *slot };
    if known != 0 {
        return known == arg;
    }
    // Not resolved yet: compare the name once per free until the first match.
    let cfg = probe_config();
    let name: u64 = if cfg.kmem_free_arg_cache != 0 {
        read_kernel(arg, cfg.kmem_cache_name)
    } else {
        arg
    };
    let mut buf = [0u8; 16];
    if read_kernel_str(name, &mut buf) != Some(b"nf_conntrack".as_slice()) {
        return false;
    }
    // SAFETY: as above; every CPU that gets here stores the same value.
    unsafe { *slot = arg };
    true
}

// A raw tracepoint, not tp_btf: 6.1's verifier refuses tp_btf reads of the `const void *`
// argument ("arg1 type UNKNOWN is not a struct"); raw tracepoint arguments are plain u64 on
// every kernel.
#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn ct_destroy_kmem_cache_free(ctx: RawTracePointContext) -> u32 {
    if is_ct_cache(ctx.arg::<u64>(2)) {
        report_destroy(NfConn(ctx.arg::<u64>(1)), TP_KMEM_CACHE_FREE);
    }
    0
}
