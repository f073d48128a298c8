//! The flow index: a tuple the agent may key a flow by -> the kernel address of its conntrack
//! entry, written at NEW and removed at DESTROY, so the delete-time liveness check can find
//! the entry a deleted key belongs to.

use aya_ebpf::{macros::map, maps::HashMap};
use detector_common::{FlowKey, Tuple, counter};

use crate::emit::count;
use crate::kernel::NfConn;

/// Holds each entry's original tuple and, when the reply comes from another address (DNAT),
/// `orig.src:sport -> reply.src:sport`, as NPA's cleanup builds them, per network namespace.
/// Removed at DESTROY only if it still names that entry. A plain hash, not an LRU: a full
/// table must fail (and be counted), not silently forget a live entry.
#[map]
pub static FLOWS: HashMap<FlowKey, u64> = HashMap::with_max_entries(524_288, 0);

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
pub fn flow_key(tuple: &Tuple, netns: u32) -> FlowKey {
    FlowKey {
        tuple: *tuple,
        netns,
        _pad: 0,
    }
}

/// The same flow seen from the other end.
#[inline(always)]
pub fn reverse(t: &Tuple) -> Tuple {
    Tuple {
        src_addr: t.dst_addr,
        dst_addr: t.src_addr,
        src_port: t.dst_port,
        dst_port: t.src_port,
        ..*t
    }
}

/// The entry indexed under `key`, if any.
#[inline(always)]
pub fn entry_of(key: &FlowKey) -> Option<NfConn> {
    // SAFETY: the value is copied out at once; a concurrent update of a u64 slot cannot tear.
    unsafe { FLOWS.get(key) }.copied().map(NfConn)
}

/// Indexes a new entry under its original tuple and, for DNAT, the tuple NPA derives.
#[inline(always)]
pub fn add_flow(ct: NfConn, orig: &Tuple, reply: &Tuple, netns: u32) {
    if FLOWS.insert(&flow_key(orig, netns), &ct.0, 0).is_err() {
        count(counter::FLOWS_FULL);
    }
    if let Some(d) = dnat_form(orig, reply)
        && FLOWS.insert(&flow_key(&d, netns), &ct.0, 0).is_err()
    {
        count(counter::FLOWS_FULL);
    }
}

/// Removes a destroyed entry's mappings.
#[inline(always)]
pub fn remove_flow(ct: NfConn, orig: &Tuple, reply: &Tuple, netns: u32) {
    // A newer entry may already own the tuple (port reuse: the old entry can be freed after
    // its successor was confirmed); only remove mappings that still name this entry.
    let k = flow_key(orig, netns);
    if entry_of(&k) == Some(ct) {
        let _ = FLOWS.remove(&k);
    }
    if let Some(d) = dnat_form(orig, reply) {
        let k = flow_key(&d, netns);
        if entry_of(&k) == Some(ct) {
            let _ = FLOWS.remove(&k);
        }
    }
}
