//! Kernel struct offsets from BTF, resolved at load time.
//!
//! rustc emits no CO-RE relocations, so the loader resolves member paths such as
//! `nf_conn.tuplehash[1].tuple` against the running kernel's BTF (`vmlinux`, plus the split BTF
//! of modules such as `nf_conntrack`) and hands the byte offsets to the kernel programs.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use thiserror::Error;

mod member;

pub use member::member_offset;
use member::{find_struct, strip};

#[cfg(test)]
pub(crate) mod fixture;
#[cfg(test)]
mod tests;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "no kernel BTF at {path}: {source}. The detector needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (every EKS AMI, Debian, Ubuntu and Fedora kernel has it); \
         on this host, point --btf-dir at the directory holding `vmlinux` BTF if it lives elsewhere"
    )]
    Missing {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("cannot parse module BTF {path}: {source}")]
    Module {
        path: PathBuf,
        #[source]
        source: btf_rs::Error,
    },
    #[error("struct {0} is not in the kernel's BTF (vmlinux or loaded modules)")]
    NoStruct(String),
    #[error("struct {strukt} has no member path `{path}` in this kernel's BTF")]
    NoMember { strukt: String, path: String },
    #[error("{0}")]
    Layout(String),
    #[error("malformed member path `{0}`")]
    BadPath(String),
    #[error("BTF error while resolving {what}: {source}")]
    Btf {
        what: String,
        #[source]
        source: btf_rs::Error,
    },
}

/// The kernel's BTF: vmlinux and the split BTF of the modules that were asked for and loaded.
pub struct KernelBtf {
    dir: PathBuf,
    vmlinux: Btf,
    /// (module name, split BTF over vmlinux)
    modules: Vec<(String, Btf)>,
}

impl KernelBtf {
    /// Reads `dir/vmlinux` and, for each name in `modules` that has a file in `dir`, its split
    /// BTF. A module that is absent is not an error: it may be built in (then its types are in
    /// vmlinux) or not loaded yet.
    pub fn load(dir: &Path, modules: &[&str]) -> Result<Self, BtfError> {
        let path = dir.join("vmlinux");
        let vmlinux = Btf::from_file(&path).map_err(|source| BtfError::Missing {
            path: path.clone(),
            source,
        })?;
        let mut loaded = Vec::new();
        for m in modules {
            let p = dir.join(m);
            if p.exists() {
                let b = Btf::from_split_file(&p, &vmlinux)
                    .map_err(|source| BtfError::Module { path: p, source })?;
                loaded.push((m.to_string(), b));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            vmlinux,
            modules: loaded,
        })
    }

    /// For tests: BTF given as bytes (a base and optional split sections).
    pub fn from_bytes(base: &[u8], modules: &[(&str, &[u8])]) -> Result<Self, BtfError> {
        let vmlinux = Btf::from_bytes(base).map_err(|source| BtfError::Btf {
            what: "base BTF".into(),
            source,
        })?;
        let mut loaded = Vec::new();
        for (name, bytes) in modules {
            let b = Btf::from_split_bytes(bytes, &vmlinux).map_err(|source| BtfError::Btf {
                what: format!("split BTF {name}"),
                source,
            })?;
            loaded.push((name.to_string(), b));
        }
        Ok(Self {
            dir: PathBuf::new(),
            vmlinux,
            modules: loaded,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of the split-BTF modules that were loaded.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|(n, _)| n.as_str())
    }

    /// Where a struct is defined: `"vmlinux"` or the module's name.
    pub fn struct_home(&self, strukt: &str) -> Option<&str> {
        if find_struct(&self.vmlinux, strukt).is_ok() {
            return Some("vmlinux");
        }
        self.modules
            .iter()
            .find(|(_, b)| find_struct(b, strukt).is_ok())
            .map(|(n, _)| n.as_str())
    }

    /// True when a function named `func` has BTF in vmlinux (not in a module).
    pub fn vmlinux_has_func(&self, func: &str) -> bool {
        has_func(&self.vmlinux, func)
    }

    /// Name of the module whose split BTF has function `func`, if any.
    pub fn module_of_func(&self, func: &str) -> Option<&str> {
        self.modules
            .iter()
            .find(|(_, b)| has_func_in_split(b, func))
            .map(|(n, _)| n.as_str())
    }

    /// Whether argument `index` of tracepoint `tp` (its TP_PROTO, as a raw tracepoint sees
    /// it) points to `struct strukt`, from the `btf_trace_<tp>` typedef in vmlinux BTF. `None`
    /// when the tracepoint or the argument is not described.
    pub fn tracepoint_arg_is_struct(&self, tp: &str, index: usize, strukt: &str) -> Option<bool> {
        let btf = &self.vmlinux;
        let td = btf
            .resolve_types_by_name(&format!("btf_trace_{tp}"))
            .ok()?
            .into_iter()
            .find(|t| matches!(t, Type::Typedef(_)))?;
        let Type::Ptr(p) = strip(btf, td).ok()? else {
            return None;
        };
        let Type::FuncProto(proto) = btf.resolve_chained_type(&p).ok()? else {
            return None;
        };
        // The first parameter is the tracepoint's private data, not a TP_PROTO argument.
        let param = proto.parameters.get(index + 1)?;
        let Type::Ptr(arg) = strip(btf, btf.resolve_chained_type(param).ok()?).ok()? else {
            return Some(false);
        };
        Some(
            match strip(btf, btf.resolve_chained_type(&arg).ok()?).ok()? {
                Type::Struct(s) => btf.resolve_name(&s).is_ok_and(|n| n == strukt),
                _ => false,
            },
        )
    }

    /// Values and names of enum `name` (vmlinux), e.g. `skb_drop_reason`; empty if absent.
    pub fn enum_values(&self, name: &str) -> Vec<(u32, String)> {
        let Ok(types) = self.vmlinux.resolve_types_by_name(name) else {
            return Vec::new();
        };
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Enum(e) => Some(
                    e.members
                        .iter()
                        .map(|m| (m.val(), self.vmlinux.resolve_name(m).unwrap_or_default()))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Byte offset of `path` (e.g. `tuplehash[1].tuple.dst.u.all`) inside `struct strukt`,
    /// looked up in vmlinux first, then in each module's split BTF.
    pub fn offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut last = None;
        for btf in std::iter::once(&self.vmlinux).chain(self.modules.iter().map(|(_, b)| b)) {
            match member_offset(btf, strukt, path) {
                Ok(off) => return Ok(off),
                Err(e @ BtfError::NoStruct(_)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| BtfError::NoStruct(strukt.to_string())))
    }
}

fn has_func(btf: &Btf, func: &str) -> bool {
    btf.resolve_types_by_name(func)
        .map(|ts| ts.iter().any(|t| matches!(t, Type::Func(_))))
        .unwrap_or(false)
}

fn has_func_in_split(btf: &Btf, func: &str) -> bool {
    // A split Btf also resolves names of its base; only count the split section's own ids.
    let Some(split) = btf.split() else {
        return false;
    };
    split
        .resolve_ids_by_name(func)
        .map(|ids| {
            ids.iter()
                .any(|id| matches!(btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
        })
        .unwrap_or(false)
}
