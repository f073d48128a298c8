"""The tuner/reset script (deploy/tuner/script/conntrack-timeout.sh), run for real against a
network namespace's own nf_conntrack_tcp_timeout_established, under every shell it may meet
(dash as /bin/sh, and busybox sh as in the busybox image of the DaemonSets)."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import netns

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "tuner", "script", "conntrack-timeout.sh")
ORIGINAL = 1234  # a value no kernel defaults to, so a restore can't pass by accident
TEST = 7


def shells():
    found = [["sh"]]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    return found


class Script:
    """One run of the script in namespace `ns`, with a private state directory."""

    def __init__(self, ns, shell, state, mode, **env):
        self.ready = os.path.join(state, "run", "ready")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "STATE_DIR": state,
            "READY_FILE": self.ready,
            "TEST_TIMEOUT": str(TEST),
            "TTL": "600",
            "NODE_NAME": "node-under-test",
        }
        self.env.update({k: str(v) for k, v in env.items()})
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            netns.enter(ns) + shell + [SCRIPT, mode],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout=10):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the script did not exit within {timeout} s:\n{self.output()}")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def read(path):
    with open(path) as f:
        return f.read()


class ConntrackTimeoutScript(unittest.TestCase):
    def setUp(self):
        self.root_before = read(netns.ROOT_SYSCTL)
        # Cleanups run even when setUp fails half-way (tearDown does not).
        self.addCleanup(netns.cleanup)
        self.ns = netns.new()
        netns.sysctl_set(self.ns, ORIGINAL)
        self.state = tempfile.mkdtemp(prefix="dpl-state-")
        self.record = os.path.join(self.state, netns.KEY + ".orig")
        self.runs = []

    def tearDown(self):
        for r in self.runs:
            r.kill()
        netns.cleanup()
        shutil.rmtree(self.state, ignore_errors=True)
        # The node's (root namespace's) value is never touched.
        self.assertEqual(read(netns.ROOT_SYSCTL), self.root_before)

    def start(self, shell, mode, **env):
        r = Script(self.ns, shell, self.state, mode, **env)
        self.runs.append(r)
        return r

    def value(self):
        return netns.sysctl_get(self.ns)

    def wait_tuned(self, r):
        # The log line comes after the write and the readiness file (a killed predecessor's
        # readiness file may still be there).
        netns.wait_for(
            lambda: f"-> {TEST} s" in r.output() or r.proc.poll() is not None, 10, "tuned"
        )
        self.assertTrue(os.path.exists(r.ready))
        self.assertIsNone(r.proc.poll(), f"the tuner exited early:\n{r.output()}")

    def test_tune_records_sets_and_restores_on_term(self):
        for shell in shells():
            with self.subTest(shell=shell):
                netns.sysctl_set(self.ns, ORIGINAL)
                r = self.start(shell, "tune")
                self.wait_tuned(r)
                self.assertEqual(self.value(), TEST)
                self.assertEqual(read(self.record).strip(), str(ORIGINAL))
                r.signal(signal.SIGTERM)
                self.assertEqual(r.wait(), 0, r.output())
                out = r.output()
                self.assertEqual(self.value(), ORIGINAL, out)
                self.assertFalse(os.path.exists(self.record), "the record outlived the restore")
                self.assertFalse(os.path.exists(r.ready), "still ready after the restore")
                self.assertIn(f"original {netns.KEY}: {ORIGINAL} s (recorded in", out)
                self.assertIn(f"set {netns.KEY}: {ORIGINAL} s -> {TEST} s", out)
                self.assertIn(f"SIGTERM: restored {netns.KEY} from {TEST} s to the original {ORIGINAL} s", out)

    def test_ttl_restores_and_a_restart_does_not_tune_again(self):
        for shell in shells():
            with self.subTest(shell=shell):
                netns.sysctl_set(self.ns, ORIGINAL)
                uid = f"pod-{shell[0]}"
                r = self.start(shell, "tune", TTL=2, POD_UID=uid)
                self.wait_tuned(r)
                self.assertEqual(self.value(), TEST)
                netns.wait_for(lambda: "TTL of 2 s reached: restored" in r.output(), 10,
                               "the restore after the TTL")
                self.assertEqual(self.value(), ORIGINAL)
                self.assertFalse(os.path.exists(r.ready), "still ready after the TTL")
                # Restored, and still running (a DaemonSet pod that exited would be restarted).
                self.assertIsNone(r.proc.poll(), r.output())
                self.assertFalse(os.path.exists(self.record))
                # The container restarts (same pod): it must not shorten the timeout again.
                again = self.start(shell, "tune", TTL=2, POD_UID=uid)
                netns.wait_for(lambda: "already expired" in again.output(), 10, "the restart's log")
                self.assertEqual(self.value(), ORIGINAL)
                for x in (r, again):
                    x.signal(signal.SIGTERM)
                    self.assertEqual(x.wait(), 0, x.output())
                self.assertEqual(self.value(), ORIGINAL)

    def test_drift_is_set_again_and_logged(self):
        # kube-proxy writes its own value when it restarts: the tuner must notice, set the test
        # value again and say so, and still restore the node's original (not the drifted value).
        drifted = 555
        for shell in shells():
            with self.subTest(shell=shell):
                netns.sysctl_set(self.ns, ORIGINAL)
                r = self.start(shell, "tune", CHECK_INTERVAL=1)
                self.wait_tuned(r)
                netns.sysctl_set(self.ns, drifted)
                netns.wait_for(lambda: "drift:" in r.output() or r.proc.poll() is not None, 10,
                               "the tuner's drift line")
                out = r.output()
                self.assertIn(f"set {drifted} s -> {TEST} s", out)
                self.assertEqual(self.value(), TEST, out)
                self.assertEqual(self.start(shell, "ready").wait(), 0)
                r.signal(signal.SIGTERM)
                self.assertEqual(r.wait(), 0, r.output())
                self.assertEqual(self.value(), ORIGINAL, r.output())
                self.assertIn(f"restored {netns.KEY} from {TEST} s to the original {ORIGINAL} s",
                              r.output())

    def test_ready_checks_the_live_value(self):
        shell = shells()[-1]
        before = self.start(shell, "ready")
        self.assertEqual(before.wait(), 1, before.output())
        self.assertIn("not tuned", before.output())
        # A check interval longer than the test: the drift stays until the test ends.
        r = self.start(shell, "tune", CHECK_INTERVAL=600)
        self.wait_tuned(r)
        ok = self.start(shell, "ready")
        self.assertEqual(ok.wait(), 0, ok.output())
        netns.sysctl_set(self.ns, 555)
        drifted = self.start(shell, "ready")
        self.assertEqual(drifted.wait(), 1, drifted.output())
        self.assertIn(f"{netns.KEY} is 555 s, not the test value {TEST} s", drifted.output())
        r.signal(signal.SIGTERM)
        self.assertEqual(r.wait(), 0, r.output())
        self.assertEqual(self.value(), ORIGINAL)

    def test_killed_tuner_keeps_the_first_record(self):
        shell = shells()[-1]
        r = self.start(shell, "tune")
        self.wait_tuned(r)
        r.signal(signal.SIGKILL)  # no chance to restore: the record must survive
        r.wait()
        self.assertEqual(self.value(), TEST)
        again = self.start(shell, "tune")
        self.wait_tuned(again)
        self.assertIn(f"original {netns.KEY}: {ORIGINAL} s (recorded earlier", again.output())
        again.signal(signal.SIGTERM)
        self.assertEqual(again.wait(), 0, again.output())
        self.assertEqual(self.value(), ORIGINAL)

    def test_prestop_restore_then_term(self):
        shell = shells()[-1]
        r = self.start(shell, "tune")
        self.wait_tuned(r)
        pre = self.start(shell, "restore")
        self.assertEqual(pre.wait(), 0, pre.output())
        self.assertEqual(self.value(), ORIGINAL)
        r.signal(signal.SIGTERM)
        self.assertEqual(r.wait(), 0, r.output())
        self.assertIn("SIGTERM: no record", r.output())
        self.assertEqual(self.value(), ORIGINAL)

    def test_reset_restores_the_record(self):
        shell = shells()[-1]
        r = self.start(shell, "tune")
        self.wait_tuned(r)
        r.signal(signal.SIGKILL)
        r.wait()
        reset = self.start(shell, "reset", RESET_FALLBACK=86400)
        self.assertEqual(reset.wait(), 0, reset.output())
        self.assertEqual(self.value(), ORIGINAL, reset.output())
        self.assertIn(f"reset: restored {netns.KEY} from {TEST} s to the original {ORIGINAL} s", reset.output())
        self.assertTrue(os.path.exists(reset.ready))

    def test_reset_without_record(self):
        shell = shells()[-1]
        # Still the test value, no record (e.g. the node was tuned by the seed's tuner).
        netns.sysctl_set(self.ns, TEST)
        reset = self.start(shell, "reset", RESET_FALLBACK=4321)
        self.assertEqual(reset.wait(), 0, reset.output())
        self.assertEqual(self.value(), 4321)
        self.assertIn("set the fallback 4321 s", reset.output())
        # Not the test value: the node's own value is left alone.
        netns.sysctl_set(self.ns, ORIGINAL)
        reset = self.start(shell, "reset", RESET_FALLBACK=4321)
        self.assertEqual(reset.wait(), 0, reset.output())
        self.assertEqual(self.value(), ORIGINAL)
        self.assertIn("left unchanged", reset.output())

    def test_reset_hold_stays_up_and_ready(self):
        shell = shells()[-1]
        netns.sysctl_set(self.ns, TEST)
        reset = self.start(shell, "reset", RESET_FALLBACK=4321, HOLD=1)
        netns.wait_for(lambda: os.path.exists(reset.ready), 10, "reset ready")
        time.sleep(0.3)
        self.assertIsNone(reset.proc.poll(), reset.output())
        reset.signal(signal.SIGTERM)
        self.assertEqual(reset.wait(), 0)
        self.assertEqual(self.value(), 4321)

    def test_bad_settings_fail_clearly(self):
        shell = shells()[-1]
        r = self.start(shell, "tune", TEST_TIMEOUT="abc")
        self.assertNotEqual(r.wait(), 0)
        self.assertIn("TEST_TIMEOUT=abc is not a positive whole number", r.output())
        r = self.start(shell, "tune", SYSCTL_DIR="/nonexistent")
        self.assertNotEqual(r.wait(), 0)
        self.assertIn("cannot read /nonexistent/nf_conntrack_tcp_timeout_established", r.output())
        self.assertEqual(self.value(), ORIGINAL)
        with open(self.record, "w") as f:
            f.write("garbage\n")
        r = self.start(shell, "tune")
        self.assertNotEqual(r.wait(), 0)
        self.assertIn("holds 'garbage'", r.output())
        self.assertEqual(self.value(), ORIGINAL, "a bad record must not lead to tuning")
        r = self.start(shell, "bogus")
        self.assertNotEqual(r.wait(), 0)
        self.assertIn("usage:", r.output())


if __name__ == "__main__":
    unittest.main()
