//! Decoding of ring-buffer records into typed events.
//!
//! Records are checked for length and version and their kinds mapped with `TryFrom`; nothing
//! is transmuted into an enum, and an unknown kind is an error the caller counts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use detector_common::{
    self as common, AF_INET, AF_INET6, CtEvent, EventHeader, MapDeleteEvent, MapWriteEvent,
    PacketDropEvent, RECORD_VERSION,
};
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("record kind {kind} claims {claimed} bytes but {actual} arrived")]
    Length {
        kind: u8,
        claimed: usize,
        actual: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record version {0}, this detector reads version {RECORD_VERSION}")]
    Version(u8),
    #[error("unknown {what} value {value}")]
    UnknownValue { what: &'static str, value: u8 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    CtNew,
    CtDestroy,
    MapDelete,
    PacketDrop,
    MapWrite,
}

impl TryFrom<u8> for Kind {
    type Error = DecodeError;
    fn try_from(v: u8) -> Result<Self, DecodeError> {
        match v {
            common::kind::CT_NEW => Ok(Kind::CtNew),
            common::kind::CT_DESTROY => Ok(Kind::CtDestroy),
            common::kind::MAP_DELETE => Ok(Kind::MapDelete),
            common::kind::PACKET_DROP => Ok(Kind::PacketDrop),
            common::kind::MAP_WRITE => Ok(Kind::MapWrite),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::CtNew,
        Kind::CtDestroy,
        Kind::MapDelete,
        Kind::PacketDrop,
        Kind::MapWrite,
    ];

    pub fn raw(self) -> u8 {
        match self {
            Kind::CtNew => common::kind::CT_NEW,
            Kind::CtDestroy => common::kind::CT_DESTROY,
            Kind::MapDelete => common::kind::MAP_DELETE,
            Kind::PacketDrop => common::kind::PACKET_DROP,
            Kind::MapWrite => common::kind::MAP_WRITE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::CtNew => "ct_new",
            Kind::CtDestroy => "ct_destroy",
            Kind::MapDelete => "map_delete",
            Kind::PacketDrop => "packet_drop",
            Kind::MapWrite => "map_write",
        }
    }
}

/// The two conntrack record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtKind {
    New,
    Destroy,
}

impl CtKind {
    pub fn kind(self) -> Kind {
        match self {
            CtKind::New => Kind::CtNew,
            CtKind::Destroy => Kind::CtDestroy,
        }
    }

    pub fn name(self) -> &'static str {
        self.kind().name()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DestroyReason {
    /// The entry's timeout had passed.
    Expired,
    /// Removed before its timeout.
    Killed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    NetDevQueue,
    ConsumeSkb,
    KfreeSkb,
    KmemCacheFree,
    KretprobeConfirm,
    KprobeDestroy,
    FexitConfirm,
    FentryDestroy,
}

impl TryFrom<u8> for Source {
    type Error = DecodeError;
    fn try_from(v: u8) -> Result<Self, DecodeError> {
        use common::source::*;
        Ok(match v {
            TP_NET_DEV_QUEUE => Source::NetDevQueue,
            TP_CONSUME_SKB => Source::ConsumeSkb,
            TP_KFREE_SKB => Source::KfreeSkb,
            TP_KMEM_CACHE_FREE => Source::KmemCacheFree,
            KRETPROBE_CONFIRM => Source::KretprobeConfirm,
            KPROBE_DESTROY => Source::KprobeDestroy,
            FEXIT_CONFIRM => Source::FexitConfirm,
            FENTRY_DESTROY => Source::FentryDestroy,
            value => {
                return Err(DecodeError::UnknownValue {
                    what: "source",
                    value,
                });
            }
        })
    }
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::NetDevQueue => "net_dev_queue",
            Source::ConsumeSkb => "consume_skb",
            Source::KfreeSkb => "kfree_skb",
            Source::KmemCacheFree => "kmem_cache_free",
            Source::KretprobeConfirm => "kretprobe:__nf_conntrack_confirm",
            Source::KprobeDestroy => "kprobe:nf_ct_destroy",
            Source::FexitConfirm => "fexit:__nf_conntrack_confirm",
            Source::FentryDestroy => "fentry:nf_ct_destroy",
        }
    }
}

