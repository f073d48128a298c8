//! Loading one backend's programs from the eBPF object and attaching them: the [`Probe`]
//! holds the loaded object, the offsets it was given, and the agent-map hooks.

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{MapData, PerCpuArray},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, RawTracePoint, TracePoint},
};
use detector_common::{ProbeConfig, TargetMap};

use super::btf::KernelBtf;
use super::counters::Counters;
use super::offsets::{self, Resolved};
use super::{
    Attach, Backend, BackendChoice, BackendSupport, OBJECT, ProbeError, ProbeSettings, ProgSpec,
    WritesHook, backend, caps, map_alloc, reader, sizing, tracefs,
};

/// Loaded object, with the offsets it was given.
pub struct Probe {
    ebpf: Ebpf,
    /// Both parsed BTFs are needed only until the programs are loaded (tens of MiB):
    /// [`Probe::release_btf`] frees them.
    aya_btf: Option<Btf>,
    kernel_btf: Option<KernelBtf>,
    pub offsets: Vec<Resolved>,
    pub config: ProbeConfig,
    /// The kernel's tick rate, measured before load (the programs place conntrack deadlines
    /// on the ktime clock with it); `None` when it could not be measured.
    pub hz: Option<u32>,
    watch_agent: bool,
    writes_hook: WritesHook,
    /// The hook the map's writes were attached with (see `attach_agent`).
    writes_hooked: Option<&'static str>,
    /// Whether the tables of live entries took all their memory at load (see `map_alloc`).
    tables_preallocated: bool,
}

/// The object to load, with the tables of live entries set to allocate as they fill where the
/// kernel allows it (see `map_alloc`); and whether they are preallocated.
fn live_entry_tables_object(settings: &ProbeSettings) -> (std::borrow::Cow<'static, [u8]>, bool) {
    let release = map_alloc::running_kernel_release();
    if !settings.allow_no_prealloc || !map_alloc::kernel_allows_no_prealloc(release.as_deref()) {
        return (OBJECT.into(), true);
    }
    match map_alloc::without_prealloc(OBJECT, &sizing::LIVE_ENTRY_TABLES) {
        Ok(object) => (object.into(), false),
        Err(e) => {
            tracing::warn!("the tables of live entries stay preallocated: {e}");
            (OBJECT.into(), true)
        }
    }
}

impl Probe {
    /// Checks privileges, resolves offsets from BTF and loads the object's maps. No program is
    /// loaded yet.
    pub fn open(settings: &ProbeSettings) -> Result<Self, ProbeError> {
        if !caps::can_load_bpf(caps::effective_caps()) {
            return Err(ProbeError::NotPrivileged);
        }
        let kernel_btf = KernelBtf::load(&settings.btf_dir, offsets::BTF_MODULES)?;
        let (mut config, offsets) = offsets::resolve(&kernel_btf)?;
        config.netns_filter = settings.netns_filter;
        config.drop_watch_ms = settings.drop_watch_ms;
        config.max_batch_keys = settings.max_batch_keys;
        let hz = crate::clock::kernel_hz();
        config.ns_per_jiffy = hz.map_or(0, |hz| 1_000_000_000 / hz);
        warn_if_ring_too_small_for_batches(settings);
        if settings.watch_agent {
            let root = tracefs::ensure()?;
            config.sys_enter_bpf_cmd =
                tracefs::field_offset(&root, "syscalls", "sys_enter_bpf", "cmd")?;
            config.sys_enter_bpf_uattr =
                tracefs::field_offset(&root, "syscalls", "sys_enter_bpf", "uattr")?;
            config.sys_exit_bpf_ret =
                tracefs::field_offset(&root, "syscalls", "sys_exit_bpf", "ret")?;
        }
        let vmlinux = settings.btf_dir.join("vmlinux");
        let aya_btf = Btf::parse_file(&vmlinux, Endianness::default()).map_err(|source| {
            ProbeError::AyaBtf {
                path: vmlinux.clone(),
                source,
            }
        })?;
        let (object, preallocated) = live_entry_tables_object(settings);
        let ebpf = EbpfLoader::new()
            .btf(&aya_btf)
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", settings.ring_bytes)
            .map_max_entries("SEEN", settings.max_entries)
            .map_max_entries("FLOWS", settings.max_entries.saturating_mul(2))
            .load(&object)?;
        Ok(Self {
            tables_preallocated: preallocated,
            ebpf,
            aya_btf: Some(aya_btf),
            kernel_btf: Some(kernel_btf),
            offsets,
            config,
            hz,
            watch_agent: settings.watch_agent,
            writes_hook: settings.writes_hook,
            writes_hooked: None,
        })
    }

    /// Whether the tables of live entries took all their memory at load (kernels before 6.1),
    /// rather than allocating entries as they fill.
    pub fn tables_preallocated(&self) -> bool {
        self.tables_preallocated
    }

