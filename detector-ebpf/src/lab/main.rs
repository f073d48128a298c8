//! The lab's emulated agent datapath: what NPA's TC programs do for a pod whose policy isolates
//! both directions. Attached on the node-side veth of the server pod: `lab_to_pod` on its tc
//! egress (packets into the pod, NPA's handle_ingress), `lab_from_pod` on its tc ingress
//! (packets out of the pod, NPA's handle_egress). A new allowed flow inserts its key into the
//! conntrack-cache map; a packet from the pod passes only while its flow's key exists, and
//! every hit stamps `last_seen` as the fixed NPA (#610) does.
//!
//! Its own object (`detector-lab-ebpf`), loaded only by `detector lab`: the detector's
//! production object carries no TC program.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::LruHashMap,
    programs::TcContext,
};
use detector_common::lab::LabConfig;

#[unsafe(no_mangle)]
static LAB: Global<LabConfig> = Global::new(LabConfig::ZERO);

/// NPA v1.3.7+ key (24 bytes) and the #610 value.
#[repr(C)]
#[derive(Clone, Copy)]
struct Key24 {
    src_ip: u32,
    src_port: u16,
    _pad0: u16,
    dst_ip: u32,
    dst_port: u16,
    proto: u8,
    _pad1: u8,
    owner_ip: u32,
    ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Val16 {
    val: u64,
    last_seen: u64,
}

/// NPA before v1.3.7: 20-byte key, 1-byte value.
#[repr(C)]
#[derive(Clone, Copy)]
struct Key20 {
    src_ip: u32,
    src_port: u16,
    _pad0: u16,
    dst_ip: u32,
    dst_port: u16,
    proto: u8,
    _pad1: u8,
    owner_ip: u32,
}

#[map]
static LAB_CT24: LruHashMap<Key24, Val16> = LruHashMap::with_max_entries(1024, 0);

#[map]
static LAB_CT20: LruHashMap<Key20, u8> = LruHashMap::with_max_entries(1024, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;

/// (src ip, src port, dst ip, dst port, proto) of an IPv4 TCP/UDP packet; ports host order.
#[inline(always)]
fn flow(ctx: &TcContext) -> Option<(u32, u16, u32, u16, u8)> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != 6 && proto != 17 {
        return None;
    }
    let src: u32 = ctx.load(ETH_HLEN + 12).ok()?;
    let dst: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    let l4 = ETH_HLEN + ((vihl & 0x0f) as usize) * 4;
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;
    Some((src, u16::from_be(sport), dst, u16::from_be(dport), proto))
}

/// Looks the key up; on a hit stamps last_seen. With `insert`, a miss inserts it.
#[inline(always)]
fn touch(cfg: &LabConfig, k: (u32, u16, u32, u16, u8), insert: bool) -> bool {
    let (src_ip, src_port, dst_ip, dst_port, proto) = k;
    // SAFETY: an argument-less helper that only returns a value.
    let now = unsafe { bpf_ktime_get_ns() };
    if cfg.key_size == 20 {
        let key = Key20 {
            src_ip,
            src_port,
            _pad0: 0,
            dst_ip,
            dst_port,
            proto,
            _pad1: 0,
            owner_ip: cfg.server_ip,
        };
        // SAFETY: only the presence of the value is tested; it is not read.
        if unsafe { LAB_CT20.get(&key) }.is_some() {
            return true;
        }
        return insert && LAB_CT20.insert(&key, &1, 0).is_ok();
    }
    let key = Key24 {
        src_ip,
        src_port,
        _pad0: 0,
        dst_ip,
        dst_port,
        proto,
        _pad1: 0,
        owner_ip: cfg.server_ip,
        ifindex: cfg.ifindex,
    };
    if let Some(v) = LAB_CT24.get_ptr_mut(&key) {
        // SAFETY: a map value, valid for the program's run; a concurrent stamp writes a time
        // just as good.
        unsafe { (*v).last_seen = now };
        return true;
    }
    insert
        && LAB_CT24
            .insert(
                &key,
                &Val16 {
                    val: 1,
                    last_seen: now,
                },
                0,
            )
            .is_ok()
}

/// Into the server pod: the ingress policy allows the allowed port; a new flow gets its key.
#[classifier]
fn lab_to_pod(ctx: TcContext) -> i32 {
    let cfg = LAB.load();
    let Some(f) = flow(&ctx) else {
        return TC_ACT_OK;
    };
    let (_, _, dst, dport, _) = f;
    if dst != cfg.server_ip {
        return TC_ACT_OK;
    }
    if dport == cfg.allowed_port && touch(&cfg, f, true) {
        return TC_ACT_OK;
    }
    TC_ACT_SHOT
}

/// Out of the server pod: a reply passes only while its flow's key is in the map.
#[classifier]
fn lab_from_pod(ctx: TcContext) -> i32 {
    let cfg = LAB.load();
    let Some((src, sport, dst, dport, proto)) = flow(&ctx) else {
        return TC_ACT_OK;
    };
    if src != cfg.server_ip {
        return TC_ACT_OK;
    }
    // The flow's key is in the direction of its first packet: client -> server for flows
    // into the pod (the reverse of this packet), the packet's own for flows the pod opened.
    if touch(&cfg, (dst, dport, src, sport, proto), false)
        || touch(&cfg, (src, sport, dst, dport, proto), false)
    {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
