#!/usr/bin/env python3
"""The race lab's port-reuse reproducer for a cluster (Python 3 standard library only).

The same traffic as `detector lab`'s reproducer, between two pods:

  server  accepts connections and echoes each byte; a `d` byte is answered late (--late-ms),
          so a reply is in flight while the agent's cleanup may delete the flow's key.
  client  holds one connection per fixed source port (--ports). Each cycle it lets the
          connections idle past the node's conntrack timeout (--idle, longer than the tuner's
          TEST_TIMEOUT), so the kernel entries expire while the agent's cache keeps the keys;
          then it resets each connection (RST: no TIME_WAIT) and reconnects from the same port:
          the same 5-tuple, a new kernel entry, and a late request. A reply that never comes is
          a failed request: with a NetworkPolicy that isolates the server's egress, the reply
          passes only while the agent's conntrack cache holds the flow's key, so a failure is
          the race's symptom. One JSON line per cycle on stdout; a summary at the end.

Run `reproducer.py server --help` / `reproducer.py client --help`.
"""

import argparse
import errno
import json
import signal
import socket
import struct
import sys
import threading
import time

STOP = threading.Event()


def log(obj):
    obj = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **obj}
    print(json.dumps(obj, sort_keys=False), flush=True)


def fail(msg):
    print(f"reproducer: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


# --- server -----------------------------------------------------------------------------------


def serve_conn(conn, late):
    with conn:
        while not STOP.is_set():
            try:
                b = conn.recv(1)
            except OSError:
                return
            if not b:
                return
            if b == b"d":
                time.sleep(late)
            try:
                conn.sendall(b)
            except OSError:
                return


def server(args):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        ls.bind((args.bind, args.port))
    except OSError as e:
        fail(f"cannot listen on {args.bind}:{args.port}: {e.strerror}")
    ls.listen(256)
    ls.settimeout(0.5)
    log({"event": "listening", "addr": f"{args.bind}:{args.port}", "late_ms": args.late_ms})
    while not STOP.is_set():
        try:
            conn, _ = ls.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve_conn, args=(conn, args.late_ms / 1000), daemon=True).start()
    log({"event": "stopped"})


# --- client -----------------------------------------------------------------------------------


def parse_ports(text):
    """`42001-42008` or `42001,42005` (or a mix) -> sorted unique ports."""
    ports = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                ports.update(range(lo, hi + 1))
            else:
                ports.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"`{part}` is not a port or a range like 42001-42008")
    if not ports or min(ports) < 1024 or max(ports) > 65535:
        raise argparse.ArgumentTypeError("ports must lie in 1024-65535")
    return sorted(ports)


def resolve(host, port):
    try:
        return socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except socket.gaierror as e:
        return e


def connect(port, to, timeout):
    """A connection from source port `port` (SO_REUSEADDR: the previous one was reset)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    # The previous connection's 4-tuple can linger a moment after its reset.
    for attempt in range(50):
        try:
            s.connect(to)
            break
        except OSError as e:
            if e.errno not in (errno.EADDRNOTAVAIL, errno.EADDRINUSE) or attempt == 49:
                s.close()
                raise
            time.sleep(0.02)
    s.settimeout(timeout)
    return s


def reset(s):
    """Closes with a RST: no FIN exchange, no TIME_WAIT, the port is free at once."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    except OSError:
        pass


def exchange(s, what):
    try:
        s.sendall(what)
        return s.recv(1) == what
    except OSError:
        return False


