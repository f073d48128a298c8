//! The agent's userspace deletes on its conntrack map, seen at the bpf(2) syscall, with the
//! kernel's liveness verdict for the key's flow taken at that instant.
//!
//! syscalls:sys_enter_bpf fires only for bpf(2), so other syscalls pay nothing. At entry the
//! map fd is resolved to a map id in the kernel (task->files->fdt->fd[fd]->private_data->id),
//! filtered against `TARGETS`, the key is copied from user memory, decoded with the target's
//! layout and looked up in the flow index; the record waits in `PENDING` until sys_exit_bpf
//! adds the syscall's result and emits it.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        generated::bpf_loop,
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_probe_read_kernel_buf, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{btf_tracepoint, fentry, kprobe, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext, TracePointContext},
};
use detector_common::{
    DropWatch, FlowKey, MAX_KEY, MapDeleteEvent, MapWriteEvent, PacketDropEvent, ProbeConfig,
    TargetMap, Tuple, bpf_cmd, counter, ips, kind, map_op, view,
};

use crate::conntrack::{FLOWS, SEEN, read, status_of};
use crate::emit::{EVENTS, bump, bump_by, config, header, output, task};

/// Watched maps by id, written by userspace (and rewritten when the agent re-creates its map).
#[map]
static TARGETS: HashMap<u32, TargetMap> = HashMap::with_max_entries(16, 0);

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
    _pad: u32,
    task: detector_common::TaskInfo,
}

#[map]
static PENDING_BATCH: HashMap<u64, BatchPending> = HashMap::with_max_entries(256, 0);

/// Threads inside a bpf(2) update on a watched map, so the map-write probes can tell the
/// agent's own writes from the datapath's.
#[map]
static IN_BPF_UPDATE: HashMap<u64, u8> = HashMap::with_max_entries(1024, 0);

const BPF_MAP_UPDATE_ELEM: u32 = 2;

/// Keys of one batch reported key by key; more are counted in BATCH_TRUNCATED.
const MAX_BATCH: u32 = 32;

/// Resolves a file descriptor of the current task to the id of the BPF map it refers to.
#[inline(always)]
fn map_of_fd(fd: u32, cfg: &ProbeConfig) -> Option<(u32, u32)> {
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, cfg.task_files);
    if files == 0 {
        return None;
    }
    let fdt: u64 = read(files, cfg.files_fdt);
    if fdt == 0 {
        return None;
    }
    let max: u32 = read(fdt, cfg.fdtable_max_fds);
    if fd >= max {
        return None;
    }
    let fds: u64 = read(fdt, cfg.fdtable_fd);
    let file: u64 = read(fds + 8 * fd as u64, 0);
    if file == 0 {
        return None;
    }
    let map: u64 = read(file, cfg.file_private_data);
    if map == 0 {
        return None;
    }
    Some((read(map, cfg.bpf_map_id), read(map, cfg.bpf_map_key_size)))
}

/// Bytes of a key to capture: the map's key size, at most MAX_KEY.
#[inline(always)]
fn key_len(size: u32) -> usize {
    if size as usize > MAX_KEY {
        MAX_KEY
    } else {
        size as usize
    }
}

/// An offset into a key, as an index the verifier can bound on every kernel. The offsets come
/// from a map; a range check on them alone was not enough on 6.1, whose verifier lost the
/// bound when the compiler checked one copy of the value and indexed with another (spilled
/// before the check): "invalid unbounded variable-offset read from stack". The volatile read
/// makes the value opaque to the compiler, so the mask it cannot prove redundant stays, and the
/// register that indexes carries the bound itself.
#[inline(always)]
fn key_index(off: u32) -> Option<usize> {
    if off as usize >= MAX_KEY {
        return None;
    }
    let off = off as usize;
    // SAFETY: a read of a local.
    Some(unsafe { core::ptr::read_volatile(&off) } & (MAX_KEY - 1))
}

