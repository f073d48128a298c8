//! Finding the agent's conntrack map: by id, by pin path, or by name; reading its layout and
//! contents; and the key offsets the kernel programs need to decode its keys.

use std::path::PathBuf;

use aya::maps::{MapInfo, MapType};
use detector_common::{AF_INET, AF_INET6, TargetMap};
use thiserror::Error;

use super::layout::{KeyLayout, Layout, LayoutError};

/// NPA's defaults.
pub const NPA_PIN: &str = "/sys/fs/bpf/globals/aws/maps/global_aws_conntrack_map";
pub const NPA_NAME: &str = "aws_conntrack_map";
/// The kernel keeps map names to BPF_OBJ_NAME_LEN - 1 bytes.
const KERNEL_NAME_LEN: usize = 15;

#[derive(Debug, Error)]
pub enum TargetError {
    #[error(
        "no agent conntrack map found: {pin}no loaded hash map of a known layout is named \
         `{name}`. Is the network policy agent running on this node? Point --map-pin, --map-id \
         or --map-name at its map"
    )]
    NotFound { pin: String, name: String },
    #[error("map id {id}: {source}. List maps with `bpftool map list`")]
    Id {
        id: u32,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot open pinned map {path}: {source}. Is bpffs mounted at /sys/fs/bpf?")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "no agent conntrack map found: nothing is pinned at {path} (an explicit --map-pin is \
         never replaced by a lookup by name). Is the network policy agent running on this node, \
         and bpffs mounted there? Point --map-pin or --map-id at its map"
    )]
    PinMissing { path: PathBuf },
    #[error("{path} holds a BPF {object}, not a map: point --map-pin at the agent's conntrack map")]
    NotAMap { path: PathBuf, object: String },
    #[error("map {id} ({name}) is a {kind:?} map, not a hash map: wrong map selected")]
    WrongType { id: u32, name: String, kind: String },
    #[error("map {id} ({name}): {source}")]
    Layout {
        id: u32,
        name: String,
        #[source]
        source: LayoutError,
    },
    #[error(
        "map {id} was replaced by map {now} at its pin while starting (agent restart?): run \
         again"
    )]
    Replaced { id: u32, now: u32 },
    #[error("reading map {id}: {source}")]
    Read {
        id: u32,
        #[source]
        source: aya::maps::MapError,
    },
}

/// How the user named the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapBy {
    /// `--map-id`: that map only, never followed across agent restarts.
    Id(u32),
    /// `--map-pin`: only the map at that pin; while the pin is missing the detector waits for
    /// it, it never looks a map up by name instead.
    Pin(PathBuf),
    /// `--map-name`: the newest hash/LRU-hash map of that name and a known layout.
    Name(String),
    /// Nothing given: NPA's pin when it exists, else a map named like NPA's.
    NpaDefaults,
}

impl MapBy {
    /// From the flags: the first given wins, id, then pin, then name.
    pub fn from_flags(id: Option<u32>, pin: Option<PathBuf>, name: Option<String>) -> Self {
        match (id, pin, name) {
            (Some(id), _, _) => Self::Id(id),
            (None, Some(pin), _) => Self::Pin(pin),
            (None, None, Some(name)) => Self::Name(name),
            (None, None, None) => Self::NpaDefaults,
        }
    }
}

/// The map to watch, and the layout to read it with.
#[derive(Debug, Clone)]
pub struct MapSpec {
    pub by: MapBy,
    /// Overrides the layout detected from the key and value sizes.
    pub layout: Option<Layout>,
}

/// The map found, with its layout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentMap {
    pub id: u32,
    pub name: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub layout: Layout,
    /// "id", "pin <path>" or "name".
    pub found_by: String,
    /// The pin it was found by: its keys are then read through the pin, which needs only
    /// access to the bpffs file, where opening a map by id needs CAP_SYS_ADMIN.
    #[serde(skip)]
    pub pin: Option<PathBuf>,
}

/// Whether a map of this type and these sizes can be the agent's conntrack map: a hash or LRU
/// hash whose key and value sizes are a known layout (or `forced`'s sizes).
fn could_be_agent_map(
    kind: Option<MapType>,
    key_size: u32,
    value_size: u32,
    forced: Option<Layout>,
) -> bool {
    let hash = matches!(kind, Some(MapType::LruHash | MapType::Hash));
    let sizes = match forced {
        Some(l) => l.key.size() as u32 == key_size && l.value.size() as u32 == value_size,
        None => Layout::detect(key_size, value_size).is_ok(),
    };
    hash && sizes
}

