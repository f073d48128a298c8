//! The agent's userspace deletes on its conntrack map, seen at the bpf(2) syscall, with the
//! kernel's liveness verdict for the key's flow taken at that instant.
//!
//! Tracepoints `syscalls:sys_enter_bpf` (`int cmd, union bpf_attr *uattr, unsigned int size`)
//! and `syscalls:sys_exit_bpf` (`long ret`): they fire only for bpf(2), so other syscalls pay
//! nothing, and they name no syscall number, so they are the same on x86_64 and aarch64 (where
//! bpf(2) is 321 and 280). Field offsets come from the tracefs format files (`ProbeConfig`).
//!
//! At entry the map fd is resolved to a map id in the kernel
//! (`current->files->fdt->fd[fd]->private_data->id`), filtered against `TARGETS`, the key is
//! copied from user memory, decoded with the target's layout and looked up in the flow index;
//! the record waits in `PENDING` until sys_exit_bpf adds the syscall's result and emits it.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_loop},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use detector_common::{MapDeleteEvent, TargetMap, TaskInfo, bpf_cmd, counter, kind, view};

use super::key::key_len;
use super::{take_view, target};
use crate::drops::watch_drops;
use crate::emit::{
    EVENTS, count, count_by, current_task_info, probe_config, record_header, submit_record,
};
use crate::kernel::{current_map_of_fd, current_netns, now_ns, read_user, read_user_bytes};

/// `BPF_MAP_UPDATE_ELEM` (enum bpf_cmd).
const BPF_MAP_UPDATE_ELEM: u32 = 2;

// Offsets in `union bpf_attr` (include/uapi/linux/bpf.h), the same on every architecture: its
// members are __u32 and __aligned_u64 only.
/// Element commands: `struct { __u32 map_fd; __aligned_u64 key; ... }`.
const ATTR_ELEM_MAP_FD: u64 = 0;
const ATTR_ELEM_KEY: u64 = 8;
/// Batch commands: `struct { __aligned_u64 in_batch, out_batch, keys, values; __u32 count;
/// __u32 map_fd; ... } batch`: four u64 then `count`, so `map_fd` sits at 4 * 8 + 4 = 36.
const ATTR_BATCH_KEYS: u64 = 16;
const ATTR_BATCH_COUNT: u64 = 32;
const ATTR_BATCH_MAP_FD: u64 = 36;

/// The most keys of one batch reported key by key: bpf_loop's own limit (1 << 23 iterations).
/// The loader's `max_batch_keys` is the effective cap; more keys are counted in
/// BATCH_TRUNCATED.
const BPF_LOOP_MAX: u32 = 1 << 23;

/// One record under construction per CPU (see `agent_delete_enter`).
#[map]
static SCRATCH: PerCpuArray<MapDeleteEvent> = PerCpuArray::with_max_entries(1, 0);

/// Deletes between syscall entry and exit, by thread.
#[map]
static PENDING: HashMap<u64, MapDeleteEvent> = HashMap::with_max_entries(1024, 0);

/// A batch delete between syscall entry and exit: the keys are read at exit, when the kernel
/// has written back how many it processed.
#[repr(C)]
#[derive(Clone, Copy)]
struct BatchPending {
    ts_ns: u64,
    attr: u64,
    map_id: u32,
    key_size: u32,
    cmd: u32,
    /// The deleting task's network namespace, read at entry.
    task_netns: u32,
    task: TaskInfo,
}

#[map]
static PENDING_BATCH: HashMap<u64, BatchPending> = HashMap::with_max_entries(256, 0);

/// Threads inside a bpf(2) update on a watched map, so the map-write probes can tell the
/// agent's own writes from the datapath's.
#[map]
static IN_BPF_UPDATE: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

/// What the per-key callback of a batch needs.
#[repr(C)]
struct BatchLoop {
    b: BatchPending,
    target: TargetMap,
    keys: u64,
    exit_ns: u64,
    key_size: u32,
    _pad: u32,
}

#[map]
static LOOP: PerCpuArray<BatchLoop> = PerCpuArray::with_max_entries(1, 0);

/// True while thread `pid_tgid` is inside a bpf(2) delete or update of a watched map.
#[inline(always)]
pub fn in_watched_syscall(pid_tgid: u64) -> bool {
    // SAFETY: only the presence of each value is tested; none is read.
    unsafe {
        PENDING.get(&pid_tgid).is_some()
            || PENDING_BATCH.get(&pid_tgid).is_some()
            || IN_BPF_UPDATE.get(&pid_tgid).is_some()
    }
}

