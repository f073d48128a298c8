//! Typed access to kernel memory: every `bpf_probe_read_*` of the object, and why it holds.
//!
//! rustc emits no CO-RE relocations, so kernel structs are read at offsets that userspace
//! resolved from BTF and wrote into `CONFIG` before load (`ProbeConfig`). The objects here are
//! only ever reached through scalars (a tracepoint or kprobe argument, `skb->_nfct`, a slab
//! pointer), so they are read with `bpf_probe_read_kernel`, which checks the address itself: a
//! bad or stale one makes the helper fail, never fault. A failed read is counted
//! (`counter::READ_FAILED`) and yields zero. nf_conntrack's slab is SLAB_TYPESAFE_BY_RCU, so a
//! read of an entry that is being freed concurrently is harmless too.

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns,
    bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_kernel_str_bytes,
    bpf_probe_read_user, bpf_probe_read_user_buf,
};
use detector_common::{ProbeConfig, TUPLE_READ_BYTES, Tuple, counter};

use crate::emit::count;

/// `_nfct` keeps `enum ip_conntrack_info` in its low three bits (NFCT_INFOMASK).
const NFCT_PTRMASK: u64 = !7;

/// `enum ip_conntrack_info`: a packet in the original direction of an entry that has already
/// seen a reply.
pub const IP_CT_ESTABLISHED: u64 = 0;

/// Size of a kernel pointer: `fdtable->fd` is an array of `struct file *`. Both targets the
/// object is built for (x86_64, aarch64) are 64-bit.
const POINTER_SIZE: u64 = 8;

/// Reads a `T` at `base + off` in kernel memory; zero (and counted) if the read fails.
#[inline(always)]
pub fn read_kernel<T: Copy + Default>(base: u64, off: u32) -> T {
    // SAFETY: bpf_probe_read_kernel validates the source address and returns an error instead
    // of faulting; the destination is a local of the right size and `T` is plain data
    // (`Copy + Default` integers and byte arrays), so any bytes read are a valid `T`.
    match unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) } {
        Ok(v) => v,
        Err(_) => {
            count(counter::READ_FAILED);
            T::default()
        }
    }
}

/// Copies `buf.len()` bytes of kernel memory at `addr` into `buf`; false if the read failed.
#[inline(always)]
pub fn read_kernel_bytes(addr: u64, buf: &mut [u8]) -> bool {
    // SAFETY: the helper validates the source address and writes at most `buf.len()` bytes
    // into `buf`, which is ours for the call.
    unsafe { bpf_probe_read_kernel_buf(addr as *const u8, buf) }.is_ok()
}

/// Reads the NUL-terminated kernel string at `addr` into `buf`; its bytes without the NUL.
#[inline(always)]
pub fn read_kernel_str(addr: u64, buf: &mut [u8]) -> Option<&[u8]> {
    // SAFETY: the helper validates the source address and writes at most `buf.len()` bytes
    // into `buf`; the returned slice borrows `buf`.
    unsafe { bpf_probe_read_kernel_str_bytes(addr as *const u8, buf) }.ok()
}

/// Reads a `T` from the current task's user memory at `addr`.
#[inline(always)]
pub fn read_user<T: Copy>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user validates the user address (and fails on an unmapped or
    // paged-out page); `T` is plain data at every use (integers).
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Copies `buf.len()` bytes of the current task's user memory at `addr` into `buf`.
#[inline(always)]
pub fn read_user_bytes(addr: u64, buf: &mut [u8]) -> bool {
    // SAFETY: the helper validates the user address and writes at most `buf.len()` bytes into
    // `buf`, which is ours for the call.
    unsafe { bpf_probe_read_user_buf(addr as *const u8, buf) }.is_ok()
}

/// Monotonic kernel time (ns), the records' clock.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: an argument-less helper that only returns a value.
    unsafe { bpf_ktime_get_ns() }
}

/// The kernel's jiffies counter, the clock of conntrack timeouts.
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: an argument-less helper that only returns a value.
    unsafe { bpf_jiffies64() }
}

/// The CPU this program runs on.
#[inline(always)]
pub fn cpu_id() -> u32 {
    // SAFETY: an argument-less helper that only returns a value.
    unsafe { bpf_get_smp_processor_id() }
}

/// A `struct nf_conn *` (its kernel address).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NfConn(pub u64);

