//! The agent's (NPA's) conntrack-cache map, seen from the kernel: its userspace deletes at
//! bpf(2) ([`bpf_syscall`]) and every write to it ([`map_writes`]), with the kernel's liveness
//! verdict for the key's flow taken at the delete.
//!
//! Userspace names the watched maps in `TARGETS` with their key layout; [`key`] decodes keys
//! with it.

pub mod bpf_syscall;
pub mod key;
pub mod map_writes;

use aya_ebpf::{macros::map, maps::HashMap};
use detector_common::{FlowKey, MapDeleteEvent, ProbeConfig, TargetMap, ips, tcp_state, view};

use crate::conntrack::born_ns;
use crate::conntrack::index::{entry_of, reverse};
use crate::kernel::jiffies;

/// Watched maps by id, written by userspace (and rewritten when the agent re-creates its map).
#[map]
static TARGETS: HashMap<u32, TargetMap> = HashMap::with_max_entries(16, 0);

/// The watched map with id `map_id`, if it is one.
#[inline(always)]
pub fn target(map_id: u32) -> Option<TargetMap> {
    // SAFETY: the value is copied out at once; userspace rewrites an entry only when the agent
    // re-creates its map, and a torn copy would only mis-decode that one key.
    unsafe { TARGETS.get(&map_id) }.copied()
}

/// True if `map_id` is watched.
#[inline(always)]
pub fn is_target(map_id: u32) -> bool {
    // SAFETY: only the presence of the value is tested; it is not read.
    unsafe { TARGETS.get(&map_id) }.is_some()
}

/// Fills the record's view of the key's conntrack entry: live, expired, or absent from the
/// flow index (looked up in both directions), and for TCP its conntrack state, which tells a
/// closed connection (whose key may go) from one that still carries packets. The entry is
/// looked up in the target's namespace, or, when it names none, in `task_netns`, the deleting
/// task's: the agent dumps the conntrack table of its own namespace.
#[inline(always)]
pub fn take_view(ev: &mut MapDeleteEvent, t: &TargetMap, cfg: &ProbeConfig, task_netns: u32) {
    ev.ct_tcp_state = tcp_state::UNKNOWN;
    ev.judged_netns = if t.netns != 0 { t.netns } else { task_netns };
    let Some(tuple) = key::key_tuple(&ev.key, t) else {
        ev.view = view::UNKNOWN;
        return;
    };
    let key = FlowKey {
        tuple,
        netns: ev.judged_netns,
        _pad: 0,
    };
    let reversed = FlowKey {
        tuple: reverse(&tuple),
        ..key
    };
    let (ct, rev) = match entry_of(&key) {
        Some(ct) => (ct, 0),
        None => match entry_of(&reversed) {
            Some(ct) => (ct, 1),
            None => {
                ev.view = view::ABSENT;
                return;
            }
        },
    };
    let status = ct.status(cfg);
    let left = ct.timeout_left(cfg, jiffies());
    ev.view = if status & ips::CONFIRMED != 0 && status & ips::DYING == 0 && left > 0 {
        view::LIVE
    } else {
        view::EXPIRED
    };
    ev.view_reversed = rev;
    ev.ct_addr = ct.0;
    ev.ct_born_ns = born_ns(ct);
    ev.ct_timeout_left = left;
    ev.ct_status = status as u32;
    ev.ct_tcp_state = if tuple.proto == IPPROTO_TCP {
        ct.tcp_state(cfg)
    } else {
        tcp_state::UNKNOWN
    };
}

const IPPROTO_TCP: u8 = 6;
