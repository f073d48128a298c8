"""Network namespaces for the deploy/ script tests (root only; standard library only).

Every namespace is named `dpl-<pid>-<n>` and removed by `cleanup()`, also after a failed test.
Nothing here touches the root namespace's settings: the per-namespace conntrack sysctls
(`/proc/sys/net/netfilter` read from inside a namespace) are the ones tested.
"""

import itertools
import os
import subprocess
import time

_counter = itertools.count()
_made = []

KEY = "nf_conntrack_tcp_timeout_established"
ROOT_SYSCTL = f"/proc/sys/net/netfilter/{KEY}"


def sh(*cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def new():
    name = f"dpl-{os.getpid()}-{next(_counter)}"
    sh("ip", "netns", "add", name)
    _made.append(name)
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def path(name):
    return f"/run/netns/{name}"


def enter(name):
    """Command prefix that runs a program in namespace `name` (nsenter keeps /sys intact)."""
    return ["nsenter", f"--net={path(name)}"]


def run_in(name, *cmd, check=True):
    return sh(*enter(name), *cmd, check=check)


def sysctl_get(name):
    return int(run_in(name, "cat", f"/proc/sys/net/netfilter/{KEY}").stdout.strip())


def sysctl_set(name, value):
    run_in(name, "sh", "-c", f"echo {value} > /proc/sys/net/netfilter/{KEY}")


def pair(a, b, a_ip, b_ip):
    """A veth between namespaces a and b, addresses a_ip/24 and b_ip/24."""
    va, vb = f"dpl{os.getpid() % 10000}{next(_counter)}a", f"dpl{os.getpid() % 10000}{next(_counter)}b"
    sh("ip", "link", "add", va, "netns", a, "type", "veth", "peer", "name", vb, "netns", b)
    sh("ip", "-n", a, "addr", "add", f"{a_ip}/24", "dev", va)
    sh("ip", "-n", b, "addr", "add", f"{b_ip}/24", "dev", vb)
    sh("ip", "-n", a, "link", "set", va, "up")
    sh("ip", "-n", b, "link", "set", vb, "up")


def track_conntrack(name):
    """Makes conntrack track the namespace's traffic (a netns only tracks once a rule uses it)."""
    rules = (
        "table inet dpl {\n chain in {\n  type filter hook input priority 0;\n"
        "  ct state established,related accept\n }\n}\n"
    )
    sh(*enter(name), "nft", "-f", "-", input=rules)


def cleanup():
    while _made:
        sh("ip", "netns", "del", _made.pop(), check=False)


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