impl NfConn {
    pub fn is_null(self) -> bool {
        self.0 == 0
    }

    /// `ct->status` (`enum ip_conntrack_status` bits, `detector_common::ips`).
    #[inline(always)]
    pub fn status(self, cfg: &ProbeConfig) -> u64 {
        self.status_at(cfg.ct_status)
    }

    /// `ct->status`, given the field's offset (`ProbeConfig::ct_status`).
    #[inline(always)]
    pub fn status_at(self, ct_status: u32) -> u64 {
        read_kernel(self.0, ct_status)
    }

    /// `ct->proto.tcp.state` (`detector_common::tcp_state`); meaningful for TCP entries only.
    #[inline(always)]
    pub fn tcp_state(self, cfg: &ProbeConfig) -> u8 {
        read_kernel(self.0, cfg.ct_tcp_state)
    }

    /// `ct->timeout`: an absolute u32 jiffies value (nfct_time_stamp is jiffies truncated).
    #[inline(always)]
    pub fn timeout(self, cfg: &ProbeConfig) -> u32 {
        read_kernel(self.0, cfg.ct_timeout)
    }

    /// Jiffies until the entry expires; zero or less once it has.
    #[inline(always)]
    pub fn timeout_left(self, cfg: &ProbeConfig, jiffies_now: u64) -> i32 {
        self.timeout(cfg).wrapping_sub(jiffies_now as u32) as i32
    }

    /// Inode number of the entry's network namespace (`ct->ct_net->ns.inum`), 0 if unknown.
    #[inline(always)]
    pub fn netns(self, cfg: &ProbeConfig) -> u32 {
        let net: u64 = read_kernel(self.0, cfg.ct_net);
        if net == 0 {
            return 0;
        }
        read_kernel(net, cfg.net_ns_inum)
    }

    /// `ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple`.
    #[inline(always)]
    pub fn orig_tuple(self, cfg: &ProbeConfig) -> Tuple {
        read_tuple(self.0 + u64::from(cfg.ct_tuple_orig), cfg)
    }

    /// `ct->tuplehash[IP_CT_DIR_REPLY].tuple`.
    #[inline(always)]
    pub fn reply_tuple(self, cfg: &ProbeConfig) -> Tuple {
        read_tuple(self.0 + u64::from(cfg.ct_tuple_reply), cfg)
    }
}

/// A `struct nf_conntrack_tuple` at kernel address `t`, ports in host order, read in one
/// copy (a report reads two tuples; one read per field made twelve): the fields are then
/// taken from the copy at their BTF offsets, which userspace checked to lie within
/// [`TUPLE_READ_BYTES`]. A failed read is counted and yields the zero tuple, as a failed
/// field read did.
#[inline(always)]
fn read_tuple(t: u64, cfg: &ProbeConfig) -> Tuple {
    let mut buf = [0u8; TUPLE_READ_BYTES];
    if !read_kernel_bytes(t, &mut buf) {
        count(counter::READ_FAILED);
        buf = [0u8; TUPLE_READ_BYTES];
    }
    Tuple {
        family: field::<u16>(&buf, cfg.tuple_l3num) as u8,
        proto: field::<u8>(&buf, cfg.tuple_protonum),
        // `u.all` is __be16.
        src_port: u16::from_be(field::<u16>(&buf, cfg.tuple_src_port)),
        dst_port: u16::from_be(field::<u16>(&buf, cfg.tuple_dst_port)),
        _pad: 0,
        src_addr: field::<[u8; 16]>(&buf, cfg.tuple_src_addr),
        dst_addr: field::<[u8; 16]>(&buf, cfg.tuple_dst_addr),
    }
}

/// The `T` at byte `off` of a copied tuple; zero if it would not fit (userspace refuses such
/// offsets before load, and the check keeps the verifier's bounds).
#[inline(always)]
fn field<T: Copy + Default>(buf: &[u8; TUPLE_READ_BYTES], off: u32) -> T {
    let off = off as usize;
    if off > TUPLE_READ_BYTES - core::mem::size_of::<T>() {
        return T::default();
    }
    // SAFETY: `off + size_of::<T>()` is within `buf` (checked above); the read is unaligned
    // and `T` is plain data (integers and byte arrays), so any bytes are a valid `T`.
    unsafe { core::ptr::read_unaligned(buf.as_ptr().add(off).cast::<T>()) }
}

