//! Maps shared by every program, the load-time configuration, and the ring-buffer writer.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use detector_common::{EventHeader, ProbeConfig, RECORD_VERSION, TaskInfo, counter};

/// Offsets and settings resolved by userspace from BTF (see `detector::probe::offsets`).
#[unsafe(no_mangle)]
pub static CONFIG: Global<ProbeConfig> = Global::new(ProbeConfig::ZERO);

/// The single ring buffer every record goes through. Userspace may resize it before load.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Per-CPU counters (indices in `detector_common::counter`): losses are counted here, in the
/// kernel, so that a full ring buffer is never silent.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn config() -> ProbeConfig {
    CONFIG.load()
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, and programs do not nest on one CPU here.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn bump_by(index: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        unsafe { *p += n };
    }
}

#[inline(always)]
pub fn header(kind: u8, size: usize, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind,
        version: RECORD_VERSION,
        size: size as u16,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns,
    }
}

#[inline(always)]
pub fn task() -> TaskInfo {
    let pid_tgid = bpf_get_current_pid_tgid();
    TaskInfo {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    }
}

/// Writes `record` into the ring buffer, or counts it as lost for `kind`.
#[inline(always)]
pub fn output<T: Copy + 'static>(kind: u8, record: &T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(*record);
            entry.submit(0);
        }
        None => bump(counter::LOST_BASE + kind as u32),
    }
}
