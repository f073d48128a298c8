//! The emulated agent datapath: the lab's TC programs on the server pod's node-side veth and
//! its conntrack-cache map, pinned in the lab's own bpffs (never at NPA's path).

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType, tc};
use aya::{Ebpf, EbpfLoader};
use detector_common::lab::LabConfig;

use super::topology::{SERVER_IP, SERVER_VETH, netns_path};
use crate::npa::{KeyLayout, Layout};

/// The lab's own eBPF object (TC classifiers and their maps), built by `detector/build.rs`
/// beside the production object, which carries none of it.
static LAB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/detector-lab-ebpf.o"));

/// The datapath's programs and map; detached and unpinned on drop.
pub struct Datapath {
    // Field order is drop order: programs first, then the pin's filesystem.
    _ebpf: Ebpf,
    pub pin: PathBuf,
    pub layout: Layout,
    /// The node-side ifindex written into 24-byte keys.
    pub ifindex: u32,
    _bpffs: BpffsMount,
}

/// The lab's bpffs, unmounted (with everything pinned in it) on drop, including when the
/// attach fails halfway.
struct BpffsMount(PathBuf);

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl Datapath {
    /// Loads the datapath into namespace `node`, protecting the server pod's `port`.
    pub fn attach(node: &str, dir: &Path, layout: Layout, port: u16) -> Result<Self> {
        let key_size = match layout.key {
            KeyLayout::V4Ifindex => 24,
            KeyLayout::V4 => 20,
            other => bail!("the lab's datapath is IPv4: layout {other:?} is not supported"),
        };
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .status()
            .context("mounting the lab's bpffs")?;
        if !status.success() {
            bail!("mount -t bpf bpf {} failed", bpffs.display());
        }
        let mount = BpffsMount(bpffs.clone());
        let ns = netns_path(node);
        let server_ip: std::net::Ipv4Addr = SERVER_IP.parse()?;
        // Interface names and TC attachment are per network namespace: do it all on a thread
        // that has entered the node's.
        let (ebpf, ifindex) = std::thread::scope(|s| {
            s.spawn(|| -> Result<(Ebpf, u32)> {
                let f = std::fs::File::open(&ns).with_context(|| format!("{}", ns.display()))?;
                testbed::netns::enter(&f).with_context(|| format!("entering {}", ns.display()))?;
                let name = CString::new(SERVER_VETH)?;
                // SAFETY: valid NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
                if ifindex == 0 {
                    bail!("{SERVER_VETH} not found in {node}");
                }
                let cfg = LabConfig {
                    server_ip: u32::from_ne_bytes(server_ip.octets()),
                    allowed_port: port,
                    _pad: 0,
                    ifindex,
                    key_size,
                };
                let mut ebpf = EbpfLoader::new()
                    .override_global("LAB", &cfg, true)
                    .map_max_entries("LAB_CT24", 65_536)
                    .map_max_entries("LAB_CT20", 65_536)
                    .load(LAB_OBJECT)
                    .context("loading the lab datapath")?;
                let _ = tc::qdisc_add_clsact(name.as_c_str());
                for (prog, dir) in [
                    ("lab_to_pod", TcAttachType::Egress),
                    ("lab_from_pod", TcAttachType::Ingress),
                ] {
                    let p: &mut SchedClassifier = ebpf
                        .program_mut(prog)
                        .context("lab program missing from the object")?
                        .try_into()?;
                    p.load().with_context(|| format!("loading {prog}"))?;
                    p.attach(name.as_c_str(), dir)
                        .with_context(|| format!("attaching {prog} to {SERVER_VETH} {dir:?}"))?;
                }
                Ok((ebpf, ifindex))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the datapath thread panicked"))?
        })?;
        let map_name = if key_size == 24 {
            "LAB_CT24"
        } else {
            "LAB_CT20"
        };
        let pin = bpffs.join("aws_conntrack_map");
        ebpf.map(map_name)
            .context("lab map missing")?
            .pin(&pin)
            .with_context(|| format!("pinning the lab map at {}", pin.display()))?;
        Ok(Self {
            _ebpf: ebpf,
            pin,
            layout,
            ifindex,
            _bpffs: mount,
        })
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // Then the fields drop: the programs are detached, and the bpffs is unmounted.
        let _ = std::fs::remove_file(&self.pin);
    }
}
