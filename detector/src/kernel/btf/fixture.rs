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

    fn aggregate(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
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