/// One direction of a flow, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FlowTuple {
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl FlowTuple {
    pub fn from_raw(t: &common::Tuple) -> Result<Self, DecodeError> {
        let addr = |b: &[u8; 16]| -> Result<IpAddr, DecodeError> {
            match t.family {
                AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
                AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*b))),
                value => Err(DecodeError::UnknownValue {
                    what: "address family",
                    value,
                }),
            }
        };
        Ok(Self {
            proto: t.proto,
            src: addr(&t.src_addr)?,
            sport: t.src_port,
            dst: addr(&t.dst_addr)?,
            dport: t.dst_port,
        })
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// A [`FlowTuple`] packed for tables that hold one per flow: an IPv4 tuple in 13 bytes inline
/// (proto, then address and port of each end), an IPv6 (or mixed) one boxed with a family
/// byte per end; 16 bytes either way, against 40 for the tuple.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PackedTuple {
    V4([u8; 13]),
    V6(Box<[u8; 39]>),
}

impl PackedTuple {
    pub fn of(t: &FlowTuple) -> Self {
        match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut b = [0u8; 13];
                b[0] = t.proto;
                b[1..5].copy_from_slice(&s.octets());
                b[5..7].copy_from_slice(&t.sport.to_be_bytes());
                b[7..11].copy_from_slice(&d.octets());
                b[11..13].copy_from_slice(&t.dport.to_be_bytes());
                PackedTuple::V4(b)
            }
            _ => {
                let mut b = [0u8; 39];
                b[0] = t.proto;
                for (at, addr, port) in [(1, t.src, t.sport), (20, t.dst, t.dport)] {
                    let (family, bytes) = match addr {
                        IpAddr::V4(a) => (4, a.to_ipv6_mapped().octets()),
                        IpAddr::V6(a) => (6, a.octets()),
                    };
                    b[at] = family;
                    b[at + 1..at + 17].copy_from_slice(&bytes);
                    b[at + 17..at + 19].copy_from_slice(&port.to_be_bytes());
                }
                PackedTuple::V6(Box::new(b))
            }
        }
    }

    pub fn tuple(&self) -> FlowTuple {
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        match self {
            PackedTuple::V4(b) => FlowTuple {
                proto: b[0],
                src: IpAddr::V4(Ipv4Addr::new(b[1], b[2], b[3], b[4])),
                sport: port(&b[5..7]),
                dst: IpAddr::V4(Ipv4Addr::new(b[7], b[8], b[9], b[10])),
                dport: port(&b[11..13]),
            },
            PackedTuple::V6(b) => {
                let addr = |at: usize| -> IpAddr {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&b[at + 1..at + 17]);
                    let a = Ipv6Addr::from(o);
                    match (b[at], a.to_ipv4_mapped()) {
                        (4, Some(v4)) => IpAddr::V4(v4),
                        _ => IpAddr::V6(a),
                    }
                };
                FlowTuple {
                    proto: b[0],
                    src: addr(1),
                    sport: port(&b[18..20]),
                    dst: addr(20),
                    dport: port(&b[37..39]),
                }
            }
        }
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => format!("proto{other}"),
    }
}

impl std::fmt::Display for FlowTuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ep = |ip: &IpAddr, port: u16| match ip {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "{} -> {}",
            ep(&self.src, self.sport),
            ep(&self.dst, self.dport)
        )
    }
}

/// The task in whose context the probe fired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
}

impl From<&common::TaskInfo> for Task {
    fn from(t: &common::TaskInfo) -> Self {
        let end = t.comm.iter().position(|&b| b == 0).unwrap_or(t.comm.len());
        Self {
            pid: t.pid,
            tid: t.tid,
            comm: String::from_utf8_lossy(&t.comm[..end]).into_owned(),
        }
    }
}

/// A conntrack NEW or DESTROY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CtRecord {
    pub kind: CtKind,
    pub ts_ns: u64,
    pub cpu: u32,
    pub orig: FlowTuple,
    pub reply: FlowTuple,
    /// Stable id of this entry's lifetime (kernel address + birth time).
    pub id: u64,
    pub ct_addr: u64,
    /// Kernel ts of the entry's NEW (DESTROY: 0 when the entry predates the detector).
    pub born_ns: u64,
    pub jiffies: u64,
    pub status: u32,
    pub netns: u32,
    pub timeout_left_jiffies: i32,
    pub reason: Option<DestroyReason>,
    pub source: Source,
    pub task: Task,
}

