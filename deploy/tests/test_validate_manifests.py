"""The manifest validator catches what it is for: each test breaks a copy of deploy/ in one way
and expects the validator to fail on exactly that (and to pass on the unbroken part).

Needs KV_PYTHON (the venv's python with kubernetes-validate) and DETECTOR_BIN (the detector
binary); `cargo xtask deploy-test` and `cargo xtask test` set both."""

import os
import re
import shutil
import subprocess
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
DEPLOY = os.path.normpath(os.path.join(HERE, ".."))
VALIDATOR = os.path.join(HERE, "validate_manifests.py")
DAEMONSET = os.path.join("detector", "daemonset.yaml")
# Flags of `detector run` that exist before the HTTP/kube half of issue 7 lands.
EXISTING = ["run", "--log=$(DETECTOR_LOG)", "--backend=$(DETECTOR_BACKEND)",
            "--btf-dir=/sys/kernel/btf", "--ring-mib=$(DETECTOR_RING_MIB)",
            "--max-entries=$(DETECTOR_MAX_ENTRIES)", "--map-pin=$(DETECTOR_MAP_PIN)",
            "--map-name=$(DETECTOR_MAP_NAME)", "--trace-dir=/var/lib/detector/traces"]


def env(name):
    v = os.environ.get(name)
    if not v:
        raise AssertionError(f"{name} is not set: run these tests through `cargo xtask deploy-test`")
    return v


class Validator(unittest.TestCase):
    def setUp(self):
        self.py, self.bin = env("KV_PYTHON"), env("DETECTOR_BIN")
        self.tmp = tempfile.mkdtemp(prefix="dpl-manifests-")
        self.deploy = os.path.join(self.tmp, "deploy")
        shutil.copytree(DEPLOY, self.deploy, ignore=shutil.ignore_patterns("__pycache__"))
        self.set_args(EXISTING)

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def set_args(self, args):
        """Replaces the detector container's args list (its comment lines too)."""
        p = os.path.join(self.deploy, DAEMONSET)
        text = open(p).read()
        block = "".join(f"            - {a}\n" for a in args)
        new, n = re.subn(r"(          args:\n)(            [-#] .*\n)+", lambda m: m.group(1) + block, text)
        self.assertEqual(n, 1, "the DaemonSet's args block was not found")
        with open(p, "w") as f:
            f.write(new)

    def edit(self, rel, old, new):
        p = os.path.join(self.deploy, rel)
        text = open(p).read()
        self.assertIn(old, text)
        with open(p, "w") as f:
            f.write(text.replace(old, new, 1))

    def validate(self):
        r = subprocess.run([self.py, VALIDATOR, "--deploy", self.deploy, "--detector", self.bin],
                           capture_output=True, text=True)
        fails = [l for l in r.stdout.splitlines() if l.startswith("FAIL")]
        summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr
        return r.returncode, fails, summary, r.stdout + r.stderr

    def test_existing_flags_pass(self):
        rc, fails, summary, out = self.validate()
        self.assertEqual((rc, fails), (0, []), out)
        self.assertRegex(summary, r"^manifests: \d+ passed, 0 failed$")
        self.assertIn("flags: 8 flags all in `detector run --help`", out)

    def test_wrong_flag_fails(self):
        self.set_args(EXISTING + ["--map-pinn=/sys/fs/bpf/x"])
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(fails, out)
        self.assertTrue(all("--map-pinn not in `detector run --help`" in f for f in fails), fails)

    def test_unknown_field_fails_the_schema(self):
        self.edit(DAEMONSET, "      hostNetwork: true\n", "      hostNetwork: true\n      hostNetwrok: true\n")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(any("DaemonSet detector/detector" in f and "hostNetwrok" in f for f in fails), out)

    def test_wrong_type_fails_the_schema(self):
        self.edit(os.path.join("lab", "networkpolicy.yaml"), "port: 8080", "port: [8080]")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(any("NetworkPolicy race-lab/race-server" in f for f in fails), out)

    def test_undefined_variable_fails(self):
        self.set_args(EXISTING + ["--netns=$(NO_SUCH_SETTING)"])
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(any("$(NO_SUCH_SETTING) not defined" in f for f in fails), out)

    def test_unreferenced_manifest_fails(self):
        with open(os.path.join(self.deploy, "lab", "forgotten.yaml"), "w") as f:
            f.write("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(any("deploy/lab/forgotten.yaml" in f for f in fails), out)


    def test_pod_without_os_selector_fails(self):
        self.edit(os.path.join("lab", "server.yaml"),
                  "      nodeSelector:\n        kubernetes.io/os: linux\n", "")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(fails, out)
        self.assertTrue(all("Deployment race-lab/race-server" in f and "nodeSelector" in f
                            for f in fails), fails)

    def test_token_left_to_the_default_fails(self):
        self.edit(os.path.join("tuner", "reset", "daemonset.yaml"),
                  "      automountServiceAccountToken: false\n", "")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertTrue(fails, out)
        self.assertTrue(all("conntrack-reset" in f and "automountServiceAccountToken is not set" in f
                            for f in fails), fails)

    def test_idle_shorter_than_the_timeout_fails(self):
        self.edit(os.path.join("timing", "timing.env"), "REPRODUCER_IDLE=45", "REPRODUCER_IDLE=30")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        # One race-timing ConfigMap per namespace that reads it, and deploy/timing's own.
        namespaces = {f.split()[2].split("/")[0] for f in fails}
        self.assertEqual(namespaces, {"detector", "conntrack-tuner", "conntrack-reset", "race-lab", "-"},
                         fails)
        self.assertTrue(all("REPRODUCER_IDLE=30 must exceed TEST_TIMEOUT=30" in f for f in fails), fails)

    def test_servicemonitor_on_a_missing_port_fails(self):
        self.edit(os.path.join("detector", "monitoring", "servicemonitor.yaml"),
                  "port: http-metrics", "port: metrics")
        rc, fails, _, out = self.validate()
        self.assertEqual(rc, 1)
        self.assertEqual(len(fails), 1, out)
        self.assertIn("ServiceMonitor detector/detector", fails[0])
        self.assertIn("['metrics']", fails[0])

if __name__ == "__main__":
    unittest.main()
