"""The cluster reproducer (deploy/lab/reproducer.py), run for real: its server in one network
namespace, its client in another, joined by a veth. The server's namespace tracks connections
with a 2 s established timeout (the tuner's job in a cluster). The test proves what the lab
needs from it: during each idle period the server's conntrack entries of the client's ports
expire while the client's sockets stay open, and the next cycle reconnects from the same ports,
so conntrack sees a new entry for the same 5-tuple."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import netns

HERE = os.path.dirname(os.path.abspath(__file__))
REPRO = os.path.join(HERE, "..", "lab", "reproducer.py")
SRV_IP, CLI_IP = "10.79.0.1", "10.79.0.2"
PORTS = [42101, 42102, 42103]
TIMEOUT = 2
IDLE = 3.5
CYCLES = 3


def fields(line):
    """`key=value` fields of a conntrack line; the first of a repeated key wins (the original
    direction's src/dst/sport/dport come before the reply's)."""
    out = {}
    for f in line.split():
        k, eq, v = f.partition("=")
        if eq:
            out.setdefault(k, v)
    return out


def entries(ns):
    """The server namespace's TCP conntrack entries to port 8080, as (sport, id) pairs. A dump
    also removes entries whose timeout has passed, so an expired entry is absent here."""
    out = netns.run_in(ns, "conntrack", "-L", "-p", "tcp", "--dport", "8080", "-o", "id", check=False)
    found = []
    for line in out.stdout.splitlines():
        f = fields(line)
        if f.get("dst") == SRV_IP:
            found.append((int(f["sport"]), f.get("id")))
    return found


def wait_subscribed(ns, events):
    """Returns once `conntrack -E` writing to `events` reports events. It prints nothing until
    one comes, and a fixed pause before the first connection was not always enough on a busy
    machine (a cycle's NEW events went missing): marker entries (to port 2 from an address the
    test never uses) are inserted until one shows up."""
    # Read through a descriptor of our own: `events` shares its file offset with the writer.
    with open(f"/proc/self/fd/{events.fileno()}") as seen:
        for sport in range(1, 101):
            netns.run_in(ns, "conntrack", "-I", "-p", "tcp", "-s", "10.79.0.9", "-d", SRV_IP,
                         "--sport", str(sport), "--dport", "2", "--state", "ESTABLISHED",
                         "-t", "30", check=False)
            time.sleep(0.1)
            seen.seek(0)
            if f"sport={sport} " in seen.read():
                return
    raise AssertionError("conntrack -E reported none of 100 marker entries in 10 s")


class Reproducer(unittest.TestCase):
    def setUp(self):
        # Cleanups run even when setUp fails half-way (tearDown does not).
        self.addCleanup(netns.cleanup)
        self.srv, self.cli = netns.new(), netns.new()
        netns.pair(self.srv, self.cli, SRV_IP, CLI_IP)
        netns.track_conntrack(self.srv)
        netns.sysctl_set(self.srv, TIMEOUT)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        netns.cleanup()

    def spawn(self, ns, *args, **kw):
        p = subprocess.Popen(netns.enter(ns) + [sys.executable, REPRO, *args], text=True, **kw)
        self.procs.append(p)
        return p

    def test_reuses_the_5tuple_after_the_server_entry_expired(self):
        events = tempfile.TemporaryFile(mode="w+")
        self.addCleanup(events.close)
        # Every conntrack NEW in the server's namespace, with the entry id (one per lifetime).
        ev = subprocess.Popen(
            netns.enter(self.srv) + ["conntrack", "-E", "-e", "NEW", "-p", "tcp"],
            stdout=events, stderr=subprocess.DEVNULL, text=True,
        )
        self.procs.append(ev)
        wait_subscribed(self.srv, events)
        server = self.spawn(self.srv, "server", "--port", "8080", "--late-ms", "200",
                            stdout=subprocess.PIPE)
        self.assertIn('"listening"', server.stdout.readline())
        client = self.spawn(
            self.cli, "client", "--server", SRV_IP, "--ports", ",".join(map(str, PORTS)),
            "--idle", str(IDLE), "--late-ms", "200", "--cycles", str(CYCLES),
            "--wait-server", "10", stdout=subprocess.PIPE,
        )
        lines, seen_live, absent_while_idle = [], [], []
        for line in client.stdout:
            obj = json.loads(line)
            lines.append(obj)
            if obj["event"] == "cycle":
                # Right after a cycle every port's flow has a live entry...
                seen_live.append(sorted(p for p, _ in entries(self.srv) if p in PORTS))
            if obj["event"] == "idle":
                # ...and once the timeout has passed, with the sockets still open, none has.
                time.sleep(TIMEOUT + 0.7)
                absent_while_idle.append(sorted(p for p, _ in entries(self.srv) if p in PORTS))
        self.assertEqual(client.wait(timeout=30), 0, lines)
        summary = lines[-1]
        self.assertEqual(summary["event"], "summary", lines)
        self.assertEqual(summary["cycles"], CYCLES)
        self.assertEqual(summary["reuses"], len(PORTS) * (CYCLES - 1))
        self.assertEqual(summary["failed"], 0, "no policy here: every late reply must arrive")
        self.assertEqual(seen_live, [PORTS] * CYCLES)
        self.assertEqual(absent_while_idle, [[]] * (CYCLES - 1))
        time.sleep(0.3)
        ev.terminate()
        ev.wait()
        events.seek(0)
        # Count NEW events, not ids: the kernel's conntrack id hashes the entry's address and
        # tuple, so a reallocated entry of the same 5-tuple can repeat an id.
        news = {p: 0 for p in PORTS}
        for line in events:
            f = fields(line)
            if f.get("src") == CLI_IP and f.get("dst") == SRV_IP and f.get("dport") == "8080":
                sport = int(f["sport"])
                if sport in news:
                    news[sport] += 1
        # One 5-tuple per port, and a new kernel entry for it each cycle.
        self.assertEqual(news, {p: CYCLES for p in PORTS})

    def test_bad_input(self):
        p = self.spawn(self.cli, "client", "--server", SRV_IP, "--ports", "80-90",
                       stderr=subprocess.PIPE)
        self.assertNotEqual(p.wait(timeout=10), 0)
        self.assertIn("ports must lie in 1024-65535", p.stderr.read())
        p = self.spawn(self.cli, "client", "--server", "no-such-host.invalid", "--wait-server", "0",
                       stderr=subprocess.PIPE)
        self.assertNotEqual(p.wait(timeout=20), 0)
        self.assertIn("cannot resolve the server no-such-host.invalid", p.stderr.read())


if __name__ == "__main__":
    unittest.main()
