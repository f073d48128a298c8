//! `detector trace`: stream conntrack events live.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::ProbeArgs;
use crate::clock::{self, WallClock};
use crate::kernel::{CounterSnapshot, Probe};
use crate::pipeline::event_loop::{Step, Stream};
use crate::pipeline::reorder::ReorderStats;
use crate::record::{Event, Kind};
use crate::report::render::{self, TimeBase};

#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// NDJSON output: one object per event, then a summary object.
    #[arg(long)]
    pub json: bool,
    /// Only this network namespace: an inode number or a path such as /run/netns/NAME
    /// (filtered in the kernel).
    #[arg(long, value_name = "INODE|PATH")]
    pub netns: Option<String>,
    /// Only this protocol: tcp, udp, icmp, or a number.
    #[arg(long, value_name = "PROTO", value_parser = parse_proto)]
    pub proto: Option<u8>,
    /// Stop after this many seconds (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = super::bounds::duration_secs)]
    pub duration: Option<f64>,
    /// How long to hold events to put them in kernel-timestamp order, in ms. Records reach
    /// the ring buffer microseconds after their timestamp, so 2 ms keeps late records rare
    /// (counted in the summary's `reorder.late`) while verdicts wait little.
    #[arg(long, default_value_t = 2, value_name = "MS", value_parser = super::bounds::watermark_ms)]
    pub watermark_ms: u64,
}

fn parse_proto(s: &str) -> Result<u8, String> {
    match s {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" => Ok(58),
        "sctp" => Ok(132),
        n => n.parse().map_err(|_| {
            format!("unknown protocol `{n}`: use tcp, udp, icmp, icmpv6, sctp or a number")
        }),
    }
}

/// Resolves `--netns` to an inode number.
pub fn netns_inode(spec: &str) -> Result<u32> {
    if let Ok(n) = spec.parse::<u32>() {
        return Ok(n);
    }
    let meta = std::fs::metadata(Path::new(spec)).with_context(|| {
        format!("--netns {spec}: not an inode number and not a readable namespace file (e.g. /run/netns/NAME)")
    })?;
    u32::try_from(meta.ino()).with_context(|| format!("--netns {spec}: inode out of range"))
}

/// Totals printed at exit.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub ct_new: u64,
    pub ct_destroy: u64,
    pub kernel: CounterSnapshot,
    pub undecodable: u64,
    pub reorder: ReorderStats,
}

pub async fn run(args: TraceArgs) -> Result<()> {
    let netns = match &args.netns {
        Some(s) => netns_inode(s)?,
        None => 0,
    };
    let settings = args.probe.settings(netns, false);
    let mut probe = Probe::open(&settings)?;
    let (backend, _) = probe.choose(settings.backend)?;
    probe.attach(backend)?;
    probe.release_btf();
    crate::pipeline::trim_heap();
    let reader = probe.take_reader()?;
    // Measured once, before load: the programs place conntrack deadlines with it.
    let hz = probe.hz.unwrap_or_else(|| {
        tracing::warn!(
            "could not measure the kernel's HZ (/proc/timer_list, /boot/config-*); assuming \
             250 for displayed timeouts, and conntrack expiry instants are unknown"
        );
        250
    });
    let mut units = TimeBase {
        wall: WallClock::measure(),
        hz,
    };
    // The signal handlers first: a Ctrl-C right after the line below must stop it cleanly.
    let mut stream = Stream::new(reader, args.watermark_ms, args.duration)?;
    crate::note!(
        "detector: tracing conntrack with the {backend} backend (insert time {}){}; Ctrl-C to stop",
        backend.insert_precision(),
        if netns != 0 {
            format!(", netns {netns}")
        } else {
            String::new()
        }
    );

    let mut summary = Summary::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut ready = Vec::new();
    loop {
        match stream.next(&mut ready).await? {
            Step::Stop => break,
            Step::Events => {}
            // Keep wall time true across NTP steps and suspend.
            Step::Tick { second: true, .. } => units.wall = WallClock::measure(),
            Step::Tick { .. } => {}
        }
        if !write_ready(&mut out, &mut ready, &args, &units, &mut summary)? {
            break;
        }
    }
    stream.finish(&mut ready);
    write_ready(&mut out, &mut ready, &args, &units, &mut summary)?;

    let reader = &stream.reader;
    summary.kernel = reader.counters();
    summary.undecodable = reader.undecodable;
    summary.reorder = stream.reorder_stats();
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["type"] = "summary".into();
        v["time"] = clock::now_iso().into();
        v["backend"] = backend.name().into();
        writeln!(out, "{v}").ok();
    }
    out.flush().ok();
    crate::note!(
        "detector: {} NEW, {} DESTROY; lost in kernel: {} (ring buffer full), dedupe table full: {}, \
         kernel read failures: {}, undecodable: {}, late (out of order): {}",
        summary.ct_new,
        summary.ct_destroy,
        summary.kernel.lost_total(),
        summary.kernel.seen_full,
        summary.kernel.read_failed,
        summary.undecodable,
        summary.reorder.late,
    );
    if let Some(e) = &reader.last_decode_error {
        crate::note!("detector: last undecodable record: {e}");
    }
    Ok(())
}

/// Writes released events; returns false when stdout is gone (e.g. `| head`).
fn write_ready(
    out: &mut impl Write,
    ready: &mut Vec<Event>,
    args: &TraceArgs,
    units: &TimeBase,
    summary: &mut Summary,
) -> Result<bool> {
    if ready.is_empty() {
        return Ok(true);
    }
    for ev in ready.drain(..) {
        match ev.kind() {
            Kind::CtNew => summary.ct_new += 1,
            Kind::CtDestroy => summary.ct_destroy += 1,
            // `trace` does not attach the agent-map programs.
            Kind::MapDelete | Kind::PacketDrop | Kind::MapWrite => continue,
        }
        if let Event::Ct(c) = &ev
            && args.proto.is_some_and(|p| p != c.orig.proto)
        {
            continue;
        }
        let line = if args.json {
            render::json_line(&ev, units)
        } else {
            render::text_line(&ev, units)
        };
        if let Err(e) = writeln!(out, "{line}") {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(false);
            }
            bail!("writing output: {e}");
        }
    }
    match out.flush() {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => bail!("writing output: {e}"),
    }
}
