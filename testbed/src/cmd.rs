//! Running the system's tools (`ip`, `nft`, `sysctl`, `mount`, ...).

use std::process::Command;

use crate::{Error, Result};

/// Runs `cmd args`; its stdout, or an error with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| Error::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
