//! Records shared by the detector's kernel programs and its userspace.
//!
//! Every record is `#[repr(C)]`, built only from fixed-size integer fields and byte arrays laid
//! out so that the compiler inserts no padding (checked at compile time below): the kernel
//! writes them into the ring buffer byte for byte and userspace decodes them by length, never by
//! transmuting into enums. Kinds and reasons are plain integers; userspace maps them to Rust
//! enums with `TryFrom` and rejects unknown values.
#![no_std]

#[cfg(feature = "lab")]
pub mod lab;
// Userspace only (the detector's codec, the bench): the kernel programs read keys with the
// offsets userspace writes into `TargetMap`.
#[cfg(not(target_arch = "bpf"))]
pub mod npa_key;

/// Version of the record layout. Bumped whenever a record changes shape.
pub const RECORD_VERSION: u8 = 3;

/// Record kinds (`EventHeader::kind`).
pub mod kind {
    /// A conntrack entry was confirmed (inserted into the kernel table).
    pub const CT_NEW: u8 = 1;
    /// A confirmed conntrack entry was destroyed.
    pub const CT_DESTROY: u8 = 2;
    /// A userspace bpf(2) delete on a watched (agent) map, with the kernel's view of the key's
    /// conntrack entry at that instant.
    pub const MAP_DELETE: u8 = 3;
    /// A dropped packet of a flow whose agent key was deleted while the flow was live.
    pub const PACKET_DROP: u8 = 4;
    /// An insert/update or delete on a watched map seen inside the kernel's hash-map code
    /// (kprobe/fentry backends): the datapath's writes, and the agent's own.
    pub const MAP_WRITE: u8 = 5;
    /// Number of kinds; sizes the loss-counter array.
    pub const COUNT: u32 = 8;
}

/// Which kernel hook produced a record (`CtEvent::source`), so a timeline can say how early or
/// late each observation is relative to the kernel's own insert/destroy.
pub mod source {
    pub const NONE: u8 = 0;
    /// tp_btf/net_dev_queue: first transmitted packet carrying the confirmed entry.
    pub const TP_NET_DEV_QUEUE: u8 = 1;
    /// tp_btf/consume_skb: a locally consumed packet carrying the confirmed entry.
    pub const TP_CONSUME_SKB: u8 = 2;
    /// tp_btf/kfree_skb: a dropped packet carrying the confirmed entry.
    pub const TP_KFREE_SKB: u8 = 3;
    /// tp_btf/kmem_cache_free on the nf_conntrack cache.
    pub const TP_KMEM_CACHE_FREE: u8 = 4;
    /// kretprobe on __nf_conntrack_confirm.
    pub const KRETPROBE_CONFIRM: u8 = 5;
    /// kprobe on nf_ct_destroy.
    pub const KPROBE_DESTROY: u8 = 6;
    /// fexit on __nf_conntrack_confirm.
    pub const FEXIT_CONFIRM: u8 = 7;
    /// fentry on nf_ct_destroy.
    pub const FENTRY_DESTROY: u8 = 8;
}

/// Why a conntrack entry was destroyed (`CtEvent::reason`, DESTROY only).
pub mod reason {
    pub const NONE: u8 = 0;
    /// Its timeout had passed when it was destroyed (gc_worker, a dump, or a lookup reaped it).
    pub const EXPIRED: u8 = 1;
    /// It was removed before its timeout (conntrack -D, flush, RST handling, netns exit...).
    pub const KILLED: u8 = 2;
}

/// The kernel's view of a deleted key's conntrack entry at the instant of the delete
/// (`MapDeleteEvent::view`).
pub mod view {
    /// The key did not decode into a flow (unknown layout): no view taken.
    pub const UNKNOWN: u8 = 0;
    /// No entry for the key's flow (either direction, or its DNAT form).
    pub const ABSENT: u8 = 1;
    /// A confirmed, not dying entry whose timeout has not passed.
    pub const LIVE: u8 = 2;
    /// An entry whose timeout has passed (or that is dying) but that is not freed yet.
    pub const EXPIRED: u8 = 3;
}