/// Stable id of one entry lifetime: the kernel address is unique while the entry lives and the
/// birth time separates lifetimes that reuse the address. FNV-1a keeps it cheap and portable.
pub fn entry_id(ct_addr: u64, born_ns: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ct_addr
        .to_le_bytes()
        .into_iter()
        .chain(born_ns.to_le_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The kernel's view, at the delete, of the conntrack entry for the deleted key's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteView {
    /// The key did not decode into a flow in the kernel (layout without a family).
    Unknown,
    Absent,
    Live,
    /// Timeout passed (or dying) but not freed yet.
    Expired,
}

/// A userspace delete on a watched map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapDeleteRecord {
    /// Syscall entry.
    pub ts_ns: u64,
    pub exit_ns: u64,
    pub cpu: u32,
    pub task: Task,
    pub map_id: u32,
    pub cmd: u32,
    /// 0 or a negative errno.
    pub ret: i64,
    pub key: Vec<u8>,
    pub view: DeleteView,
    /// The entry was found through the reversed key.
    pub view_reversed: bool,
    pub ct_addr: u64,
    /// 0 when unknown.
    pub ct_born_ns: u64,
    pub ct_timeout_left_jiffies: i32,
    pub ct_status: u32,
}

impl MapDeleteRecord {
    /// Id of the entry the kernel found, in the same form as `CtRecord::id`.
    pub fn entry_id(&self) -> Option<u64> {
        (self.ct_addr != 0).then(|| entry_id(self.ct_addr, self.ct_born_ns))
    }
}

/// A dropped packet of a flow whose key was deleted while the flow was live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PacketDropRecord {
    pub ts_ns: u64,
    pub cpu: u32,
    /// The packet's own direction.
    pub tuple: FlowTuple,
    /// `enum skb_drop_reason` value.
    pub reason: u32,
    /// The delete that put the flow on the watch list.
    pub delete_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MapOp {
    Update,
    Delete,
}

/// A write to a watched map seen in the kernel's hash-map code (kprobe/fentry backends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapWriteRecord {
    pub ts_ns: u64,
    pub cpu: u32,
    pub task: Task,
    pub map_id: u32,
    pub op: MapOp,
    /// Part of a bpf(2) call (userspace) rather than a BPF program (the datapath).
    pub from_syscall: bool,
    pub key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ct(CtRecord),
    MapDelete(MapDeleteRecord),
    PacketDrop(PacketDropRecord),
    MapWrite(MapWriteRecord),
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Ct(c) => c.ts_ns,
            Event::MapDelete(d) => d.ts_ns,
            Event::PacketDrop(p) => p.ts_ns,
            Event::MapWrite(w) => w.ts_ns,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Event::Ct(c) => c.kind.kind(),
            Event::MapDelete(_) => Kind::MapDelete,
            Event::PacketDrop(_) => Kind::PacketDrop,
            Event::MapWrite(_) => Kind::MapWrite,
        }
    }
}