/// The flow a key names, in the kernel's tuple form (ports in host order, as NPA stores them).
#[inline(always)]
fn key_tuple(key: &[u8; MAX_KEY], t: &TargetMap) -> Option<Tuple> {
    let alen = match t.family as u8 {
        detector_common::AF_INET => 4,
        detector_common::AF_INET6 => 16,
        _ => return None,
    };
    let mut tuple = Tuple {
        family: t.family as u8,
        ..Tuple::default()
    };
    // Each index is bounded on the very register that indexes: see `key_index`.
    let (s, d, sp, dp, pr) = (
        key_index(t.off_src)?,
        key_index(t.off_dst)?,
        key_index(t.off_sport)?,
        key_index(t.off_dport)?,
        key_index(t.off_proto)?,
    );
    if s > MAX_KEY - 16 || d > MAX_KEY - 16 || sp > MAX_KEY - 2 || dp > MAX_KEY - 2 {
        return None;
    }
    // Copies through bpf_probe_read_kernel, from the key's own buffer: the verifier checks a
    // direct access against the largest masked offset plus the access size, which runs past
    // the buffer for the later fields (the range check above is on another register).
    let base = key.as_ptr() as u64;
    if alen == 4 {
        let src: [u8; 4] = read(base, s as u32);
        let dst: [u8; 4] = read(base, d as u32);
        tuple.src_addr[..4].copy_from_slice(&src);
        tuple.dst_addr[..4].copy_from_slice(&dst);
    } else {
        tuple.src_addr = read(base, s as u32);
        tuple.dst_addr = read(base, d as u32);
    }
    tuple.src_port = u16::from_le_bytes(read(base, sp as u32));
    tuple.dst_port = u16::from_le_bytes(read(base, dp as u32));
    tuple.proto = read(base, pr as u32);
    Some(tuple)
}

/// Fills the record's view of the key's conntrack entry.
#[inline(always)]
fn take_view(ev: &mut MapDeleteEvent, t: &TargetMap, cfg: &ProbeConfig) {
    let Some(tuple) = key_tuple(&ev.key, t) else {
        ev.view = view::UNKNOWN;
        return;
    };
    let key = FlowKey {
        tuple,
        netns: t.netns,
        _pad: 0,
    };
    let reversed = FlowKey {
        tuple: reverse(&tuple),
        ..key
    };
    let (ct, rev) = match unsafe { FLOWS.get(&key) } {
        Some(ct) => (*ct, 0),
        None => match unsafe { FLOWS.get(&reversed) } {
            Some(ct) => (*ct, 1),
            None => {
                ev.view = view::ABSENT;
                return;
            }
        },
    };
    let status = status_of(ct, cfg);
    let timeout: u32 = read(ct, cfg.ct_timeout);
    let left = timeout.wrapping_sub(unsafe { bpf_jiffies64() } as u32) as i32;
    ev.view = if status & ips::CONFIRMED != 0 && status & ips::DYING == 0 && left > 0 {
        view::LIVE
    } else {
        view::EXPIRED
    };
    ev.view_reversed = rev;
    ev.ct_addr = ct;
    ev.ct_born_ns = unsafe { SEEN.get(&ct) }.copied().unwrap_or(0);
    ev.ct_timeout_left = left;
    ev.ct_status = status as u32;
}