class Client:
    def __init__(self, args, to):
        self.args = args
        self.to = to
        self.conns = {p: None for p in args.ports}
        self.stats = {"cycles": 0, "reuses": 0, "requests": 0, "failed": 0}

    def reuse_all(self, late):
        """(Re)connects every port in parallel and sends each a request: `x` answered at once
        on the first cycle (the flow gets established and its key inserted), then `d`,
        answered late. Returns the ports whose connect or first exchange failed."""
        errors = {}
        reused = []

        def one(port):
            old = self.conns[port]
            self.conns[port] = None
            if old is not None:
                reset(old)
                reused.append(port)
            try:
                s = connect(port, self.to, self.args.late_ms * 3 / 1000)
                if late:
                    s.sendall(b"d")
                elif not exchange(s, b"x"):
                    raise OSError(f"the first request from port {port} got no reply")
                self.conns[port] = s
            except OSError as e:
                errors[port] = str(e)

        threads = [threading.Thread(target=one, args=(p,)) for p in self.args.ports]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.stats["reuses"] += len(reused)
        self.stats["requests"] += len(self.args.ports) - len(errors)
        return reused, errors

    def collect(self):
        """Waits for the late replies; a missing one is a failed request."""
        failed = []

        def one(port):
            s = self.conns[port]
            if s is None:
                return
            try:
                ok = s.recv(1) == b"d"
            except OSError:
                ok = False
            if not ok:
                failed.append(port)
                # Retry as an application would, and read both answers so the flow is quiet
                # before the next idle period starts.
                try:
                    s.sendall(b"x")
                    s.recv(2)
                except OSError:
                    pass

        threads = [threading.Thread(target=one, args=(p,)) for p in self.args.ports]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.stats["failed"] += len(failed)
        return sorted(failed)

    def close(self):
        for p, s in self.conns.items():
            if s is not None:
                s.close()
                self.conns[p] = None


def client(args):
    to = None
    # The server may not be up yet (a Deployment's pods start in any order).
    deadline = time.monotonic() + args.wait_server
    while True:
        to = resolve(args.server, args.port)
        if isinstance(to, tuple):
            break
        if time.monotonic() > deadline or STOP.is_set():
            fail(f"cannot resolve the server {args.server}: {to}")
        time.sleep(1)
    c = Client(args, to)
    log({"event": "start", "server": f"{to[0]}:{to[1]}", "ports": args.ports,
         "idle_s": args.idle, "late_ms": args.late_ms, "cycles": args.cycles})
    cycle = 0
    while not STOP.is_set() and (args.cycles == 0 or cycle < args.cycles):
        late = cycle > 0
        reused, errors = c.reuse_all(late)
        if errors and cycle == 0:
            if time.monotonic() < deadline:
                # The server is not answering yet: start over.
                c.close()
                time.sleep(1)
                continue
            fail(f"cannot reach the server {to[0]}:{to[1]}: {json.dumps(errors)}")
        failed = c.collect() if late else []
        c.stats["cycles"] = cycle + 1
        log({"event": "cycle", "cycle": cycle, "reused": len(reused),
             "requests": len(args.ports) - len(errors), "failed": len(failed),
             "failed_ports": failed, "connect_errors": errors})
        cycle += 1
        if args.cycles and cycle >= args.cycles:
            break
        # Idle past the node's conntrack timeout: the kernel entries expire, the agent's
        # cache keeps the keys until its next cleanup.
        log({"event": "idle", "cycle": cycle, "seconds": args.idle})
        STOP.wait(args.idle)
    c.close()
    log({"event": "summary", **c.stats})
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server", help="echo server; `d` is answered late")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--late-ms", type=int, default=2000, help="delay before answering `d`")
    c = sub.add_parser("client", help="port-reuse client")
    c.add_argument("--server", required=True, help="server host name or IPv4 address")
    c.add_argument("--port", type=int, default=8080)
    c.add_argument("--ports", type=parse_ports, default=parse_ports("42001-42016"),
                   help="fixed source ports, e.g. 42001-42016 (default)")
    c.add_argument("--idle", type=float, default=45.0,
                   help="seconds each cycle idles; must exceed the node's conntrack timeout")
    c.add_argument("--late-ms", type=int, default=2000,
                   help="the server's reply delay (to size the read timeout)")
    c.add_argument("--cycles", type=int, default=0, help="stop after N cycles (0: never)")
    c.add_argument("--wait-server", type=float, default=120.0,
                   help="seconds to wait for the server to resolve and answer")
    args = p.parse_args(argv)
    if getattr(args, "late_ms", 1) < 1:
        fail("--late-ms must be at least 1")
    if args.role == "client" and args.idle <= 0:
        fail("--idle must be a positive number of seconds")

    def stop(*_):
        STOP.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main() or 0)
