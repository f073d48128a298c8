//! Conntrack NEW/DESTROY for every backend.
//!
//! | backend    | NEW                                              | DESTROY                              |
//! |------------|--------------------------------------------------|--------------------------------------|
//! | tracepoint | first skb seen carrying a confirmed `_nfct`      | raw_tp kmem_cache_free (nf_conntrack) |
//! | kprobe     | kprobe + kretprobe `__nf_conntrack_confirm`      | kprobe `nf_ct_destroy`                |
//! | fentry     | fexit `__nf_conntrack_confirm`                   | fentry `nf_ct_destroy`                |
//!
//! All of them funnel into [`report_new`] / [`report_destroy`], which read the entry the same way.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, map, raw_tracepoint},
    maps::{Array, HashMap},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext,
        RetProbeContext,
    },
};
use detector_common::{
    CtEvent, FlowKey, ProbeConfig, Tuple, counter, ips, kind, reason,
    source::*,
};

use crate::emit::{bump, config, header, output, task};

/// Confirmed entries already reported (nf_conn address -> kernel ts of their NEW). Dedupes the
/// skb-based insert probe, and gives DESTROY the birth time so (address, born) names one
/// lifetime. Removed on destroy. Userspace sizes it to the conntrack table before load. A
/// plain hash, not an LRU: a full table must fail (and be counted), not silently forget a
/// live entry and report it again as new.
#[map]
pub static SEEN: HashMap<u64, u64> = HashMap::with_max_entries(262_144, 0);

/// Address of the `nf_conntrack` kmem_cache, found by name on the first conntrack free and
/// compared by pointer from then on (kmem_cache_free fires for every slab free on the machine).
#[map]
static CT_CACHE: Array<u64> = Array::with_max_entries(1, 0);

/// Flow index for the delete-time liveness check: a tuple the agent may key the flow by ->
/// the entry's kernel address. Holds each entry's original tuple and, when the reply comes
/// from another address (DNAT), `orig.src:sport -> reply.src:sport`, as NPA's cleanup builds
/// them, per network namespace. Written at NEW, removed at DESTROY (only if it still names that
/// entry). A plain hash for the same reason as SEEN.
#[map]
pub static FLOWS: HashMap<FlowKey, u64> = HashMap::with_max_entries(524_288, 0);

/// kprobe backend: the skb passed to `__nf_conntrack_confirm`, for the kretprobe. Keyed by
/// task and CPU: confirms in softirq run in whatever task was interrupted (the idle task, pid
/// 0, on every idle CPU), and entry and return happen on one CPU.
#[map]
static CONFIRM_SKB: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
fn confirm_key() -> u64 {
    bpf_get_current_pid_tgid() | (u64::from(unsafe { bpf_get_smp_processor_id() }) << 56)
}

const NF_ACCEPT: i32 = 1;
/// `_nfct` keeps `enum ip_conntrack_info` in its low three bits (NFCT_INFOMASK).
const NFCT_PTRMASK: u64 = !7;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

#[inline(always)]
pub fn read<T: Copy + Default>(base: u64, off: u32) -> T {
    match unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) } {
        Ok(v) => v,
        Err(_) => {
            bump(counter::READ_FAILED);
            T::default()
        }
    }
}

#[inline(always)]
fn read_tuple(t: u64, cfg: &ProbeConfig) -> Tuple {
    Tuple {
        family: read::<u16>(t, cfg.tuple_l3num) as u8,
        proto: read::<u8>(t, cfg.tuple_protonum),
        // `u.all` is __be16.
        src_port: u16::from_be(read::<u16>(t, cfg.tuple_src_port)),
        dst_port: u16::from_be(read::<u16>(t, cfg.tuple_dst_port)),
        _pad: 0,
        src_addr: read::<[u8; 16]>(t, cfg.tuple_src_addr),
        dst_addr: read::<[u8; 16]>(t, cfg.tuple_dst_addr),
    }
}

#[inline(always)]
fn netns_of(ct: u64, cfg: &ProbeConfig) -> u32 {
    let net: u64 = read(ct, cfg.ct_net);
    if net == 0 {
        return 0;
    }
    read(net, cfg.net_ns_inum)
}

#[inline(always)]
pub fn status_of(ct: u64, cfg: &ProbeConfig) -> u64 {
    read(ct, cfg.ct_status)
}

