//! Live streams for HTTP clients: a broadcast channel plus a bounded ring of the last N records,
//! replayed to each client on connect.
//!
//! Publishing never waits on a client: the broadcast channel drops the oldest records for a
//! client that reads too slowly, and that client gets a `lagged` marker with the count instead
//! of a stall of the detector.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use serde_json::json;
use tokio::sync::{broadcast, watch};

/// One record of a stream, rendered once for every client.
#[derive(Debug)]
pub struct Item {
    /// The NDJSON object (no newline), as `detector run --json` prints it.
    pub json: String,
    /// The readable line, as `detector run` prints it.
    pub text: String,
}

/// What a client receives next.
#[derive(Debug, Clone)]
pub enum Frame {
    Item(Arc<Item>),
    /// This client was too slow and missed this many records.
    Lagged(u64),
}

impl Frame {
    pub fn json(&self) -> String {
        match self {
            Frame::Item(i) => i.json.clone(),
            Frame::Lagged(n) => lagged_json(*n),
        }
    }

    pub fn text(&self) -> String {
        match self {
            Frame::Item(i) => i.text.clone(),
            Frame::Lagged(n) => lagged_text(*n),
        }
    }
}

pub fn lagged_json(n: u64) -> String {
    json!({"type": "lagged", "missed": n}).to_string()
}

pub fn lagged_text(n: u64) -> String {
    format!("LAGGED  {n} record(s) skipped: this client read too slowly")
}

/// One stream (races, or every event).
pub struct Channel {
    tx: broadcast::Sender<Arc<Item>>,
    /// Bumped by [`Channel::close_clients`]: the streams open then end after what they hold.
    closing: watch::Sender<u64>,
    /// The last `replay` records; locked together with sending so a new client's replay and
    /// its live part neither overlap nor leave a gap.
    ring: Mutex<VecDeque<Arc<Item>>>,
    replay: usize,
}

impl Channel {
    /// `replay`: records replayed on connect; `capacity`: records a client may fall behind
    /// before it is told it lagged.
    pub fn new(replay: usize, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            tx,
            closing: watch::Sender::new(0),
            ring: Mutex::new(VecDeque::with_capacity(replay.min(4096))),
            replay,
        }
    }

    pub fn publish(&self, item: Item) {
        let item = Arc::new(item);
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if self.replay > 0 {
            if ring.len() == self.replay {
                ring.pop_front();
            }
            ring.push_back(item.clone());
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.tx.send(item);
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.tx.receiver_count()
    }

    /// The replay and a receiver of everything published after it.
    pub fn subscribe(&self) -> Subscription {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        Subscription {
            replay: ring.iter().cloned().collect(),
            rx: self.tx.subscribe(),
            closing: self.closing.subscribe(),
        }
    }

    /// Ends every stream open now once it has sent what was published before (at shutdown,
    /// so clients see a clean end rather than a broken connection). Later clients are served
    /// as usual.
    pub fn close_clients(&self) {
        self.closing.send_modify(|g| *g += 1);
    }
}

pub struct Subscription {
    replay: VecDeque<Arc<Item>>,
    rx: broadcast::Receiver<Arc<Item>>,
    closing: watch::Receiver<u64>,
}

impl Subscription {
    /// The next frame; `None` when the detector is shutting down.
    pub async fn next(&mut self) -> Option<Frame> {
        if let Some(i) = self.replay.pop_front() {
            return Some(Frame::Item(i));
        }
        // Biased: what was published before the close is still delivered.
        tokio::select! {
            biased;
            r = self.rx.recv() => match r {
                Ok(i) => Some(Frame::Item(i)),
                Err(broadcast::error::RecvError::Lagged(n)) => Some(Frame::Lagged(n)),
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = self.closing.changed() => None,
        }
    }
}

/// The detector's two streams.
pub struct Hub {
    pub races: Channel,
    pub events: Channel,
}

impl Hub {
    /// Ends the streams of every client connected now (see [`Channel::close_clients`]).
    pub fn close_clients(&self) {
        self.races.close_clients();
        self.events.close_clients();
    }