/// Copies a `T` out of the front of `bytes` (ring-buffer data is not aligned for T).
fn read_record<T: Copy>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: length checked above; T is a padding-free repr(C) record of integers and byte
    // arrays (detector-common checks that at compile time), so any bytes are a valid T.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let hdr: EventHeader = read_record(bytes);
    if hdr.version != RECORD_VERSION {
        return Err(DecodeError::Version(hdr.version));
    }
    let kind = Kind::try_from(hdr.kind)?;
    let expect = match kind {
        Kind::CtNew | Kind::CtDestroy => size_of::<CtEvent>(),
        Kind::MapDelete => size_of::<MapDeleteEvent>(),
        Kind::PacketDrop => size_of::<PacketDropEvent>(),
        Kind::MapWrite => size_of::<MapWriteEvent>(),
    };
    if hdr.size as usize != expect || bytes.len() < expect {
        return Err(DecodeError::Length {
            kind: hdr.kind,
            claimed: hdr.size as usize,
            actual: bytes.len(),
        });
    }
    match kind {
        Kind::CtNew | Kind::CtDestroy => {
            let raw: CtEvent = read_record(bytes);
            let ct_kind = if kind == Kind::CtNew {
                CtKind::New
            } else {
                CtKind::Destroy
            };
            let reason = match (ct_kind, raw.reason) {
                (CtKind::New, _) => None,
                (_, common::reason::EXPIRED) => Some(DestroyReason::Expired),
                (_, common::reason::KILLED) => Some(DestroyReason::Killed),
                (_, value) => {
                    return Err(DecodeError::UnknownValue {
                        what: "destroy reason",
                        value,
                    });
                }
            };
            Ok(Event::Ct(CtRecord {
                kind: ct_kind,
                ts_ns: raw.hdr.ts_ns,
                cpu: raw.hdr.cpu,
                orig: FlowTuple::from_raw(&raw.orig)?,
                reply: FlowTuple::from_raw(&raw.reply)?,
                id: entry_id(raw.ct_addr, raw.born_ns),
                ct_addr: raw.ct_addr,
                born_ns: raw.born_ns,
                jiffies: raw.jiffies,
                status: raw.status,
                netns: raw.netns,
                timeout_left_jiffies: raw.timeout_left,
                reason,
                source: Source::try_from(raw.source)?,
                task: Task::from(&raw.task),
            }))
        }
        Kind::MapDelete => {
            let raw: MapDeleteEvent = read_record(bytes);
            let view = match raw.view {
                common::view::UNKNOWN => DeleteView::Unknown,
                common::view::ABSENT => DeleteView::Absent,
                common::view::LIVE => DeleteView::Live,
                common::view::EXPIRED => DeleteView::Expired,
                value => {
                    return Err(DecodeError::UnknownValue {
                        what: "delete view",
                        value,
                    });
                }
            };
            let n = (raw.key_size as usize).min(common::MAX_KEY);
            Ok(Event::MapDelete(MapDeleteRecord {
                ts_ns: raw.hdr.ts_ns,
                exit_ns: raw.exit_ns,
                cpu: raw.hdr.cpu,
                task: Task::from(&raw.task),
                map_id: raw.map_id,
                cmd: raw.cmd,
                ret: raw.ret,
                key: raw.key[..n].to_vec(),
                view,
                view_reversed: raw.view_reversed != 0,
                ct_addr: raw.ct_addr,
                ct_born_ns: raw.ct_born_ns,
                ct_timeout_left_jiffies: raw.ct_timeout_left,
                ct_status: raw.ct_status,
            }))
        }
        Kind::PacketDrop => {
            let raw: PacketDropEvent = read_record(bytes);
            Ok(Event::PacketDrop(PacketDropRecord {
                ts_ns: raw.hdr.ts_ns,
                cpu: raw.hdr.cpu,
                tuple: FlowTuple::from_raw(&raw.tuple)?,
                reason: raw.reason,
                delete_ns: raw.delete_ns,
            }))
        }
        Kind::MapWrite => {
            let raw: MapWriteEvent = read_record(bytes);
            let op = match raw.op {
                common::map_op::UPDATE => MapOp::Update,
                common::map_op::DELETE => MapOp::Delete,
                value => {
                    return Err(DecodeError::UnknownValue {
                        what: "map op",
                        value,
                    });
                }
            };
            let n = (raw.key_size as usize).min(common::MAX_KEY);
            Ok(Event::MapWrite(MapWriteRecord {
                ts_ns: raw.hdr.ts_ns,
                cpu: raw.hdr.cpu,
                task: Task::from(&raw.task),
                map_id: raw.map_id,
                op,
                from_syscall: raw.from_syscall != 0,
                key: raw.key[..n].to_vec(),
            }))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn packed_tuples_round_trip() {
        for (src, dst) in [
            ("10.0.0.1", "192.168.7.9"),
            ("fd00::1", "2001:db8::7"),
            ("10.0.0.1", "fd00::2"),
            ("::ffff:10.0.0.1", "fd00::2"),
        ] {
            let t = FlowTuple {
                proto: 6,
                src: src.parse().unwrap(),
                sport: 40000,
                dst: dst.parse().unwrap(),
                dport: 443,
            };
            let p = PackedTuple::of(&t);
            assert_eq!(p.tuple(), t, "{src} -> {dst}");
            assert_eq!(
                matches!(p, PackedTuple::V4(_)),
                src.contains('.') && dst.contains('.') && !src.contains(':')
            );
        }
        assert_eq!(std::mem::size_of::<PackedTuple>(), 16);
    }
    use detector_common::{TaskInfo, Tuple, kind, reason, source};

    pub fn raw_ct(k: u8) -> CtEvent {
        let mut orig = Tuple {
            family: AF_INET,
            proto: 6,
            src_port: 40000,
            dst_port: 5001,
            ..Default::default()
        };
        orig.src_addr[..4].copy_from_slice(&[10, 77, 0, 2]);
        orig.dst_addr[..4].copy_from_slice(&[10, 77, 0, 1]);
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        CtEvent {
            hdr: EventHeader {
                kind: k,
                version: RECORD_VERSION,
                size: size_of::<CtEvent>() as u16,
                cpu: 1,
                ts_ns: 123,
            },
            orig,
            reply: orig,
            ct_addr: 0xffff_8880_0000_1000,
            born_ns: 100,
            jiffies: 5,
            status: 0x18e,
            netns: 4026532177,
            timeout_left: -3,
            reason: if k == kind::CT_DESTROY {
                reason::EXPIRED
            } else {
                0
            },
            source: source::TP_KMEM_CACHE_FREE,
            _pad: 0,
            task: TaskInfo {
                pid: 7,
                tid: 8,
                comm,
            },
        }
    }

    pub fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over padding-free repr(C) records.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_a_destroy() {
        let raw = raw_ct(kind::CT_DESTROY);
        let Event::Ct(c) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a ct record")
        };
        assert_eq!(c.kind, CtKind::Destroy);
        assert_eq!(c.reason, Some(DestroyReason::Expired));
        assert_eq!(c.orig.to_string(), "10.77.0.2:40000 -> 10.77.0.1:5001");
        assert_eq!(c.task.comm, "curl");
        assert_eq!(c.source, Source::KmemCacheFree);
        assert_eq!(c.id, entry_id(raw.ct_addr, raw.born_ns));
        assert_eq!(c.netns, 4026532177);
    }

    #[test]
    fn decodes_a_map_delete() {
        let mut raw = MapDeleteEvent::ZERO;
        raw.hdr = EventHeader {
            kind: kind::MAP_DELETE,
            version: RECORD_VERSION,
            size: size_of::<MapDeleteEvent>() as u16,
            cpu: 0,
            ts_ns: 10,
        };
        raw.map_id = 42;
        raw.ret = -2;
        raw.key_size = 24;
        raw.key[0] = 10;
        raw.view = detector_common::view::LIVE;
        raw.ct_addr = 0x1000;
        raw.ct_born_ns = 5;
        let Event::MapDelete(d) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a map delete");
        };
        assert_eq!(d.key.len(), 24);
        assert_eq!(d.key[0], 10);
        assert_eq!(d.view, DeleteView::Live);
        assert_eq!(d.entry_id(), Some(entry_id(0x1000, 5)));
        raw.view = 9;
        assert!(decode(&bytes_of(&raw)).is_err());
    }

    #[test]
    fn decodes_a_map_write() {
        let raw = detector_common::MapWriteEvent {
            hdr: EventHeader {
                kind: kind::MAP_WRITE,
                version: RECORD_VERSION,
                size: size_of::<detector_common::MapWriteEvent>() as u16,
                cpu: 1,
                ts_ns: 9,
            },
            task: TaskInfo::default(),
            map_id: 7,
            key_size: 20,
            op: detector_common::map_op::UPDATE,
            from_syscall: 0,
            _pad: [0; 6],
            key: [1; detector_common::MAX_KEY],
        };
        let Event::MapWrite(w) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a map write");
        };
        assert_eq!(
            (w.op, w.from_syscall, w.key.len()),
            (MapOp::Update, false, 20)
        );
        let mut bad = raw;
        bad.op = 3;
        assert!(decode(&bytes_of(&bad)).is_err());
    }

    #[test]
    fn ids_separate_lifetimes_at_one_address() {
        assert_ne!(entry_id(0x1000, 1), entry_id(0x1000, 2));
        assert_eq!(entry_id(0x1000, 1), entry_id(0x1000, 1));
    }

    #[test]
    fn decodes_ipv6() {
        let mut raw = raw_ct(kind::CT_NEW);
        raw.orig.family = AF_INET6;
        raw.orig.src_addr = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
        raw.orig.dst_addr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        let Event::Ct(c) = decode(&bytes_of(&raw)).unwrap() else {
            panic!("not a ct record")
        };
        assert_eq!(c.orig.to_string(), "[fd00::2]:40000 -> [fd00::1]:5001");
        assert_eq!(c.reason, None);
    }

    #[test]
    fn rejects_short_and_mislabelled_records() {
        let raw = raw_ct(kind::CT_NEW);
        let b = bytes_of(&raw);
        assert_eq!(decode(&b[..10]), Err(DecodeError::Short(10)));
        assert!(matches!(
            decode(&b[..b.len() - 1]),
            Err(DecodeError::Length { .. })
        ));
        let mut wrong_size = raw;
        wrong_size.hdr.size -= 8;
        assert!(matches!(
            decode(&bytes_of(&wrong_size)),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn rejects_unknown_kinds_and_values() {
        let mut raw = raw_ct(kind::CT_NEW);
        raw.hdr.kind = 99;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::UnknownKind(99)));
        let mut raw = raw_ct(kind::CT_DESTROY);
        raw.reason = 42;
        assert!(matches!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::UnknownValue {
                what: "destroy reason",
                value: 42
            })
        ));
        let mut raw = raw_ct(kind::CT_NEW);
        raw.orig.family = 3;
        assert!(matches!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::UnknownValue {
                what: "address family",
                ..
            })
        ));
        let mut raw = raw_ct(kind::CT_NEW);
        raw.source = 200;
        assert!(decode(&bytes_of(&raw)).is_err());
        let mut raw = raw_ct(kind::CT_NEW);
        raw.hdr.version = 9;
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::Version(9)));
    }
}
