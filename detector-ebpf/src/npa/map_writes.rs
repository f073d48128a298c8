//! Every write to a watched map, from userspace (the agent) or from a BPF program (the
//! datapath): kprobe and fentry on the LRU hash map's update and delete,
//!
//! - `long htab_lru_map_update_elem(struct bpf_map *map, void *key, void *value, u64 map_flags)`
//! - `long htab_lru_map_delete_elem(struct bpf_map *map, void *key)`
//!
//! The tracepoint backend has no hook inside the hash map code. The kprobes read their
//! arguments from `struct pt_regs` (per architecture, see `conntrack::kprobe`).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use detector_common::{MAX_KEY, MapWriteEvent, counter, kind, map_op};

use super::bpf_syscall::in_watched_syscall;
use super::is_target;
use super::key::key_len;
use crate::emit::{EVENTS, count, current_task_info, probe_config, record_header};
use crate::kernel::{BpfMap, now_ns, read_kernel_bytes};

/// Reports a write to a watched map; `map` and `key` are kernel pointers.
#[inline(always)]
fn report_map_write(map: u64, key: u64, op: u8) {
    let cfg = probe_config();
    let map = BpfMap(map);
    let map_id = map.id(&cfg);
    if !is_target(map_id) {
        return;
    }
    let key_size = map.key_size(&cfg);
    let Some(mut entry) = EVENTS.reserve::<MapWriteEvent>(0) else {
        count(counter::LOST_BASE + u32::from(kind::MAP_WRITE));
        return;
    };
    // SAFETY: a fresh, exclusive reservation, aligned and sized for a MapWriteEvent by
    // `reserve::<MapWriteEvent>`; every field is written below before it is submitted.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = record_header(
        kind::MAP_WRITE,
        core::mem::size_of::<MapWriteEvent>(),
        now_ns(),
    );
    ev.task = current_task_info();
    ev.map_id = map_id;
    ev.op = op;
    ev.from_syscall = u8::from(in_watched_syscall(bpf_get_current_pid_tgid()));
    ev._pad = [0; 6];
    ev.key = [0; MAX_KEY];
    let n = key_len(key_size);
    ev.key_size = n as u32;
    if n > 0 {
        let _ = read_kernel_bytes(key, &mut ev.key[..n]);
    }
    entry.submit(0);
}

#[kprobe]
pub fn map_update_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(map), Some(key)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        report_map_write(map, key, map_op::UPDATE);
    }
    0
}

#[kprobe]
pub fn map_delete_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(map), Some(key)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        report_map_write(map, key, map_op::DELETE);
    }
    0
}

#[fentry(function = "htab_lru_map_update_elem")]
pub fn map_update_fentry(ctx: FEntryContext) -> u32 {
    report_map_write(ctx.arg::<u64>(0), ctx.arg::<u64>(1), map_op::UPDATE);
    0
}

#[fentry(function = "htab_lru_map_delete_elem")]
pub fn map_delete_fentry(ctx: FEntryContext) -> u32 {
    report_map_write(ctx.arg::<u64>(0), ctx.arg::<u64>(1), map_op::DELETE);
    0
}