    /// `races_replay`/`events_replay`: records replayed on connect to each stream.
    pub fn new(races_replay: usize, events_replay: usize, capacity: usize) -> Self {
        Self {
            races: Channel::new(races_replay, capacity),
            events: Channel::new(events_replay, capacity),
        }
    }
}

/// Longest keep-alive interval a client may ask for (`?keepalive=SECS`).
pub const MAX_KEEPALIVE_SECS: u64 = 3600;

/// `lines`, with an empty line whenever `every` passes without one: an NDJSON or text client
/// that asked for it (`?keepalive=SECS`, as `detector watch` does) can then tell a quiet
/// detector from a stuck one with a read timeout. Opt-in, so a client that parses every line
/// as JSON sees no change.
pub fn with_keepalive<S>(lines: S, every: Duration) -> impl Stream<Item = String> + Send
where
    S: Stream<Item = String> + Send + 'static,
{
    futures_util::stream::unfold(lines.boxed(), move |mut lines| async move {
        match tokio::time::timeout(every, lines.next()).await {
            Ok(Some(line)) => Some((line, lines)),
            Ok(None) => None,
            Err(_) => Some(("\n".to_string(), lines)),
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    fn item(i: usize) -> Item {
        Item {
            json: format!("{{\"n\":{i}}}"),
            text: format!("line {i}"),
        }
    }

    #[tokio::test]
    async fn replay_then_live_without_gap_or_overlap() {
        let c = Channel::new(3, 16);
        for i in 0..5 {
            c.publish(item(i));
        }
        let mut s = c.subscribe();
        c.publish(item(5));
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(s.next().await.unwrap().text());
        }
        assert_eq!(got, ["line 2", "line 3", "line 4", "line 5"]);
    }

    #[tokio::test]
    async fn closing_ends_open_streams_after_what_they_hold_and_not_later_ones() {
        let c = Channel::new(2, 16);
        let mut s = c.subscribe();
        c.publish(item(1));
        c.close_clients();
        assert_eq!(s.next().await.unwrap().text(), "line 1");
        assert!(s.next().await.is_none());
        let mut later = c.subscribe();
        c.publish(item(2));
        assert_eq!(later.next().await.unwrap().text(), "line 1", "replay");
        assert_eq!(later.next().await.unwrap().text(), "line 2");
    }

    #[tokio::test]
    async fn a_slow_client_gets_a_lagged_marker() {
        let c = Channel::new(0, 4);
        let mut s = c.subscribe();
        for i in 0..10 {
            c.publish(item(i));
        }
        let first = s.next().await.unwrap();
        assert!(matches!(first, Frame::Lagged(6)), "{first:?}");
        let v: serde_json::Value = serde_json::from_str(&first.json()).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["missed"].as_u64()),
            (Some("lagged"), Some(6))
        );
        assert_eq!(s.next().await.unwrap().text(), "line 6");
    }

    #[tokio::test]
    async fn an_idle_stream_gets_empty_lines_and_ends_with_its_source() {
        let (tx, rx) = tokio::sync::mpsc::channel::<String>(4);
        let source =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|l| (l, rx)) },
            );
        let mut s = Box::pin(with_keepalive(source, Duration::from_millis(30)));
        tx.send("a\n".to_string()).await.unwrap();
        assert_eq!(s.next().await.unwrap(), "a\n");
        // Nothing sent: a keep-alive comes within the interval (and not a record).
        let idle = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert_eq!(idle.unwrap().unwrap(), "\n");
        tx.send("b\n".to_string()).await.unwrap();
        assert_eq!(s.next().await.unwrap(), "b\n");
        drop(tx);
        assert_eq!(s.next().await, None, "ends when its source ends");
    }
}