/// `enum tcp_conntrack` (include/uapi/linux/netfilter/nf_conntrack_tcp.h): conntrack's TCP
/// state of an entry (`MapDeleteEvent::ct_tcp_state`).
pub mod tcp_state {
    pub const NONE: u8 = 0;
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
    pub const SYN_SENT2: u8 = 9;
    /// Not read: no entry, or not a TCP flow.
    pub const UNKNOWN: u8 = 0xff;
}

/// bpf(2) commands the detector watches (include/uapi/linux/bpf.h).
pub mod bpf_cmd {
    pub const MAP_DELETE_ELEM: u32 = 3;
    pub const MAP_LOOKUP_AND_DELETE_ELEM: u32 = 21;
    pub const MAP_LOOKUP_AND_DELETE_BATCH: u32 = 25;
    pub const MAP_DELETE_BATCH: u32 = 27;
}

/// The ring buffer's default size in MiB (`--ring-mib`); the bench's loss note reads it too.
pub const DEFAULT_RING_MIB: u32 = 8;

/// Longest map key captured (NPA's largest, IPv6 with ifindex, is 60 bytes).
pub const MAX_KEY: usize = 64;

/// `ct->status` bits the detector relies on (include/uapi/linux/netfilter/nf_conntrack_common.h).
pub mod ips {
    pub const CONFIRMED: u64 = 1 << 3;
    pub const DYING: u64 = 1 << 9;
}

/// Address families as the kernel stores them in `nf_conntrack_tuple.src.l3num`.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// Common header of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// One of [`kind`].
    pub kind: u8,
    /// [`RECORD_VERSION`] of the writer.
    pub version: u8,
    /// Total size of the record in bytes, header included.
    pub size: u16,
    /// CPU the record was produced on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the probe fired.
    pub ts_ns: u64,
}

/// One direction of a connection, as the kernel keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// IP protocol number (6 TCP, 17 UDP, ...).
    pub proto: u8,
    /// Ports in host byte order (0 for protocols without ports).
    pub src_port: u16,
    pub dst_port: u16,
    pub _pad: u16,
    /// Addresses in network byte order; IPv4 uses the first four bytes.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

/// Key of the kernel's flow index: a tuple in one network namespace (the same flow usually
/// has an entry in the pod's namespace and one in the node's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub tuple: Tuple,
    pub netns: u32,
    pub _pad: u32,
}

/// The task in whose context a probe fired.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    /// Thread-group id (what userspace calls the pid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub comm: [u8; 16],
}

/// Conntrack NEW or DESTROY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEvent {
    pub hdr: EventHeader,
    /// Original direction (`tuplehash[IP_CT_DIR_ORIGINAL]`).
    pub orig: Tuple,
    /// Reply direction (`tuplehash[IP_CT_DIR_REPLY]`; differs from the inverted original under NAT).
    pub reply: Tuple,
    /// Kernel address of the `struct nf_conn`: unique among live entries, reused after free.
    pub ct_addr: u64,
    /// Kernel timestamp of this entry's NEW record, carried on DESTROY so that (ct_addr,
    /// born_ns) names one lifetime; 0 when the entry predates the detector.
    pub born_ns: u64,
    /// `bpf_jiffies64()` at the probe.
    pub jiffies: u64,
    /// `ct->status` (IPS_* bits, low 32 bits).
    pub status: u32,
    /// Inode number of the entry's network namespace.
    pub netns: u32,
    /// `ct->timeout - jiffies` in jiffies: remaining lifetime, negative once expired.
    pub timeout_left: i32,
    /// One of [`reason`] (DESTROY).
    pub reason: u8,
    /// One of [`source`].
    pub source: u8,
    pub _pad: u16,
    pub task: TaskInfo,
    /// Kernel time (`bpf_ktime_get_ns` clock) at which the entry's timeout runs out, or ran
    /// out: `ct->timeout` (an absolute jiffies deadline) taken back to ktime with the tick
    /// length userspace measured (`ProbeConfig::ns_per_jiffy`). At most one jiffy late, never
    /// after the record's own time when the entry had expired. 0 when the tick length is
    /// unknown.
    pub expiry_ns: u64,
}

