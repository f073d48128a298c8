//! What every program shares: the load-time configuration (`CONFIG`), the ring buffer
//! (`EVENTS`) every record goes through, the per-CPU counters (`COUNTERS`), and the record
//! header and task fields.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use detector_common::{EventHeader, ProbeConfig, RECORD_VERSION, TaskInfo, counter};

use crate::kernel::cpu_id;

/// Offsets and settings resolved by userspace from BTF (see `detector::probe::offsets`),
/// written into the object's .rodata before load. Read only through [`probe_config`] and
/// [`config_u32`], whose volatile reads keep the compiler from folding in the zeros the object
/// was built with.
/// Not `pub`: a plain read (`CONFIG.field`) would be folded to the zeros the object was built
/// with.
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig::ZERO;

/// The single ring buffer every record goes through. Userspace may resize it before load.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counters (indices in `detector_common::counter`): losses are counted here, in the
/// kernel, so that a full ring buffer is never silent.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// The configuration userspace wrote before load, all of it: some forty loads and stores, so
/// the per-packet and per-free paths read the one field they need with [`config_u32`] and
/// copy the rest only once they have something to report.
#[inline(always)]
pub fn probe_config() -> ProbeConfig {
    // SAFETY: CONFIG is a static (valid, aligned, never written by the program); volatile
    // because userspace rewrote it after compilation.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

/// One field of the configuration, e.g. `config_u32(|c| &c.skb_nfct)`: a single load.
#[inline(always)]
pub fn config_u32(field: impl Fn(&'static ProbeConfig) -> &'static u32) -> u32 {
    // SAFETY: `field` returns a reference into CONFIG (see `probe_config`).
    unsafe { core::ptr::read_volatile(field(&CONFIG)) }
}

/// Adds one to counter `index`.
#[inline(always)]
pub fn count(index: u32) {
    count_by(index, 1);
}

/// Adds `n` to counter `index`.
#[inline(always)]
pub fn count_by(index: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array: no other CPU writes it, and the object's
        // programs do not nest on one CPU (none runs in NMI context, and a program that would
        // interrupt another on its CPU is not run by the kernel's recursion guard).
        unsafe { *p += n };
    }
}

/// A record's header: kind, size, this CPU and the given kernel time.
#[inline(always)]
pub fn record_header(kind: u8, size: usize, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind,
        version: RECORD_VERSION,
        size: size as u16,
        cpu: cpu_id(),
        ts_ns,
    }
}

/// Pid, tid and command of the task the program runs in (in softirq: whichever it interrupted).
#[inline(always)]
pub fn current_task_info() -> TaskInfo {
    let pid_tgid = bpf_get_current_pid_tgid();
    TaskInfo {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Copies `record` into the ring buffer, or counts it as lost for `kind`.
#[inline(always)]
pub fn submit_record<T: Copy + 'static>(kind: u8, record: &T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(*record);
            entry.submit(0);
        }
        None => count(counter::LOST_BASE + u32::from(kind)),
    }
}
