//! The event loop shared by `trace` and `run`: ring buffer -> decode -> reorder by kernel
//! timestamp, a periodic tick, loss checks, and a clean stop on SIGINT, SIGTERM or a deadline.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::{Instant, Interval};

use crate::clock;
use crate::kernel::reader::Reader;
use crate::pipeline::release_timer::ReleaseTimer;
use crate::pipeline::reorder::{Reorder, ReorderStats};
use crate::record::Event;

/// What one turn of the loop produced (released events are appended to the caller's vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Records arrived (some may have been released).
    Events,
    /// Time passed. `now_ns` is kernel monotonic time minus the watermark: every record older
    /// than it has been released. `second` is set about once a second. `losses` is set when
    /// the kernel counted records it could not deliver since the previous check (every
    /// 100 ms): how many, and since when (the previous check, so that a window that may have
    /// lost records is flagged rather than missed).
    Tick {
        now_ns: u64,
        second: bool,
        losses: Option<(u64, u64)>,
    },
    /// Ctrl-C, SIGTERM or the deadline.
    Stop,
}

/// How far ahead of its due instant a record may leave when the release timer fires: at most
/// one timer wakeup per this much time, whatever the record rate.
const RELEASE_SLACK_NS: u64 = 250_000;

pub struct Stream {
    pub reader: Reader,
    reorder: Reorder<Event>,
    release_timer: ReleaseTimer,
    incoming: Vec<Event>,
    tick: Interval,
    sigint: Signal,
    sigterm: Signal,
    deadline: Option<Instant>,
    watermark_ns: u64,
    last_lost: u64,
    last_check: Instant,
    last_check_ns: u64,
    last_second: Instant,
}

impl Stream {
    /// Must be called inside the tokio runtime.
    pub fn new(reader: Reader, watermark_ms: u64, duration_s: Option<f64>) -> Result<Self> {
        // Streams are created once, before the loop, so a signal that lands while the caller
        // works is not missed. A shell starts background jobs with SIGINT ignored, and a
        // handler is not installed over an inherited SIG_IGN by every runtime: restore the
        // default first, so `kill -INT` stops a backgrounded detector as cleanly as Ctrl-C.
        // SAFETY: resetting a signal disposition before any handler of ours exists.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
        let watermark_ns = watermark_ms.saturating_mul(1_000_000);
        Ok(Self {
            reader,
            reorder: Reorder::new(watermark_ns, 1 << 20),
            release_timer: ReleaseTimer::new().context("creating the release timer (timerfd)")?,
            incoming: Vec::new(),
            tick: tokio::time::interval(Duration::from_millis(5)),
            sigint: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            deadline: duration_s.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0))),
            watermark_ns,
            last_lost: 0,
            last_check: Instant::now(),
            last_check_ns: clock::monotonic_ns(),
            last_second: Instant::now(),
        })
    }

    /// Waits for the next thing to do.
    ///
    /// Records are released as soon as they pass the watermark: the loop wakes when the ring
    /// buffer has data and at the instant the oldest held record is due (a timerfd, to the
    /// nanosecond), so a verdict waits the watermark and no polling period or timer rounding
    /// (less [`RELEASE_SLACK_NS`]).
    pub async fn next(&mut self, ready: &mut Vec<Event>) -> Result<Step> {
        let deadline = self.deadline;
        let due = self.reorder.next_release_ns();
        self.release_timer
            .arm(due)
            .context("arming the release timer")?;
        let due = due.is_some();
        tokio::select! {
            _ = self.sigint.recv() => Ok(Step::Stop),
            _ = self.sigterm.recv() => Ok(Step::Stop),
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => Ok(Step::Stop),
            r = self.reader.readable() => {
                r.context("waiting on the ring buffer")?;
                self.take_incoming(ready);
                self.reorder.release(clock::monotonic_ns(), ready);
                Ok(Step::Events)
            }
            r = self.release_timer.fired(), if due => {
                r.context("waiting on the release timer")?;
                // Read first, so nothing older than the release point stays behind.
                self.take_incoming(ready);
                // What falls due within the slack goes now too: under load every record has a
                // due instant of its own, and waking for each would cost a wakeup per record.
                // Each record is still held at least the watermark less the slack; one that
                // arrives later than that is counted as late, never dropped.
                self.reorder.release(clock::monotonic_ns() + RELEASE_SLACK_NS, ready);
                Ok(Step::Events)
            }
            _ = self.tick.tick() => {
                // Read what is waiting first, so nothing older than the release point stays
                // behind in the ring buffer.
                self.take_incoming(ready);
                let now = clock::monotonic_ns();
                self.reorder.release(now, ready);
                let second = self.last_second.elapsed() >= Duration::from_secs(1);
                if second {
                    self.last_second = Instant::now();
                }
                let mut losses = None;
                if self.last_check.elapsed() >= Duration::from_millis(100) {
                    self.last_check = Instant::now();
                    let since = self.last_check_ns;
                    self.last_check_ns = now;
                    let lost = self.reader.counters().incomplete_total();
                    if lost > self.last_lost {
                        let n = lost - self.last_lost;
                        tracing::warn!(
                            "{n} kernel records lost or not taken (ring buffer or a kernel table \
                             full; see the summary); total {lost}. Raise --ring-mib or \
                             --max-entries"
                        );
                        self.last_lost = lost;
                        losses = Some((n, since.saturating_sub(self.watermark_ns)));
                    }
                }
                Ok(Step::Tick { now_ns: now.saturating_sub(self.watermark_ns), second, losses })
            }
        }
    }

    fn take_incoming(&mut self, ready: &mut Vec<Event>) {
        self.reader.drain(&mut self.incoming);
        for ev in self.incoming.drain(..) {
            self.reorder.push(ev.ts_ns(), ev, ready);
        }
    }

    /// At shutdown: what is left in the ring buffer, then the reorder buffer, in order.
    pub fn finish(&mut self, ready: &mut Vec<Event>) {
        self.take_incoming(ready);
        self.reorder.drain(ready);
    }

    pub fn reorder_stats(&self) -> ReorderStats {
        self.reorder.stats()
    }
}