/// Reads a u64 field of the tracepoint's record at `off` (from the tracefs format file).
#[inline(always)]
fn tracepoint_field<T>(ctx: &TracePointContext, off: u32) -> Option<T> {
    // SAFETY: read_at copies with bpf_probe_read_kernel from the record the kernel passed,
    // which checks the address; the offsets are the format file's, and `T` is an integer.
    unsafe { ctx.read_at::<T>(off as usize) }.ok()
}

#[tracepoint(category = "syscalls", name = "sys_enter_bpf")]
pub fn agent_delete_enter(ctx: TracePointContext) -> u32 {
    let cfg = probe_config();
    let Some(cmd) = tracepoint_field::<u64>(&ctx, cfg.sys_enter_bpf_cmd) else {
        return 0;
    };
    let cmd = cmd as u32;
    let batch = cmd == bpf_cmd::MAP_DELETE_BATCH || cmd == bpf_cmd::MAP_LOOKUP_AND_DELETE_BATCH;
    let update = cmd == BPF_MAP_UPDATE_ELEM;
    if cmd != bpf_cmd::MAP_DELETE_ELEM
        && cmd != bpf_cmd::MAP_LOOKUP_AND_DELETE_ELEM
        && !batch
        && !update
    {
        return 0;
    }
    let Some(attr) = tracepoint_field::<u64>(&ctx, cfg.sys_enter_bpf_uattr) else {
        return 0;
    };
    let fd_off = if batch {
        ATTR_BATCH_MAP_FD
    } else {
        ATTR_ELEM_MAP_FD
    };
    let Some(fd) = read_user::<u32>(attr + fd_off) else {
        return 0;
    };
    let Some(map) = current_map_of_fd(fd, &cfg) else {
        return 0;
    };
    let (map_id, key_size) = (map.id(&cfg), map.key_size(&cfg));
    let Some(target) = target(map_id) else {
        return 0;
    };
    if update {
        let _ = IN_BPF_UPDATE.insert(&bpf_get_current_pid_tgid(), &1, 0);
        return 0;
    }
    if batch {
        count(counter::BATCH_DELETE);
        let b = BatchPending {
            ts_ns: now_ns(),
            attr,
            map_id,
            key_size,
            cmd,
            task_netns: current_netns(&cfg),
            task: current_task_info(),
        };
        if PENDING_BATCH
            .insert(&bpf_get_current_pid_tgid(), &b, 0)
            .is_err()
        {
            count(counter::PENDING_FULL);
        }
        return 0;
    }
    let Some(key_ptr) = read_user::<u64>(attr + ATTR_ELEM_KEY) else {
        return 0;
    };
    // Built in a per-CPU scratch slot, not on the stack: with the key decoding inlined the
    // program's stack passed the 512-byte limit on 6.1 ("combined stack size ... Too large").
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot of a per-CPU array, and programs do not nest on one CPU (see
    // `emit::count_by`): nothing else holds a reference to it.
    let ev = unsafe { &mut *slot };
    *ev = MapDeleteEvent::ZERO;
    ev.hdr = record_header(
        kind::MAP_DELETE,
        core::mem::size_of::<MapDeleteEvent>(),
        now_ns(),
    );
    ev.task = current_task_info();
    ev.map_id = map_id;
    ev.cmd = cmd;
    let n = key_len(key_size);
    ev.key_size = n as u32;
    if n > 0 {
        let _ = read_user_bytes(key_ptr, &mut ev.key[..n]);
    }
    take_view(ev, &target, &cfg, current_netns(&cfg));
    if ev.view == view::LIVE {
        watch_drops(ev, &target);
    }
    if PENDING.insert(&bpf_get_current_pid_tgid(), ev, 0).is_err() {
        count(counter::PENDING_FULL);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bpf")]
pub fn agent_delete_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: only the presence of the value is tested; it is not read.
    if unsafe { IN_BPF_UPDATE.get(&key) }.is_some() {
        let _ = IN_BPF_UPDATE.remove(&key);
        return 0;
    }
    // SAFETY: a map value of this thread, written only by its own sys_enter_bpf, which cannot
    // run again before this exit; it is copied before the entry is removed.
    if let Some(b) = unsafe { PENDING_BATCH.get(&key) } {
        // Read into the loop's scratch slot before the entry is removed.
        batch_exit(b);
        let _ = PENDING_BATCH.remove(&key);
        return 0;
    }
    let Some(pending) = PENDING.get_ptr_mut(&key) else {
        return 0;
    };
    let cfg = probe_config();
    // SAFETY: a map value of this thread; no one else writes it between entry and exit, and
    // it is submitted before the entry is removed.
    let ev = unsafe { &mut *pending };
    ev.ret = tracepoint_field::<i64>(&ctx, cfg.sys_exit_bpf_ret).unwrap_or(i64::MIN);
    ev.exit_ns = now_ns();
    submit_record(kind::MAP_DELETE, ev);
    let _ = PENDING.remove(&key);
    0
}

/// Reports the keys a batch delete processed, one record each (view taken at exit: the map
/// delete does not change the conntrack entry). bpf_loop has the verifier check the per-key
/// body once instead of once per unrolled iteration.
#[inline(always)]
fn batch_exit(b: &BatchPending) {
    let Some(target) = target(b.map_id) else {
        return;
    };
    let keys = read_user::<u64>(b.attr + ATTR_BATCH_KEYS).unwrap_or(0);
    let count = read_user::<u32>(b.attr + ATTR_BATCH_COUNT).unwrap_or(0);
    if keys == 0 || count == 0 {
        return;
    }
    let cfg = probe_config();
    let cap = if cfg.max_batch_keys == 0 || cfg.max_batch_keys > BPF_LOOP_MAX {
        BPF_LOOP_MAX
    } else {
        cfg.max_batch_keys
    };
    if count > cap {
        count_by(counter::BATCH_TRUNCATED, u64::from(count - cap));
    }
    // The loop's state lives in a per-CPU slot that the callback reads back (bpf_loop runs it
    // on this CPU, synchronously): on the stack it pushed the program's combined stack (this
    // frame, the callback's and its callee's) past 512 bytes on 6.1.
    let Some(slot) = LOOP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, and programs do not nest on one CPU (see
    // `emit::count_by`): nothing else holds a reference to it.
    let l = unsafe { &mut *slot };
    l.b = *b;
    l.target = target;
    l.keys = keys;
    l.exit_ns = now_ns();
    l.key_size = b.key_size;
    l._pad = 0;
    let n = if count > cap { cap } else { count };
    // SAFETY: `batch_key` has the callback signature bpf_loop expects and uses no context
    // (null); flags must be 0.
    unsafe { bpf_loop(n, batch_key as *mut c_void, core::ptr::null_mut(), 0) };
}

extern "C" fn batch_key(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(slot) = LOOP.get_ptr(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, filled by batch_exit just before the loop, which runs
    // synchronously on this CPU and does not write it meanwhile.
    let l = unsafe { &*slot };
    let cfg = probe_config();
    let n = key_len(l.key_size);
    if n == 0 {
        return 1;
    }
    // Built in place in the ring buffer: the record does not fit the callback's stack.
    let Some(mut entry) = EVENTS.reserve::<MapDeleteEvent>(0) else {
        count(counter::LOST_BASE + u32::from(kind::MAP_DELETE));
        return 0;
    };
    // SAFETY: a fresh, exclusive reservation, aligned and sized for a MapDeleteEvent by
    // `reserve::<MapDeleteEvent>`; it is fully written (ZERO) before any field is read.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = MapDeleteEvent::ZERO;
    ev.hdr = record_header(
        kind::MAP_DELETE,
        core::mem::size_of::<MapDeleteEvent>(),
        l.b.ts_ns,
    );
    ev.task = l.b.task;
    ev.map_id = l.b.map_id;
    ev.cmd = l.b.cmd;
    // Keys [0, count) were processed (deleted); the syscall's own error, if any, concerns the
    // key after them.
    ev.ret = 0;
    ev.exit_ns = l.exit_ns;
    ev.key_size = n as u32;
    let at = l.keys + index * u64::from(l.key_size);
    let _ = read_user_bytes(at, &mut ev.key[..n]);
    take_view(ev, &l.target, &cfg, l.b.task_netns);
    if ev.view == view::LIVE {
        watch_drops(ev, &l.target);
    }
    entry.submit(0);
    0
}