    /// The parsed kernel BTF; `None` after [`Probe::release_btf`].
    pub fn kernel_btf(&self) -> Option<&KernelBtf> {
        self.kernel_btf.as_ref()
    }

    /// Frees both parsed BTFs, once every program that will ever be loaded is loaded. Later
    /// loads fail with [`ProbeError::BtfReleased`].
    pub fn release_btf(&mut self) {
        self.aya_btf = None;
        self.kernel_btf = None;
    }

    /// Checks a backend without attaching it: kernel preconditions first (they give better
    /// reasons than a failed load), then a real load of each program, unloaded again.
    pub fn check(&mut self, backend: Backend) -> BackendSupport {
        let reason = match self.preconditions(backend) {
            Err(r) => Err(r),
            Ok(()) => self.try_load(backend),
        };
        self.unload(backend);
        match reason {
            Ok(()) => BackendSupport {
                backend,
                ok: true,
                reason: format!("programs load; insert time {}", backend.insert_precision()),
            },
            Err(reason) => BackendSupport {
                backend,
                ok: false,
                reason,
            },
        }
    }

    fn preconditions(&self, backend: Backend) -> Result<(), String> {
        let funcs: Vec<&str> = backend
            .programs()
            .iter()
            .filter_map(|p| match p.attach {
                Attach::KProbe(f) | Attach::FEntry(f) | Attach::FExit(f) => Some(f),
                Attach::TpBtf(_) | Attach::RawTp(_) | Attach::Tracepoint(..) => None,
            })
            .collect();
        match backend {
            Backend::Kprobe => {
                if !caps::kprobe_pmu() {
                    return Err("the kernel has no kprobe PMU \
                        (/sys/bus/event_source/devices/kprobe missing: CONFIG_KPROBES is off)"
                        .into());
                }
                let present = caps::kallsyms_present(&funcs);
                if let Some(f) = funcs.iter().find(|f| !present.contains(**f)) {
                    return Err(format!(
                        "{f} is not in /proc/kallsyms (nf_conntrack not loaded, or inlined)"
                    ));
                }
            }
            Backend::Fentry => {
                let Some(kbtf) = self.kernel_btf.as_ref() else {
                    return Err(ProbeError::BtfReleased.to_string());
                };
                for f in &funcs {
                    if kbtf.vmlinux_has_func(f) {
                        continue;
                    }
                    return Err(match kbtf.module_of_func(f) {
                        Some(m) => format!(
                            "{f} lives in module {m}; aya 0.16 attaches fentry only to vmlinux \
                             functions (use the kprobe backend)"
                        ),
                        None => format!("{f} has no BTF on this kernel"),
                    });
                }
            }
            Backend::Tracepoint => {}
        }
        Ok(())
    }

    fn try_load(&mut self, backend: Backend) -> Result<(), String> {
        if self.aya_btf.is_none() {
            return Err(ProbeError::BtfReleased.to_string());
        }
        for spec in backend.programs() {
            self.load_one(spec).map_err(|e| {
                format!(
                    "{} ({}) does not load: {}",
                    spec.name,
                    spec.attach.describe(),
                    explain(&e)
                )
            })?;
        }
        Ok(())
    }

    fn load_one(&mut self, spec: &ProgSpec) -> Result<(), ProgramError> {
        // Callers check first that the BTF is still there.
        let Some(btf) = self.aya_btf.as_ref() else {
            return Err(ProgramError::NotLoaded);
        };
        let prog = self
            .ebpf
            .program_mut(spec.name)
            .ok_or(ProgramError::NotLoaded)?;
        match spec.attach {
            Attach::TpBtf(tp) => {
                let p: &mut BtfTracePoint = prog.try_into()?;
                p.load(tp, btf)
            }
            Attach::RawTp(_) => {
                let p: &mut RawTracePoint = prog.try_into()?;
                p.load()
            }
            Attach::Tracepoint(..) => {
                let p: &mut TracePoint = prog.try_into()?;
                p.load()
            }
            Attach::KProbe(_) => {
                let p: &mut KProbe = prog.try_into()?;
                p.load()
            }
            Attach::FEntry(f) => {
                let p: &mut FEntry = prog.try_into()?;
                p.load(f, btf)
            }
            Attach::FExit(f) => {
                let p: &mut FExit = prog.try_into()?;
                p.load(f, btf)
            }
        }
    }

    fn unload(&mut self, backend: Backend) {
        self.unload_specs(backend.programs());
    }