/// A userspace delete on a watched map. Timestamped at syscall entry; emitted at syscall exit
/// with the result.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDeleteEvent {
    pub hdr: EventHeader,
    pub task: TaskInfo,
    /// Id of the map the fd referred to.
    pub map_id: u32,
    /// One of [`bpf_cmd`].
    pub cmd: u32,
    /// Return value of the syscall (0, or a negative errno).
    pub ret: i64,
    /// `bpf_ktime_get_ns()` at syscall exit.
    pub exit_ns: u64,
    /// Bytes of `key` that hold the key (the map's key size, at most [`MAX_KEY`]).
    pub key_size: u32,
    /// One of [`view`]: the key's conntrack entry, read in the kernel at the delete.
    pub view: u8,
    /// 1 when the entry was found through the reversed key (reply direction).
    pub view_reversed: u8,
    pub _pad: u16,
    /// The entry (when found): kernel address, birth ts (0 unknown), remaining timeout in
    /// jiffies, status.
    pub ct_addr: u64,
    pub ct_born_ns: u64,
    pub ct_timeout_left: i32,
    pub ct_status: u32,
    pub key: [u8; MAX_KEY],
    /// The entry's conntrack TCP state (one of [`tcp_state`]), [`tcp_state::UNKNOWN`] when no
    /// entry was found or the flow is not TCP.
    pub ct_tcp_state: u8,
    pub _pad_tcp: [u8; 3],
    /// Network namespace (inode) whose conntrack entries judged the delete: the target's
    /// (`--netns`), or else the deleting task's own (`current->nsproxy->net_ns`).
    pub judged_netns: u32,
}

impl MapDeleteEvent {
    pub const ZERO: Self = Self {
        hdr: EventHeader {
            kind: 0,
            version: 0,
            size: 0,
            cpu: 0,
            ts_ns: 0,
        },
        task: TaskInfo {
            pid: 0,
            tid: 0,
            comm: [0; 16],
        },
        map_id: 0,
        cmd: 0,
        ret: 0,
        exit_ns: 0,
        key_size: 0,
        view: 0,
        view_reversed: 0,
        _pad: 0,
        ct_addr: 0,
        ct_born_ns: 0,
        ct_timeout_left: 0,
        ct_status: 0,
        key: [0; MAX_KEY],
        ct_tcp_state: tcp_state::UNKNOWN,
        _pad_tcp: [0; 3],
        judged_netns: 0,
    };
}

/// A dropped packet (tp_btf kfree_skb) of a flow on the drop watch list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketDropEvent {
    pub hdr: EventHeader,
    /// The packet's own direction.
    pub tuple: Tuple,
    /// `enum skb_drop_reason` value (names come from BTF in userspace).
    pub reason: u32,
    pub _pad: u32,
    /// Kernel ts of the agent delete that put the flow on the watch list.
    pub delete_ns: u64,
}

/// A flow on the drop watch list (map `DROP_WATCH`, keyed by the packet tuple).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropWatch {
    /// Kernel ts of the delete.
    pub delete_ns: u64,
    /// Drops reported so far (capped by the program).
    pub reported: u32,
    pub _pad: u32,
}

/// `MapWriteEvent::op`.
pub mod map_op {
    pub const UPDATE: u8 = 1;
    pub const DELETE: u8 = 2;
}

/// An update or delete on a watched map, seen in `htab_lru_map_update_elem` /
/// `htab_lru_map_delete_elem`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapWriteEvent {
    pub hdr: EventHeader,
    pub task: TaskInfo,
    pub map_id: u32,
    pub key_size: u32,
    /// One of [`map_op`].
    pub op: u8,
    /// 1 when the write is the kernel half of a bpf(2) call of the current task (userspace),
    /// 0 when a BPF program (the datapath) made it.
    pub from_syscall: u8,
    pub _pad: [u8; 6],
    pub key: [u8; MAX_KEY],
}

/// A watched map, as the kernel programs need to know it (map `TARGETS`, keyed by map id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetMap {
    /// Address family of the keys ([`AF_INET`] or [`AF_INET6`]); 0 = do not decode keys.
    pub family: u32,
    /// Offsets inside a key: source address, source port (u16, host order), destination
    /// address, destination port, protocol (u8).
    pub off_src: u32,
    pub off_sport: u32,
    pub off_dst: u32,
    pub off_dport: u32,
    pub off_proto: u32,
    /// Network namespace (inode) whose conntrack entries judge this map's deletes (`--netns`);
    /// 0: the namespace of each deleting task, read at the delete.
    pub netns: u32,
}

