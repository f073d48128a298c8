//! The agent's userspace deletes on its conntrack map, seen at the bpf(2) syscall, with the
//! kernel's liveness verdict for the key's flow taken at that instant.
//!
//! syscalls:sys_enter_bpf fires only for bpf(2), so other syscalls pay nothing. At entry the
//! map fd is resolved to a map id in the kernel (task->files->fdt->fd[fd]->private_data->id),
//! filtered against `TARGETS`, the key is copied from user memory, decoded with the target's
//! layout and looked up in the flow index; the record waits in `PENDING` until sys_exit_bpf
//! adds the syscall's result and emits it.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use detector_common::{
    MAX_KEY, MapDeleteEvent, ProbeConfig, TargetMap, Tuple, bpf_cmd, counter, ips, kind, view,
};

use crate::conntrack::{FLOWS, SEEN, read, status_of};
use crate::emit::{bump, config, header, output, task};

/// Watched maps by id, written by userspace (and rewritten when the agent re-creates its map).
#[map]
static TARGETS: HashMap<u32, TargetMap> = HashMap::with_max_entries(16, 0);

/// Deletes between syscall entry and exit, by thread.
#[map]
static PENDING: HashMap<u64, MapDeleteEvent> = HashMap::with_max_entries(1024, 0);

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
    // Bounds written out so the verifier sees every index is inside `key`.
    let (s, d, sp, dp, pr) = (
        t.off_src as usize,
        t.off_dst as usize,
        t.off_sport as usize,
        t.off_dport as usize,
        t.off_proto as usize,
    );
    if s > MAX_KEY - 16 || d > MAX_KEY - 16 || sp > MAX_KEY - 2 || dp > MAX_KEY - 2 || pr >= MAX_KEY
    {
        return None;
    }
    let mut i = 0;
    while i < 16 {
        if i < alen {
            tuple.src_addr[i] = key[s + i];
            tuple.dst_addr[i] = key[d + i];
        }
        i += 1;
    }
    tuple.src_port = u16::from_le_bytes([key[sp], key[sp + 1]]);
    tuple.dst_port = u16::from_le_bytes([key[dp], key[dp + 1]]);
    tuple.proto = key[pr];
    Some(tuple)
}

/// Fills the record's view of the key's conntrack entry.
#[inline(always)]
fn take_view(ev: &mut MapDeleteEvent, t: &TargetMap, cfg: &ProbeConfig) {
    let Some(tuple) = key_tuple(&ev.key, t) else {
        ev.view = view::UNKNOWN;
        return;
    };
    let reversed = Tuple {
        src_addr: tuple.dst_addr,
        dst_addr: tuple.src_addr,
        src_port: tuple.dst_port,
        dst_port: tuple.src_port,
        ..tuple
    };
    let (ct, rev) = match unsafe { FLOWS.get(&tuple) } {
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
    if cmd != bpf_cmd::MAP_DELETE_ELEM && cmd != bpf_cmd::MAP_LOOKUP_AND_DELETE_ELEM && !batch {
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
    if batch {
        bump(counter::BATCH_DELETE);
        return 0;
    }
    let Ok(key_ptr) = (unsafe { bpf_probe_read_user((attr + 8) as *const u64) }) else {
        return 0;
    };
    let mut ev = MapDeleteEvent::ZERO;
    ev.hdr = header(
        kind::MAP_DELETE,
        core::mem::size_of::<MapDeleteEvent>(),
        unsafe { bpf_ktime_get_ns() },
    );
    ev.task = task();
    ev.map_id = map_id;
    ev.cmd = cmd;
    let n = if key_size as usize > MAX_KEY {
        MAX_KEY
    } else {
        key_size as usize
    };
    ev.key_size = n as u32;
    if n > 0 {
        let _ = unsafe { bpf_probe_read_user_buf(key_ptr as *const u8, &mut ev.key[..n]) };
    }
    take_view(&mut ev, &target, &cfg);
    if PENDING
        .insert(&bpf_get_current_pid_tgid(), &ev, 0)
        .is_err()
    {
        bump(counter::PENDING_FULL);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bpf")]
pub fn agent_delete_exit(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
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
