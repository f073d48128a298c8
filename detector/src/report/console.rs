//! stdout: readable race lines (and drops), or NDJSON of every record with `--json`; the
//! detector's own notes go to stderr in readable mode.

use std::io::Write;

use anyhow::Result;

use super::{ConfirmationOut, Record, Sink, TextTo, VerdictOut};

/// The buffer in front of stdout: with `--json` every kernel record is a line, so a batch of
/// the ring buffer is tens of kilobytes; the event loop flushes once per batch, and a buffer
/// that holds the batch makes that one write instead of one per 8 KiB (each write wakes the
/// reader, which on a small node takes the CPU from the loop).
pub const STDOUT_BUFFER_BYTES: usize = 64 << 10;

/// stdout, buffered (flushed by the event loop after each batch).
pub struct Console<W: Write> {
    out: W,
    json: bool,
}

impl<W: Write> Console<W> {
    pub fn new(out: W, json: bool) -> Self {
        Self { out, json }
    }

    pub fn flush(&mut self) {
        self.out.flush().ok();
    }
}

impl<W: Write> Sink for Console<W> {
    fn event(&mut self, r: &Record<'_>) -> Result<()> {
        if self.json {
            writeln!(self.out, "{}", r.json())?;
            return Ok(());
        }
        match r.text_to {
            TextTo::Nowhere => {}
            TextTo::Stdout => writeln!(self.out, "{}", r.text())?,
            TextTo::Stderr => crate::note!("{}", r.text()),
        }
        Ok(())
    }

    fn verdict(&mut self, v: &VerdictOut<'_>) -> Result<()> {
        writeln!(self.out, "{}", if self.json { v.json } else { v.text })?;
        Ok(())
    }

    fn confirmation(&mut self, c: &ConfirmationOut<'_>) -> Result<()> {
        writeln!(self.out, "{}", if self.json { c.json } else { c.text })?;
        Ok(())
    }

    fn finish(&mut self, summary: &serde_json::Value) -> Result<()> {
        if self.json {
            writeln!(self.out, "{summary}")?;
        }
        self.out.flush().ok();
        Ok(())
    }
}

/// Gives a piped stdout room for a burst of records (with `--json`, every kernel record and
/// every verdict is a line), so that a reader (the lab, a container runtime's log pipe) that
/// is a little slow does not block the event loop on a full 64 KiB pipe. Best effort: 1 MiB is the default
/// pipe-max-size, and a failure leaves the pipe as it was.
pub fn widen_stdout_pipe() {
    use std::os::fd::AsRawFd;
    let fd = std::io::stdout().as_raw_fd();
    // SAFETY: fstat and fcntl on our own stdout, with a zeroed stat buffer they fill.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
        }
    }
}
