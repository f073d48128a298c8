//! fentry backend (BPF trampolines):
//!
//! - NEW: fexit `int __nf_conntrack_confirm(struct sk_buff *skb)` when it returns NF_ACCEPT.
//! - DESTROY: fentry `void nf_ct_destroy(struct nf_conntrack *nfct)` (`nfct` is
//!   `&ct->ct_general`, at offset 0 of `struct nf_conn`).
//!
//! Trampoline arguments are a u64 array on every architecture: nothing here is per-arch.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use detector_common::source::{FENTRY_DESTROY, FEXIT_CONFIRM};

use super::{NF_ACCEPT, report_destroy, report_new};
use crate::emit::config_u32;
use crate::kernel::{NfConn, Skb};

#[fexit(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_fexit(ctx: FExitContext) -> u32 {
    if ctx.ret::<i32>() == Ok(NF_ACCEPT) {
        report_new(
            Skb(ctx.arg::<u64>(0))
                .nfct(config_u32(|c| &c.skb_nfct))
                .entry(),
            FEXIT_CONFIRM,
        );
    }
    0
}

#[fentry(function = "nf_ct_destroy")]
pub fn ct_destroy_fentry(ctx: FEntryContext) -> u32 {
    report_destroy(NfConn(ctx.arg::<u64>(0)), FENTRY_DESTROY);
    0
}