/// Kernel struct offsets and run-time settings, resolved by userspace from BTF and written into
/// the object's read-only data before load (one global, like pwru's config). Every field is a
/// Bytes the programs copy per `struct nf_conntrack_tuple` (40 bytes on every kernel since
/// 2.6); every tuple field offset must lie within them (checked before load).
pub const TUPLE_READ_BYTES: usize = 40;

/// `u32` so the struct has no padding; offsets are in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// `struct nf_conn`: `timeout` (u32 jiffies).
    pub ct_timeout: u32,
    /// `struct nf_conn`: `status` (unsigned long).
    pub ct_status: u32,
    /// `struct nf_conn`: `ct_net.net` (struct net *).
    pub ct_net: u32,
    /// `struct nf_conn`: `tuplehash[0].tuple` and `tuplehash[1].tuple`.
    pub ct_tuple_orig: u32,
    pub ct_tuple_reply: u32,
    /// `struct nf_conntrack_tuple`: `src.u3`, `src.u.all`, `src.l3num`, `dst.u3`, `dst.u.all`,
    /// `dst.protonum`.
    pub tuple_src_addr: u32,
    pub tuple_src_port: u32,
    pub tuple_l3num: u32,
    pub tuple_dst_addr: u32,
    pub tuple_dst_port: u32,
    pub tuple_protonum: u32,
    /// `struct net`: `ns.inum`.
    pub net_ns_inum: u32,
    /// `struct sk_buff`: `_nfct` (unsigned long; low 3 bits are ctinfo).
    pub skb_nfct: u32,
    /// `struct kmem_cache`: `name` (const char *).
    pub kmem_cache_name: u32,
    /// Only report entries of this network namespace (inode); 0 reports all.
    pub netns_filter: u32,
    /// syscalls:sys_enter_bpf / sys_exit_bpf field offsets (from the tracefs format files).
    pub sys_enter_bpf_cmd: u32,
    pub sys_enter_bpf_uattr: u32,
    pub sys_exit_bpf_ret: u32,
    /// `struct task_struct`: `files`; `struct files_struct`: `fdt`; `struct fdtable`: `fd`,
    /// `max_fds`; `struct file`: `private_data`; `struct bpf_map`: `id`, `key_size`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
    pub bpf_map_id: u32,
    pub bpf_map_key_size: u32,
    /// `struct sk_buff`: `head`, `network_header`, `protocol`.
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_protocol: u32,
    /// How long after a race the flow's dropped packets are reported, in ms.
    pub drop_watch_ms: u32,
    /// 1 when the third argument of the `kmem_cache_free` tracepoint is the cache
    /// (`struct kmem_cache *`, kernels from 6.2), 0 when it is the cache's name (6.1 and older).
    pub kmem_free_arg_cache: u32,
    /// `struct nf_conn`: `proto.tcp.state` (u8, `enum tcp_conntrack`).
    pub ct_tcp_state: u32,
    /// Keys of one batch delete reported key by key (bpf_loop iterations, at most 1 << 23);
    /// more are counted in `counter::BATCH_TRUNCATED`.
    pub max_batch_keys: u32,
    /// Length of one jiffy in ns (1e9 / CONFIG_HZ, measured by userspace), to place conntrack
    /// deadlines on the ktime clock; 0 when unknown (records then carry no expiry).
    pub ns_per_jiffy: u32,
    /// `struct task_struct`: `nsproxy`; `struct nsproxy`: `net_ns` (the deleting task's
    /// network namespace).
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
}

impl ProbeConfig {
    /// All offsets zero: the value compiled into the object, replaced by the loader.
    pub const ZERO: Self = Self {
        ct_timeout: 0,
        ct_status: 0,
        ct_net: 0,
        ct_tuple_orig: 0,
        ct_tuple_reply: 0,
        tuple_src_addr: 0,
        tuple_src_port: 0,
        tuple_l3num: 0,
        tuple_dst_addr: 0,
        tuple_dst_port: 0,
        tuple_protonum: 0,
        net_ns_inum: 0,
        skb_nfct: 0,
        kmem_cache_name: 0,
        netns_filter: 0,
        sys_enter_bpf_cmd: 0,
        sys_enter_bpf_uattr: 0,
        sys_exit_bpf_ret: 0,
        task_files: 0,
        files_fdt: 0,
        fdtable_fd: 0,
        fdtable_max_fds: 0,
        file_private_data: 0,
        bpf_map_id: 0,
        bpf_map_key_size: 0,
        skb_head: 0,
        skb_network_header: 0,
        skb_protocol: 0,
        drop_watch_ms: 0,
        kmem_free_arg_cache: 0,
        ct_tcp_state: 0,
        max_batch_keys: 0,
        ns_per_jiffy: 0,
        task_nsproxy: 0,
        nsproxy_net_ns: 0,
    };
}