// syscalls:sys_enter_bpf: cmd and uattr at offsets from the tracefs format file.
#[tracepoint(category = "syscalls", name = "sys_enter_bpf")]
pub fn agent_delete_enter(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let Ok(cmd) = (unsafe { ctx.read_at::<u64>(cfg.sys_enter_bpf_cmd as usize) }) else {
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
    let Ok(attr) = (unsafe { ctx.read_at::<u64>(cfg.sys_enter_bpf_uattr as usize) }) else {
        return 0;
    };
    // union bpf_attr: map_fd (u32) then key (u64) at 8 for the element commands; for the batch
    // commands map_fd sits at 36 (after in_batch, out_batch, keys, values, count).
    let fd_off = if batch { 36 } else { 0 };
    let Ok(fd) = (unsafe { bpf_probe_read_user((attr + fd_off) as *const u32) }) else {
        return 0;
    };
    let Some((map_id, key_size)) = map_of_fd(fd, &cfg) else {
        return 0;
    };
    let Some(target) = (unsafe { TARGETS.get(&map_id) }).copied() else {
        return 0;
    };
    if update {
        let _ = IN_BPF_UPDATE.insert(&bpf_get_current_pid_tgid(), &1, 0);
        return 0;
    }
    if batch {
        bump(counter::BATCH_DELETE);
        let b = BatchPending {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            attr,
            map_id,
            key_size,
            cmd,
            _pad: 0,
            task: task(),
        };
        if PENDING_BATCH
            .insert(&bpf_get_current_pid_tgid(), &b, 0)
            .is_err()
        {
            bump(counter::PENDING_FULL);
        }
        return 0;
    }
    let Ok(key_ptr) = (unsafe { bpf_probe_read_user((attr + 8) as *const u64) }) else {
        return 0;
    };
    // Built in a per-CPU scratch slot, not on the stack: with the key decoding inlined the
    // program's stack passed the 512-byte limit on 6.1 ("combined stack size ... Too large").
    let Some(slot) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; programs do not nest on one CPU here (see `bump`).
    let ev = unsafe { &mut *slot };
    *ev = MapDeleteEvent::ZERO;
    ev.hdr = header(
        kind::MAP_DELETE,
        core::mem::size_of::<MapDeleteEvent>(),
        unsafe { bpf_ktime_get_ns() },
    );
    ev.task = task();
    ev.map_id = map_id;
    ev.cmd = cmd;
    let n = key_len(key_size);
    ev.key_size = n as u32;
    if n > 0 {
        let _ = unsafe { bpf_probe_read_user_buf(key_ptr as *const u8, &mut ev.key[..n]) };
    }
    take_view(ev, &target, &cfg);
    if ev.view == view::LIVE {
        watch_drops(ev, &target);
    }
    if PENDING
        .insert(&bpf_get_current_pid_tgid(), ev, 0)
        .is_err()
    {
        bump(counter::PENDING_FULL);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bpf")]
pub fn agent_delete_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    if unsafe { IN_BPF_UPDATE.get(&key) }.is_some() {
        let _ = IN_BPF_UPDATE.remove(&key);
        return 0;
    }
    if let Some(b) = unsafe { PENDING_BATCH.get(&key) } {
        // Read into the loop's scratch slot before the entry is removed.
        batch_exit(b);
        let _ = PENDING_BATCH.remove(&key);
        return 0;
    }
    let Some(pending) = PENDING.get_ptr_mut(&key) else {
        return 0;
    };
    let cfg = config();
    // SAFETY: a map value of this thread; no one else writes it between entry and exit.
    let ev = unsafe { &mut *pending };
    ev.ret = unsafe { ctx.read_at::<i64>(cfg.sys_exit_bpf_ret as usize) }.unwrap_or(i64::MIN);
    ev.exit_ns = unsafe { bpf_ktime_get_ns() };
    output(kind::MAP_DELETE, ev);
    let _ = PENDING.remove(&key);
    0
}

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

/// Reports the keys a batch delete processed, one record each (view taken at exit: the map
/// delete does not change the conntrack entry). bpf_loop has the verifier check the per-key
/// body once instead of once per unrolled iteration.
#[inline(always)]
fn batch_exit(b: &BatchPending) {
    let Some(target) = (unsafe { TARGETS.get(&b.map_id) }).copied() else {
        return;
    };
    // struct { in_batch, out_batch, keys, values (u64 each); count (u32) ... } batch;
    let keys = unsafe { bpf_probe_read_user((b.attr + 16) as *const u64) }.unwrap_or(0);
    let count = unsafe { bpf_probe_read_user((b.attr + 32) as *const u32) }.unwrap_or(0);
    if keys == 0 || count == 0 {
        return;
    }
    if count > MAX_BATCH {
        bump_by(counter::BATCH_TRUNCATED, (count - MAX_BATCH) as u64);
    }
    // The loop's state lives in a per-CPU slot that the callback reads back (bpf_loop runs it
    // on this CPU, synchronously): on the stack it pushed the program's combined stack (this
    // frame, the callback's and its callee's) past 512 bytes on 6.1.
    let Some(slot) = LOOP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; programs do not nest on one CPU here (see `bump`).
    let l = unsafe { &mut *slot };
    l.b = *b;
    l.target = target;
    l.keys = keys;
    l.exit_ns = unsafe { bpf_ktime_get_ns() };
    l.key_size = b.key_size;
    l._pad = 0;
    let n = if count > MAX_BATCH { MAX_BATCH } else { count };
    unsafe { bpf_loop(n, batch_key as *mut c_void, core::ptr::null_mut(), 0) };
}

#[map]
static LOOP: PerCpuArray<BatchLoop> = PerCpuArray::with_max_entries(1, 0);

extern "C" fn batch_key(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(slot) = LOOP.get_ptr(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, filled by batch_exit just before the loop.
    let l = unsafe { &*slot };
    let cfg = config();
    let n = key_len(l.key_size);
    if n == 0 {
        return 1;
    }
    // Built in place in the ring buffer: the record does not fit the callback's stack.
    let Some(mut entry) = EVENTS.reserve::<MapDeleteEvent>(0) else {
        bump(counter::LOST_BASE + kind::MAP_DELETE as u32);
        return 0;
    };
    // SAFETY: a fresh, exclusive, aligned reservation of the right size.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    *ev = MapDeleteEvent::ZERO;
    ev.hdr = header(kind::MAP_DELETE, core::mem::size_of::<MapDeleteEvent>(), l.b.ts_ns);
    ev.task = l.b.task;
    ev.map_id = l.b.map_id;
    ev.cmd = l.b.cmd;
    // Keys [0, count) were processed (deleted); the syscall's own error, if any, concerns the
    // key after them.
    ev.ret = 0;
    ev.exit_ns = l.exit_ns;
    ev.key_size = n as u32;
    let at = l.keys + index * l.key_size as u64;
    let _ = unsafe { bpf_probe_read_user_buf(at as *const u8, &mut ev.key[..n]) };
    take_view(ev, &l.target, &cfg);
    if ev.view == view::LIVE {
        watch_drops(ev, &l.target);
    }
    entry.submit(0);
    0
}

// ------------------------------------------------------------------ victim packets

/// Flows whose agent key was deleted while their conntrack entry was live (both directions),
/// so the first replies the policy then drops can be named. Written at such a delete.
#[map]
static DROP_WATCH: LruHashMap<Tuple, DropWatch> = LruHashMap::with_max_entries(4096, 0);

/// Until when (kernel ns) any flow is on the watch list: outside that, kfree_skb (which fires
/// for every freed packet on the machine) returns at once, without parsing headers.
#[map]
static DROP_WATCH_UNTIL: Array<u64> = Array::with_max_entries(1, 0);

/// Drops reported per watched flow (the first few tell the story; a retransmission storm
/// would only fill the ring buffer).
const DROPS_PER_FLOW: u32 = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

fn watch_drops(ev: &MapDeleteEvent, t: &TargetMap) {
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
    let until = ev.hdr.ts_ns + config().drop_watch_ms as u64 * 1_000_000;
    if let Some(u) = DROP_WATCH_UNTIL.get_ptr_mut(0) {
        // Two CPUs racing here store deadlines nanoseconds apart: either is good.
        unsafe {
            if *u < until {
                *u = until;
            }
        }
    }
}

#[inline(always)]
fn reverse(t: &Tuple) -> Tuple {
    Tuple {
        src_addr: t.dst_addr,
        dst_addr: t.src_addr,
        src_port: t.dst_port,
        dst_port: t.src_port,
        ..*t
    }
}

/// The packet's tuple, read from its network header (IPv4 or IPv6 without extension headers).
#[inline(always)]
fn skb_tuple(skb: u64, cfg: &ProbeConfig) -> Option<Tuple> {
    let head: u64 = read(skb, cfg.skb_head);
    let nh: u16 = read(skb, cfg.skb_network_header);
    if head == 0 || nh == 0xffff {
        return None;
    }
    let ip = head + nh as u64;
    let proto = u16::from_be(read::<u16>(skb, cfg.skb_protocol));
    let mut t = Tuple::default();
    let l4 = match proto {
        ETH_P_IP => {
            let vihl: u8 = read(ip, 0);
            if vihl >> 4 != 4 {
                return None;
            }
            t.family = detector_common::AF_INET;
            t.proto = read(ip, 9);
            let s: [u8; 4] = read(ip, 12);
            let d: [u8; 4] = read(ip, 16);
            t.src_addr[..4].copy_from_slice(&s);
            t.dst_addr[..4].copy_from_slice(&d);
            ip + ((vihl & 0x0f) as u64) * 4
        }
        ETH_P_IPV6 => {
            t.family = detector_common::AF_INET6;
            t.proto = read(ip, 6);
            t.src_addr = read(ip, 8);
            t.dst_addr = read(ip, 24);
            ip + 40
        }
        _ => return None,
    };
    if t.proto == 6 || t.proto == 17 || t.proto == 132 {
        t.src_port = u16::from_be(read::<u16>(l4, 0));
        t.dst_port = u16::from_be(read::<u16>(l4, 2));
    }
    Some(t)
}

// kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
#[btf_tracepoint(function = "kfree_skb")]
pub fn packet_drop_kfree_skb(ctx: BtfTracePointContext) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    if DROP_WATCH_UNTIL.get(0).copied().unwrap_or(0) < now {
        return 0;
    }
    let cfg = config();
    let Some(tuple) = skb_tuple(ctx.arg::<u64>(0), &cfg) else {
        return 0;
    };
    let Some(w) = DROP_WATCH.get_ptr_mut(&tuple) else {
        return 0;
    };
    // SAFETY: a map value; a racing CPU can at worst report one drop more than the cap.
    let w = unsafe { &mut *w };
    if now.saturating_sub(w.delete_ns) > cfg.drop_watch_ms as u64 * 1_000_000 {
        // Past the story's window: a later flow on the tuple is not this race's victim.
        let _ = DROP_WATCH.remove(&tuple);
        return 0;
    }
    if w.reported >= DROPS_PER_FLOW {
        return 0;
    }
    w.reported += 1;
    let ev = PacketDropEvent {
        hdr: header(kind::PACKET_DROP, core::mem::size_of::<PacketDropEvent>(), now),
        tuple,
        reason: ctx.arg::<u32>(2),
        _pad: 0,
        delete_ns: w.delete_ns,
    };
    output(kind::PACKET_DROP, &ev);
    0
}

// ------------------------------------------------------------------ datapath writes
// (kprobe and fentry backends: the tracepoint backend has no hook inside the hash map code)

/// Reports a write to a watched map; `map` and `key` are kernel pointers.
#[inline(always)]
fn map_write(map: u64, key: u64, op: u8) {
    let cfg = config();
    let map_id: u32 = read(map, cfg.bpf_map_id);
    if unsafe { TARGETS.get(&map_id) }.is_none() {
        return;
    }
    let key_size: u32 = read(map, cfg.bpf_map_key_size);
    let Some(mut entry) = EVENTS.reserve::<MapWriteEvent>(0) else {
        bump(counter::LOST_BASE + kind::MAP_WRITE as u32);
        return;
    };
    // SAFETY: a fresh, exclusive, aligned reservation of the right size.
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    ev.hdr = header(
        kind::MAP_WRITE,
        core::mem::size_of::<MapWriteEvent>(),
        unsafe { bpf_ktime_get_ns() },
    );
    ev.task = task();
    ev.map_id = map_id;
    ev.op = op;
    let me = bpf_get_current_pid_tgid();
    ev.from_syscall = u8::from(
        unsafe { PENDING.get(&me) }.is_some()
            || unsafe { PENDING_BATCH.get(&me) }.is_some()
            || unsafe { IN_BPF_UPDATE.get(&me) }.is_some(),
    );
    ev._pad = [0; 6];
    ev.key = [0; MAX_KEY];
    let n = key_len(key_size);
    ev.key_size = n as u32;
    if n > 0 {
        let _ = unsafe { bpf_probe_read_kernel_buf(key as *const u8, &mut ev.key[..n]) };
    }
    entry.submit(0);
}

// long htab_lru_map_update_elem(struct bpf_map *map, void *key, void *value, u64 map_flags)
#[kprobe]
pub fn map_update_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(map), Some(key)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        map_write(map, key, map_op::UPDATE);
    }
    0
}

// long htab_lru_map_delete_elem(struct bpf_map *map, void *key)
#[kprobe]
pub fn map_delete_kprobe(ctx: ProbeContext) -> u32 {
    if let (Some(map), Some(key)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        map_write(map, key, map_op::DELETE);
    }
    0
}

#[fentry(function = "htab_lru_map_update_elem")]
pub fn map_update_fentry(ctx: FEntryContext) -> u32 {
    map_write(ctx.arg::<u64>(0), ctx.arg::<u64>(1), map_op::UPDATE);
    0
}

#[fentry(function = "htab_lru_map_delete_elem")]
pub fn map_delete_fentry(ctx: FEntryContext) -> u32 {
    map_write(ctx.arg::<u64>(0), ctx.arg::<u64>(1), map_op::DELETE);
    0
}
