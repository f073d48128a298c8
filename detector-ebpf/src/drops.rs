//! Victim packets: after a delete of a live flow's key, the first packets of that flow the
//! kernel drops, so the report can name them.
//!
//! tp_btf `kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)`.
//! It fires for every freed packet on the machine, so outside a watch window it returns before
//! touching the packet.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{Array, LruHashMap},
    programs::BtfTracePointContext,
};
use detector_common::{
    AF_INET, AF_INET6, DropWatch, MapDeleteEvent, PacketDropEvent, ProbeConfig, TargetMap, Tuple,
    kind,
};

use crate::conntrack::index::reverse;
use crate::emit::{probe_config, record_header, submit_record};
use crate::kernel::{Skb, now_ns, read_kernel};
use crate::npa::key::key_tuple;

/// Flows whose agent key was deleted while their conntrack entry was live (both directions),
/// so the first replies the policy then drops can be named. Written at such a delete.
#[map]
static DROP_WATCH: LruHashMap<Tuple, DropWatch> = LruHashMap::with_max_entries(4096, 0);

/// Until when (kernel ns) any flow is on the watch list: outside that, kfree_skb returns at
/// once, without parsing headers.
#[map]
static DROP_WATCH_UNTIL: Array<u64> = Array::with_max_entries(1, 0);

/// Drops reported per watched flow (the first few tell the story; a retransmission storm
/// would only fill the ring buffer).
const DROPS_PER_FLOW: u32 = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// The fixed IPv6 header; extension headers are not followed.
const IPV6_HEADER_LEN: u64 = 40;

/// Puts the deleted key's flow (both directions) on the watch list for `drop_watch_ms`.
pub fn watch_drops(ev: &MapDeleteEvent, t: &TargetMap) {
    let Some(tuple) = key_tuple(&ev.key, t) else {
        return;
    };
    let w = DropWatch {
        delete_ns: ev.hdr.ts_ns,
        reported: 0,
        _pad: 0,
    };
    let _ = DROP_WATCH.insert(&tuple, &w, 0);
    let _ = DROP_WATCH.insert(&reverse(&tuple), &w, 0);
    let until = ev.hdr.ts_ns + u64::from(probe_config().drop_watch_ms) * 1_000_000;
    if let Some(u) = DROP_WATCH_UNTIL.get_ptr_mut(0) {
        // SAFETY: a slot of a one-element array map, valid for the program's run. Two CPUs
        // racing here store deadlines nanoseconds apart: either is good.
        unsafe {
            if *u < until {
                *u = until;
            }
        }
    }
}

/// The packet's tuple, read from its network header (IPv4 or IPv6 without extension headers).
#[inline(always)]
fn skb_tuple(skb: Skb, cfg: &ProbeConfig) -> Option<Tuple> {
    let ip = skb.network_header(cfg)?;
    let mut t = Tuple::default();
    let l4 = match skb.protocol(cfg) {
        ETH_P_IP => {
            let vihl: u8 = read_kernel(ip, 0);
            if vihl >> 4 != 4 {
                return None;
            }
            t.family = AF_INET;
            t.proto = read_kernel(ip, 9);
            let s: [u8; 4] = read_kernel(ip, 12);
            let d: [u8; 4] = read_kernel(ip, 16);
            t.src_addr[..4].copy_from_slice(&s);
            t.dst_addr[..4].copy_from_slice(&d);
            ip + u64::from(vihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            t.family = AF_INET6;
            t.proto = read_kernel(ip, 6);
            t.src_addr = read_kernel(ip, 8);
            t.dst_addr = read_kernel(ip, 24);
            ip + IPV6_HEADER_LEN
        }
        _ => return None,
    };
    if t.proto == IPPROTO_TCP || t.proto == IPPROTO_UDP || t.proto == IPPROTO_SCTP {
        t.src_port = u16::from_be(read_kernel::<u16>(l4, 0));
        t.dst_port = u16::from_be(read_kernel::<u16>(l4, 2));
    }
    Some(t)
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn packet_drop_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let now = now_ns();
    if DROP_WATCH_UNTIL.get(0).copied().unwrap_or(0) < now {
        return 0;
    }
    let cfg = probe_config();
    let Some(tuple) = skb_tuple(Skb(ctx.arg::<u64>(0)), &cfg) else {
        return 0;
    };
    let Some(w) = DROP_WATCH.get_ptr_mut(&tuple) else {
        return 0;
    };
    // SAFETY: a map value, valid for the program's run (an LRU eviction frees it only after
    // an RCU grace period); a racing CPU can at worst report one drop more than the cap.
    let w = unsafe { &mut *w };
    if now.saturating_sub(w.delete_ns) > u64::from(cfg.drop_watch_ms) * 1_000_000 {
        // Past the story's window: a later flow on the tuple is not this race's victim.
        let _ = DROP_WATCH.remove(&tuple);
        return 0;
    }
    if w.reported >= DROPS_PER_FLOW {
        return 0;
    }
    w.reported += 1;
    let ev = PacketDropEvent {
        hdr: record_header(
            kind::PACKET_DROP,
            core::mem::size_of::<PacketDropEvent>(),
            now,
        ),
        tuple,
        reason: ctx.arg::<u32>(2),
        _pad: 0,
        delete_ns: w.delete_ns,
    };
    submit_record(kind::PACKET_DROP, &ev);
    0
}
