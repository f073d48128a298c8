//! The event loop's release timer: a one-shot `CLOCK_MONOTONIC` timerfd armed at the instant
//! the oldest held record passes the watermark.
//!
//! tokio's timer works in whole milliseconds and rounds every deadline up, and its poll
//! timeout is rounded up again: a record due at the watermark came out up to 2 ms later, which
//! was most of a verdict's latency. A timerfd fires at the nanosecond it is set to (an
//! hrtimer), and tokio polls it like any descriptor. The records' timestamps are
//! `bpf_ktime_get_ns()`, the same clock.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub struct ReleaseTimer {
    fd: AsyncFd<OwnedFd>,
    /// The instant it is armed for (monotonic ns), 0 when disarmed.
    armed_ns: u64,
}

impl ReleaseTimer {
    /// Must be called inside the tokio runtime.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain timerfd_create(2); the result is checked and owned below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the OwnedFd is open and owned by the AsyncFd, which never replaces or closes
        // it before being dropped, so it names the same timer for the AsyncFd's life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd, armed_ns: 0 })
    }

    /// Arms the timer for monotonic `at_ns`, or disarms it with `None`. An instant already
    /// past fires at once.
    pub fn arm(&mut self, at_ns: Option<u64>) -> io::Result<()> {
        // 0 would disarm: the earliest instant that fires is 1 ns.
        let at = at_ns.map_or(0, |t| t.max(1));
        if at == self.armed_ns {
            return Ok(());
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_ns = at;
        Ok(())
    }

    /// Resolves once the armed instant has passed (never while disarmed).
    pub async fn fired(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads at most 8 bytes (a timerfd's expiration count) into a local buffer.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n == 8 {
                self.armed_ns = 0;
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            // Re-armed since it last fired (re-arming clears the count): wait again.
            guard.clear_ready();
        }
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
    use crate::clock;

    #[tokio::test(flavor = "current_thread")]
    async fn fires_once_the_armed_instant_has_passed() {
        let mut t = ReleaseTimer::new().unwrap();
        for delay_us in [300u64, 1500, 50] {
            let at = clock::monotonic_ns() + delay_us * 1000;
            t.arm(Some(at)).unwrap();
            t.fired().await.unwrap();
            let now = clock::monotonic_ns();
            assert!(now >= at, "fired {} ns early", at - now);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rearming_replaces_the_instant_and_disarming_silences_it() {
        let mut t = ReleaseTimer::new().unwrap();
        let now = clock::monotonic_ns();
        t.arm(Some(now + 3_600_000_000_000)).unwrap();
        t.arm(Some(now + 200_000)).unwrap();
        t.fired().await.unwrap();
        assert!(clock::monotonic_ns() >= now + 200_000);
        t.arm(Some(clock::monotonic_ns() + 100_000)).unwrap();
        t.arm(None).unwrap();
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(20), t.fired()).await;
        assert!(quiet.is_err(), "a disarmed timer fired");
    }
}
