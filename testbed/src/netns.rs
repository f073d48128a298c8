//! Named network namespaces (`/run/netns/<name>`): created and removed with `ip netns`,
//! commands run in them with `nsenter --net` and threads moved into them with setns(2). Both
//! keep the caller's /sys and bpffs mounts, unlike `ip netns exec`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cmd::run;
use crate::{Error, Result};

/// Where `ip netns add` binds a namespace's file.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

/// Creates the namespace `name`.
pub fn add(name: &str) -> Result<()> {
    run("ip", &["netns", "add", name]).map(drop)
}

/// Removes the namespace `name` (its veth ends go with it, and their peers).
pub fn delete(name: &str) -> Result<()> {
    run("ip", &["netns", "del", name]).map(drop)
}

/// The namespace file's inode: the id the kernel reports for the namespace.
pub fn inode(name: &str) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let p = path(name);
    std::fs::metadata(&p)
        .map(|m| m.ino())
        .map_err(|e| Error::io(format!("reading {}", p.display()), e))
}

/// Runs a command in the namespace `ns`; its stdout, or an error with its stderr.
pub fn exec_in(ns: &str, cmd: &str, args: &[&str]) -> Result<String> {
    let net = format!("--net={}", path(ns).display());
    let mut all = vec![net.as_str(), cmd];
    all.extend_from_slice(args);
    run("nsenter", &all)
}

/// Starts a command in the namespace `ns` with piped stdout and stderr.
pub fn spawn_in(ns: &str, cmd: &str, args: &[&str]) -> Result<Child> {
    Command::new("nsenter")
        .arg(format!("--net={}", path(ns).display()))
        .arg(cmd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            cmd: format!("{cmd} in {ns}"),
            source,
        })
}

/// Moves the calling thread into the network namespace open as `file`.
pub fn enter(file: &File) -> Result<()> {
    // SAFETY: setns on a descriptor `file` keeps open for the call; CLONE_NEWNET changes only
    // the calling thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::last_os("setns"));
    }
    Ok(())
}

/// Runs `f` on a new thread that entered the namespace at `ns` (a path such as [`path`]'s):
/// sockets it creates belong to that namespace for their whole life, whichever thread uses
/// them later. An error when the namespace cannot be entered or `f` panics.
pub fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let file = File::open(ns).map_err(|e| Error::io(format!("opening {}", ns.display()), e))?;
    std::thread::spawn(move || -> Result<T> {
        enter(&file)?;
        Ok(f())
    })
    .join()
    .map_err(|_| Error::ThreadPanicked)?
}

/// Names in /run/netns that start with `prefix` and whose creator is gone: the text after
/// `prefix` up to the next `-` is the pid of the process that made it.
pub fn orphans(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.strip_prefix(prefix).is_some_and(|rest| {
                let pid = rest.split('-').next().unwrap_or("");
                pid.parse::<u32>()
                    .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
            })
        })
        .collect()
}
