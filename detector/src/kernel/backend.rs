//! Backends: which programs of the one object are loaded, and where they attach.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// fexit `__nf_conntrack_confirm` + fentry `nf_ct_destroy`: exact insert time, no per-packet
    /// cost. Needs BPF trampolines and the functions in vmlinux BTF.
    Fentry,
    /// kprobe/kretprobe `__nf_conntrack_confirm` + kprobe `nf_ct_destroy`: exact insert time,
    /// works for conntrack built as a module. Needs CONFIG_KPROBES.
    Kprobe,
    /// tp_btf skb tracepoints (insert seen on the entry's first transmitted/consumed packet,
    /// tens of microseconds late) + raw tracepoint `kmem_cache_free` on the nf_conntrack cache.
    Tracepoint,
}

/// The backend flag: a backend, or `auto` (the most precise one that loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

impl BackendChoice {
    pub fn fixed(self) -> Option<Backend> {
        match self {
            BackendChoice::Auto => None,
            BackendChoice::Fentry => Some(Backend::Fentry),
            BackendChoice::Kprobe => Some(Backend::Kprobe),
            BackendChoice::Tracepoint => Some(Backend::Tracepoint),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// tp_btf on a tracepoint name.
    TpBtf(&'static str),
    /// A raw tracepoint (arguments as plain u64, no BTF type checks) on a tracepoint name.
    RawTp(&'static str),
    /// A classic (perf) tracepoint: category and name.
    Tracepoint(&'static str, &'static str),
    /// kprobe or kretprobe (decided by the program's section) on a kernel function.
    KProbe(&'static str),
    FEntry(&'static str),
    FExit(&'static str),
}

impl Attach {
    pub fn describe(&self) -> String {
        match self {
            Attach::TpBtf(t) => format!("tp_btf/{t}"),
            Attach::RawTp(t) => format!("raw_tp/{t}"),
            Attach::Tracepoint(c, n) => format!("tracepoint/{c}/{n}"),
            Attach::KProbe(f) => format!("kprobe/{f}"),
            Attach::FEntry(f) => format!("fentry/{f}"),
            Attach::FExit(f) => format!("fexit/{f}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProgSpec {
    /// Program (function) name in the object.
    pub name: &'static str,
    pub attach: Attach,
}

const TRACEPOINT: &[ProgSpec] = &[
    ProgSpec {
        name: "ct_destroy_kmem_cache_free",
        attach: Attach::RawTp("kmem_cache_free"),
    },
    ProgSpec {
        name: "ct_new_net_dev_queue",
        attach: Attach::TpBtf("net_dev_queue"),
    },
    ProgSpec {
        name: "ct_new_consume_skb",
        attach: Attach::TpBtf("consume_skb"),
    },
    ProgSpec {
        name: "ct_new_kfree_skb",
        attach: Attach::TpBtf("kfree_skb"),
    },
];

const KPROBE: &[ProgSpec] = &[
    ProgSpec {
        name: "ct_destroy_kprobe",
        attach: Attach::KProbe("nf_ct_destroy"),
    },
    ProgSpec {
        name: "ct_confirm_kprobe",
        attach: Attach::KProbe("__nf_conntrack_confirm"),
    },
    ProgSpec {
        name: "ct_confirm_kretprobe",
        attach: Attach::KProbe("__nf_conntrack_confirm"),
    },
];

const FENTRY: &[ProgSpec] = &[
    ProgSpec {
        name: "ct_destroy_fentry",
        attach: Attach::FEntry("nf_ct_destroy"),
    },
    ProgSpec {
        name: "ct_confirm_fexit",
        attach: Attach::FExit("__nf_conntrack_confirm"),
    },
];

/// Agent-side programs every backend loads: the agent's bpf(2) deletes (syscalls:sys_*_bpf
/// fire only for bpf(2), so other syscalls pay nothing) and drops of victim flows.
pub const AGENT: &[ProgSpec] = &[
    ProgSpec {
        name: "agent_delete_enter",
        attach: Attach::Tracepoint("syscalls", "sys_enter_bpf"),
    },
    ProgSpec {
        name: "agent_delete_exit",
        attach: Attach::Tracepoint("syscalls", "sys_exit_bpf"),
    },
    ProgSpec {
        name: "packet_drop_kfree_skb",
        attach: Attach::TpBtf("kfree_skb"),
    },
];

const KPROBE_WRITES: &[ProgSpec] = &[
    ProgSpec {
        name: "map_update_kprobe",
        attach: Attach::KProbe("htab_lru_map_update_elem"),
    },
    ProgSpec {
        name: "map_delete_kprobe",
        attach: Attach::KProbe("htab_lru_map_delete_elem"),
    },
];

const FENTRY_WRITES: &[ProgSpec] = &[
    ProgSpec {
        name: "map_update_fentry",
        attach: Attach::FEntry("htab_lru_map_update_elem"),
    },
    ProgSpec {
        name: "map_delete_fentry",
        attach: Attach::FEntry("htab_lru_map_delete_elem"),
    },
];

/// Where the agent map's writes inside the kernel are hooked, for the backends that can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WritesHook {
    /// fentry where it loads (cheaper, and it also sees bpf(2)'s own map operations), else
    /// kprobe (kprobe backend only).
    Auto,
    Fentry,
    Kprobe,
}

impl Backend {
    /// The hooks that can see the agent map's writes inside the kernel (the datapath's inserts
    /// and updates), in order of preference: the first whose programs load is used. None on
    /// the tracepoint backend. The fentry ones are on vmlinux functions, so the kprobe backend
    /// (picked when conntrack's functions are in a module) can still use them.
    pub fn write_hooks(self, hook: WritesHook) -> Vec<(&'static str, &'static [ProgSpec])> {
        let fentry = ("fentry", FENTRY_WRITES);
        let kprobe = ("kprobe", KPROBE_WRITES);
        match (self, hook) {
            (Backend::Tracepoint, _) => vec![],
            (_, WritesHook::Fentry) | (Backend::Fentry, WritesHook::Auto) => vec![fentry],
            (_, WritesHook::Kprobe) => vec![kprobe],
            (Backend::Kprobe, WritesHook::Auto) => vec![fentry, kprobe],
        }
    }

    /// Most precise first: the order `auto` tries them in.
    pub const PREFERENCE: [Backend; 3] = [Backend::Fentry, Backend::Kprobe, Backend::Tracepoint];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Fentry => "fentry",
            Backend::Kprobe => "kprobe",
            Backend::Tracepoint => "tracepoint",
        }
    }

    pub fn programs(self) -> &'static [ProgSpec] {
        match self {
            Backend::Fentry => FENTRY,
            Backend::Kprobe => KPROBE,
            Backend::Tracepoint => TRACEPOINT,
        }
    }

    /// How far the NEW timestamp may trail the kernel's own insert.
    pub fn insert_precision(self) -> &'static str {
        match self {
            Backend::Fentry | Backend::Kprobe => "exact (at confirm)",
            Backend::Tracepoint => "first packet after confirm (typically < 100 us late)",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
