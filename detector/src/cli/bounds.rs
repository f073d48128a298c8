//! Bounds of the numeric flags, checked by clap before anything is loaded: a value out of
//! range is a usage error (exit code 2) with the range in the message, never a panic or a
//! silent clamp later.

/// The longest `--duration`: a year (a longer run is one without `--duration`).
pub const MAX_DURATION_SECS: f64 = 365.0 * 24.0 * 3600.0;
/// The longest trace window before or after a delete.
pub const MAX_WINDOW_SECS: f64 = 3600.0;
/// The longest snapshot-lag window (a day; NPA's cleanup period is 300 s).
pub const MAX_LAG_WINDOW_SECS: f64 = 86_400.0;
/// The longest reorder hold: events wait this long before the engine sees them.
pub const MAX_WATERMARK_MS: u64 = 5_000;
/// The largest in-kernel table and engine table (entries).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 24;

fn seconds(s: &str, min_exclusive: bool, max: f64) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    let low_ok = if min_exclusive { v > 0.0 } else { v >= 0.0 };
    if !v.is_finite() || !low_ok || v > max {
        let low = if min_exclusive {
            "more than 0"
        } else {
            "from 0"
        };
        return Err(format!(
            "`{s}` is out of range: seconds must be a finite number {low} to {max}"
        ));
    }
    Ok(v)
}

/// `--duration`: more than 0 s, at most a year.
pub fn duration_secs(s: &str) -> Result<f64, String> {
    seconds(s, true, MAX_DURATION_SECS)
}

/// `--trace-before`/`--trace-after`: 0 s to an hour.
pub fn window_secs(s: &str) -> Result<f64, String> {
    seconds(s, false, MAX_WINDOW_SECS)
}

/// `--snapshot-lag-window`: 0 s to a day.
pub fn lag_window_secs(s: &str) -> Result<f64, String> {
    seconds(s, false, MAX_LAG_WINDOW_SECS)
}

fn integer(s: &str, what: &str, min: u64, max: u64) -> Result<u64, String> {
    let v: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number of {what}"))?;
    if v < min || v > max {
        return Err(format!(
            "{v} is out of range: {what} must be {min} to {max}"
        ));
    }
    Ok(v)
}

/// `--watermark-ms`: 0 to 5000 ms (a longer hold delays every verdict and grows the buffer).
pub fn watermark_ms(s: &str) -> Result<u64, String> {
    integer(s, "milliseconds", 0, MAX_WATERMARK_MS)
}

/// `--max-entries`: a kernel hash map needs at least one entry.
pub fn table_entries_u32(s: &str) -> Result<u32, String> {
    let v = integer(s, "entries", 1, MAX_TABLE_ENTRIES)?;
    u32::try_from(v).map_err(|_| format!("{v} entries do not fit a kernel table"))
}

/// `--max-flows`.
pub fn table_entries(s: &str) -> Result<usize, String> {
    let v = integer(s, "entries", 1, MAX_TABLE_ENTRIES)?;
    usize::try_from(v).map_err(|_| format!("{v} entries do not fit this machine"))
}

/// `--trace-max-files`: 0 (no limit) to a million.
pub fn trace_max_files(s: &str) -> Result<usize, String> {
    let v = integer(s, "files", 0, 1_000_000)?;
    usize::try_from(v).map_err(|_| format!("{v} files do not fit this machine"))
}

/// `--trace-max-mib`: 0 (no limit) to 1 TiB.
pub fn trace_max_mib(s: &str) -> Result<u64, String> {
    integer(s, "MiB", 0, 1 << 20)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests: a panic is the failure report"
    )]
    use super::*;

    #[test]
    fn durations_are_finite_and_within_a_year() {
        for bad in ["1e300", "1e19", "nan", "NaN", "inf", "-1", "0", "x", ""] {
            assert!(duration_secs(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(duration_secs("2.5").unwrap(), 2.5);
        assert!(duration_secs("31536000").is_ok());
    }

    #[test]
    fn windows_are_non_negative() {
        for bad in ["-5", "nan", "-0.001", "1e9"] {
            assert!(window_secs(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(window_secs("0").unwrap(), 0.0);
    }

    #[test]
    fn integers_are_within_their_range() {
        assert!(watermark_ms("99999999999").is_err());
        assert_eq!(watermark_ms("5000").unwrap(), 5000);
        assert!(table_entries_u32("0").unwrap_err().contains("1 to"));
        assert!(table_entries("-3").is_err());
        assert_eq!(trace_max_files("0").unwrap(), 0);
    }
}