/// Per-CPU counters kept by the kernel programs (array map `COUNTERS`, index = kind for losses).
pub mod counter {
    /// Base index of "ring buffer full, record of kind K dropped": `LOST_BASE + K`.
    pub const LOST_BASE: u32 = 0;
    /// A confirmed entry that could not be remembered (table of live entries full): its NEW
    /// was not reported and its flow is not indexed.
    pub const SEEN_FULL: u32 = 8;
    /// A kernel read (bpf_probe_read_kernel) failed; the record was still emitted, fields zeroed.
    pub const READ_FAILED: u32 = 9;
    /// A delete's syscall entry could not be remembered until its exit (table full): lost.
    pub const PENDING_FULL: u32 = 10;
    /// Batch delete syscalls on a watched map (their keys are reported one record each).
    pub const BATCH_DELETE: u32 = 11;
    /// The flow index (tuple -> entry) was full: a later delete may see its entry as absent.
    pub const FLOWS_FULL: u32 = 12;
    /// A batch delete had more keys than one record pass reads; the rest were not reported.
    pub const BATCH_TRUNCATED: u32 = 13;
    /// kprobe backend: a confirm's entry could not be remembered for its return (NEW lost).
    pub const CONFIRM_FULL: u32 = 14;
    pub const COUNT: u32 = 16;
}

// Layout checks: any implicit padding changes a size and fails the build.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<EventHeader>() == 1 + 1 + 2 + 4 + 8);
    assert!(size_of::<Tuple>() == 1 + 1 + 2 + 2 + 2 + 16 + 16);
    assert!(size_of::<TaskInfo>() == 4 + 4 + 16);
    assert!(
        size_of::<CtEvent>()
            == size_of::<EventHeader>()
                + 2 * size_of::<Tuple>()
                + 8 * 3
                + 4 * 3
                + 1
                + 1
                + 2
                + size_of::<TaskInfo>()
                + 8
    );
    assert!(size_of::<CtEvent>().is_multiple_of(8));
    assert!(size_of::<ProbeConfig>() == 35 * 4);
    assert!(
        size_of::<PacketDropEvent>() == size_of::<EventHeader>() + size_of::<Tuple>() + 4 + 4 + 8
    );
    assert!(size_of::<DropWatch>() == 16);
    assert!(
        size_of::<MapWriteEvent>()
            == size_of::<EventHeader>() + size_of::<TaskInfo>() + 4 + 4 + 1 + 1 + 6 + MAX_KEY
    );
    assert!(
        size_of::<MapDeleteEvent>()
            == size_of::<EventHeader>()
                + size_of::<TaskInfo>()
                + 4
                + 4
                + 8
                + 8
                + 4
                + 1
                + 1
                + 2
                + 8
                + 8
                + 4
                + 4
                + MAX_KEY
                + 1
                + 3
                + 4
    );
    assert!(size_of::<MapDeleteEvent>().is_multiple_of(8));
    assert!(size_of::<TargetMap>() == 7 * 4);
    assert!(size_of::<FlowKey>() == size_of::<Tuple>() + 8);
    assert!(kind::COUNT <= counter::SEEN_FULL);
};

/// `aya::Pod` (userspace reads and writes these as plain bytes). Every record above is
/// repr(C) and built only from integers and byte arrays, and the assertions above pin each
/// size to the sum of its fields, so none has padding: every bit pattern is a valid value and
/// none has uninitialised bytes. Each impl's SAFETY line names what it relies on.
#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::EventHeader {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::Tuple {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::TaskInfo {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::CtEvent {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::ProbeConfig {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::MapDeleteEvent {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::TargetMap {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::PacketDropEvent {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::DropWatch {}
    // SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
    unsafe impl aya::Pod for super::MapWriteEvent {}
}
