//! kprobe backend:
//!
//! - NEW: kprobe + kretprobe on `int __nf_conntrack_confirm(struct sk_buff *skb)`: the skb is
//!   remembered at entry, its `_nfct` read at return when the verdict is NF_ACCEPT.
//! - DESTROY: kprobe on `void nf_ct_destroy(struct nf_conntrack *nfct)`.
//!
//! Arguments and return values come from `struct pt_regs`, whose layout is per architecture:
//! aya-ebpf picks the registers by the `bpf_target_arch` cfg (see `detector/build.rs`).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{kprobe, kretprobe, map},
    maps::HashMap,
    programs::{ProbeContext, RetProbeContext},
};
use detector_common::{
    counter,
    source::{KPROBE_DESTROY, KRETPROBE_CONFIRM},
};

use super::{NF_ACCEPT, report_destroy, report_new};
use crate::emit::{config_u32, count};
use crate::kernel::{NfConn, Skb, cpu_id};

/// The skb passed to `__nf_conntrack_confirm`, for the kretprobe. Keyed by task and CPU:
/// confirms in softirq run in whatever task was interrupted (the idle task, pid 0, on every
/// idle CPU), and entry and return happen on one CPU.
#[map]
static CONFIRM_SKB: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
fn confirm_key() -> u64 {
    bpf_get_current_pid_tgid() | (u64::from(cpu_id()) << 56)
}

#[kprobe]
pub fn ct_confirm_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(0)
        && CONFIRM_SKB.insert(&confirm_key(), &skb, 0).is_err()
    {
        count(counter::CONFIRM_FULL);
    }
    0
}

#[kretprobe]
pub fn ct_confirm_kretprobe(ctx: RetProbeContext) -> u32 {
    let key = confirm_key();
    // SAFETY: the value is copied out at once, and only this task on this CPU writes the key.
    let Some(skb) = (unsafe { CONFIRM_SKB.get(&key) }).copied() else {
        return 0;
    };
    let _ = CONFIRM_SKB.remove(&key);
    if ctx.ret::<i32>() == NF_ACCEPT {
        // Read _nfct after the call: clash resolution may have swapped in the existing entry.
        report_new(
            Skb(skb).nfct(config_u32(|c| &c.skb_nfct)).entry(),
            KRETPROBE_CONFIRM,
        );
    }
    0
}

// `nfct` is `&ct->ct_general`, at offset 0 of `struct nf_conn`.
#[kprobe]
pub fn ct_destroy_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(ct) = ctx.arg::<u64>(0) {
        report_destroy(NfConn(ct), KPROBE_DESTROY);
    }
    0
}
