//! Tracepoint backend (no kprobes, no trampolines: works wherever BTF does).
//!
//! - NEW: tp_btf `net_dev_queue(struct sk_buff *skb)`, `consume_skb(struct sk_buff *skb, ...)`
//!   and `kfree_skb(struct sk_buff *skb, ...)`: the first packet seen carrying a confirmed
//!   entry in `skb->_nfct`, looked for only in packets that can be that first one (see
//!   [`may_be_first_sighting`]).
//! - DESTROY: raw tracepoint `kmem_cache_free(unsigned long call_site, const void *ptr,
//!   <struct kmem_cache *s from 6.2, const char *name before>)`: nf_conntrack_free() hands the
//!   still-intact entry to its slab here.

use aya_ebpf::{
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::Array,
    programs::{BtfTracePointContext, RawTracePointContext},
};
use detector_common::counter;
use detector_common::source::{TP_CONSUME_SKB, TP_KFREE_SKB, TP_KMEM_CACHE_FREE, TP_NET_DEV_QUEUE};

use super::{report_destroy, report_new};
use crate::emit::{config_u32, count};
use crate::kernel::{IP_CT_ESTABLISHED, NfConn, Nfct, Skb, read_kernel, read_kernel_str};

/// Address of the `nf_conntrack` kmem_cache, found by name on the first conntrack free and
/// compared by pointer from then on (kmem_cache_free fires for every slab free on the machine).
#[map]
static CT_CACHE: Array<u64> = Array::with_max_entries(1, 0);

/// Slots of [`OTHER_CACHES`].
const OTHER_CACHE_SLOTS: u32 = 256;

/// Until the first conntrack free resolves `CT_CACHE`, caches already found not to be
/// nf_conntrack, direct-mapped by address: without it every slab free on the machine reads a
/// cache name until then (about 100 ns each), and a node with idle flows may free no
/// conntrack entry for minutes. Only an exact match counts, so a collision or a racing write
/// (a whole u64, always a checked non-conntrack cache) costs a name read, never a miss.
#[map]
static OTHER_CACHES: Array<u64> = Array::with_max_entries(OTHER_CACHE_SLOTS, 0);

/// Whether a packet carrying `nfct` can be the first one of its entry these probes see after
/// the entry was confirmed; the others leave before any map operation.
///
/// Only IP_CT_ESTABLISHED packets (original direction, after a reply) are skipped. The reply
/// that made them ESTABLISHED came after the confirm (an unconfirmed entry is in no hash
/// table, so no reply can find it), and these probes saw it or the original direction's
/// confirmed NEW packet:
/// - a locally originated or forwarded flow: its first packet leaves through a device
///   (net_dev_queue, with IP_CT_NEW, after POSTROUTING confirmed it), or is freed
///   (kfree_skb/consume_skb) still carrying the entry;
/// - a locally terminated flow: its inbound packets lose the entry before any of these probes
///   (tcp_v4_rcv and udp_queue_rcv_one_skb call nf_reset_ct before the socket queues them,
///   and a namespace crossing scrubs it), so its first sighting is the local reply, leaving
///   with IP_CT_ESTABLISHED_REPLY. Reply packets are therefore never skipped;
/// - RELATED/RELATED_REPLY (an expected flow's first packet, ICMP errors) and NEW are kept.
///
/// A flow whose NEW sighting failed (dedupe table full, counted as lost) is retried only by
/// its later NEW or reply packets, not by its ESTABLISHED ones.
#[inline(always)]
fn may_be_first_sighting(nfct: Nfct) -> bool {
    nfct.info() != IP_CT_ESTABLISHED
}

#[inline(always)]
fn report_skb(skb: u64, source: u8) {
    let nfct = Skb(skb).nfct(config_u32(|c| &c.skb_nfct));
    if may_be_first_sighting(nfct) {
        report_new(nfct.entry(), source);
    }
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
/// compared by value, first thing: this runs for every slab free on the machine.
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
    // kmem_cache structs are a few hundred bytes apart: the bits above 7 tell them apart.
    let other = OTHER_CACHES.get_ptr_mut(((arg >> 7) ^ (arg >> 15)) as u32 % OTHER_CACHE_SLOTS);
    if let Some(other) = other {
        // SAFETY: a slot of an array map, valid for the program's run; a u64 load.
        if unsafe { *other } == arg {
            return false;
        }
    }
    match cache_name_is_ct(arg) {
        Some(true) => {
            // SAFETY: as above; every CPU that gets here stores the same value.
            unsafe { *slot = arg };
            true
        }
        Some(false) => {
            if let Some(other) = other {
                // SAFETY: as above; a u64 store of a cache whose name was read and is not
                // nf_conntrack.
                unsafe { *other = arg };
            }
            false
        }
        // The name could not be read: not remembered, so the next free asks again (a cache
        // remembered wrongly would hide every conntrack free for good).
        None => false,
    }
}

/// The slow path of [`is_ct_cache`] until the first conntrack free: whether the cache's name
/// is `nf_conntrack`, `None` when the name could not be read.
#[inline(always)]
fn cache_name_is_ct(arg: u64) -> Option<bool> {
    let name: u64 = if config_u32(|c| &c.kmem_free_arg_cache) != 0 {
        read_kernel(arg, config_u32(|c| &c.kmem_cache_name))
    } else {
        arg
    };
    if name == 0 {
        // The failed pointer read was counted by read_kernel.
        return None;
    }
    let mut buf = [0u8; 16];
    let read = read_kernel_str(name, &mut buf).map(|n| n == b"nf_conntrack".as_slice());
    if read.is_none() {
        // A free skipped unread may have been a conntrack entry's: counted, so the run's
        // read_failed (/metrics, the summary) shows it.
        count(counter::READ_FAILED);
    }
    read
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
