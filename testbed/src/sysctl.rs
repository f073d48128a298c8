//! Sysctls changed for a run and put back afterwards.

use std::path::{Path, PathBuf};

use crate::netns::exec_in;
use crate::{Error, Result};

/// A global sysctl (a /proc/sys path) set for a run, restored on drop. The original value is
/// also written to a state file, so a run that was killed outright is undone by the next
/// ([`restore_leftovers`] with the same prefix).
pub struct Global {
    path: &'static str,
    original: String,
    state: PathBuf,
}

impl Global {
    /// Sets `path` to `value`; the state file is `/run/<state_prefix><path's dotted name>`.
    pub fn set(path: &'static str, value: &str, state_prefix: &str) -> Result<Self> {
        let original = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {path}"), e))?
            .trim()
            .to_string();
        let state = Path::new("/run").join(format!(
            "{state_prefix}{}",
            path.trim_start_matches("/proc/sys/").replace('/', ".")
        ));
        std::fs::write(&state, format!("{path} {original}\n"))
            .map_err(|e| Error::io(format!("writing {}", state.display()), e))?;
        std::fs::write(path, value)
            .map_err(|e| Error::io(format!("setting {path} to {value}"), e))?;
        Ok(Self {
            path,
            original,
            state,
        })
    }
}

impl Drop for Global {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.path, &self.original) {
            eprintln!("cleanup: restoring {}: {e}", self.path);
        }
        let _ = std::fs::remove_file(&self.state);
    }
}

/// Restores what a killed run left changed (state files `/run/<state_prefix>*`); returns the
/// `path = value` pairs it put back.
pub fn restore_leftovers(state_prefix: &str) -> Vec<String> {
    let mut restored = Vec::new();
    let Ok(dir) = std::fs::read_dir("/run") else {
        return restored;
    };
    for e in dir.filter_map(|e| e.ok()) {
        if !e.file_name().to_string_lossy().starts_with(state_prefix) {
            continue;
        }
        if let Ok(s) = std::fs::read_to_string(e.path())
            && let Some((path, value)) = s.trim().split_once(' ')
            && path.starts_with("/proc/sys/")
            && std::fs::write(path, value).is_ok()
        {
            restored.push(format!("{path} = {value}"));
        }
        let _ = std::fs::remove_file(e.path());
    }
    restored
}

/// A sysctl of one network namespace (`sysctl -w` run in it), put back by [`InNetns::restore`]
/// or on drop. Setting it again keeps the first original.
pub struct InNetns {
    ns: String,
    key: &'static str,
    original: Option<String>,
}

impl InNetns {
    pub fn set(ns: &str, key: &'static str, value: &str) -> Result<Self> {
        let original = exec_in(ns, "sysctl", &["-n", key])?.trim().to_string();
        let mut s = Self {
            ns: ns.to_string(),
            key,
            original: Some(original),
        };
        s.set_again(value)?;
        Ok(s)
    }

    /// Changes the value again (the original to restore stays the first one).
    pub fn set_again(&mut self, value: &str) -> Result<()> {
        exec_in(
            &self.ns,
            "sysctl",
            &["-qw", &format!("{}={value}", self.key)],
        )
        .map(drop)
    }

    /// Puts the original back (once; later calls and the drop do nothing).
    pub fn restore(&mut self) -> Result<()> {
        match self.original.take() {
            Some(old) => {
                exec_in(&self.ns, "sysctl", &["-qw", &format!("{}={old}", self.key)]).map(drop)
            }
            None => Ok(()),
        }
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!("cleanup: restoring {} in {}: {e}", self.key, self.ns);
        }
    }
}
