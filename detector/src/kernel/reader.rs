//! Ring buffer reading: raw records -> decoded events, with decode failures counted.

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::{CounterSnapshot, Counters};
use crate::record::{self, DecodeError, Event};

pub struct Reader {
    ring: AsyncFd<RingBuf<MapData>>,
    counters: Counters,
    /// Records that did not decode (by error text), so a layout mismatch is visible.
    pub undecodable: u64,
    pub last_decode_error: Option<DecodeError>,
}

impl Reader {
    /// Must be called inside a tokio runtime.
    pub(super) fn new(ring: RingBuf<MapData>, counters: Counters) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
        // which only happens when the AsyncFd is.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            ring,
            counters,
            undecodable: 0,
            last_decode_error: None,
        })
    }

    /// Waits until the ring buffer has data (or is ready to be checked).
    pub async fn readable(&mut self) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        // Drain happens in `drain`; clearing readiness first means a record that arrives
        // while we drain wakes the next wait instead of being missed.
        guard.clear_ready();
        Ok(())
    }

    /// Decodes every record currently in the ring buffer into `out`.
    pub fn drain(&mut self, out: &mut Vec<Event>) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            match record::decode(&item) {
                Ok(ev) => out.push(ev),
                Err(e) => {
                    self.undecodable += 1;
                    self.last_decode_error = Some(e);
                }
            }
        }
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.counters.read()
    }
}
