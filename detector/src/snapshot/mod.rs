//! Start-up snapshot of the kernel conntrack table of one network namespace, over ctnetlink.
//!
//! [`dump`] asks the kernel for every conntrack entry (IPv4 and IPv6, all zones) of a network
//! namespace with one `IPCTNL_MSG_CT_GET` dump request on a `NETLINK_NETFILTER` socket, as
//! `conntrack -L` does. [`decode_messages`] is the pure decoder of the answer, usable (and
//! tested) without privileges.
//!
//! **Side effect:** a ctnetlink dump is not read-only. While walking the table the kernel
//! evicts the entries whose timeout has already passed but that the garbage collector has not
//! reaped yet (`ctnetlink_dump_table` kills them instead of dumping them). Each such eviction is
//! a conntrack DESTROY (`nf_ct_destroy`, a `DESTROY` ctnetlink event) happening at the moment
//! of the snapshot, so a tracer that is already running sees those expiries then, not when the
//! garbage collector would have found them; and such entries are not in the snapshot.

mod ctnetlink;
pub mod fill;
mod netlink;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

pub use ctnetlink::{DecodeError, Decoded, decode_messages, dump_request};

use crate::record::FlowTuple;

/// One conntrack entry as the kernel dumped it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CtSnapshotEntry {
    /// The original direction (`CTA_TUPLE_ORIG`): the flow as its first packet had it.
    pub orig: FlowTuple,
    /// The reply direction (`CTA_TUPLE_REPLY`): `orig` reversed, unless NAT rewrote it.
    pub reply: FlowTuple,
    /// `CTA_ID`: the kernel's id of the entry (stable while it lives).
    pub id: u32,
    /// `CTA_STATUS`: the `IPS_*` bits (`enum ip_conntrack_status`).
    pub status: u32,
    /// `CTA_TIMEOUT`: seconds left before the entry expires.
    pub timeout_s: u32,
    /// `CTA_ZONE`: the conntrack zone; 0 (the default zone) when the kernel sends none.
    pub zone: u16,
    /// `CTA_MARK`: the connection mark; 0 when the kernel sends none.
    pub mark: u32,
}

/// Why a snapshot could not be taken.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("cannot open network namespace {}: {source}", path.display())]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error(
        "cannot enter network namespace {} (setns CLONE_NEWNET; needs CAP_SYS_ADMIN and a network namespace file): {source}",
        path.display()
    )]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("cannot start the snapshot thread: {0}")]
    Thread(io::Error),
    #[error("the snapshot thread panicked")]
    ThreadPanicked,
    #[error("the conntrack dump needs CAP_NET_ADMIN (run as root)")]
    PermissionDenied,
    #[error("nf_conntrack_netlink is not available ({detail}): modprobe nf_conntrack_netlink")]
    NotAvailable { detail: String },
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(io::Error),
    #[error("cannot send the conntrack dump request: {0}")]
    Send(io::Error),
    #[error("cannot receive the conntrack dump: {0}")]
    Recv(io::Error),
    #[error("no answer from the kernel for {0} s before the dump ended (no NLMSG_DONE)")]
    Timeout(u64),
    #[error(
        "the netlink socket's receive buffer overflowed (ENOBUFS): the dump is incomplete, try again"
    )]
    Overrun,
    #[error("the kernel refused the conntrack dump: {0}")]
    Kernel(DecodeError),
    #[error("undecodable ctnetlink answer: {0}")]
    Decode(DecodeError),
}

impl From<DecodeError> for SnapshotError {
    /// Kernel error codes become the errors a user can act on; the rest stay decode errors.
    fn from(e: DecodeError) -> Self {
        let errno = match e {
            DecodeError::Kernel { errno, .. } | DecodeError::DumpFailed { errno, .. } => errno,
            DecodeError::Overrun { .. } => return SnapshotError::Overrun,
            other => return SnapshotError::Decode(other),
        };
        match errno {
            libc::EPERM | libc::EACCES => SnapshotError::PermissionDenied,
            libc::ENOENT | libc::EOPNOTSUPP | libc::EPROTONOSUPPORT => {
                SnapshotError::NotAvailable {
                    detail: format!("the kernel answered {e}"),
                }
            }
            libc::ENOBUFS => SnapshotError::Overrun,
            _ => SnapshotError::Kernel(e),
        }
    }
}

/// How long [`dump`] waits for each datagram of the answer.
pub const RECV_TIMEOUT_S: u64 = 10;

/// Dumps the conntrack table of the network namespace at `netns` (a path such as
/// `/run/netns/NAME` or `/proc/PID/ns/net`), or of the caller's namespace when `None`.
///
/// With a path, the dump runs on a dedicated thread that enters that namespace with
/// `setns(fd, CLONE_NEWNET)`; the namespace is per thread, so the rest of the process stays
/// where it is. Needs CAP_NET_ADMIN (and CAP_SYS_ADMIN to enter a namespace).
///
/// See the module documentation: the dump also makes the kernel evict entries that have
/// already expired (each a conntrack DESTROY at that moment).
pub fn dump(netns: Option<&Path>) -> Result<Vec<CtSnapshotEntry>, SnapshotError> {
    let mut entries = Vec::new();
    dump_each(netns, |chunk| {
        entries.extend(chunk);
        true
    })?;
    Ok(entries)
}

/// [`dump`], handing the entries to `each` a datagram at a time as they arrive, so a caller
/// can use them while the kernel is still dumping (and never holds the whole table twice);
/// `each` returning false ends the dump early.
pub fn dump_each(
    netns: Option<&Path>,
    each: impl FnMut(Vec<CtSnapshotEntry>) -> bool + Send,
) -> Result<(), SnapshotError> {
    let Some(path) = netns else {
        return netlink::dump_current_netns_each(each);
    };
    let file = File::open(path).map_err(|source| SnapshotError::OpenNetns {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("ct-snapshot".into())
            .spawn_scoped(s, move || {
                // SAFETY: `file` is an open descriptor for the life of the call; setns changes
                // the network namespace of this thread only (CLONE_NEWNET), which ends with the
                // dump.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(SnapshotError::EnterNetns {
                        path,
                        source: io::Error::last_os_error(),
                    });
                }
                drop(file);
                netlink::dump_current_netns_each(each)
            })
            .map_err(SnapshotError::Thread)?;
        worker.join().map_err(|_| SnapshotError::ThreadPanicked)?
    })
}
