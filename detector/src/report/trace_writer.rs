//! Trace files are written by a thread of their own, fed through a bounded queue: a slow or
//! failing disk (fsync stalls, a full or read-only directory, no descriptors left) never holds
//! up or stops the event loop. A write that fails is retried once, then counted and dropped;
//! a full queue drops the trace and counts it. The directory is kept within a count and a
//! byte budget, oldest trace first, because on a node it is a hostPath.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::telemetry::metrics::Metrics;

/// Limits of the writer and of the trace directory.
#[derive(Debug, Clone, Copy)]
pub struct WriterLimits {
    /// Traces waiting to be written at most; more are dropped (and counted).
    pub queue: usize,
    /// Race trace files kept at most (oldest removed first); 0: no limit.
    pub max_files: usize,
    /// Bytes of race trace files kept at most (oldest removed first); 0: no limit.
    pub max_bytes: u64,
}

impl Default for WriterLimits {
    fn default() -> Self {
        Self {
            queue: 1024,
            max_files: 1000,
            max_bytes: 256 << 20,
        }
    }
}

/// What the writer did, shared with the loop for the summary and the exit line.
#[derive(Debug, Default)]
pub struct WriteCounts {
    pub written: AtomicU64,
    /// Writes that failed twice (the cause is logged).
    pub failed: AtomicU64,
    /// Traces not queued because the queue was full (or the writer had stopped).
    pub dropped: AtomicU64,
    /// Old trace files removed to stay within the directory's limits.
    pub removed: AtomicU64,
}

impl WriteCounts {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

struct Job {
    path: PathBuf,
    contents: Vec<u8>,
}

/// The writer thread and its queue.
pub struct TraceWriter {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    pub counts: Arc<WriteCounts>,
    metrics: Option<Arc<Metrics>>,
}

impl TraceWriter {
    /// Starts the writer for `dir`, whose existing trace files count against the limits.
    pub fn start(
        dir: &Path,
        limits: WriterLimits,
        metrics: Option<Arc<Metrics>>,
    ) -> std::io::Result<Self> {
        let counts = Arc::new(WriteCounts::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(limits.queue.max(1));
        let mut retention = Retention::scan(dir, limits);
        let thread_counts = counts.clone();
        let thread_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("trace-writer".into())
            .spawn(move || {
                // Keep an earlier run's directory within the limits before adding to it.
                retention.enforce(&thread_counts, thread_metrics.as_deref());
                write_jobs(
                    rx,
                    &mut retention,
                    &thread_counts,
                    thread_metrics.as_deref(),
                );
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            counts,
            metrics,
        })
    }

    /// Queues one trace file; false (and counted as dropped) when the queue is full.
    pub fn submit(&self, path: PathBuf, contents: Vec<u8>) -> bool {
        let Some(tx) = &self.tx else {
            self.dropped(&path, "the writer has stopped");
            return false;
        };
        match tx.try_send(Job { path, contents }) {
            Ok(()) => true,
            Err(TrySendError::Full(job)) => {
                self.dropped(&job.path, "the write queue is full");
                false
            }
            Err(TrySendError::Disconnected(job)) => {
                self.dropped(&job.path, "the writer has stopped");
                false
            }
        }
    }

    fn dropped(&self, path: &Path, why: &str) {
        let n = self.counts.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(m) = &self.metrics {
            m.trace_write("dropped");
        }
        // A burst would repeat this thousands of times: the first and every 100th.
        if n == 1 || n.is_multiple_of(100) {
            tracing::warn!(
                "trace {} dropped: {why} ({n} dropped so far)",
                path.display()
            );
        }
    }

    /// Writes what is queued and stops the thread.
    pub fn drain(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::warn!("the trace writer thread panicked");
        }
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        self.drain();
    }
}

fn write_jobs(
    rx: Receiver<Job>,
    retention: &mut Retention,
    counts: &WriteCounts,
    metrics: Option<&Metrics>,
) {
    for job in rx {
        let result = super::trace_file::write_atomic(&job.path, &job.contents).or_else(|_| {
            // Space or descriptors may come back (retention, a closed connection): once more.
            std::thread::sleep(Duration::from_millis(50));
            super::trace_file::write_atomic(&job.path, &job.contents)
        });
        match result {
            Ok(()) => {
                counts.written.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = metrics {
                    m.trace_write("written");
                }
                retention.add(job.path, job.contents.len() as u64);
                retention.enforce(counts, metrics);
            }
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = metrics {
                    m.trace_write("failed");
                }
                tracing::warn!("trace {} not written: {e:#}", job.path.display());
            }
        }
    }
}

