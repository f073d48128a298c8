//! The detector's kernel programs: one object, every backend's entry points. Userspace loads
//! only the programs of the backend it picked (see `detector::probe::backend`).
//!
//! - [`conntrack`]: conntrack entries' NEW and DESTROY, and the flow index the other programs
//!   look flows up in; one file per backend (tracepoint, kprobe, fentry).
//! - [`npa`]: the agent's (NPA's) map deletes at bpf(2), and writes to its map from either side.
//! - [`drops`]: packets dropped after a delete that raced a live flow.
//! - [`emit`]: configuration, ring buffer, counters; [`kernel`]: every read of kernel memory.
//!
//! The lab's emulated NPA datapath is another object (`src/lab/main.rs`).
#![no_std]
#![no_main]

mod conntrack;
mod drops;
mod emit;
mod kernel;
mod npa;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