fn info_by_name(name: &str, forced: Option<Layout>) -> Option<MapInfo> {
    let short = &name[..name.len().min(KERNEL_NAME_LEN)];
    let (fit, skipped): (Vec<MapInfo>, Vec<MapInfo>) = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter(|m| m.name_as_str() == Some(short))
        .partition(|m| could_be_agent_map(m.map_type().ok(), m.key_size(), m.value_size(), forced));
    for m in &skipped {
        tracing::warn!(
            "map {} is named `{short}` but is not a hash/LRU-hash map of a known layout ({:?}, \
             key {} B, value {} B): skipped",
            m.id(),
            m.map_type(),
            m.key_size(),
            m.value_size()
        );
    }
    // Several maps of that name (an agent restart leaves the old one until its users close
    // it): the newest has the highest id.
    fit.into_iter().max_by_key(|m| m.id())
}

/// A forced `--layout` whose sizes differ from a map whose own sizes are a known layout is a
/// mistake (every key would be undecodable): an error naming both.
fn check_forced_layout(forced: Layout, key_size: u32, value_size: u32) -> Result<(), LayoutError> {
    match Layout::detect(key_size, value_size) {
        Ok(actual) if actual != forced => Err(LayoutError::Mismatch {
            forced,
            actual,
            key_size,
            value_size,
        }),
        _ => Ok(()),
    }
}

/// What kind of BPF object is pinned at `path` ("map", "program", "link"...), from the
/// `*_type:` line of its fd's /proc/self/fdinfo; None when it cannot be opened or told.
fn pinned_object_kind(path: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // union bpf_attr for BPF_OBJ_GET: { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags;
    // ... }; the rest zero.
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: bpf(2) reads `attr` (a zeroed buffer larger than the command's part of union
    // bpf_attr) and the NUL-terminated path it points to, both alive across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"));
    // SAFETY: `fd` was just returned by bpf(2) to this function and is closed once, here.
    unsafe { libc::close(fd as libc::c_int) };
    info.ok()?.lines().find_map(|l| {
        let (kind, _) = l.split_once("_type:")?;
        Some(if kind == "prog" {
            "program".to_string()
        } else {
            kind.to_string()
        })
    })
}

/// Something other than a map at the pin (a program, a link) is a clear error, not a map of
/// garbage sizes.
fn check_pin_is_a_map(path: &std::path::Path) -> Result<(), TargetError> {
    match pinned_object_kind(path) {
        Some(kind) if kind != "map" => Err(TargetError::NotAMap {
            path: path.to_path_buf(),
            object: kind,
        }),
        _ => Ok(()),
    }
}

/// Finds the map and checks it.
pub fn resolve(spec: &MapSpec) -> Result<AgentMap, TargetError> {
    let by_pin = |pin: &PathBuf| -> Result<_, TargetError> {
        check_pin_is_a_map(pin)?;
        Ok((
            MapInfo::from_pin(pin).map_err(|source| TargetError::Pin {
                path: pin.clone(),
                source,
            })?,
            format!("pin {}", pin.display()),
            Some(pin.clone()),
        ))
    };
    let npa_pin = PathBuf::from(NPA_PIN);
    let (info, found_by, pin) = match &spec.by {
        MapBy::Id(id) => (
            MapInfo::from_id(*id).map_err(|source| TargetError::Id { id: *id, source })?,
            "id".to_string(),
            None,
        ),
        // `symlink_metadata`: a dangling entry is still something at the pin, to be named.
        MapBy::Pin(pin) if pin.symlink_metadata().is_ok() => by_pin(pin)?,
        MapBy::Pin(pin) => return Err(TargetError::PinMissing { path: pin.clone() }),
        MapBy::NpaDefaults if npa_pin.exists() => by_pin(&npa_pin)?,
        MapBy::Name(_) | MapBy::NpaDefaults => {
            let name = match &spec.by {
                MapBy::Name(n) => n.as_str(),
                _ => NPA_NAME,
            };
            let info = info_by_name(name, spec.layout).ok_or_else(|| TargetError::NotFound {
                pin: if spec.by == MapBy::NpaDefaults {
                    format!("{NPA_PIN} does not exist and ")
                } else {
                    String::new()
                },
                name: name.to_string(),
            })?;
            (info, "name".to_string(), None)
        }
    };
    let id = info.id();
    let name = info.name_as_str().unwrap_or("").to_string();
    match info.map_type() {
        Ok(MapType::LruHash | MapType::Hash | MapType::LruPerCpuHash | MapType::PerCpuHash) => {}
        other => {
            return Err(TargetError::WrongType {
                id,
                name,
                kind: format!("{other:?}"),
            });
        }
    }
    let layout = match spec.layout {
        Some(l) => {
            check_forced_layout(l, info.key_size(), info.value_size()).map_err(|source| {
                TargetError::Layout {
                    id,
                    name: name.clone(),
                    source,
                }
            })?;
            l
        }
        None => Layout::detect(info.key_size(), info.value_size()).map_err(|source| {
            TargetError::Layout {
                id,
                name: name.clone(),
                source,
            }
        })?,
    };
    Ok(AgentMap {
        id,
        name,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        layout,
        found_by,
        pin,
    })
}

/// A process holding the map open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    pub pid: u32,
    pub fd: u32,
    pub comm: String,
}

