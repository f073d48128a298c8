"""Runs a program the way the detector DaemonSet's container runs it, minus the image: in its
own mount namespace with the manifest's hostPath mounts (read-only where the manifest says so)
and with exactly the manifest's capabilities (the bounding set is cut to them before exec, so a
root exec gets those and no others), no_new_privs (allowPrivilegeEscalation: false), and
optionally a seccomp profile in the Kubernetes Localhost JSON format, loaded the way a runtime
loads it (libseccomp, just before exec).

    unshare -m --propagation private python3 container.py --caps BPF,PERFMON \\
        [--seccomp PROFILE.json] tmpfs=/x mkdir=/x/y bind-ro=SRC:DST ... -- PROGRAM ARGS...
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
# libseccomp's action values (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_ACT_KILL_PROCESS = 0x80000000
CAP_LAST = 40  # CAP_CHECKPOINT_RESTORE; higher numbers are ignored below
CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}


def load_seccomp(path):
    """Loads a Localhost seccomp profile for this process (and what it execs). Only the parts
    the shipped profile uses: defaultAction, defaultErrnoRet, and allow/errno rules by name."""
    profile = json.load(open(path))
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

    def action(name, errno_ret):
        if name == "SCMP_ACT_ALLOW":
            return SCMP_ACT_ALLOW
        if name == "SCMP_ACT_ERRNO":
            return SCMP_ACT_ERRNO | (errno_ret & 0xFFFF)
        if name == "SCMP_ACT_KILL_PROCESS":
            return SCMP_ACT_KILL_PROCESS
        sys.exit(f"container.py: seccomp action {name} is not supported here")

    default_errno = profile.get("defaultErrnoRet", 1)
    ctx = lib.seccomp_init(action(profile["defaultAction"], default_errno))
    if not ctx:
        sys.exit("container.py: seccomp_init failed")
    for rule in profile.get("syscalls", []):
        if rule.get("args") or rule.get("includes") or rule.get("excludes"):
            sys.exit("container.py: seccomp rules with args/includes/excludes are not supported")
        act = action(rule["action"], rule.get("errnoRet", default_errno))
        for name in rule["names"]:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall on this architecture (a runtime skips it too)
            rc = lib.seccomp_rule_add(ctx, act, nr, 0)
            if rc != 0:
                sys.exit(f"container.py: seccomp rule for {name}: {os.strerror(-rc)}")
    rc = lib.seccomp_load(ctx)
    if rc != 0:
        sys.exit(f"container.py: seccomp_load: {os.strerror(-rc)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", required=True, help="comma-separated, e.g. BPF,PERFMON")
    ap.add_argument("--seccomp", help="a Localhost seccomp profile (JSON) to load before exec")
    ap.add_argument("ops", nargs="*", help="in order: tmpfs=DIR mkdir=DIR touch=FILE "
                    "bind=SRC:DST bind-ro=SRC:DST ro=DIR robind=DIR, then -- PROGRAM ARGS")
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit("container.py: -- PROGRAM ARGS missing")
    cut = args.index("--")
    a = ap.parse_args(args[:cut])
    argv = args[cut + 1:]
    keep = set()
    for c in a.caps.split(","):
        if c.strip().upper() not in CAPS:
            sys.exit(f"container.py: unknown capability {c}")
        keep.add(CAPS[c.strip().upper()])
    for op in a.ops:
        kind, _, val = op.partition("=")
        if kind == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", val], check=True)
        elif kind == "mkdir":
            os.makedirs(val, exist_ok=True)
        elif kind == "touch":
            open(val, "a").close()
        elif kind in ("bind", "bind-ro"):
            src, dst = val.split(":")
            subprocess.run(["mount", "--bind", src, dst], check=True)
            if kind == "bind-ro":
                subprocess.run(["mount", "-o", "remount,bind,ro", dst], check=True)
        elif kind == "ro":
            # A filesystem mounted above (its own superblock).
            subprocess.run(["mount", "-o", "remount,ro", val], check=True)
        elif kind == "robind":
            # Read-only for this mount namespace only (a per-mount flag; the host's stays rw).
            subprocess.run(["mount", "-o", "remount,bind,ro", val], check=True)
        else:
            sys.exit(f"container.py: unknown operation {op}")
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(CAP_LAST + 1):
        if cap not in keep and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            sys.exit(f"container.py: dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit(f"container.py: no_new_privs: {os.strerror(ctypes.get_errno())}")
    if a.seccomp:
        # Last, as a runtime does: everything from here on (execve included) is filtered.
        load_seccomp(a.seccomp)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
