//! The detector's kernel programs: one object, every backend's entry points. Userspace loads
//! only the programs of the backend it picked (see `detector::probe::backend`).
//!
//! rustc emits no CO-RE relocations, so every kernel struct is read at an offset that the loader
//! resolved from BTF and wrote into `CONFIG` before load. `struct nf_conn` is only ever reached
//! through scalars here (`skb->_nfct`, a slab pointer, a kprobe argument), so it is read with
//! `bpf_probe_read_kernel`; nf_conntrack's slab is SLAB_TYPESAFE_BY_RCU, so such a read of an
//! entry that is being freed concurrently is harmless.
#![no_std]
#![no_main]

mod agent;
mod conntrack;
mod emit;
mod lab;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