/// The (pid, fd) pairs that refer to map `id`, from /proc/*/fdinfo (`map_id:` lines). This is
/// for display: the kernel programs resolve each delete's fd to a map id themselves, so an fd
/// opened later is still recognised.
pub fn holders(id: u32) -> Vec<Holder> {
    let want = format!("map_id:\t{id}");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(Result::ok) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for f in fds.filter_map(Result::ok) {
            let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_to_string(f.path()).is_ok_and(|t| t.lines().any(|l| l == want)) {
                let comm = std::fs::read_to_string(p.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                out.push(Holder { pid, fd, comm });
            }
        }
    }
    out
}

/// Where the flow fields sit in a key of `layout`, and the namespace whose conntrack entries
/// judge the map's deletes, for the kernel programs.
pub fn target_map(layout: KeyLayout, netns: u32) -> TargetMap {
    let o = layout.offsets();
    TargetMap {
        family: u32::from(if layout.is_ipv6() { AF_INET6 } else { AF_INET }),
        off_src: o.src as u32,
        off_sport: o.sport as u32,
        off_dst: o.dst as u32,
        off_dport: o.dport as u32,
        off_proto: o.proto as u32,
        netns,
    }
}

#[cfg(test)]
mod strict_tests {
    use super::*;

    #[test]
    fn only_hash_maps_of_a_known_layout_are_taken_by_name() {
        assert!(could_be_agent_map(Some(MapType::LruHash), 24, 16, None));
        assert!(could_be_agent_map(Some(MapType::Hash), 20, 1, None));
        assert!(!could_be_agent_map(Some(MapType::Array), 24, 16, None));
        assert!(!could_be_agent_map(Some(MapType::LruHash), 4, 4, None));
        assert!(!could_be_agent_map(None, 24, 16, None));
    }

    #[test]
    fn a_forced_layout_must_match_a_known_layouts_sizes() {
        let forced: Layout = "v4-20/1".parse().unwrap_or_else(|e| panic!("{e}"));
        let err = check_forced_layout(forced, 24, 16)
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("v4-20/1") && err.contains("v4-24/16"), "{err}");
        assert!(check_forced_layout(forced, 20, 1).is_ok());
        // Sizes of no known layout: forcing is what --layout is for.
        assert!(check_forced_layout(forced, 28, 1).is_ok());
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;
    use crate::npa::NpaKey;

    #[test]
    fn kernel_offsets_match_the_codec() {
        for layout in KeyLayout::ALL {
            let t = target_map(layout, 1);
            let key = if layout.is_ipv6() {
                NpaKey {
                    src: "fd00::2".parse().unwrap(),
                    sport: 0x1234,
                    dst: "fd00::1".parse().unwrap(),
                    dport: 0x5678,
                    proto: 6,
                    owner: "fd00::1".parse().unwrap(),
                    ifindex: layout.has_ifindex().then_some(7),
                }
            } else {
                NpaKey {
                    src: "10.0.0.2".parse().unwrap(),
                    sport: 0x1234,
                    dst: "10.0.0.1".parse().unwrap(),
                    dport: 0x5678,
                    proto: 6,
                    owner: "10.0.0.1".parse().unwrap(),
                    ifindex: layout.has_ifindex().then_some(7),
                }
            };
            let b = key.encode(layout).unwrap();
            let at = |o: u32, n: usize| b[o as usize..o as usize + n].to_vec();
            let alen = if layout.is_ipv6() { 16 } else { 4 };
            let ip = |a: std::net::IpAddr| match a {
                std::net::IpAddr::V4(v) => v.octets().to_vec(),
                std::net::IpAddr::V6(v) => v.octets().to_vec(),
            };
            assert_eq!(at(t.off_src, alen), ip(key.src), "{layout:?}");
            assert_eq!(at(t.off_dst, alen), ip(key.dst), "{layout:?}");
            assert_eq!(at(t.off_sport, 2), 0x1234u16.to_ne_bytes().to_vec());
            assert_eq!(at(t.off_dport, 2), 0x5678u16.to_ne_bytes().to_vec());
            assert_eq!(b[t.off_proto as usize], 6);
        }
    }
}
