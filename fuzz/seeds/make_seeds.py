#!/usr/bin/env python3
"""Writes the seeds that are built rather than captured: ring-buffer records in the layouts of
detector-common (the same values as record.rs's tests), NPA map keys and values per layout, a
small kernel-like BTF (base + nf_conntrack split section) and HTTP requests. The ctnetlink
dumps come from ctnetlink_dump.py in a namespace, the tracefs seeds from /sys/kernel/tracing."""
import os
import socket
import struct
import sys

corpus = sys.argv[1]


def put(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- ring-buffer records (detector-common: EventHeader, Tuple, TaskInfo, *Event) -----------
def hdr(kind, size, ts=123, cpu=1):
    return struct.pack("<BBHIQ", kind, 1, size, cpu, ts)


def tuple_(family, proto, sport, dport, src, dst):
    return struct.pack("<BBHHH16s16s", family, proto, sport, dport, 0, src, dst)


def task(pid=7, tid=8, comm=b"curl"):
    return struct.pack("<II16s", pid, tid, comm)


v4 = lambda a: socket.inet_aton(a)
v6 = lambda a: socket.inet_pton(socket.AF_INET6, a)
orig4 = tuple_(2, 6, 40000, 5001, v4("10.77.0.2"), v4("10.77.0.1"))
reply4 = tuple_(2, 6, 5001, 40000, v4("10.77.0.1"), v4("10.77.0.2"))
orig6 = tuple_(10, 17, 40001, 53, v6("fd00::2"), v6("fd00::1"))


def ct(kind, orig, reply, reason, source):
    body = orig + reply + struct.pack(
        "<QQQIIiBBH", 0xFFFF888000001000, 100, 5, 0x18E, 4026532177, -3, reason, source, 0
    ) + task()
    return hdr(kind, 16 + len(body)) + body


put("record_decode", "ct-new-v4", ct(1, orig4, reply4, 0, 4))
put("record_decode", "ct-destroy-v4-expired", ct(2, orig4, reply4, 1, 4))
put("record_decode", "ct-destroy-v6-killed-kprobe", ct(2, orig6, orig6, 2, 6))
key24 = v4("10.77.0.2") + struct.pack("<H2x", 40000) + v4("10.77.0.1") + struct.pack(
    "<HBx", 5001, 6) + v4("10.77.0.2") + struct.pack("<I", 9)
body = task(4242, 4242, b"aws-network-pol") + struct.pack(
    "<IIqQIBBHQQiI", 17, 3, 0, 200, len(key24), 2, 0, 0, 0xFFFF888000001000, 100, 40, 0x18E
) + key24.ljust(64, b"\0")
put("record_decode", "map-delete-live", hdr(3, 16 + len(body)) + body)
body = tuple_(2, 6, 5001, 40000, v4("10.77.0.1"), v4("10.77.0.2")) + struct.pack("<IIQ", 2, 0, 150)
put("record_decode", "packet-drop", hdr(4, 16 + len(body)) + body)
body = task(4242, 4243, b"aws-network-pol") + struct.pack("<IIBB6x", 17, len(key24), 1, 1) + key24.ljust(64, b"\0")
put("record_decode", "map-write-update", hdr(5, 16 + len(body)) + body)

# --- NPA keys and values (npa/layout.rs: src sport pad16 dst dport proto pad8 owner [ifindex]) ---
def npa_key(src, sport, dst, dport, proto, owner, ifindex=None):
    b = src + struct.pack("<H2x", sport) + dst + struct.pack("<HBx", dport, proto) + owner
    return b + (struct.pack("<I", ifindex) if ifindex is not None else b"")


put("npa_layout", "key-v4-20", npa_key(v4("10.77.0.2"), 40000, v4("10.77.0.1"), 5001, 6, v4("10.77.0.2")))
put("npa_layout", "key-v4-24", key24)
put("npa_layout", "key-v6-56", npa_key(v6("fd00::2"), 40001, v6("fd00::1"), 443, 6, v6("fd00::1")))
put("npa_layout", "key-v6-60", npa_key(v6("fd00::2"), 40001, v6("fd00::1"), 443, 17, v6("fd00::2"), 12))
put("npa_layout", "value-16", struct.pack("<QQ", 1, 987654321))
put("npa_layout", "value-1", b"\x01")
put("npa_layout", "sizes-24-16", struct.pack("<II", 24, 16))
put("npa_layout", "layout-text", b"v4-24/16")
put("npa_layout", "layout-alias", b"V6-ifindex/last-seen")

# --- BTF: a small kernel with the structs the detector resolves (kernel/offsets.rs) -------------
class Btf:
    def __init__(self, first_id=1, str_base=0):
        self.types, self.strings, self.next, self.str_base = b"", b"" if str_base else b"\0", first_id, str_base
        self.names = {}

    def name(self, s):
        if not s:
            return 0
        off = self.str_base + len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, name, kind, vlen, size_or_type, extra=b""):
        self.types += struct.pack("<III", self.name(name), (kind << 24) | vlen, size_or_type) + extra
        self.next += 1
        return self.next - 1

    def int(self, name, size):
        return self.add(name, 1, 0, size, struct.pack("<I", size * 8))

    def ptr(self, to):
        return self.add("", 2, 0, to)

    def array(self, elem, index, n):
        return self.add("", 3, 0, 0, struct.pack("<III", elem, index, n))

    def agg(self, kind, name, size, members):
        extra = b"".join(struct.pack("<III", self.name(n), t, off * 8) for n, t, off in members)
        return self.add(name, kind, len(members), size, extra)

    def strukt(self, name, size, members):
        return self.agg(4, name, size, members)

    def union(self, name, size, members):
        return self.agg(5, name, size, members)

    def typedef(self, name, to):
        return self.add(name, 8, 0, to)

    def func(self, name):
        proto = self.add("", 13, 0, 0)
        return self.add(name, 12, 0, proto)

    def bytes(self):
        h = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return h + self.types + self.strings


