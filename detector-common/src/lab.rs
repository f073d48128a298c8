//! The lab's record: what `detector lab` writes into its emulated NPA datapath (the
//! `detector-lab-ebpf` object). Behind the `lab` feature, so production code cannot use it.

/// The lab's emulated agent datapath (NPA's TC programs): which pod the policy protects and
/// the map layout to write (`LAB` global of the object).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabConfig {
    /// The server pod's IPv4 address, network order (as in the packet).
    pub server_ip: u32,
    /// The one port the server's ingress policy allows (host order).
    pub allowed_port: u16,
    pub _pad: u16,
    /// Written into 24-byte keys (NPA v1.3.7+): the node-side interface of the pod.
    pub ifindex: u32,
    /// Key size: 24 (with ifindex, 16-byte value with last_seen) or 20 (1-byte value).
    pub key_size: u32,
}

impl LabConfig {
    pub const ZERO: Self = Self {
        server_ip: 0,
        allowed_port: 0,
        _pad: 0,
        ifindex: 0,
        key_size: 0,
    };
}

const _: () = assert!(core::mem::size_of::<LabConfig>() == 16);

// SAFETY: repr(C), only integers, no padding (size checked above): every bit pattern is a
// valid LabConfig and there are no uninitialised bytes.
#[cfg(feature = "user")]
unsafe impl aya::Pod for LabConfig {}