/// The race trace files of the directory, oldest first, with their sizes.
struct Retention {
    files: VecDeque<(PathBuf, u64)>,
    bytes: u64,
    limits: WriterLimits,
}

/// Whether `name` is a race trace file this detector writes.
pub fn is_trace_name(name: &str) -> bool {
    name.starts_with("race-") && name.ends_with(".json") && !name.ends_with(".perfetto.json")
}

impl Retention {
    fn scan(dir: &Path, limits: WriterLimits) -> Self {
        let mut found: Vec<(std::time::SystemTime, PathBuf, u64)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(is_trace_name))
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                Some((md.modified().ok()?, e.path(), md.len()))
            })
            .collect();
        found.sort();
        let bytes = found.iter().map(|f| f.2).sum();
        Self {
            files: found.into_iter().map(|(_, p, n)| (p, n)).collect(),
            bytes,
            limits,
        }
    }

    fn add(&mut self, path: PathBuf, len: u64) {
        self.bytes += len;
        self.files.push_back((path, len));
    }

    fn over(&self) -> bool {
        (self.limits.max_files > 0 && self.files.len() > self.limits.max_files)
            || (self.limits.max_bytes > 0 && self.bytes > self.limits.max_bytes)
    }

    fn enforce(&mut self, counts: &WriteCounts, metrics: Option<&Metrics>) {
        while self.over() {
            let Some((path, len)) = self.files.pop_front() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(len);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    counts.removed.fetch_add(1, Ordering::Relaxed);
                    if let Some(m) = metrics {
                        m.trace_write("removed");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("removing old trace {}: {e}", path.display()),
            }
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

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("detector-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn traces_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| is_trace_name(n))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn oldest_traces_go_first_beyond_the_count_limit() {
        let dir = scratch("retention");
        let limits = WriterLimits {
            queue: 16,
            max_files: 3,
            max_bytes: 0,
        };
        let mut w = TraceWriter::start(&dir, limits, None).unwrap();
        for i in 0..5 {
            assert!(w.submit(dir.join(format!("race-{i}.json")), b"{}".to_vec()));
        }
        w.drain();
        assert_eq!(
            traces_in(&dir),
            ["race-2.json", "race-3.json", "race-4.json"]
        );
        assert_eq!(WriteCounts::get(&w.counts.written), 5);
        assert_eq!(WriteCounts::get(&w.counts.removed), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_byte_limit_counts_earlier_files() {
        let dir = scratch("retention-bytes");
        std::fs::write(dir.join("race-0.json"), vec![b' '; 600]).unwrap();
        let limits = WriterLimits {
            queue: 4,
            max_files: 0,
            max_bytes: 1000,
        };
        let mut w = TraceWriter::start(&dir, limits, None).unwrap();
        assert!(w.submit(dir.join("race-1.json"), vec![b' '; 600]));
        w.drain();
        assert_eq!(traces_in(&dir), ["race-1.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_is_counted_not_fatal() {
        let dir = scratch("write-fails");
        let mut w = TraceWriter::start(&dir, WriterLimits::default(), None).unwrap();
        assert!(w.submit(dir.join("missing/race-1.json"), b"{}".to_vec()));
        assert!(w.submit(dir.join("race-2.json"), b"{}".to_vec()));
        w.drain();
        assert_eq!(WriteCounts::get(&w.counts.failed), 1);
        assert_eq!(WriteCounts::get(&w.counts.written), 1);
        assert!(!w.submit(dir.join("race-3.json"), b"{}".to_vec()));
        assert_eq!(WriteCounts::get(&w.counts.dropped), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