b = Btf()
u8, u16, u32, u64 = b.int("unsigned char", 1), b.int("short unsigned int", 2), b.int("unsigned int", 4), b.int("long long unsigned int", 8)
u32t = b.typedef("u32", u32)
void_p = b.ptr(0)
ns_common = b.strukt("ns_common", 8, [("stashed", u32, 0), ("inum", u32t, 4)])
net = b.strukt("net", 24, [("passive", u64, 0), ("ns", ns_common, 16)])
net_p = b.ptr(net)
possible_net = b.strukt("possible_net_t", 8, [("net", net_p, 0)])
b.strukt("sk_buff", 64, [("head", void_p, 0), ("_nfct", u64, 8), ("protocol", u16, 16), ("network_header", u16, 18)])
b.strukt("kmem_cache", 16, [("size", u32, 0), ("name", void_p, 8)])
b.strukt("task_struct", 16, [("pid", u32, 0), ("files", void_p, 8)])
b.strukt("files_struct", 16, [("count", u32, 0), ("fdt", void_p, 8)])
b.strukt("fdtable", 16, [("max_fds", u32, 0), ("fd", void_p, 8)])
b.strukt("file", 16, [("f_mode", u32, 0), ("private_data", void_p, 8)])
b.strukt("bpf_map", 16, [("key_size", u32, 4), ("id", u32, 8)])
b.func("nf_ct_destroy")
base = b.bytes()

s = Btf(b.next, len(b.strings))
addr = s.union("nf_inet_addr", 16, [("all", s.array(u32, u32, 4), 0), ("ip", u32, 0)])
man_u = s.union("", 2, [("all", u16, 0)])
man = s.strukt("nf_conntrack_man", 20, [("u3", addr, 0), ("u", man_u, 16), ("l3num", u16, 18)])
dst_anon = s.strukt("", 20, [("u3", addr, 0), ("u", man_u, 16), ("protonum", u8, 18), ("dir", u8, 19)])
tup = s.strukt("nf_conntrack_tuple", 40, [("src", man, 0), ("dst", dst_anon, 20)])
hash_ = s.strukt("nf_conntrack_tuple_hash", 56, [("hnnode", s.array(void_p, u32, 2), 0), ("tuple", tup, 16)])
inner = s.strukt("", 16, [("timeout", u32, 0), ("status", u64, 8)])
s.strukt("nf_conn", 160, [("ct_general", u32, 0), ("", inner, 8), ("ct_net", possible_net, 24), ("tuplehash", s.array(hash_, u32, 2), 32)])
s.func("nf_conntrack_free")
split = s.bytes()
put("btf_offsets", "base-only", struct.pack("<I", len(base)) + base)
put("btf_offsets", "base-and-nf_conntrack", struct.pack("<I", len(base)) + base + split)

# --- HTTP requests: target line, then the Authorization header ---------------------------------
for name, req in [
    ("races-text", b"/v1/races?format=text\nBearer fuzz-token"),
    ("events-json", b"/v1/events\nBearer fuzz-token"),
    ("metrics", b"/metrics\nBearer fuzz-token"),
    ("metrics-no-token", b"/metrics\nBasic Zm9v"),
    ("healthz", b"/healthz"),
    ("readyz", b"/readyz"),
    ("query-odd", b"/v1/races?format=text&format=json&x=%ff\nBearer fuzz-token"),
]:
    put("http_request", name, req)