/// A `struct sk_buff *`.
#[derive(Clone, Copy)]
pub struct Skb(pub u64);

impl Skb {
    /// `skb->_nfct`, given the field's offset (`ProbeConfig::skb_nfct`).
    #[inline(always)]
    pub fn nfct(self, skb_nfct: u32) -> Nfct {
        Nfct(read_kernel(self.0, skb_nfct))
    }

    /// Kernel address of the packet's network header, if it has one set.
    #[inline(always)]
    pub fn network_header(self, cfg: &ProbeConfig) -> Option<u64> {
        let head: u64 = read_kernel(self.0, cfg.skb_head);
        let nh: u16 = read_kernel(self.0, cfg.skb_network_header);
        // `(u16)~0U` means "not set" in skbuff.h.
        if head == 0 || nh == 0xffff {
            return None;
        }
        Some(head + u64::from(nh))
    }

    /// `skb->protocol`, host order (an ETH_P_* value).
    #[inline(always)]
    pub fn protocol(self, cfg: &ProbeConfig) -> u16 {
        u16::from_be(read_kernel::<u16>(self.0, cfg.skb_protocol))
    }
}

/// `skb->_nfct`: the packet's conntrack entry and, in the low bits, how the packet relates to
/// it (`enum ip_conntrack_info`).
#[derive(Clone, Copy)]
pub struct Nfct(pub u64);

impl Nfct {
    /// The entry (null for an untracked packet).
    #[inline(always)]
    pub fn entry(self) -> NfConn {
        NfConn(self.0 & NFCT_PTRMASK)
    }

    /// The packet's `enum ip_conntrack_info` (`IP_CT_*`).
    #[inline(always)]
    pub fn info(self) -> u64 {
        self.0 & !NFCT_PTRMASK
    }
}

/// A `struct bpf_map *`.
#[derive(Clone, Copy)]
pub struct BpfMap(pub u64);

impl BpfMap {
    /// `map->id`, the id userspace names the map by.
    #[inline(always)]
    pub fn id(self, cfg: &ProbeConfig) -> u32 {
        read_kernel(self.0, cfg.bpf_map_id)
    }

    /// `map->key_size` in bytes.
    #[inline(always)]
    pub fn key_size(self, cfg: &ProbeConfig) -> u32 {
        read_kernel(self.0, cfg.bpf_map_key_size)
    }
}

/// Inode number of the current task's network namespace
/// (`current->nsproxy->net_ns->ns.inum`), 0 if unknown (an exiting task has no nsproxy).
#[inline(always)]
pub fn current_netns(cfg: &ProbeConfig) -> u32 {
    // SAFETY: an argument-less helper that returns the current task's address as a scalar;
    // it is only ever dereferenced through `read_kernel`.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = read_kernel(task, cfg.task_nsproxy);
    if nsproxy == 0 {
        return 0;
    }
    let net: u64 = read_kernel(nsproxy, cfg.nsproxy_net_ns);
    if net == 0 {
        return 0;
    }
    read_kernel(net, cfg.net_ns_inum)
}

/// The BPF map that file descriptor `fd` of the current task refers to:
/// `current->files->fdt->fd[fd]->private_data` (a bpf map fd's file keeps the map there).
/// None when the fd is out of range or not open. The caller checks the map's id against its
/// watch list, so an fd that is not a map at all yields an id that matches nothing.
#[inline(always)]
pub fn current_map_of_fd(fd: u32, cfg: &ProbeConfig) -> Option<BpfMap> {
    // SAFETY: an argument-less helper that returns the current task's address as a scalar;
    // it is only ever dereferenced through `read_kernel`.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read_kernel(task, cfg.task_files);
    if files == 0 {
        return None;
    }
    let fdt: u64 = read_kernel(files, cfg.files_fdt);
    if fdt == 0 {
        return None;
    }
    let max: u32 = read_kernel(fdt, cfg.fdtable_max_fds);
    if fd >= max {
        return None;
    }
    let fds: u64 = read_kernel(fdt, cfg.fdtable_fd);
    let file: u64 = read_kernel(fds + POINTER_SIZE * u64::from(fd), 0);
    if file == 0 {
        return None;
    }
    let map: u64 = read_kernel(file, cfg.file_private_data);
    if map == 0 {
        return None;
    }
    Some(BpfMap(map))
}
