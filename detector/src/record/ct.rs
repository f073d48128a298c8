//! Conntrack NEW and DESTROY records.

use detector_common::{self as common, CtEvent};
use serde::Serialize;

use super::{DecodeError, Event, FlowTuple, Kind, Task, read_record};

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
    /// Kernel time the entry's timeout runs (or ran) out; 0 when unknown (see
    /// `CtEvent::expiry_ns`).
    pub expiry_ns: u64,
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

/// Decodes a conntrack record of the right length (`new`: a NEW, else a DESTROY).
pub(super) fn decode(bytes: &[u8], new: bool) -> Result<Event, DecodeError> {
    let raw: CtEvent = read_record(bytes);
    let ct_kind = if new { CtKind::New } else { CtKind::Destroy };
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
        expiry_ns: raw.expiry_ns,
    }))
}
