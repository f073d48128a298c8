//! Kernel struct offsets from BTF, resolved at load time.
//!
//! rustc emits no CO-RE relocations, so the loader resolves member paths such as
//! `nf_conn.tuplehash[1].tuple` against the running kernel's BTF (`vmlinux`, plus the split BTF
//! of modules such as `nf_conntrack`) and hands the byte offsets to the kernel programs.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use thiserror::Error;

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

fn btf_err(what: impl Into<String>) -> impl FnOnce(btf_rs::Error) -> BtfError {
    let what = what.into();
    move |source| BtfError::Btf { what, source }
}

/// The struct named `name` that has members (skipping forward declarations).
fn find_struct(btf: &Btf, name: &str) -> Result<Type, BtfError> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|_| BtfError::NoStruct(name.to_string()))?;
    types
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| BtfError::NoStruct(name.to_string()))
}

/// How deep type chains (typedefs, qualifiers, nested arrays, anonymous members) may go. Real
/// kernels stay under ten; malformed BTF can make them cycle.
const MAX_TYPE_DEPTH: usize = 64;

fn too_deep(what: &str) -> BtfError {
    BtfError::BadPath(format!(
        "{what} nests deeper than {MAX_TYPE_DEPTH} types (cyclic BTF?)"
    ))
}

/// Follows typedefs and qualifiers to the underlying type.
fn strip(btf: &Btf, mut ty: Type) -> Result<Type, BtfError> {
    for _ in 0..MAX_TYPE_DEPTH {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) => btf.resolve_chained_type(t),
            Type::Volatile(t) => btf.resolve_chained_type(t),
            Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        }
        .map_err(btf_err("a typedef chain"))?;
    }
    Err(too_deep("a typedef chain"))
}

/// Size in bytes of a (stripped) type, for array indexing.
fn type_size(btf: &Btf, ty: &Type, depth: usize) -> Result<u64, BtfError> {
    if depth >= MAX_TYPE_DEPTH {
        return Err(too_deep("an array"));
    }
    Ok(match strip(btf, ty.clone())? {
        Type::Int(i) => i.size() as u64,
        Type::Struct(s) | Type::Union(s) => s.size() as u64,
        Type::Enum(e) => e.size() as u64,
        Type::Enum64(e) => e.size() as u64,
        Type::Float(f) => f.size() as u64,
        Type::Ptr(_) => 8,
        Type::Array(a) => {
            let elem = btf
                .resolve_chained_type(&a)
                .map_err(btf_err("an array element"))?;
            (a.len() as u64)
                .checked_mul(type_size(btf, &elem, depth + 1)?)
                .ok_or_else(|| BtfError::BadPath("an array larger than 2^64 bytes".into()))?
        }
        other => {
            return Err(BtfError::BadPath(format!(
                "cannot size a BTF {} type",
                other.name()
            )));
        }
    })
}

/// Finds member `name` in a struct/union, descending into anonymous members. Returns its bit
/// offset from the start of `ty` and its type.
fn find_member(
    btf: &Btf,
    ty: &Type,
    name: &str,
    depth: usize,
) -> Result<Option<(u64, Type)>, BtfError> {
    if depth >= MAX_TYPE_DEPTH {
        return Err(too_deep("an anonymous member"));
    }
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return Ok(None);
    };
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let mty = btf
            .resolve_chained_type(m)
            .map_err(btf_err(format!("member {name}")))?;
        if mname == name {
            return Ok(Some((m.bit_offset() as u64, mty)));
        }
        if mname.is_empty() {
            let inner = strip(btf, mty)?;
            if let Some((off, t)) = find_member(btf, &inner, name, depth + 1)? {
                return Ok(Some((m.bit_offset() as u64 + off, t)));
            }
        }
    }
    Ok(None)
}

/// Parses `a.b[2].c` into [("a", None), ("b", Some(2)), ("c", None)].
fn parse_path(path: &str) -> Result<Vec<(&str, Option<u64>)>, BtfError> {
    let bad = || BtfError::BadPath(path.to_string());
    path.split('.')
        .map(|seg| match seg.split_once('[') {
            None if !seg.is_empty() => Ok((seg, None)),
            None => Err(bad()),
            Some((name, rest)) => {
                let idx = rest.strip_suffix(']').ok_or_else(bad)?;
                let idx: u64 = idx.parse().map_err(|_| bad())?;
                if name.is_empty() {
                    return Err(bad());
                }
                Ok((name, Some(idx)))
            }
        })
        .collect()
}

