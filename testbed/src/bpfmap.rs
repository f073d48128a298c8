//! BPF maps made with raw bpf(2) calls (no loader library): created, pinned, filled and
//! emptied the way another program (NPA, its datapath) would, plus a bpffs to pin them in.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::cmd::run;
use crate::{Error, Result};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_MAP_TYPE_LRU_HASH`, the type of NPA's conntrack map.
pub const LRU_HASH: u32 = 9;
/// The longest map name the kernel keeps (BPF_OBJ_NAME_LEN less the NUL).
pub const MAX_NAME: usize = 15;

/// A `union bpf_attr` as bytes: every command this module uses fits in 128 of them, and the
/// fields not written stay zero, as the kernel requires.
type Attr = [u8; 128];

// Offsets in `union bpf_attr` (include/uapi/linux/bpf.h).
/// map_create: map_type, key_size, value_size, max_entries, map_name.
const CREATE_TYPE: usize = 0;
const CREATE_KEY_SIZE: usize = 4;
const CREATE_VALUE_SIZE: usize = 8;
const CREATE_MAX_ENTRIES: usize = 12;
const CREATE_NAME: usize = 28;
/// map elem commands: map_fd, key, value.
const ELEM_FD: usize = 0;
const ELEM_KEY: usize = 8;
const ELEM_VALUE: usize = 16;
/// obj_pin: pathname, bpf_fd.
const PIN_PATH: usize = 0;
const PIN_FD: usize = 8;
/// batch: keys, values, count, map_fd.
const BATCH_KEYS: usize = 16;
const BATCH_VALUES: usize = 24;
const BATCH_COUNT: usize = 32;
const BATCH_FD: usize = 36;

/// prog_get_fd_by_id: prog_id. obj_get_info_by_fd: bpf_fd, info_len, info.
const BY_ID_PROG_ID: usize = 0;
const INFO_FD: usize = 0;
const INFO_LEN: usize = 4;
const INFO_PTR: usize = 8;
/// `struct bpf_prog_info`: name (BPF_OBJ_NAME_LEN bytes).
const PROG_INFO_NAME: usize = 64;

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> libc::c_long {
    // SAFETY: `attr` is a zeroed bpf_attr-sized buffer that outlives the call; every pointer
    // written into it points at memory the caller keeps alive across this call.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) }
}

fn put(attr: &mut Attr, off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

fn put_u32(attr: &mut Attr, off: usize, v: u32) {
    put(attr, off, &v.to_ne_bytes());
}

fn put_ptr(attr: &mut Attr, off: usize, p: *const u8) {
    put(attr, off, &(p as u64).to_ne_bytes());
}

/// What to create.
#[derive(Debug, Clone, Copy)]
pub struct MapSpec<'a> {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// At most [`MAX_NAME`] bytes.
    pub name: &'a str,
}

/// A map this process created; closed on drop (a pin keeps it alive).
pub struct BpfMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl BpfMap {
    pub fn create(spec: &MapSpec<'_>) -> Result<Self> {
        if spec.name.len() > MAX_NAME {
            return Err(Error::Invalid(format!(
                "map name {:?} is longer than {MAX_NAME} bytes",
                spec.name
            )));
        }
        let mut a: Attr = [0; 128];
        put_u32(&mut a, CREATE_TYPE, spec.map_type);
        put_u32(&mut a, CREATE_KEY_SIZE, spec.key_size);
        put_u32(&mut a, CREATE_VALUE_SIZE, spec.value_size);
        put_u32(&mut a, CREATE_MAX_ENTRIES, spec.max_entries);
        put(&mut a, CREATE_NAME, spec.name.as_bytes());
        let fd = bpf(BPF_MAP_CREATE, &mut a);
        if fd < 0 {
            return Err(Error::last_os("BPF_MAP_CREATE"));
        }
        let fd = i32::try_from(fd).map_err(|_| Error::Invalid(format!("map fd {fd}")))?;
        // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            key_size: spec.key_size as usize,
            value_size: spec.value_size as usize,
        })
    }

    fn fd(&self) -> u32 {
        self.fd.as_raw_fd() as u32
    }

    /// The map's descriptor, for reads the test harness does not wrap.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Pins the map at `path` (in a bpffs).
    pub fn pin(&self, path: &Path) -> Result<()> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Invalid(format!("{}: a NUL in the path", path.display())))?;
        let mut a: Attr = [0; 128];
        put_ptr(&mut a, PIN_PATH, c.as_ptr().cast());
        put_u32(&mut a, PIN_FD, self.fd());
        if bpf(BPF_OBJ_PIN, &mut a) != 0 {
            return Err(Error::Syscall {
                call: "BPF_OBJ_PIN",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn check(&self, what: &str, len: usize, size: usize) -> Result<()> {
        if size == 0 || !len.is_multiple_of(size) {
            return Err(Error::Invalid(format!(
                "{what}: {len} bytes is not a whole number of {size}-byte entries"
            )));
        }
        Ok(())
    }

    /// BPF_MAP_UPDATE_ELEM of one key and value.
    pub fn update(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.check("key", key.len(), self.key_size)?;
        self.check("value", value.len(), self.value_size)?;
        let mut a: Attr = [0; 128];
        put_u32(&mut a, ELEM_FD, self.fd());
        put_ptr(&mut a, ELEM_KEY, key.as_ptr());
        put_ptr(&mut a, ELEM_VALUE, value.as_ptr());
        if bpf(BPF_MAP_UPDATE_ELEM, &mut a) != 0 {
            return Err(Error::last_os("BPF_MAP_UPDATE_ELEM"));
        }
        Ok(())
    }

    /// BPF_MAP_UPDATE_BATCH: `keys` and `values` hold the same number of entries back to back.
    pub fn update_batch(&self, keys: &[u8], values: &[u8]) -> Result<()> {
        self.check("keys", keys.len(), self.key_size)?;
        self.check("values", values.len(), self.value_size)?;
        let count = keys.len() / self.key_size;
        if values.len() / self.value_size != count {
            return Err(Error::Invalid("keys and values differ in number".into()));
        }
        let mut a: Attr = [0; 128];
        put_ptr(&mut a, BATCH_KEYS, keys.as_ptr());
        put_ptr(&mut a, BATCH_VALUES, values.as_ptr());
        put_u32(&mut a, BATCH_COUNT, count as u32);
        put_u32(&mut a, BATCH_FD, self.fd());
        if bpf(BPF_MAP_UPDATE_BATCH, &mut a) != 0 {
            return Err(Error::last_os("BPF_MAP_UPDATE_BATCH"));
        }
        Ok(())
    }

    /// BPF_MAP_DELETE_ELEM, as NPA's cleanup does it: the kernel's answer (ENOENT is one).
    pub fn delete(&self, key: &[u8]) -> io::Result<()> {
        let mut a: Attr = [0; 128];
        put_u32(&mut a, ELEM_FD, self.fd());
        put_ptr(&mut a, ELEM_KEY, key.as_ptr());
        if bpf(BPF_MAP_DELETE_ELEM, &mut a) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// BPF_MAP_DELETE_BATCH of `keys` (entries back to back): the kernel's answer and the
    /// number of keys it processed (it reports that even when it fails midway).
    pub fn delete_batch(&self, keys: &[u8]) -> (io::Result<()>, u32) {
        let count = (keys.len() / self.key_size.max(1)) as u32;
        let mut a: Attr = [0; 128];
        put_ptr(&mut a, BATCH_KEYS, keys.as_ptr());
        put_u32(&mut a, BATCH_COUNT, count);
        put_u32(&mut a, BATCH_FD, self.fd());
        let rc = bpf(BPF_MAP_DELETE_BATCH, &mut a);
        let result = if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        let mut n = [0u8; 4];
        n.copy_from_slice(&a[BATCH_COUNT..BATCH_COUNT + 4]);
        (result, u32::from_ne_bytes(n))
    }
}

/// A bpffs mounted on a directory this guard created; unmounted and removed on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn mount_at(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let fs = Self { dir };
        run("mount", &["-t", "bpf", "bpf", &fs.dir.to_string_lossy()])?;
        Ok(fs)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = run("umount", &[&self.dir.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The name of the loaded BPF program `id` (as `prog_id:` in a process's fdinfo shows it),
/// as its loader gave it (the kernel keeps 15 bytes).
pub fn prog_name(id: u32) -> Result<String> {
    let mut a: Attr = [0; 128];
    put_u32(&mut a, BY_ID_PROG_ID, id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut a);
    if fd < 0 {
        return Err(Error::Syscall {
            call: "BPF_PROG_GET_FD_BY_ID",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = [0u8; 128];
    let mut a: Attr = [0; 128];
    put_u32(&mut a, INFO_FD, fd.as_raw_fd() as u32);
    put_u32(&mut a, INFO_LEN, info.len() as u32);
    put_ptr(&mut a, INFO_PTR, info.as_mut_ptr());
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a) != 0 {
        return Err(Error::Syscall {
            call: "BPF_OBJ_GET_INFO_BY_FD",
            source: io::Error::last_os_error(),
        });
    }
    let name = &info[PROG_INFO_NAME..PROG_INFO_NAME + MAX_NAME + 1];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..len]).into_owned())
}
