//! Kernel time: `bpf_ktime_get_ns()` is CLOCK_MONOTONIC (the clock of NPA's `last_seen`).
//! Wall-clock time is derived with an offset measured at start and re-measured periodically,
//! and the kernel's HZ converts conntrack's jiffies timeouts to time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Maps kernel monotonic timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// realtime - monotonic, in ns.
    offset_ns: i128,
}

impl WallClock {
    /// Measures the offset, bracketing the realtime read with two monotonic reads and taking
    /// their midpoint, so the error is at most half the bracket (sub-microsecond).
    pub fn measure() -> Self {
        let m0 = clock_ns(libc::CLOCK_MONOTONIC);
        let r = clock_ns(libc::CLOCK_REALTIME);
        let m1 = clock_ns(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: r as i128 - ((m0 as i128 + m1 as i128) / 2),
        }
    }

    pub fn from_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// realtime - monotonic, in ns.
    pub fn offset_ns(&self) -> i128 {
        self.offset_ns
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        mono_ns as i128 + self.offset_ns
    }

    /// ISO-8601 UTC with microseconds, e.g. `2026-11-26T08:01:02.123456Z`.
    pub fn iso(&self, mono_ns: u64) -> String {
        iso8601(self.wall_ns(mono_ns))
    }
}

/// Formats ns since the Unix epoch as ISO-8601 UTC with microseconds (truncated, not
/// rounded). Times beyond jiff's range (about years -9999 to 9999) are
/// clamped to its ends: only a broken clock yields them.
pub fn iso8601(wall_ns: i128) -> String {
    let ts = jiff::Timestamp::from_nanosecond(wall_ns).unwrap_or(if wall_ns < 0 {
        jiff::Timestamp::MIN
    } else {
        jiff::Timestamp::MAX
    });
    format!("{ts:.6}")
}

pub fn now_iso() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    iso8601(d.as_nanos() as i128)
}

/// The kernel's tick rate (CONFIG_HZ), needed to turn `ct->timeout` jiffies into time.
///
/// Measured from `/proc/timer_list` ("now at N nsecs" and "jiffies: J") sampled twice, and
/// snapped to the nearest value the kernel allows (100, 250, 300, 1000); where that file
/// cannot be read, `CONFIG_HZ` from the running kernel's `/boot/config-<release>`.
pub fn kernel_hz() -> Option<u32> {
    measured_hz().or_else(configured_hz)
}

/// `CONFIG_HZ=` of the running kernel's build configuration, if the file is there.
fn configured_hz() -> Option<u32> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let config = std::fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()?;
    config_hz(&config)
}

/// The `CONFIG_HZ` value of a kernel build configuration's text.
fn config_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))?
        .trim()
        .parse()
        .ok()
        .filter(|hz| *hz > 0)
}

fn measured_hz() -> Option<u32> {
    fn sample() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let now = text
            .lines()
            .find_map(|l| l.strip_prefix("now at ")?.strip_suffix(" nsecs"))?
            .trim()
            .parse()
            .ok()?;
        let jiffies = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        Some((now, jiffies))
    }
    let (n0, j0) = sample()?;
    std::thread::sleep(Duration::from_millis(120));
    let (n1, j1) = sample()?;
    if n1 <= n0 || j1 <= j0 {
        return None;
    }
    let hz = (j1 - j0) as f64 * 1e9 / (n1 - n0) as f64;
    [100u32, 250, 300, 1000].into_iter().min_by(|a, b| {
        (*a as f64 - hz)
            .abs()
            .partial_cmp(&(*b as f64 - hz).abs())
            .unwrap_or(std::cmp::Ordering::Equal)
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

    #[test]
    fn iso_formatting() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-26T07:33:25.5Z
        assert_eq!(
            iso8601(1_795_678_405_500_000_000),
            "2026-11-26T07:33:25.500000Z"
        );
        assert_eq!(
            iso8601(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn config_hz_reads_the_value_not_its_siblings() {
        let config = "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n";
        assert_eq!(config_hz(config), Some(250));
        assert_eq!(config_hz("CONFIG_HZ_1000=y\nCONFIG_HZ=1000"), Some(1000));
        assert_eq!(config_hz("CONFIG_HZ_250=y\n"), None);
    }

    #[test]
    fn wall_clock_tracks_realtime() {
        let w = WallClock::measure();
        let wall = w.wall_ns(monotonic_ns());
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        assert!((real - wall).abs() < 50_000_000, "{}", real - wall);
    }
}
