//! tracefs: where it is (mounting it when absent) and the field offsets of the syscall
//! tracepoints the agent-delete programs read.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}. Mount it \
         (`mount -t tracefs nodev /sys/kernel/tracing`), or in a container mount the host's \
         /sys/kernel/tracing"
    )]
    Mount(std::io::Error),
    #[error(
        "{path}: {source}. The syscall tracepoints need CONFIG_FTRACE_SYSCALLS (every \
         distribution kernel has it)"
    )]
    Format {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no field `{field}`")]
    NoField { path: PathBuf, field: String },
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn populated(p: &Path) -> bool {
    std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some())
}

/// The tracefs mount point, mounting tracefs at /sys/kernel/tracing when none is mounted (as
/// aya looks there too).
pub fn ensure() -> Result<PathBuf, TracefsError> {
    if let Some(p) = CANDIDATES.iter().map(Path::new).find(|p| populated(p)) {
        return Ok(p.to_path_buf());
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(PathBuf::from(CANDIDATES[0]))
}

/// Byte offset of `field` in tracepoint `category/name`, from its format file.
pub fn field_offset(
    root: &Path,
    category: &str,
    name: &str,
    field: &str,
) -> Result<u32, TracefsError> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::Format {
        path: path.clone(),
        source,
    })?;
    parse_offset(&text, field).ok_or(TracefsError::NoField {
        path,
        field: field.to_string(),
    })
}

/// Finds `field:<type> <field>;\toffset:N;` in a format file.
pub fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))
            .and_then(|v| v.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTER: &str = "name: sys_enter_bpf\nID: 586\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:int cmd;\toffset:16;\tsize:8;\tsigned:0;\n\
        \tfield:union bpf_attr * uattr;\toffset:24;\tsize:8;\tsigned:0;\n";

    #[test]
    fn parses_format_files() {
        assert_eq!(parse_offset(ENTER, "cmd"), Some(16));
        assert_eq!(parse_offset(ENTER, "uattr"), Some(24));
        assert_eq!(parse_offset(ENTER, "__syscall_nr"), Some(8));
        assert_eq!(parse_offset(ENTER, "ret"), None);
    }
}