/// Builds and emits one record for entry `ct`.
/// The tuple NPA's cleanup derives for a DNAT'd flow, if the entry is one.
#[inline(always)]
fn dnat_form(orig: &Tuple, reply: &Tuple) -> Option<Tuple> {
    if reply.src_addr == orig.dst_addr {
        return None;
    }
    Some(Tuple {
        dst_addr: reply.src_addr,
        dst_port: reply.src_port,
        ..*orig
    })
}

#[inline(always)]
fn flow_key(tuple: &Tuple, netns: u32) -> FlowKey {
    FlowKey {
        tuple: *tuple,
        netns,
        _pad: 0,
    }
}

#[inline(always)]
fn index_flow(ct: u64, orig: &Tuple, reply: &Tuple, netns: u32) {
    if FLOWS.insert(&flow_key(orig, netns), &ct, 0).is_err() {
        bump(counter::FLOWS_FULL);
    }
    if let Some(d) = dnat_form(orig, reply)
        && FLOWS.insert(&flow_key(&d, netns), &ct, 0).is_err()
    {
        bump(counter::FLOWS_FULL);
    }
}

#[inline(always)]
fn unindex_flow(ct: u64, orig: &Tuple, reply: &Tuple, netns: u32) {
    // A newer entry may already own the tuple (port reuse: the old entry can be freed after
    // its successor was confirmed); only remove mappings that still name this entry.
    let k = flow_key(orig, netns);
    if unsafe { FLOWS.get(&k) }.copied() == Some(ct) {
        let _ = FLOWS.remove(&k);
    }
    if let Some(d) = dnat_form(orig, reply) {
        let k = flow_key(&d, netns);
        if unsafe { FLOWS.get(&k) }.copied() == Some(ct) {
            let _ = FLOWS.remove(&k);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_ct(
    k: u8,
    ct: u64,
    orig: &Tuple,
    reply: &Tuple,
    netns: u32,
    status: u64,
    born_ns: u64,
    ts_ns: u64,
    src: u8,
    cfg: &ProbeConfig,
) {
    let jiffies = unsafe { bpf_jiffies64() };
    let timeout: u32 = read(ct, cfg.ct_timeout);
    // ct->timeout is an absolute u32 jiffies value (nfct_time_stamp is jiffies truncated).
    let timeout_left = timeout.wrapping_sub(jiffies as u32) as i32;
    let why = if k != kind::CT_DESTROY {
        reason::NONE
    } else if timeout_left <= 0 {
        reason::EXPIRED
    } else {
        reason::KILLED
    };
    let ev = CtEvent {
        hdr: header(k, core::mem::size_of::<CtEvent>(), ts_ns),
        orig: *orig,
        reply: *reply,
        ct_addr: ct,
        born_ns,
        jiffies,
        status: status as u32,
        netns,
        timeout_left,
        reason: why,
        source: src,
        _pad: 0,
        task: task(),
    };
    output(k, &ev);
}

/// A confirmed entry was seen for the first time: remember it and emit NEW.
#[inline(always)]
fn report_new(ct: u64, src: u8) {
    if ct == 0 {
        return;
    }
    let cfg = config();
    let status = status_of(ct, &cfg);
    if status & ips::CONFIRMED == 0 {
        return;
    }
    // Fast path for every later packet of the flow.
    if unsafe { SEEN.get(&ct) }.is_some() {
        return;
    }
    let netns = netns_of(ct, &cfg);
    if cfg.netns_filter != 0 && netns != cfg.netns_filter {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match SEEN.insert(&ct, &now, BPF_NOEXIST) {
        Ok(()) => {}
        // Another CPU reported it between our lookup and insert.
        Err(e) if e == -EEXIST => return,
        // Table full: reporting it anyway would report it again on every packet. Counted,
        // and userspace treats the count as lost records.
        Err(_) => {
            bump(counter::SEEN_FULL);
            return;
        }
    }
    let orig = read_tuple(ct + cfg.ct_tuple_orig as u64, &cfg);
    let reply = read_tuple(ct + cfg.ct_tuple_reply as u64, &cfg);
    index_flow(ct, &orig, &reply, netns);
    emit_ct(kind::CT_NEW, ct, &orig, &reply, netns, status, now, now, src, &cfg);
}

/// A confirmed entry is being destroyed: emit DESTROY with its birth time, forget it.
#[inline(always)]
fn report_destroy(ct: u64, src: u8) {
    if ct == 0 {
        return;
    }
    let cfg = config();
    let status = status_of(ct, &cfg);
    // Entries that were allocated but never confirmed (e.g. a lost clash, a packet after
    // expiry that was dropped) are freed too; they were never in the table.
    if status & ips::CONFIRMED == 0 {
        return;
    }
    let born = unsafe { SEEN.get(&ct) }.copied().unwrap_or(0);
    if born != 0 {
        let _ = SEEN.remove(&ct);
    }
    let netns = netns_of(ct, &cfg);
    if cfg.netns_filter != 0 && netns != cfg.netns_filter {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let orig = read_tuple(ct + cfg.ct_tuple_orig as u64, &cfg);
    let reply = read_tuple(ct + cfg.ct_tuple_reply as u64, &cfg);
    unindex_flow(ct, &orig, &reply, netns);
    emit_ct(kind::CT_DESTROY, ct, &orig, &reply, netns, status, born, now, src, &cfg);
}

#[inline(always)]
fn ct_of_skb(skb: u64) -> u64 {
    let cfg = config();
    let nfct: u64 = read(skb, cfg.skb_nfct);
    nfct & NFCT_PTRMASK
}

// ------------------------------------------------------------------ tracepoint backend

#[btf_tracepoint(function = "net_dev_queue")]
pub fn ct_new_net_dev_queue(ctx: BtfTracePointContext) -> u32 {
    report_new(ct_of_skb(ctx.arg::<u64>(0)), TP_NET_DEV_QUEUE);
    0
}

#[btf_tracepoint(function = "consume_skb")]
pub fn ct_new_consume_skb(ctx: BtfTracePointContext) -> u32 {
    report_new(ct_of_skb(ctx.arg::<u64>(0)), TP_CONSUME_SKB);
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn ct_new_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    report_new(ct_of_skb(ctx.arg::<u64>(0)), TP_KFREE_SKB);
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
    let known = unsafe { *slot };
    if known != 0 {
        return known == arg;
    }
    // Not resolved yet: compare the name once per free until the first match.
    let cfg = config();
    let name: u64 = if cfg.kmem_free_arg_cache != 0 {
        read(arg, cfg.kmem_cache_name)
    } else {
        arg
    };
    let mut buf = [0u8; 16];
    let Ok(s) = (unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, &mut buf) }) else {
        return false;
    };
    if s != b"nf_conntrack" {
        return false;
    }
    unsafe { *slot = arg };
    true
}

// kmem_cache_free(unsigned long call_site, const void *ptr, <cache or its name>):
// nf_conntrack_free() hands the still-intact entry to the slab here. A raw tracepoint, not
// tp_btf: 6.1's verifier refuses tp_btf reads of the `const void *` argument ("arg1 type
// UNKNOWN is not a struct"); raw tracepoint arguments are plain u64 on every kernel.
#[raw_tracepoint(tracepoint = "kmem_cache_free")]
pub fn ct_destroy_kmem_cache_free(ctx: RawTracePointContext) -> u32 {
    if is_ct_cache(ctx.arg::<u64>(2)) {
        report_destroy(ctx.arg::<u64>(1), TP_KMEM_CACHE_FREE);
    }
    0
}

// ------------------------------------------------------------------ kprobe backend

// int __nf_conntrack_confirm(struct sk_buff *skb)
#[kprobe]
pub fn ct_confirm_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(0) {
        if CONFIRM_SKB.insert(&confirm_key(), &skb, 0).is_err() {
            bump(counter::CONFIRM_FULL);
        }
    }
    0
}

#[kretprobe]
pub fn ct_confirm_kretprobe(ctx: RetProbeContext) -> u32 {
    let key = confirm_key();
    let Some(skb) = (unsafe { CONFIRM_SKB.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONFIRM_SKB.remove(&key);
    if ctx.ret::<i32>() == NF_ACCEPT {
        // Read _nfct after the call: clash resolution may have swapped in the existing entry.
        report_new(ct_of_skb(skb), KRETPROBE_CONFIRM);
    }
    0
}

// void nf_ct_destroy(struct nf_conntrack *nfct): nfct is &ct->ct_general, at offset 0.
#[kprobe]
pub fn ct_destroy_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<u64>(0) {
        report_destroy(ct, KPROBE_DESTROY);
    }
    0
}

// ------------------------------------------------------------------ fentry backend

#[fexit(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_fexit(ctx: FExitContext) -> u32 {
    if ctx.ret::<i32>() == Ok(NF_ACCEPT) {
        report_new(ct_of_skb(ctx.arg::<u64>(0)), FEXIT_CONFIRM);
    }
    0
}

#[fentry(function = "nf_ct_destroy")]
pub fn ct_destroy_fentry(ctx: FEntryContext) -> u32 {
    report_destroy(ctx.arg::<u64>(0), FENTRY_DESTROY);
    0
}