    fn unload_specs(&mut self, specs: &[ProgSpec]) {
        for spec in specs {
            let Some(prog) = self.ebpf.program_mut(spec.name) else {
                continue;
            };
            // Unloading a program that never loaded fails harmlessly.
            let _ = match spec.attach {
                Attach::TpBtf(_) => <&mut BtfTracePoint>::try_from(prog).and_then(|p| p.unload()),
                Attach::RawTp(_) => <&mut RawTracePoint>::try_from(prog).and_then(|p| p.unload()),
                Attach::KProbe(_) => <&mut KProbe>::try_from(prog).and_then(|p| p.unload()),
                Attach::FEntry(_) => <&mut FEntry>::try_from(prog).and_then(|p| p.unload()),
                Attach::FExit(_) => <&mut FExit>::try_from(prog).and_then(|p| p.unload()),
                Attach::Tracepoint(..) => {
                    <&mut TracePoint>::try_from(prog).and_then(|p| p.unload())
                }
            };
        }
    }

    /// Checks every backend, most precise first.
    pub fn survey(&mut self) -> Vec<BackendSupport> {
        Backend::PREFERENCE.iter().map(|b| self.check(*b)).collect()
    }

    /// Picks the backend for `choice`: the fixed one if it works, else the first that works.
    pub fn choose(
        &mut self,
        choice: BackendChoice,
    ) -> Result<(Backend, Vec<BackendSupport>), ProbeError> {
        let survey = self.survey();
        let auto = survey.iter().find(|s| s.ok).map(|s| s.backend);
        match choice.fixed() {
            Some(b) => {
                // The survey covers every backend in `Backend::PREFERENCE`; a backend missing
                // from it is reported as unsupported rather than trusted.
                let fixed = survey.iter().find(|s| s.backend == b);
                if fixed.is_some_and(|s| s.ok) {
                    Ok((b, survey))
                } else {
                    Err(ProbeError::Unsupported {
                        backend: b,
                        reason: fixed.map_or_else(
                            || "not among the backends this build surveys".into(),
                            |s| s.reason.clone(),
                        ),
                        auto: auto.map_or("none".into(), |a| a.to_string()),
                    })
                }
            }
            None => match auto {
                Some(b) => Ok((b, survey)),
                None => Err(ProbeError::NoBackend(
                    survey
                        .iter()
                        .map(|s| format!("  {}: {}", s.backend, s.reason))
                        .collect::<Vec<_>>()
                        .join("\n"),
                )),
            },
        }
    }

    /// Loads and attaches every program of `backend`. Links live as long as the `Probe`.
    pub fn attach(&mut self, backend: Backend) -> Result<(), ProbeError> {
        for spec in backend.programs() {
            self.load_and_attach(spec)?;
        }
        Ok(())
    }

    fn load_and_attach(&mut self, spec: &ProgSpec) -> Result<(), ProbeError> {
        let err = |source| ProbeError::Attach {
            what: format!("{} to {}", spec.name, spec.attach.describe()),
            source,
        };
        if self.aya_btf.is_none() {
            return Err(ProbeError::BtfReleased);
        }
        self.load_one(spec).map_err(err)?;
        let prog = self
            .ebpf
            .program_mut(spec.name)
            .ok_or(err(ProgramError::NotLoaded))?;
        let res = match spec.attach {
            Attach::TpBtf(_) => {
                <&mut BtfTracePoint>::try_from(prog).and_then(|p| p.attach().map(drop))
            }
            Attach::RawTp(name) => {
                <&mut RawTracePoint>::try_from(prog).and_then(|p| p.attach(name).map(drop))
            }
            Attach::Tracepoint(category, name) => {
                <&mut TracePoint>::try_from(prog).and_then(|p| p.attach(category, name).map(drop))
            }
            Attach::KProbe(f) => {
                <&mut KProbe>::try_from(prog).and_then(|p| p.attach(f, 0).map(drop))
            }
            Attach::FEntry(_) => <&mut FEntry>::try_from(prog).and_then(|p| p.attach().map(drop)),
            Attach::FExit(_) => <&mut FExit>::try_from(prog).and_then(|p| p.attach().map(drop)),
        };
        res.map_err(err)
    }