/// Byte offset of `path` inside `struct strukt` in one BTF object.
pub fn member_offset(btf: &Btf, strukt: &str, path: &str) -> Result<u32, BtfError> {
    let segments = parse_path(path)?;
    let mut ty = find_struct(btf, strukt)?;
    let mut bits: u64 = 0;
    let no_member = || BtfError::NoMember {
        strukt: strukt.to_string(),
        path: path.to_string(),
    };
    for (name, index) in segments {
        let cur = strip(btf, ty)?;
        let (off, mty) = find_member(btf, &cur, name, 0)?.ok_or_else(no_member)?;
        bits = bits.checked_add(off).ok_or_else(no_member)?;
        ty = mty;
        if let Some(i) = index {
            let Type::Array(a) = strip(btf, ty)? else {
                return Err(no_member());
            };
            if i >= a.len() as u64 {
                return Err(no_member());
            }
            let elem = btf
                .resolve_chained_type(&a)
                .map_err(btf_err(format!("{strukt}.{path}")))?;
            bits = type_size(btf, &elem, 0)?
                .checked_mul(i.saturating_mul(8))
                .and_then(|b| b.checked_add(bits))
                .ok_or_else(no_member)?;
            ty = elem;
        }
    }
    if !bits.is_multiple_of(8) {
        return Err(BtfError::BadPath(format!(
            "{strukt}.{path} is a bitfield (bit offset {bits})"
        )));
    }
    u32::try_from(bits / 8).map_err(|_| BtfError::BadPath(path.to_string()))
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A minimal BTF writer for tests: enough kinds (INT, PTR, ARRAY, STRUCT, UNION, TYPEDEF,
    //! FUNC_PROTO, FUNC) to describe small kernel-like structs, as base or split sections.

    pub struct BtfWriter {
        types: Vec<u8>,
        strings: Vec<u8>,
        /// id of the next type
        next_id: u32,
        /// string offset of our first byte (base section's string length for split BTF)
        str_base: u32,
    }

    const KIND_INT: u32 = 1;
    const KIND_PTR: u32 = 2;
    const KIND_ARRAY: u32 = 3;
    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_TYPEDEF: u32 = 8;
    const KIND_FUNC: u32 = 12;
    const KIND_FUNC_PROTO: u32 = 13;

    impl BtfWriter {
        pub fn base() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
                str_base: 0,
            }
        }

        /// A split section over a base with `base_types` types and `base_str_len` string bytes.
        pub fn split(base: &BtfWriter) -> Self {
            Self {
                types: Vec::new(),
                strings: Vec::new(),
                next_id: base.next_id,
                str_base: base.strings.len() as u32,
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.str_base + self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn push(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32) -> u32 {
            let n = self.name(name);
            for w in [n, (kind << 24) | vlen, size_or_type] {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn word(&mut self, w: u32) {
            self.types.extend_from_slice(&w.to_le_bytes());
        }

        pub fn int(&mut self, name: &str, bytes: u32) -> u32 {
            let id = self.push(name, KIND_INT, 0, bytes);
            self.word(bytes * 8);
            id
        }

        pub fn ptr(&mut self, to: u32) -> u32 {
            self.push("", KIND_PTR, 0, to)
        }

        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.push(name, KIND_TYPEDEF, 0, to)
        }

        pub fn array(&mut self, elem: u32, index_type: u32, n: u32) -> u32 {
            let id = self.push("", KIND_ARRAY, 0, 0);
            self.word(elem);
            self.word(index_type);
            self.word(n);
            id
        }

        fn aggregate(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let names: Vec<u32> = members.iter().map(|(n, _, _)| self.name(n)).collect();
            let n = self.name(name);
            for w in [n, (kind << 24) | members.len() as u32, size] {
                self.word(w);
            }
            for ((_, ty, byte_off), name_off) in members.iter().zip(names) {
                self.word(name_off);
                self.word(*ty);
                self.word(byte_off * 8);
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        /// members: (name, type id, byte offset)
        pub fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.aggregate(KIND_STRUCT, name, size, members)
        }

        pub fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.aggregate(KIND_UNION, name, size, members)
        }

        pub fn func(&mut self, name: &str) -> u32 {
            let proto = self.push("", KIND_FUNC_PROTO, 0, 0);
            self.push(name, KIND_FUNC, 0, proto)
        }

        pub fn bytes(&self) -> Vec<u8> {
            let hdr_len = 24u32;
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&hdr_len.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes()); // type_off
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes()); // str_off
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::BtfWriter;
    use super::*;

    /// A small "kernel": struct net { u64 pad; struct ns_common ns @16 } in the base, and a
    /// conntrack-like struct with anonymous unions and an array in a module's split section.
    fn fixture() -> (Vec<u8>, Vec<u8>) {
        let mut b = BtfWriter::base();
        let u8_ = b.int("u8", 1);
        let u16_ = b.int("u16", 2);
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("long unsigned int", 8);
        let ns = b.strukt("ns_common", 16, &[("stashed", u64_, 0), ("inum", u32_, 8)]);
        let net = b.strukt("net", 64, &[("passive", u64_, 0), ("ns", ns, 16)]);
        let netp = b.ptr(net);
        let possible = b.strukt("", 8, &[("net", netp, 0)]);
        let possible_t = b.typedef("possible_net_t", possible);
        // sk_buff with _nfct inside an anonymous union
        let anon = b.union("", 8, &[("_nfct", u64_, 0), ("other", u32_, 0)]);
        let _skb = b.strukt("sk_buff", 232, &[("next", u64_, 0), ("", anon, 104)]);
        b.func("vmlinux_fn");
        let base_bytes = b.bytes();

        let mut m = BtfWriter::split(&b);
        let addr = m.union("nf_inet_addr", 16, &[("ip", u32_, 0), ("all", u32_, 0)]);
        let port = m.union("", 2, &[("all", u16_, 0)]);
        let src = m.strukt(
            "nf_conntrack_man",
            20,
            &[("u3", addr, 0), ("u", port, 16), ("l3num", u16_, 18)],
        );
        let dst = m.strukt(
            "",
            20,
            &[
                ("u3", addr, 0),
                ("u", port, 16),
                ("protonum", u8_, 18),
                ("dir", u8_, 19),
            ],
        );
        let tuple = m.strukt(
            "nf_conntrack_tuple",
            40,
            &[("src", src, 0), ("dst", dst, 20)],
        );
        let hash = m.strukt(
            "nf_conntrack_tuple_hash",
            56,
            &[("hnnode", u64_, 0), ("tuple", tuple, 16)],
        );
        let arr = m.array(hash, u32_, 2);
        let _ct = m.strukt(
            "nf_conn",
            256,
            &[
                ("ct_general", u32_, 0),
                ("timeout", u32_, 8),
                ("tuplehash", arr, 16),
                ("status", u64_, 128),
                ("ct_net", possible_t, 136),
            ],
        );
        m.func("nf_ct_delete");
        (base_bytes, m.bytes())
    }

    #[test]
    fn offsets_from_base_and_split_btf() {
        let (base, split) = fixture();
        let k = KernelBtf::from_bytes(&base, &[("nf_conntrack", &split)]).unwrap();
        assert_eq!(k.offset("net", "ns.inum").unwrap(), 24);
        assert_eq!(
            k.offset("sk_buff", "_nfct").unwrap(),
            104,
            "through an anonymous union"
        );
        assert_eq!(k.offset("nf_conn", "timeout").unwrap(), 8);
        assert_eq!(k.offset("nf_conn", "status").unwrap(), 128);
        assert_eq!(
            k.offset("nf_conn", "ct_net.net").unwrap(),
            136,
            "through a typedef"
        );
        assert_eq!(k.offset("nf_conn", "tuplehash[0].tuple").unwrap(), 16 + 16);
        assert_eq!(
            k.offset("nf_conn", "tuplehash[1].tuple").unwrap(),
            16 + 56 + 16
        );
        assert_eq!(
            k.offset("nf_conn", "tuplehash[1].tuple.dst.protonum")
                .unwrap(),
            16 + 56 + 16 + 20 + 18
        );
        assert_eq!(k.offset("nf_conntrack_tuple", "src.u.all").unwrap(), 16);
        assert_eq!(k.offset("nf_conntrack_tuple", "dst.u3").unwrap(), 20);
        assert_eq!(k.struct_home("nf_conn"), Some("nf_conntrack"));
        assert_eq!(k.struct_home("net"), Some("vmlinux"));
        assert!(k.vmlinux_has_func("vmlinux_fn"));
        assert!(!k.vmlinux_has_func("nf_ct_delete"));
        assert_eq!(k.module_of_func("nf_ct_delete"), Some("nf_conntrack"));
        assert_eq!(k.module_of_func("vmlinux_fn"), None);
    }

    #[test]
    fn split_types_are_invisible_without_the_module() {
        let (base, _) = fixture();
        let k = KernelBtf::from_bytes(&base, &[]).unwrap();
        assert!(matches!(
            k.offset("nf_conn", "timeout"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn errors_name_the_member() {
        let (base, split) = fixture();
        let k = KernelBtf::from_bytes(&base, &[("nf_conntrack", &split)]).unwrap();
        let e = k.offset("nf_conn", "tuplehash[2].tuple").unwrap_err();
        assert!(matches!(e, BtfError::NoMember { .. }), "{e}");
        let e = k.offset("nf_conn", "nope").unwrap_err();
        assert!(e.to_string().contains("nf_conn") && e.to_string().contains("nope"));
        assert!(matches!(
            k.offset("nf_conn", "a..b"),
            Err(BtfError::BadPath(_))
        ));
        assert!(matches!(
            k.offset("nf_conn", "x[y]"),
            Err(BtfError::BadPath(_))
        ));
    }

    #[test]
    fn missing_btf_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join("detector-no-btf-here");
        let e = KernelBtf::load(&dir, &["nf_conntrack"]).err().unwrap();
        let msg = e.to_string();
        assert!(msg.contains("CONFIG_DEBUG_INFO_BTF"), "{msg}");
        assert!(msg.contains("vmlinux"), "{msg}");
    }
}
