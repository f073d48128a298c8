//! Conntrack NEW/DESTROY for every backend.
//!
//! | backend    | NEW                                              | DESTROY                               |
//! |------------|--------------------------------------------------|---------------------------------------|
//! | tracepoint | first skb seen carrying a confirmed `_nfct`      | raw_tp kmem_cache_free (nf_conntrack) |
//! | kprobe     | kprobe + kretprobe `__nf_conntrack_confirm`      | kprobe `nf_ct_destroy`                |
//! | fentry     | fexit `__nf_conntrack_confirm`                   | fentry `nf_ct_destroy`                |
//!
//! All of them funnel into [`report_new`] / [`report_destroy`], which read the entry the same
//! way and keep the flow [`index`] in step.

pub mod fentry;
pub mod index;
pub mod kprobe;
pub mod tracepoint;

use aya_ebpf::{macros::map, maps::HashMap};
use detector_common::{CtEvent, ProbeConfig, Tuple, counter, ips, kind, reason};

use crate::emit::{
    config_u32, count, current_task_info, probe_config, record_header, submit_record,
};
use crate::kernel::{NfConn, jiffies, now_ns};

/// Confirmed entries already reported (nf_conn address -> kernel ts of their NEW). Dedupes the
/// skb-based insert probe, and gives DESTROY the birth time so (address, born) names one
/// lifetime. Removed on destroy. Userspace sizes it to the conntrack table before load. A
/// plain hash, not an LRU: a full table must fail (and be counted), not silently forget a
/// live entry and report it again as new.
#[map]
pub static SEEN: HashMap<u64, u64> = HashMap::with_max_entries(262_144, 0);

/// The netfilter verdict `__nf_conntrack_confirm` returns for a packet that goes on.
const NF_ACCEPT: i32 = 1;

/// `BPF_NOEXIST` map update flag: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Birth time (kernel ns) of the reported entry `ct`, 0 if it was never reported.
#[inline(always)]
pub fn born_ns(ct: NfConn) -> u64 {
    // SAFETY: the value is copied out at once; a concurrent update of a u64 slot cannot tear.
    unsafe { SEEN.get(&ct.0) }.copied().unwrap_or(0)
}

/// What a NEW or DESTROY record says about one entry.
struct CtSighting {
    kind: u8,
    ct: NfConn,
    orig: Tuple,
    reply: Tuple,
    netns: u32,
    status: u64,
    born_ns: u64,
    ts_ns: u64,
    source: u8,
}

#[inline(always)]
fn emit_ct(s: &CtSighting, cfg: &ProbeConfig) {
    let jiffies = jiffies();
    let timeout_left = s.ct.timeout_left(cfg, jiffies);
    let why = if s.kind != kind::CT_DESTROY {
        reason::NONE
    } else if timeout_left <= 0 {
        reason::EXPIRED
    } else {
        reason::KILLED
    };
    let ev = CtEvent {
        hdr: record_header(s.kind, core::mem::size_of::<CtEvent>(), s.ts_ns),
        orig: s.orig,
        reply: s.reply,
        ct_addr: s.ct.0,
        born_ns: s.born_ns,
        jiffies,
        status: s.status as u32,
        netns: s.netns,
        timeout_left,
        reason: why,
        source: s.source,
        _pad: 0,
        task: current_task_info(),
        expiry_ns: expiry_ns(s.ts_ns, timeout_left, cfg),
    };
    submit_record(s.kind, &ev);
}

/// Kernel time at which an entry with `timeout_left` jiffies to go at `now` times out (or
/// timed out, when negative). The jiffy that made it expire ticked at or before `now`, so
/// for an expired entry this is at most one jiffy late and never after `now`. 0 when
/// userspace could not measure the tick length.
#[inline(always)]
fn expiry_ns(now: u64, timeout_left: i32, cfg: &ProbeConfig) -> u64 {
    if cfg.ns_per_jiffy == 0 {
        return 0;
    }
    let delta = i64::from(timeout_left) * i64::from(cfg.ns_per_jiffy);
    (now as i64).saturating_add(delta).max(0) as u64
}

/// The entry's status bits, if `ct` is a confirmed entry. Entries that were allocated but
/// never confirmed (a lost clash, a packet after expiry that was dropped) are freed too, but
/// were never in the table, so neither NEW nor DESTROY reports them. Reads one config field,
/// not the whole configuration: this runs for every tracked packet.
#[inline(always)]
fn confirmed_status(ct: NfConn) -> Option<u64> {
    if ct.is_null() {
        return None;
    }
    let status = ct.status_at(config_u32(|c| &c.ct_status));
    (status & ips::CONFIRMED != 0).then_some(status)
}

/// A confirmed entry was seen for the first time: remember it and emit NEW.
#[inline(always)]
pub fn report_new(ct: NfConn, source: u8) {
    let Some(status) = confirmed_status(ct) else {
        return;
    };
    // Fast path for every later packet of the flow.
    // SAFETY: only the presence of the value is tested; it is not read.
    if unsafe { SEEN.get(&ct.0) }.is_some() {
        return;
    }
    // Something to report (or a flow of another namespace): the one copy of the configuration.
    let cfg = probe_config();
    let netns = ct.netns(&cfg);
    if cfg.netns_filter != 0 && netns != cfg.netns_filter {
        return;
    }
    let now = now_ns();
    match SEEN.insert(&ct.0, &now, BPF_NOEXIST) {
        Ok(()) => {}
        // Another CPU reported it between our lookup and insert.
        Err(e) if e == -EEXIST => return,
        // Table full: reporting it anyway would report it again on every packet. Counted,
        // and userspace treats the count as lost records.
        Err(_) => {
            count(counter::SEEN_FULL);
            return;
        }
    }
    let orig = ct.orig_tuple(&cfg);
    let reply = ct.reply_tuple(&cfg);
    index::add_flow(ct, &orig, &reply, netns);
    emit_ct(
        &CtSighting {
            kind: kind::CT_NEW,
            ct,
            orig,
            reply,
            netns,
            status,
            born_ns: now,
            ts_ns: now,
            source,
        },
        &cfg,
    );
}

/// A confirmed entry is being destroyed: emit DESTROY with its birth time, forget it.
#[inline(always)]
pub fn report_destroy(ct: NfConn, source: u8) {
    let Some(status) = confirmed_status(ct) else {
        return;
    };
    let cfg = probe_config();
    let born = born_ns(ct);
    if born != 0 {
        let _ = SEEN.remove(&ct.0);
    }
    let netns = ct.netns(&cfg);
    if cfg.netns_filter != 0 && netns != cfg.netns_filter {
        return;
    }
    let now = now_ns();
    let orig = ct.orig_tuple(&cfg);
    let reply = ct.reply_tuple(&cfg);
    index::remove_flow(ct, &orig, &reply, netns);
    emit_ct(
        &CtSighting {
            kind: kind::CT_DESTROY,
            ct,
            orig,
            reply,
            netns,
            status,
            born_ns: born,
            ts_ns: now,
            source,
        },
        &cfg,
    );
}
