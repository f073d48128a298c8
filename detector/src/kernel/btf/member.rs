//! Member paths (`nf_conn.tuplehash[1].tuple`) resolved to byte offsets in one BTF object:
//! through typedefs and qualifiers, anonymous structs and unions, and array elements.

use btf_rs::{Btf, Type};

use super::BtfError;

fn btf_err(what: impl Into<String>) -> impl FnOnce(btf_rs::Error) -> BtfError {
    let what = what.into();
    move |source| BtfError::Btf { what, source }
}

/// The struct named `name` that has members (skipping forward declarations).
pub(super) fn find_struct(btf: &Btf, name: &str) -> Result<Type, BtfError> {
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
pub(super) fn strip(btf: &Btf, mut ty: Type) -> Result<Type, BtfError> {
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
