//! Child processes that never outlive their test or bench.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// Kills and reaps a child process when dropped, even on a panic.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A child process that dies with its parent (PR_SET_PDEATHSIG) and is killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Starts `cmd` (stdin from /dev/null) under `name` (used in errors).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        // SAFETY: the closure runs between fork and exec and only calls prctl, which is
        // async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                cmd: name.to_string(),
                source,
            })?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT (a clean stop that prints summaries), then SIGKILL after `grace`: an error then.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| Error::Invalid(format!("{}: pid out of range", self.name)))?;
        // SAFETY: kill(2) on our own child's pid, which stays reserved until we reap it.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let end = Instant::now() + grace;
        loop {
            let status = self
                .child
                .try_wait()
                .map_err(|e| Error::io(format!("waiting for {}", self.name), e))?;
            if let Some(st) = status {
                return Ok(st);
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(Error::Invalid(format!(
                    "{} did not stop within {grace:?} of SIGINT (killed)",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
