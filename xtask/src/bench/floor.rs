//! The floor of a BPF program's measured cost: an empty program (`r0 = 0; exit`) attached to a
//! raw tracepoint the detector also uses. bpf_stats times every run with two clock reads
//! around it, so even a program that does nothing costs some nanoseconds per run as bpf_stats
//! counts them; that figure, on the same machine and workload, is the lowest any of the
//! detector's programs can show.
//!
//! Made with raw bpf(2) calls, so that nothing of it reaches the detector's eBPF object.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use super::sys::ProgRuns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// `union bpf_attr` as bytes, zero beyond what is written (the kernel requires it).
type Attr = [u8; 128];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer that outlives the call; the pointers
    // written into it point at memory the caller keeps alive across the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put(attr: &mut Attr, off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

/// An empty program attached to a raw tracepoint; detached and unloaded on drop.
pub(super) struct EmptyProgram {
    prog: OwnedFd,
    _link: OwnedFd,
}

impl EmptyProgram {
    /// Loads the program (named `floor`) and attaches it to raw tracepoint `tracepoint`.
    pub(super) fn attach(tracepoint: &str) -> Result<Self> {
        // BPF_MOV64_IMM(R0, 0); BPF_EXIT_INSN().
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = c"GPL";
        let mut a: Attr = [0; 128];
        // prog_load: prog_type, insn_cnt, insns, license, ..., prog_name at 48.
        put(&mut a, 0, &BPF_PROG_TYPE_RAW_TRACEPOINT.to_ne_bytes());
        put(&mut a, 4, &2u32.to_ne_bytes());
        put(&mut a, 8, &(insns.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 16, &(license.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 48, b"floor");
        let prog = bpf(BPF_PROG_LOAD, &mut a).context("loading the empty BPF program")?;
        let name = CString::new(tracepoint)?;
        let mut a: Attr = [0; 128];
        // raw_tracepoint: name, prog_fd.
        put(&mut a, 0, &(name.as_ptr() as u64).to_ne_bytes());
        put(&mut a, 8, &(prog.as_raw_fd() as u32).to_ne_bytes());
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut a)
            .with_context(|| format!("attaching the empty BPF program to {tracepoint}"))?;
        Ok(Self { prog, _link: link })
    }

    /// Its counters so far (kernel.bpf_stats_enabled must be 1).
    pub(super) fn runs(&self) -> Result<ProgRuns> {
        let path = format!("/proc/self/fdinfo/{}", self.prog.as_raw_fd());
        let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        match super::sys::prog_runs(&s) {
            Some(runs) => Ok(runs),
            None => bail!("{path} has no run_time_ns/run_cnt: is kernel.bpf_stats_enabled set?"),
        }
    }
}
