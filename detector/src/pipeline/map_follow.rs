//! Keeping track of the agent's map: waiting for an explicit pin at start, and re-resolving it
//! every second so that an agent restart that re-creates (or re-pins) the map is followed. A
//! pin that goes missing is waited for, never replaced by a map found by name; what cannot be
//! resolved is said once, when it starts, and again when it ends.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::dispatch::Detector;
use crate::kernel::Probe;
use crate::npa::target::{self, AgentMap, MapBy, MapSpec, TargetError};

/// How often a missing pin is looked for at start.
const START_POLL: Duration = Duration::from_millis(200);

/// Resolves the map at start. An explicit `--map-pin` that does not exist yet is waited for
/// (one line when the wait starts, one when the map is found), until `deadline` if one is set.
pub async fn wait_for_map(spec: &MapSpec, deadline: Option<Instant>) -> Result<AgentMap> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match target::resolve(spec) {
            Ok(map) => {
                if said {
                    crate::note!(
                        "detector: the agent's map is pinned at {}: map {} (waited {:.1} s)",
                        pin_of(spec),
                        map.id,
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(map);
            }
            Err(e @ TargetError::PinMissing { .. }) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(e.into());
                }
                if !said {
                    crate::note!(
                        "detector: waiting for the agent's map to be pinned at {} (--map-pin: no \
                         lookup by name)",
                        pin_of(spec)
                    );
                    said = true;
                }
                tokio::time::sleep(START_POLL).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn pin_of(spec: &MapSpec) -> String {
    match &spec.by {
        MapBy::Pin(p) => p.display().to_string(),
        _ => String::new(),
    }
}

/// What the once-a-second re-resolution last found wrong, so each problem is said once.
#[derive(Debug, Default)]
pub struct MapWatch {
    /// Since when the explicit pin is missing (the previous map is still watched meanwhile).
    pin_missing_since: Option<Instant>,
    /// The last re-resolution error said, to say a new one only.
    last_error: Option<String>,
}

impl MapWatch {
    fn pin_found(&mut self, spec: &MapSpec, map: &AgentMap, watched: u32) {
        if let Some(since) = self.pin_missing_since.take() {
            let gap = since.elapsed().as_secs_f64();
            let what = if map.id == watched {
                format!("the same map {}", map.id)
            } else {
                format!("map {} (was {watched})", map.id)
            };
            crate::note!(
                "detector: the agent's map is pinned again at {}: {what}, after {gap:.1} s",
                pin_of(spec)
            );
        }
        self.last_error = None;
    }

    fn pin_missing(&mut self, spec: &MapSpec, watched: u32) {
        if self.pin_missing_since.is_none() {
            self.pin_missing_since = Some(Instant::now());
            crate::note!(
                "detector: nothing is pinned at {} any more (agent restart?): waiting for it to \
                 reappear, still watching map {watched} meanwhile (--map-pin: no lookup by name)",
                pin_of(spec)
            );
        }
    }

    fn failed(&mut self, e: &TargetError) {
        let text = e.to_string();
        if self.last_error.as_deref() != Some(text.as_str()) {
            tracing::error!(
                "re-resolving the agent's map: {text}; still watching the previous one"
            );
            self.last_error = Some(text);
        }
    }
}

/// Re-resolves the map by pin or name; when the agent re-created it, watch the new one, its
/// deletes judged in `judge_netns` (0: the deleting task's namespace).
pub fn follow_map<W: Write>(
    spec: &MapSpec,
    watch: &mut MapWatch,
    det: &mut Detector<W>,
    probe: &mut Probe,
    judge_netns: u32,
    now_ns: u64,
) -> Result<()> {
    if matches!(spec.by, MapBy::Id(_)) {
        return Ok(());
    }
    let new = match target::resolve(spec) {
        Ok(new) => new,
        Err(TargetError::PinMissing { .. }) => {
            watch.pin_missing(spec, det.map.id);
            return Ok(());
        }
        Err(e) => {
            // The agent is restarting, or something else sits at the pin, or the new map's
            // layout contradicts --layout: keep the old target until a usable map shows.
            watch.failed(&e);
            return Ok(());
        }
    };
    watch.pin_found(spec, &new, det.map.id);
    if new.id == det.map.id {
        return Ok(());
    }
    let old = std::mem::replace(&mut det.map, new.clone());
    tracing::info!(
        "agent map re-created: id {} -> {} (layout {})",
        old.id,
        new.id,
        new.layout
    );
    probe.set_target(new.id, target::target_map(new.layout.key, judge_netns))?;
    probe.remove_target(old.id)?;
    det.map_recreated(&old, now_ns)
}
