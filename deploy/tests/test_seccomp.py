"""The detector's seccomp profile (deploy/detector/seccomp.json) as a runtime reads it: every
name is a real system call (a misspelt name would be skipped by the runtime and the call denied
at run time), bpf and perf_event_open are allowed, everything else is denied with EPERM, and the
calls that would let a compromised detector leave its box are not in the allowlist.
test_daemonset.py runs the detector under it."""

import ctypes
import json
import os
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PROFILE = os.path.join(HERE, "..", "detector", "seccomp.json")
# Never needed by the detector; each one widens what a compromised process could do.
DENIED = ["mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "ptrace",
          "process_vm_readv", "process_vm_writev", "init_module", "finit_module",
          "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
          "keyctl", "add_key", "request_key", "userfaultfd", "open_by_handle_at", "setuid",
          "setgid", "setgroups", "personality", "acct", "settimeofday", "clock_settime"]


class SeccompProfile(unittest.TestCase):
    def setUp(self):
        self.profile = json.load(open(PROFILE))
        self.allowed = [n for r in self.profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
                        for n in r["names"]]

    def test_denies_by_default_with_eperm(self):
        self.assertEqual(self.profile["defaultAction"], "SCMP_ACT_ERRNO")
        self.assertEqual(self.profile.get("defaultErrnoRet", 1), 1)
        self.assertIn("SCMP_ARCH_X86_64", self.profile["architectures"])

    def test_allows_what_loads_the_programs(self):
        for name in ("bpf", "perf_event_open", "ioctl", "execve"):
            self.assertIn(name, self.allowed)

    def test_every_name_is_a_system_call(self):
        lib = ctypes.CDLL("libseccomp.so.2")
        lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        x86_64 = lib.seccomp_arch_resolve_name(b"x86_64")
        self.assertNotEqual(x86_64, 0)
        unknown = [n for n in self.allowed
                   if lib.seccomp_syscall_resolve_name_arch(x86_64, n.encode()) < 0]
        self.assertEqual(unknown, [], "not system calls on x86_64")
        self.assertEqual(len(self.allowed), len(set(self.allowed)), "a name listed twice")

    def test_escape_hatches_stay_denied(self):
        self.assertEqual(sorted(set(DENIED) & set(self.allowed)), [])


if __name__ == "__main__":
    unittest.main()