    /// Loads and attaches the agent-side programs: bpf(2) deletes and victim drops (every
    /// backend), and the map's in-kernel writes where `backend` can see them. Returns why
    /// datapath writes are not observable, if they are not (not an error: deletes are still
    /// judged by the kernel's conntrack entry).
    pub fn attach_agent(&mut self, backend: Backend) -> Result<Option<String>, ProbeError> {
        if !self.watch_agent {
            return Err(ProbeError::AgentNotRequested);
        }
        for spec in backend::AGENT {
            self.load_and_attach(spec)?;
        }
        let hooks = backend.write_hooks(self.writes_hook);
        if hooks.is_empty() {
            return Ok(Some(format!(
                "the {backend} backend has no hook in the hash-map code"
            )));
        }
        let mut why = Vec::new();
        'hooks: for (name, specs) in hooks {
            for spec in specs {
                if let Err(e) = self.load_and_attach(spec) {
                    // Detach what did attach, so a fallback hook does not double the events.
                    self.unload_specs(specs);
                    why.push(format!("{name}: {e}"));
                    continue 'hooks;
                }
            }
            self.writes_hooked = Some(name);
            return Ok(None);
        }
        Ok(Some(why.join("; ")))
    }

    /// The hook the agent map's writes are seen with (`fentry`/`kprobe`), once attached.
    pub fn writes_hook(&self) -> Option<&'static str> {
        self.writes_hooked
    }

    /// Tells the kernel programs to watch map `id` (with the key layout in `target`).
    pub fn set_target(&mut self, id: u32, target: TargetMap) -> Result<(), ProbeError> {
        let mut map = self.targets()?;
        map.insert(&id, &target, 0)
            .map_err(|source| ProbeError::Map {
                name: "TARGETS",
                source,
            })
    }

    /// Stops watching map `id` (it was re-created under a new id).
    pub fn remove_target(&mut self, id: u32) -> Result<(), ProbeError> {
        let mut map = self.targets()?;
        match map.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(ProbeError::Map {
                name: "TARGETS",
                source,
            }),
        }
    }

    fn targets(&mut self) -> Result<aya::maps::HashMap<&mut MapData, u32, TargetMap>, ProbeError> {
        let map = self
            .ebpf
            .map_mut("TARGETS")
            .ok_or(ProbeError::MissingMap("TARGETS"))?;
        aya::maps::HashMap::try_from(map).map_err(|source| ProbeError::Map {
            name: "TARGETS",
            source,
        })
    }

    /// Takes the ring buffer and the counters for the reader.
    pub fn take_reader(&mut self) -> Result<reader::Reader, ProbeError> {
        let events = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(ProbeError::MissingMap("EVENTS"))?;
        let counters = self
            .ebpf
            .take_map("COUNTERS")
            .ok_or(ProbeError::MissingMap("COUNTERS"))?;
        let ring = aya::maps::RingBuf::try_from(events).map_err(|source| ProbeError::Map {
            name: "EVENTS",
            source,
        })?;
        let counters: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(counters).map_err(|source| ProbeError::Map {
                name: "COUNTERS",
                source,
            })?;
        reader::Reader::new(ring, Counters(counters)).map_err(ProbeError::Poll)
    }
}

/// On EPERM: names a seccomp filter or lockdown that may be the cause, so a container whose
/// runtime profile denies bpf(2) says so instead of looking like a missing kernel feature.
fn seccomp_note() -> String {
    let mut notes = Vec::new();
    if let Some(mode @ (caps::SeccompMode::Filter | caps::SeccompMode::Strict)) =
        caps::seccomp_mode()
    {
        notes.push(format!("seccomp {}", mode.describe()));
    }
    if let Some(mode) = caps::lockdown_mode().filter(|m| m != "none") {
        notes.push(format!("kernel lockdown {mode}"));
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!("; this process runs under {}", notes.join(" and "))
    }
}

/// A short explanation of a program load failure (the verifier log is long; keep its end).
/// A batch delete's records are written in one go at the syscall's exit, before the reader can
/// drain any: a ring that cannot hold them all loses the rest (counted as lost, not silent).
fn warn_if_ring_too_small_for_batches(settings: &ProbeSettings) {
    // Each ring record carries an 8-byte header and is rounded up to 8 bytes.
    let per_key = (std::mem::size_of::<detector_common::MapDeleteEvent>() as u64 + 8 + 7) & !7;
    let needed = per_key * u64::from(settings.max_batch_keys);
    if settings.watch_agent && needed > u64::from(settings.ring_bytes) / 2 {
        tracing::warn!(
            "a batch delete of --max-batch-keys {} keys needs {} KiB of ring buffer, more than              half of --ring-mib {}: the records of a full batch may be lost (counted in              events_lost)",
            settings.max_batch_keys,
            needed >> 10,
            settings.ring_bytes >> 20
        );
    }
}

fn explain(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            // The log ends with statistics; the reason is the last line before them.
            let stats = ["verification time", "stack depth", "processed "];
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !l.trim().is_empty() && !stats.iter().any(|s| l.starts_with(s)))
                .rev()
                .take(2)
                .collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let eperm = io_error.raw_os_error() == Some(libc::EPERM);
            if eperm && log.trim().is_empty() {
                return format!(
                    "BPF_PROG_LOAD returned EPERM with an empty verifier log \
                     (BPF trampolines are disabled on this kernel){}",
                    seccomp_note()
                );
            }
            let note = if eperm { seccomp_note() } else { String::new() };
            format!("{io_error}; verifier: {}{note}", tail.join(" | "))
        }
        other => other.to_string(),
    }
}
