use std::io;

/// What went wrong, with the command, path or call that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {cmd} (scripts/setup.sh installs it): {source}")]
    Spawn { cmd: String, source: io::Error },
    #[error("{cmd}: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("a thread in a network namespace panicked")]
    ThreadPanicked,
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// The last OS error of a failed system call.
    pub fn last_os(call: &'static str) -> Self {
        Self::Syscall {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
