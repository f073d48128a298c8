"""Runs a program the way the detector DaemonSet's container runs it, minus the image: in its
own mount namespace with the manifest's hostPath mounts (read-only where the manifest says so)
and with exactly the manifest's capabilities (the bounding set is cut to them before exec, so a
root exec gets those and no others).

    unshare -m --propagation private python3 container.py --caps BPF,PERFMON \\
        tmpfs=/x mkdir=/x/y bind-ro=SRC:DST ... -- PROGRAM ARGS...
"""

import argparse
import ctypes
import os
import subprocess
import sys

PR_CAPBSET_DROP = 24
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", required=True, help="comma-separated, e.g. BPF,PERFMON")
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
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
